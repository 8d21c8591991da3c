//! Whole rounds against in-memory ARM and Kubernetes.

use std::collections::{BTreeMap, HashSet, VecDeque};

use pod_identity_api::AssignmentStatus;
use pod_identity_azure::{MAX_IDENTITIES_PER_REQUEST, Machine, MachineKind, ThrottleScope};
use serde_json::json;

use super::*;
use crate::{
    arm::ObservedIdentity,
    record::{ERROR_ANNOTATION, Origin, fixtures::wanted},
};

impl Worker {
    /// Runs steps until the schedule waits with no call in flight, each ARM call awaited in turn: the
    /// loop of [`Worker::run`] without its concurrency. Returns when the schedule wants to act next.
    async fn settle(&mut self, input: &mut MachineInput) -> Option<Instant> {
        loop {
            if !self.shared.leadership.is_leader() {
                return None;
            }
            match self.step(input) {
                Step::Write(writes) => {
                    let ok = self.execute(input, &writes).await;
                    self.schedule.written(Instant::now(), ok);
                }
                Step::Read { drift } => {
                    if let Some(call) = self.read(drift) {
                        let answer = call.await;
                        self.answered(input, answer);
                    }
                }
                Step::Patch { delta, if_match } => {
                    let answer = self.patch(delta, if_match).await;
                    self.answered(input, answer);
                }
                Step::Wait(until) => return until,
            }
        }
    }

    /// Whether work is pending (a retry to come, a change not sent yet).
    fn busy(&self) -> bool {
        self.schedule.busy()
    }
}

#[derive(Default)]
struct ArmState {
    identities: BTreeMap<String, String>,
    gets: usize,
    patches: Vec<IdentityDelta>,
    /// Errors the next PATCHes return, in order.
    script: VecDeque<AzureError>,
    /// Identities that do not exist.
    missing: HashSet<String>,
    /// Whether ARM's message names the missing identity.
    names_missing: bool,
    /// Whether the machine does not exist (deleted, or never there).
    gone: bool,
    /// Whether the machine goes away between the next read and the next PATCH.
    deleted_before_patch: bool,
    /// The entity tag, moved by every change.
    etag: u64,
    /// The `If-Match` of every PATCH.
    if_match: Vec<Option<String>>,
    /// Someone else changes the machine right after our next read.
    changed_after_read: Option<String>,
    /// PATCHes wait for a permit (none: they go at once).
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// PATCHes that reached the gate.
    at_gate: usize,
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
            etag: Some(format!("\"{}\"", state.etag)),
            absent: None,
        }
    }
}

impl ComputeApi for FakeArm {
    fn get(&self, _machine: &Machine) -> BoxFuture<'_, Result<Observed, AzureError>> {
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
            let observed = Self::observed(&state);
            if let Some(id) = state.changed_after_read.take() {
                state.identities.insert(fold(&id), id);
                state.etag += 1;
            }
            Ok(observed)
        })
    }

    fn patch<'a>(
        &'a self,
        _machine: &'a Machine,
        delta: &'a IdentityDelta,
        if_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Observed, AzureError>> {
        Box::pin(async move {
            let gate = {
                let mut state = lock(&self.0);
                state.at_gate += 1;
                state.gate.clone()
            };
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            let mut state = lock(&self.0);
            assert!(delta.add.len() + delta.remove.len() <= MAX_IDENTITIES_PER_REQUEST);
            assert!(delta.keep_system_assigned, "SystemAssigned is kept");
            state.patches.push(delta.clone());
            state.if_match.push(if_match.map(str::to_owned));
            if state.gone {
                return Err(not_found());
            }
            if let Some(err) = state.script.pop_front() {
                return Err(err);
            }
            if if_match.is_some_and(|tag| tag != format!("\"{}\"", state.etag)) {
                return Err(precondition_failed());
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
                return Err(AzureError::IdentitiesRejected {
                    identities: Vec::new(),
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
            state.etag += 1;
            Ok(Self::observed(&state))
        })
    }
}

/// ARM's 412 to a PATCH whose `If-Match` no longer matches.
fn precondition_failed() -> AzureError {
    AzureError::Conflict {
        status: 412,
        code: "PreconditionFailed".into(),
        message: "The condition specified using HTTP conditional header(s) is not met.".into(),
    }
}

fn not_found() -> AzureError {
    AzureError::ResourceNotFound {
        code: "ResourceNotFound".into(),
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

/// Worker timing for tests: no batch window (a change is sent as soon as it is known).
fn settings() -> WorkerSettings {
    WorkerSettings {
        batch_window: Duration::ZERO,
        ..WorkerSettings::default()
    }
}

fn harness(leadership: Leadership) -> Harness {
    harness_with(leadership, settings())
}

fn harness_with(leadership: Leadership, settings: WorkerSettings) -> Harness {
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
        holds: Mutex::new(SubscriptionHolds::default()),
        last_known: Mutex::default(),
        protection: Protection::default(),
        events: Events::disabled(metrics.clone()),
        metrics,
        leadership,
        settings,
    });
    Harness { arm, kube, shared }
}

fn input(wanted: Vec<crate::record::Wanted>) -> MachineInput {
    MachineInput {
        target: Target::Azure(pool()),
        wanted,
        recorded: Vec::new(),
        reserved: BTreeSet::new(),
        held: BTreeSet::new(),
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
    worker.settle(&mut input).await;
    assert!(!worker.busy());
    {
        let arm = lock(&h.arm.0);
        assert_eq!(arm.gets, 1);
        assert_eq!(arm.patches.len(), 1, "one PATCH for the whole scale set");
        assert_eq!(arm.patches[0].add.len(), 2);
        assert_eq!(
            arm.if_match,
            vec![Some("\"0\"".to_owned())],
            "conditional on what was read"
        );
    }
    for name in ["web-0-ns-payments", "web-1-ns-payments", "api-0-ns-orders"] {
        assert_eq!(h.kube.status(name), Some(AssignmentStatus::Assigned), "{name}");
        assert_eq!(
            Recorded::from_object(Arc::new(h.kube.object(name))).origin,
            Origin::Added
        );
    }
    // Nothing left to do: a further pass makes no call at all.
    worker.settle(&mut input).await;
    let arm = lock(&h.arm.0);
    assert_eq!((arm.gets, arm.patches.len()), (1, 1));
}

#[tokio::test]
async fn what_the_machine_is_known_to_hold_needs_no_read_and_a_change_of_it_is_conditional() {
    let h = harness(Leadership::always());
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    worker.settle(&mut input).await;
    // More pods of the same identity, then of another one: no read, the second change conditional on
    // the entity tag our first change left.
    input.wanted.push(wanted("web-1", "node-1", "payments", 1));
    worker.settle(&mut input).await;
    assert_eq!(
        h.kube.status("web-1-ns-payments"),
        Some(AssignmentStatus::Assigned)
    );
    input.wanted.push(wanted("api-0", "node-1", "orders", 2));
    worker.settle(&mut input).await;
    assert_eq!(h.kube.status("api-0-ns-orders"), Some(AssignmentStatus::Assigned));
    let arm = lock(&h.arm.0);
    assert_eq!(arm.gets, 1, "read once, on first contact");
    assert_eq!(arm.patches.len(), 2);
    assert_eq!(
        arm.if_match,
        vec![Some("\"0\"".to_owned()), Some("\"1\"".to_owned())]
    );
}

#[tokio::test]
async fn another_writer_is_detected_by_the_entity_tag_and_the_machine_read_again() {
    let h = harness(Leadership::always());
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    worker.settle(&mut input).await;
    // Someone else adds the identity the next pod needs, right after our read: our change is refused
    // (412) instead of sent blindly, the machine read again, and the pod served by what is there.
    lock(&h.arm.0).changed_after_read = Some(crate::record::fixtures::identity_id("orders"));
    worker.schedule.rewind(h.shared.settings.drift_interval);
    input.wanted.push(wanted("api-0", "node-1", "orders", 2));
    worker.settle(&mut input).await;
    assert_eq!(h.kube.status("api-0-ns-orders"), Some(AssignmentStatus::Assigned));
    let arm = lock(&h.arm.0);
    assert_eq!(arm.gets, 3, "first contact, stale knowledge, after the 412");
    assert_eq!(
        arm.patches.len(),
        2,
        "the first change, then the refused one; nothing after"
    );
    assert!(h.shared.metrics.render().contains("status=\"conflict\"} 1"));
    assert!(!worker.busy());
}

#[tokio::test]
async fn a_machine_changed_by_others_again_and_again_is_read_with_backoff() {
    let h = harness(Leadership::always());
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    for _ in 0..2 {
        lock(&h.arm.0).script.push_back(precondition_failed());
    }
    let retry = worker.settle(&mut input).await;
    {
        let arm = lock(&h.arm.0);
        assert_eq!(
            (arm.gets, arm.patches.len()),
            (2, 2),
            "the first 412 is read again at once"
        );
    }
    assert!(worker.busy());
    assert!(retry.is_some_and(|at| at > Instant::now()), "the second waits");
    worker.schedule.rewind(h.shared.settings.retry.max_delay);
    worker.settle(&mut input).await;
    assert_eq!(
        h.kube.status("web-0-ns-payments"),
        Some(AssignmentStatus::Assigned)
    );
}

#[tokio::test]
async fn throttling_holds_the_machine_until_retry_after() {
    let h = harness(Leadership::always());
    lock(&h.arm.0)
        .script
        .push_back(ThrottleScope::Resource.throttled(Some(Duration::from_secs(20)), "PutVMScaleSetResource"));
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    let retry = worker.settle(&mut input).await;
    let wait = retry.unwrap().saturating_duration_since(Instant::now());
    assert!(wait >= Duration::from_secs(19), "{wait:?}");
    assert!(worker.busy());
    assert_eq!(
        h.kube.status("web-0-ns-payments"),
        Some(AssignmentStatus::Created)
    );
    // Woken early (another pod): nothing goes to ARM inside the window.
    input.wanted.push(wanted("web-1", "node-0", "payments", 1));
    worker.settle(&mut input).await;
    assert_eq!(lock(&h.arm.0).patches.len(), 1);
    worker.schedule.rewind(Duration::from_secs(20));
    worker.settle(&mut input).await;
    assert_eq!(
        h.kube.status("web-0-ns-payments"),
        Some(AssignmentStatus::Assigned)
    );
    let arm = lock(&h.arm.0);
    assert_eq!(
        (arm.gets, arm.patches.len()),
        (1, 2),
        "what was known stays known"
    );
    assert!(h.shared.metrics.render().contains("status=\"throttled\"} 1"));
    assert!(
        lock(&h.shared.holds).until("s", true, Instant::now()).is_none(),
        "the machine's own bucket: the subscription goes on"
    );
}

#[tokio::test]
async fn a_throttled_subscription_holds_every_machine_of_it() {
    let h = harness(Leadership::always());
    lock(&h.arm.0).script.push_back(
        ThrottleScope::Subscription.throttled(Some(Duration::from_secs(30)), "SubscriptionRequestsThrottled"),
    );
    let mut first = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input_a = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    first.settle(&mut input_a).await;
    let other = Machine {
        name: "other".into(),
        ..pool()
    };
    let mut second = Worker::new(Target::Azure(other.clone()), h.shared.clone());
    let mut input_b = MachineInput {
        target: Target::Azure(other),
        ..input(vec![wanted("api-0", "node-9", "orders", 2)])
    };
    let retry = second.settle(&mut input_b).await;
    let arm = lock(&h.arm.0);
    assert_eq!(arm.patches.len(), 1, "no write inside the subscription's window");
    assert_eq!(arm.gets, 2, "reads are another bucket");
    assert!(retry.unwrap() >= Instant::now() + Duration::from_secs(29));
}

#[tokio::test]
async fn a_missing_identity_is_quarantined_and_the_others_still_assigned_at_once() {
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
    worker.settle(&mut input).await;
    assert!(!worker.busy());
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
    // Later passes leave it out while it is quarantined.
    worker.settle(&mut input).await;
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
    worker.settle(&mut input).await;
    assert!(!worker.busy());
    for n in (0..8).filter(|n| *n != 3) {
        assert_eq!(
            h.kube.status(&format!("p{n}-ns-i{n}")),
            Some(AssignmentStatus::Assigned)
        );
    }
    assert_eq!(h.kube.status("p3-ns-i3"), Some(AssignmentStatus::Created));
    let patches = lock(&h.arm.0).patches.clone();
    // 8 → 4 → 2 → 1 refused requests at most, plus the accepted ones.
    assert!(patches.len() <= 8, "{patches:?}");
    let sizes: Vec<usize> = patches.iter().map(|p| p.add.len()).collect();
    assert_eq!(
        sizes,
        vec![8, 4, 2, 1, 4],
        "all, half, quarter, alone; then the rest"
    );
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
    worker.settle(&mut input).await;
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
    worker.settle(&mut input).await;
    {
        let arm = lock(&h.arm.0);
        assert_eq!(arm.gets + arm.patches.len(), 0);
    }
    assert!(lock(&h.kube.objects).is_empty());
}

#[tokio::test]
async fn a_busy_machine_is_read_again_after_the_backoff() {
    let h = harness(Leadership::always());
    lock(&h.arm.0).script.push_back(AzureError::Conflict {
        status: 409,
        code: "AnotherOperationInProgress".into(),
        message: "Operation is not allowed: another operation is in progress".into(),
    });
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    assert!(worker.settle(&mut input).await.is_some());
    assert!(worker.busy());
    worker.schedule.rewind(h.shared.settings.retry.max_delay);
    worker.settle(&mut input).await;
    assert!(!worker.busy());
    let arm = lock(&h.arm.0);
    assert_eq!((arm.gets, arm.patches.len()), (2, 2));
}

#[tokio::test]
async fn the_drift_check_puts_back_a_removed_identity() {
    let h = harness(Leadership::always());
    let mut worker = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    worker.settle(&mut input).await;
    lock(&h.arm.0).identities.clear();
    // Until the drift interval has passed nothing notices.
    worker.settle(&mut input).await;
    assert!(lock(&h.arm.0).identities.is_empty());
    assert_eq!(lock(&h.arm.0).gets, 1);
    worker.schedule.rewind(h.shared.settings.drift_interval);
    worker.settle(&mut input).await;
    assert_eq!(lock(&h.arm.0).identities.len(), 1);
    assert_eq!(lock(&h.arm.0).gets, 2, "one read per drift interval");
    assert!(
        h.shared
            .metrics
            .render()
            .contains("pod_identity_drift_repairs_total 1")
    );
}

#[tokio::test]
async fn pods_that_arrive_while_a_change_is_in_flight_join_one_follow_up() {
    let h = harness(Leadership::always());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    lock(&h.arm.0).gate = Some(gate.clone());
    let first = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    let (tx, rx) = watch::channel(first.clone());
    let task = tokio::spawn(Worker::new(Target::Azure(pool()), h.shared.clone()).run(rx));
    pod_identity_test_support::eventually(|| async {
        match lock(&h.arm.0).at_gate {
            0 => Err("the first change is not sent yet"),
            _ => Ok(()),
        }
    })
    .await
    .unwrap();
    // While the first change waits for ARM: a pod of the identity in flight, and two of others.
    let mut more = first.clone();
    more.wanted.push(wanted("web-1", "node-1", "payments", 1));
    more.wanted.push(wanted("api-0", "node-1", "orders", 2));
    more.wanted.push(wanted("db-0", "node-2", "ledger", 3));
    tx.send(more).unwrap();
    gate.add_permits(2);
    pod_identity_test_support::eventually(|| async {
        for name in [
            "web-0-ns-payments",
            "web-1-ns-payments",
            "api-0-ns-orders",
            "db-0-ns-ledger",
        ] {
            if h.kube.status(name) != Some(AssignmentStatus::Assigned) {
                return Err(format!("{name} not assigned"));
            }
        }
        Ok(())
    })
    .await
    .unwrap();
    let patches = lock(&h.arm.0).patches.clone();
    assert_eq!(patches.len(), 2, "{patches:?}");
    assert_eq!(patches[0].add.len(), 1);
    assert_eq!(patches[1].add.len(), 2, "the two new identities in one follow-up");
    assert_eq!(lock(&h.arm.0).gets, 1);
    drop(tx);
    task.await.unwrap();
}

#[tokio::test]
async fn what_a_retired_worker_knew_is_handed_to_the_next_one_of_its_machine() {
    let h = harness(Leadership::always());
    let mut first = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut input = input(vec![wanted("web-0", "node-0", "payments", 1)]);
    first.settle(&mut input).await;
    // Its pods gone, the worker retires; the identity stays (a pod of it comes back at once).
    let (tx, rx) = watch::channel(MachineInput::empty(Target::Azure(pool())));
    drop(tx);
    first.run(rx).await;
    let mut second = Worker::new(Target::Azure(pool()), h.shared.clone());
    let mut again = self::input(vec![wanted("web-1", "node-0", "payments", 1)]);
    second.settle(&mut again).await;
    assert_eq!(
        h.kube.status("web-1-ns-payments"),
        Some(AssignmentStatus::Assigned)
    );
    assert_eq!(
        lock(&h.arm.0).gets,
        1,
        "no second read of a machine known a moment ago"
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
/// Records of `wanted` as the watch shows them after an earlier pass made them `Assigned` on the pool.
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
    worker.settle(&mut input).await;
    assert!(!worker.busy());
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
    worker.settle(&mut input).await;
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
    worker.settle(&mut input).await;
    assert_eq!(lock(&h.arm.0).gets, 0);
    worker.schedule.rewind(h.shared.settings.drift_interval);
    worker.settle(&mut input).await;
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
    worker.schedule.rewind(h.shared.settings.drift_interval);
    worker.settle(&mut input).await;
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
    worker.settle(&mut input).await;
    assert!(!worker.busy());
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
