#!/usr/bin/env python3
"""Peer timing: whole models in PyTorch, float and eager-mode int8, batch 1, 1x3x224x224.

For each of torchvision's quantizable ResNet-18, MobileNetV2 and ResNet-50 (random
weights, seed 0): the float model in eval mode; then a copy fused with ``fuse_model()``,
``get_default_qconfig("x86")`` (HistogramObserver activations, per-channel weights),
``prepare``, calibration on ``--calib`` random images (one at a time), ``convert``.
Times ``model(x)`` under ``torch.inference_mode()``: 3 warm-up calls, then the median of
``--reps`` calls (at least), with ``torch.set_num_threads(--threads)``.

Prints one JSON list: [{"name", "f32_ms", "int8_ms", "sqnr_db"}], the SQNR being the
int8 output against the float output on the timed input.

    /work/venv/bin/python scripts/peers/torch_models.py [--threads 1] [--models resnet18,...]
"""

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
import torch.ao.quantization as tq
from torchvision.models.quantization import mobilenet_v2, resnet18, resnet50

CTORS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2, "resnet50": resnet50}


def median_ms(fn, x, reps):
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        times = []
        start = time.perf_counter()
        while len(times) < reps or time.perf_counter() - start < 0.25:
            t0 = time.perf_counter()
            fn(x)
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
    torch.set_num_threads(a.threads)
    torch.backends.quantized.engine = "x86"
    out = []
    for name in a.models.split(","):
        torch.manual_seed(0)
        m = CTORS[name](weights=None, quantize=False).eval()
        x = torch.randn(1, 3, 224, 224)
        f32 = median_ms(m, x, a.reps)
        q = CTORS[name](weights=None, quantize=False).eval()
        q.load_state_dict(m.state_dict())
        q.fuse_model()
        q.qconfig = tq.get_default_qconfig("x86")
        tq.prepare(q, inplace=True)
        with torch.inference_mode():
            for _ in range(a.calib):
                q(torch.randn(1, 3, 224, 224))
        tq.convert(q, inplace=True)
        i8 = median_ms(q, x, a.reps)
        with torch.inference_mode():
            ref, got = m(x), q(x)
        sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean()).item()
        out.append({"name": name, "f32_ms": f32, "int8_ms": i8, "sqnr_db": sqnr})
        print(f"{name}: f32 {f32:.2f} ms, int8 {i8:.2f} ms", file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
