//! One error type for every Azure call, sorted by what the caller should do about it: wait and retry
//! (`Throttled`, `Transient`, a busy `Conflict`), read again (a stale `Conflict`), quarantine identities
//! (`IdentitiesRejected`), fix configuration or permissions (`Unauthorized`, `Config`), or give up on the
//! resource (`ResourceNotFound`). Both binaries act on these kinds directly; [`AzureError::from_answer`] is
//! the one place an Azure refusal is sorted.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AzureError {
    /// 429: try again after `retry_after` (when the service said).
    #[error("throttled (retry after {retry_after:?}): {message}")]
    Throttled {
        retry_after: Option<Duration>,
        message: String,
    },

    /// ARM refused identities of the request: they do not exist (`FailedIdentityOperation`, also as the
    /// failure of a long-running operation) or the caller may not assign them (`LinkedAuthorizationFailed`).
    /// `identities` are the resource IDs the message names, if any; the rest of the request can go
    /// through without them.
    #[error("identities rejected ({code}): {message}")]
    IdentitiesRejected {
        identities: Vec<String>,
        code: String,
        message: String,
    },

    /// IMDS 400 "Identity not found": the identity asked for is not assigned to this VM (yet: IMDS
    /// learns of an assignment some time after ARM made it).
    #[error("identity not found ({code}): {message}")]
    IdentityNotFound { code: String, message: String },

    /// 401/403, or a rejected credential: the caller lacks rights or its token/secret is bad.
    #[error("unauthorised ({status} {code}): {message}")]
    Unauthorized {
        status: u16,
        code: String,
        message: String,
    },

    /// 409 (another operation on the resource is running, or the change conflicts with its state) or
    /// 412 (an `If-Match` entity tag no longer matches: the resource changed since it was read).
    #[error("conflict ({status} {code}): {message}")]
    Conflict {
        status: u16,
        code: String,
        message: String,
    },

    /// 5xx, 408, 404/410 from IMDS, connection failures and timeouts.
    #[error("transient failure ({status:?} {code}): {message}")]
    Transient {
        status: Option<u16>,
        code: String,
        message: String,
    },

    /// The resource addressed, or its resource group, does not exist (404 `ResourceNotFound`,
    /// `ResourceGroupNotFound` or `NotFound`). Other 404s (an unknown subscription, an unregistered
    /// provider, a malformed path) say nothing of the resource and are [`AzureError::Other`].
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

/// 404 codes that say the addressed resource (or its group) is gone, rather than that the path was wrong.
const NOT_FOUND_CODES: [&str; 3] = ["ResourceNotFound", "ResourceGroupNotFound", "NotFound"];

/// 409 codes that pass by themselves: another operation on the resource is still running (for federated
/// identity credentials: another write under the same identity).
const BUSY_CODES: [&str; 3] = [
    "AnotherOperationInProgress",
    "Conflict",
    crate::arm::federated_credentials::CONCURRENT_WRITES,
];

impl AzureError {
    /// Sorts an error answer of ARM, Entra or Key Vault by status, error `code` and message: the one
    /// place where an Azure refusal becomes a kind of error. `retry_after` is the answer's `Retry-After`.
    pub fn from_answer(status: u16, code: String, message: String, retry_after: Option<Duration>) -> Self {
        match (status, code.as_str()) {
            (429, _) => Self::Throttled { retry_after, message },
            (_, "FailedIdentityOperation") => Self::IdentitiesRejected {
                identities: extract_identity_ids(&message),
                code,
                message,
            },
            (401 | 403, "LinkedAuthorizationFailed") => Self::IdentitiesRejected {
                identities: extract_identity_ids(&message),
                code,
                message,
            },
            (401 | 403, _) => Self::Unauthorized {
                status,
                code,
                message,
            },
            (404, c) if NOT_FOUND_CODES.iter().any(|n| n.eq_ignore_ascii_case(c)) => {
                Self::ResourceNotFound { code, message }
            }
            (409 | 412, _) => Self::Conflict {
                status,
                code,
                message,
            },
            (408 | 500..=599, _) => Self::Transient {
                status: Some(status),
                code,
                message,
            },
            _ => Self::Other {
                status,
                code,
                message,
            },
        }
    }

    /// Whether retrying the same request can succeed: throttling, transient failures, and a 409 because
    /// another operation is running. A 412 needs a fresh read first, so it is not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Throttled { .. } | Self::Transient { .. } => true,
            Self::Conflict {
                status: 409, code, ..
            } => BUSY_CODES.contains(&code.as_str()),
            _ => false,
        }
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
            Self::IdentitiesRejected { identities, .. } => identities,
            _ => &[],
        }
    }

    /// A short, bounded name of the kind, for metric labels: `throttled`, `identity_rejected`,
    /// `unauthorized`, `conflict`, `transient` (also a failed long-running operation), `not_found` or
    /// `error`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Throttled { .. } => "throttled",
            Self::IdentitiesRejected { .. } => "identity_rejected",
            Self::Unauthorized { .. } => "unauthorized",
            Self::Conflict { .. } => "conflict",
            Self::Transient { .. } | Self::OperationFailed { .. } => "transient",
            Self::ResourceNotFound { .. } => "not_found",
            Self::IdentityNotFound { .. }
            | Self::Other { .. }
            | Self::InvalidResponse(_)
            | Self::Config(_) => "error",
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

/// The identities among `sent` whose IDs `message` names (in any case); ARM names them in its text only.
/// For a message [`extract_identity_ids`] cannot read, with the spelling of the request.
pub fn named_in(message: &str, sent: &[String]) -> Vec<String> {
    let haystack = message.to_ascii_lowercase();
    sent.iter()
        .filter(|id| {
            let needle = crate::resource_id::fold(id);
            // `.../identities/a` must not match inside `.../identities/ab`.
            haystack.match_indices(&needle).any(|(at, _)| {
                haystack[at + needle.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            })
        })
        .cloned()
        .collect()
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
    fn rejected_identities_are_found_in_the_message_whatever_the_case() {
        let sent = vec![
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/good".to_owned(),
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/gone".to_owned(),
        ];
        let message = "Resource '/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/gone' was not found.";
        assert_eq!(named_in(message, &sent), vec![sent[1].clone()]);
        let prefix = vec![sent[1].trim_end_matches('e').to_owned()];
        assert!(
            named_in(message, &prefix).is_empty(),
            "a prefix of a named ID is not named"
        );
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
            !AzureError::IdentitiesRejected {
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
            }
            .is_retryable()
        );
        let conflict = |status, code: &str| AzureError::Conflict {
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(conflict(409, "AnotherOperationInProgress").is_retryable());
        assert!(!conflict(409, "OperationNotAllowed").is_retryable());
        assert!(
            !conflict(412, "PreconditionFailed").is_retryable(),
            "a stale read is read again first"
        );
    }
}
