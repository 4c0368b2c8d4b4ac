//! What a connection has to send, per stream, and the durability gate in front of it.
//!
//! Persist, then acknowledge: a packet that depends on a change to durable state is encoded at
//! once but may leave only when the storage's watermark passes that change. Each stream's
//! output remembers from which byte on it waits for which change, so the output of one stream
//! never waits for a change that only another stream's packets depend on.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::BytesMut;
use mqttd_proto::StreamId;

use super::sparse::SparseVec;
use crate::storage::{Ticket, Watermark};

/// One stream's output: encoded packets, and the changes parts of them wait for.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// Encoded, not yet written.
    pub(crate) buf: BytesMut,
    /// What waits for storage; created the first time something does (most connections of a
    /// broker without persistence never hold anything, and every connection pays its size).
    gate: Option<Box<Gate>>,
}

/// Where a stream's output waits for storage.
#[derive(Debug, Default)]
struct Gate {
    /// Stream offset of the first byte in the output's buffer, counted from the gate's
    /// creation.
    base: u64,
    /// From which stream offset output waits for which change, oldest first.
    holds: VecDeque<(u64, Ticket)>,
    /// Stream offset just past a CONNACK that was held: until output passes it, the client
    /// has not been told it is connected.
    connack_end: Option<u64>,
    /// Stream offset just past the last PUBLISH that waited for a fence
    /// (`Storage::delivery_fence`), and the earliest time by which the fenced PUBLISHes not
    /// yet written must be: later, they need another fence.
    fenced: Option<(u64, Instant)>,
}

impl Output {
    /// Bytes that may be written now.
    pub(crate) fn writable(&self) -> &[u8] {
        let len = match self
            .gate
            .as_ref()
            .and_then(|g| Some((g.base, g.holds.front()?)))
        {
            Some((base, &(offset, _))) => {
                (offset.saturating_sub(base) as usize).min(self.buf.len())
            }
            None => self.buf.len(),
        };
        self.buf.get(..len).unwrap_or_default()
    }

    /// The transport took the first `n` writable bytes.
    pub(crate) fn advance(&mut self, n: usize) {
        let n = n.min(self.buf.len());
        bytes::Buf::advance(&mut self.buf, n);
        if let Some(gate) = &mut self.gate {
            gate.base += n as u64;
            if gate.fenced.is_some_and(|(end, _)| end <= gate.base) {
                gate.fenced = None;
            }
        }
        if self.buf.is_empty() {
            // Hold no buffer while there is nothing to send.
            self.buf = BytesMut::new();
        }
    }

    /// Whether the output holds nothing that [`Output::default`] would not: no bytes, and no
    /// hold or CONNACK still ahead in the stream.
    pub(crate) fn is_unused(&self) -> bool {
        self.buf.is_empty()
            && self
                .gate
                .as_ref()
                .is_none_or(|g| g.holds.is_empty() && g.connack_end.is_none_or(|end| end <= g.base))
    }

    /// Whether some output waits for storage.
    pub(crate) fn holding(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| !g.holds.is_empty())
    }

    /// Everything from buffer offset `start` on waits for `needs`; `connack_end`, if given,
    /// is the buffer offset just past a CONNACK among it.
    pub(crate) fn hold(&mut self, start: usize, needs: Ticket, connack_end: Option<usize>) {
        let gate = self.gate.get_or_insert_with(Box::default);
        if gate.holds.back().is_none_or(|&(_, t)| t < needs) {
            gate.holds.push_back((gate.base + start as u64, needs));
        }
        if let Some(end) = connack_end {
            gate.connack_end = Some(gate.base + end as u64);
        }
    }

    /// The output up to buffer offset `end` holds PUBLISHes that must be written by
    /// `until`.
    pub(crate) fn fenced(&mut self, end: usize, until: Instant) {
        let gate = self.gate.get_or_insert_with(Box::default);
        let end = gate.base + end as u64;
        gate.fenced = Some(match gate.fenced {
            Some((e, u)) => (e.max(end), u.min(until)),
            None => (end, until),
        });
    }

    /// When fenced PUBLISHes not yet written must be written by, if there are any.
    pub(crate) fn fenced_until(&self) -> Option<Instant> {
        self.gate.as_ref()?.fenced.map(|(_, until)| until)
    }

    /// Fenced PUBLISHes were not written in time: everything not yet written waits for
    /// `needs` (a new fence) too, and must be written by `until` (`None`: no deadline);
    /// `covered`, if `needs` is durable already.
    pub(crate) fn refence(&mut self, needs: Ticket, until: Option<Instant>, covered: bool) {
        let gate = self.gate.get_or_insert_with(Box::default);
        gate.fenced = gate.fenced.zip(until).map(|((end, _), until)| (end, until));
        if covered {
            return;
        }
        // A later ticket is covered only once every earlier one is: one hold for the
        // latest of them from the first byte not written stands for them all.
        let last = gate.holds.back().map_or(needs, |&(_, t)| t.max(needs));
        gate.holds.clear();
        gate.holds.push_back((gate.base, last));
    }

    /// Releases what `watermark` covers.
    pub(crate) fn release(&mut self, watermark: Watermark) {
        if let Some(gate) = &mut self.gate {
            while gate
                .holds
                .front()
                .is_some_and(|&(_, t)| watermark.covers(t))
            {
                gate.holds.pop_front();
            }
        }
    }

    /// The ticket the oldest held output waits for.
    pub(crate) fn first_held(&self) -> Option<Ticket> {
        self.gate
            .as_ref()
            .and_then(|g| g.holds.front().map(|&(_, t)| t))
    }

    /// Storage failed: drops what waits for it, which acknowledges changes that will never be
    /// durable. Returns whether a CONNACK was among it (then nothing at all may be sent).
    pub(crate) fn cut_held(&mut self) -> bool {
        let Some(gate) = &mut self.gate else {
            return false;
        };
        let cut = gate.holds.front().map(|&(offset, _)| offset);
        gate.holds.clear();
        match cut {
            Some(offset) => {
                self.buf.truncate(offset.saturating_sub(gate.base) as usize);
                gate.connack_end.is_some_and(|end| end > offset)
            }
            None => false,
        }
    }
}

/// The outputs of a connection's streams. A byte-stream connection has only the control
/// stream's, which costs no allocation.
#[derive(Debug, Default)]
pub(crate) struct Outputs {
    control: Output,
    /// Data streams' (multi-stream QUIC only).
    data: SparseVec<(StreamId, Output)>,
}

impl Outputs {
    /// Frees the buffers of outputs with nothing to send (see [`ConnectionCore::compact`]).
    ///
    /// [`ConnectionCore::compact`]: super::ConnectionCore::compact
    pub(crate) fn compact(&mut self) {
        for output in std::iter::once(&mut self.control).chain(self.data.iter_mut().map(|(_, o)| o))
        {
            if output.buf.is_empty() && output.buf.capacity() > 0 {
                output.buf = BytesMut::new();
            }
        }
        self.data.release_if_empty();
    }

    /// The output of `stream`, created if new.
    /// Whether there is no data stream's output and the control stream's is unused
    /// ([`Output::is_unused`]): [`Outputs::default`] would do as well.
    pub(crate) fn is_unused(&self) -> bool {
        self.data.is_empty() && self.control.is_unused()
    }

    pub(crate) fn get_mut(&mut self, stream: StreamId) -> &mut Output {
        if stream.is_control() {
            return &mut self.control;
        }
        let at = match self.data.iter().position(|(s, _)| *s == stream) {
            Some(at) => at,
            None => {
                self.data.push((stream, Output::default()));
                self.data.len() - 1
            }
        };
        match self.data.get_mut(at) {
            Some((_, output)) => output,
            // Unreachable: `at` was just found or pushed.
            None => &mut self.control,
        }
    }

    /// The output of `stream`, if it has one.
    pub(crate) fn get(&self, stream: StreamId) -> Option<&Output> {
        if stream.is_control() {
            return Some(&self.control);
        }
        self.data.iter().find(|(s, _)| *s == stream).map(|(_, o)| o)
    }

    /// Every stream's output.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (StreamId, &Output)> {
        std::iter::once((StreamId::CONTROL, &self.control))
            .chain(self.data.iter().map(|(s, o)| (*s, o)))
    }

    /// Every stream's output, mutably.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Output> {
        std::iter::once(&mut self.control).chain(self.data.iter_mut().map(|(_, o)| o))
    }

    /// Bytes waiting across all streams.
    pub(crate) fn len(&self) -> usize {
        self.iter().map(|(_, o)| o.buf.len()).sum()
    }

    // Used by the simulation now, and by the multi-stream QUIC driver.
    #[cfg_attr(not(test), allow(dead_code))]
    /// Forgets a data stream that ended; what it still had to send is lost with it (the
    /// protocol core resends what matters on the control stream).
    pub(crate) fn remove(&mut self, stream: StreamId) {
        self.data.retain(|(s, _)| *s != stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(n: u64) -> Ticket {
        Ticket::new(n)
    }

    fn watermark(durable: u64, failed: bool) -> Watermark {
        Watermark::new(durable, failed)
    }

    #[test]
    fn held_output_is_released_by_the_watermark() {
        let mut out = Output::default();
        out.buf.extend_from_slice(b"ack1");
        out.hold(0, ticket(5), None);
        out.buf.extend_from_slice(b"ack2");
        out.hold(4, ticket(7), None);
        assert_eq!(out.writable(), b"");
        out.release(watermark(5, false));
        assert_eq!(out.writable(), b"ack1");
        out.advance(2);
        assert_eq!(out.writable(), b"k1");
        out.release(watermark(7, false));
        assert_eq!(out.writable(), b"k1ack2");
        out.advance(6);
        assert!(out.buf.is_empty() && !out.holding());
    }

    #[test]
    fn output_before_a_hold_goes_out_and_a_failure_cuts_the_rest() {
        let mut out = Output::default();
        out.buf.extend_from_slice(b"ping");
        out.buf.extend_from_slice(b"connack");
        out.hold(4, ticket(3), Some(11));
        assert_eq!(out.writable(), b"ping");
        assert!(out.cut_held(), "the CONNACK was among what was cut");
        assert_eq!(&out.buf[..], b"ping");
    }

    #[test]
    fn streams_have_their_own_output() {
        let mut outs = Outputs::default();
        outs.get_mut(StreamId::new(4))
            .buf
            .extend_from_slice(b"data");
        outs.get_mut(StreamId::CONTROL).buf.extend_from_slice(b"c");
        outs.get_mut(StreamId::new(4)).hold(0, ticket(1), None);
        assert_eq!(
            outs.get(StreamId::CONTROL).map(Output::writable),
            Some(&b"c"[..])
        );
        assert_eq!(
            outs.get(StreamId::new(4)).map(Output::writable),
            Some(&b""[..])
        );
        assert_eq!(outs.len(), 5);
        outs.remove(StreamId::new(4));
        assert_eq!(outs.len(), 1);
    }
}
