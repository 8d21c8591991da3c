//! IMDS as a VM or scale-set instance sees it: the token contract, identity selection, and every malformed
//! request answered the way IMDS answers it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use pod_identity_emulator::{LogFilter, Service};
use serde_json::Value;

const TOKEN: &str = "/metadata/identity/oauth2/token";

async fn get(
    em: &pod_identity_emulator::Emulator,
    listener: usize,
    path_and_query: &str,
    metadata: bool,
) -> Answer {
    let mut req = plain_client().get(format!("{}{path_and_query}", em.imds_url(listener).unwrap()));
    if metadata {
        req = req.header("Metadata", "true");
    }
    answer(req.send().await.unwrap()).await
}

fn token_query(extra: &str) -> String {
    format!("{TOKEN}?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net{extra}")
}

#[tokio::test]
async fn token_response_has_every_field_as_a_string() {
    let em = start().await;
    let a = get(&em, 0, &token_query(""), true).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.header("content-type"), Some("application/json; charset=utf-8"));
    for field in [
        "access_token",
        "refresh_token",
        "client_id",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    ] {
        assert!(a.body[field].is_string(), "{field} is not a string: {}", a.body);
    }
    assert_eq!(a.body["token_type"], "Bearer");
    assert_eq!(a.body["resource"], "https://vault.azure.net");
    assert_eq!(a.body["client_id"], client_of("id-a"));
    let expires_in: i64 = a.body["expires_in"].as_str().unwrap().parse().unwrap();
    assert!(
        expires_in > 300,
        "SDK caches treat tokens with 300 s or less as expired"
    );
    let claims = pod_identity_emulator::tokens::peek(a.body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims.aud, "https://vault.azure.net");
    assert_eq!(claims.tid, TENANT);
    assert_eq!(claims.oid, principal_of("id-a"));
    assert_eq!(claims.appid, client_of("id-a"));
    assert_eq!(claims.xms_mirid.as_deref(), Some(uami("id-a").as_str()));
    assert_eq!(claims.exp.to_string(), a.body["expires_on"].as_str().unwrap());
}

#[tokio::test]
async fn selects_the_identity_by_client_id_object_id_and_resource_id() {
    let em = start().await;
    let id = uami("id-a");
    for q in [
        format!("&client_id={}", client_of("id-a")),
        format!("&object_id={}", principal_of("id-a")),
        format!("&msi_res_id={}", id.to_lowercase()),
        format!("&mi_res_id={id}"),
    ] {
        let a = get(&em, 0, &token_query(&q), true).await;
        assert_eq!(a.status, 200, "{q}: {}", a.text);
        assert_eq!(a.body["client_id"], client_of("id-a"), "{q}");
    }
}

#[tokio::test]
async fn identity_not_assigned_to_this_instance_is_not_found() {
    let em = start().await;
    let a = get(
        &em,
        0,
        &token_query(&format!("&client_id={}", client_of("id-b"))),
        true,
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"], "invalid_request");
    assert_eq!(a.body["error_description"], "Identity not found");
    // The VM's system identity is not the scale set's.
    let a = get(&em, 0, &token_query(&format!("&client_id={VM_SYS_CLIENT}")), true).await;
    assert_eq!(a.body["error_description"], "Identity not found");
    // An identity that exists nowhere.
    let a = get(
        &em,
        0,
        &token_query("&object_id=00000000-0000-0000-0000-000000000000"),
        true,
    )
    .await;
    assert_eq!(a.status, 400);
}

#[tokio::test]
async fn vm_listener_serves_the_system_assigned_identity_by_default() {
    let em = start().await;
    let a = get(&em, 2, &token_query(""), true).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["client_id"], VM_SYS_CLIENT);
    let claims = pod_identity_emulator::tokens::peek(a.body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims.oid, VM_SYS_PRINCIPAL);
    assert_eq!(claims.xms_mirid.as_deref(), Some(vm_id().as_str()));
}

#[tokio::test]
async fn several_user_identities_and_none_named_is_refused() {
    let em = start().await;
    assert!(em.set_identities_directly(&vmss_id(), &[uami("id-b")], &[]));
    let a = get(&em, 1, &token_query(""), true).await;
    assert_eq!(a.status, 400);
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("Multiple user assigned identities exist")
    );
    // Removing all of them leaves no identity at all.
    assert!(em.set_identities_directly(&vmss_id(), &[], &[uami("id-a"), uami("id-b")]));
    let a = get(&em, 1, &token_query(""), true).await;
    assert_eq!(a.body["error_description"], "Identity not found");
}

#[tokio::test]
async fn bad_requests_are_answered_as_imds_does() {
    let em = start().await;
    let cases: Vec<(&str, String, bool, u16, &str, &str)> = vec![
        (
            "missing Metadata header",
            token_query(""),
            false,
            400,
            "invalid_request",
            "Required metadata header not specified",
        ),
        (
            "missing api-version",
            format!("{TOKEN}?resource=https://vault.azure.net"),
            true,
            400,
            "invalid_request",
            "Required query variable 'api-version' is missing",
        ),
        (
            "unsupported api-version",
            format!("{TOKEN}?api-version=2099-01-01&resource=x"),
            true,
            400,
            "invalid_request",
            "Invalid api-version '2099-01-01'",
        ),
        (
            "api-version before identity endpoints",
            format!("{TOKEN}?api-version=2017-12-01&resource=x"),
            true,
            400,
            "invalid_request",
            "Invalid api-version '2017-12-01'",
        ),
        (
            "missing resource",
            format!("{TOKEN}?api-version=2018-02-01"),
            true,
            400,
            "invalid_request",
            "Required query variable 'resource' is missing",
        ),
        (
            "duplicate parameter",
            token_query("&resource=https://management.azure.com"),
            true,
            400,
            "invalid_request",
            "Query parameter 'resource' is specified more than once",
        ),
        (
            "two selectors",
            token_query(&format!(
                "&client_id={}&object_id={}",
                client_of("id-a"),
                principal_of("id-a")
            )),
            true,
            400,
            "invalid_request",
            "Only one of client_id, object_id or msi_res_id may be specified in the token request",
        ),
    ];
    for (name, q, md, status, error, desc) in cases {
        let a = get(&em, 0, &q, md).await;
        assert_eq!(a.status, status, "{name}: {}", a.text);
        assert_eq!(a.body["error"], error, "{name}");
        assert_eq!(a.body["error_description"], desc, "{name}");
    }
    let a = get(
        &em,
        0,
        &format!("{TOKEN}?api-version=2018-02-01&resource=https://unknown.example"),
        true,
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"].as_str()),
        (400, Some("invalid_resource"))
    );
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS500011")
    );
}

#[tokio::test]
async fn x_forwarded_for_and_other_verbs_are_refused() {
    let em = start().await;
    let url = format!("{}{}", em.imds_url(0).unwrap(), token_query(""));
    let a = answer(
        plain_client()
            .get(&url)
            .header("Metadata", "true")
            .header("X-Forwarded-For", "10.0.0.9")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body["error_description"],
        "Request with X-Forwarded-For header is not allowed"
    );
    let a = answer(
        plain_client()
            .post(&url)
            .header("Metadata", "true")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 405);
    assert_eq!(a.body["error"], "method_not_allowed");
}

#[tokio::test]
async fn metadata_header_name_matches_in_any_case_its_value_only_in_lower_case() {
    let em = start().await;
    let url = format!(
        "{}{}",
        em.imds_url(0).unwrap(),
        token_query("").replace("/metadata/", "/METADATA/")
    );
    let send = |name: &'static str, value: &'static str| {
        let request = plain_client().get(&url).header(name, value);
        async move { answer(request.send().await.unwrap()).await }
    };
    let a = send("metadata", "true").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = send("METADATA", "true").await;
    assert_eq!(a.status, 200, "{}", a.text);
    for value in ["True", "TRUE"] {
        let a = send("Metadata", value).await;
        assert_eq!(a.status, 400, "{value}: {}", a.text);
        assert_eq!(a.body["error"], "invalid_request");
        assert_eq!(
            a.body["error_description"],
            "Required metadata header not specified"
        );
    }
}

#[tokio::test]
async fn same_token_is_returned_until_bypass_cache() {
    let em = start().await;
    let first = get(&em, 0, &token_query(""), true).await;
    let second = get(&em, 0, &token_query(""), true).await;
    assert_eq!(first.body["access_token"], second.body["access_token"]);
    let fresh = get(&em, 0, &token_query("&bypass_cache=true"), true).await;
    assert_ne!(first.body["access_token"], fresh.body["access_token"]);
}

#[tokio::test]
async fn instance_metadata_identity_info_and_versions() {
    let em = start().await;
    let a = get(&em, 0, "/metadata/instance?api-version=2021-02-01", true).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["compute"]["vmScaleSetName"], VMSS);
    assert_eq!(a.body["compute"]["name"], format!("{VMSS}_0"));
    assert_eq!(a.body["compute"]["subscriptionId"], SUB);
    assert_eq!(a.body["compute"]["resourceId"], instance_id(0));
    assert_eq!(
        a.body["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"],
        "10.224.0.4"
    );
    let a = get(
        &em,
        0,
        "/metadata/instance/compute/location?api-version=2021-02-01&format=text",
        true,
    )
    .await;
    assert_eq!((a.status, a.text.as_str()), (200, "westeurope"));
    let a = get(
        &em,
        0,
        "/metadata/instance/compute/location?api-version=2021-02-01",
        true,
    )
    .await;
    assert_eq!(a.status, 400, "a leaf needs format=text");
    let a = get(
        &em,
        0,
        "/metadata/instance/compute/nothing?api-version=2021-02-01",
        true,
    )
    .await;
    assert_eq!(a.status, 404);
    let a = get(&em, 0, "/metadata/instance", true).await;
    assert_eq!(a.status, 400);
    assert!(
        a.body["error"]
            .as_str()
            .unwrap()
            .contains("api-version was not specified")
    );
    assert_eq!(a.body["newest-versions"].as_array().unwrap().len(), 3);
    let a = get(&em, 0, "/metadata/instance?api-version=2021-02-01", false).await;
    assert_eq!(
        a.body["error"],
        "Bad request: . Required metadata header not specified"
    );
    let a = get(&em, 2, "/metadata/identity/info?api-version=2018-10-01", true).await;
    assert_eq!(a.body["tenantId"], TENANT);
    let a = get(&em, 0, "/metadata/versions", false).await;
    assert!(
        a.body["apiVersions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "2018-02-01")
    );
    let a = get(&em, 0, "/nothing/here", true).await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn request_log_records_source_instance_and_identity() {
    let em = start().await;
    get(&em, 0, &token_query(""), true).await;
    get(
        &em,
        0,
        &token_query(&format!("&client_id={}", client_of("id-b"))),
        true,
    )
    .await;
    let log = em.requests(&LogFilter {
        service: Some(Service::Imds),
        ..LogFilter::default()
    });
    assert_eq!(log.len(), 2);
    assert_eq!(
        pod_identity_emulator::observe::source_ip(&log[0].source),
        "127.0.0.1"
    );
    assert_eq!(
        log[0].resource.as_deref(),
        Some(instance_id(0).to_lowercase().as_str())
    );
    assert_eq!(log[0].identity.as_deref(), Some(client_of("id-a").as_str()));
    assert_eq!((log[0].status, log[1].status), (200, 400));
    assert_eq!(log[1].identity, None);
    let c = em.counters();
    assert_eq!(c.by_status["200"], 1);
    assert_eq!(c.by_status["400"], 1);
    assert_eq!(c.by_path[&format!("GET {TOKEN}")], 2);
    let v: Value = serde_json::to_value(&log[0]).unwrap();
    assert_eq!(v["service"], "imds");
}
