//! Fixed parameters, for outputs whose range is known in advance (sigmoid, tanh).

use std::any::Any;

use ndarray::ArrayViewD;
use qtensor::{DType, QParams, QScheme, QuantRange, DEFAULT_EPS};

use crate::error::{ObserveError, Result};
use crate::observer::{Observer, QuantSpec};

/// Returns the same scale and zero point whatever it sees (PyTorch `FixedQParamsObserver`):
/// sigmoid's `[0, 1)` as `1/256, 0`, tanh's `[-1, 1)` as `2/256, 128`.
#[derive(Clone, Debug, PartialEq)]
pub struct FixedQParamsObserver {
    scale: f32,
    zero_point: i32,
    spec: QuantSpec,
}

impl FixedQParamsObserver {
    /// Fixed `u8` parameters.
    ///
    /// # Errors
    /// An invalid scale or a zero point outside `0..=255`.
    pub fn new(scale: f32, zero_point: i32) -> Result<Self> {
        let spec = QuantSpec {
            dtype: DType::U8,
            scheme: QScheme::Affine,
            range: QuantRange::full(DType::U8),
            eps: DEFAULT_EPS,
        };
        QParams::per_tensor(scale, zero_point)?.validate("FixedQParamsObserver::new", &[1], &spec.range)?;
        Ok(FixedQParamsObserver { scale, zero_point, spec })
    }

    /// PyTorch's fixed parameters for sigmoid, hardsigmoid and softmax outputs: `1/256, 0`.
    pub fn range_0_to_1() -> Self {
        FixedQParamsObserver { scale: 1.0 / 256.0, zero_point: 0, ..Self::new(1.0, 0).expect("valid") }
    }

    /// PyTorch's fixed parameters for tanh outputs: `2/256, 128`.
    pub fn range_neg1_to_1() -> Self {
        FixedQParamsObserver { scale: 2.0 / 256.0, zero_point: 128, ..Self::new(1.0, 0).expect("valid") }
    }
}

impl Observer for FixedQParamsObserver {
    fn kind(&self) -> &'static str {
        "FixedQParams"
    }
    fn observe(&mut self, _x: ArrayViewD<'_, f32>) -> Result<()> {
        Ok(())
    }
    fn qparams(&self) -> Result<QParams> {
        Ok(QParams::per_tensor(self.scale, self.zero_point)?)
    }
    fn merge(&mut self, other: &dyn Observer) -> Result<()> {
        match other.as_any().downcast_ref::<Self>() {
            Some(o) if o == self => Ok(()),
            _ => Err(ObserveError::Merge { reason: format!("{} with a different {}", self.kind(), other.kind()) }),
        }
    }
    fn merges_exactly(&self) -> bool {
        true
    }
    fn spec(&self) -> QuantSpec {
        self.spec
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn clone_box(&self) -> Box<dyn Observer> {
        Box::new(self.clone())
    }
}
