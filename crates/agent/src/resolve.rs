//! Which identity a pod's request resolves to, or why it gets none, or why it must wait.
//!
//! Matching itself (labels, bindings, namespaces, weights) is the api crate's; this module adds what only
//! the agent knows: the assignments of this node and their states (standard mode), exceptions, and the
//! identity the request names. It is a plain function of the world and the request; waiting, fetching
//! and answering are the server's.

use std::collections::HashSet;

use pod_identity_api::{
    AssignmentStatus, AzureIdentity, IdentityType, ObjectKey,
    matching::{Index, PodSkip, Rejection, Scope, World as MatchWorld},
};

use crate::{
    request::Selector,
    world::{PodRecord, World},
};

/// Where identities come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The controller adds identities to the node's VM or scale set and records each in an
    /// AzureAssignedIdentity; a pod may use an identity once its assignment is `Assigned`.
    #[default]
    Standard,
    /// Identities are put on the VMs by hand; a pod may use whatever its bindings give it.
    Managed,
}

/// The settings resolution depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Standard or managed.
    pub mode: Mode,
    /// Namespaced (default) or cross-namespace matching.
    pub scope: Scope,
}

/// Whose tokens a cache entry holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// A user-assigned managed identity, fetched from IMDS by its client ID (lower case). Shared by every
    /// AzureIdentity that names it: IMDS would give each the same token.
    Managed {
        /// Client ID, lower case.
        client_id: String,
    },
    /// A service principal, fetched from Entra with the credential of one AzureIdentity object. Never
    /// shared between objects: an object naming someone else's client ID with a wrong secret must not be
    /// answered from a token another object's secret obtained.
    ServicePrincipal {
        /// The AzureIdentity.
        identity: ObjectKey,
        /// Its UID, so that a deleted and recreated object starts afresh.
        uid: Option<String>,
    },
    /// What the node's IMDS gives an excepted pod for this selector.
    Node(Selector),
}

impl Principal {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Managed { .. } => "managed_identity",
            Self::ServicePrincipal { .. } => "service_principal",
            Self::Node(_) => "node",
        }
    }
}

/// An identity a request may use.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The AzureIdentity.
    pub identity: ObjectKey,
    /// Its spec and metadata, as the token source needs them.
    pub object: AzureIdentity,
    /// Whose tokens these are.
    pub principal: Principal,
}

/// Why a request must wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    /// No live pod of this node has the caller's address yet.
    UnknownCaller,
    /// Several live pods have it; one of them is probably going away.
    AmbiguousCaller(Vec<ObjectKey>),
    /// The identity's assignment is not `Assigned` yet (`None`: not even created).
    Assignment {
        /// The identity.
        identity: ObjectKey,
        /// The assignment's state, if it exists.
        status: Option<AssignmentStatus>,
    },
    /// A watch has not delivered its first list yet.
    NotSynced,
}

impl std::fmt::Display for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownCaller => f.write_str("no pod of this node has the caller's IP address"),
            Self::AmbiguousCaller(pods) => write!(
                f,
                "several pods of this node have the caller's IP address: {}",
                join(pods)
            ),
            Self::Assignment {
                identity,
                status: None,
            } => write!(
                f,
                "identity {identity} is bound to the pod but not yet assigned to this node"
            ),
            Self::Assignment {
                identity,
                status: Some(status),
            } => write!(
                f,
                "identity {identity} is being assigned to this node (assignment status '{}')",
                status.as_str()
            ),
            Self::NotSynced => f.write_str("the agent is still loading pods and identities"),
        }
    }
}

/// What a request resolves to.
#[derive(Clone, Debug)]
pub enum Resolution {
    /// A token of this identity.
    Serve(Box<Grant>),
    /// The pod is excepted: it gets what the node's IMDS gives for its request.
    Excepted,
    /// The answer may change: wait for the world to change, up to a bound.
    Wait(Pending),
    /// Refused (403), with the reason the caller is told.
    Deny(String),
    /// `object_id` was asked and some of the pod's identities have an object ID the agent has not
    /// learnt yet; their tokens tell it.
    LearnObjectIds(Vec<Grant>),
}

/// What the agent knows of an identity's object ID, learnt from the `oid` of its tokens.
pub trait ObjectIds {
    /// The object ID of the principal, if learnt.
    fn object_id(&self, principal: &Principal) -> Option<String>;
}

impl ObjectIds for () {
    fn object_id(&self, _: &Principal) -> Option<String> {
        None
    }
}

/// Resolves a request of `pod` for `selector`.
pub fn resolve(
    world: &World,
    policy: Policy,
    pod: &PodRecord,
    selector: &Selector,
    ids: &dyn ObjectIds,
) -> Resolution {
    if !synced(world, policy) {
        return Resolution::Wait(Pending::NotSynced);
    }
    let match_world = MatchWorld {
        bindings: &world.bindings,
        identities: &world.identities,
        exceptions: &world.exceptions,
        scope: policy.scope,
    };
    let index = Index::new(match_world);
    let decision = index.decide(&pod.view);
    let key = &pod.view.key;
    if decision.excepted {
        return Resolution::Excepted;
    }
    match &decision.skipped {
        Some(PodSkip::NotLabelled) => {
            return Resolution::Deny(format!(
                "pod {key} has no label {}, so no AzureIdentityBinding selects it",
                pod_identity_api::POD_LABEL
            ));
        }
        Some(other) => return Resolution::Deny(format!("pod {key} takes no identities: {other:?}")),
        None => {}
    }
    if decision.assignments.is_empty() {
        let selector_value = pod.view.binding_selector().unwrap_or_default();
        let reasons: Vec<String> = decision
            .candidates
            .iter()
            .filter_map(|candidate| {
                candidate
                    .outcome
                    .as_ref()
                    .err()
                    .map(|rejection| describe(&candidate.binding, rejection))
            })
            .collect();
        return Resolution::Deny(if reasons.is_empty() {
            format!(
                "no AzureIdentityBinding has selector '{selector_value}', the value of the label {} of pod {key}",
                pod_identity_api::POD_LABEL
            )
        } else {
            format!(
                "no AzureIdentityBinding with selector '{selector_value}' applies to pod {key}: {}",
                reasons.join("; ")
            )
        });
    }

    // The pod's identities in rank order (0 is the default), each with whether it may be used now.
    let mut options = Vec::with_capacity(decision.assignments.len());
    for assignment in &decision.assignments {
        let Some(object) = index.identity(&assignment.identity.namespace, &assignment.identity.name) else {
            continue;
        };
        let Ok(kind) = object.spec.identity_type() else {
            continue;
        };
        let grant = Grant {
            identity: assignment.identity.clone(),
            object: object.clone(),
            principal: principal_of(object, kind, &assignment.identity),
        };
        let readiness = match (policy.mode, kind) {
            (Mode::Managed, _) => None,
            // Service principals live in Entra, not on the VM: nothing to wait for.
            (
                Mode::Standard,
                IdentityType::ServicePrincipalSecret | IdentityType::ServicePrincipalCertificate,
            ) => None,
            (Mode::Standard, IdentityType::UserAssignedManagedIdentity) => {
                assignment_pending(world, &assignment.assignment, key, object)
            }
        };
        options.push((grant, readiness));
    }
    if options.is_empty() {
        return Resolution::Deny(format!("pod {key} has no usable identity"));
    }

    let chosen = match selector {
        Selector::Default => options.first(),
        Selector::ClientId(id) => options.iter().find(|(grant, _)| {
            grant
                .object
                .spec
                .client_id
                .as_deref()
                .is_some_and(|client| client.eq_ignore_ascii_case(id))
        }),
        Selector::ResourceId(id) => options.iter().find(|(grant, _)| {
            grant
                .object
                .spec
                .resource_id
                .as_deref()
                .is_some_and(|resource| same_resource_id(resource, id))
        }),
        Selector::ObjectId(id) => {
            if let Some(found) = options.iter().find(|(grant, _)| {
                ids.object_id(&grant.principal)
                    .is_some_and(|known| known.eq_ignore_ascii_case(id))
            }) {
                Some(found)
            } else {
                let unknown: Vec<&(Grant, Option<Pending>)> = options
                    .iter()
                    .filter(|(grant, _)| ids.object_id(&grant.principal).is_none())
                    .collect();
                let learnable: Vec<Grant> = unknown
                    .iter()
                    .filter(|(_, pending)| pending.is_none())
                    .map(|(grant, _)| grant.clone())
                    .collect();
                if !learnable.is_empty() {
                    return Resolution::LearnObjectIds(learnable);
                }
                if let Some((_, Some(pending))) = unknown.first() {
                    return Resolution::Wait(pending.clone());
                }
                None
            }
        }
    };
    match chosen {
        Some((grant, None)) => Resolution::Serve(Box::new(grant.clone())),
        Some((_, Some(pending))) => Resolution::Wait(pending.clone()),
        None => Resolution::Deny(format!("{selector} is not an identity of pod {key}")),
    }
}

/// Whether the lists this mode reads have all arrived.
pub fn synced(world: &World, policy: Policy) -> bool {
    let s = world.synced;
    s.pods && s.bindings && s.identities && s.exceptions && (policy.mode == Mode::Managed || s.assigned)
}

/// Why a type 0 identity may not be used yet, or `None` when its assignment is usable.
fn assignment_pending(
    world: &World,
    assignment: &ObjectKey,
    pod: &ObjectKey,
    object: &AzureIdentity,
) -> Option<Pending> {
    let identity = crate::world::key_of(object);
    let Some(record) = world.assigned(assignment).filter(|record| record.pod == *pod) else {
        return Some(Pending::Assignment {
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
        Some(Pending::Assignment {
            identity,
            status: Some(record.status.clone()),
        })
    }
}

fn principal_of(object: &AzureIdentity, kind: IdentityType, key: &ObjectKey) -> Principal {
    match kind {
        IdentityType::UserAssignedManagedIdentity => Principal::Managed {
            client_id: object
                .spec
                .client_id
                .clone()
                .unwrap_or_default()
                .to_ascii_lowercase(),
        },
        IdentityType::ServicePrincipalSecret | IdentityType::ServicePrincipalCertificate => {
            Principal::ServicePrincipal {
                identity: key.clone(),
                uid: object.metadata.uid.clone(),
            }
        }
    }
}

/// ARM resource IDs compare case-insensitively, with or without a trailing slash.
fn same_resource_id(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

fn describe(binding: &ObjectKey, rejection: &Rejection) -> String {
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

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What some live pod of this node may use right now; cache entries of anything else are dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Authorized {
    /// Identities of bound pods whose assignments are usable.
    pub principals: HashSet<Principal>,
    /// Whether an excepted pod lives here (node tokens may stay cached).
    pub node: bool,
}

impl Authorized {
    /// Whether tokens of this principal may stay cached.
    pub fn allows(&self, principal: &Principal) -> bool {
        match principal {
            Principal::Node(_) => self.node,
            other => self.principals.contains(other),
        }
    }
}

/// What may stay cached, or `None` before every list has arrived (nothing is known to be gone then).
pub fn authorized(world: &World, policy: Policy) -> Option<Authorized> {
    if !synced(world, policy) {
        return None;
    }
    let mut authorized = Authorized::default();
    for pod in world.pods().filter(|pod| pod.is_live()) {
        authorized.principals.extend(
            usable_grants(world, policy, pod)
                .into_iter()
                .map(|grant| grant.principal),
        );
    }
    authorized.node = any_excepted(world, policy);
    Some(authorized)
}

/// The identities a pod may use now, in rank order.
pub fn usable_grants(world: &World, policy: Policy, pod: &PodRecord) -> Vec<Grant> {
    let match_world = MatchWorld {
        bindings: &world.bindings,
        identities: &world.identities,
        exceptions: &world.exceptions,
        scope: policy.scope,
    };
    let index = Index::new(match_world);
    let decision = index.decide(&pod.view);
    decision
        .assignments
        .iter()
        .filter_map(|assignment| {
            let object = index.identity(&assignment.identity.namespace, &assignment.identity.name)?;
            let kind = object.spec.identity_type().ok()?;
            let usable = match (policy.mode, kind) {
                (Mode::Standard, IdentityType::UserAssignedManagedIdentity) => {
                    assignment_pending(world, &assignment.assignment, &pod.view.key, object).is_none()
                }
                _ => true,
            };
            usable.then(|| Grant {
                identity: assignment.identity.clone(),
                object: object.clone(),
                principal: principal_of(object, kind, &assignment.identity),
            })
        })
        .collect()
}

/// Whether an excepted pod lives on this node (then node tokens may stay cached).
pub fn any_excepted(world: &World, policy: Policy) -> bool {
    let match_world = MatchWorld {
        bindings: &world.bindings,
        identities: &world.identities,
        exceptions: &world.exceptions,
        scope: policy.scope,
    };
    let index = Index::new(match_world);
    world
        .pods()
        .filter(|pod| pod.is_live())
        .any(|pod| index.is_excepted(&pod.view))
}

#[cfg(test)]
pub(crate) mod tests;
