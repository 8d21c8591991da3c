//! Microsoft Entra ID: the client-credentials grant on the v2 (`/oauth2/v2.0/token`, scopes, numeric
//! `expires_in`) and v1 (`/oauth2/token`, resource, string numbers) endpoints, the OpenID configuration MSAL
//! reads before its first token, and the signing keys. Errors carry Entra's AADSTS body.
//!
//! A client proves itself with a secret, with a certificate assertion (`assertion`: a JWT it signed itself,
//! issuer and subject its client ID), or with a federated assertion (`federation`: a token an external
//! issuer signed, matched against the federated credentials of the app registration or of the
//! user-assigned identity whose client ID it names).

use axum::body::Body;
use axum::response::Response;
use base64::Engine;
use http::{HeaderMap, Method, Request, StatusCode};
use serde_json::{Value, json};

use std::time::{Duration, Instant};

use crate::assertion;
use crate::federation::{self, Assertion, Rejection, Trusted};
use crate::http::{
    BodyError, Conn, Tag, base_url, header_str, json as json_resp, query_pairs, read_body, tagged,
};
use crate::issuer::FetchPolicy;
use crate::seed::ApplicationSeed;
use crate::shared::{Shared, lock, now_secs, read};
use crate::state::Uami;
use crate::tokens::Claims;

fn aad_error(status: StatusCode, error: &str, code: u32, message: &str) -> Response {
    aad_body(status, error, code, message, true)
}

/// Entra's error body. The trace trailer is set off by single spaces as in bodies recorded since 2024
/// (earlier ones used `\r\n`); `error_uri` is absent from some (observed 90061, 900612).
fn aad_body(status: StatusCode, error: &str, code: u32, message: &str, error_uri: bool) -> Response {
    let now = jiff::Timestamp::now();
    let trace = uuid::Uuid::new_v4();
    let correlation = uuid::Uuid::new_v4();
    let stamp = now.strftime("%Y-%m-%d %H:%M:%SZ").to_string();
    let mut body = json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {message} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {stamp}"),
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace.to_string(),
        "correlation_id": correlation.to_string(),
    });
    if error_uri {
        body["error_uri"] = json!(format!("https://login.microsoftonline.com/error?code={code}"));
    }
    json_resp(status, &body)
}

fn federation_error(r: &Rejection) -> Response {
    let a = r.aadsts();
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_REQUEST);
    aad_body(status, a.error, a.code, &a.message, a.error_uri)
}

fn missing(param: &str) -> Response {
    aad_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900144,
        &format!("The request body must contain the following parameter: '{param}'."),
    )
}

/// The body Entra sends with a fault injected by the admin API.
pub fn fault(status: StatusCode) -> Response {
    match status.as_u16() {
        429 => aad_error(
            status,
            "temporarily_unavailable",
            50196,
            "The server is throttling requests from this client. Retry after the time in the Retry-After header.",
        ),
        s if s >= 500 => aad_error(
            status,
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again.",
        ),
        _ => aad_error(
            status,
            "invalid_request",
            90033,
            "The request could not be served.",
        ),
    }
}

fn tenant_not_found(tenant: &str) -> Response {
    aad_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        90002,
        &format!(
            "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
        ),
    )
}

pub async fn handle(sh: &Shared, conn: &Conn, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().trim_end_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let tenant = segs.first().copied().unwrap_or("").to_owned();
    let rest = segs
        .get(1..)
        .map(|r| r.join("/").to_ascii_lowercase())
        .unwrap_or_default();
    let base = base_url(&parts.headers, conn, true);
    let tag = |resp: Response, identity: Option<String>| {
        tagged(
            resp,
            Tag {
                resource: Some(tenant.to_ascii_lowercase()),
                identity,
            },
        )
    };
    let known_tenant = lock(&sh.state).tenant_exists(&tenant);
    let mut client = None;
    let resp = match (parts.method.clone(), rest.as_str()) {
        (Method::GET, "v2.0/.well-known/openid-configuration") if known_tenant => {
            json_resp(StatusCode::OK, &openid_configuration(&base, &tenant, true))
        }
        (Method::GET, ".well-known/openid-configuration") if known_tenant => {
            json_resp(StatusCode::OK, &openid_configuration(&base, &tenant, false))
        }
        (Method::GET, "discovery/v2.0/keys" | "discovery/keys") => {
            json_resp(StatusCode::OK, &sh.signer.jwks())
        }
        (Method::GET, "discovery/instance") => json_resp(
            StatusCode::OK,
            &json!({
                "tenant_discovery_endpoint": format!("{base}/{tenant}/v2.0/.well-known/openid-configuration"),
                "api-version": "1.1",
                "metadata": [{"preferred_network": host_of(&base), "preferred_cache": host_of(&base), "aliases": [host_of(&base)]}],
            }),
        ),
        (Method::POST, "oauth2/v2.0/token") if known_tenant => {
            token(sh, &parts.headers, &tenant, &base, body, true, &mut client).await
        }
        (Method::POST, "oauth2/token") if known_tenant => {
            token(sh, &parts.headers, &tenant, &base, body, false, &mut client).await
        }
        (
            _,
            "v2.0/.well-known/openid-configuration"
            | ".well-known/openid-configuration"
            | "oauth2/v2.0/token"
            | "oauth2/token",
        ) if !known_tenant => tenant_not_found(&tenant),
        (m, "oauth2/v2.0/token" | "oauth2/token") => aad_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            900561,
            &format!("The endpoint only accepts POST requests. Received a {m} request."),
        ),
        _ => aad_error(
            StatusCode::NOT_FOUND,
            "invalid_request",
            900561,
            "The requested endpoint does not exist.",
        ),
    };
    tag(resp, client)
}

fn host_of(base: &str) -> String {
    base.split("://").nth(1).unwrap_or(base).to_owned()
}

fn openid_configuration(base: &str, tenant: &str, v2: bool) -> Value {
    let (issuer, token, authorize, keys) = if v2 {
        (
            format!("{base}/{tenant}/v2.0"),
            format!("{base}/{tenant}/oauth2/v2.0/token"),
            format!("{base}/{tenant}/oauth2/v2.0/authorize"),
            format!("{base}/{tenant}/discovery/v2.0/keys"),
        )
    } else {
        (
            format!("https://sts.windows.net/{tenant}/"),
            format!("{base}/{tenant}/oauth2/token"),
            format!("{base}/{tenant}/oauth2/authorize"),
            format!("{base}/common/discovery/keys"),
        )
    };
    json!({
        "token_endpoint": token,
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": keys,
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": issuer,
        "request_uri_parameter_supported": false,
        "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
        "authorization_endpoint": authorize,
        "device_authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/devicecode"),
        "http_logout_supported": true,
        "frontchannel_logout_supported": true,
        "end_session_endpoint": format!("{base}/{tenant}/oauth2/v2.0/logout"),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "oid", "tid"],
        "tenant_region_scope": "EU",
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
        "rbac_url": "https://pas.windows.net",
    })
}

/// How the client proved who it is.
enum Proof {
    Secret(String),
    Assertion(String),
}

/// Who the `client_id` of a token request names.
enum Client {
    Application(ApplicationSeed),
    ManagedIdentity(Uami),
}

impl Client {
    /// Its federated credentials as Entra matches them at `now`.
    fn trusted(&self, now: Instant) -> Vec<Trusted> {
        match self {
            Self::Application(app) => app
                .federated_identity_credentials
                .iter()
                .map(|c| Trusted {
                    name: c.name.clone(),
                    issuer: c.issuer.clone(),
                    subject: c.subject.clone(),
                    audiences: c.audiences.clone(),
                    propagated: true,
                })
                .collect(),
            Self::ManagedIdentity(u) => u
                .federated_credentials
                .iter()
                .map(|c| Trusted {
                    name: c.name.clone(),
                    issuer: c.issuer.clone(),
                    subject: c.subject.clone(),
                    audiences: c.audiences.clone(),
                    propagated: c.propagated(now),
                })
                .collect(),
        }
    }
}

/// Checks a federated assertion for `client` in Entra's order: trust, algorithm, the issuer's keys (fetched
/// only for a trusted issuer), signature, time window.
async fn federate(sh: &Shared, client: &Client, jwt: &str) -> Result<String, Rejection> {
    let a = Assertion::parse(jwt)?;
    let trusted = client.trusted(Instant::now());
    let credential = federation::match_trust(&a, &trusted)?.name.clone();
    let (policy, algorithms) = {
        let s = read(&sh.settings);
        let f = &s.federation;
        (
            FetchPolicy {
                ca_pems: f.issuer_ca_pems.clone(),
                timeout: Duration::from_millis(f.issuer_fetch_timeout_ms),
                max_age: Duration::from_secs(f.issuer_cache_secs),
                refetch_after: Duration::from_secs(f.issuer_refetch_secs),
            },
            f.signing_algorithms.clone(),
        )
    };
    federation::check_algorithm(&a, &algorithms)?;
    let keys = sh.issuers.keys(&a.iss, a.kid.as_deref(), &policy).await?;
    federation::verify_signature(&a, &keys, &a.iss)?;
    federation::check_lifetime(&a, now_secs())?;
    Ok(credential)
}

/// Whether a client assertion is the client's own (certificate credential: issuer is the client ID) rather
/// than an external issuer's.
fn self_issued(jwt: &str, client_id: &str) -> bool {
    Assertion::parse(jwt).is_ok_and(|a| a.iss.eq_ignore_ascii_case(client_id))
}

async fn token(
    sh: &Shared,
    headers: &HeaderMap,
    tenant: &str,
    base: &str,
    body: Body,
    v2: bool,
    client_seen: &mut Option<String>,
) -> Response {
    let limit = read(&sh.settings).max_body_bytes;
    let is_form = header_str(headers, "content-type").is_some_and(|ct| {
        ct.to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
    });
    let bytes = match read_body(headers, body, limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(_)) => {
            return aad_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                90020,
                "The request body is too large.",
            );
        }
        Err(BodyError::Read(_)) => return missing("grant_type"),
    };
    let form = if is_form {
        query_pairs(&String::from_utf8_lossy(&bytes))
    } else {
        Vec::new()
    };
    let get = |k: &str| {
        form.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let Some(grant) = get("grant_type") else {
        return missing("grant_type");
    };
    if grant != "client_credentials" {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{grant}'."),
        );
    }
    // RFC 6749 lets the secret travel in HTTP Basic authentication instead of the body.
    let basic = header_str(headers, "authorization")
        .and_then(|a| a.strip_prefix("Basic ").or_else(|| a.strip_prefix("basic ")))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
    let Some(client_id) = get("client_id").or_else(|| basic.as_ref().map(|b| b.0.clone())) else {
        return missing("client_id");
    };
    *client_seen = Some(client_id.clone());
    let resource = if v2 {
        let Some(scope) = get("scope") else {
            return missing("scope");
        };
        let scopes: Vec<&str> = scope.split_whitespace().collect();
        if scopes.len() != 1 {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                28000,
                &format!(
                    "Provided value for the input parameter scope '{scope}' is not valid because it contains more than one resource. Scope {scope} is not valid."
                ),
            );
        }
        match scopes[0].strip_suffix("/.default") {
            Some(r) => r.to_owned(),
            None => {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    1002012,
                    &format!(
                        "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                    ),
                );
            }
        }
    } else {
        let Some(r) = get("resource") else {
            return missing("resource");
        };
        r
    };
    let proof = match (
        get("client_secret").or_else(|| basic.map(|b| b.1)),
        get("client_assertion"),
    ) {
        (Some(s), _) => Proof::Secret(s),
        (None, Some(a)) => {
            if get("client_assertion_type").as_deref()
                != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    50027,
                    "Invalid JWT token. The client_assertion_type must be 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer'.",
                );
            }
            Proof::Assertion(a)
        }
        (None, None) => {
            return aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            );
        }
    };
    let client = {
        let st = lock(&sh.state);
        st.application(tenant, &client_id)
            .cloned()
            .map(Client::Application)
            .or_else(|| {
                st.uami_by_client_id(tenant, &client_id)
                    .cloned()
                    .map(Client::ManagedIdentity)
            })
    };
    let client = match client {
        Some(c) => c,
        None => {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                700016,
                &format!(
                    "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
                ),
            );
        }
    };
    let acr = match (proof, &client) {
        (Proof::Secret(s), client) => {
            let known = match client {
                Client::Application(app) => app.secrets.contains(&s),
                // A managed identity has no secrets.
                Client::ManagedIdentity(_) => false,
            };
            if !known {
                return aad_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000215,
                    &format!(
                        "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                    ),
                );
            }
            "1"
        }
        (Proof::Assertion(a), Client::Application(app)) if self_issued(&a, &client_id) => {
            let now = now_secs();
            let audiences = [
                format!("{base}/{tenant}/oauth2/v2.0/token"),
                format!("{base}/{tenant}/oauth2/token"),
                format!("{base}/{tenant}/v2.0"),
                format!("{base}/{tenant}"),
            ];
            if let Err(e) = assertion::verify(&a, app, &audiences, now) {
                let (code, message) = e.aadsts();
                return aad_error(StatusCode::UNAUTHORIZED, "invalid_client", code, &message);
            }
            "2"
        }
        (Proof::Assertion(a), client) => match federate(sh, client, &a).await {
            Ok(credential) => {
                tracing::debug!(client_id, credential, "federated assertion accepted");
                "2"
            }
            Err(r) => {
                tracing::debug!(client_id, rejection = %r, "federated assertion refused");
                return federation_error(&r);
            }
        },
    };
    let (known, lifetime) = {
        let s = read(&sh.settings);
        let lifetime = match client {
            // A managed identity's tokens live as long through Entra as through IMDS (about 24 h: azwi PR #630).
            Client::ManagedIdentity(_) => s.imds_token_lifetime_secs,
            Client::Application(_) => s.entra_token_lifetime_secs,
        };
        (s.resource_known(&resource), lifetime)
    };
    if !known {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            500011,
            &format!(
                "The resource principal named {resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
            ),
        );
    }
    let now = now_secs();
    let claims = match &client {
        Client::Application(app) => Claims::app(
            &resource,
            tenant,
            &app.object_id,
            &app.client_id,
            acr,
            now,
            lifetime,
        ),
        Client::ManagedIdentity(u) => Claims {
            xms_mirid: Some(u.id.to_string()),
            ..Claims::app(
                &resource,
                tenant,
                &u.principal_id,
                &u.client_id,
                acr,
                now,
                lifetime,
            )
        },
    };
    let access_token = sh.signer.sign(&claims);
    let body = if v2 {
        json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": access_token})
    } else {
        json!({
            "token_type": "Bearer",
            "expires_in": lifetime.to_string(),
            "ext_expires_in": lifetime.to_string(),
            "expires_on": (now + lifetime).to_string(),
            "not_before": now.to_string(),
            "resource": resource,
            "access_token": access_token,
        })
    };
    json_resp(StatusCode::OK, &body)
}
