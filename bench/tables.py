"""The README tables, generated from the benchmark results in ``bench/results/*.json`` (never typed by hand).

A table lives in ``README.md`` or ``bench/README.md`` between two markers::

    <!-- table: adapt-peer -->
    ...generated...
    <!-- /table -->

``python bench/tables.py`` rewrites every marked table from the JSON files; ``--check`` changes nothing
and exits 1 if a table differs from what the JSON gives (the test suite runs it, so a README cannot drift
from its results). Each renderer shows the unfavourable figure beside the favourable one.
"""

import argparse
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

_TASK_LABELS = {"bbc": "bbc (MiniLM)", "docstrings": "docstrings (Llama)"}


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
    runs = [("adapt", "main run, 3 reps"), ("adapt_peer_7reps", "peers only, 7 reps")]
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
    for name, label in [("adapt", "3 reps"), ("adapt_peer_7reps", "7 reps")]:
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


TABLES: dict[str, Callable[[], str]] = {
    "adapt-peer": adapt_peer,
    "adapt-summary": adapt_summary,
    "adapt-methods": adapt_methods,
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
