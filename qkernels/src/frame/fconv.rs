//! `f32` convolution with weights packed once ([`PackedConv2dF32`]): the float path of `qnn`
//! (calibration, and layers that stay in float).
//!
//! Layout: NHWC input and output, weights packed into panels of [`PANEL`] output channels,
//! `[k][PANEL]` with `k = (ky * kw + kx) * icg + ci`. A register tile is [`MR`] output pixels
//! by one panel. Its rows are read straight from the input image (implicit im2col): for each
//! kernel tap, one pointer per pixel to its `icg` input channels, or to zeros where the tap
//! falls in the padding. Layers with few input channels per group (a stem's 3) gather each
//! tile's im2col rows first, so the inner loop runs over the whole reduction at once.
//!
//! Every output is `act(Σ_k fma(a_k, w_k) + bias)`: the products accumulated in `k` order
//! with fused multiply-adds from 0, then the bias added, then the activation. The AVX-512 and
//! AVX2 + FMA kernels and their scalar twin follow exactly this order, so every tier and
//! every thread count gives bit-identical results. Depthwise layers add each tap's products
//! to the bias, unfused, per output pixel, with channels in vector lanes.

use qtensor::isa::Isa;
use qtensor::{QError, Result};
use rayon::prelude::*;

use crate::frame::conv::Conv2dGeometry;
use crate::frame::gemm::Activation;
use crate::frame::kernels::Kernels;

const OP: &str = "qkernels::PackedConv2dF32";

/// Output channels per weight panel: two AVX-512 vectors.
pub(crate) const PANEL: usize = 32;
/// Output pixels per register tile.
pub(crate) const MR: usize = 8;
/// Below this many input channels per group, tiles gather their im2col rows.
const GATHER_BELOW: usize = 16;

/// 64-byte aligned storage for weight panels (one cache line per element).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Weights packed for [`PackedConv2dF32::forward`], with the bias and the fused activation.
#[derive(Clone)]
pub struct PackedConv2dF32 {
    /// The kernels of the tier it was packed for.
    kernels: &'static Kernels,
    oc: usize,
    icg: usize,
    kh: usize,
    kw: usize,
    geom: Conv2dGeometry,
    activation: Activation,
    kind: Kind,
}

/// Its sizes, not its weights.
impl std::fmt::Debug for PackedConv2dF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedConv2dF32")
            .field("isa", &self.kernels.isa)
            .field("out_channels", &self.oc)
            .field("in_channels", &self.in_channels())
            .field("kernel", &[self.kh, self.kw])
            .field("geom", &self.geom)
            .field("activation", &self.activation)
            .field("depthwise", &matches!(self.kind, Kind::Depthwise { .. }))
            .finish()
    }
}

#[derive(Clone)]
enum Kind {
    /// Panels `[group][panel][k][PANEL]` (columns past the group's channels are zero) and the
    /// bias `[group][panel][PANEL]` (zero where there is none).
    Gemm { panels: Vec<Line>, bias: Vec<f32>, per_group: usize },
    /// Weights `[tap][channel]`.
    Depthwise { wt: Vec<f32>, bias: Option<Vec<f32>> },
}

/// How a weight tensor's four dimensions lie in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out, in / groups, kh, kw]`: PyTorch's.
    Oihw,
    /// `[out, kh, kw, in / groups]`.
    Ohwi,
}

impl PackedConv2dF32 {
    /// Packs `weights` (`[oc, icg, kh, kw]` given as `(oc, icg, kh, kw)` in `layout`), with
    /// an optional bias per output channel and an activation applied to the output, for the
    /// instruction set this process selected.
    ///
    /// # Errors
    /// A weight or bias length that does not match the dimensions, zero-sized kernels,
    /// strides or dilations, or output channels that the groups do not divide.
    pub fn new(
        weights: &[f32],
        layout: WeightLayout,
        (oc, icg, kh, kw): (usize, usize, usize, usize),
        bias: Option<&[f32]>,
        geom: Conv2dGeometry,
        activation: Activation,
    ) -> Result<Self> {
        Self::with_isa(qtensor::isa::selected(), weights, layout, (oc, icg, kh, kw), bias, geom, activation)
    }

    /// [`PackedConv2dF32::new`] with an explicit instruction set (capped to what the CPU
    /// has), for conformance tests.
    ///
    /// # Errors
    /// As [`PackedConv2dF32::new`].
    #[allow(clippy::too_many_arguments)]
    pub fn with_isa(
        isa: Isa,
        weights: &[f32],
        layout: WeightLayout,
        (oc, icg, kh, kw): (usize, usize, usize, usize),
        bias: Option<&[f32]>,
        geom: Conv2dGeometry,
        activation: Activation,
    ) -> Result<Self> {
        let g = geom.groups;
        if g == 0 || oc % g != 0 || geom.stride.contains(&0) || geom.dilation.contains(&0) || kh == 0 || kw == 0 {
            return Err(QError::Unsupported {
                op: OP,
                reason: format!(
                    "{oc} output channels in {g} groups, kernel {kh}x{kw}, stride {:?}, dilation {:?}: groups must \
                     divide the output channels, and the kernel, strides and dilations must be positive",
                    geom.stride, geom.dilation
                ),
            });
        }
        let taps = kh * kw;
        if weights.len() != oc * icg * taps {
            return Err(QError::ShapeMismatch {
                op: OP,
                expected: vec![oc, icg, kh, kw],
                actual: vec![weights.len()],
                hint: "weights must hold out_channels * in_channels / groups * kh * kw values",
            });
        }
        if let Some(b) = bias {
            if b.len() != oc {
                return Err(QError::ShapeMismatch {
                    op: OP,
                    expected: vec![oc],
                    actual: vec![b.len()],
                    hint: "one bias per output channel",
                });
            }
        }
        let at = |o: usize, i: usize, t: usize| match layout {
            WeightLayout::Oihw => weights[(o * icg + i) * taps + t],
            WeightLayout::Ohwi => weights[(o * taps + t) * icg + i],
        };
        let kind = if icg == 1 && g == oc {
            let mut wt = vec![0.0f32; taps * oc];
            for ch in 0..oc {
                for t in 0..taps {
                    wt[t * oc + ch] = at(ch, 0, t);
                }
            }
            Kind::Depthwise { wt, bias: bias.map(<[f32]>::to_vec) }
        } else {
            let ocg = oc / g;
            let per_group = ocg.div_ceil(PANEL);
            let k = taps * icg;
            let mut flat = vec![0.0f32; g * per_group * k * PANEL];
            let mut pbias = vec![0.0f32; g * per_group * PANEL];
            for gi in 0..g {
                for p in 0..per_group {
                    let panel = &mut flat[(gi * per_group + p) * k * PANEL..][..k * PANEL];
                    for j in 0..PANEL.min(ocg - p * PANEL) {
                        let o = gi * ocg + p * PANEL + j;
                        for t in 0..taps {
                            for i in 0..icg {
                                panel[(t * icg + i) * PANEL + j] = at(o, i, t);
                            }
                        }
                        pbias[(gi * per_group + p) * PANEL + j] = bias.map_or(0.0, |b| b[o]);
                    }
                }
            }
            let panels = flat.chunks_exact(16).map(|c| Line(c.try_into().expect("16 values"))).collect();
            Kind::Gemm { panels, bias: pbias, per_group }
        };
        Ok(PackedConv2dF32 { kernels: crate::registry::kernels(isa), oc, icg, kh, kw, geom, activation, kind })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.oc
    }

    /// Input channels (all groups).
    pub fn in_channels(&self) -> usize {
        self.icg * self.geom.groups
    }

    /// The output's height and width for an input of `h x w`.
    ///
    /// # Errors
    /// An input smaller than the dilated kernel (with padding).
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let g = &self.geom;
        let span = |k: usize, d: usize| d * (k - 1) + 1;
        let (sh, sw) = (span(self.kh, g.dilation[0]), span(self.kw, g.dilation[1]));
        if h + 2 * g.padding[0] < sh || w + 2 * g.padding[1] < sw {
            return Err(QError::Unsupported {
                op: OP,
                reason: format!("input {h}x{w} (padding {:?}) is smaller than the dilated kernel {sh}x{sw}", g.padding),
            });
        }
        Ok(((h + 2 * g.padding[0] - sh) / g.stride[0] + 1, (w + 2 * g.padding[1] - sw) / g.stride[1] + 1))
    }

    /// Convolves `x` (NHWC, `(n, h, w, c)`) into `out` (NHWC, `n * oh * ow * oc`), on
    /// `threads` threads; the result is bit-identical for every count and every tier.
    ///
    /// # Errors
    /// Buffers whose lengths do not match, or an input of the wrong channel count or smaller
    /// than the kernel.
    pub fn forward(
        &self,
        x: &[f32],
        (n, h, w, c): (usize, usize, usize, usize),
        out: &mut [f32],
        threads: usize,
    ) -> Result<()> {
        if c != self.in_channels() || x.len() != n * h * w * c {
            return Err(QError::ShapeMismatch {
                op: OP,
                expected: vec![n, h, w, self.in_channels()],
                actual: vec![x.len()],
                hint: "the input must be NHWC with the layer's input channels",
            });
        }
        let (oh, ow) = self.output_hw(h, w)?;
        if out.len() != n * oh * ow * self.oc {
            return Err(QError::ShapeMismatch {
                op: OP,
                expected: vec![n, oh, ow, self.oc],
                actual: vec![out.len()],
                hint: "the output must be NHWC: n * out height * out width * out channels",
            });
        }
        let rows = n * oh * ow;
        if rows == 0 || self.oc == 0 {
            return Ok(());
        }
        let dims = Dims { h, w, c, oh, ow };
        match &self.kind {
            Kind::Gemm { bias, per_group, .. } if self.icg == 0 => {
                // No inputs to reduce: every output is its activated bias.
                let ocg = self.oc / self.geom.groups;
                for o in out.chunks_exact_mut(self.oc) {
                    for (j, v) in o.iter_mut().enumerate() {
                        let (gi, jj) = (j / ocg, j % ocg);
                        *v = act_one(self.activation, 0.0 + bias[(gi * per_group + jj / PANEL) * PANEL + jj % PANEL]);
                    }
                }
            }
            Kind::Depthwise { wt, bias } => {
                let run = |r0: usize, o: &mut [f32]| self.depthwise_rows(wt, bias.as_deref(), x, &dims, r0, o);
                self.split_rows(rows, out, threads, 64, run);
            }
            Kind::Gemm { panels, bias, per_group } => {
                let run = |r0: usize, o: &mut [f32]| self.gemm_rows(panels, bias, *per_group, x, &dims, r0, o);
                self.split_rows(rows, out, threads, MR, run);
            }
        }
        Ok(())
    }

    /// Runs `run(first_row, rows' output)` over `rows` output pixels, in chunks of a multiple of
    /// `align` rows spread over `threads` threads.
    fn split_rows(
        &self,
        rows: usize,
        out: &mut [f32],
        threads: usize,
        align: usize,
        run: impl Fn(usize, &mut [f32]) + Sync,
    ) {
        let oc = self.oc;
        if threads <= 1 || rows < 2 * align {
            run(0, out);
            return;
        }
        let chunk = rows.div_ceil(2 * threads).next_multiple_of(align);
        crate::threads::run_with(threads, || {
            out.par_chunks_mut(chunk * oc).enumerate().for_each(|(i, o)| run(i * chunk, o));
        });
    }

    /// Output pixels `r0..` (as many as `out` holds) of a depthwise convolution (weights
    /// `[tap][channel]`): per pixel, the bias plus each tap's products inside the image,
    /// added unfused in tap order, then the activation.
    fn depthwise_rows(&self, wt: &[f32], bias: Option<&[f32]>, x: &[f32], d: &Dims, r0: usize, out: &mut [f32]) {
        let c = d.c;
        if c == 0 {
            return;
        }
        let k = self.kernels;
        // The pixel's taps inside the image: (input offset, weight offset).
        let mut taps: Vec<(usize, usize)> = Vec::with_capacity(self.kh * self.kw);
        let mut at = d.origin(&self.geom, r0);
        for o in out.chunks_exact_mut(c) {
            taps.clear();
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    if let Some(xo) = d.tap(&self.geom, at, ky, kx) {
                        taps.push((xo, (ky * self.kw + kx) * c));
                    }
                }
            }
            at = d.next(&self.geom, at);
            // SAFETY: every tap's offsets address `c` values of `x` and of `wt` (pixels inside
            // the image, taps inside the kernel), the bias holds `c` values, and `o` is the
            // pixel's `c` outputs.
            unsafe { (k.f32.depthwise_pixel)(k.isa, &taps, x, wt, bias, o, self.activation) };
        }
    }

    /// Output rows `r0..` (as many as `out` holds) of a GEMM-form convolution.
    #[allow(clippy::too_many_arguments)]
    fn gemm_rows(
        &self,
        panels: &[Line],
        bias: &[f32],
        per_group: usize,
        x: &[f32],
        d: &Dims,
        r0: usize,
        out: &mut [f32],
    ) {
        let (oc, icg) = (self.oc, self.icg);
        let groups = self.geom.groups;
        let ocg = oc / groups;
        let taps = self.kh * self.kw;
        let k = taps * icg;
        let nrows = out.len() / oc;
        let gather = icg < GATHER_BELOW;
        let zeros = vec![0.0f32; icg];
        let mut abuf = if gather { vec![0.0f32; MR * k] } else { Vec::new() };
        let (segs, seg_len) = if gather { (1, k) } else { (taps, icg) };
        let mut ptrs = vec![zeros.as_ptr(); segs * MR];
        let g = &self.geom;
        // Each tile row's origin (see `Dims::origin`): the first by division, the next ones by
        // stepping along.
        let mut at = [Origin::default(); MR];
        let locate = |b0: usize, valid: usize, at: &mut [Origin; MR]| {
            let mut o = d.origin(g, r0 + b0);
            for a in at.iter_mut().take(valid) {
                *a = o;
                o = d.next(g, o);
            }
        };
        let tap = |o: Origin, ky: usize, kx: usize| d.tap(g, o, ky, kx);
        let panels: &[f32] = bytemuck_lines(panels);
        let activation = self.activation;
        let kernels = self.kernels;
        let tile = |ptrs: &[*const f32], gi: usize, p: usize, b0: usize, valid: usize, out: &mut [f32]| {
            let cols = PANEL.min(ocg - p * PANEL);
            let panel = &panels[(gi * per_group + p) * k * PANEL..][..k * PANEL];
            let pbias = &bias[(gi * per_group + p) * PANEL..][..PANEL];
            let o = &mut out[b0 * oc + gi * ocg + p * PANEL..];
            let t = Tile { ptrs, seg_len, panel, bias: pbias, rows: valid, cols, ldo: oc };
            // SAFETY: every pointer in `ptrs` addresses `seg_len` readable values (an input
            // pixel's group channels, a gathered row of `abuf`, or `zeros`, which is `icg`
            // long when the rows are not gathered); `panel` holds `segs * seg_len` rows of
            // PANEL values; `o` starts at the tile's first output and holds at least
            // `(valid - 1) * oc + cols` values, because the tile's columns lie within the
            // group's channels.
            unsafe { run_tile(kernels, &t, o, activation) };
        };
        for gi in 0..groups {
            if gather {
                // Few weights: each block's im2col rows are gathered once for every panel.
                for b0 in (0..nrows).step_by(MR) {
                    let valid = MR.min(nrows - b0);
                    locate(b0, valid, &mut at);
                    for (r, row) in abuf.chunks_exact_mut(k).enumerate() {
                        if r >= valid {
                            row.fill(0.0);
                            continue;
                        }
                        let Origin { img, y0, x0, .. } = at[r];
                        let seg = self.kw * icg;
                        // A kernel row wholly inside the image is one contiguous run of the
                        // input when the taps are adjacent and the group is every channel.
                        let x_last = x0 + ((self.kw - 1) * g.dilation[1]) as isize;
                        let whole = groups == 1 && g.dilation[1] == 1 && x0 >= 0 && (x_last as usize) < d.w;
                        for (ky, line) in row.chunks_exact_mut(seg).enumerate() {
                            let iy = y0 + (ky * g.dilation[0]) as isize;
                            if iy < 0 || iy as usize >= d.h {
                                line.fill(0.0);
                            } else if whole {
                                line.copy_from_slice(&x[img + (iy as usize * d.w + x0 as usize) * d.c..][..seg]);
                            } else {
                                for (kx, dst) in line.chunks_exact_mut(icg).enumerate() {
                                    match tap(at[r], ky, kx) {
                                        Some(a) => dst.copy_from_slice(&x[a + gi * icg..][..icg]),
                                        None => dst.fill(0.0),
                                    }
                                }
                            }
                        }
                    }
                    for (r, slot) in ptrs.iter_mut().enumerate() {
                        *slot = abuf[r * k..].as_ptr();
                    }
                    for p in 0..per_group {
                        tile(&ptrs, gi, p, b0, valid, out);
                    }
                }
                continue;
            }
            // Each panel streams over every block while it stays in cache.
            for p in 0..per_group {
                for b0 in (0..nrows).step_by(MR) {
                    let valid = MR.min(nrows - b0);
                    locate(b0, valid, &mut at);
                    for t in 0..taps {
                        let (ky, kx) = (t / self.kw, t % self.kw);
                        for r in 0..MR {
                            ptrs[t * MR + r] = match (r < valid).then(|| tap(at[r], ky, kx)).flatten() {
                                Some(a) => x[a + gi * icg..][..icg].as_ptr(),
                                None => zeros.as_ptr(),
                            };
                        }
                    }
                    tile(&ptrs, gi, p, b0, valid, out);
                }
            }
        }
    }
}

/// An input's and output's spatial sizes.
struct Dims {
    h: usize,
    w: usize,
    c: usize,
    oh: usize,
    ow: usize,
}

/// An output pixel's place: its batch image's offset in the input, the input coordinates of
/// its kernel's top-left tap (negative in the padding), and its own output coordinates.
#[derive(Clone, Copy, Debug, Default)]
struct Origin {
    img: usize,
    y0: isize,
    x0: isize,
    b: usize,
    oy: usize,
    ox: usize,
}

impl Dims {
    /// Output pixel `row`'s origin (batch-major numbering).
    fn origin(&self, g: &Conv2dGeometry, row: usize) -> Origin {
        let (b, rem) = (row / (self.oh * self.ow), row % (self.oh * self.ow));
        self.at(g, b, rem / self.ow, rem % self.ow)
    }

    fn at(&self, g: &Conv2dGeometry, b: usize, oy: usize, ox: usize) -> Origin {
        Origin {
            img: b * self.h * self.w * self.c,
            y0: (oy * g.stride[0]) as isize - g.padding[0] as isize,
            x0: (ox * g.stride[1]) as isize - g.padding[1] as isize,
            b,
            oy,
            ox,
        }
    }

    /// The next output pixel's origin, without dividing.
    fn next(&self, g: &Conv2dGeometry, o: Origin) -> Origin {
        match (o.ox + 1 < self.ow, o.oy + 1 < self.oh) {
            (true, _) => self.at(g, o.b, o.oy, o.ox + 1),
            (false, true) => self.at(g, o.b, o.oy + 1, 0),
            (false, false) => self.at(g, o.b + 1, 0, 0),
        }
    }

    /// The input offset (first channel) of tap `(ky, kx)` of the pixel at `o`, or `None` in
    /// the padding.
    fn tap(&self, g: &Conv2dGeometry, o: Origin, ky: usize, kx: usize) -> Option<usize> {
        let iy = o.y0 + (ky * g.dilation[0]) as isize;
        let ix = o.x0 + (kx * g.dilation[1]) as isize;
        (iy >= 0 && ix >= 0 && (iy as usize) < self.h && (ix as usize) < self.w)
            .then(|| o.img + (iy as usize * self.w + ix as usize) * self.c)
    }
}

/// One register tile's operands.
pub(crate) struct Tile<'a> {
    /// `segments * MR` row pointers: segment-major, each reading `seg_len` values.
    pub ptrs: &'a [*const f32],
    pub seg_len: usize,
    /// `segments * seg_len` rows of `PANEL` weights.
    pub panel: &'a [f32],
    /// `PANEL` biases.
    pub bias: &'a [f32],
    /// Rows and columns written (at most `MR` and `PANEL`).
    pub rows: usize,
    pub cols: usize,
    /// Output row stride.
    pub ldo: usize,
}

fn bytemuck_lines(lines: &[Line]) -> &[f32] {
    // SAFETY: `Line` is `repr(C)` over `[f32; 16]` with no padding (64 bytes, 64-aligned), so
    // `lines` is `16 * lines.len()` contiguous initialised `f32`s.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<f32>(), lines.len() * 16) }
}

/// Runs one tile on `isa`'s kernel.
///
/// # Safety
/// As [`Tile`] documents: every pointer reads `seg_len` values; `out` holds
/// `(rows - 1) * ldo + cols` values.
pub(crate) unsafe fn run_tile(k: &Kernels, t: &Tile<'_>, out: &mut [f32], act: Activation) {
    debug_assert!(t.rows >= 1 && t.rows <= MR && t.cols >= 1 && t.cols <= PANEL);
    debug_assert!(out.len() >= (t.rows - 1) * t.ldo + t.cols);
    debug_assert_eq!(t.panel.len(), t.ptrs.len() / MR * t.seg_len * PANEL);
    // SAFETY: the caller's preconditions, which are the entry's.
    unsafe { (k.f32.tile)(t, out.as_mut_ptr(), act) }
}

/// The activation on one value, as the vector kernels compute it: NaN passes through, as in
/// PyTorch's `relu` and `relu6`, and so does `-0.0`.
#[inline(always)]
pub(crate) fn act_one(act: Activation, v: f32) -> f32 {
    let relu = |v: f32| if 0.0 > v { 0.0 } else { v };
    match act {
        Activation::None => v,
        Activation::Relu => relu(v),
        Activation::Relu6 => {
            let r = relu(v);
            if 6.0 < r {
                6.0
            } else {
                r
            }
        }
    }
}
