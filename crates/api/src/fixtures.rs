//! Builders of the four kinds' objects and of pod views, for tests in every crate of the workspace.
//!
//! Compiled for this crate's tests and for crates that enable the `fixtures` feature, which they do in
//! `[dev-dependencies]` only, so no production build contains it. Each builder makes the smallest
//! object that the rules accept (a user-assigned identity has a well-formed ARM ID, a service principal
//! a tenant and a secret reference) and leaves everything else at its default; the `with_*` methods
//! change one field at a time, so a test states only what it is about. (The example is not run: doc
//! tests build the library without the feature.)
//!
//! ```ignore
//! use pod_identity_api::fixtures::{binding, pod_view, user_assigned_identity, CLIENT_ID};
//!
//! let identity = user_assigned_identity("shop", "payments", CLIENT_ID);
//! let binding = binding("shop", "payments-binding", "payments", "pay").with_weight(5);
//! let pod = pod_view("shop", "web").with_selector("pay").on_node("node-1");
//! # let _ = (identity, binding, pod);
//! ```

use std::{collections::BTreeMap, net::IpAddr};

use kube::api::ObjectMeta;

use crate::{
    AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec,
    AzurePodIdentityException, AzurePodIdentityExceptionSpec, IdentityType, ObjectKey, POD_LABEL,
    SecretReference,
    pod::{Containers, PodView},
};

/// A client ID (application ID) in the GUID shape Entra ID gives.
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
/// The tenant that [`service_principal`] names.
pub const TENANT_ID: &str = "tenant";
/// The Kubernetes secret that [`service_principal`] names as its `clientPassword`.
pub const CLIENT_SECRET_NAME: &str = "secret";

/// Metadata naming an object in a namespace, with the UID `uid-{namespace}-{name}` (the API server
/// gives every stored object one; records of an identity carry it).
pub fn object_meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid: Some(format!("uid-{namespace}-{name}")),
        ..Default::default()
    }
}

/// The ARM ID of a user-assigned identity named `name` in subscription `subscription`, group `rg`.
pub fn user_assigned_identity_id(subscription: &str, name: &str) -> String {
    format!(
        "/subscriptions/{subscription}/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

/// An `AzureIdentity` of type 0 (user-assigned managed identity) with `clientID` `client_id` and a
/// `resourceID` of the same name in subscription `s` ([`AzureIdentity::with_resource_id`] changes it).
pub fn user_assigned_identity(namespace: &str, name: &str, client_id: &str) -> AzureIdentity {
    identity_of_type(namespace, name, IdentityType::UserAssignedManagedIdentity)
        .with_client_id(client_id)
        .with_resource_id(&user_assigned_identity_id("s", name))
}

/// An `AzureIdentity` of type 1 (service principal with a secret) in tenant [`TENANT_ID`], whose
/// `clientPassword` names the secret [`CLIENT_SECRET_NAME`] of its own namespace.
pub fn service_principal(namespace: &str, name: &str, client_id: &str) -> AzureIdentity {
    let mut identity = identity_of_type(namespace, name, IdentityType::ServicePrincipalSecret)
        .with_client_id(client_id)
        .with_tenant_id(TENANT_ID);
    identity.spec.client_password = Some(SecretReference {
        name: Some(CLIENT_SECRET_NAME.into()),
        namespace: Some(namespace.into()),
    });
    identity
}

/// A user-assigned identity served by workload identity federation: the backend annotation says
/// `federated`, and it names tenant [`TENANT_ID`].
pub fn federated_identity(namespace: &str, name: &str, client_id: &str) -> AzureIdentity {
    user_assigned_identity(namespace, name, client_id)
        .with_annotation(crate::federation::BACKEND_ANNOTATION, "federated")
        .with_tenant_id(TENANT_ID)
}

/// An `AzureIdentity` with only its `type`; the `with_*` methods add the rest.
pub fn identity_of_type(namespace: &str, name: &str, type_: IdentityType) -> AzureIdentity {
    AzureIdentity {
        metadata: object_meta(namespace, name),
        spec: AzureIdentitySpec {
            type_: Some(type_.wire_value()),
            ..Default::default()
        },
        status: None,
    }
}

impl AzureIdentity {
    /// This identity with `spec.clientID` set.
    pub fn with_client_id(mut self, client_id: &str) -> Self {
        self.spec.client_id = Some(client_id.into());
        self
    }

    /// This identity with `spec.resourceID` set.
    pub fn with_resource_id(mut self, resource_id: &str) -> Self {
        self.spec.resource_id = Some(resource_id.into());
        self
    }

    /// This identity with `spec.tenantID` set.
    pub fn with_tenant_id(mut self, tenant_id: &str) -> Self {
        self.spec.tenant_id = Some(tenant_id.into());
        self
    }

    /// This identity with the annotation `key` set to `value`.
    pub fn with_annotation(mut self, key: &str, value: &str) -> Self {
        annotate(&mut self.metadata, key, value);
        self
    }
}

/// An `AzureIdentityBinding` of `identity` (an `AzureIdentity` name in the same namespace) to pods whose
/// `aadpodidbinding` label is `selector`, without a weight.
pub fn binding(namespace: &str, name: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    AzureIdentityBinding {
        metadata: object_meta(namespace, name),
        spec: AzureIdentityBindingSpec {
            azure_identity: Some(identity.into()),
            selector: Some(selector.into()),
            weight: None,
        },
        status: None,
    }
}

/// The [`binding`] of `identity` to `selector` named `{identity}-binding`, as aad-pod-identity's examples
/// name the binding of an identity.
pub fn binding_of(namespace: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    binding(namespace, &format!("{identity}-binding"), identity, selector)
}

impl AzureIdentityBinding {
    /// This binding with `spec.weight` set (the heavier binding wins a selector's collision).
    pub fn with_weight(mut self, weight: i64) -> Self {
        self.spec.weight = Some(weight);
        self
    }

    /// This binding with the annotation `key` set to `value`.
    pub fn with_annotation(mut self, key: &str, value: &str) -> Self {
        annotate(&mut self.metadata, key, value);
        self
    }
}

fn annotate(metadata: &mut ObjectMeta, key: &str, value: &str) {
    metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(key.into(), value.into());
}

/// An `AzurePodIdentityException` for pods of its namespace that carry every label of `pod_labels`.
pub fn exception(namespace: &str, name: &str, pod_labels: &[(&str, &str)]) -> AzurePodIdentityException {
    AzurePodIdentityException {
        metadata: object_meta(namespace, name),
        spec: AzurePodIdentityExceptionSpec {
            pod_labels: pod_labels
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
        },
        status: None,
    }
}

/// The view of a pod in phase `Running` with a running container, without labels, node, UID or
/// address; the `with_*` methods add them.
pub fn pod_view(namespace: &str, name: &str) -> PodView {
    PodView {
        key: ObjectKey::new(namespace, name),
        phase: Some("Running".into()),
        containers: Containers::Running,
        ..PodView::default()
    }
}

impl PodView {
    /// This pod with the `aadpodidbinding` label set to `selector`.
    pub fn with_selector(self, selector: &str) -> Self {
        self.with_label(POD_LABEL, selector)
    }

    /// This pod with the label `key` set to `value`.
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// This pod scheduled to `node` (`spec.nodeName`).
    pub fn on_node(mut self, node: &str) -> Self {
        self.node_name = Some(node.into());
        self
    }

    /// This pod with `metadata.uid` set.
    pub fn with_uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.into());
        self
    }

    /// This pod in `status.phase` `phase`.
    pub fn with_phase(mut self, phase: &str) -> Self {
        self.phase = Some(phase.into());
        self
    }

    /// This pod with the address `ip` added to its `status.podIPs`.
    pub fn with_ip(mut self, ip: IpAddr) -> Self {
        self.ips.push(ip);
        self
    }
}
