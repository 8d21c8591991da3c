//! From the whole cluster to one input per machine: which assignments should exist (the api crate's
//! matching), on which VM or scale set each lands (its node's provider ID), and which recorded objects
//! belong to which machine. Pure, so that the grouping rules are tested without a cluster.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use pod_identity_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException, ObjectKey,
    matching::{DesiredAssignment, Scope, World, desired_assignments},
    pod::PodView,
};

use pod_identity_azure::Machine;

use crate::{
    machine::Target,
    plan::MachineInput,
    record::{Recorded, Wanted},
};

/// The cluster as the reflectors see it.
pub struct Cluster<'a> {
    /// Pods with the binding label.
    pub pods: &'a [PodView],
    /// When each pod was scheduled.
    pub scheduled: &'a HashMap<ObjectKey, jiff::Timestamp>,
    /// All bindings.
    pub bindings: &'a [AzureIdentityBinding],
    /// All identities.
    pub identities: &'a [AzureIdentity],
    /// All exceptions.
    pub exceptions: &'a [AzurePodIdentityException],
    /// Every node: its machine, or `None` when its provider ID names no Azure VM or scale set.
    pub nodes: &'a HashMap<String, Option<Machine>>,
    /// All assignment objects.
    pub assignments: &'a [Arc<AzureAssignedIdentity>],
    /// Namespaced or cross-namespace matching.
    pub scope: Scope,
}

/// Why a pod's assignment cannot be placed on a machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unplaceable {
    /// The pod's node is not (or no longer) known.
    NodeMissing,
    /// The node's provider ID names no Azure VM or scale set.
    NotAnAzureNode(String),
}

/// The outcome of [`route`].
#[derive(Debug, Default)]
pub struct Routing {
    /// One input per machine that has anything wanted or recorded.
    pub inputs: BTreeMap<Target, MachineInput>,
    /// Assignments of user-assigned identities to pods whose node has no machine.
    pub unplaceable: Vec<(DesiredAssignment, Unplaceable)>,
    /// Assignments of different pods that came out with one name; the second is dropped.
    pub collisions: Vec<(DesiredAssignment, DesiredAssignment)>,
}

/// Groups the cluster's wanted and recorded assignments by machine.
pub fn route(cluster: &Cluster<'_>) -> Routing {
    let desired = desired_assignments(
        cluster.pods,
        World {
            bindings: cluster.bindings,
            identities: cluster.identities,
            exceptions: cluster.exceptions,
            scope: cluster.scope,
        },
    );
    let identities: HashMap<(&str, &str), &AzureIdentity> = cluster
        .identities
        .iter()
        .map(|i| {
            (
                (
                    i.metadata.namespace.as_deref().unwrap_or(""),
                    i.metadata.name.as_deref().unwrap_or(""),
                ),
                i,
            )
        })
        .collect();
    let bindings: HashMap<(&str, &str), &AzureIdentityBinding> = cluster
        .bindings
        .iter()
        .map(|b| {
            (
                (
                    b.metadata.namespace.as_deref().unwrap_or(""),
                    b.metadata.name.as_deref().unwrap_or(""),
                ),
                b,
            )
        })
        .collect();

    let mut routing = Routing {
        collisions: desired.collisions,
        ..Routing::default()
    };
    let mut recorded_by_name: HashMap<ObjectKey, (Target, Recorded)> = HashMap::new();
    let mut held = BTreeSet::new();
    for object in cluster.assignments {
        let recorded = Recorded::from_object(object.clone());
        let target = recorded_target(&recorded, cluster.nodes);
        recorded_by_name.insert(recorded.key.clone(), (target, recorded));
    }

    for assignment in desired.assignments {
        let (Some(identity), Some(binding)) = (
            identities.get(&key(&assignment.identity)),
            bindings.get(&key(&assignment.binding)),
        ) else {
            continue;
        };
        let scheduled = cluster.scheduled.get(&assignment.pod).copied();
        let wanted = Wanted::new(&assignment, identity, binding, scheduled);
        let target = match wanted.identity_id {
            None => Target::NoAzure,
            Some(_) => match cluster.nodes.get(&assignment.node) {
                // The node object is gone and the pod is not: its kubelet may still run it (a node
                // re-registering, pod garbage collection not done yet). Where a record put its identity,
                // the identity stays until the pod goes.
                None => match recorded_by_name.get(&wanted.key) {
                    Some((Target::Azure(machine), recorded))
                        if !recorded.terminating && recorded.identity_key() == wanted.identity_key() =>
                    {
                        Target::Azure(machine.clone())
                    }
                    Some(_) => {
                        routing.unplaceable.push((assignment, Unplaceable::NodeMissing));
                        continue;
                    }
                    // No record seen: there may be one the watch has not shown yet, on a machine only
                    // it names. Whichever worker wrote it keeps it.
                    None => {
                        held.insert(wanted.key.clone());
                        routing.unplaceable.push((assignment, Unplaceable::NodeMissing));
                        continue;
                    }
                },
                Some(None) => {
                    let node = assignment.node.clone();
                    routing
                        .unplaceable
                        .push((assignment, Unplaceable::NotAnAzureNode(node)));
                    continue;
                }
                Some(Some(machine)) => Target::Azure(machine.clone()),
            },
        };
        let compatible = match recorded_by_name.get(&wanted.key) {
            None => true,
            Some((recorded_target, recorded)) => {
                !recorded.terminating
                    && *recorded_target == target
                    && recorded.identity_key() == wanted.identity_key()
            }
        };
        let input = routing
            .inputs
            .entry(target.clone())
            .or_insert_with(|| MachineInput::empty(target));
        if compatible {
            input.wanted.push(wanted);
        } else if let Some(id) = wanted.identity_key() {
            // The name is held by a record of another identity or machine, or one being deleted: that
            // record goes first; meanwhile the identity must stay.
            input.reserved.insert(id);
        }
    }
    for (_, (target, recorded)) in recorded_by_name {
        routing
            .inputs
            .entry(target.clone())
            .or_insert_with(|| MachineInput::empty(target))
            .recorded
            .push(recorded);
    }
    for input in routing.inputs.values_mut() {
        input.recorded.sort_by(|a, b| a.key.cmp(&b.key));
        input.wanted.sort_by(|a, b| a.key.cmp(&b.key));
        input.held.clone_from(&held);
    }
    routing
}

fn key(k: &ObjectKey) -> (&str, &str) {
    (k.namespace.as_str(), k.name.as_str())
}

/// The machine a recorded assignment's identity is on: from our annotation, else (objects of the
/// original) from its node. Records of service principals, and records whose machine cannot be known,
/// belong to no machine and are dropped without any ARM call, as the original did.
fn recorded_target(recorded: &Recorded, nodes: &HashMap<String, Option<Machine>>) -> Target {
    if recorded.identity_id.is_none() {
        return Target::NoAzure;
    }
    if let Some(machine) = recorded.machine.as_deref().and_then(Machine::from_arm_id) {
        return Target::Azure(machine);
    }
    match nodes.get(&recorded.node) {
        Some(Some(machine)) => Target::Azure(machine.clone()),
        _ => Target::NoAzure,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use pod_identity_api::{AssignmentStatus, fixtures::pod_view};

    use pod_identity_azure::MachineKind;

    use super::*;
    use crate::record::{
        Origin,
        fixtures::{binding, identity, identity_id, recorded, wanted},
    };

    fn pool(name: &str) -> Machine {
        Machine {
            kind: MachineKind::ScaleSet,
            subscription: "s".into(),
            resource_group: "rg".into(),
            name: name.into(),
        }
    }

    fn pod(name: &str, node: &str, selector: &str) -> PodView {
        pod_view("ns", name)
            .with_uid(&format!("uid-{name}"))
            .with_selector(selector)
            .on_node(node)
    }

    struct World {
        pods: Vec<PodView>,
        identities: Vec<AzureIdentity>,
        bindings: Vec<AzureIdentityBinding>,
        nodes: HashMap<String, Option<Machine>>,
        assignments: Vec<Arc<AzureAssignedIdentity>>,
    }

    impl World {
        fn new() -> Self {
            Self {
                pods: vec![],
                identities: vec![identity("ns", "payments", 1), identity("ns", "orders", 2)],
                bindings: vec![
                    binding("ns", "payments-binding", "payments", "pay"),
                    binding("ns", "orders-binding", "orders", "ord"),
                ],
                nodes: HashMap::from([
                    ("a-0".into(), Some(pool("a"))),
                    ("a-1".into(), Some(pool("a"))),
                    ("b-0".into(), Some(pool("b"))),
                    ("bare".into(), None),
                ]),
                assignments: vec![],
            }
        }

        fn route(&self) -> Routing {
            let scheduled = HashMap::new();
            route(&Cluster {
                pods: &self.pods,
                scheduled: &scheduled,
                bindings: &self.bindings,
                identities: &self.identities,
                exceptions: &[],
                nodes: &self.nodes,
                assignments: &self.assignments,
                scope: Scope::Namespaced,
            })
        }
    }

    #[test]
    fn nodes_of_one_scale_set_share_one_input() {
        let mut world = World::new();
        world.pods = vec![
            pod("p1", "a-0", "pay"),
            pod("p2", "a-1", "pay"),
            pod("p3", "b-0", "ord"),
        ];
        let routing = world.route();
        assert_eq!(routing.inputs.len(), 2);
        let a = &routing.inputs[&Target::Azure(pool("a"))];
        assert_eq!(a.wanted.len(), 2);
        assert!(
            a.wanted
                .iter()
                .all(|w| w.identity_id.as_deref() == Some(identity_id("payments").as_str()))
        );
        let b = &routing.inputs[&Target::Azure(pool("b"))];
        assert_eq!(b.wanted[0].key.name, "p3-ns-orders");
    }

    #[test]
    fn pods_on_nodes_without_a_machine_are_reported() {
        let mut world = World::new();
        world.pods = vec![pod("p1", "bare", "pay"), pod("p2", "unknown", "pay")];
        let routing = world.route();
        assert!(routing.inputs.is_empty());
        let reasons: Vec<_> = routing.unplaceable.iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(
            reasons,
            vec![
                Unplaceable::NotAnAzureNode("bare".into()),
                Unplaceable::NodeMissing
            ]
        );
    }

    #[test]
    fn records_follow_their_annotation_then_their_node_else_belong_to_no_machine() {
        let mut world = World::new();
        let annotated = recorded(
            &wanted("x", "gone-node", "payments", 1),
            AssignmentStatus::Assigned,
            Origin::Added,
            Some(&pool("b").arm_id()),
        );
        let adopted = recorded(
            &wanted("y", "a-1", "payments", 1),
            AssignmentStatus::Assigned,
            Origin::Unknown,
            None,
        );
        let orphan = recorded(
            &wanted("z", "gone", "payments", 1),
            AssignmentStatus::Assigned,
            Origin::Unknown,
            None,
        );
        world.assignments = vec![annotated.object, adopted.object, orphan.object];
        let routing = world.route();
        let names = |t: Target| -> Vec<String> {
            routing.inputs[&t]
                .recorded
                .iter()
                .map(|r| r.key.pod_name())
                .collect()
        };
        assert_eq!(names(Target::Azure(pool("b"))), vec!["x"]);
        assert_eq!(names(Target::Azure(pool("a"))), vec!["y"]);
        assert_eq!(names(Target::NoAzure), vec!["z"]);
    }

    fn a_key(routing: &Routing) -> ObjectKey {
        routing.inputs[&Target::Azure(pool("a"))].recorded[0].key.clone()
    }

    #[test]
    fn a_pod_whose_node_object_went_keeps_its_recorded_identity_until_it_goes() {
        let mut world = World::new();
        let kept = recorded(
            &wanted("p1", "a-0", "payments", 1),
            AssignmentStatus::Assigned,
            Origin::Added,
            Some(&pool("a").arm_id()),
        );
        world.assignments = vec![kept.object];
        world.nodes.remove("a-0");
        world.pods = vec![pod("p1", "a-0", "pay")];
        let routing = world.route();
        let a = &routing.inputs[&Target::Azure(pool("a"))];
        assert_eq!(a.wanted.len(), 1, "still wanted where its record put it");
        assert_eq!(a.wanted[0].key, a.recorded[0].key);
        assert!(routing.unplaceable.is_empty());

        // A pod there without a record cannot be placed; but a record of it may exist that the watch
        // has not shown yet, so every machine holds whatever record of that name it knows.
        world.pods.push(pod("p2", "a-0", "pay"));
        let routing = world.route();
        assert_eq!(routing.unplaceable.len(), 1);
        assert_eq!(routing.unplaceable[0].0.pod.name, "p2");
        let held = BTreeSet::from([ObjectKey::new("ns", "p2-ns-payments")]);
        assert!(!routing.inputs.is_empty());
        assert!(routing.inputs.values().all(|input| input.held == held));
        // The one with a record is not held: its machine is known.
        assert!(!held.contains(&a_key(&routing)));

        // The pod gone: the record is stale on its machine, which removes the identity and releases it.
        world.pods.clear();
        let routing = world.route();
        let a = &routing.inputs[&Target::Azure(pool("a"))];
        assert!(a.wanted.is_empty());
        assert_eq!(a.recorded.len(), 1);
    }

    #[test]
    fn a_name_held_by_a_stale_record_waits_and_reserves_the_identity() {
        let mut world = World::new();
        // p1 was on scale set b; a new p1 of the same name is on a.
        let old = recorded(
            &wanted("p1", "b-0", "payments", 1),
            AssignmentStatus::Assigned,
            Origin::Added,
            Some(&pool("b").arm_id()),
        );
        world.assignments = vec![old.object];
        world.pods = vec![pod("p1", "a-0", "pay")];
        let routing = world.route();
        let a = &routing.inputs[&Target::Azure(pool("a"))];
        assert!(a.wanted.is_empty());
        assert_eq!(
            a.reserved,
            BTreeSet::from([pod_identity_azure::resource_id::fold(&identity_id("payments"))])
        );
        let b = &routing.inputs[&Target::Azure(pool("b"))];
        assert_eq!(b.recorded.len(), 1);
        assert!(b.wanted.is_empty(), "the old record is stale on b");
    }

    trait PodName {
        fn pod_name(&self) -> String;
    }

    impl PodName for ObjectKey {
        fn pod_name(&self) -> String {
            self.name.split('-').next().unwrap_or_default().to_owned()
        }
    }
}
