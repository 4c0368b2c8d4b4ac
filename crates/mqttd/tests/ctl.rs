//! `mqttd ctl` against the real binary (clients, subscriptions, bridges, peers, the
//! configuration, retained messages, publish, stats,
//! listeners, keys), reload through the admin API (a new password file takes effect, a broken
//! one keeps the old rules), and `mqttd check-config` on good and broken configurations.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use mqttd_proto::{MqttStr, Packet, ProtocolVersion, QoS, ReasonCode};
use support::pki::{write, TestCa};
use support::{connect_packet, encode, subscribe_packet, Broker, RawConn, Received};

/// A hang bound for one step.
const STEP: Duration = Duration::from_secs(30);

/// `mqttd ARGS` with no API settings from the environment, unless `env` sets them.
fn mqttd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mqttd"));
    command.args(args);
    for name in [
        "MQTTD_API_URL",
        "MQTTD_API_KEY",
        "MQTTD_API_KEY_FILE",
        "HTTP_PROXY",
        "http_proxy",
    ] {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run mqttd")
}

/// `mqttd ctl --url URL --key KEY ARGS`.
fn ctl(broker: &Broker, key: &str, args: &[&str]) -> Output {
    let url = format!("http://{}", broker.http);
    let mut all = vec!["ctl", "--url", &url, "--key", key];
    all.extend_from_slice(args);
    mqttd(&all, &[])
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The output of a command that must succeed.
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn json(out: Output) -> Value {
    let text = ok(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The table row whose first column is `first`, split into its columns.
fn row<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row {first:?} in\n{table}"))
}

fn key_of(broker: &Broker) -> String {
    broker
        .api_key
        .clone()
        .expect("the first start printed a key")
}

#[tokio::test]
async fn ctl_lists_shows_and_kicks_a_connected_client() {
    let broker = Broker::start("");
    let key = key_of(&broker);
    let mut client = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "ctl-one").await;
    client
        .send(&encode(
            ProtocolVersion::V5,
            &subscribe_packet(1, "a/#", QoS::AtLeastOnce),
        ))
        .await
        .unwrap();
    assert!(
        matches!(client.recv(STEP).await, Received::Packet(p) if matches!(*p, Packet::SubAck(_)))
    );

    // A table with a header and aligned columns.
    let table = ok(ctl(&broker, &key, &["clients", "list"]));
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("CLIENT ID"), "{table}");
    let cols = row(&table, "ctl-one");
    assert_eq!(&cols[1..4], ["true", "-", "tcp"], "{table}");
    let at = |line: &str, word: &str| line.find(word).unwrap();
    let line = table.lines().find(|l| l.starts_with("ctl-one")).unwrap();
    assert_eq!(at(header, "TRANSPORT"), at(line, "tcp"), "{table}");
    // --json: the API's answer as it is.
    let list = json(ctl(
        &broker,
        &key,
        &["clients", "list", "--json", "--prefix", "ctl-"],
    ));
    assert_eq!(list["data"][0]["client_id"], "ctl-one");
    assert_eq!(list["meta"]["count"], 1);

    let shown = ok(ctl(&broker, &key, &["clients", "show", "ctl-one"]));
    assert_eq!(row(&shown, "keep_alive"), ["keep_alive", "60"], "{shown}");
    assert_eq!(row(&shown, "a/#")[1], "1", "{shown}");
    let shown = json(ctl(
        &broker,
        &key,
        &["clients", "show", "ctl-one", "--json"],
    ));
    assert_eq!(shown["subscription_list"][0]["filter"], "a/#");
    let subs = ok(ctl(&broker, &key, &["subscriptions", "ctl-one"]));
    assert!(subs.starts_with("FILTER"), "{subs}");
    assert_eq!(row(&subs, "a/#")[1], "1");
    let sessions = ok(ctl(&broker, &key, &["sessions", "list"]));
    assert_eq!(row(&sessions, "ctl-one")[1], "connected", "{sessions}");

    let kicked = ok(ctl(&broker, &key, &["clients", "kick", "ctl-one"]));
    assert!(kicked.contains("disconnected"), "{kicked}");
    let packets = client.until_closed(STEP).await.expect("closed");
    assert!(
        matches!(packets.as_slice(), [Packet::Disconnect(d)] if d.reason == ReasonCode::AdministrativeAction),
        "{packets:?}"
    );
    // Errors: the API's code and message on standard error, exit status 1.
    let missing = ctl(&broker, &key, &["clients", "show", "nobody"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("not_found"),
        "{}",
        stderr(&missing)
    );
    let missing = ctl(&broker, &key, &["clients", "show", "nobody", "--json"]);
    assert_eq!(missing.status.code(), Some(1));
    let body: Value = serde_json::from_str(&stdout(&missing)).unwrap();
    assert_eq!(body["code"], "not_found");
    broker.stop();
}

#[tokio::test]
async fn ctl_lists_subscriptions_bridges_peers_and_the_configuration() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let config = format!(
        "[[bridge]]\nname = \"nowhere\"\nurls = [\"mqtt://127.0.0.1:{port}\"]\n\
         topics = ['x/# out 0']\npassword = \"ctl-secret-4b1d\"\n\
         reconnect_min = 0.05\nreconnect_max = 0.5\n"
    );
    let broker = Broker::start(&config);
    let key = key_of(&broker);
    let mut one = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "sub-one").await;
    let mut two = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "sub-two").await;
    for (conn, filter) in [(&mut one, "s/+/t"), (&mut two, "s/1/t")] {
        conn.send(&encode(
            ProtocolVersion::V5,
            &subscribe_packet(1, filter, QoS::AtLeastOnce),
        ))
        .await
        .unwrap();
        assert!(
            matches!(conn.recv(STEP).await, Received::Packet(p) if matches!(*p, Packet::SubAck(_)))
        );
    }

    // Every subscription (the bridge's own session included), then selected ones.
    let all = ok(ctl(&broker, &key, &["subscriptions"]));
    assert!(all.starts_with("CLIENT ID"), "{all}");
    assert_eq!(row(&all, "sub-one")[1], "s/+/t", "{all}");
    assert_eq!(row(&all, "sub-two")[1], "s/1/t", "{all}");
    let by_topic = json(ctl(
        &broker,
        &key,
        &["subscriptions", "--topic", "s/2/t", "--json"],
    ));
    assert_eq!(by_topic["meta"]["count"], 1, "{by_topic}");
    assert_eq!(by_topic["data"][0]["client_id"], "sub-one");
    let by_filter = ok(ctl(&broker, &key, &["subscriptions", "--filter", "s/1/t"]));
    assert_eq!(by_filter.lines().count(), 2, "{by_filter}");
    assert_eq!(row(&by_filter, "sub-two")[1], "s/1/t");
    let by_client = json(ctl(
        &broker,
        &key,
        &["subscriptions", "--client", "sub-one", "--json"],
    ));
    assert_eq!(by_client["data"][0]["filter"], "s/+/t");
    assert_eq!(by_client["meta"]["count"], 1);
    let bad = ctl(&broker, &key, &["subscriptions", "--topic", "s/#"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("bad_request"), "{}", stderr(&bad));

    // The bridge to nowhere, once it has failed.
    let bridges = broker
        .eventually(STEP, "the bridge fails", || async {
            let list = json(ctl(&broker, &key, &["bridges", "--json"]));
            list[0]["last_error"].is_string().then_some(list)
        })
        .await;
    assert_eq!(bridges[0]["name"], "nowhere");
    let table = ok(ctl(&broker, &key, &["bridges"]));
    assert!(table.starts_with("NAME"), "{table}");
    let cols = row(&table, "nowhere");
    assert!(["connecting", "backing_off"].contains(&cols[1]), "{table}");
    assert_eq!(cols[2], "mqtt", "{table}");
    assert!(!table.contains("ctl-secret-4b1d"), "{table}");

    // No p2p listener: no links, a header alone.
    let peers = ok(ctl(&broker, &key, &["peers"]));
    assert_eq!(peers.lines().count(), 1, "{peers}");
    assert!(peers.starts_with("NODE ID"), "{peers}");
    assert_eq!(
        json(ctl(&broker, &key, &["peers", "--json"])),
        serde_json::json!([])
    );

    // The configuration: dotted keys, the password redacted either way.
    let config = ok(ctl(&broker, &key, &["config"]));
    assert_eq!(row(&config, "max_qos"), ["max_qos", "2"], "{config}");
    assert_eq!(
        row(&config, "bridge.0.password"),
        ["bridge.0.password", "***"],
        "{config}"
    );
    assert!(!config.contains("ctl-secret-4b1d"), "{config}");
    let config = ok(ctl(&broker, &key, &["config", "--json"]));
    assert!(!config.contains("ctl-secret-4b1d"), "{config}");
    broker.stop();
}

#[tokio::test]
async fn ctl_publishes_lists_and_deletes_retained_messages_and_shows_stats_and_listeners() {
    let broker = Broker::start("");
    let key = key_of(&broker);
    let published = ok(ctl(
        &broker,
        &key,
        &["publish", "ctl/t 1", "hello there", "--retain", "-q", "1"],
    ));
    assert!(published.contains("routed to 0"), "{published}");
    let list = ok(ctl(
        &broker,
        &key,
        &["retained", "list", "--filter", "ctl/#"],
    ));
    assert!(list.starts_with("TOPIC"), "{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("ctl/t 1 ") && l.split_whitespace().skip(2).eq(["1", "11"])),
        "{list}"
    );
    let shown = json(ctl(
        &broker,
        &key,
        &["retained", "show", "ctl/t 1", "--json"],
    ));
    assert_eq!(shown["payload"], "hello there");
    assert_eq!(shown["qos"], 1);

    let stats = ok(ctl(&broker, &key, &["stats"]));
    let retained: u64 = row(&stats, "retained_messages")[1].parse().unwrap();
    assert!(retained >= 1, "{stats}");
    let stats = json(ctl(&broker, &key, &["stats", "--json"]));
    assert!(stats["messages_received"].as_u64().unwrap() >= 1, "{stats}");

    ok(ctl(&broker, &key, &["retained", "delete", "ctl/t 1"]));
    let list = json(ctl(
        &broker,
        &key,
        &["retained", "list", "--filter", "ctl/#", "--json"],
    ));
    assert_eq!(list["meta"]["count"], 0, "{list}");
    let again = ctl(&broker, &key, &["retained", "delete", "ctl/t 1"]);
    assert_eq!(again.status.code(), Some(1));

    let listeners = ok(ctl(&broker, &key, &["listeners"]));
    assert!(listeners.starts_with("URL"), "{listeners}");
    let mqtt = broker.mqtt.to_string();
    let http = broker.http.to_string();
    assert!(
        listeners
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some(&mqtt)),
        "{listeners}"
    );
    assert!(
        listeners
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some(&http)),
        "{listeners}"
    );
    broker.stop();
}

#[test]
fn ctl_says_when_the_key_is_missing_or_wrong_and_takes_it_from_a_file_or_the_environment() {
    let broker = Broker::start("");
    let key = key_of(&broker);
    let url = format!("http://{}", broker.http);

    let wrong = ctl(&broker, "mqttd_wrong", &["stats"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        stderr(&wrong).contains("no or wrong API key"),
        "{}",
        stderr(&wrong)
    );
    let none = mqttd(&["ctl", "--url", &url, "stats"], &[]);
    assert_eq!(none.status.code(), Some(2));
    assert!(stderr(&none).contains("no API key"), "{}", stderr(&none));

    // A key file beats the environment's key; the environment gives the URL.
    let file = write(&broker.root().join("api-key"), &format!("{key}\n"));
    let file = file.to_str().unwrap();
    ok(mqttd(
        &["ctl", "--key-file", file, "stats"],
        &[("MQTTD_API_URL", &url), ("MQTTD_API_KEY", "mqttd_wrong")],
    ));
    ok(mqttd(
        &["ctl", "stats"],
        &[("MQTTD_API_URL", &url), ("MQTTD_API_KEY", &key)],
    ));
    ok(mqttd(
        &["ctl", "stats"],
        &[("MQTTD_API_URL", &url), ("MQTTD_API_KEY_FILE", file)],
    ));
    // Nobody there: exit status 2.
    let unreachable = mqttd(
        &["ctl", "--url", "http://127.0.0.1:1", "--key", &key, "stats"],
        &[],
    );
    assert_eq!(unreachable.status.code(), Some(2));
    assert!(stderr(&unreachable).contains("cannot reach"));
    broker.stop();
}

/// The CONNACK reason for a CONNECT with `user` and `password`.
async fn connack(broker: &Broker, client_id: &str, user: &str, password: &str) -> ReasonCode {
    let Packet::Connect(mut connect) = connect_packet(ProtocolVersion::V5, client_id) else {
        unreachable!("connect_packet makes a CONNECT")
    };
    connect.username = Some(MqttStr::try_from(user).unwrap());
    connect.password = Some(bytes::Bytes::copy_from_slice(password.as_bytes()));
    let mut conn = RawConn::open(broker.mqtt, ProtocolVersion::V5).await;
    conn.send(&encode(ProtocolVersion::V5, &Packet::Connect(connect)))
        .await
        .unwrap();
    match conn.recv(STEP).await {
        Received::Packet(p) => match *p {
            Packet::ConnAck(ack) => ack.reason,
            other => panic!("expected CONNACK, got {other:?}"),
        },
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// The SUBACK reason for one more subscription of `conn`.
async fn suback(conn: &mut RawConn, id: u16, filter: &str) -> ReasonCode {
    conn.send(&encode(
        ProtocolVersion::V5,
        &subscribe_packet(id, filter, QoS::AtLeastOnce),
    ))
    .await
    .unwrap();
    match conn.recv(STEP).await {
        Received::Packet(p) => match *p {
            Packet::SubAck(ack) => ack.reasons[0],
            other => panic!("expected SUBACK, got {other:?}"),
        },
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn passwd(file: &Path, user: &str, password: &str) {
    ok(mqttd(
        &["passwd", file.to_str().unwrap(), user, "-p", password],
        &[],
    ));
}

#[tokio::test]
async fn reload_through_the_api_applies_a_new_password_file_and_a_broken_one_changes_nothing() {
    let mut broker = Broker::configured("", &[]);
    let passwords = broker.root().join("passwd");
    let config = format!("password_file = {:?}\n", passwords.to_str().unwrap());
    write(&broker.root().join("mqttd.toml"), &config);
    passwd(&passwords, "old", "old-secret");
    broker.log_json("mqttd_broker=info");
    broker.restart();
    let key = key_of(&broker);
    assert_eq!(
        connack(&broker, "c1", "old", "old-secret").await,
        ReasonCode::Success
    );
    assert_eq!(
        connack(&broker, "c2", "new", "new-secret").await,
        ReasonCode::BadUserNameOrPassword
    );

    passwd(&passwords, "new", "new-secret");
    let reloaded = ok(ctl(&broker, &key, &["reload"]));
    assert!(reloaded.contains("access"), "{reloaded}");
    assert!(reloaded.contains("nothing needs a restart"), "{reloaded}");
    assert_eq!(
        connack(&broker, "c3", "new", "new-secret").await,
        ReasonCode::Success
    );

    // A broken password file: an error, and the rules before it stay.
    let good = std::fs::read(&passwords).unwrap();
    write(&passwords, "this is not a password file line\n");
    let failed = ctl(&broker, &key, &["reload"]);
    assert_eq!(failed.status.code(), Some(1), "{}", stdout(&failed));
    assert!(
        stderr(&failed).contains("reload_failed"),
        "{}",
        stderr(&failed)
    );
    assert!(stderr(&failed).contains("access"), "{}", stderr(&failed));
    let failed = ctl(&broker, &key, &["reload", "--json"]);
    assert_eq!(failed.status.code(), Some(1));
    let failed: Value = serde_json::from_str(&stdout(&failed)).unwrap();
    assert_eq!(failed["ok"], false);
    assert_eq!(failed["errors"][0]["part"], "access");
    assert_eq!(
        connack(&broker, "c4", "new", "new-secret").await,
        ReasonCode::Success
    );
    assert_eq!(
        connack(&broker, "c5", "old", "old-secret").await,
        ReasonCode::Success
    );

    // A broken configuration: nothing changes either, the password file included.
    std::fs::write(&passwords, &good).unwrap();
    passwd(&passwords, "newer", "newer-secret");
    write(
        &broker.root().join("mqttd.toml"),
        &format!("{config}max_keepalive = ["),
    );
    let failed = ctl(&broker, &key, &["reload"]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(stderr(&failed).contains("config"), "{}", stderr(&failed));
    assert_eq!(
        connack(&broker, "c6", "newer", "newer-secret").await,
        ReasonCode::BadUserNameOrPassword
    );

    // A session with two subscriptions, before a lower max_subscriptions.
    let mut subscriber = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "subs").await;
    assert_eq!(
        suback(&mut subscriber, 1, "one/#").await,
        ReasonCode::GrantedQoS1
    );

    // Fixed, with a limit that applies at once and a setting that needs a restart: reloaded,
    // and the answer and the log line say what waits for the restart.
    write(
        &broker.root().join("mqttd.toml"),
        &format!("{config}max_queued_messages = 7\nmax_subscriptions = 1\nmax_topic_levels = 2\n"),
    );
    let reloaded = ok(ctl(&broker, &key, &["reload"]));
    assert!(reloaded.contains("limits"), "{reloaded}");
    assert!(
        reloaded.contains("needs a restart to take effect: max_queued_messages"),
        "{reloaded}"
    );
    assert_eq!(
        suback(&mut subscriber, 2, "two/#").await,
        ReasonCode::QuotaExceeded
    );
    // The topic limit too: three levels are now too many, two are not.
    assert_eq!(
        suback(&mut subscriber, 3, "one/two/three").await,
        ReasonCode::TopicFilterInvalid
    );
    assert_eq!(
        suback(&mut subscriber, 4, "one/#").await,
        ReasonCode::GrantedQoS1
    );
    assert_eq!(
        connack(&broker, "c7", "newer", "newer-secret").await,
        ReasonCode::Success
    );
    // SIGHUP does the same, and answers in the log.
    broker.hangup();
    broker
        .eventually(
            STEP,
            "two reload lines name max_queued_messages",
            || async {
                let lines = broker
                    .log_records()
                    .into_iter()
                    .filter(|r| {
                        r["fields"]["message"].as_str().is_some_and(|m| {
                            m.contains("needs a restart to take effect: max_queued_messages")
                        })
                    })
                    .count();
                (lines >= 2).then_some(lines)
            },
        )
        .await;
    assert!(broker
        .log_text()
        .contains("reload failed, the previous configuration stays"));
    broker.stop();
}

/// Writes `config` as `mqttd.toml` in `dir` and runs `mqttd check-config` on it.
fn check(dir: &Path, config: &str) -> Output {
    let file = write(&dir.join("mqttd.toml"), config);
    mqttd(
        &[
            "check-config",
            file.to_str().unwrap(),
            "--data-dir",
            dir.join("data").to_str().unwrap(),
        ],
        &[],
    )
}

/// The problems `mqttd check-config` printed, asserting exit status 1.
fn problems(out: Output) -> String {
    assert_eq!(out.status.code(), Some(1), "stdout: {}", stdout(&out));
    assert!(stdout(&out).is_empty());
    stderr(&out)
}

#[test]
fn check_config_passes_a_good_configuration_and_names_each_problem_of_broken_ones() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ca = TestCa::new("check");
    let (cert, key) = ca.server("localhost").write_to(dir, "server");
    let passwords = dir.join("passwd");
    passwd(&passwords, "u", "p");
    let acl = write(&dir.join("acl"), "user u\ntopic readwrite a/#\n");
    let good = format!(
        "listen = ['tcp://127.0.0.1:0', 'tls://127.0.0.1:0', 'http://127.0.0.1:0']\n\
         password_file = {:?}\nacl_file = {:?}\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        passwords.to_str().unwrap(),
        acl.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let out = check(dir, &good);
    assert_eq!(ok(out).trim(), "ok");
    // Nothing was written: no data directory, no generated certificates.
    assert!(!dir.join("data").exists());
    // The generated certificates need no files.
    assert_eq!(
        ok(check(dir, "listen = ['tls://127.0.0.1:0']\n")).trim(),
        "ok"
    );

    let bad_toml = problems(check(dir, "listen = ['tcp://127.0.0.1:0'"));
    assert!(bad_toml.contains("mqttd.toml"), "{bad_toml}");
    let unknown = problems(check(dir, "max_keepalvie = 5\n"));
    assert!(unknown.contains("max_keepalvie"), "{unknown}");

    let bad_listener = problems(check(dir, "listen = ['gopher://127.0.0.1:70']\n"));
    assert!(bad_listener.contains("listen: "), "{bad_listener}");
    assert!(bad_listener.contains("gopher"), "{bad_listener}");

    let missing_cert = good.replace(cert.to_str().unwrap(), "/nonexistent/server.pem");
    let missing_cert = problems(check(dir, &missing_cert));
    assert!(missing_cert.contains("tls: "), "{missing_cert}");
    assert!(
        missing_cert.contains("/nonexistent/server.pem"),
        "{missing_cert}"
    );

    // A password file that cannot be read (a directory), and a broken ACL: both reported.
    let both = good
        .replace(passwords.to_str().unwrap(), dir.to_str().unwrap())
        .replace(acl.to_str().unwrap(), "/nonexistent/acl");
    let both = problems(check(dir, &both));
    assert!(both.contains("password_file: "), "{both}");
    assert!(both.contains("acl_file: "), "{both}");
    assert_eq!(both.lines().count(), 2, "{both}");

    let garbage = write(&dir.join("garbage"), "no colon here\n");
    let broken = good.replace(passwords.to_str().unwrap(), garbage.to_str().unwrap());
    let broken = problems(check(dir, &broken));
    assert!(broken.contains("password_file: "), "{broken}");
}
