//! The decision at the heart of the controller, as a pure function: given what should be assigned on one
//! machine, what is recorded, and what the machine holds, which objects to write and which identities to
//! add or remove in one request.
//!
//! A round runs [`plan`] repeatedly: write what is safe now, send the delta, read the machine's answer,
//! plan again (which then finishes the objects that waited for the delta). Every decision is per
//! identity on the machine (a scale set's identities serve all its nodes):
//!
//! | needed by a pod | on the machine | one of our records says `added` | action |
//! |---|---|---|---|
//! | yes | no | – | add (records marked `added` first), unless quarantined |
//! | yes | yes | – | mark records Assigned |
//! | no | yes | yes, not protected | remove, then release records |
//! | no | yes | no, or protected | release records, identity stays |
//! | no | no | – | release records |
//!
//! "Protected" is the immutable list and the cluster's own identity. An identity in a change ARM is
//! applying now is left out of the step altogether, until ARM's answer says where it stands. A machine that ARM is deleting is
//! left alone.
//!
//! "On the machine" means on its instances, which only a model ARM has applied says
//! ([`Settlement::Applied`]). A model read while a change is applied ([`Settlement::Applying`]: ours, whose
//! answer was lost, or someone else's) is no evidence either way: nothing is marked Assigned, nothing is
//! sent (ARM refuses a second update meanwhile), no record saying `added` is released, and the machine
//! is read again ([`Plan::settling`]). A model whose last change failed ([`Settlement::Unapplied`]) lists
//! what the instances may lack: needed identities not yet recorded Assigned are sent again (the update
//! applies the whole model), and records saying `added` of identities it no longer lists are kept until a
//! model ARM applied shows them gone. A machine ARM says does not exist (deleted, with its scale set or resource group) holds
//! nothing: records no pod needs are released, and those pods still want are kept, not usable, with the
//! reason, until the machine is back (re-created under the same name) or their pods go.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use pod_identity_api::{AssignmentStatus, ObjectKey};
use pod_identity_azure::{IdentityDelta, resource_id::fold};
use serde_json::{Value, json};

use crate::{
    arm::{Observed, Settlement},
    machine::Target,
    record::{ERROR_ANNOTATION, MACHINE_ANNOTATION, ORIGIN_ANNOTATION, Origin, Recorded, Wanted},
};

/// Everything about one machine that a worker acts on.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineInput {
    /// The machine.
    pub target: Target,
    /// Assignments that should exist on it.
    pub wanted: Vec<Wanted>,
    /// Assignment objects recorded for it.
    pub recorded: Vec<Recorded>,
    /// Case-folded identity IDs that pods on this machine need but whose records cannot be written yet
    /// (their name is still held by a stale record); they must not be removed meanwhile.
    pub reserved: BTreeSet<String>,
    /// Assignments still wanted whose pod's node is gone and whose record the planner has not seen yet
    /// (its watch lags behind the worker's own write): only the record knows the machine, so a record
    /// of one of these names found here is kept, with its identity, as the planner would keep it.
    pub held: BTreeSet<ObjectKey>,
}

impl MachineInput {
    /// An input with nothing to do.
    pub fn empty(target: Target) -> Self {
        Self {
            target,
            wanted: Vec::new(),
            recorded: Vec::new(),
            reserved: BTreeSet::new(),
            held: BTreeSet::new(),
        }
    }

    /// Replaces or adds a record (after we wrote it).
    pub fn record(&mut self, recorded: Recorded) {
        match self.recorded.iter_mut().find(|r| r.key == recorded.key) {
            Some(slot) => *slot = recorded,
            None => self.recorded.push(recorded),
        }
    }

    /// Forgets a record (after we deleted it).
    pub fn forget(&mut self, key: &ObjectKey) {
        self.recorded.retain(|r| &r.key != key);
    }
}

/// Identities that must never leave a machine: the immutable list and the cluster's own identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Protection {
    client_ids: HashSet<String>,
    resource_ids: HashSet<String>,
}

impl Protection {
    /// From a list of client IDs or resource IDs (the original's `--immutable-user-msis` took client
    /// IDs; resource IDs are accepted too).
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(entries: I) -> Self {
        let mut protection = Self::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                continue;
            }
            if entry.starts_with('/') {
                protection.resource_ids.insert(fold(entry));
            } else {
                protection.client_ids.insert(entry.to_ascii_lowercase());
            }
        }
        protection
    }

    /// Whether an identity, by resource ID or by any of the client IDs known for it, is protected.
    pub fn protects<'a>(&self, id_key: &str, client_ids: impl IntoIterator<Item = &'a str>) -> bool {
        self.resource_ids.contains(id_key)
            || client_ids
                .into_iter()
                .any(|c| self.client_ids.contains(&c.to_ascii_lowercase()))
    }
}

/// What a worker knows besides its input.
pub struct Context<'a> {
    /// The machine as last read; `None` when not read in this round.
    pub observed: Option<&'a Observed>,
    /// Why an identity is quarantined, if it is (case-folded ID in).
    pub quarantine: &'a dyn Fn(&str) -> Option<String>,
    /// Identities never removed.
    pub protection: &'a Protection,
    /// The change ARM is applying now: its identities are left alone (no record written, nothing sent
    /// again) until its answer is known, and `observed` is the machine from before it.
    pub in_flight: Option<&'a IdentityDelta>,
}

/// Something that happened to an assignment, for events and metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// The identity is usable by the pod.
    Assigned(Box<Wanted>),
    /// The identity cannot be assigned for now.
    Quarantined {
        /// The assignment.
        wanted: Box<Wanted>,
        /// Why.
        reason: String,
    },
}

/// One write to the Kubernetes API.
#[derive(Clone, Debug)]
pub enum Write {
    /// Create an assignment object.
    Create {
        /// The object.
        object: Box<pod_identity_api::AzureAssignedIdentity>,
        /// What it means.
        transition: Option<Transition>,
    },
    /// Merge-patch an existing object, conditional on its resource version.
    Patch {
        /// The object.
        key: ObjectKey,
        /// JSON merge patch (with `metadata.resourceVersion` as precondition).
        patch: Value,
        /// What it means.
        transition: Option<Transition>,
    },
    /// Mark `Unassigned`, drop our finalizer and delete.
    Release {
        /// The object.
        key: ObjectKey,
        /// Its resource version.
        resource_version: Option<String>,
        /// Its UID.
        uid: Option<String>,
        /// Its finalizers other than ours.
        other_finalizers: Vec<String>,
    },
}

/// The outcome of [`plan`].
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Writes that are right given what is known now. Creates and patches come before releases, so
    /// that a record saying `added` is passed on before the last one holding it goes.
    pub writes: Vec<Write>,
    /// The change to send to ARM.
    pub delta: IdentityDelta,
    /// The machine must be read before anything else can be decided.
    pub needs_observation: bool,
    /// ARM is deleting the machine: nothing is done.
    pub deferred: bool,
    /// ARM is applying a change to the machine and something waits for it to finish: read the machine
    /// again after a poll interval, and send nothing meanwhile.
    pub settling: bool,
    /// Identities that would be added but are quarantined, with the reason.
    pub quarantined: Vec<(String, String)>,
}

impl Plan {
    /// Whether the round is finished.
    pub fn is_idle(&self) -> bool {
        self.writes.is_empty() && self.delta.is_empty() && !self.needs_observation && !self.settling
    }
}

/// Per identity: who needs it and who records it.
#[derive(Default)]
struct Pair<'a> {
    id: Option<&'a str>,
    wanted: Vec<&'a Wanted>,
    recorded: Vec<&'a Recorded>,
}

/// Decides one step of a round; see the module documentation.
pub fn plan(input: &MachineInput, ctx: &Context<'_>) -> Plan {
    let mut plan = Plan::default();
    let machine_id = match &input.target {
        Target::Azure(machine) => Some(machine.arm_id()),
        Target::NoAzure => None,
    };
    if ctx.observed.is_some_and(Observed::is_deleting) {
        plan.deferred = true;
        return plan;
    }
    let recorded_by_name: BTreeMap<&ObjectKey, &Recorded> =
        input.recorded.iter().map(|r| (&r.key, r)).collect();
    let wanted_names: HashSet<&ObjectKey> = input.wanted.iter().map(|w| &w.key).collect();
    // Records no assignment wants, and none is held for.
    let is_stale = |r: &Recorded| !wanted_names.contains(&r.key) && !input.held.contains(&r.key);

    let mut pairs: BTreeMap<Option<String>, Pair<'_>> = BTreeMap::new();
    for wanted in &input.wanted {
        let pair = pairs.entry(wanted.identity_key()).or_default();
        pair.id = pair.id.or(wanted.identity_id.as_deref());
        pair.wanted.push(wanted);
    }
    for recorded in &input.recorded {
        // Service principals and records of an unknown machine never involve ARM.
        let key = match input.target {
            Target::Azure(_) => recorded.identity_key(),
            Target::NoAzure => None,
        };
        let pair = pairs.entry(key).or_default();
        pair.id = pair.id.or(recorded.identity_id.as_deref());
        pair.recorded.push(recorded);
    }

    let mut creates_and_patches = Vec::new();
    let mut releases = Vec::new();
    for (key, pair) in &pairs {
        if let (Some(key), Some(in_flight)) = (key, ctx.in_flight)
            && in_flight.touches(key)
        {
            continue;
        }
        let Some(key) = key else {
            // No ARM: wanted ones are assigned at once, the others released.
            for wanted in &pair.wanted {
                match recorded_by_name.get(&wanted.key) {
                    None => creates_and_patches.push(create(
                        wanted,
                        AssignmentStatus::Assigned,
                        Origin::Unknown,
                        None,
                        None,
                    )),
                    Some(recorded) => {
                        let update = RecordUpdate {
                            status: (!recorded.status.is_usable()).then_some(AssignmentStatus::Assigned),
                            ..RecordUpdate::default()
                        };
                        creates_and_patches.extend(update.into_write(recorded, wanted));
                    }
                }
            }
            for recorded in pair.recorded.iter().filter(|r| is_stale(r)) {
                releases.push(release(recorded));
            }
            continue;
        };
        let id = pair.id.unwrap_or(key);
        let needed_now = !pair.wanted.is_empty();
        let needed = needed_now
            || input.reserved.contains(key)
            || pair.recorded.iter().any(|r| input.held.contains(&r.key));
        let owned = pair.recorded.iter().any(|r| r.origin == Origin::Added);
        let client_ids = pair
            .wanted
            .iter()
            .filter_map(|w| w.client_id.as_deref())
            .chain(pair.recorded.iter().filter_map(|r| r.client_id.as_deref()))
            .chain(
                ctx.observed
                    .and_then(|o| o.identities.get(key))
                    .and_then(|i| i.client_id.as_deref()),
            );
        let protected = ctx.protection.protects(key, client_ids);
        let stale: Vec<&Recorded> = pair.recorded.iter().copied().filter(|r| is_stale(r)).collect();
        let needs_knowledge = pair.wanted.iter().any(|w| {
            recorded_by_name.get(&w.key).is_none_or(|r| {
                !r.status.is_usable() || r.differs_from(w) || !r.has_finalizer || r.machine.is_none()
            })
        }) || stale.iter().any(|r| r.origin == Origin::Added && !protected);
        let Some(observed) = ctx.observed else {
            // Without the machine's state only releases that can never remove anything are safe.
            if needs_knowledge {
                plan.needs_observation = true;
            }
            for recorded in &stale {
                if recorded.origin != Origin::Added || protected {
                    releases.push(release(recorded));
                }
            }
            continue;
        };
        let settlement = observed.settlement();
        let listed = observed.has(key);
        // On the instances for certain: listed by a model ARM has applied.
        let present = listed && settlement == Settlement::Applied;
        let unconfirmed = pair
            .wanted
            .iter()
            .any(|w| recorded_by_name.get(&w.key).is_none_or(|r| !r.status.is_usable()));
        // Needed but neither on the instances nor on its way there: not listed, or listed by a model
        // whose change failed and not yet confirmed by one that applied.
        let missing = !listed || (settlement == Settlement::Unapplied && unconfirmed);
        let absent = observed
            .absent
            .as_ref()
            .map(|message| format!("{} does not exist: {message}", input.target));
        // What keeps a needed identity off the machine: quarantine, or no machine at all.
        let quarantine = if needed_now && missing {
            (ctx.quarantine)(key).or(absent.clone())
        } else {
            None
        };
        let applying = settlement == Settlement::Applying;
        let add = needed_now && missing && quarantine.is_none();
        let remove = !needed && listed && owned && !protected;
        // Records saying `added` of an identity the model does not show applied stay until one does.
        let keep_owned = settlement != Settlement::Applied;
        if applying
            && (add
                || remove
                || (needed_now && listed && unconfirmed)
                || (stale.iter().any(|r| r.origin == Origin::Added) && !protected))
        {
            plan.settling = true;
        }
        let (add, remove) = (add && !applying, remove && !applying);
        if add {
            plan.delta.add.push(id.to_owned());
        }
        if remove {
            plan.delta.remove.push(id.to_owned());
        }
        if let Some(reason) = quarantine.as_ref().filter(|_| absent.is_none()) {
            plan.quarantined.push((id.to_owned(), reason.clone()));
        }
        // Records that stay take `added` when the identity is (or becomes) ours; sending again what a
        // failed change listed makes nothing ours.
        let origin_for_kept = if owned || (add && !listed) {
            Origin::Added
        } else if listed {
            Origin::Preexisting
        } else {
            Origin::Unknown
        };
        for wanted in &pair.wanted {
            let status = present.then_some(AssignmentStatus::Assigned);
            match recorded_by_name.get(&wanted.key) {
                None => {
                    let status = status.unwrap_or(AssignmentStatus::Created);
                    creates_and_patches.push(create(
                        wanted,
                        status,
                        origin_for_kept,
                        machine_id.as_deref(),
                        quarantine.as_deref(),
                    ));
                }
                Some(recorded) => {
                    let origin = match (recorded.origin, origin_for_kept) {
                        (Origin::Added, _) => None,
                        (_, Origin::Added) => Some(Origin::Added),
                        // A record we create says what we found; an adopted one stays as it is.
                        (Origin::Unknown, Origin::Preexisting) => None,
                        (have, want) if have != want && want != Origin::Unknown => Some(want),
                        _ => None,
                    };
                    // On no machine, a record that said the identity was usable says so no more.
                    let status = match status {
                        Some(assigned) => Some(assigned).filter(|_| !recorded.status.is_usable()),
                        None if absent.is_some() && recorded.status.is_usable() => {
                            Some(AssignmentStatus::Created)
                        }
                        None => None,
                    };
                    let update = RecordUpdate {
                        status,
                        origin,
                        machine: machine_id
                            .as_deref()
                            .filter(|m| recorded.machine.as_deref() != Some(*m)),
                        error: match (&quarantine, &recorded.error) {
                            (Some(reason), current) if current.as_deref() != Some(reason.as_str()) => {
                                Some(Some(reason.clone()))
                            }
                            (None, Some(_)) if present => Some(None),
                            _ => None,
                        },
                        quarantined: quarantine.clone(),
                    };
                    creates_and_patches.extend(update.into_write(recorded, wanted));
                }
            }
        }
        for recorded in stale {
            let kept = if keep_owned {
                recorded.origin == Origin::Added && !protected
            } else {
                remove && present
            };
            if !kept {
                releases.push(release(recorded));
            }
        }
    }
    plan.writes = creates_and_patches;
    plan.writes.extend(releases);
    plan.delta.keep_system_assigned = ctx.observed.is_some_and(|o| o.system_assigned);
    plan.delta.users_before = ctx.observed.map_or(0, |o| o.identities.len());
    plan
}

fn create(
    wanted: &Wanted,
    status: AssignmentStatus,
    origin: Origin,
    machine: Option<&str>,
    quarantine: Option<&str>,
) -> Write {
    let mut object = wanted.to_create(&status, origin, machine);
    if let Some(reason) = quarantine {
        object
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(ERROR_ANNOTATION.to_owned(), reason.to_owned());
    }
    let transition = match (status, quarantine) {
        (AssignmentStatus::Assigned, _) => Some(Transition::Assigned(Box::new(wanted.clone()))),
        (_, Some(reason)) => Some(Transition::Quarantined {
            wanted: Box::new(wanted.clone()),
            reason: reason.to_owned(),
        }),
        _ => None,
    };
    Write::Create {
        object: Box::new(object),
        transition,
    }
}

fn release(recorded: &Recorded) -> Write {
    Write::Release {
        key: recorded.key.clone(),
        resource_version: recorded.resource_version.clone(),
        uid: recorded.uid.clone(),
        other_finalizers: recorded
            .object
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| f.as_str() != pod_identity_api::ASSIGNED_IDENTITY_FINALIZER)
            .cloned()
            .collect(),
    }
}

/// The changes to one existing record.
#[derive(Default)]
struct RecordUpdate<'a> {
    status: Option<AssignmentStatus>,
    origin: Option<Origin>,
    machine: Option<&'a str>,
    /// `Some(Some(text))` sets the error, `Some(None)` clears it.
    error: Option<Option<String>>,
    quarantined: Option<String>,
}

impl RecordUpdate<'_> {
    /// The merge patch, or nothing when the record is right as it is. The finalizer, label and spec
    /// are brought in line too (records adopted from the original may lack them).
    fn into_write(self, recorded: &Recorded, wanted: &Wanted) -> Option<Write> {
        let mut metadata = serde_json::Map::new();
        let mut annotations = serde_json::Map::new();
        if let Some(origin) = self.origin.and_then(Origin::as_str) {
            annotations.insert(ORIGIN_ANNOTATION.into(), json!(origin));
        }
        if let Some(machine) = self.machine {
            annotations.insert(MACHINE_ANNOTATION.into(), json!(machine));
        }
        match &self.error {
            Some(Some(text)) => {
                annotations.insert(ERROR_ANNOTATION.into(), json!(text));
            }
            Some(None) => {
                annotations.insert(ERROR_ANNOTATION.into(), Value::Null);
            }
            None => {}
        }
        if !annotations.is_empty() {
            metadata.insert("annotations".into(), Value::Object(annotations));
        }
        if !recorded.has_finalizer {
            let mut finalizers: Vec<String> = recorded.object.metadata.finalizers.clone().unwrap_or_default();
            finalizers.push(pod_identity_api::ASSIGNED_IDENTITY_FINALIZER.to_owned());
            metadata.insert("finalizers".into(), json!(finalizers));
        }
        let spec_differs = recorded.differs_from(wanted);
        if !recorded.labelled {
            metadata.insert(
                "labels".into(),
                json!({ pod_identity_api::NODENAME_LABEL: wanted.node }),
            );
        }
        let mut patch = serde_json::Map::new();
        if spec_differs {
            patch.insert("spec".into(), json!(wanted.object.spec));
        }
        if let Some(status) = &self.status {
            patch.insert(
                "status".into(),
                json!({ "status": status.as_str(), "availableReplicas": 1 }),
            );
        }
        if metadata.is_empty() && patch.is_empty() {
            return None;
        }
        metadata.insert("resourceVersion".into(), json!(recorded.resource_version));
        patch.insert("metadata".into(), Value::Object(metadata));
        let transition = if self.status == Some(AssignmentStatus::Assigned) {
            Some(Transition::Assigned(Box::new(wanted.clone())))
        } else if let (Some(Some(_)), Some(reason)) = (&self.error, self.quarantined) {
            Some(Transition::Quarantined {
                wanted: Box::new(wanted.clone()),
                reason,
            })
        } else {
            None
        };
        Some(Write::Patch {
            key: recorded.key.clone(),
            patch: Value::Object(patch),
            transition,
        })
    }
}

#[cfg(test)]
mod tests;
