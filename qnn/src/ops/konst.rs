//! `BatchConst`: a constant repeated over the batch of the value it reads (ViT's class token
//! expanded to the batch, its positional embedding added to every image: ONNX `Expand`,
//! `Concat` or `Add` of an initializer with a computed value). The value read gives only its
//! batch size. In int8 the constant is quantized once, at conversion, with the parameters
//! its output observer chose (it saw the constant itself), and its codes are repeated.
//!
//! `SeqConst`: a constant cut to the sequence length of the value it reads (BERT's position
//! ids, `position_ids[:, :seq_len]`, the length read off the token ids), so that a model runs
//! at any length up to the constant's. It runs in float: it feeds a lookup.

use ndarray::{ArrayD, Axis, IxDyn};
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::conv::{load_f32, save_f32};
use super::{attrs, bad, op_err, parse, LowerCx, OpWriter, QOp, SavedQ};
use crate::error::{NnError, Result};
use crate::module::Module;
use crate::quant::{FloatReason, Mode, Run, Value};
use crate::scratch;

/// `value` (of shape `[1, ...]`) repeated along axis 0 to the batch size of its input.
#[derive(Debug, Clone)]
pub struct BatchConst {
    /// The constant, its first axis of size 1.
    pub value: ArrayD<f32>,
}

impl BatchConst {
    /// A constant of shape `[1, ...]`.
    ///
    /// # Errors
    /// A constant without a leading axis of size 1.
    pub fn new(value: ArrayD<f32>) -> Result<Self> {
        let c = BatchConst { value };
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        if self.value.shape().first() == Some(&1) {
            return Ok(());
        }
        Err(NnError::Config {
            module: String::new(),
            reason: format!(
                "BatchConst: a constant of shape {:?}; it repeats a constant of shape [1, ...] over the batch",
                self.value.shape()
            ),
        })
    }

    fn out_dims(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.check()?;
        let Some(&n) = input.first() else {
            return Err(NnError::Shape {
                module: String::new(),
                kind: "BatchConst",
                expected: "an input with a batch axis (rank 1 or more)".into(),
                got: input.to_vec(),
            });
        };
        let mut s = self.value.shape().to_vec();
        s[0] = n;
        Ok(s)
    }
}

impl Module for BatchConst {
    fn kind(&self) -> &'static str {
        "BatchConst"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let shape = self.out_dims(x.shape())?;
        let n = shape[0];
        let views = vec![self.value.view(); n];
        if n == 0 {
            return Ok(ArrayD::zeros(IxDyn(&shape)));
        }
        Ok(ndarray::concatenate(Axis(0), &views).expect("equal shapes"))
    }
    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(self.out_dims(input))
    }
    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        vec![("value", &self.value)]
    }
    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        vec![("value", &mut self.value)]
    }
    fn lowering(&self) -> Mode {
        Mode::Int8
    }
    fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        self.check()?;
        let q = cx.out_q();
        let Value::U8 { data, shape, .. } = Value::quantize(self.value.view(), q).map_err(op_err)? else {
            unreachable!("quantize gives u8 values")
        };
        Ok(Box::new(BatchConstOp { codes: data, shape, out: q.into() }))
    }
    fn computes_images_apart(&self) -> bool {
        true
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(attrs(&BatchConstAttrs { value: save_f32(node, "value", &self.value, w) })))
    }
    any_methods!();
}

/// A float [`BatchConst`] as saved.
#[derive(Serialize, Deserialize)]
struct BatchConstAttrs {
    value: String,
}

/// [`BatchConst`] in a converted model: the constant's codes (stored NHWC when 4-D), for a
/// batch of one.
#[derive(Debug, Clone)]
pub struct BatchConstOp {
    codes: Vec<u8>,
    shape: Vec<usize>,
    out: SavedQ,
}

#[derive(Serialize, Deserialize)]
struct BatchConstOpAttrs {
    codes: String,
    out: SavedQ,
}

pub(crate) const OP: (&str, super::OpLoader) = ("BatchConst", |j, r, node| {
    let a: BatchConstOpAttrs = parse(j, node, "BatchConst")?;
    let (shape, codes) = r.u8s(&a.codes)?;
    if shape.first() != Some(&1) {
        return Err(bad(format!("{node}: BatchConst codes of shape {shape:?}; expected [1, ...]")));
    }
    Ok(Box::new(BatchConstOp { codes: codes.to_vec(), shape, out: a.out }))
});

pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[("BatchConst", |j, r| {
    let a: BatchConstAttrs = parse(j, "BatchConst", "BatchConst")?;
    let value = load_f32(r, &a.value)?;
    BatchConst::new(value).map(|c| Box::new(c) as Box<dyn Module>).map_err(|e| bad(e.to_string()))
})];

impl QOp for BatchConstOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        let x = args.pop().expect("one input");
        let n = x.shape().first().copied().unwrap_or(0);
        if let Value::U8 { data, .. } = x {
            scratch::give(data);
        }
        let mut shape = self.shape.clone();
        shape[0] = n;
        crate::quant::budget(&shape, 1, run, "BatchConst")?;
        let mut data = scratch::take(self.codes.len() * n);
        for chunk in data.chunks_exact_mut(self.codes.len().max(1)) {
            chunk.copy_from_slice(&self.codes);
        }
        Ok(Value::U8 { data, shape, q: self.out.0 })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.out.0)
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J> {
        let codes = w.u8s(format!("{node}.codes"), self.shape.clone(), &self.codes);
        Ok(attrs(&BatchConstOpAttrs { codes, out: self.out }))
    }
    any_methods!();
}

/// `value` cut along `axis` to the size of its input's axis `from` (the first entries kept):
/// a constant that follows the sequence length of the value it reads.
#[derive(Debug, Clone)]
pub struct SeqConst {
    /// The constant, at its longest.
    pub value: ArrayD<f32>,
    /// The axis of `value` that is cut.
    pub axis: usize,
    /// The axis of the input whose size gives the length.
    pub from: usize,
}

impl SeqConst {
    fn out_dims(&self, input: &[usize]) -> Result<Vec<usize>> {
        let err = |expected: String| NnError::Shape {
            module: String::new(),
            kind: "SeqConst",
            expected,
            got: input.to_vec(),
        };
        let Some(&max) = self.value.shape().get(self.axis) else {
            return Err(NnError::Config {
                module: String::new(),
                reason: format!("SeqConst: axis {} of a constant of shape {:?}", self.axis, self.value.shape()),
            });
        };
        match input.get(self.from) {
            None => Err(err(format!("an input with an axis {} (its sequence length)", self.from))),
            Some(&n) if n > max => Err(err(format!(
                "a sequence of at most {max} along axis {} (the model's constant of shape {:?} holds {max} positions)",
                self.from,
                self.value.shape()
            ))),
            Some(&n) => {
                let mut s = self.value.shape().to_vec();
                s[self.axis] = n;
                Ok(s)
            }
        }
    }
}

impl Module for SeqConst {
    fn kind(&self) -> &'static str {
        "SeqConst"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let n = self.out_dims(x.shape())?[self.axis];
        Ok(self.value.slice_axis(Axis(self.axis), ndarray::Slice::from(0..n)).to_owned())
    }
    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(self.out_dims(input))
    }
    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        vec![("value", &self.value)]
    }
    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        vec![("value", &mut self.value)]
    }
    fn lowering(&self) -> Mode {
        Mode::Float(FloatReason::FloatOp {
            why: "a constant cut to the sequence length (position ids): it runs in float and feeds a lookup".into(),
        })
    }
    fn computes_images_apart(&self) -> bool {
        true
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Option<Result<J>> {
        let value = save_f32(node, "value", &self.value, w);
        Some(Ok(attrs(&SeqConstAttrs { value, axis: self.axis, from: self.from })))
    }
    any_methods!();
}

/// A [`SeqConst`] as saved.
#[derive(Serialize, Deserialize)]
struct SeqConstAttrs {
    value: String,
    axis: usize,
    from: usize,
}

pub(crate) const SEQ_LAYERS: &[(&str, super::LayerLoader)] = &[("SeqConst", |j, r| {
    let a: SeqConstAttrs = parse(j, "SeqConst", "SeqConst")?;
    let value = load_f32(r, &a.value)?;
    if a.axis >= value.ndim() {
        return Err(bad(format!("SeqConst: axis {} of a constant of shape {:?}", a.axis, value.shape())));
    }
    Ok(Box::new(SeqConst { value, axis: a.axis, from: a.from }) as Box<dyn Module>)
})];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_const_follows_the_input_length_up_to_its_own() {
        let v = ArrayD::from_shape_vec(IxDyn(&[1, 5]), (0..5).map(|i| i as f32).collect()).unwrap();
        let c = SeqConst { value: v, axis: 1, from: 1 };
        for n in [1, 3, 5] {
            let y = c.forward(&ArrayD::zeros(IxDyn(&[2, n]))).unwrap();
            assert_eq!(y.shape(), &[1, n]);
            assert_eq!(y.iter().copied().collect::<Vec<_>>(), (0..n).map(|i| i as f32).collect::<Vec<_>>());
        }
        let e = c.forward(&ArrayD::zeros(IxDyn(&[1, 6]))).unwrap_err().to_string();
        assert!(e.contains("at most 5") && e.contains("[1, 6]"), "{e}");
        let e = c.forward(&ArrayD::zeros(IxDyn(&[4]))).unwrap_err().to_string();
        assert!(e.contains("axis 1"), "{e}");
    }

    #[test]
    fn repeats_over_the_batch_and_refuses_other_shapes() {
        let v = ArrayD::from_shape_vec(IxDyn(&[1, 2, 3]), (0..6).map(|i| i as f32).collect()).unwrap();
        let c = BatchConst::new(v.clone()).unwrap();
        let y = c.forward(&ArrayD::zeros(IxDyn(&[3, 5]))).unwrap();
        assert_eq!(y.shape(), &[3, 2, 3]);
        for k in 0..3 {
            assert_eq!(y.index_axis(Axis(0), k), v.index_axis(Axis(0), 0));
        }
        let e = BatchConst::new(ArrayD::zeros(IxDyn(&[2, 3]))).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("[1, ...]"), "{e}");
    }
}
