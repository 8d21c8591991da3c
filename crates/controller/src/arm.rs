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

    /// How far ARM has applied the model this read returned; see [`Settlement`].
    pub fn settlement(&self) -> Settlement {
        Settlement::of(self.provisioning_state.as_deref())
    }
}

/// How far ARM has applied a machine's model, from its `properties.provisioningState`. ARM's GET returns
/// the model, which lists a change as soon as it is accepted; the instances (and IMDS on them) have it
/// only once the operation ends `Succeeded`, 40-60 s later for a scale set (aad-pod-identity's best
/// practices). The terminal states are `Succeeded`, `Failed` and `Canceled`, and no state at all means
/// success (azure-core's ARM polling; ARM's async-operations guidance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// `Succeeded`, or no state: the model is what the instances run.
    Applied,
    /// A change is being applied (`Updating`, `Creating`, `Migrating`...): identities the model lists may
    /// not be on the instances yet, and identities it no longer lists may still be.
    Applying,
    /// The last change ended `Failed` or `Canceled`: the model lists what the instances may not have
    /// (and lacks what they may still have).
    Unapplied,
}

impl Settlement {
    /// The settlement a `provisioningState` (any case) says.
    pub fn of(state: Option<&str>) -> Self {
        match state {
            None => Self::Applied,
            Some(s) if s.eq_ignore_ascii_case("Succeeded") => Self::Applied,
            Some(s) if s.eq_ignore_ascii_case("Failed") || s.eq_ignore_ascii_case("Canceled") => {
                Self::Unapplied
            }
            Some(_) => Self::Applying,
        }
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
