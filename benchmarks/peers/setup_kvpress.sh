#!/usr/bin/env bash
# NVIDIA kvpress in its own virtual environment (it pins transformers < 5.3); the CPU torch wheel first.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-kvpress
.venv-kvpress/bin/pip install -q torch==2.13.0
.venv-kvpress/bin/pip install -q kvpress==0.5.5
# transformers' QuantizedCache backends (kvpress' quantized cache, issue 22); --no-deps keeps the CPU torch above
# (quanto's other needs: numpy, safetensors, huggingface_hub come with transformers; hqq's: accelerate, tqdm, termcolor
# with kvpress). DISABLE_CUDA=1: hqq's setup.py skips building its CUDA kernels (its ATen/torch path runs on CPU).
.venv-kvpress/bin/pip install -q --no-deps optimum-quanto==0.2.7 ninja==1.13.2
DISABLE_CUDA=1 .venv-kvpress/bin/pip install -q --no-deps hqq==0.2.8.post1 einops==0.8.1
.venv-kvpress/bin/python -c "import kvpress, transformers; import optimum.quanto, hqq; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__)"
