//! A vector that costs one pointer while it has never been used.
//!
//! Every connection's core holds a few lists that are empty for almost every connection
//! (publications waiting for room, per-stream state of multi-stream QUIC): a `Vec` is three
//! words, this is one. Its buffer is made on the first push and given back by
//! [`SparseVec::release_if_empty`] (when a connection parks), not on every removal, so that
//! a busy connection does not allocate per use.

use std::ops::{Deref, DerefMut};

/// A `Vec` that holds only a null pointer until something is pushed.
// Boxed on purpose: one word while empty instead of the vector's three.
#[allow(clippy::box_collection)]
#[derive(Debug)]
pub(crate) struct SparseVec<T>(Option<Box<Vec<T>>>);

impl<T> Default for SparseVec<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> SparseVec<T> {
    /// An empty vector.
    pub(crate) const fn new() -> Self {
        Self(None)
    }

    pub(crate) fn push(&mut self, value: T) {
        self.0.get_or_insert_default().push(value);
    }

    /// Removes and returns the element at `at`, shifting the rest; `None` if out of bounds.
    pub(crate) fn remove(&mut self, at: usize) -> Option<T> {
        let v = self.0.as_mut()?;
        (at < v.len()).then(|| v.remove(at))
    }

    /// Removes and returns the element at `at`, moving the last into its place; `None` if out
    /// of bounds.
    pub(crate) fn swap_remove(&mut self, at: usize) -> Option<T> {
        let v = self.0.as_mut()?;
        (at < v.len()).then(|| v.swap_remove(at))
    }

    pub(crate) fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        if let Some(v) = &mut self.0 {
            v.retain(keep);
        }
    }

    pub(crate) fn clear(&mut self) {
        if let Some(v) = &mut self.0 {
            v.clear();
        }
    }

    /// Gives the buffer back if the vector is empty.
    pub(crate) fn release_if_empty(&mut self) {
        if self.is_empty() {
            self.0 = None;
        }
    }
}

impl<T> Deref for SparseVec<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl<T> DerefMut for SparseVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.0 {
            Some(v) => v.as_mut_slice(),
            None => &mut [],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_vec_is_one_pointer_and_gives_its_buffer_back() {
        assert_eq!(size_of::<SparseVec<u64>>(), size_of::<usize>());
        let mut v = SparseVec::new();
        assert!(v.is_empty());
        assert_eq!(v.remove(0), None);
        v.push(1);
        v.push(2);
        v.push(3);
        v.iter_mut().for_each(|x| *x *= 10);
        assert_eq!(&*v, [10, 20, 30]);
        assert_eq!(v.remove(0), Some(10));
        assert_eq!(v.swap_remove(0), Some(20));
        assert_eq!(v.swap_remove(5), None);
        v.retain(|x| *x != 30);
        v.release_if_empty();
        assert!(v.0.is_none());
        v.push(4);
        v.clear();
        v.release_if_empty();
        assert!(v.0.is_none());
    }
}
