//! Topic aliases, which live per stream of a connection (one table each way per stream) and are
//! never persisted [MQTT-3.3.2-7].

use crate::sparse::SparseMap;
use std::num::NonZeroU16;

use crate::types::{StreamId, TopicName};

/// Why an incoming topic alias was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AliasError {
    /// The alias is above the maximum this side announced [MQTT-3.3.2-9].
    #[error("topic alias {alias} exceeds the maximum {max}")]
    OutOfRange {
        /// The alias received.
        alias: u16,
        /// The maximum announced.
        max: u16,
    },
    /// An empty topic names an alias that was never set on this connection.
    #[error("topic alias {0} used before it was set")]
    Unknown(u16),
}

/// One alias table per stream of a connection: the control stream's held inline (all a
/// one-stream connection ever uses), a data stream's made when the stream first needs it and
/// dropped when the stream is lost.
#[derive(Debug, Clone)]
pub(crate) struct PerStream<T> {
    max: u16,
    make: fn(u16) -> T,
    control: T,
    data: SparseMap<StreamId, T>,
}

impl<T> PerStream<T> {
    /// Tables of up to `max` aliases, each made by `make(max)`.
    pub(crate) fn new(max: u16, make: fn(u16) -> T) -> Self {
        Self {
            max,
            make,
            control: make(max),
            data: SparseMap::new(),
        }
    }

    /// The table of `stream`, if it has one yet.
    pub(crate) fn get(&self, stream: StreamId) -> Option<&T> {
        if stream.is_control() {
            Some(&self.control)
        } else {
            self.data.get(&stream)
        }
    }

    /// The table of `stream`, made empty if it has none yet.
    pub(crate) fn get_mut(&mut self, stream: StreamId) -> &mut T {
        if stream.is_control() {
            return &mut self.control;
        }
        let (max, make) = (self.max, self.make);
        self.data.get_or_insert_with(stream, || make(max))
    }

    /// Gives back the memory of empty tables.
    pub(crate) fn release_if_empty(&mut self)
    where
        T: Release,
    {
        self.control.release_if_empty();
        for table in self.data.values_mut() {
            table.release_if_empty();
        }
        self.data.release_if_empty();
    }

    /// Whether no stream has a table with an alias in it: the tables are then what
    /// [`Self::new`] makes, and may be made again.
    pub(crate) fn is_unused(&self) -> bool
    where
        T: Release,
    {
        self.control.is_unused() && self.data.is_empty()
    }

    /// Forgets the table of a lost data stream.
    pub(crate) fn remove(&mut self, stream: StreamId) {
        if !stream.is_control() {
            self.data.remove(&stream);
        }
    }
}

/// An alias table that can give back its memory while it is empty.
pub(crate) trait Release {
    /// Frees what the table holds if it holds no alias.
    fn release_if_empty(&mut self);
    /// Whether the table holds no alias.
    fn is_unused(&self) -> bool;
}

impl Release for InboundAliases {
    fn release_if_empty(&mut self) {
        self.topics.release_if_empty();
    }

    fn is_unused(&self) -> bool {
        self.topics.is_empty()
    }
}

impl Release for OutboundAliases {
    fn release_if_empty(&mut self) {
        self.by_topic.release_if_empty();
        if self.by_alias.is_empty() {
            self.by_alias = Vec::new();
        }
    }

    fn is_unused(&self) -> bool {
        self.by_topic.is_empty() && self.by_alias.is_empty()
    }
}

/// Aliases the peer assigned for the topics it sends us.
#[derive(Debug, Clone, Default)]
pub(crate) struct InboundAliases {
    max: u16,
    topics: SparseMap<u16, TopicName>,
}

impl InboundAliases {
    pub(crate) fn new(max: u16) -> Self {
        Self {
            max,
            topics: SparseMap::new(),
        }
    }

    /// Resolves a PUBLISH's topic: sets the alias when a topic comes with it, looks it up when
    /// the topic is empty.
    pub(crate) fn resolve(
        &mut self,
        topic: TopicName,
        alias: Option<NonZeroU16>,
    ) -> Result<TopicName, AliasError> {
        let Some(alias) = alias else {
            return Ok(topic);
        };
        let alias = alias.get();
        if alias > self.max {
            return Err(AliasError::OutOfRange {
                alias,
                max: self.max,
            });
        }
        if topic.is_empty() {
            return self
                .topics
                .get(&alias)
                .cloned()
                .ok_or(AliasError::Unknown(alias));
        }
        self.topics.insert(alias, topic.clone());
        Ok(topic)
    }
}

/// Aliases this side assigns for the topics it sends, up to the peer's maximum.
///
/// Aliases are handed out to topics in the order they are first sent; once all are used, the
/// alias assigned longest ago is reassigned, so a set of hot topics up to the maximum keeps its
/// aliases for good.
#[derive(Debug, Clone, Default)]
pub(crate) struct OutboundAliases {
    max: u16,
    by_topic: SparseMap<TopicName, NonZeroU16>,
    /// Topic of each alias, indexed by alias - 1.
    by_alias: Vec<TopicName>,
    next_victim: usize,
}

/// How to send a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AliasUse {
    /// No alias: send the topic.
    None,
    /// Send the topic and set this alias for it.
    Set(NonZeroU16),
    /// Send an empty topic and this alias.
    Use(NonZeroU16),
}

impl OutboundAliases {
    pub(crate) fn new(max: u16) -> Self {
        Self {
            max,
            ..Self::default()
        }
    }

    /// What [`Self::lookup`] would answer for `topic`, without assigning anything.
    pub(crate) fn peek(&self, topic: &TopicName) -> AliasUse {
        if self.max == 0 {
            return AliasUse::None;
        }
        if let Some(alias) = self.by_topic.get(topic) {
            return AliasUse::Use(*alias);
        }
        let index = if self.by_alias.len() < usize::from(self.max) {
            self.by_alias.len()
        } else {
            self.next_victim
        };
        u16::try_from(index + 1)
            .ok()
            .and_then(NonZeroU16::new)
            .map_or(AliasUse::None, AliasUse::Set)
    }

    pub(crate) fn lookup(&mut self, topic: &TopicName) -> AliasUse {
        if self.max == 0 {
            return AliasUse::None;
        }
        if let Some(alias) = self.by_topic.get(topic) {
            return AliasUse::Use(*alias);
        }
        let index = if self.by_alias.len() < usize::from(self.max) {
            self.by_alias.push(topic.clone());
            self.by_alias.len() - 1
        } else {
            let index = self.next_victim;
            self.next_victim = (self.next_victim + 1) % usize::from(self.max);
            if let Some(old) = self.by_alias.get_mut(index) {
                let old = std::mem::replace(old, topic.clone());
                self.by_topic.remove(&old);
            }
            index
        };
        let Some(alias) = u16::try_from(index + 1).ok().and_then(NonZeroU16::new) else {
            return AliasUse::None;
        };
        self.by_topic.insert(topic.clone(), alias);
        AliasUse::Set(alias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TopicName {
        TopicName::try_from(s).unwrap()
    }

    #[test]
    fn outbound_assigns_then_reuses_then_recycles() {
        let mut a = OutboundAliases::new(2);
        let one = NonZeroU16::new(1).unwrap();
        let two = NonZeroU16::new(2).unwrap();
        let mut check = |topic: &str| {
            let peeked = a.peek(&t(topic));
            let used = a.lookup(&t(topic));
            assert_eq!(peeked, used, "{topic}");
            used
        };
        for topic in ["a", "a", "b", "c", "a", "c", "b"] {
            check(topic);
        }
        let mut a = OutboundAliases::new(2);
        assert_eq!(a.lookup(&t("a")), AliasUse::Set(one));
        assert_eq!(a.lookup(&t("a")), AliasUse::Use(one));
        assert_eq!(a.lookup(&t("b")), AliasUse::Set(two));
        assert_eq!(a.lookup(&t("c")), AliasUse::Set(one));
        assert_eq!(a.lookup(&t("a")), AliasUse::Set(two));
        assert_eq!(a.lookup(&t("c")), AliasUse::Use(one));
        assert_eq!(OutboundAliases::new(0).lookup(&t("a")), AliasUse::None);
    }

    #[test]
    fn inbound_sets_resolves_and_bounds() {
        let mut a = InboundAliases::new(3);
        let alias = NonZeroU16::new(3);
        assert_eq!(
            a.resolve(TopicName::empty(), alias),
            Err(AliasError::Unknown(3))
        );
        assert_eq!(a.resolve(t("x"), alias).unwrap(), t("x"));
        assert_eq!(a.resolve(TopicName::empty(), alias).unwrap(), t("x"));
        assert_eq!(
            a.resolve(t("y"), NonZeroU16::new(4)),
            Err(AliasError::OutOfRange { alias: 4, max: 3 })
        );
    }
}
