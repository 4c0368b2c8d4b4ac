//! The subscription index: a trie of topic filters, one node per level.
//!
//! The tree is persistent: [`TopicTree::insert`] and [`TopicTree::remove`] return a new tree
//! that shares every untouched node with the old one. The broker publishes each new tree
//! through an atomic pointer swap, so routing a message reads a snapshot without taking any
//! lock, while subscription changes are serialised among themselves.
//!
//! A change copies only the nodes on its filter's path. A node's children are a persistent
//! hash map of shared nodes, so the copy of a level with many siblings (100,000 filters
//! `a/{n}/#`, say) shares them all, and what it copies grows with the logarithm of their
//! number, not with it.
//!
//! Matching walks the topic's levels once, following the exact child, the `+` child and the
//! `#` child at each level, so its cost depends on the topic's depth and on how many filters
//! actually match, not on how many filters exist.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use imbl::{HashMap, OrdMap, Vector};
use mqttd_proto::{TopicFilter, TopicName};

/// Entries a [`SmallMap`] holds in a vector before it becomes a hash map.
const FEW: usize = 8;

/// A map that is a vector while it holds at most [`FEW`] entries, and a persistent hash map
/// beyond. Most nodes have one child or one subscriber, and the hash map's smallest node has
/// room for 16 entries (about 1 KB for the broker's subscribers): a vector keeps a filter's
/// cost near its own size. Cloning a small map copies its few entries; a large one shares
/// its nodes, so path copies stay cheap at levels with many siblings.
#[derive(Debug, Clone)]
enum SmallMap<K: Clone + Hash + Eq, V: Clone> {
    Few(Vec<(K, V)>),
    Many(HashMap<K, V>),
}

impl<K: Clone + Hash + Eq, V: Clone> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self::Few(Vec::new())
    }
}

impl<K: Clone + Hash + Eq, V: Clone> SmallMap<K, V> {
    fn len(&self) -> usize {
        match self {
            Self::Few(entries) => entries.len(),
            Self::Many(map) => map.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        match self {
            Self::Few(entries) => entries
                .iter()
                .find(|(k, _)| k.borrow() == key)
                .map(|(_, v)| v),
            Self::Many(map) => map.get(key),
        }
    }

    /// Adds or replaces `key`'s value (an existing entry keeps its key); returns the old value.
    fn insert(&mut self, key: K, value: V) -> Option<V> {
        let entries = match self {
            Self::Many(map) => return map.insert(key, value),
            Self::Few(entries) => entries,
        };
        if let Some((_, slot)) = entries.iter_mut().find(|(k, _)| *k == key) {
            return Some(std::mem::replace(slot, value));
        }
        if entries.len() < FEW {
            // Exactly one more: a node's map is copied on every change below it, so spare
            // capacity would be paid for by every node.
            entries.reserve_exact(1);
            entries.push((key, value));
        } else {
            let mut map: HashMap<K, V> = entries.drain(..).collect();
            map.insert(key, value);
            *self = Self::Many(map);
        }
        None
    }

    fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        match self {
            Self::Few(entries) => {
                let i = entries.iter().position(|(k, _)| k.borrow() == key)?;
                let (_, value) = entries.swap_remove(i);
                // Not on every removal: a node's map is copied with its path anyway.
                if entries.len() <= entries.capacity() / 2 {
                    entries.shrink_to_fit();
                }
                Some(value)
            }
            Self::Many(map) => {
                let value = map.remove(key)?;
                // Back to a vector well below the threshold, so that a map hovering around
                // it does not convert on every change.
                if map.len() <= FEW / 2 {
                    let entries = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    *self = Self::Few(entries);
                }
                Some(value)
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let (few, many) = match self {
            Self::Few(entries) => (Some(entries.iter().map(|(k, v)| (k, v))), None),
            Self::Many(map) => (None, Some(map.iter())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

/// One node of the trie.
#[derive(Debug)]
struct Node<K: Clone + Hash + Eq + Ord, V: Clone> {
    children: SmallMap<Arc<str>, Arc<Self>>,
    plus: Option<Arc<Self>>,
    hash: Option<Arc<Self>>,
    /// Non-shared subscriptions whose filter ends at this node.
    direct: SmallMap<K, V>,
    /// Shared subscriptions whose filter ends at this node, by share name.
    shared: OrdMap<Arc<str>, Arc<SharedGroup<K, V>>>,
}

impl<K: Clone + Hash + Eq + Ord, V: Clone> Clone for Node<K, V> {
    fn clone(&self) -> Self {
        Self {
            children: self.children.clone(),
            plus: self.plus.clone(),
            hash: self.hash.clone(),
            direct: self.direct.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<K: Clone + Hash + Eq + Ord, V: Clone> Default for Node<K, V> {
    fn default() -> Self {
        Self {
            children: SmallMap::default(),
            plus: None,
            hash: None,
            direct: SmallMap::default(),
            shared: OrdMap::new(),
        }
    }
}

impl<K: Clone + Hash + Eq + Ord, V: Clone> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
            && self.direct.is_empty()
            && self.shared.is_empty()
    }
}

/// The members of one shared subscription group (`$share/{group}/{filter}`).
#[derive(Debug)]
pub struct SharedGroup<K: Clone + Ord, V: Clone> {
    /// Members in the order they joined; indexing is O(log n) for round-robin picks.
    members: Vector<(K, V)>,
    /// Round-robin position, shared by every snapshot of this group.
    next: Arc<AtomicUsize>,
}

impl<K: Clone + Ord, V: Clone> SharedGroup<K, V> {
    /// The members, in the order they joined.
    pub fn members(&self) -> impl Iterator<Item = (&K, &V)> {
        self.members.iter().map(|(k, v)| (k, v))
    }

    fn position(&self, key: &K) -> Option<usize> {
        self.members.iter().position(|(k, _)| k == key)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the group has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Picks the members in round-robin order, starting after the last one picked; `accept`
    /// returns false to skip a member (one that is offline, say). Returns the chosen member.
    pub fn pick(&self, mut accept: impl FnMut(&K, &V) -> bool) -> Option<(&K, &V)> {
        let len = self.members.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for offset in 0..len {
            let (k, v) = self.members.get((start + offset) % len)?;
            if accept(k, v) {
                return Some((k, v));
            }
        }
        None
    }
}

/// A filter that matched a topic.
#[derive(Debug)]
pub enum Match<'a, K: Clone + Ord, V: Clone> {
    /// A non-shared subscription.
    Direct(&'a K, &'a V),
    /// A shared subscription group: deliver to one member.
    Shared {
        /// The share name.
        group: &'a str,
        /// The members.
        members: &'a SharedGroup<K, V>,
    },
}

/// A persistent index of subscriptions: `K` identifies a subscriber, `V` is what it subscribed
/// with. Cloning is O(1).
#[derive(Debug)]
pub struct TopicTree<K: Clone + Hash + Eq + Ord, V: Clone> {
    root: Arc<Node<K, V>>,
    len: usize,
}

impl<K: Clone + Hash + Eq + Ord, V: Clone> Clone for TopicTree<K, V> {
    fn clone(&self) -> Self {
        Self {
            root: self.root.clone(),
            len: self.len,
        }
    }
}

impl<K: Clone + Hash + Eq + Ord, V: Clone> Default for TopicTree<K, V> {
    fn default() -> Self {
        Self {
            root: Arc::new(Node::default()),
            len: 0,
        }
    }
}

enum Step<'a> {
    Level(&'a str),
    Plus,
    Hash,
}

fn step(level: &str) -> Step<'_> {
    match level {
        "+" => Step::Plus,
        "#" => Step::Hash,
        other => Step::Level(other),
    }
}

impl<K: Clone + Hash + Eq + Ord, V: Clone> TopicTree<K, V> {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `key`'s subscription to `filter`. Returns the value it replaced.
    pub fn insert(&mut self, filter: &TopicFilter, key: K, value: V) -> Option<V> {
        let share = filter.share().map(|(group, _)| Arc::<str>::from(group));
        let levels: Vec<&str> = filter.pattern().split('/').collect();
        let mut old = None;
        self.root = Arc::new(insert(&self.root, &levels, share, key, value, &mut old));
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`'s subscription to `filter`. Returns its value, if it existed.
    pub fn remove(&mut self, filter: &TopicFilter, key: &K) -> Option<V> {
        let share = filter.share().map(|(group, _)| group);
        let levels: Vec<&str> = filter.pattern().split('/').collect();
        let (root, old) = remove(&self.root, &levels, share, key)?;
        self.root = Arc::new(root.unwrap_or_default());
        self.len -= 1;
        Some(old)
    }

    fn node(&self, filter: &TopicFilter) -> Option<&Node<K, V>> {
        let mut node: &Node<K, V> = &self.root;
        for level in filter.pattern().split('/') {
            node = match step(level) {
                Step::Level(l) => node.children.get(l)?,
                Step::Plus => node.plus.as_ref()?,
                Step::Hash => node.hash.as_ref()?,
            };
        }
        Some(node)
    }

    /// The members of the shared subscription group `filter` (`$share/{group}/...`).
    pub fn shared_group(&self, filter: &TopicFilter) -> Option<&SharedGroup<K, V>> {
        let (group, _) = filter.share()?;
        self.node(filter)?.shared.get(group).map(|g| &**g)
    }

    /// `key`'s subscription to `filter`, if any.
    pub fn get(&self, filter: &TopicFilter, key: &K) -> Option<&V> {
        let node = self.node(filter)?;
        match filter.share() {
            Some((group, _)) => {
                let g = node.shared.get(group)?;
                g.members.get(g.position(key)?).map(|(_, v)| v)
            }
            None => node.direct.get(key),
        }
    }

    /// Calls `f` for every subscription whose filter matches `topic`. A `+` or `#` in the first
    /// level does not match a topic that starts with `$` [MQTT-4.7.2-1].
    pub fn for_each_match<'a>(&'a self, topic: &TopicName, mut f: impl FnMut(Match<'a, K, V>)) {
        let system = topic.is_system();
        let mut levels = topic.levels();
        walk(&self.root, &mut levels, system, true, &mut f);
    }
}

fn emit<'a, K: Clone + Hash + Eq + Ord, V: Clone>(
    node: &'a Node<K, V>,
    f: &mut impl FnMut(Match<'a, K, V>),
) {
    for (k, v) in node.direct.iter() {
        f(Match::Direct(k, v));
    }
    for (group, members) in node.shared.iter() {
        f(Match::Shared { group, members });
    }
}

fn walk<'a, 't, K: Clone + Hash + Eq + Ord, V: Clone>(
    node: &'a Node<K, V>,
    levels: &mut (impl Iterator<Item = &'t str> + Clone),
    system: bool,
    first: bool,
    f: &mut impl FnMut(Match<'a, K, V>),
) {
    let wildcards = !(first && system);
    if wildcards {
        if let Some(hash) = &node.hash {
            emit(hash, f);
        }
    }
    let Some(level) = levels.next() else {
        emit(node, f);
        return;
    };
    if let Some(child) = node.children.get(level) {
        walk(child, &mut levels.clone(), system, false, f);
    }
    if wildcards {
        if let Some(plus) = &node.plus {
            walk(plus, levels, system, false, f);
        }
    }
}

fn insert<K: Clone + Hash + Eq + Ord, V: Clone>(
    node: &Node<K, V>,
    levels: &[&str],
    share: Option<Arc<str>>,
    key: K,
    value: V,
    old: &mut Option<V>,
) -> Node<K, V> {
    let mut node = node.clone();
    let Some((first, rest)) = levels.split_first() else {
        match share {
            Some(group) => {
                let group_entry = node.shared.get(&group).cloned();
                let (mut members, next) = match &group_entry {
                    Some(g) => (g.members.clone(), g.next.clone()),
                    None => (Vector::new(), Arc::new(AtomicUsize::new(0))),
                };
                match group_entry.as_ref().and_then(|g| g.position(&key)) {
                    Some(i) => *old = Some(members.set(i, (key, value)).1),
                    None => members.push_back((key, value)),
                }
                node.shared
                    .insert(group, Arc::new(SharedGroup { members, next }));
            }
            None => *old = node.direct.insert(key, value),
        }
        return node;
    };
    let empty = Node::default();
    match step(first) {
        Step::Level(l) => {
            let child = node.children.get(l).map_or(&empty, |c| &**c);
            let child = insert(child, rest, share, key, value, old);
            node.children.insert(Arc::from(l), Arc::new(child));
        }
        Step::Plus => {
            let child = node.plus.as_deref().unwrap_or(&empty);
            node.plus = Some(Arc::new(insert(child, rest, share, key, value, old)));
        }
        Step::Hash => {
            let child = node.hash.as_deref().unwrap_or(&empty);
            node.hash = Some(Arc::new(insert(child, rest, share, key, value, old)));
        }
    }
    node
}

/// Removes a subscription below `node`. Returns `None` if it did not exist; else the new node
/// (`None` if it became empty and can be pruned) and the removed value.
fn remove<K: Clone + Hash + Eq + Ord, V: Clone>(
    node: &Node<K, V>,
    levels: &[&str],
    share: Option<&str>,
    key: &K,
) -> Option<(Option<Node<K, V>>, V)> {
    let mut node = node.clone();
    let removed = match levels.split_first() {
        None => match share {
            Some(group) => {
                let g = node.shared.get(group)?.clone();
                let mut members = g.members.clone();
                let removed = members.remove(g.position(key)?).1;
                if members.is_empty() {
                    node.shared.remove(group);
                } else {
                    node.shared.insert(
                        Arc::from(group),
                        Arc::new(SharedGroup {
                            members,
                            next: g.next.clone(),
                        }),
                    );
                }
                removed
            }
            None => node.direct.remove(key)?,
        },
        Some((first, rest)) => {
            let slot = match step(first) {
                Step::Level(l) => {
                    let child = node.children.get(l)?.clone();
                    let (child, removed) = remove(&child, rest, share, key)?;
                    match child {
                        Some(c) => node.children.insert(Arc::from(*first), Arc::new(c)),
                        None => node.children.remove(*first),
                    };
                    return Some((Some(node).filter(|n| !n.is_empty()), removed));
                }
                Step::Plus => &mut node.plus,
                Step::Hash => &mut node.hash,
            };
            let child = slot.as_ref()?.clone();
            let (child, removed) = remove(&child, rest, share, key)?;
            *slot = child.map(Arc::new);
            removed
        }
    };
    Some((Some(node).filter(|n| !n.is_empty()), removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::try_from(s).unwrap()
    }

    fn topic(s: &str) -> TopicName {
        TopicName::try_from(s).unwrap()
    }

    fn matches(tree: &TopicTree<u32, u8>, t: &str) -> Vec<String> {
        let mut out = Vec::new();
        tree.for_each_match(&topic(t), |m| match m {
            Match::Direct(k, v) => out.push(format!("{k}:{v}")),
            Match::Shared { group, members } => {
                let keys: Vec<_> = members.members().map(|(k, _)| k.to_string()).collect();
                out.push(format!("{group}[{}]", keys.join(",")));
            }
        });
        out.sort();
        out
    }

    #[test]
    fn wildcards_match_as_specified() {
        let mut t = TopicTree::new();
        for (k, f) in [
            "a/b", "a/+", "a/#", "#", "+/b", "+", "$SYS/#", "a/b/c", "/+",
        ]
        .iter()
        .enumerate()
        {
            t.insert(&filter(f), k as u32, 0);
        }
        assert_eq!(matches(&t, "a/b"), ["0:0", "1:0", "2:0", "3:0", "4:0"]);
        assert_eq!(matches(&t, "a"), ["2:0", "3:0", "5:0"]);
        assert_eq!(matches(&t, "a/b/c"), ["2:0", "3:0", "7:0"]);
        assert_eq!(matches(&t, "$SYS/x"), ["6:0"]);
        assert_eq!(matches(&t, "/x"), ["3:0", "8:0"]);
        assert_eq!(t.len(), 9);
    }

    #[test]
    fn insert_replaces_and_remove_prunes() {
        let mut t = TopicTree::new();
        assert_eq!(t.insert(&filter("a/+/c"), 1, 1), None);
        assert_eq!(t.insert(&filter("a/+/c"), 1, 2), Some(1));
        let snapshot = t.clone();
        assert_eq!(t.remove(&filter("a/+/c"), &1), Some(2));
        assert_eq!(t.remove(&filter("a/+/c"), &1), None);
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "empty branches are pruned");
        // The snapshot taken before is unaffected.
        assert_eq!(matches(&snapshot, "a/b/c"), ["1:2"]);
        assert_eq!(snapshot.get(&filter("a/+/c"), &1), Some(&2));
    }

    #[test]
    fn a_change_copies_its_path_and_shares_the_siblings() {
        let mut t = TopicTree::new();
        for i in 0..10_000 {
            t.insert(&filter(&format!("hostile/{i}/+/x")), 1, 0);
        }
        let before = t.clone();
        t.insert(&filter("hostile/new/+/x"), 2, 0);
        let (old, new) = (
            before.root.children.get("hostile").unwrap(),
            t.root.children.get("hostile").unwrap(),
        );
        assert!(!Arc::ptr_eq(old, new), "the path is copied");
        assert_eq!(new.children.len(), old.children.len() + 1);
        // Every sibling is the same node in both snapshots: none was copied.
        assert!(old
            .children
            .iter()
            .all(|(level, child)| Arc::ptr_eq(child, new.children.get(level).unwrap())));
        assert_eq!(matches(&before, "hostile/new/y/x"), Vec::<String>::new());
        assert_eq!(matches(&t, "hostile/new/y/x"), ["2:0"]);
    }

    #[test]
    fn a_small_map_becomes_a_hash_map_and_back() {
        let mut m = SmallMap::default();
        for i in 0..20u32 {
            assert_eq!(m.insert(i, i), None);
            assert_eq!(matches!(m, SmallMap::Few(_)), i < FEW as u32, "after {i}");
        }
        assert_eq!(m.insert(3, 33), Some(3));
        assert_eq!(m.len(), 20);
        let mut seen: Vec<u32> = m.iter().map(|(k, _)| *k).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
        for i in 0..20u32 {
            assert_eq!(m.get(&i), Some(&if i == 3 { 33 } else { i }));
        }
        for i in 0..20u32 {
            assert_eq!(m.remove(&i), Some(if i == 3 { 33 } else { i }));
            assert_eq!(m.remove(&i), None);
            assert_eq!(m.get(&i), None);
            let left = 19 - i as usize;
            assert_eq!(m.len(), left);
            if left <= FEW / 2 {
                assert!(matches!(m, SmallMap::Few(_)), "{left} left");
            }
        }
        assert!(m.is_empty());
    }

    #[test]
    fn many_subscribers_of_one_filter_and_many_siblings() {
        let mut t = TopicTree::new();
        for k in 0..50u32 {
            t.insert(&filter("many/+"), k, 1);
            t.insert(&filter(&format!("many/{k}")), k, 2);
        }
        let snapshot = t.clone();
        assert_eq!(matches(&t, "many/7").len(), 51);
        for k in 0..50u32 {
            assert_eq!(t.remove(&filter("many/+"), &k), Some(1));
            assert_eq!(t.remove(&filter(&format!("many/{k}")), &k), Some(2));
            assert_eq!(t.len(), 2 * (49 - k as usize));
        }
        assert!(t.root.is_empty());
        assert_eq!(matches(&snapshot, "many/49").len(), 51);
    }

    #[test]
    fn shared_groups_round_robin() {
        let mut t = TopicTree::new();
        t.insert(&filter("$share/g/s/+"), 1, 0);
        t.insert(&filter("$share/g/s/+"), 2, 0);
        t.insert(&filter("$share/h/s/+"), 3, 0);
        t.insert(&filter("s/+"), 4, 0);
        assert_eq!(matches(&t, "s/x"), ["4:0", "g[1,2]", "h[3]"]);
        let mut picked = Vec::new();
        for _ in 0..4 {
            t.for_each_match(&topic("s/x"), |m| {
                if let Match::Shared {
                    group: "g",
                    members,
                } = m
                {
                    picked.push(*members.pick(|_, _| true).unwrap().0);
                }
            });
        }
        assert_eq!(picked, [1, 2, 1, 2]);
        // Skipping an unavailable member falls through to the next one.
        t.for_each_match(&topic("s/x"), |m| {
            if let Match::Shared {
                group: "g",
                members,
            } = m
            {
                assert_eq!(members.pick(|k, _| *k != 1).map(|(k, _)| *k), Some(2));
            }
        });
        assert_eq!(t.remove(&filter("$share/g/s/+"), &1), Some(0));
        assert_eq!(matches(&t, "s/x"), ["4:0", "g[2]", "h[3]"]);
    }
}
