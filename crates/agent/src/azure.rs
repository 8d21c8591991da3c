//! [`Upstream`] over the Azure crate's clients: its IMDS client (one plain-HTTP GET to the metadata
//! address, never through a proxy) and its Entra client-credentials client (a client secret, or an
//! assertion signed with the certificate's key). Both are asked for one attempt only; retrying is
//! [`crate::upstream::with_retries`]'s, under the cache's single flight.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};
use pod_identity_azure::{
    AzureError, ClientCertificate, ClientCredential, EntraClient, IdentitySelector, ImdsClient, RetryPolicy,
    imds::interpret, imds_http::ImdsHttp,
};

use crate::{
    request::Selector,
    upstream::Token,
    upstream::{BoxFuture, Secret, ServicePrincipal, Upstream, UpstreamError, claims},
};

/// Installs ring as the process's TLS provider unless one is installed: reqwest is built without a
/// provider of its own, and the workspace uses ring everywhere.
pub fn ensure_crypto_provider() {
    pod_identity_azure::http::ensure_crypto_provider();
}

/// How long a connection to IMDS may take to open: it is on the node's own link.
const IMDS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Talks to IMDS and Entra.
#[derive(Clone, Debug)]
pub struct HttpUpstream {
    imds: ImdsClient,
    imds_http: ImdsHttp,
    imds_base: String,
    entra: reqwest::Client,
}

impl HttpUpstream {
    /// Clients for IMDS at `imds_base` (`http://169.254.169.254:80`), whose connections carry `mark` when
    /// host traffic to IMDS is intercepted (so that the agent's own is not), and for Entra, trusting
    /// `extra_ca_pem` besides the system's roots.
    pub fn new(
        imds_base: String,
        timeout: Duration,
        mark: Option<u32>,
        extra_ca_pem: Option<&str>,
    ) -> Result<Self, UpstreamError> {
        ensure_crypto_provider();
        let imds_http = ImdsHttp::new(timeout, IMDS_CONNECT_TIMEOUT, mark);
        let imds = ImdsClient::new(&imds_base)
            .map_err(UpstreamError::from)?
            .with_http(imds_http.clone())
            .with_retry(RetryPolicy::none());
        // HTTP/1.1, as MSAL speaks to Entra: a token request is one small exchange, and some Entra
        // front ends (and the emulator) derive the assertion audience from the Host header, which
        // HTTP/2 requests do not carry.
        let mut entra = reqwest::Client::builder()
            .http1_only()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("pod-identity-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| AzureError::Config(format!("extra CA certificates: {e}")))?;
            entra = entra.tls_certs_merge(certs);
        }
        let entra = entra
            .build()
            .map_err(|e| AzureError::Config(format!("building the Entra client: {e}")))?;
        Ok(Self {
            imds,
            imds_http,
            imds_base: imds_base.trim_end_matches('/').to_owned(),
            entra,
        })
    }

    /// The plain IMDS HTTP client, for forwarding non-token requests.
    pub fn imds_client(&self) -> &ImdsHttp {
        &self.imds_http
    }

    /// `http://<metadata ip>:<port>`.
    pub fn imds_base(&self) -> &str {
        &self.imds_base
    }

    async fn fetch_imds(&self, selector: &Selector, resource: &str) -> Result<Token, UpstreamError> {
        let selector = match selector {
            Selector::Default => IdentitySelector::Default,
            Selector::ClientId(id) => IdentitySelector::ClientId(id.clone()),
            Selector::ObjectId(id) => IdentitySelector::ObjectId(id.clone()),
            Selector::ResourceId(id) => IdentitySelector::ResourceId(id.clone()),
        };
        let raw = self.imds.fetch(resource, &selector).await?;
        let token = interpret(raw)?;
        let (object_id, nbf) = claims(&token.access_token);
        let not_before = serde_json::from_slice::<serde_json::Value>(&token.raw)
            .ok()
            .and_then(|body| match &body["not_before"] {
                serde_json::Value::String(s) => s.trim().parse().ok(),
                serde_json::Value::Number(n) => n.as_i64(),
                _ => None,
            })
            .or(nbf)
            .unwrap_or_else(crate::clock::now);
        Ok(Token {
            not_before,
            client_id: token.client_id,
            object_id,
            access_token: token.access_token,
            expires_on: token.expires_on,
        })
    }

    async fn fetch_entra(
        &self,
        principal: &ServicePrincipal,
        tenant: &str,
        resource: &str,
    ) -> Result<Token, UpstreamError> {
        let credential = match &principal.secret {
            Secret::Password(secret) => ClientCredential::Secret(secret.clone()),
            Secret::Certificate {
                key_pkcs8,
                certificate,
            } => ClientCredential::Certificate(ClientCertificate::from_pem(&pem(certificate, key_pkcs8))?),
            Secret::Assertion(token) => ClientCredential::Assertion(token.clone()),
        };
        let client = EntraClient::new(
            self.entra.clone(),
            &principal.authority,
            tenant,
            &principal.client_id,
            credential,
        )?
        .with_retry(RetryPolicy::none());
        let token = client.token_for(resource).await?;
        let (object_id, nbf) = claims(&token.token);
        Ok(Token {
            not_before: nbf.unwrap_or_else(crate::clock::now),
            client_id: Some(principal.client_id.clone()),
            object_id,
            access_token: token.token,
            expires_on: token.expires_on,
        })
    }
}

/// A certificate and its PKCS#8 key as the PEM text the Entra client reads.
fn pem(certificate: &[u8], key_pkcs8: &[u8]) -> String {
    let block = |label: &str, der: &[u8]| {
        let encoded = STANDARD.encode(der);
        let lines: Vec<&str> = encoded
            .as_bytes()
            .chunks(64)
            .filter_map(|chunk| std::str::from_utf8(chunk).ok())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    };
    format!(
        "{}{}",
        block("CERTIFICATE", certificate),
        block("PRIVATE KEY", key_pkcs8)
    )
}

impl Upstream for HttpUpstream {
    fn imds_token<'a>(
        &'a self,
        selector: &'a Selector,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, UpstreamError>> {
        Box::pin(self.fetch_imds(selector, resource))
    }

    fn entra_token<'a>(
        &'a self,
        principal: &'a ServicePrincipal,
        tenant_id: &'a str,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, UpstreamError>> {
        Box::pin(self.fetch_entra(principal, tenant_id, resource))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_errors_keep_what_the_caller_must_do() {
        let throttled = UpstreamError::from(AzureError::Throttled {
            retry_after: Some(Duration::from_secs(3)),
            message: String::new(),
        });
        assert_eq!(throttled.retry_after(), Some(Duration::from_secs(3)));
        let transient = UpstreamError::from(AzureError::Transient {
            status: Some(503),
            code: String::new(),
            message: String::new(),
        });
        assert!(transient.is_retryable());
        assert_eq!(transient.label(), "server_error");
        let missing = UpstreamError::from(AzureError::IdentityNotFound {
            code: "invalid_request".into(),
            message: "Identity not found".into(),
        });
        assert!(!missing.is_retryable());
        assert_eq!(missing.label(), "refused");
        assert!(missing.to_string().contains("Identity not found"));
        let unreadable = UpstreamError::from(AzureError::Config("client certificate: bad".into()));
        assert_eq!(unreadable.label(), "credential_error");
    }

    #[test]
    fn a_pkcs12_key_and_certificate_become_pem_the_entra_client_reads() {
        let archive = include_bytes!("../tests/fixtures/service-principal.p12");
        let (key, certificate) = crate::credentials::from_pkcs12(archive, "test-password").unwrap();
        let text = pem(&certificate, &key);
        let parsed = ClientCertificate::from_pem(&text).unwrap();
        let assertion = parsed
            .assertion("client", "https://login.example/t/oauth2/v2.0/token", 0)
            .unwrap();
        assert_eq!(assertion.split('.').count(), 3);
    }
}
