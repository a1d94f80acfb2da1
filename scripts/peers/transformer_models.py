#!/usr/bin/env python3
"""Peer timing: transformers in PyTorch dynamic int8 and ONNX Runtime dynamic and static int8,
served to ``cargo xtask bench --filter transformers``.

One model (``vit_b_16``: torchvision's ViT-B/16 with random weights of a trained model's kind,
``ort_models.trained_like``, seed 11) is built once, then quantized three ways, each served
under its own name:

- ``vit_b_16/pytorch_dynamic``: ``torch.ao.quantization.quantize_dynamic`` on the module's
  ``nn.Linear`` layers (qint8 weights), PyTorch's best-known transformer quantization;
- ``vit_b_16/onnxruntime_dynamic``: the module exported to ONNX (opset 17, dynamic batch,
  kept as ``vit_b_16.onnx`` beside the inputs for our side to import), ``quant_pre_process``,
  then ``quantize_dynamic`` (per-channel ``QInt8`` weights);
- ``vit_b_16/onnxruntime_static``: the same pre-processed file through ``quantize_static``
  (QDQ, per-channel ``QInt8`` weights, ``QUInt8`` activations, MinMax calibration on the
  ``calib`` images one at a time, as ours).

Each flavour's SQNR is its int8 output against its own float model on ``xq``; ONNX Runtime's
fp32 output on ``xq`` is written as ``vit_b_16.ort_f32.pb``, against which the bench checks
our float import. ``peer_server.py`` describes the files and the protocol.

    QRUST_PYTHON=~/qrust-venv/bin/python cargo xtask bench --filter transformers --peers
(needs ``pip install torch torchvision onnx onnxruntime safetensors numpy``)
"""

import os
import sys
import tempfile
import time

import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from torchvision.models import vit_b_16

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_server  # noqa: E402
from ort_models import Images, OneThread, save_pb, session, trained_like  # noqa: E402

CTORS = {"vit_b_16": vit_b_16}


class Transformers:
    NAME = "transformers"

    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.base = {}
        self.runners = {}

    def model(self, base, directory, inputs):
        """The float module, its ONNX export and the pre-processed file, built once per model."""
        if base not in self.base:
            torch.manual_seed(0)
            m = trained_like(CTORS[base](weights=None).eval(), 11)
            f = os.path.join(directory, f"{base}.onnx")
            torch.onnx.export(m, torch.from_numpy(inputs["x1"]), f, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
            pre = os.path.join(self.tmp.name, f"{base}.pre.onnx")
            default_options = ort.SessionOptions
            ort.SessionOptions = OneThread
            try:
                t0 = time.perf_counter()
                try:
                    quant_pre_process(f, pre)
                except AssertionError:
                    # Its symbolic shape inference fails on nn.MultiheadAttention's reshapes;
                    # the other steps run without it.
                    quant_pre_process(f, pre, skip_symbolic_shape=True)
                pre_ms = (time.perf_counter() - t0) * 1e3
            finally:
                ort.SessionOptions = default_options
            fs = session(f, 1)
            ref = fs.run(None, {"x": inputs["xq"]})[0]
            save_pb(ref, os.path.join(directory, f"{base}.ort_f32.pb"))
            ort_f32_ms = peer_server.median_ms(lambda: fs.run(None, {"x": inputs["x1"]}), 5)
            self.base[base] = (m, f, pre, pre_ms, ref, ort_f32_ms)
        return self.base[base]

    def prepare(self, name, directory, inputs):
        base, flavour = name.split("/")
        m, _, pre, pre_ms, ort_ref, ort_f32_ms = self.model(base, directory, inputs)
        xq = inputs["xq"]
        if flavour == "pytorch_dynamic":
            torch.set_num_threads(1)
            x1 = torch.from_numpy(inputs["x1"])
            with torch.no_grad():
                ref = m(torch.from_numpy(xq)).numpy()
                f32_ms = peer_server.median_ms(lambda: m(x1), 5)
                t0 = time.perf_counter()
                q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
                quantize_ms = (time.perf_counter() - t0) * 1e3
                got = q(torch.from_numpy(xq)).numpy()

            def runner(threads, x, q=q):
                torch.set_num_threads(threads)
                xt = torch.from_numpy(x)

                def run():
                    with torch.no_grad():
                        q(xt)

                return run

            self.runners[name] = runner
            return peer_server.sqnr_db(ref, got), f32_ms, quantize_ms
        out = os.path.join(self.tmp.name, f"{base}.{flavour}.onnx")
        default_options = ort.SessionOptions
        ort.SessionOptions = OneThread
        try:
            t0 = time.perf_counter()
            if flavour == "onnxruntime_dynamic":
                quantize_dynamic(pre, out, weight_type=QuantType.QInt8, per_channel=True)
            elif flavour == "onnxruntime_static":
                quantize_static(pre, out, Images(inputs["calib"]), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
            else:
                raise SystemExit(f"unknown flavour {flavour!r} of {base}")
            quantize_ms = pre_ms + (time.perf_counter() - t0) * 1e3
        finally:
            ort.SessionOptions = default_options
        got = session(out, 1).run(None, {"x": xq})[0]
        sessions = {}

        def runner(threads, x, out=out, sessions=sessions):
            if threads not in sessions:
                sessions[threads] = session(out, threads)
            s = sessions[threads]
            return lambda: s.run(None, {"x": x})

        self.runners[name] = runner
        return peer_server.sqnr_db(ort_ref, got), ort_f32_ms, quantize_ms

    def run_file(self, path, x):
        s = session(path, 1)
        return s.run(None, {s.get_inputs()[0].name: x})[0]

    def int8_runner(self, name, threads, x):
        return self.runners[name](threads, x)


if __name__ == "__main__":
    peer_server.serve(Transformers())
