//! The readiness-gate admission webhook against a real kube-apiserver: the controller runs in-process,
//! serves the webhook on loopback, keeps its certificate in a Secret and publishes the authority in a
//! `MutatingWebhookConfiguration` that calls it by URL; pods are created through the API server, which
//! calls the webhook as it would in a cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    coordination::v1::Lease,
    core::v1::{Pod, Secret},
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use pod_identity_api::readiness::IDENTITY_READY_CONDITION;
use pod_identity_azure::AzureConfig;
use pod_identity_controller::{
    ControllerConfig,
    azure::{Endpoints, connect},
    leader::LeaseConfig,
    webhook::{WebhookConfig, admission::READINESS_GATE_ANNOTATION, serve::MUTATE_PODS_PATH},
};
use pod_identity_emulator::{Config, Emulator, Seed};
use pod_identity_test_support::{ControlPlane, TestNamespace, eventually, fixtures};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::{sync::oneshot, task::JoinHandle};

const TENANT: &str = "11111111-1111-4111-8111-111111111111";
const SUB: &str = "22222222-2222-4222-8222-222222222222";
const CTL_CLIENT: &str = "c0000000-0000-4000-8000-000000000001";
const CTL_OBJECT: &str = "c0000000-0000-4000-8000-0000000000f1";
const SECRET: &str = "webhook-cert";

struct World {
    ns: TestNamespace,
    em: Emulator,
    /// Name of the (cluster-wide) webhook configuration, after the namespace.
    configuration: String,
}

struct Running {
    task: JoinHandle<Result<(), pod_identity_controller::Error>>,
    stop: Option<oneshot::Sender<()>>,
    webhook: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl World {
    async fn new() -> Self {
        let ns = ControlPlane::shared().await.namespace().await.unwrap();
        fixtures::apply_crds(&ns.client, &pod_identity_api::crds::all())
            .await
            .unwrap();
        let seed: Seed = serde_json::from_value(json!({
            "tenants": [{"id": TENANT, "applications": [
                {"displayName": "controller", "clientId": CTL_CLIENT, "objectId": CTL_OBJECT, "secrets": ["s"]}
            ]}],
            "subscriptions": [{"id": SUB, "tenantId": TENANT, "displayName": "t", "resourceGroups": []}],
        }))
        .unwrap();
        let em = Emulator::start(Config::new(seed)).await.unwrap();
        let configuration = format!("{}-readiness-gate", ns.name);
        Self {
            ns,
            em,
            configuration,
        }
    }

    fn client(&self) -> Client {
        self.ns.client.clone()
    }

    /// The webhook configuration the chart installs, but calling `webhook` by URL and scoped to this
    /// test's namespace (other tests' pods never reach it). `Fail` rather than the chart's `Ignore`,
    /// so that a pod the webhook did not answer for is an error the test sees, not a missing gate.
    async fn configure(&self, webhook: SocketAddr) {
        let configuration: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": self.configuration},
            "webhooks": [{
                "name": "identity-ready.aadpodidentity.k8s.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 5,
                "clientConfig": {"url": format!("https://{webhook}{MUTATE_PODS_PATH}")},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                "objectSelector": {"matchExpressions": [{"key": "aadpodidbinding", "operator": "Exists"}]},
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.ns.name}},
            }],
        }))
        .unwrap();
        Api::<MutatingWebhookConfiguration>::all(self.client())
            .create(&PostParams::default(), &configuration)
            .await
            .unwrap();
    }

    fn start(&self, cert_validity: Duration, lease: Option<LeaseConfig>, instance: &str) -> Running {
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
        let webhook: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = ControllerConfig {
            namespace: Some(self.ns.name.clone()),
            instance: instance.into(),
            lease,
            webhook: Some(WebhookConfig {
                listen: webhook,
                namespace: self.ns.name.clone(),
                service: "pod-identity-webhook".into(),
                extra_names: vec!["127.0.0.1".into()],
                secret: SECRET.into(),
                configuration: self.configuration.clone(),
                cert_validity,
                recheck: Duration::from_secs(1),
            }),
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
            webhook,
        }
    }

    /// Creates a pod; `labels` and `annotations` as given, `gates` its own readiness gates.
    async fn create_pod(&self, name: &str, labels: Value, annotations: Value, gates: Value) -> Result<Pod> {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": {
                "containers": [{"name": "app", "image": "example.invalid/app:1"}],
                "readinessGates": gates,
            },
        }))?;
        Ok(Api::<Pod>::namespaced(self.client(), &self.ns.name)
            .create(&PostParams::default(), &pod)
            .await?)
    }

    /// Creates a bound pod once the API server's calls to the webhook succeed (a configuration is
    /// seen by the API server a moment after it is written, and the certificate after the Secret).
    async fn create_bound_pod_when_served(&self, name: &str) -> Pod {
        eventually(|| async {
            self.create_pod(name, json!({"aadpodidbinding": "web"}), Value::Null, Value::Null)
                .await
        })
        .await
        .unwrap()
    }

    async fn secret(&self) -> Result<Secret> {
        Ok(Api::<Secret>::namespaced(self.client(), &self.ns.name)
            .get(SECRET)
            .await?)
    }

    async fn published_bundle(&self) -> Result<Vec<u8>> {
        let configuration = Api::<MutatingWebhookConfiguration>::all(self.client())
            .get(&self.configuration)
            .await?;
        let bundle = configuration.webhooks.unwrap_or_default()[0]
            .client_config
            .ca_bundle
            .clone()
            .context("no caBundle published")?;
        Ok(bundle.0)
    }
}

fn data(secret: &Secret, key: &str) -> Vec<u8> {
    secret.data.as_ref().unwrap()[key].0.clone()
}

fn gates(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.condition_type)
        .collect()
}

/// The certificate the webhook at `address` presents, verified against `bundle` for `127.0.0.1`.
async fn served_certificate(address: SocketAddr, bundle: &[u8]) -> Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = tokio::net::TcpStream::connect(address).await?;
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1")?, stream)
        .await?;
    let (_, session) = tls.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .context("no certificate presented")?;
    Ok(leaf.to_vec())
}

fn leaf_der(pem: &[u8]) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn bound_pods_get_exactly_one_gate_and_the_certificate_is_published_and_rotated() {
    let world = World::new().await;
    // Renewed with a third left: every few seconds, so the test sees a rotation.
    let controller = world.start(Duration::from_secs(9), None, "controller-0");
    world.configure(controller.webhook).await;

    // The controller creates the Secret and publishes its authority in the configuration.
    let bundle = eventually(|| async {
        let secret = world.secret().await?;
        let published = world.published_bundle().await?;
        ensure!(
            published == data(&secret, "ca.crt"),
            "the published caBundle is not the Secret's"
        );
        Ok(published)
    })
    .await
    .unwrap();
    let secret = world.secret().await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(
        secret.owner_references()[0].name,
        world.configuration,
        "uninstalling the configuration removes the Secret"
    );

    // A bound pod gets the gate, once.
    let pod = world.create_bound_pod_when_served("bound").await;
    assert_eq!(gates(&pod), vec![IDENTITY_READY_CONDITION], "{pod:?}");

    // A pod that already lists the gate keeps one; its other gates stay.
    let pod = world
        .create_pod(
            "already-gated",
            json!({"aadpodidbinding": "web"}),
            Value::Null,
            json!([{"conditionType": "example.com/warm"}, {"conditionType": IDENTITY_READY_CONDITION}]),
        )
        .await
        .unwrap();
    assert_eq!(gates(&pod), vec!["example.com/warm", IDENTITY_READY_CONDITION]);

    // Opted out, and unlabelled: no gate.
    let pod = world
        .create_pod(
            "opted-out",
            json!({"aadpodidbinding": "web"}),
            json!({READINESS_GATE_ANNOTATION: "false"}),
            Value::Null,
        )
        .await
        .unwrap();
    assert!(gates(&pod).is_empty(), "{:?}", gates(&pod));
    let pod = world
        .create_pod("unbound", json!({"app": "web"}), Value::Null, Value::Null)
        .await
        .unwrap();
    assert!(gates(&pod).is_empty(), "{:?}", gates(&pod));

    // The serving certificate is renewed under the same authority, and the replica serves the new one.
    let first = data(&secret, "tls.crt");
    let renewed = eventually(|| async {
        let now = data(&world.secret().await?, "tls.crt");
        ensure!(now != first, "the serving certificate was not renewed yet");
        Ok(now)
    })
    .await
    .unwrap();
    eventually(|| async {
        let served = served_certificate(controller.webhook, &bundle).await?;
        let current = leaf_der(&data(&world.secret().await?, "tls.crt"));
        ensure!(served == current, "the replica still serves an older certificate");
        ensure!(
            served != leaf_der(&first),
            "the replica serves the first certificate"
        );
        Ok(())
    })
    .await
    .unwrap();
    assert_ne!(renewed, first);
    assert_eq!(
        world.published_bundle().await.unwrap(),
        bundle,
        "a renewal under the same authority leaves the caBundle alone"
    );
    // And the API server trusts what is served now.
    let pod = world.create_bound_pod_when_served("after-rotation").await;
    assert_eq!(gates(&pod), vec![IDENTITY_READY_CONDITION], "{pod:?}");
}

/// Every replica serves the webhook (the Service may send the API server to any) with the one
/// certificate the leader keeps: a standby, which never leads here, serves what the leader wrote.
#[tokio::test]
async fn a_standby_serves_the_certificate_the_leader_keeps() {
    let world = World::new().await;
    // The Lease is held elsewhere for an hour: the replica started with it stays a standby.
    let held: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "pod-identity-controller", "namespace": world.ns.name},
        "spec": {"holderIdentity": "elsewhere", "leaseDurationSeconds": 3600},
    }))
    .unwrap();
    Api::<Lease>::namespaced(world.client(), &world.ns.name)
        .create(&PostParams::default(), &held)
        .await
        .unwrap();
    let standby = world.start(
        Duration::from_secs(3600),
        Some(LeaseConfig {
            namespace: world.ns.name.clone(),
            name: "pod-identity-controller".into(),
            identity: "standby".into(),
            duration: Duration::from_secs(3600),
        }),
        "standby",
    );
    let leader = world.start(Duration::from_secs(3600), None, "leader");
    world.configure(leader.webhook).await;
    let secret = eventually(|| async { world.secret().await }).await.unwrap();
    let bundle = data(&secret, "ca.crt");
    let expected = leaf_der(&data(&secret, "tls.crt"));
    for replica in [&leader, &standby] {
        let served = eventually(|| async { served_certificate(replica.webhook, &bundle).await })
            .await
            .unwrap();
        assert_eq!(served, expected);
    }
    let lease = Api::<Lease>::namespaced(world.client(), &world.ns.name)
        .get("pod-identity-controller")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("elsewhere"));
}
