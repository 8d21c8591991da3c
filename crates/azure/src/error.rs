//! One error type for every Azure call, sorted by what the caller should do about it: wait and retry
//! (`Throttled`, `Transient`), quarantine an identity (`IdentityNotFound`, or `Unauthorized` naming
//! identities), fix configuration or permissions (`Unauthorized`), or give up on the resource.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AzureError {
    /// 429: try again after `retry_after` (when the service said).
    #[error("throttled (retry after {retry_after:?}): {message}")]
    Throttled {
        retry_after: Option<Duration>,
        message: String,
    },

    /// The identity does not exist (ARM `FailedIdentityOperation`) or is not assigned where the token was
    /// asked for (IMDS 400 "Identity not found"). `identities` are the resource IDs the error names, if any.
    #[error("identity not found ({code}): {message}")]
    IdentityNotFound {
        identities: Vec<String>,
        code: String,
        message: String,
    },

    /// 401/403, or a rejected credential: the caller lacks rights or its token/secret is bad.
    /// `identities` lists linked identities ARM refused to assign (`LinkedAuthorizationFailed`).
    #[error("unauthorised ({status} {code}): {message}")]
    Unauthorized {
        status: u16,
        code: String,
        message: String,
        identities: Vec<String>,
    },

    /// 5xx, 404/410 from IMDS, 409 another operation in progress, connection failures and timeouts.
    #[error("transient failure ({status:?} {code}): {message}")]
    Transient {
        status: Option<u16>,
        code: String,
        message: String,
    },

    /// The VM, scale set or identity resource itself does not exist.
    #[error("resource not found ({code}): {message}")]
    ResourceNotFound { code: String, message: String },

    /// A long-running operation ended `Failed` or `Canceled`.
    #[error("operation {status}: {code}: {message}")]
    OperationFailed {
        status: String,
        code: String,
        message: String,
    },

    /// Any other refusal.
    #[error("request failed ({status} {code}): {message}")]
    Other {
        status: u16,
        code: String,
        message: String,
    },

    /// The service answered something this client cannot read.
    #[error("unexpected response: {0}")]
    InvalidResponse(String),

    /// Local configuration is unusable (bad URL, unreadable certificate, missing azure.json field).
    #[error("configuration: {0}")]
    Config(String),
}

impl AzureError {
    /// Whether retrying the same request can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Transient { .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Identity resource IDs this error blames, for quarantining them.
    pub fn identities(&self) -> &[String] {
        match self {
            Self::IdentityNotFound { identities, .. } | Self::Unauthorized { identities, .. } => identities,
            _ => &[],
        }
    }

    pub(crate) fn transport(e: &reqwest::Error) -> Self {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Self::Transient {
            status: None,
            code: if e.is_timeout() {
                "Timeout".into()
            } else {
                "Transport".into()
            },
            message,
        }
    }
}

/// Finds user-assigned identity resource IDs in an error message (ARM quotes them in several ways).
pub fn extract_identity_ids(message: &str) -> Vec<String> {
    const MARK: &str = "/providers/microsoft.managedidentity/userassignedidentities/";
    let lower = message.to_ascii_lowercase();
    let mut out: Vec<String> = Vec::new();
    let mut from = 0;
    while let Some(pos) = lower[from..].find("/subscriptions/") {
        let start = from + pos;
        let end = lower[start..]
            .find(['\'', '"', '\\', ' ', ',', ';', ')', ']', '}'])
            .map_or(lower.len(), |e| start + e);
        let candidate = message[start..end].trim_end_matches(['.', '/']);
        if candidate.to_ascii_lowercase().contains(MARK)
            && !out.iter().any(|o| o.eq_ignore_ascii_case(candidate))
        {
            out.push(candidate.to_owned());
        }
        from = end.max(start + 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_identity_ids_in_arm_messages() {
        let msg = r#"Identity operation for resource '/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss' failed with error 'Failed to perform resource identity operation. Status: 'NotFound'. Response: '{"error":{"code":"NotFound","message":"Resource '/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1' was not found."}}'."#;
        assert_eq!(
            extract_identity_ids(msg),
            vec![
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1"
            ]
        );
        let linked = "on the linked scope(s) '/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/a,/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/b' (respectively)";
        assert_eq!(extract_identity_ids(linked).len(), 2);
        assert!(extract_identity_ids("nothing here").is_empty());
    }

    #[test]
    fn only_throttled_and_transient_are_retryable() {
        assert!(
            AzureError::Throttled {
                retry_after: None,
                message: String::new()
            }
            .is_retryable()
        );
        assert!(
            AzureError::Transient {
                status: Some(503),
                code: String::new(),
                message: String::new()
            }
            .is_retryable()
        );
        assert!(
            !AzureError::IdentityNotFound {
                identities: vec![],
                code: String::new(),
                message: String::new()
            }
            .is_retryable()
        );
        assert!(
            !AzureError::Unauthorized {
                status: 403,
                code: String::new(),
                message: String::new(),
                identities: vec![]
            }
            .is_retryable()
        );
    }
}
