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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use mqttd_client::{connect_tcp, Client, Events};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::{ClientId, Message, ProtocolVersion, QoS, ReasonCode, TopicFilter, TopicName};
use serde::Serialize;
use tokio::net::lookup_host;
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
    /// Broker port.
    #[arg(short, long, default_value_t = 1883)]
    port: u16,
    /// Transport (only TCP so far).
    #[arg(long, default_value = "tcp")]
    transport: String,
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
    /// Connections whose CONNACK said the broker had a session for them.
    session_present: AtomicU64,
    errors: AtomicU64,
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
    version: ProtocolVersion,
    qos: QoS,
    counters: Counters,
    latency: Mutex<Histogram<u64>>,
    connect_gate: Option<Arc<Semaphore>>,
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
        let name = self.client_id(role, index);
        let mut config = ClientConfig::new(ClientId::try_from(name.as_str())?);
        config.version = self.version;
        config.keep_alive = 300;
        config.queue_limits.max_messages = 100_000;
        (config.clean_start, config.session_expiry_interval) = self.session_options(role);
        let resuming = !config.clean_start;
        let (client, events, ack) = match self.args.bind.get(index % self.args.bind.len().max(1)) {
            Some(ip) => {
                let socket = match ip {
                    std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(*ip, 0))?;
                let stream = socket.connect(self.addr).await?;
                stream.set_nodelay(true)?;
                mqttd_client::connect(stream, config, None).await?
            }
            None => connect_tcp(self.addr, config, None).await?,
        };
        self.counters.connected.fetch_add(1, Ordering::Relaxed);
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
        tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
        let _ = client.disconnect(ReasonCode::Success, None).await;
        Ok(())
    }
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.transport != "tcp" {
        bail!("transport {:?} is not available yet (tcp)", args.transport);
    }
    let addr = lookup_host((args.host.as_str(), args.port))
        .await?
        .next()
        .with_context(|| format!("cannot resolve {}", args.host))?;
    let version = match args.protocol.as_str() {
        "5" => ProtocolVersion::V5,
        "311" => ProtocolVersion::V3_1_1,
        "31" => ProtocolVersion::V3_1,
        other => bail!("unknown protocol version {other:?}"),
    };
    let qos = QoS::from_bits(args.qos).context("QoS must be 0, 1 or 2")?;
    let has_publishers = matches!(
        args.scenario,
        Scenario::Pub | Scenario::Fanin | Scenario::Fanout | Scenario::Pairs
    );
    let has_subscribers = matches!(
        args.scenario,
        Scenario::Sub | Scenario::Fanin | Scenario::Fanout | Scenario::Pairs
    );
    if args.messages.is_some() && !has_publishers {
        bail!("--messages needs a scenario with publishers");
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
        version,
        qos,
        counters: Counters::default(),
        latency: Mutex::new(Histogram::new(3)?),
        connect_gate,
        clean_start,
        publishing_ended: AtomicU64::new(0),
        expect_reached: OnceLock::new(),
        expect_done: CancellationToken::new(),
        args,
    });
    let count = bench.args.count.max(1);
    let measure = Duration::from_secs_f64(bench.args.duration);
    let setup_started = Instant::now();

    // Subscribers first, so that nothing published is missed.
    let subscribers: Vec<(usize, String)> = match bench.args.scenario {
        Scenario::Sub => (0..count).map(|i| (i, bench.topic(i))).collect(),
        Scenario::Fanin => vec![(
            0,
            bench
                .topic(0)
                .rsplit_once('/')
                .map_or("#".into(), |(p, _)| format!("{p}/#")),
        )],
        Scenario::Fanout => (0..count).map(|i| (i, bench.topic(0))).collect(),
        Scenario::Pairs => (0..count).map(|i| (i, bench.topic(i))).collect(),
        Scenario::Conn | Scenario::Pub => Vec::new(),
    };
    let publishers: Vec<usize> = match bench.args.scenario {
        Scenario::Pub | Scenario::Fanin | Scenario::Pairs => (0..count).collect(),
        Scenario::Fanout => vec![0],
        Scenario::Conn | Scenario::Sub => Vec::new(),
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
        connect_per_sec: connected as f64
            / start
                .duration_since(setup_started)
                .as_secs_f64()
                .max(elapsed.min(1.0)),
        sent,
        sent_per_sec: sent as f64 / elapsed,
        acked: c.acked.load(Ordering::Relaxed),
        received,
        received_per_sec: received as f64 / elapsed,
        latency_ms: latency,
        errors: c.errors.load(Ordering::Relaxed),
        session_present: c.session_present.load(Ordering::Relaxed),
        expect_reached_secs: reached.map(|t| t.duration_since(setup_started).as_secs_f64()),
    };
    if bench.args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
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
    println!("errors        {}", s.errors);
}

/// The payload stamp survives the trip through the broker.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips() {
        let mut buf = BytesMut::new();
        stamp(&mut buf, 64);
        assert_eq!(buf.len(), 64);
        let t = sent_at(&buf).unwrap();
        assert!(t <= epoch().elapsed());
        assert_eq!(sent_at(b"short"), None);
    }
}
