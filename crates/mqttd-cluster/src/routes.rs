//! The cluster's route table, sans-IO: which nodes hold subscribers for which topic filters.
//!
//! Routes of clean sessions are not replicated by Raft. Each node owns its routes: the filters
//! its local subscribers hold, counted, so that a filter is announced ([`RouteOp::Add`]) when its
//! first local subscriber appears and withdrawn ([`RouteOp::Remove`]) when its last one goes.
//! A node streams its changes to its peers as [`RouteDelta`]s tagged (node, incarnation,
//! sequence); a peer applies them in order and asks for a [`RouteSnapshot`] (a full resync)
//! when it sees a gap or a new incarnation, like EMQX's route table (a merge table of what each
//! node announces). A new incarnation of a node drops everything of its previous life.
//!
//! Shared subscriptions `$share/{group}/{filter}` are routes of `filter` tagged with `group`,
//! so that a publisher's node can pick one node per group (see [`RouteTable::shared_for`]).
//!
//! Matching ([`RouteTable::nodes_for`]) walks a trie of filter levels, so that its cost grows
//! with the topic's depth and the wildcards on its path, not with the number of filters.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::state::NodeId;

/// One route: a topic filter, with the group of a shared subscription.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Route {
    /// The topic filter (without the `$share/{group}/` prefix).
    pub filter: String,
    /// The share group, for `$share/{group}/{filter}`.
    pub group: Option<String>,
}

impl Route {
    /// The route of a subscription's filter as the client sent it: `$share/g/f` is `f` in
    /// group `g`. A `$share/` filter without a group and a filter is taken as a plain one.
    pub fn parse(filter: &str) -> Self {
        if let Some(rest) = filter.strip_prefix("$share/") {
            if let Some((group, f)) = rest.split_once('/') {
                if !group.is_empty() && !f.is_empty() {
                    return Self {
                        filter: f.to_owned(),
                        group: Some(group.to_owned()),
                    };
                }
            }
        }
        Self {
            filter: filter.to_owned(),
            group: None,
        }
    }

    /// A stable 64-bit hash (FNV-1a) of the route, the same on every node and build.
    fn stable_hash(&self) -> u64 {
        let mut h = Fnv::new();
        if let Some(g) = &self.group {
            h.write(&[1]);
            h.write(g.as_bytes());
        }
        h.write(&[0]);
        h.write(self.filter.as_bytes());
        // FNV's low bits mix poorly; a final avalanche makes the sum below a fair digest.
        splitmix(h.0)
    }
}

/// FNV-1a, 64 bits: stable across builds, unlike std's hasher.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a delta does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteOp {
    /// The node has its first subscriber for the route.
    Add,
    /// The node's last subscriber for the route went.
    Remove,
}

/// One change of a node's routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDelta {
    /// The node whose routes changed.
    pub node: NodeId,
    /// Its life.
    pub incarnation: u64,
    /// 1 for the first change of a life, then one more per change.
    pub seq: u64,
    /// Added or removed.
    pub op: RouteOp,
    /// The route.
    pub route: Route,
}

/// All of a node's routes at one point of its life: `seq` is the last change they include.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSnapshot {
    /// The node.
    pub node: NodeId,
    /// Its life.
    pub incarnation: u64,
    /// The sequence of the last change included (0: none yet).
    pub seq: u64,
    /// Its routes.
    pub routes: Vec<Route>,
}

/// What became of a delta or snapshot from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Applied {
    /// It changed the table (or confirmed it).
    Applied,
    /// It was from an earlier life of the node, or already applied: ignored.
    Stale,
    /// It does not follow what this node holds (a gap, or a new life of the node): ignored,
    /// and the peer should send a snapshot. Returned once until a snapshot comes.
    NeedResync,
    /// Already waiting for a snapshot: ignored.
    AwaitingSnapshot,
}

/// A digest of one node's routes: equal sets give equal digests on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct RouteDigest {
    /// How many routes.
    pub count: u64,
    /// The wrapping sum of the routes' stable hashes (order-independent, kept incrementally).
    pub sum: u64,
}

impl RouteDigest {
    fn add(&mut self, route: &Route) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(route.stable_hash());
    }

    fn remove(&mut self, route: &Route) {
        self.count = self.count.saturating_sub(1);
        self.sum = self.sum.wrapping_sub(route.stable_hash());
    }
}

/// What this node knows of a peer's routes.
#[derive(Debug, Default)]
struct RemoteNode {
    incarnation: u64,
    /// The sequence of the next delta expected.
    next_seq: u64,
    routes: BTreeSet<Route>,
    digest: RouteDigest,
    /// A resync was asked for; deltas are ignored until the snapshot.
    awaiting_snapshot: bool,
}

/// A trie of topic filters, one level per node: at a filter's last level, who holds it, by
/// share group. Holders are nodes for the route table and sessions for the index of
/// persistent subscriptions ([`crate::state`]).
#[derive(Debug, Clone)]
pub(crate) struct TrieNode<H> {
    children: HashMap<Box<str>, Self>,
    /// Share group (`None`: plain) -> who holds the filter ending here.
    holders: BTreeMap<Option<Box<str>>, BTreeSet<H>>,
}

impl<H> Default for TrieNode<H> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            holders: BTreeMap::new(),
        }
    }
}

impl<H: Ord + Clone> TrieNode<H> {
    pub(crate) fn is_empty(&self) -> bool {
        self.children.is_empty() && self.holders.is_empty()
    }

    pub(crate) fn insert(&mut self, route: &Route, holder: H) {
        let mut at = self;
        for level in route.filter.split('/') {
            at = at.children.entry(level.into()).or_default();
        }
        at.holders
            .entry(route.group.as_deref().map(Into::into))
            .or_default()
            .insert(holder);
    }

    pub(crate) fn remove(&mut self, route: &Route, holder: &H) {
        let levels: Vec<&str> = route.filter.split('/').collect();
        self.remove_at(&levels, route.group.as_deref(), holder);
    }

    /// Removes along the path, pruning levels left empty.
    fn remove_at(&mut self, levels: &[&str], group: Option<&str>, holder: &H) {
        match levels.split_first() {
            None => {
                let key: Option<Box<str>> = group.map(Into::into);
                if let Some(holders) = self.holders.get_mut(&key) {
                    holders.remove(holder);
                    if holders.is_empty() {
                        self.holders.remove(&key);
                    }
                }
            }
            Some((first, rest)) => {
                if let Some(child) = self.children.get_mut(*first) {
                    child.remove_at(rest, group, holder);
                    if child.is_empty() {
                        self.children.remove(*first);
                    }
                }
            }
        }
    }

    /// Every holder of every filter, in no particular order.
    #[cfg(test)]
    pub(crate) fn all(&self) -> Vec<H> {
        let mut out: Vec<H> = self.holders.values().flatten().cloned().collect();
        for child in self.children.values() {
            out.extend(child.all());
        }
        out
    }

    /// Calls `f` with the holders of every filter matching `topic`, by share group.
    pub(crate) fn each_match<'a>(
        &'a self,
        topic: &str,
        mut f: impl FnMut(Option<&'a str>, &'a BTreeSet<H>),
    ) {
        let levels: Vec<&str> = topic.split('/').collect();
        self.matches(&levels, true, &mut |holders| {
            for (group, held) in holders {
                f(group.as_deref(), held);
            }
        });
    }

    /// Calls `f` with the holders of every filter matching `levels`. `root` is true at the
    /// first level, where a `$` topic is not matched by `+` or `#`.
    fn matches<'a>(
        &'a self,
        levels: &[&str],
        root: bool,
        f: &mut impl FnMut(&'a BTreeMap<Option<Box<str>>, BTreeSet<H>>),
    ) {
        let dollar = root && levels.first().is_some_and(|l| l.starts_with('$'));
        if !dollar {
            // `#` matches this level and everything below, and the parent level itself.
            if let Some(hash) = self.children.get("#") {
                f(&hash.holders);
            }
        }
        match levels.split_first() {
            None => f(&self.holders),
            Some((first, rest)) => {
                if let Some(child) = self.children.get(*first) {
                    child.matches(rest, false, f);
                }
                if !dollar {
                    if let Some(plus) = self.children.get("+") {
                        plus.matches(rest, false, f);
                    }
                }
            }
        }
    }
}

/// The cluster's routes as one node sees them: its own (counted) and each peer's.
#[derive(Debug)]
pub struct RouteTable {
    id: NodeId,
    incarnation: u64,
    /// The last sequence this node gave a change of its own.
    seq: u64,
    local: HashMap<Route, usize>,
    local_digest: RouteDigest,
    remotes: BTreeMap<NodeId, RemoteNode>,
    trie: TrieNode<NodeId>,
}

impl RouteTable {
    /// The table of node `id` in its life `incarnation`, with no routes.
    pub fn new(id: NodeId, incarnation: u64) -> Self {
        Self {
            id,
            incarnation,
            seq: 0,
            local: HashMap::new(),
            local_digest: RouteDigest::default(),
            remotes: BTreeMap::new(),
            trie: TrieNode::default(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// A local subscriber took `filter` (as the client sent it, `$share/..` included). Returns
    /// the delta to stream to peers if it is the filter's first local subscriber.
    pub fn subscribe(&mut self, filter: &str) -> Option<RouteDelta> {
        let route = Route::parse(filter);
        let count = self.local.entry(route.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            return None;
        }
        self.trie.insert(&route, self.id);
        self.local_digest.add(&route);
        Some(self.delta(RouteOp::Add, route))
    }

    /// A local subscriber dropped `filter`. Returns the delta to stream to peers if it was the
    /// filter's last local subscriber; an unknown filter changes nothing.
    pub fn unsubscribe(&mut self, filter: &str) -> Option<RouteDelta> {
        let route = Route::parse(filter);
        let count = self.local.get_mut(&route)?;
        *count -= 1;
        if *count > 0 {
            return None;
        }
        self.local.remove(&route);
        self.trie.remove(&route, &self.id);
        self.local_digest.remove(&route);
        Some(self.delta(RouteOp::Remove, route))
    }

    fn delta(&mut self, op: RouteOp, route: Route) -> RouteDelta {
        self.seq += 1;
        RouteDelta {
            node: self.id,
            incarnation: self.incarnation,
            seq: self.seq,
            op,
            route,
        }
    }

    /// This node's routes as of its last change, for a peer that resyncs.
    pub fn snapshot(&self) -> RouteSnapshot {
        let mut routes: Vec<Route> = self.local.keys().cloned().collect();
        routes.sort();
        RouteSnapshot {
            node: self.id,
            incarnation: self.incarnation,
            seq: self.seq,
            routes,
        }
    }

    /// Applies a peer's delta. A delta of a new life of the node drops its previous life's
    /// routes at once and asks for a snapshot.
    pub fn apply_delta(&mut self, delta: &RouteDelta) -> Applied {
        if delta.node == self.id {
            return Applied::Stale;
        }
        let remote = self.remotes.entry(delta.node).or_default();
        if delta.incarnation < remote.incarnation {
            return Applied::Stale;
        }
        if delta.incarnation > remote.incarnation {
            let old = std::mem::take(remote);
            for route in &old.routes {
                self.trie.remove(route, &delta.node);
            }
            let remote = self.remotes.entry(delta.node).or_default();
            remote.incarnation = delta.incarnation;
            remote.awaiting_snapshot = true;
            return Applied::NeedResync;
        }
        if remote.awaiting_snapshot {
            return Applied::AwaitingSnapshot;
        }
        if delta.seq < remote.next_seq {
            return Applied::Stale;
        }
        if delta.seq > remote.next_seq {
            remote.awaiting_snapshot = true;
            return Applied::NeedResync;
        }
        remote.next_seq += 1;
        match delta.op {
            RouteOp::Add => {
                if remote.routes.insert(delta.route.clone()) {
                    remote.digest.add(&delta.route);
                    self.trie.insert(&delta.route, delta.node);
                }
            }
            RouteOp::Remove => {
                if remote.routes.remove(&delta.route) {
                    remote.digest.remove(&delta.route);
                    self.trie.remove(&delta.route, &delta.node);
                }
            }
        }
        Applied::Applied
    }

    /// Replaces what this node holds of a peer's routes with its snapshot (unless the
    /// snapshot is of an earlier life, or older than what is held).
    pub fn apply_snapshot(&mut self, snapshot: &RouteSnapshot) -> Applied {
        if snapshot.node == self.id {
            return Applied::Stale;
        }
        let remote = self.remotes.entry(snapshot.node).or_default();
        let same_life = snapshot.incarnation == remote.incarnation;
        if snapshot.incarnation < remote.incarnation
            || (same_life
                && !remote.awaiting_snapshot
                && snapshot.seq.saturating_add(1) < remote.next_seq)
        {
            return Applied::Stale;
        }
        let old = std::mem::take(remote);
        for route in &old.routes {
            self.trie.remove(route, &snapshot.node);
        }
        let mut fresh = RemoteNode {
            incarnation: snapshot.incarnation,
            next_seq: snapshot.seq.saturating_add(1),
            ..RemoteNode::default()
        };
        for route in &snapshot.routes {
            if fresh.routes.insert(route.clone()) {
                fresh.digest.add(route);
                self.trie.insert(route, snapshot.node);
            }
        }
        self.remotes.insert(snapshot.node, fresh);
        Applied::Applied
    }

    /// Forgets a peer entirely (it left the cluster).
    pub fn forget(&mut self, node: NodeId) {
        if let Some(old) = self.remotes.remove(&node) {
            for route in &old.routes {
                self.trie.remove(route, &node);
            }
        }
    }

    /// The peers holding a plain (not shared) subscription matching `topic`; never this node.
    pub fn nodes_for(&self, topic: &str) -> BTreeSet<NodeId> {
        let mut nodes = BTreeSet::new();
        self.each_match(topic, |group, holders| {
            if group.is_none() {
                nodes.extend(holders.iter().copied().filter(|n| *n != self.id));
            }
        });
        nodes
    }

    /// The share groups with a member matching `topic`, and the nodes (this one included)
    /// holding members of each.
    pub fn shared_for(&self, topic: &str) -> BTreeMap<String, BTreeSet<NodeId>> {
        let mut groups: BTreeMap<String, BTreeSet<NodeId>> = BTreeMap::new();
        self.each_match(topic, |group, holders| {
            if let Some(g) = group {
                groups
                    .entry(g.to_owned())
                    .or_default()
                    .extend(holders.iter().copied());
            }
        });
        groups
    }

    fn each_match(&self, topic: &str, f: impl FnMut(Option<&str>, &BTreeSet<NodeId>)) {
        self.trie.each_match(topic, f);
    }

    /// The digest of `node`'s routes as this node holds them (its own for `self.id()`).
    pub fn digest(&self, node: NodeId) -> RouteDigest {
        if node == self.id {
            return self.local_digest;
        }
        self.remotes
            .get(&node)
            .map(|r| r.digest)
            .unwrap_or_default()
    }

    /// The digests of every node this table knows, this one included.
    pub fn digests(&self) -> BTreeMap<NodeId, RouteDigest> {
        let mut all: BTreeMap<NodeId, RouteDigest> =
            self.remotes.iter().map(|(id, r)| (*id, r.digest)).collect();
        all.insert(self.id, self.local_digest);
        all
    }

    /// How many routes `node` has as this node knows them.
    pub fn route_count(&self, node: NodeId) -> usize {
        if node == self.id {
            return self.local.len();
        }
        self.remotes.get(&node).map_or(0, |r| r.routes.len())
    }

    /// The routes of `node` as this node holds them, sorted.
    pub fn routes_of(&self, node: NodeId) -> Vec<Route> {
        if node == self.id {
            return self.snapshot().routes;
        }
        self.remotes
            .get(&node)
            .map(|r| r.routes.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The incarnation of `node` this table holds routes of.
    pub fn incarnation_of(&self, node: NodeId) -> Option<u64> {
        if node == self.id {
            return Some(self.incarnation);
        }
        self.remotes.get(&node).map(|r| r.incarnation)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(nodes: &[NodeId]) -> BTreeSet<NodeId> {
        nodes.iter().copied().collect()
    }

    /// A table of node 1 that learned node 2's routes from `filters`.
    fn with_remote(filters: &[&str]) -> RouteTable {
        let mut sender = RouteTable::new(2, 1);
        let mut table = RouteTable::new(1, 1);
        assert_eq!(table.apply_snapshot(&sender.snapshot()), Applied::Applied);
        for f in filters {
            let d = sender.subscribe(f).unwrap();
            assert_eq!(table.apply_delta(&d), Applied::Applied);
        }
        table
    }

    #[test]
    fn local_refcounts_announce_once_and_withdraw_at_the_last() {
        let mut t = RouteTable::new(1, 7);
        let d = t.subscribe("a/+").unwrap();
        assert_eq!(
            (d.node, d.incarnation, d.seq, d.op),
            (1, 7, 1, RouteOp::Add)
        );
        assert!(t.subscribe("a/+").is_none());
        assert!(t.unsubscribe("a/+").is_none());
        let d = t.unsubscribe("a/+").unwrap();
        assert_eq!((d.seq, d.op), (2, RouteOp::Remove));
        assert!(t.unsubscribe("a/+").is_none(), "unknown filter");
        assert_eq!(t.route_count(1), 0);
        assert_eq!(t.digest(1), RouteDigest::default());
    }

    #[test]
    fn wildcards_match_as_mqtt_says() {
        let t = with_remote(&["a/b", "a/+", "a/#", "#", "+/+", "+", "$SYS/#", "a/+/c"]);
        let count = |topic: &str| {
            let mut n = 0;
            t.each_match(topic, |_, _| n += 1);
            n
        };
        // a/b: a/b, a/+, a/#, #, +/+
        assert_eq!(count("a/b"), 5);
        // a: a/# (parent level), #, +
        assert_eq!(count("a"), 3);
        // a/x/c: a/#, #, a/+/c
        assert_eq!(count("a/x/c"), 3);
        // $SYS/x: only $SYS/#, not # nor +/+
        assert_eq!(count("$SYS/x"), 1);
        assert_eq!(t.nodes_for("a/b"), set(&[2]));
        assert_eq!(t.nodes_for("$SYS/x"), set(&[2]));
        assert_eq!(with_remote(&["a/b"]).nodes_for("a/c"), set(&[]));
        assert_eq!(with_remote(&["+/#"]).nodes_for("$x/y"), set(&[]));
        assert_eq!(with_remote(&["+/#"]).nodes_for("x/y"), set(&[2]));
        assert_eq!(with_remote(&["/+"]).nodes_for("/x"), set(&[2]));
        assert_eq!(with_remote(&["a//b"]).nodes_for("a//b"), set(&[2]));
    }

    #[test]
    fn own_routes_are_not_targets_and_shared_ones_are_grouped() {
        let mut t = with_remote(&["$share/g/a/+", "a/b"]);
        let _ = t.subscribe("$share/g/a/#");
        let _ = t.subscribe("a/b");
        assert_eq!(t.nodes_for("a/b"), set(&[2]));
        let shared = t.shared_for("a/b");
        assert_eq!(shared.len(), 1);
        assert_eq!(shared["g"], set(&[1, 2]));
        assert_eq!(
            Route::parse("$share/g/a/b"),
            Route {
                filter: "a/b".into(),
                group: Some("g".into())
            }
        );
        assert_eq!(Route::parse("$share/g").group, None);
    }

    #[test]
    fn a_gap_asks_for_a_snapshot_once_and_the_snapshot_heals() {
        let mut sender = RouteTable::new(2, 1);
        let mut t = RouteTable::new(1, 1);
        let d1 = sender.subscribe("a").unwrap();
        // First contact: the receiver knows nothing of node 2's life yet.
        assert_eq!(t.apply_delta(&d1), Applied::NeedResync);
        let mut sender = RouteTable::new(2, 1);
        assert_eq!(t.apply_snapshot(&sender.snapshot()), Applied::Applied);
        let d1 = sender.subscribe("a").unwrap();
        let _lost = sender.subscribe("b").unwrap();
        let d3 = sender.subscribe("c").unwrap();
        assert_eq!(t.apply_delta(&d1), Applied::Applied);
        assert_eq!(t.apply_delta(&d1), Applied::Stale);
        assert_eq!(t.apply_delta(&d3), Applied::NeedResync);
        assert_eq!(t.apply_delta(&d3), Applied::AwaitingSnapshot);
        assert_eq!(t.apply_snapshot(&sender.snapshot()), Applied::Applied);
        assert_eq!(t.routes_of(2), sender.routes_of(2));
        assert_eq!(t.digest(2), sender.digest(2));
        let d4 = sender.unsubscribe("a").unwrap();
        assert_eq!(t.apply_delta(&d4), Applied::Applied);
        assert_eq!(t.nodes_for("a"), set(&[]));
        assert_eq!(t.nodes_for("b"), set(&[2]));
    }

    #[test]
    fn a_new_incarnation_drops_the_old_life_at_once() {
        let mut t = with_remote(&["a", "b"]);
        let mut reborn = RouteTable::new(2, 2);
        let d = reborn.subscribe("c").unwrap();
        assert_eq!(t.apply_delta(&d), Applied::NeedResync);
        assert_eq!(t.route_count(2), 0);
        assert_eq!(t.nodes_for("a"), set(&[]));
        // Late news of the old life changes nothing.
        let mut old = RouteTable::new(2, 1);
        let _ = old.subscribe("x");
        assert_eq!(t.apply_snapshot(&old.snapshot()), Applied::Stale);
        assert_eq!(t.apply_snapshot(&reborn.snapshot()), Applied::Applied);
        assert_eq!(t.nodes_for("c"), set(&[2]));
        assert_eq!(t.incarnation_of(2), Some(2));
        t.forget(2);
        assert_eq!(t.nodes_for("c"), set(&[]));
        assert!(t.trie.is_empty(), "the trie is pruned");
    }

    #[derive(Debug, Clone)]
    enum Step {
        Sub(u8),
        Unsub(u8),
        /// The sender restarts: a new incarnation, no routes.
        Restart,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..12).prop_map(Step::Sub),
            3 => (0u8..12).prop_map(Step::Unsub),
            1 => Just(Step::Restart),
        ]
    }

    const FILTERS: [&str; 12] = [
        "a",
        "a/b",
        "a/+",
        "a/#",
        "#",
        "+/b",
        "$SYS/#",
        "$share/g/a/b",
        "$share/h/#",
        "c/d/e",
        "c/+/e",
        "+",
    ];

    fn filter() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop::sample::select(vec!["a", "b", "$s", "", "+"]).prop_map(String::from),
            1..4,
        )
        .prop_flat_map(|levels| {
            prop_oneof![Just(false), Just(true)].prop_map(move |hash| {
                let mut levels = levels.clone();
                if hash {
                    levels.push("#".to_owned());
                }
                levels.join("/")
            })
        })
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop::sample::select(vec!["a", "b", "$s", ""]), 1..5)
            .prop_map(|l| l.join("/"))
    }

    /// MQTT matching, level by level (MQTT 5 section 4.7).
    /// Whether `filter` matches `topic`, level by level: the reference the tries are checked
    /// against.
    pub(crate) fn naive_match(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        if topic.starts_with('$') && (f[0] == "+" || f[0] == "#") {
            return false;
        }
        for (i, level) in f.iter().enumerate() {
            match *level {
                "#" => return true,
                "+" if i < t.len() => {}
                l if i < t.len() && t[i] == l => {}
                _ => return false,
            }
        }
        f.len() == t.len()
    }

    proptest! {
        /// Deltas delivered with losses, duplicates and reorders: whenever the receiver asks,
        /// the sender's snapshot heals it, and at the end (a final resync if asked) the
        /// receiver's view equals the sender's, matching included.
        #[test]
        fn after_resync_the_receiver_agrees(
            steps in proptest::collection::vec(step(), 1..80),
            faults in proptest::collection::vec(0u8..10, 80),
        ) {
            let mut incarnation = 1;
            let mut sender = RouteTable::new(2, incarnation);
            let mut receiver = RouteTable::new(1, 1);
            let mut held: Vec<RouteDelta> = Vec::new();
            let mut resync = true;
            for (step, fault) in steps.iter().zip(faults.iter().cycle()) {
                let delta = match step {
                    Step::Sub(i) => sender.subscribe(FILTERS[usize::from(*i)]),
                    Step::Unsub(i) => sender.unsubscribe(FILTERS[usize::from(*i)]),
                    Step::Restart => {
                        incarnation += 1;
                        sender = RouteTable::new(2, incarnation);
                        None
                    }
                };
                let Some(delta) = delta else { continue };
                let mut deliver = Vec::new();
                match fault {
                    0 => {}                              // lost
                    1 => { held.push(delta); }           // delayed
                    2 => { deliver.push(delta.clone()); deliver.push(delta); } // duplicated
                    3 => { deliver.push(delta); deliver.append(&mut held); } // reordered
                    _ => deliver.push(delta),
                }
                for d in deliver {
                    match receiver.apply_delta(&d) {
                        Applied::NeedResync => resync = true,
                        Applied::Applied | Applied::Stale | Applied::AwaitingSnapshot => {}
                    }
                }
                if resync && fault % 3 == 0 {
                    prop_assert_eq!(receiver.apply_snapshot(&sender.snapshot()), Applied::Applied);
                    resync = false;
                }
            }
            // The link's end: the receiver asked, or the sender knows deltas were lost.
            prop_assert_eq!(receiver.apply_snapshot(&sender.snapshot()), Applied::Applied);
            prop_assert_eq!(receiver.routes_of(2), sender.routes_of(2));
            prop_assert_eq!(receiver.digest(2), sender.digest(2));
            for topic in ["a", "a/b", "x/b", "$SYS/x", "c/d/e", "c/x/e", "z"] {
                let expect: BTreeSet<NodeId> =
                    sender.snapshot().routes.iter().any(|r| r.group.is_none() && {
                        let mut t = RouteTable::new(9, 1);
                        let _ = t.apply_snapshot(&RouteSnapshot {
                            node: 2, incarnation: 1, seq: 0, routes: vec![r.clone()],
                        });
                        !t.nodes_for(topic).is_empty()
                    }).then_some(2).into_iter().collect();
                prop_assert_eq!(receiver.nodes_for(topic), expect);
            }
        }

        /// The trie matches as a plain MQTT matcher does, filter by filter, across nodes.
        #[test]
        fn the_trie_matches_like_a_linear_scan(
            routes in proptest::collection::vec((1u64..4, filter()), 0..30),
            removed in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
            topics in proptest::collection::vec(topic(), 1..20),
        ) {
            let mut senders: BTreeMap<NodeId, RouteTable> = BTreeMap::new();
            let mut table = RouteTable::new(9, 1);
            for node in 1..4 {
                let sender = RouteTable::new(node, 1);
                let _ = table.apply_snapshot(&sender.snapshot());
                senders.insert(node, sender);
            }
            let mut held: Vec<(NodeId, String)> = Vec::new();
            for (node, f) in &routes {
                if let Some(d) = senders.get_mut(node).unwrap().subscribe(f) {
                    prop_assert_eq!(table.apply_delta(&d), Applied::Applied);
                }
                held.push((*node, f.clone()));
            }
            for i in removed {
                if held.is_empty() {
                    break;
                }
                let (node, f) = held.remove(i.index(held.len()));
                if let Some(d) = senders.get_mut(&node).unwrap().unsubscribe(&f) {
                    prop_assert_eq!(table.apply_delta(&d), Applied::Applied);
                }
            }
            for t in &topics {
                let expect: BTreeSet<NodeId> = held
                    .iter()
                    .filter(|(_, f)| naive_match(f, t))
                    .map(|(n, _)| *n)
                    .collect();
                prop_assert_eq!(table.nodes_for(t), expect, "topic {}", t);
            }
        }

        /// Whatever the order of adds and removes, a delta stream applied in order gives the
        /// sender's set, and the digest only depends on the set.
        #[test]
        fn in_order_deltas_track_the_sender(ops in proptest::collection::vec((any::<bool>(), 0u8..12), 0..100)) {
            let mut sender = RouteTable::new(2, 1);
            let mut receiver = RouteTable::new(1, 1);
            prop_assert_eq!(receiver.apply_snapshot(&sender.snapshot()), Applied::Applied);
            for (add, i) in ops {
                let f = FILTERS[usize::from(i)];
                let d = if add { sender.subscribe(f) } else { sender.unsubscribe(f) };
                if let Some(d) = d {
                    prop_assert_eq!(receiver.apply_delta(&d), Applied::Applied);
                }
            }
            prop_assert_eq!(receiver.routes_of(2), sender.routes_of(2));
            let mut fresh = RouteTable::new(3, 1);
            let _ = fresh.apply_snapshot(&sender.snapshot());
            prop_assert_eq!(fresh.digest(2), receiver.digest(2));
        }
    }
}
