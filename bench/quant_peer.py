"""Peer side of the quantization benchmarks: llm-compressor's GPTQ / AWQ / RTN, FP8 or NVFP4 (or its SparseGPT
or Wanda pruning) on one model.

Runs under the peer venv's python (``bench/.venv-peer``, made by ``bench/peer_env.sh``), never under
weightkit's: llm-compressor pins its own transformers and compressed-tensors. ``bench/common.py``
starts it as a subprocess and reads the one JSON object it prints on the last line of stdout.

What it does, in order:

1. loads the model (a causal LM, or a bare encoder such as the bundled MiniLM) in float32;
2. tokenizes the first ``--num-samples`` texts of the calibration jsonl itself (truncated to
   ``--max-seq-len``) into a ``datasets.Dataset`` with ``input_ids``/``attention_mask``, so
   llm-compressor skips its own text pipeline (which assumes a chat/causal LM) and both tools see
   the very same tokens; one text per batch, in file order (no shuffling, no padding);
3. optionally measures the full-precision model on ``--eval-file`` (perplexity for a causal LM,
   sentence embeddings for an encoder);
4. times ``oneshot`` alone (the quantization itself: calibration forwards + the algorithm);
5. optionally measures the quantized model the same way (cosine of its sentence embeddings to the
   full-precision ones, or its perplexity) on the in-memory fake-quantized model;
6. saves the compressed checkpoint (``save_compressed=True``) with its tokenizer to ``out_dir``.

Output (stdout, last line): ``{"tool": "llmcompressor", "versions": {...}, "method": ...,
"quant_seconds": ..., "peak_rss_mib": ..., "rss_before_quant_mib": ..., "quality": {...}, ...}``.
``peak_rss_mib`` is the process's ``ru_maxrss`` (model load + calibration + quantization + eval);
``rss_before_quant_mib`` is the resident size just before ``oneshot``, so the difference is what the
quantization added on top of the loaded model.

Example::

    bench/.venv-peer/bin/python bench/quant_peer.py MODEL_DIR calib.jsonl gptq /tmp/out \\
        --num-samples 128 --max-seq-len 256 --eval-file eval.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

# fp8: FP8 E4M3 weights with one scale per output channel and no activation quantization (the weights of
# llm-compressor's FP8_DYNAMIC scheme alone: weightkit's FP8Config default). nvfp4: the NVFP4A16 preset
# (E2M1 weights, groups of 16 with FP8 scales and a global scale; weights only). Neither needs calibration
# data, but oneshot is given the same texts as the others.
# sparsegpt / wanda: one-shot pruning to --sparsity (a fraction, unstructured, or N:M), no quantization.
# (llm-compressor's MagnitudePruningModifier is not here: it masks weights on training steps, and one-shot
# it left every weight in place.)
PRUNING = ("sparsegpt", "wanda")
METHODS = ("gptq", "awq", "rtn", "fp8", "nvfp4", *PRUNING)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="HF model directory (causal LM or encoder) with its tokenizer")
    p.add_argument("calib_file", help="jsonl, one {'text': ...} per line; the first --num-samples are used")
    p.add_argument("method", choices=METHODS)
    p.add_argument("out_dir", help="where the compressed checkpoint is written")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="0 = one scale per output channel")
    p.add_argument("--asym", action="store_true", help="asymmetric grid with zero points (default symmetric)")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument(
        "--actorder",
        default="static",
        choices=["none", "static", "group", "weight"],
        help="GPTQ column order; llm-compressor's default is 'static'",
    )
    p.add_argument("--dampening-frac", type=float, default=0.01, help="GPTQ: damp = frac * mean(diag H)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ: columns per lazy-update block")
    p.add_argument("--awq-n-grid", type=int, default=20, help="AWQ: grid points of the scale search")
    p.add_argument("--awq-duo-scaling", default="true", choices=["true", "false", "both"])
    p.add_argument(
        "--sparsity", default="0.5", help="pruning: a fraction of zeros (unstructured) or N:M, e.g. 2:4"
    )
    p.add_argument("--ignore", nargs="*", default=None, help="module names/regexes left in full precision")
    p.add_argument("--eval-file", default=None, help="jsonl of held-out texts for quality")
    p.add_argument("--eval-max-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true", help="skip writing the checkpoint")
    p.add_argument("--progress", action="store_true", help="keep llm-compressor's progress bars (stderr)")
    return p.parse_args(argv)


def _rss_mib() -> float:
    # Current resident size from /proc (Linux); ru_maxrss only gives the peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: ru_maxrss carries the parent's peak across fork+exec, so a child started
    # by a big benchmark process would report the parent's size.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _read_texts(path: str, limit: int | None = None) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            texts.append(obj["text"] if isinstance(obj, dict) else str(obj))
            if limit is not None and len(texts) >= limit:
                break
    return texts


def _is_causal_lm(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs)


def _load(model_dir: str):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    causal = _is_causal_lm(config)
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, causal


def _calibration_dataset(tokenizer, texts: list[str], max_len: int):
    from datasets import Dataset

    enc = tokenizer(texts, truncation=True, max_length=max_len)
    # Only the columns every model's forward takes; a BERT's token_type_ids default to zeros anyway.
    rows = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return Dataset.from_dict(rows)


def _quant_scheme(args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    if args.method == "nvfp4":
        return {"group_0": QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES["NVFP4A16"])}
    if args.method == "fp8":
        weights = PRESET_SCHEMES["FP8_DYNAMIC"]["weights"]  # per-channel FP8 E4M3; activations left out
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=not args.asym,
        strategy="group" if args.group_size else "channel",
        group_size=args.group_size or None,
        dynamic=False,
    )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _bert_awq_mappings():
    """AWQ smoothing pairs that are exact for a post-LayerNorm BERT.

    llm-compressor infers Llama-style mappings (input_layernorm -> q/k/v, v -> o, ...), whose names
    a BERT lacks. In a post-LN BERT a LayerNorm's output feeds both the next linears and the
    residual stream, so scaling a LayerNorm would change the residual: not an equivalence. And
    ``intermediate.dense -> GELU -> output.dense`` is not linear in between. What is exact: the value
    projection's output channels pass through attention's weighted sum unchanged per channel, so they
    can be divided by s while ``attention.output.dense``'s input columns are multiplied by s.
    """
    from llmcompressor.modifiers.transform.awq import AWQMapping

    return [AWQMapping("re:.*attention\\.self\\.value$", ["re:.*attention\\.output\\.dense$"])]


def _patch_cpu_pinning() -> bool:
    """Make llm-compressor's AWQ run without an accelerator; returns whether a patch was applied.

    llm-compressor 0.14's AWQ pins its cached block inputs (``IntermediatesCache.pin_memory``) before
    the scale search so they can be copied to a GPU asynchronously. ``Tensor.pin_memory()`` raises
    "Cannot access accelerator device when none is available" on a CPU-only torch. Pinning only
    speeds up host-to-device copies, which a CPU run never makes, so skipping it changes no number.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        return False
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return True


def _sparsity(text: str) -> tuple[float, str]:
    """``(fraction, mask_structure)`` of ``--sparsity``: "0.5" -> (0.5, "0:0"), "2:4" -> (0.5, "2:4")
    (llm-compressor's "0:0" is unstructured)."""
    if ":" in text:
        n, m = (int(x) for x in text.split(":"))
        return n / m, f"{n}:{m}"
    return float(text), "0:0"


def _pruning_modifier(args, ignore: list[str]):
    """SparseGPT or Wanda: one-shot, block by block on the calibration activations; no quantization."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    fraction, structure = _sparsity(args.sparsity)
    if args.method == "sparsegpt":
        return SparseGPTModifier(
            sparsity=fraction,
            mask_structure=structure,
            block_size=args.block_size,
            dampening_frac=args.dampening_frac,
            ignore=ignore,
        )
    return WandaPruningModifier(sparsity=fraction, mask_structure=structure, ignore=ignore)


def _recipe(args, causal: bool):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = args.ignore if args.ignore is not None else (["lm_head"] if causal else [])
    if args.method in PRUNING:
        return [_pruning_modifier(args, ignore)]
    groups = _quant_scheme(args)
    if args.method in ("rtn", "fp8", "nvfp4"):
        # Plain min/max round-to-nearest: the same observer, no calibration-driven algorithm.
        return [QuantizationModifier(config_groups=groups, ignore=ignore)]
    if args.method == "gptq":
        actorder = None if args.actorder == "none" else args.actorder
        return [
            GPTQModifier(
                config_groups=groups,
                ignore=ignore,
                block_size=args.block_size,
                dampening_frac=args.dampening_frac,
                actorder=actorder,
            )
        ]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    duo = {"true": True, "false": False, "both": "both"}[args.awq_duo_scaling]
    awq_kwargs = {"duo_scaling": duo, "n_grid": args.awq_n_grid}
    if not causal:
        awq_kwargs["mappings"] = _bert_awq_mappings()
    return [AWQModifier(**awq_kwargs), QuantizationModifier(config_groups=groups, ignore=ignore)]


def _batches(tokenizer, texts: list[str], max_len: int, batch_size: int = 16):
    for i in range(0, len(texts), batch_size):
        yield tokenizer(
            [t.strip() for t in texts[i : i + batch_size]],
            truncation=True,
            max_length=max_len,
            padding=True,
            return_tensors="pt",
        )


def _sentence_embeddings(model, tokenizer, texts: list[str], max_len: int):
    """Mean of last_hidden_state over real tokens, L2-normalised (all-MiniLM-L6-v2's pipeline)."""
    import torch
    import torch.nn.functional as F

    rows = []
    with torch.no_grad():
        for enc in _batches(tokenizer, texts, max_len):
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(F.normalize(pooled, p=2, dim=1))
    return torch.cat(rows)


def _perplexity(model, tokenizer, texts: list[str], max_len: int) -> float:
    """exp(total next-token NLL / predicted tokens), each text on its own, padding excluded."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.no_grad():
        for enc in _batches(tokenizer, texts, max_len, batch_size=8):
            ids, mask = enc["input_ids"], enc["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            count += int((targets != -100).sum())
    return math.exp(nll / count)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for name in ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets", "accelerate"):
        with contextlib.suppress(Exception):  # a missing optional package is just left out
            out[name] = version(name)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    # llm-compressor logs through loguru to stderr; stdout is kept for the JSON result alone.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.progress:
        # tqdm reads this at every bar; llm-compressor draws one per layer per pass.
        os.environ["TQDM_DISABLE"] = "1"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from llmcompressor import oneshot

    t0 = time.perf_counter()
    model, tokenizer, causal = _load(args.model_dir)
    load_seconds = time.perf_counter() - t0

    calib_texts = _read_texts(args.calib_file, args.num_samples)
    dataset = _calibration_dataset(tokenizer, calib_texts, args.max_seq_len)
    eval_texts = _read_texts(args.eval_file) if args.eval_file else []

    quality: dict[str, float] = {}
    fp_embeddings = None
    if eval_texts:
        if causal:
            quality["fp_perplexity"] = _perplexity(model, tokenizer, eval_texts, args.eval_max_len)
        else:
            fp_embeddings = _sentence_embeddings(model, tokenizer, eval_texts, args.eval_max_len)

    recipe = _recipe(args, causal)
    patched_pinning = _patch_cpu_pinning()
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(calib_texts),
        max_seq_length=args.max_seq_len,
        batch_size=1,
        shuffle_calibration_samples=False,
    )
    quant_seconds = time.perf_counter() - t0
    peak_after_quant = _peak_rss_mib()

    if eval_texts:
        if causal:
            quality["perplexity"] = _perplexity(model, tokenizer, eval_texts, args.eval_max_len)
        else:
            q_embeddings = _sentence_embeddings(model, tokenizer, eval_texts, args.eval_max_len)
            cos = (q_embeddings * fp_embeddings).sum(dim=1)
            quality["mean_cosine"] = cos.mean().item()
            quality["min_cosine"] = cos.min().item()
        quality["n_eval_texts"] = len(eval_texts)

    save_seconds = None
    if not args.no_save:
        t0 = time.perf_counter()
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out_dir, save_compressed=True)
        tokenizer.save_pretrained(args.out_dir)
        save_seconds = time.perf_counter() - t0

    result = {
        "tool": "llmcompressor",
        "versions": _versions(),
        "model_dir": str(args.model_dir),
        "model_kind": "causal-lm" if causal else "encoder",
        "method": args.method,
        "scheme": {"bits": args.bits, "group_size": args.group_size or None, "symmetric": not args.asym}
        if args.method in ("gptq", "awq", "rtn")
        else {"sparsity": args.sparsity}
        if args.method in PRUNING
        else {"fp8": "FP8_DYNAMIC weights only (E4M3, per channel)", "nvfp4": "NVFP4A16"}[args.method],
        "gptq": {
            "actorder": args.actorder,
            "dampening_frac": args.dampening_frac,
            "block_size": args.block_size,
        }
        if args.method == "gptq"
        else {"dampening_frac": args.dampening_frac, "block_size": args.block_size}
        if args.method == "sparsegpt"
        else None,
        "awq": {"n_grid": args.awq_n_grid, "duo_scaling": args.awq_duo_scaling}
        if args.method == "awq"
        else None,
        "num_samples": len(calib_texts),
        "calib_tokens": int(sum(len(x) for x in dataset["input_ids"])),
        "max_seq_len": args.max_seq_len,
        "threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "quant_seconds": quant_seconds,
        "save_seconds": save_seconds,
        "rss_before_quant_mib": rss_before,
        "peak_rss_after_quant_mib": peak_after_quant,
        "peak_rss_mib": _peak_rss_mib(),
        "quality": quality,
        "cpu_pinning_patched": patched_pinning,
        "out_dir": None if args.no_save else str(args.out_dir),
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
