"""Memory-efficient-training benchmark (issue 14): AdamW, weightkit's GaLore (plain, per-layer, Q-GaLore,
SVD-free), galore-torch's GaLoreAdamW and weightkit's MeZO on the small Llama and Shakespeare.

    bash bench/peer_env.sh galore                                     # bench/.venv-galore (galore-torch)
    flock /tmp/weightkit-bench.lock .venv/bin/python bench/train.py  # ~20 min: results/train.json, .png
    .venv/bin/python bench/train.py --quick                          # smoke run, a few steps, nothing kept

Every run is a fresh process (``bench/train_worker.py``; galore-torch's under ``bench/.venv-galore``), one
torch thread, the same model, seed and batches (8 windows of 128 tokens of the training plays), no gradient
clipping, no weight decay, GaLore at rank 64 (a quarter of the hidden size 256, the paper's ratio) on every
attention and MLP matrix with ``update_proj_gap`` 25 (four refreshes in 100 steps), ``scale`` 0.25:

1. fine-tuning (the trained small Llama, more steps on its training plays), every job: loss curves, held-out
   loss (three plays it never saw), optimizer state, step time.
2. memory: every job again for a few steps with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``), so
   a freed tensor leaves the resident set at once and the peak RSS is the peak of live memory (with the
   default, dynamic threshold, freed memory lingers and two identical runs differed by 50 MiB); batch 8, and
   batch 1 for AdamW and GaLore (activations smallest, so the gradient's share of the peak largest).
3. step time, in turn: every optimizer on its own copy of the model in one process, one step each in turn
   on the same batch, so all see the machine at the same moments (separate processes minutes apart differed
   by 20% here, from load alone). It runs under galore-torch's venv with weightkit's source on the path:
   both venvs have the same torch (2.13.0+cpu) and transformers (5.25.0).
4. pre-training: the same architecture from a random init, AdamW and the GaLore variants at AdamW's usual
   learning rate; GaLore at ten times it (the ratio of the GaLore paper's own scripts, with scale 0.25) and
   AdamW at 2.5 times it (the same effective step size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    BENCH_DIR,
    PEER_ENV_SCRIPT,
    RESULTS_DIR,
    run_json,
    weightkit_source_state,
    write_jsonl,
    write_result,
)

WORKER = BENCH_DIR / "train_worker.py"
GALORE_VENV = Path(os.environ.get("WEIGHTKIT_GALORE_VENV", BENCH_DIR / ".venv-galore"))
GALORE_PYTHON = GALORE_VENV / "bin" / "python"

LABELS = {
    "adamw": "AdamW (torch)",
    "galore": "GaLore",
    "galore-per-layer": "GaLore, per-layer",
    "q-galore": "Q-GaLore (4-bit projection, lazy refresh)",
    "galore-svd-free": "GaLore, SVD-free (DCT)",
    "galore-torch": "galore-torch GaLoreAdamW",
    "mezo": "MeZO",
    "inference": "inference (forward only)",
    "galore-lr10x": "GaLore, 10x lr (the paper's ratio)",
    "adamw-lr2.5x": "AdamW, 2.5x lr",
}
# runs that are another job at a multiple of the learning rate
LR_MULTIPLES = {"galore-lr10x": ("galore", 10.0), "adamw-lr2.5x": ("adamw", 2.5)}
WEIGHTKIT_GALORE = ("galore", "galore-per-layer", "q-galore", "galore-svd-free")
FINE_TUNE_JOBS = ("adamw", *WEIGHTKIT_GALORE, "galore-torch", "mezo", "inference")
PRETRAIN_JOBS = ("adamw", "galore", "q-galore", "galore-svd-free", "galore-lr10x", "adamw-lr2.5x")
MEMORY_BATCH_1_JOBS = ("adamw", "galore", "galore-per-layer")

# GaLore (arXiv 2403.03507) Table 2, pre-training LLaMA 60M on C4 (1.1B tokens, rank 128 of hidden 512):
# validation perplexity 34.88 with GaLore against 34.06 full-rank (AdamW); 130M: 25.36 vs 25.08. Quoted from
# the paper (this machine is offline); the gap is log(ppl ratio) in nats per token.
PAPER = {
    "source": "GaLore, arXiv 2403.03507, Table 2 (pre-training on C4): LLaMA 60M 34.88 vs 34.06, "
    "130M 25.36 vs 25.08 validation perplexity (GaLore vs full-rank)",
    "loss_gap_60m": math.log(34.88 / 34.06),
    "loss_gap_130m": math.log(25.36 / 25.08),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    batch_size: int = 8
    seq_len: int = 128
    rank: int = 64
    gap: int = 25
    scale: float = 0.25
    seed: int = 0
    threads: int = 1
    warmup_skip: int = 5  # steps left out of the step-time median
    eval_texts: int = 128
    # fine-tuning: the trained model on more of its own training text
    fine_tune_steps: int = 100
    fine_tune_lr: float = 1e-4
    warmup: int = 15
    mezo_lr: float = 1e-4
    mezo_eps: float = 1e-3
    cos_threshold: float = 0.4
    queue_size: int = 2
    eval_points: int = 5
    # memory runs
    memory_steps: int = 10
    mmap_threshold: int = 131072
    # the in-turn run (step time)
    in_turn_steps: int = 60
    # pre-training
    pretrain_steps: int = 100
    pretrain_lr: float = 1e-3
    pretrain_warmup: int = 10


QUICK = dataclasses.replace(
    Settings(),
    gap=3,
    warmup_skip=1,
    eval_texts=16,
    fine_tune_steps=6,
    warmup=2,
    eval_points=2,
    memory_steps=3,
    in_turn_steps=4,
    pretrain_steps=6,
    pretrain_warmup=2,
)

DESCRIPTION = {
    "settings": "one torch thread per run; batch of batch_size windows of seq_len tokens (a <s> then "
    "seq_len - 1 tokens of the training plays' token stream, random offsets from a "
    "generator seeded with seed: every run of a kind sees the same batches, "
    "batches_sha256); no gradient clipping (per-layer GaLore consumes each gradient in its "
    "hook, so no run clips), no weight decay; GaLore rank 64 of hidden size 256, "
    "update_proj_gap gap, scale 0.25, proj_type std on every nn.Linear whose name holds "
    "'attn' or 'mlp' (galore-torch's torchrun_main), the rest (embeddings, lm_head, norms) "
    "AdamW; learning rate: linear warm-up, then cosine decay to 10%",
    "fine_tune": "the trained small Llama (bench/small_llama.py) trained further on its training plays, "
    "every job; losses (per step), eval_curve (held-out loss, nats per token, on eval_texts"
    " passages of the three held-out plays, truncated to seq_len, every steps/eval_points "
    "steps), state_bytes, step times",
    "state_bytes": "held: bytes of the storages the tensors in optimizer.state keep alive, each once (a "
    "slice of an SVD factor keeps the whole factor alive); views: sum of numel * "
    "element_size of those tensors; *_projected: the GaLore matrices' share; by_key: held "
    "bytes per state key",
    "theory": "GaLore's count: per projected m x n matrix two rank x max(m, n) moments and one min(m,"
    " n) x rank projection (weightkit.train.galore_state_bytes), plus AdamW's two moments "
    "for every other parameter; adamw: two moments of every parameter; float32",
    "memory": "peak RSS (VmHWM reset just before the first step, so loading and tokenizing are not in"
    " it) of memory_steps steps with MALLOC_MMAP_THRESHOLD_ fixed at mmap_threshold bytes "
    "(freed tensors leave the resident set at once); rss_before_train_mib is the resident "
    "set before the first step",
    "timing": "step_seconds_median: median over steps warmup_skip.. of forward + backward + optimizer"
    " step (MeZO: its two forward passes and four in-place moves; inference: the forward "
    "alone); update_seconds_median: the optimizer's step() alone (per-layer GaLore: ~0, its"
    " work is in backward)",
    "in_turn": "one process (galore-torch's venv, weightkit's source on the path), every optimizer "
    "on its own copy of the model, one step each in turn on the same batch, the order rotated"
    " every step, in_turn_steps steps at the fine-tuning learning rate; step_seconds (top "
    "level) are its medians, the ones the ratios use; "
    "comparisons.separate_process_step_seconds_median are the fine-tuning runs' (each in "
    "its own process, minutes apart)",
    "pretrain": "the same architecture from a random init (seed), AdamW and the GaLore variants; "
    "galore-lr10x and adamw-lr2.5x at 10 and 2.5 times pretrain_lr",
    "paper": "the gap the GaLore paper reports between GaLore and full-rank AdamW",
    "targets": "the issue's targets, each with the measured value and whether it is met",
}


# ------------------------------------------------------------------------------------------------ runs


def _worker_cmd(name: str, files: dict, s: Settings, **kw) -> list[str]:
    """The command of one worker run: job ``name`` (a key of LABELS) with these settings."""
    job, multiple = LR_MULTIPLES.get(name, (name, 1.0))
    python = str(GALORE_PYTHON) if job in ("galore-torch", "in-turn") else sys.executable
    lr = kw.get("lr", s.fine_tune_lr) * multiple
    args = {
        "init": kw.get("init", "pretrained"),
        "steps": kw["steps"],
        "batch-size": kw.get("batch_size", s.batch_size),
        "seq-len": s.seq_len,
        "lr": lr,
        "warmup": kw.get("warmup", s.warmup),
        "rank": s.rank,
        "gap": s.gap,
        "scale": s.scale,
        "cos-threshold": s.cos_threshold,
        "queue-size": s.queue_size,
        "mezo-lr": s.mezo_lr,
        "mezo-eps": s.mezo_eps,
        "seed": s.seed,
        "threads": s.threads,
        "eval-points": kw.get("eval_points", 0),
        "warmup-skip": s.warmup_skip,
    }
    cmd = [python, str(WORKER), str(files["model"]), str(files["train"]), str(files["eval"]), job]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    if job == "in-turn":
        cmd += ["--in-turn", ",".join(FINE_TUNE_JOBS)]
    return cmd


def _run(name: str, files: dict, s: Settings, env: dict | None = None, **kw) -> dict:
    env = {"HF_HUB_OFFLINE": "1", **(env or {})}
    if name == "galore-torch":
        env["PYTHONPATH"] = ""  # galore-torch's venv: nothing of weightkit on the path
    if name == "in-turn":  # galore-torch's venv with weightkit's source (same torch and transformers)
        import weightkit

        env["PYTHONPATH"] = str(Path(weightkit.__file__).resolve().parents[1])
    start = time.perf_counter()
    load = os.getloadavg()[0]
    result = run_json(_worker_cmd(name, files, s, **kw), threads=s.threads, env=env)
    result["wall_seconds"] = time.perf_counter() - start
    result["load_average_before"] = load
    if name == "in-turn":
        for job, r in result["jobs"].items():
            print(f"  {job:18s} {r['step_seconds_median'] * 1e3:7.1f} ms/step in turn", flush=True)
        return result
    print(
        f"  {name:18s} {result['step_seconds_median'] * 1e3:7.1f} ms/step"
        + f"  peak {result['peak_rss_mib']:6.0f} MiB"
        + (f"  held-out {result['final_eval_loss']:.4f}" if result.get("final_eval_loss") else "")
        + f"  ({result['wall_seconds']:.0f} s, load {load:.1f})",
        flush=True,
    )
    return result


def _slim(result: dict) -> dict:
    """A run's result without what the JSON needs only once (versions are kept per run: two venvs)."""
    return {k: v for k, v in result.items() if k not in ("python",)}


# ------------------------------------------------------------------------------------------ comparisons


def theory_bytes(shapes: list[list[int]], parameters: int, rank: int) -> dict:
    from weightkit.train import galore_state_bytes

    projected = sum(galore_state_bytes(tuple(shape), rank) for shape in shapes)
    projected_numel = sum(m * n for m, n in shapes)
    rest = 2 * 4 * (parameters - projected_numel)
    return {
        "galore": projected + rest,
        "galore_projected": projected,
        "adamw": 2 * 4 * parameters,
        "projected_parameters": projected_numel,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def compare(res: dict, s: Settings) -> tuple[dict, list[dict]]:
    """Ratios and differences, and the issue's targets checked against them."""
    ft, mem, pre = res["fine_tune"], res["memory"], res.get("pretrain", {})
    in_turn = res["in_turn"]["jobs"]
    adamw, peer = ft["adamw"], ft["galore-torch"]
    theory = res["theory"]
    step = res["step_seconds"]
    mem8 = mem[f"batch_{s.batch_size}"]
    mem1 = mem.get("batch_1", {})
    grad_mib = adamw["parameter_bytes"] / 2**20
    comparisons: dict = {"per_job": {}}
    for name, r in ft.items():
        sb = r["state_bytes"]
        comparisons["per_job"][name] = {
            "state_held_vs_adamw": _ratio(sb and sb["held"], adamw["state_bytes"]["held"]),
            "state_held_vs_galore_torch": _ratio(sb and sb["held"], peer["state_bytes"]["held"]),
            "state_held_vs_theory": _ratio(sb and sb["held"], theory["galore"]),
            "state_views_vs_theory": _ratio(sb and sb["views"], theory["galore"]),
            "step_vs_adamw": _ratio(step[name], step["adamw"]),
            "step_vs_galore_torch": _ratio(step[name], step["galore-torch"]),
            "peak_rss_vs_adamw": _ratio(mem8[name]["peak_rss_mib"], mem8["adamw"]["peak_rss_mib"]),
            "final_eval_loss_minus_adamw": r["final_eval_loss"] - adamw["final_eval_loss"]
            if r.get("final_eval_loss") is not None
            else None,
        }
    comparisons["max_train_loss_diff"] = {
        "galore_vs_galore_torch": _max_diff(ft["galore"]["losses"], peer["losses"]),
        "galore_vs_galore_per_layer": _max_diff(ft["galore"]["losses"], ft["galore-per-layer"]["losses"]),
        "in_turn_galore_vs_galore_torch": _max_diff(
            in_turn["galore"]["losses"], in_turn["galore-torch"]["losses"]
        ),
    }
    comparisons["separate_process_step_seconds_median"] = {n: r["step_seconds_median"] for n, r in ft.items()}
    comparisons["update_seconds_median_in_turn"] = {n: r["update_seconds_median"] for n, r in in_turn.items()}
    comparisons["pretrain_final_eval_loss_minus_adamw"] = {
        name: r["final_eval_loss"] - pre["adamw"]["final_eval_loss"] for name, r in pre.items()
    }

    targets = []

    def target(name: str, value, met: bool, note: str) -> None:
        targets.append({"target": name, "value": value, "met": bool(met), "note": note})

    for name in (*WEIGHTKIT_GALORE, "galore-torch"):
        sb = ft[name]["state_bytes"]
        extra = ft[name].get("shared_dct_basis_bytes", 0)
        target(
            f"{name}: optimizer state <= theory",
            {"held": sb["held"] + extra, "views": sb["views"], "theory": theory["galore"]},
            sb["held"] + extra <= theory["galore"],
            "held bytes (storages kept alive; SVD-free: plus its shared DCT bases) against GaLore's count",
        )
    for name in WEIGHTKIT_GALORE:
        held = ft[name]["state_bytes"]["held"] + ft[name].get("shared_dct_basis_bytes", 0)
        target(
            f"{name}: optimizer state <= galore-torch's",
            {"held": held, "galore_torch": peer["state_bytes"]["held"]},
            held <= peer["state_bytes"]["held"],
            "held bytes (SVD-free: plus its shared DCT bases)",
        )
    for batch, runs in ((s.batch_size, mem8), (1, mem1)):
        if "galore-per-layer" in runs:
            saved = runs["adamw"]["peak_rss_mib"] - runs["galore-per-layer"]["peak_rss_mib"]
            target(
                f"per-layer GaLore peak RSS <= AdamW's - gradient size (batch {batch})",
                {"saved_mib": saved, "gradient_mib": grad_mib},
                saved >= grad_mib,
                "memory runs (fixed mmap threshold)",
            )
    for name in WEIGHTKIT_GALORE:
        target(
            f"{name}: step time <= 1.0x galore-torch's",
            {"ratio": step[name] / step["galore-torch"], "vs_adamw": step[name] / step["adamw"]},
            step[name] <= step["galore-torch"],
            "in turn, one process (median of each optimizer's steps)",
        )
    for scenario, runs in (("fine-tuning", ft), ("pre-training", pre)):
        for name in (*WEIGHTKIT_GALORE, "galore-lr10x"):
            if name not in runs:
                continue
            # GaLore at the paper's learning-rate ratio is held against the better of the AdamW runs
            reference = "adamw"
            if name == "galore-lr10x" and "adamw-lr2.5x" in runs:
                reference = min(("adamw", "adamw-lr2.5x"), key=lambda n: runs[n]["final_eval_loss"])
            gap = runs[name]["final_eval_loss"] - runs[reference]["final_eval_loss"]
            target(
                f"{name}: final held-out loss - {LABELS[reference]}'s <= the paper's gap ({scenario})",
                {"gap": gap, "paper_gap_60m": PAPER["loss_gap_60m"], "reference": reference},
                gap <= PAPER["loss_gap_60m"],
                "nats per token",
            )
    ratio = mem8["mezo"]["peak_rss_mib"] / mem8["inference"]["peak_rss_mib"]
    target(
        "MeZO peak RSS <= 1.2x inference",
        {"ratio": ratio},
        ratio <= 1.2,
        f"memory runs, batch {s.batch_size}",
    )
    return comparisons, targets


# ------------------------------------------------------------------------------------------------ plot


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [
        ("fine_tune", "fine-tuning the trained small Llama"),
        ("pretrain", "pre-training from scratch"),
    ]
    scenarios = [(key, title) for key, title in scenarios if res.get(key)]
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(13, 4.6 * len(scenarios)), squeeze=False)
    palette = plt.get_cmap("tab10").colors
    colors = {name: palette[i % len(palette)] for i, name in enumerate(LABELS)}  # one colour per optimizer
    for row, (key, title) in enumerate(scenarios):
        # Fine-tuning moves the loss by less than the batch-to-batch noise, so that row shows each run's
        # training loss minus AdamW's on the same batch (every run sees the same batches).
        relative = key == "fine_tune"
        reference = res[key]["adamw"]["losses"]
        window = max(1, min(10, len(reference) // 5))
        for name, r in res[key].items():
            losses = [a - b for a, b in zip(r["losses"], reference, strict=True)] if relative else r["losses"]
            smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
            style = {"color": colors[name]}
            if name in ("galore-torch", "galore-per-layer"):  # on top of GaLore's line: the same losses
                style["linestyle"] = "--"
            axes[row][0].plot(range(1, len(losses) + 1), smooth, label=LABELS[name], linewidth=1.2, **style)
            curve = sorted((int(k), v) for k, v in r["eval_curve"].items())
            axes[row][1].plot(
                *zip(*curve, strict=True), marker="o", label=LABELS[name], linewidth=1.2, **style
            )
        what = "training loss minus AdamW's on the same batch" if relative else "training loss"
        axes[row][0].set_title(f"{title}:\n{what} (running mean of {window} steps)", fontsize=10)
        axes[row][1].set_title(f"{title}:\nheld-out loss (three plays never trained on)", fontsize=10)
        for ax in axes[row]:
            ax.set_xlabel("step")
            ax.set_ylabel("loss, nats per token")
            ax.grid(alpha=0.3)
        axes[row][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def _galore_versions() -> dict:
    freeze = GALORE_VENV / "peer-freeze.txt"
    keep = ("torch", "galore-torch", "transformers", "bitsandbytes", "tokenizers")
    versions = {}
    if freeze.exists():
        for line in freeze.read_text().splitlines():
            name, _, version = line.partition("==")
            if name.lower() in keep:
                versions[name.lower()] = version
    return versions


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps of every run; results not written")
    p.add_argument("--no-pretrain", action="store_true", help="skip the pre-training runs")
    p.add_argument("--out", default="train", help="results name (bench/results/<out>.json and .png)")
    p.add_argument("--plot-only", action="store_true", help="redraw <out>.png from <out>.json, run nothing")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(json.loads((RESULTS_DIR / f"{args.out}.json").read_text()), RESULTS_DIR / f"{args.out}.png")
        return
    s = QUICK if args.quick else Settings()

    subprocess.run(["bash", str(PEER_ENV_SCRIPT), "galore"], check=True, stdout=subprocess.DEVNULL)
    from small_llama import corpus_passages, ensure_small_llama, spread

    start = time.perf_counter()
    model_dir = ensure_small_llama()
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        files = {
            "model": model_dir,
            "train": write_jsonl(corpus_passages("train"), Path(tmp) / "train.jsonl"),
            "eval": write_jsonl(spread(corpus_passages("eval"), s.eval_texts), Path(tmp) / "eval.jsonl"),
        }
        print(f"fine-tuning, {s.fine_tune_steps} steps", flush=True)
        res["fine_tune"] = {
            name: _run(name, files, s, steps=s.fine_tune_steps, eval_points=s.eval_points)
            for name in FINE_TUNE_JOBS
        }
        print(f"memory, {s.memory_steps} steps, MALLOC_MMAP_THRESHOLD_={s.mmap_threshold}", flush=True)
        env = {"MALLOC_MMAP_THRESHOLD_": str(s.mmap_threshold)}
        res["memory"] = {f"batch_{s.batch_size}": {}, "batch_1": {}}
        for name in FINE_TUNE_JOBS:
            res["memory"][f"batch_{s.batch_size}"][name] = _run(name, files, s, env, steps=s.memory_steps)
        for name in MEMORY_BATCH_1_JOBS:
            res["memory"]["batch_1"][name] = _run(name, files, s, env, steps=s.memory_steps, batch_size=1)
        print(f"in turn, {s.in_turn_steps} steps", flush=True)
        res["in_turn"] = _run("in-turn", files, s, steps=s.in_turn_steps)
        if not args.no_pretrain:
            print(f"pre-training from scratch, {s.pretrain_steps} steps", flush=True)
            res["pretrain"] = {
                name: _run(
                    name,
                    files,
                    s,
                    init="scratch",
                    steps=s.pretrain_steps,
                    lr=s.pretrain_lr,
                    warmup=s.pretrain_warmup,
                    eval_points=s.eval_points,
                )
                for name in PRETRAIN_JOBS
            }

    ft = res["fine_tune"]
    res["step_seconds"] = {name: r["step_seconds_median"] for name, r in res["in_turn"]["jobs"].items()}
    res["theory"] = theory_bytes(ft["galore"]["projected_shapes"], ft["galore"]["parameters"], s.rank)
    digests = {
        key: sorted({r["batches_sha256"] for r in res[key].values()})
        for key in ("fine_tune", "pretrain")
        if key in res
    }
    res["same_batches"] = all(len(d) == 1 for d in digests.values())
    comparisons, targets = compare(res, s)
    total = time.perf_counter() - start
    for t in targets:
        print(("met     " if t["met"] else "NOT MET ") + t["target"], json.dumps(t["value"]), flush=True)

    out_dir = RESULTS_DIR if not args.quick else Path(tempfile.mkdtemp(prefix="bench-train-quick-"))
    png = out_dir / f"{args.out}.png"
    plot(res, png)
    payload = {
        "what": DESCRIPTION,
        "settings": dataclasses.asdict(s),
        "labels": LABELS,
        "weightkit_commit": weightkit_source_state(),
        "galore_venv": _galore_versions(),
        "paper": PAPER,
        "model_dir": str(model_dir),
        "total_seconds": total,
        **{
            k: ({n: _slim(r) for n, r in v.items()} if k in ("fine_tune", "pretrain") else v)
            for k, v in res.items()
        },  # fmt: skip
        "comparisons": comparisons,
        "targets": targets,
        "figure": png.name,
    }
    if args.quick:
        (out_dir / f"{args.out}.json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"quick run: {out_dir} (not written to bench/results); {total:.0f} s")
        return
    path = write_result(args.out, payload)
    print(f"wrote {path} and {png}; {total:.0f} s")


if __name__ == "__main__":
    main()
