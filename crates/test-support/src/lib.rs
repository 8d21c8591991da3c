//! What integration tests stand on: a real `kube-apiserver` backed by a real `etcd`, built from their Go
//! modules by `tools/build-control-plane.sh`, started once per test process on loopback, and torn down
//! when that process ends, however it ends.
//!
//! Each test takes its own namespace ([`TestNamespace`]), so tests of one binary run in parallel against
//! the one server. There is no kubelet, scheduler or controller manager: [`fixtures`] creates nodes and
//! pods and writes the pod status a kubelet would have written.
//!
//! The binaries are found through `POD_IDENTITY_CONTROL_PLANE_BIN` (set by `cargo xtask test`) or in
//! the build cache. When they are missing the test fails and says how to build them; it never skips.

pub mod control_plane;
pub mod eventually;
pub mod fixtures;
pub mod netns;
mod pki;
pub mod real_node;
pub mod tools;

pub use control_plane::{ControlPlane, TestNamespace};
pub use eventually::eventually;

/// Installs `ring` as the process-wide TLS provider. Test binaries link every crate of the workspace
/// with unified features, so more than one provider may be compiled in; rustls then refuses to choose.
pub fn install_crypto_provider() {
    // An error only means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
