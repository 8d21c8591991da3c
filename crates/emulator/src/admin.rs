//! The admin API (plain HTTP, JSON), for tests that run the emulator as a separate process:
//!
//! | route | what |
//! |---|---|
//! | `GET /admin/health` | 200 once listening |
//! | `GET /admin/addresses` | the bound addresses (same JSON as the ready line) |
//! | `GET /admin/ca.pem` | the CA certificate |
//! | `GET /admin/requests?service=&since=&sourceIp=&pathContains=&status=` | the request log |
//! | `DELETE /admin/requests` | empty log and counters |
//! | `GET /admin/counters` | totals per service, path, resource and status |
//! | `GET`/`POST`/`DELETE /admin/faults`, `DELETE /admin/faults/{id}` | list, add (a `FaultSpec`), clear, remove |
//! | `GET`/`PUT /admin/state` | the state as a seed document; replace it |
//! | `POST /admin/identities` | `{"resourceId", "add": [...], "remove": [...]}` behind ARM's back |
//! | `GET`/`PUT /admin/settings` | runtime settings |
//! | `POST /admin/throttling/reset` | refill every bucket |

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Addresses;
use crate::faults::FaultSpec;
use crate::observe::LogFilter;
use crate::seed::Seed;
use crate::settings::Settings;
use crate::shared::{Shared, lock, read, write};
use crate::state::State as EmState;
use pod_identity_azure::resource_id::ResourceId;

#[derive(Clone)]
pub struct AdminCtx {
    pub shared: Arc<Shared>,
    pub addresses: Addresses,
    pub ca_pem: String,
}

type Ctx = State<Arc<AdminCtx>>;

fn bad(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response()
}

pub fn router(ctx: AdminCtx) -> Router {
    Router::new()
        .route("/admin/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/admin/addresses",
            get(|State(c): Ctx| async move { Json(c.addresses.clone()) }),
        )
        .route(
            "/admin/ca.pem",
            get(|State(c): Ctx| async move { c.ca_pem.clone() }),
        )
        .route("/admin/requests", get(requests).delete(clear_requests))
        .route(
            "/admin/counters",
            get(|State(c): Ctx| async move { Json(lock(&c.shared.log).counters()) }),
        )
        .route(
            "/admin/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/admin/faults/{id}", delete(remove_fault))
        .route("/admin/state", get(get_state).put(put_state))
        .route("/admin/identities", post(set_identities))
        .route("/admin/settings", get(get_settings).put(put_settings))
        .route(
            "/admin/throttling/reset",
            post(|State(c): Ctx| async move {
                lock(&c.shared.throttler).reset();
                StatusCode::NO_CONTENT
            }),
        )
        .with_state(Arc::new(ctx))
}

pub fn spawn(listener: TcpListener, ctx: AdminCtx, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    let app = router(ctx);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API stopped");
        }
    })
}

async fn requests(State(c): Ctx, Query(f): Query<LogFilter>) -> Response {
    let records = lock(&c.shared.log).query(&f);
    Json(records).into_response()
}

async fn clear_requests(State(c): Ctx) -> StatusCode {
    lock(&c.shared.log).clear();
    StatusCode::NO_CONTENT
}

async fn list_faults(State(c): Ctx) -> Response {
    Json(lock(&c.shared.faults).list()).into_response()
}

async fn add_fault(State(c): Ctx, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<FaultSpec>(&body) {
        Ok(spec) => {
            let id = lock(&c.shared.faults).add(spec);
            (StatusCode::CREATED, Json(json!({"id": id}))).into_response()
        }
        Err(e) => bad(format!("invalid fault: {e}")),
    }
}

async fn clear_faults(State(c): Ctx) -> StatusCode {
    lock(&c.shared.faults).clear();
    StatusCode::NO_CONTENT
}

async fn remove_fault(State(c): Ctx, Path(id): Path<u64>) -> StatusCode {
    if lock(&c.shared.faults).remove(id) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn get_state(State(c): Ctx) -> Response {
    Json(lock(&c.shared.state).to_seed()).into_response()
}

async fn put_state(State(c): Ctx, body: axum::body::Bytes) -> Response {
    let seed: Seed = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return bad(format!("invalid seed: {e}")),
    };
    match EmState::from_seed(&seed) {
        Ok(st) => {
            *lock(&c.shared.state) = st;
            lock(&c.shared.imds_cache).clear();
            c.shared.issuers.clear();
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad(e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DirectIdentities {
    resource_id: String,
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn set_identities(State(c): Ctx, body: axum::body::Bytes) -> Response {
    let req: DirectIdentities = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("invalid request: {e}")),
    };
    let Some(id) = ResourceId::parse(req.resource_id.trim_end_matches('/')) else {
        return bad(format!("'{}' is not a VM or scale-set ID", req.resource_id));
    };
    if lock(&c.shared.state).set_identities_directly(&id.key(), &req.add, &req.remove) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such VM or scale set"})),
        )
            .into_response()
    }
}

async fn get_settings(State(c): Ctx) -> Response {
    Json(read(&c.shared.settings).clone()).into_response()
}

async fn put_settings(State(c): Ctx, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<Settings>(&body) {
        Ok(s) => {
            *write(&c.shared.settings) = s;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad(format!("invalid settings: {e}")),
    }
}
