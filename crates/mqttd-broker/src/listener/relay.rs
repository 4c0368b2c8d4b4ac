//! The `relay://` listener: mqttd-p2p's relay server (iroh-relay underneath) on the listener's
//! address, HTTPS on TCP and QUIC address discovery on UDP with the same port, serving the
//! nodes the `[relay]` table allows with the broker's certificates (followed across SIGHUP
//! reloads). It carries no MQTT: it forwards encrypted packets between mqttd nodes.

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use mqttd_p2p::{
    ClientRate, NodeId, NodeKey, RelayAccess, RelayServer, RelayServerConfig, RelayServerError,
    KEY_FILE,
};
use tracing::{info, warn};

use crate::broker::Inner;
use crate::config::{Config, Listener, ListenerKind};
use crate::tls::TlsAcceptor;

/// A bound relay listener.
#[derive(Debug)]
pub(crate) struct RelayListener {
    server: RelayServer,
}

impl RelayListener {
    /// Starts the relay on `listener`'s address with the admission rules of `config.relay`.
    pub(crate) async fn bind(
        listener: &Listener,
        config: &Config,
        tls: &TlsAcceptor,
    ) -> io::Result<Self> {
        let rules = &config.relay;
        let tls = tls.relay_server_config().map_err(io::Error::other)?;
        let mut relay = RelayServerConfig::new(listener.addr, tls);
        relay.access = match rules.allow_any {
            true => RelayAccess::Any,
            false => {
                let mut allow = rules
                    .allow
                    .iter()
                    .map(|id| {
                        id.parse::<NodeId>().map_err(|e| {
                            io::Error::new(io::ErrorKind::InvalidInput, format!("relay.allow: {e}"))
                        })
                    })
                    .collect::<io::Result<std::collections::HashSet<_>>>()?;
                // The broker's own p2p:// node uses its own relay (unless p2p.relays names
                // others), so the relay admits it.
                let has_node = config
                    .listeners()
                    .is_ok_and(|ls| ls.iter().any(|l| l.kind == ListenerKind::P2p));
                if has_node {
                    let key = NodeKey::load_or_create(&config.data_dir.join(KEY_FILE))
                        .map_err(io::Error::other)?;
                    allow.insert(key.id());
                }
                RelayAccess::Allow(allow)
            }
        };
        relay.max_clients = rules.max_clients;
        relay.client_rate = NonZeroU32::new(rules.client_rate).map(|rate| {
            let mut rate = ClientRate::new(rate);
            rate.burst_bytes = NonZeroU32::new(rules.client_burst);
            rate
        });
        relay.quic_discovery = rules.quic_discovery;
        let server = RelayServer::spawn(relay).await.map_err(|e| match e {
            RelayServerError::Bind { source, .. } => source,
            other => io::Error::other(other),
        })?;
        match (rules.allow.len(), rules.allow_any) {
            (_, true) => warn!(
                listener = %listener.url,
                "relay admits any node (relay.allow_any): its bandwidth is anyone's"
            ),
            (0, false) => warn!(
                listener = %listener.url,
                "relay admits no node yet: list node ids in relay.allow (`mqttd id` prints one)"
            ),
            (n, false) => info!(listener = %listener.url, allowed = n, "relay allow-list"),
        }
        Ok(Self { server })
    }

    /// The address HTTPS (and QUIC address discovery, on UDP) is served on.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Serves until the broker shuts down, then stops the relay.
    pub(crate) async fn run(self, inner: Arc<Inner>) {
        inner.shutdown.cancelled().await;
        self.server.shutdown().await;
    }
}
