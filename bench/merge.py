"""Merge benchmark: weightkit vs mergekit (and a plain eager-torch loop) on the same recipes, in one run.

    .venv/bin/python bench/merge.py                       # both sizes, writes bench/results/merge.json
    .venv/bin/python bench/merge.py --sizes 134m          # the small set only (~15 min on 2 cores)
    .venv/bin/python bench/merge.py --build-only          # only make (or check) the cached checkpoints
    .venv/bin/python bench/merge.py --sizes 134m --methods ties --reps 1 --no-write   # a quick look

Run timed benchmarks under the shared lock: ``flock /tmp/weightkit-bench.lock .venv/bin/python ...``.

The other methods both tools have (SLERP, Model Stock, Breadcrumbs-TIES, DELLA) run the same way into
their own file: ``bench/merge.py --sizes 134m --methods slerp,model_stock,breadcrumbs_ties,della --out
merge_methods`` (``bench/results/merge_methods.json``).

Job: task arithmetic, TIES, DARE-TIES and a linear average of three fine-tunes (onto their base for the
task-vector methods). Two sets of Llama-architecture checkpoints in bfloat16 safetensors, untied
``lm_head``, made here deterministically, not trained (:func:`build_checkpoints`): ``134m`` (hidden 768,
12 layers, intermediate 2048, vocabulary 32000: 134M parameters, 268 MB each) and ``1b`` (TinyLlama-1.1B's
shape: hidden 2048, 22 layers, 32 heads with 4 key/value heads, intermediate 5632: 1.1B parameters, 2.2 GB
each), both from the same generator: Llama's init for the base, base + a fine-tune-like delta for each
fine-tune. Merging cost does not depend on what the weights mean, and the tensor names, shapes, dtypes
and files are those of a ``save_pretrained`` Llama. One fine-tune is saved in two shards.

Runners, each a fresh process started by a small timing wrapper:

- ``weightkit``: ``weightkit merge RECIPE -o OUT --json`` on the recipe as written (``dtype: bfloat16``),
  run as ``python bench/merge.py --inner weightkit ...``: weightkit's own CLI ``main`` in-process, with a
  timer around the ``weightkit.merge(...)`` call it makes (the work: planning, reading, merging,
  writing, fsync and rename). The process is otherwise the ``weightkit`` command (same imports, same
  arguments), so its wall time is the command's end to end.
- ``mergekit_bf16_compute``: mergekit 0.1.5 (its own venv, ``bash bench/peer_env.sh mergekit``) on the
  *same file*, through ``bench/merge_peer.py --time-work``: ``mergekit-yaml``'s own ``main`` in-process
  with a timer around the ``run_merge(...)`` call it makes (the work: loading, planning, merging,
  writing). mergekit reads ``dtype`` as the dtype to compute in.
- ``mergekit_f32_compute``: the same with ``dtype: float32, out_dtype: bfloat16``, which is what
  weightkit does with ``dtype: bfloat16`` (float32 arithmetic, bfloat16 output).
- ``eager`` (task arithmetic and linear): the simplest eager-torch loop, ``python bench/merge.py --inner
  eager RECIPE OUT``: for each tensor, ``safe_open(...).get_tensor`` of every model, float32 arithmetic
  (``base + sum_i w_i (t_i - base)``, or ``sum_i w_i t_i / sum_i w_i``), cast to bfloat16, and one
  ``save_file`` of the whole output at the end (no checks, no fsync, no atomic rename). Timed around the
  loop, after its imports.
- Comparison only, once each, not in the ratios: ``mergekit_f32_stable_topk`` (TIES: mergekit with a
  stable sort in its top-k, i.e. weightkit's tie-break) and ``weightkit_seed1`` (DARE-TIES with
  ``seed: 1``, a second draw of weightkit's random masks).

Start-up, timed each repetition: a bare ``python -c "import torch"`` (weightkit's venv),
``weightkit merge RECIPE -o OUT --dry-run`` (imports, headers, plan; nothing written) and ``mergekit-yaml
--help`` (mergekit's imports).

Every runner runs with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep between operations instead of
spinning): weightkit's merge command sets it for itself, and mergekit and the eager loop get it too, so
the comparison is not about spinning, which on a shared machine costs more the more operations a tool
runs (measured on the 1B task arithmetic under load 4-5: weightkit 23-26 s spinning, 19-20 s passive).

Each command's wall time and peak RSS come from the wrapper (``getrusage(RUSAGE_CHILDREN).ru_maxrss``:
anonymous and file-backed resident pages), which also samples ``/proc/PID/status`` every 20 ms for a rough
split of the peak into anonymous and file-backed pages. Repetitions are interleaved (rep 1: every method x
runner, then rep 2 ...), each set on a warm page cache (its inputs are read once first); medians are
reported with every run's value and the 1-minute load average before it.

Quality: deterministic methods (task arithmetic, TIES, linear) are compared entry by entry in float32 with
every mergekit output and the eager loop's (max / mean absolute difference, fraction of entries that
differ); ``max_abs_diff`` is the one where both tools define the method the same way (float32 compute;
for TIES also the same tie-break). DARE draws its drop masks from different random streams in the two
tools, so the statistics of each output's merged task vector are compared instead (fraction changed, L2
norm, cosine and L2 ratio between outputs, including two draws of weightkit's).

Throughput: (input + output bytes) / seconds, against a plain read + write of the same bytes in a fresh
process (every input file read in 16 MiB chunks, the base's bytes written once, with and without fsync).
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

from common import BENCH_DIR, CACHE_ROOT, weightkit_source_state, write_result  # noqa: E402

REPO_SRC = BENCH_DIR.parent / "src"
MERGEKIT_VENV = Path(os.environ.get("WEIGHTKIT_MERGEKIT_VENV", BENCH_DIR / ".venv-mergekit"))
MERGEKIT_PYTHON = MERGEKIT_VENV / "bin" / "python"
PEER_ENV_SCRIPT = BENCH_DIR / "peer_env.sh"
WEIGHTKIT_CLI = Path(sys.executable).parent / "weightkit"

# mergekit's fastest CPU configuration, measured here (README "## merge"): default threads (-j = cores;
# -j 1 was slower on TIES when the machine was quiet), no --async-write (no faster, more memory).
# --lazy-unpickle only concerns pickled inputs; --cuda, --read-to-gpu, --low-cpu-memory and --multi-gpu
# need a GPU. There is no tokenizer to copy, and --random-seed makes DARE reproducible.
MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--random-seed", "0", "--quiet"]

METHODS = ("task_arithmetic", "ties", "dare_ties", "linear")
# The other methods both tools have; run with --methods and --out (see the README's "## merge").
MORE_METHODS = ("slerp", "model_stock", "breadcrumbs_ties", "della")
DETERMINISTIC = ("task_arithmetic", "ties", "linear", "slerp", "model_stock", "breadcrumbs_ties")
EAGER_METHODS = ("task_arithmetic", "linear")
SIZES = ("134m", "1b")

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
# The 1B set: the same generator and recipe at TinyLlama-1.1B's shape (grouped-query attention, 4 key/value
# heads), 1.1B parameters, 2.2 GB each in bfloat16.
BUILD_RECIPES = {
    "134m": BUILD_RECIPE,
    "1b": {
        **BUILD_RECIPE,
        "config": {
            "vocab_size": 32000,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        },
    },
}
CHECKPOINT_DIRS = {"134m": CACHE_ROOT / "bench-merge", "1b": CACHE_ROOT / "bench-merge-1b"}
FINE_TUNES = len(BUILD_RECIPE["shared_coef"])


def _tensor_seed(r: dict, model: int, index: int) -> int:
    return r["seed"] * 1_000_003 + model * 10_007 + index


def _param_shapes(r: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``LlamaForCausalLM``'s state dict, from a model on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**r["config"]))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _base_tensor(r: dict, shape: tuple[int, ...], index: int):
    import torch

    g = torch.Generator().manual_seed(_tensor_seed(r, 0, index))
    if len(shape) == 1:  # RMSNorm
        return 1 + r["norm_std"] * torch.randn(shape, generator=g)
    return r["init_std"] * torch.randn(shape, generator=g)


def _delta(r: dict, name: str, shape: tuple[int, ...], index: int, model: int):
    """Fine-tune ``model``'s (1-based) delta for one tensor, float32."""
    import torch

    s = r["init_std"]
    g = torch.Generator().manual_seed(_tensor_seed(r, model, index))
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
    gs = torch.Generator().manual_seed(_tensor_seed(r, 0, index) + 7)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _cached(root: Path, recipe: dict) -> dict | None:
    info_path = root / "build.json"
    if not info_path.exists():
        return None
    info = json.loads(info_path.read_text())
    if info.get("recipe") != recipe:
        return None
    for name, files in info["files"].items():
        for file, size in files.items():
            path = root / name / file
            if not path.exists() or path.stat().st_size != size:
                return None
    return info


def build_checkpoints(size: str = "134m", *, force: bool = False, log=print) -> dict[str, Path]:
    """Make (once) and return ``{"base": dir, "ft1": dir, "ft2": dir, "ft3": dir}`` for ``size``.

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

    r, root = BUILD_RECIPES[size], CHECKPOINT_DIRS[size]
    if not force and (info := _cached(root, r)) is not None:
        log(f"checkpoints: reusing {root} ({info['parameters'] / 1e6:.1f}M parameters each)")
        return {name: root / name for name in info["files"]}
    start = time.perf_counter()
    shapes = _param_shapes(r)
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    dtype = getattr(torch, r["dtype"])
    config = LlamaConfig(**r["config"], dtype=r["dtype"])
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
            w = _base_tensor(r, shape, index)
            if model:
                w += _delta(r, tensor_name, shape, index, model)
            tensors[tensor_name] = w.to(dtype)
        _save(tensors, out, sharded=bool(model) and r["sharded"][model - 1])
        del tensors
        files[name] = {}
        for path in _weight_files(out):
            files[name][path.name] = path.stat().st_size
            sha[f"{name}/{path.name}"] = _sha256(path)
        log(f"checkpoints: {name} done ({time.perf_counter() - start:.0f} s)")
    info = {
        "recipe": r,
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

# Per fine-tune parameters (lists, ft1 first) and the method's own; the same for both tools. Normalize is
# written out where the method has it, so neither tool's default decides it. Linear averages the three
# fine-tunes (no base); SLERP goes from the base (listed first, as mergekit wants) to ft1.
RECIPES = {
    "task_arithmetic": {"weight": [0.5, 0.3, 0.2], "parameters": {"normalize": False}},
    "ties": {"weight": [1.0, 0.7, 0.5], "density": [0.5, 0.4, 0.6], "parameters": {"normalize": True}},
    "dare_ties": {"weight": [0.5, 0.4, 0.3], "density": [0.5, 0.4, 0.6], "parameters": {"normalize": False}},
    "linear": {"weight": [0.5, 0.3, 0.2], "parameters": {"normalize": True}},
    "slerp": {"parameters": {"t": 0.4}},
    "model_stock": {"parameters": {}},
    "breadcrumbs_ties": {
        "weight": [1.0, 0.7, 0.5],
        "density": [0.9, 0.8, 0.9],
        "gamma": [0.01, 0.02, 0.01],
        "parameters": {"normalize": True},
    },
    "della": {
        "weight": [0.5, 0.4, 0.3],
        "density": [0.5, 0.4, 0.6],
        "epsilon": [0.1, 0.1, 0.15],
        "parameters": {"normalize": False, "lambda": 1.0},
    },
}
_PER_MODEL = ("weight", "density", "gamma", "epsilon")


def recipe_yaml(
    method: str, models: dict[str, Path], *, compute_dtype: str = "bfloat16", seed: int | None = None
) -> str:
    """The mergekit YAML both tools read. ``compute_dtype="float32"`` gives the variant for mergekit
    that computes in float32 and writes bfloat16 (``dtype`` / ``out_dtype``), as weightkit does;
    ``seed`` adds weightkit's ``seed`` parameter (weightkit only: mergekit takes ``--random-seed``)."""
    r = RECIPES[method]
    lines = ["models:"]
    if method == "slerp":
        lines += [f"  - model: {models['base']}", f"  - model: {models['ft1']}"]
    for i in range(FINE_TUNES if method != "slerp" else 0):
        params = ", ".join(f"{key}: {r[key][i]}" for key in _PER_MODEL if key in r)
        lines.append(f"  - model: {models[f'ft{i + 1}']}")
        if params:
            lines.append(f"    parameters: {{{params}}}")
    if method != "linear":
        lines.append(f"base_model: {models['base']}")
    parameters = {**r["parameters"], **({"seed": seed} if seed is not None else {})}
    lines += [f"merge_method: {method}", "parameters:" if parameters else "parameters: {}"]
    lines += [
        f"  {key}: {str(value).lower() if isinstance(value, bool) else value}"
        for key, value in parameters.items()
    ]
    lines.append(f"dtype: {compute_dtype}")
    if compute_dtype != "bfloat16":
        lines.append("out_dtype: bfloat16")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ in-process runners


def _write_timing(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data) + "\n")


def inner_weightkit(timing_file: str, cli_args: list[str]) -> int:
    """``weightkit CLI_ARGS`` in this process, timing the ``weightkit.merge(...)`` call the CLI makes.

    Nothing here imports torch before the CLI does, so the process is the ``weightkit`` command's (the
    CLI sets OpenMP's wait policy before its command imports torch).
    """
    import weightkit.cli.merge as cli_merge
    from weightkit.cli import main as weightkit_main

    real_command = cli_merge._cmd_merge
    seconds: list[tuple[float, float]] = []

    def timed_command(args):
        import weightkit.merge

        real_merge = weightkit.merge.merge

        def timed_merge(*a, **k):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return real_merge(*a, **k)
            finally:
                seconds.append((time.perf_counter() - start, time.process_time() - cpu))

        # The command looks `merge` up on the package when it runs (`from weightkit.merge import merge`).
        weightkit.merge.merge = timed_merge
        return real_command(args)

    cli_merge._cmd_merge = timed_command  # the parser, built by main(), takes the module's function
    code = weightkit_main(cli_args)
    work, cpu = seconds[0] if seconds else (None, None)
    _write_timing(timing_file, {"work_seconds": work, "work_cpu_seconds": cpu, "returncode": code})
    return code


def inner_eager(timing_file: str, recipe_path: str, out_dir: str) -> int:
    """The simplest eager-torch merge of a task-arithmetic or linear recipe (see the module docstring)."""
    import torch
    import yaml
    from safetensors import safe_open
    from safetensors.torch import save_file

    recipe = yaml.safe_load(Path(recipe_path).read_text())
    method = recipe["merge_method"]
    weights = [float(m["parameters"]["weight"]) for m in recipe["models"]]
    dtype = getattr(torch, recipe.get("out_dtype") or recipe["dtype"])
    start, cpu = time.perf_counter(), time.process_time()

    def open_model(model_dir: str) -> dict:
        handles = [safe_open(str(p), framework="pt") for p in sorted(Path(model_dir).glob("*.safetensors"))]
        return {name: h for h in handles for name in h.keys()}  # noqa: SIM118 - not a dict

    models = [open_model(m["model"]) for m in recipe["models"]]
    base = open_model(recipe["base_model"]) if method == "task_arithmetic" else None
    merged = {}
    for name in base or models[0]:
        if base is not None:
            b = base[name].get_tensor(name).float()
            total = b.clone()
            for weight, model in zip(weights, models, strict=True):
                total += weight * (model[name].get_tensor(name).float() - b)
        else:
            total = sum(w * m[name].get_tensor(name).float() for w, m in zip(weights, models, strict=True))
            total /= sum(weights)
        merged[name] = total.to(dtype)
    os.makedirs(out_dir)
    save_file(merged, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    work = {"work_seconds": time.perf_counter() - start, "work_cpu_seconds": time.process_time() - cpu}
    _write_timing(timing_file, {**work, "returncode": 0})
    return 0


def inner_main(argv: list[str]) -> int:
    """``--inner weightkit TIMING -- CLI_ARGS`` or ``--inner eager TIMING RECIPE OUT``."""
    kind, timing_file, *rest = argv
    if kind == "weightkit":
        return inner_weightkit(timing_file, rest[1:] if rest[:1] == ["--"] else rest)
    if kind == "eager":
        return inner_eager(timing_file, *rest)
    raise SystemExit(f"unknown inner runner {kind!r}")


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
    # OpenMP threads sleep between operations in every runner: what weightkit's merge command chooses
    # for itself, given to mergekit and the eager loop too. Spinning (libgomp's default) costs a tool with
    # more operations more, and on this shared machine the spin occupies the core the other thread needs.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    # weightkit from the source beside this bench (an editable install may point at another checkout).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_SRC), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_measured(cmd: list[str], log_stem: Path) -> dict:
    """Run ``cmd`` in a fresh wrapper process; return its seconds, peak RSS, stdout and, when the command
    writes one to ``log_stem.timing.json``, its inner timing (``work_seconds``)."""
    out, err = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    timing = log_stem.with_suffix(".timing.json")
    timing.unlink(missing_ok=True)
    cmd = [str(c).replace("{TIMING}", str(timing)) for c in cmd]
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _WRAPPER, str(out), str(err), *cmd],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        check=True,
    )
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    if m["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {m['returncode']}:\n{err.read_text()[-4000:]}")
    m["stdout"] = out.read_text()
    if timing.exists():
        inner = json.loads(timing.read_text())
        m["work_seconds"], m["work_cpu_seconds"] = inner["work_seconds"], inner["work_cpu_seconds"]
    return m


# Each runner and the recipe variant it reads: "bf16" is the recipe as written (dtype: bfloat16), "f32"
# the same with dtype: float32, out_dtype: bfloat16, "bf16-seed1" the recipe with weightkit's seed: 1.
RUNNERS = {
    "weightkit": "bf16",
    "mergekit_f32_compute": "f32",
    "mergekit_bf16_compute": "bf16",
    "eager": "bf16",  # task arithmetic and linear only
    # Once each, for the comparisons only (never in the ratios):
    "mergekit_f32_stable_topk": "f32",  # TIES: mergekit with weightkit's tie-break
    "weightkit_seed1": "bf16-seed1",  # DARE-TIES: another draw of weightkit's random masks
}
ONCE = {"mergekit_f32_stable_topk": "ties", "weightkit_seed1": "dare_ties"}
PEER_CONFIGS = ("mergekit_f32_compute", "mergekit_bf16_compute")


def runner_cmd(runner: str, recipe: Path, out: Path) -> list[str]:
    """The command of one runner; ``{TIMING}`` is where it writes its inner timing."""
    if runner.startswith("weightkit"):
        cli = ["merge", str(recipe), "-o", str(out), "--json"]
        return [sys.executable, str(Path(__file__).resolve()), "--inner", "weightkit", "{TIMING}", "--", *cli]
    if runner == "eager":
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "--inner",
            "eager",
            "{TIMING}",
            str(recipe),
            str(out),
        ]
    stable = ["--stable-topk"] if runner == "mergekit_f32_stable_topk" else []
    peer = [str(MERGEKIT_PYTHON), str(BENCH_DIR / "merge_peer.py"), "--time-work", "{TIMING}", *stable]
    return [*peer, str(recipe), str(out), *MERGEKIT_FLAGS]


STARTUPS = ("import_torch", "weightkit_dry_run", "mergekit_help")


def startup_cmd(kind: str, recipe: Path, out: Path) -> list[str]:
    """What a command costs before it touches a tensor: a bare torch import; weightkit's dry run (imports,
    headers, plan, nothing written); mergekit has no dry run, so ``mergekit-yaml --help`` (its imports)."""
    if kind == "import_torch":
        return [sys.executable, "-c", "import torch"]
    if kind == "weightkit_dry_run":
        return [str(WEIGHTKIT_CLI), "merge", str(recipe), "-o", str(out), "--dry-run"]
    return [str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), "--help"]


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


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
        for ft, weight, density in zip(fine_tunes, r["weight"], r["density"], strict=True):
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


def weightkit_versions() -> dict[str, str]:
    from importlib.metadata import version

    versions = {name: version(name) for name in ("torch", "safetensors", "transformers")}
    versions["weightkit_source"] = str(REPO_SRC)
    return versions


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _summary(runs: list[dict], moved: int) -> dict:
    seconds = _median([r["seconds"] for r in runs])
    summary = {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(_median([r["peak_rss_mib"] for r in runs]), 1),
        "sampled_peak_rss_anon_mib": round(_median([r["sampled_peak_rss_anon_mib"] for r in runs]), 1),
        "sampled_peak_rss_file_mib": round(_median([r["sampled_peak_rss_file_mib"] for r in runs]), 1),
        "cpu_seconds": round(_median([r["cpu_seconds"] for r in runs]), 2),
        "gb_per_s": round(moved / seconds / 1e9, 3),
        "runs_seconds": [round(r["seconds"], 2) for r in runs],
        "runs_peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in runs],
        "load_average_1min": [round(r["load_before"], 2) for r in runs],
    }
    work = [r["work_seconds"] for r in runs if r.get("work_seconds") is not None]
    if work:
        summary["work_seconds"] = round(_median(work), 3)
        summary["runs_work_seconds"] = [round(w, 3) for w in work]
        summary["work_cpu_seconds"] = round(_median([r["work_cpu_seconds"] for r in runs]), 3)
        summary["startup_and_exit_seconds"] = round(seconds - _median(work), 2)
        summary["gb_per_s_work"] = round(moved / _median(work) / 1e9, 3)
    if isinstance(runs[-1].get("json"), dict):  # what weightkit printed (--json), last run
        summary["printed"] = {
            k: v for k, v in runs[-1]["json"].items() if k not in ("models", "base", "output")
        }
    return summary


def _json_output(text: str) -> dict | None:
    """The JSON a command printed: all of stdout (weightkit indents it), else its last line."""
    for candidate in (text, (text.strip().splitlines() or [""])[-1]):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
    return None


def _row(method: str, runs: dict, quality: dict, moved: int, limit: float) -> dict:
    placeholders = {"base": Path("BASE"), **{f"ft{i}": Path(f"FT{i}") for i in range(1, FINE_TUNES + 1)}}
    row: dict = {"method": method, "recipe": recipe_yaml(method, placeholders)}
    for runner in RUNNERS:
        if f"{method}/{runner}" in runs and runner not in ONCE:
            row[runner] = summary = _summary(runs[f"{method}/{runner}"], moved)
            summary["fraction_of_read_write_limit"] = round(summary["gb_per_s"] / limit, 3)
    peers = [c for c in PEER_CONFIGS if c in row]
    if "weightkit" in row and peers:
        wk = row["weightkit"]
        fastest = min(peers, key=lambda c: row[c]["seconds"])
        fastest_work = min(peers, key=lambda c: row[c]["work_seconds"])
        leanest = min(peers, key=lambda c: row[c]["peak_rss_mib"])
        row["e2e_ratio"] = round(wk["seconds"] / row[fastest]["seconds"], 3)
        row["e2e_ratio_vs"] = fastest
        row["work_ratio"] = round(wk["work_seconds"] / row[fastest_work]["work_seconds"], 3)
        row["work_ratio_vs"] = fastest_work
        row["rss_ratio"] = round(wk["peak_rss_mib"] / row[leanest]["peak_rss_mib"], 3)
        row["rss_ratio_vs"] = leanest
        row["ratios_per_config"] = {
            c: {
                "e2e": round(wk["seconds"] / row[c]["seconds"], 3),
                "work": round(wk["work_seconds"] / row[c]["work_seconds"], 3),
                "rss": round(wk["peak_rss_mib"] / row[c]["peak_rss_mib"], 3),
            }
            for c in peers
        }
        row["targets"] = {"work_le_mergekit": row["work_ratio"] <= 1.0}
    if "weightkit" in row and "eager" in row:
        row["eager_ratio"] = round(row["weightkit"]["work_seconds"] / row["eager"]["work_seconds"], 3)
        row.setdefault("targets", {})["work_le_1.2x_eager"] = row["eager_ratio"] <= 1.2
    row.update(quality)
    return row


def _quality(method: str, kept: dict[str, Path], models: dict[str, Path]) -> dict:
    """Compare the outputs of one method's runners (see the module docstring)."""
    row: dict = {}
    if method in DETERMINISTIC and f"{method}/weightkit" in kept:
        diffs = {}
        for runner in ("mergekit_f32_compute", "mergekit_f32_stable_topk", "mergekit_bf16_compute", "eager"):
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
    elif f"{method}/weightkit" in kept:
        row["max_abs_diff"] = None
        row["max_abs_diff_vs"] = (
            "not comparable entry by entry: random drop masks from different random streams"
        )
        names = ("weightkit", "weightkit_seed1", *PEER_CONFIGS)
        outputs = {r: kept[f"{method}/{r}"] for r in names if f"{method}/{r}" in kept}
        row["task_vector_stats"] = task_vector_stats(outputs, models["base"])
    return row


def _startup_summary(startup_runs: dict[str, list[dict]]) -> dict:
    out: dict = {}
    for kind, sruns in startup_runs.items():
        out[kind] = {
            "seconds": round(_median([r["seconds"] for r in sruns]), 3),
            "runs_seconds": [round(r["seconds"], 3) for r in sruns],
            "peak_rss_mib": round(_median([r["peak_rss_mib"] for r in sruns]), 1),
            "command": " ".join(Path(c).name for c in startup_cmd(kind, Path("RECIPE"), Path("OUT"))),
        }
    if "import_torch" in startup_runs and "weightkit_dry_run" in startup_runs:
        # Each repetition's pair ran back to back: the median of their differences is steadier under load
        # than the difference of the medians.
        pairs = zip(startup_runs["weightkit_dry_run"], startup_runs["import_torch"], strict=True)
        delta = _median([a["seconds"] - b["seconds"] for a, b in pairs])
        out["dry_run_minus_import_torch_seconds"] = round(delta, 3)
        out["targets"] = {"dry_run_within_0.7s_of_import_torch": delta <= 0.7}
    return out


def run_size(
    size: str, models: dict[str, Path], methods: list[str], runners: list[str], args, work: Path
) -> dict:
    """Every repetition of every (method, runner) on one checkpoint set; the last repetition's outputs are
    compared as soon as a method's runs are done, then deleted (unless ``--keep``)."""
    input_bytes = sum(weight_bytes(models[k]) for k in models)
    output_bytes = weight_bytes(models["base"])  # the same tensors in the same dtype
    moved = input_bytes + output_bytes
    recipes = {}
    for method in methods:
        for variant, dtype, seed in (
            ("bf16", "bfloat16", None),
            ("f32", "float32", None),
            ("bf16-seed1", "bfloat16", 1),
        ):
            recipes[method, variant] = work / f"{size}-{method}-{variant}.yml"
            recipes[method, variant].write_text(recipe_yaml(method, models, compute_dtype=dtype, seed=seed))

    jobs = [(m, r) for m in methods for r in runners if r != "eager" or m in EAGER_METHODS]
    if not args.no_extra_runs:
        # Each only where what it is compared with runs too; in the last repetition, beside what it is
        # compared with.
        needs = {"mergekit_f32_stable_topk": "mergekit_f32_compute", "weightkit_seed1": "weightkit"}
        jobs += [(m, r) for r, m in ONCE.items() if m in methods and needs[r] in runners]
        jobs.sort(key=lambda job: methods.index(job[0]))
    startup_kinds = [
        k for k in STARTUPS if k != "mergekit_help" or any(r.startswith("mergekit") for r in runners)
    ]
    startup_runs: dict[str, list[dict]] = {k: [] for k in startup_kinds}
    baseline_runs: dict[str, list[dict]] = {"read_write": [], "read_write_fsync": []}
    runs: dict[str, list[dict]] = {}
    quality: dict[str, dict] = {}
    for rep in range(args.reps):
        last = rep == args.reps - 1
        warm_up(models)
        for fsync, key in ((False, "read_write"), (True, "read_write_fsync")):
            baseline_runs[key].append(copy_baseline(models, work, fsync=fsync))
        for kind in startup_kinds:
            cmd = startup_cmd(kind, recipes[methods[0], "bf16"], work / "dry-run-out")
            startup_runs[kind].append(run_measured(cmd, work / f"startup-{kind}"))
        print(
            f"[{size}] rep {rep + 1}: read+write {baseline_runs['read_write'][-1]['gb_per_s']:.2f} GB/s; "
            "startup " + ", ".join(f"{k} {startup_runs[k][-1]['seconds']:.2f} s" for k in startup_kinds),
            flush=True,
        )
        kept: dict[str, Path] = {}  # the last repetition's outputs, compared once a method's runs are done
        for i, (method, runner) in enumerate(jobs):
            if runner in ONCE and not last:
                continue
            key = f"{method}/{runner}"
            out = work / f"out-{size}-{method}-{runner}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = runner_cmd(runner, recipes[method, RUNNERS[runner]], out)
            # Every run starts on a warm page cache: outputs written meanwhile may have pushed inputs out.
            warm_up(models)
            load = os.getloadavg()[0]
            m = run_measured(cmd, work / f"log-{size}-{method}-{runner}-{rep}")
            m["load_before"] = load
            m["json"] = _json_output(m.pop("stdout")) if runner.startswith("weightkit") else None
            runs.setdefault(key, []).append(m)
            work_s = f", work {m['work_seconds']:.2f} s" if m.get("work_seconds") is not None else ""
            print(
                f"[{size}] rep {rep + 1} {key}: {m['seconds']:.1f} s{work_s}, peak RSS "
                f"{m['peak_rss_mib']:.0f} MiB (load {load:.1f})",
                flush=True,
            )
            if not last:
                if args.keep is None:
                    shutil.rmtree(out)  # only the last repetition's outputs are compared
                continue
            kept[key] = out
            if i + 1 == len(jobs) or jobs[i + 1][0] != method:
                # The method's last run: compare its outputs, then free the disk and page cache they hold.
                quality[method] = _quality(method, kept, models)
                if args.keep is None:
                    for path in kept.values():
                        shutil.rmtree(path, ignore_errors=True)
                kept = {}

    baseline = {}
    for key, bruns in baseline_runs.items():
        seconds = _median([b["seconds"] for b in bruns])
        inner = _median([b["inner_seconds"] for b in bruns])
        baseline[key] = {
            "seconds": round(seconds, 3),
            "inner_seconds": round(inner, 3),
            "bytes": bruns[0]["bytes"],
            "gb_per_s": round(bruns[0]["bytes"] / seconds / 1e9, 3),
            "gb_per_s_inner": round(bruns[0]["bytes"] / inner / 1e9, 3),
        }
    results = []
    for method in methods:
        row = _row(method, runs, quality.get(method, {}), moved, baseline["read_write"]["gb_per_s"])
        results.append(row)
        print(
            json.dumps({k: v for k, v in row.items() if k not in ("diffs", "recipe")}, indent=1), flush=True
        )
    build = json.loads((CHECKPOINT_DIRS[size] / "build.json").read_text())
    return {
        "checkpoints": {
            "dir": str(CHECKPOINT_DIRS[size]),
            "parameters_each": build["parameters"],
            "config": build["recipe"]["config"],
            "sha256": build["sha256"],
        },
        "bytes": {"inputs": input_bytes, "output": output_bytes, "moved": moved},
        "baseline": baseline,
        "startup": _startup_summary(startup_runs),
        "results": results,
    }


TIMING = (
    "seconds: median wall time of the whole command (interpreter start, imports, the work, exit) over "
    "interleaved repetitions on a warm page cache. work_seconds: measured inside the process around the "
    "merge call alone (weightkit: weightkit.merge(...) as its CLI calls it, i.e. planning, reading, float32 "
    "merging, NaN/Inf checks, writing, fsync and rename; mergekit: run_merge(...) as mergekit-yaml calls "
    "it, i.e. loading, planning, merging, writing; eager: the plain loop, from opening the files to "
    "save_file). "
    "startup_and_exit_seconds: seconds - work_seconds. peak_rss_mib: ru_maxrss of the command's process "
    "(anonymous + touched file-backed pages); the sampled_* fields split it roughly (20 ms sampling). "
    "gb_per_s: (input + output bytes) / seconds (gb_per_s_work: / work_seconds). e2e_ratio, work_ratio, "
    "rss_ratio: weightkit's over the faster (leaner) of mergekit's two compute-dtype configurations, also "
    "given per configuration in ratios_per_config. eager_ratio: weightkit's work_seconds over the eager "
    "loop's. startup: median seconds of a bare `python -c 'import torch'`, of `weightkit merge RECIPE -o OUT "
    "--dry-run` (imports + headers + plan) and of `mergekit-yaml --help` (imports); "
    "dry_run_minus_import_torch_seconds is the median over repetitions of the difference between the dry run "
    "and the bare import, run back to back. Every runner has OMP_WAIT_POLICY=PASSIVE. "
    "load_average_1min: the machine's load before each run (2 cores; "
    "other work was running)."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--inner"]:
        return inner_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of " + ",".join(SIZES))
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated, from " + ",".join(METHODS + MORE_METHODS) + " (default: the first four)",
    )
    p.add_argument(
        "--runners",
        default="weightkit,eager," + ",".join(PEER_CONFIGS),
        help="comma-separated: weightkit, eager, mergekit_f32_compute, mergekit_bf16_compute",
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
    p.add_argument("--out", default="merge", help="write bench/results/OUT.json (default: merge)")
    args = p.parse_args(argv)
    sizes, methods, runners = args.sizes.split(","), args.methods.split(","), args.runners.split(",")
    if bad := [s for s in sizes if s not in SIZES]:
        p.error(f"unknown size(s) {bad} (choose from {', '.join(SIZES)})")
    if bad := [m for m in methods if m not in METHODS + MORE_METHODS]:
        p.error(f"unknown method(s) {bad} (choose from {', '.join(METHODS + MORE_METHODS)})")
    if bad := [r for r in runners if r not in ("weightkit", "eager", *PEER_CONFIGS)]:
        p.error(f"unknown runner(s) {bad} (choose from weightkit, eager, {', '.join(PEER_CONFIGS)})")

    models = {size: build_checkpoints(size, force=args.rebuild) for size in sizes}
    if args.build_only:
        return 0
    if any(r.startswith("mergekit") for r in runners):
        ensure_mergekit_env()
    # Before the runs: the weightkit source may change while this runs.
    versions = {"weightkit_venv": weightkit_versions(), "mergekit_venv": mergekit_versions()}
    source_before = weightkit_source_state()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    per_size = {}
    try:
        for size in sizes:
            size_start = time.perf_counter()
            per_size[size] = run_size(size, models[size], methods, runners, args, work)
            per_size[size]["seconds"] = round(time.perf_counter() - size_start, 1)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    source_after = weightkit_source_state()
    if source_after != source_before:
        print(f"WARNING: weightkit's source changed during the run ({source_before} -> {source_after})")
    targets = {
        size: {
            **{r["method"]: r.get("targets", {}) for r in data["results"]},
            "startup": data["startup"].get("targets", {}),
        }
        for size, data in per_size.items()
    }
    data = {
        "job": f"merge {FINE_TUNES} fine-tunes with {', '.join(methods)} (onto their base, but linear; "
        "SLERP: from the base to ft1); Llama architecture, untied lm_head, bfloat16 safetensors, one "
        "fine-tune in two shards; sizes 134m (hidden 768, 12 layers) and 1b (TinyLlama-1.1B's shape)",
        "recipes": {method: RECIPES[method] for method in methods},
        "build_recipe": {size: BUILD_RECIPES[size] for size in sizes},
        "versions": versions,
        "weightkit_source": {
            "before": source_before,
            "after": source_after,
            "changed": source_after != source_before,
        },
        "commands": {
            "weightkit": "python bench/merge.py --inner weightkit TIMING -- merge RECIPE -o OUT --json  (the "
            "weightkit CLI in-process; RECIPE: dtype: bfloat16)",
            "mergekit_f32_compute": "mergekit venv: python bench/merge_peer.py --time-work TIMING RECIPE OUT "
            + " ".join(MERGEKIT_FLAGS)
            + "  (mergekit-yaml's main in-process; RECIPE: dtype: float32, out_dtype: bfloat16)",
            "mergekit_bf16_compute": "the same on RECIPE with dtype: bfloat16 (the file weightkit reads)",
            "eager": "python bench/merge.py --inner eager TIMING RECIPE OUT  (task arithmetic and linear)",
            "mergekit_f32_stable_topk": "mergekit_f32_compute with --stable-topk (TIES only, once; "
            "comparison only)",
            "weightkit_seed1": "weightkit on RECIPE with seed: 1 (DARE-TIES only, once; comparison only)",
        },
        "reps": args.reps,
        "timing": TIMING,
        "targets": targets,
        "sizes": per_size,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    if args.no_write:
        print(json.dumps(data, indent=1))
    else:
        print(f"wrote {write_result(args.out, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
