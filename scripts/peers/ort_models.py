#!/usr/bin/env python3
"""Peer timing: whole models in ONNX Runtime, float and static int8, batch 1, 1x3x224x224.

For each torchvision model (random weights, seed 0): export to ONNX (opset 17, input
``x``), quantize with ``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel
``QInt8`` weights, ``QUInt8`` activations, MinMax calibration on ``--calib`` random images),
then time ``session.run`` on the CPU execution provider with ``intra_op_num_threads =
--threads``: 3 warm-up runs, then the median of at least ``--reps`` runs (and 0.25 s).

Prints one JSON list: [{"name", "f32_ms", "int8_ms", "sqnr_db"}].

    /work/venv/bin/python scripts/peers/ort_models.py [--threads 1] [--models resnet18,...]
(needs ``pip install torch torchvision onnx onnxruntime``)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from torchvision.models import mobilenet_v2, resnet18, resnet50

CTORS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2, "resnet50": resnet50}


class RandomImages(CalibrationDataReader):
    def __init__(self, n):
        rng = np.random.default_rng(1)
        self.batches = iter([{"x": rng.standard_normal((1, 3, 224, 224), dtype=np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self.batches, None)


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def median_ms(sess, x, reps):
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < 0.25:
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="resnet18,mobilenet_v2,resnet50")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--calib", type=int, default=8)
    a = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name in a.models.split(","):
            torch.manual_seed(0)
            m = CTORS[name](weights=None).eval()
            f = os.path.join(d, name + ".onnx")
            q = os.path.join(d, name + ".int8.onnx")
            torch.onnx.export(m, torch.randn(1, 3, 224, 224), f, input_names=["x"], opset_version=17, dynamo=False)
            quantize_static(f, q, RandomImages(a.calib), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            x = np.random.default_rng(2).standard_normal((1, 3, 224, 224), dtype=np.float32)
            fs, qs = session(f, a.threads), session(q, a.threads)
            f32, i8 = median_ms(fs, x, a.reps), median_ms(qs, x, a.reps)
            ref, got = fs.run(None, {"x": x})[0], qs.run(None, {"x": x})[0]
            sqnr = float(10 * np.log10((ref ** 2).mean() / ((ref - got) ** 2).mean()))
            out.append({"name": name, "f32_ms": f32, "int8_ms": i8, "sqnr_db": sqnr})
            print(f"onnxruntime {name}: f32 {f32:.2f} ms, int8 {i8:.2f} ms", file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
