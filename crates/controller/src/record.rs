//! `AzureAssignedIdentity` objects as the controller writes and reads them.
//!
//! Besides the original's fields (name, `nodename` label, finalizer, embedded copies, status) each object
//! we write carries two annotations that make removal safe:
//! - [`MACHINE_ANNOTATION`]: the VM or scale set the identity was put on. The node may be gone by the time
//!   the pod is, and the identity must still leave the right machine.
//! - [`ORIGIN_ANNOTATION`]: `added` when this controller added the identity to that machine, `preexisting`
//!   when it was already there. It is written *before* the ARM request that adds the identity, so a
//!   controller killed between the request and the status update still knows, after restart, that the
//!   identity is its own. An identity leaves a machine only if one of its records says `added`.
//!
//! Objects left by aad-pod-identity 1.8 have neither annotation; they are adopted as they are (same name,
//! so no duplicate is created), their machine is found from their node, and their identity counts as not
//! added by us: we cannot tell whether it was on the machine before, so it is never removed on their
//! account.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use pod_identity_api::{
    ASSIGNED_IDENTITY_FINALIZER, AssignmentStatus, AzureAssignedIdentity, AzureAssignedIdentitySpec,
    AzureAssignedIdentityStatus, AzureIdentity, AzureIdentityBinding, EmbeddedAzureIdentity,
    EmbeddedAzureIdentityBinding, IdentityType, NODENAME_LABEL, ObjectKey, matching::DesiredAssignment,
};

use pod_identity_azure::resource_id::fold;

/// The VM or scale set (ARM ID) an assignment's identity was put on.
pub const MACHINE_ANNOTATION: &str = "aadpodidentity.k8s.io/machine";
/// Whether this controller added the identity to the machine: [`Origin`].
pub const ORIGIN_ANNOTATION: &str = "aadpodidentity.k8s.io/identity-origin";
/// Why the identity could not be assigned (quarantine, machine missing...); removed once it is.
pub const ERROR_ANNOTATION: &str = "aadpodidentity.k8s.io/assignment-error";
/// `apiVersion` of the embedded copies.
const API_VERSION: &str = "aadpodidentity.k8s.io/v1";

/// Who put an assignment's identity on its machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// This controller added it; it may remove it when no pod needs it.
    Added,
    /// It was on the machine before this controller needed it; never removed.
    Preexisting,
    /// Not recorded (an object of aad-pod-identity 1.8, or not yet decided); treated as preexisting.
    Unknown,
}

impl Origin {
    /// The annotation value.
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            Self::Added => Some("added"),
            Self::Preexisting => Some("preexisting"),
            Self::Unknown => None,
        }
    }

    fn parse(value: Option<&str>) -> Self {
        match value {
            Some("added") => Self::Added,
            Some("preexisting") => Self::Preexisting,
            _ => Self::Unknown,
        }
    }
}

/// An assignment that should exist, with the object that records it.
#[derive(Clone, Debug)]
pub struct Wanted {
    /// Namespace and name of the object.
    pub key: ObjectKey,
    /// ARM ID of the user-assigned identity; `None` for service principals, which never touch ARM.
    pub identity_id: Option<String>,
    /// Client ID of the identity (what the immutable list names).
    pub client_id: Option<String>,
    /// The pod.
    pub pod: ObjectKey,
    /// The pod's node.
    pub node: String,
    /// The identity.
    pub identity: ObjectKey,
    /// The binding.
    pub binding: ObjectKey,
    /// When the pod was scheduled, for the assignment latency metric.
    pub scheduled_at: Option<jiff::Timestamp>,
    /// The object as it should be: metadata (label, finalizer) and spec; status and origin are decided
    /// by the worker.
    pub object: AzureAssignedIdentity,
}

impl PartialEq for Wanted {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
            && self.identity_id == other.identity_id
            && self.client_id == other.client_id
            && self.pod == other.pod
            && self.node == other.node
            && self.identity == other.identity
            && self.binding == other.binding
            && self.scheduled_at == other.scheduled_at
            && self.object.metadata == other.object.metadata
            && self.object.spec == other.object.spec
    }
}

impl Wanted {
    /// The desired record of one matching result.
    pub fn new(
        desired: &DesiredAssignment,
        identity: &AzureIdentity,
        binding: &AzureIdentityBinding,
        scheduled_at: Option<jiff::Timestamp>,
    ) -> Self {
        let identity_type = identity
            .spec
            .identity_type()
            .unwrap_or(IdentityType::UserAssignedManagedIdentity);
        let identity_id = identity_type
            .is_managed_identity()
            .then(|| identity.spec.resource_id.clone())
            .flatten();
        let object = AzureAssignedIdentity {
            metadata: ObjectMeta {
                name: Some(desired.assignment.name.clone()),
                namespace: Some(desired.assignment.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    NODENAME_LABEL.to_owned(),
                    desired.node.clone(),
                )])),
                finalizers: Some(vec![ASSIGNED_IDENTITY_FINALIZER.to_owned()]),
                ..ObjectMeta::default()
            },
            spec: AzureAssignedIdentitySpec {
                azure_identity_ref: Some(EmbeddedAzureIdentity {
                    api_version: API_VERSION.to_owned(),
                    kind: "AzureIdentity".to_owned(),
                    metadata: embedded_meta(&identity.metadata),
                    spec: identity.spec.clone(),
                    status: identity.status.clone(),
                }),
                azure_binding_ref: Some(EmbeddedAzureIdentityBinding {
                    api_version: API_VERSION.to_owned(),
                    kind: "AzureIdentityBinding".to_owned(),
                    metadata: embedded_meta(&binding.metadata),
                    spec: binding.spec.clone(),
                    status: binding.status.clone(),
                }),
                pod: desired.pod.name.clone(),
                pod_namespace: desired.pod.namespace.clone(),
                nodename: desired.node.clone(),
                replicas: None,
            },
            status: None,
        };
        Self {
            key: desired.assignment.clone(),
            identity_id,
            client_id: identity.spec.client_id.clone(),
            pod: desired.pod.clone(),
            node: desired.node.clone(),
            identity: desired.identity.clone(),
            binding: desired.binding.clone(),
            scheduled_at,
            object,
        }
    }

    /// The case-folded identity ID.
    pub fn identity_key(&self) -> Option<String> {
        self.identity_id.as_deref().map(fold)
    }

    /// The object to create, with its status and origin.
    pub fn to_create(
        &self,
        status: &AssignmentStatus,
        origin: Origin,
        machine: Option<&str>,
    ) -> AzureAssignedIdentity {
        let mut object = self.object.clone();
        let annotations = object.metadata.annotations.get_or_insert_with(BTreeMap::new);
        if let Some(machine) = machine {
            annotations.insert(MACHINE_ANNOTATION.to_owned(), machine.to_owned());
        }
        if let Some(origin) = origin.as_str() {
            annotations.insert(ORIGIN_ANNOTATION.to_owned(), origin.to_owned());
        }
        object.status = Some(AzureAssignedIdentityStatus {
            status: Some(status.as_str().to_owned()),
            available_replicas: Some(1),
        });
        object
    }
}

/// The parts of an embedded object's metadata worth copying: no managed fields, no last-applied
/// configuration (each can be larger than the rest of the object).
fn embedded_meta(meta: &ObjectMeta) -> ObjectMeta {
    let annotations = meta.annotations.as_ref().map(|a| {
        a.iter()
            .filter(|(k, _)| k.as_str() != "kubectl.kubernetes.io/last-applied-configuration")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    });
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        generation: meta.generation,
        creation_timestamp: meta.creation_timestamp.clone(),
        labels: meta.labels.clone(),
        annotations: annotations.filter(|a| !a.is_empty()),
        ..ObjectMeta::default()
    }
}

/// An assignment object as found in the cluster.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Namespace and name.
    pub key: ObjectKey,
    /// Version the facts below were read from; writes are conditional on it.
    pub resource_version: Option<String>,
    /// UID, for conditional deletes.
    pub uid: Option<String>,
    /// ARM ID of the identity (from the embedded copy); `None` for service principals.
    pub identity_id: Option<String>,
    /// Client ID of the identity.
    pub client_id: Option<String>,
    /// Lifecycle state.
    pub status: AssignmentStatus,
    /// Who put the identity on the machine.
    pub origin: Origin,
    /// The machine annotation.
    pub machine: Option<String>,
    /// Node name from the spec.
    pub node: String,
    /// Whether our finalizer is on it.
    pub has_finalizer: bool,
    /// Whether the `nodename` label is right.
    pub labelled: bool,
    /// Whether someone asked to delete it.
    pub terminating: bool,
    /// The error annotation.
    pub error: Option<String>,
    /// The object itself.
    pub object: Arc<AzureAssignedIdentity>,
}

impl PartialEq for Recorded {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.resource_version == other.resource_version && self.uid == other.uid
    }
}

impl Recorded {
    /// Reads an object.
    pub fn from_object(object: Arc<AzureAssignedIdentity>) -> Self {
        let spec = &object.spec;
        let identity_spec = spec.azure_identity_ref.as_ref().map(|i| &i.spec);
        let managed = identity_spec
            .and_then(|s| s.identity_type().ok())
            .is_none_or(IdentityType::is_managed_identity);
        let annotations = object.annotations();
        Self {
            key: ObjectKey::new(object.namespace().unwrap_or_default(), object.name_any()),
            resource_version: object.resource_version(),
            uid: object.uid(),
            identity_id: identity_spec
                .and_then(|s| s.resource_id.clone())
                .filter(|id| managed && !id.is_empty()),
            client_id: identity_spec.and_then(|s| s.client_id.clone()),
            status: object.assignment_status(),
            origin: Origin::parse(annotations.get(ORIGIN_ANNOTATION).map(String::as_str)),
            machine: annotations.get(MACHINE_ANNOTATION).cloned(),
            node: spec.nodename.clone(),
            has_finalizer: object
                .finalizers()
                .iter()
                .any(|f| f == ASSIGNED_IDENTITY_FINALIZER),
            labelled: object.labels().get(NODENAME_LABEL) == Some(&spec.nodename),
            terminating: object.metadata.deletion_timestamp.is_some(),
            error: annotations.get(ERROR_ANNOTATION).cloned(),
            object,
        }
    }

    /// The case-folded identity ID.
    pub fn identity_key(&self) -> Option<String> {
        self.identity_id.as_deref().map(fold)
    }

    /// Whether the spec differs from what it should be (the identity or binding was edited, or a pod of
    /// the same name landed on another node of the same machine).
    pub fn differs_from(&self, wanted: &Wanted) -> bool {
        let (have, want) = (&self.object.spec, &wanted.object.spec);
        let names = |e: Option<&ObjectMeta>| e.map(|m| (m.name.clone(), m.namespace.clone()));
        have.pod != want.pod
            || have.pod_namespace != want.pod_namespace
            || have.nodename != want.nodename
            || have.azure_identity_ref.as_ref().map(|i| &i.spec)
                != want.azure_identity_ref.as_ref().map(|i| &i.spec)
            || have.azure_binding_ref.as_ref().map(|b| &b.spec)
                != want.azure_binding_ref.as_ref().map(|b| &b.spec)
            || names(have.azure_identity_ref.as_ref().map(|i| &i.metadata))
                != names(want.azure_identity_ref.as_ref().map(|i| &i.metadata))
            || names(have.azure_binding_ref.as_ref().map(|b| &b.metadata))
                != names(want.azure_binding_ref.as_ref().map(|b| &b.metadata))
            || !self.labelled
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Objects for unit tests.

    use pod_identity_api::fixtures::user_assigned_identity;

    use super::*;

    pub const SUB: &str = "00000000-0000-0000-0000-000000000001";

    pub fn identity_id(name: &str) -> String {
        format!(
            "/subscriptions/{SUB}/resourceGroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
    }

    pub fn client_id(n: u8) -> String {
        format!("00000000-0000-0000-0000-0000000000{n:02x}")
    }

    pub use pod_identity_api::fixtures::binding;

    /// User-assigned identity `name` of [`SUB`] with client [`client_id`]`(n)`, as read at version 1.
    pub fn identity(namespace: &str, name: &str, n: u8) -> AzureIdentity {
        let mut identity =
            user_assigned_identity(namespace, name, &client_id(n)).with_resource_id(&identity_id(name));
        identity.metadata.resource_version = Some("1".into());
        identity
    }

    /// A wanted assignment of `pod` (namespace `ns`) to identity `name` on `node`.
    pub fn wanted(pod: &str, node: &str, name: &str, n: u8) -> Wanted {
        let desired = DesiredAssignment {
            assignment: ObjectKey::new("ns", format!("{pod}-ns-{name}")),
            pod: ObjectKey::new("ns", pod),
            pod_uid: Some(format!("uid-{pod}")),
            node: node.to_owned(),
            identity: ObjectKey::new("ns", name),
            binding: ObjectKey::new("ns", format!("{name}-binding")),
            rank: 0,
        };
        Wanted::new(
            &desired,
            &identity("ns", name, n),
            &pod_identity_api::fixtures::binding_of("ns", name, "sel"),
            None,
        )
    }

    /// The object a controller would have written for `wanted`, as read back.
    pub fn recorded(
        wanted: &Wanted,
        status: AssignmentStatus,
        origin: Origin,
        machine: Option<&str>,
    ) -> Recorded {
        let mut object = wanted.to_create(&status, origin, machine);
        object.metadata.resource_version = Some("7".into());
        object.metadata.uid = Some(format!("uid-{}", wanted.key.name));
        Recorded::from_object(Arc::new(object))
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn created_objects_have_the_original_name_label_finalizer_and_copies() {
        let wanted = wanted("web-0", "node-1", "payments", 1);
        let object = wanted.to_create(
            &AssignmentStatus::Created,
            Origin::Added,
            Some("/subscriptions/x"),
        );
        assert_eq!(object.metadata.name.as_deref(), Some("web-0-ns-payments"));
        assert_eq!(object.labels()[NODENAME_LABEL], "node-1");
        assert_eq!(object.finalizers(), &[ASSIGNED_IDENTITY_FINALIZER.to_owned()]);
        assert_eq!(object.annotations()[ORIGIN_ANNOTATION], "added");
        assert_eq!(object.annotations()[MACHINE_ANNOTATION], "/subscriptions/x");
        assert_eq!(object.assignment_status(), AssignmentStatus::Created);
        let identity_ref = object.spec.azure_identity_ref.as_ref().unwrap();
        assert_eq!(identity_ref.kind, "AzureIdentity");
        assert_eq!(identity_ref.metadata.name.as_deref(), Some("payments"));
        assert_eq!(object.spec.pod, "web-0");
        assert_eq!(object.spec.pod_namespace, "ns");
        assert_eq!(object.spec.nodename, "node-1");
    }

    #[test]
    fn records_read_back_what_was_written() {
        let wanted = wanted("web-0", "node-1", "payments", 1);
        let recorded = recorded(&wanted, AssignmentStatus::Assigned, Origin::Added, Some("m"));
        assert_eq!(recorded.origin, Origin::Added);
        assert_eq!(recorded.identity_key(), wanted.identity_key());
        assert!(recorded.has_finalizer && recorded.labelled && !recorded.terminating);
        assert!(!recorded.differs_from(&wanted));
        let moved = super::fixtures::wanted("web-0", "node-2", "payments", 1);
        assert!(recorded.differs_from(&moved));
    }

    #[test]
    fn objects_of_the_original_read_as_unknown_origin_without_machine() {
        let wanted = wanted("web-0", "node-1", "payments", 1);
        let mut object = wanted.object.clone();
        object.status = Some(AzureAssignedIdentityStatus {
            status: Some("Assigned".into()),
            available_replicas: Some(1),
        });
        let recorded = Recorded::from_object(Arc::new(object));
        assert_eq!(recorded.origin, Origin::Unknown);
        assert_eq!(recorded.machine, None);
        assert_eq!(recorded.status, AssignmentStatus::Assigned);
    }

    #[test]
    fn service_principals_have_no_arm_identity() {
        let mut identity = identity("ns", "sp", 3);
        identity.spec.type_ = Some(1);
        identity.spec.tenant_id = Some(client_id(9));
        let desired = DesiredAssignment {
            assignment: ObjectKey::new("ns", "p-ns-sp"),
            pod: ObjectKey::new("ns", "p"),
            pod_uid: None,
            node: "n".into(),
            identity: ObjectKey::new("ns", "sp"),
            binding: ObjectKey::new("ns", "b"),
            rank: 0,
        };
        let wanted = Wanted::new(&desired, &identity, &binding("ns", "b", "sp", "s"), None);
        assert_eq!(wanted.identity_id, None);
        let recorded = Recorded::from_object(Arc::new(wanted.to_create(
            &AssignmentStatus::Assigned,
            Origin::Unknown,
            None,
        )));
        assert_eq!(recorded.identity_id, None);
    }
}
