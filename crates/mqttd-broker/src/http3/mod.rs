//! HTTP/3 on the QUIC listener's port: `GET /health` and `GET /metrics`, so that standard HTTP/3
//! tools (curl, ngtcp2's clients, load balancer probes) can check a broker that only listens on
//! QUIC.
//!
//! The QUIC listener hands a connection here when its client negotiated the ALPN [`ALPN`]
//! (`h3`); MQTT clients negotiate `mqtt` on the same port. The pages and their bodies are the HTTP
//! endpoint's ([`crate::http::Page`]), so both transports answer alike. The `h3` crate speaks
//! HTTP/3; [`adapter`] puts noq's connection under its QUIC traits.
//!
//! Everything one connection can ask for is bounded: [`MAX_REQUESTS`] requests, then GOAWAY;
//! [`MAX_IN_FLIGHT`] at a time; each within [`REQUEST_TIMEOUT`]; at most [`MAX_BODY`] bytes of
//! request body, which is read and dropped; header sections up to [`MAX_FIELD_SECTION_SIZE`];
//! and a connection with no new request for [`IDLE_TIMEOUT`] is sent GOAWAY.

mod adapter;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, Method, Request, Response, StatusCode};
use bytes::{Buf, Bytes};
use h3::error::{Code, ConnectionError, StreamError};
use h3::server::{RequestResolver, RequestStream};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::broker::Inner;
use crate::http::{Page, Reply};

/// The ALPN protocol id of HTTP/3 (RFC 9114, section 3.1).
pub(crate) const ALPN: &[u8] = b"h3";

/// Requests one connection may make; then the server sends GOAWAY and closes it once the
/// answers are out. Probes make one or two.
pub(crate) const MAX_REQUESTS: usize = 100;
/// Requests of one connection answered at the same time; further ones wait in QUIC's stream
/// flow control.
pub(crate) const MAX_IN_FLIGHT: usize = 8;
/// How long one request may take, from its stream's arrival to its answer's last byte handed
/// to QUIC; a request that takes longer is reset with `H3_REQUEST_CANCELLED`.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may go without a new request before the server sends GOAWAY.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server waits, after GOAWAY and the last answer, for the client to close the
/// connection; closing first would drop answers that are not yet acknowledged.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// The largest request body accepted (and dropped); a larger one is answered 413.
pub(crate) const MAX_BODY: usize = 1024;
/// The largest header section (QPACK-decoded) accepted, as HTTP/3's
/// `SETTINGS_MAX_FIELD_SECTION_SIZE`.
pub(crate) const MAX_FIELD_SECTION_SIZE: u64 = 16 * 1024;

/// Unidirectional streams a client must be allowed in the QUIC listener's transport parameters
/// (its control stream and two QPACK streams, RFC 9114 section 6.2): clients check, and ngtcp2
/// refuses a server that allows fewer.
pub(crate) const MIN_UNI_STREAMS: u32 = 3;
/// Unidirectional streams a client may have open once it has negotiated `h3`: the three and one
/// for a reserved (grease) stream, which the h3 crate's client sends.
const CLIENT_UNI_STREAMS: u32 = MIN_UNI_STREAMS + 1;

/// The methods the pages allow, for 405's `Allow` header.
const ALLOW: &str = "GET,HEAD";

type Connection = h3::server::Connection<adapter::Connection, Bytes>;
type Stream = RequestStream<adapter::BidiStream<Bytes>, Bytes>;

/// Why a connection's request loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The broker is shutting down.
    Shutdown,
    /// The connection made [`MAX_REQUESTS`] requests.
    RequestLimit,
    /// No request for [`IDLE_TIMEOUT`].
    Idle,
    /// The client sent GOAWAY and its requests are answered.
    ClientDone,
}

/// Serves HTTP/3 on `conn`, whose handshake negotiated [`ALPN`], until the client closes it,
/// it reaches a bound, or the broker shuts down; then closes it with `H3_NO_ERROR`.
pub(crate) async fn serve(conn: noq::Connection, inner: Arc<Inner>) {
    let id = conn.stable_id();
    conn.set_max_concurrent_uni_streams(noq::VarInt::from_u32(CLIENT_UNI_STREAMS));
    match run(&conn, &inner).await {
        Ok(end) => tracing::debug!(connection = id, ?end, "HTTP/3 connection done"),
        Err(error) if error.is_h3_no_error() => {
            tracing::debug!(connection = id, "HTTP/3 connection closed by the client");
        }
        Err(error) => tracing::debug!(connection = id, %error, "HTTP/3 connection failed"),
    }
    conn.close(noq::VarInt::from_u32(0x100), b"");
}

async fn run(conn: &noq::Connection, inner: &Arc<Inner>) -> Result<End, ConnectionError> {
    let mut builder = h3::server::builder();
    builder.max_field_section_size(MAX_FIELD_SECTION_SIZE);
    let build = builder.build(adapter::Connection::new(conn.clone()));
    let Ok(h3) = timeout(REQUEST_TIMEOUT, build).await else {
        // The control stream could not even be opened in time.
        return Ok(End::Idle);
    };
    let mut h3: Connection = h3?;
    let mut requests = JoinSet::new();
    let mut accepted = 0;
    let end = loop {
        // Reap the answered requests; if MAX_IN_FLIGHT are still running, wait for one, which
        // REQUEST_TIMEOUT bounds.
        while requests.try_join_next().is_some() {}
        if requests.len() >= MAX_IN_FLIGHT {
            requests.join_next().await;
        }
        if accepted == MAX_REQUESTS {
            break End::RequestLimit;
        }
        // `accept` is only cancelled here on the way out, so that a GOAWAY it is writing
        // cannot be cut short and leave the control stream half-written for the next call.
        let next = tokio::select! {
            biased;
            () = inner.shutdown.cancelled() => break End::Shutdown,
            next = timeout(IDLE_TIMEOUT, h3.accept()) => next,
        };
        match next {
            Err(_elapsed) => break End::Idle,
            Ok(Ok(Some(resolver))) => {
                accepted += 1;
                requests.spawn(answer(resolver, inner.clone()));
            }
            Ok(Ok(None)) => break End::ClientDone,
            Ok(Err(error)) => return Err(error),
        }
    };
    if end != End::ClientDone {
        // Tell the client which requests will be answered (all it has made), so that it
        // retries none of them and makes no more. A client that has let the control stream's
        // window fill gets no GOAWAY.
        if let Ok(sent) = timeout(CLOSE_GRACE, h3.shutdown(1)).await {
            sent?;
        }
    }
    while requests.join_next().await.is_some() {}
    // The client closes once it has its answers; if it does not, close anyway.
    let _ = timeout(CLOSE_GRACE, conn.closed()).await;
    Ok(end)
}

/// Answers one request within [`REQUEST_TIMEOUT`].
async fn answer(resolver: RequestResolver<adapter::Connection, Bytes>, inner: Arc<Inner>) {
    let answered = timeout(REQUEST_TIMEOUT, async {
        let (request, mut stream) = resolver.resolve_request().await?;
        respond(&request, &mut stream, &inner).await
    })
    .await;
    match answered {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, "HTTP/3 request failed"),
        // The request's stream was dropped with the future; h3 resets a stream it did not
        // finish.
        Err(_elapsed) => tracing::debug!("HTTP/3 request timed out"),
    }
}

/// What the endpoint answers to a request with `method` and `path`, before its body: the
/// page, or 404 for another path, or 405 for another method.
fn route(method: &Method, path: &str, inner: &Inner) -> (Reply, bool) {
    let is_head = method == Method::HEAD;
    let reply = match Page::at(path) {
        None => Reply::empty(StatusCode::NOT_FOUND),
        Some(page) if method == Method::GET || is_head => page.reply(inner),
        Some(_) => Reply::empty(StatusCode::METHOD_NOT_ALLOWED),
    };
    (reply, is_head)
}

async fn respond(
    request: &Request<()>,
    stream: &mut Stream,
    inner: &Inner,
) -> Result<(), StreamError> {
    let (mut reply, is_head) = route(request.method(), request.uri().path(), inner);
    if !read_body(request, stream).await? {
        reply = Reply::empty(StatusCode::PAYLOAD_TOO_LARGE);
        // We have what we need of the request: the client can stop sending (RFC 9114, 4.1).
        stream.stop_sending(Code::H3_NO_ERROR);
    }
    let mut response = Response::new(());
    *response.status_mut() = reply.status;
    let headers = response.headers_mut();
    if !reply.content_type.is_empty() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(reply.content_type),
        );
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(reply.body.len()));
    if reply.status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static(ALLOW));
    }
    stream.send_response(response).await?;
    if !is_head && !reply.body.is_empty() {
        stream.send_data(Bytes::from(reply.body)).await?;
    }
    stream.finish().await
}

/// Reads and drops the request body; `false` if it is (or says it is) over [`MAX_BODY`].
async fn read_body(request: &Request<()>, stream: &mut Stream) -> Result<bool, StreamError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Ok(false);
    }
    let mut read = 0;
    while let Some(chunk) = stream.recv_data().await? {
        read += chunk.remaining();
        if read > MAX_BODY {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
