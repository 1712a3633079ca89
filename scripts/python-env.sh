#!/usr/bin/env bash
# Creates (once) the Python environment used ONLY to generate test fixtures and reference outputs
# with Hugging Face transformers. multiclip itself never needs Python.
# Usage: source <(scripts/python-env.sh)   or   PY=$(scripts/python-env.sh --python)
# Location: $MULTICLIP_VENV (default ~/.venvs/fixtures).
set -euo pipefail
venv="${MULTICLIP_VENV:-$HOME/.venvs/fixtures}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers, safetensors, numpy, PIL, onnx' 2>/dev/null; then
  echo "creating fixture venv in $venv (torch + transformers: a large download)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers safetensors numpy pillow onnx >&2
fi
echo "$venv/bin/python"
