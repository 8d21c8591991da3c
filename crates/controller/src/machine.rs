//! Which Azure machine holds a node's identities, read from the node's `spec.providerID`.
//!
//! Identities given to a scale set apply to all of its instances, so every node of one scale set maps to
//! one [`Machine`]; a standalone VM (or a flexible scale-set instance, which ARM models as a VM) is its
//! own machine. The resource group comes from the ID itself, so nodes in any resource group work (the
//! original assumed every VM lived in the group of `azure.json`).

use std::fmt;

/// Whether identities live on a scale set or on a single VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MachineKind {
    /// `Microsoft.Compute/virtualMachineScaleSets`.
    ScaleSet,
    /// `Microsoft.Compute/virtualMachines`.
    VirtualMachine,
}

impl MachineKind {
    /// The ARM resource type segment.
    pub fn arm_type(self) -> &'static str {
        match self {
            Self::ScaleSet => "virtualMachineScaleSets",
            Self::VirtualMachine => "virtualMachines",
        }
    }

    /// A short name for metric labels and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::ScaleSet => "vmss",
            Self::VirtualMachine => "vm",
        }
    }
}

/// A VM or scale set whose identities the controller manages.
///
/// Equality and ordering ignore case, because ARM does: two nodes whose provider IDs spell the resource
/// group differently are still on the same scale set.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Scale set or VM.
    pub kind: MachineKind,
    /// Subscription ID.
    pub subscription: String,
    /// Resource group, as spelled in the first ID seen.
    pub resource_group: String,
    /// Name of the scale set or VM.
    pub name: String,
}

impl Machine {
    /// The full ARM ID: `/subscriptions/<s>/resourceGroups/<g>/providers/Microsoft.Compute/<type>/<name>`.
    pub fn arm_id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/{}/{}",
            self.subscription,
            self.resource_group,
            self.kind.arm_type(),
            self.name
        )
    }

    /// The case-folded ARM ID; the key under which everything about this machine is kept.
    pub fn key(&self) -> String {
        self.arm_id().to_ascii_lowercase()
    }

    /// Parses the ARM ID of a VM or scale set (as written in our annotations).
    pub fn from_arm_id(id: &str) -> Option<Self> {
        let parts: Vec<&str> = id.trim_end_matches('/').split('/').collect();
        let [
            "",
            subscriptions,
            subscription,
            groups,
            resource_group,
            providers,
            namespace,
            kind,
            name,
        ] = parts.as_slice()
        else {
            return None;
        };
        let fixed = [
            (subscriptions, "subscriptions"),
            (groups, "resourcegroups"),
            (providers, "providers"),
            (namespace, "microsoft.compute"),
        ];
        if !fixed.iter().all(|(got, want)| got.eq_ignore_ascii_case(want)) {
            return None;
        }
        let kind = if kind.eq_ignore_ascii_case("virtualMachineScaleSets") {
            MachineKind::ScaleSet
        } else if kind.eq_ignore_ascii_case("virtualMachines") {
            MachineKind::VirtualMachine
        } else {
            return None;
        };
        if [subscription, resource_group, name].iter().any(|v| v.is_empty()) {
            return None;
        }
        Some(Self {
            kind,
            subscription: (*subscription).to_owned(),
            resource_group: (*resource_group).to_owned(),
            name: (*name).to_owned(),
        })
    }

    /// The machine of a node from its provider ID, `azure:///subscriptions/.../virtualMachineScaleSets/<ss>/virtualMachines/<n>`
    /// for a scale-set instance or `azure:///subscriptions/.../virtualMachines/<vm>` for a VM.
    pub fn from_provider_id(provider_id: &str) -> Option<Self> {
        let (scheme, rest) = provider_id.split_once("://")?;
        if !scheme.eq_ignore_ascii_case("azure") {
            return None;
        }
        let path = rest.trim_end_matches('/');
        let parts: Vec<&str> = path.split('/').collect();
        match parts.len() {
            // "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm"
            9 => Self::from_arm_id(path),
            // ".../virtualMachineScaleSets/ss/virtualMachines/0": the scale set holds the identities.
            11 if parts[9].eq_ignore_ascii_case("virtualMachines") && !parts[10].is_empty() => {
                let machine = Self::from_arm_id(&parts[..9].join("/"))?;
                (machine.kind == MachineKind::ScaleSet).then_some(machine)
            }
            _ => None,
        }
    }
}

impl PartialEq for Machine {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Machine {}

impl std::hash::Hash for Machine {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialOrd for Machine {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Machine {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind.label(), self.resource_group, self.name)
    }
}

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

/// The case-folded form of an ARM ID, for comparisons (ARM compares IDs case-insensitively).
pub fn fold(id: &str) -> String {
    id.trim_end_matches('/').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_set_instances_map_to_their_scale_set_in_any_resource_group() {
        let a = Machine::from_provider_id(
            "azure:///subscriptions/s1/resourceGroups/MC_rg_aks/providers/Microsoft.Compute/virtualMachineScaleSets/pool1/virtualMachines/0",
        )
        .unwrap();
        let b = Machine::from_provider_id(
            "azure:///subscriptions/s1/resourcegroups/mc_rg_aks/providers/microsoft.compute/virtualmachinescalesets/POOL1/virtualMachines/7",
        )
        .unwrap();
        assert_eq!(a.kind, MachineKind::ScaleSet);
        assert_eq!(a, b, "same scale set regardless of case and instance");
        assert_eq!(
            a.arm_id(),
            "/subscriptions/s1/resourceGroups/MC_rg_aks/providers/Microsoft.Compute/virtualMachineScaleSets/pool1"
        );
        let other_group = Machine::from_provider_id(
            "azure:///subscriptions/s1/resourceGroups/other/providers/Microsoft.Compute/virtualMachineScaleSets/pool1/virtualMachines/0",
        )
        .unwrap();
        assert_ne!(a, other_group);
    }

    #[test]
    fn vms_are_their_own_machine() {
        let vm = Machine::from_provider_id(
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/node-1",
        )
        .unwrap();
        assert_eq!(vm.kind, MachineKind::VirtualMachine);
        assert_eq!(vm.name, "node-1");
        assert_eq!(Machine::from_arm_id(&vm.arm_id()), Some(vm));
    }

    #[test]
    fn other_providers_and_malformed_ids_have_no_machine() {
        for id in [
            "",
            "kind://docker/node",
            "aws:///us-east-1a/i-0123",
            "azure:///subscriptions/s/resourceGroups/rg",
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v",
            "azure:///subscriptions//resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm/extra/x",
        ] {
            assert_eq!(Machine::from_provider_id(id), None, "{id}");
        }
    }
}
