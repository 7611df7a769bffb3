#!/usr/bin/env python3
"""Re-encodes the example photos the ways other writers do, and pre-processes each with Pillow.

Writes OUT/images/<name> (JPEG: progressive, 4:4:4, 4:2:2, 4:2:0 at odd sizes, greyscale, CMYK,
restart markers, an EXIF orientation tag, one large enough to decode at a DCT scale; PNG: greyscale, greyscale + alpha, 16-bit greyscale,
palette, RGBA, a tiny image that has to be enlarged; WebP lossy, lossless and with alpha; GIF, one
frame and animated; BMP; TIFF uncompressed, LZW and JPEG-compressed) and OUT/pillow/<name>.f32: the model input
that bench/peer.py's Pillow pre-processing makes of it for CONFIG (a ferry.toml's [input]), as
little-endian f32.

usage: pillow_variants.py OUT CONFIG
"""
import io
import os
import sys
import tomllib

import numpy as np
from PIL import Image

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "bench"))
import peer  # noqa: E402

out, config = sys.argv[1], sys.argv[2]
with open(config, "rb") as f:
    cfg = tomllib.load(f)["input"]
photos = os.path.join(here, "..", "examples", "images")
cat = Image.open(os.path.join(photos, "chelsea.jpg")).convert("RGB")
astronaut = Image.open(os.path.join(photos, "astronaut.png")).convert("RGB")
coffee = Image.open(os.path.join(photos, "coffee.png")).convert("RGB")
rocket = Image.open(os.path.join(photos, "rocket.jpg")).convert("RGB")

exif = Image.Exif()
exif[0x0112] = 6  # "rotate 90° clockwise to display"
rgba = np.array(coffee.convert("RGBA"))
rgba[..., 3] = 96
grey = np.array(cat.convert("L"))

variants = {
    "progressive.jpg": (cat, dict(quality=90, progressive=True)),
    "subsampling_444.jpg": (cat, dict(quality=90, subsampling=0)),
    "subsampling_422.jpg": (astronaut, dict(quality=90, subsampling=1)),
    "odd_size_420.jpg": (cat.crop((3, 5, 454 - 3, 306 - 5)), dict(quality=95, subsampling=2)),
    "greyscale.jpg": (cat.convert("L"), dict(quality=90)),
    "cmyk.jpg": (cat.convert("CMYK"), dict(quality=90)),
    "restart_markers.jpg": (rocket, dict(quality=85, restart_marker_blocks=4)),
    "exif_rotated.jpg": (cat, dict(quality=90, exif=exif.tobytes())),
    "wide_strip.jpg": (rocket.resize((1000, 40)), dict(quality=90)),
    "large.jpg": (cat.resize((2400, 1600), Image.LANCZOS), dict(quality=92)),
    "greyscale.png": (astronaut.convert("L"), {}),
    "greyscale_alpha.png": (astronaut.convert("LA"), {}),
    "greyscale_16bit.png": (Image.fromarray(grey.astype(np.uint16) * 257), {}),
    "greyscale_8bit.png": (Image.fromarray(grey), {}),
    "palette.png": (astronaut.convert("P", palette=Image.ADAPTIVE), {}),
    "rgba.png": (Image.fromarray(rgba), {}),
    "tiny.png": (rocket.resize((30, 30)), {}),
    "lossy.webp": (cat, dict(quality=90)),
    "lossless.webp": (coffee, dict(lossless=True)),
    "alpha.webp": (coffee.convert("RGBA"), dict(quality=90)),
    "palette.gif": (cat, {}),
    # Pillow and ferry both read the first frame.
    "animated.gif": (cat, dict(save_all=True, append_images=[rocket.resize(cat.size)], duration=100, loop=0)),
    "plain.bmp": (astronaut, {}),
    "plain.tiff": (coffee, {}),
    "lzw.tiff": (cat, dict(compression="tiff_lzw")),
    "jpeg.tiff": (rocket, dict(compression="jpeg")),
}
os.makedirs(os.path.join(out, "images"), exist_ok=True)
os.makedirs(os.path.join(out, "pillow"), exist_ok=True)
for name, (im, opts) in variants.items():
    buf = io.BytesIO()
    kind = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}
    im.save(buf, kind[name.rsplit(".", 1)[1]], **opts)
    path = os.path.join(out, "images", name)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    peer.preprocess(path, cfg).astype("<f4").tofile(os.path.join(out, "pillow", name + ".f32"))
