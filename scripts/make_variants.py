#!/usr/bin/env python3
"""Writes JPEG variants of the example photos: DIR/<photo>/<photo>_NNN.jpg, random crops of 55-100% of
each side, mirror images, brightness changes and qualities 55-95. A small dataset with known
near-duplicates, for trying sketches.

    python3 scripts/make_variants.py DIR [--per-photo 50]
"""
import argparse
import os
import random

from PIL import Image, ImageEnhance, ImageOps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--per-photo", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    here = os.path.dirname(os.path.abspath(__file__))
    photos = os.path.join(here, "..", "examples", "images")
    for name in sorted(os.listdir(photos)):
        src = Image.open(os.path.join(photos, name)).convert("RGB")
        stem = os.path.splitext(name)[0]
        os.makedirs(os.path.join(args.dir, stem), exist_ok=True)
        w, h = src.size
        for v in range(args.per_photo):
            cw, ch = int(w * rng.uniform(0.55, 1.0)), int(h * rng.uniform(0.55, 1.0))
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = src.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                img = ImageOps.mirror(img)
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
            img.save(os.path.join(args.dir, stem, f"{stem}_{v:03d}.jpg"), quality=rng.randint(55, 95))
    print("wrote", args.per_photo * len(os.listdir(photos)), "images to", args.dir)


if __name__ == "__main__":
    main()
