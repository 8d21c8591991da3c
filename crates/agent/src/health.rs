//! Liveness, readiness and metrics on their own port, never on the one pods reach.
//!
//! Ready means: the interception rules are in place, every watch has delivered its first list, and the
//! endpoint is listening. Until then the node is not safe for pods that expect the agent, so a startup
//! taint or a readiness-gated rollout can hold them back.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, response::IntoResponse, routing::get};
use http::{HeaderValue, StatusCode, header};

use crate::{metrics::Metrics, resolve::Policy, world::Shared};

/// The readiness conditions the agent's parts report.
#[derive(Debug, Default)]
pub struct Health {
    rules: AtomicBool,
    serving: AtomicBool,
}

impl Health {
    /// Whether the interception rules are in place.
    pub fn rules(&self) -> bool {
        self.rules.load(Ordering::Acquire)
    }

    /// Records the latest rule check.
    pub fn set_rules(&self, ok: bool) {
        self.rules.store(ok, Ordering::Release);
    }

    /// Records that the endpoint listens.
    pub fn set_serving(&self, ok: bool) {
        self.serving.store(ok, Ordering::Release);
    }

    /// Whether the endpoint listens.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Readiness conditions.
    pub health: Arc<Health>,
    /// The world (for watch sync).
    pub shared: Arc<Shared>,
    /// Resolution policy (which watches count).
    pub policy: Policy,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Whether interception is managed by this agent (off only where another component owns it).
    pub rules_required: bool,
}

impl AdminState {
    /// Returns once the agent is ready. Rules and listening are flags without a notification, so this
    /// looks again at every change of the world and every half second.
    pub async fn until_ready(&self) {
        let mut changes = self.shared.subscribe();
        while !self.not_ready().is_empty() {
            let _ = tokio::time::timeout(std::time::Duration::from_millis(500), changes.changed()).await;
        }
    }

    /// What keeps the agent from being ready; empty when ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.rules_required && !self.health.rules() {
            missing.push("interception rules not in place");
        }
        if !crate::resolve::synced(&self.shared.read(), self.policy) {
            missing.push("watches not synced");
        }
        if !self.health.serving() {
            missing.push("endpoint not listening");
        }
        missing
    }
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Only `/metrics`, for a separate scrape port.
pub fn metrics_router(state: AdminState) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let missing = state.not_ready();
    state.metrics.ready.set(i64::from(missing.is_empty()));
    if missing.is_empty() {
        (StatusCode::OK, "ready".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", missing.join(", ")),
        )
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    state.metrics.ready.set(i64::from(state.not_ready().is_empty()));
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// Serves an admin router on `addr` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// The address an admin listener binds.
pub fn admin_addr(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}
