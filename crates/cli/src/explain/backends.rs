//! Which backend serves each identity of a pod, why, and (for a federated identity) what stands in the
//! way of the exchange: the subject missing, the federated identity credential the controller could not
//! create, a cluster signing with an algorithm Entra refuses, and the last refusal the agent reported on
//! the pod.

use pod_identity_api::{
    AzureIdentity,
    federation::{
        self, BACKEND_ANNOTATION, Backend, CREDENTIAL_STATUS_ANNOTATION, DEFAULT_SUBJECTS_NAMESPACE,
        TOKEN_EXCHANGE_AUDIENCE, algorithm_problem, subject, subject_account,
    },
    matching::{DesiredAssignment, Index},
};
use serde::Serialize;

use crate::cluster::FederationView;

/// How one identity of the pod is served.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendReport {
    /// `namespace/name` of the identity.
    pub identity: String,
    /// `node` or `federated`.
    pub backend: Backend,
    /// Why that backend: the annotation, or the default.
    pub because: String,
    /// What the backend does, in a sentence.
    pub serves: String,
    /// For a federated identity: the subject its federated identity credential must name.
    pub subject: Option<String>,
    /// For a federated identity: the issuer its credential must name, when known.
    pub issuer: Option<String>,
    /// For a federated identity: what the controller reported of its credential.
    pub credential: Option<String>,
    /// What would make (or made) the exchange fail.
    pub problems: Vec<String>,
}

/// The reports of the pod's identities (those its bindings give it).
pub fn reports(
    assignments: &[DesiredAssignment],
    index: &Index,
    view: &FederationView,
) -> Vec<BackendReport> {
    assignments
        .iter()
        .filter_map(|a| index.identity(&a.identity.namespace, &a.identity.name))
        .map(|identity| report(identity, view))
        .collect()
}

fn report(identity: &AzureIdentity, view: &FederationView) -> BackendReport {
    let key = format!(
        "{}/{}",
        identity.metadata.namespace.as_deref().unwrap_or(""),
        identity.metadata.name.as_deref().unwrap_or("")
    );
    let annotation = identity
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BACKEND_ANNOTATION));
    let backend = federation::backend(identity).unwrap_or_default();
    let because = match annotation {
        Some(value) => format!("annotation {BACKEND_ANNOTATION}: {value}"),
        None => format!("the default (no annotation {BACKEND_ANNOTATION})"),
    };
    if backend == Backend::Node {
        return BackendReport {
            identity: key,
            backend,
            because,
            serves: if identity
                .spec
                .identity_type()
                .is_ok_and(|t| !t.is_managed_identity())
            {
                "a service principal: the agent asks Entra ID with the credential of its Secret; nothing is added \
                 to a VM or scale set"
                    .into()
            } else {
                "the controller adds the identity to the VM or scale set of the pod's node and the agent asks that \
                 node's Instance Metadata Service for its tokens"
                    .into()
            },
            subject: None,
            issuer: None,
            credential: None,
            problems: Vec::new(),
        };
    }
    let namespace = if view.namespace.is_empty() {
        DEFAULT_SUBJECTS_NAMESPACE
    } else {
        &view.namespace
    };
    let object_key = pod_identity_api::ObjectKey::new(
        identity.metadata.namespace.clone().unwrap_or_default(),
        identity.metadata.name.clone().unwrap_or_default(),
    );
    let account = subject_account(&object_key);
    let subject = subject(namespace, &account);
    let client = identity.spec.client_id.clone().unwrap_or_default();
    let tenant = identity.spec.tenant_id.clone().unwrap_or_default();
    let mut problems = Vec::new();
    match &view.subjects {
        Some(subjects) if !subjects.contains(&account) => problems.push(format!(
            "its subject, ServiceAccount {namespace}/{account}, does not exist: the controller creates it when run \
             with --federation-namespace {namespace} (the chart's federation.enabled)"
        )),
        Some(_) => {}
        None => problems.push(format!(
            "the ServiceAccounts of namespace {namespace} could not be read, so whether the subject {account} \
             exists is not known"
        )),
    }
    for alg in view.signing_algorithms.iter().flatten() {
        if let Some(problem) = algorithm_problem(alg) {
            problems.push(problem);
        }
    }
    let credential = identity
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CREDENTIAL_STATUS_ANNOTATION))
        .cloned();
    if let Some(status) = credential
        .as_deref()
        .filter(|s| !s.starts_with("managed:") && !s.starts_with("present:"))
    {
        problems.push(format!(
            "the controller reports on its federated identity credential: {status}"
        ));
    }
    let name = object_key.to_string();
    if let Some((reason, note)) = view
        .pod_events
        .iter()
        .rev()
        .find(|(reason, note)| reason == "TokenUpstreamError" && note.contains(&name))
    {
        problems.push(format!("the agent last reported ({reason}): {note}"));
    }
    let issuer = view.issuer.clone();
    BackendReport {
        identity: key,
        backend,
        because,
        serves: format!(
            "the agent exchanges a token of ServiceAccount {namespace}/{account} (audience {TOKEN_EXCHANGE_AUDIENCE}) \
             with Entra ID for client {client} in tenant {tenant}; nothing is added to a VM or scale set. Entra \
             answers when the identity has a federated identity credential with issuer {}, subject {subject} and \
             audience {TOKEN_EXCHANGE_AUDIENCE}",
            issuer
                .as_deref()
                .unwrap_or("<the cluster's service-account issuer>")
        ),
        subject: Some(subject),
        issuer,
        credential,
        problems,
    }
}
