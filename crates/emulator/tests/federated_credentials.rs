//! ARM federated identity credentials on user-assigned identities: CRUD at the real paths, paging, every
//! rule and refusal in ARM's shape, authorization, the concurrent-write conflict, fault injection and the
//! request log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use pod_identity_emulator::seed::{ApplicationSeed, RoleAssignmentSeed};
use pod_identity_emulator::{Emulator, FaultSpec, LogFilter, Service};
use serde_json::{Value, json};

const V: &str = "2024-11-30";
const WRITER_CLIENT: &str = "c0000000-0000-0000-0000-000000000009";
const WRITER_OBJECT: &str = "c0000000-0000-0000-0000-0000000000f9";
const AUD: &str = "api://AzureADTokenExchange";

fn fics(identity: &str) -> String {
    format!("{}/federatedIdentityCredentials", uami(identity))
}

fn fic(identity: &str, name: &str) -> String {
    format!("{}/{name}", fics(identity))
}

fn body(issuer: &str, subject: &str) -> Value {
    json!({"properties": {"issuer": issuer, "subject": subject, "audiences": [AUD]}})
}

/// An app registration with Contributor on the subscription (what may write federated credentials), and
/// an ARM token for it.
async fn writer(em: &Emulator) -> String {
    em.with_state(|s| {
        for t in s.tenants.values_mut() {
            t.applications.push(ApplicationSeed {
                display_name: "fic-writer".into(),
                client_id: WRITER_CLIENT.into(),
                object_id: WRITER_OBJECT.into(),
                secrets: vec![SECRET.into()],
                ..ApplicationSeed::default()
            });
        }
        s.role_assignments.push(RoleAssignmentSeed {
            principal_id: WRITER_OBJECT.into(),
            scope: format!("/subscriptions/{SUB}"),
            role_definition_name: "Contributor".into(),
        });
    });
    entra_token(em, WRITER_CLIENT, SECRET, "https://management.azure.com/").await
}

async fn call(
    em: &Emulator,
    token: &str,
    method: reqwest::Method,
    path: &str,
    version: &str,
    b: Option<&Value>,
) -> Answer {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut req = client(em)
        .request(
            method,
            format!("{}{path}{sep}api-version={version}", em.azure_url()),
        )
        .bearer_auth(token);
    if let Some(b) = b {
        req = req.json(b);
    }
    answer(req.send().await.unwrap()).await
}

async fn put(em: &Emulator, token: &str, path: &str, b: &Value) -> Answer {
    call(em, token, reqwest::Method::PUT, path, V, Some(b)).await
}

async fn get(em: &Emulator, token: &str, path: &str) -> Answer {
    call(em, token, reqwest::Method::GET, path, V, None).await
}

async fn delete(em: &Emulator, token: &str, path: &str) -> Answer {
    call(em, token, reqwest::Method::DELETE, path, V, None).await
}

#[tokio::test]
async fn credentials_are_created_read_listed_updated_and_deleted_at_arm_paths() {
    let em = start().await;
    let tok = writer(&em).await;
    let created = put(
        &em,
        &tok,
        &fic("id-a", "kube-sa"),
        &body("https://issuer.example", "system:serviceaccount:ns:sa"),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(
        created.body,
        json!({
            "id": format!("/subscriptions/{SUB}/resourcegroups/{RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-a/federatedIdentityCredentials/kube-sa"),
            "name": "kube-sa",
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
            "properties": {"issuer": "https://issuer.example", "subject": "system:serviceaccount:ns:sa", "audiences": [AUD]},
        })
    );
    // Resource names and path segments compare case-insensitively; the name keeps its first spelling.
    let updated = put(
        &em,
        &tok,
        &fic("id-a", "KUBE-SA").to_lowercase(),
        &body("https://issuer.example", "system:serviceaccount:ns:other"),
    )
    .await;
    assert_eq!(updated.status, 200, "{}", updated.text);
    assert_eq!(updated.body["name"], "kube-sa");
    let read = get(&em, &tok, &fic("id-a", "kube-sa")).await;
    assert_eq!(
        (read.status, &read.body["properties"]["subject"]),
        (200, &json!("system:serviceaccount:ns:other"))
    );
    let listed = get(&em, &tok, &fics("id-a")).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(listed.body["value"].as_array().unwrap().len(), 1);
    assert!(listed.body.get("nextLink").is_none());
    assert_eq!(get(&em, &tok, &fics("id-b")).await.body, json!({"value": []}));
    let deleted = delete(&em, &tok, &fic("id-a", "kube-sa")).await;
    assert_eq!((deleted.status, deleted.text.as_str()), (200, ""));
    assert_eq!(
        delete(&em, &tok, &fic("id-a", "kube-sa")).await.status,
        204,
        "deleting what is gone"
    );
    let gone = get(&em, &tok, &fic("id-a", "kube-sa")).await;
    assert_eq!(
        (gone.status, gone.code()),
        (404, "ResourceNotFound"),
        "{}",
        gone.text
    );
    // Every stable api-version with the type works.
    for version in ["2023-01-31", "2022-01-31-preview", "2026-05-31"] {
        let a = call(&em, &tok, reqwest::Method::GET, &fics("id-a"), version, None).await;
        assert_eq!(a.status, 200, "{version}: {}", a.text);
    }
}

#[tokio::test]
async fn writes_that_break_a_rule_get_arm_errors() {
    let em = start().await;
    let tok = writer(&em).await;
    let ok = body("https://issuer.example", "sub-0");
    assert_eq!(put(&em, &tok, &fic("id-a", "fic-00"), &ok).await.status, 201);
    let two_audiences = json!({"properties": {"issuer": "https://i.example", "subject": "s", "audiences": [AUD, "api://other"]}});
    let cases: Vec<(&str, String, Value, u16, &str, &str)> = vec![
        (
            "duplicate issuer and subject",
            fic("id-a", "fic-dup"),
            ok.clone(),
            400,
            "Conflict",
            "Issuer and subject combination already exists for this Managed Identity.",
        ),
        (
            "name too short",
            fic("id-a", "ab"),
            body("https://i.example", "s"),
            400,
            "BadRequest",
            "Federated Identity Credential name 'ab' is invalid.",
        ),
        (
            "name with a dot",
            fic("id-a", "a.bc"),
            body("https://i.example", "s"),
            400,
            "BadRequest",
            "Federated Identity Credential name 'a.bc' is invalid.",
        ),
        (
            "two audiences",
            fic("id-a", "fic-aud"),
            two_audiences,
            400,
            "BadRequest",
            "Federated identity credentials must have exactly one audience.",
        ),
        (
            "no subject",
            fic("id-a", "fic-sub"),
            json!({"properties": {"issuer": "https://i.example", "audiences": [AUD]}}),
            400,
            "BadRequest",
            "The request format was unexpected. Federated Identity Credential must specify 'issuer', 'subject' and 'audience'.",
        ),
        (
            "empty properties",
            fic("id-a", "fic-empty"),
            json!({"properties": {}}),
            400,
            "BadRequest",
            "Federated Identity Credential from HTTP body has empty properties",
        ),
        (
            "missing parent",
            fic("id-missing", "fic-x"),
            ok.clone(),
            404,
            "ParentResourceNotFound",
            "because the parent resource",
        ),
        (
            "missing group",
            fic("id-a", "fic-x").replace(RG, "rg-gone"),
            ok.clone(),
            404,
            "ResourceGroupNotFound",
            "Resource group 'rg-gone' could not be found.",
        ),
    ];
    for (what, path, b, status, code, message) in cases {
        let a = put(&em, &tok, &path, &b).await;
        assert_eq!((a.status, a.code()), (status, code), "{what}: {}", a.text);
        assert!(
            a.body["error"]["message"].as_str().unwrap().contains(message),
            "{what}: {}",
            a.text
        );
    }
    let not_json = answer(
        client(&em)
            .put(format!(
                "{}{}?api-version={V}",
                em.azure_url(),
                fic("id-a", "fic-json")
            ))
            .bearer_auth(&tok)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((not_json.status, not_json.code()), (400, "InvalidRequestContent"));
    let old = call(&em, &tok, reqwest::Method::GET, &fics("id-a"), "2018-11-30", None).await;
    assert_eq!(
        (old.status, old.code()),
        (400, "NoRegisteredProviderFound"),
        "{}",
        old.text
    );
    let post = call(
        &em,
        &tok,
        reqwest::Method::POST,
        &fic("id-a", "fic-00"),
        V,
        Some(&ok),
    )
    .await;
    assert_eq!((post.status, post.code()), (405, "MethodNotAllowed"));
    // The twentieth credential is the last.
    for n in 1..20 {
        let a = put(
            &em,
            &tok,
            &fic("id-a", &format!("fic-{n:02}")),
            &body("https://issuer.example", &format!("sub-{n}")),
        )
        .await;
        assert_eq!(a.status, 201, "credential {n}: {}", a.text);
    }
    let over = put(
        &em,
        &tok,
        &fic("id-a", "fic-20"),
        &body("https://issuer.example", "sub-20"),
    )
    .await;
    assert_eq!((over.status, over.code()), (400, "BadRequest"), "{}", over.text);
    assert!(over.text.contains("maximum of 20"), "{}", over.text);
    assert_eq!(
        get(&em, &tok, &fics("id-a")).await.body["value"]
            .as_array()
            .unwrap()
            .len(),
        20
    );
    // Another identity has its own twenty.
    assert_eq!(put(&em, &tok, &fic("id-b", "fic-00"), &ok).await.status, 201);
}

#[tokio::test]
async fn roles_decide_who_reads_and_who_writes() {
    let em = start().await;
    let writer_tok = writer(&em).await;
    assert_eq!(
        put(
            &em,
            &writer_tok,
            &fic("id-a", "fic-1"),
            &body("https://i.example", "s")
        )
        .await
        .status,
        201
    );
    // Reader (subscription) and Managed Identity Operator (the controller, resource group) read; neither writes.
    for (who, tok) in [
        (
            "reader",
            entra_token(&em, READER_CLIENT, SECRET, "https://management.azure.com/").await,
        ),
        ("operator", ctl_token(&em).await),
    ] {
        assert_eq!(get(&em, &tok, &fics("id-a")).await.status, 200, "{who}");
        assert_eq!(get(&em, &tok, &fic("id-a", "fic-1")).await.status, 200, "{who}");
        let denied = put(&em, &tok, &fic("id-a", "fic-2"), &body("https://i.example", "t")).await;
        assert_eq!(
            (denied.status, denied.code()),
            (403, "AuthorizationFailed"),
            "{who}: {}",
            denied.text
        );
        assert!(
            denied.text.contains(
                "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/write"
            ),
            "{who}: {}",
            denied.text
        );
        let denied = delete(&em, &tok, &fic("id-a", "fic-1")).await;
        assert!(
            denied.text.contains("federatedIdentityCredentials/delete"),
            "{who}: {}",
            denied.text
        );
    }
    // A role on the scale set only covers nothing under the identity.
    let nobody = entra_token(&em, NOBODY_CLIENT, SECRET, "https://management.azure.com/").await;
    let a = get(&em, &nobody, &fics("id-a")).await;
    assert_eq!((a.status, a.code()), (403, "AuthorizationFailed"));
    assert!(a.text.contains("federatedIdentityCredentials/read"), "{}", a.text);
    let a = answer(
        client(&em)
            .get(format!("{}{}?api-version={V}", em.azure_url(), fics("id-a")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((a.status, a.code()), (401, "AuthenticationFailed"));
}

#[tokio::test]
async fn lists_page_with_top_and_the_next_link() {
    let em = start().await;
    let tok = writer(&em).await;
    for n in ["c", "a", "e", "b", "d"] {
        assert_eq!(
            put(
                &em,
                &tok,
                &fic("id-a", &format!("fic-{n}")),
                &body("https://i.example", n)
            )
            .await
            .status,
            201
        );
    }
    let mut names = Vec::new();
    let mut next = Some(format!(
        "{}{}?api-version={V}&$top=2",
        em.azure_url(),
        fics("id-a")
    ));
    let mut pages = 0;
    while let Some(link) = next {
        let a = answer(client(&em).get(&link).bearer_auth(&tok).send().await.unwrap()).await;
        assert_eq!(a.status, 200, "{link}: {}", a.text);
        names.extend(
            a.body["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["name"].as_str().unwrap().to_owned()),
        );
        next = a.body["nextLink"].as_str().map(str::to_owned);
        if let Some(n) = &next {
            assert!(n.starts_with(&em.azure_url()) && n.contains("$skiptoken="), "{n}");
        }
        pages += 1;
    }
    assert_eq!(names, ["fic-a", "fic-b", "fic-c", "fic-d", "fic-e"]);
    assert_eq!(pages, 3);
    for bad in ["0", "x"] {
        let a = get(&em, &tok, &format!("{}?$top={bad}", fics("id-a"))).await;
        assert_eq!((a.status, a.code()), (400, "BadRequest"), "{bad}: {}", a.text);
    }
}

#[tokio::test]
async fn concurrent_writes_under_one_identity_conflict_and_other_identities_do_not() {
    let em = start_with(|c| c.settings.federation.credential_write_ms = 2_000).await;
    let tok = writer(&em).await;
    let first = {
        let (url, tok) = (
            format!("{}{}?api-version={V}", em.azure_url(), fic("id-a", "fic-1")),
            tok.clone(),
        );
        let http = client(&em);
        tokio::spawn(async move {
            http.put(url)
                .bearer_auth(tok)
                .json(&body("https://i.example", "one"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    pod_identity_test_support::eventually(|| async {
        em.with_state(|s| s.uami(&uami("id-a")).unwrap().credential_write_until.is_some())
            .then_some(())
            .ok_or("the first write has not started")
    })
    .await
    .unwrap();
    let second = put(
        &em,
        &tok,
        &fic("id-a", "fic-2"),
        &body("https://i.example", "two"),
    )
    .await;
    assert_eq!(
        (second.status, second.code()),
        (
            409,
            "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity"
        ),
        "{}",
        second.text
    );
    assert!(
        second.text.contains(&uami("id-a").to_lowercase()),
        "{}",
        second.text
    );
    let del = delete(&em, &tok, &fic("id-a", "fic-1")).await;
    assert_eq!(del.status, 409, "a delete is a write too");
    let other = put(
        &em,
        &tok,
        &fic("id-b", "fic-1"),
        &body("https://i.example", "one"),
    )
    .await;
    assert_eq!(
        other.status, 201,
        "another identity is written in parallel: {}",
        other.text
    );
    assert_eq!(first.await.unwrap(), 201);
    // Sequential writes after the first finished go through.
    em.update_settings(|s| s.federation.credential_write_ms = 0);
    assert_eq!(
        put(
            &em,
            &tok,
            &fic("id-a", "fic-2"),
            &body("https://i.example", "two")
        )
        .await
        .status,
        201
    );
}

#[tokio::test]
async fn faults_hit_the_routes_and_the_log_names_the_credential() {
    let em = start().await;
    let tok = writer(&em).await;
    let since = em.last_seq();
    let fault = em.inject(FaultSpec {
        service: Some(Service::Arm),
        path_contains: Some("federatedIdentityCredentials".into()),
        status: Some(503),
        retry_after: Some(3),
        times: Some(1),
        ..FaultSpec::default()
    });
    let a = put(&em, &tok, &fic("id-a", "fic-1"), &body("https://i.example", "s")).await;
    assert_eq!(
        (a.status, a.code(), a.header("retry-after")),
        (503, "ServiceUnavailable", Some("3"))
    );
    assert_eq!(
        put(&em, &tok, &fic("id-a", "fic-1"), &body("https://i.example", "s"))
            .await
            .status,
        201
    );
    let log = em.requests(&LogFilter {
        since: Some(since),
        path_contains: Some("federatedIdentityCredentials".into()),
        ..LogFilter::default()
    });
    assert_eq!(
        log.iter()
            .map(|r| (r.method.as_str(), r.status, r.fault))
            .collect::<Vec<_>>(),
        [("PUT", 503, Some(fault)), ("PUT", 201, None)]
    );
    let key = fic("id-a", "fic-1").to_lowercase();
    assert!(
        log.iter().all(|r| r.resource.as_deref() == Some(key.as_str())),
        "{log:?}"
    );
    assert_eq!(em.counters().by_resource.get(&key), Some(&2));
}

#[tokio::test]
async fn seeded_credentials_are_served_and_exported() {
    let em = start().await;
    let mut seed = em.snapshot();
    let rg = &mut seed.subscriptions[0].resource_groups[0];
    let ident = rg
        .user_assigned_identities
        .iter_mut()
        .find(|u| u.name == "id-c")
        .unwrap();
    ident
        .federated_identity_credentials
        .push(pod_identity_emulator::seed::FederatedCredentialSeed {
            name: "seeded".into(),
            issuer: "https://issuer.example".into(),
            subject: "system:serviceaccount:ns:sa".into(),
            audiences: vec![AUD.into()],
        });
    em.replace_state(&seed).unwrap();
    let tok = ctl_token(&em).await;
    let a = get(&em, &tok, &fics("id-c")).await;
    assert_eq!(a.body["value"][0]["name"], "seeded", "{}", a.text);
    let exported = em.snapshot();
    let c = exported.subscriptions[0].resource_groups[0]
        .user_assigned_identities
        .iter()
        .find(|u| u.name == "id-c")
        .unwrap();
    assert_eq!(
        c.federated_identity_credentials[0].subject,
        "system:serviceaccount:ns:sa"
    );
}
