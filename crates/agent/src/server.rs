//! The IMDS-compatible endpoint pods reach through the interception rules.
//!
//! Every request is classified by its raw path first ([`crate::request::classify`]); only the exact
//! token path mints tokens, only clean non-identity paths are ever forwarded, and everything else is
//! refused here. A token request then goes: headers, query, caller (by source IP), identity (waiting on
//! the watch while the answer may still change), token (cache, then upstream).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use axum::{body::Body, response::Response};
use http::{Method, Request, StatusCode, request::Parts};
use hyper::body::{Bytes, Incoming};
use pod_identity_api::ObjectKey;
use serde_json::json;
use tracing::Instrument;

use crate::{
    attest::{
        Attestation, NodeCallers,
        caller::{Attestor, Placement},
    },
    audit::{self, Audit, Call, Decision, IdentityRef},
    cache::Outcome,
    connections::{self, Connection},
    events::{Events, Notice, Reason},
    metrics::{IdentityLabels, Metrics},
    proxy::Proxy,
    request::{self, Route, TokenQuery},
    resolve::{self, Pending, Policy, Principal, Resolution},
    response,
    tokens::TokenService,
    world::{PodRecord, Shared},
};
use verdict::Verdict;

/// What the endpoint's behaviour depends on.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This node's name, on every request's span.
    pub node: String,
    /// Standard or managed mode.
    pub policy: Policy,
    /// Require `Metadata: true` (the original's `--metadata-header-required`).
    pub metadata_header_required: bool,
    /// Refuse `/metadata/instance` instead of forwarding it.
    pub block_instance_metadata: bool,
    /// Refuse other `/metadata/...` paths instead of forwarding them.
    pub block_other_metadata: bool,
    /// Serve `/host/token` to callers on the node itself.
    pub host_token: bool,
    /// How long a request waits for an identity being assigned (or for the agent's first lists).
    pub assignment_wait: Duration,
    /// How long a request waits for its pod to appear in the watch.
    pub pod_wait: Duration,
    /// `Retry-After` of a 503.
    pub retry_after: Duration,
}

/// Everything a request needs.
pub struct AppState {
    /// Behaviour.
    pub config: ServerConfig,
    /// The cluster as this node sees it.
    pub shared: Arc<Shared>,
    /// Tokens.
    pub tokens: Arc<TokenService>,
    /// Forwarding to IMDS.
    pub proxy: Proxy,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Events on refused pods.
    pub events: Events,
    /// Attestation of callers, when on.
    attestor: Option<Arc<Attestor>>,
    /// The audit stream.
    pub audit: Audit,
    /// Identities each pod (by UID) has had a first token of (`None`: the node's, for an excepted pod);
    /// a pod has a handful, so a list.
    first_tokens: Mutex<foldhash::HashMap<String, Vec<Option<ObjectKey>>>>,
    /// Each pod's identities, decided once per change of the world.
    decided: resolve::Decided,
    /// Token answers of the current second.
    written: response::Written,
}

impl AppState {
    /// The state of an endpoint.
    pub fn new(
        config: ServerConfig,
        shared: Arc<Shared>,
        tokens: Arc<TokenService>,
        proxy: Proxy,
        metrics: Arc<Metrics>,
        events: Events,
    ) -> Self {
        Self {
            config,
            shared,
            tokens,
            proxy,
            audit: Audit::disabled(metrics.clone()),
            metrics,
            events,
            attestor: None,
            first_tokens: Mutex::default(),
            decided: resolve::Decided::default(),
            written: response::Written::default(),
        }
    }

    /// The same, recording every token decision in `audit`.
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.audit = audit;
        self
    }
    /// Callers attested by `attestor`, not by their source address alone.
    pub fn with_attestor(mut self, attestor: Attestor) -> Self {
        self.attestor = Some(Arc::new(attestor));
        self
    }
}

/// Who a request's caller is, as far as the endpoint knows before looking at the request.
#[derive(Clone, Debug)]
enum Caller {
    /// Callers are known by their source address alone (attestation off).
    ByAddress,
    /// Attested on the node's own network.
    Host(Attestation),
    /// On a pod's network: the pod its address names, once attested as that pod.
    PodNetwork(Arc<Connection>),
}

async fn caller(state: &AppState, peer: SocketAddr, connection: Option<Arc<Connection>>) -> Caller {
    let Some(attestor) = &state.attestor else {
        return Caller::ByAddress;
    };
    let Some(connection) = connection else {
        return Caller::Host(Attestation::Unknown("the connection's facts are missing"));
    };
    match attestor
        .placement(&connection.attestation, peer, connection.local)
        .await
    {
        Placement::Host(attestation) => Caller::Host(attestation),
        Placement::PodNetwork => Caller::PodNetwork(connection),
    }
}

impl Caller {
    /// The node itself, passed through to IMDS.
    fn is_passed_node(&self, state: &AppState) -> bool {
        matches!(self, Self::Host(Attestation::Node))
            && state
                .attestor
                .as_ref()
                .is_some_and(|a| a.node_callers == NodeCallers::Passthrough)
    }
}

/// The endpoint as the connections' [`Handler`](connections::Handler): each request goes to [`handle`]
/// with its peer and connection facts.
pub fn handler(state: Arc<AppState>) -> impl connections::Handler {
    move |request: Request<Incoming>, peer: SocketAddr, connection: Arc<Connection>| {
        handle(state.clone(), peer, Some(connection), request)
    }
}

/// Answers one request from `peer` (`connection`: the facts of the connection it came on, which
/// attestation needs). One span per request, which the token path fills in with the pod and the
/// identity once it knows them, so that every line logged for the request names node, caller, pod and
/// identity. The body is only read when the request is forwarded to IMDS.
pub async fn handle<B>(
    state: Arc<AppState>,
    peer: SocketAddr,
    connection: Option<Arc<Connection>>,
    req: Request<B>,
) -> Response
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let span = tracing::info_span!(
        "request",
        node = %state.config.node,
        peer = %peer.ip(),
        pod = tracing::field::Empty,
        identity = tracing::field::Empty,
    );
    handle_request(state, peer, connection, req)
        .instrument(span)
        .await
}

async fn handle_request<B>(
    state: Arc<AppState>,
    peer: SocketAddr,
    connection: Option<Arc<Connection>>,
    req: Request<B>,
) -> Response
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let route = request::classify(parts.uri.path());
    let caller = match route {
        Route::Token | Route::Instance | Route::OtherMetadata => caller(&state, peer, connection).await,
        _ => Caller::ByAddress,
    };
    let response = match &route {
        Route::Token => token(&state, Call::new(peer.ip(), started), peer, &caller, &parts).await,
        Route::HostToken if state.config.host_token => {
            Box::pin(host_token(&state, Call::new(peer.ip(), started), &parts)).await
        }
        Route::HostToken => response::not_found("/host/token is not enabled on this node"),
        Route::Instance | Route::OtherMetadata if caller.is_passed_node(&state) => {
            Box::pin(forward(&state, peer, Request::from_parts(parts, Body::new(body)))).await
        }
        Route::Instance | Route::OtherMetadata if refused_caller(&caller).is_some() => {
            let (status, why) = refused_caller(&caller).unwrap_or((StatusCode::FORBIDDEN, String::new()));
            refuse_caller(&state, peer, status, &why)
        }
        Route::Instance if state.config.block_instance_metadata => {
            blocked(&state, peer, &parts, "instance metadata is blocked on this node")
        }
        Route::OtherMetadata if state.config.block_other_metadata => {
            blocked(&state, peer, &parts, "this metadata path is blocked on this node")
        }
        Route::Instance | Route::OtherMetadata => {
            Box::pin(forward(&state, peer, Request::from_parts(parts, Body::new(body)))).await
        }
        Route::Variant(reason) => {
            tracing::warn!(peer = %peer.ip(), path = %logged_path(&parts), reason, decision = "refused", "refused a path variant");
            response::bad_request(&format!("Invalid request: {reason} is not served"))
        }
        Route::NotFound => response::not_found("Not found"),
    };
    state.metrics.answered(
        route.label(),
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Longest request path written to a log line, in bytes: a pod sending long refused paths in a loop
/// must not turn the node's log into its own.
const MAX_LOGGED_PATH_BYTES: usize = 256;

fn logged_path(req: &Parts) -> std::borrow::Cow<'_, str> {
    pod_identity_api::text::truncate(req.uri.path(), MAX_LOGGED_PATH_BYTES)
}

fn blocked(state: &AppState, peer: SocketAddr, req: &Parts, why: &str) -> Response {
    if let Err(error) = request::check_headers(&req.headers, state.config.metadata_header_required) {
        return response::bad_request(&error.to_string());
    }
    tracing::info!(peer = %peer.ip(), path = %logged_path(req), decision = "blocked", "blocked a metadata request");
    response::forbidden(why)
}

async fn forward(state: &AppState, peer: SocketAddr, req: Request<Body>) -> Response {
    if req.method() != Method::GET {
        return response::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Only GET is supported",
        );
    }
    if let Err(error) = request::check_headers(req.headers(), state.config.metadata_header_required) {
        return response::bad_request(&error.to_string());
    }
    tracing::debug!(peer = %peer.ip(), path = %pod_identity_api::text::truncate(req.uri().path(), MAX_LOGGED_PATH_BYTES), decision = "forwarded", "forwarding a metadata request");
    state.proxy.forward(req).await
}

/// The result of resolving a request, with the caller it was made for.
struct Resolved {
    pod: Option<Arc<PodRecord>>,
    resolution: Resolution,
    waited: Duration,
}

/// What a caller that is refused whatever it asks gets: the node under `refuse`, a caller that could not be
/// attested (503: it may ask again), a forged address.
fn refused_caller(caller: &Caller) -> Option<(StatusCode, String)> {
    match caller {
        Caller::Host(Attestation::Unknown(why)) => Some((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the caller could not be attested: {why}"),
        )),
        Caller::Host(Attestation::Spoofed { .. }) => Some((
            StatusCode::FORBIDDEN,
            "the caller's address is not its own".to_owned(),
        )),
        _ => None,
    }
}

fn refuse_caller(state: &AppState, peer: SocketAddr, status: StatusCode, why: &str) -> Response {
    state.metrics.decided(if status == StatusCode::FORBIDDEN {
        "denied"
    } else {
        "unattested"
    });
    tracing::info!(peer = %peer, decision = "refused", reason = why, "refused an attested caller");
    if status == StatusCode::FORBIDDEN {
        response::forbidden(why)
    } else {
        response::unavailable(why, state.config.retry_after.as_secs())
    }
}

async fn token(state: &AppState, call: Call, peer: SocketAddr, caller: &Caller, req: &Parts) -> Response {
    let (peer_addr, peer) = (peer, peer.ip());
    if req.method != Method::GET {
        return response::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Only GET is supported",
        );
    }
    if let Err(error) = request::check_headers(&req.headers, state.config.metadata_header_required) {
        return invalid(state, &call, "invalid_request", &error.to_string());
    }
    let query = match request::parse_token_query(req.uri.query().unwrap_or("")) {
        Ok(query) => query,
        Err(error) => return invalid(state, &call, error.code(), &error.to_string()),
    };
    let ip = request::caller_ip(peer);
    let refuse = |pod: Option<&PodRecord>, (status, why, reason): (StatusCode, String, audit::Reason)| {
        let decision = if status == StatusCode::FORBIDDEN {
            Decision::Denied
        } else {
            Decision::Unavailable
        };
        call.refused(&state.audit, pod, Some(&query), (decision, reason), &why);
        refuse_caller(state, peer_addr, status, &why)
    };
    let resolved = match caller {
        Caller::ByAddress | Caller::PodNetwork(_) => {
            resolve_waiting(state, &query, |world| resolve::calling_pod(world, ip).cloned()).await
        }
        Caller::Host(Attestation::Pod(uid)) => {
            resolve_waiting(state, &query, |world| resolve::attested_pod(world, uid).cloned()).await
        }
        Caller::Host(Attestation::Node) if caller.is_passed_node(state) => Resolved {
            pod: None,
            resolution: Resolution::Excepted,
            waited: Duration::ZERO,
        },
        Caller::Host(Attestation::Node) => {
            return refuse(
                None,
                (
                    StatusCode::FORBIDDEN,
                    "callers outside pods are refused on this node".to_owned(),
                    audit::Reason::NodeRefused,
                ),
            );
        }
        Caller::Host(attestation) => {
            let (status, why) = refused_caller(caller).unwrap_or((StatusCode::FORBIDDEN, String::new()));
            let reason = if matches!(attestation, Attestation::Spoofed { .. }) {
                audit::Reason::CallerSpoofed
            } else {
                audit::Reason::CallerUnattested
            };
            return refuse(None, (status, why, reason));
        }
    };
    if let (Caller::PodNetwork(connection), Some(pod)) = (caller, resolved.pod.as_ref())
        && let Some(refusal) = check_pod_network(state, peer_addr, connection, pod).await
    {
        return refuse(Some(pod), refusal);
    }
    answer(state, &call, &query, resolved, |tokens, resource, now| {
        state.written.tokens(tokens, resource, now)
    })
    .await
}

async fn host_token(state: &AppState, call: Call, req: &Parts) -> Response {
    let peer = call.peer;
    if !request::is_loopback(peer) {
        let why = "/host/token only answers callers on the node itself";
        call.refused(
            &state.audit,
            None,
            None,
            (Decision::Denied, audit::Reason::IdentityDenied),
            why,
        );
        return response::forbidden(why);
    }
    if let Err(request::HeaderError::Forwarded) = request::check_headers(&req.headers, false) {
        return response::bad_request(&request::HeaderError::Forwarded.to_string());
    }
    let Some(key) = request::host_token_pod(&req.headers) else {
        return invalid(
            state,
            &call,
            "invalid_request",
            "the headers podns and podname must name a pod (a namespace and a pod name)",
        );
    };
    let query = match request::parse_token_query(req.uri.query().unwrap_or("")) {
        Ok(query) => query,
        Err(error) => return invalid(state, &call, error.code(), &error.to_string()),
    };
    let resolved = resolve_waiting(state, &query, |world| resolve::named_pod(world, &key).cloned()).await;
    let not_found = matches!(
        resolved.resolution,
        Resolution::Deny(_) | Resolution::Wait(Pending::UnknownCaller)
    );
    if not_found {
        let why = match &resolved.resolution {
            Resolution::Deny(why) => why.clone(),
            _ => format!("no live pod {key} on this node"),
        };
        let decided = (Decision::Denied, audit::Reason::IdentityDenied);
        call.refused(&state.audit, resolved.pod.as_deref(), Some(&query), decided, &why);
        return response::not_found(&why);
    }
    // The CSI driver refuses an answer without `clientid`; IMDS answers without `client_id` exist
    // (older api-versions), so the identity's own client ID stands in, as the original answered.
    let identity_client_id = match &resolved.resolution {
        Resolution::Serve(grant) => grant.object.spec.client_id.clone(),
        _ => None,
    };
    answer(state, &call, &query, resolved, |tokens, resource, now| {
        let first = tokens.first().map(|t| response::token_json(t, resource, now));
        let client_id = tokens
            .first()
            .and_then(|t| t.client_id.clone())
            .or(identity_client_id)
            .unwrap_or_default();
        response::json_response(StatusCode::OK, &json!({"token": first, "clientid": client_id}))
    })
    .await
}

/// Whether a pod-network caller is the pod its source address names; the refusal when it is not.
async fn check_pod_network(
    state: &AppState,
    peer: SocketAddr,
    connection: &Connection,
    pod: &PodRecord,
) -> Option<(StatusCode, String, audit::Reason)> {
    let attestor = state.attestor.as_ref()?;
    let unattested = |why: &str| {
        Some((
            StatusCode::SERVICE_UNAVAILABLE,
            why.to_owned(),
            audit::Reason::CallerUnattested,
        ))
    };
    let Some(uid) = pod.view.uid.as_ref() else {
        return unattested("the pod of the caller's address has no UID yet");
    };
    match attestor
        .pod_network(&connection.attestation, uid, peer, connection.local)
        .await
    {
        Attestation::Pod(_) => None,
        Attestation::Spoofed { .. } => {
            let why = format!(
                "a connection from this pod's address {} came from outside the pod: the address was forged",
                peer.ip()
            );
            tracing::warn!(pod = %pod.view.key.name, namespace = %pod.view.key.namespace, peer = %peer, decision = "denied", reason = "spoofed", "refused a caller whose address is not its own");
            notify(state, Some(pod), Reason::CallerSpoofed, &why);
            Some((
                StatusCode::FORBIDDEN,
                "the caller's address is not its own".to_owned(),
                audit::Reason::CallerSpoofed,
            ))
        }
        Attestation::Node | Attestation::Unknown(_) => unattested("the caller could not be attested"),
    }
}

/// 400 in IMDS's shape for a request refused by its headers or query. Only the agent's own description
/// is logged, never the offending value.
fn invalid(state: &AppState, call: &Call, code: &str, why: &str) -> Response {
    let peer = call.peer;
    call.refused(
        &state.audit,
        None,
        None,
        (Decision::Denied, audit::Reason::InvalidRequest),
        why,
    );
    state.metrics.decided("invalid");
    tracing::info!(peer = %peer, decision = "invalid", reason = why, "refused a malformed token request");
    response::error(StatusCode::BAD_REQUEST, code, why)
}

/// Resolves the request, waiting on the world while the answer may still change.
/// Counts a request in `pod_identity_waiting_requests` from its first wait until it is answered or its
/// caller goes away (the request's future is dropped).
struct Waiting<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn resolve_waiting(
    state: &AppState,
    query: &TokenQuery,
    find: impl Fn(&crate::world::World) -> Result<Arc<PodRecord>, Pending>,
) -> Resolved {
    // The clock starts, and the world's changes are subscribed to, only once there is something to wait
    // for: an answer at once reads neither.
    let mut started: Option<tokio::time::Instant> = None;
    let waited = |started: Option<tokio::time::Instant>| started.map_or(Duration::ZERO, |s| s.elapsed());
    let mut changes: Option<tokio::sync::watch::Receiver<u64>> = None;
    let mut learnt = false;
    let mut waiting = None;
    loop {
        if let Some(changes) = changes.as_mut() {
            changes.borrow_and_update();
        }
        let (pod, resolution) = {
            let world = state.shared.read();
            match find(&world) {
                Ok(pod) => {
                    let identities = state.decided.pod_identities(&world, state.config.policy, &pod);
                    let resolution = resolve::resolve_from(
                        identities.as_deref(),
                        &pod.view.key,
                        &query.selector,
                        state.tokens.cache(),
                    );
                    (Some(pod), resolution)
                }
                Err(_) if !resolve::synced(&world, state.config.policy) => {
                    (None, Resolution::Wait(Pending::NotSynced))
                }
                Err(pending) => (None, Resolution::Wait(pending)),
            }
        };
        match resolution {
            Resolution::Wait(pending) => {
                let Some(changes) = changes.as_mut() else {
                    // The world is looked at again once subscribed, so no change in between is missed.
                    changes = Some(state.shared.subscribe());
                    continue;
                };
                let since = *started.get_or_insert_with(tokio::time::Instant::now);
                let deadline = since
                    + if pending.is_about_the_caller() {
                        state.config.pod_wait
                    } else {
                        state.config.assignment_wait
                    };
                waiting.get_or_insert_with(|| Waiting::new(&state.metrics.waiting_requests));
                let timed_out = tokio::time::timeout_at(deadline, changes.changed()).await;
                if !matches!(timed_out, Ok(Ok(()))) {
                    return Resolved {
                        pod,
                        resolution: Resolution::Wait(pending),
                        waited: waited(started),
                    };
                }
            }
            Resolution::LearnObjectIds(grants) if !learnt => {
                learnt = true;
                // Learning is waited for like the world: it is the caller's wait all the same.
                started.get_or_insert_with(tokio::time::Instant::now);
                for grant in grants {
                    let _ = state
                        .tokens
                        .tokens(&grant.principal, Some(&*grant.object), &query.resource)
                        .await;
                }
            }
            Resolution::LearnObjectIds(_) => {
                return Resolved {
                    pod,
                    resolution: Resolution::Deny(format!(
                        "{} is not an identity of this pod",
                        query.selector
                    )),
                    waited: waited(started),
                };
            }
            other => {
                return Resolved {
                    pod,
                    resolution: other,
                    waited: waited(started),
                };
            }
        }
    }
}

async fn answer(
    state: &AppState,
    call: &Call,
    query: &TokenQuery,
    resolved: Resolved,
    render: impl FnOnce(&crate::cache::Tokens, &str, i64) -> Response,
) -> Response {
    let Resolved {
        pod,
        resolution,
        waited,
    } = resolved;
    if waited > Duration::from_millis(1) {
        state.metrics.wait_duration.observe(waited.as_secs_f64());
    }
    let (namespace, name) = pod
        .as_ref()
        .map(|p| (p.view.key.namespace.as_str(), p.view.key.name.as_str()))
        .unwrap_or(("", ""));
    let resource = query.resource.as_str();
    // The request's span is an INFO span: below that level there is none to fill in, and no need to look.
    if tracing::level_enabled!(tracing::Level::INFO) {
        let span = tracing::Span::current();
        if let Some(pod) = &pod {
            span.record("pod", tracing::field::display(&pod.view.key));
        }
        if let Resolution::Serve(grant) = &resolution {
            span.record("identity", tracing::field::display(&grant.identity));
        }
    }
    if let Some(verdict) = verdict::of_resolution(&resolution) {
        let why = match &resolution {
            Resolution::Deny(why) => why.clone(),
            Resolution::Wait(pending) => pending.to_string(),
            _ => "the requested object_id is not an identity of this pod".to_owned(),
        };
        tracing::info!(pod = name, namespace, selector = %query.selector, resource, status = verdict.status.as_u16(), decision = verdict.decision, reason = %why, waited_ms = waited.as_millis() as u64, "refused a token request");
        return refuse(state, call, pod.as_deref(), Some(query), &verdict, &why);
    }
    // Borrowed from the resolution: a cached answer copies nothing of the identity.
    let node_principal;
    let (principal, identity_object, identity) = match &resolution {
        Resolution::Serve(grant) => (&grant.principal, Some(&*grant.object), Some(&grant.identity)),
        _ => {
            node_principal = Principal::Node(query.selector.clone());
            (&node_principal, None, None)
        }
    };
    let identity_name = IdentityName(identity);
    let (result, outcome) = state.tokens.tokens(principal, identity_object, resource).await;
    let audited = |decided: (Decision, audit::Reason), why: &str, tokens: &[crate::upstream::Token]| {
        if !state.audit.is_enabled() {
            return;
        }
        let identity = IdentityRef::of(identity_object, &query.selector);
        state.audit.record(&audit::Entry {
            caller: call.peer,
            pod: pod.as_deref(),
            identity: Some(&identity),
            resource,
            decision: decided.0,
            reason: decided.1,
            message: why,
            cache_hit: Some(outcome == Outcome::Hit),
            latency: call.started.elapsed(),
            tokens,
        });
    };
    match result {
        Ok(tokens) => {
            state
                .metrics
                .decided(if matches!(resolution, Resolution::Excepted) {
                    "excepted"
                } else {
                    "served"
                });
            if outcome == Outcome::Hit {
                tracing::debug!(pod = name, namespace, identity = %identity_name, resource, decision = "served", cache = outcome.label(), "served a token");
            } else {
                tracing::info!(pod = name, namespace, identity = %identity_name, resource, decision = "served", cache = outcome.label(), "served a token");
            }
            let recorded = match &resolution {
                Resolution::Serve(grant) => Some(&grant.first_token_recorded),
                _ => None,
            };
            record_first_token(state, pod.as_deref(), identity, recorded);
            let reason = if matches!(resolution, Resolution::Excepted) {
                audit::Reason::Excepted
            } else {
                audit::Reason::TokenServed
            };
            audited((Decision::Served, reason), "", &tokens);
            render(&tokens, resource, crate::clock::now())
        }
        Err(error) => {
            tracing::warn!(pod = name, namespace, identity = %identity_name, resource, decision = "upstream_error", %error, "no token from upstream");
            let why = format!("could not get a token for {identity_name}: {error}");
            let verdict = verdict::of_upstream(&error);
            state.metrics.decided(verdict.decision);
            if let Some(reason) = verdict.event {
                notify(state, pod.as_deref(), reason, &why);
            }
            audited(verdict.audited, &why, &[]);
            verdict_response(state, &verdict, &why)
        }
    }
}

/// Counts, audits, tells the pod and answers, as `verdict` says.
fn refuse(
    state: &AppState,
    call: &Call,
    pod: Option<&PodRecord>,
    query: Option<&TokenQuery>,
    verdict: &Verdict,
    why: &str,
) -> Response {
    state.metrics.decided(verdict.decision);
    call.refused(&state.audit, pod, query, verdict.audited, why);
    if let Some(reason) = verdict.event {
        notify(state, pod, reason, why);
    }
    verdict_response(state, verdict, why)
}

fn verdict_response(state: &AppState, verdict: &Verdict, why: &str) -> Response {
    if verdict.status == StatusCode::SERVICE_UNAVAILABLE {
        response::unavailable(
            why,
            verdict.retry_after.unwrap_or(state.config.retry_after).as_secs(),
        )
    } else {
        response::forbidden(why)
    }
}

fn notify(state: &AppState, pod: Option<&PodRecord>, reason: Reason, why: &str) {
    if let Some(pod) = pod {
        state.events.refused(Notice {
            pod: pod.view.key.clone(),
            uid: pod.view.uid.clone(),
            reason,
            message: why.to_owned(),
        });
    }
}

/// The identity a token is served under, as logs and metrics name it: `namespace/name`, or `node` for
/// an excepted pod's node identity.
#[derive(Clone, Copy)]
struct IdentityName<'a>(Option<&'a ObjectKey>);

impl std::fmt::Display for IdentityName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(key) => key.fmt(f),
            None => f.write_str("node"),
        }
    }
}

/// Observes the time from a pod's creation to its first token of `identity` (`namespace/name`, or `node`
/// for an excepted pod, whatever node identity it asked for), once per pod and identity: a pod's second
/// identity is a first token of its own, a repeat of either is not.
fn record_first_token(
    state: &AppState,
    pod: Option<&PodRecord>,
    identity: Option<&ObjectKey>,
    recorded: Option<&OnceLock<()>>,
) {
    // Every served token passes here: a repeat with the same grant reads its flag, and a repeat after a
    // change of the world (a new grant) is a lookup, with nothing allocated.
    if recorded.is_some_and(|r| r.get().is_some()) {
        return;
    }
    let Some(pod) = pod else { return };
    let (Some(uid), Some(created)) = (pod.view.uid.as_ref(), pod.created) else {
        return;
    };
    let mut seen = state.first_tokens.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(recorded) = recorded {
        let _ = recorded.set(());
    }
    if seen
        .get(uid)
        .is_some_and(|identities| identities.iter().any(|seen| seen.as_ref() == identity))
    {
        return;
    }
    // Pods come and go; a bounded memory forgets old ones rather than growing with the node's history.
    if seen.values().map(Vec::len).sum::<usize>() >= 4096 {
        seen.clear();
    }
    seen.entry(uid.clone()).or_default().push(identity.cloned());
    drop(seen);
    let elapsed = jiff::Timestamp::now().duration_since(created);
    state
        .metrics
        .first_token
        .get_or_create(&IdentityLabels {
            identity: IdentityName(identity).to_string(),
        })
        .observe(elapsed.as_secs_f64().max(0.0));
}

mod verdict;

#[cfg(test)]
mod tests;
