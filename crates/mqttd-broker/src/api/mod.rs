//! The REST admin API, under `/api/v1/` on the `http://` listener.
//!
//! Every path needs an API key (`Authorization: Bearer KEY`, see [`KeyStore`]), loopback
//! included; failed attempts are limited per source address (`limit.rs`), answered 429 past
//! the limit. Errors are JSON with a stable `code` ([`ErrorBody`]). The OpenAPI document at
//! `/api/v1/openapi.json` is generated from the handlers below (utoipa), so it cannot drift
//! from them.
//!
//! The handlers only read snapshots of the broker's state (`Inner::session_views` and
//! friends), copied out from under the locks before they are serialized, and act through the
//! same paths clients do: a kick goes through the connection's mailbox (like a takeover), a
//! publication through routing.

// utoipa's generated code names the query-parameter types by their full path.
#![allow(unused_qualifications)]

mod keys;
mod limit;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use mqttd_proto::{ClientId, Message, QoS, TopicFilter, TopicName};

pub use keys::{KeyError, KeyStore, StoredKey, KEY_FILE};
pub(crate) use limit::{FailureLimiter, DEFAULT_RATE};

use crate::broker::{Discard, Inner, Kick, SessionState, SessionView};
use crate::storage::Batch;

/// The largest page a list returns.
const MAX_LIMIT: usize = 1000;
/// A list's page size when none is asked for.
const DEFAULT_LIMIT: usize = 100;

/// The API's routes, all behind the key check, relative to `/api` where the HTTP endpoint
/// nests them.
pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/clients", get(list_clients))
        .route(
            "/v1/clients/{client_id}",
            get(get_client).delete(kick_client),
        )
        .route(
            "/v1/clients/{client_id}/subscriptions",
            get(client_subscriptions),
        )
        .route("/v1/subscriptions", get(list_subscriptions))
        .route("/v1/sessions", get(list_sessions))
        .route(
            "/v1/sessions/{client_id}",
            get(get_session).delete(discard_session),
        )
        .route("/v1/retained", get(list_retained))
        .route(
            "/v1/retained/{*topic}",
            get(get_retained).delete(delete_retained),
        )
        .route("/v1/listeners", get(list_listeners))
        .route("/v1/stats", get(stats))
        .route("/v1/bridges", get(list_bridges))
        .route("/v1/p2p/peers", get(list_peers))
        .route("/v1/config", get(get_config))
        .route("/v1/publish", axum::routing::post(publish))
        .route("/v1/reload", axum::routing::post(reload))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/join", axum::routing::post(cluster_join))
        .route("/v1/cluster/leave", axum::routing::post(cluster_leave))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            inner.clone(),
            authenticate,
        ))
        .with_state(inner)
}

// ---- Errors ---------------------------------------------------------------------------------

/// An error, as every failed request is answered.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ErrorBody {
    /// Stable and machine-readable: `unauthorized`, `rate_limited`, `not_found`,
    /// `not_connected`, `connected`, `bad_request`, `refused`, `reload_failed`, `internal`;
    /// for the cluster: `not_configured`, `no_cluster`, `no_leader`, `cluster_failed`.
    pub code: String,
    /// For people; may change.
    pub message: String,
}

/// An error with its HTTP status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_owned(),
            message: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let retry = DEFAULT_RATE.refill.as_secs().max(1).to_string();
                if let Ok(value) = HeaderValue::from_str(&retry) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
            }
            _ => {}
        }
        response
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such API path")
}

// ---- Authentication -------------------------------------------------------------------------

/// Lets a request through only with a valid key, unless its source failed too often.
async fn authenticate(
    State(inner): State<Arc<Inner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let ip: IpAddr = peer.ip();
    let now = crate::clock::now();
    if !inner.api.failures.lock().allows(ip, now) {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many failed authentication attempts from this address; try again later",
        )
        .into_response();
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        // The scheme's name is case-insensitive (RFC 9110, 11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    let Some(presented) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an API key is required: Authorization: Bearer KEY (see `mqttd api-key create`)",
        )
        .into_response();
    };
    match inner.api.keys.verify(presented) {
        Some(name) => {
            tracing::debug!(key = %name, method = %request.method(), path = %request.uri().path(), "admin API");
            next.run(request).await
        }
        None => {
            // The key itself is never logged.
            tracing::info!(%ip, "admin API: invalid API key");
            inner.api.failures.lock().failed(ip, now);
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid API key")
                .into_response()
        }
    }
}

/// The API's own state in the broker: the keys and the failed-attempt limiter.
#[derive(Debug)]
pub(crate) struct ApiState {
    pub(crate) keys: KeyStore,
    pub(crate) failures: parking_lot::Mutex<FailureLimiter>,
}

impl ApiState {
    pub(crate) fn new(data_dir: &std::path::Path) -> Self {
        Self {
            keys: KeyStore::new(data_dir),
            failures: parking_lot::Mutex::new(FailureLimiter::new(DEFAULT_RATE)),
        }
    }
}

// ---- Pages ----------------------------------------------------------------------------------

/// Where a page is in its list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct PageMeta {
    /// This page's number, from 1.
    pub page: usize,
    /// Items per page.
    pub limit: usize,
    /// Items in the whole list (after filters).
    pub count: usize,
    /// Whether a further page has items.
    pub has_next: bool,
}

/// The page of `items` (sorted already) that `page` asks for.
fn paginate<T>(items: Vec<T>, page: Option<usize>, limit: Option<usize>) -> (Vec<T>, PageMeta) {
    let limit = limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let page = page.unwrap_or(1).max(1);
    let count = items.len();
    let start = (page - 1).saturating_mul(limit).min(count);
    let data: Vec<T> = items.into_iter().skip(start).take(limit).collect();
    let has_next = start + data.len() < count;
    (
        data,
        PageMeta {
            page,
            limit,
            count,
            has_next,
        },
    )
}

// ---- Clients --------------------------------------------------------------------------------

/// Filters of the client list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ClientQuery {
    /// Only client ids starting with this.
    client_id_prefix: Option<String>,
    /// Only clients with this user name.
    username: Option<String>,
    /// Only clients of this listener (its URL, as in `/api/v1/listeners`).
    listener: Option<String>,
    /// Only clients over this transport: `tcp`, `tls`, `ws`, `wss`, `quic`, `p2p`, `bridge`.
    transport: Option<String>,
    /// Only connected clients (`true`) or only sessions without a connection (`false`).
    connected: Option<bool>,
    /// Page number, from 1.
    page: Option<usize>,
    /// Items per page (at most 1000; default 100).
    limit: Option<usize>,
}

/// A client in the list: its session, and its connection if it has one.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ClientSummary {
    /// Client identifier.
    pub client_id: String,
    /// Whether a connection serves its session now.
    pub connected: bool,
    /// User name (connected clients).
    pub username: Option<String>,
    /// The listener's URL (connected clients).
    pub listener: Option<String>,
    /// `tcp`, `tls`, `ws`, `wss`, `quic`, `p2p` or `bridge` (connected clients).
    pub transport: Option<String>,
    /// The client's address (connected clients).
    pub peer_addr: Option<String>,
    /// `3.1`, `3.1.1` or `5.0` (connected clients).
    pub protocol_version: Option<String>,
    /// When it connected, in seconds since the Unix epoch (connected clients).
    pub connected_at: Option<u64>,
    /// When its connection ended, in seconds since the Unix epoch (sessions held offline).
    pub disconnected_at: Option<u64>,
    /// Subscriptions of its session.
    pub subscriptions: usize,
    /// Messages queued in its session.
    pub queued: usize,
    /// Messages sent and not yet acknowledged.
    pub in_flight: usize,
}

/// One page of clients.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ClientList {
    /// The clients, by client id.
    pub data: Vec<ClientSummary>,
    /// Where this page is.
    pub meta: PageMeta,
}

/// One client in full.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ClientDetail {
    /// What the list shows.
    #[serde(flatten)]
    pub summary: ClientSummary,
    /// Keep alive the broker enforces, in seconds (connected clients).
    pub keep_alive: Option<u16>,
    /// Whether its CONNECT asked for a clean start (connected clients).
    pub clean_start: Option<bool>,
    /// Session expiry interval, in seconds.
    pub session_expiry_interval: Option<u32>,
    /// Whether its session outlives its connection.
    pub persistent: bool,
    /// The identity of its TLS client certificate, or its node id over `p2p://`.
    pub tls_identity: Option<String>,
    /// Bytes received on this connection.
    pub bytes_in: Option<u64>,
    /// Bytes sent on this connection.
    pub bytes_out: Option<u64>,
    /// PUBLISH packets received on this connection.
    pub messages_in: Option<u64>,
    /// PUBLISH packets sent on this connection.
    pub messages_out: Option<u64>,
    /// Its subscriptions.
    pub subscription_list: Vec<SubscriptionInfo>,
    /// The path of a QUIC or `p2p://` client's connection, read now.
    pub quic: Option<QuicPath>,
}

/// A QUIC connection's path, from its QUIC statistics.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct QuicPath {
    /// Smoothed round-trip time, in milliseconds.
    pub rtt_ms: f64,
    /// Congestion window, in bytes.
    pub cwnd: u64,
    /// Congestion events.
    pub congestion_events: u64,
    /// QUIC packets sent.
    pub sent_packets: u64,
    /// QUIC packets declared lost.
    pub lost_packets: u64,
    /// UDP datagrams received.
    pub received_datagrams: u64,
    /// The client's address now, after any migration (`peer_addr` is the one it came from);
    /// none for a `p2p://` client relayed now.
    pub remote_addr: Option<String>,
    /// The relay's URL, for a `p2p://` client relayed now.
    pub relay: Option<String>,
}

/// A subscription.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct SubscriptionInfo {
    /// Topic filter (`$share/GROUP/...` for a shared one).
    pub filter: String,
    /// Maximum QoS granted.
    pub qos: u8,
    /// No Local.
    pub no_local: bool,
    /// Retain As Published.
    pub retain_as_published: bool,
    /// Retain Handling (0, 1 or 2).
    pub retain_handling: u8,
    /// Subscription identifier, if any.
    pub subscription_id: Option<u32>,
}

/// Seconds since the Unix epoch.
fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The wall-clock time of `at`, a reading of the broker's clock.
fn wall(at: Instant) -> SystemTime {
    let ago = crate::clock::now().saturating_duration_since(at);
    SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH)
}

fn summary(view: &SessionView) -> ClientSummary {
    let conn = view.conn();
    ClientSummary {
        client_id: view.client_id.as_str().to_owned(),
        connected: conn.is_some(),
        username: conn.and_then(|c| c.client.username.as_ref().map(|u| u.to_string())),
        listener: conn.map(|c| c.client.peer.listener.to_string()),
        transport: conn.map(|c| c.client.peer.transport.as_str().to_owned()),
        peer_addr: conn.map(|c| c.client.peer.addr.to_string()),
        protocol_version: conn.map(|c| c.client.version.to_string()),
        connected_at: conn.map(|c| unix(wall(c.connected_at))),
        disconnected_at: match view.state {
            SessionState::Offline { since } => Some(unix(since)),
            _ => None,
        },
        subscriptions: view.subscription_count,
        queued: view.queued,
        in_flight: view.in_flight,
    }
}

fn subscription_list(view: &SessionView) -> Vec<SubscriptionInfo> {
    view.subscriptions
        .iter()
        .map(|(filter, options, id)| SubscriptionInfo {
            filter: filter.as_str().to_owned(),
            qos: options.qos.bits(),
            no_local: options.no_local,
            retain_as_published: options.retain_as_published,
            retain_handling: options.retain_handling as u8,
            subscription_id: id.map(|i| i.get()),
        })
        .collect()
}

fn detail(view: &SessionView) -> ClientDetail {
    let conn = view.conn();
    let stats = view.stats();
    let load = |f: fn(&crate::broker::ConnStats) -> &std::sync::atomic::AtomicU64| {
        stats.map(|s| f(s).load(std::sync::atomic::Ordering::Relaxed))
    };
    ClientDetail {
        summary: summary(view),
        keep_alive: conn.map(|c| c.keep_alive),
        clean_start: conn.map(|c| c.clean_start),
        session_expiry_interval: conn.map(|c| c.session_expiry).or(view.expiry_interval),
        persistent: view.persistent,
        tls_identity: conn.and_then(|c| c.client.peer.tls_identity.as_deref().map(str::to_owned)),
        bytes_in: load(|s| &s.bytes_in),
        bytes_out: load(|s| &s.bytes_out),
        messages_in: load(|s| &s.messages_in),
        messages_out: load(|s| &s.messages_out),
        subscription_list: subscription_list(view),
        quic: view.path().map(|p| QuicPath {
            rtt_ms: p.rtt.as_secs_f64() * 1000.0,
            cwnd: p.cwnd,
            congestion_events: p.congestion_events,
            sent_packets: p.sent_packets,
            lost_packets: p.lost_packets,
            received_datagrams: p.received_datagrams,
            remote_addr: p.remote.map(|a| a.to_string()),
            relay: p.relay,
        }),
    }
}

fn client_id(raw: &str) -> Result<ClientId, ApiError> {
    ClientId::try_from(raw).map_err(|_| ApiError::bad_request("invalid client id"))
}

fn view_of(inner: &Inner, raw: &str) -> Result<SessionView, ApiError> {
    inner
        .session_view(&client_id(raw)?)
        .ok_or_else(|| ApiError::not_found(format!("no client {raw:?}")))
}

/// Lists clients: every session the broker holds, connected or not.
#[utoipa::path(
    get, path = "/api/v1/clients", tag = "clients", params(ClientQuery),
    responses(
        (status = 200, description = "A page of clients, by client id", body = ClientList),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 429, description = "Too many failed attempts", body = ErrorBody),
    )
)]
async fn list_clients(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<ClientQuery>,
) -> Json<ClientList> {
    let mut views: Vec<SessionView> = inner
        .session_views()
        .into_iter()
        .filter(|v| {
            let conn = v.conn();
            q.client_id_prefix
                .as_deref()
                .is_none_or(|p| v.client_id.as_str().starts_with(p))
                && q.connected.is_none_or(|c| c == conn.is_some())
                && q.username.as_deref().is_none_or(|u| {
                    conn.and_then(|c| c.client.username.as_ref())
                        .is_some_and(|n| n.as_str() == u)
                })
                && q.listener
                    .as_deref()
                    .is_none_or(|l| conn.is_some_and(|c| &*c.client.peer.listener == l))
                && q.transport
                    .as_deref()
                    .is_none_or(|t| conn.is_some_and(|c| c.client.peer.transport.as_str() == t))
        })
        .collect();
    views.sort_by(|a, b| a.client_id.as_str().cmp(b.client_id.as_str()));
    let (page, meta) = paginate(views, q.page, q.limit);
    Json(ClientList {
        data: page.iter().map(summary).collect(),
        meta,
    })
}

/// Shows one client: addresses, transport, keep alive, subscriptions, queue, counters.
#[utoipa::path(
    get, path = "/api/v1/clients/{client_id}", tag = "clients",
    params(("client_id" = String, Path, description = "Client identifier")),
    responses(
        (status = 200, description = "The client", body = ClientDetail),
        (status = 404, description = "No such client", body = ErrorBody),
    )
)]
async fn get_client(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
) -> Result<Json<ClientDetail>, ApiError> {
    Ok(Json(detail(&view_of(&inner, &id)?)))
}

/// Disconnects a client (kick): DISCONNECT with reason 0x98 (administrative action) for MQTT
/// 5, a plain close for 3.1 and 3.1.1. Its session stays if it outlives its connection.
#[utoipa::path(
    delete, path = "/api/v1/clients/{client_id}", tag = "clients",
    params(("client_id" = String, Path, description = "Client identifier")),
    responses(
        (status = 204, description = "The connection was asked to close"),
        (status = 404, description = "No such client", body = ErrorBody),
        (status = 409, description = "The client is not connected", body = ErrorBody),
    )
)]
async fn kick_client(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    match inner.kick(&client_id(&id)?) {
        Kick::Asked => {
            tracing::info!(client_id = %id, "client disconnected through the admin API");
            Ok(StatusCode::NO_CONTENT)
        }
        Kick::NotConnected => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_connected",
            format!("client {id:?} is not connected"),
        )),
        Kick::Unknown => Err(ApiError::not_found(format!("no client {id:?}"))),
    }
}

/// Lists a client's subscriptions.
#[utoipa::path(
    get, path = "/api/v1/clients/{client_id}/subscriptions", tag = "subscriptions",
    params(("client_id" = String, Path, description = "Client identifier")),
    responses(
        (status = 200, description = "Its subscriptions, by filter", body = Vec<SubscriptionInfo>),
        (status = 404, description = "No such client", body = ErrorBody),
    )
)]
async fn client_subscriptions(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
) -> Result<Json<Vec<SubscriptionInfo>>, ApiError> {
    Ok(Json(subscription_list(&view_of(&inner, &id)?)))
}

// ---- Subscriptions --------------------------------------------------------------------------

/// Filters of the subscription list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SubscriptionQuery {
    /// Only subscriptions with exactly this filter (`$share/GROUP/...` for a shared one).
    filter: Option<String>,
    /// Only subscriptions whose filter matches this topic name (as routing would match it).
    topic: Option<String>,
    /// Only the subscriptions of this client.
    client_id: Option<String>,
    /// Page number, from 1.
    page: Option<usize>,
    /// Items per page (at most 1000; default 100).
    limit: Option<usize>,
}

/// A subscription with the client that holds it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct SubscriptionEntry {
    /// Client identifier of the session that holds it.
    pub client_id: String,
    /// Whether a connection serves that session now.
    pub connected: bool,
    /// The subscription.
    #[serde(flatten)]
    pub subscription: SubscriptionInfo,
}

/// One page of subscriptions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct SubscriptionList {
    /// The subscriptions, by client id then filter.
    pub data: Vec<SubscriptionEntry>,
    /// Where this page is.
    pub meta: PageMeta,
}

/// Lists the subscriptions of every session, connected or not.
#[utoipa::path(
    get, path = "/api/v1/subscriptions", tag = "subscriptions", params(SubscriptionQuery),
    responses(
        (status = 200, description = "A page of subscriptions, by client id then filter", body = SubscriptionList),
        (status = 400, description = "Invalid filter, topic or client id", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn list_subscriptions(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<SubscriptionQuery>,
) -> Result<Json<SubscriptionList>, ApiError> {
    let filter = q
        .filter
        .as_deref()
        .map(TopicFilter::try_from)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("invalid topic filter: {e}")))?;
    let topic_name = q.topic.as_deref().map(topic).transpose()?;
    let client = q.client_id.as_deref().map(client_id).transpose()?;
    let mut views: Vec<SessionView> = match &client {
        Some(id) => inner.session_view(id).into_iter().collect(),
        None => inner.detailed_session_views(),
    };
    views.sort_by(|a, b| a.client_id.as_str().cmp(b.client_id.as_str()));
    let entries: Vec<SubscriptionEntry> = views
        .iter()
        .flat_map(|view| {
            let connected = view.conn().is_some();
            let id = view.client_id.as_str();
            subscription_list(view)
                .into_iter()
                .zip(view.subscriptions.iter())
                .filter(|(_, (f, _, _))| {
                    filter.as_ref().is_none_or(|want| want == f)
                        && topic_name.as_ref().is_none_or(|t| f.matches(t))
                })
                .map(move |(subscription, _)| SubscriptionEntry {
                    client_id: id.to_owned(),
                    connected,
                    subscription,
                })
        })
        .collect();
    let (data, meta) = paginate(entries, q.page, q.limit);
    Ok(Json(SubscriptionList { data, meta }))
}

// ---- Sessions -------------------------------------------------------------------------------

/// Filters of the session list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SessionQuery {
    /// Only client ids starting with this.
    client_id_prefix: Option<String>,
    /// Only sessions that outlive their connection (`true`) or only those that do not.
    persistent: Option<bool>,
    /// Only sessions with a connection (`true`) or only those held offline (`false`).
    connected: Option<bool>,
    /// Page number, from 1.
    page: Option<usize>,
    /// Items per page (at most 1000; default 100).
    limit: Option<usize>,
}

/// A session.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct SessionInfo {
    /// Client identifier.
    pub client_id: String,
    /// `connected`, `connecting` (moving between connections, or CONNECT in progress) or
    /// `offline`.
    pub state: String,
    /// Whether it outlives its connection.
    pub persistent: bool,
    /// Session expiry interval, in seconds (offline sessions).
    pub expiry_interval: Option<u32>,
    /// When its connection ended, in seconds since the Unix epoch (offline sessions).
    pub disconnected_at: Option<u64>,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Messages queued.
    pub queued: usize,
    /// Messages sent and not yet acknowledged.
    pub in_flight: usize,
}

/// One page of sessions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct SessionList {
    /// The sessions, by client id.
    pub data: Vec<SessionInfo>,
    /// Where this page is.
    pub meta: PageMeta,
}

fn session_info(view: &SessionView) -> SessionInfo {
    let (state, disconnected_at) = match &view.state {
        SessionState::Online(_) if view.conn().is_some() => ("connected", None),
        SessionState::Online(_) | SessionState::Transferring => ("connecting", None),
        SessionState::Offline { since } => ("offline", Some(unix(*since))),
    };
    SessionInfo {
        client_id: view.client_id.as_str().to_owned(),
        state: state.to_owned(),
        persistent: view.persistent,
        expiry_interval: view.expiry_interval,
        disconnected_at,
        subscriptions: view.subscription_count,
        queued: view.queued,
        in_flight: view.in_flight,
    }
}

/// Lists sessions, persistent ones held offline included.
#[utoipa::path(
    get, path = "/api/v1/sessions", tag = "sessions", params(SessionQuery),
    responses((status = 200, description = "A page of sessions, by client id", body = SessionList))
)]
async fn list_sessions(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<SessionQuery>,
) -> Json<SessionList> {
    let mut views: Vec<SessionView> = inner
        .session_views()
        .into_iter()
        .filter(|v| {
            q.client_id_prefix
                .as_deref()
                .is_none_or(|p| v.client_id.as_str().starts_with(p))
                && q.persistent.is_none_or(|p| p == v.persistent)
                && q.connected.is_none_or(|c| c == v.conn().is_some())
        })
        .collect();
    views.sort_by(|a, b| a.client_id.as_str().cmp(b.client_id.as_str()));
    let (page, meta) = paginate(views, q.page, q.limit);
    Json(SessionList {
        data: page.iter().map(session_info).collect(),
        meta,
    })
}

/// Shows one session.
#[utoipa::path(
    get, path = "/api/v1/sessions/{client_id}", tag = "sessions",
    params(("client_id" = String, Path, description = "Client identifier")),
    responses(
        (status = 200, description = "The session", body = SessionInfo),
        (status = 404, description = "No such session", body = ErrorBody),
    )
)]
async fn get_session(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    Ok(Json(session_info(&view_of(&inner, &id)?)))
}

/// Ends a session the broker holds offline, as its expiry would: its will, if one is pending,
/// is published; its subscriptions and queued messages go.
#[utoipa::path(
    delete, path = "/api/v1/sessions/{client_id}", tag = "sessions",
    params(("client_id" = String, Path, description = "Client identifier")),
    responses(
        (status = 204, description = "The session ended"),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 409, description = "A client is connected to it: kick it first", body = ErrorBody),
    )
)]
async fn discard_session(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    match inner.discard_session(crate::clock::now(), &client_id(&id)?) {
        Discard::Done => {
            tracing::info!(client_id = %id, "session discarded through the admin API");
            Ok(StatusCode::NO_CONTENT)
        }
        Discard::Connected => Err(ApiError::new(
            StatusCode::CONFLICT,
            "connected",
            format!("a client is connected to session {id:?}: kick it first"),
        )),
        Discard::Unknown => Err(ApiError::not_found(format!("no session {id:?}"))),
    }
}

// ---- Retained messages ----------------------------------------------------------------------

/// Filter and page of the retained-message list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct RetainedQuery {
    /// Topic filter the messages match (default `#`: all but `$` topics).
    filter: Option<String>,
    /// Page number, from 1.
    page: Option<usize>,
    /// Items per page (at most 1000; default 100).
    limit: Option<usize>,
}

/// A retained message in the list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct RetainedSummary {
    /// Topic.
    pub topic: String,
    /// QoS it was published with.
    pub qos: u8,
    /// Payload size in bytes.
    pub payload_bytes: usize,
}

/// One page of retained messages.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct RetainedList {
    /// The messages, by topic.
    pub data: Vec<RetainedSummary>,
    /// Where this page is.
    pub meta: PageMeta,
}

/// A retained message in full.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct RetainedMessage {
    /// Topic.
    pub topic: String,
    /// QoS it was published with.
    pub qos: u8,
    /// The payload: as is if it is UTF-8 (`payload_encoding` `plain`), else in base64.
    pub payload: String,
    /// `plain` or `base64`.
    pub payload_encoding: String,
    /// Content type (MQTT 5), if the publisher set one.
    pub content_type: Option<String>,
}

/// Lists retained messages matching a filter.
#[utoipa::path(
    get, path = "/api/v1/retained", tag = "retained", params(RetainedQuery),
    responses(
        (status = 200, description = "A page of retained messages, by topic", body = RetainedList),
        (status = 400, description = "Invalid filter", body = ErrorBody),
    )
)]
async fn list_retained(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<RetainedQuery>,
) -> Result<Json<RetainedList>, ApiError> {
    let filter = q.filter.as_deref().unwrap_or("#");
    let filter = TopicFilter::try_from(filter)
        .map_err(|e| ApiError::bad_request(format!("invalid topic filter: {e}")))?;
    let mut messages = inner.retained.matching(&filter, crate::clock::now());
    messages.sort_by(|a, b| a.topic.as_str().cmp(b.topic.as_str()));
    let (page, meta) = paginate(messages, q.page, q.limit);
    Ok(Json(RetainedList {
        data: page
            .iter()
            .map(|m| RetainedSummary {
                topic: m.topic.as_str().to_owned(),
                qos: m.qos.bits(),
                payload_bytes: m.payload.len(),
            })
            .collect(),
        meta,
    }))
}

fn topic(raw: &str) -> Result<TopicName, ApiError> {
    TopicName::try_from(raw).map_err(|e| ApiError::bad_request(format!("invalid topic: {e}")))
}

/// Reads the retained message of a topic.
#[utoipa::path(
    get, path = "/api/v1/retained/{topic}", tag = "retained",
    params(("topic" = String, Path, description = "Topic (its slashes as they are)")),
    responses(
        (status = 200, description = "The message", body = RetainedMessage),
        (status = 404, description = "Nothing retained there", body = ErrorBody),
    )
)]
async fn get_retained(
    State(inner): State<Arc<Inner>>,
    Path(raw): Path<String>,
) -> Result<Json<RetainedMessage>, ApiError> {
    let name = topic(&raw)?;
    let message = inner
        .retained
        .get(&name)
        .ok_or_else(|| ApiError::not_found(format!("no retained message on {raw:?}")))?;
    let (payload, payload_encoding) = match std::str::from_utf8(&message.payload) {
        Ok(text) => (text.to_owned(), "plain"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&message.payload),
            "base64",
        ),
    };
    Ok(Json(RetainedMessage {
        topic: message.topic.as_str().to_owned(),
        qos: message.qos.bits(),
        payload,
        payload_encoding: payload_encoding.to_owned(),
        content_type: message
            .properties
            .content_type
            .as_ref()
            .map(|c| c.to_string()),
    }))
}

/// Deletes the retained message of a topic (as an empty retained PUBLISH would).
#[utoipa::path(
    delete, path = "/api/v1/retained/{topic}", tag = "retained",
    params(("topic" = String, Path, description = "Topic (its slashes as they are)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "Nothing retained there", body = ErrorBody),
    )
)]
async fn delete_retained(
    State(inner): State<Arc<Inner>>,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let name = topic(&raw)?;
    if inner.retained.get(&name).is_none() {
        return Err(ApiError::not_found(format!(
            "no retained message on {raw:?}"
        )));
    }
    let empty = Arc::new(Message::new(
        name,
        bytes::Bytes::new(),
        QoS::AtMostOnce,
        true,
    ));
    let mut batch = Batch::direct(&*inner.storage);
    // Deleting never passes a limit.
    let _ = inner.retain(&empty, &mut batch);
    // Nobody waits for the deletion to be durable: a crash may bring the message back.
    let _ = batch.commit();
    Ok(StatusCode::NO_CONTENT)
}

// ---- Listeners, stats, publish --------------------------------------------------------------

/// A listener.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ListenerInfo {
    /// The URL as configured (the listener's name in logs and in the client list).
    pub url: String,
    /// Its scheme: `tcp`, `tls`, `ws`, `wss`, `quic`, `http`, `relay` or `p2p`.
    pub kind: String,
    /// The address it is bound to.
    pub addr: String,
    /// Clients connected through it now.
    pub clients: usize,
    /// Clients whose CONNECT it accepted since the broker started.
    pub connections_total: u64,
    /// Bytes its clients sent, since the broker started.
    pub bytes_in: u64,
    /// Bytes sent to its clients, since the broker started.
    pub bytes_out: u64,
    /// PUBLISH packets its clients sent, since the broker started.
    pub messages_in: u64,
    /// PUBLISH packets sent to its clients, since the broker started.
    pub messages_out: u64,
}

/// Lists the listeners with their bound addresses and their clients' counters.
#[utoipa::path(
    get, path = "/api/v1/listeners", tag = "broker",
    responses((status = 200, description = "The listeners, as configured", body = Vec<ListenerInfo>))
)]
async fn list_listeners(State(inner): State<Arc<Inner>>) -> Json<Vec<ListenerInfo>> {
    let figures = inner.listener_figures(&inner.session_views());
    let listeners = inner.listeners.get().map(Vec::as_slice).unwrap_or_default();
    Json(
        listeners
            .iter()
            .map(|(l, addr)| {
                // The ended connections' totals, and the live ones' counters so far.
                let (totals, clients) = figures.get(l.url.as_str()).copied().unwrap_or_default();
                ListenerInfo {
                    url: l.url.clone(),
                    kind: l.url.split("://").next().unwrap_or_default().to_owned(),
                    addr: addr.to_string(),
                    clients,
                    connections_total: totals.connections,
                    bytes_in: totals.bytes_in,
                    bytes_out: totals.bytes_out,
                    messages_in: totals.messages_in,
                    messages_out: totals.messages_out,
                }
            })
            .collect(),
    )
}

/// The broker's figures (the same as in `/metrics`). Fields may be added.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct Stats {
    /// Seconds since the broker started.
    pub uptime_seconds: u64,
    /// Network connections open (MQTT listeners).
    pub connections_open: i64,
    /// Clients connected (CONNECT accepted).
    pub clients_connected: i64,
    /// Sessions held, connected or not.
    pub sessions: i64,
    /// Sessions that outlive their connection.
    pub persistent_sessions: i64,
    /// Subscriptions.
    pub subscriptions: i64,
    /// Retained messages.
    pub retained_messages: i64,
    /// Bytes of retained messages.
    pub retained_bytes: i64,
    /// PUBLISH packets received.
    pub messages_received: u64,
    /// PUBLISH packets sent.
    pub messages_sent: u64,
    /// Deliveries routed to sessions.
    pub messages_routed: u64,
    /// Deliveries dropped (full queues, expired, refused).
    pub messages_dropped: u64,
    /// Bytes received from clients.
    pub bytes_received: u64,
    /// Bytes sent to clients.
    pub bytes_sent: u64,
    /// Connections the listeners accepted.
    pub connections_accepted: u64,
    /// Connections refused before CONNECT by the connection limits.
    pub connections_refused: u64,
    /// Clients connected now by transport: `tcp`, `tls`, `ws`, `wss`, `quic`, `p2p`,
    /// `bridge` (every one listed, 0 included).
    pub clients_by_transport: BTreeMap<String, i64>,
    /// The QUIC listeners' figures.
    pub quic: QuicStats,
    /// The `p2p://` listener's figures.
    pub p2p: P2pStats,
    /// The bridges running, by name (none unless `[[bridge]]` tables are configured).
    pub bridges: Vec<BridgeStats>,
}

/// A bridge's figures (as `mqttd_bridge_*` in `/metrics`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct BridgeStats {
    /// Its name (`[[bridge]]` `name`).
    pub name: String,
    /// Its session's client id in this broker (`$bridge/NAME`).
    pub local_client_id: String,
    /// The remote broker's URLs, tried in order (passwords left out).
    pub urls: Vec<String>,
    /// Its topic rules.
    pub topics: usize,
    /// Whether it is connected to its remote broker now.
    pub connected: bool,
    /// Messages from the remote broker published here.
    pub messages_in: u64,
    /// Messages the remote broker took.
    pub messages_out: u64,
    /// Messages it dropped.
    pub messages_dropped: u64,
    /// Connection attempts after its first.
    pub reconnects: u64,
    /// Messages its session holds for the remote broker.
    pub queued: i64,
}

/// The QUIC listeners' figures (as `mqttd_quic_*` in `/metrics`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct QuicStats {
    /// QUIC connections open now.
    pub connections: i64,
    /// Handshakes that reached MQTT.
    pub handshakes: u64,
    /// Handshakes that failed or timed out.
    pub handshake_failures: u64,
    /// Stateless Retries sent.
    pub retries: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Congestion window reductions.
    pub congestion_events: u64,
    /// Client address changes noticed.
    pub path_changes: u64,
    /// Data streams reset for a malformed packet.
    pub stream_resets: u64,
}

/// The `p2p://` listener's figures (as `mqttd_p2p_*` in `/metrics`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct P2pStats {
    /// Peer-to-peer MQTT connections open now.
    pub connections_open: i64,
    /// Connections refused by `p2p.allow`.
    pub refused: u64,
    /// Handshakes that failed or timed out.
    pub handshake_failures: u64,
    /// Pings answered.
    pub pings: u64,
}

/// The broker's figures.
#[utoipa::path(
    get, path = "/api/v1/stats", tag = "broker",
    responses((status = 200, description = "Figures from the broker's metrics", body = Stats))
)]
async fn stats(State(inner): State<Arc<Inner>>) -> Json<Stats> {
    inner.refresh_gauges();
    let m = &inner.metrics;
    Json(Stats {
        uptime_seconds: crate::clock::now()
            .saturating_duration_since(inner.started)
            .as_secs(),
        connections_open: m.connections_open.get(),
        clients_connected: m.clients_connected.get(),
        sessions: m.sessions.get(),
        persistent_sessions: m.persistent_sessions.get(),
        subscriptions: m.subscriptions.get(),
        retained_messages: m.retained_messages.get(),
        retained_bytes: m.retained_bytes.get(),
        messages_received: m.messages_received.get(),
        messages_sent: m.messages_sent.get(),
        messages_routed: m.routed.get(),
        messages_dropped: m.messages_dropped.get(),
        bytes_received: m.bytes_received.get(),
        bytes_sent: m.bytes_sent.get(),
        connections_accepted: m.connections_accepted.get(),
        connections_refused: m.connections_refused.get(),
        clients_by_transport: m
            .clients_by_transport()
            .into_iter()
            .map(|(t, n)| (t.to_owned(), n))
            .collect(),
        quic: QuicStats {
            connections: m.quic_connections.get(),
            handshakes: m.quic_handshakes.get(),
            handshake_failures: m.quic_handshake_failures.get(),
            retries: m.quic_retries.get(),
            sent_packets: m.quic_sent_packets.get(),
            lost_packets: m.quic_lost_packets.get(),
            congestion_events: m.quic_congestion_events.get(),
            path_changes: m.quic_path_changes.get(),
            stream_resets: m.quic_stream_resets.get(),
        },
        p2p: P2pStats {
            connections_open: m.p2p_connections_open.get(),
            refused: m.p2p_refused.get(),
            handshake_failures: m.p2p_handshake_failures.get(),
            pings: m.p2p_pings.get(),
        },
        bridges: inner
            .bridges
            .running()
            .iter()
            .map(|b| {
                let bm = m.bridge(&b.name);
                BridgeStats {
                    name: b.name.clone(),
                    local_client_id: crate::bridge::config::local_client_id(&b.name)
                        .as_str()
                        .to_owned(),
                    urls: b.urls.iter().map(ToString::to_string).collect(),
                    topics: b.topics.len(),
                    connected: bm.up.get() > 0,
                    messages_in: bm.messages_in.get(),
                    messages_out: bm.messages_out.get(),
                    messages_dropped: bm.messages_dropped.get(),
                    reconnects: bm.reconnects.get(),
                    queued: bm.queued.get(),
                }
            })
            .collect(),
    })
}

/// A bridge: its settings, where its remote connection stands and what it carried.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct BridgeInfo {
    /// Its name (`[[bridge]]` `name`).
    pub name: String,
    /// Its session's client id in this broker (`$bridge/NAME`).
    pub local_client_id: String,
    /// The remote broker's URLs, tried in order (passwords left out).
    pub urls: Vec<String>,
    /// The URL connected to, or being tried or last tried (passwords left out).
    pub remote: Option<String>,
    /// That URL's transport: `mqtt`, `mqtts`, `ws`, `wss`, `quic` or `p2p` (the first URL's
    /// before any attempt).
    pub transport: String,
    /// `3.1.1` or `5.0`, towards the remote broker.
    pub protocol_version: String,
    /// `connecting`, `connected`, `backing_off` (waiting after a failure) or `stopped`.
    pub state: String,
    /// When it entered that state, in seconds since the Unix epoch.
    pub since: Option<u64>,
    /// When it tries again, while backing off, in seconds since the Unix epoch.
    pub retry_at: Option<u64>,
    /// Its topic rules, as written (`PATTERN DIRECTION QOS LOCAL REMOTE`).
    pub topics: Vec<String>,
    /// Messages from the remote broker published here.
    pub messages_in: u64,
    /// Messages the remote broker took.
    pub messages_out: u64,
    /// Messages it dropped.
    pub messages_dropped: u64,
    /// Messages its session holds for the remote broker.
    pub queued: i64,
    /// Connection attempts after its first.
    pub reconnects: u64,
    /// The last failure: a connection refused or failed, or lost.
    pub last_error: Option<String>,
    /// When it happened, in seconds since the Unix epoch.
    pub last_error_at: Option<u64>,
}

/// Lists the configured bridges, by name, with their state.
#[utoipa::path(
    get, path = "/api/v1/bridges", tag = "bridges",
    responses(
        (status = 200, description = "The bridges running, by name", body = Vec<BridgeInfo>),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn list_bridges(State(inner): State<Arc<Inner>>) -> Json<Vec<BridgeInfo>> {
    let m = &inner.metrics;
    Json(
        inner
            .bridges
            .statuses()
            .into_iter()
            .map(|(b, status)| {
                let bm = m.bridge(&b.name);
                let transport = status
                    .url
                    .as_deref()
                    .and_then(|u| u.split_once("://"))
                    .map(|(scheme, _)| scheme.to_owned())
                    .or_else(|| b.urls.first().map(|u| u.scheme().to_owned()))
                    .unwrap_or_default();
                BridgeInfo {
                    name: b.name.clone(),
                    local_client_id: b.local_client_id().as_str().to_owned(),
                    urls: b.urls.iter().map(ToString::to_string).collect(),
                    remote: status.url.clone(),
                    transport,
                    protocol_version: b.protocol.to_string(),
                    state: status.state.as_str().to_owned(),
                    since: status.since.map(unix),
                    retry_at: status.retry_at.map(unix),
                    topics: b.topics.iter().map(|t| t.as_str().to_owned()).collect(),
                    messages_in: bm.messages_in.get(),
                    messages_out: bm.messages_out.get(),
                    messages_dropped: bm.messages_dropped.get(),
                    queued: bm.queued.get(),
                    reconnects: bm.reconnects.get(),
                    last_error: status.last_error.clone(),
                    last_error_at: status.last_error_at.map(unix),
                }
            })
            .collect(),
    )
}

/// One network path of a peer-to-peer link.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct PeerPath {
    /// `direct` (straight to the peer's UDP address) or `relayed` (through a relay server).
    pub kind: String,
    /// The peer's UDP address (direct), or the relay's URL (relayed).
    pub remote: String,
    /// Smoothed round-trip time in milliseconds (QUIC's initial estimate until a sample).
    pub rtt_ms: f64,
    /// Whether it carries the application data now.
    pub selected: bool,
}

/// A peer-to-peer link: a node connection to the `p2p://` listener, or of a `p2p://` bridge.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's node id (its public key), proved by the handshake.
    pub node_id: String,
    /// `client` (MQTT over the `p2p://` listener), `ping` (a peer's pings) or `bridge` (a
    /// `p2p://` bridge of this broker).
    pub role: String,
    /// `inbound` (the peer dialed) or `outbound` (this broker dialed).
    pub direction: String,
    /// The listener's URL (inbound) or the bridge's name (outbound).
    pub name: String,
    /// `open`, or `closed` while its task winds down.
    pub state: String,
    /// The selected path's kind: `direct` or `relayed` (none before one is selected).
    pub path: Option<String>,
    /// The selected path's remote end: the peer's current UDP address, or the relay's URL.
    pub remote: Option<String>,
    /// The selected path's smoothed round-trip time, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// The selected path's congestion window, in bytes.
    pub cwnd: Option<u64>,
    /// QUIC packets sent on the selected path.
    pub path_sent_packets: Option<u64>,
    /// QUIC packets lost on the selected path.
    pub path_lost_packets: Option<u64>,
    /// UDP datagrams received on the selected path.
    pub path_received_datagrams: Option<u64>,
    /// QUIC packets sent on the whole connection, every path included.
    pub sent_packets: u64,
    /// QUIC packets lost on the whole connection.
    pub lost_packets: u64,
    /// UDP datagrams received on the whole connection.
    pub received_datagrams: u64,
    /// Every path open now (iroh keeps a relayed one as a backup of a direct one).
    pub paths: Vec<PeerPath>,
    /// When the link's handshake completed, in seconds since the Unix epoch.
    pub connected_at: u64,
}

#[cfg(feature = "p2p")]
fn path_parts(kind: &mqttd_p2p::PathKind) -> (String, String) {
    match kind {
        mqttd_p2p::PathKind::Direct(addr) => ("direct".into(), addr.to_string()),
        mqttd_p2p::PathKind::Relayed(url) => ("relayed".into(), url.to_string()),
        // A transport this broker does not configure.
        other => ("other".into(), other.to_string()),
    }
}

#[cfg(feature = "p2p")]
fn peer_infos(inner: &Inner) -> Vec<PeerInfo> {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    inner
        .peers
        .snapshot()
        .into_iter()
        .map(|link| {
            let conn = &link.conn;
            let paths = conn.paths();
            let selected = conn.selected_path_stats();
            let (path, remote) = match &selected {
                Some((kind, _)) => {
                    let (k, r) = path_parts(kind);
                    (Some(k), Some(r))
                }
                None => (None, None),
            };
            let stats = conn.stats();
            PeerInfo {
                node_id: conn.remote_id().to_string(),
                role: link.role.as_str().to_owned(),
                direction: link.role.direction().to_owned(),
                name: link.name.to_string(),
                state: if conn.close_reason().is_some() {
                    "closed"
                } else {
                    "open"
                }
                .to_owned(),
                path,
                remote,
                rtt_ms: selected.as_ref().map(|(_, s)| ms(s.rtt)),
                cwnd: selected.as_ref().map(|(_, s)| s.cwnd),
                path_sent_packets: selected.as_ref().map(|(_, s)| s.sent_packets),
                path_lost_packets: selected.as_ref().map(|(_, s)| s.lost_packets),
                path_received_datagrams: selected.as_ref().map(|(_, s)| s.udp_rx.datagrams),
                sent_packets: stats.sent_packets,
                lost_packets: stats.lost_packets,
                received_datagrams: stats.udp_rx.datagrams,
                paths: paths
                    .iter()
                    .map(|p| {
                        let (kind, remote) = path_parts(&p.kind);
                        PeerPath {
                            kind,
                            remote,
                            rtt_ms: ms(p.rtt),
                            selected: p.selected,
                        }
                    })
                    .collect(),
                connected_at: unix(link.since),
            }
        })
        .collect()
}

/// Lists the peer-to-peer links open now: node id, direct or relayed, round-trip time.
#[utoipa::path(
    get, path = "/api/v1/p2p/peers", tag = "p2p",
    responses(
        (status = 200, description = "The links open now, oldest first (empty without a `p2p://` listener or bridge)", body = Vec<PeerInfo>),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn list_peers(State(inner): State<Arc<Inner>>) -> Json<Vec<PeerInfo>> {
    #[cfg(feature = "p2p")]
    let peers = peer_infos(&inner);
    #[cfg(not(feature = "p2p"))]
    let peers = {
        let _ = inner;
        Vec::new()
    };
    Json(peers)
}

/// The running configuration, secrets left out.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ConfigView {
    /// Every setting as last loaded (at start or by the last successful reload), defaults
    /// filled in, in the configuration file's keys. Bridge passwords show as `"***"`; URLs
    /// without theirs. Files (TLS keys, password file) are named, their contents never shown.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// Settings changed by a reload that take effect only after a restart (the values in
    /// `config` are the new ones).
    pub restart_needed: Vec<String>,
}

/// Shows the running configuration, secrets redacted.
#[utoipa::path(
    get, path = "/api/v1/config", tag = "broker",
    responses(
        (status = 200, description = "The configuration, secrets redacted", body = ConfigView),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn get_config(State(inner): State<Arc<Inner>>) -> Result<Json<ConfigView>, ApiError> {
    let loaded = inner.loaded_config.load_full();
    let config = serde_json::to_value(&*loaded).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("configuration: {e}"),
        )
    })?;
    Ok(Json(ConfigView {
        config,
        restart_needed: crate::reload::restart_needed(&inner.config, &loaded),
    }))
}

/// A message to publish.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct PublishRequest {
    /// Topic (no wildcards).
    pub topic: String,
    /// Payload, as `payload_encoding` says.
    #[serde(default)]
    pub payload: String,
    /// `plain` (the default: the text as UTF-8) or `base64`.
    #[serde(default)]
    pub payload_encoding: Option<String>,
    /// 0, 1 or 2 (default 0).
    #[serde(default)]
    pub qos: u8,
    /// Whether to retain it.
    #[serde(default)]
    pub retain: bool,
}

/// What became of a publication.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct PublishResult {
    /// Sessions it was handed to.
    pub routed: usize,
}

/// Publishes a message as the broker, to every matching subscription (no ACL applies: the
/// key's holder is the administrator).
#[utoipa::path(
    post, path = "/api/v1/publish", tag = "broker", request_body = PublishRequest,
    responses(
        (status = 200, description = "Published", body = PublishResult),
        (status = 400, description = "Invalid topic, QoS or payload", body = ErrorBody),
        (status = 422, description = "Refused: past the retained-message limits", body = ErrorBody),
    )
)]
async fn publish(
    State(inner): State<Arc<Inner>>,
    body: Result<Json<PublishRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<PublishResult>, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let name = topic(&request.topic)?;
    let qos =
        QoS::from_bits(request.qos).ok_or_else(|| ApiError::bad_request("qos is 0, 1 or 2"))?;
    let payload = match request.payload_encoding.as_deref() {
        None | Some("plain") => bytes::Bytes::from(request.payload.into_bytes()),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(request.payload.as_bytes())
            .map(bytes::Bytes::from)
            .map_err(|e| ApiError::bad_request(format!("payload is not base64: {e}")))?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "payload_encoding {other:?}: use plain or base64"
            )))
        }
    };
    let message = Arc::new(Message::new(name, payload, qos, request.retain));
    let now = crate::clock::now();
    let mut batch = Batch::direct(&*inner.storage);
    if message.retain && inner.config.retain_available {
        if let Err(refused) = inner.retain(&message, &mut batch) {
            inner.metrics.limit_refused(refused.label(), 1);
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "refused",
                format!("not retained: {}", refused.label()),
            ));
        }
    }
    inner.metrics.messages_received.inc();
    let routed = inner.route_in(now, &message, None, &mut batch);
    // The sessions that got stored copies wait for them themselves.
    let _ = batch.commit();
    Ok(Json(PublishResult { routed }))
}

// ---- Reload ---------------------------------------------------------------------------------

/// A reload that failed: an error (`code` `reload_failed`) with the report.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ReloadFailed {
    /// `reload_failed`.
    pub code: String,
    /// The errors, for people.
    pub message: String,
    /// What the reload found; nothing of it was applied.
    #[serde(flatten)]
    pub report: crate::ReloadReport,
}

/// Reloads what can change at runtime, as SIGHUP does: the configuration file, the password
/// and ACL files, the certificates, the bridges and `[p2p]`'s allow-list. Everything is
/// checked before anything is applied: a failed reload keeps the previous configuration.
#[utoipa::path(
    post, path = "/api/v1/reload", tag = "broker",
    responses(
        (status = 200, description = "Reloaded; `restart_needed` lists the changed settings that wait for a restart", body = crate::ReloadReport),
        (status = 422, description = "Not reloaded: the previous configuration stays", body = ReloadFailed),
    )
)]
async fn reload(State(inner): State<Arc<Inner>>) -> Response {
    // Reading files and certificates blocks.
    let done = tokio::task::spawn_blocking(move || match inner.reloader.get() {
        Some(reloader) => reloader.reload(),
        None => crate::ReloadReport::default(),
    })
    .await;
    match done {
        Ok(report) if report.ok => Json(report).into_response(),
        Ok(report) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(ReloadFailed {
                code: "reload_failed".into(),
                message: report.summary(),
                report,
            }),
        )
            .into_response(),
        Err(error) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("reload: {error}"),
        )
        .into_response(),
    }
}

// ---- Cluster --------------------------------------------------------------------------------

/// The cluster node, or 404 `not_configured`.
fn cluster_of(inner: &Inner) -> Result<Arc<crate::cluster::BrokerCluster>, ApiError> {
    inner.cluster.get().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_configured",
            "clustering is not configured (no [cluster] section)",
        )
    })
}

/// A membership change that failed, as an API error.
fn cluster_error(error: mqttd_cluster::NodeError) -> ApiError {
    use mqttd_cluster::NodeError;
    match error {
        NodeError::NoCluster => ApiError::new(
            StatusCode::CONFLICT,
            "no_cluster",
            "the node asked belongs to no cluster yet",
        ),
        NodeError::NotLeader { leader: None } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "no cluster leader is known now (an election may be under way); try again",
        ),
        e => ApiError::new(StatusCode::BAD_GATEWAY, "cluster_failed", e.to_string()),
    }
}

/// This node's view of the cluster: its id, name and state, the leader, the term, the last
/// log index and the last applied, and the members (voter or learner, address, incarnation).
#[utoipa::path(
    get, path = "/api/v1/cluster", tag = "cluster",
    responses(
        (status = 200, description = "The cluster as this node knows it", body = crate::cluster::ClusterStatus),
        (status = 404, description = "Clustering is not configured (`not_configured`)", body = ErrorBody),
    )
)]
async fn cluster_status(
    State(inner): State<Arc<Inner>>,
) -> Result<Json<crate::cluster::ClusterStatus>, ApiError> {
    Ok(Json(cluster_of(&inner)?.status()))
}

/// What `POST /api/v1/cluster/join` takes (all optional).
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct JoinRequest {
    /// A node of the cluster to ask, `NAME@HOST:PORT` (its certificate's name and its cluster
    /// address); default: the configured seeds, in turn.
    pub seed: Option<String>,
}

/// What `POST /api/v1/cluster/leave` takes (all optional).
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LeaveRequest {
    /// The node to remove; default: this node.
    pub node_id: Option<u64>,
}

/// An optional JSON body: empty is the default.
fn optional_body<T: Default + serde::de::DeserializeOwned>(
    body: &axum::body::Bytes,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("body: {e}")))
}

/// Makes this node a member of the cluster: asks the seed given (or the configured seeds)
/// to add it; the leader adds it as a learner, catches it up, then makes it a voter. Answers
/// once it is a voter, with the cluster's status.
#[utoipa::path(
    post, path = "/api/v1/cluster/join", tag = "cluster",
    request_body(content = JoinRequest, description = "Optional"),
    responses(
        (status = 200, description = "This node is a voter", body = crate::cluster::ClusterStatus),
        (status = 400, description = "A seed that does not parse", body = ErrorBody),
        (status = 404, description = "Clustering is not configured (`not_configured`)", body = ErrorBody),
        (status = 409, description = "The seed belongs to no cluster yet (`no_cluster`)", body = ErrorBody),
        (status = 502, description = "The seed or the leader failed (`cluster_failed`)", body = ErrorBody),
        (status = 503, description = "No leader known now (`no_leader`)", body = ErrorBody),
    )
)]
async fn cluster_join(
    State(inner): State<Arc<Inner>>,
    body: axum::body::Bytes,
) -> Result<Json<crate::cluster::ClusterStatus>, ApiError> {
    let cluster = cluster_of(&inner)?;
    let request: JoinRequest = optional_body(&body)?;
    let seed = match request.seed {
        Some(seed) => {
            let (name, addr) = seed
                .split_once('@')
                .filter(|(n, a)| !n.is_empty() && !a.is_empty())
                .ok_or_else(|| ApiError::bad_request("seed: expected NAME@HOST:PORT"))?;
            let member = mqttd_cluster::Member {
                name: name.to_owned(),
                addr: addr.to_owned(),
            };
            // Its id is not needed to ask it: 0 stands for unknown.
            Some((0, member))
        }
        None => None,
    };
    cluster.join(seed).await.map_err(cluster_error)?;
    Ok(Json(cluster.status()))
}

/// Removes this node (or the one named) from the cluster's membership, through the leader.
/// A removed node no longer votes nor receives the log; it asks to join again when it
/// restarts with seeds, or on `POST /api/v1/cluster/join`.
#[utoipa::path(
    post, path = "/api/v1/cluster/leave", tag = "cluster",
    request_body(content = LeaveRequest, description = "Optional"),
    responses(
        (status = 200, description = "Removed (or not a member); the cluster's status as this node knows it", body = crate::cluster::ClusterStatus),
        (status = 404, description = "Clustering is not configured (`not_configured`)", body = ErrorBody),
        (status = 502, description = "The leader failed (`cluster_failed`)", body = ErrorBody),
        (status = 503, description = "No leader known now (`no_leader`)", body = ErrorBody),
    )
)]
async fn cluster_leave(
    State(inner): State<Arc<Inner>>,
    body: axum::body::Bytes,
) -> Result<Json<crate::cluster::ClusterStatus>, ApiError> {
    let cluster = cluster_of(&inner)?;
    let request: LeaveRequest = optional_body(&body)?;
    cluster
        .leave(request.node_id)
        .await
        .map_err(cluster_error)?;
    Ok(Json(cluster.status()))
}

// ---- OpenAPI --------------------------------------------------------------------------------

/// The API's OpenAPI document, from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "mqttd admin API",
        version = "1",
        description = "Administration of an mqttd broker. Every path needs `Authorization: Bearer KEY` (keys: `mqttd api-key create NAME`). Errors are JSON: `{\"code\": ..., \"message\": ...}`."
    ),
    paths(
        list_clients, get_client, kick_client, client_subscriptions, list_subscriptions, list_sessions, get_session,
        discard_session, list_retained, get_retained, delete_retained, list_listeners, stats, list_bridges, list_peers, get_config, publish,
        reload, cluster_status, cluster_join, cluster_leave
    ),
    components(schemas(ErrorBody, PageMeta)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

/// Declares the bearer-key security scheme the document's `security` names.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document (3.1) of this API.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi_document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_the_list_once_and_say_whether_more_follow() {
        let (data, meta) = paginate((0..25).collect(), Some(3), Some(10));
        assert_eq!(data, (20..25).collect::<Vec<_>>());
        assert_eq!(
            (meta.page, meta.limit, meta.count, meta.has_next),
            (3, 10, 25, false)
        );
        let (data, meta) = paginate((0..25).collect::<Vec<i32>>(), None, None);
        assert_eq!((data.len(), meta.has_next), (25, false));
        let (data, meta) = paginate((0..25).collect::<Vec<i32>>(), Some(0), Some(0));
        assert_eq!(
            (data, meta.page, meta.limit, meta.has_next),
            (vec![0], 1, 1, true)
        );
        let (data, meta) = paginate(
            (0..5).collect::<Vec<i32>>(),
            Some(usize::MAX),
            Some(MAX_LIMIT + 1),
        );
        assert_eq!(
            (data.len(), meta.limit, meta.has_next),
            (0, MAX_LIMIT, false)
        );
    }

    #[test]
    fn the_document_lists_every_path_with_the_bearer_scheme() {
        let doc = serde_json::to_value(openapi_document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/api/v1/clients",
            "/api/v1/clients/{client_id}",
            "/api/v1/clients/{client_id}/subscriptions",
            "/api/v1/subscriptions",
            "/api/v1/sessions",
            "/api/v1/sessions/{client_id}",
            "/api/v1/retained",
            "/api/v1/retained/{topic}",
            "/api/v1/listeners",
            "/api/v1/stats",
            "/api/v1/bridges",
            "/api/v1/p2p/peers",
            "/api/v1/config",
            "/api/v1/publish",
            "/api/v1/reload",
        ] {
            assert!(paths.contains_key(path), "{path} missing");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
        let stats = &doc["components"]["schemas"]["Stats"]["properties"];
        for field in [
            "clients_by_transport",
            "messages_dropped",
            "quic",
            "p2p",
            "bridges",
        ] {
            assert!(stats[field].is_object(), "Stats.{field} missing");
        }
    }
}
