//! Leader election on a `coordination.k8s.io` Lease in the install namespace.
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
            seen: None,
            seen_at: Instant::now(),
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

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The Lease as last seen: holder, renew time, resource version.
    seen: Option<(String, Option<MicroTime>, Option<String>)>,
    /// When it was last seen to change, on our clock.
    seen_at: Instant,
}

impl Elector {
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = jiff::Timestamp::now();
        let duration_secs = i32::try_from(self.config.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
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
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let seen = (
            holder.clone(),
            spec.renew_time.clone(),
            lease.metadata.resource_version.clone(),
        );
        if self.seen.as_ref() != Some(&seen) {
            self.seen = Some(seen);
            self.seen_at = Instant::now();
        }
        let ours = holder == self.config.identity;
        let held_for = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(duration_secs).max(1)).unwrap_or(1),
        );
        if !ours && !holder.is_empty() && self.seen_at.elapsed() < held_for {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration_secs),
            acquire_time: if ours {
                spec.acquire_time
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
            ..spec
        });
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                let spec = updated.spec.unwrap_or_default();
                self.seen = Some((
                    spec.holder_identity.unwrap_or_default(),
                    spec.renew_time,
                    updated.metadata.resource_version,
                ));
                self.seen_at = Instant::now();
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
