//! The pod readiness gate of pod identity.

/// Type of the pod condition (and of the `readinessGates` entry that waits for it) that turns true
/// once every identity the pod is bound to is assigned on its machine and the node agent holds a
/// token for each, so that a Service sends no traffic to a pod that cannot authenticate yet.
pub const IDENTITY_READY_CONDITION: &str = "IdentityReady";
