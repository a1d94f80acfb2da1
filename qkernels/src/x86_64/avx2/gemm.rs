//! The AVX2 GEMM micro-kernels: the exact one (`vpmaddwd` on i16 pairs) and the
//! `vpmaddubsw` one, raw tiles and whole blocks requantized on registers.

use std::any::Any;
use std::arch::x86_64::*;
use std::ptr;

use super::pack::{avx2_panel_len, pairs_panel_len, AVX2_LANES};
use crate::frame::gemm::{QMatrix, RowMemo, Tile, REQUANT_LIMIT};
use crate::frame::pack::{Avx2Pairs, FullRangeQuads, QuadOrder};
use crate::x86_64::FusedOut;

/// Runs `$kernel::<MR, NV>$args` for the runtime `($mr, $nv)` and hands its accumulators
/// to `$then` (a closure body over `acc`), each tile shape its own monomorphized kernel.
macro_rules! dispatch_avx2 {
    ($kernel:ident, $mr:expr, $nv:expr, $args:tt, |$acc:ident| $then:expr; $( ($m:literal, $v:literal) ),* ) => {
        match ($mr, $nv) {
            $( ($m, $v) => { let $acc = $kernel::<$m, $v> $args; $then } )*
            _ => unreachable!("tile {}x{} outside the kernel table", $mr, $nv),
        }
    };
}

/// Stores an AVX2 tile's accumulators into a strip of raw sums.
///
/// # Safety
/// The CPU supports AVX; `NV <= 8` (a row's 64 entries hold 8 vectors); `MR <= 6`.
#[target_feature(enable = "avx")]
#[inline]
unsafe fn store_strip<const MR: usize, const NV: usize>(acc: &[[__m256i; NV]; MR], strip: &mut Tile) {
    for r in 0..MR {
        for v in 0..NV {
            // SAFETY: an unaligned 32-byte store at entries 8v..8v + 8 of row r, inside its 64
            // entries (NV <= 8); AVX is available (precondition).
            unsafe { _mm256_storeu_si256(strip[r].as_mut_ptr().add(v * AVX2_LANES).cast(), acc[r][v]) };
        }
    }
}

/// Requantizes an AVX2 tile's accumulators (rows `i0..i0 + MR`, columns `j..j + lanes` of
/// the fused output, `lanes <= 8 * NV`) on registers and stores the bytes: the arithmetic of
/// [`epilogue_u8_avx2`] (hence of `requantize_scalar`), lane for lane. A whole strip of 16
/// columns is requantized inline, on the kernel's registers; others through
/// [`requantize_part_avx2`].
///
/// # Safety
/// AVX2 and FMA available; the plan covers columns `j..j + lanes`; rows `i0..i0 + MR` and
/// those columns lie inside the output (and the row sums, when the weights have zero points).
/// No `target_feature` of its own, so that it inlines into its AVX2 callers.
#[inline(always)]
unsafe fn requantize_tile_avx2<const MR: usize, const NV: usize>(
    f: &FusedOut<'_>,
    acc: &[[__m256i; NV]; MR],
    i0: usize,
    j: usize,
    lanes: usize,
) {
    if NV == 2 && lanes == 2 * AVX2_LANES {
        // SAFETY: forwarded preconditions, with all 16 columns inside the plan.
        unsafe { requantize_strip16_avx2(f, acc, i0, j) };
    } else {
        // SAFETY: forwarded preconditions.
        unsafe { requantize_part_avx2(f, acc, i0, j, lanes) };
    }
}

/// [`requantize_tile_avx2`] for any strip, with masked loads of the plan and per-lane
/// stores: a strip's columns past the output's last one are neither read nor written.
///
/// # Safety
/// As [`requantize_tile_avx2`].
#[target_feature(enable = "avx2,fma")]
unsafe fn requantize_part_avx2<const MR: usize, const NV: usize>(
    f: &FusedOut<'_>,
    acc: &[[__m256i; NV]; MR],
    i0: usize,
    j: usize,
    lanes: usize,
) {
    let plan = f.plan;
    // Read once (the byte stores below may alias the plan as far as the compiler knows).
    let has_zw = plan.has_zw;
    let (vzo, vlo, vhi) = (_mm256_set1_epi32(plan.zo), _mm256_set1_epi32(plan.lo), _mm256_set1_epi32(plan.hi));
    let (lim, nlim) = (_mm256_set1_ps(REQUANT_LIMIT), _mm256_set1_ps(-REQUANT_LIMIT));
    // Byte 0 of each i32 lane, gathered into the low 4 bytes of each 128-bit half.
    let gather = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1,
    );
    for v in 0..NV {
        let jv = j + v * AVX2_LANES;
        let n = lanes.saturating_sub(v * AVX2_LANES).min(AVX2_LANES);
        if n == 0 {
            break;
        }
        // Lanes past the last column load zeros (masked), so no read leaves the plan.
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        // SAFETY: masked loads touch only the plan's columns jv..jv + n.
        let (colterm, bias, bscale, mult, zw) = unsafe {
            (
                _mm256_maskload_epi32(plan.colterm.as_ptr().add(jv), mask),
                _mm256_maskload_ps(plan.bias_term.as_ptr().add(jv), mask),
                _mm256_maskload_ps(plan.bias_scale.as_ptr().add(jv), mask),
                _mm256_maskload_ps(plan.mult.as_ptr().add(jv), mask),
                if plan.has_zw {
                    _mm256_maskload_epi32(plan.zw.as_ptr().add(jv), mask)
                } else {
                    _mm256_setzero_si256()
                },
            )
        };
        for r in 0..MR {
            let i = i0 + r;
            let mut raw = _mm256_sub_epi32(acc[r][v], colterm);
            if has_zw {
                raw = _mm256_sub_epi32(raw, _mm256_mullo_epi32(_mm256_set1_epi32(f.rowsums[i]), zw));
            }
            let x = _mm256_mul_ps(_mm256_fmadd_ps(bias, bscale, _mm256_cvtepi32_ps(raw)), mult);
            let x = _mm256_min_ps(_mm256_max_ps(x, nlim), lim);
            let q = _mm256_add_epi32(_mm256_cvtps_epi32(x), vzo);
            let q = _mm256_min_epi32(_mm256_max_epi32(q, vlo), vhi);
            let bytes = _mm256_shuffle_epi8(q, gather);
            let lo = _mm256_cvtsi256_si32(bytes) as u32 as u64;
            let hi = _mm256_extract_epi32::<4>(bytes) as u32 as u64;
            let bytes = lo | (hi << 32);
            let dst = f.out.wrapping_add(i * f.ldc + jv);
            if n == AVX2_LANES {
                // SAFETY: row i, columns jv..jv + 8 of the output (precondition).
                unsafe { ptr::write_unaligned(dst.cast::<u64>(), bytes) };
            } else {
                for (l, b) in bytes.to_le_bytes().into_iter().take(n).enumerate() {
                    // SAFETY: row i, column jv + l < jv + n of the output (precondition).
                    unsafe { *dst.add(l) = b };
                }
            }
        }
    }
}

/// [`requantize_tile_avx2`] for a whole strip of 16 columns ([`Strip16`]).
///
/// # Safety
/// As [`requantize_tile_avx2`] with `lanes == 16` (so `NV == 2`). Inlined into its AVX2
/// callers, as [`requantize_tile_avx2`].
#[inline(always)]
unsafe fn requantize_strip16_avx2<const MR: usize, const NV: usize>(
    f: &FusedOut<'_>,
    acc: &[[__m256i; NV]; MR],
    i0: usize,
    j: usize,
) {
    // SAFETY: forwarded preconditions.
    unsafe { Strip16::load(f, j).store(acc, i0) }
}

/// The requantization of a strip of 16 columns `j..j + 16`, its constants loaded once for
/// every tile of rows: the plan's constants in plain loads, two vectors of each row packed
/// to 16 bytes at once (`vpackssdw`, the zero point added in i16 with saturation,
/// `vpackuswb`, one lane permute) and clamped to `[lo, hi]` as bytes, one 16-byte store per
/// row. The same bytes as the scalar formula: the saturations to i16 and then to `0..=255`
/// clamp as adding the zero point in i32 and clamping would; a value below `-REQUANT_LIMIT`
/// (or below `i32`'s range, which converts to `i32::MIN`) saturates to 0 and then to `lo`,
/// as the scalar's clamp to `-REQUANT_LIMIT` followed by `lo` gives; above, the clamp to
/// `REQUANT_LIMIT` stays, at infinity (changing no value) when the plan is `clamp_free` (no
/// value comes near it).
#[derive(Clone, Copy)]
struct Strip16<'a> {
    /// Per vector: column term, bias term, bias scale, multiplier, weight zero points.
    consts: [(__m256i, __m256, __m256, __m256, __m256i); 2],
    lim: __m256,
    vzo: __m256i,
    lo: __m128i,
    hi: __m128i,
    /// Activation row sums by global row, empty when the weights are symmetric.
    rowsums: &'a [i32],
    out: *mut u8,
    ldc: usize,
    j: usize,
}

impl<'a> Strip16<'a> {
    /// # Safety
    /// AVX2 available; columns `j..j + 16` lie inside the plan.
    #[inline(always)]
    unsafe fn load(f: &FusedOut<'a>, j: usize) -> Self {
        // SAFETY: AVX2 (precondition); the loads read columns j..j + 16 of the plan.
        unsafe {
            let plan = f.plan;
            debug_assert!((0..=255).contains(&plan.zo));
            let zero = _mm256_setzero_si256();
            let mut consts = [(zero, _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), zero); 2];
            // A loop, not a closure: a closure would not inherit its caller's target features.
            for (v, c) in consts.iter_mut().enumerate() {
                let jv = j + v * AVX2_LANES;
                *c = (
                    _mm256_loadu_si256(plan.colterm.as_ptr().add(jv).cast()),
                    _mm256_loadu_ps(plan.bias_term.as_ptr().add(jv)),
                    _mm256_loadu_ps(plan.bias_scale.as_ptr().add(jv)),
                    _mm256_loadu_ps(plan.mult.as_ptr().add(jv)),
                    if plan.has_zw { _mm256_loadu_si256(plan.zw.as_ptr().add(jv).cast()) } else { zero },
                );
            }
            Strip16 {
                consts,
                lim: _mm256_set1_ps(if plan.clamp_free { f32::INFINITY } else { REQUANT_LIMIT }),
                vzo: _mm256_set1_epi16(plan.zo as i16),
                lo: _mm_set1_epi8(plan.lo as u8 as i8),
                hi: _mm_set1_epi8(plan.hi as u8 as i8),
                rowsums: if plan.has_zw { f.rowsums } else { &[] },
                out: f.out,
                ldc: f.ldc,
                j,
            }
        }
    }

    /// Requantizes and stores rows `i0..i0 + MR` of the strip.
    ///
    /// # Safety
    /// AVX2 and FMA available; `NV == 2`; rows `i0..i0 + MR` lie inside the output (and the
    /// row sums, when the weights have zero points).
    #[inline(always)]
    unsafe fn store<const MR: usize, const NV: usize>(&self, acc: &[[__m256i; NV]; MR], i0: usize) {
        debug_assert_eq!(NV, 2);
        let rowsums = if self.rowsums.is_empty() { &[][..] } else { &self.rowsums[i0..i0 + MR] };
        // SAFETY: AVX2 and FMA (precondition); the store writes row i's columns j..j + 16,
        // inside the output (precondition).
        unsafe {
            // Dwords [A B A B | A' B' A' B'] after the packs, A / A' the first vector's low /
            // high four bytes, B / B' the second's: gathered to A A' B B'.
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for (r, accr) in acc.iter().enumerate() {
                let mut q = [_mm256_setzero_si256(); 2];
                for (v, &(colterm, bias, bscale, mult, zw)) in self.consts.iter().enumerate() {
                    let mut raw = _mm256_sub_epi32(accr[v], colterm);
                    if let Some(&s) = rowsums.get(r) {
                        raw = _mm256_sub_epi32(raw, _mm256_mullo_epi32(_mm256_set1_epi32(s), zw));
                    }
                    let x = _mm256_mul_ps(_mm256_fmadd_ps(bias, bscale, _mm256_cvtepi32_ps(raw)), mult);
                    q[v] = _mm256_cvtps_epi32(_mm256_min_ps(x, self.lim));
                }
                let w = _mm256_adds_epi16(_mm256_packs_epi32(q[0], q[1]), self.vzo);
                let b = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(w, w), order);
                let b = _mm_min_epu8(_mm_max_epu8(_mm256_castsi256_si128(b), self.lo), self.hi);
                _mm_storeu_si128(self.out.wrapping_add((i0 + r) * self.ldc + self.j).cast(), b);
            }
        }
    }
}

/// What an AVX2 block writes: requantized `u8`, or dequantized `f32` (then `FusedOut::out`
/// points at `f32` values and `ldc` counts them), optionally through a ReLU, with per-row
/// activation parameters and the weights' column offsets when each row has its own.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FusedKind<'a> {
    U8,
    F32 { relu: bool, per_row: Option<(&'a [crate::QuantU8], &'a [i32])> },
}

/// Stores a tile's accumulators as `out` says: [`requantize_tile_avx2`] or
/// [`dequantize_tile_avx2`].
///
/// # Safety
/// As [`requantize_tile_avx2`] (for `f32` output, `f.out` holds `f32` values; with per-row
/// parameters, they and the column offsets cover the tile's rows and columns). Inlined into
/// its AVX2 callers.
#[inline(always)]
unsafe fn store_tile_avx2<const MR: usize, const NV: usize>(
    f: &FusedOut<'_>,
    acc: &[[__m256i; NV]; MR],
    i0: usize,
    j: usize,
    lanes: usize,
    out: FusedKind<'_>,
) {
    // SAFETY: forwarded preconditions.
    unsafe {
        match out {
            FusedKind::U8 => requantize_tile_avx2(f, acc, i0, j, lanes),
            FusedKind::F32 { relu, per_row } => dequantize_tile_avx2(f, acc, i0, j, lanes, relu, per_row),
        }
    }
}

/// Dequantizes an AVX2 tile's accumulators (rows `i0..i0 + MR`, columns `j..j + lanes`) to
/// `f32` and stores them: `fma(raw, scale, bias)`, then `max(.., 0)` with `relu`, `raw` the
/// exact sum less the plan's column term and the weights' zero-point term, and, with per-row
/// parameters, less `zero_point[i] * col_offsets[j]` with `scale = scale[i] * ab_scale[j]`:
/// `dequantize_row`'s arithmetic lane for lane, so the same bits. Masked loads and stores:
/// columns past `lanes` are neither read nor written.
///
/// # Safety
/// AVX2 and FMA available; as [`store_tile_avx2`] for `f32` output.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dequantize_tile_avx2<const MR: usize, const NV: usize>(
    f: &FusedOut<'_>,
    acc: &[[__m256i; NV]; MR],
    i0: usize,
    j: usize,
    lanes: usize,
    relu: bool,
    per_row: Option<(&[crate::QuantU8], &[i32])>,
) {
    let plan = f.plan;
    let has_zw = plan.has_zw;
    let out = f.out.cast::<f32>();
    for v in 0..NV {
        let jv = j + v * AVX2_LANES;
        let n = lanes.saturating_sub(v * AVX2_LANES).min(AVX2_LANES);
        if n == 0 {
            break;
        }
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        // SAFETY: masked loads touch only columns jv..jv + n of the plan and the offsets.
        let (colterm, ab, bias, zw, offsets) = unsafe {
            (
                _mm256_maskload_epi32(plan.colterm.as_ptr().add(jv), mask),
                _mm256_maskload_ps(plan.ab_scale.as_ptr().add(jv), mask),
                _mm256_maskload_ps(plan.bias.as_ptr().add(jv), mask),
                if plan.has_zw {
                    _mm256_maskload_epi32(plan.zw.as_ptr().add(jv), mask)
                } else {
                    _mm256_setzero_si256()
                },
                match per_row {
                    Some((_, o)) => _mm256_maskload_epi32(o.as_ptr().add(jv), mask),
                    None => _mm256_setzero_si256(),
                },
            )
        };
        for (r, accr) in acc.iter().enumerate() {
            let i = i0 + r;
            // With per-row parameters this row's column term and scale replace the plan's
            // (built for scale 1 and zero point 0).
            let (colterm, scale) = match per_row {
                Some((q, _)) => (
                    _mm256_mullo_epi32(_mm256_set1_epi32(q[i].zero_point), offsets),
                    _mm256_mul_ps(_mm256_set1_ps(q[i].scale), ab),
                ),
                None => (colterm, ab),
            };
            let mut raw = _mm256_sub_epi32(accr[v], colterm);
            if has_zw {
                raw = _mm256_sub_epi32(raw, _mm256_mullo_epi32(_mm256_set1_epi32(f.rowsums[i]), zw));
            }
            let mut y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(raw), scale, bias);
            if relu {
                y = _mm256_max_ps(y, _mm256_setzero_ps());
            }
            // SAFETY: row i, columns jv..jv + n of the output (precondition), masked.
            unsafe { _mm256_maskstore_ps(out.add(i * f.ldc + jv), mask, y) };
        }
    }
}

/// A whole block of `u8` (or `f32`, as `out` says) output from dense rows on AVX2,
/// requantized (or dequantized) on registers: strips of 16 columns, tile by tile; where every
/// row of the block takes `vpmaddubsw` and the output is `u8`, a whole strip's sums go to a
/// stack buffer first and are requantized afterwards (`Strip16`).
/// When `pairs` is given and every code of a tile's rows is within its bound, the tile
/// takes `vpmaddubsw`: 3 rows two quads at a time where the packing pairs quads (4 rows
/// would spill a register), else 4 rows a quad at a time. Otherwise 4 rows on the
/// full-range layout where the packing has one. Without one, a row with at most K / 8 codes
/// above the bound still takes `vpmaddubsw`, on a copy of the block's rows with those codes
/// clamped to the bound, and each code's excess over the bound then meets its weights
/// exactly (`vpmaddwd` on the exact layout, [`add_excess`]); other rows take the exact
/// kernel, 4 at a time, over the block's rows widened (`widen_rows`). All give the same
/// sums, so the bytes are the scalar path's. Which rows take which kernel, the clamped copy
/// and the widened rows ([`BlockRows`]) are worked out once per block of rows and kept in
/// `memo` for the other blocks of columns.
///
/// # Safety
/// AVX2 and FMA available; `exact` (and `pairs`) are the AVX2 packings of weights with this
/// `k`; rows `f.r0..f.r0 + m` exist in `a`; as [`vnni_dense_rows`] for `f` (`f.j0` a
/// multiple of 8); `memo` is empty, or made for this call's rows of `a` (whose codes it may
/// not see change), this packing and blocks of `memo.rows_per_block` rows, `f.r0` starting
/// one, its entries empty or as this function filled them.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn avx2_fused_rows(
    f: &FusedOut<'_>,
    out: FusedKind<'_>,
    a: &QMatrix<'_>,
    m: usize,
    exact: &[i16],
    pairs: Option<&Avx2Pairs>,
    k: usize,
    memo: &RowMemo,
) {
    assert!(m <= crate::frame::gemm::MC, "avx2_fused_rows: {m} rows exceed a block of {}", crate::frame::gemm::MC);
    // What the block's rows need besides themselves, worked out by the first block of
    // columns to reach them and kept in `memo` for the others (or here, without one).
    let local;
    let kept: Option<&BlockRows> = match memo.blocks.get(f.r0 / memo.rows_per_block) {
        Some(cell) => {
            cell.get_or_init(|| {
                // SAFETY: AVX2 (precondition); rows f.r0..f.r0 + m exist in `a`.
                let kept = unsafe { block_rows(a, f.r0, m, pairs, k) };
                kept.map(|b| Box::new(b) as Box<dyn Any + Send + Sync>)
            })
            .as_ref()
            .map(|b| b.downcast_ref::<BlockRows>().expect("avx2_fused_rows: the row memo holds this tier's block rows"))
        }
        None => {
            // SAFETY: as above.
            local = unsafe { block_rows(a, f.r0, m, pairs, k) };
            local.as_ref()
        }
    };
    // Nothing kept: every row within the bound.
    let every;
    let rows = match kept {
        Some(rows) => rows,
        None => {
            every = BlockRows::all_within(m);
            &every
        }
    };
    let BlockRows { within, starts, excess, clamped, wide } = rows;
    let sparse = !clamped.is_empty();
    // Where the pair kernel reads the block's rows.
    let (rows_at, lda) = if sparse { (clamped.as_ptr(), k) } else { (a.data[f.r0 * a.lda..].as_ptr(), a.lda) };
    let ldw = wide_len(k);
    // Rows per `vpmaddubsw` tile: 3 two quads at a time (4 would spill a register), else 4.
    let pair_rows = if pairs.is_some_and(|p| p.order.is_some()) { 3 } else { 4 };
    // Whether every row of the block takes the pair kernel (checked once, not per tile).
    let all_within = pairs.is_some() && within[..m].iter().all(|&ok| ok);
    // The two-pass strips' sums (below), left uninitialised rather than zeroing 6 KiB per
    // block: each strip writes rows 0..m before it reads them.
    let mut sums = [std::mem::MaybeUninit::<[__m256i; 2]>::uninit(); crate::frame::gemm::MC];
    let put = |sums: &mut [std::mem::MaybeUninit<[__m256i; 2]>], r: usize, rows: &[[__m256i; 2]]| {
        for (d, &v) in sums[r..r + rows.len()].iter_mut().zip(rows) {
            d.write(v);
        }
    };
    let mut c0 = 0;
    while c0 < f.ncols {
        let nv = (f.ncols - c0).div_ceil(AVX2_LANES).min(2);
        let lanes = (f.ncols - c0).min(2 * AVX2_LANES);
        let (j, panel) = (f.j0 + c0, (f.j0 + c0) / AVX2_LANES);
        // The common case, in two passes over the block's rows: every row on the pair kernel
        // (within the bound, or clamped with its excess added), whole strips of 16 columns to
        // `u8`. First the sums of every tile of rows (the strip's quad order read once), then
        // their requantization (its constants read once), whose long chains of dependent
        // instructions then overlap each other instead of delaying the next tile's products.
        if let (true, FusedKind::U8, true, Some(p)) = (all_within, out, lanes == 2 * AVX2_LANES, pairs) {
            let bp = p.packed[panel * pairs_panel_len(k)..].as_ptr();
            // SAFETY: AVX2 and FMA (precondition); columns j..j + 16 lie inside the plan and
            // the output (lanes == 16); rows f.r0..f.r0 + m exist in `a` or in its clamped copy
            // (`rows_at`, `lda`), every one within the packing's bound (`all_within`: checked,
            // or clamped to it); `offsets` and `paired` are this strip's of the packing's
            // order; a row's excess codes meet the exact layout's two panels at `panel`.
            unsafe {
                match &p.order {
                    Some(order) => {
                        let whole = k / 4;
                        assert!(panel.is_multiple_of(2), "avx2_fused_rows: a strip starts at odd panel {panel}");
                        let strip = panel / 2;
                        let offsets = &order.offsets[strip * whole..(strip + 1) * whole];
                        let paired = order.paired[strip] as usize;
                        let mut r = 0;
                        while r + 3 <= m {
                            put(&mut sums, r, &quads_core::<3, 2>(rows_at.add(r * lda), lda, k, bp, offsets, paired));
                            r += 3;
                        }
                        match m - r {
                            1 => put(
                                &mut sums,
                                r,
                                &quads_core::<1, 2>(rows_at.add(r * lda), lda, k, bp, offsets, paired),
                            ),
                            2 => put(
                                &mut sums,
                                r,
                                &quads_core::<2, 2>(rows_at.add(r * lda), lda, k, bp, offsets, paired),
                            ),
                            _ => {}
                        }
                    }
                    None => {
                        let mut r = 0;
                        while r + 4 <= m {
                            put(&mut sums, r, &avx2_pairs_kernel::<4, 2>(rows_at.add(r * lda), lda, k, bp));
                            r += 4;
                        }
                        match m - r {
                            1 => put(&mut sums, r, &avx2_pairs_kernel::<1, 2>(rows_at.add(r * lda), lda, k, bp)),
                            2 => put(&mut sums, r, &avx2_pairs_kernel::<2, 2>(rows_at.add(r * lda), lda, k, bp)),
                            3 => put(&mut sums, r, &avx2_pairs_kernel::<3, 2>(rows_at.add(r * lda), lda, k, bp)),
                            _ => {}
                        }
                    }
                }
                // SAFETY: the tiles above wrote rows 0..m.
                let sums = std::slice::from_raw_parts_mut(sums.as_mut_ptr().cast::<[__m256i; 2]>(), m);
                if sparse {
                    let ep = exact[panel * avx2_panel_len(k)..].as_ptr();
                    for (r, row) in sums.iter_mut().enumerate() {
                        if starts[r] < starts[r + 1] {
                            let mut one = [*row];
                            add_excess::<1, 2>(&mut one, (excess, &starts[r..=r + 1]), ep, avx2_panel_len(k));
                            *row = one[0];
                        }
                    }
                }
                let st = Strip16::load(f, j);
                let mut r = 0;
                while r + 4 <= m {
                    st.store::<4, 2>(sums[r..r + 4].try_into().expect("four rows"), f.r0 + r);
                    r += 4;
                }
                while r < m {
                    st.store::<1, 2>(&[sums[r]], f.r0 + r);
                    r += 1;
                }
            }
            c0 += 2 * AVX2_LANES;
            continue;
        }
        let mut r = 0;
        while r < m {
            let i = f.r0 + r;
            let tile_pairs = if all_within {
                pairs
            } else {
                pairs.filter(|_| within[r..r + (m - r).min(pair_rows)].iter().all(|&ok| ok))
            };
            let ap = a.data[i * a.lda..].as_ptr();
            // SAFETY: row r of the block, in `a` or in its clamped copy.
            let pair_ap = unsafe { rows_at.add(r * lda) };
            if let (None, Some(full)) = (tile_pairs, pairs.and_then(|p| p.full.as_ref())) {
                let mr = (m - r).min(4);
                let bp = full.packed[panel * pairs_panel_len(k)..].as_ptr();
                let ep = exact[panel * avx2_panel_len(k)..].as_ptr();
                // SAFETY: the tile's rows and columns exist (preconditions); the full-range
                // layout takes any codes; the table covers mr <= 4, nv <= 2.
                unsafe {
                    dispatch_avx2!(avx2_full_kernel, mr, nv, (ap, a.lda, k, bp, ep, full, panel), |acc| store_tile_avx2(f, &acc, i, j, lanes, out);
                        (1,1),(1,2),(2,1),(2,2),(3,1),(3,2),(4,1),(4,2))
                }
                r += mr;
                continue;
            }
            match tile_pairs {
                Some(p) => {
                    let mr = (m - r).min(pair_rows);
                    let bp = p.packed[panel * pairs_panel_len(k)..].as_ptr();
                    // The excess codes of the tile's rows, added from the exact layout.
                    let tile_excess =
                        sparse.then(|| (&excess[..], &starts[r..=r + mr], exact[panel * avx2_panel_len(k)..].as_ptr()));
                    // SAFETY: the tile's rows and columns exist (preconditions); its codes were
                    // just checked against the pair packing's bound, or clamped to it in the
                    // copy `pair_ap` points into, whose excess `add_excess` adds from the exact
                    // layout's NV panels at `panel`; the table covers mr <= 4, nv <= 2; `order`
                    // belongs to this packing, and a strip of 16 columns starts on an even panel.
                    unsafe {
                        match &p.order {
                            Some(order) => {
                                dispatch_avx2!(avx2_quads_kernel, mr, nv, (pair_ap, lda, k, bp, order, panel), |acc| store_pair_tile(f, acc, tile_excess, k, (i, j, lanes), out);
                                (1,1),(1,2),(2,1),(2,2),(3,1),(3,2),(4,1),(4,2))
                            }
                            None => {
                                dispatch_avx2!(avx2_pairs_kernel, mr, nv, (pair_ap, lda, k, bp), |acc| store_pair_tile(f, acc, tile_excess, k, (i, j, lanes), out);
                                (1,1),(1,2),(2,1),(2,2),(3,1),(3,2),(4,1),(4,2))
                            }
                        }
                    }
                    r += mr;
                }
                None => {
                    let mr = (m - r).min(WIDE_ROWS);
                    let bp = exact[panel * avx2_panel_len(k)..].as_ptr();
                    let wp = wide[r * ldw..].as_ptr();
                    // SAFETY: as above, on the exact kernel over the widened rows r..r + mr
                    // (mr <= 4, nv <= 2).
                    unsafe {
                        dispatch_avx2!(avx2_wide_kernel, mr, nv, (wp, ldw, k, bp), |acc| store_tile_avx2(f, &acc, i, j, lanes, out);
                            (1,1),(1,2),(2,1),(2,2),(3,1),(3,2),(4,1),(4,2))
                    }
                    r += mr;
                }
            }
        }
        c0 += nv * AVX2_LANES;
    }
}

/// What a block of rows needs besides its codes, by row of the block: whether the pair
/// kernel takes it (within the bound, or clamped to it: [`block_rows`]); the excess codes
/// of the clamped ones, row r's at `excess[starts[r]..starts[r + 1]]`, and the block's rows
/// with those codes clamped (empty when none is), which the pair kernel then reads instead
/// of `a`'s; the rows widened for the exact kernel (empty when no row takes it).
struct BlockRows {
    within: [bool; crate::frame::gemm::MC],
    starts: [u32; crate::frame::gemm::MC + 1],
    excess: Vec<Excess>,
    clamped: Vec<u8>,
    wide: Vec<u8>,
}

/// Buffers of dropped [`BlockRows`], which later blocks of rows take instead of allocating:
/// a model's later calls then reuse its first call's (at most [`SPARE_MAX`] of each kind).
static SPARE_BYTES: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
static SPARE_EXCESS: std::sync::Mutex<Vec<Vec<Excess>>> = std::sync::Mutex::new(Vec::new());
const SPARE_MAX: usize = 16;

/// An empty buffer from `pool`, or a new one.
fn spare<T>(pool: &std::sync::Mutex<Vec<Vec<T>>>) -> Vec<T> {
    let mut v = pool.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
    v.clear();
    v
}

/// Gives `v` back to `pool` when it holds memory and the pool has room.
fn give_back<T>(pool: &std::sync::Mutex<Vec<Vec<T>>>, v: Vec<T>) {
    if v.capacity() > 0 {
        let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < SPARE_MAX {
            p.push(v);
        }
    }
}

impl BlockRows {
    /// A block of `m` rows all within the bound, with nothing else to keep.
    fn all_within(m: usize) -> Self {
        let mut within = [false; crate::frame::gemm::MC];
        within[..m].fill(true);
        BlockRows {
            within,
            starts: [0; crate::frame::gemm::MC + 1],
            excess: Vec::new(),
            clamped: Vec::new(),
            wide: Vec::new(),
        }
    }
}

impl Drop for BlockRows {
    fn drop(&mut self) {
        give_back(&SPARE_EXCESS, std::mem::take(&mut self.excess));
        give_back(&SPARE_BYTES, std::mem::take(&mut self.clamped));
        give_back(&SPARE_BYTES, std::mem::take(&mut self.wide));
    }
}

/// The [`BlockRows`] of rows `r0..r0 + m` of `a` for the AVX2 packing `pairs` of weights
/// with this `k`: a pass over each row against the pair bound (one over the whole block when
/// its rows are contiguous, then over each row only when some code is above); for a row
/// above it (without
/// a full-range layout), its excess codes when at most `K / SPARSE_SHARE`; the clamped
/// copy when some row has any; the widened rows when some row takes the exact kernel.
/// `None` when every row is within the bound (nothing to keep).
///
/// # Safety
/// AVX2 available; rows `r0..r0 + m` exist in `a`; `m <= MC`.
#[target_feature(enable = "avx2")]
unsafe fn block_rows(a: &QMatrix<'_>, r0: usize, m: usize, pairs: Option<&Avx2Pairs>, k: usize) -> Option<BlockRows> {
    let row = |r: usize| &a.data[(r0 + r) * a.lda..(r0 + r) * a.lda + k];
    let mut within = [false; crate::frame::gemm::MC];
    let mut starts = [0u32; crate::frame::gemm::MC + 1];
    if let Some(&Avx2Pairs { max_input: max, .. }) = pairs {
        if max == u8::MAX || (a.lda == k && super::codes_within(&a.data[r0 * k..(r0 + m) * k], max)) {
            return None;
        }
        for (r, ok) in within[..m].iter_mut().enumerate() {
            *ok = super::codes_within(row(r), max);
        }
        if within[..m].iter().all(|&ok| ok) {
            return None;
        }
    }
    let (mut clamped, mut excess) = (Vec::new(), Vec::new());
    if let Some(&Avx2Pairs { max_input: max, full: None, .. }) = pairs {
        excess = spare(&SPARE_EXCESS);
        let limit = k / SPARSE_SHARE;
        for r in 0..m {
            if !within[r] {
                // SAFETY: AVX2 (precondition); the row's k codes exist.
                within[r] = unsafe { excess_codes(row(r), max, limit, &mut excess) };
            }
            starts[r + 1] = excess.len() as u32;
        }
        if !excess.is_empty() {
            clamped = spare(&SPARE_BYTES);
            clamped.reserve(m * k);
            for r in 0..m {
                clamped.extend_from_slice(row(r));
                for e in &excess[starts[r] as usize..starts[r + 1] as usize] {
                    clamped[r * k + e.kk as usize] = max;
                }
            }
        }
    }
    let needs_exact = pairs.is_none_or(|p| p.full.is_none()) && !within[..m].iter().all(|&ok| ok);
    let mut wide = Vec::new();
    if needs_exact {
        wide = spare(&SPARE_BYTES);
        wide.resize(m * wide_len(k), 0);
        // SAFETY: AVX2 (precondition); the rows exist; `wide` holds m rows.
        unsafe { widen_rows(a, r0, m, &mut wide) };
    }
    Some(BlockRows { within, starts, excess, clamped, wide })
}

/// A row takes the pair kernel on clamped codes plus their exact excess when at most
/// `K / SPARSE_SHARE` of its codes lie above the bound: each excess code costs about as
/// many instructions for 16 products as the pair kernel spends on 64, and the exact kernel
/// takes about 1.7 times the pair kernel's time.
pub(crate) const SPARSE_SHARE: usize = 8;

/// A code above the pair bound: its index `kk` in the row, where its weights start in a
/// panel of the exact layout (`pack_avx2`: quad `kk / 4`, the vector of its parity), and its
/// excess over the bound as the i16 pair (excess, 0) or (0, excess) that meets its weight's
/// half of each lane.
#[derive(Clone, Copy, Debug)]
struct Excess {
    kk: u32,
    at: u32,
    pair: i32,
}

/// Appends an [`Excess`] for each code of `row` above `max`, in order; `false` (and `out`
/// as it was) when more than `limit` are, which a count of them finds first (32 codes at a
/// time, stopping once past `limit`), before any is listed.
///
/// # Safety
/// AVX2 available.
#[target_feature(enable = "avx2")]
unsafe fn excess_codes(row: &[u8], max: u8, limit: usize, out: &mut Vec<Excess>) -> bool {
    let bound = _mm256_set1_epi8(max as i8);
    let (mut count, mut at) = (0, 0);
    while at + 32 <= row.len() {
        // SAFETY: bytes at..at + 32 of the row; AVX2 (precondition).
        count += unsafe { codes_above(row.as_ptr().add(at), bound) }.count_ones() as usize;
        if count > limit {
            return false;
        }
        at += 32;
    }
    if count + row[at..].iter().filter(|&&c| c > max).count() > limit {
        return false;
    }
    let mut push = |kk: usize, code: u8| {
        let (g, odd, half) = (kk / 4, kk % 2, (kk % 4) / 2);
        let at = (g * 4 * AVX2_LANES + odd * 2 * AVX2_LANES) as u32;
        out.push(Excess { kk: kk as u32, at, pair: ((code - max) as i32) << (16 * half) });
    };
    let mut at = 0;
    while at + 32 <= row.len() {
        // SAFETY: as above.
        let mut mask = unsafe { codes_above(row.as_ptr().add(at), bound) };
        while mask != 0 {
            let b = mask.trailing_zeros() as usize;
            push(at + b, row[at + b]);
            mask &= mask - 1;
        }
        at += 32;
    }
    for (kk, &code) in row.iter().enumerate().skip(at) {
        if code > max {
            push(kk, code);
        }
    }
    true
}

/// One bit per code above the bound among the 32 at `p` (`bound` holds it in every byte).
///
/// # Safety
/// AVX2 available; 32 bytes readable at `p`. Inlined into its AVX2 callers.
#[inline(always)]
unsafe fn codes_above(p: *const u8, bound: __m256i) -> u32 {
    // SAFETY: AVX2 and the 32 bytes (preconditions).
    unsafe {
        let over = super::excess(p, bound);
        !(_mm256_movemask_epi8(_mm256_cmpeq_epi8(over, _mm256_setzero_si256())) as u32)
    }
}

/// Stores a pair-kernel tile's sums ([`store_tile_avx2`], rows from `i`, columns `j..j +
/// lanes`), after adding the excess codes of its rows (`excess`, [`add_excess`]) when they
/// were clamped.
///
/// # Safety
/// As [`store_tile_avx2`] and, with `excess`, [`add_excess`] for this `k`. Inlined into its
/// AVX2 callers.
#[inline(always)]
unsafe fn store_pair_tile<const MR: usize, const NV: usize>(
    f: &FusedOut<'_>,
    mut acc: [[__m256i; NV]; MR],
    excess: Option<(&[Excess], &[u32], *const i16)>,
    k: usize,
    (i, j, lanes): (usize, usize, usize),
    out: FusedKind<'_>,
) {
    // SAFETY: forwarded preconditions.
    unsafe {
        if let Some((excess, starts, ep)) = excess {
            add_excess(&mut acc, (excess, starts), ep, avx2_panel_len(k));
        }
        store_tile_avx2(f, &acc, i, j, lanes, out)
    }
}

/// Adds each excess code of a tile's rows (row r's at `excess[starts[r]..starts[r + 1]]`)
/// times its weights to the row's sums: one `vpmaddwd` of the pair with the code's vector of
/// the exact layout per panel, exact in i32 (at most 127 x 128).
///
/// # Safety
/// AVX2 available; `ep` points at panel 0 of NV panels of the exact layout, `panel_len`
/// i16 apart, for the K the excess codes were found in; `starts` has MR + 1 entries.
#[inline(always)]
unsafe fn add_excess<const MR: usize, const NV: usize>(
    acc: &mut [[__m256i; NV]; MR],
    (excess, starts): (&[Excess], &[u32]),
    ep: *const i16,
    panel_len: usize,
) {
    for (r, accr) in acc.iter_mut().enumerate() {
        for e in &excess[starts[r] as usize..starts[r + 1] as usize] {
            // SAFETY: AVX2 (precondition); `e.at` starts a 16-lane vector inside each panel.
            unsafe {
                let pair = _mm256_set1_epi32(e.pair);
                for (v, a) in accr.iter_mut().enumerate() {
                    let w = _mm256_loadu_si256(ep.add(v * panel_len + e.at as usize).cast());
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pair, w));
                }
            }
        }
    }
}

/// Rows per tile of the exact kernel over widened rows.
const WIDE_ROWS: usize = 4;

/// The last partial quad of a row of `k` bytes (`k % 4 != 0`): its `k % 4` bytes at the
/// bottom of a little-endian i32, zeros above. With `k >= 4` one unaligned load of the row's
/// last four bytes, shifted down, instead of a byte copy of variable length (stems such as
/// 7 x 7 x 3 = 147 and 3 x 3 x 3 = 27 end every row with one).
///
/// # Safety
/// `k` bytes are readable from `row`.
#[inline(always)]
unsafe fn tail_quad(row: *const u8, k: usize) -> i32 {
    let rem = k % 4;
    debug_assert!(rem != 0);
    if k >= 4 {
        // SAFETY: bytes k - 4..k of the row exist (precondition, k >= 4).
        let last = unsafe { ptr::read_unaligned(row.add(k - 4).cast::<u32>()) };
        (u32::from_le(last) >> (8 * (4 - rem))) as i32
    } else {
        let mut q = [0u8; 4];
        // SAFETY: the row's k < 4 bytes exist (precondition); q holds 4.
        unsafe { ptr::copy_nonoverlapping(row, q.as_mut_ptr(), k) };
        i32::from_le_bytes(q)
    }
}

/// One quad of K for every row on the exact i16 pairs: `quad(r)` is row r's four bytes as a
/// little-endian i32, masked and shifted into its even and odd pairs.
///
/// # Safety
/// AVX2 available; `wq` points at a quad's weights (`pack_avx2`) in panel 0, panels `panel`
/// apart.
#[inline(always)]
unsafe fn exact_step<const MR: usize, const NV: usize>(
    acc: &mut [[__m256i; NV]; MR],
    wq: *const i16,
    panel: usize,
    quad: impl Fn(usize) -> i32,
) {
    // SAFETY: AVX2 (precondition); panel v holds the quad's 2 x 8 x 2 i16.
    unsafe {
        let even = _mm256_set1_epi32(0x00ff_00ff);
        let mut we = [_mm256_setzero_si256(); NV];
        let mut wo = [_mm256_setzero_si256(); NV];
        for v in 0..NV {
            we[v] = _mm256_loadu_si256(wq.add(v * panel).cast());
            wo[v] = _mm256_loadu_si256(wq.add(v * panel + 2 * AVX2_LANES).cast());
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            let bc = _mm256_set1_epi32(quad(r));
            let (ev, od) = (_mm256_and_si256(bc, even), _mm256_srli_epi16::<8>(bc));
            for v in 0..NV {
                accr[v] = _mm256_add_epi32(accr[v], _mm256_madd_epi16(ev, we[v]));
                accr[v] = _mm256_add_epi32(accr[v], _mm256_madd_epi16(od, wo[v]));
            }
        }
    }
}

/// MR rows x NV vectors of 8 columns with `vpmaddwd` on i16 pairs: exact (each pair sum is at
/// most 2 * 255 * 128, far inside i32).
///
/// K goes four at a time: one broadcast of a row's four bytes; masking keeps bytes 0 and 2
/// of each 32-bit lane as an i16 pair, a 16-bit shift right gives bytes 1 and 3, and each
/// meets its half of the quad's weights (`pack_avx2`). A last partial quad is read byte by
/// byte. A 3 x 2 tile keeps its 6 accumulators, the quad's 4 weight vectors, the row's
/// operands and the products in the 16 registers (a fourth row would spill).
///
/// # Safety
/// AVX2 available; as for [`vnni_kernel`] with the AVX2 packing; MR <= 3 and NV <= 2. No
/// `target_feature` of its own, so that it inlines into its AVX2 callers (a call would pass
/// the accumulators back through memory once per tile).
#[inline(always)]
unsafe fn avx2_kernel<const MR: usize, const NV: usize>(
    a: *const u8,
    lda: usize,
    k: usize,
    b: *const i16,
) -> [[__m256i; NV]; MR] {
    let panel = avx2_panel_len(k);
    // SAFETY: AVX is available (precondition).
    let mut acc = [[unsafe { _mm256_setzero_si256() }; NV]; MR];
    let whole = k / 4;
    for g in 0..whole {
        // SAFETY: AVX2 available (precondition); bytes 4g..4g + 4 <= k of each row exist.
        unsafe {
            exact_step(&mut acc, b.add(g * 4 * AVX2_LANES), panel, |r| {
                ptr::read_unaligned(a.add(r * lda + 4 * g).cast::<i32>())
            })
        };
    }
    if !k.is_multiple_of(4) {
        let g = whole;
        // SAFETY: as above; `tail_quad` reads only bytes of each row's first k.
        unsafe { exact_step(&mut acc, b.add(g * 4 * AVX2_LANES), panel, |r| tail_quad(a.add(r * lda), k)) };
    }
    acc
}

/// One quad of K for every row on `vpmaddubsw`: `quad(r)` is row r's four bytes as a
/// little-endian i32; the quad's weights at `wq` in panel 0, panels `panel` apart.
///
/// # Safety
/// AVX2 available; NV panels hold the quad's 8 x 4 bytes.
#[inline(always)]
unsafe fn pairs_step<const MR: usize, const NV: usize>(
    acc: &mut [[__m256i; NV]; MR],
    wq: *const i8,
    panel: usize,
    quad: impl Fn(usize) -> i32,
) {
    // SAFETY: AVX2 (precondition); panel v holds the quad's 8 x 4 bytes.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut w = [_mm256_setzero_si256(); NV];
        for (v, wv) in w.iter_mut().enumerate() {
            *wv = _mm256_loadu_si256(wq.add(v * panel).cast());
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            let bc = _mm256_set1_epi32(quad(r));
            for v in 0..NV {
                accr[v] = _mm256_add_epi32(accr[v], _mm256_madd_epi16(_mm256_maddubs_epi16(bc, w[v]), ones));
            }
        }
    }
}

/// MR rows x NV vectors of 8 columns with `vpmaddubsw`: each 16-bit lane sums two
/// products, `vpmaddwd` by ones adds neighbouring lanes into i32. Exact only while no pair
/// sum leaves i16, which the caller guarantees (`Avx2Pairs::max_input` bounds the rows).
/// Three instructions per 32 products against the exact kernel's five.
///
/// # Safety
/// AVX2 available; `b` is `pack_pairs` of weights with this `k`, panels `pairs_panel_len(k)`
/// apart; rows as for [`avx2_kernel`], their codes at most the packing's `max_input`;
/// MR <= 4 and NV <= 2. Inlined into its AVX2 callers, as [`avx2_kernel`].
#[inline(always)]
unsafe fn avx2_pairs_kernel<const MR: usize, const NV: usize>(
    a: *const u8,
    lda: usize,
    k: usize,
    b: *const i8,
) -> [[__m256i; NV]; MR] {
    let panel = pairs_panel_len(k);
    // SAFETY: AVX is available (precondition).
    let mut acc = [[unsafe { _mm256_setzero_si256() }; NV]; MR];
    let whole = k / 4;
    for g in 0..whole {
        // SAFETY: AVX2 available (precondition); bytes 4g..4g + 4 <= k of each row exist.
        unsafe {
            pairs_step(&mut acc, b.add(g * 4 * AVX2_LANES), panel, |r| {
                ptr::read_unaligned(a.add(r * lda + 4 * g).cast::<i32>())
            })
        };
    }
    if !k.is_multiple_of(4) {
        let g = whole;
        // SAFETY: as above; `tail_quad` reads only bytes of each row's first k.
        unsafe { pairs_step(&mut acc, b.add(g * 4 * AVX2_LANES), panel, |r| tail_quad(a.add(r * lda), k)) };
    }
    acc
}

/// [`avx2_pairs_kernel`] two quads at a time: the two `vpmaddubsw` outputs of a row and
/// vector are added in i16 (`vpaddw`, which wraps) and widened once, so 64 products take
/// three multiplications instead of four. The quads go in the strip's order (`order`): its
/// pairs were chosen so that their sums stay inside i16 for inputs up to `max_input`, hence
/// exact; the quads that fit no partner run alone after them, and a partial last quad last.
///
/// # Safety
/// As [`avx2_pairs_kernel`], with `b` the packing `order_quads` returned `order` for,
/// pointing at panel `p`, and NV panels from `p` existing in the same strip of two.
#[inline(always)]
unsafe fn avx2_quads_kernel<const MR: usize, const NV: usize>(
    a: *const u8,
    lda: usize,
    k: usize,
    b: *const i8,
    order: &QuadOrder,
    p: usize,
) -> [[__m256i; NV]; MR] {
    let whole = k / 4;
    assert!(NV == 1 || p.is_multiple_of(2), "avx2_quads_kernel: a tile of two panels starts at odd panel {p}");
    let strip = p / 2;
    let offsets = &order.offsets[strip * whole..(strip + 1) * whole];
    let paired = order.paired[strip] as usize;
    // SAFETY: forwarded preconditions; `offsets` and `paired` are the strip's.
    unsafe { quads_core(a, lda, k, b, offsets, paired) }
}

/// [`avx2_quads_kernel`] with its strip's quad order given: `offsets` (4 x each whole quad's
/// index, in the order the packing put them) and how many of them lead in pairs.
///
/// # Safety
/// As [`avx2_quads_kernel`], `offsets` and `paired` the strip's of the packing's order.
#[inline(always)]
unsafe fn quads_core<const MR: usize, const NV: usize>(
    a: *const u8,
    lda: usize,
    k: usize,
    b: *const i8,
    offsets: &[u32],
    paired: usize,
) -> [[__m256i; NV]; MR] {
    let panel = pairs_panel_len(k);
    let quad = 4 * AVX2_LANES;
    let whole = k / 4;
    // SAFETY: AVX is available (precondition).
    let mut acc = [[unsafe { _mm256_setzero_si256() }; NV]; MR];
    for (h, pair) in offsets[..paired].chunks_exact(2).enumerate() {
        let (o0, o1) = (pair[0] as usize, pair[1] as usize);
        // SAFETY: AVX2 (precondition); panel v holds positions 2h and 2h + 1 (2 x 8 x 4
        // bytes); each offset is 4 x a whole quad's index, so bytes o..o + 4 <= k of each row
        // exist.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let wq = b.add(2 * h * quad);
            let mut w0 = [_mm256_setzero_si256(); NV];
            let mut w1 = [_mm256_setzero_si256(); NV];
            for v in 0..NV {
                w0[v] = _mm256_loadu_si256(wq.add(v * panel).cast());
                w1[v] = _mm256_loadu_si256(wq.add(v * panel + quad).cast());
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                let row = a.add(r * lda);
                let b0 = _mm256_set1_epi32(ptr::read_unaligned(row.add(o0).cast::<i32>()));
                let b1 = _mm256_set1_epi32(ptr::read_unaligned(row.add(o1).cast::<i32>()));
                for v in 0..NV {
                    let s = _mm256_add_epi16(_mm256_maddubs_epi16(b0, w0[v]), _mm256_maddubs_epi16(b1, w1[v]));
                    accr[v] = _mm256_add_epi32(accr[v], _mm256_madd_epi16(s, ones));
                }
            }
        }
    }
    for (t, &o) in offsets.iter().enumerate().skip(paired) {
        let o = o as usize;
        // SAFETY: as above, position t alone.
        unsafe {
            pairs_step(&mut acc, b.add(t * quad), panel, |r| ptr::read_unaligned(a.add(r * lda + o).cast::<i32>()))
        };
    }
    if !k.is_multiple_of(4) {
        // SAFETY: as in `avx2_pairs_kernel`; the partial quad stays at position `whole`.
        unsafe { pairs_step(&mut acc, b.add(whole * quad), panel, |r| tail_quad(a.add(r * lda), k)) };
    }
    acc
}

/// [`avx2_pairs_kernel`] on rows of any code: `b` is a full-range layout (`full_range_quads`),
/// whose zeroed quads are the ones that could saturate `vpmaddubsw` there; each of those
/// (listed per panel in `full`) runs afterwards as the exact kernel does, on i16 pairs of
/// the layer's exact layout `exact`.
///
/// # Safety
/// AVX2 available; `b` (panels `pairs_panel_len(k)` apart) and `exact` (`pack_avx2`, panels
/// `avx2_panel_len(k)` apart) point at panel `p` of layouts of the same weights with this
/// `k`, `full` the lists of `b`'s layout; NV panels from `p` exist; rows as for
/// [`avx2_kernel`] (any codes); MR <= 4 and NV <= 2.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn avx2_full_kernel<const MR: usize, const NV: usize>(
    a: *const u8,
    lda: usize,
    k: usize,
    b: *const i8,
    exact: *const i16,
    full: &FullRangeQuads,
    p: usize,
) -> [[__m256i; NV]; MR] {
    // SAFETY: the zeroed quads add nothing; the others cannot saturate for any input code
    // (`full_range_quads`); forwarded preconditions.
    let mut acc = unsafe { avx2_pairs_kernel::<MR, NV>(a, lda, k, b) };
    let whole = k / 4;
    for v in 0..NV {
        let entries = full.start[p + v] as usize..full.start[p + v + 1] as usize;
        for &g in &full.quads[entries] {
            let g = g as usize;
            // SAFETY: AVX2 (precondition); quad g's 2 x 8 x 2 i16 of panel p + v of the exact
            // layout; quad g's bytes of each row (its first k only, for a partial last quad).
            unsafe {
                let mut one = [[_mm256_setzero_si256(); 1]; MR];
                exact_step(&mut one, exact.add(v * avx2_panel_len(k) + g * 4 * AVX2_LANES), 0, |r| {
                    let row = a.add(r * lda);
                    if g < whole {
                        ptr::read_unaligned(row.add(4 * g).cast::<i32>())
                    } else {
                        tail_quad(row, k)
                    }
                });
                for r in 0..MR {
                    acc[r][v] = _mm256_add_epi32(acc[r][v], one[r][0]);
                }
            }
        }
    }
    acc
}

/// Bytes per row of [`widen_rows`]'s output for rows of `k` codes: two i32 per quad.
fn wide_len(k: usize) -> usize {
    8 * k.div_ceil(4)
}

/// Rows `r0..r0 + m` of `a` as the exact kernel's operands, once per block instead of once
/// per tile: each quad `a0 a1 a2 a3` becomes the i16 pairs `(a0, a2)` and `(a1, a3)`, the
/// two i32 that [`avx2_kernel`] masks and shifts out of a broadcast quad (a partial last
/// quad padded with zeros). Row r's pairs start at `out[r * wide_len(k)]`.
///
/// # Safety
/// AVX2 available; the rows exist in `a`; `out` holds `m * wide_len(a.k)` bytes.
#[target_feature(enable = "avx2")]
unsafe fn widen_rows(a: &QMatrix<'_>, r0: usize, m: usize, out: &mut [u8]) {
    let k = a.k;
    let wl = wide_len(k);
    let order = _mm_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
    for r in 0..m {
        let row = &a.data[(r0 + r) * a.lda..(r0 + r) * a.lda + k];
        let dst = &mut out[r * wl..(r + 1) * wl];
        let mut at = 0;
        while at + 16 <= k {
            // SAFETY: bytes at..at + 16 of the row; 32 bytes at 2 * at of its wide row
            // (2 * (at + 16) <= wide_len(k)).
            unsafe {
                let v = _mm_shuffle_epi8(_mm_loadu_si128(row.as_ptr().add(at).cast()), order);
                _mm256_storeu_si256(dst.as_mut_ptr().add(2 * at).cast(), _mm256_cvtepu8_epi16(v));
            }
            at += 16;
        }
        if at < k {
            // The last k - at (< 16) bytes, zero-padded to 16, widened the same way; the
            // zeros fill a partial last quad.
            let mut tail = [0u8; 16];
            tail[..k - at].copy_from_slice(&row[at..]);
            let mut wide = [0u8; 32];
            // SAFETY: 16 bytes of `tail`, 32 of `wide`.
            unsafe {
                let v = _mm_shuffle_epi8(_mm_loadu_si128(tail.as_ptr().cast()), order);
                _mm256_storeu_si256(wide.as_mut_ptr().cast(), _mm256_cvtepu8_epi16(v));
            }
            dst[2 * at..].copy_from_slice(&wide[..wl - 2 * at]);
        }
    }
}

/// The exact kernel on rows widened by [`widen_rows`] (`w`, rows `ldw` bytes apart): per
/// quad, each row's two i32 broadcast straight from memory, so no masking or shifting in the
/// loop (two `vpmaddwd` and two `vpaddd` per 16 columns and quad); up to 4 rows.
///
/// # Safety
/// AVX2 available; `b` as for [`avx2_kernel`]; MR rows of `wide_len(k)` bytes from `w`;
/// MR <= 4 and NV <= 2.
#[inline(always)]
unsafe fn avx2_wide_kernel<const MR: usize, const NV: usize>(
    w: *const u8,
    ldw: usize,
    k: usize,
    b: *const i16,
) -> [[__m256i; NV]; MR] {
    let panel = avx2_panel_len(k);
    // SAFETY: AVX is available (precondition).
    let mut acc = [[unsafe { _mm256_setzero_si256() }; NV]; MR];
    for g in 0..k.div_ceil(4) {
        // SAFETY: AVX2 (precondition); panel v holds quad g's 2 x 8 x 2 i16; each row's quad g
        // is its bytes 8g..8g + 8.
        unsafe {
            let wq = b.add(g * 4 * AVX2_LANES);
            let mut we = [_mm256_setzero_si256(); NV];
            let mut wo = [_mm256_setzero_si256(); NV];
            for v in 0..NV {
                we[v] = _mm256_loadu_si256(wq.add(v * panel).cast());
                wo[v] = _mm256_loadu_si256(wq.add(v * panel + 2 * AVX2_LANES).cast());
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                let q = w.add(r * ldw + 8 * g);
                let ev = _mm256_set1_epi32(ptr::read_unaligned(q.cast::<i32>()));
                let od = _mm256_set1_epi32(ptr::read_unaligned(q.add(4).cast::<i32>()));
                for v in 0..NV {
                    accr[v] = _mm256_add_epi32(accr[v], _mm256_madd_epi16(ev, we[v]));
                    accr[v] = _mm256_add_epi32(accr[v], _mm256_madd_epi16(od, wo[v]));
                }
            }
        }
    }
    acc
}

/// The AVX2 weights a tile reads: the exact i16 layout, or the `vpmaddubsw` one.
#[derive(Clone, Copy)]
pub(crate) enum Avx2Weights<'a> {
    Exact(&'a [i16]),
    Pairs(&'a Avx2Pairs),
    /// The full-range `vpmaddubsw` layout and the exact layout of the same weights.
    Full(&'a FullRangeQuads, &'a [i16]),
}

/// AVX2 counterpart of [`vnni_tile`]; `ncols <= 64` is processed in strips of 16 columns.
///
/// # Safety
/// The CPU supports AVX2; `w` is an AVX2 packing of weights with this `k` (for `Pairs`, every
/// code of the rows is at most its `max_input`); the rows exist; `ncols` columns exist from
/// panel `panel0`; `mr` at most 3 (`Exact`) or 4 (`Pairs`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn avx2_tile(
    a: &QMatrix<'_>,
    r0: usize,
    mr: usize,
    w: Avx2Weights<'_>,
    k: usize,
    panel0: usize,
    ncols: usize,
    tile: &mut Tile,
) {
    let ap = a.data[r0 * a.lda..].as_ptr();
    let mut c0 = 0;
    while c0 < ncols {
        let nv = (ncols - c0).div_ceil(AVX2_LANES).min(2);
        let panel = panel0 + c0 / AVX2_LANES;
        let mut strip: Tile = [[0; 64]; 6];
        match w {
            Avx2Weights::Exact(p) => {
                let bp = p[panel * avx2_panel_len(k)..].as_ptr();
                // SAFETY: forwarded preconditions; the table covers mr <= 3, nv <= 2.
                unsafe {
                    dispatch_avx2!(avx2_kernel, mr, nv, (ap, a.lda, k, bp), |acc| store_strip(&acc, &mut strip);
                        (1,1),(1,2),(2,1),(2,2),(3,1),(3,2))
                }
            }
            Avx2Weights::Full(full, exact) => {
                let bp = full.packed[panel * pairs_panel_len(k)..].as_ptr();
                let ep = exact[panel * avx2_panel_len(k)..].as_ptr();
                // SAFETY: forwarded preconditions; the table covers mr <= 4, nv <= 2.
                unsafe {
                    dispatch_avx2!(avx2_full_kernel, mr, nv, (ap, a.lda, k, bp, ep, full, panel), |acc| store_strip(&acc, &mut strip);
                        (1,1),(1,2),(2,1),(2,2),(3,1),(3,2),(4,1),(4,2))
                }
            }
            Avx2Weights::Pairs(p) => {
                let bp = p.packed[panel * pairs_panel_len(k)..].as_ptr();
                // SAFETY: forwarded preconditions; the table covers mr <= 4, nv <= 2; `order`
                // belongs to this packing, and `panel` is even when nv == 2.
                unsafe {
                    match &p.order {
                        Some(order) => {
                            dispatch_avx2!(avx2_quads_kernel, mr, nv, (ap, a.lda, k, bp, order, panel), |acc| store_strip(&acc, &mut strip);
                            (1,1),(1,2),(2,1),(2,2),(3,1),(3,2),(4,1),(4,2))
                        }
                        None => {
                            dispatch_avx2!(avx2_pairs_kernel, mr, nv, (ap, a.lda, k, bp), |acc| store_strip(&acc, &mut strip);
                            (1,1),(1,2),(2,1),(2,2),(3,1),(3,2),(4,1),(4,2))
                        }
                    }
                }
            }
        }
        for r in 0..mr {
            let w = (nv * AVX2_LANES).min(64 - c0);
            tile[r][c0..c0 + w].copy_from_slice(&strip[r][..w]);
        }
        c0 += nv * AVX2_LANES;
    }
}
