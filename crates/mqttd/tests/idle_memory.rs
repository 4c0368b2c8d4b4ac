//! An idle connection must stay cheap: most of a broker's connections are idle devices, and
//! what each holds is multiplied by all of them.
//!
//! [`CONNECTIONS`] MQTT 3.1.1 clients connect over TCP (clean session, keep alive 60, no
//! subscriptions) and then send nothing. The broker's resident memory after they are all held,
//! less what it was before, divided by their number, must stay within [`MAX_BYTES`]. Every
//! connection must still be served afterwards: a sample answers PINGREQ.

mod support;

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use mqttd_proto::{Packet, ProtocolVersion};

use support::{encode, Broker, RawConn, Received};

/// Idle connections measured.
const CONNECTIONS: usize = 2_000;
/// Connections opened before the first measurement, for the allocator and the runtime to reach
/// their working size.
const WARM_UP: usize = 200;
/// Connections being set up at once.
const AT_ONCE: usize = 50;
/// Most bytes of resident memory per idle TCP connection, debug build. Measured: 1,730 - 2,280
/// once a parked socket left tokio's reactor for the parking lot's own epoll set (tokio's
/// per-socket registration, 256 bytes, released while it parks); 2,500 - 2,590
/// once a parked connection with nothing going on kept its state in its smallest form (the
/// protocol state and the core made again when it wakes), its client id apart from the
/// CONNECT packet and no subscription table while it has none; 2,950 - 3,060
/// with the admin API's per-connection details and everything else on main (2,680 - 2,860 on
/// its own branch) once a parked connection's state was compacted (its empty maps one pointer each, the
/// client's details kept once, the protocol configuration shared); 3,100 - 3,340 before, with
/// the connections parked without a task (4,150 on the same machine before that; 5,500 before
/// the spawned future stopped holding the driver's future twice, the stream was no longer
/// split, a quiet connection stopped holding a read buffer and the will moved out of the
/// connection's state). Part of it is the tasks the connections had while they connected,
/// freed but kept by the allocator, so it grows when connections open faster; the margin is
/// for that and for the allocator's and the kernel's rounding on another machine.
const MAX_BYTES: u64 = 2_850;
const WAIT: Duration = Duration::from_secs(60);
const VERSION: ProtocolVersion = ProtocolVersion::V3_1_1;

/// Opens `count` connections named `{prefix}-{i}` and completes their handshakes.
async fn open(addr: std::net::SocketAddr, prefix: &str, count: usize) -> Vec<RawConn> {
    let mut conns = Vec::with_capacity(count);
    let mut next = 0;
    while next < count {
        let mut batch = JoinSet::new();
        for i in next..(next + AT_ONCE).min(count) {
            let id = format!("{prefix}-{i}");
            batch.spawn(async move { (i, RawConn::connected(addr, VERSION, &id).await) });
        }
        let mut opened = batch.join_all().await;
        opened.sort_by_key(|(i, _)| *i);
        next += opened.len();
        conns.extend(opened.into_iter().map(|(_, c)| c));
    }
    conns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tcp_connection_holds_little_memory() {
    // Room for this process's end of every connection.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let broker = Broker::start("");
    let addr = broker.mqtt;

    let warm = open(addr, "warm", WARM_UP).await;
    // Idle connections park (without a task of their own) after a moment: measured parked.
    broker
        .wait_for_metrics(WAIT, |m| {
            m.get("mqttd_clients_connected") >= WARM_UP as f64
                && m.get("mqttd_connections_parked") >= WARM_UP as f64
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = broker.rss();

    let mut idle = open(addr, "idle", CONNECTIONS).await;
    let total = (WARM_UP + CONNECTIONS) as f64;
    let metrics = broker
        .wait_for_metrics(WAIT, |m| {
            m.get("mqttd_clients_connected") >= total && m.get("mqttd_connections_parked") >= total
        })
        .await;
    assert_eq!(
        metrics.get("mqttd_clients_connected"),
        total,
        "connections held"
    );
    assert_eq!(
        metrics.get("mqttd_connections_parked"),
        total,
        "idle connections parked"
    );
    // Held and idle: let the broker finish the handshakes' work.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = broker.rss();

    let per_connection = after.saturating_sub(before) / CONNECTIONS as u64;
    eprintln!(
        "RSS before {before} B, holding {CONNECTIONS} more idle connections {after} B: \
         {per_connection} B per connection"
    );
    assert!(
        per_connection > 0,
        "{CONNECTIONS} connections cost nothing?"
    );
    assert!(
        per_connection <= MAX_BYTES,
        "an idle TCP connection holds {per_connection} B (allowed {MAX_BYTES})"
    );

    // Idle is not gone: they still answer.
    let ping = encode(VERSION, &Packet::PingReq);
    for conn in idle.iter_mut().step_by(CONNECTIONS / 20) {
        conn.stream.write_all(&ping).await.expect("send PINGREQ");
        match conn.recv(WAIT).await {
            Received::Packet(p) if matches!(*p, Packet::PingResp) => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
    drop((warm, idle));
    broker.stop();
}
