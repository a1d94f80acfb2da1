#!/usr/bin/env python3
"""Golden fixtures for dynamic quantization (`qtensor::choose_qparams_dynamic`,
`qkernels::PackedLinear::forward_dynamic`), from real PyTorch.

Writes ``qkernels/tests/golden/qdynamic.json``:

* ``choose``: ``torch._choose_qparams_per_tensor(t, reduce_range)`` for tensors spanning
  chosen ``[min, max]`` ranges (both signs, one-sided, zero, tiny ranges below the small-scale
  threshold, huge ones): ``min``, ``max`` and the chosen ``scale`` as f32 bit patterns, ``zp``.
* ``linear``: ``torch.ops.quantized.linear_dynamic`` / ``linear_relu_dynamic`` with
  ``reduce_range=True`` (what ``torch.ao.nn.quantized.dynamic.Linear`` passes on x86) on
  weights packed by ``torch.ops.quantized.linear_prepack``: qint8 weights per tensor or per
  channel (zero points 0, as PyTorch's weight observers give, or not), f32 bias or none,
  f32 input ``x`` [M, K] and output ``y`` [M, N] as bit patterns; ``engine`` records the
  quantized engine.

Run: python scripts/golden/qdynamic_golden.py (needs torch).
"""
import json
import pathlib
import struct

import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "qkernels/tests/golden/qdynamic.json"


def bits(a):
    return [struct.unpack("<I", struct.pack("<f", float(v)))[0] for v in np.asarray(a, np.float32).ravel()]


def choose_cases():
    ranges = [(-1.0, 1.0), (-0.3, 2.7), (0.0, 5.0), (-5.0, 0.0), (0.0, 0.0), (-1e-6, 2e-6), (0.0, 1e-7),
              (-3e-7, 0.0), (-1e-30, 1e-30), (-70000.0, 3.0), (1.5, 9.0), (-9.0, -1.5), (-0.1234567, 0.9876543),
              (-2.5e-3, 2.5e-3), (-1e9, 1e9)]
    rng = np.random.default_rng(7)
    for _ in range(40):
        a, b = sorted(rng.standard_normal(2) * 10.0 ** rng.uniform(-5, 3, 2))
        ranges.append((float(a), float(b)))
    out = []
    for lo, hi in ranges:
        t = torch.tensor([lo, hi], dtype=torch.float32)
        for rr in (True, False):
            scale, zp = torch._choose_qparams_per_tensor(t, rr)
            out.append({"min": bits([t[0]])[0], "max": bits([t[1]])[0], "reduce_range": rr,
                        "scale": bits([scale])[0], "zp": int(zp)})
    return out


def linear_cases():
    rng = np.random.default_rng(11)
    shapes = [(1, 8, 4), (5, 32, 16), (7, 40, 24), (3, 130, 64), (16, 64, 33), (2, 150, 40), (9, 17, 96)]
    out = []
    for i, (m, k, n) in enumerate(shapes):
        for per_channel in (False, True):
            for symmetric in (True, False):
                relu = (i + per_channel + symmetric) % 2 == 1
                w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
                if per_channel:
                    scales = (np.abs(w).max(axis=1) / 127.5).astype(np.float64)
                    zps = np.zeros(n, np.int64) if symmetric else rng.integers(-20, 21, n)
                    qw = torch.quantize_per_channel(torch.from_numpy(w), torch.from_numpy(scales),
                                                    torch.from_numpy(zps), 0, torch.qint8)
                    w_scales, w_zps = scales, zps
                else:
                    scale = float(np.abs(w).max() / 127.5)
                    zp = 0 if symmetric else int(rng.integers(-20, 21))
                    qw = torch.quantize_per_tensor(torch.from_numpy(w), scale, zp, torch.qint8)
                    w_scales, w_zps = np.array([scale]), np.array([zp])
                bias = None if i % 3 == 2 else torch.from_numpy(rng.standard_normal(n).astype(np.float32))
                packed = torch.ops.quantized.linear_prepack(qw, bias)
                x = torch.from_numpy((rng.standard_normal((m, k)) * rng.uniform(0.1, 4) + rng.normal()).astype(np.float32))
                op = torch.ops.quantized.linear_relu_dynamic if relu else torch.ops.quantized.linear_dynamic
                y = op(x, packed, True)
                out.append({
                    "name": f"m{m}k{k}n{n}_{'pc' if per_channel else 'pt'}_{'sym' if symmetric else 'asym'}"
                            f"{'_relu' if relu else ''}{'' if bias is not None else '_nobias'}",
                    "m": m, "k": k, "n": n, "x": bits(x), "w": qw.int_repr().numpy().ravel().tolist(),
                    "w_scales": bits(w_scales), "w_zps": [int(z) for z in w_zps],
                    "bias": None if bias is None else bits(bias), "relu": relu, "y": bits(y.numpy()),
                })
    return out


def main():
    torch.backends.quantized.engine = "x86"
    doc = {"torch": torch.__version__, "engine": torch.backends.quantized.engine,
           "choose": choose_cases(), "linear": linear_cases()}
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
