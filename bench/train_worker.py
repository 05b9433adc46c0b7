"""One job of the memory-efficient-training benchmark (``bench/train.py``), in a process of its own.

Runs under weightkit's venv (every weightkit optimizer, AdamW, inference) or under ``bench/.venv-galore``
(galore-torch's ``GaLoreAdamW``): it imports torch, transformers, ``common.py`` (standard library only) and
the one optimizer it is asked for, never the rest of the bench. Prints one JSON object on its last line.

    python bench/train_worker.py MODEL_DIR train.jsonl eval.jsonl JOB [--steps 200 ...]

JOB is one of :data:`JOBS`. Every job loads the same model, tokenizes the same texts with the model's own
tokenizer and draws the same batches (random windows of the token stream of ``train.jsonl``, from a seeded
generator; ``batches_sha256`` lets the caller check that every job saw the same tokens), with the same
learning-rate schedule, no gradient clipping (``per_layer`` GaLore consumes each gradient in its hook, so
clipping by the global norm is impossible there; no job clips, so they compare) and no weight decay.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import peak_rss_mib, read_jsonl, rss_mib  # noqa: E402
from small_llama import mean_nll  # noqa: E402

JOBS = (
    "adamw",  # torch.optim.AdamW
    "galore",  # weightkit GaLoreAdamW
    "galore-per-layer",  # weightkit GaLoreAdamW(per_layer=True)
    "q-galore",  # weightkit GaLoreAdamW with a 4-bit projection and lazy refresh
    "galore-svd-free",  # weightkit GaLoreAdamW with basis="dct"
    "galore-torch",  # galore_torch.GaLoreAdamW (bench/.venv-galore)
    "mezo",  # weightkit ZerothOrderSGD
    "inference",  # the forward passes alone, under no_grad (MeZO's yardstick)
)
WEIGHTKIT_GALORE = ("galore", "galore-per-layer", "q-galore", "galore-svd-free")
PROJECTED_MODULES = ("attn", "mlp")  # galore-torch's torchrun_main: Linear layers whose name contains these


# ------------------------------------------------------------------------------------------------- data


def token_stream(tokenizer, texts: list[str]):
    """Every text's ids (no ``<s>``: each window gets its own) followed by ``</s>``, as one int64 tensor.
    Tokenized in chunks so no list of a million Python ints ever exists."""
    import torch

    parts = []
    for i in range(0, len(texts), 256):
        encoded = tokenizer(texts[i : i + 256], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            parts.append(torch.tensor([*ids, tokenizer.eos_token_id], dtype=torch.long))
    return torch.cat(parts)


class Batches:
    """``batch_size`` random windows of ``seq_len - 1`` tokens, each after ``<s>``, from a seeded generator:
    the same seed gives the same batches in every process (and in both venvs: same torch)."""

    def __init__(self, stream, bos_id: int, batch_size: int, seq_len: int, seed: int):
        import torch

        self.stream, self.window = stream, seq_len - 1
        self.generator = torch.Generator().manual_seed(seed)
        self.bos = torch.full((batch_size, 1), bos_id, dtype=torch.long)
        self.offsets = torch.arange(self.window)
        self.digest = hashlib.sha256()

    def next(self):
        import torch

        n = self.bos.shape[0]
        starts = torch.randint(0, len(self.stream) - self.window, (n,), generator=self.generator)
        batch = torch.cat([self.bos, self.stream[starts[:, None] + self.offsets]], dim=1)
        self.digest.update(batch.numpy().tobytes())
        return batch


def held_out_loss(model, tokenizer, texts: list[str], max_len: int, batch_size: int) -> float:
    """Mean next-token NLL (nats per token) over ``texts`` (small_llama's), the model's mode kept; batches no
    larger than the training batch (so it never sets the peak)."""
    was_training = model.training
    loss = mean_nll(model, tokenizer, texts, max_len, batch_size)
    model.train(was_training)
    return loss


# -------------------------------------------------------------------------------------- optimizer state


def _tensors(obj, seen: set[int]):
    """Every tensor reachable from ``obj`` through dicts, sequences and object attributes (galore-torch keeps
    its projection in a ``GaLoreProjector`` object's ``ortho_matrix``), each with the path of keys to it."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield (), obj
    elif id(obj) in seen:
        return
    elif isinstance(obj, dict):
        seen.add(id(obj))
        for key, value in obj.items():
            for path, t in _tensors(value, seen):
                yield (str(key), *path), t
    elif isinstance(obj, (list, tuple, set)):
        seen.add(id(obj))
        for value in obj:
            yield from _tensors(value, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        seen.add(id(obj))
        for key, value in vars(obj).items():
            for path, t in _tensors(value, seen):
                yield (type(obj).__name__ + "." + key, *path), t


def state_bytes(optimizer, projected_ids: set[int]) -> dict:
    """Bytes of every tensor in ``optimizer.state``, two ways.

    ``held``: the bytes of the storages those tensors keep alive, each storage once. A tensor that is a view
    (a slice of an SVD's factor) keeps its whole storage alive, so this is the memory the state costs.
    ``views``: the sum of ``numel * element_size`` of the tensors as they are (what the state appears to
    hold). Both split by projected matrices / other parameters, and ``by_key`` (held bytes per state key).
    """
    out = {"held": 0, "views": 0, "held_projected": 0, "views_projected": 0, "by_key": {}}
    storages: set[int] = set()
    seen: set[int] = set()
    for p, state in optimizer.state.items():
        projected = id(p) in projected_ids
        for path, t in _tensors(state, seen):
            view = t.numel() * t.element_size()
            storage = t.untyped_storage()
            held = 0 if storage.data_ptr() in storages else storage.nbytes()
            storages.add(storage.data_ptr())
            out["views"] += view
            out["held"] += held
            if projected:
                out["views_projected"] += view
                out["held_projected"] += held
            key = "/".join(path) or "(tensor)"
            out["by_key"][key] = out["by_key"].get(key, 0) + held
    return out


# ------------------------------------------------------------------------------------------ optimizers


def param_groups(model, group_keys: dict) -> tuple[list[dict], list]:
    """galore-torch's split (its ``torchrun_main.py``): the weight of every ``nn.Linear`` whose module name
    contains "attn" or "mlp" projected with ``group_keys``, every other parameter plain AdamW."""
    from torch import nn

    projected = [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(key in name for key in PROJECTED_MODULES)
    ]
    ids = {id(p) for p in projected}
    regular = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": regular}, {"params": projected, **group_keys}], projected


class SvdCounter:
    """Counts (and times) the projection refreshes of weightkit's or galore-torch's GaLore by wrapping the
    function each calls for a new projection."""

    def __init__(self):
        self.calls, self.seconds = 0, 0.0

    def wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - t0

        setattr(owner, name, counted)


def build_optimizer(job: str, model, args, counter: SvdCounter | None):
    """``(optimizer, projected parameters, settings)`` for ``job`` (``counter``: count its refreshes)."""
    import torch

    galore_keys = {"rank": args.rank, "update_proj_gap": args.gap, "scale": args.scale, "proj_type": "std"}
    if job == "adamw":
        opt = torch.optim.AdamW(
            model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0
        )
        return opt, [], {"eps": 1e-6, "betas": [0.9, 0.999], "weight_decay": 0.0}
    if job == "mezo":
        from weightkit.train import ZerothOrderSGD

        opt = ZerothOrderSGD(model.parameters(), lr=args.mezo_lr, eps=args.mezo_eps, seed=args.seed)
        return opt, [], {"lr": args.mezo_lr, "eps": args.mezo_eps, "seed": args.seed}
    if job == "galore-torch":
        import galore_torch
        from galore_torch.galore_projector import GaLoreProjector

        if counter is not None:
            counter.wrap(GaLoreProjector, "get_orthogonal_matrix")
        groups, projected = param_groups(model, galore_keys)
        opt = galore_torch.GaLoreAdamW(groups, lr=args.lr, no_deprecation_warning=True)
        return opt, projected, {**galore_keys, "eps": 1e-6, "betas": [0.9, 0.999], "weight_decay": 0.0}
    import weightkit.train.galore as wk_galore

    extra = {
        "galore": {},
        "galore-per-layer": {},
        "q-galore": {"proj_bits": 4, "cos_threshold": args.cos_threshold, "queue_size": args.queue_size},
        "galore-svd-free": {"basis": "dct"},
    }[job]
    if counter is not None:
        counter.wrap(wk_galore, "dct_columns" if job == "galore-svd-free" else "projection")
    groups, projected = param_groups(model, {**galore_keys, **extra})
    opt = wk_galore.GaLoreAdamW(groups, lr=args.lr, per_layer=job == "galore-per-layer")
    settings = {**galore_keys, **extra, "per_layer": job == "galore-per-layer", "eps": 1e-6}
    return opt, projected, {**settings, "betas": [0.9, 0.999], "weight_decay": 0.0}


def train_step(job: str, model, opt, batch) -> tuple[float, float, float]:
    """One step of ``job``: (loss, seconds of the whole step, seconds of the optimizer's own ``step()``)."""
    import torch

    t0 = time.perf_counter()
    if job == "inference":
        with torch.no_grad():
            loss = model(input_ids=batch, labels=batch).loss
        t1 = time.perf_counter()
    elif job == "mezo":
        loss = opt.step(lambda: model(input_ids=batch, labels=batch).loss)
        t1 = time.perf_counter()
    else:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()  # per_layer GaLore: every update happens here, in the gradient hooks
        t1 = time.perf_counter()
        opt.step()
    t2 = time.perf_counter()
    return float(loss.detach() if torch.is_tensor(loss) else loss), t2 - t0, t2 - t1


def set_lr(opt, base_lrs: list[float], step: int, args) -> None:
    for group, base in zip(opt.param_groups if opt else [], base_lrs, strict=True):
        group["lr"] = base * lr_factor(step, args.steps, args.warmup)


def refresh_gaps(opt, projected) -> list[int] | None:
    """weightkit GaLore: each projected matrix's refresh gap at the end (Q-GaLore's lazy refresh doubles
    it)."""
    gaps = [opt.state[p].get("gap") for p in projected if p in opt.state]
    return gaps if gaps and all(g is not None for g in gaps) else None


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% (small_llama.py's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------ main


def load(args):
    """(tokenizer, training token stream, held-out texts, model in train mode)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    stream = token_stream(tokenizer, read_jsonl(args.train_file))
    eval_texts = read_jsonl(args.eval_file)
    if args.init == "pretrained":
        model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    else:  # the same architecture, freshly initialised from the seed (a pre-training run)
        from transformers import AutoConfig

        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(AutoConfig.from_pretrained(args.model_dir))
    model.train()
    return tokenizer, stream, eval_texts, model


def run_in_turn(args) -> dict:
    """Every optimizer of ``--in-turn`` on its own copy of the model in this one process, one step each in
    turn on the same batch (the order rotated every step), so all see the machine at the same moments: their
    step-time ratios do not depend on how the load drifts between processes."""
    import copy

    import torch

    tokenizer, stream, _, model = load(args)
    members = {}
    for name in args.in_turn.split(","):
        copied = copy.deepcopy(model)
        if name == "inference":
            copied.requires_grad_(False)
            opt = None
        else:
            opt = build_optimizer(name, copied, args, None)[0]
        lrs = [group["lr"] for group in opt.param_groups] if opt else []
        members[name] = {"model": copied, "opt": opt, "lrs": lrs, "losses": [], "step": [], "update": []}
    del model
    batches = Batches(stream, tokenizer.bos_token_id, args.batch_size, args.seq_len, args.seed)
    names = list(members)
    for step in range(args.steps):
        batch = batches.next()
        k = step % len(names)
        for name in names[k:] + names[:k]:
            m = members[name]
            set_lr(m["opt"], m["lrs"], step, args)
            loss, seconds, update = train_step(name, m["model"], m["opt"], batch)
            m["losses"].append(round(loss, 5))
            m["step"].append(seconds)
            m["update"].append(update)
    result = {}
    for name, m in members.items():
        steps, updates = m["step"][args.warmup_skip :], m["update"][args.warmup_skip :]
        result[name] = {
            "step_seconds_median": statistics.median(steps),
            "update_seconds_median": statistics.median(updates)
            if name not in ("mezo", "inference")
            else None,
            "step_seconds": [round(x, 5) for x in m["step"]],
            "losses": m["losses"],
        }
    return {
        "job": "in-turn",
        "jobs": result,
        "steps": args.steps,
        "batches_sha256": batches.digest.hexdigest(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "galore-torch": _version("galore-torch"), "python": sys.version.split()[0]},
        "weightkit_from": _weightkit_path(),
        "python": sys.executable,
    }  # fmt: skip


def _weightkit_path() -> str | None:
    module = sys.modules.get("weightkit")
    return getattr(module, "__file__", None)


def run(args) -> dict:
    import torch

    t_start = time.perf_counter()
    tokenizer, stream, eval_texts, model = load(args)
    params = list(model.parameters())
    counter = SvdCounter()
    job = args.job
    if job == "inference":
        model.requires_grad_(False)
        opt, projected, settings = None, [], {}
    else:
        opt, projected, settings = build_optimizer(job, model, args, counter)
    base_lrs = [group["lr"] for group in opt.param_groups] if opt else []
    batches = Batches(stream, tokenizer.bos_token_id, args.batch_size, args.seq_len, args.seed)
    # eval_points 0 (the memory and timing runs): no held-out evaluation at all
    eval_every = args.steps // args.eval_points if args.eval_points else 0
    evaluate = lambda: held_out_loss(model, tokenizer, eval_texts, args.seq_len, args.batch_size)  # noqa: E731
    eval_curve = {0: evaluate()} if eval_every else {}
    setup_seconds = time.perf_counter() - t_start

    rss_before_train = rss_mib()
    peak_reset = reset_peak_rss()
    losses, step_seconds, update_seconds = [], [], []
    for step in range(args.steps):
        set_lr(opt, base_lrs, step, args)
        loss, seconds, update = train_step(job, model, opt, batches.next())
        losses.append(round(loss, 5))
        step_seconds.append(seconds)
        update_seconds.append(update)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == args.steps):
            eval_curve[step + 1] = evaluate()
        if args.progress and (step % 25 == 0 or step + 1 == args.steps):
            print(f"{job} step {step}/{args.steps} loss {loss:.4f} {seconds:.3f}s", file=sys.stderr)
    train_peak = peak_rss_mib()
    measured = step_seconds[args.warmup_skip :] or step_seconds
    measured_updates = update_seconds[args.warmup_skip :] or update_seconds
    projected_ids = {id(p) for p in projected}
    result = {
        "job": job,
        "init": args.init,
        "settings": settings,
        "steps": args.steps,
        "losses": losses,
        "eval_curve": {str(k): round(v, 5) for k, v in eval_curve.items()},
        "initial_eval_loss": eval_curve.get(0),
        "final_eval_loss": eval_curve.get(args.steps),
        "final_train_loss_mean_last_20": statistics.fmean(losses[-20:]),
        "step_seconds_median": statistics.median(measured),
        "step_seconds_mean": statistics.fmean(measured),
        # the optimizer's own step: AdamW's / GaLore's step() (per_layer: nothing, the work is in backward;
        # MeZO: its whole step, two forwards included; inference: 0)
        "update_seconds_median": statistics.median(measured_updates)
        if job not in ("mezo", "inference")
        else None,
        "step_seconds": [round(s, 5) for s in step_seconds],
        "projection_refreshes": counter.calls,
        "projection_refresh_seconds": counter.seconds,
        "refresh_gaps": refresh_gaps(opt, projected) if job in WEIGHTKIT_GALORE else None,
        "state_bytes": state_bytes(opt, projected_ids) if opt is not None else None,
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "projected_shapes": [list(p.shape) for p in projected],
        "peak_rss_mib": train_peak,
        "peak_rss_reset_before_training": peak_reset,
        "rss_before_train_mib": rss_before_train,
        "setup_seconds": setup_seconds,
        "batches_sha256": batches.digest.hexdigest(),
        "stream_tokens": len(stream),
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "galore-torch": _version("galore-torch"),
            "weightkit": _version("weightkit"),
            "python": sys.version.split()[0],
        },
        "weightkit_from": _weightkit_path(),
        "python": sys.executable,
    }
    if job == "galore-svd-free":
        # The DCT bases are cached once per size (in the parameters' dtype, float32 here) outside the
        # optimizer state and shared by every matrix of that size; counted so the comparison shows them.
        sides = {min(s) for s in result["projected_shapes"]}
        result["shared_dct_basis_bytes"] = sum(n * n * 4 for n in sides)
    result["process_peak_rss_mib"] = peak_rss_mib()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("train_file")
    p.add_argument("eval_file")
    p.add_argument("job", choices=(*JOBS, "in-turn"))
    p.add_argument("--in-turn", default="", help="job in-turn: the comma-separated jobs to run in turn")
    p.add_argument("--init", choices=("pretrained", "scratch"), default="pretrained")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--gap", type=int, default=50, help="update_proj_gap")
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--cos-threshold", type=float, default=0.4)
    p.add_argument("--queue-size", type=int, default=2)
    p.add_argument("--mezo-lr", type=float, default=1e-6)
    p.add_argument("--mezo-eps", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-points", type=int, default=5, help="held-out evaluations after step 0 (0: none)")
    p.add_argument("--warmup-skip", type=int, default=5, help="steps left out of the step-time median")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(run_in_turn(args) if args.job == "in-turn" else run(args)))


if __name__ == "__main__":
    main()
