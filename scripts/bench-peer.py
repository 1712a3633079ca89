#!/usr/bin/env python3
"""The PyTorch + transformers peer of examples/bench_backbones.rs, on the same inputs (data/demo,
models/), same threads and batches: forward-only throughput, median of repeats after a warm-up.
Run both in the same session and compare ratios (shared machines are noisy).

Usage: "$(scripts/python-env.sh)" scripts/bench-peer.py [REPEATS]
"""

import csv
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, BertModel, Dinov2Model
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent


def rate(n, repeats, run):
    run()
    return n / statistics.median(run() for _ in range(repeats))


def main():
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    torch.set_num_threads(2)
    with open(ROOT / "data/demo/train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    captions = [r["Caption"] for r in rows]
    tok = AutoTokenizer.from_pretrained(ROOT / "models/all-MiniLM-L6-v2")
    bert = BertModel.from_pretrained(ROOT / "models/all-MiniLM-L6-v2", add_pooling_layer=False).eval()

    def text_forward(batch):
        total = 0.0
        for i in range(0, len(captions), batch):
            enc = tok(captions[i:i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
            start = time.perf_counter()
            with torch.inference_mode():
                out = bert(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                torch.nn.functional.normalize((out * m).sum(1) / m.sum(1), dim=1)
            total += time.perf_counter() - start
        return total

    for batch in (32, 256):
        print(f"peer minilm batch {batch:>3}: forward {rate(len(captions), repeats, lambda: text_forward(batch)):6.1f} texts/s")

    processor = BitImageProcessorPil.from_pretrained(ROOT / "models/dinov2-small")
    model = Dinov2Model.from_pretrained(ROOT / "models/dinov2-small").eval()
    for batch, n in ((1, 8), (8, 32), (32, 64)):
        images = [Image.open(ROOT / "data/demo/data" / r["ImageID"]) for r in rows[:n]]
        pixels = processor(images, return_tensors="pt")["pixel_values"]

        def image_forward():
            start = time.perf_counter()
            with torch.inference_mode():
                for chunk in pixels.split(batch):
                    model(pixel_values=chunk)
            return time.perf_counter() - start

        print(f"peer dinov2-s batch {batch:>3}: forward {rate(n, repeats, image_forward):6.2f} img/s")


if __name__ == "__main__":
    main()
