//! Cluster objects for the unit tests: the four kinds come from [`pod_identity_api::fixtures`]; what the
//! CLI reads beyond them (Kubernetes pods, assignment records) is built here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::api::ObjectMeta;
use pod_identity_api::{
    AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, POD_LABEL,
};

pub const CLIENT_ID: &str = "5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b";

pub use pod_identity_api::fixtures::{binding, object_meta, user_assigned_identity};

pub fn pod(namespace: &str, name: &str, label: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            labels: label.map(|l| BTreeMap::from([(POD_LABEL.to_owned(), l.to_owned())])),
            ..object_meta(namespace, name)
        },
        spec: Some(PodSpec {
            node_name: Some("node-1".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            // One address per pod, as a node's IPAM gives them.
            pod_ip: Some(format!(
                "10.244.0.{}",
                2 + name.bytes().map(u32::from).sum::<u32>() % 250
            )),
            ..Default::default()
        }),
    }
}

/// The assignment of `identity` to pod `pod`, both of `namespace`, as the controller names and writes it.
pub fn assignment(namespace: &str, pod: &str, identity: &str, status: &str) -> AzureAssignedIdentity {
    AzureAssignedIdentity {
        metadata: object_meta(
            namespace,
            &pod_identity_api::naming::assigned_identity_name(pod, namespace, identity),
        ),
        spec: AzureAssignedIdentitySpec {
            pod: pod.into(),
            pod_namespace: namespace.into(),
            ..AzureAssignedIdentitySpec::default()
        },
        status: Some(AzureAssignedIdentityStatus {
            status: Some(status.into()),
            available_replicas: None,
        }),
    }
}
