#!/usr/bin/env python3
"""PyTorch peer of examples/train_bench.rs: the same heads, loss, optimizer and batch sizes on the
same synthetic cache (its safetensors shards memory-mapped with numpy), so that multiclip's
training speed can be compared on the same machine at the same moment.

Usage: PY=$(scripts/python-env.sh); $PY scripts/bench-train-peer.py --cache DIR --head mlp \
           --batch-size 256 --epochs 3 [--threads 2] [--scale 1] [--precision f32|bf16]
--precision bf16 runs the forward pass and the loss under torch.autocast('cpu', dtype=torch.bfloat16)
(f32 weights and optimizer, bf16 matrix products: PyTorch's one-switch mixed precision).
Prints one line per epoch and a SUMMARY line (median training seconds per epoch, samples/s).
"""
import argparse
import json
import os
import struct
import time

import numpy as np
import torch
from torch import nn


def open_cache(path):
    """Memory-mapped [rows, ...] arrays per output, concatenated lazily over shards."""
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    shards = []
    for entry in manifest["shards"]:
        file = os.path.join(path, entry["file"])
        with open(file, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        arrays = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = {"F16": np.float16, "F32": np.float32, "U8": np.uint8}[info["dtype"]]
            start, end = info["data_offsets"]
            arrays[name] = np.memmap(file, dtype=dtype, mode="r", offset=8 + n + start,
                                     shape=tuple(info["shape"]))
        shards.append((entry["start"], entry["end"], arrays))
    return shards


def gather(shards, name, rows):
    """Rows of one output as float32 (rows sorted per shard, then restored to order)."""
    out = None
    for start, end, arrays in shards:
        sel = np.nonzero((rows >= start) & (rows < end))[0]
        if len(sel) == 0:
            continue
        values = arrays[name][rows[sel] - start].astype(np.float32)
        if out is None:
            out = np.empty((len(rows),) + values.shape[1:], dtype=np.float32)
        out[sel] = values
    return torch.from_numpy(out)


class Mlp(nn.Module):
    def __init__(self, d, k, hidden=768):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k))

    def forward(self, x):
        return self.net(x["image"])


class Router(nn.Module):
    """One MLP per modality, softmax weights from both modalities, weighted sum of logits."""

    def __init__(self, d, k, hidden=768):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k))
        self.text = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k))
        self.router = nn.Linear(2 * d, 2)

    def forward(self, x):
        w = torch.softmax(self.router(torch.cat([x["image"], x["text"]], 1)), 1)
        return w[:, :1] * self.image(x["image"]) + w[:, 1:] * self.text(x["text"])


class MlDecoder(nn.Module):
    """Ridnik et al.: input projection, fixed queries, one decoder layer without self-attention,
    group fully-connected output. Attends over all 50 positions (as the peer measurement)."""

    def __init__(self, d, k, d_model=768, heads=8, ffn=2048, dropout=0.1):
        super().__init__()
        self.proj = nn.Linear(d, d_model)
        self.register_buffer("queries", torch.randn(k, d_model))
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn, d_model))
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.group_w = nn.Parameter(torch.randn(k, d_model) * 0.02)
        self.group_b = nn.Parameter(torch.zeros(k))

    def forward(self, x):
        memory = torch.relu(self.proj(x["multimodal_tokens"]))
        q = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        t = self.norm1(q + self.dropout(q))
        t = self.norm2(t + self.dropout(self.attn(t, memory, memory, need_weights=False)[0]))
        t = self.norm3(t + self.dropout(self.ffn(t)))
        return (t * self.group_w).sum(-1) + self.group_b


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True)
    p.add_argument("--data", required=True, help="dataset folder (train.csv with the labels)")
    p.add_argument("--head", default="mlp")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--train-rows", type=int, default=None, help="train on the first N rows only")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(3407)
    shards = open_cache(a.cache)
    rows_total = shards[-1][1]
    lines = open(os.path.join(a.data, "train.csv")).read().splitlines()[1:]
    k = 18
    y_all = np.zeros((len(lines), k), dtype=np.float32)
    for i, line in enumerate(lines):
        for label in line.split(",")[1].split():
            y_all[i, int(label) - 1] = 1.0
    train_rows = np.arange(0, rows_total, a.scale)[:a.train_rows]
    model = {"mlp": Mlp, "router": Router, "ml_decoder": MlDecoder}[a.head](768, k)
    names = {"mlp": ["image"], "router": ["image", "text"],
             "ml_decoder": ["multimodal_tokens"]}[a.head]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(3407)
    times = []
    cpu_started = time.process_time()
    for epoch in range(a.epochs):
        order = rng.permutation(train_rows)
        model.train()
        started = time.perf_counter()
        total = 0.0
        for b in range(0, len(order), a.batch_size):
            idx = np.sort(order[b:b + a.batch_size])
            x = {n: gather(shards, n, idx) for n in names}
            y = torch.from_numpy(y_all[idx])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        seconds = time.perf_counter() - started
        times.append(seconds)
        print(f"peer head={a.head} precision={a.precision} batch={a.batch_size} epoch={epoch + 1} "
              f"train_s={seconds:.3f} "
              f"samples_per_s={len(order) / seconds:.0f} loss={total / len(order):.4f}", flush=True)
    median = sorted(times)[len(times) // 2]
    cpu = (time.process_time() - cpu_started) / a.epochs
    print(f"SUMMARY peer head={a.head} precision={a.precision} batch={a.batch_size} "
          f"threads={a.threads} "
          f"median_train_s={median:.3f} samples_per_s={len(train_rows) / median:.0f} "
          f"cpu_s_per_epoch={cpu:.2f}")


if __name__ == "__main__":
    main()
