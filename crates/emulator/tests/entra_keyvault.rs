//! Entra ID's client-credentials endpoints and Key Vault's secret GET behind the 401 challenge.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use pod_identity_emulator::{Claims, Emulator};
use serde_json::Value;

async fn token_request(em: &Emulator, path: &str, form: &[(&str, &str)]) -> Answer {
    answer(
        client(em)
            .post(format!("{}/{TENANT}/{path}", em.azure_url()))
            .form(form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn creds<'a>(client_id: &'a str, secret: &'a str, scope: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", secret),
        ("scope", scope),
    ]
}

#[tokio::test]
async fn openid_configuration_points_at_this_host() {
    let em = start().await;
    let a = answer(
        client(&em)
            .get(format!(
                "{}/{TENANT}/v2.0/.well-known/openid-configuration",
                em.azure_url()
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.body["token_endpoint"],
        format!("{}/{TENANT}/oauth2/v2.0/token", em.azure_url())
    );
    assert_eq!(a.body["issuer"], format!("{}/{TENANT}/v2.0", em.azure_url()));
    assert!(a.body["authorization_endpoint"].is_string());
    let keys = answer(
        client(&em)
            .get(a.body["jwks_uri"].as_str().unwrap())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(keys.body["keys"][0]["kty"], "EC");
    let v1 = answer(
        client(&em)
            .get(format!(
                "{}/{TENANT}/.well-known/openid-configuration",
                em.azure_url()
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        v1.body["token_endpoint"],
        format!("{}/{TENANT}/oauth2/token", em.azure_url())
    );
    let unknown = answer(
        client(&em)
            .get(format!(
                "{}/not-a-tenant/v2.0/.well-known/openid-configuration",
                em.azure_url()
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(unknown.status, 400);
    assert_eq!(unknown.body["error_codes"][0], 90002);
}

#[tokio::test]
async fn v2_client_credentials_issue_a_signed_token_with_numeric_lifetime() {
    let em = start().await;
    let a = token_request(
        &em,
        "oauth2/v2.0/token",
        &creds(CTL_CLIENT, CTL_SECRET, "https://management.azure.com/.default"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["token_type"], "Bearer");
    assert!(a.body["expires_in"].is_i64() && a.body["ext_expires_in"].is_i64());
    let claims = pod_identity_emulator::tokens::peek(a.body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(
        (claims.aud.as_str(), claims.tid.as_str(), claims.oid.as_str()),
        ("https://management.azure.com", TENANT, CTL_OBJECT)
    );
    assert_eq!(
        (claims.appid.as_str(), claims.appidacr.as_str()),
        (CTL_CLIENT, "1")
    );
    // The secret may also travel in HTTP Basic authentication.
    let basic = answer(
        client(&em)
            .post(format!("{}/{TENANT}/oauth2/v2.0/token", em.azure_url()))
            .basic_auth(CTL_CLIENT, Some(CTL_SECRET))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "https://vault.azure.net/.default"),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(basic.status, 200, "{}", basic.text);
}

#[tokio::test]
async fn v1_endpoint_answers_with_string_numbers_and_the_resource() {
    let em = start().await;
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CTL_CLIENT),
        ("client_secret", CTL_SECRET),
        ("resource", "https://management.azure.com/"),
    ];
    let a = token_request(&em, "oauth2/token", &form).await;
    assert_eq!(a.status, 200, "{}", a.text);
    for f in [
        "expires_in",
        "ext_expires_in",
        "expires_on",
        "not_before",
        "resource",
        "access_token",
    ] {
        assert!(a.body[f].is_string(), "{f}");
    }
    assert_eq!(a.body["resource"], "https://management.azure.com/");
}

#[tokio::test]
async fn token_requests_are_refused_with_aadsts_codes() {
    let em = start().await;
    let arm = "https://management.azure.com/.default";
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str, u64);
    let cases: Vec<Case<'_>> = vec![
        (
            "wrong secret",
            creds(CTL_CLIENT, "nope", arm),
            401,
            "invalid_client",
            7000215,
        ),
        (
            "unknown application",
            creds("deadbeef-0000-0000-0000-000000000000", "x", arm),
            400,
            "unauthorized_client",
            700016,
        ),
        (
            "scope without /.default",
            creds(CTL_CLIENT, CTL_SECRET, "https://management.azure.com/"),
            400,
            "invalid_scope",
            1002012,
        ),
        (
            "two resources",
            creds(
                CTL_CLIENT,
                CTL_SECRET,
                "https://management.azure.com/.default https://vault.azure.net/.default",
            ),
            400,
            "invalid_scope",
            28000,
        ),
        (
            "unknown resource",
            creds(CTL_CLIENT, CTL_SECRET, "https://unknown.example/.default"),
            400,
            "invalid_resource",
            500011,
        ),
        (
            "no grant_type",
            vec![("client_id", CTL_CLIENT)],
            400,
            "invalid_request",
            900144,
        ),
        (
            "other grant",
            vec![("grant_type", "password"), ("client_id", CTL_CLIENT)],
            400,
            "unsupported_grant_type",
            70003,
        ),
        (
            "no client_id",
            vec![("grant_type", "client_credentials"), ("scope", arm)],
            400,
            "invalid_request",
            900144,
        ),
        (
            "no scope",
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", CTL_CLIENT),
                ("client_secret", CTL_SECRET),
            ],
            400,
            "invalid_request",
            900144,
        ),
        (
            "no credential",
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", CTL_CLIENT),
                ("scope", arm),
            ],
            401,
            "invalid_client",
            7000218,
        ),
    ];
    for (name, form, status, error, code) in cases {
        let a = token_request(&em, "oauth2/v2.0/token", &form).await;
        assert_eq!(
            (a.status, a.body["error"].as_str()),
            (status, Some(error)),
            "{name}: {}",
            a.text
        );
        assert_eq!(a.body["error_codes"][0], code, "{name}");
        assert!(
            a.body["error_description"]
                .as_str()
                .unwrap()
                .starts_with(&format!("AADSTS{code}:")),
            "{name}"
        );
        assert!(
            a.body["trace_id"].is_string() && a.body["correlation_id"].is_string(),
            "{name}"
        );
    }
    let unknown_tenant = answer(
        client(&em)
            .post(format!("{}/nobody/oauth2/v2.0/token", em.azure_url()))
            .form(&creds(CTL_CLIENT, CTL_SECRET, arm))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(unknown_tenant.body["error_codes"][0], 90002);
    let json_body = answer(
        client(&em)
            .post(format!("{}/{TENANT}/oauth2/v2.0/token", em.azure_url()))
            .json(&serde_json::json!({"grant_type": "client_credentials"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (json_body.status, json_body.body["error_codes"][0].as_u64()),
        (400, Some(900144)),
        "a JSON body is not a form"
    );
    let get = answer(
        client(&em)
            .get(format!("{}/{TENANT}/oauth2/v2.0/token", em.azure_url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(get.status, 405);
}

#[tokio::test]
async fn certificate_credentials_verify_the_assertion() {
    let em = start().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["controller".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    em.with_state(|s| {
        for t in s.tenants.values_mut() {
            for a in &mut t.applications {
                if a.client_id == CTL_CLIENT {
                    a.certificates.push(cert.pem());
                }
            }
        }
    });
    let pem = format!("{}{}", cert.pem(), key.serialize_pem());
    let http = pod_identity_azure::HttpConfig::default()
        .with_ca_pem(em.ca_pem())
        .build()
        .unwrap();
    let good = pod_identity_azure::ClientCertificate::from_pem(&pem).unwrap();
    let entra = pod_identity_azure::EntraClient::new(
        http.clone(),
        &em.azure_url(),
        TENANT,
        CTL_CLIENT,
        pod_identity_azure::ClientCredential::Certificate(good),
    )
    .unwrap();
    let tok = entra.token_for("https://management.azure.com/").await.unwrap();
    assert_eq!(
        pod_identity_emulator::tokens::peek(&tok.token).unwrap().appidacr,
        "2"
    );
    // A certificate the application does not know.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::CertificateParams::new(vec!["x".to_string()])
        .unwrap()
        .self_signed(&other_key)
        .unwrap();
    let unknown = pod_identity_azure::ClientCertificate::from_pem(&format!(
        "{}{}",
        other.pem(),
        other_key.serialize_pem()
    ))
    .unwrap();
    let entra = pod_identity_azure::EntraClient::new(
        http,
        &em.azure_url(),
        TENANT,
        CTL_CLIENT,
        pod_identity_azure::ClientCredential::Certificate(unknown),
    )
    .unwrap();
    let err = entra
        .token_for("https://management.azure.com/")
        .await
        .unwrap_err();
    assert!(
        matches!(err, pod_identity_azure::AzureError::Unauthorized { status: 401, ref code, .. } if code == "invalid_client"),
        "{err}"
    );
}

async fn kv_get(em: &Emulator, path: &str, token: Option<&str>) -> Answer {
    let mut req = client(em).get(format!("{}{path}", em.azure_url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    answer(req.send().await.unwrap()).await
}

async fn imds_vault_token(em: &Emulator) -> String {
    let url = format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net",
        em.imds_url(0).unwrap()
    );
    let a = answer(
        plain_client()
            .get(url)
            .header("Metadata", "true")
            .send()
            .await
            .unwrap(),
    )
    .await;
    a.body["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn key_vault_challenges_then_serves_the_latest_version() {
    let em = start().await;
    let a = kv_get(&em, "/secrets/db-password?api-version=7.4", None).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.header("www-authenticate"), Some(format!("Bearer authorization=\"https://login.windows.net/{TENANT}\", resource=\"https://vault.azure.net\"").as_str()));
    assert_eq!(
        a.body["error"]["message"],
        "AKV10000: Request is missing a Bearer or PoP token."
    );
    let tok = imds_vault_token(&em).await;
    let a = kv_get(&em, "/secrets/db-password?api-version=2025-07-01", Some(&tok)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["value"], SECRET_VALUE);
    let id = a.body["id"].as_str().unwrap();
    assert!(
        id.starts_with(&format!("{}/secrets/db-password/", em.azure_url())),
        "{id}"
    );
    assert_eq!(id.rsplit('/').next().unwrap().len(), 32);
    assert!(a.body["attributes"]["created"].is_i64());
    let old = kv_get(
        &em,
        "/secrets/DB-PASSWORD/0123456789abcdef0123456789abcdef?api-version=7.4",
        Some(&tok),
    )
    .await;
    assert_eq!(old.body["value"], "old");
}

#[tokio::test]
async fn key_vault_refuses_wrong_tokens_principals_and_paths() {
    let em = start().await;
    let tok = imds_vault_token(&em).await;
    let missing = kv_get(&em, "/secrets/nope?api-version=7.4", Some(&tok)).await;
    assert_eq!((missing.status, missing.code()), (404, "SecretNotFound"));
    let no_version = kv_get(&em, "/secrets/db-password", Some(&tok)).await;
    assert_eq!((no_version.status, no_version.code()), (400, "BadParameter"));
    let arm_token = ctl_token(&em).await;
    let a = kv_get(&em, "/secrets/db-password?api-version=7.4", Some(&arm_token)).await;
    assert_eq!(a.status, 401, "a token for ARM is not for Key Vault");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("AKV10022")
    );
    let now = jiff::Timestamp::now().as_second();
    let expired = em.mint_token(&Claims::app(
        "https://vault.azure.net",
        TENANT,
        &principal_of("id-a"),
        &client_of("id-a"),
        "2",
        now - 7200,
        3600,
    ));
    assert_eq!(
        kv_get(&em, "/secrets/db-password?api-version=7.4", Some(&expired))
            .await
            .status,
        401
    );
    // Reader has a valid vault token but no access policy.
    let reader = entra_token(&em, READER_CLIENT, SECRET, "https://vault.azure.net").await;
    let a = kv_get(&em, "/secrets/db-password?api-version=7.4", Some(&reader)).await;
    assert_eq!((a.status, a.code()), (403, "Forbidden"));
    assert_eq!(a.body["error"]["innererror"]["code"], "AccessDenied");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("oid={READER_OBJECT}"))
    );
    let put = answer(
        client(&em)
            .put(format!("{}/secrets/db-password?api-version=7.4", em.azure_url()))
            .bearer_auth(&tok)
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(put.status, 405);
    let other = kv_get(&em, "/keys/k?api-version=7.4", Some(&tok)).await;
    assert_eq!(other.status, 404);
}

#[tokio::test]
async fn rbac_vault_needs_a_key_vault_role() {
    let em = start().await;
    let vault_id = format!("{}/providers/Microsoft.KeyVault/vaults/{VAULT}", rg_id());
    em.with_state(|s| {
        for v in s.vaults.values_mut() {
            v.rbac = true;
        }
    });
    let tok = imds_vault_token(&em).await;
    let a = kv_get(&em, "/secrets/db-password?api-version=7.4", Some(&tok)).await;
    assert_eq!(a.body["error"]["innererror"]["code"], "ForbiddenByRbac");
    em.with_state(|s| {
        s.role_assignments
            .push(pod_identity_emulator::seed::RoleAssignmentSeed {
                principal_id: principal_of("id-a"),
                scope: vault_id.clone(),
                role_definition_name: "Key Vault Secrets User".into(),
            })
    });
    let a = kv_get(&em, "/secrets/db-password?api-version=7.4", Some(&tok)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v: Value = a.body;
    assert_eq!(v["value"], SECRET_VALUE);
}
