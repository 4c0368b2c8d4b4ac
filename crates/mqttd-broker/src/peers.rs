//! The broker's peer-to-peer links, for the admin API: each node connection the `p2p://`
//! listener accepted or a `p2p://` bridge opened, registered while it lasts.
//!
//! A link holds a clone of the node connection, so its paths, round-trip time and QUIC
//! statistics are read from iroh when asked, never copied ahead of time. The [`Registered`]
//! guard its owner keeps removes it when the connection's task ends: the registry never keeps
//! a connection open.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

use mqttd_p2p::Connection;

/// Who opened a link, and what it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A client connected to the `p2p://` listener (MQTT).
    Client,
    /// A peer's pings to the `p2p://` listener.
    Ping,
    /// A `p2p://` bridge of this broker, to its remote broker.
    Bridge,
}

impl Role {
    /// The name the admin API shows.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Ping => "ping",
            Self::Bridge => "bridge",
        }
    }

    /// `inbound` if the peer opened the link, `outbound` if this broker did.
    pub(crate) fn direction(self) -> &'static str {
        match self {
            Self::Client | Self::Ping => "inbound",
            Self::Bridge => "outbound",
        }
    }
}

/// A link while it lasts.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) conn: Connection,
    pub(crate) role: Role,
    /// The bridge's name, or the listener's URL.
    pub(crate) name: Arc<str>,
    /// When the handshake completed.
    pub(crate) since: SystemTime,
}

/// The links open now, by registration order.
#[derive(Debug, Default)]
pub(crate) struct PeerLinks {
    next: AtomicU64,
    links: Mutex<BTreeMap<u64, Link>>,
}

/// Keeps a link in the registry; dropping it removes the link.
#[derive(Debug)]
pub(crate) struct Registered {
    links: Arc<PeerLinks>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.links.links.lock().remove(&self.id);
    }
}

impl PeerLinks {
    /// Registers `conn` until the returned guard is dropped.
    pub(crate) fn register(
        self: &Arc<Self>,
        conn: &Connection,
        role: Role,
        name: Arc<str>,
    ) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.links.lock().insert(
            id,
            Link {
                conn: conn.clone(),
                role,
                name,
                since: SystemTime::now(),
            },
        );
        Registered {
            links: self.clone(),
            id,
        }
    }

    /// The links registered now, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<Link> {
        self.links.lock().values().cloned().collect()
    }
}
