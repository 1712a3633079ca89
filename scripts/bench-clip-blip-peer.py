#!/usr/bin/env python3
"""PyTorch + transformers peer for examples/bench_clip_blip.rs: the same forward passes on the
same random-weight model directory, 2 threads, median of REPEATS after a warm-up.

Usage: bench-clip-blip-peer.py <clip|blip> <model dir> <batch> <repeats> [tokens]
"""
import statistics
import sys
import time

import torch
from transformers import BlipForImageTextRetrieval, CLIPModel


def median_rate(items, repeats, fn):
    fn()
    secs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t)
    return items / statistics.median(secs)


def main(kind, path, batch, repeats, tokens=None):
    torch.set_num_threads(2)
    batch, repeats = int(batch), int(repeats)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if kind == "clip":
            model = CLIPModel.from_pretrained(path, dtype=torch.float32).eval()
            s = model.config.vision_config.image_size
            pixels = torch.randn(batch, 3, s, s, generator=g)
            rate = median_rate(batch, repeats, lambda: model.get_image_features(pixel_values=pixels))
            print(f"torch clip image forward: {rate:.2f} img/s (batch {batch})")
            n = int(tokens or 77)
            ids = torch.randint(400, 40000, (batch, 77), generator=g)
            ids[:, 0] = 49406
            ids[:, n - 1 :] = 49407
            mask = torch.zeros(batch, 77, dtype=torch.long)
            mask[:, :n] = 1
            if tokens:  # padded to the longest in the batch, as a user would
                ids, mask = ids[:, :n], mask[:, :n]
            rate = median_rate(
                batch, repeats, lambda: model.get_text_features(input_ids=ids, attention_mask=mask)
            )
            print(f"torch clip text forward: {rate:.2f} texts/s ({ids.shape[1]} tokens, batch {batch})")
        else:
            model = BlipForImageTextRetrieval.from_pretrained(path, dtype=torch.float32).eval()
            s = model.config.vision_config.image_size
            pixels = torch.randn(batch, 3, s, s, generator=g)
            n = int(tokens or 50)
            ids = torch.zeros(batch, 50, dtype=torch.long)
            ids[:, :n] = torch.randint(1000, 21000, (batch, n), generator=g)
            ids[:, 0], ids[:, n - 1] = 101, 102
            mask = (ids != 0).long()

            def run():
                image = model.vision_model(pixel_values=pixels).last_hidden_state
                model.text_encoder(input_ids=ids, attention_mask=mask)  # text-only features
                model.text_encoder(
                    input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                    encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
                )

            rate = median_rate(batch, repeats, run)
            print(f"torch blip image+text forward: {rate:.3f} pairs/s ({n} real tokens of 50, batch {batch})")


if __name__ == "__main__":
    if len(sys.argv) < 5:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
