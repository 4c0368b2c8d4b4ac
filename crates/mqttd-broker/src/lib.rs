//! The mqttd broker as a library.
//!
//! The `mqttd` binary is a thin user of this crate; a Rust program can embed the same broker,
//! with [`Hooks`] for authentication, authorization and message interception that see which
//! transport each client came over.
//!
//! ```no_run
//! # async fn run() -> Result<(), mqttd_broker::StartError> {
//! let mut config = mqttd_broker::Config::default();
//! config.listen = vec!["tcp://127.0.0.1:0".into()];
//! let broker = mqttd_broker::Broker::builder(config).start().await?;
//! println!("listening on {:?}", broker.local_addrs());
//! broker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Design
//!
//! Each connection is a sans-IO machine, `core::ConnectionCore` (the protocol core of
//! `mqttd-proto` plus authentication, sessions, routing, the persist-then-acknowledge gate and
//! back-pressure, with time passed in), run by a thin async driver per transport (`drivers`).
//! TLS is a layer under the driver: the listener completes the handshake (rustls, behind an
//! atomic pointer that SIGHUP swaps) in the connection's task and hands the driver the
//! encrypted stream, with the client certificate's identity in the connection's [`Peer`].
//! Shared state lives in `broker`: a persistent subscription trie published
//! through an atomic pointer, so routing never takes a global lock; a registry of sessions,
//! each behind its own small lock; retained messages in a persistent trie of their own. A
//! message is shared as one `Arc<Message>` by every session it is routed to. Sessions outlive
//! connections: when a client goes away the broker keeps its session, queues messages for it
//! within its bounds, and runs its will-delay and expiry timers.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod access;
pub mod api;
pub mod auth;
pub mod bridge;
pub mod check;

mod broker;
pub mod cluster;
mod cluster_sessions;
mod cluster_storage;
pub mod config;
mod dashboard;
/// The broker's clock.
pub(crate) mod clock {
    use std::time::Instant;

    /// Now, by tokio's clock, so that tests with paused time move it; the same as
    /// `Instant::now()` otherwise.
    pub(crate) fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }
}
mod core;
mod drivers;
mod forwarding;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
mod http;
mod http3;
mod listener;
pub mod metrics;
#[cfg(feature = "p2p")]
mod peers;
pub mod reload;
pub mod retained;
#[cfg(test)]
mod sim;
pub mod storage;
mod sys;
mod tls;
pub mod topic_tree;
mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use access::{AccessControl, AccessError};
pub use bridge::{
    Bridge, BridgeChanges, BridgeConfigError, BridgeTransport, BridgeUrl, Direction, OpenStream,
    TopicRule,
};
pub use config::{
    Config, ConfigError, CongestionControl, Listener, ListenerKind, P2pConfig, QuicConfig,
    RelayConfig,
};
pub use hooks::{
    Action, ClientInfo, ConnectAttempt, Hooks, Intercept, NoHooks, Peer, Transport, Verdict,
};
pub use metrics::Metrics;
pub use reload::{ConfigSource, ReloadError, ReloadHook, ReloadReport};
pub use storage::{DiskStorage, Durability, MemoryStorage, Storage};
pub use tls::TlsError;

use broker::Inner;
use listener::{Admission, BoundListener};
use tls::TlsAcceptor;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The password or ACL file could not be loaded.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The data directory is unusable.
    #[error("data directory: {0}")]
    DataDir(#[from] std::io::Error),
    /// Stored state could not be recovered.
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    /// A listener could not bind.
    #[error("cannot listen on {url}: {source}")]
    Bind {
        /// The listener.
        url: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificates of the TLS-based listeners could not be loaded or generated.
    #[error("cannot serve {url}: {source}")]
    Tls {
        /// The first TLS-based listener (they share the certificates).
        url: String,
        /// Why, naming the file.
        source: TlsError,
    },
    /// A bridge cannot run: its TLS files cannot be loaded, or no transport serves a URL's
    /// scheme.
    #[error("bridge {bridge:?}: {reason}")]
    Bridge {
        /// The bridge.
        bridge: String,
        /// Why, naming the URL.
        reason: String,
    },
    /// The cluster node could not start (`[cluster]`: its certificates, its listener, its
    /// store).
    #[error("[cluster]: {0}")]
    Cluster(mqttd_cluster::NodeError),
}

/// Configures a broker before it starts.
pub struct BrokerBuilder {
    config: Config,
    hooks: Arc<dyn Hooks>,
    storage: Option<Arc<dyn Storage>>,
    bridge_transports: bridge::Transports,
    config_source: Option<ConfigSource>,
    reload_hook: Option<ReloadHook>,
}

impl BrokerBuilder {
    /// Installs hooks.
    pub fn hooks(mut self, hooks: impl Hooks) -> Self {
        self.hooks = Arc::new(hooks);
        self
    }

    /// Uses `storage` for durable state. By default the broker opens a [`DiskStorage`] in
    /// `data_dir/store` when `persistence` is on, and keeps state in memory only otherwise.
    pub fn storage(mut self, storage: impl Storage) -> Self {
        self.storage = Some(Arc::new(storage));
        self
    }

    /// Serves bridge URLs of `scheme` (`p2p`, say) with `transport`; `mqtt`, `mqtts`, `ws`,
    /// `wss` and `quic` are served by `mqttd-client` already.
    pub fn bridge_transport(mut self, scheme: &str, transport: impl BridgeTransport) -> Self {
        self.bridge_transports
            .insert(scheme.to_ascii_lowercase(), Arc::new(transport));
        self
    }

    /// Reads the configuration again on each reload ([`Broker::reload`], `POST
    /// /api/v1/reload`). Without it a reload reads the files the starting configuration names
    /// again, and keeps its settings.
    pub fn config_source(
        mut self,
        source: impl Fn() -> Result<Config, String> + Send + Sync + 'static,
    ) -> Self {
        self.config_source = Some(Arc::new(source));
        self
    }

    /// Calls `hook` with the new configuration after each reload that was applied, for what
    /// the program owns (its log filter, say); it returns the names of the parts it reloaded.
    pub fn on_reload(
        mut self,
        hook: impl Fn(&Config) -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.reload_hook = Some(Arc::new(hook));
        self
    }

    /// Loads the access files, recovers stored state, binds every listener and starts serving.
    pub async fn start(self) -> Result<Broker, StartError> {
        let listeners = self.config.listeners()?;
        let access = AccessControl::load(&self.config)?;
        let tls = match listeners.iter().find(|l| l.kind.uses_tls()) {
            Some(first) => Some(
                TlsAcceptor::load(&self.config.tls, &self.config.data_dir).map_err(|source| {
                    StartError::Tls {
                        url: first.url.clone(),
                        source,
                    }
                })?,
            ),
            None => None,
        };
        let max_connections = self.config.max_connections;
        let secret = load_or_create_secret(&self.config.data_dir.join(SCRAM_SECRET_FILE))?;
        let scram = auth::ScramServer::new(secret);
        // The store the broker opens itself counts its failures in the broker's metrics.
        let mut disk = None;
        let storage: Arc<dyn Storage> = match self.storage {
            Some(storage) => storage,
            None if self.config.persistence => {
                let opened = Arc::new(DiskStorage::open(
                    self.config.data_dir.join(STORE_DIR),
                    self.config.durability,
                    Duration::from_millis(self.config.sync_interval_ms.max(1)),
                )?);
                disk = Some(opened.clone());
                opened
            }
            None => Arc::new(MemoryStorage::default()),
        };
        let mut recovered = storage.recover()?;
        // In a cluster, persistent sessions go to Raft once the node has started.
        let cluster_storage = self.config.cluster.as_ref().map(|_| {
            cluster_storage::ClusterStorage::new(storage.clone(), self.config.max_queued_messages)
        });
        let storage: Arc<dyn Storage> = match &cluster_storage {
            Some(c) => c.clone(),
            None => storage,
        };
        let inner = Arc::new(Inner::new(self.config, self.hooks, access, scram, storage));
        if let Some(c) = cluster_storage {
            let _ = inner.cluster_storage.set(c);
        }
        if let Some(disk) = disk {
            disk.count_errors(inner.metrics.store_errors.clone());
        }
        #[allow(unused_mut)] // Without feature p2p.
        let mut transports = self.bridge_transports;
        // `p2p://` bridges over the broker's node, unless the program plugged its own in.
        #[cfg(feature = "p2p")]
        let p2p_bridges = match transports.contains_key(bridge::p2p::SCHEME) {
            true => None,
            false => {
                let p2p = Arc::new(
                    bridge::p2p::P2pBridges::new(&inner.config, inner.peers.clone()).map_err(
                        |e| StartError::Bridge {
                            bridge: "[p2p]".into(),
                            reason: e.to_string(),
                        },
                    )?,
                );
                transports.insert(bridge::p2p::SCHEME.into(), p2p.clone());
                Some(p2p)
            }
        };
        inner.bridges.set_transports(transports);
        // Before anything is served: a bridge that cannot run stops the broker.
        let mut bridges = Vec::with_capacity(inner.config.bridge.len());
        for b in &inner.config.bridge {
            let plan = inner
                .bridges
                .plan(b, inner.metrics.bridge(&b.name))
                .map_err(|reason| StartError::Bridge {
                    bridge: b.name.clone(),
                    reason,
                })?;
            bridges.push(plan);
        }
        for message in std::mem::take(&mut recovered.retained) {
            inner.retained.set(message);
        }
        if listeners
            .iter()
            .filter(|l| l.kind == ListenerKind::P2p)
            .count()
            > 1
        {
            return Err(StartError::Config(ConfigError::Listener {
                url: "p2p://".into(),
                reason: "one p2p:// listener at most: the broker has one node identity",
            }));
        }
        inner.restore_sessions(recovered);
        // Bridges before listeners: a message published as soon as the broker listens finds
        // the bridges' local sessions subscribed (on the first start, when no stored session
        // has the subscriptions yet). They dial their remote brokers from now on; `p2p://`
        // ones wait for the listeners below.
        let subscribed: Vec<_> = bridges
            .into_iter()
            .map(|plan| inner.bridges.start(&inner, plan))
            .collect();
        for subscribed in subscribed {
            if tokio::time::timeout(BRIDGE_SUBSCRIBE_TIMEOUT, subscribed)
                .await
                .is_err()
            {
                tracing::warn!("a bridge's local session is not subscribed yet; serving anyway");
            }
        }
        // The cluster node before the listeners: a node that cannot start (its certificates,
        // its port, its store) stops the broker. Joining and announcing run in the background.
        if let Some(config) = &inner.config.cluster {
            let cluster = cluster::start(
                config,
                &inner.config.data_dir,
                inner.metrics.cluster(),
                inner.shutdown.clone(),
                &inner.tasks,
            )
            .await
            .map_err(|e| {
                inner.shutdown.cancel();
                StartError::Cluster(e)
            })?;
            // Routes and forwarding: the subscriptions restored above are announced now, and
            // messages other nodes forward are delivered from here on.
            forwarding::attach(&inner, cluster.node().router());
            cluster_sessions::attach(&inner, &cluster);
            cluster::refuse_in_minority(&inner, &cluster);
            let _ = inner.cluster.set(cluster);
        }
        let admission = Arc::new(Admission::new(max_connections));
        // Peer-to-peer listeners last, so that they can use the broker's own relay.
        let mut order: Vec<usize> = (0..listeners.len()).collect();
        order.sort_by_key(|&i| listeners[i].kind == ListenerKind::P2p);
        let mut bound = Vec::new();
        let mut own_relay = None;
        #[cfg(feature = "p2p")]
        let mut node = None;
        #[cfg(feature = "p2p")]
        let mut p2p_allow = None;
        for i in order {
            let listener = &listeners[i];
            let bind_error = |source| {
                // The bridges started stop with the broker that could not start.
                inner.shutdown.cancel();
                StartError::Bind {
                    url: listener.url.clone(),
                    source,
                }
            };
            let socket = BoundListener::bind(
                listener,
                &inner.config,
                tls.as_ref(),
                &inner.metrics,
                own_relay,
            )
            .await
            .map_err(bind_error)?;
            let addr = socket.local_addr().map_err(bind_error)?;
            if listener.kind == ListenerKind::Relay {
                own_relay.get_or_insert(addr);
            }
            #[cfg(feature = "p2p")]
            if let Some(allow) = socket.p2p_allow() {
                p2p_allow = Some(allow);
            }
            #[cfg(feature = "p2p")]
            if let Some(n) = socket.node() {
                tracing::info!(listener = %listener.url, node_id = %n.id(), %addr, "listening");
                node = Some(n);
            } else {
                tracing::info!(listener = %listener.url, %addr, "listening");
            }
            #[cfg(not(feature = "p2p"))]
            tracing::info!(listener = %listener.url, %addr, "listening");
            socket.spawn(&inner, &admission, Arc::from(listener.url.as_str()));
            bound.push((i, listener.clone(), addr));
        }
        // In the configuration's order.
        bound.sort_by_key(|(i, ..)| *i);
        let bound: Vec<_> = bound.into_iter().map(|(_, l, a)| (l, a)).collect();
        let _ = inner.listeners.set(bound.clone());
        inner.tasks.spawn(sys::run(inner.clone()));
        // The bridges dial with the listener's node: one identity, one set of sockets.
        #[cfg(feature = "p2p")]
        if let Some(p2p) = &p2p_bridges {
            p2p.listeners_bound(node.clone());
        }
        let _ = inner.reloader.set(reload::Reloader::new(
            &inner,
            tls.clone(),
            #[cfg(feature = "p2p")]
            p2p_allow.clone(),
            self.config_source,
            self.reload_hook,
        ));
        Ok(Broker {
            inner,
            bound,
            tls,
            #[cfg(feature = "p2p")]
            node,
            #[cfg(feature = "p2p")]
            p2p_allow,
        })
    }
}

/// How long the start waits for a bridge's local session to be subscribed (it takes a round
/// trip on an in-memory stream; the bound is for a broker whose storage is stuck).
const BRIDGE_SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Directory in the data directory holding the store.
const STORE_DIR: &str = "store";

/// File in the data directory holding the secret that SCRAM derives fake salts from, so that
/// answers for unknown users stay the same across restarts.
const SCRAM_SECRET_FILE: &str = "scram-secret";

fn load_or_create_secret(path: &std::path::Path) -> std::io::Result<[u8; 32]> {
    if let Ok(bytes) = std::fs::read(path) {
        if let Ok(secret) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok(secret);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(std::io::Error::other)?;
    write_private(path, &secret)?;
    Ok(secret)
}

#[cfg(unix)]
fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}

/// A running broker.
pub struct Broker {
    inner: Arc<Inner>,
    bound: Vec<(Listener, SocketAddr)>,
    /// The TLS side of the TLS-based listeners, if any is configured.
    tls: Option<TlsAcceptor>,
    /// The node of the `p2p://` listener, if there is one.
    #[cfg(feature = "p2p")]
    node: Option<mqttd_p2p::Node>,
    /// Its allow-list (`p2p.allow`), which a reload replaces.
    #[cfg(feature = "p2p")]
    p2p_allow: Option<mqttd_p2p::AllowList>,
}

impl Broker {
    /// A builder for a broker with `config`.
    pub fn builder(config: Config) -> BrokerBuilder {
        BrokerBuilder {
            config,
            hooks: Arc::new(NoHooks),
            storage: None,
            bridge_transports: bridge::Transports::new(),
            config_source: None,
            reload_hook: None,
        }
    }

    /// Each listener with the address it is bound to (useful with port 0).
    pub fn local_addrs(&self) -> &[(Listener, SocketAddr)] {
        &self.bound
    }

    /// The address of the first listener of `kind`.
    pub fn addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.bound
            .iter()
            .find(|(l, _)| l.kind == kind)
            .map(|(_, a)| *a)
    }

    /// The node of the `p2p://` listener (its id is the one peers dial), if there is one.
    #[cfg(feature = "p2p")]
    pub fn node(&self) -> Option<&mqttd_p2p::Node> {
        self.node.as_ref()
    }

    /// The cluster node, when `[cluster]` is configured.
    pub fn cluster(&self) -> Option<&Arc<cluster::BrokerCluster>> {
        self.inner.cluster.get()
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Metrics {
        self.inner.refresh_gauges();
        &self.inner.metrics
    }

    /// Reloads what can change at runtime (what SIGHUP and `POST /api/v1/reload` do): the
    /// configuration (through [`BrokerBuilder::config_source`]), the password and ACL files,
    /// the certificates, the bridges and `[p2p]`'s allow-list. Everything is loaded and
    /// checked before anything is applied: on error nothing changes. Logs one line with the
    /// outcome and the settings that need a restart.
    pub fn reload(&self) -> ReloadReport {
        match self.inner.reloader.get() {
            Some(reloader) => reloader.reload(),
            None => ReloadReport::default(),
        }
    }

    /// Reloads the password and ACL files. On error the old rules stay.
    pub fn reload_access(&self) -> Result<(), AccessError> {
        let access = AccessControl::load(&self.inner.config)?;
        self.inner.auth.store(Arc::new(access));
        Ok(())
    }

    /// Whether a TLS-based listener is serving (and so [`Broker::reload_tls`] has work to do).
    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reads the TLS certificates, keys and client CA files again (what SIGHUP does): new
    /// connections get them, connections that are up keep theirs. On error the previous ones
    /// stay. Does nothing without a TLS-based listener.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// Applies the bridges of a reloaded configuration (what SIGHUP does): a bridge no longer
    /// configured stops (its session stays, with what is queued in it, for when it comes
    /// back), a new one starts, and one whose settings changed starts again with the new ones;
    /// the others, and every client connection, are untouched. Every new or changed bridge is
    /// checked first: if one cannot run, nothing changes and the error names it.
    pub fn reload_bridges(&self, bridges: &[Bridge]) -> Result<BridgeChanges, StartError> {
        let mut names = std::collections::HashSet::new();
        if let Some(twice) = bridges.iter().find(|b| !names.insert(&b.name)) {
            return Err(StartError::Bridge {
                bridge: twice.name.clone(),
                reason: "two bridges have this name".into(),
            });
        }
        self.inner
            .bridges
            .reload(&self.inner, bridges)
            .map_err(|(bridge, reason)| StartError::Bridge { bridge, reason })
    }

    /// Applies the `[p2p]` settings a reload may change (what SIGHUP does): `allow`, for the
    /// connections that come next (those up stay), and `use_node_id_as_username`, for the
    /// CONNECTs that come next. On error (a node id that does not parse) nothing changes.
    pub fn reload_p2p(&self, p2p: &P2pConfig) -> std::io::Result<()> {
        #[cfg(feature = "p2p")]
        {
            let allowed = listener::p2p::allowed(p2p)?;
            if let Some(allow) = &self.p2p_allow {
                allow.set(allowed);
            }
        }
        self.inner.node_id_as_username.store(
            p2p.use_node_id_as_username,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// Waits until [`Broker::shutdown`] is called from elsewhere.
    pub async fn closed(&self) {
        self.inner.shutdown.cancelled().await;
    }

    /// Stops accepting connections, sends DISCONNECT 0x8B to MQTT 5 clients, flushes what is
    /// pending and waits (up to 10 s) for every connection to close.
    pub async fn shutdown(self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after 10 s; exiting anyway");
        }
        self.inner.storage.close();
    }

    /// A handle that can trigger shutdown from another task.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.inner.shutdown.clone())
    }
}

/// Triggers a broker's shutdown.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(tokio_util::sync::CancellationToken);

impl ShutdownHandle {
    /// Starts the shutdown; [`Broker::shutdown`] completes it.
    pub fn trigger(&self) {
        self.0.cancel();
    }
}
