"""The README tables, generated from the benchmark results in ``bench/results/*.json`` and from the test
suite's case lists (never typed by hand).

A table lives in ``README.md`` or ``bench/README.md`` between two markers::

    <!-- table: adapt-peer -->
    ...generated...
    <!-- /table -->

``python bench/tables.py`` rewrites every marked table from the JSON files; ``--check`` changes nothing
and exits 1 if a table differs from what the JSON gives (the test suite runs it, so a README cannot drift
from its results). Each renderer shows the unfavourable figure beside the favourable one.
"""

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "bench" / "README.md")
_MARKED = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _ratio(ours: float, theirs: float, digits: int = 3) -> str:
    """``ours vs theirs: ratio``, the ratio bold when it favours weightkit (< 1)."""
    ratio = ours / theirs
    text = f"{ratio:.{digits}f}"
    return f"**{text}**" if ratio < 1 else text


# -- adapt ------------------------------------------------------------------------------------------------

_TASK_LABELS = {
    "bbc": "bbc (MiniLM)",
    "docstrings": "docstrings (Llama)",
    "gpt2": "docstrings (GPT-2, Conv1D)",
}


def _metric(value: float, metric: str) -> str:
    return f"{value:.4f}" if metric == "accuracy" else f"{value:.2f}"


def _peer_rows(result: dict, run: str) -> list[list[str]]:
    rows = []
    for task, data in result["tasks"].items():
        peer = data["peer_comparison"]
        ours, theirs = peer["weightkit"], peer["peft"]
        inturn = peer["interleaved"]["step_seconds_median"]
        same_metric = ours["final_metric"] == theirs["final_metric"]
        rows.append([
            _TASK_LABELS.get(task, task),
            run,
            f"{inturn['weightkit'] * 1e3:.1f} vs {inturn['peft'] * 1e3:.1f} ms: "
            + _ratio(inturn["weightkit"], inturn["peft"]),
            f"{ours['step_seconds_median'] * 1e3:.1f} vs {theirs['step_seconds_median'] * 1e3:.1f} ms: "
            + _ratio(ours["step_seconds_median"], theirs["step_seconds_median"]),
            f"{ours['peak_rss_mib']:.0f} vs {theirs['peak_rss_mib']:.0f} MiB: "
            + _ratio(ours["peak_rss_mib"], theirs["peak_rss_mib"]),
            _metric(ours["final_metric"], ours["metric"]) + (" both" if same_metric else
                f" vs {_metric(theirs['final_metric'], theirs['metric'])}"),
            f"{peer['max_abs_train_loss_diff']:g}",
        ])  # fmt: skip
    return rows


def adapt_peer() -> str:
    """weightkit LoRA vs PEFT LoRA: step time in turn in one process and as separate processes, RSS."""
    runs = [
        ("adapt", "main run, 3 reps"),
        ("adapt_peer_7reps", "peers only, 7 reps"),
        ("adapt_gpt2", "Conv1D job, 3 reps"),
    ]
    rows = [row for name, label in runs for row in _peer_rows(_load(name), label)]
    rows.sort(key=lambda row: row[0])
    header = [
        "task", "run", "step time, one process in turn (weightkit vs PEFT)",
        "step time, separate processes (medians)", "peak RSS (medians)", "final metric",
        "max train loss diff",
    ]  # fmt: skip
    return _table(header, rows)


def adapt_summary() -> str:
    """The compact form of :func:`adapt_peer` for the top README: ratios only, every run."""
    rows = []
    for name, label in [("adapt", "3 reps"), ("adapt_peer_7reps", "7 reps"), ("adapt_gpt2", "3 reps")]:
        for task, data in _load(name)["tasks"].items():
            peer = data["peer_comparison"]
            ours, theirs = peer["weightkit"], peer["peft"]
            inturn = peer["interleaved"]["step_seconds_median"]
            rows.append([
                f"{_TASK_LABELS.get(task, task)}, {label}",
                _ratio(inturn["weightkit"], inturn["peft"]),
                _ratio(ours["step_seconds_median"], theirs["step_seconds_median"]),
                _ratio(ours["peak_rss_mib"], theirs["peak_rss_mib"]),
            ])  # fmt: skip
    header = ["task, run", "step time in one process (in turn)", "step time, separate processes", "peak RSS"]
    return _table(header, rows)


def _method_label(method: dict) -> str:
    config = next(iter(method["config"].values()))
    name = method["method"]
    if "dim" in config:
        return f"{name} (d {config['dim']})"
    if name in ("LoRA-SB", "LoRA-XS", "Bone", "SVFit") and "rank" in config:
        return f"{name} (r {config['rank']})"
    return name


def adapt_methods() -> str:
    """Every weightkit adapter method on both tasks: metric after a quarter of the steps and at the end."""
    result = _load("adapt")
    tasks = result["tasks"]
    bbc, llama = (tasks["bbc"]["methods"], tasks["docstrings"]["methods"])
    early = {}
    for task, data in tasks.items():
        steps = sorted({int(s) for m in data["methods"] for s in m["eval_curve"]})
        early[task] = str(steps[1])  # the first evaluation after step 0: a quarter of the run
    lora = {task: next(m for m in tasks[task]["methods"] if m["method"] == "LoRA") for task in tasks}
    rows = []
    for b, d in zip(bbc, llama, strict=True):
        trained = [m["parameters_with_gradient"] for m in (b, d)]
        same = trained == [
            lora["bbc"]["parameters_with_gradient"],
            lora["docstrings"]["parameters_with_gradient"],
        ]
        rows.append([
            _method_label(b),
            f"{b['eval_curve'][early['bbc']]['metric']:.3f}",
            f"{b['final_metric']:.3f}",
            f"{b['mean_train_loss']:.3f}",
            f"{d['eval_curve'][early['docstrings']]['metric']:.1f}",
            f"{d['final_metric']:.1f}",
            f"{d['mean_train_loss']:.3f}",
            "same as LoRA" if same and b["method"] != "LoRA" else f"{trained[0]:,} / {trained[1]:,}",
        ])  # fmt: skip
    header = [
        "method", f"bbc acc @{early['bbc']}", f"bbc acc @{tasks['bbc']['settings']['steps']}",
        "bbc mean loss",
        f"Llama ppl @{early['docstrings']}", f"Llama ppl @{tasks['docstrings']['settings']['steps']}",
        "Llama mean loss", "trained numbers (bbc / Llama)",
    ]  # fmt: skip
    return _table(header, rows)


def _versus(ours: dict, theirs: dict, key: str, fmt: str = ".1f") -> str:
    """``ours[key] vs theirs[key]: ratio`` (two-digit ratio, bold when it favours weightkit)."""
    return f"{ours[key]:{fmt}} vs {theirs[key]:{fmt}}: " + _ratio(ours[key], theirs[key], 2)


# -- demo -------------------------------------------------------------------------------------------------


def demo() -> str:
    """What ``weightkit demo`` printed on this machine (``bench/demo.py``)."""
    result = _load("demo")
    rows = [
        [
            row["method"] if row["method"].startswith("fp32") else row["method"].upper(),
            "–" if row["method"].startswith("fp32") else f"{row['seconds']:.1f} s",
            f"{row['size_bytes'] / 1e6:.1f} MB",
            f"{row['embedding_fidelity']:.4f}",
        ]
        for row in result["results"]
    ]
    return _table(["method", "time", "size", "embedding cosine (held-out)"], rows)


# -- merge ------------------------------------------------------------------------------------------------

_MERGE_METHODS = {
    "task_arithmetic": "task arithmetic",
    "ties": "TIES",
    "dare_ties": "DARE-TIES",
    "linear": "linear",
    "slerp": "SLERP",
    "model_stock": "Model Stock",
    "breadcrumbs_ties": "Breadcrumbs-TIES",
    "della": "DELLA",
}
_MERGEKIT = ("mergekit_f32_compute", "mergekit_bf16_compute")


def _merge_sizes() -> list[tuple[str, dict]]:
    """``(size, results)`` of the main merge run (both sizes), then of the other methods' run."""
    return [item for name in ("merge", "merge_methods") for item in _load(name)["sizes"].items()]


def _merge_rows(size: str, data: dict) -> list[list[str]]:
    rows = []
    for r in data["results"]:
        ours = r["weightkit"]
        peers = [r[config] for config in _MERGEKIT]
        best = r[r["work_ratio_vs"]]  # the faster of mergekit's two configurations, for the work ratio
        fastest_e2e = r[r["e2e_ratio_vs"]]
        eager = r.get("eager")
        rows.append([
            size,
            _MERGE_METHODS.get(r["method"], r["method"]),
            f"{ours['seconds']:.1f} vs {peers[0]['seconds']:.1f} / {peers[1]['seconds']:.1f}: "
            + _ratio(ours["seconds"], fastest_e2e["seconds"], 2),
            f"{ours['work_seconds']:.1f} vs {peers[0]['work_seconds']:.1f} / {peers[1]['work_seconds']:.1f}: "
            + _ratio(ours["work_seconds"], best["work_seconds"], 2),
            "–" if eager is None else _versus(ours, eager, "work_seconds"),
            _versus(ours, r[r["rss_ratio_vs"]], "peak_rss_mib", ".0f"),
            f"{r['max_abs_diff']:.2g}" if "task_vector_stats" not in r else "random masks",
        ])  # fmt: skip
    return rows


def merge_peer() -> str:
    """weightkit merge vs mergekit (both compute configurations) and an eager-torch loop, both sizes.

    The ratio is always against the faster mergekit configuration (the less favourable one for
    weightkit); end to end is each command's own process, work is timed inside it.
    """
    rows = [row for size, data in _merge_sizes() for row in _merge_rows(size, data)]
    header = [
        "size", "method", "end to end, s: weightkit vs mergekit f32 / bf16 compute",
        "work in process, s: same", "eager loop work, s: ratio", "peak RSS MiB: weightkit vs mergekit",
        "max abs diff vs mergekit f32",
    ]  # fmt: skip
    return _table(header, rows)


def merge_summary() -> str:
    """The compact form of :func:`merge_peer` for the top README: ratios against the faster mergekit."""
    rows = []
    for size, data in _merge_sizes():
        for r in data["results"]:
            rows.append([
                f"{_MERGE_METHODS.get(r['method'], r['method'])}, {size}",
                _ratio(r["weightkit"]["seconds"], r[r["e2e_ratio_vs"]]["seconds"], 2),
                _ratio(r["weightkit"]["work_seconds"], r[r["work_ratio_vs"]]["work_seconds"], 2),
                _ratio(r["weightkit"]["peak_rss_mib"], r[r["rss_ratio_vs"]]["peak_rss_mib"], 2),
            ])  # fmt: skip
    header = ["method, size", "time end to end", "time without start-up (work)", "peak RSS"]
    return _table(header, rows)


def merge_startup() -> str:
    """Start-up: bare ``import torch``, ``weightkit merge --dry-run`` and ``mergekit-yaml --help``."""
    rows = []
    for size, data in _load("merge")["sizes"].items():
        s = data["startup"]
        rows.append([
            size,
            f"{s['import_torch']['seconds']:.2f}",
            f"{s['weightkit_dry_run']['seconds']:.2f} (+{s['dry_run_minus_import_torch_seconds']:.2f})",
            f"{s['mergekit_help']['seconds']:.2f}",
        ])  # fmt: skip
    header = [
        "checkpoints",
        "python -c 'import torch', s",
        "weightkit merge --dry-run, s",
        "mergekit-yaml --help, s",
    ]
    return _table(header, rows)


# -- quant ------------------------------------------------------------------------------------------------

_QUALITY = {"minilm": ("cosine", 4), "small-llama": ("ppl", 2)}


def _quality(value: float, model: str) -> str:
    return f"{value:.{_QUALITY[model][1]}f}"


def quant_peer() -> str:
    """weightkit vs llm-compressor per model, bit width and method: quality, time and memory.

    Time is given twice: the quantization call (weightkit's includes reading and writing the checkpoint,
    llm-compressor's does not) and each job's whole process; ratios are weightkit / llm-compressor.
    """
    result = _load("quant")
    rows = []
    for row in result["results"]:
        model = row["model"]
        for method in ("rtn", "gptq", "awq"):
            if f"{method}/weightkit" not in row:
                continue
            ours, theirs = row[f"{method}/weightkit"], row[f"{method}/llm-compressor"]
            metric = _QUALITY[model][0] + (
                f" (fp {row['fp_perplexity']:.2f})" if "fp_perplexity" in row else ""
            )
            rows.append([
                model,
                f"W{row['bits']} g{row['group_size']}",
                method.upper(),
                f"{metric}: {_quality(ours['quality'], model)} vs {_quality(theirs['quality'], model)}",
                _versus(ours, theirs, "quant_seconds"),
                _versus(ours, theirs, "wall_seconds_with_load_and_save"),
                _versus(ours, theirs, "peak_rss_mib", ".0f"),
            ])  # fmt: skip
    header = [
        "model", "scheme", "method", "quality: weightkit vs llm-compressor",
        "quantization call, s", "whole process, s", "peak RSS, MiB",
    ]  # fmt: skip
    return _table(header, rows)


def quant_memory() -> str:
    """GPTQ's peak memory with 128 and 512 calibration texts, both tools."""
    rows = []
    for entry in _load("quant")["gptq_memory"]:
        ours, theirs = entry["weightkit"], entry["llm-compressor"]
        rows.append([
            entry["model"],
            f"{entry['calib_texts']} ({entry['calib_tokens']:,} tokens)",
            f"{ours['peak_rss_mib']:.0f} ({ours['peak_rss_mib'] - ours['rss_before_mib']:.0f})",
            f"{theirs['peak_rss_mib']:.0f} ({theirs['peak_rss_mib'] - theirs['rss_before_mib']:.0f})",
            f"{ours['quant_seconds']:.1f} vs {theirs['quant_seconds']:.1f}",
        ])  # fmt: skip
    header = [
        "model", "calibration texts", "weightkit peak RSS, MiB (above start)",
        "llm-compressor peak RSS, MiB (above loaded model)", "quantization call, s (weightkit vs peer)",
    ]  # fmt: skip
    return _table(header, rows)


# -- compress ---------------------------------------------------------------------------------------------

_COMPRESS_QUALITY = {"minilm": ("cosine", 4), "small-llama": ("ppl", 2)}


def _compress_quality(record: dict) -> str:
    """The quality and its relative loss vs fp32, e.g. ``0.9505 (-4.95%)`` or ``69.12 (+0.52%)``."""
    digits = _COMPRESS_QUALITY[record["model"]][1]
    change = record["quality_change"] * (-1 if record["model"] == "minilm" else 1)
    return f"{record['quality']:.{digits}f} ({change:+.2%})"


def _why_no_numbers(record: dict) -> str:
    """Why a compress record has no quality: not registered, a setting its config refused, or a failure."""
    if "skipped" not in record:
        return "failed (see the JSON)"
    return "not registered: skipped" if "not registered" in record["skipped"] else "skipped (see the JSON)"


def _compress_setting(record: dict) -> str:
    """The setting's label, with the measured fraction of zeros of a pruned output."""
    return record["label"] + (f" (zeros {record['sparsity']:.1%})" if "sparsity" in record else "")


def _compress_size(record: dict) -> str:
    """The size and its ratio to fp32, and where the chart places it when that differs (a pruned output at
    its idealised sparse size)."""
    text = f"{record['size_mb']:.1f} ({record['size_vs_fp32']:.2f})"
    chart = record.get("chart_size_mb", record["size_mb"])
    return text + (f"; nonzeros {chart:.1f}" if abs(chart - record["size_mb"]) > 0.05 else "")


def compress() -> str:
    """``bench/compress.py``: every method and peer per model and setting: size, quality, time, memory, and
    the ratios against the peer run of the same scheme (bold: weightkit faster / leaner)."""
    result = _load("compress")
    rows = []
    for model, ref in result["references"].items():
        metric = _COMPRESS_QUALITY[model][0]
        rows.append([model, "fp32", "–", f"{ref['size_mb']:.1f}", f"{metric} {ref['quality']:.4g}",
                     "–", "–", "–", "–"])  # fmt: skip
        for r in (r for r in result["records"] if r["model"] == model):
            name = r["series"] if r["tool"] == "weightkit" else f"{r['series']} (peer)"
            if "quality" not in r:
                rows.append([model, name, r["label"], "–", _why_no_numbers(r), "–", "–", "–", "–"])
                continue
            peer = r.get("vs_peer")
            versus = "–" if peer is None else (
                f"{peer['peer']}: time {_plain_or_bold(peer['ratio_quant_seconds'], True)}"
                f" (process {_plain_or_bold(peer['ratio_wall_seconds'], True)})"
                f", RSS {_plain_or_bold(peer['ratio_peak_rss_mib'], True)}"
                f", size {peer['ratio_size_mb']:.3f}, quality {peer['quality_delta']:+.4f}"
            )  # fmt: skip
            rows.append([
                model, name, _compress_setting(r), _compress_size(r),
                _compress_quality(r), f"{r['quant_seconds']:.1f}", f"{r['wall_seconds']:.1f}",
                f"{r['peak_rss_mib']:.0f}", versus,
            ])  # fmt: skip
    header = [
        "model", "method", "setting", "size, MB (vs fp32)", "quality (vs fp32)", "compression call, s",
        "whole process, s", "peak RSS, MiB", "vs the peer of the same scheme",
    ]  # fmt: skip
    return _table(header, rows)


def _met(value: bool | None) -> str:
    return "not judged" if value is None else "yes" if value else "**no**"


def compress_targets() -> str:
    """The issue's targets for ``bench/compress.py``, each with what was measured ("not measured", with the
    reason, when a method has no result yet)."""
    targets = {t["target"]: t for t in _load("compress")["targets"]}
    low_bits, fp8, bitstack, gap, timing = targets.values()
    rows = []
    for c in low_bits["comparisons"]:
        digits = _COMPRESS_QUALITY[c["model"]][1]
        at_size = f"{c['baseline'].upper()} {c['baseline_quality_at_size']:.{digits}f}"
        rows.append([
            f"{low_bits['target']}: {c['method'].upper()} {c['label']}, {c['model']}, {c['size_mb']:.1f} MB",
            f"{c['quality']:.{digits}f} vs {at_size} ({c['how']})",
            _met(c["beats"]),
        ])  # fmt: skip
    for missing in low_bits["not_measured"]:
        rows.append([low_bits["target"], missing, "not measured"])
    for m in fp8["per_model"]:
        measured = f"quality change vs fp32 {m['quality_change']:+.3%} (0: lossless; below 0: better)"
        rows.append([f"{fp8['target']}: {m['model']} ({m['label']})", measured, _met(m["met"])])
    for c in bitstack["comparisons"]:
        digits = _COMPRESS_QUALITY[c["model"]][1]
        shown = {
            k: "outside its sizes" if c[k] is None else f"{c[k]:.{digits}f}" for k in ("bitstack", "svd")
        }
        rows.append([
            f"{bitstack['target']}: {c['model']}, {c['size_mb']:.1f} MB ({c['point_of']} point)",
            f"BitStack {shown['bitstack']} vs SVD {shown['svd']}",
            _met(c["met"]),
        ])  # fmt: skip
    for m in gap["per_method"]:
        rows.append([
            f"{gap['target']}: {m['method']}, small-llama (indicative: a ~6M-parameter model vs LLaMA-2-7B)",
            f"perplexity +{m['gap']:.1%} vs fp32; paper +{m['paper_gap']:.1%}",
            _met(m["met"]),
        ])  # fmt: skip
    if gap.get("magnitude_gap_not_judged") is not None:
        rows.append([
            f"{gap['target']}: magnitude (for reference: a naive pruner under the same criterion)",
            f"perplexity +{gap['magnitude_gap_not_judged']:.1%} vs fp32",
            "not judged",
        ])  # fmt: skip
    for r in timing["per_run"]:
        rows.append([
            f"{timing['target']}: {r['model']} ({r['label']})",
            f"{r['weightkit_seconds']:.1f} vs {r['llm_compressor_seconds']:.1f} s: {r['ratio']:.2f}x",
            _met(r["met"]),
        ])  # fmt: skip
    for target in (bitstack, gap, timing):
        if target["why_not_measured"]:
            rows.append([target["target"], target["why_not_measured"], "not measured"])
    return _table(["target", "measured", "met"], rows)


# -- train ------------------------------------------------------------------------------------------------

_TRAIN_ROWS = ("adamw", "galore", "galore-per-layer", "q-galore", "galore-svd-free", "galore-torch", "mezo",
               "inference", "theory", "galore-lr10x", "adamw-lr2.5x")  # fmt: skip
_WEIGHTKIT_TRAIN = (
    "galore",
    "galore-per-layer",
    "q-galore",
    "galore-svd-free",
    "mezo",
    "theory",
    "galore-lr10x",
)


def _plain_or_bold(ratio: float | None, bold: bool) -> str:
    """A two-digit ratio, bold when it is a weightkit row's and below 1."""
    if ratio is None:
        return "–"
    text = f"{ratio:.2f}"
    return f"**{text}**" if bold and ratio < 1 else text


def train() -> str:
    """The training benchmark (``bench/train.py``): optimizer state, step time, peak RSS and held-out loss of
    every optimizer, each against AdamW and against galore-torch (bold: a weightkit ratio below 1)."""
    result = _load("train")
    ft, pre, step = result["fine_tune"], result.get("pretrain", {}), result["step_seconds"]
    memory = result["memory"][f"batch_{result['settings']['batch_size']}"]
    theory, mib = result["theory"], 2**20
    adamw_state, peer_state = ft["adamw"]["state_bytes"]["held"], ft["galore-torch"]["state_bytes"]["held"]
    labels = {**result["labels"], "theory": f"GaLore's count (rank {result['settings']['rank']})"}
    rows = []
    for name in _TRAIN_ROWS:
        ours, label = name in _WEIGHTKIT_TRAIN, labels[name]
        run = ft.get(name)
        if name == "theory":
            held, views, extra = theory["galore"], None, 0
        elif run is not None and run["state_bytes"] is not None:
            held, views = run["state_bytes"]["held"], run["state_bytes"]["views"]
            extra = run.get("shared_dct_basis_bytes", 0)
        else:
            held = views = extra = None
        if held is None:
            state = ratios = "–"
        else:
            state = f"{held / mib:.1f}" + (f" ({views / mib:.1f})" if views not in (None, held) else "")
            state += f" + {extra / mib:.1f} shared bases" if extra else ""
            ratios = " / ".join([
                "–" if name == "adamw" else _plain_or_bold((held + extra) / adamw_state, ours),
                "–" if name == "galore-torch" else _plain_or_bold((held + extra) / peer_state, ours),
            ])  # fmt: skip
        if name in step:
            vs_peer = "–" if name in ("galore-torch", "mezo", "inference") else _plain_or_bold(
                step[name] / step["galore-torch"], ours)  # fmt: skip
            vs_adamw = "–" if name == "adamw" else _plain_or_bold(step[name] / step["adamw"], ours)
            timing = f"{step[name] * 1e3:.0f}: {vs_adamw} / {vs_peer}"
        else:
            timing = "–"
        if name in memory:
            m = memory[name]
            rss = f"{m['peak_rss_mib']:.0f} (+{m['peak_rss_mib'] - m['rss_before_train_mib']:.0f})"
            if name != "adamw":
                rss += ": " + _plain_or_bold(m["peak_rss_mib"] / memory["adamw"]["peak_rss_mib"], ours)
            if name == "mezo":
                rss += f"; vs inference {m['peak_rss_mib'] / memory['inference']['peak_rss_mib']:.2f}"
        else:
            rss = "–"
        losses = []
        for runs, digits in ((ft, 4), (pre, 3)):
            if name in runs:
                delta = runs[name]["final_eval_loss"] - runs["adamw"]["final_eval_loss"]
                losses.append(f"{runs[name]['final_eval_loss']:.{digits}f}"
                              + ("" if name == "adamw" else f" ({delta:+.{digits}f})"))  # fmt: skip
            else:
                losses.append("–")
        rows.append([label, state, ratios, timing, rss, *losses])
    s = result["settings"]
    header = [
        "optimizer", "optimizer state, MiB (as views)", "state vs AdamW / vs galore-torch",
        "step, ms: vs AdamW / vs galore-torch", "peak RSS, MiB (+ in training): vs AdamW",
        f"held-out loss, fine-tuning {s['fine_tune_steps']} steps (vs AdamW)",
        f"held-out loss, pre-training {s['pretrain_steps']} steps (vs AdamW)",
    ]  # fmt: skip
    return _table(header, rows)


def train_targets() -> str:
    """The issue's targets for the training benchmark, each with what was measured."""
    result = _load("train")
    rows = []
    for t in result["targets"]:
        value = t["value"]
        if "held" in value and "theory" in value:
            held, views, theory = (value[k] / 2**20 for k in ("held", "views", "theory"))
            shown = f"{held:.2f} MiB held ({views:.2f} as views) vs {theory:.2f}"
        elif "galore_torch" in value:
            shown = f"{value['held'] / 2**20:.2f} vs {value['galore_torch'] / 2**20:.2f} MiB"
        elif "saved_mib" in value:
            shown = f"{value['saved_mib']:.1f} MiB saved vs {value['gradient_mib']:.1f} MiB of gradient"
        elif "gap" in value:
            shown = f"{value['gap']:+.4f} vs {value['paper_gap_60m']:.4f} nats"
        elif "vs_adamw" in value:
            shown = f"{value['ratio']:.2f}x (vs AdamW {value['vs_adamw']:.2f}x)"
        else:
            shown = f"{value['ratio']:.2f}x"
        rows.append([t["target"], shown, "yes" if t["met"] else "**no**"])
    return _table(["target", "measured", "met"], rows)


# -- suite case lists -------------------------------------------------------------------------------------


# -- inspect ------------------------------------------------------------------------------------------------

_INSPECT_MODELS = {
    "minilm": "MiniLM (22.7M)",
    "small-llama": "small Llama (trained)",
    "llama-134m": "Llama 134M",
}


def _seconds(ours: float, theirs: float) -> str:
    return f"{ours:.1f} vs {theirs:.1f} s: {_ratio(ours, theirs, 2)}"


def inspect() -> str:
    """``bench/inspect_bench.py``: weightkit inspect against weightwatcher's analyze(), per model and thread
    count: time (metrics in process, the same in a fresh process, the whole command with its report), peak
    RSS and how far apart the two tools' alphas are per layer."""
    result = _load("inspect")
    rows = []
    for run in result["runs"]:
        ours, theirs, alpha = run["weightkit"], run["weightwatcher"], run["alpha"]
        rss, cli_rss = ours["inspect_peak_rss_mib"], ours["cli_peak_rss_mib"]
        peer_rss = theirs["peak_rss_mib"]
        rows.append([
            _INSPECT_MODELS.get(run["model"], run["model"]),
            str(run["threads"]),
            f"{alpha['layers_compared']} / {theirs['layers']}",
            _seconds(ours["inspect_seconds"], theirs["analyze_seconds"]),
            _seconds(ours["inspect_process_seconds"], theirs["process_seconds"]),
            _seconds(ours["cli_process_seconds"], theirs["process_seconds"]),
            f"{rss:.0f} / {cli_rss:.0f} vs {peer_rss:.0f} MiB: "
            f"{_ratio(rss, peer_rss, 2)} / {_ratio(cli_rss, peer_rss, 2)}",
            f"{alpha['median_abs_diff']:.1e} / {alpha['worst_abs_diff']:.1e}",
        ])  # fmt: skip
    header = [
        "model", "threads", "layers (both / ww)", "metrics, in process", "metrics, whole process",
        "command with report vs ww process", "peak RSS (metrics / command)", "|Δalpha| median / worst",
    ]  # fmt: skip
    return _table(header, rows)


def _from_tests(relative: str):
    """A module of the test suite's case lists (``tests/...py``), loaded by path (``tests`` is no package)."""
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mergekit_features() -> str:
    """Every mergekit merge method and recipe feature (``tests/merge/mergekit_features.py``): what weightkit
    does, and the tests that check it (the suite fails if one does not exist)."""
    features = _from_tests("tests/merge/mergekit_features.py")
    rows = []
    for feature in features.FEATURES:
        files = dict.fromkeys(Path(t.partition("::")[0]).stem for t in feature.tests)
        tests = ", ".join(f"`{f}`" for f in files)
        name = f"`{feature.name}`" if feature in features.METHODS else feature.name
        rows.append([name, feature.status, feature.note or "-", tests or "-"])
    return _table(["mergekit", "weightkit", "note", "checked in"], rows)


def merge_parity() -> str:
    """mergekit's example recipes run by both tools (``bench/merge_parity.py``): largest difference."""
    result = _load("merge_parity")

    def cell(row: dict) -> str:
        if row["weightkit"] != "ok":
            return "refused by weightkit"
        if row["mergekit"] != "ok":
            return "mergekit failed"
        stable = row.get("max_abs_diff_vs_mergekit_stable_topk")
        return f"{row['max_abs_diff']:.2g}" + (
            f" ({stable:.2g} with a stable top-k)" if stable is not None else ""
        )

    rows = []
    for recipe, variants in result["recipes"].items():
        layers = variants["as_written"].get("layers") or {}
        same = "-" if not layers else "same" if layers["weightkit"] == layers["mergekit"] else "differ"
        float32 = cell(variants["float32_compute"]) if "float32_compute" in variants else "-"
        rows.append([f"`{recipe}.yml`", cell(variants["as_written"]), float32, same])
    return _table(
        ["recipe", "max abs diff, as written", "max abs diff, float32 compute", "layer count"], rows
    )


# -- PEFT interop -----------------------------------------------------------------------------------------


def peft_interop() -> str:
    """The architecture x method x direction cases of ``tests/adapt/test_peft_interop.py``: each is a test
    that fails unless the outputs equal the other tool's, so the table holds whenever the suite passes."""
    cases = _from_tests("tests/adapt/peft_interop.py")
    methods, directions = cases.METHODS, cases.DIRECTIONS
    header = ["architecture", "adapted layers", *(f"{m}: {d}" for m in methods for d in directions)]
    rows = []
    for arch in cases.ARCHITECTURES:
        layers = " + ".join(["`all-linear` (= PEFT's)", *(f"`{t}`" for t in arch.extra_targets)])
        if arch.head:
            layers += f"; head `{', '.join(arch.head)}` in full"
        checked = {(m, d) for a, m, d in cases.CASES if a == arch.name}
        cells = ["same outputs" if (m, d) in checked else "-" for m in methods for d in directions]
        rows.append([arch.name, layers, *cells])
    return _table(header, rows)


def architectures() -> str:
    """The architectures x verbs matrix of ``tests/test_architectures.py`` (cases in
    ``tests/architectures.py``): a "yes" is a test that fails unless the output loads and computes what it
    should, a refusal a test that fails unless the verb refuses with that reason."""
    cases = _from_tests("tests/architectures.py")
    rows = []
    for arch in cases.ARCHITECTURES:
        cells = [cases.expected(arch, verb).removeprefix("refused: ") for verb in cases.VERBS]
        if arch in cases.RUN_DECOMPRESSED:
            cells = [c + " (transformers: `run_compressed=False`)" if v.startswith("compress") and c == "yes"
                     else c for c, v in zip(cells, cases.VERBS, strict=True)]  # fmt: skip
        rows.append([f"`{arch}`", *cells])
    return _table(["model_type", *cases.VERBS], rows)


TABLES: dict[str, Callable[[], str]] = {
    "architectures": architectures,
    "peft-interop": peft_interop,
    "mergekit-features": mergekit_features,
    "merge-parity": merge_parity,
    "adapt-peer": adapt_peer,
    "adapt-summary": adapt_summary,
    "adapt-methods": adapt_methods,
    "demo": demo,
    "merge-peer": merge_peer,
    "merge-summary": merge_summary,
    "merge-startup": merge_startup,
    "quant-peer": quant_peer,
    "quant-memory": quant_memory,
    "compress": compress,
    "compress-targets": compress_targets,
    "train": train,
    "train-targets": train_targets,
    "inspect": inspect,
}


def render(text: str) -> str:
    """``text`` with every marked table regenerated."""

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r}; known: {', '.join(TABLES)}")
        return match.group(1) + TABLES[name]() + match.group(4)

    return _MARKED.sub(fill, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = parser.parse_args()
    stale = []
    for path in DOCUMENTS:
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(new)
    if stale:
        print(("stale: " if args.check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
