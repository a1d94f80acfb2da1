//! A custom integer range (`QuantRange::custom`, e.g. 4-bit activations `0..=15`) on a
//! value: whatever op computes it, its codes are clamped to the range (a float value to the
//! range's dequantized bounds, so that quantizing it gives codes inside). The conversion
//! wraps every op whose output observer has such a range; PyTorch's `reduce_range` is not a
//! custom range (PyTorch does not clamp to it) and gets no wrapper.

use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, load_op, parse, OpWriter, QOp, SavedQ};
use crate::error::Result;
use crate::module::Module;
use crate::quant::{Run, Value};

/// The `u8` codes `[lo, hi]` of a custom range of observer spec `spec` (`i8` ranges shifted
/// by 128, as `i8` activations run), or `None` for the full range and PyTorch's reduced one.
pub(crate) fn custom_range(spec: &qobserve::QuantSpec) -> Option<(u8, u8)> {
    use qtensor::RangeKind;
    if !matches!(spec.range.kind(), RangeKind::Custom | RangeKind::CustomReduced) {
        return None;
    }
    let shift = if spec.dtype == qtensor::DType::I8 { 128 } else { 0 };
    let code = |v: i32| u8::try_from(v + shift).ok();
    Some((code(spec.range.qmin())?, code(spec.range.qmax())?))
}

/// Clamps `v` to codes `lo..=hi` (a float value to their dequantized bounds under `q`).
pub(crate) fn clamp_value(v: &mut Value, (lo, hi): (u8, u8), q: QuantU8) {
    match v {
        Value::U8 { data, .. } => {
            for b in data.iter_mut() {
                *b = (*b).clamp(lo, hi);
            }
        }
        Value::F32(a) => {
            let bound = |c: u8| (c as i32 - q.zero_point) as f32 * q.scale;
            let (l, h) = (bound(lo), bound(hi));
            a.mapv_inplace(|x| x.max(l).min(h));
        }
    }
}

/// An op whose output is clamped to a custom range.
#[derive(Debug)]
pub struct RangeClampOp {
    pub(crate) inner: Box<dyn QOp>,
    pub(crate) lo: u8,
    pub(crate) hi: u8,
    /// The parameters the range is meant in (the output observer's).
    pub(crate) q: QuantU8,
}

#[derive(Serialize, Deserialize)]
struct RangeAttrs {
    lo: u8,
    hi: u8,
    q: SavedQ,
    op: String,
    attrs: J,
}

pub(crate) const OP: (&str, super::OpLoader) = ("RangeClamp", |j, r, node| {
    let a: RangeAttrs = parse(j, node, "RangeClamp")?;
    if a.lo > a.hi || a.op == "RangeClamp" {
        return Err(super::bad(format!("{node}: a range clamp of {}..={} around {}", a.lo, a.hi, a.op)));
    }
    let inner = load_op(&a.op, &a.attrs, r, node)?;
    Ok(Box::new(RangeClampOp { inner, lo: a.lo, hi: a.hi, q: a.q.0 }))
});

impl QOp for RangeClampOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, run: Run) -> Result<Value> {
        let mut v = self.inner.run(args, in_q, run)?;
        clamp_value(&mut v, (self.lo, self.hi), self.q);
        Ok(v)
    }
    fn out_q(&self) -> Option<QuantU8> {
        self.inner.out_q()
    }
    fn quantizes_input(&self, k: usize, in_q: QuantU8) -> Option<QuantU8> {
        self.inner.quantizes_input(k, in_q)
    }
    fn images_apart(&self) -> bool {
        self.inner.images_apart()
    }
    fn macs(&self, out_shape: &[usize]) -> Option<u64> {
        self.inner.macs(out_shape)
    }

    fn kernel(&self) -> Option<String> {
        self.inner.kernel()
    }

    fn takes_inputs(&self, n: usize) -> bool {
        self.inner.takes_inputs(n)
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J> {
        let inner = self.inner.save(node, w)?;
        Ok(attrs(&RangeAttrs {
            lo: self.lo,
            hi: self.hi,
            q: self.q.into(),
            op: self.inner.op_name().to_string(),
            attrs: inner,
        }))
    }
    fn weight_sqnr(&self, float: &dyn Module) -> Option<f64> {
        self.inner.weight_sqnr(float)
    }
    any_methods!();
}
