//! Which pod is calling, which identity its request resolves to, or why it gets none, or why it must
//! wait.
//!
//! Who a pod is and what it may use (its life, its address, matching, assignments, exceptions) are the
//! api crate's rules ([`pod_identity_api::pod`], [`pod_identity_api::answer`]), the same ones the CLI
//! explains; this module adds what only the agent knows: the identity the request names, object IDs
//! learnt from tokens, and whether its watches have synced. It is a plain function of the world and the
//! request; waiting, fetching and answering are the server's.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, Mutex, OnceLock},
};

pub use pod_identity_api::answer::Mode;
use pod_identity_api::{
    AssignmentStatus, AzureIdentity, IdentityType, ObjectKey,
    answer::{self, Answer, AssignmentPending, PodIdentity},
    federation::Backend,
};

use pod_identity_azure::resource_id;

use crate::{
    request::Selector,
    world::{Caller, PodRecord, World},
};

/// The settings resolution depends on. The matching scope is the world's ([`World::new`]): its index
/// is kept for one scope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Standard or managed.
    pub mode: Mode,
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
    /// A user-assigned identity served by workload identity federation: its tokens come from Entra in
    /// exchange for a token of the identity's subject ([`crate::federation`]). Never shared between
    /// objects, because each object has its own subject (and Entra may trust one and not the other).
    Federated {
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
            Self::Federated { .. } => "federated_identity",
            Self::Node(_) => "node",
        }
    }
}

/// An identity a request may use.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The AzureIdentity.
    pub identity: ObjectKey,
    /// Its spec and metadata, as the token source needs them; shared, not copied, by every request
    /// that picks it.
    pub object: Arc<AzureIdentity>,
    /// Whose tokens these are.
    pub principal: Principal,
    /// Set once the pod's first token with this identity is known to be recorded: its later requests
    /// read this, which no request writes, instead of locking the node's record of first tokens.
    pub first_token_recorded: OnceLock<()>,
}

/// Why a request must wait. Each can change without anyone's action (a pod's address or containers
/// reported, an assignment made, a list loaded), so when the wait runs out the answer is one SDKs retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    /// No pod of this node that may run has the caller's address yet (its IP is not reported yet, as
    /// when an init container asks at once).
    UnknownCaller,
    /// Several pods that are not being deleted have it; one of them is probably going away.
    AmbiguousCaller(Vec<ObjectKey>),
    /// Only this pod, being deleted, has it, while a pod starting on this node may have been given it.
    UnsettledCaller(ObjectKey),
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
            Self::UnsettledCaller(pod) => write!(
                f,
                "pod {pod}, being deleted, has the caller's IP address, and a pod starting on this node may \
                 have been given it"
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

impl Pending {
    /// Whether the wait is for the caller to be known (rather than for its identity).
    pub fn is_about_the_caller(&self) -> bool {
        matches!(
            self,
            Self::UnknownCaller | Self::AmbiguousCaller(_) | Self::UnsettledCaller(_)
        )
    }
}

impl From<AssignmentPending> for Pending {
    fn from(pending: AssignmentPending) -> Self {
        Self::Assignment {
            identity: pending.identity,
            status: pending.status,
        }
    }
}

/// The pod calling from `ip`, or why it is not known yet.
pub fn calling_pod(world: &World, ip: IpAddr) -> Result<&Arc<PodRecord>, Pending> {
    match world.caller(ip) {
        Caller::Pod(pod) => Ok(pod),
        Caller::Unknown => Err(Pending::UnknownCaller),
        Caller::Ambiguous(pods) => Err(Pending::AmbiguousCaller(pods)),
        Caller::Unsettled(pod) => Err(Pending::UnsettledCaller(pod)),
    }
}

/// The pod a node-local caller names (`/host/token`), if it may run.
pub fn named_pod<'a>(world: &'a World, key: &ObjectKey) -> Result<&'a Arc<PodRecord>, Pending> {
    world
        .pod(key)
        .filter(|pod| pod.view.life().may_run())
        .ok_or(Pending::UnknownCaller)
}

/// The pod attestation found holding a host caller's socket (a host-network pod), if it may run; while
/// the watch has not shown it yet, the caller waits for it.
pub fn attested_pod<'a>(world: &'a World, uid: &str) -> Result<&'a Arc<PodRecord>, Pending> {
    world
        .pods()
        .find(|pod| pod.view.uid.as_deref() == Some(uid))
        .filter(|pod| pod.view.life().may_run())
        .ok_or(Pending::UnknownCaller)
}

/// What a request resolves to.
#[derive(Clone, Debug)]
pub enum Resolution {
    /// A token of this identity.
    Serve(Arc<Grant>),
    /// The pod is excepted: it gets what the node's IMDS gives for its request.
    Excepted,
    /// The answer may change: wait for the world to change, up to a bound.
    Wait(Pending),
    /// Refused (403), with the reason the caller is told.
    Deny(String),
    /// `object_id` was asked and some of the pod's identities have an object ID the agent has not
    /// learnt yet; their tokens tell it.
    LearnObjectIds(Vec<Arc<Grant>>),
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
    resolve_from(
        pod_identities(world, policy, pod).as_ref(),
        &pod.view.key,
        selector,
        ids,
    )
}

/// Resolves a request of pod `key` for `selector` from the pod's identities ([`pod_identities`]; `None`
/// before every list has arrived).
pub fn resolve_from(
    identities: Option<&PodIdentities>,
    key: &ObjectKey,
    selector: &Selector,
    ids: &dyn ObjectIds,
) -> Resolution {
    let options = match identities {
        None => return Resolution::Wait(Pending::NotSynced),
        Some(PodIdentities::Excepted) => return Resolution::Excepted,
        Some(PodIdentities::Refused(why)) => return Resolution::Deny(why.clone()),
        // The pod's identities in rank order (0 is the default), each with whether it may be used now.
        Some(PodIdentities::Identities(options)) => options,
    };
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
                .is_some_and(|resource| resource_id::same(resource, id))
        }),
        Selector::ObjectId(id) => {
            if let Some(found) = options.iter().find(|(grant, _)| {
                ids.object_id(&grant.principal)
                    .is_some_and(|known| known.eq_ignore_ascii_case(id))
            }) {
                Some(found)
            } else {
                let unknown: Vec<&(Arc<Grant>, Option<Pending>)> = options
                    .iter()
                    .filter(|(grant, _)| ids.object_id(&grant.principal).is_none())
                    .collect();
                let learnable: Vec<Arc<Grant>> = unknown
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
        // Shared with the pod's decided identities, not copied.
        Some((grant, None)) => Resolution::Serve(grant.clone()),
        Some((_, Some(pending))) => Resolution::Wait(pending.clone()),
        None => Resolution::Deny(format!("{selector} is not an identity of pod {key}")),
    }
}

/// Each pod's identities as last decided, until the world changes: a request of a stable cluster looks
/// its pod's identities up instead of matching again, whatever the number of bindings, identities and
/// assignments. Any change of the world (a pod, a binding, an identity, an assignment, an exception)
/// starts a new generation ([`World::generation`]), and an entry of an older one is decided again.
/// Holds at most one entry per pod of the node that asked, plus those of pods gone since the last
/// change.
#[derive(Debug, Default)]
pub struct Decided {
    entries: Mutex<foldhash::HashMap<ObjectKey, (u64, Arc<PodIdentities>)>>,
}

impl Decided {
    /// The identities of `pod` ([`pod_identities`]), decided at most once per generation of the world.
    pub fn pod_identities(
        &self,
        world: &World,
        policy: Policy,
        pod: &PodRecord,
    ) -> Option<Arc<PodIdentities>> {
        let generation = world.generation();
        let key = &pod.view.key;
        if let Some((decided_at, identities)) = self.lock().get(key)
            && *decided_at == generation
        {
            return Some(identities.clone());
        }
        let identities = Arc::new(pod_identities(world, policy, pod)?);
        let mut entries = self.lock();
        // Entries of pods that are gone are dropped once they outnumber the node's pods.
        if entries.len() > 2 * world.pod_count() + 16 {
            entries.retain(|_, (decided_at, _)| *decided_at == generation);
        }
        entries.insert(key.clone(), (generation, identities.clone()));
        Some(identities)
    }

    /// Pods with an entry, whatever its generation.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<ObjectKey, (u64, Arc<PodIdentities>)>> {
        // Entries are whole values: a panic elsewhere cannot leave one half-written.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A pod's identities as the cluster's objects decide them, whatever a request names.
#[derive(Clone, Debug)]
pub enum PodIdentities {
    /// Excepted: it gets what the node's IMDS gives.
    Excepted,
    /// None, and why (nothing the pod waits for changes that).
    Refused(String),
    /// Its identities in rank order, each with why it may not be used yet (`None`: it may).
    Identities(Vec<(Arc<Grant>, Option<Pending>)>),
}

/// The identities of `pod`, or `None` before every list has arrived.
pub fn pod_identities(world: &World, policy: Policy, pod: &PodRecord) -> Option<PodIdentities> {
    if !synced(world, policy) {
        return None;
    }
    Some(
        match answer::answer(&world.matching, &pod.view, policy.mode, world) {
            Answer::Excepted => PodIdentities::Excepted,
            Answer::Refused(refusal) => PodIdentities::Refused(refusal.to_string()),
            Answer::Identities(identities) => PodIdentities::Identities(
                identities
                    .into_iter()
                    .map(|identity| {
                        let pending = identity.pending.clone().map(Pending::from);
                        (Arc::new(grant(identity)), pending)
                    })
                    .collect(),
            ),
        },
    )
}

/// Whether the lists this mode reads have all arrived.
pub fn synced(world: &World, policy: Policy) -> bool {
    let s = world.synced;
    s.pods && s.bindings && s.identities && s.exceptions && (policy.mode == Mode::Managed || s.assigned)
}

fn grant(identity: PodIdentity<'_>) -> Grant {
    Grant {
        principal: principal_of(
            identity.object,
            identity.kind,
            identity.backend,
            &identity.assignment.identity,
        ),
        identity: identity.assignment.identity,
        object: Arc::new(identity.object.clone()),
        first_token_recorded: OnceLock::new(),
    }
}

fn principal_of(object: &AzureIdentity, kind: IdentityType, backend: Backend, key: &ObjectKey) -> Principal {
    match kind {
        IdentityType::UserAssignedManagedIdentity if backend == Backend::Federated => Principal::Federated {
            identity: key.clone(),
            uid: object.metadata.uid.clone(),
        },
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
    for pod in world.pods().filter(|pod| pod.view.life().may_run()) {
        match answer::answer(&world.matching, &pod.view, policy.mode, world) {
            Answer::Excepted => authorized.node = true,
            Answer::Refused(_) => {}
            Answer::Identities(identities) => authorized.principals.extend(
                identities
                    .into_iter()
                    .filter(|identity| identity.pending.is_none())
                    .map(|identity| grant(identity).principal),
            ),
        }
    }
    Some(authorized)
}

#[cfg(test)]
pub(crate) mod tests;
