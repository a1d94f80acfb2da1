//! The int8 linear layer: packed weights plus bias over the GEMM.

use qtensor::{QTensor, Result};

use crate::gemm::{GemmOutput, QMatrix};
use crate::pack::PackedWeights;

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
    plans: crate::gemm::PlanCache,
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
            crate::gemm::check_bias("PackedLinear::new", b, weights.n())?;
        }
        Ok(PackedLinear { weights, bias: bias.map(<[f32]>::to_vec), plans: Default::default() })
    }

    /// `out = x · Wᵀ + bias`, requantized (or `i32` / `f32`, see [`GemmOutput`]), for any
    /// number of rows (the batch).
    ///
    /// # Errors
    /// As [`gemm`](crate::gemm::gemm).
    pub fn forward(&self, x: &QMatrix<'_>, out: GemmOutput<'_>, threads: usize) -> Result<()> {
        let quant = match &out {
            GemmOutput::U8 { quant, .. } => Some(*quant),
            _ => None,
        };
        let bias = self.bias.as_deref();
        // Checked before a plan is cached, so a bad first call cannot claim the cache.
        crate::gemm::validate(x, &self.weights, bias, &out)?;
        self.plans.with(
            crate::gemm::PlanKey::new(x.scale, x.zero_point, quant),
            || vec![crate::gemm::Plan::new(x.scale, x.zero_point, &self.weights, bias, quant, false)],
            |plans| crate::gemm::gemm_planned(x, &self.weights, bias, Some(&plans[0]), out, threads, None),
        )
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
