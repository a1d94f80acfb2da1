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

/// Runs `task(0)`, ..., `task(total - 1)`, each once, shared between the threads of the
/// current rayon pool (on the calling thread alone outside one, or with one thread).
///
/// Each of the pool's `n` threads starts on its own contiguous share of the tasks
/// (neighbouring tasks share a block of weights) and takes them one at a time; a thread
/// whose share is done takes the next untaken task of the others'. No thread stays idle
/// while a task is left, whatever the tasks' sizes or when each thread starts. (A parallel
/// iterator over the range gives each thread runs of tasks that nobody else can take once
/// started: at two threads, ResNet-18's convolutions finished 34 µs apart on average, of
/// 171 µs, against 5-9 µs this way.) Which thread runs a task varies from run to run;
/// tasks that write disjoint outputs give the same bytes regardless.
pub(crate) fn share_tasks(total: usize, task: impl Fn(usize) + Sync) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let n = rayon::current_num_threads().min(total);
    if n <= 1 || rayon::current_thread_index().is_none() {
        (0..total).for_each(task);
        return;
    }
    let start = |i: usize| i * total / n;
    let next: Vec<AtomicUsize> = (0..n).map(|i| AtomicUsize::new(start(i))).collect();
    let run_share = |i: usize| {
        // Its own share first, then the others' in turn.
        for j in (i..n).chain(0..i) {
            let end = start(j + 1);
            loop {
                let t = next[j].fetch_add(1, Ordering::Relaxed);
                if t >= end {
                    break;
                }
                task(t);
            }
        }
    };
    // One share per thread, each its own rayon job: a share that no other thread picks
    // up runs last on the caller's thread and finds its tasks taken.
    fn split(lo: usize, hi: usize, f: &(impl Fn(usize) + Sync)) {
        if hi - lo == 1 {
            f(lo);
        } else {
            let mid = lo + (hi - lo) / 2;
            rayon::join(|| split(lo, mid, f), || split(mid, hi, f));
        }
    }
    split(0, n, &run_share);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn shared_tasks_each_run_once_on_any_thread_count() {
        for threads in [1, 2, 3, 4] {
            for total in [0, 1, 2, 3, 7, 64, 131] {
                let runs: Vec<AtomicUsize> = (0..total).map(|_| AtomicUsize::new(0)).collect();
                super::run_with(threads, || {
                    super::share_tasks(total, |t| {
                        runs[t].fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(std::time::Duration::from_micros(20));
                    })
                });
                assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1), "threads {threads} total {total}");
            }
        }
        // Outside a pool: all on the calling thread.
        let n = AtomicUsize::new(0);
        super::share_tasks(5, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 5);
    }
}
