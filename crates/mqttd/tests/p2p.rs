//! The binary's peer-to-peer parts: `mqttd id` (the node key made once, private, and the same
//! id after), a `relay://` listener announcing its URL and stopping on SIGTERM, and MQTT over
//! the `p2p://` listener with `mqttd pub`, `mqttd sub` and `mqttd bench` (`-L p2p://NODE_ID`):
//! through the broker's relay alone and at a direct address alone, single- and multi-stream,
//! the client's node id as its user name for the ACL, and `p2p.allow` refusing a stranger
//! (and letting it in once SIGHUP reloaded a list that names it); `mqttd p2p ping` against the
//! broker's node, through its relay and directly, and stopped early by SIGINT with its summary.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

fn mqttd_id(data_dir: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .arg("id")
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mqttd id");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn mqttd_id_creates_the_key_once_and_prints_the_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = mqttd_id(&data);
    let id = first.trim_end();
    assert_eq!(first, format!("{id}\n"), "one line, the id alone");
    assert_eq!(id.len(), 64);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    let key = data.join("node.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(mqttd_id(&data), first);

    // A key every user may read is refused, with the reason.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .arg("id")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[test]
fn a_relay_listener_prints_its_url_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(["--listen", "relay://127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mqttd");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut listening = None;
    let url = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!("no relay URL printed");
        };
        if let Some(addr) = line.strip_prefix("mqttd listening on relay://") {
            listening = Some(addr.to_owned());
        }
        if let Some(url) = line.strip_prefix("mqttd relay url ") {
            break url.to_owned();
        }
    };
    let addr = listening.expect("the listening line comes first");
    assert_eq!(url, format!("https://{addr}/"));
    // The id exists from the first start on.
    assert!(data.join("node.key").exists());

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mqttd did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT over p2p://
// ---------------------------------------------------------------------------------------------

mod support;

use std::process::Output;

use support::Broker;

fn mqttd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mqttd")
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broker with a relay any node may use and a p2p:// listener whose node uses that relay.
fn p2p_broker(config: &str) -> Broker {
    let config = format!("[relay]\nallow_any = true\n{config}");
    Broker::start_with(&config, &["relay://127.0.0.1:0", "p2p://127.0.0.1:0"])
}

/// How a client reaches the broker's node.
struct Reach {
    url: String,
    flags: Vec<String>,
}

impl Reach {
    /// Through the broker's relay alone: no direct address given.
    fn relay(broker: &Broker) -> Self {
        let ca = broker.data_dir().join("tls/ca.pem");
        Self {
            url: format!("p2p://{}", broker.node_id.as_ref().unwrap()),
            flags: vec![
                "--relay".into(),
                broker.relay_url.clone().unwrap(),
                "--relay-cafile".into(),
                ca.to_str().unwrap().to_owned(),
            ],
        }
    }

    /// At the node's direct address alone: no relay given.
    fn direct(broker: &Broker) -> Self {
        let port = broker.node_direct[0].port();
        Self {
            url: format!("p2p://{}", broker.node_id.as_ref().unwrap()),
            flags: vec!["--peer-addr".into(), format!("127.0.0.1:{port}")],
        }
    }

    /// `tool` with `-L URL/topic`, these flags and `args`.
    fn run(&self, tool: &str, topic: &str, args: &[&str]) -> Output {
        let url = format!("{}/{topic}", self.url);
        let mut all: Vec<&str> = vec![tool, "-L", &url];
        all.extend(self.flags.iter().map(String::as_str));
        all.extend(args);
        mqttd(&all)
    }
}

#[test]
fn pub_and_sub_over_p2p_through_the_relay_alone_and_directly() {
    let broker = p2p_broker("");
    let (relay, direct) = (Reach::relay(&broker), Reach::direct(&broker));
    // Retained, so that the reader needs no head start.
    ok(
        &relay.run("pub", "p/relay", &["-m", "via the relay", "-r", "-q", "1"]),
        "pub through the relay",
    );
    ok(
        &direct.run("pub", "p/direct", &["-m", "direct", "-r", "-q", "2"]),
        "pub directly",
    );
    for (reach, what) in [(&relay, "relay"), (&direct, "direct")] {
        let out = reach.run("sub", "p/#", &["-C", "2", "-W", "60", "-v"]);
        ok(&out, what);
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert_eq!(
            lines,
            ["p/direct direct", "p/relay via the relay"],
            "{what}"
        );
    }

    // Live: a subscriber through the relay gets what a direct publisher sends after it
    // subscribed (sent until it arrives, so that no head start is guessed).
    let url = format!("{}/live", relay.url);
    let mut sub = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(["sub", "-L", &url, "-C", "1", "-W", "60"])
        .args(&relay.flags)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = sub.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the subscriber got nothing");
        ok(
            &direct.run("pub", "live", &["-m", "hello", "-q", "1"]),
            "live pub",
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = sub.wait_with_output().unwrap();
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");

    let metrics = broker.metrics();
    assert!(metrics.get("mqttd_p2p_connections_total{path=\"relayed\"}") >= 1.0);
    assert!(metrics.get("mqttd_p2p_connections_total{path=\"direct\"}") >= 1.0);
    broker.stop();
}

#[test]
fn many_topics_over_p2p_data_streams() {
    let broker = p2p_broker("");
    let reach = Reach::direct(&broker);
    let topics: Vec<String> = (0..6).map(|i| format!("m/{i}")).collect();
    for t in &topics {
        let out = reach.run("pub", t, &["-m", t, "-r", "-q", "1", "--quic-streams", "3"]);
        ok(&out, t);
    }
    let out = reach.run(
        "sub",
        "m/#",
        &[
            "-C",
            "6",
            "-W",
            "60",
            "-v",
            "--quic-streams",
            "2",
            "-t",
            "m/0",
        ],
    );
    ok(&out, "sub");
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    // m/0 matches both filters: once or twice, as the broker delivers overlapping filters.
    assert!(lines >= 6, "{}", String::from_utf8_lossy(&out.stdout));
    broker.stop();
}

#[test]
fn the_clients_node_id_is_its_user_name_for_the_acl() {
    let mut broker = Broker::configured("", &["p2p://127.0.0.1:0"]);
    let acl = broker.root().join("acl");
    std::fs::write(&acl, "pattern readwrite nodes/%u/#\n").unwrap();
    std::fs::write(
        broker.root().join("mqttd.toml"),
        format!(
            "acl_file = '{}'\n[p2p]\nuse_node_id_as_username = true\n",
            acl.display()
        ),
    )
    .unwrap();
    broker.restart();
    // The client's key: made by `mqttd id`, which prints its id.
    let keys = tempfile::tempdir().unwrap();
    let id = mqttd_id(keys.path());
    let id = id.trim();
    let key = keys.path().join("node.key");
    let reach = Reach::direct(&broker);
    let key_flags = ["--key-file", key.to_str().unwrap()];
    let own = format!("nodes/{id}/status");
    let out = reach.run(
        "pub",
        &own,
        &[&["-m", "up", "-r", "-q", "1"][..], &key_flags].concat(),
    );
    ok(&out, "pub to its own topic");
    let out = reach.run(
        "pub",
        "nodes/someone-else/status",
        &[&["-m", "x", "-q", "1"][..], &key_flags].concat(),
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = reach.run(
        "sub",
        &own,
        &[&["-C", "1", "-W", "60"][..], &key_flags].concat(),
    );
    ok(&out, "sub to its own topic");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "up\n");
    // Another key is another user: the topic is not its own.
    let out = reach.run("sub", &own, &["-E", "-W", "60"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    broker.stop();
}

#[test]
fn a_node_the_allow_list_does_not_name_is_refused() {
    let keys = tempfile::tempdir().unwrap();
    let id = mqttd_id(keys.path());
    let key = keys.path().join("node.key");
    let broker = p2p_broker(&format!("[p2p]\nallow = ['{}']\n", id.trim()));
    let reach = Reach::direct(&broker);
    let out = reach.run("pub", "t", &["-m", "x", "-q", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("not allowed"), "{stderr}");
    let out = reach.run(
        "pub",
        "t",
        &["-m", "x", "-q", "1", "--key-file", key.to_str().unwrap()],
    );
    ok(&out, "the allowed node");
    assert_eq!(broker.metrics().get("mqttd_p2p_refused_total"), 1.0);
    broker.stop();
}

#[test]
fn sighup_reloads_the_allow_list() {
    let keys = tempfile::tempdir().unwrap();
    let (a, b) = (keys.path().join("a"), keys.path().join("b"));
    let (id_a, id_b) = (mqttd_id(&a), mqttd_id(&b));
    let (id_a, id_b) = (id_a.trim(), id_b.trim());
    let broker = p2p_broker(&format!("[p2p]\nallow = ['{id_a}']\n"));
    let reach = Reach::direct(&broker);
    let as_b = |m: &str| {
        let key = b.join("node.key");
        reach.run(
            "pub",
            "t",
            &["-m", m, "-q", "1", "--key-file", key.to_str().unwrap()],
        )
    };
    assert_eq!(as_b("refused").status.code(), Some(5));
    std::fs::write(
        broker.root().join("mqttd.toml"),
        format!("[relay]\nallow_any = true\n[p2p]\nallow = ['{id_a}', '{id_b}']\n"),
    )
    .unwrap();
    broker.hangup();
    // The reload happens when the broker reads the signal: until then b is refused.
    let deadline = Instant::now() + WAIT;
    loop {
        let out = as_b("let in");
        if out.status.success() {
            break;
        }
        assert_eq!(out.status.code(), Some(5), "{out:?}");
        assert!(Instant::now() < deadline, "b still refused after SIGHUP");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(broker.metrics().get("mqttd_p2p_refused_total") >= 1.0);
    broker.stop();
}

#[test]
fn p2p_flags_need_a_p2p_url_and_a_node_id() {
    let out = mqttd(&[
        "pub",
        "-L",
        "mqtt://127.0.0.1:1/t",
        "-m",
        "x",
        "--relay",
        "https://127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = mqttd(&["pub", "-L", "p2p://not-a-node-id/t", "-m", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let id = NodeKeyId::new();
    // Neither a relay nor an address: nowhere to dial.
    let out = mqttd(&["pub", "-L", &format!("p2p://{}/t", id.0), "-m", "x"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node id nobody has the key of.
struct NodeKeyId(String);

impl NodeKeyId {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self(mqttd_id(dir.path()).trim().to_owned())
    }
}

#[test]
fn bench_over_p2p() {
    let broker = p2p_broker("");
    let reach = Reach::relay(&broker);
    let mut args = vec!["bench", "-L", reach.url.as_str()];
    args.extend(reach.flags.iter().map(String::as_str));
    args.extend([
        "--quic-streams",
        "1",
        "--json",
        "--quiet",
        "pairs",
        "--count",
        "2",
        "--rate",
        "20",
        "--duration",
        "2",
    ]);
    let out = mqttd(&args);
    ok(&out, "bench");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(summary["connected"].as_u64(), Some(4), "{summary}");
    assert_eq!(summary["errors"].as_u64(), Some(0), "{summary}");
    assert!(summary["received"].as_u64() > Some(0), "{summary}");
    broker.stop();
}

/// The lines of `mqttd p2p ping` against the broker's node, reached as `reach` says.
fn ping(broker: &Broker, reach: &Reach, count: &str) -> (Vec<String>, String) {
    let id = broker.node_id.clone().unwrap();
    let mut args = vec![
        "p2p",
        "ping",
        id.as_str(),
        "--count",
        count,
        "--interval",
        "0.2",
    ];
    args.extend(reach.flags.iter().map(String::as_str));
    let out = mqttd(&args);
    ok(&out, "ping");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines: Vec<String> = stdout.lines().map(str::to_owned).collect();
    let summary = lines.pop().expect("a summary line");
    (lines, summary)
}

#[test]
fn p2p_ping_prints_each_ping_and_a_summary() {
    let broker = p2p_broker("");
    for (reach, what) in [
        (Reach::relay(&broker), "relay"),
        (Reach::direct(&broker), "direct"),
    ] {
        let (pings, summary) = ping(&broker, &reach, "3");
        assert_eq!(pings.len(), 3, "{what}: {pings:?}");
        for (n, line) in pings.iter().enumerate() {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields.len(), 3, "{what}: {line}");
            assert_eq!(fields[0], format!("seq={}", n + 1), "{what}: {line}");
            assert!(
                fields[1] == "path=direct" || fields[1] == "path=relay",
                "{what}: {line}"
            );
            let rtt: f64 = fields[2].strip_prefix("rtt_ms=").unwrap().parse().unwrap();
            assert!(rtt >= 0.0, "{what}: {line}");
        }
        let fields: Vec<&str> = summary.split(' ').collect();
        assert_eq!(fields[0], "summary", "{what}: {summary}");
        assert_eq!(fields[1..3], ["sent=3", "received=3"], "{what}: {summary}");
        assert!(fields[4].starts_with("first_ms="), "{what}: {summary}");
        let first: u64 = fields[4]["first_ms=".len()..].parse().unwrap();
        let direct_ms = fields[5].strip_prefix("direct_ms=").expect(&summary);
        match fields[3] {
            "direct=yes" => {
                direct_ms.parse::<u64>().expect(&summary);
            }
            "direct=no" => assert_eq!(direct_ms, "-", "{what}: {summary}"),
            other => panic!("{what}: {other} in {summary}"),
        }
        if what == "direct" {
            // Given only the direct address, there is no other path.
            assert_eq!(fields[3], "direct=yes", "{summary}");
            assert!(pings.iter().all(|l| l.contains("path=direct")), "{pings:?}");
        }
        assert!(first > 0, "{summary}");
    }
    // Counted when the pinging connection ends.
    let deadline = Instant::now() + WAIT;
    while broker.metrics().get("mqttd_p2p_pings_total") < 6.0 {
        assert!(Instant::now() < deadline, "pings not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    broker.stop();
}

#[test]
fn p2p_ping_stopped_by_sigint_prints_the_summary_so_far() {
    let broker = p2p_broker("");
    let reach = Reach::direct(&broker);
    let id = broker.node_id.clone().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(["p2p", "ping", &id, "--count", "1000", "--interval", "0.05"])
        .args(&reach.flags)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mqttd p2p ping");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Two answers, then Ctrl-C.
    for _ in 0..2 {
        let line = lines.next().expect("a ping line").unwrap();
        assert!(line.contains("path=direct"), "{line}");
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let summary = rest.last().expect("a summary line");
    let fields: Vec<&str> = summary.split(' ').collect();
    assert_eq!(fields[0], "summary", "{rest:?}");
    let received: u64 = fields[2]
        .strip_prefix("received=")
        .unwrap()
        .parse()
        .unwrap();
    assert!((2..1000).contains(&received), "{summary}");
    assert_eq!(fields[3], "direct=yes", "{summary}");
    assert!(child.wait().unwrap().success());
    broker.stop();
}

#[test]
fn p2p_ping_of_a_node_nobody_runs_fails_with_a_summary() {
    let id = NodeKeyId::new();
    // A UDP port nobody answers on.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = mqttd(&[
        "p2p",
        "ping",
        &id.0,
        "--peer-addr",
        &addr,
        "--count",
        "1",
        "--connect-timeout",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        "summary sent=0 received=0 direct=no first_ms=- direct_ms=-\n"
    );
}
