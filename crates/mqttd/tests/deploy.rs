//! What ships for deployment, checked against the real binary so that none of it can rot:
//!
//! - `dist/systemd/mqttd.service`: its hardening and limits are there, `systemd-analyze
//!   verify` accepts it (when installed; `MQTTD_REQUIRE_SYSTEMD_ANALYZE=1` makes its absence a
//!   failure), and its `ExecStartPre`, `ExecStart` and `ExecReload` command lines, run with
//!   their paths moved into a temporary directory, check and start the broker with the sample
//!   `dist/systemd/mqttd.toml` (ports set to 0), print the admin key, serve `mqttd api-key`
//!   keys made with the configuration's data directory, reload on SIGHUP and stop on the
//!   unit's `KillSignal` within its `TimeoutStopSec`.
//! - `dist/grafana/mqttd.json` and the metric list of `docs/operations.md`: every metric name
//!   they use is one a running broker exports, and the list names every family it exports.
//! - The `## Tuning` table of `docs/operations.md`: each key exists and its default is the
//!   broker's.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use mqttd_proto::{Packet, ProtocolVersion, QoS};
use support::{
    broker_binary, encode, http_get, publish_packet, subscribe_packet, Broker, RawConn, Received,
};

/// A hang bound for one step, never a performance verdict.
const STEP: Duration = Duration::from_secs(30);

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The systemd unit
// ---------------------------------------------------------------------------------------------

/// A unit file's settings: (section, key) to the values, in order (a key may repeat).
struct Unit(BTreeMap<(String, String), Vec<String>>);

impl Unit {
    fn parse(text: &str) -> Self {
        let mut settings: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "keep each setting on one line, for this parser: {line}"
            );
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let (key, value) = line.split_once('=').expect("KEY=VALUE");
            settings
                .entry((section.clone(), key.trim().to_owned()))
                .or_default()
                .push(value.trim().to_owned());
        }
        Self(settings)
    }

    /// Every value of `key` in `[Service]`.
    fn all(&self, key: &str) -> &[String] {
        self.0
            .get(&("Service".to_owned(), key.to_owned()))
            .map_or(&[], Vec::as_slice)
    }

    /// The one value of `key` in `[Service]`; panics if it is missing or repeated.
    fn one(&self, key: &str) -> &str {
        match self.all(key) {
            [value] => value,
            other => panic!("[Service] {key}: expected one value, found {other:?}"),
        }
    }
}

fn unit() -> Unit {
    Unit::parse(&read("dist/systemd/mqttd.service"))
}

/// Seconds in a systemd time span such as `30`, `30s`, `1min 30s` or `2min`.
fn seconds(span: &str) -> u64 {
    span.split_whitespace()
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits.parse().expect("a number in the time span");
            match &part[digits.len()..] {
                "" | "s" | "sec" => n,
                "m" | "min" => n * 60,
                unit => panic!("time unit {unit:?} not handled here"),
            }
        })
        .sum()
}

#[test]
fn the_unit_is_hardened_and_sized_for_many_connections() {
    let unit = unit();
    // A dedicated user, owning its state directory: ExecStart's --data-dir.
    assert_eq!(unit.one("User"), "mqttd");
    assert_eq!(unit.one("StateDirectory"), "mqttd");
    assert_eq!(unit.one("ConfigurationDirectory"), "mqttd");
    let exec = unit.one("ExecStart");
    assert!(
        exec.contains("--data-dir /var/lib/mqttd ") && exec.contains("--config /etc/mqttd/"),
        "ExecStart should use the state and configuration directories: {exec}"
    );
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        (
            "RestrictAddressFamilies",
            "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        ),
        ("KillSignal", "SIGTERM"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ] {
        assert_eq!(unit.one(key), value, "[Service] {key}");
    }
    assert!(
        unit.all("SystemCallFilter")
            .iter()
            .any(|f| f == "@system-service"),
        "SystemCallFilter=@system-service"
    );
    let nofile: u64 = unit.one("LimitNOFILE").parse().expect("a number");
    assert!(
        nofile >= 100_000,
        "LimitNOFILE={nofile}: room for 100k connections"
    );
    // Shutdown waits up to 10 s for the connections, then up to 10 s for the store to be
    // marked cleanly closed (Broker::shutdown, storage's MANIFEST_TIMEOUT): systemd must not
    // SIGKILL it sooner.
    let stop = seconds(unit.one("TimeoutStopSec"));
    assert!(
        stop >= 25,
        "TimeoutStopSec={stop}s is shorter than a graceful shutdown"
    );
}

/// The unit with the binary's real path, written into `dir`.
fn unit_for_this_binary(dir: &Path) -> PathBuf {
    let binary = PathBuf::from(broker_binary());
    let binary = binary.canonicalize().expect("the binary's path");
    let text = read("dist/systemd/mqttd.service")
        .replace("/usr/bin/mqttd", binary.to_str().expect("a UTF-8 path"));
    let path = dir.join("mqttd.service");
    std::fs::write(&path, text).expect("write the unit");
    path
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("MQTTD_REQUIRE_SYSTEMD_ANALYZE").is_none(),
            "systemd-analyze is required (Debian package systemd)"
        );
        eprintln!("systemd-analyze not installed: not verifying the unit");
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = unit_for_this_binary(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It reports unknown keys and bad values as warnings, with status 0.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The paths of the unit and the sample configuration, moved into a temporary directory.
struct Moved {
    etc: PathBuf,
    data: PathBuf,
}

impl Moved {
    /// A unit's command line with its paths moved, split into words (the unit quotes nothing).
    fn command(&self, line: &str, pid: Option<u32>) -> Command {
        assert!(
            !line.contains(['"', '\'']) && !line.starts_with(['-', '@', ':', '+', '!']),
            "this test runs plain command lines: {line}"
        );
        let binary = broker_binary();
        let binary = binary.to_str().expect("a UTF-8 path");
        let mut words = line.split_whitespace().map(|word| {
            let word = word
                .replace("/usr/bin/mqttd", binary)
                .replace("/etc/mqttd", self.etc.to_str().expect("UTF-8"))
                .replace("/var/lib/mqttd", self.data.to_str().expect("UTF-8"));
            match pid {
                Some(pid) => word.replace("$MAINPID", &pid.to_string()),
                None => word,
            }
        });
        let mut command = Command::new(words.next().expect("a program"));
        command.args(words);
        command
    }

    /// `dist/systemd/mqttd.toml` with its paths moved and its listeners on loopback, port 0.
    fn config(&self) -> String {
        let text = read("dist/systemd/mqttd.toml")
            .replace("/etc/mqttd", self.etc.to_str().expect("UTF-8"))
            .replace("/var/lib/mqttd", self.data.to_str().expect("UTF-8"));
        let mut listeners = 0;
        let text: Vec<String> = text
            .lines()
            .map(|line| {
                let trimmed = line.trim();
                let Some(url) = trimmed
                    .strip_prefix('"')
                    .and_then(|l| l.strip_suffix("\","))
                else {
                    return line.to_owned();
                };
                let (scheme, rest) = url.split_once("://").expect("a listener URL");
                let path = rest.find('/').map_or("", |i| &rest[i..]);
                listeners += 1;
                format!("    \"{scheme}://127.0.0.1:0{path}\",")
            })
            .collect();
        assert!(listeners >= 2, "the sample's listen lines were not found");
        text.join("\n")
    }
}

/// The lines a broker prints on standard output, read on a thread.
fn stdout_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    rx
}

/// A GET with a bearer key; returns the status code.
fn get_status(addr: SocketAddr, path: &str, key: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP listener");
    stream.set_read_timeout(Some(STEP)).expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the answer");
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {response}"))
}

/// Waits until `path`'s contents hold `needle`, for at most `STEP`.
fn wait_for_text(path: &Path, needle: &str) {
    let deadline = Instant::now() + STEP;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in {} within {STEP:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_units_command_lines_start_reload_and_stop_the_broker_with_the_sample_configuration() {
    let unit = unit();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let moved = Moved {
        etc: dir.path().join("etc"),
        data: dir.path().join("data"),
    };
    // What systemd and the operator do first: the directories, the configuration, a user.
    std::fs::create_dir_all(&moved.etc).expect("create etc");
    std::fs::write(moved.etc.join("mqttd.toml"), moved.config()).expect("write the config");
    let passwd = Command::new(broker_binary())
        .arg("passwd")
        .arg(moved.etc.join("passwd"))
        .args(["alice", "-p", "wonderland"])
        .output()
        .expect("run mqttd passwd");
    assert!(passwd.status.success(), "mqttd passwd: {passwd:?}");

    let check = moved
        .command(unit.one("ExecStartPre"), None)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ExecStartPre");
    assert!(
        check.status.success() && String::from_utf8_lossy(&check.stdout).trim() == "ok",
        "ExecStartPre: {check:?}"
    );

    let log = dir.path().join("journal");
    let mut child = moved
        .command(unit.one("ExecStart"), None)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&log).expect("create the log"))
        .spawn()
        .expect("run ExecStart");
    let lines = stdout_lines(&mut child);
    let deadline = Instant::now() + STEP;
    let (mut admin_key, mut http, mut mqtt) = (None, None, None);
    while admin_key.is_none() || http.is_none() || mqtt.is_none() {
        let line = match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                let _ = child.kill();
                panic!(
                    "ExecStart did not come up:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        if let Some(key) = line.strip_prefix("mqttd api key admin ") {
            admin_key = Some(key.to_owned());
        } else if let Some(addr) = line.strip_prefix("mqttd listening on http://") {
            http = Some(addr.parse::<SocketAddr>().expect("an address"));
        } else if let Some(addr) = line.strip_prefix("mqttd listening on tcp://") {
            mqtt = Some(addr.parse::<SocketAddr>().expect("an address"));
        }
    }
    let (admin_key, http, mqtt) = (
        admin_key.expect("admin key"),
        http.expect("http"),
        mqtt.expect("tcp"),
    );
    // The data directory is the state directory, where the first key's hash landed.
    assert!(moved.data.join("api-keys").is_file());
    assert!(moved.data.join("store").is_dir());
    assert_eq!(get_status(http, "/api/v1/stats", &admin_key), 200);

    // `mqttd api-key create` with the configuration file finds the same data directory, and
    // the running broker takes the new key at once.
    let created = Command::new(broker_binary())
        .args(["api-key", "create", "ops", "-c"])
        .arg(moved.etc.join("mqttd.toml"))
        .output()
        .expect("run mqttd api-key create");
    assert!(created.status.success(), "api-key create: {created:?}");
    let ops_key = String::from_utf8(created.stdout).expect("UTF-8");
    let ops_key = ops_key.trim();
    let deadline = Instant::now() + STEP;
    while get_status(http, "/api/v1/stats", ops_key) != 200 {
        assert!(Instant::now() < deadline, "the new key was not accepted");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The password file of the sample configuration is in force.
    let signed_in = Command::new(broker_binary())
        .args(["pub", "-h", "127.0.0.1", "-p", &mqtt.port().to_string()])
        .args([
            "-u",
            "alice",
            "-P",
            "wonderland",
            "-t",
            "t",
            "-m",
            "m",
            "-q",
            "1",
        ])
        .output()
        .expect("run mqttd pub");
    assert!(
        signed_in.status.success(),
        "mqttd pub as alice: {signed_in:?}"
    );

    // ExecReload, as systemctl reload runs it.
    let reload = moved
        .command(unit.one("ExecReload"), Some(child.id()))
        .status()
        .expect("run ExecReload");
    assert!(reload.success());
    wait_for_text(&log, "reloaded config");

    // systemctl stop: KillSignal, then SIGKILL after TimeoutStopSec.
    let signal = unit.one("KillSignal").trim_start_matches("SIG");
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(sent.success());
    let stop = Duration::from_secs(seconds(unit.one("TimeoutStopSec")));
    let deadline = Instant::now() + stop;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the broker") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the broker did not stop within TimeoutStopSec ({stop:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "stopped with {status}:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------------------------
// Metric names: the Grafana dashboard and docs/operations.md
// ---------------------------------------------------------------------------------------------

/// Counter families that exist only once something happened, so that a fresh broker may not
/// show them; each still has to be registered in `crates/mqttd-broker/src/metrics.rs` under this
/// name (without the `mqttd_` prefix).
const SHOWN_ONCE_USED: &[&str] = &[
    // The first failed write, sync, open or reclaim of the store creates its label.
    "store_errors",
    // The first traversal attempt that ends creates its (nat, outcome) label.
    "p2p_traversals",
    // Labelled by cluster node, on a cluster's leader only.
    "cluster_replication_lag",
    // Labelled by cluster node, with a cluster only.
    "cluster_routes",
    "cluster_forward_link_up",
    "cluster_forward_queued",
];

/// What `/metrics` exports: family name to its type, from the `# TYPE` lines.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some((name.to_owned(), kind.to_owned()))
        })
        .collect()
}

/// The names a query uses for a family: counters with `_total`, histograms with `_bucket`,
/// `_sum` and `_count` (and their bare name, as people speak of them).
fn query_names(name: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{name}_total")],
        "histogram" => ["", "_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{name}{s}"))
            .collect(),
        _ => vec![name.to_owned()],
    }
}

/// Every `mqttd_...` identifier in `text` (not prefixes such as `mqttd_quic_*`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("mqttd_") {
        let start = i + at;
        let word_start = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        // `mqttd_quic_*` names a group, not a metric.
        if word_start && !text[start..end].ends_with('_') {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Every string under a key named `key`, anywhere in `value`.
fn strings_under<'a>(value: &'a serde_json::Value, key: &str, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == key => out.push(s),
                    _ => strings_under(v, key, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                strings_under(v, key, out);
            }
        }
        _ => {}
    }
}

/// The section `## {name}` of `doc`.
fn section<'a>(doc: &'a str, name: &str) -> &'a str {
    let heading = format!("\n## {name}\n");
    let start = doc
        .find(&heading)
        .unwrap_or_else(|| panic!("a \"## {name}\" section"));
    let rest = &doc[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |n| n + 3);
    &rest[..end]
}

/// A broker with every kind of figure in use: QUIC, a relay and a p2p node using it, a bridge
/// (to nowhere), a subscription, a retained publication and a delivery.
async fn busy_broker() -> (Broker, String) {
    let config = "[relay]\nallow_any = true\n\
                  [[bridge]]\nname = \"up\"\nurls = [\"mqtt://127.0.0.1:9\"]\ntopics = [\"out/#\"]\n\
                  reconnect_min = 0.05\nreconnect_max = 0.5\n";
    let broker = Broker::start_with(
        config,
        &[
            "quic://127.0.0.1:0",
            "relay://127.0.0.1:0",
            "p2p://127.0.0.1:0",
        ],
    );
    let mut sub = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "dash-sub").await;
    sub.send(&encode(
        ProtocolVersion::V5,
        &subscribe_packet(1, "dash/#", QoS::AtMostOnce),
    ))
    .await
    .expect("send SUBSCRIBE");
    assert!(matches!(sub.recv(STEP).await, Received::Packet(p) if matches!(*p, Packet::SubAck(_))));
    let mut publisher = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "dash-pub").await;
    publisher
        .send(&encode(
            ProtocolVersion::V5,
            &publish_packet("dash/1", b"x".to_vec(), QoS::AtMostOnce, true, 0),
        ))
        .await
        .expect("send PUBLISH");
    assert!(
        matches!(sub.recv(STEP).await, Received::Packet(p) if matches!(*p, Packet::Publish(_)))
    );
    // The p2p node reports its NAT type and relay on its first look at its state.
    let http = broker.http;
    let text = broker
        .eventually(STEP, "the p2p relay's gauges", || async move {
            let text = tokio::task::spawn_blocking(move || http_get(http, "/metrics"))
                .await
                .expect("scrape");
            text.contains("mqttd_p2p_relay_up").then_some(text)
        })
        .await;
    drop((sub, publisher));
    (broker, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_metric_list_use_only_exported_metrics() {
    let (broker, text) = busy_broker().await;
    let exported = families(&text);
    assert!(
        exported.contains_key("mqttd_clients_by_transport"),
        "{exported:?}"
    );
    let source = read("crates/mqttd-broker/src/metrics.rs");
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    for (name, kind) in &exported {
        for q in query_names(name, kind) {
            known.insert(q, name.clone());
        }
    }
    for stem in SHOWN_ONCE_USED {
        assert!(
            source.contains(&format!("            {stem}: ")),
            "{stem} is not registered in metrics.rs"
        );
        // A counter (it may show already, when something used it early), or a labelled
        // gauge (`cluster_replication_lag`, `cluster_routes`, ...).
        let name = format!("mqttd_{stem}");
        known.insert(format!("{name}_total"), name.clone());
        known.entry(name.clone()).or_insert(name);
    }

    // The dashboard: importable JSON, a Prometheus data source variable used by every panel,
    // and only names that exist.
    let dashboard_text = read("dist/grafana/mqttd.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "a Prometheus data source variable named datasource"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    // Grafana keys panels by id: a repeated one hides a panel on import.
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "every panel has its own id");
    let mut exprs = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} uses the data source variable",
            panel["title"]
        );
        let before = exprs.len();
        strings_under(panel, "expr", &mut exprs);
        assert!(exprs.len() > before, "panel {} has a query", panel["title"]);
    }
    // Every name anywhere in it: queries, variables, descriptions.
    let used = metric_names(&dashboard_text);
    let unknown: Vec<_> = used.iter().filter(|n| !known.contains_key(*n)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics the broker does not export: {unknown:?}\nexported: {:?}",
        known.keys().collect::<Vec<_>>()
    );
    for wanted in [
        "mqttd_clients_by_transport",
        "mqttd_messages_received_total",
        "mqttd_messages_sent_total",
        "mqttd_messages_dropped_total",
        "mqttd_store_errors_total",
    ] {
        assert!(used.contains(wanted), "the dashboard shows {wanted}");
    }

    // docs/operations.md's metric list: every family named (as queried), nothing else.
    let doc = read("docs/operations.md");
    let listed = metric_names(section(&doc, "Metrics"));
    let stale: Vec<_> = listed.iter().filter(|n| !known.contains_key(*n)).collect();
    assert!(
        stale.is_empty(),
        "docs/operations.md lists metrics the broker does not export: {stale:?}"
    );
    let families_listed: BTreeSet<&String> = listed.iter().filter_map(|n| known.get(n)).collect();
    let missing: Vec<_> = known
        .values()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|f| !families_listed.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md's \"## Metrics\" does not list: {missing:?}"
    );
    broker.stop();
}

// ---------------------------------------------------------------------------------------------
// The tuning table of docs/operations.md
// ---------------------------------------------------------------------------------------------

#[test]
fn the_tuning_table_gives_the_brokers_defaults() {
    let doc = read("docs/operations.md");
    let default = format!("{:?}", mqttd_broker::Config::default());
    let mut rows = 0;
    for line in section(&doc, "Tuning")
        .lines()
        .filter(|l| l.starts_with("| `"))
    {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells[0].trim_start_matches("| ").trim_matches('`');
        let value = cells.get(1).expect("a default");
        assert!(
            value.starts_with('`') && value.ends_with('`'),
            "{key}: the default should be one TOML value in backquotes: {value}"
        );
        let value = value.trim_matches('`');
        // Unknown keys are errors: a renamed key fails here.
        let config = mqttd_broker::Config::parse(&format!("{key} = {value}"))
            .unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
        assert_eq!(
            format!("{config:?}"),
            default,
            "{key}: the default is not {value}"
        );
        rows += 1;
    }
    assert!(rows >= 10, "the tuning table was not found");
}
