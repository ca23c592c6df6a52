#!/usr/bin/env bash
# Install PyTorch into the given interpreter's environment without ever pulling a CUDA build
# onto a machine that has no GPU. A torch that is already importable is kept as it is.
set -euo pipefail
PY="$1"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if "$PY" -c "import torch" 2>/dev/null; then
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: kept"
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==${TORCH_VERSION}"            # PyPI's default build (CUDA)
elif "$PY" -m pip install -q "torch==${TORCH_VERSION}+cpu" 2>/dev/null; then
    :                           # the CPU build by its local label: a wheel on disk (find-links)
else
    "$PY" -m pip install -q "torch==${TORCH_VERSION}" \
        --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
"$PY" -c "import torch; print('installed torch', torch.__version__)"
