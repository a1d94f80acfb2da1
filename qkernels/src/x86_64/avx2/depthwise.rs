//! The AVX2 per-pixel depthwise kernel for symmetric weights.

use std::arch::x86_64::*;

use crate::frame::aligned::Aligned;
use crate::frame::gemm::{Plan, REQUANT_LIMIT};
use crate::frame::kernels::{DwPacked, DwWeights};
use crate::frame::pack::PackedWeights;

/// Channels per block of the AVX2 depthwise layout.
pub(crate) const DW_BLOCK: usize = 16;

/// Where a depthwise pixel's taps start: one slice per tap (padding taps point at a row of
/// zero points), or, for a pixel whose taps all lie inside the image, one base pointer and
/// each tap's byte offset from it.
pub(crate) trait TapStarts {
    /// The number of taps.
    fn len(&self) -> usize;
    /// The start of tap `t`'s channels.
    fn start(&self, t: usize) -> *const u8;
}

impl TapStarts for [&[u8]] {
    fn len(&self) -> usize {
        <[&[u8]]>::len(self)
    }
    fn start(&self, t: usize) -> *const u8 {
        self[t].as_ptr()
    }
}

/// The taps of an interior pixel: `base + offsets[t]`.
pub(crate) struct TapOffsets<'a> {
    pub base: *const u8,
    pub offsets: &'a [usize],
}

impl TapStarts for TapOffsets<'_> {
    fn len(&self) -> usize {
        self.offsets.len()
    }
    fn start(&self, t: usize) -> *const u8 {
        self.base.wrapping_add(self.offsets[t])
    }
}

/// Requantizes eight raw sums of channels `j..j + n` (`n <= 8`, symmetric weights: no row
/// sum term) and stores their `n` bytes at `dst`: `requantize_scalar`'s arithmetic lane for
/// lane (the fma of the bias, the multiply, round half to even, the zero point, the clamp).
///
/// # Safety
/// AVX2 and FMA available; the plan covers channels `j..j + n`; `n` bytes writable at `dst`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn requantize8(plan: &Plan, acc: __m256i, j: usize, n: usize, dst: *mut u8) {
    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // SAFETY: masked loads read only channels j..j + n of the plan.
    let (colterm, bias, bscale, mult) = unsafe {
        (
            _mm256_maskload_epi32(plan.colterm.as_ptr().add(j), mask),
            _mm256_maskload_ps(plan.bias_term.as_ptr().add(j), mask),
            _mm256_maskload_ps(plan.bias_scale.as_ptr().add(j), mask),
            _mm256_maskload_ps(plan.mult.as_ptr().add(j), mask),
        )
    };
    let raw = _mm256_sub_epi32(acc, colterm);
    let x = _mm256_mul_ps(_mm256_fmadd_ps(bias, bscale, _mm256_cvtepi32_ps(raw)), mult);
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-REQUANT_LIMIT)), _mm256_set1_ps(REQUANT_LIMIT));
    let q = _mm256_add_epi32(_mm256_cvtps_epi32(x), _mm256_set1_epi32(plan.zo));
    let q = _mm256_min_epi32(_mm256_max_epi32(q, _mm256_set1_epi32(plan.lo)), _mm256_set1_epi32(plan.hi));
    // i32 -> i16 -> u8 with saturation: exact, the values being within lo..=hi in 0..=255.
    let w = _mm256_packs_epi32(q, q);
    let b = _mm256_packus_epi16(w, w);
    let bytes = (_mm256_cvtsi256_si32(b) as u32 as u64) | ((_mm256_extract_epi32::<4>(b) as u32 as u64) << 32);
    if n == 8 {
        // SAFETY: 8 bytes writable at dst.
        unsafe { std::ptr::write_unaligned(dst.cast::<u64>(), bytes) };
    } else {
        for (l, v) in bytes.to_le_bytes().into_iter().take(n).enumerate() {
            // SAFETY: l < n bytes writable at dst.
            unsafe { *dst.add(l) = v };
        }
    }
}

/// [`requantize8`] for sixteen channels `j..j + 16` (`acc0` the first eight, `acc1` the
/// next): plain loads of the plan, both vectors packed to bytes at once (`vpackssdw`,
/// `vpackuswb`, one permute) and clamped to `[lo, hi]` as bytes, one 16-byte store. The same
/// bytes: below `-REQUANT_LIMIT` (or `i32`'s range) a value saturates to 0 and then to `lo`,
/// as the scalar clamp to `-REQUANT_LIMIT` does; above, the clamp to `REQUANT_LIMIT` stays.
///
/// # Safety
/// AVX2 and FMA available; the plan covers channels `j..j + 16`; 16 bytes writable at `dst`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn requantize16(plan: &Plan, acc0: __m256i, acc1: __m256i, j: usize, dst: *mut u8) {
    let lim = _mm256_set1_ps(REQUANT_LIMIT);
    let vzo = _mm256_set1_epi32(plan.zo);
    let one = |acc: __m256i, jv: usize| {
        // SAFETY: channels jv..jv + 8 of the plan (precondition).
        let (colterm, bias, bscale, mult) = unsafe {
            (
                _mm256_loadu_si256(plan.colterm.as_ptr().add(jv).cast()),
                _mm256_loadu_ps(plan.bias_term.as_ptr().add(jv)),
                _mm256_loadu_ps(plan.bias_scale.as_ptr().add(jv)),
                _mm256_loadu_ps(plan.mult.as_ptr().add(jv)),
            )
        };
        let raw = _mm256_sub_epi32(acc, colterm);
        let x = _mm256_mul_ps(_mm256_fmadd_ps(bias, bscale, _mm256_cvtepi32_ps(raw)), mult);
        _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_min_ps(x, lim)), vzo)
    };
    let (q0, q1) = (one(acc0, j), one(acc1, j + 8));
    // Dwords [A B A B | A' B' A' B'] after the packs (A / A' the first vector's low / high
    // four bytes, B / B' the second's), gathered to A A' B B'.
    let w = _mm256_packs_epi32(q0, q1);
    let b = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(w, w), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let (lo, hi) = (_mm_set1_epi8(plan.lo as u8 as i8), _mm_set1_epi8(plan.hi as u8 as i8));
    let b = _mm_min_epu8(_mm_max_epu8(_mm256_castsi256_si128(b), lo), hi);
    // SAFETY: 16 bytes writable at dst (precondition).
    unsafe { _mm_storeu_si128(dst.cast(), b) };
}

/// One output pixel of a depthwise convolution with symmetric weights, requantized: for
/// every channel `Σ_t x_t[c] * w_t[c]` over the taps (padding taps point at a row of zero
/// points, which the plan's `za * Σ_t w_t` term cancels), then the plan's requantization, the
/// `c` bytes written to `out`: the bytes `generic::depthwise::pixel` writes.
///
/// Channels go 16 at a time, taps two at a time: a byte unpack interleaves two taps' bytes
/// per channel, zero-extension makes each 32-bit lane one channel's two taps as i16, and
/// `vpmaddwd` with the two taps' weights (i16 pairs) adds both products exactly into i32.
///
/// # Safety
/// AVX2 and FMA available; `c` bytes are readable from each tap's start; `packed` is
/// `conv::pack_depthwise_avx2` of these weights (`c` channels, `taps.len()` taps); `plan` is
/// this layer's (symmetric weights, `c` channels); `out` holds `c` bytes.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn depthwise_avx2_pixel_u8<T: TapStarts + ?Sized>(
    taps: &T,
    c: usize,
    packed: &[i16],
    plan: &Plan,
    out: &mut [u8],
) {
    let t = taps.len();
    let pairs = t.div_ceil(2);
    for b in 0..c.div_ceil(DW_BLOCK) {
        let at = DW_BLOCK * b;
        let valid = (c - at).min(DW_BLOCK);
        // SAFETY: as `depthwise_avx2_pixel` (precondition).
        let (r0, r1) = unsafe { block_sums(taps, at, valid, &packed[b * pairs * 2 * DW_BLOCK..], pairs) };
        // SAFETY: channels at..at + valid exist in the plan and in `out`.
        unsafe {
            if valid == DW_BLOCK {
                requantize16(plan, r0, r1, at, out.as_mut_ptr().add(at));
            } else {
                requantize8(plan, r0, at, valid.min(8), out.as_mut_ptr().add(at));
                if valid > 8 {
                    requantize8(plan, r1, at + 8, valid - 8, out.as_mut_ptr().add(at + 8));
                }
            }
        }
    }
}

/// The sums of channels `at..at + valid` (`valid <= 16`) over every tap pair: channels
/// `at..at + 8` in the first vector, the next 8 in the second.
///
/// # Safety
/// AVX2 available; `at + valid` bytes are readable from each tap's start; `w` starts at this
/// block's `pairs` groups of 32 i16.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_sums<T: TapStarts + ?Sized>(
    taps: &T,
    at: usize,
    valid: usize,
    w: &[i16],
    pairs: usize,
) -> (__m256i, __m256i) {
    let t = taps.len();
    let (mut r0, mut r1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    for g in 0..pairs {
        // Past the last tap the weights are 0; reading the last tap again is harmless.
        let (t0, t1) = (2 * g, (2 * g + 1).min(t - 1));
        let (p0, p1) = (taps.start(t0).wrapping_add(at), taps.start(t1).wrapping_add(at));
        let (x0, x1) = if valid == DW_BLOCK {
            // SAFETY: bytes at..at + 16 of each tap are readable (precondition).
            unsafe { (_mm_loadu_si128(p0.cast()), _mm_loadu_si128(p1.cast())) }
        } else {
            let (mut a, mut b) = ([0u8; DW_BLOCK], [0u8; DW_BLOCK]);
            // SAFETY: bytes at..at + valid of each tap are readable (precondition); 16-byte
            // locals.
            unsafe {
                std::ptr::copy_nonoverlapping(p0, a.as_mut_ptr(), valid);
                std::ptr::copy_nonoverlapping(p1, b.as_mut_ptr(), valid);
                (_mm_loadu_si128(a.as_ptr().cast()), _mm_loadu_si128(b.as_ptr().cast()))
            }
        };
        let lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(x0, x1));
        let hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(x0, x1));
        // SAFETY: the block holds `pairs` groups of 32 i16.
        let (w0, w1) = unsafe {
            (
                _mm256_loadu_si256(w.as_ptr().add(g * 2 * DW_BLOCK).cast()),
                _mm256_loadu_si256(w.as_ptr().add(g * 2 * DW_BLOCK + DW_BLOCK).cast()),
            )
        };
        r0 = _mm256_add_epi32(r0, _mm256_madd_epi16(lo, w0));
        r1 = _mm256_add_epi32(r1, _mm256_madd_epi16(hi, w1));
    }
    (r0, r1)
}

/// Weight layout of the AVX2 depthwise kernel: per block of 16 channels, per pair of taps,
/// 32 i16: entry `2i + tt` of the first 16 is the weight of channel `16b + i` at tap
/// `2g + tt` (`i < 8`), the next 16 the same for channels `16b + 8 + i` (0 past the last
/// channel or tap): the order a byte unpack of two taps leaves the activations in (see
/// [`depthwise_avx2_pixel_u8`]).
pub(crate) fn pack_depthwise_avx2(taps: &PackedWeights) -> Aligned<i16> {
    let (c, t) = (taps.n, taps.k);
    let (blocks, pairs) = (c.div_ceil(16), t.div_ceil(2));
    let mut out = Aligned::zeroed(blocks * pairs * 32);
    for ch in 0..c {
        let (b, i) = (ch / 16, ch % 16);
        for tap in 0..t {
            let (g, tt) = (tap / 2, tap % 2);
            out[(b * pairs + g) * 32 + 16 * (i / 8) + 2 * (i % 8) + tt] = taps.raw[ch * t + tap] as i16;
        }
    }
    out
}

/// The table's packing: symmetric weights only (the kernel multiplies by `w`, not `w - zw`).
pub(crate) fn pack(taps: &PackedWeights) -> Option<DwPacked> {
    taps.is_symmetric().then(|| DwPacked::I16(pack_depthwise_avx2(taps)))
}

/// The table's pixel entry.
///
/// # Safety
/// AVX2 and FMA available; as `DepthwiseKernels::pixel`.
pub(crate) unsafe fn pixel(taps: &[&[u8]], c: usize, w: &DwWeights<'_>, _acc: &mut [i32], px: &mut [u8]) {
    let DwPacked::I16(packed) = w.packed else { unreachable!("packed by `pack`") };
    // SAFETY: forwarded preconditions.
    unsafe { depthwise_avx2_pixel_u8(taps, c, packed, w.plan, px) }
}

/// The table's entry for a run of pixels whose taps lie inside the image.
///
/// # Safety
/// AVX2 and FMA available; as `DepthwiseKernels::run_inside`.
pub(crate) unsafe fn run_inside(
    base: *const u8,
    step: usize,
    count: usize,
    offsets: &[usize],
    c: usize,
    w: &DwWeights<'_>,
    out: &mut [u8],
) {
    let DwPacked::I16(packed) = w.packed else { unreachable!("packed by `pack`") };
    // SAFETY: forwarded preconditions.
    unsafe { depthwise_avx2_run_u8(base, step, count, offsets, c, packed, w.plan, out) }
}

/// `count` consecutive output pixels whose taps all lie inside the image: pixel `p`'s tap
/// `t` at `base + p * step + offsets[t]`, its `c` bytes written at `out[p * c..]`. Each block
/// of 16 channels goes over the run two pixels at a time, so the two pixels' sums and
/// requantizations are independent chains the core overlaps (one pixel per call leaves
/// each block's long chain of sums, conversion and packing to wait on itself). The bytes of
/// [`depthwise_avx2_pixel_u8`] for each pixel.
///
/// # Safety
/// AVX2 and FMA available; every pixel's taps hold `c` readable bytes; `packed` and `plan`
/// as for [`depthwise_avx2_pixel_u8`]; `out` holds `count * c` bytes.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_avx2_run_u8(
    base: *const u8,
    step: usize,
    count: usize,
    offsets: &[usize],
    c: usize,
    packed: &[i16],
    plan: &Plan,
    out: &mut [u8],
) {
    assert!(out.len() >= count * c, "depthwise run: {} output bytes for {count} pixels of {c}", out.len());
    let pairs = offsets.len().div_ceil(2);
    let taps = |p: usize| TapOffsets { base: base.wrapping_add(p * step), offsets };
    let dst = out.as_mut_ptr();
    for b in 0..c.div_ceil(DW_BLOCK) {
        let at = DW_BLOCK * b;
        let valid = (c - at).min(DW_BLOCK);
        let wb = &packed[b * pairs * 2 * DW_BLOCK..];
        let mut p = 0;
        if valid == DW_BLOCK {
            while p + 2 <= count {
                // SAFETY: both pixels' taps hold channels at..at + 16 (precondition); the
                // plan covers them and `out` holds both pixels' bytes.
                unsafe {
                    let (x0, x1) = block_sums(&taps(p), at, valid, wb, pairs);
                    let (y0, y1) = block_sums(&taps(p + 1), at, valid, wb, pairs);
                    requantize16(plan, x0, x1, at, dst.add(p * c + at));
                    requantize16(plan, y0, y1, at, dst.add((p + 1) * c + at));
                }
                p += 2;
            }
        }
        for p in p..count {
            // SAFETY: as above, for one pixel and `valid` channels.
            unsafe {
                let (r0, r1) = block_sums(&taps(p), at, valid, wb, pairs);
                let px = dst.add(p * c + at);
                if valid == DW_BLOCK {
                    requantize16(plan, r0, r1, at, px);
                } else {
                    requantize8(plan, r0, at, valid.min(8), px);
                    if valid > 8 {
                        requantize8(plan, r1, at + 8, valid - 8, px.add(8));
                    }
                }
            }
        }
    }
}
