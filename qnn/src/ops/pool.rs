//! Pooling: `MaxPool2d`, `AvgPool2d` and `AdaptiveAvgPool2d`. In int8 each keeps its
//! input's parameters (PyTorch's quantized pools do), and each layer is its own int8 op.

use ndarray::{ArrayD, IxDyn};
use qkernels::{adaptive_avg_pool2d, Pool2d, QuantU8};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, image_op, nchw_of, op_err, parse, LowerCx, OpWriter, QOp, SavedQ};
use crate::error::Result;
use crate::layers::{nchw, nhwc_data};
use crate::module::Module;
use crate::quant::{out_buf, quantized, Mode, Run, Value};
use crate::scratch::Input;

/// A pooling window as saved.
#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
struct PoolAttrs {
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
}

impl From<Pool2d> for PoolAttrs {
    fn from(p: Pool2d) -> Self {
        PoolAttrs {
            kernel: p.kernel,
            stride: p.stride,
            padding: p.padding,
            dilation: p.dilation,
            ceil_mode: p.ceil_mode,
            count_include_pad: p.count_include_pad,
            divisor_override: p.divisor_override,
        }
    }
}

impl From<PoolAttrs> for Pool2d {
    fn from(p: PoolAttrs) -> Self {
        Pool2d {
            kernel: p.kernel,
            stride: p.stride,
            padding: p.padding,
            dilation: p.dilation,
            ceil_mode: p.ceil_mode,
            count_include_pad: p.count_include_pad,
            divisor_override: p.divisor_override,
        }
    }
}

/// The methods every pool's `Module` impl shares: it runs as itself in int8 (an average
/// pool given output parameters of its own runs as an [`ObservedAvgPool`]).
macro_rules! same_params_layer {
    ($avg:expr) => {
        fn may_observe_output(&self) -> bool {
            $avg
        }
        fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
            Some(self.out_dims(input).map(Vec::from))
        }
        fn lowering(&self) -> Mode {
            Mode::Int8SameParams
        }
        fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
            match (cx.out_q, AvgWindow::of(self)) {
                (Some(out_q), Some(window)) => Ok(Box::new(ObservedAvgPool { window, out_q: out_q.into() })),
                _ => Ok(Box::new(*self)),
            }
        }
        fn computes_images_apart(&self) -> bool {
            true
        }
        fn save(&self, node: &str, w: &mut OpWriter) -> Option<Result<J>> {
            Some(QOp::save(self, node, w))
        }
    };
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
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AdaptiveAvgPool2d(pub usize, pub usize);

impl Module for AdaptiveAvgPool2d {
    fn kind(&self) -> &'static str {
        "AdaptiveAvgPool2d"
    }
    same_params_layer!(true);
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [n, c, h, w] = nchw("AdaptiveAvgPool2d", x, "[batch, channels, height, width]")?;
        let (oh, ow) = (self.0, self.1);
        let window = |o: usize, size: usize, out: usize| (o * size / out, ((o + 1) * size).div_ceil(out));
        if let Some(data) = nhwc_data(x) {
            // The same sums, row by row and left to right, a pixel's channels at a time.
            let mut y = vec![0.0f32; n * oh * ow * c];
            for (i, o) in y.chunks_exact_mut(c.max(1)).enumerate() {
                let (b, oy, ox) = (i / (oh * ow), i / ow % oh, i % ow);
                let ((hs, he), (ws, we)) = (window(oy, h, oh), window(ox, w, ow));
                for iy in hs..he {
                    for ix in ws..we {
                        for (s, &v) in o.iter_mut().zip(&data[((b * h + iy) * w + ix) * c..][..c]) {
                            *s += v;
                        }
                    }
                }
                let count = ((he - hs) * (we - ws)) as f32;
                o.iter_mut().for_each(|s| *s /= count);
            }
            return Ok(crate::layers::from_nhwc(y, [n, oh, ow, c]));
        }
        Ok(per_window(x, [n, c, oh, ow], |plane, oy, ox| {
            let (hs, he) = (oy * h / oh, ((oy + 1) * h).div_ceil(oh));
            let (ws, we) = (ox * w / ow, ((ox + 1) * w).div_ceil(ow));
            sum_rows(plane, hs..he, ws..we) / ((he - hs) * (we - ws)) as f32
        }))
    }
    any_methods!();
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
    same_params_layer!(false);
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [n, c, h, w] = nchw("MaxPool2d", x, "[batch, channels, height, width]")?;
        let p = &self.0;
        let (oh, ow) = p.output_hw(h, w).map_err(op_err)?;
        // Dilated windows: each tap on its own, padding never counted.
        let tap = |o: usize, k: usize, d: usize| (o * p.stride[d] + k * p.dilation[d]).checked_sub(p.padding[d]);
        if let Some(data) = nhwc_data(x) {
            // The same maxima, taken a pixel's channels at a time, in NHWC order.
            let mut y = vec![f32::NEG_INFINITY; n * oh * ow * c];
            for (i, o) in y.chunks_exact_mut(c.max(1)).enumerate() {
                let (b, oy, ox) = (i / (oh * ow), i / ow % oh, i % ow);
                for iy in (0..p.kernel[0]).filter_map(|ky| tap(oy, ky, 0)).filter(|&iy| iy < h) {
                    for ix in (0..p.kernel[1]).filter_map(|kx| tap(ox, kx, 1)).filter(|&ix| ix < w) {
                        let px = &data[((b * h + iy) * w + ix) * c..][..c];
                        for (m, &v) in o.iter_mut().zip(px) {
                            *m = m.max(v);
                        }
                    }
                }
            }
            return Ok(crate::layers::from_nhwc(y, [n, oh, ow, c]));
        }
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
    any_methods!();
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
    same_params_layer!(true);
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
    any_methods!();
}

impl AdaptiveAvgPool2d {
    fn out_dims(&self, s: &[usize]) -> Result<[usize; 4]> {
        let [n, c, _, _] = nchw_of(s, "AdaptiveAvgPool2d")?;
        Ok([n, c, self.0, self.1])
    }
}

impl MaxPool2d {
    fn out_dims(&self, s: &[usize]) -> Result<[usize; 4]> {
        let [n, c, h, w] = nchw_of(s, "MaxPool2d")?;
        let (oh, ow) = self.0.output_hw(h, w).map_err(op_err)?;
        Ok([n, c, oh, ow])
    }
}

impl AvgPool2d {
    fn out_dims(&self, s: &[usize]) -> Result<[usize; 4]> {
        let [n, c, h, w] = nchw_of(s, "AvgPool2d")?;
        let (oh, ow) = self.0.output_hw(h, w).map_err(op_err)?;
        Ok([n, c, oh, ow])
    }
}

pub(crate) const MAX: (&str, super::OpLoader) =
    ("MaxPool2d", |j, _, node| Ok(Box::new(MaxPool2d(parse::<PoolAttrs>(j, node, "MaxPool2d")?.into()))));
pub(crate) const AVG: (&str, super::OpLoader) =
    ("AvgPool2d", |j, _, node| Ok(Box::new(AvgPool2d(parse::<PoolAttrs>(j, node, "AvgPool2d")?.into()))));
pub(crate) const ADAPTIVE: (&str, super::OpLoader) =
    ("AdaptiveAvgPool2d", |j, _, node| Ok(Box::new(parse::<AdaptiveAvgPool2d>(j, node, "AdaptiveAvgPool2d")?)));

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[
    ("MaxPool2d", |j, _| Ok(Box::new(MaxPool2d(parse::<PoolAttrs>(j, "MaxPool2d", "MaxPool2d")?.into())))),
    ("AvgPool2d", |j, _| Ok(Box::new(AvgPool2d(parse::<PoolAttrs>(j, "AvgPool2d", "AvgPool2d")?.into())))),
    ("AdaptiveAvgPool2d", |j, _| {
        Ok(Box::new(parse::<AdaptiveAvgPool2d>(j, "AdaptiveAvgPool2d", "AdaptiveAvgPool2d")?))
    }),
];

/// The parameters of an image.
fn q_of(x: &qkernels::QImage<'_>) -> QuantU8 {
    QuantU8 { scale: x.scale, zero_point: x.zero_point }
}

impl QOp for AdaptiveAvgPool2d {
    fn op_name(&self) -> &'static str {
        ADAPTIVE.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        image_op(args.pop().expect("one input"), self, run, |x, hw, y| {
            adaptive_avg_pool2d(x, hw, q_of(x), y).map_err(op_err)
        })
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(self))
    }
    any_methods!();
}

impl QOp for MaxPool2d {
    fn op_name(&self) -> &'static str {
        MAX.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        image_op(args.pop().expect("one input"), self, run, |x, _, y| {
            qkernels::max_pool2d_threads(x, &self.0, y, run.threads).map_err(op_err)
        })
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(&PoolAttrs::from(self.0)))
    }
    any_methods!();
}

impl QOp for AvgPool2d {
    fn op_name(&self) -> &'static str {
        AVG.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        image_op(args.pop().expect("one input"), self, run, |x, _, y| {
            qkernels::avg_pool2d(x, &self.0, q_of(x), y).map_err(op_err)
        })
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(&PoolAttrs::from(self.0)))
    }
    any_methods!();
}

/// An average pool's window, for [`ObservedAvgPool`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum AvgWindow {
    /// `AdaptiveAvgPool2d` to this size.
    Adaptive([usize; 2]),
    /// `AvgPool2d` with this window.
    Window(PoolAttrs),
}

impl AvgWindow {
    fn of(layer: &dyn Module) -> Option<AvgWindow> {
        let a = layer.as_any();
        if let Some(p) = a.downcast_ref::<AdaptiveAvgPool2d>() {
            Some(AvgWindow::Adaptive([p.0, p.1]))
        } else {
            a.downcast_ref::<AvgPool2d>().map(|p| AvgWindow::Window(p.0.into()))
        }
    }
}

/// An average pool in int8 with output parameters of its own (observed): the sum of each
/// window is requantized straight to them ([`crate::QConfigMapping::pool_outputs`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ObservedAvgPool {
    window: AvgWindow,
    out_q: SavedQ,
}

pub(crate) const OBSERVED: (&str, super::OpLoader) = ("AvgPoolObserved", |j, _, node| {
    let op: ObservedAvgPool = parse(j, node, "AvgPoolObserved")?;
    Ok(Box::new(op))
});

impl QOp for ObservedAvgPool {
    fn op_name(&self) -> &'static str {
        OBSERVED.0
    }
    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, run: Run) -> Result<Value> {
        let out_q = self.out_q.0;
        let (data, shape, q) = quantized(args.pop().expect("one input"), in_q)?;
        let data = Input::new(data);
        let kind = match self.window {
            AvgWindow::Adaptive(_) => "AdaptiveAvgPool2d",
            AvgWindow::Window(_) => "AvgPool2d",
        };
        let [n, c, h, w] = nchw_of(&shape, kind)?;
        let image = Value::image(&data, &shape, q);
        let (oh, ow) = match self.window {
            AvgWindow::Adaptive([oh, ow]) => (oh, ow),
            AvgWindow::Window(p) => Pool2d::from(p).output_hw(h, w).map_err(op_err)?,
        };
        let mut y = out_buf(&[n, oh, ow, c], run, kind)?;
        match self.window {
            AvgWindow::Adaptive(_) => adaptive_avg_pool2d(&image, (oh, ow), out_q, &mut y).map_err(op_err)?,
            AvgWindow::Window(p) => qkernels::avg_pool2d(&image, &p.into(), out_q, &mut y).map_err(op_err)?,
        }
        Ok(Value::U8 { data: y, shape: vec![n, c, oh, ow], q: out_q })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.out_q.0)
    }
    fn quantizes_input(&self, _k: usize, in_q: QuantU8) -> Option<QuantU8> {
        Some(in_q)
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(self))
    }
    any_methods!();
}
