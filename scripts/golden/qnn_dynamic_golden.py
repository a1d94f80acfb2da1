#!/usr/bin/env python3
"""Golden fixture for dynamic quantization of a whole model in `qnn`, from real PyTorch.

Writes ``qnn/data/dynamic_mlp_model.safetensors``: a two-layer perceptron
(``fc1`` Linear(16, 32), ReLU, ``fc2`` Linear(32, 10)) with random weights and non-zero biases
(``fc1.weight`` ... under PyTorch's names); and ``qnn/data/dynamic_mlp_io.safetensors``: a 3-D input ``input`` [2, 5, 16] (tokens of
features), the float output ``output_f32``, and the outputs of
``torch.ao.quantization.quantize_dynamic`` with ``default_dynamic_qconfig`` (per-tensor weights,
``output_dynamic``) and ``per_channel_dynamic_qconfig`` (``output_dynamic_per_channel``),
engine x86.

Run: python scripts/golden/qnn_dynamic_golden.py (needs torch and safetensors).
"""
import pathlib

import torch
from safetensors.torch import save_file

DATA = pathlib.Path(__file__).resolve().parents[2] / "qnn/data"


def main():
    torch.manual_seed(3)
    torch.backends.quantized.engine = "x86"
    model = torch.nn.Sequential()
    model.add_module("fc1", torch.nn.Linear(16, 32))
    model.add_module("relu", torch.nn.ReLU())
    model.add_module("fc2", torch.nn.Linear(32, 10))
    model.eval()
    x = torch.randn(2, 5, 16) * 2.0 + 0.3
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(DATA / "dynamic_mlp_model.safetensors"))
    out = {"input": x}
    out["output_f32"] = model(x).detach()
    for name, qc in [("output_dynamic", torch.ao.quantization.default_dynamic_qconfig),
                     ("output_dynamic_per_channel", torch.ao.quantization.per_channel_dynamic_qconfig)]:
        qm = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: qc}, dtype=torch.qint8)
        out[name] = qm(x).detach()
    save_file(out, str(DATA / "dynamic_mlp_io.safetensors"))
    print(f"wrote {DATA}/dynamic_mlp_model.safetensors and dynamic_mlp_io.safetensors")


if __name__ == "__main__":
    main()
