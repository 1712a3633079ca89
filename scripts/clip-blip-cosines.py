#!/usr/bin/env python3
"""Fidelity of `multiclip extract --precision bf16` on a full-size random CLIP or BLIP-ITM model
(scripts/check-clip-blip-parity.sh): the row cosines of the bf16 cache against the f32 cache and
both against transformers in f32, for every float output; masks must be equal.

A row is one vector along the last dimension: one embedding of `image` / `text` /
`multimodal_cls`, one token of `image_tokens` / `multimodal_tokens` (padding positions included).
The reference runs transformers (eager attention, f32) on the rows of DATASET/train.csv in order,
decoded as multiclip does (alpha over white) and preprocessed and tokenized as
scripts/make-clip-blip-fixtures.py does for the parity references. Both caches must be extracted
from that csv with `--dtype f32`.

Usage: clip-blip-cosines.py MODEL_DIR DATASET_DIR F32_CACHE BF16_CACHE [MIN_COSINE]
Prints one markdown table row per output; exits 1 when a bf16 row's cosine to f32 is below
MIN_COSINE (default 0.999).
"""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, BlipForImageTextRetrieval, CLIPModel

HERE = Path(__file__).resolve().parent


def script_module(file_name: str):
    spec = importlib.util.spec_from_file_location(file_name.replace("-", "_")[:-3], HERE / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixtures = script_module("make-clip-blip-fixtures.py")
peer = script_module("bench-extract-peer.py")


def reference(model_dir: Path, dataset: Path) -> tuple[list[str], dict]:
    """Row ids and every output of the backbone, computed by transformers on train.csv."""
    with open(dataset / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [r["ImageID"] for r in rows]
    images = [peer.rgb_over_white(dataset / "data" / i) for i in ids]
    captions = [r["Caption"] for r in rows]
    config = json.loads((model_dir / "config.json").read_text())
    size = config["vision_config"]["image_size"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        if config["model_type"] == "clip":
            model = CLIPModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
            pixels = fixtures.clip_processor(size)(images, return_tensors="pt")["pixel_values"]
            return ids, fixtures.clip_outputs(model, pixels, *fixtures.clip_text_inputs(tok, captions))
        model = BlipForImageTextRetrieval.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager").eval()
        pixels = fixtures.blip_processor(size)(images, return_tensors="pt")["pixel_values"]
        return ids, fixtures.blip_outputs(model, pixels, *fixtures.blip_text_inputs(tok, captions))


def cache(directory: Path) -> tuple[list[str], dict, str]:
    """Row ids, outputs (all shards, in order) and the forward precision of a multiclip cache (its
    manifest writes the precision only when it is not f32)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    ids, outputs = [], {}
    for shard in sorted(directory.glob("shard-*.safetensors")):
        with safe_open(shard, "pt") as f:
            ids += json.loads(f.metadata()["multiclip"])["ids"]
            for name in f.keys():
                outputs.setdefault(name, []).append(f.get_tensor(name))
    return ids, {k: torch.cat(v) for k, v in outputs.items()}, manifest.get("precision", "f32")


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30)


def main(argv) -> int:
    model_dir, dataset, f32_dir, bf16_dir = (Path(a) for a in argv[:4])
    min_cosine = float(argv[4]) if len(argv) > 4 else 0.999
    torch.set_num_threads(2)
    ref_ids, want = reference(model_dir, dataset)
    (f32_ids, f32, f32_precision), (bf16_ids, bf16, bf16_precision) = cache(f32_dir), cache(bf16_dir)
    assert f32_ids == ref_ids == bf16_ids, "the caches' rows are not train.csv's"
    assert (f32_precision, bf16_precision) == ("f32", "bf16"), (f32_precision, bf16_precision)
    assert set(f32) == set(bf16) == set(want), (sorted(f32), sorted(bf16), sorted(want))
    failed = False
    for name in want:
        if name.endswith("_mask"):
            same = torch.equal(f32[name], bf16[name]) and torch.equal(f32[name].float(), want[name].float())
            print(f"| {model_dir.name} | {name} | {len(ref_ids)} | masks {'equal' if same else 'DIFFER'} | | |")
            failed |= not same
            continue
        pairs = {"bf16 vs f32": (bf16[name], f32[name]), "bf16 vs transformers": (bf16[name], want[name]),
                 "f32 vs transformers": (f32[name], want[name])}
        cos = {k: row_cosines(*v) for k, v in pairs.items()}
        cells = " | ".join(f"{c.min().item():.6f} / {c.mean().item():.6f}" for c in cos.values())
        print(f"| {model_dir.name} | {name} {tuple(f32[name].shape[1:])} | {cos['bf16 vs f32'].numel()} | {cells} |")
        failed |= cos["bf16 vs f32"].min().item() < min_cosine
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
