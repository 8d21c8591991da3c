//! What the agent knows of the cluster: this node's pods indexed by IP, this node's assignments, and the
//! bindings, identities and exceptions they refer to. Watches write it ([`crate::watch`]); requests read
//! it and, when the answer may still change (an assignment being made, a pod not seen yet), wait for the
//! next change through [`Shared::subscribe`] instead of polling.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use k8s_openapi::api::core::v1::Pod;
use pod_identity_api::{
    ObjectKey,
    answer::{AssignedView, Assignments},
    matching::{Index, Scope},
    pod::{self, PodView},
};
use tokio::sync::watch;

/// What the agent keeps of a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodRecord {
    /// What the rules read: labels, node, phase, deletion, containers, network, addresses.
    pub view: PodView,
    /// When the pod was created, for the time-to-first-token metric.
    pub created: Option<jiff::Timestamp>,
    /// Its service account, for the audit stream.
    pub service_account: Option<String>,
    /// Its `IdentityReady` readiness gate and condition.
    pub gate: pod_identity_api::readiness::PodGate,
}

impl PodRecord {
    /// The record of a pod object.
    pub fn from_pod(pod: &Pod) -> Self {
        Self {
            view: PodView::from_pod(pod),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            service_account: pod.spec.as_ref().and_then(|s| s.service_account_name.clone()),
            gate: pod_identity_api::readiness::PodGate::of(pod),
        }
    }
}

/// Which watches have delivered their first full list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Pods of this node.
    pub pods: bool,
    /// Assignments of this node (standard mode only).
    pub assigned: bool,
    /// Bindings.
    pub bindings: bool,
    /// Identities.
    pub identities: bool,
    /// Exceptions.
    pub exceptions: bool,
}

/// The cluster as this node's agent sees it.
#[derive(Debug, Default)]
pub struct World {
    /// Shared with the requests that found them, which hold them without copying.
    pods: foldhash::HashMap<ObjectKey, Arc<PodRecord>>,
    /// The same pods by address, so that finding a caller is one lookup.
    by_ip: foldhash::HashMap<IpAddr, Vec<Arc<PodRecord>>>,
    /// Pods that may hold an address the API does not show yet ([`PodView::awaits_its_address`]).
    awaiting_address: HashSet<ObjectKey>,
    assigned: foldhash::HashMap<ObjectKey, AssignedView>,
    /// Bindings, identities and exceptions of all namespaces, indexed for matching as watch events
    /// arrive, so that a request's matching is a lookup whatever the size of the cluster.
    pub matching: Index,
    /// Which lists have arrived.
    pub synced: Synced,
    /// Changes so far ([`Shared::update`]).
    generation: u64,
}

/// Who a caller is, by the source address of its connection.
#[derive(Clone, Debug, PartialEq)]
pub enum Caller<'a> {
    /// That pod ([`pod::caller`]).
    Pod(&'a Arc<PodRecord>),
    /// No pod of this node that may run has that IP (yet).
    Unknown,
    /// Several pods that are not being deleted claim it: a refusal, not a guess.
    Ambiguous(Vec<ObjectKey>),
    /// Only this pod, being deleted, claims it, while a pod of this node may have it unreported.
    Unsettled(ObjectKey),
}

impl World {
    /// An empty world whose matching is namespaced or cross-namespace.
    pub fn new(scope: Scope) -> Self {
        Self {
            matching: Index::empty(scope),
            ..Self::default()
        }
    }

    /// How many changes the world has seen: equal generations are equal worlds, so whatever is decided
    /// from one holds until the next.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Pods of this node.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// The caller with this source address.
    pub fn caller(&self, ip: IpAddr) -> Caller<'_> {
        let claimants = self
            .by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .map(|record| (record, &record.view));
        match pod::caller(claimants, !self.awaiting_address.is_empty()) {
            pod::Caller::Pod(record) => Caller::Pod(record),
            pod::Caller::Unknown => Caller::Unknown,
            pod::Caller::Ambiguous(records) => {
                Caller::Ambiguous(records.iter().map(|r| r.view.key.clone()).collect())
            }
            pod::Caller::Unsettled(record) => Caller::Unsettled(record.view.key.clone()),
        }
    }

    /// The pod of that namespace and name.
    pub fn pod(&self, key: &ObjectKey) -> Option<&Arc<PodRecord>> {
        self.pods.get(key)
    }

    /// All pods of this node.
    pub fn pods(&self) -> impl Iterator<Item = &Arc<PodRecord>> {
        self.pods.values()
    }

    /// The assignment of that namespace and name.
    pub fn assigned(&self, key: &ObjectKey) -> Option<&AssignedView> {
        self.assigned.get(key)
    }

    /// Number of objects per kind, for metrics.
    pub fn counts(&self) -> [(&'static str, usize); 5] {
        [
            ("pod", self.pods.len()),
            ("azureassignedidentity", self.assigned.len()),
            ("azureidentitybinding", self.matching.binding_count()),
            ("azureidentity", self.matching.identity_count()),
            ("azurepodidentityexception", self.matching.exception_count()),
        ]
    }

    /// Adds or replaces a pod.
    pub fn upsert_pod(&mut self, record: PodRecord) {
        let key = record.view.key.clone();
        self.remove_pod(&key);
        let record = Arc::new(record);
        for ip in &record.view.ips {
            self.by_ip.entry(*ip).or_default().push(record.clone());
        }
        if record.view.awaits_its_address() {
            self.awaiting_address.insert(key.clone());
        }
        self.pods.insert(key, record);
    }

    /// Forgets a pod.
    pub fn remove_pod(&mut self, key: &ObjectKey) {
        self.awaiting_address.remove(key);
        if let Some(old) = self.pods.remove(key) {
            for ip in &old.view.ips {
                if let Some(records) = self.by_ip.get_mut(ip) {
                    records.retain(|r| r.view.key != *key);
                    if records.is_empty() {
                        self.by_ip.remove(ip);
                    }
                }
            }
        }
    }

    /// Replaces all pods (a relist).
    pub fn replace_pods(&mut self, records: Vec<PodRecord>) {
        self.pods.clear();
        self.by_ip.clear();
        self.awaiting_address.clear();
        for record in records {
            self.upsert_pod(record);
        }
    }

    /// Adds or replaces an assignment.
    pub fn upsert_assigned(&mut self, record: AssignedView) {
        self.assigned.insert(record.key.clone(), record);
    }

    /// Forgets an assignment.
    pub fn remove_assigned(&mut self, key: &ObjectKey) {
        self.assigned.remove(key);
    }

    /// Replaces all assignments (a relist).
    pub fn replace_assigned(&mut self, records: Vec<AssignedView>) {
        self.assigned = records.into_iter().map(|r| (r.key.clone(), r)).collect();
    }
}

impl Assignments for World {
    fn assignment(&self, key: &ObjectKey) -> Option<&AssignedView> {
        self.assigned.get(key)
    }
}

/// Namespace and name of an object.
pub fn key_of<K: kube::Resource>(object: &K) -> ObjectKey {
    ObjectKey::new(
        object.meta().namespace.clone().unwrap_or_default(),
        object.meta().name.clone().unwrap_or_default(),
    )
}

/// The world shared by watches and requests, with a change counter requests can wait on.
#[derive(Debug)]
pub struct Shared {
    world: RwLock<World>,
    version: watch::Sender<u64>,
}

impl Default for Shared {
    fn default() -> Self {
        Self::from_world(World::default())
    }
}

impl Shared {
    /// A new, empty world, namespaced.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A new, empty world matching in `scope`.
    pub fn scoped(scope: Scope) -> Arc<Self> {
        Arc::new(Self::from_world(World::new(scope)))
    }

    fn from_world(world: World) -> Self {
        Self {
            world: RwLock::new(world),
            version: watch::Sender::new(0),
        }
    }

    /// Reads the world. A panic while writing cannot leave it half-changed in a way that matters (every
    /// write replaces whole entries), so a poisoned lock is read through.
    pub fn read(&self) -> RwLockReadGuard<'_, World> {
        self.world.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Changes the world and wakes every request waiting for a change.
    pub fn update<R>(&self, change: impl FnOnce(&mut World) -> R) -> R {
        let result = {
            let mut world: RwLockWriteGuard<'_, World> = self
                .world
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Counted before the change, so that one that panics half-way (the lock is read through
            // afterwards) still starts a new generation, and after it, so that even one that replaces the
            // whole world does.
            let next = world.generation + 1;
            world.generation = next;
            let result = change(&mut world);
            world.generation = next;
            result
        };
        self.version.send_modify(|version| *version += 1);
        result
    }

    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use pod_identity_api::{fixtures::pod_view, pod::Containers};

    use super::*;

    /// A running pod of node `node-a` in `phase`, at `ip` unless it is empty.
    pub(crate) fn pod(namespace: &str, name: &str, ip: &str, phase: &str) -> PodRecord {
        let mut view = pod_view(namespace, name)
            .with_uid(&format!("uid-{name}"))
            .on_node("node-a")
            .with_phase(phase);
        if !ip.is_empty() {
            view = view.with_ip(ip.parse().unwrap());
        }
        PodRecord {
            view,
            created: None,
            service_account: None,
            gate: Default::default(),
        }
    }

    fn deleted(mut record: PodRecord) -> PodRecord {
        record.view.deleting = true;
        record
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn name(caller: Caller<'_>) -> String {
        match caller {
            Caller::Pod(p) => p.view.key.name.clone(),
            Caller::Unknown => "unknown".into(),
            Caller::Ambiguous(keys) => format!("ambiguous {}", keys.len()),
            Caller::Unsettled(key) => format!("unsettled {}", key.name),
        }
    }

    #[test]
    fn a_caller_is_the_one_live_pod_with_its_ip() {
        let mut world = World::default();
        world.upsert_pod(pod("ns", "a", "10.0.0.5", "Running"));
        world.upsert_pod(pod("ns", "old", "10.0.0.5", "Succeeded"));
        world.upsert_pod(pod("ns", "lost", "10.0.0.8", "Unknown"));
        assert_eq!(name(world.caller(ip("10.0.0.5"))), "a");
        assert_eq!(
            name(world.caller(ip("10.0.0.8"))),
            "lost",
            "phase Unknown: the node stopped reporting, the containers did not stop"
        );
        assert_eq!(world.caller(ip("10.0.0.6")), Caller::Unknown);
    }

    #[test]
    fn two_live_pods_on_one_ip_are_ambiguous() {
        let mut world = World::default();
        world.upsert_pod(pod("ns", "a", "10.0.0.5", "Running"));
        world.upsert_pod(pod("ns", "b", "10.0.0.5", "Pending"));
        assert_eq!(name(world.caller(ip("10.0.0.5"))), "ambiguous 2");
    }

    #[test]
    fn host_network_pods_own_no_ip() {
        let mut world = World::default();
        let mut host = pod("ns", "h", "10.0.0.7", "Running");
        host.view.host_network = true;
        world.upsert_pod(host);
        assert_eq!(world.caller(ip("10.0.0.7")), Caller::Unknown);
    }

    #[test]
    fn a_pod_being_deleted_is_the_caller_until_its_containers_stop_or_a_new_pod_has_its_ip() {
        let mut world = World::default();
        world.upsert_pod(deleted(pod("ns", "old", "10.0.0.5", "Running")));
        assert_eq!(
            name(world.caller(ip("10.0.0.5"))),
            "old",
            "its grace period counts"
        );

        // A pod starting on the node, its address not reported yet, may have been given this one.
        world.upsert_pod(pod("ns", "new", "", "Pending"));
        assert_eq!(name(world.caller(ip("10.0.0.5"))), "unsettled old");
        // It reports another address: the old pod is the caller again.
        world.upsert_pod(pod("ns", "new", "10.0.0.9", "Running"));
        assert_eq!(name(world.caller(ip("10.0.0.5"))), "old");
        // It reports this one: it is the caller, never the old pod.
        world.upsert_pod(pod("ns", "new", "10.0.0.5", "Running"));
        assert_eq!(name(world.caller(ip("10.0.0.5"))), "new");
        world.remove_pod(&ObjectKey::new("ns", "new"));

        let mut stopped = deleted(pod("ns", "old", "10.0.0.5", "Running"));
        stopped.view.containers = Containers::NoneRunning;
        world.upsert_pod(stopped);
        assert_eq!(world.caller(ip("10.0.0.5")), Caller::Unknown);
    }

    #[test]
    fn pods_awaiting_an_address_are_tracked_through_updates_removals_and_relists() {
        let mut world = World::default();
        world.upsert_pod(deleted(pod("ns", "old", "10.0.0.5", "Running")));
        world.upsert_pod(pod("ns", "new", "", "Pending"));
        assert_eq!(world.awaiting_address.len(), 1);
        world.remove_pod(&ObjectKey::new("ns", "new"));
        assert!(world.awaiting_address.is_empty());
        world.upsert_pod(pod("ns", "new", "", "Pending"));
        world.replace_pods(vec![deleted(pod("ns", "old", "10.0.0.5", "Running"))]);
        assert!(world.awaiting_address.is_empty());
        assert_eq!(name(world.caller(ip("10.0.0.5"))), "old");
    }

    #[test]
    fn an_ip_change_moves_the_index() {
        let mut world = World::default();
        world.upsert_pod(pod("ns", "a", "10.0.0.5", "Running"));
        world.upsert_pod(pod("ns", "a", "10.0.0.9", "Running"));
        assert_eq!(world.caller(ip("10.0.0.5")), Caller::Unknown);
        assert!(matches!(world.caller(ip("10.0.0.9")), Caller::Pod(_)));
        world.remove_pod(&ObjectKey::new("ns", "a"));
        assert_eq!(world.caller(ip("10.0.0.9")), Caller::Unknown);
        assert!(world.by_ip.is_empty());
    }

    #[tokio::test]
    async fn an_update_wakes_waiters() {
        let shared = Shared::new();
        let mut changes = shared.subscribe();
        changes.borrow_and_update();
        shared.update(|world| world.upsert_pod(pod("ns", "a", "10.0.0.5", "Running")));
        changes.changed().await.unwrap();
        assert!(matches!(shared.read().caller(ip("10.0.0.5")), Caller::Pod(_)));
    }

    #[test]
    fn every_change_starts_a_new_generation_even_one_that_panics_half_way_or_replaces_the_world() {
        let shared = Shared::new();
        let mut seen = vec![shared.read().generation()];
        shared.update(|w| w.upsert_pod(pod("ns", "a", "10.0.0.1", "Running")));
        seen.push(shared.read().generation());
        shared.update(|w| *w = World::default());
        seen.push(shared.read().generation());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            shared.update(|w| {
                w.upsert_pod(pod("ns", "b", "10.0.0.2", "Running"));
                panic!("half-way");
            })
        }));
        assert!(panicked.is_err());
        seen.push(shared.read().generation());
        assert!(shared.read().pod(&ObjectKey::new("ns", "b")).is_some());
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }
}
