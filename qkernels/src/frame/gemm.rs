//! The int8 GEMM: `u8` activations times packed `i8` weights, int32 accumulation, and a fused
//! epilogue (zero-point corrections, bias, requantization, clamp) that writes `u8`, `i32` or
//! `f32` straight to the output.

use std::any::Any;
use std::sync::OnceLock;

use qtensor::isa::Isa;
use qtensor::{QError, Result};

use crate::frame::kernels::{Block, Kernels};
use crate::frame::pack::{PackedWeights, VNNI_LANES};

/// A matrix of `u8` activations: `m` rows of `k` values, row `i` starting at `i * lda`.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    /// The values.
    pub data: &'a [u8],
    /// Rows.
    pub m: usize,
    /// Columns (the reduction length).
    pub k: usize,
    /// Distance between row starts, `>= k`.
    pub lda: usize,
    /// Activation scale.
    pub scale: f32,
    /// Activation zero point.
    pub zero_point: i32,
}

/// What a layer applies after requantization, as a clamp in the integer domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    /// Clamp to the output type only.
    #[default]
    None,
    /// `max(x, 0)`: clamp below at the output zero point (PyTorch's fused ReLU).
    Relu,
    /// `min(max(x, 0), 6)`: also clamp above at the quantized value of 6.0.
    Relu6,
}

/// Output quantization of a layer that writes `u8`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutputQuant {
    /// Output scale.
    pub scale: f32,
    /// Output zero point, in `0..=255`.
    pub zero_point: i32,
    /// Fused activation.
    pub activation: Activation,
}

impl OutputQuant {
    /// The `u8` clamp bounds this output implies.
    pub fn bounds(&self) -> (i32, i32) {
        let hi = match self.activation {
            Activation::Relu6 => {
                let six = qtensor::kernels::quantize_scalar(6.0, 1.0 / self.scale, self.zero_point, 0, 255);
                six.max(self.zero_point)
            }
            _ => 255,
        };
        let lo = if self.activation == Activation::None { 0 } else { self.zero_point };
        (lo, hi)
    }
}

/// Where a GEMM writes: row `i`, column `j` goes to `data[i * ldc + j]`.
#[derive(Debug)]
pub enum GemmOutput<'a> {
    /// Requantized `u8` (the normal case between int8 layers).
    U8 {
        /// Destination.
        data: &'a mut [u8],
        /// Row stride.
        ldc: usize,
        /// Output quantization.
        quant: OutputQuant,
    },
    /// The exact int32 sums `Σ (a - za)(w - zw)` (bias ignored).
    I32 {
        /// Destination.
        data: &'a mut [i32],
        /// Row stride.
        ldc: usize,
    },
    /// Dequantized: `fma(raw, sa * sw[j], bias[j])` in `f32` (one rounding after the
    /// product `sa * sw[j]`: FBGEMM's `ReQuantizeForFloat`, what PyTorch's dynamic linear
    /// layer runs), then `max(.., 0)` with `relu`.
    F32 {
        /// Destination.
        data: &'a mut [f32],
        /// Row stride.
        ldc: usize,
        /// A ReLU after it.
        relu: bool,
    },
}

/// Rows of the tile buffer a micro-kernel fills (the largest MR of any tier).
pub(crate) const TILE_ROWS: usize = 6;
/// Columns of the tile buffer (the largest NR of any tier).
pub(crate) const TILE_COLS: usize = 64;
pub(crate) type Tile = [[i32; TILE_COLS]; TILE_ROWS];

/// Magnitude beyond which every requantized value clamps anyway; keeps the float-to-int
/// conversion far from overflow (where x86 returns INT_MIN) in every path.
pub(crate) const REQUANT_LIMIT: f32 = 16_777_216.0;

/// What a [`Plan`] depends on besides the weights and bias: the input's parameters and the
/// output's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PlanKey {
    a_scale: u32,
    a_zp: i32,
    quant: Option<OutputQuant>,
}

impl PlanKey {
    pub(crate) fn new(a_scale: f32, a_zp: i32, quant: Option<OutputQuant>) -> Self {
        PlanKey { a_scale: a_scale.to_bits(), a_zp, quant }
    }
}

/// The plans of a layer that owns its weights and bias (one per group), or anything else
/// derived from them and the parameters, kept for the first input and output parameters it
/// runs with: a converted model runs every layer with the same parameters on every call, so
/// after the first call nothing is rebuilt (or allocated). Other parameters get a value built
/// for that call. Lock-free once set; shared by threads.
#[derive(Clone, Debug)]
pub(crate) struct PlanCache<T = Vec<Plan>>(std::sync::OnceLock<(PlanKey, T)>);

impl<T> Default for PlanCache<T> {
    fn default() -> Self {
        PlanCache(std::sync::OnceLock::new())
    }
}

impl<T> PlanCache<T> {
    /// Runs `f` on the value for `key`, cached or built by `build`.
    pub(crate) fn with<R>(&self, key: PlanKey, build: impl Fn() -> T, f: impl FnOnce(&T) -> R) -> R {
        let (k, value) = self.0.get_or_init(|| (key, build()));
        if *k == key {
            f(value)
        } else {
            f(&build())
        }
    }
}

/// Per-column constants of the epilogue.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// `za * col_offsets[j]`.
    pub colterm: Vec<i32>,
    /// Weight zero points (all zero for symmetric weights).
    pub zw: Vec<i32>,
    pub has_zw: bool,
    /// First operand of the bias step `fma(bias_term, bias_scale, raw)` ([`bias_operands`]).
    pub bias_term: Vec<f32>,
    /// Second operand of the bias step.
    pub bias_scale: Vec<f32>,
    /// `(sa * sw[j]) / s_out`.
    pub mult: Vec<f32>,
    /// `sa * sw[j]` (for f32 output).
    pub ab_scale: Vec<f32>,
    /// Raw bias (for f32 output).
    pub bias: Vec<f32>,
    pub zo: i32,
    pub lo: i32,
    pub hi: i32,
    /// The weights' instruction set (what the epilogues may use).
    pub isa: Isa,
    /// No raw sum can push `(raw + bias_term) * mult` near [`REQUANT_LIMIT`], so vector
    /// epilogues may skip that clamp (it could not change a result).
    pub clamp_free: bool,
}

/// How the bias enters the raw sum, following FBGEMM bit for bit: it depends on the weight
/// granularity and on the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasForm {
    /// Per-channel weights: `raw + f32(bias / (sa * sw[j]))`.
    PerChannel,
    /// Per-tensor weights in the GEMM-based kernels (linear, 1x1, im2col, grouped):
    /// `fma(bias, rcp, raw)` with `rcp = f32(1 / f64(sa * sw))`, one rounding.
    PerTensorFused,
    /// Per-tensor weights in the depthwise kernel: `raw + f32(bias * rcp)`, two roundings.
    PerTensorDepthwise,
}

/// The two operands `(x, y)` of the bias step `fma(x, y, raw)` for one output channel.
/// (`y` is 1.0 where FBGEMM adds a precomputed term: an exact fma then equals the add.)
pub fn bias_operands(bias: f32, ab_scale: f32, form: BiasForm) -> (f32, f32) {
    let rcp = (1.0f64 / ab_scale as f64) as f32;
    match form {
        BiasForm::PerChannel => (bias / ab_scale, 1.0),
        BiasForm::PerTensorFused => (bias, rcp),
        BiasForm::PerTensorDepthwise => (bias * rcp, 1.0),
    }
}

/// Requantizes one raw sum: PyTorch's FBGEMM formula, the scalar reference.
/// `round_half_even(fma(bias_x, bias_y, raw) * mult) + zo`, clamped to `[lo, hi]`, in f32,
/// with `(bias_x, bias_y)` from [`bias_operands`]; the multiply by `mult` is rounded on its own.
#[inline(always)]
pub fn requantize_scalar(raw: i32, bias_x: f32, bias_y: f32, mult: f32, zo: i32, lo: i32, hi: i32) -> i32 {
    let f = bias_x.mul_add(bias_y, raw as f32) * mult;
    let r = f.clamp(-REQUANT_LIMIT, REQUANT_LIMIT).round_ties_even() as i32;
    (r + zo).clamp(lo, hi)
}

impl Plan {
    pub(crate) fn new(
        a_scale: f32,
        a_zp: i32,
        w: &PackedWeights,
        bias: Option<&[f32]>,
        out_quant: Option<OutputQuant>,
        depthwise: bool,
    ) -> Self {
        let n = w.n;
        let ab_scale: Vec<f32> = w.scales.iter().map(|&sw| a_scale * sw).collect();
        let bias: Vec<f32> = bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec);
        let form = match (w.per_channel, depthwise) {
            (true, _) => BiasForm::PerChannel,
            (false, false) => BiasForm::PerTensorFused,
            (false, true) => BiasForm::PerTensorDepthwise,
        };
        let (bias_term, bias_scale): (Vec<f32>, Vec<f32>) =
            bias.iter().zip(&ab_scale).map(|(&b, &s)| bias_operands(b, s, form)).unzip();
        let (mult, zo, lo, hi) = match out_quant {
            Some(q) => {
                let (lo, hi) = q.bounds();
                (ab_scale.iter().map(|&s| s / q.scale).collect(), q.zero_point, lo, hi)
            }
            None => (vec![0.0; n], 0, 0, 0),
        };
        // |raw| <= K * 255 * 255 whatever the zero points; a factor 2 of margin covers the
        // rounding of this bound itself.
        let max_raw = w.k as f32 * 65025.0;
        let clamp_free = bias_term
            .iter()
            .zip(&bias_scale)
            .zip(&mult)
            .all(|((bt, bs), m)| (max_raw + (bt * bs).abs()) * m.abs() < REQUANT_LIMIT / 2.0);
        Plan {
            clamp_free,
            colterm: w.col_offsets.iter().map(|&c| a_zp.wrapping_mul(c)).collect(),
            zw: w.zero_points.clone(),
            has_zw: !w.is_symmetric(),
            bias_term,
            bias_scale,
            mult,
            ab_scale,
            bias,
            zo,
            lo,
            hi,
            isa: w.isa(),
        }
    }
}

/// One finite bias value per output channel.
pub(crate) fn check_bias(op: &'static str, b: &[f32], n: usize) -> Result<()> {
    if b.len() != n {
        return Err(QError::ShapeMismatch {
            op,
            expected: vec![n],
            actual: vec![b.len()],
            hint: "give one bias value per output channel",
        });
    }
    if let Some(j) = b.iter().position(|v| !v.is_finite()) {
        return Err(QError::Unsupported {
            op,
            reason: format!("bias[{j}] = {} is not finite; fix the float model", b[j]),
        });
    }
    Ok(())
}

fn check(a: &QMatrix<'_>, w: &PackedWeights, bias: Option<&[f32]>, out_len: usize, ldc: usize) -> Result<()> {
    const OP: &str = "qkernels::gemm";
    if a.k != w.k {
        return Err(QError::ShapeMismatch {
            op: OP,
            expected: vec![a.m, w.k],
            actual: vec![a.m, a.k],
            hint: "the activations' row length must equal the weights' K (in_features)",
        });
    }
    if a.lda < a.k || (a.m > 0 && a.data.len() < (a.m - 1) * a.lda + a.k) {
        return Err(QError::Unsupported {
            op: OP,
            reason: format!(
                "activation buffer of {} bytes cannot hold {} rows of {} with row stride {}",
                a.data.len(),
                a.m,
                a.k,
                a.lda
            ),
        });
    }
    if ldc < w.n || (a.m > 0 && out_len < (a.m - 1) * ldc + w.n) {
        return Err(QError::Unsupported {
            op: OP,
            reason: format!(
                "output buffer of {out_len} elements cannot hold {} rows of {} with row stride {ldc}",
                a.m, w.n
            ),
        });
    }
    if let Some(b) = bias {
        check_bias(OP, b, w.n)?;
    }
    qtensor::QParams::per_tensor(a.scale, a.zero_point).map_err(|_| QError::InvalidScale {
        op: OP,
        scale: a.scale,
        channel: None,
    })?;
    if !(0..=255).contains(&a.zero_point) {
        return Err(QError::ZeroPointOutOfRange {
            op: OP,
            zero_point: a.zero_point as i64,
            channel: None,
            qmin: 0,
            qmax: 255,
            dtype: qtensor::DType::U8,
        });
    }
    Ok(())
}

/// `out = epilogue(a · wᵀ)`: the int8 GEMM behind linear and convolution layers.
///
/// `a` is `m x k` `u8`, `w` is `n x k` packed `i8`; the result is `m x n`. `threads` sets
/// how many threads share the work (1 runs on the calling thread); results are bit-identical
/// for every thread count and every instruction set.
///
/// # Errors
/// Shapes or buffers that do not match, a non-finite bias, invalid scales or zero points.
pub fn gemm(
    a: &QMatrix<'_>,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    out: GemmOutput<'_>,
    threads: usize,
) -> Result<()> {
    gemm_planned(a, w, bias, None, out, threads, None)
}

/// Every check [`gemm`] makes on its operands, before any work (or plan) is done.
pub(crate) fn validate(a: &QMatrix<'_>, w: &PackedWeights, bias: Option<&[f32]>, out: &GemmOutput<'_>) -> Result<()> {
    let (len, ldc) = match out {
        GemmOutput::U8 { data, ldc, quant } => {
            qtensor::QParams::per_tensor(quant.scale, quant.zero_point)?;
            if !(0..=255).contains(&quant.zero_point) {
                return Err(QError::ZeroPointOutOfRange {
                    op: "qkernels::gemm",
                    zero_point: quant.zero_point as i64,
                    channel: None,
                    qmin: 0,
                    qmax: 255,
                    dtype: qtensor::DType::U8,
                });
            }
            (data.len(), *ldc)
        }
        GemmOutput::I32 { data, ldc } => (data.len(), *ldc),
        GemmOutput::F32 { data, ldc, .. } => (data.len(), *ldc),
    };
    check(a, w, bias, len, ldc)
}

/// [`gemm`] with the plan given (`Plan::new(a.scale, a.zero_point, w, bias, quant, false)` for
/// this call's output quantization, which the caller guarantees) or built here.
pub(crate) fn gemm_planned(
    a: &QMatrix<'_>,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    plan: Option<&Plan>,
    out: GemmOutput<'_>,
    threads: usize,
    add: Option<BlockAdd<'_>>,
) -> Result<()> {
    validate(a, w, bias, &out)?;
    if a.m == 0 {
        return Ok(());
    }
    let quant = match &out {
        GemmOutput::U8 { quant, .. } => Some(*quant),
        _ => None,
    };
    let built;
    let plan = match plan {
        Some(p) => p,
        None => {
            built = Plan::new(a.scale, a.zero_point, w, bias, quant, false);
            &built
        }
    };
    let rowsums: Vec<i32> = if plan.has_zw {
        (0..a.m).map(|i| a.data[i * a.lda..i * a.lda + a.k].iter().map(|&v| v as i32).sum()).collect()
    } else {
        Vec::new()
    };
    let mut sink = Sink::new(out);
    if let Some(add) = add {
        assert!(matches!(sink.kind, SinkKind::U8), "gemm_planned: a block addition needs u8 output");
        // Every element the GEMM writes, (i, j) at i * ldc + j, has its operand there.
        assert!(add.other.len() >= (a.m - 1) * sink.ldc + w.n, "gemm_planned: residual operand too short");
        sink.add = Some(add);
    }
    crate::threads::run_with(threads, || drive(Rows::Dense(a), w, plan, &rowsums, &sink, threads > 1));
    Ok(())
}

/// The GEMM into `f32` output (`fma(raw, scale[i] * sw[j], bias[j])`, then the ReLU) with
/// activation parameters per row of `a` (`a.scale` and `a.zero_point` are ignored): what
/// per-token dynamic quantization runs. `plan` is `Plan::new(1.0, 0, w, bias, None, false)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32_per_row(
    a: &QMatrix<'_>,
    w: &PackedWeights,
    plan: &Plan,
    rows: &[crate::QuantU8],
    out: &mut [f32],
    relu: bool,
    threads: usize,
) -> Result<()> {
    let a0 = QMatrix { scale: 1.0, zero_point: 0, ..*a };
    let n = w.n;
    validate(&a0, w, None, &GemmOutput::F32 { data: out, ldc: n, relu })?;
    assert!(rows.len() == a.m, "gemm_f32_per_row: one set of parameters per row");
    if a.m == 0 {
        return Ok(());
    }
    let rowsums: Vec<i32> = if plan.has_zw {
        (0..a.m).map(|i| a.data[i * a.lda..i * a.lda + a.k].iter().map(|&v| v as i32).sum()).collect()
    } else {
        Vec::new()
    };
    let mut sink = Sink::new(GemmOutput::F32 { data: out, ldc: n, relu });
    sink.rows = Some(RowParams { q: rows, col_offsets: &w.col_offsets });
    crate::threads::run_with(threads, || drive(Rows::Dense(&a0), w, plan, &rowsums, &sink, threads > 1));
    Ok(())
}

/// A residual addition a `u8` GEMM applies to each block of output it has written, while the
/// block is in cache ([`crate::ResidualAdd`]): output element `(i, j)`, at `i * ldc + j`, is
/// added to `other[i * ldc + j]`, whose flat index in the whole output tensor is
/// `flat0 + i * ldc + j`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockAdd<'a> {
    pub isa: Isa,
    pub other: &'a [u8],
    /// The GEMM's own output parameters (the addition's first operand).
    pub qa: crate::QuantU8,
    pub qb: crate::QuantU8,
    pub qo: crate::QuantU8,
    pub relu: bool,
    pub flat0: usize,
    /// [`crate::vector_prefix`] of the whole output tensor's length.
    pub split: usize,
}

/// Raw output pointer shared by the tasks; each task writes a disjoint set of elements.
struct Sink<'a> {
    kind: SinkKind,
    ptr: usize,
    ldc: usize,
    /// A residual addition applied to each block once written (`u8` output only).
    add: Option<BlockAdd<'a>>,
    /// Per-row activation parameters (`f32` output only; the plan was built for scale 1 and
    /// zero point 0).
    rows: Option<RowParams<'a>>,
}

/// Activation parameters per row of A, for `f32` output: row `i`'s exact sum is the plan's
/// (zero point 0) minus `zero_point[i] * col_offsets[j]`, dequantized with
/// `f32(scale[i] * sw[j])`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowParams<'a> {
    pub q: &'a [crate::QuantU8],
    pub col_offsets: &'a [i32],
}

#[derive(Clone, Copy)]
pub(crate) enum SinkKind {
    U8,
    I32,
    F32 { relu: bool },
}

impl Sink<'_> {
    fn new(out: GemmOutput<'_>) -> Self {
        let (kind, ptr, ldc) = match out {
            GemmOutput::U8 { data, ldc, .. } => (SinkKind::U8, data.as_mut_ptr() as usize, ldc),
            GemmOutput::I32 { data, ldc } => (SinkKind::I32, data.as_mut_ptr() as usize, ldc),
            GemmOutput::F32 { data, ldc, relu } => (SinkKind::F32 { relu }, data.as_mut_ptr() as usize, ldc),
        };
        Sink { kind, ptr, ldc, add: None, rows: None }
    }

    /// The block addition over output rows `rows` and columns `cols`, which this task has
    /// just written.
    fn add_block(&self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) {
        let Some(add) = &self.add else { return };
        if rows.is_empty() {
            return;
        }
        let base = rows.start * self.ldc + cols.start;
        let len = (rows.len() - 1) * self.ldc + cols.len();
        let other = &add.other[base..base + len];
        // SAFETY: the task owning rows `rows` and columns `cols` is the only one touching
        // those elements of the output, which `check` proved lie inside it; `other` holds
        // the same positions (sliced above) in a buffer the output does not overlap (a
        // shared borrow beside the output's exclusive one).
        unsafe {
            crate::frame::ops::add_assign_block(
                add.isa,
                (self.ptr as *mut u8).add(base),
                add.qa,
                other.as_ptr(),
                add.qb,
                add.qo,
                add.relu,
                (rows.len(), cols.len(), self.ldc),
                (add.flat0 + base, add.split),
            )
        }
    }
}

/// Rows per task block.
pub(crate) const MC: usize = 96;
/// Most weight bytes (`k * n`) for which threads share a GEMM's tasks row block by row
/// block: each thread then reads all the weights, which should stay in its L2.
const ROW_MAJOR_WEIGHTS: usize = 256 * 1024;
/// Columns per task block.
const NC: usize = 64;

/// Where the rows of A come from: a matrix, or (for convolutions on AVX-512 VNNI) the padded
/// input image itself, read through per-row base offsets (implicit im2col).
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    Dense(&'a QMatrix<'a>),
    Conv(&'a ConvRows<'a>),
}

impl Rows<'_> {
    fn m(&self) -> usize {
        match self {
            Rows::Dense(a) => a.m,
            Rows::Conv(c) => c.m,
        }
    }
}

/// A convolution's A matrix without im2col: row `r` (output pixel `b, oy, ox`) reads `kh`
/// segments of `kw * c` contiguous bytes of the zero-point-padded NHWC image, the first at
/// [`ConvRows::base`], the next ones `row_step` bytes apart. Its K values are the first `seg`
/// bytes (a multiple of 4) of every segment, in order, then the `tail` bytes after them of
/// every segment, concatenated and zero-padded to whole quads ([`tail_k`] values): `tail` is
/// 0, 1 or 2, so two or four segments share a quad.
#[derive(Debug)]
// Read by the block kernels that take rows in place (AVX-512 VNNI) only.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct ConvRows<'a> {
    pub padded: &'a [u8],
    pub c: usize,
    pub hp: usize,
    pub wp: usize,
    pub oh: usize,
    pub ow: usize,
    pub stride: [usize; 2],
    pub dil_h: usize,
    pub kh: usize,
    pub seg: usize,
    pub tail: usize,
    pub m: usize,
}

/// Most quads of gathered segment tails the implicit-im2col kernel takes.
pub(crate) const MAX_TAIL_QUADS: usize = 4;

/// K values taken by `kh` segment tails of `tail` bytes each, in whole quads.
pub(crate) fn tail_k(kh: usize, tail: usize) -> usize {
    (kh * tail).next_multiple_of(4)
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl ConvRows<'_> {
    /// Offset of row `r`'s first segment in `padded`.
    pub fn base(&self, r: usize) -> usize {
        let (b, rem) = (r / (self.oh * self.ow), r % (self.oh * self.ow));
        let (oy, ox) = (rem / self.ow, rem % self.ow);
        ((b * self.hp + oy * self.stride[0]) * self.wp + ox * self.stride[1]) * self.c
    }

    /// Fills `out` with pointers to the first segments of rows `r0..r0 + out.len()`: one
    /// division for the first, then a step along the output row, recomputed where it wraps.
    pub fn bases_into(&self, r0: usize, out: &mut [*const u8]) {
        let (step, mut ox) = (self.stride[1] * self.c, r0 % self.ow);
        let mut at = self.base(r0);
        for (i, p) in out.iter_mut().enumerate() {
            if i > 0 {
                ox += 1;
                if ox == self.ow {
                    ox = 0;
                    at = self.base(r0 + i);
                } else {
                    at += step;
                }
            }
            *p = self.padded[at..].as_ptr();
        }
    }

    /// Distance between a row's segments.
    pub fn row_step(&self) -> usize {
        self.dil_h * self.wp * self.c
    }
}

/// The implicit-im2col GEMM for a convolution with symmetric weights packed by a tier whose
/// block kernel reads rows in place (`GemmKernels::implicit_conv`), writing requantized `u8`
/// with row stride `ldc`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_conv(
    rows: &ConvRows<'_>,
    w: &PackedWeights,
    plan: &Plan,
    out: &mut [u8],
    ldc: usize,
    threads: usize,
    add: Option<BlockAdd<'_>>,
) {
    assert!(
        w.kernels.gemm.implicit_conv
            && w.is_symmetric()
            && w.k == rows.kh * rows.seg + tail_k(rows.kh, rows.tail)
            && rows.seg.is_multiple_of(4)
            && rows.tail <= 2,
        "gemm_conv: caller must pass symmetric weights packed for implicit im2col, matching the rows"
    );
    assert!(rows.m == 0 || out.len() >= (rows.m - 1) * ldc + w.n, "gemm_conv: output too small");
    assert!(
        add.is_none_or(|a| rows.m == 0 || a.other.len() >= (rows.m - 1) * ldc + w.n),
        "gemm_conv: residual operand too short"
    );
    let sink = Sink { kind: SinkKind::U8, ptr: out.as_mut_ptr() as usize, ldc, add, rows: None };
    crate::threads::run_with(threads, || drive(Rows::Conv(rows), w, plan, &[], &sink, threads > 1));
}

/// Rows per task block for `m` rows and the column blocks `cols` (their widths) on `threads`
/// threads: at most [`MC`], in whole tiles of six rows. On several threads with fewer than
/// four tasks per thread, the row count among those up to twice as many blocks as [`MC`]
/// needs (plus one per thread) whose tasks, dealt largest first to
/// the least loaded thread, finish soonest (each task's work counted in whole tiles), the
/// fewest blocks on a tie: MobileNetV2's 7 x 7 layers (49 rows, 160 columns in blocks of
/// 64, 64 and 32) split their rows in two, so that two threads share six tasks evenly instead
/// of three unevenly.
pub(crate) fn rows_per_block(m: usize, cols: &[usize], threads: usize) -> usize {
    let base = m.div_ceil(MC).max(1);
    let rows_of = |blocks: usize| m.div_ceil(blocks).next_multiple_of(6).clamp(1, MC);
    // Many tasks even out by themselves.
    if threads <= 1 || m == 0 || base * cols.len() >= 4 * threads {
        return MC;
    }
    let makespan = |mc: usize| {
        let mut tasks: Vec<usize> = Vec::new();
        for r0 in (0..m).step_by(mc) {
            let rows = (m - r0).min(mc).next_multiple_of(6);
            tasks.extend(cols.iter().map(|c| rows * c.next_multiple_of(16)));
        }
        tasks.sort_unstable_by(|a, b| b.cmp(a));
        let mut load = vec![0usize; threads];
        for t in tasks {
            *load.iter_mut().min().expect("threads > 1") += t;
        }
        load.into_iter().max().unwrap_or(0)
    };
    let mut best = (makespan(MC), MC);
    for blocks in base..=2 * base + threads {
        let mc = rows_of(blocks);
        if mc < 6 || mc == best.1 {
            continue;
        }
        let span = makespan(mc);
        if span < best.0 {
            best = (span, mc);
        }
    }
    best.1
}

/// What a tier's block kernel works out once from the rows of A of one GEMM call and shares
/// between its blocks of columns ([`Block::row_memo`]): by block of rows (`r0 /
/// rows_per_block`), what the kernel derived from the block's rows (AVX2: which rows are
/// within the pair bound, the ones above it clamped with their excess codes, the rows
/// widened to i16; nothing when every row is within the bound), made by the first block of
/// columns to need it. No entries unless the rows are dense and the weights have an AVX2
/// pair bound below 255.
// Read by the AVX2 block kernel (x86-64 only).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct RowMemo {
    pub blocks: Vec<OnceLock<Option<Box<dyn Any + Send + Sync>>>>,
    pub rows_per_block: usize,
}

impl RowMemo {
    fn new(a: &Rows<'_>, w: &PackedWeights, m: usize, mc: usize) -> Self {
        let keep = matches!(a, Rows::Dense(_)) && w.pairs.as_ref().is_some_and(|p| p.max_input < u8::MAX);
        let blocks = if keep { m.div_ceil(mc) } else { 0 };
        RowMemo { blocks: (0..blocks).map(|_| OnceLock::new()).collect(), rows_per_block: mc }
    }
}

#[allow(clippy::too_many_arguments)]
fn drive(a: Rows<'_>, w: &PackedWeights, plan: &Plan, rowsums: &[i32], sink: &Sink<'_>, parallel: bool) {
    let m = a.m();
    // Columns split evenly in whole 16-column panels, at most NC per block: 144 columns
    // make three blocks of 48 rather than 64 + 64 + 16, whose last tile would run at a third
    // of the others' efficiency.
    let nc = w.n.div_ceil(w.n.div_ceil(NC).max(1)).next_multiple_of(VNNI_LANES).clamp(VNNI_LANES, NC);
    let nblocks = w.n.div_ceil(nc);
    let widths: Vec<usize> = (0..nblocks).map(|b| ((b + 1) * nc).min(w.n) - b * nc).collect();
    let mc = rows_per_block(m, &widths, if parallel { rayon::current_num_threads() } else { 1 });
    let mblocks = m.div_ceil(mc);
    let memo = RowMemo::new(&a, w, m, mc);
    // One thread goes column block by column block, each block's weights staying in cache
    // for all its rows. Threads sharing small weights go row block by row block instead:
    // each thread's contiguous share of the tasks is then a band of rows, as the previous
    // layer's shares were, so the rows it reads (and a residual it adds) are mostly the ones
    // it wrote, still in its own cache.
    let by_rows = parallel && mblocks > 1 && w.k * w.n <= ROW_MAJOR_WEIGHTS;
    let task = |t: usize| {
        let (nb, mb) = if by_rows { (t % nblocks, t / nblocks) } else { (t / mblocks, t % mblocks) };
        let rows = mb * mc..((mb + 1) * mc).min(m);
        let cols = nb * nc..((nb + 1) * nc).min(w.n);
        block(a, w, plan, rowsums, &memo, sink, rows, cols);
    };
    if parallel {
        crate::threads::share_tasks(mblocks * nblocks, task);
    } else {
        (0..mblocks * nblocks).for_each(task);
    }
}

/// Computes the output rows × cols (cols within one NC block).
#[allow(clippy::too_many_arguments)]
fn block(
    src: Rows<'_>,
    w: &PackedWeights,
    plan: &Plan,
    rowsums: &[i32],
    row_memo: &RowMemo,
    sink: &Sink<'_>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    let k = w.kernels;
    let job = Block {
        src,
        w,
        plan,
        rowsums,
        row_memo,
        kind: sink.kind,
        out: sink.ptr as *mut u8,
        ldc: sink.ldc,
        per_row: sink.rows.as_ref().map(|rp| (rp.q, rp.col_offsets)),
        rows: rows.clone(),
        cols: cols.clone(),
    };
    // SAFETY: `w` was packed by `k`; rows `rows` and columns `cols` lie inside the rows, the
    // weights and the output, as `check` established; this task is the only writer of those
    // output elements.
    if unsafe { (k.gemm.block)(&job) } {
        sink.add_block(rows, cols);
        return;
    }
    // Otherwise raw int32 tiles, then the epilogue for the sink.
    let Rows::Dense(a) = src else { unreachable!("rows read in place go to tiers whose block kernel takes them") };
    let mut tile: Tile = [[0; TILE_COLS]; TILE_ROWS];
    let mut r0 = rows.start;
    while r0 < rows.end {
        // SAFETY: as above, for raw sums into the tile; at least one row is left.
        let mr = unsafe { (k.gemm.tile)(a, r0, rows.end - r0, w, cols.clone(), &mut tile) };
        debug_assert!((1..=TILE_ROWS).contains(&mr));
        for r in 0..mr {
            let i = r0 + r;
            let rowsum = if plan.has_zw { rowsums[i] } else { 0 };
            let acc = &tile[r][..cols.len()];
            epilogue_row(k, plan, acc, rowsum, cols.start, sink, i);
        }
        r0 += mr;
    }
    sink.add_block(rows, cols);
}

// `out[c] = fma(raw, ab_scale[c], bias[c])` (then `max(.., 0)` with `relu`), `raw` the exact
// sum `acc[c] - colterm[c] - rowsum * zw[c]`: compiled per tier, where `mul_add` is one
// instruction; the same bits everywhere.
qtensor::multiversion! {
    pub(crate) fn dequantize_row(
        acc: &[i32],
        colterm: &[i32],
        zw: (i32, &[i32]),
        scale_bias: (&[f32], &[f32]),
        relu: bool,
        out: &mut [f32],
    ) {
        let (rowsum, zw) = zw;
        let (ab_scale, bias) = scale_bias;
        for (c, o) in out.iter_mut().enumerate() {
            let raw = acc[c].wrapping_sub(colterm[c]).wrapping_sub(rowsum.wrapping_mul(zw[c]));
            let v = (raw as f32).mul_add(ab_scale[c], bias[c]);
            *o = if relu { v.max(0.0) } else { v };
        }
    }
}

fn epilogue_row(k: &Kernels, plan: &Plan, acc: &[i32], rowsum: i32, j0: usize, sink: &Sink<'_>, i: usize) {
    let n = acc.len();
    let base = i * sink.ldc + j0;
    match sink.kind {
        SinkKind::U8 => {
            // SAFETY: the task owning row i and columns j0..j0+n is the only writer of these
            // n elements, which `check` proved lie inside the output buffer.
            let out = unsafe { std::slice::from_raw_parts_mut((sink.ptr as *mut u8).add(base), n) };
            // SAFETY: `out` holds `acc.len()` values; the plan covers the columns.
            unsafe { (k.epilogue_u8)(plan, acc, rowsum, j0, out) };
        }
        SinkKind::I32 => {
            // SAFETY: as for U8.
            let out = unsafe { std::slice::from_raw_parts_mut((sink.ptr as *mut i32).add(base), n) };
            for c in 0..n {
                let j = j0 + c;
                out[c] = acc[c].wrapping_sub(plan.colterm[j]).wrapping_sub(rowsum.wrapping_mul(plan.zw[j]));
            }
        }
        SinkKind::F32 { relu } => {
            // SAFETY: as for U8.
            let out = unsafe { std::slice::from_raw_parts_mut((sink.ptr as *mut f32).add(base), n) };
            let cols = j0..j0 + n;
            if let Some(rp) = &sink.rows {
                // This row's zero-point term and scales (at most TILE_COLS columns).
                let q = rp.q[i];
                let (mut colterm, mut ab) = ([0i32; TILE_COLS], [0f32; TILE_COLS]);
                for (c, j) in cols.clone().enumerate() {
                    colterm[c] = q.zero_point.wrapping_mul(rp.col_offsets[j]);
                    ab[c] = q.scale * plan.ab_scale[j];
                }
                dequantize_row(
                    plan.isa,
                    acc,
                    &colterm[..n],
                    (rowsum, &plan.zw[cols.clone()]),
                    (&ab[..n], &plan.bias[cols]),
                    relu,
                    out,
                );
                return;
            }
            dequantize_row(
                plan.isa,
                acc,
                &plan.colterm[cols.clone()],
                (rowsum, &plan.zw[cols.clone()]),
                (&plan.ab_scale[cols.clone()], &plan.bias[cols]),
                relu,
                out,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_blocks_balance_few_tasks_between_threads() {
        // One thread, or plenty of rows: blocks of up to MC rows, as before.
        assert_eq!(rows_per_block(196, &[64], 1), 96);
        assert_eq!(rows_per_block(3136, &[64], 2), 96);
        // 49 rows by 64 + 64 + 32 columns on two threads: two row blocks, six tasks.
        assert_eq!(rows_per_block(49, &[64, 64, 32], 2), 30);
        // 196 rows by 64 columns: 96 + 96 + 4 is already even (100 against 96).
        assert_eq!(rows_per_block(196, &[64], 2), 96);
        // Whole tiles of six rows, never more than MC.
        for m in [1, 5, 6, 7, 49, 95, 96, 97, 196, 784] {
            for threads in 1..=4 {
                let mc = rows_per_block(m, &[64, 48], threads);
                assert!(mc <= MC && (mc.is_multiple_of(6) || mc == MC), "m {m} threads {threads}: {mc}");
            }
        }
    }
}
