//! The quantization workflow: [`prepare`] attaches observers, [`Prepared::calibrate`] runs
//! data through the float model, [`Prepared::convert`] builds the int8 model. Modules without
//! an int8 implementation (or kept in float by configuration) run in float between an
//! automatic dequantize and quantize, and the model says so ([`QuantizedModel::plan`]).

use ndarray::{ArrayD, IxDyn};
use qkernels::{
    adaptive_avg_pool2d, flatten_nchw_order, GemmOutput, OutputQuant, PackedConv2d, PackedLinear, QImage, QMatrix,
    QuantU8, UnaryOp, UnaryTables,
};
use qobserve::{Observer, QConfig};
use qtensor::{QParams, QTensor, QuantRange};

use crate::config::QConfigMapping;
use crate::error::{NnError, Result};
use crate::fuse::{module_names, nearest};
use crate::layers::{AdaptiveAvgPool2d, Conv2d, Flatten, Hardswish, Identity, Linear, ReLU, ReLU6, Sigmoid};
use crate::module::{join, Module, Sequential};

/// How one module runs in the converted model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// An int8 kernel with its own output parameters.
    Int8,
    /// An int8 op that keeps its input's parameters (pooling, flatten, ReLU).
    Int8SameParams,
    /// Nothing to compute (`Identity`, a fused batch-norm or ReLU).
    Passthrough,
    /// Float, between an automatic dequantize and quantize, with the reason.
    Float(String),
}

/// One module of the plan: its full name, type, and how it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEntry {
    /// Full name.
    pub name: String,
    /// Type.
    pub kind: &'static str,
    /// How it runs.
    pub mode: Mode,
}

fn mode_of(m: &dyn Module, q: Option<&QConfig>) -> Mode {
    let a = m.as_any();
    if a.is::<Identity>() {
        return Mode::Passthrough;
    }
    let Some(_) = q else { return Mode::Float("kept in float by the configuration".into()) };
    if a.is::<Conv2d>() || a.is::<Linear>() || a.is::<Hardswish>() || a.is::<Sigmoid>() {
        Mode::Int8
    } else if a.is::<AdaptiveAvgPool2d>() || a.is::<Flatten>() || a.is::<ReLU>() || a.is::<ReLU6>() {
        Mode::Int8SameParams
    } else if m.kind() == "BatchNorm2d" {
        Mode::Float("a BatchNorm2d that was not fused into a convolution (fuse first, or keep it in float)".into())
    } else {
        Mode::Float(format!("no int8 implementation for {} (custom layer)", m.kind()))
    }
}

/// Moves the leaves out of a `Sequential` tree, in execution order, with full names.
fn take_leaves(seq: &mut Sequential, prefix: &str, out: &mut Vec<(String, Box<dyn Module>)>) {
    for (name, m) in seq.layers_mut() {
        let path = join(prefix, name);
        if let Some(inner) = m.as_any_mut().downcast_mut::<Sequential>() {
            take_leaves(inner, &path, out);
        } else {
            out.push((path, std::mem::replace(m, Box::new(Identity))));
        }
    }
}

/// A model with observers attached, ready for calibration.
#[derive(Debug)]
pub struct Prepared {
    leaves: Vec<(String, Box<dyn Module>)>,
    plan: Vec<PlanEntry>,
    configs: Vec<Option<QConfig>>,
    input_obs: Box<dyn Observer>,
    obs: Vec<Option<Box<dyn Observer>>>,
    batches: usize,
}

/// Attaches observers to `model` (fused or not) as `mapping` says: one on the model input and
/// one on the output of every module whose int8 output needs parameters of its own (and of
/// every float module, which may feed an int8 one).
///
/// # Errors
/// A name override in `mapping` that matches no module (with the nearest names), or an
/// invalid observer configuration.
pub fn prepare(mut model: Sequential, mapping: &QConfigMapping) -> Result<Prepared> {
    let names = module_names(&model);
    for (pattern, is_glob) in mapping.name_patterns() {
        if !QConfigMapping::pattern_matches_any(pattern, is_glob, &names) {
            return Err(NnError::UnknownModule { name: pattern.to_string(), suggestions: nearest(pattern, &names) });
        }
    }
    let mut leaves = Vec::new();
    take_leaves(&mut model, "", &mut leaves);
    let mut plan = Vec::new();
    let mut configs = Vec::new();
    let mut obs = Vec::new();
    for (name, m) in &leaves {
        let q = mapping.resolve(name, m.kind()).cloned();
        let mode = mode_of(m.as_ref(), q.as_ref());
        let needs_observer = matches!(mode, Mode::Int8 | Mode::Float(_));
        let spec = q.as_ref().map_or_else(|| QConfig::default().activation, |q| q.activation.clone());
        obs.push(if needs_observer { Some(spec.create()?) } else { None });
        plan.push(PlanEntry { name: name.clone(), kind: m.kind(), mode });
        configs.push(q);
    }
    let input_spec = mapping.resolve("", "").map_or_else(|| QConfig::default().activation, |q| q.activation.clone());
    Ok(Prepared { leaves, plan, configs, input_obs: input_spec.create()?, obs, batches: 0 })
}

impl Prepared {
    /// How every module will run.
    pub fn plan(&self) -> &[PlanEntry] {
        &self.plan
    }

    /// Runs one calibration batch through the float model, feeding every observer.
    ///
    /// # Errors
    /// A batch the model cannot take, or non-finite values (the message names the tensor).
    pub fn calibrate(&mut self, x: &ArrayD<f32>) -> Result<()> {
        self.input_obs.observe(x.view()).map_err(|e| NnError::Observe(e.for_tensor("model input")))?;
        let mut cur = x.clone();
        for ((name, m), ob) in self.leaves.iter().zip(self.obs.iter_mut()) {
            cur = m.forward(&cur).map_err(|e| e.within(name))?;
            if let Some(ob) = ob {
                ob.observe(cur.view()).map_err(|e| NnError::Observe(e.for_tensor(&format!("{name} output"))))?;
            }
        }
        self.batches += 1;
        Ok(())
    }

    /// Builds the int8 model from what the observers saw.
    ///
    /// # Errors
    /// An observer that saw no data ("observer for conv1 output saw no data: did calibration
    /// run?"), or weights that cannot be packed.
    pub fn convert(self) -> Result<QuantizedModel> {
        let input_q = to_u8(self.input_obs.qparams().map_err(|e| NnError::Observe(e.for_tensor("model input")))?);
        let mut ops = Vec::new();
        // The parameters of the most recently observed tensor: what a float value entering an
        // int8 op is quantized with.
        let mut last_q = input_q;
        for (((name, m), entry), (ob, cfg)) in
            self.leaves.into_iter().zip(self.plan.iter()).zip(self.obs.into_iter().zip(self.configs))
        {
            let out_q = match &ob {
                Some(o) => {
                    Some(to_u8(o.qparams().map_err(|e| NnError::Observe(e.for_tensor(&format!("{name} output"))))?))
                }
                None => None,
            };
            let op = build_op(&name, m, &entry.mode, last_q, out_q, cfg.as_ref())?;
            ops.push((name, last_q, op));
            if let Some(q) = out_q {
                last_q = q;
            }
        }
        Ok(QuantizedModel { input_q, ops, plan: self.plan })
    }
}

fn to_u8(p: QParams) -> QuantU8 {
    QuantU8 { scale: p.scale(0), zero_point: p.zero_point(0) }
}

/// One step of the int8 model.
#[derive(Debug)]
enum Op {
    Conv { packed: Box<PackedConv2d>, out: OutputQuant },
    Linear { packed: Box<PackedLinear>, out: OutputQuant },
    Lut { op: UnaryOp, in_q: QuantU8, out_q: QuantU8, tables: Box<UnaryTables> },
    SameParams(Box<dyn Module>),
    Passthrough,
    Float(Box<dyn Module>),
}

fn quantize_weights(name: &str, w: &ArrayD<f32>, cfg: &QConfig) -> Result<QTensor<i8>> {
    let mut ob = cfg.weight.create()?;
    ob.observe(w.view()).map_err(|e| NnError::Observe(e.for_tensor(&format!("{name} weight"))))?;
    let p = ob.qparams().map_err(|e| NnError::Observe(e.for_tensor(&format!("{name} weight"))))?;
    let spec = ob.spec();
    QTensor::quantize_in_range(w, p, spec.range).map_err(|e| NnError::Op { module: name.into(), source: e })
}

fn build_op(
    name: &str,
    m: Box<dyn Module>,
    mode: &Mode,
    in_q: QuantU8,
    out_q: Option<QuantU8>,
    cfg: Option<&QConfig>,
) -> Result<Op> {
    let op_err = |e| NnError::Op { module: name.to_string(), source: e };
    Ok(match mode {
        Mode::Passthrough => Op::Passthrough,
        Mode::Float(_) => Op::Float(m),
        Mode::Int8SameParams => Op::SameParams(m),
        Mode::Int8 => {
            let cfg = cfg.expect("int8 modules have a configuration");
            let oq = out_q.expect("int8 modules are observed");
            let a = m.as_any();
            if let Some(conv) = a.downcast_ref::<Conv2d>() {
                let wq = quantize_weights(name, &conv.weight, cfg)?;
                let ohwi = wq.int_repr().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned();
                let wq = QTensor::from_int_repr(ohwi, wq.params().clone(), wq.range()).map_err(op_err)?;
                let bias: Option<Vec<f32>> = conv.bias.as_ref().map(|b| b.iter().copied().collect());
                let packed = Box::new(PackedConv2d::new(&wq, bias.as_deref(), conv.geom).map_err(op_err)?);
                Op::Conv {
                    packed,
                    out: OutputQuant {
                        scale: oq.scale,
                        zero_point: oq.zero_point,
                        activation: conv.activation.kernel(),
                    },
                }
            } else if let Some(lin) = a.downcast_ref::<Linear>() {
                let wq = quantize_weights(name, &lin.weight, cfg)?;
                let bias: Option<Vec<f32>> = lin.bias.as_ref().map(|b| b.iter().copied().collect());
                let packed = Box::new(PackedLinear::new(&wq, bias.as_deref()).map_err(op_err)?);
                Op::Linear {
                    packed,
                    out: OutputQuant {
                        scale: oq.scale,
                        zero_point: oq.zero_point,
                        activation: lin.activation.kernel(),
                    },
                }
            } else {
                let (op, out_q) = if a.is::<Hardswish>() {
                    (UnaryOp::Hardswish, oq)
                } else {
                    (UnaryOp::Sigmoid, UnaryOp::Sigmoid.fixed_output(oq).expect("sigmoid's output is fixed"))
                };
                Op::Lut { op, in_q, out_q, tables: Box::new(op.tables(in_q, out_q)) }
            }
        }
    })
}

/// A tensor between two steps of the int8 model: float (NCHW or 2-D) or `u8` (NHWC data for
/// 4-D tensors, row-major for 2-D) with its parameters.
#[derive(Clone, Debug)]
pub enum Value {
    /// Float, PyTorch's layout.
    F32(ArrayD<f32>),
    /// Quantized: data, logical (NCHW or 2-D) shape, parameters.
    U8 {
        /// Values (NHWC for 4-D).
        data: Vec<u8>,
        /// Logical shape, NCHW or `[batch, features]`.
        shape: Vec<usize>,
        /// Parameters.
        q: QuantU8,
    },
}

impl Value {
    fn quantize(x: &ArrayD<f32>, q: QuantU8) -> qtensor::Result<Value> {
        let shape = x.shape().to_vec();
        let xs = x.as_standard_layout();
        let src = xs.as_slice().expect("standard layout");
        let mut data = vec![0u8; src.len()];
        if let [n, c, h, w] = shape[..] {
            qkernels::quantize_nchw_to_nhwc(src, (n, c, h, w), q, &mut data)?;
        } else {
            qtensor::kernels::quantize_slice(
                src,
                &mut data,
                q.scale,
                q.zero_point,
                QuantRange::full(qtensor::DType::U8),
            )?;
        }
        Ok(Value::U8 { data, shape, q })
    }

    /// Float values (dequantizing if needed), in PyTorch's layout.
    pub fn to_f32(&self) -> ArrayD<f32> {
        match self {
            Value::F32(a) => a.clone(),
            Value::U8 { data, shape, q } => {
                let mut out = vec![0.0f32; data.len()];
                if let [n, c, h, w] = shape[..] {
                    qkernels::dequantize_nhwc_to_nchw(data, (n, h, w, c), *q, &mut out).expect("consistent value");
                } else {
                    qtensor::kernels::dequantize_slice(data, &mut out, q.scale, q.zero_point)
                        .expect("consistent value");
                }
                ArrayD::from_shape_vec(IxDyn(shape), out).expect("consistent value")
            }
        }
    }

    fn image<'a>(data: &'a [u8], shape: &[usize], q: QuantU8) -> QImage<'a> {
        QImage { data, n: shape[0], h: shape[2], w: shape[3], c: shape[1], scale: q.scale, zero_point: q.zero_point }
    }
}

/// One module's line of [`QuantizedModel::report`].
#[derive(Clone, Debug, PartialEq)]
pub struct LayerReport {
    /// Full name.
    pub name: String,
    /// Type.
    pub kind: &'static str,
    /// How it runs.
    pub mode: Mode,
    /// Signal-to-quantization-noise ratio of its output against the float model's, in dB
    /// (PyTorch's Numeric Suite definition, `20 log10(|f| / |f - q|)`), errors accumulated
    /// from the input; `None` for modules that compute nothing.
    pub sqnr_db: Option<f64>,
}

/// `20 log10(|f| / |f - q|)`, infinite for identical tensors.
pub fn sqnr_db(f: &ArrayD<f32>, q: &ArrayD<f32>) -> f64 {
    let signal: f64 = f.iter().map(|&v| (v as f64).powi(2)).sum();
    let noise: f64 = f.iter().zip(q.iter()).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

fn leaves<'a>(seq: &'a Sequential, prefix: &str, out: &mut Vec<(String, &'a dyn Module)>) {
    for (name, m) in seq.layers() {
        let path = join(prefix, name);
        match m.as_any().downcast_ref::<Sequential>() {
            Some(inner) => leaves(inner, &path, out),
            None => out.push((path, m.as_ref())),
        }
    }
}

/// The int8 model: immutable, `Send + Sync`, one instance serves every thread.
#[derive(Debug)]
pub struct QuantizedModel {
    input_q: QuantU8,
    /// Each op with the parameters a float input to it is quantized with.
    ops: Vec<(String, QuantU8, Op)>,
    plan: Vec<PlanEntry>,
}

impl QuantizedModel {
    /// How every module runs (int8, float and why).
    pub fn plan(&self) -> &[PlanEntry] {
        &self.plan
    }

    /// The parameters the model input is quantized with.
    pub fn input_quant(&self) -> QuantU8 {
        self.input_q
    }

    /// The output parameters of every int8 layer that chooses its own, by module name.
    pub fn output_quants(&self) -> Vec<(&str, QuantU8)> {
        self.ops
            .iter()
            .filter_map(|(name, _, op)| match op {
                Op::Conv { out, .. } | Op::Linear { out, .. } => {
                    Some((name.as_str(), QuantU8 { scale: out.scale, zero_point: out.zero_point }))
                }
                Op::Lut { out_q, .. } => Some((name.as_str(), *out_q)),
                _ => None,
            })
            .collect()
    }

    /// Runs the int8 model and `float` (the same model, fused the same way, in float) side by
    /// side on `x` and reports, per module, how it ran and how far its output is from the
    /// float one (PyTorch's Numeric Suite, `compare_model_outputs`).
    ///
    /// # Errors
    /// A float model whose modules do not match this one's, or an input neither can take.
    pub fn report(&self, float: &Sequential, x: &ArrayD<f32>) -> Result<Vec<LayerReport>> {
        let mut fl = Vec::new();
        leaves(float, "", &mut fl);
        let names_match = fl.len() == self.ops.len() && fl.iter().zip(&self.ops).all(|((a, _), (b, _, _))| a == b);
        if !names_match {
            return Err(NnError::Fusion {
                modules: fl.iter().map(|(n, _)| n.clone()).collect(),
                reason: "the float model passed to report() must be the converted model's float original, fused the same way".into(),
            });
        }
        let (mut fcur, mut qcur) = (x.clone(), Value::F32(x.clone()));
        let mut out = Vec::new();
        for (((name, fm), (_, in_q, op)), entry) in fl.into_iter().zip(&self.ops).zip(&self.plan) {
            fcur = fm.forward(&fcur).map_err(|e| e.within(&name))?;
            qcur = Self::step(op, *in_q, qcur).map_err(|e| e.within(&name))?;
            let sqnr = (entry.mode != Mode::Passthrough).then(|| sqnr_db(&fcur, &qcur.to_f32()));
            out.push(LayerReport { name, kind: entry.kind, mode: entry.mode.clone(), sqnr_db: sqnr });
        }
        Ok(out)
    }

    /// Runs the int8 model and returns its last value (quantized logits for a model that
    /// ends in an int8 layer).
    ///
    /// # Errors
    /// An input the model cannot take (the message names the module and the shapes).
    pub fn forward_value(&self, x: &ArrayD<f32>) -> Result<Value> {
        let mut cur = Value::F32(x.clone());
        for (name, in_q, op) in &self.ops {
            cur = Self::step(op, *in_q, cur).map_err(|e| e.within(name))?;
        }
        Ok(cur)
    }

    /// Runs the int8 model; float output (dequantized at the end).
    ///
    /// # Errors
    /// As [`QuantizedModel::forward_value`].
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(self.forward_value(x)?.to_f32())
    }

    fn quantized(v: Value, q_if_float: QuantU8) -> Result<(Vec<u8>, Vec<usize>, QuantU8)> {
        match v {
            Value::U8 { data, shape, q } => Ok((data, shape, q)),
            Value::F32(a) => {
                match Value::quantize(&a, q_if_float).map_err(|e| NnError::Op { module: String::new(), source: e })? {
                    Value::U8 { data, shape, q } => Ok((data, shape, q)),
                    Value::F32(_) => unreachable!("quantize returns U8"),
                }
            }
        }
    }

    fn step(op: &Op, in_q: QuantU8, cur: Value) -> Result<Value> {
        let op_err = |e| NnError::Op { module: String::new(), source: e };
        let shape_err = |kind: &'static str, expected: &str, got: &[usize]| NnError::Shape {
            module: String::new(),
            kind,
            expected: expected.to_string(),
            got: got.to_vec(),
        };
        Ok(match op {
            Op::Passthrough => cur,
            // Float stays float: the next int8 op quantizes it with this module's observed
            // parameters (its `in_q`), and consecutive float modules lose nothing.
            Op::Float(module) => Value::F32(module.forward(&cur.to_f32())?),
            Op::Conv { packed, out } => {
                let (data, shape, q) = Self::quantized(cur, in_q)?;
                let [n, c, h, w] = shape[..] else { return Err(shape_err("Conv2d", "a 4-D NCHW input", &shape)) };
                let (oh, ow) = packed.output_hw(h, w).map_err(op_err)?;
                let oc = packed.out_channels();
                let mut y = vec![0u8; n * oh * ow * oc];
                packed.forward_u8(&Value::image(&data, &[n, c, h, w], q), *out, &mut y, 1).map_err(op_err)?;
                Value::U8 {
                    data: y,
                    shape: vec![n, oc, oh, ow],
                    q: QuantU8 { scale: out.scale, zero_point: out.zero_point },
                }
            }
            Op::Linear { packed, out } => {
                let (data, shape, q) = Self::quantized(cur, in_q)?;
                let [m, k] = shape[..] else {
                    return Err(shape_err("Linear", "a 2-D [batch, features] input", &shape));
                };
                let n = packed.weights().n();
                let mut y = vec![0u8; m * n];
                let a = QMatrix { data: &data, m, k, lda: k, scale: q.scale, zero_point: q.zero_point };
                packed.forward(&a, GemmOutput::U8 { data: &mut y, ldc: n, quant: *out }, 1).map_err(op_err)?;
                Value::U8 { data: y, shape: vec![m, n], q: QuantU8 { scale: out.scale, zero_point: out.zero_point } }
            }
            Op::Lut { op, in_q: table_q, out_q, tables } => {
                let (data, shape, q) = Self::quantized(cur, in_q)?;
                let mut y = vec![0u8; data.len()];
                if q == *table_q {
                    tables.apply(&data, &mut y).map_err(op_err)?;
                } else {
                    op.tables(q, *out_q).apply(&data, &mut y).map_err(op_err)?;
                }
                Value::U8 { data: y, shape, q: *out_q }
            }
            Op::SameParams(m) => match cur {
                Value::F32(a) => Value::F32(m.forward(&a)?),
                Value::U8 { data, shape, q } => {
                    let a = m.as_any();
                    if let Some(p) = a.downcast_ref::<AdaptiveAvgPool2d>() {
                        let [n, c, h, w] = shape[..] else {
                            return Err(shape_err("AdaptiveAvgPool2d", "a 4-D NCHW input", &shape));
                        };
                        let mut y = vec![0u8; n * p.0 * p.1 * c];
                        adaptive_avg_pool2d(&Value::image(&data, &[n, c, h, w], q), (p.0, p.1), q, &mut y)
                            .map_err(op_err)?;
                        Value::U8 { data: y, shape: vec![n, c, p.0, p.1], q }
                    } else if a.is::<Flatten>() {
                        if let [n, c, h, w] = shape[..] {
                            let mut y = vec![0u8; data.len()];
                            flatten_nchw_order(&Value::image(&data, &[n, c, h, w], q), &mut y).map_err(op_err)?;
                            Value::U8 { data: y, shape: vec![n, c * h * w], q }
                        } else {
                            Value::U8 { data, shape, q }
                        }
                    } else {
                        let op = if a.is::<ReLU6>() { UnaryOp::Relu6 } else { UnaryOp::Relu };
                        let mut y = vec![0u8; data.len()];
                        op.tables(q, q).apply(&data, &mut y).map_err(op_err)?;
                        Value::U8 { data: y, shape, q }
                    }
                }
            },
        })
    }
}
