"""weightwatcher's side of the inspect benchmark: runs inside bench/.venv-weightwatcher (bench/peer_env.sh).

Loads a Hugging Face model directory with the class its config names (so module names are the checkpoint's
tensor names minus ``.weight``), runs ``weightwatcher.WeightWatcher(model).analyze()`` with its default
settings, and prints one JSON object: per analyzed layer its checkpoint tensor name, alpha, alpha_weighted,
xmin, D and the matrix shape, plus the wall time of analyze(), the load time and the process's peak RSS.

    bench/.venv-weightwatcher/bin/python bench/inspect_peer.py MODEL_DIR > ww.json

Peak RSS is the process's maximum resident set (VmHWM), so it includes the loaded model, as a user of
weightwatcher would pay it. ``--threads N`` sets torch's thread count (the driver pins OMP/MKL too).
"""

import argparse
import json
import logging
import sys
import time

import torch
import transformers
import weightwatcher


def load_model(model_dir: str) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    if len(architectures) != 1 or not hasattr(transformers, architectures[0]):
        raise SystemExit(
            f"{model_dir}: config.architectures must name one transformers class, got {architectures}"
        )
    model_class = getattr(transformers, architectures[0])
    return model_class.from_pretrained(model_dir, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)

    start = time.perf_counter()
    model = load_model(args.model_dir)
    load_seconds = time.perf_counter() - start
    tensor_names = {name for name, _ in model.named_parameters()}
    # A tied output head (GPT-2's lm_head) is the input embedding's tensor: named_parameters lists it once,
    # under the embedding's name, and the checkpoint stores it once. weightwatcher analyses it twice.
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - tensor_names

    start = time.perf_counter()
    details = weightwatcher.WeightWatcher(model=model).analyze()
    analyze_seconds = time.perf_counter() - start

    layers = []
    for row in details.to_dict(orient="records"):
        name = f"{row['longname']}.weight"
        if name in tied:
            continue
        if name not in tensor_names:
            raise SystemExit(f"weightwatcher layer {row['longname']!r} has no tensor {name!r} in the model")
        layers.append(
            {
                "name": name,
                "alpha": float(row["alpha"]),
                "alpha_weighted": float(row["alpha_weighted"]),
                "xmin": float(row["xmin"]),
                "D": float(row["D"]),
                "N": int(row["N"]),
                "M": int(row["M"]),
            }
        )
    with open("/proc/self/status") as f:  # VmHWM, the peak of this process (not of the parent it forked from)
        peak_rss_mib = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    json.dump(
        {
            "weightwatcher": weightwatcher.__version__,
            "model_dir": args.model_dir,
            "load_seconds": load_seconds,
            "analyze_seconds": analyze_seconds,
            "peak_rss_mib": peak_rss_mib,
            "layers": layers,
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
