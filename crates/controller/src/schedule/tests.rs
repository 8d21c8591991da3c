//! The schedule driven by hand: inputs, answers and instants are plain values.

use std::{collections::BTreeSet, sync::Arc};

use pod_identity_api::AssignmentStatus;
use pod_identity_azure::{Machine, MachineKind, RetryPolicy};
use serde_json::Value;

use super::*;
use crate::{
    arm::ObservedIdentity,
    record::{
        Origin, Recorded,
        fixtures::{identity_id, recorded, wanted},
    },
};

const WINDOW: Duration = Duration::from_secs(1);
const DRIFT: Duration = Duration::from_secs(180);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A backoff's wait in whole milliseconds of the simulated clock, rounded up so that the clock is past it
/// (the waits of the one retry policy carry random jitter below a millisecond).
fn ceil_ms(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000) as u64
}

fn pool() -> Machine {
    Machine {
        kind: MachineKind::ScaleSet,
        subscription: "s".into(),
        resource_group: "rg".into(),
        name: "pool".into(),
    }
}

fn machine(names: &[&str], etag: Option<u32>) -> Observed {
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
        etag: etag.map(|e| format!("\"{e}\"")),
        absent: None,
    }
}

/// What a step is, for comparing (writes compared by how many).
#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Read {
        drift: bool,
    },
    Write(usize),
    Patch {
        add: usize,
        remove: usize,
        if_match: Option<String>,
    },
    Wait(Option<Duration>),
}

fn tag(e: u32) -> Option<String> {
    Some(format!("\"{e}\""))
}

/// A schedule, its input, and the clock in milliseconds since `t0`.
struct Sim {
    schedule: Schedule,
    input: MachineInput,
    t0: Instant,
    quarantined: Vec<String>,
    reads_held: Option<Instant>,
    writes_held: Option<Instant>,
    version: u64,
}

impl Sim {
    fn new() -> Self {
        let t0 = Instant::now();
        Self {
            schedule: Schedule::new(
                WINDOW,
                DRIFT,
                RetryPolicy {
                    initial_delay: Duration::from_secs(1),
                    max_delay: Duration::from_secs(60),
                    ..RetryPolicy::default()
                }
                .backoff(),
                t0,
                1.0,
            ),
            input: MachineInput {
                target: Target::Azure(pool()),
                wanted: Vec::new(),
                recorded: Vec::new(),
                reserved: BTreeSet::new(),
                held: BTreeSet::new(),
            },
            t0,
            quarantined: Vec::new(),
            reads_held: None,
            writes_held: None,
            version: 0,
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// The step at `ms`, as the worker gets it.
    fn next(&mut self, ms: u64) -> Step {
        let quarantined = self.quarantined.clone();
        let reason = move |key: &str| {
            quarantined
                .iter()
                .any(|q| fold(q) == key)
                .then(|| "refused".to_owned())
        };
        let now = self.at(ms);
        self.schedule.next(
            &self.input,
            &Facts {
                quarantine: &reason,
                protection: &Protection::default(),
                reads_held: self.reads_held,
                writes_held: self.writes_held,
            },
            now,
        )
    }

    /// The kind of the step at `ms`; writes are carried out (all succeed), waits are relative to `t0`.
    fn step(&mut self, ms: u64) -> Kind {
        match self.next(ms) {
            Step::Read { drift } => Kind::Read { drift },
            Step::Write(writes) => {
                let n = writes.len();
                self.apply(&writes);
                self.schedule.written(self.at(ms), true);
                Kind::Write(n)
            }
            Step::Patch { delta, if_match } => Kind::Patch {
                add: delta.add.len(),
                remove: delta.remove.len(),
                if_match,
            },
            Step::Wait(until) => Kind::Wait(until.map(|u| u.saturating_duration_since(self.t0))),
        }
    }

    /// Steps until one is not a write.
    fn settle(&mut self, ms: u64) -> Kind {
        loop {
            match self.step(ms) {
                Kind::Write(_) => {}
                other => return other,
            }
        }
    }

    fn answer(&mut self, ms: u64, result: Result<Observed, AzureError>) -> Effects {
        let now = self.at(ms);
        self.schedule.answered(now, result)
    }

    fn pod(&mut self, pod: &str, identity: &str) {
        let n = (self.input.wanted.len() % 200) as u8;
        self.input.wanted.push(wanted(pod, "node-0", identity, n));
        self.schedule.news();
    }

    fn pod_gone(&mut self, pod: &str) {
        self.input.wanted.retain(|w| w.pod.name != pod);
        self.schedule.news();
    }

    fn status(&self, pod: &str) -> Option<AssignmentStatus> {
        self.input
            .recorded
            .iter()
            .find(|r| r.object.spec.pod == pod)
            .map(|r| r.status.clone())
    }

    /// Replays writes as the API server would.
    fn apply(&mut self, writes: &[Write]) {
        for write in writes {
            self.version += 1;
            match write {
                Write::Create { object, .. } => {
                    let mut object = (**object).clone();
                    object.metadata.resource_version = Some(self.version.to_string());
                    self.input.record(Recorded::from_object(Arc::new(object)));
                }
                Write::Patch { key, patch, .. } => {
                    let current = self.input.recorded.iter().find(|r| &r.key == key).unwrap();
                    let mut value = serde_json::to_value(&*current.object).unwrap();
                    merge(&mut value, patch);
                    value["metadata"]["resourceVersion"] = Value::String(self.version.to_string());
                    let object = serde_json::from_value(value).unwrap();
                    self.input.record(Recorded::from_object(Arc::new(object)));
                }
                Write::Release { key, .. } => self.input.forget(key),
            }
        }
    }

    /// A machine read at `ms` holding `names`: the first contact of most tests.
    fn known(&mut self, ms: u64, names: &[&str], etag: u32) {
        self.schedule.call = Some(Call::Read { drift: false });
        self.answer(ms, Ok(machine(names, Some(etag))));
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

fn throttled(secs: u64, scope: ThrottleScope) -> AzureError {
    scope.throttled(Some(Duration::from_secs(secs)), "throttled")
}

/// The first decision in each situation.
#[test]
fn what_a_worker_does_first() {
    type Setup = fn(&mut Sim);
    let cases: Vec<(&str, Setup, u64, Kind)> = vec![
        (
            "a machine never read, a pod needing an identity: read it",
            |s| s.pod("web-0", "payments"),
            0,
            Kind::Read { drift: false },
        ),
        (
            "the identity known to be there: record the pod Assigned, no read",
            |s| {
                s.input.wanted.push(wanted("web-0", "node-0", "payments", 1));
                s.known(0, &["payments"], 1);
            },
            10,
            Kind::Write(1),
        ),
        (
            "known for longer than the drift interval: read again before deciding",
            |s| {
                s.known(0, &["payments"], 1);
                s.pod("web-0", "payments");
            },
            180_000,
            Kind::Read { drift: false },
        ),
        (
            "an identity to add, first needed now: wait for the batch window",
            |s| {
                s.known(0, &[], 1);
                s.pod("web-0", "payments");
                assert_eq!(s.step(100), Kind::Write(1));
            },
            600,
            Kind::Wait(Some(ms(1100))),
        ),
        (
            "the batch window is over: one change, conditional on the tag",
            |s| {
                s.known(0, &[], 1);
                s.pod("web-0", "payments");
                s.pod("api-0", "orders");
                assert_eq!(s.step(100), Kind::Write(2));
            },
            1100,
            Kind::Patch {
                add: 2,
                remove: 0,
                if_match: tag(1),
            },
        ),
        (
            "nothing to do, records in place: wait for the drift check",
            |s| {
                s.input.wanted.push(wanted("web-0", "node-0", "payments", 1));
                s.known(0, &["payments"], 1);
                assert_eq!(s.step(10), Kind::Write(1));
            },
            20,
            Kind::Wait(Some(DRIFT)),
        ),
        (
            "the drift interval is over: read for the drift check",
            |s| {
                s.input.wanted.push(wanted("web-0", "node-0", "payments", 1));
                s.known(0, &["payments"], 1);
                assert_eq!(s.step(10), Kind::Write(1));
            },
            180_000,
            Kind::Read { drift: true },
        ),
        (
            "nothing wanted, nothing recorded: nothing to check, ever",
            |_| {},
            500_000,
            Kind::Wait(None),
        ),
        (
            "a machine ARM is deleting: left alone for a quarter drift interval at least",
            |s| {
                s.pod("web-0", "payments");
                assert_eq!(s.step(0), Kind::Read { drift: false });
                let mut deleting = machine(&[], Some(1));
                deleting.provisioning_state = Some("Deleting".into());
                s.answer(0, Ok(deleting));
            },
            0,
            Kind::Wait(Some(DRIFT / 4)),
        ),
        (
            "known without an entity tag: read right before an unconditional change",
            |s| {
                assert_eq!(s.step(0), Kind::Wait(None));
                s.input.wanted.push(wanted("web-0", "node-0", "payments", 1));
                assert_eq!(s.step(0), Kind::Read { drift: false });
                s.answer(0, Ok(machine(&[], None)));
                s.input.wanted.push(wanted("api-0", "node-0", "orders", 2));
                assert_eq!(s.step(100), Kind::Write(2));
                assert_eq!(s.step(200), Kind::Wait(Some(ms(1100))));
            },
            1100,
            Kind::Read { drift: false },
        ),
        (
            "the subscription's writes held: the change waits, reads do not",
            |s| {
                s.known(0, &[], 1);
                s.pod("web-0", "payments");
                assert_eq!(s.step(100), Kind::Write(1));
                s.writes_held = Some(s.at(5000));
            },
            1100,
            Kind::Wait(Some(ms(5000))),
        ),
        (
            "the subscription's reads held: the first read waits",
            |s| {
                s.pod("web-0", "payments");
                s.reads_held = Some(s.at(3000));
            },
            0,
            Kind::Wait(Some(ms(3000))),
        ),
    ];
    for (name, setup, at, expected) in cases {
        let mut sim = Sim::new();
        setup(&mut sim);
        assert_eq!(sim.step(at), expected, "{name}");
    }
}

#[test]
fn a_burst_makes_one_read_and_one_change_and_later_pods_need_no_call() {
    let mut s = Sim::new();
    s.pod("web-0", "payments");
    assert_eq!(s.step(0), Kind::Read { drift: false });
    // More pods while the read is in flight: one call at a time.
    s.pod("web-1", "payments");
    assert_eq!(s.step(50), Kind::Wait(None));
    s.answer(100, Ok(machine(&[], Some(7))));
    assert_eq!(s.step(100), Kind::Write(2), "records say `added` first");
    s.pod("api-0", "orders");
    assert_eq!(s.step(400), Kind::Write(1));
    assert_eq!(
        s.step(1100),
        Kind::Patch {
            add: 2,
            remove: 0,
            if_match: tag(7)
        },
        "one window after the first pod was known to need it"
    );
    s.answer(3000, Ok(machine(&["payments", "orders"], Some(8))));
    assert_eq!(s.step(3000), Kind::Write(3));
    assert_eq!(s.status("web-0"), Some(AssignmentStatus::Assigned));
    // Later pods of the same identities: a record each, no call.
    s.pod("web-2", "payments");
    assert_eq!(s.step(5000), Kind::Write(1));
    assert_eq!(s.status("web-2"), Some(AssignmentStatus::Assigned));
    assert_eq!(s.step(5000), Kind::Wait(Some(ms(3000) + DRIFT)));
    assert!(!s.schedule.busy());
}

#[test]
fn what_arrives_while_a_change_is_in_flight_joins_one_follow_up() {
    let mut s = Sim::new();
    s.known(0, &[], 1);
    s.pod("web-0", "payments");
    assert_eq!(s.step(0), Kind::Write(1));
    assert!(matches!(s.step(1000), Kind::Patch { add: 1, .. }));
    // In flight: a pod of the identity being added is left alone; pods of two new ones are recorded,
    // and wait.
    s.pod("web-1", "payments");
    s.pod("api-0", "orders");
    s.pod("db-0", "ledger");
    assert_eq!(s.step(1200), Kind::Write(2));
    assert_eq!(
        s.status("web-1"),
        None,
        "left alone while its identity is in flight"
    );
    assert_eq!(s.step(1300), Kind::Wait(None), "one change in flight at a time");
    s.answer(3500, Ok(machine(&["payments"], Some(2))));
    assert_eq!(
        s.step(3500),
        Kind::Write(2),
        "web-0 Assigned, web-1 recorded Assigned"
    );
    assert_eq!(
        s.step(3500),
        Kind::Patch {
            add: 2,
            remove: 0,
            if_match: tag(2)
        },
        "the follow-up goes at once: its pods waited longer than a window"
    );
}

#[test]
fn removals_wait_a_window_so_a_pod_replaced_at_once_costs_nothing() {
    let mut s = Sim::new();
    s.input.wanted.push(wanted("web-0", "node-0", "payments", 1));
    s.known(0, &[], 1);
    assert_eq!(s.settle(0), Kind::Wait(Some(WINDOW)));
    assert!(matches!(s.step(1000), Kind::Patch { add: 1, .. }));
    s.answer(1000, Ok(machine(&["payments"], Some(2))));
    assert_eq!(s.settle(1000), Kind::Wait(Some(ms(1000) + DRIFT)));
    // The pod goes and its replacement comes within the window: no call at all.
    s.pod_gone("web-0");
    assert_eq!(s.step(2000), Kind::Wait(Some(ms(3000))));
    s.pod("web-0b", "payments");
    assert_eq!(s.settle(2500), Kind::Wait(Some(ms(1000) + DRIFT)));
    // The last pod goes for good: one removal, a window later, then the records go.
    s.pod_gone("web-0b");
    assert_eq!(s.step(4000), Kind::Wait(Some(ms(5000))));
    assert_eq!(
        s.step(5000),
        Kind::Patch {
            add: 0,
            remove: 1,
            if_match: tag(2)
        }
    );
    s.answer(7000, Ok(machine(&[], Some(3))));
    assert_eq!(s.step(7000), Kind::Write(1), "its record released");
    assert_eq!(s.step(7000), Kind::Wait(None));
}

#[test]
fn a_young_removal_does_not_ride_along_with_an_addition() {
    let mut s = Sim::new();
    s.input.wanted.push(wanted("web-0", "node-0", "payments", 1));
    s.known(0, &[], 1);
    s.settle(0);
    assert!(matches!(s.step(1000), Kind::Patch { .. }));
    s.answer(1000, Ok(machine(&["payments"], Some(2))));
    s.settle(1000);
    s.pod("api-0", "orders");
    assert_eq!(s.step(2000), Kind::Write(1));
    s.pod_gone("web-0");
    assert_eq!(
        s.step(3000),
        Kind::Patch {
            add: 1,
            remove: 0,
            if_match: tag(2)
        },
        "the removal is 0 s old; the addition is due"
    );
}

#[test]
fn a_refusal_naming_no_identity_is_bisected_until_the_refused_one_is_alone() {
    let mut s = Sim::new();
    s.known(0, &[], 1);
    for (n, id) in ["a", "b", "c", "d"].iter().enumerate() {
        s.pod(&format!("p{n}"), id);
    }
    s.settle(0);
    let unnamed = || AzureError::IdentitiesRejected {
        identities: Vec::new(),
        code: "FailedIdentityOperation".into(),
        message: "an identity was not found".into(),
    };
    let mut sizes = Vec::new();
    let mut quarantined = Vec::new();
    let mut at = 1000;
    // "c" is the one ARM refuses.
    for _ in 0..8 {
        match s.settle(at) {
            Kind::Patch { add, .. } => {
                sizes.push(add);
                let Some(Call::Patch { delta, .. }) = &s.schedule.call else {
                    panic!("no change in flight")
                };
                let refused = delta.add.iter().any(|id| id == &identity_id("c"));
                let effects = if refused {
                    s.answer(at, Err(unnamed()))
                } else {
                    let now: Vec<String> = ["a", "b", "c", "d"]
                        .into_iter()
                        .filter(|n| {
                            delta.add.iter().any(|id| id == &identity_id(n))
                                || s.schedule
                                    .knowledge
                                    .as_ref()
                                    .is_some_and(|k| k.observed.has(&identity_id(n)))
                        })
                        .map(str::to_owned)
                        .collect();
                    let names: Vec<&str> = now.iter().map(String::as_str).collect();
                    s.answer(at, Ok(machine(&names, Some(at as u32))))
                };
                for (ids, _) in effects.quarantine {
                    quarantined.extend(ids.clone());
                    s.quarantined.extend(ids);
                }
            }
            Kind::Wait(_) => break,
            other => panic!("{other:?}"),
        }
        at += 100;
    }
    assert_eq!(quarantined, vec![identity_id("c")]);
    assert_eq!(
        sizes,
        vec![4, 2, 1, 1],
        "all, a half accepted, half of the rest alone, the rest"
    );
    assert_eq!(s.status("p3"), Some(AssignmentStatus::Assigned));
    assert_eq!(s.status("p2"), Some(AssignmentStatus::Created));
}

#[test]
fn throttling_holds_the_machine_and_a_subscription_wide_throttle_says_so() {
    let mut s = Sim::new();
    s.known(0, &[], 1);
    s.pod("web-0", "payments");
    s.settle(0);
    assert!(matches!(s.step(1000), Kind::Patch { .. }));
    let effects = s.answer(1100, Err(throttled(20, ThrottleScope::Resource)));
    assert_eq!(effects.subscription_hold, None);
    assert_eq!(s.step(1100), Kind::Wait(Some(ms(21_100))));
    s.pod("web-1", "payments");
    assert_eq!(
        s.settle(5000),
        Kind::Wait(Some(ms(21_100))),
        "woken early: nothing sent"
    );
    assert_eq!(
        s.step(21_100),
        Kind::Patch {
            add: 1,
            remove: 0,
            if_match: tag(1)
        },
        "what was known before the refusal still stands"
    );
    let effects = s.answer(21_200, Err(throttled(30, ThrottleScope::Subscription)));
    assert_eq!(effects.subscription_hold, Some((true, s.at(51_200))));
    assert!(
        matches!(effects.failed, Some((AzureError::Throttled { .. }, wait)) if wait >= Duration::from_secs(30))
    );
}

#[test]
fn a_change_of_unknown_outcome_is_read_again_and_failures_back_off_until_one_succeeds() {
    let mut s = Sim::new();
    s.known(0, &[], 1);
    s.pod("web-0", "payments");
    s.settle(0);
    let mut at = 1000;
    let mut waits = Vec::new();
    for _ in 0..3 {
        assert!(matches!(s.step(at), Kind::Patch { .. }), "at {at}");
        let effects = s.answer(
            at,
            Err(AzureError::Transient {
                status: None,
                code: "OperationTimeout".into(),
                message: "operation timed out".into(),
            }),
        );
        let (_, wait) = effects.failed.unwrap();
        waits.push(wait);
        at += ceil_ms(wait);
        // The outcome is unknown: the machine is read before the change is tried again; a read that
        // succeeds does not forget the failures.
        assert_eq!(s.step(at), Kind::Read { drift: false });
        s.answer(at, Ok(machine(&[], Some(1))));
    }
    assert!(waits[0] < waits[1] && waits[1] < waits[2], "{waits:?}");
    assert!(matches!(s.step(at), Kind::Patch { .. }));
    s.answer(at, Ok(machine(&["payments"], Some(2))));
    s.settle(at);
    assert!(!s.schedule.busy());
    assert_eq!(s.schedule.backoff.failures(), 0);
}

#[test]
fn a_412_is_read_again_at_once_and_a_second_one_backs_off() {
    let mut s = Sim::new();
    s.known(0, &[], 1);
    s.pod("web-0", "payments");
    s.settle(0);
    assert!(matches!(s.step(1000), Kind::Patch { .. }));
    let modified = || AzureError::Conflict {
        status: 412,
        code: "PreconditionFailed".into(),
        message: "412".into(),
    };
    assert_eq!(s.answer(1000, Err(modified())).failed, None);
    assert_eq!(s.step(1000), Kind::Read { drift: false });
    s.answer(1100, Ok(machine(&["other"], Some(5))));
    assert_eq!(
        s.step(1100),
        Kind::Patch {
            add: 1,
            remove: 0,
            if_match: tag(5)
        }
    );
    assert!(s.answer(1200, Err(modified())).failed.is_some());
    assert!(matches!(s.step(1200), Kind::Wait(Some(w)) if w > ms(1200)));
}

#[test]
fn a_failed_drift_check_is_tried_again_with_backoff_and_a_spent_budget_postpones_it() {
    let mut s = Sim::new();
    s.input.wanted.push(wanted("web-0", "node-0", "payments", 1));
    s.known(0, &["payments"], 1);
    s.settle(0);
    assert_eq!(s.step(180_000), Kind::Read { drift: true });
    s.schedule.postpone_drift(s.at(200_000));
    assert_eq!(s.step(180_000), Kind::Wait(Some(ms(200_000))));
    assert_eq!(s.step(200_000), Kind::Read { drift: true });
    let failure = || AzureError::Transient {
        status: Some(503),
        code: "ServiceUnavailable".into(),
        message: "503".into(),
    };
    let first = s.answer(200_000, Err(failure())).failed.unwrap().1;
    assert!(s.schedule.busy());
    let at = 200_000 + ceil_ms(first);
    assert_eq!(s.step(at), Kind::Read { drift: true });
    let second = s.answer(at, Err(failure())).failed.unwrap().1;
    assert!(second > first);
    let at = at + ceil_ms(second);
    assert_eq!(s.step(at), Kind::Read { drift: true });
    s.answer(at, Ok(machine(&["payments"], Some(1))));
    assert_eq!(s.step(at), Kind::Wait(Some(ms(at) + DRIFT)));
    assert!(!s.schedule.busy());
}

#[test]
fn failed_record_writes_wait_but_do_not_stop_arm() {
    let mut s = Sim::new();
    s.known(0, &[], 1);
    s.pod("web-0", "payments");
    let Step::Write(_) = s.next(0) else { panic!() };
    s.schedule.written(s.at(900), false);
    // The write is retried after the backoff; the planned change is not held up by it.
    assert!(matches!(s.step(100), Kind::Wait(Some(w)) if w > ms(100)));
    assert!(matches!(s.step(1000), Kind::Patch { add: 1, .. }));
}

#[test]
fn a_plan_that_keeps_proposing_the_same_writes_pauses() {
    let mut s = Sim::new();
    s.known(0, &[], 1);
    s.pod("web-0", "payments");
    // Writes that "succeed" without the input changing.
    for _ in 0..MAX_WRITE_STEPS {
        assert!(matches!(s.next(0), Step::Write(_)));
        s.schedule.written(s.at(0), true);
    }
    let Step::Wait(Some(until)) = s.next(0) else {
        panic!("not paused")
    };
    s.schedule.news();
    assert!(matches!(s.next(0), Step::Wait(_)), "the pause holds");
    let after = ceil_ms(until.saturating_duration_since(s.t0));
    assert!(matches!(s.next(after), Step::Write(_)), "then writes again");
}

#[test]
fn a_machine_that_vanished_holds_nothing_and_its_records_go_without_a_change() {
    let mut s = Sim::new();
    let w = wanted("web-0", "node-0", "payments", 1);
    s.input.recorded.push(recorded(
        &w,
        AssignmentStatus::Assigned,
        Origin::Added,
        Some(&pool().arm_id()),
    ));
    assert_eq!(s.step(0), Kind::Read { drift: false });
    s.answer(
        0,
        Err(AzureError::ResourceNotFound {
            code: "ResourceNotFound".into(),
            message: "gone".into(),
        }),
    );
    assert_eq!(s.step(0), Kind::Write(1));
    assert!(s.input.recorded.is_empty());
    assert_eq!(s.step(0), Kind::Wait(None));
    assert!(!s.schedule.busy());
}

#[test]
fn a_scale_down_whose_identities_go_far_apart_makes_one_removal_while_its_pods_keep_going() {
    // "a" has one pod, "b" ten: a scale-down takes "a" first, and "b" only with its last pod, 2 s later.
    let mut s = Sim::new();
    s.pod("a-0", "a");
    for n in 0..10 {
        s.pod(&format!("b-{n}"), "b");
    }
    s.known(0, &[], 1);
    s.settle(0);
    assert!(matches!(s.step(1000), Kind::Patch { add: 2, .. }));
    s.answer(1000, Ok(machine(&["a", "b"], Some(2))));
    s.settle(1000);
    let mut at = 2000;
    s.pod_gone("a-0");
    assert_eq!(s.settle(at), Kind::Wait(Some(ms(at + 1000))));
    for n in 0..10 {
        at += 200;
        s.pod_gone(&format!("b-{n}"));
        assert_eq!(
            s.settle(at),
            Kind::Wait(Some(ms(at + 1000))),
            "pods still leave at {at}: \"a\" waits for them"
        );
    }
    assert_eq!(
        s.step(at + 1000),
        Kind::Patch {
            add: 0,
            remove: 2,
            if_match: tag(2)
        },
        "one removal, a window after the last pod went"
    );
}

#[test]
fn pods_going_one_after_another_make_one_removal_once_they_stop_or_after_30_s() {
    let names: Vec<String> = (0..40).map(|n| format!("id{n}")).collect();
    let mut s = Sim::new();
    for (n, id) in names.iter().enumerate() {
        s.input
            .wanted
            .push(wanted(&format!("p{n}"), "node-0", id, n as u8));
    }
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    s.known(0, &[], 1);
    s.settle(0);
    assert!(matches!(s.step(1000), Kind::Patch { add: 40, .. }));
    s.answer(1000, Ok(machine(&all, Some(1))));
    s.settle(1000);
    // A scale-down: a pod (and its identity) goes every 200 ms for 4 s; nothing is sent meanwhile.
    let mut at = 2000;
    for n in 0..20 {
        s.pod_gone(&format!("p{n}"));
        assert!(
            matches!(s.settle(at), Kind::Wait(Some(w)) if w == ms(at + 1000)),
            "at {at}"
        );
        at += 200;
    }
    let last = at - 200;
    assert_eq!(
        s.step(last + 1000),
        Kind::Patch {
            add: 0,
            remove: 20,
            if_match: tag(1)
        },
        "one removal, a window after the last pod went"
    );
    s.answer(last + 3000, Ok(machine(&all[20..], Some(2))));
    s.settle(last + 3000);
    // Pods that keep going for longer than 30 s: removed 30 s after the first, in one request.
    let start = last + 10_000;
    let mut at = start;
    for n in 20..40 {
        s.pod_gone(&format!("p{n}"));
        match s.settle(at) {
            Kind::Wait(Some(w)) => assert!(w <= ms(start + 30_000), "at {at}: {w:?}"),
            Kind::Patch { remove, .. } => {
                // Every identity gone for a window at least; the one gone this instant waits its window.
                assert_eq!((at, remove), (start + 30_000, n - 20));
                return;
            }
            other => panic!("{other:?}"),
        }
        at += 2000;
    }
    panic!("never removed");
}

#[test]
fn a_change_whose_answer_was_lost_is_read_until_arm_has_applied_it_and_only_then_assigned() {
    let mut s = Sim::new();
    s.known(0, &[], 1);
    s.pod("web-0", "payments");
    s.settle(0);
    assert!(matches!(s.step(1000), Kind::Patch { add: 1, .. }));
    // Polling the operation failed: the outcome is unknown, and the machine is read after the backoff.
    let effects = s.answer(
        1000,
        Err(AzureError::Transient {
            status: None,
            code: "ConnectionReset".into(),
            message: "connection reset".into(),
        }),
    );
    let at = 1000 + ceil_ms(effects.failed.unwrap().1);
    assert_eq!(s.step(at), Kind::Read { drift: false });
    let updating = Observed {
        provisioning_state: Some("Updating".into()),
        ..machine(&["payments"], Some(2))
    };
    s.answer(at, Ok(updating.clone()));
    // ARM still applies it: no write, no second PATCH; the next read one poll interval later.
    let poll = SETTLE_POLL_INTERVAL.as_millis() as u64;
    assert_eq!(s.step(at), Kind::Wait(Some(ms(at + poll))));
    assert_eq!(s.status("web-0"), Some(AssignmentStatus::Created));
    assert!(s.schedule.busy());
    assert_eq!(s.step(at + poll), Kind::Read { drift: false });
    s.answer(at + poll, Ok(updating));
    assert_eq!(s.step(at + poll), Kind::Wait(Some(ms(at + 2 * poll))));
    assert_eq!(s.status("web-0"), Some(AssignmentStatus::Created));
    assert_eq!(s.step(at + 2 * poll), Kind::Read { drift: false });
    // Done: Assigned, with no change sent.
    s.answer(at + 2 * poll, Ok(machine(&["payments"], Some(3))));
    assert_eq!(s.step(at + 2 * poll), Kind::Write(1));
    assert_eq!(s.status("web-0"), Some(AssignmentStatus::Assigned));
    assert!(matches!(s.step(at + 2 * poll), Kind::Wait(_)));
    assert!(!s.schedule.busy());
}
