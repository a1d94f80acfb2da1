#!/usr/bin/env python3
"""Fixture for dynamic quantization of an imported ONNX model against PyTorch.

Writes ``qonnx/tests/data/dynamic/token_mlp/``: ``model.onnx`` (a perceptron on tokens,
Linear(16, 32), ReLU, Linear(32, 8), on input [batch, 10, 16], the batch symbolic, exported
by the TorchScript exporter at opset 17), ``input_0.pb`` [2, 10, 16], and the outputs of
``torch.ao.quantization.quantize_dynamic`` on the same module with ``default_dynamic_qconfig``
(``output_dynamic.pb``) and ``per_channel_dynamic_qconfig`` (``output_dynamic_per_channel.pb``),
engine x86. The Rust test imports the file, converts it with qrust's PyTorch-dynamic
presets and expects the same bits.

Run: python scripts/onnx/qonnx_dynamic_fixture.py (needs torch and onnx).
"""
import os
import pathlib
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper

OUT = pathlib.Path(__file__).resolve().parents[2] / "qonnx/tests/data/dynamic/token_mlp"


def save_pb(a, path, name):
    t = numpy_helper.from_array(np.ascontiguousarray(a), name)
    path.write_bytes(t.SerializeToString())


def main():
    warnings.filterwarnings("ignore")
    torch.manual_seed(5)
    torch.backends.quantized.engine = "x86"
    OUT.mkdir(parents=True, exist_ok=True)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(2, 10, 16) * 1.5 + 0.2
    torch.onnx.export(model, (x,), str(OUT / "model.onnx"), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, dynamo=False)
    onnx.checker.check_model(onnx.load(str(OUT / "model.onnx")))
    save_pb(x.numpy(), OUT / "input_0.pb", "input")
    for file, qc in [("output_dynamic.pb", torch.ao.quantization.default_dynamic_qconfig),
                     ("output_dynamic_per_channel.pb", torch.ao.quantization.per_channel_dynamic_qconfig)]:
        qm = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: qc}, dtype=torch.qint8)
        save_pb(qm(x).detach().numpy(), OUT / file, "output")
    size = sum(os.path.getsize(p) for p in OUT.iterdir())
    print(f"wrote {OUT} ({size} bytes)")


if __name__ == "__main__":
    main()
