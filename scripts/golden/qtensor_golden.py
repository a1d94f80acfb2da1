#!/usr/bin/env python3
"""Golden fixtures for the `qtensor` crate, produced by real PyTorch.

What it writes (into ``qtensor/tests/golden/``):

* ``quantize.json``: inputs and outputs of
  ``torch.quantize_per_tensor(x, scale, zero_point, dtype).int_repr()`` and
  ``torch.quantize_per_channel(x, scales, zero_points, axis, dtype).int_repr()``
  for quint8, qint8 and qint32, with the quantized engine set explicitly to
  ``x86``.  Inputs include round-half ties after scaling (built so that
  ``f32(x) * f32(1/scale)`` is exactly ``k + 0.5`` in f32), range edges,
  huge values, +-inf, subnormals, signed zeros and random values.
* ``qparams.json``: what ``torch.ao.quantization.observer.MinMaxObserver`` and
  ``PerChannelMinMaxObserver`` compute: the effective ``quant_min``/``quant_max``,
  the running ``min_val``/``max_val`` buffers after every batch has been fed,
  and ``calculate_qparams()``.  Configurations that PyTorch rejects are kept,
  with ``"error": "<ExceptionType>: <message>"`` (whitespace in the message
  collapsed to single spaces) and the result fields set to null.

Encoding: every f32 value is stored as its IEEE-754 bit pattern, a JSON
integer (u32), so nothing is lost in decimal.  Integers are plain JSON ints.
Tensors are flattened in C order.  Scales are exact f32 values; they are
handed to PyTorch as Python floats / float64 tensors holding those exact
values.  NaN never appears in the fixtures; the script only prints what
PyTorch does with NaN input.

Everything is seeded, so a rerun with the same PyTorch build writes the same
files.  To regenerate (from the repository root):

    python3 -m venv /work/venv
    /work/venv/bin/pip install torch numpy
    /work/venv/bin/python scripts/golden/qtensor_golden.py

Before writing, the script checks that quantizing each input element on its
own gives the same result as quantizing the whole array (so the fixtures do
not depend on which SIMD lane or scalar tail handled a value) and prints any
difference.

What the fixtures show (torch 2.15.0, engine x86; every value matches these
rules, with p = f32(x * f32(1 / scale)) and rne = round half to even):

* per-tensor quint8/qint8 (fbgemm AVX2 path): p = min(p, 2147483520.0)
  (a NaN p becomes 2147483520.0); r = rne(p) as i32, INT32_MIN if out of range;
  r = r.wrapping_add(zp) in i32; clamp to the dtype range.  The wrapping add
  is visible: with zp >= 128 (quint8) a huge positive x gives 0, and with
  zp < 0 (qint8) a huge negative x gives 127.
* per-tensor qint32 and per-channel (all dtypes): v = f32(rne(p) + f32(zp)),
  added in f32, so results beyond 2**24 are f32-rounded; then clamp to the
  dtype range.
* observers: f32 tensor arithmetic as in observer.py ``_calculate_qparams``;
  torch.round is round half to even.
These APIs are deprecated in PyTorch; pin the version if you regenerate.
"""

import json
import math
import os
import sys
import warnings

import numpy as np
import torch
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

warnings.filterwarnings("ignore")

ENGINE = "x86"
OUT_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "qtensor", "tests", "golden"
)

F32 = np.float32
F32_EPS = float(torch.finfo(torch.float32).eps)  # 2**-23

# name -> (torch dtype, qmin, qmax) of the quantized storage type.
DTYPES = {
    "quint8": (torch.quint8, 0, 255),
    "qint8": (torch.qint8, -128, 127),
    "qint32": (torch.qint32, -(2**31), 2**31 - 1),
}

QSCHEMES = {
    "per_tensor_affine": torch.per_tensor_affine,
    "per_tensor_symmetric": torch.per_tensor_symmetric,
    "per_channel_affine": torch.per_channel_affine,
    "per_channel_symmetric": torch.per_channel_symmetric,
}

OBSERVERS = {
    "MinMaxObserver": MinMaxObserver,
    "PerChannelMinMaxObserver": PerChannelMinMaxObserver,
}


# --------------------------------------------------------------------------
# encoding helpers


def f32_bits(values):
    """Flatten to f32 and return the IEEE-754 bit patterns as Python ints."""
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float32)).reshape(-1)
    return [int(v) for v in arr.view(np.uint32)]


def ints(values):
    return [int(v) for v in np.asarray(values).reshape(-1)]


def scale_name(s):
    return f"{float(s):.9g}"


def write_json(path, top):
    """One case per line: diffable, and compact enough to stay small."""
    keys = list(top)
    lines = ["{"]
    for i, key in enumerate(keys):
        tail = "," if i + 1 < len(keys) else ""
        value = top[key]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"  {json.dumps(key)}: [")
            for j, case in enumerate(value):
                sep = "," if j + 1 < len(value) else ""
                lines.append("    " + json.dumps(case, separators=(",", ":"), allow_nan=False) + sep)
            lines.append("  ]" + tail)
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, allow_nan=False)}{tail}")
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------
# quantize fixtures

# Scales: dyadic, non-dyadic, PyTorch's documented multiply-vs-divide example,
# tiny and large.  All rounded to f32 once, here.
SCALES = [F32(v) for v in (0.5, 0.25, 2.0**-7, 0.1, 0.02, 1.0 / 3.0, 0.00214854861, 1e-6, 1000.0)]

ZERO_POINTS = {
    "quint8": [0, 1, 128, 255],
    "qint8": [-128, -1, 0, 3, 127],
    "qint32": [0, -7, 12345],
}

SPECIALS = [
    1e30, -1e30, 3.4e38, -3.4e38,
    float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max),
    math.inf, -math.inf,
    1e-40, -1e-40, 1e-45, -1e-45,  # subnormals (1e-45 rounds to the smallest one)
    0.0, -0.0,
    # fbgemm's comment on scale 0.00214854861: in f32, x * (1/scale) is exactly
    # 127.5 (ties to even: 128) while x / scale is 127.49999 (127).
    0.273939937,
]


def input_for_product(scale, target):
    """An f32 x with f32(x) * f32(1/scale) == target exactly (in f32), or None.

    Used for .5 ties (target = k + 0.5) and for probes at the int32 limits."""
    inv = F32(1.0) / F32(scale)
    x0 = F32(np.float64(target) / np.float64(inv))
    candidates = [x0]
    up = down = x0
    for _ in range(16):
        up = np.nextafter(up, F32(np.inf))
        down = np.nextafter(down, F32(-np.inf))
        candidates += [up, down]
    for c in candidates:
        if np.isfinite(c) and F32(c * inv) == F32(target):
            return c
    return None


def tricky_values(scale, zp, dtype_name, rng, n_random=100):
    """Ties, near-ties, range edges, specials and random values for (scale, zp)."""
    _, qmin, qmax = DTYPES[dtype_name]
    s = np.float64(scale)
    vals = []

    # Exact .5 ties of the pre-zero-point value k + 0.5, plus the f32
    # neighbours of each tie input (product just below / above the tie).
    ks = {0, 1, 2, 3, 4, 5, -1, -2, -3, -4, -5, -6, 7, 8, 50, 51, -50, -51, 126, 127, -127, -128}
    ks |= {qmin - zp - 1, qmin - zp, qmax - zp - 1, qmax - zp}
    if dtype_name == "qint32":
        ks |= {1000, 1001, -1001, 2**20, 2**20 + 1, -(2**21) - 1, 2**22 + 1, -(2**22)}
    for k in sorted(ks):
        t = k + 0.5
        if abs(t) >= 2**22 or float(F32(t)) != t:
            continue  # k + 0.5 not exact in f32
        x = input_for_product(scale, t)
        if x is None:
            continue
        vals += [x, np.nextafter(x, F32(np.inf)), np.nextafter(x, F32(-np.inf))]

    # Range edges: at, just inside, just beyond (in units of the step).
    for q in (qmin, qmax):
        inward = 1 if q == qmin else -1
        for off in (0.0, 0.49 * -inward, 0.51 * -inward, 1.0 * inward, 1.0 * -inward, 2.0 * -inward, 10.0 * -inward):
            vals.append(F32((q - zp + off) * s))
        # The exact tie just outside the edge.
        t = q - zp - 0.5 * inward
        if abs(t) < 2**22:
            x = input_for_product(scale, t)
            if x is not None:
                vals.append(x)

    vals += [F32(v) for v in SPECIALS]

    # x * (1/scale) at and around the int32 limits of the intermediate value
    # (2147483520 is the largest f32 below 2**31).
    for t in (1e9, -1e9, 2147483520.0, 2.0**31, -(2.0**31), -2147483904.0, 2.0**32, -(2.0**32)):
        x = input_for_product(scale, t)
        if x is not None:
            vals.append(x)

    # Random values: normal around the zero point, uniform over 1.5x the
    # representable range, and (for qint32) log-uniform magnitudes.
    span = float(min(qmax - qmin, 4096))
    n_norm = n_random // 2
    vals += list((rng.standard_normal(n_norm) * span / 4 * s).astype(np.float32))
    lo, hi = (qmin - zp) * s * 1.5, (qmax - zp) * s * 1.5
    if dtype_name == "qint32":
        n_uni = (n_random - n_norm) // 2
        mags = 10.0 ** rng.uniform(-3, math.log10(2.0**33), n_random - n_norm - n_uni)
        signs = rng.choice([-1.0, 1.0], size=mags.size)
        vals += list((mags * signs * s).astype(np.float32))
    else:
        n_uni = n_random - n_norm
    vals += list(rng.uniform(lo, hi, n_uni).astype(np.float32))

    out = np.array(vals, dtype=np.float32)
    assert not np.isnan(out).any()
    return out


def quantize_per_tensor(x, scale, zp, dtype_name):
    dt = DTYPES[dtype_name][0]
    q = torch.quantize_per_tensor(torch.from_numpy(x), float(scale), int(zp), dt)
    return q.int_repr().numpy().astype(np.int64)


def quantize_per_channel(x, scales, zps, axis, dtype_name):
    dt = DTYPES[dtype_name][0]
    q = torch.quantize_per_channel(
        torch.from_numpy(x),
        torch.tensor(np.asarray(scales, dtype=np.float32).astype(np.float64), dtype=torch.float64),
        torch.tensor(np.asarray(zps, dtype=np.int64), dtype=torch.int64),
        axis,
        dt,
    )
    return q.int_repr().numpy().astype(np.int64)


def check_elementwise(name, x, out, one):
    """Quantizing each element alone must give what the bulk call gave."""
    flat = x.reshape(-1)
    single = np.array([one(flat[i : i + 1], i)[0] for i in range(flat.size)], dtype=np.int64)
    bad = np.nonzero(single != out.reshape(-1))[0]
    for i in bad[:5]:
        print(f"  [{name}] element {i}: x={flat[i]!r} bulk={out.reshape(-1)[i]} alone={single[i]}")
    return len(bad)


def per_tensor_cases(rng):
    cases, mismatches = [], 0
    for dtype_name in DTYPES:
        for scale in SCALES:
            for zp in ZERO_POINTS[dtype_name]:
                x = tricky_values(scale, zp, dtype_name, rng)
                out = quantize_per_tensor(x, scale, zp, dtype_name)
                name = f"{dtype_name}_s{scale_name(scale)}_zp{zp}"
                mismatches += check_elementwise(
                    name, x, out, lambda v, i: quantize_per_tensor(v, scale, zp, dtype_name)
                )
                cases.append({
                    "name": name,
                    "dtype": dtype_name,
                    "scale": f32_bits([scale])[0],
                    "zero_point": int(zp),
                    "input": f32_bits(x),
                    "output": ints(out),
                })
    return cases, mismatches


PER_CHANNEL_LAYOUTS = [
    ([3, 5], 0),
    ([3, 5], 1),
    ([4, 3, 2, 2], 0),
    ([4, 3, 2, 2], 1),
    ([4, 3, 2, 2], 3),
    ([2, 6, 40], 1),
]


def per_channel_cases(rng):
    cases, mismatches = [], 0
    for dtype_name in DTYPES:
        zp_pool = ZERO_POINTS[dtype_name]
        for li, (shape, axis) in enumerate(PER_CHANNEL_LAYOUTS):
            channels = shape[axis]
            # Mixed per-channel qparams, rotated so layouts differ.
            scales = [SCALES[(li * 2 + c * 4) % len(SCALES)] for c in range(channels)]
            zps = [zp_pool[(li + c) % len(zp_pool)] for c in range(channels)]
            # Move the channel axis first, fill each channel's slots from its
            # own tricky values (shuffled), then move the axis back.
            moved = [shape[axis]] + [d for i, d in enumerate(shape) if i != axis]
            per_ch = int(np.prod(moved[1:]))
            body = np.empty((channels, per_ch), dtype=np.float32)
            for c in range(channels):
                pool = tricky_values(scales[c], zps[c], dtype_name, rng, n_random=40)
                pool = pool[rng.permutation(pool.size)]
                if pool.size < per_ch:
                    pool = np.resize(pool, per_ch)
                body[c] = pool[:per_ch]
            x = np.ascontiguousarray(np.moveaxis(body.reshape(moved), 0, axis))
            assert list(x.shape) == shape
            out = quantize_per_channel(x, scales, zps, axis, dtype_name)
            name = f"{dtype_name}_shape{'x'.join(map(str, shape))}_axis{axis}"

            # Element-alone check: quantize a one-element slice of the channel.
            def one(v, i, shape=shape, axis=axis, scales=scales, zps=zps):
                c = np.unravel_index(i, shape)[axis]
                sub = np.ones(len(shape), dtype=int).tolist()
                sub[axis] = 1
                return quantize_per_channel(v.reshape(sub), [scales[c]], [zps[c]], axis, dtype_name).reshape(-1)

            mismatches += check_elementwise(name, x, out, one)
            cases.append({
                "name": name,
                "dtype": dtype_name,
                "axis": axis,
                "shape": shape,
                "scales": f32_bits(scales),
                "zero_points": [int(z) for z in zps],
                "input": f32_bits(x),
                "output": ints(out),
            })
    return cases, mismatches


def report_nan():
    print("NaN input to quantize_per_tensor (scale 0.1, zero_point 3):")
    for dtype_name in DTYPES:
        for n, pos in ((1, 0), (3, 2), (8, 0), (8, 7), (40, 0), (40, 17), (40, 39), (64, 33)):
            x = np.full(n, 0.25, dtype=np.float32)
            x[pos] = np.nan
            q = quantize_per_tensor(x, F32(0.1), 3, dtype_name)
            print(f"  {dtype_name:6s} len={n:2d} NaN at {pos:2d} -> {int(q[pos])}"
                  f" (neighbours -> {sorted(set(int(v) for i, v in enumerate(q) if i != pos))})")
    print("NaN input to quantize_per_channel ([2, 40], axis 0, scales 0.1/0.5, zero_points 3/0):")
    for dtype_name in DTYPES:
        x = np.full((2, 40), 0.25, dtype=np.float32)
        x[0, 5] = np.nan
        x[1, 39] = np.nan
        q = quantize_per_channel(x, [F32(0.1), F32(0.5)], [3, 0], 0, dtype_name)
        print(f"  {dtype_name:6s} -> {int(q[0, 5])}, {int(q[1, 39])}")


# --------------------------------------------------------------------------
# observer fixtures


def observer_case(name, observer, dtype_name, qscheme, batches, reduce_range=False,
                  quant_min=None, quant_max=None, eps=None, ch_axis=None):
    batches = [np.ascontiguousarray(np.asarray(b, dtype=np.float32)) for b in batches]
    shape = list(batches[0].shape)
    assert all(list(b.shape) == shape for b in batches)
    kwargs = {"dtype": DTYPES[dtype_name][0], "qscheme": QSCHEMES[qscheme], "reduce_range": reduce_range}
    if quant_min is not None:
        kwargs["quant_min"] = quant_min
    if quant_max is not None:
        kwargs["quant_max"] = quant_max
    if eps is not None:
        kwargs["eps"] = eps
    if observer == "PerChannelMinMaxObserver":
        kwargs["ch_axis"] = 0 if ch_axis is None else ch_axis
        ch_axis = kwargs["ch_axis"]
    case = {
        "name": name,
        "observer": observer,
        "dtype": dtype_name,
        "qscheme": qscheme,
        "reduce_range": reduce_range,
        "quant_min": quant_min,
        "quant_max": quant_max,
        "eps": f32_bits([F32_EPS if eps is None else eps])[0],
        "ch_axis": ch_axis,
        "shape": shape,
        "batches": [f32_bits(b) for b in batches],
        "error": None,
        "qmin": None, "qmax": None, "min_val": None, "max_val": None, "scale": None, "zero_point": None,
    }
    try:
        obs = OBSERVERS[observer](**kwargs)
        case["eps"] = f32_bits(obs.eps.detach().numpy())[0]
        for b in batches:
            obs(torch.from_numpy(b.copy()))
        scale, zero_point = obs.calculate_qparams()
    except Exception as e:  # recorded, not hidden
        case["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
        return case
    case["qmin"], case["qmax"] = int(obs.quant_min), int(obs.quant_max)
    case["min_val"] = f32_bits(obs.min_val.detach().numpy())
    case["max_val"] = f32_bits(obs.max_val.detach().numpy())
    case["scale"] = f32_bits(scale.detach().numpy())
    case["zero_point"] = ints(zero_point.detach().numpy())
    return case


def range_batch(lo, hi, rng, shape=(4, 8)):
    """A batch whose minimum is exactly lo and maximum exactly hi (both f32)."""
    lo, hi = F32(lo), F32(hi)
    n = int(np.prod(shape))
    body = rng.uniform(0.0, 1.0, n)
    x = (np.float64(lo) + (np.float64(hi) - np.float64(lo)) * body).astype(np.float32)
    x = np.clip(x, lo, hi)
    idx = rng.permutation(n)
    x[idx[0]] = lo
    x[idx[1]] = hi
    return x.reshape(shape)


def exact_half_ranges(qmin, qmax):
    """(name, lo, hi) with scale = 2**e exactly and min/scale = -(k + 0.5)."""
    out = []
    for e, k in ((0, 0), (0, 1), (-3, 2), (-3, 3), (-7, 10), (-7, 11), (2, 20), (-1, 5)):
        s = 2.0**e
        if k + 1 > qmax - qmin:
            continue
        lo = -(k + 0.5) * s
        hi = lo + s * (qmax - qmin)
        if hi <= 0:
            continue
        out.append((f"zp_tie_k{k}_s2^{e}", lo, hi))
    return out


def nondyadic_half_ranges(qmin, qmax, rng, count):
    """(name, lo, hi) with a non-dyadic f32 scale where f32(lo / scale) is
    exactly -(k + 0.5), found by walking lo over neighbouring f32 values and
    recomputing the observer's f32 arithmetic each time."""
    out, tries = [], 0
    den = F32(qmax - qmin)
    while len(out) < count and tries < 10000:
        tries += 1
        hi = F32(rng.uniform(0.5, 50.0))
        k = int(rng.integers(0, min(60, qmax - qmin - 1)))
        guess = F32(-(k + 0.5) * float(hi) / (qmax - qmin - k - 0.5))
        up = down = guess
        candidates = [guess]
        for _ in range(200):
            up = np.nextafter(up, F32(np.inf))
            down = np.nextafter(down, F32(-np.inf))
            candidates += [up, down]
        for lo in candidates:
            scale = F32(F32(hi - lo) / den)
            if np.log2(float(scale)).is_integer():
                continue  # dyadic: covered by exact_half_ranges
            if F32(lo / scale) == F32(-(k + 0.5)):
                out.append((f"zp_tie_nondyadic_k{k}_{len(out)}", float(lo), float(hi)))
                break
    return out


def qparams_cases(rng):
    cases = []
    std = lambda: range_batch(-1.3, 4.7, rng)  # noqa: E731  asymmetric mixed

    # 1. Every dtype x qscheme x reduce_range, with each scheme's natural
    #    observer, plus each observer with the other family's schemes (rejected).
    for dtype_name in DTYPES:
        for qscheme in QSCHEMES:
            for rr in (False, True):
                for observer in OBSERVERS:
                    natural = (observer == "MinMaxObserver") == qscheme.startswith("per_tensor")
                    tag = "grid" if natural else "grid_wrong_observer"
                    batch = std() if observer == "MinMaxObserver" else range_batch(-1.3, 4.7, rng, (4, 6))
                    cases.append(observer_case(
                        f"{tag}_{observer}_{dtype_name}_{qscheme}_rr{int(rr)}",
                        observer, dtype_name, qscheme, [batch], reduce_range=rr))

    # 2. Custom ranges (and custom range together with reduce_range).
    custom = [
        ("quint8", "per_tensor_affine", 0, 127, False, None),
        ("quint8", "per_tensor_affine", 0, 127, True, None),
        ("quint8", "per_tensor_symmetric", 0, 127, False, None),
        ("qint8", "per_tensor_symmetric", -127, 127, False, 2.0**-12),
        ("qint8", "per_tensor_affine", -127, 127, False, 2.0**-12),
        ("qint8", "per_tensor_symmetric", -127, 127, True, 2.0**-12),
        ("quint8", "per_tensor_affine", 0, 15, False, None),
        ("quint8", "per_tensor_symmetric", 0, 15, False, None),
        ("quint8", "per_tensor_affine", 0, 15, True, None),
        ("qint8", "per_tensor_affine", -64, 63, False, None),
        ("qint8", "per_tensor_symmetric", -64, 63, False, None),
        ("qint8", "per_tensor_affine", -64, 63, True, None),
        ("qint8", "per_tensor_affine", -128, 127, True, None),
        ("qint8", "per_tensor_affine", 0, 127, False, None),
        ("qint8", "per_tensor_affine", 0, 15, False, None),
        ("quint8", "per_tensor_affine", 0, 511, False, None),
        ("qint32", "per_tensor_affine", -1000, 1000, False, None),
        ("qint32", "per_tensor_symmetric", -(2**31), 2**31 - 1, True, None),
        # Rejected ranges.
        ("quint8", "per_tensor_affine", 1, 255, False, None),
        ("qint8", "per_tensor_affine", -200, 100, False, None),
        ("qint8", "per_tensor_affine", 0, 0, False, None),
        ("quint8", "per_tensor_affine", 0, None, False, None),  # one bound only: ignored, not rejected
    ]
    for dtype_name, qscheme, qmn, qmx, rr, eps in custom:
        for label, (lo, hi) in (("mixed", (-1.3, 4.7)), ("posonly", (0.25, 3.0))):
            cases.append(observer_case(
                f"custom_{dtype_name}_{qscheme}_{qmn}_{qmx}_rr{int(rr)}_{label}",
                "MinMaxObserver", dtype_name, qscheme, [range_batch(lo, hi, rng)],
                reduce_range=rr, quant_min=qmn, quant_max=qmx, eps=eps))
    # The same custom ranges, per channel.
    for dtype_name, qscheme, qmn, qmx, rr, eps in (
        ("qint8", "per_channel_symmetric", -127, 127, False, 2.0**-12),
        ("quint8", "per_channel_affine", 0, 127, False, None),
        ("quint8", "per_channel_affine", 0, 15, True, None),
        ("qint8", "per_channel_affine", -64, 63, False, None),
    ):
        batch = np.stack([range_batch(lo, hi, rng, (6,)) for lo, hi in
                          ((-1.3, 4.7), (0.0, 0.0), (-0.01, 0.02), (-5.0, -1.0))])
        cases.append(observer_case(
            f"custom_pc_{dtype_name}_{qscheme}_{qmn}_{qmx}_rr{int(rr)}",
            "PerChannelMinMaxObserver", dtype_name, qscheme, [batch],
            reduce_range=rr, quant_min=qmn, quant_max=qmx, eps=eps, ch_axis=0))

    # 3. Special ranges on a set of per-tensor configurations.
    configs = [
        ("quint8", "per_tensor_affine", False),
        ("quint8", "per_tensor_affine", True),
        ("quint8", "per_tensor_symmetric", False),
        ("qint8", "per_tensor_affine", False),
        ("qint8", "per_tensor_symmetric", False),
        ("qint8", "per_tensor_symmetric", True),
        ("qint32", "per_tensor_affine", False),
        ("qint32", "per_tensor_symmetric", False),
    ]
    ranges = [
        ("all_zeros", [np.zeros((4, 8))]),
        ("const_pos", [np.full((4, 8), 3.7)]),
        ("const_neg", [np.full((4, 8), -2.25)]),
        ("pos_only", [range_batch(0.5, 6.0, rng)]),
        ("neg_only", [range_batch(-8.0, -0.125, rng)]),
        ("asym_mixed", [range_batch(-0.37, 5.91, rng)]),
        ("tiny_span_1e-10", [range_batch(-0.4e-10, 0.6e-10, rng)]),
        ("tiny_span_1e-30", [range_batch(-0.3e-30, 0.7e-30, rng)]),
        ("tiny_span_at_1", [range_batch(1.0, float(np.nextafter(F32(1.0), F32(2.0))), rng)]),
        ("huge_1e30", [range_batch(-1e30, 2e30, rng)]),
        ("huge_span_overflows_f32", [range_batch(-3.0e38, 3.0e38, rng)]),
        ("subnormal_only", [range_batch(1e-40, 3e-39, rng)]),
        ("subnormal_mixed", [range_batch(-1e-39, 2e-40, rng)]),
        ("exact_symmetric", [range_batch(-2.5, 2.5, rng)]),
        ("grows_3_batches", [range_batch(-0.5, 1.0, rng), range_batch(-2.0, 0.7, rng),
                             range_batch(-1.0, 3.3, rng)]),
        ("shrinking_batches_keep_extremes", [range_batch(-4.0, 4.0, rng), range_batch(-0.1, 0.1, rng)]),
    ]
    for dtype_name, qscheme, rr in configs:
        for rname, batches in ranges:
            cases.append(observer_case(
                f"range_{rname}_{dtype_name}_{qscheme}_rr{int(rr)}",
                "MinMaxObserver", dtype_name, qscheme, batches, reduce_range=rr))

    # 4. Affine zero point on an exact .5 tie: min_val/scale == -(k + 0.5).
    for dtype_name, rr in (("quint8", False), ("quint8", True), ("qint8", False), ("qint8", True)):
        probe = MinMaxObserver(dtype=DTYPES[dtype_name][0], reduce_range=rr)
        for rname, lo, hi in exact_half_ranges(probe.quant_min, probe.quant_max):
            assert F32(lo) == lo and F32(hi) == hi
            cases.append(observer_case(
                f"{rname}_{dtype_name}_rr{int(rr)}", "MinMaxObserver", dtype_name,
                "per_tensor_affine", [range_batch(lo, hi, rng)], reduce_range=rr))

    for dtype_name in ("quint8", "qint8"):
        probe = MinMaxObserver(dtype=DTYPES[dtype_name][0])
        for rname, lo, hi in nondyadic_half_ranges(probe.quant_min, probe.quant_max, rng, 4):
            cases.append(observer_case(
                f"{rname}_{dtype_name}", "MinMaxObserver", dtype_name,
                "per_tensor_affine", [range_batch(lo, hi, rng)]))

    # 5. Random ranges over random per-tensor configurations.
    for i in range(40):
        dtype_name = ["quint8", "qint8", "qint32"][rng.integers(3)]
        qscheme = ["per_tensor_affine", "per_tensor_symmetric"][rng.integers(2)]
        rr = bool(rng.integers(2)) and not (dtype_name == "quint8" and qscheme == "per_tensor_symmetric")
        mag = 10.0 ** rng.uniform(-6, 6)
        kind = rng.integers(4)
        if kind == 0:
            lo, hi = sorted(rng.uniform(-mag, mag, 2))
        elif kind == 1:
            lo, hi = sorted(rng.uniform(0, mag, 2))
        elif kind == 2:
            lo, hi = sorted(rng.uniform(-mag, 0, 2))
        else:
            lo, hi = -mag * rng.uniform(0, 1), mag * rng.uniform(0, 1)
        nb = int(rng.integers(1, 4))
        batches = [range_batch(lo * rng.uniform(0.5, 1), hi * rng.uniform(0.5, 1), rng) for _ in range(nb - 1)]
        batches.append(range_batch(lo, hi, rng))
        cases.append(observer_case(
            f"random_{i:02d}_{dtype_name}_{qscheme}_rr{int(rr)}", "MinMaxObserver",
            dtype_name, qscheme, batches, reduce_range=rr))

    # 6. Per channel: shapes [4,6] and [3,2,5], ch_axis 0, 1, -1; some
    #    channels constant or all zero; some with several batches.
    def pc_batch(shape, axis, rng, specials=True):
        ch = shape[axis]
        moved = [shape[axis]] + [d for i, d in enumerate(shape) if i != axis]
        rest = moved[1:]
        rows = []
        for c in range(ch):
            kind = c % 5 if specials else 4
            if kind == 0:
                rows.append(np.zeros(rest))
            elif kind == 1:
                rows.append(np.full(rest, [0.75, -3.5, 12.0][c % 3]))
            else:
                mag = 10.0 ** rng.uniform(-3, 2)
                lo, hi = sorted(rng.uniform(-mag, mag, 2))
                if kind == 2:
                    lo, hi = abs(lo) * 0.1, abs(hi) + 0.01
                rows.append(range_batch(lo, hi, rng, tuple(rest)))
        body = np.stack(rows).astype(np.float32)
        return np.ascontiguousarray(np.moveaxis(body, 0, axis % len(shape)))

    pc_configs = [
        ("quint8", "per_channel_affine", False),
        ("quint8", "per_channel_affine", True),
        ("quint8", "per_channel_symmetric", False),
        ("qint8", "per_channel_affine", False),
        ("qint8", "per_channel_symmetric", False),
        ("qint8", "per_channel_symmetric", True),
        ("qint32", "per_channel_affine", False),
        ("qint32", "per_channel_symmetric", False),
    ]
    for shape in ([4, 6], [3, 2, 5]):
        for axis in (0, 1, -1):
            for ci, (dtype_name, qscheme, rr) in enumerate(pc_configs):
                nb = 1 + (ci % 3)
                batches = [pc_batch(shape, axis, rng) for _ in range(nb)]
                cases.append(observer_case(
                    f"pc_{'x'.join(map(str, shape))}_axis{axis}_{dtype_name}_{qscheme}_rr{int(rr)}_b{nb}",
                    "PerChannelMinMaxObserver", dtype_name, qscheme, batches,
                    reduce_range=rr, ch_axis=axis))
    # Out-of-range channel axis (rejected when the first batch arrives).
    cases.append(observer_case(
        "pc_4x6_axis2_out_of_range", "PerChannelMinMaxObserver", "qint8",
        "per_channel_symmetric", [pc_batch([4, 6], 0, rng)], ch_axis=2))
    return cases


# --------------------------------------------------------------------------


def main():
    torch.backends.quantized.engine = ENGINE
    assert torch.backends.quantized.engine == ENGINE
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}")
    os.makedirs(OUT_DIR, exist_ok=True)

    report_nan()

    rng = np.random.default_rng(20240917)
    pt, bad_pt = per_tensor_cases(rng)
    pc, bad_pc = per_channel_cases(rng)
    print(f"per_tensor cases: {len(pt)}, elementwise mismatches: {bad_pt}")
    print(f"per_channel cases: {len(pc)}, elementwise mismatches: {bad_pc}")
    write_json(os.path.join(OUT_DIR, "quantize.json"), {
        "torch_version": torch.__version__,
        "engine": ENGINE,
        "per_tensor": pt,
        "per_channel": pc,
    })

    rng = np.random.default_rng(20240918)
    qp = qparams_cases(rng)
    n_err = sum(c["error"] is not None for c in qp)
    print(f"qparams cases: {len(qp)} ({n_err} with error)")
    write_json(os.path.join(OUT_DIR, "qparams.json"), {
        "torch_version": torch.__version__,
        "cases": qp,
    })
    return 1 if (bad_pt or bad_pc) else 0


if __name__ == "__main__":
    sys.exit(main())
