"""Quantization benchmark: weightkit's GPTQ and AWQ vs llm-compressor's, same model, data and scheme.

    .venv/bin/python bench/quant.py            # writes bench/results/quant.json

Each job (tool x method x model) runs in a fresh process, so its peak RSS is its own. Both tools get
the same calibration texts (W4A16: 4-bit symmetric weights, group size 128, 128 texts of at most 256
tokens). Quality is scored afterwards in this venv by the same code for both outputs: the peer's
checkpoint loads with transformers, weightkit's with ``weightkit.load``.
- MiniLM (bundled all-MiniLM-L6-v2): mean cosine of sentence embeddings to full precision on 256
  held-out stdlib docstrings (calibration: other stdlib docstrings).
- small Llama (bench/small_llama.py, trained here on Shakespeare): perplexity on held-out plays.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    ensure_peer_env,
    measure,
    minilm_path,
    read_jsonl,
    run_json,
    run_peer_quant,
    write_jsonl,
    write_result,
)

CALIB_TEXTS, MAX_LEN, EVAL_TEXTS = 128, 256, 256


def _texts(model: str) -> tuple[list[str], list[str]]:
    if model == "minilm":
        from weightkit.data import stdlib_docstrings

        return stdlib_docstrings("calib")[:CALIB_TEXTS], stdlib_docstrings("eval")[:EVAL_TEXTS]
    from small_llama import corpus_passages, spread

    return spread(corpus_passages("train"), CALIB_TEXTS), spread(corpus_passages("eval"), EVAL_TEXTS)


def _model_dir(model: str) -> Path:
    if model == "minilm":
        return minilm_path()
    from small_llama import ensure_small_llama

    return ensure_small_llama()


def worker(model: str, method: str, calib_file: str, out: str) -> dict:
    """weightkit's side of one job, in its own process; prints what the peer runner prints.

    It runs what ``weightkit compress`` runs: the streamed checkpoint-to-checkpoint path, timed whole
    (reading and writing included, which the peer's ``oneshot`` time leaves out).
    """
    from weightkit.compress import AWQConfig, GPTQConfig, RTNConfig, compress_checkpoint

    fields = {"bits": 4, "group_size": 128}
    if method != "rtn":
        fields.update(calib_samples=CALIB_TEXTS, calib_max_length=MAX_LEN)
    config = {"gptq": GPTQConfig, "awq": AWQConfig, "rtn": RTNConfig}[method](**fields)
    with measure() as m:
        compress_checkpoint(_model_dir(model), out, config, data=read_jsonl(calib_file), progress=False)
    return {"quant_seconds": m["seconds"], "peak_rss_mib": m["peak_rss_mib"]}


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--worker", nargs=4, metavar=("MODEL", "METHOD", "CALIB", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--models", default="minilm,small-llama")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    ensure_peer_env()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        for model in args.models.split(","):
            calib, held_out = _texts(model)
            calib_file = write_jsonl(calib, Path(tmp) / f"{model}-calib.jsonl")
            row = {"model": model, "calib_texts": len(calib), "eval_texts": len(held_out)}
            if model != "minilm":
                from weightkit.eval import perplexity
                from weightkit.models import load_model

                net, tok, _ = load_model(_model_dir(model))
                row["fp_perplexity"] = perplexity(net, tok, held_out, max_length=MAX_LEN)
            for method in ("rtn", "gptq", "awq"):
                for tool in ("weightkit", "llm-compressor"):
                    out = Path(tmp) / f"{model}-{method}-{tool}"
                    start = time.perf_counter()
                    if tool == "weightkit":
                        run = run_json(
                            [sys.executable, __file__, "--worker", model, method, str(calib_file), str(out)]
                        )
                    else:
                        run = run_peer_quant(
                            _model_dir(model),
                            calib_file,
                            method,
                            out,
                            num_samples=len(calib),
                            max_seq_len=MAX_LEN,
                        )
                    entry = {
                        "quant_seconds": round(run["quant_seconds"], 2),
                        "peak_rss_mib": round(run["peak_rss_mib"], 1),
                        "wall_seconds_with_load_and_save": round(time.perf_counter() - start, 2),
                        "quality": quality(model, out, held_out, tool),
                    }
                    row[f"{method}/{tool}"] = entry
                    print(model, method, tool, entry, flush=True)
                for key in ("quant_seconds", "peak_rss_mib", "quality"):
                    ours, theirs = row[f"{method}/weightkit"][key], row[f"{method}/llm-compressor"][key]
                    row[f"{method}/ratio_{key}"] = round(ours / theirs, 3)
            results.append(row)
    path = write_result(
        "quant",
        {
            "scheme": "W4A16: 4-bit symmetric, group size 128",
            "timing": "quant_seconds: weightkit's streamed compress_checkpoint including reading the "
            "checkpoint and writing the output; llm-compressor's oneshot call alone (model already loaded, "
            "save excluded). peak_rss_mib: VmHWM of each job's own process, loading and saving included.",
            "quality": "minilm: mean cosine to fp32 sentence embeddings (higher is better); "
            "small-llama: perplexity on held-out plays (lower is better)",
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
