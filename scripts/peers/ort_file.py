"""ONNX Runtime on any ONNX file, for comparing `qrust quantize` / `qrust run` with it.

Quantizes the file as ONNX Runtime's documentation says (`quant_pre_process`, then
`quantize_static`: QDQ, per-channel int8 weights, uint8 activations, MinMax, on the given
calibration data), runs the float and the int8 model on the evaluation data, times both on
one thread, and prints each int8 output's SQNR against ONNX Runtime's fp32 output, with ours
(an .npy from `qrust run`) beside it when given.

    python ort_file.py MODEL.onnx --calib calib.npz --eval eval.npz [--ours ours.npy]
        [--parts 4,18] [--exclude NODE ...] [--rounds 20]

`--parts` splits the first output along axis 1 into pieces of these sizes and reports each
piece's SQNR too (YOLOv8's 4 box coordinates, then its class scores). The .npz files hold
one array, the model's first input, batch first.
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process


def one_array(path):
    with np.load(path) as z:
        if len(z.files) != 1:
            raise SystemExit(f"{path}: expected one array, found {z.files}")
        return z[z.files[0]].astype(np.float32)


def session(path, threads=1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def sqnr_db(ref, got):
    err = float(((ref.astype(np.float64) - got) ** 2).sum())
    return float("inf") if err == 0 else 10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / err)


def median_ms(f, rounds):
    f()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


class Items(CalibrationDataReader):
    def __init__(self, name, xs):
        self.it = iter([{name: x[None].copy()} for x in xs])

    def get_next(self):
        return next(self.it, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--ours")
    ap.add_argument("--parts", default="")
    ap.add_argument("--exclude", nargs="*", default=[])
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    calib, xs = one_array(a.calib), one_array(a.eval)
    fs = session(a.model)
    name = fs.get_inputs()[0].name
    with tempfile.TemporaryDirectory() as d:
        pre, q = os.path.join(d, "pre.onnx"), os.path.join(d, "int8.onnx")
        try:
            quant_pre_process(a.model, pre)
        except Exception:
            # Its symbolic shape inference fails on some models (YOLOv8's head, ViT's
            # attention); the other steps run without it.
            quant_pre_process(a.model, pre, skip_symbolic_shape=True)
        quantize_static(pre, q, Items(name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=a.exclude)
        qs = session(q)
        ref = np.concatenate([fs.run(None, {name: x[None]})[0] for x in xs])
        got = np.concatenate([qs.run(None, {name: x[None]})[0] for x in xs])
        x1 = xs[:1]
        f32_ms = median_ms(lambda: fs.run(None, {name: x1}), a.rounds)
        int8_ms = median_ms(lambda: qs.run(None, {name: x1}), a.rounds)
    sides = [("onnxruntime int8", got)]
    if a.ours:
        ours = np.load(a.ours)
        if ours.shape != ref.shape:
            raise SystemExit(f"--ours has shape {ours.shape}, ONNX Runtime's output {ref.shape}")
        sides.insert(0, ("ours", ours))
    sizes = [int(s) for s in a.parts.split(",") if s]
    bounds = np.cumsum([0] + sizes)
    print(f"onnxruntime {ort.__version__}, {len(xs)} evaluation items, output {list(ref.shape)}")
    print(f"onnxruntime one thread, batch 1: fp32 {f32_ms:.2f} ms, int8 {int8_ms:.2f} ms (median of {a.rounds})")
    for label, y in sides:
        parts = " ".join(
            f"[{lo}:{hi}] {sqnr_db(ref[:, lo:hi], y[:, lo:hi]):.2f}" for lo, hi in zip(bounds[:-1], bounds[1:]))
        print(f"{label}: SQNR against onnxruntime fp32 {sqnr_db(ref, y):.2f} dB {parts}")


if __name__ == "__main__":
    main()
