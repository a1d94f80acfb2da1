//! The op registry: every op, or family of ops, is defined in one file of this folder: its
//! float layer (forward pass, parameters under PyTorch's names), how it runs once converted
//! ([`Module::lowering`]: int8 with its own output parameters, int8 keeping its input's, or
//! float and why), its int8 form (a [`QOp`]), and that form's saved attributes (a
//! serde-derived struct, stored under the op's name). `BUILTIN` lists the files' ops by name
//! for loading.
//!
//! Layers of your own join the same registry: [`register_layer`] (a float layer, saved by
//! [`Module::save`]) and [`register_int8_layer`] (its int8 form, saved by
//! [`Int8Layer::save`]). A saved model that holds them loads once they are registered, and
//! otherwise fails with an error that names the layer and the call to make.
//!
//! | file | layers | int8 form |
//! |---|---|---|
//! | `conv.rs` | `Conv2d` | packed convolution, requantization fused |
//! | `linear.rs` | `Linear` | packed GEMM, requantization fused |
//! | `activation.rs` | `ReLU`, `ReLU6`, `Hardtanh` (clip), `Hardswish`, `Sigmoid`, `HardSigmoid`, `SiLU`, `Tanh`, `GELU` | clamps keeping the input's parameters; lookup tables |
//! | `pool.rs` | `MaxPool2d`, `AvgPool2d`, `AdaptiveAvgPool2d` | keeping the input's parameters |
//! | `shape.rs` | `Flatten`, `Reshape`, `Permute`, `ChannelShuffle`, `ImageRows`, `RowsImage` | keeping the input's parameters |
//! | `slice.rs` | `Slice` (ranges, `torch.chunk` pieces) | keeping the input's parameters |
//! | `pad.rs` | `Pad2d` (constant, reflect, replicate) | keeping the input's parameters |
//! | `resize.rs` | `Upsample` (nearest, bilinear) | keeping the input's parameters, PyTorch's arithmetic |
//! | `softmax.rs` | `Softmax` | codes in and out, exponentials from a table per input scale |
//! | `layernorm.rs` | `LayerNorm` (last axis) | PyTorch's `quantized::layer_norm` |
//! | `batchnorm.rs` | `BatchNorm2d`, `BatchNorm1d` | float only, unless fused |
//! | `konst.rs` | `BatchConst` (a constant repeated over the batch), `SeqConst` (a constant cut to the sequence length, float) | its codes, quantized at conversion |
//! | `stubs.rs` | `Identity`, `Dropout`, `QuantStub`, `DeQuantStub` | nothing, or an explicit quantize |
//! | `add.rs`, `mul.rs`, `cat.rs` | graph additions, products, concatenations | int8 |
//! | `range.rs` | (a wrapper) | clamps an op's output to a custom integer range |
//! | `fallback.rs` | any layer without an int8 form; custom int8 layers | float between automatic boundaries; the layer's own |

use std::any::Any;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{OnceLock, RwLock};

use qkernels::QuantU8;
use safetensors::{Dtype, SafeTensors};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use crate::error::{NnError, Result};
use crate::module::{Int8Layer, Module};
use crate::quant::{Run, Value};

/// `as_any` and `as_any_mut`, as every layer and op of this folder implements them.
macro_rules! any_methods {
    () => {
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
    };
}

/// The `Module` methods of a layer that runs as itself in int8, keeping its input's
/// parameters, and is saved as its serde form. The layer provides `out_dims(&self, shape)`
/// (shape inference) and `keeps_batch(&self)` (whether it computes images apart).
macro_rules! same_params_module {
    () => {
        fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
            Some(self.out_dims(input))
        }
        fn lowering(&self) -> Mode {
            Mode::Int8SameParams
        }
        fn lower(&self, _cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
            Ok(Box::new(self.clone()))
        }
        fn computes_images_apart(&self) -> bool {
            self.keeps_batch()
        }
        fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<J>> {
            Some(Ok(attrs(self)))
        }
        any_methods!();
    };
}

/// The rest of the `QOp` impl of such a layer: saved as its serde form, images apart as
/// `keeps_batch` says.
macro_rules! serde_qop_tail {
    () => {
        fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
            Ok(attrs(self))
        }
        fn images_apart(&self) -> bool {
            self.keeps_batch()
        }
        any_methods!();
    };
}

pub mod activation;
pub mod add;
pub mod batchnorm;
pub mod cat;
pub mod conv;
pub mod convt;
pub mod embedding;
pub mod fallback;
pub mod konst;
pub mod layernorm;
pub mod linear;
pub mod matmul;
pub mod mul;
pub mod pad;
pub mod pool;
pub mod range;
pub mod resize;
pub mod scalar;
pub mod shape;
pub mod slice;
pub mod softmax;
pub mod stubs;

/// One op of a converted model: what it computes on its input values, and what it saves.
pub trait QOp: Debug + Send + Sync + Any {
    /// The name it is saved and registered under (its file's, e.g. `"Conv2d"`).
    fn op_name(&self) -> &'static str;

    /// Computes the op. `args` holds the input values in order and is left empty; `in_q` is
    /// the parameters the first input was observed with (a float input of an int8 op is
    /// quantized with them).
    ///
    /// # Errors
    /// An input the op cannot take (shapes, the activation budget).
    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, run: Run) -> Result<Value>;

    /// Computes the op from a value that another node still reads, for ops that read a small
    /// part of their one input (a float slice: attention's q, k and v taken from one stacked
    /// projection): such a reader otherwise gets a copy of the whole value. `None`: the op
    /// takes its input by value ([`QOp::run`]).
    ///
    /// # Errors
    /// As [`QOp::run`].
    fn run_borrowed(&self, _x: &Value, _run: Run) -> Option<Result<Value>> {
        None
    }

    /// The parameters of its output when it chooses its own (not its input's).
    fn out_q(&self) -> Option<QuantU8> {
        None
    }

    /// The parameters it quantizes input `k` with when that input arrives in float, if it
    /// does (`in_q` as [`QOp::run`] gets it).
    fn quantizes_input(&self, _k: usize, _in_q: QuantU8) -> Option<QuantU8> {
        None
    }

    /// Whether it computes each image of a batch (index 0) on its own, so that a batch can
    /// be split between threads.
    fn images_apart(&self) -> bool {
        true
    }

    /// Whether it takes `n` inputs (checked when a saved model loads).
    fn takes_inputs(&self, n: usize) -> bool {
        n == 1
    }

    /// Its attributes for the saved file (a serde-serialized struct); its tensors go to `w`
    /// under keys that start with `node`.
    ///
    /// # Errors
    /// An op that cannot be stored (the message says why).
    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J>;

    /// Multiply-accumulates it computes for an output of logical shape `out_shape`, for
    /// ops that multiply by weights (convolutions, linear layers); `None` for the rest.
    fn macs(&self, _out_shape: &[usize]) -> Option<u64> {
        None
    }

    /// The kernel that runs it on this machine, for ops with a choice of kernels
    /// (convolutions, linear layers): the path and micro-kernel their packing chose, e.g. on
    /// AVX2 whether products are summed in 16-bit pairs (`vpmaddubsw`) and for which input
    /// codes. `None` for the rest.
    fn kernel(&self) -> Option<String> {
        None
    }

    /// SQNR of its int8 weights against the float layer's, for ops with weights.
    fn weight_sqnr(&self, _float: &dyn Module) -> Option<f64> {
        None
    }

    /// For downcasting (the conversion's own rewrites).
    fn as_any(&self) -> &dyn Any;

    /// For rewriting (the conversion's own rewrites).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// What a layer's int8 lowering ([`Module::lower`]) is given.
#[derive(Debug, Clone, Copy)]
pub struct LowerCx<'a> {
    /// The node's name.
    pub name: &'a str,
    /// Its configuration.
    pub cfg: &'a qobserve::QConfig,
    /// The parameters its input arrives with.
    pub in_q: QuantU8,
    /// The parameters its output observer chose (ops that keep their input's have none).
    pub out_q: Option<QuantU8>,
    /// How sigmoid-like tables choose between `out_q` and PyTorch's fixed output parameters
    /// ([`crate::TableOutputs`]).
    pub tables: crate::TableOutputs,
}

impl LowerCx<'_> {
    /// The output parameters of an op that chooses its own (as its output observer and
    /// quantizer chose them).
    ///
    /// # Panics
    /// For an op that keeps its input's parameters ([`crate::Mode::Int8SameParams`]), which has none.
    pub fn out_q(&self) -> QuantU8 {
        self.out_q.expect("int8 ops with their own output parameters are observed")
    }

    /// Quantizes weights `w` (axis 0: output channels) as this module's configuration says:
    /// its weight observer, then its weight quantizer.
    ///
    /// # Errors
    /// A weight quantizer that is not affine (the layer should run in float: its
    /// `Module::has_int8` is then not consulted, prepare plans it so), or weights the
    /// observer refuses (NaN).
    pub fn quantize_weight(&self, w: &ndarray::ArrayD<f32>) -> Result<qtensor::QTensor<i8>> {
        crate::quant::quantize_weights(self.name, w, self.cfg)
    }
}

/// `u8` parameters in saved attributes, saved as the scale's bits (an exact round trip) and
/// the zero point, and validated when they are read: invalid ones fail the attributes' parse.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(try_from = "(u32, i32)", into = "(u32, i32)")]
pub struct SavedQ(pub QuantU8);

impl From<QuantU8> for SavedQ {
    fn from(q: QuantU8) -> Self {
        SavedQ(q)
    }
}

impl From<SavedQ> for (u32, i32) {
    fn from(q: SavedQ) -> Self {
        (q.0.scale.to_bits(), q.0.zero_point)
    }
}

impl TryFrom<(u32, i32)> for SavedQ {
    type Error = String;
    fn try_from((bits, zero_point): (u32, i32)) -> std::result::Result<Self, String> {
        QuantU8::new(f32::from_bits(bits), zero_point)
            .map(SavedQ)
            .map_err(|e| format!("invalid parameters (scale bits {bits:#x}, zero point {zero_point}): {e}"))
    }
}

/// Serializes an op's attributes.
pub(crate) fn attrs<T: Serialize>(t: &T) -> J {
    serde_json::to_value(t).expect("attribute structs serialize")
}

/// Deserializes an op's attributes, naming the node on failure.
///
/// # Errors
/// Attributes of the wrong form.
pub fn parse<T: DeserializeOwned>(j: &J, node: &str, op: &str) -> Result<T> {
    T::deserialize(j).map_err(|e| bad(format!("{node}: the attributes of its {op} op do not fit: {e}")))
}

pub(crate) fn bad(reason: String) -> NnError {
    NnError::File { file: "(bytes)".into(), reason }
}

/// The tensors of a model being saved.
#[derive(Debug, Default)]
pub struct OpWriter {
    pub(crate) tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl OpWriter {
    fn put(&mut self, key: String, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> String {
        self.tensors.push((key.clone(), dtype, shape, bytes));
        key
    }
    /// Stores `f32` values of shape `shape` under `key`; returns the key.
    pub fn f32s(&mut self, key: String, shape: Vec<usize>, v: &[f32]) -> String {
        self.put(key, Dtype::F32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    /// Stores `i32` values under `key`; returns the key.
    pub fn i32s(&mut self, key: String, v: &[i32]) -> String {
        self.put(key, Dtype::I32, vec![v.len()], v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    /// Stores `i8` values of shape `shape` under `key`; returns the key.
    pub fn i8s(&mut self, key: String, shape: Vec<usize>, v: &[i8]) -> String {
        self.put(key, Dtype::I8, shape, v.iter().map(|&b| b as u8).collect())
    }
    /// Stores bytes of shape `shape` under `key`; returns the key.
    pub fn u8s(&mut self, key: String, shape: Vec<usize>, v: &[u8]) -> String {
        self.put(key, Dtype::U8, shape, v.to_vec())
    }
}

/// The tensors of a model being loaded.
pub struct OpReader<'a> {
    pub(crate) st: &'a SafeTensors<'a>,
}

impl Debug for OpReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpReader").field("tensors", &self.st.len()).finish()
    }
}

impl OpReader<'_> {
    fn tensor(&self, key: &str, dtype: Dtype) -> Result<(Vec<usize>, &[u8])> {
        let t = self.st.tensor(key).map_err(|e| bad(format!("tensor {key}: {e}")))?;
        if t.dtype() != dtype {
            return Err(bad(format!("tensor {key} is {:?}, expected {dtype:?}", t.dtype())));
        }
        Ok((t.shape().to_vec(), t.data()))
    }
    /// The `f32` tensor `key` with its shape.
    ///
    /// # Errors
    /// A missing tensor or another dtype.
    pub fn f32s(&self, key: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (s, d) = self.tensor(key, Dtype::F32)?;
        Ok((s, d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
    }
    /// The `i32` tensor `key`.
    ///
    /// # Errors
    /// A missing tensor or another dtype.
    pub fn i32s(&self, key: &str) -> Result<Vec<i32>> {
        let (_, d) = self.tensor(key, Dtype::I32)?;
        Ok(d.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
    /// The `i8` tensor `key` with its shape.
    ///
    /// # Errors
    /// A missing tensor or another dtype.
    pub fn i8s(&self, key: &str) -> Result<(Vec<usize>, Vec<i8>)> {
        let (s, d) = self.tensor(key, Dtype::I8)?;
        Ok((s, d.iter().map(|&b| b as i8).collect()))
    }
    /// The `u8` tensor `key` with its shape.
    ///
    /// # Errors
    /// A missing tensor or another dtype.
    pub fn u8s(&self, key: &str) -> Result<(Vec<usize>, &[u8])> {
        self.tensor(key, Dtype::U8)
    }
}

/// Loads a built-in op from its saved attributes.
pub(crate) type OpLoader = fn(&J, &OpReader<'_>, &str) -> Result<Box<dyn QOp>>;

/// Loads a float layer of your own from what its [`Module::save`] wrote.
pub type LayerLoader = fn(&J, &OpReader<'_>) -> Result<Box<dyn Module>>;

/// Loads an int8 layer of your own from what its [`Int8Layer::save`] wrote.
pub type Int8LayerLoader = fn(&J, &OpReader<'_>) -> Result<Box<dyn Int8Layer>>;

/// The built-in ops by saved name, one entry per op file.
pub(crate) const BUILTIN: &[(&str, OpLoader)] = &[
    conv::OP,
    convt::OP,
    linear::OP,
    linear::DYNAMIC_OP,
    activation::RELU,
    activation::LUT,
    activation::HARDTANH,
    pool::MAX,
    pool::AVG,
    pool::ADAPTIVE,
    pool::OBSERVED,
    shape::FLATTEN,
    shape::RESHAPE,
    shape::PERMUTE,
    shape::SHUFFLE,
    shape::IMAGE_ROWS,
    shape::ROWS_IMAGE,
    slice::OP,
    pad::OP,
    resize::OP,
    stubs::PASS,
    stubs::QUANTIZE,
    stubs::NAN_TO_ZERO,
    add::OP,
    mul::OP,
    matmul::OP,
    scalar::OP,
    cat::OP,
    konst::OP,
    softmax::OP,
    layernorm::OP,
    fallback::FLOAT,
    fallback::INT8_LAYER,
    range::OP,
];

/// The built-in layers by kind, one list per op file: the loaders of the float layers a saved
/// model's float fallbacks can hold (every built-in layer is listed: the list also names the
/// kinds of loaded plans).
pub(crate) const BUILTIN_LAYERS: &[&[(&str, LayerLoader)]] = &[
    conv::LAYERS,
    convt::LAYERS,
    linear::LAYERS,
    activation::LAYERS,
    activation::HARDTANH_LAYER,
    pool::LAYERS,
    shape::LAYERS,
    slice::LAYERS,
    pad::LAYERS,
    resize::LAYERS,
    softmax::LAYERS,
    layernorm::LAYERS,
    scalar::LAYERS,
    konst::LAYERS,
    konst::SEQ_LAYERS,
    embedding::LAYERS,
    batchnorm::LAYERS,
    stubs::LAYERS,
];

fn builtin_layer(kind: &str) -> Option<LayerLoader> {
    BUILTIN_LAYERS.iter().flat_map(|l| l.iter()).find(|(k, _)| *k == kind).map(|e| e.1)
}

/// Layers registered by the application.
#[derive(Default)]
struct Registered {
    layers: HashMap<String, (&'static str, LayerLoader)>,
    int8: HashMap<String, (&'static str, Int8LayerLoader)>,
}

fn registered() -> &'static RwLock<Registered> {
    static R: OnceLock<RwLock<Registered>> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn kind_name(kind: &str, known: &HashMap<String, (&'static str, impl Copy)>) -> &'static str {
    // One leaked string per registered kind (registration happens once per kind).
    known.get(kind).map_or_else(|| Box::leak(kind.to_string().into_boxed_str()) as &'static str, |e| e.0)
}

/// Registers a float layer of your own (its [`Module::kind`]) so that saved models holding it
/// (run in float, saved by its [`Module::save`]) load. Registering a kind again replaces its
/// loader.
///
/// # Errors
/// A kind a built-in layer already has.
pub fn register_layer(kind: &str, load: LayerLoader) -> Result<()> {
    if builtin_layer(kind).is_some() || OTHER_KINDS.contains(&kind) {
        return Err(NnError::Config {
            module: "(registry)".into(),
            reason: format!("'{kind}' is a built-in layer's kind: give your layer a kind of its own"),
        });
    }
    let mut r = registered().write().unwrap_or_else(|e| e.into_inner());
    let name = kind_name(kind, &r.layers);
    r.layers.insert(kind.to_string(), (name, load));
    Ok(())
}

/// Registers the int8 form of a layer of your own (its [`Module::kind`]) so that saved models
/// holding it (saved by its [`Int8Layer::save`]) load.
///
/// # Errors
/// A kind a built-in layer already has.
pub fn register_int8_layer(kind: &str, load: Int8LayerLoader) -> Result<()> {
    if builtin_layer(kind).is_some() || OTHER_KINDS.contains(&kind) {
        return Err(NnError::Config {
            module: "(registry)".into(),
            reason: format!("'{kind}' is a built-in layer's kind: give your layer a kind of its own"),
        });
    }
    let mut r = registered().write().unwrap_or_else(|e| e.into_inner());
    let name = kind_name(kind, &r.int8);
    r.int8.insert(kind.to_string(), (name, load));
    Ok(())
}

/// The kinds of nodes that are not layers, and of containers.
const OTHER_KINDS: [&str; 9] = ["add", "mul", "matmul", "cat", "Sequential", "Residual", "Concat", "Graph", "Module"];

/// A kind's `'static` name, for plans loaded from files: a built-in layer's, a graph op's or
/// a container's, or a registered layer's.
pub(crate) fn static_kind(kind: &str) -> Option<&'static str> {
    if let Some(k) = BUILTIN_LAYERS.iter().flat_map(|l| l.iter()).map(|e| e.0).find(|k| *k == kind) {
        return Some(k);
    }
    if let Some(k) = OTHER_KINDS.iter().find(|k| **k == kind) {
        return Some(k);
    }
    let r = registered().read().unwrap_or_else(|e| e.into_inner());
    r.layers.get(kind).map(|e| e.0).or_else(|| r.int8.get(kind).map(|e| e.0))
}

/// The loader of a float layer of kind `kind`: built-in or registered.
pub(crate) fn layer_loader(kind: &str, node: &str) -> Result<LayerLoader> {
    if let Some(f) = builtin_layer(kind) {
        return Ok(f);
    }
    let r = registered().read().unwrap_or_else(|e| e.into_inner());
    r.layers.get(kind).map(|e| e.1).ok_or_else(|| {
        bad(format!(
            "{node}: the model holds a float layer of kind '{kind}', which is not registered: call \
             qnn::ops::register_layer(\"{kind}\", loader) before loading"
        ))
    })
}

/// The loader of an int8 layer of kind `kind`.
pub(crate) fn int8_layer_loader(kind: &str, node: &str) -> Result<(&'static str, Int8LayerLoader)> {
    let r = registered().read().unwrap_or_else(|e| e.into_inner());
    r.int8.get(kind).copied().ok_or_else(|| {
        bad(format!(
            "{node}: the model holds an int8 layer of kind '{kind}', which is not registered: call \
             qnn::ops::register_int8_layer(\"{kind}\", loader) before loading"
        ))
    })
}

/// Loads op `name` of node `node`.
pub(crate) fn load_op(name: &str, attrs: &J, r: &OpReader<'_>, node: &str) -> Result<Box<dyn QOp>> {
    let Some((_, load)) = BUILTIN.iter().find(|(k, _)| *k == name) else {
        return Err(bad(format!(
            "{node}: unknown op '{name}'; this version reads {}",
            BUILTIN.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
        )));
    };
    load(attrs, r, node)
}

/// `[n, c, h, w]` of a 4-D logical shape, or a shape error for op `kind`.
pub(crate) fn nchw_of(shape: &[usize], kind: &'static str) -> Result<[usize; 4]> {
    match *shape {
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => Err(NnError::Shape {
            module: String::new(),
            kind,
            expected: "a 4-D NCHW input".into(),
            got: shape.to_vec(),
        }),
    }
}

/// A layer's float forward pass, its output sized first by its shape inference and held to
/// the activation budget (a saved model may declare any geometry).
pub(crate) fn float_forward(layer: &dyn Module, x: &ndarray::ArrayD<f32>, run: Run) -> Result<ndarray::ArrayD<f32>> {
    if let Some(shape) = layer.output_shape(x.shape()) {
        crate::quant::budget(&shape?, 4, run, layer.kind())?;
    }
    layer.forward(x)
}

/// Runs an image op that keeps its input's parameters: a float input through the layer
/// ([`float_forward`]), a `u8` one through `int8(input image, output height and width,
/// output NHWC buffer)` into an output of the layer's inferred shape, within the budget.
pub(crate) fn image_op(
    x: Value,
    layer: &dyn Module,
    run: Run,
    int8: impl FnOnce(&qkernels::QImage<'_>, (usize, usize), &mut [u8]) -> Result<()>,
) -> Result<Value> {
    match x {
        Value::F32(a) => Ok(Value::F32(float_forward(layer, &a, run)?)),
        Value::U8 { data, shape, q } => {
            let data = crate::scratch::Input::new(data);
            nchw_of(&shape, layer.kind())?;
            let out = layer.output_shape(&shape).expect("image ops infer their output shapes")?;
            let [n, c, oh, ow] = nchw_of(&out, layer.kind())?;
            let mut y = crate::quant::out_buf(&[n, oh, ow, c], run, layer.kind())?;
            int8(&Value::image(&data, &shape, q), (oh, ow), &mut y)?;
            Ok(Value::U8 { data: y, shape: out, q })
        }
    }
}

/// `n` pseudo-random codes (xorshift from `seed`, which advances), for the op files' tests.
#[cfg(test)]
pub(crate) fn test_codes(seed: &mut u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 32) as u8
        })
        .collect()
}

pub(crate) fn op_err(e: qtensor::QError) -> NnError {
    NnError::Op { module: String::new(), source: e }
}
