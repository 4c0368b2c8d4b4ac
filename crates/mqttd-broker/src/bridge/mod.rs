//! Bridges to other brokers (`[[bridge]]` in the configuration), as Mosquitto and EMQX users
//! know them: topic rules in Mosquitto's syntax carry messages out to a remote broker, in from
//! it, or both ways, with prefixes replaced on the way.
//!
//! # Design
//!
//! A bridge is a persistent session of this broker, with the client identifier `$bridge/NAME`
//! (refused to any client) and a session that never expires, subscribed to the local filters
//! of the outgoing rules. It is an ordinary MQTT 5 connection over an in-memory stream, served
//! by the same driver and connection core as a TCP client's, with
//! [`Transport::Bridge`] as its transport: a trusted internal identity that needs no password
//! and that the ACL and the `authorize` hook are not asked about. So the bridge's queue is that
//! session's: stored in the broker's durable store like any persistent session's, bounded by
//! `max_queued_messages`, and brought back after a restart or a crash; nothing about sessions,
//! routing or storage knows bridges.
//!
//! The bridge's task (one per bridge, an actor that ends at shutdown) holds that local
//! connection for the broker's lifetime and a connection to the remote broker with
//! `mqttd-client`, which it opens again after a failure with exponential backoff and jitter,
//! trying the URLs in order. Messages from the local session are published on the remote
//! broker and acknowledged locally only once the remote broker acknowledged them (PUBACK, or
//! PUBCOMP for QoS 2); messages from the remote broker are published into this broker from the
//! bridge's session, as from a client, and acknowledged to the remote broker once this broker
//! has them. While the remote broker is away the local session's in-flight window fills and
//! the rest queues in the session, durably; QoS 0 messages are dropped meanwhile. The
//! bookkeeping is a sans-IO machine, `relay::Relay`.
//!
//! Loops: the bridge's local subscriptions are No Local, so what the bridge publishes here
//! never goes back out through it (the origin of a message is the session that published it);
//! towards an MQTT 5 remote broker its subscriptions are No Local too, and towards an MQTT
//! 3.1.1 one it announces itself as Mosquitto's bridges do (`try_private`, protocol level
//! 0x84), which Mosquitto and mqttd answer with the same rule. A remote broker that refuses
//! the flag is asked again without it.
//!
//! Transports: `mqtt://`, `mqtts://`, `ws://`, `wss://` and `quic://` are `mqttd-client`'s;
//! `p2p://NODE_ID?relay=URL&addr=IP:PORT` (feature `p2p`) is the broker's own, in `p2p`,
//! over the broker's peer-to-peer node; another scheme is served by a [`BridgeTransport`] the
//! embedding program plugs in with [`crate::BrokerBuilder::bridge_transport`].

pub mod config;
#[cfg(feature = "p2p")]
pub(crate) mod p2p;
mod relay;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use mqttd_client::transport::ByteStream;
use mqttd_client::{Client, ConnectError, Connector, Events, Permit, RequestError, Verdict};
use mqttd_proto::client::{ClientConfig, ClientError, Event};
use mqttd_proto::session::{Enqueued, Session, NEVER_EXPIRES};
use mqttd_proto::{
    ConnAck, Message, ProtocolVersion, QoS, ReasonCode, RetainHandling, SubscribeProperties,
    Subscription, SubscriptionOptions, TopicFilter,
};

use crate::broker::Inner;
use crate::hooks::{Peer, Transport};
use crate::metrics::BridgeMetrics;
pub use config::{Bridge, BridgeConfigError, BridgeUrl, Direction, Password, RuleError, TopicRule};
use mqttd_proto::backoff::{random_unit, Backoff};
use relay::{Command, Limits, Relay};

/// What [`BridgeTransport::open`] returns: a byte stream to the remote broker, later.
pub type OpenStream<'a> =
    Pin<Box<dyn Future<Output = std::io::Result<Box<dyn ByteStream>>> + Send + 'a>>;

/// A transport for bridge URLs whose scheme `mqttd-client` does not serve (`p2p://`, say),
/// plugged in with [`crate::BrokerBuilder::bridge_transport`]. It opens a byte stream to the
/// remote broker; the bridge runs MQTT over it.
pub trait BridgeTransport: Send + Sync + 'static {
    /// Whether this transport can use `url`, checked at startup (and when the configuration
    /// is reloaded), so that a URL it cannot read stops the broker; the error says why.
    fn check(&self, url: &BridgeUrl) -> Result<(), String> {
        let _ = url;
        Ok(())
    }

    /// Opens a stream to `url` for `bridge`. The bridge gives up on it after
    /// [`Bridge::connect_timeout`].
    fn open<'a>(&'a self, bridge: &'a Bridge, url: &'a BridgeUrl) -> OpenStream<'a>;
}

/// Plugged transports by scheme.
pub(crate) type Transports = HashMap<String, Arc<dyn BridgeTransport>>;

/// How one URL is reached.
enum Dialer {
    /// By `mqttd-client`, its TLS files loaded.
    Client(Box<Connector>),
    /// By a plugged transport.
    Plugged(Arc<dyn BridgeTransport>),
}

/// A URL and how to reach it.
struct Target {
    url: BridgeUrl,
    dialer: Dialer,
}

/// A bridge ready to run: its URLs resolved to dialers (TLS files loaded) at startup, so that
/// a mistake stops the broker instead of failing each attempt.
pub(crate) struct Plan {
    bridge: Arc<Bridge>,
    targets: Arc<[Target]>,
    metrics: BridgeMetrics,
    /// What the bridge is doing, for the admin API.
    status: Arc<Mutex<Status>>,
    /// Stops this bridge alone (a reload that removes or changes it); a child of the
    /// broker's shutdown.
    stop: CancellationToken,
}

/// Prepares `bridge`; the error says why it cannot run.
/// Checks that `bridge` could run: its TLS files load, and each URL's scheme has a transport
/// (`p2p://` ones are checked when the broker's node exists, at start).
pub(crate) fn check(bridge: &Bridge) -> Result<(), String> {
    for url in &bridge.urls {
        match url.client() {
            Some(client) => {
                let mut endpoint = client.endpoint.clone();
                if bridge.tls.is_set() {
                    endpoint.transport = endpoint.transport.with_tls();
                }
                endpoint.tls = bridge.tls.clone();
                Connector::new(endpoint).map_err(|e| format!("{url}: {e}"))?;
            }
            None if url.scheme() == "p2p" => {}
            None => {
                return Err(format!(
                    "{url}: no transport for {}:// (mqtt, mqtts, ws, wss, quic or p2p)",
                    url.scheme()
                ))
            }
        }
    }
    Ok(())
}

pub(crate) fn plan(
    bridge: &Bridge,
    transports: &Transports,
    metrics: BridgeMetrics,
) -> Result<Plan, String> {
    let mut targets = Vec::with_capacity(bridge.urls.len());
    for url in &bridge.urls {
        let dialer = match (url.client(), transports.get(url.scheme())) {
            (Some(client), _) => {
                let mut endpoint = client.endpoint.clone();
                // A TLS file turns TLS on, as in Mosquitto.
                if bridge.tls.is_set() {
                    endpoint.transport = endpoint.transport.with_tls();
                }
                endpoint.tls = bridge.tls.clone();
                endpoint.timeout = bridge.connect_timeout;
                Dialer::Client(Box::new(
                    Connector::new(endpoint).map_err(|e| format!("{url}: {e}"))?,
                ))
            }
            (None, Some(transport)) => {
                transport.check(url).map_err(|e| format!("{url}: {e}"))?;
                Dialer::Plugged(transport.clone())
            }
            (None, None) => {
                return Err(format!(
                    "{url}: no transport for {}:// (mqtt, mqtts, ws, wss, quic or p2p)",
                    url.scheme()
                ))
            }
        };
        targets.push(Target {
            url: url.clone(),
            dialer,
        });
    }
    Ok(Plan {
        bridge: Arc::new(bridge.clone()),
        targets: targets.into(),
        metrics,
        status: Arc::default(),
        stop: CancellationToken::new(),
    })
}

/// The bridges of a running broker, by name, and the transports to plan new ones with, so
/// that a reload can add, stop and restart bridges.
#[derive(Default)]
pub(crate) struct Bridges {
    transports: Mutex<Transports>,
    running: Mutex<HashMap<String, Handle>>,
}

/// A bridge's task.
struct Handle {
    bridge: Arc<Bridge>,
    status: Arc<Mutex<Status>>,
    stop: CancellationToken,
    /// Cancelled when the bridge's task has ended.
    done: CancellationToken,
}

/// What a reload did to the bridges, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BridgeChanges {
    /// Bridges started.
    pub added: Vec<String>,
    /// Bridges stopped; their sessions, and the messages queued in them, stay.
    pub removed: Vec<String>,
    /// Bridges whose settings changed: stopped, then started with the new ones.
    pub restarted: Vec<String>,
}

impl BridgeChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.restarted.is_empty()
    }
}

impl Bridges {
    /// Keeps `transports` for the bridges a reload adds.
    pub(crate) fn set_transports(&self, transports: Transports) {
        *self.transports.lock() = transports;
    }

    /// Plans `bridge` with the transports kept.
    pub(crate) fn plan(&self, bridge: &Bridge, metrics: BridgeMetrics) -> Result<Plan, String> {
        plan(bridge, &self.transports.lock(), metrics)
    }

    /// The names of the bridges running.
    pub(crate) fn names(&self) -> Vec<String> {
        self.running.lock().keys().cloned().collect()
    }

    /// The settings of the bridges running, by name.
    pub(crate) fn running(&self) -> Vec<Arc<Bridge>> {
        let mut bridges: Vec<Arc<Bridge>> = self
            .running
            .lock()
            .values()
            .map(|h| h.bridge.clone())
            .collect();
        bridges.sort_by(|a, b| a.name.cmp(&b.name));
        bridges
    }

    /// The bridges running, by name, each with what it is doing now.
    pub(crate) fn statuses(&self) -> Vec<(Arc<Bridge>, Status)> {
        let mut bridges: Vec<(Arc<Bridge>, Status)> = self
            .running
            .lock()
            .values()
            .map(|h| (h.bridge.clone(), h.status.lock().clone()))
            .collect();
        bridges.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        bridges
    }

    /// Starts the bridge `plan` as a task of the broker. The receiver is told once its local
    /// session is subscribed to the outgoing rules (dropped if that never happens).
    pub(crate) fn start(
        &self,
        inner: &Arc<Inner>,
        plan: Plan,
    ) -> tokio::sync::oneshot::Receiver<()> {
        self.start_after(inner, plan, None)
    }

    /// Starts `plan`, once `previous` (the bridge's run with its former settings) has ended.
    fn start_after(
        &self,
        inner: &Arc<Inner>,
        mut plan: Plan,
        previous: Option<Handle>,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (ready, subscribed) = tokio::sync::oneshot::channel();
        plan.stop = inner.shutdown.child_token();
        let done = CancellationToken::new();
        let handle = Handle {
            bridge: plan.bridge.clone(),
            status: plan.status.clone(),
            stop: plan.stop.clone(),
            done: done.clone(),
        };
        let name = plan.bridge.name.clone();
        let inner2 = inner.clone();
        inner.tasks.spawn(async move {
            // A restarted bridge waits until its previous run let its session go.
            if let Some(previous) = previous {
                previous.done.cancelled().await;
            }
            let _done = done.drop_guard();
            run(inner2, plan, Some(ready)).await;
        });
        self.running.lock().insert(name, handle);
        subscribed
    }

    /// Applies `wanted`, the bridges of a reloaded configuration: bridges no longer in it
    /// stop, new ones start, and those whose settings changed start again with the new ones.
    /// Every new or changed bridge is planned first: if one cannot run, nothing changes.
    pub(crate) fn reload(
        &self,
        inner: &Arc<Inner>,
        wanted: &[Bridge],
    ) -> Result<BridgeChanges, (String, String)> {
        let mut changes = BridgeChanges::default();
        let mut plans = Vec::new();
        {
            let running = self.running.lock();
            for bridge in wanted {
                let same = running
                    .get(&bridge.name)
                    .is_some_and(|h| h.bridge.fingerprint() == bridge.fingerprint());
                if same {
                    continue;
                }
                let plan = self
                    .plan(bridge, inner.metrics.bridge(&bridge.name))
                    .map_err(|reason| (bridge.name.clone(), reason))?;
                plans.push(plan);
            }
        }
        let mut running = self.running.lock();
        let gone: Vec<String> = running
            .keys()
            .filter(|name| !wanted.iter().any(|b| &b.name == *name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(handle) = running.remove(&name) {
                handle.stop.cancel();
                inner.metrics.bridge(&name).up.set(0);
                changes.removed.push(name);
            }
        }
        drop(running);
        for plan in plans {
            let name = plan.bridge.name.clone();
            let previous = self.running.lock().remove(&name);
            match previous {
                Some(previous) => {
                    previous.stop.cancel();
                    changes.restarted.push(name);
                    drop(self.start_after(inner, plan, Some(previous)));
                }
                None => {
                    changes.added.push(name);
                    drop(self.start_after(inner, plan, None));
                }
            }
        }
        Ok(changes)
    }
}

/// Where a bridge's connection to its remote broker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum State {
    /// Opening its session in this broker, or connecting to a remote URL.
    #[default]
    Connecting,
    /// Connected to the remote broker.
    Connected,
    /// Waiting before the next round of attempts, after a failure.
    BackingOff,
    /// Stopped: the broker shuts down or a reload removed it.
    Stopped,
}

impl State {
    /// The name the admin API shows.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::BackingOff => "backing_off",
            Self::Stopped => "stopped",
        }
    }
}

/// What a bridge is doing, kept up to date by its task for the admin API.
#[derive(Debug, Clone, Default)]
pub(crate) struct Status {
    /// Where its remote connection stands.
    pub(crate) state: State,
    /// The URL connected to or being tried (passwords left out).
    pub(crate) url: Option<String>,
    /// When `state` was entered.
    pub(crate) since: Option<std::time::SystemTime>,
    /// When the next round of attempts starts, while backing off.
    pub(crate) retry_at: Option<std::time::SystemTime>,
    /// The last failure: a refused or failed connection, or a lost one.
    pub(crate) last_error: Option<String>,
    /// When it happened.
    pub(crate) last_error_at: Option<std::time::SystemTime>,
}

impl Plan {
    /// Records that the bridge entered `state`, at `url` (kept if `None`).
    fn enter(&self, state: State, url: Option<String>) {
        let mut status = self.status.lock();
        if status.state != state {
            status.since = Some(std::time::SystemTime::now());
        }
        status.state = state;
        if url.is_some() {
            status.url = url;
        }
        status.retry_at = None;
    }

    /// Records a failure, and the wait before the next round if one is due.
    fn failed(&self, error: String, wait: Option<Duration>) {
        let now = std::time::SystemTime::now();
        let mut status = self.status.lock();
        status.last_error = Some(error);
        status.last_error_at = Some(now);
        if let Some(wait) = wait {
            if status.state != State::BackingOff {
                status.since = Some(now);
            }
            status.state = State::BackingOff;
            status.retry_at = now.checked_add(wait);
        }
    }
}

/// Bytes each direction of the in-memory stream of a bridge's local session holds.
const LOCAL_BUFFER: usize = 256 * 1024;
/// How long the bridge waits before it opens its local session again, should it close.
const LOCAL_RETRY: Duration = Duration::from_secs(1);
/// How long a DISCONNECT to the remote broker may take at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Says that a bridge's local session is subscribed to its outgoing rules.
type Ready = tokio::sync::oneshot::Sender<()>;

/// Runs a bridge until the broker shuts down or a reload stops it. `ready` is told once the
/// local session is subscribed to the outgoing rules.
async fn run(inner: Arc<Inner>, plan: Plan, mut ready: Option<Ready>) {
    let span = tracing::info_span!("bridge", bridge = %plan.bridge.name);
    async move {
        loop {
            let local = tokio::select! {
                _ = plan.stop.cancelled() => return,
                local = connect_local(&inner, &plan.bridge) => local,
            };
            match local {
                Ok((client, events, ack)) => {
                    match Running::new(&inner, &plan, client, events, &ack, ready.take())
                        .run()
                        .await
                    {
                        End::Shutdown => {
                            plan.enter(State::Stopped, None);
                            return;
                        }
                        End::LocalLost(reason) => {
                            plan.failed(
                                format!("the bridge's local session closed ({reason:?})"),
                                None,
                            );
                            plan.enter(State::Connecting, None);
                            warn!(
                                ?reason,
                                "the bridge's local session closed; opening it again"
                            );
                        }
                    }
                }
                Err(error) => {
                    warn!(%error, "cannot open the bridge's local session");
                    plan.failed(format!("cannot open the local session: {error}"), None);
                }
            }
            tokio::select! {
                _ = plan.stop.cancelled() => return,
                _ = tokio::time::sleep(LOCAL_RETRY) => {}
            }
        }
    }
    .instrument(span)
    .await;
}

/// Opens the bridge's session in this broker: an MQTT 5 connection over an in-memory stream,
/// served like any client's, as [`Transport::Bridge`].
async fn connect_local(
    inner: &Arc<Inner>,
    bridge: &Bridge,
) -> Result<(Client, Events, ConnAck), ConnectError> {
    let (ours, theirs) = tokio::io::duplex(LOCAL_BUFFER);
    let peer = Peer::new(
        Transport::Bridge,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Arc::from(format!("bridge:{}", bridge.name)),
    );
    inner
        .tasks
        .spawn(crate::drivers::stream::serve(inner.clone(), theirs, peer));
    let mut config = ClientConfig::new(bridge.local_client_id());
    config.clean_start = false;
    config.session_expiry_interval = NEVER_EXPIRES;
    config.keep_alive = 0;
    config.receive_maximum = bridge.max_inflight;
    config.auto_ack = false;
    mqttd_client::connect(ours, config, None).await
}

/// Why a local connection's run ended.
enum End {
    /// The broker shuts down.
    Shutdown,
    /// The local session's connection closed (with this reason, if known).
    LocalLost(Option<ReasonCode>),
}

/// The remote connection (its events are [`Running::remote_events`]).
struct Remote {
    client: Client,
    /// Which of the bridge's URLs it is to.
    url: usize,
    /// Its command queue closed: nothing more is sent on it, and its events say why.
    closed: bool,
}

/// What woke a bridge's task.
enum Wake {
    Shutdown,
    /// Room in the local connection's queue (false: it closed).
    LocalRoom(bool),
    /// Room in the remote connection's queue (false: it closed).
    RemoteRoom(bool),
    Local(Option<Event>),
    Remote(Option<Event>),
    /// The local client's verdict on the oldest publication awaiting one.
    LocalVerdict(Result<Enqueued, RequestError>),
    /// The remote client's verdict on the oldest publication awaiting one.
    RemoteVerdict(Result<Enqueued, RequestError>),
    Attempted(Attempted),
    Retry,
    /// A SUBSCRIBE or UNSUBSCRIBE was answered.
    Answered,
}

/// A connection attempt's outcome.
struct Attempted {
    url: usize,
    result: Result<(Client, Events, ConnAck), ConnectError>,
}

type Attempt = Pin<Box<dyn Future<Output = Attempted> + Send>>;

/// A bridge while its local session is connected.
struct Running<'a> {
    inner: &'a Arc<Inner>,
    plan: &'a Plan,
    local: Client,
    local_events: Events,
    relay: Relay,
    /// QoS 1 and 2 publications on the local connection awaiting the client's verdict.
    local_verdicts: Verdicts,
    remote: Option<Remote>,
    remote_events: Option<Events>,
    /// The same on the remote connection.
    remote_verdicts: Verdicts,
    /// The remote client's session between connections, so that what was in flight both ways
    /// is resumed (QoS 2 stays exactly once).
    session: Option<Session>,
    backoff: Backoff,
    /// Whether to announce a bridge (MQTT 3.1.1) until the remote broker refuses it.
    private: bool,
    attempt: Option<Attempt>,
    /// The URL to try next.
    next_url: usize,
    /// When to try next, while no connection is up or being made.
    retry_at: Option<tokio::time::Instant>,
    /// Whether an attempt was made yet (later ones count as reconnects).
    attempted: bool,
    /// SUBSCRIBE and UNSUBSCRIBE waiting for their answers, cancelled with the bridge.
    requests: JoinSet<()>,
}

impl<'a> Running<'a> {
    fn new(
        inner: &'a Arc<Inner>,
        plan: &'a Plan,
        local: Client,
        local_events: Events,
        ack: &ConnAck,
        ready: Option<Ready>,
    ) -> Self {
        let limits = Limits::of(ack);
        let bridge = &plan.bridge;
        let mut running = Self {
            inner,
            plan,
            local,
            local_events,
            relay: Relay::new(bridge.topics.clone().into(), limits),
            local_verdicts: VecDeque::new(),
            remote: None,
            remote_events: None,
            remote_verdicts: VecDeque::new(),
            session: None,
            backoff: Backoff::new(bridge.reconnect_min, bridge.reconnect_max),
            private: bridge.try_private && bridge.protocol == ProtocolVersion::V3_1_1,
            attempt: None,
            next_url: 0,
            retry_at: Some(tokio::time::Instant::now()),
            attempted: false,
            requests: JoinSet::new(),
        };
        running.subscribe_local(ready);
        running
    }

    /// Subscribes the local session to the outgoing rules' local filters, and unsubscribes
    /// it from filters an earlier configuration left in it; then tells `ready`.
    fn subscribe_local(&mut self, ready: Option<Ready>) {
        let bridge = &self.plan.bridge;
        let mut wanted: Vec<(TopicFilter, QoS)> = Vec::new();
        for rule in bridge.topics.iter().filter(|r| r.direction().outgoing()) {
            match wanted.iter_mut().find(|(f, _)| f == rule.local_filter()) {
                Some((_, qos)) => *qos = (*qos).max(rule.qos()),
                None => wanted.push((rule.local_filter().clone(), rule.qos())),
            }
        }
        let stale: Vec<TopicFilter> = self
            .inner
            .sessions
            .get(&bridge.local_client_id())
            .map(|h| {
                h.subscriptions
                    .lock()
                    .keys()
                    .filter(|f| !wanted.iter().any(|(w, _)| w == *f))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let subscriptions: Vec<Subscription> = wanted
            .into_iter()
            .map(|(filter, qos)| Subscription {
                filter,
                options: SubscriptionOptions {
                    qos,
                    // What the bridge publishes here came from the remote broker.
                    no_local: true,
                    retain_as_published: true,
                    // Retained messages go out once, when a rule is new.
                    retain_handling: RetainHandling::SendIfNew,
                },
            })
            .collect();
        let client = self.local.clone();
        self.requests.spawn(
            async move {
                if !stale.is_empty() {
                    debug!(?stale, "unsubscribing the local session from old rules");
                    let _ = client.unsubscribe(stale).await;
                }
                if !subscriptions.is_empty() {
                    report_suback(
                        "local",
                        &subscriptions,
                        client
                            .subscribe(subscriptions.clone(), SubscribeProperties::default())
                            .await,
                    );
                }
                if let Some(ready) = ready {
                    let _ = ready.send(());
                }
            }
            .in_current_span(),
        );
    }

    /// Subscribes the remote connection to the incoming rules' remote filters.
    fn subscribe_remote(&mut self, client: &Client) {
        let subscriptions: Vec<Subscription> = self
            .plan
            .bridge
            .topics
            .iter()
            .filter(|r| r.direction().incoming())
            .map(|r| Subscription {
                filter: r.remote_filter().clone(),
                options: SubscriptionOptions {
                    qos: r.qos(),
                    // The bridge's own messages stay there (MQTT 5; with 3.1.1, the bridge
                    // flag asks the same).
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::SendAtSubscribe,
                },
            })
            .collect();
        if subscriptions.is_empty() {
            return;
        }
        let client = client.clone();
        self.requests.spawn(
            async move {
                let ack = client
                    .subscribe(subscriptions.clone(), SubscribeProperties::default())
                    .await;
                report_suback("remote", &subscriptions, ack);
            }
            .in_current_span(),
        );
    }

    /// The actor's loop. Each turn it waits for the first of, in this order:
    ///
    /// 1. shutdown of the broker, or of this bridge by a reload: DISCONNECT to the remote
    ///    broker (and to the local session, which stays with its queue), and the end;
    /// 2. room in the local, then the remote connection's command queue, while the relay has
    ///    commands for it (taken in the select, so that a full queue never stops the rest);
    /// 3. the local, then the remote client's verdict on its oldest QoS 1 or 2 publication;
    /// 4. an event of the local connection (a message, a completion, its close), then of the
    ///    remote one;
    /// 5. the connection attempt in progress;
    /// 6. the retry timer, while no connection is up or being made;
    /// 7. answers to SUBSCRIBE and UNSUBSCRIBE.
    ///
    /// What the relay owes each side goes out before more is read from either.
    async fn run(mut self) -> End {
        let shutdown = self.plan.stop.clone();
        loop {
            self.count();
            let to_local = self.relay.has_local();
            let to_remote =
                self.relay.has_remote() && self.remote.as_ref().is_some_and(|r| !r.closed);
            let waiting = self.remote.is_none() && self.attempt.is_none();
            let retry_at = self.retry_at.filter(|_| waiting);
            // Room in a connection's queue is only looked for here; the commands go below,
            // through `try_reserve`.
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Shutdown,
                room = self.local.reserve(), if to_local => Wake::LocalRoom(room.is_ok()),
                room = remote_reserve(self.remote.as_ref()), if to_remote => {
                    Wake::RemoteRoom(room.is_ok())
                }
                verdict = oldest(&mut self.local_verdicts), if !self.local_verdicts.is_empty() => {
                    Wake::LocalVerdict(verdict)
                }
                verdict = oldest(&mut self.remote_verdicts), if !self.remote_verdicts.is_empty() => {
                    Wake::RemoteVerdict(verdict)
                }
                event = self.local_events.recv() => Wake::Local(event),
                event = remote_event(self.remote_events.as_mut()), if self.remote_events.is_some() => {
                    Wake::Remote(event)
                }
                attempted = poll_attempt(self.attempt.as_mut()), if self.attempt.is_some() => {
                    Wake::Attempted(attempted)
                }
                _ = sleep_until(retry_at), if retry_at.is_some() => Wake::Retry,
                Some(_) = self.requests.join_next(), if !self.requests.is_empty() => Wake::Answered,
            };
            match wake {
                Wake::Shutdown => {
                    self.close_remote().await;
                    if !self.inner.shutdown.is_cancelled() {
                        // Stopped by a reload: the session parks, keeping what it holds.
                        let disconnect = self.local.disconnect(ReasonCode::Success, None);
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, disconnect).await;
                        info!("bridge stopped");
                    }
                    return End::Shutdown;
                }
                Wake::LocalRoom(false) => return End::LocalLost(None),
                Wake::LocalRoom(true) => send_all(
                    &self.local,
                    || self.relay.poll_local(),
                    &mut self.local_verdicts,
                ),
                Wake::RemoteRoom(open) => {
                    if let Some(remote) = &mut self.remote {
                        if open {
                            send_all(
                                &remote.client,
                                || self.relay.poll_remote(),
                                &mut self.remote_verdicts,
                            );
                        } else {
                            // Its events say why, next.
                            remote.closed = true;
                        }
                    }
                }
                Wake::LocalVerdict(verdict) => {
                    if let (Some((message, _)), Some(reason)) =
                        (self.local_verdicts.pop_front(), dropped(verdict))
                    {
                        debug!(%reason, topic = %message.topic, "the local client dropped a message");
                        self.relay.local_delivered(&message, reason);
                    }
                }
                Wake::RemoteVerdict(verdict) => {
                    if let (Some((message, _)), Some(reason)) =
                        (self.remote_verdicts.pop_front(), dropped(verdict))
                    {
                        debug!(%reason, topic = %message.topic, "the remote client dropped a message");
                        self.relay.remote_delivered(&message, reason);
                    }
                }
                Wake::Local(Some(Event::Publish(publish))) => self.relay.local_message(publish),
                Wake::Local(Some(Event::Delivered {
                    delivery, reason, ..
                })) => self.relay.local_delivered(&delivery.message, reason),
                Wake::Local(Some(Event::Closed { reason, .. })) => {
                    self.close_remote().await;
                    return End::LocalLost(Some(reason));
                }
                Wake::Local(None) => {
                    self.close_remote().await;
                    return End::LocalLost(None);
                }
                Wake::Remote(Some(Event::Publish(publish))) => self.relay.remote_message(publish),
                Wake::Remote(Some(Event::Delivered {
                    delivery, reason, ..
                })) => self.relay.remote_delivered(&delivery.message, reason),
                Wake::Remote(Some(Event::Closed { reason, by_server })) => {
                    self.remote_lost(Some((reason, by_server))).await;
                }
                Wake::Remote(None) => self.remote_lost(None).await,
                Wake::Local(Some(_)) | Wake::Remote(Some(_)) | Wake::Answered => {}
                Wake::Attempted(attempted) => {
                    self.attempt = None;
                    self.attempted_one(attempted);
                }
                Wake::Retry => self.start_attempt(),
            }
        }
    }

    /// Adds what the relay counted to the metrics.
    fn count(&mut self) {
        let counts = self.relay.take_counts();
        let m = &self.plan.metrics;
        m.messages_out.inc_by(counts.out);
        m.messages_in.inc_by(counts.in_);
        m.messages_dropped.inc_by(counts.dropped);
        if counts.dropped > 0 {
            self.inner.metrics.messages_dropped.inc_by(counts.dropped);
        }
    }

    /// Starts connecting to the next URL.
    fn start_attempt(&mut self) {
        self.retry_at = None;
        if self.attempted {
            self.plan.metrics.reconnects.inc();
        }
        self.attempted = true;
        let url = self.next_url % self.plan.targets.len().max(1);
        let bridge = self.plan.bridge.clone();
        let targets = self.plan.targets.clone();
        let config = remote_config(&bridge, &targets[url].url, self.private);
        self.plan
            .enter(State::Connecting, Some(targets[url].url.to_string()));
        // A copy: an attempt that fails consumes what it is given.
        let session = self.session.clone();
        self.attempt = Some(Box::pin(async move {
            let target = &targets[url];
            let result = match &target.dialer {
                Dialer::Client(connector) => {
                    mqttd_client::connect_to(connector, config, session).await
                }
                Dialer::Plugged(transport) => {
                    let open = transport.open(&bridge, &target.url);
                    match tokio::time::timeout(bridge.connect_timeout, open).await {
                        Ok(Ok(stream)) => mqttd_client::connect(stream, config, session).await,
                        Ok(Err(error)) => Err(ConnectError::Io(error)),
                        Err(_) => Err(ConnectError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the transport did not open in time",
                        ))),
                    }
                }
            };
            Attempted { url, result }
        }));
    }

    /// Takes a connection attempt's outcome: the remote connection is up, or the next URL (or
    /// the next round, after a backoff) is due.
    fn attempted_one(&mut self, attempted: Attempted) {
        let Attempted { url, result } = attempted;
        let shown = self.plan.targets[url].url.to_string();
        match result {
            Ok((client, events, ack)) => {
                let bridge = &self.plan.bridge;
                info!(
                    url = %shown,
                    version = %bridge.protocol,
                    session_present = ack.session_present,
                    "bridge connected"
                );
                let carried = match (&self.session, bridge.clean_start) {
                    (Some(session), false) => relay::carried(session, ack.session_present),
                    _ => HashSet::new(),
                };
                // The client holds it now.
                self.session = None;
                self.relay.remote_up(Limits::of(&ack), &carried);
                self.subscribe_remote(&client);
                self.backoff.reset();
                self.next_url = 0;
                self.plan.metrics.up.set(1);
                self.plan.enter(State::Connected, Some(shown));
                self.remote = Some(Remote {
                    client,
                    url,
                    closed: false,
                });
                self.remote_events = Some(events);
            }
            Err(ConnectError::Refused(ack))
                if self.private && ack.reason == ReasonCode::UnsupportedProtocolVersion =>
            {
                // Mosquitto's answer too: a broker that does not know the bridge flag.
                info!(url = %shown, "the remote broker refuses the bridge flag; connecting without it");
                self.private = false;
                self.next_url = url;
                self.retry_at = Some(tokio::time::Instant::now());
            }
            Err(error) => {
                warn!(url = %shown, %error, "bridge cannot connect");
                self.next_url = url + 1;
                let now = tokio::time::Instant::now();
                let error = format!("{shown}: {error}");
                if self.next_url < self.plan.targets.len() {
                    self.retry_at = Some(now);
                    self.plan.failed(error, None);
                } else {
                    self.next_url = 0;
                    let wait = self.backoff.next(random_unit());
                    self.retry_at = Some(now + wait);
                    self.plan.failed(error, Some(wait));
                }
            }
        }
    }

    /// The remote connection closed: its session is kept for the next one, which is tried
    /// after a backoff, from the first URL.
    async fn remote_lost(&mut self, why: Option<(ReasonCode, bool)>) {
        let (Some(remote), Some(events)) = (self.remote.take(), self.remote_events.take()) else {
            return;
        };
        self.relay.remote_down();
        self.remote_verdicts.clear();
        self.plan.metrics.up.set(0);
        let url = self.plan.targets[remote.url].url.to_string();
        let error = match why {
            Some((reason, by_server)) => {
                warn!(url = %url, %reason, by_server, "bridge disconnected");
                let by = if by_server {
                    "the remote broker"
                } else {
                    "the bridge"
                };
                format!("{url}: disconnected by {by}: {reason}")
            }
            None => {
                warn!(url = %url, "bridge disconnected");
                format!("{url}: connection lost")
            }
        };
        self.session = events.into_session().await;
        self.next_url = 0;
        let wait = self.backoff.next(random_unit());
        self.retry_at = Some(tokio::time::Instant::now() + wait);
        self.plan.failed(error, Some(wait));
    }

    /// Disconnects from the remote broker, keeping the session there.
    async fn close_remote(&mut self) {
        self.attempt = None;
        self.remote_events = None;
        self.remote_verdicts.clear();
        if let Some(remote) = self.remote.take() {
            let disconnect = remote.client.disconnect(ReasonCode::Success, None);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, disconnect).await;
            self.plan.metrics.up.set(0);
            let url = self.plan.targets[remote.url].url.to_string();
            info!(url = %url, "bridge disconnected at shutdown");
        }
    }
}

/// The client configuration towards `url`.
fn remote_config(bridge: &Bridge, url: &BridgeUrl, private: bool) -> ClientConfig {
    let mut config = ClientConfig::new(bridge.client_id.clone());
    config.version = bridge.protocol;
    config.clean_start = bridge.clean_start;
    config.keep_alive = bridge.keep_alive;
    (config.username, config.password) = url.credentials(bridge);
    if bridge.protocol.is_v5() {
        config.session_expiry_interval = bridge.session_expiry;
    }
    config.receive_maximum = bridge.max_inflight;
    config.auto_ack = false;
    config.connect_timeout = bridge.connect_timeout;
    config.bridge = private;
    config
}

/// Publications awaiting their client's verdict, oldest first (verdicts come in order).
type Verdicts = VecDeque<(Arc<Message>, Verdict)>;

/// Sends the commands `next` yields while the connection's queue has room; what finds none
/// stays queued for the next turn. QoS 1 and 2 publications join `verdicts`.
fn send_all(client: &Client, mut next: impl FnMut() -> Option<Command>, verdicts: &mut Verdicts) {
    while let Some(p) = client.try_reserve() {
        let Some(command) = next() else {
            return;
        };
        match command {
            Command::Publish(message) if message.qos == QoS::AtMostOnce => p.publish(message),
            Command::Publish(message) => {
                let verdict = p.publish_with_verdict(message.clone());
                verdicts.push_back((message, verdict));
            }
            Command::Ack(packet_id) => p.ack(packet_id, ReasonCode::Success),
        }
    }
}

/// The verdict on the oldest publication of `verdicts` (never, if there is none).
async fn oldest(verdicts: &mut Verdicts) -> Result<Enqueued, RequestError> {
    match verdicts.front_mut() {
        Some((_, verdict)) => verdict.await,
        None => std::future::pending().await,
    }
}

/// Whether a client's verdict means it dropped the message, and why: then the message never
/// completes, and counts as done. `None` also when the connection closed, after which it is
/// sent again.
fn dropped(verdict: Result<Enqueued, RequestError>) -> Option<ReasonCode> {
    match verdict {
        Ok(Enqueued::Sent | Enqueued::Queued | Enqueued::NotConnected) => None,
        Ok(Enqueued::QueueFull) => Some(ReasonCode::QuotaExceeded),
        Ok(Enqueued::Expired) => Some(ReasonCode::UnspecifiedError),
        Ok(Enqueued::TooLarge) => Some(ReasonCode::PacketTooLarge),
        Err(RequestError::Client(ClientError::QoSNotSupported(_))) => {
            Some(ReasonCode::QoSNotSupported)
        }
        Err(RequestError::Client(ClientError::RetainNotSupported)) => {
            Some(ReasonCode::RetainNotSupported)
        }
        Err(RequestError::Client(ClientError::NoPacketId)) => Some(ReasonCode::QuotaExceeded),
        Err(_) => None,
    }
}

async fn remote_reserve(remote: Option<&Remote>) -> Result<Permit<'_>, RequestError> {
    match remote {
        Some(r) => r.client.reserve().await,
        None => std::future::pending().await,
    }
}

async fn remote_event(events: Option<&mut Events>) -> Option<Event> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

async fn poll_attempt(attempt: Option<&mut Attempt>) -> Attempted {
    match attempt {
        Some(a) => a.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Logs the filters a SUBACK refused.
fn report_suback(
    side: &str,
    subscriptions: &[Subscription],
    ack: Result<mqttd_proto::SubAck, RequestError>,
) {
    match ack {
        Ok(ack) => {
            for (sub, reason) in subscriptions.iter().zip(&ack.reasons) {
                if reason.is_error() {
                    warn!(side, filter = %sub.filter.as_str(), %reason, "bridge subscription refused");
                }
            }
        }
        Err(error) => debug!(side, %error, "bridge subscription not answered"),
    }
}
