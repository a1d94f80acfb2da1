//! `nn.Upsample` / `F.interpolate` (ONNX `Resize` with PyTorch's coordinate rules): nearest
//! and bilinear. In int8 both keep the input's parameters, as PyTorch's quantized kernels do:
//! nearest copies bytes; bilinear weighs the four neighbours' bytes in f32 and rounds half to
//! even, PyTorch's `upsample_bilinear2d_quantized_cpu` operation for operation.

use ndarray::ArrayD;
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, image_op, nchw_of, parse, LowerCx, OpWriter, QOp};
use crate::error::{NnError, Result};
use crate::layers::{from_nhwc, nchw, to_nhwc};
use crate::module::Module;
use crate::quant::{Mode, Run, Value};

/// How [`Upsample`] fills its output.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum UpsampleMode {
    /// The nearest input pixel (PyTorch's `"nearest"`: `floor(o * in / out)`).
    Nearest,
    /// Bilinear interpolation of the four neighbours (`"bilinear"`).
    Bilinear {
        /// PyTorch's `align_corners`.
        align_corners: bool,
    },
}

/// `nn.Upsample(size or scale_factor, mode)` on `[n, c, h, w]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Upsample {
    /// A fixed output size `[h, w]`.
    pub size: Option<[usize; 2]>,
    /// Or a factor per spatial axis: the output is `floor(in * factor)`, and source indices
    /// use `1 / factor` as PyTorch does when it is given.
    pub scale_factor: Option<[f64; 2]>,
    /// Nearest or bilinear.
    pub mode: UpsampleMode,
}

impl Upsample {
    fn keeps_batch(&self) -> bool {
        true
    }

    fn out_dims(&self, input: &[usize]) -> Result<Vec<usize>> {
        let [n, c, h, w] = nchw_of(input, "Upsample")?;
        let (oh, ow) = self.out_hw(h, w, input)?;
        Ok(vec![n, c, oh, ow])
    }

    /// Nearest-neighbour upsampling by an integer factor (`nn.Upsample(scale_factor=f)`).
    pub fn nearest(factor: usize) -> Self {
        Upsample { size: None, scale_factor: Some([factor as f64; 2]), mode: UpsampleMode::Nearest }
    }

    /// Bilinear upsampling by a factor (`nn.Upsample(scale_factor=f, mode="bilinear")`).
    pub fn bilinear(factor: f64, align_corners: bool) -> Self {
        Upsample { size: None, scale_factor: Some([factor; 2]), mode: UpsampleMode::Bilinear { align_corners } }
    }

    /// The output height and width for an `h x w` input.
    fn out_hw(&self, h: usize, w: usize, shape: &[usize]) -> Result<(usize, usize)> {
        let err = |why: &str| NnError::Shape {
            module: String::new(),
            kind: "Upsample",
            expected: format!("an input it can resize ({why})"),
            got: shape.to_vec(),
        };
        let (oh, ow) = match (self.size, self.scale_factor) {
            (Some([oh, ow]), None) => (oh, ow),
            (None, Some([fh, fw])) if fh > 0.0 && fw > 0.0 && fh.is_finite() && fw.is_finite() => {
                ((h as f64 * fh).floor() as usize, (w as f64 * fw).floor() as usize)
            }
            (Some(_), Some(_)) => return Err(err("give a size or a scale factor, not both")),
            _ => return Err(err("a size or a positive scale factor is needed")),
        };
        if oh == 0 || ow == 0 || h == 0 || w == 0 {
            return Err(err("input and output sizes must be positive"));
        }
        Ok((oh, ow))
    }

    /// PyTorch's `compute_scales_value` / `area_pixel_compute_scale` for one axis.
    fn axis_scale(&self, axis: usize, input: usize, output: usize) -> f32 {
        if let UpsampleMode::Bilinear { align_corners: true } = self.mode {
            return if output > 1 { (input - 1) as f32 / (output - 1) as f32 } else { 0.0 };
        }
        match self.scale_factor {
            Some(f) if f[axis] > 0.0 => (1.0 / f[axis]) as f32,
            _ => input as f32 / output as f32,
        }
    }

    /// PyTorch's `nearest_idx`.
    fn nearest_index(o: usize, input: usize, output: usize, scale: f32) -> usize {
        if output == input {
            o
        } else if output == 2 * input {
            o >> 1
        } else {
            ((o as f32 * scale).floor() as usize).min(input - 1)
        }
    }

    /// Per output index along one axis: the lower source index, the step to the upper one (0
    /// at the edge), and the two weights (PyTorch's `area_pixel_compute_source_index`).
    fn bilinear_taps(&self, axis: usize, input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
        let scale = self.axis_scale(axis, input, output);
        let align = matches!(self.mode, UpsampleMode::Bilinear { align_corners: true });
        (0..output)
            .map(|o| {
                let src = if align {
                    scale * o as f32
                } else {
                    let s = scale * (o as f32 + 0.5) - 0.5;
                    if s < 0.0 {
                        0.0
                    } else {
                        s
                    }
                };
                let i = src as usize;
                let step = usize::from(i < input - 1);
                let l1 = src - i as f32;
                (i, step, 1.0 - l1, l1)
            })
            .collect()
    }

    /// Resizes NHWC `[n, h, w, c]` data; `blend(p00, p01, p10, p11, weights)` gives a bilinear
    /// output, and nearest copies.
    fn resize<T: Copy>(
        &self,
        src: &[T],
        [n, h, w, c]: [usize; 4],
        (oh, ow): (usize, usize),
        out: &mut [T],
        blend: impl Fn([T; 4], [f32; 4]) -> T,
    ) {
        match self.mode {
            UpsampleMode::Nearest => {
                let (sh, sw) = (self.axis_scale(0, h, oh), self.axis_scale(1, w, ow));
                let cols: Vec<usize> = (0..ow).map(|x| Self::nearest_index(x, w, ow, sw)).collect();
                for b in 0..n {
                    for y in 0..oh {
                        let iy = Self::nearest_index(y, h, oh, sh);
                        for (x, &ix) in cols.iter().enumerate() {
                            let s = ((b * h + iy) * w + ix) * c;
                            let d = ((b * oh + y) * ow + x) * c;
                            out[d..d + c].copy_from_slice(&src[s..s + c]);
                        }
                    }
                }
            }
            UpsampleMode::Bilinear { .. } => {
                let rows = self.bilinear_taps(0, h, oh);
                let cols = self.bilinear_taps(1, w, ow);
                for b in 0..n {
                    for (y, &(iy, dy, h0, h1)) in rows.iter().enumerate() {
                        for (x, &(ix, dx, w0, w1)) in cols.iter().enumerate() {
                            let at = |yy: usize, xx: usize| ((b * h + yy) * w + xx) * c;
                            let (p00, p01, p10, p11) =
                                (at(iy, ix), at(iy, ix + dx), at(iy + dy, ix), at(iy + dy, ix + dx));
                            let d = ((b * oh + y) * ow + x) * c;
                            for k in 0..c {
                                out[d + k] =
                                    blend([src[p00 + k], src[p01 + k], src[p10 + k], src[p11 + k]], [h0, h1, w0, w1]);
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Module for Upsample {
    fn kind(&self) -> &'static str {
        "Upsample"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [n, c, h, w] = nchw("Upsample", x, "[batch, channels, height, width]")?;
        let (oh, ow) = self.out_hw(h, w, x.shape())?;
        let mut out = vec![0.0f32; n * oh * ow * c];
        self.resize(&to_nhwc(x), [n, h, w, c], (oh, ow), &mut out, |p, [h0, h1, w0, w1]| {
            h0 * (w0 * p[0] + w1 * p[1]) + h1 * (w0 * p[2] + w1 * p[3])
        });
        Ok(from_nhwc(out, [n, oh, ow, c]))
    }
    same_params_module!();
}

pub(crate) const OP: (&str, super::OpLoader) =
    ("Upsample", |j, _, node| Ok(Box::new(parse::<Upsample>(j, node, "Upsample")?)));

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] =
    &[("Upsample", |j, _| Ok(Box::new(parse::<Upsample>(j, "Upsample", "Upsample")?)))];

impl QOp for Upsample {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        image_op(args.pop().expect("one input"), self, run, |x, hw, y| {
            let zp = x.zero_point as f32;
            self.resize(x.data, [x.n, x.h, x.w, x.c], hw, y, |p, [h0, h1, w0, w1]| {
                let [p00, p01, p10, p11] = p.map(f32::from);
                let r = h0 * (w0 * p00 + w1 * p01) + h1 * (w0 * p10 + w1 * p11) - zp;
                (r.round_ties_even() + zp).clamp(0.0, 255.0) as u8
            });
            Ok(())
        })
    }
    serde_qop_tail!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn nearest_doubles_pixels() {
        let x = ArrayD::from_shape_fn(IxDyn(&[1, 1, 2, 2]), |i| (i[2] * 2 + i[3]) as f32);
        let y = Upsample::nearest(2).forward(&x).unwrap();
        assert_eq!(y.shape(), &[1, 1, 4, 4]);
        assert_eq!(y[[0, 0, 3, 1]], 2.0);
        assert_eq!(y[[0, 0, 1, 3]], 1.0);
    }
}
