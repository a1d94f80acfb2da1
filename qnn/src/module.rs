//! The float model: the [`Module`] trait, and [`Sequential`], the container that names its
//! children as PyTorch does (`layer1.0.conv1`).

use std::any::Any;
use std::borrow::Borrow;
use std::fmt::Debug;

use ndarray::ArrayD;

use crate::error::Result;
use crate::ops::{LowerCx, OpWriter, QOp};
use crate::quant::Mode;

/// A layer's float computation with what does not depend on the input prepared once (see
/// [`Module::float_kernel`]).
pub trait FloatKernel: Send + Sync + std::fmt::Debug {
    /// The layer's output for `x`, bit for bit what its [`Module::forward`] gives, on
    /// `threads` threads (the result does not depend on the count).
    ///
    /// # Errors
    /// An input the layer cannot take, as `forward` reports it.
    fn forward(&self, x: &ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>>;

    /// [`FloatKernel::forward`] of a value the caller gives away: kernels that can work in
    /// place do; by default its buffer returns to the float pool.
    ///
    /// # Errors
    /// As [`FloatKernel::forward`].
    fn forward_owned(&self, x: ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        let y = self.forward(&x, threads)?;
        crate::scratch::recycle_f32(x);
        Ok(y)
    }
}

/// A layer or a container of layers, run in `f32` on NCHW tensors (PyTorch's layout).
///
/// Implement it for your own layers: `forward` is the float computation; `tensors` /
/// `tensors_mut` expose the parameters under their state-dict names (`"weight"`, `"bias"`),
/// so weights saved from PyTorch load into them.
pub trait Module: Send + Sync + Debug {
    /// The type's name, as PyTorch's class name (`"Conv2d"`), for messages and reports.
    fn kind(&self) -> &'static str;

    /// The float forward pass.
    ///
    /// # Errors
    /// An input this module cannot take; the message names the module and the shapes.
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>>;

    /// Named sub-modules, in order (containers only).
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        Vec::new()
    }

    /// Named sub-modules, mutably.
    fn children_mut(&mut self) -> Vec<(&str, &mut dyn Module)> {
        Vec::new()
    }

    /// This module's own parameters and buffers, by state-dict name.
    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        Vec::new()
    }

    /// The same, mutably (for loading).
    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        Vec::new()
    }

    /// State-dict entries PyTorch saves that this module accepts and ignores
    /// (`num_batches_tracked`).
    fn ignored_tensors(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether [`Module::int8`] gives an int8 implementation (custom layers: override both).
    fn has_int8(&self) -> bool {
        false
    }

    /// The int8 implementation of this layer (custom layers: override it and
    /// [`Module::has_int8`]). `cx` says what it is built for: the module's name, its
    /// [`qobserve::QConfig`] (observers and quantizers), the parameters its input arrives with
    /// (`cx.in_q`) and those its output observer chose (`cx.out_q()`);
    /// [`LowerCx::quantize_weight`] quantizes a weight tensor as the configuration says, so
    /// the layer follows the configured method and simulation matches it. Layers without one
    /// run in float between an automatic dequantize and quantize, and are reported.
    ///
    /// # Errors
    /// Weights or parameters the layer cannot take; the message should name `cx.name`. The
    /// default: an error saying the layer has no int8 implementation.
    fn int8(&self, cx: &LowerCx<'_>) -> Result<Box<dyn Int8Layer>> {
        Err(crate::NnError::Config {
            module: cx.name.to_string(),
            reason: format!(
                "{} says it has an int8 implementation (has_int8) but does not implement Module::int8",
                self.kind()
            ),
        })
    }

    /// The shape of its output for an input of shape `input`, found without computing it
    /// (shape inference, [`crate::Graph::value_info`]); an input it cannot take is an error
    /// naming the shapes. `None` (the default): the layer does not say, and the graph runs it
    /// on zeros of that shape to find out.
    fn output_shape(&self, _input: &[usize]) -> Option<Result<Vec<usize>>> {
        None
    }

    /// How this layer runs once converted, before any configuration applies: int8 with
    /// output parameters of its own ([`Mode::Int8`], lowered by [`Module::lower`]), int8
    /// keeping its input's ([`Mode::Int8SameParams`]), nothing to compute, or float and why.
    /// The default: int8 when [`Module::has_int8`] says so, else float.
    fn lowering(&self) -> Mode {
        if self.has_int8() {
            Mode::Int8
        } else {
            Mode::Float(crate::FloatReason::NoInt8 { kind: self.kind().to_string() })
        }
    }

    /// Whether this layer, which keeps its input's parameters ([`Mode::Int8SameParams`]), can
    /// instead requantize to output parameters of its own when the configuration asks
    /// ([`crate::QConfigMapping::pool_outputs`]): average pools. Its `lower` then gets them in
    /// `cx.out_q`.
    fn may_observe_output(&self) -> bool {
        false
    }

    /// The int8 form of this layer, for the parameters and configuration in `cx` (called
    /// when [`Module::lowering`] is int8). The default wraps [`Module::int8`].
    ///
    /// # Errors
    /// Weights that cannot be quantized or packed, or an `int8()` that returns none.
    fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        let layer = self.int8(cx)?;
        Ok(crate::ops::fallback::int8_layer_op(self.kind(), layer, cx.out_q()))
    }

    /// Whether it has a dynamically quantized form ([`Module::lower_dynamic`]): used where its
    /// configuration asks for dynamic quantization ([`qobserve::QConfig::dynamic`]); layers
    /// without one run in float there. `false` unless the layer says so.
    fn has_dynamic(&self) -> bool {
        false
    }

    /// Its dynamically quantized form (called when [`Module::has_dynamic`] and the
    /// configuration in `cx` asks for it): int8 weights, the float input quantized on each
    /// call, float output.
    ///
    /// # Errors
    /// Weights that cannot be quantized or packed; the default (no dynamic form) says so.
    fn lower_dynamic(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        Err(crate::NnError::Config {
            module: cx.name.to_string(),
            reason: format!("{} has no dynamically quantized form", self.kind()),
        })
    }

    /// [`Module::forward`] on an input nobody else needs any more: a layer that computes
    /// element by element may write its output into the input's buffer. It must give exactly
    /// `forward(&x)`; the default calls it, then returns the input's buffer to the float pool.
    ///
    /// # Errors
    /// As [`Module::forward`].
    fn forward_owned(&self, x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        let y = self.forward(&x)?;
        crate::scratch::recycle_f32(x);
        Ok(y)
    }

    /// Its float computation prepared once (weights packed for the kernels), giving exactly
    /// [`Module::forward`]'s outputs: what calibration and a converted model's float fallback
    /// run, input after input, while the layer does not change. `None` (the default):
    /// `forward` has nothing to prepare.
    fn float_kernel(&self) -> Option<Result<std::sync::Arc<dyn FloatKernel>>> {
        None
    }

    /// Whether it computes each image of a batch (index 0) on its own, so that a converted
    /// model may split a batch between threads. `false` unless the layer says so.
    fn computes_images_apart(&self) -> bool {
        false
    }

    /// Its saved form, for a layer that runs in float in a converted model: attributes (its
    /// tensors go to `w`, under keys that start with `node`). A saved model holding it loads
    /// once a loader for its kind is registered ([`crate::ops::register_layer`]). `None`:
    /// it cannot be saved (the default).
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<serde_json::Value>> {
        None
    }

    /// For downcasting to the concrete layer.
    fn as_any(&self) -> &dyn Any;

    /// For rewriting the concrete layer (fusion).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A layer's int8 computation, for custom layers ([`Module::int8`]).
pub trait Int8Layer: Send + Sync + Debug {
    /// Computes the layer on `u8` values quantized with the `in_q` it was built for: data in
    /// NHWC order for 4-D tensors (`shape` is the logical NCHW shape), row-major otherwise.
    /// Returns the output values, quantized with its `out_q`, and their logical shape.
    /// `threads` is the thread count the model runs with
    /// ([`crate::QuantizedModel::set_threads`]), for layers that split their work.
    ///
    /// # Errors
    /// An input it cannot take.
    fn forward_u8(&self, x: &[u8], shape: &[usize], threads: usize) -> Result<(Vec<u8>, Vec<usize>)>;

    /// Its weights as it computes with them, dequantized, under their state-dict names
    /// (`"weight"`): the report compares them with the float layer's
    /// ([`crate::LayerReport::weight_sqnr_db`]). Empty by default.
    fn weights(&self) -> Vec<(&'static str, ArrayD<f32>)> {
        Vec::new()
    }

    /// Its saved form: attributes (its tensors go to `w`, under keys that start with `node`).
    /// A saved model holding it loads once a loader for its layer's kind is registered
    /// ([`crate::ops::register_int8_layer`]). `None`: it cannot be saved (the default).
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<serde_json::Value>> {
        None
    }
}

/// Visits every module of the tree depth first with its hierarchical name.
pub fn walk<'a>(m: &'a dyn Module, prefix: &str, f: &mut dyn FnMut(&str, &'a dyn Module)) {
    f(prefix, m);
    for (name, child) in m.children() {
        let path = if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") };
        walk(child, &path, f);
    }
}

/// Joins a module path and a tensor name.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Layers run one after another, each with a name (PyTorch's `nn.Sequential` with an
/// `OrderedDict`, or a module whose `forward` calls its children in order).
#[derive(Debug, Default)]
pub struct Sequential {
    layers: Vec<(String, Box<dyn Module>)>,
}

impl Sequential {
    /// An empty container.
    pub fn new() -> Self {
        Sequential::default()
    }

    /// Appends a named layer.
    pub fn add(mut self, name: impl Into<String>, m: impl Module + 'static) -> Self {
        self.layers.push((name.into(), Box::new(m)));
        self
    }

    /// Appends a boxed layer.
    pub fn push(&mut self, name: impl Into<String>, m: Box<dyn Module>) {
        self.layers.push((name.into(), m));
    }

    /// The layers.
    pub fn layers(&self) -> &[(String, Box<dyn Module>)] {
        &self.layers
    }

    /// Takes the layers out.
    pub fn into_layers(self) -> Vec<(String, Box<dyn Module>)> {
        self.layers
    }

    /// The layers, mutably (for rewrites such as fusion).
    pub fn layers_mut(&mut self) -> &mut [(String, Box<dyn Module>)] {
        &mut self.layers
    }
}

impl Module for Sequential {
    fn kind(&self) -> &'static str {
        "Sequential"
    }

    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let mut cur = x.clone();
        for (name, m) in &self.layers {
            cur = m.forward(&cur).map_err(|e| e.within(name))?;
        }
        Ok(cur)
    }

    fn children(&self) -> Vec<(&str, &dyn Module)> {
        self.layers.iter().map(|(n, m)| (n.as_str(), m.as_ref())).collect()
    }

    fn children_mut(&mut self) -> Vec<(&str, &mut dyn Module)> {
        self.layers.iter_mut().map(|(n, m)| (n.as_str(), m.as_mut() as &mut dyn Module)).collect()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A residual block: `y = body(x) + shortcut(x)` (the identity when there is no shortcut),
/// then an optional ReLU, as PyTorch's quantizable blocks write it with
/// `FloatFunctional().add`. The body's layers are named directly under the block
/// (`conv1`, `bn1`, ...), the shortcut under its own name (`downsample`), so torchvision's and
/// PyTorch's `state_dict` names match.
#[derive(Debug)]
pub struct Residual {
    /// The main branch.
    pub body: Sequential,
    /// The shortcut branch and its name; `None` for the identity.
    pub shortcut: Option<(String, Sequential)>,
    /// The name of the addition (PyTorch: the `FloatFunctional`'s, e.g. `skip_add`): the
    /// quantized model observes its output under this name.
    pub add_name: String,
    /// The name of a ReLU applied after the addition, if any (it keeps the addition's
    /// quantization parameters, as in PyTorch).
    pub relu: Option<String>,
}

impl Module for Residual {
    fn kind(&self) -> &'static str {
        "Residual"
    }

    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let y = self.body.forward(x)?;
        let s = match &self.shortcut {
            Some((name, s)) => s.forward(x).map_err(|e| e.within(name))?,
            None => x.clone(),
        };
        if y.shape() != s.shape() {
            return Err(crate::error::NnError::Shape {
                module: self.add_name.clone(),
                kind: "Residual add",
                expected: format!(
                    "the shortcut's shape {:?} (add a downsample branch when the body changes the shape)",
                    s.shape()
                ),
                got: y.shape().to_vec(),
            });
        }
        let mut out = y + s;
        if self.relu.is_some() {
            out.mapv_inplace(|v| v.max(0.0));
        }
        Ok(out)
    }

    fn children(&self) -> Vec<(&str, &dyn Module)> {
        let mut c = self.body.children();
        if let Some((name, s)) = &self.shortcut {
            c.push((name.as_str(), s as &dyn Module));
        }
        c
    }

    fn children_mut(&mut self) -> Vec<(&str, &mut dyn Module)> {
        let mut c = self.body.children_mut();
        if let Some((name, s)) = &mut self.shortcut {
            c.push((name.as_str(), s as &mut dyn Module));
        }
        c
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Branches run on the same input, their outputs concatenated along channels (dimension 1):
/// Inception-style blocks, PyTorch's `FloatFunctional().cat(..., dim=1)`. Each branch is
/// named under the block (`branch1.conv`); the concatenation has its own name, under which
/// the quantized model observes its output.
#[derive(Debug)]
pub struct Concat {
    /// The branches, with their names.
    pub branches: Vec<(String, Sequential)>,
    /// The name of the concatenation (PyTorch: the `FloatFunctional`'s, e.g. `cat`).
    pub cat_name: String,
}

impl Concat {
    /// A concatenation named `cat_name`, with no branches yet.
    pub fn new(cat_name: impl Into<String>) -> Self {
        Concat { branches: Vec::new(), cat_name: cat_name.into() }
    }

    /// Adds a branch.
    pub fn branch(mut self, name: impl Into<String>, body: Sequential) -> Self {
        self.branches.push((name.into(), body));
        self
    }
}

/// Concatenates float tensors along dimension `dim` (1 for `[n, c, h, w]` or
/// `[n, features]`), checking that the other dimensions agree.
pub(crate) fn cat_dim<A: Borrow<ArrayD<f32>>>(parts: &[A], dim: usize, name: &str) -> Result<ArrayD<f32>> {
    let Some(first) = parts.first().map(Borrow::borrow) else {
        return Err(crate::error::NnError::Shape {
            module: name.to_string(),
            kind: "Concat",
            expected: "at least one branch".into(),
            got: Vec::new(),
        });
    };
    for p in parts.iter().map(Borrow::borrow) {
        let same_rest = p.ndim() == first.ndim()
            && p.ndim() > dim
            && p.shape().iter().zip(first.shape()).enumerate().all(|(i, (a, b))| i == dim || a == b);
        if !same_rest {
            let what = if dim == 1 { " (channels)" } else { "" };
            return Err(crate::error::NnError::Shape {
                module: name.to_string(),
                kind: "Concat",
                expected: format!(
                    "branch outputs that differ only in dimension {dim}{what}; the first branch gave {:?}",
                    first.shape()
                ),
                got: p.shape().to_vec(),
            });
        }
    }
    let views: Vec<_> = parts.iter().map(|p| p.borrow().view()).collect();
    Ok(ndarray::concatenate(ndarray::Axis(dim), &views).expect("shapes checked above"))
}

impl Module for Concat {
    fn kind(&self) -> &'static str {
        "Concat"
    }

    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let parts = self
            .branches
            .iter()
            .map(|(name, b)| b.forward(x).map_err(|e| e.within(name)))
            .collect::<Result<Vec<_>>>()?;
        cat_dim(&parts, 1, &self.cat_name)
    }

    fn children(&self) -> Vec<(&str, &dyn Module)> {
        self.branches.iter().map(|(n, b)| (n.as_str(), b as &dyn Module)).collect()
    }

    fn children_mut(&mut self) -> Vec<(&str, &mut dyn Module)> {
        self.branches.iter_mut().map(|(n, b)| (n.as_str(), b as &mut dyn Module)).collect()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
