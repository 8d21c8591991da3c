//! Key Vault secrets: `GET /secrets/{name}[/{version}]`. A request without a token gets the 401 challenge that
//! SDKs answer by fetching a token for the resource it names; a token is accepted only if this emulator signed
//! it for `https://vault.azure.net` in the vault's tenant, and the secret is returned only to a principal the
//! vault's access policy (or, in RBAC mode, a role assignment) allows to get secrets.
//!
//! Vault names are global on Azure and a client reaches one by host name (`{vault}.vault.azure.net`). Here the
//! vault is the first label of the `Host` header when it names a vault; a request by IP address or another
//! name reaches the only vault, when there is exactly one.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, Method, Request, StatusCode};
use serde_json::json;

use crate::http::{
    Conn, Tag, base_url, header_str, host_name, json as json_resp, param, query_pairs, tagged, with_header,
};
use crate::settings::same_resource;
use crate::shared::{Shared, lock, now_secs};
use crate::state::State;
use crate::tokens::VerifyError;
use pod_identity_azure::resource_id::fold;

pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    with_header(
        json_resp(status, &json!({"error": {"code": code, "message": message}})),
        "x-ms-keyvault-service-version",
        "1.9.2164.1",
    )
}

/// The body Key Vault sends with a fault injected by the admin API.
pub fn fault(status: StatusCode) -> Response {
    match status.as_u16() {
        429 => error(
            status,
            "Throttled",
            "Request was not processed because too many requests were received. Reason: A rate limit was reached. Your call rate is too high. https://aka.ms/kvthrottling",
        ),
        s if s >= 500 => error(
            status,
            "InternalServerError",
            "The service encountered an internal error. Please retry.",
        ),
        _ => error(status, "BadRequest", "The request could not be served."),
    }
}

fn challenge(tenant: &str, message: &str) -> Response {
    with_header(
        error(StatusCode::UNAUTHORIZED, "Unauthorized", message),
        "www-authenticate",
        &format!(
            "Bearer authorization=\"https://login.windows.net/{tenant}\", resource=\"https://vault.azure.net\""
        ),
    )
}

/// Picks the vault the request addresses.
fn vault_key(st: &State, headers: &HeaderMap) -> Option<String> {
    let host = host_name(headers).unwrap_or_default();
    let label = host.split('.').next().unwrap_or_default().to_owned();
    if st.vaults.contains_key(&label) {
        return Some(label);
    }
    (st.vaults.len() == 1)
        .then(|| st.vaults.keys().next().cloned())
        .flatten()
}

pub async fn handle(sh: &Shared, conn: &Conn, req: Request<Body>) -> Response {
    let (parts, _body) = req.into_parts();
    let headers = &parts.headers;
    let segs: Vec<String> = parts
        .uri
        .path()
        .trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(str::to_owned)
        .collect();
    let pairs = query_pairs(parts.uri.query().unwrap_or(""));
    let st = lock(&sh.state);
    let Some(vkey) = vault_key(&st, headers) else {
        return error(
            StatusCode::NOT_FOUND,
            "VaultNotFound",
            "No vault answers to this host name; address the vault as {vault}.<host> or seed exactly one vault.",
        );
    };
    let Some(vault) = st.vaults.get(&vkey) else {
        return error(StatusCode::NOT_FOUND, "VaultNotFound", "The vault was not found.");
    };
    let tag = |resp: Response, what: &str| {
        tagged(
            resp,
            Tag {
                resource: Some(format!(
                    "{}/{}",
                    vault.id.name.to_ascii_lowercase(),
                    what.to_ascii_lowercase()
                )),
                identity: None,
            },
        )
    };
    let secret_name = segs.get(1).cloned().unwrap_or_default();
    // The challenge comes first: SDKs send their first request without a token to learn where to get one.
    let token = header_str(headers, "authorization").and_then(|a| {
        a.split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim().to_owned())
    });
    let Some(token) = token else {
        return tag(
            challenge(
                &vault.tenant_id,
                "AKV10000: Request is missing a Bearer or PoP token.",
            ),
            &secret_name,
        );
    };
    let claims = match sh.signer.verify(&token, now_secs()) {
        Ok(c) => c,
        Err(VerifyError::Expired(_)) => {
            return tag(
                challenge(
                    &vault.tenant_id,
                    "AKV10022: Invalid audience or the token has expired.",
                ),
                &secret_name,
            );
        }
        Err(_) => {
            return tag(
                challenge(
                    &vault.tenant_id,
                    "AKV10000: Request is missing a valid Bearer or PoP token: the token signature could not be validated.",
                ),
                &secret_name,
            );
        }
    };
    if !same_resource(&claims.aud, "https://vault.azure.net") {
        return tag(
            challenge(
                &vault.tenant_id,
                &format!(
                    "AKV10022: Invalid audience. Expected https://vault.azure.net, found: {}.",
                    claims.aud
                ),
            ),
            &secret_name,
        );
    }
    if !claims.tid.eq_ignore_ascii_case(&vault.tenant_id) {
        return tag(
            challenge(
                &vault.tenant_id,
                &format!(
                    "AKV10032: Invalid issuer. Expected one of https://sts.windows.net/{}/, found {}.",
                    vault.tenant_id, claims.iss
                ),
            ),
            &secret_name,
        );
    }
    if param(&pairs, "api-version").is_none_or(str::is_empty) {
        return tag(
            error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "The 'api-version' query parameter is missing.",
            ),
            &secret_name,
        );
    }
    if segs.is_empty() || !segs[0].eq_ignore_ascii_case("secrets") || segs.len() < 2 || segs.len() > 3 {
        return tag(
            error(
                StatusCode::NOT_FOUND,
                "NotFound",
                "The requested path is not served by this vault.",
            ),
            &secret_name,
        );
    }
    if parts.method != Method::GET {
        return tag(
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &format!(
                    "The requested resource does not support http method '{}'.",
                    parts.method
                ),
            ),
            &secret_name,
        );
    }
    if !st.vault_allows_get(vault, &claims.tid, &claims.oid) {
        let message = format!(
            "The user, group or application 'appid={};oid={};iss={}' does not have secrets get permission on key vault '{};location={}'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287",
            claims.appid, claims.oid, claims.iss, vault.id.name, vault.location
        );
        let code = if vault.rbac {
            "ForbiddenByRbac"
        } else {
            "AccessDenied"
        };
        let body = json!({"error": {"code": "Forbidden", "message": message, "innererror": {"code": code}}});
        return tag(json_resp(StatusCode::FORBIDDEN, &body), &secret_name);
    }
    let version = segs.get(2).filter(|v| !v.is_empty());
    let found = vault
        .secrets
        .get(&fold(&secret_name))
        .and_then(|s| match version {
            Some(v) => s
                .versions
                .iter()
                .find(|x| x.version.eq_ignore_ascii_case(v))
                .map(|x| (s, x)),
            None => s.versions.last().map(|x| (s, x)),
        });
    let Some((secret, ver)) = found else {
        let shown = match version {
            Some(v) => format!("{secret_name}/{v}"),
            None => secret_name.clone(),
        };
        return tag(
            error(
                StatusCode::NOT_FOUND,
                "SecretNotFound",
                &format!(
                    "A secret with (name/id) {shown} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
                ),
            ),
            &secret_name,
        );
    };
    let base = base_url(headers, conn, true);
    let mut body = json!({
        "value": ver.value,
        "id": format!("{base}/secrets/{}/{}", secret.name, ver.version),
        "attributes": {
            "enabled": true,
            "created": ver.created,
            "updated": ver.created,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
        },
        "tags": {},
    });
    if let Some(ct) = &ver.content_type {
        body["contentType"] = json!(ct);
    }
    let resp = with_header(
        json_resp(StatusCode::OK, &body),
        "x-ms-keyvault-service-version",
        "1.9.2164.1",
    );
    tag(
        with_header(resp, "x-ms-keyvault-region", &vault.location),
        &secret.name,
    )
}
