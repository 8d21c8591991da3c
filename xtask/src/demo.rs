//! `cargo xtask demo`: pod-identity the way users run it, on this machine, explained as it goes.
//!
//! A real node (kube-apiserver, etcd, the controller manager, the scheduler, the kubelet, kube-proxy,
//! containerd and runc) in a network namespace of its own, with the local Azure inside it standing in for
//! Azure (the Instance Metadata Service on 169.254.169.254 for the node's scale-set instance, ARM, Entra ID
//! and Key Vault). The freshly built binaries are packed into images and the chart is installed with
//! `helm install`. Two pods run as containers: one bound to an identity gets a token from the metadata
//! address with plain curl and reads a Key Vault secret with it; the other is refused. Everything is
//! removed when the demo ends, fails or is interrupted (Ctrl-C); should this process be killed, the node's
//! watchdog removes it.

#[path = "../../tests/real_node_harness/mod.rs"]
mod harness;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use harness::{CLIENT_A, Cluster, INSTALL_NAMESPACE, RELEASE, Session, VAULT, identity_id};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use pod_identity_api::{AssignmentStatus, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};
use pod_identity_test_support::{eventually, real_node};
use serde_json::{Value, json};

const NAMESPACE: &str = "demo";

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
    let mut cluster = None;
    let result = tokio::select! {
        result = demo(root, &mut cluster) => result,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: removing everything");
            Ok(())
        }
    };
    if let Some(mut cluster) = cluster.take() {
        say("Removing the node and everything it put on this machine");
        let took = tokio::task::spawn_blocking(move || cluster.node.tear_down()).await??;
        detail(&format!("torn down in {:.1} s", took.as_secs_f64()));
    }
    result
}

async fn demo(root: &Path, slot: &mut Option<Cluster>) -> Result<()> {
    real_node::require_tools().context("the demo runs a real node, as root")?;
    say("Building the agent, the controller and kubectl-podidentity");
    let bin = build_binaries(root)?;

    say("Starting a real node: kubelet, containerd, runc and CNI, in a network namespace of its own");
    detail("images of the agent and the controller are packed from the binaries just built");
    let cluster = slot.insert(Cluster::start(&bin).await?);
    for (phase, at) in &cluster.node.timings {
        detail(&format!("{phase} after {:.1} s", at.as_secs_f64()));
    }
    detail("a local Azure runs inside the node: IMDS on 169.254.169.254 for scale set nodepool instance 0,");
    detail(&format!(
        "ARM, Entra ID and Key Vault on {} (the controller's azure.json is in Secret {INSTALL_NAMESPACE}/{})",
        real_node::net::NODE_IP,
        harness::AZURE_SECRET
    ));
    let session = cluster.session().await?;
    detail(&session.node.kubectl_ok(&["get", "nodes", "-o", "wide"])?);

    say("Installing the chart, values only");
    let started = std::time::Instant::now();
    let mut command = format!("helm install {RELEASE} charts/pod-identity --namespace {INSTALL_NAMESPACE}");
    for value in session.values() {
        command.push_str(&format!(" \\\n      --set {value}"));
    }
    detail(&command);
    session.install(&[]).await?;
    detail(&format!(
        "agent and controller ready after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    detail(
        &session
            .node
            .kubectl_ok(&["get", "pods", "-n", INSTALL_NAMESPACE, "-o", "wide"])?,
    );
    let rules = session
        .node
        .in_node_ok(&["iptables", "-t", "nat", "-S", "POD-IDENTITY"])?;
    detail("the agent's interception rules in the node's nat table:");
    detail(String::from_utf8_lossy(&rules.stdout).trim());

    say("Applying an AzureIdentity and an AzureIdentityBinding, written as for aad-pod-identity");
    session.namespace(NAMESPACE).await?;
    apply_examples(root, &session).await?;
    detail(&format!(
        "AzureIdentity demo-identity: type 0, clientID {CLIENT_A}"
    ));
    detail("AzureIdentityBinding demo-identity-binding: selector demo");

    say("Creating two pods (containers): `web` labelled aadpodidbinding=demo, `other` without a label");
    let web = session.pod(NAMESPACE, "web", Some("demo")).await?;
    let other = session.pod(NAMESPACE, "other", None).await?;
    detail(
        &session
            .node
            .kubectl_ok(&["get", "pods", "-n", NAMESPACE, "-o", "wide", "--show-labels"])?,
    );

    say("The controller records the assignment and adds the identity to the scale set");
    let assignments = Api::<AzureAssignedIdentity>::namespaced(session.client.clone(), NAMESPACE);
    let name = pod_identity_api::naming::assigned_identity_name("web", NAMESPACE, "demo-identity");
    eventually(|| async {
        match assignments.get_opt(&name).await?.map(|a| a.assignment_status()) {
            Some(AssignmentStatus::Assigned) => Ok(()),
            other => bail!("assignment {name} is {other:?}"),
        }
    })
    .await
    .with_context(|| session.diagnose("controller"))?;
    detail(
        &session
            .node
            .kubectl_ok(&["get", "azureassignedidentities", "-n", NAMESPACE])?,
    );

    say("`web` asks the metadata address for a Key Vault token, as any Azure SDK would (plain curl)");
    let (status, body) = eventually(|| async {
        let (status, body) = session.token(&web)?;
        if status == 200 {
            Ok((status, body))
        } else {
            bail!("{status}: {body}")
        }
    })
    .await?;
    let token: Value = serde_json::from_str(&body)?;
    let access_token = token["access_token"]
        .as_str()
        .context("no access_token in the answer")?;
    let claims = jwt_claims(access_token)?;
    detail(&format!(
        "HTTP {status}; token for audience {}, identity (appid) {}, object id {}",
        claims["aud"], claims["appid"], claims["oid"]
    ));
    let (status, body) = session.read_secret(&web, access_token)?;
    if status != 200 {
        bail!("Key Vault answered {status}: {body}");
    }
    let secret: Value = serde_json::from_str(&body)?;
    detail(&format!(
        "Key Vault secret `{}` of vault {VAULT} read with that token: {}",
        harness::SECRET_NAME,
        secret["value"]
    ));

    say("`other` asks the same; it has no binding, so the agent refuses at once");
    let (status, body) = session.token(&other)?;
    detail(&format!("HTTP {status}: {body}"));
    if status != 403 {
        bail!("other was answered {status}, not 403");
    }
    detail(&format!(
        "requests from pod addresses that reached the real IMDS: {}",
        session.imds_requests_from_pods().len()
    ));

    say("Why, in the words of `kubectl podidentity explain`");
    for pod in ["web", "other"] {
        let output = Command::new(bin.join("kubectl-podidentity"))
            .arg("--kubeconfig")
            .arg(session.node.admin_kubeconfig())
            .args(["-n", NAMESPACE, "explain", pod])
            .output()?;
        detail(&String::from_utf8_lossy(&output.stdout));
    }

    say("What each part of the node uses (resident memory)");
    for (program, processes, bytes) in session.node.memory().into_iter().take(12) {
        detail(&format!(
            "{program:<26} {:>7.1} MiB  ({processes} process{})",
            bytes as f64 / 1048576.0,
            if processes == 1 { "" } else { "es" }
        ));
    }
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

/// Applies the repository's example identity and binding, with the local Azure's identity.
async fn apply_examples(root: &Path, session: &Session<'_>) -> Result<()> {
    let read = |file: &str| -> Result<Value> {
        let text = std::fs::read_to_string(root.join("examples").join(file))?;
        Ok(serde_saphyr::from_str(&text)?)
    };
    let mut identity = read("azureidentity-user-assigned.yaml")?;
    identity["spec"]["resourceID"] = json!(identity_id("id-a"));
    identity["spec"]["clientID"] = json!(CLIENT_A);
    let identity: AzureIdentity = serde_json::from_value(identity)?;
    let binding: AzureIdentityBinding = serde_json::from_value(read("azureidentitybinding.yaml")?)?;
    let params = PatchParams::apply("pod-identity-demo");
    Api::<AzureIdentity>::namespaced(session.client.clone(), NAMESPACE)
        .patch("demo-identity", &params, &Patch::Apply(&identity))
        .await?;
    Api::<AzureIdentityBinding>::namespaced(session.client.clone(), NAMESPACE)
        .patch("demo-identity-binding", &params, &Patch::Apply(&binding))
        .await?;
    Ok(())
}

fn jwt_claims(token: &str) -> Result<Value> {
    let payload = token.split('.').nth(1).context("the token is not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))?;
    Ok(serde_json::from_slice(&bytes)?)
}
