"""Merge benchmark: weightkit vs mergekit on the same recipes and checkpoints, in one run.

    .venv/bin/python bench/merge.py                 # writes bench/results/merge.json (~15 min on 2 cores)
    .venv/bin/python bench/merge.py --build-only    # only make (or check) the cached checkpoints
    .venv/bin/python bench/merge.py --methods ties --reps 1 --no-write --keep /tmp/m   # a quick look

Job: task arithmetic, TIES and DARE-TIES of three fine-tunes onto their base; all four are
~134M-parameter Llama-architecture checkpoints (hidden 768, 12 layers, intermediate 2048, vocabulary
32000, untied ``lm_head``) in bfloat16 safetensors. They are made here, deterministically, not
trained: Llama's init for the base, and base + a fine-tune-like delta for each fine-tune (see
:func:`build_checkpoints`). Merging speed and memory do not depend on what the weights mean, and the
tensor names, shapes, dtypes and files are those of a ``save_pretrained`` Llama. One fine-tune is
saved in two shards, so both tools read a sharded input too.

Runners, each its own command-line program in a fresh process:

- ``weightkit``: ``.venv/bin/weightkit merge RECIPE -o OUT --json`` on the recipe as written
  (``dtype: bfloat16``).
- ``mergekit_bf16_compute``: ``mergekit-yaml`` (its own venv, ``bash bench/peer_env.sh mergekit``) with
  :data:`MERGEKIT_FLAGS` on the *same file*. mergekit reads ``dtype`` as the dtype to compute in.
- ``mergekit_f32_compute``: the same recipe with ``dtype: float32, out_dtype: bfloat16``, which is
  what weightkit does with ``dtype: bfloat16`` (float32 arithmetic, bfloat16 output) and is mergekit's
  faster configuration on a CPU without bfloat16 arithmetic.
- ``mergekit_f32_stable_topk`` (TIES only, once, not in the ratios): ``bench/merge_peer.py
  --stable-topk``, mergekit with a stable sort in its top-k, i.e. weightkit's tie-break.
- ``weightkit_seed1`` (DARE-TIES only, once, not in the ratios): weightkit with ``seed: 1``, a second
  draw of the random masks, to show how far apart two draws of the *same* tool are.

Each command is started by a tiny wrapper (``python -I``, ~10 MB) that times it and takes its peak RSS
from ``getrusage(RUSAGE_CHILDREN)`` (``ru_maxrss``: resident anonymous *and* file-backed pages, so
mmap-ed safetensors pages a tool has touched count). The wrapper also samples ``/proc/PID/status``
every 20 ms for a rough split of the peak into anonymous and file-backed pages. Wall time is the
whole command: interpreter start, imports, planning, reading, merging and writing. Repetitions are
interleaved (rep 1: every method x runner, then rep 2 ...), all on a warm page cache (the inputs are
read once before the first run and stay cached: 1.1 GB on a 24 GB machine; dropping the cache needs
root); medians are reported. time_ratio and rss_ratio divide weightkit's by the faster / leaner of
mergekit's two configurations. Each repetition also times each tool's start alone (weightkit: ``merge
--dry-run``, i.e. imports, headers and plan; mergekit: ``mergekit-yaml --help``, its imports), so the
merge work itself can be compared too (``seconds_minus_startup``, ``time_ratio_minus_startup``).

Quality: task arithmetic and TIES outputs are compared entry by entry in float32 with every mergekit
output (max / mean absolute difference, fraction of entries that differ); ``max_abs_diff`` is the one
where both tools define the method the same way (task arithmetic: float32 compute; TIES: float32
compute and the same tie-break). DARE draws its drop masks from different random streams in the two
tools, so its outputs are not compared entry by entry; the statistics of each output's merged task
vector (``output - base``) are reported instead: fraction of entries changed, L2 norm, and the cosine
and L2 ratio between every two outputs, including two draws of weightkit's (seeds 0 and 1).

Throughput: (bytes of every input safetensors file + bytes of the output) / wall time, against the
same bytes moved by a plain read + write in a fresh process (every input file read into memory in
16 MiB chunks, the base's bytes written once; with and without fsync, since weightkit fsyncs its
output and mergekit does not): the machine's limit for a merge that reads each input once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import BENCH_DIR, CACHE_ROOT, write_result  # noqa: E402

CHECKPOINT_DIR = CACHE_ROOT / "bench-merge"
MERGEKIT_VENV = Path(os.environ.get("WEIGHTKIT_MERGEKIT_VENV", BENCH_DIR / ".venv-mergekit"))
PEER_ENV_SCRIPT = BENCH_DIR / "peer_env.sh"
WEIGHTKIT_CLI = Path(sys.executable).parent / "weightkit"

# mergekit's fastest CPU configuration, measured here (README "## merge"): default threads (-j = cores;
# -j 1 was slower on TIES when the machine was quiet), no --async-write (no faster, more memory).
# --lazy-unpickle only concerns pickled inputs; --cuda, --read-to-gpu, --low-cpu-memory and --multi-gpu
# need a GPU. There is no tokenizer to copy, and --random-seed makes DARE reproducible.
MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--random-seed", "0", "--quiet"]

METHODS = ("task_arithmetic", "ties", "dare_ties")
DETERMINISTIC = ("task_arithmetic", "ties")

# ------------------------------------------------------------------------------------ checkpoints

# Everything that determines the checkpoints; a cached set is reused only when build.json matches.
BUILD_RECIPE = {
    "version": 2,
    "seed": 1234,
    "config": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
    "dtype": "bfloat16",
    "init_std": 0.02,  # Llama's initializer_range
    "norm_std": 0.05,  # base RMSNorm weights: 1 + N(0, norm_std^2), as trained ones are not all 1
    # fine-tune i's delta on a matrix, in units of init_std:
    "shared_rank": 4,  # a low-rank direction common to all fine-tunes (they agree on its sign) ...
    "shared_rms": 0.04,
    "shared_coef": [1.0, 0.7, 0.5],  # ... times this per fine-tune
    "dense_rms": 0.05,  # plus a dense Gaussian of its own
    "outlier_fraction": 0.002,  # plus a few large entries (positions and signs of its own)
    "outlier_rms": 0.5,
    "norm_delta_std": 0.01,  # RMSNorm weights: a small dense delta
    "embedding_rows": 0.25,  # embeddings / lm_head: only this fraction of rows (tokens) moves ...
    "embedding_rms": 0.05,
    "frozen_embeddings": [False, False, True],  # ... and fine-tune 3 kept its input embeddings frozen
    "sharded": [False, True, False],  # fine-tune 2 is saved in two shards
}
FINE_TUNES = len(BUILD_RECIPE["shared_coef"])


def _tensor_seed(model: int, index: int) -> int:
    return BUILD_RECIPE["seed"] * 1_000_003 + model * 10_007 + index


def _param_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``LlamaForCausalLM``'s state dict, from a model on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**BUILD_RECIPE["config"]))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _base_tensor(name: str, shape: tuple[int, ...], index: int):
    import torch

    g = torch.Generator().manual_seed(_tensor_seed(0, index))
    if len(shape) == 1:  # RMSNorm
        return 1 + BUILD_RECIPE["norm_std"] * torch.randn(shape, generator=g)
    return BUILD_RECIPE["init_std"] * torch.randn(shape, generator=g)


def _delta(name: str, shape: tuple[int, ...], index: int, model: int):
    """Fine-tune ``model``'s (1-based) delta for one tensor, float32."""
    import torch

    r = BUILD_RECIPE
    s = r["init_std"]
    g = torch.Generator().manual_seed(_tensor_seed(model, index))
    if len(shape) == 1:
        return r["norm_delta_std"] * torch.randn(shape, generator=g)
    if "embed_tokens" in name or name == "lm_head.weight":
        if "embed_tokens" in name and r["frozen_embeddings"][model - 1]:
            return torch.zeros(shape)
        rows = torch.rand(shape[0], generator=g) < r["embedding_rows"]
        delta = r["embedding_rms"] * s * torch.randn(shape, generator=g)
        return delta.mul_(rows.unsqueeze(1))
    delta = r["dense_rms"] * s * torch.randn(shape, generator=g)
    # The shared direction: the same generator seed for every fine-tune (model 0 = "the task").
    gs = torch.Generator().manual_seed(_tensor_seed(0, index) + 7)
    rank = r["shared_rank"]
    u = torch.randn(shape[0], rank, generator=gs)
    v = torch.randn(rank, shape[1], generator=gs)
    scale = r["shared_coef"][model - 1] * r["shared_rms"] * s / rank**0.5
    # One outer product at a time (elementwise, so the rounding does not depend on the thread count the
    # way a matmul's blocking does).
    for k in range(rank):
        delta.addcmul_(u[:, k : k + 1], v[k : k + 1, :], value=scale)
    flat = delta.view(-1)
    # Distinct positions: an indexed += with a repeated index keeps whichever write lands last.
    where = torch.randint(flat.numel(), (int(r["outlier_fraction"] * flat.numel()),), generator=g).unique()
    flat[where] += r["outlier_rms"] * s * torch.randn(len(where), generator=g)
    return delta


def _save(tensors: dict, out: Path, sharded: bool) -> None:
    from safetensors.torch import save_file

    if not sharded:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    # Split where half the bytes are, as save_pretrained(max_shard_size=...) would.
    shards, acc, current = [[]], 0, 0
    for name in names:
        if acc >= total / 2 and current == 0:
            shards.append([])
            current = 1
        shards[current].append(name)
        acc += tensors[name].numel() * tensors[name].element_size()
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def _cached(root: Path) -> dict | None:
    info_path = root / "build.json"
    if not info_path.exists():
        return None
    info = json.loads(info_path.read_text())
    if info.get("recipe") != BUILD_RECIPE:
        return None
    for name, files in info["files"].items():
        for file, size in files.items():
            path = root / name / file
            if not path.exists() or path.stat().st_size != size:
                return None
    return info


def build_checkpoints(root: Path = CHECKPOINT_DIR, *, force: bool = False, log=print) -> dict[str, Path]:
    """Make (once) and return ``{"base": dir, "ft1": dir, "ft2": dir, "ft3": dir}`` under ``root``.

    Base: every matrix N(0, 0.02^2) (Llama's init), RMSNorm weights 1 + N(0, 0.05^2). Fine-tune i =
    base + delta_i rounded to bfloat16, where delta_i on a matrix is a low-rank direction shared by
    all fine-tunes (scaled 1.0 / 0.7 / 0.5, so their signs mostly agree there), a dense Gaussian of its
    own and 0.2% large outliers of its own (where signs conflict, which TIES resolves); on embeddings
    and lm_head only a quarter of the rows move (fine-tune 3's input embeddings are frozen: delta 0);
    on norms a small dense delta. Every tensor has its own seeded generator, so the result does not
    depend on order or threads; ``build.json`` records the recipe, file sizes and SHA-256s.
    """
    import torch
    from transformers import LlamaConfig

    if not force and (info := _cached(root)) is not None:
        log(f"checkpoints: reusing {root} ({info['parameters'] / 1e6:.1f}M parameters each)")
        return {name: root / name for name in info["files"]}
    start = time.perf_counter()
    shapes = _param_shapes()
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    dtype = getattr(torch, BUILD_RECIPE["dtype"])
    config = LlamaConfig(**BUILD_RECIPE["config"], dtype=BUILD_RECIPE["dtype"])
    config.architectures = ["LlamaForCausalLM"]
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    names = ["base"] + [f"ft{i}" for i in range(1, FINE_TUNES + 1)]
    files: dict[str, dict[str, int]] = {}
    sha: dict[str, str] = {}
    for model, name in enumerate(names):
        out = tmp / name
        out.mkdir(parents=True)
        config.save_pretrained(out)
        tensors = {}
        for index, (tensor_name, shape) in enumerate(shapes.items()):
            w = _base_tensor(tensor_name, shape, index)
            if model:
                w += _delta(tensor_name, shape, index, model)
            tensors[tensor_name] = w.to(dtype)
        _save(tensors, out, sharded=bool(model) and BUILD_RECIPE["sharded"][model - 1])
        del tensors
        files[name] = {}
        for path in _weight_files(out):
            files[name][path.name] = path.stat().st_size
            sha[f"{name}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
        log(f"checkpoints: {name} done ({time.perf_counter() - start:.0f} s)")
    info = {
        "recipe": BUILD_RECIPE,
        "parameters": params,
        "files": files,
        "sha256": sha,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    log(f"checkpoints: built {root} in {info['seconds']} s ({params / 1e6:.1f}M parameters each)")
    return {name: root / name for name in names}


# ---------------------------------------------------------------------------------------- recipes

# Per fine-tune (weight, density); the same for both tools. Normalize is written out, so neither
# tool's default decides it.
RECIPES = {
    "task_arithmetic": {"weights": [0.5, 0.3, 0.2], "densities": None, "normalize": False},
    "ties": {"weights": [1.0, 0.7, 0.5], "densities": [0.5, 0.4, 0.6], "normalize": True},
    "dare_ties": {"weights": [0.5, 0.4, 0.3], "densities": [0.5, 0.4, 0.6], "normalize": False},
}


def recipe_yaml(
    method: str, models: dict[str, Path], *, compute_dtype: str = "bfloat16", seed: int | None = None
) -> str:
    """The mergekit YAML both tools read. ``compute_dtype="float32"`` gives the variant for mergekit
    that computes in float32 and writes bfloat16 (``dtype`` / ``out_dtype``), as weightkit does;
    ``seed`` adds weightkit's ``seed`` parameter (weightkit only: mergekit takes ``--random-seed``)."""
    r = RECIPES[method]
    lines = ["models:"]
    for i, weight in enumerate(r["weights"]):
        params = f"weight: {weight}"
        if r["densities"]:
            params += f", density: {r['densities'][i]}"
        lines += [f"  - model: {models[f'ft{i + 1}']}", f"    parameters: {{{params}}}"]
    lines += [
        f"base_model: {models['base']}",
        f"merge_method: {method}",
        "parameters:",
        f"  normalize: {str(r['normalize']).lower()}",
        *([f"  seed: {seed}"] if seed is not None else []),
        f"dtype: {compute_dtype}",
    ]
    if compute_dtype != "bfloat16":
        lines.append("out_dtype: bfloat16")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ measurement

# Runs one command and reports its wall time and peak RSS. It is started with `python -I` and
# imports nothing big, so the ~10 MB it occupies (which Linux folds into the child's ru_maxrss
# across vfork+exec) is negligible.
_WRAPPER = r"""
import json, os, resource, subprocess, sys, time
out_path, err_path, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
peak = {"anon": 0, "file": 0}
with open(out_path, "w") as out, open(err_path, "w") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err)
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssFile:")):
                        key = "anon" if line.startswith("RssAnon") else "file"
                        peak[key] = max(peak[key], int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "returncode": os.waitstatus_to_exitcode(status),
    "seconds": seconds,
    "peak_rss_mib": usage.ru_maxrss / 1024,
    "sampled_peak_rss_anon_mib": peak["anon"] / 1024,
    "sampled_peak_rss_file_mib": peak["file"] / 1024,
    "cpu_seconds": usage.ru_utime + usage.ru_stime,
}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # No hub lookups (there is no network): both tools see local directories only.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_measured(cmd: list[str], log_stem: Path) -> dict:
    """Run ``cmd`` in a fresh wrapper process; return its seconds, peak RSS and stdout."""
    out, err = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _WRAPPER, str(out), str(err), *map(str, cmd)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        check=True,
    )
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    if m["returncode"] != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd[:3]))} exited {m['returncode']}:\n{err.read_text()[-4000:]}"
        )
    m["stdout"] = out.read_text()
    return m


def _json_output(text: str) -> dict | None:
    """The JSON a command printed: all of stdout (weightkit indents it), else its last line."""
    for candidate in (text, (text.strip().splitlines() or [""])[-1]):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
    return None


# Each runner and the recipe variant it reads: "bf16" is the recipe as written (dtype: bfloat16), "f32"
# the same with dtype: float32, out_dtype: bfloat16, "bf16-seed1" the recipe with weightkit's seed: 1.
RUNNERS = {
    "weightkit": "bf16",
    "mergekit_f32_compute": "f32",
    "mergekit_bf16_compute": "bf16",
    # Once each, for the comparisons only (never in the ratios):
    "mergekit_f32_stable_topk": "f32",  # TIES: mergekit with weightkit's tie-break
    "weightkit_seed1": "bf16-seed1",  # DARE-TIES: another draw of weightkit's random masks
}
ONCE = {"mergekit_f32_stable_topk": "ties", "weightkit_seed1": "dare_ties"}
PEER_CONFIGS = ("mergekit_f32_compute", "mergekit_bf16_compute")


def runner_cmd(runner: str, recipe: Path, out: Path) -> list[str]:
    if runner.startswith("weightkit"):
        return [str(WEIGHTKIT_CLI), "merge", str(recipe), "-o", str(out), "--json"]
    if runner == "mergekit_f32_stable_topk":
        python = MERGEKIT_VENV / "bin" / "python"
        return [
            str(python),
            str(BENCH_DIR / "merge_peer.py"),
            "--stable-topk",
            str(recipe),
            str(out),
            *MERGEKIT_FLAGS,
        ]
    return [str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(recipe), str(out), *MERGEKIT_FLAGS]


def startup_cmd(tool: str, recipe: Path, out: Path) -> list[str]:
    """What each tool costs before it touches a tensor: weightkit's dry run (imports, headers, plan,
    nothing written); mergekit has no dry run, so ``mergekit-yaml --help`` (its imports alone)."""
    if tool == "weightkit":
        return [str(WEIGHTKIT_CLI), "merge", str(recipe), "-o", str(out), "--dry-run"]
    return [str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), "--help"]


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in _weight_files(model_dir))


def warm_up(models: dict[str, Path]) -> None:
    """Read every input file once so that every run starts from a warm page cache."""
    buf = bytearray(16 << 20)
    for model_dir in models.values():
        for path in _weight_files(model_dir):
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


# The physical limit: every input file read into memory once (16 MiB chunks), the base's bytes (as many
# as a merged output) written once. argv: fsync(0/1) out_file base_file input_files...
_COPY = r"""
import json, os, sys, time
fsync, out_file, base_file, inputs = sys.argv[1] == "1", sys.argv[2], sys.argv[3], sys.argv[4:]
buf = bytearray(16 << 20)
view = memoryview(buf)
t0 = time.perf_counter()
read = written = 0
with open(out_file, "wb", buffering=0) as out:
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                read += n
                if path == base_file:
                    written += out.write(view[:n])
    if fsync:
        os.fsync(out.fileno())
print(json.dumps({"inner_seconds": time.perf_counter() - t0, "read": read, "written": written}))
"""


def copy_baseline(models: dict[str, Path], work: Path, *, fsync: bool) -> dict:
    """Plain read + write of the merge's bytes in a fresh process; seconds with and without its start."""
    (base_file,) = _weight_files(models["base"])
    inputs = [p for d in models.values() for p in _weight_files(d)]
    out = work / "copy.bin"
    cmd = [
        sys.executable,
        "-I",
        "-c",
        _COPY,
        "1" if fsync else "0",
        str(out),
        str(base_file),
        *map(str, inputs),
    ]
    m = run_measured(cmd, work / "copy")
    out.unlink()
    inner = json.loads(m["stdout"])
    moved = inner["read"] + inner["written"]
    return {
        "seconds": m["seconds"],
        "inner_seconds": inner["inner_seconds"],
        "bytes": moved,
        "gb_per_s": moved / m["seconds"] / 1e9,
        "gb_per_s_inner": moved / inner["inner_seconds"] / 1e9,
    }


# ------------------------------------------------------------------------------------- comparison


class _Reader:
    """The tensors of a model directory (one file or shards), through safetensors."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.handles = [safe_open(str(p), framework="pt") for p in _weight_files(model_dir)]
        self.where = {name: h for h in self.handles for name in h.keys()}  # noqa: SIM118 - not a dict

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str):
        return self.where[name].get_tensor(name).float()


def compare_outputs(a: Path, b: Path) -> dict:
    """Entry-by-entry difference of two merged models in float32, tensor by tensor."""
    import torch

    ra, rb = _Reader(a), _Reader(b)
    if set(ra.names()) != set(rb.names()):
        return {"error": f"tensor names differ: {sorted(set(ra.names()) ^ set(rb.names()))[:5]}"}
    max_diff, max_name, total, count = 0.0, None, 0.0, 0
    differing: dict[str, int] = {}
    for name in ra.names():
        ta, tb = ra.get(name), rb.get(name)
        if ta.shape != tb.shape:
            return {"error": f"{name}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}"}
        diff = ta.sub_(tb).abs_()
        m = float(diff.max())
        if m > max_diff:
            max_diff, max_name = m, name
        total += float(diff.sum(dtype=torch.float64))
        if n := int(torch.count_nonzero(diff)):
            differing[name] = n
        count += diff.numel()
    most = sorted(differing, key=differing.get, reverse=True)[:5]
    return {
        "max_abs_diff": max_diff,
        "max_abs_diff_tensor": max_name,
        "mean_abs_diff": total / count,
        "differing_fraction": sum(differing.values()) / count,
        "tensors_with_differences": len(differing),
        "most_differing_tensors": {name: differing[name] for name in most},
    }


def explain_ties_differences(a: Path, b: Path, models: dict[str, Path], tensors: list[str]) -> dict:
    """Where two TIES outputs made with the same tie-break still differ, was the sign vote a tie?

    Recomputes, for the entries of ``tensors`` where ``a`` and ``b`` differ, the trimmed deltas (the
    ``int(density * n)`` largest ``|delta|``, lower index first among equals: the rule both runs used)
    and the weighted sum that elects the sign, exactly (float64). A sum that is 0 relative to the size
    of its terms (below 1e-6, far below float32's 6e-8 rounding showing through) means the deltas
    cancelled and float32 rounding, which differs with the order of operations, picked the sign.
    """
    import torch

    r = RECIPES["ties"]
    base = _Reader(models["base"])
    fine_tunes = [_Reader(models[f"ft{i}"]) for i in range(1, FINE_TUNES + 1)]
    ra, rb = _Reader(a), _Reader(b)
    entries = cancelled = 0
    worst = 0.0
    for name in tensors:
        where = torch.nonzero(ra.get(name).ne(rb.get(name)).reshape(-1)).squeeze(1)
        b0 = base.get(name).reshape(-1)
        vote = torch.zeros(len(where), dtype=torch.float64)
        size = torch.zeros(len(where), dtype=torch.float64)
        for ft, weight, density in zip(fine_tunes, r["weights"], r["densities"], strict=True):
            delta = ft.get(name).reshape(-1).sub_(b0)
            keep = torch.argsort(delta.abs(), descending=True, stable=True)[: int(density * delta.numel())]
            kept = torch.zeros(delta.numel(), dtype=torch.bool)
            kept[keep] = True
            term = (delta[where] * kept[where]).double() * float(torch.tensor(weight, dtype=torch.float32))
            vote += term
            size += term.abs()
        relative = vote.abs() / size.clamp_min(1e-30)
        entries += len(where)
        cancelled += int((relative < 1e-6).sum())
        worst = max(worst, float(relative.max()) if len(where) else 0.0)
    return {
        "tensors_checked": tensors,
        "differing_entries": entries,
        "sign_vote_zero": cancelled,
        "max_relative_sign_vote": worst,
    }


def task_vector_stats(outputs: dict[str, Path], base: Path) -> dict:
    """For random methods: each output's merged task vector ``output - base`` (fraction of entries
    changed, L2 norm) and the cosine and L2 ratio between every two outputs' task vectors."""
    import itertools

    import torch

    rb = _Reader(base)
    readers = {key: _Reader(path) for key, path in outputs.items()}
    pairs = list(itertools.combinations(outputs, 2))
    sq = dict.fromkeys(outputs, 0.0)
    changed = dict.fromkeys(outputs, 0)
    dot = dict.fromkeys(pairs, 0.0)
    count = 0
    for name in rb.names():
        b = rb.get(name)
        deltas = {key: r.get(name).sub_(b) for key, r in readers.items()}
        for key, d in deltas.items():
            sq[key] += float(d.square().sum(dtype=torch.float64))
            changed[key] += int(torch.count_nonzero(d))
        for x, y in pairs:
            dot[x, y] += float((deltas[x] * deltas[y]).sum(dtype=torch.float64))
        count += b.numel()
    norm = {key: sq[key] ** 0.5 for key in outputs}
    stats: dict = {
        key: {"changed_fraction": changed[key] / count, "task_vector_l2": norm[key]} for key in outputs
    }
    stats["pairs"] = {
        f"{x} / {y}": {"cosine": dot[x, y] / (norm[x] * norm[y]), "l2_ratio": norm[x] / norm[y]}
        for x, y in pairs
    }
    return stats


# ------------------------------------------------------------------------------------------- main


def ensure_mergekit_env() -> Path:
    env = {**os.environ, "PEER_VENV": str(MERGEKIT_VENV)}
    subprocess.run(["bash", str(PEER_ENV_SCRIPT), "mergekit"], check=True, stdout=subprocess.DEVNULL, env=env)
    return MERGEKIT_VENV


def mergekit_versions() -> dict[str, str]:
    """Key versions of the mergekit venv, from the freeze its script writes (full list in that file)."""
    keep = {"mergekit", "torch", "transformers", "safetensors", "accelerate", "pydantic", "numpy"}
    versions = {}
    freeze = MERGEKIT_VENV / "peer-freeze.txt"
    if freeze.exists():
        for line in freeze.read_text().splitlines():
            name, sep, ver = line.partition("==")
            if sep and name.lower() in keep:
                versions[name.lower()] = ver
    return versions


def weightkit_source_state() -> str | None:
    """The commit of weightkit's (editable) source plus a hash of its uncommitted changes under src/."""
    git = ["git", "-C", str(BENCH_DIR.parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        diff = subprocess.run([*git, "diff", "HEAD", "--", "src"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.strip() + (f" + uncommitted {hashlib.sha256(diff).hexdigest()[:12]}" if diff else "")


def weightkit_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("weightkit", "torch", "safetensors", "transformers")}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _summary(runs: list[dict], moved: int) -> dict:
    seconds = _median(runs, "seconds")
    summary = {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(_median(runs, "peak_rss_mib"), 1),
        "sampled_peak_rss_anon_mib": round(_median(runs, "sampled_peak_rss_anon_mib"), 1),
        "sampled_peak_rss_file_mib": round(_median(runs, "sampled_peak_rss_file_mib"), 1),
        "cpu_seconds": round(_median(runs, "cpu_seconds"), 2),
        "gb_per_s": round(moved / seconds / 1e9, 3),
        "runs_seconds": [round(r["seconds"], 2) for r in runs],
        "runs_peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in runs],
        "load_average_1min": [round(r["load_before"], 2) for r in runs],
    }
    reported = [
        r["json"]["seconds"] for r in runs if isinstance(r.get("json"), dict) and "seconds" in r["json"]
    ]
    if isinstance(runs[-1].get("json"), dict):  # what weightkit printed (--json), last run
        summary["printed"] = {
            k: v for k, v in runs[-1]["json"].items() if k not in ("models", "base", "output")
        }
    if reported:  # weightkit's own timing of its read + merge + write (no interpreter start, imports, plan)
        summary["reported_seconds"] = round(statistics.median(reported), 2)
        summary["gb_per_s_reported"] = round(moved / statistics.median(reported) / 1e9, 3)
    return summary


def _row(
    method: str, runs: dict, kept: dict, models: dict[str, Path], moved: int, limit: float, startup: dict
) -> dict:
    placeholders = {"base": Path("BASE"), **{f"ft{i}": Path(f"FT{i}") for i in range(1, FINE_TUNES + 1)}}
    row: dict = {"method": method, "recipe": recipe_yaml(method, placeholders)}
    for runner in RUNNERS:
        if f"{method}/{runner}" in runs and runner not in ONCE:
            row[runner] = summary = _summary(runs[f"{method}/{runner}"], moved)
            summary["fraction_of_read_write_limit"] = round(summary["gb_per_s"] / limit, 3)
            tool = "weightkit" if runner == "weightkit" else "mergekit"
            if tool in startup:
                summary["seconds_minus_startup"] = round(summary["seconds"] - startup[tool]["seconds"], 2)
    peers = [c for c in PEER_CONFIGS if c in row]
    if "weightkit" in row and peers:
        wk = row["weightkit"]
        fastest = min(peers, key=lambda c: row[c]["seconds"])
        leanest = min(peers, key=lambda c: row[c]["peak_rss_mib"])
        row["time_ratio"] = round(wk["seconds"] / row[fastest]["seconds"], 3)
        row["time_ratio_vs"] = fastest
        row["rss_ratio"] = round(wk["peak_rss_mib"] / row[leanest]["peak_rss_mib"], 3)
        row["rss_ratio_vs"] = leanest
        row["ratios_per_config"] = {
            c: {
                "time": round(wk["seconds"] / row[c]["seconds"], 3),
                "rss": round(wk["peak_rss_mib"] / row[c]["peak_rss_mib"], 3),
            }
            for c in peers
        }
        row["meets_targets"] = {"time_le_0.5": row["time_ratio"] <= 0.5, "rss_le_1": row["rss_ratio"] <= 1.0}
        if "seconds_minus_startup" in wk and "seconds_minus_startup" in row[fastest]:
            # The merge work alone: imports (and weightkit's planning) taken off both sides.
            row["time_ratio_minus_startup"] = round(
                wk["seconds_minus_startup"] / row[fastest]["seconds_minus_startup"], 3
            )
        if method in DETERMINISTIC:
            diffs = {}
            for runner in ("mergekit_f32_compute", "mergekit_f32_stable_topk", "mergekit_bf16_compute"):
                if f"{method}/{runner}" in kept:
                    diffs[f"vs_{runner}"] = compare_outputs(
                        kept[f"{method}/weightkit"], kept[f"{method}/{runner}"]
                    )
            # The comparison where both define the method the same way (see README): float32 compute, and
            # for TIES the same tie-break among equal magnitudes.
            same = "vs_mergekit_f32_stable_topk" if method == "ties" else "vs_mergekit_f32_compute"
            if same in diffs:
                row["max_abs_diff"] = diffs[same]["max_abs_diff"]
                row["max_abs_diff_vs"] = same.removeprefix("vs_")
                if method == "ties" and diffs[same]["most_differing_tensors"]:
                    tensors = list(diffs[same]["most_differing_tensors"])
                    if diffs[same]["max_abs_diff_tensor"] not in tensors:
                        tensors.append(diffs[same]["max_abs_diff_tensor"])
                    row["ties_differences_explained"] = explain_ties_differences(
                        kept["ties/weightkit"], kept["ties/mergekit_f32_stable_topk"], models, tensors
                    )
            row["diffs"] = diffs
        else:
            row["max_abs_diff"] = None
            row["max_abs_diff_vs"] = (
                "not comparable entry by entry: random drop masks from different random streams"
            )
            names = ("weightkit", "weightkit_seed1", *peers)
            outputs = {r: kept[f"{method}/{r}"] for r in names if f"{method}/{r}" in kept}
            row["task_vector_stats"] = task_vector_stats(outputs, models["base"])
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    p.add_argument(
        "--runners",
        default="weightkit," + ",".join(PEER_CONFIGS),
        help="comma-separated: weightkit, mergekit_f32_compute, mergekit_bf16_compute",
    )
    p.add_argument(
        "--reps", type=int, default=3, help="runs per runner and method, interleaved (median reported)"
    )
    p.add_argument(
        "--no-extra-runs",
        action="store_true",
        help="skip the comparison-only runs (TIES: mergekit with a stable top-k; DARE: weightkit, seed 1)",
    )
    p.add_argument("--build-only", action="store_true", help="only build (or check) the cached checkpoints")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoints")
    p.add_argument(
        "--keep", type=Path, help="write outputs and logs here and keep them (default: a temp dir)"
    )
    p.add_argument("--no-write", action="store_true", help="print the results instead of writing merge.json")
    args = p.parse_args(argv)
    methods, runners = args.methods.split(","), args.runners.split(",")
    if bad := [m for m in methods if m not in METHODS]:
        p.error(f"unknown method(s) {bad} (choose from {', '.join(METHODS)})")
    if bad := [r for r in runners if r not in ("weightkit", *PEER_CONFIGS)]:
        p.error(f"unknown runner(s) {bad} (choose from weightkit, {', '.join(PEER_CONFIGS)})")

    models = build_checkpoints(force=args.rebuild)
    if args.build_only:
        return
    if any(r != "weightkit" for r in runners):
        ensure_mergekit_env()
    input_bytes = sum(weight_bytes(d) for d in models.values())
    output_bytes = weight_bytes(models["base"])  # the same tensors in the same dtype
    moved = input_bytes + output_bytes

    # Before the runs: the weightkit source is an editable install that may change while this runs.
    versions = {"weightkit_venv": weightkit_versions(), "mergekit_venv": mergekit_versions()}
    source_before = weightkit_source_state()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        recipes = {}
        for method in methods:
            for variant, dtype, seed in (
                ("bf16", "bfloat16", None),
                ("f32", "float32", None),
                ("bf16-seed1", "bfloat16", 1),
            ):
                recipes[method, variant] = work / f"{method}-{variant}.yml"
                recipes[method, variant].write_text(
                    recipe_yaml(method, models, compute_dtype=dtype, seed=seed)
                )

        jobs = [(m, r) for m in methods for r in runners]
        if not args.no_extra_runs:
            # Each only where what it is compared with runs too.
            needs = {"mergekit_f32_stable_topk": "mergekit_f32_compute", "weightkit_seed1": "weightkit"}
            jobs += [(m, r) for r, m in ONCE.items() if m in methods and needs[r] in runners]
        startup_tools = [t for t in ("weightkit", "mergekit") if any(r.startswith(t) for r in runners)]
        startup_runs: dict[str, list[dict]] = {t: [] for t in startup_tools}
        warm_up(models)
        baseline_runs: dict[str, list[dict]] = {"read_write": [], "read_write_fsync": []}
        runs: dict[str, list[dict]] = {}
        kept: dict[str, Path] = {}  # the last output of each (method, runner), for the comparisons
        for rep in range(args.reps):
            for fsync, key in ((False, "read_write"), (True, "read_write_fsync")):
                baseline_runs[key].append(copy_baseline(models, work, fsync=fsync))
            print(
                f"rep {rep + 1} read+write: {baseline_runs['read_write'][-1]['gb_per_s']:.2f} GB/s",
                flush=True,
            )
            for tool in startup_tools:
                cmd = startup_cmd(tool, recipes[methods[0], "bf16"], work / "dry-run-out")
                startup_runs[tool].append(run_measured(cmd, work / f"startup-{tool}"))
            print(
                f"rep {rep + 1} startup: "
                + ", ".join(f"{t} {startup_runs[t][-1]['seconds']:.1f} s" for t in startup_tools),
                flush=True,
            )
            for method, runner in jobs:
                if runner in ONCE and rep > 0:
                    continue
                key = f"{method}/{runner}"
                out = work / f"out-{method}-{runner}-{rep}"
                shutil.rmtree(out, ignore_errors=True)  # a kept directory from an earlier run
                cmd = runner_cmd(runner, recipes[method, RUNNERS[runner]], out)
                load = os.getloadavg()[0]
                m = run_measured(cmd, work / f"log-{method}-{runner}-{rep}")
                m["load_before"] = load
                m["json"] = _json_output(m.pop("stdout")) if runner.startswith("weightkit") else None
                runs.setdefault(key, []).append(m)
                print(
                    f"rep {rep + 1} {key}: {m['seconds']:.1f} s, peak RSS {m['peak_rss_mib']:.0f} MiB "
                    f"(load {load:.1f})",
                    flush=True,
                )
                if key in kept and args.keep is None:
                    shutil.rmtree(kept[key])
                kept[key] = out

        baseline = {}
        for key, bruns in baseline_runs.items():
            seconds = statistics.median(b["seconds"] for b in bruns)
            inner = statistics.median(b["inner_seconds"] for b in bruns)
            baseline[key] = {
                "seconds": round(seconds, 3),
                "inner_seconds": round(inner, 3),
                "bytes": bruns[0]["bytes"],
                "gb_per_s": round(bruns[0]["bytes"] / seconds / 1e9, 3),
                "gb_per_s_inner": round(bruns[0]["bytes"] / inner / 1e9, 3),
            }
        limit = baseline["read_write"]["gb_per_s"]
        startup = {
            tool: {
                "seconds": round(statistics.median(r["seconds"] for r in sruns), 2),
                "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in sruns), 1),
                "command": " ".join([Path(c).name for c in startup_cmd(tool, Path("RECIPE"), Path("OUT"))]),
            }
            for tool, sruns in startup_runs.items()
        }
        results = []
        for method in methods:
            row = _row(method, runs, kept, models, moved, limit, startup)
            results.append(row)
            print(json.dumps(row, indent=1), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    source_after = weightkit_source_state()
    if source_after != source_before:
        print(f"WARNING: weightkit's source changed during the run ({source_before} -> {source_after})")
    build = json.loads((CHECKPOINT_DIR / "build.json").read_text())
    data = {
        "job": f"merge {FINE_TUNES} fine-tunes into their base (task arithmetic, TIES, DARE-TIES); "
        "Llama architecture: hidden 768, 12 layers, 12 heads, intermediate 2048, vocabulary 32000, untied "
        "lm_head; bfloat16 safetensors; one fine-tune in two shards",
        "checkpoints": {
            "dir": str(CHECKPOINT_DIR),
            "parameters_each": build["parameters"],
            "sha256": build["sha256"],
            "recipe": BUILD_RECIPE,
        },
        "bytes": {"inputs": input_bytes, "output": output_bytes, "moved": moved},
        "versions": versions,
        "weightkit_source": {
            "before": source_before,
            "after": source_after,
            "changed": source_after != source_before,
        },
        "commands": {
            "weightkit": "weightkit merge RECIPE -o OUT --json  (RECIPE: dtype: bfloat16)",
            "mergekit_f32_compute": "mergekit-yaml RECIPE OUT "
            + " ".join(MERGEKIT_FLAGS)
            + "  (RECIPE: dtype: float32, out_dtype: bfloat16)",
            "mergekit_bf16_compute": "mergekit-yaml RECIPE OUT "
            + " ".join(MERGEKIT_FLAGS)
            + "  (RECIPE: dtype: bfloat16, the file weightkit reads)",
            "mergekit_f32_stable_topk": "python bench/merge_peer.py --stable-topk RECIPE OUT "
            + " ".join(MERGEKIT_FLAGS)
            + "  (TIES only, once; comparison only)",
            "weightkit_seed1": "weightkit merge RECIPE -o OUT --json  (DARE-TIES only, once; seed: 1)",
        },
        "reps": args.reps,
        "timing": "seconds: median wall time of the whole command (interpreter start, imports, planning, "
        "reading, merging, writing) over interleaved repetitions on a warm page cache. peak_rss_mib: "
        "ru_maxrss of the command's process (anonymous + touched file-backed pages); the sampled_* fields "
        "split it roughly (20 ms sampling). gb_per_s: (input + output bytes) / seconds. time_ratio / "
        "rss_ratio: weightkit over the faster / leaner of mergekit's two compute-dtype configurations. "
        "startup: median seconds before any tensor work (weightkit: --dry-run = imports + headers + plan; "
        "mergekit: --help = imports); seconds_minus_startup and time_ratio_minus_startup take it off.",
        "baseline": baseline,
        "startup": startup,
        "results": results,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    if args.no_write:
        print(json.dumps(data, indent=1))
    else:
        print(f"wrote {write_result('merge', data)}")


if __name__ == "__main__":
    main()
