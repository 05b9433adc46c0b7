#!/usr/bin/env bash
# Creates bench/.venv-mergekit with the peer merge tool (mergekit) on a CPU-only torch.
#
# Why a separate venv: mergekit pins its own versions of transformers, pydantic, accelerate ...; the
# merge benchmark (bench/merge.py) runs its `mergekit-yaml` command as a subprocess from this venv.
#
# Why torch first and pinned again: an unpinned torch would pull a multi-GB CUDA build. The CPU wheel
# is installed first, then pinned in the same `pip install` as mergekit, so the resolver keeps it (or
# fails loudly) instead of swapping in a CUDA build.
#
# Usage: bash bench/mergekit_env.sh        (idempotent; re-installs only when the pins below change)
#        MERGEKIT_VENV=/other/dir bash bench/mergekit_env.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${MERGEKIT_VENV:-$HERE/.venv-mergekit}"
PYTHON="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
MERGEKIT_PIN="mergekit==0.1.5"
EXTRA_PINS="psutil"

STAMP="$VENV/.peer-installed"
WANT="$TORCH_PIN $MERGEKIT_PIN $EXTRA_PINS"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "mergekit venv up to date: $VENV"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "$TORCH_PIN"
"${PIP[@]}" "$MERGEKIT_PIN" $EXTRA_PINS "$TORCH_PIN"
"$VENV/bin/python" -c "import torch, mergekit; assert torch.version.cuda is None, torch.version.cuda"
test -x "$VENV/bin/mergekit-yaml"
"$VENV/bin/python" -m pip freeze > "$VENV/peer-freeze.txt"
echo "$WANT" > "$STAMP"
echo "mergekit venv ready: $VENV"
grep -iE '^(torch|mergekit|transformers|safetensors|accelerate|pydantic|numpy)==' \
    "$VENV/peer-freeze.txt" || true
