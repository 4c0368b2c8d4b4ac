//! An in-memory broker for the `broker` fuzz target (`fuzz/`): the real shared state and the
//! real connection tasks ([`crate::drivers::stream`] around [`crate::core`]), with `tokio::io::duplex` streams standing in
//! for sockets, so that a fuzz input can play several clients against the broker without a
//! network. Not part of the API.
//!
//! Meant for a current-thread runtime with paused time: connection tasks run only while the
//! harness waits, and the broker's tokio timers (lingering, takeover waits, back-pressure
//! retries) advance as soon as everything is idle.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::DuplexStream;

use crate::access::AccessControl;
use crate::auth::ScramServer;
use crate::broker::Inner;
use crate::config::Config;
use crate::hooks::{NoHooks, Peer, Transport};
use crate::metrics::Metrics;
use crate::storage::MemoryStorage;

/// Bytes each direction of an in-memory connection holds: far more than a fuzz input sends or
/// receives, so that neither side ever waits for the other to read.
pub const STREAM_BUFFER: usize = 1 << 20;

/// A configuration with small limits, so that a short input reaches them: few messages in
/// flight per client, a small receive maximum and few topic aliases. Anonymous access, no
/// persistence.
pub fn small_config() -> Config {
    Config {
        allow_anonymous: Some(true),
        max_inflight_messages: 4,
        receive_maximum: 4,
        topic_alias_maximum: 2,
        max_packet_size: 4096,
        max_topic_levels: 8,
        persistence: false,
        ..Config::default()
    }
}

/// A broker with in-memory storage, no listeners and no `$SYS` publisher.
pub struct FuzzBroker {
    inner: Arc<Inner>,
    opened: u16,
}

impl FuzzBroker {
    /// A broker with `config`, anonymous clients allowed.
    pub fn new(config: Config) -> Self {
        let access = AccessControl {
            anonymous: true,
            ..AccessControl::default()
        };
        let inner = Inner::new(
            config,
            Arc::new(NoHooks),
            access,
            ScramServer::new([0; 32]),
            Arc::new(MemoryStorage::default()),
        );
        Self {
            inner: Arc::new(inner),
            opened: 0,
        }
    }

    /// Opens a connection: spawns the broker's connection task on the current runtime with
    /// one end of an in-memory stream and returns the other end, the client's.
    pub fn connect(&mut self) -> DuplexStream {
        let (client, server) = tokio::io::duplex(STREAM_BUFFER);
        self.opened = self.opened.wrapping_add(1);
        let peer = Peer::new(
            Transport::Tcp,
            ([127, 0, 0, 1], self.opened).into(),
            Arc::from("fuzz"),
        );
        self.inner.tasks.spawn(crate::drivers::stream::serve(
            self.inner.clone(),
            server,
            peer,
        ));
        client
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Shuts the broker down as [`crate::Broker::shutdown`] does and waits up to `limit` for
    /// every connection and session timer task to end; whether they all did.
    pub async fn shutdown(&self, limit: Duration) -> bool {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        let done = tokio::time::timeout(limit, self.inner.tasks.wait())
            .await
            .is_ok();
        self.inner.storage.close();
        done
    }
}

/// Drives the QUIC listener's anti-amplification guard with arbitrary datagrams received from
/// and sent to a few addresses (IPv4, IPv6 and IPv4-mapped ones), connection attempts, Retries
/// and the passing of time, read from `data` as a script. The guard sees peer bytes before noq
/// does: it must never panic, never allow more than a send holds, allow only whole datagrams of
/// a GSO batch, and never track more addresses than its capacity.
pub fn quic_guard(data: &[u8]) {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::time::Instant;

    use crate::listener::quic::guard::Guard;

    const CAPACITY: usize = 4;
    let v4 = |last, port| SocketAddr::from((Ipv4Addr::new(192, 0, 2, last), port));
    let v6 =
        |last, port| SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last), port));
    let addrs: [SocketAddr; 6] = [
        v4(1, 4433),
        v4(1, 4434),
        v4(2, 4433),
        SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped(), 4433)),
        v6(1, 4433),
        v6(2, 9),
    ];
    let mut guard = Guard::new(&[1], Duration::from_secs(10), CAPACITY);
    let mut now = Instant::now();
    let mut rest = data;
    while let [op, who, hi, lo, tail @ ..] = rest {
        let addr = addrs[usize::from(*who) % addrs.len()];
        let len = (usize::from(*hi) << 8 | usize::from(*lo)).min(tail.len());
        let (body, next) = tail.split_at(len);
        match op % 6 {
            0 => {
                let _ = guard.received(now, addr, body);
            }
            1 => {
                let _ = guard.attempt(now, addr, op & 0x80 != 0);
            }
            2 => guard.forget(addr),
            3 => {
                let segment = usize::from(op >> 3) * 50;
                let segment = (segment > 0).then_some(segment);
                let allowed = guard.send(now, addr, body, segment);
                assert!(allowed <= body.len(), "allowed {allowed} of {}", body.len());
                if let Some(segment) = segment {
                    assert!(
                        allowed == body.len() || allowed.is_multiple_of(segment),
                        "allowed {allowed} of {} is not whole {segment}-byte datagrams",
                        body.len()
                    );
                }
            }
            4 => guard.unsend(addr, body, len),
            _ => now += Duration::from_millis(u64::from(*lo) * 50),
        }
        assert!(guard.len() <= CAPACITY, "{} tracked", guard.len());
        rest = next;
    }
}
