use std::time::Duration;

use super::*;
use crate::resolve::tests::pod;

/// A token shaped like the real ones: a JWT whose parts are long enough to be recognised anywhere.
fn token(seed: &str) -> Token {
    Token {
        access_token: format!(
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.{}.{}",
            seed.repeat(40),
            "sig".repeat(30)
        ),
        expires_on: 1_900_000_000,
        not_before: 1_800_000_000,
        client_id: Some("11111111-1111-1111-1111-111111111111".into()),
        object_id: None,
    }
}

fn identity() -> IdentityRef {
    IdentityRef {
        azure_identity: Some("ns/id-a".into()),
        resource_id: Some("/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-a".into()),
        client_id: Some("11111111-1111-1111-1111-111111111111".into()),
    }
}

fn at(seconds: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn entry<'a>(
    pod: Option<&'a PodRecord>,
    identity: Option<&'a IdentityRef>,
    decision: Decision,
    reason: Reason,
    tokens: &'a [Token],
) -> Entry<'a> {
    Entry {
        caller: "10.244.0.2".parse().unwrap(),
        pod,
        identity,
        resource: "https://vault.azure.net",
        decision,
        reason,
        message: if decision == Decision::Served {
            ""
        } else {
            "not yours"
        },
        cache_hit: Some(true),
        latency: Duration::from_micros(1234),
        tokens,
    }
}

#[test]
fn a_served_record_names_pod_identity_resource_and_a_hash_of_the_token() {
    let mut web = pod("ns", "web", Some("web"));
    web.service_account = Some("web-sa".into());
    let identity = identity();
    let tokens = [token("a")];
    let record = build(
        "node-1",
        &entry(
            Some(&web),
            Some(&identity),
            Decision::Served,
            Reason::TokenServed,
            &tokens,
        ),
        at(0),
    );
    let json = serde_json::to_value(&record).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "time": "2027-01-15T08:00:00Z",
            "node": "node-1",
            "caller": "10.244.0.2",
            "pod": {"namespace": "ns", "name": "web", "uid": "uid-web"},
            "serviceAccount": "web-sa",
            "identity": {
                "azureIdentity": "ns/id-a",
                "resourceID": identity.resource_id.clone().unwrap(),
                "clientID": "11111111-1111-1111-1111-111111111111",
            },
            "resource": "https://vault.azure.net",
            "decision": "served",
            "reason": "TokenServed",
            "message": "",
            "cacheHit": true,
            "latencyMs": 1.234,
            "tokenSha256": [token_hash(&tokens[0].access_token)],
            "count": 1,
        })
    );
    assert_eq!(token_hash(&tokens[0].access_token).len(), TOKEN_HASH_HEX_CHARS);
    // The SHA-256 of "abc" (FIPS 180-2, appendix B.1), cut.
    assert_eq!(token_hash("abc"), "ba7816bf8f01cfea");
}

#[test]
fn no_record_carries_a_token_whatever_the_decision() {
    let web = pod("ns", "web", Some("web"));
    let identity = identity();
    // Two tokens: a multi-tenant service principal's answer carries one per tenant.
    let tokens = [token("a"), token("b")];
    for decision in [Decision::Served, Decision::Denied, Decision::Unavailable] {
        for reason in [
            Reason::TokenServed,
            Reason::Excepted,
            Reason::IdentityDenied,
            Reason::TokenUpstreamError,
        ] {
            for pod in [Some(&web), None] {
                let record = build(
                    "node-1",
                    &entry(pod, Some(&identity), decision, reason, &tokens),
                    at(0),
                );
                let line = serde_json::to_string(&record).unwrap();
                for token in &tokens {
                    assert!(!line.contains(&token.access_token), "{line}");
                    for part in token.access_token.split('.') {
                        assert!(!line.contains(part), "a part of the token in {line}");
                    }
                }
                assert_eq!(
                    record.token_sha256.len(),
                    if decision == Decision::Served { 2 } else { 0 },
                    "hashes only of tokens served"
                );
            }
        }
    }
}

#[test]
fn what_the_caller_sent_is_cut_and_stays_one_line() {
    let long = format!("client_id {}\n{}", "x".repeat(2000), "é".repeat(400));
    let mut entry = entry(None, None, Decision::Denied, Reason::IdentityDenied, &[]);
    entry.message = &long;
    entry.resource = &long;
    let record = build("node-1", &entry, at(0));
    assert!(record.message.len() <= MAX_MESSAGE_BYTES);
    assert!(record.resource.len() <= MAX_MESSAGE_BYTES);
    let line = serde_json::to_string(&record).unwrap();
    assert!(!line.contains('\n'), "JSON escapes the newline");
}

fn denial(uid: &str, reason: Reason, seconds: i64) -> AuditRecord {
    let mut web = pod("ns", "web", Some("web"));
    web.view.uid = Some(uid.into());
    let mut record = build(
        "node-1",
        &entry(Some(&web), None, Decision::Denied, reason, &[]),
        at(seconds),
    );
    record.message = format!("request {seconds}");
    record
}

#[test]
fn a_refusal_repeated_in_a_loop_writes_its_first_line_and_one_count_per_window() {
    let mut folding = Aggregator::new(Duration::from_secs(60));
    let first = folding.offer(denial("u1", Reason::IdentityDenied, 0), at(0));
    assert_eq!(first.map(|r| r.count), Some(1), "the first is written at once");
    for second in 1..1000 {
        let second = i64::from(second) % 59 + 1;
        assert_eq!(
            folding.offer(denial("u1", Reason::IdentityDenied, second), at(second)),
            None
        );
    }
    assert!(folding.due(Some(at(30))).is_empty(), "the window is still open");
    let closed = folding.due(Some(at(60)));
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].count, 999);
    assert_eq!(closed[0].first_time.as_deref(), Some(at(2).to_string().as_str()));
    assert!(folding.due(Some(at(200))).is_empty(), "closed once");

    // The next window starts with a line of its own again.
    let next = folding.offer(denial("u1", Reason::IdentityDenied, 61), at(61));
    assert_eq!(next.map(|r| r.count), Some(1));
}

#[test]
fn refusals_of_other_pods_or_reasons_are_not_folded_together_and_tokens_never_are() {
    let mut folding = Aggregator::new(Duration::from_secs(60));
    assert!(
        folding
            .offer(denial("u1", Reason::IdentityDenied, 0), at(0))
            .is_some()
    );
    assert!(
        folding
            .offer(denial("u2", Reason::IdentityDenied, 0), at(0))
            .is_some()
    );
    assert!(
        folding
            .offer(denial("u1", Reason::IdentityNotAssigned, 0), at(0))
            .is_some()
    );
    let mut unavailable = denial("u1", Reason::IdentityDenied, 0);
    unavailable.decision = Decision::Unavailable;
    assert!(folding.offer(unavailable, at(0)).is_some());

    let web = pod("ns", "web", Some("web"));
    let tokens = [token("a")];
    for _ in 0..3 {
        let served = build(
            "node-1",
            &entry(Some(&web), None, Decision::Served, Reason::TokenServed, &tokens),
            at(1),
        );
        assert!(
            folding.offer(served, at(1)).is_some(),
            "every issuance is a record"
        );
    }
    assert!(
        folding.due(Some(at(120))).is_empty(),
        "no repeats, nothing to close"
    );
}

#[test]
fn a_caller_varying_its_request_is_folded_all_the_same() {
    // The deny message quotes the client_id asked for; a pod asking for a new one each time must not
    // get a line per request.
    let mut folding = Aggregator::new(Duration::from_secs(60));
    let mut written = 0;
    for i in 0..500 {
        let mut record = denial("u1", Reason::IdentityDenied, 1);
        record.message = format!("client_id {i:08} is not an identity of this pod");
        record.identity = Some(IdentityRef {
            client_id: Some(format!("{i:08}")),
            ..IdentityRef::default()
        });
        written += usize::from(folding.offer(record, at(1)).is_some());
    }
    assert_eq!(written, 1);
    assert_eq!(folding.due(None).first().map(|r| r.count), Some(499));
}

#[test]
fn unknown_callers_fold_by_address_and_beyond_the_bound_into_one_window() {
    let mut folding = Aggregator::new(Duration::from_secs(60));
    folding.max_callers = 2;
    let mut written = 0;
    for i in 0..10u8 {
        let mut record = build(
            "node-1",
            &entry(None, None, Decision::Unavailable, Reason::UnknownCaller, &[]),
            at(0),
        );
        record.caller = format!("10.244.0.{i}");
        written += usize::from(folding.offer(record, at(0)).is_some());
    }
    assert_eq!(written, 3, "two callers of their own, then one shared window");
    assert_eq!(folding.open.len(), 3);
}

#[tokio::test]
async fn the_writer_thread_writes_lines_and_closes_windows_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let metrics = Arc::new(Metrics::new());
    let audit = Audit::start(
        &Target::File(path.clone()),
        "node-1",
        Duration::from_secs(3600),
        metrics.clone(),
    )
    .unwrap();
    let web = pod("ns", "web", Some("web"));
    let identity = identity();
    let tokens = [token("a")];
    audit.record(&entry(
        Some(&web),
        Some(&identity),
        Decision::Served,
        Reason::TokenServed,
        &tokens,
    ));
    for _ in 0..5 {
        audit.record(&entry(
            Some(&web),
            None,
            Decision::Denied,
            Reason::IdentityDenied,
            &[],
        ));
    }
    // Closing writes the open windows' closing records before it returns.
    audit.close(Duration::from_secs(10)).await;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert_eq!(lines[0]["decision"], "served");
    assert_eq!(lines[1]["decision"], "denied");
    assert_eq!(lines[1]["count"], 1);
    assert_eq!(lines[2]["count"], 4);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&tokens[0].access_token));
    let rendered = metrics.render();
    assert!(
        rendered.contains("pod_identity_audit_records_total{result=\"folded\"} 4"),
        "{rendered}"
    );
}

#[test]
fn the_target_is_standard_output_or_a_file() {
    assert_eq!(Target::parse("-"), Target::Stdout);
    assert_eq!(
        Target::parse("/var/log/pod-identity/audit.log"),
        Target::File("/var/log/pod-identity/audit.log".into())
    );
}
