//! The node agent end to end: a node and its pods as network namespaces, the agent as a real process in
//! the node namespace with real iptables rules, the emulator's IMDS on 169.254.169.254 inside that
//! namespace only, and a real kube-apiserver. Pods call the metadata address exactly as on Azure, with
//! curl, Python `azure-identity` and Rust `azure_identity`, none of them pointed anywhere else.
//!
//! The API server listens on the host's loopback; the agent reaches it through a relay listening on the
//! same `127.0.0.1:<port>` inside the node namespace (so the admin kubeconfig works unchanged), whose
//! connections this test process opens on the host side. No route leads out of the node namespace.
//!
//! Proof of what reached IMDS comes from the emulator's request log: the agent's own calls come from
//! the node's addresses; a pod address there would mean interception failed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod netns_harness;
mod pod_clients;

use std::time::Duration;

use std::process::{Command, Stdio};

use netns_harness::{CLIENT_A, CLIENT_B, Harness, TOKEN_URL, curl};
use pod_clients::{python, rust_sdk_token};
use pod_identity_emulator::{FaultSpec, LogFilter, Service};
use pod_identity_test_support::netns::PodNet;
use pod_identity_test_support::{eventually, fixtures};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_pod_gets_its_token_through_plain_curl_and_nothing_else_reaches_imds() {
    let h = Harness::start(&[]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    let since = h.emulator.last_seq();

    let (status, body) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 200, "{body}");
    let token: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(token["client_id"], CLIENT_A);
    for field in [
        "access_token",
        "expires_in",
        "expires_on",
        "not_before",
        "resource",
        "token_type",
    ] {
        assert!(token[field].is_string(), "{field} must be a string: {body}");
    }
    let claims = netns_harness::claims(token["access_token"].as_str().unwrap());
    assert_eq!(claims["appid"], CLIENT_A, "the token names the pod's identity");
    assert_eq!(claims["aud"], "https://vault.azure.net");

    let imds = h.imds_requests(since);
    assert_eq!(imds.len(), 1, "one upstream call: {imds:?}");
    assert!(
        h.is_node_address(&imds[0].source),
        "IMDS saw the agent, not the pod: {}",
        imds[0].source
    );
    assert_eq!(imds[0].identity.as_deref(), Some(CLIENT_A));

    // Again: from the cache, nothing more upstream.
    let (status, _) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 200);
    assert_eq!(h.imds_requests(since).len(), 1);
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_rust_sdks_work_unchanged_and_the_token_reads_a_key_vault_secret() {
    let h = Harness::start(&[]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    let since = h.emulator.last_seq();

    let python = python(&h, &web, PYTHON_SDK);
    let result: Value = serde_json::from_str(python.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("python printed no result ({e}):\n{python}"));
    assert_eq!(result["secret"], "s3cret", "{python}");
    assert_eq!(
        netns_harness::claims(result["token"].as_str().unwrap())["appid"],
        CLIENT_A
    );

    let rust = rust_sdk_token(&web, "https://vault.azure.net/.default").await;
    assert_eq!(netns_harness::claims(&rust)["appid"], CLIENT_A);

    for record in h.imds_requests(since) {
        assert!(
            h.is_node_address(&record.source),
            "a pod reached IMDS directly: {record:?}"
        );
    }
    let vault = h.emulator.requests(&LogFilter {
        service: Some(Service::KeyVault),
        since: Some(since),
        status: Some(200),
        ..LogFilter::default()
    });
    assert_eq!(vault.len(), 1, "the secret was read once: {vault:?}");
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_other_namespace_and_foreign_client_id_are_refused_and_nothing_is_minted() {
    let h = Harness::start(&[]).await;
    let web = h.pod("web", Some("web")).await;
    let lonely = h.pod("lonely", None).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    // A pod of another namespace carrying the same label: the binding is not its namespace's.
    let stranger = h.pod_in_other_namespace("stranger", Some("web")).await;
    let since = h.emulator.last_seq();

    let (status, body) = curl(&h, &lonely, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no label aadpodidbinding"), "{body}");

    let (status, body) = curl(&h, &stranger, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("another namespace"), "{body}");

    let foreign = format!("{TOKEN_URL}&client_id={CLIENT_B}");
    let (status, body) = curl(&h, &web, &foreign, &["-H", "Metadata: true"]);
    assert_eq!(status, 403, "{body}");

    assert!(
        h.imds_requests(since).is_empty(),
        "no refused request reached IMDS"
    );
    assert_eq!(h.tokens_minted_for(CLIENT_B), 0);
    let events = h.events_about("lonely").await;
    assert!(events.iter().any(|e| e.contains("IdentityDenied")), "{events:?}");
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_the_assignment_then_succeeds_or_gets_503_with_retry_after() {
    let h = Harness::start(&["--assignment-wait-sec", "20"]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.emulator_unassign("id-a");
    h.assigned(&web, "id-a", "Created").await;

    // The controller's part, played by the test: the identity reaches the scale set, then the
    // assignment says so. The request is already waiting.
    let waiting = h.curl_in_background(&web, TOKEN_URL, &["-H", "Metadata: true"]);
    eventually(|| async {
        let metrics = h.metrics();
        anyhow::ensure!(
            metrics.contains("pod_identity_waiting_requests 1"),
            "the request is not waiting yet"
        );
        Ok(())
    })
    .await
    .unwrap();
    assert!(
        h.imds_requests(0).is_empty(),
        "nothing may be fetched before the assignment"
    );
    h.emulator_assign("id-a");
    h.assigned(&web, "id-a", "Assigned").await;
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, 200, "{body}");
    h.stop_agent();

    let h = Harness::start(&["--assignment-wait-sec", "1", "--retry-after-sec", "9"]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Created").await;
    let (status, headers, body) =
        netns_harness::curl_with_headers(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 503, "{body}");
    assert!(
        headers.to_ascii_lowercase().contains("retry-after: 9"),
        "{headers}"
    );
    assert!(h.imds_requests(0).is_empty());
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_variants_and_header_attacks_are_rejected_and_never_forwarded() {
    let h = Harness::start(&["--block-instance-metadata=false"]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    let since = h.emulator.last_seq();
    let q = "?api-version=2018-02-01&resource=https://vault.azure.net";
    let attacks: Vec<(String, Vec<&str>)> = vec![
        (
            format!("/metadata/identity\\oauth2\\token{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata/identity\\oauth2\\token/{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/Metadata/identity/oauth2/token{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/METADATA/IDENTITY/OAUTH2/TOKEN{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata/identity%2Foauth2%2Ftoken{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata/identity%252Foauth2%252Ftoken{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata//identity/oauth2/token{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata/./identity/oauth2/token{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata/instance/../identity/oauth2/token{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata/identity/oauth2/token/{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata/identity/info{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata/instance%2F..%2Fidentity%2Foauth2%2Ftoken{q}"),
            vec!["-H", "Metadata: true"],
        ),
        (format!("/metadata/identity/oauth2/token{q}"), vec![]),
        (
            format!("/metadata/identity/oauth2/token{q}"),
            vec!["-H", "Metadata: false"],
        ),
        (
            format!("/metadata/identity/oauth2/token{q}"),
            vec!["-H", "Metadata: true", "-H", "X-Forwarded-For: 10.244.9.9"],
        ),
        (
            "/metadata/instance?api-version=2021-02-01".to_owned(),
            vec!["-H", "Metadata: true", "-H", "X-Forwarded-For: 1.2.3.4"],
        ),
        (
            format!("/metadata/identity/oauth2/token{q}&client_id={CLIENT_A}&client_id={CLIENT_B}"),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata/identity/oauth2/token{q}&client_id={CLIENT_A}&object_id=x"),
            vec!["-H", "Metadata: true"],
        ),
        // IMDS wants the value in lower case.
        (
            format!("/metadata/identity/oauth2/token{q}"),
            vec!["-H", "Metadata: True"],
        ),
        // Parameters that are no identifiers never go upstream, and cannot forge a log line.
        (
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=%00".to_owned(),
            vec!["-H", "Metadata: true"],
        ),
        (
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x%0A2026-11-30T00:00:00Z%20INFO%20forged%20line".to_owned(),
            vec!["-H", "Metadata: true"],
        ),
        (
            format!("/metadata/identity/oauth2/token{q}&client_id=x%0A2026-11-30T00:00:00Z%20INFO%20forged%20line"),
            vec!["-H", "Metadata: true"],
        ),
    ];
    for (path, headers) in &attacks {
        let url = format!("http://169.254.169.254{path}");
        let (status, body) = curl(&h, &web, &url, headers);
        assert!(
            (400..500).contains(&status),
            "{path} {headers:?} got {status}: {body}"
        );
    }
    assert!(
        h.imds_requests(since).is_empty(),
        "an attack reached IMDS: {:?}",
        h.imds_requests(since)
    );
    let log = h.agent_log_text();
    assert!(
        !log.lines().any(|l| l.starts_with("2026-11-30T00:00:00Z")),
        "a forged line in the agent's log:\n{log}"
    );
    // A clean instance path is forwarded when allowed, without X-Forwarded-For (IMDS would refuse it).
    let (status, body) = curl(
        &h,
        &web,
        "http://169.254.169.254/metadata/instance/compute/vmScaleSetName?api-version=2021-02-01&format=text",
        &["-H", "Metadata: true"],
    );
    assert_eq!((status, body.as_str()), (200, "nodepool"));
    let forwarded = h.imds_requests(since);
    assert_eq!(forwarded.len(), 1);
    assert!(h.is_node_address(&forwarded[0].source));
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_under_load_no_pod_request_reaches_imds_and_the_rules_stay() {
    let mut h = Harness::start(&[]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    let rules_before = h.nat_rules();
    assert!(rules_before.contains("DNAT"), "{rules_before}");

    let load = h.load(&web, Duration::from_secs(8));
    // The load is being served before the agent goes.
    eventually(|| async {
        let metrics = h.metrics();
        let served = metrics
            .lines()
            .find(|l| l.starts_with("pod_identity_requests_total{route=\"token\",code=\"200\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        anyhow::ensure!(served >= 10, "{served} requests of the load served so far");
        Ok(())
    })
    .await
    .unwrap();
    h.kill_agent();
    // Down: the rules stay and pods get resets, never IMDS.
    assert_eq!(h.nat_rules(), rules_before, "the rules must survive the agent");
    let (status, _) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 0, "with the agent down the connection is refused");
    // An outage the load lasts through, so that it sees refused connections, not only the one above.
    load.refused().await;
    h.restart_agent().await;
    let outcome = load.counts().await;
    assert!(outcome["ok"].as_u64().unwrap() > 0, "{outcome}");
    assert!(
        outcome["refused"].as_u64().unwrap() > 0,
        "the load saw the agent down: {outcome}"
    );
    assert_eq!(
        outcome["other"].as_u64().unwrap(),
        0,
        "only successes and refusals: {outcome}"
    );
    for record in h.imds_requests(0) {
        assert!(
            h.is_node_address(&record.source),
            "a pod reached IMDS: {record:?}"
        );
    }
    assert_eq!(h.nat_rules(), rules_before, "a restart installs nothing twice");
    let (status, _) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 200);
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_removed_behind_the_agents_back_are_repaired_and_the_guard_holds_meanwhile() {
    let mut h = Harness::start(&["--ipt-update-interval-sec", "2"]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    let rules = h.nat_rules();

    // With the agent stopped nothing repairs, so the guard alone must hold.
    h.kill_agent();
    h.node_cmd(&[
        "iptables",
        "-w",
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-j",
        "POD-IDENTITY",
    ]);
    let since = h.emulator.last_seq();
    let (status, _) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 0, "the guard resets the connection");
    assert!(h.imds_requests(since).is_empty(), "{:?}", h.imds_requests(since));

    h.restart_agent().await;
    assert_eq!(h.nat_rules(), rules, "the jump is back");
    // Drift while running is repaired on the next check.
    h.node_cmd(&["iptables", "-w", "-t", "nat", "-F", "POD-IDENTITY"]);
    eventually(|| async {
        if h.nat_rules() == rules {
            Ok(())
        } else {
            Err("not repaired yet")
        }
    })
    .await
    .unwrap();
    let (status, _) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 200);
    let metrics = h.metrics();
    assert!(
        metrics.contains("pod_identity_iptables_syncs_total{result=\"repaired\"}"),
        "{metrics}"
    );
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_throttling_is_retried_once_for_all_callers() {
    let h = Harness::start(&[]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    h.emulator.inject(FaultSpec {
        service: Some(Service::Imds),
        status: Some(429),
        times: Some(1),
        latency_ms: Some(300),
        ..FaultSpec::default()
    });
    let since = h.emulator.last_seq();
    let callers: Vec<_> = (0..8)
        .map(|_| h.curl_in_background(&web, TOKEN_URL, &["-H", "Metadata: true"]))
        .collect();
    for caller in callers {
        let (status, body) = caller.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let upstream = h.imds_requests(since);
    assert_eq!(
        upstream.len(),
        2,
        "one throttled attempt and one retry for eight callers: {upstream:?}"
    );
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_principals_get_tokens_from_entra_with_a_secret_a_certificate_and_auxiliary_tenants() {
    let h = Harness::start(&[]).await;
    let web = h.pod("web", Some("web")).await;
    h.service_principal_secret("sp-secret", 1, &[]).await;
    h.bind("sp-secret", "web").await;
    let (status, body) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 200, "{body}");
    let token: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(token["client_id"], netns_harness::SP_CLIENT);
    assert_eq!(
        netns_harness::claims(token["access_token"].as_str().unwrap())["tid"],
        netns_harness::TENANT
    );

    let db = h.pod("db", Some("db")).await;
    h.service_principal_secret("sp-cert", 2, &[]).await;
    h.bind("sp-cert", "db").await;
    let (status, body) = curl(&h, &db, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 200, "{body}");

    let multi = h.pod("multi", Some("multi")).await;
    h.service_principal_secret("sp-multi", 1, &[netns_harness::AUX_TENANT])
        .await;
    h.bind("sp-multi", "multi").await;
    let (status, body) = curl(&h, &multi, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 200, "{body}");
    let tokens: Value = serde_json::from_str(&body).unwrap();
    let tenants: Vec<String> = tokens
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            netns_harness::claims(t["access_token"].as_str().unwrap())["tid"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        tenants,
        vec![
            netns_harness::TENANT.to_owned(),
            netns_harness::AUX_TENANT.to_owned()
        ]
    );
    assert!(
        h.imds_requests(0).is_empty(),
        "service principals never touch IMDS"
    );
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_removed_drops_the_cached_token_and_later_requests_are_refused() {
    let h = Harness::start(&[]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    assert_eq!(curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]).0, 200);
    h.unbind("id-a").await;
    eventually(|| async {
        let (status, body) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
        if status == 403 {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await
    .unwrap();
    eventually(|| async {
        let metrics = h.metrics();
        if metrics.contains("pod_identity_token_cache_entries 0") {
            Ok(())
        } else {
            Err(metrics)
        }
    })
    .await
    .unwrap();
    h.stop_agent();
}

/// The SDKs as an application uses them: no endpoint, no client ID, nothing but the defaults.
const PYTHON_SDK: &str = r#"
import json
from azure.identity import ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient
credential = ManagedIdentityCredential()
token = credential.get_token("https://vault.azure.net/.default")
secret = SecretClient(vault_url="https://testvault.vault.azure.net", credential=credential).get_secret("db-password")
print(json.dumps({"token": token.token, "secret": secret.value}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn az_login_identity_in_a_bound_pod_gets_its_token_through_the_agent() {
    let h = Harness::start(&[]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    let since = h.emulator.last_seq();
    // ARM is the emulator on the node; the identity holds no role, hence --allow-no-subscriptions.
    h.set_pod_hosts(&web, &[(web.gateway, "management.azure.com")]);
    let config = tempfile::tempdir().unwrap();
    let accounts = az(
        &h,
        &web,
        config.path(),
        &["login", "--identity", "--allow-no-subscriptions"],
    );
    assert_eq!(accounts.as_array().map(Vec::len), Some(1), "{accounts}");
    assert_eq!(accounts[0]["tenantId"], netns_harness::TENANT, "{accounts}");
    assert_eq!(accounts[0]["name"], "N/A(tenant level account)");
    let token = az(&h, &web, config.path(), &["account", "get-access-token"]);
    let claims = netns_harness::claims(token["accessToken"].as_str().unwrap());
    assert_eq!(claims["appid"], CLIENT_A, "the pod's identity: {claims}");
    assert_eq!(claims["aud"], "https://management.core.windows.net/");

    for record in h.imds_requests(since) {
        assert!(
            h.is_node_address(&record.source),
            "a pod reached IMDS directly: {record:?}"
        );
    }
    let listed = h.emulator.requests(&LogFilter {
        service: Some(Service::Arm),
        since: Some(since),
        ..LogFilter::default()
    });
    assert!(
        listed
            .iter()
            .any(|r| r.path == "/subscriptions" && r.status == 200),
        "az listed the subscriptions: {listed:?}"
    );
    h.stop_agent();
}

/// The `az` of the pinned Azure CLI venv (`POD_IDENTITY_AZ`, or the one `tools/setup-python.sh
/// tools/azure-cli-requirements.txt` builds or finds cached).
fn az_binary() -> String {
    if let Ok(az) = std::env::var("POD_IDENTITY_AZ") {
        return az;
    }
    let root = netns_harness::repo_root();
    let output = Command::new("bash")
        .arg(root.join("tools/setup-python.sh"))
        .arg(root.join("tools/azure-cli-requirements.txt"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "tools/setup-python.sh tools/azure-cli-requirements.txt failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    format!("{}/bin/az", String::from_utf8_lossy(&output.stdout).trim())
}

/// Runs `az args… --output json` in a pod with its own configuration directory, trusting the
/// emulator's CA; IMDS is not named anywhere: the CLI calls 169.254.169.254 as on Azure.
fn az(h: &Harness, pod: &PodNet, config: &std::path::Path, args: &[&str]) -> Value {
    let output = Command::new("ip")
        .args(["netns", "exec", &pod.netns, &az_binary()])
        .args(args)
        .args(["--output", "json"])
        .env("AZURE_CONFIG_DIR", config)
        .env("AZURE_CORE_COLLECT_TELEMETRY", "false")
        .env("AZURE_CORE_SURVEY_MESSAGE", "false")
        .env("REQUESTS_CA_BUNDLE", &h.ca_file)
        .env_remove("AZURE_POD_IDENTITY_AUTHORITY_HOST")
        .env_remove("IDENTITY_ENDPOINT")
        .env_remove("MSI_ENDPOINT")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "az {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Pods of the test's namespace, to play the kubelet's and the user's part.
fn pods(h: &Harness) -> kube::Api<k8s_openapi::api::core::v1::Pod> {
    kube::Api::namespaced(h.ns.client.clone(), &h.ns.name)
}

async fn patch_pod_status(h: &Harness, name: &str, status: Value) {
    pods(h)
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&serde_json::json!({ "status": status })),
        )
        .await
        .unwrap();
}

/// The `client_id` of the last answer in `body` (curl `--retry` writes every attempt's body).
fn client_id_of(body: &str) -> String {
    let last = serde_json::Deserializer::from_str(body)
        .into_iter::<Value>()
        .filter_map(Result::ok)
        .last()
        .unwrap_or_default();
    last["client_id"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_being_deleted_is_served_through_its_grace_period_and_a_new_pod_on_its_ip_gets_only_its_own() {
    let h = Harness::start(&["--pod-wait-sec", "1", "--retry-after-sec", "1"]).await;
    let old = h.pod("old", Some("web")).await;
    h.bind("id-a", "web").await;
    h.bind("id-b", "db").await;
    h.assigned(&old, "id-a", "Assigned").await;

    // `kubectl delete` with a grace period: the pod keeps running with its deletionTimestamp set (no
    // kubelet here finishes it), and its SIGTERM handler asks for a token.
    pods(&h)
        .delete(
            "old",
            &kube::api::DeleteParams {
                grace_period_seconds: Some(120),
                ..kube::api::DeleteParams::default()
            },
        )
        .await
        .unwrap();
    // The agent watches this node's pods in order: once it knows a pod created after the deletion, it
    // knows the deletion.
    let marker = h.pod("marker", None).await;
    eventually(|| async {
        let (status, body) = curl(&h, &marker, TOKEN_URL, &["-H", "Metadata: true"]);
        anyhow::ensure!(status == 403, "{status} {body}");
        Ok(())
    })
    .await
    .unwrap();
    let (status, body) = curl(&h, &old, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(client_id_of(&body), CLIENT_A);

    // A new pod is scheduled to the node; its address is not reported yet, and the kubelet may already
    // have given it the old pod's: the old pod is not taken for the caller, the request is retried.
    fixtures::create_pod(
        &h.ns.client,
        &fixtures::PodTemplate {
            namespace: h.ns.name.clone(),
            name: "new".into(),
            labels: [(pod_identity_api::POD_LABEL.to_owned(), "db".to_owned())].into(),
            node: Some(h.node_name.clone()),
            ip: None,
        },
    )
    .await
    .unwrap();
    h.assigned_to("new", "id-b", "Assigned").await;
    let (status, headers, body) =
        netns_harness::curl_with_headers(&h, &old, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 503, "{body}");
    assert!(
        headers.to_ascii_lowercase().contains("retry-after: 1"),
        "{headers}"
    );

    // The new pod reports the old pod's address (the old one's status still says running): requests
    // from it are the new pod's, with the new pod's identity only.
    let waiting = h.curl_in_background(&old, TOKEN_URL, &["-H", "Metadata: true", "--retry", "10"]);
    fixtures::set_pod_running(&h.ns.client, &h.ns.name, "new", &old.ip.to_string())
        .await
        .unwrap();
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(client_id_of(&body), CLIENT_B);
    let foreign = format!("{TOKEN_URL}&client_id={CLIENT_A}");
    let (status, body) = curl(&h, &old, &foreign, &["-H", "Metadata: true"]);
    assert_eq!(status, 403, "never the old pod's identity: {body}");

    // The old pod's containers stop: nothing changes for the new one.
    patch_pod_status(
        &h,
        "old",
        serde_json::json!({"containerStatuses": [{
            "name": "app", "ready": false, "restartCount": 0, "image": "example.invalid/app:1", "imageID": "",
            "state": {"terminated": {"exitCode": 0, "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:00Z"}}
        }]}),
    )
    .await;
    let (status, body) = curl(&h, &old, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(
        (status, client_id_of(&body)),
        (200, CLIENT_B.to_owned()),
        "{body}"
    );
    fixtures::delete_pod_now(&h.ns.client, &h.ns.name, "old")
        .await
        .unwrap();
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_asking_before_its_ip_is_reported_is_answered_with_a_retry_then_its_token() {
    let h = Harness::start(&["--pod-wait-sec", "1", "--retry-after-sec", "1"]).await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    // As while its init container runs: the sandbox has the address, the API does not show it yet.
    patch_pod_status(
        &h,
        "web",
        serde_json::json!({"phase": "Pending", "podIP": null, "podIPs": null}),
    )
    .await;
    eventually(|| async {
        let (status, headers, body) =
            netns_harness::curl_with_headers(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
        anyhow::ensure!(status == 503, "{status}: the IP is still known");
        assert!(
            headers.to_ascii_lowercase().contains("retry-after: 1"),
            "{headers}"
        );
        assert!(body.contains("no pod of this node"), "{body}");
        Ok(())
    })
    .await
    .unwrap();

    // curl retries a 503 (after its Retry-After), as the SDKs do.
    let unknown_callers = || {
        h.metrics()
            .lines()
            .find(|l| l.starts_with("pod_identity_token_decisions_total{result=\"unknown_caller\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = unknown_callers();
    let asking = h.curl_in_background(&web, TOKEN_URL, &["-H", "Metadata: true", "--retry", "10"]);
    eventually(|| async {
        anyhow::ensure!(
            unknown_callers() > before,
            "the request has not been answered 503 yet"
        );
        Ok(())
    })
    .await
    .unwrap();
    fixtures::set_pod_running(&h.ns.client, &h.ns.name, "web", &web.ip.to_string())
        .await
        .unwrap();
    let (status, body) = asking.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(client_id_of(&body), CLIENT_A);
    h.stop_agent();
}
