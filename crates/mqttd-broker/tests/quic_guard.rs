//! The QUIC listener's guard between noq and the UDP socket, from the network's side: a long
//! header of an unknown version under 1200 bytes gets no Version Negotiation, and a client
//! address that never answers gets at most three times what it sent (RFC 9000 §5.2.2, §8).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqttd_broker::Config;
use tokio::net::UdpSocket;
use tokio::time::{sleep, timeout};

use common::quic::{client_endpoint, start};
use common::WAIT;

/// A version no endpoint supports (RFC 9000 §15 reserves 0x?a?a?a?a).
const UNKNOWN_VERSION: u32 = 0x1A2A_3A4A;

/// A long-header Initial of `version`, zero-padded to `size` bytes.
fn long_header(version: u32, dcid: &[u8], scid: &[u8], size: usize) -> Vec<u8> {
    let mut p = vec![0xC0];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(scid.len() as u8);
    p.extend_from_slice(scid);
    p.resize(size, 0);
    p
}

#[tokio::test]
async fn a_short_datagram_of_an_unknown_version_gets_no_version_negotiation() {
    let setup = start(Config::default()).await;
    let quic = setup.quic;
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dcid = [1u8; 8];
    probe
        .send_to(&long_header(UNKNOWN_VERSION, &dcid, b"short-01", 100), quic)
        .await
        .unwrap();
    probe
        .send_to(
            &long_header(UNKNOWN_VERSION, &dcid, b"full-001", 1200),
            quic,
        )
        .await
        .unwrap();
    // The first answer is the Version Negotiation of the full-size one (its Destination
    // Connection ID is the Source Connection ID it answers), and there is no other.
    let mut buf = [0u8; 1500];
    let (len, _) = timeout(WAIT, probe.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let vn = &buf[..len];
    assert_eq!(&vn[1..5], &[0, 0, 0, 0], "a Version Negotiation");
    assert_eq!(&vn[5..14], b"\x08full-001");
    assert!(
        timeout(Duration::from_millis(200), probe.recv_from(&mut buf))
            .await
            .is_err(),
        "nothing else"
    );
    let dropped = r#"mqttd_quic_datagrams_dropped_total{reason="short_unknown_version"}"#;
    assert_eq!(setup.metric(dropped), 1);
    setup.broker.shutdown().await;
}

#[tokio::test]
async fn an_address_that_never_answers_gets_at_most_three_times_what_it_sent() {
    let mut config = Config::default();
    config.connect_timeout = 2;
    // Quick retransmissions: several before the handshake's time is up.
    config.quic.initial_rtt_ms = 50;
    let setup = start(config).await;
    let quic = setup.quic;

    // The client's first datagram goes to the broker through `upstream`, which is the address
    // the broker answers and which forwards nothing back: the client never answers.
    let relay = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let sent = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let forward = tokio::spawn({
        let (relay, upstream, sent) = (relay.clone(), upstream.clone(), sent.clone());
        async move {
            let mut buf = [0u8; 65536];
            let (len, _) = relay.recv_from(&mut buf).await.unwrap();
            upstream.send_to(&buf[..len], quic).await.unwrap();
            sent.store(len, Ordering::SeqCst);
        }
    });
    let record = tokio::spawn({
        let (upstream, received) = (upstream.clone(), received.clone());
        async move {
            let mut buf = [0u8; 65536];
            loop {
                let (len, _) = upstream.recv_from(&mut buf).await.unwrap();
                received.fetch_add(len, Ordering::SeqCst);
            }
        }
    });

    let client = client_endpoint(&setup.ca(), b"mqtt", None);
    let connecting = client
        .connect(relay.local_addr().unwrap(), "localhost")
        .unwrap();
    let attempt = tokio::spawn(async move {
        let _ = connecting.await;
    });
    timeout(WAIT, forward).await.unwrap().unwrap();
    let sent = sent.load(Ordering::SeqCst);
    assert!(
        sent >= 1200,
        "the client's Initial fills a datagram: {sent}"
    );

    // The broker gives the attempt up at connect_timeout; what was on its way has arrived a
    // little later.
    setup
        .metric_reaches("mqttd_quic_handshake_failures_total", 1)
        .await;
    sleep(Duration::from_millis(300)).await;
    let received = received.load(Ordering::SeqCst);
    assert!(
        received > 0 && received <= 3 * sent,
        "{received} bytes sent back for {sent}"
    );
    let dropped = r#"mqttd_quic_datagrams_dropped_total{reason="amplification"}"#;
    assert!(setup.metric(dropped) >= 1, "noq went past 3x, held back");

    attempt.abort();
    record.abort();
    setup.broker.shutdown().await;
}
