//! Azure Resource Manager: identity GET/PATCH on virtual machines and scale sets, the long-running operation
//! an update starts, and GET of user-assigned identities. Requests pass ARM's gates in ARM's order:
//! authentication, api-version, subscription, authorization, throttling, resource group, resource.
//! Paths compare case-insensitively. Errors carry ARM's `{"error":{"code","message"}}` body.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, Method, Request, StatusCode};
use serde_json::{Value, json};

use crate::arm_federated_credentials::{self, CredentialPath};
use crate::http::{
    BodyError, Conn, Tag, base_url, header_str, json as json_resp, param, query_pairs, read_body, tagged,
    with_header,
};
use crate::identity_merge::{merge, parse_patch};
use crate::settings::same_resource;
use crate::shared::{Shared, lock, now_secs, read};
use crate::state::{Action, Provisioning, State};
use crate::throttle::{Decision, Policy, Request as ThrottleRequest, Scope};
use crate::tokens::{Claims, VerifyError};
use pod_identity_azure::resource_id::{ResourceId, ResourceType, fold};

/// Audiences ARM accepts.
const AUDIENCES: &[&str] = &[
    "https://management.azure.com",
    "https://management.core.windows.net",
];

pub const COMPUTE_API_VERSIONS: &[&str] = &[
    "2018-06-01",
    "2018-10-01",
    "2019-03-01",
    "2019-07-01",
    "2019-12-01",
    "2020-06-01",
    "2020-12-01",
    "2021-03-01",
    "2021-04-01",
    "2021-07-01",
    "2021-11-01",
    "2022-03-01",
    "2022-08-01",
    "2022-11-01",
    "2023-03-01",
    "2023-07-01",
    "2023-09-01",
    "2024-03-01",
    "2024-07-01",
    "2024-11-01",
    "2025-04-01",
    "2025-11-01",
    "2026-03-01",
    "2026-04-01",
];

pub const MSI_API_VERSIONS: &[&str] = &[
    "2015-08-31-preview",
    "2018-11-30",
    "2021-09-30-preview",
    "2022-01-31-preview",
    "2023-01-31",
    "2023-07-31-preview",
    "2024-11-30",
    "2025-01-31-preview",
    "2025-05-31-preview",
    "2026-04-30",
    "2026-05-31",
];

pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    error_body(status, json!({"error": {"code": code, "message": message}}))
}

fn error_body(status: StatusCode, body: Value) -> Response {
    let resp = json_resp(status, &body);
    with_header(resp, "x-ms-request-id", &uuid::Uuid::new_v4().to_string())
}

/// The body ARM sends with a fault injected by the admin API.
pub fn fault(status: StatusCode) -> Response {
    let (code, message) = match status.as_u16() {
        429 => (
            "TooManyRequests",
            "The request is being throttled as the limit has been reached for operation type. Please retry after the time in the Retry-After header.",
        ),
        410 => ("Gone", "The requested resource is no longer available."),
        500 => (
            "InternalServerError",
            "Encountered internal server error. Please try again later.",
        ),
        502 => (
            "BadGateway",
            "The gateway did not receive a response from 'Microsoft.Compute' within the specified time period.",
        ),
        503 => (
            "ServiceUnavailable",
            "The server (leased) is currently unable to handle the request due to a temporary overloading or maintenance.",
        ),
        504 => (
            "GatewayTimeout",
            "The gateway did not receive a response from 'Microsoft.Compute' within the specified time period.",
        ),
        _ => ("InternalServerError", "The request failed."),
    };
    error(status, code, message)
}

/// What the path names.
#[derive(Debug)]
enum Route {
    Machine(ResourceId),
    /// One instance of a scale set.
    Instance(ResourceId),
    /// `POST .../virtualMachineScaleSets/{name}/delete`: scale-in of the listed instances.
    DeleteInstances(ResourceId),
    Identity(ResourceId),
    Operation {
        name: String,
    },
    Unknown {
        namespace: Option<String>,
        kind: Option<String>,
    },
    FederatedCredentials(CredentialPath),
}

fn route(path: &str) -> Route {
    if let Some(p) = CredentialPath::parse(path) {
        return Route::FederatedCredentials(p);
    }
    if let Some(id) = ResourceId::parse(path.trim_end_matches('/')) {
        return match id.kind {
            ResourceType::VirtualMachine | ResourceType::VirtualMachineScaleSet => Route::Machine(id),
            ResourceType::ScaleSetInstance => Route::Instance(id),
            ResourceType::UserAssignedIdentity => Route::Identity(id),
            _ => Route::Unknown {
                namespace: None,
                kind: None,
            },
        };
    }
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let eq = |i: usize, s: &str| segs.get(i).is_some_and(|x| x.eq_ignore_ascii_case(s));
    if segs.len() == 10
        && eq(9, "delete")
        && let Some(id) = ResourceId::parse(&segs[..9].join("/"))
        && id.kind == ResourceType::VirtualMachineScaleSet
    {
        return Route::DeleteInstances(id);
    }
    if segs.len() == 9
        && eq(1, "subscriptions")
        && eq(3, "providers")
        && eq(4, "Microsoft.Compute")
        && eq(5, "locations")
        && eq(7, "operations")
    {
        return Route::Operation {
            name: segs[8].to_owned(),
        };
    }
    let providers = segs.iter().position(|s| s.eq_ignore_ascii_case("providers"));
    Route::Unknown {
        namespace: providers.and_then(|p| segs.get(p + 1)).map(|s| (*s).to_owned()),
        kind: providers.and_then(|p| segs.get(p + 2)).map(|s| (*s).to_owned()),
    }
}

fn route_key(rt: &Route) -> Option<String> {
    match rt {
        Route::Machine(id) | Route::Identity(id) => Some(id.key()),
        Route::Instance(id) | Route::DeleteInstances(id) => Some(id.parent().key()),
        Route::Operation { name } => Some(fold(name)),
        Route::Unknown { .. } => None,
        Route::FederatedCredentials(p) => Some(p.key()),
    }
}

/// The case-folded resource an ARM path names, as the request log records it (also for requests a fault
/// answered before ARM saw them).
pub fn resource_key(path: &str) -> Option<String> {
    route_key(&route(path))
}

fn subscription_of(path: &str) -> Option<String> {
    let mut segs = path.split('/').skip(1);
    match (segs.next(), segs.next()) {
        (Some(s), Some(id)) if s.eq_ignore_ascii_case("subscriptions") && !id.is_empty() => {
            Some(id.to_owned())
        }
        _ => None,
    }
}

fn is_api_version(v: &str) -> bool {
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let b = date.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

fn arm_time(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .map(|t| t.strftime("%-m/%-d/%Y %-I:%M:%S %p").to_string())
        .unwrap_or_default()
}

/// Authenticates the bearer token; the claims on success.
pub(crate) fn authenticate(sh: &Shared, headers: &HeaderMap) -> Result<Claims, Response> {
    let unauthorized = |code: &str, message: &str, desc: &str| {
        let resp = error(StatusCode::UNAUTHORIZED, code, message);
        with_header(
            resp,
            "www-authenticate",
            &format!(
                "Bearer authorization_uri=\"https://login.windows.net/\", error=\"invalid_token\", error_description=\"{desc}\""
            ),
        )
    };
    let Some(auth) = header_str(headers, "authorization") else {
        return Err(unauthorized(
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.",
            "The authentication failed because of missing 'Authorization' header.",
        ));
    };
    let token = match auth.split_once(' ') {
        Some((scheme, tok)) if scheme.eq_ignore_ascii_case("bearer") && !tok.trim().is_empty() => tok.trim(),
        _ => {
            return Err(unauthorized(
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is provided in an invalid format.",
                "The access token is from the wrong format.",
            ));
        }
    };
    let now = now_secs();
    let claims = match sh.signer.verify(token, now) {
        Ok(c) => c,
        Err(VerifyError::Expired(exp)) => {
            return Err(unauthorized(
                "ExpiredAuthenticationToken",
                &format!(
                    "The access token expiry UTC time '{}' is earlier than current UTC time '{}'.",
                    arm_time(exp),
                    arm_time(now)
                ),
                "The token is expired.",
            ));
        }
        Err(_) => {
            return Err(unauthorized(
                "InvalidAuthenticationToken",
                "The access token is invalid.",
                "The authentication failed because the access token is invalid.",
            ));
        }
    };
    if !AUDIENCES.iter().any(|a| same_resource(a, &claims.aud)) {
        return Err(unauthorized(
            "InvalidAuthenticationTokenAudience",
            &format!(
                "The access token has been obtained for wrong audience or resource '{}'. It should exactly match with one of the allowed audiences 'https://management.core.windows.net/','https://management.core.windows.net','https://management.azure.com/','https://management.azure.com'.",
                claims.aud
            ),
            "The access token has been obtained for wrong audience or resource.",
        ));
    }
    Ok(claims)
}

pub async fn handle(sh: &Shared, conn: &Conn, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let pairs = query_pairs(parts.uri.query().unwrap_or(""));
    let resource_tag = |resp: Response, res: Option<String>| {
        tagged(
            resp,
            Tag {
                resource: res,
                identity: None,
            },
        )
    };
    let claims = match authenticate(sh, &parts.headers) {
        Ok(c) => c,
        Err(resp) => return resource_tag(resp, None),
    };
    let rt = route(&path);
    let res_key = route_key(&rt);
    let resp = dispatch(
        sh,
        conn,
        &parts.method,
        &parts.headers,
        &path,
        &pairs,
        rt,
        &claims,
        body,
    )
    .await;
    resource_tag(resp, res_key)
}

#[allow(clippy::too_many_arguments)]
async fn dispatch(
    sh: &Shared,
    conn: &Conn,
    method: &Method,
    headers: &HeaderMap,
    path: &str,
    pairs: &[(String, String)],
    rt: Route,
    claims: &Claims,
    body: Body,
) -> Response {
    let api_version = match param(pairs, "api-version") {
        None | Some("") => {
            return error(
                StatusCode::BAD_REQUEST,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            );
        }
        Some(v) if !is_api_version(v) => {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidApiVersionParameter",
                &format!(
                    "The api-version '{v}' is invalid. The supported versions are '{}'.",
                    COMPUTE_API_VERSIONS.join(",")
                ),
            );
        }
        Some(v) => v.to_owned(),
    };
    let Some(sub_id) = subscription_of(path) else {
        return error(
            StatusCode::NOT_FOUND,
            "InvalidRequestUri",
            &format!("The request URI '{path}' is not valid; only subscription-scoped resources are served."),
        );
    };
    let (tenant, sub_display) = {
        let st = lock(&sh.state);
        match st.subscription(&sub_id) {
            Some(s) => (s.tenant_id.clone(), s.id.clone()),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "SubscriptionNotFound",
                    &format!("The subscription '{sub_id}' could not be found."),
                );
            }
        }
    };
    if !claims.tid.eq_ignore_ascii_case(&tenant) {
        return with_header(
            error(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationTokenTenant",
                &format!(
                    "The access token is from the wrong issuer '{}'. It must match the tenant 'https://sts.windows.net/{tenant}/' associated with this subscription. Please use the authority (URL) 'https://login.windows.net/{tenant}' to get the token. Note, if the subscription is transferred to another tenant there is no impact to the services, but information about new tenant could take time to propagate (up to an hour). If you just transferred your subscription and see this error message, please try back later.",
                    claims.iss
                ),
            ),
            "www-authenticate",
            &format!(
                "Bearer authorization_uri=\"https://login.windows.net/{tenant}\", error=\"invalid_token\", error_description=\"The access token is from the wrong issuer.\""
            ),
        );
    }
    match rt {
        Route::Machine(id) => match *method {
            Method::GET => get_compute(sh, &id, &api_version, claims).await,
            Method::PATCH => patch_compute(sh, conn, headers, &id, &api_version, claims, body).await,
            Method::DELETE => delete_compute(sh, conn, headers, &id, &api_version, claims),
            _ => method_not_allowed(method),
        },
        Route::Instance(id) => match *method {
            Method::DELETE => {
                let instance = id.child.clone().unwrap_or_default();
                delete_instances(sh, conn, headers, &id.parent(), &[instance], &api_version, claims)
            }
            // Instances are modelled for scale-in only.
            _ => error(
                StatusCode::NOT_FOUND,
                "InvalidRequestUri",
                &format!("The request URI '{path}' does not name a resource this service holds."),
            ),
        },
        Route::DeleteInstances(id) => match *method {
            Method::POST => {
                let limit = read(&sh.settings).max_body_bytes;
                let ids = match read_body(headers, body, limit).await {
                    Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                        Ok(v) => v["instanceIds"].as_array().map(|a| {
                            a.iter()
                                .filter_map(|i| i.as_str().map(str::to_owned))
                                .collect::<Vec<_>>()
                        }),
                        Err(_) => None,
                    },
                    Err(_) => None,
                };
                match ids {
                    Some(ids) if !ids.is_empty() => {
                        delete_instances(sh, conn, headers, &id, &ids, &api_version, claims)
                    }
                    _ => invalid_content(
                        "The request content must name the instances: {\"instanceIds\": [...]}.",
                    ),
                }
            }
            _ => method_not_allowed(method),
        },
        Route::Identity(id) => match *method {
            Method::GET => get_identity(sh, &id, &api_version, claims),
            _ => method_not_allowed(method),
        },
        Route::Operation { name } => match *method {
            Method::GET => get_operation(sh, &sub_display, &name, claims),
            _ => method_not_allowed(method),
        },
        Route::FederatedCredentials(p) => {
            arm_federated_credentials::handle(
                sh,
                conn,
                method,
                headers,
                &p,
                &api_version,
                pairs,
                claims,
                body,
            )
            .await
        }
        Route::Unknown { namespace, kind } => match (namespace, kind) {
            (Some(ns), Some(kind))
                if ns.eq_ignore_ascii_case("Microsoft.Compute")
                    || ns.eq_ignore_ascii_case("Microsoft.ManagedIdentity") =>
            {
                error(
                    StatusCode::NOT_FOUND,
                    "InvalidResourceType",
                    &format!(
                        "The resource type '{kind}' could not be found in the namespace '{ns}' for api version '{api_version}'."
                    ),
                )
            }
            (Some(ns), _) => error(
                StatusCode::NOT_FOUND,
                "MissingSubscriptionRegistration",
                &format!(
                    "The subscription is not registered to use namespace '{ns}'. See https://aka.ms/rps-not-found for how to register subscriptions."
                ),
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "InvalidRequestUri",
                &format!("The request URI '{path}' does not name a resource this service holds."),
            ),
        },
    }
}

pub(crate) fn method_not_allowed(method: &Method) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        &format!("The requested resource does not support http method '{method}'."),
    )
}

pub(crate) fn authorization_failed(claims: &Claims, action: &str, scope: &str) -> Response {
    error(
        StatusCode::FORBIDDEN,
        "AuthorizationFailed",
        &format!(
            "The client '{}' with object id '{}' does not have authorization to perform action '{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please refresh your credentials.",
            claims.appid, claims.oid
        ),
    )
}

/// Checks the buckets; `Err` is the 429 to send, `Ok` the headers for the response.
pub(crate) fn throttle(
    sh: &Shared,
    claims: &Claims,
    sub: &str,
    resource: &str,
    write: bool,
    policy: Option<Policy>,
) -> Result<Vec<(&'static str, String)>, Response> {
    let cfg = read(&sh.settings).throttling.clone();
    let (decision, early) = lock(&sh.throttler).admit(
        &cfg,
        Instant::now(),
        &ThrottleRequest {
            subscription: sub,
            principal: &claims.oid,
            resource,
            write,
            policy,
        },
    );
    if early {
        crate::observe::note_inside_retry_after();
    }
    match decision {
        Decision::Allowed(h) => Ok(h),
        Decision::Throttled {
            scope,
            retry_after,
            allowed,
        } => {
            let secs = retry_after.as_secs().max(1);
            let resp = match scope {
                Scope::Arm { write } => error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "SubscriptionRequestsThrottled",
                    &format!(
                        "Number of '{}' requests for subscription '{sub}' actor '{}' exceeded. Please try again after '{secs}' seconds after the additional tokens are available. Refer to https://aka.ms/arm-throttling",
                        if write { "write" } else { "read" },
                        claims.oid
                    ),
                ),
                Scope::ComputeResource(p) | Scope::ComputeSubscription(p) => {
                    let target = match scope {
                        Scope::ComputeResource(_) => format!("{}Resource", p.name()),
                        _ => format!("{}SubscriptionMaximum", p.name()),
                    };
                    let now = jiff::Timestamp::now();
                    let start = now - jiff::SignedDuration::from_secs(60);
                    let detail = json!({
                        "operationGroup": target,
                        "startTime": start.to_string(),
                        "endTime": now.to_string(),
                        "allowedRequestCount": allowed,
                        "measuredRequestCount": allowed + 1,
                    });
                    error_body(
                        StatusCode::TOO_MANY_REQUESTS,
                        json!({"error": {
                            "code": "OperationNotAllowed",
                            "message": "The server rejected the request because too many requests have been received for this subscription.",
                            "details": [{"code": "TooManyRequests", "target": target, "message": detail.to_string()}],
                        }}),
                    )
                }
            };
            Err(with_header(resp, "retry-after", &secs.to_string()))
        }
    }
}

pub(crate) fn with_headers(mut resp: Response, headers: Vec<(&'static str, String)>) -> Response {
    for (k, v) in headers {
        resp = with_header(resp, k, &v);
    }
    resp
}

fn group_or_resource_missing(st: &State, id: &ResourceId) -> Response {
    let rg_exists = st
        .subscription(&id.subscription)
        .is_some_and(|s| s.resource_groups.contains_key(&fold(&id.resource_group)));
    if rg_exists {
        error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!(
                "The Resource '{}/{}' under resource group '{}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
                id.kind.arm_type(),
                id.name,
                id.resource_group
            ),
        )
    } else {
        error(
            StatusCode::NOT_FOUND,
            "ResourceGroupNotFound",
            &format!("Resource group '{}' could not be found.", id.resource_group),
        )
    }
}

pub(crate) fn unsupported_version(kind: &str, version: &str, supported: &[&str], location: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "NoRegisteredProviderFound",
        &format!(
            "No registered resource provider found for location '{location}' and API version '{version}' for type '{kind}'. The supported api-versions are '{}'. The supported locations are 'eastus, westeurope, westus2, northeurope'.",
            supported.join(", ")
        ),
    )
}

fn policy_for(kind: ResourceType, write: bool) -> Policy {
    match (kind, write) {
        (ResourceType::VirtualMachine, false) => Policy::GetVm,
        (ResourceType::VirtualMachine, true) => Policy::UpdateVm,
        (_, false) => Policy::GetVmss,
        (_, true) => Policy::UpdateVmss,
    }
}

async fn get_compute(sh: &Shared, id: &ResourceId, api_version: &str, claims: &Claims) -> Response {
    let scope = id.to_string();
    if !lock(&sh.state).authorized(&claims.oid, Action::ComputeRead, &scope) {
        return authorization_failed(claims, Action::ComputeRead.arm_action(id.kind), &scope);
    }
    let headers = match throttle(
        sh,
        claims,
        &id.subscription,
        &id.key(),
        false,
        Some(policy_for(id.kind, false)),
    ) {
        Ok(h) => h,
        Err(resp) => return resp,
    };
    let mut st = lock(&sh.state);
    st.advance(Instant::now());
    let Some(c) = st.machines.get(&id.key()) else {
        return group_or_resource_missing(&st, id);
    };
    if !COMPUTE_API_VERSIONS.contains(&api_version) {
        return unsupported_version(id.kind.arm_type(), api_version, COMPUTE_API_VERSIONS, &c.location);
    }
    let body = st.render_machine(c);
    let etag = format!("\"{}\"", c.etag);
    drop(st);
    with_header(
        with_headers(json_resp(StatusCode::OK, &body), headers),
        "etag",
        &etag,
    )
}

fn get_identity(sh: &Shared, id: &ResourceId, api_version: &str, claims: &Claims) -> Response {
    let scope = id.to_string();
    let st = lock(&sh.state);
    if !st.authorized(&claims.oid, Action::IdentityRead, &scope) {
        return authorization_failed(claims, Action::IdentityRead.arm_action(id.kind), &scope);
    }
    drop(st);
    let headers = match throttle(sh, claims, &id.subscription, &id.key(), false, None) {
        Ok(h) => h,
        Err(resp) => return resp,
    };
    let st = lock(&sh.state);
    let Some(u) = st.uami(&id.to_string()) else {
        return group_or_resource_missing(&st, id);
    };
    if !MSI_API_VERSIONS.contains(&api_version) {
        return unsupported_version(id.kind.arm_type(), api_version, MSI_API_VERSIONS, &u.location);
    }
    with_headers(json_resp(StatusCode::OK, &State::render_uami(u)), headers)
}

fn get_operation(sh: &Shared, sub: &str, name: &str, claims: &Claims) -> Response {
    let headers = match throttle(sh, claims, sub, &fold(name), false, Some(Policy::GetOperation)) {
        Ok(h) => h,
        Err(resp) => return resp,
    };
    let mut st = lock(&sh.state);
    st.advance(Instant::now());
    let Some(op) = st.operations.get(&fold(name)).or_else(|| st.operations.get(name)) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("The entity was not found in this Azure location. Operation '{name}' does not exist."),
        );
    };
    if !op.subscription.eq_ignore_ascii_case(sub) {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "The entity was not found in this Azure location.",
        );
    }
    let in_progress = op.status == crate::state::OperationStatus::InProgress;
    let body = State::render_operation(op);
    drop(st);
    let resp = with_headers(json_resp(StatusCode::OK, &body), headers);
    if in_progress {
        let poll = read(&sh.settings).lro_poll_interval_secs.max(1);
        with_header(resp, "retry-after", &poll.to_string())
    } else {
        resp
    }
}

pub(crate) fn invalid_content(message: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "InvalidRequestContent",
        &format!("The request content was invalid and could not be deserialized: '{message}'."),
    )
}

async fn patch_compute(
    sh: &Shared,
    conn: &Conn,
    headers: &HeaderMap,
    id: &ResourceId,
    api_version: &str,
    claims: &Claims,
    body: Body,
) -> Response {
    let scope = id.to_string();
    if !lock(&sh.state).authorized(&claims.oid, Action::ComputeWrite, &scope) {
        return authorization_failed(claims, Action::ComputeWrite.arm_action(id.kind), &scope);
    }
    let rate_headers = match throttle(
        sh,
        claims,
        &id.subscription,
        &id.key(),
        true,
        Some(policy_for(id.kind, true)),
    ) {
        Ok(h) => h,
        Err(resp) => return resp,
    };
    let (limit, lro, poll, reject_concurrent) = {
        let s = read(&sh.settings);
        (
            s.max_body_bytes,
            Duration::from_millis(s.lro_duration_ms),
            s.lro_poll_interval_secs.max(1),
            s.reject_concurrent_updates,
        )
    };
    if let Some(ct) = header_str(headers, "content-type")
        && !ct.to_ascii_lowercase().starts_with("application/json")
    {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("The content media type '{ct}' is not supported. Only 'application/json' is supported."),
        );
    }
    let bytes = match read_body(headers, body, limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(n)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestContentTooLarge",
                &format!("The request content size exceeds the maximum size of {n} bytes."),
            );
        }
        Err(BodyError::Read(e)) => return invalid_content(&e),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return invalid_content("The request content was empty. Path '', line 0, position 0.");
    }
    let value: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return invalid_content(&format!(
                "Unexpected character encountered while parsing value. Path '', line {}, position {}.",
                e.line(),
                e.column()
            ));
        }
    };
    let patch = match parse_patch(&value) {
        Ok(p) => p,
        Err(e) => {
            let (code, target) = e.code_and_target();
            let mut err = json!({"code": code, "message": e.to_string()});
            if let Some(t) = target {
                err["target"] = json!(t);
            }
            return error_body(StatusCode::BAD_REQUEST, json!({ "error": err }));
        }
    };
    let now = Instant::now();
    let mut st = lock(&sh.state);
    st.advance(now);
    let Some(c) = st.machines.get(&id.key()) else {
        return group_or_resource_missing(&st, id);
    };
    if !COMPUTE_API_VERSIONS.contains(&api_version) {
        return unsupported_version(id.kind.arm_type(), api_version, COMPUTE_API_VERSIONS, &c.location);
    }
    if let Some(if_match) = header_str(headers, "if-match")
        && if_match.trim() != "*"
        && if_match.trim() != format!("\"{}\"", c.etag)
    {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "The condition specified using HTTP conditional header(s) is not met.",
        );
    }
    let base = base_url(headers, conn, true);
    if c.provisioning == Provisioning::Deleting {
        return marked_for_deletion(id, "Update");
    }
    if reject_concurrent && let Some(pending) = &c.pending_operation {
        let loc = c.location.clone();
        return error(
            StatusCode::CONFLICT,
            "AnotherOperationInProgress",
            &format!(
                "Another operation on this or dependent resource is in progress. To retrieve status of the operation use uri: {base}/subscriptions/{}/providers/Microsoft.Compute/locations/{loc}/operations/{pending}?api-version={api_version}.",
                id.subscription
            ),
        );
    }
    let current = c.model.current();
    let merged = match patch.as_ref().map(|p| merge(&current, p)) {
        None => crate::identity_merge::Merged {
            system: current.system,
            user: current.user.clone(),
            added: Vec::new(),
            removed: Vec::new(),
        },
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            let (code, target) = e.code_and_target();
            let mut err = json!({"code": code, "message": e.to_string()});
            if let Some(t) = target {
                err["target"] = json!(t);
            }
            return error_body(StatusCode::BAD_REQUEST, json!({ "error": err }));
        }
    };
    let missing: Vec<&String> = merged.added.iter().filter(|a| st.uami(a).is_none()).collect();
    if !missing.is_empty() {
        let inner: Vec<String> = missing
            .iter()
            .map(|m| {
                let name = ResourceId::parse(m.trim_end_matches('/')).map(|r| r.name).unwrap_or_default();
                format!(
                    "Resource '{m}' was not found. The Resource 'Microsoft.ManagedIdentity/userAssignedIdentities/{name}' was not found."
                )
            })
            .collect();
        return error(
            StatusCode::BAD_REQUEST,
            "FailedIdentityOperation",
            &format!(
                "Identity operation for resource '{scope}' failed with error 'Failed to perform resource identity operation. Status: 'NotFound'. Response: '{{\"error\":{{\"code\":\"NotFound\",\"message\":\"{}\"}}}}'.'. For more information on troubleshooting, see https://aka.ms/vmssidentitytroubleshoot.",
                inner.join(" ").replace('"', "\\\"")
            ),
        );
    }
    let unassignable: Vec<&String> = merged
        .added
        .iter()
        .filter(|a| !st.authorized(&claims.oid, Action::IdentityAssign, a))
        .collect();
    if !unassignable.is_empty() {
        let scopes: Vec<String> = unassignable.iter().map(|s| (*s).clone()).collect();
        let actions: Vec<&str> = scopes
            .iter()
            .map(|_| Action::IdentityAssign.arm_action(id.kind))
            .collect();
        return error(
            StatusCode::FORBIDDEN,
            "LinkedAuthorizationFailed",
            &format!(
                "The client '{}' with object id '{}' has permission to perform action '{}' on scope '{scope}'; however, it does not have permission to perform action(s) '{}' on the linked scope(s) '{}' (respectively) or the linked scope(s) are invalid.",
                claims.appid,
                claims.oid,
                Action::ComputeWrite.arm_action(id.kind),
                actions.join(","),
                scopes.join(",")
            ),
        );
    }
    let key = id.key();
    let Some(op) = st.apply_identity_update(&key, &merged, now, lro) else {
        return group_or_resource_missing(&st, id);
    };
    let Some(c) = st.machines.get(&key) else {
        return group_or_resource_missing(&st, id);
    };
    let body = st.render_machine(c);
    let (etag, loc, updating) = (
        format!("\"{}\"", c.etag),
        c.location.clone(),
        c.pending_operation.is_some(),
    );
    drop(st);
    tracing::debug!(resource = %scope, added = merged.added.len(), removed = merged.removed.len(), operation = %op, "identity update accepted");
    let async_url = format!(
        "{base}/subscriptions/{}/providers/Microsoft.Compute/locations/{loc}/operations/{op}?p=1&api-version={api_version}",
        id.subscription
    );
    let mut resp = with_headers(json_resp(StatusCode::OK, &body), rate_headers);
    resp = with_header(resp, "azure-asyncoperation", &async_url);
    resp = with_header(resp, "azure-asyncnotification", "Enabled");
    resp = with_header(resp, "etag", &etag);
    if updating {
        resp = with_header(resp, "retry-after", &poll.to_string());
    }
    resp
}

/// CRP's answer to a change of a VM or scale set being deleted.
fn marked_for_deletion(id: &ResourceId, operation: &str) -> Response {
    let what = match id.kind {
        ResourceType::VirtualMachine => "VM",
        _ => "VM scale set",
    };
    error(
        StatusCode::CONFLICT,
        "OperationNotAllowed",
        &format!(
            "Operation '{operation}' is not allowed on {what} '{}' since the {what} is marked for deletion. You can only retry the Delete operation (or wait for an ongoing one to complete).",
            id.name
        ),
    )
}

/// The `202 Accepted` of a long-running delete: `Azure-AsyncOperation` to poll, no body.
#[allow(clippy::too_many_arguments)]
fn accepted(
    sh: &Shared,
    conn: &Conn,
    headers: &HeaderMap,
    id: &ResourceId,
    location: &str,
    op: &str,
    api_version: &str,
    rate: Vec<(&'static str, String)>,
) -> Response {
    let base = base_url(headers, conn, true);
    let poll = read(&sh.settings).lro_poll_interval_secs.max(1);
    let async_url = format!(
        "{base}/subscriptions/{}/providers/Microsoft.Compute/locations/{location}/operations/{op}?p=1&api-version={api_version}",
        id.subscription
    );
    let mut resp = Response::builder()
        .status(StatusCode::ACCEPTED)
        .body(Body::empty())
        .unwrap_or_default();
    resp = with_headers(resp, rate);
    resp = with_header(resp, "azure-asyncoperation", &async_url);
    with_header(resp, "retry-after", &poll.to_string())
}

/// `DELETE` of a VM or scale set: 202 and a long-running operation during which the resource reads
/// `provisioningState: Deleting`; 204 when there is nothing to delete (DELETE is idempotent on ARM).
fn delete_compute(
    sh: &Shared,
    conn: &Conn,
    headers: &HeaderMap,
    id: &ResourceId,
    api_version: &str,
    claims: &Claims,
) -> Response {
    let scope = id.to_string();
    if !lock(&sh.state).authorized(&claims.oid, Action::ComputeDelete, &scope) {
        return authorization_failed(claims, Action::ComputeDelete.arm_action(id.kind), &scope);
    }
    let rate = match throttle(sh, claims, &id.subscription, &id.key(), true, None) {
        Ok(h) => h,
        Err(resp) => return resp,
    };
    let lro = Duration::from_millis(read(&sh.settings).lro_duration_ms);
    let now = Instant::now();
    let mut st = lock(&sh.state);
    st.advance(now);
    let rg_exists = st
        .subscription(&id.subscription)
        .is_some_and(|s| s.resource_groups.contains_key(&fold(&id.resource_group)));
    if !rg_exists {
        return group_or_resource_missing(&st, id);
    }
    let Some(location) = st.machines.get(&id.key()).map(|c| c.location.clone()) else {
        return with_headers(
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::empty())
                .unwrap_or_default(),
            rate,
        );
    };
    if !COMPUTE_API_VERSIONS.contains(&api_version) {
        return unsupported_version(id.kind.arm_type(), api_version, COMPUTE_API_VERSIONS, &location);
    }
    let Some(op) = st.start_delete(&id.key(), now, lro) else {
        return group_or_resource_missing(&st, id);
    };
    drop(st);
    tracing::debug!(resource = %scope, operation = %op, "delete accepted");
    accepted(sh, conn, headers, id, &location, &op, api_version, rate)
}

/// Deleting instances of a scale set (scale-in), one by `DELETE` on the instance or several by
/// `POST .../delete` with `instanceIds`: 202 and a long-running operation; the scale set and its
/// identities stay.
#[allow(clippy::too_many_arguments)]
fn delete_instances(
    sh: &Shared,
    conn: &Conn,
    headers: &HeaderMap,
    scale_set: &ResourceId,
    instance_ids: &[String],
    api_version: &str,
    claims: &Claims,
) -> Response {
    let scope = scale_set.to_string();
    if !lock(&sh.state).authorized(&claims.oid, Action::ComputeDelete, &scope) {
        return authorization_failed(claims, Action::ComputeDelete.arm_action(scale_set.kind), &scope);
    }
    let rate = match throttle(sh, claims, &scale_set.subscription, &scale_set.key(), true, None) {
        Ok(h) => h,
        Err(resp) => return resp,
    };
    let lro = Duration::from_millis(read(&sh.settings).lro_duration_ms);
    let now = Instant::now();
    let mut st = lock(&sh.state);
    st.advance(now);
    let Some(location) = st.machines.get(&scale_set.key()).map(|c| c.location.clone()) else {
        return group_or_resource_missing(&st, scale_set);
    };
    if !COMPUTE_API_VERSIONS.contains(&api_version) {
        return unsupported_version(
            scale_set.kind.arm_type(),
            api_version,
            COMPUTE_API_VERSIONS,
            &location,
        );
    }
    match st.start_delete_instances(&scale_set.key(), instance_ids, now, lro) {
        Ok(op) => {
            drop(st);
            accepted(sh, conn, headers, scale_set, &location, &op, api_version, rate)
        }
        Err(unknown) => error(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            &format!(
                "The provided instanceId {} is not an active Virtual Machine Scale Set VM instanceId.",
                unknown.join(", ")
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_compute_identity_and_operation_paths() {
        assert!(matches!(
            route(
                "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/virtualmachinescalesets/ss"
            ),
            Route::Machine(_)
        ));
        assert!(matches!(
            route(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id"
            ),
            Route::Identity(_)
        ));
        assert!(matches!(
            route("/subscriptions/s/providers/Microsoft.Compute/locations/westeurope/operations/abc"),
            Route::Operation { .. }
        ));
        let Route::Unknown { namespace, kind } =
            route("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/disks/d")
        else {
            panic!()
        };
        assert_eq!(
            (namespace.as_deref(), kind.as_deref()),
            (Some("Microsoft.Compute"), Some("disks"))
        );
    }

    #[test]
    fn api_version_shape() {
        assert!(is_api_version("2024-07-01"));
        assert!(is_api_version("2021-09-30-preview"));
        for bad in ["", "2024-7-01", "latest", "2024_07_01", "20240701xx"] {
            assert!(!is_api_version(bad), "{bad}");
        }
    }
}
