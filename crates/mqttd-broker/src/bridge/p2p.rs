//! Bridges over peer-to-peer links: the `p2p://` bridge transport (feature `p2p`).
//!
//! A URL `p2p://NODE_ID[?relay=URL][&addr=IP:PORT]...` ([`NodeAddr`]'s text form) names the
//! remote broker's node, and optionally a relay it uses and direct UDP addresses. The bridge
//! dials it with ALPN `mqtt` and runs MQTT over the connection's first stream, as a client of
//! the remote broker's `p2p://` listener.
//!
//! The dialing node has the broker's identity (`<data_dir>/node.key`), so that the remote
//! broker's `p2p.allow` (and `use_node_id_as_username`) can name it: it is the `p2p://`
//! listener's node when the broker has one, else a node bound for the bridges on first use
//! with the `[p2p]` relays and bind addresses, plus the relays the bridges' URLs name (a node
//! without any relay cannot use one). Relays are trusted with `p2p.relay_cafile` besides the
//! compiled-in roots. Connections live as long as the bridge's stream: dropping it closes
//! the connection; the node stays for the next one.

use std::collections::BTreeSet;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use mqttd_client::transport::QuicStream;
use mqttd_p2p::{Connection, Node, NodeAddr, NodeConfig, NodeKey};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, OnceCell};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, Instrument};

use super::{Bridge, BridgeTransport, BridgeUrl, OpenStream};
use crate::config::Config;
use crate::listener::p2p::{load_roots, ALPN_MQTT};
use crate::peers::{PeerLinks, Registered, Role};

/// The scheme this transport serves.
pub(crate) const SCHEME: &str = "p2p";

/// The `p2p://` bridge transport: one node for every bridge of the broker.
pub(crate) struct P2pBridges {
    /// Once the listeners are bound: the `p2p://` listener's node, if there is one.
    listener: watch::Sender<Option<Option<Node>>>,
    /// The bridges' own node, bound on first use when there is no listener's.
    own: OnceCell<Node>,
    /// How to bind the bridges' own node (its key is loaded then).
    config: NodeConfig,
    /// The key file.
    key_file: std::path::PathBuf,
    /// Where the bridges' links are registered for the admin API.
    links: Arc<PeerLinks>,
}

impl P2pBridges {
    /// The transport for `config`'s bridges. The relays and the relay CA file are read now,
    /// so that a mistake stops the broker; the node is bound later
    /// ([`Self::listeners_bound`] or first use), with the key of `<data_dir>/node.key`.
    pub(crate) fn new(config: &Config, links: Arc<PeerLinks>) -> io::Result<Self> {
        let p2p = &config.p2p;
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        // Replaced by the key file's when the node is bound.
        let mut node = NodeConfig::new(NodeKey::generate());
        node.bind = p2p.bind.clone();
        let mut relays = BTreeSet::new();
        for url in &p2p.relays {
            relays.insert(
                url.parse()
                    .map_err(|e| invalid(format!("p2p.relays: {e}")))?,
            );
        }
        // The relays the bridges name: the node must know at least one to use any.
        for url in config.bridge.iter().flat_map(|b| &b.urls) {
            if url.scheme() == SCHEME {
                if let Ok(NodeAddr {
                    relay: Some(relay), ..
                }) = url.as_str().parse::<NodeAddr>()
                {
                    relays.insert(relay);
                }
            }
        }
        node.relays = relays.into_iter().collect();
        if let Some(file) = &p2p.relay_cafile {
            node.relay_roots = load_roots(file)?;
        }
        Ok(Self {
            listener: watch::Sender::new(None),
            own: OnceCell::new(),
            config: node,
            key_file: config.data_dir.join(mqttd_p2p::KEY_FILE),
            links,
        })
    }

    /// The listeners are bound: dial with `node`, the `p2p://` listener's, or without one
    /// with a node of the bridges' own. Until then, dialing waits.
    pub(crate) fn listeners_bound(&self, node: Option<Node>) {
        self.listener.send_replace(Some(node));
    }

    async fn node(&self) -> io::Result<Node> {
        let mut bound = self.listener.subscribe();
        let listener = bound
            .wait_for(Option::is_some)
            .await
            .map_err(io::Error::other)?
            .clone()
            .flatten();
        if let Some(node) = listener {
            return Ok(node);
        }
        self.own
            .get_or_try_init(|| async {
                let mut config = self.config.clone();
                config.key = NodeKey::load_or_create(&self.key_file).map_err(io::Error::other)?;
                let node = Node::bind(config).await.map_err(io::Error::other)?;
                info!(
                    node_id = %node.id(),
                    bound = ?node.bound_addrs(),
                    relays = ?node.relays().iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "peer-to-peer node for bridges bound"
                );
                Ok(node)
            })
            .await
            .cloned()
    }
}

/// The remote node a `p2p://` bridge URL names.
pub(crate) fn node_addr(url: &BridgeUrl) -> Result<NodeAddr, String> {
    url.as_str().parse::<NodeAddr>().map_err(|e| e.to_string())
}

impl BridgeTransport for P2pBridges {
    fn check(&self, url: &BridgeUrl) -> Result<(), String> {
        node_addr(url).map(drop)
    }

    fn open<'a>(&'a self, bridge: &'a Bridge, url: &'a BridgeUrl) -> OpenStream<'a> {
        Box::pin(async move {
            let to = node_addr(url).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let node = self.node().await?;
            let conn = node
                .connect(to, ALPN_MQTT)
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e))?;
            let (send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
            let path = conn.selected_path().map(|p| p.kind.to_string());
            info!(node_id = %conn.remote_id(), path, "bridge peer-to-peer connection open");
            let watch =
                AbortOnDropHandle::new(tokio::spawn(log_paths(conn.clone()).in_current_span()));
            let registered =
                self.links
                    .register(&conn, Role::Bridge, Arc::from(bridge.name.as_str()));
            Ok(Box::new(P2pStream {
                stream: QuicStream::settled(send, recv),
                _registered: registered,
                _conn: conn,
                _watch: watch,
            })
                as Box<dyn mqttd_client::transport::ByteStream>)
        })
    }
}

/// Logs the moves of a bridge's connection between paths (relayed, direct) while it lasts.
async fn log_paths(conn: Connection) {
    let mut events = conn.path_events();
    while let Some(event) = events.next().await {
        match event {
            mqttd_p2p::PathEvent::Selected(path) => {
                info!(path = %path.kind, rtt_ms = path.rtt.as_millis(), "bridge path selected");
            }
            other => debug!(?other, "bridge path event"),
        }
    }
}

/// The bridge's stream on a node connection: the connection lives as long as the stream, and
/// the stream's shutdown waits until the remote has everything (the DISCONNECT included).
struct P2pStream {
    stream: QuicStream,
    /// The link in the admin API's list, while the stream lasts.
    _registered: Registered,
    _conn: Connection,
    /// The path logger, ended with the stream.
    _watch: AbortOnDropHandle<()>,
}

impl AsyncRead for P2pStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.stream), cx, buf)
    }
}

impl AsyncWrite for P2pStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.stream), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.stream), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.stream), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_p2p_bridge_url_names_the_node_its_relay_and_addresses() {
        let id = NodeKey::generate().id();
        let url: BridgeUrl = format!(
            "p2p://{id}?relay=https://relay.example:4433&addr=192.0.2.7:7000&addr=[::1]:7001"
        )
        .parse()
        .unwrap();
        assert_eq!(url.scheme(), "p2p");
        let addr = node_addr(&url).unwrap();
        assert_eq!(addr.id, id);
        assert_eq!(
            addr.relay.map(|r| r.to_string()).as_deref(),
            Some("https://relay.example:4433/")
        );
        assert_eq!(
            addr.direct,
            [
                "192.0.2.7:7000".parse::<std::net::SocketAddr>().unwrap(),
                "[::1]:7001".parse().unwrap()
            ]
        );
        let bare: BridgeUrl = format!("p2p://{id}").parse().unwrap();
        assert_eq!(node_addr(&bare).unwrap(), NodeAddr::new(id));
        for bad in [
            "p2p://nobody".to_owned(),
            format!("p2p://{id}?relay=http://relay.example"),
            format!("p2p://{id}?addr=host:1"),
        ] {
            let url: BridgeUrl = bad.parse().unwrap();
            assert!(node_addr(&url).is_err(), "{bad}");
        }
    }
}
