#!/usr/bin/env python3
"""Golden fixtures for the `qkernels` crate: quantized linear and conv2d, from real PyTorch.

What it writes (into ``qkernels/tests/golden/``):

* ``qlinear.json``: ``torch.ops.quantized.linear`` / ``linear_relu`` on weights
  packed by ``torch.ops.quantized.linear_prepack``.
* ``qconv.json``: ``torch.ops.quantized.conv2d`` / ``conv2d_relu`` (the ``.new``
  overloads) on weights packed by ``torch.ops.quantized.conv2d_prepack``.

Both are produced with ``torch.backends.quantized.engine = "fbgemm"`` (recorded as
``"engine"``).  Every case is also run with engine ``"x86"``; when that output
differs from fbgemm's the case carries ``"engine_x86_y"`` as well.

Inputs are quint8 (built with ``torch._make_per_tensor_quantized_tensor`` from
exact integers), weights qint8 per-tensor (``w_scales``/``w_zps`` of length 1,
zero point 0 or not) or per-channel along the output channel (length OC, zero
points 0 or not; fbgemm accepts all of these).  Bias is f32 or null.  Scales are
f32 values handed to PyTorch as exact Python floats / float64 tensors.

Encoding: f32 values are IEEE-754 bit patterns (u32 JSON ints); integer tensors
are plain JSON ints, flattened in C order.  Linear: x [M,K], w [N,K], y [M,N].
Conv: activations NHWC, weights OHWI ([OC, KH, KW, C/groups]), y NHWC.
NOTE (conv schema): the input width is ``"w"`` (int) and the OHWI weight tensor
is ``"weight"``: a JSON object cannot carry two ``"w"`` keys.
Names containing ``bias_probe`` have biases searched (f32 ulp by ulp) so that
the rounding variants below give different outputs for the first output row /
pixel; they pin down the bias arithmetic.  Names containing ``full`` use
activations and weights uniform over the whole u8 / i8 range.

What PyTorch does (torch 2.15.0+cu132, AVX-512 VNNI CPU).  The fbgemm model
below reproduces every fixture element and every element of ``--stress 300``
(~590k outputs, half of them with searched biases) bit for bit:

Notation: acc = sum_k (x - x_zp) * (w - w_zp[j]) (i32), af = f32(acc),
ats[j] = f32(x_scale) * f32(w_scale[j]) (f32 product),
mult[j] = ats[j] / f32(y_scale) (f32 division), rne = round half to even,
out = clamp(rne(f32(raw_f * mult[j])) + y_zp, relu ? y_zp : 0, 255).

engine fbgemm (linear, and every conv):
* per-channel weights: raw_f = af + f32(bias[j] / ats[j]).  This is exactly the
  formula of pytorch_quant.md section 3.1.
* per-tensor weights, GEMM-based kernels (linear, im2col conv, 1x1 conv,
  groupwise conv): raw_f = fma(bias, rcp, af), one rounding, with
  rcp = f32(1.0 / f64(ats)).  FBGEMM's requantizeOutputProcessingAvx2 multiplies
  by that reciprocal; that the multiply and the add are fused into one FMA is
  inferred (it matches bit for bit, multiply-then-add does not).  With random
  biases this never showed (0 of ~300k outputs): only the bias_probe cases
  expose it.
* per-tensor weights, depthwise kernel: raw_f = af + f32(bias * rcp), two
  roundings, no FMA.
* depthwise fast path (groups == C, OC in {C, 2C}, C % 8 == 0, square 3x3/5x5/7x7
  kernel, stride 1 or 2, dilation 1, pad (k-1)/2): acc is NOT exact.  The
  kernel adds raw u8 * raw i8 products of consecutive taps (row-major kh, kw:
  taps 0+1, 2+3, ...; an odd last tap pairs with 0) in int16 with saturation
  (vpmaddubsw in FBGEMM's GenerateI8Depthwise JIT), padded taps reading the
  value x_zp; the zero-point corrections are exact i32.  So
  acc = exact + sum over pairs of (sat16(p0 + p1) - (p0 + p1)), p = x_raw * w_raw.
  It changed ~9% of depthwise outputs in the stress runs (up to 95 LSB).
  Other convs (im2col, groupwise, 1x1) and linear accumulate exactly in i32 (VNNI).
  NOTE: without bias the three bias variants coincide.

engine x86: linear is the fbgemm kernel (identical output).  conv goes to oneDNN
when all weight zero points are 0 and groups <= 100 (else it is fbgemm as above).
oneDNN accumulates exactly (no saturation, also depthwise) and requantizes
roughly as v = f32(f32(af * f32(x_scale)) * f32(w_scale[j])) (+ bias[j], f32 add),
z = f32(f32(v * f32(1 / f64(y_scale))) + f32(y_zp)), out = clamp(rne(z), relu ? y_zp : 0, 255)
(zero point added in f32 BEFORE rounding).  That model matches every fixture
element but only ~99.998% of ``--stress`` elements (off by 1 LSB at near-ties):
the order of the scale products depends on the oneDNN kernel picked
(brg_conv_fwd, jit_int8, brdgmm_dw, ...).  Use ``engine_x86_y`` as data, not as
a formula to match bit for bit.

How to regenerate (from the repository root, /work/main):

    /work/venv/bin/python scripts/golden/qkernels_golden.py

It prints, per engine, how many elements match the plain formula and the models
above.  ``--no-write`` only checks; ``--stress N`` also runs N random shapes with
searched biases (not written); ``--spread`` prints how each case's outputs spread
over u8.  Everything is seeded (one generator per case, seeded from its name), so
a rerun with the same PyTorch build writes identical files.  torch.ao quantization
is deprecated upstream; pin the version if you regenerate.
"""

import argparse
import json
import os
import sys
import warnings
import zlib

import numpy as np
import torch

warnings.filterwarnings("ignore")

FIXTURE_ENGINE = "fbgemm"
CHECK_ENGINES = ("fbgemm", "x86")
OUT_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "qkernels", "tests", "golden"
)
F32 = np.float32
F64 = np.float64


# --------------------------------------------------------------------------
# encoding helpers


def f32_bits(values):
    arr = np.ascontiguousarray(np.asarray(values, dtype=F32)).reshape(-1)
    return [int(v) for v in arr.view(np.uint32)]


def ints(values):
    return [int(v) for v in np.asarray(values).reshape(-1)]


def write_json(path, top):
    """Top-level scalars one per line, then one case per line (diffable)."""
    lines = ["{"]
    for key, value in top.items():
        if key != "cases":
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, allow_nan=False)},")
    lines.append('  "cases": [')
    cases = top["cases"]
    for i, case in enumerate(cases):
        sep = "," if i + 1 < len(cases) else ""
        lines.append("    " + json.dumps(case, separators=(",", ":"), allow_nan=False) + sep)
    lines.append("  ]")
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def case_rng(name):
    """One generator per case, seeded from its name: adding or reordering cases
    does not change the data of the others."""
    return np.random.default_rng(zlib.crc32(name.encode()) + 12345)


# --------------------------------------------------------------------------
# f32 arithmetic helpers (numpy float32 ops round to nearest even once)


def fma_f32(a, b, c):
    """Correctly rounded f32 fma(a, b, c) for f32 inputs: a*b is exact in f64,
    the f64 sum is made round-to-odd (TwoSum error term), then rounded to f32."""
    a, b, c = (np.asarray(v, dtype=F32).astype(F64) for v in np.broadcast_arrays(a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    even = (s.view(np.int64) & 1) == 0
    fix = (err != 0) & even
    s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(F32)


def per_oc(values, oc):
    v = np.asarray(values, dtype=F32).reshape(-1)
    return np.full(oc, v[0], dtype=F32) if v.size == 1 else v


# Bias arithmetic variants (see the module docstring):
#   "div"      raw_f = af + f32(b / ats)                   (pytorch_quant.md 3.1; fbgemm per-channel)
#   "rcp"      raw_f = af + f32(b * f32(1/f64(ats)))       (fbgemm per-tensor, depthwise kernel)
#   "rcp_fma"  raw_f = fma(b, f32(1/f64(ats)), af)         (fbgemm per-tensor, GEMM-based kernels)
#   "onednn"   whole oneDNN requantization (x86 engine conv, symmetric weights)
MODES = ("div", "rcp", "rcp_fma", "onednn")


def requant(acc, x_scale, w_scales, bias, y_scale, y_zp, relu, mode="div"):
    """acc: int64 [..., OC] -> uint8 outputs (as int64)."""
    oc = acc.shape[-1]
    assert np.all(np.abs(acc) < 2**31), "accumulator does not fit in i32"
    ws = per_oc(w_scales, oc)
    af = acc.astype(F32)  # cvtepi32_ps, RNE
    lo = int(y_zp) if relu else 0
    if mode == "onednn":
        v = ((af * F32(x_scale)).astype(F32) * ws).astype(F32)
        if bias is not None:
            v = (v + np.asarray(bias, dtype=F32)).astype(F32)
        inv = F32(1.0 / F64(F32(y_scale)))
        z = ((v * inv).astype(F32) + F32(y_zp)).astype(F32)
        return np.clip(np.rint(z).astype(np.int64), lo, 255)
    ats = (F32(x_scale) * ws).astype(F32)
    mult = (ats / F32(y_scale)).astype(F32)
    raw_f = af
    if bias is not None:
        b = np.asarray(bias, dtype=F32)
        rcp = (1.0 / ats.astype(F64)).astype(F32)
        if mode == "div":
            raw_f = (af + (b / ats).astype(F32)).astype(F32)
        elif mode == "rcp":
            raw_f = (af + (b * rcp).astype(F32)).astype(F32)
        elif mode == "rcp_fma":
            raw_f = fma_f32(b, rcp, af)
        else:
            raise ValueError(mode)
    prod = (raw_f * mult).astype(F32)
    return np.clip(np.rint(prod).astype(np.int64) + int(y_zp), lo, 255)


# --------------------------------------------------------------------------
# integer accumulators


def linear_acc(x, x_zp, w, w_zps):
    """x [M,K] u8, w [N,K] i8 -> int64 [M,N] of sum (x - x_zp)(w - w_zp)."""
    n = w.shape[0]
    wz = np.broadcast_to(np.asarray(w_zps, dtype=np.int64), (n,))
    return (x.astype(np.int64) - int(x_zp)) @ (w.astype(np.int64) - wz[:, None]).T


def conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_taps(x, pad_value, kh, kw, stride, padding, dilation):
    """Yields ((i, j), patch) with patch [N, OH, OW, C] of the (padded) input
    seen by kernel tap (i, j); padding holds pad_value."""
    n, h, wd, c = x.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    oh = conv_out_size(h, kh, sh, ph, dh)
    ow = conv_out_size(wd, kw, sw, pw, dw)
    xp = np.full((n, h + 2 * ph, wd + 2 * pw, c), pad_value, dtype=np.int64)
    xp[:, ph : ph + h, pw : pw + wd, :] = x
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            yield (i, j), xp[:, r0 : r0 + (oh - 1) * sh + 1 : sh, c0 : c0 + (ow - 1) * sw + 1 : sw, :]


def conv_acc(x, x_zp, w, w_zps, stride, padding, dilation, groups):
    """x NHWC u8, w OHWI i8 -> exact int64 NHWC accumulator.  Padding is x_zp,
    i.e. it contributes a real zero."""
    n, h, wd, c = x.shape
    oc, kh, kw, cg = w.shape
    assert cg * groups == c and oc % groups == 0
    ocg = oc // groups
    oh = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(wd, kw, stride[1], padding[1], dilation[1])
    wz = np.broadcast_to(np.asarray(w_zps, dtype=np.int64), (oc,))
    wa = w.astype(np.int64) - wz[:, None, None, None]
    xa = x.astype(np.int64) - int(x_zp)
    acc = np.zeros((n, oh, ow, oc), dtype=np.int64)
    for (i, j), patch in conv_taps(xa, 0, kh, kw, stride, padding, dilation):
        for g in range(groups):
            xs = patch[..., g * cg : (g + 1) * cg]
            ws = wa[g * ocg : (g + 1) * ocg, i, j, :]
            acc[..., g * ocg : (g + 1) * ocg] += np.tensordot(xs, ws, axes=([3], [1]))
    return acc, oh, ow


def fbgemm_depthwise_path(p):
    """FBGEMM takeDepthWiseFastPath for 2-D convs."""
    kh, kw, c, oc = p["kh"], p["kw"], p["c"], p["oc"]
    return (
        p["groups"] == c and oc in (c, 2 * c) and c % 8 == 0
        and all(s in (1, 2) for s in p["stride"])
        and kh == kw and kh in (3, 5, 7)
        and list(p["dilation"]) == [1, 1]
        and list(p["padding"]) == [(kh - 1) // 2, (kw - 1) // 2]
    )


def onednn_conv_path(p):
    """PyTorch x86 engine: conv prepack goes to oneDNN on an AVX-512 VNNI CPU
    iff the weights are symmetric and groups <= 100."""
    return all(int(z) == 0 for z in p["w_zps"]) and p["groups"] <= 100


def depthwise_saturation_delta(p):
    """(pair-saturated raw sum) - (exact raw sum) of the FBGEMM depthwise kernel:
    raw u8 activations (x_zp in the padding) times raw i8 weights, consecutive
    taps paired and each pair sum saturated to int16."""
    oc, kh, kw, _ = p["w"].shape
    kpg = oc // p["c"]
    a_taps, b_taps = [], []
    for (i, j), patch in conv_taps(p["x"].astype(np.int64), p["x_zp"], kh, kw,
                                   p["stride"], p["padding"], p["dilation"]):
        a_taps.append(np.repeat(patch, kpg, axis=3))
        b_taps.append(p["w"][:, i, j, 0].astype(np.int64))
    if len(a_taps) % 2:
        a_taps.append(np.zeros_like(a_taps[0]))
        b_taps.append(np.zeros_like(b_taps[0]))
    delta = np.zeros_like(a_taps[0])
    for t in range(0, len(a_taps), 2):
        s = a_taps[t] * b_taps[t] + a_taps[t + 1] * b_taps[t + 1]
        delta += np.clip(s, -32768, 32767) - s
    return delta


# --------------------------------------------------------------------------
# models of what each engine computes


def per_tensor(p):
    return len(p["w_scales"]) == 1


def model_fbgemm(kind, p):
    acc = p["acc"]
    dw = kind == "conv" and fbgemm_depthwise_path(p)
    if dw:
        acc = acc + depthwise_saturation_delta(p)
    mode = ("rcp" if dw else "rcp_fma") if per_tensor(p) else "div"
    return requant(acc, p["x_scale"], p["w_scales"], p["bias"], p["y_scale"], p["y_zp"], p["relu"], mode)


def model_x86(kind, p):
    if kind == "conv" and onednn_conv_path(p):
        return requant(p["acc"], p["x_scale"], p["w_scales"], p["bias"], p["y_scale"], p["y_zp"],
                       p["relu"], "onednn")
    return model_fbgemm(kind, p)


def exact_formula(p):
    """pytorch_quant.md section 3.1 as written: exact accumulator, f32 division."""
    return requant(p["acc"], p["x_scale"], p["w_scales"], p["bias"], p["y_scale"], p["y_zp"], p["relu"], "div")


MODELS = {"fbgemm": model_fbgemm, "x86": model_x86}


def kernel_label(kind, p):
    if kind == "linear":
        return "gemm"
    if fbgemm_depthwise_path(p):
        k = "depthwise"
    elif p["kh"] == 1 and p["kw"] == 1 and list(p["stride"]) == [1, 1] and list(p["padding"]) == [0, 0]:
        k = "pointwise"
    else:
        k = "im2col/gconv"
    return k + (" | x86:onednn" if onednn_conv_path(p) else " | x86:fbgemm")


# --------------------------------------------------------------------------
# PyTorch calls


def q_input(x_int, x_scale, x_zp):
    return torch._make_per_tensor_quantized_tensor(
        torch.from_numpy(np.ascontiguousarray(x_int.astype(np.uint8))), float(x_scale), int(x_zp)
    )


def q_weight(w_int, w_scales, w_zps):
    t = torch.from_numpy(np.ascontiguousarray(w_int.astype(np.int8)))
    if len(w_scales) == 1:
        return torch._make_per_tensor_quantized_tensor(t, float(w_scales[0]), int(w_zps[0]))
    return torch._make_per_channel_quantized_tensor(
        t,
        torch.tensor([float(s) for s in w_scales], dtype=torch.float64),
        torch.tensor([int(z) for z in w_zps], dtype=torch.int64),
        0,
    )


def torch_bias(p):
    return None if p["bias"] is None else torch.from_numpy(np.asarray(p["bias"], dtype=F32).copy())


def torch_linear(engine, p):
    """Returns y [M,N] as int64.  Prepack happens under `engine` too."""
    torch.backends.quantized.engine = engine
    qx = q_input(p["x"], p["x_scale"], p["x_zp"])
    packed = torch.ops.quantized.linear_prepack(q_weight(p["w"], p["w_scales"], p["w_zps"]), torch_bias(p))
    op = torch.ops.quantized.linear_relu if p["relu"] else torch.ops.quantized.linear
    y = op(qx, packed, float(p["y_scale"]), int(p["y_zp"]))
    assert y.dtype == torch.quint8 and y.q_zero_point() == int(p["y_zp"])
    assert F32(y.q_scale()) == F32(p["y_scale"])
    return y.int_repr().numpy().astype(np.int64)


def torch_conv(engine, p):
    """NHWC/OHWI in and out; PyTorch sees NCHW / [OC, C/g, KH, KW]."""
    torch.backends.quantized.engine = engine
    qx = q_input(np.ascontiguousarray(p["x"].transpose(0, 3, 1, 2)), p["x_scale"], p["x_zp"])
    qw = q_weight(np.ascontiguousarray(p["w"].transpose(0, 3, 1, 2)), p["w_scales"], p["w_zps"])
    packed = torch.ops.quantized.conv2d_prepack(
        qw, torch_bias(p), list(p["stride"]), list(p["padding"]), list(p["dilation"]), int(p["groups"])
    )
    op = torch.ops.quantized.conv2d_relu if p["relu"] else torch.ops.quantized.conv2d
    y = op(qx, packed, float(p["y_scale"]), int(p["y_zp"]))
    assert y.dtype == torch.quint8 and y.q_zero_point() == int(p["y_zp"])
    assert F32(y.q_scale()) == F32(p["y_scale"])
    assert tuple(y.shape) == (p["n"], p["oc"], p["oh"], p["ow"])
    return y.int_repr().permute(0, 2, 3, 1).contiguous().numpy().astype(np.int64)


RUNNERS = {"linear": torch_linear, "conv": torch_conv}


# --------------------------------------------------------------------------
# data generation


def gen_x(rng, shape, dist):
    if dist == "full":  # uniform over all of u8 (stresses int16 pair saturation)
        return rng.integers(0, 256, size=shape, dtype=np.int64)
    c = rng.integers(60, 196)  # bell around a random centre
    return np.clip(np.rint(rng.normal(c, 45, size=shape)), 0, 255).astype(np.int64)


def gen_w(rng, shape, dist, zps):
    """Weights of output channel o centred on zps[o]; stored values stay in i8."""
    oc = shape[0]
    z = np.broadcast_to(np.asarray(zps, dtype=np.int64), (oc,)).reshape((oc,) + (1,) * (len(shape) - 1))
    if dist == "full":
        w = rng.integers(-128, 128, size=shape, dtype=np.int64)
    else:
        w = np.rint(rng.normal(0, 40, size=shape)).astype(np.int64) + z
    return np.clip(w, -128, 127)


def gen_wq(rng, oc, wq):
    """wq: pt_sym / pt_zp (per-tensor) or pc_sym / pc_zp (per-channel, OC >= 2)."""
    if wq.startswith("pt"):
        scales = [F32(rng.uniform(0.002, 0.02))]
        zps = [0] if wq == "pt_sym" else [int(rng.choice([-7, 3, 5, 11, -1]))]
    else:
        assert oc >= 2, "per-channel needs OC >= 2 (one scale reads as per-tensor)"
        scales = [F32(v) for v in rng.uniform(0.001, 0.03, size=oc)]
        if wq == "pc_sym":
            zps = [0] * oc
        else:
            zps = [int(v) for v in rng.integers(-9, 10, size=oc)]
            zps[0], zps[1] = 0, 3
    return scales, zps


def pick_x_qparams(rng, x_zp):
    x_scale = F32(rng.uniform(0.004, 0.04))
    if x_zp is None:
        x_zp = int(rng.integers(0, 256))
    return x_scale, int(x_zp)


def gen_bias(rng, oc, acc, x_scale, w_scales):
    ws = per_oc(w_scales, oc).astype(F64)
    spread = np.std(acc.astype(F64)) + 1.0
    return (rng.normal(0, 1.0, size=oc) * spread * float(x_scale) * ws).astype(F32)


def pick_y_qparams(rng, acc, x_scale, w_scales, bias, relu):
    """(y_scale, y_zp) so outputs cover most of u8 with a few saturated."""
    oc = acc.shape[-1]
    real = acc.astype(F64) * (float(x_scale) * per_oc(w_scales, oc).astype(F64))
    if bias is not None:
        real = real + np.asarray(bias, dtype=F64)
    lo, hi = np.percentile(real, 2), np.percentile(real, 98)
    if hi - lo <= 1e-6:
        lo, hi = real.min() - 1.0, real.max() + 1.0
    if relu and lo < 0 < hi:
        lo = max(lo, -0.4 * hi)  # keep the ReLU clamp at y_zp visible
    y_scale = F32((hi - lo) / 250.0 * rng.uniform(0.9, 1.1))
    y_zp = int(np.clip(np.rint(-lo / float(y_scale)), 0, 255))
    return y_scale, y_zp


def probe_biases(rng, acc_row, x_scale, w_scales, y_scale, y_zp, relu, prefer, span=3000):
    """For each output channel j, search f32 biases (ulp steps around one that puts
    acc_row[j] at a random k + 0.5 output) until the MODES disagree on acc_row[j];
    prefer a bias where mode `prefer` differs from "div".  Returns (bias, #found)."""
    oc = acc_row.shape[-1]
    ws = per_oc(w_scales, oc)
    ats = (F32(x_scale) * ws).astype(F32)
    mult = (ats / F32(y_scale)).astype(F32)
    out = np.zeros(oc, dtype=F32)
    found = 0
    steps = np.concatenate([[0], np.stack([np.arange(1, span), -np.arange(1, span)], 1).reshape(-1)])
    for j in range(oc):
        t = rng.integers(-100, 100) + 0.5
        b0 = F32((t / float(mult[j]) - float(acc_row[j])) * float(ats[j]))
        cand = (np.array([b0], dtype=F32).view(np.int32)[0] + steps).astype(np.int32).view(F32)
        acc_c = np.full((1, cand.size), acc_row[j], dtype=np.int64)  # one "channel" per candidate
        ws_c = np.full(cand.size, ws[j], dtype=F32)
        res = {m: requant(acc_c, x_scale, ws_c, cand, y_scale, y_zp, relu, m)[0] for m in MODES}
        stack = np.stack([res[m] for m in MODES])
        any_diff = np.any(stack != stack[0], axis=0)
        pref = res[prefer] != res["div"]
        hit = np.flatnonzero(pref) if pref.any() else np.flatnonzero(any_diff)
        if hit.size:
            out[j] = cand[hit[0]]
            found += 1
        else:
            out[j] = b0
    return out, found


# --------------------------------------------------------------------------
# case tables

# name, m, k, n, weight quant, bias ("none" | "rand" | "probe"), relu, x_zp (None = random), dist
LINEAR_SPECS = [
    ("m1_k1_n1_pt_sym", 1, 1, 1, "pt_sym", "rand", False, 0, "normal"),
    ("m1_k3_n5_pc_sym", 1, 3, 5, "pc_sym", "rand", False, 7, "normal"),
    ("m1_k7_n16_pt_zp_nobias", 1, 7, 16, "pt_zp", "none", False, None, "normal"),
    ("m1_k257_n64_pc_sym_relu", 1, 257, 64, "pc_sym", "rand", True, 128, "normal"),
    ("m1_k100_n31_pt_sym_relu", 1, 100, 31, "pt_sym", "rand", True, 71, "normal"),
    ("m3_k1_n31_pc_zp_full", 3, 1, 31, "pc_zp", "rand", False, 1, "full"),
    ("m3_k3_n1_pt_sym_relu", 3, 3, 1, "pt_sym", "rand", True, 255, "normal"),
    ("m3_k16_n16_pt_sym", 3, 16, 16, "pt_sym", "rand", False, 0, "normal"),
    ("m3_k33_n5_pt_zp_relu", 3, 33, 5, "pt_zp", "rand", True, 33, "normal"),
    ("m3_k64_n64_pc_zp", 3, 64, 64, "pc_zp", "rand", False, None, "normal"),
    ("m3_k100_n31_pc_sym_nobias", 3, 100, 31, "pc_sym", "none", False, 77, "normal"),
    ("m3_k257_n1_pt_zp_full", 3, 257, 1, "pt_zp", "rand", False, 0, "full"),
    ("m17_k1_n5_pt_sym_relu_full", 17, 1, 5, "pt_sym", "rand", True, 0, "full"),
    ("m17_k3_n64_pc_sym", 17, 3, 64, "pc_sym", "rand", False, 129, "normal"),
    ("m17_k7_n31_pt_sym", 17, 7, 31, "pt_sym", "rand", False, 5, "normal"),
    ("m17_k16_n1_pt_zp_relu", 17, 16, 1, "pt_zp", "rand", True, None, "normal"),
    ("m17_k33_n16_pc_sym_full", 17, 33, 16, "pc_sym", "rand", False, 0, "full"),
    ("m17_k64_n5_pt_zp_nobias", 17, 64, 5, "pt_zp", "none", False, 251, "normal"),
    ("m17_k100_n64_pt_sym", 17, 100, 64, "pt_sym", "rand", False, 64, "normal"),
    ("m17_k100_n64_pc_sym_relu_full", 17, 100, 64, "pc_sym", "rand", True, 0, "full"),
    ("m17_k257_n31_pc_zp", 17, 257, 31, "pc_zp", "rand", False, 3, "normal"),
    ("m17_k257_n16_pt_sym_relu_full", 17, 257, 16, "pt_sym", "rand", True, 0, "full"),
    ("m64_k1_n16_pc_sym", 64, 1, 16, "pc_sym", "rand", False, 13, "normal"),
    ("m64_k3_n31_pt_zp", 64, 3, 31, "pt_zp", "rand", False, None, "normal"),
    ("m64_k7_n64_pc_zp_relu", 64, 7, 64, "pc_zp", "rand", True, 100, "normal"),
    ("m64_k16_n5_pc_sym_nobias", 64, 16, 5, "pc_sym", "none", False, 0, "normal"),
    ("m64_k33_n64_pt_sym", 64, 33, 64, "pt_sym", "rand", False, 9, "normal"),
    ("m64_k64_n31_pt_sym_full", 64, 64, 31, "pt_sym", "rand", False, 128, "full"),
    ("m64_k64_n64_pc_sym_relu", 64, 64, 64, "pc_sym", "rand", True, 0, "normal"),
    ("m64_k100_n16_pt_sym_nobias", 64, 100, 16, "pt_sym", "none", False, 200, "normal"),
    ("m64_k257_n5_pc_zp_full", 64, 257, 5, "pc_zp", "rand", False, 57, "full"),
    ("m64_k257_n64_pc_sym", 64, 257, 64, "pc_sym", "rand", False, 117, "normal"),
    ("m3_k16_n64_pt_sym_bias_probe", 3, 16, 64, "pt_sym", "probe", False, 0, "normal"),
    ("m3_k33_n31_pt_zp_bias_probe", 3, 33, 31, "pt_zp", "probe", False, 19, "normal"),
    ("m3_k16_n64_pc_sym_bias_probe", 3, 16, 64, "pc_sym", "probe", False, 0, "normal"),
    ("m3_k7_n16_pc_zp_bias_probe_relu", 3, 7, 16, "pc_zp", "probe", True, 201, "normal"),
]

# name, n, h, w, c, oc, (kh, kw), stride, padding, dilation, groups, wq, bias, relu, x_zp, dist
CONV_SPECS = [
    ("pw1x1_s1_pt_sym", 1, 8, 8, 16, 8, (1, 1), (1, 1), (0, 0), (1, 1), 1, "pt_sym", "rand", False, 0, "normal"),
    ("pw1x1_s2_pc_sym", 1, 9, 9, 8, 16, (1, 1), (2, 2), (0, 0), (1, 1), 1, "pc_sym", "rand", False, 17, "normal"),
    ("pw1x1_s1_pc_zp_relu", 1, 5, 6, 13, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, "pc_zp", "rand", True, None, "normal"),
    ("pw1x1_s2_pt_zp_nobias_b2", 2, 7, 7, 24, 12, (1, 1), (2, 2), (0, 0), (1, 1), 1, "pt_zp", "none", False, 3, "normal"),
    ("c3x3_p1_s1_pt_sym", 1, 8, 8, 8, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pt_sym", "rand", False, 5, "normal"),
    ("c3x3_p1_s1_pc_sym_relu", 1, 8, 8, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pc_sym", "rand", True, 0, "normal"),
    ("c3x3_p1_s2_pc_sym", 1, 9, 9, 16, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, "pc_sym", "rand", False, 101, "normal"),
    ("c3x3_p1_s2_pt_zp", 1, 10, 10, 8, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, "pt_zp", "rand", False, None, "normal"),
    ("c3x3_p0_s1_pc_zp_full", 1, 7, 6, 8, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1, "pc_zp", "rand", False, 0, "full"),
    ("c3x3_p1_s1_pt_sym_nobias_full", 1, 6, 6, 32, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pt_sym", "none", False, 0, "full"),
    ("c5x5_p2_s1_pc_sym", 1, 8, 8, 4, 8, (5, 5), (1, 1), (2, 2), (1, 1), 1, "pc_sym", "rand", False, 64, "normal"),
    ("c5x5_p0_s2_pt_sym", 1, 11, 9, 3, 5, (5, 5), (2, 2), (0, 0), (1, 1), 1, "pt_sym", "rand", False, 7, "normal"),
    ("c7x7_s2_p3_c3_pc_sym", 1, 16, 16, 3, 8, (7, 7), (2, 2), (3, 3), (1, 1), 1, "pc_sym", "rand", False, 128, "normal"),
    ("c7x7_s2_p3_c3_pt_zp_relu", 1, 15, 13, 3, 16, (7, 7), (2, 2), (3, 3), (1, 1), 1, "pt_zp", "rand", True, 0, "normal"),
    ("dil2_3x3_p2_pc_sym", 1, 9, 9, 8, 8, (3, 3), (1, 1), (2, 2), (2, 2), 1, "pc_sym", "rand", False, 11, "normal"),
    ("dil2_3x3_p0_s2_pt_sym_relu", 1, 11, 10, 6, 4, (3, 3), (2, 2), (0, 0), (2, 2), 1, "pt_sym", "rand", True, 90, "normal"),
    ("grp2_3x3_p1_cpg4_pc_sym", 1, 8, 8, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 2, "pc_sym", "rand", False, 0, "normal"),
    ("grp4_3x3_p1_cpg4_pt_sym_relu", 1, 7, 7, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 4, "pt_sym", "rand", True, 21, "normal"),
    ("grp4_3x3_p1_s2_cpg8_pc_zp", 1, 9, 9, 32, 32, (3, 3), (2, 2), (1, 1), (1, 1), 4, "pc_zp", "rand", False, None, "normal"),
    ("grp2_3x3_p1_cpg5_pt_zp", 1, 6, 7, 10, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, "pt_zp", "rand", False, 9, "normal"),
    ("grp2_1x1_pc_sym", 1, 5, 5, 6, 10, (1, 1), (1, 1), (0, 0), (1, 1), 2, "pc_sym", "rand", False, 0, "normal"),
    ("grp4_3x3_p1_cpg2_pt_sym_full", 1, 6, 6, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 4, "pt_sym", "rand", False, 0, "full"),
    ("grp8_3x3_p1_cpg4_pc_sym_full", 1, 6, 6, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 8, "pc_sym", "rand", False, 0, "full"),
    ("grp16_3x3_p1_cpg2_pt_zp_full", 1, 5, 6, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 16, "pt_zp", "rand", False, 0, "full"),
    ("dw3x3_s1_c8_pc_sym", 1, 8, 8, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8, "pc_sym", "rand", False, 0, "normal"),
    ("dw3x3_s1_c13_pt_sym", 1, 7, 9, 13, 13, (3, 3), (1, 1), (1, 1), (1, 1), 13, "pt_sym", "rand", False, 40, "normal"),
    ("dw3x3_s2_c32_pc_sym_relu", 1, 9, 9, 32, 32, (3, 3), (2, 2), (1, 1), (1, 1), 32, "pc_sym", "rand", True, 0, "normal"),
    ("dw3x3_s2_c13_pc_zp", 1, 8, 7, 13, 13, (3, 3), (2, 2), (1, 1), (1, 1), 13, "pc_zp", "rand", False, None, "normal"),
    ("dw3x3_s1_c32_pt_sym_full", 1, 6, 6, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 32, "pt_sym", "rand", False, 0, "full"),
    ("dw3x3_s2_c16_pc_zp_full", 1, 7, 8, 16, 16, (3, 3), (2, 2), (1, 1), (1, 1), 16, "pc_zp", "rand", False, 200, "full"),
    ("dw3x3_s1_c8_pt_zp_relu", 1, 6, 5, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8, "pt_zp", "rand", True, 5, "normal"),
    ("dw5x5_p2_s1_c16_pc_sym", 1, 8, 8, 16, 16, (5, 5), (1, 1), (2, 2), (1, 1), 16, "pc_sym", "rand", False, 3, "normal"),
    ("dw3x3_s1_c8_mult2_pc_sym_full", 1, 6, 6, 8, 16, (3, 3), (1, 1), (1, 1), (1, 1), 8, "pc_sym", "rand", False, 0, "full"),
    ("odd5x7_3x3_p1_pt_sym", 1, 5, 7, 5, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pt_sym", "rand", False, 1, "normal"),
    ("in1x1_3x3_p1_pc_sym", 1, 1, 1, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pc_sym", "rand", False, 0, "normal"),
    ("in3x3_3x3_p0_pc_sym_relu", 1, 3, 3, 16, 8, (3, 3), (1, 1), (0, 0), (1, 1), 1, "pc_sym", "rand", True, 12, "normal"),
    ("batch2_3x3_p1_pc_sym_relu", 2, 6, 5, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pc_sym", "rand", True, 0, "normal"),
    ("batch2_dw3x3_s1_c16_pt_sym", 2, 5, 6, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 16, "pt_sym", "rand", False, 77, "normal"),
    ("aniso_3x1_s21_p10_pc_sym", 1, 9, 6, 8, 8, (3, 1), (2, 1), (1, 0), (1, 1), 1, "pc_sym", "rand", False, 0, "normal"),
    ("c3x3_p1_s1_pt_sym_bias_probe", 1, 5, 5, 8, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pt_sym", "probe", False, 3, "normal"),
    ("c3x3_p1_s1_pc_sym_bias_probe", 1, 5, 5, 8, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pc_sym", "probe", False, 3, "normal"),
    ("pw1x1_s1_pt_zp_bias_probe", 1, 4, 4, 16, 32, (1, 1), (1, 1), (0, 0), (1, 1), 1, "pt_zp", "probe", False, 130, "normal"),
    ("dw3x3_s1_c32_pt_sym_bias_probe", 1, 4, 4, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 32, "pt_sym", "probe", False, 0, "normal"),
    ("dw3x3_s1_c32_pt_zp_bias_probe", 1, 4, 4, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 32, "pt_zp", "probe", False, 9, "normal"),
    ("dw3x3_s2_c32_pc_sym_bias_probe", 1, 5, 5, 32, 32, (3, 3), (2, 2), (1, 1), (1, 1), 32, "pc_sym", "probe", False, 0, "normal"),
    ("grp8_3x3_p1_cpg4_pt_sym_bias_probe", 1, 4, 4, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 8, "pt_sym", "probe", False, 0, "normal"),
    ("grp16_3x3_p1_cpg2_pc_zp_bias_probe", 1, 4, 4, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 16, "pc_zp", "probe", False, 1, "normal"),
]


def finish_case(kind, rng, p, bias_kind):
    """Adds bias and output qparams to a case holding x, w, acc, ... ."""
    oc = p["acc"].shape[-1]
    bias = gen_bias(rng, oc, p["acc"], p["x_scale"], p["w_scales"]) if bias_kind != "none" else None
    p["y_scale"], p["y_zp"] = pick_y_qparams(rng, p["acc"], p["x_scale"], p["w_scales"], bias, p["relu"])
    if bias_kind == "probe":
        first = p["acc"].reshape(-1, oc)[0]
        if kind == "conv" and fbgemm_depthwise_path(p):
            first = first + depthwise_saturation_delta(p).reshape(-1, oc)[0]
        prefer = "div" if not per_tensor(p) else (
            "rcp" if kind == "conv" and fbgemm_depthwise_path(p) else "rcp_fma")
        if prefer == "div":
            prefer = "rcp_fma"  # per-channel: make the per-tensor variants differ instead
        bias, p["probe_found"] = probe_biases(rng, first, p["x_scale"], p["w_scales"], p["y_scale"],
                                              p["y_zp"], p["relu"], prefer)
    p["bias"] = bias
    return p


def make_linear_case(spec):
    name, m, k, n, wq, bias_kind, relu, x_zp, dist = spec
    rng = case_rng("linear/" + name)
    x_scale, x_zp = pick_x_qparams(rng, x_zp)
    w_scales, w_zps = gen_wq(rng, n, wq)
    x = gen_x(rng, (m, k), dist)
    w = gen_w(rng, (n, k), dist, w_zps)
    p = dict(name=name, m=m, k=k, n=n, x_scale=x_scale, x_zp=x_zp, x=x, w=w,
             w_scales=w_scales, w_zps=w_zps, relu=relu, acc=linear_acc(x, x_zp, w, w_zps))
    return finish_case("linear", rng, p, bias_kind)


def make_conv_case(spec):
    (name, n, h, wd, c, oc, (kh, kw), stride, padding, dilation, groups,
     wq, bias_kind, relu, x_zp, dist) = spec
    rng = case_rng("conv/" + name)
    x_scale, x_zp = pick_x_qparams(rng, x_zp)
    w_scales, w_zps = gen_wq(rng, oc, wq)
    x = gen_x(rng, (n, h, wd, c), dist)
    w = gen_w(rng, (oc, kh, kw, c // groups), dist, w_zps)
    acc, oh, ow = conv_acc(x, x_zp, w, w_zps, stride, padding, dilation, groups)
    p = dict(name=name, n=n, h=h, w_=wd, c=c, x_scale=x_scale, x_zp=x_zp, x=x, oc=oc, kh=kh, kw=kw,
             stride=list(stride), padding=list(padding), dilation=list(dilation), groups=groups,
             w=w, w_scales=w_scales, w_zps=w_zps, relu=relu, oh=oh, ow=ow, acc=acc)
    return finish_case("conv", rng, p, bias_kind)


MAKERS = {"linear": make_linear_case, "conv": make_conv_case}


def random_specs(kind, count, seed):
    """Random shapes for --stress (not written to the fixtures)."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(count):
        wq = str(rng.choice(["pt_sym", "pt_zp", "pc_sym", "pc_zp"]))
        bias = str(rng.choice(["probe", "probe", "rand", "none"]))
        relu = bool(rng.random() < 0.3)
        dist = str(rng.choice(["normal", "full"]))
        x_zp = None if rng.random() < 0.7 else 0
        if kind == "linear":
            m = int(rng.choice([1, 2, 5, 17, 40]))
            k = int(rng.integers(1, 300))
            n = int(rng.choice([2, 3, 8, 16, 31, 33, 64, 96]))
            specs.append((f"stress{i}", m, k, n, wq, bias, relu, x_zp, dist))
            continue
        t = str(rng.choice(["im2col", "pointwise", "depthwise", "groupwise", "dilated"]))
        h, w = int(rng.integers(3, 10)), int(rng.integers(3, 10))
        s = int(rng.choice([1, 2]))
        if t == "depthwise":
            c = int(rng.choice([8, 16, 32, 48]))
            k = int(rng.choice([3, 5, 7]))
            oc = c * int(rng.choice([1, 2]))
            spec = ((k, k), (s, s), (k // 2, k // 2), (1, 1), c, oc, c)
        elif t == "groupwise":
            cpg = int(rng.choice([2, 4, 8, 16]))
            g = int(rng.choice([2, 4, 8, 16]))
            spec = ((3, 3), (1, 1), (1, 1), (1, 1), cpg * g, cpg * g, g)
        elif t == "pointwise":
            c, oc = int(rng.integers(1, 40)), int(rng.integers(2, 40))
            spec = ((1, 1), (s, s), (0, 0), (1, 1), c, oc, 1)
        elif t == "dilated":
            c, oc = int(rng.integers(1, 20)), int(rng.integers(2, 20))
            spec = ((3, 3), (s, s), (2, 2), (2, 2), c, oc, 1)
        else:
            c, oc = int(rng.integers(1, 20)), int(rng.integers(2, 40))
            k = int(rng.choice([2, 3, 5]))
            spec = ((k, k), (s, s), (k // 2, k // 2), (1, 1), c, oc, 1)
        (kk, ss, pp, dd, c, oc, g) = spec
        n = int(rng.choice([1, 2]))
        specs.append((f"stress{i}_{t}", n, h, w, c, oc, kk, ss, pp, dd, g, wq, bias, relu, x_zp, dist))
    return specs


# --------------------------------------------------------------------------
# checks


def ndiff(a, b):
    d = np.abs(a - b)
    return int((d != 0).sum()), int(d.max()) if d.size else 0


def run_all(kind, cases):
    return {e: [RUNNERS[kind](e, p) for p in cases] for e in CHECK_ENGINES}


def check(kind, cases, results, verbose=True, title=None):
    """Per engine: match against the plain formula and against the engine model."""
    ok = True
    print(f"\n=== {title or kind}: {len(cases)} cases, {sum(r.size for r in results[FIXTURE_ENGINE])} output elements ===")
    for eng in CHECK_ENGINES:
        tot = bad_f = bad_m = maxd_f = maxd_m = 0
        rows = []
        for p, y in zip(cases, results[eng]):
            nf, df = ndiff(y, exact_formula(p))
            nm, dm = ndiff(y, MODELS[eng](kind, p))
            tot += y.size
            bad_f += nf
            bad_m += nm
            maxd_f, maxd_m = max(maxd_f, df), max(maxd_m, dm)
            if nf or nm:
                rows.append(f"    {p['name']:38s} [{kernel_label(kind, p)}] formula: {nf}/{y.size} differ "
                            f"(max {df} LSB); model: {nm} differ")
        if eng == FIXTURE_ENGINE:
            ok &= bad_m == 0
        print(f"  engine {eng}: plain formula (3.1, exact acc, f32 div): {100.0 * (tot - bad_f) / tot:.3f}% "
              f"identical ({bad_f}/{tot} differ, max {maxd_f} LSB); engine model: "
              f"{100.0 * (tot - bad_m) / tot:.3f}% identical ({bad_m} differ, max {maxd_m} LSB)")
        if verbose:
            for r in rows:
                print(r)
    diffs = [(p, *ndiff(a, b)) for p, a, b in zip(cases, results["fbgemm"], results["x86"])]
    diffs = [d for d in diffs if d[1]]
    print(f"  x86 vs fbgemm: {len(diffs)} case(s) differ")
    if verbose:
        for p, nd, md in diffs:
            print(f"    {p['name']:38s} [{kernel_label(kind, p)}] {nd}/{p['acc'].size} differ, max {md} LSB")
    probes = [p for p in cases if "probe_found" in p]
    if probes and verbose:
        print("  bias probes (channels where the variants disagree on row/pixel 0): "
              + ", ".join(f"{p['name']} {p['probe_found']}/{p['acc'].shape[-1]}" for p in probes))
    return ok


def spread_report(kind, cases, results):
    print(f"\n--- {kind}: output spread ({FIXTURE_ENGINE}) ---")
    for p, y in zip(cases, results[FIXTURE_ENGINE]):
        lo = int(p["y_zp"]) if p["relu"] else 0
        print(f"  {p['name']:38s} min {int(y.min()):3d} max {int(y.max()):3d} "
              f"at_low {100.0 * np.mean(y == lo):5.1f}% at_255 {100.0 * np.mean(y == 255):5.1f}% "
              f"distinct {len(np.unique(y))}")


# --------------------------------------------------------------------------
# fixture records


def common_tail(p):
    return {
        "w_scales": f32_bits(p["w_scales"]), "w_zps": ints(p["w_zps"]),
        "bias": None if p["bias"] is None else f32_bits(p["bias"]),
        "y_scale": f32_bits([p["y_scale"]])[0], "y_zp": int(p["y_zp"]), "relu": bool(p["relu"]),
    }


def linear_record(p, y, y86):
    rec = {"name": p["name"], "m": p["m"], "k": p["k"], "n": p["n"],
           "x_scale": f32_bits([p["x_scale"]])[0], "x_zp": int(p["x_zp"]), "x": ints(p["x"]),
           "w": ints(p["w"])}
    rec.update(common_tail(p))
    rec["y"] = ints(y)
    if not np.array_equal(y, y86):
        rec["engine_x86_y"] = ints(y86)
    return rec


def conv_record(p, y, y86):
    rec = {"name": p["name"], "n": p["n"], "h": p["h"], "w": p["w_"], "c": p["c"],
           "x_scale": f32_bits([p["x_scale"]])[0], "x_zp": int(p["x_zp"]), "x": ints(p["x"]),
           "oc": p["oc"], "kh": p["kh"], "kw": p["kw"], "stride": p["stride"],
           "padding": p["padding"], "dilation": p["dilation"], "groups": p["groups"],
           "weight": ints(p["w"])}
    rec.update(common_tail(p))
    rec.update({"oh": p["oh"], "ow": p["ow"], "y": ints(y)})
    if not np.array_equal(y, y86):
        rec["engine_x86_y"] = ints(y86)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true", help="only run the checks")
    ap.add_argument("--spread", action="store_true", help="print the output spread per case")
    ap.add_argument("--stress", type=int, default=0, metavar="N",
                    help="also check N random linear and N random conv shapes (not written)")
    ap.add_argument("--verbose-stress", action="store_true", help="list every differing stress case")
    args = ap.parse_args()

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, engines "
          f"{torch.backends.quantized.supported_engines}")

    tables = {"linear": LINEAR_SPECS, "conv": CONV_SPECS}
    cases = {k: [MAKERS[k](s) for s in specs] for k, specs in tables.items()}
    results = {k: run_all(k, cases[k]) for k in cases}
    ok = all([check(k, cases[k], results[k]) for k in cases])
    if args.spread:
        for k in cases:
            spread_report(k, cases[k], results[k])
    if args.stress:
        for k in ("linear", "conv"):
            sc = [MAKERS[k](s) for s in random_specs(k, args.stress, 2024 if k == "linear" else 2025)]
            ok &= check(k, sc, run_all(k, sc), verbose=args.verbose_stress, title=k + " (stress)")
    torch.backends.quantized.engine = FIXTURE_ENGINE
    print(f"\n{FIXTURE_ENGINE} model bit-exact on every element" if ok
          else f"\n{FIXTURE_ENGINE.upper()} MODEL MISMATCHES (see above)")

    if args.no_write:
        return 0
    os.makedirs(OUT_DIR, exist_ok=True)
    head = {"torch_version": torch.__version__, "engine": FIXTURE_ENGINE}
    files = {"qlinear.json": ("linear", linear_record), "qconv.json": ("conv", conv_record)}
    for fname, (k, rec) in files.items():
        recs = [rec(p, y, y86) for p, y, y86 in zip(cases[k], results[k]["fbgemm"], results[k]["x86"])]
        path = os.path.join(OUT_DIR, fname)
        write_json(path, dict(head, cases=recs))
        print(f"wrote {os.path.relpath(path)}: {len(recs)} cases, {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
