//! Int8 conv2d on NHWC activations: 1x1 convolutions as a plain GEMM over the input (no
//! copy), k x k convolutions through a chunked im2col into a reused per-thread buffer, and
//! depthwise convolutions through their own kernel.

use std::cell::RefCell;

use rayon::prelude::*;

use qtensor::isa::Isa;
use qtensor::{DType, QError, QParams, QTensor, QuantRange, Result};

use crate::frame::aligned::Aligned;
use crate::frame::gemm::{gemm_planned, BlockAdd, GemmOutput, OutputQuant, Plan, PlanCache, PlanKey, QMatrix};
use crate::frame::kernels::{DwPacked, DwWeights, Kernels, DW_PAIR_BLOCK};
use crate::frame::ops::{vector_prefix, QuantU8, ResidualAdd};
use crate::frame::pack::PackedWeights;

/// `u8` activations in NHWC layout (batch, height, width, channels), with their quantization.
#[derive(Clone, Copy, Debug)]
pub struct QImage<'a> {
    /// `n * h * w * c` values, channels fastest.
    pub data: &'a [u8],
    /// Batch.
    pub n: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Channels.
    pub c: usize,
    /// Scale.
    pub scale: f32,
    /// Zero point, `0..=255`.
    pub zero_point: i32,
}

/// Stride, padding, dilation (each as `[height, width]`) and groups of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeometry {
    /// Step between output pixels.
    pub stride: [usize; 2],
    /// Implicit zero padding on each side.
    pub padding: [usize; 2],
    /// Spacing between kernel taps.
    pub dilation: [usize; 2],
    /// Channel groups (`groups == channels` is a depthwise convolution).
    pub groups: usize,
}

impl Default for Conv2dGeometry {
    fn default() -> Self {
        Conv2dGeometry { stride: [1, 1], padding: [0, 0], dilation: [1, 1], groups: 1 }
    }
}

/// A convolution's weights, packed once, and its bias.
#[derive(Clone, Debug)]
pub struct PackedConv2d {
    oc: usize,
    ic: usize,
    kh: usize,
    kw: usize,
    geom: Conv2dGeometry,
    bias: Option<Vec<f32>>,
    kind: ConvKind,
    plans: PlanCache,
    /// The instruction set it was packed for (what its fused additions run on too).
    isa: Isa,
}

#[derive(Clone, Debug)]
enum ConvKind {
    /// One packed GEMM operand per group, `[oc / groups, kh * kw * ic / groups]`.
    Gemm(Vec<PackedWeights>),
    /// Dense, symmetric weights on a tier whose block kernel reads rows in place (AVX-512
    /// VNNI): implicit im2col over the padded input, with
    /// the layout of [`implicit_layout`]: each kernel row's first `seg` bytes (a multiple of
    /// 4) read in place as quads, then every row's last `tail` bytes gathered into shared
    /// quads. When `tail` is 0 and `seg > kw * c`, the segment is padded with zero weights
    /// and the kernel also reads the bytes that follow it.
    Implicit { w: PackedWeights, seg: usize, tail: usize },
    /// `taps` is `[c, kh * kw]` (scalar layout); `packed` the layout of the pixel kernel of
    /// `kernels`: the layer's tier's, or the generic tier's when that one does not take these
    /// weights (asymmetric weights on AVX2 and AVX-512 VNNI).
    Depthwise {
        taps: PackedWeights,
        kernels: &'static Kernels,
        packed: DwPacked,
        /// The row-interleaved layout (`pack_depthwise_rows`), for stride 1 along the width
        /// and kernels up to 5 x 4.
        rows: Option<Box<DwKernel<RowConsts>>>,
        /// The flat-row layout, for stride 1 along the width and kernels wider than 4, or
        /// stride 2 without horizontal dilation (up to 16 rows and 64 taps).
        flat: Option<Box<DwKernel<FlatConsts>>>,
    },
}

/// Epilogue constants of the flat depthwise kernel, by channel class: lane `i` of class `cl`
/// is channel `(cl * gcd(c, 64) + i) % c`.
#[derive(Clone, Debug)]
// Read by the AVX-512 VNNI row kernels only.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct FlatConsts {
    pub colterm: Vec<i32>,
    /// Added to the raw sum: the depthwise bias forms have a precomputed term (their
    /// `bias_scale` is 1, so FBGEMM's fma is this add).
    pub bias_term: Vec<f32>,
    pub mult: Vec<f32>,
    pub zo: i32,
    pub lo: i32,
    pub hi: i32,
    pub clamp_free: bool,
}

/// Epilogue constants of the row-interleaved depthwise kernel, by channel class
/// (as [`FlatConsts`]) and in the kernel's lane order: entry `64cl + 16q + 4l + d` is for
/// output byte `16l + 4q + d` of a chunk of class `cl`. `neg_colterm` starts the accumulators.
#[derive(Clone, Debug)]
// Read by the AVX-512 VNNI row kernels only.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct RowConsts {
    pub neg_colterm: Vec<i32>,
    pub bias_term: Vec<f32>,
    pub mult: Vec<f32>,
    pub zo: i32,
    pub lo: u8,
    pub hi: u8,
    pub clamp_free: bool,
}

/// The packed weights of one AVX-512 depthwise kernel, and its epilogue constants in that
/// kernel's lane order: derived from the plan once per input and output parameters, not on
/// every call.
#[derive(Clone, Debug)]
struct DwKernel<C> {
    weights: Aligned<i8>,
    consts: PlanCache<C>,
}

impl<C> DwKernel<C> {
    fn new(weights: Aligned<i8>) -> Box<Self> {
        Box::new(DwKernel { weights, consts: PlanCache::default() })
    }
}

const OP: &str = "qkernels::conv2d";

impl PackedConv2d {
    /// Packs OHWI weights (`[out_channels, kh, kw, in_channels / groups]`, per-tensor or
    /// per-channel along axis 0) and an optional `f32` bias for the instruction set
    /// [`qtensor::isa::selected`] picks.
    ///
    /// # Errors
    /// Weights that are not 4-D, channels not divisible by `groups`, a zero stride or
    /// dilation, a bias of the wrong length or with non-finite values.
    pub fn new(weights: &QTensor<i8>, bias: Option<&[f32]>, geom: Conv2dGeometry) -> Result<Self> {
        Self::with_isa(qtensor::isa::selected(), weights, bias, geom)
    }

    /// [`PackedConv2d::new`] for an explicit instruction set (capped to what the CPU has).
    ///
    /// # Errors
    /// As [`PackedConv2d::new`].
    pub fn with_isa(isa: Isa, weights: &QTensor<i8>, bias: Option<&[f32]>, geom: Conv2dGeometry) -> Result<Self> {
        let shape = weights.shape();
        let bad = |reason: String| QError::Unsupported { op: OP, reason };
        if shape.len() != 4 {
            return Err(bad(format!(
                "conv weights must be 4-D [out_channels, kh, kw, in_channels/groups] (OHWI), got shape {shape:?}"
            )));
        }
        let (oc, kh, kw, icg) = (shape[0], shape[1], shape[2], shape[3]);
        let g = geom.groups;
        if g == 0 || oc % g != 0 || oc == 0 || kh == 0 || kw == 0 || icg == 0 {
            return Err(bad(format!(
                "weights {shape:?} with groups = {g}: out_channels must be a non-zero multiple of groups"
            )));
        }
        if geom.stride.contains(&0) || geom.dilation.contains(&0) {
            return Err(bad(format!("stride {:?} and dilation {:?} must be >= 1", geom.stride, geom.dilation)));
        }
        if let Some(b) = bias {
            crate::frame::gemm::check_bias(OP, b, oc)?;
        }
        let ic = icg * g;
        let ocg = oc / g;
        let isa = isa.capped_to_supported();
        let kind = if g == ic && g == oc && icg == 1 {
            let taps = QTensor::from_int_repr(
                ndarray::Array2::from_shape_vec((oc, kh * kw), weights.as_slice().to_vec()).expect("OHWI with I = 1"),
                weights.params().clone(),
                weights.range(),
            )?;
            let taps = PackedWeights::with_isa(Isa::Scalar, &taps)?;
            let tier = crate::registry::kernels(isa);
            let (kernels, packed) = match (tier.depthwise.pack)(&taps) {
                Some(p) => (tier, p),
                None => {
                    let generic = crate::registry::kernels(Isa::Scalar);
                    (generic, (generic.depthwise.pack)(&taps).expect("the generic depthwise kernel takes any weights"))
                }
            };
            // The row kernels come with their tier's pixel kernel, which took the weights.
            let dw = &kernels.depthwise;
            let unit_w = dw.rows.is_some() && geom.stride[1] == 1;
            let rows = (unit_w && kw <= 4 && kh <= 5 && kh * geom.dilation[0] <= 32)
                .then(|| DwKernel::new(pack_depthwise_rows(&taps, kh, kw)));
            // Stride 2 along the width runs the flat kernel over rows split into even and odd
            // pixels (`pad_image` with phases). The flat kernel keeps 16 row pointers and a table
            // of 64 taps; larger kernels go through the per-pixel one.
            let half_w = dw.flat_row.is_some() && geom.stride[1] == 2 && geom.dilation[1] == 1;
            let flat = (dw.flat_row.is_some() && (unit_w || half_w) && rows.is_none() && kh <= 16 && kh * kw <= 64)
                .then(|| DwKernel::new(pack_depthwise_flat(&taps)));
            ConvKind::Depthwise { taps, kernels, packed, rows, flat }
        } else if let Some(kind) = Self::implicit_kind(isa, weights, geom)? {
            kind
        } else {
            let k = kh * kw * icg;
            let mut groups = Vec::with_capacity(g);
            for gi in 0..g {
                let rows = &weights.as_slice()[gi * ocg * k..(gi + 1) * ocg * k];
                let params = match weights.params() {
                    QParams::PerTensor { .. } => weights.params().clone(),
                    QParams::PerChannel(pc) => QParams::per_channel(
                        pc.scales()[gi * ocg..(gi + 1) * ocg].to_vec(),
                        pc.zero_points()[gi * ocg..(gi + 1) * ocg].to_vec(),
                        0,
                    )?,
                };
                let t = QTensor::from_int_repr(
                    ndarray::Array2::from_shape_vec((ocg, k), rows.to_vec()).expect("group slice"),
                    params,
                    weights.range(),
                )?;
                groups.push(PackedWeights::with_isa(isa, &t)?);
            }
            ConvKind::Gemm(groups)
        };
        Ok(PackedConv2d {
            oc,
            ic,
            kh,
            kw,
            geom,
            bias: bias.map(<[f32]>::to_vec),
            kind,
            plans: PlanCache::default(),
            isa,
        })
    }

    /// The implicit-im2col layout, when it applies: one group, symmetric weights, a tier whose
    /// block kernel reads rows in place, no horizontal dilation, and not a plain 1x1 (which
    /// needs no im2col at all). Kernel rows are read as [`implicit_layout`] says, when its
    /// padding costs at most a third more work.
    fn implicit_kind(isa: Isa, weights: &QTensor<i8>, geom: Conv2dGeometry) -> Result<Option<ConvKind>> {
        let shape = weights.shape();
        let (oc, kh, kw, ic) = (shape[0], shape[1], shape[2], shape[3]);
        let pointwise = kh == 1 && kw == 1 && geom.stride == [1, 1] && geom.padding == [0, 0];
        let symmetric = match weights.params() {
            QParams::PerTensor { zero_point, .. } => *zero_point == 0,
            QParams::PerChannel(pc) => pc.zero_points().iter().all(|&z| z == 0),
        };
        if geom.groups != 1
            || pointwise
            || !symmetric
            || !crate::registry::kernels(isa).gemm.implicit_conv
            || geom.dilation[1] != 1
        {
            return Ok(None);
        }
        let row = kw * ic;
        let (seg, tail) = implicit_layout(kh, row);
        let k = kh * seg + crate::frame::gemm::tail_k(kh, tail);
        if 3 * k > 4 * kh * row {
            return Ok(None);
        }
        let mut data = vec![0i8; oc * k];
        for (dst, src) in data.chunks_exact_mut(k).zip(weights.as_slice().chunks_exact(kh * row)) {
            let (body, tails) = dst.split_at_mut(kh * seg);
            for (ky, w) in src.chunks_exact(row).enumerate() {
                let n = seg.min(row);
                body[ky * seg..ky * seg + n].copy_from_slice(&w[..n]);
                tails[ky * tail..(ky + 1) * tail].copy_from_slice(&w[n..n + tail]);
            }
        }
        let t = QTensor::from_int_repr(
            ndarray::Array2::from_shape_vec((oc, k), data).expect("implicit weights"),
            weights.params().clone(),
            weights.range(),
        )?;
        Ok(Some(ConvKind::Implicit { w: PackedWeights::with_isa(isa, &t)?, seg, tail }))
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.oc
    }
    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.ic
    }
    /// The kernel that runs this convolution, for plans and profiles: the path chosen at
    /// packing and its micro-kernel (on AVX2, whether `vpmaddubsw` may run, and up to which
    /// input code: [`PackedWeights::pair_sums_up_to`]).
    pub fn kernel(&self) -> String {
        match &self.kind {
            ConvKind::Gemm(groups) => {
                let how = if self.kh * self.kw == 1 && self.geom.stride == [1, 1] && self.geom.padding == [0, 0] {
                    "pointwise GEMM"
                } else {
                    "im2col GEMM"
                };
                format!("{how}, {}", (groups[0].kernels.gemm.name)(groups))
            }
            ConvKind::Implicit { w, .. } => format!("implicit im2col GEMM, {}", w.kernel()),
            ConvKind::Depthwise { kernels, rows, flat, packed, .. } => match (rows, flat, packed.describe()) {
                (Some(_), _, _) => format!("depthwise, {}: row-interleaved", kernels.isa.name()),
                (None, Some(_), _) => format!("depthwise, {}: flat rows", kernels.isa.name()),
                (None, None, Some(how)) => format!("depthwise, {}: per pixel, {how}", kernels.isa.name()),
                _ => format!("depthwise, {}", kernels.depthwise.name),
            },
        }
    }

    /// Whether the depthwise kernel runs this convolution.
    pub fn is_depthwise(&self) -> bool {
        matches!(self.kind, ConvKind::Depthwise { .. })
    }

    /// Output height and width for an input of `h x w`.
    ///
    /// # Errors
    /// When the (padded) input is smaller than the dilated kernel.
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let dim = |inp: usize, k: usize, s: usize, p: usize, d: usize| {
            let span = d * (k - 1) + 1;
            (inp + 2 * p >= span).then(|| (inp + 2 * p - span) / s + 1)
        };
        let g = &self.geom;
        match (
            dim(h, self.kh, g.stride[0], g.padding[0], g.dilation[0]),
            dim(w, self.kw, g.stride[1], g.padding[1], g.dilation[1]),
        ) {
            (Some(oh), Some(ow)) => Ok((oh, ow)),
            _ => Err(QError::Unsupported {
                op: OP,
                reason: format!(
                    "input {h}x{w} with padding {:?} is smaller than the {}x{} kernel dilated by {:?}; \
                     use a larger input or more padding",
                    g.padding, self.kh, self.kw, g.dilation
                ),
            }),
        }
    }

    /// Runs the convolution, writing requantized `u8` NHWC output (`n * oh * ow * oc`).
    /// `threads` threads share the work; the result is bit-identical for every count.
    ///
    /// # Errors
    /// An input whose channels or buffer do not match, an output buffer of the wrong length,
    /// invalid scales or zero points.
    pub fn forward_u8(&self, x: &QImage<'_>, quant: OutputQuant, out: &mut [u8], threads: usize) -> Result<()> {
        self.forward_u8_impl(x, quant, out, threads, None)
    }

    /// [`PackedConv2d::forward_u8`] followed by a residual addition, fused: each block of
    /// output is added to `add.other` as soon as it is written, while it is in cache (the
    /// depthwise paths add after the whole layer). The result is bit-identical to running
    /// [`forward_u8`](PackedConv2d::forward_u8) into a buffer `y` and then
    /// [`crate::add`]`(y, quant's parameters, add.other, add.other_q, out, add.out_q, add.relu)`.
    ///
    /// # Errors
    /// As [`forward_u8`](PackedConv2d::forward_u8); an operand whose length is not the
    /// output's; invalid parameters of the addition.
    pub fn forward_u8_add(
        &self,
        x: &QImage<'_>,
        quant: OutputQuant,
        add: ResidualAdd<'_>,
        out: &mut [u8],
        threads: usize,
    ) -> Result<()> {
        add.check(OP, out.len())?;
        self.forward_u8_impl(x, quant, out, threads, Some(&add))
    }

    fn forward_u8_impl(
        &self,
        x: &QImage<'_>,
        quant: OutputQuant,
        out: &mut [u8],
        threads: usize,
        add: Option<&ResidualAdd<'_>>,
    ) -> Result<()> {
        if x.c != self.ic {
            return Err(QError::ShapeMismatch {
                op: OP,
                expected: vec![x.n, x.h, x.w, self.ic],
                actual: vec![x.n, x.h, x.w, x.c],
                hint: "the input's channel count (NHWC, last) must equal the layer's in_channels",
            });
        }
        if x.data.len() != x.n * x.h * x.w * x.c {
            return Err(QError::ShapeMismatch {
                op: OP,
                expected: vec![x.n * x.h * x.w * x.c],
                actual: vec![x.data.len()],
                hint: "the input buffer must hold exactly n * h * w * c values",
            });
        }
        let (oh, ow) = self.output_hw(x.h, x.w)?;
        if out.len() != x.n * oh * ow * self.oc {
            return Err(QError::ShapeMismatch {
                op: OP,
                expected: vec![x.n, oh, ow, self.oc],
                actual: vec![out.len()],
                hint: "the output buffer must hold n * oh * ow * out_channels values",
            });
        }
        qtensor::QParams::per_tensor(x.scale, x.zero_point)?;
        qtensor::QParams::per_tensor(quant.scale, quant.zero_point)?;
        for (zp, what) in [(x.zero_point, "input"), (quant.zero_point, "output")] {
            if !(0..=255).contains(&zp) {
                return Err(QError::Unsupported {
                    op: OP,
                    reason: format!("{what} zero point {zp} is outside 0..=255 (u8)"),
                });
            }
        }
        if out.is_empty() {
            return Ok(());
        }
        // The addition's constants (the convolution's output parameters are its first
        // operand) for output from flat index `flat0` on.
        let out_len = out.len();
        let block_add = |flat0: usize| {
            add.map(|a| BlockAdd {
                isa: self.isa,
                other: &a.other[flat0..],
                qa: QuantU8 { scale: quant.scale, zero_point: quant.zero_point },
                qb: a.other_q,
                qo: a.out_q,
                relu: a.relu,
                flat0,
                split: vector_prefix(out_len),
            })
        };
        match &self.kind {
            ConvKind::Gemm(groups) => {
                let ocg = self.oc / groups.len();
                let key = PlanKey::new(x.scale, x.zero_point, Some(quant));
                let build = || {
                    let bias = |gi: usize| self.bias.as_ref().map(|b| &b[gi * ocg..(gi + 1) * ocg]);
                    groups
                        .iter()
                        .enumerate()
                        .map(|(gi, w)| Plan::new(x.scale, x.zero_point, w, bias(gi), Some(quant), false))
                        .collect()
                };
                self.plans.with(key, build, |plans| {
                    self.forward_gemm(groups, plans, x, quant, out, (oh, ow), threads, &block_add)
                })
            }
            ConvKind::Implicit { w, seg, tail } => {
                self.forward_implicit(w, *seg, *tail, x, quant, out, oh, ow, threads, block_add(0));
                Ok(())
            }
            ConvKind::Depthwise { taps, kernels, packed, rows, flat } => {
                let key = PlanKey::new(x.scale, x.zero_point, Some(quant));
                let build = || vec![Plan::new(x.scale, x.zero_point, taps, self.bias.as_deref(), Some(quant), true)];
                self.plans.with(key, build, |plans| {
                    let plan = &plans[0];
                    match (rows, flat) {
                        (Some(k), _) => k.consts.with(
                            key,
                            || row_consts(plan, self.oc),
                            |consts| {
                                crate::threads::run_with(threads, || {
                                    self.forward_depthwise_rows(kernels, &k.weights, consts, x, out, oh, ow, threads)
                                })
                            },
                        ),
                        (None, Some(k)) => k.consts.with(
                            key,
                            || flat_consts(plan, self.oc),
                            |consts| {
                                crate::threads::run_with(threads, || {
                                    self.forward_depthwise_flat(
                                        kernels,
                                        &k.weights,
                                        consts,
                                        x,
                                        out,
                                        oh,
                                        ow,
                                        threads > 1,
                                    )
                                })
                            },
                        ),
                        _ => crate::threads::run_with(threads, || {
                            self.forward_depthwise(taps, kernels, packed, plan, x, out, oh, ow, threads > 1)
                        }),
                    }
                });
                if let Some(a) = block_add(0) {
                    let len = out.len();
                    // SAFETY: `out` is borrowed exclusively for its len elements, and `a.other`
                    // (checked to be as long) is a shared borrow, so they do not overlap.
                    unsafe {
                        crate::frame::ops::add_assign_block(
                            a.isa,
                            out.as_mut_ptr(),
                            a.qa,
                            a.other.as_ptr(),
                            a.qb,
                            a.qo,
                            a.relu,
                            (1, len, len),
                            (0, a.split),
                        )
                    }
                }
                Ok(())
            }
        }
    }

    /// The GEMM paths; `block_add(flat0)` is the residual addition, if any, for output from
    /// flat index `flat0` on.
    #[allow(clippy::too_many_arguments)]
    fn forward_gemm<'a>(
        &self,
        groups: &[PackedWeights],
        plans: &[Plan],
        x: &QImage<'_>,
        quant: OutputQuant,
        out: &mut [u8],
        (oh, ow): (usize, usize),
        threads: usize,
        block_add: &(dyn Fn(usize) -> Option<BlockAdd<'a>> + Sync),
    ) -> Result<()> {
        let g = &self.geom;
        let ng = groups.len();
        let (icg, ocg) = (self.ic / ng, self.oc / ng);
        let rows = x.n * oh * ow;
        let bias = |gi: usize| self.bias.as_ref().map(|b| &b[gi * ocg..(gi + 1) * ocg]);
        let pointwise = self.kh == 1 && self.kw == 1 && g.stride == [1, 1] && g.padding == [0, 0];
        if pointwise {
            for (gi, w) in groups.iter().enumerate() {
                let a = QMatrix {
                    data: &x.data[gi * icg..],
                    m: rows,
                    k: icg,
                    lda: x.c,
                    scale: x.scale,
                    zero_point: x.zero_point,
                };
                let out = GemmOutput::U8 { data: &mut out[gi * ocg..], ldc: self.oc, quant };
                gemm_planned(&a, w, bias(gi), Some(&plans[gi]), out, threads, block_add(gi * ocg))?;
            }
            return Ok(());
        }
        let k = self.kh * self.kw * icg;
        // About 128 KiB of im2col rows per chunk: produced and consumed while in L2.
        let mut chunk = (131_072 / k).clamp(16, 4096).min(rows);
        // On several threads, a whole number of chunks per thread (each thread's share of
        // the rows within one chunk of the others'), so that none waits on a last odd chunk.
        if threads > 1 && rows.div_ceil(chunk) >= 2 * threads {
            let even = rows.div_ceil(chunk).next_multiple_of(threads);
            chunk = rows.div_ceil(even);
        }
        let nchunks = rows.div_ceil(chunk);
        let run_chunk = |ci: usize, out_chunk: &mut [u8], gemm_threads: usize| -> Result<()> {
            let r0 = ci * chunk;
            let r1 = (r0 + chunk).min(rows);
            with_scratch(&SCRATCH, |buf| {
                for (gi, w) in groups.iter().enumerate() {
                    // Every byte of the rows is written by im2col; the slack lets it copy short
                    // segments with whole-vector moves that spill into bytes written later.
                    let need = (r1 - r0) * k + IM2COL_SLACK;
                    if buf.len() < need {
                        buf.resize(need, 0);
                    }
                    self.im2col(x, gi * icg, icg, oh, ow, r0..r1, &mut buf[..need]);
                    let a = QMatrix { data: buf, m: r1 - r0, k, lda: k, scale: x.scale, zero_point: x.zero_point };
                    gemm_planned(
                        &a,
                        w,
                        bias(gi),
                        Some(&plans[gi]),
                        GemmOutput::U8 { data: &mut out_chunk[gi * ocg..], ldc: self.oc, quant },
                        gemm_threads,
                        block_add(r0 * self.oc + gi * ocg),
                    )?;
                }
                Ok(())
            })
        };
        if threads > 1 && nchunks >= 2 * threads {
            crate::threads::run_with(threads, || {
                out.par_chunks_mut(chunk * self.oc).enumerate().try_for_each(|(ci, oc)| run_chunk(ci, oc, 1))
            })
        } else {
            out.chunks_mut(chunk * self.oc).enumerate().try_for_each(|(ci, oc)| run_chunk(ci, oc, threads))
        }
    }

    /// Writes the im2col rows `rows` (output pixels, batch-major) for input channels
    /// `c0..c0 + icg` into `buf` (`rows.len() x kh*kw*icg`), padding with the zero point so
    /// that padding stands for real 0.
    #[allow(clippy::too_many_arguments)]
    fn im2col(
        &self,
        x: &QImage<'_>,
        c0: usize,
        icg: usize,
        oh: usize,
        ow: usize,
        rows: std::ops::Range<usize>,
        buf: &mut [u8],
    ) {
        let g = &self.geom;
        let zp = x.zero_point as u8;
        let k = self.kh * self.kw * icg;
        let seg_len = self.kw * icg;
        let contiguous_taps = g.dilation[1] == 1 && icg == x.c;
        let (sx, px) = (g.stride[1], g.padding[1]);
        // Output columns whose kw taps all lie inside the input row: ox * sx >= px and
        // ox * sx - px + (kw - 1) * dx < w.
        let span = (self.kw - 1) * g.dilation[1];
        let inside = px.div_ceil(sx)..if x.w + px > span { (x.w + px - span - 1) / sx + 1 } else { 0 };
        // Rows go in runs along one output row (same image, same oy), so each kernel row's
        // bounds are worked out once per run, not once per pixel. Pixels and kernel rows are
        // written in order: `copy_segment` may spill into bytes written after it.
        let mut lines: Vec<Option<usize>> = Vec::with_capacity(self.kh);
        let mut r = rows.start;
        while r < rows.end {
            let (b, rem) = (r / (oh * ow), r % (oh * ow));
            let (oy, ox0) = (rem / ow, rem % ow);
            let run = (ow - ox0).min(rows.end - r);
            let img = &x.data[b * x.h * x.w * x.c..(b + 1) * x.h * x.w * x.c];
            lines.clear();
            lines.extend((0..self.kh).map(|ky| {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                (iy >= 0 && iy < x.h as isize).then(|| iy as usize * x.w * x.c)
            }));
            for (ri, ox) in (r - rows.start..).zip(ox0..ox0 + run) {
                let whole = contiguous_taps && inside.contains(&ox);
                for (ky, line) in lines.iter().enumerate() {
                    let at = ri * k + ky * seg_len;
                    let Some(line_start) = *line else {
                        buf[at..at + seg_len].fill(zp);
                        continue;
                    };
                    if whole {
                        copy_segment(buf, at, img, line_start + (ox * sx - px) * x.c, seg_len);
                        continue;
                    }
                    let ix0 = (ox * sx) as isize - px as isize;
                    for kx in 0..self.kw {
                        let ix = ix0 + (kx * g.dilation[1]) as isize;
                        let tap = at + kx * icg;
                        if ix < 0 || ix >= x.w as isize {
                            buf[tap..tap + icg].fill(zp);
                        } else {
                            copy_segment(buf, tap, img, line_start + ix as usize * x.c + c0, icg);
                        }
                    }
                }
            }
            r += run;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_depthwise(
        &self,
        taps: &PackedWeights,
        kernels: &Kernels,
        packed: &DwPacked,
        plan: &Plan,
        x: &QImage<'_>,
        out: &mut [u8],
        oh: usize,
        ow: usize,
        parallel: bool,
    ) {
        let c = x.c;
        let dw = &kernels.depthwise;
        // Per input row and block of a layout with block bounds, the largest code.
        let bounds = packed.block_bounds();
        let row_max = bounds.map_or_else(Vec::new, |b| block_maxima(x.data, x.n * x.h, x.w, c, b.len(), parallel));
        let t = self.kh * self.kw;
        let zp_row = vec![x.zero_point as u8; c.next_multiple_of(64)];
        let g = &self.geom;
        // Per thread (not per row): the tap pointers and the accumulators.
        let state = || (Vec::<&[u8]>::with_capacity(t), vec![0i32; c.next_multiple_of(64)]);
        // Names the tap slices' lifetime, which a closure's own annotation cannot.
        fn per_row<'a, F: Fn(&mut (Vec<&'a [u8]>, Vec<i32>), (usize, &mut [u8])) + Sync>(f: F) -> F {
            f
        }
        // Each tap's offset from a pixel's first tap, and the output columns whose taps all
        // lie inside the image horizontally (a tier's `run_inside` reads those through
        // offsets, a run of them per output row).
        let offsets: Vec<usize> = (0..self.kh)
            .flat_map(|ky| (0..self.kw).map(move |kx| (ky * g.dilation[0] * x.w + kx * g.dilation[1]) * c))
            .collect();
        let inside =
            |o: usize, s: usize, p: usize, d: usize, k: usize, n: usize| o * s >= p && o * s - p + (k - 1) * d < n;
        let (sx, px0, span) = (g.stride[1], g.padding[1], (self.kw - 1) * g.dilation[1]);
        let cols_inside =
            px0.div_ceil(sx).min(ow)..if x.w + px0 > span { ((x.w + px0 - span - 1) / sx + 1).min(ow) } else { 0 };
        let row = per_row(|(ptrs, acc), (orow, out_row)| {
            let (b, oy) = (orow / oh, orow % oh);
            let img = &x.data[b * x.h * x.w * c..(b + 1) * x.h * x.w * c];
            let row_inside = inside(oy, g.stride[0], g.padding[0], g.dilation[0], self.kh, x.h);
            // The blocks whose codes in the row's input rows are within their bounds, and of
            // those the ones whose bound the zero point of padding taps is within too.
            let (mut rows_within, mut pads_within) = (0u64, 0u64);
            if let Some(bounds) = bounds {
                let nb = bounds.len();
                for (blk, &bound) in bounds.iter().enumerate().take(64) {
                    let within = (0..self.kh).all(|ky| {
                        let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                        iy < 0 || iy >= x.h as isize || row_max[(b * x.h + iy as usize) * nb + blk] <= bound
                    });
                    rows_within |= (within as u64) << blk;
                    pads_within |= ((within && x.zero_point <= bound as i32) as u64) << blk;
                }
            }
            let w = DwWeights { taps, packed, plan, za: x.zero_point, pair_blocks: pads_within };
            let run = match dw.run_inside {
                Some(run_inside) if row_inside && cols_inside.start < cols_inside.end => {
                    let w = DwWeights { pair_blocks: rows_within, ..w };
                    let first = ((oy * g.stride[0] - g.padding[0]) * x.w + cols_inside.start * sx - px0) * c;
                    // SAFETY: `packed` came from `kernels`' packing for these taps; every tap of
                    // the run's pixels lies inside the image, so its `c` bytes at `first +
                    // p * sx * c + offset` are readable in `img`; the run's output bytes are
                    // `count * c` of `out_row`.
                    unsafe {
                        run_inside(
                            img[first..].as_ptr(),
                            sx * c,
                            cols_inside.len(),
                            &offsets,
                            c,
                            &w,
                            &mut out_row[cols_inside.start * c..cols_inside.end * c],
                        )
                    };
                    cols_inside.clone()
                }
                _ => 0..0,
            };
            for (ox, px) in out_row.chunks_exact_mut(c).enumerate() {
                if run.contains(&ox) {
                    continue;
                }
                ptrs.clear();
                for ky in 0..self.kh {
                    let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                    for kx in 0..self.kw {
                        let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.padding[1] as isize;
                        if iy < 0 || iy >= x.h as isize || ix < 0 || ix >= x.w as isize {
                            ptrs.push(&zp_row);
                        } else {
                            let p = (iy as usize * x.w + ix as usize) * c;
                            ptrs.push(&img[p..p + c]);
                        }
                    }
                }
                // SAFETY: `packed` came from `kernels`' packing for these taps; every tap slice
                // holds `c` readable bytes; `acc` holds c rounded up to 64; `px` holds c bytes.
                unsafe { (dw.pixel)(ptrs, c, &w, acc, px) };
            }
        });
        let ow_c = ow * c;
        if parallel {
            out.par_chunks_mut(ow_c).enumerate().for_each_init(state, row);
        } else {
            let mut st = state();
            out.chunks_mut(ow_c).enumerate().for_each(|r| row(&mut st, r));
        }
    }
}

impl PackedConv2d {
    /// Dense convolutions without im2col: pad the input once with its zero
    /// point, then let the micro-kernel read each output pixel's `kh` row segments in place
    /// (tiers whose block kernel reads rows in place).
    #[allow(clippy::too_many_arguments)]
    fn forward_implicit(
        &self,
        w: &PackedWeights,
        seg: usize,
        tail: usize,
        x: &QImage<'_>,
        quant: OutputQuant,
        out: &mut [u8],
        oh: usize,
        ow: usize,
        threads: usize,
        add: Option<BlockAdd<'_>>,
    ) {
        let (c, g) = (x.c, &self.geom);
        let (hp, wp) = (x.h + 2 * g.padding[0], x.w + 2 * g.padding[1]);
        let mut run = |padded: &[u8]| {
            let rows = crate::frame::gemm::ConvRows {
                padded,
                c,
                hp,
                wp,
                oh,
                ow,
                stride: g.stride,
                dil_h: g.dilation[0],
                kh: self.kh,
                seg,
                tail,
                m: x.n * oh * ow,
            };
            self.plans.with(
                PlanKey::new(x.scale, x.zero_point, Some(quant)),
                || vec![Plan::new(x.scale, x.zero_point, w, self.bias.as_deref(), Some(quant), false)],
                |plans| crate::frame::gemm::gemm_conv(&rows, w, &plans[0], out, self.oc, threads, add),
            );
        };
        // Segments padded past `kw * c` read up to 3 bytes beyond the image: give it slack.
        let slack = (seg + tail).saturating_sub(self.kw * c);
        if g.padding == [0, 0] && slack == 0 {
            return run(x.data);
        }
        // In the pool, so that the padding's rows are shared between its threads.
        crate::threads::run_with(threads, || {
            with_scratch(&SCRATCH, |buf| {
                let padded_len = pad_image(x, g.padding, slack, threads > 1, buf);
                run(&buf[..padded_len]);
            })
        });
    }

    /// The depthwise path for stride 1 along the width and kernels up to 5 x 4. Each band of
    /// output rows (one per thread) pads the input rows it reads (zero point around them),
    /// then goes through the row's 64-byte chunks class by class (chunks `classes` apart
    /// cover the same channels), a tile of them at a time, keeping the kx-interleaved form of
    /// the input rows that the current output row reads in a ring of `kh * dilation` slots:
    /// built once per input row and tile, read by every output row that uses it.
    #[allow(clippy::too_many_arguments)]
    fn forward_depthwise_rows(
        &self,
        kernels: &Kernels,
        weights: &[i8],
        consts: &RowConsts,
        x: &QImage<'_>,
        out: &mut [u8],
        oh: usize,
        ow: usize,
        threads: usize,
    ) {
        let (c, g) = (x.c, &self.geom);
        let (kh, kw) = (self.kh, self.kw);
        let rk = kernels.depthwise.rows.as_ref().expect("row layouts are packed only for tiers with the row kernel");
        let (hp, wp) = (x.h + 2 * g.padding[0], x.w + 2 * g.padding[1]);
        let (row_bytes, len) = (wp * c, ow * c);
        let gc = gcd(c, 64);
        let classes = c / gc;
        let slots = kh * g.dilation[0];
        // Chunks of one class (every `classes`-th chunk of a row) are done together, TILE at
        // a time: the class's weights stay in registers and the ring (slots x 256 x TILE
        // bytes) in L1 for 3x3 kernels.
        const TILE: usize = 32;
        let chunks = len.div_ceil(64);
        let slot_len = 256 * TILE.min(chunks);
        let total = x.n * oh;
        let bands = threads.clamp(1, total.max(1));
        let per = total.div_ceil(bands).max(1);
        let band = |(bi, out_band): (usize, &mut [u8])| {
            // The padded rows this band's output rows read, padded here by the thread that
            // reads them (no pass over the whole image first, and they stay in its cache).
            let (o0, o1) = (bi * per, bi * per + out_band.len() / len);
            let row0 = (o0 / oh) * hp + (o0 % oh) * g.stride[0];
            let last = ((o1 - 1) / oh) * hp + ((o1 - 1) % oh) * g.stride[0] + (kh - 1) * g.dilation[0];
            with_scratch(&SCRATCH, |buf| {
                // 64 bytes of slack: the last chunk of a row may read past the row's end.
                let padded_len = pad_rows(x, g.padding, false, row0..last + 1, 64, false, buf);
                let padded: &[u8] = &buf[..padded_len];
                with_scratch(&ROWS, |ring| {
                    ring.resize(slots * slot_len, 0);
                    // One pointer for the whole ring: slots are written and read through it.
                    let base = ring.as_mut_ptr();
                    for first in 0..classes.min(chunks) {
                        let class = ((64 * first) % c) / gc;
                        for tile0 in (first..chunks).step_by(classes * TILE) {
                            let count = (chunks - tile0).div_ceil(classes).min(TILE);
                            let end = 64 * (tile0 + (count - 1) * classes);
                            let last = (len - end).min(64);
                            let mut held = [usize::MAX; 32];
                            for (i, out_row) in out_band.chunks_mut(len).enumerate() {
                                let orow = bi * per + i;
                                let (b, oy) = (orow / oh, orow % oh);
                                let mut rows = [std::ptr::null::<u8>(); 5];
                                for (ky, p) in rows.iter_mut().enumerate().take(kh) {
                                    let iy = oy * g.stride[0] + ky * g.dilation[0];
                                    // The rows one output row reads span (kh - 1) * dilation + 1
                                    // <= slots consecutive indices: their slots differ.
                                    let slot = iy % slots;
                                    // SAFETY: (slot + 1) * slot_len <= the ring's length.
                                    let at = unsafe { base.add(slot * slot_len) };
                                    if held[slot] != b * hp + iy {
                                        // SAFETY: the weights were packed for this tier's row
                                        // kernel; every chunk starts below len in the input row,
                                        // one of the band's padded rows (row0..=last holds every
                                        // row its output rows read), and those rows with their 64
                                        // bytes of slack hold (kw - 1) * dilation * c + len
                                        // rounded up to 64 bytes from the row's start
                                        // (ow + (kw - 1) * dilation <= wp); the slot holds
                                        // 256 * count bytes.
                                        unsafe {
                                            (rk.build)(
                                                padded[(b * hp + iy - row0) * row_bytes + 64 * tile0..].as_ptr(),
                                                kw,
                                                g.dilation[1] * c,
                                                count,
                                                64 * classes,
                                                at,
                                            )
                                        };
                                        held[slot] = b * hp + iy;
                                    }
                                    *p = at;
                                }
                                let out_tile = out_row[64 * tile0..].as_mut_ptr();
                                // SAFETY: the weights were packed for this tier's row
                                // kernel; each row pointer starts a slot built above for these
                                // chunks; the weights and constants are this layer's for kh
                                // rows and every class; the chunks lie in `out_row`, the last
                                // with `last` bytes.
                                unsafe {
                                    (rk.compute)(
                                        &rows[..kh],
                                        weights,
                                        consts,
                                        class,
                                        count,
                                        64 * classes,
                                        last,
                                        out_tile,
                                    )
                                };
                            }
                        }
                    }
                })
            })
        };
        if bands > 1 {
            out.par_chunks_mut(per * len).enumerate().for_each(band);
        } else {
            band((0, out));
        }
    }

    /// The flat depthwise path: groups of output rows each pad the input rows they read (zero
    /// point around them), then run the flat-row kernel on every output row of the group.
    /// Stride 2 along the width pads each row split into its even pixels, then its odd ones:
    /// output pixel `ox` reads column `2 ox + kx`, which is pixel `ox + kx / 2` of phase
    /// `kx % 2`, so every tap again advances `c` bytes per output pixel.
    #[allow(clippy::too_many_arguments)]
    fn forward_depthwise_flat(
        &self,
        kernels: &Kernels,
        weights: &[i8],
        consts: &FlatConsts,
        x: &QImage<'_>,
        out: &mut [u8],
        oh: usize,
        ow: usize,
        parallel: bool,
    ) {
        let (c, g) = (x.c, &self.geom);
        let (hp, wp) = (x.h + 2 * g.padding[0], x.w + 2 * g.padding[1]);
        let row_bytes = wp * c;
        let phased = g.stride[1] == 2;
        let flat_row = kernels.depthwise.flat_row.expect("flat layouts are packed only for tiers with the flat kernel");
        // Where tap column kx of output pixel 0 starts within a padded row.
        let mut cols = [0usize; 64];
        for (kx, col) in cols.iter_mut().enumerate().take(self.kw) {
            *col = if phased { (kx % 2) * wp.div_ceil(2) * c + (kx / 2) * c } else { kx * g.dilation[1] * c };
        }
        // kh * kw <= 64: packing checked.
        let (kh, kw) = (self.kh, self.kw);
        // Padded row index (over the batch) of output row `orow`'s first tap row.
        let top = |orow: usize| (orow / oh) * hp + (orow % oh) * g.stride[0];
        // Groups of output rows, each padding the input rows it reads just before reading
        // them (while they are in cache; no pass over the whole image first): up to 8 rows,
        // as many groups for each thread (56 rows on two threads: 8 groups of 7, not 7 of 8).
        let total = x.n * oh;
        let threads = if parallel { rayon::current_num_threads() } else { 1 };
        let groups = total.div_ceil(FLAT_GROUP_ROWS).next_multiple_of(threads).min(total).max(1);
        let group = total.div_ceil(groups);
        let run_group = |(gi, out_group): (usize, &mut [u8])| {
            let o0 = gi * group;
            let (first, last) = (top(o0), top(o0 + out_group.len() / (ow * c) - 1) + (kh - 1) * g.dilation[0]);
            with_scratch(&SCRATCH, |buf| {
                // 64 bytes of slack: the last chunk of a row may read past the row's end.
                let padded_len = pad_rows(x, g.padding, phased, first..last + 1, 64, false, buf);
                let padded: &[u8] = &buf[..padded_len];
                for (i, out_row) in out_group.chunks_mut(ow * c).enumerate() {
                    let at = top(o0 + i) - first;
                    let mut taps = [std::ptr::null::<u8>(); 64];
                    for ky in 0..kh {
                        let start = &padded[(at + ky * g.dilation[0]) * row_bytes..];
                        for kx in 0..kw {
                            taps[ky * kw + kx] = start[cols[kx]..].as_ptr();
                        }
                    }
                    // SAFETY: `flat` weights exist only for a tier with the flat-row kernel.
                    // Each tap starts inside a padded input row of the group's, and from it
                    // ow * c bytes rounded up to 64 lie inside the padded rows plus their 64
                    // bytes of slack: without phases, ow + (kw - 1) * dilation <= wp; with
                    // them, pixel ox + kx / 2 of phase kx % 2 is column 2 ox + kx <= wp - 1
                    // for ox < ow, and the even phase is followed by the odd one, the odd one
                    // by the next row or the slack. `out_row` holds ow * c bytes.
                    unsafe { flat_row(&taps[..kh * kw], c, weights, consts, ow * c, out_row.as_mut_ptr()) }
                }
            })
        };
        if parallel {
            out.par_chunks_mut(group * ow * c).enumerate().for_each(run_group);
        } else {
            out.chunks_mut(group * ow * c).enumerate().for_each(run_group);
        }
    }
}

/// [`RowConsts`] of a plan over `c` channels: entry `64cl + 16q + 4l + d` is output byte
/// `16l + 4q + d` of a chunk of class `cl`.
fn row_consts(plan: &Plan, c: usize) -> RowConsts {
    let gc = gcd(c, 64);
    let classes = c / gc;
    let lane_ch = |e: usize| {
        let (cl, i) = (e / 64, e % 64);
        let (q, l, d) = (i / 16, (i % 16) / 4, i % 4);
        (cl * gc + 16 * l + 4 * q + d) % c
    };
    debug_assert!((0..=255).contains(&plan.lo) && (plan.lo..=255).contains(&plan.hi));
    RowConsts {
        neg_colterm: (0..classes * 64).map(|e| plan.colterm[lane_ch(e)].wrapping_neg()).collect(),
        bias_term: (0..classes * 64).map(|e| plan.bias_term[lane_ch(e)]).collect(),
        mult: (0..classes * 64).map(|e| plan.mult[lane_ch(e)]).collect(),
        zo: plan.zo,
        lo: plan.lo.clamp(0, 255) as u8,
        hi: plan.hi.clamp(0, 255) as u8,
        clamp_free: plan.clamp_free,
    }
}

/// [`FlatConsts`] of a plan over `c` channels: lane `i` of class `cl` is channel
/// `(cl * gcd(c, 64) + i) % c`.
fn flat_consts(plan: &Plan, c: usize) -> FlatConsts {
    debug_assert!(plan.bias_scale.iter().all(|&s| s == 1.0), "depthwise bias forms add a precomputed term");
    let gc = gcd(c, 64);
    let lane = |e: usize| (e / 64 * gc + e % 64) % c;
    let n = c / gc * 64;
    FlatConsts {
        colterm: (0..n).map(|e| plan.colterm[lane(e)]).collect(),
        bias_term: (0..n).map(|e| plan.bias_term[lane(e)]).collect(),
        mult: (0..n).map(|e| plan.mult[lane(e)]).collect(),
        zo: plan.zo,
        lo: plan.lo,
        hi: plan.hi,
        clamp_free: plan.clamp_free,
    }
}

/// Weights of the row-interleaved depthwise kernel: for each class `cl` (chunk start `e0`
/// with `e0 % c == cl * gcd(c, 64)`) and kernel row `ky`, four 64-byte vectors `q`; dword
/// `(l, d)` of vector `q` stands for channel `(cl * gcd + 16l + 4q + d) % c` and holds its
/// taps `(ky, 0..4)`, zero past `kw`.
fn pack_depthwise_rows(taps: &PackedWeights, kh: usize, kw: usize) -> Aligned<i8> {
    let c = taps.n;
    let g = gcd(c, 64);
    let classes = c / g;
    let mut out = Aligned::zeroed(classes * kh * 256);
    for cl in 0..classes {
        for ky in 0..kh {
            for q in 0..4 {
                for l in 0..4 {
                    for d in 0..4 {
                        let ch = (cl * g + 16 * l + 4 * q + d) % c;
                        for j in 0..kw {
                            out[((cl * kh + ky) * 4 + q) * 64 + 4 * (4 * l + d) + j] =
                                taps.raw[ch * kh * kw + ky * kw + j];
                        }
                    }
                }
            }
        }
    }
    out
}

/// Weights of the flat depthwise kernel: for each class `cl` (chunk start `e0` with
/// `e0 % c == cl * gcd(c, 64)`), each group of 4 taps, four 64-byte vectors `q` in the
/// interleaved order of `pack_depthwise_vnni`, lane `16l + 4q + d` standing for channel
/// `(cl * gcd + 16l + 4q + d) % c`.
fn pack_depthwise_flat(taps: &PackedWeights) -> Aligned<i8> {
    let (c, t) = (taps.n, taps.k);
    let g = gcd(c, 64);
    let (classes, groups) = (c / g, t.div_ceil(4));
    let mut out = Aligned::zeroed(classes * groups * 256);
    for cl in 0..classes {
        for grp in 0..groups {
            for q in 0..4 {
                for l in 0..4 {
                    for d in 0..4 {
                        let ch = (cl * g + 16 * l + 4 * q + d) % c;
                        for tt in 0..4 {
                            let tap = 4 * grp + tt;
                            if tap < t {
                                out[((cl * groups + grp) * 4 + q) * 64 + 4 * (4 * l + d) + tt] = taps.raw[ch * t + tap];
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Writes `x` into `buf` surrounded by `padding` rows and columns of its zero point (which
/// stand for real zeros), followed by `slack` more bytes of it; layout NHWC with the padded
/// height and width ([`pad_row`] each row). With `parallel` (inside a pool of several
/// threads), rows are shared between the threads. Returns the length written (`buf` may be
/// longer).
fn pad_image(x: &QImage<'_>, padding: [usize; 2], slack: usize, parallel: bool, buf: &mut Vec<u8>) -> usize {
    let rows = x.n * (x.h + 2 * padding[0]);
    let row = (x.w + 2 * padding[1]) * x.c;
    // Below about 64 KiB a copy takes less than handing half of it to another thread.
    let parallel = parallel && row > 0 && rows * row >= 1 << 16;
    pad_rows(x, padding, false, 0..rows, slack, parallel, buf)
}

/// Makes `buf` at least `len` bytes long. It never shrinks: the bytes a longer image left
/// are overwritten, not filled again (growing fills every new byte).
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

/// Padded rows `rows` (counted over the batch, `x.h + 2 * padding[0]` per image; each as
/// [`pad_row`] writes it) into `buf`, one after the other from its start, then `slack` bytes
/// of the zero point: the rows one share of a layer's output reads, padded by the thread that
/// reads them (with `parallel`, inside a pool, shared between its threads). Returns the
/// length written (`buf` may be longer).
fn pad_rows(
    x: &QImage<'_>,
    padding: [usize; 2],
    phased: bool,
    rows: std::ops::Range<usize>,
    slack: usize,
    parallel: bool,
    buf: &mut Vec<u8>,
) -> usize {
    let row = (x.w + 2 * padding[1]) * x.c;
    let len = rows.len() * row + slack;
    grow(buf, len);
    let (image, tail) = buf[..len].split_at_mut(rows.len() * row);
    let r0 = rows.start;
    if parallel {
        image.par_chunks_mut(row).enumerate().for_each(|(i, dst)| pad_row(x, padding, phased, r0 + i, dst));
    } else {
        for (r, dst) in rows.zip(image.chunks_exact_mut(row.max(1))) {
            pad_row(x, padding, phased, r, dst);
        }
    }
    tail.fill(x.zero_point as u8);
    len
}

/// Padded row `r` (counted over the batch) of `x` into `dst`: `padding[1]` pixels of the zero
/// point, the image row, `padding[1]` more (rows of the top and bottom padding all zero
/// point). With `phased`, the row holds its even pixels (columns 0, 2, ...; `wp.div_ceil(2)`
/// of them) and then its odd ones, each pixel's `c` bytes together.
fn pad_row(x: &QImage<'_>, padding: [usize; 2], phased: bool, r: usize, dst: &mut [u8]) {
    let c = x.c;
    let (hp, wp) = (x.h + 2 * padding[0], x.w + 2 * padding[1]);
    let zp = x.zero_point as u8;
    let (b, py) = (r / hp, r % hp);
    let Some(y) = py.checked_sub(padding[0]).filter(|&y| y < x.h) else {
        dst.fill(zp);
        return;
    };
    let src = &x.data[((b * x.h + y) * x.w) * c..((b * x.h + y + 1) * x.w) * c];
    let side = padding[1] * c;
    if !phased {
        dst[..side].fill(zp);
        dst[side..side + x.w * c].copy_from_slice(src);
        dst[side + x.w * c..].fill(zp);
        return;
    }
    let odd_at = wp.div_ceil(2) * c;
    for px in 0..wp {
        let at = (px % 2) * odd_at + (px / 2) * c;
        match px.checked_sub(padding[1]).filter(|&ix| ix < x.w) {
            Some(ix) => dst[at..at + c].copy_from_slice(&src[ix * c..(ix + 1) * c]),
            None => dst[at..at + c].fill(zp),
        }
    }
}

/// Most output rows the flat depthwise path computes from one padding of their input rows.
const FLAT_GROUP_ROWS: usize = 8;

/// Bytes past the im2col rows that [`copy_segment`] may spill into.
const IM2COL_SLACK: usize = 64;

/// Copies `n` bytes from `src[from..]` to `dst[at..]`. Runs up to 1 KiB (im2col segments:
/// 7 taps x 3 channels = 21 bytes, 3 taps x 64 channels = 192) move as whole 32- or 64-byte
/// blocks when both sides have room, spilling up to 63 bytes past `n` into bytes the caller
/// overwrites later (the next segment or row, or the slack); the rest copy exactly.
#[inline(always)]
fn copy_segment(dst: &mut [u8], at: usize, src: &[u8], from: usize, n: usize) {
    if n <= 32 && at + 32 <= dst.len() && from + 32 <= src.len() {
        // Two 16-byte words, so that the compiler moves registers rather than calling
        // `memcpy` (which it may merge the branches into, with a variable length).
        for o in [0, 16] {
            let word = u128::from_ne_bytes(src[from + o..from + o + 16].try_into().expect("16 bytes"));
            dst[at + o..at + o + 16].copy_from_slice(&word.to_ne_bytes());
        }
        return;
    }
    let span = n.next_multiple_of(64);
    if n <= 1024 && at + span <= dst.len() && from + span <= src.len() {
        for o in (0..n).step_by(64) {
            dst[at + o..at + o + 64].copy_from_slice(&src[from + o..from + o + 64]);
        }
    } else {
        dst[at..at + n].copy_from_slice(&src[from..from + n]);
    }
}

/// Runs `f` with this thread's buffer from `slot`, taken out of it for the duration. A
/// rayon worker waiting inside `f` on parallel work may run another layer's job (another
/// model's, on another caller's thread, sharing the pool): that job finds the slot empty and
/// uses a fresh buffer, where holding a `RefCell` borrow across the wait would panic. The
/// larger buffer goes back into the slot.
fn with_scratch<R>(slot: &'static std::thread::LocalKey<RefCell<Vec<u8>>>, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut buf = slot.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let r = f(&mut buf);
    slot.with(|s| {
        let mut cur = s.borrow_mut();
        if cur.capacity() < buf.capacity() {
            *cur = buf;
        }
    });
    r
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The ring of kx-interleaved input rows of `forward_depthwise_rows` (per thread: a band
    /// may run on the calling thread while it holds `SCRATCH`).
    static ROWS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Quantizes OHWI `f32` conv weights per output channel, symmetric `i8`, as PyTorch's
/// default per-channel weight observer does: a convenience for tests and benchmarks.
///
/// # Errors
/// As [`qtensor::choose_qparams_per_channel`].
pub fn quantize_weights_per_channel(w: &ndarray::ArrayViewD<'_, f32>) -> Result<QTensor<i8>> {
    let oc = w.shape()[0];
    let per = w.len() / oc.max(1);
    let data = w.as_standard_layout();
    let flat = data.as_slice().expect("standard layout");
    let (mut mins, mut maxs) = (vec![0.0f32; oc], vec![0.0f32; oc]);
    for o in 0..oc {
        let row = &flat[o * per..(o + 1) * per];
        mins[o] = row.iter().copied().fold(f32::INFINITY, f32::min);
        maxs[o] = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    }
    let range = QuantRange::full(DType::I8);
    let params = qtensor::choose_qparams_per_channel(
        &mins,
        &maxs,
        0,
        DType::I8,
        qtensor::QScheme::Symmetric,
        range,
        qtensor::DEFAULT_EPS,
    )?;
    QTensor::quantize_in_range(w, params, range)
}

/// How implicit im2col reads the `kh` kernel rows of `row = kw * c` bytes: `(seg, tail)`, the
/// first `seg` bytes (a multiple of 4) of each row read in place as quads, the last `tail`
/// bytes gathered with the other rows' tails into shared quads (see
/// [`crate::frame::gemm::ConvRows`]). A row of 21 bytes (a 7x7 RGB input layer) is 5 quads and a
/// 1-byte tail: 7 rows take 37 quads instead of the 42 of rows padded to 24 bytes. A 3-byte
/// tail gains nothing from sharing, and the kernel gathers at most
/// [`MAX_TAIL_QUADS`](crate::frame::gemm::MAX_TAIL_QUADS) quads: otherwise each row is padded with zero
/// weights to a whole quad instead (`tail = 0`).
fn implicit_layout(kh: usize, row: usize) -> (usize, usize) {
    let t = row % 4;
    if (t == 1 || t == 2) && crate::frame::gemm::tail_k(kh, t) <= 4 * crate::frame::gemm::MAX_TAIL_QUADS {
        (row - t, t)
    } else {
        (row.next_multiple_of(4), 0)
    }
}

/// For each of `rows` rows of `w` pixels of `c` channels, the largest code of each of the
/// first `blocks` blocks of [`DW_PAIR_BLOCK`] channels: `blocks` entries per row (rows shared
/// between the pool's threads when `parallel`).
fn block_maxima(data: &[u8], rows: usize, w: usize, c: usize, blocks: usize, parallel: bool) -> Vec<u8> {
    let mut out = vec![0u8; rows * blocks];
    let row_maxima = |(row, maxima): (usize, &mut [u8])| {
        let pixels = data[row * w * c..(row + 1) * w * c].chunks_exact(c);
        for (b, max) in maxima.iter_mut().enumerate() {
            // Lane by lane over the row's pixels, then across the lanes.
            let mut lanes = [0u8; DW_PAIR_BLOCK];
            for px in pixels.clone() {
                for (l, &v) in lanes.iter_mut().zip(&px[b * DW_PAIR_BLOCK..(b + 1) * DW_PAIR_BLOCK]) {
                    *l = (*l).max(v);
                }
            }
            *max = lanes.into_iter().fold(0, u8::max);
        }
    };
    if parallel {
        out.par_chunks_mut(blocks).enumerate().with_min_len(8).for_each(row_maxima);
    } else {
        out.chunks_mut(blocks).enumerate().for_each(row_maxima);
    }
    out
}

/// Greatest common divisor: `gcd(c, 64)` channels make one class of a depthwise layer's
/// 64-byte chunks.
pub(crate) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
