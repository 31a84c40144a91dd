#!/usr/bin/env bash
# NVIDIA kvpress in its own virtual environment (it pins transformers < 5.3); the CPU torch wheel first.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-kvpress
.venv-kvpress/bin/pip install -q torch==2.13.0
.venv-kvpress/bin/pip install -q kvpress==0.5.5
.venv-kvpress/bin/python -c "import kvpress, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__)"
