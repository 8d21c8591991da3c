//! Resource types of the `aadpodidentity.k8s.io/v1` API and the pure rules built on them.
//!
//! The four kinds keep the exact wire shape of aad-pod-identity 1.8 (field names such as `resourceID`,
//! `clientID` and the all-lowercase `nodename`), so manifests written for it apply unchanged and objects
//! it left in a cluster are read as they are. Wire structs are deliberately lenient: a field that holds
//! an unexpected value must not make a whole list or watch fail to decode. The typed views and
//! [`validation`] turn such values into errors that name the field and say what is wrong.
//!
//! [`matching`] decides which pod gets which identity; it is plain data in, plain data out, and is
//! shared by the controller (what to assign), the agent (what a caller may use) and the CLI (explain).
//! [`pod`] holds the one rule of a pod's life (from its first container start to the end of its grace
//! period) and of which pod an address belongs to; [`answer`] is what the node agent answers a pod, so
//! that the CLI explains exactly what the agent does. [`federation`] says which backend serves an identity
//! (the node's VM or scale set, or workload identity federation) and names what federation uses.

pub mod answer;
pub mod assigned;
pub mod binding;
pub mod crds;
pub mod exception;
pub mod federation;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod identity;
pub mod matching;
pub mod naming;
pub use naming::ObjectKey;
pub mod pod;
pub mod readiness;
pub mod text;
pub mod validation;

pub use assigned::{
    AssignmentStatus, AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureAssignedIdentityStatus,
    EmbeddedAzureIdentity, EmbeddedAzureIdentityBinding,
};
pub use binding::{AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentityBindingStatus};
pub use exception::{
    AzurePodIdentityException, AzurePodIdentityExceptionSpec, AzurePodIdentityExceptionStatus,
};
pub use identity::{AzureIdentity, AzureIdentitySpec, AzureIdentityStatus, IdentityType, SecretReference};

/// The API group shared by all kinds; it ends in `.k8s.io`, hence the approval annotation on the CRDs.
pub const GROUP: &str = "aadpodidentity.k8s.io";
/// The only served and stored version.
pub const VERSION: &str = "v1";
/// Pods opt in to an identity with this label; its value is compared with a binding's `selector`.
pub const POD_LABEL: &str = "aadpodidbinding";
/// Label on every AzureAssignedIdentity naming the node of its pod, so agents watch only their node.
pub const NODENAME_LABEL: &str = "nodename";
/// Finalizer that keeps an AzureAssignedIdentity until its identity left the VM or scale set.
pub const ASSIGNED_IDENTITY_FINALIZER: &str = "azureassignedidentity.finalizers.aadpodidentity.k8s.io";
/// Per-identity annotation of the original that makes one identity namespaced even when the
/// installation allows cross-namespace matching.
pub const BEHAVIOR_ANNOTATION: &str = "aadpodidentity.k8s.io/Behavior";
/// The value of [`BEHAVIOR_ANNOTATION`] that asks for namespaced matching.
pub const BEHAVIOR_NAMESPACED: &str = "namespaced";
