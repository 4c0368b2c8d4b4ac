//! `mqttd bench` against a running broker: a run of each message scenario completes, delivers
//! what it sends, and reports it in its JSON summary; persistent sessions can be left offline,
//! filled and drained. Only counts that the tool guarantees (`--messages`, `--expect`) and
//! their consistency are asserted, never rates: time limits are upper bounds for a hang.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::Broker;

/// A run of fixed size: each publisher sends `--messages` and the run ends as soon as the
/// subscribers have `--expect` in all. `--duration` and `--drain` are only upper bounds
/// that a hang would hit, so no count depends on the machine's speed.
fn bench(broker: &Broker, args: &[&str]) -> serde_json::Value {
    bench_raw(
        broker,
        &[&["--duration", "60", "--drain", "60"], args].concat(),
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
        &[
            "pairs",
            "--count",
            "4",
            "--rate",
            "200",
            "--qos",
            "1",
            "--messages",
            "100",
            "--expect",
            "400",
        ],
    );
    assert_eq!(
        num(&s, "sent"),
        400.0,
        "4 publishers, 100 messages each: {s}"
    );
    assert_eq!(
        num(&s, "received"),
        400.0,
        "every QoS 1 message arrives: {s}"
    );
    assert_eq!(
        num(&s, "acked"),
        400.0,
        "every QoS 1 message is acknowledged: {s}"
    );
    assert_eq!(num(&s, "errors"), 0.0);
    let latency = &s["latency_ms"];
    assert_eq!(
        latency["samples"].as_f64(),
        Some(400.0),
        "every message carries its send time: {s}"
    );
    let (p50, p99, max) = (
        num(latency, "p50"),
        num(latency, "p99"),
        num(latency, "max"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{latency}");
    assert!(
        max < 60_000.0,
        "no message took longer than the run: {latency}"
    );
    broker.stop();
}

#[test]
fn fanout_multiplies_and_fanin_collects() {
    let broker = Broker::start("");
    let s = bench(
        &broker,
        &[
            "fanout",
            "--count",
            "3",
            "--rate",
            "100",
            "--messages",
            "50",
            "--expect",
            "150",
        ],
    );
    assert_eq!(num(&s, "sent"), 50.0, "{s}");
    assert_eq!(
        num(&s, "received"),
        150.0,
        "each subscriber gets each message: {s}"
    );
    let s = bench(
        &broker,
        &[
            "fanin",
            "--count",
            "3",
            "--rate",
            "100",
            "--qos",
            "2",
            "--messages",
            "100",
            "--expect",
            "300",
        ],
    );
    assert_eq!(num(&s, "sent"), 300.0, "{s}");
    assert_eq!(num(&s, "acked"), 300.0, "{s}");
    assert_eq!(
        num(&s, "received"),
        300.0,
        "one subscriber gets them all: {s}"
    );
    let s = bench_raw(&broker, &["conn", "--count", "50", "--duration", "1"]);
    assert_eq!(num(&s, "connected"), 50.0, "{s}");
    assert_eq!(num(&s, "errors"), 0.0, "{s}");
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
            "120",
            "--drain",
            "60",
        ],
    );
    assert_eq!(num(&s, "sent"), 300.0, "{s}");
    assert_eq!(num(&s, "acked"), 300.0, "{s}");
    assert!(
        num(&s, "duration_secs") < 60.0,
        "stops after --messages: {s}"
    );

    // Resuming it delivers what was stored, and the run ends as soon as all of it is in.
    let started = Instant::now();
    let s = bench_raw(
        &broker,
        &[
            &["sub", "--duration", "120", "--expect", "300"][..],
            &session,
        ]
        .concat(),
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "stops at --expect: {s}"
    );
    assert_eq!(num(&s, "session_present"), 1.0, "the session resumed: {s}");
    assert_eq!(num(&s, "received"), 300.0, "{s}");
    let drained = num(&s, "expect_reached_secs");
    assert!(drained > 0.0 && drained < 60.0, "{s}");
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
        .args(["--require-session", "--duration", "120", "--expect", "1"])
        .output()
        .expect("run mqttd bench");
    assert!(!output.status.success());
    assert!(started.elapsed() < Duration::from_secs(60), "fails at once");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no session for never-stored-sub-0"),
        "{stderr}"
    );
    broker.stop();
}

#[test]
fn raw_mode_counts_are_consistent() {
    let broker = Broker::start("");
    let pid = broker.pid().to_string();
    // A fixed number of messages: 2 x 500 x 71 bytes is far below what the broker buffers for
    // a subscriber, so it has no reason to drop any, and both subscribers get them all.
    let s = bench(
        &broker,
        &[
            "raw",
            "--count",
            "2",
            "--subscribers",
            "2",
            "--messages",
            "500",
            "--expect",
            "2000",
            "--broker-pid",
            &pid,
        ],
    );
    assert_eq!(num(&s, "connected"), 4.0, "{s}");
    assert_eq!(num(&s, "sent"), 1000.0, "{s}");
    assert_eq!(num(&s, "received"), 2000.0, "{s}");
    assert_eq!(num(&s, "dropped"), 0.0, "{s}");
    assert_eq!(num(&s, "errors"), 0.0, "{s}");
    assert!(num(&s, "broker_cpu_secs") >= 0.0, "{s}");

    // As fast as TCP takes them, for one second: whatever the machine's speed, each
    // publisher sends something, and nothing arrives that was not sent.
    let s = bench_raw(
        &broker,
        &["raw", "--count", "2", "--duration", "1", "--drain", "1"],
    );
    let (sent, received, dropped) = (num(&s, "sent"), num(&s, "received"), num(&s, "dropped"));
    assert!(sent >= 2.0, "{s}");
    assert!(received <= sent, "one subscriber: {s}");
    assert_eq!(received + dropped, sent, "{s}");
    assert_eq!(num(&s, "errors"), 0.0, "{s}");
    assert!(s["broker_cpu_secs"].is_null(), "no --broker-pid: {s}");
    broker.stop();
}

#[test]
fn sub_port_connects_the_subscribers_to_another_broker() {
    let a = Broker::start("");
    let b = Broker::start("");
    let b_port = b.mqtt.port().to_string();
    // Publishers on A, persistent subscribers on B: A has no subscriber, B no publisher.
    let s = bench_raw(
        &a,
        &[
            "pairs",
            "--count",
            "2",
            "--qos",
            "1",
            "--rate",
            "200",
            "--messages",
            "20",
            "--client-id-prefix",
            "elsewhere",
            "--session-clients",
            "sub",
            "--session-expiry",
            "60",
            "--sub-port",
            &b_port,
            "--duration",
            "30",
            "--drain",
            "0.5",
        ],
    );
    assert_eq!(num(&s, "connected"), 4.0, "{s}");
    assert_eq!(num(&s, "acked"), 40.0, "A acknowledges every message: {s}");
    assert_eq!(num(&s, "received"), 0.0, "no subscriber is on A: {s}");
    // The subscribers' sessions are on B.
    let s = bench_raw(
        &b,
        &[
            "sub",
            "--count",
            "2",
            "--client-id-prefix",
            "elsewhere",
            "--session-expiry",
            "60",
            "--require-session",
            "--duration",
            "0",
        ],
    );
    assert_eq!(num(&s, "session_present"), 2.0, "{s}");
    a.stop();
    b.stop();
}
