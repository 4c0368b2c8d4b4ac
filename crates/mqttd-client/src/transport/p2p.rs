//! MQTT over a peer-to-peer node connection (`p2p://NODE_ID`): an mqttd-p2p node (iroh 1.4,
//! on noq) dials the broker's node by its id, through relays or at direct addresses, with ALPN
//! `mqtt`. The connection's streams are noq's, so the QUIC transport's control stream and data
//! streams ([`super::quic`]) serve it unchanged; there is no 0-RTT (a node's first connection
//! to a peer is a full handshake).
//!
//! A [`P2p`] belongs to one [`super::Connector`] and is shared by its clones: one node (bound
//! on first use, since binding needs the runtime) carries every connection the connector
//! opens, as one device would.

use std::path::Path;

use mqttd_p2p::{ConnectError, Node, NodeAddr, NodeConfig, NodeId, NodeKey, RelayUrl, Retry};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::OnceCell;

use super::quic::{QuicConn, QuicConnection, ALPN};
use super::{Endpoint, TransportError};

/// The peer-to-peer side of a connector: the broker's address and the client node.
pub(super) struct P2p {
    /// The broker's node: its id and its direct addresses.
    peer: NodeAddr,
    /// How to bind the client node.
    config: NodeConfig,
    node: OnceCell<Node>,
}

impl P2p {
    /// Reads the endpoint's node id, relays, relay CA file and key file.
    pub(super) fn new(endpoint: &Endpoint) -> Result<Self, TransportError> {
        let bad = |e: &dyn std::fmt::Display| TransportError::P2pConfig(e.to_string());
        let options = &endpoint.p2p;
        let id: NodeId = endpoint.host.parse().map_err(|e| bad(&e))?;
        let relays = options
            .relays
            .iter()
            .map(|url| url.parse::<RelayUrl>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = match &options.key_file {
            Some(path) => load_key(path)?,
            None => NodeKey::generate(),
        };
        let mut config = NodeConfig::new(key);
        if let Some(file) = &options.relay_cafile {
            config.relay_roots = load_roots(file)?;
        }
        // The node dials through each of its relays too: peers of one deployment share their
        // relays, and the broker's node is at home on one of them.
        let peer = NodeAddr::new(id).with_direct(options.direct.iter().copied());
        config.relays = relays;
        Ok(Self {
            peer,
            config,
            node: OnceCell::new(),
        })
    }

    /// The client node's id, once bound.
    pub(super) fn node_id(&self) -> Option<String> {
        self.node.get().map(|n| n.id().to_string())
    }

    /// Dials the broker's node and opens the control stream, within the endpoint's time
    /// limit; a failed handshake is tried again with backoff and jitter ([`Retry`]) while
    /// the limit allows.
    pub(super) async fn connect(
        &self,
        endpoint: &Endpoint,
    ) -> Result<QuicConnection, TransportError> {
        let limit = endpoint.timeout;
        let dial = async {
            let node = self
                .node
                .get_or_try_init(|| Node::bind(self.config.clone()))
                .await
                .map_err(|e| TransportError::Quic(e.to_string()))?;
            let conn = node
                .connect_with_retry(self.peer.clone(), ALPN, &Retry::new(limit))
                .await
                .map_err(|e| connect_error(e, endpoint))?;
            let (send, recv) = conn.open_bi().await.map_err(open_error)?;
            Ok(QuicConnection::settled(
                QuicConn::P2p {
                    conn,
                    _node: node.clone(),
                },
                send,
                recv,
            ))
        };
        match tokio::time::timeout(limit, dial).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                endpoint: endpoint.to_string(),
                timeout: limit,
            }),
        }
    }

    /// The direct addresses the broker's node is dialed at.
    #[cfg(test)]
    fn direct(&self) -> &[std::net::SocketAddr] {
        &self.peer.direct
    }
}

/// The broker's node may refuse this one (0x87, not authorized: `p2p.allow`) right after the
/// handshake, before the control stream is opened; later, the stream's I/O error says so.
fn open_error(error: mqttd_p2p::ConnectionError) -> TransportError {
    match &error {
        mqttd_p2p::ConnectionError::ApplicationClosed(close)
            if u64::from(close.error_code) == u64::from(super::quic::NOT_AUTHORIZED) =>
        {
            TransportError::Refused(String::from_utf8_lossy(&close.reason).into_owned())
        }
        _ => TransportError::Quic(error.to_string()),
    }
}

fn connect_error(error: ConnectError, endpoint: &Endpoint) -> TransportError {
    match error {
        ConnectError::NoAddress(_) => TransportError::P2pConfig(format!(
            "no way to reach {endpoint}: give a relay (--relay) or a direct address (--peer-addr)"
        )),
        other => TransportError::Quic(format!("cannot connect to {endpoint}: {other}")),
    }
}

/// The key in `path`, created there (mode 0600) if there is none.
fn load_key(path: &Path) -> Result<NodeKey, TransportError> {
    NodeKey::load_or_create(path).map_err(|e| TransportError::P2pConfig(e.to_string()))
}

/// The certificates of a PEM file.
fn load_roots(file: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let bad = |e: &dyn std::fmt::Display| {
        TransportError::P2pConfig(format!("relay CA file {}: {e}", file.display()))
    };
    let roots = CertificateDer::pem_file_iter(file)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if roots.is_empty() {
        return Err(bad(&"no certificate in it"));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Transport;

    #[test]
    fn the_endpoint_says_where_the_broker_is() {
        let id = NodeKey::generate().id();
        let mut endpoint = Endpoint::new(Transport::P2p, id.to_string(), 0);
        endpoint.p2p.relays = vec!["https://127.0.0.1:4433".into()];
        endpoint.p2p.direct = vec!["127.0.0.1:7000".parse().unwrap()];
        let p2p = P2p::new(&endpoint).unwrap();
        assert_eq!(p2p.peer.id, id);
        assert_eq!(p2p.direct(), ["127.0.0.1:7000".parse().unwrap()]);
        // The relays are the client node's, which dials through every one of them.
        assert!(p2p.peer.relay.is_none());
        assert_eq!(
            p2p.config
                .relays
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["https://127.0.0.1:4433/"]
        );
        assert!(p2p.node_id().is_none(), "bound on first use");

        endpoint.host = "not-a-node".into();
        assert!(matches!(
            P2p::new(&endpoint),
            Err(TransportError::P2pConfig(_))
        ));
        endpoint.host = id.to_string();
        endpoint.p2p.relays = vec!["http://relay".into()];
        assert!(matches!(
            P2p::new(&endpoint),
            Err(TransportError::P2pConfig(_))
        ));
    }

    #[test]
    fn a_key_file_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        let first = load_key(&path).unwrap();
        assert_eq!(load_key(&path).unwrap().id(), first.id());
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(matches!(load_key(&path), Err(TransportError::P2pConfig(_))));
    }
}
