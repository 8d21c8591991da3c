//! Fidelity with the official Rust SDK (`azure_identity`), unchanged except for endpoints and CA: its
//! managed-identity credential has no IMDS endpoint setting, so the transport sends what it addresses to
//! 169.254.169.254 to the emulator's IMDS listener instead; its client-secret credential gets the emulator as
//! a custom cloud's authority and a reqwest client that trusts the emulator's CA.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{AsyncRawResponse, ClientOptions, HttpClient, Request, Transport};
use azure_identity::{
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId,
};
use common::*;
use pod_identity_emulator::{Emulator, LogFilter, Service};

/// Sends requests for 169.254.169.254 to the emulator's IMDS listener; all else as addressed.
#[derive(Debug)]
struct ImdsRedirect {
    inner: reqwest::Client,
    imds: std::net::SocketAddr,
}

#[async_trait::async_trait]
impl HttpClient for ImdsRedirect {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let mut req = request.clone();
        if req.url().host_str() == Some("169.254.169.254") {
            let url = req.url_mut();
            let _ = url.set_host(Some(&self.imds.ip().to_string()));
            let _ = url.set_port(Some(self.imds.port()));
        }
        self.inner.execute_request(&req).await
    }
}

fn options(em: &Emulator, listener: usize) -> ClientOptions {
    ClientOptions {
        transport: Some(Transport::new(Arc::new(ImdsRedirect {
            inner: client(em),
            imds: em.addresses().imds[listener].addr,
        }))),
        ..ClientOptions::default()
    }
}

fn mi(em: &Emulator, listener: usize, id: Option<UserAssignedId>) -> Arc<ManagedIdentityCredential> {
    let opts = ManagedIdentityCredentialOptions {
        user_assigned_id: id,
        client_options: options(em, listener),
    };
    ManagedIdentityCredential::new(Some(opts)).unwrap()
}

#[tokio::test]
async fn rust_managed_identity_credential_by_client_object_and_resource_id() {
    let em = start().await;
    for id in [
        UserAssignedId::ClientId(client_of("id-a")),
        UserAssignedId::ObjectId(principal_of("id-a")),
        UserAssignedId::ResourceId(uami("id-a")),
    ] {
        let shown = format!("{id:?}");
        let tok = mi(&em, 0, Some(id))
            .get_token(&["https://vault.azure.net/.default"], None)
            .await
            .unwrap_or_else(|e| panic!("{shown}: {e}"));
        let claims = pod_identity_emulator::tokens::peek(tok.token.secret()).unwrap();
        assert_eq!(claims.oid, principal_of("id-a"), "{shown}");
        assert!(
            tok.expires_on > time_now() + time::Duration::minutes(10),
            "{shown}: expires_on parsed from the string"
        );
    }
    let log = em.requests(&LogFilter {
        service: Some(Service::Imds),
        ..LogFilter::default()
    });
    assert_eq!(log.len(), 3);
    assert!(
        log.iter()
            .all(|r| r.query.contains("api-version=2019-08-01") && r.status == 200)
    );
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

#[tokio::test]
async fn rust_managed_identity_credential_system_assigned_and_unassigned() {
    let em = start().await;
    let tok = mi(&em, 2, None)
        .get_token(&["https://management.azure.com/.default"], None)
        .await
        .unwrap();
    assert_eq!(
        pod_identity_emulator::tokens::peek(tok.token.secret())
            .unwrap()
            .oid,
        VM_SYS_PRINCIPAL
    );
    let err = mi(&em, 0, Some(UserAssignedId::ClientId(client_of("id-b"))))
        .get_token(&["https://vault.azure.net/.default"], None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not been assigned") || format!("{err:?}").contains("400"),
        "{err:?}"
    );
}

#[tokio::test]
async fn rust_client_secret_credential_against_the_emulated_authority() {
    let em = start().await;
    let mut custom = azure_core::cloud::CustomConfiguration::default();
    custom.authority_host = em.azure_url();
    let client_options = ClientOptions {
        cloud: Some(Arc::new(custom.into())),
        transport: Some(Transport::new(Arc::new(client(&em)))),
        ..ClientOptions::default()
    };
    let cred = ClientSecretCredential::new(
        TENANT,
        CTL_CLIENT.to_string(),
        Secret::new(CTL_SECRET.to_string()),
        Some(ClientSecretCredentialOptions { client_options }),
    )
    .unwrap();
    let tok = cred
        .get_token(&["https://management.azure.com/.default"], None)
        .await
        .unwrap();
    let claims = pod_identity_emulator::tokens::peek(tok.token.secret()).unwrap();
    assert_eq!(
        (claims.oid.as_str(), claims.appid.as_str()),
        (CTL_OBJECT, CTL_CLIENT)
    );
    let log = em.requests(&LogFilter {
        service: Some(Service::Entra),
        ..LogFilter::default()
    });
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].path, format!("/{TENANT}/oauth2/v2.0/token"));
}
