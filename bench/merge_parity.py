"""Merge parity sweep: mergekit's own example recipes, run by weightkit and by mergekit on the same inputs.

    .venv/bin/python bench/merge_parity.py              # writes bench/results/merge_parity.json (~2 min)
    .venv/bin/python bench/merge_parity.py --no-write   # print only

The recipes are mergekit's ``examples/*.yml`` (copied unchanged into ``bench/mergekit_examples/``). Each
model name in them stands for a tiny local checkpoint built here (:func:`build_models`): the Llama-2 names
for Llama-architecture models with 40 layers (the 13B models' layer count, which the slice recipes'
``layer_range`` values need), the Mistral names for Mistral-architecture ones; hidden size 32, float16
safetensors, a shared base plus a seeded fine-tune-like delta per name. Only the file names change in
the recipes.

Each recipe runs twice: as written (``dtype`` as in the recipe: mergekit computes in it, weightkit computes
in float32 and writes it), and with ``dtype: float32`` and ``out_dtype`` set to the recipe's dtype (both
compute in float32 and round once). The outputs are compared tensor by tensor in float32 (names, shapes,
largest absolute difference) along with the layer count in ``config.json``. A recipe weightkit refuses is
recorded with its message; this is a parity check, not a timing (mergekit: ``bench/merge.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, weightkit_source_state, write_result  # noqa: E402
from merge import (  # noqa: E402
    MERGEKIT_PYTHON,
    WEIGHTKIT_CLI,
    compare_outputs,
    ensure_mergekit_env,
    mergekit_versions,
    weightkit_versions,
)

EXAMPLES = BENCH_DIR / "mergekit_examples"
LAYERS = 40
# Every model name the examples use: (architecture, seed of its delta; 0 = the base itself).
MODELS = {
    "TheBloke/Llama-2-13B-fp16": ("llama", 0),
    "psmathur/orca_mini_v3_13b": ("llama", 1),
    "garage-bAInd/Platypus2-13B": ("llama", 2),
    "WizardLM/WizardLM-13B-V1.2": ("llama", 3),
    "WizardLM/WizardMath-13B-V1.0": ("llama", 4),
    "model_a": ("llama", 5),
    "model_b": ("llama", 6),
    "mistralai/Mistral-7B-v0.1": ("mistral", 0),
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral", 1),
    "BioMistral/BioMistral-7B": ("mistral", 2),
}


def _config(architecture: str):
    from transformers import LlamaConfig, MistralConfig

    shape = {
        "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2,
    }  # fmt: skip
    return LlamaConfig(**shape) if architecture == "llama" else MistralConfig(**shape)


def build_models(root: Path) -> dict[str, Path]:
    """One float16 checkpoint per model name: its architecture's base, plus (seed > 0) a delta made of a
    component shared by all fine-tunes and one of its own, so task vectors agree in sign on some entries
    and disagree on others, as real fine-tunes do."""
    import torch
    from transformers import AutoModelForCausalLM

    paths = {}
    for name, (architecture, seed) in MODELS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(architecture))
        shared, own = torch.Generator().manual_seed(100), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if seed:
                    scale = 0.01 * param.abs().mean()
                    param += scale * torch.randn(param.shape, generator=shared)
                    param += scale * torch.randn(param.shape, generator=own)
        path = root / re.sub(r"\W", "_", name)
        model.to(torch.float16).save_pretrained(path)
        paths[name] = path
    return paths


def recipe_variants(text: str, paths: dict[str, Path]) -> dict[str, str]:
    """The recipe with local paths for model names: as written, and computing in float32."""
    for name, path in paths.items():
        text = re.sub(rf"(model:\s*){re.escape(name)}\s*$", rf"\g<1>{path}", text, flags=re.M)
    dtype = re.search(r"^dtype:\s*(\w+)", text, flags=re.M)
    variants = {"as_written": text}
    if dtype:
        variants["float32_compute"] = re.sub(
            r"^dtype:\s*\w+", f"dtype: float32\nout_dtype: {dtype[1]}", text, flags=re.M
        )
    return variants


def _run(cmd: list[str]) -> tuple[bool, str]:
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return done.returncode == 0, "\n".join(lines[-3:])


def _layers(model_dir: Path) -> int | None:
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("num_hidden_layers")


def run_recipe(name: str, text: str, work: Path) -> dict:
    recipe = work / f"{name}.yml"
    recipe.write_text(text)
    ours, theirs = work / f"{name}-weightkit", work / f"{name}-mergekit"
    ok_ours, said_ours = _run([str(WEIGHTKIT_CLI), "merge", str(recipe), "-o", str(ours)])
    ok_theirs, said_theirs = _run(_mergekit(recipe, theirs))
    row = {"weightkit": "ok" if ok_ours else said_ours}
    row["mergekit"] = "ok" if ok_theirs else f"error: {said_theirs}"
    if ok_ours and ok_theirs:
        row.update(compare_outputs(ours, theirs))
        row["layers"] = {"weightkit": _layers(ours), "mergekit": _layers(theirs)}
        if re.search(r"^merge_method:\s*(ties|dare_ties|breadcrumbs_ties|della)\b", text, flags=re.M):
            # TIES-family top-k on float16 values: many magnitudes tie at the cut, and mergekit's unstable
            # argsort keeps an arbitrary subset of them. With a stable sort (weightkit's rule) the two agree.
            stable = work / f"{name}-mergekit-stable"
            if _run(_mergekit(recipe, stable, "--stable-topk"))[0]:
                stable_diff = compare_outputs(ours, stable).get("max_abs_diff")
                row["max_abs_diff_vs_mergekit_stable_topk"] = stable_diff
    return row


def _mergekit(recipe: Path, out: Path, *flags: str) -> list[str]:
    return [
        str(MERGEKIT_PYTHON), str(BENCH_DIR / "merge_peer.py"), *flags, str(recipe), str(out),
        "--no-copy-tokenizer", "--random-seed", "0", "--quiet",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the results instead of writing them")
    args = parser.parse_args(argv)
    ensure_mergekit_env()
    results = {}
    with tempfile.TemporaryDirectory(prefix="weightkit-merge-parity-") as tmp:
        work = Path(tmp)
        paths = build_models(work / "models")
        for example in sorted(EXAMPLES.glob("*.yml")):
            for variant, text in recipe_variants(example.read_text(), paths).items():
                row = run_recipe(f"{example.stem}-{variant}", text, work)
                results.setdefault(example.stem, {})[variant] = row
                keys = ("weightkit", "mergekit", "max_abs_diff", "max_abs_diff_vs_mergekit_stable_topk")
                summary = {k: row.get(k) for k in keys}
                print(example.stem, variant, summary, flush=True)
    data = {
        "job": "mergekit's example recipes on tiny local checkpoints (40 layers, hidden 32, float16)",
        "weightkit_source": weightkit_source_state(),
        "versions": {"weightkit": weightkit_versions(), "mergekit": mergekit_versions()},
        "recipes": results,
    }
    if args.no_write:
        print(json.dumps(data, indent=2))
    else:
        print("wrote", write_result("merge_parity", data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
