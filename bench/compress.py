"""Compression benchmark: every weightkit quantization method as a size-vs-quality curve, with peers.

    flock /tmp/weightkit-bench.lock .venv/bin/python bench/compress.py    # ~27 min on 2 busy cores
    .venv/bin/python bench/compress.py --models minilm --methods rtn,fp8 --no-peers --no-write   # a look

Writes ``bench/results/compress.json`` (its ``what`` block defines every field) and
``bench/results/compress.png`` (size vs quality, one panel per model, every method a line).

Every method of :data:`METHODS` at several settings (bit widths where the method has bits) on the bundled
MiniLM and the small Llama (``bench/small_llama.py``). A method not registered in this weightkit is
skipped with a message (and a ``skipped`` record), so adding a method is one line in :data:`METHODS`.
Each quantization runs in a fresh process (its peak RSS is its own), through what ``weightkit compress``
runs (``compress_checkpoint``: read, quantize, write); its output is then loaded with ``weightkit.load``
and scored here:
- MiniLM: mean cosine of sentence embeddings to fp32 on 128 held-out stdlib docstrings (higher is better);
- small Llama: perplexity on 64 passages of three plays it never saw (lower is better).
The two models run side by side, one thread each in this process (scoring with one torch thread each).

Peers, on the same models and scored by the same evaluation code (:data:`PEERS`):
- llm-compressor 0.14 (``bench/.venv-peer``): FP8 E4M3 per-channel weights (its FP8_DYNAMIC weights
  alone, no activation quantization: weightkit's ``fp8`` default) and NVFP4A16 (weightkit's ``fp4``);
  their compressed-tensors checkpoints are loaded by transformers (FP8) or by ``weightkit.load`` (NVFP4,
  which transformers 5.25 decompresses to bfloat16 weights that then fail in a float32 model);
- HQQ 0.2.8.post1 (``bench/.venv-hqq``, ``bench/hqq_peer.py``): calibration-free, on weightkit's RTN grids;
  it writes the dequantized weights as a float32 checkpoint, loaded by transformers, and reports the size
  of what HQQ stores (packed codes, float16 scales and zeros).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    BENCH_DIR,
    PEER_ENV_SCRIPT,
    RESULTS_DIR,
    ensure_peer_env,
    measure,
    peer_versions,
    read_jsonl,
    run_json,
    run_peer_quant,
    weightkit_source_state,
    write_jsonl,
    write_result,
)

# 64 calibration texts and 128 / 64 evaluation texts (quant.py: 128 and 256) keep the run short on 2 busy
# cores: AWQ on the small Llama costs ~0.45 s per text, and every output is scored once.
CALIB_TEXTS, MAX_LEN = 64, 256
EVAL_TEXTS = {"minilm": 128, "small-llama": 64}
MODELS = ("minilm", "small-llama")
HQQ_VENV = BENCH_DIR / ".venv-hqq"


@dataclasses.dataclass(frozen=True)
class Point:
    """One setting of a method: its config fields, its nominal bits per quantized weight, a short label."""

    bits: float
    fields: dict
    label: str


@dataclasses.dataclass(frozen=True)
class Method:
    label: str
    points: tuple[Point, ...]


# Integer grids shared by every method on an integer grid (and by HQQ): asymmetric, so HQQ's (which always
# has a zero point) is the same layout; groups of 128 input columns, 64 at 2 bits where 128 fails badly.
INT_GRIDS = {
    2: {"bits": 2, "group_size": 64, "symmetric": False},
    3: {"bits": 3, "group_size": 128, "symmetric": False},
    4: {"bits": 4, "group_size": 128, "symmetric": False},
    8: {"bits": 8, "group_size": 128, "symmetric": False},
}


def int_points(bits: tuple[int, ...] = (2, 3, 4, 8), **fields) -> tuple[Point, ...]:
    """One point per bit width on :data:`INT_GRIDS`, with ``fields`` added to each config."""
    return tuple(Point(b, {**INT_GRIDS[b], **fields}, f"W{b} g{INT_GRIDS[b]['group_size']}") for b in bits)


# Registry name -> the settings benchmarked. Calibration fields (calib_samples, calib_max_length) are added
# to every config class that has them, so a calibrated method needs nothing more here.
METHODS: dict[str, Method] = {
    "rtn": Method("RTN", int_points()),  # W8 once, as the near-lossless end of the integer curves
    "gptq": Method("GPTQ", int_points((2, 3, 4))),
    "awq": Method("AWQ", int_points((2, 3, 4))),
    "fp8": Method(
        "FP8 E4M3",
        (
            Point(8, {"fp8_format": "e4m3", "group_size": None}, "E4M3 per channel"),
            Point(8, {"fp8_format": "e4m3", "group_size": 32}, "E4M3 g32"),
        ),
    ),
    "fp4": Method("FP4 (NVFP4)", (Point(4, {}, "E2M1 g16"),)),
    "ternary": Method("ternary", tuple(Point(1.58, {"group_size": g}, f"g{g}") for g in (128, 64))),
    "gwq": Method("GWQ", int_points((2, 3, 4), outlier_fraction=0.01)),
    "vptq": Method("VPTQ", tuple(Point(b, {"bits": float(b)}, f"{b} bits") for b in (2, 3))),
    "flexround": Method("FlexRound", int_points((3, 4))),  # 100 Adam steps per block: minutes per point
}


@dataclasses.dataclass(frozen=True)
class Peer:
    label: str
    tool: str  # "llm-compressor" or "hqq"
    points: tuple[Point, ...]  # fields: quant_peer.py's method (llm-compressor) or bits + group_size (HQQ)
    same_scheme_as: str  # the weightkit method whose point of the same label stores the same scheme


PEERS: dict[str, Peer] = {
    "llmc-fp8": Peer(
        "llm-compressor FP8", "llm-compressor", (Point(8, {"method": "fp8"}, "E4M3 per channel"),), "fp8"
    ),
    "llmc-nvfp4": Peer(
        "llm-compressor NVFP4A16", "llm-compressor", (Point(4, {"method": "nvfp4"}, "E2M1 g16"),), "fp4"
    ),
    # The low bits, where a calibration-free method has something to show; HQQ costs ~1 min per bit width
    # and model on a CPU here.
    "hqq": Peer("HQQ", "hqq", int_points((2, 3)), "rtn"),
}

# What weightkit leaves in full precision on these two models (its default ignore list), for the peers.
PEER_IGNORE = {"minilm": ["re:.*pooler.*"], "small-llama": ["lm_head"]}

DESCRIPTION = {
    "records": "one per model x method x setting: 'tool' is weightkit, llm-compressor or hqq; a method not "
    "registered in this weightkit has a 'skipped' message instead of numbers",
    "size_mb": "bytes of the output's *.safetensors files / 1e6 (everything the model needs, embeddings, "
    "lm_head and norms included, which stay in full precision); HQQ: the bytes HQQ stores (bit-packed "
    "codes, float16 scales and zeros, every other tensor as in the float32 checkpoint)",
    "quality": "minilm: mean cosine of sentence embeddings (mean-pooled, L2-normalised) to the fp32 "
    f"model's on {EVAL_TEXTS['minilm']} held-out stdlib docstrings (higher is better); small-llama: "
    f"perplexity on {EVAL_TEXTS['small-llama']} held-out passages (spread over three plays it never saw), "
    f"at most {MAX_LEN} tokens each (lower is better)",
    "quality_change": "relative change vs fp32 in the direction of worse: minilm 1 - cosine, small-llama "
    "perplexity / fp32 perplexity - 1 (0 = lossless)",
    "evaluated_by": "how the output was loaded for scoring; the scoring code (weightkit.eval) is the same",
    "quant_seconds": "weightkit: compress_checkpoint (reading the checkpoint, calibrating, quantizing, "
    "writing); llm-compressor: its oneshot call (model loaded, nothing saved); HQQ: its quantize + "
    "dequantize loop over the linears (model loaded, nothing saved)",
    "wall_seconds": "the job's whole process, start to exit (imports, loading, saving included)",
    "peak_rss_mib": "VmHWM of the job's own fresh process (scoring happens afterwards in another process)",
    "calibration": f"{CALIB_TEXTS} texts of at most {MAX_LEN} tokens for every calibrated method (and for "
    "llm-compressor's oneshot, which its weight-only FP8/NVFP4 schemes do not need): stdlib docstrings "
    "for minilm, passages of the training plays for small-llama",
    "vs_peer": "against the peer run of the same scheme (same label): ratios weightkit / peer of time "
    "(quant_seconds, wall_seconds) and peak RSS (below 1: weightkit faster / leaner), size ratio, and "
    "quality_delta = weightkit's quality - the peer's (minilm: above 0 is better; small-llama: below 0)",
    "targets": "the issue's targets, each with what was measured and whether it is met (null: could not "
    "be measured, with the reason)",
}


# ------------------------------------------------------------------------------------------- data


def _texts(model: str) -> tuple[list[str], list[str]]:
    if model == "minilm":
        from weightkit.data import stdlib_docstrings

        return stdlib_docstrings("calib")[:CALIB_TEXTS], stdlib_docstrings("eval")[: EVAL_TEXTS[model]]
    from small_llama import corpus_passages, spread

    return spread(corpus_passages("train"), CALIB_TEXTS), spread(corpus_passages("eval"), EVAL_TEXTS[model])


def _model_dir(model: str) -> Path:
    if model == "minilm":
        from weightkit.models import default_model_path

        return Path(default_model_path())
    from small_llama import ensure_small_llama

    return ensure_small_llama()


def weight_file_mb(directory: Path) -> float:
    """Megabytes (1e6 bytes) of the safetensors files of a model directory."""
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e6


# ---------------------------------------------------------------------------------------- running


def config_fields(method: str, point: Point) -> dict | None:
    """The config fields of ``point`` with the calibration fields its config class takes; None when
    ``method`` is not registered in this weightkit."""
    from weightkit.registry import lookup, names

    if method not in names("compress"):
        return None
    available = {f.name for f in dataclasses.fields(lookup("compress", method).config_cls)}
    calibration = {"calib_samples": CALIB_TEXTS, "calib_max_length": MAX_LEN}
    return {**point.fields, **{k: v for k, v in calibration.items() if k in available}}


def worker(model: str, method: str, fields: str, calib_file: str, out: str) -> dict:
    """One weightkit job in its own process: ``compress_checkpoint`` as ``weightkit compress`` runs it."""
    from weightkit.compress import compress_checkpoint
    from weightkit.registry import config_from_dict

    config = config_from_dict("compress", {"method": method, **json.loads(fields)})
    model_dir = _model_dir(model)
    with measure() as m:
        compress_checkpoint(model_dir, out, config, data=read_jsonl(calib_file), progress=False, device="cpu")
    return {"quant_seconds": m["seconds"], "peak_rss_mib": m["peak_rss_mib"]}


def _run_weightkit(model: str, method: str, fields: dict, calib_file: Path, out: Path) -> dict:
    argv = ["--worker", model, method, json.dumps(fields), str(calib_file), str(out)]
    start = time.perf_counter()
    run = run_json([sys.executable, __file__, *argv])
    return {**run, "wall_seconds": time.perf_counter() - start, "size_mb": weight_file_mb(out)}


def _run_peer(model: str, peer: Peer, point: Point, calib_file: Path, out: Path) -> dict:
    start = time.perf_counter()
    if peer.tool == "llm-compressor":
        run = run_peer_quant(
            _model_dir(model),
            calib_file,
            point.fields["method"],
            out,
            num_samples=CALIB_TEXTS,
            max_seq_len=MAX_LEN,
            extra_args=["--ignore", *PEER_IGNORE[model]],
        )
        size = weight_file_mb(out)
    else:
        # HQQ takes Python regexes, full-match; weightkit's "re:" prefix dropped.
        ignore = [p.removeprefix("re:") for p in PEER_IGNORE[model]]
        cmd = [str(HQQ_VENV / "bin" / "python"), str(BENCH_DIR / "hqq_peer.py"), str(_model_dir(model))]
        grid = ["--bits", str(point.fields["bits"]), "--group-size", str(point.fields["group_size"])]
        run = run_json([*cmd, str(out), *grid, "--ignore", *ignore])
        size = run["stored_bytes"] / 1e6
    return {
        "quant_seconds": run["quant_seconds"],
        "peak_rss_mib": run["peak_rss_mib"],
        "wall_seconds": time.perf_counter() - start,
        "size_mb": size,
        "versions": run["versions"],
    }


# ---------------------------------------------------------------------------------------- scoring


class Scorer:
    """Scores outputs of one model with weightkit.eval: the fp32 reference is loaded once."""

    def __init__(self, model: str, held_out: list[str]):
        from weightkit.eval.embedding import sentence_embeddings
        from weightkit.models import load_model

        self.model, self.held_out = model, held_out
        reference, self.tokenizer, _ = load_model(_model_dir(model))
        if model == "minilm":
            # embedding_fidelity's two halves, so the reference embeddings are computed once, not per output.
            self.reference = sentence_embeddings(reference, self.tokenizer, held_out, max_length=MAX_LEN)
        self.fp32 = self.score(reference)  # minilm: 1 up to float rounding

    def score(self, net) -> float:
        from weightkit.eval import perplexity
        from weightkit.eval.embedding import mean_cosine, sentence_embeddings

        if self.model == "minilm":
            embeddings = sentence_embeddings(net, self.tokenizer, self.held_out, max_length=MAX_LEN)
            return mean_cosine(self.reference, embeddings)
        return perplexity(net, self.tokenizer, self.held_out, max_length=MAX_LEN)

    def change(self, quality: float) -> float:
        """Relative loss vs fp32 (0 = lossless, larger = worse)."""
        return 1 - quality if self.model == "minilm" else quality / self.fp32 - 1

    def load_and_score(self, out: Path, loader: str) -> float:
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        from weightkit import load

        if loader == "weightkit.load":
            net = load(out)
        else:
            cls = AutoModel if self.model == "minilm" else AutoModelForCausalLM
            net = cls.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
        return self.score(net)


# How each tool's output is loaded for scoring (see the module docstring for why NVFP4 is read by weightkit).
LOADERS = {
    "weightkit": "weightkit.load",
    "llmc-fp8": "transformers",
    "llmc-nvfp4": "weightkit.load",
    "hqq": "transformers (dequantized float32 checkpoint)",
}


# ----------------------------------------------------------------------------------------- targets


def better(model: str, a: float, b: float) -> bool:
    """Whether quality ``a`` is at least as good as ``b`` on ``model``."""
    return a >= b if model == "minilm" else a <= b


def interpolate(curve: list[tuple[float, float]], size: float) -> float | None:
    """Quality of a size-sorted ``(size, quality)`` curve at ``size``, linear between its two neighbours;
    None outside the curve's sizes."""
    for (s0, q0), (s1, q1) in zip(curve, curve[1:], strict=False):
        if s0 <= size <= s1:
            return q0 if s1 == s0 else q0 + (q1 - q0) * (size - s0) / (s1 - s0)
    return None


def low_bit_target(records: list[dict], contenders=("gwq", "vptq"), baselines=("rtn", "gptq")) -> dict:
    """At <= 3 bits, does each of ``contenders`` beat each of ``baselines`` at equal size?

    A contender's point is compared with the baseline's curve (its points sorted by size) interpolated
    linearly at the contender's size. Smaller than every baseline point: it beats the baseline if it is
    at least as good as the baseline's smallest point (smaller and no worse). Larger than every point: not
    judged.
    """
    comparisons, missing = [], []
    for name in contenders:
        points = [r for r in records if r["method"] == name and "quality" in r and r["bits"] <= 3]
        if not points:
            missing.append(name)
        for r in points:
            for base in baselines:
                curve = sorted(
                    (b["size_mb"], b["quality"]) for b in records
                    if b["method"] == base and b["model"] == r["model"] and "quality" in b
                )  # fmt: skip
                if not curve:
                    continue
                at_size = interpolate(curve, r["size_mb"])
                if at_size is not None:
                    how, beats = "interpolated", better(r["model"], r["quality"], at_size)
                elif r["size_mb"] < curve[0][0]:
                    at_size, how = curve[0][1], "smaller than every point: vs the smallest"
                    beats = better(r["model"], r["quality"], at_size)
                else:
                    how, beats = "larger than every point: not judged", None
                comparisons.append({
                    "model": r["model"], "method": name, "label": r["label"], "size_mb": r["size_mb"],
                    "quality": r["quality"], "baseline": base, "baseline_quality_at_size": at_size,
                    "how": how, "beats": beats,
                })  # fmt: skip
    judged = [c["beats"] for c in comparisons if c["beats"] is not None]
    return {
        "target": "at <= 3 bits GWQ and VPTQ beat RTN and GPTQ at equal size",
        "method": "each GWQ/VPTQ point of <= 3 nominal bits against the RTN and GPTQ size-vs-quality curves "
        "interpolated linearly in size (MB) at its size",
        "comparisons": comparisons,
        "not_measured": [
            f"{m}: "
            + (
                "not registered in this weightkit"
                if any("skipped" in r for r in records if r["method"] == m)
                else "no result at <= 3 bits"
            )
            for m in missing
        ],  # fmt: skip
        "met": None if missing or not judged else all(judged),
    }


def fp8_target(records: list[dict], tolerance: float = 0.001) -> dict:
    """FP8 within 0.1% of fp32 quality, per model (quality_change <= tolerance)."""
    rows = [
        {"model": r["model"], "label": r["label"], "quality_change": r["quality_change"]}
        for r in records
        if r["method"] == "fp8" and r["tool"] == "weightkit" and "quality" in r
    ]
    return {
        "target": "FP8 within 0.1% of the fp32 quality",
        "method": "relative quality change vs fp32 (minilm: 1 - cosine; small-llama: perplexity ratio - 1) "
        f"at most {tolerance}",
        "per_model": [{**row, "met": row["quality_change"] <= tolerance} for row in rows],
        "met": all(row["quality_change"] <= tolerance for row in rows) if rows else None,
    }


# ------------------------------------------------------------------------------------------- chart


def plot(records: list[dict], references: dict, path: Path) -> None:
    """Size vs quality per model: every method and peer a line, fp32's quality a dotted line (its size is in
    the legend: drawn as a point, it would squeeze every curve into the left of the chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(references)
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        ref = references[model]
        lines: dict[str, list[dict]] = {}
        for r in records:
            if r["model"] == model and "quality" in r:
                lines.setdefault(r["series"], []).append(r)
        for series, rows in lines.items():
            rows.sort(key=lambda r: r["size_mb"])
            style = "--" if rows[0]["tool"] != "weightkit" else "-"
            sizes, qualities = [r["size_mb"] for r in rows], [r["quality"] for r in rows]
            ax.plot(sizes, qualities, style, marker="o", label=series)
            for r in rows:
                ax.annotate(r["label"], (r["size_mb"], r["quality"]), fontsize=6, alpha=0.7)
        label = f"fp32 ({ref['size_mb']:.1f} MB)"
        ax.axhline(ref["quality"], color="black", linestyle=":", linewidth=1, label=label)
        ax.set_xlabel("size of the weight files, MB")
        if model == "minilm":
            ax.set_ylabel("mean cosine to fp32 embeddings (higher is better)")
            title = f"{model}: size vs quality"
        else:
            ax.set_ylabel("held-out perplexity (lower is better)")
            # A method far off (post-training ternary) would flatten every other curve: the axis stops at
            # 5% above fp32 and the title names what lies beyond.
            top = ref["quality"] * 1.05
            ax.set_ylim(top=top)
            beyond = sorted({f"{r['series']} {r['label']} ({r['quality']:.0f})"
                             for rows in lines.values() for r in rows if r["quality"] > top})  # fmt: skip
            title = f"{model}: size vs quality" + ("\noff the chart: " + ", ".join(beyond) if beyond else "")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main


def _peer_comparison(record: dict, peer: dict) -> dict:
    return {
        "peer": peer["method"],
        "ratio_quant_seconds": round(record["quant_seconds"] / peer["quant_seconds"], 3),
        "ratio_wall_seconds": round(record["wall_seconds"] / peer["wall_seconds"], 3),
        "ratio_peak_rss_mib": round(record["peak_rss_mib"] / peer["peak_rss_mib"], 3),
        "ratio_size_mb": round(record["size_mb"] / peer["size_mb"], 4),
        "quality_delta": record["quality"] - peer["quality"],
    }


def attach_peer_comparisons(records: list[dict]) -> None:
    """``vs_peer`` on each weightkit record whose scheme a peer ran too (same model and label)."""
    for name, peer in PEERS.items():
        for p in (r for r in records if r["method"] == name and "quality" in r):
            for r in records:
                same = r["method"] == peer.same_scheme_as and (r["model"], r["label"]) == (
                    p["model"],
                    p["label"],
                )
                if same and "quality" in r:
                    r["vs_peer"] = _peer_comparison(r, p)


class Results:
    """What has been measured so far, across the models' threads; written out after every record, so a
    run that is stopped keeps what it measured."""

    def __init__(self, models: list[str], write: bool, kept: list[dict] = ()):
        self.models, self.write = models, write
        self.references: dict[str, dict] = {}
        self.records: list[dict] = list(kept)
        self.start, self.load_at_start = time.perf_counter(), os.getloadavg()
        self.lock = threading.Lock()

    def add(self, record: dict | None = None, *, reference: tuple[str, dict] | None = None) -> None:
        with self.lock:
            if reference:
                self.references[reference[0]] = reference[1]
            if record:
                self.records.append(record)
            if self.write and self.references:
                attach_peer_comparisons(self.records)
                run = {
                    "load_average_at_start": self.load_at_start,
                    "seconds_so_far": round(time.perf_counter() - self.start, 1),
                    "models_side_by_side": len(self.models),
                }
                references = {m: self.references[m] for m in self.models if m in self.references}
                write(references, self.records, run)


def run_model(model: str, methods: list[str], peers: list[str], tmp: Path, results: Results) -> None:
    calib, held_out = _texts(model)
    calib_file = write_jsonl(calib, tmp / f"{model}-calib.jsonl")
    scorer = Scorer(model, held_out)
    reference = {"size_mb": weight_file_mb(_model_dir(model)), "quality": scorer.fp32,
                 "calib_texts": len(calib), "eval_texts": len(held_out)}  # fmt: skip
    print(model, "fp32", reference, flush=True)
    results.add(reference=(model, reference))

    def attempt(record: dict, job, out: Path, loader: str) -> None:
        """Run ``job`` and score its output; a job that fails is recorded with its error, not fatal."""
        try:
            record.update(job())
        except RuntimeError as err:
            print(model, record["method"], record["label"], "FAILED", err, flush=True)
            results.add({**record, "failed": str(err)[-2000:]})
            return
        record["quality"] = scorer.load_and_score(out, loader)
        record["quality_change"] = scorer.change(record["quality"])
        record["evaluated_by"] = loader
        record["size_vs_fp32"] = record["size_mb"] / reference["size_mb"]
        record["load_average_after"] = os.getloadavg()[0]
        shown = {k: record[k] for k in ("size_mb", "quality", "quant_seconds", "peak_rss_mib")}
        print(model, record["method"], record["label"], shown, flush=True)
        results.add(record)

    for name in methods:
        method = METHODS[name]
        for point in method.points:
            base = {"model": model, "method": name, "tool": "weightkit", "series": method.label,
                    "label": point.label, "bits": point.bits}  # fmt: skip
            fields = config_fields(name, point)
            if fields is None:
                message = f"method {name!r} is not registered in this weightkit: skipped"
                print(model, message, flush=True)
                results.add({**base, "skipped": message})
                break
            out = tmp / f"{model}-{name}-{point.label.replace(' ', '_')}"
            job = partial(_run_weightkit, model, name, fields, calib_file, out)
            attempt({**base, "config": fields}, job, out, LOADERS["weightkit"])
    for name in peers:
        peer = PEERS[name]
        for point in peer.points:
            out = tmp / f"{model}-{name}-{point.label.replace(' ', '_')}"
            base = {"model": model, "method": name, "tool": peer.tool, "series": peer.label,
                    "label": point.label, "bits": point.bits, "config": point.fields}  # fmt: skip
            attempt(base, partial(_run_peer, model, peer, point, calib_file, out), out, LOADERS[name])


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; write no JSON or PNG")
    parser.add_argument("--plot-only", action="store_true", help="redraw compress.png from compress.json")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep compress.json's records of the methods and peers not run now (rerun some methods only)",
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.plot_only:
        result = json.loads((RESULTS_DIR / "compress.json").read_text())
        plot(result["records"], result["references"], RESULTS_DIR / "compress.png")
        return
    methods = args.methods.split(",")
    peers = [] if args.no_peers else args.peers.split(",")
    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"unknown method or peer {unknown}; known: {', '.join([*METHODS, *PEERS])}")
    if any(PEERS[p].tool == "llm-compressor" for p in peers):
        ensure_peer_env()
    if "hqq" in peers:
        subprocess.run(["bash", str(PEER_ENV_SCRIPT), "hqq"], check=True)
    models = args.models.split(",")
    kept = []
    if args.update:  # the same models' other records, measured by an earlier run (its commit is in the JSON)
        earlier = json.loads((RESULTS_DIR / "compress.json").read_text())["records"]
        kept = [r for r in earlier if r["model"] in models and r["method"] not in {*methods, *peers}]
    results = Results(models, write=not args.no_write, kept=kept)
    # One torch thread per model's scoring thread: two threads sharing one intra-op pool on 2 busy cores
    # slowed scoring several-fold. The jobs are processes with their own threads.
    import torch

    torch.set_num_threads(1)
    # The models run side by side (one thread each, every job still a process of its own): on a shared
    # machine this halves the wall time; each job's time and memory are its own process's either way.
    with (
        tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp,
        ThreadPoolExecutor(len(models)) as pool,
    ):
        for future in [pool.submit(run_model, m, methods, peers, Path(tmp), results) for m in models]:
            future.result()
    print(json.dumps([low_bit_target(results.records), fp8_target(results.records)], indent=1))


def write(references: dict, records: list[dict], run: dict) -> None:
    """``bench/results/compress.json`` and ``compress.png`` from what has been measured so far."""
    hqq_freeze = HQQ_VENV / "peer-freeze.txt"
    versions = {
        "llm-compressor venv": {
            k: v for k, v in peer_versions().items() if k in ("llmcompressor", "compressed-tensors", "torch")
        },
        "hqq venv": dict(
            line.lower().split("==") for line in hqq_freeze.read_text().splitlines()
            if line.lower().startswith(("hqq==", "torch==", "transformers=="))
        ) if hqq_freeze.exists() else None,
    }  # fmt: skip
    path = write_result(
        "compress",
        {
            "what": DESCRIPTION,
            "weightkit_commit": weightkit_source_state(),
            "peer_versions": versions,
            **run,
            "methods": {name: m.label for name, m in METHODS.items()},
            "references": references,
            "records": records,
            "targets": [low_bit_target(records), fp8_target(records)],
        },
    )
    plot(records, references, RESULTS_DIR / "compress.png")
    print(f"wrote {path} and {RESULTS_DIR / 'compress.png'}", flush=True)


if __name__ == "__main__":
    main()
