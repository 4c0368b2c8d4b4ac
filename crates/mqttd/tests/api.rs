//! The admin API of the real binary, over HTTP on its `http://` listener: keys (no key, a
//! wrong key, the limit on failures per source address), `mqttd api-key create`, the client
//! list, a client's details and its kick (DISCONNECT 0x98 for MQTT 5, a plain close for
//! 3.1.1), all subscriptions filtered by filter, topic or client, bridges (state, traffic, last
//! error), peer-to-peer links (direct, address, round trip; a p2p bridge's both ends), a QUIC
//! client's path, the configuration with passwords redacted, retained messages, publishing,
//! and the OpenAPI document.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use mqttd_proto::{Packet, ProtocolVersion, QoS, ReasonCode};
use support::{
    encode, publish_packet, session_connect_packet, subscribe_packet, Broker, RawConn, Received,
};

/// A hang bound for one step.
const STEP: Duration = Duration::from_secs(30);
/// The failures in a row a source may make before it is answered 429 (the broker's default).
const BURST: usize = 10;

/// An HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.head, self.body))
    }
}

/// One HTTP/1.1 request from `from` (a loopback address), with `key` as bearer token.
async fn request(
    addr: SocketAddr,
    from: IpAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("bind the source");
    let mut stream = tokio::time::timeout(STEP, socket.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect to the HTTP listener");
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(key) = key {
        text.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    match body {
        Some(body) => text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => text.push_str("\r\n"),
    }
    stream.write_all(text.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut response))
        .await
        .expect("answer in time")
        .expect("read the answer");
    let response = String::from_utf8(response).expect("UTF-8 answer");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    // Bodies here are small and sent whole with a length, or chunked in one chunk.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.split_once("\r\n")
            .map(|(_, rest)| rest.rsplit_once("\r\n0\r\n").map_or(rest, |(b, _)| b))
            .unwrap_or_default()
            .to_owned()
    } else {
        body.to_owned()
    };
    Answer {
        status,
        head: head.to_owned(),
        body,
    }
}

fn localhost() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

async fn get(broker: &Broker, path: &str, key: &str) -> Answer {
    request(broker.http, localhost(), "GET", path, Some(key), None).await
}

#[tokio::test]
async fn no_key_or_a_wrong_key_is_refused_and_failures_are_limited_per_source() {
    let broker = Broker::start("");
    let key = broker
        .api_key
        .clone()
        .expect("the first start printed a key");
    let http = broker.http;
    let lo = localhost();

    let answer = request(http, lo, "GET", "/api/v1/clients", None, None).await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(answer.json()["code"], "unauthorized");
    assert!(
        answer
            .head
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{answer:?}"
    );
    // Not only the known paths: nothing under /api/ is answered without a key.
    let answer = request(http, lo, "GET", "/api/v1/nothing", None, None).await;
    assert_eq!(answer.status, 401);
    // Health and metrics stay open.
    assert_eq!(
        request(http, lo, "GET", "/health", None, None).await.status,
        200
    );
    assert_eq!(
        request(http, lo, "GET", "/metrics", None, None)
            .await
            .status,
        200
    );

    // A wrong key: 401 for the first BURST attempts, then 429 (tokens come back every few
    // seconds, so a slow machine may get a few more 401s first; never fewer).
    let mut statuses = Vec::new();
    for _ in 0..BURST * 2 {
        let answer = request(
            http,
            lo,
            "GET",
            "/api/v1/clients",
            Some("mqttd_wrong"),
            None,
        )
        .await;
        statuses.push(answer.status);
        if answer.status == 429 {
            assert_eq!(answer.json()["code"], "rate_limited");
            assert!(answer.head.to_ascii_lowercase().contains("retry-after:"));
            break;
        }
        assert_eq!(answer.status, 401, "{answer:?}");
        assert_eq!(answer.json()["code"], "unauthorized");
    }
    assert!(
        statuses.len() > BURST && statuses.last() == Some(&429),
        "statuses: {statuses:?}"
    );
    // Limited, even with the right key, from that address...
    let answer = request(http, lo, "GET", "/api/v1/clients", Some(&key), None).await;
    assert_eq!(answer.status, 429);
    // ... while another address is not concerned.
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let answer = request(http, other, "GET", "/api/v1/clients", Some(&key), None).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    broker.stop();
}

#[tokio::test]
async fn a_created_key_lists_shows_and_kicks_real_clients() {
    let mut broker = Broker::configured("", &[]);
    // A key created before the first start: then the broker creates none of its own.
    std::fs::create_dir_all(broker.data_dir()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(["api-key", "create", "ops", "--data-dir"])
        .arg(broker.data_dir())
        .output()
        .expect("run mqttd api-key create");
    assert!(out.status.success(), "{out:?}");
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("mqttd_"), "{key}");
    broker.restart();
    assert_eq!(broker.api_key, None, "a second key was created");

    // The key file: private, and only hashes in it.
    let file = broker.data_dir().join("api-keys");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(&key) && !text.contains(&key["mqttd_".len()..]));
    assert!(text.contains("ops "));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    let mut v5 = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "kick-me").await;
    v5.send(&encode(
        ProtocolVersion::V5,
        &subscribe_packet(1, "a/#", QoS::AtLeastOnce),
    ))
    .await
    .unwrap();
    assert!(matches!(v5.recv(STEP).await, Received::Packet(p) if matches!(*p, Packet::SubAck(_))));
    let mut v311 = RawConn::connected(broker.mqtt, ProtocolVersion::V3_1_1, "kick-old").await;
    let _bystander = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "other").await;

    // The list, filtered and paginated.
    let list = get(&broker, "/api/v1/clients?client_id_prefix=kick", &key).await;
    assert_eq!(list.status, 200, "{list:?}");
    let list = list.json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["kick-me", "kick-old"]);
    assert_eq!(list["meta"]["count"], 2);
    let first = &list["data"][0];
    assert_eq!(first["connected"], true);
    assert_eq!(first["transport"], "tcp");
    assert_eq!(first["protocol_version"], "5.0");
    assert_eq!(first["subscriptions"], 1);
    assert!(first["peer_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let page = get(&broker, "/api/v1/clients?limit=1&page=2", &key)
        .await
        .json();
    assert_eq!(page["data"][0]["client_id"], "kick-old");
    assert_eq!(page["meta"]["has_next"], true);
    let none = get(&broker, "/api/v1/clients?transport=ws", &key)
        .await
        .json();
    assert_eq!(none["meta"]["count"], 0);
    let offline = get(&broker, "/api/v1/clients?connected=false", &key)
        .await
        .json();
    assert_eq!(offline["meta"]["count"], 0);

    // One client in full.
    let client = get(&broker, "/api/v1/clients/kick-me", &key).await;
    assert_eq!(client.status, 200, "{client:?}");
    let client = client.json();
    assert_eq!(client["keep_alive"], 60);
    assert_eq!(client["clean_start"], true);
    assert_eq!(client["subscription_list"][0]["filter"], "a/#");
    assert_eq!(client["subscription_list"][0]["qos"], 1);
    assert!(client["bytes_in"].as_u64().unwrap() > 0);
    assert!(client["bytes_out"].as_u64().unwrap() > 0);
    let subs = get(&broker, "/api/v1/clients/kick-me/subscriptions", &key)
        .await
        .json();
    assert_eq!(subs[0]["filter"], "a/#");

    // Every session's subscriptions, filtered and paginated.
    let mut bystander_sub = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "sub-b").await;
    bystander_sub
        .send(&encode(
            ProtocolVersion::V5,
            &subscribe_packet(1, "a/b", QoS::AtMostOnce),
        ))
        .await
        .unwrap();
    assert!(
        matches!(bystander_sub.recv(STEP).await, Received::Packet(p) if matches!(*p, Packet::SubAck(_)))
    );
    let all = get(&broker, "/api/v1/subscriptions", &key).await;
    assert_eq!(all.status, 200, "{all:?}");
    let all = all.json();
    assert_eq!(all["meta"]["count"], 2, "{all}");
    assert_eq!(all["data"][0]["client_id"], "kick-me");
    assert_eq!(all["data"][0]["filter"], "a/#");
    assert_eq!(all["data"][0]["qos"], 1);
    assert_eq!(all["data"][0]["connected"], true);
    assert_eq!(all["data"][1]["client_id"], "sub-b");
    let by_topic = get(&broker, "/api/v1/subscriptions?topic=a/b", &key)
        .await
        .json();
    assert_eq!(by_topic["meta"]["count"], 2, "{by_topic}");
    let by_topic = get(&broker, "/api/v1/subscriptions?topic=a/c", &key)
        .await
        .json();
    assert_eq!(by_topic["meta"]["count"], 1, "{by_topic}");
    assert_eq!(by_topic["data"][0]["client_id"], "kick-me");
    let by_filter = get(&broker, "/api/v1/subscriptions?filter=a/b", &key)
        .await
        .json();
    assert_eq!(by_filter["meta"]["count"], 1, "{by_filter}");
    assert_eq!(by_filter["data"][0]["client_id"], "sub-b");
    let by_client = get(&broker, "/api/v1/subscriptions?client_id=sub-b", &key)
        .await
        .json();
    assert_eq!(by_client["data"][0]["filter"], "a/b");
    assert_eq!(by_client["meta"]["count"], 1);
    let unknown = get(&broker, "/api/v1/subscriptions?client_id=nobody", &key)
        .await
        .json();
    assert_eq!(unknown["meta"]["count"], 0);
    let page = get(&broker, "/api/v1/subscriptions?limit=1&page=2", &key)
        .await
        .json();
    assert_eq!(page["data"][0]["client_id"], "sub-b");
    assert_eq!(page["meta"]["has_next"], false);
    let bad = get(&broker, "/api/v1/subscriptions?topic=a/%23", &key).await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(bad.json()["code"], "bad_request");

    // Kick the MQTT 5 client: DISCONNECT 0x98, and its session (expiry 0) is gone.
    let kicked = request(
        broker.http,
        localhost(),
        "DELETE",
        "/api/v1/clients/kick-me",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(kicked.status, 204, "{kicked:?}");
    let packets = v5.until_closed(STEP).await.expect("closed");
    assert!(
        matches!(packets.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::AdministrativeAction),
        "{packets:?}"
    );
    broker
        .eventually(STEP, "the kicked client leaves the list", || async {
            let list = get(&broker, "/api/v1/clients", &key).await.json();
            let ids: Vec<String> = list["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["client_id"].as_str().unwrap().to_owned())
                .collect();
            (!ids.iter().any(|i| i == "kick-me")).then_some(ids)
        })
        .await;
    let gone = get(&broker, "/api/v1/clients/kick-me", &key).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["code"], "not_found");

    // An MQTT 3.1.1 client is closed without a DISCONNECT (3.1.1 has none from the server).
    let kicked = request(
        broker.http,
        localhost(),
        "DELETE",
        "/api/v1/clients/kick-old",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(kicked.status, 204);
    let packets = v311.until_closed(STEP).await.expect("closed");
    assert!(packets.is_empty(), "{packets:?}");
    // A persistent session outlives its kicked connection: it stays, offline.
    let mut keeper = RawConn::open(broker.mqtt, ProtocolVersion::V5).await;
    keeper
        .send(&encode(
            ProtocolVersion::V5,
            &session_connect_packet(ProtocolVersion::V5, "keeper", Some(3600)),
        ))
        .await
        .unwrap();
    assert!(
        matches!(keeper.recv(STEP).await, Received::Packet(p) if matches!(*p, Packet::ConnAck(_)))
    );
    let kicked = request(
        broker.http,
        localhost(),
        "DELETE",
        "/api/v1/clients/keeper",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(kicked.status, 204);
    keeper.until_closed(STEP).await.expect("closed");
    let session = broker
        .eventually(STEP, "the kept session goes offline", || async {
            let session = get(&broker, "/api/v1/sessions/keeper", &key).await.json();
            (session["state"] == "offline").then_some(session)
        })
        .await;
    assert_eq!(session["persistent"], true);
    assert_eq!(session["expiry_interval"], 3600);
    let offline = get(&broker, "/api/v1/sessions?connected=false", &key)
        .await
        .json();
    assert_eq!(offline["data"][0]["client_id"], "keeper");
    // Kicking it again: nobody is connected.
    let again = request(
        broker.http,
        localhost(),
        "DELETE",
        "/api/v1/clients/keeper",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["code"], "not_connected");
    // A connected client's session cannot be discarded; an offline one can, and is gone.
    let refused = request(
        broker.http,
        localhost(),
        "DELETE",
        "/api/v1/sessions/other",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(refused.status, 409);
    assert_eq!(refused.json()["code"], "connected");
    let discarded = request(
        broker.http,
        localhost(),
        "DELETE",
        "/api/v1/sessions/keeper",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(discarded.status, 204, "{discarded:?}");
    assert_eq!(
        get(&broker, "/api/v1/sessions/keeper", &key).await.status,
        404
    );

    let unknown = request(
        broker.http,
        localhost(),
        "DELETE",
        "/api/v1/clients/nobody",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["code"], "not_found");
    broker.stop();
}

#[tokio::test]
async fn retained_messages_publishing_listeners_stats_and_the_openapi_document() {
    let broker = Broker::start("");
    let key = broker
        .api_key
        .clone()
        .expect("the first start printed a key");
    let post = |path: &'static str, body: &'static str| {
        let key = key.clone();
        let http = broker.http;
        async move { request(http, localhost(), "POST", path, Some(&key), Some(body)).await }
    };

    let doc = get(&broker, "/api/v1/openapi.json", &key).await;
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/clients",
        "/api/v1/clients/{client_id}",
        "/api/v1/retained/{topic}",
        "/api/v1/publish",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }

    // Publish a retained message, read it, list it, delete it.
    let published = post(
        "/api/v1/publish",
        r#"{"topic":"site/1/state","payload":"up","qos":1,"retain":true}"#,
    )
    .await;
    assert_eq!(published.status, 200, "{published:?}");
    let read = get(&broker, "/api/v1/retained/site/1/state", &key).await;
    assert_eq!(read.status, 200, "{read:?}");
    let read = read.json();
    assert_eq!(
        (read["payload"].as_str(), read["qos"].as_u64()),
        (Some("up"), Some(1))
    );
    let binary = post(
        "/api/v1/publish",
        r#"{"topic":"site/2/raw","payload":"/wA=","payload_encoding":"base64","retain":true}"#,
    )
    .await;
    assert_eq!(binary.status, 200);
    let raw = get(&broker, "/api/v1/retained/site/2/raw", &key)
        .await
        .json();
    assert_eq!(
        (raw["payload"].as_str(), raw["payload_encoding"].as_str()),
        (Some("/wA="), Some("base64"))
    );
    let list = get(&broker, "/api/v1/retained?filter=site/%2B/state", &key)
        .await
        .json();
    assert_eq!(list["meta"]["count"], 1);
    assert_eq!(list["data"][0]["topic"], "site/1/state");
    let deleted = request(
        broker.http,
        localhost(),
        "DELETE",
        "/api/v1/retained/site/1/state",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(deleted.status, 204);
    assert_eq!(
        get(&broker, "/api/v1/retained/site/1/state", &key)
            .await
            .status,
        404
    );

    // Bad requests say why, with a code.
    let bad = post("/api/v1/publish", r#"{"topic":"a/#","payload":"x"}"#).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["code"], "bad_request");
    let bad = post("/api/v1/publish", "not json").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["code"], "bad_request");

    let listeners = get(&broker, "/api/v1/listeners", &key).await.json();
    let kinds: Vec<&str> = listeners
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["tcp", "ws", "http"]);
    assert_eq!(listeners[0]["addr"], broker.mqtt.to_string());

    // A client over TCP, counted by transport (it has its CONNACK: it is counted).
    let _tcp = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "stats-tcp").await;

    // The listener's counters: a client that publishes twice and leaves still counts, after
    // it is gone, in its listener's totals, and in no other listener's.
    let mut leaving = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "totals-tcp").await;
    for id in 1..=2 {
        let publish = publish_packet("totals/x", b"12345".to_vec(), QoS::AtLeastOnce, false, id);
        leaving
            .send(&encode(ProtocolVersion::V5, &publish))
            .await
            .unwrap();
        match leaving.recv(Duration::from_secs(10)).await {
            Received::Packet(p) => assert!(matches!(*p, Packet::PubAck(_)), "{p:?}"),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    drop(leaving);
    let listeners = broker
        .eventually(
            Duration::from_secs(10),
            "the leaving client gone, its counters in the listener's totals",
            || async {
                let listeners = get(&broker, "/api/v1/listeners", &key).await.json();
                // Live, ending or ended, the connection is counted once in every listing.
                assert_eq!(listeners[0]["messages_in"], 2, "{}", listeners[0]);
                (listeners[0]["clients"] == 1).then_some(listeners)
            },
        )
        .await;
    let (tcp, ws) = (&listeners[0], &listeners[1]);
    assert!(tcp["connections_total"].as_u64().unwrap() >= 2, "{tcp}");
    // Two PUBLISH packets of at least 5 + 8 bytes, besides CONNECT.
    assert!(tcp["bytes_in"].as_u64().unwrap() > 26, "{tcp}");
    assert!(tcp["bytes_out"].as_u64().unwrap() > 0, "{tcp}");
    assert_eq!(
        (ws["connections_total"].as_u64(), ws["messages_in"].as_u64()),
        (Some(0), Some(0)),
        "{ws}"
    );
    let stats = get(&broker, "/api/v1/stats", &key).await.json();
    // site/2/raw, and the $SYS topics.
    assert!(stats["retained_messages"].as_u64().unwrap() >= 1);
    assert!(stats["messages_received"].as_u64().unwrap() >= 2);
    let by_transport = &stats["clients_by_transport"];
    assert_eq!(
        (by_transport["tcp"].as_i64(), by_transport["ws"].as_i64()),
        (Some(1), Some(0)),
        "{stats}"
    );
    assert_eq!(by_transport.as_object().unwrap().len(), 7, "{stats}");
    assert_eq!(stats["quic"]["connections"], 0);
    assert_eq!(stats["p2p"]["connections_open"], 0);
    assert_eq!(stats["bridges"], serde_json::json!([]));
    broker.stop();
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn post(addr: SocketAddr, path: &str, key: &str, body: &str) -> Answer {
    request(addr, localhost(), "POST", path, Some(key), Some(body)).await
}

/// The bridge named `name` in `/api/v1/bridges`.
fn bridge_named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .expect("a list of bridges")
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bridge {name}: {list}"))
}

const BRIDGE_PASSWORD: &str = "bridge-pw-never-shown-7f3a";

#[tokio::test]
async fn bridges_show_their_state_traffic_and_last_error_and_the_config_hides_passwords() {
    let remote = Broker::start("");
    let remote_key = remote.api_key.clone().expect("a key");
    let config = format!(
        "[[bridge]]\nname = \"up\"\nurls = [\"mqtt://127.0.0.1:{}\"]\n\
         topics = ['out/# out 1', 'in/# in 1']\nusername = \"bridge\"\npassword = \"{BRIDGE_PASSWORD}\"\n\
         reconnect_min = 0.05\nreconnect_max = 0.5\n\n\
         [[bridge]]\nname = \"down\"\nurls = [\"mqtt://127.0.0.1:{}\"]\ntopics = ['x/# out 0']\n\
         reconnect_min = 0.05\nreconnect_max = 0.5\n",
        remote.mqtt.port(),
        closed_port()
    );
    let local = Broker::start(&config);
    let key = local.api_key.clone().expect("a key");

    let up = local
        .eventually(STEP, "bridge up connects", || async {
            let list = get(&local, "/api/v1/bridges", &key).await.json();
            let up = bridge_named(&list, "up").clone();
            (up["state"] == "connected").then_some(up)
        })
        .await;
    assert_eq!(up["transport"], "mqtt");
    assert_eq!(up["local_client_id"], "$bridge/up");
    assert_eq!(
        up["remote"],
        format!("mqtt://127.0.0.1:{}", remote.mqtt.port())
    );
    assert_eq!(up["protocol_version"], "5.0");
    assert_eq!(up["topics"][0], "out/# out 1");
    assert!(up["since"].as_u64().unwrap() > 0);

    // Messages out: published here, taken by the remote broker.
    let answer = post(
        local.http,
        "/api/v1/publish",
        &key,
        r#"{"topic":"out/a","payload":"1","qos":1}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // Messages in: published on the remote broker (again until the bridge's subscription
    // there is in place).
    let up = local
        .eventually(STEP, "messages cross both ways", || async {
            post(
                remote.http,
                "/api/v1/publish",
                &remote_key,
                r#"{"topic":"in/a","payload":"1","qos":1}"#,
            )
            .await;
            let list = get(&local, "/api/v1/bridges", &key).await.json();
            let up = bridge_named(&list, "up").clone();
            (up["messages_out"].as_u64() >= Some(1) && up["messages_in"].as_u64() >= Some(1))
                .then_some(up)
        })
        .await;
    assert_eq!(up["messages_dropped"], 0);
    assert_eq!(up["last_error"], Value::Null);

    // The bridge to nowhere backs off and says why.
    let down = local
        .eventually(STEP, "bridge down fails", || async {
            let list = get(&local, "/api/v1/bridges", &key).await.json();
            let down = bridge_named(&list, "down").clone();
            down["last_error"].is_string().then_some(down)
        })
        .await;
    assert!(
        ["connecting", "backing_off"].contains(&down["state"].as_str().unwrap()),
        "{down}"
    );
    assert_eq!(down["messages_out"], 0);
    assert!(down["last_error_at"].as_u64().unwrap() > 0);

    let body = get(&local, "/api/v1/bridges", &key).await.body;
    assert!(!body.contains(BRIDGE_PASSWORD), "{body}");

    // The configuration: every setting, the bridge's password redacted.
    let config = get(&local, "/api/v1/config", &key).await;
    assert_eq!(config.status, 200, "{config:?}");
    assert!(!config.body.contains(BRIDGE_PASSWORD), "{}", config.body);
    let config = config.json();
    let bridges = &config["config"]["bridge"];
    assert_eq!(bridges[0]["name"], "up");
    assert_eq!(bridges[0]["username"], "bridge");
    assert_eq!(bridges[0]["password"], "***");
    assert_eq!(bridges[1]["password"], Value::Null);
    assert_eq!(config["config"]["max_qos"], 2);
    assert_eq!(config["config"]["durability"], "sync");
    assert!(config["config"]["quic"]["idle_timeout"].is_u64());
    assert_eq!(config["restart_needed"], serde_json::json!([]));
    let unauthorized = request(local.http, localhost(), "GET", "/api/v1/config", None, None).await;
    assert_eq!(unauthorized.status, 401);
    let unauthorized = request(
        local.http,
        localhost(),
        "GET",
        "/api/v1/bridges",
        None,
        None,
    )
    .await;
    assert_eq!(unauthorized.status, 401);
    assert_eq!(unauthorized.json()["code"], "unauthorized");
    local.stop();
    remote.stop();
}

#[tokio::test]
async fn p2p_peers_show_each_link_its_path_and_round_trip_time() {
    let broker = Broker::start_with(
        "[relay]\nallow_any = true\n",
        &["relay://127.0.0.1:0", "p2p://127.0.0.1:0"],
    );
    let key = broker.api_key.clone().expect("a key");
    let empty = get(&broker, "/api/v1/p2p/peers", &key).await;
    assert_eq!(empty.status, 200, "{empty:?}");
    assert_eq!(empty.json(), serde_json::json!([]));

    // A subscriber that stays, at the node's direct address alone.
    let url = format!("p2p://{}/p/#", broker.node_id.as_ref().unwrap());
    let port = broker.node_direct[0].port();
    let mut sub = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args([
            "sub",
            "-L",
            &url,
            "--peer-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["-C", "1", "-W", "120", "-i", "p2p-sub"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run mqttd sub");
    let peer = broker
        .eventually(STEP, "the subscriber's link is listed", || async {
            let list = get(&broker, "/api/v1/p2p/peers", &key).await.json();
            list.as_array()
                .unwrap()
                .iter()
                .find(|p| p["role"] == "client" && p["path"].is_string())
                .cloned()
        })
        .await;
    assert_eq!(peer["direction"], "inbound");
    assert_eq!(peer["state"], "open");
    assert_eq!(peer["path"], "direct", "{peer}");
    assert!(
        peer["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{peer}"
    );
    assert!(peer["rtt_ms"].as_f64().unwrap() >= 0.0);
    assert!(peer["cwnd"].as_u64().unwrap() > 0);
    assert!(peer["sent_packets"].as_u64().unwrap() > 0);
    assert!(peer["connected_at"].as_u64().unwrap() > 0);
    let node_id = peer["node_id"].as_str().unwrap();
    assert_eq!(node_id.len(), 64, "{peer}");
    assert_ne!(Some(node_id), broker.node_id.as_deref());
    assert!(peer["paths"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["selected"] == true && p["kind"] == "direct"));
    // The same client in the client list, over p2p, with its path.
    let client = get(&broker, "/api/v1/clients/p2p-sub", &key).await.json();
    assert_eq!(client["transport"], "p2p");
    assert_eq!(client["tls_identity"], node_id);
    assert!(
        client["quic"]["rtt_ms"].as_f64().unwrap() >= 0.0,
        "{client}"
    );
    assert!(
        client["quic"]["remote_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{client}"
    );

    // One message, and the subscriber leaves cleanly.
    post(
        broker.http,
        "/api/v1/publish",
        &key,
        r#"{"topic":"p/x","payload":"bye","qos":1}"#,
    )
    .await;
    let status = tokio::time::timeout(STEP, sub.wait())
        .await
        .expect("the subscriber ends")
        .unwrap();
    assert!(status.success());
    broker
        .eventually(STEP, "the link leaves the list", || async {
            let list = get(&broker, "/api/v1/p2p/peers", &key).await.json();
            list.as_array().unwrap().is_empty().then_some(())
        })
        .await;
    broker.stop();
}

#[tokio::test]
async fn a_quic_client_shows_its_path_and_every_client_its_queue_and_counters() {
    let broker = Broker::start_with("", &["quic://127.0.0.1:0"]);
    let key = broker.api_key.clone().expect("a key");
    let ca = broker.data_dir().join("tls").join("ca.pem");
    let url = format!("quic://localhost:{}", broker.quic.port());
    let mut sub = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(["sub", "-L", &url, "--cafile"])
        .arg(&ca)
        .args([
            "-t", "q/#", "-q", "1", "-C", "1", "-W", "120", "-i", "quic-sub",
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run mqttd sub");
    let client = broker
        .eventually(STEP, "the QUIC client is subscribed", || async {
            let client = get(&broker, "/api/v1/clients/quic-sub", &key).await;
            (client.status == 200 && client.json()["subscriptions"] == 1).then(|| client.json())
        })
        .await;
    assert_eq!(client["transport"], "quic");
    let quic = &client["quic"];
    assert!(quic["rtt_ms"].as_f64().unwrap() >= 0.0, "{client}");
    assert!(quic["cwnd"].as_u64().unwrap() > 0, "{client}");
    assert!(quic["sent_packets"].as_u64().unwrap() > 0, "{client}");
    assert!(quic["received_datagrams"].as_u64().unwrap() > 0, "{client}");
    assert!(quic["lost_packets"].is_u64(), "{client}");
    assert_eq!(quic["remote_addr"], client["peer_addr"], "{client}");
    // Queue, in flight and counters are there for every transport.
    for field in [
        "queued",
        "in_flight",
        "bytes_in",
        "bytes_out",
        "messages_in",
        "messages_out",
    ] {
        assert!(client[field].is_u64(), "{field}: {client}");
    }
    let tcp = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "tcp-client").await;
    let tcp_detail = get(&broker, "/api/v1/clients/tcp-client", &key)
        .await
        .json();
    assert_eq!(tcp_detail["quic"], Value::Null);
    for field in [
        "queued",
        "in_flight",
        "bytes_in",
        "bytes_out",
        "messages_in",
    ] {
        assert!(tcp_detail[field].is_u64(), "{field}: {tcp_detail}");
    }
    drop(tcp);
    post(
        broker.http,
        "/api/v1/publish",
        &key,
        r#"{"topic":"q/x","payload":"bye","qos":1}"#,
    )
    .await;
    let status = tokio::time::timeout(STEP, sub.wait())
        .await
        .expect("the subscriber ends")
        .unwrap();
    assert!(status.success());
    broker.stop();
}

#[tokio::test]
async fn a_p2p_bridge_is_an_outbound_peer_link_and_an_inbound_one_on_the_remote() {
    let remote = Broker::start_with("", &["p2p://127.0.0.1:0"]);
    let remote_key = remote.api_key.clone().expect("a key");
    let remote_id = remote.node_id.clone().expect("the remote node id");
    let port = remote.node_direct[0].port();
    let config = format!(
        "[[bridge]]\nname = \"peer\"\nurls = [\"p2p://{remote_id}?addr=127.0.0.1:{port}\"]\n\
         topics = ['x/# out 1']\nreconnect_min = 0.05\nreconnect_max = 0.5\n"
    );
    let local = Broker::start(&config);
    let key = local.api_key.clone().expect("a key");
    let bridge = local
        .eventually(STEP, "the p2p bridge connects", || async {
            let list = get(&local, "/api/v1/bridges", &key).await.json();
            let b = bridge_named(&list, "peer").clone();
            (b["state"] == "connected").then_some(b)
        })
        .await;
    assert_eq!(bridge["transport"], "p2p");
    let links = local
        .eventually(STEP, "the bridge's link is listed", || async {
            let links = get(&local, "/api/v1/p2p/peers", &key).await.json();
            (links.as_array().unwrap().len() == 1 && links[0]["path"].is_string()).then_some(links)
        })
        .await;
    assert_eq!(links[0]["role"], "bridge");
    assert_eq!(links[0]["direction"], "outbound");
    assert_eq!(links[0]["name"], "peer");
    assert_eq!(links[0]["node_id"], remote_id.as_str());
    assert_eq!(links[0]["path"], "direct", "{links}");
    let theirs = remote
        .eventually(STEP, "the remote lists the link", || async {
            let links = get(&remote, "/api/v1/p2p/peers", &remote_key).await.json();
            (links.as_array().unwrap().len() == 1).then_some(links)
        })
        .await;
    assert_eq!(theirs[0]["role"], "client");
    assert_eq!(theirs[0]["direction"], "inbound");
    local.stop();
    remote.stop();
}
