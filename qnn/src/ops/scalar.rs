//! Scalar constants on a value of any shape.
//!
//! - `x * c` ([`MulScalar`]: `torch.mul(x, c)`, ONNX `Mul` or `Div` by a scalar constant on a
//!   value that is not an image: attention's `1 / sqrt(d)`). In float the product; in int8
//!   PyTorch's `quantized::mul_scalar` (`qkernels::mul_scalar`): for `c > 0` the codes stay
//!   and the scale becomes `scale * c`, for `c < 0` the codes mirror (`255 - q`), for `c ==
//!   0` they are zeros. Exact, and nothing to observe: the output's parameters follow from
//!   the input's.
//! - `x + c` ([`AddScalar`]: `torch.add(x, c)`, ONNX `Add` or `Sub` of a scalar constant on
//!   a value that is not an image). In float the sum; in int8 a lookup table from the input's
//!   parameters to the observed output's, each code's value plus `c` rounded once (PyTorch's
//!   `quantized::add_scalar` instead shifts the zero point by `c` rounded to the input's
//!   step, which moves the sum by up to half a step).

use ndarray::ArrayD;
use qkernels::{QuantU8, UnaryOp};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::activation::LutOp;
use super::{attrs, op_err, parse, LowerCx, OpWriter, QOp};
use crate::error::{NnError, Result};
use crate::module::Module;
use crate::quant::{quantized, Mode, Run, Value};
use crate::scratch::{self, Input};

/// `x * factor`, `factor` a finite constant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MulScalar {
    /// The constant.
    pub factor: f32,
}

impl MulScalar {
    /// The output's parameters for an input quantized with `q` (`qkernels::mul_scalar`'s).
    pub(crate) fn out_q(&self, q: QuantU8) -> QuantU8 {
        let scale = ((self.factor as f64).abs() * q.scale as f64) as f32;
        if self.factor > 0.0 {
            QuantU8 { scale, zero_point: q.zero_point }
        } else if self.factor == 0.0 {
            QuantU8 { scale: 1.0, zero_point: 0 }
        } else {
            QuantU8 { scale, zero_point: 255 - q.zero_point }
        }
    }

    fn check(&self) -> Result<()> {
        if self.factor.is_finite() {
            return Ok(());
        }
        Err(NnError::Config {
            module: String::new(),
            reason: format!("MulScalar: the factor {} is not finite; give a finite constant", self.factor),
        })
    }
}

impl Module for MulScalar {
    fn kind(&self) -> &'static str {
        "MulScalar"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let c = self.factor;
        Ok(crate::layers::map_same_layout(x, |v| v * c))
    }
    fn forward_owned(&self, mut x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        let c = self.factor;
        crate::layers::map_in_place(&mut x, |v| v * c);
        Ok(x)
    }
    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(Ok(input.to_vec()))
    }
    fn lowering(&self) -> Mode {
        Mode::Int8SameParams
    }
    fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        self.check()?;
        Ok(Box::new(MulScalarOp { factor: self.factor, out: self.out_q(cx.in_q).into() }))
    }
    fn computes_images_apart(&self) -> bool {
        true
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(attrs(self)))
    }
    any_methods!();
}

/// `x + value`, `value` a finite constant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AddScalar {
    /// The constant.
    pub value: f32,
}

impl Module for AddScalar {
    fn kind(&self) -> &'static str {
        "AddScalar"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let c = self.value;
        Ok(crate::layers::map_same_layout(x, |v| v + c))
    }
    fn forward_owned(&self, mut x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        let c = self.value;
        crate::layers::map_in_place(&mut x, |v| v + c);
        Ok(x)
    }
    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(Ok(input.to_vec()))
    }
    fn lowering(&self) -> Mode {
        Mode::Int8
    }
    fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        if !self.value.is_finite() {
            return Err(NnError::Config {
                module: String::new(),
                reason: format!("AddScalar: the constant {} is not finite; give a finite constant", self.value),
            });
        }
        let op = UnaryOp::Affine { scale: 1.0, shift: self.value, min: f32::NEG_INFINITY, max: f32::INFINITY };
        Ok(Box::new(LutOp::new(op, cx.in_q, cx.out_q())))
    }
    fn computes_images_apart(&self) -> bool {
        true
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(attrs(self)))
    }
    any_methods!();
}

/// [`MulScalar`] in a converted model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MulScalarOp {
    factor: f32,
    out: super::SavedQ,
}

impl MulScalarOp {
    /// The constant.
    pub(crate) fn factor(&self) -> f32 {
        self.factor
    }
}

pub(crate) const OP: (&str, super::OpLoader) =
    ("MulScalar", |j, _, node| Ok(Box::new(parse::<MulScalarOp>(j, node, "MulScalar")?)));

pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[
    ("MulScalar", |j, _| Ok(Box::new(parse::<MulScalar>(j, "MulScalar", "MulScalar")?))),
    ("AddScalar", |j, _| Ok(Box::new(parse::<AddScalar>(j, "AddScalar", "AddScalar")?))),
];

impl QOp for MulScalarOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, _run: Run) -> Result<Value> {
        let (data, shape, q) = quantized(args.pop().expect("one input"), in_q)?;
        let data = Input::new(data);
        let mut y = scratch::take(data.len());
        let out_q = qkernels::mul_scalar(&data, q, self.factor, &mut y).map_err(op_err)?;
        Ok(Value::U8 { data: y, shape, q: out_q })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.out.0)
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(self))
    }
    any_methods!();
}

/// The fake quantization of a [`MulScalar`]'s output in a simulation: its input's, on the
/// grid scaled by the factor (the int8 op keeps the codes and scales the parameters).
#[derive(Debug)]
pub(crate) struct ScaledFit {
    pub inner: std::sync::Arc<dyn qobserve::Fitted>,
    pub factor: f32,
}

impl qobserve::Fitted for ScaledFit {
    fn fake_quantize(&self, x: &ArrayD<f32>) -> qobserve::Result<ArrayD<f32>> {
        let c = self.factor;
        if c == 0.0 {
            return Ok(ArrayD::zeros(x.raw_dim()));
        }
        let y = self.inner.fake_quantize(&x.mapv(|v| v / c))?;
        Ok(y.mapv(|v| v * c))
    }
    /// The input's per-tensor parameters as [`MulScalar::out_q`] changes them (`None` for
    /// others, which no int8 value has).
    fn affine(&self) -> Option<(qtensor::QParams, qobserve::QuantSpec)> {
        let (p, spec) = self.inner.affine()?;
        let qtensor::QParams::PerTensor { scale, zero_point } = p else { return None };
        let q = MulScalar { factor: self.factor }.out_q(QuantU8 { scale, zero_point });
        Some((qtensor::QParams::PerTensor { scale: q.scale, zero_point: q.zero_point }, spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qobserve::{Fitted, QuantSpec};
    use qtensor::QParams;

    #[derive(Debug)]
    struct Affine(f32, i32);

    impl Fitted for Affine {
        fn fake_quantize(&self, x: &ArrayD<f32>) -> qobserve::Result<ArrayD<f32>> {
            Ok(x.mapv(|v| ((v / self.0).round_ties_even() + self.1 as f32).clamp(0.0, 255.0) - self.1 as f32) * self.0)
        }
        fn affine(&self) -> Option<(QParams, QuantSpec)> {
            Some((QParams::PerTensor { scale: self.0, zero_point: self.1 }, QuantSpec::u8_affine()))
        }
    }

    /// The scaled fit's parameters are those the int8 op gives its output.
    #[test]
    fn the_scaled_grid_is_the_int8_outputs() {
        for factor in [0.25f32, -2.0, 0.0] {
            let fit = ScaledFit { inner: std::sync::Arc::new(Affine(0.1, 10)), factor };
            let (p, _) = fit.affine().unwrap();
            let want = MulScalar { factor }.out_q(QuantU8 { scale: 0.1, zero_point: 10 });
            assert_eq!(p, QParams::PerTensor { scale: want.scale, zero_point: want.zero_point }, "{factor}");
            // Its fake quantization lies on that grid.
            let x = ndarray::Array1::from_iter((0..50).map(|i| i as f32 * 0.037 - 0.4)).into_dyn();
            for v in fit.fake_quantize(&x).unwrap() {
                let steps = v / want.scale;
                assert!((steps - steps.round()).abs() < 1e-3, "{factor}: {v} is off the grid");
            }
        }
    }
}
