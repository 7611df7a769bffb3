#!/usr/bin/env python3
"""The loop a user would write instead of ferry: Python onnxruntime + Pillow.

Reads every image under --input (sorted), applies the model directory's ferry.toml
pre-processing the way torchvision does (Pillow resize of the short side, bilinear with
antialiasing, centre crop, /scale, mean/std; `channels = "gray"` converts to Pillow's "L"
first, as torchvision's Grayscale does), batches --batch images, runs onnxruntime with
--threads intra-op threads, and applies the softmax ferry.toml asks for.

Prints one JSON line: {"images": N, "seconds": S, "images_per_second": R}. With --dump FILE it
also writes {relative path: [scores...]} for parity checks.
"""
import argparse
import json
import os
import sys
import time
import tomllib

import numpy as np
import onnxruntime as ort
from PIL import Image


def preprocess(path, cfg):
    grey = cfg.get("channels") in ("gray", "grey")
    im = Image.open(path).convert("L" if grey else "RGB")
    resize, crop = cfg.get("resize"), cfg.get("crop")
    if isinstance(resize, int):
        w, h = im.size
        if w <= h:
            size = (resize, int(resize * h / w))
        else:
            size = (int(resize * w / h), resize)
        im = im.resize(size, Image.BILINEAR)
    elif resize:
        im = im.resize((resize[1], resize[0]), Image.BILINEAR)
    if crop:
        ch, cw = crop
        w, h = im.size
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        im = im.crop((left, top, left + cw, top + ch))
    x = np.asarray(im, dtype=np.float32) / np.float32(cfg.get("scale", 255.0))
    if grey:
        x = x[:, :, None]
    x = (x - np.array(cfg.get("mean", [0]), dtype=np.float32)) / np.array(cfg.get("std", [1]), dtype=np.float32)
    if cfg.get("channels", "rgb") == "bgr":
        x = x[:, :, ::-1]
    if cfg.get("layout", "nchw") == "nchw":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (model.onnx, ferry.toml)")
    ap.add_argument("--input", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dump")
    args = ap.parse_args()

    with open(os.path.join(args.model, "ferry.toml"), "rb") as f:
        cfg = tomllib.load(f)
    inp, out = cfg.get("input", {}), cfg.get("output", {})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(os.path.join(args.model, "model.onnx"), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    files = sorted(
        os.path.relpath(os.path.join(d, f), args.input) for d, _, fs in os.walk(args.input) for f in fs)
    dump = {}
    start = time.perf_counter()
    for i in range(0, len(files), args.batch):
        chunk = files[i:i + args.batch]
        x = np.stack([preprocess(os.path.join(args.input, f), inp) for f in chunk])
        y = sess.run(None, {name: x})[0]
        if out.get("softmax"):
            y = softmax(y)
        if args.dump:
            for f, row in zip(chunk, y):
                dump[f] = row.tolist()
    seconds = time.perf_counter() - start
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump(dump, f)
    print(json.dumps({"images": len(files), "seconds": seconds, "images_per_second": len(files) / seconds}))


if __name__ == "__main__":
    sys.exit(main())
