//! ARM routes for federated identity credentials under a user-assigned identity:
//! `.../userAssignedIdentities/{identity}/federatedIdentityCredentials` (GET, paged with `$top` and
//! `$skiptoken`) and `.../federatedIdentityCredentials/{name}` (PUT, GET, DELETE). They pass the gates
//! `arm` applies to every request first (authentication, api-version, subscription, tenant), then
//! authorization on the credential's own actions, throttling, the resource group, the parent identity and
//! the api-version's support for the type. The rules of a write are `federated_credentials`'.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};

use crate::arm::{self, authorization_failed, error, invalid_content, method_not_allowed, with_headers};
use crate::federated_credentials::{self, ARM_TYPE, RuleError, Upserted};
use crate::http::{BodyError, Conn, base_url, header_str, json as json_resp, param, read_body};
use crate::shared::{Shared, lock, read};
use crate::state::Action;
use crate::tokens::Claims;
use pod_identity_azure::resource_id::{ResourceId, ResourceType, fold};

/// api-versions of `Microsoft.ManagedIdentity` that have `federatedIdentityCredentials` (the spec's folders;
/// `2018-11-30` predates them).
pub const API_VERSIONS: &[&str] = &[
    "2022-01-31-preview",
    "2023-01-31",
    "2023-07-31-preview",
    "2024-11-30",
    "2025-01-31-preview",
    "2025-05-31-preview",
    "2026-04-30",
    "2026-05-31",
];

/// A path below `.../userAssignedIdentities/{identity}/federatedIdentityCredentials`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPath {
    pub identity: ResourceId,
    /// `None` for the collection.
    pub name: Option<String>,
}

impl CredentialPath {
    /// Parses the collection or an item path (literal segments case-insensitively); `None` otherwise.
    pub fn parse(path: &str) -> Option<Self> {
        let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        if !(10..=11).contains(&segs.len()) || !segs[9].eq_ignore_ascii_case("federatedIdentityCredentials") {
            return None;
        }
        let identity = ResourceId::parse(&segs[..9].join("/"))
            .filter(|id| id.kind == ResourceType::UserAssignedIdentity)?;
        let name = segs.get(10).map(|s| (*s).to_owned());
        if name.as_deref() == Some("") {
            return None;
        }
        Some(Self { identity, name })
    }

    /// The case-folded ID the request log records.
    pub fn key(&self) -> String {
        let base = format!("{}/federatedidentitycredentials", self.identity.key());
        match &self.name {
            Some(n) => format!("{base}/{}", n.to_ascii_lowercase()),
            None => base,
        }
    }

    fn scope(&self) -> String {
        let base = format!("{}/federatedIdentityCredentials", self.identity);
        match &self.name {
            Some(n) => format!("{base}/{n}"),
            None => base,
        }
    }
}

fn rule_error(e: &RuleError) -> Response {
    error(StatusCode::BAD_REQUEST, e.code(), &e.to_string())
}

fn not_found(p: &CredentialPath, name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        &format!(
            "The Resource 'Microsoft.ManagedIdentity/userAssignedIdentities/{}/federatedIdentityCredentials/{name}' under resource group '{}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
            p.identity.name, p.identity.resource_group
        ),
    )
}

fn concurrent_write(p: &CredentialPath) -> Response {
    error(
        StatusCode::CONFLICT,
        "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity",
        &format!(
            "Too many Federated Identity Credentials are written concurrently for the managed identity '{}'. Concurrent Federated Identity Credentials writes under the same managed identity are not supported.",
            p.identity.key()
        ),
    )
}

#[allow(clippy::too_many_arguments)]
pub async fn handle(
    sh: &Shared,
    conn: &Conn,
    method: &Method,
    headers: &HeaderMap,
    p: &CredentialPath,
    api_version: &str,
    pairs: &[(String, String)],
    claims: &Claims,
    body: Body,
) -> Response {
    let (action, write, verb) = match (method, &p.name) {
        (&Method::GET, _) => (Action::FederatedCredentialRead, false, "read"),
        (&Method::PUT, Some(_)) => (Action::FederatedCredentialWrite, true, "write"),
        (&Method::DELETE, Some(_)) => (Action::FederatedCredentialDelete, true, "delete"),
        _ => return method_not_allowed(method),
    };
    let scope = p.scope();
    if !lock(&sh.state).authorized(&claims.oid, action, &scope) {
        return authorization_failed(
            claims,
            action.arm_action(ResourceType::UserAssignedIdentity),
            &scope,
        );
    }
    let rate_headers = match arm::throttle(sh, claims, &p.identity.subscription, &p.key(), write, None) {
        Ok(h) => h,
        Err(resp) => return resp,
    };
    {
        let st = lock(&sh.state);
        let rg_exists = st
            .subscription(&p.identity.subscription)
            .is_some_and(|s| s.resource_groups.contains_key(&fold(&p.identity.resource_group)));
        if !rg_exists {
            return error(
                StatusCode::NOT_FOUND,
                "ResourceGroupNotFound",
                &format!(
                    "Resource group '{}' could not be found.",
                    p.identity.resource_group
                ),
            );
        }
        let Some(u) = st.uami(&p.identity.to_string()) else {
            return error(
                StatusCode::NOT_FOUND,
                "ParentResourceNotFound",
                &format!(
                    "Failed to perform '{verb}' on resource(s) of type 'userAssignedIdentities/federatedIdentityCredentials', because the parent resource '{}' could not be found.",
                    p.identity
                ),
            );
        };
        if !API_VERSIONS.contains(&api_version) {
            return arm::unsupported_version(ARM_TYPE, api_version, API_VERSIONS, &u.location);
        }
    }
    let resp = match (method, &p.name) {
        (&Method::GET, Some(name)) => get(sh, p, name),
        (&Method::GET, None) => list(sh, conn, headers, p, api_version, pairs),
        (&Method::PUT, Some(name)) => put(sh, headers, p, name, body).await,
        (_, Some(name)) => delete(sh, p, name).await,
        _ => method_not_allowed(method),
    };
    with_headers(resp, rate_headers)
}

fn get(sh: &Shared, p: &CredentialPath, name: &str) -> Response {
    let st = lock(&sh.state);
    let found = st.uami(&p.identity.to_string()).and_then(|u| {
        u.federated_credentials
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    });
    match found {
        Some(c) => json_resp(StatusCode::OK, &c.render(&p.identity)),
        None => not_found(p, name),
    }
}

fn list(
    sh: &Shared,
    conn: &Conn,
    headers: &HeaderMap,
    p: &CredentialPath,
    api_version: &str,
    pairs: &[(String, String)],
) -> Response {
    let (top, skip) = (param(pairs, "$top"), param(pairs, "$skiptoken"));
    let st = lock(&sh.state);
    let Some(u) = st.uami(&p.identity.to_string()) else {
        return not_found(p, "");
    };
    let (items, next) = match federated_credentials::page(&u.federated_credentials, top, skip) {
        Ok(x) => x,
        Err(e) => return rule_error(&e),
    };
    let mut body = json!({"value": items.iter().map(|c| c.render(&p.identity)).collect::<Vec<Value>>()});
    // `$top` parsed as a number, the token is base64url and the api-version a date: none needs escaping.
    if let (Some(token), Some(top)) = (next, top) {
        body["nextLink"] = json!(format!(
            "{}{}?api-version={api_version}&$top={top}&$skiptoken={token}",
            base_url(headers, conn, true),
            p.scope()
        ));
    }
    json_resp(StatusCode::OK, &body)
}

/// Reads a JSON request body with ARM's answers for a wrong media type, an oversized or an unreadable one.
async fn json_body(sh: &Shared, headers: &HeaderMap, body: Body) -> Result<Value, Response> {
    if let Some(ct) = header_str(headers, "content-type")
        && !ct.to_ascii_lowercase().starts_with("application/json")
    {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("The content media type '{ct}' is not supported. Only 'application/json' is supported."),
        ));
    }
    let limit = read(&sh.settings).max_body_bytes;
    let bytes = match read_body(headers, body, limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(n)) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestContentTooLarge",
                &format!("The request content size exceeds the maximum size of {n} bytes."),
            ));
        }
        Err(BodyError::Read(e)) => return Err(invalid_content(&e)),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        invalid_content(&format!(
            "Unexpected character encountered while parsing value. Path '', line {}, position {}.",
            e.line(),
            e.column()
        ))
    })
}

/// Marks a write under the identity as running, or refuses it because another one is; the write's
/// duration on success.
fn begin_write(
    sh: &Shared,
    u: &mut crate::state::Uami,
    p: &CredentialPath,
    now: Instant,
) -> Result<Duration, Response> {
    if u.credential_write_until.is_some_and(|t| t > now) {
        return Err(concurrent_write(p));
    }
    let duration = Duration::from_millis(read(&sh.settings).federation.credential_write_ms);
    u.credential_write_until = (!duration.is_zero()).then(|| now + duration);
    Ok(duration)
}

async fn put(sh: &Shared, headers: &HeaderMap, p: &CredentialPath, name: &str, body: Body) -> Response {
    if let Err(e) = federated_credentials::validate_name(name) {
        return rule_error(&e);
    }
    let value = match json_body(sh, headers, body).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let props = match federated_credentials::parse_properties(&value) {
        Ok(p) => p,
        Err(e) => return rule_error(&e),
    };
    let propagation = Duration::from_millis(read(&sh.settings).federation.credential_propagation_ms);
    let now = Instant::now();
    let (outcome, rendered, duration) = {
        let mut st = lock(&sh.state);
        let Some(u) = st.uami_mut(&p.identity.to_string()) else {
            return not_found(p, name);
        };
        let duration = match begin_write(sh, u, p, now) {
            Ok(d) => d,
            Err(resp) => return resp,
        };
        let visible_at = (!propagation.is_zero()).then(|| now + propagation);
        let outcome =
            match federated_credentials::upsert(&mut u.federated_credentials, name, props, visible_at) {
                Ok(o) => o,
                Err(e) => {
                    u.credential_write_until = None;
                    return rule_error(&e);
                }
            };
        let rendered = u
            .federated_credentials
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
            .map(|c| c.render(&p.identity))
            .unwrap_or(Value::Null);
        (outcome, rendered, duration)
    };
    tracing::debug!(credential = %p.scope(), ?outcome, "federated identity credential written");
    tokio::time::sleep(duration).await;
    let status = match outcome {
        Upserted::Created => StatusCode::CREATED,
        Upserted::Updated => StatusCode::OK,
    };
    json_resp(status, &rendered)
}

async fn delete(sh: &Shared, p: &CredentialPath, name: &str) -> Response {
    let (removed, duration) = {
        let mut st = lock(&sh.state);
        let Some(u) = st.uami_mut(&p.identity.to_string()) else {
            return not_found(p, name);
        };
        let duration = match begin_write(sh, u, p, Instant::now()) {
            Ok(d) => d,
            Err(resp) => return resp,
        };
        (
            federated_credentials::remove(&mut u.federated_credentials, name),
            duration,
        )
    };
    tokio::time::sleep(duration).await;
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = if removed {
        StatusCode::OK
    } else {
        StatusCode::NO_CONTENT
    };
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id";

    #[test]
    fn paths_name_the_collection_or_one_credential() {
        let c = CredentialPath::parse(&format!("{ID}/federatedIdentityCredentials")).unwrap();
        assert_eq!((c.identity.name.as_str(), c.name), ("id", None));
        let i = CredentialPath::parse(&format!(
            "{}/FEDERATEDIDENTITYCREDENTIALS/Fic-1/",
            ID.to_lowercase()
        ))
        .unwrap();
        assert_eq!(i.name.as_deref(), Some("Fic-1"));
        assert_eq!(
            i.key(),
            format!("{}/federatedidentitycredentials/fic-1", ID.to_lowercase())
        );
        for other in [
            ID.to_string(),
            format!("{ID}/federatedIdentityCredentials/a/b"),
            format!("{ID}/somethingElse/a"),
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm/federatedIdentityCredentials"
                .to_string(),
        ] {
            assert_eq!(CredentialPath::parse(&other), None, "{other}");
        }
    }
}
