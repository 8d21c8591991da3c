//! Behaviour a test may change while the emulator runs (through the library or `PUT /admin/settings`).

use serde::{Deserialize, Serialize};

use crate::throttle::ThrottleConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Settings {
    /// How long a VM or scale-set update runs before its identities reach the instances. Zero completes it
    /// within the PATCH (the response still names an operation, already `Succeeded`).
    pub lro_duration_ms: u64,
    /// `Retry-After` on a PATCH and on a running operation: how often clients poll.
    pub lro_poll_interval_secs: u64,
    /// A second update of a VM or scale set while one runs gets 409 `AnotherOperationInProgress`.
    pub reject_concurrent_updates: bool,
    /// Lifetime of IMDS tokens (real IMDS hands out tokens valid about 24 h and caches them).
    pub imds_token_lifetime_secs: i64,
    /// IMDS returns the same token for the same identity and resource until it is within 5 minutes of
    /// expiry, as real IMDS does; `bypass_cache=true` forces a new one.
    pub imds_token_cache: bool,
    pub entra_token_lifetime_secs: i64,
    /// Largest request body ARM, Entra and Key Vault read.
    pub max_body_bytes: usize,
    /// Token audiences (resources) Entra and IMDS issue tokens for, besides the Azure ones built in.
    pub extra_resources: Vec<String>,
    pub throttling: ThrottleConfig,
    pub federation: FederationSettings,
}

/// How Entra treats federated credentials and the issuers behind them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FederationSettings {
    /// PEM CA certificates Entra trusts when it fetches an issuer's OpenID configuration and keys (a test
    /// cluster's API server CA, say). Nothing else is trusted: no request leaves the machine.
    pub issuer_ca_pems: Vec<String>,
    /// The JWS algorithms Entra accepts on a federated assertion. Entra documents RS256 and refuses ES256
    /// with AADSTS5002738 (AzureAD/microsoft-identity-web#3467, which also reports RS384/512 and PS256/384/512
    /// accepted); ES256/ES384 may be added for an issuer that signs with an EC key.
    pub signing_algorithms: Vec<String>,
    /// How long fetched issuer metadata and keys are reused.
    pub issuer_cache_secs: u64,
    /// An assertion naming a key the cached set lacks refetches the keys, at most this often per issuer.
    pub issuer_refetch_secs: u64,
    /// The longest one fetch (discovery document and keys together) may take before Entra answers
    /// AADSTS90061.
    pub issuer_fetch_timeout_ms: u64,
    /// How long after an ARM write a user-assigned identity's federated credential reaches Entra; until
    /// then a token request it alone would allow gets AADSTS70021, as during real propagation.
    pub credential_propagation_ms: u64,
    /// How long an ARM write of a federated credential runs. Another write under the same identity in that
    /// time gets 409 `ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity`.
    pub credential_write_ms: u64,
}

impl Default for FederationSettings {
    fn default() -> Self {
        Self {
            issuer_ca_pems: Vec::new(),
            signing_algorithms: ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
                .map(str::to_owned)
                .to_vec(),
            issuer_cache_secs: 3600,
            issuer_refetch_secs: 10,
            issuer_fetch_timeout_ms: 5000,
            credential_propagation_ms: 0,
            credential_write_ms: 0,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lro_duration_ms: 0,
            lro_poll_interval_secs: 1,
            reject_concurrent_updates: true,
            imds_token_lifetime_secs: 86_399,
            imds_token_cache: true,
            entra_token_lifetime_secs: 3_599,
            max_body_bytes: 4 * 1024 * 1024,
            extra_resources: Vec::new(),
            throttling: ThrottleConfig::default(),
            federation: FederationSettings::default(),
        }
    }
}

/// Resources Entra knows in every tenant.
pub const KNOWN_RESOURCES: &[&str] = &[
    "https://management.azure.com",
    "https://management.core.windows.net",
    "https://vault.azure.net",
    "https://graph.microsoft.com",
    "https://storage.azure.com",
    "https://database.windows.net",
    "https://ossrdbms-aad.database.windows.net",
    "https://servicebus.azure.net",
    "https://eventhubs.azure.net",
    "https://cognitiveservices.azure.com",
];

/// Whether two resource identifiers name the same resource (case and one trailing slash aside).
pub fn same_resource(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

impl Settings {
    pub fn resource_known(&self, resource: &str) -> bool {
        KNOWN_RESOURCES
            .iter()
            .copied()
            .chain(self.extra_resources.iter().map(String::as_str))
            .any(|r| same_resource(r, resource))
    }
}
