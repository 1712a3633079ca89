#!/usr/bin/env python3
"""Builds the openclipart multi-label dataset in the competition format.

Input: the files of the Debian packages openclipart-svg + openclipart-png, extracted with
`dpkg-deb -x` (the folder that holds `svg/` and `png/`). Output: `train.csv`
(`ImageID,Labels,Caption`), `test.csv` (`ImageID,Caption`), `test_labels.csv` (`ImageID,Labels`),
the images under `data/<ImageID>` and a README.md describing provenance, selection and counts.

Captions are the SVG's `dc:title` (+ `. ` + `dc:description`); labels are its keyword tags
(`dc:subject/rdf:Bag/rdf:li`), normalised and filtered as documented in docs/data.md. Every step is
deterministic: sorted iteration, seeded choices, fixed encoder settings (same inputs and Pillow
version -> byte-identical outputs). Called by scripts/fetch-openclipart.sh; needs only the standard
library and Pillow.
"""

import argparse
import collections
import gzip
import os
import random
import re
import struct
import sys
import xml.etree.ElementTree as ET

from PIL import Image

NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "cc": "http://web.resource.org/cc/",
}
# Folders of near-duplicate images (icon themes drawn in several sizes/styles, star variations).
DROPPED_FOLDERS = ("computer/icons/", "shapes/stars/")
# Tags that say what the file is or where it sits in the collection, not what it shows.
META_TAGS = frozenset(
    """icon icons clipart clip_art clip-art svg png media image images picture graphic graphics
    openclipart hash magick theme unsorted special simple architetto_francesco_rollandin""".split()
)
MIN_TAG_IMAGES = 40
MAX_SIDE = 256
WHITE_LEVEL = 250  # grey level from which a pixel counts as blank page when trimming margins
DEFAULT_MAX_PIXELS = 40_000_000
SEED = 3407
TEST_FRACTION = 0.2
EMAIL = re.compile(r"^\S+@\S+\.\S+$")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="extracted usr/share/openclipart (holds svg/ and png/)")
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--mode", choices=["full", "demo"], required=True)
    p.add_argument("--versions", default="", help="Debian package versions, for the README")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="skip PNGs with more pixels than this (checked from the header)")
    p.add_argument("--demo-labels", type=int, default=24, help="demo: labels drawn from the full set")
    p.add_argument("--demo-quota", type=int, default=40, help="demo: images per drawn label (at least)")
    p.add_argument("--demo-colors", type=int, default=128, help="demo: PNG palette size")
    return p.parse_args()


def read_svg(path):
    """Returns (title, description, raw tag strings) from the SVG's RDF metadata."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    root = ET.fromstring(data)
    work = root.find(".//cc:Work", NS)
    if work is None:
        return "", "", []
    title = work.findtext("dc:title", default="", namespaces=NS) or ""
    desc = work.findtext("dc:description", default="", namespaces=NS) or ""
    tags = [li.text or "" for li in work.findall("dc:subject/rdf:Bag/rdf:li", NS)]
    return title, desc, tags


def normalise_tags(raw_tags):
    """Lower-case; one entry may hold several tags separated by ',' or ';'; inner whitespace -> '_'."""
    tags = set()
    for raw in raw_tags:
        for part in re.split(r"[,;]", raw):
            tag = "_".join(part.lower().split())
            if tag and tag not in META_TAGS:
                tags.add(tag)
    return tags


def collapse(text):
    return " ".join(text.split())


def make_caption(title, desc):
    """Title, plus '. ' + description when it is present, different and not boilerplate."""
    title, desc = collapse(title), collapse(desc)
    if "<" in desc and ">" in desc or EMAIL.match(desc) or len(desc) < 3:
        desc = ""  # HTML licence boilerplate, an author's e-mail address, or a stray letter
    if not title:
        return desc
    if not desc or desc.lower() == title.lower():
        return title
    return f"{title.rstrip('.')}. {desc}"


def png_size(path):
    """Width and height from the PNG header, without decoding."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"not a PNG: {path}")
    return struct.unpack(">II", head[16:24])


def collect(src, max_pixels, stats):
    """All usable images: (id, png path, caption, tags) with tags before the frequency filter."""
    items, seen_png = [], set()
    svg_root, png_root = os.path.join(src, "svg"), os.path.join(src, "png")
    for folder, subfolders, files in os.walk(svg_root):
        subfolders.sort()
        for name in sorted(files):
            svg = os.path.join(folder, name)
            rel = os.path.relpath(svg, svg_root).replace(os.sep, "/")
            stats["svg files"] += 1
            if os.path.islink(svg):
                stats["skipped: SVG is a symlink to another folder's copy"] += 1
                continue
            if rel.startswith(DROPPED_FOLDERS):
                stats["skipped: near-duplicate folder " + "/".join(rel.split("/")[:2])] += 1
                continue
            stem = re.sub(r"\.svgz?$", "", rel)
            png = os.path.join(png_root, stem + ".png")
            if not os.path.exists(png):
                stats["skipped: no PNG"] += 1
                continue
            real = os.path.realpath(png)
            if real in seen_png:
                stats["skipped: PNG already used"] += 1
                continue
            seen_png.add(real)
            try:
                title, desc, raw_tags = read_svg(svg)
            except (ET.ParseError, OSError, EOFError) as e:
                stats["skipped: unreadable SVG metadata"] += 1
                print(f"warning: {rel}: {e}", file=sys.stderr)
                continue
            caption = make_caption(title, desc)
            if not caption:
                stats["skipped: no title or description"] += 1
                continue
            width, height = png_size(png)
            if width * height > max_pixels:
                stats[f"skipped: PNG over {max_pixels:,} pixels"] += 1
                print(f"note: {rel}: {width}x{height} PNG skipped (over the pixel limit)", file=sys.stderr)
                continue
            items.append((stem + ".png", png, caption, normalise_tags(raw_tags)))
    return items


def filter_labels(items, min_count):
    """Keeps tags on at least min_count images, then images that still have a tag."""
    counts = collections.Counter(t for _, _, _, tags in items for t in tags)
    kept = {t for t, c in counts.items() if c >= min_count}
    out = [(i, p, c, tags & kept) for i, p, c, tags in items]
    return [x for x in out if x[3]], len(out) - sum(1 for x in out if x[3])


def select_demo(items, n_labels, quota, seed):
    """A seeded subset: n_labels labels drawn at random, then for each (rarest first) random images
    carrying it until it has `quota` images; other labels are removed."""
    rng = random.Random(seed)
    counts = collections.Counter(t for *_, tags in items for t in tags)
    labels = set(rng.sample(sorted(counts), n_labels))
    chosen, have = [], collections.Counter()
    taken = set()
    for label in sorted(labels, key=lambda t: (counts[t], t)):
        candidates = [x for x in items if label in x[3] and x[0] not in taken]
        rng.shuffle(candidates)
        for item in candidates:
            if have[label] >= quota:
                break
            taken.add(item[0])
            chosen.append((item[0], item[1], item[2], item[3] & labels))
            have.update(item[3] & labels)
    return sorted(chosen)


def stratified_split(items, test_fraction, seed):
    """Iterative stratification (Sechidis et al. 2011): rarest label first, each of its images goes
    to the part that needs that label most. Returns (train, test), sorted by id."""
    rng = random.Random(seed)
    want = {"test": test_fraction * len(items), "train": (1 - test_fraction) * len(items)}
    label_want = {part: collections.Counter() for part in want}
    for *_, tags in items:
        for t in tags:
            label_want["test"][t] += test_fraction
            label_want["train"][t] += 1 - test_fraction
    parts = {"train": [], "test": []}
    left = list(items)
    rng.shuffle(left)
    while left:
        counts = collections.Counter(t for *_, tags in left for t in tags)
        label = min(counts, key=lambda t: (counts[t], t))
        rest = []
        for item in left:
            if label not in item[3]:
                rest.append(item)
                continue
            part = max(want, key=lambda p: (label_want[p][label], want[p], p == "train"))
            parts[part].append(item)
            want[part] -= 1
            for t in item[3]:
                label_want[part][t] -= 1
        left = rest
    return sorted(parts["train"]), sorted(parts["test"])


def load_rgb(path, max_side):
    """RGB with alpha composited over white, longest side at most max_side."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("P", "LA", "L") or "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA"):
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img.convert("RGBA"))
        img = img.convert("RGB")
    img = trim_white_margin(img)
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img


def trim_white_margin(img):
    """Crops the blank page around the drawing (many PNGs are a whole A4 page with a small drawing),
    keeping a margin of 4% of the drawing's longest side."""
    ink = img.convert("L").point(lambda v: 255 if v < WHITE_LEVEL else 0)
    box = ink.getbbox()
    if box is None:
        return img
    pad = round(0.04 * max(box[2] - box[0], box[3] - box[1]))
    box = (max(0, box[0] - pad), max(0, box[1] - pad), min(img.width, box[2] + pad), min(img.height, box[3] + pad))
    return img.crop(box) if box != (0, 0, img.width, img.height) else img


def save_image(img, dst, colors):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if colors:
        img = img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    img.save(dst, format="PNG", optimize=True)


def labels_field(tags):
    return " ".join(sorted(tags))


def caption_field(caption):
    return '"' + caption + '"'  # inner quotes stay raw, as in the competition files


def write_csvs(out, train, test):
    def write(name, header, rows):
        with open(os.path.join(out, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(header + "\n")
            for row in rows:
                f.write(",".join(row) + "\n")

    write("train.csv", "ImageID,Labels,Caption", [(i, labels_field(t), caption_field(c)) for i, _, c, t in train])
    write("test.csv", "ImageID,Caption", [(i, caption_field(c)) for i, _, c, _ in test])
    write("test_labels.csv", "ImageID,Labels", [(i, labels_field(t)) for i, _, _, t in test])


def label_table(train, test):
    tr = collections.Counter(t for *_, tags in train for t in tags)
    te = collections.Counter(t for *_, tags in test for t in tags)
    rows = ["| label | train | test | total |", "|---|---:|---:|---:|"]
    for t in sorted(tr.keys() | te.keys(), key=lambda t: (-(tr[t] + te[t]), t)):
        rows.append(f"| {t} | {tr[t]} | {te[t]} | {tr[t] + te[t]} |")
    return "\n".join(rows)


def write_readme(out, args, stats, train, test, dropped_untagged):
    items = train + test
    n_labels = len({t for *_, tags in items for t in tags})
    per_image = sum(len(x[3]) for x in items) / len(items)
    kind = "full openclipart set" if args.mode == "full" else "openclipart demo subset"
    if args.mode == "demo":
        selection = (
            f"- demo subset: {args.demo_labels} labels drawn at random (seed {args.seed}) from the full set's "
            f"labels; for each, rarest first, random images carrying it until it has {args.demo_quota}; "
            "labels not drawn are removed from the chosen images.\n"
            f"- images: RGB, alpha over white, blank margin trimmed (4% kept), longest side <= {MAX_SIDE} px (Lanczos), "
            f"{args.demo_colors}-colour palette PNG (median cut, Floyd-Steinberg)."
        )
    else:
        selection = (
            "- every qualifying image.\n"
            f"- images: RGB, alpha over white, blank margin trimmed (4% kept), longest side <= {MAX_SIDE} px (Lanczos), truecolour PNG."
        )
    skipped = "\n".join(f"- {k}: {v}" for k, v in sorted(stats.items()))
    text = f"""# {kind} (generated: do not edit)

Built by `scripts/fetch-openclipart.sh {'--' + args.mode}` (see docs/data.md). Same inputs give
byte-identical outputs.

## Provenance

Debian packages `openclipart-svg` and `openclipart-png` ({args.versions or 'version not recorded'}),
from openclipart.org 0.18. All images are public domain (Creative Commons Public Domain Dedication,
see /usr/share/doc/openclipart-svg/copyright in the package). Captions and labels come from each
SVG's RDF metadata.

## Selection

- SVG files walked in sorted order; symlinked copies, the near-duplicate folders
  {', '.join('`' + f + '`' for f in DROPPED_FOLDERS)}, images without a PNG or a caption and PNGs over
  {args.max_pixels:,} pixels (checked from the header) are skipped.
- caption: `dc:title`, plus `. ` + `dc:description` when present, different and not HTML, an
  e-mail address or shorter than 3 characters; whitespace collapsed.
- labels: `dc:subject` keywords, lower-case, split at `,`/`;`, inner spaces -> `_`; meta tags removed
  ({' '.join(sorted(META_TAGS))}); tags on fewer than {MIN_TAG_IMAGES} images removed;
  images left without a tag removed ({dropped_untagged}).
{selection}
- split: iterative stratification, {TEST_FRACTION:.0%} test, seed {args.seed}.

Walk statistics:

{skipped}

## Contents

- {len(items)} images ({len(train)} train, {len(test)} test), {n_labels} labels, {per_image:.2f} labels per image.
- `train.csv` (`ImageID,Labels,Caption`), `test.csv` (`ImageID,Caption`), `test_labels.csv`
  (`ImageID,Labels`, ground truth for the test part), images at `data/<ImageID>`.

{label_table(train, test)}
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def main():
    args = parse_args()
    Image.MAX_IMAGE_PIXELS = args.max_pixels
    stats = collections.Counter()
    items = collect(args.src, args.max_pixels, stats)
    items, dropped_untagged = filter_labels(items, MIN_TAG_IMAGES)
    print(f"qualifying: {len(items)} images, {len({t for *_, ts in items for t in ts})} labels", file=sys.stderr)
    colors = 0
    if args.mode == "demo":
        items = select_demo(items, args.demo_labels, args.demo_quota, args.seed)
        colors = args.demo_colors
    train, test = stratified_split(items, TEST_FRACTION, args.seed)

    if os.path.isdir(args.out):
        for folder, _, files in os.walk(args.out, topdown=False):
            for name in files:
                os.remove(os.path.join(folder, name))
            os.rmdir(folder)
    os.makedirs(args.out)
    for n, (image_id, png, _, _) in enumerate(sorted(items)):
        save_image(load_rgb(png, MAX_SIDE), os.path.join(args.out, "data", image_id), colors)
        if (n + 1) % 500 == 0:
            print(f"  {n + 1}/{len(items)} images", file=sys.stderr)
    write_csvs(args.out, train, test)
    write_readme(args.out, args, stats, train, test, dropped_untagged)
    n_labels = len({t for *_, ts in items for t in ts})
    print(f"{args.out}: {len(train)} train + {len(test)} test images, {n_labels} labels", file=sys.stderr)
    for k, v in sorted(stats.items()):
        print(f"  {k}: {v}", file=sys.stderr)


if __name__ == "__main__":
    main()
