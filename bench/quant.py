"""Quantization benchmark: weightkit's RTN, GPTQ and AWQ vs llm-compressor's, same model, data and scheme.

    flock /tmp/weightkit-bench.lock .venv/bin/python bench/quant.py     # writes bench/results/quant.json

Each job (tool x method x model) runs in a fresh process, so its peak RSS is its own. Both tools get
the same calibration texts (4- and 3-bit symmetric weights, group size 128, 128 texts of at most 256
tokens). Quality is scored afterwards in this venv by the same code for both outputs: the peer's
checkpoint loads with transformers, weightkit's with ``weightkit.load``.
- MiniLM (bundled all-MiniLM-L6-v2): mean cosine of sentence embeddings to full precision on 256
  held-out stdlib docstrings (calibration: other stdlib docstrings).
- small Llama (bench/small_llama.py, trained here on Shakespeare): perplexity on 256 held-out passages.
Then GPTQ's memory: the same job with 128 and 512 calibration texts, for both tools.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    ensure_peer_env,
    measure,
    minilm_path,
    peer_versions,
    read_jsonl,
    run_json,
    run_peer_quant,
    weightkit_source_state,
    write_jsonl,
    write_result,
)

CALIB_TEXTS, MAX_LEN, EVAL_TEXTS = 128, 256, 256
BITS = (4, 3)  # W4 g128 is nearly lossless on these small models; W3 shows the methods apart
MEMORY_CALIB_TEXTS = (128, 512)
METHODS = ("rtn", "gptq", "awq")
TOOLS = ("weightkit", "llm-compressor")

DESCRIPTION = {
    "scheme": "W4A16 and W3A16: 4- or 3-bit symmetric integer weights, one scale per group of 128 input "
    "columns; "
    "embeddings, lm_head and norms stay in full precision (MiniLM: llm-compressor also quantizes the "
    "pooler, weightkit leaves it)",
    "settings": f"{CALIB_TEXTS} calibration texts of at most {MAX_LEN} tokens, the same for both tools; "
    "weightkit with its defaults (GPTQ: act-order, damp 0.01, Hessian shrinkage; AWQ: duo scaling, "
    "clip search), llm-compressor with its defaults (GPTQ actorder static, dampening 0.01; AWQ duo "
    "scaling, n_grid 20, then minmax round-to-nearest); one text per llm-compressor batch, 8 per "
    "weightkit batch",
    "quant_seconds": "weightkit: its streamed compress_checkpoint (what `weightkit compress` runs), "
    "reading the checkpoint and writing the output included; llm-compressor: the oneshot call alone "
    "(model already loaded, saving excluded)",
    "wall_seconds_with_load_and_save": "the whole job's process, start to exit, both tools",
    "peak_rss_mib": "VmHWM (peak resident memory) of the job's own process, loading and saving included",
    "rss_before_mib": "resident memory just before quantizing (weightkit: before compress_checkpoint, "
    "nothing loaded yet; llm-compressor: model loaded, before oneshot)",
    "quality": "minilm: mean cosine to the fp32 sentence embeddings of 256 held-out stdlib docstrings "
    "(higher is better); small-llama: perplexity on 256 held-out passages of three plays it never "
    "saw (lower is better; fp_perplexity is the unquantized model's)",
    "ratio_*": "weightkit / llm-compressor for the same method (time and memory: below 1 means weightkit "
    "is faster / leaner; minilm quality: above 1 is better; small-llama perplexity: below 1 is better)",
    "results": "one row per model and bit width; '{method}/{tool}' entries hold one job each",
    "gptq_memory": f"GPTQ W4 with {' and '.join(map(str, MEMORY_CALIB_TEXTS))} calibration texts (at most "
    f"{MAX_LEN} tokens each), otherwise as above: how peak memory grows with the calibration set",
}


def _texts(model: str, n_calib: int = CALIB_TEXTS) -> tuple[list[str], list[str]]:
    if model == "minilm":
        from weightkit.data import stdlib_docstrings

        return stdlib_docstrings("calib")[:n_calib], stdlib_docstrings("eval")[:EVAL_TEXTS]
    from small_llama import corpus_passages, spread

    return spread(corpus_passages("train"), n_calib), spread(corpus_passages("eval"), EVAL_TEXTS)


def _model_dir(model: str) -> Path:
    if model == "minilm":
        return minilm_path()
    from small_llama import ensure_small_llama

    return ensure_small_llama()


def worker(model: str, method: str, bits: str, calib_file: str, out: str) -> dict:
    """weightkit's side of one job, in its own process; prints what the peer runner prints.

    It runs what ``weightkit compress`` runs: the streamed checkpoint-to-checkpoint path, timed whole
    (reading and writing included, which the peer's ``oneshot`` time leaves out).
    """
    from weightkit.compress import AWQConfig, GPTQConfig, RTNConfig, compress_checkpoint

    texts = read_jsonl(calib_file)
    fields = {"bits": int(bits), "group_size": 128}
    if method != "rtn":
        fields.update(calib_samples=len(texts), calib_max_length=MAX_LEN)
    config = {"gptq": GPTQConfig, "awq": AWQConfig, "rtn": RTNConfig}[method](**fields)
    model_dir = _model_dir(model)
    with measure() as m:
        compress_checkpoint(model_dir, out, config, data=texts, progress=False, device="cpu")
    return {
        "quant_seconds": m["seconds"],
        "peak_rss_mib": m["peak_rss_mib"],
        "rss_before_mib": m["rss_before_mib"],
    }


def quality(model: str, out: Path, eval_texts: list[str], tool: str) -> float:
    from transformers import AutoModel, AutoModelForCausalLM

    from weightkit import load
    from weightkit.eval import embedding_fidelity, perplexity
    from weightkit.models import load_model

    reference, tokenizer, _ = load_model(_model_dir(model))
    if tool == "weightkit":
        quantized = load(out)
    else:
        cls = AutoModel if model == "minilm" else AutoModelForCausalLM
        quantized = cls.from_pretrained(out, local_files_only=True).eval()
    if model == "minilm":
        return embedding_fidelity(reference, quantized, tokenizer, eval_texts)
    return perplexity(quantized, tokenizer, eval_texts, max_length=MAX_LEN)


def _run(tool: str, model: str, method: str, bits: int, calib_file: Path, n_calib: int, out: Path) -> dict:
    """One job in its own process; its time, memory and wall time."""
    start = time.perf_counter()
    if tool == "weightkit":
        argv = ["--worker", model, method, str(bits), str(calib_file), str(out)]
        run = run_json([sys.executable, __file__, *argv])
    else:
        run = run_peer_quant(
            _model_dir(model), calib_file, method, out, bits=bits, num_samples=n_calib, max_seq_len=MAX_LEN
        )
        run["rss_before_mib"] = run["rss_before_quant_mib"]
    return {
        "quant_seconds": round(run["quant_seconds"], 2),
        "peak_rss_mib": round(run["peak_rss_mib"], 1),
        "rss_before_mib": round(run["rss_before_mib"], 1),
        "wall_seconds_with_load_and_save": round(time.perf_counter() - start, 2),
    }


def _calib_tokens(model: str, texts: list[str]) -> int:
    from weightkit.models import load_tokenizer

    tokenizer = load_tokenizer(_model_dir(model))
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LEN)["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--worker", nargs=5, metavar=("MODEL", "METHOD", "BITS", "CALIB", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--models", default="minilm,small-llama")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bits", default=",".join(map(str, BITS)))
    parser.add_argument("--no-memory", action="store_true", help="skip the GPTQ memory runs")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    ensure_peer_env()
    load_at_start = os.getloadavg()
    results, memory = [], []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        for model in args.models.split(","):
            calib, held_out = _texts(model)
            calib_file = write_jsonl(calib, Path(tmp) / f"{model}-calib.jsonl")
            fp_perplexity = None
            if model != "minilm":
                from weightkit.eval import perplexity
                from weightkit.models import load_model

                net, tok, _ = load_model(_model_dir(model))
                fp_perplexity = perplexity(net, tok, held_out, max_length=MAX_LEN)
            for bits in map(int, args.bits.split(",")):
                row = {
                    "model": model,
                    "bits": bits,
                    "group_size": 128,
                    "calib_texts": len(calib),
                    "calib_tokens": _calib_tokens(model, calib),
                    "eval_texts": len(held_out),
                }
                if fp_perplexity is not None:
                    row["fp_perplexity"] = fp_perplexity
                for method in args.methods.split(","):
                    for tool in TOOLS:  # the two tools alternate, so load changes hit both alike
                        out = Path(tmp) / f"{model}-w{bits}-{method}-{tool}"
                        entry = _run(tool, model, method, bits, calib_file, len(calib), out)
                        entry["quality"] = quality(model, out, held_out, tool)
                        entry["load_average_after"] = os.getloadavg()[0]
                        row[f"{method}/{tool}"] = entry
                        print(model, f"w{bits}", method, tool, entry, flush=True)
                    for key in ("quant_seconds", "peak_rss_mib", "quality"):
                        ours, theirs = row[f"{method}/weightkit"][key], row[f"{method}/llm-compressor"][key]
                        row[f"{method}/ratio_{key}"] = round(ours / theirs, 3)
                results.append(row)
            if args.no_memory:
                continue
            for n_calib in MEMORY_CALIB_TEXTS:
                texts, _ = _texts(model, n_calib)
                file = write_jsonl(texts, Path(tmp) / f"{model}-calib-{n_calib}.jsonl")
                entry = {
                    "model": model,
                    "calib_texts": len(texts),
                    "calib_tokens": _calib_tokens(model, texts),
                }
                for tool in TOOLS:
                    out = Path(tmp) / f"mem-{model}-{n_calib}-{tool}"
                    entry[tool] = _run(tool, model, "gptq", 4, file, len(texts), out)
                    print(model, "gptq memory", n_calib, tool, entry[tool], flush=True)
                memory.append(entry)
    path = write_result(
        "quant",
        {
            "what": DESCRIPTION,
            "weightkit_commit": weightkit_source_state(),
            "peer_versions": {
                k: v
                for k, v in peer_versions().items()
                if k in ("llmcompressor", "compressed-tensors", "transformers", "torch")
            },
            "load_average_at_start": load_at_start,
            "results": results,
            "gptq_memory": memory,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
