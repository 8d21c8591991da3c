//! One worker per VM or scale set: the I/O shell around its [`Schedule`]. It asks the schedule what to
//! do, does it (record writes to the Kubernetes API, one ARM call at a time in a task of its own), and
//! reports back; between steps it waits for its input to change, its ARM call to return, or the
//! schedule's next deadline. Every decision (when to read, when to send which change, holds, backoff,
//! bisection) is the schedule's.
//!
//! Workers are generic over ARM ([`ComputeApi`]) and the Kubernetes API ([`RecordStore`]), so a whole
//! worker is tested with in-memory implementations of both.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use futures::{StreamExt, future::BoxFuture, stream};
use pod_identity_api::{AzureAssignedIdentity, ObjectKey};
use pod_identity_azure::{AzureError, IdentityDelta, RetryPolicy, resource_id::fold};
use serde_json::Value;
use tokio::{sync::watch, task::JoinSet};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    arm::{ComputeApi, Observed},
    backoff::{Quarantine, ReadBudget, SubscriptionHolds},
    events::{Events, Notice, Subject},
    leader::Leadership,
    machine::Target,
    metrics::Metrics,
    plan::{MachineInput, Protection, Transition, Write},
    record::Recorded,
    schedule::{Effects, Facts, Schedule, Step},
};

/// Why a write to the Kubernetes API failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum WriteError {
    /// The object changed since we read it.
    #[error("the object changed since it was read")]
    Conflict,
    /// The object is gone.
    #[error("the object does not exist")]
    NotFound,
    /// An object of that name exists; here it is.
    #[error("an object of that name exists")]
    Exists(Box<Recorded>),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl WriteError {
    fn label(&self) -> &'static str {
        match self {
            Self::Conflict => "conflict",
            Self::NotFound => "not_found",
            Self::Exists(_) => "exists",
            Self::Other(_) => "error",
        }
    }
}

/// Writing assignment objects.
pub trait RecordStore: Send + Sync {
    /// Creates an object.
    fn create<'a>(&'a self, object: &'a AzureAssignedIdentity)
    -> BoxFuture<'a, Result<Recorded, WriteError>>;
    /// Merge-patches an object.
    fn patch<'a>(
        &'a self,
        key: &'a ObjectKey,
        patch: &'a Value,
    ) -> BoxFuture<'a, Result<Recorded, WriteError>>;
    /// Marks an object `Unassigned`, drops our finalizer (keeping `other_finalizers`) and deletes it.
    fn release<'a>(
        &'a self,
        key: &'a ObjectKey,
        resource_version: Option<&'a str>,
        uid: Option<&'a str>,
        other_finalizers: &'a [String],
    ) -> BoxFuture<'a, Result<(), WriteError>>;
}

/// Timing of workers.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// How long an identity to add waits for others to join its request (and an identity to remove
    /// at least waits), from the moment it is first needed (or no longer needed).
    pub batch_window: Duration,
    /// Waits after failed ARM calls (the retry count does not apply: a worker retries while it runs).
    pub retry: RetryPolicy,
    /// How often a machine's identities are read to find ones someone removed.
    pub drift_interval: Duration,
    /// How many writes to the Kubernetes API a worker runs at once.
    pub write_concurrency: usize,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            batch_window: Duration::from_secs(1),
            retry: RetryPolicy {
                initial_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(300),
                ..RetryPolicy::default()
            },
            drift_interval: Duration::from_secs(180),
            write_concurrency: 20,
        }
    }
}

/// What all workers share.
pub struct Shared {
    /// ARM.
    pub compute: Arc<dyn ComputeApi>,
    /// The Kubernetes API.
    pub records: Arc<dyn RecordStore>,
    /// Identities ARM refused.
    pub quarantine: Mutex<Quarantine>,
    /// Reads spent on drift checks.
    pub drift_budget: Mutex<ReadBudget>,
    /// Subscriptions ARM throttled as a whole.
    pub holds: Mutex<SubscriptionHolds>,
    /// What retired workers knew of their machines, and since when, for the next worker of the machine.
    pub last_known: Mutex<HashMap<Target, (Observed, Instant)>>,
    /// Identities never removed.
    pub protection: Protection,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Events.
    pub events: Events,
    /// Whether this replica may write.
    pub leadership: Leadership,
    /// Timing.
    pub settings: WorkerSettings,
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the data stays consistent:
/// no critical section leaves it half-updated).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long a worker pauses while leadership is being lost.
const NOT_LEADER_PAUSE: Duration = Duration::from_millis(500);
/// How long our own writes are laid over the planner's input while the watch catches up.
const OVERLAY_TTL: Duration = Duration::from_secs(30);

/// Our own writes, until the input shows them.
#[derive(Default)]
struct Overlay {
    entries: HashMap<ObjectKey, (Option<Recorded>, Instant)>,
}

impl Overlay {
    fn written(&mut self, recorded: Recorded, now: Instant) {
        self.entries.insert(recorded.key.clone(), (Some(recorded), now));
    }

    fn deleted(&mut self, key: ObjectKey, now: Instant) {
        self.entries.insert(key, (None, now));
    }

    fn forget(&mut self, key: &ObjectKey) {
        self.entries.remove(key);
    }

    fn apply(&mut self, input: &mut MachineInput, now: Instant) {
        self.entries.retain(|key, (ours, at)| {
            if now.saturating_duration_since(*at) > OVERLAY_TTL {
                return false;
            }
            let seen = input.recorded.iter().find(|r| &r.key == key);
            match (ours, seen) {
                (Some(ours), Some(seen)) if seen.resource_version == ours.resource_version => false,
                (None, None) => false,
                (Some(ours), _) => {
                    input.record(ours.clone());
                    true
                }
                (None, Some(_)) => {
                    input.forget(key);
                    true
                }
            }
        });
    }
}

/// A write and how it went (`None`: the object is gone).
type WriteOutcome<'a> = (&'a Write, Result<Option<Recorded>, WriteError>);

/// ARM's answer to the call in flight.
type Answer = Result<Observed, AzureError>;

/// The worker of one machine.
pub struct Worker {
    target: Target,
    shared: Arc<Shared>,
    schedule: Schedule,
    overlay: Overlay,
    queued: bool,
}

impl Worker {
    /// A worker for `target`.
    pub fn new(target: Target, shared: Arc<Shared>) -> Self {
        let settings = &shared.settings;
        let known = lock(&shared.last_known).remove(&target);
        let schedule = Schedule::new(
            settings.batch_window,
            settings.drift_interval,
            settings.retry.backoff(),
            Instant::now(),
            fastrand::f64(),
        )
        .with_known(known);
        Self {
            target,
            shared,
            schedule,
            overlay: Overlay::default(),
            queued: false,
        }
    }

    /// Runs until the planner drops the sender (the machine has nothing wanted or recorded, or this
    /// replica stopped leading); an ARM call still in flight is then abandoned.
    pub async fn run(mut self, mut input_rx: watch::Receiver<MachineInput>) {
        let span = info_span!("machine", machine = %self.target);
        let mut input = self.refresh(&mut input_rx);
        let mut calls: JoinSet<Answer> = JoinSet::new();
        loop {
            match input_rx.has_changed() {
                Ok(true) => input = self.refresh(&mut input_rx),
                Ok(false) => {}
                Err(_) => break,
            }
            if !self.shared.leadership.is_leader() {
                // Leadership is being lost; the planner stops this worker shortly.
                tokio::time::sleep(NOT_LEADER_PAUSE).await;
                continue;
            }
            let step = self.step(&input);
            match step {
                Step::Write(writes) => {
                    let ok = self.execute(&mut input, &writes).instrument(span.clone()).await;
                    self.schedule.written(Instant::now(), ok);
                }
                Step::Read { drift } => {
                    if let Some(call) = self.read(drift) {
                        calls.spawn(call.instrument(span.clone()));
                    }
                }
                Step::Patch { delta, if_match } => {
                    calls.spawn(self.patch(delta, if_match).instrument(span.clone()));
                }
                Step::Wait(until) => {
                    let until = earliest(until, self.quarantine_release(&input));
                    tokio::select! {
                        changed = input_rx.changed() => {
                            if changed.is_err() {
                                break;
                            }
                            input = self.refresh(&mut input_rx);
                        }
                        Some(joined) = calls.join_next() => {
                            let answer = joined.unwrap_or_else(|err| {
                                Err(AzureError::InvalidResponse(format!("the ARM call ended: {err}")))
                            });
                            let _entered = span.enter();
                            self.answered(&input, answer);
                        }
                        () = tokio::time::sleep_until(until.unwrap_or_else(|| far_future(Instant::now())).into()),
                            if until.is_some() => {}
                    }
                }
            }
        }
        if self.queued {
            self.shared.metrics.queue_depth.dec();
        }
        if let Some(known) = self.schedule.known() {
            let now = Instant::now();
            let fresh = self.shared.settings.drift_interval;
            let mut last_known = lock(&self.shared.last_known);
            last_known.retain(|_, (_, at)| now.saturating_duration_since(*at) < fresh);
            last_known.insert(self.target.clone(), known);
        }
    }

    /// The planner's latest input, with our own writes laid over it.
    fn refresh(&mut self, input_rx: &mut watch::Receiver<MachineInput>) -> MachineInput {
        let mut input = input_rx.borrow_and_update().clone();
        self.overlay.apply(&mut input, Instant::now());
        self.schedule.news();
        input
    }

    /// Asks the schedule what to do now, and keeps the work-queue gauge in line with its answer.
    fn step(&mut self, input: &MachineInput) -> Step {
        let now = Instant::now();
        let subscription = match &self.target {
            Target::Azure(machine) => machine.subscription.as_str(),
            Target::NoAzure => "",
        };
        let (reads_held, writes_held) = {
            let holds = lock(&self.shared.holds);
            (
                holds.until(subscription, false, now),
                holds.until(subscription, true, now),
            )
        };
        let step = {
            let quarantine = lock(&self.shared.quarantine);
            let reason = |key: &str| quarantine.reason(key, now);
            self.schedule.next(
                input,
                &Facts {
                    quarantine: &reason,
                    protection: &self.shared.protection,
                    reads_held,
                    writes_held,
                },
                now,
            )
        };
        match (self.schedule.busy(), self.queued) {
            (true, false) => {
                self.shared.metrics.queue_depth.inc();
            }
            (false, true) => {
                self.shared.metrics.queue_depth.dec();
            }
            _ => {}
        }
        self.queued = self.schedule.busy();
        step
    }

    /// The read the schedule asked for, unless the drift check's budget is spent (the schedule then
    /// tries again when it has one).
    fn read(&mut self, drift: bool) -> Option<impl Future<Output = Answer> + use<>> {
        let Target::Azure(machine) = self.target.clone() else {
            return None;
        };
        if drift {
            let now = Instant::now();
            if let Err(wait) = lock(&self.shared.drift_budget).take(now) {
                self.schedule.postpone_drift(now + wait);
                return None;
            }
        }
        let shared = self.shared.clone();
        Some(async move {
            let result = shared.compute.get(&machine).await;
            let status = result.as_ref().map_or_else(AzureError::label, |_| "ok");
            shared
                .metrics
                .arm_call(&format!("{}_get", machine.kind.label()), status);
            result
        })
    }

    /// The change the schedule asked for.
    fn patch(&self, delta: IdentityDelta, if_match: Option<String>) -> impl Future<Output = Answer> + use<> {
        let target = self.target.clone();
        let shared = self.shared.clone();
        async move {
            let Target::Azure(machine) = target else {
                return Err(AzureError::Config("no Azure machine to change".into()));
            };
            info!(
                add = delta.add.len(),
                remove = delta.remove.len(),
                conditional = if_match.is_some(),
                "updating identities"
            );
            let result = shared.compute.patch(&machine, &delta, if_match.as_deref()).await;
            let status = result.as_ref().map_or_else(AzureError::label, |_| "ok");
            shared
                .metrics
                .arm_call(&format!("{}_patch", machine.kind.label()), status);
            result
        }
    }

    /// Hands ARM's answer to the schedule and does what it says besides.
    fn answered(&mut self, input: &MachineInput, answer: Answer) {
        let effects = self.schedule.answered(Instant::now(), answer);
        self.apply(input, effects);
    }

    fn apply(&mut self, input: &MachineInput, effects: Effects) {
        for (ids, reason) in &effects.quarantine {
            self.quarantine(input, ids, reason);
        }
        if !effects.accepted.is_empty() {
            self.accepted(&effects.accepted);
        }
        if effects.repaired > 0 {
            self.shared.metrics.drift_repairs.inc_by(effects.repaired as u64);
        }
        if let (Some((write, until)), Target::Azure(machine)) = (effects.subscription_hold, &self.target) {
            lock(&self.shared.holds).hold(&machine.subscription, write, until);
        }
        match &effects.failed {
            Some((err @ AzureError::Throttled { .. }, wait)) => {
                info!(error = %err, wait_ms = wait.as_millis() as u64, "throttled by ARM");
            }
            Some((err, wait)) => warn!(error = %err, wait_ms = wait.as_millis() as u64, "ARM call failed"),
            None => {}
        }
    }

    /// When a quarantined identity this machine needs may be tried again.
    fn quarantine_release(&self, input: &MachineInput) -> Option<Instant> {
        let keys: Vec<String> = input.wanted.iter().filter_map(|w| w.identity_key()).collect();
        lock(&self.shared.quarantine).next_release(keys.iter().map(String::as_str), Instant::now())
    }

    /// Identities ARM accepted leave quarantine.
    fn accepted(&self, added: &[String]) {
        let mut quarantine = lock(&self.shared.quarantine);
        for id in added {
            quarantine.clear(&fold(id));
        }
        self.shared
            .metrics
            .quarantined_identities
            .set(quarantine.active(Instant::now()) as i64);
    }

    /// Quarantines identities ARM refused and tells the bindings and identities that use them.
    fn quarantine(&self, input: &MachineInput, ids: &[String], reason: &str) {
        let now = Instant::now();
        let mut fresh_ids = Vec::new();
        {
            let mut quarantine = lock(&self.shared.quarantine);
            for id in ids {
                let (fresh, period) = quarantine.add(&fold(id), reason, now);
                warn!(identity = %id, period_s = period.as_secs(), reason, "identity quarantined");
                if fresh {
                    fresh_ids.push(fold(id));
                }
            }
            self.shared
                .metrics
                .quarantined_identities
                .set(quarantine.active(now) as i64);
        }
        let mut told: BTreeSet<(bool, ObjectKey)> = BTreeSet::new();
        for wanted in &input.wanted {
            if wanted.identity_key().is_some_and(|k| fresh_ids.contains(&k)) {
                told.insert((true, wanted.identity.clone()));
                told.insert((false, wanted.binding.clone()));
            }
        }
        for (identity, key) in told {
            self.shared.events.publish(Notice {
                subject: if identity {
                    Subject::Identity(key)
                } else {
                    Subject::Binding(key)
                },
                warning: true,
                reason: "IdentityQuarantined",
                action: "AssignIdentity",
                note: format!(
                    "ARM refused the identity on {}; it is left out of requests for now: {reason}",
                    self.target
                ),
            });
        }
    }

    /// Runs writes; creates and patches first (concurrently), then releases. Folds results into
    /// `input`; returns whether all succeeded.
    async fn execute(&mut self, input: &mut MachineInput, writes: &[Write]) -> bool {
        if writes.is_empty() {
            return true;
        }
        if !self.shared.leadership.is_leader() {
            return false;
        }
        let (releases, others): (Vec<&Write>, Vec<&Write>) =
            writes.iter().partition(|w| matches!(w, Write::Release { .. }));
        let mut all_ok = true;
        for batch in [others, releases] {
            let this: &Self = self;
            let pending: Vec<BoxFuture<'_, WriteOutcome<'_>>> = batch
                .into_iter()
                .map(|write| -> BoxFuture<'_, _> {
                    Box::pin(async move { (write, this.write_one(write).await) })
                })
                .collect();
            let results: Vec<WriteOutcome<'_>> = stream::iter(pending)
                .buffer_unordered(this.shared.settings.write_concurrency.max(1))
                .collect()
                .await;
            let now = Instant::now();
            for (write, result) in results {
                let (operation, key) = match write {
                    Write::Create { object, .. } => (
                        "create",
                        ObjectKey::new(
                            object.metadata.namespace.clone().unwrap_or_default(),
                            object.metadata.name.clone().unwrap_or_default(),
                        ),
                    ),
                    Write::Patch { key, .. } => ("patch", key.clone()),
                    Write::Release { key, .. } => ("release", key.clone()),
                };
                match result {
                    Ok(Some(recorded)) => {
                        self.shared.metrics.kube_write(operation, "ok");
                        self.overlay.written(recorded.clone(), now);
                        input.record(recorded);
                        self.transitioned(write);
                    }
                    Ok(None) => {
                        self.shared.metrics.kube_write(operation, "ok");
                        self.overlay.deleted(key.clone(), now);
                        input.forget(&key);
                    }
                    Err(WriteError::Exists(recorded)) => {
                        self.shared.metrics.kube_write(operation, "exists");
                        debug!(assignment = %key, "already exists; adopting it");
                        self.overlay.written((*recorded).clone(), now);
                        input.record(*recorded);
                        all_ok = false;
                    }
                    Err(WriteError::NotFound) if operation == "release" => {
                        self.shared.metrics.kube_write(operation, "not_found");
                        self.overlay.deleted(key.clone(), now);
                        input.forget(&key);
                    }
                    Err(err) => {
                        self.shared.metrics.kube_write(operation, err.label());
                        debug!(assignment = %key, error = %err, operation, "write failed");
                        self.overlay.forget(&key);
                        all_ok = false;
                    }
                }
            }
        }
        all_ok
    }

    async fn write_one(&self, write: &Write) -> Result<Option<Recorded>, WriteError> {
        let records = &self.shared.records;
        match write {
            Write::Create { object, .. } => records.create(object).await.map(Some),
            Write::Patch { key, patch, .. } => records.patch(key, patch).await.map(Some),
            Write::Release {
                key,
                resource_version,
                uid,
                other_finalizers,
            } => records
                .release(key, resource_version.as_deref(), uid.as_deref(), other_finalizers)
                .await
                .map(|()| None),
        }
    }

    /// Metrics and events of a write that succeeded.
    fn transitioned(&self, write: &Write) {
        let transition = match write {
            Write::Create { transition, .. } | Write::Patch { transition, .. } => transition.as_ref(),
            Write::Release { .. } => None,
        };
        if let Some(Transition::Assigned(wanted) | Transition::Quarantined { wanted, .. }) = transition
            && crate::prewarm::is_warm(wanted)
        {
            info!(identity = %wanted.identity, machine = %self.target, warm = true, "warm identity {}", if matches!(transition, Some(Transition::Assigned(_))) { "assigned" } else { "quarantined" });
            return;
        }
        match transition {
            Some(Transition::Assigned(wanted)) => {
                if let Some(scheduled) = wanted.scheduled_at {
                    let latency = jiff::Timestamp::now().duration_since(scheduled).as_secs_f64();
                    self.shared.metrics.assignment_latency.observe(latency.max(0.0));
                }
                info!(pod = %wanted.pod, identity = %wanted.identity, node = %wanted.node, "identity assigned");
                self.shared.events.publish(Notice {
                    subject: Subject::Pod(wanted.pod.clone()),
                    warning: false,
                    reason: "IdentityAssigned",
                    action: "AssignIdentity",
                    note: format!("Identity {} is assigned on {}", wanted.identity, self.target),
                });
            }
            Some(Transition::Quarantined { wanted, reason }) => {
                self.shared.events.publish(Notice {
                    subject: Subject::Pod(wanted.pod.clone()),
                    warning: true,
                    reason: "IdentityNotAssigned",
                    action: "AssignIdentity",
                    note: format!(
                        "Identity {} cannot be assigned on {}: {reason}",
                        wanted.identity, self.target
                    ),
                });
            }
            None => {}
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(365 * 24 * 3600)
}

#[cfg(test)]
mod tests;
