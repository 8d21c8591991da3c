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

/// Whether a process's arguments are a node teardown still to finish: the teardown script itself, or a
/// watchdog whose test process is gone and which is about to run it. A watchdog of a live test process
/// (this one's own earlier node) only waits.
fn is_pending_teardown(args: &[String]) -> bool {
    let tears_down = args.iter().any(|a| a == "teardown") && args.iter().any(|a| a.starts_with("pin"));
    match args.iter().position(|a| a == "node-watchdog") {
        _ if !tears_down => false,
        None => true,
        Some(at) => args.get(at + 1).is_none_or(|parent| {
            std::fs::read_to_string(format!("/proc/{parent}/stat")).map_or(true, |stat| stat.contains(") Z "))
        }),
    }
}

/// Waits until no other node is being torn down: a test process that ended just before this one leaves
/// its node to its watchdog, which may still be removing it (shim sockets, CNI results, its run
/// directory) while this test takes its first snapshot, and those would show as lost.
async fn earlier_teardowns_done() {
    eventually(|| async {
        let mut pending = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if is_pending_teardown(&args) {
                pending.push(args.join(" "));
            }
        }
        if pending.is_empty() {
            Ok(())
        } else {
            bail!("nodes still being torn down: {pending:?}")
        }
    })
    .await
    .unwrap();
}

#[test]
fn only_teardowns_that_will_run_are_waited_for() {
    let args = |text: &str| text.split(' ').map(str::to_owned).collect::<Vec<_>>();
    assert!(is_pending_teardown(&args(
        "sh /x/teardown.sh teardown pin12x0abc"
    )));
    let this = std::process::id();
    assert!(!is_pending_teardown(&args(&format!(
        "sh -c loop node-watchdog {this} -c s teardown pin12x0abc"
    ))));
    assert!(is_pending_teardown(&args(
        "sh -c loop node-watchdog 4194305 -c s teardown pin12x0abc"
    )));
    assert!(!is_pending_teardown(&args("sleep 86400")));
}

#[tokio::test]
async fn a_node_torn_down_leaves_nothing_behind() {
    let _turn = TURN.lock().await;
    earlier_teardowns_done().await;
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
    earlier_teardowns_done().await;
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
