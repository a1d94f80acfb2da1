//! # qobserve: calibration observers
//!
//! (Manual in progress.)

mod error;
mod fixed;
mod histogram;
mod minmax;
mod observer;
mod qconfig;
mod scan;

pub use error::{ObserveError, Result};
pub use fixed::FixedQParamsObserver;
pub use histogram::{EntropyObserver, HistogramCollector, HistogramObserver, MseObserver, PercentileObserver};
pub use minmax::{MinMaxObserver, PerChannelMinMaxObserver};
pub use observer::{NonFinite, Observer, ObserverFactory, QuantSpec};
pub use qconfig::{ObserverSpec, QConfig};
pub use qtensor::{choose_qparams, choose_qparams_per_channel};
