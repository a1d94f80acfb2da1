//! The AVX2 tier (AVX2 and FMA).

pub(crate) mod add;
pub(crate) mod depthwise;
pub(crate) mod epilogue;
pub(crate) mod fconv;
pub(crate) mod gemm;
pub(crate) mod lut;
pub(crate) mod pack;
pub(crate) mod transpose;

use std::ops::Range;

use crate::frame::gemm::{QMatrix, Rows, SinkKind, Tile};
use crate::frame::kernels::{AddKernel, Block, Kernels, PackFor};
use crate::frame::pack::{Avx2Pairs, Packed, PackedWeights};
use crate::x86_64::FusedOut;
use pack::{full_range_quads, order_quads, pack_layouts, AVX2_LANES};

// Every entry below runs only from a table of a tier that includes AVX2, which the registry
// builds only on a CPU with AVX2 and FMA: the precondition of each `unsafe` kernel here.

/// The AVX2 tier's entries (also the base of the AVX-512 VNNI tier's, which overrides most).
pub(super) fn register(k: &mut Kernels) {
    k.gemm.pack = pack;
    k.gemm.name = name;
    k.gemm.block = block;
    k.gemm.tile = tile;
    k.epilogue_u8 = epilogue::requantize_row;
    k.depthwise.name = "avx2: per pixel, exact vpmaddwd";
    k.depthwise.pack = depthwise::pack;
    k.depthwise.pixel = depthwise::pixel;
    k.depthwise.run_inside = Some(depthwise::run_inside);
    k.add_u8 = AddKernel { lanes: 32, run: add::add_u8_avx2 };
    k.f32.tile = fconv::tile_avx2;
    k.transpose = transpose::transpose;
    k.lut = lut::lut;
}

/// The exact i16 layout and the `vpmaddubsw` panels with the layer's bound; a layer's
/// weights also get the full-range layout and the order of quads paired in i16 where they
/// qualify, an operand packed for one call neither (the search for pairs would cost more
/// than it saves on one product).
fn pack(raw: &[i8], n: usize, k: usize, purpose: PackFor) -> (Packed, Option<Avx2Pairs>) {
    // SAFETY: this table runs only on a CPU with AVX2; `raw` holds the n * k weights.
    let (exact, mut packed, max_input) = unsafe { pack_layouts(raw, n, k) };
    debug_assert!(max_input >= 128);
    let (full, order) = match purpose {
        PackFor::Layer => {
            let full = full_range_quads(raw, n, k, max_input, &packed);
            // SAFETY: as above.
            (full, unsafe { order_quads(raw, n, k, max_input, &mut packed) })
        }
        PackFor::Call => (None, None),
    };
    let pairs = Avx2Pairs { packed, max_input, order, full };
    (Packed::Avx2(exact), Some(pairs))
}

/// Which kernel the layer's tiles take: `vpmaddubsw` for input codes up to the weights'
/// bound (each group has its own: a grouped layer names their range), the exact kernel above.
fn name(groups: &[PackedWeights]) -> String {
    fn pairs_of(w: &PackedWeights) -> &Avx2Pairs {
        w.pairs.as_ref().expect("AVX2 packing always builds the pair panels")
    }
    let lo = groups.iter().map(|w| pairs_of(w).max_input).min().unwrap_or(u8::MAX);
    let hi = groups.iter().map(|w| pairs_of(w).max_input).max().unwrap_or(u8::MAX);
    // How many whole quads pair in i16 before widening, and how many run alone
    // (`pack::order_quads`), over the groups that pair.
    let (mut ordered, mut alone, mut groups_paired) = (0, 0, 0);
    // Rows above the bound: `vpmaddubsw` with the quads that could saturate run exactly
    // (`pack::full_range_quads`).
    let (mut full, mut exact, mut quads) = (0, 0, 0);
    for w in groups {
        let p = pairs_of(w);
        let whole = w.k / 4 * w.n.div_ceil(2 * AVX2_LANES);
        if let Some(order) = &p.order {
            groups_paired += 1;
            ordered += whole;
            alone += whole - order.paired.iter().map(|&q| q as usize).sum::<usize>();
        }
        if let Some(f) = &p.full {
            full += 1;
            exact += f.quads.len();
            quads += w.k.div_ceil(4) * w.n.div_ceil(AVX2_LANES);
        }
    }
    let share = |part: usize, whole: usize| 100.0 * part as f64 / whole.max(1) as f64;
    let pairing = match groups_paired {
        0 => String::new(),
        g if g == groups.len() => format!(" (quads paired in i16, {:.1}% alone)", share(alone, ordered)),
        _ => format!(
            " (quads paired in i16 in {groups_paired} of {} groups, {:.1}% of their quads alone)",
            groups.len(),
            share(alone, ordered)
        ),
    };
    let above = match full {
        0 => format!(", above it {}", sparse_above()),
        _ if full == groups.len() => {
            format!(", above it vpmaddubsw with {:.1}% of quads on exact vpmaddwd", share(exact, quads))
        }
        _ => format!(
            ", above it vpmaddubsw with {:.1}% of quads on exact vpmaddwd in {full} of {} groups, in the others \
             {}",
            share(exact, quads),
            groups.len(),
            sparse_above()
        ),
    };
    match (lo, hi) {
        (u8::MAX, _) => format!("avx2: vpmaddubsw (cannot saturate){pairing}"),
        (lo, hi) if lo == hi => format!("avx2: vpmaddubsw for input codes <= {lo}{pairing}{above}"),
        (lo, hi) => format!("avx2: vpmaddubsw for input codes <= {lo}..={hi} (per group){pairing}{above}"),
    }
}

/// What rows with codes above the bound take without a full-range layout, in `u8` and `f32`
/// output (`gemm::avx2_fused_rows`; raw `i32` tiles take the exact kernel).
fn sparse_above() -> String {
    format!(
        "vpmaddubsw on the codes clamped to it plus their excess on exact vpmaddwd (rows with at most K/{} such \
         codes), else exact vpmaddwd",
        gemm::SPARSE_SHARE
    )
}

/// `u8` output from dense rows, requantized on registers, or `f32`, dequantized on
/// registers (`i32` output takes raw tiles).
///
/// # Safety
/// As `GemmKernels::block`.
unsafe fn block(b: &Block<'_>) -> bool {
    let (Packed::Avx2(exact), Rows::Dense(a)) = (&b.w.packed, b.src) else { return false };
    let out = match b.kind {
        SinkKind::U8 => gemm::FusedKind::U8,
        SinkKind::F32 { relu } => gemm::FusedKind::F32 { relu, per_row: b.per_row },
        SinkKind::I32 => return false,
    };
    let fused = FusedOut::of(b);
    let pairs = b.w.pairs.as_ref();
    // SAFETY: AVX2 and FMA (the table's tier); rows, columns, output and per-row parameters
    // as the caller promised; `cols.start` is a multiple of 16.
    unsafe { gemm::avx2_fused_rows(&fused, out, a, b.rows.len(), exact, pairs, b.w.k, b.row_memo) };
    true
}

/// The pair kernel on up to 4 rows when every code of those rows is within the layer's bound
/// (a pass over the rows, small beside the tile's K x ncols products), else the full-range
/// one on up to 4 where the layer has it, else the exact one on up to 3. All give the same
/// sums.
///
/// # Safety
/// As `GemmKernels::tile`.
unsafe fn tile(a: &QMatrix<'_>, r0: usize, rows: usize, w: &PackedWeights, cols: Range<usize>, t: &mut Tile) -> usize {
    let Packed::Avx2(exact) = &w.packed else { unreachable!("AVX2 tiles read AVX2 packings") };
    let mut mr = rows.min(4);
    let aw = match &w.pairs {
        Some(p)
            if p.max_input == u8::MAX
                || (r0..r0 + mr).all(|i| codes_within(&a.data[i * a.lda..i * a.lda + a.k], p.max_input)) =>
        {
            gemm::Avx2Weights::Pairs(p)
        }
        Some(Avx2Pairs { full: Some(full), .. }) => gemm::Avx2Weights::Full(full, exact),
        _ => {
            mr = mr.min(3);
            gemm::Avx2Weights::Exact(exact)
        }
    };
    // SAFETY: AVX2 (the table's tier); operands as the caller promised; `Pairs` only for
    // rows checked just now.
    unsafe { gemm::avx2_tile(a, r0, mr, aw, w.k, cols.start / AVX2_LANES, cols.len(), t) };
    mr
}

/// Whether every byte of `row` is at most `max`: one saturating subtraction of `max` per
/// 16 bytes, OR-ed, and a single test at the end (no horizontal reduction); rows shorter
/// than 16 bytes fold bytewise.
pub(crate) fn codes_within(row: &[u8], max: u8) -> bool {
    if row.len() >= 32 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected (cached by std after the first call).
        return unsafe { codes_within_avx2(row, max) };
    }
    if row.len() < 16 || !std::arch::is_x86_feature_detected!("sse4.1") {
        return row.iter().all(|&v| v <= max);
    }
    // SAFETY: SSE4.1 was just detected (cached by std after the first call).
    unsafe { codes_within_sse41(row, max) }
}

/// How far each of the 32 bytes at `q` exceeds the bound (`bound` holds it in every byte; 0
/// where a byte does not).
///
/// # Safety
/// AVX2 available; 32 bytes readable at `q`. Inlined into its AVX2 callers.
#[inline(always)]
pub(super) unsafe fn excess(q: *const u8, bound: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: forwarded preconditions.
    unsafe { _mm256_subs_epu8(_mm256_loadu_si256(q.cast()), bound) }
}

/// [`codes_within_sse41`] 64 bytes a step into two accumulators (the OR chain of one
/// 16-byte accumulator held ResNets' rows at a byte per cycle).
///
/// # Safety
/// AVX2 available; `row.len() >= 32`.
#[target_feature(enable = "avx2")]
unsafe fn codes_within_avx2(row: &[u8], max: u8) -> bool {
    use std::arch::x86_64::*;
    let bound = _mm256_set1_epi8(max as i8);
    let (mut o0, mut o1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let n = row.len();
    let p = row.as_ptr();
    let mut at = 0;
    // SAFETY: AVX2 (precondition); every read starts at most 32 bytes before the row's end
    // (at + 32 <= n, or n - 32 with n >= 32).
    unsafe {
        while at + 64 <= n {
            o0 = _mm256_or_si256(o0, excess(p.add(at), bound));
            o1 = _mm256_or_si256(o1, excess(p.add(at + 32), bound));
            at += 64;
        }
        if at + 32 <= n {
            o0 = _mm256_or_si256(o0, excess(p.add(at), bound));
            at += 32;
        }
        if at < n {
            // The last 32 bytes, overlapping bytes already seen.
            o1 = _mm256_or_si256(o1, excess(p.add(n - 32), bound));
        }
    }
    let all = _mm256_or_si256(o0, o1);
    _mm256_testz_si256(all, all) == 1
}

/// # Safety
/// SSE4.1 available; `row.len() >= 16`.
#[target_feature(enable = "sse4.1")]
unsafe fn codes_within_sse41(row: &[u8], max: u8) -> bool {
    use std::arch::x86_64::*;
    let bound = _mm_set1_epi8(max as i8);
    let mut over = _mm_setzero_si128();
    let n = row.len();
    let p = row.as_ptr();
    let mut at = 0;
    while at + 16 <= n {
        // SAFETY: bytes at..at + 16 of the row.
        over = _mm_or_si128(over, _mm_subs_epu8(unsafe { _mm_loadu_si128(p.add(at).cast()) }, bound));
        at += 16;
    }
    if at < n {
        // The last 16 bytes, overlapping bytes already seen (n >= 16).
        // SAFETY: bytes n - 16..n of the row.
        over = _mm_or_si128(over, _mm_subs_epu8(unsafe { _mm_loadu_si128(p.add(n - 16).cast()) }, bound));
    }
    _mm_testz_si128(over, over) == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer's packing searches for quads to pair in i16 (and a full-range layout where
    /// few quads could saturate); an operand packed for one call gets neither, over the same
    /// layouts and bound.
    #[test]
    fn a_call_packing_skips_the_search_for_pairs() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let (n, k) = (32, 64);
        let raw: Vec<i8> = (0..n * k).map(|i| ((i * 29 + i / 7) % 81) as i8 - 40).collect();
        let (Packed::Avx2(layer_exact), Some(layer)) = pack(&raw, n, k, PackFor::Layer) else { panic!("AVX2 layouts") };
        let (Packed::Avx2(call_exact), Some(call)) = pack(&raw, n, k, PackFor::Call) else { panic!("AVX2 layouts") };
        assert!(layer.order.is_some(), "weights this small pair in a layer's packing");
        assert!(call.order.is_none() && call.full.is_none());
        assert_eq!(&layer_exact[..], &call_exact[..]);
        assert_eq!(layer.max_input, call.max_input);
    }

    /// Every length up to 200 (the 64-, 32- and 16-byte steps, the overlapping last loads
    /// and the byte loop), with one code just above the bound at each position, and none.
    #[test]
    fn codes_within_finds_a_code_above_the_bound_anywhere() {
        for max in [0u8, 127, 138, 254] {
            for n in 0..200usize {
                let row: Vec<u8> = (0..n).map(|i| ((i * 37) % (max as usize + 1)) as u8).collect();
                assert!(super::codes_within(&row, max), "max {max}, length {n}");
                for at in 0..n {
                    let mut bad = row.clone();
                    bad[at] = max + 1;
                    assert!(!super::codes_within(&bad, max), "max {max}, length {n}, above at {at}");
                }
            }
        }
    }
}
