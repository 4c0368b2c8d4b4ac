//! The parking lot: idle TCP connections without a task of their own.
//!
//! Most connections are idle most of the time, and a connection's task (its future: a select
//! over shutdown, the mailbox, the socket, storage, room and a timer, with tokio's `Sleep` and
//! two `Notified` in it) is most of what an idle one holds. A TCP connection whose core has
//! been idle ([`ConnectionCore::is_idle`]) for [`PARK_AFTER`] is handed here by its driver,
//! which then ends: the lot keeps the boxed core, the socket, the tracing span and the
//! connection permit in one slab entry, and one task watches all of them with shared
//! machinery:
//!
//! - the sockets are in the lot's own epoll set (level-triggered, read readiness and the
//!   peer's end of stream or an error), whose one descriptor is registered with tokio's
//!   reactor: a parked socket is a plain `std` socket, without tokio's per-socket
//!   registration (`ScheduledIo`, 256 bytes with its allocation), which it gets again when
//!   its task does ([`TcpStream::from_std`]);
//! - each entry has a small [`Waker`] (its slab key and generation) registered with its
//!   [`Mailbox`] ([`Mailbox::wake_on_arrival`]); waking it queues the key and wakes the lot's
//!   task;
//! - the entries' deadlines (the core's [`ConnectionCore::poll_timeout`]: keep alive) are in
//!   one ordered set, behind one `Sleep`;
//! - the lot watches the broker's shutdown once.
//!
//! A parked connection gets its task back (the driver is spawned again with its state) when
//! bytes or an end of stream arrive, its mailbox gets a delivery or a takeover, its deadline
//! passes, or the broker shuts down. Everything then happens in the driver as before: parking
//! only changes who waits. A wake-up comes straight from the socket's or the mailbox's
//! signal, so deliveries to a parked subscriber are not delayed by any polling interval.
//!
//! The core is kept in its smallest form while nothing is going on
//! ([`ConnectionCore::park`]), and made again when the connection gets its task back.
//!
//! [`ConnectionCore`]: crate::core::ConnectionCore
//! [`ConnectionCore::is_idle`]: crate::core::ConnectionCore::is_idle
//! [`ConnectionCore::poll_timeout`]: crate::core::ConnectionCore::poll_timeout
//! [`ConnectionCore::park`]: crate::core::ConnectionCore::park
//! [`Mailbox`]: crate::broker::Mailbox
//! [`Mailbox::wake_on_arrival`]: crate::broker::Mailbox::wake_on_arrival

use std::collections::BTreeSet;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Weak};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::event::Timespec;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::stream::resume;
use crate::broker::Inner;
use crate::core::ParkedCore;

/// How long a connection stays idle before its driver parks it. Parking and waking again
/// cost a task spawn and a few locks (microseconds), so a connection that exchanges packets
/// more often than this keeps its task. It is short because the memory a burst of new
/// connections needs is the tasks alive at once: connections arriving at R per second hold
/// about R x `PARK_AFTER` tasks, and the allocator keeps that peak for reuse.
pub(crate) const PARK_AFTER: Duration = Duration::from_millis(100);

/// Events taken from the lot's epoll set at a time.
const EVENTS: usize = 256;

/// A connection without a task: all it needs to be driven again.
pub(crate) struct Parked {
    /// In its smallest form if nothing is going on ([`ConnectionCore::park`]).
    pub(crate) core: ParkedCore,
    /// Out of tokio's reactor while parked (see [`detach`]).
    pub(crate) stream: std::net::TcpStream,
    pub(crate) span: tracing::Span,
    pub(crate) permit: Option<OwnedSemaphorePermit>,
}

/// The parked connections of one TCP listener, and what wakes them. See the module
/// documentation.
pub(crate) struct ParkingLot {
    state: Mutex<State>,
    /// The parked sockets' epoll set, each with its key and generation as its data.
    epoll: AsyncFd<OwnedFd>,
    /// Keys (and generations) whose waker was woken, for the lot's task to take.
    ready: Mutex<Vec<(u32, u32)>>,
    /// Wakes the lot's task: keys are ready, or an earlier deadline came.
    notify: Notify,
    /// The broker's count of parked connections.
    parked: Gauge,
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    /// Vacant slots.
    free: Vec<u32>,
    /// The parked connections' deadlines, with their keys.
    deadlines: BTreeSet<(Instant, u32)>,
    /// Set at shutdown, once every parked connection got its task back: nothing parks any more.
    closed: bool,
}

#[derive(Default)]
struct Slot {
    /// Counts the slot's occupants, so that a stale waker wakes nobody.
    generation: u32,
    entry: Option<Entry>,
}

struct Entry {
    parked: Parked,
    deadline: Option<Instant>,
}

/// A parked connection's waker: rings its slot, if the lot and the same occupant are still
/// there. Holds the lot weakly: the lot holds the mailbox that holds this.
struct Doorbell {
    lot: Weak<ParkingLot>,
    key: u32,
    generation: u32,
}

impl Wake for Doorbell {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(lot) = self.lot.upgrade() {
            lot.ready.lock().push((self.key, self.generation));
            lot.notify.notify_one();
        }
    }
}

impl ParkingLot {
    /// An empty lot, counting its connections in `parked`; [`Self::run`] watches it. Fails
    /// if its epoll set cannot be made or registered with tokio's reactor (must be called
    /// within the runtime).
    pub(crate) fn new(parked: Gauge) -> std::io::Result<Arc<Self>> {
        // `new` is deprecated for descriptors the value does not own (tokio's `register` is
        // its unsafe replacement); this one owns its descriptor, as `OwnedFd` does.
        #[allow(deprecated)]
        let epoll = AsyncFd::new(epoll::create(CreateFlags::CLOEXEC)?)?;
        Ok(Arc::new(Self {
            state: Mutex::new(State::default()),
            epoll,
            ready: Mutex::new(Vec::new()),
            notify: Notify::new(),
            parked,
        }))
    }

    /// Parks `parked`, whose core is idle, until something wakes it. Gives it back instead if
    /// it has something to do already (input is ready, its mailbox holds something) or the
    /// broker is shutting down: its driver goes on.
    pub(crate) fn park(self: &Arc<Self>, parked: Parked) -> Result<(), Parked> {
        let deadline = parked.core.poll_timeout();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if state.closed {
            return Err(parked);
        }
        let key = match state.free.pop() {
            Some(key) => key,
            None => match u32::try_from(state.slots.len()) {
                Ok(key) => {
                    state.slots.push(Slot::default());
                    key
                }
                Err(_) => return Err(parked),
            },
        };
        let Some(slot) = state.slots.get_mut(key as usize) else {
            return Err(parked);
        };
        let waker = Waker::from(Arc::new(Doorbell {
            lot: Arc::downgrade(self),
            key,
            generation: slot.generation,
        }));
        // Registered before the checks: what comes after them rings. Adding the socket to the
        // epoll set reports input (or an end) already there as an event, which the lot's task
        // takes once this returns and releases the lock.
        let data = EventData::new_u64(u64::from(key) << 32 | u64::from(slot.generation));
        if !parked.core.mailbox().wake_on_arrival(&waker)
            || epoll::add(
                self.epoll.get_ref(),
                &parked.stream,
                data,
                EventFlags::IN | EventFlags::RDHUP,
            )
            .is_err()
        {
            parked.core.mailbox().forget_waker();
            // The mailbox may keep this waker until the driver looks: it must wake nobody.
            slot.generation = slot.generation.wrapping_add(1);
            state.free.push(key);
            return Err(parked);
        }
        slot.entry = Some(Entry { parked, deadline });
        self.parked.inc();
        if let Some(at) = deadline {
            let earliest = state.deadlines.first().is_none_or(|(first, _)| at < *first);
            state.deadlines.insert((at, key));
            if earliest {
                // The lot's timer is set for a later one.
                self.notify.notify_one();
            }
        }
        Ok(())
    }

    /// Takes the connection in slot `key` out of the lot, if it is still `generation`'s.
    fn take(&self, state: &mut State, key: u32, generation: Option<u32>) -> Option<Parked> {
        let slot = state.slots.get_mut(key as usize)?;
        if generation.is_some_and(|g| g != slot.generation) {
            return None;
        }
        let entry = slot.entry.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        // Out of the set before tokio's reactor gets the socket; if this failed (it cannot
        // for a socket in the set), a stale event would find another generation.
        let _ = epoll::delete(self.epoll.get_ref(), &entry.parked.stream);
        state.free.push(key);
        if let Some(at) = entry.deadline {
            state.deadlines.remove(&(at, key));
        }
        self.parked.dec();
        Some(entry.parked)
    }

    /// Watches the parked connections until the broker shuts down, handing each its task
    /// back ([`resume`]) when it is woken or its deadline passes; at shutdown, hands every
    /// one back, so that they close as active ones do.
    pub(crate) async fn run(self: Arc<Self>, inner: Arc<Inner>) {
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        let mut woken = Vec::new();
        let mut polled = Vec::new();
        let mut resumed = Vec::new();
        loop {
            std::mem::swap(&mut woken, &mut *self.ready.lock());
            woken.append(&mut polled);
            let now = crate::clock::now();
            let next = {
                let mut state = self.state.lock();
                for (key, generation) in woken.drain(..) {
                    resumed.extend(self.take(&mut state, key, Some(generation)));
                }
                while let Some(&(at, key)) = state.deadlines.first() {
                    if at > now {
                        break;
                    }
                    state.deadlines.pop_first();
                    resumed.extend(self.take(&mut state, key, None));
                }
                state.deadlines.first().map(|(at, _)| *at)
            };
            for parked in resumed.drain(..) {
                resume(&inner, &self, parked);
            }
            if let Some(at) = next {
                sleep.as_mut().reset(at.into());
            }
            tokio::select! {
                biased;
                _ = inner.shutdown.cancelled() => break,
                _ = self.notify.notified() => {}
                ready = self.epoll.readable() => match ready {
                    Ok(mut guard) => {
                        // The set is level-triggered: what is left of a full batch is
                        // still there once these are taken out, and readiness stays set.
                        if !self.take_events(&mut polled) {
                            guard.clear_ready();
                        }
                    }
                    // Not for a registered descriptor: the reactor is gone.
                    Err(_) => break,
                },
                _ = &mut sleep, if next.is_some() => {}
            }
        }
        let all: Vec<Parked> = {
            let mut state = self.state.lock();
            state.closed = true;
            let keys = 0..u32::try_from(state.slots.len()).unwrap_or(u32::MAX);
            keys.filter_map(|key| self.take(&mut state, key, None))
                .collect()
        };
        for parked in all {
            resume(&inner, &self, parked);
        }
    }

    /// Takes up to [`EVENTS`] events the epoll set holds now, without waiting, as (key,
    /// generation); returns whether there may be more.
    fn take_events(&self, into: &mut Vec<(u32, u32)>) -> bool {
        let mut events = [MaybeUninit::<Event>::uninit(); EVENTS];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let got = match epoll::wait(self.epoll.get_ref(), &mut events[..], Some(&zero)) {
            Ok((got, _)) => got,
            // Look again on the next turn.
            Err(rustix::io::Errno::INTR) => return true,
            // Not for a set that exists: nothing to take.
            Err(_) => return false,
        };
        for event in got.iter() {
            let data = { event.data }.u64();
            into.push(((data >> 32) as u32, data as u32));
        }
        got.len() == EVENTS
    }
}

/// The socket out of tokio's reactor, for the lot: a duplicate of its descriptor, and the
/// stream (with its registration) dropped; the duplicate keeps the connection open. Gives the
/// stream back if the descriptor cannot be duplicated (at the open-file limit): the
/// connection then keeps its task.
pub(crate) fn detach(stream: TcpStream) -> Result<std::net::TcpStream, TcpStream> {
    use std::os::fd::AsFd;
    match stream.as_fd().try_clone_to_owned() {
        Ok(fd) => {
            drop(stream);
            Ok(std::net::TcpStream::from(fd))
        }
        Err(_) => Err(stream),
    }
}
