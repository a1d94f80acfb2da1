//! Layers that run in float in the converted model (no int8 form, an unfused batch-norm, or
//! kept in float by the configuration), and custom layers' own int8 forms
//! ([`Module::int8`]). A float layer is saved through its [`Module::save`] and loaded through
//! the registry by its kind; a custom int8 layer through [`Int8Layer::save`] and
//! [`super::register_int8_layer`].

use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, bad, int8_layer_loader, layer_loader, parse, OpWriter, QOp, SavedQ};
use crate::error::{NnError, Result};
use std::sync::Arc;

use crate::module::{FloatKernel, Int8Layer, Module};
use crate::quant::{quantized, Run, Value};
use crate::scratch::Input;

/// A float layer between automatic boundaries: a quantized input is dequantized; its output
/// stays float, and the next int8 op quantizes it with this layer's observed parameters. It
/// runs its prepared float kernel ([`Module::float_kernel`]), if it has one.
#[derive(Debug)]
pub struct FloatOp(pub(crate) Box<dyn Module>, Option<Arc<dyn FloatKernel>>);

impl FloatOp {
    /// The layer, with its float kernel prepared.
    ///
    /// # Errors
    /// A layer that cannot prepare one.
    pub(crate) fn new(layer: Box<dyn Module>) -> Result<Self> {
        let kernel = layer.float_kernel().transpose()?;
        Ok(FloatOp(layer, kernel))
    }

    /// The layer with the float kernel already prepared from it (by `prepare`).
    pub(crate) fn with_kernel(layer: Box<dyn Module>, kernel: Option<Arc<dyn FloatKernel>>) -> Self {
        FloatOp(layer, kernel)
    }
}

/// The saved form of a float layer: its kind and what its `save` wrote.
#[derive(Serialize, Deserialize)]
struct FloatAttrs {
    layer: String,
    attrs: J,
}

pub(crate) const FLOAT: (&str, super::OpLoader) = ("Float", |j, r, node| {
    let a: FloatAttrs = parse(j, node, "Float")?;
    let load = layer_loader(&a.layer, node)?;
    let layer = load(&a.attrs, r).map_err(|e| match e {
        NnError::File { reason, .. } => bad(format!("{node} ({}): {reason}", a.layer)),
        other => other,
    })?;
    if layer.kind() != a.layer {
        return Err(bad(format!("{node}: the loader of '{}' built a '{}'", a.layer, layer.kind())));
    }
    // A layer whose kernels cannot be prepared (an impossible geometry) is refused here.
    Ok(Box::new(FloatOp::new(layer).map_err(|e| bad(format!("{node} ({}): {e}", a.layer)))?))
});

impl QOp for FloatOp {
    fn op_name(&self) -> &'static str {
        FLOAT.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        let x = args.pop().expect("one input").into_f32();
        if let Some(shape) = self.0.output_shape(x.shape()) {
            crate::quant::budget(&shape?, 4, run, self.0.kind())?;
        }
        // The value is this op's own: kernels and layers that can work in place do.
        Ok(Value::F32(match &self.1 {
            Some(k) => k.forward_owned(x, run.threads)?,
            None => self.0.forward_owned(x)?,
        }))
    }
    fn run_borrowed(&self, x: &Value, _run: Run) -> Option<Result<Value>> {
        let (Value::F32(x), Some(slice)) = (x, self.0.as_any().downcast_ref::<super::slice::Slice>()) else {
            return None;
        };
        Some(slice.pooled(x).map(Value::F32))
    }
    fn images_apart(&self) -> bool {
        self.0.computes_images_apart()
    }
    fn weight_sqnr(&self, float: &dyn Module) -> Option<f64> {
        // A layer whose weights were quantized for it (a weight quantizer without int8
        // kernels) differs from its float twin there; others hold the same weights.
        let own: Vec<(&'static str, ndarray::ArrayD<f32>)> =
            self.0.tensors().into_iter().filter(|(k, _)| *k == "weight").map(|(k, w)| (k, w.clone())).collect();
        let same = own.iter().all(|(k, w)| float.tensors().iter().any(|(n, f)| n == k && *f == w));
        if same {
            None
        } else {
            weights_sqnr(float, &own)
        }
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J> {
        let kind = self.0.kind();
        let saved = self.0.save(node, w).ok_or_else(|| NnError::File {
            file: String::new(),
            reason: format!(
                "cannot save '{node}': its layer {kind} runs in float and has no Module::save; implement save \
                 (and register a loader with qnn::ops::register_layer before loading)"
            ),
        })??;
        Ok(attrs(&FloatAttrs { layer: kind.to_string(), attrs: saved }))
    }
    any_methods!();
}

/// SQNR of `weights` against the float layer's tensors of the same names, over all of them;
/// `None` when there are none to compare.
fn weights_sqnr(float: &dyn Module, weights: &[(&'static str, ndarray::ArrayD<f32>)]) -> Option<f64> {
    let (mut signal, mut noise) = (0.0f64, 0.0f64);
    let mut any = false;
    for (name, w) in weights {
        let f = float.tensors().into_iter().find(|(k, _)| k == name)?.1;
        if f.shape() != w.shape() {
            return None;
        }
        any = true;
        for (&a, &b) in f.iter().zip(w.iter()) {
            signal += (a as f64).powi(2);
            noise += (a as f64 - b as f64).powi(2);
        }
    }
    any.then(|| if noise == 0.0 { f64::INFINITY } else { 10.0 * (signal / noise).log10() })
}

/// A custom layer's int8 form ([`Module::int8`]).
#[derive(Debug)]
pub struct Int8LayerOp {
    pub(crate) kind: &'static str,
    pub(crate) layer: Box<dyn Int8Layer>,
    pub(crate) out_q: QuantU8,
}

#[derive(Serialize, Deserialize)]
struct Int8LayerAttrs {
    layer: String,
    out_q: SavedQ,
    attrs: J,
}

pub(crate) const INT8_LAYER: (&str, super::OpLoader) = ("Int8Layer", |j, r, node| {
    let a: Int8LayerAttrs = parse(j, node, "Int8Layer")?;
    let (kind, load) = int8_layer_loader(&a.layer, node)?;
    let layer = load(&a.attrs, r)?;
    Ok(Box::new(Int8LayerOp { kind, layer, out_q: a.out_q.0 }))
});

/// The op of a custom layer's int8 form.
pub(crate) fn int8_layer_op(kind: &'static str, layer: Box<dyn Int8Layer>, out_q: QuantU8) -> Box<dyn QOp> {
    Box::new(Int8LayerOp { kind, layer, out_q })
}

impl QOp for Int8LayerOp {
    fn op_name(&self) -> &'static str {
        INT8_LAYER.0
    }
    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, run: Run) -> Result<Value> {
        let (data, shape, _) = quantized(args.pop().expect("one input"), in_q)?;
        let data = Input::new(data);
        let (y, shape) = self.layer.forward_u8(&data, &shape, run.threads)?;
        Ok(Value::U8 { data: y, shape, q: self.out_q })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.out_q)
    }
    fn quantizes_input(&self, _k: usize, in_q: QuantU8) -> Option<QuantU8> {
        Some(in_q)
    }
    fn images_apart(&self) -> bool {
        false
    }
    fn weight_sqnr(&self, float: &dyn Module) -> Option<f64> {
        weights_sqnr(float, &self.layer.weights())
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J> {
        let saved = self.layer.save(node, w).ok_or_else(|| NnError::File {
            file: String::new(),
            reason: format!(
                "cannot save '{node}': its custom int8 layer {} has no Int8Layer::save; implement save (and \
                 register a loader with qnn::ops::register_int8_layer before loading)",
                self.kind
            ),
        })??;
        Ok(attrs(&Int8LayerAttrs { layer: self.kind.to_string(), out_q: self.out_q.into(), attrs: saved }))
    }
    any_methods!();
}
