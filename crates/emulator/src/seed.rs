//! The seed file: everything the emulated tenant holds at start. The same shape is what the admin API returns
//! for the current state and accepts to replace it, so a test can read, edit and write back one document.
//! JSON, or YAML when the file name ends in `.yaml`/`.yml`.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Seed {
    pub tenants: Vec<TenantSeed>,
    pub subscriptions: Vec<SubscriptionSeed>,
    /// Who may do what where. ARM and RBAC-mode vaults grant nothing that no assignment names.
    pub role_assignments: Vec<RoleAssignmentSeed>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TenantSeed {
    pub id: String,
    /// App registrations with their service principals, for the client-credentials flow.
    pub applications: Vec<ApplicationSeed>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ApplicationSeed {
    pub display_name: String,
    pub client_id: String,
    /// The service principal's object ID (the `oid` of its tokens).
    pub object_id: String,
    pub secrets: Vec<String>,
    /// PEM certificates whose keys may sign client assertions.
    pub certificates: Vec<String>,
    /// External identities (issuer, subject, audience) whose tokens Entra accepts as client assertions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub federated_identity_credentials: Vec<FederatedCredentialSeed>,
}

/// A federated identity credential: Entra accepts a token from `issuer` about `subject` with one of
/// `audiences` as proof of the identity it is on. The rules (name, 20 per identity, unique issuer and
/// subject, exactly one audience) are ARM's; see `federated_credentials`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FederatedCredentialSeed {
    /// 3 to 120 characters: letters, digits, `-` and `_`, the first a letter or digit.
    pub name: String,
    pub issuer: String,
    pub subject: String,
    /// Exactly one, usually `api://AzureADTokenExchange`.
    pub audiences: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SubscriptionSeed {
    pub id: String,
    pub tenant_id: String,
    pub display_name: String,
    pub resource_groups: Vec<ResourceGroupSeed>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ResourceGroupSeed {
    pub name: String,
    pub location: String,
    pub user_assigned_identities: Vec<UserAssignedIdentitySeed>,
    pub virtual_machine_scale_sets: Vec<ScaleSetSeed>,
    pub virtual_machines: Vec<VirtualMachineSeed>,
    pub key_vaults: Vec<KeyVaultSeed>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct UserAssignedIdentitySeed {
    pub name: String,
    pub client_id: String,
    pub principal_id: String,
    /// Defaults to the resource group's location.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub federated_identity_credentials: Vec<FederatedCredentialSeed>,
}

/// The identities a VM or scale set has.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct IdentitySeed {
    /// The system-assigned identity, when enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_assigned: Option<SystemIdentitySeed>,
    /// Full resource IDs of assigned user-assigned identities.
    pub user_assigned_identities: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SystemIdentitySeed {
    /// Generated when empty.
    pub principal_id: String,
    /// The application ID of the system identity (the `appid` of its tokens); generated when empty.
    pub client_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ScaleSetSeed {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    pub vm_size: String,
    pub identity: IdentitySeed,
    pub instances: Vec<InstanceSeed>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct InstanceSeed {
    pub instance_id: String,
    /// The computer name (`<scale set>_<instance id>` when empty).
    pub name: String,
    pub private_ip_address: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct VirtualMachineSeed {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    pub vm_size: String,
    pub identity: IdentitySeed,
    pub private_ip_address: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct KeyVaultSeed {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Authorise with role assignments ("Key Vault Secrets User" and up) instead of access policies.
    pub enable_rbac_authorization: bool,
    pub secrets: Vec<SecretSeed>,
    pub access_policies: Vec<AccessPolicySeed>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SecretSeed {
    pub name: String,
    pub value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// 32 hex digits; generated when empty. Listing a secret twice gives it two versions, the last current.
    pub version: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct AccessPolicySeed {
    /// Defaults to the vault's tenant.
    pub tenant_id: String,
    pub object_id: String,
    pub permissions: PermissionsSeed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct PermissionsSeed {
    pub secrets: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RoleAssignmentSeed {
    /// Object ID of a service principal or managed identity.
    pub principal_id: String,
    /// A subscription, resource group or resource ID; covers everything below it.
    pub scope: String,
    /// `Owner`, `Contributor`, `Reader`, `Virtual Machine Contributor`, `Managed Identity Operator`,
    /// `Key Vault Secrets User`, `Key Vault Secrets Officer` or `Key Vault Administrator`.
    pub role_definition_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot read seed file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("seed file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("seed is inconsistent: {0}")]
    Invalid(String),
}

impl Seed {
    pub fn from_file(path: &Path) -> Result<Self, SeedError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SeedError::Read {
            path: shown.clone(),
            source,
        })?;
        let yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        Self::from_text(&text, yaml).map_err(|message| SeedError::Parse { path: shown, message })
    }

    pub fn from_text(text: &str, yaml: bool) -> Result<Self, String> {
        if yaml {
            serde_saphyr::from_str(text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str(text).map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_seeds_read_the_same() {
        let json = r#"{"subscriptions":[{"id":"s","tenantId":"t","resourceGroups":[{"name":"rg","location":"westeurope",
            "virtualMachineScaleSets":[{"name":"ss","instances":[{"instanceId":"0"}]}]}]}]}"#;
        let yaml = "subscriptions:\n- id: s\n  tenantId: t\n  resourceGroups:\n  - name: rg\n    location: westeurope\n    virtualMachineScaleSets:\n    - name: ss\n      instances:\n      - instanceId: '0'\n";
        assert_eq!(
            Seed::from_text(json, false).unwrap(),
            Seed::from_text(yaml, true).unwrap()
        );
    }

    #[test]
    fn unknown_fields_are_refused_so_typos_do_not_pass_silently() {
        let err = Seed::from_text(r#"{"subscription":[]}"#, false).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }
}
