//! ARM identity GET/PATCH on scale sets and VMs: merge semantics, long-running operations, throttling, and
//! every refusal in ARM's shape.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use pod_identity_emulator::{Claims, Emulator};
use serde_json::{Map, Value, json};

const V: &str = "2024-07-01";

fn url(em: &Emulator, id: &str, version: &str) -> String {
    format!("{}{id}?api-version={version}", em.azure_url())
}

async fn get(em: &Emulator, token: &str, id: &str) -> Answer {
    answer(
        client(em)
            .get(url(em, id, V))
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn patch(em: &Emulator, token: &str, id: &str, body: &Value) -> Answer {
    answer(
        client(em)
            .patch(url(em, id, V))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn adds(ids: &[String]) -> Value {
    let map: Map<String, Value> = ids.iter().map(|i| (i.clone(), json!({}))).collect();
    json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": map}})
}

#[tokio::test]
async fn get_returns_the_resource_with_identities_and_rate_limit_headers() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let a = get(&em, &tok, &vmss_id().to_lowercase()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["id"], vmss_id());
    assert_eq!(a.body["type"], "Microsoft.Compute/virtualMachineScaleSets");
    assert_eq!(a.body["identity"]["type"], "UserAssigned");
    assert_eq!(
        a.body["identity"]["userAssignedIdentities"][uami("id-a")]["clientId"],
        client_of("id-a")
    );
    assert_eq!(a.body["properties"]["provisioningState"], "Succeeded");
    assert_eq!(a.body["sku"]["capacity"], 2);
    let remaining = a.header("x-ms-ratelimit-remaining-resource").unwrap();
    assert!(
        remaining.contains("Microsoft.Compute/GetVMScaleSetResource;35"),
        "{remaining}"
    );
    assert_eq!(
        a.header("x-ms-ratelimit-remaining-subscription-reads"),
        Some("249")
    );
    let vm = get(&em, &tok, &vm_id()).await;
    assert_eq!(vm.body["identity"]["type"], "SystemAssigned");
    assert_eq!(vm.body["identity"]["principalId"], VM_SYS_PRINCIPAL);
    assert_eq!(vm.body["identity"]["tenantId"], TENANT);
}

#[tokio::test]
async fn patch_merges_adds_and_removes_case_insensitively() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let a = patch(&em, &tok, &vmss_id(), &adds(&[uami("id-b").to_lowercase()])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let ids = a.body["identity"]["userAssignedIdentities"].as_object().unwrap();
    assert_eq!(ids.len(), 2, "id-a stays, id-b is added");
    assert!(
        a.header("azure-asyncoperation")
            .unwrap()
            .contains("/providers/Microsoft.Compute/locations/westeurope/operations/")
    );
    let body = json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {uami("ID-A").replace("ID-A", "id-a").to_uppercase(): null}}});
    let a = patch(&em, &tok, &vmss_id(), &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let ids: Vec<&String> = a.body["identity"]["userAssignedIdentities"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(ids, vec![&uami("id-b").to_lowercase()]);
    // Removing the last one with type None.
    let a = patch(&em, &tok, &vmss_id(), &json!({"identity": {"type": "None"}})).await;
    assert_eq!(a.status, 200);
    assert!(
        a.body.get("identity").is_none(),
        "no identity block when none is left: {}",
        a.body
    );
}

#[tokio::test]
async fn system_identity_survives_with_the_combined_type() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let body = json!({"identity": {"type": "SystemAssigned,UserAssigned", "userAssignedIdentities": {uami("id-a"): {}}}});
    let a = patch(&em, &tok, &vm_id(), &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["identity"]["type"], "SystemAssigned, UserAssigned");
    assert_eq!(a.body["identity"]["principalId"], VM_SYS_PRINCIPAL);
}

#[tokio::test]
async fn more_than_150_identities_in_one_request_is_refused() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let many: Vec<String> = (0..151).map(|n| uami(&format!("bulk-{n:03}"))).collect();
    let a = patch(&em, &tok, &vmss_id(), &adds(&many)).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.code(), "BadRequest");
    assert_eq!(
        a.body["error"]["message"],
        "User Assigned Identities Number '151' Assign exceed limit '150' in one request."
    );
    let a = patch(&em, &tok, &vmss_id(), &adds(&many[..150])).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.body["identity"]["userAssignedIdentities"]
            .as_object()
            .unwrap()
            .len(),
        151
    );
}

#[tokio::test]
async fn invalid_identity_patches_are_refused_with_crp_errors() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let cases = [
        (
            "ids with SystemAssigned",
            json!({"identity": {"type": "SystemAssigned", "userAssignedIdentities": {uami("id-b"): {}}}}),
            "InvalidParameter",
        ),
        (
            "unknown type",
            json!({"identity": {"type": "Both"}}),
            "InvalidParameter",
        ),
        (
            "malformed id",
            json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {"id-b": {}}}}),
            "LinkedInvalidPropertyId",
        ),
        (
            "duplicate in other case",
            json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {uami("id-b"): {}, uami("id-b").to_lowercase(): {}}}}),
            "InvalidParameter",
        ),
        (
            "map is a list",
            json!({"identity": {"userAssignedIdentities": [uami("id-b")]}}),
            "InvalidRequestContent",
        ),
    ];
    for (name, body, code) in cases {
        let a = patch(&em, &tok, &vmss_id(), &body).await;
        assert_eq!((a.status, a.code()), (400, code), "{name}: {}", a.text);
    }
    let a = patch(
        &em,
        &tok,
        &vmss_id(),
        &json!({"identity": {"type": "SystemAssigned", "userAssignedIdentities": {uami("id-b"): {}}}}),
    )
    .await;
    assert_eq!(a.body["error"]["target"], "resourceIdentity.identityIds");
}

#[tokio::test]
async fn assigning_an_identity_that_does_not_exist_fails_the_identity_operation() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let ghost = uami("ghost");
    let a = patch(&em, &tok, &vmss_id(), &adds(std::slice::from_ref(&ghost))).await;
    assert_eq!(
        (a.status, a.code()),
        (400, "FailedIdentityOperation"),
        "{}",
        a.text
    );
    assert!(a.body["error"]["message"].as_str().unwrap().contains(&ghost));
}

#[tokio::test]
async fn on_a_wildcard_listener_the_operation_to_poll_names_the_address_the_client_reached() {
    let em = start_with(|c| {
        c.azure_addr = "0.0.0.0:0".parse().unwrap();
        c.settings.lro_duration_ms = 600_000;
    })
    .await;
    let port = em.azure_url().rsplit(':').next().unwrap().to_owned();
    let base = format!("https://127.0.0.1:{port}");
    let tok = ctl_token_at(&em, &base).await;
    let a = answer(
        client(&em)
            .patch(format!("{base}{}?api-version={V}", vmss_id()))
            .bearer_auth(&tok)
            .json(&adds(&[uami("id-b")]))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let op_url = a.header("azure-asyncoperation").unwrap().to_owned();
    assert!(op_url.starts_with(&format!("{base}/")), "{op_url}");
    let op = answer(client(&em).get(&op_url).bearer_auth(&tok).send().await.unwrap()).await;
    assert_eq!(op.body["status"], "InProgress", "{}", op.text);
}

/// A management token from the emulator's Entra at `base`.
async fn ctl_token_at(em: &Emulator, base: &str) -> String {
    let body: Value = client(em)
        .post(format!("{base}/{TENANT}/oauth2/v2.0/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CTL_CLIENT),
            ("client_secret", CTL_SECRET),
            ("scope", "https://management.azure.com/.default"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn identity_reaches_imds_only_after_the_operation_completes() {
    // Long enough that the checks below always run while the operation is in progress, however busy
    // the machine; the operation is then brought due instead of waited out.
    let em = start_with(|c| c.settings.lro_duration_ms = 600_000).await;
    let tok = ctl_token(&em).await;
    let a = patch(&em, &tok, &vmss_id(), &adds(&[uami("id-b")])).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["properties"]["provisioningState"], "Updating");
    assert_eq!(a.header("retry-after"), Some("1"));
    let op_url = a.header("azure-asyncoperation").unwrap().to_owned();
    let imds = || async {
        let url = format!(
            "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net&client_id={}",
            em.imds_url(0).unwrap(),
            client_of("id-b")
        );
        answer(
            plain_client()
                .get(url)
                .header("Metadata", "true")
                .send()
                .await
                .unwrap(),
        )
        .await
    };
    let op = answer(client(&em).get(&op_url).bearer_auth(&tok).send().await.unwrap()).await;
    assert_eq!(op.body["status"], "InProgress", "{}", op.text);
    assert_eq!(imds().await.status, 400, "not yet on the instances");
    let conflict = patch(&em, &tok, &vmss_id(), &adds(&[uami("id-c")])).await;
    assert_eq!(
        (conflict.status, conflict.code()),
        (409, "AnotherOperationInProgress")
    );
    em.with_state(|state| {
        for operation in state.operations.values_mut() {
            operation.due = std::time::Instant::now();
        }
    });
    // Poll as a client would, by the operation's Retry-After.
    let mut done = op;
    while done.body["status"] == "InProgress" {
        let secs: u64 = done.header("retry-after").unwrap_or("1").parse().unwrap();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        done = answer(client(&em).get(&op_url).bearer_auth(&tok).send().await.unwrap()).await;
    }
    assert_eq!(done.body["status"], "Succeeded");
    assert!(done.body["endTime"].is_string());
    assert_eq!(imds().await.status, 200);
    assert_eq!(
        get(&em, &tok, &vmss_id()).await.body["properties"]["provisioningState"],
        "Succeeded"
    );
}

/// ARM's GET returns the model: a change is listed as soon as it is accepted, with
/// `provisioningState: Updating` until its operation ends, `Succeeded` after (azure-core polls the resource
/// itself on that state when an operation names no other URL).
#[tokio::test]
async fn a_machine_read_during_an_update_lists_the_change_and_reads_updating_until_it_ends() {
    let em = start_with(|c| c.settings.lro_duration_ms = 600_000).await;
    let tok = ctl_token(&em).await;
    for id in [vmss_id(), vm_id()] {
        let accepted = patch(&em, &tok, &id, &adds(&[uami("id-c")])).await;
        assert_eq!(accepted.status, 200, "{id}: {}", accepted.text);
        let during = get(&em, &tok, &id).await;
        assert_eq!(during.status, 200, "{id}: {}", during.text);
        assert_eq!(during.body["properties"]["provisioningState"], "Updating", "{id}");
        assert!(
            during.body["identity"]["userAssignedIdentities"]
                .get(uami("id-c"))
                .is_some(),
            "{id}: the model lists the identity being added: {}",
            during.text
        );
        em.with_state(|state| {
            for operation in state.operations.values_mut() {
                operation.due = std::time::Instant::now();
            }
        });
        let after = get(&em, &tok, &id).await;
        assert_eq!(after.body["properties"]["provisioningState"], "Succeeded", "{id}");
        assert!(
            after.body["identity"]["userAssignedIdentities"]
                .get(uami("id-c"))
                .is_some()
        );
    }
}

#[tokio::test]
async fn authentication_failures_are_401_with_arm_codes() {
    let em = start().await;
    let no_auth = answer(client(&em).get(url(&em, &vmss_id(), V)).send().await.unwrap()).await;
    assert_eq!((no_auth.status, no_auth.code()), (401, "AuthenticationFailed"));
    assert_eq!(
        no_auth.body["error"]["message"],
        "Authentication failed. The 'Authorization' header is missing."
    );
    assert!(
        no_auth
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer authorization_uri=")
    );
    let garbage = get(&em, "not-a-jwt", &vmss_id()).await;
    assert_eq!(
        (garbage.status, garbage.code()),
        (401, "InvalidAuthenticationToken")
    );
    let now = jiff::Timestamp::now().as_second();
    let expired = em.mint_token(&Claims::app(
        "https://management.azure.com/",
        TENANT,
        CTL_OBJECT,
        CTL_CLIENT,
        "1",
        now - 7200,
        3600,
    ));
    let a = get(&em, &expired, &vmss_id()).await;
    assert_eq!((a.status, a.code()), (401, "ExpiredAuthenticationToken"));
    let vault_token = entra_token(&em, CTL_CLIENT, CTL_SECRET, "https://vault.azure.net").await;
    let a = get(&em, &vault_token, &vmss_id()).await;
    assert_eq!((a.status, a.code()), (401, "InvalidAuthenticationTokenAudience"));
    let other_tenant = em.mint_token(&Claims::app(
        "https://management.azure.com/",
        "99999999-0000-0000-0000-000000000000",
        CTL_OBJECT,
        CTL_CLIENT,
        "1",
        now,
        3600,
    ));
    let a = get(&em, &other_tenant, &vmss_id()).await;
    assert_eq!((a.status, a.code()), (401, "InvalidAuthenticationTokenTenant"));
    let other = start().await;
    let foreign = ctl_token(&other).await;
    let a = get(&em, &foreign, &vmss_id()).await;
    assert_eq!(
        (a.status, a.code()),
        (401, "InvalidAuthenticationToken"),
        "a token signed elsewhere"
    );
}

#[tokio::test]
async fn authorization_follows_role_assignments() {
    let em = start().await;
    let reader = entra_token(&em, READER_CLIENT, SECRET, "https://management.azure.com").await;
    assert_eq!(get(&em, &reader, &vmss_id()).await.status, 200);
    let a = patch(&em, &reader, &vmss_id(), &adds(&[uami("id-b")])).await;
    assert_eq!((a.status, a.code()), (403, "AuthorizationFailed"));
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Microsoft.Compute/virtualMachineScaleSets/write")
    );
    // May write the scale set but not assign identities.
    let nobody = entra_token(&em, NOBODY_CLIENT, SECRET, "https://management.azure.com").await;
    let a = patch(&em, &nobody, &vmss_id(), &adds(&[uami("id-b")])).await;
    assert_eq!((a.status, a.code()), (403, "LinkedAuthorizationFailed"));
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&uami("id-b"))
    );
    // Removing needs no assign right.
    let a = patch(&em, &nobody, &vmss_id(), &json!({"identity": {"type": "None"}})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = get(&em, &nobody, &vm_id()).await;
    assert_eq!((a.status, a.code()), (403, "AuthorizationFailed"));
}

#[tokio::test]
async fn unknown_subscription_group_resource_and_type() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let other_sub = vmss_id().replace(SUB, "33333333-3333-3333-3333-333333333333");
    assert_eq!(get(&em, &tok, &other_sub).await.code(), "SubscriptionNotFound");
    let reader = entra_token(&em, READER_CLIENT, SECRET, "https://management.azure.com").await;
    let other_rg = vmss_id().replace(RG, "rg-missing");
    let a = get(&em, &reader, &other_rg).await;
    assert_eq!((a.status, a.code()), (404, "ResourceGroupNotFound"));
    let missing = vmss_id().replace(VMSS, "nope");
    let a = get(&em, &tok, &missing).await;
    assert_eq!((a.status, a.code()), (404, "ResourceNotFound"));
    assert!(
        a.body["error"]["message"].as_str().unwrap().starts_with(
            "The Resource 'Microsoft.Compute/virtualMachineScaleSets/nope' under resource group"
        )
    );
    let disk = format!("{}/providers/Microsoft.Compute/disks/d", rg_id());
    assert_eq!(get(&em, &tok, &disk).await.code(), "InvalidResourceType");
    let a = answer(
        client(&em)
            .get(format!("{}/nowhere?api-version={V}", em.azure_url()))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((a.status, a.code()), (404, "InvalidRequestUri"));
    let a = answer(
        client(&em)
            .get(format!(
                "{}/subscriptions/{SUB}/providers/Microsoft.Web/sites?api-version={V}",
                em.azure_url()
            ))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((a.status, a.code()), (404, "MissingSubscriptionRegistration"));
}

#[tokio::test]
async fn api_version_must_be_present_well_formed_and_supported() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let missing = answer(
        client(&em)
            .get(format!("{}{}", em.azure_url(), vmss_id()))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (missing.status, missing.code()),
        (400, "MissingApiVersionParameter")
    );
    let bad = answer(
        client(&em)
            .get(url(&em, &vmss_id(), "latest"))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((bad.status, bad.code()), (400, "InvalidApiVersionParameter"));
    let unsupported = answer(
        client(&em)
            .get(url(&em, &vmss_id(), "2099-01-01"))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (unsupported.status, unsupported.code()),
        (400, "NoRegisteredProviderFound")
    );
    for v in ["2019-12-01", "2026-04-01"] {
        let ok = answer(
            client(&em)
                .get(url(&em, &vmss_id(), v))
                .bearer_auth(&tok)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(ok.status, 200, "{v}");
    }
}

#[tokio::test]
async fn malformed_bodies_are_refused_without_harm() {
    let em = start_with(|c| c.settings.max_body_bytes = 64 * 1024).await;
    let tok = ctl_token(&em).await;
    let send = |body: Vec<u8>, ct: &'static str| {
        let c = client(&em);
        let u = url(&em, &vmss_id(), V);
        let tok = tok.clone();
        async move {
            answer(
                c.patch(u)
                    .bearer_auth(tok)
                    .header("content-type", ct)
                    .body(body)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let a = send(b"{\"identity\": ".to_vec(), "application/json").await;
    assert_eq!(
        (a.status, a.code()),
        (400, "InvalidRequestContent"),
        "truncated JSON"
    );
    let a = send(b"not json".to_vec(), "application/json").await;
    assert_eq!((a.status, a.code()), (400, "InvalidRequestContent"), "not JSON");
    let a = send(Vec::new(), "application/json").await;
    assert_eq!((a.status, a.code()), (400, "InvalidRequestContent"), "empty body");
    let a = send(b"[1,2]".to_vec(), "application/json").await;
    assert_eq!((a.status, a.code()), (400, "InvalidRequestContent"), "array body");
    let a = send(b"{}".to_vec(), "text/plain").await;
    assert_eq!((a.status, a.code()), (415, "UnsupportedMediaType"));
    let big = format!("{{\"tags\": {{\"x\": \"{}\"}}}}", "a".repeat(100 * 1024));
    let a = send(big.into_bytes(), "application/json").await;
    assert_eq!((a.status, a.code()), (413, "RequestContentTooLarge"));
    // A body without identity changes nothing but is a valid update.
    let a = send(b"{\"tags\": {}}".to_vec(), "application/json").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        get(&em, &tok, &vmss_id()).await.body["identity"]["userAssignedIdentities"]
            .as_object()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn if_match_guards_against_lost_updates_and_other_verbs_are_405() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let etag = get(&em, &tok, &vmss_id())
        .await
        .header("etag")
        .unwrap()
        .to_owned();
    let ok = answer(
        client(&em)
            .patch(url(&em, &vmss_id(), V))
            .bearer_auth(&tok)
            .header("if-match", &etag)
            .json(&adds(&[uami("id-b")]))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200);
    let stale = answer(
        client(&em)
            .patch(url(&em, &vmss_id(), V))
            .bearer_auth(&tok)
            .header("if-match", &etag)
            .json(&adds(&[uami("id-c")]))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((stale.status, stale.code()), (412, "PreconditionFailed"));
    // Creating or replacing a machine is not modelled.
    let put = answer(
        client(&em)
            .put(url(&em, &vmss_id(), V))
            .bearer_auth(&tok)
            .json(&json!({"location": "westeurope"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((put.status, put.code()), (405, "MethodNotAllowed"));
}

#[tokio::test]
async fn throttling_per_resource_then_per_subscription() {
    let em = start_with(|c| {
        let p = c
            .settings
            .throttling
            .compute
            .get_mut(&pod_identity_emulator::throttle::Policy::UpdateVmss)
            .unwrap();
        p.per_resource = pod_identity_emulator::throttle::BucketLimit::new(2.0, 2.0);
        p.per_subscription = pod_identity_emulator::throttle::BucketLimit::new(1.0, 3.0);
    })
    .await;
    let tok = ctl_token(&em).await;
    let body = json!({"tags": {}});
    for n in 0..2 {
        let a = patch(&em, &tok, &vmss_id(), &body).await;
        assert_eq!(a.status, 200, "request {n}");
        assert!(
            a.header("x-ms-ratelimit-remaining-resource")
                .unwrap()
                .contains(&format!("PutVMScaleSetResource;{}", 1 - n))
        );
        assert!(a.header("x-ms-ratelimit-remaining-subscription-writes").is_some());
    }
    let a = patch(&em, &tok, &vmss_id(), &body).await;
    assert_eq!((a.status, a.code()), (429, "OperationNotAllowed"), "{}", a.text);
    assert_eq!(
        a.header("retry-after"),
        Some("30"),
        "2 per minute: one token every 30 s"
    );
    assert_eq!(a.body["error"]["details"][0]["code"], "TooManyRequests");
    assert_eq!(a.body["error"]["details"][0]["target"], "PutVMScaleSetResource");
    let detail: Value =
        serde_json::from_str(a.body["error"]["details"][0]["message"].as_str().unwrap()).unwrap();
    assert_eq!(detail["allowedRequestCount"], 2);
    // The VM has its own resource bucket, but the subscription's third token is the last.
    let vm = |em: &Emulator| {
        let (c, u, t) = (client(em), url(em, &vm_id(), V), tok.clone());
        async move {
            answer(
                c.patch(u)
                    .bearer_auth(t)
                    .json(&json!({"tags": {}}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    assert_eq!(vm(&em).await.status, 200, "PutVM is a different policy");
    em.update_settings(|s| {
        let p = s
            .throttling
            .compute
            .get_mut(&pod_identity_emulator::throttle::Policy::UpdateVm)
            .unwrap();
        p.per_subscription = pod_identity_emulator::throttle::BucketLimit::new(1.0, 1.0);
    });
    em.reset_throttling();
    assert_eq!(vm(&em).await.status, 200);
    let a = vm(&em).await;
    assert_eq!(
        (a.status, a.body["error"]["details"][0]["target"].as_str()),
        (429, Some("PutVMSubscriptionMaximum"))
    );
    assert_eq!(a.header("retry-after"), Some("60"));
}

#[tokio::test]
async fn front_door_read_budget_throttles_the_subscription() {
    let em = start_with(|c| {
        c.settings.throttling.arm_reads = pod_identity_emulator::throttle::BucketLimit::new(6.0, 1.0)
    })
    .await;
    let tok = ctl_token(&em).await;
    assert_eq!(get(&em, &tok, &vmss_id()).await.status, 200);
    let a = get(&em, &tok, &vm_id()).await;
    assert_eq!((a.status, a.code()), (429, "SubscriptionRequestsThrottled"));
    assert_eq!(a.header("retry-after"), Some("10"));
    assert!(a.body["error"]["message"].as_str().unwrap().contains(CTL_OBJECT));
}

#[tokio::test]
async fn the_front_door_counts_each_principal_apart_and_marks_a_request_sent_inside_the_window() {
    let em = start_with(|c| {
        c.settings.throttling.arm_reads = pod_identity_emulator::throttle::BucketLimit::new(6.0, 1.0)
    })
    .await;
    let tok = ctl_token(&em).await;
    assert_eq!(get(&em, &tok, &vmss_id()).await.status, 200);
    let refused = get(&em, &tok, &vmss_id()).await;
    assert_eq!((refused.status, refused.header("retry-after")), (429, Some("10")));
    // Asked again at once, inside the 10 s it was told to wait: a fresh 429, and the log says so.
    assert_eq!(get(&em, &tok, &vmss_id()).await.status, 429);
    // Another principal of the same subscription has a read bucket of its own.
    let reader = entra_token(&em, READER_CLIENT, SECRET, "https://management.azure.com/").await;
    assert_eq!(get(&em, &reader, &vmss_id()).await.status, 200);
    let log = em.requests(&pod_identity_emulator::LogFilter {
        path_contains: Some(VMSS.into()),
        ..Default::default()
    });
    let seen: Vec<(u16, bool)> = log.iter().map(|r| (r.status, r.inside_retry_after)).collect();
    assert_eq!(seen, vec![(200, false), (429, false), (429, true), (200, false)]);
}

#[tokio::test]
async fn user_assigned_identity_get() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let a = answer(
        client(&em)
            .get(url(&em, &uami("id-b").to_lowercase(), "2023-01-31"))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["properties"]["clientId"], client_of("id-b"));
    assert_eq!(a.body["properties"]["principalId"], principal_of("id-b"));
    assert_eq!(a.body["properties"]["tenantId"], TENANT);
    assert_eq!(a.body["type"], "Microsoft.ManagedIdentity/userAssignedIdentities");
    let a = answer(
        client(&em)
            .get(url(&em, &uami("ghost"), "2023-01-31"))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((a.status, a.code()), (404, "ResourceNotFound"));
    let a = answer(
        client(&em)
            .get(url(&em, &uami("id-b"), "2024-07-01"))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((a.status, a.code()), (400, "NoRegisteredProviderFound"));
}

#[tokio::test]
async fn deleted_identity_still_listed_shows_null_ids() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    em.with_state(|s| s.identities.remove(&uami("id-a").to_lowercase()));
    let a = get(&em, &tok, &vmss_id()).await;
    assert_eq!(
        a.body["identity"]["userAssignedIdentities"][uami("id-a")]["clientId"],
        Value::Null
    );
}

async fn delete(em: &Emulator, token: &str, id: &str) -> Answer {
    answer(
        client(em)
            .delete(url(em, id, V))
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Polls an operation by its Retry-After until it is no longer running.
async fn finish(em: &Emulator, token: &str, accepted: &Answer) -> Answer {
    let op_url = accepted.header("azure-asyncoperation").unwrap().to_owned();
    loop {
        let op = answer(client(em).get(&op_url).bearer_auth(token).send().await.unwrap()).await;
        if op.body["status"] != "InProgress" {
            return op;
        }
        let secs: u64 = op.header("retry-after").unwrap_or("1").parse().unwrap();
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
}

#[tokio::test]
async fn a_deleted_machine_reads_deleting_refuses_changes_then_is_not_found() {
    // Long enough that a loaded machine still sees the deletion running.
    let em = start_with(|c| c.settings.lro_duration_ms = 3000).await;
    let tok = ctl_token(&em).await;
    for id in [vm_id(), vmss_id()] {
        let accepted = delete(&em, &tok, &id).await;
        assert_eq!(accepted.status, 202, "{}", accepted.text);
        assert!(accepted.text.is_empty());
        let deleting = get(&em, &tok, &id).await;
        assert_eq!(deleting.status, 200);
        assert_eq!(deleting.body["properties"]["provisioningState"], "Deleting");
        let refused = patch(&em, &tok, &id, &adds(&[uami("id-b")])).await;
        assert_eq!((refused.status, refused.code()), (409, "OperationNotAllowed"));
        assert!(
            refused.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("marked for deletion")
        );
        assert_eq!(finish(&em, &tok, &accepted).await.body["status"], "Succeeded");
        let gone = get(&em, &tok, &id).await;
        assert_eq!(
            (gone.status, gone.code()),
            (404, "ResourceNotFound"),
            "{}",
            gone.text
        );
        let gone = patch(&em, &tok, &id, &adds(&[uami("id-b")])).await;
        assert_eq!((gone.status, gone.code()), (404, "ResourceNotFound"));
        // DELETE is idempotent: nothing left to delete.
        assert_eq!(delete(&em, &tok, &id).await.status, 204);
    }
    // The scale set's instances went with it.
    let imds = plain_client()
        .get(format!(
            "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net&client_id={}",
            em.imds_url(0).unwrap(),
            client_of("id-a")
        ))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_ne!(imds.status(), 200);
}

#[tokio::test]
async fn scale_in_removes_instances_and_keeps_the_scale_set_and_its_identities() {
    let em = start().await;
    let tok = ctl_token(&em).await;
    let unknown = answer(
        client(&em)
            .post(format!("{}{}/delete?api-version={V}", em.azure_url(), vmss_id()))
            .bearer_auth(&tok)
            .json(&json!({"instanceIds": ["7"]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((unknown.status, unknown.code()), (400, "InvalidParameter"));
    let batch = answer(
        client(&em)
            .post(format!("{}{}/delete?api-version={V}", em.azure_url(), vmss_id()))
            .bearer_auth(&tok)
            .json(&json!({"instanceIds": ["1"]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(batch.status, 202, "{}", batch.text);
    let one = delete(&em, &tok, &instance_id(0)).await;
    assert_eq!(one.status, 202, "{}", one.text);
    let set = get(&em, &tok, &vmss_id()).await;
    assert_eq!(set.body["sku"]["capacity"], 0);
    assert_eq!(set.body["properties"]["provisioningState"], "Succeeded");
    assert!(set.body["identity"]["userAssignedIdentities"][uami("id-a")].is_object());
}

#[tokio::test]
async fn deleting_needs_the_delete_permission() {
    let em = start().await;
    let reader = entra_token(&em, READER_CLIENT, SECRET, "https://management.azure.com/").await;
    let refused = delete(&em, &reader, &vmss_id()).await;
    assert_eq!((refused.status, refused.code()), (403, "AuthorizationFailed"));
    assert!(
        refused
            .text
            .contains("Microsoft.Compute/virtualMachineScaleSets/delete")
    );
    let tok = ctl_token(&em).await;
    assert_eq!(get(&em, &tok, &vmss_id()).await.status, 200, "still there");
}
