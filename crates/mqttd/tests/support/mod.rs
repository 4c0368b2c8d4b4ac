//! What the integration tests share: the real `mqttd` binary run as a child process, and a raw
//! MQTT connection for the bytes and behaviours no well-behaved client produces.
//!
//! [`Broker::start`] runs the binary on ephemeral ports (one MQTT listener, one HTTP listener for
//! `/metrics`) with a configuration file and data directory in a temporary directory, and
//! parses the bound ports from the lines it prints. It reads the process's resident memory from
//! `/proc` and scrapes its metrics. Stopping it (explicitly with [`Broker::stop`], or on drop)
//! sends SIGTERM and asserts that the broker exits with status 0 within
//! [`SHUTDOWN_TIMEOUT`]: graceful shutdown is a feature, and every test checks it.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use mqttd_proto::codec::{DecodeError, PacketReader};
use mqttd_proto::{
    ClientId, Connect, ConnectProperties, Packet, PacketId, ProtocolVersion, QoS,
    SubscribeProperties, Subscription, SubscriptionOptions, TopicFilter,
};

/// How long the broker may take to exit after SIGTERM.
pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker may take to print its listening lines.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `mqttd` process.
pub(crate) struct Broker {
    child: Option<Child>,
    pid: u32,
    /// The MQTT over TCP listener.
    pub(crate) mqtt: SocketAddr,
    /// The HTTP listener (`/metrics`, `/health`).
    pub(crate) http: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Starts `mqttd` with `config` (TOML) as its configuration file, anonymous access, and
    /// listeners on ephemeral loopback ports. Logs go to a file, shown when a test fails;
    /// `MQTTD_TEST_LOG` sets their filter (default `warn`).
    pub(crate) fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let config_path = dir.path().join("mqttd.toml");
        std::fs::write(&config_path, config).expect("write the configuration");
        let log = dir.path().join("mqttd.log");
        let filter = std::env::var("MQTTD_TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
        let mut child = Command::new(env!("CARGO_BIN_EXE_mqttd"))
            .args([
                "--listen",
                "tcp://127.0.0.1:0",
                "--listen",
                "http://127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config_path)
            .arg("--allow-anonymous")
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("create the log file"))
            .spawn()
            .expect("spawn mqttd");
        let pid = child.id();
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
        let mut broker = Self {
            child: Some(child),
            pid,
            mqtt: unspecified(),
            http: unspecified(),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while broker.mqtt.port() == 0 || broker.http.port() == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!(
                    "mqttd did not print its listeners in time\n{}",
                    broker.log_tail()
                );
            };
            let Some(url) = line.strip_prefix("mqttd listening on ") else {
                continue;
            };
            let (scheme, addr) = url.split_once("://").expect("URL with a scheme");
            let addr = addr.parse().expect("listening address");
            match scheme {
                "tcp" => broker.mqtt = addr,
                "http" => broker.http = addr,
                other => panic!("unexpected listener scheme {other}"),
            }
        }
        broker
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

    /// The end of the broker's log, for failure messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
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
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
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
// Raw MQTT
// ---------------------------------------------------------------------------------------------

/// Encodes one packet.
pub(crate) fn encode(version: ProtocolVersion, packet: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    packet.encode(version, &mut buf).expect("encodable packet");
    buf.to_vec()
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
        match conn.recv(Duration::from_secs(10)).await {
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
