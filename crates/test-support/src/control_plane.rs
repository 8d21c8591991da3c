//! Starting, reaching and tearing down one real control plane per test process.

use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Namespace, ServiceAccount},
};
use kube::{
    Api, Client, Config,
    api::{ObjectMeta, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::sync::OnceCell;

use crate::pki::Pki;

/// Environment variable naming the directory with the `kube-apiserver` and `etcd` binaries.
pub const BIN_ENV: &str = "POD_IDENTITY_CONTROL_PLANE_BIN";
/// When set to `1`, the run directory (logs, certificates, etcd data) is kept after the tests.
pub const KEEP_ENV: &str = "POD_IDENTITY_KEEP_CONTROL_PLANE";

const START_ATTEMPTS: usize = 3;

/// A running `etcd` and `kube-apiserver`, reachable on loopback only.
pub struct ControlPlane {
    run_dir: PathBuf,
    server: String,
    pki: Pki,
    admin_kubeconfig: PathBuf,
}

/// A namespace of its own for one test, with an admin client.
pub struct TestNamespace {
    /// Name of the namespace.
    pub name: String,
    /// A client authenticated as a cluster admin.
    pub client: Client,
}

static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();

impl ControlPlane {
    /// The control plane of this test process, started by the first caller.
    ///
    /// Panics with the reason when it cannot start, so that every test using it fails and says why.
    pub async fn shared() -> &'static Self {
        crate::install_crypto_provider();
        match SHARED.get_or_try_init(Self::start).await {
            Ok(plane) => plane,
            Err(err) => panic!("the test control plane could not start: {err:#}"),
        }
    }

    async fn start() -> Result<Self> {
        let bin = binaries()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            // Ports are picked free but released before the servers bind them, so another process
            // may take one in between; a fresh set of ports on retry settles that.
            match Self::start_once(&bin).await {
                Ok(plane) => return Ok(plane),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no start attempt made")))
    }

    async fn start_once(bin: &Path) -> Result<Self> {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let run_dir = tempfile::Builder::new()
            .prefix("pod-identity-cp-")
            .tempdir_in(base)?
            .keep();
        let pki = Pki::create(&run_dir.join("pki"))?;
        let [etcd_port, peer_port, api_port] = [free_port()?, free_port()?, free_port()?];
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");

        let etcd = spawn_logged(
            Command::new(bin.join("etcd")).args([
                "--name=test",
                &format!("--data-dir={}", run_dir.join("etcd").display()),
                "--log-level=warn",
                "--unsafe-no-fsync",
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=test={peer_url}"),
            ]),
            &run_dir.join("etcd.log"),
        )?;
        let server = format!("https://127.0.0.1:{api_port}");
        let apiserver = spawn_logged(
            Command::new(bin.join("kube-apiserver")).args([
                &format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={api_port}"),
                &format!("--cert-dir={}", run_dir.join("pki").display()),
                &format!("--tls-cert-file={}", pki.server_cert.display()),
                &format!("--tls-private-key-file={}", pki.server_key.display()),
                &format!("--client-ca-file={}", pki.ca_cert.display()),
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                &format!("--service-account-issuer={server}"),
                &format!(
                    "--service-account-key-file={}",
                    pki.service_account_public_key.display()
                ),
                &format!(
                    "--service-account-signing-key-file={}",
                    pki.service_account_key.display()
                ),
                // The default ServiceAccount is created by the controller manager, which is not run.
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",
                // Webhooks and aggregated APIs that name a Service are called at its endpoints, which
                // nothing here creates, rather than at its cluster IP, which would route off the
                // machine: a chart's webhook fails at once, and its failure policy decides.
                "--enable-aggregator-routing=true",
                "--profiling=false",
            ]),
            &run_dir.join("apiserver.log"),
        )?;
        spawn_watchdog(std::process::id(), &[etcd.id(), apiserver.id()], &run_dir)?;

        let admin = pki.client("pod-identity-test-admin", Some("system:masters"))?;
        let admin_kubeconfig = run_dir.join("admin.kubeconfig");
        write_kubeconfig(&admin_kubeconfig, &server, &pki.ca_cert, &admin.cert, &admin.key)?;
        let plane = Self {
            run_dir,
            server,
            pki,
            admin_kubeconfig,
        };
        plane.wait_ready(etcd, apiserver).await?;
        Ok(plane)
    }

    async fn wait_ready(&self, mut etcd: Child, mut apiserver: Child) -> Result<()> {
        let client = self.admin_client().await?;
        let deadline =
            tokio::time::Instant::now() + crate::eventually::patience().max(Duration::from_secs(60));
        loop {
            for (name, child) in [("etcd", &mut etcd), ("kube-apiserver", &mut apiserver)] {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{name} exited with {status} during start-up:\n{}",
                        self.log_tail(name)
                    );
                }
            }
            let request = http::Request::get("/readyz").body(Vec::new())?;
            if client
                .request_text(request)
                .await
                .is_ok_and(|body| body.trim() == "ok")
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = apiserver.kill();
                let _ = etcd.kill();
                bail!(
                    "kube-apiserver did not become ready:\n{}",
                    self.log_tail("kube-apiserver")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn log_tail(&self, name: &str) -> String {
        let file = if name == "etcd" {
            "etcd.log"
        } else {
            "apiserver.log"
        };
        let log = std::fs::read_to_string(self.run_dir.join(file)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// URL of the API server.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// The CA certificate (PEM file) that signed the API server's serving certificate, e.g. for a relying
    /// party that fetches the service-account issuer's discovery documents.
    pub fn ca_cert(&self) -> &Path {
        &self.pki.ca_cert
    }

    /// Path of a kubeconfig for a cluster admin (for kubectl, helm and spawned binaries).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// Writes a kubeconfig for `user` in `group` (authorised only by RBAC bindings a test creates).
    pub fn kubeconfig_for(&self, user: &str, group: Option<&str>) -> Result<PathBuf> {
        let cert = self.pki.client(user, group)?;
        let stem: String = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = self.run_dir.join(format!("{stem}.kubeconfig"));
        write_kubeconfig(&path, &self.server, &self.pki.ca_cert, &cert.cert, &cert.key)?;
        Ok(path)
    }

    /// Writes a kubeconfig that authenticates as a ServiceAccount (with a token from the TokenRequest
    /// API), so that a binary runs with exactly the permissions RBAC gives that account.
    pub async fn kubeconfig_for_service_account(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let client = self.admin_client().await?;
        let request: TokenRequest = serde_json::from_value(serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600}
        }))?;
        let accounts = Api::<ServiceAccount>::namespaced(client, namespace);
        let granted = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?;
        let token = granted.status.context("the TokenRequest has no status")?.token;
        let path = self.run_dir.join(format!("sa-{namespace}-{name}.kubeconfig"));
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority": self.pki.ca_cert}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": name, "namespace": namespace}}],
            "current-context": "test",
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// A client authenticated as a cluster admin.
    pub async fn admin_client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// A client authenticated as `user` in `group`.
    pub async fn client_for(&self, user: &str, group: Option<&str>) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig_for(user, group)?).await
    }

    /// A fresh namespace for one test. Namespaces are never deleted: without a controller manager
    /// they would stay `Terminating`, and the whole server goes away with the test process anyway.
    pub async fn namespace(&self) -> Result<TestNamespace> {
        let client = self.admin_client().await?;
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some("t-".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        let name = created.metadata.name.context("the server named no namespace")?;
        Ok(TestNamespace { name, client })
    }
}

/// A client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    crate::install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// The directory with the binaries: from the environment, or the build cache.
pub(crate) fn binaries() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_ENV) {
        let dir = PathBuf::from(dir);
        for binary in ["etcd", "kube-apiserver"] {
            if !dir.join(binary).is_file() {
                bail!("{BIN_ENV} is {}, which holds no {binary}", dir.display());
            }
        }
        return Ok(dir);
    }
    crate::tools::cached(
        "build-control-plane.sh",
        "kube-apiserver and etcd",
        "cargo xtask tools",
    )
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn_logged(command: &mut Command, log: &Path) -> Result<Child> {
    let out = File::create(log)?;
    let err = out.try_clone()?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))
}

/// Stops the servers and removes the run directory once the test process (`parent`) has gone, whether
/// it returned, panicked or was killed. Statics are never dropped, so no destructor could do it.
fn spawn_watchdog(parent: u32, pids: &[u32], run_dir: &Path) -> Result<()> {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let keep = std::env::var(KEEP_ENV).is_ok_and(|v| v == "1");
    // A stopped server whose parent has gone may stay a zombie (not every init reaps), and `kill -0`
    // succeeds on zombies: liveness is read from /proc instead.
    let script = r#"
        parent=$1; dir=$2; keep=$3; shift 3
        alive() { for p in "$@"; do [ -e "/proc/$p" ] && ! grep -q ') Z ' "/proc/$p/stat" 2>/dev/null && return 0; done; return 1; }
        while alive "$parent"; do sleep 0.5; done
        kill "$@" 2>/dev/null
        for _ in 1 2 3 4 5 6 7 8 9 10; do alive "$@" || break; sleep 0.5; done
        kill -9 "$@" 2>/dev/null
        [ "$keep" = 1 ] || rm -rf "$dir"
    "#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("watchdog")
        .arg(parent.to_string())
        .arg(run_dir)
        .arg(if keep { "1" } else { "0" })
        .args(&pids)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the control plane watchdog")?;
    Ok(())
}

pub(crate) fn write_kubeconfig(path: &Path, server: &str, ca: &Path, cert: &Path, key: &Path) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "user", "user": {"client-certificate": cert, "client-key": key}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user", "namespace": "default"}}],
        "current-context": "test",
    });
    // JSON is valid YAML, and kubectl, helm and kube-rs all read it.
    std::fs::write(path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    }

    #[tokio::test]
    async fn watchdog_stops_servers_and_removes_files_when_the_test_process_is_gone() {
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::write(dir.join("etcd.log"), "x").unwrap();
        let mut parent = Command::new("sleep").arg("300").spawn().unwrap();
        let mut server = Command::new("sleep").arg("300").spawn().unwrap();
        spawn_watchdog(parent.id(), &[server.id()], &dir).unwrap();
        assert!(alive(server.id()));
        parent.kill().unwrap();
        parent.wait().unwrap();
        // The watchdog killed it: reap it so that it does not linger as a zombie of this process.
        let status = tokio::task::spawn_blocking(move || server.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(
            !status.success(),
            "the server was stopped by a signal, not by finishing"
        );
        crate::eventually(|| async {
            if dir.exists() {
                Err("run directory still there")
            } else {
                Ok(())
            }
        })
        .await
        .unwrap();
    }
}
