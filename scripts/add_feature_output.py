#!/usr/bin/env python3
"""Adds a classifier's pooled penultimate features as a second graph output named "features".

One forward pass then gives both the predictions and the features `ferry transform --sketch` and
`ferry sketch fit` read. The features are the input of the graph's final Gemm (for torchvision
classifiers, the flattened global average pool). The file is rewritten in place; running it on a
model that already has the output changes nothing.

    python3 scripts/add_feature_output.py examples/models/mobilenet_v2/model.onnx
"""
import sys

import onnx
from onnx import TensorProto, helper


def add_feature_output(path, name="features"):
    model = onnx.load(path)
    graph = model.graph
    if any(o.name == name for o in graph.output):
        return False
    final = next(n for n in reversed(graph.node) if n.op_type == "Gemm")
    weight = next(i for i in graph.initializer if i.name == final.input[1])
    # Gemm with transB=1 (torch Linear): the weight is [classes, features].
    trans_b = next((a.i for a in final.attribute if a.name == "transB"), 0)
    width = weight.dims[1] if trans_b else weight.dims[0]
    graph.node.append(helper.make_node("Identity", [final.input[0]], [name], name="ferry_features"))
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width]))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return True


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(p, "updated" if add_feature_output(p) else "already has a features output")
