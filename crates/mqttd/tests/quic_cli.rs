//! `mqttd pub`, `mqttd sub` and `mqttd bench` over QUIC (`quic://`), against the real binary.
//!
//! Without a broker: a port where nothing answers gives the unreachable exit status within
//! the connect timeout (QUIC gets no RST; the handshake times out), and `--quic-streams` with
//! another transport is a usage error.
//!
//! Against the broker's QUIC listener (`--listen quic://127.0.0.1:0`, trusting the generated
//! CA): QoS 0/1/2, a 1 MiB payload, nine topics over three data streams, QUIC and TCP clients
//! meeting both ways, a wrong CA giving the TLS exit status, a client certificate (`--cert`,
//! `--key`) whose identity is the user name, and `mqttd bench` with data streams.

use std::net::UdpSocket;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn mqttd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(args)
        .output()
        .expect("run mqttd")
}

#[test]
fn nothing_listening_is_unreachable_within_the_connect_timeout() {
    // Bound so that nothing else takes the port; it never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let url = format!("quic://127.0.0.1:{}", silent.local_addr().unwrap().port());
    for tool in [
        &[
            "pub",
            "-L",
            &url,
            "-t",
            "t",
            "-m",
            "x",
            "--connect-timeout",
            "1",
        ][..],
        &["sub", "-L", &url, "-t", "t", "--connect-timeout", "1"][..],
    ] {
        let started = Instant::now();
        let out = mqttd(tool);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{tool:?}: {stderr}");
        assert!(stderr.contains("within"), "{stderr}");
        // 1 s of handshake, plus the start of the binary.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}

#[test]
fn quic_streams_need_a_quic_url() {
    let out = mqttd(&[
        "pub",
        "-L",
        "mqtt://127.0.0.1:1",
        "-t",
        "t",
        "-m",
        "x",
        "--quic-streams",
        "2",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Against the broker's QUIC listener
// ---------------------------------------------------------------------------------------------

mod support;

use support::pki::{client_cert_broker, TestCa};
use support::Broker;

/// A broker with a QUIC listener next to its TCP one (1 MiB payloads allowed), and the
/// generated CA that signs its certificate.
fn quic_broker() -> (Broker, String, std::path::PathBuf) {
    let broker = Broker::start_with("max_packet_size = 2097152\n", &["quic://127.0.0.1:0"]);
    let url = format!("quic://localhost:{}", broker.quic.port());
    let ca = broker.data_dir().join("tls").join("ca.pem");
    (broker, url, ca)
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Publishes retained messages (so that the reader needs no head start) and reads them back
/// with `-C`, both sides with `extra` flags.
fn retained_round_trip(url: &str, read_url: &str, ca: &str, topics: &[String], extra: &[&str]) {
    for t in topics {
        let out = mqttd(
            &[
                &[
                    "pub", "-L", url, "--cafile", ca, "-t", t, "-m", t, "-r", "-q", "1",
                ],
                extra,
            ]
            .concat(),
        );
        ok(&out, &format!("pub {t}"));
    }
    let count = topics.len().to_string();
    let mut args = vec![
        "sub", "-L", read_url, "--cafile", ca, "-C", &count, "-W", "30", "-v",
    ];
    for t in topics {
        args.extend(["-t", t.as_str()]);
    }
    args.extend(extra);
    let out = mqttd(&args);
    ok(&out, "sub");
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    let mut expected: Vec<String> = topics.iter().map(|t| format!("{t} {t}")).collect();
    expected.sort();
    assert_eq!(lines, expected);
}

#[test]
fn pub_and_sub_over_quic_at_every_qos() {
    let (mut broker, url, ca) = quic_broker();
    let ca = ca.to_str().unwrap();
    for qos in ["0", "1", "2"] {
        let topic = format!("q/{qos}");
        let out = mqttd(&[
            "pub", "-L", &url, "--cafile", ca, "-t", &topic, "-m", "hello", "-r", "-q", qos,
        ]);
        ok(&out, "pub");
        let out = mqttd(&[
            "sub", "-L", &url, "--cafile", ca, "-t", &topic, "-q", qos, "-C", "1", "-W", "30",
        ]);
        ok(&out, "sub");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    }
    broker.shutdown();
}

#[test]
fn a_one_mib_payload_over_quic() {
    let (mut broker, url, ca) = quic_broker();
    let ca = ca.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload");
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(&file, &payload).unwrap();
    let out = mqttd(&[
        "pub",
        "-L",
        &url,
        "--cafile",
        ca,
        "-t",
        "big",
        "-f",
        file.to_str().unwrap(),
        "-r",
        "-q",
        "1",
    ]);
    ok(&out, "pub");
    let out = mqttd(&[
        "sub", "-L", &url, "--cafile", ca, "-t", "big", "-C", "1", "-W", "30",
    ]);
    ok(&out, "sub");
    assert_eq!(
        out.stdout.len(),
        payload.len() + 1,
        "the payload and a newline"
    );
    assert_eq!(&out.stdout[..payload.len()], payload.as_slice());
    broker.shutdown();
}

#[test]
fn several_topics_over_three_data_streams_all_arrive() {
    let (mut broker, url, ca) = quic_broker();
    let topics: Vec<String> = (0..9).map(|i| format!("multi/{i}")).collect();
    let ca = ca.to_str().unwrap();
    retained_round_trip(&url, &url, ca, &topics, &["--quic-streams", "3"]);
    broker.shutdown();
}

#[test]
fn quic_and_tcp_clients_meet() {
    let (mut broker, quic, ca) = quic_broker();
    let tcp = format!("mqtt://127.0.0.1:{}", broker.mqtt.port());
    let ca = ca.to_str().unwrap();
    // --cafile with mqtt:// would turn on TLS: the TCP side goes without it.
    for (i, (publish_on, read_on)) in [(&quic, &tcp), (&tcp, &quic)].into_iter().enumerate() {
        let topic = format!("mixed/{i}");
        let pub_ca: &[&str] = if publish_on == &quic {
            &["--cafile", ca]
        } else {
            &[]
        };
        let sub_ca: &[&str] = if read_on == &quic {
            &["--cafile", ca]
        } else {
            &[]
        };
        let out = mqttd(
            &[
                &[
                    "pub", "-L", publish_on, "-t", &topic, "-m", "x", "-r", "-q", "1",
                ],
                pub_ca,
            ]
            .concat(),
        );
        ok(&out, "pub");
        let out = mqttd(
            &[
                &["sub", "-L", read_on, "-t", &topic, "-C", "1", "-W", "30"],
                sub_ca,
            ]
            .concat(),
        );
        ok(&out, "sub");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "x\n");
    }
    broker.shutdown();
}

#[test]
fn a_wrong_ca_is_the_tls_exit_status() {
    let (mut broker, url, _) = quic_broker();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, params.self_signed(&key).unwrap().pem()).unwrap();
    let out = mqttd(&[
        "pub",
        "-L",
        &url,
        "--cafile",
        other.to_str().unwrap(),
        "-t",
        "t",
        "-m",
        "x",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("unknown CA"), "{stderr}");
    broker.shutdown();
}

#[test]
fn bench_over_quic_with_data_streams_reconnects_with_0rtt() {
    let (mut broker, url, ca) = quic_broker();
    let out = mqttd(&[
        "bench",
        "-L",
        &url,
        "--cafile",
        ca.to_str().unwrap(),
        "--quic-streams",
        "2",
        "--json",
        "pairs",
        "--count",
        "4",
        "--rate",
        "50",
        "--duration",
        "2",
    ]);
    ok(&out, "bench");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(summary["connected"].as_u64(), Some(8), "{summary}");
    assert_eq!(summary["errors"].as_u64(), Some(0), "{summary}");
    assert!(summary["received"].as_u64() > Some(0), "{summary}");
    broker.shutdown();
}

#[test]
fn bench_conn_over_quic_spreads_clients_over_sockets_with_bounded_handshakes() {
    let (mut broker, url, ca) = quic_broker();
    let out = mqttd(&[
        "bench",
        "-L",
        &url,
        "--cafile",
        ca.to_str().unwrap(),
        "--quic-sockets",
        "4",
        "--max-handshakes",
        "8",
        "--json",
        "conn",
        "--count",
        "100",
        "--duration",
        "1",
    ]);
    ok(&out, "bench");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(summary["connected"].as_u64(), Some(100), "{summary}");
    assert_eq!(summary["errors"].as_u64(), Some(0), "{summary}");
    broker.shutdown();
}

/// Mutual TLS over QUIC from the command line: `--cert` and `--key` present the client
/// certificate, whose identity is the user name the ACL applies to; without them, the broker
/// refuses the handshake, which is the TLS exit status.
#[test]
fn pub_and_sub_over_quic_with_a_client_certificate() {
    let clients_ca = TestCa::new("test clients CA");
    let (mut broker, root) = client_cert_broker(
        &clients_ca,
        "user device-3\ntopic readwrite fleet/device-3/#\n",
        "quic://127.0.0.1:0",
        true,
    );
    let (cert, key) = clients_ca.client("device-3").write_to(&root, "device-3");
    let url = format!("quic://localhost:{}", broker.quic.port());
    let ca = broker.data_dir().join("tls").join("ca.pem");
    let tls = [
        "--cafile",
        ca.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    let topic = ["-t", "fleet/device-3/state"];
    let out = mqttd(
        &[
            &["pub", "-L", &url, "-m", "online", "-r", "-q", "1"],
            &topic[..],
            &tls,
        ]
        .concat(),
    );
    ok(&out, "pub with a certificate");
    let out = mqttd(
        &[
            &["sub", "-L", &url, "-C", "1", "-W", "30"],
            &topic[..],
            &tls,
        ]
        .concat(),
    );
    ok(&out, "sub with a certificate");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "online\n");
    // The ACL applies to the certificate's identity.
    let out = mqttd(
        &[
            &[
                "pub",
                "-L",
                &url,
                "-t",
                "fleet/device-4/state",
                "-m",
                "x",
                "-q",
                "1",
            ],
            &tls[..],
        ]
        .concat(),
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = mqttd(
        &[
            &["pub", "-L", &url, "-m", "x", "-q", "1"],
            &topic[..],
            &tls[..2],
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("refused the handshake"), "{stderr}");
    broker.shutdown();
}
