//! Bias correction ([`crate::QConfigMapping::bias_correction`]): the mean of every input tap
//! of a static int8 `Conv2d` or `Linear`, summed over the calibration batches, and the shift
//! of each output channel's mean that its rounded weights cause.
//!
//! A layer computes `y[o] = b[o] + sum_i w[o, i] * x[i]` over its taps `i` (a `Linear`'s
//! input features; a convolution's input channels and kernel positions, the image read
//! through the padding as zeros). With weights rounded to `w_q`, the output's mean over the
//! data moves by `sum_i (w_q[o, i] - w[o, i]) * E[x[i]]`; subtracting that from `b[o]` removes
//! the offset and leaves the rounding's noise.

use ndarray::{ArrayD, Axis};

use qobserve::QConfig;

use crate::module::Module;
use crate::ops::conv::Conv2d;
use crate::ops::linear::Linear;
use crate::{NnError, Result};

/// The fewest output positions (rows of a linear layer's input, images times output pixels
/// of a convolution's) whose input means bias correction uses.
pub(crate) const MIN_POSITIONS: f64 = 32.0;

/// Where a layer's taps come from.
#[derive(Clone, Copy, Debug)]
enum Taps {
    /// `Linear` with this many input features.
    Linear { k: usize },
    /// `Conv2d` over `c` input channels with a `kh x kw` kernel.
    Conv { c: usize, kh: usize, kw: usize, stride: [usize; 2], padding: [usize; 2], dilation: [usize; 2] },
}

/// A layer's input taps summed over the calibration data, in `f64`, and how many output
/// positions they were summed over.
#[derive(Clone, Debug)]
pub(crate) struct TapSums {
    taps: Taps,
    /// `[k]` for a `Linear`; `[c, kh, kw]` (row-major) for a `Conv2d`.
    sums: Vec<f64>,
    count: f64,
}

impl TapSums {
    /// Empty sums for `m` configured with `cfg`, when it is a layer bias correction covers: a
    /// `Linear`, or a `Conv2d` that runs as a convolution (not one that runs as a table,
    /// whose weights are not rounded).
    pub(crate) fn for_module(m: &dyn Module, cfg: &QConfig) -> Option<TapSums> {
        let a = m.as_any();
        let taps = if let Some(l) = a.downcast_ref::<Linear>() {
            Taps::Linear { k: *l.weight.shape().last()? }
        } else if let Some(c) = a.downcast_ref::<Conv2d>().filter(|c| !c.runs_as_table(cfg)) {
            let &[_, icg, kh, kw] = c.weight.shape() else { return None };
            let g = &c.geom;
            Taps::Conv { c: icg * g.groups, kh, kw, stride: g.stride, padding: g.padding, dilation: g.dilation }
        } else {
            return None;
        };
        let len = match taps {
            Taps::Linear { k } => k,
            Taps::Conv { c, kh, kw, .. } => c * kh * kw,
        };
        Some(TapSums { taps, sums: vec![0.0; len], count: 0.0 })
    }

    /// Adds the taps of one calibration batch `x`, the layer's input as its forward pass
    /// reads it (`[.., k]`, or `[n, c, h, w]`). Non-finite values (which only observers
    /// configured to skip them let through) count as zeros.
    pub(crate) fn add(&mut self, x: &ArrayD<f32>, name: &str) -> Result<()> {
        let wrong = |expected: String| NnError::Shape {
            module: name.to_string(),
            kind: "bias correction",
            expected,
            got: x.shape().to_vec(),
        };
        match self.taps {
            Taps::Linear { k } => {
                if x.ndim() == 0 || x.shape()[x.ndim() - 1] != k {
                    return Err(wrong(format!("an input whose last dimension is the layer's {k} features")));
                }
                for row in x.lanes(Axis(x.ndim() - 1)) {
                    for (s, &v) in self.sums.iter_mut().zip(row) {
                        *s += finite(v);
                    }
                }
                self.count += (x.len() / k.max(1)) as f64;
            }
            Taps::Conv { c, kh, kw, stride, padding, dilation } => {
                if x.ndim() != 4 || x.shape()[1] != c {
                    return Err(wrong(format!("an input [n, {c}, h, w]")));
                }
                let (h, w) = (x.shape()[2], x.shape()[3]);
                let out = |size: usize, k: usize, p: usize, d: usize, s: usize| {
                    (size + 2 * p).checked_sub(d * (k - 1) + 1).map(|v| v / s + 1)
                };
                let (Some(oh), Some(ow)) =
                    (out(h, kh, padding[0], dilation[0], stride[0]), out(w, kw, padding[1], dilation[1], stride[1]))
                else {
                    return Err(wrong(format!("an image at least as large as the {kh} x {kw} kernel")));
                };
                // The batch's images summed into one plane, channels last (as the float
                // convolutions hand their outputs on; other layouts are read in logical order).
                let mut plane = vec![0.0f64; h * w * c];
                let items = x.view().into_dimensionality::<ndarray::Ix4>().expect("checked: 4-D");
                for image in items.outer_iter() {
                    let channels_last = image.permuted_axes([1, 2, 0]);
                    match channels_last.as_slice() {
                        Some(v) => plane.iter_mut().zip(v).for_each(|(p, &v)| *p += finite(v)),
                        None => plane.iter_mut().zip(channels_last.iter()).for_each(|(p, &v)| *p += finite(v)),
                    }
                }
                // The input row or column that output position `o` reads at kernel offset `k`,
                // if inside the image (not the padding).
                let reads = |o: usize, k: usize, p: usize, d: usize, s: usize, size: usize| {
                    (o * s + k * d).checked_sub(p).filter(|&i| i < size)
                };
                // Per input row and kernel column, the channels summed over the output columns
                // that tap reads; then per kernel position, those summed over the output rows.
                let mut cols = vec![0.0f64; h * kw * c];
                for y in 0..h {
                    for kx in 0..kw {
                        let acc = &mut cols[(y * kw + kx) * c..(y * kw + kx + 1) * c];
                        for ix in (0..ow).filter_map(|ox| reads(ox, kx, padding[1], dilation[1], stride[1], w)) {
                            let px = &plane[(y * w + ix) * c..(y * w + ix + 1) * c];
                            acc.iter_mut().zip(px).for_each(|(a, &v)| *a += v);
                        }
                    }
                }
                for ky in 0..kh {
                    for iy in (0..oh).filter_map(|oy| reads(oy, ky, padding[0], dilation[0], stride[0], h)) {
                        for kx in 0..kw {
                            let col = &cols[(iy * kw + kx) * c..(iy * kw + kx + 1) * c];
                            for (ci, &v) in col.iter().enumerate() {
                                self.sums[(ci * kh + ky) * kw + kx] += v;
                            }
                        }
                    }
                }
                self.count += (x.shape()[0] * oh * ow) as f64;
            }
        }
        Ok(())
    }

    /// Per output channel, the mean shift `sum((w_q - w) * E[x])` of weights `w` (the
    /// layer's, `[out, in]` or OIHW) rounded to `w_q`; `None` when the taps were summed over
    /// fewer than [`MIN_POSITIONS`] output positions (a classifier calibrated on a few items:
    /// a mean of so few rows could move the bias by as much as it corrects).
    pub(crate) fn shift(&self, w: &ArrayD<f32>, wq: &ArrayD<f32>) -> Option<Vec<f64>> {
        if self.count < MIN_POSITIONS {
            return None;
        }
        let out = w.shape()[0];
        let per = w.len() / out.max(1);
        let (w, wq) = (w.as_standard_layout(), wq.as_standard_layout());
        let (w, wq) = (w.as_slice()?, wq.as_slice()?);
        // The taps output channel `o` reads: its group's input channels, in the weights' order.
        let first = |o: usize| match self.taps {
            Taps::Linear { .. } => 0,
            Taps::Conv { c, kh, kw, .. } => {
                let groups = c * kh * kw / per.max(1);
                (o / (out / groups.max(1)).max(1)) * per
            }
        };
        Some(
            (0..out)
                .map(|o| {
                    let taps = &self.sums[first(o)..first(o) + per];
                    let (w, wq) = (&w[o * per..(o + 1) * per], &wq[o * per..(o + 1) * per]);
                    let sum: f64 = taps.iter().zip(w.iter().zip(wq)).map(|(t, (a, b))| t * f64::from(b - a)).sum();
                    sum / self.count
                })
                .collect(),
        )
    }
}

/// `v` as `f64`, or 0 when it is not finite.
fn finite(v: f32) -> f64 {
    if v.is_finite() {
        f64::from(v)
    } else {
        0.0
    }
}

/// The weight and the bias of `m`, when it is a `Conv2d` or `Linear`.
pub(crate) fn weight_and_bias(m: &mut dyn Module) -> Option<(&ArrayD<f32>, &mut Option<ArrayD<f32>>)> {
    let a = m.as_any_mut();
    if a.is::<Linear>() {
        return a.downcast_mut::<Linear>().map(|l| (&l.weight, &mut l.bias));
    }
    a.downcast_mut::<Conv2d>().map(|c| (&c.weight, &mut c.bias))
}

/// The bias `m` (a `Conv2d` or `Linear`) gets from `taps` with its weights rounded to `wq`
/// (its bias, or zeros when it has none, less the shift), and where it goes; `None` for
/// other layers and when the taps saw too few positions.
pub(crate) fn corrected_bias<'m>(
    m: &'m mut dyn Module,
    taps: &TapSums,
    wq: &ArrayD<f32>,
) -> Option<(&'m mut Option<ArrayD<f32>>, ArrayD<f32>)> {
    let (w, bias) = weight_and_bias(m)?;
    let shift = taps.shift(w, wq)?;
    let mut b = bias.clone().unwrap_or_else(|| ArrayD::zeros(ndarray::IxDyn(&[shift.len()])));
    for (b, s) in b.iter_mut().zip(&shift) {
        *b = (f64::from(*b) - s) as f32;
    }
    Some((bias, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn values(seed: usize, shape: &[usize]) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|k| ((k * 7919 + seed * 104_729) % 97) as f32 / 40.0 - 0.7).collect();
        ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
    }

    /// Each tap's mean as an explicit im2col gives it: per input channel and kernel position,
    /// the mean over images and output positions of the pixel read (0 in the padding).
    fn im2col_means(x: &ArrayD<f32>, kh: usize, kw: usize, g: qkernels::Conv2dGeometry) -> Vec<f64> {
        let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let oh = (h + 2 * g.padding[0] - g.dilation[0] * (kh - 1) - 1) / g.stride[0] + 1;
        let ow = (w + 2 * g.padding[1] - g.dilation[1] * (kw - 1) - 1) / g.stride[1] + 1;
        let mut sums = vec![0.0f64; c * kh * kw];
        for b in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ci in 0..c {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.padding[1] as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    sums[(ci * kh + ky) * kw + kx] += f64::from(x[[b, ci, iy as usize, ix as usize]]);
                                }
                            }
                        }
                    }
                }
            }
        }
        sums.iter().map(|s| s / (n * oh * ow) as f64).collect()
    }

    #[test]
    fn conv_taps_are_im2col_means_in_any_layout() {
        for (stride, padding, dilation, groups) in
            [(1, 1, 1, 1), (2, 1, 1, 2), (2, 3, 2, 1), (1, 0, 1, 4), (3, 2, 1, 1)]
        {
            let geom = qkernels::Conv2dGeometry {
                stride: [stride, stride],
                padding: [padding, padding + 1],
                dilation: [dilation, 1],
                groups,
            };
            let conv = Conv2d { geom, ..Conv2d::new(4, 8, 3).groups(groups) };
            let x = values(stride + padding, &[3, 4, 9, 11]);
            // The same values stored channels last, as float convolutions hand theirs on.
            let nhwc = x.view().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned();
            let channels_last = nhwc.permuted_axes(IxDyn(&[0, 3, 1, 2]));
            assert_eq!(channels_last, x);
            let want = im2col_means(&x, 3, 3, geom);
            for input in [&x, &channels_last] {
                let mut t = TapSums::for_module(&conv, &QConfig::default()).unwrap();
                // Two batches: the sums add up.
                t.add(&input.slice_axis(Axis(0), (0..1).into()).to_owned(), "conv").unwrap();
                t.add(&input.slice_axis(Axis(0), (1..3).into()).to_owned(), "conv").unwrap();
                for (k, (s, w)) in t.sums.iter().zip(&want).enumerate() {
                    assert!((s / t.count - w).abs() < 1e-9, "{geom:?} tap {k}: {} against {w}", s / t.count);
                }
            }
        }
    }

    #[test]
    fn the_shift_is_the_rounding_times_the_tap_means() {
        // Grouped: output channel o reads its group's input channels only.
        let mut conv = Conv2d::new(4, 6, 3).groups(2).padding(1);
        conv.weight = values(3, &[6, 2, 3, 3]);
        let x = values(5, &[2, 4, 6, 7]);
        let mut t = TapSums::for_module(&conv, &QConfig::default()).unwrap();
        t.add(&x, "conv").unwrap();
        let means = im2col_means(&x, 3, 3, conv.geom);
        let wq = conv.weight.mapv(|v| (v * 8.0).round() / 8.0);
        let shift = t.shift(&conv.weight, &wq).unwrap();
        for (o, s) in shift.iter().enumerate() {
            let group = o / 3;
            let want: f64 = (0..2 * 9)
                .map(|k| {
                    let (ci, tap) = (k / 9, k % 9);
                    let d = f64::from(wq[[o, ci, tap / 3, tap % 3]] - conv.weight[[o, ci, tap / 3, tap % 3]]);
                    d * means[(group * 2 + ci) * 9 + tap]
                })
                .sum();
            assert!((s - want).abs() < 1e-9, "channel {o}: {s} against {want}");
        }
        // A linear layer on [batch, tokens, features]: the mean over every row.
        let mut lin = Linear::new(5, 3);
        lin.weight = values(7, &[3, 5]);
        let x = values(9, &[4, 8, 5]);
        let mut t = TapSums::for_module(&lin, &QConfig::default()).unwrap();
        t.add(&x, "fc").unwrap();
        let wq = lin.weight.mapv(|v| (v * 4.0).round() / 4.0);
        let shift = t.shift(&lin.weight, &wq).unwrap();
        for (o, s) in shift.iter().enumerate() {
            let want: f64 = (0..5)
                .map(|i| {
                    let mean = x.index_axis(Axis(2), i).iter().map(|&v| f64::from(v)).sum::<f64>() / 32.0;
                    f64::from(wq[[o, i]] - lin.weight[[o, i]]) * mean
                })
                .sum();
            assert!((s - want).abs() < 1e-9, "output {o}: {s} against {want}");
        }
        // No data, or too few rows, no shift; a wrong input is an error naming the layer.
        let mut few = TapSums::for_module(&lin, &QConfig::default()).unwrap();
        assert!(few.shift(&lin.weight, &wq).is_none());
        few.add(&values(2, &[31, 5]), "fc").unwrap();
        assert!(few.shift(&lin.weight, &wq).is_none());
        few.add(&values(3, &[1, 5]), "fc").unwrap();
        assert!(few.shift(&lin.weight, &wq).is_some());
        let e = t.add(&values(1, &[2, 4]), "fc").unwrap_err().to_string();
        assert!(e.contains("fc") && e.contains("5 features"), "{e}");
    }

    #[test]
    fn a_scalar_affine_map_is_not_corrected() {
        let mut map = Conv2d::new(3, 3, 1).groups(3);
        map.weight.fill(0.5);
        assert!(TapSums::for_module(&map, &QConfig::default()).is_none());
        map.weight[[1, 0, 0, 0]] = 0.25;
        assert!(TapSums::for_module(&map, &QConfig::default()).is_some());
    }
}
