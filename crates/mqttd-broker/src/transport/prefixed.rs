//! A byte stream with bytes put back in front: what a handshake read past its own end.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, read after the bytes a handshake already took from it but did not use (the start
/// of the client's MQTT or WebSocket data). Writes go straight to `inner`.
#[derive(Debug)]
pub(crate) struct Prefixed<S> {
    inner: S,
    /// The bytes still to be read before `inner`'s; dropped once read, so that a long-lived
    /// connection holds nothing for them.
    prefix: Option<Box<[u8]>>,
    /// How much of `prefix` was read.
    pos: usize,
}

impl<S> Prefixed<S> {
    /// `inner`, with `prefix` read first.
    pub(crate) fn new(inner: S, prefix: &[u8]) -> Self {
        Self {
            inner,
            prefix: (!prefix.is_empty()).then(|| prefix.into()),
            pos: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(prefix) = &this.prefix {
            let rest = prefix.get(this.pos..).unwrap_or_default();
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.pos += n;
            if this.pos >= prefix.len() {
                this.prefix = None;
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefix_is_read_first_then_dropped() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Prefixed::new(a, b"hello ");
        b.write_all(b"world").await.unwrap();
        drop(b);
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"hello world");
        assert!(s.prefix.is_none());
    }

    #[tokio::test]
    async fn small_reads_take_the_prefix_piecewise() {
        let (a, b) = tokio::io::duplex(64);
        drop(b);
        let mut s = Prefixed::new(a, b"abc");
        let mut one = [0u8; 2];
        assert_eq!(s.read(&mut one).await.unwrap(), 2);
        assert_eq!(&one, b"ab");
        assert_eq!(s.read(&mut one).await.unwrap(), 1);
        assert_eq!(one[0], b'c');
        assert_eq!(s.read(&mut one).await.unwrap(), 0);
    }
}
