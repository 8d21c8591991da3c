//! The control plane behaves like a cluster for what tests rely on: pods that look scheduled and
//! running, selectable by node and IP, RBAC for users other than the admin, isolated namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    api::{ListParams, ResourceExt},
};
use pod_identity_test_support::{
    ControlPlane,
    fixtures::{self, PodTemplate},
};

#[tokio::test]
async fn pods_look_scheduled_and_running_and_are_found_by_node_and_ip() {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace().await.unwrap();
    let node_name = format!("node-{}", ns.name);
    let provider_id = "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/0";
    fixtures::create_node(&ns.client, &node_name, Some(provider_id))
        .await
        .unwrap();
    let node = Api::<Node>::all(ns.client.clone()).get(&node_name).await.unwrap();
    assert_eq!(node.spec.unwrap().provider_id.as_deref(), Some(provider_id));

    let template = PodTemplate {
        namespace: ns.name.clone(),
        name: "web".into(),
        labels: BTreeMap::from([("aadpodidbinding".into(), "demo".into())]),
        node: Some(node_name.clone()),
        ip: Some("10.244.7.9".into()),
    };
    let pod = fixtures::create_pod(&ns.client, &template).await.unwrap();
    assert_eq!(pod.status.as_ref().unwrap().phase.as_deref(), Some("Running"));

    // The field selectors the agent uses.
    let pods = Api::<Pod>::all(ns.client.clone());
    let selector = format!("spec.nodeName={node_name},status.podIP=10.244.7.9");
    let found = pods.list(&ListParams::default().fields(&selector)).await.unwrap();
    assert_eq!(
        found.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        vec!["web"]
    );

    fixtures::delete_pod_now(&ns.client, &ns.name, "web")
        .await
        .unwrap();
    assert!(
        pods.list(&ListParams::default().fields(&selector))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn pending_pod_without_ip_stays_pending() {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace().await.unwrap();
    let template = PodTemplate {
        namespace: ns.name.clone(),
        name: "waiting".into(),
        ..Default::default()
    };
    let pod = fixtures::create_pod(&ns.client, &template).await.unwrap();
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Pending"));
}

#[tokio::test]
async fn users_other_than_the_admin_get_only_what_rbac_grants() {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace().await.unwrap();
    let stranger = plane.client_for("stranger", None).await.unwrap();
    match Api::<Pod>::namespaced(stranger, &ns.name)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn each_test_gets_its_own_namespace() {
    let plane = ControlPlane::shared().await;
    let a = plane.namespace().await.unwrap();
    let b = plane.namespace().await.unwrap();
    assert_ne!(a.name, b.name);
    assert!(plane.admin_kubeconfig().is_file());
    assert!(plane.server_url().starts_with("https://127.0.0.1:"));
}
