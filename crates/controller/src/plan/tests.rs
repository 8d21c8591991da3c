use std::sync::Arc;

use pod_identity_api::AzureAssignedIdentity;
use pod_identity_azure::{IdentityDelta, Machine, MachineKind};

use super::*;
use crate::{
    arm::ObservedIdentity,
    record::fixtures::{client_id, identity_id, recorded, wanted},
};

fn machine() -> Machine {
    Machine {
        kind: MachineKind::ScaleSet,
        subscription: "s".into(),
        resource_group: "rg".into(),
        name: "pool".into(),
    }
}

fn input(wanted: Vec<Wanted>, recorded: Vec<Recorded>) -> MachineInput {
    MachineInput {
        target: Target::Azure(machine()),
        wanted,
        recorded,
        reserved: BTreeSet::new(),
        held: BTreeSet::new(),
    }
}

fn observed(names: &[&str]) -> Observed {
    Observed {
        identities: names
            .iter()
            .map(|n| {
                (
                    fold(&identity_id(n)),
                    ObservedIdentity {
                        id: identity_id(n),
                        client_id: None,
                    },
                )
            })
            .collect(),
        system_assigned: true,
        provisioning_state: Some("Succeeded".into()),
        etag: Some("\"1\"".into()),
        absent: None,
    }
}

fn no_quarantine(_: &str) -> Option<String> {
    None
}

fn run(input: &MachineInput, observed: Option<&Observed>) -> Plan {
    run_with(input, observed, &Protection::default(), &no_quarantine)
}

fn run_with(
    input: &MachineInput,
    observed: Option<&Observed>,
    protection: &Protection,
    quarantine: &dyn Fn(&str) -> Option<String>,
) -> Plan {
    plan(
        input,
        &Context {
            observed,
            quarantine,
            protection,
            in_flight: None,
        },
    )
}

/// RFC 7386 merge patch, enough to replay what the API server does with our patches.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Replays a plan's writes on the input, as the API server would.
fn apply_writes(input: &mut MachineInput, plan: &Plan) {
    for write in &plan.writes {
        match write {
            Write::Create { object, .. } => {
                let mut object = (**object).clone();
                object.metadata.resource_version = Some("1".into());
                input.record(Recorded::from_object(Arc::new(object)));
            }
            Write::Patch { key, patch, .. } => {
                let current = input.recorded.iter().find(|r| &r.key == key).unwrap();
                assert_eq!(
                    patch["metadata"]["resourceVersion"],
                    json!(current.resource_version),
                    "patches are conditional"
                );
                let mut value = serde_json::to_value(&*current.object).unwrap();
                merge(&mut value, patch);
                let version: u64 = current.resource_version.as_deref().unwrap().parse().unwrap();
                value["metadata"]["resourceVersion"] = json!((version + 1).to_string());
                let object: AzureAssignedIdentity = serde_json::from_value(value).unwrap();
                input.record(Recorded::from_object(Arc::new(object)));
            }
            Write::Release { key, .. } => input.forget(key),
        }
    }
}

/// Applies a delta to the machine as ARM would.
fn apply_delta(observed: &mut Observed, delta: &IdentityDelta) {
    assert_eq!(delta.users_before, observed.identities.len());
    for id in &delta.add {
        observed.identities.insert(
            fold(id),
            ObservedIdentity {
                id: id.clone(),
                client_id: None,
            },
        );
    }
    for id in &delta.remove {
        observed.identities.remove(&fold(id));
    }
    assert_eq!(delta.keep_system_assigned, observed.system_assigned);
}

/// Runs a round to its end; returns the deltas sent.
fn round(input: &mut MachineInput, observed: &mut Observed, protection: &Protection) -> Vec<IdentityDelta> {
    let mut deltas = Vec::new();
    for _ in 0..5 {
        let plan = run_with(input, Some(observed), protection, &no_quarantine);
        apply_writes(input, &plan);
        if plan.delta.is_empty() {
            let again = run_with(input, Some(observed), protection, &no_quarantine);
            assert!(again.is_idle(), "a finished round plans nothing more: {again:?}");
            return deltas;
        }
        apply_delta(observed, &plan.delta);
        deltas.push(plan.delta);
    }
    panic!("round did not settle");
}

fn status_of(input: &MachineInput, name: &str) -> AssignmentStatus {
    input
        .recorded
        .iter()
        .find(|r| r.key.name == name)
        .unwrap()
        .status
        .clone()
}

#[test]
fn a_new_pod_gets_its_identity_added_and_its_record_assigned() {
    let w = wanted("web-0", "node-1", "payments", 1);
    let mut input = input(vec![w], vec![]);
    let mut machine_state = observed(&[]);

    let first = run(&input, Some(&machine_state));
    assert_eq!(first.delta.add, vec![identity_id("payments")]);
    assert!(first.delta.remove.is_empty());
    assert!(first.delta.keep_system_assigned, "SystemAssigned is kept");
    let [Write::Create { object, transition }] = first.writes.as_slice() else {
        panic!("{first:?}")
    };
    assert_eq!(object.assignment_status(), AssignmentStatus::Created);
    assert_eq!(
        object.metadata.annotations.as_ref().unwrap()[ORIGIN_ANNOTATION],
        "added"
    );
    assert_eq!(transition, &None);

    let deltas = round(&mut input, &mut machine_state, &Protection::default());
    assert_eq!(deltas.len(), 1);
    assert_eq!(status_of(&input, "web-0-ns-payments"), AssignmentStatus::Assigned);
    assert_eq!(input.recorded[0].origin, Origin::Added);
}

#[test]
fn an_identity_already_on_the_machine_is_recorded_preexisting_and_never_removed() {
    let w = wanted("web-0", "node-1", "shared", 1);
    let mut input = input(vec![w], vec![]);
    let mut machine_state = observed(&["shared"]);
    assert!(round(&mut input, &mut machine_state, &Protection::default()).is_empty());
    assert_eq!(status_of(&input, "web-0-ns-shared"), AssignmentStatus::Assigned);
    assert_eq!(input.recorded[0].origin, Origin::Preexisting);

    // The pod goes: the record goes, the identity stays.
    input.wanted.clear();
    assert!(round(&mut input, &mut machine_state, &Protection::default()).is_empty());
    assert!(input.recorded.is_empty());
    assert!(machine_state.has(&identity_id("shared")));
}

#[test]
fn the_last_pod_gone_removes_what_we_added_then_releases_the_record() {
    let w = wanted("web-0", "node-1", "payments", 1);
    let mut input = input(vec![w], vec![]);
    let mut machine_state = observed(&["cluster"]);
    round(&mut input, &mut machine_state, &Protection::default());

    input.wanted.clear();
    let plan = run(&input, Some(&machine_state));
    assert_eq!(plan.delta.remove, vec![identity_id("payments")]);
    assert!(
        plan.writes.is_empty(),
        "the record waits for the removal: {plan:?}"
    );
    let deltas = round(&mut input, &mut machine_state, &Protection::default());
    assert_eq!(deltas.len(), 1);
    assert!(input.recorded.is_empty());
    assert!(!machine_state.has(&identity_id("payments")));
    assert!(machine_state.has(&identity_id("cluster")));
}

#[test]
fn a_held_record_keeps_its_identity_though_nothing_wants_it_here() {
    // The worker's own record of a pod whose node is gone, which the planner has not seen yet: the
    // planner could not place the pod, and holds the name instead.
    let w = wanted("web-0", "node-1", "payments", 1);
    let mut input = input(vec![w.clone()], vec![]);
    let mut machine_state = observed(&["cluster"]);
    round(&mut input, &mut machine_state, &Protection::default());
    input.wanted.clear();
    input.held = BTreeSet::from([w.key.clone()]);
    for observed in [Some(&machine_state), None] {
        let plan = run(&input, observed);
        assert!(plan.delta.remove.is_empty(), "{plan:?}");
        assert!(plan.writes.is_empty(), "{plan:?}");
    }
    assert_eq!(
        round(&mut input, &mut machine_state, &Protection::default()),
        vec![]
    );
    assert!(machine_state.has(&identity_id("payments")));
    assert_eq!(input.recorded.len(), 1);

    // Once the planner sees the record it routes the pod here again; if the pod goes, nothing is held
    // and the identity goes as usual.
    input.held.clear();
    let deltas = round(&mut input, &mut machine_state, &Protection::default());
    assert_eq!(deltas.len(), 1);
    assert!(!machine_state.has(&identity_id("payments")));
}

#[test]
fn an_identity_still_needed_by_another_pod_of_the_scale_set_stays() {
    let a = wanted("web-0", "node-1", "payments", 1);
    let b = wanted("web-1", "node-2", "payments", 1);
    let mut input = input(vec![a, b.clone()], vec![]);
    let mut machine_state = observed(&[]);
    let deltas = round(&mut input, &mut machine_state, &Protection::default());
    assert_eq!(deltas.len(), 1, "one request for both pods");
    assert_eq!(deltas[0].add.len(), 1);

    input.wanted = vec![b];
    assert!(round(&mut input, &mut machine_state, &Protection::default()).is_empty());
    assert_eq!(input.recorded.len(), 1);
    assert!(machine_state.has(&identity_id("payments")));
    assert_eq!(
        input.recorded[0].origin,
        Origin::Added,
        "ownership stays with the remaining record"
    );
}

#[test]
fn ownership_passes_to_remaining_records_before_the_adding_one_goes() {
    // web-1's record was written when the identity was already there (because of web-0).
    let a = wanted("web-0", "node-1", "payments", 1);
    let b = wanted("web-1", "node-2", "payments", 1);
    let ra = recorded(
        &a,
        AssignmentStatus::Assigned,
        Origin::Added,
        Some(&machine().arm_id()),
    );
    let rb = recorded(
        &b,
        AssignmentStatus::Assigned,
        Origin::Preexisting,
        Some(&machine().arm_id()),
    );
    let input = input(vec![b], vec![ra, rb]);
    let plan = run(&input, Some(&observed(&["payments"])));
    assert!(plan.delta.is_empty());
    match plan.writes.as_slice() {
        [
            Write::Patch { key, patch, .. },
            Write::Release { key: released, .. },
        ] => {
            assert_eq!(key.name, "web-1-ns-payments");
            assert_eq!(patch["metadata"]["annotations"][ORIGIN_ANNOTATION], "added");
            assert_eq!(released.name, "web-0-ns-payments");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn immutable_and_cluster_identities_are_never_removed() {
    for protection in [
        Protection::new([client_id(1)]),
        Protection::new([identity_id("payments").to_uppercase()]),
    ] {
        let w = wanted("web-0", "node-1", "payments", 1);
        let mut input = input(vec![w], vec![]);
        let mut machine_state = observed(&[]);
        round(&mut input, &mut machine_state, &protection);
        assert_eq!(input.recorded[0].origin, Origin::Added);
        input.wanted.clear();
        assert!(round(&mut input, &mut machine_state, &protection).is_empty());
        assert!(input.recorded.is_empty());
        assert!(machine_state.has(&identity_id("payments")));
    }
}

#[test]
fn a_quarantined_identity_does_not_block_the_others() {
    let good = wanted("web-0", "node-1", "good", 1);
    let bad = wanted("web-1", "node-1", "gone", 2);
    let input = input(vec![good, bad], vec![]);
    let bad_key = fold(&identity_id("gone"));
    let quarantine = move |key: &str| (key == bad_key).then(|| "identity not found".to_owned());
    let plan = run_with(&input, Some(&observed(&[])), &Protection::default(), &quarantine);
    assert_eq!(plan.delta.add, vec![identity_id("good")]);
    assert_eq!(
        plan.quarantined,
        vec![(identity_id("gone"), "identity not found".to_owned())]
    );
    let bad_create = plan
        .writes
        .iter()
        .find_map(|w| match w {
            Write::Create { object, transition } if object.spec.pod == "web-1" => Some((object, transition)),
            _ => None,
        })
        .unwrap();
    assert_eq!(bad_create.0.assignment_status(), AssignmentStatus::Created);
    assert_eq!(
        bad_create.0.metadata.annotations.as_ref().unwrap()[ERROR_ANNOTATION],
        "identity not found"
    );
    assert!(matches!(bad_create.1, Some(Transition::Quarantined { .. })));
}

#[test]
fn a_machine_being_deleted_is_left_alone() {
    let w = wanted("web-0", "node-1", "payments", 1);
    let r = recorded(
        &w,
        AssignmentStatus::Assigned,
        Origin::Added,
        Some(&machine().arm_id()),
    );
    let input = input(vec![], vec![r]);
    let mut state = observed(&["payments"]);
    state.provisioning_state = Some("Deleting".into());
    let plan = run(&input, Some(&state));
    assert!(plan.deferred);
    assert!(plan.writes.is_empty() && plan.delta.is_empty());
}

#[test]
fn a_machine_that_does_not_exist_holds_nothing_and_its_records_say_so() {
    let arm = machine().arm_id();
    let gone = wanted("web-0", "node-1", "payments", 1);
    let staying = wanted("api-0", "node-1", "orders", 2);
    let fresh = wanted("job-0", "node-1", "reports", 3);
    let mut input = input(
        vec![staying.clone(), fresh.clone()],
        vec![
            recorded(&gone, AssignmentStatus::Assigned, Origin::Added, Some(&arm)),
            recorded(&staying, AssignmentStatus::Assigned, Origin::Added, Some(&arm)),
        ],
    );
    let mut absent =
        Observed::absent("The Resource 'Microsoft.Compute/virtualMachineScaleSets/pool' was not found.");
    let plan = run(&input, Some(&absent));
    assert!(
        plan.delta.is_empty(),
        "nothing to add to or remove from a machine that is not there"
    );
    assert!(plan.quarantined.is_empty(), "no identity is to blame");
    assert!(
        plan.writes
            .iter()
            .any(|w| matches!(w, Write::Release { key, .. } if key.name == "web-0-ns-payments")),
        "a record no pod needs goes without any ARM call: {:?}",
        plan.writes
    );
    apply_writes(&mut input, &plan);
    for name in ["api-0-ns-orders", "job-0-ns-reports"] {
        assert_eq!(status_of(&input, name), AssignmentStatus::Created, "{name}");
        let record = input.recorded.iter().find(|r| r.key.name == name).unwrap();
        assert!(
            record
                .error
                .as_deref()
                .is_some_and(|e| e.contains("does not exist")),
            "{name}: {:?}",
            record.error
        );
    }
    assert!(
        plan.writes.iter().any(|w| matches!(
            w,
            Write::Patch {
                transition: Some(Transition::Quarantined { .. }),
                ..
            }
        )),
        "the pod is told"
    );
    assert!(run(&input, Some(&absent)).is_idle(), "settled");

    // The machine is back under the same name, empty: its identities are added again.
    absent = observed(&[]);
    let deltas = round(&mut input, &mut absent, &Protection::default());
    assert_eq!(deltas.len(), 1);
    assert_eq!(deltas[0].add.len(), 2);
    for name in ["api-0-ns-orders", "job-0-ns-reports"] {
        assert_eq!(status_of(&input, name), AssignmentStatus::Assigned, "{name}");
        let record = input.recorded.iter().find(|r| r.key.name == name).unwrap();
        assert_eq!(record.error, None);
    }
}

#[test]
fn without_reading_the_machine_only_harmless_releases_happen() {
    let mine = wanted("web-0", "node-1", "mine", 1);
    let theirs = wanted("web-1", "node-1", "theirs", 2);
    let fresh = wanted("web-2", "node-1", "fresh", 3);
    let steady = wanted("web-3", "node-1", "steady", 4);
    let id = machine().arm_id();
    let input = input(
        vec![fresh, steady.clone()],
        vec![
            recorded(&mine, AssignmentStatus::Assigned, Origin::Added, Some(&id)),
            recorded(
                &theirs,
                AssignmentStatus::Assigned,
                Origin::Preexisting,
                Some(&id),
            ),
            recorded(&steady, AssignmentStatus::Assigned, Origin::Added, Some(&id)),
        ],
    );
    let plan = run(&input, None);
    assert!(plan.needs_observation);
    assert!(plan.delta.is_empty());
    let released: Vec<&str> = plan
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::Release { key, .. } => Some(key.name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(released, vec!["web-1-ns-theirs"]);
    assert_eq!(plan.writes.len(), 1);

    let steady_only = super::tests::input(
        vec![steady.clone()],
        vec![recorded(
            &steady,
            AssignmentStatus::Assigned,
            Origin::Added,
            Some(&id),
        )],
    );
    assert!(
        run(&steady_only, None).is_idle(),
        "steady state needs no ARM read"
    );
}

#[test]
fn a_removed_identity_is_added_back_and_becomes_ours() {
    let w = wanted("web-0", "node-1", "shared", 1);
    let r = recorded(
        &w,
        AssignmentStatus::Assigned,
        Origin::Preexisting,
        Some(&machine().arm_id()),
    );
    let mut input = input(vec![w], vec![r]);
    let mut machine_state = observed(&[]);
    let plan = run(&input, Some(&machine_state));
    assert_eq!(plan.delta.add, vec![identity_id("shared")]);
    let [Write::Patch { patch, .. }] = plan.writes.as_slice() else {
        panic!("{plan:?}")
    };
    assert_eq!(patch["metadata"]["annotations"][ORIGIN_ANNOTATION], "added");
    round(&mut input, &mut machine_state, &Protection::default());
    assert!(machine_state.has(&identity_id("shared")));
    assert_eq!(input.recorded[0].origin, Origin::Added);
}

#[test]
fn identities_needed_by_pods_waiting_for_their_record_are_kept() {
    let w = wanted("web-0", "node-1", "payments", 1);
    let r = recorded(
        &w,
        AssignmentStatus::Assigned,
        Origin::Added,
        Some(&machine().arm_id()),
    );
    let mut input = input(vec![], vec![r]);
    input.reserved.insert(fold(&identity_id("payments")));
    let plan = run(&input, Some(&observed(&["payments"])));
    assert!(plan.delta.is_empty());
    assert!(matches!(plan.writes.as_slice(), [Write::Release { .. }]));
}

#[test]
fn records_of_the_original_are_adopted_without_duplicates() {
    let w = wanted("web-0", "node-1", "payments", 1);
    let mut object = w.object.clone();
    object.metadata.finalizers = None;
    object.metadata.labels = None;
    object.metadata.resource_version = Some("3".into());
    object.status = Some(pod_identity_api::AzureAssignedIdentityStatus {
        status: Some("Assigned".into()),
        available_replicas: Some(1),
    });
    let adopted = Recorded::from_object(Arc::new(object));
    let mut input = input(vec![w], vec![adopted]);
    let mut machine_state = observed(&["payments"]);
    let plan = run(&input, Some(&machine_state));
    assert!(plan.delta.is_empty());
    let [Write::Patch { patch, .. }] = plan.writes.as_slice() else {
        panic!("{plan:?}")
    };
    assert_eq!(
        patch["metadata"]["finalizers"],
        json!([pod_identity_api::ASSIGNED_IDENTITY_FINALIZER])
    );
    assert_eq!(patch["metadata"]["labels"]["nodename"], "node-1");
    assert_eq!(
        patch["metadata"]["annotations"][MACHINE_ANNOTATION],
        machine().arm_id()
    );
    assert!(patch["metadata"]["annotations"].get(ORIGIN_ANNOTATION).is_none());
    round(&mut input, &mut machine_state, &Protection::default());
    assert_eq!(input.recorded.len(), 1);
    assert_eq!(input.recorded[0].origin, Origin::Unknown);

    // Its identity is not known to be ours: it stays when the pod goes.
    input.wanted.clear();
    assert!(round(&mut input, &mut machine_state, &Protection::default()).is_empty());
    assert!(machine_state.has(&identity_id("payments")));
}

#[test]
fn service_principals_and_orphans_never_touch_arm() {
    let mut sp_identity = crate::record::fixtures::identity("ns", "sp", 5);
    sp_identity.spec.type_ = Some(1);
    let desired = pod_identity_api::matching::DesiredAssignment {
        assignment: ObjectKey::new("ns", "p-ns-sp"),
        pod: ObjectKey::new("ns", "p"),
        pod_uid: None,
        node: "n".into(),
        identity: ObjectKey::new("ns", "sp"),
        binding: ObjectKey::new("ns", "b"),
        rank: 0,
    };
    let sp = Wanted::new(
        &desired,
        &sp_identity,
        &crate::record::fixtures::binding("ns", "b", "sp", "s"),
        None,
    );
    let orphan = recorded(
        &wanted("gone", "deleted-node", "payments", 1),
        AssignmentStatus::Assigned,
        Origin::Added,
        None,
    );
    let input = MachineInput {
        target: Target::NoAzure,
        wanted: vec![sp],
        recorded: vec![orphan],
        reserved: BTreeSet::new(),
        held: BTreeSet::new(),
    };
    let plan = run(&input, None);
    assert!(plan.delta.is_empty() && !plan.needs_observation);
    match plan.writes.as_slice() {
        [Write::Create { object, transition }, Write::Release { key, .. }] => {
            assert_eq!(object.assignment_status(), AssignmentStatus::Assigned);
            assert!(matches!(transition, Some(Transition::Assigned(_))));
            assert_eq!(key.name, "gone-ns-payments");
        }
        other => panic!("{other:?}"),
    }
}

/// Random sequences of pods coming and going, identities added and removed by hand: an identity that
/// was on the machine before we needed it, or that is protected, is never removed by a plan.
#[test]
fn no_sequence_removes_an_identity_we_did_not_add() {
    let names = ["a", "b", "c", "d"];
    let protection = Protection::new([client_id(3)]); // "c"
    for seed in 0..200 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut machine_state = observed(&[]);
        let mut input = input(vec![], vec![]);
        // Identities put on the machine by hand and never since added by us.
        let mut foreign: BTreeSet<String> = BTreeSet::new();
        for _ in 0..30 {
            match rng.u8(0..4) {
                0 => {
                    let n = rng.usize(0..names.len());
                    let pod = format!("p{}", rng.u8(0..6));
                    if !input
                        .wanted
                        .iter()
                        .any(|w| w.pod.name == pod && w.identity.name == names[n])
                    {
                        input.wanted.push(wanted(&pod, "node", names[n], (n + 1) as u8));
                    }
                }
                1 if !input.wanted.is_empty() => {
                    let i = rng.usize(0..input.wanted.len());
                    input.wanted.remove(i);
                }
                2 => {
                    let n = names[rng.usize(0..names.len())];
                    let id = identity_id(n);
                    if !machine_state.has(&id) {
                        foreign.insert(fold(&id));
                        machine_state
                            .identities
                            .insert(fold(&id), ObservedIdentity { id, client_id: None });
                    }
                }
                _ => {
                    let n = names[rng.usize(0..names.len())];
                    machine_state.identities.remove(&fold(&identity_id(n)));
                    foreign.remove(&fold(&identity_id(n)));
                }
            }
            // The machine read while another writer's update runs, or after it failed: nothing becomes
            // Assigned, nothing of someone else's is removed, and while it runs nothing is sent.
            if rng.u8(0..3) == 0 {
                let state = if rng.bool() { "Updating" } else { "Failed" };
                machine_state.provisioning_state = Some(state.into());
                let plan = run_with(&input, Some(&machine_state), &protection, &no_quarantine);
                assert!(!assigns(&plan), "seed {seed}: {state}: {plan:?}");
                assert!(
                    state != "Updating" || plan.delta.is_empty(),
                    "seed {seed}: {plan:?}"
                );
                for id in &plan.delta.remove {
                    assert!(!foreign.contains(&fold(id)), "seed {seed}: removed foreign {id}");
                }
                apply_writes(&mut input, &plan);
                machine_state.provisioning_state = Some("Succeeded".into());
            }
            for delta in round(&mut input, &mut machine_state, &protection) {
                for id in &delta.add {
                    foreign.remove(&fold(id));
                }
                for id in &delta.remove {
                    assert!(!foreign.contains(&fold(id)), "seed {seed}: removed foreign {id}");
                    assert_ne!(
                        fold(id),
                        fold(&identity_id("c")),
                        "seed {seed}: removed protected"
                    );
                }
            }
            // Every pod's identity is on the machine, with an Assigned record.
            for w in &input.wanted {
                assert!(
                    machine_state.has(w.identity_id.as_deref().unwrap()),
                    "seed {seed}"
                );
                assert_eq!(
                    status_of(&input, &w.key.name),
                    AssignmentStatus::Assigned,
                    "seed {seed}"
                );
            }
            assert_eq!(
                input.recorded.len(),
                input.wanted.len(),
                "seed {seed}: no stale records"
            );
        }
    }
}

#[test]
fn identities_in_a_change_in_flight_are_left_alone_and_the_others_planned() {
    // Known before the change: "payments" being added, "old" being removed (its pod gone).
    let gone = wanted("gone-0", "node-1", "old", 3);
    let input = input(
        vec![
            wanted("web-0", "node-1", "payments", 1),
            wanted("api-0", "node-1", "orders", 2),
            wanted("db-0", "node-1", "shared", 4),
        ],
        vec![recorded(&gone, AssignmentStatus::Assigned, Origin::Added, None)],
    );
    let before = observed(&["old", "shared"]);
    let in_flight = IdentityDelta {
        add: vec![identity_id("payments")],
        remove: vec![identity_id("old").to_uppercase()],
        ..IdentityDelta::default()
    };
    let plan = plan(
        &input,
        &Context {
            observed: Some(&before),
            quarantine: &no_quarantine,
            protection: &Protection::default(),
            in_flight: Some(&in_flight),
        },
    );
    assert_eq!(plan.delta.add, vec![identity_id("orders")], "nothing sent twice");
    assert!(plan.delta.remove.is_empty());
    let touched: Vec<String> = plan
        .writes
        .iter()
        .map(|w| match w {
            Write::Create { object, .. } => object.metadata.name.clone().unwrap(),
            Write::Patch { key, .. } | Write::Release { key, .. } => key.name.clone(),
        })
        .collect();
    assert_eq!(
        touched,
        vec!["api-0-ns-orders", "db-0-ns-shared"],
        "no record of an identity in flight: neither Assigned before ARM answers, nor released"
    );
}

fn in_state(names: &[&str], state: &str) -> Observed {
    Observed {
        provisioning_state: Some(state.into()),
        ..observed(names)
    }
}

fn assigns(plan: &Plan) -> bool {
    plan.writes.iter().any(|w| match w {
        Write::Create { object, .. } => object.assignment_status() == AssignmentStatus::Assigned,
        Write::Patch { transition, .. } => matches!(transition, Some(Transition::Assigned(_))),
        Write::Release { .. } => false,
    })
}

fn releases(plan: &Plan) -> Vec<String> {
    plan.writes
        .iter()
        .filter_map(|w| match w {
            Write::Release { key, .. } => Some(key.name.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn provisioning_states_other_than_succeeded_failed_and_canceled_are_changes_being_applied() {
    for (state, settlement) in [
        (None, Settlement::Applied),
        (Some("Succeeded"), Settlement::Applied),
        (Some("succeeded"), Settlement::Applied),
        (Some("Failed"), Settlement::Unapplied),
        (Some("Canceled"), Settlement::Unapplied),
        (Some("Updating"), Settlement::Applying),
        (Some("Creating"), Settlement::Applying),
        (Some("Migrating"), Settlement::Applying),
        (Some("SomethingNew"), Settlement::Applying),
    ] {
        assert_eq!(Settlement::of(state), settlement, "{state:?}");
    }
}

#[test]
fn an_identity_listed_while_its_addition_is_applied_is_not_assigned_nor_sent_again() {
    // Our PATCH was accepted; polling its operation failed, and the machine read again lists the
    // identity while ARM still applies it.
    let w = wanted("web-0", "node-1", "payments", 1);
    let newcomer = wanted("web-1", "node-1", "payments", 1);
    let mut input = input(
        vec![w.clone(), newcomer],
        vec![recorded(
            &w,
            AssignmentStatus::Created,
            Origin::Added,
            Some(&machine().arm_id()),
        )],
    );
    let updating = in_state(&["payments"], "Updating");
    let plan = run(&input, Some(&updating));
    assert!(!assigns(&plan), "nothing Assigned before ARM finished: {plan:?}");
    assert!(plan.delta.is_empty(), "nothing sent again: {plan:?}");
    assert!(plan.settling, "the machine is read again");
    assert!(!plan.is_idle());
    // The newcomer's record is written (not usable yet, and ours, as the addition is).
    let [Write::Create { object, transition }] = plan.writes.as_slice() else {
        panic!("{plan:?}")
    };
    assert_eq!(object.assignment_status(), AssignmentStatus::Created);
    assert_eq!(
        object.metadata.annotations.as_ref().unwrap()[ORIGIN_ANNOTATION],
        "added"
    );
    assert_eq!(transition, &None);
    apply_writes(&mut input, &plan);

    // A read after the operation ended: both become Assigned, with no change sent.
    let done = observed(&["payments"]);
    let plan = run(&input, Some(&done));
    assert!(plan.delta.is_empty());
    assert!(!plan.settling);
    assert_eq!(
        plan.writes
            .iter()
            .filter(|w| matches!(
                w,
                Write::Patch {
                    transition: Some(Transition::Assigned(_)),
                    ..
                }
            ))
            .count(),
        2,
        "{plan:?}"
    );
}

#[test]
fn a_removal_being_applied_keeps_the_record_until_a_read_shows_it_done() {
    let gone = wanted("gone-0", "node-1", "old", 3);
    let input = input(
        vec![],
        vec![recorded(&gone, AssignmentStatus::Assigned, Origin::Added, None)],
    );
    // Our removal was accepted and its answer lost: the model no longer lists it, the instances may.
    let removing = in_state(&[], "Updating");
    let plan = run(&input, Some(&removing));
    assert!(releases(&plan).is_empty(), "kept while ARM removes: {plan:?}");
    assert!(plan.delta.is_empty());
    assert!(plan.settling);
    // Someone else's update runs before our removal was sent: nothing is sent meanwhile, nothing released.
    let busy = in_state(&["old"], "Updating");
    let plan = run(&input, Some(&busy));
    assert!(
        plan.delta.is_empty(),
        "ARM refuses a second update meanwhile: {plan:?}"
    );
    assert!(releases(&plan).is_empty());
    assert!(plan.settling);
    // Done: the record goes.
    let plan = run(&input, Some(&observed(&[])));
    assert_eq!(releases(&plan), vec!["gone-0-ns-old"]);
    assert!(!plan.settling);
    // A record that can never remove anything goes at once, whatever ARM is doing.
    let preexisting = MachineInput {
        recorded: vec![recorded(
            &gone,
            AssignmentStatus::Assigned,
            Origin::Preexisting,
            None,
        )],
        ..input
    };
    let plan = run(&preexisting, Some(&removing));
    assert_eq!(releases(&plan), vec!["gone-0-ns-old"]);
    assert!(!plan.settling);
}

#[test]
fn a_drift_check_during_someone_elses_update_repairs_and_demotes_nothing_until_it_ends() {
    let w = wanted("web-0", "node-1", "payments", 1);
    let input = input(
        vec![w.clone()],
        vec![recorded(
            &w,
            AssignmentStatus::Assigned,
            Origin::Added,
            Some(&machine().arm_id()),
        )],
    );
    // Another writer's update drops our identity; until it ends IMDS still has it.
    let mid = in_state(&["other"], "Updating");
    let plan = run(&input, Some(&mid));
    assert!(plan.delta.is_empty(), "no repair mid-update: {plan:?}");
    assert!(plan.writes.is_empty(), "the Assigned record stays: {plan:?}");
    assert!(plan.settling);
    // Ended: the identity is put back.
    let plan = run(&input, Some(&observed(&["other"])));
    assert_eq!(plan.delta.add, vec![identity_id("payments")]);
    // A machine being updated with nothing of ours waiting on it is no reason to read it again.
    let plan = run(&input, Some(&in_state(&["payments", "other"], "Updating")));
    assert!(plan.is_idle(), "{plan:?}");
}

#[test]
fn a_failed_update_lists_what_did_not_apply_so_it_is_sent_again_and_nothing_is_assigned() {
    let w = wanted("web-0", "node-1", "payments", 1);
    let stranger = wanted("api-0", "node-1", "shared", 2);
    let gone = wanted("gone-0", "node-1", "old", 3);
    let input = input(
        vec![w.clone(), stranger],
        vec![
            recorded(
                &w,
                AssignmentStatus::Created,
                Origin::Added,
                Some(&machine().arm_id()),
            ),
            recorded(&gone, AssignmentStatus::Assigned, Origin::Added, None),
        ],
    );
    // The last update failed: the model lists "payments" (ours) and "shared" (someone else's, in that
    // update), and no longer "old" (our removal, in that update).
    for state in ["Failed", "Canceled"] {
        let failed = in_state(&["payments", "shared"], state);
        let plan = run(&input, Some(&failed));
        assert!(!assigns(&plan), "{state}: {plan:?}");
        assert!(
            !plan.settling,
            "{state}: terminal; the change sent again is what follows"
        );
        let mut add = plan.delta.add.clone();
        add.sort();
        assert_eq!(
            add,
            vec![identity_id("payments"), identity_id("shared")],
            "{state}"
        );
        assert!(
            releases(&plan).is_empty(),
            "{state}: the removal may not have applied: {plan:?}"
        );
        // Sending again what someone else's failed update listed makes it not ours.
        let created = plan
            .writes
            .iter()
            .find_map(|w| match w {
                Write::Create { object, .. } => Some(object),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            created.metadata.annotations.as_ref().unwrap()[ORIGIN_ANNOTATION],
            "preexisting",
            "{state}"
        );
    }
    // An identity already confirmed Assigned is not sent again for a failure of a later update.
    let confirmed = MachineInput {
        recorded: vec![recorded(
            &w,
            AssignmentStatus::Assigned,
            Origin::Added,
            Some(&machine().arm_id()),
        )],
        wanted: vec![w],
        ..input
    };
    let plan = run(&confirmed, Some(&in_state(&["payments"], "Failed")));
    assert!(plan.is_idle(), "{plan:?}");
}
