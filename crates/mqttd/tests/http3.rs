//! HTTP/3 on the real binary's QUIC listener, fetched by ngtcp2's example client over GnuTLS
//! (`gtlsclient`, Debian's `ngtcp2-client`; scripts/test.sh installs it): `/health` and
//! `/metrics` answer as the HTTP endpoint does, also after the client moved to a new local
//! address and updated its keys, and `quic.http3 = false` turns HTTP/3 off.
//!
//! Without `gtlsclient` on the PATH each test prints that it is skipped and passes.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{http_get, Broker};

/// How long a fetch may take: only a hang takes this long.
const STEP: Duration = Duration::from_secs(30);
const QUIC_LISTENER: &str = "quic://127.0.0.1:0";

/// `gtlsclient`, if installed; else says that the test is skipped.
fn gtlsclient() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("gtlsclient"))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        eprintln!("skipped: gtlsclient is not installed (apt-get install ngtcp2-client)");
    }
    found
}

/// What one run of `gtlsclient` did.
struct Fetch {
    output: Output,
    /// The body it saved, empty if none.
    body: String,
    /// Its log (standard error): the QUIC and HTTP/3 events.
    log: String,
}

/// Fetches `https://ADDR/name` over HTTP/3 with `options`; the client exits once its request
/// stream is closed.
fn fetch(binary: &PathBuf, addr: SocketAddr, name: &str, options: &[&str]) -> Fetch {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let url = format!("https://{}:{}/{name}", addr.ip(), addr.port());
    let mut child = Command::new(binary)
        .args(options)
        .args([
            "--exit-on-all-streams-close",
            "--timeout=10s",
            "--no-quic-dump",
            "--no-http-dump",
        ])
        .arg(format!("--download={}", dir.path().display()))
        .args([addr.ip().to_string(), addr.port().to_string(), url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gtlsclient");
    // Its output is small (no dumps): the pipes do not fill while it runs.
    let deadline = Instant::now() + STEP;
    while child.try_wait().expect("wait for gtlsclient").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("gtlsclient's output");
            panic!(
                "gtlsclient did not exit within {STEP:?}\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("gtlsclient's output");
    Fetch {
        body: std::fs::read_to_string(dir.path().join(name)).unwrap_or_default(),
        log: String::from_utf8_lossy(&output.stderr).into_owned(),
        output,
    }
}

/// As [`fetch`], and checks that the client exited with success.
fn fetch_ok(binary: &PathBuf, addr: SocketAddr, name: &str, options: &[&str]) -> Fetch {
    let fetched = fetch(binary, addr, name, options);
    assert!(
        fetched.output.status.success(),
        "gtlsclient failed: {}\n{}",
        fetched.output.status,
        fetched.log
    );
    fetched
}

/// The metric families a scrape declares.
fn families(text: &str) -> BTreeSet<&str> {
    text.lines().filter(|l| l.starts_with("# TYPE ")).collect()
}

#[test]
fn health_and_metrics_over_http3_match_the_http_endpoint() {
    let Some(binary) = gtlsclient() else { return };
    let broker = Broker::start_with("", &[QUIC_LISTENER]);

    let health = fetch_ok(&binary, broker.quic, "health", &[]);
    assert_eq!(
        health.body,
        http_get(broker.http, "/health"),
        "{}",
        health.log
    );
    assert!(health.log.contains("[:status: 200]"), "{}", health.log);
    assert!(
        health
            .log
            .contains("[content-type: text/plain; charset=utf-8]"),
        "{}",
        health.log
    );

    let metrics = fetch_ok(&binary, broker.quic, "metrics", &[]);
    assert!(
        metrics
            .log
            .contains("[content-type: application/openmetrics-text; version=1.0.0; charset=utf-8]"),
        "{}",
        metrics.log
    );
    assert!(metrics.body.ends_with("# EOF\n"), "{}", metrics.body);
    // The values move between two scrapes; the families are the same.
    let over_http = http_get(broker.http, "/metrics");
    assert_eq!(families(&metrics.body), families(&over_http));

    let missing = fetch_ok(&binary, broker.quic, "admin", &[]);
    assert!(missing.log.contains("[:status: 404]"), "{}", missing.log);
    let post = fetch_ok(&binary, broker.quic, "health", &["--http-method=POST"]);
    assert!(post.log.contains("[:status: 405]"), "{}", post.log);
    broker.stop();
}

/// The client moves to a new local address (a new UDP port on loopback, with path validation)
/// and updates its keys before it sends its request, so that the answer comes on the new path
/// under the new keys.
#[test]
fn http3_survives_connection_migration_and_a_key_update() {
    let Some(binary) = gtlsclient() else { return };
    let broker = Broker::start_with("", &[QUIC_LISTENER]);
    let options = [
        "--change-local-addr=50ms",
        "--key-update=100ms",
        "--delay-stream=300ms",
    ];
    let fetched = fetch_ok(&binary, broker.quic, "health", &options);
    assert_eq!(fetched.body, "ok\n", "{}", fetched.log);
    // The client's timers fire in deadline order: the move and the key update come before the
    // request.
    let at = |event: &str| {
        fetched
            .log
            .find(event)
            .unwrap_or_else(|| panic!("no {event:?} in\n{}", fetched.log))
    };
    let request = at("submit request headers");
    assert!(at("Local address is now") < request, "{}", fetched.log);
    assert!(at("Initiate key update") < request, "{}", fetched.log);
    broker.stop();
}

#[test]
fn http3_can_be_turned_off() {
    let Some(binary) = gtlsclient() else { return };
    let broker = Broker::start_with("[quic]\nhttp3 = false\n", &[QUIC_LISTENER]);
    // gtlsclient exits with success either way: its log says why the connection ended.
    let fetched = fetch(&binary, broker.quic, "health", &[]);
    assert!(
        fetched.body.is_empty() && !fetched.log.contains("[:status:"),
        "HTTP/3 was served:\n{}",
        fetched.log
    );
    // TLS's no_application_protocol alert (120) as a QUIC CRYPTO_ERROR: 0x100 + 120.
    assert!(
        fetched.log.contains("CRYPTO_ERROR(0x178)"),
        "{}",
        fetched.log
    );
    broker.stop();
}
