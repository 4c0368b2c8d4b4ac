//! The HTTP endpoint: Prometheus metrics and a health check.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::broker::Inner;

/// Serves HTTP until shutdown.
pub(crate) async fn run(inner: Arc<Inner>, listener: TcpListener) {
    let shutdown = inner.shutdown.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(inner);
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
    if let Err(error) = server.await {
        tracing::warn!(%error, "HTTP endpoint failed");
    }
}

async fn metrics(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    inner.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        inner.metrics.render(),
    )
}

async fn health(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    if inner.shutdown.is_cancelled() {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n",
        )
    } else {
        (axum::http::StatusCode::OK, "ok\n")
    }
}
