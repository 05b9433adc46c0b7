"""Peer side of the compression benchmark: HQQ (Half-Quadratic Quantization) of one model's linears.

Runs under ``bench/.venv-hqq/bin/python`` (``bash bench/peer_env.sh hqq``): hqq 0.2.8.post1 on the CPU
build of torch. ``bench/compress.py`` starts it as a subprocess and reads the one JSON object it prints on
the last line of stdout.

What it does:

1. loads the model with transformers in float32 (a causal LM, or a bare encoder such as MiniLM);
2. quantizes every ``nn.Linear`` whose name matches no ``--ignore`` regex with HQQ's own
   ``Quantizer.quantize`` (``optimize=True``: its half-quadratic search for the zero point and scale,
   calibration-free), groups of ``--group-size`` input columns (``axis=1``, HQQ's recommended axis),
   ``device="cpu"``, computing in float32. Scale and zero are then rounded to float16, the dtype HQQ keeps
   them in with its default ``compute_dtype``, so the size counted is the size HQQ stores;
3. replaces each weight by ``Quantizer.dequantize`` of what was stored and saves the model as an ordinary
   float32 checkpoint, which the benchmark scores with the same code as every other output (transformers
   loads it; no HQQ kernel is involved);
4. reports ``stored_bytes``: HQQ's bit-packed codes + float16 scales and zeros of the quantized linears,
   plus every other tensor of the model as saved (float32), i.e. what an HQQ checkpoint would hold.

Why not ``HQQLinear`` / ``AutoHQQHFModel``: they move the weights to their ``device`` and pick CUDA
kernels; the plain ``Quantizer`` is the same algorithm (HQQLinear calls it) and runs on the CPU.

Output (last stdout line): ``{"tool": "hqq", "quant_seconds", "peak_rss_mib", "rss_before_quant_mib",
"stored_bytes", "quantized_linears", "versions", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("out_dir", help="where the dequantized float32 checkpoint is written")
    p.add_argument("--bits", type=int, required=True, choices=(1, 2, 3, 4, 8))
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--ignore", nargs="*", default=[], help="regexes of linear names left in full precision")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from importlib.metadata import version

    import torch
    from hqq.core.quantize import Quantizer
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(args.model_dir)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    ignore = [re.compile(pattern) for pattern in args.ignore]
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(p.fullmatch(name) for p in ignore)
    ]

    rss_before = _status_mib("VmRSS")
    quantized_bytes, quantized_params = 0, set()
    start = time.perf_counter()
    with torch.no_grad():
        for name, module in linears:
            codes, meta = Quantizer.quantize(
                module.weight.data,
                nbits=args.bits,
                group_size=args.group_size,
                optimize=True,
                axis=1,
                compute_dtype=torch.float32,
                device="cpu",
            )
            meta["scale"], meta["zero"] = (meta[k].half().float() for k in ("scale", "zero"))
            meta["compute_dtype"] = torch.float32
            module.weight.data = Quantizer.dequantize(codes, meta).to(torch.float32)
            quantized_bytes += codes.numel() * codes.element_size() + 2 * (meta["scale"].numel() * 2)
            quantized_params.add(f"{name}.weight")
    quant_seconds = time.perf_counter() - start
    peak_after_quant = _status_mib("VmHWM")

    state = model.state_dict()
    other_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k not in quantized_params)
    model.save_pretrained(args.out_dir)
    AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(args.out_dir)
    result = {
        "tool": "hqq",
        "versions": {name: version(name) for name in ("hqq", "torch", "transformers")},
        "bits": args.bits,
        "group_size": args.group_size,
        "quantized_linears": len(linears),
        "quant_seconds": quant_seconds,
        "rss_before_quant_mib": rss_before,
        "peak_rss_after_quant_mib": peak_after_quant,
        "peak_rss_mib": _status_mib("VmHWM"),
        "stored_bytes": quantized_bytes + other_bytes,
        "threads": torch.get_num_threads(),
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
