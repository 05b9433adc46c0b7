"""Tests for weightkit.merge.fisher_file: saving and loading a Fisher."""

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.fisher_file import load_fisher, save_fisher

# -- the Fisher file -------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    shared = torch.rand(4, 3)
    fisher = {"a.weight": shared, "b.weight": shared, "c.bias": torch.zeros(5, dtype=torch.float64)}
    path = save_fisher(fisher, tmp_path / "sub" / "fisher.safetensors", metadata={"examples": 12})
    tensors, metadata = load_fisher(path)
    assert set(tensors) == set(fisher)
    assert all(torch.equal(tensors[n], fisher[n]) and tensors[n].dtype == fisher[n].dtype for n in fisher)
    assert metadata["weightkit"] == "fisher" and metadata["examples"] == "12" and metadata["format"] == "pt"
    assert [p.name for p in path.parent.iterdir()] == ["fisher.safetensors"]  # no temporary file left
    with pytest.raises(WeightkitError, match="exists; pass --force"):
        save_fisher(fisher, path)
    save_fisher({"x": torch.ones(1)}, path, overwrite=True)
    assert set(load_fisher(path)[0]) == {"x"}


def test_save_and_load_refuse_bad_input(tmp_path):
    with pytest.raises(WeightkitError, match=r"\.safetensors"):
        save_fisher({"a": torch.ones(1)}, tmp_path / "f.bin")
    with pytest.raises(WeightkitError, match="empty"):
        save_fisher({}, tmp_path / "f.safetensors")
    with pytest.raises(WeightkitError, match="Fisher of a has negative"):
        save_fisher({"a": torch.tensor([-1.0])}, tmp_path / "f.safetensors")
    with pytest.raises(WeightkitError, match="Fisher of b contains 1 NaN"):
        save_fisher({"a": torch.ones(1), "b": torch.tensor([float("nan")])}, tmp_path / "f.safetensors")
    with pytest.raises(WeightkitError, match="not a floating-point"):
        save_fisher({"a": torch.ones(1, dtype=torch.long)}, tmp_path / "f.safetensors")
    assert not list(tmp_path.iterdir())
    from safetensors.torch import save_file

    save_file({"a": torch.ones(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(WeightkitError, match="not a weightkit Fisher file"):
        load_fisher(tmp_path / "plain.safetensors")
