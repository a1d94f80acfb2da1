//! Weight pre-packing: done once, when a model is converted.

use qtensor::isa::Isa;
use qtensor::{QError, QParams, QTensor, Result};

/// Largest reduction length K for which every int32 sum is exact: with u8 activations and i8
/// weights, `|Σ (a - za)(w - zw)| <= K * 255 * 255`, which fits in i32 for K <= 33025.
/// Intermediate sums may wrap; the final one cannot, so wrapping i32 arithmetic is exact.
pub const MAX_K: usize = (i32::MAX as usize) / (255 * 255);

/// Output channels per VNNI panel (one zmm of i32 lanes).
pub(crate) const VNNI_LANES: usize = 16;
/// Output channels per AVX2 panel (one ymm of i32 lanes).
pub(crate) const AVX2_LANES: usize = 8;
/// Output channels per aarch64 panel (four q registers of i32 lanes).
pub(crate) const ARM_LANES: usize = 16;

/// Int8 weights of a linear layer (or a convolution seen as one), `N` outputs by `K` inputs,
/// with their quantization parameters, pre-packed for the instruction set that will run them.
///
/// Built once at conversion; immutable and `Sync`, so one packed layer serves every thread.
#[derive(Clone, Debug)]
pub struct PackedWeights {
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) isa: Isa,
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
    pub packed: Vec<i8>,
    pub max_input: u8,
}

/// The largest input code `A <= 255` for which no pair sum `a0 * w0 + a1 * w1` with
/// `a0, a1 in 0..=A` leaves i16, over the pairs `vpmaddubsw` forms (k = 2p, 2p + 1 in each
/// row of `k` weights). At least 128 for any i8 weights (the worst pairs, `127 + 127` and
/// `-128 - 128`, bound it at `32767 / 254 = 129` and `32768 / 256 = 128`), so 7-bit
/// activations always qualify; 255 when no pair can saturate at all.
fn pair_safe_max(raw: &[i8], k: usize) -> u8 {
    let mut worst_pos = 0i32;
    let mut worst_neg = 0i32;
    for row in raw.chunks_exact(k) {
        for pair in row.chunks(2) {
            let (w0, w1) = (pair[0] as i32, pair.get(1).map_or(0, |&w| w as i32));
            worst_pos = worst_pos.max(w0.max(0) + w1.max(0));
            worst_neg = worst_neg.min(w0.min(0) + w1.min(0));
        }
    }
    let by_pos = if worst_pos > 0 { i16::MAX as i32 / worst_pos } else { 255 };
    let by_neg = if worst_neg < 0 { -(i16::MIN as i32) / -worst_neg } else { 255 };
    by_pos.min(by_neg).min(255) as u8
}

#[derive(Clone, Debug)]
pub(crate) enum Packed {
    None,
    /// Panels of 16 columns; within a panel, for each group of 4 k: 16 x 4 bytes.
    Vnni(Vec<i8>),
    /// Panels of 8 columns; within a panel, per group of 4 k: 8 x 2 i16 of the even k, then
    /// of the odd k (`pack_avx2`).
    Avx2(Vec<i16>),
    /// aarch64 NEON: panels of 16 columns; within a panel, per k, the 16 columns' bytes.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Neon(Vec<i8>),
    /// aarch64 `sdot`: the VNNI layout (panels of 16 columns, per group of 4 k 16 x 4 bytes),
    /// and per column (padded to whole panels) `128 * Σ_k w`, which restores the exact sum
    /// from `sdot`'s products of `a - 128` (the activation byte with its top bit flipped).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Dot {
        w: Vec<i8>,
        shift: Vec<i32>,
    },
    /// aarch64 `usmmla`: panels of 16 columns; within a panel, per group of 8 k, for each pair
    /// of columns the first one's 8 bytes then the second one's (`pack_mmla`).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Mmla(Vec<i8>),
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
        let raw = weights.as_slice().to_vec();
        let col_offsets = (0..n)
            .map(|j| {
                let s: i32 = raw[j * k..(j + 1) * k].iter().map(|&w| w as i32).sum();
                s.wrapping_sub(zero_points[j].wrapping_mul(k as i32))
            })
            .collect();
        let isa = isa.capped_to_supported();
        let packed = match isa {
            Isa::Scalar => Packed::None,
            Isa::Avx2 => Packed::Avx2(pack_avx2(&raw, n, k)),
            Isa::Avx512Vnni => Packed::Vnni(pack_vnni(&raw, n, k)),
            Isa::Neon => Packed::Neon(pack_neon(&raw, n, k)),
            Isa::Dotprod => {
                let mut shift = vec![0i32; n.next_multiple_of(ARM_LANES)];
                for (j, s) in shift.iter_mut().take(n).enumerate() {
                    *s = 128 * raw[j * k..(j + 1) * k].iter().map(|&w| w as i32).sum::<i32>();
                }
                Packed::Dot { w: pack_vnni(&raw, n, k), shift }
            }
            Isa::I8mm => Packed::Mmla(pack_mmla(&raw, n, k)),
        };
        let pairs =
            (isa == Isa::Avx2).then(|| Avx2Pairs { packed: pack_pairs(&raw, n, k), max_input: pair_safe_max(&raw, k) });
        debug_assert!(pairs.as_ref().is_none_or(|p| p.max_input >= 128));
        Ok(PackedWeights { n, k, isa, scales, zero_points, per_channel, col_offsets, raw, packed, pairs })
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
        self.isa
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
    /// tile of rows whose codes all lie within it does, and any other runs the exact
    /// `vpmaddwd` kernel. Both give the same bits. `None` on other tiers.
    pub fn pair_sums_up_to(&self) -> Option<u8> {
        self.pairs.as_ref().map(|p| p.max_input)
    }

    /// The micro-kernel that runs these weights, for plans and profiles: the tier, and on
    /// AVX2 how products are summed.
    pub fn kernel(&self) -> String {
        match (self.isa, &self.pairs) {
            (Isa::Avx2, Some(p)) if p.max_input == 255 => "avx2: vpmaddubsw (cannot saturate)".into(),
            (Isa::Avx2, Some(p)) => {
                format!("avx2: vpmaddubsw for input codes <= {}, exact vpmaddwd above", p.max_input)
            }
            (Isa::Avx2, None) => unreachable!("AVX2 packing always builds the pair panels"),
            (Isa::Avx512Vnni, _) => "avx512vnni: vpdpbusd".into(),
            (Isa::Neon, _) => "neon: smlal (widened to i16)".into(),
            (Isa::Dotprod, _) => "dotprod: sdot on the inputs' top bit flipped, corrected per column".into(),
            (Isa::I8mm, _) => "i8mm: usmmla".into(),
            (Isa::Scalar, _) => "scalar".into(),
        }
    }

    /// Whether every weight zero point is 0 (symmetric weights need no activation row sums).
    pub fn is_symmetric(&self) -> bool {
        self.zero_points.iter().all(|&z| z == 0)
    }
}

pub(crate) fn vnni_panel_len(k: usize) -> usize {
    k.div_ceil(4) * 4 * VNNI_LANES
}

fn pack_vnni(raw: &[i8], n: usize, k: usize) -> Vec<i8> {
    let groups = k.div_ceil(4);
    let panels = n.div_ceil(VNNI_LANES);
    let mut out = vec![0i8; panels * vnni_panel_len(k)];
    for j in 0..n {
        let (p, lane) = (j / VNNI_LANES, j % VNNI_LANES);
        let base = p * vnni_panel_len(k);
        for kk in 0..k {
            let (g, byte) = (kk / 4, kk % 4);
            out[base + g * 4 * VNNI_LANES + lane * 4 + byte] = raw[j * k + kk];
        }
    }
    debug_assert_eq!(out.len(), panels * groups * 4 * VNNI_LANES);
    out
}

pub(crate) fn avx2_panel_len(k: usize) -> usize {
    k.div_ceil(4) * 4 * AVX2_LANES
}

/// Panels of 8 columns; within a panel, per group of 4 k, two vectors of 8 i16 pairs: the
/// even one holds `(w[4g], w[4g + 2])` of each column, the odd one `(w[4g + 1], w[4g + 3])`
/// (0 past K): the pairs that masking and shifting a broadcast quad of activation bytes
/// give (see `x86::avx2_kernel`).
fn pack_avx2(raw: &[i8], n: usize, k: usize) -> Vec<i16> {
    let panels = n.div_ceil(AVX2_LANES);
    let mut out = vec![0i16; panels * avx2_panel_len(k)];
    for j in 0..n {
        let (p, lane) = (j / AVX2_LANES, j % AVX2_LANES);
        let base = p * avx2_panel_len(k);
        for kk in 0..k {
            let (g, odd, half) = (kk / 4, kk % 2, (kk % 4) / 2);
            out[base + g * 4 * AVX2_LANES + odd * 2 * AVX2_LANES + lane * 2 + half] = raw[j * k + kk] as i16;
        }
    }
    out
}

pub(crate) fn neon_panel_len(k: usize) -> usize {
    k * ARM_LANES
}

fn pack_neon(raw: &[i8], n: usize, k: usize) -> Vec<i8> {
    let panels = n.div_ceil(ARM_LANES);
    let mut out = vec![0i8; panels * neon_panel_len(k)];
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
fn pack_mmla(raw: &[i8], n: usize, k: usize) -> Vec<i8> {
    let panels = n.div_ceil(ARM_LANES);
    let mut out = vec![0i8; panels * mmla_panel_len(k)];
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

pub(crate) fn pairs_panel_len(k: usize) -> usize {
    k.div_ceil(4) * 4 * AVX2_LANES
}

fn pack_pairs(raw: &[i8], n: usize, k: usize) -> Vec<i8> {
    let panels = n.div_ceil(AVX2_LANES);
    let mut out = vec![0i8; panels * pairs_panel_len(k)];
    for j in 0..n {
        let (p, lane) = (j / AVX2_LANES, j % AVX2_LANES);
        let base = p * pairs_panel_len(k);
        for kk in 0..k {
            out[base + (kk / 4) * 4 * AVX2_LANES + lane * 4 + kk % 4] = raw[j * k + kk];
        }
    }
    out
}
