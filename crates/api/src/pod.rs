//! What the rules read of a pod, and the one rule of a pod's life that the controller (which identities
//! stay on a machine), the agent (who is calling, and whether it is served) and the CLI (what the agent
//! would answer) all apply.
//!
//! A pod needs its identities from its first container start (an init container may ask before the
//! pod's IP reaches the API) to the end of its termination grace period (SIGTERM handlers flush and
//! upload). So a pod takes part while any of its containers may still run:
//! - not yet on a node: nothing of it runs ([`Life::Unscheduled`]);
//! - phase `Succeeded` or `Failed`: nothing runs again, and its IP may already be another pod's
//!   ([`Life::Finished`]);
//! - `metadata.deletionTimestamp` set: its containers got SIGTERM and run until they exit or the grace
//!   period ends; once the kubelet reports every container stopped, it is finished ([`Life::Terminating`]);
//! - otherwise (phase `Pending`, `Running`, `Unknown`, none yet, or a value this code does not know)
//!   it runs or is about to ([`Life::Active`]). `Unknown` means the node stopped reporting, not that the
//!   containers stopped.
//!
//! The original (aad-pod-identity 1.8) served only `Pending` and `Running` pods by IP and removed a
//! pod's identity as soon as it was deleted, so SIGTERM handlers lost their tokens.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use kube::ResourceExt;
use serde::Serialize;

use crate::{POD_LABEL, naming::ObjectKey};

/// What the kubelet last reported of a pod's containers (init, app and ephemeral ones together).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Containers {
    /// No status for some container yet: the kubelet has not reported it.
    #[default]
    Unreported,
    /// At least one container runs.
    Running,
    /// Every container is reported, and none runs (all waiting or terminated).
    NoneRunning,
}

impl Containers {
    /// The summary of a pod status's container statuses.
    pub fn of(status: Option<&PodStatus>) -> Self {
        let Some(status) = status else {
            return Self::Unreported;
        };
        let all: Vec<&ContainerStatus> = [
            &status.init_container_statuses,
            &status.container_statuses,
            &status.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        .flatten()
        .collect();
        let running = |c: &&ContainerStatus| c.state.as_ref().is_some_and(|s| s.running.is_some());
        let stopped = |c: &&ContainerStatus| {
            c.state
                .as_ref()
                .is_some_and(|s| s.running.is_none() && (s.terminated.is_some() || s.waiting.is_some()))
        };
        if all.iter().any(running) {
            Self::Running
        } else if !all.is_empty() && all.iter().all(stopped) {
            Self::NoneRunning
        } else {
            Self::Unreported
        }
    }
}

/// Why nothing of a pod will run again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// Phase `Succeeded`.
    Succeeded,
    /// Phase `Failed`.
    Failed,
    /// Being deleted, and the kubelet reported every container stopped.
    Stopped,
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Succeeded => "phase Succeeded",
            Self::Failed => "phase Failed",
            Self::Stopped => "deleted, every container stopped",
        })
    }
}

/// Where a pod is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Life {
    /// Not bound to a node yet.
    Unscheduled,
    /// On a node, not being deleted, not finished: its containers run or are about to.
    Active,
    /// Being deleted (`deletionTimestamp` set) while a container may still run: until its grace period
    /// ends it may still use its identities.
    Terminating,
    /// Nothing of it will run again.
    Finished(Ending),
}

impl Life {
    /// The rule; see the module documentation.
    pub fn of(scheduled: bool, phase: Option<&str>, deleting: bool, containers: Containers) -> Self {
        match phase {
            Some("Succeeded") => return Self::Finished(Ending::Succeeded),
            Some("Failed") => return Self::Finished(Ending::Failed),
            _ => {}
        }
        if !scheduled {
            return Self::Unscheduled;
        }
        match (deleting, containers) {
            (true, Containers::NoneRunning) => Self::Finished(Ending::Stopped),
            (true, _) => Self::Terminating,
            (false, _) => Self::Active,
        }
    }

    /// Whether a container of the pod may run, so that the pod may use its identities.
    pub fn may_run(self) -> bool {
        matches!(self, Self::Active | Self::Terminating)
    }
}

/// What the rules need to know of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodView {
    /// Namespace and name.
    pub key: ObjectKey,
    /// UID, when known; tells a pod from an earlier one of the same name.
    pub uid: Option<String>,
    /// All labels (exceptions look at any of them).
    pub labels: BTreeMap<String, String>,
    /// Node the pod is scheduled to.
    pub node_name: Option<String>,
    /// `status.phase`.
    pub phase: Option<String>,
    /// Whether `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// What the kubelet last reported of its containers.
    pub containers: Containers,
    /// Whether it shares the node's network namespace (its address is the node's).
    pub host_network: bool,
    /// Its addresses (`status.podIPs`, or `status.podIP`); empty until the kubelet reports them.
    pub ips: Vec<IpAddr>,
}

impl PodView {
    /// The view of a Kubernetes pod. Unparsable addresses are left out: a pod is untrusted input.
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
        let spec = pod.spec.as_ref();
        Self {
            key: ObjectKey::new(pod.namespace().unwrap_or_default(), pod.name_any()),
            uid: pod.uid(),
            labels: pod.labels().clone(),
            node_name: spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()),
            phase: status.and_then(|s| s.phase.clone()),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            containers: Containers::of(status),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ips,
        }
    }

    /// The value of the `aadpodidbinding` label, if set and not empty.
    pub fn binding_selector(&self) -> Option<&str> {
        self.labels
            .get(POD_LABEL)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Where the pod is in its life.
    pub fn life(&self) -> Life {
        Life::of(
            self.node_name.is_some(),
            self.phase.as_deref(),
            self.deleting,
            self.containers,
        )
    }

    /// Whether connections from the pod's addresses may be the pod's own: it may run and has a network
    /// of its own (a host-network pod's address is the node's, shared by everything on the host).
    pub fn owns_its_addresses(&self) -> bool {
        !self.host_network && self.life().may_run()
    }

    /// Whether the pod may hold an address the API does not show yet: its sandbox may be up (with an
    /// address perhaps just released by a pod being deleted) before the kubelet reports it.
    pub fn awaits_its_address(&self) -> bool {
        self.owns_its_addresses() && self.ips.is_empty()
    }
}

/// Whose connection comes from an address, among the pods of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller<'a, P> {
    /// That pod.
    Pod(&'a P),
    /// No pod that may run has the address (yet).
    Unknown,
    /// Several pods that are not being deleted have it: a refusal, not a guess.
    Ambiguous(Vec<&'a P>),
    /// Only a pod being deleted has it, and a pod of the node may already hold it unreported: the
    /// deleted pod's sandbox may be gone and its address handed on.
    Unsettled(&'a P),
}

/// Who calls from an address: `claimants` are the node's pods that list it (with what the rule reads
/// of each), `awaiting` whether any pod of the node may hold an address the API does not show yet
/// ([`PodView::awaits_its_address`]).
///
/// A pod being deleted keeps its address while its containers may run, but the kubelet releases the
/// address before it reports them stopped, and the next pod may get it at once. So a pod that is not
/// being deleted wins over one that is, and a pod being deleted is the caller only when no other pod
/// can be: its own identities for its own last requests, never another pod's.
pub fn caller<'a, P>(
    claimants: impl IntoIterator<Item = (&'a P, &'a PodView)>,
    awaiting: bool,
) -> Caller<'a, P> {
    let mut active = Claimants::None;
    let mut terminating = Claimants::None;
    for (pod, view) in claimants {
        if !view.owns_its_addresses() {
            continue;
        }
        match view.life() {
            Life::Terminating => terminating.push(pod),
            _ => active.push(pod),
        }
    }
    match (active, terminating) {
        (Claimants::One(one), _) => Caller::Pod(one),
        (Claimants::None, Claimants::None) => Caller::Unknown,
        (Claimants::None, Claimants::One(one)) if awaiting => Caller::Unsettled(one),
        (Claimants::None, Claimants::One(one)) => Caller::Pod(one),
        (Claimants::None, Claimants::Several(several)) | (Claimants::Several(several), _) => {
            Caller::Ambiguous(several)
        }
    }
}

/// The pods found for an address, in the order found: nothing is allocated unless there are several,
/// which is never the case on the token path of a healthy node.
enum Claimants<'a, P> {
    None,
    One(&'a P),
    Several(Vec<&'a P>),
}

impl<'a, P> Claimants<'a, P> {
    fn push(&mut self, pod: &'a P) {
        *self = match std::mem::replace(self, Self::None) {
            Self::None => Self::One(pod),
            Self::One(first) => Self::Several(vec![first, pod]),
            Self::Several(mut several) => {
                several.push(pod);
                Self::Several(several)
            }
        };
    }
}

#[cfg(test)]
mod tests;
