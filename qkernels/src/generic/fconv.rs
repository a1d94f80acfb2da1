//! The `f32` convolution's scalar tile (the twin of the vector tiles) and its depthwise
//! pixel, compiled per tier.

use crate::frame::fconv::{act_one, Tile, MR, PANEL};
use crate::frame::gemm::Activation;
use qtensor::multiversion;

/// The table's tile entry: [`tile_twin`] on the tile's output.
///
/// # Safety
/// As [`Tile`] documents; `out` holds `(rows - 1) * ldo + cols` values.
pub(crate) unsafe fn tile(t: &Tile<'_>, out: *mut f32, act: Activation) {
    // SAFETY: the caller's precondition: `out` holds this many values.
    let out = unsafe { std::slice::from_raw_parts_mut(out, (t.rows - 1) * t.ldo + t.cols) };
    tile_twin(t, out, act);
}

/// The scalar twin of the vector tiles: the same products, accumulated in the same order.
pub(crate) fn tile_twin(t: &Tile<'_>, out: &mut [f32], act: Activation) {
    let mut acc = [[0.0f32; PANEL]; MR];
    for (s, seg) in t.ptrs.chunks_exact(MR).enumerate() {
        for ci in 0..t.seg_len {
            let wk = &t.panel[(s * t.seg_len + ci) * PANEL..][..PANEL];
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: the caller of `run_tile` promised `seg_len` readable values
                // behind every pointer.
                let a = unsafe { *seg[r].add(ci) };
                for (v, &w) in row.iter_mut().zip(wk) {
                    *v = a.mul_add(w, *v);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(t.rows) {
        let o = &mut out[r * t.ldo..][..t.cols];
        for ((dst, &v), &b) in o.iter_mut().zip(row).zip(t.bias) {
            *dst = act_one(act, v + b);
        }
    }
}

multiversion! {
    /// One depthwise output pixel, the scalar twin of the AVX-512 kernel (compiled per tier,
    /// the AVX2 tier's depthwise kernel): per channel, the bias (or 0) plus each tap's
    /// product, added unfused in tap order, then the activation; blocks of 32 channels summed
    /// over every tap, a loop the compiler vectorises.
    pub(crate) fn depthwise_pixel(
        taps: &[(usize, usize)],
        x: &[f32],
        wt: &[f32],
        bias: Option<&[f32]>,
        o: &mut [f32],
        act: Activation,
    ) {
        const BLOCK: usize = 32;
        let c = o.len();
        let mut c0 = 0;
        while c0 < c {
            let n = BLOCK.min(c - c0);
            let mut acc = [0.0f32; BLOCK];
            if let Some(b) = bias {
                acc[..n].copy_from_slice(&b[c0..c0 + n]);
            }
            for &(xo, wo) in taps {
                let (xs, ws) = (&x[xo + c0..][..n], &wt[wo + c0..][..n]);
                for ((a, &xv), &wv) in acc[..n].iter_mut().zip(xs).zip(ws) {
                    *a += xv * wv;
                }
            }
            for (dst, &a) in o[c0..c0 + n].iter_mut().zip(&acc[..n]) {
                *dst = act_one(act, a);
            }
            c0 += n;
        }
    }
}
