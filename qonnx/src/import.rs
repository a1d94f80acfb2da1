//! ONNX graph -> [`qnn::Graph`]: one pass over the nodes in their (topological) order.
//!
//! Every ONNX value is either a node of the graph being built (with its shape, tracked as
//! the graph is written so that shape arithmetic can be folded) or a constant (initializers,
//! `Constant` nodes, and everything computed from constants alone: the
//! `Shape`/`Gather`/`Concat`/`Reshape` chains exporters write, folded here). Layers keep the
//! ONNX node's name, so reports, plans and `QConfigMapping` rules use the names the
//! exporter wrote.

use std::collections::HashMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use qnn::layers::FusedAct;
use qnn::layers::{
    AdaptiveAvgPool2d, AddScalar, AvgPool2d, BatchConst, BatchNorm1d, BatchNorm2d, ChannelShuffle, Conv2d,
    ConvTranspose2d, Embedding, Flatten, HardSigmoid, Hardswish, Hardtanh, ImageRows, LayerNorm, Linear, MaxPool2d,
    MulScalar, NanToZero, Pad2d, PadMode, Permute, ReLU, ReLU6, Reshape, RowsImage, SeqConst, SiLU, Sigmoid, Slice,
    SliceRange, Softmax, Tanh, Upsample, UpsampleMode, GELU,
};
use qnn::qkernels::Conv2dGeometry;
use qnn::{Graph, GraphBuilder, Module, Tensor};

use crate::error::{OnnxError, Result};
use crate::proto::{data_type as dt, AttributeProto, GraphProto, ModelProto, NodeProto};
use crate::tensor::{decode, Const, Data, BATCH, TOKENS};

/// The op types of the default domain that import (constant-only ops fold at import).
pub const SUPPORTED: &[&str] = &[
    "Add (computed values; a constant per channel, a scalar, a constant of one image, or one that broadcasts against one item: on images, one varying along height or width)",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat (computed values along any axis but the batch's; constants of one image, repeated over the batch)",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose (explicit pads; int8 when the kernel equals the stride, float otherwise)",
    "Div (by a constant)",
    "Dropout",
    "Equal, Less, Greater, And, Or, Xor, Not, Mod, Neg, Reciprocal, Sqrt, Where (constants)",
    "Expand (constants)",
    "Flatten",
    "Gather (constants; a computed value at one constant index)",
    "Gemm",
    "Gelu (and its Erf and tanh forms)",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid (beta 0.5)",
    "HardSwish",
    "Identity",
    "IsNaN (read only by Where(IsNaN(x), 0, x): x with its NaNs as 0)",
    "LayerNormalization (last axis; also written out as ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div)",
    "MatMul",
    "MaxPool",
    "Mul (computed values; by a constant per channel of an image, a scalar, or a constant that broadcasts against one item: on images, one varying along height or width)",
    "Pad",
    "Range (constants)",
    "ReduceMean (spatial axes of NCHW, the last of [n, c, length])",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Split",
    "Squeeze",
    "Sub (computed values; a constant either side)",
    "Sum",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Upsample",
];

/// The opsets of the default domain this importer follows.
pub const OPSETS: std::ops::RangeInclusive<i64> = 6..=21;

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Shapes for inputs whose declared shape has symbolic or missing sizes, by input name.
    /// A symbolic first dimension (the batch) needs none: it is taken as 1 while importing,
    /// and the graph runs at any batch size. When the inputs leave exactly one other size
    /// symbolic (one name, such as a sequence length: BERT's `input_ids` `[batch, seq]` and
    /// its mask `[batch, 1, 1, seq]`), the size given here is the one imported, and the
    /// graph runs at any length where the import can follow it (see
    /// [`Imported::sequence`]).
    pub input_shapes: HashMap<String, Vec<usize>>,
}

/// The one symbolic size of a model's inputs besides the batch (a sequence length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Its name in the file (`dim_param`).
    pub name: String,
    /// The size it was imported at.
    pub size: usize,
    /// `Ok`: the graph runs at any size of it (checked at import by shape inference at
    /// another size); `Err`: only at `size`, and why (the first value whose shape the
    /// import could not follow, by its ONNX name).
    pub dynamic: std::result::Result<(), String>,
}

/// One input of an imported model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    /// Its ONNX name.
    pub name: String,
    /// The shape it was imported with.
    pub shape: Vec<usize>,
    /// Whether its first dimension is symbolic (any batch size).
    pub dynamic_batch: bool,
    /// Its axis that is the model's [`Sequence`], if any.
    pub sequence_axis: Option<usize>,
}

/// The batch size a graph takes alone: that of its inputs when none has a symbolic batch,
/// all have the same first dimension, and shape inference refuses twice as many items
/// (PyTorch's dynamo exporter writes the batch into the reshapes). `None` when it takes other
/// batch sizes too (a fixed batch with only per-item ops after it runs any batch).
fn fixed_batch(graph: &Graph, inputs: &[InputSpec]) -> Option<usize> {
    let first = inputs.first()?;
    let b = *first.shape.first()?;
    if b == 0 || inputs.iter().any(|i| i.dynamic_batch || i.shape.len() < 2 || i.shape[0] != b) {
        return None;
    }
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|i| [&[2 * b], &i.shape[1..]].concat()).collect();
    let refs: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
    graph.value_info(&refs).is_err().then_some(b)
}

/// An imported model: the float graph and what it was made from.
#[derive(Debug)]
pub struct Imported {
    /// The float graph, ready for `qnn::prepare`.
    pub graph: Graph,
    /// Its inputs, in order.
    pub inputs: Vec<InputSpec>,
    /// The ONNX names of its outputs, in order.
    pub outputs: Vec<String>,
    /// The model's opset of the default domain.
    pub opset: i64,
    /// Who wrote the file (`producer_name producer_version`).
    pub producer: String,
    /// Each ONNX node that became layers, with the graph's node names for it (constant
    /// folding and passthroughs leave none).
    pub nodes: Vec<(String, String, Vec<String>)>,
    /// The one symbolic size of the inputs besides the batch, if there is one.
    pub sequence: Option<Sequence>,
}

/// A value of the graph being written.
#[derive(Debug, Clone)]
struct Node {
    t: Tensor,
    shape: Vec<usize>,
    /// Its first dimension is the batch (it follows the model's first input's).
    batch: bool,
    /// `t` holds this ONNX value (of this shape, with this batch flag) as rows of its last
    /// axis, `[product of the others, last]`: channels-last layers (LayerNorm, MatMul and
    /// elementwise tables) run on the rows, and an image becomes them and back without
    /// moving a byte in int8 (`ImageRows`, `RowsImage`). Other readers get it reshaped.
    rows_of: Option<(Vec<usize>, bool)>,
    /// The axis of the (logical) value whose size follows the batch: the batch itself, moved
    /// by transposes, or merged with other axes by reshapes (attention's `[tokens, batch *
    /// heads, d]`), when the import could follow it. A reshape whose output has it is built
    /// with `-1` there, so that the graph runs at any batch size.
    batch_axis: Option<usize>,
    /// The axes of the (logical) value whose size is the sequence length, when the model
    /// leaves it symbolic and the import could follow it (moved by transposes and reshapes,
    /// as the batch is; attention's scores have two). Layers built from them keep that size
    /// whatever it is at run time.
    tokens: Vec<usize>,
}

/// What [`Importer::layernorm_chain`] matched.
struct LayerNormChain {
    x: String,
    eps: f32,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    absorbed: Vec<String>,
}

#[derive(Debug, Clone)]
enum Val {
    Node(Node),
    Const(Const),
}

struct Cx<'a> {
    node: &'a NodeProto,
    name: String,
    opset: i64,
}

impl Cx<'_> {
    fn op(&self) -> &str {
        self.node.op_type.as_deref().unwrap_or("")
    }
    fn err(&self, reason: impl Into<String>) -> OnnxError {
        OnnxError::Node {
            node: self.name.clone(),
            op_type: self.op().to_string(),
            opset: self.opset,
            reason: reason.into(),
        }
    }
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node.attribute.iter().find(|a| a.name.as_deref() == Some(name))
    }
    fn int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).and_then(|a| a.i).unwrap_or(default)
    }
    fn float(&self, name: &str, default: f32) -> f32 {
        self.attr(name).and_then(|a| a.f).unwrap_or(default)
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }
    fn string(&self, name: &str, default: &str) -> String {
        self.attr(name)
            .and_then(|a| a.s.as_deref())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_else(|| default.to_string())
    }
    /// Input `i`'s name, `None` when absent or empty (an omitted optional input).
    fn input(&self, i: usize) -> Option<&str> {
        self.node.input.get(i).map(String::as_str).filter(|s| !s.is_empty())
    }
}

/// Imports a decoded model. `base` is its folder (for external data).
pub(crate) fn import(model: &ModelProto, base: Option<&Path>, opts: &ImportOptions) -> Result<Imported> {
    let opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .ok_or_else(|| OnnxError::Model("the model imports no opset of the default domain (ai.onnx)".into()))?;
    if !OPSETS.contains(&opset) {
        return Err(OnnxError::Model(format!(
            "the model uses opset {opset} of ai.onnx; qonnx imports opsets {}-{} (re-export with \
             torch.onnx.export(..., opset_version=17), or convert with onnx.version_converter)",
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    let g = model.graph.as_ref().ok_or_else(|| OnnxError::Model("the model has no graph".into()))?;
    let producer =
        format!("{} {}", model.producer_name.as_deref().unwrap_or(""), model.producer_version.as_deref().unwrap_or(""))
            .trim()
            .to_string();
    let mut im = Importer::new(opset);
    let (parts, sequence) = match sequence_symbol(g, opts)? {
        None => (im.run(g, base, opts, None)?, None),
        Some(seq) => {
            // Followed through the graph, and checked at another length; where either fails,
            // imported again at the given length alone, which the graph then checks.
            let followed = im.run(g, base, opts, Some(&seq)).map_err(|e| e.to_string()).and_then(|parts| {
                im.sequence_check(&parts)?;
                Ok(parts)
            });
            let (name, size) = (seq.name.clone(), seq.size);
            match followed {
                Ok(parts) => (parts, Some(Sequence { name, size, dynamic: Ok(()) })),
                Err(why) => {
                    let fixed = SeqSymbol { fixed: true, ..seq };
                    let parts = Importer::new(opset).run(g, base, opts, Some(&fixed))?;
                    (parts, Some(Sequence { name, size, dynamic: Err(why) }))
                }
            }
        }
    };
    let (inputs, outputs, nodes, mut graph) = parts;
    if let Some(b) = fixed_batch(&graph, &inputs) {
        graph.set_fixed_batch(Some(b))?;
    }
    Ok(Imported { graph, inputs, outputs, opset, producer, nodes, sequence })
}

struct Importer {
    b: GraphBuilder,
    vals: HashMap<String, Val>,
    /// Graph node names in use (ONNX names may repeat or be empty).
    names: HashMap<String, usize>,
    opset: i64,
    /// `Add` nodes whose bias a preceding `MatMul` took: output name -> the Linear's output.
    absorbed: HashMap<String, String>,
    /// Reshapes absorbed into a channel shuffle: output name -> the shape their input has
    /// and the one they must give (checked when they are reached).
    shuffle_checks: HashMap<String, (Vec<usize>, Vec<usize>)>,
    /// The inputs' one symbolic size besides the batch: its name, the size imported, and the
    /// first input holding it with its axis (what a [`SeqConst`] reads).
    seq: Option<(String, usize, Tensor, usize)>,
    /// The tanh forms of GELU written out ([`Importer::tanh_gelu_chains`]): the output of a
    /// chain's first node -> its input and the outputs of its other nodes.
    tanh_gelus: HashMap<String, (String, Vec<String>)>,
}

type Parts = (Vec<InputSpec>, Vec<String>, Vec<(String, String, Vec<String>)>, Graph);

/// The inputs' one symbolic size besides the batch.
#[derive(Debug, Clone)]
struct SeqSymbol {
    name: String,
    size: usize,
    /// The axis holding it, per input name.
    axes: HashMap<String, usize>,
    /// Imported at `size` only: each input holding it is checked to have that size.
    fixed: bool,
}

/// The one name the inputs' symbolic sizes past the batch share, with the sizes
/// `input_shapes` gives it (which must agree), if there is exactly one such name and each
/// input holds it at most once.
fn sequence_symbol(g: &GraphProto, opts: &ImportOptions) -> Result<Option<SeqSymbol>> {
    let inits: std::collections::HashSet<&str> = g.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    let mut found: Vec<(String, usize, String, usize)> = Vec::new(); // input, axis, symbol, size
    for vi in &g.input {
        let name = vi.name.clone().unwrap_or_default();
        if inits.contains(name.as_str()) {
            continue;
        }
        let (Some(given), Some(dims)) = (
            opts.input_shapes.get(&name),
            vi.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()).and_then(|t| t.shape.as_ref()),
        ) else {
            continue;
        };
        for (k, d) in dims.dim.iter().enumerate().skip(1) {
            match (d.dim_value.filter(|&v| v > 0), d.dim_param.as_deref().filter(|p| !p.is_empty())) {
                (None, Some(p)) => {
                    let size = *given.get(k).ok_or_else(|| {
                        OnnxError::Model(format!(
                            "input '{name}': the shape given, {given:?}, has no axis {k}, which the file names '{p}'"
                        ))
                    })?;
                    found.push((name.clone(), k, p.to_string(), size));
                }
                (None, None) => return Ok(None),
                _ => {}
            }
        }
    }
    let Some((first, _, sym, size)) = found.first().cloned() else { return Ok(None) };
    if found.iter().any(|f| f.2 != sym) {
        return Ok(None);
    }
    if let Some(f) = found.iter().find(|f| f.3 != size) {
        return Err(OnnxError::Model(format!(
            "inputs '{first}' and '{}' give the size '{sym}' two values, {size} and {}: give it one",
            f.0, f.3
        )));
    }
    let mut axes = HashMap::new();
    for f in &found {
        if axes.insert(f.0.clone(), f.1).is_some() {
            return Ok(None);
        }
    }
    Ok(Some(SeqSymbol { name: sym, size, axes, fixed: false }))
}

impl Importer {
    fn new(opset: i64) -> Self {
        Importer {
            b: GraphBuilder::new(),
            vals: HashMap::new(),
            names: HashMap::new(),
            opset,
            absorbed: HashMap::new(),
            shuffle_checks: HashMap::new(),
            seq: None,
            tanh_gelus: HashMap::new(),
        }
    }

    /// Shape inference at another length of the sequence: every ONNX value the graph computes
    /// has the shape the import expects of it there (its sequence axes at that length, the
    /// rest as imported). `Err`: the first that does not, or the graph's error.
    fn sequence_check(&self, parts: &Parts) -> std::result::Result<(), String> {
        let (inputs, _, _, graph) = parts;
        let Some((_, size, _, _)) = &self.seq else { return Ok(()) };
        let other = if *size >= 2 { size - 1 } else { 2 };
        let at = |shape: &[usize], axes: &[usize]| -> Vec<usize> {
            shape.iter().enumerate().map(|(k, &d)| if axes.contains(&k) { other } else { d }).collect()
        };
        let shapes: Vec<Vec<usize>> =
            inputs.iter().map(|i| at(&i.shape, &i.sequence_axis.into_iter().collect::<Vec<_>>())).collect();
        let refs: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
        let info = graph.value_info(&refs).map_err(|e| format!("at {other}: {e}"))?;
        let mut vals: Vec<(&String, &Node)> =
            self.vals.iter().filter_map(|(k, v)| if let Val::Node(n) = v { Some((k, n)) } else { None }).collect();
        vals.sort_by_key(|(k, n)| (n.t.index(), k.as_str()));
        for (name, n) in vals {
            let mut want = at(&n.shape, &n.tokens);
            if n.rows_of.is_some() {
                let last = want.pop().unwrap_or(1);
                want = vec![want.iter().product(), last];
            }
            let got = &info[n.t.index()].shape;
            if *got != want {
                return Err(format!(
                    "'{name}', of shape {:?} at {size}, has shape {got:?} at {other}, not {want:?}",
                    n.shape
                ));
            }
        }
        Ok(())
    }

    fn run(
        &mut self,
        g: &GraphProto,
        base: Option<&Path>,
        opts: &ImportOptions,
        seq: Option<&SeqSymbol>,
    ) -> Result<Parts> {
        if let Some(s) = g.sparse_initializer.first() {
            let name = s.values.as_ref().and_then(|v| v.name.clone()).unwrap_or_default();
            return Err(OnnxError::Model(format!(
                "initializer '{name}' is sparse; qonnx reads dense initializers only (densify it with onnx's tools)"
            )));
        }
        for t in &g.initializer {
            let name = t.name.clone().unwrap_or_default();
            if name.is_empty() {
                return Err(OnnxError::Model("an initializer has no name".into()));
            }
            self.vals.insert(name, Val::Const(decode(t, base)?));
        }
        let mut inputs = Vec::new();
        for (i, vi) in g.input.iter().enumerate() {
            let name = vi.name.clone().unwrap_or_default();
            // Before IR version 4 initializers were also listed as inputs.
            if self.vals.contains_key(&name) {
                continue;
            }
            let tt = vi.r#type.as_ref().and_then(|t| t.tensor_type.as_ref());
            let elem = tt.and_then(|t| t.elem_type).unwrap_or(0);
            // Integer inputs (token ids) are given as f32 values, exact up to 2^24.
            if !matches!(elem, dt::FLOAT | dt::INT64 | dt::INT32) {
                return Err(OnnxError::Model(format!(
                    "input '{name}' is {}; qonnx imports models whose inputs are FLOAT tensors, or INT64 / INT32 \
                     ones (token ids, given as f32 values)",
                    dt::name(elem)
                )));
            }
            let dims = tt.and_then(|t| t.shape.as_ref()).map(|s| s.dim.clone());
            let (shape, dynamic_batch) = match (opts.input_shapes.get(&name), dims) {
                (Some(s), _) => (s.clone(), true),
                (None, Some(dims)) => {
                    let mut shape = Vec::new();
                    let mut dynamic = false;
                    for (k, d) in dims.iter().enumerate() {
                        match d.dim_value.filter(|&v| v > 0) {
                            Some(v) => shape.push(
                                usize::try_from(v)
                                    .map_err(|_| OnnxError::Model(format!("input '{name}': size {v}")))?,
                            ),
                            None if k == 0 => {
                                dynamic = true;
                                shape.push(1)
                            }
                            None => {
                                return Err(OnnxError::Model(format!(
                                    "input '{name}': dimension {k} is symbolic ('{}'); give its shape \
                                     (ImportOptions::input_shapes, or the command line's --input-shape)",
                                    d.dim_param.as_deref().unwrap_or("")
                                )))
                            }
                        }
                    }
                    (shape, dynamic)
                }
                (None, None) => {
                    return Err(OnnxError::Model(format!(
                        "input '{name}' declares no shape; give it (ImportOptions::input_shapes, or --input-shape)"
                    )))
                }
            };
            if elements(&shape).is_none() {
                return Err(OnnxError::Model(format!(
                    "input '{name}' of shape {shape:?} is larger than qonnx computes"
                )));
            }
            let mut t = self.b.input(&name);
            let sequence_axis = seq.filter(|s| !s.fixed).and_then(|s| s.axes.get(&name).copied());
            if let (Some(s), Some(k), None) = (seq, sequence_axis, &self.seq) {
                self.seq = Some((s.name.clone(), shape[k], t, k));
            }
            if let Some(s) = seq.filter(|s| s.fixed && s.axes.contains_key(&name)) {
                // The graph runs at the imported length only: a check on the input says so
                // (a reshape to its own shape, past the batch).
                let rest: Vec<i64> = shape[1..].iter().map(|&d| d as i64).collect();
                let node = self.fresh(&format!("{name}:{}={}", s.name, s.size));
                t = self.b.boxed(&node, Box::new(Reshape::batch_and(&rest)), t)?;
            }
            self.vals.insert(
                name.clone(),
                Val::Node(Node {
                    t,
                    shape: shape.clone(),
                    batch: i == 0 || dynamic_batch,
                    rows_of: None,
                    batch_axis: (i == 0 || dynamic_batch).then_some(0),
                    tokens: sequence_axis.into_iter().collect(),
                }),
            );
            inputs.push(InputSpec { name, shape, dynamic_batch, sequence_axis });
        }
        if inputs.is_empty() {
            return Err(OnnxError::Model("the model has no input that is not an initializer".into()));
        }
        let consumers = consumers(g);
        self.tanh_gelus = self.tanh_gelu_chains(g, &consumers);
        let mut record = Vec::new();
        for (i, node) in g.node.iter().enumerate() {
            let op = node.op_type.clone().unwrap_or_default();
            let name = match node.name.as_deref() {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => format!("{op}_{i}"),
            };
            let cx = Cx { node, name, opset: self.opset };
            if !matches!(node.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
                return Err(OnnxError::Unsupported {
                    node: cx.name,
                    op_type: op,
                    domain: node.domain.clone().unwrap_or_default(),
                    opset: self.opset,
                });
            }
            if let Some(src) = node.output.first().and_then(|o| self.absorbed.get(o)).cloned() {
                if let Some((from, to)) = self.shuffle_checks.get(&node.output[0]).cloned() {
                    let target = self.konst(&cx, 1, "shape")?;
                    let t = target.as_i64().ok_or_else(|| cx.err("shape must be integers"))?;
                    if reshape_dims(&cx, &from, t)? != to {
                        return Err(cx.err(format!(
                            "the channel shuffle this reshape ends should give {to:?}, not {t:?} of {from:?}"
                        )));
                    }
                }
                let v = self.vals[&src].clone();
                self.vals.insert(node.output[0].clone(), v);
                continue;
            }
            let before = self.names.len();
            let outs = self.node(&cx, g, &consumers)?;
            if outs.len() < node.output.iter().filter(|o| !o.is_empty()).count() {
                // Extra outputs (a MaxPool's indices, a Dropout's mask) must be unused.
                for o in node.output.iter().skip(outs.len()).filter(|o| !o.is_empty()) {
                    if consumers.get(o.as_str()).is_some_and(|c| !c.is_empty())
                        || g.output.iter().any(|v| v.name.as_deref() == Some(o))
                    {
                        return Err(cx.err(format!(
                            "its output '{o}' is read, and qonnx computes only the first output of {op}"
                        )));
                    }
                }
            }
            for (o, v) in node.output.iter().zip(outs) {
                self.vals.insert(o.clone(), v);
            }
            if self.names.len() > before {
                let mut made: Vec<(String, usize)> =
                    self.names.iter().filter(|(_, &k)| k >= before).map(|(n, &k)| (n.clone(), k)).collect();
                made.sort_by_key(|(_, k)| *k);
                record.push((cx.name.clone(), op, made.into_iter().map(|(n, _)| n).collect()));
            }
        }
        let mut outputs = Vec::new();
        for vi in &g.output {
            let name = vi.name.clone().unwrap_or_default();
            self.materialize(&name)?;
            match self.vals.get(&name) {
                Some(Val::Node(n)) => self.b.output(n.t),
                Some(Val::Const(_)) => {
                    return Err(OnnxError::Model(format!(
                        "output '{name}' is a constant (it depends on no input); qonnx graphs compute their outputs"
                    )))
                }
                None => return Err(OnnxError::Model(format!("output '{name}' is computed by no node"))),
            }
            outputs.push(name);
        }
        let b = std::mem::take(&mut self.b);
        Ok((inputs, outputs, record, b.build()?))
    }

    fn value(&self, cx: &Cx<'_>, i: usize) -> Result<&Val> {
        let name = cx.input(i).ok_or_else(|| cx.err(format!("input {i} is missing")))?;
        self.vals.get(name).ok_or_else(|| cx.err(format!("input '{name}' is computed by no earlier node")))
    }

    fn graph_in(&self, cx: &Cx<'_>, i: usize) -> Result<Node> {
        match self.value(cx, i)? {
            Val::Node(n) => Ok(n.clone()),
            Val::Const(_) => Err(cx.err(format!(
                "input {i} ('{}') is a constant; qonnx runs {} on values computed from the model's inputs",
                cx.input(i).unwrap_or(""),
                cx.op()
            ))),
        }
    }

    /// Value `name` as itself if it is held as rows (see [`Node::rows_of`]): one reshape,
    /// which then stands for the value.
    fn materialize(&mut self, name: &str) -> Result<()> {
        let Some(Val::Node(n)) = self.vals.get(name).cloned() else { return Ok(()) };
        let Some((shape, batch)) = n.rows_of.clone() else { return Ok(()) };
        // `-1` on the batch's axis, wherever it is (the first when it is unknown).
        let at = n.batch_axis.filter(|&b| b < shape.len()).unwrap_or(0);
        let target: Vec<i64> = shape.iter().enumerate().map(|(k, &d)| if k == at { -1 } else { d as i64 }).collect();
        let node = self.fresh(&format!("{name}:unrows"));
        let t = self.b.boxed(&node, Box::new(Reshape { shape: target, keep_batch: false }), n.t)?;
        self.vals.insert(name.to_string(), Val::Node(Node { t, shape, batch, rows_of: None, ..n }));
        Ok(())
    }

    fn konst(&self, cx: &Cx<'_>, i: usize, what: &str) -> Result<Const> {
        match self.value(cx, i)? {
            Val::Const(c) => Ok(c.clone()),
            Val::Node(_) => Err(cx.err(format!(
                "its {what} (input {i}, '{}') is computed at run time; qonnx needs it constant (an initializer or \
                 foldable shape arithmetic)",
                cx.input(i).unwrap_or("")
            ))),
        }
    }

    fn opt_konst(&self, cx: &Cx<'_>, i: usize, what: &str) -> Result<Option<Const>> {
        match cx.input(i) {
            None => Ok(None),
            Some(_) => self.konst(cx, i, what).map(Some),
        }
    }

    fn ints_of(&self, cx: &Cx<'_>, i: usize, what: &str) -> Result<Option<Vec<i64>>> {
        match self.opt_konst(cx, i, what)? {
            None => Ok(None),
            Some(c) => {
                c.as_i64().map(|v| Some(v.to_vec())).ok_or_else(|| cx.err(format!("its {what} must be integers")))
            }
        }
    }

    /// A unique graph node name derived from `base`.
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while self.names.contains_key(&name) {
            name = format!("{base}:{k}");
            k += 1;
        }
        let next = self.names.len();
        self.names.insert(name.clone(), next);
        name
    }

    /// Adds a layer on `x`, its output shape checked now.
    fn layer(&mut self, cx: &Cx<'_>, suffix: &str, m: Box<dyn Module>, x: &Node) -> Result<Node> {
        let shape = m
            .output_shape(&x.shape)
            .ok_or_else(|| cx.err(format!("its layer {} does not infer its output shape", m.kind())))?
            .map_err(|e| cx.err(format!("input of shape {:?}: {e}", x.shape)))?;
        if elements(&shape).is_none() {
            return Err(cx.err(format!("an output of shape {shape:?} is larger than qonnx computes (2^34 elements)")));
        }
        let keeps = shape.first() == x.shape.first();
        let name = self.fresh(&format!("{}{suffix}", cx.name));
        let t = self.b.boxed(&name, m, x.t)?;
        let same_rank = shape.len() == x.shape.len();
        let batch_axis = if same_rank { x.batch_axis } else { (x.batch && keeps).then_some(0) };
        let tokens = if same_rank { x.tokens.clone() } else { Vec::new() };
        Ok(Node { t, shape, batch: x.batch && keeps, rows_of: None, batch_axis, tokens })
    }

    fn node(&mut self, cx: &Cx<'_>, g: &GraphProto, consumers: &HashMap<&str, Vec<usize>>) -> Result<Vec<Val>> {
        let op = cx.op().to_string();
        // Ops that read a value held as rows take the rows; every other reads it reshaped.
        const ROWS_AWARE: &[&str] = &[
            "Identity",
            "Dropout",
            "Relu",
            "Sigmoid",
            "Tanh",
            "HardSwish",
            "HardSigmoid",
            "Gelu",
            "Clip",
            "Div",
            "LayerNormalization",
            "MatMul",
            "Transpose",
        ];
        if !ROWS_AWARE.contains(&op.as_str()) {
            for i in 0..cx.node.input.len() {
                if let Some(name) = cx.input(i) {
                    self.materialize(name)?;
                }
            }
        }
        if let Some((x, rest)) = cx.node.output.first().and_then(|o| self.tanh_gelus.get(o)).cloned() {
            if let Some(Val::Node(xn)) = self.vals.get(&x).cloned() {
                let y = self.layer(cx, "", Box::new(GELU { tanh: true }), &xn)?;
                let out = cx.node.output[0].clone();
                for o in rest {
                    self.absorbed.insert(o, out.clone());
                }
                return Ok(vec![Val::Node(Node { rows_of: xn.rows_of.clone(), ..y })]);
            }
        }
        let one = |n: Node| Ok(vec![Val::Node(n)]);
        match op.as_str() {
            "Identity" | "Dropout" => {
                if op == "Dropout" && cx.int("training_mode", 0) != 0 {
                    return Err(cx.err("training_mode=1; export the model in eval mode"));
                }
                Ok(vec![self.value(cx, 0)?.clone()])
            }
            "Constant" => {
                let c = if let Some(t) = cx.attr("value").and_then(|a| a.t.as_ref()) {
                    decode(t, None)?
                } else if let Some(a) = cx.attr("value_float").and_then(|a| a.f) {
                    Const::floats(vec![], vec![a])
                } else if let Some(a) = cx.attr("value_floats") {
                    Const::floats(vec![a.floats.len()], a.floats.clone())
                } else if let Some(a) = cx.attr("value_int").and_then(|a| a.i) {
                    Const::ints(vec![], vec![a])
                } else if let Some(a) = cx.attr("value_ints") {
                    Const::ints(vec![a.ints.len()], a.ints.clone())
                } else {
                    return Err(cx.err(
                        "no value, value_float(s) or value_int(s) attribute (sparse and string constants are not read)",
                    ));
                };
                Ok(vec![Val::Const(c)])
            }
            "Conv" => one(self.conv(cx)?),
            "ConvTranspose" => one(self.conv_transpose(cx)?),
            "BatchNormalization" => one(self.batchnorm(cx)?),
            "Relu" => self.unary(cx, Box::new(ReLU)),
            "Sigmoid" => {
                // x * sigmoid(x) is SiLU (exporters before opset 22 have no SiLU op): one
                // table in int8 instead of a table and a product.
                let x = cx.input(0).unwrap_or_default().to_string();
                let out = cx.node.output.first().cloned().unwrap_or_default();
                let silu = sole_reader(g, consumers, &out, "Mul")
                    .filter(|mul| other_input(mul, &out) == Some(x.as_str()))
                    .map(|mul| mul.output[0].clone());
                match silu {
                    Some(product) => {
                        let r = self.unary(cx, Box::new(SiLU))?;
                        self.absorbed.insert(product, out);
                        Ok(r)
                    }
                    None => self.unary(cx, Box::new(Sigmoid)),
                }
            }
            "Tanh" => self.unary(cx, Box::new(Tanh)),
            "HardSwish" => self.unary(cx, Box::new(Hardswish)),
            "HardSigmoid" => {
                let (alpha, beta) = (cx.float("alpha", 0.2), cx.float("beta", 0.5));
                if (beta - 0.5).abs() > 1e-6 || !(alpha.is_finite() && alpha > 0.0) {
                    return Err(cx.err(format!(
                        "alpha {alpha}, beta {beta}: qonnx computes max(0, min(1, alpha * x + 0.5)) for alpha > 0 \
                         (PyTorch's hardsigmoid has alpha 1/6)"
                    )));
                }
                if (alpha - 1.0 / 6.0).abs() <= 1e-6 {
                    // x * hardsigmoid(x) is hardswish (PyTorch's export before opset 14): one
                    // table in int8 instead of a table and a product.
                    let x = cx.input(0).unwrap_or_default().to_string();
                    let out = cx.node.output.first().cloned().unwrap_or_default();
                    let swish = sole_reader(g, consumers, &out, "Mul")
                        .filter(|mul| other_input(mul, &out) == Some(x.as_str()))
                        .map(|mul| mul.output[0].clone());
                    if let Some(product) = swish {
                        let r = self.unary(cx, Box::new(Hardswish))?;
                        self.absorbed.insert(product, out);
                        return Ok(r);
                    }
                    return self.unary(cx, Box::new(HardSigmoid));
                }
                // Another slope (Paddle's 0.2): PyTorch's hardsigmoid of x * 6 alpha, the product
                // a change of parameters in int8.
                let x = self.graph_in(cx, 0)?;
                let scaled = self.layer(cx, ":slope", Box::new(MulScalar { factor: 6.0 * alpha }), &x)?;
                let y = self.layer(cx, "", Box::new(HardSigmoid), &scaled)?;
                Ok(vec![Val::Node(Node { rows_of: x.rows_of.clone(), ..y })])
            }
            "Gelu" => {
                let tanh = match cx.string("approximate", "none").as_str() {
                    "none" => false,
                    "tanh" => true,
                    other => return Err(cx.err(format!("approximate='{other}'; expected 'none' or 'tanh'"))),
                };
                self.unary(cx, Box::new(GELU { tanh }))
            }
            "Clip" => self.clip(cx),
            "IsNaN" => {
                // Where(IsNaN(x), 0, x): x with its NaNs as 0 (after attention's softmax).
                let x = cx.input(0).unwrap_or_default().to_string();
                let Some(out) = cx.node.output.first().filter(|o| !o.is_empty()).cloned() else {
                    return Err(cx.err("it has no output"));
                };
                let zero_where = sole_reader(g, consumers, &out, "Where").filter(|w| {
                    w.input.len() == 3
                        && w.input[0] == out
                        && w.input[2] == x
                        && self.scalar_const(g, &w.input[1]) == Some(0.0)
                });
                let (Some(w), Some(Val::Node(xn))) = (zero_where, self.vals.get(&x).cloned()) else {
                    return Err(cx.err(
                        "IsNaN is imported where only Where(IsNaN(x), 0, x) reads it, x computed (NaNs replaced \
                         by 0)",
                    ));
                };
                let y = self.layer(cx, "", Box::new(NanToZero), &xn)?;
                self.absorbed.insert(w.output[0].clone(), out);
                one(Node { rows_of: xn.rows_of.clone(), ..y })
            }
            "Div" if self.gelu_chain(cx, g, consumers).is_some() => {
                let end = self.gelu_chain(cx, g, consumers).expect("matched");
                let r = self.unary(cx, Box::new(GELU { tanh: false }))?;
                let out = cx.node.output[0].clone();
                for o in end {
                    self.absorbed.insert(o, out.clone());
                }
                Ok(r)
            }
            "Add" if self.hardswish_chain(cx, g, consumers).is_some() => {
                let (x, end) = self.hardswish_chain(cx, g, consumers).expect("matched");
                let Some(Val::Node(xn)) = self.vals.get(&x).cloned() else { unreachable!("checked: computed") };
                let y = self.layer(cx, "", Box::new(Hardswish), &xn)?;
                let out = cx.node.output[0].clone();
                for o in end {
                    self.absorbed.insert(o, out.clone());
                }
                Ok(vec![Val::Node(Node { rows_of: xn.rows_of.clone(), ..y })])
            }
            "Add" | "Sum" | "Mul" | "Sub" | "Div" => self.binary(cx),
            "LayerNormalization" => one(self.layernorm(cx)?),
            "Concat" => self.concat(cx),
            "MaxPool" | "AveragePool" => one(self.pool(cx)?),
            "GlobalAveragePool" => {
                let x = self.graph_in(cx, 0)?;
                self.check_rank(cx, &x, 4)?;
                one(self.layer(cx, "", Box::new(AdaptiveAvgPool2d(1, 1)), &x)?)
            }
            "GlobalMaxPool" => {
                let x = self.graph_in(cx, 0)?;
                self.check_rank(cx, &x, 4)?;
                let mut p = qnn::layers::MaxPool2d::new(1, 1, 0);
                p.0.kernel = [x.shape[2], x.shape[3]];
                p.0.stride = p.0.kernel;
                one(self.layer(cx, "", Box::new(p), &x)?)
            }
            "ReduceMean" if self.layernorm_chain(cx, g, consumers).is_some() => {
                let ch = self.layernorm_chain(cx, g, consumers).expect("matched");
                let Some(Val::Node(xn)) = self.vals.get(&ch.x).cloned() else { unreachable!("checked: computed") };
                let c = ch.gamma.len();
                let vector = |v: Vec<f32>| ArrayD::from_shape_vec(IxDyn(&[c]), v).expect("c values");
                let ln = LayerNorm { weight: vector(ch.gamma), bias: vector(ch.beta), eps: ch.eps };
                let y = self.layer(cx, "", Box::new(ln), &xn)?;
                let out = cx.node.output[0].clone();
                for o in ch.absorbed {
                    self.absorbed.insert(o, out.clone());
                }
                Ok(vec![Val::Node(Node { rows_of: xn.rows_of.clone(), ..y })])
            }
            "ReduceMean" => one(self.reduce_mean(cx)?),
            "Flatten" => {
                let axis = cx.int("axis", 1);
                match self.value(cx, 0)?.clone() {
                    Val::Const(c) => {
                        let a = norm_axis(cx, axis, c.shape.len() + 1)?;
                        let lead: usize = c.shape[..a].iter().product();
                        Ok(vec![Val::Const(Const { shape: vec![lead, c.len() / lead.max(1)], ..c })])
                    }
                    Val::Node(x) => {
                        let a = norm_axis(cx, axis, x.shape.len() + 1)?;
                        if a == 1 {
                            one(self.layer(cx, "", Box::new(Flatten), &x)?)
                        } else {
                            let lead: usize = x.shape[..a].iter().product();
                            let rest: usize = x.shape[a..].iter().product();
                            one(self.layer(
                                cx,
                                "",
                                Box::new(Reshape { shape: vec![lead as i64, rest as i64], keep_batch: false }),
                                &x,
                            )?)
                        }
                    }
                }
            }
            "Reshape" => self.reshape(cx, g, consumers),
            "Squeeze" | "Unsqueeze" => self.squeeze(cx),
            "Transpose" => self.transpose(cx),
            "Softmax" => {
                let x = self.graph_in(cx, 0)?;
                let rank = x.shape.len() as i64;
                let axis = cx.int("axis", if self.opset >= 13 { -1 } else { 1 });
                let a = norm_axis(cx, axis, x.shape.len())?;
                // Before opset 13 the input is coerced to 2-D at `axis`: the same as a
                // softmax over one axis only when that axis is the last.
                if self.opset < 13 && a as i64 != rank - 1 {
                    return Err(cx.err(format!(
                        "axis {axis} of a rank-{rank} input: before opset 13 Softmax spans every axis from it on; \
                         qonnx takes the last axis only (re-export at opset 13 or later)"
                    )));
                }
                one(self.layer(cx, "", Box::new(Softmax { dim: a as i64 }), &x)?)
            }
            "Gemm" => one(self.gemm(cx)?),
            "MatMul" => one(self.matmul(cx, g, consumers)?),
            "Pad" => one(self.pad(cx)?),
            "Resize" | "Upsample" => one(self.resize(cx)?),
            "Split" => self.split(cx),
            "Slice" => self.slice(cx),
            "Shape" => {
                let (shape, batch_axis, tokens) = match self.value(cx, 0)? {
                    Val::Node(n) => (n.shape.clone(), n.batch_axis, n.tokens.clone()),
                    Val::Const(c) => (c.shape.clone(), None, Vec::new()),
                };
                let r = shape.len() as i64;
                let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let (s, e) = (clampi(cx.int("start", 0)), clampi(cx.int("end", r)));
                let v: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                let v = if s < e { v[s..e].to_vec() } else { Vec::new() };
                let flags = (s..s + v.len())
                    .map(|k| {
                        (if batch_axis == Some(k) { BATCH } else { 0 }) | (if tokens.contains(&k) { TOKENS } else { 0 })
                    })
                    .collect();
                Ok(vec![Val::Const(Const { shape: vec![v.len()], data: Data::I64 { v, flags } })])
            }
            "Gather" if matches!(self.value(cx, 0)?, Val::Node(_)) => self.gather_computed(cx),
            "Gather" if matches!(self.value(cx, 1)?, Val::Node(_)) => self.embedding(cx),
            "Sqrt" | "Neg" | "Reciprocal" | "Not" => {
                let c = self.konst(cx, 0, "input")?;
                Ok(vec![Val::Const(fold_unary(cx, &c)?)])
            }
            "Range" => {
                let cs: Vec<Const> = ["start", "limit", "delta"]
                    .iter()
                    .enumerate()
                    .map(|(i, what)| self.konst(cx, i, what))
                    .collect::<Result<_>>()?;
                Ok(vec![Val::Const(fold_range(cx, &cs)?)])
            }
            "Mod" | "Equal" | "Less" | "Greater" | "And" | "Or" | "Xor" | "Where" | "Expand" => {
                let cs: Vec<Const> =
                    (0..cx.node.input.len()).map(|i| self.konst(cx, i, "input")).collect::<Result<_>>()?;
                Ok(vec![Val::Const(fold_broadcast(cx, &cs)?)])
            }
            "Gather" => {
                let c = self.konst(cx, 0, "data")?;
                let idx = self.konst(cx, 1, "indices")?;
                let idx = idx.as_i64().ok_or_else(|| cx.err("indices must be integers"))?.to_vec();
                let ishape = self.konst(cx, 1, "indices")?.shape;
                let axis = norm_axis(cx, cx.int("axis", 0), c.shape.len())?;
                Ok(vec![Val::Const(gather(cx, &c, axis, &idx, &ishape)?)])
            }
            "Cast" => {
                let c = self.konst(cx, 0, "input")?;
                let to = cx.int("to", 0) as i32;
                let data = match to {
                    dt::FLOAT | dt::DOUBLE | dt::FLOAT16 => Data::F32(c.to_f32()),
                    dt::INT64 | dt::INT32 | dt::INT8 | dt::UINT8 => match &c.data {
                        Data::I64 { .. } => c.data.clone(),
                        Data::F32(v) => Data::I64 { v: v.iter().map(|&x| x as i64).collect(), flags: vec![0; v.len()] },
                    },
                    dt::BOOL => Data::I64 {
                        v: c.to_f32().iter().map(|&x| i64::from(x != 0.0)).collect(),
                        flags: vec![0; c.len()],
                    },
                    other => return Err(cx.err(format!("cast to {} is not folded", dt::name(other)))),
                };
                Ok(vec![Val::Const(Const { shape: c.shape, data })])
            }
            "ConstantOfShape" => {
                let s = self.ints_of(cx, 0, "shape")?.unwrap_or_default();
                let shape: Vec<usize> = s
                    .iter()
                    .map(|&d| usize::try_from(d).map_err(|_| cx.err(format!("shape {s:?}"))))
                    .collect::<Result<_>>()?;
                let n = shape
                    .iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d))
                    .filter(|&n| n <= 1 << 24)
                    .ok_or_else(|| cx.err(format!("shape {s:?} is too large to fold")))?;
                let fill = match cx.attr("value").and_then(|a| a.t.as_ref()) {
                    Some(t) => decode(t, None)?,
                    None => Const::floats(vec![1], vec![0.0]),
                };
                let data = match &fill.data {
                    Data::F32(v) => Data::F32(vec![v.first().copied().unwrap_or(0.0); n]),
                    Data::I64 { v, .. } => Data::I64 { v: vec![v.first().copied().unwrap_or(0); n], flags: vec![0; n] },
                };
                Ok(vec![Val::Const(Const { shape, data })])
            }
            _ => Err(OnnxError::Unsupported {
                node: cx.name.clone(),
                op_type: op,
                domain: String::new(),
                opset: self.opset,
            }),
        }
    }

    fn check_rank(&self, cx: &Cx<'_>, x: &Node, rank: usize) -> Result<()> {
        if x.shape.len() != rank {
            return Err(cx.err(format!("input of shape {:?}: qonnx takes rank-{rank} inputs here", x.shape)));
        }
        Ok(())
    }

    /// An elementwise layer: on rows as on the value itself.
    fn unary(&mut self, cx: &Cx<'_>, m: Box<dyn Module>) -> Result<Vec<Val>> {
        let x = self.graph_in(cx, 0)?;
        let y = self.layer(cx, "", m, &x)?;
        Ok(vec![Val::Node(Node { rows_of: x.rows_of.clone(), ..y })])
    }

    fn clip(&mut self, cx: &Cx<'_>) -> Result<Vec<Val>> {
        let (lo, hi) = if self.opset < 11 {
            (cx.float("min", f32::NEG_INFINITY), cx.float("max", f32::INFINITY))
        } else {
            let scalar = |c: Option<Const>, default: f32| -> Result<f32> {
                match c {
                    None => Ok(default),
                    Some(c) if c.len() == 1 => Ok(c.to_f32()[0]),
                    Some(c) => Err(cx.err(format!("min and max must be scalars, not of shape {:?}", c.shape))),
                }
            };
            (
                scalar(self.opt_konst(cx, 1, "min")?, f32::NEG_INFINITY)?,
                scalar(self.opt_konst(cx, 2, "max")?, f32::INFINITY)?,
            )
        };
        let m: Box<dyn Module> = match (lo, hi) {
            (l, h) if l == 0.0 && h == 6.0 => Box::new(ReLU6),
            (l, h) if l == 0.0 && h == f32::INFINITY => Box::new(ReLU),
            (l, h) if l.is_finite() && h.is_finite() && l <= h => Box::new(Hardtanh { min_val: l, max_val: h }),
            (l, h) => {
                return Err(
                    cx.err(format!("bounds [{l}, {h}]: qonnx takes [0, inf) (ReLU) or finite bounds min <= max"))
                )
            }
        };
        self.unary(cx, m)
    }

    /// A convolution's (or transposed convolution's) input, 4-D weight, optional bias and
    /// `group`, checked alike: 4-D input and weight, no empty dimension, `kernel_shape` (if
    /// given) equal to the weight's, a positive group.
    fn conv_operands(&self, cx: &Cx<'_>, what: &str) -> Result<(Node, Const, Option<Const>, usize)> {
        let x = self.graph_in(cx, 0)?;
        let w = self.konst(cx, 1, "weight")?;
        let b = self.opt_konst(cx, 2, "bias")?;
        if w.shape.len() != 4 || x.shape.len() != 4 {
            return Err(cx.err(format!(
                "input {:?}, weight {:?}: qonnx imports 2-D {what} (4-D input and weight)",
                x.shape, w.shape
            )));
        }
        if w.shape.contains(&0) {
            return Err(cx.err(format!("weight of shape {:?}: every dimension must be at least 1", w.shape)));
        }
        if let Some(k) = cx.ints("kernel_shape") {
            if k != [w.shape[2] as i64, w.shape[3] as i64] {
                return Err(cx.err(format!("kernel_shape {k:?} disagrees with the weight's {:?}", w.shape)));
            }
        }
        let group = usize::try_from(cx.int("group", 1))
            .ok()
            .filter(|&g| g > 0)
            .ok_or_else(|| cx.err("group must be positive"))?;
        Ok((x, w, b, group))
    }

    /// A bias constant as `[oc]`, or none.
    fn bias_of(cx: &Cx<'_>, b: Option<Const>, oc: usize) -> Result<Option<ArrayD<f32>>> {
        match b {
            Some(b) if b.len() == oc => {
                Ok(Some(ArrayD::from_shape_vec(IxDyn(&[oc]), b.to_f32()).expect("length checked")))
            }
            Some(b) => Err(cx.err(format!("bias of shape {:?} for {oc} output channels", b.shape))),
            None => Ok(None),
        }
    }

    fn conv(&mut self, cx: &Cx<'_>) -> Result<Node> {
        let (mut x, w, b, group) = self.conv_operands(cx, "convolutions")?;
        let (kh, kw) = (w.shape[2], w.shape[3]);
        let stride = pair(cx, "strides", [1, 1])?;
        let dilation = pair(cx, "dilations", [1, 1])?;
        // pads: [top, left, bottom, right].
        let pads = self.pads(cx, &x.shape[2..], [kh, kw], stride, dilation)?;
        let [t, l, bo, r] = pads;
        let padding = if t == bo && l == r {
            [t, l]
        } else {
            let p = Pad2d { pads: [l, r, t, bo], mode: PadMode::Constant(0.0) };
            x = self.layer(cx, ":pad", Box::new(p), &x)?;
            [0, 0]
        };
        let bias = Self::bias_of(cx, b, w.shape[0])?;
        // Built from the file's tensors as they are (nothing sized by an attribute alone).
        let conv = Conv2d {
            weight: w.to_array(),
            bias,
            geom: Conv2dGeometry { stride, padding, dilation, groups: group },
            activation: FusedAct::None,
        };
        self.layer(cx, "", Box::new(conv), &x)
    }

    /// `ConvTranspose` of a computed NCHW value by a constant weight: a
    /// [`ConvTranspose2d`] (explicit `pads`; `auto_pad` and `output_shape` are refused by
    /// name).
    fn conv_transpose(&mut self, cx: &Cx<'_>) -> Result<Node> {
        let (x, w, b, group) = self.conv_operands(cx, "transposed convolutions")?;
        let auto = cx.string("auto_pad", "NOTSET");
        if auto != "NOTSET" || cx.ints("output_shape").is_some() {
            return Err(cx.err(format!(
                "auto_pad {auto:?} or output_shape: qonnx takes explicit pads (re-export with padding given)"
            )));
        }
        let nonneg = |name: &str, default: Vec<i64>, len: usize| -> Result<Vec<usize>> {
            let v = cx.ints(name).unwrap_or(default);
            if v.len() != len || v.iter().any(|&p| p < 0) {
                return Err(cx.err(format!("{name} {v:?}: {len} values, none negative")));
            }
            Ok(v.into_iter().map(|p| p as usize).collect())
        };
        let pads = nonneg("pads", vec![0; 4], 4)?;
        let output_padding = nonneg("output_padding", vec![0, 0], 2)?;
        let bias = Self::bias_of(cx, b, w.shape[1] * group)?;
        let m = ConvTranspose2d {
            weight: w.to_array(),
            bias,
            stride: pair(cx, "strides", [1, 1])?,
            padding: [pads[0], pads[1], pads[2], pads[3]],
            output_padding: [output_padding[0], output_padding[1]],
            dilation: pair(cx, "dilations", [1, 1])?,
            groups: group,
            activation: FusedAct::None,
        };
        self.layer(cx, "", Box::new(m), &x)
    }

    /// A window op's padding `[top, left, bottom, right]`, from `pads` or `auto_pad`.
    fn pads(
        &self,
        cx: &Cx<'_>,
        hw: &[usize],
        k: [usize; 2],
        stride: [usize; 2],
        dil: [usize; 2],
    ) -> Result<[usize; 4]> {
        let auto = cx.string("auto_pad", "NOTSET");
        match auto.as_str() {
            "NOTSET" => match cx.ints("pads") {
                None => Ok([0; 4]),
                Some(p) if p.len() == 4 && p.iter().all(|&v| v >= 0) => {
                    Ok([p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize])
                }
                Some(p) => Err(cx.err(format!("pads {p:?}: expected four non-negative values"))),
            },
            "VALID" => Ok([0; 4]),
            "SAME_UPPER" | "SAME_LOWER" => {
                let mut out = [0usize; 4];
                for a in 0..2 {
                    let o = hw[a].div_ceil(stride[a]);
                    let span = dil[a].saturating_mul(k[a].saturating_sub(1)).saturating_add(1);
                    let total = (o.saturating_sub(1) * stride[a]).saturating_add(span).saturating_sub(hw[a]);
                    let (small, big) = (total / 2, total - total / 2);
                    let (begin, end) = if auto == "SAME_UPPER" { (small, big) } else { (big, small) };
                    out[a] = begin;
                    out[a + 2] = end;
                }
                Ok(out)
            }
            other => Err(cx.err(format!("auto_pad '{other}'"))),
        }
    }

    fn batchnorm(&mut self, cx: &Cx<'_>) -> Result<Node> {
        let x = self.graph_in(cx, 0)?;
        if cx.int("training_mode", 0) != 0 {
            return Err(cx.err("training_mode=1; export the model in eval mode"));
        }
        if cx.int("spatial", 1) != 1 {
            return Err(cx.err("spatial=0 (statistics per element, not per channel) is not supported"));
        }
        // Before opset 7 an attribute says whether the node is in inference mode.
        if self.opset < 7 && cx.int("is_test", 0) == 0 {
            return Err(cx.err("is_test=0 (training mode); export the model in eval mode"));
        }
        let c = *x.shape.get(1).ok_or_else(|| cx.err(format!("input of shape {:?} has no channel axis", x.shape)))?;
        let names = ["scale", "bias", "mean", "variance"];
        let mut got = Vec::new();
        for (i, what) in names.iter().enumerate() {
            let k = self.konst(cx, i + 1, what)?;
            if k.len() != c {
                return Err(cx.err(format!("{what} of shape {:?} for {c} channels", k.shape)));
            }
            got.push(ArrayD::from_shape_vec(IxDyn(&[c]), k.to_f32()).expect("length checked"));
        }
        let [weight, bias, running_mean, running_var]: [ArrayD<f32>; 4] = got.try_into().expect("four");
        let bn = BatchNorm2d {
            weight,
            bias,
            running_mean,
            running_var,
            eps: cx.float("epsilon", 1e-5),
            activation: FusedAct::None,
        };
        match x.shape.len() {
            4 => self.layer(cx, "", Box::new(bn), &x),
            2 => self.layer(cx, "", Box::new(BatchNorm1d(bn)), &x),
            r => Err(cx.err(format!("a rank-{r} input {:?}: qonnx takes [n, c] or [n, c, h, w]", x.shape))),
        }
    }

    fn binary(&mut self, cx: &Cx<'_>) -> Result<Vec<Val>> {
        let op = cx.op().to_string();
        for i in 0..cx.node.input.len() {
            if let Some(name) = cx.input(i) {
                self.materialize(name)?;
            }
        }
        let n_in = cx.node.input.len();
        if n_in != 2 {
            if op == "Sum" && n_in == 1 {
                return Ok(vec![self.value(cx, 0)?.clone()]);
            }
            return Err(cx.err(format!("{n_in} inputs; qonnx takes two")));
        }
        let (a, b) = (self.value(cx, 0)?.clone(), self.value(cx, 1)?.clone());
        match (a, b) {
            (Val::Const(a), Val::Const(b)) => Ok(vec![Val::Const(fold_binary(cx, &op, &a, &b)?)]),
            (Val::Node(a), Val::Node(b)) => {
                let Some(shape) = qnn::ops::mul::broadcast_shape(&a.shape, &b.shape) else {
                    return Err(cx.err(format!(
                        "inputs of shapes {:?} and {:?} do not broadcast (equal sizes, or 1, aligned at the last axis)",
                        a.shape, b.shape
                    )));
                };
                // a - b is a + (-b).
                let b_t = match op.as_str() {
                    "Sub" => self.layer(cx, ":neg", Box::new(MulScalar { factor: -1.0 }), &b)?.t,
                    _ => b.t,
                };
                let name = self.fresh(&cx.name);
                let t = match op.as_str() {
                    "Add" | "Sum" | "Sub" => self.b.add(&name, a.t, b_t)?,
                    "Mul" => self.b.mul(&name, a.t, b_t)?,
                    _ => return Err(cx.err("of two computed values is not supported (only Add, Sum, Sub and Mul are)")),
                };
                // The batch axis of an operand of the output's rank (ranks may differ; the
                // output's is the larger).
                let full = [&a, &b].into_iter().filter(|v| v.shape.len() == shape.len());
                let batch_axis = full.clone().find_map(|v| v.batch_axis);
                let mut tokens: Vec<usize> = full.flat_map(|v| v.tokens.iter().copied()).collect();
                tokens.sort_unstable();
                tokens.dedup();
                Ok(vec![Val::Node(Node { t, shape, batch: a.batch || b.batch, rows_of: None, batch_axis, tokens })])
            }
            (Val::Node(x), Val::Const(k)) if is_image_const(&k, &x) => self.image_const(cx, &op, &x, &k, false),
            (Val::Const(k), Val::Node(x)) if is_image_const(&k, &x) => self.image_const(cx, &op, &x, &k, true),
            (Val::Node(x), Val::Const(k)) => Ok(vec![Val::Node(self.affine_const(cx, &op, &x, &k, false)?)]),
            (Val::Const(k), Val::Node(x)) => Ok(vec![Val::Node(self.affine_const(cx, &op, &x, &k, true)?)]),
        }
    }

    /// A computed value and a float constant of one image (`[1, ...]`, the value's shape
    /// past the batch: ViT's positional embedding): the constant repeated over the batch by
    /// a [`BatchConst`] reading `x`, then a graph addition or product (`x - k` adds `-k`,
    /// `k - x` adds `k` to `-x`, `x / k` multiplies by `1 / k`).
    fn image_const(&mut self, cx: &Cx<'_>, op: &str, x: &Node, k: &Const, const_first: bool) -> Result<Vec<Val>> {
        let v = k.to_f32();
        let v: Vec<f32> = match (op, const_first) {
            ("Add" | "Sum" | "Mul" | "Sub", _) if op != "Sub" || const_first => v,
            ("Sub", false) => v.iter().map(|&a| -a).collect(),
            ("Div", false) => v.iter().map(|&a| 1.0 / a).collect(),
            _ => {
                return Err(cx.err(format!(
                "a constant of shape {:?} {} a computed value: qonnx takes x + k, k + x, x - k, k - x, x * k, k * x and x / k",
                k.shape,
                if op == "Sub" { "minus" } else { "over" }
            )))
            }
        };
        if v.iter().any(|a| !a.is_finite()) {
            return Err(cx.err(format!("the constant of shape {:?} has values that are not finite", k.shape)));
        }
        let shape = image_const_shape(k, x).expect("checked by is_image_const");
        let value = ArrayD::from_shape_vec(IxDyn(&shape), v).expect("the constant's own size");
        let konst = BatchConst::new(value).map_err(|e| cx.err(e.to_string()))?;
        let c = self.layer(cx, ":const", Box::new(konst), x)?;
        // k - x is (-x) + k.
        let x_t = if op == "Sub" && const_first {
            self.layer(cx, ":neg", Box::new(MulScalar { factor: -1.0 }), x)?.t
        } else {
            x.t
        };
        let name = self.fresh(&cx.name);
        let t = match op {
            "Add" | "Sum" | "Sub" => self.b.add(&name, x_t, c.t)?,
            _ => self.b.mul(&name, x_t, c.t)?,
        };
        Ok(vec![Val::Node(Node { t, shape: x.shape.clone(), rows_of: None, ..x.clone() })])
    }

    /// `Gather` of a computed value at one constant index (a scalar, or a vector of one):
    /// a slice of that axis, squeezed for a scalar index (attention's q, k and v taken from
    /// one stacked projection).
    fn gather_computed(&mut self, cx: &Cx<'_>) -> Result<Vec<Val>> {
        let x = self.graph_in(cx, 0)?;
        let idx = self.konst(cx, 1, "indices")?;
        let axis = norm_axis(cx, cx.int("axis", 0), x.shape.len())?;
        let (Some(&[i]), true) = (idx.as_i64(), idx.shape.len() <= 1) else {
            return Err(cx.err(format!(
                "indices of shape {:?} into a computed value: qonnx takes one constant index (a scalar or a vector of one)",
                idx.shape
            )));
        };
        let d = x.shape[axis] as i64;
        let j = if i < 0 { i + d } else { i };
        if !(0..d).contains(&j) {
            return Err(cx.err(format!("index {i} is outside axis {axis} of shape {:?}", x.shape)));
        }
        let mut y = self.layer(cx, "", Box::new(Slice::narrow(axis as i64, j as usize, 1)), &x)?;
        y.tokens.retain(|&k| k != axis);
        if !idx.shape.is_empty() {
            return Ok(vec![Val::Node(y)]);
        }
        let mut out = x.shape.clone();
        out.remove(axis);
        let removed = |b: usize| (b != axis).then(|| if b > axis { b - 1 } else { b });
        let batch_axis = x.batch_axis.and_then(removed);
        let tokens = map_axes(&x.tokens, removed);
        let (m, tokens) = Self::axes_reshape(&y, &out, batch_axis, tokens);
        let z = self.layer(cx, ":squeeze", Box::new(m), &y)?;
        Ok(vec![Val::Node(Node { batch: z.batch && batch_axis == Some(0), batch_axis, tokens, ..z })])
    }

    /// `Gather` of rows of a constant table by computed indices (token ids): an
    /// [`Embedding`] whose output is the indices' shape followed by a row's.
    fn embedding(&mut self, cx: &Cx<'_>) -> Result<Vec<Val>> {
        let table = self.konst(cx, 0, "data")?;
        let idx = self.graph_in(cx, 1)?;
        if table.shape.is_empty() || norm_axis(cx, cx.int("axis", 0), table.shape.len())? != 0 {
            return Err(cx.err(format!(
                "a lookup along axis {} of a constant of shape {:?} by computed indices: qonnx looks up rows (axis 0) \
                 of a table of rank 1 or more",
                cx.int("axis", 0),
                table.shape
            )));
        }
        let weight = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&table.shape), table.to_f32())
            .map_err(|e| cx.err(e.to_string()))?;
        let y = self.layer(cx, "", Box::new(Embedding { weight }), &idx)?;
        // The indices' axes come first, where they were.
        Ok(vec![Val::Node(Node { tokens: idx.tokens.clone(), ..y })])
    }

    /// A computed NCHW value and a constant per channel (or one for all): `x * k`, `x + k`,
    /// `x - k`, `k - x`, `x / k` as a depthwise 1x1 convolution (weight and bias per channel),
    /// which runs in int8 (ConvNeXt's layer scale, normalization constants).
    fn affine_const(&mut self, cx: &Cx<'_>, op: &str, x: &Node, k: &Const, const_first: bool) -> Result<Node> {
        // A value times (or over) a float scalar: `MulScalar`, exact in int8 (attention's
        // `1 / sqrt(d)`).
        let scalar_product = op == "Mul" || (op == "Div" && !const_first);
        if k.len() == 1 && matches!(k.data, Data::F32(_)) && scalar_product {
            let v = k.to_f32()[0];
            let factor = if op == "Mul" { v } else { 1.0 / v };
            if !factor.is_finite() {
                return Err(cx.err(format!("a scalar factor of {factor} (from the constant {v}) is not finite")));
            }
            return self.layer(cx, "", Box::new(MulScalar { factor }), x);
        }
        // A float scalar added to (or subtracted from, or minus) a value that is not NCHW:
        // `AddScalar` (a table in int8). On NCHW values it becomes the per-channel map below,
        // which folds into a neighbouring convolution.
        let scalar_sum = matches!(op, "Add" | "Sum" | "Sub");
        if k.len() == 1 && matches!(k.data, Data::F32(_)) && scalar_sum && x.shape.len() != 4 {
            let v = k.to_f32()[0];
            if !v.is_finite() {
                return Err(cx.err(format!("a scalar constant of {v} added to a value is not finite")));
            }
            return match (op, const_first) {
                ("Sub", false) => self.layer(cx, "", Box::new(AddScalar { value: -v }), x),
                ("Sub", true) => {
                    let neg = self.layer(cx, ":neg", Box::new(MulScalar { factor: -1.0 }), x)?;
                    self.layer(cx, "", Box::new(AddScalar { value: v }), &neg)
                }
                _ => self.layer(cx, "", Box::new(AddScalar { value: v }), x),
            };
        }
        let c = x.shape.get(1).copied().unwrap_or(0);
        // (A scalar is spread over the channels: at most 2^24 of them.)
        let per_channel = x.shape.len() == 4
            && (k.len() == 1 || (k.len() == c && matches!(k.shape.as_slice(), [_, 1, 1] | [1, _, 1, 1])))
            && c <= 1 << 24;
        if !per_channel || matches!(k.data, Data::I64 { .. }) {
            return Err(cx.err(format!(
                "a computed input of shape {:?} with a constant of shape {:?}: qonnx takes a float constant that \
                 is one value, or one per channel ([c, 1, 1]) of an NCHW value",
                x.shape, k.shape
            )));
        }
        let v = k.to_f32();
        let at = |i: usize| v[if v.len() == 1 { 0 } else { i }];
        let (w, b): (Vec<f32>, Vec<f32>) = match (op, const_first) {
            ("Mul", _) => ((0..c).map(at).collect(), vec![0.0; c]),
            ("Add" | "Sum", _) => (vec![1.0; c], (0..c).map(at).collect()),
            ("Sub", false) => (vec![1.0; c], (0..c).map(|i| -at(i)).collect()),
            ("Sub", true) => (vec![-1.0; c], (0..c).map(at).collect()),
            ("Div", false) => ((0..c).map(|i| 1.0 / at(i)).collect(), vec![0.0; c]),
            _ => return Err(cx.err("a constant divided by a computed value is not supported")),
        };
        let conv = Conv2d {
            weight: ArrayD::from_shape_vec(IxDyn(&[c, 1, 1, 1]), w).expect("c weights"),
            bias: Some(ArrayD::from_shape_vec(IxDyn(&[c]), b).expect("c biases")),
            geom: Conv2dGeometry { groups: c, ..Conv2dGeometry::default() },
            activation: FusedAct::None,
        };
        self.layer(cx, "", Box::new(conv), x)
    }

    /// A scalar constant, computed already or written by a `Constant` node later in the list
    /// (exporters put each constant just before its reader).
    fn scalar_const(&self, g: &GraphProto, name: &str) -> Option<f32> {
        self.const_value(g, name).filter(|c| c.len() == 1).map(|c| c.to_f32()[0])
    }

    /// A constant, computed already or written by a `Constant` node later in the list.
    fn const_value(&self, g: &GraphProto, name: &str) -> Option<Const> {
        match self.vals.get(name) {
            Some(Val::Const(c)) => Some(c.clone()),
            Some(_) => None,
            None => {
                let n = g.node.iter().find(|n| n.output.iter().any(|o| o == name))?;
                let t = n.attribute.iter().find(|a| a.name.as_deref() == Some("value"))?.t.as_ref()?;
                (n.op_type.as_deref() == Some("Constant")).then(|| decode(t, None).ok()).flatten()
            }
        }
    }

    /// Whether this `ReduceMean` starts LayerNorm as exporters write it without a
    /// `LayerNormalization` op (PyTorch before opset 17, paddle2onnx): over the last axis,
    /// `d = x - mean(x)`, `d / sqrt(mean(d^2) + eps)`, then optionally `* gamma` and `+ beta`
    /// (constants of one value per feature), each step the only reader of the one before
    /// (`d` read by the square and the division only): `x`, eps, gamma, beta and the outputs
    /// of the chain's other nodes (the last is the LayerNorm's).
    fn layernorm_chain(
        &self,
        cx: &Cx<'_>,
        g: &GraphProto,
        consumers: &HashMap<&str, Vec<usize>>,
    ) -> Option<LayerNormChain> {
        let x = cx.input(0)?;
        let Some(Val::Node(xn)) = self.vals.get(x) else { return None };
        let rank = xn.rows_of.as_ref().map_or(xn.shape.len(), |(v, _)| v.len()) as i64;
        let c = *xn.shape.last()?;
        // Over the last axis, keeping it.
        let last_axis = |n: &NodeProto| -> bool {
            let axes = if self.opset >= 18 {
                n.input.get(1).and_then(|a| self.const_value(g, a)).and_then(|k| k.as_i64().map(<[i64]>::to_vec))
            } else {
                n.attribute.iter().find(|a| a.name.as_deref() == Some("axes")).map(|a| a.ints.clone())
            };
            let keep =
                n.attribute.iter().find(|a| a.name.as_deref() == Some("keepdims")).and_then(|a| a.i).unwrap_or(1);
            matches!(axes.as_deref(), Some([a]) if *a == -1 || *a == rank - 1) && keep == 1
        };
        if !last_axis(cx.node) {
            return None;
        }
        let near = |name: &str, want: f32| self.scalar_const(g, name).is_some_and(|v| (v - want).abs() <= 1e-6);
        let sole = |out: &str, op: &str| sole_reader(g, consumers, out, op);
        let mean = cx.node.output.first()?;
        let sub = sole(mean, "Sub")?;
        if sub.input.as_slice() != [x.to_string(), mean.clone()] {
            return None;
        }
        let d = &sub.output[0];
        if is_graph_output(g, d) {
            return None;
        }
        let readers = consumers.get(d.as_str())?;
        let (pow, div) = match readers.as_slice() {
            [i, j] => {
                let (a, b) = (&g.node[*i], &g.node[*j]);
                if a.op_type.as_deref() == Some("Pow") {
                    (a, b)
                } else {
                    (b, a)
                }
            }
            _ => return None,
        };
        if pow.op_type.as_deref() != Some("Pow") || pow.input.first() != Some(d) || !near(pow.input.get(1)?, 2.0) {
            return None;
        }
        let var = sole(&pow.output[0], "ReduceMean").filter(|n| last_axis(n))?;
        let add = sole(&var.output[0], "Add")?;
        let eps = self.scalar_const(g, other_input(add, &var.output[0])?)?;
        let sqrt = sole(&add.output[0], "Sqrt")?;
        if div.op_type.as_deref() != Some("Div") || div.input.as_slice() != [d.clone(), sqrt.output[0].clone()] {
            return None;
        }
        let mut absorbed = vec![d.clone(), pow.output[0].clone(), var.output[0].clone(), add.output[0].clone()];
        absorbed.extend([sqrt.output[0].clone(), div.output[0].clone()]);
        // A per-feature constant of `c` values (any leading ones).
        let per_feature = |name: &str| -> Option<Vec<f32>> {
            let k = self.const_value(g, name)?;
            (k.len() == c && k.shape.last() == Some(&c) && k.as_i64().is_none()).then(|| k.to_f32())
        };
        let mut end = div.output[0].clone();
        let mut gamma = vec![1.0; c];
        if let Some(mul) = sole(&end, "Mul") {
            if let Some(v) = other_input(mul, &end).and_then(per_feature) {
                gamma = v;
                end = mul.output[0].clone();
                absorbed.push(end.clone());
            }
        }
        let mut beta = vec![0.0; c];
        if let Some(plus) = sole(&end, "Add") {
            if let Some(v) = other_input(plus, &end).and_then(per_feature) {
                beta = v;
                absorbed.push(plus.output[0].clone());
            }
        }
        Some(LayerNormChain { x: x.to_string(), eps, gamma, beta, absorbed })
    }

    /// Whether this `Add` starts hardswish as exporters write it without a `HardSwish` op
    /// (paddle2onnx; PyTorch before opset 14 writes `x * HardSigmoid(x)`), `x * clip(x + 3, 0,
    /// 6) / 6` (or `* (1 / 6)`), each step the only reader of the one before: `x` and the
    /// outputs of the chain's other nodes (the last is the hardswish's).
    fn hardswish_chain(
        &self,
        cx: &Cx<'_>,
        g: &GraphProto,
        consumers: &HashMap<&str, Vec<usize>>,
    ) -> Option<(String, Vec<String>)> {
        let near = |name: &str, want: f32| self.scalar_const(g, name).is_some_and(|v| (v - want).abs() <= 1e-5);
        let (x, _) = match cx.node.input.as_slice() {
            [a, b] if near(b, 3.0) => (a, b),
            [a, b] if near(a, 3.0) => (b, a),
            _ => return None,
        };
        if !matches!(self.vals.get(x.as_str()), Some(Val::Node(_))) {
            return None;
        }
        let sole = |out: &str, op: &str| sole_reader(g, consumers, out, op);
        let add = cx.node.output.first()?;
        let clip = sole(add, "Clip")?;
        let bound = |k: usize, attr: &str| -> Option<f32> {
            if self.opset >= 11 {
                self.scalar_const(g, clip.input.get(k)?)
            } else {
                clip.attribute.iter().find(|a| a.name.as_deref() == Some(attr))?.f
            }
        };
        let near_bound = |k: usize, attr: &str, want: f32| bound(k, attr).is_some_and(|v| (v - want).abs() <= 1e-5);
        if clip.input.first() != Some(add) || !near_bound(1, "min", 0.0) || !near_bound(2, "max", 6.0) {
            return None;
        }
        let mul = sole(&clip.output[0], "Mul")?;
        if other_input(mul, &clip.output[0])? != x {
            return None;
        }
        let last = match (sole(&mul.output[0], "Div"), sole(&mul.output[0], "Mul")) {
            (Some(div), _) if div.input.first() == mul.output.first() && near(div.input.get(1)?, 6.0) => div,
            (_, Some(m)) if near(other_input(m, &mul.output[0])?, 1.0 / 6.0) => m,
            _ => return None,
        };
        Some((x.clone(), vec![clip.output[0].clone(), mul.output[0].clone(), last.output[0].clone()]))
    }

    /// Whether this `Div` starts the erf form of GELU the exporters write before opset 20,
    /// `(x * (erf(x / sqrt(2)) + 1)) * 0.5`, each step the only reader of the one before:
    /// the outputs of the chain's other nodes (the last is the GELU's).
    fn gelu_chain(&self, cx: &Cx<'_>, g: &GraphProto, consumers: &HashMap<&str, Vec<usize>>) -> Option<Vec<String>> {
        let x = cx.input(0)?;
        let scalar = |name: &str| self.scalar_const(g, name);
        let near = |name: &str, want: f32| scalar(name).is_some_and(|v| (v - want).abs() <= 1e-4 * want.abs());
        if !matches!(self.vals.get(x), Some(Val::Node(_))) || !near(cx.input(1)?, std::f32::consts::SQRT_2) {
            return None;
        }
        let sole = |out: &str, op: &str| sole_reader(g, consumers, out, op);
        let other = other_input;
        let div = cx.node.output.first()?;
        let erf = sole(div, "Erf")?;
        let add = sole(&erf.output[0], "Add")?;
        if !near(other(add, &erf.output[0])?, 1.0) {
            return None;
        }
        let mul = sole(&add.output[0], "Mul")?;
        if other(mul, &add.output[0])? != x {
            return None;
        }
        let half = sole(&mul.output[0], "Mul")?;
        if !near(other(half, &mul.output[0])?, 0.5) {
            return None;
        }
        Some(vec![erf.output[0].clone(), add.output[0].clone(), mul.output[0].clone(), half.output[0].clone()])
    }

    /// The tanh form of GELU as exporters write it before opset 20 (`Gelu` with
    /// `approximate = "tanh"`), `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`:
    /// PyTorch's (`x * (x * x)`, the half applied last) and Hugging Face's `gelu_new` (`Pow(x,
    /// 3)`, `0.5 * x` first), each step's output read only by the next (`x` by any). Keyed by
    /// the output of the chain's first node in the graph's order: `x` and the outputs of the
    /// chain's other nodes (the last is the GELU's).
    fn tanh_gelu_chains(
        &self,
        g: &GraphProto,
        consumers: &HashMap<&str, Vec<usize>>,
    ) -> HashMap<String, (String, Vec<String>)> {
        const BETA: f32 = 0.797_884_6; // sqrt(2 / pi)
        const KAPPA: f32 = 0.044_715;
        let producer: HashMap<&str, usize> =
            g.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i))).collect();
        let near = |name: &str, want: f32| self.scalar_const(g, name).is_some_and(|v| (v - want).abs() <= 1e-4 * want);
        // The node that writes `out`, when it is an `op` and `out` has no other reader than
        // the chain's next step (and is not a graph output).
        let made_by = |out: &str, op: &str| -> Option<usize> {
            let &i = producer.get(out)?;
            let n = &g.node[i];
            let one_reader = consumers.get(out).is_some_and(|c| c.len() == 1);
            (n.op_type.as_deref() == Some(op) && n.output.len() == 1 && one_reader && !is_graph_output(g, out))
                .then_some(i)
        };
        // `k * v` (either order) written by node `i`: `v`.
        let times = |i: usize, k: f32| -> Option<&str> {
            match g.node[i].input.as_slice() {
                [a, b] if near(b, k) => Some(a.as_str()),
                [a, b] if near(a, k) => Some(b.as_str()),
                _ => None,
            }
        };
        // The nodes writing `x^3` into `cube`: `Pow(x, 3)`, or `x * (x * x)` in any order.
        let cube_of = |cube: &str, x: &str| -> Option<Vec<usize>> {
            if let Some(p) = made_by(cube, "Pow") {
                let n = &g.node[p];
                return (n.input.first().map(String::as_str) == Some(x) && near(n.input.get(1)?, 3.0)).then(|| vec![p]);
            }
            let m = made_by(cube, "Mul")?;
            let sq = other_input(&g.node[m], x)?;
            let s = made_by(sq, "Mul")?;
            (g.node[s].input.iter().all(|v| v == x) && g.node[s].input.len() == 2).then(|| vec![m, s])
        };
        let mut found = HashMap::new();
        for (ti, t) in g.node.iter().enumerate() {
            if t.op_type.as_deref() != Some("Tanh") || t.output.len() != 1 {
                continue;
            }
            let chain = (|| -> Option<(String, Vec<usize>)> {
                // Backward: beta * (x + kappa * x^3).
                let b = made_by(t.input.first()?, "Mul")?;
                let a = made_by(times(b, BETA)?, "Add")?;
                let [p, q] = g.node[a].input.as_slice() else { return None };
                let (x, mut nodes) = [(p, q), (q, p)].into_iter().find_map(|(x, u)| {
                    let k = made_by(u, "Mul")?;
                    let mut nodes = cube_of(times(k, KAPPA)?, x)?;
                    nodes.extend([k, a, b, ti]);
                    Some((x.clone(), nodes))
                })?;
                // Forward: (1 + tanh) times x then 0.5, or times (0.5 * x).
                let plus = sole_reader(g, consumers, &t.output[0], "Add")?;
                if !near(other_input(plus, &t.output[0])?, 1.0) {
                    return None;
                }
                let m = sole_reader(g, consumers, &plus.output[0], "Mul")?;
                let h = other_input(m, &plus.output[0])?;
                let index = |n: &NodeProto| g.node.iter().position(|k| std::ptr::eq(k, n));
                nodes.extend([index(plus)?, index(m)?]);
                if h == x {
                    let half = sole_reader(g, consumers, &m.output[0], "Mul")?;
                    if !near(other_input(half, &m.output[0])?, 0.5) {
                        return None;
                    }
                    nodes.push(index(half)?);
                } else {
                    let hx = made_by(h, "Mul")?;
                    if times(hx, 0.5)? != x {
                        return None;
                    }
                    nodes.push(hx);
                }
                Some((x, nodes))
            })();
            let Some((x, nodes)) = chain else { continue };
            let first = *nodes.iter().min().expect("a chain has nodes");
            let rest = nodes.iter().filter(|&&i| i != first).map(|&i| g.node[i].output[0].clone()).collect();
            found.insert(g.node[first].output[0].clone(), (x, rest));
        }
        found
    }

    fn layernorm(&mut self, cx: &Cx<'_>) -> Result<Node> {
        let x = self.graph_in(cx, 0)?;
        // Over the last axis: the rows' last axis is the value's.
        let r = x.rows_of.as_ref().map_or(x.shape.len(), |(v, _)| v.len());
        if norm_axis(cx, cx.int("axis", -1), r)? != r - 1 {
            return Err(cx.err(format!(
                "axis {} of a rank-{r} input: qonnx normalizes over the last axis only",
                cx.int("axis", -1)
            )));
        }
        let c = *x.shape.last().expect("rank checked");
        let vec_of = |k: Option<Const>, what: &str, default: f32| -> Result<ArrayD<f32>> {
            match k {
                None => Ok(ArrayD::from_elem(IxDyn(&[c]), default)),
                Some(k) if k.len() == c => Ok(ArrayD::from_shape_vec(IxDyn(&[c]), k.to_f32()).expect("c values")),
                Some(k) => Err(cx.err(format!("{what} of shape {:?} for {c} features", k.shape))),
            }
        };
        let weight = vec_of(Some(self.konst(cx, 1, "scale")?), "scale", 1.0)?;
        let bias = vec_of(self.opt_konst(cx, 2, "bias")?, "bias", 0.0)?;
        if cx.node.output.len() > 1 {
            return Err(cx.err("its mean and inverse standard deviation outputs are not computed"));
        }
        let ln = LayerNorm { weight, bias, eps: cx.float("epsilon", 1e-5) };
        let y = self.layer(cx, "", Box::new(ln), &x)?;
        Ok(Node { rows_of: x.rows_of.clone(), ..y })
    }

    fn concat(&mut self, cx: &Cx<'_>) -> Result<Vec<Val>> {
        let vals: Vec<Val> = (0..cx.node.input.len()).map(|i| self.value(cx, i).cloned()).collect::<Result<_>>()?;
        let axis = cx.int("axis", 1);
        if vals.iter().all(|v| matches!(v, Val::Const(_))) {
            let cs: Vec<Const> =
                vals.into_iter().map(|v| if let Val::Const(c) = v { c } else { unreachable!() }).collect();
            return Ok(vec![Val::Const(fold_concat(cx, &cs, axis)?)]);
        }
        // Constants of one image (`[1, ...]`: ViT's class token, expanded to the batch of 1
        // the model was imported at) join repeated over the batch of the first computed input.
        let first = vals
            .iter()
            .find_map(|v| if let Val::Node(n) = v { Some(n.clone()) } else { None })
            .expect("not all constants");
        let mut nodes = Vec::with_capacity(vals.len());
        for (i, v) in vals.into_iter().enumerate() {
            nodes.push(match v {
                Val::Node(n) => n,
                Val::Const(k) => {
                    if k.shape.len() != first.shape.len()
                        || k.shape.first() != Some(&1)
                        || k.as_i64().is_some()
                        || first.batch_axis.is_some_and(|b| b != 0)
                    {
                        return Err(cx.err(format!(
                            "input {i} is a constant of shape {:?} beside computed values of shape {:?}: qonnx concatenates float constants of one image ([1, ...]) with them",
                            k.shape, first.shape
                        )));
                    }
                    let konst = BatchConst::new(k.to_array()).map_err(|e| cx.err(e.to_string()))?;
                    let mut c = self.layer(cx, &format!(":const{i}"), Box::new(konst), &first)?;
                    c.batch = first.batch;
                    c
                }
            });
        }
        let rank = nodes[0].shape.len();
        let d = norm_axis(cx, axis, rank)?;
        if nodes[0].batch && nodes[0].batch_axis.unwrap_or(0) == d {
            return Err(cx.err(format!(
                "axis {axis} is the batch's: qonnx concatenates along the other axes (run the inputs as one batch \
                 instead)"
            )));
        }
        let mut shape = nodes[0].shape.clone();
        shape[d] = 0;
        for n in &nodes {
            let fits = n.shape.len() == rank
                && n.shape.iter().zip(&nodes[0].shape).enumerate().all(|(i, (a, b))| i == d || a == b);
            if !fits {
                return Err(cx.err(format!(
                    "inputs of shapes {:?} differ beyond axis {d}",
                    nodes.iter().map(|n| &n.shape).collect::<Vec<_>>()
                )));
            }
            shape[d] += n.shape[d];
        }
        let name = self.fresh(&cx.name);
        let ts: Vec<Tensor> = nodes.iter().map(|n| n.t).collect();
        let t = self.b.cat_dim(&name, &ts, d)?;
        let batch_axis = nodes[0].batch_axis.filter(|&b| b != d);
        let tokens = map_axes(&nodes[0].tokens, |k| (k != d).then_some(k));
        Ok(vec![Val::Node(Node { t, shape, batch: nodes[0].batch, rows_of: None, batch_axis, tokens })])
    }

    fn pool(&mut self, cx: &Cx<'_>) -> Result<Node> {
        let x = self.graph_in(cx, 0)?;
        self.check_rank(cx, &x, 4)?;
        let k = cx.ints("kernel_shape").unwrap_or_default();
        if k.len() != 2 || k.iter().any(|&v| v <= 0) {
            return Err(cx.err(format!("kernel_shape {k:?}: qonnx pools over two axes")));
        }
        let k = [k[0] as usize, k[1] as usize];
        // ONNX's default stride is 1 (PyTorch's is the kernel).
        let stride = pair(cx, "strides", [1, 1])?;
        let dilation = pair(cx, "dilations", [1, 1])?;
        let [t, l, b, r] = self.pads(cx, &x.shape[2..], k, stride, dilation)?;
        let ceil = cx.int("ceil_mode", 0) != 0;
        if t != b || l != r {
            return Err(cx.err(format!(
                "pads [{t}, {l}, {b}, {r}] are not symmetric; qonnx pools with equal padding on both sides"
            )));
        }
        if t * 2 > k[0] || l * 2 > k[1] {
            return Err(cx.err(format!("pads {:?} exceed half the kernel {k:?}", [t, l])));
        }
        let mut p = qnn::layers::MaxPool2d::new(k[0], stride[0], t).0;
        p.kernel = k;
        p.stride = stride;
        p.padding = [t, l];
        p.ceil_mode = ceil;
        if cx.op() == "MaxPool" {
            if cx.int("storage_order", 0) != 0 {
                return Err(cx.err("storage_order=1 (column-major indices) is not supported"));
            }
            p.dilation = dilation;
            self.layer(cx, "", Box::new(MaxPool2d(p)), &x)
        } else {
            if dilation != [1, 1] {
                return Err(cx.err(format!("dilations {dilation:?}: average pooling without dilation only")));
            }
            p.count_include_pad = cx.int("count_include_pad", 0) != 0;
            self.layer(cx, "", Box::new(AvgPool2d(p)), &x)
        }
    }

    fn reduce_mean(&mut self, cx: &Cx<'_>) -> Result<Node> {
        let x = self.graph_in(cx, 0)?;
        let axes = if self.opset >= 18 { self.ints_of(cx, 1, "axes")? } else { cx.ints("axes") };
        let keep = cx.int("keepdims", 1) != 0;
        let mut axes: Vec<usize> =
            axes.unwrap_or_default().iter().map(|&a| norm_axis(cx, a, x.shape.len())).collect::<Result<_>>()?;
        axes.sort_unstable();
        axes.dedup();
        let refuse = || {
            cx.err(format!(
                "axes {axes:?} of shape {:?}: qonnx takes the mean over spatial axes: [2, 3], [2] or [3] of NCHW, \
                 the last of [n, c, length]",
                x.shape
            ))
        };
        if x.batch_axis.is_some_and(|b| b != 0) {
            return Err(refuse());
        }
        match (x.shape.as_slice(), axes.as_slice()) {
            (&[_, _, h, w], a) if matches!(a, [2, 3] | [2] | [3]) => {
                let (oh, ow) = (if a.contains(&2) { 1 } else { h }, if a.contains(&3) { 1 } else { w });
                let pooled = self.layer(cx, "", Box::new(AdaptiveAvgPool2d(oh, ow)), &x)?;
                if keep {
                    return Ok(pooled);
                }
                let rest: Vec<i64> = pooled.shape[1..]
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| !a.contains(&(k + 1)))
                    .map(|(_, &d)| d as i64)
                    .collect();
                let target: Vec<i64> = std::iter::once(-1).chain(rest).collect();
                if target.len() == 2 {
                    return self.layer(cx, ":squeeze", Box::new(Flatten), &pooled);
                }
                self.layer(cx, ":squeeze", Box::new(Reshape { shape: target, keep_batch: false }), &pooled)
            }
            (&[_, c, l], [2]) => {
                // [n, c, length] as the image [n, c, 1, length], pooled, then back to rank 3.
                let image = Reshape { shape: vec![-1, c as i64, 1, l as i64], keep_batch: false };
                let image = self.layer(cx, ":image", Box::new(image), &x)?;
                let pooled = self.layer(cx, "", Box::new(AdaptiveAvgPool2d(1, 1)), &image)?;
                let target = if keep { vec![-1, c as i64, 1] } else { vec![-1, c as i64] };
                self.layer(cx, ":squeeze", Box::new(Reshape { shape: target, keep_batch: false }), &pooled)
            }
            _ => Err(refuse()),
        }
    }

    fn reshape(&mut self, cx: &Cx<'_>, g: &GraphProto, consumers: &HashMap<&str, Vec<usize>>) -> Result<Vec<Val>> {
        let target = self.konst(cx, 1, "shape")?;
        let t = target.as_i64().ok_or_else(|| cx.err("shape must be integers"))?.to_vec();
        let (flags, tflags) = (target.batch_flags(), target.token_flags());
        if cx.int("allowzero", 0) != 0 && t.contains(&0) {
            return Err(cx.err("allowzero=1 with a 0 in the shape (an empty tensor) is not supported"));
        }
        match self.value(cx, 0)?.clone() {
            Val::Const(c) => {
                let shape = reshape_dims(cx, &c.shape, &t)?;
                Ok(vec![Val::Const(Const { shape, ..c })])
            }
            Val::Node(x) => {
                let out = reshape_dims(cx, &x.shape, &t)?;
                if let Some(groups) = self.channel_shuffle(cx, g, consumers, &x, &out) {
                    let m = ChannelShuffle { groups };
                    return Ok(vec![Val::Node(self.layer(cx, "", Box::new(m), &x)?)]);
                }
                let (m, batch_axis, tokens) = self.reshape_layer(&x, &out, &t, &flags, &tflags);
                let y = self.layer(cx, "", Box::new(m), &x)?;
                Ok(vec![Val::Node(Node { batch_axis, tokens, ..y })])
            }
        }
    }

    /// ShuffleNet's channel shuffle as exporters write it: this reshape of `[n, c, h, w]` to
    /// `[n, g, c / g, h, w]`, then `Transpose(0, 2, 1, 3, 4)`, then a reshape back to
    /// `[n, c, h, w]`, each the only reader of the one before. Returns the groups, with the
    /// transpose and the second reshape absorbed (the second's target is checked when it is
    /// reached).
    fn channel_shuffle(
        &mut self,
        cx: &Cx<'_>,
        g: &GraphProto,
        consumers: &HashMap<&str, Vec<usize>>,
        x: &Node,
        out: &[usize],
    ) -> Option<usize> {
        let (&[n, c, h, w], &[n2, groups, cg, h2, w2]) = (x.shape.as_slice(), out) else { return None };
        if (n2, h2, w2) != (n, h, w) || groups * cg != c || groups < 2 {
            return None;
        }
        let sole = |name: &str, op: &str| sole_reader(g, consumers, name, op);
        let first = cx.node.output.first()?;
        let tr = sole(first, "Transpose")?;
        let perm = tr.attribute.iter().find(|a| a.name.as_deref() == Some("perm"))?;
        if perm.ints != [0, 2, 1, 3, 4] {
            return None;
        }
        let back = sole(&tr.output[0], "Reshape")?;
        if back.input.first() != Some(&tr.output[0]) {
            return None;
        }
        self.absorbed.insert(tr.output[0].clone(), first.clone());
        self.absorbed.insert(back.output[0].clone(), first.clone());
        self.shuffle_checks.insert(back.output[0].clone(), (vec![n, cg, groups, h, w], x.shape.clone()));
        Some(groups)
    }

    /// A reshape of `x` to `out`, and the axis of the output that follows the batch. The batch
    /// is kept whatever its size when the target's first entry is the batch (read off a
    /// shape, copied by 0, or inferred by -1 from an unchanged rest). Otherwise the entry that
    /// follows the batch (read off a shape, possibly multiplied: `[tokens, batch * heads, d]`;
    /// a 0 copying the input's batch axis; or the only -1 when the input has a batch axis and
    /// nothing else in the target follows it) is written as -1, the others as their sizes.
    /// The entry that is the sequence length (read off a shape, or a 0 copying the input's
    /// sequence axis) is kept whatever its size too: as the -1 when the batch is first or not
    /// followed, as a 0 where it copies the input's; the sequence axes of the output are
    /// returned with the batch's.
    fn reshape_layer(
        &self,
        x: &Node,
        out: &[usize],
        target: &[i64],
        flags: &[bool],
        tflags: &[bool],
    ) -> (Reshape, Option<usize>, Vec<usize>) {
        let tok: Vec<usize> = (0..target.len())
            .filter(|&k| tflags.get(k) == Some(&true) || (target[k] == 0 && x.tokens.contains(&k)))
            .collect();
        let rest_same = !out.is_empty()
            && !x.shape.is_empty()
            && out[1..].iter().product::<usize>() == x.shape[1..].iter().product::<usize>();
        let batch_first = x.batch
            && out.first() == x.shape.first()
            && (flags.first() == Some(&true)
                || target.first() == Some(&0)
                || (target.first() == Some(&-1) && rest_same));
        if batch_first && rest_same {
            let (m, tokens) = dynamic_reshape(out, true, Some(0), tok);
            return (m, Some(0), tokens);
        }
        let follows: Vec<usize> = (0..target.len())
            .filter(|&k| flags.get(k) == Some(&true) || (target[k] == 0 && x.batch_axis == Some(k)))
            .collect();
        let inferred = target.iter().position(|&d| d == -1);
        let at = match (follows.as_slice(), inferred) {
            ([k], None) => Some(*k),
            ([k], Some(j)) if j == *k => Some(*k),
            ([], Some(j)) if x.batch_axis.is_some() => Some(j),
            _ => None,
        };
        let mut shape: Vec<i64> =
            out.iter().enumerate().map(|(k, &d)| if Some(k) == at { -1 } else { d as i64 }).collect();
        let tokens = match tok[..] {
            [k] if Some(k) == at => Vec::new(),
            [k] if at.is_none() => {
                shape[k] = -1;
                vec![k]
            }
            [k] if x.tokens.contains(&k) && k < x.shape.len() => {
                shape[k] = 0;
                vec![k]
            }
            _ => Vec::new(),
        };
        (Reshape { shape, keep_batch: false }, at, tokens)
    }

    /// A reshape of `x` that inserts or removes axes of size 1 (`out`), `x`'s batch axis now
    /// at `batch_axis` and its sequence axes at `tokens`: kept whatever their sizes (see
    /// [`dynamic_reshape`]). Returns the sequence axes it keeps.
    fn axes_reshape(x: &Node, out: &[usize], batch_axis: Option<usize>, tokens: Vec<usize>) -> (Reshape, Vec<usize>) {
        dynamic_reshape(out, x.batch && batch_axis == Some(0), batch_axis, tokens)
    }

    fn squeeze(&mut self, cx: &Cx<'_>) -> Result<Vec<Val>> {
        let axes = if self.opset >= 13 { self.ints_of(cx, 1, "axes")? } else { cx.ints("axes") };
        let v = self.value(cx, 0)?.clone();
        let shape = match &v {
            Val::Const(c) => c.shape.clone(),
            Val::Node(n) => n.shape.clone(),
        };
        // Where the batch axis goes (`None`: squeezed away).
        let batch_to: Box<dyn Fn(usize) -> Option<usize>>;
        let out = if cx.op() == "Unsqueeze" {
            let axes = axes.ok_or_else(|| cx.err("no axes"))?;
            let r = shape.len() + axes.len();
            let mut ax: Vec<usize> = axes.iter().map(|&a| norm_axis(cx, a, r)).collect::<Result<_>>()?;
            ax.sort_unstable();
            let ins = ax.clone();
            batch_to = Box::new(move |b| {
                // The input axis `b` is the `b`-th axis not inserted.
                (0..r).filter(|k| !ins.contains(k)).nth(b)
            });
            let mut out = shape.clone();
            for a in ax {
                out.insert(a, 1);
            }
            out
        } else {
            let r = shape.len();
            let ax: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&a| norm_axis(cx, a, r)).collect::<Result<_>>()?,
                None => (0..r).filter(|&k| shape[k] == 1).collect(),
            };
            if let Some(&a) = ax.iter().find(|&&a| shape[a] != 1) {
                return Err(cx.err(format!("axis {a} of shape {shape:?} is not of size 1")));
            }
            let gone = ax.clone();
            batch_to = Box::new(move |b| (!gone.contains(&b)).then(|| b - gone.iter().filter(|&&a| a < b).count()));
            (0..r).filter(|k| !ax.contains(k)).map(|k| shape[k]).collect()
        };
        match v {
            Val::Const(c) => Ok(vec![Val::Const(Const { shape: out, ..c })]),
            Val::Node(x) => {
                let batch_axis = x.batch_axis.and_then(&batch_to);
                let (m, tokens) = Self::axes_reshape(&x, &out, batch_axis, map_axes(&x.tokens, &batch_to));
                let y = self.layer(cx, "", Box::new(m), &x)?;
                Ok(vec![Val::Node(Node { batch: y.batch && batch_axis == Some(0), batch_axis, tokens, ..y })])
            }
        }
    }

    fn transpose(&mut self, cx: &Cx<'_>) -> Result<Vec<Val>> {
        let v = self.value(cx, 0)?.clone();
        let rank = match &v {
            Val::Const(c) => c.shape.len(),
            Val::Node(n) => n.rows_of.as_ref().map_or(n.shape.len(), |(v, _)| v.len()),
        };
        let perm: Vec<usize> = match cx.ints("perm") {
            Some(p) => p.iter().map(|&a| norm_axis(cx, a, rank)).collect::<Result<_>>()?,
            None => (0..rank).rev().collect(),
        };
        match v {
            Val::Const(c) => {
                let mut seen = vec![false; rank];
                if perm.len() != rank || perm.iter().any(|&d| std::mem::replace(&mut seen[d], true)) {
                    return Err(cx.err(format!("perm {perm:?} is not a permutation of {rank} axes")));
                }
                let strides = row_strides(&c.shape);
                let out: Vec<usize> = perm.iter().map(|&d| c.shape[d]).collect();
                let mut order = Vec::with_capacity(c.len());
                for_each_index(&out, |ix| order.push(ix.iter().zip(&perm).map(|(&i, &d)| i * strides[d]).sum()));
                Ok(vec![Val::Const(pick(&c, out, &order))])
            }
            Val::Node(x) => {
                match (&x.rows_of, x.shape.as_slice(), perm.as_slice()) {
                    // Rows of an NHWC value back to the NCHW image: nothing moves in int8.
                    (Some((v, batch)), _, [0, 3, 1, 2]) if v.len() == 4 => {
                        let m = RowsImage { h: v[1], w: v[2] };
                        let y = self.layer(cx, "", Box::new(m), &x)?;
                        return Ok(vec![Val::Node(Node { batch: *batch, batch_axis: batch.then_some(0), ..y })]);
                    }
                    // An image as NHWC, held as rows of channels: nothing moves in int8.
                    (None, &[n, c, h, w], [0, 2, 3, 1]) if x.tokens.is_empty() => {
                        let y = self.layer(cx, "", Box::new(ImageRows), &x)?;
                        return Ok(vec![Val::Node(Node {
                            rows_of: Some((vec![n, h, w, c], x.batch)),
                            batch_axis: x.batch.then_some(0),
                            ..y
                        })]);
                    }
                    _ => {}
                }
                let name = cx.input(0).unwrap_or_default().to_string();
                self.materialize(&name)?;
                let x = self.graph_in(cx, 0)?;
                let moved = |b: usize| perm.iter().position(|&d| d == b);
                let (batch_axis, tokens) = (x.batch_axis.and_then(moved), map_axes(&x.tokens, moved));
                let y = self.layer(cx, "", Box::new(Permute { dims: perm }), &x)?;
                Ok(vec![Val::Node(Node { batch_axis, tokens, ..y })])
            }
        }
    }

    fn linear(&mut self, cx: &Cx<'_>, x: &Node, weight: ArrayD<f32>, bias: Option<ArrayD<f32>>) -> Result<Node> {
        let s = weight.shape().to_vec();
        let mut lin = Linear::new(s[1], s[0]);
        lin.weight = weight;
        lin.bias = bias;
        let with_last = |v: &[usize]| {
            let mut v = v.to_vec();
            *v.last_mut().expect("at least 2 axes") = s[0];
            v
        };
        match (&x.rows_of, x.shape.len()) {
            // Rows in, rows out.
            (Some((v, batch)), _) => {
                let y = self.layer(cx, "", Box::new(lin), x)?;
                Ok(Node { rows_of: Some((with_last(v), *batch)), ..y })
            }
            (None, 2) => self.layer(cx, "", Box::new(lin), x),
            // A sequence that keeps its length as it is: `Linear` takes `[.., k]`.
            (None, 3) if !x.tokens.is_empty() => self.layer(cx, "", Box::new(lin), x),
            (None, r) if r > 2 => {
                // [.., k] as rows [-1, k] through the layer; the output stays rows until a
                // reader needs it otherwise.
                let rows = Reshape { shape: vec![-1, *x.shape.last().expect("rank > 2") as i64], keep_batch: false };
                let flat = self.layer(cx, ":rows", Box::new(rows), x)?;
                let y = self.layer(cx, "", Box::new(lin), &flat)?;
                Ok(Node { rows_of: Some((with_last(&x.shape), x.batch)), batch_axis: x.batch_axis, ..y })
            }
            _ => Err(cx.err(format!("input of shape {:?}: a matrix product needs at least 2 axes", x.shape))),
        }
    }

    fn gemm(&mut self, cx: &Cx<'_>) -> Result<Node> {
        if cx.int("transA", 0) != 0 {
            return Err(cx.err("transA=1: qonnx takes the computed operand untransposed"));
        }
        if matches!(self.value(cx, 1)?, Val::Node(_)) {
            // A product of two computed matrices: alpha 1, and no C (or beta 0, or C zero).
            let (alpha, beta) = (cx.float("alpha", 1.0), cx.float("beta", 1.0));
            if alpha != 1.0 {
                return Err(cx.err(format!("alpha={alpha} with a computed B: qonnx takes alpha=1 there")));
            }
            if cx.input(2).is_some() && beta != 0.0 {
                let c = self.konst(cx, 2, "bias (C) of a product of computed values")?;
                if c.to_f32().iter().any(|&v| v != 0.0) {
                    return Err(cx.err(format!(
                        "a non-zero C of shape {:?} added to a product of computed values: qonnx takes C = 0 \
                         there (add it with an Add node)",
                        c.shape
                    )));
                }
            }
            return self.product(cx, cx.int("transB", 0) != 0);
        }
        let x = self.graph_in(cx, 0)?;
        // Before opset 7 a C that is not [m, n] needs broadcast=1.
        if self.opset < 7 && cx.int("broadcast", 0) == 0 && cx.input(2).is_some() {
            let c = self.konst(cx, 2, "bias (C)")?;
            let m = self.graph_in(cx, 0)?.shape[0];
            if c.shape.first() != Some(&m) || c.shape.len() != 2 {
                return Err(cx.err(format!("C of shape {:?} without broadcast=1 must be [m, n]", c.shape)));
            }
        }
        let b = self.konst(cx, 1, "weight (B)")?;
        if b.shape.len() != 2 {
            return Err(cx.err(format!("B of shape {:?} is not a matrix", b.shape)));
        }
        let (alpha, beta) = (cx.float("alpha", 1.0), cx.float("beta", 1.0));
        let mut w = b.to_array();
        if cx.int("transB", 0) == 0 {
            w = w.reversed_axes().as_standard_layout().into_owned();
        }
        if alpha != 1.0 {
            w.mapv_inplace(|v| v * alpha);
        }
        let n = w.shape()[0];
        let bias = match self.opt_konst(cx, 2, "bias (C)")? {
            None => None,
            Some(c) if c.len() == n || c.len() == 1 => {
                let v = c.to_f32();
                Some(ArrayD::from_shape_fn(IxDyn(&[n]), |i| beta * v[if v.len() == 1 { 0 } else { i[0] }]))
            }
            Some(c) => return Err(cx.err(format!("C of shape {:?}: qonnx takes one bias per output ({n})", c.shape))),
        };
        self.linear(cx, &x, w, bias)
    }

    /// The product of two computed values (`MatMul`, or `Gemm` with a computed B): batch axes
    /// broadcast; with `trans_b`, B (a matrix) transposed first.
    fn product(&mut self, cx: &Cx<'_>, trans_b: bool) -> Result<Node> {
        for i in 0..2 {
            if let Some(name) = cx.input(i) {
                self.materialize(name)?;
            }
        }
        let a = self.graph_in(cx, 0)?;
        let mut b = self.graph_in(cx, 1)?;
        if trans_b {
            if b.shape.len() != 2 {
                return Err(cx.err(format!("transB=1 with a computed B of shape {:?}: B must be a matrix", b.shape)));
            }
            b = self.layer(cx, ":transB", Box::new(Permute { dims: vec![1, 0] }), &b)?;
        }
        let shape = qnn::ops::matmul::matmul_shape(&a.shape, &b.shape).ok_or_else(|| {
            cx.err(format!(
                "inputs of shapes {:?} and {:?}: qonnx multiplies [.., m, k] by [.., k, n] (rank 2 or more, batch \
                 axes equal, 1 or missing)",
                a.shape, b.shape
            ))
        })?;
        if elements(&shape).is_none() {
            return Err(cx.err(format!("an output of shape {shape:?} is larger than qonnx computes (2^34 elements)")));
        }
        let name = self.fresh(&cx.name);
        let t = self.b.matmul(&name, a.t, b.t)?;
        // The batch axes broadcast: the output's follows the longer operand's.
        let lead = |n: &Node| shape.len() - n.shape.len();
        let batch_axis = a.batch_axis.map(|k| k + lead(&a)).or(b.batch_axis.map(|k| k + lead(&b)));
        let batch_axis = batch_axis.filter(|&k| k + 2 < shape.len());
        // The sequence axis: a's rows, b's columns, or a batch axis of either.
        let r = shape.len();
        let mut tokens: Vec<usize> = a.tokens.iter().map(|&k| k + lead(&a)).filter(|&k| k + 1 < r).collect();
        tokens.extend(b.tokens.iter().map(|&k| k + lead(&b)).filter(|&k| k + 2 < r || k + 1 == r));
        tokens.sort_unstable();
        tokens.dedup();
        Ok(Node { t, shape, batch: a.batch || b.batch, rows_of: None, batch_axis, tokens })
    }

    fn matmul(&mut self, cx: &Cx<'_>, g: &GraphProto, consumers: &HashMap<&str, Vec<usize>>) -> Result<Node> {
        if matches!(self.value(cx, 1)?, Val::Node(_)) {
            return self.product(cx, false);
        }
        let x = self.graph_in(cx, 0)?;
        let b = self.konst(cx, 1, "weight")?;
        if b.shape.len() != 2 {
            return Err(cx.err(format!("weight of shape {:?}: qonnx takes a constant matrix", b.shape)));
        }
        let w = b.to_array().reversed_axes().as_standard_layout().into_owned();
        let n = w.shape()[0];
        // MatMul followed by Add of a constant vector (PyTorch's Linear at some opsets, and
        // other exporters): the Add becomes this layer's bias.
        let out = cx.node.output.first().cloned().unwrap_or_default();
        let mut bias = None;
        if let Some(add) = sole_reader(g, consumers, &out, "Add") {
            if let Some(Val::Const(c)) = other_input(add, &out).and_then(|k| self.vals.get(k)) {
                if c.len() == n && matches!(c.data, Data::F32(_)) {
                    bias = Some(ArrayD::from_shape_vec(IxDyn(&[n]), c.to_f32()).expect("length checked"));
                    self.absorbed.insert(add.output[0].clone(), out.clone());
                }
            }
        }
        self.linear(cx, &x, w, bias)
    }

    fn pad(&mut self, cx: &Cx<'_>) -> Result<Node> {
        let x = self.graph_in(cx, 0)?;
        self.check_rank(cx, &x, 4)?;
        let (pads, value) = if self.opset < 11 {
            (cx.ints("pads").unwrap_or_default(), cx.float("value", 0.0))
        } else {
            let p = self.ints_of(cx, 1, "pads")?.unwrap_or_default();
            let v = match self.opt_konst(cx, 2, "constant_value")? {
                Some(c) if c.len() == 1 => c.to_f32()[0],
                Some(c) => return Err(cx.err(format!("constant_value of shape {:?} is not a scalar", c.shape))),
                None => 0.0,
            };
            if cx.input(3).is_some() {
                return Err(cx.err("the axes input is not supported; give pads for all four axes"));
            }
            (p, v)
        };
        // [n_begin, c_begin, h_begin, w_begin, n_end, c_end, h_end, w_end]
        if pads.len() != 8
            || pads[0] != 0
            || pads[1] != 0
            || pads[4] != 0
            || pads[5] != 0
            || pads.iter().any(|&p| p < 0)
        {
            return Err(
                cx.err(format!("pads {pads:?}: qonnx pads height and width of NCHW by non-negative amounts only"))
            );
        }
        let mode = match cx.string("mode", "constant").as_str() {
            "constant" => PadMode::Constant(value),
            "reflect" => PadMode::Reflect,
            "edge" => PadMode::Replicate,
            other => return Err(cx.err(format!("mode '{other}': constant, reflect and edge are supported"))),
        };
        let p = Pad2d { pads: [pads[3] as usize, pads[7] as usize, pads[2] as usize, pads[6] as usize], mode };
        self.layer(cx, "", Box::new(p), &x)
    }

    fn resize(&mut self, cx: &Cx<'_>) -> Result<Node> {
        let x = self.graph_in(cx, 0)?;
        self.check_rank(cx, &x, 4)?;
        let mode = cx.string("mode", "nearest");
        // Upsample 7-8: scales is an attribute; Upsample 9: input 1. Resize 10: scales is
        // input 1; 11+: roi, scales, sizes.
        let (scales, sizes) = if cx.op() == "Upsample" && self.opset < 9 {
            (Some(cx.attr("scales").map(|a| a.floats.clone()).unwrap_or_default()), None)
        } else if cx.op() == "Upsample" || self.opset < 11 {
            (self.opt_konst(cx, 1, "scales")?.map(|c| c.to_f32()), None)
        } else {
            (
                self.opt_konst(cx, 2, "scales")?.map(|c| c.to_f32()).filter(|s| !s.is_empty()),
                self.ints_of(cx, 3, "sizes")?,
            )
        };
        let [n, c, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
        let factor: [f64; 2] = match (scales, sizes) {
            (Some(s), _) if s.len() == 4 && s[0] == 1.0 && s[1] == 1.0 => [f64::from(s[2]), f64::from(s[3])],
            (None, Some(z)) if z.len() == 4 && z[0] == n as i64 && z[1] == c as i64 && h > 0 && w > 0 => {
                [z[2] as f64 / h as f64, z[3] as f64 / w as f64]
            }
            (s, z) => return Err(cx.err(format!("scales {s:?}, sizes {z:?}: qonnx resizes height and width only"))),
        };
        let ctm = cx.string(
            "coordinate_transformation_mode",
            if cx.op() == "Upsample" || self.opset < 11 { "asymmetric" } else { "half_pixel" },
        );
        let m = match mode.as_str() {
            "nearest" => {
                let nm = cx.string("nearest_mode", "round_prefer_floor");
                let exact = ctm == "asymmetric" && (self.opset < 11 || cx.op() == "Upsample" || nm == "floor");
                if !exact || factor.iter().any(|f| f.fract() != 0.0 || *f < 1.0) {
                    return Err(cx.err(format!(
                        "nearest resize with coordinate_transformation_mode '{ctm}', nearest_mode '{nm}', factors \
                         {factor:?}: qonnx takes PyTorch's nearest upsampling (asymmetric, floor, integer factors)"
                    )));
                }
                Upsample { size: None, scale_factor: Some(factor), mode: UpsampleMode::Nearest }
            }
            "linear" | "bilinear" => {
                let align_corners = match ctm.as_str() {
                    "align_corners" => true,
                    "pytorch_half_pixel" | "half_pixel" => false,
                    other => {
                        return Err(cx.err(format!(
                            "linear resize with coordinate_transformation_mode '{other}': align_corners, half_pixel \
                             and pytorch_half_pixel are supported"
                        )))
                    }
                };
                Upsample { size: None, scale_factor: Some(factor), mode: UpsampleMode::Bilinear { align_corners } }
            }
            other => return Err(cx.err(format!("mode '{other}': nearest and linear are supported"))),
        };
        let out = self.layer(cx, "", Box::new(m), &x)?;
        let want = [(h as f64 * factor[0]).floor() as usize, (w as f64 * factor[1]).floor() as usize];
        if out.shape[2..] != want {
            return Err(cx.err(format!("output {:?} differs from ONNX's size {want:?}", out.shape)));
        }
        Ok(out)
    }

    fn split(&mut self, cx: &Cx<'_>) -> Result<Vec<Val>> {
        let x = self.graph_in(cx, 0)?;
        let axis = norm_axis(cx, cx.int("axis", 0), x.shape.len())?;
        let outs = cx.node.output.len();
        let sizes: Vec<usize> = match if self.opset >= 13 { self.ints_of(cx, 1, "split")? } else { cx.ints("split") } {
            Some(s) => s
                .iter()
                .map(|&v| usize::try_from(v).map_err(|_| cx.err(format!("split {s:?}"))))
                .collect::<Result<_>>()?,
            None => {
                let d = x.shape[axis];
                let k = outs.max(1);
                let each = d.div_ceil(k);
                (0..k).map(|i| each.min(d.saturating_sub(i * each))).collect()
            }
        };
        if sizes.iter().sum::<usize>() != x.shape[axis] || sizes.len() != outs {
            return Err(
                cx.err(format!("split sizes {sizes:?} for axis {axis} of shape {:?} and {outs} outputs", x.shape))
            );
        }
        let mut start = 0;
        let mut res = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let s = Slice::narrow(axis as i64, start, len);
            start += len;
            res.push(Val::Node(self.layer(cx, &format!(".{i}"), Box::new(s), &x)?));
        }
        Ok(res)
    }

    fn slice(&mut self, cx: &Cx<'_>) -> Result<Vec<Val>> {
        let v = self.value(cx, 0)?.clone();
        let shape = match &v {
            Val::Const(c) => c.shape.clone(),
            Val::Node(n) => n.shape.clone(),
        };
        // The ends that are the sequence length (read off a shape), per entry.
        let seq_ends = if self.opset < 10 || cx.input(2).is_none() {
            Vec::new()
        } else {
            self.konst(cx, 2, "ends")?.token_flags()
        };
        let (starts, ends, axes, steps) = if self.opset < 10 {
            (cx.ints("starts").unwrap_or_default(), cx.ints("ends").unwrap_or_default(), cx.ints("axes"), None)
        } else {
            (
                self.ints_of(cx, 1, "starts")?.unwrap_or_default(),
                self.ints_of(cx, 2, "ends")?.unwrap_or_default(),
                self.ints_of(cx, 3, "axes")?,
                self.ints_of(cx, 4, "steps")?,
            )
        };
        let axes: Vec<usize> = match axes {
            Some(a) => a.iter().map(|&a| norm_axis(cx, a, shape.len())).collect::<Result<_>>()?,
            None => (0..starts.len()).collect(),
        };
        if starts.len() != axes.len()
            || ends.len() != axes.len()
            || steps.as_ref().is_some_and(|s| s.len() != axes.len())
        {
            return Err(cx.err("starts, ends, axes and steps differ in length"));
        }
        // Each axis's indices, ONNX's rules: negative starts and ends count from the end; a
        // positive step runs from start up to end (clamped to [0, d]), a negative one from
        // start (clamped to [0, d - 1]) down to end (clamped to [-1, d - 1]).
        // Index lists only for constants (their sizes are the data's); a computed value's
        // sizes may be anything its input declares, and only its cuts are needed.
        let is_const = matches!(v, Val::Const(_));
        let mut picks: Vec<Vec<usize>> =
            shape.iter().map(|&d| if is_const { (0..d).collect() } else { Vec::new() }).collect();
        let mut cuts: Vec<(usize, usize, usize, i64)> = Vec::new(); // axis, start, end, step
                                                                    // A constant cut from 0 to the sequence length (position ids): its axis.
        let mut seq_cut = None;
        for (k, &a) in axes.iter().enumerate() {
            let step = steps.as_ref().map_or(1, |s| s[k]);
            if is_const && self.seq.is_some() && seq_ends.get(k) == Some(&true) && step == 1 && starts[k] == 0 {
                seq_cut = Some((a, ends[k]));
                continue;
            }
            let d = shape[a] as i64;
            let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
            let idx: Vec<usize> = match step {
                0 => return Err(cx.err("a step of 0")),
                st if st > 0 => {
                    let (b, e) = (norm(starts[k]).clamp(0, d), norm(ends[k]).clamp(0, d));
                    cuts.push((a, b as usize, e.max(b) as usize, st));
                    if !is_const {
                        continue;
                    }
                    (b..e).step_by(usize::try_from(st).unwrap_or(usize::MAX)).map(|i| i as usize).collect()
                }
                _ if !is_const => {
                    cuts.push((a, 0, 0, step));
                    continue;
                }
                st => {
                    let (b, e) = (norm(starts[k]).clamp(0, d - 1), norm(ends[k]).clamp(-1, d - 1));
                    cuts.push((a, 0, 0, st));
                    let mut v = Vec::new();
                    let mut i = b;
                    while i > e && i >= 0 {
                        v.push(i as usize);
                        i = i.saturating_add(st);
                    }
                    v
                }
            };
            picks[a] = idx;
        }
        match v {
            Val::Const(c) => {
                let out_shape: Vec<usize> = picks.iter().map(Vec::len).collect();
                let mut order = Vec::with_capacity(out_shape.iter().product());
                let strides = row_strides(&shape);
                for_each_index(&out_shape, |ix| {
                    order.push(ix.iter().zip(&picks).zip(&strides).map(|((&i, p), &st)| p[i] * st).sum());
                });
                let c = pick(&c, out_shape, &order);
                match (seq_cut, self.seq.clone()) {
                    (Some((a, end)), Some((_, size, src, from))) => {
                        // Kept whole along `a`, and cut at run time to the length of the input
                        // that holds the sequence.
                        if usize::try_from(end).ok() != Some(size) || c.shape[a] < size {
                            return Err(cx.err(format!(
                                "the end {end} read off the sequence length ({size}) of a constant of shape {:?}",
                                c.shape
                            )));
                        }
                        let value = c.to_array();
                        let m = SeqConst { value, axis: a, from };
                        let name = self.fresh(&cx.name);
                        let t = self.b.boxed(&name, Box::new(m), src)?;
                        let mut shape = c.shape.clone();
                        shape[a] = size;
                        let n = Node { t, shape, batch: false, rows_of: None, batch_axis: None, tokens: vec![a] };
                        Ok(vec![Val::Node(n)])
                    }
                    _ => Ok(vec![Val::Const(c)]),
                }
            }
            Val::Node(mut x) => {
                let cut: Vec<_> = cuts.into_iter().filter(|&(a, b, e, st)| (b, e, st) != (0, shape[a], 1)).collect();
                for (i, &(a, b, e, st)) in cut.iter().enumerate() {
                    let suffix = if cut.len() == 1 { String::new() } else { format!(".{i}") };
                    let s = match st {
                        1 => Slice::narrow(a as i64, b, e - b),
                        st if st > 1 => Slice {
                            dim: a as i64,
                            range: SliceRange::Range { start: b as i64, end: e as i64, step: st as usize },
                        },
                        _ => {
                            return Err(cx.err(format!(
                                "steps {:?}: qonnx slices computed values with positive steps",
                                steps.as_ref().expect("a negative step was given")
                            )))
                        }
                    };
                    x = self.layer(cx, &suffix, Box::new(s), &x)?;
                    // A cut sequence axis has a size of its own.
                    x.tokens.retain(|&k| k != a);
                }
                Ok(vec![Val::Node(x)])
            }
        }
    }
}

/// `axes` moved by `f` (`None`: gone), in order.
fn map_axes(axes: &[usize], f: impl Fn(usize) -> Option<usize>) -> Vec<usize> {
    let mut v: Vec<usize> = axes.iter().filter_map(|&k| f(k)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// A `Reshape` to `out` (the sizes at import) that keeps the batch at `batch_axis` and the
/// sequence length at `tokens` whatever they are at run time: a batch that comes first as
/// such (`keep_batch`), and one other axis as `-1`. Returns the sequence axes kept: none when
/// the sequence's axis cannot be the `-1` (the batch has it, or there are two); then its size
/// is the imported one, which the import's check of other lengths finds.
fn dynamic_reshape(
    out: &[usize],
    batch_first: bool,
    batch_axis: Option<usize>,
    tokens: Vec<usize>,
) -> (Reshape, Vec<usize>) {
    let mut t: Vec<i64> = out.iter().map(|&d| d as i64).collect();
    let tokens: Vec<usize> = tokens.into_iter().filter(|&k| k < t.len() && Some(k) != batch_axis).collect();
    if batch_first && !t.is_empty() {
        if let [k] = tokens[..] {
            t[k] = -1;
            return (Reshape::batch_and(&t[1..]), tokens);
        }
        return (Reshape::batch_and(&t[1..]), Vec::new());
    }
    match (batch_axis.filter(|&b| b < t.len()), &tokens[..]) {
        (Some(b), _) => {
            t[b] = -1;
            (Reshape { shape: t, keep_batch: false }, Vec::new())
        }
        (None, &[k]) => {
            t[k] = -1;
            (Reshape { shape: t, keep_batch: false }, tokens)
        }
        (None, _) => (Reshape { shape: t, keep_batch: false }, Vec::new()),
    }
}

/// The number of elements of `shape`, if at most 2^34 (so that no shape arithmetic on it
/// overflows).
fn elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= 1 << 34)
}

/// Row-major strides of `shape`.
fn row_strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        st[k] = st[k + 1] * shape[k + 1];
    }
    st
}

/// Calls `f` with every index of `shape` in row-major order.
fn for_each_index(shape: &[usize], mut f: impl FnMut(&[usize])) {
    if shape.contains(&0) {
        return;
    }
    let mut ix = vec![0; shape.len()];
    loop {
        f(&ix);
        let mut k = shape.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            ix[k] += 1;
            if ix[k] < shape[k] {
                break;
            }
            ix[k] = 0;
        }
    }
}

/// The elements of `c` at the flat positions `order`, as a constant of shape `shape`
/// (integers stay integers, with their batch flags).
fn pick(c: &Const, shape: Vec<usize>, order: &[usize]) -> Const {
    let data = match &c.data {
        Data::F32(v) => Data::F32(order.iter().map(|&i| v[i]).collect()),
        Data::I64 { v, flags } => {
            Data::I64 { v: order.iter().map(|&i| v[i]).collect(), flags: order.iter().map(|&i| flags[i]).collect() }
        }
    };
    Const { shape, data }
}

/// The only node reading value `out`, if it is of op type `op` with one output and `out` is
/// not also a graph output.
fn sole_reader<'g>(
    g: &'g GraphProto,
    consumers: &HashMap<&str, Vec<usize>>,
    out: &str,
    op: &str,
) -> Option<&'g NodeProto> {
    if is_graph_output(g, out) {
        return None;
    }
    match consumers.get(out).map(Vec::as_slice) {
        Some([k]) if g.node[*k].op_type.as_deref() == Some(op) && g.node[*k].output.len() == 1 => Some(&g.node[*k]),
        _ => None,
    }
}

/// Whether `name` is one of the graph's outputs (which a fused chain must not absorb).
fn is_graph_output(g: &GraphProto, name: &str) -> bool {
    g.output.iter().any(|o| o.name.as_deref() == Some(name))
}

/// A two-input node's input other than `this` (`None` if it has not two, or neither is it).
fn other_input<'n>(n: &'n NodeProto, this: &str) -> Option<&'n str> {
    match n.input.as_slice() {
        [a, b] if a == this => Some(b),
        [a, b] if b == this => Some(a),
        _ => None,
    }
}

/// Attribute `name` as two positive sizes (`[height, width]`), or `default`.
fn pair(cx: &Cx<'_>, name: &str, default: [usize; 2]) -> Result<[usize; 2]> {
    match cx.ints(name) {
        None => Ok(default),
        Some(v) if v.len() == 2 && v.iter().all(|&s| s > 0) => Ok([v[0] as usize, v[1] as usize]),
        Some(v) => Err(cx.err(format!("{name} {v:?}: expected two positive values"))),
    }
}

/// For each value name, the indices of the nodes that read it.
fn consumers(g: &GraphProto) -> HashMap<&str, Vec<usize>> {
    let mut m: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for inp in n.input.iter().filter(|s| !s.is_empty()) {
            m.entry(inp.as_str()).or_default().push(i);
        }
    }
    m
}

fn norm_axis(cx: &Cx<'_>, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(cx.err(format!("axis {axis} is outside a rank-{rank} tensor")))
    }
}

fn reshape_dims(cx: &Cx<'_>, input: &[usize], target: &[i64]) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        out.push(match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                1
            }
            0 => *input
                .get(i)
                .ok_or_else(|| cx.err(format!("shape {target:?}: a 0 copies a dimension {input:?} lacks")))?,
            d if d > 0 => d as usize,
            _ => return Err(cx.err(format!("shape {target:?} of input {input:?}"))),
        });
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(cx.err(format!("shape {target:?} does not divide input {input:?}")));
        }
        out[i] = total / known;
    }
    if out.iter().product::<usize>() != total {
        return Err(cx.err(format!("shape {target:?} does not hold the {total} elements of input {input:?}")));
    }
    Ok(out)
}

fn gather(cx: &Cx<'_>, c: &Const, axis: usize, idx: &[i64], ishape: &[usize]) -> Result<Const> {
    let d = c.shape[axis] as i64;
    let idx: Vec<usize> = idx
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + d } else { i };
            if (0..d).contains(&j) {
                Ok(j as usize)
            } else {
                Err(cx.err(format!("index {i} is outside axis {axis} of size {d}")))
            }
        })
        .collect::<Result<_>>()?;
    let outer: usize = c.shape[..axis].iter().product();
    let inner: usize = c.shape[axis + 1..].iter().product();
    let mut shape = c.shape[..axis].to_vec();
    shape.extend_from_slice(ishape);
    shape.extend_from_slice(&c.shape[axis + 1..]);
    let total = outer.checked_mul(idx.len()).and_then(|v| v.checked_mul(inner)).filter(|&n| n <= 1 << 24);
    let Some(total) = total else {
        return Err(cx.err(format!("gathering {} indices from {:?} is too large to fold", idx.len(), c.shape)));
    };
    let mut order = Vec::with_capacity(total);
    for o in 0..outer {
        for &j in &idx {
            for k in 0..inner {
                order.push((o * c.shape[axis] + j) * inner + k);
            }
        }
    }
    let data = match &c.data {
        Data::F32(v) => Data::F32(order.iter().map(|&i| v[i]).collect()),
        Data::I64 { v, flags } => {
            Data::I64 { v: order.iter().map(|&i| v[i]).collect(), flags: order.iter().map(|&i| flags[i]).collect() }
        }
    };
    Ok(Const { shape, data })
}

fn fold_concat(cx: &Cx<'_>, cs: &[Const], axis: i64) -> Result<Const> {
    let rank = cs[0].shape.len().max(1);
    let a = norm_axis(cx, axis, rank)?;
    // Scalars count as one-element vectors.
    let shapes: Vec<Vec<usize>> =
        cs.iter().map(|c| if c.shape.is_empty() { vec![1] } else { c.shape.clone() }).collect();
    for s in &shapes {
        if s.len() != rank || s.iter().enumerate().any(|(k, &d)| k != a && d != shapes[0][k]) {
            return Err(cx.err(format!("constant inputs of shapes {shapes:?} differ beyond axis {a}")));
        }
    }
    let outer: usize = shapes[0][..a].iter().product();
    let mut shape = shapes[0].clone();
    shape[a] = shapes.iter().map(|s| s[a]).sum();
    let ints = cs.iter().all(|c| c.as_i64().is_some());
    let (mut fv, mut iv, mut fl) = (Vec::new(), Vec::new(), Vec::new());
    for o in 0..outer {
        for (c, s) in cs.iter().zip(&shapes) {
            let block: usize = s[a..].iter().product();
            let range = o * block..(o + 1) * block;
            if ints {
                iv.extend_from_slice(&c.as_i64().expect("ints")[range.clone()]);
                fl.extend_from_slice(&c.flags()[range]);
            } else {
                fv.extend_from_slice(&c.to_f32()[range]);
            }
        }
    }
    Ok(Const { shape, data: if ints { Data::I64 { v: iv, flags: fl } } else { Data::F32(fv) } })
}

fn fold_binary(cx: &Cx<'_>, op: &str, a: &Const, b: &Const) -> Result<Const> {
    let (shape, n) = if a.shape == b.shape || b.len() == 1 {
        (a.shape.clone(), a.len())
    } else if a.len() == 1 {
        (b.shape.clone(), b.len())
    } else {
        return Err(cx.err(format!(
            "constant inputs of shapes {:?} and {:?}: folded only for equal shapes or a scalar",
            a.shape, b.shape
        )));
    };
    let at = |c: &Const, i: usize| if c.len() == 1 { 0 } else { i };
    match (a.as_i64(), b.as_i64()) {
        (Some(x), Some(y)) => {
            // What follows the batch size or the sequence length still does (`batch * heads`).
            let (fa, fb) = (a.flags(), b.flags());
            let flags: Vec<u8> = (0..n).map(|i| fa[at(a, i)] | fb[at(b, i)]).collect();
            let v: Vec<i64> = (0..n)
                .map(|i| {
                    let (p, q) = (x[at(a, i)], y[at(b, i)]);
                    match op {
                        "Add" | "Sum" => p.checked_add(q),
                        "Sub" => p.checked_sub(q),
                        "Mul" => p.checked_mul(q),
                        _ => p.checked_div(q),
                    }
                    .ok_or_else(|| cx.err(format!("{p} {op} {q} overflows or divides by zero")))
                })
                .collect::<Result<_>>()?;
            Ok(Const { shape, data: Data::I64 { v, flags } })
        }
        _ => {
            let (x, y) = (a.to_f32(), b.to_f32());
            let v = (0..n)
                .map(|i| {
                    let (p, q) = (x[at(a, i)], y[at(b, i)]);
                    match op {
                        "Add" | "Sum" => p + q,
                        "Sub" => p - q,
                        "Mul" => p * q,
                        _ => p / q,
                    }
                })
                .collect();
            Ok(Const::floats(shape, v))
        }
    }
}

/// `c` with a float unary op applied (`Sqrt`, `Neg`, `Reciprocal`); `Neg` keeps integers;
/// `Not` of booleans (held as integers 0 and 1).
fn fold_unary(cx: &Cx<'_>, c: &Const) -> Result<Const> {
    match (cx.op(), c.as_i64()) {
        ("Not", Some(v)) => Ok(Const::ints(c.shape.clone(), v.iter().map(|&a| i64::from(a == 0)).collect())),
        ("Not", None) => Err(cx.err("Not of a float constant (it takes booleans)")),
        ("Neg", Some(v)) => {
            let v = v.iter().map(|&a| a.checked_neg().ok_or_else(|| cx.err(format!("-({a}) overflows"))));
            Ok(Const::ints(c.shape.clone(), v.collect::<Result<_>>()?))
        }
        (op, _) => {
            let f = |a: f32| match op {
                "Sqrt" => a.sqrt(),
                "Neg" => -a,
                _ => 1.0 / a,
            };
            Ok(Const::floats(c.shape.clone(), c.to_f32().into_iter().map(f).collect()))
        }
    }
}

/// NumPy's broadcast of `shapes` (aligned at their last axes).
fn broadcast_shape(cx: &Cx<'_>, shapes: &[&[usize]]) -> Result<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        for (k, &d) in s.iter().enumerate() {
            let o = &mut out[rank - s.len() + k];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(cx.err(format!("shapes {shapes:?} do not broadcast")));
            }
        }
    }
    Ok(out)
}

/// For each element of `out` in row-major order, its flat index in a constant of shape `s`
/// broadcast to `out`.
fn broadcast_order(s: &[usize], out: &[usize]) -> Vec<usize> {
    let strides = row_strides(s);
    let lead = out.len() - s.len();
    let mut order = Vec::with_capacity(out.iter().product());
    for_each_index(out, |ix| {
        order.push(ix[lead..].iter().zip(s).zip(&strides).map(|((&i, &d), &st)| if d == 1 { 0 } else { i * st }).sum())
    });
    order
}

/// `Range` of constant scalars (start, limit, delta): `max(ceil((limit - start) / delta), 0)`
/// values `start + i * delta`, integers or floats as the inputs are. A size that depends on
/// the batch or the sequence length cannot fold.
fn fold_range(cx: &Cx<'_>, cs: &[Const]) -> Result<Const> {
    if let Some(c) = cs.iter().find(|c| c.len() != 1) {
        return Err(cx.err(format!("an input of shape {:?}: Range takes scalars", c.shape)));
    }
    if cs.iter().any(|c| c.flags().iter().any(|&f| f != 0)) {
        return Err(cx.err("its bounds depend on the batch or the sequence length; import with fixed sizes"));
    }
    let too_large = |n: f64| cx.err(format!("{n} values are too many to fold"));
    match (cs[0].as_i64(), cs[1].as_i64(), cs[2].as_i64()) {
        (Some(&[start]), Some(&[limit]), Some(&[delta])) => {
            if delta == 0 {
                return Err(cx.err("delta 0"));
            }
            let n = (i128::from(limit) - i128::from(start)).div_euclid(i128::from(delta))
                + i128::from((i128::from(limit) - i128::from(start)).rem_euclid(i128::from(delta)) != 0);
            let n = n.max(0);
            if n > 1 << 24 {
                return Err(too_large(n as f64));
            }
            let v = (0..n as i64).map(|i| start + i * delta).collect::<Vec<_>>();
            Ok(Const::ints(vec![v.len()], v))
        }
        _ => {
            let [start, limit, delta] = [0, 1, 2].map(|i| cs[i].to_f32()[0]);
            if delta == 0.0 || !(start.is_finite() && limit.is_finite() && delta.is_finite()) {
                return Err(cx.err(format!("start {start}, limit {limit}, delta {delta}")));
            }
            let n = ((limit - start) / delta).ceil().max(0.0);
            if n > (1 << 24) as f32 {
                return Err(too_large(f64::from(n)));
            }
            let v: Vec<f32> = (0..n as usize).map(|i| start + i as f32 * delta).collect();
            Ok(Const::floats(vec![v.len()], v))
        }
    }
}

/// The element-wise ops on constants with NumPy broadcasting: `Mod`, `Equal`, `Less`,
/// `Greater` (1 or 0), `Where` (condition, then, else) and `Expand` (data, shape; the
/// result keeps the data's batch flags).
fn fold_broadcast(cx: &Cx<'_>, cs: &[Const]) -> Result<Const> {
    let op = cx.op();
    let want = if op == "Where" { 3 } else { 2 };
    if cs.len() != want {
        return Err(cx.err(format!("{} inputs; {op} takes {want}", cs.len())));
    }
    if op == "Expand" {
        let target = cs[1].as_i64().ok_or_else(|| cx.err("its shape must be integers"))?;
        let target: Vec<usize> = target
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| cx.err(format!("shape {target:?}"))))
            .collect::<Result<_>>()?;
        let out = broadcast_shape(cx, &[&cs[0].shape, &target])?;
        if out.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 24) {
            return Err(cx.err(format!("expanding {:?} to {out:?} is too large to fold", cs[0].shape)));
        }
        let order = broadcast_order(&cs[0].shape, &out);
        return Ok(pick(&cs[0], out, &order));
    }
    let shapes: Vec<&[usize]> = cs.iter().map(|c| c.shape.as_slice()).collect();
    let out = broadcast_shape(cx, &shapes)?;
    if out.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 24) {
        return Err(cx.err(format!("inputs of shapes {shapes:?} are too large to fold")));
    }
    let orders: Vec<Vec<usize>> = cs.iter().map(|c| broadcast_order(&c.shape, &out)).collect();
    let n = orders[0].len();
    let ints = |c: &Const| c.as_i64().map(<[i64]>::to_vec);
    match op {
        "Where" => {
            let cond = cs[0].to_f32();
            let vals = [&cs[1], &cs[2]];
            let pick_from = |i: usize| if cond[orders[0][i]] != 0.0 { 1 } else { 2 };
            match (ints(vals[0]), ints(vals[1])) {
                (Some(a), Some(b)) => {
                    let (fa, fb) = (vals[0].flags(), vals[1].flags());
                    let (v, flags) = (0..n)
                        .map(|i| {
                            let k = pick_from(i);
                            let j = orders[k][i];
                            if k == 1 {
                                (a[j], fa[j])
                            } else {
                                (b[j], fb[j])
                            }
                        })
                        .unzip();
                    Ok(Const { shape: out, data: Data::I64 { v, flags } })
                }
                _ => {
                    let (a, b) = (vals[0].to_f32(), vals[1].to_f32());
                    let v = (0..n)
                        .map(|i| {
                            let k = pick_from(i);
                            if k == 1 {
                                a[orders[1][i]]
                            } else {
                                b[orders[2][i]]
                            }
                        })
                        .collect();
                    Ok(Const::floats(out, v))
                }
            }
        }
        "Mod" => match (ints(&cs[0]), ints(&cs[1])) {
            (Some(a), Some(b)) => {
                let fmod = cx.int("fmod", 0) != 0;
                let v = (0..n)
                    .map(|i| {
                        let (p, q) = (a[orders[0][i]], b[orders[1][i]]);
                        let r = p.checked_rem(q).ok_or_else(|| cx.err(format!("{p} mod {q} divides by zero")))?;
                        // Without fmod the result takes the divisor's sign (Python's %).
                        Ok(if !fmod && r != 0 && (r < 0) != (q < 0) { r + q } else { r })
                    })
                    .collect::<Result<_>>()?;
                Ok(Const::ints(out, v))
            }
            _ => {
                if cx.int("fmod", 0) == 0 {
                    return Err(cx.err("fmod=0 on floats (the ONNX specification requires fmod=1 there)"));
                }
                let (a, b) = (cs[0].to_f32(), cs[1].to_f32());
                Ok(Const::floats(out, (0..n).map(|i| a[orders[0][i]] % b[orders[1][i]]).collect()))
            }
        },
        "And" | "Or" | "Xor" => match (ints(&cs[0]), ints(&cs[1])) {
            (Some(a), Some(b)) => {
                let v = (0..n)
                    .map(|i| {
                        let (p, q) = (a[orders[0][i]] != 0, b[orders[1][i]] != 0);
                        i64::from(match op {
                            "And" => p && q,
                            "Or" => p || q,
                            _ => p != q,
                        })
                    })
                    .collect();
                Ok(Const::ints(out, v))
            }
            _ => Err(cx.err(format!("{op} of float constants (it takes booleans)"))),
        },
        _ => {
            let cmp = |p: f64, q: f64| match op {
                "Equal" => p == q,
                "Less" => p < q,
                _ => p > q,
            };
            let v = match (ints(&cs[0]), ints(&cs[1])) {
                (Some(a), Some(b)) => {
                    (0..n).map(|i| i64::from(cmp(a[orders[0][i]] as f64, b[orders[1][i]] as f64))).collect()
                }
                _ => {
                    let (a, b) = (cs[0].to_f32(), cs[1].to_f32());
                    (0..n).map(|i| i64::from(cmp(f64::from(a[orders[0][i]]), f64::from(b[orders[1][i]])))).collect()
                }
            };
            Ok(Const::ints(out, v))
        }
    }
}

/// `k` is a float constant holding one image of `x` (`[1, ...]` or without the batch axis,
/// the rest `x`'s, more than one value, not a per-channel vector).
/// `k`'s shape as a constant of one item of `x`: ones in front up to `x`'s rank, the first
/// of them the batch's; `None` unless every other size is `x`'s or 1.
fn image_const_shape(k: &Const, x: &Node) -> Option<Vec<usize>> {
    let pad = x.shape.len().checked_sub(k.shape.len())?;
    let shape: Vec<usize> = std::iter::repeat_n(1, pad).chain(k.shape.iter().copied()).collect();
    let fits = shape.first() == Some(&1) && shape.iter().zip(&x.shape).skip(1).all(|(&a, &b)| a == b || a == 1);
    fits.then_some(shape)
}

fn is_image_const(k: &Const, x: &Node) -> bool {
    let rest = &x.shape[1.min(x.shape.len())..];
    let image = k.shape.len() == x.shape.len() && k.shape.first() == Some(&1) && &k.shape[1..] == rest;
    let unbatched = k.shape.len() + 1 == x.shape.len() && k.shape == rest;
    // Any constant that broadcasts against one item: off images (YOLOv8's anchors and strides,
    // `[1, 2100]` against `[1, 4, 2100]`), and on rank 4 one that varies along the last two
    // axes (a causal mask `[1, 1, s, s]` over attention scores `[n, heads, s, s]`; one value
    // per channel is a depthwise scale instead).
    let broadcast = image_const_shape(k, x).is_some_and(|s| x.shape.len() != 4 || s[2..].iter().any(|&d| d != 1));
    matches!(k.data, Data::F32(_))
        && k.len() > 1
        && x.shape.len() >= 2
        && (image || unbatched || broadcast)
        && x.rows_of.is_none()
        && x.batch_axis.is_none_or(|b| b == 0)
}
