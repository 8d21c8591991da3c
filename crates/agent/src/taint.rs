//! The startup taint: a node registers with the `NoSchedule` taint
//! [`pod_identity_api::readiness::AGENT_NOT_READY_TAINT`] (kubelet `--register-with-taints`, or a node
//! pool's taints), so that no ordinary pod is scheduled there before interception exists: until then a
//! pod reaches the node's IMDS, and every identity of the machine, directly. The agent (whose DaemonSet
//! tolerates the taint) removes it from its own node once it is ready, as the cloud controller manager
//! removes `node.cloudprovider.kubernetes.io/uninitialized` and Cilium's agent `node.cilium.io/agent-not-ready`.
//!
//! While ready, the agent watches its Node and removes the taint whenever it appears (a node pool update
//! that re-applies the pool's taints to existing nodes must not leave them closed to pods). Nothing adds
//! the taint back: not the agent when it stops, not the chart when it is uninstalled (the kubelet
//! registers taints only when it creates its Node object). [`without`] decides; [`remove_when_ready`]
//! watches the Node and writes it.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};

use crate::health::AdminState;

/// The node's taints without those of `key`, or `None` when it has none of them (nothing to write).
pub fn without(taints: &[Taint], key: &str) -> Option<Vec<Taint>> {
    taints
        .iter()
        .any(|taint| taint.key == key)
        .then(|| taints.iter().filter(|taint| taint.key != key).cloned().collect())
}

/// The merge patch that sets the node's taints to `new`, on the condition that the Node is still at
/// `resource_version`: if anything changed it meanwhile (another controller adding or removing a taint of
/// its own), the API server answers 409 and the list is read again, never overwritten.
pub fn patch(resource_version: Option<&str>, new: &[Taint]) -> Value {
    let mut body = json!({"spec": {"taints": new}});
    if let Some(version) = resource_version {
        body["metadata"] = json!({"resourceVersion": version});
    }
    body
}

/// Waits until the agent is ready, then removes `key` from `node`'s taints whenever the Node carries it,
/// until the process ends; a failed write is retried with backoff.
pub async fn remove_when_ready(client: Client, node: String, key: String, admin: AdminState) {
    admin.until_ready().await;
    let api = Api::<Node>::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut nodes = watcher(api.clone(), config)
        .default_backoff()
        .applied_objects()
        .boxed();
    loop {
        let tainted = match nodes.try_next().await {
            Ok(Some(object)) => object
                .spec
                .as_ref()
                .and_then(|spec| spec.taints.as_deref())
                .is_some_and(|taints| without(taints, &key).is_some()),
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(node, %error, "watching the node failed; retrying");
                continue;
            }
        };
        if tainted {
            remove(&api, &node, &key).await;
        }
    }
}

async fn remove(api: &Api<Node>, node: &str, key: &str) {
    let mut delay = Duration::from_millis(200);
    loop {
        match remove_once(api, node, key).await {
            Ok(removed) => {
                if removed {
                    tracing::info!(
                        node,
                        taint = key,
                        "the agent is ready: removed the node's startup taint"
                    );
                }
                return;
            }
            Err(error) => {
                tracing::warn!(node, taint = key, %error, delay_ms = delay.as_millis() as u64, "could not remove the node's startup taint; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn remove_once(api: &Api<Node>, node: &str, key: &str) -> Result<bool, kube::Error> {
    let object = api.get(node).await?;
    let taints = object
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.clone())
        .unwrap_or_default();
    let Some(kept) = without(&taints, key) else {
        return Ok(false);
    };
    let body = patch(object.metadata.resource_version.as_deref(), &kept);
    api.patch(node, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    Ok(true)
}

/// Starts [`remove_when_ready`].
pub fn spawn(client: Client, node: &str, key: &str, admin: AdminState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(remove_when_ready(client, node.to_owned(), key.to_owned(), admin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_agents_taint_goes_and_the_others_keep_their_order() {
        let key = pod_identity_api::readiness::AGENT_NOT_READY_TAINT;
        let taints = vec![
            taint("node.kubernetes.io/not-ready", "NoSchedule"),
            taint(key, "NoSchedule"),
            taint("dedicated", "NoExecute"),
        ];
        let kept = without(&taints, key).unwrap();
        assert_eq!(
            kept,
            vec![
                taint("node.kubernetes.io/not-ready", "NoSchedule"),
                taint("dedicated", "NoExecute"),
            ]
        );
        assert_eq!(without(&kept, key), None, "nothing to write once it is gone");
        assert_eq!(without(&[], key), None);
        // Whatever its effect, a taint of this key is the agent's.
        assert_eq!(without(&[taint(key, "NoExecute")], key), Some(vec![]));
    }

    #[test]
    fn the_write_is_refused_if_the_node_changed_since_it_was_read() {
        let new = vec![taint("a", "NoSchedule")];
        let body = patch(Some("42"), &new);
        assert_eq!(body["metadata"]["resourceVersion"], "42");
        assert_eq!(body["spec"]["taints"], serde_json::to_value(&new).unwrap());
        // The last taint removed: an empty list, which a merge patch writes as such (null would too).
        assert_eq!(patch(Some("42"), &[])["spec"]["taints"], json!([]));
    }
}
