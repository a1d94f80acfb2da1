//! Buffers whose first element starts a cache line.
//!
//! A `Vec<u8>` from the system allocator starts 16 bytes into its block (glibc's large
//! blocks: 16 bytes past a page boundary), so every 64-byte group of VNNI-packed weights and
//! every 64-byte row of an AMX tile load straddles two cache lines. Packed weights and the
//! kernels' own scratch live in these buffers instead.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use bytemuck::Pod;

/// Bytes of a cache line.
pub(crate) const LINE: usize = 64;

/// One cache line of storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; LINE]);

// SAFETY: `Line` is `repr(C)` over `[u8; 64]` with alignment 64: size 64, no padding, and
// every bit pattern (all zeros included) is a valid value.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above; `Copy` and `'static`.
unsafe impl bytemuck::Pod for Line {}

/// `len` values of `T` starting on a 64-byte boundary (storage in whole cache lines; the
/// bytes past `len` values are zero).
#[derive(Clone, Default)]
pub(crate) struct Aligned<T: Pod> {
    lines: Vec<Line>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> Aligned<T> {
    /// `len` zero values.
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len.checked_mul(size_of::<T>()).expect("Aligned::zeroed: length overflows usize");
        Aligned { lines: vec![Line([0; LINE]); bytes.div_ceil(LINE)], len, _t: PhantomData }
    }

    /// A copy of `values`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn from_slice(values: &[T]) -> Self {
        let mut a = Self::zeroed(values.len());
        a.copy_from_slice(values);
        a
    }

    /// At least `len` values (zero past the old ones when it grows; the old ones kept).
    pub(crate) fn grow_to(&mut self, len: usize) {
        if len > self.len {
            let bytes = len.checked_mul(size_of::<T>()).expect("Aligned::grow_to: length overflows usize");
            self.lines.resize(bytes.div_ceil(LINE), Line([0; LINE]));
            self.len = len;
        }
    }
}

impl<T: Pod> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let bytes: &[u8] = bytemuck::cast_slice(&self.lines);
        // 64-byte aligned and at least `len` values long: the cast cannot fail.
        bytemuck::cast_slice::<u8, T>(&bytes[..self.len * size_of::<T>()])
    }
}

impl<T: Pod> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let n = self.len * size_of::<T>();
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.lines);
        bytemuck::cast_slice_mut::<u8, T>(&mut bytes[..n])
    }
}

impl<T: Pod + std::fmt::Debug> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_start_a_cache_line_and_keep_their_contents() {
        for len in [0usize, 1, 3, 63, 64, 65, 1000] {
            let v: Vec<i16> = (0..len).map(|i| i as i16 - 7).collect();
            let a = Aligned::from_slice(&v);
            assert_eq!(&a[..], &v[..]);
            if len > 0 {
                assert_eq!(a.as_ptr() as usize % LINE, 0, "len {len}");
            }
            let mut g = a.clone();
            g.grow_to(len + 100);
            assert_eq!(&g[..len], &v[..]);
            assert!(g[len..].iter().all(|&x| x == 0));
            assert_eq!(g.len(), len + 100);
            g.grow_to(1);
            assert_eq!(g.len(), len + 100, "never shrinks");
        }
    }
}
