//! The NEON per-pixel depthwise kernel (any zero points).

use std::arch::aarch64::*;

use crate::frame::aligned::Aligned;

/// Weight layout of the NEON depthwise kernel: per block of 16 channels, per tap, the 16
/// channels' `w - zw` as i16 (0 past the last channel).
pub(crate) fn pack_depthwise_neon(raw: &[i8], zero_points: &[i32], c: usize, t: usize) -> Aligned<i16> {
    let mut out = Aligned::zeroed(c.div_ceil(16) * t * 16);
    for ch in 0..c {
        let (b, i) = (ch / 16, ch % 16);
        for tap in 0..t {
            out[(b * t + tap) * 16 + i] = (raw[ch * t + tap] as i32 - zero_points[ch]) as i16;
        }
    }
    out
}

/// One output pixel of a depthwise convolution on NEON: `acc[ch] = Σ_t x_t[ch] * (w_t - zw)`
/// for the `c` channels, 16 at a time (u8 widened to i16, `smlal` into i32). With the plan's
/// column term `za * (Σ w - zw * T)` subtracted, that is the exact `Σ (x - za)(w - zw)`.
///
/// # Safety
/// Every tap slice holds `c` bytes; `packed` is `pack_depthwise_neon` for (c, taps.len());
/// `acc` holds at least `c` rounded up to 16.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn depthwise_neon_pixel(taps: &[&[u8]], c: usize, packed: &[i16], acc: &mut [i32]) {
    let t = taps.len();
    assert!(packed.len() >= c.div_ceil(16) * t * 16 && acc.len() >= c.next_multiple_of(16));
    for b in 0..c.div_ceil(16) {
        let mut s = [vdupq_n_s32(0); 4];
        let full = 16 * b + 16 <= c;
        for (tap, x) in taps.iter().enumerate() {
            let bytes = if full {
                // SAFETY: channels 16b..16b + 16 exist in the tap's c bytes.
                unsafe { vld1q_u8(x[16 * b..].as_ptr()) }
            } else {
                let mut buf = [0u8; 16];
                buf[..c - 16 * b].copy_from_slice(&x[16 * b..c]);
                // SAFETY: a local 16-byte buffer.
                unsafe { vld1q_u8(buf.as_ptr()) }
            };
            // SAFETY: block b's 16 weights of this tap (length asserted above).
            let (w0, w1) = unsafe {
                let p = packed.as_ptr().add((b * t + tap) * 16);
                (vld1q_s16(p), vld1q_s16(p.add(8)))
            };
            let lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(bytes)));
            let hi = vreinterpretq_s16_u16(vmovl_high_u8(bytes));
            s[0] = vmlal_s16(s[0], vget_low_s16(lo), vget_low_s16(w0));
            s[1] = vmlal_high_s16(s[1], lo, w0);
            s[2] = vmlal_s16(s[2], vget_low_s16(hi), vget_low_s16(w1));
            s[3] = vmlal_high_s16(s[3], hi, w1);
        }
        for (v, sv) in s.iter().enumerate() {
            // SAFETY: acc holds c rounded up to 16 (asserted).
            unsafe { vst1q_s32(acc.as_mut_ptr().add(16 * b + 4 * v), *sv) };
        }
    }
}
