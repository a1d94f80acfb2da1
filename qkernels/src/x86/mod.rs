//! x86-64 micro-kernels: AVX-512 VNNI and AVX2, each the twin of the scalar kernel in
//! `gemm.rs`, and the AVX2 requantization epilogue.
//!
//! Callers reach these only through `gemm` and `conv`, after packing checked the CPU: every function
//! here is `unsafe` with the CPU feature as its precondition.

pub(crate) mod avx2;
pub(crate) mod fconv;

use std::arch::x86_64::*;
use std::ptr;

use crate::conv::{FlatConsts, RowConsts};
use crate::gemm::{Plan, QMatrix, Tile, MAX_TAIL_QUADS, REQUANT_LIMIT};
use crate::pack::{avx2_panel_len, pairs_panel_len, vnni_panel_len, AVX2_LANES, VNNI_LANES};

/// Runs `$tile!(MR, first)` over rows `0..$m` in tiles of six rows (the last one shorter),
/// `MR` a literal so each tile height is its own monomorphized kernel.
macro_rules! tiles_of_six {
    ($m:expr, $tile:ident) => {{
        let m = $m;
        let mut first = 0;
        while first < m {
            let n = (m - first).min(6);
            match n {
                6 => $tile!(6, first),
                5 => $tile!(5, first),
                4 => $tile!(4, first),
                3 => $tile!(3, first),
                2 => $tile!(2, first),
                _ => $tile!(1, first),
            }
            first += n;
        }
    }};
}

/// Where a VNNI kernel writes requantized `u8` (or dequantized `f32`: `out` then points at
/// `f32` values and `ldc` counts them) directly from its accumulators, with no tile buffer:
/// the output base pointer, its row stride, the first row and the columns.
#[derive(Debug)]
pub(crate) struct FusedOut<'p> {
    pub plan: &'p Plan,
    /// Activation row sums by global row (empty when the weights are symmetric).
    pub rowsums: &'p [i32],
    pub out: *mut u8,
    pub ldc: usize,
    pub r0: usize,
    pub j0: usize,
    pub ncols: usize,
}

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

/// Where the rows of a VNNI tile come from: MR rows of A times NV panels of 16 columns, full
/// K, summed with `vpdpbusd` (exact int32 sums of u8 x i8 products: no 16-bit intermediate,
/// unlike `vpmaddubsw`) from starting values `init`.
trait TileRows {
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
unsafe fn vnni_fused_any<S: TileRows>(src: &S, m: usize, f: &FusedOut<'_>) {
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
    unsafe {
        match f.ncols.div_ceil(VNNI_LANES) {
            1 => dense_f32::<1>(&src, m, f, relu, per_row),
            2 => dense_f32::<2>(&src, m, f, relu, per_row),
            3 => dense_f32::<3>(&src, m, f, relu, per_row),
            4 => dense_f32::<4>(&src, m, f, relu, per_row),
            nv => unreachable!("{nv} vectors of columns in one tile"),
        }
    }
}

/// [`vnni_dense_rows_f32`] for one NV (`f.out` is the `f32` output, as bytes).
///
/// # Safety
/// As [`vnni_dense_rows_f32`], with `16 * (NV - 1) < f.ncols <= 16 * NV`.
#[inline(always)]
unsafe fn dense_f32<const NV: usize>(
    src: &DenseRows,
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
/// [`epilogue_u8_avx2`] (hence of `requantize_scalar`), lane for lane.
///
/// # Safety
/// AVX2 and FMA available; the plan covers columns `j..j + lanes`; rows `i0..i0 + MR` and
/// those columns lie inside the output (and the row sums, when the weights have zero points).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn requantize_tile_avx2<const MR: usize, const NV: usize>(
    f: &FusedOut<'_>,
    acc: &[[__m256i; NV]; MR],
    i0: usize,
    j: usize,
    lanes: usize,
) {
    let plan = f.plan;
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
            if plan.has_zw {
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

/// A whole block of `u8` output from dense rows on AVX2, requantized on registers (no raw
/// tile in memory): strips of 16 columns, tiles of 4 rows on the `vpmaddubsw` kernel when
/// `pairs` is given and every code of the tile's rows is within its bound, else of 3 rows on
/// the exact kernel. Both give the same sums, so the bytes are the scalar path's.
///
/// # Safety
/// AVX2 and FMA available; `exact` (and `pairs`) are the AVX2 packings of weights with this
/// `k`; rows `f.r0..f.r0 + m` exist in `a`; as [`vnni_dense_rows`] for `f` (`f.j0` a
/// multiple of 8).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn avx2_fused_rows(
    f: &FusedOut<'_>,
    a: &QMatrix<'_>,
    m: usize,
    exact: &[i16],
    pairs: Option<(&[i8], u8)>,
    k: usize,
) {
    // Which rows the pair kernel may take: one pass over the block's rows, shared by every
    // strip of columns.
    assert!(m <= crate::gemm::MC, "avx2_fused_rows: {m} rows exceed a block of {}", crate::gemm::MC);
    let mut within = [false; crate::gemm::MC];
    if let Some((_, max)) = pairs {
        for (r, ok) in within[..m].iter_mut().enumerate() {
            let i = f.r0 + r;
            *ok = max == u8::MAX || crate::gemm::max_code(&a.data[i * a.lda..i * a.lda + a.k]) <= max;
        }
    }
    let mut c0 = 0;
    while c0 < f.ncols {
        let nv = (f.ncols - c0).div_ceil(AVX2_LANES).min(2);
        let lanes = (f.ncols - c0).min(2 * AVX2_LANES);
        let (j, panel) = (f.j0 + c0, (f.j0 + c0) / AVX2_LANES);
        let mut r = 0;
        while r < m {
            let i = f.r0 + r;
            let tile_pairs = pairs.filter(|_| within[r..r + (m - r).min(4)].iter().all(|&ok| ok));
            let ap = a.data[i * a.lda..].as_ptr();
            match tile_pairs {
                Some((p, _)) => {
                    let mr = (m - r).min(4);
                    let bp = p[panel * pairs_panel_len(k)..].as_ptr();
                    // SAFETY: the tile's rows and columns exist (preconditions); its codes were
                    // just checked against the pair packing's bound; the table covers mr <= 4,
                    // nv <= 2.
                    unsafe {
                        dispatch_avx2!(avx2_pairs_kernel, mr, nv, (ap, a.lda, k, bp), |acc| requantize_tile_avx2(f, &acc, i, j, lanes);
                            (1,1),(1,2),(2,1),(2,2),(3,1),(3,2),(4,1),(4,2))
                    }
                    r += mr;
                }
                None => {
                    let mr = (m - r).min(3);
                    let bp = exact[panel * avx2_panel_len(k)..].as_ptr();
                    // SAFETY: as above, on the exact kernel (mr <= 3, nv <= 2).
                    unsafe {
                        dispatch_avx2!(avx2_kernel, mr, nv, (ap, a.lda, k, bp), |acc| requantize_tile_avx2(f, &acc, i, j, lanes);
                            (1,1),(1,2),(2,1),(2,2),(3,1),(3,2))
                    }
                    r += mr;
                }
            }
        }
        c0 += nv * AVX2_LANES;
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
/// AVX2 available; as for [`vnni_kernel`] with the AVX2 packing; MR <= 3 and NV <= 2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn avx2_kernel<const MR: usize, const NV: usize>(
    a: *const u8,
    lda: usize,
    k: usize,
    b: *const i16,
) -> [[__m256i; NV]; MR] {
    /// One quad of K for every row: `quad(r)` is row r's four bytes as a little-endian i32.
    ///
    /// # Safety
    /// AVX2 available; `wq` points at a quad's weights in panel 0, panels `panel` apart.
    #[inline(always)]
    unsafe fn step<const MR: usize, const NV: usize>(
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
    let panel = avx2_panel_len(k);
    let mut acc = [[_mm256_setzero_si256(); NV]; MR];
    let whole = k / 4;
    for g in 0..whole {
        // SAFETY: AVX2 (this function's feature); bytes 4g..4g + 4 <= k of each row exist.
        unsafe {
            step(&mut acc, b.add(g * 4 * AVX2_LANES), panel, |r| {
                ptr::read_unaligned(a.add(r * lda + 4 * g).cast::<i32>())
            })
        };
    }
    if !k.is_multiple_of(4) {
        let g = whole;
        // SAFETY: as above; only the rows' last k - 4g < 4 bytes are read.
        unsafe {
            step(&mut acc, b.add(g * 4 * AVX2_LANES), panel, |r| {
                let mut q = [0u8; 4];
                ptr::copy_nonoverlapping(a.add(r * lda + 4 * g), q.as_mut_ptr(), k - 4 * g);
                i32::from_le_bytes(q)
            })
        };
    }
    acc
}

/// MR rows x NV vectors of 8 columns with `vpmaddubsw`: each 16-bit lane sums two
/// products, `vpmaddwd` by ones adds neighbouring lanes into i32. Exact only while no pair
/// sum leaves i16, which the caller guarantees (`Avx2Pairs::max_input` bounds the rows).
/// Three instructions per 32 products against the exact kernel's five.
///
/// # Safety
/// AVX2 available; `b` is `pack_pairs` of weights with this `k`, panels `pairs_panel_len(k)`
/// apart; rows as for [`avx2_kernel`], their codes at most the packing's `max_input`;
/// MR <= 4 and NV <= 2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn avx2_pairs_kernel<const MR: usize, const NV: usize>(
    a: *const u8,
    lda: usize,
    k: usize,
    b: *const i8,
) -> [[__m256i; NV]; MR] {
    /// One quad of K for every row: `quad(r)` is row r's four bytes as a little-endian i32.
    ///
    /// # Safety
    /// AVX2 available; `wq` points at a quad's weights in panel 0, panels `panel` apart.
    #[inline(always)]
    unsafe fn step<const MR: usize, const NV: usize>(
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
    let panel = pairs_panel_len(k);
    let mut acc = [[_mm256_setzero_si256(); NV]; MR];
    let whole = k / 4;
    for g in 0..whole {
        // SAFETY: AVX2 (this function's feature); bytes 4g..4g + 4 <= k of each row exist.
        unsafe {
            step(&mut acc, b.add(g * 4 * AVX2_LANES), panel, |r| {
                ptr::read_unaligned(a.add(r * lda + 4 * g).cast::<i32>())
            })
        };
    }
    if !k.is_multiple_of(4) {
        let g = whole;
        // SAFETY: as above; only the rows' last k - 4g < 4 bytes are read.
        unsafe {
            step(&mut acc, b.add(g * 4 * AVX2_LANES), panel, |r| {
                let mut q = [0u8; 4];
                ptr::copy_nonoverlapping(a.add(r * lda + 4 * g), q.as_mut_ptr(), k - 4 * g);
                i32::from_le_bytes(q)
            })
        };
    }
    acc
}

/// The AVX2 weights a tile reads: the exact i16 layout, or the `vpmaddubsw` one.
#[derive(Clone, Copy)]
pub(crate) enum Avx2Weights<'a> {
    Exact(&'a [i16]),
    Pairs(&'a [i8]),
}

/// AVX2 counterpart of [`vnni_tile`]; `ncols <= 64` is processed in strips of 16 columns.
///
/// # Safety
/// The CPU supports AVX2; `w` is an AVX2 packing of weights with this `k` (for `Pairs`, every
/// code of the rows is at most its `max_input`); the rows exist; `ncols` columns exist from
/// panel `panel0`; `mr` at most 3 (`Exact`) or 4 (`Pairs`).
#[allow(clippy::too_many_arguments)]
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
            Avx2Weights::Pairs(p) => {
                let bp = p[panel * pairs_panel_len(k)..].as_ptr();
                // SAFETY: forwarded preconditions; the table covers mr <= 4, nv <= 2.
                unsafe {
                    dispatch_avx2!(avx2_pairs_kernel, mr, nv, (ap, a.lda, k, bp), |acc| store_strip(&acc, &mut strip);
                        (1,1),(1,2),(2,1),(2,2),(3,1),(3,2),(4,1),(4,2))
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

/// Requantizes one row of raw sums to u8, 8 columns at a time; returns how many columns it
/// wrote (a multiple of 8), leaving the tail to the scalar reference. Bit-identical to
/// `requantize_scalar`: the same f32 add, then multiply (no FMA), then round half to even
/// (`cvtps_epi32` under the default MXCSR), clamp.
///
/// # Safety
/// AVX2 available; `acc.len() == out.len()`; the plan covers columns j0..j0+acc.len().
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn epilogue_u8_avx2(plan: &Plan, acc: &[i32], rowsum: i32, j0: usize, out: &mut [u8]) -> usize {
    let n = acc.len().min(out.len());
    let vrow = _mm256_set1_epi32(rowsum);
    let vzo = _mm256_set1_epi32(plan.zo);
    let vlo = _mm256_set1_epi32(plan.lo);
    let vhi = _mm256_set1_epi32(plan.hi);
    let lim = _mm256_set1_ps(REQUANT_LIMIT);
    let nlim = _mm256_set1_ps(-REQUANT_LIMIT);
    // Byte 0 of each i32 lane, gathered into the low 4 bytes of each 128-bit half.
    let gather = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1,
    );
    let mut c = 0;
    while c + 8 <= n {
        let j = j0 + c;
        // SAFETY: c + 8 <= n <= acc.len(); the plan's vectors have at least j0 + n entries.
        let (x, colterm, bias, bscale, mult) = unsafe {
            (
                _mm256_loadu_si256(acc.as_ptr().add(c).cast()),
                _mm256_loadu_si256(plan.colterm.as_ptr().add(j).cast()),
                _mm256_loadu_ps(plan.bias_term.as_ptr().add(j)),
                _mm256_loadu_ps(plan.bias_scale.as_ptr().add(j)),
                _mm256_loadu_ps(plan.mult.as_ptr().add(j)),
            )
        };
        let mut raw = _mm256_sub_epi32(x, colterm);
        if plan.has_zw {
            // SAFETY: as above.
            let zw = unsafe { _mm256_loadu_si256(plan.zw.as_ptr().add(j).cast()) };
            raw = _mm256_sub_epi32(raw, _mm256_mullo_epi32(vrow, zw));
        }
        let f = _mm256_mul_ps(_mm256_fmadd_ps(bias, bscale, _mm256_cvtepi32_ps(raw)), mult);
        let f = _mm256_min_ps(_mm256_max_ps(f, nlim), lim);
        let q = _mm256_add_epi32(_mm256_cvtps_epi32(f), vzo);
        let q = _mm256_min_epi32(_mm256_max_epi32(q, vlo), vhi);
        let bytes = _mm256_shuffle_epi8(q, gather);
        let lo = _mm256_cvtsi256_si32(bytes) as u32 as u64;
        let hi = _mm256_extract_epi32::<4>(bytes) as u32 as u64;
        // SAFETY: c + 8 <= n <= out.len().
        unsafe { ptr::write_unaligned(out.as_mut_ptr().add(c).cast::<u64>(), lo | (hi << 32)) };
        c += 8;
    }
    c
}

/// Interleaves four taps' 64 channels so that each 32-bit lane holds one channel's four tap
/// bytes: vector `q`, 128-bit lane `l`, dword `d` is channel `16l + 4q + d` (byte unpacks
/// stay within 128-bit lanes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn interleave_taps(x: [__m512i; 4]) -> [__m512i; 4] {
    let lo01 = _mm512_unpacklo_epi8(x[0], x[1]);
    let hi01 = _mm512_unpackhi_epi8(x[0], x[1]);
    let lo23 = _mm512_unpacklo_epi8(x[2], x[3]);
    let hi23 = _mm512_unpackhi_epi8(x[2], x[3]);
    [
        _mm512_unpacklo_epi16(lo01, lo23),
        _mm512_unpackhi_epi16(lo01, lo23),
        _mm512_unpacklo_epi16(hi01, hi23),
        _mm512_unpackhi_epi16(hi01, hi23),
    ]
}

/// Undoes [`interleave_taps`]' channel order on i32 accumulators: a 4 x 4 transpose of 128-bit
/// lanes, after which vector `l` holds channels `16l .. 16l + 16` in order.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose_lanes(r: [__m512i; 4]) -> [__m512i; 4] {
    let t0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(r[0], r[1]);
    let t1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(r[0], r[1]);
    let t2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(r[2], r[3]);
    let t3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(r[2], r[3]);
    [
        _mm512_shuffle_i32x4::<0b10_00_10_00>(t0, t2),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(t0, t2),
        _mm512_shuffle_i32x4::<0b10_00_10_00>(t1, t3),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(t1, t3),
    ]
}

/// One output pixel of a depthwise convolution with symmetric weights: for every channel,
/// `acc[c] = Σ_t x_t[c] * w_t[c]` over the taps (padding taps point at a row of zero points,
/// so the epilogue's `za * Σ_t w_t` correction makes them count as real zeros).
///
/// Channels go 64 at a time; taps 4 at a time. Byte unpacks interleave four taps' 64
/// channels into four vectors whose 32-bit lanes hold one channel's four tap values, in the
/// order `16l + 4q + d` (vector q, 128-bit lane l, dword d); `vpdpbusd` then does four taps
/// of sixteen channels per instruction; a 4 x 4 transpose of 128-bit lanes restores channel
/// order before the store.
///
/// # Safety
/// AVX-512 F/BW/VNNI available; each `taps[i]` holds at least `c` bytes; `acc` holds `c`
/// rounded up to 64; `packed` is `pack_depthwise_vnni` of these weights (c channels,
/// `taps.len()` taps).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn depthwise_vnni_pixel(taps: &[&[u8]], c: usize, packed: &[i8], acc: &mut [i32]) {
    let t = taps.len();
    let groups = t.div_ceil(4);
    let blocks = c.div_ceil(64);
    for b in 0..blocks {
        let valid = (c - 64 * b).min(64);
        let mask: __mmask64 = if valid == 64 { !0 } else { (1u64 << valid) - 1 };
        let mut r = [_mm512_setzero_si512(); 4];
        for g in 0..groups {
            let mut x = [_mm512_setzero_si512(); 4];
            for (i, xi) in x.iter_mut().enumerate() {
                // Past the last tap the weights are 0.
                let tap = (4 * g + i).min(t - 1);
                // SAFETY: the masked load reads only the `valid` bytes 64b..64b+valid < c of a
                // tap slice that holds c bytes.
                *xi = unsafe { _mm512_maskz_loadu_epi8(mask, taps[tap].as_ptr().add(64 * b).cast()) };
            }
            let quads = interleave_taps(x);
            let wbase = (b * groups + g) * 256;
            for q in 0..4 {
                // SAFETY: the packing holds blocks * groups * 256 bytes.
                let w = unsafe { _mm512_loadu_si512(packed.as_ptr().add(wbase + 64 * q).cast()) };
                r[q] = _mm512_dpbusd_epi32(r[q], quads[q], w);
            }
        }
        // r[q] lane l = channels 16l + 4q .. +3; transpose the 4 x 4 grid of 128-bit lanes.
        let v = transpose_lanes(r);
        for (l, vl) in v.into_iter().enumerate() {
            // SAFETY: acc holds c rounded up to 64 >= 64b + 16l + 16 entries.
            unsafe { _mm512_storeu_si512(acc.as_mut_ptr().add(64 * b + 16 * l).cast(), vl) };
        }
    }
}

/// One output row of a depthwise convolution whose taps advance `c` bytes per output pixel
/// (stride 1 along the width over a padded row, or stride 2 over a row split into its even
/// and odd pixels), as a 1-D correlation over the row flattened to `ow * c` bytes: output byte
/// `e` (pixel `e / c`, channel `e % c`) sums tap `i` at byte `e` from `taps[i]`. So 64
/// consecutive output bytes read 64 consecutive bytes per tap, whatever `c` is, and no lane
/// is wasted on small channel counts. The weights for a 64-byte chunk depend only on `e % c`
/// (its "class"); they are pre-interleaved per class like the per-pixel kernel's.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available; `1 <= taps.len() <= 64`; from each `taps[i]`,
/// `len.next_multiple_of(64)` bytes are readable; `weights` and `consts` are this layer's
/// for `c` channels and `taps.len()` taps; `out` has `len` writable bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn depthwise_vnni_flat_row(
    tap_starts: &[*const u8],
    c: usize,
    weights: &[i8],
    consts: &FlatConsts,
    len: usize,
    out: *mut u8,
) {
    let t = tap_starts.len();
    let groups = t.div_ceil(4);
    let g = crate::conv::gcd(c, 64);
    // Every tap's start, padded to whole groups of 4 with the last tap (its weights are 0).
    let mut taps = [std::ptr::null::<u8>(); 64];
    assert!((1..=taps.len()).contains(&t), "kernel of {t} taps: the depthwise kernel's table holds 1 to 64");
    for (i, p) in taps.iter_mut().enumerate().take(groups * 4) {
        *p = tap_starts[i.min(t - 1)];
    }
    let (lim, nlim) = (_mm512_set1_ps(REQUANT_LIMIT), _mm512_set1_ps(-REQUANT_LIMIT));
    let (zo, lo, hi) = (_mm512_set1_epi32(consts.zo), _mm512_set1_epi32(consts.lo), _mm512_set1_epi32(consts.hi));
    let (clamp_free, clip_hi) = (consts.clamp_free, consts.hi < 255);
    let shift = g.trailing_zeros(); // g divides 64: a power of two
    let (mut e0, mut offset) = (0, 0);
    while e0 < len {
        let class = offset >> shift;
        let mut r = [_mm512_setzero_si512(); 4];
        for grp in 0..groups {
            let mut x = [_mm512_setzero_si512(); 4];
            for (i, xi) in x.iter_mut().enumerate() {
                // SAFETY: from every tap start, len rounded up to 64 >= e0 + 64 bytes are
                // readable (precondition).
                *xi = unsafe { _mm512_loadu_si512(taps[4 * grp + i].add(e0).cast()) };
            }
            let quads = interleave_taps(x);
            let wbase = (class * groups + grp) * 256;
            for q in 0..4 {
                // SAFETY: the weights hold classes * groups * 256 bytes.
                let w = unsafe { _mm512_loadu_si512(weights.as_ptr().add(wbase + 64 * q).cast()) };
                r[q] = _mm512_dpbusd_epi32(r[q], quads[q], w);
            }
        }
        let v = transpose_lanes(r);
        let cbase = class * 64;
        let requant = |l: usize, acc: __m512i| -> __m128i {
            // SAFETY: the constants hold classes * 64 entries; cbase + 16l + 16 <= that.
            let (colterm, bias, mult) = unsafe {
                (
                    _mm512_loadu_si512(consts.colterm.as_ptr().add(cbase + 16 * l).cast()),
                    _mm512_loadu_ps(consts.bias_term.as_ptr().add(cbase + 16 * l)),
                    _mm512_loadu_ps(consts.mult.as_ptr().add(cbase + 16 * l)),
                )
            };
            // The depthwise bias forms add a precomputed term (`bias_scale` is 1: an exact fma
            // is this add).
            let raw = _mm512_sub_epi32(acc, colterm);
            let mut f = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(raw), bias), mult);
            if !clamp_free {
                f = _mm512_min_ps(_mm512_max_ps(f, nlim), lim);
            }
            // Rounds half to even: Rust code never changes MXCSR from its default.
            let mut q = _mm512_max_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(f), zo), lo);
            if clip_hi {
                q = _mm512_min_epi32(q, hi);
            }
            _mm512_cvtusepi32_epi8(q)
        };
        if e0 + 64 <= len {
            for (l, acc) in v.into_iter().enumerate() {
                // SAFETY: bytes e0..e0+64 <= len are writable (precondition).
                unsafe { _mm_storeu_si128(out.add(e0 + 16 * l).cast(), requant(l, acc)) };
            }
        } else {
            for (l, acc) in v.into_iter().enumerate() {
                let start = e0 + 16 * l;
                if start >= len {
                    break;
                }
                let valid = (len - start).min(16);
                let m: __mmask16 = if valid == 16 { 0xFFFF } else { (1u16 << valid) - 1 };
                // SAFETY: bytes start..start+valid < len are writable (precondition).
                unsafe { _mm_mask_storeu_epi8(out.add(start).cast(), m, requant(l, acc)) };
            }
        }
        e0 += 64;
        offset += 64;
        while offset >= c {
            offset -= c;
        }
    }
}

/// The kx-interleaved form of `count` 64-byte chunks of one padded input row, `step` bytes
/// apart from `row`, for the row-interleaved depthwise kernel: per chunk at `e0`, four
/// vectors `q` (256 bytes, stored one chunk after another) whose dword `(l, d)` holds the
/// bytes at `e0 + 16l + 4q + d + j * dw_bytes` for taps `j = 0..4` (taps past `kw` repeat the
/// last one; their weights are 0).
///
/// # Safety
/// AVX-512 F/BW available; `1 <= kw <= 4`; from `row + i * step` (`i < count`),
/// `(kw - 1) * dw_bytes + 64` bytes are readable; `out` has `256 * count` writable bytes.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn depthwise_rows_build(
    row: *const u8,
    kw: usize,
    dw_bytes: usize,
    count: usize,
    step: usize,
    out: *mut u8,
) {
    let offs = [0, 1, 2, 3].map(|j: usize| j.min(kw - 1) * dw_bytes);
    for i in 0..count {
        let mut x = [_mm512_setzero_si512(); 4];
        for (xj, o) in x.iter_mut().zip(offs) {
            // SAFETY: o <= (kw - 1) * dw_bytes: 64 readable bytes from row + i * step + o.
            *xj = unsafe { _mm512_loadu_si512(row.add(i * step + o).cast()) };
        }
        for (q, v) in interleave_taps(x).into_iter().enumerate() {
            // SAFETY: 256i + 64q + 64 <= 256 * count writable bytes.
            unsafe { _mm512_storeu_si512(out.add(256 * i + 64 * q).cast(), v) };
        }
    }
}

/// `count` chunks of 64 output bytes of one output row of a depthwise convolution with
/// stride 1 along the width, all of channel class `class` (so `step` bytes apart), from the
/// kx-interleaved rows ([`depthwise_rows_build`] of the same chunks) of its `KH` kernel
/// rows. Per chunk, one `vpdpbusd` per kernel row and vector does all `kw <= 4` taps of 16
/// outputs, with no shuffles; the accumulators come out in the order that two saturating
/// packs turn back into byte order, which also clamps to `0..=255`. The class's weights and
/// constants stay in registers for all `count` chunks: loads bound this kernel.
///
/// # Safety
/// AVX-512 F/BW/VNNI available; each `x4[ky]` holds `256 * count` bytes; `weights`
/// (`pack_depthwise_rows`) and `consts` are this layer's for `KH` kernel rows and hold class
/// `class`; `out + i * step` has 64 writable bytes for `i < count - 1`, and `last` (1..=64)
/// for the last chunk.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn depthwise_rows_compute<const KH: usize>(
    x4: &[*const u8; KH],
    weights: &[i8],
    consts: &RowConsts,
    class: usize,
    count: usize,
    step: usize,
    last: usize,
    out: *mut u8,
) {
    let (lim, nlim) = (_mm512_set1_ps(REQUANT_LIMIT), _mm512_set1_ps(-REQUANT_LIMIT));
    debug_assert!((0..=255).contains(&consts.zo) && consts.lo <= consts.hi);
    let zo = _mm512_set1_epi16(consts.zo as i16);
    let (lo, hi) = (_mm512_set1_epi8(consts.lo as i8), _mm512_set1_epi8(consts.hi as i8));
    // Locals: the stores below may alias the constants as far as the compiler knows.
    let (clamp_free, clip_lo, clip_hi) = (consts.clamp_free, consts.lo > 0, consts.hi < 255);
    let cb = 64 * class;
    let mut w = [[_mm512_setzero_si512(); 4]; KH];
    let (mut bias, mut mult, mut colterm) =
        ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4], [_mm512_setzero_si512(); 4]);
    for q in 0..4 {
        for (ky, wk) in w.iter_mut().enumerate() {
            // SAFETY: the weights hold (class + 1) * KH * 256 bytes or more.
            wk[q] = unsafe { _mm512_loadu_si512(weights.as_ptr().add((class * KH + ky) * 256 + 64 * q).cast()) };
        }
        // SAFETY: the constants hold (class + 1) * 64 entries or more.
        unsafe {
            bias[q] = _mm512_loadu_ps(consts.bias_term.as_ptr().add(cb + 16 * q));
            mult[q] = _mm512_loadu_ps(consts.mult.as_ptr().add(cb + 16 * q));
            colterm[q] = _mm512_loadu_si512(consts.neg_colterm.as_ptr().add(cb + 16 * q).cast());
        }
    }
    for i in 0..count {
        let mut r = colterm;
        for (row, wk) in x4.iter().zip(&w) {
            for q in 0..4 {
                // SAFETY: 256i + 64q + 64 <= 256 * count bytes of the row (precondition).
                let x = unsafe { _mm512_loadu_si512(row.add(256 * i + 64 * q).cast()) };
                r[q] = _mm512_dpbusd_epi32(r[q], x, wk[q]);
            }
        }
        let mut v = [_mm512_setzero_si512(); 4];
        for q in 0..4 {
            // The depthwise bias forms add a precomputed term (FBGEMM's order, no fma).
            let mut f = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(r[q]), bias[q]), mult[q]);
            if !clamp_free {
                f = _mm512_min_ps(_mm512_max_ps(f, nlim), lim);
            }
            // Rounds half to even: Rust code never changes MXCSR from its default.
            v[q] = _mm512_cvtps_epi32(f);
        }
        // Per 128-bit lane l the packs put vector q's dword d at byte 4q + d: output byte
        // 16l + 4q + d, in order. Signed saturation to i16, the zero point added there (the
        // same bytes as adding it before: see `Requant`), then unsigned saturation to u8 is a
        // clamp to 0..=255; lo and hi (within it) clamp the bytes.
        let lo_half = _mm512_adds_epi16(_mm512_packs_epi32(v[0], v[1]), zo);
        let hi_half = _mm512_adds_epi16(_mm512_packs_epi32(v[2], v[3]), zo);
        let mut bytes = _mm512_packus_epi16(lo_half, hi_half);
        if clip_lo {
            bytes = _mm512_max_epu8(bytes, lo);
        }
        if clip_hi {
            bytes = _mm512_min_epu8(bytes, hi);
        }
        if i + 1 < count || last == 64 {
            // SAFETY: 64 writable bytes at out + i * step (precondition).
            unsafe { _mm512_storeu_si512(out.add(i * step).cast(), bytes) };
        } else {
            let m: __mmask64 = (1u64 << last) - 1;
            // SAFETY: `last` writable bytes at the last chunk (precondition).
            unsafe { _mm512_mask_storeu_epi8(out.add(i * step).cast(), m, bytes) };
        }
    }
}

/// `out[i] = table[x[i]]`, 64 bytes at a time with two `vpermi2b` lookups (entries 0..128 and
/// 128..256) and a blend on each index's top bit; returns how many bytes it did (a multiple
/// of 64), leaving the tail to the caller.
///
/// # Safety
/// AVX-512 F/BW and VBMI available.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) unsafe fn lut_avx512vbmi(table: &[u8; 256], x: &[u8], out: &mut [u8]) -> usize {
    // SAFETY: the table holds 256 bytes: four 64-byte loads.
    let t: [__m512i; 4] = std::array::from_fn(|i| unsafe { _mm512_loadu_si512(table.as_ptr().add(64 * i).cast()) });
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 64 <= n {
        // SAFETY: i + 64 <= n: in bounds of both slices.
        let idx = unsafe { _mm512_loadu_si512(x.as_ptr().add(i).cast()) };
        let lo = _mm512_permutex2var_epi8(t[0], idx, t[1]);
        let hi = _mm512_permutex2var_epi8(t[2], idx, t[3]);
        let r = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi);
        // SAFETY: as above.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), r) };
        i += 64;
    }
    i
}

/// The minimum and maximum of `x` and whether it holds a NaN, 64 values at a time (four
/// running vectors), the tail through the scalar loop; the same extremes as
/// `linear::min_max_lanes` wherever there is no NaN (comparisons are exact; a zero's sign may
/// differ, which no caller looks at).
///
/// # Safety
/// AVX-512 F available.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn min_max_avx512(x: &[f32]) -> (f32, f32, bool) {
    let (mut lo, mut hi) = ([_mm512_set1_ps(f32::INFINITY); 4], [_mm512_set1_ps(f32::NEG_INFINITY); 4]);
    let mut nan: __mmask16 = 0;
    let chunks = x.chunks_exact(64);
    let rest = chunks.remainder();
    for c in chunks {
        for v in 0..4 {
            // SAFETY: 16 of the chunk's 64 values.
            let a = unsafe { _mm512_loadu_ps(c.as_ptr().add(16 * v)) };
            lo[v] = _mm512_min_ps(lo[v], a);
            hi[v] = _mm512_max_ps(hi[v], a);
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a);
        }
    }
    let l = _mm512_min_ps(_mm512_min_ps(lo[0], lo[1]), _mm512_min_ps(lo[2], lo[3]));
    let h = _mm512_max_ps(_mm512_max_ps(hi[0], hi[1]), _mm512_max_ps(hi[2], hi[3]));
    let (mut l, mut h) = (_mm512_reduce_min_ps(l), _mm512_reduce_max_ps(h));
    let mut any_nan = nan != 0;
    for &v in rest {
        l = if v < l { v } else { l };
        h = if v > h { v } else { h };
        any_nan |= v.is_nan();
    }
    (l, h, any_nan)
}

/// PyTorch's vectorized quantized add, as constants in registers: dequantize each input
/// (`fma(s, q, s * -z)`), add, optional `max(.., 0)`, and quantize
/// (`zo + round_half_even(c * (1 / so))`, clamped to `u8`).
struct AddConsts {
    sa: __m512,
    pa: __m512,
    sb: __m512,
    pb: __m512,
    inv: __m512,
    lim: __m512,
    nlim: __m512,
    zo: __m512i,
    order: __m512i,
    relu: bool,
}

impl AddConsts {
    /// # Safety
    /// AVX-512 F available.
    #[inline(always)]
    unsafe fn new((sa, za): (f32, i32), (sb, zb): (f32, i32), (so, zo): (f32, i32), relu: bool) -> Self {
        // SAFETY: AVX-512 F (precondition).
        unsafe {
            AddConsts {
                sa: _mm512_set1_ps(sa),
                pa: _mm512_set1_ps(sa * -(za as f32)),
                sb: _mm512_set1_ps(sb),
                pb: _mm512_set1_ps(sb * -(zb as f32)),
                inv: _mm512_set1_ps(1.0 / so),
                lim: _mm512_set1_ps(REQUANT_LIMIT),
                nlim: _mm512_set1_ps(-REQUANT_LIMIT),
                zo: _mm512_set1_epi16(zo as i16),
                // As in `Requant`: after the packs, dword 4l + v holds lanes 4l..4l + 4 of
                // vector v; put it at dword 4v + l.
                order: _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
                relu,
            }
        }
    }

    /// `round_half_even(c * (1 / so))` of 16 pairs of bytes, before the zero point.
    ///
    /// # Safety
    /// AVX-512 F available.
    #[inline(always)]
    unsafe fn sixteen(&self, xa: __m128i, xb: __m128i) -> __m512i {
        // SAFETY: AVX-512 F (precondition).
        unsafe {
            let fa = _mm512_fmadd_ps(self.sa, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(xa)), self.pa);
            let fb = _mm512_fmadd_ps(self.sb, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(xb)), self.pb);
            let mut c = _mm512_add_ps(fa, fb);
            if self.relu {
                c = _mm512_max_ps(c, _mm512_setzero_ps());
            }
            let t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(c, self.inv), self.nlim), self.lim);
            // Rounds half to even: Rust code never changes MXCSR from its default.
            _mm512_cvtps_epi32(t)
        }
    }

    /// The sums of the `n <= 64` bytes at `a` and `b`, stored at `out` (which may be `a`):
    /// four vectors narrowed together as `Requant::row` does (signed saturation to i16, the
    /// zero point, unsigned saturation to u8: `clamp(q + zo, 0, 255)`), one store.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL available; `n` bytes readable at `a` and `b` and writable at `out`.
    #[inline(always)]
    unsafe fn up_to_64(&self, a: *const u8, b: *const u8, out: *mut u8, n: usize) {
        // SAFETY: AVX-512 F/BW/VL (precondition); loads and the store touch the first n bytes.
        unsafe {
            let mut q = [_mm512_setzero_si512(); 4];
            for (v, qv) in q.iter_mut().enumerate() {
                let lanes = n.saturating_sub(16 * v).min(16);
                if lanes == 16 {
                    *qv = self.sixteen(_mm_loadu_si128(a.add(16 * v).cast()), _mm_loadu_si128(b.add(16 * v).cast()));
                } else if lanes > 0 {
                    let m = ((1u32 << lanes) - 1) as __mmask16;
                    *qv = self.sixteen(
                        _mm_maskz_loadu_epi8(m, a.add(16 * v).cast()),
                        _mm_maskz_loadu_epi8(m, b.add(16 * v).cast()),
                    );
                }
            }
            let lo = _mm512_adds_epi16(_mm512_packs_epi32(q[0], q[1]), self.zo);
            let hi = _mm512_adds_epi16(_mm512_packs_epi32(q[2], q[3]), self.zo);
            let bytes = _mm512_permutexvar_epi32(self.order, _mm512_packus_epi16(lo, hi));
            if n == 64 {
                _mm512_storeu_si512(out.cast(), bytes);
            } else {
                _mm512_mask_storeu_epi8(out.cast(), (1u64 << n) - 1, bytes);
            }
        }
    }
}

/// PyTorch's vectorized quantized add ([`AddConsts`]) over `rows` rows of `ncols` bytes, row
/// `r` at `a + r * ld`, `b + r * ld` and `out + r * ld`, 64 bytes at a time (a row's last
/// ones masked). Each group of bytes is read before it is written, so `out` may be `a`.
///
/// # Safety
/// AVX-512 F/BW/VL available; those bytes are readable at `a` and `b` and writable at `out`;
/// `out` is exactly `a` or overlaps neither input.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn add_u8_avx512(
    a: *const u8,
    qa: (f32, i32),
    b: *const u8,
    qb: (f32, i32),
    out: *mut u8,
    qo: (f32, i32),
    relu: bool,
    (rows, ncols, ld): (usize, usize, usize),
) {
    // Rows that fill their stride are one run of bytes: 64 at a time across row ends (each
    // element's formula does not depend on its neighbours).
    let (rows, ncols, ld) = if ncols == ld && rows > 1 { (1, rows * ncols, rows * ncols) } else { (rows, ncols, ld) };
    // SAFETY: AVX-512 F/BW/VL (this function's features); every group of n bytes lies in
    // its row (or the run of whole rows), in bounds (caller's precondition).
    unsafe {
        let k = AddConsts::new(qa, qb, qo, relu);
        for r in 0..rows {
            let row = r * ld;
            let mut j = 0;
            while j < ncols {
                let n = (ncols - j).min(64);
                k.up_to_64(a.add(row + j), b.add(row + j), out.add(row + j), n);
                j += n;
            }
        }
    }
}

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
            let tail_quads = crate::gemm::tail_k(kh, tail) / 4;
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
