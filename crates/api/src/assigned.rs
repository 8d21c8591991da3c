//! `AzureAssignedIdentity`: the record that one pod has been given one identity on one node.
//!
//! The controller writes one per (pod, identity) and the agent reads them to decide what a caller may
//! use. The spec embeds full copies of the identity and the binding, as the original did, so an agent
//! can serve a pod without looking the identity up again and so objects left by aad-pod-identity 1.8
//! read back unchanged.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::{AzureIdentityBindingSpec, AzureIdentityBindingStatus, AzureIdentitySpec, AzureIdentityStatus};

/// Which pod has been given which identity on which node (fields as in aad-pod-identity 1.8).
// Each printer column repeats `type_ = ...`, which the lint takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureAssignedIdentity",
    namespaced,
    status = "AzureAssignedIdentityStatus",
    annotation("api-approved.kubernetes.io", "unapproved"),
    doc = "Records that a pod has been given an AzureIdentity on its node; written by the controller, read by the node agent.",
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.pod"),
    printcolumn(name = "PodNamespace", type_ = "string", json_path = ".spec.podNamespace"),
    printcolumn(
        name = "Identity",
        type_ = "string",
        json_path = ".spec.azureIdentityRef.metadata.name"
    ),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodename"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
pub struct AzureAssignedIdentitySpec {
    /// Copy of the AzureIdentity at the time of assignment.
    #[serde(rename = "azureIdentityRef", default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-embedded-resource" = true))]
    pub azure_identity_ref: Option<EmbeddedAzureIdentity>,

    /// Copy of the AzureIdentityBinding that matched the pod.
    #[serde(rename = "azureBindingRef", default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-embedded-resource" = true))]
    pub azure_binding_ref: Option<EmbeddedAzureIdentityBinding>,

    /// Name of the pod.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,

    /// Namespace of the pod.
    #[serde(rename = "podNamespace", default, skip_serializing_if = "String::is_empty")]
    pub pod_namespace: String,

    /// Node the pod runs on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nodename: String,

    /// Unused; kept as aad-pod-identity defined it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}

/// Status of an AzureAssignedIdentity.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct AzureAssignedIdentityStatus {
    /// Created (being added to the node's VM or scale set), Assigned (usable) or Unassigned (being removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,

    /// Unused; kept as aad-pod-identity defined it.
    #[serde(
        rename = "availableReplicas",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub available_replicas: Option<i32>,
}

/// An AzureIdentity embedded in an assignment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct EmbeddedAzureIdentity {
    /// Always `aadpodidentity.k8s.io/v1`.
    #[serde(rename = "apiVersion", default)]
    pub api_version: String,
    /// Always `AzureIdentity`.
    #[serde(default)]
    pub kind: String,
    /// Metadata of the identity (name, namespace, uid, resourceVersion...).
    #[serde(default)]
    #[schemars(schema_with = "object_schema")]
    pub metadata: ObjectMeta,
    /// Spec of the identity.
    #[serde(default)]
    pub spec: AzureIdentitySpec,
    /// Status of the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AzureIdentityStatus>,
}

/// An AzureIdentityBinding embedded in an assignment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct EmbeddedAzureIdentityBinding {
    /// Always `aadpodidentity.k8s.io/v1`.
    #[serde(rename = "apiVersion", default)]
    pub api_version: String,
    /// Always `AzureIdentityBinding`.
    #[serde(default)]
    pub kind: String,
    /// Metadata of the binding.
    #[serde(default)]
    #[schemars(schema_with = "object_schema")]
    pub metadata: ObjectMeta,
    /// Spec of the binding.
    #[serde(default)]
    pub spec: AzureIdentityBindingSpec,
    /// Status of the binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AzureIdentityBindingStatus>,
}

/// Embedded metadata is validated and pruned by the API server as `ObjectMeta`; a structural schema
/// may only say that it is an object.
fn object_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "object" })
}

/// Where an assignment stands. The wire value stays a free string so that objects carrying a value
/// this version does not know still decode.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AssignmentStatus {
    /// Recorded; the identity is being added to the node's VM or scale set.
    Created,
    /// The identity is on the node's VM or scale set; the pod can get tokens.
    Assigned,
    /// The identity has been removed from the VM or scale set; the record is about to be deleted.
    Unassigned,
    /// No status: written by a version of the original before states existed, treated as assigned.
    Legacy,
    /// A value this version does not know.
    Unknown(String),
}

impl AssignmentStatus {
    /// Reads the wire value.
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            None | Some("") => Self::Legacy,
            Some("Created") => Self::Created,
            Some("Assigned") => Self::Assigned,
            Some("Unassigned") => Self::Unassigned,
            Some(other) => Self::Unknown(other.to_owned()),
        }
    }

    /// The wire value.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Created => "Created",
            Self::Assigned => "Assigned",
            Self::Unassigned => "Unassigned",
            Self::Legacy => "",
            Self::Unknown(other) => other,
        }
    }

    /// Whether a pod may get tokens for this assignment: assigned, or legacy (which the original
    /// treated as assigned).
    pub fn is_usable(&self) -> bool {
        matches!(self, Self::Assigned | Self::Legacy)
    }
}

impl AzureAssignedIdentity {
    /// The typed status of this assignment.
    pub fn assignment_status(&self) -> AssignmentStatus {
        AssignmentStatus::parse(self.status.as_ref().and_then(|s| s.status.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_round_trip() {
        for status in [
            AssignmentStatus::Created,
            AssignmentStatus::Assigned,
            AssignmentStatus::Unassigned,
        ] {
            assert_eq!(AssignmentStatus::parse(Some(status.as_str())), status);
        }
    }

    #[test]
    fn missing_or_empty_status_is_legacy_and_usable() {
        assert_eq!(AssignmentStatus::parse(None), AssignmentStatus::Legacy);
        assert_eq!(AssignmentStatus::parse(Some("")), AssignmentStatus::Legacy);
        assert!(AssignmentStatus::Legacy.is_usable());
        assert!(!AssignmentStatus::Created.is_usable());
        assert!(!AssignmentStatus::Unassigned.is_usable());
    }

    #[test]
    fn unknown_status_is_kept_and_not_usable() {
        let status = AssignmentStatus::parse(Some("Pending"));
        assert_eq!(status, AssignmentStatus::Unknown("Pending".into()));
        assert_eq!(status.as_str(), "Pending");
        assert!(!status.is_usable());
    }
}
