#!/usr/bin/env python3
"""The PyTorch + transformers peer of `multiclip extract` (scripts/bench-extract.sh): what a user
would run instead, end to end and sequentially: read the csv, decode each batch's PNGs (alpha over
white, as multiclip does), Hugging Face preprocessing, forward, pooling, and an output array saved
at the end. torch.set_num_threads(2). Timed from the first batch to the saved output, after
one warm-up batch (model loading is not timed, as multiclip's rows/s does not count it).

Usage: "$PY" scripts/bench-extract-peer.py image DATASET_DIR BATCH OUT.npy [--bf16]
       "$PY" scripts/bench-extract-peer.py text  DATASET_DIR BATCH OUT.npy [--sorted] [--bf16]
       "$PY" scripts/bench-extract-peer.py clip  DATASET_DIR BATCH OUT.npy --model=DIR [--image-only] [--bf16]
       "$PY" scripts/bench-extract-peer.py padding DATASET_DIR BATCH
`--bf16` runs the model in bf16 (`model.to(torch.bfloat16)`, inputs cast to it, pooling in f32).
`clip`: a CLIPModel directory in the Hub layout (its CLIPImageProcessorPil and tokenizer), the
projected, L2-normalised image and text embeddings of each row (`get_image_features`,
`get_text_features` on the captions padded to the batch's longest, at most 77 tokens), as
multiclip's `clip` backbone outputs them; `--image-only` skips the text tower.
Prints one line: `peer <kind> batch B: N items in S s = R items/s, peak RSS M MiB`; `padding`
prints instead the token positions the text encoder computes (and the attention work, sum of
rows x length^2) when batches are padded in dataset order, globally sorted by token length, or
formed as multiclip does (each shard's rows sorted by caption length in characters, windows of
B, each split into sub-batches of at most 4096 padded tokens), against none padded.
DINOv2 and MiniLM come from models/dinov2-small and models/all-MiniLM-L6-v2 beside this script's
repo.
"""

import csv
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BertModel, CLIPModel, Dinov2Model
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent


def rows_of(dataset):
    """(id, caption) of train.csv then test.csv, as `multiclip extract --part all` selects."""
    rows = []
    for name in ("train.csv", "test.csv"):
        path = dataset / name
        if path.exists():
            with open(path, newline="") as f:
                rows.extend((r["ImageID"], r["Caption"]) for r in csv.DictReader(f))
    return rows


def rgb_over_white(path):
    image = Image.open(path)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def image_run(dataset, batch, dtype):
    processor = BitImageProcessorPil.from_pretrained(ROOT / "models/dinov2-small")
    model = Dinov2Model.from_pretrained(ROOT / "models/dinov2-small").eval().to(dtype)
    ids = [i for i, _ in rows_of(dataset)]

    def embed(chunk):
        images = [rgb_over_white(dataset / "data" / i) for i in chunk]
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            hidden = model(pixel_values=pixels.to(dtype)).last_hidden_state.float()
            return torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=1).half().numpy()

    embed(ids[:batch])  # warm-up
    return ids, lambda: np.concatenate([embed(ids[i:i + batch]) for i in range(0, len(ids), batch)])


def text_run(dataset, batch, by_length, dtype):
    tok = AutoTokenizer.from_pretrained(ROOT / "models/all-MiniLM-L6-v2")
    bert = BertModel.from_pretrained(ROOT / "models/all-MiniLM-L6-v2", add_pooling_layer=False)
    bert = bert.eval().to(dtype)
    captions = [c for _, c in rows_of(dataset)]

    def embed(chunk):
        enc = tok(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            out = bert(**enc).last_hidden_state.float()
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled = torch.nn.functional.normalize((out * m).sum(1) / m.sum(1), dim=1)
            return pooled.half().numpy()

    def run():
        if not by_length:
            return np.concatenate([embed(captions[i:i + batch]) for i in range(0, len(captions), batch)])
        # The whole dataset sorted by token length, batched, then put back in order.
        lengths = [len(t) for t in tok(captions, truncation=True, max_length=256)["input_ids"]]
        order = sorted(range(len(captions)), key=lengths.__getitem__)
        sorted_out = np.concatenate(
            [embed([captions[j] for j in order[i:i + batch]]) for i in range(0, len(order), batch)])
        out = np.empty_like(sorted_out)
        out[order] = sorted_out
        return out

    embed(captions[:batch])  # warm-up
    return captions, run


def clip_run(dataset, batch, model_dir, image_only, dtype):
    processor = CLIPImageProcessorPil.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir).eval().to(dtype)
    rows = rows_of(dataset)
    normalize = lambda t: torch.nn.functional.normalize(t.pooler_output.float(), dim=-1)

    def embed(chunk):
        images = [rgb_over_white(dataset / "data" / i) for i, _ in chunk]
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = [normalize(model.get_image_features(pixel_values=pixels.to(dtype)))]
            if not image_only:
                enc = tok([c for _, c in chunk], padding=True, truncation=True, max_length=77, return_tensors="pt")
                out.append(normalize(model.get_text_features(**enc)))
            return torch.cat(out, dim=1).half().numpy()

    embed(rows[:batch])  # warm-up
    return rows, lambda: np.concatenate([embed(rows[i:i + batch]) for i in range(0, len(rows), batch)])


def padded_work(batches):
    """(token positions, attention work) of running `batches` of token lengths, each padded."""
    return (sum(len(b) * max(b) for b in batches), sum(len(b) * max(b) ** 2 for b in batches))


def multiclip_batches(lengths, chars, batch, shard_rows=4096, sub_batch_tokens=4096):
    """The sub-batches multiclip runs (src/extract.rs windows, src/backbone/sentence.rs groups)."""
    out = []
    for start in range(0, len(lengths), shard_rows):
        rows = sorted(range(start, min(start + shard_rows, len(lengths))), key=chars.__getitem__)
        for w in range(0, len(rows), batch):
            window = sorted(lengths[r] for r in rows[w:w + batch])
            s = 0
            while s < len(window):
                e = s + 1
                while e < len(window) and (e + 1 - s) * window[e] <= sub_batch_tokens:
                    e += 1
                out.append(window[s:e])
                s = e
    return out


def padding_report(dataset, batch):
    tok = AutoTokenizer.from_pretrained(ROOT / "models/all-MiniLM-L6-v2")
    captions = [c for _, c in rows_of(dataset)]
    lengths = [len(t) for t in tok(captions, truncation=True, max_length=256)["input_ids"]]
    chunks = lambda ls: [ls[i:i + batch] for i in range(0, len(ls), batch)]
    for name, batches in (
        ("no padding", [[n] for n in lengths]),
        ("peer, padded in dataset order", chunks(lengths)),
        ("peer, sorted by token length", chunks(sorted(lengths))),
        ("multiclip", multiclip_batches(lengths, [len(c) for c in captions], batch)),
    ):
        tokens, attention = padded_work(batches)
        print(f"batch {batch}, {len(captions)} captions, {name}: {tokens} token positions, "
              f"attention {attention}, {len(batches)} forward calls")


def main():
    if sys.argv[1] == "padding":
        return padding_report(Path(sys.argv[2]), int(sys.argv[3]))
    kind, dataset, batch, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(2)
    flags = sys.argv[5:]
    dtype = torch.bfloat16 if "--bf16" in flags else torch.float32
    if kind == "image":
        items, run = image_run(dataset, batch, dtype)
        unit = "img"
    elif kind == "clip":
        model_dir = next(Path(f.split("=", 1)[1]) for f in flags if f.startswith("--model="))
        items, run = clip_run(dataset, batch, model_dir, "--image-only" in flags, dtype)
        unit = "img"
    else:
        items, run = text_run(dataset, batch, "--sorted" in flags, dtype)
        unit = "texts"
    start = time.perf_counter()
    np.save(out, run())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    label = " ".join([kind] + [f[2:] for f in flags if f in ("--sorted", "--image-only", "--bf16")])
    print(f"peer {label} batch {batch}: {len(items)} items in {seconds:.1f} s = "
          f"{len(items) / seconds:.2f} {unit}/s, peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
