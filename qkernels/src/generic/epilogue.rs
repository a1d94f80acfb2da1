//! The scalar requantization epilogue: FBGEMM's formula per column (`requantize_scalar`).

use crate::frame::gemm::{requantize_scalar, Plan};

/// Requantizes raw sums `acc` of output columns `j0..j0 + acc.len()` (one row) into `out`.
pub(crate) fn requantize_row(plan: &Plan, acc: &[i32], rowsum: i32, j0: usize, out: &mut [u8]) {
    for (c, (&a, o)) in acc.iter().zip(out.iter_mut()).enumerate() {
        let j = j0 + c;
        let raw = a.wrapping_sub(plan.colterm[j]).wrapping_sub(rowsum.wrapping_mul(plan.zw[j]));
        *o = requantize_scalar(raw, plan.bias_term[j], plan.bias_scale[j], plan.mult[j], plan.zo, plan.lo, plan.hi)
            as u8;
    }
}
