//! Which peers may connect to a node: an allow-list the endpoint itself checks, at the
//! earliest point iroh 1.4 lets an application look at a peer's proved identity.
//!
//! # Why after the TLS handshake, and not during it
//!
//! A peer's node id is its Ed25519 key, which it proves in the TLS 1.3 handshake with its
//! raw public key in its Certificate message: that message travels in Handshake packets,
//! encrypted, after the ClientHello, so nothing before the handshake (iroh's `Incoming`, the
//! ClientHello, the source address) says who the peer is. Inside the handshake only iroh's
//! own certificate verifier sees the key, and iroh 1.4 does not let applications into it. The
//! first hook it offers with the peer's id is `EndpointHooks::after_handshake`, which runs as
//! the handshake completes, inside the endpoint, before [`crate::Node::accept`]'s
//! [`crate::Incoming::accept`] returns the connection: a refused peer's connection is closed
//! there with [`REFUSED`], so the application never sees it, accepts none of its streams and
//! reads not a byte of what the peer may have sent after its Finished. The peer sees the
//! connection closed with that code and the reason `node not allowed`.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use iroh::endpoint::{AfterHandshakeOutcome, Connection, EndpointHooks, Side};
use tracing::info;

use crate::key::NodeId;

/// The QUIC application error code a node closes a refused peer's connection with: 0x87,
/// MQTT's reason code "not authorized", as the broker's listener says it.
pub const REFUSED: u32 = 0x87;

/// The reason sent with [`REFUSED`].
const REASON: &[u8] = b"node not allowed";

/// The node ids that may connect to a node, or any. Cheap to clone: clones share the list,
/// so that [`AllowList::set`] on one changes what the node checks from the next handshake on
/// (connections already accepted stay).
#[derive(Clone, Default)]
pub struct AllowList {
    /// `None`: any node.
    ids: Arc<RwLock<Option<Arc<HashSet<NodeId>>>>>,
}

impl fmt::Debug for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.snapshot() {
            None => f.write_str("AllowList(any)"),
            Some(ids) => write!(f, "AllowList({} nodes)", ids.len()),
        }
    }
}

impl AllowList {
    /// Any node may connect.
    pub fn any() -> Self {
        Self::default()
    }

    /// Only `ids` may connect (none, if it is empty).
    pub fn only(ids: impl IntoIterator<Item = NodeId>) -> Self {
        let list = Self::default();
        list.set(Some(ids.into_iter().collect()));
        list
    }

    /// Replaces the list; `None`: any node.
    pub fn set(&self, ids: Option<HashSet<NodeId>>) {
        let ids = ids.map(Arc::new);
        match self.ids.write() {
            Ok(mut guard) => *guard = ids,
            Err(poisoned) => *poisoned.into_inner() = ids,
        }
    }

    /// Whether `id` may connect.
    pub fn allows(&self, id: &NodeId) -> bool {
        self.snapshot().is_none_or(|ids| ids.contains(id))
    }

    /// The number of nodes listed; `None` for any.
    pub fn len(&self) -> Option<usize> {
        self.snapshot().map(|ids| ids.len())
    }

    /// Whether the list names no node and refuses every one.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    fn snapshot(&self) -> Option<Arc<HashSet<NodeId>>> {
        match self.ids.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The endpoint hook that checks incoming connections against the list. It holds no endpoint
/// (which would keep the endpoint alive forever).
#[derive(Debug)]
pub(crate) struct AllowHook(pub(crate) AllowList);

impl EndpointHooks for AllowHook {
    async fn after_handshake<'a>(&'a self, conn: &'a Connection) -> AfterHandshakeOutcome {
        // Connections this node dials are not its to refuse.
        if conn.side() != Side::Server {
            return AfterHandshakeOutcome::accept();
        }
        let id = NodeId(conn.remote_id());
        if self.0.allows(&id) {
            return AfterHandshakeOutcome::accept();
        }
        info!(node_id = %id, "node not on the allow-list: its connection is closed");
        AfterHandshakeOutcome::Reject {
            error_code: REFUSED.into(),
            reason: REASON.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeKey;

    #[test]
    fn a_list_shared_by_its_clones_allows_what_it_names() {
        let (a, b) = (NodeKey::generate().id(), NodeKey::generate().id());
        let list = AllowList::any();
        assert!(list.allows(&a) && list.len().is_none());
        let shared = list.clone();
        list.set(Some([a].into_iter().collect()));
        assert!(shared.allows(&a));
        assert!(!shared.allows(&b));
        assert_eq!(shared.len(), Some(1));
        assert!(AllowList::only([]).is_empty());
        assert!(!AllowList::only([]).allows(&a));
    }
}
