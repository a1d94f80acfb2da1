//! The quantization workflow: [`prepare`] attaches observers, [`Prepared::calibrate`] runs
//! data through the float model, [`Prepared::convert`] builds the int8 model. Modules without
//! an int8 implementation (or kept in float by configuration) run in float between an
//! automatic dequantize and quantize, and the model says so ([`QuantizedModel::plan`]).

use ndarray::{ArrayD, IxDyn};
use qkernels::{QImage, QuantU8};
use std::sync::Arc;

use qobserve::{Affine, Fitted, Observed, Observer, QConfig};
use qtensor::{QTensor, QuantRange};

use crate::bias::{corrected_bias, weight_and_bias, TapSums};
use crate::config::QConfigMapping;
use crate::error::{NnError, Result};
use crate::fuse::nearest;
use crate::graph::{readers, AsModule, FloatKernels, Graph, Node, NodeOp, Tensor};
use crate::layers::{DeQuantStub, QuantStub};
use crate::module::{Module, Sequential};
use crate::ops::activation::ClampOp;
use crate::ops::add::AddOp;
use crate::ops::cat::CatOp;
use crate::ops::conv::ConvOp;
use crate::ops::fallback::FloatOp;
use crate::ops::matmul::MatMulOp;
use crate::ops::mul::MulOp;
use crate::ops::stubs::PassOp;
use crate::ops::{LowerCx, QOp};
use crate::scratch;

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
    Float(FloatReason),
    /// Dynamic quantization: int8 weights, the float input quantized on each call from its
    /// own range, float output ([`qobserve::QConfig::dynamic`]).
    Dynamic,
}

/// Why a module runs in float.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FloatReason {
    /// The configuration keeps it in float (`skip_name`, `skip_kind`, or no configuration
    /// reaches it).
    Configured,
    /// A layer without an int8 form: a custom layer that does not implement `Module::int8`.
    NoInt8 {
        /// Its kind.
        kind: String,
    },
    /// A batch-norm that was not fused into the layer before it.
    Unfused {
        /// Its kind.
        kind: String,
    },
    /// An op that runs in float by its nature (e.g. `Softmax`), in its own words.
    FloatOp {
        /// Why.
        why: String,
    },
    /// Where the quantized region ends (`DeQuantStub`).
    RegionEnd,
    /// Its configuration asks for dynamic quantization, which covers layers with a dynamic
    /// form (linear layers) only, as PyTorch's `quantize_dynamic` does.
    NoDynamic {
        /// Its kind.
        kind: String,
    },
    /// Its weights' quantizer is not affine or has no int8 kernel: it runs in float on its
    /// quantized weights (they are stored dequantized), as simulation computes it.
    SimulatedOnly {
        /// The quantizer.
        quantizer: String,
        /// Why int8 kernels cannot run it.
        why: String,
    },
    /// Part of the residual stream, kept in float by [`crate::ResidualStream::Float`]: an
    /// addition a `LayerNorm` reads, or a `LayerNorm` reading one.
    Residual,
}

impl std::fmt::Display for FloatReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FloatReason::Configured => write!(f, "kept in float by the configuration"),
            FloatReason::NoInt8 { kind } => write!(f, "no int8 implementation for {kind} (custom layer)"),
            FloatReason::Unfused { kind } => {
                write!(f, "a {kind} that was not fused into the layer before it (fuse first, or keep it in float)")
            }
            FloatReason::FloatOp { why } => write!(f, "{why}"),
            FloatReason::RegionEnd => write!(f, "DeQuantStub: the quantized region ends here"),
            FloatReason::NoDynamic { kind } => write!(
                f,
                "dynamic quantization covers layers with a dynamic form (Linear), as PyTorch's quantize_dynamic; \
                 this {kind} runs in float"
            ),
            FloatReason::SimulatedOnly { quantizer, why } => {
                write!(f, "simulated only: its weights' quantizer ({quantizer}) has no int8 kernel ({why}); it runs in float on its quantized weights")
            }
            FloatReason::Residual => write!(
                f,
                "the residual stream stays float (residual = float): an addition a LayerNorm reads, or that LayerNorm"
            ),
        }
    }
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
    /// Whether conversion corrected its bias for the mean its rounded weights add
    /// ([`crate::QConfigMapping::bias_correction`]).
    pub bias_corrected: bool,
}

fn mode_of(m: &dyn Module, q: Option<&QConfig>) -> Mode {
    let lowering = m.lowering();
    let a = m.as_any();
    if lowering == Mode::Passthrough || a.is::<DeQuantStub>() {
        return lowering;
    }
    match q {
        None if a.is::<QuantStub>() => Mode::Passthrough,
        None => Mode::Float(FloatReason::Configured),
        Some(c) if c.dynamic.is_some() => {
            if m.has_dynamic() {
                Mode::Dynamic
            } else if a.is::<QuantStub>() {
                Mode::Passthrough
            } else {
                Mode::Float(FloatReason::NoDynamic { kind: m.kind().to_string() })
            }
        }
        Some(_) => lowering,
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

fn observe(obs: &mut dyn Observer, name: &str, y: &ArrayD<f32>) -> Result<()> {
    obs.observe(y.view()).map_err(|e| NnError::Observe(e.for_tensor(&format!("{name} output"))))
}

/// What `prepare` decided for one node: how it runs, its configuration, its observer.
#[derive(Debug)]
struct PNode {
    mode: Mode,
    cfg: Option<QConfig>,
    /// Index in [`Prepared`]'s observer list.
    obs: Option<usize>,
    /// An int8 addition whose only reader is an int8 ReLU: it is observed after the ReLU
    /// (conversion fuses the two, as PyTorch's `add_relu` and ONNX Runtime do), so its
    /// parameters spend no codes on negative sums the ReLU discards.
    relu_after: bool,
}

/// A model with observers attached, ready for calibration.
#[derive(Debug)]
pub struct Prepared {
    graph: Graph,
    /// The (fused) graph's float kernels, which calibration runs.
    kernels: FloatKernels,
    /// One per graph node.
    nodes: Vec<PNode>,
    plan: Vec<PlanEntry>,
    /// The graph inputs' configurations (by input name or the kind "input").
    input_cfgs: Vec<Option<QConfig>>,
    /// The graph inputs' observers first, then the nodes' as their indices say.
    obs: Vec<Box<dyn Observer>>,
    /// Untouched copies of the observers, to start parallel workers from.
    fresh: Vec<Box<dyn Observer>>,
    batches: usize,
    /// What `prepare` fused.
    fused: Vec<crate::Fused>,
    strict: bool,
    /// How sigmoid-like tables choose their output parameters.
    tables: crate::TableOutputs,
    /// Per node, its weights as simulation runs them (fitted once: weights do not change).
    sim_weights: Option<Vec<Option<ArrayD<f32>>>>,
    /// Per node, the input taps bias correction sums (static int8 `Conv2d` and `Linear`
    /// layers, when the mapping corrects biases).
    taps: Vec<Option<TapSums>>,
}

/// How a node that is not a layer (an addition, product or concatenation) runs: in int8
/// where configured, else in float.
fn join_mode(cfg: Option<&QConfig>, kind: &str) -> Mode {
    match cfg {
        None => Mode::Float(FloatReason::Configured),
        Some(c) if c.dynamic.is_some() => Mode::Float(FloatReason::NoDynamic { kind: kind.to_string() }),
        Some(_) => Mode::Int8,
    }
}

/// Attaches observers to `model` (a container tree, fused or not, or a [`Graph`]) as
/// `mapping` says, after fusing it ([`QConfigMapping::fusion`], on by default): one on every
/// model input (configured by the input's name, or the kind `"input"`), one on the output of
/// every module whose int8 output needs parameters of its own (and of every float module,
/// which may feed an int8 one), one on every addition, product and concatenation.
///
/// # Errors
/// A name override in `mapping` that matches no module (with the nearest names), a kind no
/// module has, a fusion that fails, or an invalid observer configuration.
pub fn prepare(model: impl Into<Graph>, mapping: &QConfigMapping) -> Result<Prepared> {
    let mut graph: Graph = model.into();
    let fused = if mapping.fuses() { crate::fuse::fuse_graph(&mut graph)? } else { Vec::new() };
    graph.touch();
    let kernels = graph.float_kernels()?;
    let mut obs = Vec::new();
    // A model input is configured by its name (`GraphBuilder::input`'s; "input" for a
    // container model) and the kind "input".
    let input_cfgs: Vec<Option<QConfig>> =
        graph.input_names.iter().map(|name| mapping.resolve(name, "input").cloned()).collect();
    for (name, cfg) in graph.input_names.iter().zip(&input_cfgs) {
        obs.push(activation_observer(cfg.as_ref(), &format!("{name} (model input)"))?);
    }
    let (mut nodes, mut plan) = (Vec::new(), Vec::new());
    for n in &graph.nodes {
        let kind = n.op.kind_with(|m| m.kind());
        let cfg = mapping.resolve(crate::graph::module_path(&n.name), kind).cloned();
        let mode = match &n.op {
            NodeOp::Layer(m) => match mode_of(m.as_ref(), cfg.as_ref()) {
                Mode::Int8SameParams
                    if m.may_observe_output() && mapping.pool_output_params() == crate::PoolOutputs::Observed =>
                {
                    Mode::Int8
                }
                // Weights whose quantizer int8 kernels cannot run: float on the quantized weights.
                Mode::Int8 if has_weight(m.as_ref()) => {
                    match cfg.as_ref().and_then(|c| c.weight_quantizer.as_ref()).map(|q| (q.name(), q.int8())) {
                        Some((quantizer, Err(why))) => Mode::Float(FloatReason::SimulatedOnly { quantizer, why }),
                        _ => Mode::Int8,
                    }
                }
                mode => mode,
            },
            _ => join_mode(cfg.as_ref(), kind),
        };
        let index = if matches!(mode, Mode::Int8 | Mode::Float(_) | Mode::Dynamic) {
            obs.push(activation_observer(cfg.as_ref(), &n.name)?);
            Some(obs.len() - 1)
        } else {
            None
        };
        plan.push(PlanEntry { name: n.name.clone(), kind, mode: mode.clone(), bias_corrected: false });
        nodes.push(PNode { mode, cfg, obs: index, relu_after: false });
    }
    if mapping.residual_stream() == crate::ResidualStream::Float {
        float_residual(&graph, &mut nodes, &mut plan);
    }
    let taps = graph
        .nodes
        .iter()
        .zip(&nodes)
        .map(|(n, p)| match (&n.op, p.cfg.as_ref()) {
            (NodeOp::Layer(m), Some(cfg))
                if p.mode == Mode::Int8 && mapping.corrects_bias_of(crate::graph::module_path(&n.name), m.kind()) =>
            {
                TapSums::for_module(m.as_ref(), cfg)
            }
            _ => None,
        })
        .collect();
    let readers = readers(&graph);
    for i in 0..graph.nodes.len() {
        let out = graph.nodes[i].output;
        if !matches!(graph.nodes[i].op, NodeOp::Add) || nodes[i].mode != Mode::Int8 || readers[out.0] != 1 {
            continue;
        }
        let Some(j) = graph.nodes.iter().position(|n| n.inputs.contains(&out)) else { continue };
        let relu = matches!(&graph.nodes[j].op, NodeOp::Layer(m) if m.as_any().is::<crate::layers::ReLU>());
        nodes[i].relu_after = relu && nodes[j].mode == Mode::Int8SameParams;
    }
    // Container names are prefixes of their layers' names: patterns naming them match.
    let names: Vec<String> = plan
        .iter()
        .map(|e| crate::graph::module_path(&e.name).to_string())
        .chain(graph.input_names.iter().cloned())
        .collect();
    for (pattern, is_glob) in mapping.name_patterns() {
        if !QConfigMapping::pattern_matches_any(pattern, is_glob, &names) {
            let items: Vec<(&str, &str)> = plan
                .iter()
                .map(|e| (crate::graph::module_path(&e.name), e.kind))
                .chain(graph.input_names.iter().map(|n| (n.as_str(), "input")))
                .collect();
            return Err(NnError::UnknownModule {
                name: pattern.to_string(),
                suggestions: crate::fuse::nearest_with_kinds(pattern, &items),
            });
        }
    }
    let mut kinds: Vec<&str> = plan.iter().map(|e| e.kind).chain(["input"]).collect();
    kinds.sort_unstable();
    kinds.dedup();
    if let Some(unknown) = mapping.kind_names().find(|k| !kinds.contains(k)) {
        return Err(NnError::Config {
            module: "(configuration)".into(),
            reason: format!(
                "set_kind / skip_kind / bias_correction_kind name the kind '{unknown}', which no module of this \
                 model has{}; kinds are type names as PyTorch spells its classes (case-sensitive), and \"add\", \
                 \"mul\" and \"cat\" for additions, products and concatenations; this model has {}",
                nearest(unknown, &kinds.iter().map(|k| k.to_string()).collect::<Vec<_>>())
                    .first()
                    .map_or(String::new(), |k| format!(" (did you mean '{k}'?)")),
                kinds.join(", ")
            ),
        });
    }
    let fresh = obs.iter().map(|o| o.clone_box()).collect();
    Ok(Prepared {
        graph,
        kernels,
        nodes,
        plan,
        input_cfgs,
        obs,
        fresh,
        batches: 0,
        fused,
        strict: mapping.is_strict(),
        tables: mapping.table_output_params(),
        sim_weights: None,
        taps,
    })
}

/// [`crate::ResidualStream::Float`]: each int8 addition whose output a `LayerNorm` reads directly
/// runs in float, and so does each such `LayerNorm` that would run in int8.
fn float_residual(graph: &Graph, nodes: &mut [PNode], plan: &mut [PlanEntry]) {
    let mut producer = vec![None; graph.values];
    for (i, n) in graph.nodes.iter().enumerate() {
        producer[n.output.0] = Some(i);
    }
    let is_norm = |n: &Node<Box<dyn Module>>| matches!(&n.op, NodeOp::Layer(m) if m.as_any().is::<crate::ops::layernorm::LayerNorm>());
    for (j, n) in graph.nodes.iter().enumerate() {
        let Some(i) = n.inputs.first().and_then(|t| producer[t.0]) else { continue };
        if !is_norm(n) || !matches!(graph.nodes[i].op, NodeOp::Add) {
            continue;
        }
        for k in [i, j] {
            if nodes[k].mode == Mode::Int8 && (k == i || matches!(nodes[i].mode, Mode::Float(_))) {
                nodes[k].mode = Mode::Float(FloatReason::Residual);
                plan[k].mode = Mode::Float(FloatReason::Residual);
            }
        }
    }
}

/// One calibration batch, its float kernels on `threads` threads.
fn run_batch(
    graph: &Graph,
    (kernels, threads): (&FloatKernels, usize),
    nodes: &[PNode],
    x: &ArrayD<f32>,
    (obs, taps): (&mut [Box<dyn Observer>], &mut [Option<TapSums>]),
) -> Result<()> {
    if graph.inputs.len() != 1 {
        return Err(NnError::Shape {
            module: "(model input)".into(),
            kind: "calibrate",
            expected: format!(
                "{} inputs: calibrate a graph of several inputs with calibrate_inputs",
                graph.inputs.len()
            ),
            got: x.shape().to_vec(),
        });
    }
    run_batch_inputs(graph, (kernels, threads), nodes, std::slice::from_ref(x), (obs, taps))
}

fn run_batch_inputs(
    graph: &Graph,
    (kernels, threads): (&FloatKernels, usize),
    nodes: &[PNode],
    xs: &[ArrayD<f32>],
    (obs, taps): (&mut [Box<dyn Observer>], &mut [Option<TapSums>]),
) -> Result<()> {
    // Inside the kernels' pool for the whole batch: each layer's kernel call runs in place.
    qkernels::with_threads(threads, || {
        for (o, x) in obs.iter_mut().zip(xs) {
            o.observe(x.view()).map_err(|e| NnError::Observe(e.for_tensor("model input")))?;
        }
        // Bias correction's layers sum their input taps as they read them.
        let taps_of = |i: usize, x: &ArrayD<f32>| match taps.get_mut(i).and_then(Option::as_mut) {
            Some(t) => t.add(x, &graph.nodes[i].name).map(|()| None),
            None => Ok(None),
        };
        graph.run_f32_with(xs, Some((kernels, threads)), taps_of, |i, y| match nodes[i].obs {
            Some(k) if nodes[i].relu_after => {
                observe(obs[k].as_mut(), &graph.nodes[i].name, &crate::layers::map_same_layout(y, |v| v.max(0.0)))
            }
            Some(k) => observe(obs[k].as_mut(), &graph.nodes[i].name, y),
            None => Ok(()),
        })?;
        Ok(())
    })
}

impl Prepared {
    /// How every module will run.
    pub fn plan(&self) -> &[PlanEntry] {
        &self.plan
    }

    /// What `prepare` fused (nothing when [`QConfigMapping::fusion`] is off or the model
    /// came fused).
    pub fn fused(&self) -> &[crate::Fused] {
        &self.fused
    }

    /// How many batches were observed.
    pub fn batches_seen(&self) -> usize {
        self.batches
    }

    /// Runs one calibration batch through the float model, feeding every observer (a model
    /// whose batch is fixed, [`Graph::set_fixed_batch`], takes any multiple of it, as that
    /// many batches).
    ///
    /// # Errors
    /// A batch the model cannot take, or non-finite values (the message names the tensor).
    pub fn calibrate(&mut self, x: &ArrayD<f32>) -> Result<()> {
        non_empty(x)?;
        if let Some(parts) = crate::graph::chunks(self.graph.batch, std::slice::from_ref(x))? {
            for r in parts {
                self.calibrate(&x.slice_axis(ndarray::Axis(0), r.into()).to_owned())?;
            }
            return Ok(());
        }
        run_batch(&self.graph, (&self.kernels, 1), &self.nodes, x, (&mut self.obs, &mut self.taps))?;
        self.batches += 1;
        Ok(())
    }

    /// Runs one calibration batch through a graph of several inputs (one array per input,
    /// in the order they were declared).
    ///
    /// # Errors
    /// As [`Prepared::calibrate`], or a wrong number of inputs.
    pub fn calibrate_inputs(&mut self, xs: &[ArrayD<f32>]) -> Result<()> {
        xs.iter().try_for_each(non_empty)?;
        if let Some(parts) = crate::graph::chunks(self.graph.batch, xs)? {
            for r in parts {
                let part: Vec<ArrayD<f32>> =
                    xs.iter().map(|x| x.slice_axis(ndarray::Axis(0), r.clone().into()).to_owned()).collect();
                self.calibrate_inputs(&part)?;
            }
            return Ok(());
        }
        run_batch_inputs(&self.graph, (&self.kernels, 1), &self.nodes, xs, (&mut self.obs, &mut self.taps))?;
        self.batches += 1;
        Ok(())
    }

    /// Calibrates on many batches, on `threads` threads, with a progress bar on a terminal
    /// (a model whose batch is fixed takes each batch as chunks of it). The result is the
    /// one-thread result, whatever `threads` is:
    /// - When every observer merges exactly ([`Observer::merges_exactly`]: min-max and fixed
    ///   ones) and no bias is corrected ([`crate::QConfigMapping::bias_correction`]), up to
    ///   `threads` workers take consecutive runs of batches, each with its own observers,
    ///   merged in batch order at the end.
    /// - Otherwise (histograms, moving averages, observers that do not say) one worker sees
    ///   every batch in order.
    ///
    /// Each worker's float convolutions and linear layers run on its share of the threads
    /// (`threads / workers`), whose results do not depend on the count: one worker, or one
    /// batch, still uses every thread.
    ///
    /// # Errors
    /// As [`Prepared::calibrate`], or observers that cannot merge.
    pub fn calibrate_batches(&mut self, batches: &[ArrayD<f32>], threads: usize) -> Result<()> {
        use std::io::IsTerminal;
        batches.iter().try_for_each(non_empty)?;
        // A model whose batch is fixed takes each batch in chunks of it.
        if let Some(b) = self.graph.batch.filter(|&b| batches.iter().any(|x| x.shape().first() != Some(&b))) {
            let mut split = Vec::new();
            for x in batches {
                match crate::graph::chunks(Some(b), std::slice::from_ref(x))? {
                    Some(parts) => {
                        split.extend(parts.into_iter().map(|r| x.slice_axis(ndarray::Axis(0), r.into()).to_owned()))
                    }
                    None => split.push(x.clone()),
                }
            }
            return self.calibrate_batches(&split, threads);
        }
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(batches.len() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("calibrating {bar:40} {pos}/{len} batches ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        // As many workers as there are batches, up to `threads`, each with its share of the
        // threads for its layers' kernels: one batch gets every thread.
        let threads = threads.max(1);
        // Bias correction's sums are added in batch order: one worker, like observers
        // that do not merge exactly.
        let exact = self.fresh.iter().all(|o| o.merges_exactly()) && self.taps.iter().all(Option::is_none);
        let workers = if exact { threads.min(batches.len().max(1)) } else { 1 };
        let per_worker = threads / workers;
        if workers == 1 {
            for x in batches {
                run_batch(&self.graph, (&self.kernels, per_worker), &self.nodes, x, (&mut self.obs, &mut self.taps))?;
                self.batches += 1;
                if let Some(b) = &bar {
                    b.inc(1);
                }
            }
        } else {
            let per = batches.len().div_ceil(workers);
            let (graph, kernels, nodes) = (&self.graph, &self.kernels, &self.nodes);
            let results: Vec<Result<Vec<Box<dyn Observer>>>> = std::thread::scope(|sc| {
                let handles: Vec<_> = batches
                    .chunks(per)
                    .map(|chunk| {
                        let mut obs: Vec<Box<dyn Observer>> = self.fresh.iter().map(|o| o.clone_box()).collect();
                        let bar = bar.clone();
                        sc.spawn(move || -> Result<Vec<Box<dyn Observer>>> {
                            for x in chunk {
                                run_batch(graph, (kernels, per_worker), nodes, x, (&mut obs, &mut []))?;
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
        let inputs = self.graph.inputs.len();
        let mut out: Vec<(String, &dyn Observer)> =
            self.obs[..inputs].iter().map(|o| ("model input".to_string(), o.as_ref())).collect();
        for (n, p) in self.graph.nodes.iter().zip(&self.nodes) {
            if let Some(k) = p.obs {
                out.push((n.name.clone(), self.obs[k].as_ref()));
            }
        }
        out
    }

    /// Runs the model as its configuration quantizes it, in float (simulation, or fake
    /// quantization): every value an int8 op would read or write is quantized and dequantized
    /// by its activation quantizer fitted to what calibration observed (a value that keeps its
    /// input's parameters, by its input's), and every layer that runs in int8, or in float on
    /// quantized weights, computes with its `weight` tensor quantized and dequantized by its
    /// weight quantizer; a dynamically quantized layer's input is quantized and dequantized
    /// per call from its own range, as the int8 layer does. Custom layers take part like
    /// built-in ones. Methods int8 kernels
    /// cannot run (a log2 grid, per-group weights) are measured here before anything is
    /// converted; for affine methods the result tracks the int8 model's closely (the int8
    /// model accumulates exactly where this rounds in `f32`, and sigmoid-like tables may use
    /// PyTorch's fixed output parameters (`TableOutputs`) where this uses the observed ones).
    ///
    /// # Errors
    /// Observers that saw no data (calibrate first), a quantizer that cannot fit, or an input
    /// the model cannot take.
    pub fn simulate(&mut self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        if self.graph.inputs.len() != 1 {
            return Err(NnError::Shape {
                module: "(model input)".into(),
                kind: "simulate",
                expected: format!(
                    "{} inputs: simulate a graph of several inputs with simulate_inputs",
                    self.graph.inputs.len()
                ),
                got: x.shape().to_vec(),
            });
        }
        Ok(self.simulate_inputs(std::slice::from_ref(x))?.swap_remove(0))
    }

    /// [`Prepared::simulate`] for a graph of several inputs; returns every graph output.
    ///
    /// # Errors
    /// As [`Prepared::simulate`].
    pub fn simulate_inputs(&mut self, xs: &[ArrayD<f32>]) -> Result<Vec<ArrayD<f32>>> {
        xs.iter().try_for_each(non_empty)?;
        let g = &self.graph;
        // Which values an int8 op reads: those are quantized where a float op produced them.
        let int8 = |m: &Mode| matches!(m, Mode::Int8 | Mode::Int8SameParams);
        let mut int8_read = vec![false; g.values];
        for (n, p) in g.nodes.iter().zip(&self.nodes) {
            if int8(&p.mode) {
                n.inputs.iter().for_each(|t| int8_read[t.0] = true);
            }
        }
        let mut value_fit: Vec<Option<Arc<dyn Fitted>>> = vec![None; g.values];
        for (k, t) in g.inputs.iter().enumerate() {
            if int8_read[t.0] {
                let f = activation_fit(self.obs[k].as_ref(), self.input_cfgs[k].as_ref(), "model input")?;
                value_fit[t.0] = Some(Arc::from(f));
            }
        }
        for (n, p) in g.nodes.iter().zip(&self.nodes) {
            value_fit[n.output.0] = match (&p.mode, p.obs) {
                (Mode::Int8SameParams, _) => match (&n.op, value_fit[n.inputs[0].0].clone()) {
                    // A scalar product keeps the codes and scales the grid.
                    (NodeOp::Layer(m), Some(inner)) if m.as_any().is::<crate::layers::MulScalar>() => {
                        let factor = m.as_any().downcast_ref::<crate::layers::MulScalar>().expect("checked").factor;
                        Some(Arc::new(crate::ops::scalar::ScaledFit { inner, factor }) as Arc<dyn Fitted>)
                    }
                    (_, fit) => fit,
                },
                (Mode::Int8 | Mode::Float(_) | Mode::Dynamic, Some(k)) if int8(&p.mode) || int8_read[n.output.0] => {
                    let tensor = format!("{} output", n.name);
                    Some(Arc::from(activation_fit(self.obs[k].as_ref(), p.cfg.as_ref(), &tensor)?))
                }
                _ => None,
            };
        }
        if self.sim_weights.is_none() {
            let mut weights = Vec::with_capacity(g.nodes.len());
            for (n, p) in g.nodes.iter().zip(&self.nodes) {
                let quantized =
                    matches!(p.mode, Mode::Int8 | Mode::Dynamic | Mode::Float(FloatReason::SimulatedOnly { .. }));
                weights.push(match (&n.op, p.cfg.as_ref()) {
                    (NodeOp::Layer(m), Some(cfg)) if quantized && has_weight(m.as_ref()) => {
                        let w = m.tensors().into_iter().find(|(k, _)| *k == "weight").map(|(_, w)| w.clone());
                        w.map(|w| fake_weights(&n.name, &w, cfg)).transpose()?
                    }
                    _ => None,
                });
            }
            self.sim_weights = Some(weights);
        }
        let inputs: Vec<ArrayD<f32>> = xs
            .iter()
            .zip(&g.inputs)
            .map(|(x, t)| match &value_fit[t.0] {
                Some(f) => f.fake_quantize(x).map_err(|e| NnError::Observe(e.for_tensor("model input"))),
                None => Ok(x.clone()),
            })
            .collect::<Result<_>>()?;
        // The quantized weights go in for the run and come out after it, whatever it returns.
        let swap = |graph: &mut Graph, weights: &mut [Option<ArrayD<f32>>]| {
            for (n, w) in graph.nodes.iter_mut().zip(weights.iter_mut()) {
                if let (NodeOp::Layer(m), Some(w)) = (&mut n.op, w.as_mut()) {
                    if let Some((_, t)) = m.tensors_mut().into_iter().find(|(k, _)| *k == "weight") {
                        std::mem::swap(t, w);
                    }
                }
            }
        };
        let mut weights = self.sim_weights.take().expect("fitted above");
        // Bias correction as conversion applies it, from the taps summed so far.
        let mut biases: Vec<Option<Option<ArrayD<f32>>>> = Vec::with_capacity(self.graph.nodes.len());
        for ((n, t), wq) in self.graph.nodes.iter_mut().zip(&self.taps).zip(&weights) {
            biases.push(match (&mut n.op, t, wq) {
                (NodeOp::Layer(m), Some(t), Some(wq)) => {
                    corrected_bias(m.as_mut(), t, wq).map(|(slot, b)| slot.replace(b))
                }
                _ => None,
            });
        }
        swap(&mut self.graph, &mut weights);
        let graph = &self.graph;
        let nodes = &self.nodes;
        // A dynamic layer's input is quantized per call, from its own range.
        let dynamic_input = |i: usize, x: &ArrayD<f32>| match (&nodes[i].mode, nodes[i].cfg.as_ref()) {
            (Mode::Dynamic, Some(cfg)) => {
                let how = cfg.dynamic.expect("dynamic nodes have a dynamic configuration");
                fake_quantize_dynamic(x, how)
                    .map(Some)
                    .map_err(|e| NnError::Op { module: graph.nodes[i].name.clone(), source: e })
            }
            _ => Ok(None),
        };
        let out = graph.run_f32_with(&inputs, None, dynamic_input, |i, y| match &value_fit[graph.nodes[i].output.0] {
            Some(f) => {
                *y = f.fake_quantize(y).map_err(|e| NnError::Observe(e.for_tensor(&graph.nodes[i].name)))?;
                Ok(())
            }
            None => Ok(()),
        });
        swap(&mut self.graph, &mut weights);
        self.sim_weights = Some(weights);
        for (n, old) in self.graph.nodes.iter_mut().zip(biases) {
            if let (NodeOp::Layer(m), Some(old)) = (&mut n.op, old) {
                if let Some((_, bias)) = weight_and_bias(m.as_mut()) {
                    *bias = old;
                }
            }
        }
        out
    }

    /// Builds the int8 model from what the observers saw.
    ///
    /// # Errors
    /// An observer that saw no data ("observer for conv1 output saw no data: did calibration
    /// run?"), or weights that cannot be packed.
    pub fn convert(self) -> Result<QuantizedModel> {
        if self.strict {
            let floats: Vec<String> = self
                .plan
                .iter()
                .filter_map(|e| match &e.mode {
                    Mode::Float(why) => Some(format!("{} ({}): {why}", e.name, e.kind)),
                    _ => None,
                })
                .collect();
            if !floats.is_empty() {
                return Err(NnError::Config {
                    module: "(strict)".into(),
                    reason: format!(
                        "{} module(s) would run in float: {}; give them an int8 form, fuse them, or leave strict mode",
                        floats.len(),
                        floats.join("; ")
                    ),
                });
            }
        }
        let Prepared { mut graph, kernels, nodes, mut plan, obs, input_cfgs, tables, taps, .. } = self;
        // The parameters each value has (int8) or is quantized with when an int8 op reads it
        // (float): its producer's observed ones, or its input's for ops that keep them.
        let mut vq: Vec<Option<QuantU8>> = vec![None; graph.values];
        // Which values an int8 op reads. Parameters are needed for those only: a value that
        // only float and dynamic ops read (a dynamically quantized model) needs no
        // calibration, and gets placeholder parameters when its observer saw nothing.
        let mut int8_read = vec![false; graph.values];
        for (n, p) in graph.nodes.iter().zip(&nodes) {
            if matches!(p.mode, Mode::Int8 | Mode::Int8SameParams) {
                n.inputs.iter().for_each(|t| int8_read[t.0] = true);
            }
        }
        let observed =
            |obs: &dyn Observer, cfg: Option<&QConfig>, what: &str, t: Tensor| match activation_quant(obs, cfg, what) {
                Err(_) if !int8_read[t.0] && obs.qparams().is_err() => Ok((PLACEHOLDER_Q, None)),
                r => r,
            };
        let mut input_ranges: Vec<Option<[u8; 2]>> = Vec::with_capacity(graph.inputs.len());
        for (k, t) in graph.inputs.iter().enumerate() {
            let (q, range) = observed(obs[k].as_ref(), input_cfgs[k].as_ref(), "model input", *t)?;
            vq[t.0] = Some(q);
            input_ranges.push(range.map(|(lo, hi)| [lo, hi]));
        }
        // Layers whose weight quantizer has no int8 kernel run in float on quantized weights.
        for (n, p) in graph.nodes.iter_mut().zip(&nodes) {
            if let (NodeOp::Layer(m), Mode::Float(FloatReason::SimulatedOnly { .. }), Some(cfg)) =
                (&mut n.op, &p.mode, p.cfg.as_ref())
            {
                let w = m.tensors().into_iter().find(|(k, _)| *k == "weight").map(|(_, w)| w.clone());
                if let Some(w) = w {
                    set_weight(m.as_mut(), fake_weights(&n.name, &w, cfg)?);
                }
            }
        }
        // Bias correction: each corrected layer's bias less the mean its rounded weights add.
        for (((n, p), t), e) in graph.nodes.iter_mut().zip(&nodes).zip(&taps).zip(plan.iter_mut()) {
            let (NodeOp::Layer(m), Some(t), Some(cfg)) = (&mut n.op, t, p.cfg.as_ref()) else { continue };
            let Some((w, _)) = weight_and_bias(m.as_mut()) else { continue };
            let wq = fake_weights(&n.name, w, cfg)?;
            if let Some((slot, b)) = corrected_bias(m.as_mut(), t, &wq) {
                *slot = Some(b);
                e.bias_corrected = true;
            }
        }
        let q_of = |vq: &[Option<QuantU8>], t: Tensor| vq[t.0].expect("values are computed before they are read");
        let mut qnodes = Vec::with_capacity(graph.nodes.len());
        // Custom integer ranges of node outputs, applied once the graph's own rewrites are done.
        let mut ranges: Vec<Option<((u8, u8), QuantU8)>> = Vec::with_capacity(graph.nodes.len());
        for (i, ((n, p), kernel)) in graph.nodes.into_iter().zip(nodes).zip(kernels).enumerate() {
            let (out_q, out_range) = match p.obs {
                Some(k) => {
                    let what = format!("{} output", n.name);
                    let (q, range) = observed(obs[k].as_ref(), p.cfg.as_ref(), &what, n.output)?;
                    (Some(q), range)
                }
                None => (None, None),
            };
            let in_q = q_of(&vq, n.inputs[0]);
            let mut int8 = p.mode == Mode::Int8;
            let qs: Vec<QuantU8> = n.inputs.iter().map(|&t| q_of(&vq, t)).collect();
            let joined = || out_q.expect("joins are observed");
            if let (NodeOp::Cat(_), true) = (&n.op, int8) {
                if let Some(why) = cat_ranges_apart(&qs, joined()) {
                    int8 = false;
                    plan[i].mode = Mode::Float(FloatReason::FloatOp { why });
                }
            }
            let op: Box<dyn QOp> = match n.op {
                NodeOp::Layer(m) => match &p.mode {
                    Mode::Passthrough => Box::new(PassOp),
                    // Calibration's float kernel, unless the weights were just quantized.
                    Mode::Float(FloatReason::SimulatedOnly { .. }) => {
                        Box::new(FloatOp::new(m).map_err(|e| e.within(&n.name))?)
                    }
                    Mode::Float(_) => Box::new(FloatOp::with_kernel(m, kernel)),
                    Mode::Dynamic => {
                        let cfg = p.cfg.as_ref().expect("dynamic modules have a configuration");
                        m.lower_dynamic(&LowerCx { name: &n.name, cfg, in_q, out_q, tables })
                            .map_err(|e| e.within(&n.name))?
                    }
                    Mode::Int8 | Mode::Int8SameParams => {
                        let cfg = p.cfg.as_ref().expect("int8 modules have a configuration");
                        m.lower(&LowerCx { name: &n.name, cfg, in_q, out_q, tables }).map_err(|e| e.within(&n.name))?
                    }
                },
                NodeOp::Add => Box::new(AddOp::new([qs[0], qs[1]], joined(), int8)),
                NodeOp::Mul => Box::new(MulOp::new([qs[0], qs[1]], joined(), int8)),
                NodeOp::Cat(dim) => Box::new(CatOp::new(qs, joined(), int8, dim)),
                NodeOp::MatMul => Box::new(MatMulOp::new([qs[0], qs[1]], joined(), int8)),
            };
            // What the op writes: its own parameters (fixed ones for sigmoid-like tables),
            // else the observed ones (float ops), else its input's.
            vq[n.output.0] = Some(op.out_q().or(out_q).unwrap_or(in_q));
            ranges.push(out_range.zip(out_q));
            qnodes.push(Node {
                name: n.name,
                op: NodeOp::Layer(QStep { in_q, op }),
                inputs: n.inputs,
                output: n.output,
            });
        }
        let mut g = Graph {
            values: graph.values,
            nodes: qnodes,
            inputs: graph.inputs,
            outputs: graph.outputs,
            input_names: graph.input_names,
            batch: graph.batch,
            float: Default::default(),
        };
        fuse_add_relu(&mut g);
        for (n, range) in g.nodes.iter_mut().zip(ranges) {
            let (Some(((lo, hi), q)), NodeOp::Layer(step)) = (range, &mut n.op) else { continue };
            let inner = std::mem::replace(&mut step.op, Box::new(PassOp));
            step.op = Box::new(crate::ops::range::RangeClampOp { inner, lo, hi, q });
        }
        let input_q = graph_input_q(&vq, &g);
        Ok(QuantizedModel::assemble(input_q, input_ranges, g, plan))
    }
}

/// `x` quantized to `u8` and back as a dynamic layer quantizes its input on each call
/// (`qkernels::PackedLinear::forward_dynamic`): one range over the whole tensor, or one per
/// row (the last dimension's vectors).
fn fake_quantize_dynamic(x: &ArrayD<f32>, how: qobserve::Dynamic) -> qtensor::Result<ArrayD<f32>> {
    let xs = x.as_standard_layout();
    let v = xs.as_slice().expect("standard layout");
    let mut out = vec![0.0f32; v.len()];
    let (row, reduce_range) = match how {
        qobserve::Dynamic::PerTensor { reduce_range } => (v.len().max(1), reduce_range),
        qobserve::Dynamic::PerToken { reduce_range } => (x.shape().last().copied().unwrap_or(1).max(1), reduce_range),
    };
    for (src, dst) in v.chunks(row).zip(out.chunks_mut(row)) {
        if src.iter().any(|t| t.is_nan()) {
            return Err(qtensor::QError::Unsupported {
                op: "dynamic quantization",
                reason: "the input holds NaN: dynamic quantization needs finite inputs".into(),
            });
        }
        let (lo, hi) = src.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &t| (l.min(t), h.max(t)));
        let (scale, zp) = qtensor::choose_qparams_dynamic(lo, hi, reduce_range)?;
        let inv = 1.0 / scale;
        for (d, &t) in dst.iter_mut().zip(src) {
            let q = qtensor::kernels::quantize_scalar(t, inv, zp, 0, 255);
            *d = qtensor::kernels::dequantize_scalar(q, scale, zp);
        }
    }
    Ok(ArrayD::from_shape_vec(x.raw_dim(), out).expect("same length"))
}

/// How many times coarser than its finest input an int8 concatenation's one output scale may
/// be: beyond it (the finest input would keep under 4 of its 8 bits, as when YOLOv8 joins
/// box coordinates of hundreds of pixels with class probabilities below 1), the inputs are
/// joined in float.
const CAT_SCALE_RATIO: f32 = 16.0;

/// Why an int8 concatenation of inputs with parameters `qs` into `out` runs in float, if it
/// must (see [`CAT_SCALE_RATIO`]).
fn cat_ranges_apart(qs: &[QuantU8], out: QuantU8) -> Option<String> {
    let (k, finest) = qs.iter().enumerate().min_by(|a, b| a.1.scale.total_cmp(&b.1.scale))?;
    let ratio = out.scale / finest.scale;
    (ratio > CAT_SCALE_RATIO).then(|| {
        let bits = 8.0 - ratio.log2();
        let kept = if bits < 1.0 { "none".to_string() } else { format!("{bits:.1}") };
        format!(
            "joins inputs whose ranges differ {ratio:.0}x (input {k} has scale {:.3e}, the whole {:.3e}): in int8 \
             input {k} would keep {kept} of its 8 bits, so it runs in float",
            finest.scale, out.scale
        )
    })
}

/// The parameters of a value that no int8 op reads and whose observer saw nothing (a
/// dynamically quantized model's): never used to quantize anything.
const PLACEHOLDER_Q: QuantU8 = QuantU8 { scale: 1.0, zero_point: 0 };

/// The parameters of each graph input.
fn graph_input_q(vq: &[Option<QuantU8>], g: &QGraph) -> Vec<QuantU8> {
    g.inputs.iter().map(|t| vq[t.0].expect("inputs are observed")).collect()
}

/// An int8 addition whose only reader is an int8 ReLU (a residual block's) applies the ReLU
/// itself, `Q(max(c, 0)) = max(Q(c), zp)`, and the ReLU passes its input through: the same
/// bits without a second pass over the sum.
fn fuse_add_relu(g: &mut QGraph) {
    let readers = readers(g);
    for i in 0..g.nodes.len() {
        let is_int8_add = step_of(&g.nodes[i]).op.as_any().downcast_ref::<AddOp>().is_some_and(|a| a.int8);
        let out = g.nodes[i].output;
        if !is_int8_add || readers[out.0] != 1 {
            continue;
        }
        let Some(j) = g.nodes.iter().position(|n| n.inputs.contains(&out)) else { continue };
        if step_of(&g.nodes[j]).op.as_any().downcast_ref::<ClampOp>().is_none_or(|c| c.six) {
            continue;
        }
        if let NodeOp::Layer(step) = &mut g.nodes[i].op {
            step.op.as_any_mut().downcast_mut::<AddOp>().expect("checked: an addition").relu = true;
        }
        if let NodeOp::Layer(step) = &mut g.nodes[j].op {
            step.op = Box::new(PassOp);
        }
    }
}

/// The activation quantizer of `cfg` fitted to what `obs` observed of `tensor`.
fn activation_fit(obs: &dyn Observer, cfg: Option<&QConfig>, tensor: &str) -> Result<Box<dyn Fitted>> {
    let p = obs.qparams().map_err(|e| NnError::Observe(e.for_tensor(tensor)))?;
    if p.axis().is_some() {
        return Err(NnError::Config {
            module: tensor.to_string(),
            reason: format!(
                "the {} observer chose per-channel parameters, but int8 kernels take activations with one scale \
                 and zero point per tensor; observe activations per tensor",
                obs.kind()
            ),
        });
    }
    let quantizer = cfg.and_then(|c| c.activation_quantizer.clone()).unwrap_or_else(|| Arc::new(Affine));
    quantizer
        .fit(&Observed { qparams: &p, spec: obs.spec(), values: None })
        .map_err(|e| NnError::Observe(e.for_tensor(tensor)))
}

/// The `u8` parameters the int8 kernels run an activation with, and its custom `u8` code
/// range if it has one, from its fitted quantizer. Signed 8-bit parameters become the same
/// grid in `u8` (`q + 128`, zero point + 128): every value, rounding and clamp is the same.
///
/// # Errors
/// An observer that saw no data, per-channel parameters (a custom observer's: the built-in
/// per-channel ones are refused by `prepare`), a 32-bit target, or a quantizer that is not
/// affine.
fn activation_quant(obs: &dyn Observer, cfg: Option<&QConfig>, tensor: &str) -> Result<(QuantU8, Option<(u8, u8)>)> {
    let fitted = activation_fit(obs, cfg, tensor)?;
    let refuse = |reason: String| Err(NnError::Config { module: tensor.to_string(), reason });
    let Some((p, spec)) = fitted.affine() else {
        let name = cfg.and_then(|c| c.activation_quantizer.as_ref()).map_or("affine".into(), |q| q.name());
        let why = cfg.and_then(|c| c.activation_quantizer.as_ref()).and_then(|q| q.int8().err()).unwrap_or_default();
        return refuse(format!(
            "its activation quantizer ({name}) has no int8 form ({why}); measure the method with \
             Prepared::simulate, or give this tensor an affine quantizer to convert"
        ));
    };
    let (scale, zero_point) = (p.scale(0), p.zero_point(0));
    let q = match spec.dtype {
        qtensor::DType::U8 => QuantU8 { scale, zero_point },
        qtensor::DType::I8 => QuantU8 { scale, zero_point: zero_point + 128 },
        other => {
            return refuse(format!(
                "the {} observer targets {other:?}; activations run in 8 bits: use a u8 or i8 QuantSpec",
                obs.kind()
            ))
        }
    };
    Ok((q, crate::ops::range::custom_range(&spec)))
}

/// One step of the int8 model: an op and the parameters its (first) input arrives with.
#[derive(Debug)]
pub(crate) struct QStep {
    pub(crate) in_q: QuantU8,
    pub(crate) op: Box<dyn QOp>,
}

/// The int8 model's graph: every node a [`QStep`].
pub(crate) type QGraph = Graph<QStep>;

/// `cfg`'s weight quantizer fitted to `w` (its weight observer's parameters, then the
/// quantizer: affine when none is configured).
pub(crate) fn weight_fit(name: &str, w: &ArrayD<f32>, cfg: &QConfig) -> Result<Box<dyn Fitted>> {
    let tensor = format!("{name} weight");
    let mut ob = cfg.weight.create()?;
    ob.observe(w.view()).map_err(|e| NnError::Observe(e.for_tensor(&tensor)))?;
    let p = ob.qparams().map_err(|e| NnError::Observe(e.for_tensor(&tensor)))?;
    let quantizer = cfg.weight_quantizer.clone().unwrap_or_else(|| Arc::new(Affine));
    quantizer
        .fit(&Observed { qparams: &p, spec: ob.spec(), values: Some(w.view()) })
        .map_err(|e| NnError::Observe(e.for_tensor(&tensor)))
}

/// Int8 weights as `cfg`'s weight observer and quantizer choose them.
///
/// # Errors
/// A weight quantizer that is not affine (such layers run in float, simulated), or
/// parameters that do not fit the weights.
pub(crate) fn quantize_weights(name: &str, w: &ArrayD<f32>, cfg: &QConfig) -> Result<QTensor<i8>> {
    let fitted = weight_fit(name, w, cfg)?;
    let Some((p, spec)) = fitted.affine() else {
        return Err(NnError::Config {
            module: name.to_string(),
            reason: format!(
                "its weight quantizer ({}) is not affine, so int8 kernels cannot run its weights; such a layer \
                 runs in float on its quantized weights (Prepared::simulate measures it)",
                cfg.weight_quantizer.as_ref().map_or("affine".into(), |q| q.name())
            ),
        });
    };
    QTensor::quantize_in_range(w, p, spec.range).map_err(|e| NnError::Op { module: name.into(), source: e })
}

/// A layer's weights as its configuration quantizes them, dequantized (simulation, and the
/// layers whose weight quantizer has no int8 kernel).
pub(crate) fn fake_weights(name: &str, w: &ArrayD<f32>, cfg: &QConfig) -> Result<ArrayD<f32>> {
    weight_fit(name, w, cfg)?.fake_quantize(w).map_err(|e| NnError::Observe(e.for_tensor(&format!("{name} weight"))))
}

/// Whether a layer's weights are quantized where it runs in int8: it is lowered to an int8
/// op of its own (not one keeping its input's parameters) and has a tensor named `weight`.
fn has_weight(m: &dyn Module) -> bool {
    m.tensors().iter().any(|(n, _)| *n == "weight")
}

/// Replaces a layer's `weight` tensor.
fn set_weight(m: &mut dyn Module, w: ArrayD<f32>) {
    if let Some((_, t)) = m.tensors_mut().into_iter().find(|(n, _)| *n == "weight") {
        *t = w;
    }
}

/// One node's time in [`QuantizedModel::profile`].
#[derive(Clone, Debug)]
pub struct NodeTime {
    /// The node's name (its module's, or its ONNX node's).
    pub name: String,
    /// The op it runs, as saved (`"Conv2d"`, `"Add"`, ...).
    pub op: &'static str,
    /// Its output's logical shape.
    pub out_shape: Vec<usize>,
    /// Multiply-accumulates, for layers with weights.
    pub macs: Option<u64>,
    /// Median wall time over the runs, in milliseconds.
    pub median_ms: f64,
    /// The node that computes it as part of its own work (a residual addition its
    /// convolution runs, with any pass-through node between them; attention's softmax and
    /// second product, which its first product runs), whose time includes it; its own time
    /// is then 0.
    pub runs_in: Option<String>,
    /// The kernel that runs it, for layers with a choice ([`crate::ops::QOp::kernel`]).
    pub kernel: Option<String>,
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

/// How many values a model's boundary quantizes or dequantizes in one call: all of them
/// inside a thread pool (a run on several threads, which qtensor splits over), and fewer than
/// qtensor's split threshold outside one, so that a run on one thread stays on it instead of
/// spreading over rayon's global pool.
fn serial_len() -> usize {
    if rayon::current_thread_index().is_some() {
        usize::MAX
    } else {
        qtensor::kernels::PARALLEL_MIN_LEN - 1
    }
}

impl Value {
    pub(crate) fn quantize(x: ndarray::ArrayViewD<'_, f32>, q: QuantU8) -> qtensor::Result<Value> {
        let shape = x.shape().to_vec();
        let xs = x.as_standard_layout();
        let src = xs.as_slice().expect("standard layout");
        let mut data = scratch::take(src.len());
        if let [n, c, h, w] = shape[..] {
            qkernels::quantize_nchw_to_nhwc(src, (n, c, h, w), q, &mut data)?;
        } else {
            let range = QuantRange::full(qtensor::DType::U8);
            for (i, (s, d)) in src.chunks(serial_len()).zip(data.chunks_mut(serial_len())).enumerate() {
                qtensor::kernels::quantize_slice(s, d, q.scale, q.zero_point, range).map_err(|e| match e {
                    qtensor::QError::NanInput { op, index, .. } => {
                        qtensor::QError::NanInput { op, index: i * serial_len() + index, shape: vec![src.len()] }
                    }
                    other => other,
                })?;
            }
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

    /// Its logical shape (NCHW for images).
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F32(a) => a.shape(),
            Value::U8 { shape, .. } => shape,
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
                    for (s, d) in data.chunks(serial_len()).zip(out.chunks_mut(serial_len())) {
                        qtensor::kernels::dequantize_slice(s, d, q.scale, q.zero_point).expect("consistent value");
                    }
                }
                ArrayD::from_shape_vec(IxDyn(shape), out).expect("consistent value")
            }
        }
    }

    pub(crate) fn image<'a>(data: &'a [u8], shape: &[usize], q: QuantU8) -> QImage<'a> {
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
                Mode::Float(w) => ("float", Some(w.to_string())),
                Mode::Dynamic => ("dynamic", None),
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

/// `20 log10(|f| / |f - q|)`, infinite for identical tensors.
pub fn sqnr_db(f: &ArrayD<f32>, q: &ArrayD<f32>) -> f64 {
    let (signal, noise) = power_sums(f, q);
    db(signal, noise)
}

/// A node's output powers in a report, `|f|^2` and `|f - q|^2` (`None` for a node that
/// computes nothing), and its weights' SQNR.
type NodePowers = (Option<(f64, f64)>, Option<f64>);

/// `|f|^2` and `|f - q|^2`.
fn power_sums(f: &ArrayD<f32>, q: &ArrayD<f32>) -> (f64, f64) {
    let signal: f64 = f.iter().map(|&v| (v as f64).powi(2)).sum();
    let noise: f64 = f.iter().zip(q.iter()).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    (signal, noise)
}

/// `10 log10(signal / noise)`, infinite when there is no noise.
fn db(signal: f64, noise: f64) -> f64 {
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

/// The int8 model: immutable, `Send + Sync`, one instance serves every thread.
#[derive(Debug)]
pub struct QuantizedModel {
    /// The parameters of each graph input.
    pub(crate) input_q: Vec<QuantU8>,
    /// Per graph input: the custom integer range its codes are clamped to, if any.
    pub(crate) input_ranges: Vec<Option<[u8; 2]>>,
    pub(crate) graph: QGraph,
    pub(crate) plan: Vec<PlanEntry>,
    pub(crate) run: Run,
    /// How many nodes (and graph outputs) read each value: a value is moved to its last
    /// reader and copied for the others.
    readers: Vec<usize>,
    /// Per graph input: every reader is an int8 op that quantizes it with the input's
    /// parameters, so it is quantized once on entry, straight from the caller's array.
    quantize_on_entry: Vec<bool>,
    /// Every node computes each image of a batch on its own (no custom layers), so a batch
    /// can be split between threads.
    images_apart: bool,
    /// Per node: the addition this convolution runs on its output as it writes it
    /// ([`conv_add_fusions`]); that addition's node is then skipped.
    fused_add: Vec<Option<ConvAdd>>,
    /// Per node: the convolution that runs it (an addition, or a pass-through node between
    /// the convolution and the addition).
    runs_in_conv: Vec<Option<usize>>,
    /// Per node: the softmax and product of attention this `q x kt` product runs with it
    /// ([`attention_fusions`]); those nodes are then skipped.
    fused_attention: Vec<Option<Attention>>,
    /// Per node: the float softmax and product this float `q x kt` product runs with it
    /// ([`float_attention_fusions`]); those nodes are then skipped.
    fused_float_attention: Vec<Option<FloatAttention>>,
    /// Per node: a softmax or product an attention's first product runs.
    runs_in_attention: Vec<bool>,
}

/// Attention's float steps found in a converted graph (the dynamic modes'): a float product
/// `q x kt` (the node holding this), a float softmax alone reading its output, and a float
/// product alone reading the softmax's output, as its left operand.
#[derive(Clone, Copy, Debug)]
struct FloatAttention {
    /// A float permutation swapping the last two axes of `k` into `kt` that only the first
    /// product reads (directly, or through `key_scale`): skipped, the product reading `k` as
    /// its transpose.
    transpose: Option<usize>,
    /// A float product by a constant between that permutation and the first product (ViT's
    /// export scales `kt`): run on `k` instead, which gives the same values.
    key_scale: Option<usize>,
    softmax: usize,
    product: usize,
    /// The second product's right operand (`v`), computed before the first product runs.
    v: Tensor,
}

/// The (last) node reading each value: its only one where `readers` says one.
fn last_readers(g: &QGraph) -> Vec<Option<usize>> {
    let mut reader = vec![None; g.values];
    for (i, n) in g.nodes.iter().enumerate() {
        for &t in &n.inputs {
            reader[t.0] = Some(i);
        }
    }
    reader
}

impl FloatAttention {
    /// The shape of `kt` for the key the first product takes (`k` when the permutation runs
    /// in it).
    fn kt_shape(&self, key: &[usize]) -> Vec<usize> {
        match self.transpose {
            Some(_) => crate::ops::matmul::swap_last_two(key),
            None => key.to_vec(),
        }
    }
}

/// The float attention patterns that run head by head in one step
/// ([`crate::ops::matmul::attention_f32`], the same bits as the ops one by one), their inner
/// nodes marked in `runs_in`: a float product whose output only a float softmax reads, whose
/// output only another float product reads as its left operand, the right one computed
/// before the first product runs; no step's output a graph output. A float permutation that
/// swaps the last two axes of the first product's right operand, read by that product alone
/// (or by a float product by a constant that the first product alone reads), runs in it too.
fn float_attention_fusions(
    g: &QGraph,
    readers: &[usize],
    producer: &[Option<usize>],
    runs_in: &mut [bool],
) -> Vec<Option<FloatAttention>> {
    use crate::ops::matmul::MatMulOp;
    let mut fused = vec![None; g.nodes.len()];
    let reader = last_readers(g);
    let op = |i: usize| step_of(&g.nodes[i]).op.as_any();
    let product = |i: usize| op(i).downcast_ref::<MatMulOp>().filter(|m| !m.is_int8());
    let softmax = |i: usize| {
        op(i)
            .downcast_ref::<crate::ops::fallback::FloatOp>()
            .is_some_and(|f| f.0.as_any().is::<crate::ops::softmax::Softmax>())
    };
    let sole_reader = |t: Tensor| if readers[t.0] == 1 && !g.outputs.contains(&t) { reader[t.0] } else { None };
    for (i, n) in g.nodes.iter().enumerate() {
        if product(i).is_none() || n.inputs.len() != 2 || runs_in[i] {
            continue;
        }
        let Some(s) = sole_reader(n.output).filter(|&s| softmax(s) && g.nodes[s].inputs.len() == 1) else { continue };
        let Some(j) = sole_reader(g.nodes[s].output) else { continue };
        let jn = &g.nodes[j];
        if product(j).is_none()
            || jn.inputs.len() != 2
            || jn.inputs[0] != g.nodes[s].output
            || jn.inputs[1] == jn.inputs[0]
        {
            continue;
        }
        let v = jn.inputs[1];
        if producer[v.0].is_none_or(|p| p < i) {
            let (transpose, key_scale) = key_transpose(g, i, &sole_reader, producer, true);
            for p in transpose.into_iter().chain(key_scale) {
                runs_in[p] = true;
            }
            runs_in[s] = true;
            runs_in[j] = true;
            fused[i] = Some(FloatAttention { transpose, key_scale, softmax: s, product: j, v });
        }
    }
    fused
}

/// Attention's int8 steps found in a converted graph: a product `q x kt` (the node holding
/// this), optionally a scaling by a constant and an addition of a mask, the softmax, and the
/// product whose left operand is that softmax's output; each step's output read by the next
/// step alone.
#[derive(Clone, Copy, Debug)]
struct Attention {
    /// A `MulScalar` of the scores.
    scale: Option<usize>,
    /// A `BatchConst` that reads the (scaled) scores for their batch size only and gives the
    /// mask (a constant mask imported over computed scores: GPT-2's causal mask): computed
    /// from the first product's batch size instead.
    mask_const: Option<usize>,
    /// An int8 addition of a mask to the (scaled) scores: its node, the mask, and whether the
    /// scores are its first operand.
    mask: Option<(usize, Tensor, bool)>,
    softmax: usize,
    /// A `NanToZero` of the probabilities (codes pass through it).
    nan: Option<usize>,
    product: usize,
    /// The second product's right operand (`v`).
    v: Tensor,
    /// An int8 permutation swapping the last two axes of `k` into `kt` that only the first
    /// product reads (directly, or through `key_scale`): skipped, the product packing `k` as
    /// it is.
    transpose: Option<usize>,
    /// An int8 `MulScalar` between that permutation and the first product (ViT's export
    /// scales `kt`): run on `k` instead (it changes the parameters, not the codes).
    key_scale: Option<usize>,
}

impl Attention {
    /// Whether node `x` runs in this attention step (its first product excepted).
    fn runs(&self, x: usize) -> bool {
        self.inner().any(|y| y == x) || self.transpose == Some(x) || self.key_scale == Some(x)
    }

    /// The nodes it runs besides its first product, in order.
    fn inner(&self) -> impl Iterator<Item = usize> {
        self.scale
            .into_iter()
            .chain(self.mask_const)
            .chain(self.mask.map(|m| m.0))
            .chain([self.softmax])
            .chain(self.nan)
            .chain([self.product])
    }
}

/// The attention patterns that run head by head in one step
/// (`crate::ops::matmul::attention`, the same bytes as the ops one by one): an int8 product
/// whose output only (optionally) a `MulScalar`, then (optionally) an int8 addition of a mask
/// computed before the product (or by a `BatchConst` that reads the scores for their batch
/// size alone), then an int8 softmax read, each the only reader of the step before, and
/// whose softmax's output (optionally through an int8 `NanToZero`) only another int8
/// product reads as its left operand, the right one (`v`) computed before the first product
/// runs. No step's output is a graph output.
fn attention_fusions(g: &QGraph, readers: &[usize], producer: &[Option<usize>]) -> (Vec<Option<Attention>>, Vec<bool>) {
    use crate::ops::add::AddOp;
    use crate::ops::konst::BatchConstOp;
    use crate::ops::matmul::MatMulOp;
    use crate::ops::scalar::MulScalarOp;
    use crate::ops::softmax::SoftmaxOp;
    use crate::ops::stubs::NanToZeroOp;
    let mut fused = vec![None; g.nodes.len()];
    let mut runs_in = vec![false; g.nodes.len()];
    let reader = last_readers(g);
    let op = |i: usize| step_of(&g.nodes[i]).op.as_any();
    let product = |i: usize| op(i).downcast_ref::<MatMulOp>().filter(|m| m.is_int8());
    // The only reader of a value that is not a graph output.
    let sole_reader = |t: Tensor| if readers[t.0] == 1 && !g.outputs.contains(&t) { reader[t.0] } else { None };
    // The next step after the scores `t`: their only reader, or, of exactly two readers, the
    // one that is not a `BatchConst` reading `t` alone whose output only one node reads
    // (with that `BatchConst`).
    let next_step = |t: Tensor| -> Option<(usize, Option<usize>)> {
        if let Some(r) = sole_reader(t) {
            return Some((r, None));
        }
        if readers[t.0] != 2 || g.outputs.contains(&t) {
            return None;
        }
        let users: Vec<usize> = (0..g.nodes.len()).filter(|&k| g.nodes[k].inputs.contains(&t)).collect();
        let konst = |k: usize| {
            op(k).is::<BatchConstOp>() && g.nodes[k].inputs == [t] && sole_reader(g.nodes[k].output).is_some()
        };
        match users[..] {
            [a, b] if konst(a) && !konst(b) => Some((b, Some(a))),
            [a, b] if konst(b) && !konst(a) => Some((a, Some(b))),
            _ => None,
        }
    };
    let before = |t: Tensor, i: usize| producer[t.0].is_none_or(|p| p < i);
    for (i, n) in g.nodes.iter().enumerate() {
        if product(i).is_none() || n.inputs.len() != 2 {
            continue;
        }
        let Some((mut next, mut mask_const)) = next_step(n.output) else { continue };
        let mut at = n.output;
        let scale =
            (mask_const.is_none() && op(next).is::<MulScalarOp>() && g.nodes[next].inputs.len() == 1).then_some(next);
        if let Some(x) = scale {
            at = g.nodes[x].output;
            let Some((r, k)) = next_step(at) else { continue };
            (next, mask_const) = (r, k);
        }
        let an = &g.nodes[next];
        let mask = match op(next).downcast_ref::<AddOp>() {
            Some(add) if add.int8 && an.inputs.len() == 2 && an.inputs[0] != an.inputs[1] => {
                let scores_first = an.inputs[0] == at;
                let other = an.inputs[usize::from(scores_first)];
                // A constant mask only from the `BatchConst` beside the scores; any other
                // computed before the first product.
                let from_const = mask_const.is_some_and(|k| g.nodes[k].output == other);
                if mask_const.is_some() != from_const || !(from_const || before(other, i)) {
                    continue;
                }
                Some((next, other, scores_first))
            }
            _ => None,
        };
        if mask.is_none() && mask_const.is_some() {
            continue;
        }
        if let Some((x, ..)) = mask {
            at = g.nodes[x].output;
            let Some(r) = sole_reader(at) else { continue };
            next = r;
        }
        let s = next;
        let sn = &g.nodes[s];
        if !op(s).is::<SoftmaxOp>() || sn.inputs.len() != 1 {
            continue;
        }
        let Some(mut j) = sole_reader(sn.output) else { continue };
        let mut probs = sn.output;
        let nan = (op(j).is::<NanToZeroOp>() && g.nodes[j].inputs.len() == 1).then_some(j);
        if let Some(x) = nan {
            probs = g.nodes[x].output;
            let Some(r) = sole_reader(probs) else { continue };
            j = r;
        }
        let jn = &g.nodes[j];
        if product(j).is_none() || jn.inputs.len() != 2 || jn.inputs[0] != probs || jn.inputs[1] == probs {
            continue;
        }
        let v = jn.inputs[1];
        if before(v, i) {
            let (transpose, key_scale) = key_transpose(g, i, &sole_reader, producer, false);
            let f = Attention { scale, mask_const, mask, softmax: s, nan, product: j, v, transpose, key_scale };
            for x in f.inner().chain(transpose).chain(key_scale) {
                runs_in[x] = true;
            }
            fused[i] = Some(f);
        }
    }
    (fused, runs_in)
}

/// For attention's first product `i`, `q x kt` (float ops with `float`, else int8 ones): the
/// permutation swapping the last two axes that gives `kt` (or the value a `MulScalar` scales
/// into `kt`), when the product alone reads its output (through that scaling alone) and `q`
/// is not the same value; with it, that scaling (the scaling runs in the product only with
/// the permutation).
fn key_transpose(
    g: &QGraph,
    i: usize,
    sole_reader: &dyn Fn(Tensor) -> Option<usize>,
    producer: &[Option<usize>],
    float: bool,
) -> (Option<usize>, Option<usize>) {
    use crate::ops::shape::Permute;
    // Node `p` as a one-input layer of the wanted kind: a float op's module, or the int8 op.
    let layer = |p: usize| -> Option<&dyn std::any::Any> {
        let op = step_of(&g.nodes[p]).op.as_any();
        let m = if float { op.downcast_ref::<FloatOp>()?.0.as_any() } else { op };
        (g.nodes[p].inputs.len() == 1).then_some(m)
    };
    let is_scale = |m: &dyn std::any::Any| {
        if float {
            m.is::<crate::ops::scalar::MulScalar>()
        } else {
            m.is::<crate::ops::scalar::MulScalarOp>()
        }
    };
    let n = &g.nodes[i];
    let kt = n.inputs[1];
    let key_scale = producer[kt.0].filter(|&p| sole_reader(kt) == Some(i) && layer(p).is_some_and(is_scale));
    let (kt, kt_reader) = match key_scale {
        Some(p) => (g.nodes[p].inputs[0], p),
        None => (kt, i),
    };
    let transpose = producer[kt.0].filter(|&p| {
        sole_reader(kt) == Some(kt_reader)
            && n.inputs[0] != n.inputs[1]
            && layer(p).and_then(|m| m.downcast_ref::<Permute>()).is_some_and(|t| {
                let r = t.dims.len();
                r >= 3 && t.dims[..r - 2].iter().enumerate().all(|(a, &d)| a == d) && t.dims[r - 2..] == [r - 1, r - 2]
            })
    });
    (transpose, key_scale.filter(|_| transpose.is_some()))
}

/// A convolution that runs the int8 addition which alone reads its output.
#[derive(Clone, Copy, Debug)]
struct ConvAdd {
    /// The addition's node.
    add: usize,
    /// The addition's other operand, and its position among the addition's inputs.
    other: Tensor,
    other_pos: usize,
}

/// The int8 additions that the convolution producing one of their operands can run itself
/// (`qkernels::PackedConv2d::forward_u8_add`, the same bits, each block added while in cache):
/// that operand has no other reader, and the other operand is computed before the
/// convolution runs (of two such convolutions, the later one). Pass-through nodes between
/// the convolution and the addition (a batch-norm folded into the convolution, as models
/// built from modules keep it) are skipped with it, when the convolution's output reaches
/// the addition only through them. A residual block's addition runs in its last
/// convolution (or in its downsample's).
fn conv_add_fusions(
    g: &QGraph,
    readers: &[usize],
    producer: &[Option<usize>],
) -> (Vec<Option<ConvAdd>>, Vec<Option<usize>>) {
    let mut fused = vec![None; g.nodes.len()];
    let mut runs_in_conv = vec![None; g.nodes.len()];
    for (j, n) in g.nodes.iter().enumerate() {
        if !step_of(n).op.as_any().downcast_ref::<AddOp>().is_some_and(|a| a.int8) || n.inputs.len() != 2 {
            continue;
        }
        let best = (0..2)
            .filter_map(|pos| {
                let (x, other) = (n.inputs[pos], n.inputs[1 - pos]);
                // Back from the addition's operand through pass-through nodes of one reader.
                let (mut t, mut passes) = (x, Vec::new());
                let i = loop {
                    let p = producer[t.0]?;
                    if readers[t.0] != 1 {
                        return None;
                    }
                    let node = &g.nodes[p];
                    if step_of(node).op.as_any().is::<PassOp>() && node.inputs.len() == 1 {
                        passes.push(p);
                        t = node.inputs[0];
                        continue;
                    }
                    break p;
                };
                // (The other operand cannot be the chain's values: each has this one reader.)
                let is_conv = step_of(&g.nodes[i]).op.as_any().is::<ConvOp>();
                let other_first = producer[other.0].is_none_or(|p| p < i);
                (is_conv && other_first).then_some((i, other, 1 - pos, passes))
            })
            .max_by_key(|c| c.0);
        if let Some((i, other, other_pos, passes)) = best {
            fused[i] = Some(ConvAdd { add: j, other, other_pos });
            runs_in_conv[j] = Some(i);
            for p in passes {
                runs_in_conv[p] = Some(i);
            }
        }
    }
    (fused, runs_in_conv)
}

/// Whether every node computes each image of a batch on its own: true of every built-in op;
/// a custom layer (int8 or float) may mix images, so its model is never split by batch.
fn images_apart(g: &QGraph) -> bool {
    g.nodes.iter().all(|n| step_of(n).op.images_apart())
}

/// The step of an int8 graph's node.
fn step_of(n: &Node<QStep>) -> &QStep {
    let NodeOp::Layer(step) = &n.op else { unreachable!("int8 graphs hold steps") };
    step
}

/// Whether `step`, reading value `t` as input `k`, quantizes it with `q` when it is float.
fn reads_as_int8(step: &QStep, k: usize, q: QuantU8) -> bool {
    step.op.quantizes_input(k, step.in_q) == Some(q)
}

/// Joins output `k`'s values of consecutive parts of a batch along dimension 0.
///
/// # Errors
/// Parts whose shapes differ past dimension 0 (an output with no batch dimension).
fn join_batch(parts: Vec<Value>, k: usize) -> Result<Value> {
    let shape = |v: &Value| match v {
        Value::F32(a) => a.shape().to_vec(),
        Value::U8 { shape, .. } => shape.clone(),
    };
    let first = parts.first().map(shape).unwrap_or_default();
    let joinable = |v: &Value| {
        let s = shape(v);
        !s.is_empty() && s[1..] == first[1..] && std::mem::discriminant(v) == std::mem::discriminant(&parts[0])
    };
    if first.is_empty() || !parts.iter().all(joinable) {
        return Err(NnError::Shape {
            module: "(model output)".into(),
            kind: "forward",
            expected: format!(
                "output {k} of each part of the batch with one shape past its first axis, to join the parts (the \
                 model ran its items in parts: its batch is fixed, or it runs items apart on several threads)"
            ),
            got: first,
        });
    }
    if parts.iter().all(|p| matches!(p, Value::F32(_))) {
        let arrays: Vec<ArrayD<f32>> = parts.into_iter().map(Value::into_f32).collect();
        let views: Vec<_> = arrays.iter().map(ArrayD::view).collect();
        return Ok(Value::F32(ndarray::concatenate(ndarray::Axis(0), &views).expect("checked: one shape past axis 0")));
    }
    let mut iter = parts.into_iter();
    let Some(Value::U8 { mut data, mut shape, q }) = iter.next() else {
        unreachable!("checked: every part is of one kind")
    };
    for p in iter {
        let Value::U8 { data: d, shape: s, q: pq } = p else { unreachable!("checked: every part is of one kind") };
        if pq != q {
            return Err(NnError::Shape {
                module: "(model output)".into(),
                kind: "forward",
                expected: format!("output {k} of each part of the batch with the same quantization parameters"),
                got: s,
            });
        }
        data.extend_from_slice(&d);
        shape[0] += s[0];
        scratch::give(d);
    }
    Ok(Value::U8 { data, shape, q })
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
pub struct Run {
    pub(crate) threads: usize,
    pub(crate) max_activation_bytes: usize,
}

/// The default of [`QuantizedModel::set_max_activation_bytes`]: 1 GiB.
pub const DEFAULT_MAX_ACTIVATION_BYTES: usize = 1 << 30;

/// The element count of an activation of shape `dims`, refused when it would exceed the
/// model's activation budget (or overflow): a hostile saved model (padding of 2^32, say) must
/// not be able to make a forward pass allocate without bound.
pub(crate) fn budget(dims: &[usize], elem_bytes: usize, run: Run, kind: &str) -> Result<usize> {
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

/// A pooled `u8` output buffer of shape `dims`, within the budget.
pub(crate) fn out_buf(dims: &[usize], run: Run, kind: &str) -> Result<Vec<u8>> {
    Ok(scratch::take(budget(dims, 1, run, kind)?))
}

impl QuantizedModel {
    /// The model's inputs' names, in the order [`QuantizedModel::forward_inputs`] takes them.
    pub fn input_names(&self) -> &[String] {
        &self.graph.input_names
    }

    /// The one batch size the model takes, if it takes no other ([`Graph::set_fixed_batch`]):
    /// runs of a multiple of it go in chunks of it.
    pub fn fixed_batch(&self) -> Option<usize> {
        self.graph.batch
    }

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

    pub(crate) fn assemble(
        input_q: Vec<QuantU8>,
        input_ranges: Vec<Option<[u8; 2]>>,
        graph: QGraph,
        plan: Vec<PlanEntry>,
    ) -> QuantizedModel {
        let run = Run { threads: 1, max_activation_bytes: DEFAULT_MAX_ACTIVATION_BYTES };
        let readers = readers(&graph);
        let quantize_on_entry = graph
            .inputs
            .iter()
            .zip(&input_q)
            .map(|(t, &q)| {
                !graph.outputs.contains(t)
                    && graph
                        .nodes
                        .iter()
                        .all(|n| n.inputs.iter().enumerate().all(|(k, i)| i != t || reads_as_int8(step_of(n), k, q)))
            })
            .collect();
        let images_apart = images_apart(&graph);
        // The node computing each value (None for graph inputs).
        let mut producer = vec![None; graph.values];
        for (i, n) in graph.nodes.iter().enumerate() {
            producer[n.output.0] = Some(i);
        }
        let (fused_add, runs_in_conv) = conv_add_fusions(&graph, &readers, &producer);
        let (fused_attention, mut runs_in_attention) = attention_fusions(&graph, &readers, &producer);
        let fused_float_attention = float_attention_fusions(&graph, &readers, &producer, &mut runs_in_attention);
        QuantizedModel {
            input_q,
            input_ranges,
            graph,
            plan,
            run,
            readers,
            quantize_on_entry,
            images_apart,
            fused_add,
            runs_in_conv,
            fused_attention,
            fused_float_attention,
            runs_in_attention,
        }
    }

    /// How every module runs (int8, float and why).
    pub fn plan(&self) -> &[PlanEntry] {
        &self.plan
    }

    /// The parameters the (first) model input is quantized with (when only float and
    /// dynamic layers read it and calibration saw no data, placeholder parameters, scale 1
    /// and zero point 0, that quantize nothing).
    pub fn input_quant(&self) -> QuantU8 {
        self.input_q[0]
    }

    /// The output parameters of every int8 layer, addition and concatenation that chooses
    /// its own, by name, in execution order.
    pub fn output_quants(&self) -> Vec<(&str, QuantU8)> {
        self.graph.nodes.iter().filter_map(|n| Some((n.name.as_str(), step_of(n).op.out_q()?))).collect()
    }

    /// Runs the int8 model and `float` (the same model, fused the same way, in float) side by
    /// side on `x` and reports, per module, how it ran and how far its output is from the
    /// float one (PyTorch's Numeric Suite, `compare_model_outputs`).
    ///
    /// # Errors
    /// A float model whose modules do not match this one's (names, kinds, or a LayerNorm's
    /// gamma and beta, which [`crate::smooth_quant`] rewrites), or an input neither can take.
    pub fn report(&self, float: &Sequential, x: &ArrayD<f32>) -> Result<Vec<LayerReport>> {
        self.report_view(&crate::graph::view(float), std::slice::from_ref(x))
    }

    /// [`QuantizedModel::report`] for a model built as a [`Graph`], one array per input.
    ///
    /// # Errors
    /// As [`QuantizedModel::report`].
    pub fn report_graph(&self, float: &Graph, inputs: &[ArrayD<f32>]) -> Result<Vec<LayerReport>> {
        self.report_view(float, inputs)
    }

    fn report_view<M: AsModule>(&self, float: &Graph<M>, inputs: &[ArrayD<f32>]) -> Result<Vec<LayerReport>> {
        let g = &self.graph;
        let same = float.nodes.len() == g.nodes.len()
            && float.inputs.len() == g.inputs.len()
            && float.nodes.iter().zip(&g.nodes).all(|(f, q)| f.name == q.name && f.inputs == q.inputs);
        if !same {
            let at =
                float.nodes.iter().zip(&g.nodes).find(|(f, q)| f.name != q.name).map_or("(model)", |(_, q)| &q.name);
            return Err(mismatch(at));
        }
        // The same kinds node by node: an unfused twin of a fused model would compare a
        // convolution's int8 output (batch-norm folded in) with its float output before the
        // batch-norm.
        if let Some((f, e)) =
            float.nodes.iter().zip(&self.plan).find(|(f, e)| f.op.kind_with(|m| m.module().kind()) != e.kind)
        {
            return Err(NnError::Fusion {
                modules: vec![e.name.clone()],
                reason: format!(
                    "the float twin passed to report() has a {} where the converted model has a {}: fuse the twin \
                     as prepare fused the model (qnn::fuse or qnn::fuse_graph; prepare fuses by default)",
                    f.op.kind_with(|m| m.module().kind()),
                    e.kind
                ),
            });
        }
        // The same float parameters where the int8 model keeps them as they are: a LayerNorm
        // rewritten by SmoothQuant before conversion has other gamma and beta than the file's.
        for (f, n) in float.nodes.iter().zip(&g.nodes) {
            let (NodeOp::Layer(m), Some(op)) =
                (&f.op, step_of(n).op.as_any().downcast_ref::<crate::ops::layernorm::LayerNormOp>())
            else {
                continue;
            };
            let Some(norm) = m.module().as_any().downcast_ref::<crate::ops::layernorm::LayerNorm>() else { continue };
            let (gamma, beta) = op.params();
            if norm.weight.iter().ne(gamma.iter()) || norm.bias.iter().ne(beta.iter()) {
                return Err(NnError::Config {
                    module: n.name.clone(),
                    reason: "the float twin's LayerNorm has other gamma and beta than the int8 model's: the int8 \
                             model was converted from another float model (qnn::smooth_quant rewrites them; apply it \
                             to the twin with the same alpha and batches first, or give `qrust report` the same \
                             --smooth-quant and --calib as `qrust quantize`)"
                        .into(),
                });
            }
        }
        if inputs.len() != g.inputs.len() {
            return Err(NnError::Shape {
                module: "(model input)".into(),
                kind: "report",
                expected: format!("{} inputs", g.inputs.len()),
                got: vec![inputs.len()],
            });
        }
        // A model whose batch is fixed compares its chunks, their powers summed.
        let Some(parts) = crate::graph::chunks(g.batch, inputs)? else {
            let sums = self.report_pass(float, inputs)?;
            return Ok(self.layer_reports(&sums));
        };
        let mut total: Vec<NodePowers> = Vec::new();
        for range in parts {
            let xs: Vec<ArrayD<f32>> =
                inputs.iter().map(|x| x.slice_axis(ndarray::Axis(0), range.clone().into()).to_owned()).collect();
            let sums = self.report_pass(float, &xs)?;
            if total.is_empty() {
                total = sums;
                continue;
            }
            for ((t, _), (p, _)) in total.iter_mut().zip(sums) {
                *t = t.zip(p).map(|((s, n), (ps, pn))| (s + ps, n + pn));
            }
        }
        Ok(self.layer_reports(&total))
    }

    /// The reports of the plan's layers from each node's output powers (signal, noise) and
    /// weight SQNR.
    fn layer_reports(&self, sums: &[NodePowers]) -> Vec<LayerReport> {
        self.plan
            .iter()
            .zip(sums)
            .map(|(entry, &(powers, weight))| LayerReport {
                name: entry.name.clone(),
                kind: entry.kind,
                mode: entry.mode.clone(),
                sqnr_db: powers.map(|(s, n)| db(s, n)),
                weight_sqnr_db: weight,
            })
            .collect()
    }

    /// One pass of [`QuantizedModel::report_graph`]: per node, the powers of the float
    /// output and of the int8 output's difference from it (`None` for nodes that compute
    /// nothing), and the weights' SQNR.
    fn report_pass<M: AsModule>(&self, float: &Graph<M>, inputs: &[ArrayD<f32>]) -> Result<Vec<NodePowers>> {
        let g = &self.graph;
        let run = Run { threads: 1, max_activation_bytes: usize::MAX };
        let mut fv: Vec<Option<ArrayD<f32>>> = vec![None; g.values];
        let mut qv: Vec<Option<Value>> = vec![None; g.values];
        for (t, x) in g.inputs.iter().zip(inputs) {
            fv[t.0] = Some(x.clone());
            qv[t.0] = Some(Value::F32(x.clone()));
        }
        let mut out = Vec::with_capacity(g.nodes.len());
        // Values of additions that apply the ReLU after them themselves.
        let mut relu_sums = vec![false; g.values];
        for (f, n) in float.nodes.iter().zip(&g.nodes) {
            let fy = {
                let xs: Vec<&ArrayD<f32>> = f.inputs.iter().map(|t| fv[t.0].as_ref().expect("computed")).collect();
                crate::graph::node_forward(f, &xs)?
            };
            let mut args: Vec<Value> = n.inputs.iter().map(|t| qv[t.0].clone().expect("computed")).collect();
            let step = step_of(n);
            let qy = Self::node_step(step, &mut args, run).map_err(|e| e.within(&n.name))?;
            let fused_relu = step.op.as_any().downcast_ref::<AddOp>().is_some_and(|a| a.relu);
            relu_sums[n.output.0] = fused_relu;
            let sqnr = if fused_relu {
                Some(power_sums(&fy.mapv(|v| v.max(0.0)), &qy.to_f32()))
            } else if step.op.as_any().is::<PassOp>() {
                // Nothing computed, unless it is the ReLU its addition applied.
                relu_sums[n.inputs[0].0].then(|| power_sums(&fy, &qy.to_f32()))
            } else {
                Some(power_sums(&fy, &qy.to_f32()))
            };
            let weight = match &f.op {
                NodeOp::Layer(m) => step.op.weight_sqnr(m.module()),
                _ => None,
            };
            out.push((sqnr, weight));
            fv[f.output.0] = Some(fy);
            qv[n.output.0] = Some(qy);
        }
        Ok(out)
    }

    /// Runs the int8 model and returns its (first) output's value (quantized logits for a
    /// model that ends in an int8 layer).
    ///
    /// # Errors
    /// An input the model cannot take (the message names the module and the shapes).
    pub fn forward_value(&self, x: &ArrayD<f32>) -> Result<Value> {
        Ok(self.forward_values(std::slice::from_ref(x))?.swap_remove(0))
    }

    /// Runs the int8 model on one array per graph input; one value per graph output.
    ///
    /// # Errors
    /// As [`QuantizedModel::forward_value`], or a wrong number of inputs.
    pub fn forward_values(&self, xs: &[ArrayD<f32>]) -> Result<Vec<Value>> {
        if xs.len() != self.graph.inputs.len() {
            return Err(NnError::Shape {
                module: "(model input)".into(),
                kind: "forward",
                expected: format!("{} input arrays, one per graph input", self.graph.inputs.len()),
                got: vec![xs.len()],
            });
        }
        let threads = self.run.threads;
        let batch = |x: &ArrayD<f32>| if x.ndim() >= 2 { x.shape()[0] } else { 0 };
        let images = batch(&xs[0]);
        let same_batch = xs.iter().all(|x| batch(x) == images);
        // A model whose batch is fixed runs more items in chunks of that batch.
        let fixed = crate::graph::chunks(self.graph.batch, xs)?;
        // One entry into the kernels' thread pool for the whole pass: the layers' parallel
        // kernels then run in place on the pool, not handed over (and waited for) one by one.
        qkernels::with_threads(threads, || {
            let parts = match fixed {
                Some(parts) => parts,
                None if threads > 1 && images >= threads && same_batch && self.images_apart => {
                    // Whole-model work per thread: no per-layer splits and joins at all.
                    let per = images.div_ceil(threads);
                    (0..images).step_by(per).map(|s| s..(s + per).min(images)).collect()
                }
                None => {
                    let views: Vec<_> = xs.iter().map(ArrayD::view).collect();
                    return self.eval_inputs(&views, self.run);
                }
            };
            use rayon::prelude::*;
            // As many parts as threads or more: one thread each; fewer: each on all of them.
            let run = if parts.len() >= threads { Run { threads: 1, ..self.run } } else { self.run };
            let outs = parts
                .into_par_iter()
                .map(|range| {
                    let views: Vec<_> =
                        xs.iter().map(|x| x.slice_axis(ndarray::Axis(0), range.clone().into())).collect();
                    self.eval_inputs(&views, run)
                })
                .collect::<Result<Vec<Vec<Value>>>>()?;
            let mut outs: Vec<std::vec::IntoIter<Value>> = outs.into_iter().map(Vec::into_iter).collect();
            (0..self.graph.outputs.len())
                .map(|k| join_batch(outs.iter_mut().map(|o| o.next().expect("one per output")).collect(), k))
                .collect()
        })
    }

    /// Runs the int8 model on one array per graph input; float outputs (dequantized).
    ///
    /// # Errors
    /// As [`QuantizedModel::forward_values`].
    pub fn forward_inputs(&self, xs: &[ArrayD<f32>]) -> Result<Vec<ArrayD<f32>>> {
        Ok(self.forward_values(xs)?.into_iter().map(Value::into_f32).collect())
    }

    fn eval_inputs(&self, xs: &[ndarray::ArrayViewD<'_, f32>], run: Run) -> Result<Vec<Value>> {
        /// The value table, the readers left and the argument list of a pass.
        type Tables = (Vec<Option<Value>>, Vec<usize>, Vec<Value>);
        thread_local! {
            /// The last pass's tables on this thread: a pass reuses them instead of allocating.
            static TABLES: std::cell::Cell<Tables> = const { std::cell::Cell::new((Vec::new(), Vec::new(), Vec::new())) };
        }
        let (mut vals, mut left, mut args) = TABLES.take();
        let out = self.eval_with(xs, run, &mut vals, &mut left, &mut args, None);
        vals.clear();
        args.clear();
        TABLES.set((vals, left, args));
        out
    }

    fn eval_with(
        &self,
        xs: &[ndarray::ArrayViewD<'_, f32>],
        run: Run,
        vals: &mut Vec<Option<Value>>,
        left: &mut Vec<usize>,
        args: &mut Vec<Value>,
        mut timing: Option<&mut Vec<(f64, Vec<usize>)>>,
    ) -> Result<Vec<Value>> {
        let g = &self.graph;
        vals.clear();
        vals.resize(g.values, None);
        left.clear();
        left.extend_from_slice(&self.readers);
        for (k, (t, x)) in g.inputs.iter().zip(xs).enumerate() {
            vals[t.0] = Some(self.entry_value(k, x.view())?);
        }
        // The value `t` for a reader: moved to its last reader, copied for the others.
        let take = |vals: &mut Vec<Option<Value>>, left: &mut Vec<usize>, t: Tensor| {
            left[t.0] -= 1;
            if left[t.0] == 0 {
                vals[t.0].take().expect("computed before read")
            } else {
                pooled_copy(vals[t.0].as_ref().expect("computed before read"))
            }
        };
        // The shapes of the values an attention step computes inside (for the timings).
        let mut inner_shapes: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, n) in g.nodes.iter().enumerate() {
            if self.runs_in_conv[i].is_some() || self.runs_in_attention[i] {
                // Its convolution (or attention's first product) computed it.
                if let Some(t) = timing.as_deref_mut() {
                    let inner = inner_shapes.iter().find(|(k, _)| *k == i).map(|(_, s)| s.clone());
                    let shape = vals[n.output.0].as_ref().map(|v| v.shape().to_vec());
                    // A transposition attention runs: its input's shape, the last two axes
                    // swapped (the input is still there, for the product to read).
                    let transposed = || {
                        let float = self.fused_float_attention.iter().flatten().map(|f| (f.transpose, f.key_scale));
                        let int8 = self.fused_attention.iter().flatten().map(|f| (f.transpose, f.key_scale));
                        let (p, _) = float.chain(int8).find(|&(p, x)| p == Some(i) || x == Some(i))?;
                        let k = vals[g.nodes[p?].inputs[0].0].as_ref()?;
                        Some(crate::ops::matmul::swap_last_two(k.shape()))
                    };
                    t.push((0.0, inner.or(shape).or_else(transposed).unwrap_or_default()));
                }
                continue;
            }
            if let Some(f) = self.fused_attention[i] {
                // The key as the product reads it: `kt`, or `k` when its transposition runs here.
                let key = f.transpose.map_or(n.inputs[1], |p| g.nodes[p].inputs[0]);
                let (kt, q) = (take(vals, left, key), take(vals, left, n.inputs[0]));
                let kt_shape = match f.transpose {
                    Some(_) => crate::ops::matmul::swap_last_two(kt.shape()),
                    None => kt.shape().to_vec(),
                };
                let scores = crate::ops::matmul::matmul_shape(q.shape(), &kt_shape).unwrap_or_default();
                let mask = match (f.mask, f.mask_const) {
                    // The constant mask for the scores' batch size, all its `BatchConst` reads.
                    (Some(_), Some(k)) => {
                        let batch = scores.first().copied().unwrap_or(1);
                        let mut a = vec![Value::F32(ArrayD::zeros(IxDyn(&[batch])))];
                        let kn = &g.nodes[k];
                        Some(Self::node_step(step_of(kn), &mut a, run).map_err(|e| e.within(&kn.name))?)
                    }
                    (m, _) => m.map(|(_, t, _)| take(vals, left, t)),
                };
                let v = take(vals, left, f.v);
                let start = timing.is_some().then(std::time::Instant::now);
                let y = self.attention(i, f, (q, kt, v), mask, run)?;
                if let (Some(t), Some(start)) = (timing.as_deref_mut(), start) {
                    t.push((start.elapsed().as_secs_f64() * 1e3, scores.clone()));
                    for x in f.inner().filter(|&x| x != f.product) {
                        inner_shapes.push((x, scores.clone()));
                    }
                }
                vals[g.nodes[f.product].output.0] = Some(y);
                continue;
            }
            if let Some(f) = self.fused_float_attention[i] {
                // The key as the product reads it: `kt`, or `k` when its transposition runs here.
                let key = f.transpose.map_or(n.inputs[1], |p| g.nodes[p].inputs[0]);
                let (mut kt, q) = (take(vals, left, key), take(vals, left, n.inputs[0]));
                if let Some(x) = f.key_scale {
                    // The scaling of `kt`, on `k`: the same products by the constant.
                    let xn = &g.nodes[x];
                    args.clear();
                    args.push(kt);
                    kt = Self::node_step(step_of(xn), args, run).map_err(|e| e.within(&xn.name))?;
                }
                let v = take(vals, left, f.v);
                let start = timing.is_some().then(std::time::Instant::now);
                let scores = crate::ops::matmul::matmul_shape(q.shape(), &f.kt_shape(kt.shape())).unwrap_or_default();
                let y = self.float_attention(i, f, (q, kt, v), run)?;
                if let (Some(t), Some(start)) = (timing.as_deref_mut(), start) {
                    t.push((start.elapsed().as_secs_f64() * 1e3, scores.clone()));
                    inner_shapes.push((f.softmax, scores));
                }
                vals[g.nodes[f.product].output.0] = Some(y);
                continue;
            }
            // A reader of a small part of a value others still read computes from the value
            // itself, not from a copy of it.
            if let ([t], None) = (&n.inputs[..], self.fused_add[i]) {
                if left[t.0] > 1 {
                    let start = timing.is_some().then(std::time::Instant::now);
                    let x = vals[t.0].as_ref().expect("computed before read");
                    if let Some(y) = step_of(n).op.run_borrowed(x, run) {
                        let y = y.map_err(|e| e.within(&n.name))?;
                        left[t.0] -= 1;
                        if let (Some(t), Some(start)) = (timing.as_deref_mut(), start) {
                            t.push((start.elapsed().as_secs_f64() * 1e3, y.shape().to_vec()));
                        }
                        vals[n.output.0] = Some(y);
                        continue;
                    }
                }
            }
            args.clear();
            for &t in &n.inputs {
                let v = take(vals, left, t);
                args.push(v);
            }
            let start = timing.is_some().then(std::time::Instant::now);
            let (y, out) = match self.fused_add[i] {
                Some(f) => {
                    let other = take(vals, left, f.other);
                    let add = &g.nodes[f.add];
                    let conv = step_of(n).op.as_any().downcast_ref::<ConvOp>().expect("fused at assembly");
                    let sum = step_of(add).op.as_any().downcast_ref::<AddOp>().expect("fused at assembly");
                    let y = conv
                        .run_add(args, step_of(n).in_q, run, sum, (other, f.other_pos))
                        .map_err(|e| e.within(&format!("{} (with {})", n.name, add.name)))?;
                    (y, add.output)
                }
                None => (Self::node_step(step_of(n), args, run).map_err(|e| e.within(&n.name))?, n.output),
            };
            if let (Some(t), Some(start)) = (timing.as_deref_mut(), start) {
                t.push((start.elapsed().as_secs_f64() * 1e3, y.shape().to_vec()));
            }
            vals[out.0] = Some(y);
            debug_assert!(args.is_empty(), "a node consumes its arguments");
        }
        let mut outs = Vec::with_capacity(g.outputs.len());
        for t in &g.outputs {
            left[t.0] -= 1;
            let v = vals[t.0].as_ref().expect("outputs are computed");
            outs.push(if left[t.0] == 0 { vals[t.0].take().expect("present") } else { pooled_copy(v) });
        }
        Ok(outs)
    }

    /// Graph input `k` as the model takes it: quantized on entry when every reader is int8,
    /// else float; clamped to its custom integer range, if it has one.
    fn entry_value(&self, k: usize, x: ndarray::ArrayViewD<'_, f32>) -> Result<Value> {
        let mut v = if self.quantize_on_entry[k] {
            Value::quantize(x, self.input_q[k])
                .map_err(|e| NnError::Op { module: "(model input)".into(), source: e })?
        } else {
            Value::F32(x.to_owned())
        };
        if let Some([lo, hi]) = self.input_ranges[k] {
            crate::ops::range::clamp_value(&mut v, (lo, hi), self.input_q[k]);
        }
        Ok(v)
    }

    /// Times every node: the model runs `runs` times on `xs` (after one run that is not
    /// counted) with the model's thread count, and each node's median time is returned with
    /// its output shape and, for layers with weights, its multiply-accumulates. Nodes come in
    /// the graph's order; a residual addition that its convolution runs (attention's softmax
    /// and second product, that its first product runs) reports 0 and names that node,
    /// whose time includes it.
    ///
    /// # Errors
    /// As [`QuantizedModel::forward_values`], or `runs == 0`.
    pub fn profile(&self, xs: &[ArrayD<f32>], runs: usize) -> Result<Vec<NodeTime>> {
        if runs == 0 {
            return Err(NnError::Config {
                module: "QuantizedModel::profile".into(),
                reason: "runs is 0; time at least one run".into(),
            });
        }
        if xs.len() != self.graph.inputs.len() {
            return Err(NnError::Shape {
                module: "(model input)".into(),
                kind: "profile",
                expected: format!("{} input arrays, one per graph input", self.graph.inputs.len()),
                got: vec![xs.len()],
            });
        }
        if let (Some(b), Some(_)) = (self.graph.batch, crate::graph::chunks(self.graph.batch, xs)?) {
            return Err(NnError::Shape {
                module: "(model input)".into(),
                kind: "profile",
                expected: format!("one batch of {b} item(s), the batch the model is fixed at"),
                got: xs.iter().map(|x| x.shape().first().copied().unwrap_or(0)).collect(),
            });
        }
        let views: Vec<_> = xs.iter().map(ArrayD::view).collect();
        let nodes = self.graph.nodes.len();
        let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); nodes];
        let mut shapes = Vec::new();
        qkernels::with_threads(self.run.threads, || {
            let (mut vals, mut left, mut args) = (Vec::new(), Vec::new(), Vec::new());
            for r in 0..=runs {
                let mut t = Vec::with_capacity(nodes);
                self.eval_with(&views, self.run, &mut vals, &mut left, &mut args, Some(&mut t))?;
                if r > 0 {
                    for (k, (ms, shape)) in t.into_iter().enumerate() {
                        times[k].push(ms);
                        if r == 1 {
                            shapes.push(shape);
                        }
                    }
                }
            }
            Ok::<_, NnError>(())
        })?;
        Ok(self
            .graph
            .nodes
            .iter()
            .zip(times)
            .zip(shapes)
            .enumerate()
            .map(|(i, ((n, mut t), out_shape))| {
                t.sort_by(f64::total_cmp);
                let op = &step_of(n).op;
                let runs_in = self.runs_in_conv[i].map(|conv| self.graph.nodes[conv].name.clone());
                let runs_in = runs_in.or_else(|| {
                    self.runs_in_attention[i].then(|| {
                        let first =
                            self.fused_attention.iter().position(|f| f.is_some_and(|f| f.runs(i))).or_else(|| {
                                self.fused_float_attention.iter().position(|f| {
                                    f.is_some_and(|f| {
                                        f.softmax == i
                                            || f.product == i
                                            || f.transpose == Some(i)
                                            || f.key_scale == Some(i)
                                    })
                                })
                            });
                        self.graph.nodes[first.expect("a fused step has its first product")].name.clone()
                    })
                });
                NodeTime {
                    name: n.name.clone(),
                    op: op.op_name(),
                    macs: op.macs(&out_shape),
                    out_shape,
                    median_ms: t[t.len() / 2],
                    runs_in,
                    kernel: op.kernel(),
                }
            })
            .collect())
    }

    /// Per node whose op has a choice of kernels (convolutions, linear layers), its name and
    /// the kernel that runs it on this machine ([`crate::ops::QOp::kernel`]): the path its
    /// packing chose and, on AVX2, whether products are summed in 16-bit pairs
    /// (`vpmaddubsw`, for input codes up to the bound the weights allow) or exactly.
    pub fn kernels(&self) -> Vec<(&str, String)> {
        self.graph.nodes.iter().filter_map(|n| step_of(n).op.kernel().map(|k| (n.name.as_str(), k))).collect()
    }

    /// Runs one node on its input values.
    fn node_step(step: &QStep, args: &mut Vec<Value>, run: Run) -> Result<Value> {
        step.op.run(args, step.in_q, run)
    }

    /// Attention found at assembly ([`attention_fusions`]), node `i` its first product: head
    /// by head when the shapes fit, else its ops one after the other.
    fn attention(
        &self,
        i: usize,
        f: Attention,
        (q, kt, v): (Value, Value, Value),
        mask: Option<Value>,
        run: Run,
    ) -> Result<Value> {
        use crate::ops::add::AddOp;
        use crate::ops::matmul::{attention, attention_fits, mask_fits, matmul_shape, Between, MaskAdd, MatMulOp};
        use crate::ops::scalar::MulScalarOp;
        use crate::ops::softmax::SoftmaxOp;
        let g = &self.graph;
        let (a, s, b) = (&g.nodes[i], &g.nodes[f.softmax], &g.nodes[f.product]);
        let names = || {
            let inner: Vec<&str> = f.inner().map(|x| g.nodes[x].name.as_str()).collect();
            format!("{} (with {})", a.name, inner.join(", "))
        };
        let first = step_of(a).op.as_any().downcast_ref::<MatMulOp>().expect("found at assembly");
        let softmax = step_of(s).op.as_any().downcast_ref::<SoftmaxOp>().expect("found at assembly");
        let second = step_of(b).op.as_any().downcast_ref::<MatMulOp>().expect("found at assembly");
        let scale = f.scale.map(|x| {
            step_of(&g.nodes[x]).op.as_any().downcast_ref::<MulScalarOp>().expect("found at assembly").factor()
        });
        let add =
            f.mask.map(|(x, ..)| step_of(&g.nodes[x]).op.as_any().downcast_ref::<AddOp>().expect("found at assembly"));
        let step = |x: usize, args: &mut Vec<Value>| {
            let n = &g.nodes[x];
            Self::node_step(step_of(n), args, run).map_err(|e| e.within(&n.name))
        };
        // With the key's transposition here, `kt` holds `k`.
        let kt_shape = match f.transpose {
            Some(_) => crate::ops::matmul::swap_last_two(kt.shape()),
            None => kt.shape().to_vec(),
        };
        let scores = matmul_shape(q.shape(), &kt_shape);
        let fits = attention_fits(q.shape(), &kt_shape, v.shape())
            && softmax.over_last_axis(q.shape().len())
            && mask.as_ref().is_none_or(|m| scores.as_deref().is_some_and(|s| mask_fits(s, m.shape())));
        let mut args = Vec::new();
        if fits {
            let mask = match (mask, add, f.mask) {
                (Some(mask), Some(add), Some((_, _, scores_first))) => Some(MaskAdd { add, mask, scores_first }),
                _ => None,
            };
            let mut kt = kt;
            if let Some(x) = f.key_scale {
                // The scaling of `kt`, on `k`: the same codes, the same parameters.
                args.push(kt);
                kt = step(x, &mut args)?;
            }
            return attention((first, softmax, second), Between { scale, mask }, q, kt, f.transpose.is_some(), v, run)
                .map_err(|e| e.within(&names()));
        }
        let mut kt = kt;
        for x in f.transpose.into_iter().chain(f.key_scale) {
            args.push(kt);
            kt = step(x, &mut args)?;
        }
        args.extend([q, kt]);
        let mut scores = step(i, &mut args)?;
        if let Some(x) = f.scale {
            args.push(scores);
            scores = step(x, &mut args)?;
        }
        if let (Some((x, _, scores_first)), Some(mask)) = (f.mask, mask) {
            if scores_first {
                args.extend([scores, mask]);
            } else {
                args.extend([mask, scores]);
            }
            scores = step(x, &mut args)?;
        }
        args.push(scores);
        let mut p = step(f.softmax, &mut args)?;
        if let Some(x) = f.nan {
            args.push(p);
            p = step(x, &mut args)?;
        }
        args.extend([p, v]);
        step(f.product, &mut args)
    }

    /// Float attention found at assembly ([`float_attention_fusions`]), node `i` its first
    /// product: head by head when the shapes fit, else its ops one after the other.
    fn float_attention(
        &self,
        i: usize,
        f: FloatAttention,
        (q, kt, v): (Value, Value, Value),
        run: Run,
    ) -> Result<Value> {
        use crate::ops::matmul::{attention_f32, attention_fits};
        let g = &self.graph;
        let (a, s, b) = (&g.nodes[i], &g.nodes[f.softmax], &g.nodes[f.product]);
        let softmax = step_of(s)
            .op
            .as_any()
            .downcast_ref::<crate::ops::fallback::FloatOp>()
            .and_then(|x| x.0.as_any().downcast_ref::<crate::ops::softmax::Softmax>())
            .expect("found at assembly");
        let rank = q.shape().len();
        // With the transposition fused, `kt` holds `k`.
        if attention_fits(q.shape(), &f.kt_shape(kt.shape()), v.shape()) && softmax.over_last_axis(rank) {
            let (q, kt, v) = (q.into_f32(), kt.into_f32(), v.into_f32());
            let y = attention_f32(&q, &kt, f.transpose.is_some(), &v, run)
                .map_err(|e| e.within(&format!("{} (with {}, {})", a.name, s.name, b.name)))?;
            for x in [q, kt, v] {
                scratch::recycle_f32(x);
            }
            return Ok(Value::F32(y));
        }
        let step = |x: usize, args: &mut Vec<Value>| {
            let n = &g.nodes[x];
            Self::node_step(step_of(n), args, run).map_err(|e| e.within(&n.name))
        };
        // `kt` holds `k` scaled: transposed here, the scaling moved before it (elementwise,
        // the same values).
        let kt = match f.transpose {
            Some(p) => {
                let mut args = vec![kt];
                step(p, &mut args)?
            }
            None => kt,
        };
        let mut args = vec![q, kt];
        let scores = step(i, &mut args)?;
        args.push(scores);
        let p = step(f.softmax, &mut args)?;
        args.extend([p, v]);
        step(f.product, &mut args)
    }

    /// Every value's name, logical shape, element type (`u8` with its parameters, or `f32`
    /// where the model runs in float) and layout, inputs first, then the nodes' outputs in
    /// order, as the model computes them for inputs of `input_shapes` (it runs once on
    /// zeros of those shapes to find out).
    ///
    /// # Errors
    /// As [`QuantizedModel::forward_values`].
    pub fn value_info(&self, input_shapes: &[&[usize]]) -> Result<Vec<crate::graph::ValueInfo>> {
        let g = &self.graph;
        if input_shapes.len() != g.inputs.len() {
            return Err(NnError::Shape {
                module: "(model input)".into(),
                kind: "value_info",
                expected: format!("{} input shapes, one per graph input", g.inputs.len()),
                got: vec![input_shapes.len()],
            });
        }
        let info = |name: &str, v: &Value| {
            let (shape, dtype) = match v {
                Value::F32(a) => (a.shape().to_vec(), crate::graph::ElemType::F32),
                Value::U8 { shape, q, .. } => (shape.clone(), crate::graph::ElemType::U8(*q)),
            };
            crate::graph::ValueInfo {
                name: name.to_string(),
                layout: crate::graph::layout_of(&shape, dtype),
                shape,
                dtype,
            }
        };
        let run = Run { threads: 1, ..self.run };
        let mut vals: Vec<Option<Value>> = vec![None; g.values];
        let mut out = Vec::with_capacity(g.values);
        for (k, (t, s)) in g.inputs.iter().zip(input_shapes).enumerate() {
            let x = ArrayD::<f32>::zeros(IxDyn(s));
            let v = self.entry_value(k, x.view())?;
            out.push(info(&g.input_names[k], &v));
            vals[t.0] = Some(v);
        }
        for n in &g.nodes {
            let mut args: Vec<Value> = n.inputs.iter().map(|t| vals[t.0].clone().expect("computed")).collect();
            let y = Self::node_step(step_of(n), &mut args, run).map_err(|e| e.within(&n.name))?;
            out.push(info(&n.name, &y));
            vals[n.output.0] = Some(y);
        }
        Ok(out)
    }

    /// Runs the int8 model; float output (dequantized at the end).
    ///
    /// # Errors
    /// As [`QuantizedModel::forward_value`].
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(self.forward_value(x)?.into_f32())
    }
}

fn mismatch(name: &str) -> NnError {
    NnError::Fusion {
        modules: vec![name.to_string()],
        reason: "the float model passed to report() must be the converted model's float original, fused the same way"
            .into(),
    }
}

/// A value's `u8` data, logical shape and parameters: as it is if quantized, else quantized
/// with `q_if_float`.
pub(crate) fn quantized(v: Value, q_if_float: QuantU8) -> Result<(Vec<u8>, Vec<usize>, QuantU8)> {
    let v = match v {
        Value::F32(a) => {
            Value::quantize(a.view(), q_if_float).map_err(|e| NnError::Op { module: String::new(), source: e })?
        }
        v => v,
    };
    match v {
        Value::U8 { data, shape, q } => Ok((data, shape, q)),
        Value::F32(_) => unreachable!("quantized above"),
    }
}

/// A copy of `v` in a pooled buffer (for the branches that share an input).
fn pooled_copy(v: &Value) -> Value {
    match v {
        Value::F32(a) => {
            let mut d = scratch::take_f32(a.len());
            // The copy keeps the value's memory order (a float convolution's NHWC output stays
            // NHWC for the next one), else it is made in logical order.
            Value::F32(match crate::layers::in_memory_order(a) {
                Some(s) => {
                    d.copy_from_slice(s);
                    crate::layers::laid_out_like(a, d)
                }
                None => {
                    d.iter_mut().zip(a.iter()).for_each(|(d, v)| *d = *v);
                    ArrayD::from_shape_vec(a.raw_dim(), d).expect("the value's length")
                }
            })
        }
        Value::U8 { data, shape, q } => {
            let mut d = scratch::take(data.len());
            d.copy_from_slice(data);
            Value::U8 { data: d, shape: shape.clone(), q: *q }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A float value's pooled copy holds the same values: in the same memory order when the
    /// value is one block of memory with non-negative strides (a float convolution's NHWC
    /// output of NCHW shape stays NHWC), in logical order otherwise.
    #[test]
    fn pooled_copies_of_float_values_keep_their_values_and_memory_order() {
        let nhwc =
            ArrayD::from_shape_fn(IxDyn(&[2, 4, 5, 3]), |i| (i[0] * 1000 + i[1] * 100 + i[2] * 10 + i[3]) as f32);
        let nchw = nhwc.permuted_axes(IxDyn(&[0, 3, 1, 2]));
        let mut reversed = nchw.clone();
        reversed.invert_axis(ndarray::Axis(2));
        // Every other column of an owned array: gaps in its memory.
        let mut gaps = nchw.clone();
        gaps.slice_each_axis_inplace(|a| ndarray::Slice::new(0, None, if a.axis.0 == 3 { 2 } else { 1 }));
        for (what, a, same_strides) in [
            ("NHWC memory order", nchw.clone(), true),
            ("a standard layout", nchw.as_standard_layout().into_owned(), true),
            ("an inverted axis", reversed, false),
            ("gaps", gaps, false),
        ] {
            let Value::F32(b) = pooled_copy(&Value::F32(a.clone())) else { panic!("a float value") };
            assert_eq!(b, a, "{what}: values");
            if same_strides {
                assert_eq!(b.strides(), a.strides(), "{what}: memory order");
            } else {
                assert!(b.is_standard_layout(), "{what}: logical order");
            }
        }
    }
}
