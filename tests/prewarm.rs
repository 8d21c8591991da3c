//! Pre-warming against a real kube-apiserver, with the emulator as Azure: a workload whose pod template
//! an opted-in binding selects gets its identity on the scale sets of the agent pools its pods may land
//! on before any pod exists; the identity leaves after the linger once no workload needs it, and only
//! if the controller added it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use anyhow::{Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
};
use pod_identity_api::{
    AzureAssignedIdentity, POD_LABEL,
    fixtures::{binding_of, user_assigned_identity},
};
use pod_identity_azure::AzureConfig;
use pod_identity_controller::{
    ControllerConfig,
    azure::{Endpoints, connect},
    prewarm::{PREWARM_ANNOTATION, PREWARM_LABEL},
    record::ORIGIN_ANNOTATION,
    worker::WorkerSettings,
};
use pod_identity_emulator::{Config, Emulator, Seed};
use pod_identity_test_support::{
    ControlPlane, TestNamespace, eventually,
    fixtures::{self, PodTemplate},
};
use serde_json::json;
use tokio::{sync::oneshot, task::JoinHandle};

const TENANT: &str = "11111111-1111-4111-8111-111111111111";
const SUB: &str = "22222222-2222-4222-8222-222222222222";
const CTL_CLIENT: &str = "c0000000-0000-4000-8000-000000000001";
const CTL_OBJECT: &str = "c0000000-0000-4000-8000-0000000000f1";

fn uami(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

fn scale_set(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/nodes/providers/Microsoft.Compute/virtualMachineScaleSets/{name}"
    )
}

fn client_of(name: &str) -> String {
    let h = name
        .bytes()
        .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("{h:08x}-0000-4000-8000-000000000000")
}

struct World {
    ns: TestNamespace,
    em: Emulator,
}

struct Running {
    task: JoinHandle<Result<(), pod_identity_controller::Error>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

impl World {
    /// Two agent pools, `web` and `batch`, one scale set each; `foreign` is on the web pool's scale set
    /// already (someone else put it there).
    async fn new() -> Self {
        let ns = ControlPlane::shared().await.namespace().await.unwrap();
        fixtures::apply_crds(&ns.client, &pod_identity_api::crds::all())
            .await
            .unwrap();
        let identities: Vec<_> = ["warm", "cold", "foreign"]
            .iter()
            .map(
                |n| json!({"name": n, "clientId": client_of(n), "principalId": client_of(&format!("{n}-p"))}),
            )
            .collect();
        let seed: Seed = serde_json::from_value(json!({
            "tenants": [{"id": TENANT, "applications": [
                {"displayName": "controller", "clientId": CTL_CLIENT, "objectId": CTL_OBJECT, "secrets": ["s"]}
            ]}],
            "subscriptions": [{"id": SUB, "tenantId": TENANT, "displayName": "t", "resourceGroups": [
                {"name": "ids", "location": "westeurope", "userAssignedIdentities": identities},
                {"name": "nodes", "location": "westeurope", "virtualMachineScaleSets": [
                    {"name": "pool-web", "identity": {"userAssignedIdentities": [uami("foreign")]}, "instances": [{"instanceId": "0"}]},
                    {"name": "pool-batch", "instances": [{"instanceId": "0"}]},
                ]},
            ]}],
            "roleAssignments": [{"principalId": CTL_OBJECT, "scope": format!("/subscriptions/{SUB}"), "roleDefinitionName": "Contributor"}],
        }))
        .unwrap();
        let em = Emulator::start(Config::new(seed)).await.unwrap();
        let world = Self { ns, em };
        for (pool, short) in [("web", "web-0"), ("batch", "batch-0")] {
            let name = world.node(short);
            let provider = format!("azure://{}/virtualMachines/0", scale_set(&format!("pool-{pool}")));
            fixtures::create_node(&world.ns.client, &name, Some(&provider))
                .await
                .unwrap();
            let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(world.client());
            nodes
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(
                        json!({"metadata": {"labels": {"kubernetes.azure.com/agentpool": pool}}}),
                    ),
                )
                .await
                .unwrap();
        }
        world
    }

    fn client(&self) -> Client {
        self.ns.client.clone()
    }

    fn node(&self, short: &str) -> String {
        format!("{}-{short}", self.ns.name)
    }

    fn start(&self, linger: Duration) -> Running {
        let azure = AzureConfig {
            tenant_id: TENANT.into(),
            subscription_id: SUB.into(),
            aad_client_id: CTL_CLIENT.into(),
            aad_client_secret: "s".into(),
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
        let config = ControllerConfig {
            namespace: Some(self.ns.name.clone()),
            worker: WorkerSettings {
                batch_window: Duration::from_millis(200),
                drift_interval: Duration::from_secs(3600),
                ..WorkerSettings::default()
            },
            prewarm_linger: Some(linger),
            ..ControllerConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(pod_identity_controller::run(
            config,
            self.client(),
            Arc::new(compute),
            Vec::new(),
            async move {
                let _ = stopped.await;
            },
        ));
        Running {
            task,
            stop: Some(stop),
        }
    }

    async fn bind(&self, identity: &str, selector: &str, prewarm: bool) {
        let ns = &self.ns.name;
        let identity_object =
            user_assigned_identity(ns, identity, &client_of(identity)).with_resource_id(&uami(identity));
        let mut binding = binding_of(ns, identity, selector);
        if prewarm {
            binding = binding.with_annotation(PREWARM_ANNOTATION, "true");
        }
        fixtures::create(&self.ns.client, &identity_object).await.unwrap();
        fixtures::create(&self.ns.client, &binding).await.unwrap();
    }

    /// A Deployment whose pods carry `aadpodidbinding=<selector>` and go to agent pool `pool`. Without a
    /// controller manager it never makes a pod: only its template can warm anything.
    async fn deployment(&self, name: &str, selector: &str, pool: &str) {
        let deployment: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": self.ns.name},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name, POD_LABEL: selector}},
                    "spec": {
                        "nodeSelector": {"kubernetes.azure.com/agentpool": pool},
                        "containers": [{"name": "app", "image": "example.invalid/app:1"}],
                    },
                },
            },
        }))
        .unwrap();
        Api::<Deployment>::namespaced(self.client(), &self.ns.name)
            .create(&PostParams::default(), &deployment)
            .await
            .unwrap();
    }

    fn identities_on(&self, pool: &str) -> Vec<String> {
        let snapshot = self.em.snapshot();
        let mut out: Vec<String> = snapshot
            .subscriptions
            .iter()
            .flat_map(|s| &s.resource_groups)
            .flat_map(|g| &g.virtual_machine_scale_sets)
            .filter(|ss| ss.name == pool)
            .flat_map(|ss| ss.identity.user_assigned_identities.iter())
            .map(|id| id.rsplit('/').next().unwrap_or_default().to_owned())
            .collect();
        out.sort();
        out
    }

    async fn records(&self) -> Vec<AzureAssignedIdentity> {
        Api::<AzureAssignedIdentity>::namespaced(self.client(), &self.ns.name)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
    }
}

fn origin(record: &AzureAssignedIdentity) -> Option<&str> {
    record
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ORIGIN_ANNOTATION))
        .map(String::as_str)
}

fn is_warm(record: &AzureAssignedIdentity) -> bool {
    record
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(PREWARM_LABEL))
        .is_some_and(|v| v == "true")
}

#[tokio::test]
async fn opted_in_workloads_warm_their_pools_and_only_what_was_added_leaves_after_the_linger() {
    let world = World::new().await;
    world.bind("warm", "api", true).await;
    world.bind("foreign", "api", true).await;
    world.bind("cold", "api", false).await;
    world.deployment("api", "api", "web").await;
    let _controller = world.start(Duration::from_secs(2));

    // Before any pod: the opted-in identity is on the web pool's scale set, and only there.
    eventually(|| async {
        let web = world.identities_on("pool-web");
        ensure!(web == ["foreign", "warm"], "pool-web holds {web:?}");
        let records = world.records().await;
        let warm: Vec<_> = records.iter().filter(|r| is_warm(r)).collect();
        ensure!(warm.len() == 2, "warm records: {warm:?}");
        for record in warm {
            let expected = if record
                .spec
                .azure_identity_ref
                .as_ref()
                .and_then(|i| i.metadata.name.as_deref())
                == Some("warm")
            {
                "added"
            } else {
                "preexisting"
            };
            ensure!(origin(record) == Some(expected), "{record:?}");
            ensure!(
                record.spec.nodename.is_empty(),
                "no node agent reads a warm record"
            );
            ensure!(
                record.status.as_ref().and_then(|s| s.status.as_deref()) == Some("Assigned"),
                "{record:?}"
            );
        }
        Ok(())
    })
    .await
    .unwrap();
    assert!(
        world.identities_on("pool-batch").is_empty(),
        "the pods cannot land on the batch pool"
    );

    // A pod of the workload finds its identity there; its record says the identity is ours too, so
    // the identity can leave once neither the pod nor the workload needs it.
    fixtures::create_pod(
        &world.client(),
        &PodTemplate {
            namespace: world.ns.name.clone(),
            name: "api-1".into(),
            labels: [(POD_LABEL.to_owned(), "api".to_owned())].into(),
            node: Some(world.node("web-0")),
            ip: Some("10.244.0.10".into()),
        },
    )
    .await
    .unwrap();
    let pod_record = pod_identity_api::naming::assigned_identity_name("api-1", &world.ns.name, "warm");
    eventually(|| async {
        let record = world
            .records()
            .await
            .into_iter()
            .find(|r| r.metadata.name.as_deref() == Some(pod_record.as_str()));
        match record {
            Some(r) if r.status.as_ref().and_then(|s| s.status.as_deref()) == Some("Assigned") => {
                ensure!(origin(&r) == Some("added"), "{r:?}");
                Ok(())
            }
            other => bail!("pod record: {other:?}"),
        }
    })
    .await
    .unwrap();
    fixtures::delete_pod_now(&world.client(), &world.ns.name, "api-1")
        .await
        .unwrap();

    // The workload goes: after the linger, what the controller added leaves; what it found stays.
    Api::<Deployment>::namespaced(world.client(), &world.ns.name)
        .delete("api", &DeleteParams::default())
        .await
        .unwrap();
    eventually(|| async {
        let web = world.identities_on("pool-web");
        ensure!(web == ["foreign"], "pool-web holds {web:?}");
        let records = world.records().await;
        ensure!(records.is_empty(), "records left: {records:?}");
        Ok(())
    })
    .await
    .unwrap();
}
