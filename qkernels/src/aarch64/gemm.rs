//! aarch64 kernels. First the GEMM micro-kernels: raw `i32` tiles of `Σ_k a[i][k] * w[j][k]`
//! (u8 x i8), exact, for the three aarch64 tiers; the driver (`gemm::block`) requantizes them
//! with [`epilogue_u8_neon`], the scalar epilogue's arithmetic lane for lane, so every tier
//! gives the scalar path's bytes.
//!
//! - `neon`: every aarch64 CPU. Weights widened to i16, `smlal` by an activation broadcast:
//!   4 rows x 16 columns.
//! - `dotprod`: `sdot` multiplies i8 by i8, and activations are u8, so each activation byte has
//!   its top bit flipped (`a ^ 0x80`, the i8 value `a - 128`), and the accumulators start at
//!   `128 * Σ_k w` per column (`Packed::Dot::shift`), which restores `Σ a * w` exactly
//!   (wrapping i32 arithmetic; the final sum fits, `MAX_K`). 5 rows x 16 columns: one 16-byte
//!   load and one flip per row for 16 `sdot`s by element.
//! - `i8mm`: `usmmla` multiplies a 2 x 8 u8 block of two rows by an 8 x 2 i8 block of two
//!   columns into a 2 x 2 i32 block: 6 rows (3 pairs) x 16 columns (8 pairs), 24
//!   accumulators; the two rows' 8 bytes are joined into one register per pair and group.
//!
//! `sdot` and `usmmla` are written with `asm!` (their Rust intrinsics are not stable); each
//! wrapper is one instruction on registers, with the target feature that makes it legal, so
//! only code compiled with that feature can call it, and the compiler still allocates
//! registers and schedules around it.

use std::arch::aarch64::*;
use std::arch::asm;

use crate::frame::aligned::Aligned;
use crate::frame::gemm::QMatrix;
use crate::frame::gemm::Tile;
use crate::frame::pack::{vnni_panel_len, Packed};

/// `acc += Σ_{b<4} w[4l + b] * a[4L + b]` per i32 lane `l` (i8 x i8): `sdot` by element `L`.
#[target_feature(enable = "neon,dotprod")]
#[inline]
fn sdot_lane<const L: i32>(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: one register-only instruction (no memory, stack or flags), which this function's
    // `dotprod` feature (required of every caller) makes available.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{l}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            a = in(vreg) a,
            l = const L,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// `acc += A (2 x 8 u8, rows = halves of a) x B (8 x 2 i8, columns = halves of b)`, the 2 x 2
/// result in row-major lanes: `usmmla`.
#[target_feature(enable = "neon,i8mm")]
#[inline]
fn usmmla(mut acc: int32x4_t, a: uint8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: one register-only instruction, which this function's `i8mm` feature (required
    // of every caller) makes available.
    unsafe {
        asm!(
            "usmmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// Rows per tile for each packing.
pub(crate) fn tile_rows(p: &Packed) -> usize {
    match p {
        Packed::Neon(_) => 4,
        Packed::Dot { .. } => 5,
        _ => 6,
    }
}

/// Fills `tile[0..mr][0..ncols]` with the raw sums of rows `r0..r0 + mr` of `a` and the
/// `ncols` columns starting at panel `panel0` of `packed`, in strips of 16 columns.
///
/// # Safety
/// `packed` is one of the aarch64 packings of weights with this `k`, made for a tier the CPU
/// has; rows `r0..r0 + mr` exist in `a` (`a.k == k`); `ncols <= 64` columns exist from panel
/// `panel0`; `mr <= tile_rows(packed)`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn arm_tile(
    a: &QMatrix<'_>,
    r0: usize,
    mr: usize,
    packed: &Packed,
    k: usize,
    panel0: usize,
    ncols: usize,
    tile: &mut Tile,
) {
    debug_assert!(mr >= 1 && mr <= tile_rows(packed) && ncols <= 64 && a.k == k);
    // Row pointers; a tile short of rows repeats its first row (computed, then not stored).
    let mut rows = [a.data[r0 * a.lda..].as_ptr(); 6];
    for (r, p) in rows.iter_mut().enumerate().take(mr) {
        *p = a.data[(r0 + r) * a.lda..].as_ptr();
    }
    let mut strip = [[0i32; ARM_LANES]; 6];
    let mut c0 = 0;
    while c0 < ncols {
        let panel = panel0 + c0 / ARM_LANES;
        // SAFETY: forwarded preconditions: each row has `k` bytes at its pointer, the panel
        // holds `k` weights for 16 columns (padded), and the CPU has the packing's tier.
        unsafe {
            match packed {
                Packed::Neon(w) => neon_strip(&rows, k, w[panel * neon_panel_len(k)..].as_ptr(), &mut strip),
                Packed::Dot { w, shift } => dot_strip(
                    &rows,
                    k,
                    w[panel * vnni_panel_len(k)..].as_ptr(),
                    shift[panel * ARM_LANES..panel * ARM_LANES + ARM_LANES].try_into().expect("16 shifts"),
                    &mut strip,
                ),
                Packed::Mmla(w) => mmla_strip(&rows, k, w[panel * mmla_panel_len(k)..].as_ptr(), &mut strip),
                _ => unreachable!("arm_tile: weights not packed for an aarch64 tier"),
            }
        }
        let width = (ncols - c0).min(ARM_LANES);
        for r in 0..mr {
            tile[r][c0..c0 + width].copy_from_slice(&strip[r][..width]);
        }
        c0 += ARM_LANES;
    }
}

/// Copies the `len` bytes at `p` into a zero-padded buffer of `N` bytes.
///
/// # Safety
/// `len` bytes are readable at `p`, `len <= N`.
#[inline(always)]
unsafe fn padded<const N: usize>(p: *const u8, len: usize) -> [u8; N] {
    let mut buf = [0u8; N];
    // SAFETY: precondition; `buf` has room for `len <= N` bytes.
    unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len) };
    buf
}

/// The NEON strip: 4 rows x 16 columns, per k one 16-byte weight load widened to i16 and four
/// `smlal` per row by the row's byte.
///
/// # Safety
/// As [`arm_tile`], `w` at a NEON panel.
#[inline(never)]
#[target_feature(enable = "neon")]
unsafe fn neon_strip(rows: &[*const u8; 6], k: usize, w: *const i8, out: &mut [[i32; ARM_LANES]; 6]) {
    const MR: usize = 4;
    let mut acc = [[vdupq_n_s32(0); 4]; MR];
    for kk in 0..k {
        // SAFETY: the panel holds 16 bytes per k, `kk < k`.
        let wv = unsafe { vld1q_s8(w.add(kk * ARM_LANES)) };
        let (lo, hi) = (vmovl_s8(vget_low_s8(wv)), vmovl_high_s8(wv));
        for r in 0..MR {
            // SAFETY: row r has `k` bytes.
            let x = unsafe { *rows[r].add(kk) } as i16;
            acc[r][0] = vmlal_n_s16(acc[r][0], vget_low_s16(lo), x);
            acc[r][1] = vmlal_high_n_s16(acc[r][1], lo, x);
            acc[r][2] = vmlal_n_s16(acc[r][2], vget_low_s16(hi), x);
            acc[r][3] = vmlal_high_n_s16(acc[r][3], hi, x);
        }
    }
    for r in 0..MR {
        for v in 0..4 {
            // SAFETY: 4 i32 at lanes 4v..4v + 4 of a 16-entry row.
            unsafe { vst1q_s32(out[r][4 * v..].as_mut_ptr(), acc[r][v]) };
        }
    }
}

/// The `sdot` strip: 5 rows x 16 columns (see the module docs for the top-bit flip).
///
/// # Safety
/// As [`arm_tile`], `w` at a VNNI-layout panel, on a CPU with `dotprod`.
#[inline(never)]
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot_strip(
    rows: &[*const u8; 6],
    k: usize,
    w: *const i8,
    shift: &[i32; ARM_LANES],
    out: &mut [[i32; ARM_LANES]; 6],
) {
    const MR: usize = 5;
    let flip = vdupq_n_u8(0x80);
    let mut acc = [[vdupq_n_s32(0); 4]; MR];
    for v in 0..4 {
        // SAFETY: 4 of the 16 shifts.
        let s = unsafe { vld1q_s32(shift[4 * v..].as_ptr()) };
        for row in acc.iter_mut() {
            row[v] = s;
        }
    }
    // One group of 4 k: the 16 columns' 4 bytes each in 4 vectors, against element L of each
    // row's flipped 16 bytes.
    macro_rules! group {
        ($g:literal, $x:ident, $gi:expr) => {{
            // SAFETY: group `$gi` exists in the panel: 64 bytes from `w + 64 * $gi`.
            let wv = unsafe {
                let b = w.add($gi * 64);
                [vld1q_s8(b), vld1q_s8(b.add(16)), vld1q_s8(b.add(32)), vld1q_s8(b.add(48))]
            };
            for r in 0..MR {
                for v in 0..4 {
                    acc[r][v] = sdot_lane::<$g>(acc[r][v], wv[v], $x[r]);
                }
            }
        }};
    }
    let load = |r: usize, at: usize| -> int8x16_t {
        // SAFETY: the caller reads 16 bytes of row r within its k bytes.
        vreinterpretq_s8_u8(veorq_u8(unsafe { vld1q_u8(rows[r].add(at)) }, flip))
    };
    let full = k / 16;
    for c in 0..full {
        let x: [int8x16_t; MR] = std::array::from_fn(|r| load(r, 16 * c));
        group!(0, x, 4 * c);
        group!(1, x, 4 * c + 1);
        group!(2, x, 4 * c + 2);
        group!(3, x, 4 * c + 3);
    }
    let rem = k - 16 * full;
    if rem > 0 {
        let x: [int8x16_t; MR] = std::array::from_fn(|r| {
            // SAFETY: row r has `rem` bytes left at 16 * full.
            let buf = unsafe { padded::<16>(rows[r].add(16 * full), rem) };
            // SAFETY: reading the local 16-byte buffer.
            vreinterpretq_s8_u8(veorq_u8(unsafe { vld1q_u8(buf.as_ptr()) }, flip))
        });
        // Groups past K do not exist in the panel; bytes past K in the last group meet zero
        // weights.
        let groups = rem.div_ceil(4);
        group!(0, x, 4 * full);
        if groups > 1 {
            group!(1, x, 4 * full + 1);
        }
        if groups > 2 {
            group!(2, x, 4 * full + 2);
        }
        if groups > 3 {
            group!(3, x, 4 * full + 3);
        }
    }
    for r in 0..MR {
        for v in 0..4 {
            // SAFETY: 4 i32 at lanes 4v..4v + 4 of a 16-entry row.
            unsafe { vst1q_s32(out[r][4 * v..].as_mut_ptr(), acc[r][v]) };
        }
    }
}

/// The `usmmla` strip: 6 rows (3 pairs) x 16 columns (8 pairs).
///
/// # Safety
/// As [`arm_tile`], `w` at an `Mmla` panel, on a CPU with `i8mm`.
#[inline(never)]
#[target_feature(enable = "neon,i8mm")]
unsafe fn mmla_strip(rows: &[*const u8; 6], k: usize, w: *const i8, out: &mut [[i32; ARM_LANES]; 6]) {
    const P: usize = 3;
    let mut acc = [[vdupq_n_s32(0); 8]; P];
    let full = k / 8;
    let rem = k - 8 * full;
    for g in 0..k.div_ceil(8) {
        // Rows 2p and 2p + 1's 8 bytes of group g side by side; the last, partial group
        // through zero-padded copies (its missing bytes meet zero weights).
        let x: [uint8x16_t; P] = std::array::from_fn(|p| {
            let (r0, r1) = (rows[2 * p], rows[2 * p + 1]);
            // SAFETY: each row has k bytes: 8 at 8g for a full group, else `rem` (copied into
            // local buffers).
            unsafe {
                if g < full {
                    vcombine_u8(vld1_u8(r0.add(8 * g)), vld1_u8(r1.add(8 * g)))
                } else {
                    let (b0, b1) = (padded::<8>(r0.add(8 * g), rem), padded::<8>(r1.add(8 * g), rem));
                    vcombine_u8(vld1_u8(b0.as_ptr()), vld1_u8(b1.as_ptr()))
                }
            }
        });
        for cp in 0..8 {
            // SAFETY: group g exists in the panel (128 bytes per group), pair cp within it.
            let b = unsafe { vld1q_s8(w.add(g * 128 + cp * 16)) };
            for p in 0..P {
                acc[p][cp] = usmmla(acc[p][cp], x[p], b);
            }
        }
    }
    // acc[p][cp] = [r0 c0, r0 c1, r1 c0, r1 c1] for rows 2p, 2p + 1 and columns 2cp, 2cp + 1:
    // joining the 64-bit halves of two pairs gives four columns of one row.
    for p in 0..P {
        for q in 0..4 {
            let (x, y) = (vreinterpretq_s64_s32(acc[p][2 * q]), vreinterpretq_s64_s32(acc[p][2 * q + 1]));
            let (top, bottom) = (vreinterpretq_s32_s64(vzip1q_s64(x, y)), vreinterpretq_s32_s64(vzip2q_s64(x, y)));
            // SAFETY: 4 i32 at lanes 4q..4q + 4 of a 16-entry row.
            unsafe {
                vst1q_s32(out[2 * p][4 * q..].as_mut_ptr(), top);
                vst1q_s32(out[2 * p + 1][4 * q..].as_mut_ptr(), bottom);
            }
        }
    }
}

/// Output channels per aarch64 panel (four q registers of i32 lanes).
pub(crate) const ARM_LANES: usize = 16;

pub(crate) fn neon_panel_len(k: usize) -> usize {
    k * ARM_LANES
}

/// Panels of 16 columns; within a panel, per k, the 16 columns' weights (0 past N), as the
/// `smlal` strip reads them.
pub(crate) fn pack_neon(raw: &[i8], n: usize, k: usize) -> Aligned<i8> {
    let panels = n.div_ceil(ARM_LANES);
    let mut out = Aligned::zeroed(panels * neon_panel_len(k));
    for j in 0..n {
        let (p, lane) = (j / ARM_LANES, j % ARM_LANES);
        for kk in 0..k {
            out[p * neon_panel_len(k) + kk * ARM_LANES + lane] = raw[j * k + kk];
        }
    }
    out
}

pub(crate) fn mmla_panel_len(k: usize) -> usize {
    k.div_ceil(8) * 8 * ARM_LANES
}

/// Panels of 16 columns; within a panel, per group of 8 k, 8 column pairs of 16 bytes: the
/// even column's 8 weights, then the odd one's (0 past K or N), as `usmmla` reads its second
/// operand (two rows of 8 bytes).
pub(crate) fn pack_mmla(raw: &[i8], n: usize, k: usize) -> Aligned<i8> {
    let panels = n.div_ceil(ARM_LANES);
    let mut out = Aligned::zeroed(panels * mmla_panel_len(k));
    for j in 0..n {
        let (p, lane) = (j / ARM_LANES, j % ARM_LANES);
        let (pair, odd) = (lane / 2, lane % 2);
        for kk in 0..k {
            let (g, byte) = (kk / 8, kk % 8);
            out[p * mmla_panel_len(k) + g * 8 * ARM_LANES + pair * 16 + odd * 8 + byte] = raw[j * k + kk];
        }
    }
    out
}
