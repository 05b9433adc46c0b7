"""Issue 18, item 5 (first part): the same command with the same seed writes bit-identical files, with one
CPU thread and with two. Random methods are included: random pruning, and DARE / DELLA merges."""

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from weightkit.cli import main
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """A tiny Llama, two fine-tunes of it (its weights plus seeded noise), and a calibration text file."""
    root = tmp_path_factory.mktemp("repro")
    base_model = tiny_llama()
    base = save_tiny(base_model, root / "base", tiny_tokenizer())
    tunes = []
    for seed in (1, 2):
        tuned = tiny_llama()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        tunes.append(save_tiny(tuned, root / f"tune{seed}", tiny_tokenizer()))
    calib = root / "calib.txt"
    calib.write_text(
        "\n\n".join(f"passage {i}: the quick brown fox jumps over the lazy dog " * 4 for i in range(16))
    )
    return base, tunes, calib


def _merge_recipe(tmp: Path, method: str, base: Path, tunes: list[Path]) -> Path:
    recipe = tmp / f"{method}.yaml"
    parameters = {"density": 0.5, "weight": 0.5} | ({"epsilon": 0.1} if method == "della" else {})
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": str(base),
                "models": [{"model": str(t), "parameters": parameters} for t in tunes],
            }
        )
    )
    return recipe


def _commands(tmp: Path, base: Path, tunes: list[Path], calib: Path) -> dict[str, list[str]]:
    compress = ["compress", str(base), "--force"]
    calibrated = ["--calib", str(calib), "--calib-samples", "8", "--seq-len", "32"]
    return {
        "rtn": [*compress, "--method", "rtn", "--group-size", "16"],
        "gptq": [*compress, "--method", "gptq", "--group-size", "16", *calibrated],
        "sparsegpt 2:4": [*compress, "--method", "sparsegpt", "--sparsity", "2:4", *calibrated],
        "random 50%": [*compress, "--method", "random", "--sparsity", "0.5", "--seed", "3"],
        "svd": [*compress, "--method", "svd", "--ratio", "0.5"],
        "dare": ["merge", str(_merge_recipe(tmp, "dare_ties", base, tunes)), "--random-seed", "7", "--force"],
        "della": ["merge", str(_merge_recipe(tmp, "della", base, tunes)), "--random-seed", "7", "--force"],
    }


def _hashes(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()
    }


@pytest.mark.parametrize("name", ["rtn", "gptq", "sparsegpt 2:4", "random 50%", "svd", "dare", "della"])
def test_the_same_command_gives_bit_identical_files_with_one_and_two_threads(models, tmp_path, capsys, name):
    base, tunes, calib = models
    out = tmp_path / "out"
    argv = [*_commands(tmp_path, base, tunes, calib)[name], "-o", str(out), "--json"]
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            assert main(argv) == 0, capsys.readouterr().err
            capsys.readouterr()
            runs.append(_hashes(out))
    finally:
        torch.set_num_threads(threads)
    assert any(name.endswith(".safetensors") for name in runs[0])
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize(
    ("name", "flag"), [("random 50%", "--seed"), ("dare", "--random-seed"), ("della", "--random-seed")]
)
def test_another_seed_gives_another_output(models, tmp_path, capsys, name, flag):
    """The equality above is the seed's doing, not the absence of randomness: another seed changes the
    weights."""
    base, tunes, calib = models
    argv = _commands(tmp_path, base, tunes, calib)[name]
    at = argv.index(flag)
    weights = []
    for seed in ("3", "4"):
        out = tmp_path / f"out{seed}"
        assert main([*argv[: at + 1], seed, *argv[at + 2 :], "-o", str(out), "--json"]) == 0
        capsys.readouterr()
        weights.append({k: v for k, v in _hashes(out).items() if k.endswith(".safetensors")})
    assert weights[0] != weights[1]
