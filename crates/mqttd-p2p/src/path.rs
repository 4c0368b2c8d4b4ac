//! Network paths of a connection: a connection to a peer starts on whatever path works first
//! (often through a relay) and iroh opens direct paths as hole punching succeeds, choosing
//! one path at a time for application data. [`PathEvents`] reports each path opened, chosen
//! or closed, saying whether it is direct or relayed and its round-trip time.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use iroh::endpoint::{self, PathId, WeakConnectionHandle};

use crate::addr::RelayUrl;

/// How a path reaches the peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PathKind {
    /// Straight to the peer's UDP address.
    Direct(SocketAddr),
    /// Through a relay server, which forwards the encrypted packets.
    Relayed(RelayUrl),
}

impl PathKind {
    /// Whether the path goes straight to the peer.
    pub fn is_direct(&self) -> bool {
        matches!(self, Self::Direct(_))
    }

    /// Whether the path goes through a relay.
    pub fn is_relayed(&self) -> bool {
        matches!(self, Self::Relayed(_))
    }

    pub(crate) fn from_transport(addr: &iroh::TransportAddr) -> Option<Self> {
        match addr {
            iroh::TransportAddr::Ip(a) => Some(Self::Direct(*a)),
            iroh::TransportAddr::Relay(url) => Some(Self::Relayed(RelayUrl(url.clone()))),
            // Custom transports are not configured by this crate.
            _ => None,
        }
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Direct(addr) => write!(f, "direct {addr}"),
            Self::Relayed(url) => write!(f, "relayed via {url}"),
        }
    }
}

/// One path of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PathInfo {
    /// Direct or relayed, and to where.
    pub kind: PathKind,
    /// The path's smoothed round-trip time (QUIC's initial estimate until the first sample).
    pub rtt: Duration,
    /// Whether the path is the one carrying application data.
    pub selected: bool,
}

/// A change to a connection's paths.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathEvent {
    /// A path was opened.
    Opened(PathInfo),
    /// The path now carries application data (the previous one, if any, is a backup).
    Selected(PathInfo),
    /// A path was closed; the RTT is its last.
    Closed(PathInfo),
    /// The reader fell behind and this many events were dropped; the paths as they are now
    /// are in [`crate::Connection::paths`].
    Lagged {
        /// Events dropped.
        missed: u64,
    },
}

/// The path events of one connection, from [`crate::Connection::path_events`].
///
/// It starts with the paths open when it was made (an `Opened` for each, then `Selected` for
/// the chosen one), so a reader that subscribes after the handshake still sees the first
/// path; an event that happens meanwhile may then come twice. It ends when the connection
/// closes, and does not keep the connection open.
pub struct PathEvents {
    conn: WeakConnectionHandle,
    start: VecDeque<PathEvent>,
    events: endpoint::PathEventStream,
}

impl fmt::Debug for PathEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathEvents")
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

impl PathEvents {
    pub(crate) fn new(conn: &endpoint::Connection) -> Self {
        // Subscribe before the snapshot, so that no change falls between the two.
        let events = conn.path_events();
        let paths = current_paths(conn);
        let mut start: VecDeque<_> = paths.iter().cloned().map(PathEvent::Opened).collect();
        start.extend(
            paths
                .into_iter()
                .filter(|p| p.selected)
                .map(PathEvent::Selected),
        );
        Self {
            conn: conn.weak_handle(),
            start,
            events,
        }
    }

    /// The next event; `None` once the connection is closed.
    pub async fn next(&mut self) -> Option<PathEvent> {
        if let Some(event) = self.start.pop_front() {
            return Some(event);
        }
        loop {
            let event = self.events.next().await?;
            if let Some(event) = self.translate(event) {
                return Some(event);
            }
        }
    }

    fn translate(&self, event: endpoint::PathEvent) -> Option<PathEvent> {
        match event {
            endpoint::PathEvent::Opened {
                id, remote_addr, ..
            } => Some(PathEvent::Opened(self.info(id, &remote_addr, false)?)),
            endpoint::PathEvent::Selected {
                id, remote_addr, ..
            } => Some(PathEvent::Selected(self.info(id, &remote_addr, true)?)),
            endpoint::PathEvent::Closed {
                remote_addr,
                last_stats,
                ..
            } => Some(PathEvent::Closed(PathInfo {
                kind: PathKind::from_transport(&remote_addr)?,
                rtt: last_stats.rtt,
                selected: false,
            })),
            endpoint::PathEvent::Lagged { missed, .. } => Some(PathEvent::Lagged { missed }),
            _ => None,
        }
    }

    fn info(&self, id: PathId, addr: &iroh::TransportAddr, selected: bool) -> Option<PathInfo> {
        let rtt = self
            .conn
            .upgrade()
            .and_then(|conn| conn.rtt(id))
            .unwrap_or_default();
        Some(PathInfo {
            kind: PathKind::from_transport(addr)?,
            rtt,
            selected,
        })
    }
}

/// The connection's open paths now.
pub(crate) fn current_paths(conn: &endpoint::Connection) -> Vec<PathInfo> {
    conn.paths()
        .iter()
        .filter_map(|path| {
            Some(PathInfo {
                kind: PathKind::from_transport(path.remote_addr())?,
                rtt: path.rtt(),
                selected: path.is_selected(),
            })
        })
        .collect()
}
