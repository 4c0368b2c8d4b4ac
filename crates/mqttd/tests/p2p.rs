//! The binary's peer-to-peer parts: `mqttd id` (the node key made once, private, and the same
//! id after), and a `relay://` listener announcing its URL and stopping on SIGTERM.

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
