#!/usr/bin/env python3
"""Peer timing: whole models in ONNX Runtime static int8, served to ``cargo xtask bench``.

For each model, torchvision's architecture gets the weights ``cargo xtask bench`` wrote
(``peer_server.py`` describes the files and the protocol: non-zero biases and batch-norm
statistics, as a trained model has; with torchvision's all-zero initial biases the exporter
shares one zero initializer through ``Identity`` nodes, ``quantize_static`` then cannot see
the biases as initializers and ONNX Runtime runs its int8 convolutions unfused, 3-4x slower);
ShuffleNetV2, ConvNeXt-Tiny and ViT-B/16, which our side only imports from ONNX, get random
weights of that kind made here (``trained_like``). The model is exported to ONNX (opset 17, input ``x`` with a dynamic batch; kept as
``<model>.onnx`` beside the weights, with ONNX Runtime's fp32 and int8 outputs on ``xq`` as
``<model>.ort_f32.pb`` and ``<model>.ort_int8.pb``, for the bench's ``onnx_<model>`` rows), run through
``quant_pre_process`` (shape inference and graph optimisation, as ONNX Runtime's
documentation asks before quantizing), then ``quantize_static`` (QDQ format, per-channel
``QInt8`` weights, ``QUInt8`` activations, MinMax calibration on the same images as ours); those
two steps are timed together on one thread, as the whole quantization.
Sessions run on the CPU execution provider with ``intra_op_num_threads = threads``.

    QRUST_PYTHON=~/qrust-venv/bin/python cargo xtask bench --peers
(needs ``pip install torch torchvision onnx onnxruntime safetensors numpy``)
"""

import os
import sys
import tempfile
import time

import onnxruntime as ort
from onnx import numpy_helper
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from torchvision.models import (
    convnext_tiny,
    efficientnet_b0,
    mobilenet_v2,
    mobilenet_v3_large,
    resnet18,
    resnet50,
    shufflenet_v2_x1_0,
    vit_b_16,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_server  # noqa: E402

CTORS = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "resnet50": resnet50,
    "mobilenet_v3_large": mobilenet_v3_large,
    "efficientnet_b0": efficientnet_b0,
    # Only imported from ONNX on our side (no Rust twin): weights made here.
    "shufflenet_v2_x1_0": shufflenet_v2_x1_0,
    "convnext_tiny": convnext_tiny,
    "vit_b_16": vit_b_16,
}


def trained_like(model, seed):
    """Random weights of a trained model's kind for a model the bench wrote no weights for:
    torchvision's initial weights, with non-zero biases, batch-norm statistics and layer
    scales (ConvNeXt's start at 1e-6, which would make every block an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("layer_scale"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif p.ndim == 1:  # norm weights
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif not p.any():
                # Parameters initialised to zeros (ViT's class token and classifier weights):
                # a trained model's are not, and a zero classifier gives constant logits.
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


def save_pb(a, path):
    """An array as an ONNX TensorProto file (what qonnx::tensor::read_pb reads)."""
    with open(path, "wb") as fh:
        fh.write(numpy_helper.from_array(a).SerializeToString())


class Images(CalibrationDataReader):
    def __init__(self, calib):
        self.batches = iter([{"x": img[None].copy()} for img in calib])

    def get_next(self):
        return next(self.batches, None)


class OneThread(ort.SessionOptions):
    """Session options that run on one thread unless told otherwise."""

    def __init__(self):
        super().__init__()
        self.intra_op_num_threads = 1
        self.inter_op_num_threads = 1


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class OnnxRuntime:
    NAME = "onnxruntime"

    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.files = {}
        self.sessions = {}

    def prepare(self, name, directory, inputs):
        m = CTORS[name](weights=None).eval()
        if os.path.exists(os.path.join(directory, name + ".safetensors")):
            peer_server.load_state_dict(m, directory, name)
        else:
            trained_like(m, 11)
        d = self.tmp.name
        pre, q = (os.path.join(d, f"{name}{s}.onnx") for s in (".pre", ".int8"))
        # The float model stays beside the weights: the bench imports this very file (qonnx)
        # for its onnx_<model> rows, and compares its float outputs with ours.
        f = os.path.join(directory, f"{name}.onnx")
        torch.onnx.export(m, torch.from_numpy(inputs["x1"]), f, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
        # The whole quantization of the exported file, timed, on one thread: the sessions
        # that quant_pre_process and quantize_static's calibration create take default
        # options (every core), so the options they get here ask for one thread.
        default_options = ort.SessionOptions
        ort.SessionOptions = OneThread
        try:
            t0 = time.perf_counter()
            try:
                quant_pre_process(f, pre)
            except AssertionError:
                # Its symbolic shape inference fails on nn.MultiheadAttention's reshapes
                # (ViT); the other steps run without it.
                quant_pre_process(f, pre, skip_symbolic_shape=True)
            quantize_static(pre, q, Images(inputs["calib"]), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            quantize_ms = (time.perf_counter() - t0) * 1e3
        finally:
            ort.SessionOptions = default_options
        self.files[name] = q
        x = inputs["x1"]
        fs = session(f, 1)
        f32_ms = peer_server.median_ms(lambda: fs.run(None, {"x": x}), 5)
        xq = inputs["xq"]
        ref = fs.run(None, {"x": xq})[0]
        got = self.session(name, 1).run(None, {"x": xq})[0]
        save_pb(ref, os.path.join(directory, f"{name}.ort_f32.pb"))
        save_pb(got, os.path.join(directory, f"{name}.ort_int8.pb"))
        return peer_server.sqnr_db(ref, got), f32_ms, quantize_ms

    def session(self, name, threads):
        key = (name, threads)
        if key not in self.sessions:
            self.sessions[key] = session(self.files[name], threads)
        return self.sessions[key]

    def run_file(self, path, x):
        s = session(path, 1)
        return s.run(None, {s.get_inputs()[0].name: x})[0]

    def int8_runner(self, name, threads, x):
        s = self.session(name, threads)
        return lambda: s.run(None, {"x": x})


if __name__ == "__main__":
    peer_server.serve(OnnxRuntime())
