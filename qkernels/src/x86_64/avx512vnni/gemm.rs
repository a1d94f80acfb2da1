//! The AVX-512 VNNI GEMM micro-kernels (`vpdpbusd`): raw tiles, and whole blocks of rows
//! requantized (`u8`) or dequantized (`f32`) on registers.

use std::arch::x86_64::*;
use std::ptr;

use crate::frame::gemm::{Plan, QMatrix, Tile, REQUANT_LIMIT};
use crate::frame::pack::{vnni_panel_len, VNNI_LANES};
use crate::x86_64::FusedOut;

/// The accumulators' starting values for a fused tile: minus the zero-point column term of
/// each column (`a_zp * Σw`), which folds the epilogue's first subtraction into the sums.
/// `vpdpbusd` wraps, so the sums equal `acc - colterm` modulo 2^32, bit for bit: the same i32
/// that a subtraction after the dot products gives.
///
/// # Safety
/// AVX-512 F available (the caller's target features); `1 <= NV <= 4`;
/// `16 * (NV - 1) < f.ncols <= 16 * NV`; the plan covers the fused columns.
#[inline(always)]
unsafe fn neg_colterm<const NV: usize>(f: &FusedOut<'_>) -> [__m512i; NV] {
    // SAFETY: AVX-512 F is the caller's precondition; the masked loads read only columns
    // j0..j0 + ncols, which the plan covers.
    unsafe {
        let mut init = [_mm512_setzero_si512(); NV];
        for (v, iv) in init.iter_mut().enumerate() {
            let valid = (f.ncols - VNNI_LANES * v).min(VNNI_LANES);
            let m: __mmask16 = if valid == VNNI_LANES { 0xFFFF } else { (1u16 << valid) - 1 };
            let colterm = _mm512_maskz_loadu_epi32(m, f.plan.colterm.as_ptr().add(f.j0 + VNNI_LANES * v));
            *iv = _mm512_sub_epi32(_mm512_setzero_si512(), colterm);
        }
        init
    }
}
/// Where the rows of a VNNI tile come from: MR rows of A times NV panels of 16 columns, full
/// K, summed with `vpdpbusd` (exact int32 sums of u8 x i8 products: no 16-bit intermediate,
/// unlike `vpmaddubsw`) from starting values `init`, or sums the AMX tier's tiles computed.
pub(crate) trait TileRows {
    /// The sums of rows `first..first + MR`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI available (the caller's target features); the rows exist; NV panels
    /// exist from the source's first.
    unsafe fn sums<const MR: usize, const NV: usize>(&self, first: usize, init: [__m512i; NV]) -> [[__m512i; NV]; MR];
}

/// Rows of a dense A: row `r` at `a + r * lda`, `k` bytes; the weights from panel `b`.
struct DenseRows {
    a: *const u8,
    lda: usize,
    k: usize,
    b: *const i8,
}

impl TileRows for DenseRows {
    #[inline(always)]
    unsafe fn sums<const MR: usize, const NV: usize>(&self, first: usize, init: [__m512i; NV]) -> [[__m512i; NV]; MR] {
        let (a, lda, k, b) = (self.a.wrapping_add(first * self.lda), self.lda, self.k, self.b);
        let panel = vnni_panel_len(k);
        let full = k / 4;
        // SAFETY: AVX-512 F/BW/VNNI (precondition); row r of the tile holds k readable bytes,
        // and panel v holds ceil(k/4) groups of 64 bytes.
        unsafe {
            let mut acc = [init; MR];
            // One k-group: load NV weight vectors, then one broadcast and NV dot products per row.
            macro_rules! group {
                ($g:expr, $quad:expr) => {{
                    let g = $g;
                    let mut bv = [_mm512_setzero_si512(); NV];
                    for (v, bvv) in bv.iter_mut().enumerate() {
                        *bvv = _mm512_loadu_si512(b.add(v * panel + g * 4 * VNNI_LANES).cast());
                    }
                    for (r, accr) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_epi32($quad(r, g));
                        for v in 0..NV {
                            accr[v] = _mm512_dpbusd_epi32(accr[v], av, bv[v]);
                        }
                    }
                }};
            }
            for g in 0..full {
                // 4g + 4 <= k bytes of row r are readable.
                group!(g, |r: usize, g: usize| ptr::read_unaligned(a.add(r * lda + 4 * g).cast::<i32>()));
            }
            if !k.is_multiple_of(4) {
                // Row r holds k readable bytes and 4 * full < k.
                group!(full, |r: usize, g: usize| a_quad(a.add(r * lda), 4 * g, k));
            }
            acc
        }
    }
}

/// MR rows x NV vectors of raw sums into `tile`, for an epilogue that is not the fused `u8`
/// one.
///
/// # Safety
/// AVX-512 F/BW/VNNI available; `a` holds rows r0..r0+MR of `k` bytes, `lda` apart; `b`
/// points at panel `p0` of a VNNI packing of this K with at least NV panels from there;
/// MR <= 6 and NV <= 4.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn vnni_kernel<const MR: usize, const NV: usize>(
    a: *const u8,
    lda: usize,
    k: usize,
    b: *const i8,
    tile: &mut Tile,
) {
    // SAFETY: this function's target features; forwarded preconditions; tile rows hold 64
    // i32 and v < 4, so 16v + 16 <= 64.
    unsafe {
        let acc = DenseRows { a, lda, k, b }.sums::<MR, NV>(0, [_mm512_setzero_si512(); NV]);
        for r in 0..MR {
            for v in 0..NV {
                _mm512_storeu_si512(tile[r].as_mut_ptr().add(v * VNNI_LANES).cast(), acc[r][v]);
            }
        }
    }
}

/// Rows `f.r0..f.r0 + m` of `src` times one tile of up to 64 columns, requantized to `u8`:
/// six rows at a time (the last tile as many as remain), from accumulators that start at
/// minus the column term ([`neg_colterm`]) to bytes without leaving the registers, with the
/// requantization constants ([`Requant`]) set up once for all the rows.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available (the caller's target features); `src` holds the rows
/// `0..m` (its rows are the fused target's from `f.r0`); `f.out` points at an output with row
/// stride `f.ldc` holding rows `f.r0..f.r0 + m` and columns `f.j0..f.j0 + f.ncols`;
/// `16 * (NV - 1) < f.ncols <= 16 * NV`; the plan covers those columns and `f.rowsums` those
/// rows (when the weights have zero points).
#[inline(always)]
unsafe fn fused_rows<S: TileRows, const NV: usize>(src: &S, m: usize, f: &FusedOut<'_>) {
    // Locals, not fields: the stores below may alias anything as far as the compiler knows.
    let (out, ldc, r0, j0, rowsums) = (f.out, f.ldc, f.r0, f.j0, f.rowsums);
    // SAFETY: forwarded preconditions.
    unsafe {
        let rq = Requant::<NV>::new(f.plan, j0, f.ncols);
        let init = neg_colterm::<NV>(f);
        macro_rules! tile {
            ($mr:literal, $first:expr) => {{
                let acc = src.sums::<$mr, NV>($first, init);
                for (i, accr) in acc.iter().enumerate() {
                    let r = r0 + $first + i;
                    let rowsum = if rq.has_zw { rowsums[r] } else { 0 };
                    rq.row(accr, rowsum, out.add(r * ldc + j0));
                }
            }};
        }
        tiles_of_six!(m, tile);
    }
}

/// [`fused_rows`] compiled for AVX-512 VNNI, for one source and one NV.
///
/// # Safety
/// As [`fused_rows`], with the CPU supporting AVX-512 VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn vnni_fused<S: TileRows, const NV: usize>(src: &S, m: usize, f: &FusedOut<'_>) {
    // SAFETY: this function's target features; forwarded preconditions.
    unsafe { fused_rows::<S, NV>(src, m, f) }
}

/// [`vnni_fused`] for the NV that covers `f.ncols`.
///
/// # Safety
/// As [`vnni_fused`], with `1 <= f.ncols <= 64`.
pub(crate) unsafe fn vnni_fused_any<S: TileRows>(src: &S, m: usize, f: &FusedOut<'_>) {
    // SAFETY: forwarded preconditions, with 16 * (NV - 1) < ncols <= 16 * NV.
    unsafe {
        match f.ncols.div_ceil(VNNI_LANES) {
            1 => vnni_fused::<S, 1>(src, m, f),
            2 => vnni_fused::<S, 2>(src, m, f),
            3 => vnni_fused::<S, 3>(src, m, f),
            4 => vnni_fused::<S, 4>(src, m, f),
            nv => unreachable!("{nv} vectors of columns in one tile"),
        }
    }
}

/// Rows `f.r0..f.r0 + m` of `a` times `f.ncols <= 64` columns of the packed weights from
/// panel `panel0`, requantized into the fused target ([`fused_rows`]).
///
/// # Safety
/// The CPU supports AVX-512 VNNI; `packed` is the VNNI packing of weights with this `k`;
/// the rows exist in `a`; the columns exist from panel `panel0`; the fused target covers
/// the rows and columns.
pub(crate) unsafe fn vnni_dense_rows(
    f: &FusedOut<'_>,
    a: &QMatrix<'_>,
    m: usize,
    packed: &[i8],
    k: usize,
    panel0: usize,
) {
    let src = DenseRows {
        a: a.data[f.r0 * a.lda..].as_ptr(),
        lda: a.lda,
        k,
        b: packed[panel0 * vnni_panel_len(k)..].as_ptr(),
    };
    // SAFETY: forwarded preconditions.
    unsafe { vnni_fused_any(&src, m, f) }
}

/// Dense rows `f.r0..f.r0 + m` of `a` times `ncols <= 64` columns from panel `panel0`,
/// dequantized to `f32` straight from the accumulators: per vector the exact sum (the
/// accumulators start at minus the zero-point column term; the weight zero-point term is
/// subtracted when there is one), then `fma(raw, sa * sw, bias)` and an optional ReLU, the
/// same operations as `gemm::dequantize_row`, so the same bits.
///
/// # Safety
/// The CPU supports AVX-512 VNNI; `packed` is the VNNI packing of weights with this `k`; the
/// rows exist in `a`; the columns exist from panel `panel0`; `out` (row stride `ldc`) holds
/// rows `f.r0..f.r0 + m` and the columns; `rowsums` covers the rows when the weights have
/// zero points.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn vnni_dense_rows_f32(
    f: &FusedOut<'_>,
    a: &QMatrix<'_>,
    m: usize,
    packed: &[i8],
    k: usize,
    panel0: usize,
    relu: bool,
    per_row: Option<(&[crate::QuantU8], &[i32])>,
) {
    let src = DenseRows {
        a: a.data[f.r0 * a.lda..].as_ptr(),
        lda: a.lda,
        k,
        b: packed[panel0 * vnni_panel_len(k)..].as_ptr(),
    };
    // SAFETY: forwarded preconditions.
    unsafe { vnni_sums_f32(&src, m, f, relu, per_row) }
}

/// Rows `f.r0..f.r0 + m` of any source of sums (`src`'s rows from 0) dequantized to `f32`
/// as [`vnni_dense_rows_f32`] does.
///
/// # Safety
/// The CPU supports AVX-512 VNNI; `src` holds the rows `0..m` and `f.ncols <= 64` columns;
/// `f.out` (row stride `f.ldc`, `f32` values) holds rows `f.r0..f.r0 + m` and the columns;
/// the plan covers the columns, `f.rowsums` the rows when the weights have zero points.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn vnni_sums_f32<S: TileRows>(
    src: &S,
    m: usize,
    f: &FusedOut<'_>,
    relu: bool,
    per_row: Option<(&[crate::QuantU8], &[i32])>,
) {
    // SAFETY: forwarded preconditions.
    unsafe {
        match f.ncols.div_ceil(VNNI_LANES) {
            1 => dense_f32::<_, 1>(src, m, f, relu, per_row),
            2 => dense_f32::<_, 2>(src, m, f, relu, per_row),
            3 => dense_f32::<_, 3>(src, m, f, relu, per_row),
            4 => dense_f32::<_, 4>(src, m, f, relu, per_row),
            nv => unreachable!("{nv} vectors of columns in one tile"),
        }
    }
}

/// [`vnni_dense_rows_f32`] for one NV (`f.out` is the `f32` output, as bytes).
///
/// # Safety
/// As [`vnni_dense_rows_f32`], with `16 * (NV - 1) < f.ncols <= 16 * NV`.
#[inline(always)]
unsafe fn dense_f32<S: TileRows, const NV: usize>(
    src: &S,
    m: usize,
    f: &FusedOut<'_>,
    relu: bool,
    per_row: Option<(&[crate::QuantU8], &[i32])>,
) {
    let (out, ldc, r0, j0, plan) = (f.out.cast::<f32>(), f.ldc, f.r0, f.j0, f.plan);
    // SAFETY: AVX-512 F (precondition); masked loads and stores touch columns j0..j0 + ncols
    // only, which the plan and the output cover.
    unsafe {
        let init = neg_colterm::<NV>(f);
        let mut masks = [0 as __mmask16; NV];
        let mut consts = [[_mm512_setzero_ps(); 2]; NV];
        let mut zw = [_mm512_setzero_si512(); NV];
        let mut col_off = [_mm512_setzero_si512(); NV];
        for v in 0..NV {
            let valid = (f.ncols - VNNI_LANES * v).min(VNNI_LANES);
            masks[v] = if valid == VNNI_LANES { 0xFFFF } else { (1u16 << valid) - 1 };
            let j = j0 + VNNI_LANES * v;
            if let Some((_, offsets)) = per_row {
                col_off[v] = _mm512_maskz_loadu_epi32(masks[v], offsets.as_ptr().add(j));
            }
            consts[v] = [
                _mm512_maskz_loadu_ps(masks[v], plan.ab_scale.as_ptr().add(j)),
                _mm512_maskz_loadu_ps(masks[v], plan.bias.as_ptr().add(j)),
            ];
            if plan.has_zw {
                zw[v] = _mm512_maskz_loadu_epi32(masks[v], plan.zw.as_ptr().add(j));
            }
        }
        macro_rules! tile {
            ($mr:literal, $first:expr) => {{
                let acc = src.sums::<$mr, NV>($first, init);
                for (i, accr) in acc.iter().enumerate() {
                    let r = r0 + $first + i;
                    // This row's zero point and scale, when each row has its own.
                    let row_q = per_row.map(|(q, _)| (_mm512_set1_epi32(q[r].zero_point), _mm512_set1_ps(q[r].scale)));
                    for v in 0..NV {
                        let mut raw = accr[v];
                        if plan.has_zw {
                            let rs = _mm512_set1_epi32(f.rowsums[r]);
                            raw = _mm512_sub_epi32(raw, _mm512_mullo_epi32(rs, zw[v]));
                        }
                        let [mut scale, bias] = consts[v];
                        if let Some((za, sa)) = row_q {
                            raw = _mm512_sub_epi32(raw, _mm512_mullo_epi32(za, col_off[v]));
                            scale = _mm512_mul_ps(sa, scale);
                        }
                        let mut y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(raw), scale, bias);
                        if relu {
                            y = _mm512_max_ps(y, _mm512_setzero_ps());
                        }
                        _mm512_mask_storeu_ps(out.add(r * ldc + j0 + VNNI_LANES * v), masks[v], y);
                    }
                }
            }};
        }
        tiles_of_six!(m, tile);
    }
}

/// The requantization constants of up to four 16-column vectors of output, in registers:
/// FBGEMM's f32 steps per vector, then a row's vectors narrow together (two saturating packs,
/// the output zero point added on 16-bit lanes, a saturating pack to bytes and a dword
/// permutation: one store of up to 64 bytes, masked at the right edge, and the clamp to
/// `lo..=hi` on bytes). The same f32 operations in the same order as `requantize_scalar`, so
/// the same bits.
///
/// Adding the zero point after the first pack gives the same bytes: with `0 <= zo <= 255`,
/// `sat_u8(sat_i16(sat_i16(c) + zo)) == clamp(c + zo, 0, 255)` for every i32 `c` (when `c`
/// saturates to i16, `c + zo` is far outside 0..=255 on the same side).
struct Requant<const NV: usize> {
    /// Per vector: bias operands and multiplier (zero past the last column).
    consts: [[__m512; 3]; NV],
    zw: [__m512i; NV],
    lim: __m512,
    nlim: __m512,
    zo: __m512i,
    lo: __m512i,
    hi: __m512i,
    order: __m512i,
    store_mask: __mmask64,
    has_zw: bool,
    clamp_free: bool,
    clip_lo: bool,
    clip_hi: bool,
}

impl<const NV: usize> Requant<NV> {
    /// The constants of columns `j0..j0 + ncols`.
    ///
    /// # Safety
    /// AVX-512 F/BW available; `1 <= NV <= 4`; `16 * (NV - 1) < ncols <= 16 * NV`; the plan
    /// covers the columns.
    #[inline(always)]
    unsafe fn new(plan: &Plan, j0: usize, ncols: usize) -> Self {
        debug_assert!((1..=4).contains(&NV) && ncols > VNNI_LANES * (NV - 1) && ncols <= VNNI_LANES * NV);
        debug_assert!(0 <= plan.lo && plan.lo <= plan.hi && plan.hi <= 255);
        debug_assert!((0..=255).contains(&plan.zo));
        // SAFETY: AVX-512 F/BW (precondition); the masked loads read only columns
        // j0..j0 + ncols, which the plan covers.
        unsafe {
            let mut consts = [[_mm512_setzero_ps(); 3]; NV];
            let mut zw = [_mm512_setzero_si512(); NV];
            for v in 0..NV {
                let j = j0 + VNNI_LANES * v;
                let valid = (ncols - VNNI_LANES * v).min(VNNI_LANES);
                let m: __mmask16 = if valid == VNNI_LANES { 0xFFFF } else { (1u16 << valid) - 1 };
                if plan.has_zw {
                    zw[v] = _mm512_maskz_loadu_epi32(m, plan.zw.as_ptr().add(j));
                }
                consts[v] = [
                    _mm512_maskz_loadu_ps(m, plan.bias_term.as_ptr().add(j)),
                    _mm512_maskz_loadu_ps(m, plan.bias_scale.as_ptr().add(j)),
                    _mm512_maskz_loadu_ps(m, plan.mult.as_ptr().add(j)),
                ];
            }
            Requant {
                consts,
                zw,
                lim: _mm512_set1_ps(REQUANT_LIMIT),
                nlim: _mm512_set1_ps(-REQUANT_LIMIT),
                zo: _mm512_set1_epi16(plan.zo as i16),
                lo: _mm512_set1_epi8(plan.lo as u8 as i8),
                hi: _mm512_set1_epi8(plan.hi as u8 as i8),
                // After the packs, dword 4l + j holds columns 16j + 4l .. + 4: put it at
                // dword 4j + l.
                order: _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
                store_mask: if ncols == 64 { !0 } else { (1u64 << ncols) - 1 },
                has_zw: plan.has_zw,
                clamp_free: plan.clamp_free,
                clip_lo: plan.lo > 0,
                clip_hi: plan.hi < 255,
            }
        }
    }

    /// Requantizes one row of accumulators (`acc - colterm`) and stores its bytes at `dst`.
    ///
    /// # Safety
    /// AVX-512 F/BW available; `ncols` bytes are writable at `dst`; `rowsum` is the row's
    /// activation sum when the weights have zero points.
    #[inline(always)]
    unsafe fn row(&self, acc: &[__m512i; NV], rowsum: i32, dst: *mut u8) {
        // SAFETY: AVX-512 F/BW (precondition); the masked store writes the ncols bytes at dst.
        unsafe {
            let mut q = [_mm512_setzero_si512(); 4];
            for v in 0..NV {
                let mut raw = acc[v];
                if self.has_zw {
                    raw = _mm512_sub_epi32(raw, _mm512_mullo_epi32(_mm512_set1_epi32(rowsum), self.zw[v]));
                }
                let [bias, bscale, mult] = self.consts[v];
                let mut x = _mm512_mul_ps(_mm512_fmadd_ps(bias, bscale, _mm512_cvtepi32_ps(raw)), mult);
                if !self.clamp_free {
                    x = _mm512_min_ps(_mm512_max_ps(x, self.nlim), self.lim);
                }
                // Rounds half to even: Rust code never changes MXCSR from its default.
                q[v] = _mm512_cvtps_epi32(x);
            }
            // Signed saturation to i16, the zero point, then unsigned saturation to u8: a
            // clamp to 0..=255, within which lo and hi clamp the bytes exactly as they would
            // the i32 values. (Vectors past NV are zeros whose bytes are not stored.)
            let lo_half = _mm512_adds_epi16(_mm512_packs_epi32(q[0], q[1]), self.zo);
            let hi_half = if NV > 2 {
                _mm512_adds_epi16(_mm512_packs_epi32(q[2], q[3]), self.zo)
            } else {
                _mm512_setzero_si512()
            };
            let mut bytes = _mm512_permutexvar_epi32(self.order, _mm512_packus_epi16(lo_half, hi_half));
            if self.clip_lo {
                bytes = _mm512_max_epu8(bytes, self.lo);
            }
            if self.clip_hi {
                bytes = _mm512_min_epu8(bytes, self.hi);
            }
            if self.store_mask == !0 {
                _mm512_storeu_si512(dst.cast(), bytes);
            } else {
                _mm512_mask_storeu_epi8(dst.cast(), self.store_mask, bytes);
            }
        }
    }
}

macro_rules! dispatch_tile {
    ($kernel:ident, $mr:expr, $nv:expr, $args:tt; $( ($m:literal, $v:literal) ),* ) => {
        match ($mr, $nv) {
            $( ($m, $v) => $kernel::<$m, $v> $args, )*
            _ => unreachable!("tile {}x{} outside the kernel table", $mr, $nv),
        }
    };
}

/// Fills `tile` with rows r0..r0+mr of `a` times `ncols` columns of the packed weights from
/// panel `panel0`: raw sums, for the epilogues other than the fused `u8` one.
///
/// # Safety
/// The CPU supports AVX-512 VNNI; `packed` is the VNNI packing of weights with this `k`;
/// the rows exist in `a`; `ncols <= 64` columns exist from panel `panel0`; `mr <= 6`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn vnni_tile(
    a: &QMatrix<'_>,
    r0: usize,
    mr: usize,
    packed: &[i8],
    k: usize,
    panel0: usize,
    ncols: usize,
    tile: &mut Tile,
) {
    let nv = ncols.div_ceil(VNNI_LANES);
    let ap = a.data[r0 * a.lda..].as_ptr();
    let bp = packed[panel0 * vnni_panel_len(k)..].as_ptr();
    // SAFETY: forwarded preconditions; the table covers every (mr, nv) with mr <= 6, nv <= 4.
    unsafe {
        dispatch_tile!(vnni_kernel, mr, nv, (ap, a.lda, k, bp, tile);
            (1,1),(1,2),(1,3),(1,4),(2,1),(2,2),(2,3),(2,4),(3,1),(3,2),(3,3),(3,4),
            (4,1),(4,2),(4,3),(4,4),(5,1),(5,2),(5,3),(5,4),(6,1),(6,2),(6,3),(6,4))
    }
}

/// Four consecutive activation bytes of row `row` from column `k0`, zero beyond `k`.
///
/// # Safety
/// `row` starts a row of at least `k` readable bytes; `k0 < k`.
#[inline(always)]
unsafe fn a_quad(row: *const u8, k0: usize, k: usize) -> i32 {
    if k0 + 4 <= k {
        // SAFETY: k0 + 4 <= k bytes of the row are readable (caller's precondition).
        unsafe { ptr::read_unaligned(row.add(k0).cast::<i32>()) }
    } else {
        let mut w = 0u32;
        for t in 0..k - k0 {
            // SAFETY: k0 + t < k.
            w |= (unsafe { *row.add(k0 + t) } as u32) << (8 * t);
        }
        w as i32
    }
}
