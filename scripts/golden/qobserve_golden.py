#!/usr/bin/env python3
"""Golden fixtures for the `qobserve` crate, produced by real PyTorch observers.

What it writes: ``qobserve/tests/golden/observers.json`` (directory created if
missing).  For every case it feeds a fixed sequence of float32 batches through
one observer from ``torch.ao.quantization.observer`` and records, after each
batch, the observer's buffers and the result of ``calculate_qparams()``:

* ``MinMaxObserver``, ``MovingAverageMinMaxObserver`` (per tensor),
* ``PerChannelMinMaxObserver``, ``MovingAveragePerChannelMinMaxObserver``
  (``ch_axis`` 0/1/2 on 2-D and 3-D inputs),
* ``HistogramObserver`` (bins 2048 / 256 / 64; quint8 affine with and without
  ``reduce_range``, qint8 symmetric, custom range (0, 127), ...): besides
  ``min_val``/``max_val``/``scale``/``zero_point`` the full ``histogram``
  buffer (float32) is stored after every batch.

PyTorch APIs used: the observer classes above (``forward`` = ``obs(x)``,
``calculate_qparams()``, the ``min_val``/``max_val``/``histogram``/``eps``
buffers and ``HistogramObserver.upsample_rate``), ``torch.from_numpy``,
``torch.set_num_threads``, ``torch.backends.cpu.get_cpu_capability``.

File layout (one case per line)::

    {"torch_version": str, "histogram_upsample_rate": int,
     "aten_cpu_capability": str, "torch_num_threads": int,
     "cases": [ {"name", "observer", "dtype", "qscheme", "reduce_range",
                 "quant_min", "quant_max", "averaging_constant", "ch_axis",
                 "bins", "eps", "shape", "batches", "states"}, ... ]}

* every f32 is its IEEE-754 bit pattern as a JSON integer (u32);
  ``averaging_constant`` is f32(c), the value PyTorch's f32 tensor math uses;
* ``quant_min``/``quant_max`` are the constructor arguments (null = not
  customised); ``ch_axis``/``bins``/``averaging_constant`` are null when the
  observer has no such argument;
* ``batches`` are flattened in C order and fed in order; ``states[i]`` is the
  state after feeding ``batches[i]``: ``min_val``/``max_val`` (length 1 for
  per-tensor observers), ``scale`` (f32 bits), ``zero_point`` (ints),
  ``histogram`` (``bins`` f32 bit patterns, HistogramObserver only, else null);
* a configuration PyTorch rejects has ``"error": "Type: message"`` (whitespace
  collapsed) and no ``states`` key.

Determinism: all data comes from ``numpy.random.default_rng`` with fixed
seeds and ``torch.set_num_threads(1)`` is set (the results were also checked
not to depend on the thread count).  The ATen CPU capability is recorded at
the top level because it is visible in HistogramObserver: ``torch.linspace``
(used when a histogram is re-binned) is FMA-contracted in the AVX2/AVX512
kernel builds but not in the DEFAULT build.  ``torch.sum`` of float32 uses
8-lane vectors on every x86 capability (its kernel has no AVX512 variant).

Rerun from the repository root (/work/main):

    /work/venv/bin/python scripts/golden/qobserve_golden.py
"""

import json
import os
import warnings

import numpy as np
import torch
from torch.ao.quantization.observer import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT_DIR = os.path.join(ROOT, "qobserve", "tests", "golden")
OUT_FILE = os.path.join(OUT_DIR, "observers.json")

F32_EPS = float(torch.finfo(torch.float32).eps)

OBSERVERS = {
    "MinMaxObserver": MinMaxObserver,
    "MovingAverageMinMaxObserver": MovingAverageMinMaxObserver,
    "PerChannelMinMaxObserver": PerChannelMinMaxObserver,
    "MovingAveragePerChannelMinMaxObserver": MovingAveragePerChannelMinMaxObserver,
    "HistogramObserver": HistogramObserver,
}
DTYPES = {"quint8": torch.quint8, "qint8": torch.qint8}
QSCHEMES = {
    "per_tensor_affine": torch.per_tensor_affine,
    "per_tensor_symmetric": torch.per_tensor_symmetric,
    "per_channel_affine": torch.per_channel_affine,
    "per_channel_symmetric": torch.per_channel_symmetric,
}
PER_CHANNEL = ("PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver")
MOVING = ("MovingAverageMinMaxObserver", "MovingAveragePerChannelMinMaxObserver")


def bits(x):
    """f32 values -> list of u32 bit patterns (flattened, C order)."""
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).reshape(-1)
    return [int(v) for v in a.view(np.uint32)]


def f32(a):
    return np.asarray(a, dtype=np.float32)


# ---------------------------------------------------------------- case runner


def run_case(name, observer, shape, batches, dtype="quint8", qscheme=None,
             reduce_range=False, quant_min=None, quant_max=None,
             averaging_constant=None, ch_axis=None, bins=None, eps=F32_EPS):
    if qscheme is None:
        qscheme = "per_channel_affine" if observer in PER_CHANNEL else "per_tensor_affine"
    if observer in MOVING and averaging_constant is None:
        averaging_constant = 0.01
    if observer in PER_CHANNEL and ch_axis is None:
        ch_axis = 0
    if observer == "HistogramObserver" and bins is None:
        bins = 2048
    batches = [f32(b) for b in batches]
    for b in batches:
        assert list(b.shape) == list(shape), (name, b.shape, shape)

    case = {
        "name": name,
        "observer": observer,
        "dtype": dtype,
        "qscheme": qscheme,
        "reduce_range": bool(reduce_range),
        "quant_min": quant_min,
        "quant_max": quant_max,
        "averaging_constant": None if averaging_constant is None else bits([averaging_constant])[0],
        "ch_axis": ch_axis,
        "bins": bins,
        "eps": bits([eps])[0],
        "shape": list(shape),
        "batches": [bits(b) for b in batches],
    }

    kwargs = dict(dtype=DTYPES[dtype], qscheme=QSCHEMES[qscheme],
                  reduce_range=reduce_range, quant_min=quant_min,
                  quant_max=quant_max, eps=eps)
    if averaging_constant is not None:
        kwargs["averaging_constant"] = averaging_constant
    if ch_axis is not None:
        kwargs["ch_axis"] = ch_axis
    if bins is not None:
        kwargs["bins"] = bins

    states = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs = OBSERVERS[observer](**kwargs)
            for b in batches:
                obs(torch.from_numpy(b.copy()))
                scale, zp = obs.calculate_qparams()
                st = {
                    "min_val": bits(obs.min_val.detach().numpy()),
                    "max_val": bits(obs.max_val.detach().numpy()),
                    "scale": bits(scale.detach().to(torch.float32).numpy()),
                    "zero_point": [int(v) for v in zp.detach().reshape(-1).tolist()],
                    "histogram": (bits(obs.histogram.detach().numpy())
                                  if observer == "HistogramObserver" else None),
                }
                if observer == "HistogramObserver":
                    assert len(st["histogram"]) == bins
                states.append(st)
    except Exception as e:  # noqa: BLE001 - PyTorch's rejection is the fixture
        case["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
        return case
    case["states"] = states
    return case


# ---------------------------------------------------------------- data helpers


def rng(seed):
    return np.random.default_rng(seed)


def normal(r, shape, std=1.0, mean=0.0):
    return f32(r.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean))


def uniform(r, shape, lo, hi):
    return f32(r.uniform(lo, hi, size=shape))


def per_channel_scaled(r, shape, ch_axis, growth):
    """Normal data whose std differs per channel (1..C) times `growth`."""
    c = shape[ch_axis]
    bshape = [1] * len(shape)
    bshape[ch_axis] = c
    chan = np.arange(1, c + 1, dtype=np.float32).reshape(bshape)
    offs = (np.arange(c, dtype=np.float32) - c / 2).reshape(bshape) * np.float32(0.3)
    return f32(r.standard_normal(shape, dtype=np.float32) * chan * np.float32(growth) + offs)


# ---------------------------------------------------------------- cases


def minmax_cases():
    out = []
    S = [8, 16]
    r = rng(101)
    grow = [normal(r, S, std=g, mean=0.25 * g) for g in (0.5, 1.0, 2.0)]
    out.append(run_case("minmax_quint8_affine_grow", "MinMaxObserver", S, grow))
    out.append(run_case("minmax_qint8_symmetric_grow", "MinMaxObserver", S, grow,
                        dtype="qint8", qscheme="per_tensor_symmetric"))
    out.append(run_case("minmax_quint8_affine_reduce_range", "MinMaxObserver", S, grow,
                        reduce_range=True))
    out.append(run_case("minmax_quint8_affine_custom_0_127", "MinMaxObserver", S, grow,
                        quant_min=0, quant_max=127))
    out.append(run_case("minmax_quint8_symmetric", "MinMaxObserver", S, grow,
                        qscheme="per_tensor_symmetric"))
    out.append(run_case("minmax_qint8_symmetric_neg127_127_eps2m12", "MinMaxObserver", S, grow,
                        dtype="qint8", qscheme="per_tensor_symmetric",
                        quant_min=-127, quant_max=127, eps=2.0 ** -12))
    out.append(run_case("minmax_qint8_affine_reduce_range", "MinMaxObserver", S, grow,
                        dtype="qint8", reduce_range=True))
    r = rng(102)
    relu = [np.maximum(normal(r, S, std=g), 0) for g in (1.0, 1.5, 3.0)]
    out.append(run_case("minmax_quint8_affine_relu_grow", "MinMaxObserver", S, relu))
    neg = [-np.abs(normal(r, S, std=g)) - 0.5 for g in (1.0, 2.0, 3.0)]
    out.append(run_case("minmax_quint8_affine_negative_only", "MinMaxObserver", S, neg))
    zeros = [np.zeros(S, np.float32)] * 2
    out.append(run_case("minmax_quint8_affine_all_zero", "MinMaxObserver", S, zeros))
    out.append(run_case("minmax_qint8_symmetric_all_zero", "MinMaxObserver", S, zeros,
                        dtype="qint8", qscheme="per_tensor_symmetric"))
    const = [np.full(S, -0.75, np.float32), np.full(S, -0.5, np.float32)]
    out.append(run_case("minmax_quint8_affine_negative_constant", "MinMaxObserver", S, const))
    r = rng(103)
    S3 = [4, 3, 5]
    out.append(run_case("minmax_quint8_affine_3d", "MinMaxObserver", S3,
                        [normal(r, S3, std=g, mean=-0.1) for g in (0.1, 1.0, 10.0)]))
    out.append(run_case("minmax_error_quint8_symmetric_reduce_range", "MinMaxObserver", S, grow,
                        qscheme="per_tensor_symmetric", reduce_range=True))
    return out


def per_channel_cases():
    out = []
    r = rng(201)
    for shape, axis in (([8, 16], 0), ([8, 16], 1), ([4, 3, 5], 0), ([4, 3, 5], 1), ([4, 3, 5], 2)):
        bs = [per_channel_scaled(r, shape, axis, g) for g in (0.5, 1.0, 2.0)]
        tag = "x".join(map(str, shape))
        out.append(run_case(f"perchannel_quint8_affine_{tag}_axis{axis}",
                            "PerChannelMinMaxObserver", shape, bs, ch_axis=axis))
        out.append(run_case(f"perchannel_qint8_symmetric_{tag}_axis{axis}",
                            "PerChannelMinMaxObserver", shape, bs, ch_axis=axis,
                            dtype="qint8", qscheme="per_channel_symmetric"))
    S = [8, 16]
    bs = [per_channel_scaled(r, S, 0, g) for g in (0.5, 1.0, 2.0)]
    out.append(run_case("perchannel_qint8_affine_reduce_range_8x16_axis0",
                        "PerChannelMinMaxObserver", S, bs, dtype="qint8", reduce_range=True))
    out.append(run_case("perchannel_qint8_symmetric_neg127_127_eps2m12",
                        "PerChannelMinMaxObserver", S, bs, dtype="qint8",
                        qscheme="per_channel_symmetric", quant_min=-127, quant_max=127,
                        eps=2.0 ** -12))
    out.append(run_case("perchannel_quint8_symmetric_8x16_axis0",
                        "PerChannelMinMaxObserver", S, bs, qscheme="per_channel_symmetric"))
    # some channels all zero / constant
    z = [b.copy() for b in bs]
    for b in z:
        b[2, :] = 0.0
        b[5, :] = 1.25
    out.append(run_case("perchannel_quint8_affine_zero_and_constant_channels",
                        "PerChannelMinMaxObserver", S, z))
    out.append(run_case("perchannel_error_quint8_symmetric_reduce_range",
                        "PerChannelMinMaxObserver", S, bs, qscheme="per_channel_symmetric",
                        reduce_range=True))
    return out


def moving_average_cases():
    out = []
    S = [8, 16]
    r = rng(301)
    # 4 batches, ranges shifting up and down
    shift = [normal(r, S, std=s, mean=m) for s, m in ((1.0, 0.0), (2.0, 1.0), (0.5, -1.0), (3.0, 0.5))]
    for c in (0.01, 0.5):
        ctag = "c0p01" if c == 0.01 else "c0p5"
        out.append(run_case(f"movavg_quint8_affine_{ctag}", "MovingAverageMinMaxObserver", S,
                            shift, averaging_constant=c))
        out.append(run_case(f"movavg_qint8_symmetric_{ctag}", "MovingAverageMinMaxObserver", S,
                            shift, averaging_constant=c, dtype="qint8",
                            qscheme="per_tensor_symmetric"))
    out.append(run_case("movavg_quint8_affine_default_c_reduce_range",
                        "MovingAverageMinMaxObserver", S, shift, reduce_range=True))
    out.append(run_case("movavg_quint8_affine_c0p5_custom_0_127",
                        "MovingAverageMinMaxObserver", S, shift, averaging_constant=0.5,
                        quant_min=0, quant_max=127))
    r = rng(302)
    for shape, axis in (([8, 16], 0), ([4, 3, 5], 1), ([4, 3, 5], 2)):
        bs = [per_channel_scaled(r, shape, axis, g) + np.float32(m)
              for g, m in ((1.0, 0.0), (2.0, 0.5), (0.5, -0.5), (1.5, 0.25))]
        tag = "x".join(map(str, shape))
        for c in (0.01, 0.5):
            ctag = "c0p01" if c == 0.01 else "c0p5"
            out.append(run_case(f"movavg_perchannel_quint8_affine_{tag}_axis{axis}_{ctag}",
                                "MovingAveragePerChannelMinMaxObserver", shape, bs,
                                averaging_constant=c, ch_axis=axis))
        out.append(run_case(f"movavg_perchannel_qint8_symmetric_{tag}_axis{axis}_c0p5",
                            "MovingAveragePerChannelMinMaxObserver", shape, bs,
                            averaging_constant=0.5, ch_axis=axis, dtype="qint8",
                            qscheme="per_channel_symmetric"))
    return out


def histogram_cases():
    out = []
    H = "HistogramObserver"
    S = [16, 64]

    def add(name, batches, shape=S, **kw):
        out.append(run_case(name, H, shape, batches, **kw))

    r = rng(401)
    add("hist_single_batch_normal", [normal(r, S)])
    add("hist_single_batch_uniform_qint8_symmetric", [uniform(r, S, -0.3, 1.7)],
        dtype="qint8", qscheme="per_tensor_symmetric")
    # growing both ends
    grow_both = [normal(r, S, std=g) for g in (0.5, 1.0, 2.0)]
    add("hist_grow_both_ends", grow_both)
    add("hist_grow_both_ends_reduce_range", grow_both, reduce_range=True)
    add("hist_grow_both_ends_qint8_symmetric", grow_both, dtype="qint8",
        qscheme="per_tensor_symmetric")
    add("hist_grow_both_ends_custom_0_127", grow_both, quant_min=0, quant_max=127)
    add("hist_grow_both_ends_bins256", grow_both, bins=256)
    add("hist_grow_both_ends_bins64_qint8_symmetric", grow_both, bins=64, dtype="qint8",
        qscheme="per_tensor_symmetric")
    # only max grows: every batch holds the same minimum -1.0
    gm = []
    for hi in (1.0, 2.5, 6.0):
        b = uniform(r, S, -1.0, hi)
        b[0, 0] = -1.0
        gm.append(b)
    add("hist_grow_max_only", gm)
    # only min grows: every batch holds the same maximum 2.0
    gmin = []
    for lo in (-0.5, -1.5, -4.0):
        b = uniform(r, S, lo, 2.0)
        b[3, 7] = 2.0
        gmin.append(b)
    add("hist_grow_min_only", gmin)
    add("hist_grow_min_only_bins256_reduce_range", gmin, bins=256, reduce_range=True)
    # larger range first, then smaller ranges inside it (range-unchanged path)
    shrink = [normal(r, S, std=3.0), normal(r, S, std=1.0), uniform(r, S, -0.5, 0.5)]
    add("hist_smaller_range_after_larger", shrink)
    add("hist_smaller_range_after_larger_qint8_symmetric", shrink, dtype="qint8",
        qscheme="per_tensor_symmetric")
    # all zero
    add("hist_all_zero", [np.zeros(S, np.float32)] * 2)
    add("hist_all_zero_qint8_symmetric", [np.zeros(S, np.float32)], dtype="qint8",
        qscheme="per_tensor_symmetric")
    # constant then varied (min == max special case in _combine_histograms)
    add("hist_constant_then_varied", [np.full(S, 0.5, np.float32), normal(r, S)])
    add("hist_constant_then_constant", [np.full(S, 1.0, np.float32),
                                        np.full(S, 1.0, np.float32),
                                        np.full(S, 2.0, np.float32)])
    add("hist_zero_then_varied_bins64", [np.zeros(S, np.float32), uniform(r, S, 0.0, 3.0)],
        bins=64)
    # outliers: normal plus a few 50x values
    outl = []
    for k in range(3):
        b = normal(r, S)
        idx = r.choice(b.size, size=4, replace=False)
        b.reshape(-1)[idx] = f32(r.standard_normal(4) * 50.0)
        outl.append(b)
    add("hist_outliers", outl)
    add("hist_outliers_qint8_symmetric", outl, dtype="qint8", qscheme="per_tensor_symmetric")
    add("hist_outliers_bins64", outl, bins=64)
    add("hist_outliers_bins256_custom_0_127", outl, bins=256, quant_min=0, quant_max=127)
    # ReLU-like: half zeros
    relu = [np.maximum(normal(r, S, std=g), 0) for g in (1.0, 1.3, 0.7)]
    add("hist_relu_half_zeros", relu)
    add("hist_relu_half_zeros_custom_0_127", relu, quant_min=0, quant_max=127)
    add("hist_relu_quint8_symmetric_reduce_range", relu, qscheme="per_tensor_symmetric",
        reduce_range=True)
    # tiny range (1e-6 spread)
    tiny = [normal(r, S, std=1e-6, mean=0.5), normal(r, S, std=1e-6, mean=0.5)]
    add("hist_tiny_range", tiny)
    add("hist_tiny_range_around_zero_qint8_symmetric",
        [normal(r, S, std=1e-6), normal(r, S, std=2e-6)], dtype="qint8",
        qscheme="per_tensor_symmetric")
    add("hist_tiny_range_then_normal", [normal(r, S, std=1e-6, mean=0.1), normal(r, S)])
    # batches of different content, same shape
    varied = [uniform(r, S, -1.0, 1.0),
              normal(r, S, std=0.8, mean=0.3),
              f32(r.laplace(0.0, 0.5, size=S)),
              f32(r.exponential(1.0, size=S) - 0.5)]
    add("hist_varied_content", varied)
    add("hist_varied_content_qint8_affine", varied, dtype="qint8")
    add("hist_negative_only", [-np.abs(normal(r, S, std=g)) for g in (1.0, 2.0)])
    # +-inf values are dropped by forward()
    inf = normal(r, S)
    inf[0, 0] = np.inf
    inf[1, 1] = -np.inf
    add("hist_inf_values_ignored", [inf, normal(r, S, std=1.5)])
    # large batch
    LS = [64, 1000]
    add("hist_large_batch", [normal(r, LS)], shape=LS)
    # large, sparse batch (200k values, 1500 non-zero; zeros are cheap in JSON):
    # total > 1e5, so the search's quantile step (1e-5 * total) exceeds one sample
    # and both the start-bin and the end-bin branch of _non_linear_param_search run.
    SP = [250, 800]
    rs = rng(2)
    sp = np.zeros(SP[0] * SP[1], np.float32)
    idx = rs.choice(sp.size, 1500, replace=False)
    rs.laplace(0.0, 1.0, 1500)  # (keeps the stream identical to the tuning run)
    sp[idx] = f32(rs.uniform(-1.0, 2.0, 1500))
    add("hist_large_sparse_batch", [sp.reshape(SP)], shape=SP)
    # rejected configuration
    add("hist_error_per_channel_affine", [normal(r, S)], qscheme="per_channel_affine")
    return out


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cases = minmax_cases() + per_channel_cases() + moving_average_cases() + histogram_cases()
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    upsample_rate = int(HistogramObserver().upsample_rate)

    os.makedirs(OUT_DIR, exist_ok=True)
    head = {
        "torch_version": torch.__version__,
        "histogram_upsample_rate": upsample_rate,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_num_threads": torch.get_num_threads(),
    }
    with open(OUT_FILE, "w") as f:
        f.write("{")
        for k, v in head.items():
            f.write(f"{json.dumps(k)}: {json.dumps(v)},\n")
        f.write('"cases": [\n')
        f.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")

    counts = {}
    for c in cases:
        counts[c["observer"]] = counts.get(c["observer"], 0) + 1
    errors = [c["name"] for c in cases if "error" in c]
    print(f"wrote {OUT_FILE}: {len(cases)} cases, {os.path.getsize(OUT_FILE)} bytes")
    print("per observer:", counts)
    print("error cases:", errors)
    print("histogram_upsample_rate:", upsample_rate)


if __name__ == "__main__":
    main()
