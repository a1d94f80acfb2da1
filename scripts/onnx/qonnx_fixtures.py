#!/usr/bin/env python3
"""Writes the ONNX model fixtures of qonnx's tests (``qonnx/tests/it/models.rs``) to
``qonnx/tests/data/models/<case>/``: small PyTorch models exported to ONNX, with ONNX
Runtime's outputs as the goldens (the Rust tests never run Python).

Per case: ``model.onnx`` (eval mode, non-zero biases and batch-norm statistics as a trained
model has; input ``input`` and output ``output`` with a symbolic batch), ``input_0.pb`` (16
inputs) and ``output_0.pb`` (ONNX Runtime fp32, graph optimizations off), ``calib.pb`` (8
calibration inputs), ``ort_int8_output.pb`` (ONNX Runtime int8 on ``input_0.pb``:
``quant_pre_process`` then ``quantize_static``, QDQ, per-channel ``QInt8`` weights,
``QUInt8`` activations, MinMax on ``calib.pb``; opsets 13 and later, where its per-channel
form exists) and ``info.json`` (opset, op types, ONNX
Runtime's int8 SQNR against its fp32 output, and the nodes it leaves in float).

    ~/qrust-venv/bin/python scripts/onnx/qonnx_fixtures.py
(needs: pip install torch onnx onnxscript onnxruntime numpy)
"""

import json
import math
import os
import sys
import shutil
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "qonnx", "tests", "data", "models")


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=None):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act] if act is not None else []))


class ConvNet(nn.Module):
    """Conv + BN + ReLU, max pool, ReLU6 (Clip), a residual block, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, act=nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.down = conv_bn(8, 16, stride=2, act=nn.ReLU6())
        self.body = nn.Sequential(conv_bn(16, 16, act=nn.ReLU()), conv_bn(16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.down(self.pool(self.stem(x)))
        x = F.relu(x + self.body(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Mobile(nn.Module):
    """Inverted residuals with Hardswish, depthwise 3x3 and 5x5/2, squeeze-and-excitation
    (Hardsigmoid), SiLU (Sigmoid * x), a Tanh head."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2, act=nn.Hardswish())
        self.expand = conv_bn(16, 32, k=1, act=nn.Hardswish())
        self.dw = conv_bn(32, 32, groups=32, act=nn.ReLU6())
        self.se_reduce = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.project = conv_bn(32, 16, k=1)
        self.dw5 = conv_bn(16, 16, k=5, stride=2, groups=16, act=nn.SiLU())
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        s = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        x = x + self.project(y * s)
        x = self.dw5(x)
        return torch.tanh(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class Shuffle(nn.Module):
    """ShuffleNetV2's block: chunk, channel shuffle through x.size() (Shape / Gather /
    Reshape / Transpose chains), concatenation; average pool, nearest upsampling, a
    ceil-mode max pool, x.reshape(x.shape[0], -1)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, act=nn.ReLU())
        self.branch = nn.Sequential(conv_bn(8, 8, k=1, act=nn.ReLU()), conv_bn(8, 8, groups=8), conv_bn(8, 8, k=1, act=nn.ReLU()))
        self.pool = nn.AvgPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.mpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.fc = nn.Linear(16, 5)

    @staticmethod
    def shuffle(x, groups):
        n, c, h, w = x.size()
        x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
        return x.view(n, -1, h, w)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = self.shuffle(torch.cat((a, self.branch(b)), 1), 2)
        x = self.mpool(self.up(self.pool(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.reshape(x.shape[0], -1))


class BnExplicit(nn.Module):
    """Batch-norms the exporter cannot fold (on the input, after a Linear), an asymmetric
    pad before a convolution, and a Softmax."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 8 * 8, 12)
        self.bn_fc = nn.BatchNorm1d(12)

    def forward(self, x):
        x = F.relu(self.conv(F.pad(self.bn_in(x), (0, 1, 0, 1))))
        return torch.softmax(self.bn_fc(self.fc(torch.flatten(x, 1))), dim=1)


class ConvNextBlock(nn.Module):
    """ConvNeXt's pieces: a patchify stem with a channels-last LayerNorm (Transpose,
    LayerNormalization, Transpose), a block (depthwise 7x7, LayerNorm, Linear on NHWC
    (MatMul on a 4-D input), GELU (the Erf form before opset 20), Linear, layer scale (Mul by
    a per-channel constant), residual), and a LayerNorm head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.stem_norm = nn.LayerNorm(16)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.pw1 = nn.Linear(16, 64)
        self.pw2 = nn.Linear(64, 16)
        self.layer_scale = nn.Parameter(0.5 + torch.rand(16, 1, 1))
        self.head_norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 7)

    def forward(self, x):
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw2(F.gelu(self.pw1(y))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * y
        return self.fc(self.head_norm(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 5))

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    """Single-head self-attention on tokens: the two products of computed values (q . k^T,
    scaled by 1/sqrt(d), then the weights . v), a softmax between them, linear layers around."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(16)
        return self.out(torch.softmax(scores, dim=-1) @ self.v(x))


class EncoderBlock(nn.Module):
    """A pre-norm transformer encoder block written as users write one: LayerNorm, a packed
    q/k/v projection split in three, two heads (reshape, transpose), scaled scores, softmax,
    the heads joined back, a residual; then an MLP with GELU and a second residual."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.d, self.heads = d, heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(self.d, -1))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d // self.heads), dim=-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, t, self.d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GeluTanh(nn.Module):
    """Tokens through linear layers with the tanh form of GELU written out twice: as PyTorch
    exports ``nn.GELU(approximate="tanh")`` before opset 20, and as Hugging Face's
    ``gelu_new`` (GPT-2) writes it."""

    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 2 * d), nn.Linear(2 * d, 2 * d), nn.Linear(2 * d, d)
        self.gelu = nn.GELU(approximate="tanh")

    def forward(self, x):
        x = self.fc2(self.gelu(self.fc1(x)))
        x = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
        return self.fc3(x)


def vit_tiny():
    """torchvision's VisionTransformer, tiny: 32 x 32 images in 8 x 8 patches, two encoder
    layers of 32 features and 4 heads (nn.MultiheadAttention), a class token and a positional
    embedding. The class token and the head's weights, zeros when initialised, are random."""
    from torchvision.models.vision_transformer import VisionTransformer

    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                          num_classes=10)
    with torch.no_grad():
        m.class_token.normal_(0, 0.5)
        m.heads.head.weight.normal_(0, 0.2)
        for layer in m.encoder.layers:
            layer.self_attention.in_proj_bias.normal_(0, 0.1)
    return m


# case: (module, input shape without the batch, opset, exporter)
CASES = {
    "convnet": (ConvNet, (3, 16, 16), 17, "torchscript"),
    "convnet_opset11": (ConvNet, (3, 16, 16), 11, "torchscript"),
    "convnet_opset13": (ConvNet, (3, 16, 16), 13, "torchscript"),
    "convnet_opset9": (ConvNet, (3, 16, 16), 9, "torchscript"),
    "mobile": (Mobile, (3, 24, 24), 17, "torchscript"),
    "shuffle": (Shuffle, (3, 16, 16), 17, "torchscript"),
    "bn_explicit": (BnExplicit, (3, 16, 16), 17, "torchscript"),
    "mlp": (Mlp, (20,), 17, "torchscript"),
    "convnext_block": (ConvNextBlock, (3, 32, 32), 17, "torchscript"),
    "convnet_dynamo": (ConvNet, (3, 16, 16), 18, "dynamo"),
    "attention": (Attention, (6, 16), 17, "torchscript"),
    "encoder_block": (EncoderBlock, (6, 16), 17, "torchscript"),
    "vit": (vit_tiny, (3, 32, 32), 17, "torchscript"),
    "gelu_tanh": (GeluTanh, (6, 16), 17, "torchscript"),
}


def trained_like(model, seed):
    """Non-zero biases and batch-norm statistics, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model.eval()


def save_pb(a, path, name):
    with open(path, "wb") as fh:
        fh.write(numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), name).SerializeToString())


class Reader(CalibrationDataReader):
    def __init__(self, calib):
        self.it = iter([{"input": c[None]} for c in calib])

    def get_next(self):
        return next(self.it, None)


def session(path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def sqnr_db(ref, got):
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum()))


def write_case(name, ctor, shape, opset, exporter, seed):
    torch.manual_seed(seed)
    model = trained_like(ctor(), seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, *shape)).astype(np.float32)
    calib = rng.standard_normal((8, *shape)).astype(np.float32)
    d = os.path.join(OUT, name)
    os.makedirs(d)
    path = os.path.join(d, "model.onnx")
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=64)
        prog = torch.onnx.export(model, (torch.from_numpy(x),), dynamo=True, opset_version=opset,
                                 input_names=["input"], output_names=["output"],
                                 dynamic_shapes={"x": {0: batch}}, external_data=False)
        prog.save(path)
    else:
        torch.onnx.export(model, torch.from_numpy(x), path, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x)).numpy()
    out = session(path).run(None, {"input": x})[0]
    assert np.abs(out - torch_out).max() <= 1e-4 * np.abs(torch_out).max(), f"{name}: ONNX Runtime disagrees with PyTorch"
    save_pb(x, os.path.join(d, "input_0.pb"), "input")
    save_pb(out, os.path.join(d, "output_0.pb"), "output")
    save_pb(calib, os.path.join(d, "calib.pb"), "calib")
    m = onnx.load(path)
    info = {
        "opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
        "exporter": exporter,
        "ops": sorted({n.op_type for n in m.graph.node}),
        "ort_int8_sqnr_db": None,
    }
    # quantize_static writes per-channel DequantizeLinear (an axis), which needs opset 13.
    if info["opset"] >= 13:
        with tempfile.TemporaryDirectory() as tmp:
            pre, q = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "int8.onnx")
            try:
                quant_pre_process(path, pre)
            except AssertionError:
                # ONNX Runtime's symbolic shape inference fails on nn.MultiheadAttention's
                # reshapes; its other steps still run.
                quant_pre_process(path, pre, skip_symbolic_shape=True)
            quantize_static(pre, q, Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            got = session(q).run(None, {"input": x})[0]
            # Nodes ONNX Runtime computes on quantized values but leaves in float (no
            # QuantizeLinear reads their output), so that the test compares like with like.
            g = onnx.load(q).graph
            quantized = {n.input[0] for n in g.node if n.op_type == "QuantizeLinear"}
            dequantized = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
            info["ort_float_nodes"] = sorted(n.name for n in g.node
                                             if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                                             and any(i in dequantized for i in n.input)
                                             and not any(o in quantized for o in n.output))
        save_pb(got, os.path.join(d, "ort_int8_output.pb"), "output")
        info["ort_int8_sqnr_db"] = sqnr_db(out, got)
    with open(os.path.join(d, "info.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    sq = info["ort_int8_sqnr_db"]
    print(f"{name}: opset {info['opset']}, ONNX Runtime int8 SQNR {'-' if sq is None else f'{sq:.2f}'} dB, ops {info['ops']}")


def main():
    """Writes every case, or only the cases named on the command line (the others kept)."""
    warnings.filterwarnings("ignore")
    only = sys.argv[1:]
    if only:
        for name in only:
            if name not in CASES:
                sys.exit(f"unknown case {name}; cases: {', '.join(CASES)}")
            shutil.rmtree(os.path.join(OUT, name), ignore_errors=True)
    else:
        if os.path.exists(OUT):
            shutil.rmtree(OUT)
        os.makedirs(OUT)
    for i, (name, (ctor, shape, opset, exporter)) in enumerate(CASES.items()):
        if only and name not in only:
            continue
        try:
            write_case(name, ctor, shape, opset, exporter, seed=100 + i)
        except Exception as e:  # noqa: BLE001 - an exporter this environment lacks is reported, not fatal
            if exporter != "dynamo":
                raise
            shutil.rmtree(os.path.join(OUT, name), ignore_errors=True)
            print(f"{name}: skipped, the dynamo exporter failed here: {e}")
    size = sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(OUT) for f in fs)
    print(f"{size / 1e3:.0f} kB in {OUT}")


if __name__ == "__main__":
    main()
