//! `nn.LayerNorm(c)` over the last axis (ConvNeXt's blocks, transformers). It runs in float in
//! the converted model, between automatic boundaries, and the plan says so.

use ndarray::{ArrayD, Axis, IxDyn};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::conv::{load_f32, save_f32};
use super::{attrs, bad, parse, OpWriter};
use crate::error::{NnError, Result};
use crate::module::Module;
use crate::quant::Mode;

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
}

impl Module for LayerNorm {
    fn kind(&self) -> &'static str {
        "LayerNorm"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.check(x.shape())?;
        let (g, b) = (self.weight.as_slice_memory_order(), self.bias.as_slice_memory_order());
        let (Some(g), Some(b)) = (g, b) else { unreachable!("1-D parameters are contiguous") };
        let mut y = x.as_standard_layout().into_owned();
        let last = Axis(y.ndim() - 1);
        for mut lane in y.lanes_mut(last) {
            let n = lane.len() as f32;
            let mean = lane.sum() / n;
            let var = lane.fold(0.0f32, |a, &v| a + (v - mean) * (v - mean)) / n;
            let inv = 1.0 / (var + self.eps).sqrt();
            for ((v, &gi), &bi) in lane.iter_mut().zip(g).zip(b) {
                *v = (*v - mean) * inv * gi + bi;
            }
        }
        Ok(y)
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
        Mode::Float(crate::FloatReason::FloatOp {
            why: "LayerNorm runs in float (no int8 form); its output is quantized after it".into(),
        })
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
