//! `Linear`: the float layer, and its int8 form (a packed GEMM with the requantization, bias
//! and fused ReLU / ReLU6 in its epilogue).

use ndarray::{ArrayD, IxDyn};
use qkernels::{
    Conv2dGeometry, DynamicActivations, GemmOutput, OutputQuant, PackedConv2dF32, PackedLinear, QMatrix, QuantU8,
    WeightLayout,
};
use qtensor::QParams;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::conv::{load_weights, save_weight_params};
use super::{attrs, bad, op_err, parse, LowerCx, OpReader, OpWriter, QOp, SavedQ};
use crate::error::{NnError, Result};
use crate::layers::{shape_error, FusedAct};
use crate::module::{FloatKernel, Module};
use crate::quant::{out_buf, quantize_weights, quantized, Mode, Run, Value};
use crate::scratch::Input;

/// `nn.Linear`: weight `[out, in]`, optional bias `[out]`; input `[batch, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weights.
    pub weight: ArrayD<f32>,
    /// Bias.
    pub bias: Option<ArrayD<f32>>,
    /// Activation fused into this layer.
    pub activation: FusedAct,
}

impl Linear {
    /// Zero weights `[out, in]` and bias.
    pub fn new(in_features: usize, out_features: usize) -> Self {
        Linear {
            weight: ArrayD::zeros(IxDyn(&[out_features, in_features])),
            bias: Some(ArrayD::zeros(IxDyn(&[out_features]))),
            activation: FusedAct::None,
        }
    }
}

/// A linear layer's rows and output shape for an input of shape `s`: every dimension but the
/// last (`in_features` = `k`) counts rows, as `nn.Linear` takes `[batch, tokens, features]`;
/// the output has `n` features instead.
fn rows_of(kind: &'static str, s: &[usize], k: usize, n: usize) -> Result<(usize, Vec<usize>)> {
    match s.split_last() {
        Some((&kin, lead)) if !lead.is_empty() && kin == k => {
            Ok((lead.iter().product(), lead.iter().copied().chain([n]).collect()))
        }
        _ => Err(shape_error(kind, format!("[.., {k}]: at least 2-D, the last dimension in_features {k}"), s)),
    }
}

impl Linear {
    /// `(rows, output shape)` for an input of shape `s`.
    fn out_dims(&self, s: &[usize]) -> Result<(usize, Vec<usize>)> {
        rows_of("Linear", s, self.weight.shape()[1], self.weight.shape()[0])
    }

    /// The float weights, bias and activation packed for the kernels: a 1x1 convolution of
    /// one-pixel images.
    fn pack_f32(&self) -> Result<PackedConv2dF32> {
        let &[n, k] = self.weight.shape() else {
            return Err(shape_error("Linear", "a layer whose weight is 2-D [out, in]".into(), self.weight.shape()));
        };
        let w = self.weight.as_standard_layout();
        let bias = self.bias.as_ref().map(|b| b.iter().copied().collect::<Vec<f32>>());
        PackedConv2dF32::new(
            w.as_slice().expect("standard layout"),
            WeightLayout::Oihw,
            (n, k, 1, 1),
            bias.as_deref(),
            Conv2dGeometry::default(),
            self.activation.kernel(),
        )
        .map_err(op_err)
    }
}

/// A float linear layer through packed weights, on `[.., in]` inputs.
fn float_linear(p: &PackedConv2dF32, x: &ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
    let (k, n) = (p.in_channels(), p.out_channels());
    let (m, out_shape) = rows_of("Linear", x.shape(), k, n)?;
    let xs = x.as_standard_layout();
    let mut out = crate::scratch::take_f32(m * n);
    p.forward(xs.as_slice().expect("standard layout"), (m, 1, 1, k), &mut out, threads).map_err(op_err)?;
    Ok(ArrayD::from_shape_vec(IxDyn(&out_shape), out).expect("m x n"))
}

/// [`Linear`]'s weights packed once, for calibration and float fallbacks.
#[derive(Debug)]
struct LinearF32(PackedConv2dF32);

impl FloatKernel for LinearF32 {
    fn forward(&self, x: &ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        float_linear(&self.0, x, threads)
    }
}

impl Module for Linear {
    fn kind(&self) -> &'static str {
        "Linear"
    }

    fn lowering(&self) -> Mode {
        Mode::Int8
    }

    fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        let wq = quantize_weights(cx.name, &self.weight, cx.cfg)?;
        let bias: Option<Vec<f32>> = self.bias.as_ref().map(|b| b.iter().copied().collect());
        let packed = PackedLinear::new(&wq, bias.as_deref())
            .map_err(|e| NnError::Op { module: cx.name.to_string(), source: e })?;
        let oq = cx.out_q();
        let out = OutputQuant { scale: oq.scale, zero_point: oq.zero_point, activation: self.activation.kernel() };
        Ok(Box::new(LinearOp { packed: Box::new(packed), out, activation: self.activation }))
    }

    fn has_dynamic(&self) -> bool {
        true
    }

    fn lower_dynamic(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        let how = match cx.cfg.dynamic {
            Some(qobserve::Dynamic::PerTensor { reduce_range }) => DynamicActivations::PerTensor { reduce_range },
            Some(qobserve::Dynamic::PerToken { reduce_range }) => DynamicActivations::PerToken { reduce_range },
            None => unreachable!("lowered dynamically only when configured so"),
        };
        let wq = quantize_weights(cx.name, &self.weight, cx.cfg)?;
        let bias: Option<Vec<f32>> = self.bias.as_ref().map(|b| b.iter().copied().collect());
        let packed = PackedLinear::new(&wq, bias.as_deref())
            .map_err(|e| NnError::Op { module: cx.name.to_string(), source: e })?;
        Ok(Box::new(DynamicLinearOp { packed: Box::new(packed), how, activation: self.activation }))
    }

    fn computes_images_apart(&self) -> bool {
        true
    }

    fn save(&self, node: &str, w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(attrs(&FloatLinearAttrs {
            weight: super::conv::save_f32(node, "weight", &self.weight, w),
            bias: self.bias.as_ref().map(|b| super::conv::save_f32(node, "bias", b, w)),
            activation: self.activation,
        })))
    }

    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(self.out_dims(input).map(|(_, shape)| shape))
    }

    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.out_dims(x.shape())?;
        float_linear(&self.pack_f32()?, x, 1)
    }

    fn float_kernel(&self) -> Option<Result<std::sync::Arc<dyn FloatKernel>>> {
        Some(self.pack_f32().map(|p| std::sync::Arc::new(LinearF32(p)) as std::sync::Arc<dyn FloatKernel>))
    }

    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        let mut v = vec![("weight", &self.weight)];
        if let Some(b) = &self.bias {
            v.push(("bias", b));
        }
        v
    }

    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        let mut v = vec![("weight", &mut self.weight)];
        if let Some(b) = &mut self.bias {
            v.push(("bias", b));
        }
        v
    }

    any_methods!();
}

/// The int8 linear layer: packed weights.
#[derive(Debug)]
pub struct LinearOp {
    packed: Box<PackedLinear>,
    out: OutputQuant,
    activation: FusedAct,
}

/// The saved form of a [`LinearOp`].
#[derive(Serialize, Deserialize)]
struct LinearAttrs {
    /// `[out, in]` `i8` weights.
    weight: String,
    scales: String,
    zero_points: String,
    per_channel: bool,
    bias: Option<String>,
    out_q: SavedQ,
    activation: FusedAct,
}

pub(crate) const OP: (&str, super::OpLoader) = ("Linear", load);

fn load(j: &J, r: &OpReader<'_>, node: &str) -> Result<Box<dyn QOp>> {
    let a: LinearAttrs = parse(j, node, "Linear")?;
    let weights = load_weights(r, &a.weight, &a.scales, &a.zero_points, a.per_channel)?;
    let bias = a.bias.as_deref().map(|k| r.f32s(k).map(|v| v.1)).transpose()?;
    let packed = PackedLinear::new(&weights, bias.as_deref()).map_err(|e| bad(format!("{node}: {e}")))?;
    let q = a.out_q.0;
    let out = OutputQuant { scale: q.scale, zero_point: q.zero_point, activation: a.activation.kernel() };
    Ok(Box::new(LinearOp { packed: Box::new(packed), out, activation: a.activation }))
}

impl QOp for LinearOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }

    fn macs(&self, out_shape: &[usize]) -> Option<u64> {
        Some(out_shape.iter().product::<usize>() as u64 * self.packed.weights().k() as u64)
    }

    fn kernel(&self) -> Option<String> {
        Some(format!("linear GEMM, {}", self.packed.weights().kernel()))
    }

    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, run: Run) -> Result<Value> {
        let (data, shape, q) = quantized(args.pop().expect("one input"), in_q)?;
        let n = self.packed.weights().n();
        let k = self.packed.weights().k();
        // Rows of features, the last axis: row-major in int8 but for 4-D values, stored NHWC,
        // which are read in logical order and written back.
        let data = Input::new(super::shape::logical_vec(data, &shape));
        let (m, out_shape) = rows_of("Linear", &shape, k, n)?;
        let mut y = out_buf(&out_shape, run, "Linear")?;
        let a = QMatrix { data: &data, m, k, lda: k, scale: q.scale, zero_point: q.zero_point };
        self.packed
            .forward(&a, GemmOutput::U8 { data: &mut y, ldc: n, quant: self.out }, run.threads)
            .map_err(op_err)?;
        let y = super::shape::stored_vec(y, &out_shape);
        Ok(Value::U8 {
            data: y,
            shape: out_shape,
            q: QuantU8 { scale: self.out.scale, zero_point: self.out.zero_point },
        })
    }

    fn out_q(&self) -> Option<QuantU8> {
        Some(QuantU8 { scale: self.out.scale, zero_point: self.out.zero_point })
    }

    fn quantizes_input(&self, _k: usize, in_q: QuantU8) -> Option<QuantU8> {
        Some(in_q)
    }

    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J> {
        let (weight, scales, zero_points, per_channel, bias) = save_packed(node, &self.packed, w)?;
        Ok(attrs(&LinearAttrs {
            weight,
            scales,
            zero_points,
            per_channel,
            bias,
            out_q: QuantU8 { scale: self.out.scale, zero_point: self.out.zero_point }.into(),
            activation: self.activation,
        }))
    }

    fn weight_sqnr(&self, float: &dyn Module) -> Option<f64> {
        weight_sqnr(&self.packed, float)
    }

    any_methods!();
}

/// A dynamically quantized linear layer: int8 weights, the float input quantized on each
/// call ([`PackedLinear::forward_dynamic`]), float output, then its fused activation.
#[derive(Debug)]
pub struct DynamicLinearOp {
    packed: Box<PackedLinear>,
    how: DynamicActivations,
    activation: FusedAct,
}

/// How a saved [`DynamicLinearOp`] quantizes its input.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::enum_variant_names)] // the saved names say what they are
enum SavedDynamic {
    PerTensor,
    PerTensorReduced,
    PerToken,
    PerTokenReduced,
}

/// The saved form of a [`DynamicLinearOp`].
#[derive(Serialize, Deserialize)]
struct DynamicLinearAttrs {
    weight: String,
    scales: String,
    zero_points: String,
    per_channel: bool,
    bias: Option<String>,
    activations: SavedDynamic,
    activation: FusedAct,
}

pub(crate) const DYNAMIC_OP: (&str, super::OpLoader) = ("LinearDynamic", load_dynamic);

fn load_dynamic(j: &J, r: &OpReader<'_>, node: &str) -> Result<Box<dyn QOp>> {
    let a: DynamicLinearAttrs = parse(j, node, "LinearDynamic")?;
    let weights = load_weights(r, &a.weight, &a.scales, &a.zero_points, a.per_channel)?;
    let bias = a.bias.as_deref().map(|k| r.f32s(k).map(|v| v.1)).transpose()?;
    let packed = PackedLinear::new(&weights, bias.as_deref()).map_err(|e| bad(format!("{node}: {e}")))?;
    let how = match a.activations {
        SavedDynamic::PerTensor => DynamicActivations::PerTensor { reduce_range: false },
        SavedDynamic::PerTensorReduced => DynamicActivations::PerTensor { reduce_range: true },
        SavedDynamic::PerToken => DynamicActivations::PerToken { reduce_range: false },
        SavedDynamic::PerTokenReduced => DynamicActivations::PerToken { reduce_range: true },
    };
    Ok(Box::new(DynamicLinearOp { packed: Box::new(packed), how, activation: a.activation }))
}

/// The weights of a packed layer as saved: `[n, k]` `i8` with their parameters.
fn save_packed(
    node: &str,
    packed: &PackedLinear,
    w: &mut OpWriter,
) -> Result<(String, String, String, bool, Option<String>)> {
    let pw = packed.weights();
    let weight = w.i8s(format!("{node}.weight_int8"), vec![pw.n(), pw.k()], pw.raw());
    let params = if pw.is_per_channel() {
        QParams::per_channel(pw.scales().to_vec(), pw.zero_points().to_vec(), 0)
    } else {
        QParams::per_tensor(pw.scales()[0], pw.zero_points()[0])
    }
    .map_err(|e| NnError::Op { module: node.into(), source: e })?;
    let (scales, zero_points) = save_weight_params(node, &params, pw.n(), w);
    let bias = packed.bias().map(|b| w.f32s(format!("{node}.bias"), vec![b.len()], b));
    Ok((weight, scales, zero_points, pw.is_per_channel(), bias))
}

impl QOp for DynamicLinearOp {
    fn op_name(&self) -> &'static str {
        DYNAMIC_OP.0
    }

    fn macs(&self, out_shape: &[usize]) -> Option<u64> {
        Some(out_shape.iter().product::<usize>() as u64 * self.packed.weights().k() as u64)
    }

    fn kernel(&self) -> Option<String> {
        Some(format!("linear GEMM, {}", self.packed.weights().kernel()))
    }

    fn images_apart(&self) -> bool {
        // Per tensor, one range spans the whole batch: its images are not independent.
        matches!(self.how, DynamicActivations::PerToken { .. })
    }

    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        // A quantized input (from an int8 producer) is dequantized first: this layer
        // chooses its own parameters.
        let x = args.pop().expect("one input").into_f32();
        let (k, n) = (self.packed.weights().k(), self.packed.weights().n());
        let (rows, out_shape) = rows_of("LinearDynamic", x.shape(), k, n)?;
        crate::quant::budget(&out_shape, 4, run, "LinearDynamic")?;
        let xs = x.as_standard_layout();
        let mut y = crate::scratch::take_f32(rows * n);
        self.packed
            .forward_dynamic(xs.as_slice().expect("standard layout"), rows, &mut y, self.how, false, run.threads)
            .map_err(op_err)?;
        drop(xs);
        crate::scratch::recycle_f32(x);
        let mut y = ArrayD::from_shape_vec(IxDyn(&out_shape), y).expect("rows x out_features");
        self.activation.apply(&mut y);
        Ok(Value::F32(y))
    }

    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J> {
        let (weight, scales, zero_points, per_channel, bias) = save_packed(node, &self.packed, w)?;
        let activations = match self.how {
            DynamicActivations::PerTensor { reduce_range: false } => SavedDynamic::PerTensor,
            DynamicActivations::PerTensor { reduce_range: true } => SavedDynamic::PerTensorReduced,
            DynamicActivations::PerToken { reduce_range: false } => SavedDynamic::PerToken,
            DynamicActivations::PerToken { reduce_range: true } => SavedDynamic::PerTokenReduced,
        };
        Ok(attrs(&DynamicLinearAttrs {
            weight,
            scales,
            zero_points,
            per_channel,
            bias,
            activations,
            activation: self.activation,
        }))
    }

    fn weight_sqnr(&self, float: &dyn Module) -> Option<f64> {
        weight_sqnr(&self.packed, float)
    }

    any_methods!();
}

/// SQNR of a packed layer's int8 weights against the float layer's.
fn weight_sqnr(packed: &PackedLinear, float: &dyn Module) -> Option<f64> {
    let lin = float.as_any().downcast_ref::<Linear>()?;
    let pw = packed.weights();
    let (n, k) = (pw.n(), pw.k());
    let deq: Vec<f32> =
        (0..n * k).map(|i| pw.scales()[i / k] * (pw.raw()[i] as i32 - pw.zero_points()[i / k]) as f32).collect();
    Some(crate::quant::sqnr_db(&lin.weight, &ArrayD::from_shape_vec(IxDyn(&[n, k]), deq).ok()?))
}

/// The saved form of a float `Linear` (kept in float by the configuration).
#[derive(Serialize, Deserialize)]
struct FloatLinearAttrs {
    weight: String,
    bias: Option<String>,
    activation: FusedAct,
}

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[("Linear", |j, r| {
    let a: FloatLinearAttrs = parse(j, "Linear", "Linear")?;
    let weight = super::conv::load_f32(r, &a.weight)?;
    if weight.ndim() != 2 {
        return Err(bad(format!("{}: a Linear weight is 2-D, not {:?}", a.weight, weight.shape())));
    }
    Ok(Box::new(Linear {
        weight,
        bias: a.bias.as_deref().map(|k| super::conv::load_f32(r, k)).transpose()?,
        activation: a.activation,
    }))
})];
