//! `Conv2d`: the float layer, and its int8 form (a packed convolution with the
//! requantization, bias and fused ReLU / ReLU6 in its epilogue).

use ndarray::{ArrayD, IxDyn};
use qkernels::{Conv2dGeometry, OutputQuant, PackedConv2d, PackedConv2dF32, QuantU8, WeightLayout};
use qtensor::{DType, QParams, QTensor, QuantRange};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::add::AddOp;
use super::{attrs, bad, nchw_of, op_err, parse, LowerCx, OpReader, OpWriter, QOp, SavedQ};
use crate::error::Result;
use crate::layers::{from_nhwc, nchw, shape_error, to_nhwc, FusedAct};
use crate::module::{FloatKernel, Module};
use crate::quant::{out_buf, quantize_weights, quantized, Mode, Run, Value};
use crate::scratch::Input;

/// `nn.Conv2d`: weight `[out, in / groups, kh, kw]` (OIHW), optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Weights, OIHW.
    pub weight: ArrayD<f32>,
    /// Bias.
    pub bias: Option<ArrayD<f32>>,
    /// Stride, padding, dilation, groups.
    pub geom: Conv2dGeometry,
    /// Activation fused into this layer.
    pub activation: FusedAct,
}

impl Conv2d {
    /// Zero weights of shape `[out, in / groups, k, k]`, a zero bias, stride 1, no padding.
    pub fn new(in_channels: usize, out_channels: usize, k: usize) -> Self {
        Conv2d {
            weight: ArrayD::zeros(IxDyn(&[out_channels, in_channels, k, k])),
            bias: Some(ArrayD::zeros(IxDyn(&[out_channels]))),
            geom: Conv2dGeometry::default(),
            activation: FusedAct::None,
        }
    }
    /// With a stride.
    pub fn stride(mut self, s: usize) -> Self {
        self.geom.stride = [s, s];
        self
    }
    /// With padding.
    pub fn padding(mut self, p: usize) -> Self {
        self.geom.padding = [p, p];
        self
    }
    /// With dilation.
    pub fn dilation(mut self, d: usize) -> Self {
        self.geom.dilation = [d, d];
        self
    }
    /// With groups (the weight's input dimension shrinks accordingly).
    pub fn groups(mut self, g: usize) -> Self {
        let s = self.weight.shape().to_vec();
        self.geom.groups = g;
        self.weight = ArrayD::zeros(IxDyn(&[s[0], s[1] / g.max(1), s[2], s[3]]));
        self
    }
    /// Without a bias.
    pub fn no_bias(mut self) -> Self {
        self.bias = None;
        self
    }
    /// `[n, out channels, out height, out width]` for an input of shape `s`.
    fn out_dims(&self, s: &[usize]) -> Result<[usize; 4]> {
        let [n, c, h, w] = *s else {
            return Err(shape_error("Conv2d", "a 4-D NCHW tensor [batch, channels, height, width]".into(), s));
        };
        let ws = self.weight.shape();
        let &[oc, icg, kh, kw] = ws else {
            return Err(shape_error("Conv2d", format!("a layer whose weight is 4-D (OIHW), not {ws:?}"), s));
        };
        let g = &self.geom;
        if kh == 0 || kw == 0 || g.groups == 0 || g.stride.contains(&0) || g.dilation.contains(&0) {
            return Err(shape_error(
                "Conv2d",
                format!(
                    "a layer with a kernel of at least 1x1 and positive stride, dilation and groups, not kernel \
                     {kh}x{kw}, stride {:?}, dilation {:?}, groups {}",
                    g.stride, g.dilation, g.groups
                ),
                s,
            ));
        }
        if icg.checked_mul(g.groups) != Some(c) {
            return Err(shape_error(
                "Conv2d",
                format!(
                    "{} input channels (weight {ws:?}, groups {}); check the previous layer's output channels",
                    icg * self.geom.groups,
                    self.geom.groups
                ),
                s,
            ));
        }
        // Spans and padded sizes checked for overflow: a saved layer may declare anything.
        let span = |k: usize, d: usize| d.checked_mul(k - 1).and_then(|v| v.checked_add(1));
        let padded = |x: usize, p: usize| p.checked_mul(2).and_then(|p2| x.checked_add(p2));
        let (Some(sh), Some(sw), Some(ph), Some(pw)) =
            (span(kh, g.dilation[0]), span(kw, g.dilation[1]), padded(h, g.padding[0]), padded(w, g.padding[1]))
        else {
            return Err(shape_error("Conv2d", format!("a geometry whose sizes fit in memory, not {g:?}"), s));
        };
        if ph < sh || pw < sw {
            return Err(shape_error(
                "Conv2d",
                format!("an input of at least {kh}x{kw} (with padding {:?})", g.padding),
                s,
            ));
        }
        let oh = (ph - sh) / g.stride[0] + 1;
        let ow = (pw - sw) / g.stride[1] + 1;
        Ok([n, oc, oh, ow])
    }

    /// The float weights, bias and activation packed for the kernels.
    fn pack_f32(&self) -> Result<PackedConv2dF32> {
        let &[oc, icg, kh, kw] = self.weight.shape() else {
            return Err(shape_error("Conv2d", "a layer whose weight is 4-D (OIHW)".into(), self.weight.shape()));
        };
        let w = self.weight.as_standard_layout();
        let bias = self.bias.as_ref().map(|b| b.iter().copied().collect::<Vec<f32>>());
        PackedConv2dF32::new(
            w.as_slice().expect("standard layout"),
            WeightLayout::Oihw,
            (oc, icg, kh, kw),
            bias.as_deref(),
            self.geom,
            self.activation.kernel(),
        )
        .map_err(op_err)
    }

    /// The factor and the term of a depthwise 1x1 convolution of stride 1 without padding
    /// whose channels all share one finite weight and one finite bias (`x * k + b` with scalar
    /// constants, as ONNX imports it): a scalar affine map.
    fn uniform_affine(&self) -> Option<(f32, f32)> {
        let c = self.weight.shape().first().copied()?;
        let g = self.geom;
        let depthwise =
            self.weight.shape() == [c, 1, 1, 1] && g.groups == c && g.stride == [1, 1] && g.padding == [0, 0];
        let scale = *self.weight.iter().next()?;
        let shift = self.bias.as_ref().map_or(Some(0.0), |b| b.iter().next().copied())?;
        let same = |a: &ArrayD<f32>, v: f32| a.iter().all(|x| x.to_bits() == v.to_bits());
        let uniform = same(&self.weight, scale) && self.bias.as_ref().is_none_or(|b| same(b, shift));
        (depthwise && uniform && scale.is_finite() && shift.is_finite()).then_some((scale, shift))
    }

    /// Whether its int8 form under `cfg` is one table of its scalar affine map (its weights
    /// are not quantized): a scalar affine map without a weight quantizer of the
    /// application's own.
    pub(crate) fn runs_as_table(&self, cfg: &qobserve::QConfig) -> bool {
        self.uniform_affine().is_some() && cfg.weight_quantizer.is_none()
    }

    /// The int8 convolution of its quantized weights (what [`Module::lower`] gives unless the
    /// layer is a scalar affine map).
    pub(crate) fn lower_conv(&self, cx: &LowerCx<'_>) -> Result<ConvOp> {
        let op_err = |e| crate::NnError::Op { module: cx.name.to_string(), source: e };
        let wq = quantize_weights(cx.name, &self.weight, cx.cfg)?;
        let ohwi = wq.int_repr().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned();
        let weights = QTensor::from_int_repr(ohwi, wq.params().clone(), wq.range()).map_err(op_err)?;
        let bias: Option<Vec<f32>> = self.bias.as_ref().map(|b| b.iter().copied().collect());
        let packed = Box::new(PackedConv2d::new(&weights, bias.as_deref(), self.geom).map_err(op_err)?);
        let oq = cx.out_q();
        let out = OutputQuant { scale: oq.scale, zero_point: oq.zero_point, activation: self.activation.kernel() };
        Ok(ConvOp { packed, weights, bias, geom: self.geom, out, activation: self.activation })
    }

    /// The weights as OHWI, the kernels' layout.
    pub fn weight_ohwi(&self) -> ArrayD<f32> {
        let s = self.weight.shape();
        match (s, self.weight.as_slice()) {
            (&[o, i, kh, kw], Some(w)) => {
                let t = crate::layers::transpose_batched(w, o, i, kh * kw);
                ArrayD::from_shape_vec(IxDyn(&[o, kh, kw, i]), t).expect("length matches the shape")
            }
            _ => self.weight.view().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned(),
        }
    }
}

impl Module for Conv2d {
    fn kind(&self) -> &'static str {
        "Conv2d"
    }

    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(self.out_dims(input).map(Vec::from))
    }

    fn lowering(&self) -> Mode {
        Mode::Int8
    }

    fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        if let Some((scale, shift)) = self.uniform_affine().filter(|_| self.runs_as_table(cx.cfg)) {
            // One weight and one bias for every channel: the same map on every code, one table
            // (exact to the output's rounding; the weight quantized would lose up to half a
            // step). No weight is quantized, so the weight observer has nothing to choose; a
            // quantizer of the application's own is honoured on the convolution's path.
            let (min, max) = super::activation::act_bounds(self.activation);
            let op = qkernels::UnaryOp::Affine { scale, shift, min, max };
            return Ok(Box::new(super::activation::LutOp::new(op, cx.in_q, cx.out_q())));
        }
        Ok(Box::new(self.lower_conv(cx)?))
    }

    fn computes_images_apart(&self) -> bool {
        true
    }

    fn save(&self, node: &str, w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(self.save_float(node, w)))
    }

    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.out_dims(x.shape())?;
        float_conv(&self.pack_f32()?, x, 1)
    }

    fn float_kernel(&self) -> Option<Result<std::sync::Arc<dyn FloatKernel>>> {
        Some(self.pack_f32().map(|p| std::sync::Arc::new(ConvF32(p)) as std::sync::Arc<dyn FloatKernel>))
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

/// A float convolution through packed weights: NCHW in, NCHW out (with NHWC strides, as
/// the kernels write it).
fn float_conv(p: &PackedConv2dF32, x: &ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
    let [n, c, h, w] = nchw("Conv2d", x, "[batch, channels, height, width]")?;
    let (oh, ow) = p.output_hw(h, w).map_err(op_err)?;
    let mut out = crate::scratch::take_f32(n * oh * ow * p.out_channels());
    p.forward(&to_nhwc(x), (n, h, w, c), &mut out, threads).map_err(op_err)?;
    Ok(from_nhwc(out, [n, oh, ow, p.out_channels()]))
}

/// [`Conv2d`]'s weights packed once, for calibration and float fallbacks.
#[derive(Debug)]
struct ConvF32(PackedConv2dF32);

impl FloatKernel for ConvF32 {
    fn forward(&self, x: &ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        let got = x.shape();
        if got.len() != 4 || got[1] != self.0.in_channels() {
            return Err(shape_error(
                "Conv2d",
                format!("a 4-D NCHW tensor of {} channels [batch, channels, height, width]", self.0.in_channels()),
                got,
            ));
        }
        float_conv(&self.0, x, threads)
    }
}

/// The int8 convolution: packed weights (and what they were packed from, to save them).
#[derive(Debug)]
pub struct ConvOp {
    packed: Box<PackedConv2d>,
    /// OHWI int8 weights with their parameters.
    weights: QTensor<i8>,
    bias: Option<Vec<f32>>,
    geom: Conv2dGeometry,
    out: OutputQuant,
    activation: FusedAct,
}

/// The saved form of a [`ConvOp`] (its tensors are named by the keys).
#[derive(Serialize, Deserialize)]
struct ConvAttrs {
    /// OHWI `i8` weights.
    weight: String,
    /// Per output channel (or one) scales and zero points.
    scales: String,
    zero_points: String,
    per_channel: bool,
    bias: Option<String>,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    out_q: SavedQ,
    activation: FusedAct,
}

/// Saves int8 weights' parameters; returns the keys.
pub(crate) fn save_weight_params(node: &str, params: &QParams, n: usize, w: &mut OpWriter) -> (String, String) {
    let scales: Vec<f32> = (0..n).map(|c| params.scale(c)).collect();
    let zps: Vec<i32> = (0..n).map(|c| params.zero_point(c)).collect();
    (w.f32s(format!("{node}.weight_scales"), vec![n], &scales), w.i32s(format!("{node}.weight_zero_points"), &zps))
}

/// Loads int8 weights saved with [`save_weight_params`].
pub(crate) fn load_weights(
    r: &OpReader<'_>,
    weight: &str,
    scales: &str,
    zero_points: &str,
    per_channel: bool,
) -> Result<QTensor<i8>> {
    let (shape, data) = r.i8s(weight)?;
    let (_, scales) = r.f32s(scales)?;
    let zps = r.i32s(zero_points)?;
    let params = if per_channel {
        QParams::per_channel(scales, zps, 0)
    } else {
        match (scales.first(), zps.first()) {
            (Some(&s), Some(&z)) => QParams::per_tensor(s, z),
            _ => return Err(bad(format!("{weight}: weight parameters are empty"))),
        }
    }
    .map_err(|e| bad(format!("{weight}: {e}")))?;
    let arr = ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| bad(format!("{weight}: {e}")))?;
    QTensor::from_int_repr(arr, params, QuantRange::full(DType::I8)).map_err(|e| bad(format!("{weight}: {e}")))
}

pub(crate) const OP: (&str, super::OpLoader) = ("Conv2d", load);

fn load(j: &J, r: &OpReader<'_>, node: &str) -> Result<Box<dyn QOp>> {
    Ok(Box::new(load_conv(j, r, node)?))
}

/// A saved [`ConvOp`] (also the 1x1 convolution inside an int8 transposed convolution).
pub(crate) fn load_conv(j: &J, r: &OpReader<'_>, node: &str) -> Result<ConvOp> {
    let a: ConvAttrs = parse(j, node, "Conv2d")?;
    let weights = load_weights(r, &a.weight, &a.scales, &a.zero_points, a.per_channel)?;
    let bias = a.bias.as_deref().map(|k| r.f32s(k).map(|v| v.1)).transpose()?;
    let geom = Conv2dGeometry { stride: a.stride, padding: a.padding, dilation: a.dilation, groups: a.groups };
    let packed = Box::new(PackedConv2d::new(&weights, bias.as_deref(), geom).map_err(|e| bad(format!("{node}: {e}")))?);
    let q = a.out_q.0;
    let out = OutputQuant { scale: q.scale, zero_point: q.zero_point, activation: a.activation.kernel() };
    Ok(ConvOp { packed, weights, bias, geom, out, activation: a.activation })
}

impl ConvOp {
    /// Runs the convolution on an int8 image (`shape` NCHW, stored NHWC).
    fn forward_image(&self, data: &[u8], shape: &[usize], q: QuantU8, run: Run) -> Result<Value> {
        let [n, _, h, w] = nchw_of(shape, "Conv2d")?;
        let (oh, ow) = self.packed.output_hw(h, w).map_err(op_err)?;
        let oc = self.packed.out_channels();
        let mut y = out_buf(&[n, oh, ow, oc], run, "Conv2d")?;
        self.packed.forward_u8(&Value::image(data, shape, q), self.out, &mut y, run.threads).map_err(op_err)?;
        Ok(Value::U8 {
            data: y,
            shape: vec![n, oc, oh, ow],
            q: QuantU8 { scale: self.out.scale, zero_point: self.out.zero_point },
        })
    }

    /// Its output channels, when it is a 1x1 convolution of stride 1 without padding or
    /// groups.
    pub(crate) fn pointwise_outputs(&self) -> Option<usize> {
        let &[oc, kh, kw, _] = self.weights.shape() else { return None };
        let g = self.geom;
        let plain = g.stride == [1, 1] && g.padding == [0, 0] && g.groups == 1;
        (kh == 1 && kw == 1 && plain).then_some(oc)
    }

    /// Runs the convolution and then `add` on its output, fused
    /// ([`qkernels::PackedConv2d::forward_u8_add`]): the same bits as running it and then the
    /// addition. `other` is the addition's other operand and its position among the
    /// addition's inputs. An operand of another shape (one broadcast over the pixels) runs the
    /// two one after the other.
    pub(crate) fn run_add(
        &self,
        args: &mut Vec<Value>,
        in_q: QuantU8,
        run: Run,
        add: &AddOp,
        (other, other_pos): (Value, usize),
    ) -> Result<Value> {
        let [_, _, out_q] = add.params();
        let fits = |shape: &[usize]| {
            let [n, _, h, w] = shape[..] else { return None };
            let (oh, ow) = self.packed.output_hw(h, w).ok()?;
            Some(vec![n, self.packed.out_channels(), oh, ow])
        };
        let out_shape = args.last().and_then(|x| fits(x.shape()));
        if !add.int8 || out_shape.as_deref() != Some(other.shape()) {
            let y = self.run(args, in_q, run)?;
            args.extend(if other_pos == 0 { [other, y] } else { [y, other] });
            return add.run(args, in_q, run);
        }
        let (od, _, oq) = quantized(other, add.params()[other_pos])?;
        let od = Input::new(od);
        let (data, shape, q) = quantized(args.pop().expect("one input"), in_q)?;
        let data = Input::new(data);
        let [n, oc, oh, ow] = out_shape.expect("checked above")[..] else { unreachable!("4-D") };
        let mut y = out_buf(&[n, oh, ow, oc], run, "Conv2d")?;
        let residual = qkernels::ResidualAdd { other: &od, other_q: oq, out_q, relu: add.relu };
        self.packed
            .forward_u8_add(&Value::image(&data, &shape, q), self.out, residual, &mut y, run.threads)
            .map_err(op_err)?;
        Ok(Value::U8 { data: y, shape: vec![n, oc, oh, ow], q: out_q })
    }
}

impl QOp for ConvOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }

    fn kernel(&self) -> Option<String> {
        Some(self.packed.kernel())
    }

    fn macs(&self, out_shape: &[usize]) -> Option<u64> {
        // OHWI weights: each output element takes `kh * kw * in / groups` products.
        let per_output = self.weights.len() / self.weights.shape()[0].max(1);
        Some(out_shape.iter().product::<usize>() as u64 * per_output as u64)
    }

    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, run: Run) -> Result<Value> {
        let (data, shape, q) = quantized(args.pop().expect("one input"), in_q)?;
        let data = Input::new(data);
        self.forward_image(&data, &shape, q, run)
    }

    /// An int8 input that other nodes still read (a residual block's input, read by its
    /// first convolution and by its shortcut) is read where it is, not copied.
    fn run_borrowed(&self, x: &Value, run: Run) -> Option<Result<Value>> {
        match x {
            Value::U8 { data, shape, q } => Some(self.forward_image(data, shape, *q, run)),
            Value::F32(_) => None,
        }
    }

    fn out_q(&self) -> Option<QuantU8> {
        Some(QuantU8 { scale: self.out.scale, zero_point: self.out.zero_point })
    }

    fn quantizes_input(&self, _k: usize, in_q: QuantU8) -> Option<QuantU8> {
        Some(in_q)
    }

    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J> {
        let shape = self.weights.shape().to_vec();
        let weight = w.i8s(format!("{node}.weight_int8"), shape.clone(), self.weights.as_slice());
        let (scales, zero_points) = save_weight_params(node, self.weights.params(), shape[0], w);
        let bias = self.bias.as_ref().map(|b| w.f32s(format!("{node}.bias"), vec![b.len()], b));
        let g = self.geom;
        Ok(attrs(&ConvAttrs {
            weight,
            scales,
            zero_points,
            per_channel: self.weights.params().axis().is_some(),
            bias,
            stride: g.stride,
            padding: g.padding,
            dilation: g.dilation,
            groups: g.groups,
            out_q: QuantU8 { scale: self.out.scale, zero_point: self.out.zero_point }.into(),
            activation: self.activation,
        }))
    }

    fn weight_sqnr(&self, float: &dyn Module) -> Option<f64> {
        let float = float.as_any().downcast_ref::<Conv2d>()?.weight_ohwi();
        Some(crate::quant::sqnr_db(&float, &self.weights.dequantize()))
    }

    any_methods!();
}

/// The saved form of a float `Conv2d` (kept in float by the configuration).
#[derive(Serialize, Deserialize)]
struct FloatConvAttrs {
    weight: String,
    bias: Option<String>,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    activation: FusedAct,
}

/// Stores a float tensor under `{node}.{name}`; returns the key.
pub(crate) fn save_f32(node: &str, name: &str, a: &ArrayD<f32>, w: &mut OpWriter) -> String {
    w.f32s(format!("{node}.{name}"), a.shape().to_vec(), &a.iter().copied().collect::<Vec<_>>())
}

/// Loads a float tensor stored by [`save_f32`].
pub(crate) fn load_f32(r: &OpReader<'_>, key: &str) -> Result<ArrayD<f32>> {
    let (shape, v) = r.f32s(key)?;
    ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| bad(format!("{key}: {e}")))
}

impl Conv2d {
    fn save_float(&self, node: &str, w: &mut OpWriter) -> J {
        let g = self.geom;
        attrs(&FloatConvAttrs {
            weight: save_f32(node, "weight", &self.weight, w),
            bias: self.bias.as_ref().map(|b| save_f32(node, "bias", b, w)),
            stride: g.stride,
            padding: g.padding,
            dilation: g.dilation,
            groups: g.groups,
            activation: self.activation,
        })
    }
}

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[("Conv2d", |j, r| {
    let a: FloatConvAttrs = parse(j, "Conv2d", "Conv2d")?;
    let weight = load_f32(r, &a.weight)?;
    if weight.ndim() != 4 {
        return Err(bad(format!("{}: a Conv2d weight is 4-D, not {:?}", a.weight, weight.shape())));
    }
    Ok(Box::new(Conv2d {
        weight,
        bias: a.bias.as_deref().map(|k| load_f32(r, k)).transpose()?,
        geom: Conv2dGeometry { stride: a.stride, padding: a.padding, dilation: a.dilation, groups: a.groups },
        activation: a.activation,
    }))
})];
