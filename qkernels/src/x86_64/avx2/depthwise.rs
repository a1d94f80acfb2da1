//! The AVX2 per-pixel depthwise kernels for symmetric weights: exact `vpmaddwd` on tap pairs
//! widened to 16 bits, and `vpmaddubsw` on byte pairs where no pair sum can saturate.

use std::arch::x86_64::*;

use crate::frame::aligned::Aligned;
use crate::frame::gemm::{Plan, REQUANT_LIMIT};
use crate::frame::kernels::{DwPacked, DwWeights, DW_PAIR_BLOCK as PAIR_BLOCK};
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

/// Channel blocks `blocks` (of 16) of one output pixel of a depthwise convolution with
/// symmetric weights, requantized: for every channel `Σ_t x_t[c] * w_t[c]` over the taps (padding taps point at a row of zero
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
    blocks: std::ops::Range<usize>,
) {
    let t = taps.len();
    let pairs = t.div_ceil(2);
    for b in blocks {
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

/// Most taps a block of the byte-pair layout pairs as suits its weights (every pairing of up
/// to 10 taps, at most 945, is tried); larger kernels pair taps in order.
pub(crate) const SEARCHED_TAPS: usize = 10;

/// The largest input code for which taps `a` and `b` (`b == a`: tap `a` alone) of channels
/// `chs` cannot saturate `vpmaddubsw`'s 16-bit pair sum: `min(32767 / P, 32768 / N)`, `P` and
/// `N` the largest sums over the channels of the pair's positive weights and of its negative
/// weights' magnitudes (255 at most).
fn pair_limit(taps: &PackedWeights, chs: std::ops::Range<usize>, a: usize, b: usize) -> u8 {
    let t = taps.k;
    let (mut pos, mut neg) = (0i32, 0i32);
    for ch in chs {
        let wa = taps.raw[ch * t + a] as i32;
        let wb = if a == b { 0 } else { taps.raw[ch * t + b] as i32 };
        pos = pos.max(wa.max(0) + wb.max(0));
        neg = neg.max(-(wa.min(0) + wb.min(0)));
    }
    [(pos, i16::MAX as i32), (neg, -(i16::MIN as i32))]
        .into_iter()
        .filter(|&(sum, _)| sum > 0)
        .map(|(sum, room)| (room / sum).min(u8::MAX as i32) as u8)
        .fold(u8::MAX, u8::min)
}

/// The pairing of a block's `t <= SEARCHED_TAPS` taps with the largest bound (the smallest
/// of its pairs' [`pair_limit`]s), as slots: pair `g` multiplies taps `slots[2g]` and
/// `slots[2g + 1]`, a tap alone (odd `t`) fills both of its pair's slots. Neighbours in order
/// unless another pairing's bound is larger.
fn best_pairing(t: usize, limit: impl Fn(usize, usize) -> u8) -> (u8, Vec<usize>) {
    let lim: Vec<Vec<u8>> = (0..t).map(|a| (0..t).map(|b| limit(a, b)).collect()).collect();
    let in_order: Vec<(usize, usize)> = (0..t).step_by(2).map(|a| (a, (a + 1).min(t - 1))).collect();
    let bound_of = |pairs: &[(usize, usize)]| pairs.iter().map(|&(a, b)| lim[a][b]).fold(u8::MAX, u8::min);
    let mut best = (bound_of(&in_order), in_order);
    // Pairs the taps of `rem` (a bit mask), the pairs so far in `stack` with bound `cur`.
    fn pair_rest(
        rem: u32,
        cur: u8,
        lim: &[Vec<u8>],
        stack: &mut Vec<(usize, usize)>,
        best: &mut (u8, Vec<(usize, usize)>),
    ) {
        if cur <= best.0 {
            return;
        }
        if rem == 0 {
            *best = (cur, stack.clone());
            return;
        }
        let a = rem.trailing_zeros() as usize;
        let mut others = rem & !(1 << a);
        while others != 0 {
            let b = others.trailing_zeros() as usize;
            others &= others - 1;
            stack.push((a, b));
            pair_rest(rem & !(1 << a) & !(1 << b), cur.min(lim[a][b]), lim, stack, best);
            stack.pop();
        }
    }
    let all = (1u32 << t) - 1;
    let mut stack = Vec::new();
    if t.is_multiple_of(2) {
        pair_rest(all, u8::MAX, &lim, &mut stack, &mut best);
    } else {
        for alone in 0..t {
            stack.push((alone, alone));
            pair_rest(all & !(1 << alone), lim[alone][alone], &lim, &mut stack, &mut best);
            stack.clear();
        }
    }
    (best.0, best.1.iter().flat_map(|&(a, b)| [a, b]).collect())
}

/// Weight layout of the byte-pair kernel ([`pair_block_u8`]) for the whole blocks of 32
/// channels; per block the largest input code for which none of its 16-bit pair sums can
/// saturate; and, for kernels of at most [`SEARCHED_TAPS`] taps, per block the taps of each
/// pair's two slots ([`best_pairing`]; larger kernels pair taps `2g` and `2g + 1`, the last
/// tap of an odd count alone). Per block, per pair `g`, 64 bytes: the weights of the pair's
/// two slots in the order `vpunpcklbw` (first 32 bytes) and `vpunpckhbw` (next 32) leave two
/// 32-channel loads of the taps in: byte `16l + 2i + s` of the first half is channel `16l +
/// i`'s weight at the pair's slot `s` (`l` the 128-bit lane, `i < 8`), of the second half
/// channel `16l + 8 + i`'s; 0 for the second slot of a tap alone.
fn pack_byte_pairs(taps: &PackedWeights) -> (Aligned<i8>, Vec<u8>, Vec<u8>) {
    let (c, t) = (taps.n, taps.k);
    let (blocks, pairs) = (c / PAIR_BLOCK, t.div_ceil(2));
    let mut out = Aligned::zeroed(blocks * pairs * 2 * PAIR_BLOCK);
    let (mut bounds, mut orders) = (Vec::with_capacity(blocks), Vec::new());
    for b in 0..blocks {
        let chs = b * PAIR_BLOCK..(b + 1) * PAIR_BLOCK;
        let slots: Vec<usize> = if t <= SEARCHED_TAPS {
            let (bound, slots) = best_pairing(t, |x, y| pair_limit(taps, chs.clone(), x, y));
            bounds.push(bound);
            orders.extend(slots.iter().map(|&s| s as u8));
            slots
        } else {
            let slots: Vec<usize> = (0..2 * pairs).map(|s| if s % 2 == 1 && s == t { s - 1 } else { s }).collect();
            bounds.push(
                (0..pairs)
                    .map(|g| pair_limit(taps, chs.clone(), slots[2 * g], slots[2 * g + 1]))
                    .fold(u8::MAX, u8::min),
            );
            slots
        };
        for ch in chs {
            let i = ch % PAIR_BLOCK;
            let (lane, half, at) = (i / 16, (i % 16) / 8, i % 8);
            for g in 0..pairs {
                let (first, second) = (slots[2 * g], slots[2 * g + 1]);
                let at_g = (b * pairs + g) * 2 * PAIR_BLOCK + PAIR_BLOCK * half + 16 * lane + 2 * at;
                out[at_g] = taps.raw[ch * t + first];
                out[at_g + 1] = if second == first { 0 } else { taps.raw[ch * t + second] };
            }
        }
    }
    (out, bounds, orders)
}

/// The table's packing: symmetric weights only (the kernels multiply by `w`, not `w - zw`).
pub(crate) fn pack(taps: &PackedWeights) -> Option<DwPacked> {
    taps.is_symmetric().then(|| {
        let (bytes, bounds, orders) = pack_byte_pairs(taps);
        DwPacked::Avx2 { exact: pack_depthwise_avx2(taps), bytes, bounds, orders }
    })
}

/// The AVX2 depthwise layouts of a layer with `taps` taps and `c` channels, checked against
/// each other: both kernel entries read them through this.
struct PairLayout<'a> {
    exact: &'a [i16],
    bytes: &'a [i8],
    orders: &'a [u8],
    /// Whole blocks of 32 channels in the byte-pair layout.
    blocks: usize,
    /// Slots per block (two per pair of taps).
    slots: usize,
    /// Bytes of weights per block.
    per_block: usize,
}

impl<'a> PairLayout<'a> {
    fn of(packed: &'a DwPacked, taps: usize, c: usize) -> Self {
        let DwPacked::Avx2 { exact, bytes, bounds, orders } = packed else { unreachable!("packed by `pack`") };
        let (blocks, slots) = (bounds.len(), 2 * taps.div_ceil(2));
        let per_block = slots * PAIR_BLOCK;
        assert!(orders.is_empty() || orders.len() == blocks * slots, "byte-pair depthwise: {} slots", orders.len());
        assert!(
            blocks * PAIR_BLOCK <= c && bytes.len() >= blocks * per_block,
            "byte-pair depthwise: {} bytes",
            bytes.len()
        );
        PairLayout { exact, bytes, orders, blocks, slots, per_block }
    }
}

/// The table's pixel entry: as [`run_inside`], for one pixel whose taps are slices (padding
/// taps a row of zero points).
///
/// # Safety
/// AVX2 and FMA available; as `DepthwiseKernels::pixel` (each bit of `w.pair_blocks` set only
/// when the block's codes in every tap are within its bound).
pub(crate) unsafe fn pixel(taps: &[&[u8]], c: usize, w: &DwWeights<'_>, _acc: &mut [i32], px: &mut [u8]) {
    // SAFETY: forwarded preconditions.
    unsafe { pixel_u8(taps, c, w, px) }
}

/// [`pixel`]'s body, compiled for AVX2.
///
/// # Safety
/// As [`pixel`].
#[target_feature(enable = "avx2,fma")]
unsafe fn pixel_u8(taps: &[&[u8]], c: usize, w: &DwWeights<'_>, px: &mut [u8]) {
    assert!(px.len() >= c && taps.iter().all(|t| t.len() >= c), "depthwise pixel: {c} channels");
    let PairLayout { exact, bytes, orders, blocks, slots, per_block } = PairLayout::of(w.packed, taps.len(), c);
    let sub = PAIR_BLOCK / DW_BLOCK;
    // The taps' starts, for the blocks' pairings (kernels of at most SEARCHED_TAPS taps).
    let mut tap_ptrs = [std::ptr::null::<u8>(); SEARCHED_TAPS];
    if !orders.is_empty() {
        for (p, t) in tap_ptrs.iter_mut().zip(taps) {
            *p = t.as_ptr();
        }
    }
    for b in 0..blocks {
        // SAFETY: forwarded preconditions; a set bit: no code of the block's taps exceeds its
        // bound; the block's weights are `per_block` bytes at `b * per_block`; each tap holds
        // `c >= 32 * (b + 1)` bytes.
        unsafe {
            if b < 64 && w.pair_blocks >> b & 1 == 1 {
                let at = PAIR_BLOCK * b;
                let wb = bytes[b * per_block..].as_ptr();
                let q = if orders.is_empty() {
                    let tap = |t: usize| taps.get_unchecked(t).as_ptr().add(at);
                    match taps.len() {
                        25 => pair_sums::<25>(tap, 25, wb),
                        n => pair_sums::<0>(tap, n, wb),
                    }
                } else {
                    // The block's taps in its pairing's slots (orders name taps < taps.len()).
                    let order = &orders[b * slots..(b + 1) * slots];
                    let tap = |s: usize| tap_ptrs.get_unchecked(*order.get_unchecked(s) as usize).add(at);
                    match slots {
                        10 => pair_sums::<10>(tap, 10, wb),
                        n => pair_sums::<0>(tap, n, wb),
                    }
                };
                // Channels back in order (one pixel: cheaper than the constants reordered).
                let (c0, c8) =
                    (_mm256_permute2x128_si256::<0x20>(q[0], q[1]), _mm256_permute2x128_si256::<0x20>(q[2], q[3]));
                let (c16, c24) =
                    (_mm256_permute2x128_si256::<0x31>(q[0], q[1]), _mm256_permute2x128_si256::<0x31>(q[2], q[3]));
                requantize16(w.plan, c0, c8, at, px.as_mut_ptr().add(at));
                requantize16(w.plan, c16, c24, at + 16, px.as_mut_ptr().add(at + 16));
            } else {
                depthwise_avx2_pixel_u8(taps, c, exact, w.plan, px, sub * b..sub * (b + 1));
            }
        }
    }
    // SAFETY: forwarded preconditions.
    unsafe { depthwise_avx2_pixel_u8(taps, c, exact, w.plan, px, sub * blocks..c.div_ceil(DW_BLOCK)) };
}

/// The table's entry for a run of pixels whose taps lie inside the image: each whole block of
/// 32 channels whose inputs are within its bound (`w.pair_blocks`) through the byte-pair
/// kernel, the other channels through the exact kernel.
///
/// # Safety
/// AVX2 and FMA available; as `DepthwiseKernels::run_inside` (each bit of `w.pair_blocks`
/// set only when the block's input codes are within its bound).
pub(crate) unsafe fn run_inside(
    base: *const u8,
    step: usize,
    count: usize,
    offsets: &[usize],
    c: usize,
    w: &DwWeights<'_>,
    out: &mut [u8],
) {
    assert!(out.len() >= count * c, "depthwise run: {} output bytes for {count} pixels of {c}", out.len());
    let PairLayout { exact, bytes, orders, blocks, slots, per_block } = PairLayout::of(w.packed, offsets.len(), c);
    let sub = PAIR_BLOCK / DW_BLOCK;
    for b in 0..blocks {
        // SAFETY: forwarded preconditions; a set bit: no input code of the block exceeds its
        // bound; the block's weights are `per_block` bytes at `b * per_block`.
        unsafe {
            if b < 64 && w.pair_blocks >> b & 1 == 1 {
                let wb = bytes[b * per_block..].as_ptr();
                if orders.is_empty() {
                    pair_block_u8(base, step, count, offsets, c, PAIR_BLOCK * b, wb, w.plan, out.as_mut_ptr());
                } else {
                    // The block's tap offsets in its pairing's slots.
                    let mut slot_offsets = [0usize; 2 * SEARCHED_TAPS];
                    for (so, &o) in slot_offsets.iter_mut().zip(&orders[b * slots..(b + 1) * slots]) {
                        *so = offsets[o as usize];
                    }
                    let slot_offsets = &slot_offsets[..slots];
                    pair_block_u8(base, step, count, slot_offsets, c, PAIR_BLOCK * b, wb, w.plan, out.as_mut_ptr());
                }
            } else {
                depthwise_avx2_run_u8(base, step, count, offsets, c, exact, w.plan, out, sub * b..sub * (b + 1));
            }
        }
    }
    // SAFETY: forwarded preconditions.
    unsafe {
        depthwise_avx2_run_u8(base, step, count, offsets, c, exact, w.plan, out, sub * blocks..c.div_ceil(DW_BLOCK))
    };
}

/// The requantization constants of one block of 32 channels in the order of [`pair_sums`]'
/// four vectors: vector `k` holds channels `4k..4k + 4` in its low lane and `16 + 4k..16 +
/// 4k + 4` in its high one.
struct PairConsts {
    colterm: [[i32; 8]; 4],
    bias: [[f32; 8]; 4],
    bscale: [[f32; 8]; 4],
    mult: [[f32; 8]; 4],
}

impl PairConsts {
    fn new(plan: &Plan, at: usize) -> Self {
        let mut k =
            PairConsts { colterm: [[0; 8]; 4], bias: [[0.0; 8]; 4], bscale: [[0.0; 8]; 4], mult: [[0.0; 8]; 4] };
        for v in 0..4 {
            for l in 0..8 {
                let ch = at + if l < 4 { 4 * v + l } else { 16 + 4 * v + l - 4 };
                k.colterm[v][l] = plan.colterm[ch];
                k.bias[v][l] = plan.bias_term[ch];
                k.bscale[v][l] = plan.bias_scale[ch];
                k.mult[v][l] = plan.mult[ch];
            }
        }
        k
    }
}

/// The sums over every tap of one pixel's 32 channels at `px` (tap `t` at `px + offsets[t]`),
/// in [`PairConsts`]' order: two taps' bytes interleaved per channel (`vpunpcklbw` /
/// `vpunpckhbw`), multiplied by the pair's weights in 16 bits (`vpmaddubsw`), then two
/// pairs' 16-bit sums interleaved per channel (`vpunpcklwd` / `vpunpckhwd`) and added into
/// 32 bits (`vpmaddwd` by ones).
///
/// Tap `t`'s 32 bytes start at `tap(t)`; `T` is the number of taps when it is not 0 (the
/// loops then unroll), else `taps`.
///
/// # Safety
/// AVX2 available; `T` is 0 or `taps`; `taps > 0`; 32 bytes readable at `tap(t)` for every
/// tap `t < taps`; `w` holds the block's `taps.div_ceil(2)` groups of 64 bytes; no pair sum
/// saturates (the input codes within the layout's bound).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pair_sums<const T: usize>(tap: impl Fn(usize) -> *const u8, taps: usize, w: *const i8) -> [__m256i; 4] {
    let t = if T > 0 { T } else { taps };
    let pairs = t.div_ceil(2);
    let ones = _mm256_set1_epi16(1);
    let prod = |g: usize| {
        let (t0, t1) = (2 * g, (2 * g + 1).min(t - 1));
        // SAFETY: t0, t1 < t; both taps' 32 bytes and the pair's 64 weight bytes are readable
        // (precondition; past the last tap the weights are 0 and the last tap is read again).
        unsafe {
            let x0 = _mm256_loadu_si256(tap(t0).cast());
            let x1 = _mm256_loadu_si256(tap(t1).cast());
            let wl = _mm256_loadu_si256(w.add(g * 2 * PAIR_BLOCK).cast());
            let wh = _mm256_loadu_si256(w.add(g * 2 * PAIR_BLOCK + PAIR_BLOCK).cast());
            (
                _mm256_maddubs_epi16(_mm256_unpacklo_epi8(x0, x1), wl),
                _mm256_maddubs_epi16(_mm256_unpackhi_epi8(x0, x1), wh),
            )
        }
    };
    let mut q = [_mm256_setzero_si256(); 4];
    let mut g = 0;
    while g < pairs {
        let (la, ha) = prod(g);
        let (lb, hb) = if g + 1 < pairs { prod(g + 1) } else { (_mm256_setzero_si256(), _mm256_setzero_si256()) };
        q[0] = _mm256_add_epi32(q[0], _mm256_madd_epi16(_mm256_unpacklo_epi16(la, lb), ones));
        q[1] = _mm256_add_epi32(q[1], _mm256_madd_epi16(_mm256_unpackhi_epi16(la, lb), ones));
        q[2] = _mm256_add_epi32(q[2], _mm256_madd_epi16(_mm256_unpacklo_epi16(ha, hb), ones));
        q[3] = _mm256_add_epi32(q[3], _mm256_madd_epi16(_mm256_unpackhi_epi16(ha, hb), ones));
        g += 2;
    }
    q
}

/// Requantizes one pixel's 32 sums in [`PairConsts`]' order and stores its 32 bytes at `dst`:
/// per lane the arithmetic of [`requantize16`]; the packs (`vpackssdw` of vectors 0 and 1
/// and of 2 and 3, then `vpackuswb`) put the channels back in order.
///
/// # Safety
/// AVX2 and FMA available; 32 bytes writable at `dst`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn requantize32(k: &PairConsts, plan: &Plan, q: [__m256i; 4], dst: *mut u8) {
    let lim = _mm256_set1_ps(REQUANT_LIMIT);
    let vzo = _mm256_set1_epi32(plan.zo);
    let one = |v: usize| {
        // SAFETY: reads of the constants' 8-lane arrays.
        let (colterm, bias, bscale, mult) = unsafe {
            (
                _mm256_loadu_si256(k.colterm[v].as_ptr().cast()),
                _mm256_loadu_ps(k.bias[v].as_ptr()),
                _mm256_loadu_ps(k.bscale[v].as_ptr()),
                _mm256_loadu_ps(k.mult[v].as_ptr()),
            )
        };
        let raw = _mm256_sub_epi32(q[v], colterm);
        let x = _mm256_mul_ps(_mm256_fmadd_ps(bias, bscale, _mm256_cvtepi32_ps(raw)), mult);
        _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_min_ps(x, lim)), vzo)
    };
    let b = _mm256_packus_epi16(_mm256_packs_epi32(one(0), one(1)), _mm256_packs_epi32(one(2), one(3)));
    let (lo, hi) = (_mm256_set1_epi8(plan.lo as u8 as i8), _mm256_set1_epi8(plan.hi as u8 as i8));
    // SAFETY: 32 bytes writable at dst (precondition).
    unsafe { _mm256_storeu_si256(dst.cast(), _mm256_min_epu8(_mm256_max_epu8(b, lo), hi)) };
}

/// Channels `at..at + 32` of `count` consecutive output pixels whose taps all lie inside the
/// image (as [`depthwise_avx2_run_u8`]), on `vpmaddubsw`: the exact kernel's bytes when no
/// input code exceeds the block's bound.
///
/// # Safety
/// AVX2 and FMA available; every pixel's taps hold `c` readable bytes, those of channels
/// `at..at + 32` at most the block's bound of [`pack_byte_pairs`], whose layout of the block
/// `w` starts; `plan` covers the `c` channels; `out` holds `count * c` writable bytes.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn pair_block_u8(
    base: *const u8,
    step: usize,
    count: usize,
    offsets: &[usize],
    c: usize,
    at: usize,
    w: *const i8,
    plan: &Plan,
    out: *mut u8,
) {
    let k = PairConsts::new(plan, at);
    for p in 0..count {
        let px = base.wrapping_add(p * step + at);
        // SAFETY: t < offsets.len() for every tap `pair_sums` reads.
        let tap = |t: usize| px.wrapping_add(unsafe { *offsets.get_unchecked(t) });
        // SAFETY: the pixel's taps hold channels at..at + 32, within the bound; the block's
        // weights follow `w`; its output bytes are in `out` (preconditions). 3 x 3 (in ten
        // slots) and 5 x 5 kernels with their taps unrolled.
        unsafe {
            let q = match offsets.len() {
                10 => pair_sums::<10>(tap, 10, w),
                25 => pair_sums::<25>(tap, 25, w),
                n => pair_sums::<0>(tap, n, w),
            };
            requantize32(&k, plan, q, out.add(p * c + at));
        }
    }
}

/// Channel blocks `blocks` (of 16) of `count` consecutive output pixels whose taps all lie
/// inside the image: pixel `p`'s tap
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
    blocks: std::ops::Range<usize>,
) {
    assert!(out.len() >= count * c, "depthwise run: {} output bytes for {count} pixels of {c}", out.len());
    let pairs = offsets.len().div_ceil(2);
    let taps = |p: usize| TapOffsets { base: base.wrapping_add(p * step), offsets };
    let dst = out.as_mut_ptr();
    for b in blocks {
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
