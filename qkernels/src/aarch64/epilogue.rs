//! The NEON requantization epilogue of one row of raw sums, on every aarch64 tier.

use std::arch::aarch64::*;

use crate::frame::gemm::{Plan, REQUANT_LIMIT};

/// The NEON twin of the scalar epilogue of `generic::epilogue::requantize_row`: raw sums `acc` of
/// columns `j0..j0 + acc.len()` (one row) to bytes, 8 columns per step, in the scalar
/// path's operations and order (`fma(bias_x, bias_y, raw) * mult`, clamped to the plan's
/// limit, rounded half to even, plus the zero point, clamped). Returns how many leading
/// columns it wrote; the caller finishes the rest.
///
/// # Safety
/// The CPU has NEON (every aarch64 CPU); the plan covers columns `j0..j0 + acc.len()`.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn epilogue_u8_neon(plan: &Plan, acc: &[i32], rowsum: i32, j0: usize, out: &mut [u8]) -> usize {
    let n = acc.len().min(out.len());
    assert!(plan.colterm.len() >= j0 + n, "epilogue_u8_neon: plan shorter than its columns");
    let (vzo, vlo, vhi, vrow) = (vdupq_n_s32(plan.zo), vdupq_n_s32(plan.lo), vdupq_n_s32(plan.hi), vdupq_n_s32(rowsum));
    let (lim, nlim) = (vdupq_n_f32(REQUANT_LIMIT), vdupq_n_f32(-REQUANT_LIMIT));
    let mut c = 0;
    while c + 8 <= n {
        let q: [int32x4_t; 2] = std::array::from_fn(|h| {
            let (o, j) = (c + 4 * h, j0 + c + 4 * h);
            // SAFETY: o + 4 <= n <= acc.len(); every plan vector has at least j0 + n entries
            // (asserted for colterm; the plan's vectors share one length).
            unsafe {
                let mut raw = vsubq_s32(vld1q_s32(acc.as_ptr().add(o)), vld1q_s32(plan.colterm.as_ptr().add(j)));
                if plan.has_zw {
                    raw = vsubq_s32(raw, vmulq_s32(vrow, vld1q_s32(plan.zw.as_ptr().add(j))));
                }
                let f = vfmaq_f32(
                    vcvtq_f32_s32(raw),
                    vld1q_f32(plan.bias_term.as_ptr().add(j)),
                    vld1q_f32(plan.bias_scale.as_ptr().add(j)),
                );
                let f = vminq_f32(vmaxq_f32(vmulq_f32(f, vld1q_f32(plan.mult.as_ptr().add(j))), nlim), lim);
                vminq_s32(vmaxq_s32(vaddq_s32(vcvtnq_s32_f32(f), vzo), vlo), vhi)
            }
        });
        // Every lane lies in [lo, hi], inside 0..=255: the saturating narrows are exact.
        let bytes = vqmovn_u16(vcombine_u16(vqmovun_s32(q[0]), vqmovun_s32(q[1])));
        // SAFETY: c + 8 <= n <= out.len().
        unsafe { vst1_u8(out.as_mut_ptr().add(c), bytes) };
        c += 8;
    }
    c
}
