//! The configuration files of a real node's parts, rendered from its [`Layout`]. Each setting that departs
//! from a part's default says which failure (or which shared host path) it avoids; the facts are in the
//! project's reference on running a real node on these machines.

use serde_json::{Value, json};

use super::layout::{Layout, net};

/// containerd's `config.toml` (version 2).
///
/// - `restrict_oom_score_adj`: root here lacks CAP_SYS_RESOURCE, so runc cannot lower a sandbox's
///   `oom_score_adj` below the parent's; without it every sandbox fails with "can't get final child's PID
///   from pipe".
/// - `netns_mounts_under_state_dir`: pod network namespaces go under the run's state directory instead
///   of the shared `/var/run/netns`.
/// - the `opt` plugin's path and runc's `Root` default to shared host paths (`/opt/containerd`,
///   `/run/containerd/runc`).
pub fn containerd(layout: &Layout, pause_image: &str) -> String {
    let root = layout.containerd_root();
    let state = layout.containerd_state();
    let socket = layout.containerd_socket();
    let opt = layout.containerd_opt();
    let runc = layout.runc_root();
    let cni_conf = layout.cni_conf_dir();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
        root = root.display(),
        state = state.display(),
        socket = socket.display(),
        opt = opt.display(),
        runc = runc.display(),
        cni_conf = cni_conf.display(),
    )
}

/// The CNI network: a bridge with host-local addresses, its IPAM state in the run's directory.
pub fn cni(layout: &Layout) -> Value {
    json!({
        "cniVersion": "0.4.0",
        "name": layout.cni_network(),
        "plugins": [{
            "type": "bridge",
            "bridge": net::POD_BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": net::POD_SUBNET, "gateway": net::POD_GATEWAY.to_string()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": layout.cni_ipam_dir(),
            },
        }, {
            "type": "portmap",
            "capabilities": {"portMappings": true},
        }],
    })
}

/// What the kubelet needs to know that is not in its layout.
#[derive(Clone, Debug)]
pub struct KubeletSettings<'a> {
    /// `spec.providerID` of the node.
    pub provider_id: &'a str,
    /// The cluster CA (clients of the kubelet's API present certificates it signed).
    pub client_ca: &'a str,
    /// Taints the node registers with (`key=value:Effect`).
    pub register_with_taints: &'a [(String, String, String)],
}

/// The kubelet's `KubeletConfiguration` (JSON is YAML).
///
/// - `failCgroupV1: false`, `cgroupDriver: cgroupfs`: these machines run cgroup v1 without systemd.
/// - `cgroupRoot`: the run's own cgroup, so pods' cgroups are found and removed by name.
/// - `podLogsDir`, `resolvConf`: inside the run's directory instead of `/var/log/pods` and the
///   machine's resolver (whose servers are unreachable from the node anyway).
/// - eviction and image GC thresholds out of reach: a busy CI disk must not evict the test's pods.
pub fn kubelet(layout: &Layout, settings: &KubeletSettings<'_>) -> Value {
    let taints: Vec<Value> = settings
        .register_with_taints
        .iter()
        .map(|(key, value, effect)| json!({"key": key, "value": value, "effect": effect}))
        .collect();
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{}", layout.cgroup()),
        "cgroupsPerQOS": true,
        "enforceNodeAllocatable": ["pods"],
        "containerRuntimeEndpoint": format!("unix://{}", layout.containerd_socket().display()),
        "providerID": settings.provider_id,
        "podLogsDir": layout.pod_logs(),
        "resolvConf": layout.config().join("resolv.conf"),
        "clusterDomain": "cluster.local",
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": false},
            "x509": {"clientCAFile": settings.client_ca},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "address": net::NODE_IP.to_string(),
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "failSwapOn": false,
        "protectKernelDefaults": false,
        "serializeImagePulls": false,
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "registerWithTaints": taints,
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "maxPods": 110,
    })
}

/// kube-proxy's `KubeProxyConfiguration`, iptables mode.
///
/// - `iptables.localhostNodePorts: false`: otherwise kube-proxy sets `route_localnet=1` in the node's
///   namespace, which hides whether the agent works on nodes where it is 0 (nftables-mode kube-proxy,
///   kube-proxy replacements).
/// - conntrack limits and timeouts at 0: kube-proxy leaves the machine-wide `nf_conntrack_max` alone.
pub fn kube_proxy(layout: &Layout, kubeconfig: &str) -> Value {
    json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": kubeconfig},
        "hostnameOverride": layout.node_name,
        "clusterCIDR": net::POD_SUBNET,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "iptables": {"localhostNodePorts": false, "masqueradeAll": false},
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
            "udpTimeout": "0s",
            "udpStreamTimeout": "0s",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::real_node::layout::HostPaths;

    fn layout() -> Layout {
        Layout::new("pin1x0abcd", HostPaths::default())
    }

    #[test]
    fn containerd_keeps_every_path_in_the_run() {
        let toml = containerd(&layout(), "pod-identity.local/pause:t");
        for line in toml.lines().filter(|l| l.contains('/') && l.contains('"')) {
            if line.contains("bin_dir") {
                assert!(line.contains("/usr/lib/cni"), "{line}");
                continue;
            }
            if line.contains("sandbox_image") || line.contains("disabled_plugins") {
                continue;
            }
            assert!(line.contains("pin1x0abcd"), "shared path in {line}");
        }
        assert!(toml.contains("restrict_oom_score_adj = true"));
        assert!(toml.contains("netns_mounts_under_state_dir = true"));
    }

    #[test]
    fn kubelet_runs_on_cgroup_v1_in_the_runs_cgroup() {
        let config = kubelet(
            &layout(),
            &KubeletSettings {
                provider_id: "azure:///x",
                client_ca: "/ca.crt",
                register_with_taints: &[("k".into(), "v".into(), "NoSchedule".into())],
            },
        );
        assert_eq!(config["failCgroupV1"], false);
        assert_eq!(config["cgroupRoot"], "/pod-identity-pin1x0abcd");
        assert!(
            config["podLogsDir"]
                .as_str()
                .unwrap_or_default()
                .contains("pin1x0abcd")
        );
        assert_eq!(config["registerWithTaints"][0]["effect"], "NoSchedule");
        assert_eq!(config["providerID"], "azure:///x");
    }

    #[test]
    fn kube_proxy_leaves_route_localnet_and_machine_wide_conntrack_alone() {
        let config = kube_proxy(&layout(), "/k");
        assert_eq!(config["iptables"]["localhostNodePorts"], false);
        assert_eq!(config["conntrack"]["maxPerCore"], 0);
    }

    #[test]
    fn cni_state_is_in_the_run() {
        let config = cni(&layout());
        assert_eq!(config["name"], "pod-identity-pin1x0abcd");
        assert!(
            config["plugins"][0]["ipam"]["dataDir"]
                .as_str()
                .unwrap_or_default()
                .contains("pin1x0abcd")
        );
    }
}
