//! Whole rounds against in-memory ARM and Kubernetes.

use std::collections::{BTreeMap, HashSet, VecDeque};

use pod_identity_api::AssignmentStatus;
use serde_json::json;

use super::*;
use crate::{
    arm::{Delta, ObservedIdentity},
    machine::MachineKind,
    record::{ERROR_ANNOTATION, Origin, fixtures::wanted},
};

#[derive(Default)]
struct ArmState {
    identities: BTreeMap<String, String>,
    gets: usize,
    patches: Vec<Delta>,
    /// Errors the next PATCHes return, in order.
    script: VecDeque<ArmError>,
    /// Identities that do not exist.
    missing: HashSet<String>,
    /// Whether ARM's message names the missing identity.
    names_missing: bool,
    /// Whether the machine does not exist (deleted, or never there).
    gone: bool,
    /// Whether the machine goes away between the next read and the next PATCH.
    deleted_before_patch: bool,
}

#[derive(Default)]
struct FakeArm(Mutex<ArmState>);

impl FakeArm {
    fn observed(state: &ArmState) -> Observed {
        Observed {
            identities: state
                .identities
                .iter()
                .map(|(k, id)| {
                    (
                        k.clone(),
                        ObservedIdentity {
                            id: id.clone(),
                            client_id: None,
                        },
                    )
                })
                .collect(),
            system_assigned: true,
            provisioning_state: Some("Succeeded".into()),
            etag: None,
            absent: None,
        }
    }
}

impl ComputeApi for FakeArm {
    fn get(&self, _machine: &Machine) -> BoxFuture<'_, Result<Observed, ArmError>> {
        Box::pin(async move {
            let mut state = lock(&self.0);
            state.gets += 1;
            if state.gone {
                return Err(not_found());
            }
            if std::mem::take(&mut state.deleted_before_patch) {
                let observed = Self::observed(&state);
                state.gone = true;
                state.identities.clear();
                return Ok(observed);
            }
            Ok(Self::observed(&state))
        })
    }

    fn patch<'a>(
        &'a self,
        _machine: &'a Machine,
        delta: &'a Delta,
        _if_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Observed, ArmError>> {
        Box::pin(async move {
            let mut state = lock(&self.0);
            assert!(delta.add.len() + delta.remove.len() <= MAX_IDENTITIES_PER_REQUEST);
            assert!(delta.keep_system_assigned, "SystemAssigned is kept");
            state.patches.push(delta.clone());
            if state.gone {
                return Err(not_found());
            }
            if let Some(err) = state.script.pop_front() {
                return Err(err);
            }
            let missing: Vec<String> = delta
                .add
                .iter()
                .filter(|id| state.missing.contains(&fold(id)))
                .cloned()
                .collect();
            if !missing.is_empty() {
                let message = if state.names_missing {
                    format!("Resource '{}' was not found.", missing.join("', '"))
                } else {
                    "An identity was not found.".to_owned()
                };
                return Err(ArmError::IdentitiesRejected {
                    ids: Vec::new(),
                    code: "FailedIdentityOperation".into(),
                    message,
                });
            }
            for id in &delta.add {
                state.identities.insert(fold(id), id.clone());
            }
            for id in &delta.remove {
                state.identities.remove(&fold(id));
            }
            Ok(Self::observed(&state))
        })
    }
}

fn not_found() -> ArmError {
    ArmError::MachineNotFound {
        message: "The Resource 'Microsoft.Compute/virtualMachineScaleSets/pool' under resource group 'rg' was not found."
            .into(),
    }
}

#[derive(Default)]
struct FakeKube {
    objects: Mutex<BTreeMap<ObjectKey, AzureAssignedIdentity>>,
    version: Mutex<u64>,
}

impl FakeKube {
    fn next_version(&self) -> String {
        let mut v = lock(&self.version);
        *v += 1;
        v.to_string()
    }

    fn status(&self, name: &str) -> Option<AssignmentStatus> {
        lock(&self.objects)
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, o)| o.assignment_status())
    }

    fn object(&self, name: &str) -> AzureAssignedIdentity {
        lock(&self.objects)
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, o)| o.clone())
            .unwrap()
    }
}

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

impl RecordStore for FakeKube {
    fn create<'a>(
        &'a self,
        object: &'a AzureAssignedIdentity,
    ) -> BoxFuture<'a, Result<Recorded, WriteError>> {
        Box::pin(async move {
            let key = ObjectKey::new(
                object.metadata.namespace.clone().unwrap(),
                object.metadata.name.clone().unwrap(),
            );
            let mut objects = lock(&self.objects);
            if let Some(existing) = objects.get(&key) {
                return Err(WriteError::Exists(Box::new(Recorded::from_object(Arc::new(
                    existing.clone(),
                )))));
            }
            let mut object = object.clone();
            object.metadata.resource_version = Some(self.next_version());
            object.metadata.uid = Some(format!("uid-{}", key.name));
            objects.insert(key, object.clone());
            Ok(Recorded::from_object(Arc::new(object)))
        })
    }

    fn patch<'a>(
        &'a self,
        key: &'a ObjectKey,
        patch: &'a Value,
    ) -> BoxFuture<'a, Result<Recorded, WriteError>> {
        Box::pin(async move {
            let mut objects = lock(&self.objects);
            let current = objects.get(key).ok_or(WriteError::NotFound)?;
            if patch["metadata"]["resourceVersion"] != json!(current.metadata.resource_version) {
                return Err(WriteError::Conflict);
            }
            let mut value = serde_json::to_value(current).unwrap();
            merge(&mut value, patch);
            value["metadata"]["resourceVersion"] = json!(self.next_version());
            let object: AzureAssignedIdentity = serde_json::from_value(value).unwrap();
            objects.insert(key.clone(), object.clone());
            Ok(Recorded::from_object(Arc::new(object)))
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a ObjectKey,
        resource_version: Option<&'a str>,
        _uid: Option<&'a str>,
        _other_finalizers: &'a [String],
    ) -> BoxFuture<'a, Result<(), WriteError>> {
        Box::pin(async move {
            let mut objects = lock(&self.objects);
            let current = objects.get(key).ok_or(WriteError::NotFound)?;
            if current.metadata.resource_version.as_deref() != resource_version {
                return Err(WriteError::Conflict);
            }
            objects.remove(key);
            Ok(())
        })
    }
}

fn pool() -> Machine {
    Machine {
        kind: MachineKind::ScaleSet,
        subscription: "s".into(),
        resource_group: "rg".into(),
        name: "pool".into(),
    }
}

struct Harness {
    arm: Arc<FakeArm>,
    kube: Arc<FakeKube>,
    shared: Arc<Shared>,
}

fn harness(leadership: Leadership) -> Harness {
    let arm = Arc::new(FakeArm::default());
    let kube = Arc::new(FakeKube::default());
    let metrics = Metrics::new();
    let shared = Arc::new(Shared {
        compute: arm.clone(),
        records: kube.clone(),
        quarantine: Mutex::new(Quarantine::new(
            Duration::from_secs(300),
            Duration::from_secs(3600),
        )),
        drift_budget: Mutex::new(ReadBudget::new(10, Duration::from_secs(60), Instant::now())),
        protection: Protection::default(),
        events: Events::disabled(metrics.clone()),
        metrics,
        leadership,
        settings: WorkerSettings::default(),
    });
    Harness { arm, kube, shared }
}

fn input(wanted: Vec<crate::record::Wanted>) -> MachineInput {
    MachineInput {
        target: Target::Azure(pool()),
        wanted,
        recorded: Vec::new(),
        reserved: BTreeSet::new(),
    }
}

#[tokio::test]
async fn one_request_adds_everything_pending_and_records_become_assigned() {
    let h = harness(Leadership::always());
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![
        wanted("web-0", "node-0", "payments", 1),
        wanted("web-1", "node-1", "payments", 1),
        wanted("api-0", "node-1", "orders", 2),
    ]);
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    {
        let arm = lock(&h.arm.0);
        assert_eq!(arm.gets, 1);
        assert_eq!(arm.patches.len(), 1, "one PATCH for the whole scale set");
        assert_eq!(arm.patches[0].add.len(), 2);
    }
    for name in ["web-0-ns-payments", "web-1-ns-payments", "api-0-ns-orders"] {
        assert_eq!(h.kube.status(name), Some(AssignmentStatus::Assigned), "{name}");
        assert_eq!(
            Recorded::from_object(Arc::new(h.kube.object(name))).origin,
            Origin::Added
        );
    }
    // Nothing left to do: a further round makes no call at all.
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    let arm = lock(&h.arm.0);
    assert_eq!((arm.gets, arm.patches.len()), (1, 1));
}

#[tokio::test]
async fn throttling_defers_the_round_until_retry_after() {
    let h = harness(Leadership::always());
    lock(&h.arm.0).script.push_back(ArmError::Throttled {
        retry_after: Some(Duration::from_secs(20)),
        scope: crate::arm::ThrottleScope::Resource,
    });
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    match worker.round(&mut input, false).await {
        Outcome::Retry(wait) => assert!(wait >= Duration::from_secs(20), "{wait:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        h.kube.status("web-0-ns-payments"),
        Some(AssignmentStatus::Created)
    );
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    assert_eq!(
        h.kube.status("web-0-ns-payments"),
        Some(AssignmentStatus::Assigned)
    );
    assert_eq!(lock(&h.arm.0).patches.len(), 2);
    assert!(h.shared.metrics.render().contains("status=\"throttled\"} 1"));
}

#[tokio::test]
async fn a_missing_identity_is_quarantined_and_the_others_still_assigned_in_the_same_round() {
    let h = harness(Leadership::always());
    {
        let mut arm = lock(&h.arm.0);
        arm.missing
            .insert(fold(&crate::record::fixtures::identity_id("gone")));
        arm.names_missing = true;
    }
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![
        wanted("web-0", "node-0", "payments", 1),
        wanted("bad-0", "node-0", "gone", 2),
    ]);
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    assert_eq!(
        h.kube.status("web-0-ns-payments"),
        Some(AssignmentStatus::Assigned)
    );
    assert_eq!(h.kube.status("bad-0-ns-gone"), Some(AssignmentStatus::Created));
    let bad = h.kube.object("bad-0-ns-gone");
    assert!(bad.metadata.annotations.as_ref().unwrap()[ERROR_ANNOTATION].contains("FailedIdentityOperation"));
    {
        let arm = lock(&h.arm.0);
        assert_eq!(arm.patches.len(), 2, "the refused request, then the rest at once");
        assert_eq!(
            arm.patches[1].add,
            vec![crate::record::fixtures::identity_id("payments")]
        );
    }
    // Later rounds leave it out while it is quarantined.
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    assert_eq!(lock(&h.arm.0).patches.len(), 2);
}

#[tokio::test]
async fn a_refusal_that_names_no_identity_is_narrowed_down_by_halving() {
    let h = harness(Leadership::always());
    {
        let mut arm = lock(&h.arm.0);
        arm.missing
            .insert(fold(&crate::record::fixtures::identity_id("i3")));
        arm.names_missing = false;
    }
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(
        (0..8)
            .map(|n| wanted(&format!("p{n}"), "node", &format!("i{n}"), n as u8 + 1))
            .collect(),
    );
    let mut rounds = 0;
    while worker.round(&mut input, false).await != Outcome::Settled {
        rounds += 1;
        assert!(rounds < 4);
    }
    for n in (0..8).filter(|n| *n != 3) {
        assert_eq!(
            h.kube.status(&format!("p{n}-ns-i{n}")),
            Some(AssignmentStatus::Assigned)
        );
    }
    assert_eq!(h.kube.status("p3-ns-i3"), Some(AssignmentStatus::Created));
    let patches = lock(&h.arm.0).patches.len();
    // 8 → 4 → 2 → 1 refused requests at most, plus the accepted ones.
    assert!(patches <= 8, "{patches} requests");
}

#[tokio::test]
async fn more_than_150_identities_go_in_requests_of_at_most_150() {
    let h = harness(Leadership::always());
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(
        (0..200)
            .map(|n| wanted(&format!("p{n}"), "node", &format!("id{n}"), (n % 250) as u8))
            .collect(),
    );
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    let arm = lock(&h.arm.0);
    assert_eq!(arm.patches.len(), 2);
    assert_eq!(arm.patches[0].add.len(), 150);
    assert_eq!(arm.patches[1].add.len(), 50);
    assert_eq!(arm.identities.len(), 200);
}

#[tokio::test]
async fn a_replica_that_does_not_lead_writes_nothing() {
    let h = harness(Leadership::never());
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    assert_eq!(worker.round(&mut input, false).await, Outcome::NotLeader);
    {
        let arm = lock(&h.arm.0);
        assert_eq!(arm.gets + arm.patches.len(), 0);
    }
    assert!(lock(&h.kube.objects).is_empty());
}

#[tokio::test]
async fn a_conflicting_change_makes_the_next_round_read_again() {
    let h = harness(Leadership::always());
    lock(&h.arm.0).script.push_back(ArmError::Conflict {
        message: "AnotherOperationInProgress".into(),
        retry_after: None,
    });
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    assert!(matches!(worker.round(&mut input, false).await, Outcome::Retry(_)));
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    let arm = lock(&h.arm.0);
    assert_eq!((arm.gets, arm.patches.len()), (2, 2));
}

#[tokio::test]
async fn the_drift_check_puts_back_a_removed_identity() {
    let h = harness(Leadership::always());
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    lock(&h.arm.0).identities.clear();
    // Without a read nothing notices.
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    assert!(lock(&h.arm.0).identities.is_empty());
    assert_eq!(worker.round(&mut input, true).await, Outcome::Settled);
    assert_eq!(lock(&h.arm.0).identities.len(), 1);
    assert!(
        h.shared
            .metrics
            .render()
            .contains("pod_identity_drift_repairs_total 1")
    );
}

#[test]
fn the_overlay_hides_lagging_watch_state_until_it_catches_up() {
    let now = Instant::now();
    let w = wanted("web-0", "node-0", "payments", 1);
    let ours = crate::record::fixtures::recorded(&w, AssignmentStatus::Assigned, Origin::Added, None);
    let mut overlay = Overlay::default();
    overlay.written(ours.clone(), now);
    let mut stale = input(vec![w.clone()]);
    overlay.apply(&mut stale, now);
    assert_eq!(
        stale.recorded,
        vec![ours.clone()],
        "our write shows before the watch delivers it"
    );
    let mut caught_up = input(vec![w]);
    caught_up.recorded.push(ours);
    overlay.apply(&mut caught_up, now);
    assert!(overlay.entries.is_empty(), "forgotten once the watch shows it");
}

/// Records of `wanted` as the watch shows them after an earlier round made them `Assigned` on the pool.
fn assigned_records(wanted: &[crate::record::Wanted], kube: &FakeKube) -> Vec<Recorded> {
    wanted
        .iter()
        .map(|w| {
            let recorded = crate::record::fixtures::recorded(
                w,
                AssignmentStatus::Assigned,
                Origin::Added,
                Some(&pool().arm_id()),
            );
            lock(&kube.objects).insert(recorded.key.clone(), (*recorded.object).clone());
            recorded
        })
        .collect()
}

#[tokio::test]
async fn records_of_a_machine_that_no_longer_exists_are_released_after_one_read() {
    let h = harness(Leadership::always());
    let gone_pod = wanted("web-0", "node-0", "payments", 1);
    let mut input = input(Vec::new());
    input.recorded = assigned_records(&[gone_pod], &h.kube);
    lock(&h.arm.0).gone = true;
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    assert!(
        lock(&h.kube.objects).is_empty(),
        "released: finalizer gone with the object"
    );
    assert!(input.recorded.is_empty());
    {
        let arm = lock(&h.arm.0);
        assert_eq!((arm.gets, arm.patches.len()), (1, 0));
    }
    assert!(
        h.shared
            .metrics
            .render()
            .contains("operation=\"vmss_get\",status=\"not_found\"} 1")
    );
    // Nothing is left to do: no further ARM call, however often the worker is woken.
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    assert_eq!(lock(&h.arm.0).gets, 1);
}

#[tokio::test]
async fn pods_still_on_a_missing_machine_keep_records_that_say_why_until_it_is_back() {
    let h = harness(Leadership::always());
    let on_it = wanted("web-0", "node-0", "payments", 1);
    let mut input = input(vec![on_it.clone()]);
    input.recorded = assigned_records(std::slice::from_ref(&on_it), &h.kube);
    lock(&h.arm.0).gone = true;
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    // The drift check is what reads a machine nothing else needs read.
    assert_eq!(worker.round(&mut input, true).await, Outcome::Settled);
    assert_eq!(
        h.kube.status("web-0-ns-payments"),
        Some(AssignmentStatus::Created),
        "an identity on no machine is not usable"
    );
    let error = h.kube.object("web-0-ns-payments").metadata.annotations.unwrap()[ERROR_ANNOTATION].clone();
    assert!(error.contains("does not exist"), "{error}");
    assert_eq!(lock(&h.arm.0).patches.len(), 0);

    // Re-created under the same name, without our identity: the next read puts it back.
    lock(&h.arm.0).gone = false;
    assert_eq!(worker.round(&mut input, true).await, Outcome::Settled);
    assert_eq!(
        h.kube.status("web-0-ns-payments"),
        Some(AssignmentStatus::Assigned)
    );
    let annotations = h.kube.object("web-0-ns-payments").metadata.annotations.unwrap();
    assert!(!annotations.contains_key(ERROR_ANNOTATION), "{annotations:?}");
    assert_eq!(lock(&h.arm.0).identities.len(), 1);
}

#[tokio::test]
async fn a_machine_deleted_between_read_and_patch_is_settled_in_the_same_round() {
    let h = harness(Leadership::always());
    let leaving = wanted("web-0", "node-0", "payments", 1);
    let mut input = input(vec![wanted("api-0", "node-0", "orders", 2)]);
    input.recorded = assigned_records(&[leaving], &h.kube);
    lock(&h.arm.0).deleted_before_patch = true;
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    assert_eq!(worker.round(&mut input, false).await, Outcome::Settled);
    assert_eq!(h.kube.status("web-0-ns-payments"), None, "released");
    assert_eq!(h.kube.status("api-0-ns-orders"), Some(AssignmentStatus::Created));
    let arm = lock(&h.arm.0);
    assert_eq!((arm.gets, arm.patches.len()), (1, 1));
}

#[tokio::test]
async fn a_worker_whose_machine_vanished_settles_and_retires_when_its_input_goes() {
    let h = harness(Leadership::always());
    let mut first = input(Vec::new());
    first.recorded = assigned_records(&[wanted("web-0", "node-0", "payments", 1)], &h.kube);
    lock(&h.arm.0).gone = true;
    let (tx, rx) = watch::channel(first);
    let task = tokio::spawn(Worker::new(Target::Azure(pool()), h.shared.clone()).run(rx));
    pod_identity_test_support::eventually(|| async {
        match lock(&h.kube.objects).len() {
            0 => Ok(()),
            n => Err(format!("{n} records left")),
        }
    })
    .await
    .unwrap();
    pod_identity_test_support::eventually(|| async {
        let metrics = h.shared.metrics.render();
        if metrics.contains("pod_identity_work_queue_depth 0") {
            Ok(())
        } else {
            Err(metrics)
        }
    })
    .await
    .unwrap();
    // The planner drops the sender once the machine has nothing wanted or recorded.
    drop(tx);
    task.await.unwrap();
    assert_eq!(lock(&h.arm.0).gets, 1, "the missing machine was read once");
    assert!(
        h.shared
            .metrics
            .render()
            .contains("pod_identity_work_queue_depth 0")
    );
}
