//! The event-driven core: reflectors keep the cluster in memory; any change wakes the planner, which
//! (after a short debounce, so a burst of events makes one pass) matches pods to identities, groups the
//! result by machine and hands each machine's input to its worker. Workers only wake when their own
//! input changed, so a pod on one scale set never causes ARM traffic for another.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    Node, NodeSpec, Pod, PodSpec, PodStatus,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use pod_identity_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException, ObjectKey,
    POD_LABEL, matching::Scope, pod::PodView,
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use pod_identity_azure::Machine;

use crate::{
    events::{Notice, Subject},
    machine::Target,
    plan::MachineInput,
    prewarm,
    route::{Cluster, Unplaceable, route},
    worker::{Shared, Worker},
};

/// How long the planner lets a burst of changes gather.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The longest a change waits for a planning pass, however large the cluster.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// The cluster in memory.
#[derive(Clone)]
pub struct Stores {
    /// Pods carrying the binding label (only those are watched).
    pub pods: Store<Pod>,
    /// Nodes, reduced to their provider ID.
    pub nodes: Store<Node>,
    /// Identities.
    pub identities: Store<AzureIdentity>,
    /// Bindings.
    pub bindings: Store<AzureIdentityBinding>,
    /// Exceptions.
    pub exceptions: Store<AzurePodIdentityException>,
    /// Assignment objects.
    pub assignments: Store<AzureAssignedIdentity>,
}

impl Stores {
    /// Waits until every store holds a complete list.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.pods.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        self.identities.wait_until_ready().await?;
        self.bindings.wait_until_ready().await?;
        self.exceptions.wait_until_ready().await?;
        self.assignments.wait_until_ready().await
    }
}

/// Starts watching (all namespaces, or only `namespace`); returns the stores, what wakes the planner,
/// and the task that drives the watches.
pub fn reflectors(
    client: &Client,
    namespace: Option<&str>,
) -> (Stores, Arc<Notify>, impl Future<Output = ()> + use<>) {
    let notify = Arc::new(Notify::new());
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let (pods, pods_task) = reflect(
        api::<Pod>(client, namespace),
        watcher::Config::default().labels(POD_LABEL),
        slim_pod,
        notify.clone(),
    );
    let (nodes, nodes_task) = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        slim_node,
        notify.clone(),
    );
    let (identities, identities_task) = reflect(
        api::<AzureIdentity>(client, namespace),
        watcher::Config::default(),
        drop_managed_fields,
        notify.clone(),
    );
    let (bindings, bindings_task) = reflect(
        api::<AzureIdentityBinding>(client, namespace),
        watcher::Config::default(),
        drop_managed_fields,
        notify.clone(),
    );
    let (exceptions, exceptions_task) = reflect(
        api::<AzurePodIdentityException>(client, namespace),
        watcher::Config::default(),
        drop_managed_fields,
        notify.clone(),
    );
    let (assignments, assignments_task) = reflect(
        api::<AzureAssignedIdentity>(client, namespace),
        watcher::Config::default(),
        drop_managed_fields,
        notify.clone(),
    );
    let task = async move {
        tokio::join!(
            pods_task,
            nodes_task,
            identities_task,
            bindings_task,
            exceptions_task,
            assignments_task
        );
    };
    (
        Stores {
            pods,
            nodes,
            identities,
            bindings,
            exceptions,
            assignments,
        },
        notify,
        task,
    )
}

/// A reflector whose every event wakes `notify`, with `slim` applied to each object first.
pub(crate) fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    slim: fn(&mut K),
    notify: Arc<Notify>,
) -> (Store<K>, impl Future<Output = ()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(slim)
        .reflect(writer);
    let task = stream.for_each(move |event| {
        match event {
            Ok(_) => notify.notify_one(),
            Err(err) => warn!(kind, error = %err, "watch failed; retrying"),
        }
        std::future::ready(())
    });
    (store, task)
}

fn drop_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Keeps of a pod what matching and metrics read: a watched pod costs a few hundred bytes, not the
/// whole spec. A pod being deleted keeps its identities until its containers stop
/// ([`pod_identity_api::pod::Life`]), so for it (and only for it) the state of each container is kept.
fn slim_pod(pod: &mut Pod) {
    let meta = pod.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    let deleting = meta.deletion_timestamp.is_some();
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    pod.spec = Some(PodSpec {
        node_name,
        containers: Vec::new(),
        ..PodSpec::default()
    });
    let status = pod.status.take().unwrap_or_default();
    let states = |statuses: Option<Vec<ContainerStatus>>| {
        statuses
            .filter(|_| deleting)
            .map(|list| list.into_iter().map(slim_container).collect())
    };
    pod.status = Some(PodStatus {
        phase: status.phase,
        conditions: status.conditions.map(|conditions| {
            conditions
                .into_iter()
                .filter(|c| c.type_ == "PodScheduled")
                .collect()
        }),
        init_container_statuses: states(status.init_container_statuses),
        container_statuses: states(status.container_statuses),
        ephemeral_container_statuses: states(status.ephemeral_container_statuses),
        ..PodStatus::default()
    });
}

/// Whether a container runs, waits or has terminated, without the details.
fn slim_container(status: ContainerStatus) -> ContainerStatus {
    ContainerStatus {
        state: status.state.map(|state| ContainerState {
            running: state.running.map(|_| ContainerStateRunning::default()),
            terminated: state.terminated.map(|_| ContainerStateTerminated::default()),
            waiting: state.waiting.map(|_| ContainerStateWaiting::default()),
        }),
        ..ContainerStatus::default()
    }
}

/// Keeps of a node its name, provider ID and agent-pool label (for pre-warming).
fn slim_node(node: &mut Node) {
    let meta = node.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = meta.labels.take().map(|labels| {
        labels
            .into_iter()
            .filter(|(key, _)| prewarm::AGENT_POOL_LABELS.contains(&key.as_str()))
            .collect()
    });
    let provider_id = node.spec.as_ref().and_then(|s| s.provider_id.clone());
    node.spec = Some(NodeSpec {
        provider_id,
        ..NodeSpec::default()
    });
    node.status = None;
}

/// When the pod was scheduled: its `PodScheduled` condition, else its creation.
fn scheduled_at(pod: &Pod) -> Option<jiff::Timestamp> {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled" && c.status == "True"))
        .and_then(|c| c.last_transition_time.as_ref())
        .or(pod.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
}

/// Pre-warming while planning: the workloads, and how long an unneeded warm identity lingers.
#[derive(Clone)]
pub struct Prewarming {
    /// The watched workloads.
    pub workloads: prewarm::Workloads,
    /// How long a warm identity no workload needs stays.
    pub linger: Duration,
}

/// Plans for the cluster while this replica leads; dropping the future stops every worker.
pub async fn run(
    stores: Stores,
    notify: Arc<Notify>,
    shared: Arc<Shared>,
    scope: Scope,
    resync: Duration,
    prewarming: Option<Prewarming>,
) {
    let mut workers: HashMap<Target, watch::Sender<MachineInput>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut reported: HashSet<(ObjectKey, String)> = HashSet::new();
    let mut warmth = prewarming
        .as_ref()
        .map(|_| prewarm::seed(&stores.assignments.state(), jiff::Timestamp::now()));
    loop {
        let started = Instant::now();
        let warming = prewarming.as_ref().zip(warmth.as_mut());
        pass(
            &stores,
            &shared,
            scope,
            &mut workers,
            &mut tasks,
            &mut reported,
            warming,
        );
        // A lingering warm identity is due to go at a moment no watch event marks.
        let linger_ends = prewarming
            .as_ref()
            .zip(warmth.as_ref())
            .and_then(|(p, w)| w.next_expiry(p.linger))
            .map(|at| {
                let wait = at.duration_since(jiff::Timestamp::now());
                Duration::try_from(wait).unwrap_or_default()
            })
            .unwrap_or(resync);
        let took = started.elapsed();
        shared.metrics.reconciled("plan", took.as_secs_f64());
        // A pass over a large cluster costs more; under a storm of changes passes then come less often
        // (at most a fifth of the time goes to planning), yet a change never waits long for one.
        let debounce = DEBOUNCE.max(took * 4).min(MAX_DEBOUNCE);
        tokio::select! {
            () = notify.notified() => tokio::time::sleep(debounce).await,
            () = tokio::time::sleep(resync.min(linger_ends + Duration::from_millis(10))) => debug!("periodic full pass"),
        }
        // Reap workers that ended (they end when their sender goes).
        while let Some(result) = tasks.try_join_next() {
            if let Err(err) = result
                && err.is_panic()
            {
                warn!(error = %err, "a worker panicked");
            }
        }
    }
}

fn pass(
    stores: &Stores,
    shared: &Arc<Shared>,
    scope: Scope,
    workers: &mut HashMap<Target, watch::Sender<MachineInput>>,
    tasks: &mut JoinSet<()>,
    reported: &mut HashSet<(ObjectKey, String)>,
    prewarming: Option<(&Prewarming, &mut prewarm::Warmth)>,
) {
    let pod_objects = stores.pods.state();
    let pods: Vec<PodView> = pod_objects.iter().map(|p| PodView::from_pod(p)).collect();
    let scheduled: HashMap<ObjectKey, jiff::Timestamp> = pods
        .iter()
        .zip(&pod_objects)
        .filter_map(|(view, pod)| scheduled_at(pod).map(|t| (view.key.clone(), t)))
        .collect();
    // Federated identities never touch a VM or scale set: the workers never see them.
    let identities: Vec<AzureIdentity> = crate::federation::served_on_nodes(owned(&stores.identities));
    let bindings: Vec<AzureIdentityBinding> = owned(&stores.bindings);
    let exceptions: Vec<AzurePodIdentityException> = owned(&stores.exceptions);
    let nodes: HashMap<String, Option<Machine>> = stores
        .nodes
        .state()
        .iter()
        .map(|node| {
            let machine = node
                .spec
                .as_ref()
                .and_then(|s| s.provider_id.as_deref())
                .and_then(Machine::from_provider_id);
            (node.metadata.name.clone().unwrap_or_default(), machine)
        })
        .collect();
    let assignments = stores.assignments.state();
    let mut routing = route(&Cluster {
        pods: &pods,
        scheduled: &scheduled,
        bindings: &bindings,
        identities: &identities,
        exceptions: &exceptions,
        nodes: &nodes,
        assignments: &assignments,
        scope,
    });
    if let Some((prewarming, warmth)) = prewarming {
        let pool_nodes: Vec<prewarm::PoolNode> = stores
            .nodes
            .state()
            .iter()
            .filter_map(|node| {
                let machine = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.provider_id.as_deref())
                    .and_then(Machine::from_provider_id)?;
                let pool = node.metadata.labels.as_ref().and_then(prewarm::PoolNode::pool_of);
                Some(prewarm::PoolNode { machine, pool })
            })
            .collect();
        let world = pod_identity_api::matching::World {
            bindings: &bindings,
            identities: &identities,
            exceptions: &exceptions,
            scope,
        };
        let needed = prewarm::needed(&prewarming.workloads.templates(), world, &pool_nodes);
        *warmth = warmth.step(&needed, jiff::Timestamp::now(), prewarming.linger);
        prewarm::add_to(&mut routing, warmth, &identities, &bindings);
    }

    let mut seen: HashSet<Target> = HashSet::new();
    for (target, input) in routing.inputs {
        seen.insert(target.clone());
        match workers.get(&target) {
            Some(tx) => {
                tx.send_if_modified(|current| {
                    if *current == input {
                        false
                    } else {
                        *current = input;
                        true
                    }
                });
            }
            None => {
                debug!(machine = %target, "starting worker");
                let (tx, rx) = watch::channel(input);
                tasks.spawn(Worker::new(target.clone(), shared.clone()).run(rx));
                workers.insert(target, tx);
            }
        }
    }
    // A machine with nothing wanted or recorded has nothing left to do (its records are all released,
    // and only a record can make an identity leave): its worker retires when its sender goes. Records
    // that show up later for it (a watch lagging behind the worker's own writes) start a new one.
    workers.retain(|target, _| {
        let keep = seen.contains(target);
        if !keep {
            debug!(machine = %target, "retiring worker");
        }
        keep
    });
    for (assignment, reason) in routing.unplaceable {
        let text = match &reason {
            Unplaceable::NodeMissing => format!("node {} is not known", assignment.node),
            Unplaceable::NotAnAzureNode(node) => {
                format!("node {node} has no provider ID of an Azure VM or scale set")
            }
        };
        if reported.insert((assignment.pod.clone(), text.clone())) {
            warn!(pod = %assignment.pod, identity = %assignment.identity, node = %assignment.node, reason = %text, "cannot place identity");
            shared.events.publish(Notice {
                subject: Subject::Pod(assignment.pod.clone()),
                warning: true,
                reason: "IdentityNotAssigned",
                action: "AssignIdentity",
                note: format!("Identity {} cannot be assigned: {text}", assignment.identity),
            });
        }
    }
    for (kept, dropped) in routing.collisions {
        warn!(assignment = %kept.assignment, kept = %kept.pod, dropped = %dropped.pod, "two pods map to one assignment name; the second gets none");
    }
    if reported.len() > 100_000 {
        reported.clear();
    }
}

/// Copies of everything in a store (matching takes slices of objects).
fn owned<K: Resource + Clone + 'static>(store: &Store<K>) -> Vec<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.state().iter().map(|o| (**o).clone()).collect()
}

/// Starts every store and waits for them, for callers that only read (the standby's readiness).
pub async fn wait_ready(stores: &Stores) -> bool {
    let ready = stores.ready().await.is_ok();
    if ready {
        info!("caches synced");
    }
    ready
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use pod_identity_api::pod::{Ending, Life};

    use super::*;

    fn pod(deleting: bool, running: bool) -> Pod {
        let state = if running {
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(jiff::Timestamp::UNIX_EPOCH)),
                }),
                ..ContainerState::default()
            }
        } else {
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 0,
                    reason: Some("Completed".into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }
        };
        Pod {
            metadata: kube::api::ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("web".into()),
                deletion_timestamp: deleting.then_some(Time(jiff::Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "app".into(),
                    image: "registry.example/app:1".into(),
                    state: Some(state),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn a_slim_pod_keeps_its_life() {
        for (deleting, running, life) in [
            (false, true, Life::Active),
            (false, false, Life::Active),
            (true, true, Life::Terminating),
            (true, false, Life::Finished(Ending::Stopped)),
        ] {
            let mut slim = pod(deleting, running);
            slim_pod(&mut slim);
            assert_eq!(PodView::from_pod(&slim).life(), life, "{deleting} {running}");
            let statuses = slim.status.as_ref().and_then(|s| s.container_statuses.as_ref());
            assert_eq!(
                statuses.is_some(),
                deleting,
                "container states only of pods being deleted"
            );
            if let Some(status) = statuses.and_then(|s| s.first()) {
                assert!(status.image.is_empty() && status.name.is_empty());
            }
        }
    }
}
