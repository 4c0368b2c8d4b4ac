//! Maps and sets that cost one pointer while empty.
//!
//! A broker holds a connection's state for every idle client, and most of its maps are empty
//! for the whole connection (topic aliases, data streams, acknowledgements owed on them): a
//! `HashMap` with its hasher is six words, these are one. A table is made on the first
//! insertion and given back by [`SparseMap::release_if_empty`] (an idle connection calls it
//! through [`crate::server::ServerConnection::compact`]), not on every removal, so that a
//! busy connection does not allocate per message.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// A `HashMap` that holds no table, and only a null pointer, while it has none.
// Boxed on purpose: one word while empty instead of the map's six.
#[allow(clippy::box_collection)]
#[derive(Debug, Clone)]
pub(crate) struct SparseMap<K, V>(Option<Box<HashMap<K, V>>>);

impl<K, V> Default for SparseMap<K, V> {
    fn default() -> Self {
        Self(None)
    }
}

impl<K: Eq + Hash, V> SparseMap<K, V> {
    /// An empty map.
    pub(crate) const fn new() -> Self {
        Self(None)
    }

    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.0.as_ref()?.get(key)
    }

    pub(crate) fn contains_key(&self, key: &K) -> bool {
        self.0.as_ref().is_some_and(|m| m.contains_key(key))
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.0.get_or_insert_default().insert(key, value)
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        self.0.as_mut()?.remove(key)
    }

    /// The value of `key`, made by `make` if it has none.
    pub(crate) fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        self.0
            .get_or_insert_default()
            .entry(key)
            .or_insert_with(make)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn retain(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        if let Some(m) = &mut self.0 {
            m.retain(keep);
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.0.iter_mut().flat_map(|m| m.values_mut())
    }

    /// Empties the map, returning what it held.
    pub(crate) fn take(&mut self) -> impl Iterator<Item = (K, V)> {
        self.0.take().into_iter().flat_map(|m| m.into_iter())
    }

    /// Gives the table back if the map is empty.
    pub(crate) fn release_if_empty(&mut self) {
        if self.is_empty() {
            self.0 = None;
        }
    }
}

impl<K: Eq + Hash, V> FromIterator<(K, V)> for SparseMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let map: HashMap<K, V> = iter.into_iter().collect();
        if map.is_empty() {
            Self(None)
        } else {
            Self(Some(Box::new(map)))
        }
    }
}

/// A `HashSet` that holds no table, and only a null pointer, while it has none.
// Boxed on purpose: one word while empty instead of the set's six.
#[allow(clippy::box_collection)]
#[derive(Debug, Clone)]
pub(crate) struct SparseSet<T>(Option<Box<HashSet<T>>>);

impl<T> Default for SparseSet<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T: Eq + Hash> SparseSet<T> {
    /// An empty set.
    pub(crate) const fn new() -> Self {
        Self(None)
    }

    pub(crate) fn contains(&self, value: &T) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(value))
    }

    pub(crate) fn insert(&mut self, value: T) -> bool {
        self.0.get_or_insert_default().insert(value)
    }

    pub(crate) fn remove(&mut self, value: &T) -> bool {
        self.0.as_mut().is_some_and(|s| s.remove(value))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|s| s.is_empty())
    }

    /// Gives the table back if the set is empty.
    pub(crate) fn release_if_empty(&mut self) {
        if self.0.as_ref().is_some_and(|s| s.is_empty()) {
            self.0 = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_map_is_one_pointer_and_gives_its_table_back() {
        assert_eq!(size_of::<SparseMap<u16, u64>>(), size_of::<usize>());
        assert_eq!(size_of::<SparseSet<u16>>(), size_of::<usize>());
        let mut map = SparseMap::new();
        assert!(map.is_empty());
        map.insert(1u16, 10u64);
        *map.get_or_insert_with(2, || 20) += 1;
        assert_eq!(map.get(&2), Some(&21));
        assert_eq!(map.len(), 2);
        map.release_if_empty();
        assert!(map.contains_key(&1));
        map.retain(|k, _| *k == 2);
        assert_eq!(map.take().collect::<Vec<_>>(), [(2, 21)]);
        map.insert(3, 30);
        map.remove(&3);
        map.release_if_empty();
        assert!(map.0.is_none());
        let mut set = SparseSet::new();
        assert!(set.insert(5u16));
        assert!(set.contains(&5));
        assert!(set.remove(&5));
        set.release_if_empty();
        assert!(set.0.is_none());
    }
}
