//! The AVX2 GEMM layouts: i16 pairs for the exact kernel, 4-byte groups for `vpmaddubsw`,
//! and the bound under which the latter cannot saturate.

use crate::frame::aligned::Aligned;
use crate::frame::pack::{FullRangeQuads, QuadOrder};

/// Output channels per AVX2 panel (one ymm of i32 lanes).
pub(crate) const AVX2_LANES: usize = 8;

/// The largest input code `A <= 255` for which no pair sum `a0 * w0 + a1 * w1` with
/// `a0, a1 in 0..=A` leaves i16, over the pairs `vpmaddubsw` forms (k = 2p, 2p + 1 in each
/// row of `k` weights). At least 128 for any i8 weights (the worst pairs, `127 + 127` and
/// `-128 - 128`, bound it at `32767 / 254 = 129` and `32768 / 256 = 128`), so 7-bit
/// activations always qualify; 255 when no pair can saturate at all.
#[cfg(test)]
pub(crate) fn pair_safe_max(raw: &[i8], k: usize) -> u8 {
    let mut worst_pos = 0i32;
    let mut worst_neg = 0i32;
    for row in raw.chunks_exact(k) {
        for pair in row.chunks(2) {
            let (w0, w1) = (pair[0] as i32, pair.get(1).map_or(0, |&w| w as i32));
            worst_pos = worst_pos.max(w0.max(0) + w1.max(0));
            worst_neg = worst_neg.min(w0.min(0) + w1.min(0));
        }
    }
    safe_max_of(worst_pos, worst_neg)
}

/// `pair_safe_max` from the largest pair sum of positive weights and the smallest of
/// negative ones.
fn safe_max_of(worst_pos: i32, worst_neg: i32) -> u8 {
    let by_pos = if worst_pos > 0 { i16::MAX as i32 / worst_pos } else { 255 };
    let by_neg = if worst_neg < 0 { -(i16::MIN as i32) / -worst_neg } else { 255 };
    by_pos.min(by_neg).min(255) as u8
}

/// `pack_avx2`, `pack_pairs` and `pair_safe_max` (the definitions, kept for the test) of the
/// same weights in one pass on AVX2: per panel and quad, the 8 columns' four bytes gathered
/// into the `vpmaddubsw` block, a byte shuffle and two sign extensions give the exact
/// layout's two vectors, and `vpmaddubsw` by ones gives the pair sums of the positive and of
/// the negative weights. The same layouts and bound as those three (a test compares them).
///
/// # Safety
/// The CPU has AVX2; `raw` holds at least `n * k` weights.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn pack_layouts(raw: &[i8], n: usize, k: usize) -> (Aligned<i16>, Aligned<i8>, u8) {
    use std::arch::x86_64::*;
    assert!(raw.len() >= n * k, "pack_layouts: {} weights for [{n}, {k}]", raw.len());
    let panels = n.div_ceil(AVX2_LANES);
    let quads = k.div_ceil(4);
    let mut exact = Aligned::<i16>::zeroed(panels * avx2_panel_len(k));
    let mut pairs = Aligned::<i8>::zeroed(panels * pairs_panel_len(k));
    // Within each 128-bit half (four columns): bytes 0 and 2 of each column's quad, then
    // bytes 1 and 3.
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
    );
    let ones = _mm256_set1_epi8(1);
    let zero = _mm256_setzero_si256();
    let (mut worst_pos, mut worst_neg) = (zero, zero);
    for p in 0..panels {
        let cols = (n - p * AVX2_LANES).min(AVX2_LANES);
        for g in 0..quads {
            let mut lane = [0i32; AVX2_LANES];
            for (c, q) in lane.iter_mut().enumerate().take(cols) {
                let row = &raw[(p * AVX2_LANES + c) * k..][..k];
                *q = if 4 * g + 4 <= k {
                    // SAFETY: bytes 4g..4g + 4 of the row exist.
                    unsafe { std::ptr::read_unaligned(row.as_ptr().add(4 * g).cast::<i32>()) }
                } else {
                    let mut b = [0i8; 4];
                    b[..k - 4 * g].copy_from_slice(&row[4 * g..]);
                    i32::from_le_bytes(b.map(|v| v as u8))
                };
            }
            // SAFETY: `lane` holds 8 i32; the block's 32 bytes and the exact layout's 2 x 16
            // i16 lie inside panel p's quad g of each layout.
            unsafe {
                let block = _mm256_loadu_si256(lane.as_ptr().cast());
                _mm256_storeu_si256(pairs.as_mut_ptr().add(p * pairs_panel_len(k) + g * 4 * AVX2_LANES).cast(), block);
                // Per half, its four columns' (w0, w2) then their (w1, w3); the qwords
                // reordered so that every column's (w0, w2) come first.
                let paired = _mm256_shuffle_epi8(block, split);
                let whole = _mm256_permute4x64_epi64::<0b11_01_10_00>(paired);
                let even = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(whole));
                let odd = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(whole));
                let at = exact.as_mut_ptr().add(p * avx2_panel_len(k) + g * 4 * AVX2_LANES);
                _mm256_storeu_si256(at.cast(), even);
                _mm256_storeu_si256(at.add(2 * AVX2_LANES).cast(), odd);
                let pos = _mm256_maddubs_epi16(ones, _mm256_max_epi8(block, zero));
                let neg = _mm256_maddubs_epi16(ones, _mm256_min_epi8(block, zero));
                worst_pos = _mm256_max_epi16(worst_pos, pos);
                worst_neg = _mm256_min_epi16(worst_neg, neg);
            }
        }
    }
    let (mut hi, mut lo) = ([0i16; 16], [0i16; 16]);
    // SAFETY: 16 i16 each.
    unsafe {
        _mm256_storeu_si256(hi.as_mut_ptr().cast(), worst_pos);
        _mm256_storeu_si256(lo.as_mut_ptr().cast(), worst_neg);
    }
    let (worst_pos, worst_neg) =
        (hi.iter().copied().max().unwrap_or(0) as i32, lo.iter().copied().min().unwrap_or(0) as i32);
    (exact, pairs, safe_max_of(worst_pos, worst_neg))
}

pub(crate) fn avx2_panel_len(k: usize) -> usize {
    k.div_ceil(4) * 4 * AVX2_LANES
}

/// Panels of 8 columns; within a panel, per group of 4 k, two vectors of 8 i16 pairs: the
/// even one holds `(w[4g], w[4g + 2])` of each column, the odd one `(w[4g + 1], w[4g + 3])`
/// (0 past K): the pairs that masking and shifting a broadcast quad of activation bytes
/// give (see `gemm::avx2_kernel`).
#[cfg(test)]
pub(crate) fn pack_avx2(raw: &[i8], n: usize, k: usize) -> Aligned<i16> {
    let panels = n.div_ceil(AVX2_LANES);
    let mut out = Aligned::zeroed(panels * avx2_panel_len(k));
    for j in 0..n {
        let (p, lane) = (j / AVX2_LANES, j % AVX2_LANES);
        let base = p * avx2_panel_len(k);
        for kk in 0..k {
            let (g, odd, half) = (kk / 4, kk % 2, (kk % 4) / 2);
            out[base + g * 4 * AVX2_LANES + odd * 2 * AVX2_LANES + lane * 2 + half] = raw[j * k + kk] as i16;
        }
    }
    out
}

pub(crate) fn pairs_panel_len(k: usize) -> usize {
    k.div_ceil(4) * 4 * AVX2_LANES
}

/// Panels of 8 columns; within a panel, per group of 4 k, 8 x 4 bytes (the VNNI layout on 8
/// lanes), as `vpmaddubsw` reads them.
#[cfg(test)]
pub(crate) fn pack_pairs(raw: &[i8], n: usize, k: usize) -> Aligned<i8> {
    let panels = n.div_ceil(AVX2_LANES);
    let mut out = Aligned::zeroed(panels * pairs_panel_len(k));
    for j in 0..n {
        let (p, lane) = (j / AVX2_LANES, j % AVX2_LANES);
        let base = p * pairs_panel_len(k);
        for kk in 0..k {
            out[base + (kk / 4) * 4 * AVX2_LANES + lane * 4 + kk % 4] = raw[j * k + kk];
        }
    }
    out
}

/// Largest share of a layer's whole quads that may run alone, unpaired, for the layer to
/// run two quads at a time: a pair costs three multiplications (two `vpmaddubsw`, one
/// `vpmaddwd`) per row and panel against two per quad alone, and a tile of pairs takes three
/// rows against the single-quad kernel's four; a quarter alone keeps pairing ahead.
pub(crate) const MAX_ALONE_SHARE: f64 = 0.25;

/// How many free quads a quad tries as its partner before it runs alone (bounds the packing
/// time of layers whose weights leave few pairs possible).
const PARTNER_TRIES: usize = 64;

/// Lane sums per quad of a strip in [`order_quads`]: two panels of 8 columns, two 16-bit
/// lanes per column, a sum of positive and one of negative weights per lane.
const QUAD_SUMS: usize = 2 * AVX2_LANES * 2 * 2;

/// Makes `packed` (`pack_pairs` of `raw`) readable two whole quads at a time with their
/// `vpmaddubsw` outputs added in i16, and says in which order ([`QuadOrder`]). Two quads
/// may pair when, for every column of the strip (two panels) and each 16-bit lane, their
/// four products cannot leave i16 for inputs in `0..=max_input` (`max_input * Σ positive
/// weights <= 32767`, and the negative ones `>= -32768`); each quad alone is exact up to
/// `max_input` (`pair_safe_max`). Per strip, neighbours in K (`2h`, `2h + 1`) that fit stay
/// paired; the quads of the others pair among themselves by [`greedy_pairs`], or, when that
/// leaves more than a sixteenth of the strip's quads alone, all quads afresh if that leaves
/// fewer. Pairs go in the order of their first quad, then the quads alone, and each panel's
/// quads of `packed` are moved to their positions. The sums are the same in any order
/// (integers). `None`, leaving `packed` as it was, when more than [`MAX_ALONE_SHARE`] of the
/// quads would run alone or K has no two whole quads.
///
/// # Safety
/// AVX2 available (the lane sums are compared 16 at a time).
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn order_quads(
    raw: &[i8],
    n: usize,
    k: usize,
    max_input: u8,
    packed: &mut [i8],
) -> Option<QuadOrder> {
    let whole = k / 4;
    if whole < 2 {
        return None;
    }
    let a = max_input.max(1) as i32;
    // Per lane sum (below), the largest that fits: positive sums first, then negative ones.
    let mut caps = [(i16::MAX as i32 / a) as i16; QUAD_SUMS];
    caps[QUAD_SUMS / 2..].fill((-(i16::MIN as i32) / a).min(i16::MAX as i32) as i16);
    let strip_cols = 2 * AVX2_LANES;
    let strips = n.div_ceil(strip_cols);
    let mut offsets = Vec::with_capacity(strips * whole);
    let mut paired = Vec::with_capacity(strips);
    let mut alone_count = 0;
    for s in 0..strips {
        let cols = s * strip_cols..((s + 1) * strip_cols).min(n);
        // Per quad, each 16-bit lane's sum of positive weights, then of negative ones
        // (negated): at most 2 x 128, so two quads' sums stay far inside i16. Lanes of
        // columns past the last are 0, which fits any bound.
        let mut sums = vec![0i16; whole * QUAD_SUMS];
        for g in 0..whole {
            let at = &mut sums[g * QUAD_SUMS..(g + 1) * QUAD_SUMS];
            for (c, j) in cols.clone().enumerate() {
                for lane in 0..2 {
                    let w = &raw[j * k + 4 * g + 2 * lane..j * k + 4 * g + 2 * lane + 2];
                    at[2 * c + lane] = w.iter().map(|&v| (v as i16).max(0)).sum();
                    at[QUAD_SUMS / 2 + 2 * c + lane] = w.iter().map(|&v| -(v as i16).min(0)).sum();
                }
            }
        }
        let sums_of = |g: usize| -> &[i16; QUAD_SUMS] {
            sums[g * QUAD_SUMS..(g + 1) * QUAD_SUMS].try_into().expect("a quad's sums")
        };
        // Each quad's largest lane sum: two quads whose largest sums add up to at most the
        // smaller bound fit without a look at their lanes.
        let loads: Vec<i16> = (0..whole).map(|g| sums_of(g).iter().copied().max().unwrap_or(0)).collect();
        let sure = caps[0].min(caps[QUAD_SUMS - 1]);
        let fits = |g: usize, h: usize| {
            // SAFETY: AVX2 (precondition).
            loads[g] + loads[h] <= sure || unsafe { lanes_fit(sums_of(g), sums_of(h), &caps) }
        };
        // Neighbours in K that fit stay together (the rows are then read in order); the
        // quads of the others pair among themselves. When that leaves more than a sixteenth
        // alone and pairing all quads afresh leaves fewer, the fresh pairs win.
        let load = |g: usize| loads[g] as i32;
        let mut pairs = Vec::new();
        let mut pool = Vec::new();
        for h in 0..whole / 2 {
            if fits(2 * h, 2 * h + 1) {
                pairs.push((2 * h, 2 * h + 1));
            } else {
                pool.extend([2 * h, 2 * h + 1]);
            }
        }
        if whole % 2 == 1 {
            pool.push(whole - 1);
        }
        let (more, mut alone) = greedy_pairs(pool, &load, &fits);
        pairs.extend(more);
        if alone.len() * 16 > whole {
            let (fresh, fresh_alone) = greedy_pairs((0..whole).collect(), &load, &fits);
            if fresh_alone.len() < alone.len() {
                (pairs, alone) = (fresh, fresh_alone);
            }
        }
        pairs.sort_unstable();
        alone.sort_unstable();
        alone_count += alone.len();
        paired.push(2 * pairs.len() as u32);
        offsets.extend(pairs.iter().flat_map(|&(g, h)| [g, h]).chain(alone).map(|g| 4 * g as u32));
    }
    if alone_count as f64 > MAX_ALONE_SHARE * (strips * whole) as f64 {
        return None;
    }
    let quad = 4 * AVX2_LANES;
    for p in 0..n.div_ceil(AVX2_LANES) {
        let order = &offsets[p / 2 * whole..(p / 2 + 1) * whole];
        let base = p * pairs_panel_len(k);
        let before = packed[base..base + whole * quad].to_vec();
        for (t, &off) in order.iter().enumerate() {
            let g = off as usize / 4;
            packed[base + t * quad..base + (t + 1) * quad].copy_from_slice(&before[g * quad..(g + 1) * quad]);
        }
    }
    Some(QuadOrder { offsets, paired })
}

/// Whether every lane of `x + y` is at most `caps`' (16 lanes at a time).
///
/// # Safety
/// AVX2 available.
#[target_feature(enable = "avx2")]
unsafe fn lanes_fit(x: &[i16; QUAD_SUMS], y: &[i16; QUAD_SUMS], caps: &[i16; QUAD_SUMS]) -> bool {
    use std::arch::x86_64::*;
    let mut over = _mm256_setzero_si256();
    for v in (0..QUAD_SUMS).step_by(16) {
        // SAFETY: 16 i16 at v of each array (v + 16 <= QUAD_SUMS); AVX2 (precondition).
        unsafe {
            let sum = _mm256_add_epi16(
                _mm256_loadu_si256(x.as_ptr().add(v).cast()),
                _mm256_loadu_si256(y.as_ptr().add(v).cast()),
            );
            over = _mm256_or_si256(over, _mm256_cmpgt_epi16(sum, _mm256_loadu_si256(caps.as_ptr().add(v).cast())));
        }
    }
    _mm256_testz_si256(over, over) == 1
}

/// Pairs the quads of `pool`: the heaviest (`load`) first, each with the lightest free quad
/// that `fits` it among the lightest [`PARTNER_TRIES`]; returns the pairs and the quads left
/// alone.
fn greedy_pairs(
    mut pool: Vec<usize>,
    load: &dyn Fn(usize) -> i32,
    fits: &dyn Fn(usize, usize) -> bool,
) -> (Vec<(usize, usize)>, Vec<usize>) {
    pool.sort_by_cached_key(|&g| (std::cmp::Reverse(load(g)), g));
    let mut taken = vec![false; pool.iter().max().map_or(0, |&g| g + 1)];
    let (mut pairs, mut alone) = (Vec::new(), Vec::new());
    // The lightest free quad is at or before `light`.
    let mut light = pool.len();
    for i in 0..pool.len() {
        let g = pool[i];
        if std::mem::replace(&mut taken[g], true) {
            continue;
        }
        while light > i + 1 && taken[pool[light - 1]] {
            light -= 1;
        }
        let partner =
            pool[i + 1..light].iter().rev().filter(|&&h| !taken[h]).take(PARTNER_TRIES).find(|&&h| fits(g, h));
        match partner {
            Some(&h) => {
                taken[h] = true;
                pairs.push((g.min(h), g.max(h)));
            }
            None => alone.push(g),
        }
    }
    (pairs, alone)
}

/// Largest share of a layer's quads (over all panels) that may run exactly for the layer to
/// take `vpmaddubsw` on rows of any code. The exact quads go over the rows once more, one
/// panel at a time, on top of the zeroed slots the main loop still multiplies: measured on
/// ResNet-18's 3 x 3 layers (Zen 3), the mixed kernel loses to the exact one near a fifth
/// of the quads exact (10-15% slower at three tenths); a tenth keeps it clearly ahead.
pub(crate) const MAX_EXACT_SHARE: f64 = 0.1;

/// The full-range layout ([`FullRangeQuads`]) from `packed` (`pack_pairs` of `raw`, as
/// packed), when at most [`MAX_EXACT_SHARE`] of the quads could saturate a pair sum with
/// inputs up to 255; `None` when more would, or when no pair can saturate at all
/// (`max_input == 255`: the pair layout already takes every row).
pub(crate) fn full_range_quads(raw: &[i8], n: usize, k: usize, max_input: u8, packed: &[i8]) -> Option<FullRangeQuads> {
    if max_input == u8::MAX {
        return None;
    }
    let quads = k.div_ceil(4);
    let panels = n.div_ceil(AVX2_LANES);
    let w = |j: usize, kk: usize| if kk < k { raw[j * k + kk] as i32 } else { 0 };
    let saturates = |j: usize, g: usize| {
        (0..2).any(|lane| {
            let (w0, w1) = (w(j, 4 * g + 2 * lane), w(j, 4 * g + 2 * lane + 1));
            let (pos, neg) = (w0.max(0) + w1.max(0), w0.min(0) + w1.min(0));
            255 * pos > i16::MAX as i32 || 255 * neg < i16::MIN as i32
        })
    };
    let exact: Vec<Vec<usize>> = (0..panels)
        .map(|p| {
            let cols = p * AVX2_LANES..((p + 1) * AVX2_LANES).min(n);
            (0..quads).filter(|&g| cols.clone().any(|j| saturates(j, g))).collect()
        })
        .collect();
    let count: usize = exact.iter().map(Vec::len).sum();
    if count as f64 > MAX_EXACT_SHARE * (quads * panels) as f64 {
        return None;
    }
    let mut out = Aligned::from_slice(packed);
    let quad = 4 * AVX2_LANES;
    let mut start = Vec::with_capacity(panels + 1);
    let mut list = Vec::with_capacity(count);
    start.push(0);
    for (p, gs) in exact.iter().enumerate() {
        for &g in gs {
            let at = p * pairs_panel_len(k) + g * quad;
            out[at..at + quad].fill(0);
            list.push(g as u32);
        }
        start.push(list.len() as u32);
    }
    Some(FullRangeQuads { packed: out, start, quads: list })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass AVX2 packing against the three scalar definitions, on shapes with partial
    /// panels and partial quads, random weights and weights at the i8 extremes.
    #[test]
    fn pack_layouts_matches_the_scalar_packings() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for (n, k) in [(1, 1), (3, 5), (8, 4), (9, 7), (16, 64), (17, 147), (40, 27), (64, 130)] {
            for kind in 0..3 {
                let raw: Vec<i8> = (0..n * k)
                    .map(|_| match kind {
                        0 => next() as i8,
                        1 => ((next() % 61) as i32 - 30) as i8,
                        _ => [127i8, -128, 0][(next() % 3) as usize],
                    })
                    .collect();
                // SAFETY: AVX2 detected above; raw holds n * k weights.
                let (exact, pairs, max) = unsafe { pack_layouts(&raw, n, k) };
                assert_eq!(&exact[..], &pack_avx2(&raw, n, k)[..], "exact layout, n {n} k {k} kind {kind}");
                assert_eq!(&pairs[..], &pack_pairs(&raw, n, k)[..], "pair layout, n {n} k {k} kind {kind}");
                assert_eq!(max, pair_safe_max(&raw, k), "bound, n {n} k {k} kind {kind}");
            }
        }
    }
}
