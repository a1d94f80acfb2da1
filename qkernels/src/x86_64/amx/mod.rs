//! The AMX-INT8 tier: the AVX-512 VNNI tier's kernels, with the GEMM's sums of blocks of at
//! least 16 rows taken by the tile unit (`tdpbusd`: 16 x 64 `u8` times 64 x 16 `i8` into
//! 16 x 16 `i32` per instruction). The weights keep the VNNI packing, which is already the
//! layout a B tile reads (16 groups of four K values for 16 columns, 64 bytes a group); the
//! sums then go through the VNNI tier's epilogues on registers, so every output is the VNNI
//! tier's, bit for bit (integer sums are exact whatever their order).

mod tiles;

use crate::frame::gemm::{Rows, SinkKind, MC};
use crate::frame::kernels::{Block, Kernels};
use crate::frame::pack::{vnni_panel_len, Packed, VNNI_LANES};
use crate::x86_64::avx512vnni;
use crate::x86_64::FusedOut;

use tiles::{ASource, TILE_M};

// Every entry below runs only from the AMX tier's table, which the registry builds only on a
// CPU with AMX-TILE and AMX-INT8 whose kernel granted this process the tile data (and with
// AVX-512 VNNI, which the tier includes): the precondition of each `unsafe` kernel here.

/// The AMX tier's entries, over the AVX-512 VNNI tier's.
pub(super) fn register(k: &mut Kernels) {
    k.gemm.name = |w| {
        if w.iter().all(|w| tiles::takes_k(w.k)) {
            "amx: tdpbusd (blocks of 16 rows or more; convolutions read in place: kernel rows of whole 64-byte chunks; vpdpbusd otherwise)".into()
        } else {
            "amx: vpdpbusd (K below 64 or not in whole groups of four: no tiles)".into()
        }
    };
    k.gemm.block = block;
}

/// Whether the block goes to the tile unit: at least one whole tile of rows, K of at least
/// one chunk of 64 in whole groups of four, output the VNNI epilogues write from registers,
/// and (for a convolution read in place) chunks that never straddle two segments.
fn takes(b: &Block<'_>) -> bool {
    if b.rows.len() < TILE_M {
        return false;
    }
    if !tiles::takes_k(b.w.k) {
        return false;
    }
    match (b.kind, b.src) {
        (SinkKind::U8, Rows::Dense(_)) | (SinkKind::F32 { .. }, Rows::Dense(_)) => true,
        (SinkKind::U8, Rows::Conv(c)) => c.seg.is_multiple_of(64) && c.tail == 0,
        _ => false,
    }
}

/// A block of up to [`MC`] rows and 64 columns: the raw sums by tiles, then the VNNI tier's
/// fused epilogue over them; other blocks go to the VNNI tier's kernel.
///
/// # Safety
/// As `GemmKernels::block`.
unsafe fn block(b: &Block<'_>) -> bool {
    if !takes(b) {
        // SAFETY: the AMX tier includes AVX-512 VNNI; the caller's preconditions.
        return unsafe { avx512vnni::block(b) };
    }
    let Packed::Vnni(p) = &b.w.packed else { unreachable!("AMX blocks read VNNI packings") };
    let (m, k) = (b.rows.len(), b.w.k);
    assert!(m <= MC && b.cols.len() <= 4 * VNNI_LANES, "amx::block: a block is at most {MC} x 64");
    let panel = vnni_panel_len(k);
    let panel0 = b.cols.start / VNNI_LANES;
    let panels = b.cols.len().div_ceil(VNNI_LANES);
    let weights = &p[panel0 * panel..(panel0 + panels) * panel];
    let mut sums = tiles::Sums::new();
    match b.src {
        Rows::Dense(a) => {
            let rows = &a.data[b.rows.start * a.lda..];
            // SAFETY: the tier's CPU features; `rows` holds `m` rows of `k` bytes `lda`
            // apart (the driver's checks on A), `weights` `panels` panels of this K.
            unsafe { tiles::sums(&ASource::Dense { rows, lda: a.lda, k }, m, weights, panels, &mut sums) };
        }
        Rows::Conv(conv) => {
            let mut bases = [std::ptr::null::<u8>(); MC];
            let bases = &mut bases[..m];
            conv.bases_into(b.rows.start, bases);
            let src = ASource::Conv { bases, kh: conv.kh, seg: conv.seg, row_step: conv.row_step() };
            // SAFETY: the tier's CPU features; each row's `kh` segments of `seg` bytes,
            // `row_step` apart from its base, lie inside the padded image (as for the VNNI
            // kernel) and K = kh * seg (no tails: `takes`); `weights` as above.
            unsafe { tiles::sums(&src, m, weights, panels, &mut sums) };
        }
    }
    let fused = FusedOut::of(b);
    // SAFETY: AVX-512 VNNI (included); the sums hold rows 0..m of the block's columns, and
    // the fused target covers the block, as the driver established.
    unsafe {
        match b.kind {
            SinkKind::U8 => avx512vnni::gemm::vnni_fused_any(&sums, m, &fused),
            SinkKind::F32 { relu } => avx512vnni::gemm::vnni_sums_f32(&sums, m, &fused, relu, b.per_row),
            SinkKind::I32 => unreachable!("i32 blocks are not taken (`takes`)"),
        }
    }
    true
}
