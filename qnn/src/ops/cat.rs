//! Values concatenated along one dimension (`torch.cat`, a `Concat` block, ONNX `Concat`):
//! in float, and in int8 with the bytes of dequantizing each part, concatenating and
//! quantizing once (PyTorch's `quantized::cat` off its channels-last path), except along
//! dimension 1 of images, where `qkernels::cat_channels` requantizes each branch as PyTorch's
//! channels-last path does. Values that are not images have their codes mapped by a table
//! per part; images along another dimension are dequantized and quantized.

use ndarray::ArrayD;
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, op_err, parse, OpWriter, QOp, SavedQ};
use crate::error::{NnError, Result};
use crate::module::cat_dim;
use crate::quant::{quantized, Run, Value};
use crate::scratch;

/// The concatenation in the converted model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatOp {
    qs: Vec<SavedQ>,
    out_q: SavedQ,
    int8: bool,
    /// The dimension joined (models saved before it existed joined dimension 1).
    #[serde(default = "dim1")]
    dim: usize,
}

fn dim1() -> usize {
    1
}

impl CatOp {
    pub(crate) fn new(qs: Vec<QuantU8>, out_q: QuantU8, int8: bool, dim: usize) -> Self {
        CatOp { qs: qs.into_iter().map(SavedQ).collect(), out_q: out_q.into(), int8, dim }
    }
}

impl CatOp {
    /// Int8 parts that are not images (stored in their logical order) joined along `dim`: the
    /// codes of each part move to their place through a table of what dequantizing with the
    /// part's parameters and quantizing with the output's gives (a copy where they are
    /// equal), the same bytes as dequantizing, concatenating and quantizing the values.
    fn join_codes(&self, parts: Vec<Value>, out_q: QuantU8) -> Result<Value> {
        let d = self.dim;
        let mut coded = Vec::with_capacity(parts.len());
        for (v, q) in parts.into_iter().zip(&self.qs) {
            coded.push(quantized(v, q.0)?);
        }
        let first = coded[0].1.clone();
        let fits = |s: &[usize]| {
            s.len() == first.len()
                && d < s.len()
                && s.iter().zip(&first).enumerate().all(|(i, (a, b))| i == d || a == b)
        };
        if let Some((_, bad, _)) = coded.iter().find(|(_, s, _)| !fits(s)) {
            return Err(NnError::Shape {
                module: String::new(),
                kind: "Concat",
                expected: format!("parts of rank above {d} that differ only in dimension {d}; the first is {first:?}"),
                got: bad.clone(),
            });
        }
        let outer: usize = first[..d].iter().product();
        let inner = |s: &[usize]| s[d..].iter().product::<usize>();
        let total: usize = coded.iter().map(|(_, s, _)| inner(s)).sum();
        let mut shape = first.clone();
        shape[d] = coded.iter().map(|(_, s, _)| s[d]).sum();
        let mut out = scratch::take(outer * total);
        let mut off = 0;
        for (data, s, q) in &coded {
            let len = inner(s);
            let table = (*q != out_q).then(|| requantize_table(*q, out_q)).transpose()?;
            for (o, src) in data.chunks_exact(len.max(1)).take(outer).enumerate() {
                let dst = &mut out[o * total + off..o * total + off + len];
                match &table {
                    Some(t) => t.apply(src, dst).map_err(op_err)?,
                    None => dst.copy_from_slice(src),
                }
            }
            off += len;
        }
        for (data, _, _) in coded {
            scratch::give(data);
        }
        Ok(Value::U8 { data: out, shape, q: out_q })
    }
}

/// The table of `qo`'s code for each code of `qi`, through the same dequantization and
/// quantization as [`Value::to_f32`] and [`Value::quantize`] use off images.
fn requantize_table(qi: QuantU8, qo: QuantU8) -> Result<qkernels::Lut> {
    let codes: Vec<u8> = (0..=255).collect();
    let mut floats = [0.0f32; 256];
    let mut table = [0u8; 256];
    qtensor::kernels::dequantize_slice(&codes, &mut floats, qi.scale, qi.zero_point).map_err(op_err)?;
    let range = qtensor::QuantRange::full(qtensor::DType::U8);
    qtensor::kernels::quantize_slice(&floats, &mut table, qo.scale, qo.zero_point, range).map_err(op_err)?;
    Ok(qkernels::Lut::from_table(table))
}

pub(crate) const OP: (&str, super::OpLoader) = ("Cat", |j, _, node| Ok(Box::new(parse::<CatOp>(j, node, "Cat")?)));

impl QOp for CatOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        let parts = std::mem::take(args);
        let out_q = self.out_q.0;
        if !self.int8 {
            let parts: Vec<ArrayD<f32>> = parts.into_iter().map(Value::into_f32).collect();
            return Ok(Value::F32(cat_dim(&parts, self.dim, "")?));
        }
        if parts.iter().all(|p| p.shape().len() != 4) {
            // Row-major values: each part's codes mapped to the output's parameters by a table
            // (the dequantization and quantization below, per code) in place.
            return self.join_codes(parts, out_q);
        }
        if self.dim != 1 {
            // PyTorch's `quantized::cat` off its channels-last path (features, tokens, other
            // dimensions): dequantize, concatenate, quantize.
            let floats: Vec<ArrayD<f32>> = parts.into_iter().map(Value::into_f32).collect();
            let y = cat_dim(&floats, self.dim, "")?;
            return Value::quantize(y.view(), out_q).map_err(op_err);
        }
        // Along channels of images (stored NHWC).
        let mut quantized_parts = Vec::with_capacity(parts.len());
        for (v, q) in parts.into_iter().zip(&self.qs) {
            quantized_parts.push(quantized(v, q.0)?);
        }
        let dims = |s: &[usize]| match *s {
            [n, c, h, w] => Some((n, h, w, c)),
            [n, c] => Some((n, 1, 1, c)),
            _ => None,
        };
        let first = &quantized_parts[0].1;
        let Some((n, h, w, _)) = dims(first) else {
            return Err(NnError::Shape {
                module: String::new(),
                kind: "Concat",
                expected: "4-D [batch, channels, height, width] or 2-D [batch, features] branch outputs".into(),
                got: first.clone(),
            });
        };
        let mut images = Vec::with_capacity(quantized_parts.len());
        let mut channels = 0;
        for (data, shape, q) in &quantized_parts {
            match dims(shape) {
                Some((bn, bh, bw, c)) if (bn, bh, bw) == (n, h, w) && shape.len() == first.len() => {
                    channels += c;
                    images.push(qkernels::QImage { data, n, h, w, c, scale: q.scale, zero_point: q.zero_point });
                }
                _ => {
                    return Err(NnError::Shape {
                        module: String::new(),
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
        qkernels::cat_channels(&images, &mut out, out_q).map_err(op_err)?;
        let shape = if first.len() == 4 { vec![n, channels, h, w] } else { vec![n, channels] };
        drop(images);
        for (data, _, _) in quantized_parts {
            scratch::give(data);
        }
        Ok(Value::U8 { data: out, shape, q: out_q })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.out_q.0)
    }
    fn quantizes_input(&self, k: usize, _in_q: QuantU8) -> Option<QuantU8> {
        self.int8.then(|| self.qs[k].0)
    }
    fn takes_inputs(&self, n: usize) -> bool {
        n >= 1 && n == self.qs.len()
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(self))
    }
    any_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Int8 parts off images, joined along each dimension: the bytes of dequantizing,
    /// concatenating and quantizing, with parts on the output's parameters (copied) and on
    /// others (requantized); parts that differ elsewhere are an error naming both shapes.
    #[test]
    fn codes_join_as_dequantized_values_would() {
        let q = |scale: f32, zero_point: i32| QuantU8 { scale, zero_point };
        let out_q = q(0.05, 100);
        let mut s = 7u64;
        let mut part = |shape: &[usize], pq: QuantU8| {
            let n: usize = shape.iter().product();
            let data = (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 40) as u8
                })
                .collect();
            Value::U8 { data, shape: shape.to_vec(), q: pq }
        };
        for dim in 0..3 {
            let mut b = vec![2, 3, 5];
            b[dim] = 4;
            let parts = vec![part(&[2, 3, 5], out_q), part(&b, q(0.11, 3)), part(&[2, 3, 5], q(0.013, 250))];
            let qs: Vec<QuantU8> =
                parts.iter().map(|p| if let Value::U8 { q, .. } = p { *q } else { unreachable!() }).collect();
            let floats: Vec<ArrayD<f32>> = parts.iter().map(Value::to_f32).collect();
            let want = Value::quantize(cat_dim(&floats, dim, "").unwrap().view(), out_q).unwrap();
            let op = CatOp::new(qs.clone(), out_q, true, dim);
            let got = op.join_codes(parts, out_q).unwrap();
            match (got, want) {
                (Value::U8 { data: g, shape: gs, .. }, Value::U8 { data: w, shape: ws, .. }) => {
                    assert_eq!(gs, ws, "dim {dim}");
                    assert_eq!(g, w, "dim {dim}");
                }
                _ => unreachable!("int8 values"),
            }
        }
        let op = CatOp::new(vec![out_q; 2], out_q, true, 2);
        let e = op.join_codes(vec![part(&[2, 3, 5], out_q), part(&[2, 4, 5], out_q)], out_q).unwrap_err().to_string();
        assert!(e.contains("[2, 4, 5]") && e.contains("dimension 2"), "{e}");
    }
}
