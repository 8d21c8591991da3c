//! Pre-warming, as pure planning: which identities should already be on which scale sets because a
//! workload's pods *will* need them there, so that a new pod's first token costs a token fetch rather
//! than a 40–60 s scale-set update (aad-pod-identity #770, #472, #738).
//!
//! - A workload (Deployment, StatefulSet, DaemonSet, Job, CronJob) is reduced to its pod template: the
//!   namespace, the labels, and where its pods may be scheduled ([`WorkloadTemplate::from_template`]).
//! - The template is matched to bindings with the same rules as a pod ([`pod_identity_api::matching`]);
//!   only bindings annotated [`PREWARM_ANNOTATION`]` = "true"` take part (opt-in per binding).
//! - Its pods can land on the scale sets of nodes whose agent-pool label ([`AGENT_POOL_LABELS`])
//!   satisfies the template's `nodeSelector` and required node affinity on that label; constraints on
//!   other labels are not evaluated, so a template may be warmed on a pool it never uses, never missed
//!   on one it does.
//! - [`Warmth::step`] adds hysteresis: an identity no workload needs any more stays warm for `linger`
//!   before it may go, so a workload deleted and re-created (a redeploy) does not cost two ARM writes.

pub mod workloads;

pub use workloads::Workloads;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, PodTemplateSpec};
use pod_identity_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, IdentityType, ObjectKey,
    matching::{DesiredAssignment, Index, World},
    naming::assigned_identity_name,
    pod::PodView,
};
use pod_identity_azure::{Machine, MachineKind, resource_id::fold};

use crate::{
    machine::Target,
    plan::MachineInput,
    record::{Recorded, Wanted},
    route::Routing,
};

/// Binding annotation that opts its identity into pre-warming (value `"true"`, any case).
pub const PREWARM_ANNOTATION: &str = "aadpodidentity.k8s.io/prewarm";

/// Node labels that name a node's agent pool: AKS's, then aks-engine's.
pub const AGENT_POOL_LABELS: [&str; 2] = ["kubernetes.azure.com/agentpool", "agentpool"];

/// The kinds of workload whose pod templates are warmed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadKind {
    /// `apps/v1` Deployment.
    Deployment,
    /// `apps/v1` StatefulSet.
    StatefulSet,
    /// `apps/v1` DaemonSet.
    DaemonSet,
    /// `batch/v1` Job.
    Job,
    /// `batch/v1` CronJob (its job template's pod template).
    CronJob,
}

/// One workload's pod template, as much as pre-warming reads of it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadTemplate {
    /// What kind of workload.
    pub kind: WorkloadKind,
    /// Its namespace and name.
    pub workload: ObjectKey,
    /// The template's labels (`aadpodidbinding` among them, for a bound workload).
    pub labels: BTreeMap<String, String>,
    /// Where its pods may go.
    pub placement: Placement,
}

/// Where a template's pods may be scheduled, as far as the agent pool decides it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    /// `spec.nodeSelector`.
    pub node_selector: BTreeMap<String, String>,
    /// `requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms`, each a list of
    /// `matchExpressions` (terms are alternatives, expressions within one all apply); `None` when the
    /// template requires no node affinity.
    pub required_terms: Option<Vec<Vec<NodeSelectorRequirement>>>,
}

impl WorkloadTemplate {
    /// The template of a workload `namespace/name` of `kind`.
    pub fn from_template(
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
        template: &PodTemplateSpec,
    ) -> Self {
        let labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let spec = template.spec.as_ref();
        let required_terms = spec
            .and_then(|s| s.affinity.as_ref())
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
            .map(|selector| {
                selector
                    .node_selector_terms
                    .iter()
                    .map(|term| term.match_expressions.clone().unwrap_or_default())
                    .collect()
            });
        Self {
            kind,
            workload: ObjectKey::new(namespace, name),
            labels,
            placement: Placement {
                node_selector: spec.and_then(|s| s.node_selector.clone()).unwrap_or_default(),
                required_terms,
            },
        }
    }
}

impl Placement {
    /// Whether a pod may land on a node of agent pool `pool` (`None`: the node has no pool label).
    pub fn allows(&self, pool: Option<&str>) -> bool {
        for label in AGENT_POOL_LABELS {
            if let Some(wanted) = self.node_selector.get(label)
                && pool != Some(wanted.as_str())
            {
                return false;
            }
        }
        match &self.required_terms {
            None => true,
            // A required affinity without terms matches no node.
            Some(terms) => terms.iter().any(|term| {
                term.iter()
                    .filter(|r| AGENT_POOL_LABELS.contains(&r.key.as_str()))
                    .all(|r| satisfies(r, pool))
            }),
        }
    }
}

fn satisfies(requirement: &NodeSelectorRequirement, pool: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let listed = pool.is_some_and(|pool| values.iter().any(|v| v == pool));
    match requirement.operator.as_str() {
        "In" => listed,
        "NotIn" => !listed,
        "Exists" => pool.is_some(),
        "DoesNotExist" => pool.is_none(),
        // Gt and Lt compare integers; a pool name is not one. Unknown operators match nothing, as
        // the scheduler treats them.
        _ => false,
    }
}

/// A node as pre-warming sees it: its scale set and its agent pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolNode {
    /// The VM or scale set of its provider ID.
    pub machine: Machine,
    /// Its agent-pool label, if any.
    pub pool: Option<String>,
}

impl PoolNode {
    /// The pool of a node from its labels (the first of [`AGENT_POOL_LABELS`] it carries).
    pub fn pool_of(labels: &BTreeMap<String, String>) -> Option<String> {
        AGENT_POOL_LABELS
            .iter()
            .find_map(|label| labels.get(*label).cloned())
    }
}

/// An identity wanted warm on a scale set, and the workloads that want it there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WarmNeed {
    /// The identity and the binding (the first in rank order) that warm it.
    pub entry: WarmEntry,
    /// The workloads whose pods may land there with it.
    pub workloads: BTreeSet<ObjectKey>,
}

/// An identity kept warm: its resource ID as its `AzureIdentity` spells it, the identity and the
/// binding its record embeds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WarmEntry {
    /// Resource ID.
    pub identity_id: String,
    /// The `AzureIdentity`.
    pub identity: ObjectKey,
    /// The `AzureIdentityBinding`.
    pub binding: ObjectKey,
}

/// Per scale set (by [`Machine`]), the identities (by case-folded resource ID) that workloads' pods
/// will need there. Only user-assigned identities (type 0) of bindings opted in; only scale sets (a
/// VM's pods land on nodes that exist, and get their identity the ordinary way).
pub fn needed(
    templates: &[WorkloadTemplate],
    world: World<'_>,
    nodes: &[PoolNode],
) -> BTreeMap<Machine, BTreeMap<String, WarmNeed>> {
    let opted_in: Vec<AzureIdentityBinding> = world
        .bindings
        .iter()
        .filter(|b| {
            b.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PREWARM_ANNOTATION))
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        })
        .cloned()
        .collect();
    let index = Index::new(World {
        bindings: &opted_in,
        ..world
    });
    let mut pools: BTreeMap<Machine, BTreeSet<Option<String>>> = BTreeMap::new();
    for node in nodes.iter().filter(|n| n.machine.kind == MachineKind::ScaleSet) {
        pools
            .entry(node.machine.clone())
            .or_default()
            .insert(node.pool.clone());
    }
    let mut needed: BTreeMap<Machine, BTreeMap<String, WarmNeed>> = BTreeMap::new();
    for template in templates {
        let view = PodView {
            key: template.workload.clone(),
            labels: template.labels.clone(),
            ..PodView::default()
        };
        if index.is_excepted(&view) {
            continue;
        }
        let decision = index.decide(&view);
        let identities: Vec<WarmEntry> = decision
            .candidates
            .iter()
            .filter(|c| c.outcome.is_ok())
            .filter_map(|c| {
                let identity = index.identity(&c.identity.namespace, &c.identity.name)?;
                let user_assigned =
                    identity.spec.identity_type().ok() == Some(IdentityType::UserAssignedManagedIdentity);
                let id = identity
                    .spec
                    .resource_id
                    .clone()
                    .filter(|id| !id.trim().is_empty());
                Some(WarmEntry {
                    identity_id: id.filter(|_| user_assigned)?,
                    identity: c.identity.clone(),
                    binding: c.binding.clone(),
                })
            })
            .collect();
        if identities.is_empty() {
            continue;
        }
        for (machine, machine_pools) in &pools {
            if !machine_pools
                .iter()
                .any(|pool| template.placement.allows(pool.as_deref()))
            {
                continue;
            }
            let on_machine = needed.entry(machine.clone()).or_default();
            for entry in &identities {
                let need = on_machine
                    .entry(fold(&entry.identity_id))
                    .or_insert_with(|| WarmNeed {
                        entry: entry.clone(),
                        workloads: BTreeSet::new(),
                    });
                need.workloads.insert(template.workload.clone());
            }
        }
    }
    needed
}

/// What is kept warm, and since when each identity has not been needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Warmth {
    /// Per scale set, the case-folded IDs of identities to keep on it.
    pub warm: BTreeMap<Machine, BTreeMap<String, WarmEntry>>,
    /// Identities kept warm though no workload needs them, and since when.
    pub unneeded_since: BTreeMap<(Machine, String), jiff::Timestamp>,
}

impl Warmth {
    /// The next state at `now`: everything `needed` is warm; what was warm and is no longer needed
    /// stays warm until it has been unneeded for `linger`, then leaves the warm set (the worker then
    /// removes it from the scale set if this controller added it and no pod there needs it).
    pub fn step(
        &self,
        needed: &BTreeMap<Machine, BTreeMap<String, WarmNeed>>,
        now: jiff::Timestamp,
        linger: Duration,
    ) -> Self {
        let mut next = Self::default();
        for (machine, identities) in needed {
            let warm = next.warm.entry(machine.clone()).or_default();
            for (key, need) in identities {
                warm.insert(key.clone(), need.entry.clone());
            }
        }
        for (machine, identities) in &self.warm {
            for (key, entry) in identities {
                if needed.get(machine).is_some_and(|n| n.contains_key(key)) {
                    continue;
                }
                let since = self
                    .unneeded_since
                    .get(&(machine.clone(), key.clone()))
                    .copied()
                    .unwrap_or(now);
                let lingered = now.duration_since(since).unsigned_abs();
                if lingered < linger {
                    next.warm
                        .entry(machine.clone())
                        .or_default()
                        .insert(key.clone(), entry.clone());
                    next.unneeded_since.insert((machine.clone(), key.clone()), since);
                }
            }
        }
        next.warm.retain(|_, identities| !identities.is_empty());
        next
    }

    /// When the next identity's lingering ends (a planning pass is due then); `None` when none lingers.
    pub fn next_expiry(&self, linger: Duration) -> Option<jiff::Timestamp> {
        let linger = jiff::SignedDuration::try_from(linger).ok()?;
        self.unneeded_since
            .values()
            .filter_map(|since| since.checked_add(linger).ok())
            .min()
    }
}

/// Label on the records of warm identities. Such a record belongs to no pod and no node (its
/// `nodename` is empty, so no node agent reads it); it says, like a pod's record, whether this
/// controller added the identity, so that a warm identity leaves only a scale set it was added to.
pub const PREWARM_LABEL: &str = "aadpodidentity.k8s.io/prewarmed";

/// Whether an assignment is a warm identity's rather than a pod's (no pod to send Events to).
pub fn is_warm(wanted: &Wanted) -> bool {
    wanted
        .object
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(PREWARM_LABEL))
        .is_some_and(|v| v == "true")
}

/// The record of a warm identity on a scale set: in the identity's namespace, named
/// `prewarm-<scale set>-<hash of its ARM ID>-<namespace>-<identity>` (shortened as assignment names are).
pub fn record_key(machine: &Machine, entry: &WarmEntry) -> ObjectKey {
    let name: String = machine
        .name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let hash = machine.key().bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let holder = format!("prewarm-{name}-{hash:08x}");
    ObjectKey::new(
        entry.identity.namespace.clone(),
        assigned_identity_name(&holder, &entry.identity.namespace, &entry.identity.name),
    )
}

/// Adds the warm identities of `warmth` to the machines' inputs of `routing`, as assignments the
/// workers write and apply like any pod's. An entry whose identity or binding is gone is left out
/// (no pod could use it); one whose record name is held by another identity's or a terminating record
/// reserves the identity instead, as a pod's does.
pub fn add_to(
    routing: &mut Routing,
    warmth: &Warmth,
    identities: &[AzureIdentity],
    bindings: &[AzureIdentityBinding],
) {
    for (machine, entries) in &warmth.warm {
        for entry in entries.values() {
            let identity = identities.iter().find(|i| {
                i.metadata.namespace.as_deref() == Some(entry.identity.namespace.as_str())
                    && i.metadata.name.as_deref() == Some(entry.identity.name.as_str())
            });
            let binding = bindings.iter().find(|b| {
                b.metadata.namespace.as_deref() == Some(entry.binding.namespace.as_str())
                    && b.metadata.name.as_deref() == Some(entry.binding.name.as_str())
            });
            let (Some(identity), Some(binding)) = (identity, binding) else {
                continue;
            };
            let key = record_key(machine, entry);
            let desired = DesiredAssignment {
                assignment: key.clone(),
                pod: ObjectKey::new(entry.identity.namespace.clone(), key.name.clone()),
                pod_uid: None,
                node: String::new(),
                identity: entry.identity.clone(),
                binding: entry.binding.clone(),
                rank: 0,
            };
            let mut wanted = Wanted::new(&desired, identity, binding, None);
            if wanted.identity_key().as_deref() != Some(fold(&entry.identity_id).as_str()) {
                continue;
            }
            wanted
                .object
                .metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert(PREWARM_LABEL.to_owned(), "true".to_owned());
            let target = Target::Azure(machine.clone());
            let input = routing
                .inputs
                .entry(target.clone())
                .or_insert_with(|| MachineInput::empty(target));
            let compatible = input
                .recorded
                .iter()
                .find(|r| r.key == key)
                .is_none_or(|recorded| {
                    !recorded.terminating && recorded.identity_key() == wanted.identity_key()
                });
            if compatible {
                input.wanted.push(wanted);
                input.wanted.sort_by(|a, b| a.key.cmp(&b.key));
            } else if let Some(id) = wanted.identity_key() {
                input.reserved.insert(id);
            }
        }
    }
}

/// The warm state a newly leading replica starts from: every warm record in the cluster, unneeded
/// since `now`, so that what the previous leader kept lingers its full time rather than going at once.
pub fn seed(assignments: &[Arc<AzureAssignedIdentity>], now: jiff::Timestamp) -> Warmth {
    let mut warmth = Warmth::default();
    for object in assignments {
        if object
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(PREWARM_LABEL))
            .map(String::as_str)
            != Some("true")
        {
            continue;
        }
        let recorded = Recorded::from_object(object.clone());
        let Some(machine) = recorded.machine.as_deref().and_then(Machine::from_arm_id) else {
            continue;
        };
        let spec = &object.spec;
        let meta_key = |meta: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>| {
            meta.map(|m| {
                ObjectKey::new(
                    m.namespace.clone().unwrap_or_default(),
                    m.name.clone().unwrap_or_default(),
                )
            })
        };
        let (Some(identity_id), Some(identity), Some(binding)) = (
            recorded.identity_id.clone(),
            meta_key(spec.azure_identity_ref.as_ref().map(|i| &i.metadata)),
            meta_key(spec.azure_binding_ref.as_ref().map(|b| &b.metadata)),
        ) else {
            continue;
        };
        let key = fold(&identity_id);
        warmth.unneeded_since.insert((machine.clone(), key.clone()), now);
        warmth.warm.entry(machine).or_default().insert(
            key,
            WarmEntry {
                identity_id,
                identity,
                binding,
            },
        );
    }
    warmth
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use pod_identity_api::{
        IdentityType, SecretReference,
        fixtures::{self, identity_of_type},
        matching::Scope,
    };
    use serde_json::json;

    use super::*;

    const SUB: &str = "22222222-2222-4222-8222-222222222222";

    fn uami(name: &str) -> String {
        format!(
            "/subscriptions/{SUB}/resourceGroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
    }

    const MANAGED: IdentityType = IdentityType::UserAssignedManagedIdentity;
    const SECRET: IdentityType = IdentityType::ServicePrincipalSecret;

    /// Identity `name` of `type_` for user-assigned identity `name` of [`SUB`], with a tenant and a
    /// secret reference whatever its type.
    fn identity(namespace: &str, name: &str, type_: IdentityType) -> AzureIdentity {
        let mut identity = identity_of_type(namespace, name, type_)
            .with_resource_id(&uami(name))
            .with_client_id("00000000-0000-4000-8000-000000000001")
            .with_tenant_id("11111111-1111-4111-8111-111111111111");
        identity.spec.client_password = Some(SecretReference {
            name: Some("s".into()),
            namespace: Some(namespace.into()),
        });
        identity
    }

    /// Binding `{identity}-binding` of `identity` to `selector`, with the pre-warm annotation when given.
    fn binding(
        namespace: &str,
        identity: &str,
        selector: &str,
        prewarm: Option<&str>,
    ) -> AzureIdentityBinding {
        let binding = fixtures::binding_of(namespace, identity, selector);
        match prewarm {
            Some(value) => binding.with_annotation(PREWARM_ANNOTATION, value),
            None => binding,
        }
    }

    fn template(
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
        spec: serde_json::Value,
    ) -> WorkloadTemplate {
        let template: PodTemplateSpec = serde_json::from_value(spec).unwrap();
        WorkloadTemplate::from_template(kind, namespace, name, &template)
    }

    fn bound(selector: &str, extra_spec: serde_json::Value) -> serde_json::Value {
        let mut spec = json!({"containers": [{"name": "app"}]});
        spec.as_object_mut()
            .unwrap()
            .extend(extra_spec.as_object().cloned().unwrap_or_default());
        json!({"metadata": {"labels": {"aadpodidbinding": selector}}, "spec": spec})
    }

    fn scale_set(name: &str) -> Machine {
        Machine::scale_set(SUB, "nodes", name)
    }

    fn nodes() -> Vec<PoolNode> {
        vec![
            PoolNode {
                machine: scale_set("aks-system"),
                pool: Some("system".into()),
            },
            PoolNode {
                machine: scale_set("aks-web"),
                pool: Some("web".into()),
            },
            PoolNode {
                machine: scale_set("aks-web"),
                pool: Some("web".into()),
            },
            PoolNode {
                machine: scale_set("aks-batch"),
                pool: Some("batch".into()),
            },
            PoolNode {
                machine: Machine::virtual_machine(SUB, "nodes", "vm-1"),
                pool: Some("web".into()),
            },
        ]
    }

    fn plan(
        templates: &[WorkloadTemplate],
        identities: &[AzureIdentity],
        bindings: &[AzureIdentityBinding],
    ) -> BTreeMap<String, BTreeSet<String>> {
        let needed = needed(
            templates,
            World {
                bindings,
                identities,
                exceptions: &[],
                scope: Scope::Namespaced,
            },
            &nodes(),
        );
        needed
            .into_iter()
            .map(|(machine, ids)| {
                (
                    machine.name,
                    ids.values()
                        .map(|n| n.entry.identity_id.rsplit('/').next().unwrap().to_owned())
                        .collect(),
                )
            })
            .collect()
    }

    fn names(pairs: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        pairs
            .iter()
            .map(|(m, ids)| ((*m).to_owned(), ids.iter().map(|s| (*s).to_owned()).collect()))
            .collect()
    }

    #[test]
    fn opted_in_bindings_warm_every_scale_set_a_template_may_land_on() {
        let identities = [
            identity("shop", "payments", MANAGED),
            identity("shop", "reports", MANAGED),
        ];
        let bindings = [
            binding("shop", "payments", "payments", Some("true")),
            binding("shop", "reports", "reports", None),
        ];
        let templates = [
            template(
                WorkloadKind::Deployment,
                "shop",
                "api",
                bound("payments", json!({})),
            ),
            template(
                WorkloadKind::CronJob,
                "shop",
                "nightly",
                bound("reports", json!({})),
            ),
        ];
        assert_eq!(
            plan(&templates, &identities, &bindings),
            names(&[
                ("aks-batch", &["payments"]),
                ("aks-system", &["payments"]),
                ("aks-web", &["payments"])
            ]),
            "anywhere without constraints; the binding without the annotation warms nothing; VMs never"
        );
    }

    #[test]
    fn node_selector_and_required_affinity_on_the_pool_label_narrow_the_scale_sets() {
        let identities = [identity("shop", "payments", MANAGED)];
        let bindings = [binding("shop", "payments", "payments", Some("TRUE"))];
        let cases = [
            (
                json!({"nodeSelector": {"kubernetes.azure.com/agentpool": "web"}}),
                vec!["aks-web"],
            ),
            (
                json!({"nodeSelector": {"agentpool": "batch", "kubernetes.io/os": "linux"}}),
                vec!["aks-batch"],
            ),
            (json!({"nodeSelector": {"agentpool": "gpu"}}), vec![]),
            (
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "agentpool", "operator": "In", "values": ["web", "batch"]}]}
                ]}}}}),
                vec!["aks-batch", "aks-web"],
            ),
            (
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.azure.com/agentpool", "operator": "NotIn", "values": ["system"]}]}
                ]}}}}),
                vec!["aks-batch", "aks-web"],
            ),
            (
                // Alternatives: either term suffices; constraints on other labels are not evaluated.
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "agentpool", "operator": "In", "values": ["system"]}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["1"]}, {"key": "agentpool", "operator": "In", "values": ["batch"]}]}
                ]}}}}),
                vec!["aks-batch", "aks-system"],
            ),
            (
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "agentpool", "operator": "DoesNotExist"}]}
                ]}}}}),
                vec![],
            ),
            (
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}}),
                vec![],
            ),
        ];
        for (spec, expected) in cases {
            let templates = [template(
                WorkloadKind::Deployment,
                "shop",
                "api",
                bound("payments", spec.clone()),
            )];
            let got: Vec<String> = plan(&templates, &identities, &bindings).into_keys().collect();
            assert_eq!(got, expected, "{spec}");
        }
    }

    #[test]
    fn matching_rules_are_those_of_pods() {
        let identities = [
            identity("shop", "payments", MANAGED),
            identity("other", "foreign", MANAGED),
            identity("shop", "sp", SECRET),
        ];
        let bindings = [
            binding("other", "foreign", "payments", Some("true")),
            binding("shop", "sp", "payments", Some("true")),
            binding("shop", "missing", "payments", Some("true")),
        ];
        let templates = [
            template(
                WorkloadKind::StatefulSet,
                "shop",
                "db",
                bound("payments", json!({})),
            ),
            template(
                WorkloadKind::Job,
                "shop",
                "unlabelled",
                json!({"spec": {"containers": []}}),
            ),
        ];
        assert!(
            plan(&templates, &identities, &bindings).is_empty(),
            "a binding of another namespace, a service principal and a missing identity warm nothing"
        );
    }

    #[test]
    fn warm_identities_become_records_that_a_new_leader_lets_linger() {
        let identities = [identity("shop", "payments", MANAGED)];
        let bindings = [binding("shop", "payments", "payments", Some("true"))];
        let templates = [template(
            WorkloadKind::DaemonSet,
            "shop",
            "agent",
            bound("payments", json!({"nodeSelector": {"agentpool": "web"}})),
        )];
        let world = World {
            bindings: &bindings,
            identities: &identities,
            exceptions: &[],
            scope: Scope::Namespaced,
        };
        let t0: jiff::Timestamp = "2026-11-30T12:00:00Z".parse().unwrap();
        let linger = Duration::from_secs(60);
        let warmth = Warmth::default().step(&needed(&templates, world, &nodes()), t0, linger);
        let mut routing = Routing::default();
        add_to(&mut routing, &warmth, &identities, &bindings);
        let target = Target::Azure(scale_set("aks-web"));
        let input = &routing.inputs[&target];
        assert_eq!(input.wanted.len(), 1);
        let wanted = &input.wanted[0];
        assert!(is_warm(wanted));
        assert_eq!(wanted.node, "", "no node agent reads it");
        assert_eq!(wanted.key.namespace, "shop");
        assert!(
            wanted.key.name.starts_with("prewarm-aks-web-"),
            "{}",
            wanted.key.name
        );
        assert_ne!(
            record_key(
                &scale_set("aks-web"),
                &warmth.warm[&scale_set("aks-web")]
                    .values()
                    .next()
                    .unwrap()
                    .clone()
            ),
            record_key(
                &Machine::scale_set(SUB, "other-group", "aks-web"),
                &warmth.warm[&scale_set("aks-web")]
                    .values()
                    .next()
                    .unwrap()
                    .clone()
            ),
            "scale sets of one name in two resource groups get records of their own"
        );

        // Without its binding nothing is warmed (no pod could use it).
        let mut bare = Routing::default();
        add_to(&mut bare, &warmth, &identities, &[]);
        assert!(bare.inputs.is_empty());

        // A replica that takes over finds the record and keeps the identity for a whole linger.
        let object = wanted.to_create(
            &pod_identity_api::AssignmentStatus::Assigned,
            crate::record::Origin::Added,
            Some(&scale_set("aks-web").arm_id()),
        );
        let later = t0 + jiff::SignedDuration::from_mins(5);
        let seeded = seed(&[Arc::new(object)], later);
        assert_eq!(seeded.warm, warmth.warm);
        let next = seeded.step(&BTreeMap::new(), later, linger);
        assert_eq!(next.warm, warmth.warm, "unneeded, but lingering");
        assert_eq!(
            next.next_expiry(linger),
            Some(later + jiff::SignedDuration::from_secs(60))
        );
        assert!(
            seeded
                .step(&needed(&templates, world, &nodes()), later, linger)
                .unneeded_since
                .is_empty()
        );
    }

    #[test]
    fn unneeded_identities_linger_then_go_and_come_back_at_once() {
        let linger = Duration::from_secs(600);
        let t0: jiff::Timestamp = "2026-11-30T12:00:00Z".parse().unwrap();
        let minutes = |m: i64| t0 + jiff::SignedDuration::from_mins(m);
        let need = |ids: &[&str]| {
            let mut needed = BTreeMap::new();
            let on: BTreeMap<String, WarmNeed> = ids
                .iter()
                .map(|id| {
                    (
                        fold(&uami(id)),
                        WarmNeed {
                            entry: WarmEntry {
                                identity_id: uami(id),
                                identity: ObjectKey::new("shop", *id),
                                binding: ObjectKey::new("shop", format!("{id}-binding")),
                            },
                            workloads: BTreeSet::new(),
                        },
                    )
                })
                .collect();
            if !on.is_empty() {
                needed.insert(scale_set("aks-web"), on);
            }
            needed
        };
        let warm_ids = |w: &Warmth| -> Vec<String> {
            w.warm
                .values()
                .flat_map(|ids| {
                    ids.values()
                        .map(|e| e.identity_id.rsplit('/').next().unwrap().to_owned())
                })
                .collect()
        };
        let state = Warmth::default().step(&need(&["a", "b"]), t0, linger);
        assert_eq!(warm_ids(&state), ["a", "b"]);
        assert_eq!(state.next_expiry(linger), None);
        // b's workload goes: b lingers.
        let state = state.step(&need(&["a"]), minutes(1), linger);
        assert_eq!(warm_ids(&state), ["a", "b"]);
        assert_eq!(state.next_expiry(linger), Some(minutes(11)));
        // Still lingering later, from when it was first unneeded.
        let state = state.step(&need(&["a"]), minutes(10), linger);
        assert_eq!(warm_ids(&state), ["a", "b"]);
        // Needed again before the end: the clock is reset.
        let again = state.step(&need(&["a", "b"]), minutes(10), linger);
        assert!(again.unneeded_since.is_empty());
        let again = again.step(&need(&["a"]), minutes(15), linger);
        assert_eq!(again.next_expiry(linger), Some(minutes(25)));
        // Unneeded for the whole linger: gone.
        let state = state.step(&need(&["a"]), minutes(11), linger);
        assert_eq!(warm_ids(&state), ["a"]);
        assert!(state.unneeded_since.is_empty());
        let state = state.step(&need(&[]), minutes(12), linger);
        assert_eq!(warm_ids(&state), ["a"], "a lingers in turn");
        let state = state.step(&need(&[]), minutes(30), linger);
        assert!(state.warm.is_empty() && state.unneeded_since.is_empty());
    }
}
