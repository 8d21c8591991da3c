//! The client-credentials grant against Entra ID's v2 endpoint, with a client secret, a certificate (a
//! JWT client assertion signed with the certificate's key: ES256 for a P-256 key, RS256 for RSA), or a token
//! of another issuer (workload identity federation).

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use crate::error::AzureError;
use crate::http::int_field;
use crate::retry::{RetryPolicy, log_retry, parse_retry_after, with_retries};
use crate::token::{AccessToken, TokenFuture, TokenSource, now_secs};

pub const PUBLIC_AUTHORITY: &str = "https://login.microsoftonline.com";

enum Key {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// A certificate and its private key, from PEM.
#[derive(Clone)]
pub struct ClientCertificate {
    key: Arc<Key>,
    x5t: String,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t", &self.x5t)
            .finish_non_exhaustive()
    }
}

impl ClientCertificate {
    /// Reads the first certificate and the private key (PKCS#8, or PKCS#1 for RSA) from PEM text.
    pub fn from_pem(pem: &str) -> Result<Self, AzureError> {
        let cert = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .ok_or_else(|| AzureError::Config("the client certificate PEM holds no certificate".into()))?
            .map_err(|e| AzureError::Config(format!("client certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| AzureError::Config(format!("client certificate private key: {e}")))?;
        let rng = SystemRandom::new();
        let key = match &key {
            PrivateKeyDer::Pkcs8(k) => {
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, k.secret_pkcs8_der(), &rng)
                    .map(Key::Ecdsa)
                    .or_else(|_| RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).map(Key::Rsa))
                    .map_err(|e| {
                        AzureError::Config(format!("client certificate key is neither P-256 nor RSA: {e}"))
                    })?
            }
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der())
                .map(Key::Rsa)
                .map_err(|e| AzureError::Config(format!("client certificate RSA key: {e}")))?,
            _ => {
                return Err(AzureError::Config(
                    "client certificate key must be PKCS#8 or PKCS#1".into(),
                ));
            }
        };
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref());
        Ok(Self {
            key: Arc::new(key),
            x5t: B64.encode(sha1.as_ref()),
        })
    }

    /// The signed assertion for `audience` (the token endpoint).
    pub fn assertion(&self, client_id: &str, audience: &str, now: i64) -> Result<String, AzureError> {
        let alg = match *self.key {
            Key::Ecdsa(_) => "ES256",
            Key::Rsa(_) => "RS256",
        };
        let header = json!({"alg": alg, "typ": "JWT", "x5t": self.x5t});
        let claims = json!({
            "aud": audience, "iss": client_id, "sub": client_id,
            "jti": uuid::Uuid::new_v4().to_string(), "nbf": now, "iat": now, "exp": now + 600,
        });
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let sig = match &*self.key {
            Key::Ecdsa(k) => k
                .sign(&rng, input.as_bytes())
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| AzureError::Config("signing the client assertion failed".into()))?,
            Key::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig)
                    .map_err(|_| AzureError::Config("signing the client assertion failed".into()))?;
                sig
            }
        };
        Ok(format!("{input}.{}", B64.encode(sig)))
    }
}

#[derive(Clone)]
pub enum ClientCredential {
    Secret(String),
    Certificate(ClientCertificate),
    /// A token another issuer signed, presented as is (workload identity federation: Entra checks it against
    /// the application's or identity's federated identity credentials).
    Assertion(String),
}

impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret(..)"),
            Self::Certificate(c) => c.fmt(f),
            Self::Assertion(_) => f.write_str("Assertion(..)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EntraClient {
    http: reqwest::Client,
    authority: String,
    tenant: String,
    client_id: String,
    credential: ClientCredential,
    retry: RetryPolicy,
}

/// `scope` for a resource: the resource without a trailing slash plus `/.default`.
pub fn default_scope(resource: &str) -> String {
    format!("{}/.default", resource.trim_end_matches('/'))
}

impl EntraClient {
    /// `authority` is the Entra host as a URL (e.g. [`PUBLIC_AUTHORITY`]); it must be https.
    pub fn new(
        http: reqwest::Client,
        authority: &str,
        tenant: &str,
        client_id: &str,
        credential: ClientCredential,
    ) -> Result<Self, AzureError> {
        if !authority.starts_with("https://") {
            return Err(AzureError::Config(format!(
                "authority '{authority}' must be https"
            )));
        }
        Ok(Self {
            http,
            authority: authority.trim_end_matches('/').to_owned(),
            tenant: tenant.to_owned(),
            client_id: client_id.to_owned(),
            credential,
            retry: RetryPolicy::default(),
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    #[tracing::instrument(skip(self), fields(tenant = %self.tenant, client_id = %self.client_id))]
    pub async fn token_for(&self, resource: &str) -> Result<AccessToken, AzureError> {
        with_retries(&self.retry, || self.attempt(resource), log_retry("entra token")).await
    }

    async fn attempt(&self, resource: &str) -> Result<AccessToken, AzureError> {
        let url = format!("{}/{}/oauth2/v2.0/token", self.authority, self.tenant);
        let scope = default_scope(resource);
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", self.client_id.clone()),
            ("scope", scope),
        ];
        match &self.credential {
            ClientCredential::Secret(s) => form.push(("client_secret", s.clone())),
            ClientCredential::Certificate(c) => {
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push((
                    "client_assertion",
                    c.assertion(&self.client_id, &url, now_secs())?,
                ));
            }
            ClientCredential::Assertion(token) => {
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", token.clone()));
            }
        }
        let resp = self
            .http
            .post(&url)
            .form(&form)
            .send()
            .await
            .map_err(|e| AzureError::transport(&e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        let body = resp.bytes().await.map_err(|e| AzureError::transport(&e))?;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status == 200 {
            let token = json["access_token"]
                .as_str()
                .ok_or_else(|| AzureError::InvalidResponse("token response has no access_token".into()))?;
            let expires_in = int_field(&json["expires_in"])
                .ok_or_else(|| AzureError::InvalidResponse("token response has no expires_in".into()))?;
            return Ok(AccessToken {
                token: token.to_owned(),
                expires_on: now_secs() + expires_in,
            });
        }
        let code = json["error"].as_str().unwrap_or_default().to_owned();
        let message = json["error_description"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        Err(match (status, code.as_str()) {
            // OAuth's word for a bad client secret or assertion, whatever the status.
            (400, "invalid_client" | "unauthorized_client") => AzureError::Unauthorized {
                status,
                code,
                message,
            },
            _ => AzureError::from_answer(status, code, message, retry_after),
        })
    }
}

impl TokenSource for EntraClient {
    fn token<'a>(&'a self, resource: &'a str) -> TokenFuture<'a> {
        Box::pin(self.token_for(resource))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_is_the_resource_with_default_suffix() {
        assert_eq!(
            default_scope("https://management.azure.com/"),
            "https://management.azure.com/.default"
        );
        assert_eq!(
            default_scope("https://vault.azure.net"),
            "https://vault.azure.net/.default"
        );
    }

    #[test]
    fn refuses_plain_http_authorities() {
        let http = crate::http::HttpConfig::default().build().unwrap();
        let err = EntraClient::new(
            http,
            "http://login",
            "t",
            "c",
            ClientCredential::Secret("s".into()),
        )
        .unwrap_err();
        assert!(matches!(err, AzureError::Config(_)));
    }

    #[test]
    fn bad_pem_is_a_configuration_error() {
        assert!(matches!(
            ClientCertificate::from_pem("nothing"),
            Err(AzureError::Config(_))
        ));
    }
}
