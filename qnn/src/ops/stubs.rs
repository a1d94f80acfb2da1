//! Layers that compute nothing: `Identity`, `Dropout` (at inference), and PyTorch's
//! `QuantStub` / `DeQuantStub`, which mark where a quantized region starts and ends. In the
//! converted model a `QuantStub` is an explicit quantize to its observed parameters, a
//! `DeQuantStub` an explicit dequantize (its output is float). Also `NanToZero`, which
//! computes almost nothing: NaNs to 0 in float, codes unchanged in int8.

use ndarray::ArrayD;
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, op_err, parse, LowerCx, OpWriter, QOp, SavedQ};
use crate::error::Result;
use crate::module::Module;
use crate::quant::{Mode, Run, Value};

macro_rules! no_compute {
    ($(#[$doc:meta])* $name:ident $(($field:ty))?, $kind:literal, $mode:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $name$((pub $field))?;

        impl Module for $name {
            fn kind(&self) -> &'static str {
                $kind
            }
            fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
                Ok(x.clone())
            }
            fn forward_owned(&self, x: ArrayD<f32>) -> Result<ArrayD<f32>> {
                Ok(x)
            }
            fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
                Some(Ok(input.to_vec()))
            }
            fn lowering(&self) -> Mode {
                $mode
            }
            fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
                Ok(Box::new(QuantizeOp { out_q: cx.out_q() }))
            }
            fn computes_images_apart(&self) -> bool {
                true
            }
            fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<J>> {
                Some(Ok(J::Null))
            }
            any_methods!();
        }
    };
}

no_compute!(
    /// `nn.Identity`.
    Identity, "Identity", Mode::Passthrough
);
no_compute!(
    /// `nn.Dropout(p)` at inference: passes its input through. Kept as its own type so the
    /// model prints and reports like the PyTorch one.
    Dropout(f32), "Dropout", Mode::Passthrough
);
no_compute!(
    /// PyTorch's `QuantStub`: where a quantized region starts, with its own output observer.
    /// Never required here (boundaries are placed automatically); accepted so models written
    /// with stubs port unchanged. In float it passes its input through; converted, it
    /// quantizes to its observed parameters.
    QuantStub, "QuantStub", Mode::Int8
);
no_compute!(
    /// PyTorch's `DeQuantStub`: where a quantized region ends; its output is float. Modules
    /// after it still follow the configuration (skip them to keep them in float).
    DeQuantStub, "DeQuantStub", Mode::Float(crate::FloatReason::RegionEnd)
);

/// `x` with its NaNs replaced by 0 (ONNX's `Where(IsNaN(x), 0, x)`, which exporters write
/// after attention's softmax, for rows that a mask covers entirely). In int8 the codes pass
/// unchanged: a quantized value holds no NaN.
#[derive(Debug, Clone, Copy, Default)]
pub struct NanToZero;

fn nan_to_zero(v: f32) -> f32 {
    if v.is_nan() {
        0.0
    } else {
        v
    }
}

impl Module for NanToZero {
    fn kind(&self) -> &'static str {
        "NanToZero"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(crate::layers::map_same_layout(x, nan_to_zero))
    }
    fn forward_owned(&self, mut x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        crate::layers::map_in_place(&mut x, nan_to_zero);
        Ok(x)
    }
    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(Ok(input.to_vec()))
    }
    fn lowering(&self) -> Mode {
        Mode::Int8SameParams
    }
    fn lower(&self, _cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        Ok(Box::new(NanToZeroOp))
    }
    fn computes_images_apart(&self) -> bool {
        true
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(J::Null))
    }
    any_methods!();
}

/// [`NanToZero`] in a converted model: codes pass through; a float value has its NaNs
/// replaced by 0.
#[derive(Debug, Clone, Copy)]
pub struct NanToZeroOp;

pub(crate) const NAN_TO_ZERO: (&str, super::OpLoader) = ("NanToZero", |_, _, _| Ok(Box::new(NanToZeroOp)));

impl QOp for NanToZeroOp {
    fn op_name(&self) -> &'static str {
        NAN_TO_ZERO.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        Ok(match args.pop().expect("one input") {
            Value::F32(x) => Value::F32(NanToZero.forward_owned(x)?),
            codes => codes,
        })
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(J::Null)
    }
    any_methods!();
}

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[
    ("Identity", |_, _| Ok(Box::new(Identity))),
    ("NanToZero", |_, _| Ok(Box::new(NanToZero))),
    ("Dropout", |_, _| Ok(Box::new(Dropout(0.0)))),
    ("QuantStub", |_, _| Ok(Box::new(QuantStub))),
    ("DeQuantStub", |_, _| Ok(Box::new(DeQuantStub))),
];

/// Nothing computed: the value passes through as it is.
#[derive(Debug, Clone, Copy)]
pub struct PassOp;

pub(crate) const PASS: (&str, super::OpLoader) = ("Identity", |_, _, _| Ok(Box::new(PassOp)));

impl QOp for PassOp {
    fn op_name(&self) -> &'static str {
        PASS.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        Ok(args.pop().expect("one input"))
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(J::Null)
    }
    any_methods!();
}

/// An explicit quantize (or requantize) to fixed parameters.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeOp {
    out_q: QuantU8,
}

#[derive(Serialize, Deserialize)]
struct QuantizeAttrs {
    out_q: SavedQ,
}

pub(crate) const QUANTIZE: (&str, super::OpLoader) =
    ("Quantize", |j, _, node| Ok(Box::new(QuantizeOp { out_q: parse::<QuantizeAttrs>(j, node, "Quantize")?.out_q.0 })));

impl QOp for QuantizeOp {
    fn op_name(&self) -> &'static str {
        QUANTIZE.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        match args.pop().expect("one input") {
            v @ Value::U8 { q, .. } if q == self.out_q => Ok(v),
            other => Value::quantize(other.into_f32().view(), self.out_q).map_err(op_err),
        }
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.out_q)
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(&QuantizeAttrs { out_q: self.out_q.into() }))
    }
    any_methods!();
}
