//! The 256-entry lookup table with four 64-byte `tbl` lookups.

use std::arch::aarch64::*;

/// `out[i] = table[x[i]]` on NEON, 16 bytes per step: the 256 entries as four 64-byte `tbl`
/// tables, each looked up with the index minus its base (wrapping). `tbl` gives 0 for an
/// index past its 64 bytes, so only the quarter holding the entry contributes, and OR-ing
/// the four lookups gives the entry. Returns how many leading bytes it wrote (a multiple of
/// 16).
///
/// # Safety
/// NEON available (every aarch64 CPU).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn lut_neon(table: &[u8; 256], x: &[u8], out: &mut [u8]) -> usize {
    let n = x.len().min(out.len());
    // SAFETY: each quarter reads 64 of the table's 256 bytes.
    let t: [uint8x16x4_t; 4] = std::array::from_fn(|q| unsafe { vld1q_u8_x4(table[64 * q..].as_ptr()) });
    let step = vdupq_n_u8(64);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n <= x.len().
        let idx = unsafe { vld1q_u8(x.as_ptr().add(i)) };
        let (i1, i2) = (vsubq_u8(idx, step), vsubq_u8(idx, vaddq_u8(step, step)));
        let i3 = vsubq_u8(i2, step);
        let v = vorrq_u8(
            vorrq_u8(vqtbl4q_u8(t[0], idx), vqtbl4q_u8(t[1], i1)),
            vorrq_u8(vqtbl4q_u8(t[2], i2), vqtbl4q_u8(t[3], i3)),
        );
        // SAFETY: i + 16 <= n <= out.len().
        unsafe { vst1q_u8(out.as_mut_ptr().add(i), v) };
        i += 16;
    }
    i
}
