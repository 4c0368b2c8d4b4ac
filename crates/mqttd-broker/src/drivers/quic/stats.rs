//! A QUIC connection's statistics, as its driver reports them: added to the broker's counters
//! while the connection lives, and logged when it ends.
//!
//! noq keeps a connection's totals (packets and bytes sent and lost, frames sent) over all its
//! paths, closed ones included, so they only grow. Every `[quic] stats_interval`, and once
//! more at disconnect, the driver looks at them and adds to `/metrics` what grew since its
//! last look ([`QuicStats::fold`]): a long-lived connection counts as it goes, and nothing
//! counts twice.
//!
//! RTT, congestion window, MTU, congestion events and lost MTU probes belong to a path. The
//! `quic://` listener negotiates no multipath, so a connection has one path,
//! [`noq::PathId::ZERO`], and it
//! moves with the client: when the client's address changes (a NAT rebinding, another
//! network), noq validates the new address with a PATH_CHALLENGE and keeps the path id, with a
//! new RTT estimate and congestion window unless only the port of an IPv4 address changed. Its
//! statistics are therefore the current path's. Each look also compares the path's client
//! address with the one seen before: a change is logged ("QUIC path changed"), recorded as the
//! `peer` of the connection's span, and counted.
//!
//! A `p2p://` connection (iroh's multipath) has a relayed path and, once hole punching works,
//! a direct one: its statistics are those of the path carrying data at each look
//! ([`QuicConn::path_sample`]), and its client address is known only on a direct path, so a
//! move from the relay to a direct path counts as a change from the unspecified address.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use noq::{ConnectionStats, Path, PathStats};
use tracing::info;

use super::QuicConn;
use crate::metrics::Metrics;

/// A connection's counters as of one look; noq's only grow.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    sent_packets: u64,
    sent_bytes: u64,
    lost_packets: u64,
    lost_bytes: u64,
    /// The path's.
    lost_mtu_probes: u64,
    /// The path's.
    congestion_events: u64,
    path_challenges: u64,
}

impl Counts {
    /// The counts of `sample`; the path's stay as in `before` if its statistics are gone.
    fn of(sample: &Sample, before: &Self) -> Self {
        let conn = &sample.conn;
        let (lost_mtu_probes, congestion_events) = sample
            .path
            .as_ref()
            .map_or((before.lost_mtu_probes, before.congestion_events), |p| {
                (p.lost_plpmtud_probes, p.congestion_events)
            });
        Self {
            sent_packets: conn.sent_packets,
            sent_bytes: conn.sent_bytes,
            lost_packets: conn.lost_packets,
            lost_bytes: conn.lost_bytes,
            lost_mtu_probes,
            congestion_events,
            path_challenges: conn.frame_tx.path_challenge,
        }
    }

    /// Each count that is higher in `self` or `other`: what the counters hold once both are
    /// folded, so that a count that went back (it should not) is not added again.
    fn max(&self, other: &Self) -> Self {
        Self {
            sent_packets: self.sent_packets.max(other.sent_packets),
            sent_bytes: self.sent_bytes.max(other.sent_bytes),
            lost_packets: self.lost_packets.max(other.lost_packets),
            lost_bytes: self.lost_bytes.max(other.lost_bytes),
            lost_mtu_probes: self.lost_mtu_probes.max(other.lost_mtu_probes),
            congestion_events: self.congestion_events.max(other.congestion_events),
            path_challenges: self.path_challenges.max(other.path_challenges),
        }
    }

    /// Adds to `metrics` what grew from `before` to `self`.
    fn add_growth(&self, before: &Self, metrics: &Metrics) {
        let grew = |now: u64, then: u64| now.saturating_sub(then);
        metrics
            .quic_sent_packets
            .inc_by(grew(self.sent_packets, before.sent_packets));
        metrics
            .quic_sent_bytes
            .inc_by(grew(self.sent_bytes, before.sent_bytes));
        metrics
            .quic_lost_packets
            .inc_by(grew(self.lost_packets, before.lost_packets));
        metrics
            .quic_lost_bytes
            .inc_by(grew(self.lost_bytes, before.lost_bytes));
        metrics
            .quic_lost_mtu_probes
            .inc_by(grew(self.lost_mtu_probes, before.lost_mtu_probes));
        metrics
            .quic_congestion_events
            .inc_by(grew(self.congestion_events, before.congestion_events));
        metrics
            .quic_path_challenges
            .inc_by(grew(self.path_challenges, before.path_challenges));
    }
}

/// One look at a connection's statistics.
#[derive(Debug, Clone)]
struct Sample {
    /// The connection's totals.
    conn: ConnectionStats,
    /// The path's, unless they are gone.
    path: Option<PathStats>,
    /// The path's client address, unless the path is closed.
    peer: Option<SocketAddr>,
}

/// The client moved: from one address to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PathChange {
    from: SocketAddr,
    to: SocketAddr,
}

/// What a connection's driver keeps of its statistics between looks.
pub(super) struct QuicStats {
    /// The connection's path, held so that its statistics stay readable after it closes.
    path: Option<Path>,
    /// What the broker's counters hold of this connection's.
    folded: Counts,
    /// The client's address at the last look.
    peer: SocketAddr,
    /// Client address changes seen.
    path_changes: u64,
    /// Time between looks; zero: only at disconnect.
    interval: Duration,
    /// When to look next, if ever before disconnect.
    next_look: Option<Instant>,
}

impl QuicStats {
    /// The statistics of `conn`, from a client at `peer`, looked at every `interval` from
    /// `now` (never while it lives if zero).
    pub(super) fn new(
        conn: &impl QuicConn,
        peer: SocketAddr,
        interval: Duration,
        now: Instant,
    ) -> Self {
        Self {
            path: conn.first_path(),
            folded: Counts::default(),
            peer,
            path_changes: 0,
            interval,
            next_look: (!interval.is_zero()).then(|| now + interval),
        }
    }

    /// When the driver should look next, if before disconnect.
    pub(super) fn next_look(&self) -> Option<Instant> {
        self.next_look
    }

    /// Looks at `conn`'s statistics if it is time to, at `now`.
    pub(super) fn look_if_due(&mut self, now: Instant, conn: &impl QuicConn, metrics: &Metrics) {
        if self.next_look.is_some_and(|at| at <= now) {
            self.next_look = Some(now + self.interval);
            self.look(conn, metrics);
        }
    }

    /// Looks at `conn`'s statistics a last time, adds what grew to `metrics` and logs them.
    pub(super) fn finish(mut self, conn: &impl QuicConn, metrics: &Metrics) {
        let sample = self.look(conn, metrics);
        let path = sample.path.as_ref();
        let c = &self.folded;
        info!(
            rtt_ms = path.map_or(0, |p| p.rtt.as_millis() as u64),
            cwnd = path.map_or(0, |p| p.cwnd),
            mtu = path.map_or(0, |p| p.current_mtu),
            congestion_events = c.congestion_events,
            sent_packets = c.sent_packets,
            sent_bytes = c.sent_bytes,
            lost_packets = c.lost_packets,
            lost_bytes = c.lost_bytes,
            lost_mtu_probes = c.lost_mtu_probes,
            // Each new address the client was seen on is validated with a challenge:
            // migrations and NAT rebindings.
            path_challenges = c.path_challenges,
            path_changes = self.path_changes,
            "QUIC connection statistics"
        );
    }

    /// Reads `conn`'s statistics, folds them into `metrics`, and logs a change of the client's
    /// address (in the connection's span, whose `peer` it updates).
    fn look(&mut self, conn: &impl QuicConn, metrics: &Metrics) -> Sample {
        let (path, peer) = conn.path_sample(self.path.as_ref());
        let sample = Sample {
            conn: conn.stats(),
            path,
            peer,
        };
        if let Some(PathChange { from, to }) = self.fold(&sample, metrics) {
            info!(%from, %to, "QUIC path changed");
            tracing::Span::current().record("peer", tracing::field::display(to));
        }
        sample
    }

    /// Adds to `metrics` what grew since the last fold, observes the RTT, and notes a change
    /// of the client's address.
    fn fold(&mut self, sample: &Sample, metrics: &Metrics) -> Option<PathChange> {
        let counts = Counts::of(sample, &self.folded);
        counts.add_growth(&self.folded, metrics);
        self.folded = counts.max(&self.folded);
        if let Some(path) = &sample.path {
            metrics.quic_rtt_seconds.observe(path.rtt.as_secs_f64());
        }
        let to = sample.peer.filter(|&to| to != self.peer)?;
        let from = std::mem::replace(&mut self.peer, to);
        self.path_changes += 1;
        metrics.quic_path_changes.inc();
        Some(PathChange { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sent: u64, lost: u64, congestion: u64, peer: &str) -> Sample {
        let mut conn = ConnectionStats::default();
        conn.sent_packets = sent;
        conn.sent_bytes = sent * 1000;
        conn.lost_packets = lost;
        conn.lost_bytes = lost * 1000;
        conn.frame_tx.path_challenge = 1;
        let mut path = PathStats::default();
        path.congestion_events = congestion;
        path.rtt = Duration::from_millis(20);
        Sample {
            conn,
            path: Some(path),
            peer: Some(peer.parse().unwrap()),
        }
    }

    fn unlooked(peer: &str) -> QuicStats {
        QuicStats {
            path: None,
            folded: Counts::default(),
            peer: peer.parse().unwrap(),
            path_changes: 0,
            interval: Duration::from_secs(10),
            next_look: None,
        }
    }

    fn counter(metrics: &Metrics, name: &str) -> u64 {
        let text = metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    #[test]
    fn each_look_adds_what_grew_since_the_last_and_nothing_twice() {
        let metrics = Metrics::default();
        let mut a = unlooked("10.0.0.1:5000");
        let mut b = unlooked("10.0.0.2:5000");
        assert_eq!(a.fold(&sample(10, 1, 1, "10.0.0.1:5000"), &metrics), None);
        assert_eq!(b.fold(&sample(5, 0, 0, "10.0.0.2:5000"), &metrics), None);
        assert_eq!(a.fold(&sample(25, 3, 2, "10.0.0.1:5000"), &metrics), None);
        // The same totals again: nothing grew.
        a.fold(&sample(25, 3, 2, "10.0.0.1:5000"), &metrics);
        assert_eq!(counter(&metrics, "mqttd_quic_sent_packets_total"), 30);
        assert_eq!(counter(&metrics, "mqttd_quic_sent_bytes_total"), 30_000);
        assert_eq!(counter(&metrics, "mqttd_quic_lost_packets_total"), 3);
        assert_eq!(counter(&metrics, "mqttd_quic_lost_bytes_total"), 3000);
        assert_eq!(counter(&metrics, "mqttd_quic_congestion_events_total"), 2);
        assert_eq!(counter(&metrics, "mqttd_quic_path_challenges_total"), 2);
        assert_eq!(counter(&metrics, "mqttd_quic_rtt_seconds_count"), 4);
        assert_eq!(counter(&metrics, "mqttd_quic_path_changes_total"), 0);
    }

    #[test]
    fn a_count_that_goes_back_or_a_path_gone_adds_nothing_and_is_not_added_again() {
        let metrics = Metrics::default();
        let mut s = unlooked("10.0.0.1:5000");
        s.fold(&sample(10, 2, 2, "10.0.0.1:5000"), &metrics);
        // The path's statistics gone: its counts stay where they were.
        let mut gone = sample(12, 2, 0, "10.0.0.1:5000");
        gone.path = None;
        gone.peer = None;
        assert_eq!(s.fold(&gone, &metrics), None);
        assert_eq!(counter(&metrics, "mqttd_quic_congestion_events_total"), 2);
        // A path whose count went back, then grew past where it was.
        s.fold(&sample(12, 2, 1, "10.0.0.1:5000"), &metrics);
        s.fold(&sample(12, 2, 3, "10.0.0.1:5000"), &metrics);
        assert_eq!(counter(&metrics, "mqttd_quic_congestion_events_total"), 3);
        assert_eq!(counter(&metrics, "mqttd_quic_sent_packets_total"), 12);
        assert_eq!(counter(&metrics, "mqttd_quic_rtt_seconds_count"), 3);
    }

    #[test]
    fn a_new_client_address_is_a_path_change_once() {
        let metrics = Metrics::default();
        let mut s = unlooked("10.0.0.1:5000");
        let moved = PathChange {
            from: "10.0.0.1:5000".parse().unwrap(),
            to: "10.0.0.1:6000".parse().unwrap(),
        };
        assert_eq!(
            s.fold(&sample(1, 0, 0, "10.0.0.1:6000"), &metrics),
            Some(moved)
        );
        assert_eq!(s.fold(&sample(2, 0, 0, "10.0.0.1:6000"), &metrics), None);
        assert_eq!(s.path_changes, 1);
        assert_eq!(counter(&metrics, "mqttd_quic_path_changes_total"), 1);
    }
}
