//! `AzureIdentity`: an Azure identity that pods of a namespace may be given.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{self, SpecError};

/// Which Azure identity this is and how its tokens are obtained (fields as in aad-pod-identity 1.8).
//
// The CEL rules reject at admission what the original silently ignored at run time (a `resourceID`
// that is not a user-assigned identity, a missing tenant for a service principal), each with a message
// that names the field. `AzureIdentitySpec::validate` applies the same checks to objects stored
// before these rules existed.
// Each printer column repeats `type_ = ...`, which the lint takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentity",
    namespaced,
    status = "AzureIdentityStatus",
    annotation("api-approved.kubernetes.io", "unapproved"),
    doc = "An Azure identity (a user-assigned managed identity or a service principal) that pods can be given through an AzureIdentityBinding in the same namespace.",
    printcolumn(
        name = "Type",
        type_ = "integer",
        json_path = ".spec.type",
        description = "0: user-assigned managed identity, 1: service principal with client secret, 2: service principal with client certificate"
    ),
    printcolumn(name = "ClientID", type_ = "string", json_path = ".spec.clientID"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!has(self.type) || self.type in [0, 1, 2]")
    .message("type must be 0 (user-assigned managed identity), 1 (service principal with client secret) or 2 (service principal with client certificate)")
    .field_path(".type"))]
#[x_kube(validation = Rule::new("(has(self.type) && self.type != 0) || (has(self.resourceID) && self.resourceID.matches('(?i)^/subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft[.]managedidentity/userassignedidentities/[^/]+$'))")
    .message("resourceID must be the ID of a user-assigned managed identity: /subscriptions/<subscription>/resourceGroups/<group>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>")
    .field_path(".resourceID"))]
#[x_kube(validation = Rule::new("has(self.clientID) && self.clientID.matches('^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$')")
    .message("clientID must be the client (application) ID of the identity, a GUID such as 2d9ac3c1-6b4a-4c7e-9b1d-0f4e5a6b7c8d")
    .field_path(".clientID"))]
#[x_kube(validation = Rule::new("!has(self.type) || self.type == 0 || (has(self.tenantID) && self.tenantID != '')")
    .message("tenantID is required for a service principal (type 1 or 2)")
    .field_path(".tenantID"))]
#[x_kube(validation = Rule::new("!has(self.type) || self.type == 0 || (has(self.clientPassword) && has(self.clientPassword.name) && self.clientPassword.name != '')")
    .message("clientPassword.name must name the Secret holding the service principal's credential (type 1 or 2)")
    .field_path(".clientPassword"))]
#[x_kube(validation = Rule::new("!has(self.adEndpoint) || self.adEndpoint == '' || self.adEndpoint.startsWith('https://')")
    .message("adEndpoint must be an https:// URL of an Entra ID authority, such as https://login.microsoftonline.com/")
    .field_path(".adEndpoint"))]
pub struct AzureIdentitySpec {
    /// 0: user-assigned managed identity; 1: service principal with a client secret; 2: service
    /// principal with a client certificate. Absent means 0.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<i64>,

    /// ARM ID of the user-assigned managed identity (type 0).
    #[serde(rename = "resourceID", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub resource_id: Option<String>,

    /// Client (application) ID of the identity; the agent asks the Instance Metadata Service for it.
    #[serde(rename = "clientID", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub client_id: Option<String>,

    /// Secret holding a service principal's credential: the client secret (type 1) or the keys
    /// `certificate` (PKCS#12) and `password` (type 2).
    #[serde(rename = "clientPassword", default, skip_serializing_if = "Option::is_none")]
    pub client_password: Option<SecretReference>,

    /// Tenant of a service principal (types 1 and 2).
    #[serde(rename = "tenantID", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub tenant_id: Option<String>,

    /// Further tenants a type 1 service principal gets tokens for; the answer is then a list of
    /// tokens, the primary tenant's first.
    #[serde(
        rename = "auxiliaryTenantIDs",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auxiliary_tenant_ids: Option<Vec<String>>,

    /// Entra ID authority for service principals; `https://login.microsoftonline.com/` when empty.
    #[serde(rename = "adEndpoint", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub ad_endpoint: Option<String>,

    /// Accepted for compatibility with aad-pod-identity manifests; it has no effect.
    #[serde(rename = "adResourceID", default, skip_serializing_if = "Option::is_none")]
    pub ad_resource_id: Option<String>,

    /// Accepted for compatibility with aad-pod-identity manifests; it has no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}

/// Status of an AzureIdentity, kept as aad-pod-identity defined it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct AzureIdentityStatus {
    /// Unused; kept as aad-pod-identity defined it.
    #[serde(
        rename = "availableReplicas",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub available_replicas: Option<i32>,
}

/// Reference to a Secret, as in core/v1 `SecretReference`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SecretReference {
    /// Name of the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Namespace of the Secret; the identity's own namespace when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// What kind of credential an `AzureIdentity` stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityType {
    /// A user-assigned managed identity, added to the node's VM or scale set and used through IMDS.
    UserAssignedManagedIdentity,
    /// A service principal with a client secret, used directly against Entra ID.
    ServicePrincipalSecret,
    /// A service principal with a client certificate, used directly against Entra ID.
    ServicePrincipalCertificate,
}

impl IdentityType {
    /// The integer the `type` field carries on the wire.
    pub fn wire_value(self) -> i64 {
        match self {
            Self::UserAssignedManagedIdentity => 0,
            Self::ServicePrincipalSecret => 1,
            Self::ServicePrincipalCertificate => 2,
        }
    }

    /// Whether identities of this type live on Azure machines (and so need ARM writes).
    pub fn is_managed_identity(self) -> bool {
        self == Self::UserAssignedManagedIdentity
    }
}

impl AzureIdentitySpec {
    /// The identity type; an absent `type` is 0, as the original read it.
    pub fn identity_type(&self) -> Result<IdentityType, SpecError> {
        match self.type_.unwrap_or(0) {
            0 => Ok(IdentityType::UserAssignedManagedIdentity),
            1 => Ok(IdentityType::ServicePrincipalSecret),
            2 => Ok(IdentityType::ServicePrincipalCertificate),
            other => Err(SpecError::new(
                "type",
                format!(
                    "type must be 0 (user-assigned managed identity), 1 (service principal with client secret) \
                     or 2 (service principal with client certificate), not {other}"
                ),
            )),
        }
    }

    /// Every problem of this spec; empty when the identity can be used.
    pub fn validate(&self) -> Vec<SpecError> {
        validation::identity_spec_errors(self)
    }
}
