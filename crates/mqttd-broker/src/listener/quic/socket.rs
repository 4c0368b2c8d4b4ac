//! The UDP socket of a `quic://` listener: bound by the broker with the socket buffers of
//! `[quic]`, and handed to noq wrapped in [`GuardedSocket`], which puts the [`Guard`] between
//! noq and the network.
//!
//! The wrapper delegates to noq's own tokio socket (noq-udp: GSO, GRO, ECN, the source
//! address of each datagram), and only filters: each received datagram (each segment of a GRO
//! batch) is shown to the guard before noq sees it, and each datagram noq sends (each segment
//! of a GSO batch) is counted against the budget of an address not yet validated. For the
//! traffic of validated connections, that is an atomic load or two (a count of the addresses
//! tracked, then the bucket of the datagram's address in [`Presence`]) and no lock.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use noq::udp::{RecvMeta, Transmit};
use noq::{AsyncUdpSocket, UdpSender};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

use super::guard::{screen, Discard, Guard, Presence, Screen};
use crate::clock::now;
use crate::metrics::Metrics;

/// Rounds of received datagrams all dropped before the socket lets other tasks run.
const DROPPED_ROUNDS: usize = 8;

/// The socket buffer sizes asked for and obtained, in bytes (as the kernel reports them:
/// Linux reports twice what it allows the data, for its bookkeeping).
#[derive(Debug, Clone, Copy)]
pub(super) struct Buffers {
    /// `quic.socket_recv_buffer`: 0 leaves the kernel's default.
    pub(super) recv_wanted: usize,
    pub(super) recv: usize,
    /// `quic.socket_send_buffer`: 0 leaves the kernel's default.
    pub(super) send_wanted: usize,
    pub(super) send: usize,
}

/// Whether a short buffer was warned about: once per process, however many listeners and
/// brokers it runs.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Binds a UDP socket to `addr` as noq's `Endpoint::server` does (dual-stack for an IPv6
/// address when the system allows), with buffers of `recv` and `send` bytes (0: the kernel's
/// default). A buffer the system keeps smaller is warned about once.
pub(super) fn bind(
    addr: SocketAddr,
    recv: usize,
    send: usize,
) -> io::Result<(std::net::UdpSocket, Buffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        if let Err(error) = socket.set_only_v6(false) {
            debug!(%error, "QUIC socket not dual-stack");
        }
    }
    socket.bind(&addr.into())?;
    let buffers = Buffers {
        recv_wanted: recv,
        recv: size_buffer(&socket, Direction::Recv, recv)?,
        send_wanted: send,
        send: size_buffer(&socket, Direction::Send, send)?,
    };
    warn_if_short(&buffers);
    Ok((socket.into(), buffers))
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Recv,
    Send,
}

/// Asks for a buffer of `wanted` bytes: the plain option first, which the kernel caps at
/// `net.core.rmem_max` or `wmem_max`; then, if that fell short, the forcing one, which
/// CAP_NET_ADMIN allows past the cap (like quic-go). Returns the size obtained.
fn size_buffer(socket: &Socket, direction: Direction, wanted: usize) -> io::Result<usize> {
    let get = || match direction {
        Direction::Recv => socket.recv_buffer_size(),
        Direction::Send => socket.send_buffer_size(),
    };
    let current = get()?;
    // The options take a C int; Linux doubles what it is given.
    let wanted = wanted.min(i32::MAX as usize / 2);
    if wanted == 0 || current >= wanted {
        return Ok(current);
    }
    let set = match direction {
        Direction::Recv => socket.set_recv_buffer_size(wanted),
        Direction::Send => socket.set_send_buffer_size(wanted),
    };
    if let Err(error) = set {
        debug!(%error, ?direction, "QUIC socket buffer not resized");
    }
    let got = get()?;
    if got >= wanted {
        return Ok(got);
    }
    #[cfg(target_os = "linux")]
    {
        use rustix::net::sockopt;
        let forced = match direction {
            Direction::Recv => sockopt::set_socket_recv_buffer_size_force(socket, wanted),
            Direction::Send => sockopt::set_socket_send_buffer_size_force(socket, wanted),
        };
        // Refused without CAP_NET_ADMIN: what the plain option gave stays.
        if forced.is_ok() {
            return get();
        }
    }
    Ok(got)
}

/// One warning, the first time a buffer comes out smaller than asked, with the limit to
/// raise.
fn warn_if_short(b: &Buffers) {
    let short_recv = b.recv < b.recv_wanted;
    let short_send = b.send < b.send_wanted;
    if !(short_recv || short_send) || WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    let mut raise = Vec::new();
    if short_recv {
        raise.push(format!("sysctl -w net.core.rmem_max={}", b.recv_wanted));
    }
    if short_send {
        raise.push(format!("sysctl -w net.core.wmem_max={}", b.send_wanted));
    }
    warn!(
        recv_buffer = b.recv,
        recv_wanted = b.recv_wanted,
        send_buffer = b.send,
        send_wanted = b.send_wanted,
        "QUIC socket buffers are smaller than configured (quic.socket_recv_buffer, \
         quic.socket_send_buffer), so bursts of datagrams may be dropped: raise the system's \
         limit ({}) or give the broker CAP_NET_ADMIN",
        raise.join("; ")
    );
}

/// The guard of one endpoint, shared by its socket's receive side, its senders and the
/// accept loop.
pub(super) struct Guarded {
    guard: Mutex<Guard>,
    /// Addresses the guard tracks, read without the lock: with none, datagrams pass
    /// untouched.
    tracked: AtomicUsize,
    /// Which addresses the guard may track, read without the lock: the datagrams of validated
    /// connections pass untouched while others are being validated.
    presence: Arc<Presence>,
    /// The versions noq supports.
    versions: &'static [u32],
    /// `mqttd_quic_datagrams_dropped_total`, by [`Discard`].
    dropped: [Counter; 3],
}

impl fmt::Debug for Guarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("tracked", &self.tracked)
            .finish_non_exhaustive()
    }
}

impl Guarded {
    /// `guard` for an endpoint supporting `versions`, counting its drops in `metrics`.
    pub(super) fn new(guard: Guard, versions: &'static [u32], metrics: &Metrics) -> Self {
        Self {
            presence: guard.presence(),
            guard: Mutex::new(guard),
            tracked: AtomicUsize::new(0),
            versions,
            dropped: Discard::ALL.map(|why| metrics.quic_datagrams_dropped(why.label())),
        }
    }

    /// See [`Guard::attempt`].
    pub(super) fn attempt(&self, from: SocketAddr, validated: bool) -> bool {
        let tracked = self.with(|g| g.attempt(now(), from, validated));
        if !tracked {
            self.count(Discard::TrackingFull, 1);
        }
        tracked
    }

    /// See [`Guard::forget`].
    pub(super) fn forget(&self, addr: SocketAddr) {
        if self.may_track(addr) {
            self.with(|g| g.forget(addr));
        }
    }

    /// Whether `addr` may be tracked: false, without the lock, for certain that it is not.
    fn may_track(&self, addr: SocketAddr) -> bool {
        self.tracked.load(Ordering::Acquire) > 0 && self.presence.may_track(addr)
    }

    fn with<R>(&self, f: impl FnOnce(&mut Guard) -> R) -> R {
        let mut guard = self.guard.lock();
        let r = f(&mut guard);
        self.tracked.store(guard.len(), Ordering::Release);
        r
    }

    fn count(&self, why: Discard, datagrams: u64) {
        let i = Discard::ALL.iter().position(|&d| d == why).unwrap_or(0);
        if let Some(counter) = self.dropped.get(i) {
            counter.inc_by(datagrams);
        }
    }

    /// Keeps the received datagrams the guard lets through: see [`retain_datagrams`].
    fn filter(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) -> usize {
        let mut locked = None;
        let mut at = None;
        let kept = retain_datagrams(bufs, meta, n, |from, datagram| {
            let verdict = match screen(datagram, self.versions) {
                Screen::Discard(why) => Err(why),
                Screen::Pass => Ok(()),
                Screen::Tracked if locked.is_none() && !self.may_track(from) => Ok(()),
                Screen::Tracked | Screen::Initial => {
                    let guard = locked.get_or_insert_with(|| self.guard.lock());
                    let now = *at.get_or_insert_with(now);
                    guard.received(now, from, datagram)
                }
            };
            match verdict {
                Ok(()) => true,
                Err(why) => {
                    self.count(why, 1);
                    false
                }
            }
        });
        if let Some(guard) = locked {
            self.tracked.store(guard.len(), Ordering::Release);
        }
        kept
    }
}

/// Keeps, in the first `n` received buffers, the datagrams `keep` accepts (given their source
/// address), in order, and returns how many buffers still hold any, moved to the front. A
/// buffer of several datagrams (GRO: `stride` bytes each, the last maybe shorter) keeps the
/// accepted ones at its start, so it stays such a batch.
fn retain_datagrams(
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
    n: usize,
    mut keep: impl FnMut(SocketAddr, &[u8]) -> bool,
) -> usize {
    let n = n.min(bufs.len()).min(meta.len());
    let mut kept = 0;
    for i in 0..n {
        let (Some(buf), Some(m)) = (bufs.get_mut(i), meta.get_mut(i)) else {
            break;
        };
        let len = m.len.min(buf.len());
        let stride = match m.stride {
            0 => len.max(1),
            stride => stride,
        };
        let mut write = 0;
        let mut read = 0;
        while read < len {
            let end = (read + stride).min(len);
            if keep(m.addr, buf.get(read..end).unwrap_or_default()) {
                if write != read {
                    buf.copy_within(read..end, write);
                }
                write += end - read;
            }
            read = end;
        }
        m.len = write;
        if write > 0 {
            // Swapping the buffers' descriptors moves the data without copying it; noq
            // reads each datagram from the buffer at its meta's index.
            bufs.swap(kept, i);
            meta.swap(kept, i);
            kept += 1;
        }
    }
    kept
}

/// noq's UDP socket with the guard between it and noq.
#[derive(Debug)]
pub(super) struct GuardedSocket {
    inner: Box<dyn AsyncUdpSocket>,
    guarded: Arc<Guarded>,
}

impl GuardedSocket {
    /// Wraps `inner`, noq's socket, with `guarded`.
    pub(super) fn new(inner: Box<dyn AsyncUdpSocket>, guarded: Arc<Guarded>) -> Self {
        Self { inner, guarded }
    }
}

impl AsyncUdpSocket for GuardedSocket {
    fn create_sender(&self) -> Pin<Box<dyn UdpSender>> {
        Box::pin(GuardedSender {
            inner: self.inner.create_sender(),
            guarded: self.guarded.clone(),
        })
    }

    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        for _ in 0..DROPPED_ROUNDS {
            let n = ready!(self.inner.poll_recv(cx, bufs, meta))?;
            let kept = self.guarded.filter(bufs, meta, n);
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
        // A flood of dropped datagrams: let other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_receive_segments(&self) -> NonZeroUsize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// noq's sender, with the guard's budget applied to addresses not yet validated.
#[derive(Debug)]
struct GuardedSender {
    inner: Pin<Box<dyn UdpSender>>,
    guarded: Arc<Guarded>,
}

impl UdpSender for GuardedSender {
    fn poll_send(
        self: Pin<&mut Self>,
        transmit: &Transmit<'_>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let guarded = &this.guarded;
        if !guarded.may_track(transmit.destination) {
            return this.inner.as_mut().poll_send(transmit, cx);
        }
        let contents = transmit.contents;
        let allowed =
            guarded.with(|g| g.send(now(), transmit.destination, contents, transmit.segment_size));
        if allowed == contents.len() {
            let sent = this.inner.as_mut().poll_send(transmit, cx);
            if !matches!(sent, Poll::Ready(Ok(()))) {
                guarded.with(|g| g.unsend(transmit.destination, contents, allowed));
            }
            return sent;
        }
        let step = transmit
            .segment_size
            .filter(|&s| s > 0)
            .unwrap_or(contents.len())
            .max(1);
        let dropped = (contents.len() - allowed).div_ceil(step) as u64;
        let sent = match contents.get(..allowed) {
            Some(head) if !head.is_empty() => {
                let part = Transmit {
                    destination: transmit.destination,
                    ecn: transmit.ecn,
                    contents: head,
                    segment_size: transmit.segment_size.filter(|&s| s < head.len()),
                    src_ip: transmit.src_ip,
                };
                this.inner.as_mut().poll_send(&part, cx)
            }
            // Nothing fits: dropped as if lost on the way.
            _ => Poll::Ready(Ok(())),
        };
        match sent {
            Poll::Ready(Ok(())) => guarded.count(Discard::Amplification, dropped),
            // Tried again later, when the budget may be larger.
            _ => guarded.with(|g| g.unsend(transmit.destination, contents, allowed)),
        }
        sent
    }

    fn max_transmit_segments(&self) -> NonZeroUsize {
        self.inner.max_transmit_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(addr: SocketAddr, len: usize, stride: usize) -> RecvMeta {
        let mut m = RecvMeta::default();
        m.addr = addr;
        m.len = len;
        m.stride = stride;
        m
    }

    #[test]
    fn dropped_datagrams_leave_the_rest_in_order_and_whole() {
        let a = SocketAddr::from(([192, 0, 2, 1], 1));
        let b = SocketAddr::from(([192, 0, 2, 2], 2));
        // Buffer 0: one datagram "a0" to drop. Buffer 1: a GRO batch of three from b, stride
        // 4 (the last shorter), the middle one to drop. Buffer 2: one datagram to keep.
        let mut storage = [[0u8; 16]; 3];
        storage[0][..2].copy_from_slice(b"x0");
        storage[1][..10].copy_from_slice(b"k1k1x2x2k3");
        storage[2][..3].copy_from_slice(b"k44");
        let [s0, s1, s2] = &mut storage;
        let mut bufs = [
            IoSliceMut::new(s0),
            IoSliceMut::new(s1),
            IoSliceMut::new(s2),
        ];
        let mut metas = [meta(a, 2, 2), meta(b, 10, 4), meta(a, 3, 3)];
        let mut seen = Vec::new();
        let kept = retain_datagrams(&mut bufs, &mut metas, 3, |from, d| {
            seen.push((from, d.to_vec()));
            !d.starts_with(b"x")
        });
        assert_eq!(kept, 2);
        assert_eq!(
            seen,
            [
                (a, b"x0".to_vec()),
                (b, b"k1k1".to_vec()),
                (b, b"x2x2".to_vec()),
                (b, b"k3".to_vec()),
                (a, b"k44".to_vec()),
            ]
        );
        assert_eq!((metas[0].addr, metas[0].len, metas[0].stride), (b, 6, 4));
        assert_eq!(&bufs[0][..6], b"k1k1k3");
        assert_eq!((metas[1].addr, metas[1].len), (a, 3));
        assert_eq!(&bufs[1][..3], b"k44");
    }

    #[test]
    fn buffers_are_sized_as_asked_within_the_systems_limits() {
        // 64 KiB is below every Linux default limit (net.core.rmem_max: 208 KiB).
        let (socket, b) = bind("127.0.0.1:0".parse().unwrap(), 64 * 1024, 0).unwrap();
        assert!(b.recv >= 64 * 1024, "{b:?}");
        assert!(
            b.send > 0 && b.send_wanted == 0,
            "the kernel's default: {b:?}"
        );
        assert_ne!(socket.local_addr().unwrap().port(), 0);
    }

    #[test]
    fn nothing_kept_is_none_and_all_kept_is_untouched() {
        let a = SocketAddr::from(([192, 0, 2, 1], 1));
        let mut storage = [[7u8; 8]; 2];
        let [s0, s1] = &mut storage;
        let mut bufs = [IoSliceMut::new(s0), IoSliceMut::new(s1)];
        let mut metas = [meta(a, 8, 3), meta(a, 5, 0)];
        assert_eq!(retain_datagrams(&mut bufs, &mut metas, 2, |_, _| true), 2);
        assert_eq!((metas[0].len, metas[1].len), (8, 5));
        assert_eq!(retain_datagrams(&mut bufs, &mut metas, 2, |_, _| false), 0);
        assert_eq!((metas[0].len, metas[1].len), (0, 0));
        // More said filled than there are buffers: only the buffers are read.
        metas[0].len = 8;
        assert_eq!(retain_datagrams(&mut bufs, &mut metas, 9, |_, _| true), 1);
    }
}
