#!/usr/bin/env python3
"""Peer timings: PyTorch's int8 quantized linear / conv2d kernels, for `cargo xtask bench --peers`.

Input: a JSON list of shapes on stdin, for example

    [{"name": "linear_512", "kind": "linear", "m": 512, "k": 512, "n": 512},
     {"name": "resnet18_layer1_conv3x3", "kind": "conv", "n": 1, "h": 56, "w": 56, "c": 64,
      "oc": 64, "kh": 3, "kw": 3, "stride": 1, "padding": 1, "dilation": 1, "groups": 1}]

* linear: x [m, k] quint8, weight [n, k].
* dynamic_linear: x [m, k] float32, weight [n, k]: ``quantized::linear_dynamic`` (reduce_range, as
  ``torch.ao.nn.quantized.dynamic.Linear`` on x86), float32 output.
* conv: input n x c x h x w (stored channels-last, i.e. NHWC in memory), weight
  [oc, c/groups, kh, kw]; stride / padding / dilation are an int or [h, w]
  (defaults 1 / 0 / 1), groups defaults to 1.
* optional per shape: "bias": false to time without bias (default: f32 bias).

Output: one JSON list on stdout, in input order:

    [{"name": ..., "median_ms": float, "min_ms": float, "reps": int}, ...]

A shape PyTorch rejects gives {"name": ..., "median_ms": null, "min_ms": null,
"reps": 0, "error": "..."} instead.  Diagnostics go to stderr.

What is timed: one call of ``torch.ops.quantized.linear`` / ``torch.ops.quantized.conv2d``
(the ``.new`` overload) on weights prepacked beforehand (prepacking is not timed),
with ``torch.backends.quantized.engine = "x86"`` (linear -> fbgemm, conv ->
oneDNN on AVX-512 VNNI CPUs for these symmetric weights and groups <= 100, else
fbgemm), quint8 activations (scale 1/255, zero point 3), per-channel symmetric
qint8 weights, f32 bias, quint8 output.  Each call is timed separately with
``time.perf_counter_ns`` after warm-up calls, with the Python garbage collector
off, so the numbers include PyTorch's per-call dispatch overhead (a few
microseconds), which is what a PyTorch user pays.

Options: --threads N (torch.set_num_threads, default 1), --reps R (timed calls per
shape, default 30), --warmup W (untimed calls first, default 5).

Example (from the repository root):

    echo '[{"name":"l","kind":"linear","m":64,"k":256,"n":128}]' | \\
        /work/venv/bin/python scripts/peers/torch_kernels.py --threads 1 --reps 50
"""

import argparse
import gc
import json
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

ENGINE = "x86"


def pair(v, default):
    if v is None:
        v = default
    if isinstance(v, int):
        return [v, v]
    v = [int(t) for t in v]
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v}")
    return v


def per_channel_weight(shape, gen):
    w = torch.randn(shape, generator=gen)
    oc = shape[0]
    amax = w.reshape(oc, -1).abs().amax(dim=1).clamp_min(1e-6)
    scales = (amax / 127.5).double()
    return torch.quantize_per_channel(w, scales, torch.zeros(oc, dtype=torch.long), 0, torch.qint8)


def build_linear(s, gen):
    m, k, n = int(s["m"]), int(s["k"]), int(s["n"])
    x = torch.quantize_per_tensor(torch.rand(m, k, generator=gen), 1.0 / 255, 3, torch.quint8)
    w = per_channel_weight((n, k), gen)
    b = torch.randn(n, generator=gen) if s.get("bias", True) else None
    packed = torch.ops.quantized.linear_prepack(w, b)
    y_scale = 0.05 * (k ** 0.5) / 16  # keeps typical outputs inside u8
    op = torch.ops.quantized.linear
    return lambda: op(x, packed, y_scale, 128)


def build_dynamic_linear(s, gen):
    m, k, n = int(s["m"]), int(s["k"]), int(s["n"])
    x = torch.randn(m, k, generator=gen) * 2.0
    w = per_channel_weight((n, k), gen)
    b = torch.randn(n, generator=gen) if s.get("bias", True) else None
    packed = torch.ops.quantized.linear_prepack(w, b)
    op = torch.ops.quantized.linear_dynamic
    # reduce_range=True: what torch.ao.nn.quantized.dynamic.Linear passes on x86.
    return lambda: op(x, packed, True)


def build_conv(s, gen):
    n, h, w_, c = int(s.get("n", 1)), int(s["h"]), int(s["w"]), int(s["c"])
    oc, kh, kw = int(s["oc"]), int(s["kh"]), int(s["kw"])
    groups = int(s.get("groups", 1))
    stride = pair(s.get("stride"), 1)
    padding = pair(s.get("padding"), 0)
    dilation = pair(s.get("dilation"), 1)
    if c % groups or oc % groups:
        raise ValueError(f"c={c} and oc={oc} must be divisible by groups={groups}")
    xf = torch.rand(n, c, h, w_, generator=gen).contiguous(memory_format=torch.channels_last)
    x = torch.quantize_per_tensor(xf, 1.0 / 255, 3, torch.quint8)
    assert x.is_contiguous(memory_format=torch.channels_last)
    wq = per_channel_weight((oc, c // groups, kh, kw), gen)
    b = torch.randn(oc, generator=gen) if s.get("bias", True) else None
    packed = torch.ops.quantized.conv2d_prepack(wq, b, stride, padding, dilation, groups)
    y_scale = 0.05 * ((c // groups * kh * kw) ** 0.5) / 16
    op = torch.ops.quantized.conv2d
    return lambda: op(x, packed, y_scale, 128)


BUILDERS = {"linear": build_linear, "dynamic_linear": build_dynamic_linear, "conv": build_conv}


def time_calls(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    ms = [t / 1e6 for t in samples]
    return statistics.median(ms), min(ms)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    if args.threads < 1 or args.reps < 1 or args.warmup < 0:
        ap.error("--threads and --reps must be >= 1, --warmup >= 0")

    shapes = json.load(sys.stdin)
    if not isinstance(shapes, list):
        ap.error("stdin must hold a JSON list of shapes")

    torch.set_num_threads(args.threads)
    engine = ENGINE if ENGINE in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    print(f"torch {torch.__version__}, engine {engine}, threads {torch.get_num_threads()}, "
          f"reps {args.reps}, warmup {args.warmup}", file=sys.stderr)

    out = []
    for i, s in enumerate(shapes):
        name = str(s.get("name", f"shape{i}"))
        try:
            kind = s["kind"]
            if kind not in BUILDERS:
                raise ValueError(f"unknown kind {kind!r} (expected one of {sorted(BUILDERS)})")
            gen = torch.Generator().manual_seed(1234 + i)
            fn = BUILDERS[kind](s, gen)
            y = fn()
            assert y.dtype == (torch.float32 if kind == "dynamic_linear" else torch.quint8)
            med, mn = time_calls(fn, args.reps, args.warmup)
            out.append({"name": name, "median_ms": med, "min_ms": mn, "reps": args.reps})
            print(f"{name}: median {med:.4f} ms, min {mn:.4f} ms", file=sys.stderr)
        except Exception as e:  # report and keep going
            msg = " ".join(f"{type(e).__name__}: {e}".split())
            out.append({"name": name, "median_ms": None, "min_ms": None, "reps": 0, "error": msg})
            print(f"{name}: ERROR {msg}", file=sys.stderr)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
