//! `simulate`: which pods would gain or lose an identity if a manifest were applied (or deleted).

use std::{collections::BTreeMap, fmt::Write};

use anyhow::{Context, Result, bail};
use kube::ResourceExt;
use pod_identity_api::{
    AzureIdentity, AzureIdentityBinding, ObjectKey,
    matching::{DesiredAssignment, Scope, World, desired_assignments},
    pod::PodView,
};
use serde::Serialize;
use serde_json::Value;

use crate::cluster::ClusterState;

/// The objects of a manifest, and whether they are applied or deleted.
#[derive(Clone, Debug, Default)]
pub struct Change {
    /// Identities of the manifest.
    pub identities: Vec<AzureIdentity>,
    /// Bindings of the manifest.
    pub bindings: Vec<AzureIdentityBinding>,
    /// Whether the objects are deleted rather than applied.
    pub delete: bool,
}

impl Change {
    /// Reads one or more YAML or JSON documents; objects without a namespace go to `namespace`.
    pub fn parse(text: &str, namespace: &str, delete: bool) -> Result<Self> {
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(text).context("the manifest is not valid YAML")?;
        let mut change = Self {
            delete,
            ..Self::default()
        };
        for (number, mut document) in documents.into_iter().filter(|d| !d.is_null()).enumerate() {
            if document["metadata"]["namespace"]
                .as_str()
                .is_none_or(str::is_empty)
            {
                document["metadata"]["namespace"] = Value::String(namespace.to_owned());
            }
            let kind = document["kind"].as_str().unwrap_or_default().to_owned();
            let describe = || format!("document {} ({kind})", number + 1);
            match (document["apiVersion"].as_str().unwrap_or_default(), kind.as_str()) {
                ("aadpodidentity.k8s.io/v1", "AzureIdentity") => {
                    change
                        .identities
                        .push(serde_json::from_value(document).with_context(describe)?);
                }
                ("aadpodidentity.k8s.io/v1", "AzureIdentityBinding") => {
                    change
                        .bindings
                        .push(serde_json::from_value(document).with_context(describe)?);
                }
                (api_version, _) => bail!(
                    "{}: only aadpodidentity.k8s.io/v1 AzureIdentity and AzureIdentityBinding can be simulated, \
                     not {api_version} {kind}",
                    describe()
                ),
            }
        }
        if change.identities.is_empty() && change.bindings.is_empty() {
            bail!("the manifest holds no AzureIdentity or AzureIdentityBinding");
        }
        Ok(change)
    }
}

/// One pod gaining or losing one identity.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodIdentity {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// `namespace/name` of the identity.
    pub identity: String,
    /// `namespace/name` of the binding that gives (or gave) it.
    pub binding: String,
}

/// A pod whose default identity (what a request naming none gets) changes.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DefaultChange {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// Default identity before.
    pub before: String,
    /// Default identity after.
    pub after: String,
}

/// What the change would do.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Simulation {
    /// Pods that would get an identity they do not have now.
    pub gained: Vec<PodIdentity>,
    /// Pods that would lose an identity they have now.
    pub lost: Vec<PodIdentity>,
    /// Pods that keep identities but would get another one by default.
    pub default_changed: Vec<DefaultChange>,
    /// Problems of the manifest's own objects (they would be refused or ignored).
    pub problems: Vec<String>,
}

/// Matches every pod before and after the change and compares.
pub fn simulate(state: &ClusterState, change: &Change, scope: Scope) -> Simulation {
    let pods: Vec<PodView> = state.pods.iter().map(PodView::from_pod).collect();
    let before = desired_assignments(
        &pods,
        World {
            bindings: &state.bindings,
            identities: &state.identities,
            exceptions: &state.exceptions,
            scope,
        },
    )
    .assignments;
    let identities = replace(&state.identities, &change.identities, change.delete);
    let bindings = replace(&state.bindings, &change.bindings, change.delete);
    let after = desired_assignments(
        &pods,
        World {
            bindings: &bindings,
            identities: &identities,
            exceptions: &state.exceptions,
            scope,
        },
    )
    .assignments;

    let key = |a: &DesiredAssignment| (a.pod.clone(), a.identity.clone());
    let before_set: BTreeMap<_, _> = before.iter().map(|a| (key(a), a)).collect();
    let after_set: BTreeMap<_, _> = after.iter().map(|a| (key(a), a)).collect();
    let report = |a: &DesiredAssignment| PodIdentity {
        pod: a.pod.to_string(),
        identity: a.identity.to_string(),
        binding: a.binding.to_string(),
    };
    let gained = after_set
        .iter()
        .filter(|(k, _)| !before_set.contains_key(*k))
        .map(|(_, a)| report(a))
        .collect();
    let lost = before_set
        .iter()
        .filter(|(k, _)| !after_set.contains_key(*k))
        .map(|(_, a)| report(a))
        .collect();

    let defaults = |list: &[DesiredAssignment]| -> BTreeMap<ObjectKey, ObjectKey> {
        list.iter()
            .filter(|a| a.rank == 0)
            .map(|a| (a.pod.clone(), a.identity.clone()))
            .collect()
    };
    let (old_defaults, new_defaults) = (defaults(&before), defaults(&after));
    let default_changed = old_defaults
        .iter()
        .filter_map(|(pod, old)| {
            let new = new_defaults.get(pod)?;
            (new != old).then(|| DefaultChange {
                pod: pod.to_string(),
                before: old.to_string(),
                after: new.to_string(),
            })
        })
        .collect();

    let mut problems = Vec::new();
    if !change.delete {
        for identity in &change.identities {
            for error in identity.spec.validate() {
                problems.push(format!(
                    "AzureIdentity {}/{}: {error}",
                    namespace(identity),
                    identity.name_any()
                ));
            }
        }
        for binding in &change.bindings {
            for error in binding.spec.validate() {
                problems.push(format!(
                    "AzureIdentityBinding {}/{}: {error}",
                    namespace(binding),
                    binding.name_any()
                ));
            }
        }
    }
    Simulation {
        gained,
        lost,
        default_changed,
        problems,
    }
}

/// The cluster's objects with the manifest's applied (same namespace and name replaced) or removed.
fn replace<K: kube::Resource + Clone>(current: &[K], changed: &[K], delete: bool) -> Vec<K> {
    let id = |o: &K| (o.meta().namespace.clone(), o.meta().name.clone());
    let mut result: Vec<K> = current
        .iter()
        .filter(|o| !changed.iter().any(|c| id(c) == id(o)))
        .cloned()
        .collect();
    if !delete {
        result.extend(changed.iter().cloned());
    }
    result
}

fn namespace<K: kube::Resource>(object: &K) -> String {
    object.meta().namespace.clone().unwrap_or_default()
}

impl Simulation {
    /// The result for people.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        for problem in &self.problems {
            let _ = writeln!(out, "problem: {problem}");
        }
        if self.gained.is_empty() && self.lost.is_empty() && self.default_changed.is_empty() {
            let _ = writeln!(out, "No pod would gain or lose an identity.");
        }
        for gain in &self.gained {
            let _ = writeln!(
                out,
                "+ {} would get {} (through {})",
                gain.pod, gain.identity, gain.binding
            );
        }
        for loss in &self.lost {
            let _ = writeln!(
                out,
                "- {} would lose {} (given by {})",
                loss.pod, loss.identity, loss.binding
            );
        }
        for change in &self.default_changed {
            let _ = writeln!(
                out,
                "~ {} would default to {} instead of {}",
                change.pod, change.after, change.before
            );
        }
        out
    }
}

#[cfg(test)]
mod tests;
