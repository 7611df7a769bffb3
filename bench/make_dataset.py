#!/usr/bin/env python3
"""Makes a benchmark dataset of ImageNet-sized JPEGs from real photos.

Each image is a random crop (60-100% of each side) of one of the source photos, maybe mirrored,
resized so its long side is 375-800 pixels (ImageNet's photos average about 470x390), and saved
as a JPEG of quality 75-95. The same --seed gives the same files.

    python3 bench/make_dataset.py --out /tmp/ferry-bench/images --count 1000
"""
import argparse
import os
import random

from PIL import Image, ImageOps


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--photos", default=os.path.join(here, "..", "examples", "images"))
    args = ap.parse_args()

    rng = random.Random(args.seed)
    sources = [Image.open(os.path.join(args.photos, f)).convert("RGB") for f in sorted(os.listdir(args.photos))]
    os.makedirs(args.out, exist_ok=True)
    for i in range(args.count):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = src.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        long_side = rng.randint(375, 800)
        scale = long_side / max(cw, ch)
        im = im.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        im.save(os.path.join(args.out, f"img{i:05d}.jpg"), quality=rng.randint(75, 95))
    print(f"wrote {args.count} JPEGs to {args.out}")


if __name__ == "__main__":
    main()
