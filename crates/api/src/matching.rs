//! Which pod gets which identity: pods, bindings and identities in, the desired assignments out.
//!
//! The rules, those of aad-pod-identity 1.8 with the decisions where this project differs:
//! - a pod takes part when its label `aadpodidbinding` is set and not empty and it may run
//!   ([`crate::pod::Life`]): on a node and not finished; a pod being deleted keeps its identities until
//!   its containers have stopped, so that it has them for its grace period;
//! - a binding matches a pod when its `selector` equals that label value exactly;
//! - a binding refers to the identity of its `azureIdentity` name in the binding's own namespace;
//! - [`Scope::Namespaced`] (the default) also requires the binding to be in the pod's namespace;
//!   [`Scope::CrossNamespace`] lets a binding of any namespace match, except for identities that carry
//!   the annotation `aadpodidentity.k8s.io/Behavior: namespaced`;
//! - a pod's identities are ranked by binding `weight` (highest first), then binding namespace and
//!   name; the first is what a request naming no identity gets (the original took an arbitrary one);
//! - when two matches produce the same assignment name (same identity name in two namespaces, in
//!   cross-namespace scope), the higher ranked one is kept and the other reported;
//! - bindings and identities that fail validation are skipped and reported, never half-used.
//!
//! Exceptions do not change assignments, as in the original: an excepted pod that is also bound still
//! gets the identity on its node, which it then reaches directly.

use std::collections::{BTreeMap, HashMap, btree_map::Entry};

use kube::ResourceExt;

use crate::{
    AzureIdentity, AzureIdentityBinding, AzurePodIdentityException, BEHAVIOR_ANNOTATION, BEHAVIOR_NAMESPACED,
    naming::{ObjectKey, assigned_identity_name},
    pod::{Ending, Life, PodView},
    validation::SpecError,
};

/// Namespace of assignments in cross-namespace scope, where the original always put them.
pub const CROSS_NAMESPACE_ASSIGNMENT_NAMESPACE: &str = "default";

/// Whether bindings may give identities to pods of other namespaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Identity, binding and pod must share a namespace.
    #[default]
    Namespaced,
    /// A binding of any namespace may match a pod, as in the original's default mode.
    CrossNamespace,
}

/// One identity one pod should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredAssignment {
    /// Namespace and name of the `AzureAssignedIdentity` that records it.
    pub assignment: ObjectKey,
    /// The pod.
    pub pod: ObjectKey,
    /// UID of the pod, when known.
    pub pod_uid: Option<String>,
    /// The pod's node.
    pub node: String,
    /// The identity.
    pub identity: ObjectKey,
    /// The binding that matched.
    pub binding: ObjectKey,
    /// Position among the pod's identities; 0 is the pod's default identity.
    pub rank: usize,
}

/// Why a pod has no identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodSkip {
    /// No `aadpodidbinding` label, or an empty one.
    NotLabelled,
    /// Not scheduled to a node yet.
    NotScheduled,
    /// Nothing of it will run again ([`crate::pod::Life::Finished`]).
    Finished(Ending),
}

/// Why a binding that could have matched a pod gave it nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The binding is in another namespace and the scope is namespaced.
    OtherNamespace,
    /// The identity is namespaced by annotation and the pod is in another namespace.
    IdentityNamespaced,
    /// The binding's spec is invalid.
    InvalidBinding(Vec<SpecError>),
    /// No identity of that name exists in the binding's namespace.
    IdentityMissing(ObjectKey),
    /// The identity's spec is invalid.
    InvalidIdentity(ObjectKey, Vec<SpecError>),
    /// Another binding already gives this pod an assignment of the same name: `kept` is the binding
    /// of that assignment. When both refer to the same identity this is mere duplication.
    NameTaken {
        /// Binding whose assignment was kept.
        kept: ObjectKey,
        /// Whether both bindings refer to the same identity.
        same_identity: bool,
    },
}

/// A binding with the same selector as a pod, and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The binding.
    pub binding: ObjectKey,
    /// The identity it names (in its own namespace).
    pub identity: ObjectKey,
    /// `Ok(rank)` when it gave the pod an identity, otherwise why not.
    pub outcome: Result<usize, Rejection>,
}

/// Everything matching decided about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDecision {
    /// The pod.
    pub pod: ObjectKey,
    /// Why the pod takes no part, if it does not.
    pub skipped: Option<PodSkip>,
    /// Whether an `AzurePodIdentityException` of the pod's namespace matches it.
    pub excepted: bool,
    /// Every binding whose selector equals the pod's label, in rank order, with its outcome.
    pub candidates: Vec<Candidate>,
    /// The pod's assignments, rank order.
    pub assignments: Vec<DesiredAssignment>,
}

/// The cluster state matching reads.
#[derive(Clone, Copy, Debug)]
pub struct World<'a> {
    /// Bindings of all namespaces.
    pub bindings: &'a [AzureIdentityBinding],
    /// Identities of all namespaces.
    pub identities: &'a [AzureIdentity],
    /// Exceptions of all namespaces.
    pub exceptions: &'a [AzurePodIdentityException],
    /// Namespaced or cross-namespace matching.
    pub scope: Scope,
}

/// The bindings, identities and exceptions matching reads, indexed for it: bindings by selector in rank
/// order, identities and exceptions by namespace. Built at once from lists ([`Index::new`]) by evaluations
/// of the whole cluster, or kept current object by object from watch events ([`Index::upsert_binding`]
/// and the like), so that deciding one pod costs lookups, not a pass over the cluster.
#[derive(Clone, Debug, Default)]
pub struct Index {
    scope: Scope,
    /// Bindings by selector, each list in rank order; those without a selector under `""`, which no
    /// pod's label matches.
    bindings_by_selector: HashMap<String, Vec<Validated<AzureIdentityBinding>>>,
    /// The selector each binding is filed under.
    binding_selectors: HashMap<ObjectKey, String>,
    /// Identities by namespace, then name.
    identities: HashMap<String, HashMap<String, Validated<AzureIdentity>>>,
    /// Exceptions by namespace, then name.
    exceptions: HashMap<String, HashMap<String, AzurePodIdentityException>>,
}

/// An object with what validating its spec found, once per change of the object rather than once per
/// decision.
#[derive(Clone, Debug)]
struct Validated<T> {
    object: T,
    errors: Vec<SpecError>,
}

impl Validated<AzureIdentityBinding> {
    fn binding(object: AzureIdentityBinding) -> Self {
        Self {
            errors: object.spec.validate(),
            object,
        }
    }
}

impl Validated<AzureIdentity> {
    fn identity(object: AzureIdentity) -> Self {
        let mut errors = object.spec.validate();
        errors.extend(crate::federation::backend_errors(&object));
        Self { object, errors }
    }
}

impl Index {
    /// Indexes the lists of `world`.
    pub fn new(world: World<'_>) -> Self {
        let mut index = Self::empty(world.scope);
        index.replace_bindings(world.bindings.iter().cloned());
        index.replace_identities(world.identities.iter().cloned());
        index.replace_exceptions(world.exceptions.iter().cloned());
        index
    }

    /// An index of nothing yet, matching in `scope`.
    pub fn empty(scope: Scope) -> Self {
        Self {
            scope,
            ..Self::default()
        }
    }

    /// Namespaced or cross-namespace matching.
    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Adds a binding, or replaces the one of the same namespace and name.
    pub fn upsert_binding(&mut self, binding: AzureIdentityBinding) {
        let key = key_of(&binding);
        self.remove_binding(&key);
        let selector = binding.spec.selector.clone().unwrap_or_default();
        let list = self.bindings_by_selector.entry(selector.clone()).or_default();
        let at = list.partition_point(|b| rank_order(&b.object, &binding) == std::cmp::Ordering::Less);
        list.insert(at, Validated::binding(binding));
        self.binding_selectors.insert(key, selector);
    }

    /// Removes a binding; whether it was there.
    pub fn remove_binding(&mut self, key: &ObjectKey) -> bool {
        let Some(selector) = self.binding_selectors.remove(key) else {
            return false;
        };
        if let Some(list) = self.bindings_by_selector.get_mut(&selector) {
            list.retain(|b| !is(&b.object, key));
            if list.is_empty() {
                self.bindings_by_selector.remove(&selector);
            }
        }
        true
    }

    /// Replaces every binding (a relist).
    pub fn replace_bindings(&mut self, bindings: impl IntoIterator<Item = AzureIdentityBinding>) {
        self.bindings_by_selector.clear();
        self.binding_selectors.clear();
        for binding in bindings {
            let key = key_of(&binding);
            let selector = binding.spec.selector.clone().unwrap_or_default();
            if let Some(previous) = self.binding_selectors.insert(key.clone(), selector.clone())
                && let Some(list) = self.bindings_by_selector.get_mut(&previous)
            {
                // A list naming one object twice: the last one counts, as a watch would leave it.
                list.retain(|b| !is(&b.object, &key));
            }
            self.bindings_by_selector
                .entry(selector)
                .or_default()
                .push(Validated::binding(binding));
        }
        self.bindings_by_selector.retain(|_, list| !list.is_empty());
        for list in self.bindings_by_selector.values_mut() {
            list.sort_by(|a, b| rank_order(&a.object, &b.object));
        }
    }

    /// Adds an identity, or replaces the one of the same namespace and name.
    pub fn upsert_identity(&mut self, identity: AzureIdentity) {
        let key = key_of(&identity);
        self.identities
            .entry(key.namespace)
            .or_default()
            .insert(key.name, Validated::identity(identity));
    }

    /// Removes an identity; whether it was there.
    pub fn remove_identity(&mut self, key: &ObjectKey) -> bool {
        remove_named(&mut self.identities, key)
    }

    /// Replaces every identity (a relist).
    pub fn replace_identities(&mut self, identities: impl IntoIterator<Item = AzureIdentity>) {
        self.identities.clear();
        for identity in identities {
            self.upsert_identity(identity);
        }
    }

    /// Adds an exception, or replaces the one of the same namespace and name.
    pub fn upsert_exception(&mut self, exception: AzurePodIdentityException) {
        let key = key_of(&exception);
        self.exceptions
            .entry(key.namespace)
            .or_default()
            .insert(key.name, exception);
    }

    /// Removes an exception; whether it was there.
    pub fn remove_exception(&mut self, key: &ObjectKey) -> bool {
        remove_named(&mut self.exceptions, key)
    }

    /// Replaces every exception (a relist).
    pub fn replace_exceptions(&mut self, exceptions: impl IntoIterator<Item = AzurePodIdentityException>) {
        self.exceptions.clear();
        for exception in exceptions {
            self.upsert_exception(exception);
        }
    }

    /// Every binding, in no particular order.
    pub fn bindings(&self) -> impl Iterator<Item = &AzureIdentityBinding> {
        self.bindings_by_selector
            .values()
            .flatten()
            .map(|validated| &validated.object)
    }

    /// Every identity, in no particular order.
    pub fn identities(&self) -> impl Iterator<Item = &AzureIdentity> {
        self.identities
            .values()
            .flat_map(HashMap::values)
            .map(|validated| &validated.object)
    }

    /// Every exception, in no particular order.
    pub fn exceptions(&self) -> impl Iterator<Item = &AzurePodIdentityException> {
        self.exceptions.values().flat_map(HashMap::values)
    }

    /// Number of bindings.
    pub fn binding_count(&self) -> usize {
        self.binding_selectors.len()
    }

    /// Number of identities.
    pub fn identity_count(&self) -> usize {
        self.identities.values().map(HashMap::len).sum()
    }

    /// Number of exceptions.
    pub fn exception_count(&self) -> usize {
        self.exceptions.values().map(HashMap::len).sum()
    }

    /// The identity of that namespace and name.
    pub fn identity(&self, namespace: &str, name: &str) -> Option<&AzureIdentity> {
        self.identities
            .get(namespace)?
            .get(name)
            .map(|validated| &validated.object)
    }

    /// Whether an exception of the pod's namespace matches the pod.
    pub fn is_excepted(&self, pod: &PodView) -> bool {
        self.exceptions
            .get(pod.key.namespace.as_str())
            .is_some_and(|names| {
                names
                    .values()
                    .any(|exception| exception.spec.excepts(&pod.labels))
            })
    }

    /// Everything matching decides about one pod.
    pub fn decide(&self, pod: &PodView) -> PodDecision {
        let mut decision = PodDecision {
            pod: pod.key.clone(),
            skipped: skip_reason(pod),
            excepted: self.is_excepted(pod),
            candidates: Vec::new(),
            assignments: Vec::new(),
        };
        let Some(selector) = pod.binding_selector() else {
            return decision;
        };
        let node = pod.node_name.as_deref();
        let mut taken: BTreeMap<ObjectKey, (ObjectKey, ObjectKey)> = BTreeMap::new();
        for validated in self.bindings_by_selector.get(selector).into_iter().flatten() {
            let binding = &validated.object;
            let binding_key = key_of(binding);
            let identity_name = binding.spec.azure_identity.clone().unwrap_or_default();
            let identity_key = ObjectKey::new(binding_key.namespace.clone(), identity_name);
            let outcome = self
                .evaluate(pod, validated, &binding_key, &identity_key)
                .and_then(|assignment| match taken.entry(assignment.clone()) {
                    Entry::Occupied(kept) => {
                        let (kept_binding, kept_identity) = kept.get();
                        Err(Rejection::NameTaken {
                            kept: kept_binding.clone(),
                            same_identity: *kept_identity == identity_key,
                        })
                    }
                    Entry::Vacant(slot) => {
                        slot.insert((binding_key.clone(), identity_key.clone()));
                        Ok(assignment)
                    }
                });
            let outcome = match (outcome, node, &decision.skipped) {
                (Ok(assignment), Some(node), None) => {
                    let rank = decision.assignments.len();
                    decision.assignments.push(DesiredAssignment {
                        assignment,
                        pod: pod.key.clone(),
                        pod_uid: pod.uid.clone(),
                        node: node.to_owned(),
                        identity: identity_key.clone(),
                        binding: binding_key.clone(),
                        rank,
                    });
                    Ok(rank)
                }
                // The binding would apply, but the pod takes no part yet (or any more); the rank is
                // what it would have.
                (Ok(_), _, _) => Ok(decision.candidates.iter().filter(|c| c.outcome.is_ok()).count()),
                (Err(rejection), _, _) => Err(rejection),
            };
            decision.candidates.push(Candidate {
                binding: binding_key,
                identity: identity_key,
                outcome,
            });
        }
        decision
    }

    /// The assignment a binding gives a pod, or why it gives none.
    fn evaluate(
        &self,
        pod: &PodView,
        binding: &Validated<AzureIdentityBinding>,
        binding_key: &ObjectKey,
        identity_key: &ObjectKey,
    ) -> Result<ObjectKey, Rejection> {
        if self.scope == Scope::Namespaced && binding_key.namespace != pod.key.namespace {
            return Err(Rejection::OtherNamespace);
        }
        if !binding.errors.is_empty() {
            return Err(Rejection::InvalidBinding(binding.errors.clone()));
        }
        let Validated {
            object: identity,
            errors: identity_errors,
        } = self
            .identities
            .get(&identity_key.namespace)
            .and_then(|names| names.get(&identity_key.name))
            .ok_or_else(|| Rejection::IdentityMissing(identity_key.clone()))?;
        let namespaced_identity = self.scope == Scope::Namespaced || is_namespaced_by_annotation(identity);
        if namespaced_identity && identity_key.namespace != pod.key.namespace {
            return Err(Rejection::IdentityNamespaced);
        }
        if !identity_errors.is_empty() {
            return Err(Rejection::InvalidIdentity(
                identity_key.clone(),
                identity_errors.clone(),
            ));
        }
        let namespace = if namespaced_identity {
            identity_key.namespace.clone()
        } else {
            CROSS_NAMESPACE_ASSIGNMENT_NAMESPACE.to_owned()
        };
        let name = assigned_identity_name(&pod.key.name, &pod.key.namespace, &identity_key.name);
        Ok(ObjectKey::new(namespace, name))
    }
}

/// The outcome of matching every pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// The assignments all pods should have, ordered by assignment namespace and name.
    pub assignments: Vec<DesiredAssignment>,
    /// Assignments of different pods that came out with the same name (the first is kept, the second
    /// dropped). Names are `<pod>-<namespace>-<identity>`, so pod `a-b` of namespace `c` and pod `a` of
    /// namespace `b-c` collide when both land in one namespace, as in cross-namespace scope; the
    /// original silently wrote one object for both.
    pub collisions: Vec<(DesiredAssignment, DesiredAssignment)>,
}

/// Matches every pod; the result does not depend on the order of any input.
pub fn desired_assignments(pods: &[PodView], world: World<'_>) -> Desired {
    let index = Index::new(world);
    let mut all: Vec<DesiredAssignment> = pods
        .iter()
        .flat_map(|pod| index.decide(pod).assignments)
        .collect();
    all.sort_by(|a, b| a.assignment.cmp(&b.assignment).then_with(|| a.pod.cmp(&b.pod)));
    let mut desired = Desired::default();
    for assignment in all {
        match desired.assignments.last() {
            Some(kept) if kept.assignment == assignment.assignment => {
                desired.collisions.push((kept.clone(), assignment));
            }
            _ => desired.assignments.push(assignment),
        }
    }
    desired
}

/// Ordering of a pod's bindings: highest weight first, then namespace and name.
fn rank_order(a: &AzureIdentityBinding, b: &AzureIdentityBinding) -> std::cmp::Ordering {
    b.spec
        .effective_weight()
        .cmp(&a.spec.effective_weight())
        .then_with(|| namespace_of(a).cmp(namespace_of(b)))
        .then_with(|| a.metadata.name.cmp(&b.metadata.name))
}

fn skip_reason(pod: &PodView) -> Option<PodSkip> {
    if pod.binding_selector().is_none() {
        return Some(PodSkip::NotLabelled);
    }
    match pod.life() {
        Life::Finished(ending) => Some(PodSkip::Finished(ending)),
        Life::Unscheduled => Some(PodSkip::NotScheduled),
        Life::Active | Life::Terminating => None,
    }
}

fn is_namespaced_by_annotation(identity: &AzureIdentity) -> bool {
    identity
        .annotations()
        .get(BEHAVIOR_ANNOTATION)
        .is_some_and(|value| value.eq_ignore_ascii_case(BEHAVIOR_NAMESPACED))
}

fn namespace_of<K: kube::Resource>(object: &K) -> &str {
    object.meta().namespace.as_deref().unwrap_or("")
}

/// Whether `object` is the one of that namespace and name.
fn is<K: kube::Resource>(object: &K, key: &ObjectKey) -> bool {
    namespace_of(object) == key.namespace && object.meta().name.as_deref().unwrap_or("") == key.name
}

/// Removes an object filed by namespace, then name; whether it was there.
fn remove_named<T>(by_namespace: &mut HashMap<String, HashMap<String, T>>, key: &ObjectKey) -> bool {
    let Some(names) = by_namespace.get_mut(&key.namespace) else {
        return false;
    };
    let removed = names.remove(&key.name).is_some();
    if names.is_empty() {
        by_namespace.remove(&key.namespace);
    }
    removed
}

fn key_of<K: kube::Resource>(object: &K) -> ObjectKey {
    ObjectKey::new(
        namespace_of(object),
        object.meta().name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests;
