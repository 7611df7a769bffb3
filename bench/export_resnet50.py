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
    # Same ImageNet pre-processing as the shipped MobileNetV2. This export declares only the logits;
    # the pooled features that sketches read are the tensor torch's exporter names
    # `/Flatten_output_0`, which ferry exposes when a job sketches.
    with open(os.path.join(here, "..", "examples", "models", "mobilenet_v2", "ferry.toml")) as f:
        lines = [
            'features = "/Flatten_output_0" # pooled features inside the graph, for sketches\n'
            if line.startswith("features") else line
            for line in f
        ]
    with open(os.path.join(args.out, "ferry.toml"), "w") as f:
        f.writelines(lines)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
