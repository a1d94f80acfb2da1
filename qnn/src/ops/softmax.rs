//! `nn.Softmax(dim)`. It runs in float in the converted model: its output lies in (0, 1) and
//! is quantized after it like any float layer's (PyTorch's eager mode has no quantized
//! softmax module; its FX lowering dequantizes around it too).

use ndarray::{ArrayD, Axis};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, parse, OpWriter};
use crate::error::{NnError, Result};
use crate::module::Module;
use crate::quant::Mode;

/// `nn.Softmax(dim)`: `exp(x - max) / sum(exp(x - max))` along `dim` (negative counts from
/// the end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Softmax {
    /// The axis.
    pub dim: i64,
}

impl Softmax {
    fn axis(&self, rank: usize) -> Option<usize> {
        let d = if self.dim < 0 { self.dim + rank as i64 } else { self.dim };
        usize::try_from(d).ok().filter(|&d| d < rank)
    }
}

impl Module for Softmax {
    fn kind(&self) -> &'static str {
        "Softmax"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let axis = self.axis(x.ndim()).ok_or_else(|| NnError::Shape {
            module: String::new(),
            kind: "Softmax",
            expected: format!("an input with an axis {}", self.dim),
            got: x.shape().to_vec(),
        })?;
        let mut y = x.to_owned();
        for mut lane in y.lanes_mut(Axis(axis)) {
            let max = lane.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            lane.mapv_inplace(|v| (v - max).exp());
            let sum: f32 = lane.sum();
            lane.mapv_inplace(|v| v / sum);
        }
        Ok(y)
    }
    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(match self.axis(input.len()) {
            Some(_) => Ok(input.to_vec()),
            None => Err(NnError::Shape {
                module: String::new(),
                kind: "Softmax",
                expected: format!("an input with an axis {}", self.dim),
                got: input.to_vec(),
            }),
        })
    }
    fn lowering(&self) -> Mode {
        Mode::Float(crate::FloatReason::FloatOp {
            why: "Softmax runs in float (no int8 form); its output is quantized after it".into(),
        })
    }
    fn computes_images_apart(&self) -> bool {
        // The batch axis is 0 (or -rank, which -1 never is for rank > 1).
        self.dim > 0 || self.dim == -1
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(attrs(self)))
    }
    any_methods!();
}

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] =
    &[("Softmax", |j, _| Ok(Box::new(parse::<Softmax>(j, "Softmax", "Softmax")?)))];
