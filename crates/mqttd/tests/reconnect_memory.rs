//! A client that keeps its session and reconnects all day (a phone moving between networks)
//! must not make the broker grow.
//!
//! MQTT 5 clients with a session expiry of an hour connect, resume their session and
//! disconnect, over and over. Each disconnect parks the session offline with a timer for its
//! expiry; each reconnect must stop that timer rather than leave it sleeping for the hour. The
//! broker's resident memory after all the reconnects must be what it was after the warm-up,
//! within [`RSS_MARGIN`], and `/metrics` must report one timer per offline session. A timer
//! left behind by every reconnect costs about 300 bytes in a release build (650 in a debug
//! one): 5.4 MiB or more over the 19,000 reconnects after the warm-up.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;

use mqttd_proto::{Disconnect, Packet, ProtocolVersion, ReasonCode};

use support::{encode, session_connect_packet, Broker, RawConn, Received};

/// Reconnects in all.
const RECONNECTS: usize = 20_000;
/// Reconnects before the first measurement, for the allocator and the runtime to reach their
/// working size.
const WARM_UP: usize = 1_000;
/// Clients reconnecting at once, each with its own session.
const CLIENTS: usize = 4;
/// How far the broker's memory may end above its level after the warm-up. Measured growth
/// is under 100 KiB; with a timer left behind by every reconnect, over 12 MiB (debug build).
const RSS_MARGIN: u64 = 1024 * 1024;
const SESSION_EXPIRY: u32 = 3600;
const WAIT: Duration = Duration::from_secs(30);

/// Connects (resuming the session after the first time), then disconnects normally and waits
/// for the broker to close the connection.
async fn reconnect(addr: SocketAddr, client_id: &str) {
    let version = ProtocolVersion::V5;
    let mut conn = RawConn::open(addr, version).await;
    let connect = session_connect_packet(version, client_id, Some(SESSION_EXPIRY));
    conn.send(&encode(version, &connect))
        .await
        .expect("send CONNECT");
    match conn.recv(WAIT).await {
        Received::Packet(p) if matches!(&*p, Packet::ConnAck(a) if !a.reason.is_error()) => {}
        other => panic!("{client_id}: expected a successful CONNACK, got {other:?}"),
    }
    let disconnect = Packet::Disconnect(Disconnect::new(ReasonCode::Success));
    conn.send(&encode(version, &disconnect))
        .await
        .expect("send DISCONNECT");
    if let Err(e) = conn.until_closed(WAIT).await {
        panic!("{client_id}: the broker did not close after DISCONNECT: {e}");
    }
}

/// Runs `count` reconnects, spread over the clients.
async fn reconnects(addr: SocketAddr, count: usize) {
    let mut tasks = JoinSet::new();
    for c in 0..CLIENTS {
        let n = count / CLIENTS + usize::from(c < count % CLIENTS);
        tasks.spawn(async move {
            let id = format!("roaming-{c}");
            for _ in 0..n {
                reconnect(addr, &id).await;
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("reconnecting client");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_a_long_session_expiry_does_not_grow_memory() {
    // Without persistence, so that what is measured is the sessions and their timers, not
    // the storage's own memory.
    let broker = Broker::start("persistence = false\n");
    let addr = broker.mqtt;

    reconnects(addr, WARM_UP).await;
    let after_warm_up = broker.rss();
    reconnects(addr, RECONNECTS - WARM_UP).await;
    let after_all = broker.rss();

    let metrics = broker
        .wait_for_metrics(WAIT, |m| m.get("mqttd_session_timers") <= CLIENTS as f64)
        .await;
    let timers = metrics.get("mqttd_session_timers");
    let growth = after_all.saturating_sub(after_warm_up);
    eprintln!(
        "RSS after {WARM_UP} reconnects: {after_warm_up} B; after {RECONNECTS}: {after_all} B \
         (+{growth} B); session timers: {timers}"
    );
    assert!(
        growth <= RSS_MARGIN,
        "the broker grew by {growth} bytes over {} reconnects (allowed {RSS_MARGIN})",
        RECONNECTS - WARM_UP
    );
    assert_eq!(
        timers, CLIENTS as f64,
        "one timer per offline session, none left by earlier reconnects"
    );
    broker.stop();
}
