//! `explain`: one pod, from its label to what the node agent would answer, in plain words.

use std::{collections::HashMap, fmt::Write, net::IpAddr};

use kube::ResourceExt;
use pod_identity_api::{
    AssignmentStatus, ObjectKey, POD_LABEL,
    answer::{self, Answer, AssignedView, Mode},
    federation,
    matching::{Index, PodDecision, PodSkip, Rejection, Scope, World},
    pod::{self, Life, PodView},
    validation::SpecError,
};
use serde::Serialize;

pub use self::backends::BackendReport;
use crate::cluster::ClusterState;

mod backends;

/// Why a pod cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// No pod of that name.
    #[error("pod {0} not found")]
    PodNotFound(String),
}

/// The whole explanation, also the JSON output.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// Node the pod is scheduled to.
    pub node: Option<String>,
    /// Phase of the pod.
    pub phase: Option<String>,
    /// Where the pod is in its life: `unscheduled`, `active`, `terminating` (being deleted, its
    /// containers may still run) or `finished`.
    pub life: Life,
    /// IP the agent would see requests come from.
    pub ip: Option<String>,
    /// Value of the `aadpodidbinding` label.
    pub label: Option<String>,
    /// Whether an exception lets the pod reach the metadata service directly.
    pub excepted: bool,
    /// Why the pod takes no part, if it does not.
    pub skipped: Option<String>,
    /// Every binding whose selector equals the label, in rank order.
    pub bindings: Vec<BindingReport>,
    /// Bindings of the pod's namespace, listed when none matched (a typo in the label or selector).
    pub selectors_in_namespace: Vec<String>,
    /// The pod's assignments and their state.
    pub assignments: Vec<AssignmentReport>,
    /// Which backend serves each identity of the pod, and why a federation fails.
    pub backends: Vec<BackendReport>,
    /// What the node agent answers a token request from this pod.
    pub agent: AgentAnswer,
    /// One sentence: does the pod get an identity, and which.
    pub verdict: String,
}

/// One candidate binding.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BindingReport {
    /// `namespace/name` of the binding.
    pub binding: String,
    /// `namespace/name` of the identity it names.
    pub identity: String,
    /// Client ID of that identity, when it exists.
    pub client_id: Option<String>,
    /// Position among the pod's identities (0: what a request naming none gets), when used.
    pub rank: Option<usize>,
    /// Why the binding gives the pod nothing, when it does not.
    pub not_used_because: Option<String>,
}

/// One assignment of the pod.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AssignmentReport {
    /// `namespace/name` of the AzureAssignedIdentity.
    pub name: String,
    /// `namespace/name` of the identity.
    pub identity: String,
    /// `Assigned`, `Created`, `Unassigned`, or `not recorded yet`.
    pub status: String,
}

/// How the agent treats the pod's token requests.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Tokens are served.
    Serve,
    /// Requests wait for an assignment in progress, then get 503 with Retry-After.
    Wait,
    /// Requests are refused.
    Refuse,
    /// Requests go straight to the Instance Metadata Service.
    Direct,
}

/// The agent's answer and why.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AgentAnswer {
    /// What happens to a request.
    pub verdict: Verdict,
    /// In words.
    pub detail: String,
}

/// How the agents know their callers (the chart's `agent.attestHostNetwork`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Callers {
    /// By source address: host-network pods are not intercepted.
    #[default]
    ByAddress,
    /// By the process holding the caller's socket: host-network pods are intercepted and attested.
    Attested,
}

/// Explains the pod `namespace/name` against the cluster state.
pub fn explain(
    state: &ClusterState,
    namespace: &str,
    name: &str,
    scope: Scope,
    mode: Mode,
    callers: Callers,
) -> Result<Explanation, ExplainError> {
    let views: Vec<PodView> = state.pods.iter().map(PodView::from_pod).collect();
    let key = ObjectKey::new(namespace, name);
    let view = views
        .iter()
        .find(|v| v.key == key)
        .ok_or_else(|| ExplainError::PodNotFound(format!("{namespace}/{name}")))?;
    let world = World {
        bindings: &state.bindings,
        identities: &state.identities,
        exceptions: &state.exceptions,
        scope,
    };
    let index = Index::new(world);
    let decision = index.decide(view);
    let ip = calling_address(view);

    let bindings: Vec<BindingReport> = decision
        .candidates
        .iter()
        .map(|candidate| BindingReport {
            binding: candidate.binding.to_string(),
            identity: candidate.identity.to_string(),
            client_id: index
                .identity(&candidate.identity.namespace, &candidate.identity.name)
                .and_then(|i| i.spec.client_id.clone()),
            rank: candidate.outcome.as_ref().ok().copied(),
            not_used_because: candidate
                .outcome
                .as_ref()
                .err()
                .map(|r| rejection_text(r, view, scope)),
        })
        .collect();
    let selectors_in_namespace = if decision.candidates.is_empty() {
        let mut selectors: Vec<String> = state
            .bindings
            .iter()
            .filter(|b| b.namespace().as_deref() == Some(namespace))
            .map(|b| {
                format!(
                    "{} selects {:?}",
                    b.name_any(),
                    b.spec.selector.as_deref().unwrap_or("")
                )
            })
            .collect();
        selectors.sort();
        selectors
    } else {
        Vec::new()
    };
    let assigned: HashMap<ObjectKey, AssignedView> = state
        .assignments
        .iter()
        .map(AssignedView::from_assigned)
        .map(|a| (a.key.clone(), a))
        .collect();
    let assignments: Vec<AssignmentReport> = decision
        .assignments
        .iter()
        .map(|desired| AssignmentReport {
            name: desired.assignment.to_string(),
            identity: desired.identity.to_string(),
            status: match assigned.get(&desired.assignment).map(|a| &a.status) {
                None if index
                    .identity(&desired.identity.namespace, &desired.identity.name)
                    .is_some_and(federation::is_federated) =>
                {
                    "none needed: a federated identity is not assigned to nodes".to_owned()
                }
                None => "not recorded yet".to_owned(),
                Some(AssignmentStatus::Legacy) => {
                    "Assigned (no status, written by aad-pod-identity)".to_owned()
                }
                Some(other) => other.as_str().to_owned(),
            },
        })
        .collect();
    let backends = backends::reports(&decision.assignments, &index, &state.federation);
    let agent = agent_answer(view, &views, &index, (mode, callers), &assigned);
    let verdict = verdict_text(&decision, &agent, &bindings);
    Ok(Explanation {
        pod: format!("{namespace}/{name}"),
        node: view.node_name.clone(),
        phase: view.phase.clone(),
        life: view.life(),
        ip: ip.map(|ip| ip.to_string()),
        label: view.labels.get(POD_LABEL).cloned(),
        excepted: decision.excepted,
        skipped: decision.skipped.as_ref().map(skip_text),
        bindings,
        selectors_in_namespace,
        assignments,
        backends,
        agent,
        verdict,
    })
}

/// The address the agent sees a pod's requests come from: its IPv4 address (the metadata address is
/// IPv4), else its first.
fn calling_address(view: &PodView) -> Option<IpAddr> {
    view.ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(view.ips.first())
        .copied()
}

/// What the agent of the pod's node does with its token requests, through the same rules the agent
/// runs: who is calling ([`pod::caller`]), then the answer to that pod ([`answer::answer`]).
fn agent_answer(
    view: &PodView,
    all: &[PodView],
    index: &Index,
    (mode, callers): (Mode, Callers),
    assigned: &HashMap<ObjectKey, AssignedView>,
) -> AgentAnswer {
    let answer = |verdict, detail: String| AgentAnswer { verdict, detail };
    let waits = "requests wait up to the agent's pod wait, then get 503 with Retry-After, which SDKs retry";
    match view.life() {
        Life::Unscheduled => {
            return answer(
                Verdict::Refuse,
                "the pod is not scheduled to a node yet, so no agent serves it".into(),
            );
        }
        Life::Finished(ending) => {
            return answer(
                Verdict::Refuse,
                format!("the pod has finished ({ending}); the agent no longer serves it"),
            );
        }
        Life::Active | Life::Terminating => {}
    }
    let attested = view.host_network && callers == Callers::Attested;
    if view.host_network && !attested {
        return answer(
            Verdict::Direct,
            "the pod shares the node's network: its requests are not intercepted and reach the Instance \
             Metadata Service directly, with every identity of the node (agent.attestHostNetwork closes this)"
                .into(),
        );
    }
    if attested {
        // The agent knows it by the pod UID in the cgroup of the process holding the caller's socket, not
        // by an address; what it answers is the pod's own, below.
    } else if let Some(refusal) = caller_by_address(view, all, waits) {
        return refusal;
    }
    let attested_note = if attested {
        "the pod shares the node's network and the agent knows it by its processes (callers attested): "
    } else {
        ""
    };
    let mut answered = answer_for_pod(view, index, mode, assigned);
    answered.detail.insert_str(0, attested_note);
    answered
}

/// Whether the pod's own address brings its requests to it: `None` when it does, else what its
/// requests get instead.
fn caller_by_address(view: &PodView, all: &[PodView], waits: &str) -> Option<AgentAnswer> {
    let answer = |verdict, detail: String| Some(AgentAnswer { verdict, detail });
    let Some(ip) = calling_address(view) else {
        return answer(
            Verdict::Wait,
            format!(
                "the pod has no IP in its status yet and the agent recognises callers by their IP: {waits}"
            ),
        );
    };
    let node_pods: Vec<&PodView> = all.iter().filter(|p| p.node_name == view.node_name).collect();
    let awaiting = node_pods.iter().any(|p| p.awaits_its_address());
    let claimants = node_pods.iter().filter(|p| p.ips.contains(&ip)).map(|p| (*p, *p));
    match pod::caller(claimants, awaiting) {
        pod::Caller::Pod(caller) if caller.key == view.key => {}
        pod::Caller::Pod(other) => {
            return answer(
                Verdict::Refuse,
                format!(
                    "pod {} now has the pod's IP {ip}: requests from that address are that pod's",
                    other.key
                ),
            );
        }
        pod::Caller::Ambiguous(pods) => {
            let names: Vec<String> = pods.iter().map(|p| p.key.to_string()).collect();
            return answer(
                Verdict::Wait,
                format!(
                    "several pods of the node have IP {ip} ({}): {waits}",
                    names.join(", ")
                ),
            );
        }
        pod::Caller::Unsettled(_) => {
            return answer(
                Verdict::Wait,
                format!(
                    "the pod is being deleted and a pod starting on its node may have been given IP {ip}: {waits}"
                ),
            );
        }
        pod::Caller::Unknown => return answer(Verdict::Wait, waits.to_owned()),
    }
    None
}

/// What the agent answers the pod, once it knows the pod is calling.
fn answer_for_pod(
    view: &PodView,
    index: &Index,
    mode: Mode,
    assigned: &HashMap<ObjectKey, AssignedView>,
) -> AgentAnswer {
    let answer = |verdict, detail: String| AgentAnswer { verdict, detail };
    let leaving = if view.life() == Life::Terminating {
        "; the pod is being deleted and is served until its containers stop"
    } else {
        ""
    };
    match answer::answer(index, view, mode, assigned) {
        Answer::Excepted => answer(
            Verdict::Direct,
            "an AzurePodIdentityException matches the pod: its requests go straight to the Instance Metadata \
             Service, with every identity of the node"
                .into(),
        ),
        Answer::Refused(refusal) => answer(
            Verdict::Refuse,
            format!("requests are refused at once with 403: {refusal}"),
        ),
        Answer::Identities(identities) => {
            let pending: Vec<String> = identities
                .iter()
                .filter(|i| i.pending.is_some())
                .map(|i| i.assignment.identity.to_string())
                .collect();
            let default = &identities[0];
            if default.pending.is_none() {
                let mut detail = if mode == Mode::Managed {
                    format!(
                        "tokens are served (managed mode: identities are pre-assigned); a request naming no identity gets {}",
                        default.assignment.identity
                    )
                } else {
                    format!(
                        "tokens are served; a request naming no identity gets {}",
                        default.assignment.identity
                    )
                };
                if !pending.is_empty() {
                    let _ = write!(
                        detail,
                        "; requests for {} wait until assigned (503 with Retry-After after the wait bound)",
                        pending.join(", ")
                    );
                }
                detail.push_str(leaving);
                answer(Verdict::Serve, detail)
            } else {
                answer(
                    Verdict::Wait,
                    format!(
                        "{} is still being assigned: requests wait for it, then get 503 with Retry-After if it is not \
                         assigned within the agent's wait bound{leaving}",
                        pending.join(", ")
                    ),
                )
            }
        }
    }
}

fn verdict_text(decision: &PodDecision, agent: &AgentAnswer, bindings: &[BindingReport]) -> String {
    let pod = &decision.pod;
    if let Some(skip) = decision
        .skipped
        .as_ref()
        .filter(|s| !matches!(s, PodSkip::NotLabelled) || bindings.is_empty())
    {
        return format!("{pod} gets no identity: {}.", skip_text(skip));
    }
    match decision.assignments.as_slice() {
        [] if bindings.is_empty() => {
            format!("{pod} gets no identity: no AzureIdentityBinding selects its label {POD_LABEL}.")
        }
        [] => format!(
            "{pod} gets no identity: {} binding(s) select it but none applies (see why above).",
            bindings.len()
        ),
        [only] => match agent.verdict {
            Verdict::Wait => format!("{pod} will get identity {} once it is assigned.", only.identity),
            _ => format!("{pod} gets identity {}.", only.identity),
        },
        several => {
            let names: Vec<String> = several.iter().map(|a| a.identity.to_string()).collect();
            format!(
                "{pod} gets identities {} (default: {}).",
                names.join(", "),
                names[0]
            )
        }
    }
}

fn skip_text(skip: &PodSkip) -> String {
    match skip {
        PodSkip::NotLabelled => format!("it has no {POD_LABEL} label (or an empty one)"),
        PodSkip::NotScheduled => "it is not scheduled to a node yet".into(),
        PodSkip::Finished(ending) => format!("it has finished ({ending})"),
    }
}

fn rejection_text(rejection: &Rejection, pod: &PodView, scope: Scope) -> String {
    match rejection {
        Rejection::OtherNamespace => format!(
            "it is in another namespace than the pod ({}) and matching is namespaced: a binding applies only to \
             pods of its own namespace{}",
            pod.key.namespace,
            if scope == Scope::Namespaced {
                ""
            } else {
                " for this identity"
            }
        ),
        Rejection::IdentityNamespaced => format!(
            "its identity is marked namespaced (annotation aadpodidentity.k8s.io/Behavior: namespaced) and the pod \
             is in namespace {}",
            pod.key.namespace
        ),
        Rejection::InvalidBinding(errors) => format!("the binding is invalid: {}", join(errors)),
        Rejection::IdentityMissing(key) => {
            format!(
                "it names AzureIdentity {}, which does not exist in namespace {}",
                key.name, key.namespace
            )
        }
        Rejection::InvalidIdentity(key, errors) => {
            format!("AzureIdentity {key} is invalid: {}", join(errors))
        }
        Rejection::NameTaken {
            kept,
            same_identity: true,
        } => {
            format!("binding {kept} already gives the pod the same identity")
        }
        Rejection::NameTaken {
            kept,
            same_identity: false,
        } => format!(
            "binding {kept} already gives the pod an identity of the same name from another namespace, and \
             assignments are named <pod>-<namespace>-<identity>"
        ),
    }
}

fn join(errors: &[SpecError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Explanation {
    /// The explanation for people.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
        let _ = writeln!(out, "Pod {}", self.pod);
        let _ = writeln!(
            out,
            "  node: {}   phase: {}   IP: {}",
            or_none(&self.node),
            or_none(&self.phase),
            or_none(&self.ip)
        );
        if self.life == Life::Terminating {
            let _ = writeln!(
                out,
                "  being deleted; its containers may still run (termination grace period)"
            );
        }
        match &self.label {
            Some(label) => {
                let _ = writeln!(out, "  label {POD_LABEL}={label}");
            }
            None => {
                let _ = writeln!(out, "  no {POD_LABEL} label");
            }
        }
        if self.excepted {
            let _ = writeln!(out, "  excepted by an AzurePodIdentityException");
        }
        for binding in &self.bindings {
            let client = binding
                .client_id
                .as_deref()
                .map(|c| format!(" (clientID {c})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  binding {} -> identity {}{client}",
                binding.binding, binding.identity
            );
            match (&binding.rank, &binding.not_used_because) {
                (Some(0), _) => {
                    let _ = writeln!(out, "    applies; the default identity of the pod");
                }
                (Some(rank), _) => {
                    let _ = writeln!(out, "    applies; identity #{} of the pod", rank + 1);
                }
                (None, Some(reason)) => {
                    let _ = writeln!(out, "    not used: {reason}");
                }
                (None, None) => {}
            }
        }
        if self.label.is_some() && self.bindings.is_empty() {
            let _ = writeln!(
                out,
                "  no binding selects {:?}",
                self.label.as_deref().unwrap_or("")
            );
            for selector in &self.selectors_in_namespace {
                let _ = writeln!(out, "    in this namespace: {selector}");
            }
        }
        for assignment in &self.assignments {
            let _ = writeln!(
                out,
                "  assignment {} ({}): {}",
                assignment.name, assignment.identity, assignment.status
            );
        }
        for backend in &self.backends {
            let _ = writeln!(
                out,
                "  identity {}: {} backend ({}): {}",
                backend.identity, backend.backend, backend.because, backend.serves
            );
            if let Some(credential) = &backend.credential {
                let _ = writeln!(out, "    federated identity credential: {credential}");
            }
            for problem in &backend.problems {
                let _ = writeln!(out, "    problem: {problem}");
            }
        }
        let _ = writeln!(out, "Agent: {}", self.agent.detail);
        let _ = writeln!(out, "{}", self.verdict);
        out
    }
}

#[cfg(test)]
mod tests;
