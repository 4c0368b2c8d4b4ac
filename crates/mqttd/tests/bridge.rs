//! Bridges (`[[bridge]]`) between real brokers: two `mqttd` processes bridged over TCP, QUIC
//! and WebSocket with prefixes both ways, a rule that goes both ways without echoing (MQTT 5 No Local;
//! MQTT 3.1.1 with the bridge flag), QoS 1 messages published while the remote broker is down
//! delivered once it is back, messages queued for the remote broker kept across a kill -9 of
//! the local one, bridges over peer-to-peer links (`p2p://NODE_ID?addr=...`, both ways, across
//! a restart of the remote broker; from a node of the bridges' own or the p2p listener's, with
//! the broker's identity, which the remote broker's `p2p.allow` names), SIGHUP adding, stopping and restarting bridges without
//! touching clients, and Mosquitto at either end (Debian's `mosquitto`; skipped without it).
//!
//! Every broker listens on ports found by binding port 0; a remote broker that must come back
//! on the same port gets one found that way. A bridge is ready once a probe message crosses
//! it (probes, payloads starting with `probe`, are ignored by the counts); "nothing more
//! arrives" is proven with final marker messages, which travel behind any echo.

mod support;

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mqttd_client::{connect_tcp, Client, ConnectError, Events};
use mqttd_proto::client::ClientConfig;
use mqttd_proto::{Message, QoS, ReasonCode};

use support::client::{filter, mqtt_config, publish_acked, topic};
use support::{within, Broker};

/// A hang bound, never a performance verdict.
const LIMIT: Duration = Duration::from_secs(60);

/// A `[[bridge]]` table named `name` to `url` with `topics`, reconnecting quickly, and `extra`
/// keys.
fn bridge_toml(name: &str, url: &str, topics: &[&str], extra: &str) -> String {
    let topics: Vec<String> = topics.iter().map(|t| format!("'{t}'")).collect();
    format!(
        "[[bridge]]\nname = \"{name}\"\nurls = [{url}]\ntopics = [{}]\n\
         reconnect_min = 0.05\nreconnect_max = 0.5\n{extra}\n",
        topics.join(", ")
    )
}

/// A free loopback port, released for a broker to take.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn quoted(url: &str) -> String {
    format!("\"{url}\"")
}

/// A connected client with its events.
async fn client(addr: SocketAddr, id: &str) -> (Client, Events) {
    client_with(addr, mqtt_config(id, None)).await
}

async fn client_with(addr: SocketAddr, config: ClientConfig) -> (Client, Events) {
    let id = config.client_id.clone();
    let (client, events, _) = within(LIMIT, "connect", connect_tcp(addr, config, None))
        .await
        .unwrap_or_else(|e| panic!("{id:?} cannot connect to {addr}: {e}"));
    (client, events)
}

/// A client subscribed to `to` at QoS 1.
async fn subscriber(addr: SocketAddr, id: &str, to: &str) -> (Client, Events) {
    let (client, events) = client(addr, id).await;
    let ack = within(
        LIMIT,
        "SUBACK",
        client.subscribe_one(filter(to), QoS::AtLeastOnce),
    )
    .await
    .expect("subscribe");
    assert!(!ack.reasons[0].is_error(), "{ack:?}");
    (client, events)
}

/// The next message that is not a probe: (topic, payload).
async fn next_message(events: &mut Events) -> (String, String) {
    loop {
        let m = within(LIMIT, "a message", events.next_message())
            .await
            .expect("a message before the connection closed");
        let payload = String::from_utf8_lossy(&m.message.payload).into_owned();
        if !payload.starts_with("probe") {
            return (m.message.topic.as_str().to_owned(), payload);
        }
    }
}

/// Publishes probes on `to` until one reaches `sub`: the bridge carries that way.
async fn ready(publisher: &(Client, Events), to: &str, sub: &mut Events) {
    let deadline = Instant::now() + LIMIT;
    for i in 0.. {
        assert!(
            Instant::now() < deadline,
            "no probe on {to} crossed the bridge"
        );
        let message = Message::new(topic(to), format!("probe-{i}"), QoS::AtMostOnce, false);
        let _sent = publisher.0.publish(message).await.expect("publish a probe");
        let got = tokio::time::timeout(Duration::from_millis(300), async {
            while let Some(m) = sub.next_message().await {
                if m.message.payload.starts_with(b"probe") {
                    return true;
                }
            }
            false
        })
        .await;
        if got == Ok(true) {
            return;
        }
    }
}

/// Publishes `payload` on `to` at QoS 1 and checks that the broker took it.
async fn publish(publisher: &mut (Client, Events), to: &str, payload: &str) {
    let (client, events) = publisher;
    assert_eq!(
        publish_acked(client, events, to, payload).await,
        ReasonCode::Success,
        "PUBACK for {to}"
    );
}

/// Reads messages until every payload in `markers` arrived; returns the others, in order.
async fn until_markers(events: &mut Events, markers: &[&str]) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    let mut others = Vec::new();
    while seen.len() < markers.len() {
        let (t, p) = next_message(events).await;
        if markers.contains(&p.as_str()) {
            assert!(seen.insert(p.clone()), "marker {p} arrived twice");
        } else {
            others.push((t, p));
        }
    }
    others
}

fn bridge_up(name: &str) -> String {
    format!("mqttd_bridge_up{{bridge=\"{name}\"}}")
}

/// Waits until `broker`'s bridge `name` is connected.
async fn wait_up(broker: &Broker, name: &str, up: f64) {
    let key = bridge_up(name);
    let m = broker.wait_for_metrics(LIMIT, |m| m.get(&key) == up).await;
    assert_eq!(m.get(&key), up, "{key}\n{}", broker.log_tail());
}

/// Messages published on `local` under `local/sensors/` reach `remote` under
/// `remote/sensors/`, and the other way for `cmd/`.
async fn carries_both_ways(local: SocketAddr, remote: SocketAddr) {
    let mut l_pub = client(local, "l-pub").await;
    let mut r_pub = client(remote, "r-pub").await;
    let (_l, mut l_sub) = subscriber(local, "l-sub", "local/cmd/#").await;
    let (_r, mut r_sub) = subscriber(remote, "r-sub", "remote/sensors/#").await;

    ready(&l_pub, "local/sensors/probe", &mut r_sub).await;
    for i in 0..10 {
        publish(
            &mut l_pub,
            &format!("local/sensors/t{i}"),
            &format!("out-{i}"),
        )
        .await;
    }
    for i in 0..10 {
        assert_eq!(
            next_message(&mut r_sub).await,
            (format!("remote/sensors/t{i}"), format!("out-{i}"))
        );
    }

    ready(&r_pub, "remote/cmd/probe", &mut l_sub).await;
    for i in 0..10 {
        publish(&mut r_pub, &format!("remote/cmd/c{i}"), &format!("in-{i}")).await;
    }
    for i in 0..10 {
        assert_eq!(
            next_message(&mut l_sub).await,
            (format!("local/cmd/c{i}"), format!("in-{i}"))
        );
    }
}

const PREFIXED: &[&str] = &[
    "sensors/# out 1 local/ remote/",
    "cmd/# in 1 local/ remote/",
];

#[tokio::test]
async fn two_brokers_bridged_over_tcp_carry_messages_both_ways_with_prefixes() {
    let remote = Broker::start("");
    // The first URL refuses connections: the bridge goes on to the next.
    let urls = format!(
        "{}, {}",
        quoted(&format!("mqtt://127.0.0.1:{}", free_port())),
        quoted(&format!("mqtt://127.0.0.1:{}", remote.mqtt.port()))
    );
    let local = Broker::start(&bridge_toml("cloud", &urls, PREFIXED, ""));
    wait_up(&local, "cloud", 1.0).await;
    carries_both_ways(local.mqtt, remote.mqtt).await;

    let m = local.metrics();
    assert!(m.get("mqttd_bridge_messages_out_total{bridge=\"cloud\"}") >= 10.0);
    assert!(m.get("mqttd_bridge_messages_in_total{bridge=\"cloud\"}") >= 10.0);
    assert!(m.get("mqttd_bridge_reconnects_total{bridge=\"cloud\"}") >= 1.0);
    assert_eq!(m.get("mqttd_bridge_queued{bridge=\"cloud\"}"), 0.0);

    // The bridge's session is its own: no client may take it over.
    let refused = connect_tcp(local.mqtt, mqtt_config("$bridge/cloud", None), None).await;
    match refused {
        Err(ConnectError::Refused(ack)) => {
            assert_eq!(ack.reason, ReasonCode::ClientIdentifierNotValid)
        }
        Err(e) => panic!("refused otherwise: {e}"),
        Ok(_) => panic!("a client took the bridge's client identifier"),
    }
    local.stop();
    remote.stop();
}

#[tokio::test]
async fn two_brokers_bridged_over_quic_carry_messages_both_ways_with_prefixes() {
    let remote = Broker::start_with("", &["quic://127.0.0.1:0"]);
    let ca = remote.data_dir().join("tls/ca.pem");
    let url = quoted(&format!("quic://127.0.0.1:{}", remote.quic.port()));
    let extra = format!("cafile = \"{}\"", ca.display());
    let local = Broker::start(&bridge_toml("q", &url, PREFIXED, &extra));
    wait_up(&local, "q", 1.0).await;
    carries_both_ways(local.mqtt, remote.mqtt).await;
    local.stop();
    remote.stop();
}

#[tokio::test]
async fn two_brokers_bridged_over_websocket_carry_messages_both_ways_with_prefixes() {
    let remote = Broker::start("");
    let url = quoted(&format!("ws://127.0.0.1:{}/mqtt", remote.ws.port()));
    let local = Broker::start(&bridge_toml("w", &url, PREFIXED, ""));
    wait_up(&local, "w", 1.0).await;
    carries_both_ways(local.mqtt, remote.mqtt).await;
    local.stop();
    remote.stop();
}

/// Publishes `a` on one side and `b` on the other of a `loop/# both` bridge, then a marker on
/// each: every subscriber gets each message once.
async fn no_echo(local: SocketAddr, remote: SocketAddr) {
    let mut l_pub = client(local, "l-pub").await;
    let mut r_pub = client(remote, "r-pub").await;
    let (_l, mut l_sub) = subscriber(local, "l-sub", "loop/#").await;
    let (_r, mut r_sub) = subscriber(remote, "r-sub", "loop/#").await;
    ready(&l_pub, "loop/probe", &mut r_sub).await;
    ready(&r_pub, "loop/probe", &mut l_sub).await;

    publish(&mut l_pub, "loop/a", "a").await;
    publish(&mut r_pub, "loop/b", "b").await;
    publish(&mut l_pub, "loop/end", "end-l").await;
    publish(&mut r_pub, "loop/end", "end-r").await;
    for (side, sub) in [("local", &mut l_sub), ("remote", &mut r_sub)] {
        let mut got = until_markers(sub, &["end-l", "end-r"]).await;
        got.sort();
        assert_eq!(
            got,
            vec![
                ("loop/a".to_owned(), "a".to_owned()),
                ("loop/b".to_owned(), "b".to_owned())
            ],
            "{side} subscriber"
        );
    }
}

#[tokio::test]
async fn a_rule_both_ways_does_not_echo_with_mqtt_5_or_with_the_bridge_flag() {
    for version in ["5", "3.1.1"] {
        let remote = Broker::start("");
        let url = quoted(&format!("mqtt://127.0.0.1:{}", remote.mqtt.port()));
        let extra = format!("protocol_version = \"{version}\"");
        let local = Broker::start(&bridge_toml("loop", &url, &["loop/# both 1"], &extra));
        wait_up(&local, "loop", 1.0).await;
        no_echo(local.mqtt, remote.mqtt).await;
        local.stop();
        remote.stop();
    }
}

/// A persistent subscriber on `port` to `remote/q/#` (session kept for an hour).
async fn persistent_subscriber(port: u16) -> (Client, Events) {
    let mut config = mqtt_config("r-sub", None);
    config.clean_start = false;
    config.session_expiry_interval = 3600;
    let (client, events) = client_with(SocketAddr::from(([127, 0, 0, 1], port)), config).await;
    let ack = within(
        LIMIT,
        "SUBACK",
        client.subscribe_one(filter("remote/q/#"), QoS::AtLeastOnce),
    )
    .await
    .expect("subscribe");
    assert!(!ack.reasons[0].is_error());
    (client, events)
}

/// Reads `n` distinct payloads (duplicates of QoS 1 allowed) from `events`.
async fn distinct_payloads(events: &mut Events, n: usize) -> HashSet<String> {
    let mut got = HashSet::new();
    while got.len() < n {
        let (_, payload) = next_message(events).await;
        got.insert(payload);
    }
    got
}

/// A remote broker on `port`, and a local one bridged to it with `q/#` out at QoS 1 and at
/// most 10 messages in flight, ready.
async fn queued_pair(port: u16) -> (Broker, Broker) {
    let remote = Broker::start_with("", &[&format!("tcp://127.0.0.1:{port}")]);
    let url = quoted(&format!("mqtt://127.0.0.1:{port}"));
    let local = Broker::start(&bridge_toml(
        "q",
        &url,
        &["q/# out 1 local/ remote/"],
        "max_inflight = 10",
    ));
    wait_up(&local, "q", 1.0).await;
    let l_pub = client(local.mqtt, "l-probe").await;
    let (_r, mut r_sub) = persistent_subscriber(port).await;
    ready(&l_pub, "local/q/probe", &mut r_sub).await;
    (local, remote)
}

#[tokio::test]
async fn qos_1_messages_published_while_the_remote_broker_is_down_arrive_when_it_is_back() {
    let port = free_port();
    let (local, mut remote) = queued_pair(port).await;
    remote.shutdown();
    wait_up(&local, "q", 0.0).await;

    let mut l_pub = client(local.mqtt, "l-pub").await;
    for i in 0..50 {
        publish(&mut l_pub, &format!("local/q/{i}"), &format!("m{i}")).await;
    }
    let queued = "mqttd_bridge_queued{bridge=\"q\"}";
    let m = local
        .wait_for_metrics(LIMIT, |m| m.get(queued) == 50.0)
        .await;
    assert_eq!(m.get(queued), 50.0, "held for the remote broker");

    remote.restart();
    wait_up(&local, "q", 1.0).await;
    let (_r, mut r_sub) = persistent_subscriber(port).await;
    let got = distinct_payloads(&mut r_sub, 50).await;
    assert_eq!(got, (0..50).map(|i| format!("m{i}")).collect());
    let m = local
        .wait_for_metrics(LIMIT, |m| m.get(queued) == 0.0)
        .await;
    assert_eq!(m.get(queued), 0.0);
    local.stop();
    remote.stop();
}

#[tokio::test]
async fn messages_queued_for_the_remote_broker_survive_a_kill_9_of_the_local_one() {
    let port = free_port();
    let (mut local, mut remote) = queued_pair(port).await;
    remote.shutdown();
    wait_up(&local, "q", 0.0).await;
    let mut l_pub = client(local.mqtt, "l-pub").await;
    // More than the bridge takes in flight (10): some wait in the session's queue.
    for i in 0..30 {
        publish(&mut l_pub, &format!("local/q/{i}"), &format!("k{i}")).await;
    }
    drop(l_pub);
    local.kill();
    local.restart();
    remote.restart();
    wait_up(&local, "q", 1.0).await;
    let (_r, mut r_sub) = persistent_subscriber(port).await;
    let got = distinct_payloads(&mut r_sub, 30).await;
    assert_eq!(got, (0..30).map(|i| format!("k{i}")).collect());
    local.stop();
    remote.stop();
}

#[tokio::test]
async fn a_message_published_as_soon_as_the_broker_listens_is_bridged() {
    let remote = Broker::start("");
    let (_r, mut r_sub) = subscriber(remote.mqtt, "r-sub", "remote/first/#").await;
    let url = quoted(&format!("mqtt://127.0.0.1:{}", remote.mqtt.port()));
    // A first start: no stored session holds the bridge's subscriptions yet.
    let local = Broker::start(&bridge_toml(
        "first",
        &url,
        &["first/# out 1 local/ remote/"],
        "",
    ));
    let mut l_pub = client(local.mqtt, "l-pub").await;
    publish(&mut l_pub, "local/first/0", "at once").await;
    assert_eq!(
        next_message(&mut r_sub).await,
        ("remote/first/0".to_owned(), "at once".to_owned())
    );
    local.stop();
    remote.stop();
}

#[tokio::test]
async fn a_bad_topic_rule_stops_the_broker_naming_the_bridge_and_the_rule() {
    let mut broker = Broker::configured(
        &bridge_toml("cloud", "\"mqtt://127.0.0.1:1\"", &["a/# sideways 1"], ""),
        &[],
    );
    let failure = broker.try_restart().expect_err("the broker started");
    assert!(
        failure
            .stderr
            .contains("bridge \"cloud\": topic rule \"a/# sideways 1\": unknown direction"),
        "{failure}"
    );
    let mut broker = Broker::configured(
        &bridge_toml(
            "cloud",
            "\"mqtt://127.0.0.1:1\"",
            &["a/#"],
            "cafile = \"/nonexistent.pem\"",
        ),
        &[],
    );
    let failure = broker.try_restart().expect_err("the broker started");
    assert!(failure.stderr.contains("bridge \"cloud\""), "{failure}");
    assert!(failure.stderr.contains("nonexistent.pem"), "{failure}");
}

// ---------------------------------------------------------------------------------------------
// Over peer-to-peer links (p2p://NODE_ID)
// ---------------------------------------------------------------------------------------------

/// A free loopback UDP port, released for a broker's node to take.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The node id of the broker whose data directory is `data_dir` (`mqttd id`).
fn node_id(data_dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .arg("id")
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run mqttd id");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A client on `addr` with a session kept for an hour, subscribed to `to` at QoS 1.
async fn keeping_subscriber(addr: SocketAddr, id: &str, to: &str) -> (Client, Events) {
    let mut config = mqtt_config(id, None);
    config.clean_start = false;
    config.session_expiry_interval = 3600;
    let (client, events) = client_with(addr, config).await;
    let ack = within(
        LIMIT,
        "SUBACK",
        client.subscribe_one(filter(to), QoS::AtLeastOnce),
    )
    .await
    .expect("subscribe");
    assert!(!ack.reasons[0].is_error());
    (client, events)
}

#[tokio::test]
async fn two_brokers_bridged_over_p2p_carry_qos_1_both_ways_across_a_restart_of_the_remote() {
    // The remote broker comes back on the same ports: its node's UDP port and MQTT's.
    let (udp, tcp) = (free_udp_port(), free_port());
    let mut local = Broker::configured("", &[]);
    // The bridge dials with the local broker's identity, which the remote broker admits.
    let local_id = node_id(&local.data_dir());
    let mut remote = Broker::start_with(
        &format!("[p2p]\nallow = ['{local_id}']\n"),
        &[
            &format!("p2p://127.0.0.1:{udp}"),
            &format!("tcp://127.0.0.1:{tcp}"),
        ],
    );
    let remote_id = remote.node_id.clone().expect("the remote node id");
    // p2p first; then a URL that refuses, tried after it in each round.
    let urls = format!(
        "{}, {}",
        quoted(&format!("p2p://{remote_id}?addr=127.0.0.1:{udp}")),
        quoted(&format!("mqtt://127.0.0.1:{}", free_port()))
    );
    std::fs::write(
        local.root().join("mqttd.toml"),
        bridge_toml("p", &urls, PREFIXED, ""),
    )
    .unwrap();
    local.log_json("warn,mqttd_broker::bridge=info");
    local.restart();
    wait_up(&local, "p", 1.0).await;
    carries_both_ways(local.mqtt, remote.mqtt).await;
    // Without a p2p listener, a node of the bridges' own, with the broker's key.
    let log = local.log_text();
    assert!(log.contains("node for bridges bound"), "{log}");
    assert!(log.contains(&local_id), "{log}");
    let direct = "mqttd_p2p_connections_total{path=\"direct\"}";
    assert!(
        remote.metrics().get(direct) >= 1.0,
        "the bridge came over p2p"
    );

    // Subscribers whose sessions outlive their connections, on either side.
    let (_l, mut l_sub) = keeping_subscriber(local.mqtt, "l-keep", "local/cmd/#").await;
    let (r, _) = keeping_subscriber(remote.mqtt, "r-keep", "remote/sensors/#").await;
    drop(r);
    remote.shutdown();
    wait_up(&local, "p", 0.0).await;
    // Out: acknowledged by the local broker while the remote one is down.
    let mut l_pub = client(local.mqtt, "l-pub-2").await;
    for i in 0..20 {
        publish(
            &mut l_pub,
            &format!("local/sensors/d{i}"),
            &format!("down-{i}"),
        )
        .await;
    }
    remote.restart();
    // In: acknowledged by the remote broker before the bridge is back.
    let mut r_pub = client(remote.mqtt, "r-pub-2").await;
    for i in 0..20 {
        publish(&mut r_pub, &format!("remote/cmd/u{i}"), &format!("up-{i}")).await;
    }
    wait_up(&local, "p", 1.0).await;
    let (_r, mut r_sub) = keeping_subscriber(remote.mqtt, "r-keep", "remote/sensors/#").await;
    let out = distinct_payloads(&mut r_sub, 20).await;
    assert_eq!(out, (0..20).map(|i| format!("down-{i}")).collect());
    let in_ = distinct_payloads(&mut l_sub, 20).await;
    assert_eq!(in_, (0..20).map(|i| format!("up-{i}")).collect());
    assert!(remote.metrics().get(direct) >= 1.0);
    local.stop();
    remote.stop();
}

#[tokio::test]
async fn a_broker_with_a_p2p_listener_bridges_with_the_listeners_node() {
    let mut local = Broker::configured("", &["p2p://127.0.0.1:0"]);
    let local_id = node_id(&local.data_dir());
    let remote = Broker::start_with(
        &format!("[p2p]\nallow = ['{local_id}']\n"),
        &["p2p://127.0.0.1:0"],
    );
    let url = format!(
        "p2p://{}?addr={}",
        remote.node_id.as_ref().unwrap(),
        remote.node_direct[0]
    );
    std::fs::write(
        local.root().join("mqttd.toml"),
        bridge_toml("p", &quoted(&url), PREFIXED, ""),
    )
    .unwrap();
    local.log_json("warn,mqttd_broker::bridge=info");
    local.restart();
    assert_eq!(local.node_id.as_deref(), Some(local_id.as_str()));
    wait_up(&local, "p", 1.0).await;
    carries_both_ways(local.mqtt, remote.mqtt).await;
    let log = local.log_text();
    assert!(log.contains("bridge peer-to-peer connection open"), "{log}");
    assert!(!log.contains("node for bridges bound"), "{log}");
    local.stop();
    remote.stop();
}

#[tokio::test]
async fn a_p2p_url_nobody_answers_falls_back_to_the_next_url() {
    let remote = Broker::start("");
    // A node id nobody runs, at an address where nothing listens: the attempt times out.
    let nobody = node_id(tempfile::tempdir().unwrap().path());
    let urls = format!(
        "{}, {}",
        quoted(&format!(
            "p2p://{nobody}?addr=127.0.0.1:{}",
            free_udp_port()
        )),
        quoted(&format!("mqtt://127.0.0.1:{}", remote.mqtt.port()))
    );
    let local = Broker::start(&bridge_toml("f", &urls, PREFIXED, "connect_timeout = 1"));
    wait_up(&local, "f", 1.0).await;
    carries_both_ways(local.mqtt, remote.mqtt).await;
    local.stop();
    remote.stop();
}

#[tokio::test]
async fn a_p2p_bridge_url_that_names_no_node_stops_the_broker() {
    let mut broker = Broker::configured(
        &bridge_toml("peer", "\"p2p://nobody?addr=127.0.0.1:1\"", &["a/#"], ""),
        &[],
    );
    let failure = broker.try_restart().expect_err("the broker started");
    assert!(failure.stderr.contains("bridge \"peer\""), "{failure}");
    assert!(failure.stderr.contains("no node id"), "{failure}");
}

// ---------------------------------------------------------------------------------------------
// Reloading bridges (SIGHUP)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sighup_adds_stops_and_restarts_bridges_and_keeps_clients_connected() {
    let remote = Broker::start("");
    let url = quoted(&format!("mqtt://127.0.0.1:{}", remote.mqtt.port()));
    let bridge = |name: &str, rule: &str| bridge_toml(name, &url, &[rule], "");
    let a = bridge("a", "a/# out 1 local/ remote/");
    let local = Broker::start(&a);
    wait_up(&local, "a", 1.0).await;
    // Connected through every reload below: its PUBACKs come on this one connection.
    let mut l_pub = client(local.mqtt, "l-pub").await;
    let (_r, mut r_sub) = subscriber(remote.mqtt, "r-sub", "remote/#").await;
    ready(&l_pub, "local/a/probe", &mut r_sub).await;

    // a removed, b added.
    let config = local.root().join("mqttd.toml");
    std::fs::write(&config, bridge("b", "b/# out 1 local/ remote/")).unwrap();
    local.hangup();
    wait_up(&local, "a", 0.0).await;
    wait_up(&local, "b", 1.0).await;
    ready(&l_pub, "local/b/probe", &mut r_sub).await;
    // a's session stays, and keeps what comes for it while a is gone.
    for i in 0..10 {
        publish(&mut l_pub, &format!("local/a/q{i}"), &format!("a{i}")).await;
    }

    // a back; b changed (another rule): restarted with it.
    let both = format!("{a}\n{}", bridge("b", "c/# out 1 local/ remote/"));
    std::fs::write(&config, both).unwrap();
    local.hangup();
    wait_up(&local, "a", 1.0).await;
    let got = distinct_payloads(&mut r_sub, 10).await;
    assert_eq!(got, (0..10).map(|i| format!("a{i}")).collect());
    ready(&l_pub, "local/c/probe", &mut r_sub).await;
    publish(&mut l_pub, "local/c/after", "c-after").await;
    assert_eq!(
        next_message(&mut r_sub).await,
        ("remote/c/after".to_owned(), "c-after".to_owned())
    );

    // A configuration that cannot be used changes nothing.
    std::fs::write(&config, bridge("x", "a/# sideways 1")).unwrap();
    local.hangup();
    publish(&mut l_pub, "local/a/still", "a-still").await;
    assert_eq!(
        next_message(&mut r_sub).await,
        ("remote/a/still".to_owned(), "a-still".to_owned())
    );
    let m = local.metrics();
    assert_eq!(m.get(&bridge_up("a")), 1.0);
    assert_eq!(m.get(&bridge_up("b")), 1.0);
    local.stop();
    remote.stop();
}

// ---------------------------------------------------------------------------------------------
// Mosquitto at either end
// ---------------------------------------------------------------------------------------------

fn mosquitto_bin() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Skips the test (with a message) when Mosquitto is not installed.
macro_rules! need_mosquitto {
    () => {
        if mosquitto_bin().is_none() {
            eprintln!(
                "SKIPPED: no mosquitto binary; install Debian's mosquitto to run the bridge \
                 interoperability tests"
            );
            return;
        }
    };
}

/// A running `mosquitto` on a port of its own, stopped on drop.
struct Mosquitto {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Mosquitto {
    /// Starts Mosquitto listening on a free loopback port, with `config` besides.
    fn start(dir: &Path, config: &str) -> Self {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        // Running as root, Mosquitto would switch to the `mosquitto` user, who cannot read
        // the temporary directory.
        let config = format!(
            "user root\nlog_dest stderr\nlog_type all\nlistener {port} 127.0.0.1\n\
             allow_anonymous true\n{config}"
        );
        std::fs::write(&conf, config).unwrap();
        let child = Command::new(mosquitto_bin().unwrap())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Self { child, log, port };
        let deadline = Instant::now() + LIMIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = m.child.try_wait() {
                panic!("mosquitto exited with {status}: {}", m.log());
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mosquitto bridges to mqttd with its own configuration (MQTT 3.1.1 and its bridge flag, its
/// defaults): messages cross both ways with prefixes, and a rule both ways does not echo,
/// which needs mqttd to honour the flag.
#[tokio::test]
async fn mosquitto_bridges_to_mqttd() {
    need_mosquitto!();
    let mqttd = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(
        dir.path(),
        &format!(
            "connection to-mqttd\naddress 127.0.0.1:{}\nrestart_timeout 1\n\
             topic sensors/# out 1 local/ remote/\ntopic cmd/# in 1 local/ remote/\n\
             topic loop/# both 1\n",
            mqttd.mqtt.port()
        ),
    );
    carries_both_ways(mosquitto.addr(), mqttd.mqtt).await;
    no_echo(mosquitto.addr(), mqttd.mqtt).await;
    let log = mosquitto.log();
    assert!(!log.contains("Connection Refused"), "{log}");
    mqttd.stop();
}

/// mqttd bridges to Mosquitto, with MQTT 5 (No Local) and with MQTT 3.1.1 and the bridge
/// flag, which Mosquitto honours.
#[tokio::test]
async fn mqttd_bridges_to_mosquitto() {
    need_mosquitto!();
    for version in ["5", "3.1.1"] {
        let dir = tempfile::tempdir().unwrap();
        let mosquitto = Mosquitto::start(dir.path(), "");
        let url = quoted(&format!("mqtt://127.0.0.1:{}", mosquitto.port));
        let mut rules = PREFIXED.to_vec();
        rules.push("loop/# both 1");
        let extra = format!("protocol_version = \"{version}\"");
        let local = Broker::start(&bridge_toml("m", &url, &rules, &extra));
        wait_up(&local, "m", 1.0).await;
        carries_both_ways(local.mqtt, mosquitto.addr()).await;
        no_echo(local.mqtt, mosquitto.addr()).await;
        local.stop();
    }
}
