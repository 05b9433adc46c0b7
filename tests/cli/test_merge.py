"""``weightkit merge``, ``extract-lora``, ``align`` and ``fisher`` (weightkit.cli.merge) as commands."""

import os
import subprocess
import sys

import pytest

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
