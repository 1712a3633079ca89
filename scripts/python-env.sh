#!/usr/bin/env bash
# Creates (once) the Python environment used ONLY to generate test fixtures and reference outputs
# with Hugging Face transformers. multiclip itself never needs Python.
# Usage: PY=$(scripts/python-env.sh)
#        PYTHONPATH=$(scripts/python-env.sh --pillow-lt13) "$PY" ...   the references need Pillow < 13
#        (see scripts/make-clip-blip-fixtures.py): an overlay in models/.pillow-lt13, printed.
# Location: $MULTICLIP_VENV (default ~/.venvs/fixtures).
set -euo pipefail
venv="${MULTICLIP_VENV:-$HOME/.venvs/fixtures}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers, safetensors, numpy, PIL, onnx' 2>/dev/null; then
  echo "creating fixture venv in $venv (torch + transformers: a large download)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers safetensors numpy pillow onnx >&2
fi
if [ "${1:-}" = --pillow-lt13 ]; then
  overlay=$(cd "$(dirname "$0")/.." && pwd)/models/.pillow-lt13
  [ -d "$overlay/PIL" ] || "$venv/bin/python" -m pip install -q --target "$overlay" 'pillow<13' >&2
  echo "$overlay"
else
  echo "$venv/bin/python"
fi
