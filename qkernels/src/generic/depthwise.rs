//! The depthwise reference: `Σ_t (x_t - za)(w_t - zw)` per channel, then the FBGEMM
//! requantization. Any zero points.

use crate::frame::gemm::requantize_scalar;
use crate::frame::kernels::{DwPacked, DwWeights};
use crate::frame::pack::PackedWeights;

/// The generic kernel reads the scalar taps: it takes every layer.
pub(crate) fn pack(_taps: &PackedWeights) -> Option<DwPacked> {
    Some(DwPacked::Scalar)
}

/// One output pixel from one slice per tap.
pub(crate) fn pixel(ptrs: &[&[u8]], _c: usize, w: &DwWeights<'_>, _acc: &mut [i32], out: &mut [u8]) {
    let (taps, plan, za) = (w.taps, w.plan, w.za);
    let t = ptrs.len();
    for (ch, o) in out.iter_mut().enumerate() {
        let zw = taps.zero_points[ch];
        let wt = &taps.raw[ch * t..(ch + 1) * t];
        let raw = ptrs.iter().zip(wt).fold(0i32, |s, (p, &v)| s + (p[ch] as i32 - za) * (v as i32 - zw));
        *o = requantize_scalar(raw, plan.bias_term[ch], plan.bias_scale[ch], plan.mult[ch], plan.zo, plan.lo, plan.hi)
            as u8;
    }
}
