//! Caller-chosen thread counts: one cached rayon pool per count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Runs `f` on a rayon pool of `threads` threads (`threads <= 1`: right here, on this thread).
/// Pools are created once per thread count and kept.
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
