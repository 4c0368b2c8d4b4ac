//! `$SYS/broker/...` statistics under Mosquitto's topic names, published retained every
//! `sys_interval` seconds.

use std::sync::Arc;
use std::time::Duration;

use mqttd_proto::{Message, QoS, TopicName};

use crate::broker::Inner;

/// Publishes `$SYS` topics until shutdown.
pub(crate) async fn run(inner: Arc<Inner>) {
    let interval = Duration::from_secs(inner.config.sys_interval);
    if interval.is_zero() {
        return;
    }
    publish(
        &inner,
        "$SYS/broker/version",
        concat!("mqttd version ", env!("CARGO_PKG_VERSION")).to_owned(),
    );
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        publish_stats(&inner);
    }
}

/// One round of statistics.
pub(crate) fn publish_stats(inner: &Inner) {
    inner.refresh_gauges();
    let m = &inner.metrics;
    let connected = m.clients_connected.get();
    let total = m.sessions.get();
    let stats: [(&str, String); 14] = [
        (
            "uptime",
            format!("{} seconds", inner.started.elapsed().as_secs()),
        ),
        ("clients/connected", connected.to_string()),
        ("clients/active", connected.to_string()),
        ("clients/total", total.to_string()),
        (
            "clients/disconnected",
            (total - connected).max(0).to_string(),
        ),
        ("clients/inactive", (total - connected).max(0).to_string()),
        ("messages/received", m.messages_received.get().to_string()),
        ("messages/sent", m.messages_sent.get().to_string()),
        (
            "publish/messages/received",
            m.messages_received.get().to_string(),
        ),
        ("publish/messages/sent", m.messages_sent.get().to_string()),
        (
            "publish/messages/dropped",
            m.messages_dropped.get().to_string(),
        ),
        ("bytes/received", m.bytes_received.get().to_string()),
        ("bytes/sent", m.bytes_sent.get().to_string()),
        ("subscriptions/count", m.subscriptions.get().to_string()),
    ];
    for (name, value) in stats {
        publish(inner, &format!("$SYS/broker/{name}"), value);
    }
    publish(
        inner,
        "$SYS/broker/retained messages/count",
        m.retained_messages.get().to_string(),
    );
}

fn publish(inner: &Inner, topic: &str, value: String) {
    let Ok(topic) = TopicName::try_from(topic) else {
        return;
    };
    let message = Arc::new(Message::new(
        topic,
        value.into_bytes(),
        QoS::AtMostOnce,
        true,
    ));
    inner.retained.set(message.clone());
    inner.route(crate::clock::now(), &message, None);
}
