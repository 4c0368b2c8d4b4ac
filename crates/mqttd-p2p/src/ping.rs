//! Pings between nodes: the operator's first diagnostic of a peer-to-peer path. A node that
//! accepts [`PING_ALPN`] answers with [`serve_pings`]; [`Pinger`] sends them and reports, for
//! each answer, the round-trip time and the path it came back on (direct or relayed).
//!
//! The protocol: the pinging node opens one bidirectional stream and writes [`PING_SIZE`]
//! bytes per ping (its sequence number, big-endian); the answering node writes each back as
//! it reads it, and stops when the stream ends, after [`MAX_PINGS`] pings, or when the
//! connection closes. QUIC delivers every byte, so a ping that took longer than the pinger
//! waited is not lost but late: the pinger passes over answers to earlier pings.

use std::time::{Duration, Instant};

use crate::node::{Connection, ConnectionError, RecvStream, SendStream};
use crate::path::PathKind;

/// The ALPN of the ping protocol.
pub const PING_ALPN: &[u8] = b"mqttd-ping";
/// Bytes per ping: a sequence number.
pub const PING_SIZE: usize = 8;
/// Pings answered per connection at most (an hour at one a second); the stream is then
/// finished.
pub const MAX_PINGS: u64 = 3600;

/// Answers pings on `conn`: the streams the peer opens, one after the other, each echoed until
/// it ends (or [`MAX_PINGS`] in all). Returns the pings answered once the peer closes the
/// connection or stops pinging.
pub async fn serve_pings(conn: &Connection) -> u64 {
    let mut answered = 0;
    while answered < MAX_PINGS {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            break;
        };
        let mut ping = [0u8; PING_SIZE];
        while answered < MAX_PINGS {
            if recv.read_exact(&mut ping).await.is_err() || send.write_all(&ping).await.is_err() {
                break;
            }
            answered += 1;
        }
        let _ = send.finish();
    }
    answered
}

/// One answered ping.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pong {
    /// The ping's sequence number.
    pub seq: u64,
    /// From sending the ping to reading its answer.
    pub rtt: Duration,
    /// The path carrying the connection's data when the answer came; `None` if it has none
    /// (closing).
    pub path: Option<PathKind>,
}

/// Why a ping failed (other than by not being answered in time).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PingError {
    /// The connection or the stream was lost.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The peer ended the stream: it answers no more pings.
    #[error("the peer stopped answering pings")]
    Finished,
}

/// Sends pings on one stream of a connection made for [`PING_ALPN`].
#[derive(Debug)]
pub struct Pinger {
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    /// Bytes of an answer read so far: kept across a [`Pinger::ping`] that timed out.
    partial: Vec<u8>,
    next: u64,
}

impl Pinger {
    /// Opens the ping stream on `conn`.
    pub async fn open(conn: Connection) -> Result<Self, ConnectionError> {
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            conn,
            send,
            recv,
            partial: Vec::with_capacity(PING_SIZE),
            next: 1,
        })
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Sends the next ping (sequence numbers from 1) and waits up to `wait` for its answer:
    /// `Ok(None)` if none came in time.
    pub async fn ping(&mut self, wait: Duration) -> Result<Option<Pong>, PingError> {
        let seq = self.next;
        self.next += 1;
        let sent = Instant::now();
        self.send
            .write_all(&seq.to_be_bytes())
            .await
            .map_err(|e| PingError::Lost(e.to_string()))?;
        let deadline = sent + wait;
        loop {
            let answer = match tokio::time::timeout_at(deadline.into(), self.read_answer()).await {
                Ok(answer) => answer?,
                Err(_) => return Ok(None),
            };
            // An answer to an earlier ping that timed out: passed over.
            if answer == seq {
                return Ok(Some(Pong {
                    seq,
                    rtt: sent.elapsed(),
                    path: self.conn.selected_path().map(|p| p.kind),
                }));
            }
        }
    }

    /// Reads the next answer's sequence number. Cancel-safe: what a cancelled call read stays
    /// in `partial`.
    async fn read_answer(&mut self) -> Result<u64, PingError> {
        loop {
            if self.partial.len() >= PING_SIZE {
                let mut seq = [0u8; PING_SIZE];
                seq.copy_from_slice(&self.partial[..PING_SIZE]);
                self.partial.drain(..PING_SIZE);
                return Ok(u64::from_be_bytes(seq));
            }
            let mut buf = [0u8; PING_SIZE];
            let want = PING_SIZE - self.partial.len();
            match self.recv.read(&mut buf[..want]).await {
                Ok(Some(n)) => self.partial.extend_from_slice(&buf[..n]),
                Ok(None) => return Err(PingError::Finished),
                Err(e) => return Err(PingError::Lost(e.to_string())),
            }
        }
    }

    /// Ends the stream and closes the connection (code 0).
    pub fn close(mut self) {
        let _ = self.send.finish();
        self.conn.close(0, b"done");
    }
}
