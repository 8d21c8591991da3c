//! The Instance Metadata Service as one VM or scale-set instance sees it: the managed-identity token endpoint
//! (with its exact parameters, all-string success body and `{"error","error_description"}` errors),
//! `/metadata/identity/info`, `/metadata/instance` and `/metadata/versions`. A listener stands for one
//! instance, and a token is issued only for an identity its VM or scale set has at that moment.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, Method, Request, StatusCode};
use serde_json::{Value, json};

use crate::http::{
    Conn, Tag, duplicate_param, header_str, json as json_resp, json_bytes, param, query_pairs, tagged,
    with_header,
};
use crate::shared::{CachedToken, Shared, lock, now_secs, read};
use crate::state::{ResolveError, Selector, State};
use crate::tokens::Claims;
use pod_identity_azure::resource_id::{ResourceId, ResourceType, fold};

/// Versions IMDS answers to, oldest first.
pub const API_VERSIONS: &[&str] = &[
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2023-07-01",
];

/// The identity endpoints exist from this version on.
const FIRST_IDENTITY_VERSION: &str = "2018-02-01";

fn identity_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_resp(status, &json!({"error": error, "error_description": description}))
}

fn bad_request(description: &str) -> Response {
    identity_error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn newest_versions() -> Vec<&'static str> {
    API_VERSIONS.iter().rev().take(3).copied().collect()
}

/// The body IMDS sends with a fault injected by the admin API.
pub fn fault(status: StatusCode) -> Response {
    let (error, description) = match status.as_u16() {
        429 => (
            "too_many_requests",
            "Too many requests. Retry after the time in the Retry-After header.",
        ),
        404 => ("not_found", "IMDS is being updated; retry with backoff."),
        410 => (
            "service_unavailable",
            "IMDS is going through updates; it is available again within 70 seconds.",
        ),
        500 => (
            "unknown",
            "Failed to retrieve token from the Active directory. For details see logs in /var/log/waagent.log",
        ),
        _ => ("service_unavailable", "The service is temporarily unavailable."),
    };
    identity_error(status, error, description)
}

/// The header name matches in any case (HTTP), the value only as `true`: the IMDS documentation says it
/// "must be set to `true`, in all lower case", and IMDS answers `Metadata: True` with 400 (seen on AKS
/// nodes, open-telemetry-collector-contrib #46281).
fn metadata_header_ok(headers: &HeaderMap) -> bool {
    header_str(headers, "metadata").is_some_and(|v| v.trim() == "true")
}

pub async fn handle(sh: &Shared, conn: &Conn, req: Request<Body>) -> Response {
    let path = req.uri().path().trim_end_matches('/').to_ascii_lowercase();
    let query = req.uri().query().unwrap_or("").to_owned();
    let instance = conn.instance.as_deref();
    let resource = instance.map(ResourceId::key);
    let tag = |resp: Response, identity: Option<String>| {
        tagged(
            resp,
            Tag {
                resource: resource.clone(),
                identity,
            },
        )
    };
    let Some(instance) = instance else {
        return tag(
            identity_error(
                StatusCode::NOT_FOUND,
                "not_found",
                "No instance behind this listener",
            ),
            None,
        );
    };
    match path.as_str() {
        "/metadata/identity/oauth2/token" => {
            let (resp, identity) = token(sh, instance, req.method(), req.headers(), &query);
            tag(resp, identity)
        }
        "/metadata/identity/info" => tag(
            identity_info(sh, instance, req.method(), req.headers(), &query),
            None,
        ),
        "/metadata/versions" => tag(
            json_resp(StatusCode::OK, &json!({"apiVersions": API_VERSIONS})),
            None,
        ),
        p if p == "/metadata/instance" || p.starts_with("/metadata/instance/") => tag(
            instance_metadata(sh, conn, instance, req.method(), req.headers(), &path, &query),
            None,
        ),
        p if p.starts_with("/metadata/identity") => tag(
            identity_error(
                StatusCode::NOT_FOUND,
                "not_found",
                "The requested identity endpoint does not exist.",
            ),
            None,
        ),
        _ => tag(
            json_resp(StatusCode::NOT_FOUND, &json!({"error": "Not found"})),
            None,
        ),
    }
}

fn selector(pairs: &[(String, String)]) -> Result<Selector, Response> {
    let given = |n: &str| param(pairs, n).filter(|v| !v.is_empty());
    let choices: Vec<Selector> = [
        given("client_id").map(|v| Selector::ClientId(v.to_owned())),
        given("object_id").map(|v| Selector::ObjectId(v.to_owned())),
        given("msi_res_id")
            .or_else(|| given("mi_res_id"))
            .map(|v| Selector::ResourceId(v.to_owned())),
    ]
    .into_iter()
    .flatten()
    .collect();
    match choices.len() {
        0 => Ok(Selector::Default),
        1 => Ok(choices.into_iter().next().unwrap_or(Selector::Default)),
        _ => Err(bad_request(
            "Only one of client_id, object_id or msi_res_id may be specified in the token request",
        )),
    }
}

fn token(
    sh: &Shared,
    instance: &ResourceId,
    method: &Method,
    headers: &HeaderMap,
    query: &str,
) -> (Response, Option<String>) {
    if method != Method::GET {
        let resp = identity_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "The request method is not supported; use GET.",
        );
        return (with_header(resp, "allow", "GET"), None);
    }
    if headers.contains_key("x-forwarded-for") {
        return (
            bad_request("Request with X-Forwarded-For header is not allowed"),
            None,
        );
    }
    if !metadata_header_ok(headers) {
        return (bad_request("Required metadata header not specified"), None);
    }
    let pairs = query_pairs(query);
    if let Some(dup) = duplicate_param(&pairs) {
        return (
            bad_request(&format!("Query parameter '{dup}' is specified more than once")),
            None,
        );
    }
    match param(&pairs, "api-version") {
        None | Some("") => {
            return (
                bad_request("Required query variable 'api-version' is missing"),
                None,
            );
        }
        Some(v) if !API_VERSIONS.contains(&v) || v < FIRST_IDENTITY_VERSION => {
            return (bad_request(&format!("Invalid api-version '{v}'")), None);
        }
        Some(_) => {}
    }
    let Some(resource) = param(&pairs, "resource").filter(|r| !r.is_empty()) else {
        return (bad_request("Required query variable 'resource' is missing"), None);
    };
    let sel = match selector(&pairs) {
        Ok(s) => s,
        Err(resp) => return (resp, None),
    };
    let bypass = param(&pairs, "bypass_cache").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let principal = {
        let mut st = lock(&sh.state);
        st.advance(std::time::Instant::now());
        st.resolve_for_imds(instance, &sel)
    };
    let principal = match principal {
        Ok(p) => p,
        Err(ResolveError::NotFound) => return (bad_request("Identity not found"), None),
        Err(ResolveError::Multiple) => {
            return (
                bad_request(
                    "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request",
                ),
                None,
            );
        }
    };
    let (known, lifetime, use_cache) = {
        let s = read(&sh.settings);
        (
            s.resource_known(resource),
            s.imds_token_lifetime_secs,
            s.imds_token_cache,
        )
    };
    if !known {
        let resp = identity_error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            &format!(
                "AADSTS500011: The resource principal named {resource} was not found in the tenant named {}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant.",
                principal.tenant_id
            ),
        );
        return (resp, Some(principal.client_id));
    }
    let now = now_secs();
    let key = (principal.object_id.to_ascii_lowercase(), fold(resource));
    let cached = if use_cache && !bypass {
        lock(&sh.imds_cache)
            .get(&key)
            .filter(|t| t.expires_on - now > 300)
            .cloned()
    } else {
        None
    };
    let tok = match cached {
        Some(t) => t,
        None => {
            let mut claims = Claims::app(
                resource,
                &principal.tenant_id,
                &principal.object_id,
                &principal.client_id,
                "2",
                now,
                lifetime,
            );
            claims.appidacr = "2".into();
            claims.xms_mirid = principal.mi_res_id.clone();
            let t = CachedToken {
                access_token: sh.signer.sign(&claims),
                not_before: now,
                expires_on: now + lifetime,
                client_id: principal.client_id.clone(),
            };
            if use_cache {
                lock(&sh.imds_cache).insert(key, t.clone());
            }
            t
        }
    };
    let expires_in = (tok.expires_on - now).to_string();
    let body = json!({
        "access_token": tok.access_token,
        "refresh_token": "",
        "client_id": tok.client_id,
        "expires_in": expires_in,
        "expires_on": tok.expires_on.to_string(),
        "ext_expires_in": expires_in,
        "not_before": tok.not_before.to_string(),
        "resource": resource,
        "token_type": "Bearer",
    });
    (json_resp(StatusCode::OK, &body), Some(tok.client_id))
}

fn check_metadata_request(
    method: &Method,
    headers: &HeaderMap,
    pairs: &[(String, String)],
) -> Result<(), Response> {
    if method != Method::GET {
        return Err(json_resp(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "Method not allowed"}),
        ));
    }
    if headers.contains_key("x-forwarded-for") {
        return Err(json_resp(
            StatusCode::BAD_REQUEST,
            &json!({"error": "Bad request. Request with X-Forwarded-For header is not allowed"}),
        ));
    }
    if !metadata_header_ok(headers) {
        return Err(json_resp(
            StatusCode::BAD_REQUEST,
            &json!({"error": "Bad request: . Required metadata header not specified"}),
        ));
    }
    if let Some(dup) = duplicate_param(pairs) {
        return Err(json_resp(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("Bad request. Query parameter '{dup}' is specified more than once")}),
        ));
    }
    match param(pairs, "api-version") {
        None | Some("") => Err(json_resp(
            StatusCode::BAD_REQUEST,
            &json!({"error": "Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds", "newest-versions": newest_versions()}),
        )),
        Some(v) if !API_VERSIONS.contains(&v) => Err(json_resp(
            StatusCode::BAD_REQUEST,
            &json!({"error": "Bad request. api-version is invalid or was not specified in the request. For more information refer to aka.ms/azureimds", "newest-versions": newest_versions()}),
        )),
        Some(_) => Ok(()),
    }
}

fn identity_info(
    sh: &Shared,
    instance: &ResourceId,
    method: &Method,
    headers: &HeaderMap,
    query: &str,
) -> Response {
    let pairs = query_pairs(query);
    if let Err(resp) = check_metadata_request(method, headers, &pairs) {
        return resp;
    }
    let st = lock(&sh.state);
    match st.subscription(&instance.subscription) {
        Some(s) => json_resp(StatusCode::OK, &json!({"tenantId": s.tenant_id})),
        None => bad_request("Identity not found"),
    }
}

/// Renders every primitive as a string, as IMDS does.
fn instance_document(st: &State, instance: &ResourceId, local_ip: &str) -> Value {
    let parent = st.machines.get(&instance.parent().key());
    let (location, vm_size, vm_id) = parent
        .map(|c| (c.location.clone(), c.vm_size.clone(), c.unique_id.clone()))
        .unwrap_or_default();
    let is_instance = instance.kind == ResourceType::ScaleSetInstance;
    let inst = parent.and_then(|c| {
        c.instances.iter().find(|i| {
            instance
                .child
                .as_deref()
                .is_some_and(|id| id.eq_ignore_ascii_case(&i.instance_id))
        })
    });
    let name = inst
        .map(|i| i.name.clone())
        .unwrap_or_else(|| instance.name.clone());
    let ip = match (inst, parent) {
        (Some(i), _) if !i.private_ip_address.is_empty() => i.private_ip_address.clone(),
        (None, Some(c)) if !c.private_ip_address.is_empty() => c.private_ip_address.clone(),
        _ => local_ip.to_owned(),
    };
    json!({
        "compute": {
            "azEnvironment": "AzurePublicCloud",
            "isHostCompatibilityLayerVm": "false",
            "location": location,
            "name": name,
            "offer": "",
            "osType": "Linux",
            "provider": "Microsoft.Compute",
            "resourceGroupName": instance.resource_group,
            "resourceId": instance.to_string(),
            "subscriptionId": instance.subscription,
            "tagsList": [],
            "vmId": vm_id,
            "vmScaleSetName": if is_instance { instance.name.clone() } else { String::new() },
            "vmSize": vm_size,
            "zone": "",
            "virtualMachineScaleSet": {"id": if is_instance { instance.parent().to_string() } else { String::new() }},
        },
        "network": {
            "interface": [{
                "ipv4": {
                    "ipAddress": [{"privateIpAddress": ip, "publicIpAddress": ""}],
                    "subnet": [{"address": "10.224.0.0", "prefix": "16"}],
                },
                "ipv6": {"ipAddress": []},
                "macAddress": "000D3A000000",
            }]
        }
    })
}

fn instance_metadata(
    sh: &Shared,
    conn: &Conn,
    instance: &ResourceId,
    method: &Method,
    headers: &HeaderMap,
    path: &str,
    query: &str,
) -> Response {
    let pairs = query_pairs(query);
    if let Err(resp) = check_metadata_request(method, headers, &pairs) {
        return resp;
    }
    let doc = instance_document(&lock(&sh.state), instance, &conn.local.ip().to_string());
    let mut node = &doc;
    for seg in path
        .trim_start_matches("/metadata/instance")
        .split('/')
        .filter(|s| !s.is_empty())
    {
        let next = match node {
            Value::Object(m) => m
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(seg))
                .map(|(_, v)| v),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return json_resp(StatusCode::NOT_FOUND, &json!({"error": "Not found"})),
        }
    }
    let text = param(&pairs, "format").is_some_and(|f| f.eq_ignore_ascii_case("text"));
    match (node, text) {
        (Value::String(s), true) => json_bytes(
            StatusCode::OK,
            s.clone().into_bytes(),
            "text/plain; charset=utf-8",
        ),
        (Value::String(_), false) => json_resp(
            StatusCode::BAD_REQUEST,
            &json!({"error": "Bad request. Leaf nodes can only be queried with format=text. For more information refer to aka.ms/azureimds"}),
        ),
        (_, true) => json_resp(
            StatusCode::BAD_REQUEST,
            &json!({"error": "Bad request. Format text is only supported for leaf nodes. For more information refer to aka.ms/azureimds"}),
        ),
        (n, false) => json_resp(StatusCode::OK, n),
    }
}
