//! Activation buffers reused between layers and between calls: one small pool per thread,
//! so a converted model shared by many threads never locks, and a thread that runs it again
//! finds its buffers from the last call instead of asking the allocator for every layer.

use std::cell::RefCell;
use std::ops::Deref;

/// Buffers kept per thread (a chain of layers needs two at a time; branches a few more).
const MAX_POOLED: usize = 8;
/// Bytes kept per thread at most: larger activations go back to the allocator.
const MAX_POOLED_BYTES: usize = 256 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// The float path's buffers (convolution and element-wise outputs), kept the same way.
    static POOL_F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// The smallest pooled buffer of at least `len` elements, else the largest one.
fn take_from<T>(pool: &RefCell<Vec<Vec<T>>>, len: usize) -> Vec<T> {
    let mut p = pool.borrow_mut();
    let fit = p.iter().enumerate().filter(|(_, b)| b.capacity() >= len).min_by_key(|(_, b)| b.capacity());
    match fit.or_else(|| p.iter().enumerate().max_by_key(|(_, b)| b.capacity())).map(|(i, _)| i) {
        Some(i) => p.swap_remove(i),
        None => Vec::new(),
    }
}

/// Keeps `v` in `pool` within the count and byte limits (when full, it replaces a smaller
/// buffer).
fn give_to<T>(pool: &RefCell<Vec<Vec<T>>>, v: Vec<T>) {
    let bytes = |b: &Vec<T>| b.capacity() * std::mem::size_of::<T>();
    if v.capacity() == 0 {
        return;
    }
    let mut p = pool.borrow_mut();
    let held: usize = p.iter().map(bytes).sum();
    if held + bytes(&v) > MAX_POOLED_BYTES {
        return;
    }
    if p.len() < MAX_POOLED {
        p.push(v);
    } else if let Some((i, _)) = p.iter().enumerate().min_by_key(|(_, b)| b.capacity()) {
        if p[i].capacity() < v.capacity() {
            p[i] = v;
        }
    }
}

/// An `f32` buffer of `len` values whose contents the caller overwrites entirely, from this
/// thread's float pool: stale values of an earlier activation (in debug builds NaN, so a
/// value left unwritten shows).
pub(crate) fn take_f32(len: usize) -> Vec<f32> {
    let mut v = POOL_F32.with(|p| take_from(p, len));
    if cfg!(debug_assertions) {
        v.clear();
        v.resize(len, f32::NAN);
    } else {
        v.truncate(len);
        v.resize(len, 0.0);
    }
    v
}

/// Returns an `f32` buffer to this thread's float pool.
pub(crate) fn give_f32(v: Vec<f32>) {
    POOL_F32.with(|p| give_to(p, v));
}

/// Returns a float value's buffer to this thread's float pool (a value an op has consumed).
pub(crate) fn recycle_f32(a: ndarray::ArrayD<f32>) {
    give_f32(a.into_raw_vec_and_offset().0);
}

/// A buffer of `len` bytes whose contents the caller overwrites entirely: the smallest
/// pooled buffer that fits, else the largest one grown, else a new one. Not zeroed (stale
/// bytes of an earlier activation; in debug builds a poison pattern).
pub(crate) fn take(len: usize) -> Vec<u8> {
    let mut v = POOL.with(|p| take_from(p, len));
    if cfg!(debug_assertions) {
        // Tests poison reused buffers: a layer that left any byte of its output unwritten
        // would change results, and the bit-exact tests would see it.
        v.clear();
        v.resize(len, 0xA5);
    } else {
        // Every layer writes its whole output: keep the old bytes, fill only new ones.
        v.truncate(len);
        fill_to(&mut v, len);
    }
    v
}

/// New bytes of a buffer above which a pool's threads share filling them.
const PARALLEL_FILL: usize = 256 << 10;

/// Lengthens `v` to `len` bytes with zeros: inside a pool of several threads (a model run on
/// several), a long stretch is filled by all of them rather than by the one that runs the
/// graph while the others wait for its next layer.
fn fill_to(v: &mut Vec<u8>, len: usize) {
    let new = len.saturating_sub(v.len());
    if new < PARALLEL_FILL || rayon::current_thread_index().is_none() || rayon::current_num_threads() < 2 {
        v.resize(len, 0);
        return;
    }
    use rayon::prelude::*;
    v.reserve(new);
    v.spare_capacity_mut()[..new].par_chunks_mut(64 << 10).for_each(|c| c.fill(std::mem::MaybeUninit::new(0)));
    // SAFETY: the `new` bytes after the old length were just written, and `reserve` made
    // room for them.
    unsafe { v.set_len(len) };
}

/// Returns a buffer to this thread's pool (when full, it replaces a smaller one).
pub(crate) fn give(v: Vec<u8>) {
    POOL.with(|p| give_to(p, v));
}

/// Frees the calling thread's pooled activation buffers (they are otherwise kept for the
/// thread's next call to a converted model or float run, at most 8 buffers and 256 MiB per
/// thread, for `u8` and for `f32` activations each).
pub fn release_thread_buffers() {
    POOL.with(|p| p.borrow_mut().clear());
    POOL_F32.with(|p| p.borrow_mut().clear());
}

/// Bytes held by this thread's pool (for tests).
#[cfg(test)]
pub(crate) fn pooled_bytes() -> usize {
    POOL.with(|p| p.borrow().iter().map(Vec::capacity).sum())
}

/// A layer's input, returned to the pool when the layer is done with it.
pub(crate) struct Input(Vec<u8>);

impl Input {
    pub(crate) fn new(v: Vec<u8>) -> Self {
        Input(v)
    }

    /// The buffer itself, for a layer that passes its input on unchanged.
    pub(crate) fn into_inner(mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

impl Deref for Input {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengthening_keeps_the_old_bytes_and_zeroes_the_new_on_any_thread_count() {
        for threads in [1, 2, 3] {
            for (old, len) in
                [(0, 10), (5000, 5000 + PARALLEL_FILL), (100, 3 * PARALLEL_FILL + 77), (PARALLEL_FILL, 10)]
            {
                let mut v: Vec<u8> = (0..old).map(|i| (i % 251) as u8 + 1).collect();
                // Stale bytes past the length (as a shortened pooled buffer has) must not show.
                v.reserve(len);
                v.extend(std::iter::repeat_n(0xEE, len.saturating_sub(old)));
                v.truncate(old);
                qkernels::with_threads(threads, || fill_to(&mut v, len));
                assert_eq!(v.len(), len, "threads {threads}, {old} -> {len}");
                let kept = old.min(len);
                assert!(v[..kept].iter().enumerate().all(|(i, &b)| b == (i % 251) as u8 + 1), "threads {threads}");
                assert!(v[kept..].iter().all(|&b| b == 0), "threads {threads}, {old} -> {len}: new bytes not zero");
            }
        }
    }

    #[test]
    fn buffers_are_reused_and_poisoned_in_debug_builds() {
        let mut a = take(1000);
        let ptr = a.as_ptr();
        a.iter_mut().for_each(|v| *v = 7);
        give(a);
        assert!(pooled_bytes() >= 1000);
        let b = take(600);
        assert_eq!(b.as_ptr(), ptr, "the pooled buffer is reused");
        assert_eq!(b.len(), 600);
        // Debug builds hand out the poison pattern, never the old bytes; release builds keep
        // the old bytes (no fill: every layer overwrites its whole output).
        let stale = if cfg!(debug_assertions) { 0xA5 } else { 7 };
        assert!(b.iter().all(|&v| v == stale));
        drop(Input::new(b));
        let c = take(5000); // grows the pooled buffer
        assert_eq!(c.len(), 5000);
        if cfg!(debug_assertions) {
            assert!(c.iter().all(|&v| v == 0xA5));
        } else {
            assert!(c[..600].iter().all(|&v| v == 7) && c[600..].iter().all(|&v| v == 0), "new bytes are zero");
        }
        let kept = Input::new(c).into_inner();
        assert_eq!(kept.len(), 5000);
        assert_eq!(pooled_bytes(), 0, "into_inner keeps the buffer out of the pool");
        give(vec![0; 100]);
        give(Vec::with_capacity(MAX_POOLED_BYTES)); // over the cap with the first: not kept
        assert_eq!(pooled_bytes(), 100);
        release_thread_buffers();
        assert_eq!(pooled_bytes(), 0);
    }
}
