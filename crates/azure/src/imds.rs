//! The IMDS managed-identity token call, written by hand: one GET with `Metadata: true`, never proxied, to a
//! configurable endpoint (the real `http://169.254.169.254`, or an emulator in tests). The body is kept as
//! received so a caller that serves tokens to others can pass it through unchanged.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::error::AzureError;
use crate::http::int_field;
use crate::imds_http::ImdsHttp;
use crate::retry::{RetryPolicy, log_retry, parse_retry_after, with_retries};
use crate::token::{AccessToken, TokenFuture, TokenSource};

pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
/// How long making a connection to IMDS may take: it is on the host's own link.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Which managed identity to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySelector {
    /// The system-assigned identity, or the only user-assigned one.
    Default,
    ClientId(String),
    ObjectId(String),
    /// The identity's ARM resource ID (`msi_res_id`).
    ResourceId(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsToken {
    pub access_token: String,
    pub expires_on: i64,
    pub expires_in: Option<i64>,
    pub resource: Option<String>,
    pub token_type: Option<String>,
    pub client_id: Option<String>,
    /// The response body exactly as IMDS sent it.
    pub raw: Bytes,
}

/// One IMDS answer, before any interpretation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

#[derive(Debug, Clone)]
pub struct ImdsClient {
    http: ImdsHttp,
    endpoint: String,
    api_version: String,
    retry: RetryPolicy,
}

impl ImdsClient {
    /// `endpoint` is scheme and authority, e.g. [`DEFAULT_ENDPOINT`].
    pub fn new(endpoint: &str) -> Result<Self, AzureError> {
        Ok(Self {
            http: ImdsHttp::new(Duration::from_secs(10), CONNECT_TIMEOUT, None),
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            api_version: "2018-02-01".to_owned(),
            retry: RetryPolicy::default(),
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The whole-request timeout (10 s unless set).
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, AzureError> {
        self.http = ImdsHttp::new(timeout, CONNECT_TIMEOUT, self.http.mark());
        Ok(self)
    }

    /// Requests over `http` (e.g. one whose connections carry a socket mark), shared with other callers.
    pub fn with_http(mut self, http: ImdsHttp) -> Self {
        self.http = http;
        self
    }

    pub fn with_api_version(mut self, v: &str) -> Self {
        self.api_version = v.to_owned();
        self
    }

    /// One request, no retry, no interpretation.
    #[tracing::instrument(skip(self), fields(endpoint = %self.endpoint))]
    pub async fn fetch(
        &self,
        resource: &str,
        selector: &IdentitySelector,
    ) -> Result<RawResponse, AzureError> {
        let mut query: Vec<(&str, &str)> =
            vec![("api-version", self.api_version.as_str()), ("resource", resource)];
        match selector {
            IdentitySelector::Default => {}
            IdentitySelector::ClientId(v) => query.push(("client_id", v)),
            IdentitySelector::ObjectId(v) => query.push(("object_id", v)),
            IdentitySelector::ResourceId(v) => query.push(("msi_res_id", v)),
        }
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(query)
            .finish();
        let uri: http::Uri = format!("{}{TOKEN_PATH}?{query}", self.endpoint)
            .parse()
            .map_err(|e| AzureError::Config(format!("the IMDS endpoint {}: {e}", self.endpoint)))?;
        let mut headers = http::HeaderMap::new();
        headers.insert("metadata", http::HeaderValue::from_static("true"));
        let resp = self.http.get(uri, headers).await?;
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        Ok(RawResponse {
            status: resp.status().as_u16(),
            retry_after,
            body: resp.into_body(),
        })
    }

    /// A token, retrying what IMDS documents as retryable (404, 410, 429, 5xx).
    pub async fn token(&self, resource: &str, selector: &IdentitySelector) -> Result<ImdsToken, AzureError> {
        with_retries(
            &self.retry,
            || async {
                let raw = self.fetch(resource, selector).await?;
                interpret(raw)
            },
            log_retry("imds token"),
        )
        .await
    }
}

/// Turns an IMDS answer into a token or a typed error.
pub fn interpret(raw: RawResponse) -> Result<ImdsToken, AzureError> {
    let json: Option<Value> = serde_json::from_slice(&raw.body).ok();
    let field = |k: &str| json.as_ref().and_then(|j| j[k].as_str()).map(str::to_owned);
    let error = field("error").unwrap_or_default();
    let description =
        field("error_description").unwrap_or_else(|| String::from_utf8_lossy(&raw.body).into_owned());
    match raw.status {
        200 => {
            let j =
                json.ok_or_else(|| AzureError::InvalidResponse("IMDS token response is not JSON".into()))?;
            let access_token = j["access_token"]
                .as_str()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| AzureError::InvalidResponse("IMDS token response has no access_token".into()))?
                .to_owned();
            let expires_in = int_field(&j["expires_in"]);
            let expires_on = int_field(&j["expires_on"])
                .or_else(|| expires_in.map(|i| crate::token::now_secs() + i))
                .ok_or_else(|| AzureError::InvalidResponse("IMDS token response has no expiry".into()))?;
            Ok(ImdsToken {
                access_token,
                expires_on,
                expires_in,
                resource: j["resource"].as_str().map(str::to_owned),
                token_type: j["token_type"].as_str().map(str::to_owned),
                client_id: j["client_id"].as_str().map(str::to_owned),
                raw: raw.body,
            })
        }
        400 if description.contains("Identity not found") => Err(AzureError::IdentityNotFound {
            code: error,
            message: description,
        }),
        // IMDS answers 404 and 410 while it is updating (its documentation says to retry them).
        404 | 410 => Err(AzureError::Transient {
            status: Some(raw.status),
            code: error,
            message: description,
        }),
        s => Err(AzureError::from_answer(s, error, description, raw.retry_after)),
    }
}

/// A managed identity as a token source for other calls (ARM with the node's identity).
#[derive(Debug, Clone)]
pub struct ManagedIdentity {
    pub client: ImdsClient,
    pub selector: IdentitySelector,
}

impl TokenSource for ManagedIdentity {
    fn token<'a>(&'a self, resource: &'a str) -> TokenFuture<'a> {
        Box::pin(async move {
            let t = self.client.token(resource, &self.selector).await?;
            Ok(AccessToken {
                token: t.access_token,
                expires_on: t.expires_on,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse {
            status,
            retry_after: Some(Duration::from_secs(3)),
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn reads_string_numbers_and_keeps_the_body() {
        let body = r#"{"access_token":"a","expires_in":"3599","expires_on":"1700003599","resource":"r","token_type":"Bearer","client_id":"c"}"#;
        let t = interpret(raw(200, body)).unwrap();
        assert_eq!((t.expires_on, t.expires_in), (1_700_003_599, Some(3599)));
        assert_eq!(t.raw, Bytes::from(body));
    }

    #[test]
    fn statuses_map_to_error_kinds() {
        let e = interpret(raw(
            400,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        ))
        .unwrap_err();
        assert!(matches!(e, AzureError::IdentityNotFound { .. }));
        let e = interpret(raw(
            400,
            r#"{"error":"invalid_request","error_description":"Required metadata header not specified"}"#,
        ))
        .unwrap_err();
        assert!(matches!(e, AzureError::Other { status: 400, .. }));
        assert_eq!(
            interpret(raw(429, "{}")).unwrap_err().retry_after(),
            Some(Duration::from_secs(3))
        );
        for s in [404, 410, 500, 503] {
            assert!(interpret(raw(s, "x")).unwrap_err().is_retryable(), "{s}");
        }
        assert!(matches!(
            interpret(raw(200, "{}")),
            Err(AzureError::InvalidResponse(_))
        ));
    }
}
