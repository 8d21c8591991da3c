//! The controller's whole view of Azure: read the identities of a VM or scale set, and change them by a
//! delta. Everything above this trait is tested without I/O against an in-memory implementation; the real
//! one is in [`crate::azure`].

use std::{collections::BTreeMap, time::Duration};

use futures::future::BoxFuture;
pub use pod_identity_azure::ThrottleScope;

use crate::machine::{Machine, fold};

/// Compute's limit on `userAssignedIdentities` entries in one request.
pub const MAX_IDENTITIES_PER_REQUEST: usize = 150;

/// One user-assigned identity as the machine lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedIdentity {
    /// The ID as ARM spells it.
    pub id: String,
    /// Client ID, when ARM reports one (it reports none for an identity deleted since it was assigned).
    pub client_id: Option<String>,
}

/// What a machine holds, as last read or as the answer to our last change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// User-assigned identities, keyed by the case-folded ID.
    pub identities: BTreeMap<String, ObservedIdentity>,
    /// Whether the system-assigned identity is enabled; a change must keep it.
    pub system_assigned: bool,
    /// `properties.provisioningState` (`Succeeded`, `Updating`, `Deleting`...).
    pub provisioning_state: Option<String>,
    /// The entity tag, for conditional updates.
    pub etag: Option<String>,
    /// ARM's word that the machine does not exist (its message); it then holds nothing.
    pub absent: Option<String>,
}

impl Observed {
    /// A machine ARM says does not exist ([`ArmError::MachineNotFound`]): deleted, or never there.
    pub fn absent(message: impl Into<String>) -> Self {
        Self {
            absent: Some(message.into()),
            ..Self::default()
        }
    }

    /// Whether ARM says the machine does not exist.
    pub fn is_absent(&self) -> bool {
        self.absent.is_some()
    }

    /// Whether the identity is on the machine.
    pub fn has(&self, id: &str) -> bool {
        self.identities.contains_key(&fold(id))
    }

    /// Whether ARM is deleting the machine; it must then be left alone.
    pub fn is_deleting(&self) -> bool {
        self.provisioning_state
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("Deleting"))
    }
}

/// Identities to add and remove in one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// IDs to add (`{}`).
    pub add: Vec<String>,
    /// IDs to remove (`null`).
    pub remove: Vec<String>,
    /// Whether the machine has its system-assigned identity, which the request must keep.
    pub keep_system_assigned: bool,
    /// How many user-assigned identities the machine holds before this change; the request's identity
    /// `type` depends on whether any remain after it.
    pub users_before: usize,
}

impl Delta {
    /// Whether there is nothing to change.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// Whether the change adds or removes this identity (compared case-folded, as ARM compares IDs).
    pub fn touches(&self, id: &str) -> bool {
        let key = fold(id);
        self.add.iter().chain(&self.remove).any(|i| fold(i) == key)
    }

    /// How many user-assigned identities the machine holds after this change.
    pub fn users_after(&self) -> usize {
        (self.users_before + self.add.len()).saturating_sub(self.remove.len())
    }

    /// Splits into requests of at most `limit` entries each. Additions go first, so that pods waiting
    /// for an identity are served before clean-up.
    pub fn chunks(&self, limit: usize) -> Vec<Delta> {
        let limit = limit.max(1);
        let entries: Vec<(bool, &String)> = self
            .add
            .iter()
            .map(|id| (true, id))
            .chain(self.remove.iter().map(|id| (false, id)))
            .collect();
        let mut users = self.users_before;
        entries
            .chunks(limit)
            .map(|chunk| {
                let delta = Delta {
                    add: chunk
                        .iter()
                        .filter(|(add, _)| *add)
                        .map(|(_, id)| (*id).clone())
                        .collect(),
                    remove: chunk
                        .iter()
                        .filter(|(add, _)| !*add)
                        .map(|(_, id)| (*id).clone())
                        .collect(),
                    keep_system_assigned: self.keep_system_assigned,
                    users_before: users,
                };
                users = delta.users_after();
                delta
            })
            .collect()
    }
}

/// How an ARM call failed, in the terms the worker acts on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArmError {
    /// 429: wait at least `retry_after` before the next call that `scope`'s bucket serves.
    #[error("throttled by ARM{}", retry_suffix(.retry_after))]
    Throttled {
        /// ARM's `Retry-After`.
        retry_after: Option<Duration>,
        /// Whether the machine's own bucket refused the call, or the subscription's.
        scope: ThrottleScope,
    },
    /// The machine does not exist (ARM `ResourceNotFound`, or its resource group is gone).
    #[error("the machine does not exist: {message}")]
    MachineNotFound {
        /// ARM's message.
        message: String,
    },
    /// ARM refused some of the identities to add: they do not exist, or we may not assign them. `ids` are
    /// those the error names among the ones we sent; empty when it names none.
    #[error("ARM refused identities {ids:?}: {message}")]
    IdentitiesRejected {
        /// The refused identities, spelled as we sent them.
        ids: Vec<String>,
        /// ARM's error code.
        code: String,
        /// ARM's message.
        message: String,
    },
    /// The controller itself may not read or write the machine.
    #[error("not authorised: {message}")]
    Unauthorized {
        /// ARM's message.
        message: String,
    },
    /// The machine changed since the entity tag of an `If-Match` was read (412 `PreconditionFailed`):
    /// another writer was detected, not overwritten. Read it again, then decide again.
    #[error("the machine changed since it was read: {message}")]
    Modified {
        /// ARM's message.
        message: String,
    },
    /// Another update of the machine is running (409).
    #[error("conflict: {message}")]
    Conflict {
        /// ARM's message.
        message: String,
        /// ARM's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// Anything worth retrying later: 5xx, timeouts, connection errors, a failed long-running operation.
    #[error("transient failure: {message}")]
    Transient {
        /// What went wrong.
        message: String,
        /// ARM's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// Anything else (a malformed request, an unexpected answer); retried slowly.
    #[error("ARM call failed: {message}")]
    Other {
        /// What went wrong.
        message: String,
    },
}

fn retry_suffix(retry_after: &Option<Duration>) -> String {
    retry_after
        .map(|d| format!(", retry after {}s", d.as_secs()))
        .unwrap_or_default()
}

impl ArmError {
    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Throttled { .. } => "throttled",
            Self::MachineNotFound { .. } => "not_found",
            Self::IdentitiesRejected { .. } => "identity_rejected",
            Self::Unauthorized { .. } => "unauthorized",
            Self::Conflict { .. } | Self::Modified { .. } => "conflict",
            Self::Transient { .. } => "transient",
            Self::Other { .. } => "error",
        }
    }

    /// The wait ARM asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. }
            | Self::Conflict { retry_after, .. }
            | Self::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The identities of which `message` names the ID, among `sent`; ARM names them in its text only.
pub fn named_in(message: &str, sent: &[String]) -> Vec<String> {
    let haystack = message.to_ascii_lowercase();
    sent.iter()
        .filter(|id| {
            let needle = fold(id);
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

/// Reading and changing the identities of VMs and scale sets.
pub trait ComputeApi: Send + Sync {
    /// The identities the machine holds now.
    fn get(&self, machine: &Machine) -> BoxFuture<'_, Result<Observed, ArmError>>;

    /// Applies `delta` (at most [`MAX_IDENTITIES_PER_REQUEST`] entries) and waits until ARM has finished
    /// applying it; returns the machine as it is afterwards. With `if_match`, ARM refuses the change
    /// (as [`ArmError::Modified`]) when the machine changed since that entity tag was read.
    fn patch<'a>(
        &'a self,
        machine: &'a Machine,
        delta: &'a Delta,
        if_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Observed, ArmError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    #[test]
    fn chunks_hold_at_most_the_limit_with_additions_first() {
        let delta = Delta {
            add: ids("a", 200),
            remove: ids("r", 120),
            keep_system_assigned: true,
            users_before: 120,
        };
        let chunks = delta.chunks(MAX_IDENTITIES_PER_REQUEST);
        assert_eq!(chunks.len(), 3);
        assert_eq!((chunks[0].add.len(), chunks[0].remove.len()), (150, 0));
        assert_eq!((chunks[1].add.len(), chunks[1].remove.len()), (50, 100));
        assert_eq!((chunks[2].add.len(), chunks[2].remove.len()), (0, 20));
        assert!(chunks.iter().all(|c| c.keep_system_assigned));
        assert_eq!(
            chunks.iter().map(|c| c.users_before).collect::<Vec<_>>(),
            vec![120, 270, 220]
        );
        assert_eq!(chunks[2].users_after(), 200);
        let total: usize = chunks.iter().map(|c| c.add.len() + c.remove.len()).sum();
        assert_eq!(total, 320);
    }

    #[test]
    fn an_empty_delta_needs_no_request() {
        assert!(Delta::default().chunks(150).is_empty());
        assert!(Delta::default().is_empty());
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
}
