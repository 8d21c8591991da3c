//! Names and places of one real node: everything that lives outside the node's own network namespace is
//! named after the run, so two runs on one machine never share a file, a cgroup or a namespace, and
//! teardown finds all of it from the run's id alone.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// Addresses inside the node's network namespace. They never leave it (the namespace has no link off
/// the machine), so every run uses the same ones.
pub mod net {
    use std::net::Ipv4Addr;

    /// The node's address, on a bridge with no ports that also carries the default route: host-network
    /// processes reach ClusterIPs through kube-proxy's OUTPUT rules, and nothing is routed anywhere.
    pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
    /// Prefix length of [`NODE_IP`]'s subnet.
    pub const NODE_PREFIX: u8 = 24;
    /// The bridge holding [`NODE_IP`].
    pub const NODE_BRIDGE: &str = "node0";
    /// Pods' subnet on the CNI bridge.
    pub const POD_SUBNET: &str = "10.244.0.0/24";
    /// The pods' gateway: the CNI bridge's address.
    pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
    /// The CNI bridge.
    pub const POD_BRIDGE: &str = "cni0";
    /// ClusterIPs of Services.
    pub const SERVICE_CIDR: &str = "10.96.0.0/24";
    /// The `kubernetes` Service's ClusterIP (the first of [`SERVICE_CIDR`]).
    pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
    /// The API server's port on [`NODE_IP`].
    pub const API_PORT: u16 = 6443;
    /// The Instance Metadata Service address, on the node namespace's loopback, where the emulator
    /// answers for the node's scale-set instance.
    pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
}

/// Kernel settings the kubelet changes for the whole machine at start (`setupKernelTunables`): saved
/// before it starts and put back at teardown.
pub const KERNEL_SETTINGS: &[&str] = &[
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Where the machine keeps what every run shares and so must be cleaned by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPaths {
    /// Parent of every run's persistent directory.
    pub lib: PathBuf,
    /// Parent of every run's runtime directory (sockets, state).
    pub run: PathBuf,
    /// Root of the cgroup hierarchies.
    pub cgroup: PathBuf,
    /// Where `ip netns` keeps named namespaces.
    pub netns: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            lib: PathBuf::from("/var/lib/pod-identity-nodes"),
            run: PathBuf::from("/run/pod-identity-nodes"),
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            netns: PathBuf::from("/run/netns"),
        }
    }
}

/// Every name and path of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Unique per run: `pin<pid>x<n>` plus a few characters of the start time.
    pub id: String,
    /// The node's name in its cluster.
    pub node_name: String,
    /// The machine's shared places.
    pub host: HostPaths,
}

impl Layout {
    /// The layout of run `id`.
    pub fn new(id: impl Into<String>, host: HostPaths) -> Self {
        Self {
            id: id.into(),
            node_name: "pod-identity-node".into(),
            host,
        }
    }

    /// A fresh id: the process id, a counter, and the low bits of the clock, so that a run never meets
    /// a directory left by an earlier process that had the same pid.
    pub fn fresh_id(counter: u32) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        format!("pin{}x{counter}{:04x}", std::process::id(), nanos & 0xffff)
    }

    /// The node's network namespace.
    pub fn netns(&self) -> String {
        self.id.clone()
    }

    /// `/run/netns/<id>`, for `nsenter --net=`.
    pub fn netns_path(&self) -> PathBuf {
        self.host.netns.join(self.netns())
    }

    /// Persistent files of the run: PKI, etcd, kubelet and containerd roots, CNI state, logs.
    pub fn base(&self) -> PathBuf {
        self.host.lib.join(&self.id)
    }

    /// Runtime files of the run: containerd's state and sockets, runc's state.
    pub fn run_dir(&self) -> PathBuf {
        self.host.run.join(&self.id)
    }

    /// Component logs.
    pub fn logs(&self) -> PathBuf {
        self.base().join("logs")
    }

    /// Certificates, keys and kubeconfigs.
    pub fn pki(&self) -> PathBuf {
        self.base().join("pki")
    }

    /// Rendered configuration files.
    pub fn config(&self) -> PathBuf {
        self.base().join("config")
    }

    /// etcd's data.
    pub fn etcd_data(&self) -> PathBuf {
        self.base().join("etcd")
    }

    /// The kubelet's `--root-dir`.
    pub fn kubelet_root(&self) -> PathBuf {
        self.base().join("kubelet")
    }

    /// The kubelet's `podLogsDir` (the default, `/var/log/pods`, is shared by every kubelet).
    pub fn pod_logs(&self) -> PathBuf {
        self.base().join("pod-logs")
    }

    /// containerd's `root`.
    pub fn containerd_root(&self) -> PathBuf {
        self.base().join("containerd")
    }

    /// containerd's `opt` plugin directory (`/opt/containerd` by default).
    pub fn containerd_opt(&self) -> PathBuf {
        self.base().join("containerd-opt")
    }

    /// containerd's `state`; pod network namespaces are mounted under it too.
    pub fn containerd_state(&self) -> PathBuf {
        self.run_dir().join("containerd")
    }

    /// containerd's gRPC socket.
    pub fn containerd_socket(&self) -> PathBuf {
        self.containerd_state().join("containerd.sock")
    }

    /// runc's `--root`.
    pub fn runc_root(&self) -> PathBuf {
        self.run_dir().join("runc")
    }

    /// The CNI configuration directory.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.base().join("cni").join("net.d")
    }

    /// host-local IPAM's `dataDir`.
    pub fn cni_ipam_dir(&self) -> PathBuf {
        self.base().join("cni").join("ipam")
    }

    /// The CNI network's name, unique per run: libcni caches results under
    /// `/var/lib/cni/results/<network>-<container>-<ifname>` whatever the configuration says.
    pub fn cni_network(&self) -> String {
        format!("pod-identity-{}", self.id)
    }

    /// Name of the run's cgroup, under every hierarchy; the kubelet's `cgroupRoot`.
    pub fn cgroup(&self) -> String {
        format!("pod-identity-{}", self.id)
    }

    /// The cgroup (relative to a hierarchy) of the node's own processes (servers, containerd and its
    /// shims), so that teardown can find every one of them, however they were started.
    pub fn node_cgroup(&self) -> String {
        format!("{}/node", self.cgroup())
    }

    /// The file of kernel settings saved before the kubelet starts.
    pub fn saved_kernel_settings(&self) -> PathBuf {
        self.base().join("kernel-settings.saved")
    }

    /// The `providerID` of a node that is instance `instance` of `scale_set` (an ARM resource ID).
    pub fn provider_id(scale_set: &str, instance: &str) -> String {
        format!("azure://{scale_set}/virtualMachines/{instance}")
    }
}

/// `cidr`'s address and prefix as `ip addr` takes them.
pub fn with_prefix(ip: Ipv4Addr, prefix: u8) -> String {
    format!("{ip}/{prefix}")
}

/// Whether `path` is inside one of the run's directories (for mounts and symlinks found at teardown).
pub fn belongs_to(layout: &Layout, path: &Path) -> bool {
    path.starts_with(layout.base()) || path.starts_with(layout.run_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shared_name_carries_the_run_id() {
        let layout = Layout::new("pin42x0beef", HostPaths::default());
        for path in [
            layout.base(),
            layout.run_dir(),
            layout.containerd_socket(),
            layout.kubelet_root(),
            layout.pod_logs(),
            layout.containerd_opt(),
            layout.netns_path(),
        ] {
            assert!(
                path.to_string_lossy().contains("pin42x0beef"),
                "{} is shared between runs",
                path.display()
            );
        }
        assert!(layout.cgroup().contains("pin42x0beef"));
        assert!(layout.cni_network().contains("pin42x0beef"));
        assert!(belongs_to(
            &layout,
            &layout.containerd_state().join("netns/cni-1")
        ));
        assert!(!belongs_to(&layout, Path::new("/var/lib/kubelet")));
    }

    #[test]
    fn fresh_ids_differ_and_fit_a_socket_path() {
        let a = Layout::fresh_id(0);
        let b = Layout::fresh_id(1);
        assert_ne!(a, b);
        let layout = Layout::new(a, HostPaths::default());
        // sockaddr_un holds 108 bytes including the terminating NUL.
        assert!(layout.containerd_socket().as_os_str().len() < 100);
    }

    #[test]
    fn provider_id_names_the_instance() {
        assert_eq!(
            Layout::provider_id(
                "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachineScaleSets/p",
                "0"
            ),
            "azure:///subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachineScaleSets/p/virtualMachines/0"
        );
    }
}
