//! mqttd's peer-to-peer layer: node identity, connections between nodes dialed by their
//! public key, the relay role, and path events. It is usable without the broker.
//!
//! # Design
//!
//! A [`Node`] is an [iroh] endpoint: QUIC (on noq, the QUIC stack the broker's `quic://`
//! listener already runs, so the binary carries one) whose TLS handshake proves each side's
//! Ed25519 key, so a peer is dialed by its [`NodeId`] and no certificate authority is
//! involved. iroh finds a path to the peer: a direct UDP path when the peer's addresses are
//! known and reachable (with hole punching through NATs), else through a relay, and it moves
//! a connection from the relay to a direct path as soon as one works, without the
//! application noticing. [`PathEvents`] reports each move, direct or relayed, with its RTT.
//!
//! Nothing public is used: a node contacts only the relays it is given ([`NodeConfig`]),
//! publishes and looks up nothing (no DNS, no pkarr), and maps no ports. Peers' addresses are
//! given ([`NodeAddr`]) or learned through the shared relays, which also tell each node the
//! address they see it at (QUIC address discovery). Any mqttd can serve as a relay
//! ([`RelayServer`], feature `relay-server`), for the nodes on its allow-list.
//!
//! The identity lives in `<data-dir>/node.key` ([`NodeKey::load_or_create`]).
//!
//! [`Pinger`] and [`serve_pings`] are a small protocol of their own ([`PING_ALPN`]): a node's
//! answers to pings, with the round-trip time and the path each came back on.
//!
//! The API keeps iroh's types inside, except the QUIC streams ([`SendStream`],
//! [`RecvStream`], [`ConnectionError`]) and statistics ([`ConnectionStats`], [`PathStats`]),
//! which are noq's, the types the broker's QUIC driver already reads and writes; [`Node::endpoint`] and [`Connection::iroh`] reach iroh itself.
//!
//! # Example
//!
//! ```no_run
//! use mqttd_p2p::{Node, NodeAddr, NodeConfig, NodeKey};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! const ALPN: &[u8] = b"example/1";
//! let mut config = NodeConfig::new(NodeKey::generate());
//! config.bind = vec!["127.0.0.1:0".parse()?];
//! config.alpns = vec![ALPN.to_vec()];
//! let server = Node::bind(config).await?;
//! let mut config = NodeConfig::new(NodeKey::generate());
//! config.bind = vec!["127.0.0.1:0".parse()?];
//! let client = Node::bind(config).await?;
//!
//! let to = NodeAddr::new(server.id()).with_direct(server.bound_addrs());
//! let conn = client.connect(to, ALPN).await?;
//! let (mut send, mut recv) = conn.open_bi().await?;
//! send.write_all(b"hello").await?;
//! send.finish()?;
//! # let _ = recv.read_to_end(1024).await?;
//! # Ok(())
//! # }
//! ```
//!
//! [iroh]: https://docs.rs/iroh/1.4

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod addr;
mod allow;
mod key;
pub mod nat;
mod node;
mod path;
mod ping;
#[cfg(feature = "relay-server")]
mod relay;
mod retry;
pub mod traversal;

pub use addr::{NodeAddr, ParseNodeAddrError, ParseRelayUrlError, RelayUrl};
pub use allow::{AllowList, REFUSED};
pub use key::{KeyError, NodeId, NodeKey, ParseNodeIdError, KEY_FILE};
pub use nat::NatType;
pub use node::{
    BindError, ConnectError, Connection, ConnectionError, ConnectionStats, Incoming, Node,
    NodeConfig, PathStats, RecvStream, RelayState, SendStream, StreamLimits, WeakConnection,
};
pub use path::{PathEvent, PathEvents, PathInfo, PathKind};
pub use ping::{serve_pings, PingError, Pinger, Pong, MAX_PINGS, PING_ALPN, PING_SIZE};
#[cfg(feature = "relay-server")]
pub use relay::{
    ClientRate, RelayAccess, RelayServer, RelayServerConfig, RelayServerError, RelayStats,
};
pub use retry::Retry;
pub use traversal::TraversalEvent;
