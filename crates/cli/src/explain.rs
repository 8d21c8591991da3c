//! `explain`: one pod, from its label to what the node agent would answer, in plain words.

use std::fmt::Write;

use kube::ResourceExt;
use pod_identity_api::{
    AssignmentStatus, AzureAssignedIdentity, POD_LABEL,
    matching::{Index, PodDecision, PodSkip, PodView, Rejection, Scope, World},
    validation::SpecError,
};
use serde::Serialize;

use crate::{Mode, cluster::ClusterState};

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

/// Explains the pod `namespace/name` against the cluster state.
pub fn explain(
    state: &ClusterState,
    namespace: &str,
    name: &str,
    scope: Scope,
    mode: Mode,
) -> Result<Explanation, ExplainError> {
    let pod = state
        .pods
        .iter()
        .find(|p| p.namespace().as_deref() == Some(namespace) && p.name_any() == name)
        .ok_or_else(|| ExplainError::PodNotFound(format!("{namespace}/{name}")))?;
    let view = PodView::from_pod(pod);
    let world = World {
        bindings: &state.bindings,
        identities: &state.identities,
        exceptions: &state.exceptions,
        scope,
    };
    let index = Index::new(world);
    let decision = index.decide(&view);
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty());

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
                .map(|r| rejection_text(r, &view, scope)),
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
    let assignments: Vec<(AssignmentReport, Option<AssignmentStatus>)> = decision
        .assignments
        .iter()
        .map(|desired| {
            let recorded = find_assignment(
                &state.assignments,
                &desired.assignment.namespace,
                &desired.assignment.name,
            );
            let status = recorded.map(AzureAssignedIdentity::assignment_status);
            let text = match &status {
                None => "not recorded yet".to_owned(),
                Some(AssignmentStatus::Legacy) => {
                    "Assigned (no status, written by aad-pod-identity)".to_owned()
                }
                Some(other) => other.as_str().to_owned(),
            };
            (
                AssignmentReport {
                    name: desired.assignment.to_string(),
                    identity: desired.identity.to_string(),
                    status: text,
                },
                status,
            )
        })
        .collect();
    let agent = agent_answer(&decision, ip.as_deref(), mode, &assignments);
    let verdict = verdict_text(&decision, &agent, &bindings);
    Ok(Explanation {
        pod: format!("{namespace}/{name}"),
        node: view.node_name.clone(),
        phase: view.phase.clone(),
        ip,
        label: view.labels.get(POD_LABEL).cloned(),
        excepted: decision.excepted,
        skipped: decision.skipped.as_ref().map(skip_text),
        bindings,
        selectors_in_namespace,
        assignments: assignments.into_iter().map(|(report, _)| report).collect(),
        agent,
        verdict,
    })
}

fn find_assignment<'a>(
    all: &'a [AzureAssignedIdentity],
    namespace: &str,
    name: &str,
) -> Option<&'a AzureAssignedIdentity> {
    all.iter()
        .find(|a| a.namespace().as_deref() == Some(namespace) && a.name_any() == name)
}

fn agent_answer(
    decision: &PodDecision,
    ip: Option<&str>,
    mode: Mode,
    assignments: &[(AssignmentReport, Option<AssignmentStatus>)],
) -> AgentAnswer {
    let answer = |verdict, detail: String| AgentAnswer { verdict, detail };
    match &decision.skipped {
        Some(PodSkip::Terminating) => {
            return answer(
                Verdict::Refuse,
                "the pod is being deleted; the agent no longer serves it".into(),
            );
        }
        Some(PodSkip::Finished(phase)) => {
            return answer(
                Verdict::Refuse,
                format!("the pod has finished ({phase}); the agent no longer serves it"),
            );
        }
        Some(PodSkip::NotScheduled) => {
            return answer(
                Verdict::Refuse,
                "the pod is not scheduled to a node yet, so no agent serves it".into(),
            );
        }
        Some(PodSkip::NotLabelled) | None => {}
    }
    if ip.is_none() {
        return answer(
            Verdict::Refuse,
            "the pod has no IP yet; the agent recognises callers by their IP".into(),
        );
    }
    if decision.excepted {
        return answer(
            Verdict::Direct,
            "an AzurePodIdentityException matches the pod: its requests go straight to the Instance Metadata \
             Service, with every identity of the node"
                .into(),
        );
    }
    let Some(default) = decision.assignments.first() else {
        return answer(
            Verdict::Refuse,
            "requests are refused at once with 403: the pod has no identity".into(),
        );
    };
    if mode == Mode::Managed {
        return answer(
            Verdict::Serve,
            format!(
                "tokens are served (managed mode: identities are pre-assigned); a request naming no identity gets {}",
                default.identity
            ),
        );
    }
    let usable = |status: &Option<AssignmentStatus>| status.as_ref().is_some_and(AssignmentStatus::is_usable);
    let (_, default_status) = &assignments[0];
    let pending: Vec<&str> = assignments
        .iter()
        .filter(|(_, s)| !usable(s))
        .map(|(r, _)| r.identity.as_str())
        .collect();
    if usable(default_status) {
        let mut detail = format!(
            "tokens are served; a request naming no identity gets {}",
            default.identity
        );
        if !pending.is_empty() {
            let _ = write!(
                detail,
                "; requests for {} wait until assigned (503 with Retry-After after the wait bound)",
                pending.join(", ")
            );
        }
        answer(Verdict::Serve, detail)
    } else {
        answer(
            Verdict::Wait,
            format!(
                "{} is still being assigned: requests wait for it, then get 503 with Retry-After if it is not \
                 assigned within the agent's wait bound",
                pending.join(", ")
            ),
        )
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
        PodSkip::Terminating => "it is being deleted".into(),
        PodSkip::Finished(phase) => format!("it has finished ({phase})"),
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
        let _ = writeln!(out, "Agent: {}", self.agent.detail);
        let _ = writeln!(out, "{}", self.verdict);
        out
    }
}

#[cfg(test)]
mod tests;
