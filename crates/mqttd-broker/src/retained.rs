//! Retained messages, one per topic, in a persistent trie.
//!
//! Readers (a new subscription looking for retained messages) take a snapshot without locking;
//! writers (a PUBLISH with RETAIN set) are serialised among themselves and publish a new
//! snapshot. Routing of ordinary messages never touches this store.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use imbl::HashMap;
use parking_lot::Mutex;

use mqttd_proto::{Message, TopicFilter, TopicName};

#[derive(Debug, Clone, Default)]
struct Node {
    children: HashMap<Arc<str>, Arc<Self>>,
    message: Option<Arc<Message>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }
}

/// What the store holds, counted by its writers.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    messages: usize,
    /// Sum of [`Message::weight`]: topic, payload and properties.
    bytes: usize,
}

/// Why a retained message was not stored: the limit it would have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainRefused {
    /// `max_retained_messages`.
    Messages,
    /// `max_retained_bytes`.
    Bytes,
}

impl RetainRefused {
    /// The `limit` label of `mqttd_limit_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Messages => "retained_messages",
            Self::Bytes => "retained_bytes",
        }
    }
}

/// Bounds of the retained-message store; 0 for no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetainLimits {
    /// Most messages held.
    pub max_messages: usize,
    /// Most bytes ([`Message::weight`]) held.
    pub max_bytes: usize,
}

/// The retained-message store.
#[derive(Debug, Default)]
pub struct RetainedStore {
    root: ArcSwap<Node>,
    writer: Mutex<Totals>,
}

impl RetainedStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.writer.lock().messages
    }

    /// Bytes of the retained messages held ([`Message::weight`]).
    pub fn bytes(&self) -> usize {
        self.writer.lock().bytes
    }

    /// Whether no message is retained.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores `message` as the retained message of its topic; an empty payload deletes the
    /// topic's retained message [MQTT-3.3.1-6, MQTT-3.3.1-7].
    /// Never refused: for what the broker itself retains (`$SYS`) and what storage restores.
    pub fn set(&self, message: Arc<Message>) {
        let _ = self.set_within(message, RetainLimits::default());
    }

    /// As [`Self::set`], unless the store would then pass `limits` and hold more than it
    /// does now: a deletion, or a replacement no larger than the message it replaces, is
    /// always done, so that a store over its limits (lowered by a reload) can shrink.
    pub fn set_within(
        &self,
        message: Arc<Message>,
        limits: RetainLimits,
    ) -> Result<(), RetainRefused> {
        let mut totals = self.writer.lock();
        let root = self.root.load_full();
        let old = find(&root, &message.topic).map_or(0, |m| m.weight());
        let new = if message.payload.is_empty() {
            0
        } else {
            message.weight()
        };
        let bytes = (totals.bytes + new).saturating_sub(old);
        if new > 0 {
            let adds = find(&root, &message.topic).is_none();
            if adds && limits.max_messages > 0 && totals.messages >= limits.max_messages {
                return Err(RetainRefused::Messages);
            }
            if new > old && limits.max_bytes > 0 && bytes > limits.max_bytes {
                return Err(RetainRefused::Bytes);
            }
        }
        let levels: Vec<&str> = message.topic.levels().collect();
        let value = (new > 0).then(|| message.clone());
        let mut delta = 0isize;
        let new_root = set(&root, &levels, value, &mut delta).unwrap_or_default();
        self.root.store(Arc::new(new_root));
        totals.messages = totals.messages.saturating_add_signed(delta);
        totals.bytes = bytes;
        Ok(())
    }

    /// The retained message of exactly `topic`.
    pub fn get(&self, topic: &TopicName) -> Option<Arc<Message>> {
        find(&self.root.load(), topic).cloned()
    }

    /// Every retained message whose topic matches `filter` and has not expired at `now`.
    pub fn matching(&self, filter: &TopicFilter, now: Instant) -> Vec<Arc<Message>> {
        let root = self.root.load();
        let levels: Vec<&str> = filter.pattern().split('/').collect();
        let mut out = Vec::new();
        collect(&root, &levels, true, &mut out);
        out.retain(|m| !m.is_expired(now));
        out
    }

    /// The retained messages whose topics match `filter`, in the store as it is now, produced
    /// one at a time: later changes to the store do not affect it, and it holds no lock and
    /// copies nothing up front, so a subscription matching many messages can be served at
    /// the pace its client reads.
    pub fn cursor(&self, filter: &TopicFilter) -> RetainedCursor {
        RetainedCursor {
            levels: filter.pattern().split('/').map(Box::from).collect(),
            stack: vec![Step::Node {
                node: self.root.load_full(),
                at: Some(0),
            }],
        }
    }

    /// Every retained message, for persistence and administration.
    pub fn all(&self) -> Vec<Arc<Message>> {
        let root = self.root.load();
        let mut out = Vec::new();
        descendants(&root, &mut out);
        out
    }
}

type Children = <HashMap<Arc<str>, Arc<Node>> as IntoIterator>::IntoIter;

/// Work left in a [`RetainedCursor`]'s walk of the trie.
enum Step {
    /// A node reached by the first `at` levels of the filter, or, with `at` `None`, below a
    /// multi-level wildcard.
    Node { node: Arc<Node>, at: Option<usize> },
    /// The children of a node not yet visited; the first level of the topic skips names
    /// starting with '$' under a wildcard [MQTT-4.7.2-1].
    Children {
        children: Children,
        at: Option<usize>,
        skip_dollar: bool,
    },
}

/// The retained messages matching a filter in a snapshot of the store (see
/// [`RetainedStore::cursor`]). What it holds is the walk's path: a few trie nodes, not the
/// messages.
pub struct RetainedCursor {
    levels: Vec<Box<str>>,
    stack: Vec<Step>,
}

impl std::fmt::Debug for RetainedCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetainedCursor")
            .field("levels", &self.levels)
            .field("pending_steps", &self.stack.len())
            .finish()
    }
}

impl RetainedCursor {
    /// The next matching message that has not expired at `now`; `None` once all were given.
    pub fn next(&mut self, now: Instant) -> Option<Arc<Message>> {
        while let Some(step) = self.stack.pop() {
            let found = match step {
                Step::Children {
                    mut children,
                    at,
                    skip_dollar,
                } => {
                    let next = children.find(|(name, _)| !(skip_dollar && name.starts_with('$')));
                    if let Some((_, node)) = next {
                        self.stack.push(Step::Children {
                            children,
                            at,
                            skip_dollar,
                        });
                        self.stack.push(Step::Node { node, at });
                    }
                    None
                }
                Step::Node { node, at: None } => {
                    self.push_children(&node, None, false);
                    node.message.clone()
                }
                Step::Node { node, at: Some(i) } => {
                    let first = i == 0;
                    match self.levels.get(i).map(|l| &**l) {
                        None => node.message.clone(),
                        Some("#") => {
                            self.push_children(&node, None, first);
                            node.message.clone()
                        }
                        Some("+") => {
                            self.push_children(&node, Some(i + 1), first);
                            None
                        }
                        Some(exact) => {
                            if let Some(child) = node.children.get(exact) {
                                self.stack.push(Step::Node {
                                    node: child.clone(),
                                    at: Some(i + 1),
                                });
                            }
                            None
                        }
                    }
                }
            };
            if let Some(m) = found.filter(|m| !m.is_expired(now)) {
                return Some(m);
            }
        }
        None
    }

    fn push_children(&mut self, node: &Node, at: Option<usize>, skip_dollar: bool) {
        if !node.children.is_empty() {
            self.stack.push(Step::Children {
                children: node.children.clone().into_iter(),
                at,
                skip_dollar,
            });
        }
    }
}

/// The message retained under exactly `topic` in the trie at `root`.
fn find<'a>(root: &'a Node, topic: &TopicName) -> Option<&'a Arc<Message>> {
    let mut node = root;
    for level in topic.levels() {
        node = node.children.get(level)?;
    }
    node.message.as_ref()
}

/// Returns the new node, `None` if it became empty.
fn set(
    node: &Node,
    levels: &[&str],
    value: Option<Arc<Message>>,
    delta: &mut isize,
) -> Option<Node> {
    let mut node = node.clone();
    match levels.split_first() {
        None => {
            let had = node.message.is_some();
            node.message = value;
            *delta += isize::from(node.message.is_some()) - isize::from(had);
        }
        Some((first, rest)) => {
            let empty = Node::default();
            let child = node.children.get(*first).map_or(&empty, |c| &**c);
            match set(child, rest, value, delta) {
                Some(c) => node.children.insert(Arc::from(*first), Arc::new(c)),
                None => node.children.remove(*first),
            };
        }
    }
    Some(node).filter(|n| !n.is_empty())
}

fn descendants(node: &Node, out: &mut Vec<Arc<Message>>) {
    if let Some(m) = &node.message {
        out.push(m.clone());
    }
    for child in node.children.values() {
        descendants(child, out);
    }
}

fn collect(node: &Node, levels: &[&str], first: bool, out: &mut Vec<Arc<Message>>) {
    let Some((level, rest)) = levels.split_first() else {
        if let Some(m) = &node.message {
            out.push(m.clone());
        }
        return;
    };
    // A wildcard in the first level does not match topics starting with '$' [MQTT-4.7.2-1].
    let visible = |name: &str| !(first && name.starts_with('$'));
    match *level {
        "#" => {
            if let Some(m) = &node.message {
                out.push(m.clone());
            }
            for (name, child) in node.children.iter() {
                if visible(name) {
                    descendants(child, out);
                }
            }
        }
        "+" => {
            for (name, child) in node.children.iter() {
                if visible(name) {
                    collect(child, rest, false, out);
                }
            }
        }
        exact => {
            if let Some(child) = node.children.get(exact) {
                collect(child, rest, false, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqttd_proto::QoS;

    fn msg(topic: &str, payload: &str) -> Arc<Message> {
        Arc::new(Message::new(
            TopicName::try_from(topic).unwrap(),
            payload.as_bytes().to_vec(),
            QoS::AtMostOnce,
            true,
        ))
    }

    fn topics(store: &RetainedStore, filter: &str) -> Vec<String> {
        let f = TopicFilter::try_from(filter).unwrap();
        let mut t: Vec<_> = store
            .matching(&f, Instant::now())
            .iter()
            .map(|m| m.topic.to_string())
            .collect();
        t.sort();
        t
    }

    #[test]
    fn set_replace_delete_and_match() {
        let s = RetainedStore::new();
        for t in ["a", "a/b", "a/c", "a/b/c", "$SYS/x", "/x"] {
            s.set(msg(t, "1"));
        }
        assert_eq!(s.len(), 6);
        assert_eq!(topics(&s, "a/#"), ["a", "a/b", "a/b/c", "a/c"]);
        assert_eq!(topics(&s, "a/+"), ["a/b", "a/c"]);
        assert_eq!(topics(&s, "#"), ["/x", "a", "a/b", "a/b/c", "a/c"]);
        assert_eq!(topics(&s, "+/x"), ["/x"]);
        assert_eq!(topics(&s, "$SYS/#"), ["$SYS/x"]);
        s.set(msg("a/b", "2"));
        assert_eq!(s.len(), 6);
        assert_eq!(
            &s.get(&TopicName::try_from("a/b").unwrap()).unwrap().payload[..],
            b"2"
        );
        s.set(msg("a/b", ""));
        s.set(msg("nothing/here", ""));
        assert_eq!(s.len(), 5);
        assert_eq!(topics(&s, "a/+"), ["a/c"]);
        assert_eq!(topics(&s, "a/b/c"), ["a/b/c"]);
    }

    #[test]
    fn a_cursor_gives_what_matching_gives_from_its_snapshot() {
        let s = RetainedStore::new();
        for t in ["a", "a/b", "a/c", "a/b/c", "$SYS/x", "/x", "b/b"] {
            s.set(msg(t, "1"));
        }
        for filter in [
            "#", "a/#", "a/+", "+/x", "$SYS/#", "+/b", "a/b/c", "+/+/+", "none",
        ] {
            let f = TopicFilter::try_from(filter).unwrap();
            let mut cursor = s.cursor(&f);
            // Changes after the cursor was made do not show.
            s.set(msg("a/new", "1"));
            s.set(msg("a/new", ""));
            s.set(msg("b/b", ""));
            let mut got = Vec::new();
            while let Some(m) = cursor.next(Instant::now()) {
                got.push(m.topic.to_string());
            }
            s.set(msg("b/b", "1"));
            got.sort();
            assert_eq!(got, topics(&s, filter), "{filter}");
        }
    }

    #[test]
    fn limits_refuse_growth_but_not_deletion_or_replacement() {
        let s = RetainedStore::new();
        let limits = RetainLimits {
            max_messages: 2,
            max_bytes: 10,
        };
        // Weight: topic plus payload.
        assert_eq!(s.set_within(msg("a", "1234"), limits), Ok(()));
        assert_eq!(s.set_within(msg("b", "12"), limits), Ok(()));
        assert_eq!((s.len(), s.bytes()), (2, 8));
        assert_eq!(
            s.set_within(msg("c", "1"), limits),
            Err(RetainRefused::Messages)
        );
        assert_eq!(
            s.set_within(msg("b", "12345"), limits),
            Err(RetainRefused::Bytes)
        );
        assert_eq!(s.set_within(msg("b", "123"), limits), Ok(()));
        assert_eq!((s.len(), s.bytes()), (2, 9));
        assert_eq!(s.set_within(msg("a", ""), limits), Ok(()));
        assert_eq!((s.len(), s.bytes()), (1, 4));
        assert_eq!(s.set_within(msg("c", "1"), limits), Ok(()));
        // Over the limits (as after a reload lowering them): shrinking is still allowed.
        let tight = RetainLimits {
            max_messages: 1,
            max_bytes: 3,
        };
        assert_eq!(s.set_within(msg("b", "12"), tight), Ok(()));
        assert_eq!(s.set_within(msg("c", ""), tight), Ok(()));
        assert_eq!((s.len(), s.bytes()), (1, 3));
        s.set(msg("d", "1234567890"));
        assert_eq!((s.len(), s.bytes()), (2, 14));
    }

    #[test]
    fn expired_messages_are_not_returned() {
        let s = RetainedStore::new();
        let now = Instant::now();
        let mut m = (*msg("t", "x")).clone();
        m.expires_at = Some(now);
        s.set(Arc::new(m));
        assert!(s
            .matching(&TopicFilter::try_from("t").unwrap(), now)
            .is_empty());
    }
}
