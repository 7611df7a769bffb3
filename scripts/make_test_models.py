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

identity_uint8_224: identity_nhwc_224 taking and returning uint8, as TensorFlow exports of image
models declare their input: the pixels as they are, no ferry.toml.

identity_fp16_224: identity_224 taking and returning float16, as half-precision exports declare it.

conv_inline, conv_external: one model, a 3x3 convolution to 8 channels with seeded weights, then
global average pooling, [N, 3, 224, 224] -> [N, 8]; stored with its weights inside the file, and
with them in model.onnx.data beside it (ONNX external data, which PyTorch's exporter writes for
large models).

dynamic_hw: [N, 3, H, W] -> the channel means [N, 3], height and width left to ferry.toml (it has
none), as exports with dynamic spatial axes declare them.

typed_outputs: [N, 3, 8, 8] -> the channel means as floats ("means"), their argmax as int64
("label"), whether each is over 0.5 as bool ("bright"), each times 255 cast to uint8 ("level"),
as double ("double") and the label as a string ("name"): every kind of output a .out writes.
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

here = os.path.dirname(os.path.abspath(__file__))


def identity(name, side, toml, batch="batch", channels_last=False, channels=3, dtype=TensorProto.FLOAT):
    out = os.path.join(here, "..", "tests", "fixtures", name)
    os.makedirs(out, exist_ok=True)
    shape = [batch, side, side, channels] if channels_last else [batch, channels, side, side]
    x = helper.make_tensor_value_info("pixels", dtype, shape)
    y = helper.make_tensor_value_info("same", dtype, shape)
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
identity("identity_uint8_224", 224, None, channels_last=True, dtype=TensorProto.UINT8)
identity("identity_fp16_224", 224, "[input]\nresize = 256\ncrop = [224, 224]\n", dtype=TensorProto.FLOAT16)


def conv(name, external):
    out = os.path.join(here, "..", "tests", "fixtures", name)
    os.makedirs(out, exist_ok=True)
    weights = np.random.default_rng(7).standard_normal((8, 3, 3, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 224, 224])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 8])
    nodes = [
        helper.make_node("Conv", ["pixels", "weights"], ["conv"]),
        helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["scores"]),
    ]
    graph = helper.make_graph(nodes, name, [x], [y], [numpy_helper.from_array(weights, "weights")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = os.path.join(out, "model.onnx")
    if external:
        # onnx appends to an existing data file.
        data = os.path.join(out, "model.onnx.data")
        if os.path.exists(data):
            os.remove(data)
        onnx.save(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    else:
        onnx.save(model, path)
    print("wrote", os.path.normpath(out))


conv("conv_inline", external=False)
conv("conv_external", external=True)


def typed_outputs():
    out = os.path.join(here, "..", "tests", "fixtures", "typed_outputs")
    os.makedirs(out, exist_ok=True)
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])
    outputs = [
        helper.make_tensor_value_info("means", TensorProto.FLOAT, ["batch", 3]),
        helper.make_tensor_value_info("label", TensorProto.INT64, ["batch", 1]),
        helper.make_tensor_value_info("bright", TensorProto.BOOL, ["batch", 3]),
        helper.make_tensor_value_info("level", TensorProto.UINT8, ["batch", 3]),
        helper.make_tensor_value_info("double", TensorProto.DOUBLE, ["batch", 3]),
        helper.make_tensor_value_info("name", TensorProto.STRING, ["batch", 1]),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["means"]),
        helper.make_node("ArgMax", ["means"], ["label"], axis=1, keepdims=1),
        helper.make_node("Greater", ["means", "half"], ["bright"]),
        helper.make_node("Mul", ["means", "full"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["level"], to=TensorProto.UINT8),
        helper.make_node("Cast", ["means"], ["double"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["label"], ["name"], to=TensorProto.STRING),
    ]
    constants = [
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("full", TensorProto.FLOAT, [], [255.0]),
    ]
    graph = helper.make_graph(nodes, "typed_outputs", [x], outputs, constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "model.onnx"))
    with open(os.path.join(out, "ferry.toml"), "w") as f:
        f.write("[input]\nresize = [8, 8]\nscale = 255.0\n")
    print("wrote", os.path.normpath(out))


typed_outputs()


def dynamic_hw():
    out = os.path.join(here, "..", "tests", "fixtures", "dynamic_hw")
    os.makedirs(out, exist_ok=True)
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("means", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["means"])]
    graph = helper.make_graph(nodes, "dynamic_hw", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "model.onnx"))
    print("wrote", os.path.normpath(out))


dynamic_hw()
