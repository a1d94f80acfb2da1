//! Weight pre-packing: done once, when a model is converted.

use qtensor::isa::Isa;

use crate::frame::aligned::Aligned;
use crate::frame::kernels::{Kernels, PackFor};
use qtensor::{QError, QParams, QTensor, Result};

/// Largest reduction length K for which every int32 sum is exact: with u8 activations and i8
/// weights, `|Σ (a - za)(w - zw)| <= K * 255 * 255`, which fits in i32 for K <= 33025.
/// Intermediate sums may wrap; the final one cannot, so wrapping i32 arithmetic is exact.
pub const MAX_K: usize = (i32::MAX as usize) / (255 * 255);

/// Output channels per VNNI panel (one zmm of i32 lanes).
pub(crate) const VNNI_LANES: usize = 16;
/// Int8 weights of a linear layer (or a convolution seen as one), `N` outputs by `K` inputs,
/// with their quantization parameters, pre-packed for the instruction set that will run them.
///
/// Built once at conversion; immutable and `Sync`, so one packed layer serves every thread.
#[derive(Clone, Debug)]
pub struct PackedWeights {
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// The kernels that packed the weights and run them (their tier's table).
    pub(crate) kernels: &'static Kernels,
    /// Per output channel (one entry repeated for per-tensor weights).
    pub(crate) scales: Vec<f32>,
    pub(crate) zero_points: Vec<i32>,
    pub(crate) per_channel: bool,
    /// `Σ_k w[j][k] - zw[j] * K`: FBGEMM's column offsets, for the activation zero point.
    pub(crate) col_offsets: Vec<i32>,
    /// Row-major `N x K`: the scalar kernel's layout, and the source of truth.
    pub(crate) raw: Vec<i8>,
    /// ISA-specific layout (empty for the scalar tier).
    pub(crate) packed: Packed,
    /// On the AVX2 tier (and only there): the largest input code for which these weights
    /// cannot saturate `vpmaddubsw`'s 16-bit pair sums, and the weights in 8-column panels of
    /// 4-byte groups (`pack_pairs`).
    pub(crate) pairs: Option<Avx2Pairs>,
}

/// The AVX2 layout for `vpmaddubsw`: panels of 8 columns; within a panel, for each group of
/// 4 k, 8 x 4 bytes (the VNNI layout on 8 lanes). Exact for every input code up to `max_input`.
#[derive(Clone, Debug)]
pub(crate) struct Avx2Pairs {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub packed: Aligned<i8>,
    pub max_input: u8,
    /// Set when the kernel reads `packed` two quads at a time and adds their `vpmaddubsw`
    /// outputs in i16 before widening to i32 (one `vpmaddwd` by ones for 64 products instead
    /// of two): each strip of two panels reads its whole quads in its own order, pairs first,
    /// so that no pair's sums can leave i16 for inputs up to `max_input`; `packed` holds each
    /// panel's quads in its strip's order.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub order: Option<QuadOrder>,
    /// For rows with codes above `max_input` (8-bit activations), when few quads need it:
    /// `vpmaddubsw` one quad at a time on the full input range.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub full: Option<FullRangeQuads>,
}

/// The `vpmaddubsw` layout for inputs up to 255: `pack_pairs` with the quads that could
/// saturate a 16-bit pair sum there (a column's two weights summing above 128, or below
/// -128) zeroed; those quads, listed per panel (entries `start[p]..start[p + 1]` of
/// `quads`), run exactly on i16 pairs from the layer's exact layout.
#[derive(Clone, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct FullRangeQuads {
    pub packed: Aligned<i8>,
    pub start: Vec<u32>,
    pub quads: Vec<u32>,
}

/// The order in which each strip of 16 columns (panels `2s` and `2s + 1`) reads the `k / 4`
/// whole quads of K: position `t` of strip `s` is the quad at byte `offsets[s * (k / 4) + t]`
/// of a row (4 x its index); positions `0..paired[s]` go two at a time (`t`, `t + 1` for even
/// `t`), the rest one at a time. A partial last quad is not listed: it stays last.
#[derive(Clone, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct QuadOrder {
    pub offsets: Vec<u32>,
    pub paired: Vec<u32>,
}

/// A tier's GEMM layout of the weights, packed by its table (`GemmKernels::pack`); each
/// variant is read by its architecture's kernels only. Every layout starts on a cache line,
/// so that a 64-byte group of weights (a zmm load, a row of an AMX tile) is one line.
#[derive(Clone, Debug)]
pub(crate) enum Packed {
    None,
    /// Panels of 16 columns; within a panel, for each group of 4 k: 16 x 4 bytes.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Vnni(Aligned<i8>),
    /// Panels of 8 columns; within a panel, per group of 4 k: 8 x 2 i16 of the even k, then
    /// of the odd k (`pack_avx2`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2(Aligned<i16>),
    /// aarch64 NEON: panels of 16 columns; within a panel, per k, the 16 columns' bytes.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Neon(Aligned<i8>),
    /// aarch64 `sdot`: the VNNI layout (panels of 16 columns, per group of 4 k 16 x 4 bytes),
    /// and per column (padded to whole panels) `128 * Σ_k w`, which restores the exact sum
    /// from `sdot`'s products of `a - 128` (the activation byte with its top bit flipped).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Dot {
        w: Aligned<i8>,
        shift: Vec<i32>,
    },
    /// aarch64 `usmmla`: panels of 16 columns; within a panel, per group of 8 k, for each pair
    /// of columns the first one's 8 bytes then the second one's (`pack_mmla`).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Mmla(Aligned<i8>),
}

impl PackedWeights {
    /// Packs `weights` (shape `[N, K]`, or any shape `[N, ...]` flattened to `[N, K]`, e.g. a
    /// conv weight in OHWI order) for the instruction set [`qtensor::isa::selected`] picks.
    ///
    /// # Errors
    /// Weights that are not per-tensor or per-channel along axis 0, `N` or `K` zero, or
    /// `K > MAX_K`.
    pub fn new(weights: &QTensor<i8>) -> Result<Self> {
        Self::with_isa(qtensor::isa::selected(), weights)
    }

    /// [`PackedWeights::new`] for an explicit instruction set (capped to what the CPU has).
    ///
    /// # Errors
    /// As [`PackedWeights::new`].
    pub fn with_isa(isa: Isa, weights: &QTensor<i8>) -> Result<Self> {
        const OP: &str = "PackedWeights::new";
        let shape = weights.shape();
        if shape.len() < 2 || shape[0] == 0 || shape[1..].iter().product::<usize>() == 0 {
            return Err(QError::Unsupported {
                op: OP,
                reason: format!(
                    "weights of shape {shape:?} cannot be packed: expected [out_channels, ...] \
                     with at least one output and one input element"
                ),
            });
        }
        let n = shape[0];
        let k: usize = shape[1..].iter().product();
        if k > MAX_K {
            return Err(QError::Unsupported {
                op: OP,
                reason: format!(
                    "reduction length K = {k} (weights {shape:?}) exceeds {MAX_K}, beyond which \
                     int32 accumulation could overflow; split the layer along its inputs"
                ),
            });
        }
        let (scales, zero_points, per_channel) = match weights.params() {
            QParams::PerTensor { scale, zero_point } => (vec![*scale; n], vec![*zero_point; n], false),
            QParams::PerChannel(pc) if pc.axis() == 0 => (pc.scales().to_vec(), pc.zero_points().to_vec(), true),
            QParams::PerChannel(pc) => {
                return Err(QError::Unsupported {
                    op: OP,
                    reason: format!(
                        "per-channel weights must be quantized along axis 0 (output channels), \
                         these are along axis {} of shape {shape:?}",
                        pc.axis()
                    ),
                })
            }
        };
        Ok(Self::build(isa, weights.as_slice().to_vec(), n, k, scales, zero_points, per_channel, PackFor::Layer))
    }

    /// Packs codes computed at run time: `[n, k]` row-major `i8` weights with one scale and
    /// zero point (a matrix product's right operand, transposed, its `u8` codes shifted to
    /// `i8` with its zero point), for `isa` capped to what the CPU has. Packed for one use:
    /// no search for a faster layout, which a layer's weights get ([`PackedWeights::new`]);
    /// the sums are the same.
    ///
    /// # Errors
    /// `codes` not `n * k` long, `n` or `k` zero, `k > MAX_K`, a scale that is not finite and
    /// positive, or a zero point outside `i8`.
    pub fn from_codes(isa: Isa, codes: Vec<i8>, n: usize, k: usize, scale: f32, zero_point: i32) -> Result<Self> {
        const OP: &str = "PackedWeights::from_codes";
        let problem = if n == 0 || k == 0 || n.checked_mul(k) != Some(codes.len()) {
            Some(format!("{} codes for [n, k] = [{n}, {k}]: give n * k codes, n and k at least 1", codes.len()))
        } else if k > MAX_K {
            Some(format!("reduction length K = {k} exceeds {MAX_K}, beyond which int32 accumulation could overflow"))
        } else if !(scale.is_finite() && scale > 0.0) {
            Some(format!("scale {scale} is not finite and positive"))
        } else if !(-128..=127).contains(&zero_point) {
            Some(format!("zero point {zero_point} lies outside i8's -128..=127"))
        } else {
            None
        };
        if let Some(reason) = problem {
            return Err(QError::Unsupported { op: OP, reason });
        }
        Ok(Self::build(isa, codes, n, k, vec![scale; n], vec![zero_point; n], false, PackFor::Call))
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        isa: Isa,
        raw: Vec<i8>,
        n: usize,
        k: usize,
        scales: Vec<f32>,
        zero_points: Vec<i32>,
        per_channel: bool,
        purpose: PackFor,
    ) -> Self {
        let col_offsets = (0..n)
            .map(|j| {
                let s: i32 = raw[j * k..(j + 1) * k].iter().map(|&w| w as i32).sum();
                s.wrapping_sub(zero_points[j].wrapping_mul(k as i32))
            })
            .collect();
        let kernels = crate::registry::kernels(isa);
        let (packed, pairs) = (kernels.gemm.pack)(&raw, n, k, purpose);
        PackedWeights { n, k, kernels, scales, zero_points, per_channel, col_offsets, raw, packed, pairs }
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Reduction length.
    pub fn k(&self) -> usize {
        self.k
    }
    /// The instruction set the weights are packed for.
    pub fn isa(&self) -> Isa {
        self.kernels.isa
    }
    /// Whether the weights carry one scale per output channel.
    pub fn is_per_channel(&self) -> bool {
        self.per_channel
    }
    /// Per-output-channel scales.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Per-output-channel zero points.
    pub fn zero_points(&self) -> &[i32] {
        &self.zero_points
    }
    /// The weights, row-major `N x K`.
    pub fn raw(&self) -> &[i8] {
        &self.raw
    }
    /// On the AVX2 tier: the largest input code for which this layer multiplies with
    /// `vpmaddubsw` (pairs of products summed in 16 bits, which these weights cannot saturate
    /// up to it). It lies in 128..=255 for any weights, so 7-bit activations (`reduce_range`,
    /// as PyTorch's x86 configuration has) always take that kernel; with 8-bit activations, a
    /// tile of rows whose codes all lie within it does, and so does one whose rows have few
    /// codes above it (clamped to it, their excess then added exactly), where [`Self::kernel`]
    /// says so; any other runs the exact `vpmaddwd` kernel. All give the same bits. `None` on
    /// other tiers.
    pub fn pair_sums_up_to(&self) -> Option<u8> {
        self.pairs.as_ref().map(|p| p.max_input)
    }

    /// The micro-kernel that runs these weights, for plans and profiles: the tier, and on
    /// AVX2 how products are summed.
    pub fn kernel(&self) -> String {
        (self.kernels.gemm.name)(std::slice::from_ref(self))
    }

    /// Whether every weight zero point is 0 (symmetric weights need no activation row sums).
    pub fn is_symmetric(&self) -> bool {
        self.zero_points.iter().all(|&z| z == 0)
    }
}

pub(crate) fn vnni_panel_len(k: usize) -> usize {
    k.div_ceil(4) * 4 * VNNI_LANES
}

pub(crate) fn pack_vnni(raw: &[i8], n: usize, k: usize) -> Aligned<i8> {
    let groups = k.div_ceil(4);
    let panels = n.div_ceil(VNNI_LANES);
    let mut out = Aligned::zeroed(panels * vnni_panel_len(k));
    for (j, row) in raw.chunks_exact(k).take(n).enumerate() {
        let (p, lane) = (j / VNNI_LANES, j % VNNI_LANES);
        let base = p * vnni_panel_len(k) + lane * 4;
        // Each group of four along k is one lane's four bytes in its group's row: copied as
        // arrays of four (a copy of a slice of run-time length calls `memcpy` per group).
        let quads = row.chunks_exact(4);
        let rest = quads.remainder();
        let mut g = 0;
        for quad in quads {
            let at = base + g * 4 * VNNI_LANES;
            let quad: &[i8; 4] = quad.try_into().expect("chunks of four");
            let dst: &mut [i8; 4] = (&mut out[at..at + 4]).try_into().expect("four bytes");
            *dst = *quad;
            g += 1;
        }
        if !rest.is_empty() {
            let at = base + g * 4 * VNNI_LANES;
            out[at..at + rest.len()].copy_from_slice(rest);
        }
    }
    debug_assert_eq!(out.len(), panels * groups * 4 * VNNI_LANES);
    out
}
