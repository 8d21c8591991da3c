//! Leader election on a `coordination.k8s.io` Lease in the install namespace. The takeover rule
//! ([`decide`]) and the Lease it writes ([`claimed`]) are plain functions; the elector only reads and
//! writes the Lease.
//!
//! Only the leader writes. The standby keeps its caches warm and takes the Lease over when the holder
//! has not renewed it for one lease duration, measured on the standby's own clock from the moment it
//! last saw the Lease change (so clock skew between replicas does not matter). The leader considers
//! itself leader only until `renew deadline` (half the lease duration) after the start of its last
//! successful renewal, and every write checks that first: a leader that cannot renew stops writing well
//! before anyone else may take over, so two replicas never write at once.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Whether this replica leads; cheap to clone and to ask.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<Option<Instant>>,
}

impl Leadership {
    /// Leadership that never ends (a single replica without election, and tests).
    pub fn always() -> Self {
        let (_tx, rx) = watch::channel(Some(Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)));
        Self { rx }
    }

    /// Leadership never held (a standby that never wins, in tests).
    pub fn never() -> Self {
        let (_tx, rx) = watch::channel(None);
        Self { rx }
    }

    /// Whether this replica may write now.
    pub fn is_leader(&self) -> bool {
        self.rx.borrow().is_some_and(|deadline| deadline > Instant::now())
    }

    /// Waits until this replica leads.
    pub async fn acquired(&mut self) {
        loop {
            if self.is_leader() {
                return;
            }
            if self.rx.changed().await.is_err() {
                // The elector is gone; nothing will ever change.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until this replica no longer leads: the elector says so, or the deadline of the last
    /// renewal passes without a new one.
    pub async fn lost(&mut self) {
        loop {
            let deadline = *self.rx.borrow_and_update();
            let Some(deadline) = deadline.filter(|d| *d > Instant::now()) else {
                return;
            };
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(deadline.into()).await;
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }
}

/// Where the Lease is and who we are.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the install namespace).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub duration: Duration,
}

impl LeaseConfig {
    /// How long after starting a successful renewal the leader stops writing unless renewed again.
    pub fn renew_deadline(&self) -> Duration {
        self.duration / 2
    }

    /// How often to renew, or to try to acquire.
    pub fn retry_period(&self) -> Duration {
        self.duration / 4
    }
}

/// Runs the election until `shutdown` resolves; then gives the Lease up if held, so the standby takes
/// over at once instead of after a lease duration.
pub fn elect(
    client: Client,
    config: LeaseConfig,
    metrics: std::sync::Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> (Leadership, impl Future<Output = ()>) {
    let (tx, rx) = watch::channel(None);
    let task = async move {
        let api = Api::<Lease>::namespaced(client, &config.namespace);
        let mut elector = Elector {
            api,
            config,
            observed: Observed {
                seen: None,
                since: Instant::now(),
            },
        };
        tokio::pin!(shutdown);
        let mut leading = false;
        loop {
            let started = Instant::now();
            let outcome = elector.try_acquire_or_renew().await;
            match outcome {
                Ok(true) => {
                    let deadline = started + elector.config.renew_deadline();
                    tx.send_replace(Some(deadline));
                    if !leading {
                        info!(lease = %elector.config.name, identity = %elector.config.identity, "became leader");
                        metrics.leader_acquisitions.inc();
                        metrics.leader.set(1);
                        leading = true;
                    }
                }
                Ok(false) => {
                    if leading {
                        warn!("lost the lease to another replica");
                        tx.send_replace(None);
                        metrics.leader.set(0);
                        leading = false;
                    }
                }
                Err(err) => {
                    warn!(error = %err, "lease renewal failed");
                    // Leadership ends by itself when the deadline of the last renewal passes.
                    if leading && tx.borrow().is_none_or(|d| d <= Instant::now()) {
                        tx.send_replace(None);
                        metrics.leader.set(0);
                        leading = false;
                    }
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(elector.config.retry_period()) => {}
            }
        }
        if leading {
            tx.send_replace(None);
            metrics.leader.set(0);
            elector.release().await;
        }
    };
    (Leadership { rx }, task)
}

/// What a replica does with the Lease it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It holds the Lease: renew it.
    Renew,
    /// Nobody holds it, or its holder has not renewed it for a whole lease duration: take it over.
    TakeOver,
    /// Another replica holds it and renewed it within its duration: stand by.
    Wait,
}

/// The takeover rule. `holder` is the Lease's holder (`None` or empty once released), `lease_duration`
/// its `leaseDurationSeconds`, and `unchanged_for` how long this replica has seen the Lease unchanged, on
/// its own clock (so clock skew between replicas does not matter: the holder's `renewTime` is never
/// compared with our time).
pub fn decide(holder: Option<&str>, me: &str, lease_duration: Duration, unchanged_for: Duration) -> Decision {
    match holder.filter(|h| !h.is_empty()) {
        Some(h) if h == me => Decision::Renew,
        Some(_) if unchanged_for < lease_duration => Decision::Wait,
        _ => Decision::TakeOver,
    }
}

/// The Lease's spec after `decision` (`Renew` or `TakeOver`) by `me` at `now`: renewed, with the
/// acquisition time and the transition count kept on a renewal and moved on a takeover.
pub fn claimed(
    spec: LeaseSpec,
    me: &str,
    duration: Duration,
    now: jiff::Timestamp,
    decision: Decision,
) -> LeaseSpec {
    let takeover = decision == Decision::TakeOver;
    let transitions = spec.lease_transitions.unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(duration_secs(duration)),
        acquire_time: if takeover {
            Some(MicroTime(now))
        } else {
            spec.acquire_time.clone()
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if takeover { transitions + 1 } else { transitions }),
        ..spec
    }
}

fn duration_secs(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// When this replica last saw the Lease change (holder, renewal or resource version), on its own clock.
#[derive(Debug)]
struct Observed {
    seen: Option<(String, Option<MicroTime>, Option<String>)>,
    since: Instant,
}

impl Observed {
    /// Records the Lease as read at `now`; how long it has been unchanged.
    fn observe(&mut self, seen: (String, Option<MicroTime>, Option<String>), now: Instant) -> Duration {
        if self.seen.as_ref() != Some(&seen) {
            self.seen = Some(seen);
            self.since = now;
        }
        now.saturating_duration_since(self.since)
    }
}

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Observed,
}

impl Elector {
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = jiff::Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs(self.config.duration)),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let unchanged_for = self.observed.observe(
            (
                spec.holder_identity.clone().unwrap_or_default(),
                spec.renew_time.clone(),
                lease.metadata.resource_version.clone(),
            ),
            Instant::now(),
        );
        let held_for = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s.max(1)).ok())
            .map_or(self.config.duration, Duration::from_secs);
        let decision = decide(
            spec.holder_identity.as_deref(),
            &self.config.identity,
            held_for,
            unchanged_for,
        );
        if decision == Decision::Wait {
            return Ok(false);
        }
        lease.spec = Some(claimed(
            spec,
            &self.config.identity,
            self.config.duration,
            now,
            decision,
        ));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                let spec = updated.spec.unwrap_or_default();
                self.observed.observe(
                    (
                        spec.holder_identity.unwrap_or_default(),
                        spec.renew_time,
                        updated.metadata.resource_version,
                    ),
                    Instant::now(),
                );
                Ok(true)
            }
            // Someone else renewed or took it in between.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Gives the Lease up: no holder, so the standby takes it on its next try.
    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!("released the lease"),
            Err(err) => warn!(error = %err, "could not release the lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DURATION: Duration = Duration::from_secs(15);

    #[test]
    fn the_holder_renews_and_a_standby_waits_while_the_lease_is_renewed() {
        let cases = [
            // (holder, unchanged for (s), decision of "b")
            (Some("b"), 0, Decision::Renew),
            (Some("b"), 60, Decision::Renew),
            (Some("a"), 0, Decision::Wait),
            (Some("a"), 14, Decision::Wait),
            (Some("a"), 15, Decision::TakeOver),
            (Some("a"), 600, Decision::TakeOver),
            (Some(""), 0, Decision::TakeOver),
            (None, 0, Decision::TakeOver),
        ];
        for (holder, unchanged, want) in cases {
            assert_eq!(
                decide(holder, "b", DURATION, Duration::from_secs(unchanged)),
                want,
                "{holder:?} unchanged for {unchanged}s"
            );
        }
    }

    #[test]
    fn the_clock_starts_again_whenever_the_lease_changes() {
        let t0 = Instant::now();
        let mut observed = Observed {
            seen: None,
            since: t0,
        };
        let lease = |renewed: i64| {
            (
                "a".to_owned(),
                Some(MicroTime(jiff::Timestamp::from_second(renewed).unwrap())),
                Some(format!("{renewed}")),
            )
        };
        assert_eq!(observed.observe(lease(1), t0), Duration::ZERO);
        assert_eq!(observed.observe(lease(1), t0 + DURATION), DURATION);
        // A renewal, whatever its timestamp says: the holder is alive.
        assert_eq!(observed.observe(lease(0), t0 + DURATION * 2), Duration::ZERO);
        assert_eq!(
            decide(
                Some("a"),
                "b",
                DURATION,
                observed.observe(lease(0), t0 + DURATION * 3 - Duration::from_secs(1))
            ),
            Decision::Wait
        );
    }

    #[test]
    fn a_takeover_moves_the_transitions_and_acquisition_a_renewal_keeps_them() {
        let before = jiff::Timestamp::from_second(1_000).unwrap();
        let now = jiff::Timestamp::from_second(2_000).unwrap();
        let spec = LeaseSpec {
            holder_identity: Some("a".into()),
            acquire_time: Some(MicroTime(before)),
            renew_time: Some(MicroTime(before)),
            lease_transitions: Some(3),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        };
        let taken = claimed(spec.clone(), "b", DURATION, now, Decision::TakeOver);
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(now)));
        assert_eq!(taken.renew_time, Some(MicroTime(now)));
        let renewed = claimed(taken, "b", DURATION, before, Decision::Renew);
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, Some(MicroTime(now)));
        assert_eq!(renewed.renew_time, Some(MicroTime(before)));
        assert_eq!(renewed.lease_duration_seconds, Some(15));
    }
}
