//! The int8 linear layer: packed weights plus bias over the GEMM.

use qtensor::{QTensor, Result};

use crate::frame::aligned::Aligned;
use crate::frame::gemm::{GemmOutput, QMatrix};
use crate::frame::pack::PackedWeights;

/// How [`PackedLinear::forward_dynamic`] quantizes its `f32` input on each call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DynamicActivations {
    /// One scale and zero point for the whole input, from its range
    /// ([`qtensor::choose_qparams_dynamic`]): PyTorch's `quantize_dynamic`, which passes
    /// `reduce_range = true` (codes 0..=127) on x86.
    PerTensor {
        /// Codes 0..=127 instead of 0..=255.
        reduce_range: bool,
    },
    /// One scale and zero point per row (per token): an outlier in one token costs the
    /// others nothing.
    PerToken {
        /// Codes 0..=127 instead of 0..=255: half the resolution, but the AVX2 tier then
        /// sums pairs of products in 16 bits (PyTorch's reason for `reduce_range` on x86).
        reduce_range: bool,
    },
}

/// Minimum, maximum and the count of non-finite values (NaN and infinities) of `x`.
pub(crate) fn min_max(isa: qtensor::isa::Isa, x: &[f32]) -> (f32, f32, usize) {
    let k = crate::registry::kernels(isa);
    let (lo, hi, nan) = (k.min_max)(k.isa, x);
    if nan == 0 && lo.is_finite() && hi.is_finite() {
        (lo, hi, 0)
    } else {
        (lo, hi, x.iter().filter(|v| !v.is_finite()).count())
    }
}

/// A linear layer's weights (`[out_features, in_features]`, `i8`) packed once, with its bias.
///
/// ```
/// use qkernels::{Activation, GemmOutput, OutputQuant, PackedLinear, QMatrix};
/// use qtensor::{QParams, QTensor};
///
/// let w = QTensor::<i8>::quantize(&ndarray::array![[0.5f32, -0.25], [0.125, 1.0]],
///                                  QParams::per_channel(vec![0.0078125, 0.0078125], vec![0, 0], 0)?)?;
/// let layer = PackedLinear::new(&w, Some(&[0.0, 0.5]))?;
/// let x = [10u8, 20]; // real values 0.1 * (q - 0) = [1.0, 2.0]
/// let a = QMatrix { data: &x, m: 1, k: 2, lda: 2, scale: 0.1, zero_point: 0 };
/// let mut y = [0u8; 2];
/// let quant = OutputQuant { scale: 0.05, zero_point: 0, activation: Activation::None };
/// layer.forward(&a, GemmOutput::U8 { data: &mut y, ldc: 2, quant }, 1)?;
/// // [1*0.5 - 2*0.25, 1*0.125 + 2*1 + 0.5] = [0.0, 2.625] -> / 0.05 = [0, 52.5 -> 52]
/// assert_eq!(y, [0, 52]);
/// # Ok::<(), qtensor::QError>(())
/// ```
#[derive(Clone, Debug)]
pub struct PackedLinear {
    weights: PackedWeights,
    bias: Option<Vec<f32>>,
    plans: crate::frame::gemm::PlanCache,
}

impl PackedLinear {
    /// Packs the weights (per-tensor, or per-channel along axis 0) for the selected
    /// instruction set and keeps the bias.
    ///
    /// # Errors
    /// As [`PackedWeights::new`]; a bias of the wrong length or with non-finite values.
    pub fn new(weights: &QTensor<i8>, bias: Option<&[f32]>) -> Result<Self> {
        Self::with_isa(qtensor::isa::selected(), weights, bias)
    }

    /// [`PackedLinear::new`] for an explicit instruction set.
    ///
    /// # Errors
    /// As [`PackedLinear::new`].
    pub fn with_isa(isa: qtensor::isa::Isa, weights: &QTensor<i8>, bias: Option<&[f32]>) -> Result<Self> {
        let weights = PackedWeights::with_isa(isa, weights)?;
        if let Some(b) = bias {
            crate::frame::gemm::check_bias("PackedLinear::new", b, weights.n())?;
        }
        Ok(PackedLinear { weights, bias: bias.map(<[f32]>::to_vec), plans: Default::default() })
    }

    /// `out = x · Wᵀ + bias`, requantized (or `i32` / `f32`, see [`GemmOutput`]), for any
    /// number of rows (the batch).
    ///
    /// # Errors
    /// As [`gemm`](crate::frame::gemm::gemm).
    pub fn forward(&self, x: &QMatrix<'_>, out: GemmOutput<'_>, threads: usize) -> Result<()> {
        let quant = match &out {
            GemmOutput::U8 { quant, .. } => Some(*quant),
            _ => None,
        };
        let bias = self.bias.as_deref();
        // Checked before a plan is cached, so a bad first call cannot claim the cache.
        crate::frame::gemm::validate(x, &self.weights, bias, &out)?;
        self.plans.with(
            crate::frame::gemm::PlanKey::new(x.scale, x.zero_point, quant),
            || vec![crate::frame::gemm::Plan::new(x.scale, x.zero_point, &self.weights, bias, quant, false)],
            |plans| crate::frame::gemm::gemm_planned(x, &self.weights, bias, Some(&plans[0]), out, threads, None),
        )
    }

    /// Dynamic quantization: `out = x · Wᵀ + bias` for `f32` input `x` (`m` rows of
    /// `in_features`) and `f32` output (`m` rows of `out_features`), the input quantized to
    /// `u8` on each call from its own range ([`DynamicActivations`]), the int8 product
    /// dequantized with [`GemmOutput::F32`]'s `fma(raw, sa * sw[j], bias[j])`, then
    /// `max(.., 0)` with `relu`. Per tensor, this is PyTorch's `quantized::linear_dynamic`
    /// (`torch.ao.nn.quantized.dynamic.Linear`) bit for bit. Returns the input's parameters
    /// (those of the first row, per token; scale 0.1 and zero point 0, an empty range's, for
    /// no rows).
    ///
    /// # Errors
    /// Buffers whose lengths are not `m * in_features` and `m * out_features`; NaN or
    /// infinite inputs (the message says which row).
    pub fn forward_dynamic(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        activations: DynamicActivations,
        relu: bool,
        threads: usize,
    ) -> Result<crate::QuantU8> {
        const OP: &str = "PackedLinear::forward_dynamic";
        let (k, n) = (self.weights.k(), self.weights.n());
        for (what, len, want) in [("input", x.len(), m * k), ("output", out.len(), m * n)] {
            if len != want {
                return Err(qtensor::QError::ShapeMismatch {
                    op: OP,
                    expected: vec![m, if what == "input" { k } else { n }],
                    actual: vec![len],
                    hint: if what == "input" {
                        "the input must hold m rows of in_features values"
                    } else {
                        "the output must hold m rows of out_features values"
                    },
                });
            }
        }
        if m == 0 {
            return Ok(crate::QuantU8 { scale: 0.1, zero_point: 0 });
        }
        let isa = self.weights.isa();
        // The range of `rows` (starting at input row `first`), checked finite.
        let range = |rows: &[f32], first: usize| -> Result<(f32, f32)> {
            let (lo, hi, bad) = min_max(isa, rows);
            if bad > 0 {
                let at = rows.iter().position(|v| !v.is_finite()).expect("counted");
                return Err(qtensor::QError::Unsupported {
                    op: OP,
                    reason: format!(
                        "input row {} holds {} ({bad} non-finite value(s) in all): dynamic quantization needs \
                         finite inputs",
                        first + at / k,
                        rows[at]
                    ),
                });
            }
            Ok((lo, hi))
        };
        let bias = self.bias.as_deref();
        let full = qtensor::QuantRange::full(qtensor::DType::U8);
        let mut run = |xq: &mut [u8]| match activations {
            DynamicActivations::PerTensor { reduce_range } => {
                let (lo, hi) = range(x, 0)?;
                let (scale, zero_point) = qtensor::choose_qparams_dynamic(lo, hi, reduce_range)?;
                qtensor::kernels::quantize_slice(x, xq, scale, zero_point, full)?;
                let a = QMatrix { data: xq, m, k, lda: k, scale, zero_point };
                let plan = crate::frame::gemm::Plan::new(scale, zero_point, &self.weights, bias, None, false);
                let out = GemmOutput::F32 { data: out, ldc: n, relu };
                crate::frame::gemm::gemm_planned(&a, &self.weights, bias, Some(&plan), out, threads, None)?;
                Ok(crate::QuantU8 { scale, zero_point })
            }
            DynamicActivations::PerToken { reduce_range } => {
                // Each row quantized on its own; the GEMM takes each row's zero-point term
                // and scale in its epilogue.
                let mut params = Vec::with_capacity(m);
                for (i, (row, q)) in x.chunks_exact(k).zip(xq.chunks_exact_mut(k)).enumerate() {
                    let (lo, hi) = range(row, i)?;
                    let (scale, zero_point) = qtensor::choose_qparams_dynamic(lo, hi, reduce_range)?;
                    qtensor::kernels::quantize_slice(row, q, scale, zero_point, full)?;
                    params.push(crate::QuantU8 { scale, zero_point });
                }
                let a = QMatrix { data: xq, m, k, lda: k, scale: 1.0, zero_point: 0 };
                let plan = crate::frame::gemm::Plan::new(1.0, 0, &self.weights, bias, None, false);
                crate::frame::gemm::gemm_f32_per_row(&a, &self.weights, &plan, &params, out, relu, threads)?;
                Ok(params[0])
            }
        };
        // The codes start a cache line (whole rows of a tile's loads then do not straddle
        // cache lines when K is a multiple of 64), in this thread's buffer: taken out for the
        // call (a rayon worker waiting inside may run another layer's call, which then uses
        // a fresh one) and put back when it is the largest.
        let mut codes = CODES.with(|c| std::mem::take(&mut *c.borrow_mut()));
        codes.grow_to(m * k);
        let result = run(&mut codes[..m * k]);
        CODES.with(|c| {
            let mut cur = c.borrow_mut();
            if cur.len() < codes.len() {
                *cur = codes;
            }
        });
        result
    }

    /// The packed weights.
    pub fn weights(&self) -> &PackedWeights {
        &self.weights
    }

    /// The bias.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
}

thread_local! {
    /// Each thread's buffer of a dynamic layer's input codes.
    static CODES: std::cell::RefCell<Aligned<u8>> = std::cell::RefCell::new(Aligned::default());
}

#[cfg(test)]
mod tests {
    use super::min_max;
    use qtensor::isa::Isa;

    /// Every tier's scan equals the scalar twin on random lengths and values, with NaNs and
    /// infinities counted.
    #[test]
    fn min_max_is_the_same_on_every_tier() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for len in (0..200).chain([1000, 1023, 4097]) {
            let mut x: Vec<f32> = (0..len).map(|_| (next() % 20001) as f32 / 100.0 - 100.0).collect();
            if len > 3 && next() % 3 == 0 {
                let at = (next() as usize) % len;
                x[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][(next() % 3) as usize];
            }
            let want = min_max(Isa::Scalar, &x);
            for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                let got = min_max(isa, &x);
                assert_eq!(got.2, want.2, "{isa} len {len}: non-finite count");
                if want.2 == 0 && len > 0 {
                    assert_eq!((got.0, got.1), (want.0, want.1), "{isa} len {len}");
                }
            }
        }
    }
}
