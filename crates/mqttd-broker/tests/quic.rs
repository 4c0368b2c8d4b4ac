//! MQTT over QUIC (`quic://`), with noq as the client, trusting the CA the broker generated:
//! single-stream mode through the ordinary async client, and EMQX's multi-stream mode packet by
//! packet (acknowledgements and deliveries on their streams, data streams held until CONNACK,
//! a malformed data stream reset alone, lost streams, a stalled stream, the stream limit), the
//! ALPN, 0-RTT, QUIC and TCP clients together, and a lossy path (lost packets counted, every
//! QoS 1 message delivered). The helpers are in `common/quic.rs`.

mod common;

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use mqttd_broker::Config;
use mqttd_client::connect_tcp;
use mqttd_proto::{Packet, QoS, ReasonCode};
use noq::{TransportConfig, VarInt};
use tokio::time::timeout;

use common::quic::{
    config, connect_packet, control, delivered, dial, id, publish, publish_packet, start,
    subscribe, subscribe_packet, LossyRelay, Raw,
};
use common::{next_bytes, WAIT};

#[tokio::test]
async fn single_stream_pub_sub_at_every_qos_and_a_large_payload() {
    let mut broker_config = Config::default();
    broker_config.max_packet_size = 2 << 20;
    let s = start(broker_config).await;
    let (sub, mut sub_events, _) = s.single_stream(config("sub")).await;
    subscribe(&sub, "t/#", QoS::ExactlyOnce).await;
    let (publisher, mut pub_events, _) = s.single_stream(config("pub")).await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let payload = format!("qos {}", qos as u8);
        publish(&publisher, "t/a", payload.clone(), qos).await;
        if qos != QoS::AtMostOnce {
            delivered(&mut pub_events).await;
        }
        assert_eq!(next_bytes(&mut sub_events).await, payload);
    }
    let large: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    publish(&publisher, "t/large", large.clone(), QoS::AtLeastOnce).await;
    delivered(&mut pub_events).await;
    assert!(next_bytes(&mut sub_events).await == large);
    assert_eq!(s.metric("mqttd_quic_handshakes_total"), 2);
    assert_eq!(s.metric("mqttd_quic_connections"), 2);
    s.broker.shutdown().await;
}

#[tokio::test]
async fn acknowledgements_and_deliveries_go_on_the_stream_they_belong_to() {
    let s = start(Config::default()).await;
    let (conn, mut ctl) = s.multi_stream("m").await;
    let mut subs = Raw::subscribed(&conn, 1, "t", QoS::AtLeastOnce).await;
    let mut pubs = Raw::open(&conn).await;
    pubs.send(&publish_packet(Some(7), "t", b"hello")).await;
    match pubs.expect("PUBACK").await {
        Packet::PubAck(ack) => assert_eq!(ack.packet_id, id(7)),
        other => panic!("expected PUBACK on the publishing stream, got {other:?}"),
    }
    assert_eq!(subs.publish_payload().await, "hello");
    ctl.ping().await;
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_data_stream_written_before_connect_is_held_until_connack() {
    let s = start(Config::default()).await;
    let conn = s.connect().await;
    let mut ctl = Raw::open(&conn).await;
    let mut data = Raw::open(&conn).await;
    data.send(&subscribe_packet(3, "early", QoS::AtMostOnce))
        .await;
    // Let the data stream's packet reach the broker first (the verdict does not depend on it).
    tokio::time::sleep(Duration::from_millis(50)).await;
    ctl.send(&connect_packet("early", true, 0)).await;
    ctl.connack().await;
    data.suback(3).await;
    ctl.send(&publish_packet(None, "early", b"x")).await;
    assert_eq!(data.publish_payload().await, "x");
    ctl.ping().await;
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_malformed_packet_on_a_data_stream_resets_that_stream_only() {
    let s = start(Config::default()).await;
    let (conn, mut ctl) = s.multi_stream("m").await;
    let mut subs = Raw::subscribed(&conn, 1, "t", QoS::AtMostOnce).await;
    let mut bad = Raw::open(&conn).await;
    // Packet type 0 is reserved.
    bad.write(&[0x00, 0x00]).await;
    let code = match timeout(WAIT, bad.recv.read_chunk(1024)).await.unwrap() {
        Err(noq::ReadError::Reset(code)) => code,
        other => panic!("expected the stream to be reset, got {other:?}"),
    };
    assert!(
        [0x81u32, 0x82].map(VarInt::from_u32).contains(&code),
        "reset with a malformed-packet or protocol-error code: {code}"
    );
    // The connection and its other streams go on.
    ctl.ping().await;
    ctl.send(&publish_packet(None, "t", b"still")).await;
    assert_eq!(subs.publish_payload().await, "still");
    assert_eq!(s.metric("mqttd_quic_stream_resets_total"), 1);
    assert_eq!(s.metric("mqttd_protocol_errors_total"), 1);
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_reset_subscription_stream_moves_its_messages_to_the_control_stream() {
    let s = start(Config::default()).await;
    let (conn, mut ctl) = s.multi_stream("m").await;
    let mut subs = Raw::subscribed(&conn, 1, "t", QoS::AtLeastOnce).await;
    subs.send.reset(VarInt::from_u32(0)).unwrap();
    subs.recv.stop(VarInt::from_u32(0)).unwrap();
    ctl.ping().await;
    ctl.send(&publish_packet(None, "t", b"moved")).await;
    loop {
        match ctl.expect("the delivery").await {
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], b"moved");
                break;
            }
            Packet::PingResp => {}
            other => panic!("expected the delivery on the control stream, got {other:?}"),
        }
    }
    s.broker.shutdown().await;
}

#[tokio::test]
async fn losing_the_control_stream_closes_the_connection() {
    let s = start(Config::default()).await;
    let (conn, mut ctl) = s.multi_stream("m").await;
    let _data = Raw::open(&conn).await;
    ctl.send.reset(VarInt::from_u32(0)).unwrap();
    let closed = timeout(WAIT, conn.closed()).await.expect("closed in time");
    assert!(
        matches!(closed, noq::ConnectionError::ApplicationClosed(_)),
        "{closed}"
    );
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_stalled_data_stream_does_not_delay_pingresp() {
    let s = start(Config::default()).await;
    let mut transport = TransportConfig::default();
    // The subscriber's stream takes little before it stalls.
    transport.stream_receive_window(VarInt::from_u32(32 * 1024));
    let conn = s.connect_with(transport).await;
    let mut ctl = control(&conn, "stalled").await;
    let mut busy = Raw::subscribed(&conn, 1, "busy", QoS::AtMostOnce).await;
    // From now on the busy stream is never read.
    let (publisher, mut events, _) = connect_tcp(s.tcp, config("pub"), None).await.unwrap();
    for _ in 0..200 {
        publish(&publisher, "busy", vec![b'x'; 4096], QoS::AtMostOnce).await;
    }
    // A QoS 1 publication completes after the broker handled those before it.
    publish(&publisher, "fence", "f", QoS::AtLeastOnce).await;
    delivered(&mut events).await;
    for _ in 0..5 {
        ctl.ping().await;
    }
    // The busy stream did stall: far less than was published got through.
    let mut got = 0;
    while let Ok(Ok(Some(chunk))) = timeout(Duration::ZERO, busy.recv.read_chunk(1 << 20)).await {
        got += chunk.len();
    }
    assert!(
        got < 200 * 4096 / 2,
        "{got} bytes arrived on the stalled stream"
    );
    s.broker.shutdown().await;
}

#[tokio::test]
async fn streams_beyond_peer_bidi_stream_count_are_not_granted() {
    let mut config = Config::default();
    config.quic.peer_bidi_stream_count = 3;
    let s = start(config).await;
    let (conn, mut ctl) = s.multi_stream("m").await;
    let mut one = Raw::open(&conn).await;
    let mut two = Raw::open(&conn).await;
    one.send(&Packet::PingReq).await;
    two.send(&Packet::PingReq).await;
    let mut fourth = pin!(conn.open_bi());
    let pending = poll_fn(|cx| Poll::Ready(fourth.as_mut().poll(cx).is_pending())).await;
    assert!(pending, "a fourth stream was granted");
    ctl.ping().await;
    // Once a data stream ends, its place is granted again.
    one.send.finish().unwrap();
    let granted = timeout(WAIT, fourth).await.expect("granted in time");
    assert!(granted.is_ok());
    s.broker.shutdown().await;
}

#[tokio::test]
async fn quic_and_tcp_clients_exchange_messages_both_ways() {
    let s = start(Config::default()).await;
    let (quic, mut quic_events, _) = s.single_stream(config("quic")).await;
    let (tcp, mut tcp_events, _) = connect_tcp(s.tcp, config("tcp"), None).await.unwrap();
    subscribe(&quic, "to/quic", QoS::AtLeastOnce).await;
    subscribe(&tcp, "to/tcp", QoS::AtLeastOnce).await;
    publish(&tcp, "to/quic", "from tcp", QoS::AtLeastOnce).await;
    publish(&quic, "to/tcp", "from quic", QoS::AtLeastOnce).await;
    assert_eq!(next_bytes(&mut quic_events).await, "from tcp");
    assert_eq!(next_bytes(&mut tcp_events).await, "from quic");
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_session_made_over_tcp_resumes_over_quic() {
    let s = start(Config::default()).await;
    let mut persistent = config("roamer");
    persistent.session_expiry_interval = 300;
    let (tcp, _events, _) = connect_tcp(s.tcp, persistent.clone(), None).await.unwrap();
    subscribe(&tcp, "queued", QoS::AtLeastOnce).await;
    tcp.disconnect(ReasonCode::Success, None).await.unwrap();
    let (publisher, mut events, _) = connect_tcp(s.tcp, config("pub"), None).await.unwrap();
    for i in 0..3u8 {
        publish(&publisher, "queued", vec![i], QoS::AtLeastOnce).await;
        delivered(&mut events).await;
    }
    persistent.clean_start = false;
    let (_quic, mut quic_events, present) = s.single_stream(persistent).await;
    assert!(present, "the session resumed");
    for i in 0..3u8 {
        assert_eq!(next_bytes(&mut quic_events).await, vec![i]);
    }
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_client_offering_another_alpn_fails_the_handshake() {
    let mut config = Config::default();
    config.quic.http3 = false;
    let s = start(config).await;
    for alpn in [&b"h3"[..], b"mqtt-ish"] {
        let endpoint = s.endpoint(alpn, None);
        let result = dial(&endpoint, s.quic).await;
        assert!(result.is_err(), "ALPN {alpn:?} was accepted");
    }
    // An MQTT client still gets in.
    s.multi_stream("after").await;
    s.broker.shutdown().await;
}

#[tokio::test]
async fn http3_is_offered_on_the_same_port_unless_disabled() {
    let s = start(Config::default()).await;
    let endpoint = s.endpoint(b"h3", None);
    let conn = dial(&endpoint, s.quic).await.unwrap();
    // The HTTP/3 server opens its control stream (type 0x00) at once.
    let mut control = timeout(WAIT, conn.accept_uni()).await.unwrap().unwrap();
    let mut kind = [0u8; 1];
    timeout(WAIT, control.read_exact(&mut kind))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kind, [0x00]);
    s.broker.shutdown().await;
}

/// The endpoint lets every client open the three unidirectional streams HTTP/3 needs; an MQTT
/// client has no use for them, and the broker stops any it opens.
#[tokio::test]
async fn an_mqtt_clients_unidirectional_streams_are_stopped() {
    let s = start(Config::default()).await;
    let (conn, mut ctl) = s.multi_stream("uni").await;
    let mut stream = conn.open_uni().await.unwrap();
    let _ = stream.write_all(b"not for anyone").await;
    let stopped = timeout(WAIT, stream.stopped()).await.unwrap().unwrap();
    assert_eq!(stopped, Some(VarInt::from_u32(0x82)));
    // The MQTT connection goes on.
    ctl.ping().await;
    s.broker.shutdown().await;
}

#[tokio::test]
async fn connect_may_come_as_0rtt_early_data() {
    let s = start(Config::default()).await;
    let endpoint = s.endpoint(b"mqtt", None);
    // A first connection gets a session ticket.
    let first = dial(&endpoint, s.quic).await.unwrap();
    control(&first, "first").await;
    first.close(VarInt::from_u32(0), b"");
    let connecting = endpoint.connect(s.quic, "localhost").unwrap();
    let Ok((conn, accepted)) = connecting.into_0rtt() else {
        panic!("no 0-RTT offered with the ticket");
    };
    let mut ctl = Raw::open(&conn).await;
    ctl.send(&connect_packet("early", true, 0)).await;
    ctl.connack().await;
    assert!(
        timeout(WAIT, accepted).await.unwrap(),
        "the broker accepted 0-RTT"
    );
    ctl.ping().await;
    s.broker.shutdown().await;
}

#[tokio::test]
async fn unvalidated_clients_get_a_retry_above_the_handshake_threshold() {
    let mut config = Config::default();
    config.quic.retry_above_handshakes = 0;
    let s = start(config).await;
    // noq's client answers the Retry by itself: the connection comes up a round trip later.
    s.multi_stream("retried").await;
    assert_eq!(s.metric("mqttd_quic_retries_total"), 1);
    s.broker.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused() {
    let mut config = Config::default();
    config.max_connections = 1;
    let s = start(config).await;
    // Held: dropping the control stream would end the connection.
    let _first = s.multi_stream("first").await;
    let endpoint = s.endpoint(b"mqtt", None);
    let refused = dial(&endpoint, s.quic).await;
    assert!(
        matches!(refused, Err(noq::ConnectionError::ConnectionClosed(_))),
        "{refused:?}"
    );
    assert_eq!(s.metric("mqttd_connections_refused_total"), 1);
    s.broker.shutdown().await;
}

/// A client with MQTT keep alive 60 may stay silent for up to 90 s (1.5 times it): the QUIC
/// idle timeout must not end the connection sooner. The client here sends nothing at all for
/// 70 s, no QUIC pings either, and its own idle timeout is longer, so only the broker's could
/// end it. Real time: the stack's timers and real UDP do not mix with a paused clock.
#[tokio::test]
async fn a_client_silent_for_70_seconds_with_keep_alive_60_stays_connected() {
    let s = start(Config::default()).await;
    let mut transport = TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(120).try_into().unwrap()));
    transport.keep_alive_interval(None);
    let conn = s.connect_with(transport).await;
    let mut ctl = control(&conn, "silent").await;
    tokio::time::sleep(Duration::from_secs(70)).await;
    assert!(
        conn.close_reason().is_none(),
        "closed while silent: {:?}",
        conn.close_reason()
    );
    ctl.ping().await;
    s.broker.shutdown().await;
}

/// A path that loses every fourth datagram each way: the broker counts the QUIC packets it
/// lost (`mqttd_quic_lost_packets_total`, added when each connection ends), and QUIC's
/// retransmissions still bring every QoS 1 message, in order, with its PUBACK.
#[tokio::test]
async fn lost_packets_are_counted_and_every_qos1_message_still_arrives() {
    const MESSAGES: usize = 200;
    let s = start(Config::default()).await;
    let sub_path = LossyRelay::start(s.quic, 4).await;
    let pub_path = LossyRelay::start(s.quic, 4).await;
    let (sub, mut sub_events, _) = s.single_stream_via(sub_path.addr, config("sub")).await;
    subscribe(&sub, "lossy", QoS::AtLeastOnce).await;
    let (publisher, mut pub_events, _) = s.single_stream_via(pub_path.addr, config("pub")).await;
    let payload = |i: usize| format!("{i:04} {}", "x".repeat(1000));
    for i in 0..MESSAGES {
        publish(&publisher, "lossy", payload(i), QoS::AtLeastOnce).await;
    }
    for _ in 0..MESSAGES {
        delivered(&mut pub_events).await;
    }
    for i in 0..MESSAGES {
        assert_eq!(next_bytes(&mut sub_events).await, payload(i), "message {i}");
    }
    for relay in [&sub_path, &pub_path] {
        assert!(relay.dropped_to_server() > 0 && relay.dropped_to_client() > 0);
    }
    sub.disconnect(ReasonCode::Success, None).await.unwrap();
    publisher
        .disconnect(ReasonCode::Success, None)
        .await
        .unwrap();
    // The statistics are added as each connection ends.
    s.metric_reaches("mqttd_quic_connections", 0).await;
    let lost = s.metric("mqttd_quic_lost_packets_total");
    let sent = s.metric("mqttd_quic_sent_packets_total");
    assert!(lost > 0, "no lost packet counted, of {sent} sent");
    assert!(lost <= sent, "{lost} lost of {sent} sent");
    s.broker.shutdown().await;
}
