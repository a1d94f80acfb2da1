//! Everything between the convolutions, on `u8` NHWC activations: binary ops with
//! requantization, concatenation, activations through 256-entry lookup tables, and the
//! float boundaries (quantize NCHW f32 to u8 NHWC, dequantize back).
//!
//! Each op follows PyTorch's `quantized::*` kernel (x86 engine) and is tested against
//! fixtures PyTorch wrote.

use qtensor::{QError, Result};

use crate::conv::QImage;

/// Scale and zero point of a `u8` tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantU8 {
    /// Scale (> 0).
    pub scale: f32,
    /// Zero point in `0..=255`.
    pub zero_point: i32,
}

impl QuantU8 {
    /// Checked constructor.
    ///
    /// # Errors
    /// An invalid scale or a zero point outside `0..=255`.
    pub fn new(scale: f32, zero_point: i32) -> Result<Self> {
        let q = QuantU8 { scale, zero_point };
        q.check("QuantU8::new")?;
        Ok(q)
    }

    pub(crate) fn check(&self, op: &'static str) -> Result<()> {
        qtensor::QParams::per_tensor(self.scale, self.zero_point).map_err(|_| QError::InvalidScale {
            op,
            scale: self.scale,
            channel: None,
        })?;
        if !(0..=255).contains(&self.zero_point) {
            return Err(QError::ZeroPointOutOfRange {
                op,
                zero_point: self.zero_point as i64,
                channel: None,
                qmin: 0,
                qmax: 255,
                dtype: qtensor::DType::U8,
            });
        }
        Ok(())
    }

    /// The quantization of an image.
    pub fn of(x: &QImage<'_>) -> Self {
        QuantU8 { scale: x.scale, zero_point: x.zero_point }
    }

    /// `q -> real`, as PyTorch's vectorised elementwise kernels dequantize:
    /// `fma(scale, q, scale * -zero_point)` with the product `scale * -zp` rounded first.
    #[inline(always)]
    pub fn dequantize(&self, q: u8) -> f32 {
        self.scale.mul_add(q as f32, self.scale * -(self.zero_point as f32))
    }

    /// `real -> q`: `clamp(zp + round_half_even(x * (1 / scale)), 0, 255)`.
    #[inline(always)]
    pub fn quantize(&self, x: f32) -> u8 {
        qtensor::kernels::quantize_scalar(x, 1.0 / self.scale, self.zero_point, 0, 255) as u8
    }
}

fn same_len(op: &'static str, a: usize, b: usize, what: &'static str) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(QError::ShapeMismatch { op, expected: vec![a], actual: vec![b], hint: what })
    }
}

/// Elementwise `out = Q_out(dq_a(a) + dq_b(b))` (with `relu`: `max(.., 0)` before
/// quantizing): PyTorch's `quantized::add` / `add_relu`. Shapes must match (no broadcast).
///
/// # Errors
/// Lengths that differ; invalid quantization parameters.
pub fn add(a: &[u8], qa: QuantU8, b: &[u8], qb: QuantU8, out: &mut [u8], qo: QuantU8, relu: bool) -> Result<()> {
    const OP: &str = "qkernels::add";
    same_len(OP, a.len(), b.len(), "both operands must have the same number of elements (no broadcasting)")?;
    same_len(OP, a.len(), out.len(), "the output must have as many elements as the inputs")?;
    for q in [qa, qb, qo] {
        q.check(OP)?;
    }
    add_with(qtensor::isa::selected(), a, qa, b, qb, out, qo, relu);
    Ok(())
}

/// [`add`]'s loops with an explicit instruction set (no checks: `add` did them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_with(
    isa: qtensor::isa::Isa,
    a: &[u8],
    qa: QuantU8,
    b: &[u8],
    qb: QuantU8,
    out: &mut [u8],
    qo: QuantU8,
    relu: bool,
) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.capped_to_supported() >= qtensor::isa::Isa::Avx512Vnni {
        // SAFETY: the tier is supported by this CPU, so AVX-512 F/BW are; lengths were checked.
        done = unsafe {
            crate::x86::add_u8_avx512(
                a,
                (qa.scale, qa.zero_point),
                b,
                (qb.scale, qb.zero_point),
                out,
                (qo.scale, qo.zero_point),
                relu,
            )
        };
    }
    let _ = isa;
    for ((x, y), o) in a[done..].iter().zip(&b[done..]).zip(out[done..].iter_mut()) {
        let mut c = qa.dequantize(*x) + qb.dequantize(*y);
        if relu {
            c = c.max(0.0);
        }
        *o = qo.quantize(c);
    }
}

/// [`add`] with an explicit instruction set, for conformance tests.
///
/// # Errors
/// As [`add`].
#[allow(clippy::too_many_arguments)]
pub fn add_isa(
    isa: qtensor::isa::Isa,
    a: &[u8],
    qa: QuantU8,
    b: &[u8],
    qb: QuantU8,
    out: &mut [u8],
    qo: QuantU8,
    relu: bool,
) -> Result<()> {
    const OP: &str = "qkernels::add";
    same_len(OP, a.len(), b.len(), "both operands must have the same number of elements (no broadcasting)")?;
    same_len(OP, a.len(), out.len(), "the output must have as many elements as the inputs")?;
    for q in [qa, qb, qo] {
        q.check(OP)?;
    }
    add_with(isa, a, qa, b, qb, out, qo, relu);
    Ok(())
}

/// Elementwise `out = zo + round((a - za)(b - zb) * (sa * sb / so))` in integers then f32
/// (PyTorch's `quantized::mul`), clamped to `u8`.
///
/// # Errors
/// As [`add`].
pub fn mul(a: &[u8], qa: QuantU8, b: &[u8], qb: QuantU8, out: &mut [u8], qo: QuantU8) -> Result<()> {
    const OP: &str = "qkernels::mul";
    same_len(OP, a.len(), b.len(), "both operands must have the same number of elements (no broadcasting)")?;
    same_len(OP, a.len(), out.len(), "the output must have as many elements as the inputs")?;
    for q in [qa, qb, qo] {
        q.check(OP)?;
    }
    let multiplier = qa.scale * qb.scale / qo.scale;
    for ((x, y), o) in a.iter().zip(b).zip(out.iter_mut()) {
        let prod = (*x as i32 - qa.zero_point) * (*y as i32 - qb.zero_point);
        *o = requantize_from_int(prod, multiplier, qo.zero_point);
    }
    Ok(())
}

/// PyTorch's `requantize_from_int`: `clamp(zp + round_half_even(src * multiplier), 0, 255)`
/// with the product in f32.
#[inline(always)]
pub fn requantize_from_int(src: i32, multiplier: f32, zp: i32) -> u8 {
    let r = (src as f32 * multiplier).clamp(-16_777_216.0, 16_777_216.0).round_ties_even() as i32;
    (r + zp).clamp(0, 255) as u8
}

/// Concatenation along channels of NHWC inputs with the same batch and spatial size, into
/// `out` with quantization `qo`: inputs with `qo`'s parameters are copied, the others
/// requantized (`Q_out(dq_in(q))`), as PyTorch's `quantized::cat` on channels-last tensors.
///
/// # Errors
/// Inputs whose batch or spatial sizes differ, an output of the wrong size.
pub fn cat_channels(inputs: &[QImage<'_>], out: &mut [u8], qo: QuantU8) -> Result<()> {
    const OP: &str = "qkernels::cat_channels";
    qo.check(OP)?;
    let Some(first) = inputs.first() else {
        return Err(QError::Unsupported { op: OP, reason: "nothing to concatenate: give at least one input".into() });
    };
    let (n, h, w) = (first.n, first.h, first.w);
    for x in inputs {
        if (x.n, x.h, x.w) != (n, h, w) || x.data.len() != n * h * w * x.c {
            return Err(QError::ShapeMismatch {
                op: OP,
                expected: vec![n, h, w, x.c],
                actual: vec![x.n, x.h, x.w, x.c],
                hint: "every input must have the first input's batch, height and width (NHWC)",
            });
        }
        QuantU8::of(x).check(OP)?;
    }
    let c_total: usize = inputs.iter().map(|x| x.c).sum();
    same_len(OP, n * h * w * c_total, out.len(), "the output must hold n * h * w * (sum of channels)")?;
    let tables: Vec<Option<[u8; 256]>> = inputs
        .iter()
        .map(|x| {
            let qi = QuantU8::of(x);
            (qi != qo).then(|| std::array::from_fn(|q| qo.quantize(qi.dequantize(q as u8))))
        })
        .collect();
    for (p, dst) in out.chunks_exact_mut(c_total).enumerate() {
        let mut off = 0;
        for (x, t) in inputs.iter().zip(&tables) {
            let src = &x.data[p * x.c..(p + 1) * x.c];
            match t {
                None => dst[off..off + x.c].copy_from_slice(src),
                Some(t) => {
                    for (d, s) in dst[off..off + x.c].iter_mut().zip(src) {
                        *d = t[*s as usize];
                    }
                }
            }
            off += x.c;
        }
    }
    Ok(())
}

/// A 256-entry table `u8 -> u8`: any unary function of a `u8` tensor, exact by construction
/// (each entry is the function applied to that one input value), applied with AVX-512 VBMI
/// byte permutes where the CPU has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lut {
    table: [u8; 256],
}

impl Lut {
    /// The table of `q -> Q_out(f(dq_in(q)))`.
    pub fn from_fn(qin: QuantU8, qout: QuantU8, f: impl Fn(f32) -> f32) -> Self {
        Lut { table: std::array::from_fn(|q| qout.quantize(f(qin.dequantize(q as u8)))) }
    }

    /// A table from raw entries.
    pub fn from_table(table: [u8; 256]) -> Self {
        Lut { table }
    }

    /// The entries.
    pub fn table(&self) -> &[u8; 256] {
        &self.table
    }

    /// ReLU in the integer domain: `max(q, zp)`, same parameters (PyTorch's quantized relu).
    pub fn relu(q: QuantU8) -> Self {
        Lut { table: std::array::from_fn(|v| (v as i32).max(q.zero_point) as u8) }
    }

    /// ReLU6: `min(max(q, zp), Q(6.0))`, same parameters.
    pub fn relu6(q: QuantU8) -> Self {
        let six = q.quantize(6.0) as i32;
        Lut { table: std::array::from_fn(|v| (v as i32).max(q.zero_point).min(six.max(q.zero_point)) as u8) }
    }

    /// `out[i] = table[x[i]]`.
    ///
    /// # Errors
    /// Lengths that differ.
    pub fn apply(&self, x: &[u8], out: &mut [u8]) -> Result<()> {
        same_len("Lut::apply", x.len(), out.len(), "the output must have as many elements as the input")?;
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if qtensor::isa::selected() >= qtensor::isa::Isa::Avx512Vnni && is_x86_feature_detected!("avx512vbmi") {
            // SAFETY: AVX-512 F/BW and VBMI were detected just above.
            done = unsafe { crate::x86::lut_avx512vbmi(&self.table, x, out) };
        }
        for (o, v) in out[done..].iter_mut().zip(&x[done..]) {
            *o = self.table[*v as usize];
        }
        Ok(())
    }

    /// [`Lut::apply`] with the scalar loop only: the reference.
    ///
    /// # Errors
    /// Lengths that differ.
    pub fn apply_scalar(&self, x: &[u8], out: &mut [u8]) -> Result<()> {
        same_len("Lut::apply", x.len(), out.len(), "the output must have as many elements as the input")?;
        for (o, v) in out.iter_mut().zip(x) {
            *o = self.table[*v as usize];
        }
        Ok(())
    }
}

/// The unary activations PyTorch quantizes, with the output parameters PyTorch uses when
/// they are fixed (sigmoid, hardsigmoid: 1/256, 0; tanh: 2/256, 128; relu, relu6: the input's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// `x * relu6(x + 3) / 6`.
    Hardswish,
    /// `relu6(x + 3) / 6`.
    Hardsigmoid,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
    /// `x` if positive, else `slope * x`.
    LeakyRelu(f32),
    /// `x * Φ(x)` (exact erf form).
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
}

impl UnaryOp {
    /// The output parameters PyTorch fixes for this activation, if it does.
    pub fn fixed_output(&self, input: QuantU8) -> Option<QuantU8> {
        match self {
            UnaryOp::Relu | UnaryOp::Relu6 => Some(input),
            UnaryOp::Sigmoid | UnaryOp::Hardsigmoid => Some(QuantU8 { scale: 1.0 / 256.0, zero_point: 0 }),
            UnaryOp::Tanh => Some(QuantU8 { scale: 2.0 / 256.0, zero_point: 128 }),
            _ => None,
        }
    }

    /// The float function.
    pub fn eval(&self, x: f32) -> f32 {
        match *self {
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Relu6 => x.clamp(0.0, 6.0),
            UnaryOp::Hardswish => x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
            UnaryOp::Hardsigmoid => (x + 3.0).clamp(0.0, 6.0) / 6.0,
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::LeakyRelu(s) => {
                if x > 0.0 {
                    x
                } else {
                    x * s
                }
            }
            UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
        }
    }

    /// The lookup table from `input` to `output` parameters (relu and relu6 stay in the
    /// integer domain, as in PyTorch, when the parameters are the same).
    pub fn lut(&self, input: QuantU8, output: QuantU8) -> Lut {
        match self {
            UnaryOp::Relu if input == output => Lut::relu(input),
            UnaryOp::Relu6 if input == output => Lut::relu6(input),
            _ => Lut::from_fn(input, output, |x| self.eval(x)),
        }
    }
}

/// Quantizes an NCHW `f32` tensor straight into NHWC `u8` in one pass (the model input
/// boundary): `out[n][h][w][c] = Q(x[n][c][h][w])`.
///
/// # Errors
/// A length that does not match the shape, invalid parameters, NaN in the input.
pub fn quantize_nchw_to_nhwc(
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    q: QuantU8,
    out: &mut [u8],
) -> Result<()> {
    const OP: &str = "qkernels::quantize_nchw_to_nhwc";
    q.check(OP)?;
    same_len(OP, n * c * h * w, x.len(), "the input must hold n * c * h * w values (NCHW)")?;
    same_len(OP, x.len(), out.len(), "the output must hold n * h * w * c values (NHWC)")?;
    if let Some(i) = x.iter().position(|v| v.is_nan()) {
        return Err(QError::NanInput { op: OP, index: i, shape: vec![n, c, h, w] });
    }
    let inv = 1.0 / q.scale;
    let hw = h * w;
    for b in 0..n {
        let src = &x[b * c * hw..(b + 1) * c * hw];
        let dst = &mut out[b * c * hw..(b + 1) * c * hw];
        for ch in 0..c {
            let plane = &src[ch * hw..(ch + 1) * hw];
            for (p, &v) in plane.iter().enumerate() {
                dst[p * c + ch] = qtensor::kernels::quantize_scalar(v, inv, q.zero_point, 0, 255) as u8;
            }
        }
    }
    Ok(())
}

/// Dequantizes NHWC `u8` straight into NCHW `f32` in one pass (the model output boundary):
/// `out[n][c][h][w] = scale * (q - zp)`.
///
/// # Errors
/// A length that does not match the shape, invalid parameters.
pub fn dequantize_nhwc_to_nchw(
    x: &[u8],
    (n, h, w, c): (usize, usize, usize, usize),
    q: QuantU8,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "qkernels::dequantize_nhwc_to_nchw";
    q.check(OP)?;
    same_len(OP, n * h * w * c, x.len(), "the input must hold n * h * w * c values (NHWC)")?;
    same_len(OP, x.len(), out.len(), "the output must hold n * c * h * w values (NCHW)")?;
    let hw = h * w;
    for b in 0..n {
        let src = &x[b * c * hw..(b + 1) * c * hw];
        let dst = &mut out[b * c * hw..(b + 1) * c * hw];
        for (p, px) in src.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                dst[ch * hw + p] = qtensor::kernels::dequantize_scalar(v as i32, q.scale, q.zero_point);
            }
        }
    }
    Ok(())
}
