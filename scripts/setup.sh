#!/usr/bin/env bash
# Create .venv in the repository and install the project into it, at the versions the test suite last passed with.
#   bash scripts/setup.sh                  runtime: CPU build of torch 2.13.0 + this package
#   bash scripts/setup.sh --dev            tests: torch 2.14.1 + torchvision 0.29.1 (timm, used by the tests, needs
#                                          torchvision) + this package with its `dev` extra (pytest, ruff, timm,
#                                          Meta-World, the serving and video extras)
#   bash scripts/setup.sh --dev --latest   the same, but the newest releases that pyproject.toml's ranges allow
#                                          instead of the pinned ones (to test against new transformers releases)
# The pins are constraints.txt (every package but torch, which this script pins itself). pyproject.toml keeps the
# supported ranges for `pip install` into your own environment. On a GPU machine, install the CUDA build of torch that
# matches your driver first, then `pip install -c constraints.txt -e .` (or without -c for the newest releases).
set -euo pipefail
cd "$(dirname "$0")/.."
dev=false
latest=false
for option in "$@"; do
    case "$option" in
        --dev) dev=true ;;
        --latest) latest=true ;;
        *) echo "unknown option $option (use --dev and/or --latest)" >&2; exit 2 ;;
    esac
done
if $dev; then
    torch_pins="torch==2.14.1 torchvision==0.29.1"
    project=".[dev]"
else
    torch_pins="torch==2.13.0"
    project="."
fi
python3 -m venv .venv
.venv/bin/pip install --quiet $torch_pins
if $latest; then
    # everything at its newest allowed release, except torch, which stays the build installed above
    echo "$torch_pins" | tr ' ' '\n' > .venv/torch-constraints.txt
    .venv/bin/pip install --quiet --upgrade --upgrade-strategy eager -c .venv/torch-constraints.txt -e "$project"
else
    .venv/bin/pip install --quiet -c constraints.txt -e "$project"
fi
if $dev; then
    # openpi's client, which the serving tests drive, pins numpy<2 although it runs on numpy 2: installed without
    # its dependencies (dm-tree, msgpack and websockets come with the dev extra)
    .venv/bin/pip install --quiet --no-deps openpi-client==0.1.2
fi
.venv/bin/python -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
