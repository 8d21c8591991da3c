//! The controller against a real kube-apiserver, with the emulator as Azure: nodes whose provider IDs
//! point at emulated scale sets and VMs, identities, bindings and pods created through the API, and the
//! controller running in-process on loopback. Each test has its own namespace, its own emulator and
//! its own controller (watching that namespace only), so tests run in parallel without seeing each
//! other's objects or ARM traffic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
    events::v1::Event,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use pod_identity_api::{
    ASSIGNED_IDENTITY_FINALIZER, AssignmentStatus, AzureAssignedIdentity, AzureAssignedIdentitySpec,
    AzureAssignedIdentityStatus, AzureIdentity, AzureIdentityBinding, EmbeddedAzureIdentity,
    EmbeddedAzureIdentityBinding, NODENAME_LABEL, POD_LABEL,
    fixtures::{binding_of, service_principal, user_assigned_identity},
};
use pod_identity_azure::{AzureConfig, ResourceId};
use pod_identity_controller::{
    ControllerConfig,
    azure::{Endpoints, connect},
    leader::LeaseConfig,
    record::{ERROR_ANNOTATION, MACHINE_ANNOTATION, ORIGIN_ANNOTATION},
    worker::WorkerSettings,
};
use pod_identity_emulator::{Config, Emulator, FaultSpec, LogFilter, RequestRecord, Seed, Service};
use pod_identity_test_support::{
    ControlPlane, TestNamespace, eventually,
    fixtures::{self, PodTemplate},
};
use serde_json::json;
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, sync::oneshot, task::JoinHandle};

const TENANT: &str = "11111111-1111-4111-8111-111111111111";
const SUB: &str = "22222222-2222-4222-8222-222222222222";
const NODES_RG: &str = "rg-nodes";
/// VMs of a second resource group: nodes in any resource group are served.
const OTHER_RG: &str = "rg-other";
const IDS_RG: &str = "rg-identities";
const CTL_CLIENT: &str = "c0000000-0000-4000-8000-000000000001";
const CTL_OBJECT: &str = "c0000000-0000-4000-8000-0000000000f1";
const CTL_SECRET: &str = "controller-secret";
/// Identities the seed defines; `missing` is not among them.
const IDENTITIES: [&str; 8] = [
    "id-a",
    "id-b",
    "id-c",
    "id-d",
    "foreign",
    "kubelet",
    "immutable",
    "id-e",
];

fn uami(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{IDS_RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

fn client_of(name: &str) -> String {
    let h = name
        .bytes()
        .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("{h:08x}-0000-4000-8000-000000000000")
}

fn scale_set(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{NODES_RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}"
    )
}

fn vm(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{OTHER_RG}/providers/Microsoft.Compute/virtualMachines/{name}"
    )
}

/// Two scale sets (`pool-a` holds `foreign` and `kubelet` and its system identity; `pool-b` holds nothing)
/// and one VM in another resource group.
fn seed() -> Seed {
    let identities: Vec<_> = IDENTITIES
        .iter()
        .map(|n| json!({"name": n, "clientId": client_of(n), "principalId": client_of(&format!("{n}-p"))}))
        .collect();
    let instances = json!([{"instanceId": "0"}, {"instanceId": "1"}, {"instanceId": "2"}]);
    serde_json::from_value(json!({
        "tenants": [{"id": TENANT, "applications": [
            {"displayName": "controller", "clientId": CTL_CLIENT, "objectId": CTL_OBJECT, "secrets": [CTL_SECRET]}
        ]}],
        "subscriptions": [{"id": SUB, "tenantId": TENANT, "displayName": "test", "resourceGroups": [
            {"name": IDS_RG, "location": "westeurope", "userAssignedIdentities": identities},
            {"name": NODES_RG, "location": "westeurope", "virtualMachineScaleSets": [
                {"name": "pool-a", "identity": {"systemAssigned": {}, "userAssignedIdentities": [uami("foreign"), uami("kubelet")]}, "instances": instances},
                {"name": "pool-b", "instances": instances},
            ]},
            {"name": OTHER_RG, "location": "westeurope", "virtualMachines": [{"name": "vm-1"}]},
        ]}],
        "roleAssignments": [{"principalId": CTL_OBJECT, "scope": format!("/subscriptions/{SUB}"), "roleDefinitionName": "Contributor"}],
    }))
    .unwrap()
}

/// One test's world: a namespace with the CRDs, an emulator, and nodes on its machines.
struct World {
    ns: TestNamespace,
    em: Emulator,
}

impl World {
    async fn new() -> Self {
        let ns = ControlPlane::shared().await.namespace().await.unwrap();
        fixtures::apply_crds(&ns.client, &pod_identity_api::crds::all())
            .await
            .unwrap();
        let em = Emulator::start(Config::new(seed())).await.unwrap();
        let world = Self { ns, em };
        for (node, provider) in [
            ("a0", format!("azure://{}/virtualMachines/0", scale_set("pool-a"))),
            ("a1", format!("azure://{}/virtualMachines/1", scale_set("pool-a"))),
            ("b0", format!("azure://{}/virtualMachines/0", scale_set("pool-b"))),
            ("vm", format!("azure://{}", vm("vm-1"))),
        ] {
            fixtures::create_node(&world.ns.client, &world.node(node), Some(&provider))
                .await
                .unwrap();
        }
        world
    }

    fn client(&self) -> Client {
        self.ns.client.clone()
    }

    /// Node names are cluster-wide: each test's are prefixed with its namespace.
    fn node(&self, short: &str) -> String {
        format!("{}-{short}", self.ns.name)
    }

    fn config(&self) -> ControllerConfig {
        ControllerConfig {
            namespace: Some(self.ns.name.clone()),
            instance: "controller-0".into(),
            worker: WorkerSettings {
                batch_window: Duration::from_millis(200),
                retry: pod_identity_azure::RetryPolicy {
                    initial_delay: Duration::from_millis(200),
                    max_delay: Duration::from_secs(2),
                    ..pod_identity_azure::RetryPolicy::default()
                },
                drift_interval: Duration::from_secs(3600),
                write_concurrency: 20,
            },
            immutable: vec![client_of("immutable"), client_of("kubelet")],
            quarantine_initial: Duration::from_secs(3600),
            ..ControllerConfig::default()
        }
    }

    fn start(&self, config: ControllerConfig) -> Running {
        let azure = AzureConfig {
            tenant_id: TENANT.into(),
            subscription_id: SUB.into(),
            aad_client_id: CTL_CLIENT.into(),
            aad_client_secret: CTL_SECRET.into(),
            ..AzureConfig::default()
        };
        let compute = connect(
            &azure,
            &Endpoints {
                arm: Some(self.em.azure_url()),
                authority: Some(self.em.azure_url()),
                imds: None,
                extra_ca_pem: Some(self.em.ca_pem().to_owned()),
            },
        )
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let admin = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(pod_identity_controller::run(
            config,
            self.client(),
            Arc::new(compute),
            vec![listener],
            async move {
                let _ = stopped.await;
            },
        ));
        Running {
            task,
            stop: Some(stop),
            admin,
        }
    }

    async fn identity(&self, name: &str, resource: &str) {
        let identity = user_assigned_identity(&self.ns.name, name, &client_of(resource))
            .with_resource_id(&uami(resource));
        fixtures::create(&self.ns.client, &identity).await.unwrap();
    }

    async fn binding(&self, identity: &str, selector: &str) {
        let binding = binding_of(&self.ns.name, identity, selector);
        fixtures::create(&self.ns.client, &binding).await.unwrap();
    }

    /// An identity of `resource` bound to pods labelled with its own name.
    async fn bound_identity(&self, resource: &str) {
        self.identity(resource, resource).await;
        self.binding(resource, resource).await;
    }

    async fn pod(&self, name: &str, node: &str, selector: &str) {
        fixtures::create_pod(
            &self.ns.client,
            &PodTemplate {
                namespace: self.ns.name.clone(),
                name: name.into(),
                labels: BTreeMap::from([(POD_LABEL.to_owned(), selector.to_owned())]),
                node: Some(self.node(node)),
                ip: Some("10.244.0.10".into()),
            },
        )
        .await
        .unwrap();
    }

    async fn delete_pod(&self, name: &str) {
        fixtures::delete_pod_now(&self.ns.client, &self.ns.name, name)
            .await
            .unwrap();
    }

    fn assignment_name(&self, pod: &str, identity: &str) -> String {
        format!("{pod}-{}-{identity}", self.ns.name)
    }

    fn assignments(&self) -> Api<AzureAssignedIdentity> {
        Api::namespaced(self.client(), &self.ns.name)
    }

    async fn wait_assigned(&self, pod: &str, identity: &str) -> AzureAssignedIdentity {
        let name = self.assignment_name(pod, identity);
        eventually(|| async {
            let aai = self.assignments().get(&name).await.context(name.clone())?;
            ensure!(
                aai.assignment_status() == AssignmentStatus::Assigned,
                "{name}: {:?}",
                aai.status
            );
            Ok(aai)
        })
        .await
        .unwrap()
    }

    async fn wait_gone(&self, pod: &str, identity: &str) {
        let name = self.assignment_name(pod, identity);
        eventually(|| async {
            match self.assignments().get_opt(&name).await? {
                None => Ok(()),
                Some(aai) => bail!("{name} still exists: {:?}", aai.status),
            }
        })
        .await
        .unwrap();
    }

    /// The user-assigned identities (lower-case IDs) of a machine, as its model now is.
    fn identities_on(&self, machine: &str) -> Vec<String> {
        let snapshot = self.em.snapshot();
        let mut out = Vec::new();
        for group in snapshot.subscriptions.iter().flat_map(|s| &s.resource_groups) {
            for ss in &group.virtual_machine_scale_sets {
                if scale_set(&ss.name).eq_ignore_ascii_case(machine) {
                    out.extend(
                        ss.identity
                            .user_assigned_identities
                            .iter()
                            .map(|i| i.to_lowercase()),
                    );
                }
            }
            for v in &group.virtual_machines {
                if vm(&v.name).eq_ignore_ascii_case(machine) {
                    out.extend(
                        v.identity
                            .user_assigned_identities
                            .iter()
                            .map(|i| i.to_lowercase()),
                    );
                }
            }
        }
        out.sort();
        out
    }

    fn has(&self, machine: &str, identity: &str) -> bool {
        self.identities_on(machine)
            .contains(&uami(identity).to_lowercase())
    }

    fn system_assigned(&self, machine: &str) -> bool {
        self.em
            .snapshot()
            .subscriptions
            .iter()
            .flat_map(|s| &s.resource_groups)
            .flat_map(|g| &g.virtual_machine_scale_sets)
            .any(|ss| {
                scale_set(&ss.name).eq_ignore_ascii_case(machine) && ss.identity.system_assigned.is_some()
            })
    }

    /// ARM requests on VMs and scale sets (not operations, not Entra).
    fn arm(&self, method: &str) -> Vec<RequestRecord> {
        self.em
            .requests(&LogFilter {
                service: Some(Service::Arm),
                ..LogFilter::default()
            })
            .into_iter()
            .filter(|r| {
                r.method == method
                    && r.path
                        .to_lowercase()
                        .contains("/providers/microsoft.compute/virtualmachine")
            })
            .collect()
    }

    async fn events(&self) -> Vec<Event> {
        Api::<Event>::namespaced(self.client(), &self.ns.name)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
    }
}

struct Running {
    task: JoinHandle<Result<(), pod_identity_controller::Error>>,
    stop: Option<oneshot::Sender<()>>,
    admin: SocketAddr,
}

impl Running {
    /// Ends the controller at once, with no clean-up, as a killed process.
    fn kill(self) {
        self.task.abort();
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }

    /// GET on the admin server.
    async fn admin_get(&self, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        let status = text.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0);
        (status, text)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_pod_gets_its_identity_assigned_and_loses_it_when_the_last_pod_goes() {
    let w = World::new().await;
    w.bound_identity("id-a").await;
    w.bound_identity("id-d").await;
    let controller = w.start(w.config());

    w.pod("web-0", "a0", "id-a").await;
    let aai = w.wait_assigned("web-0", "id-a").await;
    assert!(w.has(&scale_set("pool-a"), "id-a"));
    assert_eq!(aai.labels()[NODENAME_LABEL], w.node("a0"));
    assert!(aai.finalizers().contains(&ASSIGNED_IDENTITY_FINALIZER.to_owned()));
    assert_eq!(aai.annotations()[ORIGIN_ANNOTATION], "added");
    assert!(aai.annotations()[MACHINE_ANNOTATION].eq_ignore_ascii_case(&scale_set("pool-a")));
    assert_eq!(aai.spec.pod, "web-0");
    assert_eq!(aai.spec.nodename, w.node("a0"));

    // A second pod on another node of the same scale set: no further change to Azure.
    let patches = w.arm("PATCH").len();
    w.pod("web-1", "a1", "id-a").await;
    w.wait_assigned("web-1", "id-a").await;
    assert_eq!(w.arm("PATCH").len(), patches, "the scale set already holds it");

    // A VM in another resource group.
    w.pod("solo", "vm", "id-d").await;
    w.wait_assigned("solo", "id-d").await;
    assert!(w.has(&vm("vm-1"), "id-d"));

    // The first pod goes: the other still needs the identity.
    w.delete_pod("web-0").await;
    w.wait_gone("web-0", "id-a").await;
    assert!(w.has(&scale_set("pool-a"), "id-a"));

    // The last pod goes: the identity leaves the scale set and its record goes.
    w.delete_pod("web-1").await;
    w.wait_gone("web-1", "id-a").await;
    assert!(!w.has(&scale_set("pool-a"), "id-a"));
    w.delete_pod("solo").await;
    w.wait_gone("solo", "id-d").await;
    assert!(!w.has(&vm("vm-1"), "id-d"));

    // What was there before is still there.
    assert!(w.has(&scale_set("pool-a"), "foreign"));
    assert!(w.has(&scale_set("pool-a"), "kubelet"));
    assert!(w.system_assigned(&scale_set("pool-a")));
    let events = w.events().await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("IdentityAssigned")
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Pod")),
        "an Event tells the pod"
    );
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_we_did_not_add_the_immutable_list_and_the_cluster_identity_survive_any_sequence() {
    let w = World::new().await;
    for id in ["foreign", "kubelet", "immutable", "id-b"] {
        w.bound_identity(id).await;
    }
    let controller = w.start(w.config());
    let before = w.identities_on(&scale_set("pool-a"));
    for round in 0..2 {
        for (n, id) in ["foreign", "kubelet", "immutable", "id-b"].iter().enumerate() {
            w.pod(&format!("p{round}-{n}"), if n % 2 == 0 { "a0" } else { "a1" }, id)
                .await;
        }
        for (n, id) in ["foreign", "kubelet", "immutable", "id-b"].iter().enumerate() {
            w.wait_assigned(&format!("p{round}-{n}"), id).await;
        }
        for id in ["foreign", "kubelet", "immutable", "id-b"] {
            assert!(w.has(&scale_set("pool-a"), id), "{id} while in use");
        }
        // Someone removes our identity and the foreign one by hand, then every pod goes.
        w.em.set_identities_directly(&scale_set("pool-a"), &[], &[uami("id-b")]);
        for (n, id) in ["foreign", "kubelet", "immutable", "id-b"].iter().enumerate() {
            w.delete_pod(&format!("p{round}-{n}")).await;
            w.wait_gone(&format!("p{round}-{n}"), id).await;
        }
        eventually(|| async {
            ensure!(!w.has(&scale_set("pool-a"), "id-b"));
            Ok(())
        })
        .await
        .unwrap();
        assert!(w.has(&scale_set("pool-a"), "foreign"), "never added by us");
        assert!(w.has(&scale_set("pool-a"), "kubelet"), "the cluster's identity");
        assert!(w.has(&scale_set("pool-a"), "immutable"), "listed as immutable");
        assert!(w.system_assigned(&scale_set("pool-a")), "SystemAssigned kept");
    }
    let after = w.identities_on(&scale_set("pool-a"));
    for id in &before {
        assert!(after.contains(id), "{id} was there before and must stay");
    }
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_storms_and_server_errors_converge_with_bounded_arm_calls() {
    let w = World::new().await;
    for id in ["id-a", "id-b", "id-c", "id-e"] {
        w.bound_identity(id).await;
    }
    for (pod, node, id) in [
        ("a", "a0", "id-a"),
        ("b", "a1", "id-b"),
        ("c", "b0", "id-c"),
        ("e", "b0", "id-e"),
    ] {
        w.pod(pod, node, id).await;
    }
    let fault = |method: &str, status: u16, retry_after: Option<u64>, times: u32| FaultSpec {
        service: Some(Service::Arm),
        method: Some(method.into()),
        path_contains: Some("/virtualMachineScaleSets/".into()),
        status: Some(status),
        retry_after,
        times: Some(times),
        ..FaultSpec::default()
    };
    w.em.inject(fault("PATCH", 429, Some(1), 3));
    w.em.inject(fault("PATCH", 500, None, 2));
    w.em.inject(fault("GET", 503, None, 2));
    let controller = w.start(w.config());
    for (pod, id) in [("a", "id-a"), ("b", "id-b"), ("c", "id-c"), ("e", "id-e")] {
        w.wait_assigned(pod, id).await;
    }
    assert!(w.has(&scale_set("pool-a"), "id-a") && w.has(&scale_set("pool-a"), "id-b"));
    assert!(w.has(&scale_set("pool-b"), "id-c") && w.has(&scale_set("pool-b"), "id-e"));
    assert!(w.em.faults().is_empty(), "every injected failure was met");

    // Two scale sets, each needing one request; every failure costs at most one more round (a read
    // and a write). Nothing is retried in a loop.
    let (gets, patches) = (w.arm("GET"), w.arm("PATCH"));
    let failures = 3 + 2 + 2;
    let trace: Vec<String> =
        w.em.requests(&LogFilter::default())
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r.time,
                    r.method,
                    r.path.rsplit('/').next().unwrap_or(""),
                    r.status
                )
            })
            .collect();
    assert!(patches.len() <= 2 + 5, "{} PATCHes: {trace:#?}", patches.len());
    assert!(gets.len() <= 2 + failures, "{} GETs: {trace:#?}", gets.len());
    assert_eq!(patches.iter().filter(|p| p.status == 429).count(), 3);
    // Retry-After was honoured: after a 429 nothing went to that scale set for a second.
    let all = w.em.requests(&LogFilter {
        service: Some(Service::Arm),
        ..LogFilter::default()
    });
    for throttled in all.iter().filter(|r| r.status == 429) {
        let at: jiff::Timestamp = throttled.time.parse().unwrap();
        let next = all
            .iter()
            .find(|r| r.seq > throttled.seq && r.path.eq_ignore_ascii_case(&throttled.path))
            .unwrap();
        let next_at: jiff::Timestamp = next.time.parse().unwrap();
        assert!(
            next_at.duration_since(at) >= jiff::SignedDuration::from_millis(990),
            "{} sent {:?} after a 429",
            next.method,
            next_at.duration_since(at)
        );
    }
    let (_, metrics) = controller.admin_get("/metrics").await;
    assert!(
        metrics.contains("pod_identity_arm_throttled_total{operation=\"vmss_patch\"} 3"),
        "{metrics}"
    );
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_that_does_not_exist_is_quarantined_and_every_other_assignment_completes() {
    let w = World::new().await;
    w.bound_identity("id-a").await;
    w.bound_identity("id-b").await;
    w.identity("ghost", "missing").await;
    w.binding("ghost", "ghost").await;
    w.pod("good-0", "a0", "id-a").await;
    w.pod("good-1", "a1", "id-b").await;
    w.pod("bad", "a0", "ghost").await;
    let controller = w.start(w.config());
    w.wait_assigned("good-0", "id-a").await;
    w.wait_assigned("good-1", "id-b").await;
    let bad = w
        .assignments()
        .get(&w.assignment_name("bad", "ghost"))
        .await
        .unwrap();
    assert_eq!(bad.assignment_status(), AssignmentStatus::Created);
    assert!(
        bad.annotations()[ERROR_ANNOTATION].contains("FailedIdentityOperation"),
        "{:?}",
        bad.annotations()
    );
    assert!(!w.has(&scale_set("pool-a"), "missing"));
    let events = eventually(|| async {
        let events = w.events().await;
        let about = |kind: &str| {
            events.iter().any(|e| {
                e.reason.as_deref() == Some("IdentityQuarantined")
                    && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some(kind)
            })
        };
        ensure!(
            about("AzureIdentity") && about("AzureIdentityBinding"),
            "no quarantine events yet"
        );
        Ok(events)
    })
    .await
    .unwrap();
    assert!(events.iter().any(|e| e.type_.as_deref() == Some("Warning")));
    // Quarantined: later changes on the scale set do not send it again.
    let refused = w.arm("PATCH").iter().filter(|p| p.status == 400).count();
    w.pod("good-2", "a1", "id-a").await;
    w.wait_assigned("good-2", "id-a").await;
    assert_eq!(w.arm("PATCH").iter().filter(|p| p.status == 400).count(), refused);
    let (_, metrics) = controller.admin_get("/metrics").await;
    assert!(
        metrics.contains("pod_identity_quarantined_identities 1"),
        "{metrics}"
    );
    controller.stop().await;
}

fn lease_config(w: &World, instance: &str) -> ControllerConfig {
    ControllerConfig {
        instance: instance.into(),
        lease: Some(LeaseConfig {
            namespace: w.ns.name.clone(),
            name: "pod-identity-controller".into(),
            identity: instance.into(),
            duration: Duration::from_secs(3),
        }),
        ..w.config()
    }
}

async fn holder(w: &World) -> Option<String> {
    Api::<Lease>::namespaced(w.client(), &w.ns.name)
        .get_opt("pod-identity-controller")
        .await
        .unwrap()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_finishes_the_work_when_the_leader_is_killed_mid_work() {
    let w = World::new().await;
    // Updates take a while, so the leader is killed with one in flight.
    w.em.update_settings(|s| s.lro_duration_ms = 1500);
    for id in ["id-a", "id-b", "id-c"] {
        w.bound_identity(id).await;
    }
    let leader = w.start(lease_config(&w, "replica-a"));
    eventually(|| async {
        ensure!(holder(&w).await.as_deref() == Some("replica-a"));
        Ok(())
    })
    .await
    .unwrap();
    let standby = w.start(lease_config(&w, "replica-b"));
    for (pod, node, id) in [
        ("p0", "a0", "id-a"),
        ("p1", "a1", "id-b"),
        ("p2", "b0", "id-c"),
        ("p3", "b0", "id-a"),
    ] {
        w.pod(pod, node, id).await;
    }
    eventually(|| async {
        ensure!(
            w.arm("PATCH").iter().any(|p| p.status == 200),
            "no update accepted yet"
        );
        Ok(())
    })
    .await
    .unwrap();
    leader.kill();
    for (pod, id) in [("p0", "id-a"), ("p1", "id-b"), ("p2", "id-c"), ("p3", "id-a")] {
        w.wait_assigned(pod, id).await;
    }
    assert_eq!(holder(&w).await.as_deref(), Some("replica-b"));
    assert!(w.has(&scale_set("pool-a"), "id-a") && w.has(&scale_set("pool-a"), "id-b"));
    assert!(w.has(&scale_set("pool-b"), "id-c") && w.has(&scale_set("pool-b"), "id-a"));
    // One record per pod and identity, none lost, none duplicated.
    let names: Vec<String> = w
        .assignments()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|a| a.name_any())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    // Nothing was ever removed: no request carried a removal.
    assert!(w.identities_on(&scale_set("pool-a")).len() >= 4);
    let (status, _) = standby.admin_get("/readyz").await;
    assert_eq!(status, 200);
    standby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_between_patch_and_status_update_is_consistent_after_restart() {
    let w = World::new().await;
    w.em.update_settings(|s| s.lro_duration_ms = 3000);
    w.bound_identity("id-c").await;
    let first = w.start(w.config());
    w.pod("web", "b0", "id-c").await;
    eventually(|| async {
        ensure!(
            w.arm("PATCH").iter().any(|p| p.status == 200),
            "no update accepted yet"
        );
        Ok(())
    })
    .await
    .unwrap();
    first.kill();
    // The change reached Azure; the record was not updated, but it says the identity is ours.
    let name = w.assignment_name("web", "id-c");
    let aai = w.assignments().get(&name).await.unwrap();
    assert_eq!(aai.assignment_status(), AssignmentStatus::Created);
    assert_eq!(aai.annotations()[ORIGIN_ANNOTATION], "added");
    assert!(w.has(&scale_set("pool-b"), "id-c"));

    let second = w.start(w.config());
    w.wait_assigned("web", "id-c").await;
    assert_eq!(
        w.arm("PATCH").len(),
        1,
        "the restarted controller found it in place"
    );
    // And removes it when the pod goes, since the record says we added it.
    w.delete_pod("web").await;
    w.wait_gone("web", "id-c").await;
    assert!(!w.has(&scale_set("pool-b"), "id-c"));
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_removed_by_hand_is_put_back_by_the_drift_check() {
    let w = World::new().await;
    w.bound_identity("id-b").await;
    let mut config = w.config();
    config.worker.drift_interval = Duration::from_secs(1);
    let controller = w.start(config);
    let (status, _) = controller.admin_get("/healthz").await;
    assert_eq!(status, 200);
    w.pod("web", "b0", "id-b").await;
    w.wait_assigned("web", "id-b").await;
    assert_eq!(controller.admin_get("/readyz").await.0, 200);

    assert!(w.em.set_identities_directly(&scale_set("pool-b"), &[], &[uami("id-b")]));
    assert!(!w.has(&scale_set("pool-b"), "id-b"));
    eventually(|| async {
        ensure!(w.has(&scale_set("pool-b"), "id-b"), "not put back yet");
        Ok(())
    })
    .await
    .unwrap();
    let (_, metrics) = controller.admin_get("/metrics").await;
    assert!(
        metrics.contains("pod_identity_drift_repairs_total 1"),
        "{metrics}"
    );
    // The record stayed usable throughout.
    let aai = w
        .assignments()
        .get(&w.assignment_name("web", "id-b"))
        .await
        .unwrap();
    assert_eq!(aai.assignment_status(), AssignmentStatus::Assigned);
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_left_by_aad_pod_identity_1_8_are_adopted_not_duplicated() {
    let w = World::new().await;
    w.bound_identity("foreign").await;
    w.pod("legacy", "a0", "foreign").await;
    // What aad-pod-identity 1.8 wrote: no annotations of ours, status Assigned.
    let identity = Api::<AzureIdentity>::namespaced(w.client(), &w.ns.name)
        .get("foreign")
        .await
        .unwrap();
    let binding = Api::<AzureIdentityBinding>::namespaced(w.client(), &w.ns.name)
        .get("foreign-binding")
        .await
        .unwrap();
    let name = w.assignment_name("legacy", "foreign");
    let legacy = AzureAssignedIdentity {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(w.ns.name.clone()),
            labels: Some(BTreeMap::from([(NODENAME_LABEL.to_owned(), w.node("a0"))])),
            finalizers: Some(vec![ASSIGNED_IDENTITY_FINALIZER.to_owned()]),
            ..ObjectMeta::default()
        },
        spec: AzureAssignedIdentitySpec {
            azure_identity_ref: Some(EmbeddedAzureIdentity {
                api_version: "aadpodidentity.k8s.io/v1".into(),
                kind: "AzureIdentity".into(),
                metadata: ObjectMeta {
                    name: identity.metadata.name.clone(),
                    namespace: identity.metadata.namespace.clone(),
                    ..ObjectMeta::default()
                },
                spec: identity.spec.clone(),
                status: None,
            }),
            azure_binding_ref: Some(EmbeddedAzureIdentityBinding {
                api_version: "aadpodidentity.k8s.io/v1".into(),
                kind: "AzureIdentityBinding".into(),
                metadata: ObjectMeta {
                    name: binding.metadata.name.clone(),
                    namespace: binding.metadata.namespace.clone(),
                    ..ObjectMeta::default()
                },
                spec: binding.spec.clone(),
                status: None,
            }),
            pod: "legacy".into(),
            pod_namespace: w.ns.name.clone(),
            nodename: w.node("a0"),
            replicas: None,
        },
        status: Some(AzureAssignedIdentityStatus {
            status: Some("Assigned".into()),
            available_replicas: Some(1),
        }),
    };
    let created = w
        .assignments()
        .create(&PostParams::default(), &legacy)
        .await
        .unwrap();
    let controller = w.start(w.config());
    let adopted = eventually(|| async {
        let aai = w.assignments().get(&name).await?;
        ensure!(
            aai.annotations().contains_key(MACHINE_ANNOTATION),
            "not adopted yet"
        );
        Ok(aai)
    })
    .await
    .unwrap();
    assert_eq!(adopted.uid(), created.uid(), "the same object, not a new one");
    assert_eq!(adopted.assignment_status(), AssignmentStatus::Assigned);
    assert_eq!(
        w.assignments()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert!(
        w.arm("PATCH").is_empty(),
        "the identity was in place; nothing to change"
    );

    // Its identity was not known to be added by us: it stays when the pod goes.
    w.delete_pod("legacy").await;
    w.wait_gone("legacy", "foreign").await;
    assert!(w.has(&scale_set("pool-a"), "foreign"));
    assert!(w.arm("PATCH").is_empty());
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_principal_identities_are_assigned_without_any_arm_call() {
    let w = World::new().await;
    let identity = service_principal(&w.ns.name, "sp", &client_of("sp")).with_tenant_id(TENANT);
    fixtures::create(&w.ns.client, &identity).await.unwrap();
    w.binding("sp", "sp").await;
    let controller = w.start(w.config());
    w.pod("app", "a0", "sp").await;
    w.wait_assigned("app", "sp").await;
    assert!(w.arm("GET").is_empty() && w.arm("PATCH").is_empty());
    w.delete_pod("app").await;
    w.wait_gone("app", "sp").await;
    controller.stop().await;
}

impl World {
    /// Deletes a pod as `kubectl delete` does: with no kubelet to finish it, it stays, Running, with its
    /// deletionTimestamp set, as a pod does through its grace period.
    async fn delete_pod_gracefully(&self, name: &str, grace_seconds: u32) {
        let pods = Api::<Pod>::namespaced(self.client(), &self.ns.name);
        pods.delete(
            name,
            &DeleteParams {
                grace_period_seconds: Some(grace_seconds),
                ..DeleteParams::default()
            },
        )
        .await
        .unwrap();
        let pod = pods.get(name).await.unwrap();
        assert!(pod.metadata.deletion_timestamp.is_some());
    }

    /// What the kubelet reports once every container of the pod has stopped.
    async fn report_containers_stopped(&self, name: &str) {
        let status = json!({"status": {"containerStatuses": [{
            "name": "app", "ready": false, "restartCount": 0, "image": "example.invalid/app:1", "imageID": "",
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:00Z"}}
        }]}});
        Api::<Pod>::namespaced(self.client(), &self.ns.name)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }

    async fn delete_node(&self, short: &str) {
        Api::<Node>::all(self.client())
            .delete(&self.node(short), &DeleteParams::default())
            .await
            .unwrap();
    }

    /// Deletes a VM or scale set in ARM, at once.
    fn delete_machine(&self, id: &str) {
        let key = ResourceId::parse(id).unwrap().key();
        let op = self
            .em
            .with_state(|st| st.start_delete(&key, std::time::Instant::now(), Duration::ZERO));
        assert!(op.is_some(), "{id} exists");
        assert!(self.identities_on(id).is_empty());
    }

    /// ARM calls (reads and changes) on a machine since request `since`.
    fn calls_to(&self, machine: &str, since: u64) -> usize {
        ["GET", "PATCH"]
            .iter()
            .flat_map(|method| self.arm(method))
            .filter(|r| r.seq > since && r.path.eq_ignore_ascii_case(machine))
            .count()
    }

    async fn assignment(&self, pod: &str, identity: &str) -> AzureAssignedIdentity {
        self.assignments()
            .get(&self.assignment_name(pod, identity))
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_being_deleted_keeps_its_identity_on_the_machine_until_its_containers_stop() {
    let w = World::new().await;
    w.bound_identity("id-a").await;
    w.bound_identity("id-b").await;
    let controller = w.start(w.config());
    w.pod("web-0", "a0", "id-a").await;
    w.wait_assigned("web-0", "id-a").await;

    w.delete_pod_gracefully("web-0", 120).await;
    // A later change on the same scale set: once it is assigned, the controller has planned with the
    // pod being deleted.
    w.pod("api-0", "a1", "id-b").await;
    w.wait_assigned("api-0", "id-b").await;
    assert_eq!(
        w.assignment("web-0", "id-a").await.assignment_status(),
        AssignmentStatus::Assigned
    );
    assert!(
        w.has(&scale_set("pool-a"), "id-a"),
        "SIGTERM handlers use it through the grace period"
    );

    w.report_containers_stopped("web-0").await;
    w.wait_gone("web-0", "id-a").await;
    assert!(!w.has(&scale_set("pool-a"), "id-a"));
    assert!(w.has(&scale_set("pool-a"), "id-b"));
    w.delete_pod("web-0").await;
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_deleted_then_its_node_then_its_pod_is_called_once_and_leaves_no_record() {
    let w = World::new().await;
    w.bound_identity("id-d").await;
    w.bound_identity("id-b").await;
    let controller = w.start(w.config());
    w.pod("solo", "vm", "id-d").await;
    w.wait_assigned("solo", "id-d").await;

    let since = w.em.last_seq();
    w.delete_machine(&vm("vm-1"));
    w.delete_node("vm").await;
    w.delete_pod("solo").await;
    // Its finalizer goes with it: deleting the namespace would not hang.
    w.wait_gone("solo", "id-d").await;
    eventually(|| async {
        let (_, metrics) = controller.admin_get("/metrics").await;
        ensure!(
            metrics.contains("pod_identity_work_queue_depth 0"),
            "work still queued"
        );
        Ok(())
    })
    .await
    .unwrap();
    // The removal of its identity finds it gone (or a read does); nothing more.
    let calls = w.calls_to(&vm("vm-1"), since);
    assert!((1..=2).contains(&calls), "{calls} calls to the missing VM");
    // Later planning passes make no call to it: its worker retired.
    w.pod("web", "b0", "id-b").await;
    w.wait_assigned("web", "id-b").await;
    assert_eq!(w.calls_to(&vm("vm-1"), since), calls);
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_set_deleted_under_its_pods_is_said_so_and_a_recreated_one_gets_their_identities() {
    let w = World::new().await;
    w.bound_identity("id-e").await;
    // What the controller knows of a machine stands for one drift interval; deleting a scale set (or
    // re-creating it) behind its back is found when that knowledge is renewed.
    let mut config = w.config();
    config.worker.drift_interval = Duration::from_secs(1);
    let controller = w.start(config);
    w.pod("p0", "b0", "id-e").await;
    w.wait_assigned("p0", "id-e").await;
    let mut recreated = w.em.snapshot();
    for group in recreated
        .subscriptions
        .iter_mut()
        .flat_map(|s| &mut s.resource_groups)
    {
        for set in group
            .virtual_machine_scale_sets
            .iter_mut()
            .filter(|set| set.name == "pool-b")
        {
            set.identity.user_assigned_identities.clear();
        }
    }

    w.delete_machine(&scale_set("pool-b"));
    // A pod scheduled there meanwhile: nothing can be assigned, and every record says why.
    w.pod("p1", "b0", "id-e").await;
    for pod in ["p0", "p1"] {
        let name = w.assignment_name(pod, "id-e");
        eventually(|| async {
            let aai = w.assignments().get(&name).await?;
            let error = aai
                .annotations()
                .get(ERROR_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            ensure!(
                aai.assignment_status() == AssignmentStatus::Created && error.contains("does not exist"),
                "{name}: {:?} {error}",
                aai.status
            );
            Ok(())
        })
        .await
        .unwrap();
    }
    eventually(|| async {
        let told = w.events().await.iter().any(|e| {
            e.reason.as_deref() == Some("IdentityNotAssigned")
                && e.note.as_deref().is_some_and(|n| n.contains("does not exist"))
        });
        ensure!(told, "no IdentityNotAssigned Event yet");
        Ok(())
    })
    .await
    .unwrap();

    // Re-created under the same name, without identities, as a new scale set is: the next read of it
    // puts the identity back for every pod.
    w.em.replace_state(&recreated).unwrap();
    w.pod("p2", "b0", "id-e").await;
    for pod in ["p0", "p1", "p2"] {
        let aai = w.wait_assigned(pod, "id-e").await;
        assert!(!aai.annotations().contains_key(ERROR_ANNOTATION), "{pod}");
    }
    assert!(w.has(&scale_set("pool-b"), "id-e"));
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gone_on_scale_in_keeps_its_pods_identity_until_the_pods_go() {
    let w = World::new().await;
    w.bound_identity("id-c").await;
    w.bound_identity("id-a").await;
    w.bound_identity("id-b").await;
    let controller = w.start(w.config());
    w.pod("q", "a0", "id-c").await;
    w.pod("r", "a1", "id-a").await;
    w.wait_assigned("q", "id-c").await;
    w.wait_assigned("r", "id-a").await;

    // Scale-in: the instance goes, then its node; its pod is collected later.
    let key = ResourceId::parse(&scale_set("pool-a")).unwrap().key();
    w.em.with_state(|st| {
        st.start_delete_instances(&key, &["0".into()], std::time::Instant::now(), Duration::ZERO)
    })
    .unwrap();
    w.delete_node("a0").await;
    // The controller has seen the node go once it says a new pod there cannot be placed; then a change
    // on the scale set makes its worker act on that.
    w.pod("t", "a0", "id-b").await;
    eventually(|| async {
        let told = w.events().await.iter().any(|e| {
            e.reason.as_deref() == Some("IdentityNotAssigned")
                && e.note.as_deref().is_some_and(|n| n.contains("is not known"))
        });
        ensure!(told, "the node's deletion is not seen yet");
        Ok(())
    })
    .await
    .unwrap();
    w.pod("s", "a1", "id-b").await;
    w.wait_assigned("s", "id-b").await;
    assert_eq!(
        w.assignment("q", "id-c").await.assignment_status(),
        AssignmentStatus::Assigned,
        "a pod may run until it is collected"
    );
    assert!(w.has(&scale_set("pool-a"), "id-c"));

    // Pod garbage collection: its identity leaves the scale set, which still exists.
    w.delete_pod("q").await;
    w.wait_gone("q", "id-c").await;
    assert!(!w.has(&scale_set("pool-a"), "id-c"));
    assert!(w.has(&scale_set("pool-a"), "id-a"));
    controller.stop().await;
}

/// Polling an update's operation fails once; the controller reads the scale set, whose model already
/// lists the identity with `provisioningState: Updating`. The record must not say Assigned (IMDS on the
/// nodes does not know the identity yet) until a read shows the update done, and nothing is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_is_assigned_only_once_arm_has_applied_the_update_whose_poll_failed() {
    let w = World::new().await;
    // The update runs until the test ends it: what the controller does meanwhile is not a race.
    w.em.update_settings(|s| s.lro_duration_ms = 600_000);
    w.em.inject(FaultSpec {
        service: Some(Service::Arm),
        method: Some("GET".into()),
        path_contains: Some("/operations/".into()),
        status: Some(503),
        times: Some(1),
        ..FaultSpec::default()
    });
    w.bound_identity("id-c").await;
    let controller = w.start(w.config());
    w.pod("web", "b0", "id-c").await;
    let name = w.assignment_name("web", "id-c");

    // The failed poll, then two reads of the scale set while its update runs.
    let reads_after_failed_poll = || {
        let failed =
            w.em.requests(&LogFilter {
                service: Some(Service::Arm),
                ..LogFilter::default()
            })
            .into_iter()
            .find(|r| r.status == 503 && r.path.contains("/operations/"))?;
        Some(
            w.arm("GET")
                .into_iter()
                .filter(|r| r.seq > failed.seq && r.status == 200)
                .count(),
        )
    };
    let status = eventually(|| async {
        let aai = w.assignments().get(&name).await.context(name.clone())?;
        let status = aai.assignment_status();
        ensure!(
            status == AssignmentStatus::Assigned || reads_after_failed_poll().unwrap_or(0) >= 2,
            "{name}: {status:?}, {:?} reads after the failed poll",
            reads_after_failed_poll()
        );
        Ok(status)
    })
    .await
    .unwrap();
    let running = |w: &World| {
        w.em.with_state(|state| state.operations.values().filter(|op| op.end.is_none()).count())
    };
    assert_eq!(running(&w), 1, "the update is still running");
    assert_eq!(
        status,
        AssignmentStatus::Created,
        "Assigned while ARM was still applying the update"
    );
    assert!(w.has(&scale_set("pool-b"), "id-c"), "the model lists it");
    let patches = w.arm("PATCH");
    assert_eq!(patches.len(), 1, "nothing sent again: {patches:?}");

    // The update ends: the next read finds it applied.
    w.em.with_state(|state| {
        for operation in state.operations.values_mut() {
            operation.due = std::time::Instant::now();
        }
    });
    let aai = w.wait_assigned("web", "id-c").await;
    assert_eq!(running(&w), 0);
    assert_eq!(aai.annotations()[ORIGIN_ANNOTATION], "added");
    assert_eq!(w.arm("PATCH").len(), 1, "assigned without another change");
    controller.stop().await;
}
