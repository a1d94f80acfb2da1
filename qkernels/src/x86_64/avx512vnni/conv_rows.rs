//! The AVX-512 VNNI implicit-im2col rows: a convolution's A read in place from the padded
//! image, requantized on registers.

use std::arch::x86_64::*;
use std::ptr;

use super::gemm::{vnni_fused_any, TileRows};
use crate::frame::gemm::MAX_TAIL_QUADS;
use crate::frame::pack::{vnni_panel_len, VNNI_LANES};
use crate::x86_64::FusedOut;

/// The first `quads` quads of the `kh` segment tails of `TAIL` bytes, the first at `p`, the
/// next ones `row_step` apart, packed `4 / TAIL` to a quad in segment order.
///
/// # Safety
/// `TAIL` bytes are readable at `p + ky * row_step` for every `ky < kh`;
/// `quads <= MAX_TAIL_QUADS`.
#[inline(always)]
unsafe fn gather_tails<const TAIL: usize>(
    p: *const u8,
    kh: usize,
    row_step: usize,
    quads: usize,
) -> [u32; MAX_TAIL_QUADS] {
    let per = 4 / TAIL;
    let mut out = [0u32; MAX_TAIL_QUADS];
    for (t, q) in out.iter_mut().enumerate() {
        if t == quads {
            break;
        }
        for i in 0..per {
            let ky = t * per + i;
            if ky < kh {
                let at = p.wrapping_add(ky * row_step);
                // SAFETY: segment ky's tail is readable (precondition).
                let bytes = unsafe {
                    if TAIL == 1 {
                        u32::from(*at)
                    } else {
                        u32::from(ptr::read_unaligned(at.cast::<u16>()))
                    }
                };
                *q |= bytes << (8 * TAIL * i);
            }
        }
    }
    out
}

/// Rows read straight from a padded NHWC image (implicit im2col): row `r`'s K values are `kh`
/// segments of `seg` bytes (a multiple of 4), segment `ky` at `bases[r] + ky * row_step`,
/// then the `tail` bytes (0, 1 or 2) that follow each segment, gathered `4 / tail` segments
/// to a quad (`ConvRows`); the weights from panel `b` of a packing with K =
/// `kh * seg + tail_k(kh, tail)`.
struct ConvSegments<'a> {
    /// Each row's first segment.
    bases: &'a [*const u8],
    kh: usize,
    seg: usize,
    tail: usize,
    row_step: usize,
    b: *const i8,
    panel: usize,
}

impl TileRows for ConvSegments<'_> {
    #[inline(always)]
    unsafe fn sums<const MR: usize, const NV: usize>(&self, first: usize, init: [__m512i; NV]) -> [[__m512i; NV]; MR] {
        let bases: [*const u8; MR] = std::array::from_fn(|i| self.bases[first + i]);
        let (kh, seg, tail, row_step, b, panel) = (self.kh, self.seg, self.tail, self.row_step, self.b, self.panel);
        // SAFETY: AVX-512 F/BW/VNNI (precondition: the caller's target features); every read is
        // of a row's segments and tails, or of the K groups of the NV panels, as commented.
        unsafe {
            // The segments' tails, gathered into quads before the accumulators go live.
            let tail_quads = crate::frame::gemm::tail_k(kh, tail) / 4;
            debug_assert!(tail_quads <= MAX_TAIL_QUADS);
            let mut tails = [[0u32; MAX_TAIL_QUADS]; MR];
            for (base, tq) in bases.iter().zip(&mut tails) {
                let seg0 = base.wrapping_add(seg);
                // The tail bytes of every segment are readable (precondition).
                *tq = match tail {
                    1 => gather_tails::<1>(seg0, kh, row_step, tail_quads),
                    2 => gather_tails::<2>(seg0, kh, row_step, tail_quads),
                    _ => continue,
                };
            }
            let mut acc = [init; MR];
            let groups_per_seg = seg / 4;
            for ky in 0..kh {
                let rows: [*const u8; MR] = std::array::from_fn(|r| bases[r].wrapping_add(ky * row_step));
                let g0 = ky * groups_per_seg;
                for g in 0..groups_per_seg {
                    let mut bv = [_mm512_setzero_si512(); NV];
                    for (v, bvv) in bv.iter_mut().enumerate() {
                        // Panel v holds k / 4 groups of 64 bytes and g0 + g < k / 4.
                        *bvv = _mm512_loadu_si512(b.add(v * panel + (g0 + g) * 4 * VNNI_LANES).cast());
                    }
                    for (r, accr) in acc.iter_mut().enumerate() {
                        // 4g + 4 <= seg bytes are readable from this row's segment.
                        let av = _mm512_set1_epi32(ptr::read_unaligned(rows[r].add(4 * g).cast::<i32>()));
                        for v in 0..NV {
                            accr[v] = _mm512_dpbusd_epi32(accr[v], av, bv[v]);
                        }
                    }
                }
            }
            for t in 0..tail_quads {
                let g = kh * groups_per_seg + t;
                let mut bv = [_mm512_setzero_si512(); NV];
                for (v, bvv) in bv.iter_mut().enumerate() {
                    // Panel v holds k / 4 groups of 64 bytes and g < k / 4.
                    *bvv = _mm512_loadu_si512(b.add(v * panel + g * 4 * VNNI_LANES).cast());
                }
                for (accr, tq) in acc.iter_mut().zip(&tails) {
                    let av = _mm512_set1_epi32(tq[t] as i32);
                    for v in 0..NV {
                        accr[v] = _mm512_dpbusd_epi32(accr[v], av, bv[v]);
                    }
                }
            }
            acc
        }
    }
}

/// Rows `f.r0..f.r0 + bases.len()` of an implicit-im2col convolution (`bases[i]` is row
/// `f.r0 + i`'s first segment, see [`ConvSegments`]) times `f.ncols <= 64` columns of the
/// packed weights from panel `panel0`, requantized into the fused target ([`fused_rows`]).
///
/// # Safety
/// The CPU supports AVX-512 VNNI; for every row and `ky < kh`, `seg + tail` bytes are
/// readable at `bases[i] + ky * row_step`; `packed` is the VNNI packing of weights with
/// `k = kh * seg + tail_k(kh, tail)`, `tail <= 2` and `tail_k(kh, tail) <= 4 * MAX_TAIL_QUADS`,
/// holding the columns from panel `panel0`; the fused target covers the rows and columns.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn vnni_conv_rows(
    f: &FusedOut<'_>,
    bases: &[*const u8],
    kh: usize,
    seg: usize,
    tail: usize,
    row_step: usize,
    packed: &[i8],
    k: usize,
    panel0: usize,
) {
    let panel = vnni_panel_len(k);
    let src = ConvSegments { bases, kh, seg, tail, row_step, b: packed[panel0 * panel..].as_ptr(), panel };
    // SAFETY: forwarded preconditions.
    unsafe { vnni_fused_any(&src, bases.len(), f) }
}
