//! Reading what decisions depend on, once, into plain data.

use anyhow::{Context, Result};
use k8s_openapi::api::{
    core::v1::{Pod, ServiceAccount},
    events::v1::Event,
};
use kube::{Api, Client, api::ListParams};
use pod_identity_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
};
use serde::de::DeserializeOwned;

/// Everything the decisions read: pods and the four kinds, from all namespaces.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// Pods of all namespaces.
    pub pods: Vec<Pod>,
    /// Identities of all namespaces.
    pub identities: Vec<AzureIdentity>,
    /// Bindings of all namespaces.
    pub bindings: Vec<AzureIdentityBinding>,
    /// Exceptions of all namespaces.
    pub exceptions: Vec<AzurePodIdentityException>,
    /// Assignments of all namespaces.
    pub assignments: Vec<AzureAssignedIdentity>,
    /// What federated identities depend on.
    pub federation: FederationView,
}

/// What the explanation of a federated identity reads besides the four kinds.
#[derive(Clone, Debug, Default)]
pub struct FederationView {
    /// Namespace of the subjects (the installation's `--federation-namespace`).
    pub namespace: String,
    /// Names of the ServiceAccounts there; `None` when they could not be read.
    pub subjects: Option<Vec<String>>,
    /// The cluster's service-account issuer, from its discovery document.
    pub issuer: Option<String>,
    /// The JWS algorithms the issuer signs with, from its discovery document.
    pub signing_algorithms: Option<Vec<String>>,
    /// Reason and note of the Events about the pod explained, oldest first.
    pub pod_events: Vec<(String, String)>,
}

impl FederationView {
    /// Reads the subjects of `namespace` and the issuer's discovery document; what cannot be read stays
    /// unknown rather than failing the command.
    pub async fn read(client: &Client, namespace: &str) -> Self {
        let subjects = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await
            .ok()
            .map(|list| list.items.into_iter().filter_map(|a| a.metadata.name).collect());
        let discovery = async {
            let request = http::Request::get("/.well-known/openid-configuration")
                .body(Vec::new())
                .ok()?;
            let text = client.request_text(request).await.ok()?;
            serde_json::from_str::<serde_json::Value>(&text).ok()
        }
        .await;
        let issuer = discovery
            .as_ref()
            .and_then(|d| d["issuer"].as_str().map(str::to_owned));
        let signing_algorithms = discovery.as_ref().and_then(|d| {
            d["id_token_signing_alg_values_supported"].as_array().map(|list| {
                list.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
        });
        Self {
            namespace: namespace.to_owned(),
            subjects,
            issuer,
            signing_algorithms,
            pod_events: Vec::new(),
        }
    }
}

/// Reason and note of the Events about pod `namespace/name`, oldest first (empty when unreadable).
pub async fn pod_events(client: &Client, namespace: &str, name: &str) -> Vec<(String, String)> {
    let params = ListParams::default().fields(&format!("regarding.name={name}"));
    let Ok(list) = Api::<Event>::namespaced(client.clone(), namespace)
        .list(&params)
        .await
    else {
        return Vec::new();
    };
    let mut events: Vec<_> = list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Pod"))
        .map(|e| {
            let when = e
                .event_time
                .map(|t| t.0)
                .or(e.deprecated_last_timestamp.map(|t| t.0))
                .or(e.metadata.creation_timestamp.map(|t| t.0));
            (when, e.reason.unwrap_or_default(), e.note.unwrap_or_default())
        })
        .collect();
    events.sort_by_key(|(when, _, _)| *when);
    events
        .into_iter()
        .map(|(_, reason, note)| (reason, note))
        .collect()
}

impl ClusterState {
    /// Lists everything. Bindings of any namespace can matter (cross-namespace matching, or to say
    /// why one of another namespace does not apply), so nothing is filtered by namespace.
    pub async fn read(client: &Client) -> Result<Self> {
        Ok(Self {
            pods: list(client).await?,
            identities: list(client).await?,
            bindings: list(client).await?,
            exceptions: list(client).await?,
            assignments: list(client).await?,
            federation: FederationView::default(),
        })
    }
}

async fn list<K>(client: &Client) -> Result<Vec<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    match Api::<K>::all(client.clone()).list(&ListParams::default()).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(anyhow::anyhow!(
            "the server does not know {kind}: install the aadpodidentity.k8s.io CRDs first \
             (kubectl apply -f crds/, or `kubectl podidentity crds | kubectl apply -f -`)"
        )),
        Err(err) => Err(err).with_context(|| format!("listing {kind} objects")),
    }
}
