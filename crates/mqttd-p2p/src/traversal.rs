//! NAT traversal of one connection, phase by phase: the connection opens (through a relay or
//! straight to the peer), the node learns the peer's direct addresses (iroh starts hole
//! punching then, and again every 5 s while the candidates do not change: a constant of iroh
//! 1.4, not configurable), a direct path opens (the hole punch worked), a direct path carries
//! the data; or no direct path within a window, and the connection stays relayed.
//!
//! [`Traversal`] decides the phases from path observations and the time passed in, with no
//! I/O; [`crate::Node::watch_traversal`] feeds it a connection's path events and logs one line
//! per phase (target `mqttd_p2p::traversal`, with the peer's short id and the milliseconds
//! since the attempt began), and reports the phases and the bytes each kind of path carried.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use iroh::endpoint::{self, PathId};
use tracing::info;

use crate::node::{Connection, Node};

/// A phase of a connection's traversal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// The handshake ended, over a direct path or through a relay.
    Connected {
        /// Whether the connection began on a direct path.
        direct: bool,
    },
    /// The node knows direct addresses of the peer: hole punching starts.
    CandidatesKnown,
    /// A direct path opened: the hole punch (or a direct address) worked.
    DirectOpened,
    /// A direct path carries the data.
    DirectSelected,
    /// No direct path carried data within the window: the connection stays relayed (it may
    /// still move to a direct path later, which is then logged).
    StayedRelayed,
    /// The connection closed.
    Closed,
}

impl Phase {
    /// The phase's name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected { direct: true } => "connected_direct",
            Self::Connected { direct: false } => "connected_relay",
            Self::CandidatesKnown => "candidates_known",
            Self::DirectOpened => "direct_opened",
            Self::DirectSelected => "direct_selected",
            Self::StayedRelayed => "stayed_relayed",
            Self::Closed => "closed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a connection's traversal ended, decided once: direct when a direct path carried the
/// data within the window, else relay only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// A direct path carried the data within the window.
    Direct,
    /// No direct path within the window (or before the connection closed).
    RelayOnly,
}

/// A phase reached, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Step {
    /// The phase.
    pub phase: Phase,
    /// From the start of the attempt to the phase.
    pub elapsed: Duration,
    /// The outcome, if this step decided it.
    pub outcome: Option<Outcome>,
}

/// What a connection's paths did, as [`Traversal`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Observation {
    /// The handshake ended on a direct path or a relayed one.
    Connected {
        /// Whether the path is direct.
        direct: bool,
    },
    /// The peer's direct addresses are known.
    CandidatesKnown,
    /// A path opened.
    PathOpened {
        /// Whether the path is direct.
        direct: bool,
    },
    /// A path carries the data now.
    PathSelected {
        /// Whether the path is direct.
        direct: bool,
    },
    /// The connection closed.
    Closed,
}

/// The traversal of one connection, as a state machine: feed it [`Observation`]s with
/// [`Traversal::handle`] and wake it at [`Traversal::poll_timeout`]; it yields each phase once,
/// in order, from [`Traversal::poll_step`].
#[derive(Debug)]
pub struct Traversal {
    started: Instant,
    deadline: Instant,
    connected: bool,
    candidates: bool,
    direct_opened: bool,
    direct_selected: bool,
    outcome: Option<Outcome>,
    closed: bool,
    steps: VecDeque<Step>,
}

impl Traversal {
    /// The traversal of an attempt that began at `started`; a direct path must carry the data
    /// within `window` of it for the outcome to be [`Outcome::Direct`].
    pub fn new(started: Instant, window: Duration) -> Self {
        Self {
            started,
            deadline: started + window,
            connected: false,
            candidates: false,
            direct_opened: false,
            direct_selected: false,
            outcome: None,
            closed: false,
            steps: VecDeque::new(),
        }
    }

    /// Takes in what the connection's paths did at `now`.
    pub fn handle(&mut self, now: Instant, observation: Observation) {
        if self.closed {
            return;
        }
        match observation {
            Observation::Connected { direct } if !self.connected => {
                self.connected = true;
                self.push(now, Phase::Connected { direct });
                if direct {
                    self.direct_opened = true;
                    self.select_direct(now);
                }
            }
            Observation::CandidatesKnown if !self.candidates && !self.direct_selected => {
                self.candidates = true;
                self.push(now, Phase::CandidatesKnown);
            }
            Observation::PathOpened { direct: true } if !self.direct_opened => {
                self.direct_opened = true;
                self.push(now, Phase::DirectOpened);
            }
            Observation::PathSelected { direct: true } if !self.direct_selected => {
                if !self.direct_opened {
                    self.direct_opened = true;
                    self.push(now, Phase::DirectOpened);
                }
                self.select_direct(now);
            }
            Observation::Closed => {
                self.decide_relayed(now);
                self.closed = true;
                self.push(now, Phase::Closed);
            }
            _ => {}
        }
    }

    /// When the window ends, while the outcome is open.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.outcome.is_none() && !self.closed {
            true => Some(self.deadline),
            false => None,
        }
    }

    /// Wakes the machine at `now`: past the window with no direct path, the connection stays
    /// relayed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.deadline && !self.closed {
            self.decide_relayed(now);
        }
    }

    /// The next phase reached, oldest first.
    pub fn poll_step(&mut self) -> Option<Step> {
        self.steps.pop_front()
    }

    /// The outcome, once decided.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    /// Whether a direct path has carried the data.
    pub fn is_direct(&self) -> bool {
        self.direct_selected
    }

    fn select_direct(&mut self, now: Instant) {
        self.direct_selected = true;
        self.push(now, Phase::DirectSelected);
        if self.outcome.is_none() {
            self.outcome = Some(Outcome::Direct);
            if let Some(step) = self.steps.back_mut() {
                step.outcome = Some(Outcome::Direct);
            }
        }
    }

    fn decide_relayed(&mut self, now: Instant) {
        if self.outcome.is_none() {
            self.outcome = Some(Outcome::RelayOnly);
            self.push(now, Phase::StayedRelayed);
            if let Some(step) = self.steps.back_mut() {
                step.outcome = Some(Outcome::RelayOnly);
            }
        }
    }

    fn push(&mut self, now: Instant, phase: Phase) {
        self.steps.push_back(Step {
            phase,
            elapsed: now.saturating_duration_since(self.started),
            outcome: None,
        });
    }
}

/// What [`crate::Node::watch_traversal`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraversalEvent {
    /// A phase reached.
    Step(Step),
    /// Bytes a kind of path carried since the last report (UDP payload, both directions
    /// apart).
    Bytes {
        /// Whether the paths are direct (else relayed).
        direct: bool,
        /// Bytes sent.
        sent: u64,
        /// Bytes received.
        received: u64,
    },
}

/// How often the bytes of a connection's paths are looked at, besides at each path event.
const SAMPLE: Duration = Duration::from_secs(2);
/// How often the peer's direct addresses are looked for until they are known.
const CANDIDATES_POLL: Duration = Duration::from_millis(200);

/// Bytes seen so far on each open path, to report what grew.
#[derive(Default)]
struct Bytes {
    paths: HashMap<PathId, (bool, u64, u64)>,
}

impl Bytes {
    /// Records `stats` of path `id` and reports what grew.
    fn record(
        &mut self,
        id: PathId,
        direct: bool,
        stats: &endpoint::PathStats,
        report: &mut impl FnMut(TraversalEvent),
    ) {
        let (tx, rx) = (stats.udp_tx.bytes, stats.udp_rx.bytes);
        let seen = self.paths.entry(id).or_insert((direct, 0, 0));
        let (sent, received) = (tx.saturating_sub(seen.1), rx.saturating_sub(seen.2));
        *seen = (direct, seen.1.max(tx), seen.2.max(rx));
        if sent > 0 || received > 0 {
            report(TraversalEvent::Bytes {
                direct,
                sent,
                received,
            });
        }
    }

    fn sample(&mut self, conn: &endpoint::Connection, report: &mut impl FnMut(TraversalEvent)) {
        for path in conn.paths().iter() {
            self.record(path.id(), path.is_ip(), &path.stats(), report);
        }
    }
}

/// Runs the traversal of `conn` (begun at `started`) until it closes: see
/// [`crate::Node::watch_traversal`].
pub(crate) async fn watch(
    node: &Node,
    conn: Connection,
    started: Instant,
    window: Duration,
    mut report: impl FnMut(TraversalEvent) + Send,
) {
    let peer = conn.remote_id();
    let short = peer.fmt_short();
    let weak = conn.iroh().weak_handle();
    let mut events = conn.iroh().path_events();
    let mut machine = Traversal::new(started, window);
    let mut bytes = Bytes::default();
    let now = Instant::now();
    let direct = conn.selected_path().is_some_and(|p| p.kind.is_direct());
    machine.handle(now, Observation::Connected { direct });
    for path in conn.iroh().paths().iter() {
        if path.is_ip() {
            machine.handle(now, Observation::PathOpened { direct: true });
        }
    }
    // Only a weak handle from here on: the watch must not keep the connection open.
    drop(conn);
    let closed = weak.closed();
    tokio::pin!(closed);
    let mut sample = tokio::time::interval(SAMPLE);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut candidates = tokio::time::interval(CANDIDATES_POLL);
    loop {
        drain(&mut machine, short.as_str(), &mut report);
        let deadline = machine.poll_timeout().map(tokio::time::Instant::from_std);
        // Looked for until the outcome is decided: not for a connection's whole life.
        let look_for_candidates =
            !machine.candidates && !machine.is_direct() && machine.outcome().is_none();
        tokio::select! {
            _ = &mut closed => break,
            event = events.next() => {
                let Some(event) = event else { break };
                let now = Instant::now();
                match event {
                    endpoint::PathEvent::Opened { remote_addr, .. } => machine.handle(
                        now,
                        Observation::PathOpened { direct: remote_addr.is_ip() },
                    ),
                    endpoint::PathEvent::Selected { remote_addr, .. } => machine.handle(
                        now,
                        Observation::PathSelected { direct: remote_addr.is_ip() },
                    ),
                    endpoint::PathEvent::Closed { id, remote_addr, last_stats, .. } => {
                        bytes.record(id, remote_addr.is_ip(), &last_stats, &mut report);
                        // Counted to its end; a closed path is not listed again, so the
                        // table holds the open paths only, however often paths change.
                        bytes.paths.remove(&id);
                    }
                    _ => {}
                }
                if let Some(conn) = weak.upgrade() {
                    bytes.sample(&conn, &mut report);
                }
            }
            _ = sample.tick() => match weak.upgrade() {
                Some(conn) => bytes.sample(&conn, &mut report),
                None => break,
            },
            _ = candidates.tick(), if look_for_candidates => {
                let known = node
                    .endpoint()
                    .remote_info(peer.0)
                    .await
                    .is_some_and(|info| info.addrs().any(|a| a.addr().is_ip()));
                if known {
                    machine.handle(Instant::now(), Observation::CandidatesKnown);
                }
            }
            _ = sleep_until(deadline) => machine.handle_timeout(Instant::now()),
        }
    }
    if let Some(conn) = weak.upgrade() {
        bytes.sample(&conn, &mut report);
    }
    machine.handle(Instant::now(), Observation::Closed);
    drain(&mut machine, short.as_str(), &mut report);
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn drain(machine: &mut Traversal, peer: &str, report: &mut impl FnMut(TraversalEvent)) {
    while let Some(step) = machine.poll_step() {
        info!(
            target: "mqttd_p2p::traversal",
            peer,
            phase = step.phase.as_str(),
            elapsed_ms = step.elapsed.as_millis() as u64,
            outcome = step.outcome.map(|o| match o {
                Outcome::Direct => "direct",
                Outcome::RelayOnly => "relay_only",
            }),
            "p2p traversal"
        );
        report(TraversalEvent::Step(step));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(t: &mut Traversal) -> Vec<(Phase, u64, Option<Outcome>)> {
        std::iter::from_fn(|| t.poll_step())
            .map(|s| (s.phase, s.elapsed.as_millis() as u64, s.outcome))
            .collect()
    }

    const WINDOW: Duration = Duration::from_secs(10);

    #[test]
    fn a_relayed_connection_that_goes_direct() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = Traversal::new(t0, WINDOW);
        t.handle(ms(40), Observation::Connected { direct: false });
        t.handle(ms(45), Observation::PathSelected { direct: false });
        t.handle(ms(60), Observation::CandidatesKnown);
        t.handle(ms(61), Observation::CandidatesKnown);
        t.handle(ms(90), Observation::PathOpened { direct: true });
        assert_eq!(t.poll_timeout(), Some(ms(10_000)));
        t.handle(ms(95), Observation::PathSelected { direct: true });
        assert_eq!(t.poll_timeout(), None, "decided");
        t.handle(ms(200), Observation::Closed);
        t.handle(ms(300), Observation::Closed);
        assert_eq!(
            steps(&mut t),
            [
                (Phase::Connected { direct: false }, 40, None),
                (Phase::CandidatesKnown, 60, None),
                (Phase::DirectOpened, 90, None),
                (Phase::DirectSelected, 95, Some(Outcome::Direct)),
                (Phase::Closed, 200, None),
            ]
        );
        assert_eq!(t.outcome(), Some(Outcome::Direct));
    }

    #[test]
    fn a_direct_connection_is_direct_at_once() {
        let t0 = Instant::now();
        let mut t = Traversal::new(t0, WINDOW);
        t.handle(t0, Observation::Connected { direct: true });
        t.handle(t0, Observation::PathOpened { direct: true });
        t.handle(t0, Observation::PathSelected { direct: true });
        let phases: Vec<_> = steps(&mut t).into_iter().map(|s| s.0).collect();
        assert_eq!(
            phases,
            [Phase::Connected { direct: true }, Phase::DirectSelected]
        );
        assert_eq!(t.outcome(), Some(Outcome::Direct));
    }

    #[test]
    fn no_direct_path_within_the_window_stays_relayed() {
        let t0 = Instant::now();
        let mut t = Traversal::new(t0, WINDOW);
        t.handle(t0, Observation::Connected { direct: false });
        t.handle_timeout(t0 + Duration::from_secs(9));
        assert_eq!(t.outcome(), None, "not yet");
        t.handle_timeout(t0 + WINDOW);
        assert_eq!(t.outcome(), Some(Outcome::RelayOnly));
        // A late direct path is logged, the outcome stays.
        t.handle(t0 + WINDOW * 2, Observation::PathSelected { direct: true });
        assert_eq!(t.outcome(), Some(Outcome::RelayOnly));
        let phases: Vec<_> = steps(&mut t).into_iter().map(|s| (s.0, s.2)).collect();
        assert_eq!(
            phases,
            [
                (Phase::Connected { direct: false }, None),
                (Phase::StayedRelayed, Some(Outcome::RelayOnly)),
                (Phase::DirectOpened, None),
                (Phase::DirectSelected, None),
            ]
        );
    }

    #[test]
    fn closing_before_a_direct_path_is_relay_only() {
        let t0 = Instant::now();
        let mut t = Traversal::new(t0, WINDOW);
        t.handle(t0, Observation::Connected { direct: false });
        t.handle(t0 + Duration::from_secs(1), Observation::Closed);
        let phases: Vec<_> = steps(&mut t).into_iter().map(|s| s.0).collect();
        assert_eq!(
            phases,
            [
                Phase::Connected { direct: false },
                Phase::StayedRelayed,
                Phase::Closed
            ]
        );
        assert_eq!(t.outcome(), Some(Outcome::RelayOnly));
        assert_eq!(t.poll_timeout(), None);
    }
}
