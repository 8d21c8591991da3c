//! Names that gate readiness on identities: the pod condition the agent sets once a pod's identities
//! work on its node, and the node taint the agent removes once it intercepts.
//!
//! Both follow Kubernetes' conventions: a condition type is a CamelCase word (`Ready`,
//! `ContainersReady`), named in a pod's `spec.readinessGates` so that the pod counts as Ready only once
//! the condition is `True` (KEP-580, "Pod Ready++"); a taint key is a qualified name in the product's
//! domain, as `node.cloudprovider.kubernetes.io/uninitialized` (removed by the cloud controller manager
//! once it has initialised the node) or `node.cilium.io/agent-not-ready` (removed by Cilium's agent
//! once it manages the node's networking).

use k8s_openapi::api::core::v1::Pod;

/// Pod condition type that is `True` once every identity bound to the pod is usable on its node and the
/// agent there has fetched a token for each.
pub const IDENTITY_READY_CONDITION: &str = "IdentityReady";

/// `NoSchedule` taint key a node is registered with (kubelet `--register-with-taints`, a node pool's
/// taints) and that the agent removes from its own node once its interception rules are installed and
/// its watches synced; the agent's DaemonSet tolerates it.
pub const AGENT_NOT_READY_TAINT: &str = "pod-identity.azure.com/agent-not-ready";

/// Longest `IdentityReady` message written, in bytes (refusals quote selectors and binding names).
pub const MAX_CONDITION_MESSAGE_BYTES: usize = 1024;

/// What a pod object says of its `IdentityReady` gate: whether it asks for the condition, and the
/// condition's value as its status has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodGate {
    /// `spec.readinessGates` names [`IDENTITY_READY_CONDITION`].
    pub gated: bool,
    /// The condition as the pod's status has it.
    pub condition: Option<Condition>,
}

impl PodGate {
    /// The gate of a pod object.
    pub fn of(pod: &Pod) -> Self {
        let gated = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.readiness_gates.as_ref())
            .is_some_and(|gates| gates.iter().any(|g| g.condition_type == IDENTITY_READY_CONDITION));
        let condition = pod
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .and_then(|conditions| conditions.iter().find(|c| c.type_ == IDENTITY_READY_CONDITION))
            .map(|c| Condition {
                status: c.status == "True",
                reason: c.reason.clone().unwrap_or_default(),
                message: c.message.clone().unwrap_or_default(),
            });
        Self { gated, condition }
    }
}

/// A value of the `IdentityReady` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// `True` or `False`.
    pub status: bool,
    /// A CamelCase word.
    pub reason: String,
    /// For people.
    pub message: String,
}

impl Condition {
    /// A value to write, its message cut to [`MAX_CONDITION_MESSAGE_BYTES`] on a character boundary.
    pub fn new(status: bool, reason: &str, message: String) -> Self {
        Self {
            status,
            reason: reason.to_owned(),
            message: crate::text::truncate(&message, MAX_CONDITION_MESSAGE_BYTES).into_owned(),
        }
    }
}
