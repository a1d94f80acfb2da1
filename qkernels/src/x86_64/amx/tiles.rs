//! The tile sums: up to [`MC`] rows of A times up to four 16-column panels of VNNI-packed
//! weights, as exact `i32` sums, by the AMX tile unit.
//!
//! Eight tiles, all 16 rows of 64 bytes: four accumulators (2 x 2 tiles of 16 x 16 `i32`,
//! 32 rows by 32 columns), two A tiles (16 rows by one chunk of 64 K values) and two B tiles
//! (one chunk of 16 groups of four K values, for 16 columns: 1,024 bytes of a VNNI panel as
//! it is). A row of A is read in place when 16 rows of a tile are evenly spaced in memory
//! (dense rows; a convolution's output pixels within one output row); other tiles (the
//! block's last, shorter one; pixels across an output row's end) are first gathered into a
//! buffer. When K is not a multiple of 64, the last chunk overlaps the one before it, and its
//! B tiles zero the groups counted twice.

use std::arch::asm;
use std::arch::x86_64::*;

use crate::frame::aligned::Aligned;
use crate::frame::gemm::MC;
use crate::frame::pack::{vnni_panel_len, VNNI_LANES};
use crate::x86_64::avx512vnni::gemm::TileRows;

/// Rows of a tile.
pub(super) const TILE_M: usize = 16;
/// K values (bytes of A) per tile row.
const CHUNK: usize = 64;
/// Bytes of one B tile: 16 groups of four K values for 16 columns.
const B_TILE: usize = CHUNK * VNNI_LANES;

/// The last B tile of each of four panels, each on whole cache lines.
#[repr(C, align(64))]
struct TailTiles([[i8; B_TILE]; 4]);

/// `LDTILECFG`'s 64-byte operand (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile.
    colsb: [u16; 16],
    /// Rows of each tile.
    rows: [u8; 16],
}

/// The block's raw sums, row `r` column `j` (relative to the block) at `rows[r][j]`: left
/// uninitialized (24 KiB a block), written by [`sums`] for the block's rows and panels, and
/// read (through `TileRows`, by the VNNI epilogues) only there.
#[repr(C, align(64))]
pub(super) struct Sums {
    rows: std::mem::MaybeUninit<[[i32; 4 * VNNI_LANES]; MC]>,
}

impl Sums {
    pub(super) fn new() -> Self {
        Sums { rows: std::mem::MaybeUninit::uninit() }
    }

    /// Row `r`'s first sum.
    fn row(&self, r: usize) -> *const i32 {
        self.rows.as_ptr().cast::<i32>().wrapping_add(r * 4 * VNNI_LANES)
    }
}

impl TileRows for Sums {
    #[inline(always)]
    unsafe fn sums<const MR: usize, const NV: usize>(&self, first: usize, init: [__m512i; NV]) -> [[__m512i; NV]; MR] {
        // Plain loops, not closures: a closure does not inherit the caller's target
        // features, and the intrinsics would not inline into it.
        let mut acc = [init; MR];
        for (r, accr) in acc.iter_mut().enumerate() {
            let row = self.row(first + r);
            for (v, a) in accr.iter_mut().enumerate() {
                // SAFETY: AVX-512 F (the caller's target features); row first + r < MC and
                // vector v < NV <= 4 lie inside the buffer, and `sums` wrote them (the
                // caller reads the block's rows and columns only).
                *a = unsafe { _mm512_add_epi32(*a, _mm512_loadu_si512(row.add(v * VNNI_LANES).cast())) };
            }
        }
        acc
    }
}

/// Where the rows of A are.
pub(super) enum ASource<'a> {
    /// Row `r` is `rows[r * lda..][..k]`.
    Dense { rows: &'a [u8], lda: usize, k: usize },
    /// Row `r`'s K values are `kh` segments of `seg` bytes (a multiple of 64), segment `ky`
    /// at `bases[r] + ky * row_step` (K = `kh * seg`).
    Conv { bases: &'a [*const u8], kh: usize, seg: usize, row_step: usize },
}

impl ASource<'_> {
    fn k(&self) -> usize {
        match self {
            ASource::Dense { k, .. } => *k,
            ASource::Conv { kh, seg, .. } => kh * seg,
        }
    }
}

/// The configuration every AMX kernel here runs with: palette 1, eight tiles of 16 rows of
/// 64 bytes (the entries of the tiles palette 1 lacks must be zero).
fn config() -> TileConfig {
    let (mut colsb, mut rows) = ([0u16; 16], [0u8; 16]);
    colsb[..8].fill(CHUNK as u16);
    rows[..8].fill(TILE_M as u8);
    TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb, rows }
}

/// Where chunk `c` of K starts in a row of A: `64 c`, and for the last chunk when K is not a
/// multiple of 64, `K - 64` (the last 64 bytes, overlapping the chunk before, whose groups
/// the matching B tile zeroes: see [`sums`]).
fn chunk_start(c: usize, k: usize) -> usize {
    (c * CHUNK).min(k - CHUNK)
}

/// Whether [`sums`] takes a K: at least one chunk, and whole groups of four (so that the last
/// chunk may overlap the one before it).
pub(super) fn takes_k(k: usize) -> bool {
    k >= CHUNK && k.is_multiple_of(4)
}

/// The raw sums of rows `0..m` of `src` (`TILE_M <= m <= MC`) times the `panels` VNNI panels
/// of `weights` (the block's, first column first) into `out`.
///
/// When K is not a multiple of 64, the last chunk of every row is its last 64 bytes, read in
/// place like the others, and the last B tile of each panel is the matching 16 groups with the
/// ones the chunk before already counted set to zero (a copy of 1 KiB per panel).
///
/// # Safety
/// The CPU supports AMX-TILE and AMX-INT8 and the process has the tile data (the AMX tier's
/// precondition); `src`'s rows exist as it describes (every segment readable); `weights`
/// holds `panels <= 4` whole panels of this K; `takes_k(K)`.
pub(super) unsafe fn sums(src: &ASource<'_>, m: usize, weights: &[i8], panels: usize, out: &mut Sums) {
    let k = src.k();
    let panel = vnni_panel_len(k);
    assert!(
        (TILE_M..=MC).contains(&m) && (1..=4).contains(&panels) && weights.len() >= panels * panel && takes_k(k),
        "amx::sums: {m} rows of {k} by {panels} panels"
    );
    let full = k / CHUNK;
    let chunks = k.div_ceil(CHUNK);
    let tiles = m.div_ceil(TILE_M);

    // The last B tile of each panel when K is not a multiple of 64: groups (K - 64) / 4 .. K / 4,
    // the first 16 - (K % 64) / 4 of them (counted by the chunk before) zero.
    let mut b_tail = TailTiles([[0i8; B_TILE]; 4]);
    if chunks > full {
        // A group is four K values for 16 columns: 64 bytes.
        let group = 4 * VNNI_LANES;
        let skip = (CHUNK - (k - full * CHUNK)) / 4 * group;
        for (p, t) in b_tail.0.iter_mut().enumerate().take(panels) {
            let from = p * panel + (k - CHUNK) / 4 * group;
            t[skip..].copy_from_slice(&weights[from + skip..from + B_TILE]);
        }
    }

    // A: read in place where a tile's 16 rows are evenly spaced (`step[t]` apart), otherwise
    // gathered into this thread's arena (16 rows of K bytes, zero in the rows past the
    // block's end). No allocation once the arena has grown to the largest block.
    let mut step = [0usize; MC / TILE_M];
    for (t, st) in step.iter_mut().enumerate().take(tiles) {
        let rows = (m - t * TILE_M).min(TILE_M);
        *st = match src {
            ASource::Dense { lda, .. } if rows == TILE_M => *lda,
            ASource::Conv { bases, .. } if rows == TILE_M => {
                let b = &bases[t * TILE_M..(t + 1) * TILE_M];
                let d = |i: usize| (b[i + 1] as usize).wrapping_sub(b[i] as usize);
                if (1..TILE_M - 1).all(|i| d(i) == d(0)) {
                    d(0)
                } else {
                    0
                }
            }
            _ => 0,
        };
    }
    let gathered = step[..tiles].iter().filter(|&&s| s == 0).count();
    let mut arena = ARENA.with(|a| std::mem::take(&mut *a.borrow_mut()));
    arena.grow_to(gathered * TILE_M * k);
    // Every gathered tile's pointer derives from this one borrow of the arena.
    let arena_base = arena.as_mut_ptr();
    // Tile t's first row, and the distance between its rows (0: gathered, K apart).
    let mut first_row = [std::ptr::null::<u8>(); MC / TILE_M];
    let mut next_area = 0;
    for t in 0..tiles {
        let r0 = t * TILE_M;
        if step[t] != 0 {
            first_row[t] = match src {
                ASource::Dense { rows: a, lda, .. } => a[r0 * lda..].as_ptr(),
                ASource::Conv { bases, .. } => bases[r0],
            };
            continue;
        }
        let rows = (m - r0).min(TILE_M);
        // SAFETY: area `next_area` (16 rows of K bytes) lies inside the arena, which holds
        // one area per gathered tile, and no other reference to it is live.
        let buf = unsafe { std::slice::from_raw_parts_mut(arena_base.add(next_area * TILE_M * k), TILE_M * k) };
        next_area += 1;
        for (r, dst) in buf.chunks_exact_mut(k).enumerate() {
            if r >= rows {
                dst.fill(0);
                continue;
            }
            match src {
                ASource::Dense { rows: a, lda, .. } => dst.copy_from_slice(&a[(r0 + r) * lda..][..k]),
                ASource::Conv { bases, kh, seg, row_step } => {
                    for (ky, d) in dst.chunks_exact_mut(*seg).enumerate().take(*kh) {
                        // SAFETY: segment ky of the row, `seg` bytes at its base plus
                        // `ky * row_step`, is readable (precondition).
                        let s = unsafe { std::slice::from_raw_parts(bases[r0 + r].add(ky * row_step), *seg) };
                        d.copy_from_slice(s);
                    }
                }
            }
        }
        first_row[t] = buf.as_ptr();
    }
    // Chunk c of tile t: its first row and the distance between its rows.
    let a = |t: usize, c: usize| -> (*const u8, usize) {
        match (src, step[t]) {
            (_, 0) => (first_row[t].wrapping_add(chunk_start(c, k)), k),
            (ASource::Dense { .. }, st) => (first_row[t].wrapping_add(chunk_start(c, k)), st),
            (ASource::Conv { seg, row_step, .. }, st) => {
                // K is kh whole segments of whole chunks (no last, overlapping chunk).
                let at = c * CHUNK;
                (first_row[t].wrapping_add(at / seg * row_step + at % seg), st)
            }
        }
    };
    // B: chunk c of panel p.
    let b_chunk = |p: usize, c: usize| -> *const i8 {
        if c < full {
            weights[p * panel + c * B_TILE..].as_ptr()
        } else {
            b_tail.0[p].as_ptr()
        }
    };

    let config = config();
    // SAFETY: the AMX tier's precondition; the configuration is a valid palette-1 layout
    // (eight tiles of 16 rows of 64 bytes, the other entries zero).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
    for t in (0..tiles).step_by(2) {
        let two_rows = t + 1 < tiles;
        for p in (0..panels).step_by(2) {
            let two_cols = p + 1 < panels;
            // SAFETY: tiles configured above; every A chunk pointer has 16 rows of 64 readable
            // bytes at its stride (in place: rows of A or segments of the image, whole
            // chunks only; gathered: the arena), every B chunk 16 rows of 64 bytes (a whole
            // chunk of the panel, or its zero-padded copy); the accumulators go to rows
            // 16t..16t + 32 <= MC of `out` (a tile past the block's rows sums zero-padded
            // or real rows that the epilogue never reads), columns 16p..16p + 32 <= 64.
            unsafe {
                match (two_rows, two_cols) {
                    (true, true) => {
                        kernel::<true, true>(chunks, |c| [a(t, c), a(t + 1, c)], |c| [b_chunk(p, c), b_chunk(p + 1, c)])
                    }
                    (true, false) => kernel::<true, false>(chunks, |c| [a(t, c), a(t + 1, c)], |c| [b_chunk(p, c); 2]),
                    (false, true) => {
                        kernel::<false, true>(chunks, |c| [a(t, c); 2], |c| [b_chunk(p, c), b_chunk(p + 1, c)])
                    }
                    (false, false) => kernel::<false, false>(chunks, |c| [a(t, c); 2], |c| [b_chunk(p, c); 2]),
                }
                store(out, t, p, two_rows, two_cols);
            }
        }
    }
    // SAFETY: the AMX tier's precondition; returns the tile state to its initial one.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    ARENA.with(|a| *a.borrow_mut() = arena);
}

thread_local! {
    /// Each thread's buffer of gathered A tiles (rows on whole cache lines when K is a
    /// multiple of 64), taken for one block and put back.
    static ARENA: std::cell::RefCell<Aligned<u8>> = std::cell::RefCell::new(Aligned::default());
}

/// Zeroes the accumulators tmm0..tmm3 and sums `chunks` chunks into them: tmm0 += A0 B0,
/// tmm1 += A0 B1, tmm2 += A1 B0, tmm3 += A1 B1 (only the tiles `ROWS2` / `COLS2` ask for).
///
/// # Safety
/// Tiles configured as in [`sums`]; every pointer `a(c)` and `b(c)` returns for `c < chunks`
/// (the used ones) holds 16 rows of 64 readable bytes at its stride (64 for B).
#[inline(always)]
unsafe fn kernel<const ROWS2: bool, const COLS2: bool>(
    chunks: usize,
    a: impl Fn(usize) -> [(*const u8, usize); 2],
    b: impl Fn(usize) -> [*const i8; 2],
) {
    // SAFETY: the preconditions; tile instructions touch only the tile registers and the
    // memory their operands name.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        for c in 0..chunks {
            let [(a0, sa0), (a1, sa1)] = a(c);
            let [b0, b1] = b(c);
            asm!(
                "tileloadd tmm4, [{a} + {s}*1]",
                "tileloadd tmm6, [{b} + {s64}*1]",
                "tdpbusd tmm0, tmm4, tmm6",
                a = in(reg) a0, s = in(reg) sa0, b = in(reg) b0, s64 = in(reg) B_TILE / VNNI_LANES,
                options(nostack, readonly),
            );
            if COLS2 {
                asm!(
                    "tileloadd tmm7, [{b} + {s64}*1]",
                    "tdpbusd tmm1, tmm4, tmm7",
                    b = in(reg) b1, s64 = in(reg) B_TILE / VNNI_LANES,
                    options(nostack, readonly),
                );
            }
            if ROWS2 {
                asm!(
                    "tileloadd tmm5, [{a} + {s}*1]",
                    "tdpbusd tmm2, tmm5, tmm6",
                    a = in(reg) a1, s = in(reg) sa1,
                    options(nostack, readonly),
                );
                if COLS2 {
                    asm!("tdpbusd tmm3, tmm5, tmm7", options(nostack, nomem));
                }
            }
        }
    }
}

/// Stores the accumulators of row tiles `t` (and `t + 1` with `two_rows`) by column panels
/// `p` (and `p + 1` with `two_cols`) into `out`.
///
/// # Safety
/// Tiles configured as in [`sums`] and summed by [`kernel`]; `16 * (t + 2) <= MC` with
/// `two_rows` (`16 * (t + 1)` without), `p + 2 <= 4` with `two_cols` (`p + 1` without).
#[inline(always)]
unsafe fn store(out: &mut Sums, t: usize, p: usize, two_rows: bool, two_cols: bool) {
    const LD: usize = 4 * VNNI_LANES * 4;
    let base = out.rows.as_mut_ptr().cast::<i32>();
    let at = |rt: usize, ct: usize| base.wrapping_add(TILE_M * (t + rt) * 4 * VNNI_LANES + VNNI_LANES * (p + ct));
    let (c0, c1, c2, c3) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
    // SAFETY: each stored tile writes 16 rows of 64 bytes, `LD` apart (a row of `out`), from
    // a position inside `out` whose 16 rows exist (the preconditions).
    unsafe {
        asm!("tilestored [{c} + {ld}*1], tmm0", c = in(reg) c0, ld = in(reg) LD, options(nostack));
        if two_cols {
            asm!("tilestored [{c} + {ld}*1], tmm1", c = in(reg) c1, ld = in(reg) LD, options(nostack));
        }
        if two_rows {
            asm!("tilestored [{c} + {ld}*1], tmm2", c = in(reg) c2, ld = in(reg) LD, options(nostack));
            if two_cols {
                asm!("tilestored [{c} + {ld}*1], tmm3", c = in(reg) c3, ld = in(reg) LD, options(nostack));
            }
        }
    }
}
