//! Forwarding of the metadata paths that configuration lets through (`/metadata/instance`, versions,
//! scheduled events...). The request goes out as the pod sent it, minus hop-by-hop and forwarding headers:
//! IMDS refuses requests carrying `X-Forwarded-For`, and the agent never adds one.

use axum::{body::Body, response::Response};
use http::{HeaderMap, Request, StatusCode, Uri};
use pod_identity_azure::{AzureError, imds_http::ImdsHttp};

use crate::response;

/// Forwards to IMDS.
#[derive(Clone, Debug)]
pub struct Proxy {
    client: ImdsHttp,
    base: String,
}

impl Proxy {
    /// A proxy to IMDS at `base` (`http://169.254.169.254:80`), over the agent's own (marked) connections.
    pub fn new(client: ImdsHttp, base: &str) -> Self {
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// Forwards a GET whose path was classified clean, and relays the answer.
    pub async fn forward(&self, req: Request<Body>) -> Response {
        let path_and_query = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let url = format!("{}{path_and_query}", self.base);
        let Ok(uri) = url.parse::<Uri>() else {
            return response::bad_request("Invalid request: the path cannot be forwarded");
        };
        let mut headers = HeaderMap::new();
        for (name, value) in req.headers() {
            if !is_hop_header(name.as_str()) {
                headers.append(name.clone(), value.clone());
            }
        }
        let answer = match self.client.get(uri, headers).await {
            Ok(answer) => answer,
            Err(AzureError::InvalidResponse(why)) => {
                tracing::warn!(%why, "an IMDS answer was not relayed");
                return response::error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "the Instance Metadata Service answer could not be relayed",
                );
            }
            Err(error) => {
                tracing::warn!(%error, "forwarding to IMDS failed");
                return response::error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "the Instance Metadata Service could not be reached",
                );
            }
        };
        let (parts, bytes) = answer.into_parts();
        let (status, headers) = (parts.status, parts.headers);
        let mut response = Response::new(Body::from(bytes));
        *response.status_mut() = status;
        for (name, value) in &headers {
            if !is_hop_header(name.as_str()) {
                response.headers_mut().append(name.clone(), value.clone());
            }
        }
        response
    }
}

/// Headers that belong to one hop and are never forwarded.
pub fn is_hop_header(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "x-real-ip"
    )
}
