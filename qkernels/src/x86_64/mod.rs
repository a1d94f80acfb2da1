//! x86-64 kernels, one folder per tier (`avx2`, `avx512vnni`, `amx`), one file per kernel family.
//! Each kernel is the twin of a scalar kernel in `generic` and is reached only through the
//! registry (`crate::registry`), which the CPU checks filled: every function here is `unsafe`
//! with the CPU feature as its precondition.

use crate::frame::gemm::Plan;
use crate::frame::kernels::Block;

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

impl<'p> FusedOut<'p> {
    /// The target of a whole-block kernel's output.
    pub(crate) fn of(b: &Block<'p>) -> Self {
        FusedOut {
            plan: b.plan,
            rowsums: b.rowsums,
            out: b.out,
            ldc: b.ldc,
            r0: b.rows.start,
            j0: b.cols.start,
            ncols: b.cols.len(),
        }
    }
}

pub(crate) mod amx;
pub(crate) mod avx2;
pub(crate) mod avx512vnni;

use qtensor::isa::Isa;

use crate::frame::kernels::Kernels;

/// Overrides `k`'s entries with the x86-64 kernels of the tiers `isa` includes, AVX2 first.
/// `isa` is supported by this CPU.
pub(crate) fn register(k: &mut Kernels, isa: Isa) {
    if isa.includes(Isa::Avx2) {
        avx2::register(k);
    }
    if isa.includes(Isa::Avx512Vnni) {
        avx512vnni::register(k);
    }
    if isa.includes(Isa::Amx) {
        amx::register(k);
    }
}
