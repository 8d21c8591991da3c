//! Cluster objects as a kubelet and scheduler would leave them, for a control plane that has neither.

use std::{collections::BTreeMap, fmt::Debug};

use anyhow::{Context, Result, bail};
use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::{Container, Node, NodeSpec, Pod, PodSpec},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

const FIELD_MANAGER: &str = "pod-identity-tests";

/// Applies CRDs (idempotently, so parallel tests may all call it) and waits until the server serves
/// them.
pub async fn apply_crds(client: &Client, crds: &[CustomResourceDefinition]) -> Result<()> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in crds {
        let name = crd.metadata.name.as_deref().context("a CRD without a name")?;
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
    }
    for crd in crds {
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        crate::eventually(|| async {
            let current = api.get(name).await?;
            let established = current
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                Ok(())
            } else {
                bail!("CRD {name} is not established")
            }
        })
        .await?;
    }
    Ok(())
}

/// Creates `object` in the namespace that its `metadata.namespace` names (the builders of
/// `pod_identity_api::fixtures` name one), and returns it as the API server stored it: with the UID and
/// resource version the server gave, whatever the object carried.
///
/// # Errors
/// An object without a namespace, or the API server's refusal (a name taken, a schema violation).
pub async fn create<K>(client: &Client, object: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Debug + DeserializeOwned + Serialize,
    K::DynamicType: Default,
{
    let meta = object.meta();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let name = meta.name.as_deref().unwrap_or_default();
    let namespace = meta
        .namespace
        .as_deref()
        .with_context(|| format!("{kind} {name} names no namespace"))?;
    Api::<K>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), object)
        .await
        .with_context(|| format!("creating {kind} {namespace}/{name}"))
}

/// Creates a node whose `spec.providerID` points at an Azure VM or scale-set instance.
pub async fn create_node(client: &Client, name: &str, provider_id: Option<&str>) -> Result<Node> {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("kubernetes.io/hostname".into(), name.into())])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: provider_id.map(Into::into),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await?)
}

/// What a test pod looks like.
#[derive(Clone, Debug, Default)]
pub struct PodTemplate {
    /// Namespace of the pod.
    pub namespace: String,
    /// Name of the pod.
    pub name: String,
    /// Labels, e.g. `aadpodidbinding`.
    pub labels: BTreeMap<String, String>,
    /// Node the pod is bound to, as the scheduler would set it.
    pub node: Option<String>,
    /// Pod IP, as the kubelet would report it once running.
    pub ip: Option<String>,
}

/// Creates a pod and, when it has a node and an IP, reports it `Running` as a kubelet would.
pub async fn create_pod(client: &Client, template: &PodTemplate) -> Result<Pod> {
    let api = Api::<Pod>::namespaced(client.clone(), &template.namespace);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(template.name.clone()),
            labels: Some(template.labels.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: template.node.clone(),
            containers: vec![Container {
                name: "app".into(),
                image: Some("example.invalid/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    };
    let created = api.create(&PostParams::default(), &pod).await?;
    match &template.ip {
        Some(ip) => set_pod_running(client, &template.namespace, &template.name, ip).await,
        None => Ok(created),
    }
}

/// Writes the status a kubelet writes for a running pod with that IP.
pub async fn set_pod_running(client: &Client, namespace: &str, name: &str, ip: &str) -> Result<Pod> {
    let status = json!({
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{
                "name": "app", "ready": true, "restartCount": 0, "image": "example.invalid/app:1", "imageID": "",
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
            }],
        }
    });
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    Ok(api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?)
}

/// Deletes a pod at once; with a node set and no kubelet, a graceful delete would never finish.
pub async fn delete_pod_now(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    api.delete(
        name,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    crate::eventually(|| async {
        match api.get_opt(name).await? {
            None => Ok(()),
            Some(_) => bail!("pod {namespace}/{name} still exists"),
        }
    })
    .await
}
