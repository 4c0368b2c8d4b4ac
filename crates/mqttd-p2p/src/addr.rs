//! Addresses: where a peer may be reached ([`NodeAddr`]) and the relays a node uses
//! ([`RelayUrl`]).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::key::NodeId;

/// A relay server's URL, `https://HOST:PORT`.
///
/// By mqttd's convention a relay serves QUIC address discovery (UDP) on the same port number
/// as HTTPS (TCP), so the URL says everything a node needs; [`RelayServer`] binds them so.
///
/// [`RelayServer`]: crate::RelayServer
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayUrl(pub(crate) iroh::RelayUrl);

/// A relay URL that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid relay URL {url:?}: {reason}")]
pub struct ParseRelayUrlError {
    url: String,
    reason: &'static str,
}

impl RelayUrl {
    /// The port of QUIC address discovery: the URL's port (443 when the URL has none).
    pub fn quic_port(&self) -> u16 {
        self.0.port_or_known_default().unwrap_or(443)
    }

    /// The client-side configuration iroh needs for this relay.
    pub(crate) fn to_config(&self) -> iroh::RelayConfig {
        iroh::RelayConfig::new(
            self.0.clone(),
            Some(iroh_relay::RelayQuicConfig::new(self.quic_port())),
        )
    }
}

impl FromStr for RelayUrl {
    type Err = ParseRelayUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseRelayUrlError {
            url: s.to_owned(),
            reason,
        };
        let url: iroh::RelayUrl = s.parse().map_err(|_| err("not a URL"))?;
        if url.scheme() != "https" {
            return Err(err("a relay is reached over https://"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(err("no host"));
        }
        Ok(Self(url))
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl fmt::Debug for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayUrl({})", &*self.0)
    }
}

/// Where a peer may be reached: its id, and any of a relay it is connected to and direct
/// addresses. [`Node::connect`] also tries the peer through the dialing node's own relays
/// (peers of one deployment share their relays), so neither is needed.
///
/// [`Node::connect`]: crate::Node::connect
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeAddr {
    /// The peer's id, which the handshake proves.
    pub id: NodeId,
    /// A relay the peer is connected to.
    pub relay: Option<RelayUrl>,
    /// UDP addresses the peer may be reached at directly.
    pub direct: Vec<SocketAddr>,
}

impl NodeAddr {
    /// The address of `id` with no relay and no direct address.
    pub fn new(id: NodeId) -> Self {
        Self {
            id,
            relay: None,
            direct: Vec::new(),
        }
    }

    /// With `relay` as the peer's relay.
    pub fn with_relay(mut self, relay: RelayUrl) -> Self {
        self.relay = Some(relay);
        self
    }

    /// With direct addresses added.
    pub fn with_direct(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.direct.extend(addrs);
        self
    }

    pub(crate) fn from_iroh(addr: &iroh::EndpointAddr) -> Self {
        Self {
            id: NodeId(addr.id),
            relay: addr.relay_urls().next().cloned().map(RelayUrl),
            direct: addr.ip_addrs().copied().collect(),
        }
    }

    pub(crate) fn to_iroh(&self) -> iroh::EndpointAddr {
        let relay = self
            .relay
            .iter()
            .map(|r| iroh::TransportAddr::Relay(r.0.clone()));
        let direct = self.direct.iter().map(|a| iroh::TransportAddr::Ip(*a));
        iroh::EndpointAddr::from_parts(self.id.0, relay.chain(direct))
    }
}

impl From<NodeId> for NodeAddr {
    fn from(id: NodeId) -> Self {
        Self::new(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_are_https_with_the_quic_port_of_the_url() {
        let url: RelayUrl = "https://127.0.0.1:4433".parse().unwrap();
        assert_eq!(url.quic_port(), 4433);
        assert_eq!(url.to_string(), "https://127.0.0.1:4433/");
        let url: RelayUrl = "https://relay.example".parse().unwrap();
        assert_eq!(url.quic_port(), 443);
        assert!("http://127.0.0.1:80".parse::<RelayUrl>().is_err());
        assert!("relay.example".parse::<RelayUrl>().is_err());
    }
}
