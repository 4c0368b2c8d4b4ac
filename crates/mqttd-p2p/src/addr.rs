//! Addresses: where a peer may be reached ([`NodeAddr`]) and the relays a node uses
//! ([`RelayUrl`]).
//!
//! A [`NodeAddr`] has a text form, for configuration files and command lines:
//! `[p2p://]NODE_ID[?relay=URL][&addr=IP:PORT]...`, the node id (64 hex digits), then at most
//! one relay the peer uses and any number of direct UDP addresses, as URL query parameters
//! (`%`, `&` and `#` in a value are percent-encoded). [`NodeAddr`]'s `Display` writes it
//! without the scheme; `FromStr` reads it with or without.

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

/// The scheme a [`NodeAddr`]'s text form may start with.
const SCHEME: &str = "p2p://";

/// A node address that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node address {text:?}: {reason}")]
pub struct ParseNodeAddrError {
    text: String,
    reason: String,
}

impl FromStr for NodeAddr {
    type Err = ParseNodeAddrError;

    /// Reads `[p2p://]NODE_ID[/][?relay=URL][&addr=IP:PORT]...`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseNodeAddrError {
            text: text.to_owned(),
            reason,
        };
        let rest = match text.get(..SCHEME.len()) {
            Some(scheme) if scheme.eq_ignore_ascii_case(SCHEME) => &text[SCHEME.len()..],
            _ => text,
        };
        let (id, query) = rest.split_once('?').unwrap_or((rest, ""));
        let id = id.strip_suffix('/').unwrap_or(id);
        let id: NodeId = id
            .parse()
            .map_err(|_| err(format!("{id:?} is no node id (64 hex digits)")))?;
        let mut addr = Self::new(id);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| err(format!("{pair:?} is not KEY=VALUE")))?;
            let value =
                percent_decode(value).ok_or_else(|| err(format!("bad escape in {pair:?}")))?;
            match key {
                "relay" if addr.relay.is_some() => return Err(err("more than one relay".into())),
                "relay" => addr.relay = Some(value.parse().map_err(|e| err(format!("{e}")))?),
                "addr" => addr.direct.push(
                    value
                        .parse()
                        .map_err(|_| err(format!("{value:?} is no IP:PORT")))?,
                ),
                other => return Err(err(format!("unknown parameter {other:?} (relay or addr)"))),
            }
        }
        Ok(addr)
    }
}

impl fmt::Display for NodeAddr {
    /// `NODE_ID[?relay=URL][&addr=IP:PORT]...`, which [`NodeAddr::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.id, f)?;
        let relay = self.relay.iter().map(|r| ("relay", r.to_string()));
        let direct = self.direct.iter().map(|a| ("addr", a.to_string()));
        for (i, (key, value)) in relay.chain(direct).enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            write!(f, "{sep}{key}={}", percent_encode(&value))?;
        }
        Ok(())
    }
}

/// `value` with the characters that would end it in a query (`&`, `#`) and `%` escaped.
fn percent_encode(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['%', '&', '#']) {
        return value.into();
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '%' => out.push_str("%25"),
            '&' => out.push_str("%26"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out.into()
}

/// `value` with `%XX` escapes decoded; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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

    fn id() -> NodeId {
        crate::NodeKey::generate().id()
    }

    #[test]
    fn a_node_address_reads_its_id_relay_and_direct_addresses() {
        let id = id();
        let addr: NodeAddr = format!(
            "p2p://{id}?relay=https://relay.example:4433&addr=192.0.2.1:7000&addr=[2001:db8::1]:7001"
        )
        .parse()
        .unwrap();
        assert_eq!(addr.id, id);
        assert_eq!(
            addr.relay.as_ref().map(ToString::to_string).as_deref(),
            Some("https://relay.example:4433/")
        );
        assert_eq!(
            addr.direct,
            [
                "192.0.2.1:7000".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:7001".parse().unwrap()
            ]
        );
        // The scheme and a slash after the id are optional; parameters too.
        assert_eq!(
            format!("{id}").parse::<NodeAddr>().unwrap(),
            NodeAddr::new(id)
        );
        assert_eq!(
            format!("P2P://{id}/").parse::<NodeAddr>().unwrap(),
            NodeAddr::new(id)
        );
        let only_addr: NodeAddr = format!("{id}?addr=127.0.0.1:1").parse().unwrap();
        assert_eq!(only_addr.relay, None);
        assert_eq!(only_addr.direct.len(), 1);
    }

    #[test]
    fn a_node_address_is_written_as_it_is_read() {
        let id = id();
        let cases = [
            NodeAddr::new(id),
            NodeAddr::new(id).with_relay("https://127.0.0.1:4433".parse().unwrap()),
            NodeAddr::new(id).with_direct(["10.0.0.1:5".parse().unwrap()]),
            NodeAddr::new(id)
                .with_relay("https://relay.example/path?a=1&b=%41#x".parse().unwrap())
                .with_direct(["10.0.0.1:5".parse().unwrap(), "[::1]:6".parse().unwrap()]),
        ];
        for addr in cases {
            let text = addr.to_string();
            assert!(text.starts_with(&id.to_string()), "{text}");
            assert_eq!(text.parse::<NodeAddr>().unwrap(), addr, "{text}");
            assert_eq!(format!("p2p://{text}").parse::<NodeAddr>().unwrap(), addr);
        }
        assert_eq!(
            NodeAddr::new(id)
                .with_relay("https://127.0.0.1:4433".parse().unwrap())
                .with_direct(["10.0.0.1:5".parse().unwrap()])
                .to_string(),
            format!("{id}?relay=https://127.0.0.1:4433/&addr=10.0.0.1:5")
        );
    }

    #[test]
    fn a_broken_node_address_says_what_is_wrong() {
        let id = id();
        for (text, reason) in [
            ("p2p://not-an-id".to_owned(), "no node id"),
            (format!("{id}?relay=http://relay"), "https"),
            (
                format!("{id}?relay=https://a&relay=https://b"),
                "more than one relay",
            ),
            (format!("{id}?addr=relay.example:1"), "no IP:PORT"),
            (format!("{id}?addr"), "KEY=VALUE"),
            (format!("{id}?port=1"), "unknown parameter"),
            (format!("{id}?addr=%zz"), "bad escape"),
        ] {
            let error = text.parse::<NodeAddr>().unwrap_err().to_string();
            assert!(error.contains(reason), "{text}: {error}");
        }
    }
}
