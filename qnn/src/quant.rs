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
use qtensor::{QTensor, QuantRange};

use crate::config::QConfigMapping;
use crate::error::{NnError, Result};
use crate::fuse::{module_names, nearest};
use crate::layers::{
    AdaptiveAvgPool2d, AvgPool2d, Conv2d, DeQuantStub, Dropout, Flatten, Hardswish, Identity, Linear, MaxPool2d,
    QuantStub, ReLU, ReLU6, Sigmoid,
};
use crate::module::{cat_dim1, join, Concat, Module, Residual, Sequential};
use crate::scratch::{self, Input};

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
    if a.is::<Identity>() || a.is::<Dropout>() {
        return Mode::Passthrough;
    }
    if a.is::<DeQuantStub>() {
        return Mode::Float("DeQuantStub: the quantized region ends here".into());
    }
    if a.is::<QuantStub>() && q.is_none() {
        return Mode::Passthrough;
    }
    let Some(_) = q else { return Mode::Float("kept in float by the configuration".into()) };
    if a.is::<QuantStub>() {
        return Mode::Int8;
    }
    if a.is::<Conv2d>() || a.is::<Linear>() || a.is::<Hardswish>() || a.is::<Sigmoid>() {
        Mode::Int8
    } else if a.is::<AdaptiveAvgPool2d>()
        || a.is::<MaxPool2d>()
        || a.is::<AvgPool2d>()
        || a.is::<Flatten>()
        || a.is::<ReLU>()
        || a.is::<ReLU6>()
    {
        Mode::Int8SameParams
    } else if m.has_int8() {
        Mode::Int8
    } else if m.kind() == "BatchNorm2d" || m.kind() == "BatchNorm1d" {
        Mode::Float(format!(
            "a {} that was not fused into the layer before it (fuse first, or keep it in float)",
            m.kind()
        ))
    } else {
        Mode::Float(format!("no int8 implementation for {} (custom layer)", m.kind()))
    }
}

/// The observer for the output of `name` (or the model input), as `cfg` says (the default
/// activation observer for modules kept in float, whose output may feed an int8 one).
///
/// # Errors
/// A per-channel activation observer: every int8 kernel takes its activations with one scale
/// and zero point, so per-channel parameters could only be used by dropping all but one.
fn activation_observer(cfg: Option<&QConfig>, name: &str) -> Result<Box<dyn Observer>> {
    let spec = cfg.map_or_else(|| QConfig::default().activation, |q| q.activation.clone());
    if spec.is_per_channel() {
        return Err(NnError::Config {
            module: name.to_string(),
            reason: "its activation observer is per channel, but int8 kernels take activations with one scale \
                     and zero point per tensor; give QConfig::activation a per-tensor observer (e.g. \
                     ObserverSpec::Histogram or MinMax) and keep per-channel observers for QConfig::weight"
                .into(),
        });
    }
    Ok(spec.create()?)
}

/// A node of the prepared model: a leaf module, or a residual block whose two branches are
/// node lists of their own. Observers live in [`Prepared`]'s list; nodes hold indices.
#[derive(Debug)]
enum PNode {
    Leaf { name: String, module: Box<dyn Module>, mode: Mode, cfg: Option<QConfig>, obs: Option<usize> },
    Residual { name: String, body: Vec<PNode>, shortcut: Option<Vec<PNode>>, relu: bool, obs: usize, int8: bool },
    Concat { name: String, branches: Vec<Vec<PNode>>, obs: usize, int8: bool },
}

/// Moves the modules out of a model tree into nodes, in execution order, with full names,
/// creating observers (into `obs`) as `mapping` says and recording the plan.
fn build_nodes(
    seq: &mut Sequential,
    prefix: &str,
    mapping: &QConfigMapping,
    plan: &mut Vec<PlanEntry>,
    obs: &mut Vec<Box<dyn Observer>>,
) -> Result<Vec<PNode>> {
    let mut nodes = Vec::new();
    for (name, m) in seq.layers_mut() {
        let path = join(prefix, name);
        if let Some(inner) = m.as_any_mut().downcast_mut::<Sequential>() {
            nodes.extend(build_nodes(inner, &path, mapping, plan, obs)?);
        } else if let Some(cat) = m.as_any_mut().downcast_mut::<Concat>() {
            let mut branches = Vec::new();
            for (bname, b) in &mut cat.branches {
                branches.push(build_nodes(b, &join(&path, bname), mapping, plan, obs)?);
            }
            let cat_name = join(&path, &cat.cat_name);
            let cfg = mapping.resolve(&cat_name, "cat").cloned();
            let mode =
                if cfg.is_some() { Mode::Int8 } else { Mode::Float("kept in float by the configuration".into()) };
            plan.push(PlanEntry { name: cat_name.clone(), kind: "cat", mode });
            obs.push(activation_observer(cfg.as_ref(), &cat_name)?);
            nodes.push(PNode::Concat { name: cat_name, branches, obs: obs.len() - 1, int8: cfg.is_some() });
        } else if let Some(res) = m.as_any_mut().downcast_mut::<Residual>() {
            let body = build_nodes(&mut res.body, &path, mapping, plan, obs)?;
            let shortcut = match &mut res.shortcut {
                Some((sname, s)) => Some(build_nodes(s, &join(&path, sname), mapping, plan, obs)?),
                None => None,
            };
            let add_name = join(&path, &res.add_name);
            let cfg = mapping.resolve(&add_name, "add").cloned();
            let mode =
                if cfg.is_some() { Mode::Int8 } else { Mode::Float("kept in float by the configuration".into()) };
            plan.push(PlanEntry { name: add_name.clone(), kind: "add", mode: mode.clone() });
            if let Some(r) = &res.relu {
                let relu_mode = if cfg.is_some() { Mode::Int8SameParams } else { mode.clone() };
                plan.push(PlanEntry { name: join(&path, r), kind: "ReLU", mode: relu_mode });
            }
            obs.push(activation_observer(cfg.as_ref(), &add_name)?);
            nodes.push(PNode::Residual {
                name: add_name,
                body,
                shortcut,
                relu: res.relu.is_some(),
                obs: obs.len() - 1,
                int8: cfg.is_some(),
            });
        } else {
            let q = mapping.resolve(&path, m.kind()).cloned();
            let mode = mode_of(m.as_ref(), q.as_ref());
            let index = if matches!(mode, Mode::Int8 | Mode::Float(_)) {
                obs.push(activation_observer(q.as_ref(), &path)?);
                Some(obs.len() - 1)
            } else {
                None
            };
            plan.push(PlanEntry { name: path.clone(), kind: m.kind(), mode: mode.clone() });
            nodes.push(PNode::Leaf {
                name: path,
                module: std::mem::replace(m, Box::new(Identity)),
                mode,
                cfg: q,
                obs: index,
            });
        }
    }
    Ok(nodes)
}

fn observe(obs: &mut dyn Observer, name: &str, y: &ArrayD<f32>) -> Result<()> {
    obs.observe(y.view()).map_err(|e| NnError::Observe(e.for_tensor(&format!("{name} output"))))
}

/// The float forward pass over prepared nodes, feeding `obs` (indexed as the nodes say).
fn calibrate_nodes(nodes: &[PNode], x: &ArrayD<f32>, obs: &mut [Box<dyn Observer>]) -> Result<ArrayD<f32>> {
    let mut cur = x.clone();
    for node in nodes {
        cur = match node {
            PNode::Leaf { name, module, obs: index, .. } => {
                let y = module.forward(&cur).map_err(|e| e.within(name))?;
                if let Some(i) = index {
                    observe(obs[*i].as_mut(), name, &y)?;
                }
                y
            }
            PNode::Residual { name, body, shortcut, relu, obs: index, .. } => {
                let b = calibrate_nodes(body, &cur, obs)?;
                let s = match shortcut {
                    Some(sc) => calibrate_nodes(sc, &cur, obs)?,
                    None => cur.clone(),
                };
                if b.shape() != s.shape() {
                    return Err(NnError::Shape {
                        module: name.clone(),
                        kind: "Residual add",
                        expected: format!("the shortcut's shape {:?}", s.shape()),
                        got: b.shape().to_vec(),
                    });
                }
                let mut y = b + s;
                observe(obs[*index].as_mut(), name, &y)?;
                if *relu {
                    y.mapv_inplace(|v| v.max(0.0));
                }
                y
            }
            PNode::Concat { name, branches, obs: index, .. } => {
                let parts = branches.iter().map(|b| calibrate_nodes(b, &cur, obs)).collect::<Result<Vec<_>>>()?;
                let y = cat_dim1(&parts, name)?;
                observe(obs[*index].as_mut(), name, &y)?;
                y
            }
        };
    }
    Ok(cur)
}

/// A model with observers attached, ready for calibration.
#[derive(Debug)]
pub struct Prepared {
    nodes: Vec<PNode>,
    plan: Vec<PlanEntry>,
    /// Observer 0 watches the model input; the others as the nodes' indices say.
    obs: Vec<Box<dyn Observer>>,
    /// Untouched copies of the observers, to start parallel workers from.
    fresh: Vec<Box<dyn Observer>>,
    batches: usize,
}

/// Attaches observers to `model` (fused or not) as `mapping` says: one on the model input,
/// one on the output of every module whose int8 output needs parameters of its own (and of
/// every float module, which may feed an int8 one), one on every residual addition.
///
/// # Errors
/// A name override in `mapping` that matches no module (with the nearest names), or an
/// invalid observer configuration.
pub fn prepare(mut model: Sequential, mapping: &QConfigMapping) -> Result<Prepared> {
    let mut names = module_names(&model);
    let mut obs = vec![activation_observer(mapping.resolve("", ""), "(model input)")?];
    let mut plan = Vec::new();
    let nodes = build_nodes(&mut model, "", mapping, &mut plan, &mut obs)?;
    // Additions and concatenations are named in the plan, not as modules: both are valid.
    names.extend(plan.iter().map(|e| e.name.clone()).filter(|n| !n.contains(' ')));
    for (pattern, is_glob) in mapping.name_patterns() {
        if !QConfigMapping::pattern_matches_any(pattern, is_glob, &names) {
            return Err(NnError::UnknownModule { name: pattern.to_string(), suggestions: nearest(pattern, &names) });
        }
    }
    let mut kinds: Vec<&str> = plan.iter().map(|e| e.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    if let Some(unknown) = mapping.kind_names().find(|k| !kinds.contains(k)) {
        return Err(NnError::Config {
            module: "(configuration)".into(),
            reason: format!(
                "set_kind / skip_kind name the kind '{unknown}', which no module of this model has{}; kinds are \
                 type names as PyTorch spells its classes (case-sensitive), and \"add\" and \"cat\" for \
                 residual additions and concatenations; this model has {}",
                nearest(unknown, &kinds.iter().map(|k| k.to_string()).collect::<Vec<_>>())
                    .first()
                    .map_or(String::new(), |k| format!(" (did you mean '{k}'?)")),
                kinds.join(", ")
            ),
        });
    }
    let fresh = obs.iter().map(|o| o.clone_box()).collect();
    Ok(Prepared { nodes, plan, obs, fresh, batches: 0 })
}

fn run_batch(nodes: &[PNode], x: &ArrayD<f32>, obs: &mut [Box<dyn Observer>]) -> Result<()> {
    obs[0].observe(x.view()).map_err(|e| NnError::Observe(e.for_tensor("model input")))?;
    calibrate_nodes(nodes, x, obs)?;
    Ok(())
}

impl Prepared {
    /// How every module will run.
    pub fn plan(&self) -> &[PlanEntry] {
        &self.plan
    }

    /// How many batches were observed.
    pub fn batches_seen(&self) -> usize {
        self.batches
    }

    /// Runs one calibration batch through the float model, feeding every observer.
    ///
    /// # Errors
    /// A batch the model cannot take, or non-finite values (the message names the tensor).
    pub fn calibrate(&mut self, x: &ArrayD<f32>) -> Result<()> {
        non_empty(x)?;
        run_batch(&self.nodes, x, &mut self.obs)?;
        self.batches += 1;
        Ok(())
    }

    /// Calibrates on many batches, on `threads` threads (each with its own observers, merged
    /// in batch order at the end), with a progress bar on a terminal. Min-max observers give
    /// exactly the one-thread result; histogram observers re-bin when merging ranges that
    /// differ; moving averages depend on order and refuse: calibrate them with `threads = 1`.
    ///
    /// # Errors
    /// As [`Prepared::calibrate`], or observers that cannot merge.
    pub fn calibrate_batches(&mut self, batches: &[ArrayD<f32>], threads: usize) -> Result<()> {
        use std::io::IsTerminal;
        batches.iter().try_for_each(non_empty)?;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(batches.len() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("calibrating {bar:40} {pos}/{len} batches ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let threads = threads.clamp(1, batches.len().max(1));
        if threads == 1 {
            for x in batches {
                self.calibrate(x)?;
                if let Some(b) = &bar {
                    b.inc(1);
                }
            }
        } else {
            let per = batches.len().div_ceil(threads);
            let nodes = &self.nodes;
            let results: Vec<Result<Vec<Box<dyn Observer>>>> = std::thread::scope(|sc| {
                let handles: Vec<_> = batches
                    .chunks(per)
                    .map(|chunk| {
                        let mut obs: Vec<Box<dyn Observer>> = self.fresh.iter().map(|o| o.clone_box()).collect();
                        let bar = bar.clone();
                        sc.spawn(move || -> Result<Vec<Box<dyn Observer>>> {
                            for x in chunk {
                                run_batch(nodes, x, &mut obs)?;
                                if let Some(b) = &bar {
                                    b.inc(1);
                                }
                            }
                            Ok(obs)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("calibration worker panicked")).collect()
            });
            for worker in results {
                for (mine, theirs) in self.obs.iter_mut().zip(worker?) {
                    mine.merge(theirs.as_ref())?;
                }
            }
            self.batches += batches.len();
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok(())
    }

    /// Every activation observer with the name of the output it watches (`"model input"`,
    /// module names, addition and concatenation names), in execution order: to inspect
    /// calibration (e.g. a [`qobserve::HistogramObserver`]'s histogram, through
    /// [`qobserve::Observer::as_any`]) before converting.
    pub fn observers(&self) -> Vec<(String, &dyn Observer)> {
        fn walk<'a>(nodes: &[PNode], obs: &'a [Box<dyn Observer>], out: &mut Vec<(String, &'a dyn Observer)>) {
            for n in nodes {
                match n {
                    PNode::Leaf { name, obs: Some(i), .. } => out.push((name.clone(), obs[*i].as_ref())),
                    PNode::Leaf { .. } => {}
                    PNode::Residual { name, body, shortcut, obs: i, .. } => {
                        walk(body, obs, out);
                        if let Some(s) = shortcut {
                            walk(s, obs, out);
                        }
                        out.push((name.clone(), obs[*i].as_ref()));
                    }
                    PNode::Concat { name, branches, obs: i, .. } => {
                        for b in branches {
                            walk(b, obs, out);
                        }
                        out.push((name.clone(), obs[*i].as_ref()));
                    }
                }
            }
        }
        let mut out = vec![("model input".to_string(), self.obs[0].as_ref())];
        walk(&self.nodes, &self.obs, &mut out);
        out
    }

    /// Builds the int8 model from what the observers saw.
    ///
    /// # Errors
    /// An observer that saw no data ("observer for conv1 output saw no data: did calibration
    /// run?"), or weights that cannot be packed.
    pub fn convert(self) -> Result<QuantizedModel> {
        let input_q = activation_quant(self.obs[0].as_ref(), "model input")?;
        let mut last_q = input_q;
        let nodes = convert_nodes(self.nodes, &self.obs, &mut last_q)?;
        Ok(QuantizedModel::assemble(input_q, nodes, self.plan))
    }
}

fn observed(obs: &dyn Observer, name: &str) -> Result<QuantU8> {
    activation_quant(obs, &format!("{name} output"))
}

/// The `u8` parameters the int8 kernels run an activation with, from its observer's choice.
/// Signed 8-bit parameters become the same grid in `u8` (`q + 128`, zero point + 128): every
/// value, rounding and clamp is the same.
///
/// # Errors
/// An observer that saw no data, per-channel parameters (a custom observer's: the built-in
/// per-channel ones are refused by `prepare`), or a 32-bit target.
fn activation_quant(obs: &dyn Observer, tensor: &str) -> Result<QuantU8> {
    let p = obs.qparams().map_err(|e| NnError::Observe(e.for_tensor(tensor)))?;
    let refuse = |reason: String| Err(NnError::Config { module: tensor.to_string(), reason });
    if p.axis().is_some() {
        return refuse(format!(
            "the {} observer chose per-channel parameters, but int8 kernels take activations with one scale and \
             zero point per tensor; observe activations per tensor",
            obs.kind()
        ));
    }
    let (scale, zero_point) = (p.scale(0), p.zero_point(0));
    match obs.spec().dtype {
        qtensor::DType::U8 => Ok(QuantU8 { scale, zero_point }),
        qtensor::DType::I8 => Ok(QuantU8 { scale, zero_point: zero_point + 128 }),
        other => refuse(format!(
            "the {} observer targets {other:?}; activations run in 8 bits: use a u8 or i8 QuantSpec",
            obs.kind()
        )),
    }
}

/// Converts nodes; `last_q` is the parameters of the most recently observed tensor (what a
/// float value entering an int8 op is quantized with), updated as nodes are converted.
fn convert_nodes(nodes: Vec<PNode>, obs: &[Box<dyn Observer>], last_q: &mut QuantU8) -> Result<Vec<QNode>> {
    let mut out = Vec::new();
    for node in nodes {
        out.push(match node {
            PNode::Leaf { name, module, mode, cfg, obs: index } => {
                let out_q = match index {
                    Some(i) => Some(observed(obs[i].as_ref(), &name)?),
                    None => None,
                };
                let op = build_op(&name, module, &mode, *last_q, out_q, cfg.as_ref())?;
                let in_q = *last_q;
                if let Some(q) = out_q {
                    *last_q = q;
                }
                QNode::Op { name, in_q, op }
            }
            PNode::Residual { name, body, shortcut, relu, obs: index, int8 } => {
                let x_q = *last_q;
                let mut body_q = x_q;
                let body = convert_nodes(body, obs, &mut body_q)?;
                let mut short_q = x_q;
                let shortcut = match shortcut {
                    Some(sc) => Some(convert_nodes(sc, obs, &mut short_q)?),
                    None => None,
                };
                let add_q = observed(obs[index].as_ref(), &name)?;
                *last_q = add_q;
                QNode::Residual { name, body, shortcut, body_q, short_q, add_q, relu, int8 }
            }
            PNode::Concat { name, branches, obs: index, int8 } => {
                let x_q = *last_q;
                let mut qbranches = Vec::new();
                let mut branch_q = Vec::new();
                for b in branches {
                    let mut bq = x_q;
                    qbranches.push(convert_nodes(b, obs, &mut bq)?);
                    branch_q.push(bq);
                }
                let out_q = observed(obs[index].as_ref(), &name)?;
                *last_q = out_q;
                QNode::Concat { name, branches: qbranches, branch_q, out_q, int8 }
            }
        });
    }
    Ok(out)
}

/// A node of the int8 model.
#[derive(Debug)]
pub(crate) enum QNode {
    Op {
        name: String,
        in_q: QuantU8,
        op: Op,
    },
    Residual {
        name: String,
        body: Vec<QNode>,
        shortcut: Option<Vec<QNode>>,
        /// Parameters a float body (or shortcut) output is quantized with.
        body_q: QuantU8,
        short_q: QuantU8,
        add_q: QuantU8,
        relu: bool,
        int8: bool,
    },
    Concat {
        name: String,
        branches: Vec<Vec<QNode>>,
        /// Parameters each branch's output has (or is quantized with, if float).
        branch_q: Vec<QuantU8>,
        out_q: QuantU8,
        int8: bool,
    },
}

/// One step of the int8 model.
#[derive(Debug)]
pub(crate) enum Op {
    Conv {
        packed: Box<PackedConv2d>,
        src: Box<ConvSource>,
        out: OutputQuant,
    },
    Linear {
        packed: Box<PackedLinear>,
        out: OutputQuant,
    },
    Lut {
        op: UnaryOp,
        in_q: QuantU8,
        out_q: QuantU8,
        tables: Box<UnaryTables>,
    },
    SameParams(Box<dyn Module>),
    Custom {
        layer: Box<dyn crate::module::Int8Layer>,
        out_q: QuantU8,
    },
    /// Quantizes (or requantizes) to the observed parameters: a `QuantStub`.
    Quantize {
        out_q: QuantU8,
    },
    Passthrough,
    Float(Box<dyn Module>),
}

/// What a packed convolution was built from (kept so the model can be saved).
#[derive(Debug)]
pub(crate) struct ConvSource {
    /// OHWI int8 weights with their parameters.
    pub weights: QTensor<i8>,
    pub bias: Option<Vec<f32>>,
    pub geom: qkernels::Conv2dGeometry,
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
            if a.is::<QuantStub>() {
                Op::Quantize { out_q: oq }
            } else if let Some(conv) = a.downcast_ref::<Conv2d>() {
                let wq = quantize_weights(name, &conv.weight, cfg)?;
                let ohwi = wq.int_repr().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned();
                let wq = QTensor::from_int_repr(ohwi, wq.params().clone(), wq.range()).map_err(op_err)?;
                let bias: Option<Vec<f32>> = conv.bias.as_ref().map(|b| b.iter().copied().collect());
                let packed = Box::new(PackedConv2d::new(&wq, bias.as_deref(), conv.geom).map_err(op_err)?);
                Op::Conv {
                    packed,
                    src: Box::new(ConvSource { weights: wq, bias, geom: conv.geom }),
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
            } else if m.has_int8() {
                let layer = m.int8(in_q, oq).ok_or_else(|| NnError::Fusion {
                    modules: vec![name.to_string()],
                    reason: format!("{} says it has an int8 implementation but int8() returned none", m.kind()),
                })?;
                Op::Custom { layer, out_q: oq }
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
    fn quantize(x: ndarray::ArrayViewD<'_, f32>, q: QuantU8) -> qtensor::Result<Value> {
        let shape = x.shape().to_vec();
        let xs = x.as_standard_layout();
        let src = xs.as_slice().expect("standard layout");
        let mut data = scratch::take(src.len());
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

    /// [`Value::to_f32`] that consumes the value: a float one is moved, not copied, and a
    /// quantized one's buffer goes back to the thread's pool.
    pub(crate) fn into_f32(self) -> ArrayD<f32> {
        match self {
            Value::F32(a) => a,
            u8_value => {
                let out = u8_value.to_f32();
                if let Value::U8 { data, .. } = u8_value {
                    scratch::give(data);
                }
                out
            }
        }
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
    /// SQNR of its int8 weights against the float ones (convolutions and linear layers).
    pub weight_sqnr_db: Option<f64>,
}

/// The report as JSON: a list of `{name, kind, mode, float_reason, sqnr_db, weight_sqnr_db}`.
pub fn report_json(report: &[LayerReport]) -> String {
    let rows: Vec<serde_json::Value> = report
        .iter()
        .map(|r| {
            let (mode, why) = match &r.mode {
                Mode::Int8 => ("int8", None),
                Mode::Int8SameParams => ("int8-same-params", None),
                Mode::Passthrough => ("passthrough", None),
                Mode::Float(w) => ("float", Some(w.clone())),
            };
            let num =
                |v: Option<f64>| v.filter(|x| x.is_finite()).map_or(serde_json::Value::Null, serde_json::Value::from);
            serde_json::json!({
                "name": r.name, "kind": r.kind, "mode": mode, "float_reason": why,
                "sqnr_db": num(r.sqnr_db), "weight_sqnr_db": num(r.weight_sqnr_db),
            })
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// SQNR of an op's int8 weights against the float layer's.
fn weight_sqnr(fm: &dyn Module, op: &Op) -> Option<f64> {
    match op {
        Op::Conv { src, .. } => {
            let float = fm.as_any().downcast_ref::<Conv2d>()?.weight_ohwi();
            Some(sqnr_db(&float, &src.weights.dequantize()))
        }
        Op::Linear { packed, .. } => {
            let lin = fm.as_any().downcast_ref::<Linear>()?;
            let pw = packed.weights();
            let (n, k) = (pw.n(), pw.k());
            let deq: Vec<f32> = (0..n * k)
                .map(|i| pw.scales()[i / k] * (pw.raw()[i] as i32 - pw.zero_points()[i / k]) as f32)
                .collect();
            Some(sqnr_db(&lin.weight, &ArrayD::from_shape_vec(IxDyn(&[n, k]), deq).ok()?))
        }
        _ => None,
    }
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

/// The float model's modules in the shape of the int8 model's nodes (for reports).
enum FNode<'a> {
    Leaf(String, &'a dyn Module),
    Residual { body: Vec<FNode<'a>>, shortcut: Option<Vec<FNode<'a>>>, relu: bool },
    Concat { branches: Vec<Vec<FNode<'a>>> },
}

fn float_nodes<'a>(seq: &'a Sequential, prefix: &str) -> Vec<FNode<'a>> {
    let mut out = Vec::new();
    for (name, m) in seq.layers() {
        let path = join(prefix, name);
        if let Some(inner) = m.as_any().downcast_ref::<Sequential>() {
            out.extend(float_nodes(inner, &path));
        } else if let Some(c) = m.as_any().downcast_ref::<Concat>() {
            out.push(FNode::Concat {
                branches: c.branches.iter().map(|(bn, b)| float_nodes(b, &join(&path, bn))).collect(),
            });
        } else if let Some(r) = m.as_any().downcast_ref::<Residual>() {
            out.push(FNode::Residual {
                body: float_nodes(&r.body, &path),
                shortcut: r.shortcut.as_ref().map(|(sn, s)| float_nodes(s, &join(&path, sn))),
                relu: r.relu.is_some(),
            });
        } else {
            out.push(FNode::Leaf(path, m.as_ref()));
        }
    }
    out
}

/// The int8 model: immutable, `Send + Sync`, one instance serves every thread.
#[derive(Debug)]
pub struct QuantizedModel {
    pub(crate) input_q: QuantU8,
    pub(crate) nodes: Vec<QNode>,
    pub(crate) plan: Vec<PlanEntry>,
    pub(crate) run: Run,
    /// Every node computes each image of a batch on its own (no custom layers), so a batch
    /// can be split between threads.
    images_apart: bool,
}

/// Whether every node computes each image of a batch on its own: true of every built-in op;
/// a custom layer (int8 or float) may mix images, so its model is never split by batch.
fn images_apart(nodes: &[QNode]) -> bool {
    nodes.iter().all(|n| match n {
        QNode::Op { op, .. } => match op {
            Op::Custom { .. } => false,
            Op::Float(m) | Op::SameParams(m) => crate::layers::computes_images_apart(m.as_ref()),
            Op::Conv { .. } | Op::Linear { .. } | Op::Lut { .. } | Op::Quantize { .. } | Op::Passthrough => true,
        },
        QNode::Residual { body, shortcut, .. } => images_apart(body) && shortcut.as_deref().is_none_or(images_apart),
        QNode::Concat { branches, .. } => branches.iter().all(|b| images_apart(b)),
    })
}

/// Joins the outputs of consecutive parts of a batch along dimension 0.
fn join_batch(parts: Vec<Value>) -> Value {
    if parts.iter().all(|p| matches!(p, Value::F32(_))) {
        let arrays: Vec<ArrayD<f32>> = parts.into_iter().map(Value::into_f32).collect();
        let views: Vec<_> = arrays.iter().map(ArrayD::view).collect();
        return Value::F32(ndarray::concatenate(ndarray::Axis(0), &views).expect("parts of one batch"));
    }
    let mut iter = parts.into_iter();
    let Some(Value::U8 { mut data, mut shape, q }) = iter.next() else {
        unreachable!("every op of a model gives every image the same kind of value")
    };
    for p in iter {
        let Value::U8 { data: d, shape: s, q: pq } = p else {
            unreachable!("every op of a model gives every image the same kind of value")
        };
        debug_assert!(pq == q && s[1..] == shape[1..], "parts of one batch");
        data.extend_from_slice(&d);
        shape[0] += s[0];
        scratch::give(d);
    }
    Value::U8 { data, shape, q }
}

/// Calibration batches must hold values: an empty one would teach the observers nothing
/// (PyTorch's observers skip it silently).
fn non_empty(x: &ArrayD<f32>) -> Result<()> {
    if x.is_empty() {
        return Err(NnError::Shape {
            module: "(model input)".into(),
            kind: "calibrate",
            expected: "a calibration batch with at least one value (an empty batch teaches the observers nothing)"
                .into(),
            got: x.shape().to_vec(),
        });
    }
    Ok(())
}

/// How a converted model runs: threads per layer, and the largest activation it may allocate.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub(crate) threads: usize,
    pub(crate) max_activation_bytes: usize,
}

/// The default of [`QuantizedModel::set_max_activation_bytes`]: 1 GiB.
pub const DEFAULT_MAX_ACTIVATION_BYTES: usize = 1 << 30;

/// The element count of an activation of shape `dims`, refused when it would exceed the
/// model's activation budget (or overflow): a hostile saved model (padding of 2^32, say) must
/// not be able to make a forward pass allocate without bound.
fn budget(dims: &[usize], elem_bytes: usize, run: Run, kind: &str) -> Result<usize> {
    let len = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match len.map(|l| (l, l.checked_mul(elem_bytes))) {
        Some((len, Some(bytes))) if bytes <= run.max_activation_bytes => Ok(len),
        _ => Err(NnError::Limit {
            module: String::new(),
            reason: format!(
                "{kind} output of shape {dims:?} ({elem_bytes}-byte elements) exceeds the activation limit of {} \
                 bytes; raise it with QuantizedModel::set_max_activation_bytes if the model is trusted",
                run.max_activation_bytes
            ),
        }),
    }
}

fn collect_quants<'a>(nodes: &'a [QNode], out: &mut Vec<(&'a str, QuantU8)>) {
    for n in nodes {
        match n {
            QNode::Op { name, op, .. } => match op {
                Op::Conv { out: o, .. } | Op::Linear { out: o, .. } => {
                    out.push((name.as_str(), QuantU8 { scale: o.scale, zero_point: o.zero_point }))
                }
                Op::Lut { out_q, .. } | Op::Custom { out_q, .. } | Op::Quantize { out_q } => {
                    out.push((name.as_str(), *out_q))
                }
                _ => {}
            },
            QNode::Residual { name, body, shortcut, add_q, .. } => {
                collect_quants(body, out);
                if let Some(s) = shortcut {
                    collect_quants(s, out);
                }
                out.push((name.as_str(), *add_q));
            }
            QNode::Concat { name, branches, out_q, .. } => {
                for b in branches {
                    collect_quants(b, out);
                }
                out.push((name.as_str(), *out_q));
            }
        }
    }
}

/// A pooled `u8` output buffer of shape `dims`, within the budget.
fn out_buf(dims: &[usize], run: Run, kind: &str) -> Result<Vec<u8>> {
    Ok(scratch::take(budget(dims, 1, run, kind)?))
}

impl QuantizedModel {
    /// Threads one call runs on (default 1: one call, one core; serve concurrent requests
    /// from several threads instead, or raise this for the lowest latency of a single call).
    /// A forward pass runs on a pool of this many threads, entered once per call. A batch of
    /// at least as many images as threads is split between them, each running the whole
    /// model on its share (unless the model holds a custom layer, which may mix images);
    /// otherwise each convolution and linear layer splits its own work. Results are
    /// identical for every count.
    pub fn set_threads(&mut self, threads: usize) {
        self.run.threads = threads.max(1);
    }

    /// See [`QuantizedModel::set_threads`].
    pub fn threads(&self) -> usize {
        self.run.threads
    }

    /// The largest activation one layer may produce, in bytes (default
    /// [`DEFAULT_MAX_ACTIVATION_BYTES`], 1 GiB). A layer whose output would be larger fails
    /// with [`NnError::Limit`] before allocating: a server running models from files it does
    /// not trust sets this to its per-request memory budget.
    pub fn set_max_activation_bytes(&mut self, bytes: usize) {
        self.run.max_activation_bytes = bytes;
    }

    /// See [`QuantizedModel::set_max_activation_bytes`].
    pub fn max_activation_bytes(&self) -> usize {
        self.run.max_activation_bytes
    }

    pub(crate) fn assemble(input_q: QuantU8, nodes: Vec<QNode>, plan: Vec<PlanEntry>) -> QuantizedModel {
        let run = Run { threads: 1, max_activation_bytes: DEFAULT_MAX_ACTIVATION_BYTES };
        let images_apart = images_apart(&nodes);
        QuantizedModel { input_q, nodes, plan, run, images_apart }
    }

    /// How every module runs (int8, float and why).
    pub fn plan(&self) -> &[PlanEntry] {
        &self.plan
    }

    /// The parameters the model input is quantized with.
    pub fn input_quant(&self) -> QuantU8 {
        self.input_q
    }

    /// The output parameters of every int8 layer and addition that chooses its own, by name.
    pub fn output_quants(&self) -> Vec<(&str, QuantU8)> {
        let mut out = Vec::new();
        collect_quants(&self.nodes, &mut out);
        out
    }

    /// Runs the int8 model and `float` (the same model, fused the same way, in float) side by
    /// side on `x` and reports, per module, how it ran and how far its output is from the
    /// float one (PyTorch's Numeric Suite, `compare_model_outputs`).
    ///
    /// # Errors
    /// A float model whose modules do not match this one's, or an input neither can take.
    pub fn report(&self, float: &Sequential, x: &ArrayD<f32>) -> Result<Vec<LayerReport>> {
        let fl = float_nodes(float, "");
        let mut out = Vec::new();
        report_nodes(&fl, &self.nodes, x.clone(), Value::F32(x.clone()), &mut out)?;
        for (r, entry) in out.iter_mut().zip(&self.plan) {
            r.name.clone_from(&entry.name);
            r.mode = entry.mode.clone();
            r.kind = entry.kind;
        }
        Ok(out)
    }

    /// Runs the int8 model and returns its last value (quantized logits for a model that
    /// ends in an int8 layer).
    ///
    /// # Errors
    /// An input the model cannot take (the message names the module and the shapes).
    pub fn forward_value(&self, x: &ArrayD<f32>) -> Result<Value> {
        let threads = self.run.threads;
        let images = if x.ndim() >= 2 { x.shape()[0] } else { 0 };
        // One entry into the kernels' thread pool for the whole pass: the layers' parallel
        // kernels then run in place on the pool, not handed over (and waited for) one by one.
        qkernels::with_threads(threads, || {
            if threads > 1 && images >= threads && self.images_apart {
                // Whole-model work per thread: no per-layer splits and joins at all.
                use rayon::prelude::*;
                let per = images.div_ceil(threads);
                let one = Run { threads: 1, ..self.run };
                let parts: Vec<usize> = (0..images).step_by(per).collect();
                let outs = parts
                    .into_par_iter()
                    .map(|start| {
                        let part = x.slice_axis(ndarray::Axis(0), (start..(start + per).min(images)).into());
                        self.eval_input(part, one)
                    })
                    .collect::<Result<Vec<Value>>>()?;
                Ok(join_batch(outs))
            } else {
                self.eval_input(x.view(), self.run)
            }
        })
    }

    fn eval_input(&self, x: ndarray::ArrayViewD<'_, f32>, run: Run) -> Result<Value> {
        // A first layer that runs in int8 would quantize the input with the input's
        // parameters anyway: do it here, straight from the caller's array (no float copy).
        let starts_int8 = matches!(
            self.nodes.first(),
            Some(QNode::Op { op: Op::Conv { .. } | Op::Linear { .. } | Op::Lut { .. } | Op::Custom { .. }, in_q, .. })
                if *in_q == self.input_q
        );
        let input = if starts_int8 {
            Value::quantize(x, self.input_q).map_err(|e| NnError::Op { module: "(model input)".into(), source: e })?
        } else {
            Value::F32(x.to_owned())
        };
        eval_nodes(&self.nodes, input, run)
    }

    /// Runs the int8 model; float output (dequantized at the end).
    ///
    /// # Errors
    /// As [`QuantizedModel::forward_value`].
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(self.forward_value(x)?.into_f32())
    }

    fn quantized(v: Value, q_if_float: QuantU8) -> Result<(Vec<u8>, Vec<usize>, QuantU8)> {
        match v {
            Value::U8 { data, shape, q } => Ok((data, shape, q)),
            Value::F32(a) => {
                match Value::quantize(a.view(), q_if_float)
                    .map_err(|e| NnError::Op { module: String::new(), source: e })?
                {
                    Value::U8 { data, shape, q } => Ok((data, shape, q)),
                    Value::F32(_) => unreachable!("quantize returns U8"),
                }
            }
        }
    }

    fn step(op: &Op, in_q: QuantU8, cur: Value, run: Run) -> Result<Value> {
        let threads = run.threads;
        let op_err = |e| NnError::Op { module: String::new(), source: e };
        let shape_err = |kind: &'static str, expected: &str, got: &[usize]| NnError::Shape {
            module: String::new(),
            kind,
            expected: expected.to_string(),
            got: got.to_vec(),
        };
        Ok(match op {
            Op::Passthrough => cur,
            Op::Quantize { out_q } => match cur {
                Value::U8 { q, .. } if q == *out_q => cur,
                other => Value::quantize(other.into_f32().view(), *out_q).map_err(op_err)?,
            },
            // Float stays float: the next int8 op quantizes it with this module's observed
            // parameters (its `in_q`), and consecutive float modules lose nothing.
            Op::Float(module) => Value::F32(module.forward(&cur.into_f32())?),
            Op::Conv { packed, out, .. } => {
                let (data, shape, q) = Self::quantized(cur, in_q)?;
                let data = Input::new(data);
                let [n, c, h, w] = shape[..] else { return Err(shape_err("Conv2d", "a 4-D NCHW input", &shape)) };
                let (oh, ow) = packed.output_hw(h, w).map_err(op_err)?;
                let oc = packed.out_channels();
                let mut y = out_buf(&[n, oh, ow, oc], run, "Conv2d")?;
                packed.forward_u8(&Value::image(&data, &[n, c, h, w], q), *out, &mut y, threads).map_err(op_err)?;
                Value::U8 {
                    data: y,
                    shape: vec![n, oc, oh, ow],
                    q: QuantU8 { scale: out.scale, zero_point: out.zero_point },
                }
            }
            Op::Linear { packed, out } => {
                let (data, shape, q) = Self::quantized(cur, in_q)?;
                let data = Input::new(data);
                let [m, k] = shape[..] else {
                    return Err(shape_err("Linear", "a 2-D [batch, features] input", &shape));
                };
                let n = packed.weights().n();
                let mut y = out_buf(&[m, n], run, "Linear")?;
                let a = QMatrix { data: &data, m, k, lda: k, scale: q.scale, zero_point: q.zero_point };
                packed.forward(&a, GemmOutput::U8 { data: &mut y, ldc: n, quant: *out }, threads).map_err(op_err)?;
                Value::U8 { data: y, shape: vec![m, n], q: QuantU8 { scale: out.scale, zero_point: out.zero_point } }
            }
            Op::Lut { op, in_q: table_q, out_q, tables } => {
                let (data, shape, q) = Self::quantized(cur, in_q)?;
                let data = Input::new(data);
                let mut y = scratch::take(data.len());
                if q == *table_q {
                    tables.apply(&data, &mut y).map_err(op_err)?;
                } else {
                    op.tables(q, *out_q).apply(&data, &mut y).map_err(op_err)?;
                }
                Value::U8 { data: y, shape, q: *out_q }
            }
            Op::Custom { layer, out_q } => {
                let (data, shape, _) = Self::quantized(cur, in_q)?;
                let data = Input::new(data);
                let (y, shape) = layer.forward_u8(&data, &shape)?;
                Value::U8 { data: y, shape, q: *out_q }
            }
            Op::SameParams(m) => match cur {
                Value::F32(a) => {
                    if let (Some(p), [n, c, ..]) = (m.as_any().downcast_ref::<AdaptiveAvgPool2d>(), a.shape()) {
                        budget(&[*n, *c, p.0, p.1], 4, run, "AdaptiveAvgPool2d")?;
                    }
                    Value::F32(m.forward(&a)?)
                }
                Value::U8 { data, shape, q } => {
                    let data = Input::new(data);
                    let a = m.as_any();
                    if let Some(p) = a.downcast_ref::<AdaptiveAvgPool2d>() {
                        let [n, c, h, w] = shape[..] else {
                            return Err(shape_err("AdaptiveAvgPool2d", "a 4-D NCHW input", &shape));
                        };
                        let mut y = out_buf(&[n, p.0, p.1, c], run, "AdaptiveAvgPool2d")?;
                        adaptive_avg_pool2d(&Value::image(&data, &[n, c, h, w], q), (p.0, p.1), q, &mut y)
                            .map_err(op_err)?;
                        Value::U8 { data: y, shape: vec![n, c, p.0, p.1], q }
                    } else if let Some(mp) = a.downcast_ref::<MaxPool2d>() {
                        let [n, c, h, w] = shape[..] else {
                            return Err(shape_err("MaxPool2d", "a 4-D NCHW input", &shape));
                        };
                        let (oh, ow) = mp.0.output_hw(h, w).map_err(op_err)?;
                        let mut y = out_buf(&[n, oh, ow, c], run, "MaxPool2d")?;
                        qkernels::max_pool2d(&Value::image(&data, &[n, c, h, w], q), &mp.0, &mut y).map_err(op_err)?;
                        Value::U8 { data: y, shape: vec![n, c, oh, ow], q }
                    } else if let Some(ap) = a.downcast_ref::<AvgPool2d>() {
                        let [n, c, h, w] = shape[..] else {
                            return Err(shape_err("AvgPool2d", "a 4-D NCHW input", &shape));
                        };
                        let (oh, ow) = ap.0.output_hw(h, w).map_err(op_err)?;
                        let mut y = out_buf(&[n, oh, ow, c], run, "AvgPool2d")?;
                        qkernels::avg_pool2d(&Value::image(&data, &[n, c, h, w], q), &ap.0, q, &mut y)
                            .map_err(op_err)?;
                        Value::U8 { data: y, shape: vec![n, c, oh, ow], q }
                    } else if a.is::<Flatten>() {
                        if let [n, c, h, w] = shape[..] {
                            let mut y = scratch::take(data.len());
                            flatten_nchw_order(&Value::image(&data, &[n, c, h, w], q), &mut y).map_err(op_err)?;
                            Value::U8 { data: y, shape: vec![n, c * h * w], q }
                        } else {
                            Value::U8 { data: data.into_inner(), shape, q }
                        }
                    } else {
                        let op = if a.is::<ReLU6>() { UnaryOp::Relu6 } else { UnaryOp::Relu };
                        let mut y = scratch::take(data.len());
                        op.tables(q, q).apply(&data, &mut y).map_err(op_err)?;
                        Value::U8 { data: y, shape, q }
                    }
                }
            },
        })
    }
}

fn mismatch(name: &str) -> NnError {
    NnError::Fusion {
        modules: vec![name.to_string()],
        reason: "the float model passed to report() must be the converted model's float original, fused the same way"
            .into(),
    }
}

/// Adds two values in int8 (each quantized with its branch's parameters if it is float), or
/// in float for a residual kept in float.
fn residual_add(
    b: Value,
    s: Value,
    body_q: QuantU8,
    short_q: QuantU8,
    add_q: QuantU8,
    relu: bool,
    int8: bool,
) -> Result<Value> {
    if !int8 {
        let mut y = b.into_f32() + s.into_f32();
        if relu {
            y.mapv_inplace(|v| v.max(0.0));
        }
        return Ok(Value::F32(y));
    }
    let (bd, bs, bq) = QuantizedModel::quantized(b, body_q)?;
    let (sd, ss, sq) = QuantizedModel::quantized(s, short_q)?;
    if bs != ss {
        return Err(NnError::Shape {
            module: String::new(),
            kind: "Residual add",
            expected: format!("the shortcut's shape {ss:?}"),
            got: bs,
        });
    }
    let (bd, sd) = (Input::new(bd), Input::new(sd));
    let mut y = scratch::take(bd.len());
    // ReLU after the addition keeps its parameters: Q(max(c, 0)) = max(Q(c), zp).
    qkernels::add(&bd, bq, &sd, sq, &mut y, add_q, relu)
        .map_err(|e| NnError::Op { module: String::new(), source: e })?;
    Ok(Value::U8 { data: y, shape: bs, q: add_q })
}

/// Concatenates branch outputs along channels in int8 (requantizing to `out_q`; a float
/// branch output is first quantized with its observed parameters), or in float for a
/// concatenation kept in float.
fn concat_values(parts: Vec<Value>, branch_q: &[QuantU8], out_q: QuantU8, int8: bool, name: &str) -> Result<Value> {
    if !int8 {
        let parts: Vec<ArrayD<f32>> = parts.into_iter().map(Value::into_f32).collect();
        return Ok(Value::F32(cat_dim1(&parts, name)?));
    }
    if parts.iter().all(|p| matches!(p, Value::U8 { shape, .. } if shape.len() == 2)) {
        // PyTorch's `quantized::cat` off its channels-last path: dequantize, concatenate,
        // quantize.
        let floats: Vec<ArrayD<f32>> = parts.into_iter().map(Value::into_f32).collect();
        let y = cat_dim1(&floats, name)?;
        return Value::quantize(y.view(), out_q).map_err(|e| NnError::Op { module: name.to_string(), source: e });
    }
    let mut quantized = Vec::with_capacity(parts.len());
    for (v, q) in parts.into_iter().zip(branch_q) {
        quantized.push(QuantizedModel::quantized(v, *q)?);
    }
    let dims = |s: &[usize]| match *s {
        [n, c, h, w] => Some((n, h, w, c)),
        [n, c] => Some((n, 1, 1, c)),
        _ => None,
    };
    let first = &quantized[0].1;
    let Some((n, h, w, _)) = dims(first) else {
        return Err(NnError::Shape {
            module: name.to_string(),
            kind: "Concat",
            expected: "4-D [batch, channels, height, width] or 2-D [batch, features] branch outputs".into(),
            got: first.clone(),
        });
    };
    let mut images = Vec::with_capacity(quantized.len());
    let mut channels = 0;
    for (data, shape, q) in &quantized {
        match dims(shape) {
            Some((bn, bh, bw, c)) if (bn, bh, bw) == (n, h, w) && shape.len() == first.len() => {
                channels += c;
                images.push(qkernels::QImage { data, n, h, w, c, scale: q.scale, zero_point: q.zero_point });
            }
            _ => {
                return Err(NnError::Shape {
                    module: name.to_string(),
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
    qkernels::cat_channels(&images, &mut out, out_q)
        .map_err(|e| NnError::Op { module: name.to_string(), source: e })?;
    let shape = if first.len() == 4 { vec![n, channels, h, w] } else { vec![n, channels] };
    drop(images);
    for (data, _, _) in quantized {
        scratch::give(data);
    }
    Ok(Value::U8 { data: out, shape, q: out_q })
}

/// A copy of `v` in a pooled buffer (for the branches that share an input).
fn pooled_copy(v: &Value) -> Value {
    match v {
        Value::F32(a) => Value::F32(a.clone()),
        Value::U8 { data, shape, q } => {
            let mut d = scratch::take(data.len());
            d.copy_from_slice(data);
            Value::U8 { data: d, shape: shape.clone(), q: *q }
        }
    }
}

fn eval_nodes(nodes: &[QNode], x: Value, run: Run) -> Result<Value> {
    let mut cur = x;
    for n in nodes {
        cur = match n {
            QNode::Op { name, in_q, op } => QuantizedModel::step(op, *in_q, cur, run).map_err(|e| e.within(name))?,
            QNode::Residual { name, body, shortcut, body_q, short_q, add_q, relu, int8 } => {
                let b = eval_nodes(body, pooled_copy(&cur), run)?;
                let s = match shortcut {
                    Some(sc) => eval_nodes(sc, cur, run)?,
                    None => cur,
                };
                residual_add(b, s, *body_q, *short_q, *add_q, *relu, *int8).map_err(|e| e.within(name))?
            }
            QNode::Concat { name, branches, branch_q, out_q, int8 } => {
                let parts =
                    branches.iter().map(|b| eval_nodes(b, pooled_copy(&cur), run)).collect::<Result<Vec<_>>>()?;
                if let Value::U8 { data, .. } = cur {
                    scratch::give(data);
                }
                concat_values(parts, branch_q, *out_q, *int8, name)?
            }
        };
    }
    Ok(cur)
}

fn report_nodes(
    fl: &[FNode<'_>],
    nodes: &[QNode],
    x: ArrayD<f32>,
    q: Value,
    out: &mut Vec<LayerReport>,
) -> Result<(ArrayD<f32>, Value)> {
    if fl.len() != nodes.len() {
        return Err(mismatch("(model)"));
    }
    let (mut fcur, mut qcur) = (x, q);
    for (f, n) in fl.iter().zip(nodes) {
        match (f, n) {
            (FNode::Leaf(fname, fm), QNode::Op { name, in_q, op }) if fname == name => {
                fcur = fm.forward(&fcur).map_err(|e| e.within(name))?;
                qcur = QuantizedModel::step(op, *in_q, qcur, Run { threads: 1, max_activation_bytes: usize::MAX })
                    .map_err(|e| e.within(name))?;
                let sqnr = (!matches!(op, Op::Passthrough)).then(|| sqnr_db(&fcur, &qcur.to_f32()));
                out.push(LayerReport {
                    name: name.clone(),
                    kind: fm.kind(),
                    mode: Mode::Passthrough,
                    sqnr_db: sqnr,
                    weight_sqnr_db: weight_sqnr(*fm, op),
                });
            }
            (
                FNode::Residual { body: fb, shortcut: fs, relu: frelu },
                QNode::Residual { name, body, shortcut, body_q, short_q, add_q, relu, int8 },
            ) => {
                let (bf, bq) = report_nodes(fb, body, fcur.clone(), qcur.clone(), out)?;
                let (sf, sq) = match (fs, shortcut) {
                    (Some(fs), Some(s)) => report_nodes(fs, s, fcur.clone(), qcur.clone(), out)?,
                    (None, None) => (fcur.clone(), qcur.clone()),
                    _ => return Err(mismatch(name)),
                };
                let mut y = bf + sf;
                qcur = residual_add(bq, sq, *body_q, *short_q, *add_q, *relu, *int8).map_err(|e| e.within(name))?;
                if *frelu {
                    y.mapv_inplace(|v| v.max(0.0));
                }
                let sqnr = sqnr_db(&y, &qcur.to_f32());
                out.push(LayerReport {
                    name: name.clone(),
                    kind: "add",
                    mode: Mode::Passthrough,
                    sqnr_db: Some(sqnr),
                    weight_sqnr_db: None,
                });
                if *relu {
                    out.push(LayerReport {
                        name: format!("{name} relu"),
                        kind: "ReLU",
                        mode: Mode::Passthrough,
                        sqnr_db: Some(sqnr),
                        weight_sqnr_db: None,
                    });
                }
                fcur = y;
            }
            (FNode::Concat { branches: fb }, QNode::Concat { name, branches, branch_q, out_q, int8 })
                if fb.len() == branches.len() =>
            {
                let (mut fparts, mut qparts) = (Vec::new(), Vec::new());
                for (f, q) in fb.iter().zip(branches) {
                    let (fy, qy) = report_nodes(f, q, fcur.clone(), qcur.clone(), out)?;
                    fparts.push(fy);
                    qparts.push(qy);
                }
                fcur = cat_dim1(&fparts, name)?;
                qcur = concat_values(qparts, branch_q, *out_q, *int8, name)?;
                out.push(LayerReport {
                    name: name.clone(),
                    kind: "cat",
                    mode: Mode::Passthrough,
                    sqnr_db: Some(sqnr_db(&fcur, &qcur.to_f32())),
                    weight_sqnr_db: None,
                });
            }
            _ => {
                return Err(mismatch(&match n {
                    QNode::Op { name, .. } | QNode::Residual { name, .. } | QNode::Concat { name, .. } => name.clone(),
                }))
            }
        }
    }
    Ok((fcur, qcur))
}
