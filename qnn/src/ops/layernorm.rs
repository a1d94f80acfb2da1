//! `nn.LayerNorm(c)` over the last axis (ConvNeXt's blocks, transformers). In int8 it is
//! PyTorch's `quantized::layer_norm` (`qkernels::layer_norm`: statistics in `f32` from exact
//! integer sums of the codes, the output requantized to the parameters its observer chose);
//! skipping the node in the configuration keeps it in float.

use ndarray::{ArrayD, IxDyn};
use qkernels::{QImage, QuantU8};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::conv::{load_f32, save_f32};
use super::shape::{logical_vec, stored_vec};
use super::{attrs, bad, op_err, parse, LowerCx, OpWriter, QOp, SavedQ};
use crate::error::{NnError, Result};
use crate::module::{FloatKernel, Module};
use crate::quant::{quantized, Mode, Run, Value};
use crate::scratch::{self, Input};

/// `nn.LayerNorm(c, eps)`: each vector along the last axis normalized to zero mean and unit
/// variance (the biased variance, `eps` added), then scaled by `weight` and shifted by `bias`
/// (`[c]` each).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Gamma, `[c]`.
    pub weight: ArrayD<f32>,
    /// Beta, `[c]`.
    pub bias: ArrayD<f32>,
    /// Added to the variance (PyTorch: 1e-5).
    pub eps: f32,
}

impl LayerNorm {
    /// The identity normalization over `c` features (weight 1, bias 0, eps 1e-5).
    pub fn new(c: usize) -> Self {
        LayerNorm { weight: ArrayD::ones(IxDyn(&[c])), bias: ArrayD::zeros(IxDyn(&[c])), eps: 1e-5 }
    }

    fn check(&self, input: &[usize]) -> Result<()> {
        let c = self.weight.len();
        if input.last() != Some(&c) || self.bias.len() != c {
            return Err(NnError::Shape {
                module: String::new(),
                kind: "LayerNorm",
                expected: format!(
                    "an input whose last axis has the layer's {c} features (bias of {}); for NCHW images, \
                     permute the channels last first",
                    self.bias.len()
                ),
                got: input.to_vec(),
            });
        }
        Ok(())
    }

    /// `x` normalized, in place when it is row-major, row by row (qkernels' vectorised f32
    /// layer norm), shared between `threads` threads.
    fn in_place(&self, x: ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        self.check(x.shape())?;
        let (g, b) = (self.weight.as_slice_memory_order(), self.bias.as_slice_memory_order());
        let (Some(g), Some(b)) = (g, b) else { unreachable!("1-D parameters are contiguous") };
        let mut y = if x.is_standard_layout() { x } else { x.as_standard_layout().into_owned() };
        if !y.is_empty() {
            qkernels::layer_norm_in_place(y.as_slice_mut().expect("standard layout"), g, b, self.eps, threads);
        }
        Ok(y)
    }
}

/// The layer as its own float kernel (on any thread count).
#[derive(Debug)]
struct LayerNormKernel(LayerNorm);

impl FloatKernel for LayerNormKernel {
    fn forward(&self, x: &ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        self.0.in_place(x.as_standard_layout().into_owned(), threads)
    }
    fn forward_owned(&self, x: ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        self.0.in_place(x, threads)
    }
}

impl Module for LayerNorm {
    fn kind(&self) -> &'static str {
        "LayerNorm"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.in_place(x.as_standard_layout().into_owned(), 1)
    }
    fn forward_owned(&self, x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.in_place(x, 1)
    }
    fn float_kernel(&self) -> Option<Result<std::sync::Arc<dyn FloatKernel>>> {
        Some(Ok(std::sync::Arc::new(LayerNormKernel(self.clone()))))
    }
    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(self.check(input).map(|()| input.to_vec()))
    }
    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        vec![("weight", &self.weight), ("bias", &self.bias)]
    }
    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        vec![("weight", &mut self.weight), ("bias", &mut self.bias)]
    }
    fn lowering(&self) -> Mode {
        Mode::Int8
    }
    fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        let (Some(weight), Some(bias)) = (self.weight.as_slice_memory_order(), self.bias.as_slice_memory_order())
        else {
            unreachable!("1-D parameters are contiguous")
        };
        if weight.len() != bias.len() {
            return Err(NnError::Config {
                module: String::new(),
                reason: format!("LayerNorm: weight of {} and bias of {} values", weight.len(), bias.len()),
            });
        }
        Ok(Box::new(LayerNormOp {
            weight: weight.to_vec(),
            bias: bias.to_vec(),
            eps: self.eps,
            out: cx.out_q().into(),
        }))
    }
    fn computes_images_apart(&self) -> bool {
        true
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(attrs(&LayerNormAttrs {
            weight: save_f32(node, "weight", &self.weight, w),
            bias: save_f32(node, "bias", &self.bias, w),
            eps: self.eps,
        })))
    }
    any_methods!();
}

/// A float layer norm as saved.
#[derive(Serialize, Deserialize)]
struct LayerNormAttrs {
    weight: String,
    bias: String,
    eps: f32,
}

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[("LayerNorm", |j, r| {
    let a: LayerNormAttrs = parse(j, "LayerNorm", "LayerNorm")?;
    let (weight, bias) = (load_f32(r, &a.weight)?, load_f32(r, &a.bias)?);
    if weight.ndim() != 1 || bias.shape() != weight.shape() || !a.eps.is_finite() || a.eps < 0.0 {
        return Err(bad(format!(
            "LayerNorm: weight {:?} and bias {:?} must be one vector each, eps ({}) finite and non-negative",
            weight.shape(),
            bias.shape(),
            a.eps
        )));
    }
    Ok(Box::new(LayerNorm { weight, bias, eps: a.eps }))
})];

/// [`LayerNorm`] in a converted model: `u8` in, `u8` out.
#[derive(Debug, Clone)]
pub struct LayerNormOp {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
    out: SavedQ,
}

#[derive(Serialize, Deserialize)]
struct LayerNormOpAttrs {
    weight: String,
    bias: String,
    eps: f32,
    out: SavedQ,
}

pub(crate) const OP: (&str, super::OpLoader) = ("LayerNorm", |j, r, node| {
    let a: LayerNormOpAttrs = parse(j, node, "LayerNorm")?;
    let ((ws, weight), (bs, bias)) = (r.f32s(&a.weight)?, r.f32s(&a.bias)?);
    if ws.len() != 1 || bs != ws || !a.eps.is_finite() || a.eps < 0.0 {
        return Err(bad(format!(
            "{node}: LayerNorm weight {ws:?} and bias {bs:?} must be one vector each, eps ({}) finite and \
             non-negative",
            a.eps
        )));
    }
    Ok(Box::new(LayerNormOp { weight, bias, eps: a.eps, out: a.out }))
});

impl LayerNormOp {
    /// Gamma and beta.
    pub(crate) fn params(&self) -> (&[f32], &[f32]) {
        (&self.weight, &self.bias)
    }
}

impl QOp for LayerNormOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, _run: Run) -> Result<Value> {
        let (data, shape, q) = quantized(args.pop().expect("one input"), in_q)?;
        let c = self.weight.len();
        LayerNorm::new(c).check(&shape)?;
        // The last logical axis, contiguous: a 4-D value (stored NHWC) in logical order first.
        let data = Input::new(logical_vec(data, &shape));
        let x =
            QImage { data: &data, n: data.len() / c.max(1), h: 1, w: 1, c, scale: q.scale, zero_point: q.zero_point };
        let mut y = scratch::take(data.len());
        if c > 0 {
            qkernels::layer_norm(&x, &self.weight, &self.bias, self.eps, self.out.0, &mut y).map_err(op_err)?;
        }
        Ok(Value::U8 { data: stored_vec(y, &shape), shape, q: self.out.0 })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.out.0)
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J> {
        let c = self.weight.len();
        let weight = w.f32s(format!("{node}.weight"), vec![c], &self.weight);
        let bias = w.f32s(format!("{node}.bias"), vec![c], &self.bias);
        Ok(attrs(&LayerNormOpAttrs { weight, bias, eps: self.eps, out: self.out }))
    }
    any_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The int8 layer norm against the float one on the dequantized codes, quantized: within
    /// a code (statistics from integer sums, f32 steps), over the last axis of a 4-D value
    /// (stored NHWC) and of a 3-D one.
    #[test]
    fn int8_layer_norm_is_the_float_one_quantized() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let (q, qo) = (QuantU8 { scale: 0.05, zero_point: 100 }, QuantU8 { scale: 0.03, zero_point: 128 });
        for shape in [vec![2, 3, 4, 6], vec![3, 5, 6]] {
            let n: usize = shape.iter().product();
            let codes = crate::ops::test_codes(&mut seed, n);
            let mut ln = LayerNorm::new(6);
            ln.weight = ArrayD::from_shape_vec(IxDyn(&[6]), vec![1.0, 0.5, 1.5, -1.0, 2.0, 0.75]).unwrap();
            ln.bias = ArrayD::from_shape_vec(IxDyn(&[6]), vec![0.0, 0.1, -0.2, 0.3, 0.0, -0.1]).unwrap();
            let x = Value::U8 { data: codes, shape: shape.clone(), q };
            let want = Value::quantize(ln.forward(&x.to_f32()).unwrap().view(), qo).unwrap().to_f32();
            let op = LayerNormOp {
                weight: ln.weight.iter().copied().collect(),
                bias: ln.bias.iter().copied().collect(),
                eps: ln.eps,
                out: qo.into(),
            };
            let run = Run { threads: 1, max_activation_bytes: crate::quant::DEFAULT_MAX_ACTIVATION_BYTES };
            let got = op.run(&mut vec![x], q, run).unwrap().to_f32();
            assert_eq!(got.shape(), &shape[..]);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= qo.scale * 1.01, "shape {shape:?}: {a} vs {b}");
            }
        }
    }
}
