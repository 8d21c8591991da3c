//! The plugin run as kubectl runs it, against a real kube-apiserver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, io::Write, process::Command};

use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use pod_identity_api::{
    AzureAssignedIdentity,
    fixtures::{binding_of, user_assigned_identity},
};
use pod_identity_test_support::{
    ControlPlane, TestNamespace,
    fixtures::{self, PodTemplate},
};
use serde_json::{Value, json};

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-podidentity");

async fn setup() -> (&'static ControlPlane, TestNamespace) {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace().await.unwrap();
    fixtures::apply_crds(&ns.client, &pod_identity_api::crds::all())
        .await
        .unwrap();
    let identity = user_assigned_identity(&ns.name, "payments", "5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b");
    fixtures::create(&ns.client, &identity).await.unwrap();
    let binding = binding_of(&ns.name, "payments", "pay");
    fixtures::create(&ns.client, &binding).await.unwrap();
    for (name, label, ip) in [
        ("web", Some("pay"), "10.244.3.4"),
        ("db", Some("data"), "10.244.3.5"),
        ("plain", None, "10.244.3.6"),
    ] {
        let template = PodTemplate {
            namespace: ns.name.clone(),
            name: name.into(),
            labels: label
                .map(|l| BTreeMap::from([("aadpodidbinding".to_owned(), l.to_owned())]))
                .unwrap_or_default(),
            // Node names are cluster-wide, and the agent's answer depends on the other pods of the
            // node (who else has the IP): each test's pods are on a node of their own.
            node: Some(format!("node-{}", ns.name)),
            ip: Some(ip.into()),
        };
        fixtures::create_pod(&ns.client, &template).await.unwrap();
    }
    (plane, ns)
}

fn plugin(plane: &ControlPlane, ns: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(PLUGIN)
        .arg("--kubeconfig")
        .arg(plane.admin_kubeconfig())
        .args(["-n", ns])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn explain_follows_the_pod_from_label_to_agent_answer() {
    let (plane, ns) = setup().await;
    let (ok, out, err) = plugin(plane, &ns.name, &["explain", "web"], None);
    assert!(ok, "{err}");
    assert!(out.contains("label aadpodidbinding=pay"), "{out}");
    assert!(
        out.contains(&format!(
            "binding {0}/payments-binding -> identity {0}/payments",
            ns.name
        )),
        "{out}"
    );
    assert!(out.contains("not recorded yet"), "{out}");
    assert!(
        out.contains(&format!(
            "{}/web will get identity {}/payments once it is assigned.",
            ns.name, ns.name
        )),
        "{out}"
    );

    // Once the controller has recorded and assigned it, the agent serves it.
    let aai: AzureAssignedIdentity = serde_json::from_value(json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureAssignedIdentity",
        "metadata": {"name": format!("web-{}-payments", ns.name)},
        "spec": {"pod": "web", "podNamespace": ns.name, "nodename": format!("node-{}", ns.name)},
        "status": {"status": "Created"}
    }))
    .unwrap();
    let aais = Api::<AzureAssignedIdentity>::namespaced(ns.client.clone(), &ns.name);
    aais.create(&PostParams::default(), &aai).await.unwrap();
    let (_, out, _) = plugin(plane, &ns.name, &["explain", "web", "-o", "json"], None);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["agent"]["verdict"], "wait");
    assert_eq!(json["assignments"][0]["status"], "Created");
    aais.patch(
        &format!("web-{}-payments", ns.name),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"status": "Assigned"}})),
    )
    .await
    .unwrap();
    let (_, out, _) = plugin(plane, &ns.name, &["explain", "web", "-o", "json"], None);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["agent"]["verdict"], "serve");
    assert_eq!(
        json["verdict"],
        format!("{0}/web gets identity {0}/payments.", ns.name)
    );
    assert_eq!(
        json["bindings"][0]["client_id"],
        "5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b"
    );
}

#[tokio::test]
async fn explain_says_why_a_pod_gets_nothing() {
    let (plane, ns) = setup().await;
    let (ok, out, _) = plugin(plane, &ns.name, &["explain", "db"], None);
    assert!(ok);
    assert!(out.contains("no binding selects \"data\""), "{out}");
    assert!(
        out.contains("in this namespace: payments-binding selects \"pay\""),
        "{out}"
    );
    assert!(
        out.contains("Agent: requests are refused at once with 403"),
        "{out}"
    );
    let (_, out, _) = plugin(plane, &ns.name, &["explain", "plain", "-o", "json"], None);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["agent"]["verdict"], "refuse");
}

#[tokio::test]
async fn explain_of_an_unknown_pod_fails_with_a_message() {
    let (plane, ns) = setup().await;
    let (ok, _, err) = plugin(plane, &ns.name, &["explain", "ghost"], None);
    assert!(!ok);
    assert!(err.contains(&format!("pod {}/ghost not found", ns.name)), "{err}");
}

#[tokio::test]
async fn simulate_lists_gains_and_losses_from_a_file_or_stdin() {
    let (plane, ns) = setup().await;
    let manifest = "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: payments-binding\nspec:\n  azureIdentity: payments\n  selector: data\n";
    let (ok, out, err) = plugin(plane, &ns.name, &["simulate", "-f", "-"], Some(manifest));
    assert!(ok, "{err}");
    let n = &ns.name;
    assert!(
        out.contains(&format!(
            "+ {n}/db would get {n}/payments (through {n}/payments-binding)"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "- {n}/web would lose {n}/payments (given by {n}/payments-binding)"
        )),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("binding.yaml");
    std::fs::write(&path, manifest).unwrap();
    let (ok, out, _) = plugin(
        plane,
        &ns.name,
        &["simulate", "-f", path.to_str().unwrap(), "--delete", "-o", "json"],
        None,
    );
    assert!(ok);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["lost"].as_array().unwrap().len(), 1);
    assert_eq!(json["lost"][0]["pod"], format!("{n}/web"));
}

#[tokio::test]
async fn crds_prints_what_crds_holds() {
    let (plane, ns) = setup().await;
    let (ok, out, _) = plugin(plane, &ns.name, &["crds"], None);
    assert!(ok);
    assert_eq!(out, pod_identity_api::crds::render_yaml().unwrap());
}
