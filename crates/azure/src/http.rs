//! HTTP clients for Azure calls. reqwest is built without a TLS provider of its own (the workspace uses ring
//! only), so a client can only be built once a rustls provider is installed; [`ensure_crypto_provider`]
//! installs ring when nothing is, which is what every binary and test of this workspace wants anyway.

use std::time::Duration;

use crate::error::AzureError;

/// Installs ring as the process's rustls provider unless one is installed already.
pub fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: that one is ring too (the only provider built in).
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// How to reach Azure over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// PEM certificates to trust besides the system's roots (a private cloud, or a local emulator).
    pub extra_ca_pem: Option<String>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            extra_ca_pem: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl HttpConfig {
    pub fn with_ca_pem(mut self, pem: &str) -> Self {
        self.extra_ca_pem = Some(pem.to_owned());
        self
    }

    pub fn build(&self) -> Result<reqwest::Client, AzureError> {
        ensure_crypto_provider();
        let mut b = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.connect_timeout)
            .user_agent(concat!("pod-identity/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &self.extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| AzureError::Config(format!("extra CA certificates: {e}")))?;
            b = b.tls_certs_merge(certs);
        }
        b.build()
            .map_err(|e| AzureError::Config(format!("building the HTTP client: {e}")))
    }
}

/// Reads a JSON number or a string holding one (IMDS sends strings, Entra v2 numbers).
pub fn int_field(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}
