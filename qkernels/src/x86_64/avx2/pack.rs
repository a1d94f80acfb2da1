//! The AVX2 GEMM layouts: i16 pairs for the exact kernel, 4-byte groups for `vpmaddubsw`,
//! and the bound under which the latter cannot saturate.

use crate::frame::aligned::Aligned;

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
