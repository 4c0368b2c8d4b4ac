//! What the `quic://` listener keeps from noq and from the network: two rules of RFC 9000 that
//! noq 1.4 bends, enforced on datagrams without any socket (time is passed in).
//!
//! - A long-header packet of a version noq does not support, in a datagram under 1200 bytes, is
//!   dropped (RFC 9000 §5.2.2 and §6): a Version Negotiation in answer would amplify. noq
//!   answers it whatever its size.
//! - Before an address is validated, the broker sends it at most three times the bytes it
//!   received from it (RFC 9000 §8). noq starts a datagram whenever any budget is left, so its
//!   last one can overshoot by up to 1199 bytes; the guard drops a datagram that would go past
//!   the limit, and noq, seeing no acknowledgement, sends it again later, within the limit.
//!
//! The guard reads only what every QUIC version shares (RFC 8999: the header form bit, the
//! version, the connection IDs of a long header) and, for the versions noq supports (all laid
//! out as version 1), the long header's packet type bits and lengths. It never decrypts: an
//! address is proven by what only a client that received the broker's packets can know, the
//! connection ID the broker chose for it (the Source Connection ID of the broker's Initial and
//! Handshake packets). A Handshake packet or a short-header (1-RTT) packet sent to that ID
//! validates the address; so does a token noq accepted (the accept loop reports it:
//! [`Guard::attempt`]). A spoofed source address never sees the ID, so it cannot lift the
//! limit by sending packets that merely look like a Handshake.
//!
//! A client endpoint may run many connections over one address (a gateway, a load generator):
//! only what the broker sends to the attempts not yet validated is limited, the packets
//! addressed to the connection IDs their Initials chose. What goes to the address's other
//! connections, validated already, is not held back (an attempt whose Initial chose an empty
//! connection ID cannot be told apart, and limits everything sent to its address).
//!
//! An address is tracked from its first Initial (a full-size datagram of a supported version)
//! in two phases. [`Phase::Counting`]: bytes are counted both ways, nothing is limited, until
//! noq turns the Initial into a connection attempt the accept loop sees (an Initial that
//! belongs to a connection already under way never does, and is forgotten when its entry
//! expires). [`Phase::Limited`]: the attempt was not validated by a token, and what the
//! broker sends is held to three times what came. An entry ends when the address is
//! validated, when noq keeps no state for the attempt (a Retry, a refusal), or when the
//! handshake's time is up. Entries are bounded: when the table is full, entries still counting
//! are given up first (an attempt that then arrives is limited from a lower bound of what its
//! Initial carried, so giving them up is safe); when every entry is limited, new Initials are
//! dropped, as if lost, until room frees up.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The smallest datagram that may carry a client's Initial (RFC 9000 §14.1), and below which a
/// packet of an unknown version gets no answer (§6).
pub(crate) const MIN_INITIAL_DATAGRAM: usize = 1200;
/// What the broker may send an address before validating it, per byte received (RFC 9000 §8).
const AMPLIFICATION_FACTOR: u64 = 3;
/// The longest connection ID of the versions noq supports (RFC 9000 §17.2).
const MAX_CID_LEN: usize = 20;
/// Connection IDs remembered per address: that of its latest connection attempts.
const KNOWN_CIDS: usize = 2;
/// Clients' connection IDs remembered per address: those of its latest Initials. A client
/// endpoint may run many connections over one address; what goes to the others (validated
/// long ago) is not held back.
const KNOWN_CLIENT_CIDS: usize = 4;
/// Packets read in one datagram: a client coalesces at most Initial, 0-RTT or Handshake, and
/// 1-RTT.
const MAX_COALESCED: usize = 4;
/// How often expired entries are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Buckets of [`Presence`]: many more than the addresses usually tracked at once, so that a
/// validated address seldom shares one.
const PRESENCE_BUCKETS: usize = 4096;

/// The header form bit: set for a long header (RFC 8999 §5.1).
const LONG_HEADER: u8 = 0x80;
/// The long header's packet types in version 1 (RFC 9000 §17.2), bits 0x30 of the first byte.
const TYPE_INITIAL: u8 = 0;
const TYPE_HANDSHAKE: u8 = 2;
const TYPE_RETRY: u8 = 3;

/// Why the guard drops a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Discard {
    /// Received: a long header of a version noq does not support, in a datagram under 1200
    /// bytes (RFC 9000 §5.2.2), which noq would answer with a Version Negotiation.
    ShortUnknownVersion,
    /// To send: it would take what an address not yet validated was sent past three times
    /// what it sent (RFC 9000 §8).
    Amplification,
    /// Received: the Initial of an address not tracked yet while the table of addresses not
    /// yet validated is full of connection attempts.
    TrackingFull,
}

impl Discard {
    /// Every reason, for metrics that show each from the start.
    pub(crate) const ALL: [Self; 3] = [
        Self::ShortUnknownVersion,
        Self::Amplification,
        Self::TrackingFull,
    ];

    /// The `reason` label of `mqttd_quic_datagrams_dropped_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::ShortUnknownVersion => "short_unknown_version",
            Self::Amplification => "amplification",
            Self::TrackingFull => "tracking_full",
        }
    }
}

/// A received datagram, as far as it can be judged without the guard's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Screen {
    /// Dropped whatever the table holds.
    Discard(Discard),
    /// Nothing the guard counts: empty, unreadable, or an unknown version in a full-size
    /// datagram (noq answers it with a Version Negotiation and keeps nothing).
    Pass,
    /// A short header, or a long header of a supported version that cannot start a
    /// connection: it matters only if its address is tracked.
    Tracked,
    /// An Initial of a supported version in a full-size datagram: it may start a connection
    /// attempt.
    Initial,
}

/// Judges `datagram` by its first packet, without the guard's table. `versions` are those noq
/// supports.
pub(crate) fn screen(datagram: &[u8], versions: &[u32]) -> Screen {
    let Some(&first) = datagram.first() else {
        return Screen::Pass;
    };
    if first & LONG_HEADER == 0 {
        return Screen::Tracked;
    }
    let Some(version) = read_version(datagram) else {
        return Screen::Pass;
    };
    if !versions.contains(&version) {
        return match datagram.len() < MIN_INITIAL_DATAGRAM {
            true => Screen::Discard(Discard::ShortUnknownVersion),
            false => Screen::Pass,
        };
    }
    match long_type(first) == TYPE_INITIAL && datagram.len() >= MIN_INITIAL_DATAGRAM {
        true => Screen::Initial,
        false => Screen::Tracked,
    }
}

/// The addresses not yet validated and what they were sent and sent: see the module
/// documentation.
#[derive(Debug)]
pub(crate) struct Guard {
    /// The versions noq supports, all laid out as version 1.
    versions: &'static [u32],
    entries: HashMap<SocketAddr, Entry>,
    /// Entries in [`Phase::Counting`].
    counting: usize,
    /// How long an entry lives: the handshake's time limit, and some.
    lifetime: Duration,
    /// The most entries held.
    capacity: usize,
    /// When expired entries are swept out next.
    next_sweep: Option<Instant>,
    /// The tracked addresses' buckets, for readers without the lock.
    presence: Arc<Presence>,
}

/// An address not yet validated.
#[derive(Debug)]
struct Entry {
    /// Bytes received from it, in datagrams noq may attribute to a connection attempt.
    received: u64,
    /// Bytes sent to it.
    sent: u64,
    /// When it was first tracked.
    since: Instant,
    phase: Phase,
    /// The connection IDs the broker chose for its attempts, newest first.
    cids: [Cid; KNOWN_CIDS],
    /// The connection IDs its attempts chose (the Source Connection IDs of their Initials), to
    /// which the broker addresses their packets, newest first: only those are limited, as
    /// other connections from the same address were validated already.
    clients: [Cid; KNOWN_CLIENT_CIDS],
    /// An attempt chose an empty connection ID: nothing tells its packets from other
    /// connections', so everything sent to the address is limited.
    limits_all: bool,
}

/// Whether an entry limits what is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its Initial came, no connection attempt yet: counted, not limited.
    Counting,
    /// A connection attempt noq did not validate: limited to three times what came.
    Limited,
}

impl Entry {
    fn new(received: usize, since: Instant, phase: Phase) -> Self {
        Self {
            received: received as u64,
            sent: 0,
            since,
            phase,
            cids: [Cid::EMPTY; KNOWN_CIDS],
            clients: [Cid::EMPTY; KNOWN_CLIENT_CIDS],
            limits_all: false,
        }
    }

    /// Remembers the connection ID a client's Initial chose (its Source Connection ID).
    fn learn_client(&mut self, scid: &[u8]) {
        match Cid::new(scid) {
            Some(cid) if !self.clients.contains(&cid) => {
                self.clients.rotate_right(1);
                self.clients[0] = cid;
            }
            Some(_) => {}
            None => self.limits_all = true,
        }
    }

    /// Whether `contents` (what the broker sends) belongs to one of the tracked attempts: its
    /// first packet is addressed to a connection ID one of them chose. What belongs to another
    /// connection on the same address goes unlimited.
    fn concerns(&self, contents: &[u8], versions: &[u32]) -> bool {
        if self.limits_all {
            return true;
        }
        let known = |dcid: &[u8]| {
            self.clients
                .iter()
                .any(|cid| !cid.is_empty() && dcid.starts_with(cid.bytes()))
        };
        match contents.first() {
            None => false,
            Some(first) if first & LONG_HEADER == 0 => known(contents.get(1..).unwrap_or_default()),
            // A Version Negotiation or a packet of a version the guard cannot read is limited.
            Some(_) => read_long(contents, versions).is_none_or(|packet| known(packet.dcid)),
        }
    }

    /// Bytes it may still be sent.
    fn budget(&self) -> u64 {
        match self.phase {
            Phase::Counting => u64::MAX,
            Phase::Limited => {
                (self.received.saturating_mul(AMPLIFICATION_FACTOR)).saturating_sub(self.sent)
            }
        }
    }

    /// Remembers a connection ID the broker chose for this address.
    fn learn(&mut self, cid: Cid) {
        if !self.cids.contains(&cid) {
            self.cids.rotate_right(1);
            self.cids[0] = cid;
        }
    }

    /// Whether `dcid` is one the broker chose for this address.
    fn knows(&self, dcid: &[u8]) -> bool {
        self.cids
            .iter()
            .any(|cid| !cid.is_empty() && cid.bytes() == dcid)
    }

    /// Whether a short header's bytes after its first begin with a connection ID the broker
    /// chose for this address (a short header does not say its length).
    fn knows_prefix_of(&self, rest: &[u8]) -> bool {
        self.cids
            .iter()
            .any(|cid| !cid.is_empty() && rest.starts_with(cid.bytes()))
    }
}

impl Guard {
    /// A guard for an endpoint that supports `versions` (laid out as version 1), whose
    /// handshakes take at most `lifetime`, tracking at most `capacity` addresses.
    pub(crate) fn new(versions: &'static [u32], lifetime: Duration, capacity: usize) -> Self {
        Self {
            versions,
            entries: HashMap::new(),
            counting: 0,
            lifetime,
            capacity: capacity.max(1),
            next_sweep: None,
            presence: Arc::new(Presence::new()),
        }
    }

    /// Which addresses may be tracked, read without the guard: what it answers changes only
    /// under the guard, by the guard's own calls.
    pub(crate) fn presence(&self) -> Arc<Presence> {
        self.presence.clone()
    }

    /// Addresses tracked.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// A datagram (one, not a GRO batch) received from `from` at `now`: whether noq may have
    /// it.
    pub(crate) fn received(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), Discard> {
        let screen = match screen(datagram, self.versions) {
            Screen::Discard(why) => return Err(why),
            Screen::Pass => return Ok(()),
            screen => screen,
        };
        self.sweep(now);
        let from = canonical(from);
        let client = match screen {
            Screen::Initial => read_long(datagram, self.versions).map(|packet| packet.scid),
            _ => None,
        };
        if let Some(entry) = self.entries.get_mut(&from) {
            if proves(datagram, entry, self.versions) {
                self.remove(&from);
            } else if is_long(datagram) {
                // A short header that proves nothing is no connection's: it does not count.
                entry.received = entry.received.saturating_add(datagram.len() as u64);
                if let Some(scid) = client {
                    entry.learn_client(scid);
                }
            }
            return Ok(());
        }
        if screen != Screen::Initial {
            return Ok(());
        }
        if !self.make_room(now) {
            return Err(Discard::TrackingFull);
        }
        let mut entry = Entry::new(datagram.len(), now, Phase::Counting);
        entry.learn_client(client.unwrap_or_default());
        self.insert(from, entry);
        Ok(())
    }

    /// noq made a connection attempt from `from`, its address `validated` by a token or not.
    /// An attempt not validated is limited from now on; false if the table is full of them,
    /// and then the attempt must not go on (noq would answer it unchecked).
    pub(crate) fn attempt(&mut self, now: Instant, from: SocketAddr, validated: bool) -> bool {
        let from = canonical(from);
        if validated {
            self.remove(&from);
            return true;
        }
        self.sweep(now);
        if let Some(entry) = self.entries.get_mut(&from) {
            if entry.phase == Phase::Counting {
                entry.phase = Phase::Limited;
                self.counting -= 1;
            }
            return true;
        }
        // Its Initial was given up to make room, or came before a sweep: it filled a
        // datagram of at least 1200 bytes, a lower bound of what came.
        if !self.make_room(now) {
            return false;
        }
        // Its Initial's connection ID is unknown: everything sent to the address is limited.
        let mut entry = Entry::new(MIN_INITIAL_DATAGRAM, now, Phase::Limited);
        entry.limits_all = true;
        self.insert(from, entry);
        true
    }

    /// noq keeps no state for an attempt from `addr` any more (it sent a Retry or refused
    /// it): nothing more goes there that needs a limit.
    pub(crate) fn forget(&mut self, addr: SocketAddr) {
        self.remove(&canonical(addr));
    }

    /// How many bytes of `contents` may go to `to` at `now`, and counts them as sent:
    /// `contents` is one datagram, or several of `segment` bytes each (GSO, the last maybe
    /// shorter); what is allowed is a run of whole datagrams from the start.
    pub(crate) fn send(
        &mut self,
        now: Instant,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> usize {
        if self.entries.is_empty() {
            return contents.len();
        }
        self.sweep(now);
        let Some(entry) = self.entries.get_mut(&canonical(to)) else {
            return contents.len();
        };
        if !entry.concerns(contents, self.versions) {
            return contents.len();
        }
        let budget = entry.budget();
        let step = segment.filter(|&s| s > 0).unwrap_or(contents.len()).max(1);
        let mut allowed = 0;
        for datagram in contents.chunks(step) {
            if (allowed + datagram.len()) as u64 > budget {
                break;
            }
            allowed += datagram.len();
        }
        if allowed > 0 {
            entry.sent = entry.sent.saturating_add(allowed as u64);
            if let Some(cid) = chosen_cid(contents, self.versions) {
                entry.learn(cid);
            }
        }
        allowed
    }

    /// `bytes` of `contents` counted by [`Self::send`] for `to` did not go after all (the socket was not
    /// ready; noq tries again).
    pub(crate) fn unsend(&mut self, to: SocketAddr, contents: &[u8], bytes: usize) {
        if let Some(entry) = self.entries.get_mut(&canonical(to)) {
            if entry.concerns(contents, self.versions) {
                entry.sent = entry.sent.saturating_sub(bytes as u64);
            }
        }
    }

    fn insert(&mut self, addr: SocketAddr, entry: Entry) {
        if entry.phase == Phase::Counting {
            self.counting += 1;
        }
        match self.entries.insert(addr, entry) {
            Some(old) if old.phase == Phase::Counting => self.counting -= 1,
            Some(_) => {}
            None => self.presence.add(addr),
        }
    }

    fn remove(&mut self, addr: &SocketAddr) {
        if let Some(old) = self.entries.remove(addr) {
            self.presence.remove(*addr);
            if old.phase == Phase::Counting {
                self.counting -= 1;
            }
        }
        if self.entries.is_empty() {
            self.next_sweep = None;
        }
    }

    /// Keeps the entries `keep` accepts.
    fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        let presence = &self.presence;
        self.entries.retain(|addr, entry| {
            let kept = keep(entry);
            if !kept {
                presence.remove(*addr);
            }
            kept
        });
        self.recount();
    }

    /// Sweeps out expired entries, at most every [`SWEEP_EVERY`].
    fn sweep(&mut self, now: Instant) {
        match self.next_sweep {
            Some(at) if now < at => return,
            None if self.entries.is_empty() => return,
            _ => {}
        }
        let lifetime = self.lifetime;
        self.retain(|entry| now.saturating_duration_since(entry.since) < lifetime);
        self.next_sweep = (!self.entries.is_empty()).then(|| now + SWEEP_EVERY);
    }

    /// Room for one more entry: expired entries go first, then those still counting. False
    /// if every entry is a live, limited attempt.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.entries.len() < self.capacity {
            return true;
        }
        self.next_sweep = None;
        self.sweep(now);
        if self.entries.len() >= self.capacity && self.counting > 0 {
            self.retain(|entry| entry.phase == Phase::Limited);
        }
        self.entries.len() < self.capacity
    }

    fn recount(&mut self) {
        self.counting = self
            .entries
            .values()
            .filter(|entry| entry.phase == Phase::Counting)
            .count();
    }
}

/// Which addresses the guard may track, for readers without its lock: a count of tracked
/// addresses per bucket of their hashes. A bucket at zero means that none of its addresses is
/// tracked, so that the datagrams of validated connections skip the guard; one above zero
/// means only that the guard must be asked.
#[derive(Debug)]
pub(crate) struct Presence {
    buckets: Box<[AtomicU32]>,
}

impl Presence {
    fn new() -> Self {
        Self {
            buckets: (0..PRESENCE_BUCKETS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Whether the guard may track `addr`: false for certain that it does not.
    pub(crate) fn may_track(&self, addr: SocketAddr) -> bool {
        self.bucket(canonical(addr))
            .is_some_and(|b| b.load(Ordering::Acquire) > 0)
    }

    fn add(&self, addr: SocketAddr) {
        if let Some(b) = self.bucket(addr) {
            b.fetch_add(1, Ordering::Release);
        }
    }

    fn remove(&self, addr: SocketAddr) {
        if let Some(b) = self.bucket(addr) {
            b.fetch_sub(1, Ordering::Release);
        }
    }

    /// The bucket of a canonical address: a multiplicative hash, cheap on every datagram. An
    /// address made to share a bucket gains nothing but a look at the guard.
    fn bucket(&self, addr: SocketAddr) -> Option<&AtomicU32> {
        let ip = match addr.ip() {
            IpAddr::V4(ip) => u64::from(u32::from(ip)),
            IpAddr::V6(ip) => {
                let bits = u128::from(ip);
                (bits as u64) ^ ((bits >> 64) as u64).rotate_left(29)
            }
        };
        let key = (ip ^ u64::from(addr.port()).rotate_left(40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let index = (key >> 32) as usize % self.buckets.len();
        self.buckets.get(index)
    }
}

/// A connection ID, held inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cid {
    len: u8,
    bytes: [u8; MAX_CID_LEN],
}

impl Cid {
    const EMPTY: Self = Self {
        len: 0,
        bytes: [0; MAX_CID_LEN],
    };

    /// A connection ID that can prove an address: not empty (anyone could send to an empty
    /// one), and not longer than version 1 allows.
    fn new(cid: &[u8]) -> Option<Self> {
        if cid.is_empty() || cid.len() > MAX_CID_LEN {
            return None;
        }
        let mut bytes = [0; MAX_CID_LEN];
        bytes.get_mut(..cid.len())?.copy_from_slice(cid);
        Some(Self {
            len: cid.len() as u8,
            bytes,
        })
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
}

/// The address as a key: an IPv4 address mapped into IPv6 (a dual-stack socket's view) is the
/// IPv4 address.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn is_long(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & LONG_HEADER != 0)
}

fn long_type(first: u8) -> u8 {
    (first & 0x30) >> 4
}

/// The version of a long header (RFC 8999 §5.1).
fn read_version(packet: &[u8]) -> Option<u32> {
    let bytes = packet.get(1..5)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// A long-header packet of a supported version, as far as the guard reads it.
struct LongPacket<'a> {
    ty: u8,
    dcid: &'a [u8],
    scid: &'a [u8],
    /// Its length in the datagram, if it says (a Retry takes the rest of it).
    len: Option<usize>,
}

/// Reads the long-header packet at the start of `packet`: the invariant fields (RFC 8999
/// §5.1), then the type bits and lengths of version 1's layout (RFC 9000 §17.2).
fn read_long<'a>(packet: &'a [u8], versions: &[u32]) -> Option<LongPacket<'a>> {
    let mut r = Reader(packet);
    let first = r.byte()?;
    if first & LONG_HEADER == 0 || !versions.contains(&read_version(packet)?) {
        return None;
    }
    r.take(4)?;
    let len = r.byte()?;
    let dcid = r.take(usize::from(len))?;
    let len = r.byte()?;
    let scid = r.take(usize::from(len))?;
    let ty = long_type(first);
    let len = match ty {
        TYPE_RETRY => None,
        _ => {
            if ty == TYPE_INITIAL {
                let token = r.varint()?;
                r.take(usize::try_from(token).ok()?)?;
            }
            let length = usize::try_from(r.varint()?).ok()?;
            let header = packet.len() - r.0.len();
            Some(header.checked_add(length)?)
        }
    };
    Some(LongPacket {
        ty,
        dcid,
        scid,
        len,
    })
}

/// Whether `datagram` proves its source address to `entry`: a Handshake packet, or a
/// short-header one, sent to a connection ID the broker chose for it.
fn proves(datagram: &[u8], entry: &Entry, versions: &[u32]) -> bool {
    let mut rest = datagram;
    for _ in 0..MAX_COALESCED {
        let Some(&first) = rest.first() else {
            return false;
        };
        if first & LONG_HEADER == 0 {
            return entry.knows_prefix_of(rest.get(1..).unwrap_or_default());
        }
        let Some(packet) = read_long(rest, versions) else {
            return false;
        };
        if packet.ty == TYPE_HANDSHAKE && entry.knows(packet.dcid) {
            return true;
        }
        let Some(rest_at) = packet.len else {
            return false;
        };
        let Some(next) = rest.get(rest_at..) else {
            return false;
        };
        rest = next;
    }
    false
}

/// The connection ID the broker chose, in the first packet of what it sends: the Source
/// Connection ID of an Initial or Handshake packet.
fn chosen_cid(contents: &[u8], versions: &[u32]) -> Option<Cid> {
    let packet = read_long(contents, versions)?;
    match packet.ty {
        TYPE_INITIAL | TYPE_HANDSHAKE => Cid::new(packet.scid),
        _ => None,
    }
}

/// Reads a packet's fields from the front.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    /// A variable-length integer (RFC 9000 §16).
    fn varint(&mut self) -> Option<u64> {
        let first = *self.0.first()?;
        let len = 1usize << (first >> 6);
        let bytes = self.take(len)?;
        let mut value = u64::from(first & 0x3f);
        for &b in bytes.get(1..)? {
            value = (value << 8) | u64::from(b);
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERSIONS: &[u32] = &[1];
    const LIFETIME: Duration = Duration::from_secs(3);
    const SERVER_CID: &[u8] = &[0xAA; 8];

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// A long-header packet: `ty`, `version`, the connection IDs, a token for an Initial,
    /// `payload` bytes of payload.
    fn long(ty: u8, version: u32, dcid: &[u8], scid: &[u8], payload: usize) -> Vec<u8> {
        let mut p = vec![0xC0 | (ty << 4)];
        p.extend_from_slice(&version.to_be_bytes());
        p.push(dcid.len() as u8);
        p.extend_from_slice(dcid);
        p.push(scid.len() as u8);
        p.extend_from_slice(scid);
        if ty == TYPE_INITIAL {
            p.push(0); // no token
        }
        // A two-byte varint length.
        p.extend_from_slice(&(0x4000 | payload as u16).to_be_bytes());
        p.resize(p.len() + payload, 0);
        p
    }

    /// A client's Initial filling a datagram of `size` bytes.
    fn initial(size: usize) -> Vec<u8> {
        let mut p = long(TYPE_INITIAL, 1, &[1; 8], &[2; 8], 0);
        let payload = size - p.len();
        p = long(TYPE_INITIAL, 1, &[1; 8], &[2; 8], payload);
        assert_eq!(p.len(), size);
        p
    }

    /// The broker's first flight: an Initial with its chosen connection ID.
    fn server_initial(size: usize) -> Vec<u8> {
        let mut p = long(TYPE_INITIAL, 1, &[2; 8], SERVER_CID, size - 30);
        p.resize(size, 0);
        p
    }

    fn short(dcid: &[u8], size: usize) -> Vec<u8> {
        let mut p = vec![0x40];
        p.extend_from_slice(dcid);
        p.resize(size, 0);
        p
    }

    /// A short-header datagram of `size` bytes (at least 9) addressed to the client's
    /// connection ID, that of [`initial`]: what the broker sends the attempt once it has keys.
    fn to_client(size: usize) -> Vec<u8> {
        short(&[2; 8], size)
    }

    fn guard() -> Guard {
        Guard::new(VERSIONS, LIFETIME, 16)
    }

    /// An attempt from `addr(1)` the accept loop saw, unvalidated, after a 1200-byte Initial.
    fn limited(g: &mut Guard, now: Instant) {
        assert_eq!(g.received(now, addr(1), &initial(1200)), Ok(()));
        assert!(g.attempt(now, addr(1), false));
    }

    #[test]
    fn short_datagrams_of_unknown_versions_are_dropped_full_ones_pass() {
        let g = &mut guard();
        let now = Instant::now();
        let unknown = |size| {
            let mut p = long(TYPE_INITIAL, 0x1A2A_3A4A, &[1; 8], &[2; 8], 0);
            p.resize(size, 0);
            p
        };
        assert_eq!(
            g.received(now, addr(1), &unknown(100)),
            Err(Discard::ShortUnknownVersion)
        );
        assert_eq!(
            g.received(now, addr(1), &unknown(1199)),
            Err(Discard::ShortUnknownVersion)
        );
        assert_eq!(g.received(now, addr(1), &unknown(1200)), Ok(()));
        // A Version Negotiation packet (version 0) is no supported version either.
        assert_eq!(
            screen(&long(0, 0, &[1; 8], &[2; 8], 10), VERSIONS),
            Screen::Discard(Discard::ShortUnknownVersion)
        );
        // Short headers, supported versions and scraps are not the guard's to drop.
        assert_eq!(screen(&short(&[1; 8], 40), VERSIONS), Screen::Tracked);
        assert_eq!(
            screen(&long(TYPE_HANDSHAKE, 1, &[1; 8], &[2; 8], 10), VERSIONS),
            Screen::Tracked
        );
        assert_eq!(screen(&initial(1200), VERSIONS), Screen::Initial);
        assert_eq!(screen(&initial(1199), VERSIONS), Screen::Tracked);
        assert_eq!(screen(&[0xC0, 0, 0], VERSIONS), Screen::Pass);
        assert_eq!(screen(&[], VERSIONS), Screen::Pass);
        assert_eq!(g.len(), 0, "nothing tracked");
    }

    #[test]
    fn an_unvalidated_address_gets_at_most_three_times_what_it_sent() {
        let g = &mut guard();
        let now = Instant::now();
        limited(g, now);
        // 1200 + 222, then retransmissions of 1200: the third one would pass 3600.
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 1200);
        assert_eq!(g.send(now, addr(1), &to_client(222), None), 222);
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 1200);
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 0);
        // What still fits goes.
        assert_eq!(g.send(now, addr(1), &to_client(978), None), 978);
        assert_eq!(g.send(now, addr(1), &to_client(9), None), 0);
        // More from the client: more budget.
        assert_eq!(g.received(now, addr(1), &initial(1200)), Ok(()));
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 1200);
        // Other addresses are not limited.
        assert_eq!(g.send(now, addr(2), &to_client(5000), None), 5000);
    }

    #[test]
    fn a_gso_batch_goes_as_far_as_the_budget_in_whole_datagrams() {
        let g = &mut guard();
        let now = Instant::now();
        limited(g, now);
        let mut batch = server_initial(1200);
        batch.extend_from_slice(&[0x40; 1200 + 1200 + 500]);
        // 1200, 1200, 1200 and 500 bytes: the last would pass 3600.
        assert_eq!(g.send(now, addr(1), &batch, Some(1200)), 3600);
        assert_eq!(g.send(now, addr(1), &to_client(9), Some(1200)), 0);
    }

    #[test]
    fn a_send_that_did_not_go_is_not_counted() {
        let g = &mut guard();
        let now = Instant::now();
        limited(g, now);
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 1200);
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 1200);
        g.unsend(addr(1), &server_initial(1200), 1200);
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 1200);
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 1200);
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 0);
    }

    #[test]
    fn a_handshake_packet_to_the_chosen_connection_id_validates() {
        let g = &mut guard();
        let now = Instant::now();
        limited(g, now);
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 1200);
        // A Handshake to another ID (what a spoofer can send) counts but proves nothing.
        let forged = long(TYPE_HANDSHAKE, 1, &[0xBB; 8], &[2; 8], 100);
        assert_eq!(g.received(now, addr(1), &forged), Ok(()));
        assert_eq!(g.len(), 1);
        let left = 3 * (1200 + forged.len()) - 1200;
        assert_eq!(g.send(now, addr(1), &to_client(left), None), left);
        assert_eq!(g.send(now, addr(1), &to_client(9), None), 0, "3x reached");
        // The client's second flight: an Initial (acknowledgements) coalesced with its
        // Handshake to the broker's connection ID.
        let mut flight = long(TYPE_INITIAL, 1, SERVER_CID, &[2; 8], 60);
        flight.extend(long(TYPE_HANDSHAKE, 1, SERVER_CID, &[2; 8], 80));
        flight.extend(short(SERVER_CID, 40));
        assert_eq!(g.received(now, addr(1), &flight), Ok(()));
        assert_eq!(g.len(), 0, "validated");
        assert_eq!(g.send(now, addr(1), &[0x40; 20_000], None), 20_000);
    }

    #[test]
    fn a_short_header_to_the_chosen_connection_id_validates() {
        let g = &mut guard();
        let now = Instant::now();
        limited(g, now);
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 1200);
        assert_eq!(g.received(now, addr(1), &short(&[0xBB; 8], 1200)), Ok(()));
        assert_eq!(g.len(), 1, "not to the broker's ID");
        assert_eq!(g.received(now, addr(1), &short(SERVER_CID, 40)), Ok(()));
        assert_eq!(g.len(), 0);
    }

    #[test]
    fn nothing_validates_before_the_broker_chose_an_id() {
        let g = &mut guard();
        let now = Instant::now();
        limited(g, now);
        let handshake = long(TYPE_HANDSHAKE, 1, SERVER_CID, &[2; 8], 100);
        assert_eq!(g.received(now, addr(1), &handshake), Ok(()));
        assert_eq!(g.received(now, addr(1), &short(SERVER_CID, 40)), Ok(()));
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn a_token_noq_accepted_validates_and_a_retry_forgets() {
        let g = &mut guard();
        let now = Instant::now();
        assert_eq!(g.received(now, addr(1), &initial(1300)), Ok(()));
        assert!(g.attempt(now, addr(1), true));
        assert_eq!(g.len(), 0);
        limited(g, now);
        g.forget(addr(1));
        assert_eq!(g.len(), 0);
        assert_eq!(g.send(now, addr(1), &[0x40; 9000], None), 9000);
    }

    #[test]
    fn counting_does_not_limit_until_noq_makes_an_attempt() {
        let g = &mut guard();
        let now = Instant::now();
        // A late retransmission of a validated client's Initial: tracked, not limited.
        assert_eq!(g.received(now, addr(1), &initial(1200)), Ok(()));
        assert_eq!(g.len(), 1);
        assert_eq!(g.send(now, addr(1), &[0x40; 9000], None), 9000);
        // And gone when the handshake's time is up.
        let later = now + LIFETIME;
        assert_eq!(g.received(later, addr(1), &short(&[1; 8], 40)), Ok(()));
        assert_eq!(g.len(), 0);
    }

    #[test]
    fn an_attempt_whose_initial_was_not_counted_starts_from_1200_bytes() {
        let g = &mut guard();
        let now = Instant::now();
        assert!(g.attempt(now, addr(1), false));
        assert_eq!(g.send(now, addr(1), &[0x40; 3600], Some(1200)), 3600);
        assert_eq!(g.send(now, addr(1), &to_client(9), None), 0);
    }

    #[test]
    fn received_bytes_count_from_the_initial_on() {
        let g = &mut guard();
        let now = Instant::now();
        assert_eq!(g.received(now, addr(1), &initial(1400)), Ok(()));
        // A second Initial and a 0-RTT datagram of the same attempt.
        assert_eq!(g.received(now, addr(1), &initial(1200)), Ok(()));
        let zero_rtt = long(1, 1, &[1; 8], &[2; 8], 400);
        assert_eq!(g.received(now, addr(1), &zero_rtt), Ok(()));
        // A short header that proves nothing does not count.
        assert_eq!(g.received(now, addr(1), &short(&[1; 8], 900)), Ok(()));
        assert!(g.attempt(now, addr(1), false));
        let received = 1400 + 1200 + zero_rtt.len();
        assert_eq!(g.send(now, addr(1), &to_client(3 * received + 1), None), 0);
        assert_eq!(
            g.send(now, addr(1), &to_client(3 * received), None),
            3 * received
        );
    }

    #[test]
    fn other_connections_on_the_same_address_are_not_held_back() {
        // A client endpoint runs many connections over one address: a new attempt's limit
        // leaves what goes to the others (validated long ago) alone.
        let g = &mut guard();
        let now = Instant::now();
        limited(g, now);
        assert_eq!(g.send(now, addr(1), &to_client(3600), None), 3600);
        assert_eq!(
            g.send(now, addr(1), &to_client(9), None),
            0,
            "the attempt is held"
        );
        assert_eq!(g.send(now, addr(1), &short(&[7; 8], 5000), None), 5000);
        let other = long(TYPE_HANDSHAKE, 1, &[7; 8], SERVER_CID, 1100);
        assert_eq!(g.send(now, addr(1), &other, None), other.len());
        assert_eq!(g.unsend(addr(1), &other, other.len()), ());
        assert_eq!(
            g.send(now, addr(1), &to_client(9), None),
            0,
            "refunds are the attempt's own"
        );
        // A second attempt from the address is held too.
        let mut second = long(TYPE_INITIAL, 1, &[1; 8], &[3; 8], 1100);
        second.resize(1200, 0);
        assert_eq!(g.received(now, addr(1), &second), Ok(()));
        assert_eq!(g.send(now, addr(1), &short(&[3; 8], 3600), None), 3600);
        assert_eq!(g.send(now, addr(1), &short(&[3; 8], 9), None), 0);
    }

    #[test]
    fn an_attempt_with_an_empty_connection_id_holds_back_everything_to_its_address() {
        let g = &mut guard();
        let now = Instant::now();
        let mut p = long(TYPE_INITIAL, 1, &[1; 8], &[], 1100);
        p.resize(1200, 0);
        assert_eq!(g.received(now, addr(1), &p), Ok(()));
        assert!(g.attempt(now, addr(1), false));
        assert_eq!(g.send(now, addr(1), &short(&[7; 8], 3601), None), 0);
    }

    #[test]
    fn an_ipv4_client_seen_through_a_dual_stack_socket_is_one_address() {
        let g = &mut guard();
        let now = Instant::now();
        let mapped = SocketAddr::from((std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped(), 1));
        assert_eq!(g.received(now, mapped, &initial(1200)), Ok(()));
        assert!(g.attempt(now, addr(1), false));
        assert_eq!(g.len(), 1);
        assert_eq!(g.send(now, mapped, &to_client(3601), None), 0);
    }

    #[test]
    fn entries_expire_with_the_handshake() {
        let g = &mut guard();
        let now = Instant::now();
        limited(g, now);
        assert_eq!(g.send(now, addr(1), &to_client(3600), None), 3600);
        assert_eq!(g.send(now + LIFETIME / 2, addr(1), &to_client(9), None), 0);
        assert_eq!(g.send(now + LIFETIME, addr(1), &to_client(9), None), 9);
        assert_eq!(g.len(), 0);
    }

    #[test]
    fn a_full_table_gives_up_counting_entries_then_drops_new_initials() {
        let mut g = Guard::new(VERSIONS, LIFETIME, 4);
        let now = Instant::now();
        for port in 1..=4 {
            assert_eq!(g.received(now, addr(port), &initial(1200)), Ok(()));
        }
        assert!(g.attempt(now, addr(1), false));
        assert!(g.attempt(now, addr(2), false));
        // Full: the two still counting make room.
        assert_eq!(g.received(now, addr(5), &initial(1200)), Ok(()));
        assert_eq!(g.len(), 3);
        assert!(g.attempt(now, addr(5), false));
        // Port 3's attempt, after its entry was given up: limited from 1200 bytes.
        assert!(g.attempt(now, addr(3), false));
        assert_eq!(g.len(), 4);
        // Full of limited attempts: a new Initial is dropped, a new attempt refused.
        assert_eq!(
            g.received(now, addr(6), &initial(1200)),
            Err(Discard::TrackingFull)
        );
        assert!(!g.attempt(now, addr(6), false));
        // Validated attempts need no room.
        assert!(g.attempt(now, addr(7), true));
        // Tracked addresses still count, and room comes back as attempts end.
        assert_eq!(g.received(now, addr(1), &initial(1200)), Ok(()));
        g.forget(addr(2));
        assert_eq!(g.received(now, addr(6), &initial(1200)), Ok(()));
        assert_eq!(g.len(), 4);
        // Expired ones make room too.
        assert_eq!(g.received(now + LIFETIME, addr(8), &initial(1200)), Ok(()));
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn presence_follows_the_tracked_addresses() {
        let mut g = Guard::new(VERSIONS, LIFETIME, 2);
        let presence = g.presence();
        let now = Instant::now();
        let mapped = SocketAddr::from((std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped(), 1));
        assert!(!presence.may_track(addr(1)));
        limited(&mut g, now);
        assert!(presence.may_track(addr(1)) && presence.may_track(mapped));
        assert!(g.attempt(now, addr(2), false));
        assert!(g.received(now, addr(3), &initial(1200)).is_err(), "full");
        g.forget(addr(1));
        assert!(!presence.may_track(addr(1)));
        assert!(presence.may_track(addr(2)));
        assert_eq!(g.received(now, addr(3), &initial(1200)), Ok(()));
        // Swept out, given up to make room, validated: all leave.
        assert_eq!(g.received(now + LIFETIME, addr(4), &initial(1200)), Ok(()));
        assert!(!presence.may_track(addr(2)) && !presence.may_track(addr(3)));
        assert_eq!(g.received(now + LIFETIME, addr(5), &initial(1200)), Ok(()));
        assert_eq!(g.received(now + LIFETIME, addr(6), &initial(1200)), Ok(()));
        assert!(!presence.may_track(addr(4)) && !presence.may_track(addr(5)));
        assert!(g.attempt(now + LIFETIME, addr(6), true));
        let total: u32 = presence
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        assert_eq!(total as usize, g.len());
    }

    #[test]
    fn malformed_packets_prove_nothing_and_do_not_panic() {
        let g = &mut guard();
        let now = Instant::now();
        limited(g, now);
        assert_eq!(g.send(now, addr(1), &server_initial(1200), None), 1200);
        let good = long(TYPE_HANDSHAKE, 1, SERVER_CID, &[2; 8], 80);
        for cut in 0..good.len() - 80 {
            let _ = g.received(now, addr(1), &good[..cut]);
            assert_eq!(g.len(), 1, "cut at {cut}");
        }
        // Lengths past the end, a huge varint, a connection ID longer than the packet.
        let mut lying = long(TYPE_INITIAL, 1, &[1; 8], &[2; 8], 0);
        let at = lying.len() - 2;
        lying[at..].copy_from_slice(&[0x7F, 0xFF]);
        lying.extend(long(TYPE_HANDSHAKE, 1, SERVER_CID, &[2; 8], 10));
        assert_eq!(g.received(now, addr(1), &lying), Ok(()));
        let mut huge = vec![0xC0, 0, 0, 0, 1, 0, 0, 0xFF];
        huge.extend_from_slice(&[0xFF; 8]);
        assert_eq!(g.received(now, addr(1), &huge), Ok(()));
        assert_eq!(
            g.received(now, addr(1), &[0xC0, 0, 0, 0, 1, 200, 1]),
            Ok(())
        );
        assert_eq!(g.len(), 1);
        for b in 0..=255u8 {
            let _ = g.received(now, addr(1), &[b; 3]);
            let _ = g.send(now, addr(1), &[b; 3], None);
        }
    }
}
