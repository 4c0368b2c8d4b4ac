//! `mqttd bench` against a running broker: a short run of each message scenario completes,
//! delivers what it sends, and reports it in its JSON summary; persistent sessions can be left
//! offline, filled and drained.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::Broker;

/// A short run: one second of publishing, one of drain.
fn bench(broker: &Broker, args: &[&str]) -> serde_json::Value {
    bench_raw(
        broker,
        &[&["--duration", "1", "--drain", "1"], args].concat(),
    )
}

fn bench_raw(broker: &Broker, args: &[&str]) -> serde_json::Value {
    let port = broker.mqtt.port().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(["bench", "--port", &port, "--json"])
        .args(args)
        .output()
        .expect("run mqttd bench");
    assert!(
        output.status.success(),
        "mqttd bench {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("a JSON summary")
}

fn num(summary: &serde_json::Value, key: &str) -> f64 {
    summary[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {summary}"))
}

#[test]
fn pairs_at_a_fixed_rate_deliver_everything_with_latency() {
    let broker = Broker::start("");
    let s = bench(
        &broker,
        &["pairs", "--count", "4", "--rate", "200", "--qos", "1"],
    );
    let sent = num(&s, "sent");
    assert!(sent >= 400.0, "4 publishers at 200/s for 1 s sent {sent}");
    assert_eq!(
        num(&s, "received"),
        sent,
        "every QoS 1 message arrives: {s}"
    );
    assert_eq!(
        num(&s, "acked"),
        sent,
        "every QoS 1 message is acknowledged: {s}"
    );
    assert_eq!(num(&s, "errors"), 0.0);
    let p99 = s["latency_ms"]["p99"].as_f64().expect("latency measured");
    assert!(p99 > 0.0 && p99 < 1000.0, "p99 {p99} ms");
    broker.stop();
}

#[test]
fn fanout_multiplies_and_fanin_collects() {
    let broker = Broker::start("");
    let s = bench(&broker, &["fanout", "--count", "3", "--rate", "100"]);
    assert_eq!(
        num(&s, "received"),
        3.0 * num(&s, "sent"),
        "each subscriber gets each message: {s}"
    );
    let s = bench(
        &broker,
        &["fanin", "--count", "3", "--rate", "100", "--qos", "2"],
    );
    assert!(num(&s, "sent") >= 300.0);
    assert_eq!(
        num(&s, "received"),
        num(&s, "sent"),
        "one subscriber gets them all: {s}"
    );
    let s = bench(&broker, &["conn", "--count", "50"]);
    assert_eq!(num(&s, "connected"), 50.0);
    broker.stop();
}

#[test]
fn offline_persistent_session_is_filled_then_drained_on_resume() {
    let broker = Broker::start("");
    let session = [
        "--client-id-prefix",
        "durable",
        "--session-expiry",
        "3600",
        "--qos",
        "1",
        "--topic",
        "bench/#",
    ];
    // Subscribe and leave at once: the session stays, offline, with its subscription.
    let s = bench_raw(
        &broker,
        &[&["sub", "--duration", "0"][..], &session].concat(),
    );
    assert_eq!(num(&s, "connected"), 1.0);
    assert_eq!(num(&s, "session_present"), 0.0, "a new session: {s}");

    // A fixed number of messages into it, each acknowledged before the publishers leave.
    let s = bench_raw(
        &broker,
        &[
            "pub",
            "--count",
            "2",
            "--messages",
            "150",
            "--qos",
            "1",
            "--duration",
            "30",
        ],
    );
    assert_eq!(num(&s, "sent"), 300.0, "{s}");
    assert_eq!(num(&s, "acked"), 300.0, "{s}");
    assert!(
        num(&s, "duration_secs") < 30.0,
        "stops after --messages: {s}"
    );

    // Resuming it delivers what was stored, and the run ends as soon as all of it is in.
    let started = Instant::now();
    let s = bench_raw(
        &broker,
        &[
            &["sub", "--duration", "30", "--expect", "300"][..],
            &session,
        ]
        .concat(),
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{s}");
    assert_eq!(num(&s, "session_present"), 1.0, "the session resumed: {s}");
    assert_eq!(num(&s, "received"), 300.0, "{s}");
    let drained = num(&s, "expect_reached_secs");
    assert!(drained > 0.0 && drained < 30.0, "{s}");
    assert!(
        s["latency_ms"].is_null(),
        "no latency across processes: {s}"
    );
    assert_eq!(num(&s, "errors"), 0.0);

    // Clean start discards it.
    let s = bench_raw(
        &broker,
        &[
            &["sub", "--duration", "0", "--clean-start", "true"][..],
            &session,
        ]
        .concat(),
    );
    assert_eq!(num(&s, "session_present"), 0.0, "{s}");

    // Asked to resume what the broker does not have, it fails at once instead of waiting.
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args([
            "bench",
            "--port",
            &broker.mqtt.port().to_string(),
            "--json",
            "sub",
        ])
        .args([
            "--client-id-prefix",
            "never-stored",
            "--clean-start",
            "false",
        ])
        .args(["--require-session", "--duration", "30", "--expect", "1"])
        .output()
        .expect("run mqttd bench");
    assert!(!output.status.success());
    assert!(started.elapsed() < Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no session for never-stored-sub-0"),
        "{stderr}"
    );
    broker.stop();
}
