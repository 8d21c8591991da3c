//! Readiness and accountability end to end, with the agent as a real process in a node namespace, a real
//! kube-apiserver and the emulator's IMDS: the `IdentityReady` condition of gated pods, the startup taint
//! of the node, and the audit stream of every token decision.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod netns_harness;

use anyhow::{anyhow, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use netns_harness::{CLIENT_A, Harness, TOKEN_URL, curl};
use pod_identity_api::readiness::{AGENT_NOT_READY_TAINT, IDENTITY_READY_CONDITION};
use pod_identity_test_support::eventually;
use serde_json::{Value, json};

/// `(status, reason, message)` of a pod's `IdentityReady` condition, if it has one.
async fn identity_ready(h: &Harness, name: &str) -> Option<(String, String, String)> {
    let pod = Api::<Pod>::namespaced(h.ns.client.clone(), &h.ns.name)
        .get(name)
        .await
        .unwrap();
    pod.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == IDENTITY_READY_CONDITION)
        .map(|c| {
            (
                c.status,
                c.reason.unwrap_or_default(),
                c.message.unwrap_or_default(),
            )
        })
}

/// Waits until the pod's condition has this status and reason, and a message that says `saying`.
async fn condition_becomes(h: &Harness, name: &str, status: &str, reason: &str, saying: &str) {
    eventually(|| async {
        match identity_ready(h, name).await {
            Some((s, r, message)) if s == status && r == reason && message.contains(saying) => Ok(()),
            other => Err(anyhow!(
                "{name}: IdentityReady is {other:?}, waiting for {status}/{reason}"
            )),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", h.agent_log_text()))
}

/// The audit stream's records so far.
fn audit_records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn sha256_prefix(token: &str) -> String {
    pod_identity_agent::audit::token_hash(token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_pod_is_identity_ready_only_once_assigned_with_a_token_fetched_and_its_first_request_hits_the_cache()
 {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let h = Harness::start(&[
        "--prefetch-resource",
        "https://vault.azure.net",
        "--audit-log",
        audit.to_str().unwrap(),
    ])
    .await;
    h.bind("id-a", "web").await;
    let web = h.gated_pod("web", Some("web")).await;
    // Bound too, but without the gate: the agent leaves its status alone.
    let plain = h.pod("plain", Some("web")).await;

    condition_becomes(
        &h,
        "web",
        "False",
        "IdentityNotAssigned",
        "id-a is bound to the pod",
    )
    .await;
    assert_eq!(
        h.tokens_minted_for(CLIENT_A),
        0,
        "nothing fetched before the assignment"
    );

    h.assigned_to("web", "id-a", "Created").await;
    condition_becomes(&h, "web", "False", "IdentityNotAssigned", "'Created'").await;

    h.assigned(&web, "id-a", "Assigned").await;
    condition_becomes(&h, "web", "True", "IdentitiesReady", "id-a").await;
    let minted = h.tokens_minted_for(CLIENT_A);
    assert_eq!(
        minted, 1,
        "the token was fetched before the condition turned true"
    );

    // The pod's first request is answered from the prefetched token, nothing more upstream.
    let (status, body) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(h.tokens_minted_for(CLIENT_A), minted);
    let served: Value = serde_json::from_str(&body).unwrap();
    let access_token = served["access_token"].as_str().unwrap().to_owned();

    let record = eventually(|| async {
        audit_records(&audit)
            .into_iter()
            .find(|r| r["decision"] == "served" && r["pod"]["name"] == "web")
            .ok_or_else(|| anyhow!("no served record yet"))
    })
    .await
    .unwrap();
    assert_eq!(record["cacheHit"], true, "{record}");
    assert_eq!(record["identity"]["clientID"], CLIENT_A);
    assert_eq!(record["resource"], "https://vault.azure.net");
    assert_eq!(record["node"], h.node_name.as_str());
    assert!(record["pod"]["uid"].is_string());
    assert_eq!(record["tokenSha256"], json!([sha256_prefix(&access_token)]));

    // The binding goes: the condition turns false and says why.
    h.unbind("id-a").await;
    condition_becomes(&h, "web", "False", "IdentityNotBound", "selector 'web'").await;

    assert_eq!(
        identity_ready(&h, "plain").await,
        None,
        "a pod without the gate is not written to"
    );
    drop(plain);
    assert!(
        !std::fs::read_to_string(&audit).unwrap().contains(&access_token),
        "the audit stream never carries a token"
    );
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_stream_records_every_decision_folds_a_refusal_loop_and_carries_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let h = Harness::start(&[
        "--audit-log",
        audit.to_str().unwrap(),
        "--assignment-wait-sec",
        "1",
    ])
    .await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    let stranger = h.pod("stranger", None).await;
    let waiting = h.pod("waiting", Some("waiting")).await;
    h.bind("id-b", "waiting").await;

    let mut tokens = Vec::new();
    for _ in 0..3 {
        let (status, body) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        tokens.push(body["access_token"].as_str().unwrap().to_owned());
    }
    const LOOP: u64 = 25;
    for _ in 0..LOOP {
        let (status, _) = curl(&h, &stranger, TOKEN_URL, &["-H", "Metadata: true"]);
        assert_eq!(status, 403);
    }
    let (status, _) = curl(&h, &waiting, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 503, "id-b is bound but never assigned");
    let (status, _) = curl(&h, &web, TOKEN_URL, &[]);
    assert_eq!(status, 400, "no Metadata header");

    // Stopping the agent closes the open windows.
    h.stop_agent();
    let records = audit_records(&audit);
    let of = |name: &str| -> Vec<&Value> { records.iter().filter(|r| r["pod"]["name"] == name).collect() };
    let served = of("web");
    let served: Vec<&&Value> = served.iter().filter(|r| r["decision"] == "served").collect();
    assert_eq!(served.len(), 3, "every issuance is a record: {records:#?}");
    assert_eq!(served[0]["cacheHit"], false);
    assert_eq!(served[1]["cacheHit"], true);

    let refused = of("stranger");
    assert!(
        refused.len() <= 4,
        "a refusal loop writes a line and a count per window, not a line per request: {refused:#?}"
    );
    assert_eq!(
        refused.iter().map(|r| r["count"].as_u64().unwrap()).sum::<u64>(),
        LOOP,
        "every refusal is counted"
    );
    assert!(
        refused
            .iter()
            .all(|r| r["decision"] == "denied" && r["reason"] == "IdentityDenied")
    );

    let unavailable = of("waiting");
    assert_eq!(unavailable.len(), 1, "{records:#?}");
    assert_eq!(unavailable[0]["decision"], "unavailable");
    assert_eq!(unavailable[0]["reason"], "IdentityNotAssigned");

    assert!(
        records
            .iter()
            .any(|r| r["decision"] == "denied" && r["reason"] == "InvalidRequest"),
        "{records:#?}"
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    for token in &tokens {
        assert!(!text.contains(token.as_str()), "a token in the audit stream");
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !text.contains(signature),
            "a token's signature in the audit stream"
        );
    }
    drop((web, stranger, waiting));
}

/// Adds the startup taint to the harness's node.
async fn taint_node(h: &Harness) {
    let nodes = Api::<Node>::all(h.ns.client.clone());
    let patch = json!({"spec": {"taints": [
        {"key": "example.com/other", "effect": "NoExecute"},
        {"key": AGENT_NOT_READY_TAINT, "value": "true", "effect": "NoSchedule"},
    ]}});
    nodes
        .patch(&h.node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn taint_removed(h: &Harness) {
    let nodes = Api::<Node>::all(h.ns.client.clone());
    eventually(|| async {
        let node = nodes.get(&h.node_name).await?;
        let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
        let keys: Vec<&str> = taints.iter().map(|t| t.key.as_str()).collect();
        if keys.contains(&AGENT_NOT_READY_TAINT) {
            bail!("still tainted: {keys:?}")
        }
        assert_eq!(keys, ["example.com/other"], "other taints stay");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", h.agent_log_text()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_taint_goes_once_the_agent_is_ready_and_again_if_it_comes_back() {
    let mut h = Harness::start(&[]).await;
    // A node that registered with the taint, its agent not started yet.
    h.kill_agent();
    taint_node(&h).await;
    let before = h.agent_log_text().len();
    h.restart_agent().await;
    taint_removed(&h).await;
    // Removed only once ready: after every watch (pods, assignments, bindings, identities, exceptions)
    // had synced.
    let log = h.agent_log_text();
    let restarted = &log[before..];
    let removed = restarted
        .find("removed the node's startup taint")
        .unwrap_or_else(|| panic!("{restarted}"));
    assert_eq!(
        restarted[..removed].matches("watch synced").count(),
        5,
        "{restarted}"
    );

    // A node pool update that puts the pool's taints back on running nodes.
    taint_node(&h).await;
    taint_removed(&h).await;
    h.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_fetch_keeps_the_pod_not_ready_with_the_error_until_a_retry_succeeds() {
    let h = Harness::start(&["--prefetch-resource", "https://vault.azure.net"]).await;
    // IMDS refuses the identity's tokens (what it answers while an identity is not on the machine).
    let fault = h.emulator.inject(pod_identity_emulator::FaultSpec {
        service: Some(pod_identity_emulator::Service::Imds),
        query_contains: Some(CLIENT_A.to_owned()),
        status: Some(400),
        ..Default::default()
    });
    h.bind("id-a", "web").await;
    let web = h.gated_pod("web", Some("web")).await;
    h.assigned(&web, "id-a", "Assigned").await;
    condition_becomes(&h, "web", "False", "TokenFetchFailed", "id-a").await;

    // IMDS gives the token again: the retry, due without any change in the cluster, makes it ready.
    assert!(h.emulator.remove_fault(fault));
    condition_becomes(&h, "web", "True", "IdentitiesReady", "id-a").await;
    let (status, body) = curl(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 200, "{body}");
    h.stop_agent();
}
