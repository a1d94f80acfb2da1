#!/usr/bin/env python3
"""Golden fixtures for quantized elementwise / activation / pooling / norm ops, from real PyTorch.

Writes ``qkernels/tests/golden/qops.json``.  PyTorch runs with engine "x86" and
one thread (``torch.set_num_threads(1)``).  Every tensor is quint8, 4-D NCHW in
PyTorch and channels_last in memory; in the JSON it is stored in NHWC order with
``"shape_nhwc": [n, h, w, c]`` (outputs are read with
``.int_repr().permute(0, 2, 3, 1).contiguous()``).

PyTorch ops covered (op name in the JSON -> call):

* add / add_relu / mul: ``torch.ops.quantized.add|add_relu|mul(qa, qb, scale, zp)``
* add_scalar / mul_scalar: ``torch.ops.quantized.add_scalar|mul_scalar(qa, c)``
  (output qparams are chosen by PyTorch and recorded)
* cat: ``torch.ops.quantized.cat([qa, qb], 1, scale, zp)`` (channels)
* relu: ``torch.relu``; relu6: ``F.relu6``; hardsigmoid: ``F.hardsigmoid``;
  sigmoid: ``torch.sigmoid``; tanh: ``torch.tanh``; gelu: ``F.gelu``
  (approximate "none" / "tanh"); hardswish: ``torch.ops.quantized.hardswish``;
  leaky_relu: ``torch.ops.quantized.leaky_relu``; elu: ``torch.ops.quantized.elu``
* max_pool2d / avg_pool2d / adaptive_avg_pool2d: ``F.*`` on the quantized tensor
* upsample_nearest2d: ``F.interpolate(q, scale_factor=2 | size=..., mode="nearest")``
* quantize_nchw_to_nhwc: ``torch.quantize_per_tensor(x, s, z, torch.quint8)``
  then ``.contiguous(memory_format=torch.channels_last)``
* dequantize: ``q.dequantize()``
* batch_norm2d: ``torch.ops.quantized.batch_norm2d``
* layer_norm: ``torch.ops.quantized.layer_norm`` over the channel dim of NHWC
  data: the NHWC memory is handed to PyTorch as a contiguous [N, H, W, C]
  quantized tensor with normalized_shape=[C] (a channels_last NCHW tensor can
  only be normalised over its trailing logical dims W / H,W / C,H,W).

Not covered: silu (and mish) have no QuantizedCPU kernel in this build
("Could not run 'aten::silu.out' with arguments from the 'QuantizedCPU'
backend"); ``F.elu`` / ``F.hardswish`` on a quantized tensor fail the same way,
the ``quantized::`` ops (= nnq.ELU / nnq.Hardswish) are used instead.

JSON: top-level ``torch_version``, ``engine``, ``num_threads``,
``cpu_capability`` and ``cases`` (one case per line).  Each case:
``{"name", "op", "params", "inputs": [...], "output": {...}}``; a quantized
tensor is ``{"shape_nhwc", "scale", "zero_point", "data"}`` with scale as f32 bits
(u32) and data u8 in NHWC order.  Outputs also carry ``"scale_f64_bits"`` (u64):
the exact double PyTorch stores as q_scale() (differs from the f32 only for
add_scalar out-of-range and mul_scalar, where PyTorch computes the new scale in
double).  f32 params are bit patterns; pooling params are ints / bools.
quantize: inputs[0] = {"shape_nchw", "data_f32_nchw"} (float, NCHW order),
output is quint8 NHWC.  dequantize: output = {"shape_nhwc", "data_f32_nhwc"}.

All scales handed to PyTorch are exactly representable f32 values.

Rerun (from /work/main):

    /work/venv/bin/python scripts/golden/qops_golden.py            # write + check
    /work/venv/bin/python scripts/golden/qops_golden.py --no-write --stress 40

It prints, per op, the fraction of output elements reproduced by (a) the
"plain" formula (scalar dequantize s*(q-z), multiply-by-reciprocal quantize,
position independent) and (b) the exact model in this file (which follows
the AVX-512 kernels, including which elements take the vectorised path).
See the REPORT section at the bottom of this docstring (filled in from a run).

MODEL SUMMARY (torch 2.15.0 x86, AVX-512, 1 thread)
-------------------------------------------------------------------------
Notation: f32(.) rounds to f32, rne = round half to even, all "*" "+" on f32
values are f32 ops unless noted; Q(v, inv, z) = clamp(z + rne(f32(v * inv)), 0, 255);
inv(s) = f32(1 / s) (for f32 s the f32 division and the double division cast to
f32 agree); dqS(q) = f32(s * f32(q - z)) (scalar dequantize);
dqV(q) = fma(s, f32(q), f32(s * -z)) (vector dequantize, one rounding of the
fma, the premultiplied s*(-z) rounded separately).
Elementwise ops run through TensorIterator's cpu_kernel_vec on the flat NHWC
buffer of numel elements: flat index i < floor(numel / 128) * 128 uses the
vector lambda, the rest the scalar lambda (128 = 2 x Vectorized<quint8>::size()).
See per-op details in model_* functions below and the report.
"""

import argparse
import json
import math
import os
import sys
import warnings
import zlib

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")

ENGINE = "x86"
F32 = np.float32
F64 = np.float64
VEC_U8 = 64  # Vectorized<quint8>::size() with CPU_CAPABILITY_AVX512
TI_BLOCK = 2 * VEC_U8  # cpu_kernel_vec processes 2 vectors per step
VEC_F = 16  # Vectorized<float>::size()
OUT_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "qkernels", "tests", "golden", "qops.json"
)

# --------------------------------------------------------------------------
# encoding helpers


def f32_bits(values):
    arr = np.ascontiguousarray(np.asarray(values, dtype=F32)).reshape(-1)
    return [int(v) for v in arr.view(np.uint32)]


def f32_bit(value):
    return f32_bits([value])[0]


def f64_bit(value):
    return int(np.asarray([value], dtype=F64).view(np.uint64)[0])


def ints(values):
    return [int(v) for v in np.asarray(values).reshape(-1)]


def write_json(path, top):
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
    return np.random.default_rng(zlib.crc32(name.encode()) + 777)


# --------------------------------------------------------------------------
# exact f32 arithmetic helpers


def fma32(a, b, c):
    """Single-rounding f32 fused multiply-add, vectorised (exact)."""
    a = np.asarray(a, F32).astype(F64)
    b = np.asarray(b, F32).astype(F64)
    c = np.asarray(c, F32).astype(F64)
    a, b, c = np.broadcast_arrays(a, b, c)
    p = a * b  # exact (48 significant bits)
    s = p + c
    bp = s - p
    e = (p - (s - bp)) + (c - bp)  # TwoSum: p + c == s + e exactly
    r = s.astype(F32)
    r64 = r.astype(F64)
    toward = np.where(s > r64, F32(np.inf), F32(-np.inf)).astype(F32)
    other = np.nextafter(r, toward).astype(F64)
    mid = (s != r64) & (s == (r64 + other) * 0.5)
    fix = mid & (e != 0)
    toward_r = np.sign(e) == np.sign(r64 - s)
    out = np.where(fix, np.where(toward_r, r64, other), r64)
    return out.astype(F32)


def f32(x):
    return np.asarray(x, F64).astype(F32)


def inv_f32(scale):
    """1.0f / float(scale)."""
    return F32(F32(1.0) / F32(scale))


def rne(x):
    return np.rint(np.asarray(x))


def quant(v, inv, zp, lo=0, hi=255):
    """Q(v) = clamp(zp + rne(f32(v * inv))) (fbgemm / QuantizeAvx512, zp after rounding)."""
    t = np.asarray(v, F32) * F32(inv)
    return np.clip(rne(t).astype(np.int64) + int(zp), lo, hi)


def dq_scalar(q, s, z):
    return F32(s) * (np.asarray(q, np.int64) - int(z)).astype(F32)


def dq_vector(q, s, z):
    s = F32(s)
    return fma32(s, np.asarray(q, F32), s * F32(-int(z)))


def vec_mask(n):
    """cpu_kernel_vec: the first floor(n/128)*128 flat elements take the vector lambda."""
    m = np.zeros(n, bool)
    m[: n // TI_BLOCK * TI_BLOCK] = True
    return m


def f32_fn(fn, x):
    """Correctly rounded f32 of a double-precision function (stand-in for Sleef / libm f32)."""
    return fn(np.asarray(x, F32).astype(F64)).astype(F32)


_erf_vec = np.vectorize(math.erf, otypes=[F64])


def erf_avx512(x):
    """Vectorized<float>::erf (vec512_float.h): Abramowitz-Stegun 7.1.26 with fma + Sleef expf."""
    x = np.asarray(x, F32)
    one = F32(1.0)
    sign = np.signbit(x)
    ax = np.abs(x)
    t = one / fma32(F32(0.3275911), ax, one)
    r = fma32(F32(1.061405429), t, F32(-1.453152027))
    r = fma32(r, t, F32(1.421413741))
    r = fma32(r, t, F32(-0.284496736))
    r = fma32(r, t, F32(0.254829592))
    e = f32_fn(np.exp, -(x * x))
    tmp6 = (-e) * t
    res = fma32(tmp6, r, one)
    return np.where(sign, -res, res).astype(F32)


# --------------------------------------------------------------------------
# PyTorch helpers


def to_q(data_nhwc, scale, zp):
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(data_nhwc, np.uint8).transpose(0, 3, 1, 2)))
    q = torch._make_per_tensor_quantized_tensor(t, float(scale), int(zp))
    q = q.contiguous(memory_format=torch.channels_last)
    assert q.is_contiguous(memory_format=torch.channels_last)
    return q


def from_q(q):
    assert q.dtype == torch.quint8
    if q.dim() == 4:
        arr = q.int_repr().permute(0, 2, 3, 1).contiguous().numpy()
    else:
        arr = q.int_repr().contiguous().numpy()
    return arr, float(q.q_scale()), int(q.q_zero_point())


def cl_ok(q):
    return q.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------
# case construction


def rand_scale(rng, lo, hi):
    return float(F32(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def rand_u8(rng, shape, lo=0, hi=255):
    return rng.integers(lo, hi + 1, size=shape).astype(np.uint8)


def qin(data, scale, zp):
    return {"data": np.asarray(data, np.uint8), "scale": float(F32(scale)), "zp": int(zp)}


def mk(name, op, params, inputs, **extra):
    p = {"name": name, "op": op, "params": params, "inputs": inputs}
    p.update(extra)
    return p


# --------------------------------------------------------------------------
# run PyTorch


def run_torch(p):
    op = p["op"]
    pr = p["params"]
    ins = p["inputs"]
    qs = [to_q(i["data"], i["scale"], i["zp"]) for i in ins if "data" in i]
    if op in ("add", "add_relu", "mul"):
        fn = getattr(torch.ops.quantized, op)
        y = fn(qs[0], qs[1], p["out_scale"], p["out_zp"])
    elif op == "add_scalar":
        y = torch.ops.quantized.add_scalar(qs[0], pr["scalar"])
    elif op == "mul_scalar":
        y = torch.ops.quantized.mul_scalar(qs[0], pr["scalar"])
    elif op == "cat":
        y = torch.ops.quantized.cat(qs, 1, p["out_scale"], p["out_zp"])
    elif op == "relu":
        y = torch.relu(qs[0])
    elif op == "relu6":
        y = F.relu6(qs[0])
    elif op == "hardswish":
        y = torch.ops.quantized.hardswish(qs[0], p["out_scale"], p["out_zp"])
    elif op == "hardsigmoid":
        y = F.hardsigmoid(qs[0])
    elif op == "sigmoid":
        y = torch.sigmoid(qs[0])
    elif op == "tanh":
        y = torch.tanh(qs[0])
    elif op == "leaky_relu":
        y = torch.ops.quantized.leaky_relu(qs[0], pr["negative_slope"], False, p["out_scale"], p["out_zp"])
    elif op == "gelu":
        y = F.gelu(qs[0], approximate=pr["approximate"])
    elif op == "elu":
        y = torch.ops.quantized.elu(qs[0], p["out_scale"], p["out_zp"], pr["alpha"])
    elif op == "max_pool2d":
        y = F.max_pool2d(qs[0], pr["kernel"], pr["stride"], pr["padding"], pr["dilation"], pr["ceil_mode"])
    elif op == "avg_pool2d":
        y = F.avg_pool2d(qs[0], pr["kernel"], pr["stride"], pr["padding"], pr["ceil_mode"],
                         pr["count_include_pad"], pr["divisor_override"])
    elif op == "adaptive_avg_pool2d":
        y = F.adaptive_avg_pool2d(qs[0], pr["output_size"])
    elif op == "upsample_nearest2d":
        if "scale_factor" in pr:
            y = F.interpolate(qs[0], scale_factor=pr["scale_factor"], mode="nearest")
        else:
            y = F.interpolate(qs[0], size=pr["size"], mode="nearest")
    elif op == "batch_norm2d":
        t = lambda k: torch.from_numpy(np.asarray(pr[k], F32))
        y = torch.ops.quantized.batch_norm2d(qs[0], t("weight"), t("bias"), t("mean"), t("var"),
                                             pr["eps"], p["out_scale"], p["out_zp"])
    elif op == "layer_norm":
        i0 = ins[0]
        qn = torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.ascontiguousarray(i0["data"])),
                                                     i0["scale"], i0["zp"])
        w = torch.from_numpy(np.asarray(pr["weight"], F32))
        b = torch.from_numpy(np.asarray(pr["bias"], F32))
        y = torch.ops.quantized.layer_norm(qn, [qn.shape[-1]], w, b, pr["eps"], p["out_scale"], p["out_zp"])
        return from_q(y)
    elif op == "quantize_nchw_to_nhwc":
        x = torch.from_numpy(np.ascontiguousarray(ins[0]["f32_nchw"]))
        y = torch.quantize_per_tensor(x, p["out_scale"], p["out_zp"], torch.quint8)
        y = y.contiguous(memory_format=torch.channels_last)
    elif op == "dequantize":
        d = qs[0].dequantize()
        assert cl_ok(d)
        return d.permute(0, 2, 3, 1).contiguous().numpy(), None, None
    else:
        raise ValueError(op)
    assert cl_ok(y), (p["name"], "output not channels_last")
    return from_q(y)


# --------------------------------------------------------------------------
# models.  Each returns (data_nhwc, out_scale (double), out_zp).  exact=False
# gives the "plain" formula (scalar dequantize everywhere, position independent).


def model_add(p, exact=True, relu=False):
    a, b = p["inputs"]
    qa = a["data"].reshape(-1).astype(np.int64)
    qb = b["data"].reshape(-1).astype(np.int64)
    s, z = p["out_scale"], p["out_zp"]
    n = qa.size
    vm = vec_mask(n) if exact else np.zeros(n, bool)
    da = np.where(vm, dq_vector(qa, a["scale"], a["zp"]), dq_scalar(qa, a["scale"], a["zp"]))
    db = np.where(vm, dq_vector(qb, b["scale"], b["zp"]), dq_scalar(qb, b["scale"], b["zp"]))
    c = (da + db).astype(F32)
    if relu:
        c = np.maximum(c, F32(0))
    out = quant(c, inv_f32(s), z)
    return out.reshape(a["data"].shape), s, z


def model_mul(p, exact=True):
    a, b = p["inputs"]
    qa = a["data"].astype(np.int64)
    qb = b["data"].astype(np.int64)
    s, z = p["out_scale"], p["out_zp"]
    mult = F32(a["scale"]) * F32(b["scale"]) * inv_f32(s)
    if not exact:  # "notes" reading: multiplier = float(s_a*s_b/s_out) in double
        mult = F32(F64(a["scale"]) * F64(b["scale"]) / F64(s))
    c = ((qa - a["zp"]) * (qb - b["zp"])).astype(F32)
    return np.clip(rne(c * mult).astype(np.int64) + z, 0, 255), s, z


def model_add_scalar(p, exact=True):
    a = p["inputs"][0]
    q = a["data"].astype(np.int64)
    s, z = F64(a["scale"]), a["zp"]
    c = F64(p["params"]["scalar"])
    c_q = int(np.rint(c / s))
    qmin, qmax = 0, 255
    if qmin > z - c_q:
        s2 = ((F64(qmax) - (z - c_q)) / (F64(qmax) - qmin)) * s
        z2 = qmin
    elif qmax < z - c_q:
        s2 = (F64(z - c_q) - qmin) / (F64(qmax) - qmin) * s
        z2 = qmax
    else:
        return q.copy(), float(s), z - c_q
    mult = F32(s) * inv_f32(F32(s2))
    if not exact:
        mult = F32(s / s2)
    acc = (q - z + c_q).astype(F32)
    return np.clip(rne(acc * mult).astype(np.int64) + z2, 0, 255), float(s2), z2


def model_mul_scalar(p, exact=True):
    a = p["inputs"][0]
    q = a["data"].astype(np.int64)
    s, z = F64(a["scale"]), a["zp"]
    c = F64(p["params"]["scalar"])
    if c > 0:
        return q.copy(), float(c * s), z
    if c == 0:
        return np.zeros_like(q), 1.0, 0
    return 255 - q, float(abs(c) * s), 255 - z


def model_cat(p, exact=True):
    s, z = p["out_scale"], p["out_zp"]
    parts = []
    for inp in p["inputs"]:
        q = inp["data"].astype(np.int64)
        C = q.shape[-1]
        if inp["scale"] == s and inp["zp"] == z:
            parts.append(q)
            continue
        if exact:
            nv = C // VEC_U8 * VEC_U8
            rem = C - nv
            nv += rem // VEC_F * VEC_F  # the 16..63 channel "AVX2-width" block, also fma
            vm = np.broadcast_to(np.arange(C) < nv, q.shape)
        else:
            vm = np.zeros(q.shape, bool)
        d = np.where(vm, dq_vector(q, inp["scale"], inp["zp"]), dq_scalar(q, inp["scale"], inp["zp"]))
        parts.append(quant(d, inv_f32(s), z))
    return np.concatenate(parts, axis=-1), s, z


def model_relu(p, exact=True):
    a = p["inputs"][0]
    return np.maximum(a["data"].astype(np.int64), a["zp"]), a["scale"], a["zp"]


def model_relu6(p, exact=True):
    a = p["inputs"][0]
    q6 = int(quant(F32(6.0), inv_f32(a["scale"]), a["zp"]))
    q = np.minimum(np.maximum(a["data"].astype(np.int64), a["zp"]), q6)
    return q, a["scale"], a["zp"]


def _unary_float(p, exact, fvec, fsca, out_scale, out_zp, inv, dq_vec_kind="fma"):
    """dequantize -> f -> quantize, split between vector and scalar lambdas."""
    a = p["inputs"][0]
    q = a["data"].reshape(-1).astype(np.int64)
    n = q.size
    vm = vec_mask(n) if exact else np.zeros(n, bool)
    xs = dq_scalar(q, a["scale"], a["zp"])
    if dq_vec_kind == "fma":
        xv = dq_vector(q, a["scale"], a["zp"])
    else:  # dequantize(scale, zp): (float(q) - float(zp)) * scale
        xv = (q.astype(F32) - F32(a["zp"])) * F32(a["scale"])
    yv = fvec(xv) if exact else fsca(xs)
    ys = fsca(xs)
    y = np.where(vm, yv, ys).astype(F32)
    out = quant(y, inv, out_zp)
    return out.reshape(a["data"].shape), out_scale, out_zp


def hswish_f(x):
    x = np.asarray(x, F32)
    t = np.minimum(np.maximum(x + F32(3), F32(0)), F32(6))
    return ((x * t) / F32(6)).astype(F32)


def model_hardswish(p, exact=True):
    return _unary_float(p, exact, hswish_f, hswish_f, p["out_scale"], p["out_zp"], inv_f32(p["out_scale"]))


def hsig_f(x):
    x = np.asarray(x, F32)
    return (np.minimum(np.maximum(x + F32(3), F32(0)), F32(6)) / F32(6)).astype(F32)


def model_hardsigmoid(p, exact=True):
    return _unary_float(p, exact, hsig_f, hsig_f, 0.00390625, 0, F32(256))


def sigmoid_vec(x):
    e = f32_fn(np.exp, -np.asarray(x, F32))  # Sleef_expf16_u10
    return (F32(1) / (F32(1) + e)).astype(F32)


def sigmoid_sca(x):
    e = f32_fn(np.exp, -np.asarray(x, F32))  # std::exp(float)
    return f32(1.0 / (1.0 + e.astype(F64)))  # 1.0f / (1.0 + e) in double


def model_sigmoid(p, exact=True):
    return _unary_float(p, exact, sigmoid_vec, sigmoid_sca, 0.00390625, 0, F32(256), dq_vec_kind="sub")


def tanh_f(x):
    return f32_fn(np.tanh, x)


def model_tanh(p, exact=True):
    return _unary_float(p, exact, tanh_f, tanh_f, 0.0078125, 128, F32(128))


def model_leaky_relu(p, exact=True):
    slope = F32(p["params"]["negative_slope"])

    def f(x):
        x = np.asarray(x, F32)
        return np.where(x > 0, x, x * slope).astype(F32)

    return _unary_float(p, exact, f, f, p["out_scale"], p["out_zp"], inv_f32(p["out_scale"]))


def gelu_vec(x):
    x = np.asarray(x, F32)
    return ((x * F32(0.5)) * (F32(1) + erf_avx512(x * F32(math.sqrt(0.5))))).astype(F32)


def gelu_sca(x):
    xd = np.asarray(x, F32).astype(F64)
    return f32(xd * 0.5 * (1 + _erf_vec(xd * math.sqrt(0.5))))


K_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5
K_KAPPA = 0.044715


def gelu_tanh_vec(x):
    x = np.asarray(x, F32)
    cube = x * x * x
    inner = F32(K_BETA) * (x + F32(K_KAPPA) * cube)
    return (F32(0.5) * x * (F32(1) + f32_fn(np.tanh, inner))).astype(F32)


def gelu_tanh_sca(x):
    x = np.asarray(x, F32)
    cube = (x * x * x).astype(F64)  # float * float * float
    inner = K_BETA * (x.astype(F64) + K_KAPPA * cube)
    return f32(0.5 * x.astype(F64) * (1.0 + np.tanh(inner)))


def model_gelu(p, exact=True):
    a = p["inputs"][0]
    s = float(F32(a["scale"]))
    if p["params"]["approximate"] == "tanh":
        fv, fs = gelu_tanh_vec, gelu_tanh_sca
    else:
        fv, fs = gelu_vec, gelu_sca
    return _unary_float(p, exact, fv, fs, s, a["zp"], inv_f32(s))


def model_elu(p, exact=True):
    alpha = F32(p["params"]["alpha"])

    def fv(x):
        x = np.asarray(x, F32)
        neg = f32_fn(np.expm1, x) * alpha
        return np.where(x > 0, x, neg).astype(F32)

    def fs(x):
        x = np.asarray(x, F32)
        neg = f32_fn(np.expm1, x) * alpha
        return np.where(x >= 0, x, neg).astype(F32)

    return _unary_float(p, exact, fv, fs, p["out_scale"], p["out_zp"], inv_f32(p["out_scale"]))


def pool_out_size(inp, k, pad, stride, dil, ceil):
    num = inp + 2 * pad - dil * (k - 1) - 1 + (stride - 1 if ceil else 0)
    out = num // stride + 1
    if ceil and (out - 1) * stride >= inp + pad:
        out -= 1
    return out


def model_max_pool2d(p, exact=True):
    a = p["inputs"][0]
    x = a["data"].astype(np.int64)
    N, H, W, C = x.shape
    pr = p["params"]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pr["kernel"], pr["stride"], pr["padding"], pr["dilation"]
    oh = pool_out_size(H, kh, ph, sh, dh, pr["ceil_mode"])
    ow = pool_out_size(W, kw, pw, sw, dw, pr["ceil_mode"])
    out = np.zeros((N, oh, ow, C), np.int64)
    for i in range(oh):
        hs = i * sh - ph
        he = min(hs + (kh - 1) * dh + 1, H)
        while hs < 0:
            hs += dh
        for j in range(ow):
            ws = j * sw - pw
            we = min(ws + (kw - 1) * dw + 1, W)
            while ws < 0:
                ws += dw
            out[:, i, j, :] = x[:, hs:he:dh, ws:we:dw, :].max(axis=(1, 2))
    return out, a["scale"], a["zp"]


def model_avg_pool2d(p, exact=True):
    a = p["inputs"][0]
    x = a["data"].astype(np.int64)
    N, H, W, C = x.shape
    pr = p["params"]
    (kh, kw), (sh, sw), (ph, pw) = pr["kernel"], pr["stride"], pr["padding"]
    oh = pool_out_size(H, kh, ph, sh, 1, pr["ceil_mode"])
    ow = pool_out_size(W, kw, pw, sw, 1, pr["ceil_mode"])
    s, z = a["scale"], a["zp"]
    ratio = F32(s) / F32(s)  # input_scale / output_scale (same qparams)
    cvec = C // VEC_F * VEC_F if exact else 0
    out = np.zeros((N, oh, ow, C), np.int64)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
            pool = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
            size = (he - hs) * (we - ws)
            div = pr["divisor_override"] or (pool if pr["count_include_pad"] else size)
            mult = ratio / F32(div)
            acc = (x[:, hs:he, ws:we, :].sum(axis=(1, 2)) - z * size).astype(F32)
            if exact:
                inv2 = F32(1) / (F32(1) / mult)  # scalar tail: quantize_val(1.0f/multiplier)
                vq = quant(acc, mult, z)
                sq = quant(acc, inv2, z)
                out[:, i, j, :] = np.where(np.arange(C) < cvec, vq, sq)
            else:
                out[:, i, j, :] = quant(acc, mult, z)
    return out, s, z


def adaptive_ranges(isz, osz):
    """[floor(float(o*isz)/osz), ceil(float((o+1)*isz)/osz)) with float division."""
    r = []
    for o in range(osz):
        st = math.floor(F32(o * isz) / F32(osz))
        en = math.ceil(F32((o + 1) * isz) / F32(osz))
        r.append((int(st), int(en)))
    return r


def model_adaptive_avg_pool2d(p, exact=True):
    a = p["inputs"][0]
    x = a["data"].astype(np.int64)
    N, H, W, C = x.shape
    oh, ow = p["params"]["output_size"]
    s, z = a["scale"], a["zp"]
    out = np.zeros((N, oh, ow, C), np.int64)
    for i, (hs, he) in enumerate(adaptive_ranges(H, oh)):
        for j, (ws, we) in enumerate(adaptive_ranges(W, ow)):
            size = (he - hs) * (we - ws)
            mult = F32(s) / F32(s) / F32(size)
            acc = (x[:, hs:he, ws:we, :].sum(axis=(1, 2)) - z * size).astype(F32)
            inv = F32(1) / (F32(1) / mult) if exact else mult
            out[:, i, j, :] = quant(acc, inv, z)
    return out, s, z


def model_upsample_nearest2d(p, exact=True):
    a = p["inputs"][0]
    x = a["data"]
    N, H, W, C = x.shape
    pr = p["params"]

    def idx(isz, osz, sf):
        if osz == isz:
            return np.arange(osz)
        if osz == 2 * isz:
            return np.arange(osz) >> 1
        scale = F32(1.0 / sf) if sf else F32(F32(isz) / F32(osz))
        return np.minimum(np.floor(np.arange(osz).astype(F32) * scale).astype(np.int64), isz - 1)

    if "scale_factor" in pr:
        sf = pr["scale_factor"]
        oh, ow = int(math.floor(H * sf)), int(math.floor(W * sf))
        hi, wi = idx(H, oh, sf), idx(W, ow, sf)
    else:
        oh, ow = pr["size"]
        hi, wi = idx(H, oh, None), idx(W, ow, None)
    return x[:, hi][:, :, wi].astype(np.int64), a["scale"], a["zp"]


def bn_params(p):
    pr = p["params"]
    a = p["inputs"][0]
    w = np.asarray(pr["weight"], F32)
    b = np.asarray(pr["bias"], F32)
    m = np.asarray(pr["mean"], F32)
    v = np.asarray(pr["var"], F32)
    inv_sigma = f32(1.0 / np.sqrt(v + F32(pr["eps"])).astype(F64))  # sqrtf, then 1.0 / (double)
    ratio = F64(a["scale"]) / F64(p["out_scale"])
    alpha = f32((inv_sigma * w).astype(F64) * ratio)
    beta = f32((b - m * inv_sigma * w).astype(F64) / F64(p["out_scale"]))
    return alpha, beta


def model_batch_norm2d(p, exact=True):
    a = p["inputs"][0]
    x = a["data"].astype(np.int64)
    C = x.shape[-1]
    alpha, beta = bn_params(p)
    d = (x - a["zp"]).astype(F32)
    yv = fma32(alpha, d, beta)  # vector: _mm512_fmadd_ps(alpha, x - zp, beta)
    ys = (alpha * d + beta).astype(F32) if not exact else fma32(alpha, d, beta)
    cvec = C // VEC_U8 * VEC_U8
    y = np.where(np.arange(C) < cvec, yv, ys)
    return np.clip(rne(y).astype(np.int64) + p["out_zp"], 0, 255), p["out_scale"], p["out_zp"]


def model_layer_norm(p, exact=True):
    a = p["inputs"][0]
    pr = p["params"]
    x = a["data"].astype(np.int64)
    shp = x.shape
    C = shp[-1]
    rows = x.reshape(-1, C)
    g = np.asarray(pr["weight"], F32)
    b = np.asarray(pr["bias"], F32)
    eps = F64(pr["eps"])
    xs = F32(a["scale"])
    out = np.zeros_like(rows)
    cvec = C // VEC_U8 * VEC_U8
    yinv = inv_f32(p["out_scale"])
    for r in range(rows.shape[0]):
        row = rows[r]
        ssum, ssq = int(row.sum()), int((row * row).sum())
        ms = F32(ssum) / F32(C)
        mean = ms - F32(a["zp"])
        if exact:
            var = max(F32(fma32(-ms, ms, F32(ssq) / F32(C))), F32(0))
        else:
            var = max(F32(F32(ssq) / F32(C) - ms * ms), F32(0))
        sstd = F32(F64(xs) / math.sqrt(F64(var * xs * xs) + eps))
        d = (row - a["zp"]).astype(F32)
        t = ((d - mean) * sstd).astype(F32)
        if exact:
            y = fma32(t, g, b)
        else:
            y = (t * g + b).astype(F32)
        out[r] = quant(y, yinv, p["out_zp"])
    return out.reshape(shp), p["out_scale"], p["out_zp"]


def model_quantize(p, exact=True):
    x = p["inputs"][0]["f32_nchw"]
    q = quant(x, inv_f32(p["out_scale"]), p["out_zp"])
    return q.transpose(0, 2, 3, 1), p["out_scale"], p["out_zp"]


def model_dequantize(p, exact=True):
    a = p["inputs"][0]
    return dq_scalar(a["data"], a["scale"], a["zp"]), None, None


MODELS = {
    "add": model_add,
    "add_relu": lambda p, exact=True: model_add(p, exact, relu=True),
    "mul": model_mul,
    "add_scalar": model_add_scalar,
    "mul_scalar": model_mul_scalar,
    "cat": model_cat,
    "relu": model_relu,
    "relu6": model_relu6,
    "hardswish": model_hardswish,
    "hardsigmoid": model_hardsigmoid,
    "sigmoid": model_sigmoid,
    "tanh": model_tanh,
    "leaky_relu": model_leaky_relu,
    "gelu": model_gelu,
    "elu": model_elu,
    "max_pool2d": model_max_pool2d,
    "avg_pool2d": model_avg_pool2d,
    "adaptive_avg_pool2d": model_adaptive_avg_pool2d,
    "upsample_nearest2d": model_upsample_nearest2d,
    "batch_norm2d": model_batch_norm2d,
    "layer_norm": model_layer_norm,
    "quantize_nchw_to_nhwc": model_quantize,
    "dequantize": model_dequantize,
}
