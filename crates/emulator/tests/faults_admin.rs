//! Fault injection in every service, observation, and the admin API of the emulator binary run as a
//! separate process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};

use common::*;
use pod_identity_emulator::{FaultSpec, LogFilter, Service};
use serde_json::{Value, json};

fn token_url(em: &pod_identity_emulator::Emulator) -> String {
    format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net",
        em.imds_url(0).unwrap()
    )
}

#[tokio::test]
async fn injected_statuses_carry_each_service_error_shape_and_retry_after() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    for (service, status) in [
        (Service::Imds, 429u16),
        (Service::Imds, 410),
        (Service::Imds, 500),
        (Service::Arm, 429),
        (Service::Arm, 503),
        (Service::Entra, 429),
        (Service::Entra, 500),
        (Service::KeyVault, 429),
        (Service::KeyVault, 500),
    ] {
        em.inject(FaultSpec {
            service: Some(service),
            status: Some(status),
            retry_after: Some(7),
            times: Some(1),
            ..FaultSpec::default()
        });
        let resp = match service {
            Service::Imds => {
                plain_client()
                    .get(token_url(&em))
                    .header("Metadata", "true")
                    .send()
                    .await
            }
            Service::Arm => {
                client(&em)
                    .get(format!("{}{}?api-version=2024-07-01", em.azure_url(), vmss_id()))
                    .bearer_auth(&tok)
                    .send()
                    .await
            }
            Service::Entra => {
                client(&em)
                    .post(format!("{}/{TENANT}/oauth2/v2.0/token", em.azure_url()))
                    .form(&[("grant_type", "client_credentials")])
                    .send()
                    .await
            }
            Service::KeyVault => {
                client(&em)
                    .get(format!("{}/secrets/db-password?api-version=7.4", em.azure_url()))
                    .send()
                    .await
            }
        };
        let a = answer(resp.unwrap()).await;
        assert_eq!(a.status, status, "{service:?}");
        assert_eq!(a.header("retry-after"), Some("7"), "{service:?}");
        match service {
            Service::Imds | Service::Entra => assert!(
                a.body["error"].is_string() && a.body["error_description"].is_string(),
                "{service:?} {}",
                a.text
            ),
            Service::Arm | Service::KeyVault => assert!(
                a.body["error"]["code"].is_string() && a.body["error"]["message"].is_string(),
                "{service:?} {}",
                a.text
            ),
        }
    }
    assert!(em.faults().is_empty(), "counted faults expire");
    let log = em.requests(&LogFilter::default());
    assert_eq!(log.iter().filter(|r| r.fault.is_some()).count(), 9);
}

#[tokio::test]
async fn faults_target_a_path_a_query_and_a_method() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let id = em.inject(FaultSpec {
        service: Some(Service::Arm),
        method: Some("PATCH".into()),
        path_contains: Some(VMSS.to_uppercase()),
        status: Some(500),
        ..FaultSpec::default()
    });
    let get = answer(
        client(&em)
            .get(format!("{}{}?api-version=2024-07-01", em.azure_url(), vmss_id()))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(get.status, 200, "GET is not targeted");
    let patch = answer(
        client(&em)
            .patch(format!("{}{}?api-version=2024-07-01", em.azure_url(), vmss_id()))
            .bearer_auth(&tok)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(patch.status, 500);
    assert_eq!(patch.code(), "InternalServerError");
    assert!(em.remove_fault(id));
    em.inject(FaultSpec {
        service: Some(Service::Imds),
        query_contains: Some(format!("client_id={}", client_of("id-a"))),
        status: Some(503),
        ..FaultSpec::default()
    });
    let hit = answer(
        plain_client()
            .get(format!("{}&client_id={}", token_url(&em), client_of("id-a")))
            .header("Metadata", "true")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let miss = answer(
        plain_client()
            .get(token_url(&em))
            .header("Metadata", "true")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((hit.status, miss.status), (503, 200));
    assert_eq!(em.faults()[0].hits, 1);
}

#[tokio::test]
async fn latency_delays_the_answer_without_changing_it() {
    let em = start().await;
    em.inject(FaultSpec {
        service: Some(Service::Imds),
        latency_ms: Some(300),
        times: Some(1),
        ..FaultSpec::default()
    });
    let slow = answer(
        plain_client()
            .get(token_url(&em))
            .header("Metadata", "true")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(slow.status, 200);
    let log = em.requests(&LogFilter {
        service: Some(Service::Imds),
        ..LogFilter::default()
    });
    assert!(log[0].duration_us >= 300_000);
    assert_eq!(log[0].fault, Some(1));
}

/// Runs the binary with a seed file and one IMDS listener, as later end-to-end tests will.
#[tokio::test]
async fn binary_prints_its_addresses_and_serves_the_admin_api() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let seed_path = dir.path().join("seed.json");
    std::fs::write(&seed_path, serde_json::to_string(&seed()).unwrap()).unwrap();
    let ca_path = dir.path().join("ca.pem");
    let ready_path = dir.path().join("ready.json");
    let child = Command::new(env!("CARGO_BIN_EXE_pod-identity-emulator"))
        .arg("--seed")
        .arg(&seed_path)
        .arg("--imds-listen")
        .arg(format!("127.0.0.1:0={}", instance_id(0)))
        .arg("--ca-out")
        .arg(&ca_path)
        .arg("--ready-file")
        .arg(&ready_path)
        .args([
            "--lro-duration-ms",
            "0",
            "--settings",
            r#"{"imdsTokenLifetimeSecs": 7200}"#,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        ready,
        serde_json::from_str::<Value>(&std::fs::read_to_string(&ready_path).unwrap()).unwrap()
    );
    let admin = format!("http://{}", ready["admin"].as_str().unwrap());
    let imds = format!("http://{}", ready["imds"][0]["addr"].as_str().unwrap());
    assert_eq!(ready["imds"][0]["instance"], instance_id(0));
    let ca = std::fs::read_to_string(&ca_path).unwrap();
    let http = plain_client();
    assert_eq!(
        http.get(format!("{admin}/admin/ca.pem"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        ca
    );

    let tok = answer(http.get(format!("{imds}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/")).header("Metadata", "true").send().await.unwrap()).await;
    assert_eq!(tok.status, 200);
    assert_eq!(
        tok.body["expires_in"], "7200",
        "settings from the command line apply"
    );
    // Faults over the admin API.
    let f = answer(
        http.post(format!("{admin}/admin/faults"))
            .json(&json!({"service": "imds", "status": 429, "retryAfter": 3}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(f.status, 201);
    let throttled = http
        .get(format!(
            "{imds}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x"
        ))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(throttled.status(), 429);
    let listed = answer(http.get(format!("{admin}/admin/faults")).send().await.unwrap()).await;
    assert_eq!(listed.body[0]["hits"], 1);
    assert_eq!(
        http.delete(format!("{admin}/admin/faults/{}", f.body["id"]))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let bad = http
        .post(format!("{admin}/admin/faults"))
        .json(&json!({"status": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // The log and counters.
    let log = answer(
        http.get(format!("{admin}/admin/requests?service=imds&status=429"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(log.body.as_array().unwrap().len(), 1);
    assert_eq!(
        log.body[0]["source"].as_str().unwrap().split(':').next(),
        Some("127.0.0.1")
    );
    let since = log.body[0]["seq"].as_u64().unwrap();
    let later = answer(
        http.get(format!("{admin}/admin/requests?since={since}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(later.body.as_array().unwrap().is_empty());
    let counters = answer(http.get(format!("{admin}/admin/counters")).send().await.unwrap()).await;
    assert_eq!(counters.body["byService"]["imds"], 2);
    // State: change identities behind ARM's back, then read the state back.
    let r = http
        .post(format!("{admin}/admin/identities"))
        .json(&json!({"resourceId": vmss_id(), "remove": [uami("id-a")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let gone = answer(http.get(format!("{imds}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/")).header("Metadata", "true").send().await.unwrap()).await;
    assert_eq!(gone.body["error_description"], "Identity not found");
    let state = answer(http.get(format!("{admin}/admin/state")).send().await.unwrap()).await;
    let ss = &state.body["subscriptions"][0]["resourceGroups"][0]["virtualMachineScaleSets"][0];
    assert_eq!(ss["identity"]["userAssignedIdentities"], json!([]));
    let mut restored = state.body.clone();
    restored["subscriptions"][0]["resourceGroups"][0]["virtualMachineScaleSets"][0]["identity"]["userAssignedIdentities"] =
        json!([uami("id-b")]);
    assert_eq!(
        http.put(format!("{admin}/admin/state"))
            .json(&restored)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let by_b = answer(http.get(format!("{imds}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/")).header("Metadata", "true").send().await.unwrap()).await;
    assert_eq!(by_b.body["client_id"], client_of("id-b"));
    let invalid = http
        .put(format!("{admin}/admin/state"))
        .json(&json!({"subscriptions": [{"id": ""}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 400);
    // Settings round trip.
    let mut settings = answer(http.get(format!("{admin}/admin/settings")).send().await.unwrap())
        .await
        .body;
    settings["lroDurationMs"] = json!(1500);
    assert_eq!(
        http.put(format!("{admin}/admin/settings"))
            .json(&settings)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        answer(http.get(format!("{admin}/admin/settings")).send().await.unwrap())
            .await
            .body["lroDurationMs"],
        1500
    );
    assert_eq!(
        http.post(format!("{admin}/admin/throttling/reset"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        http.delete(format!("{admin}/admin/requests"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        answer(http.get(format!("{admin}/admin/counters")).send().await.unwrap())
            .await
            .body["total"],
        0
    );
    // ARM over TLS with the exported CA.
    let tls = pod_identity_azure::HttpConfig::default()
        .with_ca_pem(&ca)
        .build()
        .unwrap();
    let azure = format!("https://{}", ready["azure"].as_str().unwrap());
    let oidc = tls
        .get(format!("{azure}/{TENANT}/v2.0/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap();
    assert_eq!(oidc.status(), 200);
}

/// Stops the emulator process however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_refuses_a_bad_seed_and_a_bad_listener() {
    let dir = tempfile::tempdir().unwrap();
    let seed_path = dir.path().join("seed.json");
    std::fs::write(&seed_path, "{\"subscriptions\": [").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pod-identity-emulator"))
        .arg("--seed")
        .arg(&seed_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not valid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&seed_path, serde_json::to_string(&seed()).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pod-identity-emulator"))
        .arg("--seed")
        .arg(&seed_path)
        .arg("--imds-listen")
        .arg(format!("127.0.0.1:0={}", instance_id(9)))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not in the seed"));
}

#[tokio::test]
async fn library_refuses_unknown_and_malformed_instances() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = pod_identity_emulator::Config::new(seed()).with_imds(&vmss_id());
    let err = pod_identity_emulator::Emulator::start(cfg).await.unwrap_err();
    assert!(
        matches!(err, pod_identity_emulator::StartError::BadInstance(_)),
        "a scale set is not an instance"
    );
}
