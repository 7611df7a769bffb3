#!/usr/bin/env python3
"""Exports a ResNet-50 with random weights (speed is what matters here) to a ferry model directory.

    /usr/bin/python3 bench/export_resnet50.py --out /tmp/ferry-bench/resnet50
"""
import argparse
import os

import torch
import torchvision


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    torch.onnx.export(
        model, torch.zeros(1, 3, 224, 224), os.path.join(args.out, "model.onnx"),
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13)
    # Same ImageNet pre-processing as the shipped MobileNetV2. This export has only the logits, so
    # the MobileNetV2 file's `features` output (for sketches) is left out: ferry refuses a model
    # directory that names an output its model does not have.
    with open(os.path.join(here, "..", "examples", "models", "mobilenet_v2", "ferry.toml")) as f:
        lines = [line for line in f if not line.startswith("features")]
    with open(os.path.join(args.out, "ferry.toml"), "w") as f:
        f.writelines(lines)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
