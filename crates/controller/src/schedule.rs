//! When a worker reads its machine, writes records, and sends which change to ARM: a state machine over
//! plain data and the instants its caller passes, so that every rule below is tested without I/O. The
//! worker ([`crate::worker`]) is the I/O shell around it: it asks [`Schedule::next`] what to do, does
//! it, and reports back ([`Schedule::answered`], [`Schedule::written`]).
//!
//! - **Knowledge.** What the machine holds, as last read or as our last change left it, with its entity
//!   tag. It stands until it is one drift interval old, a conditional change finds the machine changed
//!   (412), or a call ends in a way that leaves the machine's state unknown; only then is the machine
//!   read again. A change is sent with `If-Match` on the tag the knowledge carries, so that another
//!   writer is detected (and the machine read again) instead of overwritten. Knowledge without a tag is
//!   read again before every change, as the only safe way to change blindly.
//! - **One call at a time.** At most one ARM call per machine is in flight. While a PATCH is, the
//!   identities it carries are left alone ([`crate::plan::Context::in_flight`]); whatever else arrives
//!   gathers, and goes in one follow-up PATCH when the first returns.
//! - **Batch window.** An identity to add waits at most `batch_window` from the moment a pod first
//!   needed it, so that a burst of pods makes one request. Removals wait until neither another removal
//!   has come nor another pod has left the machine for `batch_window` (at most [`REMOVAL_MAX_WAIT`]),
//!   so that pods deleted one after another make one request, and a pod deleted and at once replaced (a
//!   rollout, a node drained) removes nothing. Pods leaving count, not only identities no longer
//!   needed: an identity goes with the last of its pods, so in a scale-down the first identities to go
//!   come far apart and the bulk comes last. Removals ride along with any addition sent once they are
//!   one window old.
//! - **Records first.** Record writes come before any ARM call, so that an identity is recorded
//!   `added` before ARM is asked to add it.
//! - **Holds.** After a failure nothing more is sent before ARM's `Retry-After` (the machine's own, and
//!   the subscription's, which the caller passes in) nor before the exponential backoff has passed.
//! - **Bisection.** A change ARM refuses because of an identity it does not name is split: half of its
//!   additions go alone; the half that is refused is split again, until the refused one is alone and
//!   quarantined.
//! - **Settling.** A read that finds ARM applying a change (a PATCH whose answer was lost, or someone
//!   else's update) decides nothing that needs the change done ([`crate::plan::Plan::settling`]): the
//!   machine is read again [`SETTLE_POLL_INTERVAL`] later (or after the `Retry-After` of a failed call),
//!   and nothing is sent meanwhile.
//! - **Drift check.** A machine with records whose knowledge has not been renewed for one drift
//!   interval is read, to find identities someone else removed.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use pod_identity_api::ObjectKey;
use pod_identity_azure::{
    AzureError, IdentityDelta, ThrottleScope, error::named_in, resource_id::fold, retry::Backoff,
};

use crate::{
    arm::Observed,
    machine::Target,
    plan::{Context, MachineInput, Protection, Write, plan},
};

/// How often a worker may write the same records before it pauses: a plan that proposes writes again
/// right after they succeeded would otherwise loop.
const MAX_WRITE_STEPS: u32 = 8;

/// The longest an identity no pod needs stays on a machine while other removals keep coming.
pub const REMOVAL_MAX_WAIT: Duration = Duration::from_secs(30);

/// How long after a read that found ARM applying a change the machine is read again: the interval
/// azure-core polls a long-running operation at when ARM sends no `Retry-After`.
pub const SETTLE_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// What the schedule needs besides its own state.
pub struct Facts<'a> {
    /// Why an identity is quarantined, if it is (case-folded ID in).
    pub quarantine: &'a dyn Fn(&str) -> Option<String>,
    /// Identities never removed.
    pub protection: &'a Protection,
    /// Until when the subscription's reads are held back (a 429 of its read bucket).
    pub reads_held: Option<Instant>,
    /// Until when the subscription's writes are held back (a 429 of its write bucket).
    pub writes_held: Option<Instant>,
}

/// What the worker does next.
#[derive(Clone, Debug)]
pub enum Step {
    /// Write these records now; report with [`Schedule::written`].
    Write(Vec<Write>),
    /// Read the machine now; report with [`Schedule::answered`]. `drift` reads were asked for by
    /// nothing but the drift check, and spend its budget (a refusal goes to [`Schedule::postpone_drift`]).
    Read {
        /// Whether only the drift check asks for it.
        drift: bool,
    },
    /// Send this change (at most 150 identities) now, conditional on `if_match`; report with
    /// [`Schedule::answered`].
    Patch {
        /// The change.
        delta: IdentityDelta,
        /// The entity tag the change was planned from.
        if_match: Option<String>,
    },
    /// Nothing to do before this instant (`None`: before the input changes or a call returns).
    Wait(Option<Instant>),
}

/// What the worker must do about the answer to a call, besides what the schedule keeps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effects {
    /// Identities ARM refused, with the reason: they go into quarantine.
    pub quarantine: Vec<(Vec<String>, String)>,
    /// Identities ARM accepted: they leave quarantine.
    pub accepted: Vec<String>,
    /// Identities the drift check found missing and put back.
    pub repaired: usize,
    /// A 429 of the subscription's bucket: every machine of the subscription holds back calls of this
    /// kind (`true`: writes) until then.
    pub subscription_hold: Option<(bool, Instant)>,
    /// The call failed: the error, and how long this machine now waits.
    pub failed: Option<(AzureError, Duration)>,
}

/// The machine as we know it.
#[derive(Clone, Debug, PartialEq)]
struct Knowledge {
    observed: Observed,
    at: Instant,
    /// Read by the drift check (a change planned from it repairs drift).
    drift: bool,
}

/// The ARM call in flight.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    Read {
        drift: bool,
    },
    Patch {
        delta: IdentityDelta,
        /// The additions sent to find which one ARM refuses, when bisecting.
        probe: Option<Vec<String>>,
        /// Whether the knowledge it was planned from came from the drift check.
        repair: bool,
    },
}

/// The schedule of one machine.
#[derive(Debug)]
pub struct Schedule {
    batch_window: Duration,
    drift_interval: Duration,
    backoff: Backoff,
    knowledge: Option<Knowledge>,
    call: Option<Call>,
    /// No ARM call before this (the machine's `Retry-After` and backoff).
    hold: Option<Instant>,
    /// No record writes before this (after writes failed).
    writes_hold: Option<Instant>,
    write_steps: u32,
    /// Since when each pending change (case-folded identity) has been wanted.
    pending: BTreeMap<String, Instant>,
    /// The assignments wanted on the machine at the last step.
    wanted: BTreeSet<ObjectKey>,
    /// When an assignment was last no longer wanted (its pod left the machine, or its binding went).
    departed: Option<Instant>,
    /// Additions among which ARM refuses one it does not name.
    suspects: Option<Vec<String>>,
    /// When the drift check reads the machine next.
    drift_due: Instant,
    /// 412s in a row.
    modified: u32,
    /// The last drift check failed: it is tried again once the hold is over.
    drift_retry: bool,
    busy: bool,
}

impl Schedule {
    /// The schedule of a machine first seen at `now`; `jitter` in `[0, 1)` places its first drift check
    /// within the first interval, so that machines started together are not all read together.
    pub fn new(
        batch_window: Duration,
        drift_interval: Duration,
        backoff: Backoff,
        now: Instant,
        jitter: f64,
    ) -> Self {
        Self {
            batch_window,
            drift_interval,
            backoff,
            knowledge: None,
            call: None,
            hold: None,
            writes_hold: None,
            write_steps: 0,
            pending: BTreeMap::new(),
            wanted: BTreeSet::new(),
            departed: None,
            suspects: None,
            drift_due: now + drift_interval.mul_f64(jitter.clamp(0.0, 1.0)),
            modified: 0,
            drift_retry: false,
            busy: true,
        }
    }

    /// Knowledge an earlier schedule of the same machine handed on ([`Schedule::known`]): it stands for
    /// what is left of its drift interval, so that a machine whose worker retired and came back (its last
    /// pod gone, then a new one) is not read again for it.
    pub fn with_known(mut self, known: Option<(Observed, Instant)>) -> Self {
        if let Some((observed, at)) = known {
            self.knowledge = Some(Knowledge {
                observed,
                at,
                drift: false,
            });
            self.drift_due = at + self.drift_interval;
        }
        self
    }

    /// What the schedule knows of its machine, and since when.
    pub fn known(&self) -> Option<(Observed, Instant)> {
        self.knowledge.as_ref().map(|k| (k.observed.clone(), k.at))
    }

    /// Whether work is pending: something to write, read or send, a call in flight, or a retry to come.
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// The input changed: writes may be proposed afresh.
    pub fn news(&mut self) {
        self.write_steps = 0;
    }

    /// Decides what to do at `now`.
    pub fn next(&mut self, input: &MachineInput, facts: &Facts<'_>, now: Instant) -> Step {
        let azure = matches!(input.target, Target::Azure(_));
        // What the plan was made from: when, read by the drift check or not, with which entity tag.
        let (plan, known) = {
            let current = self
                .knowledge
                .as_ref()
                .filter(|k| now < k.at + self.drift_interval);
            let in_flight = match &self.call {
                Some(Call::Patch { delta, .. }) => Some(delta),
                _ => None,
            };
            let plan = plan(
                input,
                &Context {
                    observed: current.map(|k| &k.observed),
                    quarantine: facts.quarantine,
                    protection: facts.protection,
                    in_flight,
                },
            );
            (plan, current.map(|k| (k.at, k.drift, k.observed.etag.clone())))
        };
        self.note_departures(input, now);
        // Without knowledge there is no delta; what was pending stays pending while the machine is read.
        if known.is_some() {
            self.pending_for(&plan.delta, now);
        }
        self.busy = self.call.is_some() || !plan.is_idle() || plan.deferred || self.drift_retry;

        if plan.deferred {
            // ARM is deleting the machine: leave it alone, and look again later.
            self.knowledge = None;
            let wait = self.backoff.next(None).max(self.drift_interval / 4);
            self.hold = Some(later(self.hold, now + wait));
            return Step::Wait(self.hold);
        }
        let mut wake = Wake::default();

        // Records first: a record says `added` before ARM is asked to add.
        if !plan.writes.is_empty() {
            match self.writes_hold.filter(|h| *h > now) {
                None if self.write_steps < MAX_WRITE_STEPS => {
                    self.write_steps += 1;
                    return Step::Write(plan.writes);
                }
                None => {
                    let wait = self.backoff.next(None);
                    self.writes_hold = Some(now + wait);
                    self.write_steps = 0;
                    wake.at(now + wait);
                }
                Some(hold) => wake.at(hold),
            }
        }
        if self.call.is_some() || !azure {
            return Step::Wait(wake.into());
        }
        let reads_free = later(self.hold, facts.reads_held.unwrap_or(now));
        let writes_free = later(self.hold, facts.writes_held.unwrap_or(now));

        if plan.needs_observation {
            if reads_free > now {
                wake.at(reads_free);
                return Step::Wait(wake.into());
            }
            return self.read(false);
        }
        if plan.settling
            && let Some((at, ..)) = &known
        {
            let due = reads_free.max(*at + SETTLE_POLL_INTERVAL);
            if due > now {
                wake.at(due);
                return Step::Wait(wake.into());
            }
            return self.read(false);
        }
        if !plan.delta.is_empty() {
            let oldest = self.oldest_pending(&plan.delta);
            // Without an entity tag a change cannot be conditional: read right before it.
            if let Some((at, _, None)) = &known
                && oldest.is_some_and(|since| *at < since)
                && self.due(&plan.delta).is_some_and(|due| due <= now)
            {
                if reads_free > now {
                    wake.at(reads_free);
                    return Step::Wait(wake.into());
                }
                return self.read(false);
            }
            let (delta, probe) = self.compose(&plan.delta, now);
            match delta {
                Some(delta) if writes_free <= now => {
                    let (repair, if_match) = known.map_or((false, None), |(_, drift, etag)| (drift, etag));
                    self.call = Some(Call::Patch {
                        delta: delta.clone(),
                        probe,
                        repair,
                    });
                    self.busy = true;
                    return Step::Patch { delta, if_match };
                }
                Some(_) => wake.at(writes_free),
                None => wake.at(later(self.due(&plan.delta), writes_free)),
            }
            return Step::Wait(wake.into());
        }
        if !plan.writes.is_empty() {
            return Step::Wait(wake.into());
        }
        if input.recorded.is_empty() {
            // Nothing recorded, nothing to check.
            self.drift_retry = false;
        }
        if !self.drift_retry {
            // Nothing pending: past failures are forgotten.
            self.busy = false;
            self.backoff.reset();
            self.modified = 0;
            if input.recorded.is_empty() {
                return Step::Wait(wake.into());
            }
        }
        let due = if self.drift_retry {
            reads_free
        } else {
            later(Some(self.drift_due), reads_free)
        };
        if due > now {
            wake.at(due);
            return Step::Wait(wake.into());
        }
        self.busy = true;
        self.read(true)
    }

    /// The drift check could not read now (its budget is spent); it tries again at `until`.
    pub fn postpone_drift(&mut self, until: Instant) {
        if matches!(self.call, Some(Call::Read { drift: true })) {
            self.call = None;
        }
        self.drift_due = until;
    }

    /// The record writes of the last [`Step::Write`] ended; `ok` when all succeeded.
    pub fn written(&mut self, now: Instant, ok: bool) {
        if ok {
            self.writes_hold = None;
        } else {
            self.writes_hold = Some(now + self.backoff.next(None));
            self.write_steps = 0;
        }
    }

    /// The ARM call of the last [`Step::Read`] or [`Step::Patch`] ended.
    pub fn answered(&mut self, now: Instant, result: Result<Observed, AzureError>) -> Effects {
        match self.call {
            Some(Call::Read { .. }) => self.read_done(now, result),
            Some(Call::Patch { .. }) => self.patch_done(now, result),
            None => Effects::default(),
        }
    }

    fn read_done(&mut self, now: Instant, result: Result<Observed, AzureError>) -> Effects {
        let drift = match self.call.take() {
            Some(Call::Read { drift }) => drift,
            other => {
                self.call = other;
                return Effects::default();
            }
        };
        self.write_steps = 0;
        match result {
            Ok(observed) => {
                self.drift_retry = false;
                self.know(observed, now, drift);
                Effects::default()
            }
            Err(AzureError::ResourceNotFound { message, .. }) => {
                self.drift_retry = false;
                self.know(Observed::absent(message), now, drift);
                Effects::default()
            }
            Err(err) => {
                self.drift_retry |= drift;
                self.fail(err, now, false)
            }
        }
    }

    fn patch_done(&mut self, now: Instant, result: Result<Observed, AzureError>) -> Effects {
        let (sent, probe, repair) = match self.call.take() {
            Some(Call::Patch { delta, probe, repair }) => (delta, probe, repair),
            other => {
                self.call = other;
                return Effects::default();
            }
        };
        self.write_steps = 0;
        let mut effects = Effects::default();
        match result {
            Ok(after) => {
                self.know(after, now, false);
                self.backoff.reset();
                self.modified = 0;
                effects.accepted = sent.add.clone();
                if repair {
                    effects.repaired = sent.add.len();
                }
                if let (Some(all), Some(probe)) = (self.suspects.take(), probe) {
                    // The refused one is among the additions not in the probe.
                    let rest: Vec<String> = all.into_iter().filter(|id| !probe.contains(id)).collect();
                    match rest.as_slice() {
                        [] => {}
                        [one] => effects.quarantine.push((vec![one.clone()], refused_unnamed())),
                        _ => self.suspects = Some(rest),
                    }
                }
            }
            Err(AzureError::IdentitiesRejected {
                identities: ids,
                code,
                message,
            }) => {
                // The machine is unchanged; the rest goes again at once.
                let named = if ids.is_empty() {
                    named_in(&message, &sent.add)
                } else {
                    ids
                };
                let reason = format!("{code}: {message}");
                self.suspects = None;
                if !named.is_empty() {
                    effects.quarantine.push((named, reason));
                } else if sent.add.len() == 1 {
                    effects.quarantine.push((sent.add.clone(), reason));
                } else if !sent.add.is_empty() {
                    self.suspects = Some(sent.add.clone());
                } else {
                    return self.fail(AzureError::InvalidResponse(reason), now, true);
                }
            }
            Err(AzureError::ResourceNotFound { message, .. }) => {
                // Deleted since it was read: it holds nothing.
                self.know(Observed::absent(message), now, false);
            }
            Err(err @ AzureError::Conflict { status: 412, .. }) => {
                // Another writer changed the machine since the entity tag was read: read it again and
                // decide again, at once the first time.
                self.knowledge = None;
                self.modified += 1;
                if self.modified > 1 {
                    return self.fail(err, now, true);
                }
            }
            Err(err) => return self.fail(err, now, true),
        }
        effects
    }

    fn read(&mut self, drift: bool) -> Step {
        self.call = Some(Call::Read { drift });
        Step::Read { drift }
    }

    fn know(&mut self, observed: Observed, now: Instant, drift: bool) {
        self.knowledge = Some(Knowledge {
            observed,
            at: now,
            drift,
        });
        self.drift_due = now + self.drift_interval;
    }

    /// A failed call: hold the machine for the backoff (never less than ARM's `Retry-After`), and
    /// forget what a change of unknown outcome may have made untrue.
    fn fail(&mut self, err: AzureError, now: Instant, write: bool) -> Effects {
        let wait = self.backoff.next(err.retry_after());
        self.hold = Some(later(self.hold, now + wait));
        let mut effects = Effects::default();
        match &err {
            // Refused before anything changed; a change that went through after all is found by the
            // entity tag of the next one.
            AzureError::Throttled { retry_after, .. } => {
                if ThrottleScope::of(&err) == Some(ThrottleScope::Subscription) {
                    let until = now + retry_after.unwrap_or(Duration::from_secs(1));
                    effects.subscription_hold = Some((write, until));
                }
            }
            AzureError::Unauthorized { .. }
            | AzureError::IdentitiesRejected { .. }
            | AzureError::IdentityNotFound { .. }
            | AzureError::Other { .. }
            | AzureError::InvalidResponse(_)
            | AzureError::Config(_) => {}
            // A 412 (changed by another writer), a 409 (another operation running), a failure of unknown
            // outcome, a machine gone.
            AzureError::Conflict { .. }
            | AzureError::Transient { .. }
            | AzureError::OperationFailed { .. }
            | AzureError::ResourceNotFound { .. } => {
                if write {
                    self.knowledge = None;
                }
            }
        }
        effects.failed = Some((err, wait));
        effects
    }

    /// Notes whether an assignment wanted at the last step is no longer wanted.
    fn note_departures(&mut self, input: &MachineInput, now: Instant) {
        let wanted: BTreeSet<ObjectKey> = input.wanted.iter().map(|w| w.key.clone()).collect();
        if self.wanted.difference(&wanted).next().is_some() {
            self.departed = Some(now);
        }
        self.wanted = wanted;
    }

    /// Notes since when each change of `delta` has been wanted; forgets changes no longer wanted.
    fn pending_for(&mut self, delta: &IdentityDelta, now: Instant) {
        let keys: Vec<String> = delta.add.iter().chain(&delta.remove).map(|id| fold(id)).collect();
        self.pending.retain(|k, _| keys.contains(k));
        for key in keys {
            self.pending.entry(key).or_insert(now);
        }
    }

    fn since(&self, id: &str, now: Instant) -> Instant {
        self.pending.get(&fold(id)).copied().unwrap_or(now)
    }

    fn oldest_pending(&self, delta: &IdentityDelta) -> Option<Instant> {
        delta
            .add
            .iter()
            .chain(&delta.remove)
            .filter_map(|id| self.pending.get(&fold(id)).copied())
            .min()
    }

    /// When the change is due: an addition one batch window after it was first wanted; removals once no
    /// other removal has come and no pod has left for a batch window (so that pods going one after
    /// another, a scale-down or a drained node, make one request), but at most [`REMOVAL_MAX_WAIT`] after
    /// the first.
    fn due(&self, delta: &IdentityDelta) -> Option<Instant> {
        let sinces = |ids: &[String]| -> Vec<Instant> {
            ids.iter()
                .filter_map(|id| self.pending.get(&fold(id)).copied())
                .collect()
        };
        let additions = sinces(&delta.add)
            .into_iter()
            .min()
            .map(|oldest| oldest + self.batch_window);
        let removals = sinces(&delta.remove);
        let removals = match (removals.iter().min(), removals.iter().max()) {
            (Some(oldest), Some(youngest)) => {
                let quiet_since = later(self.departed, *youngest);
                Some((quiet_since + self.batch_window).min(*oldest + REMOVAL_MAX_WAIT.max(self.batch_window)))
            }
            _ => None,
        };
        match (additions, removals) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        }
    }

    /// The request to send now, if one is due: every addition (bisecting: half of the suspects alone),
    /// the removals wanted for a whole batch window, at most 150 identities.
    fn compose(
        &mut self,
        delta: &IdentityDelta,
        now: Instant,
    ) -> (Option<IdentityDelta>, Option<Vec<String>>) {
        if self.due(delta).is_none_or(|due| due > now) {
            return (None, None);
        }
        let mut request = delta.clone();
        request
            .remove
            .retain(|id| self.since(id, now) + self.batch_window <= now);
        let mut probe = None;
        if let Some(suspects) = &self.suspects {
            let live: Vec<String> = suspects
                .iter()
                .filter(|s| delta.add.iter().any(|a| fold(a) == fold(s)))
                .cloned()
                .collect();
            if live.is_empty() {
                self.suspects = None;
            } else {
                let half = live[..live.len().div_ceil(2)].to_vec();
                request.add.retain(|id| half.iter().any(|h| fold(h) == fold(id)));
                self.suspects = Some(live);
                probe = Some(half);
            }
        }
        // One request at a time: the first of those the change splits into.
        let first = request.requests().into_iter().next();
        (first, probe)
    }
}

#[cfg(test)]
impl Schedule {
    /// Moves every instant the schedule keeps `by` into the past, as if that much time had passed.
    pub(crate) fn rewind(&mut self, by: Duration) {
        let back = |i: Instant| i.checked_sub(by).unwrap_or(i);
        if let Some(k) = &mut self.knowledge {
            k.at = back(k.at);
        }
        self.hold = self.hold.map(back);
        self.writes_hold = self.writes_hold.map(back);
        self.drift_due = back(self.drift_due);
        self.departed = self.departed.map(back);
        for since in self.pending.values_mut() {
            *since = back(*since);
        }
    }
}

/// The reason recorded for an identity found by bisection.
pub fn refused_unnamed() -> String {
    "ARM refused a request with this identity without naming it; the others of that request were accepted"
        .to_owned()
}

/// The later of an optional instant and an instant.
fn later(a: Option<Instant>, b: Instant) -> Instant {
    a.map_or(b, |a| a.max(b))
}

/// The earliest of the instants something may change at.
#[derive(Default)]
struct Wake(Option<Instant>);

impl Wake {
    fn at(&mut self, at: Instant) {
        self.0 = Some(self.0.map_or(at, |w| w.min(at)));
    }
}

impl From<Wake> for Option<Instant> {
    fn from(wake: Wake) -> Self {
        wake.0
    }
}

#[cfg(test)]
mod tests;
