//! The model as a graph: named values, and nodes in topological order, each computing one
//! value from others. Every stage (calibration, conversion, int8 execution, reports, saving)
//! reads this one form.
//!
//! Two ways build one:
//! - the containers ([`Sequential`], [`Residual`], [`Concat`]) lower into it: a container's
//!   layers become nodes named by their paths, as PyTorch's `state_dict` names them;
//! - [`GraphBuilder`] writes any dataflow directly: several inputs and outputs, a tensor read
//!   by any number of nodes, additions, products and concatenations of any two branches.
//!
//! ```
//! use qnn::layers::{Conv2d, ReLU, Sigmoid};
//! use qnn::GraphBuilder;
//! let mut g = GraphBuilder::new();
//! let x = g.input("x");
//! let y = g.layer("conv", Conv2d::new(3, 8, 3).padding(1), x)?;
//! let y = g.layer("relu", ReLU, y)?;
//! let gate = g.layer("gate", Sigmoid, y)?;
//! let z = g.mul("scale", y, gate)?;
//! g.output(z);
//! let graph = g.build()?;
//! let out = graph.run(&[ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 3, 4, 4]))])?;
//! assert_eq!(out[0].shape(), &[1, 8, 4, 4]);
//! # Ok::<(), qnn::NnError>(())
//! ```

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use ndarray::ArrayD;

use crate::error::{NnError, Result};
use crate::layers::Identity;
use crate::module::{cat_dim, join, Concat, FloatKernel, Module, Residual, Sequential};
use crate::ops::add::add_f32;
use crate::ops::mul::mul_f32;

/// The module path a node name stands for: a node for a module's second (third, ...) call
/// is named `path:1` (`path:2`, ...).
pub(crate) fn module_path(node: &str) -> &str {
    match node.rsplit_once(':') {
        Some((path, k)) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) => path,
        _ => node,
    }
}

/// A value of the graph: its index in the graph's value list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tensor(pub(crate) usize);

impl Tensor {
    /// Its index among the graph's values: inputs first, then each node's output in the order
    /// the nodes were added (the position of its entry in [`Graph::value_info`]).
    pub fn index(self) -> usize {
        self.0
    }
}

/// What a node computes.
#[derive(Debug)]
pub(crate) enum NodeOp<M> {
    /// A layer on one input.
    Layer(M),
    /// The sum of two values whose shapes broadcast as NumPy's do (PyTorch's
    /// `FloatFunctional().add`, a residual; an attention mask).
    Add,
    /// The product of two values whose shapes broadcast as NumPy's do (`[n, c, 1, 1]`
    /// against `[n, c, h, w]`: squeeze-and-excitation).
    Mul,
    /// The values concatenated along this dimension (1: channels or features).
    Cat(usize),
    /// The matrix product of two values, `[.., m, k] x [.., k, n]`, batch axes broadcast.
    MatMul,
}

impl<M> NodeOp<M> {
    /// The kind the configuration and the plan use.
    pub(crate) fn kind_with(&self, layer: impl FnOnce(&M) -> &'static str) -> &'static str {
        match self {
            NodeOp::Layer(m) => layer(m),
            NodeOp::Add => "add",
            NodeOp::Mul => "mul",
            NodeOp::Cat(_) => "cat",
            NodeOp::MatMul => "matmul",
        }
    }
}

/// One node: its name (a module path, unique), what it computes, from which values, into
/// which value.
#[derive(Debug)]
pub(crate) struct Node<M> {
    pub(crate) name: String,
    pub(crate) op: NodeOp<M>,
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) output: Tensor,
}

/// A float model as a graph (see the [module docs](self)). `M` is how nodes hold their
/// layers: owned (`Box<dyn Module>`, the default) or borrowed from containers.
#[derive(Debug)]
pub struct Graph<M = Box<dyn Module>> {
    pub(crate) values: usize,
    pub(crate) nodes: Vec<Node<M>>,
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) outputs: Vec<Tensor>,
    /// The graph inputs' names, one per input.
    pub(crate) input_names: Vec<String>,
    /// The one batch size the graph takes, when it takes no other (a model exported with its
    /// batch written into its reshapes): more items run in chunks of it.
    pub(crate) batch: Option<usize>,
    /// The layers' float kernels, prepared by the first [`Graph::run`] (or `forward`) and
    /// dropped by anything that can change a layer: every `&mut self` method.
    pub(crate) float: FloatCache,
}

/// Every node's prepared float computation ([`Module::float_kernel`]), `None` for nodes
/// that have none.
pub(crate) type FloatKernels = Vec<Option<Arc<dyn FloatKernel>>>;

/// A graph's [`FloatKernels`], once prepared.
#[derive(Default)]
pub(crate) struct FloatCache(OnceLock<Arc<FloatKernels>>);

impl std::fmt::Debug for FloatCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FloatCache({})", if self.0.get().is_some() { "prepared" } else { "empty" })
    }
}

/// How a value's elements lie in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[n, c, h, w]` in that order (PyTorch's layout; every float image).
    Nchw,
    /// The logical `[n, c, h, w]` stored as `[n, h, w, c]` (every int8 image: the kernels'
    /// layout).
    Nhwc,
    /// Row-major in the logical order (every value that is not an image).
    RowMajor,
}

/// A value's elements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ElemType {
    /// `f32`.
    F32,
    /// `u8` with these parameters.
    U8(qkernels::QuantU8),
}

/// What a value of a graph is: its name (the graph input's, or the node's that computes it),
/// logical shape, element type and layout.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    /// The name.
    pub name: String,
    /// The logical shape (NCHW for images).
    pub shape: Vec<usize>,
    /// The elements.
    pub dtype: ElemType,
    /// The layout in memory.
    pub layout: Layout,
}

/// The layout of a value of `shape` holding `dtype`: images are NCHW in float and NHWC in
/// int8, everything else row-major. Every op reads and writes values in this layout.
pub(crate) fn layout_of(shape: &[usize], dtype: ElemType) -> Layout {
    match (shape.len(), dtype) {
        (4, ElemType::F32) => Layout::Nchw,
        (4, ElemType::U8(_)) => Layout::Nhwc,
        _ => Layout::RowMajor,
    }
}

/// How many nodes read each value, counting a graph output as one more reader.
pub(crate) fn readers<M>(g: &Graph<M>) -> Vec<usize> {
    let mut uses = vec![0usize; g.values];
    for n in &g.nodes {
        for i in &n.inputs {
            uses[i.0] += 1;
        }
    }
    for o in &g.outputs {
        uses[o.0] += 1;
    }
    uses
}

/// Checks the graph's invariants: every value is produced once (by an input or a node)
/// before it is read, names are unique and non-empty, and there is at least one output.
/// Saved models are checked with it too, so the messages name what is wrong (each op's
/// number of inputs is the builder's and the loader's to check).
pub(crate) fn check<M>(values: usize, nodes: &[Node<M>], inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let bad = |reason: String| NnError::Graph { reason };
    let mut defined = vec![false; values];
    for t in inputs {
        if t.0 >= values || std::mem::replace(&mut defined[t.0], true) {
            return Err(bad(format!("graph input {} is out of range or given twice", t.0)));
        }
    }
    let mut names = HashSet::new();
    for n in nodes {
        if n.name.is_empty() || !names.insert(n.name.as_str()) {
            return Err(bad(format!("node name '{}' is empty or not unique: names are module paths", n.name)));
        }
        if let Some(t) = n.inputs.iter().find(|t| t.0 >= values || !defined[t.0]) {
            return Err(bad(format!(
                "node '{}' reads value {} before any node computes it (nodes must be in topological order)",
                n.name, t.0
            )));
        }
        if n.output.0 >= values || std::mem::replace(&mut defined[n.output.0], true) {
            return Err(bad(format!(
                "node '{}' writes value {}, which is out of range or written twice",
                n.name, n.output.0
            )));
        }
    }
    if outputs.is_empty() {
        return Err(bad("the graph has no output: mark one with GraphBuilder::output".into()));
    }
    if let Some(t) = outputs.iter().find(|t| t.0 >= values || !defined[t.0]) {
        return Err(bad(format!("graph output {} is never computed", t.0)));
    }
    Ok(())
}

impl<M> Graph<M> {
    /// Node names in execution order.
    pub fn node_names(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    /// How many inputs the graph takes.
    pub fn num_inputs(&self) -> usize {
        self.inputs.len()
    }

    /// How many outputs it gives.
    pub fn num_outputs(&self) -> usize {
        self.outputs.len()
    }

    /// The one batch size the graph takes, if it takes no other (see
    /// [`Graph::set_fixed_batch`]).
    pub fn fixed_batch(&self) -> Option<usize> {
        self.batch
    }

    /// The same graph with every layer mapped by `f` (in node order).
    pub(crate) fn map_layers<N>(self, mut f: impl FnMut(M) -> N) -> Graph<N> {
        Graph {
            values: self.values,
            nodes: self
                .nodes
                .into_iter()
                .map(|n| Node {
                    name: n.name,
                    op: match n.op {
                        NodeOp::Layer(m) => NodeOp::Layer(f(m)),
                        NodeOp::Add => NodeOp::Add,
                        NodeOp::Mul => NodeOp::Mul,
                        NodeOp::Cat(d) => NodeOp::Cat(d),
                        NodeOp::MatMul => NodeOp::MatMul,
                    },
                    inputs: n.inputs,
                    output: n.output,
                })
                .collect(),
            inputs: self.inputs,
            outputs: self.outputs,
            input_names: self.input_names,
            batch: self.batch,
            float: FloatCache::default(),
        }
    }
}

/// Anything that runs a layer in float: an owned or a borrowed module.
pub(crate) trait AsModule {
    fn module(&self) -> &dyn Module;
}

impl AsModule for Box<dyn Module> {
    fn module(&self) -> &dyn Module {
        self.as_ref()
    }
}

/// A layer borrowed from a container tree, or the ReLU a residual block names but holds no
/// module for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LayerRef<'a> {
    Tree(&'a dyn Module),
    BlockRelu,
}

impl AsModule for LayerRef<'_> {
    fn module(&self) -> &dyn Module {
        match self {
            LayerRef::Tree(m) => *m,
            LayerRef::BlockRelu => &crate::layers::ReLU,
        }
    }
}

/// The output shape of node `n` for inputs of `shapes`.
fn node_shape(n: &Node<Box<dyn Module>>, shapes: &[&[usize]]) -> Result<Vec<usize>> {
    let err = |kind: &'static str, expected: String, got: &[usize]| NnError::Shape {
        module: String::new(),
        kind,
        expected,
        got: got.to_vec(),
    };
    match &n.op {
        NodeOp::Layer(m) => match m.output_shape(shapes[0]) {
            Some(s) => s,
            None => {
                let y = m.forward(&ArrayD::zeros(ndarray::IxDyn(shapes[0])))?;
                Ok(y.shape().to_vec())
            }
        },
        NodeOp::Add | NodeOp::Mul => crate::ops::mul::broadcast_shape(shapes[0], shapes[1]).ok_or_else(|| {
            err(
                if matches!(n.op, NodeOp::Add) { "add" } else { "mul" },
                format!(
                    "a second operand whose shape broadcasts against the first's {:?} (equal sizes, or 1, aligned at \
                     the last axis)",
                    shapes[0]
                ),
                shapes[1],
            )
        }),
        NodeOp::MatMul => crate::ops::matmul::matmul_shape(shapes[0], shapes[1]).ok_or_else(|| {
            err(
                "matmul",
                format!(
                    "a right operand [.., {}, n] for the left one {:?} (rank 2 or more, batch axes equal, 1 or \
                     missing)",
                    shapes[0].last().copied().unwrap_or(0),
                    shapes[0]
                ),
                shapes[1],
            )
        }),
        NodeOp::Cat(dim) => {
            let (first, d) = (shapes[0], *dim);
            let fits = |s: &[usize]| {
                s.len() == first.len()
                    && d < s.len()
                    && s.iter().zip(first).enumerate().all(|(i, (a, b))| i == d || a == b)
            };
            match shapes.iter().find(|s| !fits(s)) {
                Some(bad) => Err(err(
                    "cat",
                    format!("tensors of rank above {d} that differ only in dimension {d}; the first is {first:?}"),
                    bad,
                )),
                None => {
                    let mut s = first.to_vec();
                    s[d] = shapes.iter().map(|s| s[d]).sum();
                    Ok(s)
                }
            }
        }
    }
}

/// Runs one node in float.
pub(crate) fn node_forward<M: AsModule>(n: &Node<M>, xs: &[&ArrayD<f32>]) -> Result<ArrayD<f32>> {
    match &n.op {
        NodeOp::Layer(m) => m.module().forward(xs[0]).map_err(|e| e.within(&n.name)),
        NodeOp::Add => add_f32(xs[0], xs[1], &n.name),
        NodeOp::Mul => mul_f32(xs[0], xs[1], &n.name),
        NodeOp::Cat(dim) => cat_dim(xs, *dim, &n.name),
        NodeOp::MatMul => crate::ops::matmul::matmul_f32(xs[0], xs[1], &n.name, 1),
    }
}

#[allow(private_bounds)]
impl<M: AsModule> Graph<M> {
    /// Runs the graph in float, calling `seen(node index, output)` after every node (which
    /// may change the output: simulation quantizes it); values are dropped as soon as their
    /// last reader is done.
    pub(crate) fn run_f32(
        &self,
        inputs: &[ArrayD<f32>],
        kernels: Option<(&FloatKernels, usize)>,
        seen: impl FnMut(usize, &mut ArrayD<f32>) -> Result<()>,
    ) -> Result<Vec<ArrayD<f32>>> {
        self.run_f32_with(inputs, kernels, |_, _| Ok(None), seen)
    }

    /// Every layer's prepared float computation ([`Module::float_kernel`]).
    ///
    /// # Errors
    /// A layer that cannot prepare (the error names it).
    pub(crate) fn float_kernels(&self) -> Result<FloatKernels> {
        self.nodes
            .iter()
            .map(|n| match &n.op {
                NodeOp::Layer(m) => m.module().float_kernel().transpose().map_err(|e| e.within(&n.name)),
                _ => Ok(None),
            })
            .collect()
    }

    /// [`Graph::run_f32`] where `first(i, x)` may replace node `i`'s first input `x` for that
    /// node alone (other readers of the value see it unchanged). With `kernels` (from
    /// [`Graph::float_kernels`] of this graph, unchanged since, and a thread count), layers
    /// run their prepared kernels.
    pub(crate) fn run_f32_with(
        &self,
        inputs: &[ArrayD<f32>],
        kernels: Option<(&FloatKernels, usize)>,
        mut first: impl FnMut(usize, &ArrayD<f32>) -> Result<Option<ArrayD<f32>>>,
        mut seen: impl FnMut(usize, &mut ArrayD<f32>) -> Result<()>,
    ) -> Result<Vec<ArrayD<f32>>> {
        if inputs.len() != self.inputs.len() {
            return Err(NnError::Shape {
                module: "(model input)".into(),
                kind: "graph",
                expected: format!("{} input tensors, one per graph input", self.inputs.len()),
                got: vec![inputs.len()],
            });
        }
        let mut left = readers(self);
        let mut vals: Vec<Option<ArrayD<f32>>> = (0..self.values).map(|_| None).collect();
        for (t, x) in self.inputs.iter().zip(inputs) {
            vals[t.0] = Some(x.clone());
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let replaced = first(i, vals[n.inputs[0].0].as_ref().expect("checked: computed before read"))?;
            let kernel = kernels.and_then(|(k, threads)| k[i].as_ref().map(|k| (k, threads)));
            // This node alone still needs its first input (read once, and no graph output):
            // element-wise layers and additions may write their result into its buffer.
            let first_is_spare = replaced.is_none()
                && kernel.is_none()
                && left[n.inputs[0].0] == 1
                && n.inputs.iter().filter(|t| **t == n.inputs[0]).count() == 1;
            let mut y = match &n.op {
                NodeOp::Layer(m) if first_is_spare && n.inputs.len() == 1 => {
                    let x = vals[n.inputs[0].0].take().expect("checked: computed before read");
                    m.module().forward_owned(x).map_err(|e| e.within(&n.name))?
                }
                NodeOp::Add if first_is_spare && n.inputs.len() == 2 => {
                    let a = vals[n.inputs[0].0].take().expect("checked: computed before read");
                    let b = vals[n.inputs[1].0].as_ref().expect("checked: computed before read");
                    crate::ops::add::add_f32_into(a, b, &n.name)?
                }
                _ => {
                    let mut xs: Vec<&ArrayD<f32>> =
                        n.inputs.iter().map(|t| vals[t.0].as_ref().expect("checked: computed before read")).collect();
                    if let Some(x) = &replaced {
                        xs[0] = x;
                    }
                    match kernel {
                        Some((k, threads)) => k.forward(xs[0], threads).map_err(|e| e.within(&n.name))?,
                        None => node_forward(n, &xs)?,
                    }
                }
            };
            seen(i, &mut y)?;
            for t in &n.inputs {
                left[t.0] -= 1;
                if left[t.0] == 0 {
                    // Its buffer goes back to the float pool for a later layer's output.
                    if let Some(done) = vals[t.0].take() {
                        crate::scratch::give_f32(done.into_raw_vec_and_offset().0);
                    }
                }
            }
            vals[n.output.0] = Some(y);
        }
        // Outputs in PyTorch's memory order (float convolutions hand theirs on in NHWC order).
        Ok(self
            .outputs
            .iter()
            .map(|t| {
                let y = vals[t.0].as_ref().expect("checked: outputs are computed");
                if y.is_standard_layout() {
                    y.clone()
                } else {
                    y.as_standard_layout().into_owned()
                }
            })
            .collect())
    }
}

impl Graph {
    /// Each node's name and kind (a layer's [`Module::kind`], or `add`, `mul`, `cat`), in
    /// execution order: the kinds `QConfigMapping::set_kind` matches.
    pub fn node_kinds(&self) -> Vec<(&str, &'static str)> {
        self.nodes.iter().map(|n| (n.name.as_str(), n.op.kind_with(|m| m.kind()))).collect()
    }

    /// Every value's name, shape, element type (`f32`) and layout for inputs of
    /// `input_shapes` (shape inference: each layer's [`Module::output_shape`], or a run on zeros
    /// for a layer that does not say), inputs first, then the nodes' outputs in order.
    ///
    /// # Errors
    /// A wrong number of input shapes, or a shape a node cannot take (the error names it).
    pub fn value_info(&self, input_shapes: &[&[usize]]) -> Result<Vec<ValueInfo>> {
        if input_shapes.len() != self.inputs.len() {
            return Err(NnError::Shape {
                module: "(model input)".into(),
                kind: "graph",
                expected: format!("{} input shapes, one per graph input", self.inputs.len()),
                got: vec![input_shapes.len()],
            });
        }
        let mut shapes: Vec<Option<Vec<usize>>> = vec![None; self.values];
        let mut out = Vec::with_capacity(self.values);
        let info = |name: &str, shape: Vec<usize>| ValueInfo {
            name: name.to_string(),
            layout: layout_of(&shape, ElemType::F32),
            shape,
            dtype: ElemType::F32,
        };
        for ((t, s), name) in self.inputs.iter().zip(input_shapes).zip(&self.input_names) {
            shapes[t.0] = Some(s.to_vec());
            out.push(info(name, s.to_vec()));
        }
        for n in &self.nodes {
            let ins: Vec<&[usize]> =
                n.inputs.iter().map(|t| shapes[t.0].as_deref().expect("checked: computed before read")).collect();
            let s = node_shape(n, &ins).map_err(|e| e.within(&n.name))?;
            shapes[n.output.0] = Some(s.clone());
            out.push(info(&n.name, s));
        }
        Ok(out)
    }

    /// Makes node `node`'s output a graph output too (after the existing ones): to read an
    /// intermediate tensor from the float graph or, once converted, from the int8 model.
    ///
    /// # Errors
    /// No node of that name (with the nearest names).
    pub fn add_output(&mut self, node: &str) -> Result<()> {
        self.touch();
        let Some(n) = self.nodes.iter().find(|n| n.name == node) else {
            let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
            return Err(NnError::UnknownModule {
                name: node.to_string(),
                suggestions: crate::fuse::nearest(node, &names),
            });
        };
        self.outputs.push(n.output);
        Ok(())
    }

    /// Runs the graph in float on one array per input; one array per output. The first run
    /// prepares every layer's float kernels ([`Module::float_kernel`]: packed weights), which
    /// the graph keeps until something could change a layer (any `&mut self` method).
    ///
    /// # Errors
    /// A wrong number of inputs, or an input a node cannot take (the message names it).
    pub fn run(&self, inputs: &[ArrayD<f32>]) -> Result<Vec<ArrayD<f32>>> {
        let kernels = match self.float.0.get() {
            Some(k) => k.clone(),
            None => {
                let k = Arc::new(self.float_kernels()?);
                self.float.0.get_or_init(|| k).clone()
            }
        };
        match chunks(self.batch, inputs)? {
            None => self.run_f32(inputs, Some((&kernels, 1)), |_, _| Ok(())),
            Some(parts) => {
                let mut outs = Vec::with_capacity(parts.len());
                for range in parts {
                    let xs: Vec<ArrayD<f32>> = inputs
                        .iter()
                        .map(|x| x.slice_axis(ndarray::Axis(0), range.clone().into()).to_owned())
                        .collect();
                    outs.push(self.run_f32(&xs, Some((&kernels, 1)), |_, _| Ok(()))?);
                }
                (0..self.outputs.len())
                    .map(|k| {
                        let views: Vec<_> = outs.iter().map(|o| o[k].view()).collect();
                        ndarray::concatenate(ndarray::Axis(0), &views).map_err(|_| NnError::Shape {
                            module: "(model output)".into(),
                            kind: "graph",
                            expected: format!(
                                "output {k} of each chunk of {} items with the same shape past its first axis, to \
                                 join the chunks",
                                self.batch.unwrap_or(0)
                            ),
                            got: outs[0][k].shape().to_vec(),
                        })
                    })
                    .collect()
            }
        }
    }

    /// Declares that the graph takes batches of exactly `batch` items (`None`: any batch), as
    /// a model exported with its batch written into its reshapes does. [`Graph::run`], and the
    /// converted model's runs, then take any multiple of it, run in chunks of `batch` items
    /// whose outputs are joined along the first axis; other counts are an error that says so.
    /// The converted model keeps it, and saves it.
    ///
    /// # Errors
    /// A batch of 0.
    pub fn set_fixed_batch(&mut self, batch: Option<usize>) -> Result<()> {
        if batch == Some(0) {
            return Err(NnError::Config {
                module: "Graph::set_fixed_batch".into(),
                reason: "a batch of 0 items; give at least 1, or None for any batch".into(),
            });
        }
        self.batch = batch;
        Ok(())
    }

    /// Drops the prepared float kernels: a layer may change.
    pub(crate) fn touch(&mut self) {
        self.float = FloatCache::default();
    }
}

/// The ranges of items to run one at a time for a graph whose batch is fixed at `batch`,
/// given `inputs` of another batch (`None`: run them as they are).
///
/// # Errors
/// Inputs that do not hold the same number of items, or not a multiple of `batch`.
pub(crate) fn chunks(batch: Option<usize>, inputs: &[ArrayD<f32>]) -> Result<Option<Vec<std::ops::Range<usize>>>> {
    let Some(b) = batch else { return Ok(None) };
    let items = |x: &ArrayD<f32>| x.shape().first().copied().unwrap_or(0);
    let Some(n) = inputs.first().map(items) else { return Ok(None) };
    if n == b {
        return Ok(None);
    }
    if n == 0 || !n.is_multiple_of(b) || inputs.iter().any(|x| items(x) != n) {
        return Err(NnError::Shape {
            module: "(model input)".into(),
            kind: "graph",
            expected: format!(
                "inputs of a multiple of {b} item(s), all of the same count: the model's batch is fixed at {b} (its \
                 graph takes no other size, and runs more items {b} at a time); give a multiple of {b}, or export \
                 the model with a symbolic batch dimension"
            ),
            got: inputs.iter().map(items).collect(),
        });
    }
    Ok(Some((0..n).step_by(b).map(|s| s..s + b).collect()))
}

/// A graph is a module too: its layers are its children under their node names, so
/// `state_dict`s load into it ([`crate::load_safetensors`]) and write from it; as a layer of a
/// container it runs as one float module (one input and one output).
impl Module for Graph {
    fn kind(&self) -> &'static str {
        "Graph"
    }

    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        if self.inputs.len() != 1 || self.outputs.len() != 1 {
            return Err(NnError::Shape {
                module: String::new(),
                kind: "Graph",
                expected: format!(
                    "one input for a graph of one input and one output (this one has {} and {}): use Graph::run",
                    self.inputs.len(),
                    self.outputs.len()
                ),
                got: x.shape().to_vec(),
            });
        }
        Ok(self.run(std::slice::from_ref(x))?.swap_remove(0))
    }

    fn children(&self) -> Vec<(&str, &dyn Module)> {
        self.nodes
            .iter()
            .filter_map(|n| match &n.op {
                NodeOp::Layer(m) => Some((n.name.as_str(), m.as_ref())),
                _ => None,
            })
            .collect()
    }

    fn children_mut(&mut self) -> Vec<(&str, &mut dyn Module)> {
        self.touch();
        self.nodes
            .iter_mut()
            .filter_map(|n| match &mut n.op {
                NodeOp::Layer(m) => Some((n.name.as_str(), m.as_mut() as &mut dyn Module)),
                _ => None,
            })
            .collect()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self.touch();
        self
    }
}

/// The layers of a container tree as graph nodes, borrowed, in execution order: the form
/// every stage reads a [`Sequential`] in.
pub(crate) fn view(model: &Sequential) -> Graph<LayerRef<'_>> {
    let mut b = Lowering { values: 1, nodes: Vec::new(), names: HashSet::new() };
    let out = b.sequential(model, "", Tensor(0));
    Graph {
        values: b.values,
        nodes: b.nodes,
        inputs: vec![Tensor(0)],
        outputs: vec![out],
        input_names: vec!["input".into()],
        batch: None,
        float: FloatCache::default(),
    }
}

struct Lowering<'a> {
    values: usize,
    nodes: Vec<Node<LayerRef<'a>>>,
    names: HashSet<String>,
}

impl<'a> Lowering<'a> {
    fn node(&mut self, name: String, op: NodeOp<LayerRef<'a>>, inputs: Vec<Tensor>) -> Tensor {
        // A module a container calls twice (torchvision's basic block applies its `relu`
        // after the first convolution and after the addition) is one node per call; the
        // second is `name:1`, and so on, and configurations naming the module reach each.
        let name = if self.names.contains(&name) {
            (1..).map(|k| format!("{name}:{k}")).find(|n| !self.names.contains(n)).expect("a free call number")
        } else {
            name
        };
        self.names.insert(name.clone());
        let output = Tensor(self.values);
        self.values += 1;
        self.nodes.push(Node { name, op, inputs, output });
        output
    }

    fn sequential(&mut self, seq: &'a Sequential, prefix: &str, mut x: Tensor) -> Tensor {
        for (name, m) in seq.layers() {
            x = self.module(m.as_ref(), &join(prefix, name), x);
        }
        x
    }

    fn module(&mut self, m: &'a dyn Module, path: &str, x: Tensor) -> Tensor {
        let a = m.as_any();
        if let Some(inner) = a.downcast_ref::<Sequential>() {
            self.sequential(inner, path, x)
        } else if let Some(res) = a.downcast_ref::<Residual>() {
            // The body's layers are named directly under the block, as torchvision does.
            let body = self.sequential(&res.body, path, x);
            let short = match &res.shortcut {
                Some((sname, s)) => self.sequential(s, &join(path, sname), x),
                None => x,
            };
            let sum = self.node(join(path, &res.add_name), NodeOp::Add, vec![body, short]);
            match &res.relu {
                Some(r) => self.node(join(path, r), NodeOp::Layer(LayerRef::BlockRelu), vec![sum]),
                None => sum,
            }
        } else if let Some(cat) = a.downcast_ref::<Concat>() {
            let parts = cat.branches.iter().map(|(bn, b)| self.sequential(b, &join(path, bn), x)).collect();
            self.node(join(path, &cat.cat_name), NodeOp::Cat(1), parts)
        } else {
            self.node(path.to_string(), NodeOp::Layer(LayerRef::Tree(m)), vec![x])
        }
    }
}

/// Moves a container tree's layers into an owned graph (the containers keep `Identity`s).
pub(crate) fn lower(mut model: Sequential) -> Graph {
    let skeleton = view(&model).map_layers(|m| matches!(m, LayerRef::BlockRelu));
    let mut owned: Vec<Box<dyn Module>> = Vec::new();
    take_layers(&mut model, &mut owned);
    let mut owned = owned.into_iter();
    skeleton.map_layers(|block_relu| {
        if block_relu {
            Box::new(crate::layers::ReLU) as Box<dyn Module>
        } else {
            owned.next().expect("one owned layer per borrowed one, in the same order")
        }
    })
}

/// Moves every leaf layer out of the tree, depth first in [`view`]'s order.
fn take_layers(seq: &mut Sequential, out: &mut Vec<Box<dyn Module>>) {
    for (_, m) in seq.layers_mut() {
        let a = m.as_any_mut();
        if let Some(inner) = a.downcast_mut::<Sequential>() {
            take_layers(inner, out);
        } else if let Some(res) = a.downcast_mut::<Residual>() {
            take_layers(&mut res.body, out);
            if let Some((_, s)) = &mut res.shortcut {
                take_layers(s, out);
            }
        } else if let Some(cat) = a.downcast_mut::<Concat>() {
            for (_, b) in &mut cat.branches {
                take_layers(b, out);
            }
        } else {
            out.push(std::mem::replace(m, Box::new(Identity)));
        }
    }
}

impl From<Sequential> for Graph {
    fn from(model: Sequential) -> Graph {
        lower(model)
    }
}

/// Writes a graph node by node (see the [module docs](self)). Names are module paths: a
/// layer's parameters load from `state_dict` entries `<name>.<parameter>`.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    values: usize,
    nodes: Vec<Node<Box<dyn Module>>>,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
    input_names: Vec<String>,
}

impl GraphBuilder {
    /// An empty graph.
    pub fn new() -> Self {
        GraphBuilder::default()
    }

    fn value(&mut self) -> Tensor {
        self.values += 1;
        Tensor(self.values - 1)
    }

    /// A new graph input (inputs are passed in the order they were declared).
    pub fn input(&mut self, name: &str) -> Tensor {
        let t = self.value();
        self.inputs.push(t);
        self.input_names.push(name.to_string());
        t
    }

    fn push(&mut self, name: &str, op: NodeOp<Box<dyn Module>>, inputs: Vec<Tensor>) -> Result<Tensor> {
        if let Some(t) = inputs.iter().find(|t| t.0 >= self.values) {
            return Err(NnError::Graph { reason: format!("node '{name}': tensor {} is not of this graph", t.0) });
        }
        if name.is_empty() || self.nodes.iter().any(|n| n.name == name) {
            return Err(NnError::Graph {
                reason: format!("node name '{name}' is empty or taken: every node needs its own name"),
            });
        }
        let output = self.value();
        self.nodes.push(Node { name: name.to_string(), op, inputs, output });
        Ok(output)
    }

    /// A layer (any [`Module`], your own included) on `x`.
    ///
    /// # Errors
    /// A name already used, or a tensor of another graph.
    pub fn layer(&mut self, name: &str, m: impl Module + 'static, x: Tensor) -> Result<Tensor> {
        self.push(name, NodeOp::Layer(Box::new(m)), vec![x])
    }

    /// A boxed layer on `x`.
    ///
    /// # Errors
    /// As [`GraphBuilder::layer`].
    pub fn boxed(&mut self, name: &str, m: Box<dyn Module>, x: Tensor) -> Result<Tensor> {
        self.push(name, NodeOp::Layer(m), vec![x])
    }

    /// A container's layers on `x`, named under `prefix` (`""` for none) as in a tree.
    ///
    /// # Errors
    /// A name already used.
    pub fn sequential(&mut self, prefix: &str, seq: Sequential, x: Tensor) -> Result<Tensor> {
        let sub = lower(Sequential::new().add(prefix.to_string(), seq));
        let mut map = vec![x; sub.values];
        for n in sub.nodes {
            let inputs = n.inputs.iter().map(|t| map[t.0]).collect();
            map[n.output.0] = self.push(&n.name, n.op, inputs)?;
        }
        Ok(map[sub.outputs[0].0])
    }

    /// `a + b` (one shape, one of them `[n, c, 1, 1]` added to every pixel of the other's
    /// channel, or any shapes that broadcast as NumPy's do; PyTorch's
    /// `FloatFunctional().add`), in int8 where configured.
    ///
    /// # Errors
    /// As [`GraphBuilder::layer`].
    pub fn add(&mut self, name: &str, a: Tensor, b: Tensor) -> Result<Tensor> {
        self.push(name, NodeOp::Add, vec![a, b])
    }

    /// `a * b`: one shape, one of them of shape `[n, c, 1, 1]` scaling each channel of the
    /// other (squeeze-and-excitation), or any shapes that broadcast as NumPy's do.
    ///
    /// # Errors
    /// As [`GraphBuilder::layer`].
    pub fn mul(&mut self, name: &str, a: Tensor, b: Tensor) -> Result<Tensor> {
        self.push(name, NodeOp::Mul, vec![a, b])
    }

    /// `torch.matmul(a, b)` of two computed values: `[.., m, k] x [.., k, n]`, the batch axes
    /// broadcast (equal, 1, or missing on one side); both of rank 2 or more. In int8 where
    /// configured (kind `"matmul"`), `b` packed at run time.
    ///
    /// # Errors
    /// As [`GraphBuilder::layer`].
    pub fn matmul(&mut self, name: &str, a: Tensor, b: Tensor) -> Result<Tensor> {
        self.push(name, NodeOp::MatMul, vec![a, b])
    }

    /// The tensors concatenated along dimension 1 (channels, or features).
    ///
    /// # Errors
    /// As [`GraphBuilder::layer`], or no tensors.
    pub fn cat(&mut self, name: &str, parts: &[Tensor]) -> Result<Tensor> {
        if parts.is_empty() {
            return Err(NnError::Graph { reason: format!("node '{name}': cat needs at least one tensor") });
        }
        self.cat_dim(name, parts, 1)
    }

    /// The tensors concatenated along dimension `dim` (`torch.cat(parts, dim)`; ONNX
    /// `Concat`). Along dimension 1 it runs in int8 on images as on features; along others,
    /// in int8, each part is dequantized and the whole quantized once.
    ///
    /// # Errors
    /// As [`GraphBuilder::layer`], or no tensors.
    pub fn cat_dim(&mut self, name: &str, parts: &[Tensor], dim: usize) -> Result<Tensor> {
        if parts.is_empty() {
            return Err(NnError::Graph { reason: format!("node '{name}': cat needs at least one tensor") });
        }
        self.push(name, NodeOp::Cat(dim), parts.to_vec())
    }

    /// `torch.chunk(x, chunks, dim)`: one [`crate::layers::Slice`] node per piece, named
    /// `name.0`, `name.1`, ... (an axis too short for `chunks` pieces is an error when the
    /// graph runs).
    ///
    /// # Errors
    /// No chunks, or a name in use.
    pub fn chunk(&mut self, name: &str, x: Tensor, chunks: usize, dim: i64) -> Result<Vec<Tensor>> {
        if chunks == 0 {
            return Err(NnError::Graph { reason: format!("node '{name}': chunk needs at least one piece") });
        }
        (0..chunks)
            .map(|index| {
                let s = crate::layers::Slice { dim, range: crate::layers::SliceRange::Chunk { chunks, index } };
                self.layer(&format!("{name}.{index}"), s, x)
            })
            .collect()
    }

    /// `torch.split(x, sizes, dim)`: one [`crate::layers::Slice`] node per size, named
    /// `name.0`, `name.1`, ... (pieces reaching past the axis are an error when the graph
    /// runs).
    ///
    /// # Errors
    /// No sizes, or a name in use.
    pub fn split(&mut self, name: &str, x: Tensor, sizes: &[usize], dim: i64) -> Result<Vec<Tensor>> {
        if sizes.is_empty() {
            return Err(NnError::Graph { reason: format!("node '{name}': split needs at least one size") });
        }
        let mut start = 0usize;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let s = crate::layers::Slice::narrow(dim, start, len);
                start += len;
                self.layer(&format!("{name}.{i}"), s, x)
            })
            .collect()
    }

    /// Marks `t` as a graph output (outputs are returned in the order they were marked).
    pub fn output(&mut self, t: Tensor) {
        self.outputs.push(t);
    }

    /// The finished graph.
    ///
    /// # Errors
    /// No output marked.
    pub fn build(self) -> Result<Graph> {
        check(self.values, &self.nodes, &self.inputs, &self.outputs)?;
        Ok(Graph {
            values: self.values,
            nodes: self.nodes,
            inputs: self.inputs,
            outputs: self.outputs,
            input_names: self.input_names,
            batch: None,
            float: FloatCache::default(),
        })
    }
}
