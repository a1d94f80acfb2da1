//! The float layers, with PyTorch's parameter names and shapes so `state_dict`s load
//! unchanged: `Conv2d`, `BatchNorm2d`, `Linear`, activations, pooling, `Flatten`, `Identity`.

use std::any::Any;

use ndarray::{ArrayD, IxDyn};
use qkernels::{conv2d_f32, linear_f32, Conv2dGeometry};

use crate::error::{NnError, Result};
use crate::module::Module;

fn shape_err(kind: &'static str, expected: String, x: &ArrayD<f32>) -> NnError {
    NnError::Shape { module: String::new(), kind, expected, got: x.shape().to_vec() }
}

fn op_err(e: qtensor::QError) -> NnError {
    NnError::Op { module: String::new(), source: e }
}

/// NCHW `[n, c, h, w]` of a 4-D input, or a shape error.
fn nchw(kind: &'static str, x: &ArrayD<f32>, what: &str) -> Result<[usize; 4]> {
    match *x.shape() {
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => Err(shape_err(kind, format!("a 4-D NCHW tensor {what}"), x)),
    }
}

/// NCHW -> NHWC, contiguous.
pub(crate) fn to_nhwc(x: &ArrayD<f32>) -> Vec<f32> {
    x.view().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned().into_raw_vec_and_offset().0
}

/// NHWC data of `[n, h, w, c]` -> NCHW array.
pub(crate) fn from_nhwc(data: Vec<f32>, [n, h, w, c]: [usize; 4]) -> ArrayD<f32> {
    let a = ArrayD::from_shape_vec(IxDyn(&[n, h, w, c]), data).expect("length matches the shape");
    a.permuted_axes(IxDyn(&[0, 3, 1, 2])).as_standard_layout().into_owned()
}

/// An activation fused into the layer before it (by [`crate::fuse()`]): applied to its output,
/// in float as in int8 (where it is a clamp at the output zero point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FusedAct {
    /// None.
    #[default]
    None,
    /// ReLU.
    Relu,
    /// ReLU6.
    Relu6,
}

impl FusedAct {
    pub(crate) fn apply(self, x: &mut ArrayD<f32>) {
        match self {
            FusedAct::None => {}
            FusedAct::Relu => x.mapv_inplace(|v| v.max(0.0)),
            FusedAct::Relu6 => x.mapv_inplace(|v| v.clamp(0.0, 6.0)),
        }
    }

    /// The kernels' fused clamp.
    pub fn kernel(self) -> qkernels::Activation {
        match self {
            FusedAct::None => qkernels::Activation::None,
            FusedAct::Relu => qkernels::Activation::Relu,
            FusedAct::Relu6 => qkernels::Activation::Relu6,
        }
    }
}

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
    /// The weights as OHWI, the kernels' layout.
    pub fn weight_ohwi(&self) -> ArrayD<f32> {
        self.weight.view().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned()
    }
}

impl Module for Conv2d {
    fn kind(&self) -> &'static str {
        "Conv2d"
    }

    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [n, c, h, w] = nchw("Conv2d", x, "[batch, channels, height, width]")?;
        let ws = self.weight.shape();
        let (oc, icg, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
        if c != icg * self.geom.groups {
            return Err(shape_err(
                "Conv2d",
                format!(
                    "{} input channels (weight {ws:?}, groups {}); check the previous layer's output channels",
                    icg * self.geom.groups,
                    self.geom.groups
                ),
                x,
            ));
        }
        let g = &self.geom;
        let span = |k: usize, d: usize| d * (k - 1) + 1;
        if h + 2 * g.padding[0] < span(kh, g.dilation[0]) || w + 2 * g.padding[1] < span(kw, g.dilation[1]) {
            return Err(shape_err(
                "Conv2d",
                format!("an input of at least {kh}x{kw} (with padding {:?})", g.padding),
                x,
            ));
        }
        let oh = (h + 2 * g.padding[0] - span(kh, g.dilation[0])) / g.stride[0] + 1;
        let ow = (w + 2 * g.padding[1] - span(kw, g.dilation[1])) / g.stride[1] + 1;
        let mut out = vec![0.0f32; n * oh * ow * oc];
        let wt = self.weight_ohwi();
        let bias = self.bias.as_ref().map(|b| b.as_slice().expect("contiguous bias").to_vec());
        conv2d_f32(
            &to_nhwc(x),
            (n, h, w, c),
            wt.as_slice().expect("standard layout"),
            (oc, kh, kw),
            bias.as_deref(),
            *g,
            &mut out,
        )
        .map_err(op_err)?;
        let mut y = from_nhwc(out, [n, oh, ow, oc]);
        self.activation.apply(&mut y);
        Ok(y)
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

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// `nn.BatchNorm2d` in inference mode (running statistics).
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    /// Gamma.
    pub weight: ArrayD<f32>,
    /// Beta.
    pub bias: ArrayD<f32>,
    /// Running mean.
    pub running_mean: ArrayD<f32>,
    /// Running variance.
    pub running_var: ArrayD<f32>,
    /// Added to the variance (PyTorch: 1e-5).
    pub eps: f32,
    /// A ReLU / ReLU6 fused after it by [`crate::fuse()`] (PyTorch's `BNReLU2d`).
    pub activation: FusedAct,
}

impl BatchNorm2d {
    /// The identity normalization over `c` channels (weight 1, bias 0, mean 0, var 1).
    pub fn new(c: usize) -> Self {
        BatchNorm2d {
            weight: ArrayD::ones(IxDyn(&[c])),
            bias: ArrayD::zeros(IxDyn(&[c])),
            running_mean: ArrayD::zeros(IxDyn(&[c])),
            running_var: ArrayD::ones(IxDyn(&[c])),
            eps: 1e-5,
            activation: FusedAct::None,
        }
    }

    /// The statistics as `qfuse` takes them.
    pub fn to_fuse(&self) -> qfuse::BatchNorm {
        let v = |a: &ArrayD<f32>| a.iter().copied().collect::<Vec<_>>();
        qfuse::BatchNorm {
            weight: Some(v(&self.weight)),
            bias: Some(v(&self.bias)),
            running_mean: v(&self.running_mean),
            running_var: v(&self.running_var),
            eps: self.eps,
        }
    }
}

impl Module for BatchNorm2d {
    fn kind(&self) -> &'static str {
        "BatchNorm2d"
    }

    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [_, c, _, _] = nchw("BatchNorm2d", x, "[batch, channels, height, width]")?;
        if c != self.running_mean.len() {
            return Err(shape_err("BatchNorm2d", format!("{} channels", self.running_mean.len()), x));
        }
        let mut y = x.clone();
        for (ch, mut plane) in y.axis_iter_mut(ndarray::Axis(1)).enumerate() {
            let inv = 1.0 / (self.running_var[ch] + self.eps).sqrt();
            let alpha = self.weight[ch] * inv;
            let beta = self.bias[ch] - self.running_mean[ch] * alpha;
            plane.mapv_inplace(|v| v * alpha + beta);
        }
        self.activation.apply(&mut y);
        Ok(y)
    }

    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        vec![
            ("weight", &self.weight),
            ("bias", &self.bias),
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
        ]
    }

    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        vec![
            ("weight", &mut self.weight),
            ("bias", &mut self.bias),
            ("running_mean", &mut self.running_mean),
            ("running_var", &mut self.running_var),
        ]
    }

    fn ignored_tensors(&self) -> &'static [&'static str] {
        &["num_batches_tracked"]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

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

impl Module for Linear {
    fn kind(&self) -> &'static str {
        "Linear"
    }

    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let (n, k) = (self.weight.shape()[0], self.weight.shape()[1]);
        let [m, kin] = *x.shape() else {
            return Err(shape_err("Linear", format!("a 2-D [batch, {k}] input; put a Flatten before it"), x));
        };
        if kin != k {
            return Err(shape_err("Linear", format!("[batch, {k}] (in_features {k})"), x));
        }
        let mut out = vec![0.0f32; m * n];
        let xs = x.as_standard_layout();
        let bias = self.bias.as_ref().map(|b| b.iter().copied().collect::<Vec<_>>());
        linear_f32(
            xs.as_slice().expect("standard"),
            m,
            k,
            self.weight.as_slice().expect("standard"),
            n,
            bias.as_deref(),
            &mut out,
        )
        .map_err(op_err)?;
        let mut y = ArrayD::from_shape_vec(IxDyn(&[m, n]), out).expect("m x n");
        self.activation.apply(&mut y);
        Ok(y)
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

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

macro_rules! elementwise {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $f:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $name;

        impl Module for $name {
            fn kind(&self) -> &'static str {
                $kind
            }
            fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
                let f: fn(f32) -> f32 = $f;
                Ok(x.mapv(f))
            }
            fn as_any(&self) -> &dyn Any {
                self
            }
            fn as_any_mut(&mut self) -> &mut dyn Any {
                self
            }
        }
    };
}

elementwise!(
    /// `nn.ReLU`.
    ReLU, "ReLU", |v| v.max(0.0)
);
elementwise!(
    /// `nn.ReLU6`.
    ReLU6, "ReLU6", |v| v.clamp(0.0, 6.0)
);
elementwise!(
    /// `nn.Hardswish`.
    Hardswish, "Hardswish", |v| v * (v + 3.0).clamp(0.0, 6.0) / 6.0
);
elementwise!(
    /// `nn.Sigmoid`.
    Sigmoid, "Sigmoid", |v| 1.0 / (1.0 + (-v).exp())
);
elementwise!(
    /// `nn.Hardsigmoid`.
    HardSigmoid, "Hardsigmoid", |v| (v + 3.0).clamp(0.0, 6.0) / 6.0
);
elementwise!(
    /// `nn.SiLU` (swish): `x * sigmoid(x)`.
    SiLU, "SiLU", |v| v / (1.0 + (-v).exp())
);
elementwise!(
    /// `nn.Tanh`.
    Tanh, "Tanh", |v| v.tanh()
);
elementwise!(
    /// `nn.Identity` (and `nn.Dropout` at inference).
    Identity, "Identity", |v| v
);

/// A layer that passes its input through in float (its meaning is for quantization).
macro_rules! pass_through {
    ($(#[$doc:meta])* $name:ident $(($field:ty))?, $kind:literal) => {
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
            fn as_any(&self) -> &dyn Any {
                self
            }
            fn as_any_mut(&mut self) -> &mut dyn Any {
                self
            }
        }
    };
}

pass_through!(
    /// `nn.Dropout(p)` at inference: passes its input through. Kept as its own type so the
    /// model prints and reports like the PyTorch one.
    Dropout(f32), "Dropout"
);
pass_through!(
    /// PyTorch's `QuantStub`: where a quantized region starts, with its own output observer.
    /// Never required here (boundaries are placed automatically); accepted so models written
    /// with stubs port unchanged. In float it passes its input through.
    QuantStub, "QuantStub"
);
pass_through!(
    /// PyTorch's `DeQuantStub`: where a quantized region ends; its output is float. Modules
    /// after it still follow the configuration (skip them to keep them in float).
    DeQuantStub, "DeQuantStub"
);

/// Whether `m` is one of this crate's layers, every one of which computes each image of a
/// batch (index 0 of its input and output) on its own. A custom layer may not.
pub(crate) fn computes_images_apart(m: &dyn Module) -> bool {
    let a = m.as_any();
    a.is::<Conv2d>()
        || a.is::<BatchNorm2d>()
        || a.is::<BatchNorm1d>()
        || a.is::<Linear>()
        || a.is::<Flatten>()
        || a.is::<AdaptiveAvgPool2d>()
        || a.is::<MaxPool2d>()
        || a.is::<AvgPool2d>()
        || a.is::<ReLU>()
        || a.is::<ReLU6>()
        || a.is::<Hardswish>()
        || a.is::<Sigmoid>()
        || a.is::<HardSigmoid>()
        || a.is::<SiLU>()
        || a.is::<Tanh>()
        || a.is::<Identity>()
        || a.is::<Dropout>()
        || a.is::<QuantStub>()
        || a.is::<DeQuantStub>()
}

/// `nn.Flatten()`: `[n, c, h, w] -> [n, c * h * w]` (PyTorch's order).
#[derive(Debug, Clone, Copy, Default)]
pub struct Flatten;

impl Module for Flatten {
    fn kind(&self) -> &'static str {
        "Flatten"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let n = *x.shape().first().ok_or_else(|| shape_err("Flatten", "at least one dimension".into(), x))?;
        let rest = x.shape()[1..].iter().product();
        Ok(x.as_standard_layout().into_owned().into_shape_with_order(IxDyn(&[n, rest])).expect("same length"))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// An `[n, c, oh, ow]` output whose element `(b, ch, oy, ox)` is `f(plane, oy, ox)`, `plane`
/// being input plane `(b, ch)`: the loop the float pools share.
fn per_window(
    x: &ArrayD<f32>,
    [n, c, oh, ow]: [usize; 4],
    f: impl Fn(ndarray::ArrayView2<'_, f32>, usize, usize) -> f32,
) -> ArrayD<f32> {
    let x = x.view().into_dimensionality::<ndarray::Ix4>().expect("checked 4-D");
    let mut y = ArrayD::zeros(IxDyn(&[n, c, oh, ow]));
    for b in 0..n {
        for ch in 0..c {
            let plane = x.slice(ndarray::s![b, ch, .., ..]);
            for oy in 0..oh {
                for ox in 0..ow {
                    y[[b, ch, oy, ox]] = f(plane, oy, ox);
                }
            }
        }
    }
    y
}

/// The sum of `plane[rows, cols]`, row by row, left to right (PyTorch's order).
fn sum_rows(plane: ndarray::ArrayView2<'_, f32>, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) -> f32 {
    let mut s = 0.0f32;
    for iy in rows {
        for ix in cols.clone() {
            s += plane[[iy, ix]];
        }
    }
    s
}

/// `nn.AdaptiveAvgPool2d(output_size)`: PyTorch's windows
/// `[floor(o * in / out), ceil((o + 1) * in / out))`.
#[derive(Debug, Clone, Copy)]
pub struct AdaptiveAvgPool2d(pub usize, pub usize);

impl Module for AdaptiveAvgPool2d {
    fn kind(&self) -> &'static str {
        "AdaptiveAvgPool2d"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [n, c, h, w] = nchw("AdaptiveAvgPool2d", x, "[batch, channels, height, width]")?;
        let (oh, ow) = (self.0, self.1);
        Ok(per_window(x, [n, c, oh, ow], |plane, oy, ox| {
            let (hs, he) = (oy * h / oh, ((oy + 1) * h).div_ceil(oh));
            let (ws, we) = (ox * w / ow, ((ox + 1) * w).div_ceil(ow));
            sum_rows(plane, hs..he, ws..we) / ((he - hs) * (we - ws)) as f32
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// `nn.MaxPool2d(kernel, stride, padding)` (PyTorch's output-size rule, padding never counted).
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d(pub qkernels::Pool2d);

impl MaxPool2d {
    /// A `k x k` window with the given stride and padding.
    pub fn new(k: usize, stride: usize, padding: usize) -> Self {
        MaxPool2d(qkernels::Pool2d { stride: [stride; 2], padding: [padding; 2], ..qkernels::Pool2d::square(k) })
    }
}

impl Module for MaxPool2d {
    fn kind(&self) -> &'static str {
        "MaxPool2d"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [n, c, h, w] = nchw("MaxPool2d", x, "[batch, channels, height, width]")?;
        let p = &self.0;
        let (oh, ow) = p.output_hw(h, w).map_err(op_err)?;
        // Dilated windows: each tap on its own, padding never counted.
        let tap = |o: usize, k: usize, d: usize| (o * p.stride[d] + k * p.dilation[d]).checked_sub(p.padding[d]);
        Ok(per_window(x, [n, c, oh, ow], |plane, oy, ox| {
            let mut m = f32::NEG_INFINITY;
            for iy in (0..p.kernel[0]).filter_map(|ky| tap(oy, ky, 0)).filter(|&iy| iy < h) {
                for ix in (0..p.kernel[1]).filter_map(|kx| tap(ox, kx, 1)).filter(|&ix| ix < w) {
                    m = m.max(plane[[iy, ix]]);
                }
            }
            m
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// `nn.AvgPool2d(kernel, stride, padding)` with PyTorch's options (`ceil_mode`,
/// `count_include_pad`, `divisor_override` in the [`qkernels::Pool2d`]).
#[derive(Debug, Clone, Copy)]
pub struct AvgPool2d(pub qkernels::Pool2d);

impl AvgPool2d {
    /// A `k x k` window with the given stride and padding, counting padding (PyTorch's default).
    pub fn new(k: usize, stride: usize, padding: usize) -> Self {
        AvgPool2d(qkernels::Pool2d { stride: [stride; 2], padding: [padding; 2], ..qkernels::Pool2d::square(k) })
    }
}

impl Module for AvgPool2d {
    fn kind(&self) -> &'static str {
        "AvgPool2d"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [n, c, h, w] = nchw("AvgPool2d", x, "[batch, channels, height, width]")?;
        let p = &self.0;
        let (oh, ow) = p.output_hw(h, w).map_err(op_err)?;
        Ok(per_window(x, [n, c, oh, ow], |plane, oy, ox| {
            // The window in padded coordinates (clipped to the padded input), then to the input.
            let hs = (oy * p.stride[0]) as isize - p.padding[0] as isize;
            let ws = (ox * p.stride[1]) as isize - p.padding[1] as isize;
            let he = (hs + p.kernel[0] as isize).min((h + p.padding[0]) as isize);
            let we = (ws + p.kernel[1] as isize).min((w + p.padding[1]) as isize);
            let pool = ((he - hs) * (we - ws)) as f32;
            let (hs, ws) = (hs.max(0) as usize, ws.max(0) as usize);
            let (he, we) = (he.min(h as isize) as usize, we.min(w as isize) as usize);
            let s = sum_rows(plane, hs..he, ws..we);
            let div = match p.divisor_override {
                Some(d) => d as f32,
                None if p.count_include_pad => pool,
                None => ((he - hs) * (we - ws)) as f32,
            };
            s / div
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// `nn.BatchNorm1d` in inference mode on `[batch, features]` input (after a linear layer,
/// where [`crate::fuse()`] folds it).
#[derive(Debug, Clone)]
pub struct BatchNorm1d(pub BatchNorm2d);

impl BatchNorm1d {
    /// The identity normalization over `c` features.
    pub fn new(c: usize) -> Self {
        BatchNorm1d(BatchNorm2d::new(c))
    }
}

impl Module for BatchNorm1d {
    fn kind(&self) -> &'static str {
        "BatchNorm1d"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [_, c] = *x.shape() else {
            return Err(shape_err("BatchNorm1d", "a 2-D [batch, features] input".into(), x));
        };
        let bn = &self.0;
        if c != bn.running_mean.len() {
            return Err(shape_err("BatchNorm1d", format!("{} features", bn.running_mean.len()), x));
        }
        let mut y = x.clone();
        for (f, mut col) in y.axis_iter_mut(ndarray::Axis(1)).enumerate() {
            let inv = 1.0 / (bn.running_var[f] + bn.eps).sqrt();
            let alpha = bn.weight[f] * inv;
            let beta = bn.bias[f] - bn.running_mean[f] * alpha;
            col.mapv_inplace(|v| v * alpha + beta);
        }
        bn.activation.apply(&mut y);
        Ok(y)
    }
    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        self.0.tensors()
    }
    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        self.0.tensors_mut()
    }
    fn ignored_tensors(&self) -> &'static [&'static str] {
        &["num_batches_tracked"]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The int8 lookup-table form of an activation layer, if it has one.
pub(crate) fn lookup_table_op(m: &dyn Module) -> Option<qkernels::UnaryOp> {
    use qkernels::UnaryOp;
    let a = m.as_any();
    if a.is::<Hardswish>() {
        Some(UnaryOp::Hardswish)
    } else if a.is::<Sigmoid>() {
        Some(UnaryOp::Sigmoid)
    } else if a.is::<HardSigmoid>() {
        Some(UnaryOp::Hardsigmoid)
    } else if a.is::<SiLU>() {
        Some(UnaryOp::Silu)
    } else if a.is::<Tanh>() {
        Some(UnaryOp::Tanh)
    } else {
        None
    }
}
