//! Pooling and resizing on `u8` NHWC activations, as PyTorch's quantized kernels do them:
//! max pooling over the raw integers (the affine map is monotonic), average pooling in the
//! integer domain with one requantization, adaptive average pooling (and its global fast
//! path), nearest-neighbour upsampling.

use qtensor::{QError, Result};

use crate::frame::conv::QImage;
use crate::frame::ops::QuantU8;
use qtensor::multiversion;

/// Window, stride, padding and dilation (each `[height, width]`) of a pooling layer, with
/// PyTorch's options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2d {
    /// Window size.
    pub kernel: [usize; 2],
    /// Step (PyTorch's default: the kernel size).
    pub stride: [usize; 2],
    /// Implicit padding on each side (never counted by max pooling).
    pub padding: [usize; 2],
    /// Spacing of window taps (max pooling only).
    pub dilation: [usize; 2],
    /// Round the output size up instead of down.
    pub ceil_mode: bool,
    /// Average pooling: count padding in the divisor.
    pub count_include_pad: bool,
    /// Average pooling: divide by this instead.
    pub divisor_override: Option<usize>,
}

impl Pool2d {
    /// A `k x k` window with stride `k` and no padding (PyTorch's defaults).
    pub fn square(k: usize) -> Self {
        Pool2d {
            kernel: [k, k],
            stride: [k, k],
            padding: [0, 0],
            dilation: [1, 1],
            ceil_mode: false,
            count_include_pad: true,
            divisor_override: None,
        }
    }

    /// Output height and width for an `h x w` input (PyTorch's `pooling_output_shape`).
    ///
    /// # Errors
    /// A zero kernel, stride or dilation, padding over half the kernel, or an input smaller
    /// than the window.
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let bad = |reason: String| QError::Unsupported { op: "Pool2d", reason };
        if self.kernel.contains(&0) || self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err(bad(format!(
                "kernel {:?}, stride {:?}, dilation {:?} must be >= 1",
                self.kernel, self.stride, self.dilation
            )));
        }
        let dim = |i: usize, k: usize, s: usize, p: usize, d: usize| -> Result<usize> {
            if 2 * p > k {
                return Err(bad(format!("padding {p} exceeds half the window {k}")));
            }
            let span = d * (k - 1) + 1;
            if i + 2 * p < span {
                return Err(bad(format!("input size {i} (+2x{p} padding) is smaller than the window span {span}")));
            }
            let num = i + 2 * p - span + if self.ceil_mode { s - 1 } else { 0 };
            let mut o = num / s + 1;
            if self.ceil_mode && (o - 1) * s >= i + p {
                o -= 1;
            }
            Ok(o)
        };
        Ok((
            dim(h, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0])?,
            dim(w, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1])?,
        ))
    }
}

fn check_out(op: &'static str, x: &QImage<'_>, oh: usize, ow: usize, out: &[u8]) -> Result<()> {
    if x.data.len() != x.n * x.h * x.w * x.c {
        return Err(QError::ShapeMismatch {
            op,
            expected: vec![x.n * x.h * x.w * x.c],
            actual: vec![x.data.len()],
            hint: "the input buffer must hold exactly n * h * w * c values (NHWC)",
        });
    }
    if out.len() != x.n * oh * ow * x.c {
        return Err(QError::ShapeMismatch {
            op,
            expected: vec![x.n, oh, ow, x.c],
            actual: vec![out.len()],
            hint: "the output buffer must hold n * out_h * out_w * c values",
        });
    }
    Ok(())
}

/// Max pooling: the largest raw value in each window, padding skipped; output parameters
/// are the input's.
///
/// # Errors
/// Invalid window or buffers of the wrong size.
pub fn max_pool2d(x: &QImage<'_>, p: &Pool2d, out: &mut [u8]) -> Result<()> {
    max_pool2d_with(qtensor::isa::selected(), x, p, out)
}

/// [`max_pool2d`] with an explicit instruction set, for conformance tests.
///
/// # Errors
/// As [`max_pool2d`].
pub fn max_pool2d_with(isa: qtensor::isa::Isa, x: &QImage<'_>, p: &Pool2d, out: &mut [u8]) -> Result<()> {
    max_pool2d_on(isa, x, p, out, 1)
}

/// [`max_pool2d`] with `threads` threads sharing the output rows (the same bytes on any
/// count).
///
/// # Errors
/// As [`max_pool2d`].
pub fn max_pool2d_threads(x: &QImage<'_>, p: &Pool2d, out: &mut [u8], threads: usize) -> Result<()> {
    max_pool2d_on(qtensor::isa::selected(), x, p, out, threads)
}

fn max_pool2d_on(isa: qtensor::isa::Isa, x: &QImage<'_>, p: &Pool2d, out: &mut [u8], threads: usize) -> Result<()> {
    use rayon::prelude::*;
    let (oh, ow) = p.output_hw(x.h, x.w)?;
    check_out("qkernels::max_pool2d", x, oh, ow, out)?;
    let row = ow * x.c;
    // Below about 32 KiB of output, handing half of it to another thread costs more than it
    // saves; above, chunks of rows, several per thread so that one woken late takes fewer.
    if threads <= 1 || row == 0 || out.len() < 1 << 15 {
        max_pool_rows(isa, x, p, (oh, ow), 0, out);
        return Ok(());
    }
    let rows = (x.n * oh).div_ceil(4 * threads).max(1);
    crate::threads::run_with(threads, || {
        out.par_chunks_mut(rows * row)
            .with_max_len(1)
            .enumerate()
            .for_each(|(i, o)| max_pool_rows(isa, x, p, (oh, ow), i * rows, o));
    });
    Ok(())
}

multiversion! {
    /// Output rows `first..` (counted over the batch's images) into `out`, whole rows: for
    /// each output row, the largest of its window's input rows first, whole rows at a time,
    /// then the largest of each output pixel's window columns in that row. The padding is
    /// skipped; a window with no input inside gives 0.
    fn max_pool_rows(x: &QImage<'_>, p: &Pool2d, ohw: (usize, usize), first: usize, out: &mut [u8]) {
        /// `dst = max(dst, src)`, byte by byte (inlined into each tier's copy).
        #[inline(always)]
        fn max_into(dst: &mut [u8], src: &[u8]) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = (*d).max(*s);
            }
        }
        let (c, (oh, ow)) = (x.c, ohw);
        let row = x.w * c;
        // The window rows' largest values, one input row long.
        let mut rows_max = vec![0u8; row];
        for (r, orow) in out.chunks_exact_mut(ow * c).enumerate() {
            let (b, oy) = ((first + r) / oh, (first + r) % oh);
            let image = &x.data[b * x.h * row..(b + 1) * x.h * row];
            let mut inside = (0..p.kernel[0])
                .map(|ky| (oy * p.stride[0] + ky * p.dilation[0]) as isize - p.padding[0] as isize)
                .filter(|&iy| iy >= 0 && iy < x.h as isize)
                .map(|iy| &image[iy as usize * row..(iy as usize + 1) * row]);
            let Some(top) = inside.next() else {
                orow.fill(0);
                continue;
            };
            rows_max.copy_from_slice(top);
            for src in inside {
                max_into(&mut rows_max, src);
            }
            for (ox, o) in orow.chunks_exact_mut(c).enumerate() {
                let mut cols = (0..p.kernel[1])
                    .map(|kx| (ox * p.stride[1] + kx * p.dilation[1]) as isize - p.padding[1] as isize)
                    .filter(|&ix| ix >= 0 && ix < x.w as isize)
                    .map(|ix| &rows_max[ix as usize * c..(ix as usize + 1) * c]);
                match cols.next() {
                    Some(left) => {
                        o.copy_from_slice(left);
                        for src in cols {
                            max_into(o, src);
                        }
                    }
                    None => o.fill(0),
                }
            }
        }
    }
}

/// Requantizes a window sum: `zo + round_half_even(acc * (1 / (1 / multiplier)))`, clamped
/// to `u8`, with `multiplier = s_in / s_out / divisor` in f32: PyTorch's
/// `quantize_val(1.0f / multiplier, z_out, acc)` on the NHWC path.
#[inline(always)]
fn requant_window(acc: i32, multiplier: f32, zo: i32) -> u8 {
    let inv = 1.0f32 / (1.0f32 / multiplier);
    qtensor::kernels::quantize_scalar(acc as f32, inv, zo, 0, 255) as u8
}

/// Average pooling in the integer domain: `acc = Σ q - z_in * count`, divided and rescaled
/// in one requantization (PyTorch's `_qavg_pool_nhwc_kernel`).
///
/// # Errors
/// Invalid window, divisor 0, invalid output parameters, buffers of the wrong size.
pub fn avg_pool2d(x: &QImage<'_>, p: &Pool2d, qo: QuantU8, out: &mut [u8]) -> Result<()> {
    avg_pool2d_with(qtensor::isa::selected(), x, p, qo, out)
}

/// [`avg_pool2d`] with an explicit instruction set, for conformance tests.
///
/// # Errors
/// As [`avg_pool2d`].
pub fn avg_pool2d_with(isa: qtensor::isa::Isa, x: &QImage<'_>, p: &Pool2d, qo: QuantU8, out: &mut [u8]) -> Result<()> {
    const OP: &str = "qkernels::avg_pool2d";
    let (oh, ow) = p.output_hw(x.h, x.w)?;
    check_out(OP, x, oh, ow, out)?;
    qo.check(OP)?;
    if p.divisor_override == Some(0) {
        return Err(QError::Unsupported { op: OP, reason: "divisor_override must be non-zero".into() });
    }
    avg_pool_core(isa, x, p, qo, oh, ow, out);
    Ok(())
}

multiversion! {
    fn avg_pool_core(x: &QImage<'_>, p: &Pool2d, qo: QuantU8, oh: usize, ow: usize, out: &mut [u8]) {
        let c = x.c;
        let mut acc = vec![0i32; c];
        for b in 0..x.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let hs = (oy * p.stride[0]) as isize - p.padding[0] as isize;
                    let ws = (ox * p.stride[1]) as isize - p.padding[1] as isize;
                    let he = (hs + p.kernel[0] as isize).min((x.h + p.padding[0]) as isize);
                    let we = (ws + p.kernel[1] as isize).min((x.w + p.padding[1]) as isize);
                    let pool_size = ((he - hs) * (we - ws)) as i32;
                    let (hs, ws) = (hs.max(0) as usize, ws.max(0) as usize);
                    let (he, we) = (he.min(x.h as isize) as usize, we.min(x.w as isize) as usize);
                    let size = (he.saturating_sub(hs) * we.saturating_sub(ws)) as i32;
                    let divisor = match p.divisor_override {
                        Some(d) => d as i32,
                        None if p.count_include_pad => pool_size,
                        None => size,
                    };
                    acc.fill(-x.zero_point * size);
                    for iy in hs..he {
                        for ix in ws..we {
                            let src = &x.data[((b * x.h + iy) * x.w + ix) * c..][..c];
                            for (a, s) in acc.iter_mut().zip(src) {
                                *a += *s as i32;
                            }
                        }
                    }
                    let multiplier = x.scale / qo.scale / divisor as f32;
                    let o = &mut out[((b * oh + oy) * ow + ox) * c..][..c];
                    for (d, a) in o.iter_mut().zip(&acc) {
                        *d = requant_window(*a, multiplier, qo.zero_point);
                    }
                }
            }
        }
    }
}

/// Adaptive average pooling to `out_h x out_w` (PyTorch's windows
/// `[floor(o * in / out), ceil((o + 1) * in / out))`), requantized like [`avg_pool2d`];
/// `1 x 1` is the global average pool.
///
/// # Errors
/// A zero output size, invalid output parameters, buffers of the wrong size.
pub fn adaptive_avg_pool2d(x: &QImage<'_>, (oh, ow): (usize, usize), qo: QuantU8, out: &mut [u8]) -> Result<()> {
    adaptive_avg_pool2d_with(qtensor::isa::selected(), x, (oh, ow), qo, out)
}

/// [`adaptive_avg_pool2d`] with an explicit instruction set, for conformance tests.
///
/// # Errors
/// As [`adaptive_avg_pool2d`].
pub fn adaptive_avg_pool2d_with(
    isa: qtensor::isa::Isa,
    x: &QImage<'_>,
    (oh, ow): (usize, usize),
    qo: QuantU8,
    out: &mut [u8],
) -> Result<()> {
    const OP: &str = "qkernels::adaptive_avg_pool2d";
    if oh == 0 || ow == 0 {
        return Err(QError::Unsupported { op: OP, reason: format!("output size {oh}x{ow} must be at least 1x1") });
    }
    check_out(OP, x, oh, ow, out)?;
    qo.check(OP)?;
    adaptive_core(isa, x, oh, ow, qo, out);
    Ok(())
}

multiversion! {
    fn adaptive_core(x: &QImage<'_>, oh: usize, ow: usize, qo: QuantU8, out: &mut [u8]) {
        let c = x.c;
        let mut acc = vec![0i32; c];
        let start = |o: usize, i: usize, n: usize| (o * i) / n;
        let end = |o: usize, i: usize, n: usize| ((o + 1) * i).div_ceil(n);
        for b in 0..x.n {
            for oy in 0..oh {
                let (hs, he) = (start(oy, x.h, oh), end(oy, x.h, oh));
                for ox in 0..ow {
                    let (ws, we) = (start(ox, x.w, ow), end(ox, x.w, ow));
                    let size = ((he - hs) * (we - ws)) as i32;
                    acc.fill(-x.zero_point * size);
                    for iy in hs..he {
                        let row = &x.data[((b * x.h + iy) * x.w + ws) * c..((b * x.h + iy) * x.w + we) * c];
                        for px in row.chunks_exact(c) {
                            for (a, s) in acc.iter_mut().zip(px) {
                                *a += *s as i32;
                            }
                        }
                    }
                    let multiplier = x.scale / qo.scale / size as f32;
                    let o = &mut out[((b * oh + oy) * ow + ox) * c..][..c];
                    for (d, a) in o.iter_mut().zip(&acc) {
                        *d = requant_window(*a, multiplier, qo.zero_point);
                    }
                }
            }
        }
    }
}

/// Nearest-neighbour resizing to `oh x ow` (PyTorch's `upsample_nearest2d`): output row `o`
/// copies input row `o` when the size is unchanged, `o / 2` when doubled, and otherwise
/// `min(floor(f32(o) * sc), in - 1)` with `sc = f32(1 / scale_factor)` when a scale factor was
/// given, else `f32(in) / f32(out)`. Parameters unchanged.
///
/// # Errors
/// A zero output size or buffers of the wrong size.
pub fn upsample_nearest(
    x: &QImage<'_>,
    (oh, ow): (usize, usize),
    scale_factor: Option<[f32; 2]>,
    out: &mut [u8],
) -> Result<()> {
    const OP: &str = "qkernels::upsample_nearest";
    if oh == 0 || ow == 0 {
        return Err(QError::Unsupported { op: OP, reason: format!("output size {oh}x{ow} must be at least 1x1") });
    }
    check_out(OP, x, oh, ow, out)?;
    let index = |o: usize, i: usize, n: usize, sf: Option<f32>| -> usize {
        if n == i {
            o
        } else if n == 2 * i {
            o >> 1
        } else {
            let sc = sf.map_or(i as f32 / n as f32, |f| 1.0 / f);
            ((o as f32 * sc).floor() as usize).min(i - 1)
        }
    };
    let c = x.c;
    for b in 0..x.n {
        for oy in 0..oh {
            let iy = index(oy, x.h, oh, scale_factor.map(|f| f[0]));
            for ox in 0..ow {
                let ix = index(ox, x.w, ow, scale_factor.map(|f| f[1]));
                let src = &x.data[((b * x.h + iy) * x.w + ix) * c..][..c];
                out[((b * oh + oy) * ow + ox) * c..][..c].copy_from_slice(src);
            }
        }
    }
    Ok(())
}
