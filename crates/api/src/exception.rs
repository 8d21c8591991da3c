//! `AzurePodIdentityException`: pods that talk to the Instance Metadata Service directly.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pods of this namespace that carry any one of podLabels (values compared case-insensitively) reach the
/// Instance Metadata Service directly (fields as in aad-pod-identity 1.8).
// Each printer column repeats `type_ = ...`, which the lint takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzurePodIdentityException",
    namespaced,
    status = "AzurePodIdentityExceptionStatus",
    annotation("api-approved.kubernetes.io", "unapproved"),
    doc = "Lets the pods of its namespace that carry any one of podLabels reach the Instance Metadata Service directly, with the node's identities.",
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.podLabels) && size(self.podLabels) > 0")
    .message("podLabels must list at least one label; a pod carrying any one of them is excepted")
    .field_path(".podLabels"))]
pub struct AzurePodIdentityExceptionSpec {
    /// Labels of which any one, present on a pod with an equal value, excepts that pod.
    #[serde(rename = "podLabels", default)]
    pub pod_labels: BTreeMap<String, String>,
}

/// Status of an AzurePodIdentityException, kept as aad-pod-identity defined it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct AzurePodIdentityExceptionStatus {
    /// Unused; kept as aad-pod-identity defined it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl AzurePodIdentityExceptionSpec {
    /// Whether a pod with these labels is excepted by this exception.
    pub fn excepts<'a>(&self, pod_labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> bool {
        pod_labels.into_iter().any(|(key, value)| {
            self.pod_labels
                .get(key)
                .is_some_and(|wanted| wanted.eq_ignore_ascii_case(value))
        })
    }
}
