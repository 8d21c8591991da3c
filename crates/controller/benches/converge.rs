//! The controller's ARM budget: how many ARM calls each kind of cluster change costs, how long pods wait for
//! their identities, and what the controller spends doing it.
//!
//! A real kube-apiserver; the emulator as Azure with 100 ms on every ARM request, 2 s long-running scale-set
//! updates (polled every second, as ARM's `Retry-After` says) and ARM's documented throttling limits; 50
//! nodes in 5 scale sets; 100 identities, each bound to its own selector; the controller as its own process
//! (the release binary), so that its CPU time and memory are its own. Pod `i` runs on node `i % 50` with the
//! selector of identity `i % 100`, so each scale set needs 20 identities.
//!
//! Phases, one after the other in one cluster (each waits until it has converged: every pod's assignment
//! `Assigned`, no assignment of a deleted pod, and every scale set holding exactly the identities its pods
//! need):
//! - **burst**: 2,000 pods created at once (32 requests in flight);
//! - **churn**: 10% of the pods replaced (deleted, and as many created on the same nodes);
//! - **upgrade**: every node of every scale set replaced one by one (a surge node joins the scale set, the
//!   old node's pods are deleted and created again spread over every schedulable node, the old node goes),
//!   one node every `BENCH_UPGRADE_STEP_MS` (2 s);
//! - **scale-down**: every pod deleted;
//! - **rolling**: 2,000 pods created at 20 per second;
//! - **quiet hour**: nothing changes; the controller restarted with a drift interval of 3 s instead of 3 min,
//!   so that 60 s stand for one hour (60× compressed): what a steady cluster costs;
//! - then, in a second cluster with throttling off, **burst** and **upgrade** again: the upgrade's reference
//!   run, to which the throttled one is compared.
//!
//! Reported per phase, in one table: ARM calls by kind (PATCH, GET of a machine, operation polls), 429
//! answers and requests sent inside a `Retry-After` window (the emulator marks them), calls per scale set
//! against the fewest that phase allows, per-pod time from creation to `Assigned` (p50, p99), the
//! controller's CPU time and peak RSS. The fewest calls of a phase: for each scale set whose identities
//! changed, one read on first contact, one PATCH, its polls and the read that ends it; one drift read per
//! scale set per drift interval elapsed.
//!
//! `BENCH_SWEEP=0.2,0.5,1,2,5` instead measures the batch window: for each window (seconds), a fresh cluster
//! gets a burst and a rolling arrival (`BENCH_SWEEP_ROLLING` pods at 20/s, 500).
//!
//! `cargo bench -p pod-identity-controller --bench converge`; `BENCH_PODS`, `BENCH_ARM_LATENCY_MS`,
//! `BENCH_LRO_MS`, `BENCH_UPGRADE_STEP_MS`, `BENCH_UPGRADE_SETS` (5), `BENCH_WINDOW` (the controller's
//! `--batch-window`, 1 s), `BENCH_WATCHED` (20,000 watched pods after the quiet hour, for memory; 0 for
//! none) change the sizes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use kube::{Api, api::DeleteParams, runtime::watcher};
use pod_identity_api::{
    AssignmentStatus, AzureAssignedIdentity, POD_LABEL,
    fixtures::{binding, user_assigned_identity},
};
use pod_identity_emulator::{Config, Emulator, FaultSpec, LogFilter, RequestRecord, Service};
use pod_identity_test_support::{
    ControlPlane, TestNamespace,
    fixtures::{self, PodTemplate},
};
use serde_json::json;

const TENANT: &str = "11111111-1111-4111-8111-111111111111";
const SUB: &str = "22222222-2222-4222-8222-222222222222";
const CTL_CLIENT: &str = "c0000000-0000-4000-8000-000000000001";
const CTL_OBJECT: &str = "c0000000-0000-4000-8000-0000000000f1";
const CTL_SECRET: &str = "controller-secret";
const SCALE_SETS: usize = 5;
const NODES_PER_SET: usize = 10;
const IDENTITIES: usize = 100;
/// The controller's default drift interval.
const DRIFT: Duration = Duration::from_secs(180);
/// How much the quiet hour is compressed.
const QUIET_COMPRESSION: u32 = 60;
/// The emulator's poll interval (`Retry-After` on a running operation).
const POLL: Duration = Duration::from_secs(1);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn uami(n: usize) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg-ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-{n:03}"
    )
}

fn client_of(n: usize) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000")
}

fn scale_set(s: usize) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg-nodes/providers/Microsoft.Compute/virtualMachineScaleSets/pool-{s}"
    )
}

/// CPU seconds (user + system), resident and peak resident memory (MiB) of a process.
fn usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (ticks / 100.0, kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// Starts a new peak-RSS measurement (Linux: writing 5 to `clear_refs` resets `VmHWM`).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The sizes and timings of a run.
#[derive(Clone, Debug)]
struct Sizes {
    pods: usize,
    latency_ms: u64,
    lro_ms: u64,
    step: Duration,
    upgrade_sets: usize,
    window: Duration,
}

/// The controller process.
struct Controller {
    child: Child,
    pid: u32,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod the benchmark created.
#[derive(Clone, Debug)]
struct PodInfo {
    node: String,
    identity: usize,
    created: Instant,
}

/// What the benchmark sees of assignments, from a watch.
#[derive(Default)]
struct Seen {
    /// When each assignment was first seen `Assigned`.
    assigned: HashMap<String, Instant>,
    /// Assignments that exist now.
    present: BTreeSet<String>,
    /// Assignments listed again after the watch restarted, until the list is complete.
    relisting: Option<BTreeSet<String>>,
}

/// One cluster: a namespace, the emulator, the controller, and the benchmark's view of the pods.
struct World {
    ns: TestNamespace,
    em: Emulator,
    sizes: Sizes,
    controller: Option<Controller>,
    controller_args: Vec<String>,
    seen: Arc<Mutex<Seen>>,
    pods: BTreeMap<String, PodInfo>,
    /// Schedulable nodes, by scale set.
    nodes: Vec<Vec<String>>,
    next_pod: usize,
    next_instance: Vec<usize>,
    _dir: tempfile::TempDir,
    _watch: tokio::task::JoinHandle<()>,
}

/// What one phase cost.
struct Row {
    name: String,
    duration: Duration,
    patches: usize,
    gets: usize,
    polls: usize,
    throttled: usize,
    early: usize,
    min_calls: usize,
    mic: Option<usize>,
    latencies: Vec<Duration>,
    cpu: f64,
    peak_rss: f64,
}

impl Row {
    fn calls(&self) -> usize {
        self.patches + self.gets + self.polls
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[at.min(sorted.len() - 1)])
}

impl World {
    async fn new(sizes: Sizes, throttling: bool, extra_args: &[String]) -> Self {
        let identities: Vec<_> = (0..IDENTITIES)
            .map(|n| json!({"name": format!("id-{n:03}"), "clientId": client_of(n), "principalId": client_of(n + 1000)}))
            .collect();
        let sets: Vec<_> = (0..SCALE_SETS)
            .map(|s| json!({"name": format!("pool-{s}"), "identity": {"systemAssigned": {}}}))
            .collect();
        let seed = serde_json::from_value(json!({
            "tenants": [{"id": TENANT, "applications": [
                {"displayName": "controller", "clientId": CTL_CLIENT, "objectId": CTL_OBJECT, "secrets": [CTL_SECRET]}]}],
            "subscriptions": [{"id": SUB, "tenantId": TENANT, "resourceGroups": [
                {"name": "rg-ids", "location": "westeurope", "userAssignedIdentities": identities},
                {"name": "rg-nodes", "location": "westeurope", "virtualMachineScaleSets": sets}]}],
            "roleAssignments": [{"principalId": CTL_OBJECT, "scope": format!("/subscriptions/{SUB}"), "roleDefinitionName": "Contributor"}],
        }))
        .unwrap();
        let mut config = Config::new(seed);
        config.log_capacity = 1_000_000;
        let em = Emulator::start(config).await.unwrap();
        em.update_settings(|s| {
            s.lro_duration_ms = sizes.lro_ms;
            s.lro_poll_interval_secs = POLL.as_secs();
            s.throttling.enabled = throttling;
        });
        em.inject(FaultSpec {
            service: Some(Service::Arm),
            latency_ms: Some(sizes.latency_ms),
            ..FaultSpec::default()
        });

        let plane = ControlPlane::shared().await;
        let ns = plane.namespace().await.unwrap();
        let client = ns.client.clone();
        fixtures::apply_crds(&client, &pod_identity_api::crds::all())
            .await
            .unwrap();
        let mut nodes = vec![Vec::new(); SCALE_SETS];
        for (s, set) in nodes.iter_mut().enumerate() {
            for i in 0..NODES_PER_SET {
                let name = node_name(&ns.name, s, i);
                let provider = format!("azure://{}/virtualMachines/{i}", scale_set(s));
                fixtures::create_node(&client, &name, Some(&provider))
                    .await
                    .unwrap();
                set.push(name);
            }
        }
        for n in 0..IDENTITIES {
            let name = format!("id-{n:03}");
            let identity = user_assigned_identity(&ns.name, &name, &client_of(n)).with_resource_id(&uami(n));
            fixtures::create(&client, &identity).await.unwrap();
            let binding = binding(&ns.name, &name, &name, &format!("sel-{n:03}"));
            fixtures::create(&client, &binding).await.unwrap();
        }

        // The benchmark's own view of the assignments.
        let seen = Arc::new(Mutex::new(Seen::default()));
        let watch = {
            let seen = seen.clone();
            let api = Api::<AzureAssignedIdentity>::namespaced(client.clone(), &ns.name);
            tokio::spawn(async move {
                let mut events = watcher(api, watcher::Config::default()).boxed();
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let now = Instant::now();
                    let mut seen = seen.lock().unwrap();
                    let note = |aai: &AzureAssignedIdentity, seen: &mut Seen| {
                        let name = aai.metadata.name.clone().unwrap_or_default();
                        if aai.metadata.deletion_timestamp.is_some() {
                            seen.present.remove(&name);
                            return;
                        }
                        if aai.assignment_status() == AssignmentStatus::Assigned {
                            seen.assigned.entry(name.clone()).or_insert(now);
                        }
                        seen.present.insert(name);
                    };
                    match event {
                        watcher::Event::Apply(aai) => note(&aai, &mut seen),
                        watcher::Event::InitApply(aai) => {
                            note(&aai, &mut seen);
                            if let Some(listed) = &mut seen.relisting {
                                listed.insert(aai.metadata.name.clone().unwrap_or_default());
                            }
                        }
                        watcher::Event::Delete(aai) => {
                            seen.present
                                .remove(&aai.metadata.name.clone().unwrap_or_default());
                        }
                        watcher::Event::Init => seen.relisting = Some(BTreeSet::new()),
                        watcher::Event::InitDone => {
                            if let Some(listed) = seen.relisting.take() {
                                seen.present = listed;
                            }
                        }
                    }
                }
            })
        };

        let dir = tempfile::tempdir().unwrap();
        let azure_json = dir.path().join("azure.json");
        std::fs::write(
            &azure_json,
            json!({"cloud": "AzurePublicCloud", "tenantId": TENANT, "subscriptionId": SUB,
                   "aadClientId": CTL_CLIENT, "aadClientSecret": CTL_SECRET})
            .to_string(),
        )
        .unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, em.ca_pem()).unwrap();
        let mut controller_args = vec![
            format!("--kubeconfig={}", plane.admin_kubeconfig().display()),
            format!("--cloudconfig={}", azure_json.display()),
            format!("--arm-endpoint={}", em.azure_url()),
            format!("--authority-host={}", em.azure_url()),
            format!("--azure-ca-file={}", ca.display()),
            format!("--namespace={}", ns.name),
            format!("--batch-window={}ms", sizes.window.as_millis()),
            "--leader-elect=false".to_owned(),
            "--bind-address=127.0.0.1".to_owned(),
            "--prometheus-port=0".to_owned(),
        ];
        controller_args.extend(extra_args.iter().cloned());
        let mut world = Self {
            ns,
            em,
            sizes,
            controller: None,
            controller_args,
            seen,
            pods: BTreeMap::new(),
            nodes,
            next_pod: 0,
            next_instance: vec![NODES_PER_SET; SCALE_SETS],
            _dir: dir,
            _watch: watch,
        };
        world.start_controller(&[]).await;
        world
    }

    /// (Re)starts the controller with `extra` flags and waits until it answers its probe.
    async fn start_controller(&mut self, extra: &[String]) {
        self.controller = None;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_pod-identity-controller"))
            .args(&self.controller_args)
            .args(extra)
            .arg(format!("--http-probe-port={port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.controller = Some(Controller { child, pid });
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the controller never listened"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Its caches fill; an idle controller makes no ARM call meanwhile.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    fn pid(&self) -> u32 {
        self.controller.as_ref().unwrap().pid
    }

    fn client(&self) -> kube::Client {
        self.ns.client.clone()
    }

    fn all_nodes(&self) -> Vec<String> {
        self.nodes.iter().flatten().cloned().collect()
    }

    fn set_of(&self, node: &str) -> usize {
        self.nodes
            .iter()
            .position(|set| set.iter().any(|n| n == node))
            .unwrap()
    }

    fn aai_name(&self, pod: &str, identity: usize) -> String {
        format!("{pod}-{}-id-{identity:03}", self.ns.name)
    }

    /// New pods (name, node, identity); returns their names.
    fn plan_pods(
        &mut self,
        placements: impl IntoIterator<Item = (String, usize)>,
    ) -> Vec<(String, String, usize)> {
        placements
            .into_iter()
            .map(|(node, identity)| {
                let name = format!("pod-{:05}", self.next_pod);
                self.next_pod += 1;
                (name, node, identity)
            })
            .collect()
    }

    /// Creates pods, `concurrency` requests at a time, each one `every` after the previous (none: at once).
    async fn create_pods(&mut self, pods: Vec<(String, String, usize)>, every: Option<Duration>) {
        let client = self.client();
        let ns = self.ns.name.clone();
        let started = Instant::now();
        let created: Vec<(String, PodInfo)> = stream::iter(pods.into_iter().enumerate())
            .map(|(i, (name, node, identity))| {
                let (client, ns) = (client.clone(), ns.clone());
                async move {
                    if let Some(every) = every {
                        tokio::time::sleep_until((started + every * i as u32).into()).await;
                    }
                    let template = PodTemplate {
                        namespace: ns,
                        name: name.clone(),
                        labels: BTreeMap::from([(POD_LABEL.to_owned(), format!("sel-{identity:03}"))]),
                        node: Some(node.clone()),
                        ip: Some(format!(
                            "10.{}.{}.{}",
                            1 + (i / 65536) % 200,
                            (i / 256) % 256,
                            i % 256
                        )),
                    };
                    let created = Instant::now();
                    fixtures::create_pod(&client, &template).await.unwrap();
                    (
                        name,
                        PodInfo {
                            node,
                            identity,
                            created,
                        },
                    )
                }
            })
            .buffer_unordered(if every.is_some() { 256 } else { 32 })
            .collect()
            .await;
        self.pods.extend(created);
    }

    async fn delete_pods(&mut self, names: &[String]) {
        let api = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client(), &self.ns.name);
        stream::iter(names)
            .map(|name| {
                let api = api.clone();
                async move {
                    let _ = api
                        .delete(
                            name,
                            &DeleteParams {
                                grace_period_seconds: Some(0),
                                ..DeleteParams::default()
                            },
                        )
                        .await;
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        for name in names {
            self.pods.remove(name);
        }
    }

    /// The identities each scale set must hold for the pods there now.
    fn expected(&self) -> Vec<BTreeSet<String>> {
        let mut sets = vec![BTreeSet::new(); SCALE_SETS];
        for pod in self.pods.values() {
            sets[self.set_of(&pod.node)].insert(uami(pod.identity).to_lowercase());
        }
        sets
    }

    /// The identities each scale set holds.
    fn held(&self) -> Vec<BTreeSet<String>> {
        let snapshot = self.em.snapshot();
        (0..SCALE_SETS)
            .map(|s| {
                snapshot
                    .subscriptions
                    .iter()
                    .flat_map(|sub| &sub.resource_groups)
                    .flat_map(|g| &g.virtual_machine_scale_sets)
                    .find(|ss| ss.name == format!("pool-{s}"))
                    .map(|ss| {
                        ss.identity
                            .user_assigned_identities
                            .iter()
                            .map(|id| id.to_lowercase())
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Waits until every pod's assignment is `Assigned`, no other assignment exists, and every scale set
    /// holds exactly what its pods need.
    async fn converge(&self, phase: &str) {
        let wanted: BTreeSet<String> = self
            .pods
            .iter()
            .map(|(name, pod)| self.aai_name(name, pod.identity))
            .collect();
        let started = Instant::now();
        loop {
            let (missing, extra) = {
                let seen = self.seen.lock().unwrap();
                let missing = wanted
                    .iter()
                    .filter(|n| !seen.assigned.contains_key(*n) || !seen.present.contains(*n))
                    .count();
                let extra = seen.present.iter().filter(|n| !wanted.contains(*n)).count();
                (missing, extra)
            };
            if missing == 0 && extra == 0 && self.held() == self.expected() {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1800),
                "{phase}: no convergence: {missing} not assigned, {extra} left over"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `body`, waits for convergence, and measures.
    async fn phase<F: AsyncFnOnce(&mut Self)>(
        &mut self,
        name: &str,
        first_contact: bool,
        mic: Option<usize>,
        body: F,
    ) -> Row {
        let before_held = self.held();
        let before_pods: BTreeSet<String> = self.pods.keys().cloned().collect();
        let seq = self.em.last_seq();
        let pid = self.pid();
        reset_peak(pid);
        let (cpu0, _, _) = usage(pid);
        let started = Instant::now();
        body(self).await;
        self.converge(name).await;
        let duration = started.elapsed();
        let (cpu1, _, peak) = usage(pid);
        let requests = self.em.requests(&LogFilter {
            service: Some(Service::Arm),
            since: Some(seq),
            ..LogFilter::default()
        });
        let after_held = self.held();
        let changed = before_held
            .iter()
            .zip(&after_held)
            .filter(|(a, b)| a != b)
            .count();
        let latencies = self.latencies(&before_pods);
        let mut row = Row {
            name: name.to_owned(),
            duration,
            patches: 0,
            gets: 0,
            polls: 0,
            throttled: 0,
            early: 0,
            min_calls: changed * (usize::from(first_contact) + 2 + self.polls_per_update()),
            mic,
            latencies,
            cpu: cpu1 - cpu0,
            peak_rss: peak,
        };
        count(&requests, &mut row);
        row
    }

    /// Polls of one update: the client waits the `Retry-After` of the PATCH, then polls until done.
    fn polls_per_update(&self) -> usize {
        (self.sizes.lro_ms as usize)
            .div_ceil(POLL.as_millis() as usize)
            .max(1)
    }

    /// Time to `Assigned` of every pod created since `before` (still there).
    fn latencies(&self, before: &BTreeSet<String>) -> Vec<Duration> {
        let seen = self.seen.lock().unwrap();
        let mut latencies: Vec<Duration> = self
            .pods
            .iter()
            .filter(|(name, _)| !before.contains(*name))
            .filter_map(|(name, pod)| {
                seen.assigned
                    .get(&self.aai_name(name, pod.identity))
                    .map(|at| at.saturating_duration_since(pod.created))
            })
            .collect();
        latencies.sort();
        latencies
    }

    // Phases.

    /// `count` pods, pod `i` on node `i % 50` with identity `i % 100`.
    fn layout(&mut self, count: usize) -> Vec<(String, String, usize)> {
        let nodes = self.all_nodes();
        let placements: Vec<(String, usize)> = (0..count)
            .map(|i| (nodes[i % nodes.len()].clone(), i % IDENTITIES))
            .collect();
        self.plan_pods(placements)
    }

    async fn burst(&mut self) {
        let pods = self.layout(self.sizes.pods);
        self.create_pods(pods, None).await;
    }

    async fn rolling(&mut self, count: usize) {
        let pods = self.layout(count);
        self.create_pods(pods, Some(Duration::from_millis(50))).await;
    }

    async fn churn(&mut self) {
        let names: Vec<String> = self.pods.keys().step_by(10).cloned().collect();
        let replacements: Vec<(String, usize)> = names
            .iter()
            .map(|n| (self.pods[n].node.clone(), self.pods[n].identity))
            .collect();
        self.delete_pods(&names).await;
        let pods = self.plan_pods(replacements);
        self.create_pods(pods, None).await;
    }

    async fn scale_down(&mut self) {
        let names: Vec<String> = self.pods.keys().cloned().collect();
        self.delete_pods(&names).await;
    }

    /// Every node of the first `BENCH_UPGRADE_SETS` scale sets replaced one by one.
    async fn upgrade(&mut self) {
        let mut cursor = 0usize;
        for s in 0..self.sizes.upgrade_sets {
            let old_nodes = self.nodes[s].clone();
            for old in old_nodes {
                let step = Instant::now();
                // A surge node joins the scale set.
                let instance = self.next_instance[s];
                self.next_instance[s] += 1;
                let surge = node_name(&self.ns.name, s, instance);
                let provider = format!("azure://{}/virtualMachines/{instance}", scale_set(s));
                fixtures::create_node(&self.client(), &surge, Some(&provider))
                    .await
                    .unwrap();
                self.nodes[s].push(surge);
                // The old node is drained: its pods go, and come back spread over every other node.
                self.nodes[s].retain(|n| n != &old);
                let evicted: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(_, p)| p.node == old)
                    .map(|(n, _)| n.clone())
                    .collect();
                let identities: Vec<usize> = evicted.iter().map(|n| self.pods[n].identity).collect();
                self.delete_pods(&evicted).await;
                let nodes = self.all_nodes();
                let placements: Vec<(String, usize)> = identities
                    .into_iter()
                    .map(|identity| {
                        cursor += 1;
                        (nodes[cursor % nodes.len()].clone(), identity)
                    })
                    .collect();
                let pods = self.plan_pods(placements);
                self.create_pods(pods, None).await;
                Api::<k8s_openapi::api::core::v1::Node>::all(self.client())
                    .delete(&old, &DeleteParams::default())
                    .await
                    .unwrap();
                tokio::time::sleep_until((step + self.sizes.step).into()).await;
            }
        }
    }

    /// Nothing changes for `duration`.
    async fn quiet(&mut self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}

fn node_name(ns: &str, set: usize, instance: usize) -> String {
    format!("{ns}-pool{set}-{instance}")
}

/// Sorts the ARM requests of a phase into the row.
fn count(requests: &[RequestRecord], row: &mut Row) {
    for r in requests {
        let path = r.path.to_lowercase();
        let machine = path.contains("/providers/microsoft.compute/virtualmachinescalesets/")
            || path.contains("/providers/microsoft.compute/virtualmachines/");
        if path.contains("/operations/") {
            row.polls += 1;
        } else if machine && r.method == "PATCH" {
            row.patches += 1;
        } else if machine && r.method == "GET" {
            row.gets += 1;
        } else {
            continue;
        }
        row.throttled += usize::from(r.status == 429);
        row.early += usize::from(r.inside_retry_after);
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "–".to_owned(), |d| format!("{:.1}", d.as_secs_f64()))
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<22} {:>7} {:>6} {:>5} {:>6} {:>5} {:>6} {:>6} {:>9} {:>8} {:>5} {:>6} {:>6} {:>7} {:>8}",
        "phase",
        "time s",
        "PATCH",
        "GET",
        "polls",
        "429",
        "early",
        "calls",
        "per set",
        "min/set",
        "MIC",
        "p50 s",
        "p99 s",
        "CPU s",
        "peak MiB"
    );
    for row in rows {
        let per_set = row.calls() as f64 / SCALE_SETS as f64;
        let min_per_set = row.min_calls as f64 / SCALE_SETS as f64;
        println!(
            "{:<22} {:>7.1} {:>6} {:>5} {:>6} {:>5} {:>6} {:>6} {:>9.1} {:>8.1} {:>5} {:>6} {:>6} {:>7.2} {:>8.1}",
            row.name,
            row.duration.as_secs_f64(),
            row.patches,
            row.gets,
            row.polls,
            row.throttled,
            row.early,
            row.calls(),
            per_set,
            min_per_set,
            row.mic.map_or_else(|| "–".to_owned(), |m| m.to_string()),
            secs(percentile(&row.latencies, 0.5)),
            secs(percentile(&row.latencies, 0.99)),
            row.cpu,
            row.peak_rss,
        );
    }
}

fn sizes() -> Sizes {
    Sizes {
        pods: env_or("BENCH_PODS", 2000),
        latency_ms: env_or("BENCH_ARM_LATENCY_MS", 100) as u64,
        lro_ms: env_or("BENCH_LRO_MS", 2000) as u64,
        step: Duration::from_millis(env_or("BENCH_UPGRADE_STEP_MS", 2000) as u64),
        upgrade_sets: env_or("BENCH_UPGRADE_SETS", SCALE_SETS).min(SCALE_SETS),
        window: std::env::var("BENCH_WINDOW")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs_f64),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    pod_identity_test_support::install_crypto_provider();
    let sizes = sizes();
    if let Ok(sweep) = std::env::var("BENCH_SWEEP") {
        return window_sweep(&sizes, &sweep).await;
    }
    println!(
        "== ARM budget: {} pods, {IDENTITIES} identities, {} nodes in {SCALE_SETS} scale sets; ARM {} ms per request, \
         scale-set updates {} ms (polled every {} s); batch window {} ms; drift interval {} s",
        sizes.pods,
        SCALE_SETS * NODES_PER_SET,
        sizes.latency_ms,
        sizes.lro_ms,
        POLL.as_secs(),
        sizes.window.as_millis(),
        DRIFT.as_secs()
    );
    let mut rows = Vec::new();

    // ARM's documented throttling limits.
    let mut world = World::new(sizes.clone(), true, &[]).await;
    rows.push(
        world
            .phase("burst", true, Some(34), async |w| w.burst().await)
            .await,
    );
    rows.push(
        world
            .phase("churn 10%", false, Some(20), async |w| w.churn().await)
            .await,
    );
    let throttled_upgrade = world
        .phase("upgrade (throttled)", false, None, async |w| w.upgrade().await)
        .await;
    rows.push(throttled_upgrade);
    rows.push(
        world
            .phase("scale-down", false, Some(40), async |w| w.scale_down().await)
            .await,
    );
    let pods = sizes.pods;
    rows.push(
        world
            .phase("rolling 20/s", false, None, async move |w| w.rolling(pods).await)
            .await,
    );
    // The quiet hour, compressed: a drift interval of 3 s stands for 3 min.
    let interval = DRIFT / QUIET_COMPRESSION;
    world
        .start_controller(&[format!(
            "--identity-assignment-reconcile-interval={}ms",
            interval.as_millis()
        )])
        .await;
    let hour = Duration::from_secs(3600) / QUIET_COMPRESSION;
    let mut quiet = world
        .phase("quiet hour (60x)", false, None, async move |w| {
            w.quiet(hour).await
        })
        .await;
    // Its floor: one read per scale set per drift interval.
    let intervals = (hour.as_secs_f64() / interval.as_secs_f64()).ceil() as usize;
    quiet.min_calls = SCALE_SETS * intervals;
    rows.push(quiet);
    let quiet_gets_per_set_interval = rows.last().unwrap().gets as f64 / (SCALE_SETS * intervals) as f64;
    let watched = env_or("BENCH_WATCHED", 20_000);
    let memory = if watched > world.pods.len() {
        Some(watched_memory(&mut world, watched).await)
    } else {
        None
    };
    drop(world);

    // The reference: the same burst and upgrade without throttling.
    let mut reference = World::new(sizes.clone(), false, &[]).await;
    rows.push(
        reference
            .phase("burst (unthrottled)", true, Some(34), async |w| w.burst().await)
            .await,
    );
    rows.push(
        reference
            .phase("upgrade (unthrottled)", false, None, async |w| w.upgrade().await)
            .await,
    );
    drop(reference);

    print_table(&rows);
    let find = |name: &str| rows.iter().find(|r| r.name == name).unwrap();
    let (throttled, unthrottled) = (find("upgrade (throttled)"), find("upgrade (unthrottled)"));
    println!(
        "upgrade: {} calls throttled / {} unthrottled = {:.2}; {} answered 429, {} sent inside a Retry-After window",
        throttled.calls(),
        unthrottled.calls(),
        throttled.calls() as f64 / unthrottled.calls().max(1) as f64,
        throttled.throttled,
        throttled.early
    );
    println!(
        "quiet hour: {quiet_gets_per_set_interval:.2} GET per scale set per drift interval ({} GET per scale set per hour)",
        find("quiet hour (60x)").gets / SCALE_SETS
    );
    println!(
        "calls = PATCH + GET + polls (429s included); min/set: per scale set whose identities changed, a read on \
         first contact, one PATCH, {} polls and the read that ends it; MIC: aad-pod-identity 1.8.17, tuned",
        (sizes.lro_ms as usize).div_ceil(POLL.as_millis() as usize)
    );
    if let Some((watched, cpu, rss, peak)) = memory {
        println!(
            "watched: {watched} pods carrying the label ({} bound): controller CPU {cpu:.2} s while they arrived, \
             RSS {rss:.1} MiB ({peak:.1} MiB peak)",
            sizes.pods
        );
    }
}

/// Many more pods carrying the label (watched) but bound to nothing: CPU while they arrive, memory after.
async fn watched_memory(world: &mut World, watched: usize) -> (usize, f64, f64, f64) {
    let nodes = world.all_nodes();
    let client = world.client();
    let ns = world.ns.name.clone();
    let bound = world.pods.len();
    let pid = world.pid();
    let (cpu0, _, _) = usage(pid);
    stream::iter(bound..watched)
        .map(|i| {
            let (client, ns, node) = (client.clone(), ns.clone(), nodes[i % nodes.len()].clone());
            async move {
                let template = PodTemplate {
                    namespace: ns,
                    name: format!("watched-{i:05}"),
                    labels: BTreeMap::from([(POD_LABEL.to_owned(), "unbound".to_owned())]),
                    node: Some(node),
                    ip: None,
                };
                fixtures::create_pod(&client, &template).await.unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    // Let the watch and a few planning passes catch up.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (cpu1, rss, peak) = usage(pid);
    (watched, cpu1 - cpu0, rss, peak)
}

/// The batch window measured: calls saved against latency added, for a burst and a rolling arrival.
async fn window_sweep(sizes: &Sizes, sweep: &str) {
    let rolling = env_or("BENCH_SWEEP_ROLLING", 500);
    println!(
        "== batch window: burst of {} pods, then {rolling} pods at 20/s, in a fresh cluster per window (throttling on)",
        sizes.pods
    );
    println!(
        "{:>8} {:>12} {:>10} {:>10} {:>14} {:>12} {:>12}",
        "window s", "burst calls", "burst p50", "burst p99", "rolling calls", "rolling p50", "rolling p99"
    );
    for window in sweep.split(',').filter_map(|w| w.trim().parse::<f64>().ok()) {
        let sizes = Sizes {
            window: Duration::from_secs_f64(window),
            ..sizes.clone()
        };
        let mut world = World::new(sizes.clone(), true, &[]).await;
        let burst = world.phase("burst", true, None, async |w| w.burst().await).await;
        world
            .phase("scale-down", false, None, async |w| w.scale_down().await)
            .await;
        let arrival = world
            .phase("rolling", false, None, async move |w| w.rolling(rolling).await)
            .await;
        println!(
            "{:>8.1} {:>12} {:>10} {:>10} {:>14} {:>12} {:>12}",
            window,
            burst.calls(),
            secs(percentile(&burst.latencies, 0.5)),
            secs(percentile(&burst.latencies, 0.99)),
            arrival.calls(),
            secs(percentile(&arrival.latencies, 0.5)),
            secs(percentile(&arrival.latencies, 0.99)),
        );
    }
}
