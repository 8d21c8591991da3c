//! What the node agent answers a pod, as far as the cluster's objects decide it: whether the pod is
//! excepted, refused (and why), or which identities it has and whether each may be used yet.
//!
//! The agent serves this answer and the CLI explains it; both call [`answer`], so an explanation cannot
//! drift from the behaviour. What only the agent knows (who is calling, which identity the request
//! names, object IDs learnt from tokens, whether its watches have synced) stays in the agent.

use std::{collections::HashMap, fmt};

use serde::Serialize;

use crate::{
    AssignmentStatus, AzureAssignedIdentity, AzureIdentity, IdentityType, POD_LABEL,
    federation::{self, Backend},
    matching::{DesiredAssignment, Index, PodSkip, Rejection},
    naming::ObjectKey,
    pod::{Ending, PodView},
};

/// Where identities come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The controller adds identities to the node's VM or scale set and records each in an
    /// AzureAssignedIdentity; a pod may use an identity once its assignment is `Assigned`.
    #[default]
    Standard,
    /// Identities are put on the VMs by hand; a pod may use whatever its bindings give it.
    Managed,
}

/// What the answer reads of an AzureAssignedIdentity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignedView {
    /// Namespace and name of the AzureAssignedIdentity.
    pub key: ObjectKey,
    /// The pod it is for.
    pub pod: ObjectKey,
    /// Client ID of the identity it assigned, from its embedded copy.
    pub client_id: Option<String>,
    /// Where it stands.
    pub status: AssignmentStatus,
}

impl AssignedView {
    /// The view of an assignment object.
    pub fn from_assigned(assigned: &AzureAssignedIdentity) -> Self {
        Self {
            key: ObjectKey::new(
                assigned.metadata.namespace.clone().unwrap_or_default(),
                assigned.metadata.name.clone().unwrap_or_default(),
            ),
            pod: ObjectKey::new(assigned.spec.pod_namespace.clone(), assigned.spec.pod.clone()),
            client_id: assigned
                .spec
                .azure_identity_ref
                .as_ref()
                .and_then(|identity| identity.spec.client_id.clone()),
            status: assigned.assignment_status(),
        }
    }
}

/// Assignments by namespace and name.
pub trait Assignments {
    /// The assignment of that namespace and name.
    fn assignment(&self, key: &ObjectKey) -> Option<&AssignedView>;
}

impl Assignments for HashMap<ObjectKey, AssignedView> {
    fn assignment(&self, key: &ObjectKey) -> Option<&AssignedView> {
        self.get(key)
    }
}

/// Why an identity of the pod may not be used yet; that changes once the controller has assigned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignmentPending {
    /// The identity.
    pub identity: ObjectKey,
    /// The assignment's state; `None` when it is not recorded yet.
    pub status: Option<AssignmentStatus>,
}

impl fmt::Display for AssignmentPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.status {
            None => write!(
                f,
                "identity {} is bound to the pod but not yet assigned to this node",
                self.identity
            ),
            Some(status) => write!(
                f,
                "identity {} is being assigned to this node (assignment status '{}')",
                self.identity,
                status.as_str()
            ),
        }
    }
}

/// One identity of a pod.
#[derive(Clone, Debug)]
pub struct PodIdentity<'a> {
    /// The matching result: identity, binding, assignment name, rank (0 is the default identity).
    pub assignment: DesiredAssignment,
    /// The AzureIdentity.
    pub object: &'a AzureIdentity,
    /// Its type.
    pub kind: IdentityType,
    /// Where its tokens come from (always [`Backend::Node`] for service principals, which have no choice).
    pub backend: Backend,
    /// Why it may not be used yet; `None` when it may.
    pub pending: Option<AssignmentPending>,
}

/// Why a pod gets no identity at all. Each needs someone to change an object (a label, a binding, an
/// identity) or is the end of the pod's life: nothing the pod waits for changes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `aadpodidbinding` label.
    NotLabelled {
        /// The pod.
        pod: ObjectKey,
    },
    /// Not on a node.
    NotScheduled {
        /// The pod.
        pod: ObjectKey,
    },
    /// Nothing of it runs any more.
    Finished {
        /// The pod.
        pod: ObjectKey,
        /// How it ended.
        ending: Ending,
    },
    /// No binding has the label's value as selector.
    NoBinding {
        /// The pod.
        pod: ObjectKey,
        /// The label's value.
        selector: String,
    },
    /// Bindings have that selector, and none applies.
    NoneApplies {
        /// The pod.
        pod: ObjectKey,
        /// The label's value.
        selector: String,
        /// Each binding and why it gives nothing.
        rejections: Vec<(ObjectKey, Rejection)>,
    },
    /// Every identity the bindings give is unusable (its type cannot be read).
    NoUsableIdentity {
        /// The pod.
        pod: ObjectKey,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotLabelled { pod } => write!(
                f,
                "pod {pod} has no label {POD_LABEL}, so no AzureIdentityBinding selects it"
            ),
            Self::NotScheduled { pod } => write!(f, "pod {pod} is not scheduled to a node"),
            Self::Finished { pod, ending } => {
                write!(f, "pod {pod} takes no identities any more ({ending})")
            }
            Self::NoBinding { pod, selector } => write!(
                f,
                "no AzureIdentityBinding has selector '{selector}', the value of the label {POD_LABEL} of pod {pod}"
            ),
            Self::NoneApplies {
                pod,
                selector,
                rejections,
            } => {
                let reasons: Vec<String> = rejections
                    .iter()
                    .map(|(binding, rejection)| describe(binding, rejection))
                    .collect();
                write!(
                    f,
                    "no AzureIdentityBinding with selector '{selector}' applies to pod {pod}: {}",
                    reasons.join("; ")
                )
            }
            Self::NoUsableIdentity { pod } => write!(f, "pod {pod} has no usable identity"),
        }
    }
}

/// The agent's answer to a pod.
#[derive(Clone, Debug)]
pub enum Answer<'a> {
    /// An AzurePodIdentityException matches the pod: it gets what the node's IMDS gives.
    Excepted,
    /// No identity, for a reason nothing the pod waits for changes.
    Refused(Refusal),
    /// The pod's identities in rank order (never empty); a request naming none gets the first.
    Identities(Vec<PodIdentity<'a>>),
}

/// The answer to `pod`, from the matching index, the mode and the node's assignments (standard mode).
pub fn answer<'a>(index: &'a Index, pod: &PodView, mode: Mode, assigned: &dyn Assignments) -> Answer<'a> {
    let decision = index.decide(pod);
    let key = &pod.key;
    if decision.excepted {
        return Answer::Excepted;
    }
    match decision.skipped {
        Some(PodSkip::NotLabelled) => return Answer::Refused(Refusal::NotLabelled { pod: key.clone() }),
        Some(PodSkip::NotScheduled) => return Answer::Refused(Refusal::NotScheduled { pod: key.clone() }),
        Some(PodSkip::Finished(ending)) => {
            return Answer::Refused(Refusal::Finished {
                pod: key.clone(),
                ending,
            });
        }
        None => {}
    }
    if decision.assignments.is_empty() {
        let selector = pod.binding_selector().unwrap_or_default().to_owned();
        let rejections: Vec<(ObjectKey, Rejection)> = decision
            .candidates
            .into_iter()
            .filter_map(|candidate| candidate.outcome.err().map(|r| (candidate.binding, r)))
            .collect();
        return Answer::Refused(if rejections.is_empty() {
            Refusal::NoBinding {
                pod: key.clone(),
                selector,
            }
        } else {
            Refusal::NoneApplies {
                pod: key.clone(),
                selector,
                rejections,
            }
        });
    }
    let identities: Vec<PodIdentity<'a>> = decision
        .assignments
        .into_iter()
        .filter_map(|assignment| {
            let object = index.identity(&assignment.identity.namespace, &assignment.identity.name)?;
            let kind = object.spec.identity_type().ok()?;
            let backend = federation::backend(object).ok()?;
            let pending = match (mode, kind, backend) {
                (Mode::Managed, _, _) => None,
                // Service principals live in Entra, not on the VM: nothing to wait for.
                (
                    Mode::Standard,
                    IdentityType::ServicePrincipalSecret | IdentityType::ServicePrincipalCertificate,
                    _,
                ) => None,
                // Nor do federated identities: nothing is assigned, Entra answers for them.
                (Mode::Standard, IdentityType::UserAssignedManagedIdentity, Backend::Federated) => None,
                (Mode::Standard, IdentityType::UserAssignedManagedIdentity, Backend::Node) => {
                    assignment_pending(assigned, &assignment, key, object)
                }
            };
            Some(PodIdentity {
                assignment,
                object,
                kind,
                backend,
                pending,
            })
        })
        .collect();
    if identities.is_empty() {
        return Answer::Refused(Refusal::NoUsableIdentity { pod: key.clone() });
    }
    Answer::Identities(identities)
}

/// Why a type 0 identity may not be used yet, or `None` when its assignment is usable.
fn assignment_pending(
    assigned: &dyn Assignments,
    assignment: &DesiredAssignment,
    pod: &ObjectKey,
    object: &AzureIdentity,
) -> Option<AssignmentPending> {
    let identity = assignment.identity.clone();
    let Some(record) = assigned
        .assignment(&assignment.assignment)
        .filter(|record| record.pod == *pod)
    else {
        return Some(AssignmentPending {
            identity,
            status: None,
        });
    };
    // The assignment must be of the identity as it is now: after a client ID change the controller
    // re-assigns, and until then IMDS does not know the new one.
    let same_identity = match (&record.client_id, &object.spec.client_id) {
        (Some(assigned), Some(current)) => assigned.eq_ignore_ascii_case(current),
        _ => true,
    };
    if record.status.is_usable() && same_identity {
        None
    } else {
        Some(AssignmentPending {
            identity,
            status: Some(record.status.clone()),
        })
    }
}

/// One binding's rejection in a sentence.
pub fn describe(binding: &ObjectKey, rejection: &Rejection) -> String {
    match rejection {
        Rejection::OtherNamespace => {
            format!("binding {binding} is in another namespace (cross-namespace matching is off)")
        }
        Rejection::IdentityNamespaced => format!("binding {binding} names an identity that is namespaced"),
        Rejection::InvalidBinding(errors) => format!("binding {binding} is invalid: {}", join(errors)),
        Rejection::IdentityMissing(identity) => {
            format!("binding {binding} names identity {identity}, which does not exist")
        }
        Rejection::InvalidIdentity(identity, errors) => {
            format!(
                "identity {identity} of binding {binding} is invalid: {}",
                join(errors)
            )
        }
        Rejection::NameTaken { kept, .. } => {
            format!("binding {binding} duplicates binding {kept}")
        }
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
