//! Cluster objects for the unit tests.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::api::ObjectMeta;
use pod_identity_api::{
    AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, AzureIdentity,
    AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec, POD_LABEL,
};

pub const CLIENT_ID: &str = "5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b";

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

pub fn identity(namespace: &str, name: &str) -> AzureIdentity {
    AzureIdentity {
        metadata: meta(namespace, name),
        spec: AzureIdentitySpec {
            type_: Some(0),
            resource_id: Some(format!(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            )),
            client_id: Some(CLIENT_ID.into()),
            ..Default::default()
        },
        status: None,
    }
}

pub fn binding(namespace: &str, name: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    AzureIdentityBinding {
        metadata: meta(namespace, name),
        spec: AzureIdentityBindingSpec {
            azure_identity: Some(identity.into()),
            selector: Some(selector.into()),
            weight: None,
        },
        status: None,
    }
}

pub fn pod(namespace: &str, name: &str, label: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            labels: label.map(|l| BTreeMap::from([(POD_LABEL.to_owned(), l.to_owned())])),
            ..meta(namespace, name)
        },
        spec: Some(PodSpec {
            node_name: Some("node-1".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.244.0.9".into()),
            ..Default::default()
        }),
    }
}

pub fn assignment(namespace: &str, name: &str, status: &str) -> AzureAssignedIdentity {
    AzureAssignedIdentity {
        metadata: meta(namespace, name),
        spec: AzureAssignedIdentitySpec::default(),
        status: Some(AzureAssignedIdentityStatus {
            status: Some(status.into()),
            available_replicas: None,
        }),
    }
}
