//! Activations: `ReLU` and `ReLU6` (in int8, a clamp that keeps the input's parameters),
//! and `Hardswish`, `Sigmoid`, `HardSigmoid`, `SiLU`, `Tanh` and `GELU` (in int8, a lookup
//! table from the input's parameters to the output's: the observed ones; for sigmoid,
//! hardsigmoid and tanh, PyTorch's fixed ones or the observed ones as `TableOutputs` says;
//! the input's for GELU).

use ndarray::ArrayD;
use qkernels::{QuantU8, UnaryOp, UnaryTables};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, bad, op_err, parse, LowerCx, OpReader, OpWriter, QOp, SavedQ};
use crate::error::Result;
use crate::layers::{map_in_place as in_place, FusedAct};
use crate::module::{FloatKernel, Module};
use crate::quant::{quantized, Mode, Run, Value};
use crate::scratch::{self, Input};

macro_rules! activation {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $f:expr, $int8:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $name;

        impl Module for $name {
            fn kind(&self) -> &'static str {
                $kind
            }
            fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
                Ok(crate::layers::map_same_layout(x, $f))
            }
            fn forward_owned(&self, mut x: ArrayD<f32>) -> Result<ArrayD<f32>> {
                in_place(&mut x, $f);
                Ok(x)
            }
            fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
                Some(Ok(input.to_vec()))
            }
            fn lowering(&self) -> Mode {
                Int8Form::mode(&$int8)
            }
            fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
                Ok(Int8Form::lower(&$int8, cx))
            }
            fn computes_images_apart(&self) -> bool {
                true
            }
            fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<J>> {
                Some(Ok(J::Null))
            }
            any_methods!();
        }
    };
}

/// How an activation runs in int8.
enum Int8Form {
    /// A clamp keeping the input's parameters.
    Clamp { six: bool },
    /// A lookup table.
    Table(UnaryOp),
}

impl Int8Form {
    fn mode(&self) -> Mode {
        match self {
            Int8Form::Clamp { .. } => Mode::Int8SameParams,
            Int8Form::Table(_) => Mode::Int8,
        }
    }
    fn lower(&self, cx: &LowerCx<'_>) -> Box<dyn QOp> {
        match *self {
            Int8Form::Clamp { six } => Box::new(ClampOp { six }),
            Int8Form::Table(op) => {
                // GELU keeps its input's parameters; sigmoid, hardsigmoid and tanh take the
                // observed ones or PyTorch's fixed grid, as `TableOutputs` says.
                let out_q = match op.fixed_output(cx.in_q) {
                    Some(f) if matches!(op, UnaryOp::Gelu | UnaryOp::GeluTanh) => f,
                    Some(f) => match cx.tables {
                        crate::TableOutputs::Fixed => f,
                        crate::TableOutputs::Observed => cx.out_q(),
                        crate::TableOutputs::Auto => {
                            // The observed range, if it spans under half of the fixed grid's.
                            let o = cx.out_q();
                            if o.scale * 255.0 < 0.5 * f.scale * 256.0 {
                                o
                            } else {
                                f
                            }
                        }
                    },
                    None => cx.out_q(),
                };
                Box::new(LutOp::new(op, cx.in_q, out_q))
            }
        }
    }
}

activation!(
    /// `nn.ReLU`.
    ReLU, "ReLU", |v| v.max(0.0), Int8Form::Clamp { six: false }
);
activation!(
    /// `nn.ReLU6`.
    ReLU6, "ReLU6", |v| v.clamp(0.0, 6.0), Int8Form::Clamp { six: true }
);
activation!(
    /// `nn.Hardswish`.
    Hardswish, "Hardswish", |v| v * (v + 3.0).clamp(0.0, 6.0) / 6.0, Int8Form::Table(UnaryOp::Hardswish)
);
activation!(
    /// `nn.Sigmoid`.
    Sigmoid, "Sigmoid", |v| 1.0 / (1.0 + (-v).exp()), Int8Form::Table(UnaryOp::Sigmoid)
);
activation!(
    /// `nn.Hardsigmoid`.
    HardSigmoid, "Hardsigmoid", |v| (v + 3.0).clamp(0.0, 6.0) / 6.0, Int8Form::Table(UnaryOp::Hardsigmoid)
);
activation!(
    /// `nn.SiLU` (swish): `x * sigmoid(x)`.
    SiLU, "SiLU", |v| v / (1.0 + (-v).exp()), Int8Form::Table(UnaryOp::Silu)
);
activation!(
    /// `nn.Tanh`.
    Tanh, "Tanh", |v| v.tanh(), Int8Form::Table(UnaryOp::Tanh)
);

/// `nn.GELU(approximate)`: `x * Φ(x)` (`approximate = "none"`), or its tanh approximation
/// (`"tanh"`). In float, vectorised (`qkernels::gelu_f32`: `erf` as PyTorch's vectorised GELU
/// computes it, Abramowitz-Stegun 7.1.26). In int8 a lookup table that keeps the input's
/// parameters, as PyTorch's `quantized::gelu` does.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct GELU {
    /// The tanh approximation.
    pub tanh: bool,
}

impl GELU {
    /// GELU of `x` in place: vectorised (qkernels' f32 erf and exp) when the values are one
    /// slice, shared between `threads` threads.
    fn in_place(&self, mut x: ArrayD<f32>, threads: usize) -> ArrayD<f32> {
        match x.as_slice_memory_order_mut() {
            Some(s) => qkernels::gelu_in_place(s, self.tanh, threads),
            None => x.mapv_inplace(|v| qkernels::gelu_f32(v, self.tanh)),
        }
        x
    }

    fn op(self) -> UnaryOp {
        if self.tanh {
            UnaryOp::GeluTanh
        } else {
            UnaryOp::Gelu
        }
    }
}

impl Module for GELU {
    fn kind(&self) -> &'static str {
        "GELU"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(self.in_place(crate::layers::map_same_layout(x, |v| v), 1))
    }
    fn forward_owned(&self, x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(self.in_place(x, 1))
    }
    fn float_kernel(&self) -> Option<Result<std::sync::Arc<dyn FloatKernel>>> {
        Some(Ok(std::sync::Arc::new(GeluKernel(*self))))
    }
    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(Ok(input.to_vec()))
    }
    fn lowering(&self) -> Mode {
        Mode::Int8
    }
    fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        Ok(Int8Form::Table(self.op()).lower(cx))
    }
    fn computes_images_apart(&self) -> bool {
        true
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(attrs(self)))
    }
    any_methods!();
}

/// The layer as its own float kernel (on any thread count).
#[derive(Debug)]
struct GeluKernel(GELU);

impl FloatKernel for GeluKernel {
    fn forward(&self, x: &ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        Ok(self.0.in_place(crate::layers::map_same_layout(x, |v| v), threads))
    }
    fn forward_owned(&self, x: ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        Ok(self.0.in_place(x, threads))
    }
}

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[
    ("ReLU", |_, _| Ok(Box::new(ReLU))),
    ("ReLU6", |_, _| Ok(Box::new(ReLU6))),
    ("Hardswish", |_, _| Ok(Box::new(Hardswish))),
    ("Sigmoid", |_, _| Ok(Box::new(Sigmoid))),
    ("Hardsigmoid", |_, _| Ok(Box::new(HardSigmoid))),
    ("SiLU", |_, _| Ok(Box::new(SiLU))),
    ("Tanh", |_, _| Ok(Box::new(Tanh))),
    ("GELU", |j, _| Ok(Box::new(parse::<GELU>(j, "GELU", "GELU")?))),
];

/// ReLU or ReLU6 in int8: a clamp at the zero point (and at the quantized 6), parameters
/// unchanged; a float input stays float.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ClampOp {
    /// ReLU6 rather than ReLU.
    pub six: bool,
}

pub(crate) const RELU: (&str, super::OpLoader) =
    ("ReLU", |j, _, node| Ok(Box::new(parse::<ClampOp>(j, node, "ReLU")?)));

impl QOp for ClampOp {
    fn op_name(&self) -> &'static str {
        RELU.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        let (op, f): (UnaryOp, fn(f32) -> f32) =
            if self.six { (UnaryOp::Relu6, |v| v.clamp(0.0, 6.0)) } else { (UnaryOp::Relu, |v| v.max(0.0)) };
        match args.pop().expect("one input") {
            Value::F32(a) => Ok(Value::F32(a.mapv(f))),
            Value::U8 { data, shape, q } => {
                let data = Input::new(data);
                let mut y = scratch::take(data.len());
                op.tables(q, q).apply(&data, &mut y).map_err(op_err)?;
                Ok(Value::U8 { data: y, shape, q })
            }
        }
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(self))
    }
    any_methods!();
}

/// A lookup-table activation in int8: 256 output bytes per input byte, for the parameters it
/// was built for (built anew for an input that arrives with others).
#[derive(Debug)]
pub struct LutOp {
    op: UnaryOp,
    in_q: QuantU8,
    out_q: QuantU8,
    tables: Box<UnaryTables>,
}

impl LutOp {
    pub(crate) fn new(op: UnaryOp, in_q: QuantU8, out_q: QuantU8) -> Self {
        LutOp { op, in_q, out_q, tables: Box::new(op.tables(in_q, out_q)) }
    }
}

/// The functions a saved table may compute, by name.
#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum TableFn {
    Hardswish,
    Sigmoid,
    Hardsigmoid,
    Silu,
    Tanh,
    Gelu,
    GeluTanh,
    /// `activation(scale * x + shift)`.
    Affine {
        scale: f32,
        shift: f32,
        activation: FusedAct,
    },
}

/// The clamp bounds of a fused activation, infinite for none.
pub(crate) fn act_bounds(a: FusedAct) -> (f32, f32) {
    match a {
        FusedAct::None => (f32::NEG_INFINITY, f32::INFINITY),
        FusedAct::Relu => (0.0, f32::INFINITY),
        FusedAct::Relu6 => (0.0, 6.0),
    }
}

impl TableFn {
    fn of(op: UnaryOp) -> Option<TableFn> {
        Some(match op {
            UnaryOp::Hardswish => TableFn::Hardswish,
            UnaryOp::Sigmoid => TableFn::Sigmoid,
            UnaryOp::Hardsigmoid => TableFn::Hardsigmoid,
            UnaryOp::Silu => TableFn::Silu,
            UnaryOp::Tanh => TableFn::Tanh,
            UnaryOp::Gelu => TableFn::Gelu,
            UnaryOp::GeluTanh => TableFn::GeluTanh,
            UnaryOp::Affine { scale, shift, min, max } => {
                let activation = [FusedAct::None, FusedAct::Relu, FusedAct::Relu6]
                    .into_iter()
                    .find(|&a| act_bounds(a) == (min, max))?;
                TableFn::Affine { scale, shift, activation }
            }
            _ => return None,
        })
    }
    fn op(self) -> UnaryOp {
        match self {
            TableFn::Hardswish => UnaryOp::Hardswish,
            TableFn::Sigmoid => UnaryOp::Sigmoid,
            TableFn::Hardsigmoid => UnaryOp::Hardsigmoid,
            TableFn::Silu => UnaryOp::Silu,
            TableFn::Tanh => UnaryOp::Tanh,
            TableFn::Gelu => UnaryOp::Gelu,
            TableFn::GeluTanh => UnaryOp::GeluTanh,
            TableFn::Affine { scale, shift, activation } => {
                let (min, max) = act_bounds(activation);
                UnaryOp::Affine { scale, shift, min, max }
            }
        }
    }
}

/// The saved form of a [`LutOp`]: the function and parameters, and the tables themselves
/// (kept as computed when converting, whatever this CPU's math library would give).
#[derive(Serialize, Deserialize)]
struct LutAttrs {
    function: TableFn,
    in_q: SavedQ,
    out_q: SavedQ,
    vector: String,
    tail: String,
}

pub(crate) const LUT: (&str, super::OpLoader) = ("Lut", load_lut);

fn load_lut(j: &J, r: &OpReader<'_>, node: &str) -> Result<Box<dyn QOp>> {
    let a: LutAttrs = parse(j, node, "Lut")?;
    let table = |key: &str| -> Result<qkernels::Lut> {
        let (_, d) = r.u8s(key)?;
        let t: [u8; 256] = d.try_into().map_err(|_| bad(format!("{node}: a lookup table must have 256 entries")))?;
        Ok(qkernels::Lut::from_table(t))
    };
    let tables = UnaryTables { vector: table(&a.vector)?, tail: table(&a.tail)? };
    Ok(Box::new(LutOp { op: a.function.op(), in_q: a.in_q.0, out_q: a.out_q.0, tables: Box::new(tables) }))
}

impl QOp for LutOp {
    fn op_name(&self) -> &'static str {
        LUT.0
    }
    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, _run: Run) -> Result<Value> {
        let (data, shape, q) = quantized(args.pop().expect("one input"), in_q)?;
        let data = Input::new(data);
        let mut y = scratch::take(data.len());
        if q == self.in_q {
            self.tables.apply(&data, &mut y).map_err(op_err)?;
        } else {
            self.op.tables(q, self.out_q).apply(&data, &mut y).map_err(op_err)?;
        }
        Ok(Value::U8 { data: y, shape, q: self.out_q })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.out_q)
    }
    fn quantizes_input(&self, _k: usize, in_q: QuantU8) -> Option<QuantU8> {
        Some(in_q)
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J> {
        let function = TableFn::of(self.op).expect("tables are built for the functions TableFn names");
        Ok(attrs(&LutAttrs {
            function,
            in_q: self.in_q.into(),
            out_q: self.out_q.into(),
            vector: w.u8s(format!("{node}.lut_vector"), vec![256], self.tables.vector.table()),
            tail: w.u8s(format!("{node}.lut_tail"), vec![256], self.tables.tail.table()),
        }))
    }
    any_methods!();
}

/// `nn.Hardtanh(min_val, max_val)` (`torch.clamp`, ONNX `Clip`): `min(max(x, min), max)`.
/// In int8 it keeps its input's parameters and clamps the bytes at the quantized bounds, as
/// PyTorch's quantized `hardtanh` does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hardtanh {
    /// Lower bound.
    pub min_val: f32,
    /// Upper bound.
    pub max_val: f32,
}

impl Hardtanh {
    fn keeps_batch(&self) -> bool {
        true
    }

    fn out_dims(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.check().map(|()| input.to_vec())
    }

    fn check(&self) -> Result<()> {
        if self.min_val <= self.max_val {
            Ok(())
        } else {
            Err(crate::NnError::Config {
                module: String::new(),
                reason: format!(
                    "Hardtanh bounds {} > {}: the lower bound must not exceed the upper",
                    self.min_val, self.max_val
                ),
            })
        }
    }
}

impl Module for Hardtanh {
    fn kind(&self) -> &'static str {
        "Hardtanh"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.check()?;
        let (lo, hi) = (self.min_val, self.max_val);
        Ok(crate::layers::map_same_layout(x, |v| v.max(lo).min(hi)))
    }
    fn forward_owned(&self, mut x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.check()?;
        let (lo, hi) = (self.min_val, self.max_val);
        in_place(&mut x, |v| v.max(lo).min(hi));
        Ok(x)
    }
    // Bounds are checked by shape inference, the float pass (so before calibration
    // completes) and loading.
    same_params_module!();
}

pub(crate) const HARDTANH: (&str, super::OpLoader) = ("Hardtanh", |j, _, node| {
    let h: Hardtanh = parse(j, node, "Hardtanh")?;
    h.check().map_err(|e| bad(format!("{node}: {e}")))?;
    Ok(Box::new(h))
});

/// The float layer of [`Hardtanh`] for saved float fallbacks.
pub(crate) const HARDTANH_LAYER: &[(&str, super::LayerLoader)] =
    &[("Hardtanh", |j, _| Ok(Box::new(parse::<Hardtanh>(j, "Hardtanh", "Hardtanh")?)))];

impl QOp for Hardtanh {
    fn op_name(&self) -> &'static str {
        HARDTANH.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        match args.pop().expect("one input") {
            Value::F32(a) => Ok(Value::F32(self.forward(&a)?)),
            mut v @ Value::U8 { q, .. } => {
                let quant = |v: f32| qtensor::kernels::quantize_scalar(v, 1.0 / q.scale, q.zero_point, 0, 255) as u8;
                super::range::clamp_value(&mut v, (quant(self.min_val), quant(self.max_val)), q);
                Ok(v)
            }
        }
    }
    serde_qop_tail!();
}
