#!/usr/bin/env python3
"""Writes the tiny ONNX models the tests use, with the `onnx` package's helpers.

identity_512: returns its [N, 3, 512, 512] input unchanged, so a single image produces a
~8 MB .out (a multipart upload) and every output value can be checked against the pixels.

identity_224: the same at 224x224 behind ImageNet's geometry (short side 256, centre crop 224)
without mean and std, so each output is a pre-processed pixel / 255 that can be compared with
Pillow's.

identity_224_batch1, identity_224_batch3: identity_224 with a fixed batch size instead of a
dynamic one, as exports without a dynamic batch axis declare it.

identity_nhwc_224: a bare model taking [N, 224, 224, 3], channels last as TensorFlow exports
declare it, without a ferry.toml to say so.

identity_grey_224: identity_224's geometry for a one-channel [N, 1, 224, 224] input, whose
ferry.toml does not say that it is greyscale.
"""
import os

import onnx
from onnx import TensorProto, helper

here = os.path.dirname(os.path.abspath(__file__))


def identity(name, side, toml, batch="batch", channels_last=False, channels=3):
    out = os.path.join(here, "..", "tests", "fixtures", name)
    os.makedirs(out, exist_ok=True)
    shape = [batch, side, side, channels] if channels_last else [batch, channels, side, side]
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("same", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["same"])], name, [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "model.onnx"))
    if toml:
        with open(os.path.join(out, "ferry.toml"), "w") as f:
            f.write(toml)
    print("wrote", os.path.normpath(out))


identity("identity_512", 512, "[input]\nresize = [512, 512]\nscale = 255.0\n")
imagenet_geometry = "[input]\nresize = 256\ncrop = [224, 224]\nscale = 255.0\n"
identity("identity_224", 224, imagenet_geometry)
identity("identity_224_batch1", 224, imagenet_geometry, batch=1)
identity("identity_224_batch3", 224, imagenet_geometry, batch=3)
identity("identity_nhwc_224", 224, None, channels_last=True)
identity("identity_grey_224", 224, imagenet_geometry, channels=1)
