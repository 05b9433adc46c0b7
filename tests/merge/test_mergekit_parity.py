"""NearSwap, NuSLERP, Multi-SLERP, Karcher, SCE and Arcee Fusion give mergekit 0.1.5's outputs.

The fixtures -- four tiny Llama-shaped checkpoints, a mergekit recipe per case and the tensors mergekit wrote
for it -- were made by ``tests/merge/fixtures/make_mergekit_fixtures.py`` with mergekit's own venv (its
docstring says how to regenerate them). Each recipe is run here through weightkit's recipe reader and merge.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightkit.errors import WeightkitError
from weightkit.merge import merge
from weightkit.merge.karcher import karcher_mean
from weightkit.merge.recipe import load_merge_recipe
from weightkit.registry import config_from_dict

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit"
CASES = [
    "nearswap",
    "nuslerp_base",
    "nuslerp_rows",
    "nuslerp_row_wise",
    "multislerp_base",
    "multislerp_raw",
    "karcher",
    "karcher_base",
    "karcher_base_listed",
    "sce",
    "sce_gradient",
    "arcee_fusion",
]
# Every operation is mergekit's, in float32: the same bits. The other methods take norms, angles and
# coefficients in double where mergekit uses float32 (see their modules): the same values to float32
# rounding (measured: at most 2.4e-7, on norm weights near 1).
EXACT = {"nearswap", "sce", "sce_gradient", "arcee_fusion"}
ATOL = 1e-6


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_every_fixture_case_is_tested():
    assert sorted(p.stem for p in (FIXTURES / "recipes").glob("*.yaml")) == sorted(CASES)
    assert sorted(p.stem for p in (FIXTURES / "outputs").glob("*.safetensors")) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_mergekits_output(case, tmp_path):
    recipe = load_merge_recipe(FIXTURES / "recipes" / f"{case}.yaml")
    merge(recipe.base, recipe.models, recipe.config, tmp_path / "out", dtype=recipe.dtype, progress=False)
    got = read_tensors(tmp_path / "out")
    expected = load_file(FIXTURES / "outputs" / f"{case}.safetensors")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32
        if case in EXACT:
            assert torch.equal(got[name], tensor), name
        else:
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=ATOL, msg=name)


def test_karcher_averages_the_base_model_with_the_others_as_mergekit_does():
    # The recipe names a base it does not list: mergekit (and weightkit) average it too, so the output is
    # not the Karcher mean of the two listed models.
    with_base = load_file(FIXTURES / "outputs" / "karcher_base.safetensors")
    models = [load_file(FIXTURES / "models" / m / "model.safetensors") for m in ("a", "b", "base")]
    name = "model.layers.1.mlp.up_proj.weight"
    three = karcher_mean([m[name].clone() for m in models], max_iter=20, tol=1e-6)
    two = karcher_mean([m[name].clone() for m in models[:2]], max_iter=20, tol=1e-6)
    torch.testing.assert_close(three, with_base[name], rtol=0, atol=ATOL)
    assert (two - with_base[name]).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    ("method", "parameters", "with_base"),
    [
        ("nearswap", {"t": 0.01}, True),
        ("nuslerp", {}, True),
        ("nuslerp", {"nuslerp_flatten": False}, False),
        ("multislerp", {}, True),
        ("karcher", {}, False),
        ("sce", {"select_topk": 0.5}, True),
        ("arcee_fusion", {}, True),
    ],
)
def test_a_non_finite_input_is_refused_naming_it(tmp_path, method, parameters, with_base, bad):
    # Whether the method checks its inputs or (nearswap, nuslerp) only its result, the message names the
    # input tensor and its checkpoint, and nothing is written.
    tensors = load_file(FIXTURES / "models" / "a" / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = bad
    broken = tmp_path / "a"
    broken.mkdir()
    (broken / "config.json").write_text((FIXTURES / "models" / "a" / "config.json").read_text())
    save_file(tensors, broken / "model.safetensors", {"format": "pt"})
    models = [broken] + ([] if method in ("nearswap", "arcee_fusion") else [FIXTURES / "models" / "b"])
    config = config_from_dict("merge", {"method": method, **parameters})
    base = FIXTURES / "models" / "base" if with_base else None
    with pytest.raises(
        WeightkitError, match=f"model.layers.1.mlp.up_proj.weight of {broken} contains 1 NaN/Inf"
    ):
        merge(base, models, config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
