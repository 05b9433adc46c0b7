"""Compression benchmark: every weightkit compression method (quantization, low rank, sharing, pruning) as a
size-vs-quality curve, with peers.

    flock /tmp/weightkit-bench.lock .venv/bin/python bench/compress.py    # ~44 min on 2 busy cores (quant.)
    .venv/bin/python bench/compress.py --models minilm --methods rtn,fp8 --no-peers --no-write   # a look
    .venv/bin/python bench/compress.py --methods svd,bitstack,wanda --no-peers --update   # add methods only

Writes ``bench/results/compress.json`` (its ``what`` block defines every field) and
``bench/results/compress.png`` (size vs quality, one column per model, every method a line; the top row
whole, the bottom row near fp32).

Every method of :data:`METHODS` at several settings (bit widths, kept ratios, blocks, sparsities) on the
bundled MiniLM and the small Llama (``bench/small_llama.py``). A method not registered in this weightkit is
skipped with a message (and a ``skipped`` record), and so is a setting its config refuses (with the
config's message), so adding a method is one line in :data:`METHODS`. Each compression runs in a fresh
process (its peak RSS is its own), through what ``weightkit compress`` runs (``compress_checkpoint``: read,
compress, write; a chain's stages as a list, skipped with a message if ``compress_checkpoint`` takes one
config only); its output is then loaded with ``weightkit.load`` and scored here:
- MiniLM: mean cosine of sentence embeddings to fp32 on 128 held-out stdlib docstrings (higher is better);
- small Llama: perplexity on 64 passages of three plays it never saw (lower is better).
BitStack is compressed once and loaded at several budgets (``weightkit.load(path, budget_mb=N)``): the
sizes SVD's outputs reached, so the two curves can be compared at the same sizes. A pruned output keeps
its zeros (same file size as fp32); its measured sparsity is recorded and the chart places it at its
idealised sparse size (the nonzeros' bytes). The two models run side by side, one thread each in this
process (scoring with one torch thread each).

Peers, on the same models and scored by the same evaluation code (:data:`PEERS`):
- llm-compressor 0.14 (``bench/.venv-peer``): FP8 E4M3 per-channel weights (its FP8_DYNAMIC weights
  alone, no activation quantization: weightkit's ``fp8`` default) and NVFP4A16 (weightkit's ``fp4``);
  their compressed-tensors checkpoints are loaded by transformers (FP8) or by ``weightkit.load`` (NVFP4,
  which transformers 5.25 decompresses to bfloat16 weights that then fail in a float32 model); and its
  SparseGPTModifier and WandaPruningModifier at 50% and 2:4 (dense checkpoints with zeros, loaded by
  transformers);
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
    """One setting of a method: its config fields, its nominal bits per quantized weight (None for a
    structural method: low rank, sharing, pruning), a short label. A chain's fields are ``{"stages": [stage
    config dicts]}``, run in order by one ``compress_checkpoint`` call."""

    bits: float | None
    fields: dict
    label: str


@dataclasses.dataclass(frozen=True)
class Method:
    label: str
    points: tuple[Point, ...]
    # One artifact loaded at several memory budgets (BitStack): its one point is compressed once, then
    # loaded and scored at each budget of :func:`bitstack_budgets`.
    loads_at_budgets: bool = False


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


def sparsity_label(sparsity: float | str) -> str:
    """``50%`` for an unstructured fraction, the pattern itself (``2:4``) for N:M."""
    return sparsity if isinstance(sparsity, str) else f"{sparsity:.0%}"


def prune_points(*sparsities: float | str, **fields) -> tuple[Point, ...]:
    """One point per sparsity: a fraction of zeros (unstructured) or an N:M pattern."""
    return tuple(Point(None, {"sparsity": s, **fields}, sparsity_label(s)) for s in sparsities)


# SVD's kept fractions; BitStack is loaded at the sizes SVD reached (or, without SVD results, at the sizes
# these fractions nominally give), so the two curves meet on the same sizes.
SVD_RATIOS = (0.3, 0.5, 0.7, 0.9)

# Registry name -> the settings benchmarked. Calibration fields (calib_samples, calib_max_length) are added
# to every config class that has them, so a calibrated method needs nothing more here. A name not
# registered, or a setting its config refuses, is recorded as skipped with the reason.
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
    # Low rank: the fraction of the selected layers' parameters kept.
    "svd": Method("SVD", tuple(Point(None, {"ratio": r}, f"ratio {r}") for r in SVD_RATIOS)),
    # WeLore at its default threshold (0.175, the reference's for LLaMA-2 7B), and solved for a share of
    # the selected matrices' total rank removed.
    "welore": Method(
        "WeLore",
        (
            Point(None, {}, "threshold 0.175"),
            *(Point(None, {"rank_reduction": r}, f"rank -{r:.0%}") for r in (0.3, 0.5)),
        ),
    ),
    "bitstack": Method("BitStack", (Point(None, {}, "one artifact"),), loads_at_budgets=True),
    # Sharing: both models' layer counts (MiniLM 6, the small Llama 4) divide into 2 blocks; 2 and 3 atoms
    # are fewer than either model's layers. FoldGPT drops 1 block, then shares nothing or in pairs.
    "recursive": Method(
        "Relaxed Recursive",
        (
            Point(None, {"blocks": 2}, "K 2"),
            *(Point(None, {"blocks": 2, "relax_rank": r}, f"K 2 r {r}") for r in (16, 64)),
        ),
    ),
    "dictionary": Method(
        "dictionary sharing", tuple(Point(None, {"atoms": a}, f"{a} atoms") for a in (2, 3))
    ),
    "foldgpt": Method(
        "FoldGPT", tuple(Point(None, {"drop": 1, "share": k}, f"drop 1 share {k}") for k in (1, 2))
    ),
    # Pruning: zeros in the weights, the file's size unchanged (the chart places them at their idealised
    # sparse size, see "chart_size_mb" in DESCRIPTION).
    "magnitude": Method("magnitude", prune_points(0.5, "2:4")),
    "random": Method("random", prune_points(0.5, "2:4", seed=0)),
    "wanda": Method("Wanda", prune_points(0.5, "2:4", "4:8")),
    "sparsegpt": Method("SparseGPT", prune_points(0.5, "2:4", "4:8")),
    # A chain (llm-compressor users' 2:4 + W4): not a registry name, its stages are.
    "sparsegpt+gptq": Method(
        "SparseGPT 2:4 + GPTQ",
        (
            Point(
                4,
                {"stages": [{"method": "sparsegpt", "sparsity": "2:4"}, {"method": "gptq", **INT_GRIDS[4]}]},
                "2:4 + W4 g128",
            ),
        ),
    ),  # fmt: skip
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
    # One-shot pruning alone (no quantization), the same calibration texts.
    **{
        f"llmc-{name}": Peer(
            f"llm-compressor {label}",
            "llm-compressor",
            tuple(Point(None, {"method": name, "sparsity": str(s)}, sparsity_label(s)) for s in (0.5, "2:4")),
            name,
        )
        for name, label in (("sparsegpt", "SparseGPT"), ("wanda", "Wanda"))
    },
}

# What weightkit leaves in full precision on these two models (its default ignore list), for the peers. A
# pattern, not "lm_head": llm-compressor's pruning modifiers name the layer "lm_head." and would prune it.
PEER_IGNORE = {"minilm": ["re:.*pooler.*"], "small-llama": ["re:.*lm_head.*"]}

DESCRIPTION = {
    "records": "one per model x method x setting: 'tool' is weightkit, llm-compressor or hqq; a method not "
    "registered in this weightkit, or a setting its config refuses, has a 'skipped' message instead of "
    "numbers, a job that failed a 'failed' one. BitStack is compressed once and has one record per budget it "
    "was loaded at ('budget_mb'), all with that one compression's time and memory",
    "size_mb": "bytes of the output's *.safetensors files / 1e6 (everything the model needs, embeddings, "
    "lm_head and norms included, which stay in full precision); HQQ: the bytes HQQ stores (bit-packed "
    "codes, float16 scales and zeros, every other tensor as in the float32 checkpoint)",
    "chart_size_mb": "the size the chart places a record at: size_mb, except for a pruned checkpoint, whose "
    "file keeps every zero (size_mb is the dense size): there, the idealised sparse size, size_mb minus the "
    "bytes of the zeros of the pruned linears (every non-zero kept at its dtype, no index or bitmask "
    "counted: a real sparse format stores more, e.g. 2:4 metadata). BitStack: the budget it was loaded at",
    "sparsity": "pruning, weightkit and llm-compressor alike: the fraction of exact zeros in the weights of "
    "the linears weightkit selects by default (every nn.Linear but lm_head, embeddings, norms and pooler), "
    "counted on the loaded model; zero_bytes: their bytes",
    "budget_mb": "BitStack: the memory budget (MB, 1e6 bytes) passed to weightkit.load(path, budget_mb=...); "
    "its size_mb is that budget (the whole artifact's record, loaded without a budget, has its files' size)",
    "quality": "minilm: mean cosine of sentence embeddings (mean-pooled, L2-normalised) to the fp32 "
    f"model's on {EVAL_TEXTS['minilm']} held-out stdlib docstrings (higher is better); small-llama: "
    f"perplexity on {EVAL_TEXTS['small-llama']} held-out passages (spread over three plays it never saw), "
    f"at most {MAX_LEN} tokens each (lower is better)",
    "quality_change": "relative change vs fp32 in the direction of worse: minilm 1 - cosine, small-llama "
    "perplexity / fp32 perplexity - 1 (0 = lossless)",
    "evaluated_by": "how the output was loaded for scoring; the scoring code (weightkit.eval) is the same",
    "quant_seconds": "weightkit: compress_checkpoint (reading the checkpoint, calibrating, compressing, "
    "writing; a chain's stages in one call); llm-compressor: its oneshot call (model loaded, nothing saved; "
    "for pruning SparseGPTModifier / WandaPruningModifier alone); HQQ: its quantize + dequantize loop over "
    "the linears (model loaded, nothing saved)",
    "wall_seconds": "the job's whole process, start to exit (imports, loading, saving included)",
    "peak_rss_mib": "VmHWM of the job's own fresh process (scoring happens afterwards in another process)",
    "calibration": f"{CALIB_TEXTS} texts of at most {MAX_LEN} tokens for every calibrated method (and for "
    "llm-compressor's oneshot, which its weight-only FP8/NVFP4 schemes do not need): stdlib docstrings "
    "for minilm, passages of the training plays for small-llama; llm-compressor's pruning: the same texts, "
    "its defaults otherwise (SparseGPT: dampening 0.01 x mean diag(H), blocks of 128 columns)",
    "vs_peer": "against the peer run of the same scheme (same label): ratios weightkit / peer of time "
    "(quant_seconds, wall_seconds) and peak RSS (below 1: weightkit faster / leaner), size ratio, and "
    "quality_delta = weightkit's quality - the peer's (minilm: above 0 is better; small-llama: below 0). "
    "Pruning: SparseGPT / Wanda vs llm-compressor's modifier of the same name and sparsity",
    "weightkit_commit": "top level: this run's weightkit source; per record: the source the record was "
    "measured with (a run with --update keeps the earlier records, and their commits)",
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


def _with_calibration(method: str, fields: dict) -> dict:
    """``fields`` with the calibration fields the config class of registered ``method`` takes."""
    from weightkit.registry import lookup

    available = {f.name for f in dataclasses.fields(lookup("compress", method).config_cls)}
    calibration = {"calib_samples": CALIB_TEXTS, "calib_max_length": MAX_LEN}
    return {**fields, **{k: v for k, v in calibration.items() if k in available}}


def _stages(method: str, point: Point) -> list[dict]:
    """The stage configs (as dicts with their "method") ``point`` runs: its chain, or itself."""
    return point.fields.get("stages") or [{"method": method, **point.fields}]


def unregistered(method: str) -> list[str]:
    """The methods ``method``'s points run (a chain's stages) that this weightkit does not register."""
    from weightkit.registry import names

    needed = dict.fromkeys(s["method"] for p in METHODS[method].points for s in _stages(method, p))
    return [name for name in needed if name not in names("compress")]


def config_fields(method: str, point: Point) -> dict | str:
    """The config fields of ``point`` (of a registered method) with the calibration fields its config class
    takes (a chain: each stage's), validated by the config; or the config's refusal, as a message."""
    from weightkit.errors import WeightkitError
    from weightkit.registry import config_from_dict

    stages = [_with_calibration(s["method"], s) for s in _stages(method, point)]
    for stage in stages:
        try:
            config_from_dict("compress", stage)
        except WeightkitError as err:
            return f"the {stage['method']} config refuses {point.fields}: {err}"
    if "stages" in point.fields:
        return {"stages": stages}
    return {k: v for k, v in stages[0].items() if k != "method"}


def worker(model: str, method: str, fields: str, calib_file: str, out: str) -> dict:
    """One weightkit job in its own process: ``compress_checkpoint`` as ``weightkit compress`` runs it.

    A chain (``{"stages": [...]}``) is passed as the list of its stages' configs; a ``compress_checkpoint``
    that takes one config only refuses the list ("list is not a registered method config"), and the job
    is then reported as skipped with that error rather than failed (any error of a chain is: its message
    is in the record either way).
    """
    from weightkit.compress import compress_checkpoint
    from weightkit.errors import WeightkitError
    from weightkit.registry import config_from_dict

    spec = json.loads(fields)
    chain = "stages" in spec
    if chain:
        config = [config_from_dict("compress", stage) for stage in spec["stages"]]
    else:
        config = config_from_dict("compress", {"method": method, **spec})
    model_dir = _model_dir(model)
    try:
        with measure() as m:
            compress_checkpoint(
                model_dir, out, config, data=read_jsonl(calib_file), progress=False, device="cpu"
            )
    except (WeightkitError, TypeError, AttributeError) as err:
        if not chain:
            raise
        return {
            "skipped": f"compress_checkpoint refused the list of stage configs (no chains here?): {err!r}"
        }
    return {"quant_seconds": m["seconds"], "peak_rss_mib": m["peak_rss_mib"]}


def _run_weightkit(model: str, method: str, fields: dict, calib_file: Path, out: Path) -> dict:
    argv = ["--worker", model, method, json.dumps(fields), str(calib_file), str(out)]
    start = time.perf_counter()
    run = run_json([sys.executable, __file__, *argv])
    if "skipped" in run:
        return run
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
            extra_args=[
                "--ignore",
                *PEER_IGNORE[model],
                *(["--sparsity", point.fields["sparsity"]] if "sparsity" in point.fields else []),
            ],
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

    def load(self, out: Path, loader: str, budget_mb: float | None = None):
        """The output at ``out`` loaded as ``loader`` says (BitStack: at ``budget_mb``)."""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        from weightkit import load

        if loader == "weightkit.load":
            return load(out) if budget_mb is None else load(out, budget_mb=budget_mb)
        cls = AutoModel if self.model == "minilm" else AutoModelForCausalLM
        return cls.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()


def linear_sparsity(net) -> dict:
    """Exact zeros in the weights of the linears weightkit selects by default (not lm_head, embeddings,
    norms, pooler): their fraction and bytes."""
    from weightkit.select import select_modules

    weights = [m.weight for m in select_modules(net).values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {
        "sparsity": zeros / sum(w.numel() for w in weights),
        "zero_bytes": sum(int((w == 0).sum()) * w.element_size() for w in weights),
    }


# How each tool's output is loaded for scoring (see the module docstring for why NVFP4 is read by weightkit).
LOADERS = {
    "weightkit": "weightkit.load",
    "llmc-fp8": "transformers",
    "llmc-nvfp4": "weightkit.load",
    "hqq": "transformers (dequantized float32 checkpoint)",
    "llmc-sparsegpt": "transformers",
    "llmc-wanda": "transformers",
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


def chart_size(record: dict) -> float:
    """Where the chart and the size comparisons place ``record`` (see "chart_size_mb" in DESCRIPTION;
    records of runs before it existed have size_mb only, which is the same for them)."""
    return record.get("chart_size_mb", record["size_mb"])


def _curve(records: list[dict], model: str, method: str) -> list[tuple[float, float]]:
    """``(chart size, quality)`` of ``method``'s scored records on ``model``, sorted by size."""
    rows = (r for r in records if r["model"] == model and r["method"] == method and "quality" in r)
    return sorted((chart_size(r), r["quality"]) for r in rows)


def bitstack_target(records: list[dict]) -> dict:
    """BitStack's curve at or above SVD's at every budget, per model: each point of either curve against
    the other curve interpolated linearly at its size; a point outside the other curve's sizes is not
    judged."""
    comparisons = []
    models = sorted({r["model"] for r in records if r["method"] in ("bitstack", "svd")})
    for model in models:
        bitstack, svd = _curve(records, model, "bitstack"), _curve(records, model, "svd")
        for point_of, size, quality in [*(("svd", *p) for p in svd), *(("bitstack", *p) for p in bitstack)]:
            # the other curve at this point's size: BitStack's against SVD's point, SVD's against BitStack's
            at = interpolate(bitstack if point_of == "svd" else svd, size)
            pair = {"svd": quality, "bitstack": at} if point_of == "svd" else {"svd": at, "bitstack": quality}
            met = None if at is None else better(model, pair["bitstack"], pair["svd"])
            comparisons.append({"model": model, "size_mb": size, "point_of": point_of, **pair, "met": met})
    judged = [c["met"] for c in comparisons if c["met"] is not None]
    return {
        "target": "BitStack's curve at or above SVD's at every budget",
        "method": "at every SVD point, BitStack's curve (its budgets' qualities, sorted by size) "
        "interpolated linearly in MB at that size, and at every BitStack point SVD's curve likewise; 'at or "
        "above' = at least as good (minilm: cosine >=, small-llama: perplexity <=); points outside the "
        "other curve's sizes are not judged",
        "comparisons": sorted(comparisons, key=lambda c: (c["model"], c["size_mb"])),
        "met": all(judged) if judged else None,
        "why_not_measured": None if judged else "no BitStack and SVD results at overlapping sizes",
    }


# Wanda's official README (github.com/locuslab/wanda; the paper is arXiv 2306.11695, SparseGPT arXiv
# 2301.00774): WikiText perplexity of LLaMA-2-7B, dense and pruned to 50% (unstructured) without retraining.
PAPER_PRUNING = {
    "source": "github.com/locuslab/wanda README, LLaMA-2 results table (Wanda, arXiv 2306.11695): LLaMA-2-7B "
    "WikiText perplexity",
    "dense": 5.12,
    "sparsegpt": 6.51,
    "wanda": 6.42,
}


def pruning_gap_target(records: list[dict]) -> dict:
    """Wanda and SparseGPT at 50% within the papers' reported gap to dense, as a relative perplexity
    increase on the small Llama."""
    rows, missing = [], []
    for method in ("wanda", "sparsegpt"):
        paper_gap = PAPER_PRUNING[method] / PAPER_PRUNING["dense"] - 1
        found = [r for r in records if r["model"] == "small-llama" and r["method"] == method
                 and r["label"] == "50%" and "quality" in r]  # fmt: skip
        if not found:
            missing.append(method)
        for r in found:
            gap = r["quality_change"]
            rows.append({"method": method, "perplexity": r["quality"], "gap": gap, "paper_gap": paper_gap,
                         "met": gap <= paper_gap})  # fmt: skip
    # Magnitude pruning at 50%, not judged: when it meets the papers' gap too, the criterion does not tell
    # a good pruner from a naive one on this model.
    magnitude = [r["quality_change"] for r in records if (r["model"], r["method"], r["label"]) ==
                 ("small-llama", "magnitude", "50%") and "quality" in r]  # fmt: skip
    return {
        "target": "Wanda and SparseGPT at 50% within the papers' reported gap to dense",
        "method": "small-llama's perplexity at 50% unstructured sparsity / its fp32 perplexity - 1, at most "
        "the paper's (pruned / dense - 1 on LLaMA-2-7B: SparseGPT "
        f"{PAPER_PRUNING['sparsegpt']} / {PAPER_PRUNING['dense']}, Wanda {PAPER_PRUNING['wanda']} / "
        f"{PAPER_PRUNING['dense']}). Indicative only: the small Llama has ~1000x fewer parameters than "
        "LLaMA-2-7B, and smaller models lose more to pruning (the papers' own curves), so a miss here need "
        "not mean a worse implementation; MiniLM is not judged (the papers report no cosine)",
        "source": PAPER_PRUNING["source"],
        "per_method": rows,
        "magnitude_gap_not_judged": magnitude[0] if magnitude else None,
        "met": None if missing or not rows else all(r["met"] for r in rows),
        "why_not_measured": f"no small-llama 50% result for {', '.join(missing)}" if missing else None,
    }


def sparsegpt_time_target(records: list[dict], factor: float = 0.5) -> dict:
    """weightkit's SparseGPT quant_seconds at most ``factor`` x llm-compressor's, same model, data and
    sparsity."""
    rows = []
    for r in (r for r in records if r["method"] == "sparsegpt" and "quant_seconds" in r):
        peer = next((p for p in records if p["method"] == "llmc-sparsegpt" and "quant_seconds" in p
                     and (p["model"], p["label"]) == (r["model"], r["label"])), None)  # fmt: skip
        if peer is not None:
            ratio = r["quant_seconds"] / peer["quant_seconds"]
            rows.append({"model": r["model"], "label": r["label"], "weightkit_seconds": r["quant_seconds"],
                         "llm_compressor_seconds": peer["quant_seconds"], "ratio": ratio,
                         "met": ratio <= factor})  # fmt: skip
    return {
        "target": f"weightkit's SparseGPT time <= {factor} x llm-compressor's on the same model and data",
        "method": "quant_seconds, weightkit / llm-compressor, per model and sparsity both ran (weightkit's "
        "includes reading the checkpoint and writing the output, llm-compressor's oneshot does not: the "
        "comparison is tilted against weightkit)",
        "per_run": rows,
        "met": all(r["met"] for r in rows) if rows else None,
        "why_not_measured": None if rows else "no pair of weightkit and llm-compressor SparseGPT runs",
    }


def all_targets(records: list[dict]) -> list[dict]:
    return [
        low_bit_target(records),
        fp8_target(records),
        bitstack_target(records),
        pruning_gap_target(records),
        sparsegpt_time_target(records),
    ]


# ------------------------------------------------------------------------------------------- chart


def plot(records: list[dict], references: dict, path: Path) -> None:
    """Size vs quality per model (columns), every method and peer a line: the top row whole (the Llama's
    perplexity on a log axis, where pruning and sharing lie far off), the bottom row near fp32 (the
    quantization methods). fp32's quality is a dotted line (its size is in the legend: drawn as a point, it
    would squeeze every curve into the left of the chart). Sizes are ``chart_size_mb``: pruned checkpoints
    at their idealised sparse size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    models = list(references)
    scored = [r for r in records if "quality" in r and r["model"] in references]
    palette = plt.get_cmap("tab20").colors + plt.get_cmap("tab20b").colors  # 40: one colour per series
    colour = {
        name: palette[i % len(palette)] for i, name in enumerate(dict.fromkeys(r["series"] for r in scored))
    }
    fig, axes = plt.subplots(2, len(models), figsize=(8 * len(models), 11), squeeze=False)
    for column, model in enumerate(models):
        ref = references[model]
        lines: dict[str, list[dict]] = {}
        for r in scored:
            if r["model"] == model:
                lines.setdefault(r["series"], []).append(r)
        for row, ax in enumerate(axes[:, column]):
            for series, rows in lines.items():
                rows.sort(key=chart_size)
                peer, structural = rows[0]["tool"] != "weightkit", rows[0]["bits"] is None
                sizes, qualities = [chart_size(r) for r in rows], [r["quality"] for r in rows]
                marker = "^" if peer else "s" if structural else "o"
                style = dict(color=colour[series], label=series, marker=marker, markersize=4)
                ax.plot(sizes, qualities, "--" if peer else "-", **style)
                for r in rows:
                    ax.annotate(r["label"], (chart_size(r), r["quality"]), fontsize=5, alpha=0.6)
            ax.axhline(
                ref["quality"],
                color="black",
                linestyle=":",
                linewidth=1,
                label=f"fp32 ({ref['size_mb']:.1f} MB)",
            )
            ax.set_xlabel("size, MB: the weight files (pruned: idealised sparse size, nonzeros only)")
            ax.grid(alpha=0.3)
            if model == "minilm":
                ax.set_ylabel("mean cosine to fp32 embeddings (higher is better)")
                if row == 1:
                    ax.set_ylim(bottom=0.9, top=1.005)
            else:
                ax.set_ylabel("held-out perplexity (lower is better)")
                if row == 0:
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 3, 5, 7)))
                    ax.yaxis.set_major_formatter(ScalarFormatter())
                    ax.yaxis.set_minor_formatter(NullFormatter())
                else:
                    ax.set_ylim(bottom=ref["quality"] * 0.98, top=ref["quality"] * 1.05)
            where = "every method" if row == 0 else "near fp32"
            ax.set_title(f"{model}: size vs quality, {where}", fontsize=10)
        axes[0, column].legend(fontsize=6, ncol=2)
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
    run that is stopped keeps what it measured. ``kept`` and ``kept_references``: an earlier run's records
    and fp32 references that this run does not redo (``--update``)."""

    def __init__(self, models: list[str], write: bool, kept: list[dict] = (), kept_references: dict = None):
        self.models, self.write = models, write
        self.references: dict[str, dict] = dict(kept_references or {})
        self.records: list[dict] = list(kept)
        self.commit = weightkit_source_state()
        self.start, self.load_at_start = time.perf_counter(), os.getloadavg()
        self.lock = threading.Lock()

    def add(self, record: dict | None = None, *, reference: tuple[str, dict] | None = None) -> None:
        with self.lock:
            if reference:
                self.references[reference[0]] = reference[1]
            if record:
                self.records.append({**record, "weightkit_commit": self.commit})
            if self.write and all(m in self.references for m in self.models):
                attach_peer_comparisons(self.records)
                run = {
                    "load_average_at_start": self.load_at_start,
                    "seconds_so_far": round(time.perf_counter() - self.start, 1),
                    "models_side_by_side": len(self.models),
                }
                references = {m: self.references[m] for m in MODELS if m in self.references}
                write(references, self.records, run)


def bitstack_budgets(model: str, records: list[dict], reference_mb: float) -> tuple[list[float], str]:
    """The budgets (MB) BitStack is loaded at on ``model``: the sizes SVD's outputs reached (or without SVD
    results, the sizes :data:`SVD_RATIOS` nominally give: every other tensor whole, the selected linears at
    the ratio), and the sizes of RTN's outputs (2 to 8 bits), where the paper compares BitStack with
    quantization; and where they came from."""

    def sizes(method: str) -> list[float]:
        ours = [r for r in records if (r["model"], r["method"]) == (model, method) and r.get("tool") != "hqq"]
        return [r["size_mb"] for r in ours if "quality" in r]

    svd, rtn = sizes("svd"), sizes("rtn")
    if not svd:
        linear_mb = selected_linear_mb(_model_dir(model))
        svd = [reference_mb - (1 - ratio) * linear_mb for ratio in SVD_RATIOS]
    source = "the sizes of SVD's outputs" if sizes("svd") else "nominal: SVD_RATIOS of the linears"
    return sorted({*svd, *rtn}), f"{source}, and of RTN's outputs"


def selected_linear_mb(directory: Path) -> float:
    """MB of the 2-D weights weightkit selects by default (not embeddings, lm_head, norms, pooler), from the
    safetensors headers alone."""
    import re

    from safetensors import safe_open

    skipped = re.compile(r"embed|lm_head|norm|pooler")
    element = {"F32": 4, "F16": 2, "BF16": 2}
    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                part = f.get_slice(name)
                shape = part.get_shape()
                if name.endswith(".weight") and len(shape) == 2 and not skipped.search(name):
                    total += shape[0] * shape[1] * element[part.get_dtype()]
    return total / 1e6


def run_model(model: str, methods: list[str], peers: list[str], tmp: Path, results: Results) -> None:
    calib, held_out = _texts(model)
    calib_file = write_jsonl(calib, tmp / f"{model}-calib.jsonl")
    scorer = Scorer(model, held_out)
    reference = {"size_mb": weight_file_mb(_model_dir(model)), "quality": scorer.fp32,
                 "calib_texts": len(calib), "eval_texts": len(held_out)}  # fmt: skip
    print(model, "fp32", reference, flush=True)
    results.add(reference=(model, reference))

    def skip(record: dict, message: str) -> None:
        print(model, record["method"], record["label"], message, flush=True)
        results.add({**record, "skipped": message})

    def run(record: dict, job) -> bool:
        """Run ``job`` into ``record``; a job that fails or skips is recorded as such, not fatal."""
        try:
            record.update(job())
        except RuntimeError as err:
            print(model, record["method"], record["label"], "FAILED", err, flush=True)
            results.add({**record, "failed": str(err)[-2000:]})
            return False
        if "skipped" in record:
            skip(record, record.pop("skipped"))
            return False
        return True

    def score(record: dict, out: Path, loader: str, *, budget_mb: float | None = None, pruned: bool = False):
        """Load and score ``out`` into ``record`` (pruned: with its measured sparsity), and record it."""
        try:
            net = scorer.load(out, loader, budget_mb)
            record["quality"] = scorer.score(net)
            record["chart_size_mb"] = record["size_mb"]
            if pruned:
                record.update(linear_sparsity(net))
                record["chart_size_mb"] = record["size_mb"] - record["zero_bytes"] / 1e6
        except Exception as err:  # noqa: BLE001 - a new format that does not load is a result, not a crash
            print(model, record["method"], record["label"], "SCORING FAILED", repr(err), flush=True)
            results.add({**record, "failed": f"loading or scoring the output: {err!r}"[-2000:]})
            return
        record["quality_change"] = scorer.change(record["quality"])
        record["evaluated_by"] = loader if budget_mb is None else f"{loader}(budget_mb={budget_mb:.2f})"
        record["size_vs_fp32"] = record["size_mb"] / reference["size_mb"]
        record["load_average_after"] = os.getloadavg()[0]
        shown = {
            k: record[k] for k in ("size_mb", "chart_size_mb", "quality", "quant_seconds", "peak_rss_mib")
        }
        print(model, record["method"], record["label"], shown, flush=True)
        results.add(record)

    for name in methods:
        method = METHODS[name]
        missing = unregistered(name)
        if missing:
            base = {"model": model, "method": name, "tool": "weightkit", "series": method.label, "label": "–",
                    "bits": None}  # fmt: skip
            skip(base, f"method {', '.join(map(repr, missing))} is not registered in this weightkit: skipped")
            continue
        for point in method.points:
            base = {"model": model, "method": name, "tool": "weightkit", "series": method.label,
                    "label": point.label, "bits": point.bits}  # fmt: skip
            fields = config_fields(name, point)
            if isinstance(fields, str):
                skip(base, fields)
                continue
            out = tmp / f"{model}-{name}-{point.label.replace(' ', '_').replace(':', '-')}"
            record = {**base, "config": fields}
            if not run(record, partial(_run_weightkit, model, name, fields, calib_file, out)):
                continue
            if not method.loads_at_budgets:
                score(record, out, LOADERS["weightkit"], pruned="sparsity" in fields)
                continue
            budgets, source = bitstack_budgets(model, results.records, reference["size_mb"])
            score({**record, "label": "whole artifact"}, out, LOADERS["weightkit"])
            for budget in budgets:
                at_budget = {
                    **record,
                    "label": f"{budget:.1f} MB",
                    "budget_mb": budget,
                    "budgets_from": source,
                }
                score({**at_budget, "size_mb": budget}, out, LOADERS["weightkit"], budget_mb=budget)
    for name in peers:
        peer = PEERS[name]
        for point in peer.points:
            out = tmp / f"{model}-{name}-{point.label.replace(' ', '_').replace(':', '-')}"
            record = {"model": model, "method": name, "tool": peer.tool, "series": peer.label,
                      "label": point.label, "bits": point.bits, "config": point.fields}  # fmt: skip
            if run(record, partial(_run_peer, model, peer, point, calib_file, out)):
                score(record, out, LOADERS[name], pruned="sparsity" in point.fields)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; '' for peers only")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; write no JSON or PNG")
    parser.add_argument("--plot-only", action="store_true", help="redraw compress.png from compress.json")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep compress.json's records of every method, peer and model not run now, and its fp32 "
        "references of the models not run (rerun or add some methods only)",
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.plot_only:
        result = json.loads((RESULTS_DIR / "compress.json").read_text())
        plot(result["records"], result["references"], RESULTS_DIR / "compress.png")
        return
    requested = {m for m in args.methods.split(",") if m}
    peers = [] if args.no_peers else [p for p in args.peers.split(",") if p]
    unknown = sorted(requested - set(METHODS)) + sorted(set(peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"unknown method or peer {unknown}; known: {', '.join([*METHODS, *PEERS])}")
    methods = [m for m in METHODS if m in requested]  # METHODS' order: BitStack after SVD, at its sizes
    if any(PEERS[p].tool == "llm-compressor" for p in peers):
        ensure_peer_env()
    if "hqq" in peers:
        subprocess.run(["bash", str(PEER_ENV_SCRIPT), "hqq"], check=True)
    models = args.models.split(",")
    kept, kept_references = [], {}
    if args.update:  # measured by an earlier run (its commit is in the JSON)
        earlier = json.loads((RESULTS_DIR / "compress.json").read_text())
        kept = [{"weightkit_commit": earlier["weightkit_commit"], **r} for r in earlier["records"]
                if r["model"] not in models or r["method"] not in {*methods, *peers}]  # fmt: skip
        kept_references = {m: ref for m, ref in earlier["references"].items() if m not in models}
    results = Results(models, write=not args.no_write, kept=kept, kept_references=kept_references)
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
    print(json.dumps(all_targets(results.records), indent=1))


def _record_order(record: dict) -> tuple[int, int]:
    """Model, then weightkit's methods in :data:`METHODS` order, then the peers in :data:`PEERS` order."""
    names = [*METHODS, *PEERS]
    method = names.index(record["method"]) if record["method"] in names else len(names)
    return (MODELS.index(record["model"]), method)


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
            "peers": {name: p.label for name, p in PEERS.items()},
            "references": references,
            "records": sorted(records, key=_record_order),  # stable: a method's points in run order
            "targets": all_targets(records),
        },
    )
    plot(records, references, RESULTS_DIR / "compress.png")
    print(f"wrote {path} and {RESULTS_DIR / 'compress.png'}", flush=True)


if __name__ == "__main__":
    main()
