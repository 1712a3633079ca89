#!/usr/bin/env python3
"""Reference outputs of transformers (PIL image processor) for the real DINOv2-S and
all-MiniLM-L6-v2 weights in models/, on the first N rows of data/demo/train.csv, for the
`real_weights_match_transformers` test in tests/backbones.rs. Driven by check-real-parity.sh.

Writes models/.parity/expected.safetensors (pixel_values, image, image_patch_mean, text) and
models/.parity/inputs.json (image paths and captions, in row order).
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file
from transformers import AutoTokenizer, BertModel, Dinov2Model
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "demo"
OUT = ROOT / "models" / ".parity"


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    torch.set_num_threads(2)
    with open(DATA / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:count]
    images = [str((DATA / "data" / r["ImageID"]).relative_to(ROOT)) for r in rows]
    captions = [r["Caption"] for r in rows]

    dinov2_dir = ROOT / "models" / "dinov2-small"
    processor = BitImageProcessorPil.from_pretrained(dinov2_dir)
    model = Dinov2Model.from_pretrained(dinov2_dir, dtype=torch.float32).eval()
    pixels = processor([Image.open(ROOT / p) for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = torch.cat([model(pixel_values=chunk).last_hidden_state for chunk in pixels.split(8)])

    minilm_dir = ROOT / "models" / "all-MiniLM-L6-v2"
    max_len = json.loads((minilm_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    bert = BertModel.from_pretrained(minilm_dir, dtype=torch.float32, add_pooling_layer=False).eval()
    batch = tokenizer(captions, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        tokens = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    text = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)

    OUT.mkdir(parents=True, exist_ok=True)
    save_file({
        "pixel_values": pixels.numpy(),
        "image": hidden[:, 0].contiguous().numpy(),
        "image_patch_mean": hidden[:, 1:].mean(1).numpy(),
        "text": text.numpy(),
    }, OUT / "expected.safetensors")
    (OUT / "inputs.json").write_text(json.dumps({"images": images, "captions": captions}, indent=1) + "\n")
    print(f"reference outputs for {len(images)} images and captions in {OUT}")


if __name__ == "__main__":
    main()
