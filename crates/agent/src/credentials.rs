//! A service principal's credential, read from the Secret its AzureIdentity names.
//!
//! Type 1 takes the client secret from key `clientSecret` (what the original's documentation uses); a
//! Secret with a single key is read whatever the key is called, as the original did. The original took
//! "the first value" of several keys, which in Go means a random one; several keys without
//! `clientSecret` are refused here instead. Type 2 takes a PKCS#12 archive from `certificate` and its
//! password from `password`.
//!
//! The Secret is read when a token is fetched, not watched: the agent then needs `get` on the Secrets
//! that identities name, not a node-wide copy of every Secret.

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret as KubeSecret};
use pod_identity_api::{AzureIdentity, IdentityType};

use crate::upstream::{Secret, ServicePrincipal, UpstreamError};

/// Entra's public authority, used when an identity names none.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com/";

/// Where an identity's Secret is: its own namespace unless it names one.
pub fn secret_location(identity: &AzureIdentity) -> Result<(String, String), UpstreamError> {
    let reference = identity.spec.client_password.as_ref();
    let name = reference
        .and_then(|r| r.name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| UpstreamError::Credential("clientPassword.name is not set".into()))?;
    let namespace = reference
        .and_then(|r| r.namespace.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| identity.metadata.namespace.clone())
        .unwrap_or_default();
    Ok((namespace, name))
}

/// The service principal of an identity, given the data of its Secret.
pub fn service_principal(
    identity: &AzureIdentity,
    data: &BTreeMap<String, ByteString>,
) -> Result<ServicePrincipal, UpstreamError> {
    let spec = &identity.spec;
    let kind = spec
        .identity_type()
        .map_err(|e| UpstreamError::Credential(e.to_string()))?;
    let secret = match kind {
        IdentityType::ServicePrincipalSecret => {
            let value = data
                .get("clientSecret")
                .or_else(|| (data.len() == 1).then(|| data.values().next()).flatten())
                .ok_or_else(|| {
                    UpstreamError::Credential(format!(
                        "the Secret has keys {:?}: put the client secret under clientSecret",
                        data.keys().collect::<Vec<_>>()
                    ))
                })?;
            let text = String::from_utf8(value.0.clone())
                .map_err(|_| UpstreamError::Credential("the client secret is not UTF-8".into()))?;
            Secret::Password(text.trim_end_matches(['\r', '\n']).to_owned())
        }
        IdentityType::ServicePrincipalCertificate => {
            let archive = data
                .get("certificate")
                .ok_or_else(|| UpstreamError::Credential("the Secret has no key certificate".into()))?;
            let password = data
                .get("password")
                .map(|p| {
                    String::from_utf8_lossy(&p.0)
                        .trim_end_matches(['\r', '\n'])
                        .to_owned()
                })
                .unwrap_or_default();
            let (key_pkcs8, certificate) = from_pkcs12(&archive.0, &password)?;
            Secret::Certificate {
                key_pkcs8,
                certificate,
            }
        }
        IdentityType::UserAssignedManagedIdentity => {
            return Err(UpstreamError::Credential(
                "a managed identity has no service principal credential".into(),
            ));
        }
    };
    let authority = spec
        .ad_endpoint
        .clone()
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_AUTHORITY.to_owned());
    if !authority.starts_with("https://") {
        return Err(UpstreamError::Credential(format!(
            "adEndpoint must be an https:// URL, not {authority}"
        )));
    }
    Ok(ServicePrincipal {
        authority,
        tenant_id: spec.tenant_id.clone().unwrap_or_default(),
        auxiliary_tenant_ids: spec
            .auxiliary_tenant_ids
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|t| !t.is_empty())
            .collect(),
        client_id: spec.client_id.clone().unwrap_or_default(),
        secret,
    })
}

/// The private key (PKCS#8 DER) and certificate (DER) of a PKCS#12 archive.
pub fn from_pkcs12(archive: &[u8], password: &str) -> Result<(Vec<u8>, Vec<u8>), UpstreamError> {
    let store =
        p12_keystore::KeyStore::from_pkcs12(archive, password, p12_keystore::Pkcs12ImportPolicy::Relaxed)
            .map_err(|e| {
                UpstreamError::Credential(format!("the certificate is not a readable PKCS#12 archive: {e}"))
            })?;
    let (_, chain) = store
        .private_key_chain()
        .ok_or_else(|| UpstreamError::Credential("the PKCS#12 archive holds no private key".into()))?;
    let certificate = chain.certs().first().ok_or_else(|| {
        UpstreamError::Credential("the PKCS#12 archive holds no certificate for its key".into())
    })?;
    Ok((chain.key().as_der().to_vec(), certificate.as_der().to_vec()))
}

/// Reads an identity's Secret through the API server.
pub async fn load(
    client: &kube::Client,
    identity: &AzureIdentity,
) -> Result<ServicePrincipal, UpstreamError> {
    let (namespace, name) = secret_location(identity)?;
    let api = kube::Api::<KubeSecret>::namespaced(client.clone(), &namespace);
    let secret = api.get(&name).await.map_err(|e| match e {
        kube::Error::Api(status) if status.code == 404 => {
            UpstreamError::Credential(format!("Secret {namespace}/{name} does not exist"))
        }
        kube::Error::Api(status) => {
            UpstreamError::Credential(format!("reading Secret {namespace}/{name}: {}", status.message))
        }
        other => UpstreamError::Azure(pod_identity_azure::AzureError::Transient {
            status: None,
            code: "KubernetesApi".into(),
            message: format!("reading Secret {namespace}/{name}: {other}"),
        }),
    })?;
    service_principal(identity, &secret.data.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use pod_identity_api::{SecretReference, fixtures};

    use super::*;

    /// A service principal of wire type `kind` with an empty auxiliary tenant among its own, whose secret
    /// reference names no namespace.
    fn sp(kind: i64) -> AzureIdentity {
        let mut identity = fixtures::service_principal("ns", "sp", "c").with_tenant_id("t");
        identity.spec.type_ = Some(kind);
        identity.spec.auxiliary_tenant_ids = Some(vec!["t2".into(), String::new()]);
        identity.spec.client_password = Some(SecretReference {
            name: Some("s".into()),
            namespace: None,
        });
        identity
    }

    fn data(pairs: &[(&str, &[u8])]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
            .collect()
    }

    #[test]
    fn secret_is_in_the_identitys_namespace_unless_named() {
        assert_eq!(secret_location(&sp(1)).unwrap(), ("ns".into(), "s".into()));
    }

    #[test]
    fn client_secret_key_wins_and_a_single_key_is_taken_whatever_its_name() {
        let principal =
            service_principal(&sp(1), &data(&[("other", b"x"), ("clientSecret", b"pw\n")])).unwrap();
        assert!(matches!(principal.secret, Secret::Password(ref p) if p == "pw"));
        assert_eq!(principal.auxiliary_tenant_ids, vec!["t2".to_owned()]);
        assert_eq!(principal.authority, DEFAULT_AUTHORITY);
        let single = service_principal(&sp(1), &data(&[("password", b"pw")])).unwrap();
        assert!(matches!(single.secret, Secret::Password(ref p) if p == "pw"));
        assert!(service_principal(&sp(1), &data(&[("a", b"1"), ("b", b"2")])).is_err());
    }

    #[test]
    fn a_pkcs12_archive_gives_a_key_that_signs_assertions() {
        let archive = include_bytes!("../tests/fixtures/service-principal.p12");
        let principal = service_principal(
            &sp(2),
            &data(&[("certificate", archive), ("password", b"test-password")]),
        )
        .unwrap();
        let Secret::Certificate {
            key_pkcs8,
            certificate,
        } = principal.secret
        else {
            panic!("expected a certificate")
        };
        assert!(!key_pkcs8.is_empty() && !certificate.is_empty());
        assert!(from_pkcs12(archive, "wrong").is_err());
    }

    #[test]
    fn a_certificate_needs_a_readable_archive() {
        let err = service_principal(
            &sp(2),
            &data(&[("certificate", b"not pkcs12"), ("password", b"x")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("PKCS#12"), "{err}");
        assert!(service_principal(&sp(2), &data(&[])).is_err());
    }
}
