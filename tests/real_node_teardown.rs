//! Teardown of a real node: what a node leaves on the machine once it is torn down, by its own teardown
//! or by its watchdog when its test process is killed. A test process of its own, apart from
//! `real_node.rs`, whose shared node's pods come and go in the same host directories (CNI results,
//! container logs, shim sockets) and would show in the comparison.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "real_node_harness/mod.rs"]
mod harness;

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use pod_identity_test_support::{
    eventually,
    real_node::{HostPaths, Layout, NodeOptions, RealNode, leftovers::Snapshot},
};
use tokio::sync::Mutex;

/// The tests take turns: each compares the whole machine before and after a node of its own.
static TURN: Mutex<()> = Mutex::const_new(());

/// A node with one pod running, for the teardown tests.
async fn node_with_a_pod() -> Result<RealNode> {
    let bin = harness::test_bin_dir()?;
    let images = harness::pack_images(&bin)?;
    let node = RealNode::start(NodeOptions {
        provider_id: Layout::provider_id(&harness::scale_set_id(), "0"),
        register_with_taints: Vec::new(),
        images: images.clone(),
    })
    .await?;
    let toolbox = images.reference("toolbox").context("no toolbox image")?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "sleeper", "namespace": "default"},
        "spec": {"automountServiceAccountToken": true, "terminationGracePeriodSeconds": 0, "containers": [{
            "name": "app", "image": toolbox, "imagePullPolicy": "Never", "command": ["sleep", "86400"],
        }]},
    }))?;
    let client = node.client().await?;
    let pods = Api::<Pod>::namespaced(client, "default");
    pods.create(&Default::default(), &pod).await?;
    eventually(|| async {
        let phase = pods.get("sleeper").await?.status.and_then(|s| s.phase);
        if phase.as_deref() == Some("Running") {
            Ok(())
        } else {
            bail!("sleeper is {phase:?}")
        }
    })
    .await?;
    Ok(node)
}

#[tokio::test]
async fn a_node_torn_down_leaves_nothing_behind() {
    let _turn = TURN.lock().await;
    let before = Snapshot::take(None);
    let node = node_with_a_pod().await.unwrap();
    let layout = node.layout().clone();
    node.shutdown().unwrap();
    let after = Snapshot::take(Some(&layout));
    let left = before.difference(&after);
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// Not a test on its own: the child process of the next test, which starts a node and is killed.
#[tokio::test]
#[ignore = "run by a_node_whose_test_process_is_killed_is_torn_down_by_its_watchdog"]
async fn child_node_for_the_watchdog_test() {
    let Ok(report) = std::env::var("POD_IDENTITY_CHILD_NODE_REPORT") else {
        return;
    };
    let node = node_with_a_pod().await.unwrap();
    std::fs::write(&report, &node.layout().id).unwrap();
    // Killed here by the parent.
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn a_node_whose_test_process_is_killed_is_torn_down_by_its_watchdog() {
    let _turn = TURN.lock().await;
    let before = Snapshot::take(None);
    let report = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_node_for_the_watchdog_test",
            "--ignored",
            "--nocapture",
        ])
        .env("POD_IDENTITY_CHILD_NODE_REPORT", report.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = std::sync::Mutex::new(child);
    let id = eventually(|| async {
        if let Some(status) = child.lock().unwrap().try_wait()? {
            bail!("the child exited with {status} before its node was up");
        }
        let id = std::fs::read_to_string(report.path())?;
        if id.is_empty() {
            bail!("the child's node is not up yet")
        }
        Ok(id)
    })
    .await
    .unwrap();
    let mut child = child.into_inner().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let layout = Layout::new(id, HostPaths::default());
    eventually(|| async {
        let left = before.difference(&Snapshot::take(Some(&layout)));
        if left.is_empty() {
            Ok(())
        } else {
            bail!("left behind: {left:#?}")
        }
    })
    .await
    .unwrap();
}
