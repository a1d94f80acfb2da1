//! The kernel families and the table that holds one tier's kernels ([`Kernels`]).
//!
//! The drivers in `frame` never name an architecture: they take a tier's table from
//! `crate::registry::kernels` (a packed layer keeps the table it was packed with) and call
//! through it. Each entry's contract is written on its type: the `# Safety` preconditions
//! are the caller's, and the table's tier being supported by this CPU is the registry's
//! (it builds tables only for supported tiers).

use std::fmt;
use std::ops::Range;

use qtensor::isa::Isa;

use crate::frame::aligned::Aligned;
use crate::frame::conv::{FlatConsts, RowConsts};
use crate::frame::fconv;
use crate::frame::gemm::{Activation, Plan, QMatrix, Rows, SinkKind, Tile};
use crate::frame::ops::QuantU8;
use crate::frame::pack::{Avx2Pairs, Packed, PackedWeights};

/// See [`GemmKernels::pack`].
pub(crate) type GemmPack = fn(raw: &[i8], n: usize, k: usize, purpose: PackFor) -> (Packed, Option<Avx2Pairs>);

/// What a packing serves, which says how much time it may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PackFor {
    /// A layer's weights, packed once at conversion or load and read by every call: worth a
    /// search for a faster layout (the AVX2 tier's quad order, `order_quads`, and its
    /// full-range layout, `full_range_quads`).
    Layer,
    /// An operand computed at run time and read by one call (a matrix product's right
    /// operand): packed in one pass, no search.
    Call,
}
/// See [`DepthwiseKernels::pixel`].
pub(crate) type DwPixel = unsafe fn(taps: &[&[u8]], c: usize, w: &DwWeights<'_>, acc: &mut [i32], px: &mut [u8]);
/// See [`DepthwiseKernels::run_inside`].
pub(crate) type DwRunInside = unsafe fn(
    base: *const u8,
    step: usize,
    count: usize,
    offsets: &[usize],
    c: usize,
    w: &DwWeights<'_>,
    out: &mut [u8],
);
/// See [`DepthwiseKernels::flat_row`].
pub(crate) type DwFlatRow =
    unsafe fn(taps: &[*const u8], c: usize, weights: &[i8], consts: &FlatConsts, len: usize, out: *mut u8);
/// See [`DwRowKernels::compute`].
pub(crate) type DwRowCompute = unsafe fn(
    rows: &[*const u8],
    weights: &[i8],
    consts: &RowConsts,
    class: usize,
    count: usize,
    chunk_step: usize,
    last: usize,
    out: *mut u8,
);
/// See [`AddKernel::run`]: `(a, qa, b, qb, out, qo, relu, (rows, ncols, ld))`.
pub(crate) type AddRun = unsafe fn(
    a: *const u8,
    qa: (f32, i32),
    b: *const u8,
    qb: (f32, i32),
    out: *mut u8,
    qo: (f32, i32),
    relu: bool,
    block: (usize, usize, usize),
);
/// See [`F32Kernels::depthwise_pixel`].
pub(crate) type F32DwPixel = unsafe fn(
    isa: Isa,
    taps: &[(usize, usize)],
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    act: Activation,
);

/// One tier's kernels: filled by `generic`, then overridden by the architecture's tiers that
/// this tier includes (see `crate::registry`).
pub(crate) struct Kernels {
    /// The tier these kernels run on.
    pub isa: Isa,
    pub gemm: GemmKernels,
    /// Requantizes one row of raw sums to `u8`: `(plan, acc, rowsum, j0, out)`, columns
    /// `j0..j0 + acc.len()`, as `requantize_scalar` does each.
    ///
    /// # Safety
    /// `acc.len() == out.len()`; the plan covers the columns.
    pub epilogue_u8: unsafe fn(&Plan, &[i32], i32, usize, &mut [u8]),
    pub depthwise: DepthwiseKernels,
    /// The quantized addition (PyTorch's vectorized formula) over a block.
    pub add_u8: AddKernel,
    /// `out[i] = table[x[i]]` over `x.len() == out.len()` bytes.
    pub lut: fn(&[u8; 256], &[u8], &mut [u8]),
    /// `out[i] = table[top - x[i]]` over `x.len() == out.len()` codes, each at most `top`
    /// (a softmax row's exponentials by distance below its largest code).
    pub lookup_below: fn(&[f32; 256], &[u8], u8, &mut [f32]),
    /// The minimum, maximum and count of non-finite values of `f32`s (the count may be any
    /// non-zero number when there is one); the generic entry is a loop compiled per tier,
    /// which takes the tier.
    pub min_max: fn(Isa, &[f32]) -> (f32, f32, usize),
    /// A `rows x cols` byte matrix (row-major) transposed into `cols x rows`; both buffers
    /// hold `rows * cols` bytes (checked by the frame).
    pub transpose: fn(&[u8], usize, usize, &mut [u8]),
    pub f32: F32Kernels,
}

impl fmt::Debug for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kernels({})", self.isa.name())
    }
}

/// What a whole-block GEMM kernel computes: output rows `rows` x columns `cols` (within one
/// column block of at most 64) of `src` times `w`, written straight from the accumulators.
// Read by the architectures' block kernels (x86-64 only, so far).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Block<'a> {
    pub src: Rows<'a>,
    pub w: &'a PackedWeights,
    pub plan: &'a Plan,
    /// Activation row sums by global row (empty when the weights are symmetric).
    pub rowsums: &'a [i32],
    /// What the tier's block kernel works out from the rows once for every block of
    /// columns (`gemm::RowMemo`).
    pub row_memo: &'a crate::frame::gemm::RowMemo,
    pub kind: SinkKind,
    /// The output's base (`u8`, `i32` or `f32` values as `kind` says) and row stride.
    pub out: *mut u8,
    pub ldc: usize,
    /// For `f32` output: per-row activation parameters and the weights' column offsets.
    pub per_row: Option<(&'a [QuantU8], &'a [i32])>,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

/// The GEMM micro-kernels of a tier, and the layout they read.
pub(crate) struct GemmKernels {
    /// Packs row-major `[n, k]` weights into the layout `block` and `tile` read, for a
    /// layer or for one call ([`PackFor`]); either packing gives the same sums.
    pub pack: GemmPack,
    /// The micro-kernel's name for the weights of one layer (one entry per group of a
    /// grouped convolution, all packed by this table), for plans and profiles.
    pub name: fn(&[PackedWeights]) -> String,
    /// Whether `block` takes [`Rows::Conv`] (a convolution read in place, implicit im2col).
    pub implicit_conv: bool,
    /// Computes a whole [`Block`] and returns `true`, or returns `false` (having written
    /// nothing) when it does not handle that output kind or row source.
    ///
    /// # Safety
    /// The weights were packed by this table's `pack`; the block's rows, columns and output
    /// lie inside the operands (the driver's checks), and the caller is the only writer of
    /// those outputs.
    pub block: unsafe fn(&Block<'_>) -> bool,
    /// Raw sums of dense rows `r0..r0 + mr` (`mr` at most `rows`, chosen by the kernel, which
    /// returns it) by columns `cols` (at most 64, starting on a 16-column boundary) into `tile`.
    ///
    /// # Safety
    /// As for `block`; `rows >= 1` rows exist from `r0`.
    pub tile: unsafe fn(
        a: &QMatrix<'_>,
        r0: usize,
        rows: usize,
        w: &PackedWeights,
        cols: Range<usize>,
        tile: &mut Tile,
    ) -> usize,
}

/// A depthwise layer's weights in a pixel kernel's layout.
#[derive(Clone, Debug)]
pub(crate) enum DwPacked {
    /// The generic kernel reads the scalar `[c, taps]` weights.
    Scalar,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    I8(Aligned<i8>),
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    I16(Aligned<i16>),
    /// The AVX2 tier's layouts: the exact kernel's i16 tap pairs for every channel, and for
    /// each whole block of [`DW_PAIR_BLOCK`] channels the byte pairs `vpmaddubsw` multiplies,
    /// whose 16-bit sums cannot saturate while the block's input codes are at most its entry
    /// of `bounds`; for small kernels, each block's taps in the order it pairs them (`orders`,
    /// `2 * ceil(taps / 2)` per block; empty: taps paired in order).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2 { exact: Aligned<i16>, bytes: Aligned<i8>, bounds: Vec<u8>, orders: Vec<u8> },
}

/// Channels per block of a depthwise layout with per-block input bounds.
pub(crate) const DW_PAIR_BLOCK: usize = 32;

impl DwPacked {
    /// Per whole block of [`DW_PAIR_BLOCK`] channels, the largest input code for which the
    /// layout's faster path is exact, when it has one (the caller then says which blocks'
    /// inputs are within them in [`DwWeights::pair_blocks`]).
    pub(crate) fn block_bounds(&self) -> Option<&[u8]> {
        match self {
            Self::Avx2 { bounds, .. } if !bounds.is_empty() => Some(bounds),
            _ => None,
        }
    }

    /// How a layout with block bounds multiplies, for plans and profiles.
    pub(crate) fn describe(&self) -> Option<String> {
        self.block_bounds().map(|b| {
            let (lo, hi) = (b.iter().min().copied().unwrap_or(0), b.iter().max().copied().unwrap_or(0));
            let range = if lo == hi { format!("{lo}") } else { format!("{lo}-{hi}") };
            format!(
                "vpmaddubsw on tap pairs of 32-channel blocks whose input rows' codes are within the block's \
                 bound ({range}), else exact vpmaddwd"
            )
        })
    }
}

/// What a depthwise pixel kernel reads besides the input.
pub(crate) struct DwWeights<'a> {
    /// `[c, kh * kw]`, scalar layout.
    pub taps: &'a PackedWeights,
    pub packed: &'a DwPacked,
    pub plan: &'a Plan,
    /// The input's zero point.
    pub za: i32,
    /// For a layout with [`DwPacked::block_bounds`]: bit `b` set when no input code that the
    /// call reads in channels `32b..32b + 32` exceeds block `b`'s bound (blocks past 64 take
    /// the exact path); 0 otherwise.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub pair_blocks: u64,
}

/// The depthwise kernels of a tier. The per-pixel one is every tier's; the row kernels
/// exist where a tier has them (AVX-512 VNNI).
pub(crate) struct DepthwiseKernels {
    /// The pixel kernel's name, for plans and profiles.
    pub name: &'static str,
    /// `[c, taps]` weights in the pixel kernel's layout, or `None` when this tier's kernel
    /// does not take them (the generic tier's then runs the layer).
    pub pack: fn(taps: &PackedWeights) -> Option<DwPacked>,
    /// One output pixel: `c` bytes into `px` from one slice of `c` bytes per tap.
    ///
    /// # Safety
    /// `w.packed` came from this table's `pack` for these taps; every tap slice holds `c`
    /// bytes; `acc` holds `c` rounded up to 64; `px` holds `c` bytes.
    pub pixel: DwPixel,
    /// [`DepthwiseKernels::pixel`] for a run of `count` output pixels of one row whose taps
    /// all lie inside the image: pixel `p`'s tap `t` at `base + p * step + offsets[t]`, its
    /// `c` bytes written at `out[p * c..]`.
    ///
    /// # Safety
    /// As for `pixel`, each tap's `c` bytes readable at `base + p * step + offsets[t]`;
    /// `out` holds `count * c` bytes.
    pub run_inside: Option<DwRunInside>,
    pub rows: Option<DwRowKernels>,
    /// One output row of the flat-row kernel: `(taps, c, weights, consts, len, out)`.
    ///
    /// # Safety
    /// As `depthwise_vnni_flat_row` documents.
    pub flat_row: Option<DwFlatRow>,
}

/// The row-interleaved depthwise kernel (stride 1 along the width, kernels up to 5 x 4).
pub(crate) struct DwRowKernels {
    /// `(src, kw, tap_step, count, chunk_step, dst)`: one input row's chunks re-laid.
    ///
    /// # Safety
    /// As `depthwise_rows_build` documents.
    pub build: unsafe fn(*const u8, usize, usize, usize, usize, *mut u8),
    /// `(rows, weights, consts, class, count, chunk_step, last, out)`, `rows.len()` (1..=5)
    /// kernel rows.
    ///
    /// # Safety
    /// As `depthwise_rows_compute` documents.
    pub compute: DwRowCompute,
}

/// The quantized addition: `(a, qa, b, qb, out, qo, relu, (rows, ncols, ld))`, PyTorch's
/// vectorized formula for every element; `out` may be `a`. `ncols` of a one-row call is a
/// multiple of `lanes`.
pub(crate) struct AddKernel {
    pub lanes: usize,
    /// # Safety
    /// Every row's `ncols` elements are readable at `a`, `b` and writable at `out`, rows
    /// `ld` apart; `out` is `a` or overlaps neither input.
    pub run: AddRun,
}

/// The `f32` convolution kernels.
pub(crate) struct F32Kernels {
    /// One tile of the packed `f32` convolution.
    ///
    /// # Safety
    /// As [`fconv::Tile`] documents; `out` holds `(rows - 1) * ldo + cols` values.
    pub tile: unsafe fn(&fconv::Tile<'_>, *mut f32, Activation),
    /// One depthwise output pixel: `(isa, taps, x, wt, bias, out, act)`, each tap an (input,
    /// weight) offset pair addressing `out.len()` values; the generic entry is compiled per
    /// tier and takes it.
    ///
    /// # Safety
    /// The offsets address `out.len()` values of `x` and `wt`; `bias` holds as many.
    pub depthwise_pixel: F32DwPixel,
}
