//! qobserve's integration tests.

mod golden;
mod props;
