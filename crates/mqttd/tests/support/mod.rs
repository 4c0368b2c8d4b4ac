//! What the integration tests share: the real `mqttd` binary run as a child process, and a raw
//! MQTT connection for the bytes and behaviours no well-behaved client produces.
//!
//! [`Broker::start`] runs the binary on ephemeral ports (MQTT over TCP, MQTT over WebSocket, and
//! an HTTP listener for `/metrics`) with a configuration file and data directory in a temporary directory, and
//! parses the bound ports from the lines it prints. It reads the process's resident memory from
//! `/proc` and scrapes its metrics. Stopping it (explicitly with [`Broker::stop`], or on drop)
//! sends SIGTERM and asserts that the broker exits with status 0 within
//! [`SHUTDOWN_TIMEOUT`]: graceful shutdown is a feature, and every test checks it. For the
//! durability tests it can also be killed with SIGKILL ([`Broker::kill`]) and started again on
//! the same data directory ([`Broker::restart`]), and [`SessionClient`] is a client that keeps
//! its session across a connection the broker's crash cut, to resume it afterwards.
#![allow(dead_code)] // Each test binary uses a different part of this module.

pub(crate) mod client;
pub(crate) mod pki;
pub(crate) mod witness;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use mqttd_proto::client::{ClientConfig, ClientConnection, ClientError, Event};
use mqttd_proto::codec::{DecodeError, PacketReader};
use mqttd_proto::session::{Enqueued, Session};
use mqttd_proto::{
    ClientId, ConnAck, Connect, ConnectProperties, Message, Packet, PacketId, ProtocolVersion, QoS,
    ReasonCode, SubAck, SubscribeProperties, Subscription, SubscriptionOptions, TopicFilter,
};

/// How long the broker may take to exit after SIGTERM. It takes milliseconds; the bound is
/// that of a hang, on a debug build and a machine whose cores are busy with other work.
pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the broker may take to print its listening lines (a hang bound, as above).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a raw connection's handshake and an HTTP scrape may take (a hang bound).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `mqttd` process.
///
/// It owns a temporary directory holding the configuration file, the data directory and one
/// log file per run, which outlives the process: the process can be killed ([`Broker::kill`])
/// or shut down ([`Broker::shutdown`]) and started again on the same data
/// ([`Broker::restart`]).
pub(crate) struct Broker {
    child: Option<Child>,
    pid: u32,
    /// The MQTT over TCP listener.
    pub(crate) mqtt: SocketAddr,
    /// The MQTT over WebSocket listener (path `/mqtt`).
    pub(crate) ws: SocketAddr,
    /// The HTTP listener (`/metrics`, `/health`).
    pub(crate) http: SocketAddr,
    /// The MQTT over TLS listener, when [`Broker::start_with`] asked for one (unspecified
    /// otherwise).
    pub(crate) tls: SocketAddr,
    /// The MQTT over WebSocket over TLS listener, when [`Broker::start_with`] asked for one
    /// (unspecified otherwise).
    pub(crate) wss: SocketAddr,
    /// The MQTT over QUIC listener (UDP), when [`Broker::start_with`] asked for one
    /// (unspecified otherwise).
    pub(crate) quic: SocketAddr,
    /// The relay's URL, when [`Broker::start_with`] asked for a `relay://` listener.
    pub(crate) relay_url: Option<String>,
    /// The node id of the `p2p://` listener, when [`Broker::start_with`] asked for one.
    pub(crate) node_id: Option<String>,
    /// The UDP addresses the `p2p://` listener's node bound.
    pub(crate) node_direct: Vec<SocketAddr>,
    /// The admin API key the broker printed on its first start (none if the data directory
    /// had a key file already).
    pub(crate) api_key: Option<String>,
    /// Listeners besides the TCP and HTTP ones (`--listen` URLs).
    extra_listeners: Vec<String>,
    /// JSON log lines with this filter instead of text with `MQTTD_TEST_LOG`'s
    /// ([`Self::log_json`]).
    json_log_filter: Option<String>,
    log: PathBuf,
    /// Holds `mqttd.toml`, `data/` and the logs.
    root: PathBuf,
    /// Runs started so far; names each run's log file.
    runs: u32,
    /// Removed on drop.
    temp: Option<tempfile::TempDir>,
}

/// The broker exited before printing its listeners.
#[derive(Debug)]
pub(crate) struct StartFailure {
    /// How it exited.
    pub(crate) status: ExitStatus,
    /// Everything it wrote to standard error.
    pub(crate) stderr: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mqttd exited at startup: {}\n--- stderr ---\n{}\n---",
            self.status, self.stderr
        )
    }
}

impl Broker {
    /// Starts `mqttd` with `config` (TOML) as its configuration file, anonymous access, and
    /// listeners on ephemeral loopback ports, in a temporary directory removed on drop. Logs go
    /// to a file, shown when a test fails; `MQTTD_TEST_LOG` sets their filter (default `warn`).
    pub(crate) fn start(config: &str) -> Self {
        Self::start_with(config, &[])
    }

    /// As [`Self::start`], with further listeners (`tls://127.0.0.1:0`).
    pub(crate) fn start_with(config: &str, listeners: &[&str]) -> Self {
        let mut broker = Self::configured(config, listeners);
        broker.restart();
        broker
    }

    /// A broker configured as [`Self::start_with`] would, not started yet: write files into
    /// [`Self::root`] first, then [`Self::restart`] (or [`Self::try_restart`]).
    pub(crate) fn configured(config: &str, listeners: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let mut broker = Self::prepare(config, dir.path());
        broker.temp = Some(dir);
        broker.extra_listeners = listeners.iter().map(|l| (*l).to_owned()).collect();
        broker
    }

    /// The temporary directory holding the configuration, the data directory and the logs.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// A broker that is not running yet, with its configuration written.
    fn prepare(config: &str, dir: &Path) -> Self {
        std::fs::write(dir.join("mqttd.toml"), config).expect("write the configuration");
        Self {
            child: None,
            pid: 0,
            mqtt: unspecified(),
            ws: unspecified(),
            http: unspecified(),
            tls: unspecified(),
            wss: unspecified(),
            quic: unspecified(),
            relay_url: None,
            node_id: None,
            node_direct: Vec::new(),
            api_key: None,
            extra_listeners: Vec::new(),
            json_log_filter: None,
            log: dir.join("mqttd-0.log"),
            root: dir.to_owned(),
            runs: 0,
            temp: None,
        }
    }

    /// Starts the broker again on the same directory, after [`Self::kill`] or
    /// [`Self::shutdown`] (or for the first time). Panics if it does not come up.
    pub(crate) fn restart(&mut self) {
        if let Err(failure) = self.try_restart() {
            panic!("{failure}");
        }
    }

    /// As [`Self::restart`], but returns how the broker exited if it exits before printing
    /// its listeners. Panics if it neither listens nor exits within the startup timeout.
    pub(crate) fn try_restart(&mut self) -> Result<(), StartFailure> {
        assert!(self.child.is_none(), "the broker is still running");
        self.runs += 1;
        self.log = self.root.join(format!("mqttd-{}.log", self.runs));
        self.mqtt = unspecified();
        self.ws = unspecified();
        self.http = unspecified();
        self.tls = unspecified();
        self.wss = unspecified();
        self.quic = unspecified();
        self.relay_url = None;
        self.node_id = None;
        self.node_direct.clear();
        let wants_relay = self
            .extra_listeners
            .iter()
            .any(|l| l.starts_with("relay://"));
        let wants_p2p = self.extra_listeners.iter().any(|l| l.starts_with("p2p://"));
        let wants_tls = self.extra_listeners.iter().any(|l| l.starts_with("tls://"));
        let wants_wss = self.extra_listeners.iter().any(|l| l.starts_with("wss://"));
        let wants_quic = self
            .extra_listeners
            .iter()
            .any(|l| l.starts_with("quic://"));
        let filter = match &self.json_log_filter {
            Some(filter) => filter.clone(),
            None => std::env::var("MQTTD_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        };
        let format = match self.json_log_filter {
            Some(_) => "json",
            None => "text",
        };
        let mut child = Command::new(broker_binary())
            .args([
                "--listen",
                "tcp://127.0.0.1:0",
                "--listen",
                "ws://127.0.0.1:0",
                "--listen",
                "http://127.0.0.1:0",
            ])
            .args(
                self.extra_listeners
                    .iter()
                    .flat_map(|l| ["--listen", l.as_str()]),
            )
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--config")
            .arg(self.root.join("mqttd.toml"))
            .arg("--allow-anonymous")
            .args(["--log-format", format])
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&self.log).expect("create the log file"))
            .spawn()
            .expect("spawn mqttd");
        self.pid = child.id();
        // Read the listening lines on a thread, which then keeps draining standard output so
        // the broker can never block on a full pipe.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while self.mqtt.port() == 0
            || self.ws.port() == 0
            || self.http.port() == 0
            || (wants_tls && self.tls.port() == 0)
            || (wants_wss && self.wss.port() == 0)
            || (wants_quic && self.quic.port() == 0)
            || (wants_relay && self.relay_url.is_none())
            || (wants_p2p && (self.node_id.is_none() || self.node_direct.is_empty()))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Disconnected) => {
                    // Standard output closed: the process is exiting.
                    let left = deadline.saturating_duration_since(Instant::now());
                    if let Some(status) = wait_timeout(&mut child, left) {
                        return Err(StartFailure {
                            status,
                            stderr: self.log_text(),
                        });
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "mqttd closed its standard output without exiting\n{}",
                        self.log_tail()
                    );
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "mqttd did not print its listeners in time\n{}",
                        self.log_tail()
                    );
                }
            };
            if let Some(key) = line.strip_prefix("mqttd api key admin ") {
                self.api_key = Some(key.to_owned());
                continue;
            }
            if let Some(url) = line.strip_prefix("mqttd relay url ") {
                self.relay_url = Some(url.to_owned());
                continue;
            }
            if let Some(addr) = line.strip_prefix("mqttd p2p direct ") {
                self.node_direct
                    .push(addr.parse().expect("the node's address"));
                continue;
            }
            let Some(url) = line.strip_prefix("mqttd listening on ") else {
                continue;
            };
            let (scheme, addr) = url.split_once("://").expect("URL with a scheme");
            if scheme == "p2p" {
                self.node_id = Some(addr.to_owned());
                continue;
            }
            let addr = addr.parse().expect("listening address");
            match scheme {
                "tcp" => self.mqtt = addr,
                "ws" => self.ws = addr,
                "http" => self.http = addr,
                "tls" => self.tls = addr,
                "wss" => self.wss = addr,
                "quic" => self.quic = addr,
                "relay" => {}
                other => panic!("unexpected listener scheme {other}"),
            }
        }
        self.child = Some(child);
        Ok(())
    }

    /// The data directory (`--data-dir`).
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Kills the broker with SIGKILL, as a crash would, and waits until it is gone.
    pub(crate) fn kill(&mut self) {
        let mut child = self.child.take().expect("the broker is running");
        let Some(status) = signal_and_wait(&mut child, "KILL", SHUTDOWN_TIMEOUT) else {
            panic!("mqttd survived SIGKILL for {SHUTDOWN_TIMEOUT:?}");
        };
        // Had it exited on its own before the signal, the test would not be testing a crash.
        assert_eq!(
            status.signal(),
            Some(9),
            "mqttd was not killed by SIGKILL: {status}\n{}",
            self.log_tail()
        );
    }

    /// Sends SIGHUP (reload the access files and the TLS certificates).
    pub(crate) fn hangup(&self) {
        let sent = Command::new("kill")
            .arg("-HUP")
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -HUP failed");
    }

    /// Sends SIGTERM and asserts that the broker exits with status 0 within
    /// [`SHUTDOWN_TIMEOUT`]; [`Self::restart`] can start it again.
    pub(crate) fn shutdown(&mut self) {
        self.terminate();
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Resident memory, in bytes (`VmRSS` in `/proc/PID/status`).
    pub(crate) fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read /proc/PID/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    /// CPU time the process has used, user and system (`/proc/PID/stat`, in clock ticks of
    /// 10 ms).
    pub(crate) fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .expect("read /proc/PID/stat");
        // The fields after the command name, which is in parentheses and may contain spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat format")
            .1
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 of stat(5); the first after ')' is field 3.
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        Duration::from_millis(ticks * 10)
    }

    /// Panics (with the broker's log) if the process has exited.
    pub(crate) fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("broker not stopped");
        if let Some(status) = child.try_wait().expect("query the broker process") {
            panic!(
                "mqttd exited during the test: {status}\n{}",
                self.log_tail()
            );
        }
    }

    /// Scrapes `/metrics`.
    pub(crate) fn metrics(&self) -> Metrics {
        let text = http_get(self.http, "/metrics");
        Metrics::parse(&text)
    }

    /// Polls `/metrics` until `done` holds, for at most `timeout`; returns the last scrape.
    pub(crate) async fn wait_for_metrics(
        &self,
        timeout: Duration,
        done: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        let deadline = Instant::now() + timeout;
        loop {
            let http = self.http;
            let text = tokio::task::spawn_blocking(move || http_get(http, "/metrics"))
                .await
                .expect("scrape task");
            let metrics = Metrics::parse(&text);
            if done(&metrics) || Instant::now() >= deadline {
                return metrics;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Tries `attempt` every 50 ms until it gives a value, for at most `timeout`; panics
    /// saying what did not happen, with the end of the log, if it never does.
    pub(crate) async fn eventually<T, F>(
        &self,
        timeout: Duration,
        what: &str,
        mut attempt: impl FnMut() -> F,
    ) -> T
    where
        F: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = attempt().await {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and asserts that the broker exits with status 0 within
    /// [`SHUTDOWN_TIMEOUT`].
    pub(crate) fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Some(status) = signal_and_wait(&mut child, "TERM", SHUTDOWN_TIMEOUT) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mqttd did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM\n{}",
                self.log_tail()
            );
        };
        assert_eq!(
            status.code(),
            Some(0),
            "mqttd exit status after SIGTERM: {status}\n{}",
            self.log_tail()
        );
    }

    /// From the next [`Self::restart`] on, logs JSON lines with `filter` (an `EnvFilter`),
    /// whatever `MQTTD_TEST_LOG` says: for tests that read the log ([`Self::log_records`]).
    pub(crate) fn log_json(&mut self, filter: &str) {
        self.json_log_filter = Some(filter.to_owned());
    }

    /// The records of the current (or last) run's log, with [`Self::log_json`]: each line
    /// that parses as JSON.
    pub(crate) fn log_records(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The log of the current (or last) run, whole.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of the broker's log, for failure messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = self.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- mqttd log (last 40 lines) ---\n{tail}\n---")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed already: do not hide its message behind a second panic.
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("{}", self.log_tail());
            }
            return;
        }
        self.terminate();
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// Sends `signal` with kill(1) and waits up to `timeout` for the process to exit.
fn signal_and_wait(child: &mut Child, signal: &str, timeout: Duration) -> Option<ExitStatus> {
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal} failed");
    wait_timeout(child, timeout)
}

/// Waits up to `timeout` for the process to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for mqttd") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP/1.1 GET; returns the body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP listener");
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .expect("set a read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the HTTP request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the HTTP response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_owned()
}

/// One scrape of `/metrics`: sample name (with labels, if any) to value.
#[derive(Debug)]
pub(crate) struct Metrics(HashMap<String, f64>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self(samples)
    }

    /// The value of sample `name`; panics if the broker does not export it.
    pub(crate) fn get(&self, name: &str) -> f64 {
        match self.0.get(name) {
            Some(v) => *v,
            None => panic!(
                "no metric {name} in {:?}",
                self.0.keys().collect::<Vec<_>>()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------------------------

/// Awaits `future` for at most `limit`; panics naming `what` if it takes longer. Every wait in
/// the tests goes through a deadline like this one, generous enough that only a hang reaches
/// it, so that a stuck helper fails with its name instead of hanging the run.
pub(crate) async fn within<T>(
    limit: Duration,
    what: &str,
    future: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw MQTT
// ---------------------------------------------------------------------------------------------

/// Encodes one packet.
pub(crate) fn encode(version: ProtocolVersion, packet: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    packet.encode(version, &mut buf).expect("encodable packet");
    buf.to_vec()
}

/// MQTT's variable byte integer, for tests that build packets by hand.
pub(crate) fn varint(mut n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            v.push(byte);
            return v;
        }
        v.push(byte | 0x80);
    }
}

/// A clean-start CONNECT with keep alive 60 and no will.
pub(crate) fn connect_packet(version: ProtocolVersion, client_id: &str) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: ClientId::try_from(client_id).expect("valid client id"),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }))
}

/// A CONNECT that keeps its session (clean start 0) with keep alive 60 and no will; `expiry`
/// is its MQTT 5 session expiry interval.
pub(crate) fn session_connect_packet(
    version: ProtocolVersion,
    client_id: &str,
    expiry: Option<u32>,
) -> Packet {
    let Packet::Connect(mut connect) = connect_packet(version, client_id) else {
        unreachable!("connect_packet makes a CONNECT")
    };
    connect.clean_start = false;
    connect.properties.session_expiry_interval = expiry;
    Packet::Connect(connect)
}

/// A PUBLISH of `payload` to `topic`; `id` is its packet identifier unless `qos` is 0.
pub(crate) fn publish_packet(
    topic: &str,
    payload: Vec<u8>,
    qos: QoS,
    retain: bool,
    id: u16,
) -> Packet {
    Packet::Publish(mqttd_proto::Publish {
        dup: false,
        qos,
        retain,
        topic: mqttd_proto::TopicName::try_from(topic).expect("valid topic"),
        packet_id: (qos != QoS::AtMostOnce).then(|| PacketId::new(id).expect("non-zero")),
        properties: mqttd_proto::PublishProperties::default(),
        payload: bytes::Bytes::from(payload),
    })
}

/// A SUBSCRIBE for one filter.
pub(crate) fn subscribe_packet(packet_id: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(mqttd_proto::Subscribe {
        packet_id: PacketId::new(packet_id).expect("non-zero packet id"),
        properties: SubscribeProperties::default(),
        filters: vec![Subscription {
            filter: TopicFilter::try_from(filter).expect("valid filter"),
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        }],
    })
}

/// What a raw connection read.
#[derive(Debug)]
pub(crate) enum Received {
    /// A packet.
    Packet(Box<Packet>),
    /// The broker closed the connection (end of stream, or reset).
    Closed,
    /// Nothing within the time allowed.
    TimedOut,
    /// The broker sent bytes that do not decode.
    Undecodable(DecodeError),
}

/// A TCP connection driven by hand, byte by byte if need be.
pub(crate) struct RawConn {
    pub(crate) stream: TcpStream,
    /// The version to decode the broker's packets with.
    pub(crate) version: ProtocolVersion,
    reader: PacketReader,
    rbuf: BytesMut,
}

impl RawConn {
    /// Opens a TCP connection; nothing is sent.
    pub(crate) async fn open(addr: SocketAddr, version: ProtocolVersion) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect to mqttd");
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        Self::from_stream(stream, version)
    }

    /// Wraps a connected stream.
    pub(crate) fn from_stream(stream: TcpStream, version: ProtocolVersion) -> Self {
        Self {
            stream,
            version,
            reader: PacketReader::new(u32::MAX),
            rbuf: BytesMut::with_capacity(4096),
        }
    }

    /// Opens a connection and completes the handshake (CONNACK 0x00 expected).
    pub(crate) async fn connected(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
    ) -> Self {
        let mut conn = Self::open(addr, version).await;
        conn.send(&encode(version, &connect_packet(version, client_id)))
            .await
            .expect("send CONNECT");
        match conn.recv(STEP_TIMEOUT).await {
            Received::Packet(p) if matches!(&*p, Packet::ConnAck(ack) if !ack.reason.is_error()) => {
                conn
            }
            other => panic!("{client_id}: expected a successful CONNACK, got {other:?}"),
        }
    }

    /// The stream and any bytes read but not yet decoded.
    pub(crate) fn into_parts(self) -> (TcpStream, BytesMut) {
        (self.stream, self.rbuf)
    }

    /// Writes bytes. An error means the broker has closed the connection.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads the next packet, waiting at most `timeout`.
    pub(crate) async fn recv(&mut self, timeout: Duration) -> Received {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.reader.read(&mut self.rbuf, Some(self.version)) {
                Ok(Some(packet)) => return Received::Packet(Box::new(packet)),
                Ok(None) => {}
                Err(e) => return Received::Undecodable(e),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
                Err(_) => return Received::TimedOut,
                Ok(Ok(0) | Err(_)) => return Received::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Reads until the broker closes the connection, for at most `timeout`; returns the packets
    /// read before the close, or `Err` with what was read if it did not close in time.
    pub(crate) async fn until_closed(&mut self, timeout: Duration) -> Result<Vec<Packet>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut packets = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Received::Packet(p) => packets.push(*p),
                Received::Closed => return Ok(packets),
                Received::TimedOut => {
                    return Err(format!(
                        "still open after {timeout:?}; received {packets:?}"
                    ))
                }
                Received::Undecodable(e) => {
                    return Err(format!(
                        "undecodable bytes from the broker ({e}) after {packets:?}"
                    ))
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A client that survives the broker's crash
// ---------------------------------------------------------------------------------------------

/// How long [`SessionClient::connect`] waits for CONNACK.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(30);

/// An MQTT client driven in the test's own task: `mqttd-proto`'s client state machine over a
/// TCP connection, with the session kept when the connection is lost.
///
/// `mqttd_client` hands a session back only after a DISCONNECT it sent; when the broker dies
/// the session goes with the connection task. A durable client (one that stores its session,
/// as MQTT expects of a QoS 2 receiver) keeps it: the identifiers of QoS 2 messages it
/// acknowledged with PUBREC, so that the broker's retransmission is not taken for a new
/// message, and its own publications in flight, to resend them. [`SessionClient::into_session`]
/// returns it after the connection closed, for [`SessionClient::connect`] to resume.
pub(crate) struct SessionClient {
    conn: ClientConnection,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    reader: PacketReader,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Events read while waiting for something else.
    stash: std::collections::VecDeque<Event>,
}

impl SessionClient {
    /// Connects and waits for a successful CONNACK; `session` (with `config.clean_start`
    /// false) resumes an earlier connection's session.
    pub(crate) async fn connect(
        addr: SocketAddr,
        config: ClientConfig,
        session: Option<Session>,
    ) -> Result<(Self, ConnAck), String> {
        let client_id = config.client_id.clone();
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{client_id:?}: connect: {e}"))?;
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        let (rd, wr) = stream.into_split();
        let conn = ClientConnection::new(config, session, Instant::now());
        let reader = PacketReader::new(conn.max_packet_size());
        let mut client = Self {
            conn,
            rd,
            wr,
            reader,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::new(),
            stash: std::collections::VecDeque::new(),
        };
        let deadline = tokio::time::Instant::now() + CONNACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match client.next_event(left).await {
                Some(Event::Connected(ack)) => return Ok((client, ack)),
                Some(Event::Rejected(ack)) => {
                    return Err(format!("{client_id:?}: refused: {ack:?}"))
                }
                Some(Event::Closed { reason, .. }) => {
                    return Err(format!("{client_id:?}: closed before CONNACK: {reason:?}"))
                }
                Some(_) => {}
                None => {
                    return Err(format!(
                        "{client_id:?}: no CONNACK within {CONNACK_TIMEOUT:?}"
                    ))
                }
            }
        }
    }

    /// Publishes a message: sent, or queued behind the broker's receive window; an error once
    /// the connection is closed.
    pub(crate) fn publish(&mut self, message: Message) -> Result<Enqueued, ClientError> {
        self.conn
            .publish(Instant::now(), std::sync::Arc::new(message))
    }

    /// Subscribes to one filter and waits for SUBACK; other events are kept for
    /// [`Self::next_event`].
    pub(crate) async fn subscribe_one(&mut self, filter: &str, qos: QoS) -> SubAck {
        let subscription = Subscription {
            filter: TopicFilter::try_from(filter).expect("valid filter"),
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        };
        let id = self
            .conn
            .subscribe(vec![subscription], SubscribeProperties::default())
            .expect("subscribe on an open connection");
        let deadline = tokio::time::Instant::now() + CONNACK_TIMEOUT;
        let mut held = std::collections::VecDeque::new();
        let ack = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(Event::SubAck(ack)) if ack.packet_id == id => break ack,
                Some(Event::Closed { reason, .. }) => {
                    panic!("connection closed before SUBACK for {filter}: {reason:?}")
                }
                Some(other) => held.push_back(other),
                None => panic!("no SUBACK for {filter} within {CONNACK_TIMEOUT:?}"),
            }
        };
        held.append(&mut self.stash);
        self.stash = held;
        ack
    }

    /// Acknowledges an incoming message (configurations with `auto_ack` off). After the
    /// connection closed nothing is sent, but a QoS 2 message is recorded in the session as
    /// received, so that its retransmission on the next connection is not reported again.
    pub(crate) fn ack(&mut self, packet_id: PacketId) {
        self.conn
            .ack(packet_id, ReasonCode::Success)
            .expect("acknowledge a message that awaits it");
    }

    /// The next event, reading and writing as needed; `None` if nothing happened within
    /// `timeout`, or if the connection is closed and every event was taken.
    pub(crate) async fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.stash.pop_front().or_else(|| self.conn.poll_event()) {
                return Some(event);
            }
            let now = Instant::now();
            while let Some(packet) = self.conn.poll_transmit(now) {
                packet
                    .encode(self.conn.version(), &mut self.wbuf)
                    .expect("encodable packet");
            }
            if self.conn.is_closed() {
                // A DISCONNECT may be waiting; the broker may be gone, so the result does not
                // matter.
                if !self.wbuf.is_empty() {
                    let _ = self.wr.write_all(&self.wbuf).await;
                    self.wbuf.clear();
                }
                let _ = self.wr.shutdown().await;
                return None;
            }
            let timer = self
                .conn
                .poll_timeout()
                .map(|t| tokio::time::Instant::now() + t.saturating_duration_since(now));
            let wake = timer.map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                biased;
                res = self.wr.write_buf(&mut self.wbuf), if !self.wbuf.is_empty() => {
                    if !matches!(res, Ok(n) if n > 0) {
                        self.conn.connection_lost(Instant::now());
                    }
                }
                res = self.rd.read_buf(&mut self.rbuf) => match res {
                    Ok(0) | Err(_) => self.conn.connection_lost(Instant::now()),
                    Ok(_) => loop {
                        match self.reader.read(&mut self.rbuf, Some(self.conn.version())) {
                            Ok(Some(packet)) => self.conn.handle_packet(Instant::now(), packet),
                            Ok(None) => break,
                            Err(e) => {
                                self.conn.handle_decode_error(Instant::now(), &e);
                                break;
                            }
                        }
                    },
                },
                () = tokio::time::sleep_until(wake) => {
                    if timer.is_some_and(|t| t <= tokio::time::Instant::now()) {
                        self.conn.handle_timeout(Instant::now());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return self.conn.poll_event();
                    }
                }
            }
        }
    }

    /// Whether the connection is over.
    pub(crate) fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// The session as it stands: the client's publications in flight and queued.
    pub(crate) fn session(&self) -> &Session {
        self.conn.session().expect("the session was not taken")
    }

    /// Sends DISCONNECT (normal: the will is discarded, the session kept) and closes the
    /// connection; returns the events not yet taken.
    pub(crate) async fn disconnect(&mut self) -> Vec<Event> {
        self.conn
            .disconnect(Instant::now(), ReasonCode::Success, None);
        let mut events = Vec::new();
        while let Some(event) = self.next_event(Duration::ZERO).await {
            events.push(event);
        }
        events
    }

    /// The session to resume, once the connection is closed (lost, or [`Self::disconnect`]).
    pub(crate) fn into_session(mut self) -> Session {
        assert!(self.conn.is_closed(), "the connection is still open");
        self.conn
            .take_session()
            .expect("the session of a closed connection")
    }
}

/// The broker binary the tests start: this build's, or the one `MQTTD_TEST_BINARY` names (CI
/// runs the cases whose bounds are set for a release broker against its release build).
pub(crate) fn broker_binary() -> std::ffi::OsString {
    std::env::var_os("MQTTD_TEST_BINARY").unwrap_or_else(|| env!("CARGO_BIN_EXE_mqttd").into())
}
