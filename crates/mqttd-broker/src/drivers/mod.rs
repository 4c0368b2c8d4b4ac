//! Transport drivers: thin async glue between a transport and a connection's
//! [`ConnectionCore`].
//!
//! A driver reads bytes into the core per stream, writes the output the core allows out,
//! passes in mailbox wake-ups, storage watermarks and timers, and answers the core's
//! [`Request`]s. [`stream`] drives a connection over one byte stream; a multi-stream driver
//! (MQTT over QUIC with data streams) reuses [`answer`], [`durable`], [`wait_for_room`] and
//! [`sleep_until`], and differs only in reading and writing several streams and reporting
//! the ones that end with `stream_lost`.

pub(crate) mod park;
pub(crate) mod quic;
pub(crate) mod stream;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tracing::{info, warn};

use mqttd_proto::{ReasonCode, StreamId};

use crate::broker::{Inner, SessionHandle};
pub(crate) use crate::clock::now;
use crate::core::{ConnectionCore, Request};
use crate::hooks::Peer;
use crate::storage::Watermark;

/// A new connection's core, boxed, and its tracing span: what every driver starts with.
///
/// The core is built before the connection's future exists, and boxed: an async fn keeps its
/// arguments twice (as captured and as locals), so the future carries a pointer to the core
/// instead of the core and the `Peer` it was built from. Every byte of it is paid per idle
/// connection. Counts the connection in `connections_open`; the driver counts it out.
pub(crate) fn open(
    inner: &Arc<Inner>,
    peer: Peer,
    accepted: Instant,
) -> (Box<ConnectionCore>, tracing::Span) {
    let span = tracing::info_span!(
        "conn",
        peer = %peer.addr,
        listener = %peer.listener,
        transport = %peer.transport,
        client_id = tracing::field::Empty,
    );
    inner.metrics.connections_open.inc();
    let watermark = *inner.storage.watermark().borrow();
    let core = Box::new(ConnectionCore::new(
        inner.clone(),
        peer,
        accepted,
        watermark,
    ));
    (core, span)
}

/// Answers one of the core's requests; the core reads nothing more meanwhile.
pub(crate) async fn answer(inner: &Arc<Inner>, core: &mut ConnectionCore, request: Request) {
    match request {
        Request::CheckPassword(check) => {
            let checker = inner.clone();
            let verify = crate::auth::verify_blocking(move || check.verify(&checker));
            let deadline = core.poll_timeout();
            tokio::select! {
                verdict = verify => match verdict {
                    Some(verdict) => core.authenticated(now(), verdict),
                    None => {
                        warn!("authentication failed unexpectedly");
                        core.abandon(now(), ReasonCode::UnspecifiedError);
                    }
                },
                _ = sleep_until(deadline) => {
                    info!("no turn to check the password before the CONNECT deadline");
                    core.abandon(now(), ReasonCode::ServerBusy);
                }
                _ = inner.shutdown.cancelled() => {
                    core.abandon(now(), ReasonCode::ServerUnavailable);
                }
            }
        }
        Request::AcquireSession(request) => {
            let mailbox = core.mailbox().clone();
            let acquired = inner.acquire(now(), &request, &mailbox).await;
            core.session_acquired(now(), acquired);
        }
    }
}

/// Resolves with the next watermark the storage reports (never, if `watermark` is `None`
/// or the storage is gone).
pub(crate) async fn durable(watermark: &mut Option<watch::Receiver<Watermark>>) -> Watermark {
    if let Some(rx) = watermark {
        if rx.changed().await.is_ok() {
            return *rx.borrow_and_update();
        }
    }
    std::future::pending().await
}

/// Waits until `stream`'s output holds nothing back for storage (or storage failed),
/// releasing it watermark by watermark: a driver's last words (CONNACK refusal, DISCONNECT)
/// go only once what they acknowledge is durable.
pub(crate) async fn release_held(
    inner: &Inner,
    core: &mut ConnectionCore,
    stream: StreamId,
    watermark: &mut Option<watch::Receiver<Watermark>>,
) {
    while core.output(stream).is_some_and(|o| o.holding()) {
        let rx = watermark.get_or_insert_with(|| {
            let mut rx = inner.storage.watermark();
            // The core may not have seen the latest watermark yet.
            rx.mark_changed();
            rx
        });
        if rx.changed().await.is_err() {
            break;
        }
        let w = *rx.borrow_and_update();
        core.release_output(w);
        if w.failed {
            break;
        }
    }
}

/// Resolves when `handle`'s queue or output may have room.
pub(crate) async fn wait_for_room(handle: Option<&SessionHandle>) {
    match handle {
        Some(h) => h.room.notified().await,
        None => std::future::pending().await,
    }
}

/// Resolves at `deadline`, or never.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
