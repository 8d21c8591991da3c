//! Federated identities: what the controller does for them, and what it never does.
//!
//! An `AzureIdentity` annotated `aadpodidentity.k8s.io/backend: federated` is never put on a VM or scale
//! set: [`served_on_nodes`] is the one place that keeps such identities out of what the planner matches and
//! hands the workers, so they get no assignment, no ARM write, and an identity moved from the node backend
//! leaves the machines it was added to (its old assignments are no longer wanted and are released as any
//! others).
//!
//! Instead, with a subjects namespace configured, the controller keeps one ServiceAccount per federated
//! identity there, its *subject* ([`pod_identity_api::federation::subject_account`]), whose tokens the
//! agents exchange with Entra ID; and, opted in, the federated identity credential on the user-assigned
//! identity that makes Entra trust them ([`decide_credential`]). It creates a credential only where none
//! trusts the subject, names it [`credential_name`] of its issuer and subject, records it on the subject,
//! and deletes only what it recorded: never a credential it did not create. Entra's limit of 20 per identity
//! is reported on the identity (Event and annotation), not exceeded.
//!
//! The decisions here are plain functions; [`reconciler`] does the watching and writing.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ServiceAccount;
use pod_identity_api::{
    AzureIdentity, ObjectKey,
    federation::{
        MANAGED_BY, MANAGED_BY_LABEL, SUBJECT_IDENTITY_ANNOTATION, TOKEN_EXCHANGE_AUDIENCE, credential_name,
        is_federated, subject_account,
    },
};
use pod_identity_azure::{
    ArmClient, AzureError, RetryPolicy, arm::federated_credentials::FederatedCredential,
};

pub mod reconciler;

/// Annotation of a subject: the ARM ID of the federated identity credential the controller created for
/// it, and so the only one it will ever delete.
pub const CREDENTIAL_ID_ANNOTATION: &str = "aadpodidentity.k8s.io/federated-credential-id";
/// Entra's limit of federated identity credentials per identity.
pub const MAX_CREDENTIALS: usize = 20;

/// The identities the planner may match and hand the workers: all but the federated ones, which never touch
/// a VM or scale set.
pub fn served_on_nodes(identities: Vec<AzureIdentity>) -> Vec<AzureIdentity> {
    identities.into_iter().filter(|i| !is_federated(i)).collect()
}

/// Federated identity credentials of user-assigned identities (ARM).
pub trait CredentialsApi: Send + Sync + 'static {
    /// Every credential of the identity `identity_id`.
    fn list<'a>(
        &'a self,
        identity_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<FederatedCredential>, AzureError>>;
    /// Creates or rewrites credential `name` for `issuer` and `subject`, audience `api://AzureADTokenExchange`.
    fn put<'a>(
        &'a self,
        identity_id: &'a str,
        name: &'a str,
        issuer: &'a str,
        subject: &'a str,
    ) -> BoxFuture<'a, Result<FederatedCredential, AzureError>>;
    /// Deletes credential `name`; whether it existed.
    fn delete<'a>(&'a self, identity_id: &'a str, name: &'a str) -> BoxFuture<'a, Result<bool, AzureError>>;
}

impl CredentialsApi for ArmClient {
    fn list<'a>(
        &'a self,
        identity_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<FederatedCredential>, AzureError>> {
        Box::pin(self.list_federated_credentials(identity_id))
    }

    fn put<'a>(
        &'a self,
        identity_id: &'a str,
        name: &'a str,
        issuer: &'a str,
        subject: &'a str,
    ) -> BoxFuture<'a, Result<FederatedCredential, AzureError>> {
        Box::pin(self.put_federated_credential(identity_id, name, issuer, subject, TOKEN_EXCHANGE_AUDIENCE))
    }

    fn delete<'a>(&'a self, identity_id: &'a str, name: &'a str) -> BoxFuture<'a, Result<bool, AzureError>> {
        Box::pin(self.delete_federated_credential(identity_id, name))
    }
}

/// What the controller does for federated identities.
#[derive(Clone, Default)]
pub struct FederationConfig {
    /// Namespace of the subjects; `None`: the controller keeps no subjects and no credentials (federated
    /// identities are still kept off the nodes).
    pub namespace: Option<String>,
    /// The cluster's service-account issuer, as federated credentials name it; read from the API server's
    /// `/.well-known/openid-configuration` when `None`.
    pub issuer: Option<String>,
    /// Manage federated identity credentials through this API (opt-in); `None`: they are the user's.
    pub credentials: Option<Arc<dyn CredentialsApi>>,
    /// How often a credential that was in order is checked again.
    pub recheck: Duration,
    /// Waits after a failure (a subject or credential write, the issuer's discovery document): the
    /// workspace's one retry policy, its steps growing while failures go on (the retry count does not
    /// apply: the reconciler retries while it runs).
    pub retry: RetryPolicy,
}

impl std::fmt::Debug for FederationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationConfig")
            .field("namespace", &self.namespace)
            .field("issuer", &self.issuer)
            .field("manage_credentials", &self.credentials.is_some())
            .field("recheck", &self.recheck)
            .field("retry", &self.retry)
            .finish()
    }
}

impl FederationConfig {
    /// Settings with the default timing.
    pub fn new(namespace: Option<String>) -> Self {
        Self {
            namespace,
            issuer: None,
            credentials: None,
            recheck: Duration::from_secs(3600),
            retry: RetryPolicy {
                initial_delay: Duration::from_secs(5),
                max_delay: Duration::from_secs(300),
                ..RetryPolicy::default()
            },
        }
    }
}

/// A subject the controller created, as its ServiceAccount says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// Name of the ServiceAccount.
    pub account: String,
    /// The identity it stands for, if the annotation is readable.
    pub identity: Option<ObjectKey>,
    /// The federated identity credential created for it.
    pub credential: Option<String>,
}

impl Subject {
    /// The subject a ServiceAccount records; `None` for one the controller did not create.
    pub fn from_account(account: &ServiceAccount) -> Option<Self> {
        let meta = &account.metadata;
        let ours = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == MANAGED_BY);
        if !ours {
            return None;
        }
        let annotation = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key)).cloned();
        Some(Self {
            account: meta.name.clone().unwrap_or_default(),
            identity: annotation(SUBJECT_IDENTITY_ANNOTATION).and_then(|text| {
                let (namespace, name) = text.split_once('/')?;
                Some(ObjectKey::new(namespace, name))
            }),
            credential: annotation(CREDENTIAL_ID_ANNOTATION).filter(|c| !c.is_empty()),
        })
    }
}

/// A federated identity and its subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Federated {
    /// The AzureIdentity.
    pub identity: ObjectKey,
    /// Its user-assigned identity's ARM ID.
    pub resource_id: String,
    /// Name of its subject's ServiceAccount.
    pub account: String,
}

/// What to do about subjects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubjectsPlan {
    /// Every federated identity, with its subject.
    pub federated: Vec<Federated>,
    /// Subjects to create.
    pub create: Vec<Federated>,
    /// Subjects whose identity is gone or no longer federated: their credential (if recorded) goes, then
    /// they do.
    pub orphans: Vec<Subject>,
}

/// Subjects to create for federated identities, and subjects no identity needs any more. An identity whose
/// spec is invalid is served by no backend (matching refuses it by name), so it has no subject either.
pub fn plan_subjects(identities: &[AzureIdentity], subjects: &[Subject]) -> SubjectsPlan {
    let federated: Vec<Federated> = identities
        .iter()
        .filter(|i| is_federated(i) && i.spec.validate().is_empty())
        .map(|i| {
            let identity = ObjectKey::new(
                i.metadata.namespace.clone().unwrap_or_default(),
                i.metadata.name.clone().unwrap_or_default(),
            );
            Federated {
                account: subject_account(&identity),
                identity,
                resource_id: i.spec.resource_id.clone().unwrap_or_default(),
            }
        })
        .collect();
    let create = federated
        .iter()
        .filter(|f| !subjects.iter().any(|s| s.account == f.account))
        .cloned()
        .collect();
    let orphans = subjects
        .iter()
        .filter(|s| {
            !federated
                .iter()
                .any(|f| f.account == s.account && s.identity.as_ref() == Some(&f.identity))
        })
        .cloned()
        .collect();
    SubjectsPlan {
        federated,
        create,
        orphans,
    }
}

/// What the credentials of an identity call for, given the subject it must trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialDecision {
    /// A credential trusts issuer, subject and audience already (`ours`: the controller's own).
    Present {
        /// Its name.
        name: String,
        /// Whether the controller created it.
        ours: bool,
    },
    /// The controller's credential for the issuer and subject lists another audience: write it again.
    Rewrite {
        /// Its name.
        name: String,
    },
    /// Someone else's credential has the issuer and subject but another audience, and ARM allows one
    /// credential per issuer and subject: Entra will refuse the exchange until the user fixes it.
    WrongAudience {
        /// Its name.
        name: String,
        /// The audiences it lists.
        audiences: Vec<String>,
    },
    /// None trusts the subject: create the controller's.
    Create {
        /// The name to give it.
        name: String,
    },
    /// None trusts the subject and the identity has [`MAX_CREDENTIALS`] already.
    Full {
        /// How many it has.
        count: usize,
    },
}

/// Decides about the credentials `existing` of an identity that must trust `issuer` and `subject`.
/// Issuer and subject compare exactly, as Entra compares them (case-sensitively since 2024).
pub fn decide_credential(
    existing: &[FederatedCredential],
    issuer: &str,
    subject: &str,
) -> CredentialDecision {
    let ours = credential_name(issuer, subject);
    if let Some(found) = existing
        .iter()
        .find(|c| c.issuer == issuer && c.subject == subject)
    {
        let audience_ok = found.audiences.iter().any(|a| a == TOKEN_EXCHANGE_AUDIENCE);
        return match (audience_ok, found.name == ours) {
            (true, mine) => CredentialDecision::Present {
                name: found.name.clone(),
                ours: mine,
            },
            (false, true) => CredentialDecision::Rewrite { name: ours },
            (false, false) => CredentialDecision::WrongAudience {
                name: found.name.clone(),
                audiences: found.audiences.clone(),
            },
        };
    }
    if existing.len() >= MAX_CREDENTIALS {
        CredentialDecision::Full {
            count: existing.len(),
        }
    } else {
        CredentialDecision::Create { name: ours }
    }
}

impl CredentialDecision {
    /// The identity's status annotation for this decision once acted upon.
    pub fn status(&self, identity_id: &str, issuer: &str, subject: &str) -> String {
        match self {
            Self::Present { name, ours: true } | Self::Rewrite { name } | Self::Create { name } => {
                format!("managed: {name} trusts issuer {issuer}, subject {subject}")
            }
            Self::Present { name, ours: false } => format!(
                "present: {name} (not created by pod-identity, so never changed or deleted by it) trusts issuer \
                 {issuer}, subject {subject}"
            ),
            Self::WrongAudience { name, audiences } => format!(
                "not created: credential {name} of the identity trusts issuer {issuer} and subject {subject} for \
                 audience {}, not {TOKEN_EXCHANGE_AUDIENCE}, and ARM allows one credential per issuer and subject: \
                 change its audience to {TOKEN_EXCHANGE_AUDIENCE}",
                audiences.join(", ")
            ),
            Self::Full { count } => format!(
                "not created: {identity_id} has {count} federated identity credentials, the most Entra ID allows \
                 ({MAX_CREDENTIALS}), and none trusts issuer {issuer} and subject {subject}: delete one it no longer \
                 needs"
            ),
        }
    }

    /// Whether the identity can be exchanged for after this decision is acted upon.
    pub fn usable(&self) -> bool {
        !matches!(self, Self::WrongAudience { .. } | Self::Full { .. })
    }
}

/// The identity ID and credential name of a credential's ARM ID.
pub fn split_credential_id(id: &str) -> Option<(&str, &str)> {
    let lower = id.to_ascii_lowercase();
    let at = lower.rfind("/federatedidentitycredentials/")?;
    let name = &id[at + "/federatedIdentityCredentials/".len()..];
    (!name.is_empty() && !name.contains('/')).then_some((&id[..at], name))
}

/// The ARM ID of credential `name` of identity `identity_id`.
pub fn credential_id(identity_id: &str, name: &str) -> String {
    format!(
        "{}/federatedIdentityCredentials/{name}",
        identity_id.trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests;
