//! The admin HTTP server: `/healthz` (the process serves), `/readyz` (caches synced, so either replica
//! can lead at once), `/metrics` (Prometheus text). It starts unready.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

#[derive(Clone)]
struct AdminState {
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

/// The routes.
pub fn router(ready: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(state): State<AdminState>| async move {
                if state.ready.load(Ordering::Acquire) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(state): State<AdminState>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    state.metrics.render(),
                )
                    .into_response()
            }),
        )
        .with_state(AdminState { ready, metrics })
}

/// Serves the routes on `listener` until the future is dropped.
pub async fn serve(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    axum::serve(listener, router(ready, metrics)).await
}
