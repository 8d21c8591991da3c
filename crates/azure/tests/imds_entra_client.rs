//! The IMDS and Entra clients against the emulator on loopback, including every fault it can inject.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../emulator/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use pod_identity_azure::{
    AzureError, ClientCredential, EntraClient, HttpConfig, IdentitySelector, ImdsClient, RetryPolicy,
};
use pod_identity_emulator::{FaultSpec, LogFilter, Service};

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_retry_after: Duration::from_secs(2),
    }
}

fn imds(em: &pod_identity_emulator::Emulator, n: usize) -> ImdsClient {
    ImdsClient::new(&em.imds_url(n).unwrap())
        .unwrap()
        .with_retry(fast_retry())
}

const VAULT_RES: &str = "https://vault.azure.net";

#[tokio::test]
async fn imds_token_keeps_the_body_as_sent() {
    let em = start().await;
    let t = imds(&em, 0)
        .token(VAULT_RES, &IdentitySelector::ClientId(client_of("id-a")))
        .await
        .unwrap();
    assert_eq!(t.client_id.as_deref(), Some(client_of("id-a").as_str()));
    assert_eq!(t.token_type.as_deref(), Some("Bearer"));
    let raw: serde_json::Value = serde_json::from_slice(&t.raw).unwrap();
    assert_eq!(raw["access_token"], t.access_token.as_str());
    assert!(raw["expires_on"].is_string());
    for sel in [
        IdentitySelector::ObjectId(principal_of("id-a")),
        IdentitySelector::ResourceId(uami("id-a")),
        IdentitySelector::Default,
    ] {
        assert!(imds(&em, 0).token(VAULT_RES, &sel).await.is_ok(), "{sel:?}");
    }
    let log = em.requests(&LogFilter {
        service: Some(Service::Imds),
        ..LogFilter::default()
    });
    assert!(log[0].query.contains("api-version=2018-02-01"));
}

#[tokio::test]
async fn imds_identity_not_assigned_is_identity_not_found_without_retry() {
    let em = start().await;
    let err = imds(&em, 0)
        .token(VAULT_RES, &IdentitySelector::ClientId(client_of("id-b")))
        .await
        .unwrap_err();
    assert!(matches!(err, AzureError::IdentityNotFound { .. }), "{err}");
    assert_eq!(em.requests(&LogFilter::default()).len(), 1, "400 is not retried");
    let err = imds(&em, 0)
        .token("https://unknown.example", &IdentitySelector::Default)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AzureError::Other { status: 400, ref code, .. } if code == "invalid_resource"),
        "{err}"
    );
}

#[tokio::test]
async fn imds_retries_every_retryable_status_and_honours_retry_after() {
    let em = start().await;
    for status in [404u16, 410, 429, 500, 503] {
        em.inject(FaultSpec {
            service: Some(Service::Imds),
            status: Some(status),
            retry_after: Some(1),
            times: Some(1),
            ..FaultSpec::default()
        });
        let t = imds(&em, 0).token(VAULT_RES, &IdentitySelector::Default).await;
        assert!(t.is_ok(), "{status}: {t:?}");
    }
    let failed = em
        .requests(&LogFilter {
            service: Some(Service::Imds),
            ..LogFilter::default()
        })
        .iter()
        .filter(|r| r.fault.is_some())
        .count();
    assert_eq!(failed, 5);
}

#[tokio::test]
async fn imds_gives_up_with_the_last_error_kind() {
    let em = start().await;
    em.inject(FaultSpec {
        service: Some(Service::Imds),
        status: Some(503),
        ..FaultSpec::default()
    });
    let err = imds(&em, 0)
        .token(VAULT_RES, &IdentitySelector::Default)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AzureError::Transient {
                status: Some(503),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(em.requests(&LogFilter::default()).len(), 4);
    em.clear_faults();
    em.inject(FaultSpec {
        service: Some(Service::Imds),
        status: Some(429),
        retry_after: Some(300),
        ..FaultSpec::default()
    });
    let err = imds(&em, 0)
        .token(VAULT_RES, &IdentitySelector::Default)
        .await
        .unwrap_err();
    assert_eq!(
        err.retry_after(),
        Some(Duration::from_secs(300)),
        "too long to wait: handed to the caller"
    );
    em.clear_faults();
    em.inject(FaultSpec {
        service: Some(Service::Imds),
        status: Some(403),
        times: Some(1),
        ..FaultSpec::default()
    });
    let err = imds(&em, 0)
        .token(VAULT_RES, &IdentitySelector::Default)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AzureError::Unauthorized { status: 403, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn imds_fetch_passes_answers_through_unchanged() {
    let em = start().await;
    let raw = imds(&em, 0)
        .fetch(VAULT_RES, &IdentitySelector::ClientId(client_of("id-c")))
        .await
        .unwrap();
    assert_eq!(raw.status, 400);
    let body: serde_json::Value = serde_json::from_slice(&raw.body).unwrap();
    assert_eq!(body["error_description"], "Identity not found");
}

#[tokio::test]
async fn imds_unreachable_and_slow_are_transient() {
    let em = start().await;
    em.inject(FaultSpec {
        service: Some(Service::Imds),
        latency_ms: Some(2_000),
        ..FaultSpec::default()
    });
    let client = ImdsClient::new(&em.imds_url(0).unwrap())
        .unwrap()
        .with_retry(RetryPolicy::none())
        .with_timeout(Duration::from_millis(300))
        .unwrap();
    let err = client
        .token(VAULT_RES, &IdentitySelector::Default)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AzureError::Transient { status: None, ref code, .. } if code == "Timeout"),
        "{err}"
    );
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = ImdsClient::new(&format!("http://{addr}"))
        .unwrap()
        .with_retry(RetryPolicy::none())
        .token(VAULT_RES, &IdentitySelector::Default)
        .await
        .unwrap_err();
    assert!(matches!(err, AzureError::Transient { status: None, .. }), "{err}");
}

fn entra(em: &pod_identity_emulator::Emulator, secret: &str) -> EntraClient {
    let http = HttpConfig::default().with_ca_pem(em.ca_pem()).build().unwrap();
    EntraClient::new(
        http,
        &em.azure_url(),
        TENANT,
        CTL_CLIENT,
        ClientCredential::Secret(secret.into()),
    )
    .unwrap()
    .with_retry(fast_retry())
}

#[tokio::test]
async fn entra_secret_token_and_its_failures() {
    let em = start().await;
    let t = entra(&em, CTL_SECRET)
        .token_for("https://management.azure.com/")
        .await
        .unwrap();
    let claims = pod_identity_emulator::tokens::peek(&t.token).unwrap();
    assert_eq!(claims.aud, "https://management.azure.com");
    assert!(t.expires_on > jiff::Timestamp::now().as_second() + 3000);
    let err = entra(&em, "wrong")
        .token_for("https://management.azure.com/")
        .await
        .unwrap_err();
    assert!(
        matches!(err, AzureError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    let err = entra(&em, CTL_SECRET)
        .token_for("https://unknown.example")
        .await
        .unwrap_err();
    assert!(
        matches!(err, AzureError::Other { status: 400, ref code, .. } if code == "invalid_resource"),
        "{err}"
    );
    for status in [429u16, 500, 503] {
        em.inject(FaultSpec {
            service: Some(Service::Entra),
            status: Some(status),
            retry_after: Some(1),
            times: Some(1),
            ..FaultSpec::default()
        });
        assert!(
            entra(&em, CTL_SECRET)
                .token_for("https://management.azure.com/")
                .await
                .is_ok(),
            "{status}"
        );
    }
    em.inject(FaultSpec {
        service: Some(Service::Entra),
        status: Some(500),
        ..FaultSpec::default()
    });
    let err = entra(&em, CTL_SECRET)
        .token_for("https://management.azure.com/")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AzureError::Transient {
                status: Some(500),
                ..
            }
        ),
        "{err}"
    );
}
