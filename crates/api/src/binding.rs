//! `AzureIdentityBinding`: which pods (by label) may use which `AzureIdentity`.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{self, SpecError};

/// Which pods get which identity (fields as in aad-pod-identity 1.8). The selector is not a label
/// selector: it is compared exactly with the value of the pod label aadpodidbinding.
//
// The CEL rules reject a binding that could never match any pod.
// Each printer column repeats `type_ = ...`, which the lint takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentityBinding",
    namespaced,
    status = "AzureIdentityBindingStatus",
    annotation("api-approved.kubernetes.io", "unapproved"),
    doc = "Gives the pods whose label aadpodidbinding equals the selector the AzureIdentity named in azureIdentity.",
    printcolumn(name = "AzureIdentity", type_ = "string", json_path = ".spec.azureIdentity"),
    printcolumn(name = "Selector", type_ = "string", json_path = ".spec.selector"),
    printcolumn(name = "Weight", type_ = "integer", json_path = ".spec.weight", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.azureIdentity) && self.azureIdentity != ''")
    .message("azureIdentity must name an AzureIdentity in the binding's namespace")
    .field_path(".azureIdentity"))]
#[x_kube(validation = Rule::new("has(self.selector) && self.selector != ''")
    .message("selector must be set: pods use this binding by carrying the label aadpodidbinding=<selector>")
    .field_path(".selector"))]
#[x_kube(validation = Rule::new("!has(self.selector) || self.selector.matches('^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$')")
    .message("selector must be a valid label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit), because pods carry it as the label aadpodidbinding")
    .field_path(".selector"))]
pub struct AzureIdentityBindingSpec {
    /// Name of the `AzureIdentity`, in the binding's own namespace.
    #[serde(rename = "azureIdentity", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub azure_identity: Option<String>,

    /// Value of the pod label `aadpodidbinding` that selects pods, compared exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub selector: Option<String>,

    /// Among several identities of one pod, the one a request naming no identity gets: the highest
    /// weight wins (ties: binding namespace, then name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

/// Status of an AzureIdentityBinding, kept as aad-pod-identity defined it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct AzureIdentityBindingStatus {
    /// Unused; kept as aad-pod-identity defined it.
    #[serde(
        rename = "availableReplicas",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub available_replicas: Option<i32>,
}

impl AzureIdentityBindingSpec {
    /// Every problem of this spec; empty when the binding can match pods.
    pub fn validate(&self) -> Vec<SpecError> {
        validation::binding_spec_errors(self)
    }

    /// The weight used to order a pod's identities; absent is 0.
    pub fn effective_weight(&self) -> i64 {
        self.weight.unwrap_or(0)
    }
}
