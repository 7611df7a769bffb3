#!/usr/bin/env python3
"""Ray Data as a peer: read the JPEGs, decode and pre-process with Pillow in map_batches, and run
the same onnxruntime model in an actor (with --cpus intra-op threads), on a Ray of --cpus CPUs: one
for the actor, the rest for reading and decoding tasks. Timing includes Ray's start-up, as a user
running a job would see it.

Prints one JSON line: {"images": N, "seconds": S, "images_per_second": R}.
"""
import argparse
import json
import os
import sys
import time
import tomllib

start = time.perf_counter()

import numpy as np  # noqa: E402
import ray  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer import preprocess, softmax  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    with open(os.path.join(args.model, "ferry.toml"), "rb") as f:
        cfg = tomllib.load(f)

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    files = sorted(os.path.join(args.input, f) for f in os.listdir(args.input))

    def decode(batch):
        import io
        return {"x": np.stack([preprocess(io.BytesIO(b), cfg["input"]) for b in batch["bytes"]])}

    class Model:
        def __init__(self):
            import onnxruntime as ort
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.cpus
            self.sess = ort.InferenceSession(os.path.join(args.model, "model.onnx"), opts,
                                             providers=["CPUExecutionProvider"])
            self.name = self.sess.get_inputs()[0].name

        def __call__(self, batch):
            y = self.sess.run(None, {self.name: batch["x"]})[0]
            if cfg.get("output", {}).get("softmax"):
                y = softmax(y)
            return {"top1": y.argmax(axis=1)}

    ds = (ray.data.read_binary_files(files)
          .map_batches(decode, batch_size=args.batch)
          .map_batches(Model, batch_size=args.batch, concurrency=1, num_cpus=1))
    n = sum(len(b["top1"]) for b in ds.iter_batches(batch_size=None))
    seconds = time.perf_counter() - start
    ray.shutdown()
    print(json.dumps({"images": n, "seconds": seconds, "images_per_second": n / seconds}))


if __name__ == "__main__":
    main()
