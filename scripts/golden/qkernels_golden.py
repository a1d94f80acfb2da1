#!/usr/bin/env python3
"""Golden fixtures for the `qkernels` crate: quantized linear and conv2d, from real PyTorch.

DOCSTRING_FINDINGS_PLACEHOLDER
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


# --------------------------------------------------------------------------
# encoding helpers


def f32_bits(values):
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float32)).reshape(-1)
    return [int(v) for v in arr.view(np.uint32)]


def ints(values):
    return [int(v) for v in np.asarray(values).reshape(-1)]


def write_json(path, top):
    """Top-level keys one per line, then one case per line (diffable)."""
    head = {k: v for k, v in top.items() if k != "cases"}
    lines = ["{"]
    for key, value in head.items():
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
    """Each case gets its own generator, seeded from its name: adding or
    reordering cases does not change the data of the others."""
    return np.random.default_rng(zlib.crc32(name.encode()) + 12345)


# --------------------------------------------------------------------------
# exact numpy reference (pytorch_quant.md section 3.1)


def requant_ref(acc, x_scale, w_scales, bias, y_scale, y_zp, relu, bias_mode="div", rcp_cols=None):
    """acc: int64 array [..., OC]; per-channel parameters broadcast on the last axis.

    bias_mode "div": raw_f = f32(acc) + bias[j] / ats[j]            (f32 division)
    bias_mode "rcp": raw_f = f32(acc) + bias[j] * f32(1.0 / f64(ats[j]))
    rcp_cols: optional boolean mask over OC; where True use "rcp", else "div"
    (overrides bias_mode).
    """
    oc = acc.shape[-1]
    assert np.all(np.abs(acc) < 2**31), "accumulator does not fit in i32"
    ws = np.asarray(w_scales, dtype=F32)
    if ws.size == 1:
        ws = np.full(oc, ws[0], dtype=F32)
    ats = (F32(x_scale) * ws).astype(F32)  # f32 product
    mult = (ats / F32(y_scale)).astype(F32)  # f32 division
    raw_f = acc.astype(F32)  # cvtepi32_ps (RNE)
    if bias is not None:
        b = np.asarray(bias, dtype=F32)
        b_div = (b / ats).astype(F32)
        b_rcp = (b * (1.0 / ats.astype(np.float64)).astype(F32)).astype(F32)
        if rcp_cols is not None:
            bterm = np.where(rcp_cols, b_rcp, b_div).astype(F32)
        else:
            bterm = b_rcp if bias_mode == "rcp" else b_div
        raw_f = (raw_f + bterm).astype(F32)
    prod = (raw_f * mult).astype(F32)
    out = np.rint(prod).astype(np.int64) + int(y_zp)  # rint: half to even
    lo = int(y_zp) if relu else 0
    return np.clip(out, lo, 255).astype(np.int64)


def linear_acc(x, x_zp, w, w_zps):
    """x [M,K] u8, w [N,K] i8 -> int64 [M,N] of sum (x - x_zp)(w - w_zp)."""
    n = w.shape[0]
    wz = np.broadcast_to(np.asarray(w_zps, dtype=np.int64), (n,))
    xa = x.astype(np.int64) - int(x_zp)
    wa = w.astype(np.int64) - wz[:, None]
    return xa @ wa.T


def conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_acc(x, x_zp, w, w_zps, stride, padding, dilation, groups):
    """x NHWC u8, w OHWI i8 (I = C/groups) -> int64 NHWC output accumulator.
    Padding contributes (x_zp - x_zp) = 0, i.e. a real zero."""
    n, h, wd, c = x.shape
    oc, kh, kw, cg = w.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    assert cg * groups == c and oc % groups == 0
    ocg = oc // groups
    oh = conv_out_size(h, kh, sh, ph, dh)
    ow = conv_out_size(wd, kw, sw, pw, dw)
    xa = np.zeros((n, h + 2 * ph, wd + 2 * pw, c), dtype=np.int64)
    xa[:, ph : ph + h, pw : pw + wd, :] = x.astype(np.int64) - int(x_zp)
    wz = np.broadcast_to(np.asarray(w_zps, dtype=np.int64), (oc,))
    wa = w.astype(np.int64) - wz[:, None, None, None]
    acc = np.zeros((n, oh, ow, oc), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            patch = xa[:, r0 : r0 + (oh - 1) * sh + 1 : sh, c0 : c0 + (ow - 1) * sw + 1 : sw, :]
            for g in range(groups):
                xs = patch[..., g * cg : (g + 1) * cg]  # n,oh,ow,cg
                ws = wa[g * ocg : (g + 1) * ocg, i, j, :]  # ocg,cg
                acc[..., g * ocg : (g + 1) * ocg] += np.tensordot(xs, ws, axes=([3], [1]))
    return acc, oh, ow


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


def torch_linear(engine, p):
    """p: dict with numpy arrays. Returns y [M,N] uint8 as int64 array."""
    torch.backends.quantized.engine = engine
    qx = q_input(p["x"], p["x_scale"], p["x_zp"])
    qw = q_weight(p["w"], p["w_scales"], p["w_zps"])
    b = None if p["bias"] is None else torch.from_numpy(p["bias"].astype(np.float32))
    packed = torch.ops.quantized.linear_prepack(qw, b)
    op = torch.ops.quantized.linear_relu if p["relu"] else torch.ops.quantized.linear
    y = op(qx, packed, float(p["y_scale"]), int(p["y_zp"]))
    assert y.dtype == torch.quint8 and y.q_zero_point() == int(p["y_zp"])
    assert F32(y.q_scale()) == F32(p["y_scale"])
    return y.int_repr().numpy().astype(np.int64)


def torch_conv(engine, p):
    """Input/outputs in NHWC / OHWI; PyTorch sees NCHW / [OC, C/g, KH, KW]."""
    torch.backends.quantized.engine = engine
    x_nchw = np.ascontiguousarray(p["x"].transpose(0, 3, 1, 2))
    qx = q_input(x_nchw, p["x_scale"], p["x_zp"])
    w_oihw = np.ascontiguousarray(p["w"].transpose(0, 3, 1, 2))
    qw = q_weight(w_oihw, p["w_scales"], p["w_zps"])
    b = None if p["bias"] is None else torch.from_numpy(p["bias"].astype(np.float32))
    packed = torch.ops.quantized.conv2d_prepack(
        qw, b, list(p["stride"]), list(p["padding"]), list(p["dilation"]), int(p["groups"])
    )
    op = torch.ops.quantized.conv2d_relu if p["relu"] else torch.ops.quantized.conv2d
    y = op(qx, packed, float(p["y_scale"]), int(p["y_zp"]))
    assert y.dtype == torch.quint8 and y.q_zero_point() == int(p["y_zp"])
    return y.int_repr().permute(0, 2, 3, 1).contiguous().numpy().astype(np.int64)


# --------------------------------------------------------------------------
# case generation


def gen_x(rng, shape, dist):
    if dist == "full":  # uniform over all of u8 (stresses pair saturation)
        return rng.integers(0, 256, size=shape, dtype=np.int64)
    if dist == "low":  # 7-bit activations, like reduce_range calibrations
        return rng.integers(0, 128, size=shape, dtype=np.int64)
    # "normal": bell around a random centre
    c = rng.integers(60, 196)
    return np.clip(np.rint(rng.normal(c, 45, size=shape)), 0, 255).astype(np.int64)


def gen_w(rng, shape, dist, zps):
    """Weights for output channel o are centred on zps[o]; stored values stay in i8."""
    oc = shape[0]
    z = np.broadcast_to(np.asarray(zps, dtype=np.int64), (oc,)).reshape((oc,) + (1,) * (len(shape) - 1))
    if dist == "full":
        w = rng.integers(-128, 128, size=shape, dtype=np.int64)
    else:
        w = np.rint(rng.normal(0, 40, size=shape)).astype(np.int64) + z
    return np.clip(w, -128, 127)


def gen_wq(rng, oc, wq):
    """wq in {pt_sym, pt_zp, pc_sym, pc_zp}: per-tensor / per-channel, symmetric / with zero points."""
    if wq.startswith("pt"):
        scales = [F32(rng.uniform(0.002, 0.02))]
        zps = [0] if wq == "pt_sym" else [int(rng.choice([-7, 3, 5, 11, -1]))]
    else:
        scales = [F32(v) for v in rng.uniform(0.001, 0.03, size=oc)]
        if wq == "pc_sym":
            zps = [0] * oc
        else:
            zps = [int(v) for v in rng.integers(-9, 10, size=oc)]
            zps[0] = 0
            if oc > 1:
                zps[1] = 3
    return scales, zps


def pick_x_qparams(rng, x_zp):
    x_scale = F32(rng.uniform(0.004, 0.04))
    if x_zp is None:
        x_zp = int(rng.integers(0, 256))
    return x_scale, int(x_zp)


def pick_y_qparams(rng, acc, x_scale, w_scales, bias, relu, y_zp=None):
    """Choose (y_scale, y_zp) so the outputs cover most of u8 with a few saturated."""
    oc = acc.shape[-1]
    ws = np.broadcast_to(np.asarray(w_scales, dtype=np.float64), (oc,))
    real = acc.astype(np.float64) * (float(x_scale) * ws)
    if bias is not None:
        real = real + np.asarray(bias, dtype=np.float64)
    lo, hi = np.percentile(real, 2), np.percentile(real, 98)
    if hi - lo <= 1e-6:
        lo, hi = real.min() - 1.0, real.max() + 1.0
    if relu and lo < 0 < hi and y_zp is None:
        # keep some room below zero so the ReLU clamp at y_zp is visible
        lo = max(lo, -0.4 * hi)
    y_scale = F32((hi - lo) / 250.0 * rng.uniform(0.9, 1.1))
    if y_zp is None:
        y_zp = int(np.clip(np.rint(-lo / float(y_scale)), 0, 255))
    return y_scale, int(y_zp)


def gen_bias(rng, oc, acc, x_scale, w_scales):
    ws = np.broadcast_to(np.asarray(w_scales, dtype=np.float64), (oc,))
    spread = np.std(acc.astype(np.float64)) + 1.0
    return (rng.normal(0, 1.0, size=oc) * spread * float(x_scale) * ws).astype(F32)


# name, m, k, n, weight quant, bias, relu, x_zp (None = random), x dist, w dist
LINEAR_SPECS = [
    ("m1_k1_n1_pt_sym", 1, 1, 1, "pt_sym", True, False, 0, "normal", "normal"),
    ("m1_k3_n5_pc_sym", 1, 3, 5, "pc_sym", True, False, 7, "normal", "normal"),
    ("m1_k7_n16_pt_zp", 1, 7, 16, "pt_zp", False, False, None, "normal", "normal"),
    ("m1_k257_n64_pc_sym_relu", 1, 257, 64, "pc_sym", True, True, 128, "normal", "normal"),
    ("m3_k1_n31_pc_zp", 3, 1, 31, "pc_zp", True, False, 1, "full", "full"),
    ("m3_k3_n1_pt_sym_relu", 3, 3, 1, "pt_sym", True, True, 255, "normal", "normal"),
    ("m3_k16_n16_pt_sym", 3, 16, 16, "pt_sym", True, False, 0, "normal", "normal"),
    ("m3_k33_n5_pt_zp_relu", 3, 33, 5, "pt_zp", True, True, 33, "normal", "normal"),
    ("m3_k64_n64_pc_zp", 3, 64, 64, "pc_zp", True, False, None, "normal", "normal"),
    ("m3_k100_n31_pc_sym_nobias", 3, 100, 31, "pc_sym", False, False, 77, "normal", "normal"),
    ("m17_k1_n5_pt_sym_relu", 17, 1, 5, "pt_sym", True, True, 0, "full", "full"),
    ("m17_k3_n64_pc_sym", 17, 3, 64, "pc_sym", True, False, 129, "normal", "normal"),
    ("m17_k7_n31_pt_sym", 17, 7, 31, "pt_sym", True, False, 5, "normal", "normal"),
    ("m17_k16_n1_pc_zp_relu", 17, 16, 1, "pc_zp", True, True, None, "normal", "normal"),
    ("m17_k33_n16_pc_sym_full", 17, 33, 16, "pc_sym", True, False, 0, "full", "full"),
    ("m17_k64_n5_pt_zp_nobias", 17, 64, 5, "pt_zp", False, False, 251, "normal", "normal"),
    ("m17_k100_n64_pt_sym", 17, 100, 64, "pt_sym", True, False, 64, "normal", "normal"),
    ("m17_k257_n31_pc_zp", 17, 257, 31, "pc_zp", True, False, 3, "normal", "normal"),
    ("m17_k257_n16_pt_sym_full_relu", 17, 257, 16, "pt_sym", True, True, 0, "full", "full"),
    ("m64_k1_n16_pc_sym", 64, 1, 16, "pc_sym", True, False, 13, "normal", "normal"),
    ("m64_k3_n31_pt_zp", 64, 3, 31, "pt_zp", True, False, None, "normal", "normal"),
    ("m64_k7_n64_pc_zp_relu", 64, 7, 64, "pc_zp", True, True, 100, "normal", "normal"),
    ("m64_k16_n5_pc_sym_nobias", 64, 16, 5, "pc_sym", False, False, 0, "low", "normal"),
    ("m64_k33_n64_pt_sym", 64, 33, 64, "pt_sym", True, False, 9, "normal", "normal"),
    ("m64_k64_n64_pc_sym_relu", 64, 64, 64, "pc_sym", True, True, 0, "low", "normal"),
    ("m64_k100_n16_pt_sym_nobias", 64, 100, 16, "pt_sym", False, False, 200, "normal", "normal"),
    ("m64_k257_n5_pc_zp", 64, 257, 5, "pc_zp", True, False, 57, "full", "full"),
    ("m64_k257_n64_pc_sym", 64, 257, 64, "pc_sym", True, False, 117, "normal", "normal"),
    ("m3_k257_n1_pt_zp", 3, 257, 1, "pt_zp", True, False, 0, "full", "full"),
    ("m1_k100_n31_pt_sym_relu", 1, 100, 31, "pt_sym", True, True, 71, "normal", "normal"),
    ("m64_k64_n31_pt_sym_full", 64, 64, 31, "pt_sym", True, False, 128, "full", "full"),
    ("m17_k100_n64_pc_sym_full_relu", 17, 100, 64, "pc_sym", True, True, 0, "full", "full"),
]


def make_linear_case(spec):
    name, m, k, n, wq, has_bias, relu, x_zp, xd, wd = spec
    rng = case_rng("linear/" + name)
    x_scale, x_zp = pick_x_qparams(rng, x_zp)
    w_scales, w_zps = gen_wq(rng, n, wq)
    x = gen_x(rng, (m, k), xd)
    w = gen_w(rng, (n, k), wd, w_zps)
    acc = linear_acc(x, x_zp, w, w_zps)
    bias = gen_bias(rng, n, acc, x_scale, w_scales) if has_bias else None
    y_scale, y_zp = pick_y_qparams(rng, acc, x_scale, w_scales, bias, relu)
    return dict(
        name=name, m=m, k=k, n=n, x_scale=x_scale, x_zp=x_zp, x=x, w=w,
        w_scales=w_scales, w_zps=w_zps, bias=bias, y_scale=y_scale, y_zp=y_zp,
        relu=relu, acc=acc,
    )


# name, n, h, w, c, oc, (kh, kw), stride, padding, dilation, groups, wq, bias, relu, x_zp, dist
CONV_SPECS = [
    ("pw1x1_s1_pt_sym", 1, 8, 8, 16, 8, (1, 1), (1, 1), (0, 0), (1, 1), 1, "pt_sym", True, False, 0, "normal"),
    ("pw1x1_s2_pc_sym", 1, 9, 9, 8, 16, (1, 1), (2, 2), (0, 0), (1, 1), 1, "pc_sym", True, False, 17, "normal"),
    ("pw1x1_s1_pc_zp_relu", 1, 5, 6, 13, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, "pc_zp", True, True, None, "normal"),
    ("pw1x1_s2_pt_zp_nobias", 2, 7, 7, 24, 12, (1, 1), (2, 2), (0, 0), (1, 1), 1, "pt_zp", False, False, 3, "normal"),
    ("c3x3_p1_s1_pt_sym", 1, 8, 8, 8, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pt_sym", True, False, 5, "normal"),
    ("c3x3_p1_s1_pc_sym_relu", 1, 8, 8, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pc_sym", True, True, 0, "normal"),
    ("c3x3_p1_s2_pc_sym", 1, 9, 9, 16, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, "pc_sym", True, False, 101, "normal"),
    ("c3x3_p1_s2_pt_zp", 1, 10, 10, 8, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, "pt_zp", True, False, None, "normal"),
    ("c3x3_p0_s1_pc_zp_full", 1, 7, 6, 8, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1, "pc_zp", True, False, 0, "full"),
    ("c3x3_p1_s1_pt_sym_full_nobias", 1, 6, 6, 32, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pt_sym", False, False, 0, "full"),
    ("c5x5_p2_s1_pc_sym", 1, 8, 8, 4, 8, (5, 5), (1, 1), (2, 2), (1, 1), 1, "pc_sym", True, False, 64, "normal"),
    ("c5x5_p0_s2_pt_sym", 1, 11, 9, 3, 5, (5, 5), (2, 2), (0, 0), (1, 1), 1, "pt_sym", True, False, 7, "normal"),
    ("c7x7_s2_p3_c3_pc_sym", 1, 16, 16, 3, 8, (7, 7), (2, 2), (3, 3), (1, 1), 1, "pc_sym", True, False, 128, "normal"),
    ("c7x7_s2_p3_c3_pt_zp_relu", 1, 15, 13, 3, 16, (7, 7), (2, 2), (3, 3), (1, 1), 1, "pt_zp", True, True, 0, "normal"),
    ("dil2_3x3_p2_pc_sym", 1, 9, 9, 8, 8, (3, 3), (1, 1), (2, 2), (2, 2), 1, "pc_sym", True, False, 11, "normal"),
    ("dil2_3x3_p0_s2_pt_sym_relu", 1, 11, 10, 6, 4, (3, 3), (2, 2), (0, 0), (2, 2), 1, "pt_sym", True, True, 90, "normal"),
    ("grp2_3x3_p1_cpg4_pc_sym", 1, 8, 8, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 2, "pc_sym", True, False, 0, "normal"),
    ("grp4_3x3_p1_cpg4_pt_sym_relu", 1, 7, 7, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 4, "pt_sym", True, True, 21, "normal"),
    ("grp4_3x3_p1_s2_cpg8_pc_zp", 1, 9, 9, 32, 32, (3, 3), (2, 2), (1, 1), (1, 1), 4, "pc_zp", True, False, None, "normal"),
    ("grp2_3x3_p1_cpg5_pt_zp", 1, 6, 7, 10, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, "pt_zp", True, False, 9, "normal"),
    ("grp2_1x1_pc_sym", 1, 5, 5, 6, 10, (1, 1), (1, 1), (0, 0), (1, 1), 2, "pc_sym", True, False, 0, "normal"),
    ("grp4_3x3_p1_cpg2_pt_sym_full", 1, 6, 6, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 4, "pt_sym", True, False, 0, "full"),
    ("dw3x3_s1_c8_pc_sym", 1, 8, 8, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8, "pc_sym", True, False, 0, "normal"),
    ("dw3x3_s1_c13_pt_sym", 1, 7, 9, 13, 13, (3, 3), (1, 1), (1, 1), (1, 1), 13, "pt_sym", True, False, 40, "normal"),
    ("dw3x3_s2_c32_pc_sym_relu", 1, 9, 9, 32, 32, (3, 3), (2, 2), (1, 1), (1, 1), 32, "pc_sym", True, True, 0, "normal"),
    ("dw3x3_s2_c13_pc_zp", 1, 8, 7, 13, 13, (3, 3), (2, 2), (1, 1), (1, 1), 13, "pc_zp", True, False, None, "normal"),
    ("dw3x3_s1_c32_pt_sym_full", 1, 6, 6, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 32, "pt_sym", True, False, 0, "full"),
    ("dw3x3_s1_c8_pt_zp_relu", 1, 6, 5, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8, "pt_zp", True, True, 5, "normal"),
    ("dw5x5_p2_s1_c16_pc_sym", 1, 8, 8, 16, 16, (5, 5), (1, 1), (2, 2), (1, 1), 16, "pc_sym", True, False, 3, "normal"),
    ("dw3x3_s1_c8_mult2_pc_sym", 1, 6, 6, 8, 16, (3, 3), (1, 1), (1, 1), (1, 1), 8, "pc_sym", True, False, 0, "normal"),
    ("odd5x7_3x3_p1_pt_sym", 1, 5, 7, 5, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pt_sym", True, False, 1, "normal"),
    ("in1x1_3x3_p1_pc_sym", 1, 1, 1, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pc_sym", True, False, 0, "normal"),
    ("in3x3_3x3_p0_pc_sym_relu", 1, 3, 3, 16, 8, (3, 3), (1, 1), (0, 0), (1, 1), 1, "pc_sym", True, True, 12, "normal"),
    ("batch2_3x3_p1_pc_sym_relu", 2, 6, 5, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "pc_sym", True, True, 0, "normal"),
    ("batch2_dw3x3_s1_c16_pt_sym", 2, 5, 6, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 16, "pt_sym", True, False, 77, "normal"),
    ("aniso_3x1_s21_p10_pc_sym", 1, 9, 6, 8, 8, (3, 1), (2, 1), (1, 0), (1, 1), 1, "pc_sym", True, False, 0, "normal"),
]


def make_conv_case(spec):
    (name, n, h, wd, c, oc, (kh, kw), stride, padding, dilation, groups,
     wq, has_bias, relu, x_zp, dist) = spec
    rng = case_rng("conv/" + name)
    x_scale, x_zp = pick_x_qparams(rng, x_zp)
    w_scales, w_zps = gen_wq(rng, oc, wq)
    x = gen_x(rng, (n, h, wd, c), dist)
    w = gen_w(rng, (oc, kh, kw, c // groups), dist, w_zps)
    acc, oh, ow = conv_acc(x, x_zp, w, w_zps, stride, padding, dilation, groups)
    bias = gen_bias(rng, oc, acc, x_scale, w_scales) if has_bias else None
    y_scale, y_zp = pick_y_qparams(rng, acc, x_scale, w_scales, bias, relu)
    return dict(
        name=name, n=n, h=h, w_=wd, c=c, x_scale=x_scale, x_zp=x_zp, x=x, oc=oc, kh=kh, kw=kw,
        stride=list(stride), padding=list(padding), dilation=list(dilation), groups=groups,
        w=w, w_scales=w_scales, w_zps=w_zps, bias=bias, y_scale=y_scale, y_zp=y_zp,
        relu=relu, oh=oh, ow=ow, acc=acc,
    )


# --------------------------------------------------------------------------
# comparison


def ref_variants(p):
    """Exact formula ("div") and the per-tensor-bias reciprocal variant ("rcp")."""
    args = (p["acc"], p["x_scale"], p["w_scales"], p["bias"], p["y_scale"], p["y_zp"], p["relu"])
    return {"div": requant_ref(*args, bias_mode="div"), "rcp": requant_ref(*args, bias_mode="rcp")}


def diff_stats(a, b):
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return int((d == 0).sum()), int(d.size), int(d.max()) if d.size else 0


def describe(kind, p):
    if kind == "linear":
        return f"m={p['m']} k={p['k']} n={p['n']}"
    return (f"n={p['n']} {p['h']}x{p['w_']}x{p['c']} oc={p['oc']} k={p['kh']}x{p['kw']} "
            f"s={p['stride']} p={p['padding']} d={p['dilation']} g={p['groups']}")


def check(kind, cases, results):
    """results[engine][i] = torch output. Prints per engine summary vs the reference."""
    print(f"\n=== {kind}: {len(cases)} cases ===")
    for eng in CHECK_ENGINES:
        tot = same_div = same_best = 0
        maxd_div = maxd_best = 0
        rows = []
        for p, y in zip(cases, results[eng]):
            refs = ref_variants(p)
            sd, nel, md = diff_stats(y, refs["div"])
            sr, _, mr = diff_stats(y, refs["rcp"])
            tot += nel
            same_div += sd
            maxd_div = max(maxd_div, md)
            pt_bias = len(p["w_scales"]) == 1 and p["bias"] is not None
            # the variant fbgemm is expected to use
            best = "rcp" if pt_bias else "div"
            sb, _, mb = (sr, nel, mr) if best == "rcp" else (sd, nel, md)
            same_best += sb
            maxd_best = max(maxd_best, mb)
            if sd != nel or sr != nel:
                rows.append(f"    {p['name']:36s} {describe(kind, p):60s} "
                            f"div: {nel - sd:4d}/{nel} differ (max {md})  "
                            f"rcp: {nel - sr:4d}/{nel} differ (max {mr})")
        print(f"  engine {eng}: exact formula (f32 div): {100.0 * same_div / tot:.3f}% identical "
              f"({tot - same_div}/{tot} differ, max |diff| {maxd_div} LSB); "
              f"with per-tensor bias reciprocal variant: {100.0 * same_best / tot:.3f}% identical "
              f"(max |diff| {maxd_best} LSB)")
        for r in rows:
            print(r)
    fb, x86 = results["fbgemm"], results["x86"]
    nd = [(p["name"], diff_stats(a, b)) for p, a, b in zip(cases, fb, x86)]
    nd = [(n, s) for n, s in nd if s[0] != s[1]]
    print(f"  x86 vs fbgemm: {len(nd)} case(s) differ")
    for n, (s, t, m) in nd:
        print(f"    {n:36s} {t - s}/{t} elements differ, max {m} LSB")


def saturation_report(kind, cases, results):
    print(f"\n--- {kind}: output spread (fbgemm) ---")
    for p, y in zip(cases, results[FIXTURE_ENGINE]):
        lo = int(p["y_zp"]) if p["relu"] else 0
        print(f"  {p['name']:36s} min {int(y.min()):3d} max {int(y.max()):3d} "
              f"at_low {100.0 * np.mean(y == lo):5.1f}% at_255 {100.0 * np.mean(y == 255):5.1f}% "
              f"distinct {len(np.unique(y))}")


# --------------------------------------------------------------------------
# fixture records


def linear_record(p, y, y86):
    rec = {
        "name": p["name"], "m": p["m"], "k": p["k"], "n": p["n"],
        "x_scale": f32_bits([p["x_scale"]])[0], "x_zp": p["x_zp"], "x": ints(p["x"]),
        "w": ints(p["w"]), "w_scales": f32_bits(p["w_scales"]), "w_zps": ints(p["w_zps"]),
        "bias": None if p["bias"] is None else f32_bits(p["bias"]),
        "y_scale": f32_bits([p["y_scale"]])[0], "y_zp": p["y_zp"], "relu": bool(p["relu"]),
        "y": ints(y),
    }
    if not np.array_equal(y, y86):
        rec["engine_x86_y"] = ints(y86)
    return rec


def conv_record(p, y, y86):
    rec = {
        "name": p["name"], "n": p["n"], "h": p["h"], "w": p["w_"], "c": p["c"],
        "x_scale": f32_bits([p["x_scale"]])[0], "x_zp": p["x_zp"], "x": ints(p["x"]),
        "oc": p["oc"], "kh": p["kh"], "kw": p["kw"], "stride": p["stride"],
        "padding": p["padding"], "dilation": p["dilation"], "groups": p["groups"],
    }
    # "w" is both the input width and the weight tensor in the requested schema;
    # JSON objects cannot hold both, see the note in the module docstring.
    rec["weight"] = ints(p["w"])
    rec.update({
        "w_scales": f32_bits(p["w_scales"]), "w_zps": ints(p["w_zps"]),
        "bias": None if p["bias"] is None else f32_bits(p["bias"]),
        "y_scale": f32_bits([p["y_scale"]])[0], "y_zp": p["y_zp"], "relu": bool(p["relu"]),
        "oh": p["oh"], "ow": p["ow"], "y": ints(y),
    })
    if not np.array_equal(y, y86):
        rec["engine_x86_y"] = ints(y86)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true", help="only run the checks")
    ap.add_argument("--spread", action="store_true", help="print output spread per case")
    args = ap.parse_args()

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, engines "
          f"{torch.backends.quantized.supported_engines}")

    lin = [make_linear_case(s) for s in LINEAR_SPECS]
    conv = [make_conv_case(s) for s in CONV_SPECS]
    lin_res = {e: [torch_linear(e, p) for p in lin] for e in CHECK_ENGINES}
    conv_res = {e: [torch_conv(e, p) for p in conv] for e in CHECK_ENGINES}
    torch.backends.quantized.engine = FIXTURE_ENGINE

    check("linear", lin, lin_res)
    check("conv2d", conv, conv_res)
    if args.spread:
        saturation_report("linear", lin, lin_res)
        saturation_report("conv2d", conv, conv_res)

    if args.no_write:
        return
    os.makedirs(OUT_DIR, exist_ok=True)
    head = {"torch_version": torch.__version__, "engine": FIXTURE_ENGINE}
    write_json(os.path.join(OUT_DIR, "qlinear.json"),
               dict(head, cases=[linear_record(p, y, y86) for p, y, y86 in
                                 zip(lin, lin_res["fbgemm"], lin_res["x86"])]))
    write_json(os.path.join(OUT_DIR, "qconv.json"),
               dict(head, cases=[conv_record(p, y, y86) for p, y, y86 in
                                 zip(conv, conv_res["fbgemm"], conv_res["x86"])]))
    for f in ("qlinear.json", "qconv.json"):
        path = os.path.join(OUT_DIR, f)
        print(f"wrote {os.path.relpath(path)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    sys.exit(main())
