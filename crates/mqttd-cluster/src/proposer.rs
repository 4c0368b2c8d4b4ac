//! Group commit for Raft: what a node records while its previous proposal is under way goes
//! to the cluster as one entry, as the broker's disk store groups its
//! fsyncs. Each recorded command gets a ticket, numbered from 1 in recording order; when a
//! proposal ends, the tickets it carried are settled together, committed (on a majority of
//! nodes: durable) with the outcome of each command, or lost.
//!
//! One proposal is under way at a time, so commands are committed in the order they were
//! recorded. A proposal that fails (no leader, a forward that timed out) is tried again until
//! [`RETRY_FOR`] has passed, so a leader election costs a pause rather than the batch. An
//! ambiguous failure may have committed the batch already, so each batch is numbered
//! ([`Command::Sequenced`]): the state machine applies it once however often it is in the
//! log, and never after a later batch of the same node.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::{Command, NodeId, Outcome};

/// How long a batch is tried again before its tickets are lost.
pub const RETRY_FOR: Duration = Duration::from_secs(10);

/// The most commands in one entry: a larger backlog goes in several.
pub const MAX_BATCH: usize = 1024;

/// A proposal in flight: what [`Proposer::start`]'s `propose` returns.
pub type Proposal = Pin<Box<dyn Future<Output = Result<Outcome, String>> + Send>>;

/// How a batch of tickets ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The first ticket of the batch; the others follow it, one per command.
    pub first: u64,
    /// The last ticket of the batch.
    pub last: u64,
    /// Committed, with each command's outcome in ticket order; or lost, with why.
    pub result: Result<Vec<Outcome>, String>,
    /// When the batch was first proposed: it was not in the log before. A node that learns
    /// of a commit long after this may have been cut off meanwhile.
    pub proposed: tokio::time::Instant,
}

#[derive(Default)]
struct Pending {
    commands: Vec<Command>,
    /// The last ticket handed out.
    last: u64,
}

/// Records commands and proposes them in batches; cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Proposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer")
            .field("last", &self.lock().last)
            .finish_non_exhaustive()
    }
}

impl Proposer {
    /// Starts the proposing task on `tasks` for the node `origin` (its id and incarnation):
    /// `propose` submits one command to Raft (it is called with a [`Command::Sequenced`]),
    /// and `settled` is told how each batch ended, in ticket order. The task ends when
    /// `stop` is cancelled; what it had not proposed by then is settled as lost.
    pub fn start(
        tasks: &TaskTracker,
        stop: CancellationToken,
        origin: (NodeId, u64),
        propose: impl Fn(Command) -> Proposal + Send + Sync + 'static,
        settled: impl Fn(Settled) + Send + Sync + 'static,
    ) -> Self {
        let proposer = Self {
            pending: Arc::default(),
            wake: Arc::new(Notify::new()),
        };
        let run = proposer.clone();
        tasks.spawn(async move { run.run(stop, origin, propose, settled).await });
        proposer
    }

    /// Records `command`; returns its ticket.
    pub fn record(&self, command: Command) -> u64 {
        let mut pending = self.lock();
        pending.last += 1;
        pending.commands.push(command);
        let ticket = pending.last;
        drop(pending);
        self.wake.notify_one();
        ticket
    }

    /// The last ticket handed out.
    pub fn last_ticket(&self) -> u64 {
        self.lock().last
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up to [`MAX_BATCH`] recorded commands, with the ticket of the first.
    fn take(&self) -> Option<(u64, Vec<Command>)> {
        let mut pending = self.lock();
        if pending.commands.is_empty() {
            return None;
        }
        let n = pending.commands.len().min(MAX_BATCH);
        let rest = pending.commands.split_off(n);
        let batch = std::mem::replace(&mut pending.commands, rest);
        let first = pending.last + 1 - (pending.commands.len() + n) as u64;
        Some((first, batch))
    }

    async fn run(
        &self,
        stop: CancellationToken,
        (node, incarnation): (NodeId, u64),
        propose: impl Fn(Command) -> Proposal,
        settled: impl Fn(Settled),
    ) {
        let mut seq = 0;
        loop {
            if stop.is_cancelled() {
                self.lose_the_rest(&settled);
                return;
            }
            let Some((first, batch)) = self.take() else {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => {}
                    () = self.wake.notified() => continue,
                }
                self.lose_the_rest(&settled);
                return;
            };
            seq += 1;
            let last = first + batch.len() as u64 - 1;
            let count = batch.len();
            let proposed = tokio::time::Instant::now();
            let result = tokio::select! {
                r = propose_with_retries(&propose, Command::Sequenced { node, incarnation, seq, commands: batch }) => r,
                () = stop.cancelled() => Err("the node is stopping".to_owned()),
            };
            let result = result.and_then(|outcome| match outcome {
                Outcome::Batch(outcomes) if outcomes.len() == count => Ok(outcomes),
                other => Err(format!("a batch of {count} came back as {other:?}")),
            });
            let stopping = stop.is_cancelled();
            settled(Settled {
                first,
                last,
                result,
                proposed,
            });
            if stopping {
                self.lose_the_rest(&settled);
                return;
            }
        }
    }

    /// Settles what is still recorded as lost: the node stops, nobody will propose it.
    fn lose_the_rest(&self, settled: &impl Fn(Settled)) {
        while let Some((first, batch)) = self.take() {
            settled(Settled {
                first,
                last: first + batch.len() as u64 - 1,
                result: Err("the node is stopping".to_owned()),
                proposed: tokio::time::Instant::now(),
            });
        }
    }
}

/// Proposes `command`, trying again for up to [`RETRY_FOR`] (with a growing pause) while
/// it fails.
async fn propose_with_retries(
    propose: &impl Fn(Command) -> Proposal,
    command: Command,
) -> Result<Outcome, String> {
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    let mut pause = Duration::from_millis(20);
    loop {
        match propose(command.clone()).await {
            Ok(outcome) => return Ok(outcome),
            Err(e) if tokio::time::Instant::now() + pause >= deadline => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "proposal failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn retained(n: u8) -> Command {
        Command::DeleteRetained {
            topic: format!("t/{n}"),
        }
    }

    /// Commands recorded while a proposal is under way go in the next batch, in order, and
    /// every ticket is settled once, in order.
    #[tokio::test]
    async fn commands_recorded_meanwhile_share_the_next_entry() {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let proposer = {
            let gate = gate.clone();
            let seen = seen.clone();
            Proposer::start(
                &tasks,
                stop.clone(),
                (1, 1),
                move |command| {
                    let gate = gate.clone();
                    let seen = seen.clone();
                    Box::pin(async move {
                        let Command::Sequenced {
                            commands: batch, ..
                        } = command
                        else {
                            return Err("not a batch".to_owned());
                        };
                        seen.lock().unwrap().push(batch.len());
                        gate.acquire().await.unwrap().forget();
                        Ok(Outcome::Batch(vec![Outcome::Done; batch.len()]))
                    })
                },
                move |s| tx.send(s).unwrap(),
            )
        };
        assert_eq!(proposer.record(retained(1)), 1);
        // The first proposal waits at the gate; three more are recorded meanwhile.
        while seen.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        for n in 2..=4 {
            assert_eq!(proposer.record(retained(n)), u64::from(n));
        }
        gate.add_permits(2);
        let a = rx.recv().await.unwrap();
        let b = rx.recv().await.unwrap();
        assert_eq!((a.first, a.last), (1, 1));
        assert_eq!((b.first, b.last), (2, 4));
        assert_eq!(b.result, Ok(vec![Outcome::Done; 3]));
        assert_eq!(*seen.lock().unwrap(), [1, 3]);
        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }

    /// A proposal that fails is tried again; one that keeps failing past [`RETRY_FOR`] loses
    /// its tickets, and the next batch goes on.
    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_then_lost() {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let proposer = {
            let calls = calls.clone();
            let failing = failing.clone();
            Proposer::start(
                &tasks,
                stop.clone(),
                (1, 1),
                move |command| {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    let failing = failing.load(Ordering::SeqCst);
                    Box::pin(async move {
                        let Command::Sequenced {
                            commands: batch, ..
                        } = command
                        else {
                            return Err("not a batch".to_owned());
                        };
                        // The first try fails once (a leader election), then it works.
                        if failing || n == 0 {
                            return Err("no leader".to_owned());
                        }
                        Ok(Outcome::Batch(vec![Outcome::Done; batch.len()]))
                    })
                },
                move |s| tx.send(s).unwrap(),
            )
        };
        let _ = proposer.record(retained(1));
        let s = rx.recv().await.unwrap();
        assert_eq!((s.first, s.result), (1, Ok(vec![Outcome::Done])));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        failing.store(true, Ordering::SeqCst);
        let _ = proposer.record(retained(2));
        let s = rx.recv().await.unwrap();
        assert_eq!(s.first, 2);
        assert_eq!(s.result, Err("no leader".to_owned()));
        failing.store(false, Ordering::SeqCst);
        let _ = proposer.record(retained(3));
        let s = rx.recv().await.unwrap();
        assert_eq!((s.first, s.last), (3, 3));
        assert!(s.result.is_ok());
        // What is recorded when the node stops is lost, not left waiting.
        stop.cancel();
        let _ = proposer.record(retained(4));
        tasks.close();
        tasks.wait().await;
        while let Ok(s) = rx.try_recv() {
            assert!(s.result.is_err(), "{s:?}");
        }
    }
}
