//! Reading what decisions depend on, once, into plain data.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
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
