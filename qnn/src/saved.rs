//! Saving and loading converted models: one safetensors file holding the int8 weights,
//! scales, biases and lookup tables as tensors, and the model's structure as JSON in the
//! file's metadata (`qrust.model`). Calibration happens once; loading re-packs the weights
//! for the CPU it runs on. Every malformed input is an error, never a panic.

use std::collections::HashMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use qkernels::{Conv2dGeometry, OutputQuant, PackedConv2d, PackedLinear, Pool2d, QuantU8, UnaryOp, UnaryTables};
use qtensor::{DType, QParams, QTensor, QuantRange};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value as J};

use crate::error::{NnError, Result};
use crate::graph::{check, Graph, Node, NodeOp, Tensor};
use crate::layers::{
    AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, DeQuantStub, Flatten, FusedAct, MaxPool2d, ReLU, ReLU6,
};
use crate::quant::{ConvSource, Mode, Op, PlanEntry, QStep, QuantizedModel};

/// The format this version writes and reads: the int8 graph.
const FORMAT: &str = "qrust-graph-v1";
/// The tree format of earlier versions, recognised to say so.
const TREE_FORMAT: &str = "qrust-int8-v1";

struct Writer {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl Writer {
    fn put(&mut self, key: String, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> String {
        self.tensors.push((key.clone(), dtype, shape, bytes));
        key
    }
    fn f32s(&mut self, key: String, v: &[f32]) -> String {
        self.put(key, Dtype::F32, vec![v.len()], v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn i32s(&mut self, key: String, v: &[i32]) -> String {
        self.put(key, Dtype::I32, vec![v.len()], v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

fn q_json(q: QuantU8) -> J {
    json!([q.scale.to_bits(), q.zero_point])
}

fn act_name(a: qkernels::Activation) -> &'static str {
    match a {
        qkernels::Activation::None => "none",
        qkernels::Activation::Relu => "relu",
        qkernels::Activation::Relu6 => "relu6",
    }
}

fn unary_json(op: UnaryOp) -> J {
    match op {
        UnaryOp::Hardswish => json!("hardswish"),
        UnaryOp::Sigmoid => json!("sigmoid"),
        UnaryOp::Hardsigmoid => json!("hardsigmoid"),
        UnaryOp::Silu => json!("silu"),
        UnaryOp::Tanh => json!("tanh"),
        other => json!(format!("{other:?}")),
    }
}

fn params_json(w: &mut Writer, name: &str, params: &QParams, n: usize) -> J {
    let scales: Vec<f32> = (0..n).map(|c| params.scale(c)).collect();
    let zps: Vec<i32> = (0..n).map(|c| params.zero_point(c)).collect();
    json!({
        "per_channel": params.axis().is_some(),
        "scales": w.f32s(format!("{name}.weight_scales"), &scales),
        "zero_points": w.i32s(format!("{name}.weight_zero_points"), &zps),
    })
}

fn op_json(w: &mut Writer, name: &str, op: &Op) -> Result<J> {
    let unsupported = |what: &str| NnError::File {
        file: String::new(),
        reason: format!("cannot save module '{name}': {what} cannot be stored (only built-in layers can)"),
    };
    Ok(match op {
        Op::Passthrough => json!({"k": "pass"}),
        Op::Conv { src, out, .. } => {
            let s = src.weights.shape().to_vec();
            let data: Vec<u8> = src.weights.as_slice().iter().map(|&v| v as u8).collect();
            let g = &src.geom;
            json!({
                "k": "conv",
                "weight": w.put(format!("{name}.weight_int8"), Dtype::I8, s.clone(), data),
                "params": params_json(w, name, src.weights.params(), s[0]),
                "bias": src.bias.as_ref().map(|b| w.f32s(format!("{name}.bias"), b)),
                "geom": [g.stride, g.padding, g.dilation, [g.groups, 0]],
                "out": [out.scale.to_bits(), out.zero_point, act_name(out.activation)],
            })
        }
        Op::Linear { packed, out } => {
            let pw = packed.weights();
            let data: Vec<u8> = pw.raw().iter().map(|&v| v as u8).collect();
            let params = if pw.is_per_channel() {
                QParams::per_channel(pw.scales().to_vec(), pw.zero_points().to_vec(), 0)
            } else {
                QParams::per_tensor(pw.scales()[0], pw.zero_points()[0])
            }
            .map_err(|e| NnError::Op { module: name.into(), source: e })?;
            json!({
                "k": "linear",
                "weight": w.put(format!("{name}.weight_int8"), Dtype::I8, vec![pw.n(), pw.k()], data),
                "params": params_json(w, name, &params, pw.n()),
                "bias": packed.bias().map(|b| w.f32s(format!("{name}.bias"), b)),
                "out": [out.scale.to_bits(), out.zero_point, act_name(out.activation)],
            })
        }
        Op::Lut { op, in_q, out_q, tables } => json!({
            "k": "lut",
            "op": unary_json(*op),
            "in_q": q_json(*in_q),
            "out_q": q_json(*out_q),
            "vector": w.put(format!("{name}.lut_vector"), Dtype::U8, vec![256], tables.vector.table().to_vec()),
            "tail": w.put(format!("{name}.lut_tail"), Dtype::U8, vec![256], tables.tail.table().to_vec()),
        }),
        Op::SameParams(m) => {
            let a = m.as_any();
            if let Some(p) = a.downcast_ref::<AdaptiveAvgPool2d>() {
                json!({"k": "same", "layer": "AdaptiveAvgPool2d", "size": [p.0, p.1]})
            } else if let Some(p) = a.downcast_ref::<MaxPool2d>() {
                let p = p.0;
                json!({"k": "same", "layer": "MaxPool2d", "pool": [p.kernel, p.stride, p.padding, p.dilation], "ceil": p.ceil_mode})
            } else if let Some(p) = a.downcast_ref::<AvgPool2d>() {
                let p = p.0;
                json!({
                    "k": "same", "layer": "AvgPool2d", "pool": [p.kernel, p.stride, p.padding, p.dilation], "ceil": p.ceil_mode,
                    "include_pad": p.count_include_pad, "divisor": p.divisor_override,
                })
            } else {
                json!({"k": "same", "layer": m.kind()})
            }
        }
        Op::Float(m) => match m
            .as_any()
            .downcast_ref::<BatchNorm2d>()
            .map(|b| (b, "BatchNorm2d"))
            .or_else(|| m.as_any().downcast_ref::<BatchNorm1d>().map(|b| (&b.0, "BatchNorm1d")))
        {
            Some((bn, layer)) => {
                let v = |a: &ArrayD<f32>| a.iter().copied().collect::<Vec<_>>();
                json!({
                    "k": "float", "layer": layer, "eps": bn.eps.to_bits(),
                    "act": act_name(bn.activation.kernel()),
                    "weight": w.f32s(format!("{name}.bn_weight"), &v(&bn.weight)),
                    "bias": w.f32s(format!("{name}.bn_bias"), &v(&bn.bias)),
                    "mean": w.f32s(format!("{name}.bn_mean"), &v(&bn.running_mean)),
                    "var": w.f32s(format!("{name}.bn_var"), &v(&bn.running_var)),
                })
            }
            None if m.as_any().is::<DeQuantStub>() => json!({"k": "float", "layer": "DeQuantStub"}),
            None => return Err(unsupported(&format!("a float {} (custom layer)", m.kind()))),
        },
        Op::Quantize { out_q } => json!({"k": "quantize", "out_q": q_json(*out_q)}),
        Op::Custom { .. } => return Err(unsupported("a custom int8 layer")),
        Op::Add { qs, out_q, relu, int8 } => json!({
            "k": "add", "qs": [q_json(qs[0]), q_json(qs[1])], "out_q": q_json(*out_q), "relu": relu, "int8": int8,
        }),
        Op::Mul { qs, out_q, int8 } => json!({
            "k": "mul", "qs": [q_json(qs[0]), q_json(qs[1])], "out_q": q_json(*out_q), "int8": int8,
        }),
        Op::Cat { qs, out_q, int8 } => json!({
            "k": "cat", "qs": qs.iter().map(|q| q_json(*q)).collect::<Vec<_>>(), "out_q": q_json(*out_q), "int8": int8,
        }),
    })
}

fn nodes_json(w: &mut Writer, g: &Graph<QStep>) -> Result<Vec<J>> {
    g.nodes
        .iter()
        .map(|n| {
            let NodeOp::Layer(step) = &n.op else { unreachable!("int8 graphs hold steps") };
            Ok(json!({
                "name": n.name,
                "inputs": n.inputs.iter().map(|t| t.0).collect::<Vec<_>>(),
                "output": n.output.0,
                "in_q": q_json(step.in_q),
                "op": op_json(w, &n.name, &step.op)?,
            }))
        })
        .collect()
}

fn mode_json(m: &Mode) -> J {
    match m {
        Mode::Int8 => json!("int8"),
        Mode::Int8SameParams => json!("int8-same"),
        Mode::Passthrough => json!("pass"),
        Mode::Float(why) => json!({"float": why}),
    }
}

impl QuantizedModel {
    /// Writes the converted model to `path` (safetensors: tensors plus the structure as JSON
    /// metadata), so it can be loaded without calibrating again.
    ///
    /// # Errors
    /// A module that cannot be stored (a custom layer), or an I/O error.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes)
            .map_err(|e| NnError::File { file: path.display().to_string(), reason: e.to_string() })
    }

    /// The saved form, in memory.
    ///
    /// # Errors
    /// As [`QuantizedModel::save`].
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut w = Writer { tensors: Vec::new() };
        let g = &self.graph;
        let nodes = nodes_json(&mut w, g)?;
        let plan: Vec<J> =
            self.plan.iter().map(|e| json!({"name": e.name, "kind": e.kind, "mode": mode_json(&e.mode)})).collect();
        let desc = json!({
            "format": FORMAT,
            "values": g.values,
            "inputs": g.inputs.iter().map(|t| t.0).collect::<Vec<_>>(),
            "outputs": g.outputs.iter().map(|t| t.0).collect::<Vec<_>>(),
            "input_q": self.input_q.iter().map(|q| q_json(*q)).collect::<Vec<_>>(),
            "plan": plan,
            "nodes": nodes,
        });
        let mut keys = std::collections::HashSet::new();
        if let Some((dup, ..)) = w.tensors.iter().find(|t| !keys.insert(t.0.as_str())) {
            return Err(NnError::File {
                file: String::new(),
                reason: format!("two tensors would be named '{dup}': give every module a unique name"),
            });
        }
        let views: Vec<(String, TensorView<'_>)> = w
            .tensors
            .iter()
            .map(|(k, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (k.clone(), v)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| NnError::File { file: String::new(), reason: format!("building the file: {e}") })?;
        let meta: HashMap<String, String> = [("qrust.model".to_string(), desc.to_string())].into();
        safetensors::serialize(views, Some(meta))
            .map_err(|e| NnError::File { file: String::new(), reason: e.to_string() })
    }

    /// Loads a model written by [`QuantizedModel::save`].
    ///
    /// # Errors
    /// [`NnError::File`] naming what is wrong for a file that is not one, is truncated or
    /// inconsistent.
    pub fn load(path: impl AsRef<Path>) -> Result<QuantizedModel> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| NnError::File { file: file.clone(), reason: e.to_string() })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            NnError::File { reason, .. } => NnError::File { file, reason },
            other => other,
        })
    }

    /// [`QuantizedModel::load`] from bytes.
    ///
    /// # Errors
    /// As [`QuantizedModel::load`].
    pub fn from_bytes(bytes: &[u8]) -> Result<QuantizedModel> {
        let bad = |reason: String| NnError::File { file: "(bytes)".into(), reason };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let desc = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("qrust.model"))
            .ok_or_else(|| bad("no qrust.model metadata: not a model saved by QuantizedModel::save".into()))?;
        let desc: J = serde_json::from_str(desc).map_err(|e| bad(format!("model description is not JSON: {e}")))?;
        if desc["format"] == TREE_FORMAT {
            return Err(bad(format!(
                "this model was saved in the format {TREE_FORMAT} (a tree of modules) by an earlier version, which \
                 this one no longer reads: convert the float model again and save it ({FORMAT})"
            )));
        }
        if desc["format"] != FORMAT {
            return Err(bad(format!("format {} is not {FORMAT}", desc["format"])));
        }
        let r = Reader { st: &st };
        let ids = |v: &J, what: &str| -> Result<Vec<Tensor>> {
            v.as_array()
                .ok_or_else(|| bad(format!("{what} is not a list")))?
                .iter()
                .map(|t| r.usize(t, what).map(Tensor))
                .collect()
        };
        let inputs = ids(&desc["inputs"], "inputs")?;
        let outputs = ids(&desc["outputs"], "outputs")?;
        let input_q = desc["input_q"]
            .as_array()
            .ok_or_else(|| bad("input_q is not a list".into()))?
            .iter()
            .map(|q| r.q(q))
            .collect::<Result<Vec<_>>>()?;
        if input_q.len() != inputs.len() {
            return Err(bad(format!("{} input parameters for {} inputs", input_q.len(), inputs.len())));
        }
        let list = desc["nodes"].as_array().ok_or_else(|| bad("nodes is not a list".into()))?;
        let mut nodes = Vec::with_capacity(list.len());
        for n in list {
            let name = n["name"].as_str().ok_or_else(|| bad(format!("node without a name: {n}")))?.to_string();
            let step = QStep { in_q: r.q(&n["in_q"])?, op: r.op(&n["op"], &name)? };
            let inputs = ids(&n["inputs"], &format!("{name}: inputs"))?;
            let arity = match &step.op {
                Op::Add { .. } | Op::Mul { .. } => inputs.len() == 2,
                Op::Cat { qs, .. } => !inputs.is_empty() && qs.len() == inputs.len(),
                _ => inputs.len() == 1,
            };
            if !arity {
                return Err(bad(format!("{name}: {} inputs do not fit its op", inputs.len())));
            }
            let output = Tensor(r.usize(&n["output"], &format!("{name}: output"))?);
            nodes.push(Node { name, op: NodeOp::Layer(step), inputs, output });
        }
        // Every value is a graph input or one node's output: their count is bounded by the
        // file's own size.
        let values = r.usize(&desc["values"], "values")?;
        if values != inputs.len() + nodes.len() {
            return Err(bad(format!(
                "{values} values for {} inputs and {} nodes: every value is an input or one node's output",
                inputs.len(),
                nodes.len()
            )));
        }
        check(values, &nodes, &inputs, &outputs).map_err(|e| bad(e.to_string()))?;
        let plan = desc["plan"]
            .as_array()
            .ok_or_else(|| bad("plan is not a list".into()))?
            .iter()
            .map(|e| r.plan_entry(e))
            .collect::<Result<Vec<_>>>()?;
        if plan.len() != nodes.len() || plan.iter().zip(&nodes).any(|(e, n)| e.name != n.name) {
            return Err(bad("the plan does not list the nodes, in order".into()));
        }
        Ok(QuantizedModel::assemble(input_q, Graph { values, nodes, inputs, outputs }, plan))
    }
}

struct Reader<'a> {
    st: &'a SafeTensors<'a>,
}

fn bad(reason: String) -> NnError {
    NnError::File { file: "(bytes)".into(), reason }
}

const KINDS: [&str; 26] = [
    "QuantStub",
    "DeQuantStub",
    "AvgPool2d",
    "BatchNorm1d",
    "cat",
    "Concat",
    "Module",
    "Conv2d",
    "Linear",
    "ReLU",
    "ReLU6",
    "Hardswish",
    "Sigmoid",
    "Hardsigmoid",
    "SiLU",
    "Tanh",
    "Identity",
    "AdaptiveAvgPool2d",
    "MaxPool2d",
    "Flatten",
    "BatchNorm2d",
    "add",
    "mul",
    "Sequential",
    "Residual",
    "Dropout",
];

impl Reader<'_> {
    fn u64(&self, v: &J, what: &str) -> Result<u64> {
        v.as_u64().ok_or_else(|| bad(format!("{what} is not a non-negative integer: {v}")))
    }
    fn usize(&self, v: &J, what: &str) -> Result<usize> {
        let x = self.u64(v, what)?;
        if x > 1 << 32 {
            return Err(bad(format!("{what} = {x} is implausibly large")));
        }
        Ok(x as usize)
    }
    fn f32_bits(&self, v: &J, what: &str) -> Result<f32> {
        let b = self.u64(v, what)?;
        u32::try_from(b).map(f32::from_bits).map_err(|_| bad(format!("{what} is not an f32 bit pattern")))
    }
    fn q(&self, v: &J) -> Result<QuantU8> {
        let scale = self.f32_bits(&v[0], "scale")?;
        let zp = v[1].as_i64().ok_or_else(|| bad(format!("zero point missing in {v}")))?;
        QuantU8::new(scale, zp as i32).map_err(|e| bad(format!("invalid parameters {v}: {e}")))
    }
    fn tensor(&self, key: &J, dtype: Dtype) -> Result<(Vec<usize>, &[u8])> {
        let key = key.as_str().ok_or_else(|| bad(format!("tensor name expected, got {key}")))?;
        let t = self.st.tensor(key).map_err(|e| bad(format!("tensor {key}: {e}")))?;
        if t.dtype() != dtype {
            return Err(bad(format!("tensor {key} is {:?}, expected {dtype:?}", t.dtype())));
        }
        Ok((t.shape().to_vec(), t.data()))
    }
    fn f32_vec(&self, key: &J) -> Result<Vec<f32>> {
        let (_, d) = self.tensor(key, Dtype::F32)?;
        Ok(d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
    fn i32_vec(&self, key: &J) -> Result<Vec<i32>> {
        let (_, d) = self.tensor(key, Dtype::I32)?;
        Ok(d.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
    fn weights(&self, j: &J) -> Result<QTensor<i8>> {
        let (shape, data) = self.tensor(&j["weight"], Dtype::I8)?;
        let p = &j["params"];
        let (scales, zps) = (self.f32_vec(&p["scales"])?, self.i32_vec(&p["zero_points"])?);
        let params = if p["per_channel"] == true {
            QParams::per_channel(scales, zps, 0)
        } else {
            match (scales.first(), zps.first()) {
                (Some(&s), Some(&z)) => QParams::per_tensor(s, z),
                _ => return Err(bad("weight parameters are empty".into())),
            }
        }
        .map_err(|e| bad(e.to_string()))?;
        let arr = ArrayD::from_shape_vec(IxDyn(&shape), data.iter().map(|&b| b as i8).collect())
            .map_err(|e| bad(e.to_string()))?;
        QTensor::from_int_repr(arr, params, QuantRange::full(DType::I8)).map_err(|e| bad(e.to_string()))
    }
    fn out(&self, v: &J) -> Result<OutputQuant> {
        let q = self.q(v)?;
        let activation = match v[2].as_str() {
            Some("none") => qkernels::Activation::None,
            Some("relu") => qkernels::Activation::Relu,
            Some("relu6") => qkernels::Activation::Relu6,
            other => return Err(bad(format!("unknown activation {other:?}"))),
        };
        Ok(OutputQuant { scale: q.scale, zero_point: q.zero_point, activation })
    }
    fn pair(&self, v: &J, what: &str) -> Result<[usize; 2]> {
        Ok([self.usize(&v[0], what)?, self.usize(&v[1], what)?])
    }
    fn op(&self, j: &J, name: &str) -> Result<Op> {
        let err = |e: qtensor::QError| bad(format!("{name}: {e}"));
        Ok(match j["k"].as_str() {
            Some("pass") => Op::Passthrough,
            Some("conv") => {
                let weights = self.weights(j)?;
                let bias = if j["bias"].is_null() { None } else { Some(self.f32_vec(&j["bias"])?) };
                let g = &j["geom"];
                let geom = Conv2dGeometry {
                    stride: self.pair(&g[0], "stride")?,
                    padding: self.pair(&g[1], "padding")?,
                    dilation: self.pair(&g[2], "dilation")?,
                    groups: self.usize(&g[3][0], "groups")?,
                };
                let packed = Box::new(PackedConv2d::new(&weights, bias.as_deref(), geom).map_err(err)?);
                Op::Conv { packed, src: Box::new(ConvSource { weights, bias, geom }), out: self.out(&j["out"])? }
            }
            Some("linear") => {
                let weights = self.weights(j)?;
                let bias = if j["bias"].is_null() { None } else { Some(self.f32_vec(&j["bias"])?) };
                Op::Linear {
                    packed: Box::new(PackedLinear::new(&weights, bias.as_deref()).map_err(err)?),
                    out: self.out(&j["out"])?,
                }
            }
            Some("lut") => {
                let table = |key: &J| -> Result<qkernels::Lut> {
                    let (_, d) = self.tensor(key, Dtype::U8)?;
                    let t: [u8; 256] =
                        d.try_into().map_err(|_| bad(format!("{name}: a lookup table must have 256 entries")))?;
                    Ok(qkernels::Lut::from_table(t))
                };
                let op = match j["op"].as_str() {
                    Some("hardswish") => UnaryOp::Hardswish,
                    Some("sigmoid") => UnaryOp::Sigmoid,
                    Some("hardsigmoid") => UnaryOp::Hardsigmoid,
                    Some("silu") => UnaryOp::Silu,
                    Some("tanh") => UnaryOp::Tanh,
                    other => return Err(bad(format!("{name}: unknown activation {other:?}"))),
                };
                let tables = UnaryTables { vector: table(&j["vector"])?, tail: table(&j["tail"])? };
                Op::Lut { op, in_q: self.q(&j["in_q"])?, out_q: self.q(&j["out_q"])?, tables: Box::new(tables) }
            }
            Some("same") => Op::SameParams(match j["layer"].as_str() {
                Some("AdaptiveAvgPool2d") => {
                    let [h, w] = self.pair(&j["size"], "pool size")?;
                    Box::new(AdaptiveAvgPool2d(h, w))
                }
                Some(layer @ ("MaxPool2d" | "AvgPool2d")) => {
                    let p = &j["pool"];
                    let divisor_override = match &j["divisor"] {
                        J::Null => None,
                        d => Some(self.usize(d, "divisor")?),
                    };
                    let pool = Pool2d {
                        kernel: self.pair(&p[0], "kernel")?,
                        stride: self.pair(&p[1], "stride")?,
                        padding: self.pair(&p[2], "padding")?,
                        dilation: self.pair(&p[3], "dilation")?,
                        ceil_mode: j["ceil"] == true,
                        count_include_pad: j["include_pad"] != false,
                        divisor_override,
                    };
                    if layer == "MaxPool2d" {
                        Box::new(MaxPool2d(pool))
                    } else {
                        Box::new(AvgPool2d(pool))
                    }
                }
                Some("Flatten") => Box::new(Flatten),
                Some("ReLU") => Box::new(ReLU),
                Some("ReLU6") => Box::new(ReLU6),
                other => return Err(bad(format!("{name}: unknown layer {other:?}"))),
            }),
            Some("quantize") => Op::Quantize { out_q: self.q(&j["out_q"])? },
            Some("add") => Op::Add {
                qs: [self.q(&j["qs"][0])?, self.q(&j["qs"][1])?],
                out_q: self.q(&j["out_q"])?,
                relu: j["relu"] == true,
                int8: j["int8"] == true,
            },
            Some("mul") => Op::Mul {
                qs: [self.q(&j["qs"][0])?, self.q(&j["qs"][1])?],
                out_q: self.q(&j["out_q"])?,
                int8: j["int8"] == true,
            },
            Some("cat") => Op::Cat {
                qs: j["qs"]
                    .as_array()
                    .ok_or_else(|| bad(format!("{name}: qs is not a list")))?
                    .iter()
                    .map(|q| self.q(q))
                    .collect::<Result<Vec<_>>>()?,
                out_q: self.q(&j["out_q"])?,
                int8: j["int8"] == true,
            },
            Some("float") if j["layer"] == "DeQuantStub" => Op::Float(Box::new(DeQuantStub)),
            Some("float") if j["layer"] == "BatchNorm2d" || j["layer"] == "BatchNorm1d" => {
                let arr = |k: &str| -> Result<ArrayD<f32>> {
                    let v = self.f32_vec(&j[k])?;
                    Ok(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).expect("1-D"))
                };
                let activation = match j["act"].as_str() {
                    Some("none") | None => FusedAct::None,
                    Some("relu") => FusedAct::Relu,
                    Some("relu6") => FusedAct::Relu6,
                    other => return Err(bad(format!("{name}: unknown activation {other:?}"))),
                };
                let bn = BatchNorm2d {
                    weight: arr("weight")?,
                    bias: arr("bias")?,
                    running_mean: arr("mean")?,
                    running_var: arr("var")?,
                    eps: self.f32_bits(&j["eps"], "eps")?,
                    activation,
                };
                let c = bn.running_mean.len();
                if [&bn.weight, &bn.bias, &bn.running_var].iter().any(|a| a.len() != c) {
                    return Err(bad(format!("{name}: batch-norm statistics of different lengths")));
                }
                if j["layer"] == "BatchNorm1d" {
                    Op::Float(Box::new(BatchNorm1d(bn)))
                } else {
                    Op::Float(Box::new(bn))
                }
            }
            other => return Err(bad(format!("{name}: unknown op {other:?}"))),
        })
    }
    fn plan_entry(&self, e: &J) -> Result<PlanEntry> {
        let name = e["name"].as_str().ok_or_else(|| bad("plan entry without a name".into()))?.to_string();
        let kind_s = e["kind"].as_str().unwrap_or("Module");
        let kind = KINDS.iter().find(|k| **k == kind_s).copied().unwrap_or("Module");
        let mode = match &e["mode"] {
            J::String(s) if s == "int8" => Mode::Int8,
            J::String(s) if s == "int8-same" => Mode::Int8SameParams,
            J::String(s) if s == "pass" => Mode::Passthrough,
            J::Object(o) => Mode::Float(o.get("float").and_then(J::as_str).unwrap_or("").to_string()),
            other => return Err(bad(format!("unknown mode {other}"))),
        };
        Ok(PlanEntry { name, kind, mode })
    }
}
