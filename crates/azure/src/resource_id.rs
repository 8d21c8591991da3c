//! ARM resource IDs: `/subscriptions/{s}/resourceGroups/{g}/providers/{namespace}/{type}/{name}`, and for a
//! scale-set instance `.../virtualMachineScaleSets/{ss}/virtualMachines/{instanceId}`.
//!
//! ARM compares IDs case-insensitively (clients send `resourcegroups` as often as `resourceGroups`, and a
//! resource group's name in any case), so comparisons go through [`fold`] or [`ResourceId::key`], while
//! the spelling an ID was given in is kept for echoing back. The one parser of the workspace: the API
//! types validate `resourceID` with it, the controller reads node provider IDs with it (through
//! [`crate::Machine`]), the ARM client addresses resources with it and the emulator routes requests by it.

use std::fmt;

/// The resource types pod-identity and its emulator name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    /// `Microsoft.Compute/virtualMachines`.
    VirtualMachine,
    /// `Microsoft.Compute/virtualMachineScaleSets`.
    VirtualMachineScaleSet,
    /// One instance of a scale set: `.../virtualMachineScaleSets/{ss}/virtualMachines/{instanceId}`.
    ScaleSetInstance,
    /// `Microsoft.ManagedIdentity/userAssignedIdentities`.
    UserAssignedIdentity,
    /// `Microsoft.KeyVault/vaults`.
    KeyVault,
}

impl ResourceType {
    /// The ARM type, as ARM spells it in a resource's `type` field.
    pub fn arm_type(self) -> &'static str {
        match self {
            Self::VirtualMachine => "Microsoft.Compute/virtualMachines",
            Self::VirtualMachineScaleSet => "Microsoft.Compute/virtualMachineScaleSets",
            Self::ScaleSetInstance => "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
            Self::UserAssignedIdentity => "Microsoft.ManagedIdentity/userAssignedIdentities",
            Self::KeyVault => "Microsoft.KeyVault/vaults",
        }
    }
}

/// A parsed ARM resource ID of one of the [`ResourceType`]s.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceId {
    /// Subscription ID, as spelled.
    pub subscription: String,
    /// Resource group name, as spelled.
    pub resource_group: String,
    /// What kind of resource.
    pub kind: ResourceType,
    /// The resource's name (the scale set's, for an instance).
    pub name: String,
    /// The instance ID of a [`ResourceType::ScaleSetInstance`].
    pub child: Option<String>,
}

impl ResourceId {
    /// The ID of a resource of `kind` (not an instance).
    pub fn new(subscription: &str, resource_group: &str, kind: ResourceType, name: &str) -> Self {
        Self {
            subscription: subscription.to_owned(),
            resource_group: resource_group.to_owned(),
            kind,
            name: name.to_owned(),
            child: None,
        }
    }

    /// Parses an ID in ARM's canonical form: a leading `/`, no empty segment and no trailing `/` (the form
    /// of the CRD's `resourceID` rule; callers that accept a trailing slash trim it first), literal
    /// segments in any case. `None` for anything else, including resource types not in [`ResourceType`].
    pub fn parse(id: &str) -> Option<Self> {
        let segs: Vec<&str> = id.split('/').collect();
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        if segs.len() < 9
            || !segs[0].is_empty()
            || !eq(segs[1], "subscriptions")
            || !eq(segs[3], "resourceGroups")
            || !eq(segs[5], "providers")
            || segs.iter().skip(1).any(|s| s.is_empty())
        {
            return None;
        }
        let (namespace, ty, name) = (segs[6], segs[7], segs[8]);
        let kind = match segs.len() {
            9 if eq(namespace, "Microsoft.Compute") && eq(ty, "virtualMachines") => {
                ResourceType::VirtualMachine
            }
            9 if eq(namespace, "Microsoft.Compute") && eq(ty, "virtualMachineScaleSets") => {
                ResourceType::VirtualMachineScaleSet
            }
            9 if eq(namespace, "Microsoft.ManagedIdentity") && eq(ty, "userAssignedIdentities") => {
                ResourceType::UserAssignedIdentity
            }
            9 if eq(namespace, "Microsoft.KeyVault") && eq(ty, "vaults") => ResourceType::KeyVault,
            11 if eq(namespace, "Microsoft.Compute")
                && eq(ty, "virtualMachineScaleSets")
                && eq(segs[9], "virtualMachines") =>
            {
                ResourceType::ScaleSetInstance
            }
            _ => return None,
        };
        Some(Self {
            subscription: segs[2].to_owned(),
            resource_group: segs[4].to_owned(),
            kind,
            name: name.to_owned(),
            child: (segs.len() == 11).then(|| segs[10].to_owned()),
        })
    }

    /// Parses the ID of a user-assigned managed identity (the `resourceID` of an `AzureIdentity`).
    pub fn user_assigned_identity(id: &str) -> Option<Self> {
        Self::parse(id).filter(|r| r.kind == ResourceType::UserAssignedIdentity)
    }

    /// The scale set an instance belongs to; the resource itself otherwise.
    pub fn parent(&self) -> Self {
        match self.kind {
            ResourceType::ScaleSetInstance => Self {
                kind: ResourceType::VirtualMachineScaleSet,
                child: None,
                ..self.clone()
            },
            _ => self.clone(),
        }
    }

    /// The case-folded canonical form, the key under which a resource is compared and looked up.
    pub fn key(&self) -> String {
        self.to_string().to_ascii_lowercase()
    }
}

impl fmt::Display for ResourceId {
    /// The canonical spelling of the literal segments, with the values as given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "/subscriptions/{}/resourceGroups/{}/providers/{}/{}",
            self.subscription,
            self.resource_group,
            match self.kind {
                ResourceType::ScaleSetInstance => ResourceType::VirtualMachineScaleSet.arm_type(),
                k => k.arm_type(),
            },
            self.name
        )?;
        if let Some(child) = &self.child {
            write!(f, "/virtualMachines/{child}")?;
        }
        Ok(())
    }
}

/// The case-folded form of any ARM ID, without a trailing slash: what two spellings of one resource have
/// in common.
pub fn fold(id: &str) -> String {
    id.trim_end_matches('/').to_ascii_lowercase()
}

/// Whether two ARM IDs name the same resource (case-insensitively, with or without a trailing slash).
pub fn same(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_case_insensitively_and_keeps_spelling() {
        let id = ResourceId::parse(
            "/subscriptions/S1/resourcegroups/RG/providers/microsoft.compute/VIRTUALMACHINESCALESETS/ss",
        )
        .unwrap();
        assert_eq!(id.kind, ResourceType::VirtualMachineScaleSet);
        assert_eq!(id.resource_group, "RG");
        assert_eq!(
            id.key(),
            "/subscriptions/s1/resourcegroups/rg/providers/microsoft.compute/virtualmachinescalesets/ss"
        );
        assert_eq!(
            id.to_string(),
            "/subscriptions/S1/resourceGroups/RG/providers/Microsoft.Compute/virtualMachineScaleSets/ss"
        );
    }

    #[test]
    fn scale_set_instance_has_the_scale_set_as_parent() {
        let id = ResourceId::parse(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/3",
        )
        .unwrap();
        assert_eq!(id.kind, ResourceType::ScaleSetInstance);
        assert_eq!(id.child.as_deref(), Some("3"));
        assert_eq!(id.parent().kind, ResourceType::VirtualMachineScaleSet);
        assert_eq!(id.parent().child, None);
    }

    #[test]
    fn user_assigned_identities_in_any_case() {
        let id = ResourceId::user_assigned_identity(
            "/SUBSCRIPTIONS/S/RESOURCEGROUPS/RG/PROVIDERS/MICROSOFT.MANAGEDIDENTITY/USERASSIGNEDIDENTITIES/APP-ID",
        )
        .unwrap();
        assert_eq!((id.resource_group.as_str(), id.name.as_str()), ("RG", "APP-ID"));
        assert!(
            ResourceId::user_assigned_identity(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"
            )
            .is_none()
        );
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "",
            "/subscriptions/s",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v",
            "/subscriptions//resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
            "subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm/extra",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm/",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/",
        ] {
            assert_eq!(ResourceId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn spellings_of_one_resource_compare_equal() {
        let a = "/subscriptions/s/resourceGroups/RG/providers/Microsoft.Compute/virtualMachines/vm";
        assert!(same(a, &format!("{}/", a.to_lowercase())));
        assert_eq!(fold(a), fold(&a.to_uppercase()));
        assert!(!same(a, &format!("{a}2")));
    }
}
