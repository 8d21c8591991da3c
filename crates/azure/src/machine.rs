//! The VM or scale set that holds a node's identities: a [`Machine`].
//!
//! Identities given to a scale set apply to all of its instances, so every node of one scale set maps to
//! one machine; a standalone VM (or a flexible scale-set instance, which ARM models as a VM) is its own
//! machine. The resource group comes from the ID itself, so nodes in any resource group work (the
//! original assumed every VM lived in the group of `azure.json`).

use std::fmt;

use crate::resource_id::{ResourceId, ResourceType};

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

/// A VM or scale set: the ARM resource whose `identity` block holds user-assigned identities.
///
/// Equality, ordering and hashing ignore case, because ARM does: two nodes whose provider IDs spell the
/// resource group differently are still on the same scale set.
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
    /// A scale set.
    pub fn scale_set(subscription: &str, resource_group: &str, name: &str) -> Self {
        Self::new(MachineKind::ScaleSet, subscription, resource_group, name)
    }

    /// A VM.
    pub fn virtual_machine(subscription: &str, resource_group: &str, name: &str) -> Self {
        Self::new(MachineKind::VirtualMachine, subscription, resource_group, name)
    }

    fn new(kind: MachineKind, subscription: &str, resource_group: &str, name: &str) -> Self {
        Self {
            kind,
            subscription: subscription.to_owned(),
            resource_group: resource_group.to_owned(),
            name: name.to_owned(),
        }
    }

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

    /// The machine of a VM or scale-set resource ID (a trailing `/` is allowed); `None` for any other ID.
    pub fn from_arm_id(id: &str) -> Option<Self> {
        Self::from_resource_id(ResourceId::parse(id.trim_end_matches('/'))?)
    }

    /// The machine a resource ID names: a VM or scale set itself; `None` for any other resource.
    pub fn from_resource_id(id: ResourceId) -> Option<Self> {
        let kind = match id.kind {
            ResourceType::VirtualMachineScaleSet => MachineKind::ScaleSet,
            ResourceType::VirtualMachine => MachineKind::VirtualMachine,
            _ => return None,
        };
        Some(Self {
            kind,
            subscription: id.subscription,
            resource_group: id.resource_group,
            name: id.name,
        })
    }

    /// The machine of a node from its `spec.providerID`:
    /// `azure:///subscriptions/.../virtualMachineScaleSets/<ss>/virtualMachines/<n>` for a scale-set
    /// instance (the scale set holds the identities), `azure:///subscriptions/.../virtualMachines/<vm>` for
    /// a VM. `None` for other providers and other shapes.
    pub fn from_provider_id(provider_id: &str) -> Option<Self> {
        let (scheme, path) = provider_id.split_once("://")?;
        if !scheme.eq_ignore_ascii_case("azure") {
            return None;
        }
        let id = ResourceId::parse(path.trim_end_matches('/'))?;
        Self::from_resource_id(id.parent())
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
    /// `vmss/<group>/<name>` or `vm/<group>/<name>`: short, for logs and Events.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind.label(), self.resource_group, self.name)
    }
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
        assert_eq!(Machine::from_arm_id(&vm.arm_id()), Some(vm.clone()));
        assert_eq!(Machine::from_arm_id(&format!("{}/", vm.arm_id())), Some(vm));
    }

    #[test]
    fn scale_set_ids_parse_with_a_trailing_slash_in_any_case() {
        let ss = Machine::from_arm_id(
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/virtualMachineScaleSets/ss/",
        )
        .unwrap();
        assert_eq!(ss.kind, MachineKind::ScaleSet);
        assert!(!ss.arm_id().ends_with('/'));
        assert_eq!(ss, Machine::scale_set("s", "rg", "ss"));
        assert_eq!(
            Machine::from_arm_id("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/disks/d"),
            None
        );
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
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/i",
        ] {
            assert_eq!(Machine::from_provider_id(id), None, "{id}");
        }
    }
}
