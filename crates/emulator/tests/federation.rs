//! Entra's `client_assertion` grant with federated credentials, against a stand-in issuer on loopback: a
//! managed identity and an app registration get tokens, and every way Entra refuses an assertion gives its
//! AADSTS code, status and body shape. The issuer's discovery document and keys are fetched once, cached,
//! refetched for a new key, and a broken or silent issuer gets its error within the fetch timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/issuer.rs"]
mod issuer;

use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use issuer::{Behaviour, Issuer, sign};
use pod_identity_emulator::seed::{ApplicationSeed, FederatedCredentialSeed};
use pod_identity_emulator::{Emulator, LogFilter, Service, tokens};
use serde_json::{Value, json};

const AUD: &str = "api://AzureADTokenExchange";
const SA: &str = "system:serviceaccount:apps:workload";
const APP_CLIENT: &str = "a0000000-0000-0000-0000-00000000000a";
const APP_OBJECT: &str = "a0000000-0000-0000-0000-0000000000fa";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn credential(issuer: &str, subject: &str, audience: &str) -> FederatedCredentialSeed {
    FederatedCredentialSeed {
        name: "kube".into(),
        issuer: issuer.into(),
        subject: subject.into(),
        audiences: vec![audience.into()],
    }
}

/// An emulator trusting `issuer`'s CA, with `creds` on identity `id-a` and on an app registration.
async fn emulator(issuer: &Issuer, creds: Vec<FederatedCredentialSeed>) -> Emulator {
    let ca = issuer.ca_pem.clone();
    let em = start_with(|c| c.settings.federation.issuer_ca_pems = vec![ca]).await;
    set_credentials(&em, "id-a", creds.clone());
    em.with_state(|s| {
        for t in s.tenants.values_mut() {
            t.applications.push(ApplicationSeed {
                display_name: "federated-app".into(),
                client_id: APP_CLIENT.into(),
                object_id: APP_OBJECT.into(),
                federated_identity_credentials: creds.clone(),
                ..ApplicationSeed::default()
            });
        }
    });
    em
}

fn set_credentials(em: &Emulator, identity: &str, creds: Vec<FederatedCredentialSeed>) {
    em.with_state(|s| {
        s.uami_mut(&uami(identity)).unwrap().federated_credentials =
            pod_identity_emulator::federated_credentials::from_seeds(&creds).unwrap();
    });
}

async fn exchange_at(em: &Emulator, endpoint: &str, client_id: &str, assertion: &str) -> Answer {
    let scope = "https://vault.azure.net/.default";
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion),
    ];
    if endpoint.contains("v2.0") {
        form.push(("scope", scope));
    } else {
        form.push(("resource", "https://vault.azure.net"));
    }
    answer(
        client(em)
            .post(format!("{}/{TENANT}/{endpoint}", em.azure_url()))
            .form(&form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn exchange(em: &Emulator, client_id: &str, assertion: &str) -> Answer {
    exchange_at(em, "oauth2/v2.0/token", client_id, assertion).await
}

/// Asserts Entra's refusal: status, `error`, the code in `error_codes` and at the head of the description,
/// the 2024 single-space trailer, and `error_uri` where Entra sends one.
fn assert_refused(a: &Answer, status: u16, error: &str, code: u64, what: &str) {
    assert_eq!(
        (a.status, a.body["error"].as_str()),
        (status, Some(error)),
        "{what}: {}",
        a.text
    );
    assert_eq!(a.body["error_codes"], json!([code]), "{what}");
    let d = a.body["error_description"].as_str().unwrap();
    assert!(d.starts_with(&format!("AADSTS{code}: ")), "{what}: {d}");
    assert!(
        d.contains(" Trace ID: ") && d.contains(" Correlation ID: ") && !d.contains('\r'),
        "{what}: {d}"
    );
    assert!(
        a.body["trace_id"].is_string() && a.body["timestamp"].is_string(),
        "{what}"
    );
    let uri = !matches!(code, 90061 | 900612);
    assert_eq!(a.body.get("error_uri").is_some(), uri, "{what}: {}", a.text);
    assert!(
        a.header("retry-after").is_none(),
        "{what}: no Retry-After, or SDKs would retry a refusal"
    );
}

#[tokio::test]
async fn a_managed_identity_exchanges_a_federated_token_and_uses_it() {
    let iss = Issuer::start().await;
    let em = emulator(&iss, vec![credential(&iss.url, SA, AUD)]).await;
    let a = exchange(&em, &client_of("id-a"), &sign(json!({}), &iss.claims(SA, AUD))).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["token_type"], "Bearer");
    assert!(
        a.body["expires_in"].as_i64().unwrap() > 86_000,
        "a managed identity's token lives a day: {}",
        a.text
    );
    assert!(a.body["ext_expires_in"].is_i64());
    let claims = tokens::peek(a.body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(
        (
            claims.oid.as_str(),
            claims.appid.as_str(),
            claims.tid.as_str(),
            claims.aud.as_str()
        ),
        (
            principal_of("id-a").as_str(),
            client_of("id-a").as_str(),
            TENANT,
            "https://vault.azure.net"
        )
    );
    assert_eq!(claims.xms_mirid.as_deref(), Some(uami("id-a").as_str()));
    // The token is the identity's: the vault's access policy for id-a lets it read the secret.
    let secret = answer(
        client(&em)
            .get(format!("{}/secrets/db-password?api-version=7.4", em.azure_url()))
            .bearer_auth(a.body["access_token"].as_str().unwrap())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (secret.status, &secret.body["value"]),
        (200, &json!(SECRET_VALUE))
    );
    let entra = em.requests(&LogFilter {
        service: Some(Service::Entra),
        ..LogFilter::default()
    });
    assert_eq!(
        entra.last().unwrap().identity.as_deref(),
        Some(client_of("id-a").as_str()),
        "the log names the client"
    );
}

#[tokio::test]
async fn an_app_registration_exchanges_a_federated_token_on_both_endpoints() {
    let iss = Issuer::start().await;
    let em = emulator(&iss, vec![credential(&iss.url, SA, AUD)]).await;
    let assertion = sign(json!({}), &iss.claims(SA, AUD));
    let v2 = exchange(&em, APP_CLIENT, &assertion).await;
    assert_eq!(
        (v2.status, &v2.body["expires_in"]),
        (200, &json!(3599)),
        "{}",
        v2.text
    );
    let claims = tokens::peek(v2.body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(
        (claims.oid.as_str(), claims.appidacr.as_str(), claims.xms_mirid),
        (APP_OBJECT, "2", None)
    );
    let v1 = exchange_at(&em, "oauth2/token", APP_CLIENT, &assertion).await;
    assert_eq!(
        (v1.status, &v1.body["expires_in"]),
        (200, &json!("3599")),
        "{}",
        v1.text
    );
    assert_eq!(v1.body["resource"], "https://vault.azure.net");
}

#[tokio::test]
async fn every_refusal_carries_entras_code_and_shape() {
    let iss = Issuer::start().await;
    let em = emulator(&iss, vec![credential(&iss.url, SA, AUD)]).await;
    let now = jiff::Timestamp::now().as_second();
    let good = iss.claims(SA, AUD);
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let tampered = {
        let t = sign(json!({}), &good);
        let parts: Vec<&str> = t.split('.').collect();
        format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(with("exp", json!(now + 7200)).to_string()),
            parts[2]
        )
    };
    let es256 = format!(
        "{}.{}.{}",
        B64.encode(json!({"alg": "ES256", "kid": issuer::KID}).to_string()),
        B64.encode(good.to_string()),
        B64.encode([0u8; 64])
    );
    let id_a = client_of("id-a");
    let cases: Vec<(&str, String, String, u16, &str, u64)> = vec![
        (
            "unknown client",
            "deadbeef-0000-0000-0000-000000000000".into(),
            sign(json!({}), &good),
            400,
            "unauthorized_client",
            700016,
        ),
        (
            "no credential for the issuer",
            id_a.clone(),
            sign(json!({}), &with("iss", json!(format!("{}/", iss.url)))),
            401,
            "invalid_client",
            700211,
        ),
        (
            "no credential for the subject",
            id_a.clone(),
            sign(json!({}), &with("sub", json!("system:serviceaccount:apps:other"))),
            401,
            "invalid_client",
            700213,
        ),
        (
            "subject differs in case only",
            id_a.clone(),
            sign(json!({}), &with("sub", json!(SA.to_uppercase()))),
            401,
            "invalid_client",
            7002138,
        ),
        (
            "wrong audience",
            id_a.clone(),
            sign(json!({}), &with("aud", json!(["api://other"]))),
            401,
            "invalid_client",
            700212,
        ),
        (
            "expired",
            id_a.clone(),
            sign(
                json!({}),
                &json!({"iss": iss.url, "sub": SA, "aud": [AUD], "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}),
            ),
            401,
            "invalid_client",
            700024,
        ),
        (
            "not yet valid",
            id_a.clone(),
            sign(json!({}), &with("nbf", json!(now + 1800))),
            401,
            "invalid_client",
            700024,
        ),
        (
            "lives longer than 25 hours",
            id_a.clone(),
            sign(json!({}), &with("exp", json!(now + 26 * 3600))),
            401,
            "invalid_client",
            70023,
        ),
        (
            "no iat",
            id_a.clone(),
            sign(json!({}), &{
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("iat");
                c
            }),
            401,
            "invalid_client",
            70023,
        ),
        (
            "key the issuer does not publish",
            id_a.clone(),
            sign(json!({"kid": "rotated-away"}), &good),
            401,
            "invalid_client",
            7000272,
        ),
        (
            "signature does not verify",
            id_a.clone(),
            tampered,
            400,
            "invalid_request",
            50027,
        ),
        (
            "ES256 refused",
            id_a.clone(),
            es256,
            400,
            "invalid_request",
            5002738,
        ),
        (
            "not a JWT",
            id_a.clone(),
            "not-a-jwt".into(),
            400,
            "invalid_request",
            50027,
        ),
    ];
    for (what, client_id, assertion, status, error, code) in cases {
        let a = exchange(&em, &client_id, &assertion).await;
        assert_refused(&a, status, error, code, what);
    }
    // The texts name what did not match, so a pod's error says which credential to fix.
    let a = exchange(
        &em,
        &id_a,
        &sign(json!({}), &with("sub", json!("system:serviceaccount:apps:other"))),
    )
    .await;
    assert!(
        a.text
            .contains("presented assertion subject 'system:serviceaccount:apps:other'"),
        "{}",
        a.text
    );
    let a = exchange(&em, &id_a, &sign(json!({"kid": "rotated-away"}), &good)).await;
    assert!(a.text.contains(&format!("identifier rotated-away used to sign the federated credential could not be found in the metadata of identity provider {}", iss.url)), "{}", a.text);
    // A managed identity has no secret to present.
    let a = answer(
        client(&em)
            .post(format!("{}/{TENANT}/oauth2/v2.0/token", em.azure_url()))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", id_a.as_str()),
                ("client_secret", "x"),
                ("scope", "https://vault.azure.net/.default"),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (a.status, &a.body["error_codes"]),
        (401, &json!([7000215])),
        "{}",
        a.text
    );
    // Another identity without credentials trusts no issuer at all.
    let a = exchange(&em, &client_of("id-b"), &sign(json!({}), &good)).await;
    assert_refused(&a, 401, "invalid_client", 700211, "identity without credentials");
}

#[tokio::test]
async fn an_untrusted_issuer_is_never_fetched() {
    let iss = Issuer::start().await;
    let em = emulator(&iss, vec![credential("https://somewhere.else", SA, AUD)]).await;
    let a = exchange(&em, &client_of("id-a"), &sign(json!({}), &iss.claims(SA, AUD))).await;
    assert_refused(&a, 401, "invalid_client", 700211, "issuer not trusted");
    assert_eq!(
        iss.hits(),
        (0, 0),
        "Entra matches the credential before it fetches anything"
    );
}

#[tokio::test]
async fn issuer_keys_are_cached_and_refetched_for_a_new_key() {
    let iss = Issuer::start().await;
    let em = emulator(&iss, vec![credential(&iss.url, SA, AUD)]).await;
    em.update_settings(|s| s.federation.issuer_refetch_secs = 0);
    let token = sign(json!({}), &iss.claims(SA, AUD));
    for _ in 0..3 {
        assert_eq!(exchange(&em, &client_of("id-a"), &token).await.status, 200);
    }
    assert_eq!(iss.hits(), (1, 1), "one fetch serves every exchange");
    // The issuer rotates to a new key: the unknown kid makes Entra fetch again.
    let mut rotated = issuer::test_jwk();
    rotated["kid"] = json!("test-key-2");
    iss.publish(rotated);
    let a = exchange(
        &em,
        &client_of("id-a"),
        &sign(json!({"kid": "test-key-2"}), &iss.claims(SA, AUD)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(iss.hits(), (2, 2));
    // Within the refetch interval an unknown key is refused from the cache.
    em.update_settings(|s| s.federation.issuer_refetch_secs = 3600);
    let a = exchange(
        &em,
        &client_of("id-a"),
        &sign(json!({"kid": "test-key-3"}), &iss.claims(SA, AUD)),
    )
    .await;
    assert_refused(
        &a,
        401,
        "invalid_client",
        7000272,
        "unknown key within the refetch interval",
    );
    assert_eq!(iss.hits(), (2, 2));
    // Old keys are fetched again.
    em.update_settings(|s| s.federation.issuer_cache_secs = 0);
    assert_eq!(exchange(&em, &client_of("id-a"), &token).await.status, 200);
    assert_eq!(iss.hits(), (3, 3));
}

#[tokio::test]
async fn a_broken_or_silent_issuer_is_90061_or_900612_within_the_fetch_timeout() {
    let iss = Issuer::start().await;
    let em = emulator(&iss, vec![credential(&iss.url, SA, AUD)]).await;
    em.update_settings(|s| {
        s.federation.issuer_cache_secs = 0;
        s.federation.issuer_fetch_timeout_ms = 500;
    });
    let token = sign(json!({}), &iss.claims(SA, AUD));
    let cases = [
        ("discovery answers 500", Behaviour::DiscoveryStatus(500), 90061),
        (
            "discovery forbidden (no anonymous access)",
            Behaviour::DiscoveryStatus(403),
            90061,
        ),
        ("keys are not JSON", Behaviour::KeysBody("<html>".into()), 900612),
        (
            "a key is not base64url",
            Behaviour::KeysBody(r#"{"keys":[{"kty":"RSA","n":"!!","e":"AQAB"}]}"#.into()),
            900612,
        ),
        ("issuer never answers", Behaviour::Hang, 90061),
    ];
    for (what, behaviour, code) in cases {
        iss.set(behaviour);
        let started = Instant::now();
        let a = exchange(&em, &client_of("id-a"), &token).await;
        assert_refused(&a, 400, "invalid_request", code, what);
        eprintln!("{what}: answered in {:?}", started.elapsed());
    }
    // An issuer whose certificate Entra cannot verify is unreachable too.
    iss.set(Behaviour::Normal);
    em.update_settings(|s| s.federation.issuer_ca_pems.clear());
    let a = exchange(&em, &client_of("id-a"), &token).await;
    assert_refused(&a, 400, "invalid_request", 90061, "untrusted issuer certificate");
    em.update_settings(|s| s.federation.issuer_ca_pems = vec![iss.ca_pem.clone()]);
    assert_eq!(
        exchange(&em, &client_of("id-a"), &token).await.status,
        200,
        "failures are not cached"
    );
}

#[tokio::test]
async fn a_credential_written_through_arm_answers_70021_until_it_propagates() {
    let iss = Issuer::start().await;
    let em = emulator(&iss, Vec::new()).await;
    em.update_settings(|s| s.federation.credential_propagation_ms = 3_600_000);
    em.with_state(|s| {
        s.role_assignments
            .push(pod_identity_emulator::seed::RoleAssignmentSeed {
                principal_id: CTL_OBJECT.into(),
                scope: rg_id(),
                role_definition_name: "Owner".into(),
            })
    });
    let arm = ctl_token(&em).await;
    let put = answer(
        client(&em)
            .put(format!(
                "{}{}/federatedIdentityCredentials/kube?api-version=2024-11-30",
                em.azure_url(),
                uami("id-a")
            ))
            .bearer_auth(&arm)
            .json(&json!({"properties": {"issuer": iss.url, "subject": SA, "audiences": [AUD]}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(put.status, 201, "{}", put.text);
    let token = sign(json!({}), &iss.claims(SA, AUD));
    let a = exchange(&em, &client_of("id-a"), &token).await;
    assert_refused(&a, 401, "invalid_client", 70021, "not propagated");
    assert!(
        a.text.contains(&format!(
            "Assertion Issuer: '{}'. Assertion Subject: '{SA}'. Assertion Audience: '{AUD}'",
            iss.url
        )),
        "{}",
        a.text
    );
    assert_eq!(iss.hits(), (0, 0));
    em.with_state(|s| {
        for c in &mut s.uami_mut(&uami("id-a")).unwrap().federated_credentials {
            c.visible_at = None;
        }
    });
    assert_eq!(exchange(&em, &client_of("id-a"), &token).await.status, 200);
}
