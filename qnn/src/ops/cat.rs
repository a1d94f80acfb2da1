//! Values concatenated along one dimension (`torch.cat`, a `Concat` block, ONNX `Concat`):
//! in float, and in int8. Along dimension 1 of images, `qkernels::cat_channels` requantizes
//! each branch to the observed output parameters; along any other dimension, or on values
//! that are not images, each branch is dequantized and the whole quantized once (PyTorch's
//! `quantized::cat` off its channels-last path).

use ndarray::ArrayD;
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, op_err, parse, OpWriter, QOp, SavedQ};
use crate::error::{NnError, Result};
use crate::module::cat_dim;
use crate::quant::{quantized, Run, Value};
use crate::scratch;

/// The concatenation in the converted model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatOp {
    qs: Vec<SavedQ>,
    out_q: SavedQ,
    int8: bool,
    /// The dimension joined (models saved before it existed joined dimension 1).
    #[serde(default = "dim1")]
    dim: usize,
}

fn dim1() -> usize {
    1
}

impl CatOp {
    pub(crate) fn new(qs: Vec<QuantU8>, out_q: QuantU8, int8: bool, dim: usize) -> Self {
        CatOp { qs: qs.into_iter().map(SavedQ).collect(), out_q: out_q.into(), int8, dim }
    }
}

pub(crate) const OP: (&str, super::OpLoader) = ("Cat", |j, _, node| Ok(Box::new(parse::<CatOp>(j, node, "Cat")?)));

impl QOp for CatOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        let parts = std::mem::take(args);
        let out_q = self.out_q.0;
        if !self.int8 {
            let parts: Vec<ArrayD<f32>> = parts.into_iter().map(Value::into_f32).collect();
            return Ok(Value::F32(cat_dim(&parts, self.dim, "")?));
        }
        if self.dim != 1 || parts.iter().all(|p| p.shape().len() != 4) {
            // PyTorch's `quantized::cat` off its channels-last path (features, tokens, other
            // dimensions): dequantize, concatenate, quantize.
            let floats: Vec<ArrayD<f32>> = parts.into_iter().map(Value::into_f32).collect();
            let y = cat_dim(&floats, self.dim, "")?;
            return Value::quantize(y.view(), out_q).map_err(op_err);
        }
        let mut quantized_parts = Vec::with_capacity(parts.len());
        for (v, q) in parts.into_iter().zip(&self.qs) {
            quantized_parts.push(quantized(v, q.0)?);
        }
        let dims = |s: &[usize]| match *s {
            [n, c, h, w] => Some((n, h, w, c)),
            [n, c] => Some((n, 1, 1, c)),
            _ => None,
        };
        let first = &quantized_parts[0].1;
        let Some((n, h, w, _)) = dims(first) else {
            return Err(NnError::Shape {
                module: String::new(),
                kind: "Concat",
                expected: "4-D [batch, channels, height, width] or 2-D [batch, features] branch outputs".into(),
                got: first.clone(),
            });
        };
        let mut images = Vec::with_capacity(quantized_parts.len());
        let mut channels = 0;
        for (data, shape, q) in &quantized_parts {
            match dims(shape) {
                Some((bn, bh, bw, c)) if (bn, bh, bw) == (n, h, w) && shape.len() == first.len() => {
                    channels += c;
                    images.push(qkernels::QImage { data, n, h, w, c, scale: q.scale, zero_point: q.zero_point });
                }
                _ => {
                    return Err(NnError::Shape {
                        module: String::new(),
                        kind: "Concat",
                        expected: format!(
                            "branch outputs that differ only in dimension 1 (channels); the first branch gave {first:?}"
                        ),
                        got: shape.clone(),
                    })
                }
            }
        }
        let mut out = scratch::take(n * h * w * channels);
        qkernels::cat_channels(&images, &mut out, out_q).map_err(op_err)?;
        let shape = if first.len() == 4 { vec![n, channels, h, w] } else { vec![n, channels] };
        drop(images);
        for (data, _, _) in quantized_parts {
            scratch::give(data);
        }
        Ok(Value::U8 { data: out, shape, q: out_q })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.out_q.0)
    }
    fn quantizes_input(&self, k: usize, _in_q: QuantU8) -> Option<QuantU8> {
        self.int8.then(|| self.qs[k].0)
    }
    fn takes_inputs(&self, n: usize) -> bool {
        n >= 1 && n == self.qs.len()
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(self))
    }
    any_methods!();
}
