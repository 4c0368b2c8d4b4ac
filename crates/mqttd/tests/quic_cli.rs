//! `mqttd pub`, `mqttd sub` and `mqttd bench` over QUIC (`quic://`), against the real binary.
//!
//! Without a broker: a port where nothing answers gives the unreachable exit status within
//! the connect timeout (QUIC gets no RST; the handshake times out), and `--quic-streams` with
//! another transport is a usage error.

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
