//! A real Kubernetes node on this machine, for what only a node shows: containers from images, the
//! chart's DaemonSet and Deployment, probes, security contexts, host paths, rollouts.
//!
//! Every part is the real one: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the kubelet
//! and kube-proxy built from the project's pinned Go modules (`tools/build-control-plane.sh`), containerd,
//! runc and the CNI plugins from Debian. All of them run inside one network namespace of their own whose
//! only link is a bridge with no ports: nothing the node or its pods send can leave the machine. The
//! machine's mount namespace is shared (containerd must see the kubelet's volume mounts).
//!
//! What cannot live in that namespace (directories, cgroups, mounts, the namespace itself, the kernel
//! settings the kubelet changes for the whole machine) is named after the run ([`Layout`]) and removed by
//! `teardown.sh`: when the node is dropped, and by a watchdog if the test process dies first. The facts
//! behind each setting are in the project's reference on running a real node on these machines.

pub mod config;
pub mod images;
pub mod layout;
pub mod leftovers;

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node as KubeNode, ServiceAccount};
use kube::{Api, Client};

pub use self::{
    images::{ImageSet, ImageSpec, PackedImage},
    layout::{HostPaths, KERNEL_SETTINGS, Layout, net},
};
use crate::{control_plane, netns, pki::Pki};

/// The binaries a node needs besides kube-apiserver and etcd, built with them.
pub const NODE_BINARIES: &[&str] = &[
    "kubelet",
    "kube-proxy",
    "kube-scheduler",
    "kube-controller-manager",
    "kubectl",
];

/// Programs from the machine's packages the node runs, with the Debian package of each.
pub const HOST_PROGRAMS: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("umoci", "umoci"),
    ("nsenter", "util-linux"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    ("busybox", "busybox-static"),
    ("curl", "curl"),
    ("gcc", "build-essential"),
];

/// Shared directories of the machine a node may create; those missing at start are removed at teardown
/// when they are empty again.
const SHARED_DIRS: &[&str] = &[
    "/var/log/containers",
    "/var/lib/cni",
    "/var/lib/cni/results",
    "/run/containerd",
    "/run/containerd/s",
    "/etc/kubernetes",
];

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How to start a node.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// `spec.providerID` of the node (an emulated VM or scale-set instance).
    pub provider_id: String,
    /// Taints the kubelet registers the node with: (key, value, effect).
    pub register_with_taints: Vec<(String, String, String)>,
    /// Images to import before the kubelet starts (the set must hold `pause`).
    pub images: ImageSet,
}

/// A running node; torn down when dropped.
pub struct RealNode {
    layout: Layout,
    children: Vec<(&'static str, Child)>,
    forward: Option<netns::Forward>,
    admin_kubeconfig: PathBuf,
    admin_kubeconfig_in_node: PathBuf,
    ca: PathBuf,
    bin: PathBuf,
    torn_down: bool,
    /// When the node started and how long each phase took, for reports.
    pub timings: Vec<(&'static str, Duration)>,
}

impl std::fmt::Debug for RealNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealNode")
            .field("id", &self.layout.id)
            .finish_non_exhaustive()
    }
}

/// Fails unless every binary and program a node needs is there, naming what to build or install.
pub fn require_tools() -> Result<PathBuf> {
    netns::require_privileges()?;
    for (program, package) in HOST_PROGRAMS {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {program}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("`{program}` is required for the real-node tier: apt-get install {package}");
        }
    }
    if !Path::new("/usr/lib/cni/bridge").is_file() {
        bail!(
            "the CNI plugins are required for the real-node tier: apt-get install containernetworking-plugins"
        );
    }
    let bin = control_plane::binaries()?;
    for binary in NODE_BINARIES {
        if !bin.join(binary).is_file() {
            bail!(
                "{} holds no {binary}; run `cargo xtask tools` to build the node's binaries",
                bin.display()
            );
        }
    }
    Ok(bin)
}

impl RealNode {
    /// Starts a node and waits until it is Ready, kube-proxy has programmed the `kubernetes` Service and
    /// the `default` ServiceAccount exists (pods can be created).
    pub async fn start(options: NodeOptions) -> Result<Self> {
        crate::install_crypto_provider();
        let bin = require_tools()?;
        let layout = Layout::new(
            Layout::fresh_id(COUNTER.fetch_add(1, Ordering::SeqCst)),
            HostPaths::default(),
        );
        let created = missing_shared_dirs(&layout);
        std::fs::create_dir_all(layout.base())
            .with_context(|| format!("creating {}", layout.base().display()))?;
        std::fs::write(layout.base().join("host-dirs.created"), created.join("\n"))?;
        spawn_watchdog(&layout)?;
        let mut node = Self {
            ca: layout.pki().join("ca.crt"),
            admin_kubeconfig: layout.pki().join("admin.kubeconfig"),
            admin_kubeconfig_in_node: layout.pki().join("admin-in-node.kubeconfig"),
            layout,
            children: Vec::new(),
            forward: None,
            bin,
            torn_down: false,
            timings: Vec::new(),
        };
        node.boot(&options)
            .await
            .with_context(|| format!("starting real node {}", node.layout.id))?;
        Ok(node)
    }

    async fn boot(&mut self, options: &NodeOptions) -> Result<()> {
        let started = Instant::now();
        for dir in [
            self.layout.logs(),
            self.layout.config(),
            self.layout.cni_conf_dir(),
            self.layout.run_dir(),
        ] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        self.network()?;
        self.cgroups()?;
        let pki = self.certificates()?;
        self.start_control_plane(&pki).await?;
        self.timings.push(("control plane ready", started.elapsed()));
        self.start_containerd(options).await?;
        self.timings
            .push(("containerd ready, images imported", started.elapsed()));
        self.save_kernel_settings()?;
        self.start_kubelet(options, &pki)?;
        self.wait_node_ready().await?;
        self.timings.push(("node Ready", started.elapsed()));
        Ok(())
    }

    /// The run's names and paths.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The node's name in the cluster.
    pub fn name(&self) -> &str {
        &self.layout.node_name
    }

    /// The network namespace the node lives in.
    pub fn netns(&self) -> String {
        self.layout.netns()
    }

    /// A kubeconfig for a cluster admin, usable from the test process (through a forwarded port).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A kubeconfig for a cluster admin, usable inside the node's namespace (the API server's own
    /// address), e.g. for the emulator's issuer discovery or a process started there.
    pub fn admin_kubeconfig_in_node(&self) -> &Path {
        &self.admin_kubeconfig_in_node
    }

    /// The cluster's CA certificate (PEM file).
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// A client authenticated as a cluster admin.
    pub async fn client(&self) -> Result<Client> {
        control_plane::client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// `kubectl` of the node's Kubernetes version, pointed at this cluster.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(self.bin.join("kubectl"));
        command.env("KUBECONFIG", &self.admin_kubeconfig);
        command
    }

    /// Runs kubectl; fails with its stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let output = self
            .kubectl()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A command that runs inside the node's network namespace (and nowhere else: the mount namespace is
    /// the machine's).
    pub fn in_node(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.layout.netns_path().display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Runs `argv` inside the node's network namespace and returns its output; fails with its stderr.
    pub fn in_node_ok(&self, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().context("an empty command")?;
        let output = self
            .in_node(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in the node"))?;
        if !output.status.success() {
            bail!(
                "`{}` in the node failed with {}: {}",
                argv.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }

    /// A kernel setting of the node's network namespace (`net.ipv4.conf.all.route_localnet`).
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let output = self.in_node_ok(&["sysctl", "-n", key])?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Imports more images into the node's containerd (e.g. a second tag for a rollout).
    pub fn import_images(&self, set: &ImageSet) -> Result<()> {
        images::import(set, &self.layout.containerd_socket())
    }

    /// The last `lines` lines of a component's log (`kubelet`, `containerd`, `kube-apiserver`, ...).
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.layout.logs().join(format!("{component}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Resident memory of every process of the run (the node's servers, containerd and its shims, and
    /// every container), summed by program name: (program, processes, bytes), largest first.
    pub fn memory(&self) -> Vec<(String, usize, u64)> {
        let root = self.layout.host.cgroup.join("pids").join(self.layout.cgroup());
        let mut by_program = std::collections::BTreeMap::<String, (usize, u64)>::new();
        for pid in pids_under(&root) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let program = Path::new(&*String::from_utf8_lossy(argv0))
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if program.is_empty() {
                continue;
            }
            let entry = by_program.entry(program).or_default();
            entry.0 += 1;
            entry.1 += rss_of(pid);
        }
        let mut all: Vec<(String, usize, u64)> = by_program
            .into_iter()
            .map(|(p, (n, bytes))| (p, n, bytes))
            .collect();
        all.sort_by_key(|entry| std::cmp::Reverse(entry.2));
        all
    }

    /// Fails if a component exited, with the tail of its log.
    pub fn check_running(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(self.layout.logs().join(format!("{name}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                bail!(
                    "{name} exited with {status}:\n{}",
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
        }
        Ok(())
    }

    /// Tears the node down now and waits until nothing of it is left; also what dropping it does.
    pub fn shutdown(mut self) -> Result<Duration> {
        self.tear_down()
    }

    /// The same, for a node that is not owned (it stays torn down; dropping it does nothing more).
    pub fn tear_down(&mut self) -> Result<Duration> {
        let started = Instant::now();
        self.teardown()?;
        Ok(started.elapsed())
    }

    fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        self.forward = None;
        let status = teardown_command(&self.layout)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running the node's teardown")?;
        for (_, child) in &mut self.children {
            let _ = child.wait();
        }
        if !status.success() {
            bail!("the node's teardown failed with {status}");
        }
        Ok(())
    }

    fn network(&self) -> Result<()> {
        let ns = self.layout.netns();
        ip(&["netns", "add", &ns])?;
        let node_ip = layout::with_prefix(net::NODE_IP, net::NODE_PREFIX);
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", "169.254.169.254/32", "dev", "lo"],
            vec!["link", "add", net::NODE_BRIDGE, "type", "bridge"],
            vec!["addr", "add", node_ip.as_str(), "dev", net::NODE_BRIDGE],
            vec!["link", "set", net::NODE_BRIDGE, "up"],
            // Into a bridge with no ports: unreachable destinations are dropped there, while host-network
            // processes still get a route for ClusterIPs (a blackhole route fails them with EINVAL).
            vec!["route", "add", "default", "dev", net::NODE_BRIDGE],
        ] {
            let mut full = vec!["-n", ns.as_str()];
            full.extend(args);
            ip(&full)?;
        }
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            // A fresh namespace starts at 0; stated here because the agent must work without it.
            ("net.ipv4.conf.all.route_localnet", "0"),
        ] {
            self.in_node_ok(&["sysctl", "-q", "-w", &format!("{key}={value}")])?;
        }
        Ok(())
    }

    fn cgroups(&self) -> Result<()> {
        let root = &self.layout.host.cgroup;
        for entry in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
            let hierarchy = entry?.path();
            if !hierarchy.is_dir() {
                continue;
            }
            let run = hierarchy.join(self.layout.cgroup());
            std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
            // A new cpuset cgroup has no CPUs or memory nodes until given its parent's.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                    std::fs::write(run.join(file), value.trim())
                        .with_context(|| format!("writing {}", run.join(file).display()))?;
                }
            }
        }
        let node = root.join("pids").join(self.layout.node_cgroup());
        std::fs::create_dir_all(&node).with_context(|| format!("creating {}", node.display()))?;
        Ok(())
    }

    fn certificates(&self) -> Result<Pki> {
        let pki = Pki::create_for(
            &self.layout.pki(),
            &[
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc.cluster.local",
            ],
            &[IpAddr::V4(net::NODE_IP), IpAddr::V4(net::KUBERNETES_SERVICE_IP)],
        )?;
        let inside = format!("https://{}:{}", net::NODE_IP, net::API_PORT);
        for (user, group, file) in [
            ("pod-identity-test-admin", Some("system:masters"), "admin-in-node"),
            (
                &*format!("system:node:{}", self.layout.node_name),
                Some("system:nodes"),
                "kubelet",
            ),
            ("system:kube-controller-manager", None, "kube-controller-manager"),
            ("system:kube-scheduler", None, "kube-scheduler"),
            ("system:kube-proxy", None, "kube-proxy"),
        ] {
            let cert = pki.client(user, group)?;
            control_plane::write_kubeconfig(
                &self.layout.pki().join(format!("{file}.kubeconfig")),
                &inside,
                &pki.ca_cert,
                &cert.cert,
                &cert.key,
            )?;
        }
        Ok(pki)
    }

    async fn start_control_plane(&mut self, pki: &Pki) -> Result<()> {
        let etcd_url = "http://127.0.0.1:2379";
        let etcd = self.bin.join("etcd");
        let data = self.layout.etcd_data();
        self.spawn(
            "etcd",
            &etcd,
            &[
                "--name=node".into(),
                format!("--data-dir={}", data.display()),
                "--log-level=warn".into(),
                "--unsafe-no-fsync".into(),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-cluster=node=http://127.0.0.1:2380".into(),
            ],
        )?;
        let kubelet_client = pki.client("kube-apiserver-kubelet-client", Some("system:masters"))?;
        let issuer = format!("https://{}:{}", net::NODE_IP, net::API_PORT);
        let apiserver = self.bin.join("kube-apiserver");
        self.spawn(
            "kube-apiserver",
            &apiserver,
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={}", net::NODE_IP),
                format!("--secure-port={}", net::API_PORT),
                format!("--cert-dir={}", self.layout.pki().display()),
                format!("--tls-cert-file={}", pki.server_cert.display()),
                format!("--tls-private-key-file={}", pki.server_key.display()),
                format!("--client-ca-file={}", pki.ca_cert.display()),
                format!("--kubelet-client-certificate={}", kubelet_client.cert.display()),
                format!("--kubelet-client-key={}", kubelet_client.key.display()),
                // The node's name resolves nowhere: nothing inside the namespace answers DNS.
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                format!("--service-cluster-ip-range={}", net::SERVICE_CIDR),
                "--allow-privileged=true".into(),
                format!("--service-account-issuer={issuer}"),
                format!(
                    "--service-account-key-file={}",
                    pki.service_account_public_key.display()
                ),
                format!(
                    "--service-account-signing-key-file={}",
                    pki.service_account_key.display()
                ),
                "--profiling=false".into(),
            ],
        )?;
        let forward = netns::forward_into(
            &self.layout.netns(),
            SocketAddr::from((net::NODE_IP, net::API_PORT)),
        )?;
        let admin = pki.client("pod-identity-test-admin", Some("system:masters"))?;
        control_plane::write_kubeconfig(
            &self.admin_kubeconfig,
            &format!("https://{}", forward.local),
            &pki.ca_cert,
            &admin.cert,
            &admin.key,
        )?;
        self.forward = Some(forward);
        let client = self.client().await?;
        self.wait("the API server to be ready", || async {
            let request = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => Ok(()),
                Ok(body) => bail!("readyz: {body}"),
                Err(err) => bail!("readyz: {err}"),
            }
        })
        .await?;

        let pki_dir = self.layout.pki();
        let kcm = pki_dir.join("kube-controller-manager.kubeconfig");
        let controller_manager = self.bin.join("kube-controller-manager");
        self.spawn(
            "kube-controller-manager",
            &controller_manager,
            &[
                format!("--kubeconfig={}", kcm.display()),
                format!("--authentication-kubeconfig={}", kcm.display()),
                format!("--authorization-kubeconfig={}", kcm.display()),
                format!(
                    "--service-account-private-key-file={}",
                    pki.service_account_key.display()
                ),
                format!("--root-ca-file={}", pki.ca_cert.display()),
                "--use-service-account-credentials=true".into(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--profiling=false".into(),
            ],
        )?;
        let scheduler_config = pki_dir.join("kube-scheduler.kubeconfig");
        let scheduler = self.bin.join("kube-scheduler");
        self.spawn(
            "kube-scheduler",
            &scheduler,
            &[
                format!("--kubeconfig={}", scheduler_config.display()),
                format!("--authentication-kubeconfig={}", scheduler_config.display()),
                format!("--authorization-kubeconfig={}", scheduler_config.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--profiling=false".into(),
            ],
        )?;
        Ok(())
    }

    async fn start_containerd(&mut self, options: &NodeOptions) -> Result<()> {
        let pause = options
            .images
            .reference("pause")
            .context("the node's images hold no pause image")?
            .to_owned();
        let config_file = self.layout.config().join("containerd.toml");
        std::fs::write(&config_file, config::containerd(&self.layout, &pause))?;
        std::fs::write(
            self.layout.cni_conf_dir().join("10-pod-identity.conflist"),
            serde_json::to_vec_pretty(&config::cni(&self.layout))?,
        )?;
        self.spawn(
            "containerd",
            Path::new("containerd"),
            &[format!("--config={}", config_file.display())],
        )?;
        let socket = self.layout.containerd_socket();
        self.wait("containerd to serve", || async {
            let output = Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .arg("version")
                .output()?;
            if output.status.success() {
                Ok(())
            } else {
                bail!("{}", String::from_utf8_lossy(&output.stderr).trim())
            }
        })
        .await?;
        images::import(&options.images, &socket)
    }

    fn save_kernel_settings(&self) -> Result<()> {
        let mut saved = String::new();
        for key in KERNEL_SETTINGS {
            let value = std::fs::read_to_string(Path::new("/proc/sys").join(key))
                .with_context(|| format!("reading /proc/sys/{key}"))?;
            saved.push_str(&format!("{key} {}\n", value.trim()));
        }
        std::fs::write(self.layout.saved_kernel_settings(), saved)?;
        Ok(())
    }

    fn start_kubelet(&mut self, options: &NodeOptions, pki: &Pki) -> Result<()> {
        std::fs::write(self.layout.config().join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        let ca = pki.ca_cert.display().to_string();
        let kubelet_config = config::kubelet(
            &self.layout,
            &config::KubeletSettings {
                provider_id: &options.provider_id,
                client_ca: &ca,
                register_with_taints: &options.register_with_taints,
            },
        );
        let config_file = self.layout.config().join("kubelet.json");
        std::fs::write(&config_file, serde_json::to_vec_pretty(&kubelet_config)?)?;
        let root = self.layout.kubelet_root();
        let kubelet = self.bin.join("kubelet");
        self.spawn(
            "kubelet",
            &kubelet,
            &[
                format!("--config={}", config_file.display()),
                format!(
                    "--kubeconfig={}",
                    self.layout.pki().join("kubelet.kubeconfig").display()
                ),
                format!("--root-dir={}", root.display()),
                format!("--cert-dir={}", root.join("pki").display()),
                format!("--hostname-override={}", self.layout.node_name),
                format!("--node-ip={}", net::NODE_IP),
                "--v=1".into(),
            ],
        )?;
        let proxy_config = config::kube_proxy(
            &self.layout,
            &self
                .layout
                .pki()
                .join("kube-proxy.kubeconfig")
                .display()
                .to_string(),
        );
        let proxy_file = self.layout.config().join("kube-proxy.json");
        std::fs::write(&proxy_file, serde_json::to_vec_pretty(&proxy_config)?)?;
        let proxy = self.bin.join("kube-proxy");
        self.spawn(
            "kube-proxy",
            &proxy,
            &[format!("--config={}", proxy_file.display())],
        )?;
        Ok(())
    }

    async fn wait_node_ready(&mut self) -> Result<()> {
        let client = self.client().await?;
        let name = self.layout.node_name.clone();
        let nodes = Api::<KubeNode>::all(client.clone());
        self.wait("the node to be Ready", || async {
            let node = nodes.get_opt(&name).await?.context("not registered yet")?;
            let ready = node
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready {
                Ok(())
            } else {
                bail!("registered, not Ready")
            }
        })
        .await?;
        let accounts = Api::<ServiceAccount>::namespaced(client, "default");
        self.wait("the default ServiceAccount", || async {
            accounts.get_opt("default").await?.context("not created yet")?;
            Ok(())
        })
        .await?;
        let netns = self.layout.netns_path();
        self.wait("kube-proxy to program the kubernetes Service", || {
            let netns = netns.clone();
            async move {
                let output = Command::new("nsenter")
                    .arg(format!("--net={}", netns.display()))
                    .args(["--", "iptables", "-t", "nat", "-S", "KUBE-SERVICES"])
                    .output()?;
                if String::from_utf8_lossy(&output.stdout).contains("default/kubernetes:https") {
                    Ok(())
                } else {
                    bail!("no rule for default/kubernetes yet")
                }
            }
        })
        .await
    }

    /// Waits for `check`, failing early (with the component's log) when a component exits.
    async fn wait<F, Fut>(&mut self, what: &str, mut check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let deadline = Instant::now() + crate::eventually::patience().max(Duration::from_secs(90));
        let mut last = None;
        while Instant::now() < deadline {
            self.check_running()?;
            match check().await {
                Ok(()) => return Ok(()),
                Err(err) => last = Some(err),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!(
            "timed out waiting for {what}: {}\nkubelet:\n{}",
            last.map(|e| format!("{e:#}")).unwrap_or_default(),
            self.log_tail("kubelet", 20)
        )
    }

    /// Starts `program` inside the node's network namespace and the node's cgroup, logging to
    /// `logs/<name>.log`.
    fn spawn(&mut self, name: &'static str, program: &Path, args: &[String]) -> Result<()> {
        let log = File::create(self.layout.logs().join(format!("{name}.log")))?;
        let procs = self
            .layout
            .host
            .cgroup
            .join("pids")
            .join(self.layout.node_cgroup())
            .join("cgroup.procs");
        let path = format!(
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"procs=$1 netns=$2; shift 2; echo $$ > "$procs" || exit 111; exec nsenter --net="$netns" -- "$@""#)
            .arg("spawn")
            .arg(procs)
            .arg(self.layout.netns_path())
            .arg(program)
            .args(args)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name, child));
        Ok(())
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// The teardown script, with the run's arguments.
pub fn teardown_command(layout: &Layout) -> Command {
    let keep = std::env::var("POD_IDENTITY_KEEP_NODE_LOGS").is_ok_and(|v| v == "1");
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(include_str!("teardown.sh"))
        .arg("teardown")
        .arg(&layout.id)
        .arg(layout.base())
        .arg(layout.run_dir())
        .arg(layout.cgroup())
        .arg(layout.netns())
        .arg(layout.containerd_socket())
        .arg(if keep { "1" } else { "0" });
    command
}

/// Tears the node down once the test process has gone, however it went.
fn spawn_watchdog(layout: &Layout) -> Result<()> {
    let teardown = teardown_command(layout);
    let args: Vec<String> = teardown
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // args: -c <script> teardown <id> ...; run the same script after the parent is gone.
    let script = r#"parent=$1; shift
        alive() { [ -e "/proc/$1" ] && ! grep -q ') Z ' "/proc/$1/stat" 2>/dev/null; }
        while alive "$parent"; do sleep 0.5; done
        exec sh "$@""#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("node-watchdog")
        .arg(std::process::id().to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the node's watchdog")?;
    Ok(())
}

fn missing_shared_dirs(layout: &Layout) -> Vec<String> {
    let mut dirs: Vec<PathBuf> = SHARED_DIRS.iter().map(PathBuf::from).collect();
    dirs.push(layout.host.lib.clone());
    dirs.push(layout.host.run.clone());
    dirs.into_iter()
        .filter(|d| !d.exists())
        .map(|d| d.display().to_string())
        .collect()
}

/// Every process in a cgroup tree.
fn pids_under(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().is_some_and(|n| n == "cgroup.procs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                pids.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Resident memory of a process, in bytes.
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
