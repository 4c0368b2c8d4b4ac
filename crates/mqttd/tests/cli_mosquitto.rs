//! `mqttd pub` and `mqttd sub` against Debian's Mosquitto broker: round trips over TCP, TLS,
//! WebSocket and WebSocket over TLS, `-F` output compared with `mosquitto_sub`'s own, MQTT 5
//! properties and wills, `--capath` and `--tls-version`, `sub -U`, `--retained-only` and
//! `--remove-retained` (checked with `mosquitto_sub`), `mqttd bench` over TLS and WebSocket,
//! and the exit status of each
//! failure (refused connection, unknown CA, host name mismatch, expired certificate, client
//! certificate refused, bad password, subscription refused by Mosquitto's dynamic security
//! plugin, usage errors, `-W`).
//!
//! Each test starts its own `mosquitto` on ports found by binding port 0, with certificates
//! made by rcgen in a temporary directory. Without a `mosquitto` binary (Debian's `mosquitto`
//! package; scripts/test.sh installs it) the tests say so and pass without checking anything.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A hang bound for one command or one awaited line, never a performance verdict.
const LIMIT: Duration = Duration::from_secs(60);

fn mosquitto_bin() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Skips the test (with a message) when Mosquitto is not installed.
macro_rules! need_mosquitto {
    () => {
        if mosquitto_bin().is_none() {
            eprintln!(
                "SKIPPED: no mosquitto binary; install Debian's mosquitto and mosquitto-clients \
                 (scripts/test.sh does) to run the interoperability tests"
            );
            return;
        }
    };
}

/// Distinct free loopback ports: all bound at once, then released for Mosquitto to take.
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut ports = [0; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr().unwrap().port();
    }
    ports
}

/// A CA and the certificates it signs, as PEM files in `dir`.
struct Pki {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca_cert.pem()).unwrap();
        Self {
            dir: dir.to_owned(),
            issuer: rcgen::Issuer::new(params, ca_key),
        }
    }

    fn ca_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    /// A client certificate for `name`; returns (cert, key) files.
    fn client(&self, file: &str, name: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        self.sign(file, params)
    }

    /// A server certificate for `dns_name` (only), expired if asked; returns (cert, key) files.
    fn server(&self, file: &str, dns_name: &str, expired: bool) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec![dns_name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, dns_name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        self.sign(file, params)
    }

    fn sign(&self, file: &str, params: CertificateParams) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_file, key_file) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

/// A running `mosquitto`, stopped on drop.
struct Mosquitto {
    child: Child,
    log: PathBuf,
}

impl Mosquitto {
    /// Starts Mosquitto with `config` and waits until every port in `ports` accepts.
    fn start(dir: &Path, config: &str, ports: &[u16]) -> Self {
        let conf = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        // Running as root, Mosquitto would switch to the `mosquitto` user, who cannot read
        // the temporary directory.
        let config = format!("user root\nlog_dest stderr\nlog_type all\n{config}");
        std::fs::write(&conf, config).unwrap();
        let child = Command::new(mosquitto_bin().unwrap())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Self { child, log };
        let deadline = Instant::now() + LIMIT;
        for port in ports {
            while TcpStream::connect(("127.0.0.1", *port)).is_err() {
                if let Ok(Some(status)) = m.child.try_wait() {
                    panic!("mosquitto exited with {status}: {}", m.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "mosquitto never listened on {port}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `mqttd ARGS` to completion (with a hang bound).
fn mqttd(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_mqttd")).args(args))
}

fn run(command: &mut Command) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{command:?} did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the exit status of `out`, showing its output otherwise.
#[track_caller]
fn assert_status(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Asserts the exit status of `out` and that its standard error says `needle`.
#[track_caller]
fn assert_error(out: &Output, code: i32, needle: &str) {
    assert_status(out, code);
    let stderr = text(&out.stderr);
    assert!(stderr.contains(needle), "{stderr}");
}

/// A background `mqttd sub` (or `mosquitto_sub`) whose lines are read as they come.
struct Sub {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
}

impl Sub {
    fn mqttd(args: &[&str]) -> Self {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_mqttd"))
                .arg("sub")
                .args(args),
        )
    }

    fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = |stream: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().unwrap()));
        let stderr = lines(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    #[track_caller]
    fn line(&self) -> String {
        self.stdout
            .recv_timeout(LIMIT)
            .expect("the subscriber printed no line")
    }

    /// Waits for the `-d` line that says the broker acknowledged the subscription.
    #[track_caller]
    fn wait_subscribed(&self) {
        loop {
            let line = self
                .stderr
                .recv_timeout(LIMIT)
                .expect("the subscriber never reported SUBACK");
            if line.contains("received SUBACK") || line.contains("Subscribed") {
                return;
            }
        }
    }

    #[track_caller]
    fn exit_code(mut self) -> Option<i32> {
        self.wait()
    }

    /// Waits for the subscriber to exit: its status and the lines it printed that were not
    /// read yet.
    #[track_caller]
    fn finish(mut self) -> (Option<i32>, Vec<String>) {
        let code = self.wait();
        // The pipe closed with the process: the reader stops after the last line.
        let rest = std::iter::from_fn(|| self.stdout.recv_timeout(LIMIT).ok()).collect();
        (code, rest)
    }

    #[track_caller]
    fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the subscriber did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An anonymous Mosquitto with TCP, TLS (a good and an expired certificate), WebSocket and
/// WebSocket over TLS listeners. Certificates name `localhost` only.
struct OpenBroker {
    _dir: tempfile::TempDir,
    mosquitto: Mosquitto,
    tcp: String,
    tls: String,
    tls_expired: String,
    /// TLS that requires a client certificate signed by the good CA.
    tls_mutual: String,
    ws: String,
    wss: String,
    /// TLS 1.3 only (Mosquitto's `tls_version` is the minimum).
    tls13: String,
    ca: String,
    other_ca: String,
    /// Client certificate and key signed by the good CA, and by the other one.
    client: [String; 2],
    rogue: [String; 2],
}

impl OpenBroker {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "good");
        let other = Pki::new(dir.path(), "other");
        let (cert, key) = pki.server("server", "localhost", false);
        let (old_cert, old_key) = pki.server("expired", "localhost", true);
        let client = pki.client("client", "alice");
        let rogue = other.client("rogue", "mallory");
        let [tcp, tls, tls_expired, tls_mutual, ws, wss, tls13] = free_ports::<7>();
        let good_ca = pki.ca_file("good");
        let good_ca = good_ca.display();
        let (cert, key, old_cert, old_key) = (
            cert.display(),
            key.display(),
            old_cert.display(),
            old_key.display(),
        );
        let config = format!(
            "allow_anonymous true\n\
             listener {tcp} 127.0.0.1\n\
             listener {tls} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n\
             listener {tls_expired} 127.0.0.1\ncertfile {old_cert}\nkeyfile {old_key}\n\
             listener {tls_mutual} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n\
             cafile {good_ca}\nrequire_certificate true\n\
             listener {ws} 127.0.0.1\nprotocol websockets\n\
             listener {wss} 127.0.0.1\nprotocol websockets\ncertfile {cert}\nkeyfile {key}\n\
             listener {tls13} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\ntls_version tlsv1.3\n"
        );
        let mosquitto = Mosquitto::start(
            dir.path(),
            &config,
            &[tcp, tls, tls_expired, tls_mutual, ws, wss, tls13],
        );
        Self {
            mosquitto,
            tcp: tcp.to_string(),
            tls: tls.to_string(),
            tls_expired: tls_expired.to_string(),
            tls_mutual: tls_mutual.to_string(),
            client: [0, 1].map(|i| [&client.0, &client.1][i].display().to_string()),
            rogue: [0, 1].map(|i| [&rogue.0, &rogue.1][i].display().to_string()),
            ws: ws.to_string(),
            wss: wss.to_string(),
            tls13: tls13.to_string(),
            ca: pki.ca_file("good").display().to_string(),
            other_ca: other.ca_file("other").display().to_string(),
            _dir: dir,
        }
    }

    /// `-h 127.0.0.1 -p PORT` of the plain TCP listener.
    fn tcp_args(&self) -> [&str; 4] {
        ["-h", "127.0.0.1", "-p", &self.tcp]
    }

    /// Runs `mqttd TOOL` against the plain TCP listener with `args`.
    fn mqttd(&self, tool: &str, args: &[&str]) -> Output {
        mqttd(&[&[tool][..], &self.tcp_args(), args].concat())
    }

    /// Publishes `message` to `topic` over TCP with `extra` flags; it must succeed.
    #[track_caller]
    fn publish(&self, topic: &str, message: &str, extra: &[&str]) {
        let out = self.mqttd("pub", &[&["-t", topic, "-m", message][..], extra].concat());
        assert_status(&out, 0);
    }

    /// A background `mqttd sub` on the plain TCP listener with `args`.
    fn sub(&self, args: &[&str]) -> Sub {
        Sub::mqttd(&[&self.tcp_args()[..], args].concat())
    }

    /// A background `mosquitto_sub` on the plain TCP listener with `args`.
    fn mosquitto_sub(&self, args: &[&str]) -> Sub {
        Sub::spawn(
            Command::new("mosquitto_sub")
                .args(self.tcp_args())
                .args(args),
        )
    }
}

#[test]
fn tcp_round_trip_prints_formats_as_mosquitto_sub() {
    need_mosquitto!();
    let b = OpenBroker::start();
    // The old -H still names the host.
    let old_host = [
        "-H",
        "127.0.0.1",
        "-p",
        &b.tcp,
        "-t",
        "fmt/r",
        "-m",
        "old",
        "-r",
    ];
    assert_status(&mqttd(&[&["pub"][..], &old_host].concat()), 0);
    let sub = b.sub(&[
        "-t",
        "fmt/#",
        "-q",
        "1",
        "-C",
        "2",
        "-F",
        "%t|%p|%q|%r|%l|%m",
    ]);
    // The retained message arrives after SUBACK: the subscription is in place.
    assert_eq!(sub.line(), "fmt/r|old|0|1|3|0");
    b.publish("fmt/l", "new", &["-q", "1"]);
    assert_eq!(sub.line(), "fmt/l|new|1|0|3|1");
    assert_eq!(sub.exit_code(), Some(0), "{}", b.mosquitto.log());

    // -v prints the topic; an empty message prints "(null)".
    let sub = b.sub(&["-t", "v/e", "-v", "-C", "1", "-d"]);
    sub.wait_subscribed();
    assert_status(&b.mqttd("pub", &["-t", "v/e", "-n"]), 0);
    assert_eq!(sub.line(), "v/e (null)");
    assert_eq!(sub.exit_code(), Some(0));
    // -N: no newline.
    let out = b.mqttd("sub", &["-t", "fmt/r", "-N", "-C", "1"]);
    assert_status(&out, 0);
    assert_eq!(text(&out.stdout), "old");
}

/// `tst` differs between two subscribers; everything else must be byte for byte the same.
fn without_tst(json: &str) -> String {
    let start = json.find("\"tst\":\"").expect("no tst") + 7;
    let len = json[start..].find('"').expect("unterminated tst");
    let tst = &json[start..start + len];
    // 2020-05-06T21:48:00.123456Z+0100, as mosquitto_sub writes it.
    let shape: String = tst
        .chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect();
    assert!(
        shape == "9999-99-99T99:99:99.999999Z+9999" || shape == "9999-99-99T99:99:99.999999Z-9999",
        "tst {tst:?}"
    );
    format!("{}{}", &json[..start], &json[start + len..])
}

#[test]
fn json_output_matches_mosquitto_sub() {
    need_mosquitto!();
    let b = OpenBroker::start();
    let retain = |version: &str, topic: &str, message: &str, extra: &[&str]| {
        b.publish(
            topic,
            message,
            &[&["-V", version, "-r"][..], extra].concat(),
        );
    };
    retain("mqttv311", "json/plain", "say \"hi\" \\o/", &[]);
    retain("mqttv311", "json/tab", "tab\there", &[]);
    let properties = [
        "-D",
        "publish",
        "content-type",
        "application/json",
        "-D",
        "publish",
        "user-property",
        "k",
        "v",
    ];
    retain("mqttv5", "json/props", "{\"a\":1}", &properties);
    for (topic, version) in [
        ("json/plain", "mqttv311"),
        ("json/tab", "mqttv311"),
        ("json/props", "mqttv5"),
    ] {
        for format in ["%j", "%J"] {
            let common = ["-t", topic, "-C", "1", "-V", version, "-F", format];
            let ours = b.mqttd("sub", &common);
            assert_status(&ours, 0);
            let theirs = run(Command::new("mosquitto_sub")
                .args(b.tcp_args())
                .args(common));
            assert_status(&theirs, 0);
            if text(&theirs.stdout).trim().is_empty() {
                // %J of a payload that is not JSON: both print an error and an empty line.
                assert_eq!(text(&ours.stdout), text(&theirs.stdout), "{topic} {format}");
                continue;
            }
            assert_eq!(
                without_tst(&text(&ours.stdout)),
                without_tst(&text(&theirs.stdout)),
                "{topic} {format}"
            );
        }
    }
    let out = b.mqttd("sub", &["-t", "json/props", "-C", "1", "-F", "%C|%P|%x"]);
    assert_status(&out, 0);
    assert_eq!(text(&out.stdout), "application/json|k:v|7b2261223a317d\n");
}

#[test]
fn sub_options_r_e_and_w() {
    need_mosquitto!();
    let b = OpenBroker::start();
    b.publish("r/old", "stale", &["-r"]);
    // -T hides what it matches.
    let sub = b.sub(&["-t", "t/#", "-T", "t/hidden/#", "-C", "1", "-v", "-d"]);
    sub.wait_subscribed();
    for topic in ["t/hidden/x", "t/shown"] {
        b.publish(topic, "m", &["-q", "1"]);
    }
    assert_eq!(sub.line(), "t/shown m");
    assert_eq!(sub.exit_code(), Some(0));
    // -R hides the retained message; the live one is printed.
    let sub = b.sub(&["-t", "r/#", "-R", "-C", "1", "-v", "-d"]);
    sub.wait_subscribed();
    b.publish("r/new", "fresh", &[]);
    assert_eq!(sub.line(), "r/new fresh");
    assert_eq!(sub.exit_code(), Some(0));
    // -E exits once subscribed.
    let out = b.mqttd("sub", &["-t", "e/#", "-E"]);
    assert_status(&out, 0);
    assert!(out.stdout.is_empty());
    // -W: Mosquitto's status 27 when the time runs out.
    assert_status(&b.mqttd("sub", &["-t", "quiet/#", "-W", "1"]), 27);
    // -l: one message per line of standard input, blank lines skipped.
    let sub = b.sub(&["-t", "lines", "-C", "2", "-d"]);
    sub.wait_subscribed();
    let mut publisher = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .arg("pub")
        .args(b.tcp_args())
        .args(["-t", "lines", "-l", "-q", "1"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    publisher
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\n\ntwo\n")
        .unwrap();
    assert_eq!(sub.line(), "one");
    assert_eq!(sub.line(), "two");
    assert_eq!(sub.exit_code(), Some(0));
    assert!(publisher.wait().unwrap().success());
}

#[test]
fn tls_round_trip_and_certificate_failures() {
    need_mosquitto!();
    let b = OpenBroker::start();
    let (tls, ca) = (b.tls.as_str(), b.ca.as_str());
    // The topic comes from the URL, as with mosquitto_sub -L.
    let url = format!("mqtts://localhost:{tls}/tls/t");
    let sub = Sub::mqttd(&["-L", &url, "--cafile", ca, "-C", "1", "-d"]);
    sub.wait_subscribed();
    let out = mqttd(&[
        "pub",
        "-h",
        "localhost",
        "-p",
        tls,
        "--cafile",
        ca,
        "-t",
        "tls/t",
        "-m",
        "secret",
        "-q",
        "2",
    ]);
    assert_status(&out, 0);
    assert_eq!(sub.line(), "secret");
    assert_eq!(sub.exit_code(), Some(0), "{}", b.mosquitto.log());

    let publish = |host: &str, port: &str, ca: &str, extra: &[&str]| {
        let mut args = vec![
            "pub", "-h", host, "-p", port, "--cafile", ca, "-t", "x", "-m", "y",
        ];
        args.extend_from_slice(extra);
        mqttd(&args)
    };
    // A CA that did not sign the broker's certificate.
    let out = publish("localhost", tls, &b.other_ca, &[]);
    assert_error(&out, 4, "unknown CA");
    // The certificate names localhost, not 127.0.0.1.
    let out = publish("127.0.0.1", tls, ca, &[]);
    assert_error(&out, 4, "host name mismatch");
    // --insecure skips the name check only ...
    assert_status(&publish("127.0.0.1", tls, ca, &["--insecure"]), 0);
    // ... not the chain.
    let out = publish("127.0.0.1", tls, &b.other_ca, &["--insecure"]);
    assert_error(&out, 4, "unknown CA");
    let out = publish("localhost", &b.tls_expired, ca, &[]);
    assert_error(&out, 4, "expired");
    // A client certificate the broker requires: ours is signed by its CA ...
    let [cert, key] = &b.client;
    let mutual = ["--cert", cert.as_str(), "--key", key.as_str()];
    assert_status(&publish("localhost", &b.tls_mutual, ca, &mutual), 0);
    // ... a certificate from another CA, or none, is refused by the broker with an alert
    // (which TLS 1.3 delivers after the client's side of the handshake, before CONNACK).
    let [cert, key] = &b.rogue;
    let rogue = ["--cert", cert.as_str(), "--key", key.as_str()];
    for extra in [&rogue[..], &[]] {
        let out = publish("localhost", &b.tls_mutual, ca, extra);
        let code = out.status.code();
        assert!(
            code == Some(4) && text(&out.stderr).contains("refused the handshake"),
            "{code:?}: {}",
            text(&out.stderr)
        );
    }
    // --cert without --key is a usage error.
    assert_status(
        &publish("localhost", tls, ca, &["--cert", cert.as_str()]),
        2,
    );
    // A CA file that does not exist is a usage error.
    let out = publish("localhost", tls, "/nonexistent/ca.pem", &[]);
    assert_status(&out, 2);
}

#[test]
fn websocket_round_trips() {
    need_mosquitto!();
    let b = OpenBroker::start();
    let ws_url = format!("ws://127.0.0.1:{}", b.ws);
    let wss_url = format!("wss://localhost:{}/mqtt", b.wss);
    for (url, tls) in [
        (ws_url.as_str(), &[][..]),
        (wss_url.as_str(), &["--cafile", b.ca.as_str()][..]),
    ] {
        let mut args = vec![
            "-L", url, "-t", "ws/#", "-C", "2", "-F", "%t %p", "-d", "-q", "1",
        ];
        args.extend_from_slice(tls);
        let sub = Sub::mqttd(&args);
        sub.wait_subscribed();
        // One message over the WebSocket, one over plain TCP: both reach the subscriber.
        let mut args = vec![
            "pub",
            "-L",
            url,
            "-t",
            "ws/a",
            "-m",
            "over websocket",
            "-q",
            "1",
        ];
        args.extend_from_slice(tls);
        assert_status(&mqttd(&args), 0);
        assert_eq!(sub.line(), "ws/a over websocket");
        b.publish("ws/b", "over tcp", &[]);
        assert_eq!(sub.line(), "ws/b over tcp");
        assert_eq!(sub.exit_code(), Some(0), "{url}: {}", b.mosquitto.log());
    }
    // A large message crosses many frames' worth of bytes intact.
    let big = "x".repeat(100_000); // below Linux's 128 KiB limit for one argument
    let sub = Sub::mqttd(&["-L", &ws_url, "-t", "big", "-C", "1", "-F", "%l", "-d"]);
    sub.wait_subscribed();
    assert_status(
        &mqttd(&["pub", "-L", &ws_url, "-t", "big", "-m", &big, "-q", "1"]),
        0,
    );
    assert_eq!(sub.line(), "100000");
}

#[test]
fn unreachable_brokers_and_refused_connections_exit_3_and_5() {
    need_mosquitto!();
    // Nothing listens on a port just released.
    let [closed] = free_ports::<1>();
    let out = mqttd(&[
        "pub",
        "-h",
        "127.0.0.1",
        "-p",
        &closed.to_string(),
        "-t",
        "a",
        "-m",
        "b",
    ]);
    assert_error(&out, 3, "cannot connect");

    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let made = run(Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["alice", "wonderland"]));
    assert_status(&made, 0);
    let [port] = free_ports::<1>();
    let config = format!(
        "allow_anonymous false\npassword_file {}\nlistener {port} 127.0.0.1\n",
        passwd.display()
    );
    let _mosquitto = Mosquitto::start(dir.path(), &config, &[port]);
    let port = port.to_string();
    let base = [
        "-h",
        "127.0.0.1",
        "-p",
        port.as_str(),
        "-t",
        "a/b",
        "-m",
        "m",
        "-u",
        "alice",
    ];
    for version in ["mqttv5", "mqttv311"] {
        let out = mqttd(&[&["pub"][..], &base, &["-V", version, "-P", "wrong"]].concat());
        assert_error(&out, 5, "refused the connection");
        // The old --password spelling still works.
        let out = mqttd(
            &[
                &["pub"][..],
                &base,
                &["-V", version, "--password", "wonderland"],
            ]
            .concat(),
        );
        assert_status(&out, 0);
    }
    // The credentials in a URL.
    let url = format!("mqtt://alice:wonderland@127.0.0.1:{port}/a/url");
    assert_status(&mqttd(&["pub", "-L", &url, "-m", "m"]), 0);
    let url = format!("mqtt://alice:wrong@127.0.0.1:{port}/a/url");
    assert_status(&mqttd(&["pub", "-L", &url, "-m", "m"]), 5);
}

/// Mosquitto's dynamic security plugin, which (unlike its acl_file) refuses subscriptions in
/// SUBACK.
fn dynsec_plugin() -> Option<PathBuf> {
    let dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
        "/usr/local/lib",
    ];
    dirs.iter()
        .map(|d| Path::new(d).join("mosquitto_dynamic_security.so"))
        .find(|p| p.is_file())
}

#[test]
fn refused_subscriptions_exit_6() {
    need_mosquitto!();
    let Some(plugin) = dynsec_plugin() else {
        eprintln!("SKIPPED: no mosquitto_dynamic_security.so in Debian's mosquitto package");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dynsec = dir.path().join("dynsec.json");
    // Anonymous clients may subscribe to allowed/# only.
    std::fs::write(
        &dynsec,
        r#"{
  "defaultACLAccess": {"publishClientSend": true, "publishClientReceive": true,
                       "subscribe": false, "unsubscribe": true},
  "clients": [],
  "groups": [{"groupname": "anon", "roles": [{"rolename": "reader"}], "clients": []}],
  "roles": [{"rolename": "reader", "acls": [
    {"acltype": "subscribePattern", "topic": "allowed/#", "priority": 0, "allow": true}]}],
  "anonymousGroup": "anon"
}"#,
    )
    .unwrap();
    let [port] = free_ports::<1>();
    let config = format!(
        "allow_anonymous true\nplugin {}\nplugin_opt_config_file {}\nlistener {port} 127.0.0.1\n",
        plugin.display(),
        dynsec.display()
    );
    let _mosquitto = Mosquitto::start(dir.path(), &config, &[port]);
    let port = port.to_string();
    let base = ["sub", "-h", "127.0.0.1", "-p", port.as_str(), "-E"];
    for version in ["mqttv5", "mqttv311"] {
        let out = mqttd(&[&base[..], &["-V", version, "-t", "secret/#"]].concat());
        assert_error(&out, 6, "refused every subscription");
        // One refusal among several is a warning; the others go on.
        let out = mqttd(
            &[
                &base[..],
                &["-V", version, "-t", "secret/#", "-t", "allowed/#"],
            ]
            .concat(),
        );
        assert_error(&out, 0, "Warning: subscription to secret/# refused");
    }
}

#[test]
fn usage_errors_exit_2_and_help_is_long_only() {
    // No broker needed: these fail before connecting.
    for args in [
        &["pub", "-t", "a", "-m", "b", "-q", "3"][..],
        &["pub", "-m", "no topic"],
        &["sub", "-h", "127.0.0.1"],
        &["pub", "-t", "a/#", "-m", "wildcard"],
        &[
            "pub",
            "-t",
            "a",
            "-m",
            "b",
            "-D",
            "publish",
            "no-such-property",
            "1",
        ],
        &[
            "pub",
            "-t",
            "a",
            "-m",
            "b",
            "-V",
            "mqttv311",
            "-D",
            "publish",
            "content-type",
            "x",
        ],
        &["pub", "-t", "a", "-m", "b", "-n"],
        &["pub", "-L", "http://h", "-t", "a", "-m", "b"],
        &["sub", "-t", "a", "-c"],
    ] {
        let out = mqttd(args);
        assert_status(&out, 2);
    }
    for tool in ["pub", "sub"] {
        let out = mqttd(&[tool, "--help"]);
        assert_status(&out, 0);
        let help = text(&out.stdout);
        assert!(help.contains("-h, --host"), "{help}");
        assert!(help.contains("Exit status"), "{help}");
    }
}

#[test]
fn bench_runs_over_tls_and_websocket() {
    need_mosquitto!();
    let b = OpenBroker::start();
    let ws = format!("ws://127.0.0.1:{}", b.ws);
    let wss = format!("wss://localhost:{}/mqtt", b.wss);
    let transports: [&[&str]; 3] = [
        &["-L", &ws],
        &[
            "--transport",
            "tls",
            "-H",
            "localhost",
            "--port",
            &b.tls,
            "--cafile",
            &b.ca,
        ],
        &["-L", &wss, "--cafile", &b.ca],
    ];
    for transport in transports {
        let fixed = [
            "bench",
            "pairs",
            "--count",
            "2",
            "--qos",
            "1",
            "--messages",
            "50",
            "--expect",
            "100",
            "--duration",
            "60",
            "--drain",
            "60",
            "--json",
            "--quiet",
        ];
        let out = mqttd(&[&fixed[..], transport].concat());
        assert_status(&out, 0);
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            summary["sent"].as_f64(),
            Some(100.0),
            "{transport:?}: {summary}"
        );
        assert_eq!(
            summary["received"].as_f64(),
            Some(100.0),
            "{transport:?}: {summary}"
        );
    }
}

#[test]
fn mqtt5_properties_and_wills_reach_subscribers() {
    need_mosquitto!();
    let b = OpenBroker::start();
    let sub = b.sub(&["-t", "p/#", "-C", "1", "-d", "-F", "%t|%E|%R|%D|%C|%P|%F"]);
    sub.wait_subscribed();
    let properties = [
        "-D",
        "publish",
        "message-expiry-interval",
        "60",
        "-D",
        "publish",
        "response-topic",
        "reply/here",
        "-D",
        "publish",
        "correlation-data",
        "req-1",
        "-D",
        "publish",
        "content-type",
        "text/plain",
        "-D",
        "publish",
        "user-property",
        "a",
        "1",
        "-D",
        "publish",
        "user-property",
        "b",
        "2",
        "-D",
        "publish",
        "payload-format-indicator",
        "1",
        "-D",
        "connect",
        "session-expiry-interval",
        "10",
    ];
    b.publish("p/x", "m", &[&["-q", "1"][..], &properties].concat());
    let line = sub.line();
    let fields: Vec<&str> = line.split('|').collect();
    assert_eq!(fields.len(), 7, "{line}");
    // What is left of the expiry interval when it arrives: at most what was sent.
    let expiry: u32 = fields[1].parse().unwrap();
    assert!((1..=60).contains(&expiry), "{line}");
    assert_eq!(
        [fields[0], fields[2], fields[3], fields[4], fields[5], fields[6]],
        ["p/x", "reply/here", "req-1", "text/plain", "a:1 b:2", "1"],
        "{line}"
    );
    assert_eq!(sub.exit_code(), Some(0));

    // A client that vanishes without DISCONNECT leaves its will.
    let watcher = b.sub(&["-t", "will/#", "-C", "1", "-d", "-v"]);
    watcher.wait_subscribed();
    let mut doomed = b.sub(&[
        "-t",
        "nothing",
        "-d",
        "--will-topic",
        "will/t",
        "--will-payload",
        "gone",
        "--will-qos",
        "1",
    ]);
    doomed.wait_subscribed();
    doomed.child.kill().unwrap();
    assert_eq!(watcher.line(), "will/t gone");
    assert_eq!(watcher.exit_code(), Some(0));
}

#[test]
fn sub_retained_only_and_remove_retained() {
    need_mosquitto!();
    let b = OpenBroker::start();
    for (topic, message) in [("keep/a", "1"), ("keep/b", "2"), ("keep/c/x", "3")] {
        b.publish(topic, message, &["-r"]);
    }
    // --retained-only prints what is retained, and exits at the first live message without
    // printing it.
    let sub = b.sub(&["-t", "keep/#", "-v", "--retained-only", "-d"]);
    sub.wait_subscribed();
    b.publish("keep/live", "now", &[]);
    let (code, mut lines) = sub.finish();
    assert_eq!(code, Some(0));
    lines.sort();
    assert_eq!(lines, ["keep/a 1", "keep/b 2", "keep/c/x 3"]);

    // --remove-retained --retained-only clears the tree but what -T hides, and exits at the
    // first live message: the broker's echo of its own first removal.
    let out = b.mqttd(
        "sub",
        &[
            "-t",
            "keep/#",
            "-T",
            "keep/c/#",
            "-v",
            "--remove-retained",
            "--retained-only",
        ],
    );
    assert_status(&out, 0);
    let mut printed: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    printed.sort_unstable();
    assert_eq!(printed, ["keep/a 1", "keep/b 2"]);
    // What Mosquitto still keeps, as mosquitto_sub sees it: the spared message only.
    let theirs = b.mosquitto_sub(&["-t", "keep/#", "-v", "--retained-only"]);
    assert_eq!(theirs.line(), "keep/c/x 3");
    b.publish("keep/live", "now", &[]);
    assert_eq!(theirs.finish(), (Some(0), vec![]));

    // With -R, --remove-retained still clears what it does not print; the broker's echo of
    // the removal is live, so it is printed.
    let sub = b.sub(&[
        "-t",
        "keep/#",
        "-R",
        "--remove-retained",
        "-v",
        "-C",
        "2",
        "-d",
    ]);
    sub.wait_subscribed();
    b.publish("keep/live", "now", &[]);
    let (code, mut lines) = sub.finish();
    assert_eq!(code, Some(0));
    lines.sort();
    assert_eq!(lines, ["keep/c/x (null)", "keep/live now"]);
    // Nothing is left but a marker retained now.
    b.publish("keep/marker", "m", &["-r"]);
    let theirs = b.mosquitto_sub(&["-t", "keep/#", "-v", "--retained-only"]);
    assert_eq!(theirs.line(), "keep/marker m");
    b.publish("keep/live", "now", &[]);
    assert_eq!(theirs.finish(), (Some(0), vec![]));

    // -R and --retained-only contradict each other.
    assert_status(
        &b.mqttd("sub", &["-t", "keep/#", "-R", "--retained-only"]),
        2,
    );
}

#[test]
fn sub_unsubscribes_from_a_kept_session() {
    need_mosquitto!();
    let b = OpenBroker::start();
    let session = ["-i", "kept", "-c", "-q", "1"];
    assert_status(
        &b.mqttd(
            "sub",
            &[&session[..], &["-t", "u/a", "-t", "u/b", "-E"]].concat(),
        ),
        0,
    );
    // -U alone: no SUBSCRIBE, one UNSUBSCRIBE, and -E exits after its UNSUBACK.
    let out = b.mqttd("sub", &[&session[..], &["-U", "u/a", "-E", "-d"]].concat());
    assert_status(&out, 0);
    let debug = text(&out.stderr);
    assert!(debug.contains("received UNSUBACK"), "{debug}");
    assert!(!debug.contains("sending SUBSCRIBE"), "{debug}");
    // Published while the session is offline, u/a first: only u/b is still subscribed.
    b.publish("u/a", "gone", &["-q", "1"]);
    b.publish("u/b", "kept", &["-q", "1"]);
    let out = b.mqttd(
        "sub",
        &[&session[..], &["-U", "u/none", "-v", "-C", "1"]].concat(),
    );
    assert_status(&out, 0);
    assert_eq!(text(&out.stdout), "u/b kept\n");
    // Neither -t nor -U: nothing to do.
    assert_status(&b.mqttd("sub", &["-E"]), 2);
}

#[test]
fn capath_and_tls_version() {
    need_mosquitto!();
    let b = OpenBroker::start();
    let dir = tempfile::tempdir().unwrap();
    let (trusted, foreign, empty) = (
        dir.path().join("trusted"),
        dir.path().join("foreign"),
        dir.path().join("empty"),
    );
    for d in [&trusted, &foreign, &empty] {
        std::fs::create_dir(d).unwrap();
    }
    // Any file names, other CAs and files that are not certificates beside the right one.
    std::fs::copy(&b.ca, trusted.join("ours.crt")).unwrap();
    std::fs::copy(&b.other_ca, trusted.join("b-other.pem")).unwrap();
    std::fs::write(trusted.join("README"), "not a certificate\n").unwrap();
    std::fs::copy(&b.other_ca, foreign.join("other.pem")).unwrap();
    std::fs::write(empty.join("README"), "not a certificate\n").unwrap();

    let publish = |port: &str, extra: &[&str]| {
        let args = [
            &["pub", "-h", "localhost", "-p", port, "-t", "x", "-m", "y"][..],
            extra,
        ];
        mqttd(&args.concat())
    };
    let path = |d: &Path| d.display().to_string();
    // --capath alone turns TLS on.
    assert_status(&publish(&b.tls, &["--capath", &path(&trusted)]), 0);
    let out = publish(&b.tls, &["--capath", &path(&foreign)]);
    assert_error(&out, 4, "unknown CA");
    // With --cafile, both are trusted.
    let both = ["--capath", &path(&foreign), "--cafile", &b.ca];
    assert_status(&publish(&b.tls, &both), 0);
    for unusable in [path(&empty), path(&dir.path().join("missing"))] {
        assert_status(&publish(&b.tls, &["--capath", &unusable]), 2);
    }

    // Mosquitto's tls_version is a minimum: the TLS 1.3 listener refuses a client pinned to
    // TLS 1.2, which the other listener accepts.
    let ca = ["--cafile", b.ca.as_str()];
    for (port, version, status) in [
        (&b.tls13, "tlsv1.3", 0),
        (&b.tls13, "tlsv1.2", 4),
        (&b.tls, "tlsv1.2", 0),
        (&b.tls, "tlsv1.3", 0),
        (&b.tls, "tlsv1.1", 2),
        (&b.tls, "sslv3", 2),
    ] {
        let out = publish(port, &[&ca[..], &["--tls-version", version]].concat());
        assert_status(&out, status);
    }
    assert_status(&publish(&b.tls13, &ca), 0);
}
