//! The controller's whole view of Azure: read the identities of a VM or scale set, and change them by a
//! delta. Everything above this trait is tested without I/O against an in-memory implementation; the real
//! one is in [`crate::azure`].

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use pod_identity_azure::{AzureError, IdentityDelta, Machine, resource_id::fold};

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
    /// A machine ARM says does not exist ([`AzureError::ResourceNotFound`]): deleted, or never there.
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

/// Reading and changing the identities of VMs and scale sets. Failures are the Azure model's
/// [`AzureError`] kinds, which the worker acts on.
pub trait ComputeApi: Send + Sync {
    /// The identities the machine holds now.
    fn get(&self, machine: &Machine) -> BoxFuture<'_, Result<Observed, AzureError>>;

    /// Applies `delta` (one of [`IdentityDelta::requests`], so at most
    /// [`pod_identity_azure::MAX_IDENTITIES_PER_REQUEST`] entries) and waits until ARM has finished
    /// applying it; returns the machine as it is afterwards. With `if_match`, ARM refuses the change
    /// (as [`AzureError::Conflict`] with status 412) when the machine changed since that entity tag was
    /// read.
    fn patch<'a>(
        &'a self,
        machine: &'a Machine,
        delta: &'a IdentityDelta,
        if_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Observed, AzureError>>;
}
