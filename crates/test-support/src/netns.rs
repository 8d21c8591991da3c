//! A node and its pods as network namespaces, for tests of traffic interception.
//!
//! The node namespace has `lo` up with `169.254.169.254/32` on it (the metadata address lives on the node,
//! so the agent's own calls to it leave through `OUTPUT` and never through the rules pods hit). Each pod
//! namespace is joined to it by a veth pair: the pod end is `eth0` with the pod IP, the node end holds
//! the pod's gateway, and the pod's default route goes through it. Nothing is routed out of the node
//! namespace, so no packet of these tests can leave the machine.
//!
//! Namespaces, the processes started in them and their `/etc/netns/<name>` files are removed when the
//! [`Node`] is dropped (including while a test panics) and, should the test process be killed, by a
//! watchdog that outlives it. Everything needs root, `ip` (iproute2) and, for the rules, `iptables`; a
//! missing one is an error that says so, never a skip.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

/// The metadata address, on the node namespace's loopback.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A pod's network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNet {
    /// Name of the namespace (`ip netns exec <netns> ...`).
    pub netns: String,
    /// The pod's IP, on its `eth0`.
    pub ip: Ipv4Addr,
    /// Its gateway: the node end of the veth pair.
    pub gateway: Ipv4Addr,
}

/// A node's network namespace and the pods joined to it.
#[derive(Debug)]
pub struct Node {
    /// Name of the node namespace.
    pub netns: String,
    /// Pods added so far.
    pub pods: Vec<PodNet>,
    prefix: String,
}

/// Fails unless the process is root and `ip` works.
pub fn require_privileges() -> Result<()> {
    let uid = run_output(Command::new("id").arg("-u")).context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "network namespace tests must run as root (they create namespaces, veth pairs and iptables rules)"
        );
    }
    run_output(Command::new("ip").arg("-V"))
        .context("the `ip` command (iproute2) is required: apt-get install iproute2")?;
    Ok(())
}

/// Fails unless `tool --version` (or `-V`) runs, naming the package to install.
pub fn require_tool(tool: &str, package: &str) -> Result<()> {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success() || tool == "conntrack")
        .unwrap_or(false);
    if !ok {
        bail!("`{tool}` is required for these tests: apt-get install {package}");
    }
    Ok(())
}

impl Node {
    /// A fresh node namespace with the metadata address on its loopback.
    pub fn create() -> Result<Self> {
        require_privileges()?;
        let prefix = format!(
            "pi{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let netns = format!("{prefix}-node");
        ip(&["netns", "add", &netns])?;
        let node = Self {
            netns,
            pods: Vec::new(),
            prefix,
        };
        spawn_watchdog(&node.prefix)?;
        node.ip_in(&["link", "set", "lo", "up"])?;
        node.ip_in(&["addr", "add", &format!("{METADATA_IP}/32"), "dev", "lo"])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(node)
    }

    /// Adds pod number `index` (1..=250): namespace, veth pair, addresses `10.244.<index>.2/30` (pod)
    /// and `.1` (gateway), default route.
    pub fn add_pod(&mut self, index: u8) -> Result<PodNet> {
        if index == 0 || index > 250 {
            bail!("pod index {index} is outside 1..=250");
        }
        let netns = format!("{}-p{index}", self.prefix);
        ip(&["netns", "add", &netns])?;
        let ip_addr = Ipv4Addr::new(10, 244, index, 2);
        let gateway = Ipv4Addr::new(10, 244, index, 1);
        let node_end = format!("pod{index}");
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &netns,
            "type",
            "veth",
            "peer",
            "name",
            &node_end,
            "netns",
            &self.netns,
        ])?;
        self.ip_in(&["addr", "add", &format!("{gateway}/30"), "dev", &node_end])?;
        self.ip_in(&["link", "set", &node_end, "up"])?;
        let pod = PodNet {
            netns: netns.clone(),
            ip: ip_addr,
            gateway,
        };
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip_addr}/30"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ])?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Runs `ip` inside the node namespace.
    pub fn ip_in(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.netns.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Sets a sysctl inside the node namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run(&self.netns, &["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// A command that runs `program args` inside namespace `netns`.
    pub fn command(&self, netns: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns, program]);
        command
    }

    /// Runs a command inside `netns` and returns its output; fails with its stderr when it fails.
    pub fn run(&self, netns: &str, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().context("an empty command")?;
        let mut command = self.command(netns, program);
        command.args(args);
        let output = run_output(&mut command)?;
        if !output.status.success() {
            bail!(
                "`{}` in {netns} failed with {}: {}",
                argv.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }

    /// Writes `/etc/netns/<netns>/hosts`, which `ip netns exec` mounts over `/etc/hosts` for processes
    /// started in that namespace.
    pub fn set_hosts(&self, netns: &str, entries: &[(Ipv4Addr, &str)]) -> Result<()> {
        let dir = PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut text = String::from("127.0.0.1 localhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(dir.join("hosts"), text).with_context(|| format!("writing {}/hosts", dir.display()))
    }

    /// The path of a namespace, for `setns`.
    pub fn path(netns: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(netns)
    }

    /// Every namespace of this node, the node's first.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.netns.clone()];
        all.extend(self.pods.iter().map(|p| p.netns.clone()));
        all
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        cleanup(&self.prefix);
    }
}

/// Kills what runs in the namespaces whose names start with `prefix` and deletes them and their files.
fn cleanup(prefix: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(CLEANUP)
        .arg("cleanup")
        .arg(prefix)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

const CLEANUP: &str = r#"
    prefix=$1
    for ns in $(ip netns list | awk '{print $1}' | grep "^$prefix-"); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    done
    for ns in $(ip netns list | awk '{print $1}' | grep "^$prefix-"); do
        ip netns del "$ns" 2>/dev/null
        rm -rf "/etc/netns/$ns"
    done
"#;

/// Cleans up after the test process once it has gone, however it went.
fn spawn_watchdog(prefix: &str) -> Result<()> {
    let script = format!(
        r#"parent=$1; prefix=$2
        alive() {{ [ -e "/proc/$1" ] && ! grep -q ') Z ' "/proc/$1/stat" 2>/dev/null; }}
        while alive "$parent"; do sleep 0.5; done
        {CLEANUP}"#
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("netns-watchdog")
        .arg(std::process::id().to_string())
        .arg(prefix)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the network namespace watchdog")?;
    Ok(())
}

/// Runs `f` on a thread of its own inside network namespace `netns`: sockets it creates belong to
/// that namespace (a process can serve in several namespaces at once this way).
pub fn run_in<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = Node::path(netns);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {}", path.display()))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread inside network namespace {netns} panicked"))?
}

/// Makes `127.0.0.1:<port>` of the host reachable at the same address inside `netns`, by relaying
/// each connection. Processes in the namespace (the agent, the controller) then use the host's
/// kubeconfig for the API server unchanged, and nothing touches the host's netfilter.
pub async fn relay_loopback_port(netns: &str, port: u16) -> Result<tokio::task::JoinHandle<()>> {
    let listener = run_in(netns, move || std::net::TcpListener::bind(("127.0.0.1", port)))?
        .with_context(|| format!("binding 127.0.0.1:{port} inside {netns}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }))
}

/// A loopback port of the host that leads to an address inside a network namespace; stops when dropped.
#[derive(Debug)]
pub struct Forward {
    /// Where the host's side listens (`127.0.0.1:<free port>`).
    pub local: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Makes `target` (an address reachable only inside `netns`) reachable at a loopback port of the host:
/// each connection accepted on the host is relayed to a connection opened from inside the namespace. A
/// thread of its own stays in the namespace for that, so the host's routes and netfilter never change.
pub fn forward_into(netns: &str, target: std::net::SocketAddr) -> Result<Forward> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("binding a loopback port")?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let path = Node::path(netns);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (started, ready) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::Builder::new()
        .name(format!("forward-{netns}"))
        .spawn(move || {
            let setup = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the network namespace")
                .and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("building the forwarding runtime")
                });
            let runtime = match setup {
                Ok(runtime) => {
                    let _ = started.send(Ok(()));
                    runtime
                }
                Err(err) => {
                    let _ = started.send(Err(err));
                    return;
                }
            };
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let accept = async {
                    loop {
                        let Ok((mut inbound, _)) = listener.accept().await else {
                            continue;
                        };
                        // Spawned on this thread's runtime: the outbound socket is made inside the namespace.
                        tokio::spawn(async move {
                            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        })
        .context("starting the forwarding thread")?;
    ready
        .recv()
        .context("the forwarding thread ended before it started")??;
    Ok(Forward {
        local,
        stop: Some(stop),
    })
}

fn ip(args: &[&str]) -> Result<()> {
    let output = run_output(Command::new("ip").args(args))?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn run_output(command: &mut Command) -> Result<Output> {
    command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?}", command.get_program()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_reaches_its_gateway_and_the_namespaces_go_away() {
        let names;
        {
            let mut node = Node::create().unwrap();
            let pod = node.add_pod(7).unwrap();
            assert_eq!(pod.ip, Ipv4Addr::new(10, 244, 7, 2));
            let route = node
                .run(&pod.netns, &["ip", "route", "get", &METADATA_IP.to_string()])
                .unwrap();
            assert!(String::from_utf8_lossy(&route.stdout).contains("via 10.244.7.1 dev eth0"));
            let addrs = node.run(&node.netns, &["ip", "addr", "show", "lo"]).unwrap();
            assert!(String::from_utf8_lossy(&addrs.stdout).contains("169.254.169.254/32"));
            names = node.namespaces();
        }
        let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        for name in names {
            assert!(!listed.contains(&name), "{name} was left behind");
        }
    }
}
