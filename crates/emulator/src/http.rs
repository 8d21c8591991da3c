//! Small HTTP pieces every service shares: which service a request is for, the connection it came on, query
//! and body reading that cannot be made to panic or to buffer without bound, and JSON responses.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use pod_identity_azure::resource_id::ResourceId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    Imds,
    Arm,
    Entra,
    #[serde(rename = "keyvault")]
    KeyVault,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Imds => "imds",
            Self::Arm => "arm",
            Self::Entra => "entra",
            Self::KeyVault => "keyvault",
        }
    }
}

/// The connection a request arrived on.
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// For an IMDS listener: the VM or scale-set instance it stands for.
    pub instance: Option<Arc<ResourceId>>,
}

/// Set by a handler on its response so the request log can name what the request was about.
#[derive(Debug, Clone, Default)]
pub struct Tag {
    pub resource: Option<String>,
    pub identity: Option<String>,
}

pub fn tagged(mut resp: Response, tag: Tag) -> Response {
    resp.extensions_mut().insert(tag);
    resp
}

/// Query parameters in order, decoded, repeats kept (IMDS refuses a name given twice; see [`duplicate_param`]).
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The value of `name` (case-insensitive, as Azure treats parameter names).
pub fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The first parameter name that appears more than once.
pub fn duplicate_param(pairs: &[(String, String)]) -> Option<&str> {
    pairs.iter().enumerate().find_map(|(i, (k, _))| {
        pairs[..i]
            .iter()
            .any(|(p, _)| p.eq_ignore_ascii_case(k))
            .then_some(k.as_str())
    })
}

pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("the request body could not be read: {0}")]
    Read(String),
}

/// Reads a body up to `limit` bytes, refusing larger ones from the `Content-Length` header before reading.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, BodyError> {
    if let Some(len) = header_str(headers, "content-length").and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(BodyError::TooLarge(limit));
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let text = e.to_string();
            if text.contains("length limit") {
                Err(BodyError::TooLarge(limit))
            } else {
                Err(BodyError::Read(text))
            }
        }
    }
}

pub fn json(status: StatusCode, body: &Value) -> Response {
    json_bytes(
        status,
        body.to_string().into_bytes(),
        "application/json; charset=utf-8",
    )
}

pub fn json_bytes(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub fn with_header(mut resp: Response, name: &'static str, value: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().append(name, v);
    }
    resp
}

/// `https://<host>` as the client addressed us, for URLs we hand back (issuer, async operation, secret IDs).
pub fn base_url(headers: &HeaderMap, conn: &Conn, tls: bool) -> String {
    let host = header_str(headers, "host")
        .map(str::to_owned)
        .unwrap_or_else(|| conn.local.to_string());
    format!("{}://{host}", if tls { "https" } else { "http" })
}

/// The host name a request was addressed to, without port.
pub fn host_name(headers: &HeaderMap) -> Option<String> {
    let host = header_str(headers, "host")?;
    let name = if host.starts_with('[') {
        host.split(']').next().map(|h| h.trim_start_matches('['))?
    } else {
        host.split(':').next()?
    };
    Some(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_parameters_are_found_case_insensitively() {
        let q = query_pairs("resource=a&api-version=1&Resource=b");
        assert_eq!(duplicate_param(&q), Some("Resource"));
        assert_eq!(duplicate_param(&query_pairs("a=1&b=2")), None);
        assert_eq!(param(&q, "API-VERSION"), Some("1"));
    }

    #[test]
    fn host_name_drops_port_and_brackets() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("MyVault.vault.azure.net:8443"));
        assert_eq!(host_name(&h).as_deref(), Some("myvault.vault.azure.net"));
        h.insert("host", HeaderValue::from_static("[::1]:8443"));
        assert_eq!(host_name(&h).as_deref(), Some("::1"));
    }
}
