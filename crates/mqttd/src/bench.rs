//! `mqttd bench`: load generation and measurement in the manner of emqtt-bench.
//!
//! Every publisher writes the time it sent a message into the first eight bytes of the payload
//! (nanoseconds since the bench started, on one monotonic clock shared by all its clients), so
//! subscribers in the same process measure end-to-end latency.
//!
//! Clients start clean and leave nothing behind unless told otherwise. `--session-expiry` and
//! `--clean-start false` give them persistent sessions, and `--client-id-prefix` fixed
//! identifiers, so that one run can leave sessions for another to fill or resume. Measuring a
//! broker's stored queues takes three runs:
//!
//! ```sh
//! # a persistent session, subscribed to bench/#, left offline
//! mqttd bench sub --client-id-prefix q --session-expiry 3600 --qos 1 --topic 'bench/#' \
//!     --duration 0
//! # 100,000 QoS 1 messages into it, every one acknowledged
//! mqttd bench pub --count 8 --messages 12500 --qos 1 --duration 600
//! # resume it and time until all of them have arrived (`expect_reached_secs`)
//! mqttd bench sub --client-id-prefix q --session-expiry 3600 --qos 1 --topic 'bench/#' \
//!     --duration 600 --expect 100000
//! ```
//!
//! `--sub-port` connects the subscribers to another port of `--host` (another node of a
//! cluster) and the publishers to `--port`, so that one run measures the latency of messages
//! forwarded between nodes.
//!
//! Clients connect over TCP by default, or over TLS, WebSocket, WebSocket over TLS or QUIC
//! with `--transport` or `-L URL` (`raw` and `--bind` are TCP only). QUIC clients share one
//! UDP socket and one session-ticket cache, so every connection after the first sends CONNECT
//! as 0-RTT data; `--quic-streams N` uses multi-stream mode.
//!
//! `raw` measures the broker rather than the clients: its publishers are plain TCP sockets that
//! write pre-encoded QoS 0 PUBLISH packets in 64 KiB writes as fast as TCP takes them, faster
//! than a broker can route them, and its subscribers read 64 KiB at a time and count the
//! packets from their fixed headers. With `--broker-pid`, every scenario also reports the
//! broker's CPU time over the measured window and the messages delivered per CPU-second:
//!
//! ```sh
//! mqttd bench raw --count 4 --subscribers 1 --duration 5 --broker-pid "$(pidof mqttd)"
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use mqttd_client::{connect_tcp, Client, Connector, Endpoint, Events, ServerUrl, Transport};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{
    ClientId, Connect, ConnectProperties, Disconnect, Message, Packet, PacketId, ProtocolVersion,
    Publish, PublishProperties, QoS, ReasonCode, Subscribe, SubscribeProperties, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};
use serde::Serialize;
use tokio::net::{lookup_host, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Scenario {
    /// Open `--count` connections at `--connect-rate` and hold them for `--duration`.
    Conn,
    /// `--count` publishers to `--topic` (no subscribers of its own).
    Pub,
    /// `--count` subscribers to `--topic`, counting what arrives.
    Sub,
    /// `--count` publishers, each to its own topic, one wildcard subscriber.
    Fanin,
    /// One publisher, `--count` subscribers to its topic.
    Fanout,
    /// `--count` publisher/subscriber pairs, each pair on its own topic.
    Pairs,
    /// `--count` raw publishers, each to its own topic, and `--subscribers` raw subscribers to
    /// the wildcard over them: plain TCP sockets writing pre-encoded QoS 0 PUBLISH packets in
    /// 64 KiB writes as fast as TCP takes them, and reading 64 KiB at a time. The clock starts
    /// once every client is connected.
    Raw,
}

/// Which clients `--session-expiry`, `--clean-start` and `--no-clean` apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SessionClients {
    /// Every client.
    All,
    /// Subscribers only: publishers and idle connections start clean and leave nothing.
    Sub,
    /// Publishers only.
    Pub,
}

/// The part a client plays; it names the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Pub,
    Sub,
    Conn,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Pub => "pub",
            Self::Sub => "sub",
            Self::Conn => "conn",
        }
    }
}

/// Unacknowledged QoS 1 and 2 messages each publisher allows itself.
const PUBLISH_WINDOW: u32 = 1000;

/// Options of `mqttd bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Scenario.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Broker host.
    #[arg(short = 'H', long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port [default: 1883; 8883 for tls, 8083 for ws, 8084 for wss, 14567 for quic].
    #[arg(short, long)]
    port: Option<u16>,
    /// Plain TCP: the subscribers connect to this port of `--host` instead, the publishers
    /// still to `--port`: another node of a cluster, so that one run measures the latency of
    /// messages forwarded between nodes.
    #[arg(long, value_name = "PORT", conflicts_with = "url")]
    sub_port: Option<u16>,
    /// Transport: tcp, tls, ws, wss or quic (WebSocket path /mqtt; -L for another).
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Broker URL (mqtt://, mqtts://, ws://, wss:// or quic://HOST:PORT/PATH; port and path
    /// optional; or p2p://NODE_ID, with --relay or --peer-addr), instead of --host, --port
    /// and --transport.
    #[arg(short = 'L', long = "url", value_name = "URL", conflicts_with_all = ["port", "transport"])]
    url: Option<String>,
    /// PEM file of the CA certificates that sign the broker's certificate (TLS transports;
    /// default: the system's CAs).
    #[arg(long, value_name = "FILE")]
    cafile: Option<std::path::PathBuf>,
    /// Do not check that the broker's certificate names the host (the chain is still
    /// verified).
    #[arg(long)]
    insecure: bool,
    /// QUIC and p2p: data streams besides the control stream (multi-stream mode); 0 carries
    /// everything on one stream.
    #[arg(long, value_name = "N", default_value_t = 0)]
    quic_streams: u16,
    /// p2p://: a relay (https://HOST:PORT) the broker's node is reached through; repeatable.
    /// Every client connects from one node.
    #[arg(long = "relay", value_name = "URL")]
    relays: Vec<String>,
    /// p2p://: PEM CA certificates the relays' certificates are checked against.
    #[arg(long, value_name = "FILE")]
    relay_cafile: Option<std::path::PathBuf>,
    /// p2p://: a UDP address the broker's node may be reached at directly; repeatable.
    #[arg(long = "peer-addr", value_name = "IP:PORT")]
    peer_addrs: Vec<SocketAddr>,
    /// p2p://: the clients' node key file, created if missing [default: a new key].
    #[arg(long, value_name = "FILE")]
    key_file: Option<std::path::PathBuf>,
    /// QUIC: UDP sockets to spread the clients over (default: one per 64 clients, at most
    /// 256), so that a burst of handshakes does not overflow one socket's receive buffer.
    #[arg(long, value_name = "N")]
    quic_sockets: Option<u16>,
    /// Number of clients (publishers, subscribers, pairs or connections, by scenario).
    #[arg(short, long, default_value_t = 1)]
    count: usize,
    /// Messages per second per publisher; 0 for as fast as possible.
    #[arg(short = 'r', long, default_value_t = 0.0)]
    rate: f64,
    /// Messages per second across all publishers (overrides --rate).
    #[arg(long)]
    total_rate: Option<f64>,
    /// QoS of publications and subscriptions.
    #[arg(short, long, default_value_t = 0)]
    qos: u8,
    /// Payload size in bytes (at least 8, for the timestamp).
    #[arg(short, long, default_value_t = 64)]
    size: usize,
    /// Topic; `%i` is replaced by the client's index.
    #[arg(short, long, default_value = "bench/%i")]
    topic: String,
    /// MQTT version: 5, 311 or 31.
    #[arg(short = 'V', long, default_value = "5")]
    protocol: String,
    /// Seconds to measure. With `--messages`, the longest publishers keep on; with `--expect`,
    /// the longest subscribers wait. `sub` with 0 connects, subscribes and leaves at once.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// Messages per publisher: each stops after this many (or at `--duration`), and the rates
    /// are computed over the time it took.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    messages: Option<u64>,
    /// Stop as soon as the subscribers have received N messages in all (at the latest after
    /// `--duration`, or after the drain when there are publishers). The summary gives the time
    /// from the first connection attempt to the N-th message (`expect_reached_secs`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    expect: Option<u64>,
    /// New connections per second while setting up; 0 for no limit.
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Connections being set up (handshake to CONNACK) at once, at most; 0 for no limit. Like
    /// a server's listen backlog for TCP, it keeps a burst from outrunning what the broker
    /// takes, so that `conn` measures how many connections per second it sets up.
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_handshakes: usize,
    /// Seconds to wait after the publishers stop, for messages in flight. QoS 1 and 2
    /// publishers leave as soon as everything they sent is acknowledged.
    #[arg(long, default_value_t = 1.0)]
    drain: f64,
    /// Fixed client identifiers PREFIX-ROLE-INDEX (ROLE: pub, sub or conn), the same in every
    /// run, so that a later run resumes the sessions of an earlier one. Without it they are
    /// bench-ROLE-INDEX-PID, new in every run.
    #[arg(long, value_name = "PREFIX")]
    client_id_prefix: Option<String>,
    /// Session expiry interval in seconds (MQTT 5; with 3.1.x the broker's setting decides).
    /// With it, clients resume their session (clean start false) unless `--clean-start true`
    /// is given.
    #[arg(short = 'x', long, value_name = "SECS", default_value_t = 0)]
    session_expiry: u32,
    /// Clean start (MQTT 5) or clean session (3.1.x) flag. Default: true, or false with
    /// `--session-expiry`. `--clean-start true --session-expiry S` starts a new persistent
    /// session, discarding a stored one.
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    clean_start: Option<bool>,
    /// Same as `--clean-start false` (as in `mqttd sub`): with MQTT 3.1.x, what makes a
    /// session persistent.
    #[arg(long, conflicts_with = "clean_start")]
    no_clean: bool,
    /// Which clients the session options apply to; the others start clean, with no expiry.
    #[arg(long, value_enum, default_value = "all")]
    session_clients: SessionClients,
    /// Fail at once when a client that asks to resume its session (clean start false) finds
    /// that the broker has none: then there is no stored queue to wait for.
    #[arg(long)]
    require_session: bool,
    /// Local addresses to connect from, comma-separated (spread many connections over several
    /// 127.0.0.x addresses).
    #[arg(long, value_delimiter = ',')]
    bind: Vec<std::net::IpAddr>,
    /// `conn`: subscriptions each connection makes and holds, to `--topic` followed by
    /// `/N` (N from 0), at `--qos`, up to 100 filters per SUBSCRIBE: what the broker holds per
    /// subscription.
    #[arg(long, value_name = "N", default_value_t = 0)]
    subs_per_client: usize,
    /// Raw subscribers (`raw` only; 0 for none).
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// The broker's process id (on the same machine): report its CPU time over the measured
    /// window and the messages delivered per broker CPU-second.
    #[arg(long, value_name = "PID")]
    broker_pid: Option<u32>,
    /// QoS 0 fan-in and fan-out over plain TCP: use the full client (mqttd-client's state
    /// machine, one command and one event per message) instead of the lean path, whose
    /// publishers write pre-encoded PUBLISH packets in batches and whose subscribers parse
    /// them in place, so that the generator costs less than the broker it measures.
    #[arg(long)]
    full_client: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// No live progress.
    #[arg(long)]
    quiet: bool,
}

/// Counters shared by every client task.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    connected: AtomicU64,
    /// When the first connection attempt started.
    first_connect: OnceLock<Instant>,
    /// When the last CONNACK arrived, in nanoseconds since `epoch()`.
    last_connack: AtomicU64,
    /// Connections whose CONNACK said the broker had a session for them.
    session_present: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    /// A connection attempt starts (the TCP connect, before any TLS or WebSocket handshake).
    fn connect_started(&self) {
        let _ = self.first_connect.set(Instant::now());
    }

    /// A connection's CONNACK arrived.
    fn connack_received(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        self.last_connack
            .fetch_max(epoch().elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Connections per second over the setup: from the first connection attempt to the last
    /// CONNACK.
    fn connect_per_sec(&self) -> f64 {
        let Some(&first) = self.first_connect.get() else {
            return 0.0;
        };
        let last = epoch() + Duration::from_nanos(self.last_connack.load(Ordering::Relaxed));
        connect_rate(
            self.connected.load(Ordering::Relaxed),
            last.saturating_duration_since(first),
        )
    }
}

/// `connected` connections set up in `setup`, per second; 0 when nothing was measured.
fn connect_rate(connected: u64, setup: Duration) -> f64 {
    if setup.is_zero() {
        return 0.0;
    }
    connected as f64 / setup.as_secs_f64()
}

/// The final summary.
#[derive(Debug, Serialize)]
struct Summary {
    scenario: Scenario,
    clients: usize,
    qos: u8,
    payload_bytes: usize,
    duration_secs: f64,
    connected: u64,
    connect_per_sec: f64,
    sent: u64,
    sent_per_sec: f64,
    acked: u64,
    received: u64,
    received_per_sec: f64,
    latency_ms: Option<Latency>,
    errors: u64,
    /// Connections that resumed a session the broker had kept.
    session_present: u64,
    /// Seconds from the first connection attempt to the `--expect`-th message received; null
    /// when it was not reached or not asked for.
    expect_reached_secs: Option<f64>,
    /// Raw subscribers (`raw` only).
    subscribers: Option<usize>,
    /// Messages the broker took from the publishers but did not deliver to a subscriber by
    /// the end of the drain: `sent` times `subscribers`, less `received` (`raw` only).
    dropped: Option<u64>,
    /// The broker's CPU time over the measured window (with `--broker-pid`).
    broker_cpu_secs: Option<f64>,
    /// Messages received during the measured window per broker CPU-second.
    received_per_broker_cpu_sec: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    samples: u64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn stamp(payload: &mut BytesMut, size: usize) {
    payload.put_u64(epoch().elapsed().as_nanos() as u64);
    payload.resize(size.max(8), b'x');
}

fn sent_at(payload: &[u8]) -> Option<Duration> {
    let bytes: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(Duration::from_nanos(u64::from_be_bytes(bytes)))
}

struct Bench {
    args: BenchArgs,
    addr: SocketAddr,
    /// Where subscribers connect (`--sub-port`; else `addr`).
    sub_addr: SocketAddr,
    /// TLS and WebSocket transports; `None` for plain TCP (to `addr`).
    connector: Option<Connector>,
    version: ProtocolVersion,
    qos: QoS,
    counters: Counters,
    latency: Mutex<Histogram<u64>>,
    connect_gate: Option<Arc<Semaphore>>,
    /// At most `--max-handshakes` connections being set up.
    handshakes: Option<Semaphore>,
    /// Clean start for the clients the session options apply to.
    clean_start: bool,
    /// When the last publisher sent its last message, in nanoseconds since [`epoch`].
    publishing_ended: AtomicU64,
    /// When the `--expect`-th message arrived.
    expect_reached: OnceLock<Instant>,
    /// Cancelled when the `--expect`-th message arrives.
    expect_done: CancellationToken,
}

impl Bench {
    /// The plain TCP address a client playing `role` connects to.
    fn addr_of(&self, role: Role) -> SocketAddr {
        if role == Role::Sub {
            self.sub_addr
        } else {
            self.addr
        }
    }

    fn topic(&self, index: usize) -> String {
        self.args.topic.replace("%i", &index.to_string())
    }

    fn per_publisher_rate(&self, publishers: usize) -> f64 {
        match self.args.total_rate {
            Some(total) => total / publishers.max(1) as f64,
            None => self.args.rate,
        }
    }

    fn client_id(&self, role: Role, index: usize) -> String {
        match &self.args.client_id_prefix {
            Some(prefix) => format!("{prefix}-{}-{index}", role.name()),
            None => format!("bench-{}-{index}-{}", role.name(), std::process::id()),
        }
    }

    /// Clean start and session expiry interval for a client playing `role`.
    fn session_options(&self, role: Role) -> (bool, u32) {
        let applies = match self.args.session_clients {
            SessionClients::All => true,
            SessionClients::Sub => role == Role::Sub,
            SessionClients::Pub => role == Role::Pub,
        };
        if applies {
            (self.clean_start, self.args.session_expiry)
        } else {
            (true, 0)
        }
    }

    /// Connects; the flag says whether the broker had a session for this client.
    async fn connect(&self, role: Role, index: usize) -> anyhow::Result<(Client, Events, bool)> {
        if let Some(gate) = &self.connect_gate {
            gate.acquire().await?.forget();
        }
        let handshake = match &self.handshakes {
            Some(limit) => Some(limit.acquire().await?),
            None => None,
        };
        self.counters.connect_started();
        let name = self.client_id(role, index);
        let mut config = ClientConfig::new(ClientId::try_from(name.as_str())?);
        config.version = self.version;
        config.keep_alive = 300;
        config.queue_limits.max_messages = 100_000;
        (config.clean_start, config.session_expiry_interval) = self.session_options(role);
        let resuming = !config.clean_start;
        let bind = self.args.bind.get(index % self.args.bind.len().max(1));
        let (client, events, ack) = match (&self.connector, bind) {
            (Some(connector), _) => mqttd_client::connect_to(connector, config, None).await?,
            (None, Some(ip)) => {
                let socket = match ip {
                    std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(*ip, 0))?;
                let stream = socket.connect(self.addr_of(role)).await?;
                stream.set_nodelay(true)?;
                mqttd_client::connect(stream, config, None).await?
            }
            (None, None) => connect_tcp(self.addr_of(role), config, None).await?,
        };
        self.counters.connack_received();
        drop(handshake);
        if self.args.require_session && resuming && !ack.session_present {
            bail!("the broker has no session for {name}");
        }
        if ack.session_present {
            self.counters
                .session_present
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok((client, events, ack.session_present))
    }

    /// Publishes until `until`, at `rate` per second (0: as fast as the connection takes them).
    async fn publisher(
        self: Arc<Self>,
        index: usize,
        rate: f64,
        until: Instant,
    ) -> anyhow::Result<()> {
        if rate == 0.0 && self.lean(Role::Pub) {
            return self.lean_publisher(index, until).await;
        }
        let (client, mut events, _) = self.connect(Role::Pub, index).await?;
        let topic = TopicName::try_from(self.topic(index))?;
        let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
        let mut next = Instant::now();
        let window = Arc::new(Semaphore::new(if self.qos == QoS::AtMostOnce {
            0
        } else {
            PUBLISH_WINDOW as usize
        }));
        let acker = {
            let bench = self.clone();
            let window = window.clone();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    match event {
                        Event::Delivered { reason, .. } => {
                            if reason.is_error() {
                                bench.counters.errors.fetch_add(1, Ordering::Relaxed);
                            }
                            bench.counters.acked.fetch_add(1, Ordering::Relaxed);
                            window.add_permits(1);
                        }
                        Event::Closed { .. } => break,
                        _ => {}
                    }
                }
            })
        };
        let mut payload = BytesMut::with_capacity(self.args.size.max(8));
        let limit = self.args.messages.unwrap_or(u64::MAX);
        let mut sent = 0;
        while sent < limit && Instant::now() < until {
            if let Some(interval) = interval {
                next += interval;
                let now = Instant::now();
                if next > now {
                    tokio::time::sleep(next - now).await;
                } else if now - next > Duration::from_secs(1) {
                    // Far behind: do not burst to catch up.
                    next = now;
                }
            }
            if self.qos != QoS::AtMostOnce {
                window.acquire().await?.forget();
            }
            stamp(&mut payload, self.args.size);
            let message = Message::new(topic.clone(), payload.split().freeze(), self.qos, false);
            client.publish_nowait(Arc::new(message)).await?;
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
            sent += 1;
        }
        self.publishing_ended
            .fetch_max(epoch().elapsed().as_nanos() as u64, Ordering::Relaxed);
        let drain = Duration::from_secs_f64(self.args.drain);
        if self.qos == QoS::AtMostOnce {
            // Nothing to wait for but the subscribers, which may already have it all.
            tokio::select! {
                _ = tokio::time::sleep(drain) => {}
                _ = self.expect_done.cancelled() => {}
            }
        } else {
            // Every permit back: everything sent is acknowledged.
            let _ = tokio::time::timeout(drain, window.acquire_many(PUBLISH_WINDOW)).await;
        }
        let _ = client.disconnect(ReasonCode::Success, None).await;
        acker.abort();
        Ok(())
    }

    async fn subscriber(
        self: Arc<Self>,
        index: usize,
        filter: String,
        ready: Arc<Semaphore>,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        if self.lean(Role::Sub) {
            return self.lean_subscriber(index, filter, ready, stop).await;
        }
        let (client, mut events, resumed) = self.connect(Role::Sub, index).await?;
        // A resumed session still holds its subscription, and the broker starts sending what it
        // kept for it right after CONNACK: subscribing again would only hide a lost one.
        if !resumed {
            let ack = client
                .subscribe_one(TopicFilter::try_from(filter)?, self.qos)
                .await?;
            if ack.reasons.iter().any(|r| r.is_error()) {
                bail!("subscription refused: {:?}", ack.reasons);
            }
        }
        ready.add_permits(1);
        let mut local = Histogram::<u64>::new(3)?;
        // Only this process's publishers stamp payloads on this process's clock: in `sub`, the
        // messages come from elsewhere (another run, or a stored queue) and carry no latency.
        let timed = self.args.scenario != Scenario::Sub;
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                _ = stop.cancelled() => break,
            };
            match event {
                Some(Event::Publish(p)) => {
                    let received = self.counters.received.fetch_add(1, Ordering::Relaxed) + 1;
                    if self.args.expect == Some(received) {
                        let _ = self.expect_reached.set(Instant::now());
                        self.expect_done.cancel();
                    }
                    if let Some(sent) = sent_at(&p.message.payload).filter(|_| timed) {
                        let latency = epoch().elapsed().saturating_sub(sent);
                        let _ = local.record(latency.as_micros().max(1) as u64);
                    }
                }
                Some(Event::Closed { .. }) | None => break,
                Some(_) => {}
            }
        }
        if let Ok(mut h) = self.latency.lock() {
            let _ = h.add(&local);
        }
        let _ = client.disconnect(ReasonCode::Success, None).await;
        Ok(())
    }

    async fn holder(self: Arc<Self>, index: usize, until: Instant) -> anyhow::Result<()> {
        let (client, _events, _) = self.connect(Role::Conn, index).await?;
        self.hold_subscriptions(&client, index).await?;
        tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
        let _ = client.disconnect(ReasonCode::Success, None).await;
        Ok(())
    }
}

impl Bench {
    /// Makes `--subs-per-client` subscriptions for the `conn` client `index`.
    async fn hold_subscriptions(&self, client: &Client, index: usize) -> anyhow::Result<()> {
        /// Filters per SUBSCRIBE: well under any packet size limit.
        const BATCH: usize = 100;
        let topic = self.topic(index);
        let options = SubscriptionOptions {
            qos: self.qos,
            ..SubscriptionOptions::default()
        };
        let mut next = 0;
        while next < self.args.subs_per_client {
            let end = (next + BATCH).min(self.args.subs_per_client);
            let filters = (next..end)
                .map(|n| {
                    Ok(Subscription {
                        filter: TopicFilter::try_from(format!("{topic}/{n}"))?,
                        options,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let ack = client
                .subscribe(filters, SubscribeProperties::default())
                .await?;
            if ack.reasons.iter().any(|r| r.is_error()) {
                bail!("subscription refused: {:?}", ack.reasons);
            }
            next = end;
        }
        Ok(())
    }
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut endpoint = match &args.url {
        Some(url) => url.parse::<ServerUrl>()?.endpoint,
        None => {
            let transport = match args.transport.as_str() {
                "tcp" | "mqtt" => Transport::Tcp,
                "tls" | "mqtts" => Transport::Tls,
                "ws" => Transport::Ws,
                "wss" => Transport::Wss,
                "quic" => Transport::Quic,
                other => bail!("unknown transport {other:?} (tcp, tls, ws, wss or quic)"),
            };
            let port = args.port.unwrap_or(transport.default_port());
            Endpoint::new(transport, args.host.clone(), port)
        }
    };
    endpoint.tls.ca_file.clone_from(&args.cafile);
    endpoint.tls.insecure = args.insecure;
    if args.quic_streams > 0 && !endpoint.transport.is_quic() {
        bail!("--quic-streams needs the quic transport or a p2p:// URL");
    }
    endpoint.quic.data_streams = args.quic_streams;
    let p2p = !args.relays.is_empty()
        || args.relay_cafile.is_some()
        || !args.peer_addrs.is_empty()
        || args.key_file.is_some();
    if p2p && endpoint.transport != Transport::P2p {
        bail!("--relay, --relay-cafile, --peer-addr and --key-file need a p2p:// URL");
    }
    endpoint.p2p.relays.clone_from(&args.relays);
    endpoint.p2p.relay_cafile.clone_from(&args.relay_cafile);
    endpoint.p2p.direct.clone_from(&args.peer_addrs);
    endpoint.p2p.key_file.clone_from(&args.key_file);
    endpoint.quic.sockets = args
        .quic_sockets
        .unwrap_or_else(|| u16::try_from(args.count.div_ceil(64).clamp(1, 256)).unwrap_or(256));
    let connector = match endpoint.transport {
        Transport::Tcp => None,
        _ if args.scenario == Scenario::Raw => bail!("raw runs over plain TCP only"),
        _ if !args.bind.is_empty() => bail!("--bind works with plain TCP only"),
        _ => Some(Connector::new(endpoint.clone())?),
    };
    let addr = match endpoint.transport {
        // A node id is no host name; `addr` serves plain TCP only.
        Transport::P2p => SocketAddr::from(([0, 0, 0, 0], 0)),
        _ => lookup_host((endpoint.host.as_str(), endpoint.port))
            .await?
            .next()
            .with_context(|| format!("cannot resolve {}", endpoint.host))?,
    };
    let sub_addr = match args.sub_port {
        Some(_) if connector.is_some() => bail!("--sub-port works with plain TCP only"),
        Some(port) => SocketAddr::new(addr.ip(), port),
        None => addr,
    };
    let version = match args.protocol.as_str() {
        "5" => ProtocolVersion::V5,
        "311" => ProtocolVersion::V3_1_1,
        "31" => ProtocolVersion::V3_1,
        other => bail!("unknown protocol version {other:?}"),
    };
    let qos = QoS::from_bits(args.qos).context("QoS must be 0, 1 or 2")?;
    let has_publishers = matches!(
        args.scenario,
        Scenario::Pub | Scenario::Fanin | Scenario::Fanout | Scenario::Pairs | Scenario::Raw
    );
    let has_subscribers = match args.scenario {
        Scenario::Sub | Scenario::Fanin | Scenario::Fanout | Scenario::Pairs => true,
        Scenario::Raw => args.subscribers > 0,
        Scenario::Conn | Scenario::Pub => false,
    };
    if args.scenario == Scenario::Raw && qos != QoS::AtMostOnce {
        bail!("raw publishes QoS 0 only");
    }
    if args.messages.is_some() && !has_publishers {
        bail!("--messages needs a scenario with publishers");
    }
    if args.subs_per_client > 0 && args.scenario != Scenario::Conn {
        bail!("--subs-per-client needs the conn scenario");
    }
    if args.expect.is_some() && !has_subscribers {
        bail!("--expect needs a scenario with subscribers");
    }
    let clean_start = args
        .clean_start
        .unwrap_or(!args.no_clean && args.session_expiry == 0);
    let connect_gate = (args.connect_rate > 0.0).then(|| Arc::new(Semaphore::new(1)));
    if let Some(gate) = &connect_gate {
        let gate = gate.clone();
        let period = Duration::from_secs_f64(1.0 / args.connect_rate);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if gate.available_permits() < 1 {
                    gate.add_permits(1);
                }
            }
        });
    }
    let _ = epoch();
    let bench = Arc::new(Bench {
        addr,
        sub_addr,
        connector,
        version,
        qos,
        counters: Counters::default(),
        latency: Mutex::new(Histogram::new(3)?),
        connect_gate,
        handshakes: (args.max_handshakes > 0).then(|| Semaphore::new(args.max_handshakes)),
        clean_start,
        publishing_ended: AtomicU64::new(0),
        expect_reached: OnceLock::new(),
        expect_done: CancellationToken::new(),
        args,
    });
    if bench.args.scenario == Scenario::Raw {
        return run_raw(bench).await;
    }
    let count = bench.args.count.max(1);
    let measure = Duration::from_secs_f64(bench.args.duration);
    let setup_started = Instant::now();

    // Subscribers first, so that nothing published is missed.
    let subscribers: Vec<(usize, String)> = match bench.args.scenario {
        Scenario::Sub => (0..count).map(|i| (i, bench.topic(i))).collect(),
        Scenario::Fanin => vec![(0, wildcard(&bench.topic(0)))],
        Scenario::Fanout => (0..count).map(|i| (i, bench.topic(0))).collect(),
        Scenario::Pairs => (0..count).map(|i| (i, bench.topic(i))).collect(),
        Scenario::Conn | Scenario::Pub | Scenario::Raw => Vec::new(),
    };
    let publishers: Vec<usize> = match bench.args.scenario {
        Scenario::Pub | Scenario::Fanin | Scenario::Pairs => (0..count).collect(),
        Scenario::Fanout => vec![0],
        Scenario::Conn | Scenario::Sub | Scenario::Raw => Vec::new(),
    };
    let ready = Arc::new(Semaphore::new(0));
    let progress = progress_bar(&bench);
    let mut tasks = tokio::task::JoinSet::new();
    // Subscribers stop when the publishers have stopped and the drain has passed.
    let stop = CancellationToken::new();
    // Cancelled when a subscriber fails: without it the run cannot start.
    let failed = CancellationToken::new();
    let mut sub_handles = Vec::new();
    for (i, filter) in subscribers.clone() {
        let b = bench.clone();
        let r = ready.clone();
        let stop = stop.clone();
        let failed = failed.clone();
        sub_handles.push(tokio::spawn(async move {
            let result = b.subscriber(i, filter, r, stop).await;
            if result.is_err() {
                failed.cancel();
            }
            result
        }));
    }
    if !subscribers.is_empty() {
        let wait = ready.acquire_many(subscribers.len() as u32);
        let permits = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(60), wait) => r.ok().and_then(Result::ok),
            _ = failed.cancelled() => None,
        };
        match permits {
            Some(p) => p.forget(),
            None => {
                stop.cancel();
                for handle in sub_handles {
                    if let Ok(Err(error)) = handle.await {
                        return Err(error);
                    }
                }
                bail!("subscribers did not connect within 60 s");
            }
        }
    }
    let pid = bench.args.broker_pid;
    let cpu_before = pid.map(process_cpu_secs).transpose()?;
    let start = Instant::now();
    let until = start + measure;
    let rate = bench.per_publisher_rate(publishers.len());
    for i in publishers.iter().copied() {
        let b = bench.clone();
        tasks.spawn(async move { b.publisher(i, rate, until).await });
    }
    if bench.args.scenario == Scenario::Conn {
        for i in 0..count {
            let b = bench.clone();
            tasks.spawn(async move { b.holder(i, until).await });
        }
    }
    let ticker = {
        let bench = bench.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let c = &bench.counters;
                progress.set_message(format!(
                    "conn {} sent {} recv {} err {}",
                    c.connected.load(Ordering::Relaxed),
                    c.sent.load(Ordering::Relaxed),
                    c.received.load(Ordering::Relaxed),
                    c.errors.load(Ordering::Relaxed)
                ));
                progress.set_position(start.elapsed().as_secs().min(measure.as_secs()));
            }
        })
    };
    while let Some(result) = tasks.join_next().await {
        if let Ok(Err(error)) = result {
            bench.counters.errors.fetch_add(1, Ordering::Relaxed);
            progress.println(format!("client error: {error:#}"));
        }
    }
    let cpu = match (pid, cpu_before) {
        (Some(pid), Some(before)) => Some(process_cpu_secs(pid)? - before),
        _ => None,
    };
    // Publishers stop at `until` (or after `--messages`); what follows is the drain, which is
    // not part of the window the rates are computed over.
    let mut measured_until = until;
    let mut window_start = start;
    if !publishers.is_empty() {
        let ended = bench.publishing_ended.load(Ordering::Relaxed);
        if ended > 0 {
            measured_until = until.min(epoch() + Duration::from_nanos(ended));
        }
    }
    if !subscribers.is_empty() {
        let wait = if publishers.is_empty() {
            tokio::time::sleep_until(tokio::time::Instant::from_std(until))
        } else {
            tokio::time::sleep(Duration::from_secs_f64(bench.args.drain))
        };
        tokio::select! {
            _ = wait => {}
            _ = bench.expect_done.cancelled() => {}
        }
    }
    let reached = bench.expect_reached.get().copied();
    if let Some(reached) = reached.filter(|_| publishers.is_empty()) {
        // Subscribers only, receiving what the broker kept for them: that flows from CONNACK
        // on, so the window starts with the first connection attempt.
        window_start = setup_started;
        measured_until = until.min(reached);
    }
    stop.cancel();
    for handle in sub_handles {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                bench.counters.errors.fetch_add(1, Ordering::Relaxed);
                progress.println(format!("subscriber error: {error:#}"));
            }
            Err(_) => {}
        }
    }
    ticker.abort();
    progress.finish_and_clear();
    let elapsed = measured_until
        .saturating_duration_since(window_start)
        .as_secs_f64()
        .max(1e-9);
    let c = &bench.counters;
    let (sent, received) = (
        c.sent.load(Ordering::Relaxed),
        c.received.load(Ordering::Relaxed),
    );
    let latency = bench
        .latency
        .lock()
        .ok()
        .filter(|h| !h.is_empty())
        .map(|h| Latency {
            p50: h.value_at_quantile(0.50) as f64 / 1000.0,
            p90: h.value_at_quantile(0.90) as f64 / 1000.0,
            p99: h.value_at_quantile(0.99) as f64 / 1000.0,
            max: h.max() as f64 / 1000.0,
            samples: h.len(),
        });
    let connected = c.connected.load(Ordering::Relaxed);
    let summary = Summary {
        scenario: bench.args.scenario,
        clients: count,
        qos: bench.args.qos,
        payload_bytes: bench.args.size.max(8),
        duration_secs: elapsed,
        connected,
        connect_per_sec: c.connect_per_sec(),
        sent,
        sent_per_sec: sent as f64 / elapsed,
        acked: c.acked.load(Ordering::Relaxed),
        received,
        received_per_sec: received as f64 / elapsed,
        latency_ms: latency,
        errors: c.errors.load(Ordering::Relaxed),
        session_present: c.session_present.load(Ordering::Relaxed),
        expect_reached_secs: reached.map(|t| t.duration_since(setup_started).as_secs_f64()),
        subscribers: None,
        dropped: None,
        broker_cpu_secs: cpu,
        received_per_broker_cpu_sec: cpu
            .filter(|&secs| secs > 0.0)
            .map(|secs| received as f64 / secs),
    };
    report(&bench, &summary)
}

fn progress_bar(bench: &Bench) -> ProgressBar {
    if bench.args.quiet || bench.args.json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(bench.args.duration.ceil() as u64);
    let style =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Prints the summary as JSON or as text, as asked.
fn report(bench: &Bench, summary: &Summary) -> anyhow::Result<()> {
    if bench.args.json {
        println!("{}", serde_json::to_string_pretty(summary)?);
    } else {
        print_summary(summary);
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    println!(
        "scenario      {:?}, {} clients, QoS {}, {} B payload",
        s.scenario, s.clients, s.qos, s.payload_bytes
    );
    println!("duration      {:.2} s", s.duration_secs);
    println!("connected     {} ({:.0}/s)", s.connected, s.connect_per_sec);
    if s.session_present > 0 {
        println!("resumed       {} sessions", s.session_present);
    }
    println!(
        "sent          {} ({:.0} msg/s), acknowledged {}",
        s.sent, s.sent_per_sec, s.acked
    );
    println!(
        "received      {} ({:.0} msg/s)",
        s.received, s.received_per_sec
    );
    if let Some(l) = &s.latency_ms {
        println!(
            "latency ms    p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  ({} samples)",
            l.p50, l.p90, l.p99, l.max, l.samples
        );
    }
    if let Some(secs) = s.expect_reached_secs {
        println!("all expected  after {secs:.3} s");
    }
    if let (Some(subscribers), Some(dropped)) = (s.subscribers, s.dropped) {
        println!("subscribers   {subscribers}, dropped {dropped}");
    }
    if let Some(cpu) = s.broker_cpu_secs {
        println!(
            "broker CPU    {cpu:.2} s ({:.0} msg received per CPU-second)",
            s.received_per_broker_cpu_sec.unwrap_or(0.0)
        );
    }
    println!("errors        {}", s.errors);
}

/// The payload stamp survives the trip through the broker.
#[cfg(test)]
mod tests {
    use super::*;

    /// The handshake rate is the connections over the real setup time, however short.
    #[test]
    fn connect_rate_is_over_the_real_setup_time() {
        assert_eq!(connect_rate(5_000, Duration::from_millis(250)), 20_000.0);
        assert_eq!(connect_rate(5_000, Duration::from_secs(2)), 2_500.0);
        assert_eq!(connect_rate(1, Duration::from_micros(500)), 2_000.0);
        assert_eq!(connect_rate(0, Duration::from_secs(1)), 0.0);
        assert_eq!(connect_rate(10, Duration::ZERO), 0.0);

        let counters = Counters::default();
        assert_eq!(counters.connect_per_sec(), 0.0, "nothing connected yet");
        counters.connect_started();
        std::thread::sleep(Duration::from_millis(20));
        for _ in 0..100 {
            counters.connack_received();
        }
        let started = *counters.first_connect.get().unwrap();
        let setup = started.elapsed();
        let rate = counters.connect_per_sec();
        // Over at least the 20 ms slept (less the nanosecond rounding) and at most what has
        // passed since.
        assert!(rate <= 100.0 / 0.019, "{rate}");
        assert!(rate >= 100.0 / setup.as_secs_f64(), "{rate}");
    }

    #[test]
    fn stamp_round_trips() {
        let mut buf = BytesMut::new();
        stamp(&mut buf, 64);
        assert_eq!(buf.len(), 64);
        let t = sent_at(&buf).unwrap();
        assert!(t <= epoch().elapsed());
        assert_eq!(sent_at(b"short"), None);
    }

    /// Raw subscribers count PUBLISH packets from their fixed headers, however the stream is
    /// cut into reads.
    #[test]
    fn publish_counter_counts_across_any_split() {
        let v5 = ProtocolVersion::V5;
        let publish = |payload_len: usize| {
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: TopicName::try_from("bench/1").unwrap(),
                packet_id: None,
                properties: PublishProperties::default(),
                payload: vec![0x30; payload_len].into(),
            })
        };
        let mut stream = BytesMut::new();
        // A small one, one with a two-byte remaining length, one with a three-byte one, and
        // a packet of another type between them.
        for packet in [
            publish(0),
            publish(200),
            Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
            publish(20_000),
            publish(64),
        ] {
            stream.extend_from_slice(&encode(&packet, v5).unwrap());
        }
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            let mut counter = PublishCounter::default();
            let n = counter.feed(a).unwrap() + counter.feed(b).unwrap();
            assert_eq!(n, 4, "split at {split}");
        }
        let mut counter = PublishCounter::default();
        let n: u64 = stream.iter().map(|b| counter.feed(&[*b]).unwrap()).sum();
        assert_eq!(n, 4, "byte by byte");
        assert!(PublishCounter::default()
            .feed(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01])
            .is_err());
    }

    /// Lean subscribers find every PUBLISH's payload, in both versions and at every QoS,
    /// whatever part of the stream has arrived, and take only whole packets.
    #[test]
    fn scan_publishes_finds_every_payload_across_any_split() {
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let publish = |qos: QoS, payload: Vec<u8>| {
                let mut properties = PublishProperties::default();
                if version == ProtocolVersion::V5 {
                    properties.message_expiry_interval = Some(60);
                }
                Packet::Publish(Publish {
                    dup: false,
                    qos,
                    retain: false,
                    topic: TopicName::try_from("bench/1").unwrap(),
                    packet_id: (qos != QoS::AtMostOnce).then_some(PacketId::MIN),
                    properties,
                    payload: payload.into(),
                })
            };
            let mut stream = BytesMut::new();
            let payloads = [vec![1; 64], vec![2; 300], vec![3; 20_000], vec![]];
            for (i, payload) in payloads.iter().enumerate() {
                let qos = if i % 2 == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                stream.extend_from_slice(&encode(&publish(qos, payload.clone()), version).unwrap());
                let ping = Packet::PingResp;
                stream.extend_from_slice(&encode(&ping, version).unwrap());
            }
            for split in 0..=stream.len() {
                let mut seen = Vec::new();
                let head = stream.get(..split).unwrap();
                let (n1, used) = scan_publishes(head, version, |p| seen.push(p.to_vec())).unwrap();
                let tail = stream.get(used..).unwrap();
                let (n2, rest) = scan_publishes(tail, version, |p| seen.push(p.to_vec())).unwrap();
                assert_eq!(rest, tail.len(), "split at {split}");
                assert_eq!(n1 + n2, 4, "split at {split}");
                assert_eq!(seen, payloads, "split at {split}");
            }
        }
        assert!(scan_publishes(
            &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
            ProtocolVersion::V5,
            |_| {}
        )
        .is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Raw mode: plain TCP sockets, no client state machine after CONNACK.
// ---------------------------------------------------------------------------------------------

/// What raw publishers write at a time, and raw subscribers read.
const RAW_CHUNK: usize = 64 * 1024;

/// How long a raw client waits for CONNACK or SUBACK.
const RAW_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Counts the PUBLISH packets in an MQTT byte stream read in pieces of any size, from their
/// fixed headers alone.
#[derive(Debug, Default)]
struct PublishCounter {
    /// The fixed header read so far: packet type byte and remaining length bytes.
    header: Vec<u8>,
    /// Bytes of the current packet's body still to skip.
    skip: usize,
}

impl PublishCounter {
    /// Reads the next piece of the stream; returns how many PUBLISH packets it completed
    /// the header of.
    fn feed(&mut self, mut data: &[u8]) -> anyhow::Result<u64> {
        let mut publishes = 0;
        loop {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = data.get(n..).unwrap_or_default();
            }
            let Some((&byte, rest)) = data.split_first() else {
                return Ok(publishes);
            };
            data = rest;
            self.header.push(byte);
            if self.header.len() == 1 || byte & 0x80 != 0 {
                if self.header.len() >= 5 {
                    bail!("malformed remaining length in the broker's stream");
                }
                continue;
            }
            let (first, length) = self.header.split_first().unwrap_or((&0, &[]));
            if first >> 4 == 3 {
                publishes += 1;
            }
            self.skip = length
                .iter()
                .rev()
                .fold(0, |n, b| (n << 7) | usize::from(b & 0x7f));
            self.header.clear();
        }
    }
}

/// Writes all of `bytes`.
async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> anyhow::Result<()> {
    while !bytes.is_empty() {
        let n = write_some(stream, bytes).await?;
        bytes = bytes.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// Writes what the socket takes of `bytes` (at least one byte). Cancel safe.
async fn write_some(stream: &TcpStream, bytes: &[u8]) -> anyhow::Result<usize> {
    loop {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(0) => bail!("connection closed"),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads what is there into `buf` (at least one byte); 0 means the connection closed.
/// Cancel safe.
async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> anyhow::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn encode(packet: &Packet, version: ProtocolVersion) -> anyhow::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(packet.encoded_len(version));
    packet.encode(version, &mut buf)?;
    Ok(buf)
}

/// The CPU time, user and system, that process `pid` has used so far, in seconds.
fn process_cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read the CPU time of process {pid}"))?;
    // The command name, in parentheses, may hold spaces; utime and stime are the 14th and
    // 15th fields, the 12th and 13th after it.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let mut fields = after_name.split_whitespace().skip(11);
    let mut ticks = || -> anyhow::Result<u64> {
        Ok(fields
            .next()
            .context("short /proc/PID/stat")?
            .parse::<u64>()?)
    };
    let total = ticks()? + ticks()?;
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    Ok(total as f64 / 100.0)
}

impl Bench {
    /// Opens a plain TCP connection and completes CONNECT/CONNACK; returns what the broker
    /// sent after CONNACK.
    async fn raw_connect(&self, role: Role, index: usize) -> anyhow::Result<(TcpStream, BytesMut)> {
        self.counters.connect_started();
        let stream = match self.args.bind.get(index % self.args.bind.len().max(1)) {
            Some(ip) => {
                let socket = match ip {
                    std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(*ip, 0))?;
                socket.connect(self.addr_of(role)).await?
            }
            None => TcpStream::connect(self.addr_of(role)).await?,
        };
        stream.set_nodelay(true)?;
        let (clean_start, expiry) = self.session_options(role);
        let mut properties = ConnectProperties::default();
        if self.version == ProtocolVersion::V5 && expiry > 0 {
            properties.session_expiry_interval = Some(expiry);
        }
        let connect = Packet::Connect(Box::new(Connect {
            protocol: self.version,
            clean_start,
            // No keep alive: a raw client sends nothing but its messages.
            keep_alive: 0,
            client_id: ClientId::try_from(self.client_id(role, index).as_str())?,
            will: None,
            username: None,
            password: None,
            properties,
        }));
        write_all(&stream, &encode(&connect, self.version)?).await?;
        let (packet, rest) = self.raw_read_packet(&stream, BytesMut::new()).await?;
        match packet {
            // A raw client never pings: a broker that imposes a keep alive would close it.
            Packet::ConnAck(ack) if ack.properties.server_keep_alive.is_some_and(|k| k > 0) => {
                bail!("the broker imposes a keep alive; use --full-client")
            }
            Packet::ConnAck(ack) if !ack.reason.is_error() => {}
            other => bail!("the broker refused the connection: {other:?}"),
        }
        self.counters.connack_received();
        Ok((stream, rest))
    }

    /// Reads one whole packet; returns it with the bytes read after it.
    async fn raw_read_packet(
        &self,
        stream: &TcpStream,
        mut buf: BytesMut,
    ) -> anyhow::Result<(Packet, BytesMut)> {
        let mut reader = PacketReader::new(u32::MAX);
        let mut chunk = vec![0; 4096];
        tokio::time::timeout(RAW_HANDSHAKE_TIMEOUT, async {
            loop {
                if let Some(packet) = reader.read(&mut buf, Some(self.version))? {
                    return Ok((packet, buf));
                }
                let n = read_some(stream, &mut chunk).await?;
                if n == 0 {
                    bail!("the broker closed the connection");
                }
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            }
        })
        .await
        .context("no answer from the broker")?
    }

    /// Connects, subscribes to `filter` and counts the PUBLISH packets that arrive until
    /// `stop`. Adds a permit to `ready` once subscribed.
    async fn raw_subscriber(
        self: Arc<Self>,
        index: usize,
        filter: String,
        ready: Arc<Semaphore>,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let (stream, rest) = self.raw_connect(Role::Sub, index).await?;
        let rest = self.raw_subscribe(&stream, filter, rest).await?;
        ready.add_permits(1);
        let mut counter = PublishCounter::default();
        self.raw_received(counter.feed(&rest)?);
        let mut buf = vec![0; RAW_CHUNK];
        loop {
            let n = tokio::select! {
                n = read_some(&stream, &mut buf) => n?,
                _ = stop.cancelled() => break,
            };
            if n == 0 {
                bail!("the broker closed the connection");
            }
            self.raw_received(counter.feed(buf.get(..n).unwrap_or_default())?);
        }
        let disconnect = Packet::Disconnect(Disconnect::new(ReasonCode::Success));
        let _ = write_all(&stream, &encode(&disconnect, self.version)?).await;
        Ok(())
    }

    /// Subscribes to `filter` at QoS 0 and waits for SUBACK; returns what followed it.
    async fn raw_subscribe(
        &self,
        stream: &TcpStream,
        filter: String,
        rest: BytesMut,
    ) -> anyhow::Result<BytesMut> {
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id: PacketId::MIN,
            properties: SubscribeProperties::default(),
            filters: vec![Subscription {
                filter: TopicFilter::try_from(filter)?,
                options: SubscriptionOptions::default(),
            }],
        });
        write_all(stream, &encode(&subscribe, self.version)?).await?;
        let (packet, rest) = self.raw_read_packet(stream, rest).await?;
        match packet {
            Packet::SubAck(ack) if !ack.reasons.iter().any(|r| r.is_error()) => Ok(rest),
            other => bail!("subscription refused: {other:?}"),
        }
    }

    fn raw_received(&self, n: u64) {
        let before = self.counters.received.fetch_add(n, Ordering::Relaxed);
        if self
            .args
            .expect
            .is_some_and(|e| before < e && e <= before + n)
        {
            let _ = self.expect_reached.set(Instant::now());
            self.expect_done.cancel();
        }
    }

    /// Writes pre-encoded QoS 0 PUBLISH packets to `stream` in [`RAW_CHUNK`] writes as fast
    /// as it takes them, until `until` (after at least one write) or `--messages`; then
    /// completes the packet in progress and disconnects. Counts whole packets written.
    async fn raw_publisher(
        self: Arc<Self>,
        index: usize,
        stream: TcpStream,
        until: Instant,
    ) -> anyhow::Result<()> {
        let publish = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: TopicName::try_from(self.topic(index))?,
            packet_id: None,
            properties: PublishProperties::default(),
            payload: vec![b'x'; self.args.size].into(),
        });
        let packet = encode(&publish, self.version)?;
        let packet_len = packet.len() as u64;
        let mut batch = Vec::with_capacity(RAW_CHUNK.max(packet.len()));
        while batch.is_empty() || batch.len() + packet.len() <= RAW_CHUNK {
            batch.extend_from_slice(&packet);
        }
        let batch_len = batch.len() as u64;
        let limit = self
            .args
            .messages
            .map_or(u64::MAX, |n| n.saturating_mul(packet_len));
        let deadline = tokio::time::Instant::from_std(until);
        let mut written: u64 = 0;
        while written < limit {
            let offset = (written % batch_len) as usize;
            let end = (offset as u64 + (limit - written)).min(batch_len) as usize;
            let chunk = batch.get(offset..end).unwrap_or_default();
            let n = tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline), if written > 0 => break,
                n = write_some(&stream, chunk) => n?,
            };
            let whole_before = written / packet_len;
            written += n as u64;
            self.counters
                .sent
                .fetch_add(written / packet_len - whole_before, Ordering::Relaxed);
        }
        self.publishing_ended
            .fetch_max(epoch().elapsed().as_nanos() as u64, Ordering::Relaxed);
        // Finish the packet in progress and disconnect, so that the stream stays well-formed;
        // a broker too far behind to take that within the drain gets a cut stream instead, and
        // the packet is not counted.
        let partial = (written % packet_len) as usize;
        let finish = async {
            if partial > 0 {
                write_all(&stream, packet.get(partial..).unwrap_or_default()).await?;
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            let disconnect = Packet::Disconnect(Disconnect::new(ReasonCode::Success));
            write_all(&stream, &encode(&disconnect, self.version)?).await
        };
        let drain = Duration::from_secs_f64(self.args.drain);
        match tokio::time::timeout(drain, finish).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}

/// The raw scenario: subscribers first, then every publisher connected, then the clock starts.
async fn run_raw(bench: Arc<Bench>) -> anyhow::Result<()> {
    let setup_started = Instant::now();
    let count = bench.args.count.max(1);
    let filter = wildcard(&bench.topic(0));
    let ready = Arc::new(Semaphore::new(0));
    let stop = CancellationToken::new();
    let mut subscribers = tokio::task::JoinSet::new();
    for i in 0..bench.args.subscribers {
        let task = bench
            .clone()
            .raw_subscriber(i, filter.clone(), ready.clone(), stop.clone());
        subscribers.spawn(task);
    }
    let subscribed = ready.acquire_many(bench.args.subscribers as u32);
    tokio::select! {
        permits = subscribed => permits?.forget(),
        Some(result) = subscribers.join_next() => match result? {
            Err(error) => return Err(error.context("a raw subscriber failed")),
            Ok(()) => bail!("a raw subscriber ended before subscribing"),
        },
    }
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        streams.push(bench.raw_connect(Role::Pub, i).await?.0);
    }
    let pid = bench.args.broker_pid;
    let cpu_before = pid.map(process_cpu_secs).transpose()?;
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(bench.args.duration);
    let mut publishers = tokio::task::JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        publishers.spawn(bench.clone().raw_publisher(i, stream, until));
    }
    while let Some(result) = publishers.join_next().await {
        if let Ok(Err(error)) = result {
            bench.counters.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("raw publisher error: {error:#}");
        }
    }
    let ended = bench.publishing_ended.load(Ordering::Relaxed);
    let measured_until = if ended > 0 {
        until.min(epoch() + Duration::from_nanos(ended))
    } else {
        until
    };
    let received_in_window = bench.counters.received.load(Ordering::Relaxed);
    let cpu = match (pid, cpu_before) {
        (Some(pid), Some(before)) => Some(process_cpu_secs(pid)? - before),
        _ => None,
    };
    if bench.args.subscribers > 0 {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(bench.args.drain)) => {}
            _ = bench.expect_done.cancelled() => {}
        }
    }
    stop.cancel();
    while let Some(result) = subscribers.join_next().await {
        if let Ok(Err(error)) = result {
            bench.counters.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("raw subscriber error: {error:#}");
        }
    }
    let elapsed = measured_until
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-9);
    let c = &bench.counters;
    let (sent, received) = (
        c.sent.load(Ordering::Relaxed),
        c.received.load(Ordering::Relaxed),
    );
    let connected = c.connected.load(Ordering::Relaxed);
    let summary = Summary {
        scenario: bench.args.scenario,
        clients: count,
        qos: 0,
        payload_bytes: bench.args.size,
        duration_secs: elapsed,
        connected,
        connect_per_sec: c.connect_per_sec(),
        sent,
        sent_per_sec: sent as f64 / elapsed,
        acked: 0,
        received,
        // What arrived while the publishers wrote, not during the drain.
        received_per_sec: received_in_window as f64 / elapsed,
        latency_ms: None,
        errors: c.errors.load(Ordering::Relaxed),
        session_present: 0,
        expect_reached_secs: bench
            .expect_reached
            .get()
            .map(|t| t.duration_since(setup_started).as_secs_f64()),
        subscribers: Some(bench.args.subscribers),
        dropped: Some((sent * bench.args.subscribers as u64).saturating_sub(received)),
        broker_cpu_secs: cpu,
        received_per_broker_cpu_sec: cpu
            .filter(|&secs| secs > 0.0)
            .map(|secs| received_in_window as f64 / secs),
    };
    report(&bench, &summary)
}

/// The wildcard filter over `topic`'s siblings: `a/b/3` gives `a/b/#`.
fn wildcard(topic: &str) -> String {
    topic
        .rsplit_once('/')
        .map_or("#".into(), |(p, _)| format!("{p}/#"))
}

// ---------------------------------------------------------------------------------------------
// Lean path: QoS 0 fan-in and fan-out clients cheap enough to measure the broker.
// ---------------------------------------------------------------------------------------------

/// What a lean publisher writes at a time: about 190 PUBLISH packets of a 64-byte payload,
/// all stamped with the time of the write.
const LEAN_BATCH: usize = 16 * 1024;

impl Bench {
    /// Whether `role`'s clients take the lean path: QoS 0 fan-in or fan-out over plain TCP, a
    /// clean session, and no `--full-client`. Publishers take it only when unpaced.
    fn lean(&self, role: Role) -> bool {
        !self.args.full_client
            && self.connector.is_none()
            && self.qos == QoS::AtMostOnce
            && matches!(self.args.scenario, Scenario::Fanin | Scenario::Fanout)
            && self.session_options(role).0
    }

    /// Publishes QoS 0 messages as fast as the connection takes them until `until` (after at
    /// least one write) or `--messages`: [`LEAN_BATCH`] bytes of pre-encoded PUBLISH packets
    /// per write, every payload stamped with one clock reading per batch. Counts whole
    /// packets written, finishes the packet in progress, waits out the drain and disconnects.
    async fn lean_publisher(self: Arc<Self>, index: usize, until: Instant) -> anyhow::Result<()> {
        let (stream, _) = self.raw_connect(Role::Pub, index).await?;
        let size = self.args.size.max(8);
        let publish = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: TopicName::try_from(self.topic(index))?,
            packet_id: None,
            properties: PublishProperties::default(),
            payload: vec![b'x'; size].into(),
        });
        let packet = encode(&publish, self.version)?;
        let packet_len = packet.len();
        // The payload ends the packet; its first eight bytes carry the stamp.
        let stamp_at = packet_len - size;
        let per_batch = (LEAN_BATCH / packet_len).max(1);
        let mut batch = packet.repeat(per_batch);
        let limit = self.args.messages.unwrap_or(u64::MAX);
        let deadline = tokio::time::sleep_until(tokio::time::Instant::from_std(until));
        tokio::pin!(deadline);
        let (mut sent, mut pos, mut end) = (0u64, 0usize, 0usize);
        loop {
            if pos == end {
                if sent >= limit || (sent > 0 && Instant::now() >= until) {
                    break;
                }
                let now = (epoch().elapsed().as_nanos() as u64).to_be_bytes();
                let packets = (limit - sent).min(per_batch as u64) as usize;
                for stamp in batch
                    .chunks_exact_mut(packet_len)
                    .take(packets)
                    .filter_map(|p| p.get_mut(stamp_at..stamp_at + 8))
                {
                    stamp.copy_from_slice(&now);
                }
                (pos, end) = (0, packets * packet_len);
            }
            let chunk = batch.get(pos..end).unwrap_or_default();
            let n = tokio::select! {
                biased;
                _ = &mut deadline, if sent > 0 => break,
                n = write_some(&stream, chunk) => n?,
            };
            let whole = ((pos + n) / packet_len - pos / packet_len) as u64;
            pos += n;
            sent += whole;
            self.counters.sent.fetch_add(whole, Ordering::Relaxed);
        }
        self.publishing_ended
            .fetch_max(epoch().elapsed().as_nanos() as u64, Ordering::Relaxed);
        // Finish the packet in progress, so that the stream stays well-formed.
        let partial = pos % packet_len;
        if partial > 0 {
            write_all(&stream, packet.get(partial..).unwrap_or_default()).await?;
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        // Stay connected through the drain, as the full client does.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(self.args.drain)) => {}
            _ = self.expect_done.cancelled() => {}
        }
        let disconnect = Packet::Disconnect(Disconnect::new(ReasonCode::Success));
        let _ = write_all(&stream, &encode(&disconnect, self.version)?).await;
        Ok(())
    }

    /// Subscribes to `filter` at QoS 0 and reads until `stop`, [`RAW_CHUNK`] bytes at a time,
    /// parsing the PUBLISH packets in place: one clock reading per read gives the latency of
    /// every message in it. Adds a permit to `ready` once subscribed.
    async fn lean_subscriber(
        self: Arc<Self>,
        index: usize,
        filter: String,
        ready: Arc<Semaphore>,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let (stream, rest) = self.raw_connect(Role::Sub, index).await?;
        let rest = self.raw_subscribe(&stream, filter, rest).await?;
        ready.add_permits(1);
        let mut local = Histogram::<u64>::new(3)?;
        let mut buf = vec![0; RAW_CHUNK.max(rest.len() * 2)];
        buf.get_mut(..rest.len())
            .unwrap_or_default()
            .copy_from_slice(&rest);
        let mut filled = rest.len();
        loop {
            let now = epoch().elapsed();
            let data = buf.get(..filled).unwrap_or_default();
            let (count, consumed) = scan_publishes(data, self.version, |payload| {
                if let Some(sent) = sent_at(payload) {
                    let latency = now.saturating_sub(sent);
                    let _ = local.record(latency.as_micros().max(1) as u64);
                }
            })?;
            self.raw_received(count);
            buf.copy_within(consumed..filled, 0);
            filled -= consumed;
            if filled == buf.len() {
                // One packet larger than the buffer.
                buf.resize(buf.len() * 2, 0);
            }
            let n = tokio::select! {
                n = read_some(&stream, buf.get_mut(filled..).unwrap_or_default()) => n?,
                _ = stop.cancelled() => break,
            };
            if n == 0 {
                bail!("the broker closed the connection");
            }
            filled += n;
        }
        if let Ok(mut h) = self.latency.lock() {
            let _ = h.add(&local);
        }
        let disconnect = Packet::Disconnect(Disconnect::new(ReasonCode::Success));
        let _ = write_all(&stream, &encode(&disconnect, self.version)?).await;
        Ok(())
    }
}

/// Finds the whole packets at the start of `data`, calls `on_payload` with the payload of each
/// PUBLISH among them, and returns how many PUBLISH packets there were and the bytes the whole
/// packets take. Other packets are skipped.
fn scan_publishes(
    data: &[u8],
    version: ProtocolVersion,
    mut on_payload: impl FnMut(&[u8]),
) -> anyhow::Result<(u64, usize)> {
    let (mut count, mut consumed) = (0, 0);
    loop {
        let rest = data.get(consumed..).unwrap_or_default();
        let Some(&first) = rest.first() else {
            break;
        };
        let Some((length, header)) = varint(rest.get(1..).unwrap_or_default())? else {
            break;
        };
        let Some(body) = rest.get(1 + header..1 + header + length) else {
            break;
        };
        consumed += 1 + header + length;
        if first >> 4 != 3 {
            continue;
        }
        let topic_len = match body {
            [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
            _ => bail!("a PUBLISH packet too short for its topic"),
        };
        let mut offset = 2 + topic_len;
        if (first >> 1) & 3 != 0 {
            offset += 2;
        }
        if version == ProtocolVersion::V5 {
            let (properties, len) = varint(body.get(offset..).unwrap_or_default())?
                .context("a PUBLISH packet too short for its properties")?;
            offset += len + properties;
        }
        let payload = body
            .get(offset..)
            .context("a PUBLISH packet too short for its header")?;
        on_payload(payload);
        count += 1;
    }
    Ok((count, consumed))
}

/// Decodes a variable byte integer: its value and its length, or `None` if `data` ends first.
fn varint(data: &[u8]) -> anyhow::Result<Option<(usize, usize)>> {
    let mut value = 0;
    for (i, &byte) in data.iter().enumerate().take(4) {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if data.len() >= 4 {
        bail!("malformed variable byte integer in the broker's stream");
    }
    Ok(None)
}
