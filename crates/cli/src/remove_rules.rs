//! `kubectl podidentity remove-node-rules`: takes the agent's interception off every node once the chart
//! is uninstalled.
//!
//! The agent never removes its rules (a crashed or upgrading agent must not expose the node's
//! identities), so `helm uninstall` leaves, on each node, the `POD-IDENTITY` chains of the `nat` and
//! `filter` tables, their jumps, and the agent's redirect address on `lo`; pods then get a TCP reset from
//! `169.254.169.254`. This command runs the agent image once per node (`--remove-interception`, as a Job
//! pinned to the node) and waits for every node, so that pods reach IMDS directly again.

use std::{collections::BTreeMap, io::Write, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    batch::v1::Job,
    core::v1::{Node, Pod},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, LogParams, PostParams},
};
use serde_json::json;

/// The label every object of this command carries.
pub const COMPONENT: &str = "remove-node-rules";

/// What to run and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Namespace of the Jobs.
    pub namespace: String,
    /// The agent image (the one the chart ran).
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: String,
    /// Extra arguments for the agent, for installations that changed the chain name, the redirect
    /// address or the iptables backend.
    pub agent_args: Vec<String>,
    /// How long to wait for every node.
    pub timeout: Duration,
}

/// The default agent image: the chart's default registry, at this command's version.
pub fn default_image() -> String {
    format!("ghcr.io/pod-identity/agent:{}", env!("CARGO_PKG_VERSION"))
}

/// A name for the Job of `node` (node names can be longer than a Job's name may be).
pub fn job_name(node: &str) -> String {
    // FNV-1a: stable across versions and platforms, which std's hasher does not promise.
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("pod-identity-remove-rules-{:012x}", hash & 0xffff_ffff_ffff)
}

/// The Job that removes the interception from `node`: the agent image, on the node's network, with
/// only the capabilities the agent has (NET_ADMIN, NET_RAW), pinned to the node and tolerating every
/// taint, as the agent's DaemonSet does.
pub fn job_for(node: &str, options: &Options) -> Result<Job> {
    let mut args = vec!["--remove-interception".to_owned(), "--log-format=text".to_owned()];
    args.extend(options.agent_args.iter().cloned());
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name", "pod-identity"),
        ("app.kubernetes.io/component", COMPONENT),
    ]);
    Ok(serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(node), "namespace": options.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeName": node,
                    "hostNetwork": true,
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "remove",
                        "image": options.image,
                        "imagePullPolicy": options.image_pull_policy,
                        "args": args,
                        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                        "securityContext": {
                            "runAsUser": 0,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
                        },
                        "volumeMounts": [{"name": "xtables-lock", "mountPath": "/run/xtables.lock"}],
                    }],
                    "volumes": [{"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}}],
                },
            },
        },
    }))?)
}

/// Where a Job stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Still running (or not started).
    Running,
    /// Completed.
    Done,
    /// Failed for good.
    Failed(String),
}

/// Reads a Job's conditions.
pub fn job_state(job: &Job) -> JobState {
    for condition in job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
    {
        if condition.status != "True" {
            continue;
        }
        match condition.type_.as_str() {
            "Complete" => return JobState::Done,
            "Failed" => {
                return JobState::Failed(
                    condition
                        .message
                        .clone()
                        .unwrap_or_else(|| condition.type_.clone()),
                );
            }
            _ => {}
        }
    }
    JobState::Running
}

/// Removes the interception from every node and reports each.
pub async fn run(client: &Client, options: &Options, out: &mut impl Write) -> Result<()> {
    let agents = Api::<DaemonSet>::all(client.clone())
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/name=pod-identity,app.kubernetes.io/component=agent"),
        )
        .await
        .context("looking for a running agent")?;
    if let Some(agent) = agents.items.first() {
        bail!(
            "the agent DaemonSet {}/{} is still installed and would put its rules back; uninstall the chart \
             first (helm uninstall)",
            agent.metadata.namespace.as_deref().unwrap_or_default(),
            agent.metadata.name.as_deref().unwrap_or_default()
        );
    }
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels("kubernetes.io/os=linux"))
        .await
        .context("listing nodes")?;
    let names: Vec<String> = nodes
        .items
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    if names.is_empty() {
        bail!("no Linux node found");
    }
    let jobs = Api::<Job>::namespaced(client.clone(), &options.namespace);
    for node in &names {
        let job = job_for(node, options)?;
        let name = job_name(node);
        // A Job of an earlier run goes first: its template may differ.
        if jobs.get_opt(&name).await?.is_some() {
            jobs.delete(&name, &DeleteParams::background()).await?;
            wait_gone(&jobs, &name, options.timeout).await?;
        }
        jobs.create(&PostParams::default(), &job)
            .await
            .with_context(|| format!("creating Job {name} for node {node}"))?;
    }
    let deadline = tokio::time::Instant::now() + options.timeout;
    let mut pending: Vec<&String> = names.iter().collect();
    let mut failures = Vec::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for node in pending {
            let name = job_name(node);
            match job_state(&jobs.get(&name).await?) {
                JobState::Done => writeln!(out, "{node}: interception removed")?,
                JobState::Failed(reason) => {
                    let log = last_log(client, &options.namespace, &name).await;
                    failures.push(format!("{node}: {reason}\n{log}"));
                }
                JobState::Running => still.push(node),
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            for node in &pending {
                let log = last_log(client, &options.namespace, &job_name(node)).await;
                failures.push(format!("{node}: not done in {:?}\n{log}", options.timeout));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for node in &names {
        let _ = jobs.delete(&job_name(node), &DeleteParams::background()).await;
    }
    if !failures.is_empty() {
        bail!(
            "the interception could not be removed from every node:\n{}",
            failures.join("\n")
        );
    }
    Ok(())
}

async fn wait_gone(jobs: &Api<Job>, name: &str, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while jobs.get_opt(name).await?.is_some() {
        if tokio::time::Instant::now() >= deadline {
            bail!("Job {name} of an earlier run is still being deleted");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The last lines of the log of a Job's pod, to say why it failed.
async fn last_log(client: &Client, namespace: &str, job: &str) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let Ok(list) = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
    else {
        return String::new();
    };
    let mut text = String::new();
    for pod in list {
        let name = pod.metadata.name.unwrap_or_default();
        let params = LogParams {
            tail_lines: Some(20),
            ..LogParams::default()
        };
        if let Ok(log) = pods.logs(&name, &params).await {
            text.push_str(&log);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            namespace: "pod-identity".into(),
            image: "registry/agent:1".into(),
            image_pull_policy: "IfNotPresent".into(),
            agent_args: vec!["--iptables-command=iptables-legacy".into()],
            timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_job_runs_the_agent_once_on_the_node_with_the_agents_privileges_only() {
        let job =
            serde_json::to_value(job_for("aks-nodepool-12345-vmss000000", &options()).unwrap()).unwrap();
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["nodeName"], "aks-nodepool-12345-vmss000000");
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(pod["tolerations"][0]["operator"], "Exists");
        let container = &pod["containers"][0];
        assert_eq!(container["image"], "registry/agent:1");
        assert_eq!(
            container["args"],
            json!([
                "--remove-interception",
                "--log-format=text",
                "--iptables-command=iptables-legacy"
            ])
        );
        assert_eq!(
            container["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert!(container["securityContext"]["privileged"].is_null());
    }

    #[test]
    fn job_names_are_short_stable_and_distinct() {
        let long = "a".repeat(253);
        assert!(job_name(&long).len() <= 63);
        assert_eq!(job_name("node-1"), job_name("node-1"));
        assert_ne!(job_name("node-1"), job_name("node-2"));
    }

    #[test]
    fn job_state_follows_its_conditions() {
        let mut job: Job = serde_json::from_value(json!({"metadata": {"name": "j"}})).unwrap();
        assert_eq!(job_state(&job), JobState::Running);
        job.status =
            serde_json::from_value(json!({"conditions": [{"type": "Complete", "status": "True"}]})).unwrap();
        assert_eq!(job_state(&job), JobState::Done);
        job.status = serde_json::from_value(
            json!({"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}),
        )
        .unwrap();
        assert_eq!(job_state(&job), JobState::Failed("BackoffLimitExceeded".into()));
    }
}
