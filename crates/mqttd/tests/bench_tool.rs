//! `mqttd bench` against a running broker: a short run of each message scenario completes,
//! delivers what it sends, and reports it in its JSON summary.

mod support;

use std::process::Command;

use support::Broker;

fn bench(broker: &Broker, args: &[&str]) -> serde_json::Value {
    let port = broker.mqtt.port().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args([
            "bench",
            "--port",
            &port,
            "--json",
            "--duration",
            "1",
            "--drain",
            "1",
        ])
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
