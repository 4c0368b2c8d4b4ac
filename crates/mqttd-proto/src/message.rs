//! Application messages as they travel between connections, apart from any one wire packet.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::packet::{Publish, PublishProperties, UserProperty, Will};
use crate::types::{MqttStr, QoS, TopicFilter, TopicName};

/// An application message: what a publisher sent, independent of the hop it travels on.
///
/// The broker shares one `Arc<Message>` between every subscriber it is routed to, so the payload
/// is held once however many sessions queue it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic the message was published to.
    pub topic: TopicName,
    /// Payload.
    pub payload: Bytes,
    /// QoS the message was published with.
    pub qos: QoS,
    /// Whether it was published with RETAIN set.
    pub retain: bool,
    /// Properties that travel end to end.
    pub properties: MessageProperties,
    /// When the message expires, from its message expiry interval.
    pub expires_at: Option<Instant>,
}

/// The properties of a message that are forwarded unchanged from publisher to subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct MessageProperties {
    pub payload_format_indicator: Option<bool>,
    pub content_type: Option<MqttStr>,
    pub response_topic: Option<TopicName>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<UserProperty>,
}

impl Message {
    /// A message with no properties and no expiry.
    pub fn new(topic: TopicName, payload: impl Into<Bytes>, qos: QoS, retain: bool) -> Self {
        Self {
            topic,
            payload: payload.into(),
            qos,
            retain,
            properties: MessageProperties::default(),
            expires_at: None,
        }
    }

    /// Takes the message out of a received PUBLISH whose topic has already been resolved.
    pub(crate) fn from_publish(publish: Publish, now: Instant) -> Self {
        let p = publish.properties;
        let properties = MessageProperties {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
        };
        Self {
            properties,
            expires_at: expiry(now, p.message_expiry_interval),
            ..Self::new(publish.topic, publish.payload, publish.qos, publish.retain)
        }
    }

    /// The message a will turns into when it is published at `now`.
    pub fn from_will(will: Will, now: Instant) -> Self {
        let p = will.properties;
        let properties = MessageProperties {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
        };
        Self {
            properties,
            expires_at: expiry(now, p.message_expiry_interval),
            ..Self::new(will.topic, will.payload, will.qos, will.retain)
        }
    }

    /// Whether the message has expired at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// The message expiry interval to send at `now`: what is left of the original, rounded up.
    /// `None` if the message never expires.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX)
        })
    }

    /// The PUBLISH properties carrying this message's end-to-end properties at `now`.
    pub(crate) fn publish_properties(
        &self,
        now: Instant,
        subscription_ids: &[NonZeroU32],
    ) -> PublishProperties {
        let p = &self.properties;
        PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: self.remaining_expiry(now),
            topic_alias: None,
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            subscription_identifiers: subscription_ids.to_vec(),
            content_type: p.content_type.clone(),
        }
    }

    /// Bytes this message holds, for queue accounting.
    pub fn weight(&self) -> usize {
        let p = &self.properties;
        self.topic.len()
            + self.payload.len()
            + p.content_type.as_ref().map_or(0, |s| s.len())
            + p.response_topic.as_ref().map_or(0, |s| s.len())
            + p.correlation_data.as_ref().map_or(0, Bytes::len)
            + p.user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// When a message with a message expiry interval of `secs` received at `now` expires.
fn expiry(now: Instant, secs: Option<u32>) -> Option<Instant> {
    secs.map(|s| now + Duration::from_secs(s.into()))
}

/// A message on its way to one session: the shared message plus what this subscriber's
/// subscription made of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The shared message.
    pub message: Arc<Message>,
    /// QoS for this hop: the lower of the publication's and the subscription's.
    pub qos: QoS,
    /// RETAIN flag for this hop.
    pub retain: bool,
    /// Identifiers of the matching subscriptions.
    pub subscription_ids: Vec<NonZeroU32>,
    /// The shared subscription (`$share/...`) this session was chosen from, if any: when the
    /// session ends before acknowledging the message, the broker gives it to another member.
    pub shared: Option<TopicFilter>,
    /// Where the broker's durable store keeps this delivery: its sequence number among the
    /// stored messages, or `None` if it is not stored. The state machines only carry it, so
    /// that every step of the delivery's flow can name its stored record.
    pub store_seq: Option<u64>,
}

impl Delivery {
    /// A delivery of `message` at its own QoS and retain flag, as a client publishes.
    pub fn new(message: Arc<Message>) -> Self {
        Self {
            qos: message.qos,
            retain: message.retain,
            message,
            subscription_ids: Vec::new(),
            shared: None,
            store_seq: None,
        }
    }
}
