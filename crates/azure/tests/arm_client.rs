//! The ARM client against the emulator on loopback: identity reads and delta updates, long-running
//! operations, chunking, and each failure the emulator can produce, sorted into its error kind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../emulator/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pod_identity_azure::{
    ArmClient, ArmConfig, AzureError, CachedTokens, ClientCredential, EntraClient, HttpConfig, Machine,
    RetryPolicy,
};
use pod_identity_emulator::{Emulator, FaultSpec, LogFilter, Service};
use pod_identity_test_support::eventually;

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_retry_after: Duration::from_secs(2),
    }
}

fn arm_as(em: &Emulator, client_id: &str, secret: &str) -> ArmClient {
    arm_with(em, client_id, secret, fast_retry())
}

fn arm_with(em: &Emulator, client_id: &str, secret: &str, retry: RetryPolicy) -> ArmClient {
    let http = HttpConfig::default().with_ca_pem(em.ca_pem()).build().unwrap();
    let entra = EntraClient::new(
        http.clone(),
        &em.azure_url(),
        TENANT,
        client_id,
        ClientCredential::Secret(secret.into()),
    )
    .unwrap()
    .with_retry(fast_retry());
    let cfg = ArmConfig {
        endpoint: em.azure_url(),
        retry,
        poll_interval: Duration::from_millis(100),
        ..ArmConfig::default()
    };
    ArmClient::new(http, cfg, Arc::new(CachedTokens::new(entra)))
}

fn arm(em: &Emulator) -> ArmClient {
    arm_as(em, CTL_CLIENT, CTL_SECRET)
}

fn arm_requests(em: &Emulator, method: &str) -> usize {
    em.requests(&LogFilter {
        service: Some(Service::Arm),
        ..LogFilter::default()
    })
    .iter()
    .filter(|r| r.method == method)
    .count()
}

fn vmss() -> Machine {
    Machine::from_arm_id(&vmss_id()).unwrap()
}

#[tokio::test]
async fn reads_identities_of_scale_sets_and_vms() {
    let em = start().await;
    let c = arm(&em);
    let ss = c.get_identity(&vmss()).await.unwrap();
    assert!(ss.kind.user && !ss.kind.system);
    assert_eq!(
        ss.user_assigned[&uami("id-a").to_lowercase()]
            .client_id
            .as_deref(),
        Some(client_of("id-a").as_str())
    );
    let vm = c
        .get_identity(&Machine::virtual_machine(SUB, RG, VM))
        .await
        .unwrap();
    assert!(vm.kind.system);
    assert_eq!(vm.principal_id.as_deref(), Some(VM_SYS_PRINCIPAL));
    let u = c.get_user_assigned_identity(&uami("id-b")).await.unwrap();
    assert_eq!(
        (u.client_id, u.principal_id, u.tenant_id),
        (client_of("id-b"), principal_of("id-b"), TENANT.to_string())
    );
}

#[tokio::test]
async fn update_sends_only_the_delta_and_nothing_when_nothing_changes() {
    let em = start().await;
    let c = arm(&em);
    let out = c.update_identities(&vmss(), &[uami("id-b")], &[]).await.unwrap();
    assert_eq!(out.patches, 1);
    assert_eq!(out.identity.user_assigned.len(), 2, "id-a was left alone");
    let out = c
        .update_identities(
            &vmss(),
            &[uami("id-b")
                .to_uppercase()
                .replace("SUBSCRIPTIONS", "subscriptions")],
            &[uami("id-c")],
        )
        .await
        .unwrap();
    assert_eq!(
        out.patches, 0,
        "already assigned, and id-c is not there to remove"
    );
    assert_eq!(arm_requests(&em, "PATCH"), 1);
    let out = c
        .update_identities(&vmss(), &[], &[uami("id-a"), uami("id-b")])
        .await
        .unwrap();
    assert_eq!(out.patches, 1);
    assert!(!out.identity.kind.user && out.identity.user_assigned.is_empty());
    // The VM keeps its system identity through adds and removes.
    let vm = Machine::virtual_machine(SUB, RG, VM);
    let out = c.update_identities(&vm, &[uami("id-c")], &[]).await.unwrap();
    assert!(out.identity.kind.system && out.identity.kind.user);
    let out = c.update_identities(&vm, &[], &[uami("id-c")]).await.unwrap();
    assert!(out.identity.kind.system && !out.identity.kind.user);
}

#[tokio::test]
async fn more_than_150_changes_go_in_chunks() {
    let em = start().await;
    let c = arm(&em);
    let bulk: Vec<String> = (0..200).map(|n| uami(&format!("bulk-{n:03}"))).collect();
    let out = c.update_identities(&vmss(), &bulk, &[]).await.unwrap();
    assert_eq!(out.patches, 2);
    assert_eq!(out.identity.user_assigned.len(), 201);
    assert_eq!(arm_requests(&em, "PATCH"), 2);
    assert!(
        em.requests(&LogFilter::default()).iter().all(|r| r.status < 400),
        "no request was refused"
    );
}

#[tokio::test]
async fn waits_for_the_long_running_operation() {
    let em = start_with(|c| c.settings.lro_duration_ms = 300).await;
    let c = arm(&em);
    let out = c.update_identities(&vmss(), &[uami("id-b")], &[]).await.unwrap();
    assert_eq!(out.identity.provisioning_state.as_deref(), Some("Succeeded"));
    let polls = em.requests(&LogFilter {
        path_contains: Some("/operations/".into()),
        ..LogFilter::default()
    });
    assert!(!polls.is_empty(), "the operation was polled");
    // Once the update returns, the instances have the identity.
    let imds = pod_identity_azure::ImdsClient::new(&em.imds_url(0).unwrap())
        .unwrap()
        .with_retry(RetryPolicy::none());
    let t = imds
        .token(
            "https://vault.azure.net",
            &pod_identity_azure::IdentitySelector::ClientId(client_of("id-b")),
        )
        .await;
    assert!(t.is_ok(), "{t:?}");
}

#[tokio::test]
async fn another_operation_in_progress_is_retried() {
    let em = start_with(|c| c.settings.lro_duration_ms = 200).await;
    let c = arm(&em);
    let (target, request) = (
        vmss(),
        pod_identity_azure::IdentityDelta {
            add: vec![uami("id-b")],
            ..Default::default()
        },
    );
    let slow = c.patch_identity(&target, &request, None);
    // Retries that outlast the first operation (200 ms) whatever the jitter: at least 10 + 20 + 40 + 7 × 50 ms.
    let c2 = arm_with(
        &em,
        CTL_CLIENT,
        CTL_SECRET,
        RetryPolicy {
            max_retries: 10,
            ..fast_retry()
        },
    );
    let (a, b) = tokio::join!(slow, async {
        // Once the first update's operation is running.
        eventually(|| async {
            if em.with_state(|state| state.operations.is_empty()) {
                Err("the first update has not started its operation yet")
            } else {
                Ok(())
            }
        })
        .await
        .unwrap();
        c2.update_identities(&vmss(), &[uami("id-c")], &[]).await
    });
    a.unwrap();
    let b = b.unwrap();
    assert!(b.identity.has(&uami("id-c")));
    let conflicts = em.requests(&LogFilter {
        status: Some(409),
        ..LogFilter::default()
    });
    assert!(
        !conflicts.is_empty(),
        "the second update met the first one's operation"
    );
}

/// A conditional PATCH goes through while the entity tag it was read with is current and is refused with
/// 412 once someone else changed the scale set: the If-Match conditional updates need.
#[tokio::test]
async fn if_match_is_sent_and_a_stale_entity_tag_is_a_conflict() {
    let em = start().await;
    let c = arm(&em);
    let read = c.get_identity(&vmss()).await.unwrap();
    let etag = read.etag.clone().expect("ARM sends an entity tag");
    let add = |id: &str| pod_identity_azure::IdentityDelta {
        add: vec![uami(id)],
        users_before: read.user_assigned.len(),
        ..Default::default()
    };
    let after = c
        .patch_identity(&vmss(), &add("id-b"), Some(&etag))
        .await
        .unwrap();
    assert!(after.has(&uami("id-b")));
    assert_ne!(
        after.etag.as_deref(),
        Some(etag.as_str()),
        "the change made a new entity tag"
    );
    let err = c
        .patch_identity(&vmss(), &add("id-c"), Some(&etag))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AzureError::Conflict { status: 412, code, .. } if code == "PreconditionFailed"),
        "{err}"
    );
    assert!(!err.is_retryable(), "a stale read is read again, not resent");
    let now = c.get_identity(&vmss()).await.unwrap();
    assert!(!now.has(&uami("id-c")), "the refused change was not applied");
    assert_eq!(now.etag, after.etag, "nothing changed since the accepted change");
    let refused = em.requests(&LogFilter {
        status: Some(412),
        ..LogFilter::default()
    });
    assert_eq!(refused.len(), 1, "{refused:?}");
}

#[tokio::test]
async fn short_retry_after_is_waited_out_and_the_call_succeeds() {
    let em = start().await;
    let c = arm(&em);
    em.inject(FaultSpec {
        service: Some(Service::Arm),
        method: Some("GET".into()),
        status: Some(429),
        retry_after: Some(1),
        times: Some(1),
        ..FaultSpec::default()
    });
    let r = c.get_identity(&vmss()).await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(
        em.requests(&LogFilter {
            status: Some(429),
            ..LogFilter::default()
        })
        .len(),
        1
    );
}

#[tokio::test]
async fn long_retry_after_is_returned_and_later_calls_fail_fast() {
    let em = start().await;
    let c = arm(&em);
    em.inject(FaultSpec {
        service: Some(Service::Arm),
        method: Some("GET".into()),
        status: Some(429),
        retry_after: Some(120),
        times: Some(1),
        ..FaultSpec::default()
    });
    let err = c.get_identity(&vmss()).await.unwrap_err();
    assert!(
        matches!(err, AzureError::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(120)),
        "{err}"
    );
    let before = arm_requests(&em, "GET");
    let err = c.get_identity(&vmss()).await.unwrap_err();
    assert!(
        matches!(err, AzureError::Throttled { retry_after: Some(d), .. } if d > Duration::from_secs(100)),
        "{err}"
    );
    assert_eq!(
        arm_requests(&em, "GET"),
        before,
        "no request while the Retry-After runs"
    );
}

#[tokio::test]
async fn emulator_throttling_of_updates_surfaces_as_throttled() {
    let em = start_with(|c| {
        let p = c
            .settings
            .throttling
            .compute
            .get_mut(&pod_identity_emulator::throttle::Policy::UpdateVmss)
            .unwrap();
        p.per_resource = pod_identity_emulator::throttle::BucketLimit::new(1.0, 1.0);
    })
    .await;
    let c = arm(&em);
    c.update_identities(&vmss(), &[uami("id-b")], &[]).await.unwrap();
    let err = c
        .update_identities(&vmss(), &[uami("id-c")], &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, AzureError::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(60)),
        "{err}"
    );
}

#[tokio::test]
async fn transient_failures_are_retried_until_they_pass_or_the_budget_ends() {
    let em = start().await;
    let c = arm(&em);
    for status in [500u16, 502, 503, 504] {
        em.inject(FaultSpec {
            service: Some(Service::Arm),
            status: Some(status),
            times: Some(2),
            ..FaultSpec::default()
        });
        assert!(
            c.get_identity(&vmss()).await.is_ok(),
            "{status} twice then success"
        );
    }
    em.inject(FaultSpec {
        service: Some(Service::Arm),
        method: Some("PATCH".into()),
        status: Some(503),
        ..FaultSpec::default()
    });
    let err = c
        .update_identities(&vmss(), &[uami("id-b")], &[])
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
    assert_eq!(arm_requests(&em, "PATCH"), 4, "first attempt and three retries");
    em.clear_faults();
    em.inject(FaultSpec {
        service: Some(Service::Arm),
        status: Some(410),
        times: Some(1),
        ..FaultSpec::default()
    });
    let err = c.get_identity(&vmss()).await.unwrap_err();
    assert!(
        matches!(err, AzureError::Other { status: 410, .. }),
        "410 from ARM is no transient: {err}"
    );
}

#[tokio::test]
async fn slow_answers_time_out_as_transient() {
    let em = start().await;
    let http = HttpConfig {
        timeout: Duration::from_millis(200),
        ..HttpConfig::default().with_ca_pem(em.ca_pem())
    }
    .build()
    .unwrap();
    let entra = EntraClient::new(
        http.clone(),
        &em.azure_url(),
        TENANT,
        CTL_CLIENT,
        ClientCredential::Secret(CTL_SECRET.into()),
    )
    .unwrap();
    let cfg = ArmConfig {
        endpoint: em.azure_url(),
        retry: RetryPolicy::none(),
        ..ArmConfig::default()
    };
    let c = ArmClient::new(http, cfg, Arc::new(entra));
    em.inject(FaultSpec {
        service: Some(Service::Arm),
        latency_ms: Some(1000),
        times: Some(1),
        ..FaultSpec::default()
    });
    let err = c.get_identity(&vmss()).await.unwrap_err();
    assert!(
        matches!(err, AzureError::Transient { status: None, ref code, .. } if code == "Timeout"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_identity_is_rejected_naming_it() {
    let em = start().await;
    let c = arm(&em);
    let err = c
        .update_identities(&vmss(), &[uami("ghost"), uami("id-b")], &[])
        .await
        .unwrap_err();
    assert!(matches!(err, AzureError::IdentitiesRejected { .. }), "{err}");
    assert_eq!(err.identities(), [uami("ghost")]);
}

#[tokio::test]
async fn missing_rights_are_unauthorized_and_linked_ones_name_the_identity() {
    let em = start().await;
    let reader = arm_as(&em, READER_CLIENT, SECRET);
    let err = reader
        .update_identities(&vmss(), &[uami("id-b")], &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, AzureError::Unauthorized { status: 403, ref code, .. } if code == "AuthorizationFailed"),
        "{err}"
    );
    let nobody = arm_as(&em, NOBODY_CLIENT, SECRET);
    let err = nobody
        .update_identities(&vmss(), &[uami("id-b")], &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, AzureError::IdentitiesRejected { ref code, .. } if code == "LinkedAuthorizationFailed"),
        "{err}"
    );
    assert_eq!(err.identities(), [uami("id-b")]);
    let bad_secret = arm_as(&em, CTL_CLIENT, "wrong");
    let err = bad_secret.get_identity(&vmss()).await.unwrap_err();
    assert!(
        matches!(err, AzureError::Unauthorized { status: 401, ref code, .. } if code == "invalid_client"),
        "{err}"
    );
    let now = jiff::Timestamp::now().as_second();
    let expired = em.mint_token(&pod_identity_emulator::Claims::app(
        "https://management.azure.com/",
        TENANT,
        CTL_OBJECT,
        CTL_CLIENT,
        "1",
        now - 7200,
        3600,
    ));
    let http = HttpConfig::default().with_ca_pem(em.ca_pem()).build().unwrap();
    let c = ArmClient::new(
        http,
        ArmConfig {
            endpoint: em.azure_url(),
            ..ArmConfig::default()
        },
        Arc::new(pod_identity_azure::StaticToken(pod_identity_azure::AccessToken {
            token: expired,
            expires_on: now,
        })),
    );
    let err = c.get_identity(&vmss()).await.unwrap_err();
    assert!(
        matches!(err, AzureError::Unauthorized { status: 401, ref code, .. } if code == "ExpiredAuthenticationToken"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_scale_set_is_resource_not_found() {
    let em = start().await;
    let err = arm(&em)
        .get_identity(&Machine::scale_set(SUB, RG, "gone"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, AzureError::ResourceNotFound { ref code, .. } if code == "ResourceNotFound"),
        "{err}"
    );
}

#[tokio::test]
async fn managed_identity_token_source_drives_arm() {
    let em = start().await;
    // Give the scale set's identity the right to read itself.
    em.with_state(|s| {
        s.role_assignments
            .push(pod_identity_emulator::seed::RoleAssignmentSeed {
                principal_id: principal_of("id-a"),
                scope: vmss_id(),
                role_definition_name: "Reader".into(),
            })
    });
    let mi = pod_identity_azure::ManagedIdentity {
        client: pod_identity_azure::ImdsClient::new(&em.imds_url(0).unwrap()).unwrap(),
        selector: pod_identity_azure::IdentitySelector::ClientId(client_of("id-a")),
    };
    let http = HttpConfig::default().with_ca_pem(em.ca_pem()).build().unwrap();
    let c = ArmClient::new(
        http,
        ArmConfig {
            endpoint: em.azure_url(),
            ..ArmConfig::default()
        },
        Arc::new(mi),
    );
    assert!(c.get_identity(&vmss()).await.is_ok());
}

#[tokio::test]
async fn federated_credentials_are_listed_written_and_deleted_within_arms_limit() {
    use pod_identity_azure::arm::federated_credentials::is_concurrent_write;
    let em = start().await;
    let c = arm(&em);
    let identity = uami("id-a");
    let denied = c
        .put_federated_credential(
            &identity,
            "kube",
            "https://issuer.example",
            "system:serviceaccount:n:a",
            "api://AzureADTokenExchange",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(denied, AzureError::Unauthorized { status: 403, .. }),
        "Managed Identity Operator may not write them: {denied:?}"
    );
    em.with_state(|s| {
        s.role_assignments
            .push(pod_identity_emulator::seed::RoleAssignmentSeed {
                principal_id: CTL_OBJECT.into(),
                scope: rg_id(),
                role_definition_name: "Contributor".into(),
            })
    });
    assert!(c.list_federated_credentials(&identity).await.unwrap().is_empty());
    for n in 0..20 {
        let written = c
            .put_federated_credential(
                &identity,
                &format!("fic-{n}"),
                "https://issuer.example",
                &format!("system:serviceaccount:n:a{n}"),
                "api://AzureADTokenExchange",
            )
            .await
            .unwrap();
        assert_eq!(written.name, format!("fic-{n}"));
    }
    let listed = c.list_federated_credentials(&identity).await.unwrap();
    assert_eq!(listed.len(), 20);
    let third = listed.iter().find(|f| f.name == "fic-3").unwrap();
    assert_eq!(third.subject, "system:serviceaccount:n:a3");
    assert_eq!(third.audiences, ["api://AzureADTokenExchange"]);
    let full = c
        .put_federated_credential(
            &identity,
            "fic-20",
            "https://issuer.example",
            "system:serviceaccount:n:a20",
            "api://AzureADTokenExchange",
        )
        .await
        .unwrap_err();
    assert!(matches!(full, AzureError::Other { status: 400, .. }), "{full:?}");
    assert!(full.to_string().contains("maximum of 20"), "{full}");
    assert!(!is_concurrent_write(&full));
    assert!(c.delete_federated_credential(&identity, "fic-0").await.unwrap());
    assert!(
        !c.delete_federated_credential(&identity, "fic-0").await.unwrap(),
        "204: nothing to delete"
    );
    assert_eq!(c.list_federated_credentials(&identity).await.unwrap().len(), 19);
}
