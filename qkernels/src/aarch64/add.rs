//! The NEON quantized addition (PyTorch's vectorized formula).

use std::arch::aarch64::*;

use crate::frame::gemm::REQUANT_LIMIT;

/// PyTorch's vectorized quantized addition on NEON over `rows` rows of `ncols` bytes, row `r`
/// at `a + r * ld`, `b + r * ld` and `out + r * ld`, 16 bytes at a time (a row's last `< 16`
/// bytes through a stack copy, same formula): `fma(s, q, -s * z)` per operand, summed, ReLU
/// if asked, times `1 / so` clamped to the requantization limit, rounded half to even, plus
/// `zo`, clamped to 0..=255. The twin of the scalar loop's vector-prefix formula
/// (`generic::add::add_u8`) and of the x86 kernels. Each group of bytes is read before it is written,
/// so `out` may be `a`.
///
/// # Safety
/// NEON available; those bytes are readable at `a` and `b` and writable at `out`; `out` is
/// exactly `a` or overlaps neither input.
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn add_u8_neon(
    a: *const u8,
    (sa, za): (f32, i32),
    b: *const u8,
    (sb, zb): (f32, i32),
    out: *mut u8,
    (so, zo): (f32, i32),
    relu: bool,
    (rows, ncols, ld): (usize, usize, usize),
) {
    let (vsa, vpa, vsb, vpb) =
        (vdupq_n_f32(sa), vdupq_n_f32(sa * -(za as f32)), vdupq_n_f32(sb), vdupq_n_f32(sb * -(zb as f32)));
    let (inv, lim, nlim, zero) =
        (vdupq_n_f32(1.0 / so), vdupq_n_f32(REQUANT_LIMIT), vdupq_n_f32(-REQUANT_LIMIT), vdupq_n_f32(0.0));
    let (vzo, lo, hi) = (vdupq_n_s32(zo), vdupq_n_s32(0), vdupq_n_s32(255));
    let sixteen = |pa: *const u8, pb: *const u8, po: *mut u8| {
        // SAFETY: 16 bytes readable at `pa`, `pb` and writable at `po` (the callers below).
        let (xa, xb) = unsafe { (vld1q_u8(pa), vld1q_u8(pb)) };
        let quarters = |x: uint8x16_t| {
            let (l, h) = (vmovl_u8(vget_low_u8(x)), vmovl_high_u8(x));
            [vmovl_u16(vget_low_u16(l)), vmovl_high_u16(l), vmovl_u16(vget_low_u16(h)), vmovl_high_u16(h)]
        };
        let (qa, qb) = (quarters(xa), quarters(xb));
        let q: [int32x4_t; 4] = std::array::from_fn(|v| {
            let fa = vfmaq_f32(vpa, vsa, vcvtq_f32_u32(qa[v]));
            let fb = vfmaq_f32(vpb, vsb, vcvtq_f32_u32(qb[v]));
            let mut c = vaddq_f32(fa, fb);
            if relu {
                c = vmaxq_f32(c, zero);
            }
            let t = vminq_f32(vmaxq_f32(vmulq_f32(c, inv), nlim), lim);
            vminq_s32(vmaxq_s32(vaddq_s32(vcvtnq_s32_f32(t), vzo), lo), hi)
        });
        let h0 = vcombine_u16(vqmovun_s32(q[0]), vqmovun_s32(q[1]));
        let h1 = vcombine_u16(vqmovun_s32(q[2]), vqmovun_s32(q[3]));
        // SAFETY: as above.
        unsafe { vst1q_u8(po, vcombine_u8(vqmovn_u16(h0), vqmovn_u16(h1))) };
    };
    // Rows that fill their stride are one run of bytes.
    let (rows, ncols, ld) = if ncols == ld && rows > 1 { (1, rows * ncols, rows * ncols) } else { (rows, ncols, ld) };
    for r in 0..rows {
        let row = r * ld;
        let mut j = 0;
        // SAFETY: every group of 16 bytes lies in its row (or the run of whole rows), in
        // bounds by the caller's precondition; the last group goes through local copies.
        unsafe {
            while j + 16 <= ncols {
                sixteen(a.add(row + j), b.add(row + j), out.add(row + j));
                j += 16;
            }
            let rest = ncols - j;
            if rest > 0 {
                let (mut ta, mut tb, mut to) = ([0u8; 16], [0u8; 16], [0u8; 16]);
                std::ptr::copy_nonoverlapping(a.add(row + j), ta.as_mut_ptr(), rest);
                std::ptr::copy_nonoverlapping(b.add(row + j), tb.as_mut_ptr(), rest);
                sixteen(ta.as_ptr(), tb.as_ptr(), to.as_mut_ptr());
                std::ptr::copy_nonoverlapping(to.as_ptr(), out.add(row + j), rest);
            }
        }
    }
}
