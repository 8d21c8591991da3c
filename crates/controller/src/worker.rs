//! One worker per VM or scale set: waits for its input to change, lets changes gather for a batch
//! window, then runs a round: plan, write what is safe, one ARM request for everything pending (split
//! at 150 identities), plan again with ARM's answer. ARM failures decide when the next round runs:
//! never before ARM's `Retry-After`, otherwise exponential backoff with jitter. Identities ARM refuses
//! are quarantined and the rest of the request goes through at once.
//!
//! Workers are generic over ARM ([`ComputeApi`]) and the Kubernetes API ([`RecordStore`]), so a whole
//! round is tested with in-memory implementations of both.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use futures::{StreamExt, future::BoxFuture, stream};
use pod_identity_api::{AzureAssignedIdentity, ObjectKey};
use pod_identity_azure::{
    AzureError, IdentityDelta, Machine, RetryPolicy, error::named_in, resource_id::fold, retry::Backoff,
};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    arm::{ComputeApi, Observed},
    backoff::{Quarantine, ReadBudget},
    events::{Events, Notice, Subject},
    leader::Leadership,
    machine::Target,
    metrics::Metrics,
    plan::{Context, MachineInput, Plan, Protection, Transition, Write, plan},
    record::Recorded,
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
    /// How long changes gather before a round.
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

/// How a round ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything is as it should be.
    Settled,
    /// Run again after this long.
    Retry(Duration),
    /// This replica is not the leader any more.
    NotLeader,
}

/// The largest number of plan steps in one round; each step is one write batch and at most one ARM
/// request per 150 identities, so a round never loops on a confused machine.
const MAX_STEPS: usize = 8;
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

/// The worker of one machine.
pub struct Worker {
    target: Target,
    shared: Arc<Shared>,
    backoff: Backoff,
    overlay: Overlay,
}

impl Worker {
    /// A worker for `target`.
    pub fn new(target: Target, shared: Arc<Shared>) -> Self {
        let backoff = shared.settings.retry.backoff();
        Self {
            target,
            shared,
            backoff,
            overlay: Overlay::default(),
        }
    }

    /// Runs until the planner drops the sender.
    pub async fn run(mut self, mut input_rx: watch::Receiver<MachineInput>) {
        let settings = self.shared.settings.clone();
        let mut retry_at: Option<Instant> = None;
        let mut pending = true;
        let mut queued = false;
        let mut drift_at = Instant::now() + jittered(settings.drift_interval);
        loop {
            let now = Instant::now();
            if pending && !queued {
                self.shared.metrics.queue_depth.inc();
                queued = true;
            }
            let wake = if pending {
                retry_at.unwrap_or(now)
            } else {
                far_future(now)
            };
            let quarantine_at = self.quarantine_release(&input_rx.borrow(), now);
            let drift_check =
                matches!(self.target, Target::Azure(_)) && !input_rx.borrow().recorded.is_empty();
            let mut force_read = false;
            tokio::select! {
                changed = input_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    pending = true;
                    // Let more changes gather, but never run before ARM's Retry-After.
                    let until = (Instant::now() + settings.batch_window).max(retry_at.unwrap_or(now));
                    tokio::time::sleep_until(until.into()).await;
                }
                () = tokio::time::sleep_until(wake.into()), if pending => {}
                () = tokio::time::sleep_until(drift_at.into()), if drift_check && !pending => {
                    let budget = lock(&self.shared.drift_budget).take(Instant::now());
                    match budget {
                        Ok(()) => {
                            force_read = true;
                            pending = true;
                            drift_at = Instant::now() + jittered(settings.drift_interval);
                        }
                        Err(wait) => {
                            drift_at = Instant::now() + wait;
                            continue;
                        }
                    }
                }
                () = tokio::time::sleep_until(quarantine_at.unwrap_or_else(|| far_future(now)).into()),
                    if quarantine_at.is_some() && !pending => {
                    pending = true;
                }
            }
            if !self.shared.leadership.is_leader() {
                // Leadership is being lost; the planner stops this worker shortly.
                tokio::time::sleep(NOT_LEADER_PAUSE).await;
                continue;
            }
            let mut input = input_rx.borrow_and_update().clone();
            self.overlay.apply(&mut input, Instant::now());
            let started = Instant::now();
            let span = info_span!("round", machine = %self.target);
            let outcome = self.round(&mut input, force_read).instrument(span).await;
            self.shared
                .metrics
                .reconciled("machine", started.elapsed().as_secs_f64());
            match outcome {
                Outcome::Settled => {
                    pending = false;
                    retry_at = None;
                    self.backoff.reset();
                }
                Outcome::Retry(wait) => {
                    retry_at = Some(Instant::now() + wait);
                }
                Outcome::NotLeader => {
                    retry_at = Some(Instant::now() + NOT_LEADER_PAUSE);
                }
            }
            if !pending && queued {
                self.shared.metrics.queue_depth.dec();
                queued = false;
            }
        }
        if queued {
            self.shared.metrics.queue_depth.dec();
        }
    }

    /// When a quarantined identity this machine needs may be tried again.
    fn quarantine_release(&self, input: &MachineInput, now: Instant) -> Option<Instant> {
        let keys: Vec<String> = input.wanted.iter().filter_map(|w| w.identity_key()).collect();
        lock(&self.shared.quarantine).next_release(keys.iter().map(String::as_str), now)
    }

    /// One round; `read_first` reads the machine even if nothing seems to need it (drift check).
    pub async fn round(&mut self, input: &mut MachineInput, read_first: bool) -> Outcome {
        let machine = match &self.target {
            Target::Azure(machine) => Some(machine.clone()),
            Target::NoAzure => None,
        };
        let mut observed: Option<Observed> = None;
        if read_first && let Some(machine) = &machine {
            match self.observe(machine).await {
                Ok(o) => observed = Some(o),
                Err(err) => return self.failed(&err),
            }
        }
        let drift_check = read_first;
        let mut write_failed = false;
        // Additions known to include one ARM refuses without naming it: probed half by half.
        let mut suspects: Option<Vec<String>> = None;
        let mut settled = false;
        for _ in 0..MAX_STEPS {
            if !self.shared.leadership.is_leader() {
                return Outcome::NotLeader;
            }
            let now = Instant::now();
            let plan = {
                let quarantine = lock(&self.shared.quarantine);
                let reason = |key: &str| quarantine.reason(key, now);
                plan(
                    input,
                    &Context {
                        observed: observed.as_ref(),
                        quarantine: &reason,
                        protection: &self.shared.protection,
                    },
                )
            };
            if plan.deferred {
                info!("the machine is being deleted; leaving it alone");
                let wait = self.backoff.next(None);
                return Outcome::Retry(wait.max(self.shared.settings.drift_interval / 4));
            }
            if plan.needs_observation && observed.is_none() {
                let Some(machine) = &machine else {
                    settled = true;
                    break;
                };
                match self.observe(machine).await {
                    Ok(o) => {
                        observed = Some(o);
                        continue;
                    }
                    Err(err) => {
                        // Releases that need no ARM knowledge still happen.
                        self.execute(input, &plan).await;
                        return self.failed(&err);
                    }
                }
            }
            write_failed |= !self.execute(input, &plan).await;
            let (Some(machine), false) = (&machine, plan.delta.is_empty()) else {
                settled = true;
                break;
            };
            let mut delta = plan.delta.clone();
            let probe: Option<Vec<String>> = suspects.as_ref().map(|s| {
                let half: Vec<String> = s[..s.len().div_ceil(2)].to_vec();
                let keys: BTreeSet<String> = half.iter().map(|id| fold(id)).collect();
                delta.add.retain(|id| keys.contains(&fold(id)));
                half
            });
            for chunk in delta.requests() {
                if !self.shared.leadership.is_leader() {
                    return Outcome::NotLeader;
                }
                // Conditional on what the plan was made from, where the client supports it.
                let etag = observed.as_ref().and_then(|o| o.etag.clone());
                match self.write(machine, &chunk, etag.as_deref()).await {
                    Ok(after) => {
                        self.accepted(&chunk.add);
                        if drift_check && !chunk.add.is_empty() {
                            self.shared.metrics.drift_repairs.inc_by(chunk.add.len() as u64);
                        }
                        observed = Some(after);
                        if let (Some(all), Some(probe)) = (&suspects, &probe) {
                            // The refused one is among the rest; alone, it is found.
                            let rest: Vec<String> =
                                all.iter().filter(|id| !probe.contains(id)).cloned().collect();
                            suspects = None;
                            match rest.as_slice() {
                                [] => {}
                                [one] => {
                                    self.quarantine(input, std::slice::from_ref(one), &refused_unnamed())
                                }
                                _ => suspects = Some(rest),
                            }
                        }
                    }
                    Err(AzureError::IdentitiesRejected {
                        identities: ids,
                        code,
                        message,
                    }) => {
                        let named = if ids.is_empty() {
                            named_in(&message, &chunk.add)
                        } else {
                            ids
                        };
                        let reason = format!("{code}: {message}");
                        suspects = None;
                        if !named.is_empty() {
                            self.quarantine(input, &named, &reason);
                        } else if chunk.add.len() == 1 {
                            self.quarantine(input, &chunk.add, &reason);
                        } else if !chunk.add.is_empty() {
                            suspects = Some(chunk.add.clone());
                        } else {
                            return self.failed(&AzureError::InvalidResponse(reason));
                        }
                        // The machine is unchanged; plan again without the refused identities.
                        break;
                    }
                    Err(AzureError::ResourceNotFound { message, .. }) => {
                        // Deleted since it was read: plan again for a machine that holds nothing.
                        info!(reason = %message, "the machine does not exist any more");
                        observed = Some(Observed::absent(message));
                        break;
                    }
                    Err(err) => {
                        // A conflict means someone changed the machine; the next round reads it again.
                        return self.failed(&err);
                    }
                }
            }
        }
        if write_failed || !settled {
            return Outcome::Retry(self.backoff.next(None));
        }
        Outcome::Settled
    }

    /// Reads the machine; a machine ARM says does not exist is observed as holding nothing, so that its
    /// records are released instead of the read being retried for ever.
    async fn observe(&self, machine: &Machine) -> Result<Observed, AzureError> {
        match self.read(machine).await {
            Err(AzureError::ResourceNotFound { message, .. }) => {
                info!(reason = %message, "the machine does not exist");
                Ok(Observed::absent(message))
            }
            other => other,
        }
    }

    async fn read(&self, machine: &Machine) -> Result<Observed, AzureError> {
        let operation = format!("{}_get", machine.kind.label());
        let result = self.shared.compute.get(machine).await;
        let status = result.as_ref().map_or_else(AzureError::label, |_| "ok");
        self.shared.metrics.arm_call(&operation, status);
        result
    }

    async fn write(
        &self,
        machine: &Machine,
        delta: &IdentityDelta,
        if_match: Option<&str>,
    ) -> Result<Observed, AzureError> {
        let operation = format!("{}_patch", machine.kind.label());
        info!(
            add = delta.add.len(),
            remove = delta.remove.len(),
            "updating identities"
        );
        let result = self.shared.compute.patch(machine, delta, if_match).await;
        let status = result.as_ref().map_or_else(AzureError::label, |_| "ok");
        self.shared.metrics.arm_call(&operation, status);
        result
    }

    /// The wait after a failed ARM call; at least what ARM asked for.
    fn failed(&mut self, err: &AzureError) -> Outcome {
        let wait = self.backoff.next(err.retry_after());
        match err {
            AzureError::Throttled { .. } => info!(wait_ms = wait.as_millis() as u64, "throttled by ARM"),
            _ => warn!(error = %err, wait_ms = wait.as_millis() as u64, "ARM call failed"),
        }
        Outcome::Retry(wait)
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

    /// Runs a plan's writes; creates and patches first (concurrently), then releases. Folds results
    /// into `input`; returns whether all succeeded.
    async fn execute(&mut self, input: &mut MachineInput, plan: &Plan) -> bool {
        if plan.writes.is_empty() {
            return true;
        }
        if !self.shared.leadership.is_leader() {
            return false;
        }
        let (releases, others): (Vec<&Write>, Vec<&Write>) = plan
            .writes
            .iter()
            .partition(|w| matches!(w, Write::Release { .. }));
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

fn refused_unnamed() -> String {
    "ARM refused a request with this identity without naming it; the others of that request were accepted"
        .to_owned()
}

fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.75 + fastrand::f64() / 2.0)
}

fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(365 * 24 * 3600)
}

#[cfg(test)]
mod tests;
