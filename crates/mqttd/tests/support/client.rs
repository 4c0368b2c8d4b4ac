//! Steps with the async MQTT client of `mqttd-client`, whatever it runs over (TLS, QUIC).

use std::time::Duration;

use mqttd_client::{Client, Events};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::{ClientId, Message, MqttStr, QoS, ReasonCode, TopicFilter, TopicName};

use super::within;

/// How long any one step may take: only a hang takes this long.
const STEP: Duration = Duration::from_secs(30);

/// A client configuration with `client_id` and, if given, a user name.
pub(crate) fn mqtt_config(client_id: &str, username: Option<&str>) -> ClientConfig {
    let mut config = ClientConfig::new(ClientId::try_from(client_id).expect("client id"));
    config.username = username.map(|u| MqttStr::try_from(u).expect("user name"));
    config
}

pub(crate) fn topic(name: &str) -> TopicName {
    TopicName::try_from(name).expect("topic name")
}

pub(crate) fn filter(name: &str) -> TopicFilter {
    TopicFilter::try_from(name).expect("topic filter")
}

/// Publishes at QoS 1 and returns the broker's PUBACK reason.
pub(crate) async fn publish_acked(
    client: &Client,
    events: &mut Events,
    to: &str,
    payload: &str,
) -> ReasonCode {
    message_acked(client, events, to, payload, false).await
}

/// As [`publish_acked`], with the RETAIN flag (an empty payload deletes the topic's retained
/// message).
pub(crate) async fn retain_acked(
    client: &Client,
    events: &mut Events,
    to: &str,
    payload: &str,
) -> ReasonCode {
    message_acked(client, events, to, payload, true).await
}

async fn message_acked(
    client: &Client,
    events: &mut Events,
    to: &str,
    payload: &str,
    retain: bool,
) -> ReasonCode {
    let _sent_or_queued = client
        .publish(Message::new(
            topic(to),
            payload.as_bytes().to_vec(),
            QoS::AtLeastOnce,
            retain,
        ))
        .await
        .expect("publish");
    loop {
        match within(STEP, "PUBACK", events.recv()).await {
            Some(Event::Delivered { reason, .. }) => return reason,
            Some(Event::Closed { reason, .. }) => panic!("closed before PUBACK: {reason:?}"),
            Some(_) => {}
            None => panic!("connection task ended before PUBACK"),
        }
    }
}

/// The payload of the next message on `events`.
pub(crate) async fn next_payload(events: &mut Events) -> String {
    let message = within(STEP, "a message", events.next_message())
        .await
        .expect("a message before the connection closed");
    String::from_utf8_lossy(&message.message.payload).into_owned()
}

/// Publishes `payload` to `to` at QoS 1, which the broker must accept, and reads it back on
/// `events` (the client is subscribed to it).
pub(crate) async fn round_trip(client: &Client, events: &mut Events, to: &str, payload: &str) {
    assert_eq!(
        publish_acked(client, events, to, payload).await,
        ReasonCode::Success
    );
    assert_eq!(next_payload(events).await, payload);
}
