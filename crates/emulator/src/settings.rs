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
