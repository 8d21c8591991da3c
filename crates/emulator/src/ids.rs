//! ARM resource IDs. ARM compares IDs case-insensitively (clients send `resourcegroups` as often as
//! `resourceGroups`), so every lookup goes through [`ResourceId::key`], while the spelling a client used is
//! kept for echoing back.

use std::fmt;

/// The resource types the emulator models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceType {
    VirtualMachine,
    VirtualMachineScaleSet,
    /// One instance of a scale set: `.../virtualMachineScaleSets/{ss}/virtualMachines/{instanceId}`.
    ScaleSetInstance,
    UserAssignedIdentity,
    KeyVault,
}

impl ResourceType {
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceId {
    pub subscription: String,
    pub resource_group: String,
    pub kind: ResourceType,
    pub name: String,
    /// The instance ID for [`ResourceType::ScaleSetInstance`].
    pub child: Option<String>,
}

impl ResourceId {
    pub fn new(subscription: &str, resource_group: &str, kind: ResourceType, name: &str) -> Self {
        Self {
            subscription: subscription.to_owned(),
            resource_group: resource_group.to_owned(),
            kind,
            name: name.to_owned(),
            child: None,
        }
    }

    /// Parses an ID such as `/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm`,
    /// with literal segments matched case-insensitively. `None` for anything else.
    pub fn parse(id: &str) -> Option<Self> {
        let segs: Vec<&str> = id.trim_end_matches('/').split('/').collect();
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
        let (ns, ty, name) = (segs[6], segs[7], segs[8]);
        let kind = match segs.len() {
            9 if eq(ns, "Microsoft.Compute") && eq(ty, "virtualMachines") => ResourceType::VirtualMachine,
            9 if eq(ns, "Microsoft.Compute") && eq(ty, "virtualMachineScaleSets") => {
                ResourceType::VirtualMachineScaleSet
            }
            9 if eq(ns, "Microsoft.ManagedIdentity") && eq(ty, "userAssignedIdentities") => {
                ResourceType::UserAssignedIdentity
            }
            9 if eq(ns, "Microsoft.KeyVault") && eq(ty, "vaults") => ResourceType::KeyVault,
            11 if eq(ns, "Microsoft.Compute")
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

    /// The case-folded form every map in the emulator is keyed by.
    pub fn key(&self) -> String {
        self.to_string().to_ascii_lowercase()
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "/subscriptions/{}/resourceGroups/{}/providers/{}/{}",
            self.subscription,
            self.resource_group,
            match self.kind {
                ResourceType::ScaleSetInstance => "Microsoft.Compute/virtualMachineScaleSets",
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

/// Case-folds any ID-like string for comparison.
pub fn fold(id: &str) -> String {
    id.trim_end_matches('/').to_ascii_lowercase()
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
    fn rejects_other_shapes() {
        for bad in [
            "",
            "/subscriptions/s",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v",
            "/subscriptions//resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
            "subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm/extra",
        ] {
            assert_eq!(ResourceId::parse(bad), None, "{bad}");
        }
    }
}
