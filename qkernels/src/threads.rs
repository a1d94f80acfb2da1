//! Caller-chosen thread counts: one cached rayon pool per count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Runs `f` on the pool that the kernels use for `threads` threads (`threads <= 1`: right
/// here, on this thread). Pools are created once per thread count and kept.
///
/// Every kernel call with `threads > 1` enters its pool this way, and a call from outside the
/// pool hands its work to a pool thread and sleeps until it is done: two cross-thread
/// wake-ups per call, tens of microseconds on some machines. A caller that runs many kernels
/// in a row (a model's layers) should enter the pool once around all of them, with this
/// function: the kernels' own calls then run in place, on the pool thread.
///
/// ```
/// let sum = qkernels::with_threads(2, || (1..=10).sum::<u32>());
/// assert_eq!(sum, 55);
/// ```
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    run_with(threads, f)
}

/// See [`with_threads`].
pub(crate) fn run_with<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    if threads <= 1 {
        return f();
    }
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let pool = {
        let mut pools = POOLS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(threads)
            .or_insert_with(|| {
                Arc::new(
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |i| format!("qkernels-{threads}-{i}"))
                        .build()
                        .expect("spawning a rayon thread pool"),
                )
            })
            .clone()
    };
    pool.install(f)
}
