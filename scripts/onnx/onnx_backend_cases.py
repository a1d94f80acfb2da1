#!/usr/bin/env python3
"""Copies ONNX's own backend test cases for the ops qonnx imports into
``qonnx/tests/data/backend/`` (the Rust conformance test, ``qonnx/tests/it/backend.rs``,
imports each model, runs it on the case's inputs and compares with the case's outputs).

The cases ship in the ``onnx`` wheel under ``onnx/backend/test/data/``: ``pytorch-converted``
(PyTorch modules exported by ONNX's maintainers) and ``pytorch-operator`` (single PyTorch
operators), each a folder with ``model.onnx`` and ``test_data_set_0/{input,output}_*.pb``.
A case is taken when every op of its model is one qonnx lists in ``SUPPORTED`` (below, the
same list), its first input is a float tensor of rank 2 or 4, and it is small. Cases whose
opset is outside qonnx's 9-21 are taken too: the test checks they are refused by name.

    ~/qrust-venv/bin/python scripts/onnx/onnx_backend_cases.py   (needs: pip install onnx)
"""

import json
import os
import shutil

import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "qonnx", "tests", "data", "backend")
SOURCES = ["pytorch-converted", "pytorch-operator"]
# qonnx::SUPPORTED, as op types (qonnx refuses the others by name; those cases are left out).
SUPPORTED = {
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvTranspose", "Div", "Dropout", "Flatten", "Gather", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool",
    "HardSigmoid", "HardSwish", "Identity", "MatMul", "MaxPool", "Mul", "Pad", "ReduceMean", "Relu", "Reshape",
    "Resize", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Squeeze", "Sub", "Sum", "Tanh", "Transpose",
    "Unsqueeze", "Upsample",
}
MAX_BYTES = 200_000


def folder_size(d):
    return sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs)


def main():
    data = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    index = []
    for source in SOURCES:
        for case in sorted(os.listdir(os.path.join(data, source))):
            src = os.path.join(data, source, case)
            model_path = os.path.join(src, "model.onnx")
            if not os.path.exists(model_path) or not os.path.isdir(os.path.join(src, "test_data_set_0")):
                continue
            m = onnx.load(model_path)
            ops = sorted({n.op_type for n in m.graph.node})
            inits = {t.name for t in m.graph.initializer}
            inputs = [i for i in m.graph.input if i.name not in inits]
            if not ops or not set(ops) <= SUPPORTED or not inputs:
                continue
            t = inputs[0].type.tensor_type
            if t.elem_type != onnx.TensorProto.FLOAT or len(t.shape.dim) not in (2, 4):
                continue
            if folder_size(src) > MAX_BYTES:
                continue
            dst = os.path.join(OUT, case)
            os.makedirs(os.path.join(dst, "test_data_set_0"))
            shutil.copy(model_path, dst)
            for f in sorted(os.listdir(os.path.join(src, "test_data_set_0"))):
                shutil.copy(os.path.join(src, "test_data_set_0", f), os.path.join(dst, "test_data_set_0", f))
            opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
            index.append({"case": case, "source": source, "ops": ops, "opset": opset, "inputs": len(inputs),
                          "outputs": len(m.graph.output)})
    with open(os.path.join(OUT, "index.json"), "w") as fh:
        json.dump(index, fh, indent=1)
    for s in SOURCES:
        print(f"{s}: {sum(1 for c in index if c['source'] == s)} cases")
    print(f"opsets: {sorted({c['opset'] for c in index})}; {folder_size(OUT) / 1e3:.0f} kB in {OUT}")


if __name__ == "__main__":
    main()
