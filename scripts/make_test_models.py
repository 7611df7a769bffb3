#!/usr/bin/env python3
"""Writes the tiny ONNX models the tests use, with the `onnx` package's helpers.

identity_512: returns its [N, 3, 512, 512] input unchanged, so a single image produces a
~8 MB .out (a multipart upload) and every output value can be checked against the pixels.
"""
import os

import onnx
from onnx import TensorProto, helper

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "..", "tests", "fixtures", "identity_512")
os.makedirs(out, exist_ok=True)
x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 512, 512])
y = helper.make_tensor_value_info("same", TensorProto.FLOAT, ["batch", 3, 512, 512])
graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["same"])], "identity_512", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, os.path.join(out, "model.onnx"))
with open(os.path.join(out, "ferry.toml"), "w") as f:
    f.write('[input]\nresize = [512, 512]\nscale = 255.0\n')
print("wrote", os.path.normpath(out))
