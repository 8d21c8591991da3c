//! Where the assignments of one worker live: a [`Machine`] (a VM or scale set, the Azure model's, read from
//! the node's `spec.providerID`) or no Azure machine at all.

use std::fmt;

use pod_identity_azure::Machine;

/// Where the assignments of one worker live.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A VM or scale set: user-assigned identities are added to it through ARM.
    Azure(Machine),
    /// No Azure machine: service-principal identities (types 1 and 2), which never touch ARM, and records
    /// whose machine cannot be known any more (their node is gone), which are dropped without an ARM call.
    NoAzure,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Azure(machine) => machine.fmt(f),
            Self::NoAzure => f.write_str("no-azure"),
        }
    }
}
