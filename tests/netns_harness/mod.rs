//! One node of a cluster, as the agent's end-to-end tests and benchmark need it: network namespaces for
//! the node and its pods, the emulator's IMDS on 169.254.169.254 inside the node namespace, the agent
//! binary running there against the shared kube-apiserver, and helpers to create the Kubernetes objects
//! a controller would (identities, bindings, assignments) and to call from pods.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use pod_identity_api::{
    AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, AzureIdentity,
    AzureIdentityBinding, EmbeddedAzureIdentity, EmbeddedAzureIdentityBinding, IdentityType, SecretReference,
    fixtures::{binding_of, identity_of_type, user_assigned_identity, user_assigned_identity_id},
    naming::assigned_identity_name,
};
use pod_identity_emulator::{Config, Emulator, ImdsListener, LogFilter, RequestRecord, Seed, Service};
use pod_identity_test_support::{
    ControlPlane, TestNamespace, eventually, fixtures,
    netns::{self, Node, PodNet},
};
use serde_json::{Value, json};

pub const TENANT: &str = "7f2c1a4e-0000-4000-8000-00000000000a";
pub const AUX_TENANT: &str = "7f2c1a4e-0000-4000-8000-00000000000b";
pub const SUBSCRIPTION: &str = "5e1d0b3c-0000-4000-8000-000000000001";
pub const CLIENT_A: &str = "aaaaaaaa-1111-4111-8111-111111111111";
pub const OBJECT_A: &str = "aaaaaaaa-2222-4222-8222-222222222222";
pub const CLIENT_B: &str = "bbbbbbbb-1111-4111-8111-111111111111";
pub const OBJECT_B: &str = "bbbbbbbb-2222-4222-8222-222222222222";
pub const SP_CLIENT: &str = "cccccccc-1111-4111-8111-111111111111";
pub const SP_OBJECT: &str = "cccccccc-2222-4222-8222-222222222222";
pub const SP_PASSWORD: &str = "sp-password-value";
pub const PROBE_PORT: u16 = 8085;
pub const TOKEN_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";

/// The scale set the node belongs to, and its instance the IMDS listener stands for.
pub fn scale_set_id() -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/nodepool"
    )
}

pub fn identity_resource_id(name: &str) -> String {
    user_assigned_identity_id(SUBSCRIPTION, name)
}

/// The workspace root (tests of several packages include this file).
pub fn repo_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("Cargo.lock").exists() {
        if !dir.pop() {
            panic!("no workspace root above {}", env!("CARGO_MANIFEST_DIR"));
        }
    }
    dir
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("crates/agent/tests/fixtures").join(name)
}

fn seed() -> Seed {
    let certificate = std::fs::read_to_string(fixture("service-principal.crt")).unwrap();
    let application = json!({
        "displayName": "sp-app", "clientId": SP_CLIENT, "objectId": SP_OBJECT,
        "secrets": [SP_PASSWORD], "certificates": [certificate],
    });
    serde_json::from_value(json!({
        "tenants": [
            {"id": TENANT, "applications": [application.clone()]},
            {"id": AUX_TENANT, "applications": [application]},
        ],
        "subscriptions": [{
            "id": SUBSCRIPTION, "tenantId": TENANT, "displayName": "tests",
            "resourceGroups": [{
                "name": "rg", "location": "westeurope",
                "userAssignedIdentities": [
                    {"name": "id-a", "clientId": CLIENT_A, "principalId": OBJECT_A},
                    {"name": "id-b", "clientId": CLIENT_B, "principalId": OBJECT_B},
                ],
                "virtualMachineScaleSets": [{
                    "name": "nodepool", "vmSize": "Standard_D2s_v3",
                    "identity": {"userAssignedIdentities": [identity_resource_id("id-b")]},
                    "instances": [{"instanceId": "0"}],
                }],
                "keyVaults": [{
                    "name": "testvault",
                    "secrets": [{"name": "db-password", "value": "s3cret"}],
                    "accessPolicies": [{"objectId": OBJECT_A, "permissions": {"secrets": ["get"]}}],
                }],
            }],
        }],
    }))
    .unwrap()
}

/// Runs `f` on a thread inside network namespace `netns`; sockets it creates belong to that namespace.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    netns::run_in(netns, f).unwrap()
}

/// The agent binary, built by `cargo test -p pod-identity-agent` (or `--workspace`), next to this test.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("POD_IDENTITY_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let binary = profile_dir.join("pod-identity-agent");
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!(
            "{} is not built: run these tests with `cargo test -p pod-identity-agent -p pod-identity-e2e` \
             (or `cargo xtask test`), or set POD_IDENTITY_AGENT_BIN",
            binary.display()
        )
    });
    // A binary built before the agent's latest source change is stale.
    let sources = repo_root().join("crates/agent");
    if let Some((newest, path)) =
        newest_file(&sources.join("src")).max(newest_file_of(&sources.join("Cargo.toml")))
    {
        assert!(
            built >= newest,
            "{} is older than {}: build it again with `cargo build -p pod-identity-agent` \
             (or run `cargo test -p pod-identity-agent -p pod-identity-e2e`)",
            binary.display(),
            path.display()
        );
    }
    binary
}

fn newest_file_of(path: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    Some((modified, path.to_path_buf()))
}

/// The most recently modified file below `dir`.
fn newest_file(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()) {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            newest_file_of(&path)
        };
        if candidate.as_ref().map(|c| &c.0) > newest.as_ref().map(|n| &n.0) {
            newest = candidate;
        }
    }
    newest
}

/// A node with the agent running on it.
pub struct Harness {
    /// The test's namespace (identities, bindings, pods).
    pub ns: TestNamespace,
    /// Another namespace, for cross-namespace checks.
    pub other_ns: String,
    /// Name of the Kubernetes node.
    pub node_name: String,
    /// Name of the node's network namespace.
    pub node_netns: String,
    node: Mutex<Node>,
    /// The emulator; its IMDS listens on 169.254.169.254:80 inside the node namespace only.
    pub emulator: Arc<Emulator>,
    agent: Mutex<Option<Child>>,
    binary: PathBuf,
    agent_args: Vec<String>,
    /// Where the agent's output goes.
    pub agent_log: PathBuf,
    /// CA of the emulator's TLS listener.
    pub ca_file: PathBuf,
    dir: tempfile::TempDir,
    relay: tokio::task::JoinHandle<()>,
    next_pod: AtomicU8,
}

impl Harness {
    /// Everything up, the agent ready.
    pub async fn start(extra_args: &[&str]) -> Self {
        Self::start_with_binary(agent_binary(), extra_args).await
    }

    /// The same with a given agent binary.
    pub async fn start_with_binary(binary: impl Into<PathBuf>, extra_args: &[&str]) -> Self {
        Self::try_start(binary.into(), extra_args)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    async fn try_start(binary: PathBuf, extra_args: &[&str]) -> Result<Self> {
        pod_identity_test_support::install_crypto_provider();
        netns::require_privileges()?;
        netns::require_tool("iptables", "iptables")?;
        netns::require_tool("conntrack", "conntrack")?;
        netns::require_tool("curl", "curl")?;
        let plane = ControlPlane::shared().await;
        let ns = plane.namespace().await?;
        let other_ns = plane.namespace().await?.name;
        fixtures::apply_crds(&ns.client, &pod_identity_api::crds::all()).await?;
        let node_name = format!("node-{}", ns.name);
        fixtures::create_node(
            &ns.client,
            &node_name,
            Some(&format!("azure://{}/virtualMachines/0", scale_set_id())),
        )
        .await?;

        let node = Node::create()?;
        let node_netns = node.netns.clone();
        node.set_hosts(&node_netns, &[(Ipv4Addr::LOCALHOST, "login.microsoftonline.com")])?;
        let dir = tempfile::tempdir()?;

        let mut config = Config::new(seed());
        config.imds = vec![ImdsListener {
            addr: SocketAddr::from((netns::METADATA_IP, 80)),
            instance: format!("{}/virtualMachines/0", scale_set_id()),
        }];
        config.azure_addr = SocketAddr::from(([0, 0, 0, 0], 443));
        let runtime = tokio::runtime::Handle::current();
        let emulator = tokio::task::spawn_blocking({
            let netns = node_netns.clone();
            move || in_netns(&netns, move || runtime.block_on(Emulator::start(config)))
        })
        .await?
        .context("starting the emulator inside the node namespace")?;
        let ca_file = dir.path().join("emulator-ca.pem");
        std::fs::write(&ca_file, emulator.ca_pem())?;

        let relay = relay_apiserver(&node_netns, plane.server_url()).await?;
        let agent_log = dir.path().join("agent.log");
        let mut agent_args: Vec<String> = [
            "--node",
            &node_name,
            "--kubeconfig",
            &plane.admin_kubeconfig().display().to_string(),
            "--http-probe-port",
            &PROBE_PORT.to_string(),
            "--prometheus-port",
            &PROBE_PORT.to_string(),
            "--extra-ca-file",
            &ca_file.display().to_string(),
            "--ipt-update-interval-sec",
            "5",
            "--assignment-wait-sec",
            "10",
            "--pod-wait-sec",
            "1",
            "--log-format",
            "text",
            "--log-level",
            "info,pod_identity_agent=debug",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for extra in extra_args {
            // A flag given by the test replaces the default of the same name.
            let name = extra.split('=').next().unwrap_or(extra);
            if name.starts_with("--")
                && let Some(at) = agent_args.iter().position(|a| a == name)
            {
                agent_args.drain(at..at + 2);
            }
            agent_args.push((*extra).to_owned());
        }
        let harness = Self {
            ns,
            other_ns,
            node_name,
            node_netns,
            node: Mutex::new(node),
            emulator: Arc::new(emulator),
            agent: Mutex::new(None),
            binary,
            agent_args,
            agent_log,
            ca_file,
            dir,
            relay,
            next_pod: AtomicU8::new(1),
        };
        harness.spawn_agent()?;
        harness.wait_ready().await?;
        Ok(harness)
    }

    fn spawn_agent(&self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.agent_log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node_netns])
            .arg(&self.binary)
            .args(&self.agent_args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent")?;
        *self.agent.lock().unwrap() = Some(child);
        Ok(())
    }

    async fn wait_ready(&self) -> Result<()> {
        let url = format!("http://127.0.0.1:{PROBE_PORT}/readyz");
        let result = eventually(|| async {
            if let Some(child) = self.agent.lock().unwrap().as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(anyhow::anyhow!("the agent exited with {status}"));
            }
            let out = self.node_output(&[
                "curl",
                "-s",
                "-m",
                "2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url,
            ]);
            if out.trim() == "200" {
                Ok(())
            } else {
                Err(anyhow::anyhow!("readyz answered {out:?}"))
            }
        })
        .await;
        result.with_context(|| {
            format!(
                "the agent did not become ready; its log:\n{}",
                self.agent_log_text()
            )
        })
    }

    /// The agent's output so far.
    pub fn agent_log_text(&self) -> String {
        std::fs::read_to_string(&self.agent_log).unwrap_or_default()
    }

    /// The agent's process ID.
    pub fn agent_pid(&self) -> u32 {
        self.agent.lock().unwrap().as_ref().map(Child::id).unwrap()
    }

    /// SIGKILL: the agent gets no chance to clean anything up.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again and waits until it is ready.
    pub async fn restart_agent(&mut self) {
        self.spawn_agent().unwrap();
        self.wait_ready().await.unwrap();
    }

    /// SIGTERM, as the kubelet stops it; the agent must exit cleanly.
    pub fn stop_agent(&self) {
        if let Some(mut child) = self.agent.lock().unwrap().take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "the agent exited with {status}:\n{}",
                self.agent_log_text()
            );
        }
    }

    /// Output of a command in the node namespace (empty on failure).
    pub fn node_output(&self, argv: &[&str]) -> String {
        let node = self.node.lock().unwrap();
        node.run(&self.node_netns, argv)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Runs a command in the node namespace; it must succeed.
    pub fn node_cmd(&self, argv: &[&str]) {
        let node = self.node.lock().unwrap();
        node.run(&self.node_netns, argv).unwrap();
    }

    /// Our rules in the nat table, as `iptables -S` lists them.
    pub fn nat_rules(&self) -> String {
        self.node_output(&["iptables", "-w", "-t", "nat", "-S"])
            .lines()
            .filter(|l| l.contains("POD-IDENTITY"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> String {
        self.node_output(&[
            "curl",
            "-s",
            "-m",
            "5",
            &format!("http://127.0.0.1:{PROBE_PORT}/metrics"),
        ])
    }

    /// A pod network namespace and its Pod object (Running, on this node, with that IP).
    pub async fn pod(&self, name: &str, selector: Option<&str>) -> PodNet {
        self.pod_in(&self.ns.name.clone(), name, selector).await
    }

    /// The same, in the other namespace.
    pub async fn pod_in_other_namespace(&self, name: &str, selector: Option<&str>) -> PodNet {
        self.pod_in(&self.other_ns.clone(), name, selector).await
    }

    async fn pod_in(&self, namespace: &str, name: &str, selector: Option<&str>) -> PodNet {
        let index = self.next_pod.fetch_add(1, Ordering::SeqCst);
        let net = self.node.lock().unwrap().add_pod(index).unwrap();
        let mut labels = std::collections::BTreeMap::new();
        if let Some(selector) = selector {
            labels.insert(pod_identity_api::POD_LABEL.to_owned(), selector.to_owned());
        }
        fixtures::create_pod(
            &self.ns.client,
            &fixtures::PodTemplate {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                labels,
                node: Some(self.node_name.clone()),
                ip: Some(net.ip.to_string()),
            },
        )
        .await
        .unwrap();
        net
    }

    /// A pod like [`Harness::pod`] whose spec lists the `IdentityReady` readiness gate, as the
    /// controller's admission webhook writes it.
    pub async fn gated_pod(&self, name: &str, selector: Option<&str>) -> PodNet {
        let index = self.next_pod.fetch_add(1, Ordering::SeqCst);
        let net = self.node.lock().unwrap().add_pod(index).unwrap();
        let labels = selector.map_or_else(|| json!({}), |s| json!({pod_identity_api::POD_LABEL: s}));
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "nodeName": self.node_name,
                "containers": [{"name": "app", "image": "example.invalid/app:1"}],
                "readinessGates": [{"conditionType": pod_identity_api::readiness::IDENTITY_READY_CONDITION}],
            },
        }))
        .unwrap();
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.ns.client.clone(), &self.ns.name)
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
        fixtures::set_pod_running(&self.ns.client, &self.ns.name, name, &net.ip.to_string())
            .await
            .unwrap();
        net
    }

    /// Creates (once) the user-assigned identity `name` (id-a or id-b) and a binding of it to `selector`.
    pub async fn bind(&self, identity: &str, selector: &str) {
        if identity == "id-a" || identity == "id-b" {
            let client_id = if identity == "id-a" { CLIENT_A } else { CLIENT_B };
            self.ensure_identity(
                &user_assigned_identity(&self.ns.name, identity, client_id)
                    .with_resource_id(&identity_resource_id(identity)),
            )
            .await;
        }
        let binding = binding_of(&self.ns.name, identity, selector);
        fixtures::create(&self.ns.client, &binding).await.unwrap();
    }

    /// Deletes the binding of `identity`.
    pub async fn unbind(&self, identity: &str) {
        Api::<AzureIdentityBinding>::namespaced(self.ns.client.clone(), &self.ns.name)
            .delete(&format!("{identity}-binding"), &DeleteParams::default())
            .await
            .unwrap();
    }

    async fn ensure_identity(&self, identity: &AzureIdentity) {
        let api = Api::<AzureIdentity>::namespaced(self.ns.client.clone(), &self.ns.name);
        if api.get_opt(&identity.name_any()).await.unwrap().is_none() {
            fixtures::create(&self.ns.client, identity).await.unwrap();
        }
    }

    /// A service principal identity (type 1 secret or type 2 certificate) with its Secret.
    pub async fn service_principal_secret(&self, name: &str, kind: i64, auxiliary: &[&str]) {
        let data = if kind == 1 {
            std::collections::BTreeMap::from([("clientSecret".to_owned(), ByteString(SP_PASSWORD.into()))])
        } else {
            std::collections::BTreeMap::from([
                (
                    "certificate".to_owned(),
                    ByteString(std::fs::read(fixture("service-principal.p12")).unwrap()),
                ),
                ("password".to_owned(), ByteString(b"test-password".to_vec())),
            ])
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(format!("{name}-credential")),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        };
        Api::<Secret>::namespaced(self.ns.client.clone(), &self.ns.name)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let type_ = if kind == 1 {
            IdentityType::ServicePrincipalSecret
        } else {
            IdentityType::ServicePrincipalCertificate
        };
        let mut identity = identity_of_type(&self.ns.name, name, type_)
            .with_client_id(SP_CLIENT)
            .with_tenant_id(TENANT);
        identity.spec.auxiliary_tenant_ids =
            (!auxiliary.is_empty()).then(|| auxiliary.iter().map(|t| (*t).to_owned()).collect());
        identity.spec.client_password = Some(SecretReference {
            name: Some(format!("{name}-credential")),
            namespace: None,
        });
        identity.spec.ad_endpoint = Some("https://login.microsoftonline.com/".to_owned());
        self.ensure_identity(&identity).await;
    }

    /// What the controller writes once it has assigned (or started assigning) `identity` to `pod`; with
    /// `Assigned` the identity is put on the scale set first, as the controller does.
    pub async fn assigned(&self, pod: &PodNet, identity: &str, status: &str) {
        let pod_name = self.pod_name(pod).await;
        self.assigned_to(&pod_name, identity, status).await;
    }

    /// The same for the pod of that name (for pods that share an IP, or have none yet).
    pub async fn assigned_to(&self, pod_name: &str, identity: &str, status: &str) {
        if status == "Assigned" {
            self.emulator_assign(identity);
        }
        let pod_name = pod_name.to_owned();
        let ns = &self.ns.name;
        let identities = Api::<AzureIdentity>::namespaced(self.ns.client.clone(), ns);
        let bindings = Api::<AzureIdentityBinding>::namespaced(self.ns.client.clone(), ns);
        let identity_object = identities.get(identity).await.unwrap();
        let binding_object = bindings.get(&format!("{identity}-binding")).await.unwrap();
        let name = assigned_identity_name(&pod_name, ns, identity);
        let mut object = AzureAssignedIdentity::new(
            &name,
            AzureAssignedIdentitySpec {
                azure_identity_ref: Some(EmbeddedAzureIdentity {
                    api_version: "aadpodidentity.k8s.io/v1".into(),
                    kind: "AzureIdentity".into(),
                    metadata: identity_object.metadata.clone(),
                    spec: identity_object.spec.clone(),
                    status: None,
                }),
                azure_binding_ref: Some(EmbeddedAzureIdentityBinding {
                    api_version: "aadpodidentity.k8s.io/v1".into(),
                    kind: "AzureIdentityBinding".into(),
                    metadata: binding_object.metadata.clone(),
                    spec: binding_object.spec.clone(),
                    status: None,
                }),
                pod: pod_name,
                pod_namespace: ns.clone(),
                nodename: self.node_name.clone(),
                replicas: None,
            },
        );
        object.metadata.labels = Some(std::collections::BTreeMap::from([(
            pod_identity_api::NODENAME_LABEL.to_owned(),
            self.node_name.clone(),
        )]));
        object.metadata.managed_fields = None;
        object.status = Some(AzureAssignedIdentityStatus {
            status: Some(status.to_owned()),
            available_replicas: Some(1),
        });
        let mut value = serde_json::to_value(&object).unwrap();
        for embedded in ["azureIdentityRef", "azureBindingRef"] {
            let meta = &mut value["spec"][embedded]["metadata"];
            if let Some(meta) = meta.as_object_mut() {
                meta.remove("managedFields");
            }
        }
        Api::<AzureAssignedIdentity>::namespaced(self.ns.client.clone(), ns)
            .patch(
                &name,
                &PatchParams::apply("netns-tests").force(),
                &Patch::Apply(&value),
            )
            .await
            .unwrap();
    }

    async fn pod_name(&self, pod: &PodNet) -> String {
        let ip = pod.ip.to_string();
        let pods = Api::<k8s_openapi::api::core::v1::Pod>::all(self.ns.client.clone());
        let list = pods
            .list(&kube::api::ListParams::default().fields(&format!("spec.nodeName={}", self.node_name)))
            .await
            .unwrap();
        list.items
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(ip.as_str()))
            .and_then(|p| p.metadata.name)
            .unwrap()
    }

    /// Lets the emulator's Entra exchange the test cluster's service-account tokens as Entra would: it
    /// trusts the cluster's CA and, like Entra, fetches the issuer's discovery documents anonymously (which
    /// the cluster then allows, once for the whole control plane).
    pub async fn trust_the_cluster_issuer(&self) {
        let plane = ControlPlane::shared().await;
        let ca = std::fs::read_to_string(plane.ca_cert()).unwrap();
        self.emulator
            .update_settings(|s| s.federation.issuer_ca_pems = vec![ca]);
        allow_anonymous_issuer_discovery(&self.ns.client).await;
    }

    /// The cluster's service-account issuer (the `iss` of its tokens).
    pub async fn issuer(&self) -> String {
        ControlPlane::shared().await.server_url().to_owned()
    }

    /// Moves identity `name` (id-a or id-b, created by [`Self::bind`]) to the federated backend, in the tenant
    /// of the emulator's subscription.
    pub async fn federate(&self, name: &str) {
        let patch = json!({
            "metadata": {"annotations": {pod_identity_api::federation::BACKEND_ANNOTATION: "federated"}},
            "spec": {"tenantID": TENANT},
        });
        Api::<AzureIdentity>::namespaced(self.ns.client.clone(), &self.ns.name)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// The subject ServiceAccount of identity `name` of the test namespace, in `subjects`, as the controller
    /// creates it; returns its `sub`.
    pub async fn create_subject(&self, subjects: &str, name: &str) -> String {
        let account = pod_identity_api::federation::subject_account(&pod_identity_api::ObjectKey::new(
            self.ns.name.clone(),
            name,
        ));
        let object: k8s_openapi::api::core::v1::ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": account}})).unwrap();
        match Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(self.ns.client.clone(), subjects)
            .create(&PostParams::default(), &object)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => panic!("creating subject {subjects}/{account}: {error}"),
        }
        pod_identity_api::federation::subject(subjects, &account)
    }

    /// Replaces the federated identity credentials of user-assigned identity `identity` (id-a or id-b),
    /// behind ARM's back: `(name, issuer, subject, audience)`.
    pub fn set_federated_credentials(&self, identity: &str, credentials: &[(&str, &str, &str, &str)]) {
        let seeds: Vec<pod_identity_emulator::seed::FederatedCredentialSeed> = credentials
            .iter()
            .map(
                |(name, issuer, subject, audience)| pod_identity_emulator::seed::FederatedCredentialSeed {
                    name: (*name).into(),
                    issuer: (*issuer).into(),
                    subject: (*subject).into(),
                    audiences: vec![(*audience).into()],
                },
            )
            .collect();
        let parsed = pod_identity_emulator::federated_credentials::from_seeds(&seeds).unwrap();
        self.emulator.with_state(|s| {
            s.uami_mut(&identity_resource_id(identity))
                .unwrap()
                .federated_credentials = parsed;
        });
    }

    /// The federated identity credentials of user-assigned identity `identity`: `(name, issuer, subject)`.
    pub fn federated_credentials(&self, identity: &str) -> Vec<(String, String, String)> {
        self.emulator.with_state(|s| {
            s.uami(&identity_resource_id(identity))
                .unwrap()
                .federated_credentials
                .iter()
                .map(|c| (c.name.clone(), c.issuer.clone(), c.subject.clone()))
                .collect()
        })
    }

    /// ARM requests other than reads the emulator saw after sequence number `since`.
    pub fn arm_writes(&self, since: u64) -> Vec<RequestRecord> {
        self.emulator
            .requests(&LogFilter {
                service: Some(Service::Arm),
                since: Some(since),
                ..LogFilter::default()
            })
            .into_iter()
            .filter(|r| r.method != "GET")
            .collect()
    }

    /// The user-assigned identities (lower-case IDs) on the node's scale set now.
    pub fn scale_set_identities(&self) -> Vec<String> {
        self.emulator
            .snapshot()
            .subscriptions
            .iter()
            .flat_map(|s| &s.resource_groups)
            .flat_map(|g| &g.virtual_machine_scale_sets)
            .filter(|ss| ss.name == "nodepool")
            .flat_map(|ss| {
                ss.identity
                    .user_assigned_identities
                    .iter()
                    .map(|i| i.to_lowercase())
            })
            .collect()
    }

    /// Puts a user-assigned identity on the node's scale set, behind ARM's back.
    pub fn emulator_assign(&self, identity: &str) {
        assert!(self.emulator.set_identities_directly(
            &scale_set_id(),
            &[identity_resource_id(identity)],
            &[]
        ));
    }

    /// Takes it off again.
    pub fn emulator_unassign(&self, identity: &str) {
        assert!(self.emulator.set_identities_directly(
            &scale_set_id(),
            &[],
            &[identity_resource_id(identity)]
        ));
    }

    /// Writes the hosts file processes in a pod namespace see.
    pub fn set_pod_hosts(&self, pod: &PodNet, entries: &[(Ipv4Addr, &str)]) {
        self.node.lock().unwrap().set_hosts(&pod.netns, entries).unwrap();
    }

    /// IMDS requests the emulator saw after sequence number `since`.
    pub fn imds_requests(&self, since: u64) -> Vec<RequestRecord> {
        self.emulator.requests(&LogFilter {
            service: Some(Service::Imds),
            since: Some(since),
            ..LogFilter::default()
        })
    }

    /// How many IMDS tokens were issued for a client ID.
    pub fn tokens_minted_for(&self, client_id: &str) -> usize {
        self.imds_requests(0)
            .iter()
            .filter(|r| r.status == 200 && r.identity.as_deref() == Some(client_id))
            .count()
    }

    /// Whether a request source (`ip:port`) is the node itself rather than a pod.
    pub fn is_node_address(&self, source: &str) -> bool {
        let ip = pod_identity_emulator::observe::source_ip(source);
        ip == "127.0.0.1" || ip == netns::METADATA_IP.to_string()
    }

    /// Reasons and notes of the Events about a pod of the test namespace (waits for at least one).
    pub async fn events_about(&self, pod: &str) -> Vec<String> {
        let api =
            Api::<k8s_openapi::api::events::v1::Event>::namespaced(self.ns.client.clone(), &self.ns.name);
        eventually(|| async {
            let events: Vec<String> = api
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
                .map(|e| format!("{}: {}", e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
                .collect();
            if events.is_empty() {
                bail!("no Event about {pod} yet")
            } else {
                Ok(events)
            }
        })
        .await
        .unwrap()
    }

    /// A request loop from a pod for `duration`: counts of 200s, refused or reset connections, and
    /// anything else, as JSON.
    pub fn load(&self, pod: &PodNet, duration: Duration) -> Load {
        let netns = pod.netns.clone();
        let seconds = duration.as_secs_f64().to_string();
        let refused = self.dir.path().join(format!("load-{}-refused", pod.netns));
        let marker = refused.display().to_string();
        let counts = tokio::task::spawn_blocking(move || {
            let output = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns,
                    "python3",
                    "-c",
                    LOAD_SCRIPT,
                    TOKEN_URL,
                    &seconds,
                    &marker,
                ])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
                panic!(
                    "load script output {stdout:?} ({e}): {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            })
        });
        Load { counts, refused }
    }

    /// curl from a pod on a blocking thread.
    pub fn curl_in_background(
        &self,
        pod: &PodNet,
        url: &str,
        args: &[&str],
    ) -> tokio::task::JoinHandle<(u16, String)> {
        let netns = pod.netns.clone();
        let url = url.to_owned();
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            curl_in(&netns, &url, &args).0
        })
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.relay.abort();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.agent_log_text());
        }
    }
}

/// Lets anonymous clients read the service-account issuer's discovery documents, as a cluster whose tokens
/// Entra exchanges must (Entra fetches them without credentials). Idempotent: one binding per control plane.
pub async fn allow_anonymous_issuer_discovery(client: &kube::Client) {
    use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some("pod-identity-test-anonymous-issuer-discovery".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "system:service-account-issuer-discovery".into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Group".into(),
            name: "system:unauthenticated".into(),
            namespace: None,
        }]),
    };
    match Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("binding issuer discovery to system:unauthenticated: {e}"),
    }
}

/// Installs the chart into a fresh namespace with `helm install` (extra arguments such as `--set`);
/// returns the namespace, also the release name.
pub async fn install_chart(plane: &ControlPlane, extra: &[&str]) -> String {
    let ns = plane.namespace().await.unwrap();
    let chart = pod_identity_test_support::tools::repository().join("charts/pod-identity");
    let home = std::env::temp_dir().join("pod-identity-helm-home");
    let output = Command::new(pod_identity_test_support::tools::helm().unwrap())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .arg("--kubeconfig")
        .arg(plane.admin_kubeconfig())
        .args([
            "install",
            &ns.name,
            chart.to_str().unwrap(),
            "--namespace",
            &ns.name,
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ns.name
}

/// A request loop running in a pod ([`Harness::load`]).
pub struct Load {
    counts: tokio::task::JoinHandle<Value>,
    /// A file the loop creates when it is first refused.
    refused: PathBuf,
}

impl Load {
    /// Waits until a request of the loop has been refused, reset or cut.
    pub async fn refused(&self) {
        eventually(|| async {
            if self.refused.exists() {
                Ok(())
            } else {
                Err("no request of the load has been refused yet")
            }
        })
        .await
        .unwrap();
    }

    /// Waits for the loop to end: its counts.
    pub async fn counts(self) -> Value {
        self.counts.await.unwrap()
    }
}

/// Python's standard library only, so it runs without the SDK venv.
const LOAD_SCRIPT: &str = r#"
import json, sys, time, urllib.request, urllib.error, http.client
url, seconds, refused_marker = sys.argv[1], float(sys.argv[2]), sys.argv[3]
counts = {"ok": 0, "refused": 0, "other": 0, "errors": []}
# A connection refused, reset or cut while the agent is down is what fail-closed looks like. So is a
# request in flight when the restarted agent flushes the IMDS conntrack entries: it stalls until the
# client's timeout. None of these reaches IMDS, which the tests check in the emulator's log; an error
# status is something else.
cut = (ConnectionError, http.client.IncompleteRead, TimeoutError)
# The first one creates the marker file, which tells the test that the load has met the outage.
def refused():
    if counts["refused"] == 0:
        open(refused_marker, "w").close()
    counts["refused"] += 1
    time.sleep(0.05)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        req = urllib.request.Request(url, headers={"Metadata": "true"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()
            counts["ok" if resp.status == 200 else "other"] += 1
    except urllib.error.HTTPError as e:
        counts["other"] += 1
        counts["errors"].append("HTTP %d" % e.code)
    except urllib.error.URLError as e:
        if isinstance(e.reason, cut):
            refused()
        else:
            counts["other"] += 1
            counts["errors"].append(repr(e.reason))
    except cut:
        refused()
    except Exception as e:
        counts["other"] += 1
        counts["errors"].append(repr(e))
print(json.dumps(counts))
"#;

/// Runs curl in a pod: (status, body); status 0 when no HTTP answer came.
pub fn curl(_h: &Harness, pod: &PodNet, url: &str, args: &[&str]) -> (u16, String) {
    curl_in(&pod.netns, url, args).0
}

/// Runs curl in a pod: (status, response headers, body).
pub fn curl_with_headers(_h: &Harness, pod: &PodNet, url: &str, args: &[&str]) -> (u16, String, String) {
    let ((status, body), headers) = curl_in(&pod.netns, url, args);
    (status, headers, body)
}

fn curl_in(netns: &str, url: &str, args: &[&str]) -> ((u16, String), String) {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "curl",
            "-s",
            "--path-as-is",
            "-g",
            "-m",
            "30",
            "-D",
            "/dev/stderr",
        ])
        .args(args)
        .args(["-w", "\n%{http_code}", url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    let status = code.trim().parse().unwrap_or(0);
    (
        (status, body.to_owned()),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The claims of a JWT (unverified: the emulator signed it; tests read whose it is).
pub fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Relays connections made inside `netns` to `127.0.0.1:<port>` to the API server on the host's loopback.
async fn relay_apiserver(netns: &str, server_url: &str) -> Result<tokio::task::JoinHandle<()>> {
    let port: u16 = server_url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .context("the API server URL has no port")?;
    netns::relay_loopback_port(netns, port).await
}
