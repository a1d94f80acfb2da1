//! A converted model written as an ONNX QDQ model: float ops between `QuantizeLinear` /
//! `DequantizeLinear` pairs that carry our scales and zero points, weights as `int8`
//! initializers behind `DequantizeLinear` (per channel, axis 0), biases as `int32` with scale
//! `input scale x weight scale` (the form ONNX Runtime fuses into `QLinearConv` / int8
//! `Gemm`). ONNX Runtime (or TensorRT) then runs the model we calibrated.
//!
//! The export reads the model's saved form (`QuantizedModel::to_bytes`: the int8 graph as
//! JSON, the tensors as safetensors), so what is written is exactly what was saved.

use prost::Message;
use qnn::QuantizedModel;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as J;

use crate::error::{OnnxError, Result};
use crate::proto::{
    data_type as dt, AttributeProto, AttributeType, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TypeProto, TypeTensor, ValueInfoProto,
};

/// The opset the export writes (Gelu needs 20; ONNX Runtime 1.17 and later read 21).
pub const EXPORT_OPSET: i64 = 21;

fn err(reason: impl Into<String>) -> OnnxError {
    OnnxError::Model(format!("export-qdq: {}", reason.into()))
}

/// `(scale, zero point)` of a saved parameter pair `[scale bits, zero point]`.
fn q_of(v: &J) -> Result<(f32, i32)> {
    match v.as_array().map(Vec::as_slice) {
        Some([s, z]) => {
            let s = s.as_u64().and_then(|b| u32::try_from(b).ok()).map(f32::from_bits);
            let z = z.as_i64().and_then(|z| i32::try_from(z).ok());
            match (s, z) {
                (Some(s), Some(z)) => Ok((s, z)),
                _ => Err(err(format!("bad quantization parameters {v}"))),
            }
        }
        _ => Err(err(format!("bad quantization parameters {v}"))),
    }
}

/// How a value of the qrust graph is held.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Repr {
    /// `u8` codes with these parameters: its ONNX tensor is the `DequantizeLinear` output.
    Int8(f32, i32),
    /// Float.
    Float,
}

struct Writer<'a> {
    st: SafeTensors<'a>,
    /// Each node's output shape, when the input shapes were given.
    shapes: std::collections::HashMap<String, Vec<usize>>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Per qrust value: its ONNX float tensor and how it is held.
    vals: Vec<Option<(String, Repr)>>,
    counter: usize,
}

fn attr_i(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(i),
        ..Default::default()
    }
}
fn attr_is(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}
fn attr_f(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(f),
        ..Default::default()
    }
}
fn attr_s(name: &str, s: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(s.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn usizes(v: &J, what: &str) -> Result<Vec<i64>> {
    v.as_array()
        .and_then(|a| a.iter().map(|x| x.as_i64()).collect::<Option<Vec<_>>>())
        .ok_or_else(|| err(format!("{what} is not a list of numbers: {v}")))
}

impl Writer<'_> {
    fn fresh(&mut self, base: &str) -> String {
        self.counter += 1;
        format!("{base}__{}", self.counter)
    }

    fn node(&mut self, op: &str, name: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: Some(name.to_string()),
            op_type: Some(op.to_string()),
            attribute,
            ..Default::default()
        });
    }

    fn init(&mut self, t: TensorProto) -> String {
        let name = t.name.clone().expect("initializers are named");
        self.inits.push(t);
        name
    }

    fn scalar_q(&mut self, base: &str, (s, z): (f32, i32)) -> (String, String) {
        let sn = self.init(TensorProto {
            data_type: Some(dt::FLOAT),
            float_data: vec![s],
            name: Some(format!("{base}.scale")),
            ..Default::default()
        });
        let zn = self.init(TensorProto {
            data_type: Some(dt::UINT8),
            raw_data: Some(vec![z.clamp(0, 255) as u8]),
            name: Some(format!("{base}.zero_point")),
            ..Default::default()
        });
        (sn, zn)
    }

    /// `QuantizeLinear` then `DequantizeLinear` of `x` with `q`: the tensor an int8 value is.
    fn qdq(&mut self, x: &str, base: &str, q: (f32, i32)) -> String {
        let (s, z) = self.scalar_q(base, q);
        let qn = format!("{base}.q");
        let dn = format!("{base}.dq");
        self.node("QuantizeLinear", &format!("{base}/QuantizeLinear"), &[x, &s, &z], &qn, vec![]);
        self.node("DequantizeLinear", &format!("{base}/DequantizeLinear"), &[&qn, &s, &z], &dn, vec![]);
        dn
    }

    /// Value `v` as a float tensor an int8 op reading it with parameters `q` sees: an int8
    /// value as it is (its parameters are the ones it was written with), a float one through
    /// a quantize / dequantize pair with `q`.
    fn read(&mut self, v: usize, q: Option<(f32, i32)>, reader: &str) -> Result<String> {
        let (name, repr) = self
            .vals
            .get(v)
            .cloned()
            .flatten()
            .ok_or_else(|| err(format!("value {v} is read before it is computed")))?;
        match (repr, q) {
            (Repr::Float, Some(q)) => {
                let base = self.fresh(&format!("{reader}.in"));
                Ok(self.qdq(&name, &base, q))
            }
            _ => Ok(name),
        }
    }

    fn tensor(&self, key: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        self.st.tensor(key).map_err(|e| err(format!("tensor '{key}': {e}")))
    }

    fn f32s(&self, key: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.tensor(key)?;
        if t.dtype() != Dtype::F32 {
            return Err(err(format!("tensor '{key}' is {:?}, not F32", t.dtype())));
        }
        let v = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok((t.shape().to_vec(), v))
    }

    /// An int8 weight as `DequantizeLinear(int8, scales, zero points, axis 0)`; `oihw` turns
    /// a saved OHWI convolution weight into ONNX's OIHW. Returns the float tensor and the
    /// per-channel scales.
    fn weight(&mut self, node: &str, a: &J, oihw: bool) -> Result<(String, Vec<f32>)> {
        let key = a["weight"].as_str().ok_or_else(|| err(format!("{node}: no weight")))?;
        let t = self.tensor(key)?;
        if t.dtype() != Dtype::I8 {
            return Err(err(format!("{node}: weight '{key}' is {:?}, not I8", t.dtype())));
        }
        let shape = t.shape().to_vec();
        let data = t.data().to_vec();
        let (dims, raw) = if oihw {
            let &[o, h, w, i] = shape.as_slice() else {
                return Err(err(format!("{node}: a convolution weight of shape {shape:?}")));
            };
            let mut out = vec![0u8; data.len()];
            for oo in 0..o {
                for y in 0..h {
                    for x in 0..w {
                        for c in 0..i {
                            out[((oo * i + c) * h + y) * w + x] = data[((oo * h + y) * w + x) * i + c];
                        }
                    }
                }
            }
            (vec![o, i, h, w], out)
        } else {
            (shape.clone(), data)
        };
        let (_, scales) = self.f32s(a["scales"].as_str().unwrap_or(""))?;
        let zps = self.tensor(a["zero_points"].as_str().unwrap_or(""))?;
        let zps: Vec<u8> =
            zps.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i8 as u8).collect();
        let per_channel = a["per_channel"].as_bool().unwrap_or(false);
        let o = dims[0];
        let (scales, zps) = if per_channel { (scales, zps) } else { (vec![scales[0]; o], vec![zps[0]; o]) };
        if scales.len() != o || zps.len() != o {
            return Err(err(format!("{node}: {} scales for {o} output channels", scales.len())));
        }
        let w = self.init(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(dt::INT8),
            raw_data: Some(raw),
            name: Some(format!("{node}.weight_int8")),
            ..Default::default()
        });
        let s = self.init(TensorProto {
            dims: vec![o as i64],
            data_type: Some(dt::FLOAT),
            float_data: scales.clone(),
            name: Some(format!("{node}.weight_scale")),
            ..Default::default()
        });
        let z = self.init(TensorProto {
            dims: vec![o as i64],
            data_type: Some(dt::INT8),
            raw_data: Some(zps),
            name: Some(format!("{node}.weight_zero_point")),
            ..Default::default()
        });
        let out = format!("{node}.weight");
        self.node(
            "DequantizeLinear",
            &format!("{node}/weight/DequantizeLinear"),
            &[&w, &s, &z],
            &out,
            vec![attr_i("axis", 0)],
        );
        Ok((out, scales))
    }

    /// A bias as `int32` codes of scale `input scale x weight scale`, dequantized (ONNX
    /// Runtime's form); a float bias when the input is float.
    fn bias(&mut self, node: &str, a: &J, in_scale: f32, w_scales: &[f32]) -> Result<Option<String>> {
        let Some(key) = a["bias"].as_str() else { return Ok(None) };
        let (_, b) = self.f32s(key)?;
        if b.len() != w_scales.len() {
            return Err(err(format!("{node}: {} biases for {} channels", b.len(), w_scales.len())));
        }
        let scales: Vec<f32> = w_scales.iter().map(|&s| s * in_scale).collect();
        let codes: Vec<i32> = b
            .iter()
            .zip(&scales)
            .map(|(&v, &s)| (v / s).round_ties_even().clamp(i32::MIN as f32, i32::MAX as f32) as i32)
            .collect();
        let n = b.len() as i64;
        let c = self.init(TensorProto {
            dims: vec![n],
            data_type: Some(dt::INT32),
            int32_data: codes,
            name: Some(format!("{node}.bias_int32")),
            ..Default::default()
        });
        let s = self.init(TensorProto {
            dims: vec![n],
            data_type: Some(dt::FLOAT),
            float_data: scales,
            name: Some(format!("{node}.bias_scale")),
            ..Default::default()
        });
        let out = format!("{node}.bias");
        self.node(
            "DequantizeLinear",
            &format!("{node}/bias/DequantizeLinear"),
            &[&c, &s],
            &out,
            vec![attr_i("axis", 0)],
        );
        Ok(Some(out))
    }

    fn float_tensor(&mut self, node: &str, key: &str) -> Result<String> {
        let (shape, v) = self.f32s(key)?;
        Ok(self.init(TensorProto {
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(dt::FLOAT),
            float_data: v,
            name: Some(format!("{node}.{}", key.rsplit('.').next().unwrap_or("t"))),
            ..Default::default()
        }))
    }

    fn ints(&mut self, name: String, v: &[i64]) -> String {
        self.init(TensorProto {
            dims: vec![v.len() as i64],
            data_type: Some(dt::INT64),
            int64_data: v.to_vec(),
            name: Some(name),
            ..Default::default()
        })
    }

    /// A fused ReLU / ReLU6 after `x`.
    fn activation(&mut self, node: &str, x: String, act: &J) -> String {
        match act.as_str() {
            Some("Relu") => {
                let out = format!("{node}.relu");
                self.node("Relu", &format!("{node}/Relu"), &[&x], &out, vec![]);
                out
            }
            Some("Relu6") => {
                let lo = self.float_scalar(&format!("{node}.min"), 0.0);
                let hi = self.float_scalar(&format!("{node}.max"), 6.0);
                let out = format!("{node}.relu6");
                self.node("Clip", &format!("{node}/Clip"), &[&x, &lo, &hi], &out, vec![]);
                out
            }
            _ => x,
        }
    }

    fn float_scalar(&mut self, name: &str, v: f32) -> String {
        self.init(TensorProto {
            data_type: Some(dt::FLOAT),
            float_data: vec![v],
            name: Some(name.into()),
            ..Default::default()
        })
    }

    /// Writes one saved node; returns its output tensor and how it is held.
    fn op(&mut self, name: &str, op: &str, a: &J, inputs: &[usize], in_q: (f32, i32)) -> Result<(String, Repr)> {
        let out = format!("{name}.out");
        let own = |a: &J| q_of(&a["out_q"]);
        let first = *inputs.first().ok_or_else(|| err(format!("{name}: no input")))?;
        let in_repr = self.vals.get(first).cloned().flatten().map(|(_, r)| r);
        // An op that keeps its input's parameters: the parameters the input arrives with.
        let same = match in_repr {
            Some(Repr::Int8(s, z)) => Repr::Int8(s, z),
            _ => Repr::Int8(in_q.0, in_q.1),
        };
        Ok(match op {
            "Identity" => self.vals[first].clone().ok_or_else(|| err(format!("{name}: input not computed")))?,
            "NanToZero" => match in_repr {
                Some(Repr::Float) => {
                    let x = self.read(first, None, name)?;
                    let (nan, zero) = (format!("{name}.isnan"), self.float_scalar(&format!("{name}.zero"), 0.0));
                    self.node("IsNaN", &format!("{name}/IsNaN"), &[&x], &nan, vec![]);
                    self.node("Where", name, &[&nan, &zero, &x], &out, vec![]);
                    (out, Repr::Float)
                }
                // Codes pass through: a quantized value holds no NaN.
                _ => self.vals[first].clone().ok_or_else(|| err(format!("{name}: input not computed")))?,
            },
            "Quantize" => {
                let x = self.read(first, None, name)?;
                let q = own(a)?;
                (self.qdq(&x, name, q), Repr::Int8(q.0, q.1))
            }
            "Conv2d" | "Linear" => {
                let x = self.read(first, Some(in_q), name)?;
                let (w, scales) = self.weight(name, a, op == "Conv2d")?;
                let b = self.bias(name, a, in_q.0, &scales)?;
                let mut ins = vec![x.as_str(), w.as_str()];
                if let Some(b) = &b {
                    ins.push(b);
                }
                let y = format!("{name}.y");
                self.product(op, name, a, &ins, &y)?;
                let y = self.activation(name, y, &a["activation"]);
                let q = own(a)?;
                (self.qdq(&y, name, q), Repr::Int8(q.0, q.1))
            }
            "ConvTranspose2d" => {
                // A 1x1 convolution of every tap's output, then ONNX's DepthToSpace (DCR:
                // channel (ky * k + kx) * c + o goes to tap (ky, kx) of channel o).
                let x = self.read(first, Some(in_q), name)?;
                let (w, scales) = self.weight(name, a, true)?;
                let b = self.bias(name, a, in_q.0, &scales)?;
                let mut ins = vec![x.as_str(), w.as_str()];
                if let Some(b) = &b {
                    ins.push(b);
                }
                let z = format!("{name}.taps");
                self.product("Conv2d", &format!("{name}/taps"), a, &ins, &z)?;
                let z = self.activation(name, z, &a["activation"]);
                let block = a["block"].as_i64().ok_or_else(|| err(format!("{name}: no block")))?;
                let y = format!("{name}.y");
                self.node("DepthToSpace", name, &[&z], &y, vec![attr_i("blocksize", block), attr_s("mode", "DCR")]);
                let q = own(a)?;
                (self.qdq(&y, name, q), Repr::Int8(q.0, q.1))
            }
            "Add" | "Mul" | "Cat" | "MatMul" => {
                let int8 = a["int8"].as_bool().unwrap_or(true);
                let qs: Vec<(f32, i32)> = match a["qs"].as_array() {
                    Some(v) => v.iter().map(q_of).collect::<Result<_>>()?,
                    None => return Err(err(format!("{name}: no input parameters"))),
                };
                let mut xs = Vec::new();
                for (k, &v) in inputs.iter().enumerate() {
                    let q = if int8 { qs.get(k).copied() } else { None };
                    xs.push(self.read(v, q, name)?);
                }
                let refs: Vec<&str> = xs.iter().map(String::as_str).collect();
                let y = format!("{name}.y");
                match op {
                    "Add" => self.node("Add", name, &refs, &y, vec![]),
                    "Mul" => self.node("Mul", name, &refs, &y, vec![]),
                    "MatMul" => self.node("MatMul", name, &refs, &y, vec![]),
                    _ => {
                        let axis = a["dim"].as_i64().unwrap_or(1);
                        self.node("Concat", name, &refs, &y, vec![attr_i("axis", axis)])
                    }
                }
                let y = if a["relu"].as_bool() == Some(true) { self.activation(name, y, &J::from("Relu")) } else { y };
                if int8 {
                    let q = own(a)?;
                    (self.qdq(&y, name, q), Repr::Int8(q.0, q.1))
                } else {
                    (y, Repr::Float)
                }
            }
            "MulScalar" => {
                let x = self.read(first, Some(in_q), name)?;
                let factor = a["factor"].as_f64().ok_or_else(|| err(format!("{name}: no factor")))? as f32;
                let c = self.float_scalar(&format!("{name}.factor"), factor);
                let y = format!("{name}.y");
                self.node("Mul", name, &[&x, &c], &y, vec![]);
                let q = q_of(&a["out"])?;
                (self.qdq(&y, name, q), Repr::Int8(q.0, q.1))
            }
            "Lut" => {
                let x = self.read(first, Some(q_of(&a["in_q"])?), name)?;
                let y = format!("{name}.y");
                if let Some(af) = a["function"].get("affine") {
                    // `activation(x * scale + shift)`: a scalar affine map's table.
                    let num = |key: &str| {
                        af[key]
                            .as_f64()
                            .map(|v| v as f32)
                            .ok_or_else(|| err(format!("{name}: an affine table without {key}")))
                    };
                    let (scale, shift) = (num("scale")?, num("shift")?);
                    let (sc, sh) = (
                        self.float_scalar(&format!("{name}.map_factor"), scale),
                        self.float_scalar(&format!("{name}.map_term"), shift),
                    );
                    let (m, z) = (format!("{name}.scaled"), format!("{name}.shifted"));
                    self.node("Mul", &format!("{name}/Mul"), &[&x, &sc], &m, vec![]);
                    self.node("Add", name, &[&m, &sh], &z, vec![]);
                    let z = self.activation(name, z, &af["activation"]);
                    self.node("Identity", &format!("{name}/out"), &[&z], &y, vec![]);
                    let q = own(a)?;
                    return Ok((self.qdq(&y, name, q), Repr::Int8(q.0, q.1)));
                }
                match a["function"].as_str().unwrap_or("") {
                    "hardswish" => self.node("HardSwish", name, &[&x], &y, vec![]),
                    "sigmoid" => self.node("Sigmoid", name, &[&x], &y, vec![]),
                    "hardsigmoid" => {
                        self.node("HardSigmoid", name, &[&x], &y, vec![attr_f("alpha", 1.0 / 6.0), attr_f("beta", 0.5)])
                    }
                    "tanh" => self.node("Tanh", name, &[&x], &y, vec![]),
                    "gelu" => self.node("Gelu", name, &[&x], &y, vec![]),
                    "gelu_tanh" => self.node("Gelu", name, &[&x], &y, vec![attr_s("approximate", "tanh")]),
                    "silu" => {
                        let s = format!("{name}.sigmoid");
                        self.node("Sigmoid", &format!("{name}/Sigmoid"), &[&x], &s, vec![]);
                        self.node("Mul", name, &[&x, &s], &y, vec![]);
                    }
                    f => return Err(err(format!("{name}: table function '{f}'"))),
                }
                let q = own(a)?;
                (self.qdq(&y, name, q), Repr::Int8(q.0, q.1))
            }
            "Softmax" => {
                let x = self.read(first, Some(in_q), name)?;
                let y = format!("{name}.y");
                self.node("Softmax", name, &[&x], &y, vec![attr_i("axis", a["dim"].as_i64().unwrap_or(-1))]);
                let q = q_of(&a["out"])?;
                (self.qdq(&y, name, q), Repr::Int8(q.0, q.1))
            }
            "LayerNorm" => {
                let x = self.read(first, Some(in_q), name)?;
                let w = self.float_tensor(name, a["weight"].as_str().unwrap_or(""))?;
                let b = self.float_tensor(name, a["bias"].as_str().unwrap_or(""))?;
                let eps = a["eps"].as_f64().unwrap_or(1e-5) as f32;
                let y = format!("{name}.y");
                self.node(
                    "LayerNormalization",
                    name,
                    &[&x, &w, &b],
                    &y,
                    vec![attr_i("axis", -1), attr_f("epsilon", eps)],
                );
                let q = q_of(&a["out"])?;
                (self.qdq(&y, name, q), Repr::Int8(q.0, q.1))
            }
            "BatchConst" => {
                // The constant (its codes dequantized, in logical order) expanded to the batch
                // of the value it reads.
                let x = self.read(first, None, name)?;
                let q = q_of(&a["out"])?;
                let key = a["codes"].as_str().unwrap_or("");
                let t = self.tensor(key)?;
                if t.dtype() != Dtype::U8 {
                    return Err(err(format!("{name}: codes '{key}' are {:?}, not U8", t.dtype())));
                }
                let shape = t.shape().to_vec();
                let codes: Vec<u8> = match shape[..] {
                    // Stored NHWC: back to NCHW.
                    [1, c, h, w] => {
                        let d = t.data();
                        (0..c * h * w).map(|i| d[(i % (h * w)) * c + i / (h * w)]).collect()
                    }
                    _ => t.data().to_vec(),
                };
                let v: Vec<f32> = codes.iter().map(|&k| q.0 * (k as i32 - q.1) as f32).collect();
                let k = self.init(TensorProto {
                    dims: shape.iter().map(|&d| d as i64).collect(),
                    data_type: Some(dt::FLOAT),
                    float_data: v,
                    name: Some(format!("{name}.value")),
                    ..Default::default()
                });
                let (s, n) = (format!("{name}.shape"), format!("{name}.batch"));
                self.node("Shape", &format!("{name}/Shape"), &[&x], &s, vec![attr_i("end", 1)]);
                let rest = self.ints(format!("{name}.rest"), &shape[1..].iter().map(|&d| d as i64).collect::<Vec<_>>());
                self.node("Concat", &format!("{name}/Concat"), &[&s, &rest], &n, vec![attr_i("axis", 0)]);
                let y = format!("{name}.y");
                self.node("Expand", name, &[&k, &n], &y, vec![]);
                (self.qdq(&y, name, q), Repr::Int8(q.0, q.1))
            }
            "AvgPoolObserved" => {
                let x = self.read(first, Some(in_q), name)?;
                let y = format!("{name}.y");
                self.avg_pool(name, &a["window"], &x, &y)?;
                let q = own(a)?;
                (self.qdq(&y, name, q), Repr::Int8(q.0, q.1))
            }
            // Ops that keep their input's parameters: the same pair after them (ONNX
            // Runtime's QDQ form for pools and data movement).
            "MaxPool2d" | "AvgPool2d" | "AdaptiveAvgPool2d" | "Flatten" | "Reshape" | "Permute" | "Slice" | "Pad2d"
            | "Upsample" | "ReLU" | "Hardtanh" | "ImageRows" | "RowsImage" | "ChannelShuffle" => {
                // Shape ops pass a float value through as float (token ids before an
                // embedding), as the converted model runs them.
                if matches!(op, "Flatten" | "Reshape" | "Permute" | "Slice") && in_repr == Some(Repr::Float) {
                    let x = self.read(first, None, name)?;
                    self.same_params_op(name, op, a, &x, &out)?;
                    return Ok((out, Repr::Float));
                }
                let x = self.read(first, Some(in_q), name)?;
                let y = format!("{name}.y");
                self.same_params_op(name, op, a, &x, &y)?;
                let Repr::Int8(s, z) = same else { unreachable!("int8") };
                (self.qdq(&y, name, (s, z)), same)
            }
            "Float" => {
                let x = self.read(first, None, name)?;
                self.float_layer(name, a, &x, &out)?;
                (out, Repr::Float)
            }
            other => {
                return Err(err(format!(
                    "node '{name}' is a {other}, which the export does not write (it writes convolutions, linear \
                     layers, additions, products, concatenations, pools, tables, clamps, shape ops, softmax, layer \
                     norms, constants and float Softmax / LayerNorm / Conv2d / ConvTranspose2d / Linear)"
                )))
            }
        })
    }

    /// A `Conv2d` (its saved geometry) as `Conv`, or a `Linear` as `Gemm`, on `ins` (input,
    /// weight, optional bias).
    fn product(&mut self, layer: &str, name: &str, a: &J, ins: &[&str], y: &str) -> Result<()> {
        if layer == "Conv2d" {
            let p = usizes(&a["padding"], "padding")?;
            let attrs = vec![
                attr_is("strides", &usizes(&a["stride"], "stride")?),
                attr_is("pads", &[p[0], p[1], p[0], p[1]]),
                attr_is("dilations", &usizes(&a["dilation"], "dilation")?),
                attr_i("group", a["groups"].as_i64().unwrap_or(1)),
            ];
            self.node("Conv", name, ins, y, attrs);
        } else {
            self.node("Gemm", name, ins, y, vec![attr_i("transB", 1)]);
        }
        Ok(())
    }

    fn avg_pool(&mut self, name: &str, window: &J, x: &str, y: &str) -> Result<()> {
        if let Some(size) = window.get("Adaptive") {
            if usizes(size, "size")? == [1, 1] {
                self.node("GlobalAveragePool", name, &[x], y, vec![]);
                return Ok(());
            }
            return Err(err(format!("{name}: adaptive average pooling to {size} (only to 1x1)")));
        }
        let w = window.get("Window").ok_or_else(|| err(format!("{name}: an average pool without a window")))?;
        self.pool("AveragePool", name, w, x, y)
    }

    fn pool(&mut self, op: &str, name: &str, a: &J, x: &str, y: &str) -> Result<()> {
        let p = usizes(&a["padding"], "padding")?;
        let mut attrs = vec![
            attr_is("kernel_shape", &usizes(&a["kernel"], "kernel")?),
            attr_is("strides", &usizes(&a["stride"], "stride")?),
            attr_is("pads", &[p[0], p[1], p[0], p[1]]),
            attr_i("ceil_mode", i64::from(a["ceil_mode"].as_bool().unwrap_or(false))),
        ];
        if op == "MaxPool" {
            attrs.push(attr_is("dilations", &usizes(&a["dilation"], "dilation")?));
        } else {
            if !a["divisor_override"].is_null() {
                return Err(err(format!("{name}: an average pool with a divisor override")));
            }
            attrs.push(attr_i("count_include_pad", i64::from(a["count_include_pad"].as_bool().unwrap_or(true))));
        }
        self.node(op, name, &[x], y, attrs);
        Ok(())
    }

    fn same_params_op(&mut self, name: &str, op: &str, a: &J, x: &str, y: &str) -> Result<()> {
        match op {
            "MaxPool2d" => self.pool("MaxPool", name, a, x, y)?,
            "AvgPool2d" => self.pool("AveragePool", name, a, x, y)?,
            "AdaptiveAvgPool2d" => self.avg_pool(name, &serde_json::json!({ "Adaptive": a }), x, y)?,
            "Flatten" => self.node("Flatten", name, &[x], y, vec![attr_i("axis", 1)]),
            "Reshape" => {
                let mut shape = usizes(&a["shape"], "shape")?;
                if a["keep_batch"].as_bool() == Some(true) {
                    shape.insert(0, 0);
                }
                let s = self.ints(format!("{name}.shape"), &shape);
                self.node("Reshape", name, &[x, &s], y, vec![]);
            }
            "Permute" => self.node("Transpose", name, &[x], y, vec![attr_is("perm", &usizes(&a["dims"], "dims")?)]),
            // [n, c, h, w] -> [n * h * w, c].
            "ImageRows" => {
                let t = format!("{name}.nhwc");
                self.node("Transpose", &format!("{name}/Transpose"), &[x], &t, vec![attr_is("perm", &[0, 2, 3, 1])]);
                self.node("Flatten", name, &[&t], y, vec![attr_i("axis", 3)]);
            }
            // [n * h * w, c] -> [c, n * h * w] -> [c, n, h, w] -> [n, c, h, w].
            "RowsImage" => {
                let (h, w) = (a["h"].as_i64().unwrap_or(1), a["w"].as_i64().unwrap_or(1));
                let (t, u) = (format!("{name}.cols"), format!("{name}.cnhw"));
                self.node("Transpose", &format!("{name}/Transpose"), &[x], &t, vec![attr_is("perm", &[1, 0])]);
                let s = self.ints(format!("{name}.shape"), &[0, -1, h, w]);
                self.node("Reshape", &format!("{name}/Reshape"), &[&t, &s], &u, vec![]);
                self.node("Transpose", name, &[&u], y, vec![attr_is("perm", &[1, 0, 2, 3])]);
            }
            // Output channel j is input channel (j % g) * (c / g) + j / g: a gather of channels.
            "ChannelShuffle" => {
                let g = a["groups"].as_u64().unwrap_or(1) as usize;
                let c = match self.shapes.get(name).map(Vec::as_slice) {
                    Some(&[_, c, _, _]) if g > 0 && c % g == 0 => c,
                    _ => {
                        return Err(err(format!(
                            "{name}: a channel shuffle needs the model's input shape to be exported (give it: \
                             export_qdq's input_shapes, or the command line's --input-shape)"
                        )))
                    }
                };
                let idx: Vec<i64> = (0..c).map(|j| ((j % g) * (c / g) + j / g) as i64).collect();
                let i = self.ints(format!("{name}.channels"), &idx);
                self.node("Gather", name, &[x, &i], y, vec![attr_i("axis", 1)]);
            }
            "Slice" => {
                let dim = a["dim"].as_i64().ok_or_else(|| err(format!("{name}: slice without a dim")))?;
                let r = &a["range"];
                let (start, end, step) = if let Some(n) = r.get("Narrow") {
                    let s = n["start"].as_i64().unwrap_or(0);
                    (s, s + n["len"].as_i64().unwrap_or(0), 1)
                } else if let Some(n) = r.get("Range") {
                    (
                        n["start"].as_i64().unwrap_or(0),
                        n["end"].as_i64().unwrap_or(i64::MAX),
                        n["step"].as_i64().unwrap_or(1),
                    )
                } else {
                    return Err(err(format!("{name}: a chunk slice (export chunks as narrow slices)")));
                };
                let ins = [
                    self.ints(format!("{name}.starts"), &[start]),
                    self.ints(format!("{name}.ends"), &[end]),
                    self.ints(format!("{name}.axes"), &[dim]),
                    self.ints(format!("{name}.steps"), &[step]),
                ];
                let refs: Vec<&str> = std::iter::once(x).chain(ins.iter().map(String::as_str)).collect();
                self.node("Slice", name, &refs, y, vec![]);
            }
            "Pad2d" => {
                let p = usizes(&a["pads"], "pads")?; // left, right, top, bottom
                let pads = self.ints(format!("{name}.pads"), &[0, 0, p[2], p[0], 0, 0, p[3], p[1]]);
                let (mode, value) = match &a["mode"] {
                    J::String(m) if m == "Reflect" => ("reflect", None),
                    J::String(m) if m == "Replicate" => ("edge", None),
                    J::Object(o) => ("constant", o.get("Constant").and_then(J::as_f64)),
                    m => return Err(err(format!("{name}: pad mode {m}"))),
                };
                let mut ins = vec![x.to_string(), pads];
                if let Some(v) = value {
                    ins.push(self.float_scalar(&format!("{name}.value"), v as f32));
                }
                let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
                self.node("Pad", name, &refs, y, vec![attr_s("mode", mode)]);
            }
            "ReLU" => {
                if a["six"].as_bool() == Some(true) {
                    let lo = self.float_scalar(&format!("{name}.min"), 0.0);
                    let hi = self.float_scalar(&format!("{name}.max"), 6.0);
                    self.node("Clip", name, &[x, &lo, &hi], y, vec![]);
                } else {
                    self.node("Relu", name, &[x], y, vec![]);
                }
            }
            "Hardtanh" => {
                let lo = self.float_scalar(&format!("{name}.min"), a["min_val"].as_f64().unwrap_or(-1.0) as f32);
                let hi = self.float_scalar(&format!("{name}.max"), a["max_val"].as_f64().unwrap_or(1.0) as f32);
                self.node("Clip", name, &[x, &lo, &hi], y, vec![]);
            }
            "Upsample" => {
                let Some(f) = a["scale_factor"].as_array().filter(|_| a["size"].is_null()) else {
                    return Err(err(format!("{name}: an upsample to a fixed size")));
                };
                let f: Vec<f32> = f.iter().map(|v| v.as_f64().unwrap_or(1.0) as f32).collect();
                let scales = self.init(TensorProto {
                    dims: vec![4],
                    data_type: Some(dt::FLOAT),
                    float_data: vec![1.0, 1.0, f[0], f[1]],
                    name: Some(format!("{name}.scales")),
                    ..Default::default()
                });
                let attrs = match &a["mode"] {
                    J::String(m) if m == "Nearest" => vec![
                        attr_s("mode", "nearest"),
                        attr_s("coordinate_transformation_mode", "asymmetric"),
                        attr_s("nearest_mode", "floor"),
                    ],
                    J::Object(o) if o.contains_key("Bilinear") => {
                        let ac = o["Bilinear"]["align_corners"].as_bool() == Some(true);
                        vec![
                            attr_s("mode", "linear"),
                            attr_s(
                                "coordinate_transformation_mode",
                                if ac { "align_corners" } else { "pytorch_half_pixel" },
                            ),
                        ]
                    }
                    m => return Err(err(format!("{name}: upsample mode {m}"))),
                };
                self.node("Resize", name, &[x, "", &scales], y, attrs);
            }
            _ => unreachable!("listed above"),
        }
        Ok(())
    }

    fn float_layer(&mut self, name: &str, a: &J, x: &str, y: &str) -> Result<()> {
        let layer = a["layer"].as_str().unwrap_or("");
        let la = &a["attrs"];
        match layer {
            "Softmax" => self.node("Softmax", name, &[x], y, vec![attr_i("axis", la["dim"].as_i64().unwrap_or(-1))]),
            "MulScalar" => {
                let factor = la["factor"].as_f64().ok_or_else(|| err(format!("{name}: no factor")))? as f32;
                let c = self.float_scalar(&format!("{name}.factor"), factor);
                self.node("Mul", name, &[x, &c], y, vec![]);
            }
            "Embedding" => {
                // Token ids arrive as f32 values (the graph's inputs are f32): cast, then
                // pick rows (negative ids count from the end in both).
                let w = self.float_tensor(name, la["weight"].as_str().unwrap_or(""))?;
                let ids = format!("{name}.ids");
                self.node("Cast", &format!("{name}/ids"), &[x], &ids, vec![attr_i("to", i64::from(dt::INT64))]);
                self.node("Gather", name, &[&w, &ids], y, vec![attr_i("axis", 0)]);
            }
            "AddScalar" => {
                let value = la["value"].as_f64().ok_or_else(|| err(format!("{name}: no value")))? as f32;
                let c = self.float_scalar(&format!("{name}.value"), value);
                self.node("Add", name, &[x, &c], y, vec![]);
            }
            "LayerNorm" => {
                let w = self.float_tensor(name, la["weight"].as_str().unwrap_or(""))?;
                let b = self.float_tensor(name, la["bias"].as_str().unwrap_or(""))?;
                let eps = la["eps"].as_f64().unwrap_or(1e-5) as f32;
                self.node(
                    "LayerNormalization",
                    name,
                    &[x, &w, &b],
                    y,
                    vec![attr_i("axis", -1), attr_f("epsilon", eps)],
                );
            }
            "Conv2d" | "Linear" => {
                let w = self.float_tensor(name, la["weight"].as_str().unwrap_or(""))?;
                let mut ins = vec![x.to_string(), w];
                if let Some(b) = la["bias"].as_str() {
                    ins.push(self.float_tensor(name, b)?);
                }
                let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
                let z = format!("{name}.y");
                self.product(layer, name, la, &refs, &z)?;
                let z = self.activation(name, z, &la["activation"]);
                self.node("Identity", &format!("{name}/out"), &[&z], y, vec![]);
            }
            "ConvTranspose2d" => {
                let w = self.float_tensor(name, la["weight"].as_str().unwrap_or(""))?;
                let mut ins = vec![x.to_string(), w];
                if let Some(b) = la["bias"].as_str() {
                    ins.push(self.float_tensor(name, b)?);
                }
                let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
                // Our padding is top, left, bottom, right: ONNX's begins then ends.
                let attrs = vec![
                    attr_is("strides", &usizes(&la["stride"], "stride")?),
                    attr_is("pads", &usizes(&la["padding"], "padding")?),
                    attr_is("output_padding", &usizes(&la["output_padding"], "output_padding")?),
                    attr_is("dilations", &usizes(&la["dilation"], "dilation")?),
                    attr_i("group", la["groups"].as_i64().unwrap_or(1)),
                ];
                let z = format!("{name}.y");
                self.node("ConvTranspose", name, &refs, &z, attrs);
                let z = self.activation(name, z, &la["activation"]);
                self.node("Identity", &format!("{name}/out"), &[&z], y, vec![]);
            }
            other => {
                return Err(err(format!(
                    "node '{name}' runs in float as a {other}; the export writes float Softmax, LayerNorm, MulScalar, AddScalar, Embedding, \
                     Conv2d, ConvTranspose2d and Linear layers"
                )))
            }
        }
        Ok(())
    }
}

/// Whether value `v` of the saved graph's `nodes` is read, and read only by float
/// embeddings, directly or through float shape ops (token ids).
fn token_ids(nodes: &[J], v: usize) -> bool {
    // The values still to check: `v`, then the outputs of the shape ops that read them.
    let mut todo = vec![v];
    while let Some(t) = todo.pop() {
        let reads = |n: &&J| n["inputs"].as_array().is_some_and(|a| a.iter().any(|i| i.as_u64() == Some(t as u64)));
        let mut read = false;
        for n in nodes.iter().filter(reads) {
            read = true;
            match n["op"].as_str().unwrap_or("") {
                "Float" if n["attrs"]["layer"].as_str() == Some("Embedding") => {}
                "Reshape" | "Flatten" | "Permute" | "Slice" => match n["output"].as_u64() {
                    // Outputs come after their inputs: the walk ends.
                    Some(o) if o as usize > t => todo.push(o as usize),
                    _ => return false,
                },
                _ => return false,
            }
        }
        if !read {
            return false;
        }
    }
    true
}

fn value_info(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeTensor { elem_type: Some(dt::FLOAT), shape: None }),
            denotation: None,
        }),
        doc_string: None,
    }
}

/// The converted model as an ONNX QDQ model: float ops between `QuantizeLinear` /
/// `DequantizeLinear` pairs with our scales and zero points, `int8` weights behind
/// per-channel `DequantizeLinear`, `int32` biases of scale input x weight (the form ONNX
/// Runtime fuses into its int8 kernels). `input_shapes` are declared on the inputs (their
/// first dimension symbolic, any batch size, unless the model's batch is fixed:
/// [`QuantizedModel::fixed_batch`]). An input read only by embeddings (through shape ops, if
/// any) is declared `INT64`: token ids, as the original model took them.
///
/// # Errors
/// A node of a kind the export does not write (it names the node and lists what it writes).
pub fn export_qdq(q: &QuantizedModel, input_shapes: &[Vec<usize>]) -> Result<ModelProto> {
    let bytes = q.to_bytes()?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| err(format!("reading the saved model: {e}")))?;
    let text = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("qrust.model"))
        .cloned()
        .ok_or_else(|| err("the saved model has no graph"))?;
    let g: J = serde_json::from_str(&text).map_err(|e| err(format!("the saved graph: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| err(format!("reading the saved model: {e}")))?;
    let values = g["values"].as_u64().unwrap_or(0) as usize;
    let shapes = if input_shapes.is_empty() {
        std::collections::HashMap::new()
    } else {
        let refs: Vec<&[usize]> = input_shapes.iter().map(Vec::as_slice).collect();
        q.value_info(&refs)?.into_iter().map(|v| (v.name, v.shape)).collect()
    };
    let mut w = Writer { st, shapes, nodes: Vec::new(), inits: Vec::new(), vals: vec![None; values], counter: 0 };
    let mut inputs = Vec::new();
    let names = g["input_names"].as_array().cloned().unwrap_or_default();
    let in_values = g["inputs"].as_array().cloned().unwrap_or_default();
    let nodes = g["nodes"].as_array().cloned().unwrap_or_default();
    for (k, v) in in_values.iter().enumerate() {
        let v = v.as_u64().ok_or_else(|| err("bad input value"))? as usize;
        let name = names.get(k).and_then(J::as_str).unwrap_or("input").to_string();
        let mut vi = value_info(&name);
        if let Some(t) = vi.r#type.as_mut().and_then(|t| t.tensor_type.as_mut()) {
            if token_ids(&nodes, v) {
                t.elem_type = Some(dt::INT64);
            }
            if let Some(shape) = input_shapes.get(k) {
                let fixed = q.fixed_batch();
                let dim = shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| crate::proto::Dimension {
                        dim_value: if i == 0 { fixed.map(|b| b as i64) } else { Some(d as i64) },
                        dim_param: (i == 0 && fixed.is_none()).then(|| "batch".to_string()),
                        denotation: None,
                    })
                    .collect();
                t.shape = Some(crate::proto::TensorShapeProto { dim });
            }
        }
        inputs.push(vi);
        let slot = w.vals.get_mut(v).ok_or_else(|| err("an input value out of range"))?;
        // Float: each int8 reader quantizes it with the parameters it reads it with (the
        // model's input parameters, `input_q`).
        *slot = Some((name.clone(), Repr::Float));
    }
    for n in nodes {
        let name = n["name"].as_str().unwrap_or("node").to_string();
        let op = n["op"].as_str().unwrap_or("").to_string();
        let ins: Vec<usize> = n["inputs"]
            .as_array()
            .map(|a| a.iter().filter_map(J::as_u64).map(|v| v as usize).collect())
            .unwrap_or_default();
        let out = n["output"].as_u64().ok_or_else(|| err(format!("{name}: no output")))? as usize;
        let in_q = q_of(&n["in_q"])?;
        let r = w.op(&name, &op, &n["attrs"], &ins, in_q)?;
        *w.vals.get_mut(out).ok_or_else(|| err(format!("{name}: output out of range")))? = Some(r);
    }
    let mut outputs = Vec::new();
    for (k, v) in g["outputs"].as_array().cloned().unwrap_or_default().iter().enumerate() {
        let v = v.as_u64().unwrap_or(u64::MAX) as usize;
        let (t, _) = w.vals.get(v).cloned().flatten().ok_or_else(|| err("an output is never computed"))?;
        let name = format!("output_{k}");
        w.node("Identity", &format!("{name}/Identity"), &[&t], &name, vec![]);
        outputs.push(value_info(&name));
    }
    Ok(ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(EXPORT_OPSET) }],
        producer_name: Some("qrust".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(GraphProto {
            node: w.nodes,
            name: Some("qrust_qdq".into()),
            initializer: w.inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// [`export_qdq`] written to `path`.
///
/// # Errors
/// As [`export_qdq`], or the file cannot be written.
pub fn save_qdq(q: &QuantizedModel, input_shapes: &[Vec<usize>], path: impl AsRef<std::path::Path>) -> Result<()> {
    let path = path.as_ref();
    let m = export_qdq(q, input_shapes)?;
    std::fs::write(path, m.encode_to_vec()).map_err(|source| OnnxError::Io { path: path.display().to_string(), source })
}
