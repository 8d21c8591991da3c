//! The controller: adds user-assigned identities to the VMs and scale sets whose pods are bound to
//! them, records each assignment as an `AzureAssignedIdentity` (as aad-pod-identity 1.8 did, so its
//! node agents and its objects keep working), and removes identities when no pod needs them, never one
//! it did not add.
//!
//! How it is put together, from the outside in:
//! - [`planner`]: reflectors over pods, nodes, identities, bindings, exceptions and assignments; any
//!   change wakes one planning pass that matches pods to identities ([`pod_identity_api::matching`]),
//!   groups the result by machine ([`route`]) and hands each machine's input to its worker.
//! - [`worker`]: one per VM or scale set, the I/O shell of its [`schedule`]: at most one ARM call in
//!   flight, everything that arrives meanwhile in one follow-up request, reads only when what it knows
//!   of the machine is stale, conditional changes, backoff, `Retry-After`, and quarantine of identities
//!   ARM refuses.
//! - [`plan`]: the pure decision of a worker round (what to write, what to add and remove).
//! - [`record`]: the assignment objects and the annotations that make removal safe.
//! - [`leader`]: only the Lease holder runs planner and workers; the standby keeps its caches warm.
//! - [`arm`] and [`azure`]: the ARM boundary and its implementation.
//! - [`federation`]: identities served by workload identity federation never reach the workers; their
//!   subjects and (opted in) federated identity credentials are kept instead.
//! - [`webhook`]: the admission webhook that gives bound pods the `IdentityReady` readiness gate,
//!   served by every replica, its certificate kept by the leader.
//! - [`metrics`], [`events`], [`admin`]: what operators see; [`cloud_config`]: what they see when the
//!   Azure configuration is missing.
//! - [`config`] and [`start`]: the command line and what it makes of the controller; the binary only
//!   parses and runs.

pub mod admin;
pub mod arm;
pub mod azure;
pub mod backoff;
pub mod cloud_config;
pub mod config;
pub mod events;
pub mod federation;
pub mod kube_store;
pub mod leader;
pub mod machine;
pub mod metrics;
pub mod plan;
pub mod planner;
pub mod prewarm;
pub mod record;
pub mod route;
pub mod schedule;
pub mod start;
pub mod webhook;
pub mod worker;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use kube::Client;
use pod_identity_api::matching::Scope;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{info, warn};

use crate::{
    arm::ComputeApi,
    backoff::{Quarantine, ReadBudget, SubscriptionHolds},
    events::Events,
    kube_store::KubeRecords,
    leader::{Leadership, LeaseConfig},
    metrics::Metrics,
    plan::Protection,
    worker::{Shared, WorkerSettings},
};

/// Everything the controller needs besides its clients.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Namespaced or cross-namespace matching.
    pub scope: Scope,
    /// Watch only this namespace (all when `None`); for installations that serve one namespace.
    pub namespace: Option<String>,
    /// Leader election; `None` runs as the only replica.
    pub lease: Option<LeaseConfig>,
    /// This replica's name (Events' reporting instance).
    pub instance: String,
    /// Worker timing.
    pub worker: WorkerSettings,
    /// Identities never removed (client IDs or resource IDs).
    pub immutable: Vec<String>,
    /// ARM reads per drift interval for drift checks.
    pub drift_budget: u32,
    /// A full planning pass at least this often.
    pub resync: Duration,
    /// First quarantine period.
    pub quarantine_initial: Duration,
    /// Longest quarantine period.
    pub quarantine_max: Duration,
    /// Subjects and federated credentials of federated identities.
    pub federation: federation::FederationConfig,
    /// The readiness-gate admission webhook; `None` serves none.
    pub webhook: Option<webhook::WebhookConfig>,
    /// Pre-warming, with how long a warm identity no workload needs lingers; `None` warms nothing.
    pub prewarm_linger: Option<Duration>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            scope: Scope::Namespaced,
            namespace: None,
            lease: None,
            instance: "pod-identity-controller".to_owned(),
            worker: WorkerSettings::default(),
            immutable: Vec::new(),
            drift_budget: 60,
            resync: Duration::from_secs(3600),
            quarantine_initial: Duration::from_secs(300),
            quarantine_max: Duration::from_secs(3600),
            federation: federation::FederationConfig::new(None),
            webhook: None,
            prewarm_linger: None,
        }
    }
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caches could not be filled.
    #[error("the watches stopped before the caches were filled")]
    CachesNotSynced,
    /// The webhook's address could not be bound.
    #[error("listening for admission reviews: {0}")]
    Webhook(std::io::Error),
}

/// Runs the controller until `shutdown` resolves: watches, admin servers, leader election, and while
/// leading the planner and workers. Every task lives inside this future, so dropping it (or aborting
/// its task) stops them all, as a killed process would.
pub async fn run(
    config: ControllerConfig,
    client: Client,
    compute: Arc<dyn ComputeApi>,
    admin: Vec<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks: JoinSet<()> = JoinSet::new();
    for listener in admin {
        let (ready, metrics) = (ready.clone(), metrics.clone());
        tasks.spawn(async move {
            if let Err(err) = admin::serve(listener, ready, metrics).await {
                warn!(error = %err, "admin server stopped");
            }
        });
    }
    let (stores, notify, watches) = planner::reflectors(&client, config.namespace.as_deref());
    tasks.spawn(watches);
    let prewarming = config.prewarm_linger.map(|linger| {
        let (workloads, watches) =
            prewarm::Workloads::reflectors(&client, config.namespace.as_deref(), notify.clone());
        tasks.spawn(watches);
        planner::Prewarming { workloads, linger }
    });
    let (events, publisher) = Events::new(client.clone(), config.instance.clone(), metrics.clone());
    tasks.spawn(publisher);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut elector_task = None;
    let mut leadership = match &config.lease {
        Some(lease) => {
            let mut stop = stop_rx.clone();
            let (leadership, elector) =
                leader::elect(client.clone(), lease.clone(), metrics.clone(), async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                });
            elector_task = Some(AbortOnDrop(tokio::spawn(elector)));
            leadership
        }
        None => {
            metrics.leader.set(1);
            Leadership::always()
        }
    };
    if let Some(webhook) = &config.webhook {
        webhook::spawn(webhook, &client, leadership.clone(), &mut tasks)
            .await
            .map_err(Error::Webhook)?;
    }
    let shared = Arc::new(Shared {
        compute,
        records: Arc::new(KubeRecords::new(client.clone())),
        quarantine: Mutex::new(Quarantine::new(config.quarantine_initial, config.quarantine_max)),
        drift_budget: Mutex::new(ReadBudget::new(
            config.drift_budget,
            config.worker.drift_interval,
            Instant::now(),
        )),
        holds: Mutex::new(SubscriptionHolds::default()),
        last_known: Mutex::default(),
        protection: Protection::new(&config.immutable),
        metrics: metrics.clone(),
        events,
        leadership: leadership.clone(),
        settings: config.worker.clone(),
    });

    tokio::pin!(shutdown);
    let synced = tokio::select! {
        synced = async {
            planner::wait_ready(&stores).await
                && match &prewarming {
                    Some(p) => p.workloads.ready().await,
                    None => true,
                }
        } => synced,
        () = &mut shutdown => return Ok(()),
    };
    if !synced {
        return Err(Error::CachesNotSynced);
    }
    ready.store(true, Ordering::Release);
    loop {
        tokio::select! {
            () = leadership.acquired() => {}
            () = &mut shutdown => break,
        }
        info!(instance = %config.instance, "leading: planning and assigning");
        let planning = async {
            tokio::join!(
                planner::run(
                    stores.clone(),
                    notify.clone(),
                    shared.clone(),
                    config.scope,
                    config.resync,
                    prewarming.clone(),
                ),
                federation::reconciler::run(
                    client.clone(),
                    config.federation.clone(),
                    config.namespace.clone(),
                    shared.events.clone(),
                    metrics.clone(),
                ),
            );
        };
        let mut lost = leadership.clone();
        tokio::select! {
            () = planning => {}
            () = lost.lost() => warn!("no longer leading: stopped planning and assigning"),
            () = &mut shutdown => break,
        }
    }
    // Hand the Lease over before going, so the standby need not wait for it to expire.
    let _ = stop_tx.send(true);
    if let Some(AbortOnDrop(handle)) = elector_task.as_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
    }
    drop(tasks);
    Ok(())
}

/// A task that ends when its owner is dropped (a plain `JoinHandle` would leave it running).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
