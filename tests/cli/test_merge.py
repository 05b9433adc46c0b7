"""``weightkit merge``, ``extract-lora``, ``align`` and ``fisher`` (weightkit.cli.merge) as commands."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from weightkit.cli import main
from weightkit.testing import save_tiny, tiny_llama


@pytest.fixture
def linear_recipe(tmp_path):
    """A linear recipe over two tiny Llamas."""
    for seed in (1, 2):
        save_tiny(tiny_llama(seed=seed), tmp_path / f"m{seed}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("models:\n  - model: m1\n  - model: m2\nmerge_method: linear\n")
    return recipe


_WAIT_POLICY = (
    "import os, sys; from weightkit.cli import main; code = main(sys.argv[1:]); import torch; "
    "print(code, os.environ.get('OMP_WAIT_POLICY'))"
)


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_merge_lets_openmp_threads_sleep_unless_told_otherwise(tmp_path, linear_recipe, given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    cmd = [
        sys.executable,
        "-c",
        _WAIT_POLICY,
        "merge",
        str(linear_recipe),
        "-o",
        str(tmp_path / "o"),
        "--dry-run",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["0", expected]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(("method", "where"), [("ties", "meta"), ("linear", "cpu")])
def test_merge_dry_run_says_where_it_would_merge(tmp_path, capsys, linear_recipe, method, where):
    recipe = linear_recipe
    if method == "ties":
        save_tiny(tiny_llama(seed=0), tmp_path / "base")
        recipe.write_text(recipe.read_text().replace("linear", "ties") + "base_model: base\n")
    code, stdout, _ = run(
        capsys, "merge", recipe, "-o", tmp_path / "o", "--dry-run", "--json", "--device", "meta"
    )
    assert code == 0 and json.loads(stdout)["device"] == where


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a missing GPU")
@pytest.mark.parametrize("command", ["merge", "align", "fisher"])
def test_a_missing_device_is_refused_by_name(tmp_path, capsys, linear_recipe, llama_dir, command):
    args = {
        "merge": ["merge", linear_recipe, "-o", tmp_path / "o"],
        "align": ["align", llama_dir, llama_dir, "-o", tmp_path / "o"],
        "fisher": ["fisher", llama_dir, "-o", tmp_path / "f.safetensors"],
    }[command]
    code, _, err = run(capsys, *args, "--device", "cuda")
    assert code == 1 and "--device cuda: this machine has no CUDA GPU" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "f.safetensors").exists()


FRANKENMERGE = """\
slices:
  - sources:
      - model: a
        layer_range: [0, 3]
  - sources:
      - model: b
        layer_range: [1, 4]
        parameters: {scale: 0.5}
merge_method: passthrough
"""


def test_merge_stacks_the_slices_of_a_yaml_recipe(tmp_path, capsys):
    for name, seed in (("a", 1), ("b", 2)):
        save_tiny(tiny_llama(seed=seed, num_hidden_layers=4, tie_word_embeddings=False), tmp_path / name)
    recipe = tmp_path / "frankenmerge.yaml"
    recipe.write_text(FRANKENMERGE)
    code, stdout, _ = run(capsys, "merge", recipe, "-o", tmp_path / "plan", "--dry-run", "--json")
    plan = json.loads(stdout)
    assert code == 0 and plan["tensors"] == 6 * 9 + 3 and not (tmp_path / "plan").exists()
    assert [(row["slice"], row["layers"], row["parameters"]) for row in plan["models"]] == [
        ("0", "0-2", "method defaults"),
        ("1", "1-3", "scale=0.5"),
    ]
    code, stdout, _ = run(capsys, "merge", recipe, "-o", tmp_path / "out", "--json")
    assert code == 0 and json.loads(stdout)["layers"] == 6
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    out = load_file(tmp_path / "out" / "model.safetensors")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    name = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(out[name.format(2)], a[name.format(2)])
    assert torch.equal(out[name.format(3)], b[name.format(1)] * 0.5)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"] * 0.5)
