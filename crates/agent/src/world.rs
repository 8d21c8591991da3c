//! What the agent knows of the cluster: this node's pods indexed by IP, this node's assignments, and the
//! bindings, identities and exceptions they refer to. Watches write it ([`crate::watch`]); requests read
//! it and, when the answer may still change (an assignment being made, a pod not seen yet), wait for the
//! next change through [`Shared::subscribe`] instead of polling.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use k8s_openapi::api::core::v1::Pod;
use pod_identity_api::{
    AssignmentStatus, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    ObjectKey, matching::PodView,
};
use tokio::sync::watch;

/// What the agent keeps of a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodRecord {
    /// Labels, phase, node, deletion state.
    pub view: PodView,
    /// Every IP of the pod (`status.podIPs`, or `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// Whether the pod shares the node's network (its IP is the node's, not its own).
    pub host_network: bool,
    /// When the pod was created, for the time-to-first-token metric.
    pub created: Option<jiff::Timestamp>,
}

impl PodRecord {
    /// The record of a pod object.
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
        Self {
            view: PodView::from_pod(pod),
            ips,
            host_network: pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }

    /// Whether this pod may own its IP: scheduled, Pending or Running, not being deleted, and not on the
    /// host network. Finished pods keep a stale IP that a new pod may already use.
    pub fn is_live(&self) -> bool {
        !self.view.terminating
            && !self.host_network
            && matches!(
                self.view.phase.as_deref(),
                None | Some("Pending") | Some("Running")
            )
    }
}

/// What the agent keeps of an assignment.
#[derive(Clone, Debug, PartialEq)]
pub struct AssignedRecord {
    /// Namespace and name of the AzureAssignedIdentity.
    pub key: ObjectKey,
    /// The pod it is for.
    pub pod: ObjectKey,
    /// Client ID of the identity it assigned, from its embedded copy.
    pub client_id: Option<String>,
    /// Where it stands.
    pub status: AssignmentStatus,
}

impl AssignedRecord {
    /// The record of an assignment object.
    pub fn from_assigned(assigned: &AzureAssignedIdentity) -> Self {
        Self {
            key: key_of(assigned),
            pod: ObjectKey::new(assigned.spec.pod_namespace.clone(), assigned.spec.pod.clone()),
            client_id: assigned
                .spec
                .azure_identity_ref
                .as_ref()
                .and_then(|identity| identity.spec.client_id.clone()),
            status: assigned.assignment_status(),
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
    pods: HashMap<ObjectKey, PodRecord>,
    by_ip: HashMap<IpAddr, Vec<ObjectKey>>,
    assigned: HashMap<ObjectKey, AssignedRecord>,
    /// Bindings of all namespaces (matching takes slices).
    pub bindings: Vec<AzureIdentityBinding>,
    /// Identities of all namespaces.
    pub identities: Vec<AzureIdentity>,
    /// Exceptions of all namespaces.
    pub exceptions: Vec<AzurePodIdentityException>,
    /// Which lists have arrived.
    pub synced: Synced,
}

/// Who a caller is, by the source address of its connection.
#[derive(Clone, Debug, PartialEq)]
pub enum Caller<'a> {
    /// Exactly one live pod of this node has that IP.
    Pod(&'a PodRecord),
    /// No live pod of this node has it (yet).
    Unknown,
    /// Several live pods claim it: a refusal, not a guess.
    Ambiguous(Vec<ObjectKey>),
}

impl World {
    /// The caller with this source address.
    pub fn caller(&self, ip: IpAddr) -> Caller<'_> {
        let live: Vec<&PodRecord> = self
            .by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|key| self.pods.get(key))
            .filter(|pod| pod.is_live())
            .collect();
        match live.as_slice() {
            [] => Caller::Unknown,
            [pod] => Caller::Pod(pod),
            many => Caller::Ambiguous(many.iter().map(|pod| pod.view.key.clone()).collect()),
        }
    }

    /// The pod of that namespace and name.
    pub fn pod(&self, key: &ObjectKey) -> Option<&PodRecord> {
        self.pods.get(key)
    }

    /// All pods of this node.
    pub fn pods(&self) -> impl Iterator<Item = &PodRecord> {
        self.pods.values()
    }

    /// The assignment of that namespace and name.
    pub fn assigned(&self, key: &ObjectKey) -> Option<&AssignedRecord> {
        self.assigned.get(key)
    }

    /// Number of objects per kind, for metrics.
    pub fn counts(&self) -> [(&'static str, usize); 5] {
        [
            ("pod", self.pods.len()),
            ("azureassignedidentity", self.assigned.len()),
            ("azureidentitybinding", self.bindings.len()),
            ("azureidentity", self.identities.len()),
            ("azurepodidentityexception", self.exceptions.len()),
        ]
    }

    /// Adds or replaces a pod.
    pub fn upsert_pod(&mut self, record: PodRecord) {
        let key = record.view.key.clone();
        self.remove_pod(&key);
        for ip in &record.ips {
            self.by_ip.entry(*ip).or_default().push(key.clone());
        }
        self.pods.insert(key, record);
    }

    /// Forgets a pod.
    pub fn remove_pod(&mut self, key: &ObjectKey) {
        if let Some(old) = self.pods.remove(key) {
            for ip in old.ips {
                if let Some(keys) = self.by_ip.get_mut(&ip) {
                    keys.retain(|k| k != key);
                    if keys.is_empty() {
                        self.by_ip.remove(&ip);
                    }
                }
            }
        }
    }

    /// Replaces all pods (a relist).
    pub fn replace_pods(&mut self, records: Vec<PodRecord>) {
        self.pods.clear();
        self.by_ip.clear();
        for record in records {
            self.upsert_pod(record);
        }
    }

    /// Adds or replaces an assignment.
    pub fn upsert_assigned(&mut self, record: AssignedRecord) {
        self.assigned.insert(record.key.clone(), record);
    }

    /// Forgets an assignment.
    pub fn remove_assigned(&mut self, key: &ObjectKey) {
        self.assigned.remove(key);
    }

    /// Replaces all assignments (a relist).
    pub fn replace_assigned(&mut self, records: Vec<AssignedRecord>) {
        self.assigned = records.into_iter().map(|r| (r.key.clone(), r)).collect();
    }
}

/// Adds or replaces an object of a kind kept as a list, by namespace and name.
pub fn upsert<K: kube::Resource>(list: &mut Vec<K>, object: K) {
    let key = key_of(&object);
    match list.iter_mut().find(|existing| key_of(*existing) == key) {
        Some(slot) => *slot = object,
        None => list.push(object),
    }
}

/// Removes an object of a kind kept as a list.
pub fn remove<K: kube::Resource>(list: &mut Vec<K>, key: &ObjectKey) {
    list.retain(|existing| key_of(existing) != *key);
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
        Self {
            world: RwLock::new(World::default()),
            version: watch::Sender::new(0),
        }
    }
}

impl Shared {
    /// A new, empty world.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
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
            change(&mut world)
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
    use std::collections::BTreeMap;

    use super::*;

    pub(crate) fn pod(namespace: &str, name: &str, ip: &str, phase: &str) -> PodRecord {
        PodRecord {
            view: PodView {
                key: ObjectKey::new(namespace, name),
                uid: Some(format!("uid-{name}")),
                labels: BTreeMap::new(),
                node_name: Some("node-a".into()),
                phase: Some(phase.into()),
                terminating: false,
            },
            ips: vec![ip.parse().unwrap()],
            host_network: false,
            created: None,
        }
    }

    #[test]
    fn a_caller_is_the_one_live_pod_with_its_ip() {
        let mut world = World::default();
        world.upsert_pod(pod("ns", "a", "10.0.0.5", "Running"));
        world.upsert_pod(pod("ns", "old", "10.0.0.5", "Succeeded"));
        let ip = "10.0.0.5".parse().unwrap();
        assert!(matches!(world.caller(ip), Caller::Pod(p) if p.view.key.name == "a"));
        assert_eq!(world.caller("10.0.0.6".parse().unwrap()), Caller::Unknown);
    }

    #[test]
    fn two_live_pods_on_one_ip_are_ambiguous() {
        let mut world = World::default();
        world.upsert_pod(pod("ns", "a", "10.0.0.5", "Running"));
        world.upsert_pod(pod("ns", "b", "10.0.0.5", "Pending"));
        assert!(
            matches!(world.caller("10.0.0.5".parse().unwrap()), Caller::Ambiguous(keys) if keys.len() == 2)
        );
    }

    #[test]
    fn terminating_and_host_network_pods_own_no_ip() {
        let mut world = World::default();
        let mut terminating = pod("ns", "a", "10.0.0.5", "Running");
        terminating.view.terminating = true;
        world.upsert_pod(terminating);
        let mut host = pod("ns", "h", "10.0.0.7", "Running");
        host.host_network = true;
        world.upsert_pod(host);
        assert_eq!(world.caller("10.0.0.5".parse().unwrap()), Caller::Unknown);
        assert_eq!(world.caller("10.0.0.7".parse().unwrap()), Caller::Unknown);
    }

    #[test]
    fn an_ip_change_moves_the_index() {
        let mut world = World::default();
        world.upsert_pod(pod("ns", "a", "10.0.0.5", "Running"));
        world.upsert_pod(pod("ns", "a", "10.0.0.9", "Running"));
        assert_eq!(world.caller("10.0.0.5".parse().unwrap()), Caller::Unknown);
        assert!(matches!(
            world.caller("10.0.0.9".parse().unwrap()),
            Caller::Pod(_)
        ));
        world.remove_pod(&ObjectKey::new("ns", "a"));
        assert_eq!(world.caller("10.0.0.9".parse().unwrap()), Caller::Unknown);
        assert!(world.by_ip.is_empty());
    }

    #[tokio::test]
    async fn an_update_wakes_waiters() {
        let shared = Shared::new();
        let mut changes = shared.subscribe();
        changes.borrow_and_update();
        shared.update(|world| world.upsert_pod(pod("ns", "a", "10.0.0.5", "Running")));
        changes.changed().await.unwrap();
        assert!(matches!(
            shared.read().caller("10.0.0.5".parse().unwrap()),
            Caller::Pod(_)
        ));
    }
}
