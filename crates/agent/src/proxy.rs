//! Forwarding of the metadata paths that configuration lets through (`/metadata/instance`, versions,
//! scheduled events...). The request goes out as the pod sent it, minus hop-by-hop and forwarding headers:
//! IMDS refuses requests carrying `X-Forwarded-For`, and the agent never adds one.

use axum::{body::Body, response::Response};
use http::{Request, StatusCode};

use crate::{response, server::is_hop_header};

/// The largest answer forwarded; IMDS documents are a few kilobytes.
const MAX_BODY: usize = 1 << 20;

/// Forwards to IMDS.
#[derive(Clone, Debug)]
pub struct Proxy {
    client: reqwest::Client,
    base: String,
}

impl Proxy {
    /// A proxy to IMDS at `base` (`http://169.254.169.254:80`) with a client that never uses a proxy.
    pub fn new(client: reqwest::Client, base: &str) -> Self {
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// Forwards a GET whose path was classified clean, and relays the answer.
    pub async fn forward(&self, req: Request<Body>) -> Response {
        let path_and_query = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let url = format!("{}{path_and_query}", self.base);
        let mut outgoing = self.client.get(url);
        for (name, value) in req.headers() {
            if !is_hop_header(name.as_str()) {
                outgoing = outgoing.header(name.clone(), value.clone());
            }
        }
        let answer = match outgoing.send().await {
            Ok(answer) => answer,
            Err(error) => {
                tracing::warn!(%error, "forwarding to IMDS failed");
                return response::error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "the Instance Metadata Service could not be reached",
                );
            }
        };
        let status = answer.status();
        let headers = answer.headers().clone();
        let too_long = answer
            .content_length()
            .is_some_and(|length| length > MAX_BODY as u64);
        let bytes = match answer.bytes().await {
            Ok(bytes) if !too_long && bytes.len() <= MAX_BODY => bytes,
            _ => {
                return response::error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "the Instance Metadata Service answer could not be relayed",
                );
            }
        };
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
