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
Params: add/add_relu/mul/relu/relu6/hardswish/hardsigmoid/sigmoid/tanh/
quantize/dequantize: {} (requested output qparams are the output's);
add_scalar/mul_scalar: scalar; cat: dim = 1 (PyTorch NCHW dim = NHWC axis 3);
leaky_relu: negative_slope; elu: alpha; gelu: approximate ("none" | "tanh");
max_pool2d: kernel, stride, padding, dilation ([h, w] ints), ceil_mode;
avg_pool2d: kernel, stride, padding, ceil_mode, count_include_pad,
divisor_override (int or null); adaptive_avg_pool2d: output_size [h, w];
upsample_nearest2d: scale_factor (f32 bits) or size [h, w]; batch_norm2d:
weight, bias, mean, var (f32 bit arrays, length C), eps; layer_norm:
normalized_shape [C], weight, bias (length C), eps.  eps is an f32 value
(passed to PyTorch as that double).

All scales handed to PyTorch are exactly representable f32 values.  Case names
containing ``probe`` use data (and for some ops qparams / params) searched so
that the candidate formulas below disagree on many elements; without them
random data almost never tells the formulas apart.  Everything is seeded (one
generator per case, from its name): a rerun with the same build writes the same
file.  torch.ao quantization is deprecated upstream; pin the version to regenerate.

Rerun (from /work/main):

    /work/venv/bin/python scripts/golden/qops_golden.py              # check + write
    /work/venv/bin/python scripts/golden/qops_golden.py --no-write --stress 1500

It prints, per op, the share of output elements reproduced by the exact model
of this file, by the "plain" formula, and by named alternatives.  "plain" =
scalar dequantize s*(q-z) everywhere, no fma anywhere, position independent
(for mul / add_scalar: the multiplier computed in double as in the notes).

WHAT PYTORCH DOES (torch 2.15.0+cu132, engine x86, AVX-512 CPU, 1 thread)
=========================================================================
Notation: all arithmetic is f32 with one rounding per operation unless written
f64; rne = round half to even; fma = fused multiply-add (one rounding);
Q(v, inv, z) = clamp(z + rne(f32(v * inv)), 0, 255)   (zp added AFTER rounding);
inv(s) = f32(1 / s) (f32 division; for an f32 s identical to f32(1.0 / (double)s));
dqS(q) = f32(s * f32(q - z))                 scalar dequantize (fbgemm::Dequantize)
dqV(q) = fma(s, f32(q), f32(s * f32(-z)))     vector dequantize (premultiplied s*(-z)
                                              rounded on its own, then one fma)

Vector widths.  Almost all quantized kernels are registered with
REGISTER_DISPATCH, which leaves the AVX-512 slot empty, so on this AVX-512
machine they run their AVX2 build: Vectorized<quint8> = 32 lanes,
Vectorized<float> = 8.  Only avg_pool2d (NHWC) runs the AVX-512 build.

Which elements are "vector".  TensorIterator ops (add, add_relu, mul, relu,
relu6, hardswish, hardsigmoid, sigmoid, tanh, leaky_relu, gelu, elu, the
add_scalar requantize) walk the flat NHWC buffer (numel elements) with
cpu_kernel_vec: flat index i < floor(numel / 64) * 64 takes the vector lambda,
the last numel % 64 elements the scalar lambda.  (1 thread; with T threads each
parallel chunk has its own tail.)  The fixtures contain both kinds.

Per op (exact-model match: 100.0000% on all 139 fixture cases, 173,063 output
elements, and on --stress 1500 = 34,500 random cases, 35.9M elements;
"plain"/alt numbers are fixtures / stress):

add, add_relu (quantized::add(qa, qb, s, z)): vector: c = f32(dqV_a(a) + dqV_b(b));
  tail: c = f32(dqS_a(a) + dqS_b(b)); add_relu: c = max(c, 0); out = Q(c, inv(s), z).
  plain (dqS everywhere): add 61.2% / 100%, add_relu 52.9% / 100%.
mul: integer product p = (a - za) * (b - zb) (i32), m = f32(f32(sa * sb) * inv(s)),
  out = clamp(z + rne(f32(f32(p) * m))) (vector and scalar agree).
  m = f32(sa*sb/s computed in f64) (notes): 80.3% / 100%.
add_scalar (quantized::add_scalar(q, c)): c_q = rne_f64(c / s) (f64, c and s as
  doubles); if 0 <= z - c_q <= 255: data copied, output (s, z - c_q).  Else
  z - c_q < 0: s' = ((255 - (z - c_q)) / 255) * s, z' = 0;  z - c_q > 255:
  s' = ((z - c_q) / 255) * s, z' = 255 (f64, that order).  Data:
  m = f32(f32(s) * f32(1 / f32(s'))), out = clamp(z' + rne(f32(f32(q - z + c_q) * m))).
  s' is generally not an f32: use output "scale_f64_bits".
  m = f32(s / s' in f64): 91.9% / 99.94%.
mul_scalar: c > 0: data copied, scale c*s (f64), zp z; c == 0: data all 0,
  scale 1.0, zp 0; c < 0: data 255 - q, scale |c|*s (f64), zp 255 - z.  100%.
cat (quantized::cat(xs, 1, s, z), NHWC kernel): per pixel and input: if the
  input's (scale, zp) == (s, z) exactly -> copy; else channels
  c < floor(C/32)*32 + floor((C%32)/8)*8 use dqV, the remaining C%8 channels
  dqS; out = Q(d, inv(s), z).  plain 76.9% / 100%.
relu: max(q, z).  relu6 (F.relu6): min(max(q, z), q6), q6 = Q(6.0, inv(s), z).
  Output qparams = input's.  100%.
hardswish (quantized::hardswish(q, s_o, z_o)): x = dqV | dqS;
  y = f32(f32(x * min(max(f32(x + 3), 0), 6)) / 6); out = Q(y, inv(s_o), z_o).
  plain 74.7% / 100%.
hardsigmoid (F.hardsigmoid): output qparams (1/256, 0);
  y = f32(min(max(f32(x + 3), 0), 6) / 6); out = Q(y, 256, 0).  plain 54.4% / 100%.
sigmoid (torch.sigmoid): output qparams (1/256, 0).  x = f32(f32(q - z) * s) on
  both paths (2-argument dequantize, no fma); e = expf(-x);
  vector: y = f32(1 / f32(1 + e)); scalar: y = f32(1.0 / (1.0 + (f64)e)) in f64;
  out = Q(y, 256, 0).  plain 73.0% / 100%.
tanh (torch.tanh): output qparams (1/128, 128); y = tanhf(x), x = dqV | dqS;
  out = Q(y, 128, 128).  plain 54.6% / 100%.
leaky_relu (quantized::leaky_relu(q, slope, False, s_o, z_o)): y = x > 0 ? x :
  f32(x * f32(slope)), x = dqV | dqS; out = Q(y, inv(s_o), z_o).  plain 51.1% / 99.999%.
gelu (F.gelu): output qparams = (f32(s), z) of the input.  approximate="none":
  vector: y = f32(f32(x * 0.5) * f32(1 + erfV(f32(x * f32(sqrt(1/2)))))) with
  erfV = Vectorized<float>::erf (Abramowitz-Stegun 7.1.26: t = 1/fma(0.3275911,|x|,1),
  r = Horner with fma over p5..p1, y = fma(f32(-expf(-f32(x*x)) * t), r, 1), sign
  restored; see erf_avx512); scalar: y = f32(x*0.5*(1 + erf(x*M_SQRT1_2))) in f64.
  approximate="tanh": vector: cube = f32(f32(x*x)*x), inner = f32(f32(kBeta) *
  fma(f32(0.044715), cube, x)) (the compiler contracts x + k*cube into an fma),
  y = f32(f32(0.5*x) * f32(1 + tanhf(inner))); scalar: cube f32, the rest in f64.
  out = Q(y, inv(s), z).  plain 89.2% / 100%; tanh-gelu without the fma 94.4%.
elu (quantized::elu(q, s_o, z_o, alpha)): PyTorch allocates a contiguous NCHW
  output (the only op here whose output is not channels_last), so for a
  channels_last input with C > 1 and H*W > 1 every element takes the scalar
  lambda: y = x >= 0 ? x : f32(expm1f(x) * alpha), x = dqS.  (C == 1 or H*W == 1:
  the flat split; vector y = x > 0 ? x : f32(expm1f(x)*alpha), x = dqV.)
  out = Q(y, inv(s_o), z_o).  flat split for C>1: 60.0% on probes.
  Transcendentals (expf, tanhf, expm1f, erf): Sleef u10 (vector) / glibc
  (scalar) in PyTorch; the model uses the correctly rounded f32 (resp. f64)
  value and matched every element, probes included.
max_pool2d: out size = floor((I + 2p - d(k-1) - 1 + (ceil ? s-1 : 0)) / s) + 1,
  minus 1 if ceil and (out-1)*s >= I + p; window: hs = o*s - p,
  he = min(hs + (k-1)*d + 1, I), hs += d while hs < 0; max over raw u8
  (padding never contributes).  Output qparams = input's.  100%.
avg_pool2d (AVX-512 build): hs = o*s - p, he = min(hs + k, I + p),
  pool = (he-hs)*(we-ws) (with padding), then clip to [0, I); size = clipped
  area; div = divisor_override or (count_include_pad ? pool : size);
  m = f32(f32(s/s) / f32(div)) = f32(1/div); acc = sum(q) - z*size (exact int);
  out = clamp(z + rne(f32(f32(acc) * m))).  Channels >= floor(C/16)*16 use
  quantize_val(1/m) i.e. inv = f32(1/f32(1/m)), which equals m for every
  div <= 4096 (checked), so one formula.  rational rne(acc/div) 99.37% / 100%
  (differs at acc/div = +-254.5 for div 14, 26, 28, 30, 52, ...); zp added
  before rounding (the NCHW kernel) 98.6% / 91.4%.
adaptive_avg_pool2d (F.adaptive_avg_pool2d, incl. 1x1 which goes to
  aten::_adaptive_avg_pool2d, not mean): window [floor(f32(o*I)/f32(O)),
  ceil(f32((o+1)*I)/f32(O))), size = kh*kw, m = f32(f32(s/s)/f32(size)),
  inv = f32(1/f32(1/m)) (== m), out = clamp(z + rne(f32(f32(acc) * inv))).
  rational 99.17% / 99.98%, zp before rounding 93.5% / 88.7%.
upsample_nearest2d: qparams and values copied; out size floor(I*sf) (or size);
  src index: O == I -> o; O == 2I -> o >> 1; else min(floor(f32(o) * sc), I-1),
  sc = f32(1/sf) when scale_factor is given, else f32(I)/f32(O).  100%.
quantize (torch.quantize_per_tensor on NCHW float, fbgemm::Quantize):
  q = clamp(z + rne(f32(x * inv(s))), 0, 255) for finite x in range.  Full rule
  (QuantizeAvx2): t = min(f32(x*inv), 2147483520f) (NaN -> 2147483520),
  i = cvt_rne(t) (-inf / < -2^31 -> INT32_MIN), i = i + z with int32 wrap-around,
  clamp: +inf / NaN / huge give 255 if z <= 127 but 0 if z >= 128 (cases
  quantize_special_*).  Then channels_last copy.  x/s division: 90.2% / 95.0%;
  rne(z + x*inv) (legacy): 57.3% / 81.7%.
dequantize (q.dequantize()): dqS, bit exact (scalar fbgemm loop); the fma form
  dqV matches only 93.5% / 72.1% of the f32 outputs.
batch_norm2d (quantized::batch_norm2d): compute_fused_params (plain x86-64 code,
  no fma): inv_sigma = f32(1.0 / (f64)sqrtf(f32(var + f32(eps)))),
  alpha = f32((f64)f32(inv_sigma * w) * (s_in / s_out in f64)),
  beta = f32((f64)f32(b - f32(f32(mean * inv_sigma) * w)) / s_out);
  y = fma(alpha, f32(q - z_in), beta) for every channel (vector blocks use
  _mm256_fmadd_ps; the scalar tail lrintf(alpha*(q - z_in) + beta) is contracted
  to the same fma); out = clamp(z_out + rne(y)).  Tail without fma 97.9% / 100%.
layer_norm (quantized::layer_norm over C, per pixel): sum, sumsq exact;
  ms = f32(f32(sum) / f32(C)); mean = f32(ms - f32(z));
  var = max(fma(-ms, ms, f32(f32(sumsq) / f32(C))), 0) (contracted);
  sstd = f32(s / sqrt((f64)f32(f32(var * s) * s) + eps)) (f64 sqrt, divide);
  t = f32(f32(f32(q - z) - mean) * sstd); y = fma(t, gamma, beta) (contracted,
  both the 32-channel vector blocks and the scalar tail); out = Q(y, inv(s_o), z_o).
  var without fma 99.985%, vector y without fma 99.978%, scalar y without fma
  99.993% (probe cases).
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
# Most quantized kernels are registered with REGISTER_DISPATCH, which leaves the
# AVX-512 slot empty, so on an AVX-512 machine they run their AVX2 build:
VEC_U8 = 32  # Vectorized<quint8>::size() (AVX2)
TI_BLOCK = 2 * VEC_U8  # cpu_kernel_vec processes 2 vectors per step -> 64
VEC_F = 8  # Vectorized<float>::size() (AVX2)
# Only qavg_pool2d_nhwc (ALSO_REGISTER_AVX512_DISPATCH) runs the AVX-512 build:
AVGPOOL_VEC = 16  # Vectorized<quint8>::size() / 4 with AVX-512
FORCE = [None]  # testing hook: "vector" / "scalar" forces the path of every element
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
    if FORCE[0] is not None:
        m[:] = FORCE[0] == "vector"
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
    if p.get("out_scale") is not None:  # every scale handed to PyTorch is an exact f32
        p["out_scale"] = float(F32(p["out_scale"]))
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
        assert y.is_contiguous()
        return y.int_repr().numpy(), float(y.q_scale()), int(y.q_zero_point())  # already NHWC
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
    p["torch_out_channels_last"] = cl_ok(y)
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
            nv += rem // VEC_F * VEC_F  # the 8..31 remainder block (VLEN == 4*kVLEN), also fma
            vm = np.broadcast_to(np.arange(C) < nv, q.shape)
            if FORCE[0] is not None:
                vm = np.full(q.shape, FORCE[0] == "vector")
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


def _unary_float(p, exact, fvec, fsca, out_scale, out_zp, inv, dq_vec_kind="fma", all_scalar=False):
    """dequantize -> f -> quantize, split between vector and scalar lambdas."""
    a = p["inputs"][0]
    q = a["data"].reshape(-1).astype(np.int64)
    n = q.size
    vm = vec_mask(n) if exact else np.zeros(n, bool)
    if all_scalar and FORCE[0] is None:
        vm[:] = False
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


GELU_TANH_FMA = [True]


def gelu_tanh_vec(x):
    x = np.asarray(x, F32)
    cube = x * x * x
    if GELU_TANH_FMA[0]:  # value + kKappa * cube, contracted to one fma by the compiler
        inner = F32(K_BETA) * fma32(F32(K_KAPPA), cube, x)
    else:
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

    # quantized::elu allocates a *contiguous* (NCHW) output: with a channels_last
    # input TensorIterator's inner loop is strided for the input, so every element
    # takes the scalar lambda (unless C == 1 or H*W == 1, where both layouts agree).
    n_, h_, w_, c_ = p["inputs"][0]["data"].shape
    mixed = c_ > 1 and h_ * w_ > 1
    return _unary_float(p, exact, fv, fs, p["out_scale"], p["out_zp"], inv_f32(p["out_scale"]),
                        all_scalar=mixed)


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
    cvec = C // AVGPOOL_VEC * AVGPOOL_VEC if exact else 0
    if FORCE[0] is not None:
        cvec = C if FORCE[0] == "vector" else 0
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


def fused_params(w, b, m, v, eps, in_scale, out_scale):
    """compute_fused_params (Normalization.cpp): float/double mix as in the C++."""
    w, b, m, v = (np.asarray(t, F32) for t in (w, b, m, v))
    inv_sigma = f32(1.0 / np.sqrt(v + F32(eps)).astype(F64))  # sqrtf(float), 1.0 / (double)
    ratio = F64(in_scale) / F64(out_scale)
    alpha = f32((inv_sigma * w).astype(F64) * ratio)
    beta = f32((b - (m * inv_sigma) * w).astype(F64) / F64(out_scale))
    return alpha, beta


def bn_params(p):
    pr = p["params"]
    return fused_params(pr["weight"], pr["bias"], pr["mean"], pr["var"], pr["eps"],
                        p["inputs"][0]["scale"], p["out_scale"])


BN_SCALAR_FMA = [True]


def model_batch_norm2d(p, exact=True):
    a = p["inputs"][0]
    x = a["data"].astype(np.int64)
    C = x.shape[-1]
    alpha, beta = bn_params(p)
    d = (x - a["zp"]).astype(F32)
    yv = fma32(alpha, d, beta)  # vector: fmadd(alpha, x - zp, beta)
    ys = fma32(alpha, d, beta) if BN_SCALAR_FMA[0] else (alpha * d + beta).astype(F32)
    lanes = 4 * VEC_F  # 32
    cvec = C // lanes * lanes
    cvec += (C - cvec) // VEC_F * VEC_F  # lanes == 32 -> 8-wide remainder block
    if FORCE[0] is not None:
        cvec = C if FORCE[0] == "vector" else 0
    if not exact:  # plain: alpha * (q - zp) + beta with two roundings everywhere
        yv = ys = (alpha * d + beta).astype(F32)
    y = np.where(np.arange(C) < cvec, yv, ys)
    return np.clip(rne(y).astype(np.int64) + p["out_zp"], 0, 255), p["out_scale"], p["out_zp"]


LN_FMA = {"var": True, "y_vec": True, "y_sca": True}


def ln_rows(p, exact=True):
    """Per pixel (row of C): t = (q - zp - mean') * (x_scale / std) as the kernel computes it."""
    a = p["inputs"][0]
    x = a["data"].astype(np.int64)
    C = x.shape[-1]
    rows = x.reshape(-1, C)
    eps = F64(p["params"]["eps"])
    xs = F32(a["scale"])
    ts = np.zeros(rows.shape, F32)
    for r in range(rows.shape[0]):
        row = rows[r]
        ssum, ssq = int(row.sum()), int((row * row).sum())  # hsum / hsum_sq, exact
        ms = F32(ssum) / F32(C)  # float(sum) / N
        mean = ms - F32(a["zp"])
        if exact and LN_FMA["var"]:  # sumsq/N - ms*ms is contracted to an fma
            var = max(F32(fma32(-ms, ms, F32(ssq) / F32(C))), F32(0))
        else:
            var = max(F32(F32(ssq) / F32(C) - ms * ms), F32(0))
        sstd = F32(F64(xs) / math.sqrt(F64(var * xs * xs) + eps))  # double sqrt / divide
        d = (row - a["zp"]).astype(F32)  # dequantize with fake scale 1.0 (exact)
        ts[r] = ((d - mean) * sstd).astype(F32)
    return ts


def model_layer_norm(p, exact=True):
    """quantized_normalize_kernel (affine_per_channel=False), one row of C per pixel."""
    a = p["inputs"][0]
    pr = p["params"]
    shp = a["data"].shape
    C = shp[-1]
    g = np.asarray(pr["weight"], F32)
    b = np.asarray(pr["bias"], F32)
    t = ln_rows(p, exact)
    vec = np.arange(C) < C // VEC_U8 * VEC_U8  # kIntVLen = 32 channel blocks, rest scalar
    y_f = fma32(t, g, b)
    y_n = (t * g + b).astype(F32)
    yv = y_f if (exact and LN_FMA["y_vec"]) else y_n
    ys = y_f if (exact and LN_FMA["y_sca"]) else y_n
    out = quant(np.where(vec, yv, ys), inv_f32(p["out_scale"]), p["out_zp"])
    return out.reshape(shp), p["out_scale"], p["out_zp"]


def quant_fbgemm(x, inv, zp):
    """fbgemm QuantizeAvx2 incl. non-finite / huge inputs: t = min(x*inv, 2147483520f)
    (NaN -> 2147483520 because minps returns its 2nd operand), cvtps RNE (out of range
    -> INT32_MIN), + zp with int32 wrap-around, clamp to [0, 255].  So +inf/NaN/huge give
    255 when zp <= 127 but 0 when zp >= 128 (the add overflows)."""
    t = np.asarray(x, F32) * F32(inv)
    t = np.where(np.isnan(t) | (t > F32(2147483520.0)), F32(2147483520.0), t)
    ok = t >= F32(-2147483648.0)
    i = np.where(ok, rne(np.where(ok, t, 0)).astype(np.int64), -(2 ** 31))
    i = (i + int(zp) + 2 ** 31) % 2 ** 32 - 2 ** 31
    return np.clip(i, 0, 255)


def model_quantize(p, exact=True):
    x = p["inputs"][0]["f32_nchw"]
    q = quant_fbgemm(x, inv_f32(p["out_scale"]), p["out_zp"]) if exact else \
        quant(np.nan_to_num(x), inv_f32(p["out_scale"]), p["out_zp"])
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


# --------------------------------------------------------------------------
# case generators: gen_<op>(name, rng, shape, **overrides) -> case dict


def pick_zp(rng):
    return int(rng.choice([0, 128, int(rng.integers(0, 128)) * 2 + 1, 255, int(rng.integers(0, 256))]))


def fit_qparams(lo, hi, rng, slack=(0.7, 1.15)):
    """Output qparams roughly covering [lo, hi] (some saturation allowed)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = float(F32(max(hi - lo, 1e-3) / 255.0 * rng.uniform(*slack)))
    z = int(np.clip(round(-lo / s), 0, 255))
    return s, z


def probe_values(rng, q_all, vec_out, sca_out, shape):
    """Data that prefers inputs whose vector-path and scalar-path results differ."""
    diff = np.nonzero(vec_out != sca_out)[0]
    data = rand_u8(rng, shape).reshape(-1)
    if diff.size:
        pick = rng.random(data.size) < 0.5
        data[pick] = q_all[diff][rng.integers(0, diff.size, int(pick.sum()))]
    return data.reshape(shape)


def gen_add(name, rng, shape, op="add", qa=None, qb=None, out=None, probe=False):
    for _ in range(400 if probe else 1):
        sa, za = qa or (rand_scale(rng, 0.003, 0.1), pick_zp(rng))
        sb, zb = qb or (rand_scale(rng, 0.003, 0.1), pick_zp(rng))
        if out:
            s, z = out
        else:
            lo = -za * sa - zb * sb
            hi = (255 - za) * sa + (255 - zb) * sb
            s, z = fit_qparams(lo, hi, rng)
        a, b = rand_u8(rng, shape), rand_u8(rng, shape)
        p = mk(name, op, {}, [qin(a, sa, za), qin(b, sb, zb)], out_scale=s, out_zp=z)
        if not probe:
            return p
        # all 65536 pairs: where do the vector (fma) and scalar dequantize disagree?
        ga, gb = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
        ga, gb = ga.reshape(-1), gb.reshape(-1)
        res = []
        for vec in (True, False):
            da = dq_vector(ga, sa, za) if vec else dq_scalar(ga, sa, za)
            db = dq_vector(gb, sb, zb) if vec else dq_scalar(gb, sb, zb)
            c = (da + db).astype(F32)
            if op == "add_relu":
                c = np.maximum(c, F32(0))
            res.append(quant(c, inv_f32(s), z))
        diff = np.nonzero(res[0] != res[1])[0]
        if diff.size:
            n = int(np.prod(shape))
            pick = rng.random(n) < 0.5
            fa, fb = a.reshape(-1), b.reshape(-1)
            sel = diff[rng.integers(0, diff.size, int(pick.sum()))]
            fa[pick], fb[pick] = ga[sel], gb[sel]
            p["inputs"] = [qin(fa.reshape(shape), sa, za), qin(fb.reshape(shape), sb, zb)]
            return p
    return p


def gen_mul(name, rng, shape, qa=None, qb=None, out=None, probe=False):
    for _ in range(2000 if probe else 1):
        sa, za = qa or (rand_scale(rng, 0.003, 0.1), pick_zp(rng))
        sb, zb = qb or (rand_scale(rng, 0.003, 0.1), pick_zp(rng))
        a, b = rand_u8(rng, shape), rand_u8(rng, shape)
        if out:
            s, z = out
        else:
            da = (np.array([0, 255]) - za) * sa
            db = (np.array([0, 255]) - zb) * sb
            prods = np.outer(da, db)
            s, z = fit_qparams(prods.min() * 0.6, prods.max() * 0.6, rng)
        p = mk(name, "mul", {}, [qin(a, sa, za), qin(b, sb, zb)], out_scale=s, out_zp=z)
        if not probe:
            return p
        # pairs where the f32 multiplier (sa*sb)*(1/s) and the double one round differently
        ga, gb = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
        ga, gb = ga.reshape(-1), gb.reshape(-1)
        tp = dict(p, inputs=[qin(ga.reshape(1, 1, 1, -1), sa, za), qin(gb.reshape(1, 1, 1, -1), sb, zb)])
        diff = np.nonzero(model_mul(tp)[0].reshape(-1) != model_mul(tp, exact=False)[0].reshape(-1))[0]
        if diff.size:
            fa, fb = a.reshape(-1), b.reshape(-1)
            pick = rng.random(fa.size) < 0.5
            sel = diff[rng.integers(0, diff.size, int(pick.sum()))]
            fa[pick], fb[pick] = ga[sel], gb[sel]
            p["inputs"] = [qin(fa.reshape(shape), sa, za), qin(fb.reshape(shape), sb, zb)]
            return p
    return p


def gen_add_scalar(name, rng, shape, qa=None, scalar=None, probe=False):
    for _ in range(5000 if probe else 1):
        s, z = qa or (rand_scale(rng, 0.005, 0.1), pick_zp(rng))
        if probe:  # qa = (None, z) fixed zp, scalar = shift in units of s
            s = rand_scale(rng, 0.005, 0.1)
            z = qa[1]
            c = float(F32(scalar * s * rng.uniform(0.9, 1.1)))
        else:
            c = float(F32(scalar if scalar is not None else rng.uniform(-300, 300) * s))
        p = mk(name, "add_scalar", {"scalar": c}, [qin(rand_u8(rng, shape), s, z)])
        if not probe:
            return p
        q_all = np.arange(256, dtype=np.uint8).reshape(1, 1, 1, 256)
        tp = dict(p, inputs=[qin(q_all, s, z)])
        e, pl = model_add_scalar(tp)[0].reshape(-1), model_add_scalar(tp, exact=False)[0].reshape(-1)
        if np.any(e != pl):
            p["inputs"] = [qin(probe_values(rng, np.arange(256), e, pl, shape), s, z)]
            return p
    return p


def gen_mul_scalar(name, rng, shape, qa=None, scalar=None):
    s, z = qa or (rand_scale(rng, 0.005, 0.1), pick_zp(rng))
    c = float(F32(scalar if scalar is not None else rng.choice([-1, 1]) * rng.uniform(0.1, 4)))
    return mk(name, "mul_scalar", {"scalar": c}, [qin(rand_u8(rng, shape), s, z)])


def gen_cat(name, rng, shape, c2, qa=None, qb=None, out=None, probe=False):
    shape2 = tuple(shape[:3]) + (c2,)
    sa, za = qa or (rand_scale(rng, 0.005, 0.1), pick_zp(rng))
    sb, zb = qb or (rand_scale(rng, 0.005, 0.1), pick_zp(rng))
    s, z = out or (rand_scale(rng, 0.005, 0.1), pick_zp(rng))
    if probe and not out:  # ties: output scale = 2 x the first input's scale
        s, z = float(F32(2 * sa)), int(rng.integers(0, 256))
    ins = []
    for shp, sc, zp in ((shape, sa, za), (shape2, sb, zb)):
        data = rand_u8(rng, shp)
        if probe:
            q_all = np.arange(256)
            data = probe_values(rng, q_all, quant(dq_vector(q_all, sc, zp), inv_f32(s), z),
                                quant(dq_scalar(q_all, sc, zp), inv_f32(s), z), shp)
        ins.append(qin(data, sc, zp))
    return mk(name, "cat", {"dim": 1}, ins, out_scale=s, out_zp=z)


def gen_unary(name, rng, shape, op, qa=None, out=None, params=None, probe=False, lo_hi=(-8.0, 8.0),
              probe_models=None):
    params = dict(params or {})
    for attempt in range(4000 if probe else 1):
        if qa:
            s, z = qa
        else:
            lo, hi = lo_hi
            s = rand_scale(rng, (hi - lo) / 255 * 0.6, (hi - lo) / 255 * 1.6)
            z = int(np.clip(round(-lo / s) + rng.integers(-20, 21), 0, 255))
        x_lo, x_hi = -z * s, (255 - z) * s
        if probe and op in ("hardswish", "leaky_relu", "elu") and out is None:
            # output scale 2*s puts many results on a .5 tie, so a 1-ulp
            # difference between the two dequantize formulas decides the rounding
            o = (float(F32(2 * s)), int(np.clip(z // 2 + rng.integers(-3, 4), 0, 255)))
        elif op == "hardswish":
            o = out or fit_qparams(-0.375, x_hi, rng)
        elif op == "leaky_relu":
            o = out or fit_qparams(x_lo * params["negative_slope"], x_hi, rng)
        elif op == "elu":
            o = out or fit_qparams(-params["alpha"], x_hi, rng)
        else:
            o = (None, None)
        p = mk(name, op, params, [qin(rand_u8(rng, shape), s, z)], out_scale=o[0], out_zp=o[1])
        if not probe:
            return p
        q_all = np.arange(256, dtype=np.uint8).reshape(1, 1, 1, 256)
        tp = dict(p, inputs=[qin(q_all, s, z)])
        outs = []
        if probe_models:
            outs = [f(tp).reshape(-1) for f in probe_models]
        for path in () if probe_models else ("vector", "scalar"):
            FORCE[0] = path
            try:
                outs.append(MODELS[op](tp)[0].reshape(-1))
            finally:
                FORCE[0] = None
        if np.any(outs[0] != outs[1]):
            p["inputs"] = [qin(probe_values(rng, np.arange(256), outs[0], outs[1], shape), s, z)]
            p["probe_hits"] = int((outs[0] != outs[1]).sum())
            return p
    return p


def pool_case(name, rng, shape, op, params, qa=None, data_range=(0, 255)):
    s, z = qa or (rand_scale(rng, 0.005, 0.1), pick_zp(rng))
    return mk(name, op, params, [qin(rand_u8(rng, shape, *data_range), s, z)])


def gen_bn(name, rng, shape, qa=None, probe=False):
    C = shape[-1]
    s, z = qa or (rand_scale(rng, 0.01, 0.1), pick_zp(rng))
    x_lo, x_hi = -z * s, (255 - z) * s
    w = f32(rng.uniform(0.3, 2.0, C) * rng.choice([-1, 1], C))
    b = f32(rng.uniform(-1, 1, C))
    m = f32(rng.uniform(x_lo, x_hi, C) * 0.5)
    v = f32(rng.uniform(0.05, 4.0, C) * ((x_hi - x_lo) / 8) ** 2)
    eps = float(F32(1e-5))
    y = (np.array([x_lo, x_hi])[:, None] - m) / np.sqrt(v + eps) * w + b
    os_, oz = fit_qparams(float(y.min()) * 0.7, float(y.max()) * 0.7, rng)
    data = rand_u8(rng, shape)
    if probe:
        # per channel: search biases so that fma(alpha, d, beta) and alpha*d + beta
        # (two roundings) round to different integers for some inputs
        d_all = (np.arange(256) - z).astype(F32)
        flat = data.reshape(-1, C)
        for ch in range(C):
            cand_b = f32(b[ch] + rng.uniform(-0.5, 0.5, 4096))
            al, be = fused_params(w[ch], cand_b, m[ch], v[ch], eps, s, os_)
            al = np.broadcast_to(al, be.shape)
            y1 = rne(fma32(al[:, None], d_all[None, :], be[:, None]))
            y2 = rne((al[:, None] * d_all[None, :] + be[:, None]).astype(F32))
            hit = np.nonzero((y1 != y2).any(axis=1))[0]
            if hit.size:
                j = hit[0]
                b[ch] = cand_b[j]
                qs = np.nonzero(y1[j] != y2[j])[0]
                pick = rng.random(flat.shape[0]) < 0.5
                flat[pick, ch] = qs[rng.integers(0, qs.size, int(pick.sum()))]
        data = flat.reshape(shape)
    params = {"weight": w, "bias": b, "mean": m, "var": v, "eps": eps}
    return mk(name, "batch_norm2d", params, [qin(data, s, z)], out_scale=os_, out_zp=oz)


def gen_ln(name, rng, shape, qa=None, out=None, narrow=False, probe=False):
    C = shape[-1]
    s, z = qa or (rand_scale(rng, 0.01, 0.1), pick_zp(rng))
    lo, hi = (100, 160) if narrow else (0, 255)
    g = f32(rng.uniform(0.5, 1.5, C))
    b = f32(rng.uniform(-0.5, 0.5, C))
    os_, oz = out or fit_qparams(-3.5, 3.5, rng)
    if probe:
        os_, oz = float(F32(rng.uniform(0.012, 0.02))), 128
    params = {"normalized_shape": [C], "weight": g, "bias": b, "eps": float(F32(1e-5))}
    p = mk(name, "layer_norm", params, [qin(rand_u8(rng, shape, lo, hi), s, z)], out_scale=os_, out_zp=oz)
    if probe:
        # per channel: search gamma/beta so that fma(t, g, b) and t*g + b quantize differently
        t = ln_rows(p)
        inv = inv_f32(os_)
        for ch in range(C):
            cg = f32(g[ch] * (1 + rng.uniform(-0.05, 0.05, 2048)))
            cb = f32(b[ch] + rng.uniform(-0.05, 0.05, 2048))
            yf = quant(fma32(t[None, :, ch], cg[:, None], cb[:, None]), inv, oz)
            yn = quant((t[None, :, ch] * cg[:, None] + cb[:, None]).astype(F32), inv, oz)
            hit = np.nonzero((yf != yn).any(axis=1))[0]
            if hit.size:
                g[ch], b[ch] = cg[hit[0]], cb[hit[0]]
    return p


def gen_quantize(name, rng, shape_nhwc, out=None, kind="normal"):
    n, h, w, c = shape_nhwc
    s, z = out or (rand_scale(rng, 0.005, 0.1), pick_zp(rng))
    lo, hi = -z * s, (255 - z) * s
    x = rng.uniform(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo), (n, c, h, w))
    if kind == "ties":
        # values whose x * (1/s) lands on (or next to) a .5 in f32
        k = rng.integers(-z - 3, 258 - z, (n, c, h, w)) + 0.5
        x = k * s
        x = np.where(rng.random(x.shape) < 0.3, np.nextafter(f32(x), F32(np.inf)), f32(x))
    if kind == "special":  # non-finite / huge / tiny values (NCHW flat order)
        sp = [np.nan, np.inf, -np.inf, 3e9, -3e9, 1e30, -0.0, 1e-45, 134217730.0, -1e-30, 7.96875, -6.25]
        flat = x.reshape(-1)
        flat[: len(sp)] = sp
    return mk(name, "quantize_nchw_to_nhwc", {}, [{"f32_nchw": f32(x)}], out_scale=s, out_zp=z)


# --------------------------------------------------------------------------
# fixture list

S_ = [(1, 1, 1, 1), (1, 1, 1, 3), (1, 5, 7, 13), (1, 8, 8, 17), (2, 5, 7, 3), (1, 5, 7, 64),
      (1, 8, 8, 70), (1, 1, 1, 64), (1, 1, 1, 70), (2, 8, 8, 13), (1, 5, 7, 17)]


def fixture_cases():
    cases = []

    def add(name, fn, *a, **k):
        cases.append(fn(name, case_rng(name), *a, **k))

    # add / add_relu
    add("add_1x1x1x1", gen_add, (1, 1, 1, 1))
    add("add_5x7x3_zp0_128", gen_add, (1, 5, 7, 3), qa=(0.0234375, 0), qb=(0.05, 128))
    add("add_8x8x17", gen_add, (1, 8, 8, 17))
    add("add_n2_5x7x13", gen_add, (2, 5, 7, 13))
    add("add_8x8x64_probe", gen_add, (1, 8, 8, 64), probe=True)
    add("add_5x7x70_probe", gen_add, (1, 5, 7, 70), probe=True)
    add("add_8x8x17_probe", gen_add, (1, 8, 8, 17), probe=True)
    add("add_relu_5x7x13", gen_add, (1, 5, 7, 13), op="add_relu")
    add("add_relu_8x8x70_probe", gen_add, (1, 8, 8, 70), op="add_relu", probe=True)
    add("add_relu_1x1x3_zp255", gen_add, (1, 1, 1, 3), op="add_relu", out=(0.03125, 255))
    add("add_relu_8x8x17_probe", gen_add, (1, 8, 8, 17), op="add_relu", probe=True)
    # mul
    add("mul_1x1x1x1", gen_mul, (1, 1, 1, 1))
    add("mul_5x7x3", gen_mul, (1, 5, 7, 3))
    add("mul_8x8x17_zp128", gen_mul, (1, 8, 8, 17), qa=(0.03125, 128), qb=(0.0625, 128))
    add("mul_5x7x70", gen_mul, (1, 5, 7, 70))
    add("mul_n2_8x8x13", gen_mul, (2, 8, 8, 13))
    add("mul_8x8x17_probe", gen_mul, (1, 8, 8, 17), probe=True)
    add("mul_5x7x70_probe", gen_mul, (1, 5, 7, 70), probe=True)
    # add_scalar
    add("add_scalar_in_range_pos", gen_add_scalar, (1, 5, 7, 13), qa=(0.05, 100), scalar=1.5)
    add("add_scalar_in_range_neg", gen_add_scalar, (1, 8, 8, 17), qa=(0.02, 37), scalar=-0.7)
    add("add_scalar_in_range_round", gen_add_scalar, (1, 1, 1, 3), qa=(0.1, 200), scalar=0.25)
    add("add_scalar_below_qmin", gen_add_scalar, (1, 5, 7, 13), qa=(0.05, 20), scalar=3.3)
    add("add_scalar_above_qmax", gen_add_scalar, (1, 8, 8, 70), qa=(0.03, 240), scalar=-2.2)
    add("add_scalar_below_qmin_zp0", gen_add_scalar, (2, 5, 7, 17), qa=(0.0078125, 0), scalar=0.9)
    add("add_scalar_above_qmax_zp255", gen_add_scalar, (1, 5, 7, 3), qa=(0.0625, 255), scalar=-5.0)
    add("add_scalar_below_qmin_probe", gen_add_scalar, (1, 8, 8, 17), qa=(None, 30), scalar=100.0, probe=True)
    add("add_scalar_above_qmax_probe", gen_add_scalar, (1, 5, 7, 13), qa=(None, 211), scalar=-90.0, probe=True)
    # mul_scalar
    add("mul_scalar_pos", gen_mul_scalar, (1, 5, 7, 13), qa=(0.05, 100), scalar=1.7)
    add("mul_scalar_neg", gen_mul_scalar, (1, 8, 8, 17), qa=(0.0234375, 31), scalar=-0.3)
    add("mul_scalar_zero", gen_mul_scalar, (1, 1, 1, 3), qa=(0.1, 200), scalar=0.0)
    add("mul_scalar_neg_zp0", gen_mul_scalar, (1, 5, 7, 3), qa=(0.0625, 0), scalar=-2.0)
    # cat
    add("cat_same_qparams_13_17", gen_cat, (1, 5, 7, 13), 17, qa=(0.05, 100), qb=(0.05, 100), out=(0.05, 100))
    add("cat_diff_qparams_17_13", gen_cat, (1, 8, 8, 17), 13)
    add("cat_diff_qparams_70_64_probe", gen_cat, (1, 5, 7, 70), 64, probe=True)
    add("cat_first_same_3_70_probe", gen_cat, (1, 8, 8, 3), 70, qa=(0.04, 7), qb=(0.02, 5), out=(0.04, 7),
        probe=True)
    add("cat_diff_qparams_1_1", gen_cat, (2, 1, 1, 1), 1)
    add("cat_diff_qparams_33_95_probe", gen_cat, (1, 5, 7, 33), 95, probe=True)
    # relu / relu6
    add("relu_5x7x13", gen_unary, (1, 5, 7, 13), "relu")
    add("relu_8x8x70_zp0", gen_unary, (1, 8, 8, 70), "relu", qa=(0.05, 0))
    add("relu_1x1x3_zp255", gen_unary, (1, 1, 1, 3), "relu", qa=(0.05, 255))
    add("relu6_5x7x17", gen_unary, (1, 5, 7, 17), "relu6", qa=(0.05, 100))
    add("relu6_8x8x13_q6_sat", gen_unary, (1, 8, 8, 13), "relu6", qa=(0.03125, 128))
    add("relu6_8x8x64_tie", gen_unary, (1, 8, 8, 64), "relu6", qa=(0.0625, 3))
    add("relu6_1x1x3", gen_unary, (1, 1, 1, 3), "relu6", qa=(0.25, 128))
    # hardswish
    for shp, tag in (((1, 5, 7, 13), "5x7x13"), ((1, 8, 8, 17), "8x8x17"), ((1, 8, 8, 70), "8x8x70")):
        add(f"hardswish_{tag}", gen_unary, shp, "hardswish")
        add(f"hardswish_{tag}_probe", gen_unary, shp, "hardswish", probe=True)
    add("hardswish_1x1x1", gen_unary, (1, 1, 1, 1), "hardswish")
    # hardsigmoid
    add("hardsigmoid_5x7x13", gen_unary, (1, 5, 7, 13), "hardsigmoid")
    add("hardsigmoid_8x8x70_probe", gen_unary, (1, 8, 8, 70), "hardsigmoid", probe=True)
    add("hardsigmoid_8x8x17_probe", gen_unary, (1, 8, 8, 17), "hardsigmoid", probe=True)
    add("hardsigmoid_1x1x3_zp0", gen_unary, (1, 1, 1, 3), "hardsigmoid", qa=(0.05, 0))
    # sigmoid / tanh
    add("sigmoid_5x7x13", gen_unary, (1, 5, 7, 13), "sigmoid")
    add("sigmoid_8x8x70_probe", gen_unary, (1, 8, 8, 70), "sigmoid", probe=True)
    add("sigmoid_8x8x17_probe", gen_unary, (1, 8, 8, 17), "sigmoid", probe=True)
    add("sigmoid_n2_8x8x17_wide", gen_unary, (2, 8, 8, 17), "sigmoid", lo_hi=(-20.0, 20.0))
    add("sigmoid_1x1x3", gen_unary, (1, 1, 1, 3), "sigmoid")
    add("tanh_5x7x13", gen_unary, (1, 5, 7, 13), "tanh", lo_hi=(-4.0, 4.0))
    add("tanh_8x8x70_probe", gen_unary, (1, 8, 8, 70), "tanh", lo_hi=(-4.0, 4.0), probe=True)
    add("tanh_8x8x17_probe", gen_unary, (1, 8, 8, 17), "tanh", lo_hi=(-4.0, 4.0), probe=True)
    add("tanh_1x1x1", gen_unary, (1, 1, 1, 1), "tanh")
    # leaky_relu
    add("leaky_relu_5x7x13", gen_unary, (1, 5, 7, 13), "leaky_relu", params={"negative_slope": float(F32(0.01))})
    add("leaky_relu_8x8x70_probe", gen_unary, (1, 8, 8, 70), "leaky_relu",
        params={"negative_slope": float(F32(0.1))}, probe=True)
    add("leaky_relu_8x8x17_probe", gen_unary, (1, 8, 8, 17), "leaky_relu",
        params={"negative_slope": float(F32(0.2))}, probe=True)
    add("leaky_relu_1x1x3", gen_unary, (1, 1, 1, 3), "leaky_relu", params={"negative_slope": float(F32(0.3))})
    # gelu
    add("gelu_5x7x13", gen_unary, (1, 5, 7, 13), "gelu", params={"approximate": "none"}, lo_hi=(-5.0, 5.0))
    add("gelu_8x8x70", gen_unary, (1, 8, 8, 70), "gelu", params={"approximate": "none"}, lo_hi=(-5.0, 5.0))
    add("gelu_8x8x17_probe", gen_unary, (1, 8, 8, 17), "gelu", params={"approximate": "none"},
        lo_hi=(-5.0, 5.0), probe=True)
    add("gelu_tanh_8x8x17", gen_unary, (1, 8, 8, 17), "gelu", params={"approximate": "tanh"}, lo_hi=(-5.0, 5.0))
    # (s, z, q) found by bisecting gelu_tanh(s*(q-z))/s onto k + 0.5: here x + k*x^3 with and
    # without fma contraction gives outputs one apart
    def gelu_tanh_probe(name, rng, shape, s, z, qv):
        p = gen_unary(name, rng, shape, "gelu", qa=(s, z), params={"approximate": "tanh"})
        d = p["inputs"][0]["data"].reshape(-1)
        d[rng.random(d.size) < 0.3] = qv
        return p

    add("gelu_tanh_8x8x17_probe", gelu_tanh_probe, (1, 8, 8, 17), 0.018260419368743896, 128, 29)
    add("gelu_tanh_5x7x13_probe", gelu_tanh_probe, (1, 5, 7, 13), 0.010231330059468746, 128, 30)
    add("gelu_1x1x3", gen_unary, (1, 1, 1, 3), "gelu", params={"approximate": "none"})
    # elu
    add("elu_5x7x13", gen_unary, (1, 5, 7, 13), "elu", params={"alpha": 1.0}, lo_hi=(-6.0, 4.0))
    add("elu_8x8x70_probe", gen_unary, (1, 8, 8, 70), "elu", params={"alpha": float(F32(0.5))},
        lo_hi=(-6.0, 4.0), probe=True)
    add("elu_1x1x70_probe", gen_unary, (1, 1, 1, 70), "elu", params={"alpha": 1.0}, lo_hi=(-6.0, 4.0), probe=True)
    add("elu_8x8x1_probe", gen_unary, (1, 8, 8, 1), "elu", params={"alpha": 1.0}, lo_hi=(-6.0, 4.0), probe=True)
    add("elu_8x8x17", gen_unary, (1, 8, 8, 17), "elu", params={"alpha": float(F32(1.5))}, lo_hi=(-4.0, 4.0))
    # max_pool2d
    mp = lambda k, s, pd, d=(1, 1), ceil=False: {"kernel": list(k), "stride": list(s), "padding": list(pd),
                                                  "dilation": list(d), "ceil_mode": ceil}
    add("max_pool2d_k2s2_8x8x17", pool_case, (1, 8, 8, 17), "max_pool2d", mp((2, 2), (2, 2), (0, 0)))
    add("max_pool2d_k3s2p1_5x7x70", pool_case, (1, 5, 7, 70), "max_pool2d", mp((3, 3), (2, 2), (1, 1)))
    add("max_pool2d_k3s2_ceil_5x7x13", pool_case, (1, 5, 7, 13), "max_pool2d", mp((3, 3), (2, 2), (0, 0), ceil=True))
    add("max_pool2d_k2s2p1_ceil_5x7x3", pool_case, (2, 5, 7, 3), "max_pool2d", mp((2, 2), (2, 2), (1, 1), ceil=True))
    add("max_pool2d_k3d2p2_8x8x64", pool_case, (1, 8, 8, 64), "max_pool2d", mp((3, 3), (1, 1), (1, 1), d=(2, 2)))
    add("max_pool2d_k2x3_s1x2_8x8x1", pool_case, (1, 8, 8, 1), "max_pool2d", mp((2, 3), (1, 2), (1, 1)))
    add("max_pool2d_k1_1x1x3", pool_case, (1, 1, 1, 3), "max_pool2d", mp((1, 1), (1, 1), (0, 0)))
    # avg_pool2d
    ap = lambda k, s, pd, ceil=False, cip=True, div=None: {"kernel": list(k), "stride": list(s), "padding": list(pd),
                                                           "ceil_mode": ceil, "count_include_pad": cip,
                                                           "divisor_override": div}
    add("avg_pool2d_k2s2_8x8x17", pool_case, (1, 8, 8, 17), "avg_pool2d", ap((2, 2), (2, 2), (0, 0)))
    add("avg_pool2d_k3s2p1_cip_5x7x70", pool_case, (1, 5, 7, 70), "avg_pool2d", ap((3, 3), (2, 2), (1, 1)))
    add("avg_pool2d_k3s2p1_nocip_5x7x70", pool_case, (1, 5, 7, 70), "avg_pool2d", ap((3, 3), (2, 2), (1, 1), cip=False))
    add("avg_pool2d_k3s2_ceil_5x7x13", pool_case, (1, 5, 7, 13), "avg_pool2d", ap((3, 3), (2, 2), (0, 0), ceil=True))
    add("avg_pool2d_k3s2p1_ceil_nocip_8x8x17", pool_case, (1, 8, 8, 17), "avg_pool2d",
        ap((3, 3), (2, 2), (1, 1), ceil=True, cip=False))
    add("avg_pool2d_k3s1p1_div5_8x8x64", pool_case, (1, 8, 8, 64), "avg_pool2d", ap((3, 3), (1, 1), (1, 1), div=5))
    add("avg_pool2d_k3x2_s1x2_5x7x3", pool_case, (2, 5, 7, 3), "avg_pool2d", ap((3, 2), (1, 2), (0, 0)))
    add("avg_pool2d_k3s3_div7_8x8x70", pool_case, (1, 8, 8, 70), "avg_pool2d", ap((3, 3), (3, 3), (0, 0), div=7))
    add("avg_pool2d_k5s1p2_5x7x33", pool_case, (1, 5, 7, 33), "avg_pool2d", ap((5, 5), (1, 1), (2, 2)))
    add("avg_pool2d_k1_1x1x1", pool_case, (1, 1, 1, 1), "avg_pool2d", ap((1, 1), (1, 1), (0, 0)))
    # near-tie probes: acc / divisor = +-254.5 where f32(acc * f32(1/d)) rounds away from the exact tie
    add("avg_pool2d_k2x7_div14_hi_probe", pool_case, (1, 5, 7, 17), "avg_pool2d", ap((2, 7), (1, 1), (0, 0)),
        qa=(0.05, 0), data_range=(254, 255))
    add("avg_pool2d_k5x6_div30_lo_probe", pool_case, (2, 5, 7, 70), "avg_pool2d", ap((5, 6), (1, 1), (0, 0)),
        qa=(0.05, 255), data_range=(0, 1))
    add("avg_pool2d_k3_div26_hi_probe", pool_case, (1, 8, 8, 33), "avg_pool2d",
        ap((3, 3), (1, 1), (1, 1), cip=True, div=26), qa=(0.05, 0), data_range=(254, 255))
    # adaptive_avg_pool2d
    aap = lambda o: {"output_size": list(o)}
    add("adaptive_avg_pool2d_global_5x7x70", pool_case, (1, 5, 7, 70), "adaptive_avg_pool2d", aap((1, 1)))
    add("adaptive_avg_pool2d_global_8x8x17", pool_case, (2, 8, 8, 17), "adaptive_avg_pool2d", aap((1, 1)))
    add("adaptive_avg_pool2d_7x7_to_3x3_x13", pool_case, (1, 7, 7, 13), "adaptive_avg_pool2d", aap((3, 3)))
    add("adaptive_avg_pool2d_5x7_to_2x3_x64", pool_case, (1, 5, 7, 64), "adaptive_avg_pool2d", aap((2, 3)))
    add("adaptive_avg_pool2d_8x8_to_4x4_x3", pool_case, (1, 8, 8, 3), "adaptive_avg_pool2d", aap((4, 4)))
    add("adaptive_avg_pool2d_8x8_to_3x5_x70", pool_case, (1, 8, 8, 70), "adaptive_avg_pool2d", aap((3, 5)))
    add("adaptive_avg_pool2d_1x1_to_1x1_x1", pool_case, (1, 1, 1, 1), "adaptive_avg_pool2d", aap((1, 1)))
    add("adaptive_avg_pool2d_8x7_to_4x1_size14_probe", pool_case, (1, 8, 7, 17), "adaptive_avg_pool2d", aap((4, 1)),
        qa=(0.05, 0), data_range=(254, 255))
    add("adaptive_avg_pool2d_5x6_global_size30_probe", pool_case, (2, 5, 6, 13), "adaptive_avg_pool2d", aap((1, 1)),
        qa=(0.05, 255), data_range=(0, 1))
    # upsample_nearest2d
    add("upsample_nearest2d_x2_5x7x13", pool_case, (1, 5, 7, 13), "upsample_nearest2d", {"scale_factor": 2.0})
    add("upsample_nearest2d_x2_1x1x70", pool_case, (1, 1, 1, 70), "upsample_nearest2d", {"scale_factor": 2.0})
    add("upsample_nearest2d_x2_n2_8x8x3", pool_case, (2, 8, 8, 3), "upsample_nearest2d", {"scale_factor": 2.0})
    add("upsample_nearest2d_x3_5x7x3", pool_case, (1, 5, 7, 3), "upsample_nearest2d", {"scale_factor": 3.0})
    add("upsample_nearest2d_size_5x7_to_8x11", pool_case, (1, 5, 7, 17), "upsample_nearest2d", {"size": [8, 11]})
    add("upsample_nearest2d_size_8x8_to_5x3", pool_case, (1, 8, 8, 3), "upsample_nearest2d", {"size": [5, 3]})
    # quantize / dequantize
    add("quantize_5x7x13", gen_quantize, (1, 5, 7, 13))
    add("quantize_8x8x17_zp128_ties", gen_quantize, (1, 8, 8, 17), out=(0.0234375, 128), kind="ties")
    add("quantize_5x7x70_odd_ties", gen_quantize, (1, 5, 7, 70), kind="ties")
    add("quantize_1x1x3_zp0", gen_quantize, (1, 1, 1, 3), out=(0.1, 0))
    add("quantize_special_zp100", gen_quantize, (1, 2, 3, 4), out=(0.0625, 100), kind="special")
    add("quantize_special_zp200", gen_quantize, (1, 2, 3, 4), out=(0.0625, 200), kind="special")
    add("dequantize_5x7x13", pool_case, (1, 5, 7, 13), "dequantize", {})
    add("dequantize_8x8x70_zp128", pool_case, (1, 8, 8, 70), "dequantize", {}, qa=(0.0123, 128))
    add("dequantize_1x1x1", pool_case, (1, 1, 1, 1), "dequantize", {})
    # batch_norm2d
    add("batch_norm2d_5x7x13", gen_bn, (1, 5, 7, 13))
    add("batch_norm2d_8x8x64", gen_bn, (1, 8, 8, 64))
    add("batch_norm2d_5x7x70", gen_bn, (1, 5, 7, 70))
    add("batch_norm2d_n2_8x8x17", gen_bn, (2, 8, 8, 17))
    add("batch_norm2d_1x1x3", gen_bn, (1, 1, 1, 3))
    add("batch_norm2d_8x8x13_probe", gen_bn, (1, 8, 8, 13), probe=True)
    add("batch_norm2d_5x7x70_probe", gen_bn, (1, 5, 7, 70), probe=True)
    add("batch_norm2d_8x8x3_probe", gen_bn, (1, 8, 8, 3), probe=True)
    # layer_norm (over C of NHWC data)
    add("layer_norm_5x7x13", gen_ln, (1, 5, 7, 13))
    add("layer_norm_8x8x64", gen_ln, (1, 8, 8, 64))
    add("layer_norm_5x7x70", gen_ln, (1, 5, 7, 70))
    add("layer_norm_8x8x17_narrow", gen_ln, (1, 8, 8, 17), narrow=True)
    add("layer_norm_1x1x3", gen_ln, (1, 1, 1, 3))
    add("layer_norm_8x8x70_probe", gen_ln, (1, 8, 8, 70), probe=True)
    add("layer_norm_8x8x13_probe", gen_ln, (1, 8, 8, 13), probe=True)
    return cases


# --------------------------------------------------------------------------
# stress: random cases per op (not written)


def stress_cases(count, seed=12345):
    rng = np.random.default_rng(seed)
    out = []
    shapes = S_ + [(1, 3, 9, 29), (1, 4, 4, 100), (1, 2, 3, 129), (1, 7, 7, 48)]
    for k in range(count):
        shp = tuple(shapes[rng.integers(len(shapes))])
        nm = f"stress{k}"
        r = np.random.default_rng(rng.integers(1 << 62))
        out.append(gen_add(nm + "_add", r, shp))
        out.append(gen_add(nm + "_add_relu", r, shp, op="add_relu"))
        out.append(gen_mul(nm + "_mul", r, shp))
        out.append(gen_add_scalar(nm + "_adds", r, shp))
        out.append(gen_mul_scalar(nm + "_muls", r, shp))
        out.append(gen_cat(nm + "_cat", r, shp, int(r.integers(1, 100))))
        for op in ("relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "tanh"):
            out.append(gen_unary(f"{nm}_{op}", r, shp, op))
        out.append(gen_unary(nm + "_lrelu", r, shp, "leaky_relu",
                             params={"negative_slope": float(F32(r.uniform(0.01, 0.5)))}))
        out.append(gen_unary(nm + "_gelu", r, shp, "gelu", params={"approximate": "none"}, lo_hi=(-5.0, 5.0)))
        out.append(gen_unary(nm + "_gelut", r, shp, "gelu", params={"approximate": "tanh"}, lo_hi=(-5.0, 5.0)))
        out.append(gen_unary(nm + "_elu", r, shp, "elu", params={"alpha": float(F32(r.uniform(0.2, 2.0)))},
                             lo_hi=(-6.0, 4.0)))
        n, h, w, c = shp
        kh, kw = int(r.integers(1, min(h, 3) + 1)), int(r.integers(1, min(w, 3) + 1))
        ph, pw = int(r.integers(0, kh // 2 + 1)), int(r.integers(0, kw // 2 + 1))
        sh, sw = int(r.integers(1, 3)), int(r.integers(1, 3))
        ceil = bool(r.integers(0, 2))
        out.append(pool_case(nm + "_maxp", r, shp, "max_pool2d",
                             {"kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw], "dilation": [1, 1],
                              "ceil_mode": ceil}))
        out.append(pool_case(nm + "_avgp", r, shp, "avg_pool2d",
                             {"kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw], "ceil_mode": ceil,
                              "count_include_pad": bool(r.integers(0, 2)),
                              "divisor_override": int(r.integers(1, 12)) if r.random() < 0.3 else None}))
        out.append(pool_case(nm + "_aavgp", r, shp, "adaptive_avg_pool2d",
                             {"output_size": [int(r.integers(1, h + 1)), int(r.integers(1, w + 1))]}))
        out.append(gen_quantize(nm + "_quant", r, shp, kind="ties" if r.random() < 0.5 else "normal"))
        out.append(pool_case(nm + "_deq", r, shp, "dequantize", {}))
        out.append(gen_bn(nm + "_bn", r, shp))
        out.append(gen_ln(nm + "_ln", r, shp))
    return out


# --------------------------------------------------------------------------
# checking


def _with_flag_model(flag_dict, key, value, fn):
    """Like _with_flag but keeps the model's (data, scale, zp) return."""
    def run(p, exact=True):
        old = flag_dict[key]
        flag_dict[key] = value
        try:
            return fn(p, exact)
        finally:
            flag_dict[key] = old
    return run


def _with_flag(flag_dict, key, value, fn):
    def run(p):
        old = flag_dict[key]
        flag_dict[key] = value
        try:
            return fn(p)[0]
        finally:
            flag_dict[key] = old
    return run


def _avg_variant(p, kind):
    """Alternative avg-pool roundings: 'rational' = rne(acc / divisor) exactly;
    'zp_before' = rne(f32(acc * m) + zp) (zero point added before rounding)."""
    a = p["inputs"][0]
    x = a["data"].astype(np.int64)
    N, H, W, C = x.shape
    pr = p["params"]
    z = a["zp"]
    if p["op"] == "adaptive_avg_pool2d":
        oh, ow = pr["output_size"]
        wins = [((hs, he), (ws, we), (he - hs) * (we - ws))
                for (hs, he) in adaptive_ranges(H, oh) for (ws, we) in adaptive_ranges(W, ow)]
    else:
        (kh, kw), (sh, sw), (ph, pw) = pr["kernel"], pr["stride"], pr["padding"]
        oh = pool_out_size(H, kh, ph, sh, 1, pr["ceil_mode"])
        ow = pool_out_size(W, kw, pw, sw, 1, pr["ceil_mode"])
        wins = []
        for i in range(oh):
            for j in range(ow):
                hs, ws = i * sh - ph, j * sw - pw
                he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
                pool = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
                size = (he - hs) * (we - ws)
                wins.append(((hs, he), (ws, we), pr["divisor_override"] or (pool if pr["count_include_pad"] else size)))
    out = np.zeros((N, len(wins), C), np.int64)
    for k, ((hs, he), (ws, we), div) in enumerate(wins):
        size = (he - hs) * (we - ws)
        acc = x[:, hs:he, ws:we, :].sum(axis=(1, 2)) - z * size
        if kind == "rational":
            # round half to even of acc / div, exactly
            fl = np.floor_divide(acc, div)
            rem2 = 2 * (acc - fl * div)
            up = (rem2 > div) | ((rem2 == div) & (fl % 2 == 1))
            r = fl + up
        else:
            r = rne(acc.astype(F32) * (F32(1) / F32(div)) + F32(z)) - z
        out[:, k, :] = np.clip(r + z, 0, 255)
    return out


def _quant_variant(p, kind):
    x = p["inputs"][0]["f32_nchw"].astype(F32)
    s, z = F32(p["out_scale"]), p["out_zp"]
    if kind == "divide":
        q = rne(x / s) + z
    else:  # legacy fbgemm: rne(zp + x * inv)
        q = rne(F32(z) + x * inv_f32(s))
    return np.clip(q, 0, 255).astype(np.int64).transpose(0, 2, 3, 1)


ALTS = {
    "batch_norm2d": [("scalar tail alpha*d+beta without fma", _with_flag(BN_SCALAR_FMA, 0, False, model_batch_norm2d))],
    "layer_norm": [("var without fma", _with_flag(LN_FMA, "var", False, model_layer_norm)),
                   ("vector y = t*g+b without fma", _with_flag(LN_FMA, "y_vec", False, model_layer_norm)),
                   ("scalar y = t*g+b without fma", _with_flag(LN_FMA, "y_sca", False, model_layer_norm))],
    "avg_pool2d": [("rational rne(acc/div)", lambda p: _avg_variant(p, "rational")),
                   ("zp added before rounding", lambda p: _avg_variant(p, "zp_before"))],
    "adaptive_avg_pool2d": [("rational rne(acc/size)", lambda p: _avg_variant(p, "rational")),
                            ("zp added before rounding", lambda p: _avg_variant(p, "zp_before"))],
    "quantize_nchw_to_nhwc": [("x / s (divide)", lambda p: _quant_variant(p, "divide")),
                              ("rne(zp + x*inv) (legacy)", lambda p: _quant_variant(p, "legacy"))],
    "dequantize": [("fma(s, q, s*-z)", lambda p: dq_vector(p["inputs"][0]["data"], p["inputs"][0]["scale"],
                                                         p["inputs"][0]["zp"]))],
    "sigmoid": [("all elements vector path", _with_flag(FORCE, 0, "vector", model_sigmoid))],
    "gelu": [("all elements vector path", _with_flag(FORCE, 0, "vector", model_gelu)),
             ("tanh-gelu vector: x + k*cube without fma", _with_flag(GELU_TANH_FMA, 0, False, model_gelu))],
    "add": [("all elements vector path", _with_flag(FORCE, 0, "vector", MODELS["add"]))],
    "cat": [("all channels vector path", _with_flag(FORCE, 0, "vector", model_cat))],
    "hardswish": [("all elements vector path", _with_flag(FORCE, 0, "vector", model_hardswish))],
    "elu": [("flat vector/scalar split as for channels_last outputs",
             lambda p: _unary_float(p, True, *ELU_FNS(p), p["out_scale"], p["out_zp"],
                                    inv_f32(p["out_scale"]))[0])],
}


def ELU_FNS(p):
    alpha = F32(p["params"]["alpha"])
    fv = lambda x: np.where(x > 0, x, f32_fn(np.expm1, x) * alpha).astype(F32)
    fs = lambda x: np.where(x >= 0, x, f32_fn(np.expm1, x) * alpha).astype(F32)
    return fv, fs


def same(a, b, op):
    if op == "dequantize":
        return (np.asarray(a, F32).view(np.uint32).reshape(-1) == np.asarray(b, F32).view(np.uint32).reshape(-1))
    return np.asarray(a).reshape(-1).astype(np.int64) == np.asarray(b).reshape(-1).astype(np.int64)


def compare(p, res):
    """-> (n_elems, exact_ok, plain_ok, qparams_ok, detail, {alt_label: ok})"""
    y, ys, yz = res
    op = p["op"]
    fn = MODELS[op]
    me, mse, mze = fn(p, exact=True)
    mp_ = fn(p, exact=False)[0]
    n = np.asarray(y).size
    if np.asarray(me).size != n:
        return n, 0, 0, False, f"shape {np.asarray(me).shape} vs {np.asarray(y).shape}", {}
    alts = {label: int(same(f(p), y, op).sum()) for label, f in ALTS.get(op, [])}
    if op == "dequantize":
        qok, detail = True, ""
    else:
        qok = (ys == float(mse)) and (yz == mze)
        detail = "" if qok else f"qparams torch ({ys!r},{yz}) model ({float(mse)!r},{mze})"
    return n, int(same(me, y, op).sum()), int(same(mp_, y, op).sum()), qok, detail, alts


def check(cases, title):
    stats = {}
    bad = []
    results = []
    for p in cases:
        res = run_torch(p)
        results.append(res)
        n, ok_e, ok_p, qok, detail, alts = compare(p, res)
        st = stats.setdefault(p["op"], {"cases": 0, "n": 0, "exact": 0, "plain": 0, "qbad": 0, "alts": {}})
        st["cases"] += 1
        st["n"] += n
        st["exact"] += ok_e
        st["plain"] += ok_p
        st["qbad"] += 0 if qok else 1
        for k, v in alts.items():
            st["alts"][k] = st["alts"].get(k, 0) + v
        if ok_e != n or not qok:
            bad.append((p["name"], n - ok_e, n, detail))
    print(f"== {title}: {len(cases)} cases")
    print(f"{'op':24s} {'cases':>5s} {'elems':>8s} {'exact model':>12s} {'plain':>9s} {'qp_bad':>6s}")
    for op, st in stats.items():
        n = st["n"]
        print(f"{op:24s} {st['cases']:5d} {n:8d} {100.0 * st['exact'] / n:11.4f}% "
              f"{100.0 * st['plain'] / n:8.3f}% {st['qbad']:6d}")
        for k, v in st["alts"].items():
            print(f"{'':24s}   alt: {k:52s} {100.0 * v / n:9.4f}%")
    for b in bad[:40]:
        print("  MISMATCH", b)
    return results, stats, bad


# --------------------------------------------------------------------------
# JSON records


def qrec(data, scale, zp, scale64=None):
    r = {"shape_nhwc": list(np.asarray(data).shape), "scale": f32_bit(scale), "zero_point": int(zp),
         "data": ints(data)}
    if scale64 is not None:
        r["scale_f64_bits"] = f64_bit(scale64)
    return r


def jparams(p):
    out = {}
    for k, v in p["params"].items():
        if isinstance(v, np.ndarray):
            out[k] = f32_bits(v)
        elif isinstance(v, float):
            out[k] = f32_bit(v)
        else:
            out[k] = v
    return out


def record(p, res):
    y, ys, yz = res
    rec = {"name": p["name"], "op": p["op"], "params": jparams(p)}
    if p["op"] == "quantize_nchw_to_nhwc":
        x = p["inputs"][0]["f32_nchw"]
        rec["inputs"] = [{"shape_nchw": list(x.shape), "data_f32_nchw": f32_bits(x)}]
    else:
        rec["inputs"] = [qrec(i["data"], i["scale"], i["zp"]) for i in p["inputs"]]
    if p["op"] == "dequantize":
        rec["output"] = {"shape_nhwc": list(y.shape), "data_f32_nhwc": f32_bits(y)}
    else:
        assert float(F32(ys)) == ys or p["op"] in ("add_scalar", "mul_scalar"), (p["name"], ys)
        rec["output"] = qrec(y, ys, yz, scale64=ys)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--stress", type=int, default=0, help="also check N random cases per op (not written)")
    args = ap.parse_args()
    torch.backends.quantized.engine = ENGINE
    torch.set_num_threads(1)
    print("torch", torch.__version__, "engine", ENGINE, "cpu", torch.backends.cpu.get_cpu_capability())
    cases = fixture_cases()
    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names)
    results, _, _ = check(cases, "fixtures")
    if args.stress:
        check(stress_cases(args.stress), f"stress x{args.stress}")
    if not args.no_write:
        top = {"torch_version": torch.__version__, "engine": ENGINE, "num_threads": 1,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cases": [record(p, r) for p, r in zip(cases, results)]}
        os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
        write_json(OUT_PATH, top)
        print("wrote", os.path.normpath(OUT_PATH), os.path.getsize(OUT_PATH), "bytes")


if __name__ == "__main__":
    main()
