//! Which backend serves an identity's tokens, and the names workload identity federation uses.
//!
//! An `AzureIdentity` of type 0 is served by one of two backends, chosen per identity with the annotation
//! [`BACKEND_ANNOTATION`] (the `aadpodidentity.k8s.io/v1` schema is unchanged):
//! - [`Backend::Node`] (the default, as in aad-pod-identity): the controller adds the identity to the VM or
//!   scale set of the pod's node and the agent asks the node's Instance Metadata Service for its tokens;
//! - [`Backend::Federated`]: nothing is added to any VM. The agent asks the API server for a token of the
//!   identity's *subject*, a ServiceAccount dedicated to that identity in the subjects namespace, and
//!   exchanges it with Entra ID as a `client_assertion` (workload identity federation). Entra issues the
//!   token when the identity has a federated identity credential for the cluster's issuer, that subject
//!   and the audience [`TOKEN_EXCHANGE_AUDIENCE`].
//!
//! The subject belongs to the identity, not to the pods: which pod may use it is still decided by the
//! bindings, with the agent as the trusted party exactly as for identities on a node. One federated
//! credential per identity and cluster therefore serves every namespace and service account, far below
//! Entra's limit of 20 per identity (the README's "Workload identity federation" compares this with
//! federating each pod's own service account).

use std::fmt;

use crate::{AzureIdentity, IdentityType, ObjectKey, naming::fnv1a64, validation::SpecError};

/// Annotation of an `AzureIdentity` that chooses its backend: `node` (default) or `federated`.
pub const BACKEND_ANNOTATION: &str = "aadpodidentity.k8s.io/backend";
/// Where errors about [`BACKEND_ANNOTATION`] point.
const BACKEND_FIELD: &str = "metadata.annotations[aadpodidentity.k8s.io/backend]";
/// Annotation the controller writes on a federated `AzureIdentity` when it manages its federated
/// identity credential: what it did, or why it could not (e.g. the identity has 20 already).
pub const CREDENTIAL_STATUS_ANNOTATION: &str = "aadpodidentity.k8s.io/federated-credential";
/// The audience of the tokens exchanged with Entra: the value Azure's documentation, azure-workload-identity
/// and every SDK use, and the one a federated identity credential must list.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The namespace of the subjects, as the chart creates it.
pub const DEFAULT_SUBJECTS_NAMESPACE: &str = "pod-identity-federation";
/// Label on every ServiceAccount the controller creates as a subject.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] on subjects.
pub const MANAGED_BY: &str = "pod-identity";
/// Annotation of a subject naming the identity it stands for (`namespace/name`).
pub const SUBJECT_IDENTITY_ANNOTATION: &str = "aadpodidentity.k8s.io/identity";
/// Prefix of the names of the federated identity credentials the controller creates; the rest of the name
/// is a hash of issuer and subject, so a credential whose name is not exactly [`credential_name`] of its
/// own issuer and subject was not created by the controller and is never deleted by it.
pub const CREDENTIAL_NAME_PREFIX: &str = "pod-identity-";

/// Where an identity's tokens come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The identity is added to the node's VM or scale set; tokens come from the node's IMDS.
    #[default]
    Node,
    /// Tokens come from Entra ID in exchange for a token of the identity's subject.
    Federated,
}

impl Backend {
    /// The annotation's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Federated => "federated",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The backend an identity asks for. Only type 0 identities have a choice: service principals (types 1
/// and 2) never touch a node and are always served from Entra with their own credential.
///
/// Errors: an annotation value other than `node` or `federated`, `federated` on a service principal, and
/// a federated identity without `tenantID` (Entra's token endpoint is per tenant, and IMDS, which knew
/// the tenant, is not asked).
pub fn backend(identity: &AzureIdentity) -> Result<Backend, SpecError> {
    let value = identity
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BACKEND_ANNOTATION))
        .map(|v| v.trim());
    let chosen = match value {
        None | Some("") => return Ok(Backend::Node),
        Some(v) if v.eq_ignore_ascii_case("node") => Backend::Node,
        Some(v) if v.eq_ignore_ascii_case("federated") => Backend::Federated,
        Some(other) => {
            return Err(SpecError::annotation(
                BACKEND_FIELD,
                format!("must be \"node\" or \"federated\", not {other:?}"),
            ));
        }
    };
    if chosen == Backend::Federated {
        let kind = identity.spec.identity_type().ok();
        if kind.is_some_and(|k| k != IdentityType::UserAssignedManagedIdentity) {
            return Err(SpecError::annotation(
                BACKEND_FIELD,
                "\"federated\" applies to user-assigned managed identities (type 0); service principals are \
                 already served from Entra ID with their own credential",
            ));
        }
        if identity
            .spec
            .tenant_id
            .as_deref()
            .is_none_or(|t| t.trim().is_empty())
        {
            return Err(SpecError::new(
                "tenantID",
                "tenantID is required for a federated identity: Entra ID exchanges the cluster's token in the \
                 identity's tenant",
            ));
        }
    }
    Ok(chosen)
}

/// The problems of an identity's backend choice; empty when it can be used.
pub fn backend_errors(identity: &AzureIdentity) -> Vec<SpecError> {
    backend(identity).err().into_iter().collect()
}

/// Whether the identity is served by the federated backend (a valid choice of it).
pub fn is_federated(identity: &AzureIdentity) -> bool {
    matches!(backend(identity), Ok(Backend::Federated))
}

/// Name of the ServiceAccount that is the subject of identity `namespace/name`: `<namespace>.<name>`.
/// Namespaces hold no dots, so the first dot separates the two and different identities never share a
/// subject. A name longer than a ServiceAccount's limit (253) is cut and ends in a hash of the whole.
pub fn subject_account(identity: &ObjectKey) -> String {
    const MAX: usize = 253;
    let full = format!("{}.{}", identity.namespace, identity.name);
    if full.len() <= MAX {
        return full;
    }
    let suffix = format!("{:016x}", fnv1a64(full.as_bytes()));
    let keep = MAX - suffix.len() - 1;
    let prefix = full[..keep].trim_end_matches(['-', '.']);
    format!("{prefix}-{suffix}")
}

/// The `sub` claim of a ServiceAccount's tokens, which a federated identity credential names.
pub fn subject(namespace: &str, account: &str) -> String {
    format!("system:serviceaccount:{namespace}:{account}")
}

/// Name of the federated identity credential the controller creates for an issuer and subject:
/// [`CREDENTIAL_NAME_PREFIX`] and 16 hexadecimal digits of a hash of both (ARM allows 3-120 letters, digits,
/// `-` and `_`). The same pair always gives the same name, so a retried write never makes a second one.
pub fn credential_name(issuer: &str, subject: &str) -> String {
    let mut input = Vec::with_capacity(issuer.len() + subject.len() + 1);
    input.extend_from_slice(issuer.as_bytes());
    input.push(b'\n');
    input.extend_from_slice(subject.as_bytes());
    format!("{CREDENTIAL_NAME_PREFIX}{:016x}", fnv1a64(&input))
}

/// Whether a federated identity credential was created by the controller: its name is exactly the one
/// [`credential_name`] gives for its own issuer and subject.
pub fn is_ours(name: &str, issuer: &str, subject: &str) -> bool {
    name == credential_name(issuer, subject)
}

/// JWS algorithms Entra ID accepts on a federated token: RSA only. Entra documents RS256 and refuses ES256
/// with AADSTS5002738 (AzureAD/microsoft-identity-web#3467); RS384/512 and PS256/384/512 are reported to work.
pub fn entra_accepts_algorithm(alg: &str) -> bool {
    matches!(alg, "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512")
}

/// What to tell a user whose cluster signs service-account tokens with `alg`, or `None` when Entra accepts it.
pub fn algorithm_problem(alg: &str) -> Option<String> {
    (!entra_accepts_algorithm(alg)).then(|| {
        format!(
            "the cluster signs service-account tokens with {alg}, which Entra ID refuses for federation \
             (AADSTS5002738; it accepts RSA signatures such as RS256): give kube-apiserver an RSA key \
             (--service-account-signing-key-file and --service-account-key-file)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IdentityType, fixtures::identity_of_type};

    const MANAGED: IdentityType = IdentityType::UserAssignedManagedIdentity;
    const SECRET: IdentityType = IdentityType::ServicePrincipalSecret;
    const CERTIFICATE: IdentityType = IdentityType::ServicePrincipalCertificate;

    /// `shop/payments` of `type_`, with the backend annotation and the tenant when given.
    fn identity(type_: IdentityType, annotation: Option<&str>, tenant: Option<&str>) -> AzureIdentity {
        let mut identity = identity_of_type("shop", "payments", type_);
        if let Some(value) = annotation {
            identity = identity.with_annotation(BACKEND_ANNOTATION, value);
        }
        if let Some(tenant) = tenant {
            identity = identity.with_tenant_id(tenant);
        }
        identity
    }

    #[test]
    fn node_is_the_default_and_federated_is_asked_for_by_annotation() {
        assert_eq!(backend(&identity(MANAGED, None, None)), Ok(Backend::Node));
        assert_eq!(backend(&identity(MANAGED, Some(""), None)), Ok(Backend::Node));
        assert_eq!(backend(&identity(MANAGED, Some("node"), None)), Ok(Backend::Node));
        assert_eq!(
            backend(&identity(MANAGED, Some("Federated"), Some("t"))),
            Ok(Backend::Federated)
        );
        assert!(is_federated(&identity(MANAGED, Some("federated"), Some("t"))));
        assert!(!is_federated(&identity(MANAGED, Some("federated"), None)));
    }

    #[test]
    fn a_bad_choice_is_an_error_that_names_the_annotation() {
        let err = backend(&identity(MANAGED, Some("vmss"), Some("t"))).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("metadata.annotations[{BACKEND_ANNOTATION}]")),
            "{err}"
        );
        assert!(err.to_string().contains("\"vmss\""), "{err}");
        let err = backend(&identity(SECRET, Some("federated"), Some("t"))).unwrap_err();
        assert!(err.to_string().contains("type 0"), "{err}");
        let err = backend(&identity(MANAGED, Some("federated"), Some(" "))).unwrap_err();
        assert_eq!(err.field, "tenantID");
        assert_eq!(
            backend_errors(&identity(MANAGED, Some("federated"), None)).len(),
            1
        );
        assert!(
            backend_errors(&identity(CERTIFICATE, None, None)).is_empty(),
            "no choice, no error"
        );
    }

    #[test]
    fn subjects_are_per_identity_and_fit_a_service_account_name() {
        let a = subject_account(&ObjectKey::new("shop", "payments"));
        assert_eq!(a, "shop.payments");
        // A namespace has no dots, so the first one separates and no two identities share a subject.
        assert_eq!(subject_account(&ObjectKey::new("shop", "a.b")), "shop.a.b");
        assert_eq!(subject_account(&ObjectKey::new("shop-a", "b")), "shop-a.b");
        let long = subject_account(&ObjectKey::new("n".repeat(63), "i".repeat(253)));
        assert_eq!(long.len(), 253);
        assert_eq!(
            long,
            subject_account(&ObjectKey::new("n".repeat(63), "i".repeat(253)))
        );
        assert_ne!(
            long,
            subject_account(&ObjectKey::new("n".repeat(63), format!("{}j", "i".repeat(252))))
        );
        assert_eq!(
            subject("pod-identity-federation", &a),
            "system:serviceaccount:pod-identity-federation:shop.payments"
        );
    }

    #[test]
    fn credential_names_are_stable_valid_for_arm_and_mark_ours() {
        let name = credential_name("https://issuer.example", "system:serviceaccount:n:a");
        assert_eq!(
            name,
            credential_name("https://issuer.example", "system:serviceaccount:n:a")
        );
        assert_ne!(
            name,
            credential_name("https://issuer.example/", "system:serviceaccount:n:a")
        );
        assert!(name.len() <= 120 && name.starts_with(CREDENTIAL_NAME_PREFIX));
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert!(is_ours(
            &name,
            "https://issuer.example",
            "system:serviceaccount:n:a"
        ));
        assert!(!is_ours(
            &name,
            "https://other.example",
            "system:serviceaccount:n:a"
        ));
        assert!(!is_ours(
            "kubernetes",
            "https://issuer.example",
            "system:serviceaccount:n:a"
        ));
    }

    #[test]
    fn only_rsa_signatures_pass_entra() {
        assert!(algorithm_problem("RS256").is_none());
        assert!(algorithm_problem("PS384").is_none());
        let problem = algorithm_problem("ES256").unwrap();
        assert!(
            problem.contains("ES256") && problem.contains("AADSTS5002738"),
            "{problem}"
        );
    }
}
