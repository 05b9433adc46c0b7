"""weightkit inspect against weightwatcher: wall time, peak RSS and per-layer agreement of alpha.

Models: the bundled MiniLM (real, 22.7M), the trained small Llama of ``bench/small_llama.py`` (real, ~6M)
and the 134M Llama-architecture checkpoint of the merge benchmark (``bench/merge.py``'s base: random
Gaussian weights in bfloat16; no trained model of that size is reachable offline, so its alphas are those
of random matrices, where the fit's minimum is flat).

Each side runs in a fresh process per job, with the same thread count (OMP/MKL pinned):

- weightwatcher 0.7.7 in its own venv (``bench/peer_env.sh weightwatcher``, ``bench/inspect_peer.py``):
  load the model in float32 with transformers, ``WeightWatcher(model).analyze()`` with its defaults;
- weightkit: ``inspect_checkpoint(MODEL, device="cpu", spectra=0)`` (the same metrics and more, streamed
  from the checkpoint), and separately the whole ``weightkit inspect MODEL -o DIR --json --device cpu``
  command (default report: plots of 12 spectra, bar plots, HTML).

Ratios (weightkit / weightwatcher, below 1 favours weightkit): the in-process time (inspect_checkpoint vs
analyze(), each without its process start-up and, for weightwatcher, without loading the model), the
whole-process time (start-up, loading, the report for weightkit), and peak RSS (VmHWM of each process).
Alpha agreement: the absolute difference per layer both sides fit (median and worst, and which layer).

    python bench/inspect_bench.py           # all models, 1 and 2 threads -> bench/results/inspect.json
    python bench/inspect_bench.py --models minilm --threads 2 --out inspect-quick

(Not ``bench/inspect.py``: a script's folder comes first on ``sys.path``, so that name would shadow the
standard library's ``inspect`` for every script in ``bench/``.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import BENCH_DIR, run_json, weightkit_source_state, write_result  # noqa: E402

PEER_VENV = Path(os.environ.get("WEIGHTKIT_WEIGHTWATCHER_VENV", BENCH_DIR / ".venv-weightwatcher"))
PEER_SCRIPT = BENCH_DIR / "inspect_peer.py"
MODELS = ("minilm", "small-llama", "llama-134m")


def model_dir(name: str) -> Path:
    if name == "minilm":
        from common import minilm_path

        return minilm_path()
    if name == "small-llama":
        from small_llama import ensure_small_llama

        return ensure_small_llama()
    from merge import build_checkpoints

    return build_checkpoints("134m")["base"]


def _vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


# ------------------------------------------------------------------------------- workers (fresh processes)


def worker_api(path: str) -> int:
    """weightkit in process: the metrics of every matrix, no report (what analyze() computes, and more)."""
    from weightkit.inspect.report import inspect_checkpoint

    start = time.perf_counter()
    result = inspect_checkpoint(path, device="cpu", spectra=0)
    seconds = time.perf_counter() - start
    layers = [
        {"name": row["name"], "alpha": row.get("alpha"), "svd": row.get("svd")}
        for row in result.rows
        if "skipped" not in row
    ]
    print(json.dumps({"seconds": seconds, "peak_rss_mib": _vmhwm_mib(), "layers": layers}))
    return 0


def worker_cli(path: str) -> int:
    """The whole ``weightkit inspect`` command in this process (the report written to a temporary dir)."""
    import contextlib
    import io

    from weightkit.cli import main

    quiet = contextlib.redirect_stdout(io.StringIO())  # the rows; this worker prints its own JSON
    with tempfile.TemporaryDirectory(prefix="bench-inspect-") as tmp, quiet:
        code = main(["inspect", path, "-o", str(Path(tmp) / "report"), "--json", "--device", "cpu"])
    print(json.dumps({"exit_code": code, "peak_rss_mib": _vmhwm_mib()}))
    return 0


# ---------------------------------------------------------------------------------------------- driver


def _timed(cmd: list[str], threads: int) -> dict:
    start = time.perf_counter()
    result = run_json(cmd, threads=threads)
    result["process_seconds"] = time.perf_counter() - start
    return result


def _agreement(ours: list[dict], theirs: list[dict]) -> dict:
    by_name = {layer["name"]: layer for layer in ours}
    diffs = []
    for layer in theirs:
        mine = by_name.get(layer["name"], {}).get("alpha")
        if mine is not None and layer["alpha"] is not None and layer["alpha"] == layer["alpha"]:
            diffs.append((abs(mine - layer["alpha"]), layer["name"]))
    if not diffs:
        return {"layers_compared": 0}
    worst = max(diffs)
    return {
        "layers_compared": len(diffs),
        "layers_weightwatcher": len(theirs),
        "layers_weightkit": sum(layer["alpha"] is not None for layer in ours),
        "median_abs_diff": statistics.median(d for d, _ in diffs),
        "worst_abs_diff": worst[0],
        "worst_layer": worst[1],
    }


def bench_model(name: str, threads: int) -> dict:
    path = str(model_dir(name))
    me = [sys.executable, str(Path(__file__).resolve())]
    peer = [str(PEER_VENV / "bin" / "python"), str(PEER_SCRIPT), path, "--threads", str(threads)]
    theirs = _timed(peer, threads)
    ours = _timed([*me, "--worker-api", path], threads)
    cli = _timed([*me, "--worker-cli", path], threads)
    if cli["exit_code"] != 0:
        raise RuntimeError(f"weightkit inspect {path} exited {cli['exit_code']}")
    return {
        "model": name,
        "path": path,
        "threads": threads,
        "weightkit": {
            "inspect_seconds": ours["seconds"],
            "inspect_peak_rss_mib": ours["peak_rss_mib"],
            "inspect_process_seconds": ours["process_seconds"],
            "cli_process_seconds": cli["process_seconds"],
            "cli_peak_rss_mib": cli["peak_rss_mib"],
            "matrices": len(ours["layers"]),
            "randomized": sum(str(layer["svd"]).startswith("randomized") for layer in ours["layers"]),
        },
        "weightwatcher": {
            "analyze_seconds": theirs["analyze_seconds"],
            "load_seconds": theirs["load_seconds"],
            "process_seconds": theirs["process_seconds"],
            "peak_rss_mib": theirs["peak_rss_mib"],
            "layers": len(theirs["layers"]),
        },
        "ratios": {
            "time_in_process": ours["seconds"] / theirs["analyze_seconds"],
            "time_process_same_metrics": ours["process_seconds"] / theirs["process_seconds"],
            "time_process_with_report": cli["process_seconds"] / theirs["process_seconds"],
            "peak_rss": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
            "peak_rss_with_report": cli["peak_rss_mib"] / theirs["peak_rss_mib"],
        },
        "alpha": _agreement(ours["layers"], theirs["layers"]),
    }


def _peer_version() -> str:
    out = subprocess.run(
        [str(PEER_VENV / "bin" / "python"), "-c", "import weightwatcher; print(weightwatcher.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", default="inspect", help="results name: bench/results/<out>.json")
    parser.add_argument("--worker-api", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--worker-cli", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_api:
        return worker_api(args.worker_api)
    if args.worker_cli:
        return worker_cli(args.worker_cli)
    if not (PEER_VENV / "bin" / "python").exists():
        sys.exit(f"no weightwatcher venv at {PEER_VENV}: run `bash bench/peer_env.sh weightwatcher`")
    runs = []
    for name in args.models:
        for threads in args.threads:
            run = bench_model(name, threads)
            print(json.dumps({k: run[k] for k in ("model", "threads", "ratios", "alpha")}), flush=True)
            runs.append(run)
    path = write_result(
        args.out,
        {"weightkit_source": weightkit_source_state(), "weightwatcher": _peer_version(), "runs": runs},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
