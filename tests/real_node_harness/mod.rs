//! pod-identity on a real node, installed the way users install it: images of the freshly built binaries
//! loaded into the node's containerd, `helm install` of the chart with values only, and the local Azure
//! standing in for Azure inside the node's network namespace (its IMDS on 169.254.169.254 for the node's
//! scale-set instance, ARM, Entra and Key Vault on the node's address). Used by the real-node tests and by
//! `cargo xtask demo`.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Namespace, Pod, Secret},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use pod_identity_api::{AzureIdentity, AzureIdentityBinding};
use pod_identity_emulator::{Config, Emulator, ImdsListener, LogFilter, RequestRecord, Seed, Service};
use pod_identity_test_support::{
    eventually, netns,
    real_node::{
        ImageSet, ImageSpec, Layout, NodeOptions, RealNode,
        images::{self, REGISTRY},
        net,
    },
    tools,
};
use serde_json::{Value, json};

pub const TENANT: &str = "3c9d2e1f-0000-4000-8000-00000000000a";
pub const SUBSCRIPTION: &str = "3c9d2e1f-0000-4000-8000-000000000001";
pub const CONTROLLER_CLIENT: &str = "3c9d2e1f-1111-4111-8111-000000000001";
pub const CONTROLLER_OBJECT: &str = "3c9d2e1f-2222-4222-8222-000000000001";
pub const CONTROLLER_SECRET: &str = "real-node-controller-secret";
pub const CLIENT_A: &str = "3c9d2e1f-1111-4111-8111-00000000000a";
pub const OBJECT_A: &str = "3c9d2e1f-2222-4222-8222-00000000000a";
pub const CLIENT_B: &str = "3c9d2e1f-1111-4111-8111-00000000000b";
pub const OBJECT_B: &str = "3c9d2e1f-2222-4222-8222-00000000000b";
pub const CLIENT_C: &str = "3c9d2e1f-1111-4111-8111-00000000000c";
pub const OBJECT_C: &str = "3c9d2e1f-2222-4222-8222-00000000000c";
pub const CLIENT_D: &str = "3c9d2e1f-1111-4111-8111-00000000000d";
pub const OBJECT_D: &str = "3c9d2e1f-2222-4222-8222-00000000000d";
pub const NODES_GROUP: &str = "nodes";
pub const IDENTITIES_GROUP: &str = "identities";
pub const VAULT: &str = "nodevault";
pub const SECRET_NAME: &str = "greeting";
pub const SECRET_VALUE: &str = "hello from Key Vault";
/// Where the chart is installed.
pub const INSTALL_NAMESPACE: &str = "pod-identity";
/// The release name; the chart names its objects `<release>-agent`, `<release>-controller`.
pub const RELEASE: &str = "pod-identity";
/// The Secret with `azure.json` and the local Azure's CA, given to the chart as `azureConfig.existingSecret`.
pub const AZURE_SECRET: &str = "azure-config";
/// What pods ask for, as any Azure SDK would.
pub const TOKEN_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";

/// The node's scale set.
pub fn scale_set_id() -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/{NODES_GROUP}/providers/Microsoft.Compute/virtualMachineScaleSets/nodepool"
    )
}

/// A user-assigned identity's resource ID.
pub fn identity_id(name: &str) -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/{IDENTITIES_GROUP}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

/// The local Azure's state: the controller's service principal (Contributor on the subscription), the
/// node's scale set with one instance, four identities (`id-a` to `id-d`), a vault that identity `id-a`
/// may read.
pub fn seed() -> Result<Seed> {
    Ok(serde_json::from_value(json!({
        "tenants": [{"id": TENANT, "applications": [{
            "displayName": "pod-identity-controller", "clientId": CONTROLLER_CLIENT,
            "objectId": CONTROLLER_OBJECT, "secrets": [CONTROLLER_SECRET],
        }]}],
        "subscriptions": [{"id": SUBSCRIPTION, "tenantId": TENANT, "displayName": "real-node", "resourceGroups": [
            {"name": IDENTITIES_GROUP, "location": "westeurope", "userAssignedIdentities": [
                {"name": "id-a", "clientId": CLIENT_A, "principalId": OBJECT_A},
                {"name": "id-b", "clientId": CLIENT_B, "principalId": OBJECT_B},
                {"name": "id-c", "clientId": CLIENT_C, "principalId": OBJECT_C},
                {"name": "id-d", "clientId": CLIENT_D, "principalId": OBJECT_D},
            ]},
            {"name": NODES_GROUP, "location": "westeurope",
             "virtualMachineScaleSets": [{"name": "nodepool", "instances": [{"instanceId": "0"}]}],
             "keyVaults": [{"name": VAULT,
                "secrets": [{"name": SECRET_NAME, "value": SECRET_VALUE}],
                "accessPolicies": [{"objectId": OBJECT_A, "permissions": {"secrets": ["get"]}}]}]},
        ]}],
        "roleAssignments": [{
            "principalId": CONTROLLER_OBJECT, "scope": format!("/subscriptions/{SUBSCRIPTION}"),
            "roleDefinitionName": "Contributor",
        }],
    }))?)
}

/// The images every run packs from the binaries in `bin_dir`.
pub fn image_specs(bin_dir: &Path, pause: PathBuf) -> Vec<ImageSpec> {
    vec![
        ImageSpec::new(
            "agent",
            Some(bin_dir.join("pod-identity-agent")),
            "/usr/local/bin/pod-identity-agent",
            None,
        ),
        ImageSpec::new(
            "controller",
            Some(bin_dir.join("pod-identity-controller")),
            "/usr/local/bin/pod-identity-controller",
            Some("65532:65532"),
        ),
        ImageSpec::new("toolbox", None, "/bin/sh", Some("65532:65532")),
        ImageSpec::new("pause", Some(pause), "/pause", None),
    ]
}

/// Packs the images of the binaries in `bin_dir` (cached by content).
pub fn pack_images(bin_dir: &Path) -> Result<ImageSet> {
    let cache = tools::cache_root().join("images");
    let pause = images::build_pause(&cache)?;
    images::pack_all(&image_specs(bin_dir, pause), &cache)
}

/// The directory of the workspace's binaries next to the running test.
pub fn test_bin_dir() -> Result<PathBuf> {
    let agent = tools::workspace_binary("pod-identity-agent")?;
    tools::workspace_binary("pod-identity-controller")?;
    Ok(agent.parent().context("no binary directory")?.to_owned())
}

/// A pod created by [`Cluster::pod`].
#[derive(Clone, Debug)]
pub struct TestPod {
    pub namespace: String,
    pub name: String,
    pub ip: String,
}

/// A real node with the local Azure inside it and the install namespace ready for the chart.
///
/// It holds no Kubernetes client: a client belongs to the runtime that made it, and one cluster may serve
/// several tests, each on a runtime of its own; [`Cluster::session`] gives each its client. The local
/// Azure runs on a runtime of its own for the same reason.
pub struct Cluster {
    pub node: RealNode,
    pub emulator: Emulator,
    pub images: ImageSet,
    pub ca_pem: String,
    runtime: Option<tokio::runtime::Runtime>,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// One test's (or the demo's) view of a [`Cluster`], with a client of its own runtime.
pub struct Session<'a> {
    pub cluster: &'a Cluster,
    pub client: Client,
}

impl std::ops::Deref for Session<'_> {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        self.cluster
    }
}

impl Cluster {
    /// Packs the images of `bin_dir`'s binaries, starts the node with them, and the local Azure in it.
    pub async fn start(bin_dir: &Path) -> Result<Self> {
        Self::start_with(bin_dir, |_| {}).await
    }

    /// The same, with node options adjusted first (taints).
    pub async fn start_with(bin_dir: &Path, adjust: impl FnOnce(&mut NodeOptions)) -> Result<Self> {
        let images = pack_images(bin_dir)?;
        let mut options = NodeOptions {
            provider_id: Layout::provider_id(&scale_set_id(), "0"),
            register_with_taints: Vec::new(),
            images: images.clone(),
        };
        adjust(&mut options);
        let node = RealNode::start(options).await?;

        let mut config = Config::new(seed()?);
        config.imds = vec![ImdsListener {
            addr: SocketAddr::from((net::METADATA_IP, 80)),
            instance: format!("{}/virtualMachines/0", scale_set_id()),
        }];
        config.azure_addr = SocketAddr::from((net::NODE_IP, 443));
        config.tls_names = vec![net::NODE_IP.to_string()];
        // Built inside the node's network namespace, so that its threads (which inherit it) make the local
        // Azure's own connections from there too: Entra fetching the cluster's issuer documents reaches the
        // API server at the node's address, as from anywhere on the node's network.
        let netns = node.netns();
        let runtime = netns::run_in(&netns, || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("local-azure")
                .enable_all()
                .build()
        })??;
        let handle = runtime.handle().clone();
        let emulator = tokio::task::spawn_blocking(move || {
            netns::run_in(&netns, move || handle.block_on(Emulator::start(config)))
        })
        .await??
        .context("starting the local Azure inside the node")?;
        let ca_pem = emulator.ca_pem().to_owned();
        let dir = tempfile::Builder::new()
            .prefix("pod-identity-real-node-")
            .tempdir()?;
        let cluster = Self {
            node,
            emulator,
            images,
            ca_pem,
            runtime: Some(runtime),
            dir,
        };
        cluster.session().await?.prepare_install_namespace().await?;
        Ok(cluster)
    }

    /// A client for the calling runtime.
    pub async fn session(&self) -> Result<Session<'_>> {
        Ok(Session {
            cluster: self,
            client: self.node.client().await?,
        })
    }

    /// Runs helm against the node's cluster; fails with its output when it fails.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let helm = tools::helm()?;
        let home = self.dir.path().join("helm");
        let output = Command::new(helm)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .arg("--kubeconfig")
            .arg(self.node.admin_kubeconfig())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running helm")?;
        if !output.status.success() {
            bail!(
                "helm {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The `--set` values that install the chart on this node with the local Azure: the run's images,
    /// never pulled; the Secret with `azure.json`; the controller pointed at the local ARM and Entra.
    pub fn values(&self) -> Vec<String> {
        let azure = format!("https://{}", net::NODE_IP);
        vec![
            format!("image.registry={REGISTRY}"),
            format!("image.tag={}", self.images.tag),
            "image.pullPolicy=Never".into(),
            format!("azureConfig.existingSecret={AZURE_SECRET}"),
            format!("controller.extraArgs[0]=--arm-endpoint={azure}"),
            format!("controller.extraArgs[1]=--authority-host={azure}"),
            "controller.extraArgs[2]=--azure-ca-file=/etc/kubernetes/azure/ca.pem".into(),
            "controller.leaderElection.duration=6s".into(),
            "controller.batchWindow=200ms".into(),
        ]
    }

    /// `helm install` (or `upgrade` with `command = "upgrade"`) of the repository's chart with `values`.
    pub fn helm_release(&self, command: &str, values: &[String]) -> Result<String> {
        let chart = tools::repository().join("charts/pod-identity");
        let chart = chart.display().to_string();
        let mut args: Vec<String> = vec![
            command.into(),
            RELEASE.into(),
            chart,
            "--namespace".into(),
            INSTALL_NAMESPACE.into(),
        ];
        for value in values {
            args.push("--set".into());
            args.push(value.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.helm(&args)
    }

    /// Whether the release is installed.
    pub fn installed(&self) -> bool {
        self.helm(&["status", RELEASE, "--namespace", INSTALL_NAMESPACE])
            .is_ok()
    }

    /// `kubectl exec` into a pod's container: status and output.
    pub fn exec(&self, pod: &TestPod, argv: &[&str]) -> Result<(bool, String, String)> {
        let output = self
            .node
            .kubectl()
            .args(["exec", "-n", &pod.namespace, &pod.name, "-c", "app", "--"])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl exec")?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// `curl` in the pod: the HTTP status (0 when no answer came) and the body (curl's error then).
    pub fn curl(&self, pod: &TestPod, args: &[&str]) -> Result<(u16, String)> {
        let mut argv = vec!["curl", "-s", "-S", "-m", "30", "-w", "\n%{http_code}"];
        argv.extend_from_slice(args);
        let (_, stdout, stderr) = self.exec(pod, &argv)?;
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
        let code = code.trim().parse().unwrap_or(0);
        if code == 0 {
            return Ok((0, stderr));
        }
        Ok((code, body.to_owned()))
    }

    /// The pod asks the metadata address for a Key Vault token, as an Azure SDK would.
    pub fn token(&self, pod: &TestPod) -> Result<(u16, String)> {
        self.curl(pod, &["-H", "Metadata: true", TOKEN_URL])
    }

    /// The pod reads the vault's secret with `token`.
    pub fn read_secret(&self, pod: &TestPod, token: &str) -> Result<(u16, String)> {
        let url = format!("https://{VAULT}.vault.azure.net/secrets/{SECRET_NAME}?api-version=7.4");
        self.curl(
            pod,
            &[
                "--cacert",
                "/azure-ca/ca.pem",
                "-H",
                &format!("Authorization: Bearer {token}"),
                &url,
            ],
        )
    }

    /// IMDS requests that reached the local Azure from a pod's address (any is a leak: pods must only
    /// ever be answered by the agent).
    pub fn imds_requests_from_pods(&self) -> Vec<RequestRecord> {
        self.emulator
            .requests(&LogFilter {
                service: Some(Service::Imds),
                ..LogFilter::default()
            })
            .into_iter()
            .filter(|r| pod_identity_emulator::observe::source_ip(&r.source).starts_with("10.244."))
            .collect()
    }

    /// The user-assigned identities of the node's scale set in the local Azure (lowercase resource IDs).
    pub fn scale_set_identities(&self) -> Vec<String> {
        let value = serde_json::to_value(self.emulator.snapshot()).unwrap_or_default();
        let mut found = Vec::new();
        for subscription in value["subscriptions"].as_array().into_iter().flatten() {
            for group in subscription["resourceGroups"].as_array().into_iter().flatten() {
                for scale_set in group["virtualMachineScaleSets"].as_array().into_iter().flatten() {
                    if scale_set["name"] == "nodepool"
                        && let Some(ids) = scale_set["identity"]["userAssignedIdentities"].as_array()
                    {
                        found.extend(ids.iter().filter_map(|i| i.as_str().map(str::to_lowercase)));
                    }
                }
            }
        }
        found
    }
}

impl Session<'_> {
    /// The install namespace, the Secret with `azure.json` (the controller's service principal and the
    /// node's resource group) and the local Azure's CA, and a ConfigMap with that CA for test pods.
    async fn prepare_install_namespace(&self) -> Result<()> {
        let namespaces = Api::<Namespace>::all(self.client.clone());
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": INSTALL_NAMESPACE}}))?;
        namespaces.create(&PostParams::default(), &namespace).await?;
        let azure_json = json!({
            "cloud": "AzurePublicCloud", "tenantId": TENANT, "subscriptionId": SUBSCRIPTION,
            "aadClientId": CONTROLLER_CLIENT, "aadClientSecret": CONTROLLER_SECRET,
            "resourceGroup": NODES_GROUP, "vmType": "vmss",
        });
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": AZURE_SECRET, "namespace": INSTALL_NAMESPACE},
            "stringData": {"azure.json": azure_json.to_string(), "ca.pem": self.ca_pem},
        }))?;
        Api::<Secret>::namespaced(self.client.clone(), INSTALL_NAMESPACE)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    }

    /// Installs the chart with [`Cluster::values`] and `extra` values, and waits until the agent and the
    /// controller are ready.
    pub async fn install(&self, extra: &[String]) -> Result<()> {
        let mut values = self.values();
        values.extend_from_slice(extra);
        self.helm_release("install", &values)?;
        self.wait_agent_ready().await?;
        self.wait_controller_ready().await
    }

    /// Waits until the agent DaemonSet's pod on the node is Ready at the DaemonSet's latest template.
    pub async fn wait_agent_ready(&self) -> Result<()> {
        let api = Api::<DaemonSet>::namespaced(self.client.clone(), INSTALL_NAMESPACE);
        let name = format!("{RELEASE}-agent");
        eventually(|| async {
            let ds = api.get(&name).await?;
            let generation = ds.metadata.generation.unwrap_or_default();
            let status = ds.status.context("no status")?;
            let done = status.observed_generation.unwrap_or_default() >= generation
                && status.desired_number_scheduled == 1
                && status.updated_number_scheduled.unwrap_or_default() == 1
                && status.number_ready == 1
                && status.number_unavailable.unwrap_or_default() == 0;
            if done {
                Ok(())
            } else {
                bail!("agent DaemonSet not rolled out and ready: {status:?}")
            }
        })
        .await
        .with_context(|| self.diagnose("agent"))
    }

    /// Waits until every controller replica is Ready.
    pub async fn wait_controller_ready(&self) -> Result<()> {
        let api = Api::<Deployment>::namespaced(self.client.clone(), INSTALL_NAMESPACE);
        let name = format!("{RELEASE}-controller");
        eventually(|| async {
            let deployment = api.get(&name).await?;
            let wanted = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let status = deployment.status.context("no status")?;
            if status.ready_replicas.unwrap_or_default() == wanted
                && status.updated_replicas.unwrap_or_default() == wanted
            {
                Ok(())
            } else {
                bail!("controller Deployment not ready: {status:?}")
            }
        })
        .await
        .with_context(|| self.diagnose("controller"))
    }

    /// Pods, events and logs of a component, for a failure message.
    pub fn diagnose(&self, component: &str) -> String {
        let selector = format!("app.kubernetes.io/component={component}");
        let pods = self
            .node
            .kubectl_ok(&["get", "pods", "-A", "-o", "wide"])
            .unwrap_or_else(|e| e.to_string());
        let events = self
            .node
            .kubectl_ok(&["get", "events", "-n", INSTALL_NAMESPACE])
            .unwrap_or_else(|e| e.to_string());
        let logs = self
            .node
            .kubectl_ok(&[
                "logs",
                "-n",
                INSTALL_NAMESPACE,
                "-l",
                &selector,
                "--tail=40",
                "--all-containers",
                "--prefix",
            ])
            .unwrap_or_else(|e| e.to_string());
        format!(
            "pods:\n{pods}\nevents:\n{events}\n{component} logs:\n{logs}\nkubelet:\n{}",
            self.node.log_tail("kubelet", 20)
        )
    }

    /// An AzureIdentity for identity `id-a` to `id-d` (`client_id`) and a binding with `selector`, in
    /// `namespace`.
    pub async fn bind(&self, namespace: &str, identity: &str, client_id: &str, selector: &str) -> Result<()> {
        let params = PatchParams::apply("pod-identity-real-node");
        let azure_identity: AzureIdentity = serde_json::from_value(json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": identity, "namespace": namespace},
            "spec": {"type": 0, "resourceID": identity_id(identity), "clientID": client_id},
        }))?;
        Api::<AzureIdentity>::namespaced(self.client.clone(), namespace)
            .patch(identity, &params, &Patch::Apply(&azure_identity))
            .await?;
        let binding_name = format!("{identity}-binding");
        let binding: AzureIdentityBinding = serde_json::from_value(json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
            "metadata": {"name": binding_name, "namespace": namespace},
            "spec": {"azureIdentity": identity, "selector": selector},
        }))?;
        Api::<AzureIdentityBinding>::namespaced(self.client.clone(), namespace)
            .patch(&binding_name, &params, &Patch::Apply(&binding))
            .await?;
        Ok(())
    }

    /// A namespace for a test's pods, with a ConfigMap `azure-ca` holding the local Azure's CA.
    pub async fn namespace(&self, name: &str) -> Result<String> {
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        let ca: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "azure-ca"},
            "data": {"ca.pem": self.ca_pem},
        }))?;
        // The namespace's default ServiceAccount comes from the controller manager.
        let accounts =
            Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(self.client.clone(), name);
        eventually(|| async {
            accounts
                .get_opt("default")
                .await?
                .context("no default ServiceAccount yet")?;
            anyhow::Ok(())
        })
        .await?;
        Api::<ConfigMap>::namespaced(self.client.clone(), name)
            .create(&PostParams::default(), &ca)
            .await?;
        Ok(name.to_owned())
    }

    /// A toolbox pod (busybox and curl) in `namespace`, labelled `aadpodidbinding=<selector>` when given,
    /// resolving the vault's name to the local Azure; waits until it runs.
    pub async fn pod(&self, namespace: &str, name: &str, selector: Option<&str>) -> Result<TestPod> {
        self.pod_with(namespace, name, selector, |_| {}).await
    }

    /// The same, with the pod's manifest adjusted first.
    pub async fn pod_with(
        &self,
        namespace: &str,
        name: &str,
        selector: Option<&str>,
        adjust: impl FnOnce(&mut Value),
    ) -> Result<TestPod> {
        let mut labels = BTreeMap::new();
        if let Some(selector) = selector {
            labels.insert(pod_identity_api::POD_LABEL.to_owned(), selector.to_owned());
        }
        let toolbox = self
            .images
            .reference("toolbox")
            .context("no toolbox image")?
            .to_owned();
        let mut manifest = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "automountServiceAccountToken": false,
                "hostAliases": [{"ip": net::NODE_IP.to_string(), "hostnames": [format!("{VAULT}.vault.azure.net")]}],
                "containers": [{
                    "name": "app", "image": toolbox, "imagePullPolicy": "Never",
                    "command": ["sleep", "86400"],
                    "volumeMounts": [{"name": "azure-ca", "mountPath": "/azure-ca", "readOnly": true}],
                }],
                "volumes": [{"name": "azure-ca", "configMap": {"name": "azure-ca"}}],
            },
        });
        adjust(&mut manifest);
        let pod: Pod = serde_json::from_value(manifest)?;
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        api.create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        let ip = eventually(|| async {
            let pod = api.get(name).await?;
            let status = pod.status.unwrap_or_default();
            match (status.phase.as_deref(), status.pod_ip) {
                (Some("Running"), Some(ip)) => Ok(ip),
                (phase, _) => bail!("pod {namespace}/{name} is {phase:?}"),
            }
        })
        .await
        .with_context(|| self.diagnose("agent"))?;
        Ok(TestPod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ip,
        })
    }

    /// Deletes a pod and waits until it is gone.
    pub async fn delete_pod(&self, pod: &TestPod) -> Result<()> {
        let api = Api::<Pod>::namespaced(self.client.clone(), &pod.namespace);
        api.delete(&pod.name, &DeleteParams::default()).await?;
        eventually(|| async {
            match api.get_opt(&pod.name).await? {
                None => Ok(()),
                Some(_) => bail!("pod {} still there", pod.name),
            }
        })
        .await
    }
}
