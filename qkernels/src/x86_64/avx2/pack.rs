//! The AVX2 GEMM layouts: i16 pairs for the exact kernel, 4-byte groups for `vpmaddubsw`,
//! and the bound under which the latter cannot saturate.

use crate::frame::aligned::Aligned;
use crate::frame::pack::{ApartQuads, FullRangeQuads};

/// Output channels per AVX2 panel (one ymm of i32 lanes).
pub(crate) const AVX2_LANES: usize = 8;

/// The largest input code `A <= 255` for which no pair sum `a0 * w0 + a1 * w1` with
/// `a0, a1 in 0..=A` leaves i16, over the pairs `vpmaddubsw` forms (k = 2p, 2p + 1 in each
/// row of `k` weights). At least 128 for any i8 weights (the worst pairs, `127 + 127` and
/// `-128 - 128`, bound it at `32767 / 254 = 129` and `32768 / 256 = 128`), so 7-bit
/// activations always qualify; 255 when no pair can saturate at all.
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
    let by_pos = if worst_pos > 0 { i16::MAX as i32 / worst_pos } else { 255 };
    let by_neg = if worst_neg < 0 { -(i16::MIN as i32) / -worst_neg } else { 255 };
    by_pos.min(by_neg).min(255) as u8
}

pub(crate) fn avx2_panel_len(k: usize) -> usize {
    k.div_ceil(4) * 4 * AVX2_LANES
}

/// Panels of 8 columns; within a panel, per group of 4 k, two vectors of 8 i16 pairs: the
/// even one holds `(w[4g], w[4g + 2])` of each column, the odd one `(w[4g + 1], w[4g + 3])`
/// (0 past K): the pairs that masking and shifting a broadcast quad of activation bytes
/// give (see `gemm::avx2_kernel`).
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

/// Largest share of a layer's pairs of quads that may need one quad apart for the layer to
/// run two quads at a time: a pair costs three multiplications (two `vpmaddubsw`, one
/// `vpmaddwd`) against four apart, and a quad apart two more, so pairing wins while at most
/// half of the pairs split; a quarter keeps the loop over the quads apart a small part.
pub(crate) const MAX_SPLIT_SHARE: f64 = 0.25;

/// Makes `packed` (`pack_pairs` of `raw`) readable two whole quads at a time with their
/// `vpmaddubsw` outputs added in i16: for each panel and each pair of quads `(2h, 2h + 1)`,
/// when some column's four products of either 16-bit lane could leave i16 for inputs in
/// `0..=max_input` (`max_input * Σ positive weights > 32767`, or the negative ones below
/// -32768), the pair's second quad moves apart (zeroed in `packed`, listed in the result).
/// Each quad alone is exact up to `max_input` (`pair_safe_max`). `None`, leaving `packed` as
/// it was, when more than [`MAX_SPLIT_SHARE`] of the pairs would split or K has no pair.
pub(crate) fn pair_quads(raw: &[i8], n: usize, k: usize, max_input: u8, packed: &mut [i8]) -> Option<ApartQuads> {
    let pairs = k / 4 / 2;
    let panels = n.div_ceil(AVX2_LANES);
    if pairs == 0 {
        return None;
    }
    let a = max_input as i32;
    let fits = |j: usize, h: usize, lane: usize| {
        let row = &raw[j * k..(j + 1) * k];
        let (mut pos, mut neg) = (0i32, 0i32);
        for q in [2 * h, 2 * h + 1] {
            for &w in &row[4 * q + 2 * lane..4 * q + 2 * lane + 2] {
                pos += (w as i32).max(0);
                neg += (w as i32).min(0);
            }
        }
        a * pos <= i16::MAX as i32 && a * neg >= i16::MIN as i32
    };
    let mut split = vec![Vec::new(); panels];
    for (p, list) in split.iter_mut().enumerate() {
        let cols = p * AVX2_LANES..((p + 1) * AVX2_LANES).min(n);
        for h in 0..pairs {
            if !cols.clone().all(|j| fits(j, h, 0) && fits(j, h, 1)) {
                list.push(2 * h + 1);
            }
        }
    }
    let count: usize = split.iter().map(Vec::len).sum();
    if count as f64 > MAX_SPLIT_SHARE * (pairs * panels) as f64 {
        return None;
    }
    let quad = 4 * AVX2_LANES;
    let mut start = Vec::with_capacity(panels + 1);
    let mut quads = Vec::with_capacity(count);
    let mut weights = Aligned::zeroed(count * quad);
    start.push(0);
    for (p, list) in split.iter().enumerate() {
        for &q in list {
            let at = p * pairs_panel_len(k) + q * quad;
            let e = quads.len();
            weights[e * quad..(e + 1) * quad].copy_from_slice(&packed[at..at + quad]);
            packed[at..at + quad].fill(0);
            quads.push(q as u32);
        }
        start.push(quads.len() as u32);
    }
    Some(ApartQuads { start, quads, weights })
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
