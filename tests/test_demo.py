"""``weightkit demo``: the options it takes (the full run is the demo itself, minutes long)."""

import pytest
import torch

from weightkit.demo import run_demo
from weightkit.errors import WeightkitError


def test_demo_refuses_a_device_this_machine_lacks_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(WeightkitError, match="no CUDA GPU"):
        run_demo(tmp_path / "out", quiet=True, device="cuda")
    assert not (tmp_path / "out").exists()


def test_demo_refuses_an_output_that_is_not_a_model_directory_before_any_work(tmp_path, monkeypatch):
    # It used to rmtree whatever --output named. Now the checkpoint writer's rule applies, up front.
    import weightkit.demo as demo

    monkeypatch.setattr(demo, "load_model", lambda *_: pytest.fail("the demo started working"))
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(WeightkitError, match="does not look like a model directory"):
        run_demo(precious, quiet=True, device="cpu")
    assert (precious / "thesis.txt").read_text() == "years of work"
