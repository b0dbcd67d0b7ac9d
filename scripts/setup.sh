#!/usr/bin/env bash
# Create .venv in the repository and install the project into it.
#   bash scripts/setup.sh         runtime: CPU build of torch 2.13.0 + this package
#   bash scripts/setup.sh --dev   tests: torch 2.14.1 + torchvision 0.29.1 (timm, used by the tests, needs
#                                 torchvision) + this package with pytest, ruff and timm
# On a GPU machine, install the CUDA build of torch that matches your driver first, then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
if [ "${1:-}" = "--dev" ]; then
    .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
    .venv/bin/pip install --quiet -e ".[dev]"
else
    .venv/bin/pip install --quiet torch==2.13.0
    .venv/bin/pip install --quiet -e .
fi
.venv/bin/python -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
