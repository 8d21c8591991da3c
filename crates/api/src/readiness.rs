//! Names that gate readiness on identities: the pod condition the agent sets once a pod's identities
//! work on its node, and the node taint the agent removes once it intercepts.
//!
//! Both follow Kubernetes' conventions: a condition type is a CamelCase word (`Ready`,
//! `ContainersReady`), named in a pod's `spec.readinessGates` so that the pod counts as Ready only once
//! the condition is `True` (KEP-580, "Pod Ready++"); a taint key is a qualified name in the product's
//! domain, as `node.cloudprovider.kubernetes.io/uninitialized` (removed by the cloud controller manager
//! once it has initialised the node) or `node.cilium.io/agent-not-ready` (removed by Cilium's agent
//! once it manages the node's networking).

/// Pod condition type that is `True` once every identity bound to the pod is usable on its node and the
/// agent there has fetched a token for each.
pub const IDENTITY_READY_CONDITION: &str = "IdentityReady";

/// `NoSchedule` taint key a node is registered with (kubelet `--register-with-taints`, a node pool's
/// taints) and that the agent removes from its own node once its interception rules are installed and
/// its watches synced; the agent's DaemonSet tolerates it.
pub const AGENT_NOT_READY_TAINT: &str = "pod-identity.azure.com/agent-not-ready";
