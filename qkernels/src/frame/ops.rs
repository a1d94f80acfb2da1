//! Everything between the convolutions, on `u8` NHWC activations: binary ops with
//! requantization, concatenation, activations through 256-entry lookup tables, and the
//! float boundaries (quantize NCHW f32 to u8 NHWC, dequantize back).
//!
//! Each op follows PyTorch's `quantized::*` kernel (x86 engine) and is tested against
//! fixtures PyTorch wrote, bit for bit. One PyTorch detail shapes several ops: its elementwise
//! kernels run a vector loop over the first `n - n % 64` elements of the flat buffer and a
//! scalar loop over the rest, and the two dequantize differently (`fma(s, q, s * -z)` against
//! `s * (q - z)`), so an element's result can depend on its position. We reproduce that
//! ([`vector_prefix`]), so results are identical, not merely within one step.

use qtensor::{DType, QError, QuantRange, Result};

use crate::frame::conv::QImage;
use qtensor::multiversion;

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

    /// `q -> real` as PyTorch's vector loops dequantize: `fma(scale, q, scale * -zero_point)`,
    /// the product `scale * -zp` rounded first.
    #[inline(always)]
    pub fn dequantize_vec(&self, q: u8) -> f32 {
        self.scale.mul_add(q as f32, self.scale * -(self.zero_point as f32))
    }

    /// `q -> real` as PyTorch's scalar loops (and `Tensor::dequantize`) do: `scale * (q - zp)`.
    #[inline(always)]
    pub fn dequantize(&self, q: u8) -> f32 {
        self.scale * (q as i32 - self.zero_point) as f32
    }

    /// `real -> q`: `clamp(zp + round_half_even(x * (1 / scale)), 0, 255)`.
    #[inline(always)]
    pub fn quantize(&self, x: f32) -> u8 {
        qtensor::kernels::quantize_scalar(x, 1.0 / self.scale, self.zero_point, 0, 255) as u8
    }
}

/// How many leading elements of a flat buffer of `n` PyTorch's elementwise kernels process in
/// their vector loop (64 bytes at a time); the rest go through the scalar loop.
pub fn vector_prefix(n: usize) -> usize {
    n - n % 64
}

fn same_len(op: &'static str, a: usize, b: usize, what: &'static str) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(QError::ShapeMismatch { op, expected: vec![a], actual: vec![b], hint: what })
    }
}

/// Elementwise `out = Q_out(dq_a(a) + dq_b(b))` (with `relu`: `max(.., 0)` before
/// quantizing): PyTorch's `quantized::add` / `add_relu`, dequantizing as PyTorch does at each
/// position ([`vector_prefix`]). Shapes must match (no broadcast).
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
    let n = a.len();
    assert!(b.len() == n && out.len() == n, "add_with: operands of one length");
    // SAFETY: three slices of n elements; `out` is borrowed mutably, so it overlaps neither.
    unsafe { add_raw(isa, a.as_ptr(), qa, b.as_ptr(), qb, out.as_mut_ptr(), qo, relu, n, 0, vector_prefix(n)) }
}

/// `acc = add(acc, other)` in place over a block of `rows` rows of `ncols` elements, row `r`
/// at `r * ld` in both: [`add`]'s arithmetic on `acc` (quantized with `qa`) and `other`, for
/// a block whose element 0 has flat index `flat0` in tensors whose vector loop covers the
/// first `split` elements ([`vector_prefix`] of their length), so each element gets the
/// formula its position gets in [`add`]. Only the block's elements are touched.
///
/// # Safety
/// The block's elements are readable and writable at `acc` and readable at `other`, and
/// nothing else accesses them meanwhile; `other`'s do not overlap `acc`'s; `ncols <= ld`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn add_assign_block(
    isa: qtensor::isa::Isa,
    acc: *mut u8,
    qa: QuantU8,
    other: *const u8,
    qb: QuantU8,
    qo: QuantU8,
    relu: bool,
    (rows, ncols, ld): (usize, usize, usize),
    (flat0, split): (usize, usize),
) {
    // Rows wholly inside the vector loop's prefix go to the tier's kernel in one call.
    let vector_rows = (0..rows).take_while(|r| flat0 + r * ld + ncols <= split).count();
    if vector_rows > 0 {
        let k = crate::registry::kernels(isa);
        // SAFETY: the rows are the caller's block; `acc` is read and written through one
        // pointer.
        unsafe {
            (k.add_u8.run)(
                acc,
                (qa.scale, qa.zero_point),
                other,
                (qb.scale, qb.zero_point),
                acc,
                (qo.scale, qo.zero_point),
                relu,
                (vector_rows, ncols, ld),
            )
        };
    }
    let first = vector_rows;
    for r in first..rows {
        let at = r * ld;
        // SAFETY: one row of the caller's block, with the scalar loops.
        unsafe {
            add_raw(
                qtensor::isa::Isa::Scalar,
                acc.add(at),
                qa,
                other.add(at),
                qb,
                acc.add(at),
                qo,
                relu,
                ncols,
                flat0 + at,
                split,
            )
        }
    }
}

/// The addition over `n` elements: element `i` reads `a[i]` and `b[i]` before `out[i]` is
/// written, so `out` may be `a` itself. Elements whose flat index `flat0 + i` is below
/// `split` take the vector loop's formula.
///
/// # Safety
/// `a` and `b` are readable and `out` writable for `n` elements; `out` is either exactly `a`
/// or overlaps neither input.
#[allow(clippy::too_many_arguments)]
unsafe fn add_raw(
    isa: qtensor::isa::Isa,
    a: *const u8,
    qa: QuantU8,
    b: *const u8,
    qb: QuantU8,
    out: *mut u8,
    qo: QuantU8,
    relu: bool,
    n: usize,
    flat0: usize,
    split: usize,
) {
    let vec_n = split.saturating_sub(flat0).min(n);
    // The vector formula's elements in whole vectors of the tier's kernel; the rest (and
    // what follows the prefix) below.
    let k = crate::registry::kernels(isa);
    let done = vec_n - vec_n % k.add_u8.lanes;
    if done > 0 {
        // SAFETY: the caller's bounds and aliasing cover the first `done <= n` elements.
        unsafe {
            (k.add_u8.run)(
                a,
                (qa.scale, qa.zero_point),
                b,
                (qb.scale, qb.zero_point),
                out,
                (qo.scale, qo.zero_point),
                relu,
                (1, done, done),
            )
        };
    }
    for i in done..n {
        // SAFETY: i < n: in bounds (caller's precondition); out[i] is written after a[i] is read.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        let mut c =
            if i < vec_n { qa.dequantize_vec(x) + qb.dequantize_vec(y) } else { qa.dequantize(x) + qb.dequantize(y) };
        if relu {
            c = c.max(0.0);
        }
        // SAFETY: as above.
        unsafe { *out.add(i) = qo.quantize(c) };
    }
}

/// A residual addition fused into a layer: the layer's requantized `u8` output `y` becomes
/// `add(y, other)` ([`add`]'s arithmetic, bit for bit, with `y` quantized with the layer's
/// output parameters) before it is stored, each block while it is still in cache.
#[derive(Clone, Copy, Debug)]
pub struct ResidualAdd<'a> {
    /// The other operand, laid out as the layer's output (NHWC, same length).
    pub other: &'a [u8],
    /// Its parameters.
    pub other_q: QuantU8,
    /// The sum's parameters.
    pub out_q: QuantU8,
    /// A ReLU after the sum.
    pub relu: bool,
}

impl ResidualAdd<'_> {
    /// Checks the parameters and that `other` matches an output of `len` elements.
    pub(crate) fn check(&self, op: &'static str, len: usize) -> Result<()> {
        same_len(op, len, self.other.len(), "the residual operand must have as many elements as the output")?;
        self.other_q.check(op)?;
        self.out_q.check(op)
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

/// Elementwise `out = zo + round((a - za)(b - zb) * m)`, `m = f32(sa * sb) * f32(1 / so)`,
/// the product exact in integers (PyTorch's `quantized::mul`), clamped to `u8`.
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
    // PyTorch: f32(sa * sb) times the f32 reciprocal of the output scale.
    let multiplier = (qa.scale * qb.scale) * (1.0 / qo.scale);
    mul_core(qtensor::isa::selected(), a, qa.zero_point, b, qb.zero_point, out, multiplier, qo.zero_point);
    Ok(())
}

multiversion! {
    fn mul_core(a: &[u8], za: i32, b: &[u8], zb: i32, out: &mut [u8], multiplier: f32, zo: i32) {
        for ((x, y), o) in a.iter().zip(b).zip(out.iter_mut()) {
            *o = requantize_product((*x as i32 - za) * (*y as i32 - zb), multiplier, zo);
        }
    }
}

/// [`mul`] with `b` broadcast over the pixels of `a`: `a` is NHWC `[n, pixels, c]`, `b`
/// `[n, c]` (an `[n, c, 1, 1]` tensor, such as a squeeze-and-excitation gate), and every
/// element is PyTorch's broadcasting `quantized::mul` of its pair.
///
/// # Errors
/// Sizes that do not fit `(n, pixels, c)`, invalid parameters.
#[allow(clippy::too_many_arguments)]
pub fn mul_channels(
    a: &[u8],
    qa: QuantU8,
    (n, pixels, c): (usize, usize, usize),
    b: &[u8],
    qb: QuantU8,
    out: &mut [u8],
    qo: QuantU8,
) -> Result<()> {
    const OP: &str = "qkernels::mul_channels";
    let len = n.checked_mul(pixels).and_then(|v| v.checked_mul(c));
    if len != Some(a.len()) || n.checked_mul(c) != Some(b.len()) {
        return Err(QError::ShapeMismatch {
            op: OP,
            expected: vec![n, pixels, c, n * c],
            actual: vec![a.len(), b.len()],
            hint: "a holds n x pixels x c values (NHWC) and b n x c, one per image and channel",
        });
    }
    same_len(OP, a.len(), out.len(), "the output must have as many elements as a")?;
    for q in [qa, qb, qo] {
        q.check(OP)?;
    }
    let multiplier = (qa.scale * qb.scale) * (1.0 / qo.scale);
    let isa = qtensor::isa::selected();
    if c == 0 || pixels == 0 {
        return Ok(());
    }
    for ((rows, gate), out_rows) in
        a.chunks_exact(pixels * c).zip(b.chunks_exact(c)).zip(out.chunks_exact_mut(pixels * c))
    {
        mul_gate_core(isa, rows, qa.zero_point, gate, qb.zero_point, out_rows, multiplier, qo.zero_point);
    }
    Ok(())
}

// `mul_core` of every `gate.len()`-element row of `a` with `gate`, in one call.
multiversion! {
    fn mul_gate_core(a: &[u8], za: i32, gate: &[u8], zb: i32, out: &mut [u8], multiplier: f32, zo: i32) {
        for (row, o) in a.chunks_exact(gate.len()).zip(out.chunks_exact_mut(gate.len())) {
            for ((x, y), o) in row.iter().zip(gate).zip(o.iter_mut()) {
                *o = requantize_product((*x as i32 - za) * (*y as i32 - zb), multiplier, zo);
            }
        }
    }
}

/// [`requantize_from_int`] for a zero point in `0..=255`, in operations that vectorise: a
/// product beyond `2^22` in magnitude saturates the byte either way, so it is clamped there,
/// and adding `1.5 * 2^23` rounds what is left to an integer, half to even (the default
/// rounding of the addition; the float spacing there is 1), whose bits give it back.
/// Equal to [`requantize_from_int`] for every `src` and finite `multiplier` (tested).
#[doc(hidden)]
#[inline(always)]
pub fn requantize_product(src: i32, multiplier: f32, zp: i32) -> u8 {
    const LIMIT: f32 = 4_194_304.0; // 2^22
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let v = (src as f32 * multiplier).clamp(-LIMIT, LIMIT);
    let r = (v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32;
    (r + zp).clamp(0, 255) as u8
}

/// PyTorch's `requantize_from_int`: `clamp(zp + round_half_even(src * multiplier), 0, 255)`
/// with the product in f32.
#[inline(always)]
pub fn requantize_from_int(src: i32, multiplier: f32, zp: i32) -> u8 {
    let r = (src as f32 * multiplier).clamp(-16_777_216.0, 16_777_216.0).round_ties_even() as i32;
    (r + zp).clamp(0, 255) as u8
}

/// Requantization tables of one `cat` input: for its vector channels, for the rest, and how
/// many channels are vector channels.
type CatTables = ([u8; 256], [u8; 256], usize);

/// Concatenation along channels of NHWC inputs with the same batch and spatial size, into
/// `out` with quantization `qo`: inputs with exactly `qo`'s parameters are copied, the others
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
    // PyTorch's NHWC cat requantizes each pixel's channels with its vector loops (32, then 8
    // at a time: fma dequantize) and the last `c % 8` with its scalar loop.
    let tables: Vec<Option<CatTables>> = inputs
        .iter()
        .map(|x| {
            let qi = QuantU8::of(x);
            let vector_channels = x.c / 32 * 32 + (x.c % 32) / 8 * 8;
            (qi != qo).then(|| {
                (
                    std::array::from_fn(|q| qo.quantize(qi.dequantize_vec(q as u8))),
                    std::array::from_fn(|q| qo.quantize(qi.dequantize(q as u8))),
                    vector_channels,
                )
            })
        })
        .collect();
    // Each input's pixels go through its tables (the CPU's lookup kernel) in runs of up to
    // CAT_RUN bytes, then each pixel's channels move to their place in the output.
    const CAT_RUN: usize = 4096;
    let lut = crate::registry::kernels(qtensor::isa::selected()).lut;
    let pixels = n * h * w;
    let mut off = 0;
    for (x, t) in inputs.iter().zip(&tables) {
        let c = x.c;
        if c == 0 {
            continue;
        }
        let place = |p0: usize, run: &[u8], part: std::ops::Range<usize>, out: &mut [u8]| {
            for (k, src) in run.chunks_exact(c).enumerate() {
                let at = (p0 + k) * c_total + off;
                out[at + part.start..at + part.end].copy_from_slice(&src[part.clone()]);
            }
        };
        match t {
            None => place(0, x.data, 0..c, out),
            Some((tv, ts, nv)) => {
                let step = (CAT_RUN / c).max(1);
                let (mut va, mut sa) = ([0u8; CAT_RUN], [0u8; CAT_RUN]);
                for p0 in (0..pixels).step_by(step) {
                    let p1 = (p0 + step).min(pixels);
                    let src = &x.data[p0 * c..p1 * c];
                    if c > CAT_RUN {
                        // One pixel at a time, straight into the output.
                        let at = p0 * c_total + off;
                        lut(tv, &src[..*nv], &mut out[at..at + nv]);
                        lut(ts, &src[*nv..], &mut out[at + nv..at + c]);
                        continue;
                    }
                    let len = src.len();
                    if *nv > 0 {
                        lut(tv, src, &mut va[..len]);
                        place(p0, &va[..len], 0..*nv, out);
                    }
                    if *nv < c {
                        lut(ts, src, &mut sa[..len]);
                        place(p0, &sa[..len], *nv..c, out);
                    }
                }
            }
        }
        off += c;
    }
    Ok(())
}

/// A 256-entry table `u8 -> u8`: any unary function of a `u8` tensor, exact by construction
/// (each entry is the function applied to that one input value), applied with AVX-512 VBMI
/// byte permutes where the CPU has them, and NEON `tbl` lookups on aarch64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lut {
    table: [u8; 256],
}

impl Lut {
    /// The table of `q -> Q_out(f(dq_in(q)))`, dequantizing as `scale * (q - zp)`.
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
        (crate::registry::kernels(qtensor::isa::selected()).lut)(&self.table, x, out);
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

/// The unary maps the lookup tables compute: the activations PyTorch quantizes, with the
/// output parameters PyTorch uses when they are fixed (sigmoid, hardsigmoid: 1/256, 0; tanh:
/// 1/128, 128; relu, relu6, gelu: the input's), SiLU, and a scalar affine map.
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
    /// `x * Φ(x)`, the exact (erf) form.
    Gelu,
    /// GELU's tanh approximation, `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
    GeluTanh,
    /// `x` if `x >= 0`, else `alpha * (e^x - 1)`.
    Elu(f32),
    /// `x * sigmoid(x)` (SiLU, swish). PyTorch has no quantized SiLU; both tables compute it
    /// in f32 as `x / (1 + e^-x)`.
    Silu,
    /// `clamp(scale * x + shift, min, max)` (one rounding: a fused multiply-add): a scalar
    /// affine map with its activation (`min` and `max` infinite for none), as qnn runs a
    /// depthwise 1x1 convolution whose channels share one weight and one bias. Both tables
    /// are the same.
    Affine {
        /// The factor.
        scale: f32,
        /// The term added.
        shift: f32,
        /// The lower clamp.
        min: f32,
        /// The upper clamp.
        max: f32,
    },
}

/// `sqrt(2 / pi)`, as PyTorch spells it: `M_SQRT2 * M_2_SQRTPI * 0.5`.
const GELU_BETA: f64 = std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5;

/// `e^x` for f32, correctly rounded (through f64), as the vector libraries PyTorch uses give it
/// on these inputs.
fn expf(x: f32) -> f32 {
    (x as f64).exp() as f32
}

/// Abramowitz-Stegun 7.1.26 with fused multiply-adds and `expf`: the erf of PyTorch's
/// vectorised gelu.
fn erf_vec(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(ax, 1.0);
    let mut r = 1.061_405_4f32.mul_add(t, -1.453_152);
    r = r.mul_add(t, 1.421_413_8);
    r = r.mul_add(t, -0.284_496_74);
    r = r.mul_add(t, 0.254_829_6);
    let e = expf(-(x * x));
    let y = (-e * t).mul_add(r, 1.0);
    if x.is_sign_negative() {
        -y
    } else {
        y
    }
}

impl UnaryOp {
    /// The output parameters PyTorch fixes for this activation, if it does.
    pub fn fixed_output(&self, input: QuantU8) -> Option<QuantU8> {
        match self {
            UnaryOp::Relu | UnaryOp::Relu6 | UnaryOp::Gelu | UnaryOp::GeluTanh => Some(input),
            UnaryOp::Sigmoid | UnaryOp::Hardsigmoid => Some(QuantU8 { scale: 1.0 / 256.0, zero_point: 0 }),
            UnaryOp::Tanh => Some(QuantU8 { scale: 1.0 / 128.0, zero_point: 128 }),
            _ => None,
        }
    }

    /// The float function as PyTorch's vector loop computes it.
    pub fn eval_vec(&self, x: f32) -> f32 {
        match *self {
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Relu6 => x.clamp(0.0, 6.0),
            UnaryOp::Hardswish => x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
            UnaryOp::Hardsigmoid => (x + 3.0).clamp(0.0, 6.0) / 6.0,
            UnaryOp::Sigmoid => 1.0 / (1.0 + expf(-x)),
            UnaryOp::Silu => x / (1.0 + expf(-x)),
            UnaryOp::Tanh => (x as f64).tanh() as f32,
            UnaryOp::LeakyRelu(s) => {
                if x > 0.0 {
                    x
                } else {
                    x * s
                }
            }
            UnaryOp::Gelu => (x * 0.5) * (1.0 + erf_vec(x * std::f32::consts::FRAC_1_SQRT_2)),
            UnaryOp::GeluTanh => {
                let cube = x * x * x;
                let inner = GELU_BETA as f32 * 0.044_715f32.mul_add(cube, x);
                (0.5 * x) * (1.0 + (inner as f64).tanh() as f32)
            }
            UnaryOp::Elu(a) => {
                if x > 0.0 {
                    x
                } else {
                    ((x as f64).exp_m1() as f32) * a
                }
            }
            UnaryOp::Affine { scale, shift, min, max } => scale.mul_add(x, shift).max(min).min(max),
        }
    }

    /// The float function as PyTorch's scalar loop computes it (some in f64).
    pub fn eval(&self, x: f32) -> f32 {
        match *self {
            UnaryOp::Sigmoid => (1.0 / (1.0 + expf(-x) as f64)) as f32,
            UnaryOp::Gelu => {
                let xd = x as f64;
                (xd * 0.5 * (1.0 + libm::erf(xd * std::f64::consts::FRAC_1_SQRT_2))) as f32
            }
            UnaryOp::GeluTanh => {
                let cube = (x * x * x) as f64;
                let xd = x as f64;
                (0.5 * xd * (1.0 + (GELU_BETA * (xd + 0.044_715 * cube)).tanh())) as f32
            }
            UnaryOp::Elu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    ((x as f64).exp_m1() as f32) * a
                }
            }
            _ => self.eval_vec(x),
        }
    }

    /// The tables from `input` to `output` parameters, for both of PyTorch's loops. ReLU and
    /// ReLU6 with unchanged parameters stay in the integer domain, as in PyTorch.
    pub fn tables(&self, input: QuantU8, output: QuantU8) -> UnaryTables {
        let lut = |f: &dyn Fn(u8) -> f32| Lut { table: std::array::from_fn(|q| output.quantize(f(q as u8))) };
        match self {
            UnaryOp::Relu if input == output => UnaryTables::same(Lut::relu(input)),
            UnaryOp::Relu6 if input == output => UnaryTables::same(Lut::relu6(input)),
            // Sigmoid dequantizes as `(q - z) * s` in both loops.
            UnaryOp::Sigmoid => UnaryTables {
                vector: lut(&|q| self.eval_vec(input.dequantize(q))),
                tail: lut(&|q| self.eval(input.dequantize(q))),
            },
            // PyTorch's quantized elu writes an NCHW-contiguous result, so for channels-last
            // inputs (with more than one channel and one pixel) every element takes its scalar
            // loop; we always do.
            UnaryOp::Elu(_) | UnaryOp::Affine { .. } => UnaryTables::same(lut(&|q| self.eval(input.dequantize(q)))),
            _ => UnaryTables {
                vector: lut(&|q| self.eval_vec(input.dequantize_vec(q))),
                tail: lut(&|q| self.eval(input.dequantize(q))),
            },
        }
    }
}

/// An activation as two lookup tables: one for the elements PyTorch's vector loop handles,
/// one for its scalar tail ([`vector_prefix`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnaryTables {
    /// For the first [`vector_prefix`] elements.
    pub vector: Lut,
    /// For the rest.
    pub tail: Lut,
}

impl UnaryTables {
    fn same(l: Lut) -> Self {
        UnaryTables { vector: l.clone(), tail: l }
    }

    /// Applies the activation to a flat `u8` buffer.
    ///
    /// # Errors
    /// Lengths that differ.
    pub fn apply(&self, x: &[u8], out: &mut [u8]) -> Result<()> {
        same_len("UnaryTables::apply", x.len(), out.len(), "the output must have as many elements as the input")?;
        let split = vector_prefix(x.len());
        self.vector.apply(&x[..split], &mut out[..split])?;
        self.tail.apply(&x[split..], &mut out[split..])
    }
}

/// Adds a float scalar to a `u8` tensor as PyTorch's `quantized::add_scalar` does: by moving
/// the zero point when that stays in range (the data is copied), else by clamping the zero
/// point to the range end and rescaling (the data is requantized). Returns the output's
/// parameters (PyTorch keeps the new scale in f64; this is its f32 rounding, which is what
/// every kernel uses).
///
/// # Errors
/// Lengths that differ, invalid parameters, a non-finite scalar.
pub fn add_scalar(x: &[u8], q: QuantU8, c: f32, out: &mut [u8]) -> Result<QuantU8> {
    const OP: &str = "qkernels::add_scalar";
    q.check(OP)?;
    same_len(OP, x.len(), out.len(), "the output must have as many elements as the input")?;
    if !c.is_finite() {
        return Err(QError::Unsupported { op: OP, reason: format!("scalar {c} is not finite") });
    }
    let (s, z) = (q.scale as f64, q.zero_point as i64);
    let cq = (c as f64 / s).round_ties_even() as i64;
    let shifted = z - cq;
    if (0..=255).contains(&shifted) {
        out.copy_from_slice(x);
        return Ok(QuantU8 { scale: q.scale, zero_point: shifted as i32 });
    }
    let (s2, z2) =
        if shifted < 0 { ((255 - shifted) as f64 / 255.0 * s, 0) } else { (shifted as f64 / 255.0 * s, 255) };
    let s2f = s2 as f32;
    let m = q.scale * (1.0 / s2f);
    // 256 possible inputs: requantize each once, then look the data up.
    let table: [u8; 256] = std::array::from_fn(|v| requantize_from_int((v as i64 - z + cq) as i32, m, z2));
    for (o, v) in out.iter_mut().zip(x) {
        *o = table[*v as usize];
    }
    Ok(QuantU8 { scale: s2f, zero_point: z2 })
}

/// Multiplies a `u8` tensor by a float scalar as PyTorch's `quantized::mul_scalar`: only the
/// parameters change for `c > 0`; `c < 0` mirrors the data (`255 - q`); `c == 0` gives zeros
/// with scale 1. Returns the output's parameters (the scale rounded to f32).
///
/// # Errors
/// Lengths that differ, invalid parameters, a non-finite scalar.
pub fn mul_scalar(x: &[u8], q: QuantU8, c: f32, out: &mut [u8]) -> Result<QuantU8> {
    const OP: &str = "qkernels::mul_scalar";
    q.check(OP)?;
    same_len(OP, x.len(), out.len(), "the output must have as many elements as the input")?;
    if !c.is_finite() {
        return Err(QError::Unsupported { op: OP, reason: format!("scalar {c} is not finite") });
    }
    let scale = ((c as f64).abs() * q.scale as f64) as f32;
    if c > 0.0 {
        out.copy_from_slice(x);
        Ok(QuantU8 { scale, zero_point: q.zero_point })
    } else if c == 0.0 {
        out.fill(0);
        Ok(QuantU8 { scale: 1.0, zero_point: 0 })
    } else {
        for (o, v) in out.iter_mut().zip(x) {
            *o = 255 - v;
        }
        Ok(QuantU8 { scale, zero_point: 255 - q.zero_point })
    }
}

/// A batch-norm on `u8` NHWC input that could not be folded into a layer (PyTorch's
/// `quantized::batch_norm2d`): per channel `y = alpha * (q - z_in) + beta` in one fused
/// multiply-add, with PyTorch's f32/f64 steps for alpha and beta, requantized to `qo`.
///
/// # Errors
/// Parameter lists whose length is not the channel count, a variance plus eps that is not
/// positive, buffers of the wrong size.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm2d(
    x: &QImage<'_>,
    weight: &[f32],
    bias: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
    qo: QuantU8,
    out: &mut [u8],
) -> Result<()> {
    const OP: &str = "qkernels::batch_norm2d";
    let c = x.c;
    for (v, what) in [(weight, "weight"), (bias, "bias"), (mean, "running_mean"), (var, "running_var")] {
        if v.len() != c {
            return Err(QError::ShapeMismatch { op: OP, expected: vec![c], actual: vec![v.len()], hint: what });
        }
    }
    if let Some(i) = var.iter().position(|v| (v + eps).partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)) {
        return Err(QError::Unsupported {
            op: OP,
            reason: format!("channel {i}: running_var {} + eps {eps} is not positive; fix the statistics", var[i]),
        });
    }
    qo.check(OP)?;
    QuantU8::of(x).check(OP)?;
    same_len(OP, x.n * x.h * x.w * c, x.data.len(), "the input must hold n * h * w * c values (NHWC)")?;
    same_len(OP, x.data.len(), out.len(), "the output must have as many elements as the input")?;
    let ratio = x.scale as f64 / qo.scale as f64;
    let (alpha, beta): (Vec<f32>, Vec<f32>) = (0..c)
        .map(|i| {
            let inv_sigma = (1.0 / ((var[i] + eps).sqrt() as f64)) as f32;
            let alpha = ((inv_sigma * weight[i]) as f64 * ratio) as f32;
            let beta = ((bias[i] - (mean[i] * inv_sigma) * weight[i]) as f64 / qo.scale as f64) as f32;
            (alpha, beta)
        })
        .unzip();
    bn_core(qtensor::isa::selected(), x.data, x.zero_point, &alpha, &beta, qo.zero_point, out);
    Ok(())
}

multiversion! {
    fn bn_core(x: &[u8], zi: i32, alpha: &[f32], beta: &[f32], zo: i32, out: &mut [u8]) {
        let c = alpha.len();
        for (px, o) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            for ch in 0..c {
                let y = alpha[ch].mul_add((px[ch] as i32 - zi) as f32, beta[ch]);
                o[ch] = (zo + y.clamp(-16_777_216.0, 16_777_216.0).round_ties_even() as i32).clamp(0, 255) as u8;
            }
        }
    }
}

/// Layer normalization over the channels of each pixel of a `u8` NHWC tensor, computed in f32
/// from exact integer sums (PyTorch's `quantized::layer_norm` with `normalized_shape = [C]`),
/// requantized to `qo`.
///
/// # Errors
/// `gamma` / `beta` not of the channel count, buffers of the wrong size.
pub fn layer_norm(x: &QImage<'_>, gamma: &[f32], beta: &[f32], eps: f32, qo: QuantU8, out: &mut [u8]) -> Result<()> {
    const OP: &str = "qkernels::layer_norm";
    let c = x.c;
    for (v, what) in [(gamma, "weight (gamma)"), (beta, "bias (beta)")] {
        if v.len() != c {
            return Err(QError::ShapeMismatch { op: OP, expected: vec![c], actual: vec![v.len()], hint: what });
        }
    }
    qo.check(OP)?;
    QuantU8::of(x).check(OP)?;
    same_len(OP, x.n * x.h * x.w * c, x.data.len(), "the input must hold n * h * w * c values (NHWC)")?;
    same_len(OP, x.data.len(), out.len(), "the output must have as many elements as the input")?;
    if c == 0 {
        return Ok(());
    }
    // About 4096 values at a time: normalized in f32, then quantized as any f32 slice is
    // (the same formula, vectorised).
    let per = (4096 / c).max(1) * c;
    let mut y = vec![0f32; per.min(x.data.len())];
    let range = QuantRange::full(DType::U8);
    for (xs, os) in x.data.chunks(per).zip(out.chunks_mut(per)) {
        let y = &mut y[..xs.len()];
        ln_core(qtensor::isa::selected(), xs, (x.scale, x.zero_point), gamma, beta, eps, y);
        quantize_serial(y, os, qo, range)?;
    }
    Ok(())
}

/// `x` quantized into `out` in slices of 4096, each below the length at which
/// `qtensor::kernels::quantize_slice` splits its work over the thread pool (these kernels run
/// on the caller's thread).
fn quantize_serial(x: &[f32], out: &mut [u8], qo: QuantU8, range: QuantRange) -> Result<()> {
    for (xs, os) in x.chunks(4096).zip(out.chunks_mut(4096)) {
        qtensor::kernels::quantize_slice(xs, os, qo.scale, qo.zero_point, range)?;
    }
    Ok(())
}

multiversion! {
    fn ln_core(x: &[u8], sz: (f32, i32), gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) {
        let (s, z) = sz;
        let c = gamma.len();
        for (px, o) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            let sum: i64 = px.iter().map(|&v| v as i64).sum();
            let sumsq: i64 = px.iter().map(|&v| (v as i64) * (v as i64)).sum();
            let ms = sum as f32 / c as f32;
            let mean = ms - z as f32;
            let var = (-ms).mul_add(ms, sumsq as f32 / c as f32).max(0.0);
            let sstd = (s as f64 / (((var * s) * s) as f64 + eps as f64).sqrt()) as f32;
            for ((o, &v), (&g, &b)) in o.iter_mut().zip(px).zip(gamma.iter().zip(beta)) {
                let t = ((v as i32 - z) as f32 - mean) * sstd;
                *o = t.mul_add(g, b);
            }
        }
    }
}

/// Softmax of `u8` codes along one axis, requantized to `qo`: the value is `[outer, len,
/// inner]` row-major and the softmax runs over `len` values `inner` apart (a row-major value's
/// last axis has `inner = 1`; the width of an NHWC image has `inner = c`). The exponentials
/// come from a table of `exp(-d * scale)` for the distance `d` of a code below its lane's
/// largest: the float softmax of the dequantized values (`exp(x - max) / sum`), quantized,
/// up to `f32` rounding (the test bounds it). Lanes are independent.
///
/// # Errors
/// Invalid parameters, buffers that do not hold `outer * len * inner` values.
pub fn softmax_u8(
    x: &[u8],
    q: QuantU8,
    (outer, len, inner): (usize, usize, usize),
    qo: QuantU8,
    out: &mut [u8],
) -> Result<()> {
    const OP: &str = "qkernels::softmax_u8";
    q.check(OP)?;
    qo.check(OP)?;
    let n = outer.checked_mul(len).and_then(|v| v.checked_mul(inner));
    same_len(OP, n.unwrap_or(usize::MAX), x.len(), "the input must hold outer * len * inner values")?;
    same_len(OP, x.len(), out.len(), "the output must have as many elements as the input")?;
    if x.is_empty() {
        return Ok(());
    }
    let table: [f32; 256] = std::array::from_fn(|d| (-(d as f32) * q.scale).exp());
    let isa = qtensor::isa::selected();
    let lookup = crate::registry::kernels(isa).lookup_below;
    // Whole blocks of lanes, about 4096 values at a time: their probabilities in f32, then
    // quantized as any f32 slice is.
    let block = len * inner;
    let per = (4096 / block).max(1) * block;
    let mut e = vec![0f32; per.min(x.len())];
    let range = QuantRange::full(DType::U8);
    for (xs, os) in x.chunks(per).zip(out.chunks_mut(per)) {
        let e = &mut e[..xs.len()];
        probabilities(isa, xs, &table, lookup, (len, inner), e);
        quantize_serial(e, os, qo, range)?;
    }
    Ok(())
}

multiversion! {
    /// `exp(x - max) / sum` of each lane of `x` (whole blocks of `len * inner` codes), from
    /// the table of `exp(-d * scale)`, into `e`; rows (`inner` 1) look their values up with
    /// the tier's `lookup` (`Kernels::lookup_below`: the same entries on every tier).
    fn probabilities(
        x: &[u8],
        table: &[f32; 256],
        lookup: fn(&[f32; 256], &[u8], u8, &mut [f32]),
        lanes: (usize, usize),
        e: &mut [f32],
    ) {
        let (len, inner) = lanes;
        if inner == 1 {
            for (row, e) in x.chunks_exact(len).zip(e.chunks_exact_mut(len)) {
                let top = row.iter().copied().max().unwrap_or(0);
                lookup(table, row, top, e);
                // Eight partial sums: a chain of dependent additions would bound the speed.
                let mut part = [0f32; 8];
                let mut chunks = e.chunks_exact(8);
                for c in &mut chunks {
                    for (p, &v) in part.iter_mut().zip(c) {
                        *p += v;
                    }
                }
                let tail: f32 = chunks.remainder().iter().sum();
                let r = 1.0 / (part.iter().sum::<f32>() + tail);
                for v in e.iter_mut() {
                    *v *= r;
                }
            }
            return;
        }
        // Lanes `inner` apart: each step works on a row of `inner` lanes at once.
        let (mut top, mut sum) = (vec![0u8; inner], vec![0f32; inner]);
        for (xb, eb) in x.chunks_exact(len * inner).zip(e.chunks_exact_mut(len * inner)) {
            top.copy_from_slice(&xb[..inner]);
            for row in xb.chunks_exact(inner).skip(1) {
                for (t, &v) in top.iter_mut().zip(row) {
                    *t = (*t).max(v);
                }
            }
            for (er, row) in eb.chunks_exact_mut(inner).zip(xb.chunks_exact(inner)) {
                for ((e, &t), &v) in er.iter_mut().zip(&top).zip(row) {
                    *e = table[(t - v) as usize];
                }
            }
            sum.fill(0.0);
            for er in eb.chunks_exact(inner) {
                for (s, &v) in sum.iter_mut().zip(er) {
                    *s += v;
                }
            }
            for s in sum.iter_mut() {
                *s = 1.0 / *s;
            }
            for er in eb.chunks_exact_mut(inner) {
                for (v, &r) in er.iter_mut().zip(&sum) {
                    *v *= r;
                }
            }
        }
    }
}

/// A `rows x cols` byte matrix (row-major) transposed into `dst` (`cols x rows`), by the
/// selected tier's kernel (blocks of 16 x 16 with AVX2's unpacks, 8 x 8 in `u64` registers
/// otherwise).
///
/// # Errors
/// Buffers that do not hold `rows * cols` bytes.
pub fn transpose_u8(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) -> Result<()> {
    transpose_u8_isa(qtensor::isa::selected(), src, rows, cols, dst)
}

/// [`transpose_u8`] on the kernels of tier `isa` (capped to what the CPU supports), for
/// conformance tests.
///
/// # Errors
/// As [`transpose_u8`].
pub fn transpose_u8_isa(isa: qtensor::isa::Isa, src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) -> Result<()> {
    const OP: &str = "qkernels::transpose_u8";
    let n = rows.saturating_mul(cols);
    same_len(OP, n, src.len(), "the input must hold rows * cols bytes")?;
    same_len(OP, n, dst.len(), "the output must hold rows * cols bytes")?;
    (crate::registry::kernels(isa.capped_to_supported()).transpose)(src, rows, cols, dst);
    Ok(())
}

/// Flattens NHWC `u8` activations per image in PyTorch's order (`C, H, W`, as `nn.Flatten` on
/// an NCHW tensor), so a following linear layer sees its features where PyTorch put them.
/// `out` is `n x (c * h * w)`; parameters unchanged. (With `h = w = 1` this is a copy.)
///
/// # Errors
/// Buffers of the wrong size.
pub fn flatten_nchw_order(x: &QImage<'_>, out: &mut [u8]) -> Result<()> {
    const OP: &str = "qkernels::flatten_nchw_order";
    same_len(OP, x.n * x.h * x.w * x.c, x.data.len(), "the input must hold n * h * w * c values (NHWC)")?;
    same_len(OP, x.data.len(), out.len(), "the output must hold n * c * h * w values")?;
    let (c, hw) = (x.c, x.h * x.w);
    for (src, dst) in x.data.chunks_exact(hw * c).zip(out.chunks_exact_mut(hw * c)) {
        if hw == 1 {
            dst.copy_from_slice(src);
            continue;
        }
        for (p, px) in src.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                dst[ch * hw + p] = v;
            }
        }
    }
    Ok(())
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
    let hw = h * w;
    if hw == 0 || c == 0 {
        return Ok(());
    }
    // A block of pixels at a time: each channel's values quantized with the vectorised kernel
    // (the same values as `quantize_scalar`) into `planes`, then interleaved into the block's
    // NHWC bytes. Inside a pool of several threads, an image's blocks are shared out.
    const BLOCK: usize = 512;
    let range = QuantRange::full(DType::U8);
    let block = |b: usize, k: usize, dst: &mut [u8], planes: &mut Vec<u8>| -> Result<()> {
        let (p0, len) = (k * BLOCK, dst.len() / c);
        if planes.len() < c * BLOCK {
            planes.resize(c * BLOCK, 0);
        }
        for ch in 0..c {
            let src = &x[(b * c + ch) * hw + p0..][..len];
            let at = (b * c + ch) * hw + p0;
            // NaN is found by the quantization itself: report it at its place in x.
            qtensor::kernels::quantize_slice(src, &mut planes[ch * BLOCK..][..len], q.scale, q.zero_point, range)
                .map_err(|e| match e {
                    QError::NanInput { index, .. } => {
                        QError::NanInput { op: OP, index: at + index, shape: vec![n, c, h, w] }
                    }
                    other => other,
                })?;
        }
        interleave(&planes[..c * BLOCK], BLOCK, dst);
        Ok(())
    };
    let parallel = hw * c >= 1 << 16 && rayon::current_thread_index().is_some() && rayon::current_num_threads() > 1;
    let mut planes = Vec::new();
    for (b, image) in out.chunks_mut(c * hw).enumerate() {
        if parallel {
            use rayon::prelude::*;
            image
                .par_chunks_mut(c * BLOCK)
                .enumerate()
                .try_for_each_init(Vec::new, |planes, (k, dst)| block(b, k, dst, planes))?;
        } else {
            for (k, dst) in image.chunks_mut(c * BLOCK).enumerate() {
                block(b, k, dst, &mut planes)?;
            }
        }
    }
    Ok(())
}

/// Interleaves the `planes.len() / stride` channel planes of `planes` (each `stride` bytes
/// long) into the pixels of `dst`: pixel `k`'s channel `ch` is `planes[ch * stride + k]`.
fn interleave(planes: &[u8], stride: usize, dst: &mut [u8]) {
    let c = planes.len() / stride;
    let len = dst.len() / c;
    let plane = |ch: usize| &planes[ch * stride..ch * stride + len];
    match c {
        1 => dst.copy_from_slice(plane(0)),
        3 => {
            let (r, g, b) = (plane(0), plane(1), plane(2));
            for (((px, &r), &g), &b) in dst.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
                px.copy_from_slice(&[r, g, b]);
            }
        }
        _ => {
            for ch in 0..c {
                for (px, &v) in dst.chunks_exact_mut(c).zip(plane(ch)) {
                    px[ch] = v;
                }
            }
        }
    }
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
    if hw == 0 || c == 0 {
        return Ok(());
    }
    // Each code's value, as `dequantize_scalar` gives it; then blocks of pixels, whose
    // channels are read from the block (in cache) and written as runs of each plane.
    let table: [f32; 256] =
        std::array::from_fn(|v| qtensor::kernels::dequantize_scalar(v as i32, q.scale, q.zero_point));
    const BLOCK: usize = 64;
    for b in 0..n {
        let src = &x[b * c * hw..(b + 1) * c * hw];
        let dst = &mut out[b * c * hw..(b + 1) * c * hw];
        for p0 in (0..hw).step_by(BLOCK) {
            let len = BLOCK.min(hw - p0);
            let px = &src[p0 * c..(p0 + len) * c];
            for ch in 0..c {
                let run = &mut dst[ch * hw + p0..ch * hw + p0 + len];
                for (k, v) in run.iter_mut().enumerate() {
                    *v = table[px[k * c + ch] as usize];
                }
            }
        }
    }
    Ok(())
}
