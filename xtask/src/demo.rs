//! `cargo xtask demo`: the whole system on this machine, explained as it goes.
//!
//! A real kube-apiserver and etcd on loopback; a node as a network namespace, in which the local Azure
//! (its Instance Metadata Service on 169.254.169.254, ARM, Entra and Key Vault on 443), the controller
//! and the agent run; two pods as namespaces joined to it by veth pairs. One pod is bound to an identity:
//! it gets a token through the intercepted metadata address, with no endpoint override, and reads a Key
//! Vault secret with it. The other is not, and is refused. Everything is removed when the demo ends, is
//! interrupted, or fails: the namespaces and processes by their owners here, and by watchdogs should this
//! process be killed.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use pod_identity_api::{AssignmentStatus, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};
use pod_identity_emulator::{Config, Emulator, ImdsListener, Seed};
use pod_identity_test_support::{
    ControlPlane, eventually,
    fixtures::{self, PodTemplate},
    netns::{self, Node, PodNet},
};
use serde_json::{Value, json};

const TENANT: &str = "d3b0c2a1-0000-4000-8000-00000000000a";
const SUBSCRIPTION: &str = "d3b0c2a1-0000-4000-8000-000000000001";
const CONTROLLER_CLIENT: &str = "d3b0c2a1-1111-4111-8111-000000000001";
const CONTROLLER_OBJECT: &str = "d3b0c2a1-2222-4222-8222-000000000001";
const CONTROLLER_SECRET: &str = "demo-controller-secret";
const IDENTITY_CLIENT: &str = "d3b0c2a1-1111-4111-8111-000000000002";
const IDENTITY_OBJECT: &str = "d3b0c2a1-2222-4222-8222-000000000002";
const NODES_GROUP: &str = "demo-nodes";
const IDENTITIES_GROUP: &str = "demo-identities";
const VAULT: &str = "demovault";
const TOKEN_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";

fn scale_set() -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/{NODES_GROUP}/providers/Microsoft.Compute/virtualMachineScaleSets/nodepool"
    )
}

fn identity_id() -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/{IDENTITIES_GROUP}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/demo-identity"
    )
}

fn seed() -> Result<Seed> {
    Ok(serde_json::from_value(json!({
        "tenants": [{"id": TENANT, "applications": [{
            "displayName": "pod-identity-controller", "clientId": CONTROLLER_CLIENT,
            "objectId": CONTROLLER_OBJECT, "secrets": [CONTROLLER_SECRET],
        }]}],
        "subscriptions": [{"id": SUBSCRIPTION, "tenantId": TENANT, "displayName": "demo", "resourceGroups": [
            {"name": IDENTITIES_GROUP, "location": "westeurope", "userAssignedIdentities": [
                {"name": "demo-identity", "clientId": IDENTITY_CLIENT, "principalId": IDENTITY_OBJECT}
            ]},
            {"name": NODES_GROUP, "location": "westeurope",
             "virtualMachineScaleSets": [{"name": "nodepool", "instances": [{"instanceId": "0"}]}],
             "keyVaults": [{"name": VAULT,
                "secrets": [{"name": "greeting", "value": "hello from Key Vault"}],
                "accessPolicies": [{"objectId": IDENTITY_OBJECT, "permissions": {"secrets": ["get"]}}]}]},
        ]}],
        "roleAssignments": [{
            "principalId": CONTROLLER_OBJECT, "scope": format!("/subscriptions/{SUBSCRIPTION}"),
            "roleDefinitionName": "Contributor",
        }],
    }))?)
}

/// A process started for the demo, stopped when dropped.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("the {} exited with {status}; its log:\n{log}", self.name);
        }
        Ok(())
    }
}

fn say(text: &str) {
    println!("\n==> {text}");
}

fn detail(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

/// Runs the demo; every resource it creates is released before it returns, also on Ctrl-C.
pub async fn run(root: &Path) -> Result<()> {
    tokio::select! {
        result = demo(root) => result,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: cleaning up");
            Ok(())
        }
    }
}

async fn demo(root: &Path) -> Result<()> {
    pod_identity_test_support::install_crypto_provider();
    netns::require_privileges().context("the demo creates network namespaces and iptables rules")?;
    for (tool, package) in [
        ("iptables", "iptables"),
        ("conntrack", "conntrack"),
        ("curl", "curl"),
    ] {
        netns::require_tool(tool, package)?;
    }
    say("Building the agent, the controller and kubectl-podidentity");
    let bin = build_binaries(root)?;

    say("Starting a real kube-apiserver and etcd on loopback");
    let plane = ControlPlane::shared().await;
    let client = plane.admin_client().await?;
    let ns = plane.namespace().await?;
    fixtures::apply_crds(&client, &pod_identity_api::crds::all()).await?;
    detail(&format!(
        "API server {}, namespace {} for the demo",
        plane.server_url(),
        ns.name
    ));
    detail("CRDs aadpodidentity.k8s.io/v1 installed");

    say("Creating a node (a network namespace) and a local Azure inside it");
    let mut node = Node::create()?;
    let dir = tempfile::Builder::new().prefix("pod-identity-demo-").tempdir()?;
    node.set_hosts(
        &node.netns,
        &[
            (Ipv4Addr::LOCALHOST, "management.azure.com"),
            (Ipv4Addr::LOCALHOST, "login.microsoftonline.com"),
            (Ipv4Addr::LOCALHOST, &format!("{VAULT}.vault.azure.net")),
        ],
    )?;
    let mut config = Config::new(seed()?);
    config.imds = vec![ImdsListener {
        addr: SocketAddr::from((netns::METADATA_IP, 80)),
        instance: format!("{}/virtualMachines/0", scale_set()),
    }];
    config.azure_addr = SocketAddr::from(([0, 0, 0, 0], 443));
    let runtime = tokio::runtime::Handle::current();
    let node_netns = node.netns.clone();
    let emulator = tokio::task::spawn_blocking(move || {
        netns::run_in(&node_netns, move || runtime.block_on(Emulator::start(config)))
    })
    .await??
    .context("starting the local Azure inside the node namespace")?;
    let ca = dir.path().join("azure-ca.pem");
    std::fs::write(&ca, emulator.ca_pem())?;
    detail(&format!(
        "node namespace {}; IMDS on 169.254.169.254:80 there, for scale set nodepool instance 0",
        node.netns
    ));
    detail(
        "ARM, Entra ID and Key Vault on :443 there (management.azure.com, login.microsoftonline.com, demovault.vault.azure.net)",
    );
    let port: u16 = plane
        .server_url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the API server URL has no port")?;
    let _relay = netns::relay_loopback_port(&node.netns, port).await?;

    let node_name = "demo-node";
    if Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .get_opt(node_name)
        .await?
        .is_none()
    {
        fixtures::create_node(
            &client,
            node_name,
            Some(&format!("azure://{}/virtualMachines/0", scale_set())),
        )
        .await?;
    }
    detail(&format!(
        "Node {node_name} with providerID azure://.../virtualMachineScaleSets/nodepool/virtualMachines/0"
    ));

    say("Starting the controller and the agent on the node");
    let azure_json = dir.path().join("azure.json");
    std::fs::write(
        &azure_json,
        serde_json::to_vec_pretty(&json!({
            "cloud": "AzurePublicCloud", "tenantId": TENANT, "subscriptionId": SUBSCRIPTION,
            "aadClientId": CONTROLLER_CLIENT, "aadClientSecret": CONTROLLER_SECRET,
            "resourceGroup": NODES_GROUP, "vmType": "vmss",
        }))?,
    )?;
    let kubeconfig = plane.admin_kubeconfig().display().to_string();
    let mut controller = spawn_in(
        &node,
        "controller",
        &bin.join("pod-identity-controller"),
        &[
            "--kubeconfig",
            &kubeconfig,
            "--cloudconfig",
            &azure_json.display().to_string(),
            "--arm-endpoint",
            "https://management.azure.com/",
            "--authority-host",
            "https://login.microsoftonline.com/",
            "--azure-ca-file",
            &ca.display().to_string(),
            "--leader-election-namespace",
            &ns.name,
            "--log-format",
            "plain",
        ],
        dir.path(),
    )?;
    let mut agent = spawn_in(
        &node,
        "agent",
        &bin.join("pod-identity-agent"),
        &[
            "--node",
            node_name,
            "--kubeconfig",
            &kubeconfig,
            "--log-format",
            "text",
        ],
        dir.path(),
    )?;
    wait_ready(&node, &mut agent, 8085).await?;
    wait_ready(&node, &mut controller, 8080).await?;
    detail("both ready; the agent's interception rules in the node's nat table:");
    let rules = node.run(&node.netns, &["iptables", "-t", "nat", "-S", "POD-IDENTITY"])?;
    detail(String::from_utf8_lossy(&rules.stdout).trim());

    say("Creating two pods on the node: `web` labelled aadpodidbinding=demo, `other` without a label");
    let web = add_pod(&mut node, &client, &ns.name, "web", Some("demo"), node_name).await?;
    let other = add_pod(&mut node, &client, &ns.name, "other", None, node_name).await?;
    detail(&format!("web   {} (network namespace {})", web.ip, web.netns));
    detail(&format!("other {} (network namespace {})", other.ip, other.netns));

    say("Applying an AzureIdentity and an AzureIdentityBinding, written as for aad-pod-identity");
    apply_examples(root, &client, &ns.name).await?;
    detail(&format!(
        "AzureIdentity demo-identity: type 0, clientID {IDENTITY_CLIENT}"
    ));
    detail("AzureIdentityBinding demo-identity-binding: selector demo");

    say("The controller records the assignment and adds the identity to the scale set");
    let assignments = Api::<AzureAssignedIdentity>::namespaced(client.clone(), &ns.name);
    let name = pod_identity_api::naming::assigned_identity_name("web", &ns.name, "demo-identity");
    eventually(|| {
        let running = controller.check_running();
        let (assignments, name) = (&assignments, &name);
        async move {
            running?;
            let aai = assignments.get_opt(name).await?;
            match aai.map(|a| a.assignment_status()) {
                Some(AssignmentStatus::Assigned) => Ok(()),
                other => bail!("assignment {name} is {other:?}"),
            }
        }
    })
    .await
    .with_context(|| {
        format!(
            "the identity was not assigned; controller log: {}",
            controller.log.display()
        )
    })?;
    detail(&format!("AzureAssignedIdentity {name}: Assigned"));

    say("`web` asks the metadata address for a Key Vault token, as any Azure SDK would");
    let (status, body) = curl(&node, &web, &["-H", "Metadata: true", TOKEN_URL])?;
    if status != 200 {
        bail!("web was answered {status}: {body}");
    }
    let token: Value = serde_json::from_str(&body)?;
    let access_token = token["access_token"]
        .as_str()
        .context("no access_token in the answer")?;
    let claims = jwt_claims(access_token)?;
    detail(&format!(
        "HTTP {status}; token for audience {}, identity (appid) {}, object id {}",
        claims["aud"], claims["appid"], claims["oid"]
    ));
    let vault_url = format!("https://{VAULT}.vault.azure.net/secrets/greeting?api-version=7.4");
    node.set_hosts(&web.netns, &[(web.gateway, &format!("{VAULT}.vault.azure.net"))])?;
    let (status, body) = curl(
        &node,
        &web,
        &[
            "--cacert",
            &ca.display().to_string(),
            "-H",
            &format!("Authorization: Bearer {access_token}"),
            &vault_url,
        ],
    )?;
    if status != 200 {
        bail!("Key Vault answered {status}: {body}");
    }
    let secret: Value = serde_json::from_str(&body)?;
    detail(&format!(
        "Key Vault secret `greeting` read with that token: {}",
        secret["value"]
    ));

    say("`other` asks the same; it has no binding, so the agent refuses at once");
    let (status, body) = curl(&node, &other, &["-H", "Metadata: true", TOKEN_URL])?;
    detail(&format!("HTTP {status}: {body}"));
    if status != 403 {
        bail!("other was answered {status}, not 403");
    }
    let minted = emulator
        .requests(&pod_identity_emulator::LogFilter::default())
        .into_iter()
        .filter(|r| r.path.contains("/oauth2/token") && r.source.starts_with("10.244."))
        .count();
    detail(&format!(
        "requests from pod addresses that reached the real IMDS: {minted}"
    ));

    say("Why, in the words of `kubectl podidentity explain`");
    for pod in ["web", "other"] {
        let output = Command::new(bin.join("kubectl-podidentity"))
            .args(["--kubeconfig", &kubeconfig, "-n", &ns.name, "explain", pod])
            .output()?;
        detail(&String::from_utf8_lossy(&output.stdout));
    }

    say("Done; stopping everything and removing the namespaces");
    drop(agent);
    drop(controller);
    drop(emulator);
    drop(node);
    Ok(())
}

fn build_binaries(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(root)
        .args([
            "build",
            "--quiet",
            "-p",
            "pod-identity-agent",
            "-p",
            "pod-identity-controller",
            "-p",
            "pod-identity-cli",
        ])
        .status()?;
    if !status.success() {
        bail!("building the binaries failed");
    }
    let metadata = Command::new(&cargo)
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()?;
    let metadata: Value = serde_json::from_slice(&metadata.stdout)?;
    let target = metadata["target_directory"]
        .as_str()
        .context("cargo metadata names no target directory")?;
    Ok(Path::new(target).join("debug"))
}

fn spawn_in(node: &Node, name: &'static str, binary: &Path, args: &[&str], dir: &Path) -> Result<Process> {
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log)?;
    let child = node
        .command(&node.netns, &binary.display().to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting the {name}"))?;
    detail(&format!("{name} started; log: {}", log.display()));
    Ok(Process { name, child, log })
}

async fn wait_ready(node: &Node, process: &mut Process, port: u16) -> Result<()> {
    let url = format!("http://127.0.0.1:{port}/readyz");
    eventually(|| {
        let result = process.check_running().and_then(|()| {
            let output = node.run(
                &node.netns,
                &[
                    "curl",
                    "-s",
                    "-m",
                    "2",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &url,
                ],
            )?;
            match String::from_utf8_lossy(&output.stdout).trim() {
                "200" => Ok(()),
                other => bail!("{} readyz answered {other:?}", process.name),
            }
        });
        async move { result }
    })
    .await
}

async fn add_pod(
    node: &mut Node,
    client: &kube::Client,
    namespace: &str,
    name: &str,
    selector: Option<&str>,
    node_name: &str,
) -> Result<PodNet> {
    let index = u8::try_from(node.pods.len() + 1)?;
    let net = node.add_pod(index)?;
    let labels = selector
        .map(|s| BTreeMap::from([(pod_identity_api::POD_LABEL.to_owned(), s.to_owned())]))
        .unwrap_or_default();
    let template = PodTemplate {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        labels,
        node: Some(node_name.to_owned()),
        ip: Some(net.ip.to_string()),
    };
    fixtures::create_pod(client, &template).await?;
    Ok(net)
}

/// Applies the repository's example identity and binding, with the demo's own IDs.
async fn apply_examples(root: &Path, client: &kube::Client, namespace: &str) -> Result<()> {
    let read = |file: &str| -> Result<Value> {
        let text = std::fs::read_to_string(root.join("examples").join(file))?;
        Ok(serde_saphyr::from_str(&text)?)
    };
    let mut identity = read("azureidentity-user-assigned.yaml")?;
    identity["spec"]["resourceID"] = json!(identity_id());
    identity["spec"]["clientID"] = json!(IDENTITY_CLIENT);
    let identity: AzureIdentity = serde_json::from_value(identity)?;
    let binding: AzureIdentityBinding = serde_json::from_value(read("azureidentitybinding.yaml")?)?;
    let params = PatchParams::apply("pod-identity-demo");
    Api::<AzureIdentity>::namespaced(client.clone(), namespace)
        .patch("demo-identity", &params, &Patch::Apply(&identity))
        .await?;
    Api::<AzureIdentityBinding>::namespaced(client.clone(), namespace)
        .patch("demo-identity-binding", &params, &Patch::Apply(&binding))
        .await?;
    Ok(())
}

/// `curl` from inside a pod: the status code and the body.
fn curl(node: &Node, pod: &PodNet, args: &[&str]) -> Result<(u16, String)> {
    let mut argv = vec!["curl", "-s", "-m", "30", "-w", "\n%{http_code}"];
    argv.extend_from_slice(args);
    let output = node.run(&pod.netns, &argv)?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

fn jwt_claims(token: &str) -> Result<Value> {
    let payload = token.split('.').nth(1).context("the token is not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))?;
    Ok(serde_json::from_slice(&bytes)?)
}
