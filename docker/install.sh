#!/bin/sh
# Builds Lanner's virtualenv. The Dockerfile's builder stage runs this, and so does
# tests/deploy/test_compose.py (outside Docker), so the image's install logic is tested for real.
#
#   sh docker/install.sh torch VENV       create VENV and install the CPU build of torch into it
#   sh docker/install.sh app VENV [SRC]   install the project at SRC (default .) into VENV
#
# torch comes first and from TORCH_INDEX_URL (default: PyTorch's CPU-only index): a plain
# `pip install torch` on Linux x86_64 fetches a CUDA build plus GBs of nvidia-* wheels.
# `pip install .` then finds torch==TORCH_VERSION already satisfied and leaves it alone.
# TORCH_VERSION must equal the pin in pyproject.toml (checked below); the Dockerfile passes it.
# pip's own configuration (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, pip.conf) still
# applies: on a machine without network a local wheel from --find-links satisfies the pin after
# the CPU index fails to answer.
set -eu

PYTHON="${PYTHON:-python3}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"

usage() { echo "usage: $0 torch VENV | app VENV [SRC]" >&2; exit 2; }
[ $# -ge 2 ] || usage
step=$1
venv=$2
src=${3:-.}

case "$step" in
torch)
    pinned=$(sed -n 's/^[[:space:]]*"torch==\([^"]*\)".*/\1/p' "$src/pyproject.toml")
    [ -n "$pinned" ] || { echo "install.sh: no torch==X pin in $src/pyproject.toml" >&2; exit 1; }
    TORCH_VERSION="${TORCH_VERSION:-$pinned}"
    if [ "$TORCH_VERSION" != "$pinned" ]; then
        echo "install.sh: TORCH_VERSION=$TORCH_VERSION but pyproject.toml pins torch==$pinned" >&2
        exit 1
    fi
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
    ;;
app)
    "$venv/bin/pip" install "$src"
    # Fail the build rather than ship a CUDA torch (multi-GB, useless on a CPU server).
    "$venv/bin/python" - <<'PY'
import importlib.metadata as md
import sys

import torch

cuda = [d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-")]
if torch.version.cuda is not None or cuda:
    sys.exit(f"install.sh: a CUDA build of torch got installed (torch {torch.__version__}, {cuda})")
print(f"install.sh: torch {torch.__version__} (CPU build)")
PY
    ;;
*)
    usage
    ;;
esac
