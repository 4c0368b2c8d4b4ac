//! The HTTP endpoint: Prometheus metrics, a health check, the admin API (`crate::api`) and
//! the dashboard that uses it (`crate::dashboard`, at `/`).
//!
//! What each path answers is computed here, in [`Page::reply`], for both transports that serve
//! it: this endpoint over HTTP/1.1 and the QUIC listener over HTTP/3 (`http3`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::broker::Inner;

/// The content type of `/metrics`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of `/health`.
const TEXT: &str = "text/plain; charset=utf-8";

/// A page the endpoint serves, by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Page {
    /// `/health`: 200 `ok`, or 503 while the broker shuts down.
    Health,
    /// `/metrics`: the OpenMetrics text of [`crate::Metrics`].
    Metrics,
}

/// A page's answer: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) content_type: &'static str,
    pub(crate) body: String,
}

impl Reply {
    /// An answer with `status` and no body.
    pub(crate) fn empty(status: StatusCode) -> Self {
        Self {
            status,
            content_type: "",
            body: String::new(),
        }
    }
}

impl Page {
    /// The page at `path`, if any.
    pub(crate) fn at(path: &str) -> Option<Self> {
        match path {
            "/health" => Some(Self::Health),
            "/metrics" => Some(Self::Metrics),
            _ => None,
        }
    }

    /// The answer to a GET of this page now.
    pub(crate) fn reply(self, inner: &Inner) -> Reply {
        match self {
            Self::Health if inner.shutdown.is_cancelled() => Reply {
                status: StatusCode::SERVICE_UNAVAILABLE,
                content_type: TEXT,
                body: "shutting down\n".to_owned(),
            },
            Self::Health => Reply {
                status: StatusCode::OK,
                content_type: TEXT,
                body: "ok\n".to_owned(),
            },
            Self::Metrics => {
                inner.refresh_gauges();
                Reply {
                    status: StatusCode::OK,
                    content_type: OPENMETRICS,
                    body: inner.metrics.render(),
                }
            }
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> axum::response::Response {
        (
            self.status,
            [(header::CONTENT_TYPE, self.content_type)],
            self.body,
        )
            .into_response()
    }
}

/// Serves HTTP until shutdown.
pub(crate) async fn run(inner: Arc<Inner>, listener: TcpListener) {
    let shutdown = inner.shutdown.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(inner.clone())
        .nest("/api", crate::api::router(inner))
        .merge(crate::dashboard::router());
    // The API limits failed attempts per source address.
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
    if let Err(error) = server.await {
        tracing::warn!(%error, "HTTP endpoint failed");
    }
}

async fn metrics(State(inner): State<Arc<Inner>>) -> Reply {
    Page::Metrics.reply(&inner)
}

async fn health(State(inner): State<Arc<Inner>>) -> Reply {
    Page::Health.reply(&inner)
}
