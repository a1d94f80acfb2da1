//! Errors of calibration.

use qtensor::QError;

/// What can go wrong while observing or when asking for parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ObserveError {
    /// `qparams` was asked of an observer that never saw a value.
    #[error(
        "observer for {tensor} saw no data: did calibration run, and does data reach this tensor? \
         (PyTorch would silently use scale 1.0, zero point 0 here)"
    )]
    NoData {
        /// The observed tensor, e.g. "layer1.0.conv2 output", or the observer's kind when no
        /// name was attached.
        tensor: String,
    },
    /// NaN or ±inf in calibration data under [`crate::NonFinite::Error`].
    #[error(
        "observer for {tensor}: calibration batch of shape {shape:?} holds {count} non-finite \
         value(s) (first: {first} at flat index {index}); fix the data or the model producing \
         it, or construct the observer with NonFinite::Ignore (in a QConfig: \
         ObserverSpec::IgnoreNonFinite) to skip such values"
    )]
    NonFiniteInput {
        /// The observed tensor.
        tensor: String,
        /// Shape of the batch.
        shape: Vec<usize>,
        /// How many values were NaN or infinite.
        count: usize,
        /// The first of them.
        first: f32,
        /// Its flat index.
        index: usize,
    },
    /// A batch whose shape does not fit the observer (e.g. no channel axis).
    #[error("observer for {tensor}: {reason}")]
    Shape {
        /// The observed tensor.
        tensor: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Two observers that cannot be merged.
    #[error("cannot merge observers: {reason}")]
    Merge {
        /// Why.
        reason: String,
    },
    /// An invalid observer configuration.
    #[error("invalid observer configuration: {reason}")]
    Config {
        /// What is wrong and what to do.
        reason: String,
    },
    /// Choosing parameters from the statistics failed.
    #[error(transparent)]
    QParams(#[from] QError),
}

impl ObserveError {
    /// Attaches the name of the observed tensor (e.g. `"layer1.0.conv2 output"`) to the
    /// message, replacing the observer kind it carried.
    pub fn for_tensor(mut self, name: &str) -> Self {
        match &mut self {
            ObserveError::NoData { tensor }
            | ObserveError::NonFiniteInput { tensor, .. }
            | ObserveError::Shape { tensor, .. } => *tensor = name.to_string(),
            _ => {}
        }
        self
    }
}

/// Result with [`ObserveError`].
pub type Result<T, E = ObserveError> = std::result::Result<T, E>;
