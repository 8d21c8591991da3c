//! [`RecordStore`] over the Kubernetes API. The CRD has no status subresource (as in the original), so
//! status is written with the same merge patch as the rest of the object.

use futures::future::BoxFuture;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
};
use pod_identity_api::{AzureAssignedIdentity, ObjectKey};
use serde_json::{Value, json};
use std::sync::Arc;

use crate::{
    record::Recorded,
    worker::{RecordStore, WriteError},
};

/// Assignment objects in the cluster.
pub struct KubeRecords {
    client: Client,
}

impl KubeRecords {
    /// Writes with `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn api(&self, namespace: &str) -> Api<AzureAssignedIdentity> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

fn classify(err: kube::Error) -> WriteError {
    match &err {
        kube::Error::Api(status) if status.code == 409 => WriteError::Conflict,
        kube::Error::Api(status) if status.code == 404 => WriteError::NotFound,
        _ => WriteError::Other(err.to_string()),
    }
}

impl RecordStore for KubeRecords {
    fn create<'a>(
        &'a self,
        object: &'a AzureAssignedIdentity,
    ) -> BoxFuture<'a, Result<Recorded, WriteError>> {
        Box::pin(async move {
            let namespace = object.metadata.namespace.clone().unwrap_or_default();
            let api = self.api(&namespace);
            match api.create(&PostParams::default(), object).await {
                Ok(created) => Ok(Recorded::from_object(Arc::new(created))),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let name = object.metadata.name.clone().unwrap_or_default();
                    match api.get_opt(&name).await {
                        Ok(Some(existing)) => Err(WriteError::Exists(Box::new(Recorded::from_object(
                            Arc::new(existing),
                        )))),
                        Ok(None) => Err(WriteError::Conflict),
                        Err(err) => Err(classify(err)),
                    }
                }
                Err(err) => Err(classify(err)),
            }
        })
    }

    fn patch<'a>(
        &'a self,
        key: &'a ObjectKey,
        patch: &'a Value,
    ) -> BoxFuture<'a, Result<Recorded, WriteError>> {
        Box::pin(async move {
            self.api(&key.namespace)
                .patch(&key.name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map(|o| Recorded::from_object(Arc::new(o)))
                .map_err(classify)
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a ObjectKey,
        resource_version: Option<&'a str>,
        uid: Option<&'a str>,
        other_finalizers: &'a [String],
    ) -> BoxFuture<'a, Result<(), WriteError>> {
        Box::pin(async move {
            let api = self.api(&key.namespace);
            let finalizers = if other_finalizers.is_empty() {
                Value::Null
            } else {
                json!(other_finalizers)
            };
            let patch = json!({
                "metadata": { "resourceVersion": resource_version, "finalizers": finalizers },
                "status": { "status": "Unassigned" },
            });
            api.patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(classify)?;
            let params = DeleteParams {
                preconditions: uid.map(|uid| Preconditions {
                    uid: Some(uid.to_owned()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&key.name, &params).await {
                Ok(_) => Ok(()),
                Err(err) => match classify(err) {
                    WriteError::NotFound => Ok(()),
                    other => Err(other),
                },
            }
        })
    }
}
