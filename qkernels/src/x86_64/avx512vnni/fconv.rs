//! The AVX-512 `f32` convolution tile and depthwise pixel.

use std::arch::x86_64::*;

use crate::frame::fconv::{Tile, MR, PANEL};
use crate::frame::gemm::Activation;

/// The activation on sixteen lanes, as the twin's `act_one` computes it: `max(0, v)` and
/// `min(6, v)` return their second operand, `v`, when it is NaN or a zero.
#[inline]
#[target_feature(enable = "avx512f")]
fn activate16(act: Activation, v: __m512) -> __m512 {
    let zero = _mm512_setzero_ps();
    match act {
        Activation::None => v,
        Activation::Relu => _mm512_max_ps(zero, v),
        Activation::Relu6 => _mm512_min_ps(_mm512_set1_ps(6.0), _mm512_max_ps(zero, v)),
    }
}

/// The mask of the first `n` of sixteen lanes (all of them from 16 up, none at 0).
#[inline]
fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        !0
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// The tile's outputs, written to `out` (rows `ldo` apart, columns `0..cols`).
///
/// # Safety
/// The CPU has AVX-512 F. Every pointer in `t.ptrs` reads `t.seg_len` values; `t.panel` holds
/// `t.ptrs.len() / MR * t.seg_len` rows of `PANEL` values; `out` addresses
/// `(t.rows - 1) * t.ldo + t.cols` writable values.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn tile_avx512(t: &Tile<'_>, out: *mut f32, act: Activation) {
    const { assert!(PANEL == 32) };
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut w = t.panel.as_ptr();
    for seg in t.ptrs.chunks_exact(MR) {
        let p: [*const f32; MR] = seg.try_into().expect("MR pointers per segment");
        for ci in 0..t.seg_len {
            // SAFETY: `w` walks the panel's `segments * seg_len` rows of 32 values in order;
            // `p[r] + ci` is within the `seg_len` values behind each pointer.
            unsafe {
                let w0 = _mm512_loadu_ps(w);
                let w1 = _mm512_loadu_ps(w.add(16));
                w = w.add(PANEL);
                for r in 0..MR {
                    let a = _mm512_set1_ps(*p[r].add(ci));
                    acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
                }
            }
        }
    }
    // SAFETY: the bias holds PANEL values.
    let (b0, b1) = unsafe { (_mm512_loadu_ps(t.bias.as_ptr()), _mm512_loadu_ps(t.bias.as_ptr().add(16))) };
    let cols = t.cols.min(PANEL);
    let (m0, m1) = (first_lanes(cols), first_lanes(cols.saturating_sub(16)));
    for (r, a) in acc.iter().enumerate().take(t.rows) {
        let v0 = activate16(act, _mm512_add_ps(a[0], b0));
        let v1 = activate16(act, _mm512_add_ps(a[1], b1));
        // SAFETY: row r < rows starts `r * ldo` values in; the masks write only columns
        // below `cols`.
        unsafe {
            let o = out.add(r * t.ldo);
            _mm512_mask_storeu_ps(o, m0, v0);
            _mm512_mask_storeu_ps(o.add(16), m1, v1);
        }
    }
}

/// One depthwise output pixel: per channel, the bias (or 0) plus each tap's product, added
/// unfused in tap order (as the twin does), then the activation; sixty-four channels at a
/// time in four accumulators, then sixteen, then the masked rest.
///
/// # Safety
/// The CPU has AVX-512 F. Every `(input, weight)` offset pair addresses `o.len()` values of
/// `x` and of `wt`; `bias`, if any, holds `o.len()` values.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn depthwise_pixel_avx512(
    taps: &[(usize, usize)],
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    o: &mut [f32],
    act: Activation,
) {
    let c = o.len();
    let (xp, wp, op) = (x.as_ptr(), wt.as_ptr(), o.as_mut_ptr());
    let zero = _mm512_setzero_ps();
    let start = |c0: usize, m: __mmask16| match bias {
        // SAFETY: the masked lanes from c0 lie within the bias's `c` values.
        Some(b) => unsafe { _mm512_maskz_loadu_ps(m, b.as_ptr().add(c0)) },
        None => zero,
    };
    let mut c0 = 0;
    while c0 + 64 <= c {
        let mut acc = [start(c0, !0), start(c0 + 16, !0), start(c0 + 32, !0), start(c0 + 48, !0)];
        for &(xo, wo) in taps {
            for (k, a) in acc.iter_mut().enumerate() {
                let off = c0 + 16 * k;
                // SAFETY: channels off..off + 16 lie within the `c` values at each offset.
                unsafe {
                    let p = _mm512_mul_ps(_mm512_loadu_ps(xp.add(xo + off)), _mm512_loadu_ps(wp.add(wo + off)));
                    *a = _mm512_add_ps(*a, p);
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            // SAFETY: channels c0 + 16k.. + 16 lie within the pixel's `c` outputs.
            unsafe { _mm512_storeu_ps(op.add(c0 + 16 * k), activate16(act, *a)) };
        }
        c0 += 64;
    }
    while c0 < c {
        let n = (c - c0).min(16);
        let m = first_lanes(n);
        let mut a = start(c0, m);
        for &(xo, wo) in taps {
            // SAFETY: the masked lanes c0..c0 + n lie within the `c` values at each offset.
            unsafe {
                let p =
                    _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xp.add(xo + c0)), _mm512_maskz_loadu_ps(m, wp.add(wo + c0)));
                a = _mm512_add_ps(a, p);
            }
        }
        // SAFETY: the masked lanes c0..c0 + n lie within the pixel's outputs.
        unsafe { _mm512_mask_storeu_ps(op.add(c0), m, activate16(act, a)) };
        c0 += n;
    }
}

/// The table's depthwise entry (the tier argument is the table's own).
///
/// # Safety
/// AVX-512 F available; as [`depthwise_pixel_avx512`].
pub(crate) unsafe fn depthwise_pixel(
    _isa: qtensor::isa::Isa,
    taps: &[(usize, usize)],
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    o: &mut [f32],
    act: Activation,
) {
    // SAFETY: forwarded preconditions.
    unsafe { depthwise_pixel_avx512(taps, x, wt, bias, o, act) }
}
