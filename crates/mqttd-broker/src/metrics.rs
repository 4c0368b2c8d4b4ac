//! Broker metrics, exported in the Prometheus text format.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters and gauges the broker updates as it works. Each is a relaxed atomic, cheap enough
/// for the routing path.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections accepted by the listeners.
    pub connections_accepted: Counter,
    /// Connections refused before CONNECT (limits).
    pub connections_refused: Counter,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Clients connected (CONNACK sent) now.
    pub clients_connected: Gauge,
    /// PUBLISH packets received from clients.
    pub messages_received: Counter,
    /// PUBLISH packets sent to clients.
    pub messages_sent: Counter,
    /// Deliveries handed to sessions by routing.
    pub routed: Counter,
    /// Messages dropped: queue full, expired, too large, or refused by a hook or ACL.
    pub messages_dropped: Counter,
    /// Bytes read from clients.
    pub bytes_received: Counter,
    /// Bytes written to clients.
    pub bytes_sent: Counter,
    /// Wills published.
    pub wills: Counter,
    /// Sessions taken over by a new connection.
    pub takeovers: Counter,
    /// Connections closed for a protocol violation or malformed packet.
    pub protocol_errors: Counter,
    /// Failed authentications.
    pub auth_failures: Counter,
    /// TLS handshakes that failed (a certificate refused, not TLS at all, the client gave up).
    pub tls_handshake_failures: Counter,
    /// TLS handshakes not done within `connect_timeout`.
    pub tls_handshake_timeouts: Counter,
    /// QUIC connections open now (handshake done or 0-RTT accepted, MQTT not yet over).
    pub quic_connections: Gauge,
    /// QUIC handshakes that reached MQTT (ALPN `mqtt`).
    pub quic_handshakes: Counter,
    /// QUIC handshakes that failed or did not end within `connect_timeout`.
    pub quic_handshake_failures: Counter,
    /// Stateless Retries sent to clients whose address was not validated while many
    /// handshakes were in progress.
    pub quic_retries: Counter,
    /// QUIC packets sent, counted when each connection ends.
    pub quic_sent_packets: Counter,
    /// QUIC packets lost (and so retransmitted as needed), counted when each connection ends.
    pub quic_lost_packets: Counter,
    /// QUIC data streams the broker reset for a malformed packet.
    pub quic_stream_resets: Counter,
    /// The receive buffer of the QUIC listeners' UDP sockets, in bytes, as the kernel
    /// reports it (the last listener bound).
    pub quic_socket_recv_buffer_bytes: Gauge,
    /// The send buffer of the QUIC listeners' UDP sockets, in bytes, as the kernel reports it.
    pub quic_socket_send_buffer_bytes: Gauge,
    /// Datagrams the QUIC listeners dropped before noq read them or after noq wrote them, by
    /// `reason`: see [`Self::quic_datagrams_dropped`].
    quic_datagrams_dropped: QuicDropped,
    /// Sessions held, connected or not.
    pub sessions: Gauge,
    /// Subscriptions held.
    pub subscriptions: Gauge,
    /// Retained messages held.
    pub retained_messages: Gauge,
    /// Timer tasks of offline sessions (will delay, session expiry) running now: at most one
    /// per offline session.
    pub session_timers: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mqttd");
        macro_rules! register {
            ($($name:ident: $kind:ty = $help:literal,)*) => {{
                $(let $name = <$kind>::default();
                registry.register(stringify!($name), $help, $name.clone());)*
                Self { registry, $($name,)* }
            }};
        }
        register! {
            connections_accepted: Counter = "Connections accepted by the listeners",
            connections_refused: Counter = "Connections refused by connection limits",
            connections_open: Gauge = "Connections open now",
            clients_connected: Gauge = "Clients connected now",
            messages_received: Counter = "PUBLISH packets received",
            messages_sent: Counter = "PUBLISH packets sent",
            routed: Counter = "Deliveries handed to sessions",
            messages_dropped: Counter = "Messages dropped",
            bytes_received: Counter = "Bytes received",
            bytes_sent: Counter = "Bytes sent",
            wills: Counter = "Will messages published",
            takeovers: Counter = "Sessions taken over",
            protocol_errors: Counter = "Connections closed for protocol errors",
            auth_failures: Counter = "Failed authentications",
            tls_handshake_failures: Counter = "TLS handshakes that failed",
            tls_handshake_timeouts: Counter = "TLS handshakes not done within connect_timeout",
            quic_connections: Gauge = "QUIC connections open now",
            quic_handshakes: Counter = "QUIC handshakes that reached MQTT",
            quic_handshake_failures: Counter = "QUIC handshakes that failed or timed out",
            quic_retries: Counter = "QUIC stateless Retries sent",
            quic_sent_packets: Counter = "QUIC packets sent, counted at disconnect",
            quic_lost_packets: Counter = "QUIC packets lost, counted at disconnect",
            quic_stream_resets: Counter = "QUIC data streams reset for a malformed packet",
            sessions: Gauge = "Sessions held",
            subscriptions: Gauge = "Subscriptions held",
            retained_messages: Gauge = "Retained messages held",
            session_timers: Gauge = "Timer tasks of offline sessions running",
            quic_socket_recv_buffer_bytes: Gauge = "QUIC UDP socket receive buffer in bytes",
            quic_socket_send_buffer_bytes: Gauge = "QUIC UDP socket send buffer in bytes",
            quic_datagrams_dropped: QuicDropped =
                "QUIC datagrams dropped by the listener's guard, by reason",
        }
    }
}

/// `mqttd_quic_datagrams_dropped_total`, labelled by `reason`.
type QuicDropped = Family<[(&'static str, &'static str); 1], Counter>;

impl Metrics {
    /// The counter of QUIC datagrams dropped for `reason` (`short_unknown_version`: a long
    /// header of an unknown version under 1200 bytes, not answered; `amplification`: not sent
    /// to an address not yet validated, past three times what it sent; `tracking_full`: an
    /// Initial not taken while too many addresses wait for validation). Created at once, so
    /// that the metric shows 0 before anything is dropped.
    pub(crate) fn quic_datagrams_dropped(&self, reason: &'static str) -> Counter {
        self.quic_datagrams_dropped
            .get_or_create_owned(&[("reason", reason)])
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.messages_received.inc_by(3);
        m.clients_connected.set(2);
        let text = m.render();
        assert!(text.contains("mqttd_messages_received_total 3"), "{text}");
        assert!(text.contains("mqttd_clients_connected 2"), "{text}");
        assert!(text.contains("# EOF"));
    }
}
