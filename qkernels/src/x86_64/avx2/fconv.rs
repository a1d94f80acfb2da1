//! The AVX2 + FMA `f32` convolution tile.

use std::arch::x86_64::*;

use crate::frame::fconv::{Tile, MR, PANEL};
use crate::frame::gemm::Activation;

/// The AVX2 + FMA tile: the same outputs as [`tile_avx512`], computed in passes of four
/// pixels by sixteen channels (eight accumulators), each output's products accumulated in the
/// same order.
///
/// # Safety
/// The CPU has AVX2 and FMA; the operands are as [`tile_avx512`] requires.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tile_avx2(t: &Tile<'_>, out: *mut f32, act: Activation) {
    const { assert!(PANEL == 32 && MR == 8) };
    let zero = _mm256_setzero_ps();
    let six = _mm256_set1_ps(6.0);
    let activate = |v: __m256| match act {
        Activation::None => v,
        // As in the AVX-512 tile: v passes through when NaN or a zero.
        Activation::Relu => _mm256_max_ps(zero, v),
        Activation::Relu6 => _mm256_min_ps(six, _mm256_max_ps(zero, v)),
    };
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let cols = t.cols.min(PANEL);
    for r0 in (0..t.rows.min(MR)).step_by(4) {
        let rows = (t.rows - r0).min(4);
        for c0 in (0..cols).step_by(16) {
            let mut acc = [[zero; 2]; 4];
            // SAFETY: `w` walks column `c0` of the panel's rows (32 values each, in order).
            let mut w = unsafe { t.panel.as_ptr().add(c0) };
            for seg in t.ptrs.chunks_exact(MR) {
                let p = [seg[r0], seg[r0 + 1], seg[r0 + 2], seg[r0 + 3]];
                for ci in 0..t.seg_len {
                    // SAFETY: as in the AVX-512 tile; `c0 + 16 <= PANEL`.
                    unsafe {
                        let w0 = _mm256_loadu_ps(w);
                        let w1 = _mm256_loadu_ps(w.add(8));
                        w = w.add(PANEL);
                        for r in 0..4 {
                            let a = _mm256_broadcast_ss(&*p[r].add(ci));
                            acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
                            acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
                        }
                    }
                }
            }
            // SAFETY: the bias holds PANEL values.
            let (b0, b1) =
                unsafe { (_mm256_loadu_ps(t.bias.as_ptr().add(c0)), _mm256_loadu_ps(t.bias.as_ptr().add(c0 + 8))) };
            let n = (cols - c0).min(16) as i32;
            let m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes);
            let m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), lanes);
            for (r, a) in acc.iter().enumerate().take(rows) {
                let v0 = activate(_mm256_add_ps(a[0], b0));
                let v1 = activate(_mm256_add_ps(a[1], b1));
                // SAFETY: row r0 + r < rows starts `(r0 + r) * ldo` values in; the masks
                // write only columns below `cols`.
                unsafe {
                    let o = out.add((r0 + r) * t.ldo + c0);
                    _mm256_maskstore_ps(o, m0, v0);
                    _mm256_maskstore_ps(o.add(8), m1, v1);
                }
            }
        }
    }
}
