use std::{
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::Engine;
use pod_identity_api::fixtures::{binding, exception, user_assigned_identity};
use pod_identity_azure::{AzureError, imds_http::ImdsHttp};
use serde_json::Value;

use super::*;
use crate::{
    cache::{Freshness, TokenCache},
    request::Selector,
    resolve::tests::{CLIENT_A, CLIENT_B, assign, pod, synced_world},
    tokens::Credentials,
    upstream::{BoxFuture, RETRY, ServicePrincipal, Upstream},
    upstream::{Token, UpstreamError},
    world::World,
};

const POD_IP: &str = "10.244.0.2";

#[derive(Default)]
struct FakeUpstream {
    calls: AtomicUsize,
    fail: Mutex<Option<UpstreamError>>,
    delay: Option<Duration>,
}

/// The object ID the fake upstream gives the identity with `client` (a GUID, as real ones are).
fn oid(client: &str) -> String {
    if client.len() == 36 {
        format!("f{}", &client[1..])
    } else {
        "f0000000-0000-4000-8000-000000000000".to_owned()
    }
}

fn jwt(oid: &str) -> String {
    let payload =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"oid":"{oid}","nbf":1}}"#));
    format!("e30.{payload}.sig")
}

impl Upstream for FakeUpstream {
    fn imds_token<'a>(
        &'a self,
        selector: &'a Selector,
        _resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, UpstreamError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(delay) = self.delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(error) = self.fail.lock().unwrap().clone() {
                return Err(error);
            }
            let client = match selector {
                Selector::ClientId(id) => id.clone(),
                _ => "node".to_owned(),
            };
            Ok(Token {
                access_token: jwt(&oid(&client)),
                expires_on: crate::clock::now() + 86_400,
                not_before: crate::clock::now(),
                client_id: Some(client.clone()),
                object_id: Some(oid(&client)),
            })
        })
    }

    fn entra_token<'a>(
        &'a self,
        principal: &'a ServicePrincipal,
        tenant_id: &'a str,
        _resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, UpstreamError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(Token {
                access_token: jwt(&format!("sp-{tenant_id}")),
                expires_on: crate::clock::now() + 3600,
                not_before: crate::clock::now(),
                client_id: Some(principal.client_id.clone()),
                object_id: None,
            })
        })
    }
}

struct NoCredentials;

impl Credentials for NoCredentials {
    fn load<'a>(
        &'a self,
        _: &'a pod_identity_api::AzureIdentity,
    ) -> BoxFuture<'a, Result<ServicePrincipal, UpstreamError>> {
        Box::pin(async { Err(UpstreamError::Credential("no secrets in this test".into())) })
    }
}

struct Fixture {
    state: Arc<AppState>,
    upstream: Arc<FakeUpstream>,
}

fn config() -> ServerConfig {
    ServerConfig {
        node: "node-a".into(),
        policy: Policy::default(),
        metadata_header_required: true,
        block_instance_metadata: true,
        block_other_metadata: true,
        host_token: false,
        // Long: a test that gets an answer proves it was not made to wait for it.
        assignment_wait: Duration::from_secs(3600),
        pod_wait: Duration::from_millis(200),
        retry_after: Duration::from_secs(7),
    }
}

fn fixture(world: World, config: ServerConfig, upstream: FakeUpstream) -> Fixture {
    crate::azure::ensure_crypto_provider();
    let shared = Shared::new();
    shared.update(|w| *w = world);
    let metrics = Arc::new(Metrics::new());
    let upstream = Arc::new(upstream);
    let tokens = Arc::new(TokenService::new(
        TokenCache::new(Freshness::default(), Duration::from_secs(1)),
        upstream.clone(),
        Arc::new(NoCredentials),
        pod_identity_azure::RetryPolicy {
            max_retries: 2,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            max_retry_after: Duration::from_millis(10),
        },
        metrics.clone(),
    ));
    let state = Arc::new(AppState::new(
        config,
        shared,
        tokens,
        Proxy::new(
            ImdsHttp::new(Duration::from_secs(2), Duration::from_secs(1), None),
            "http://127.0.0.1:9",
        ),
        metrics.clone(),
        Events::disabled(metrics),
    ));
    Fixture { state, upstream }
}

/// A world with pod `ns/web` at POD_IP bound to identity A (assigned) and `ns/db` bound to B.
fn bound_world(status: &str) -> World {
    let mut world = synced_world();
    let a = user_assigned_identity("ns", "id-a", CLIENT_A);
    world.matching.upsert_identity(a.clone());
    world
        .matching
        .upsert_identity(user_assigned_identity("ns", "id-b", CLIENT_B));
    world.matching.upsert_binding(binding("ns", "ba", "id-a", "web"));
    world.matching.upsert_binding(binding("ns", "bb", "id-b", "db"));
    let web = pod("ns", "web", Some("web"));
    assign(&mut world, &web, &a, status);
    world.upsert_pod(web);
    world
}

async fn call(
    state: &Arc<AppState>,
    peer: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut request = Request::get(path_and_query);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let peer: SocketAddr = format!("{peer}:40000").parse().unwrap();
    let response = handle(state.clone(), peer, None, request.body(Body::empty()).unwrap()).await;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

const TOKEN: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
const META: (&str, &str) = ("Metadata", "true");

use http::HeaderMap;

#[tokio::test]
async fn a_bound_pod_gets_its_token_with_string_fields_and_the_cache_answers_again() {
    let f = fixture(bound_world("Assigned"), config(), FakeUpstream::default());
    let (status, _, body) = call(&f.state, POD_IP, TOKEN, &[META]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["client_id"], CLIENT_A);
    assert_eq!(body["resource"], "https://vault.azure.net");
    assert!(body["expires_on"].is_string() && body["expires_in"].is_string());
    let (status, _, _) = call(&f.state, POD_IP, TOKEN, &[META]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        f.upstream.calls.load(Ordering::SeqCst),
        1,
        "the second answer came from the cache"
    );
    let metrics = f.state.metrics.render();
    assert!(
        metrics.contains("pod_identity_token_cache_lookups_total{result=\"hit\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pod_identity_requests_total{route=\"token\",code=\"200\"} 2"),
        "{metrics}"
    );
}

/// A log sink the test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_line_a_request_logs_names_its_node_caller_pod_and_identity() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let f = fixture(bound_world("Assigned"), config(), FakeUpstream::default());
    let (status, _, body) = call(&f.state, POD_IP, TOKEN, &[META]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = call(
        &f.state,
        POD_IP,
        &format!("{TOKEN}&client_id={CLIENT_B}"),
        &[META],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let served = log.lines().find(|l| l.contains("served a token")).expect(&log);
    assert!(
        served.contains(&format!(
            "request{{node=node-a peer={POD_IP} pod=ns/web identity=ns/id-a}}"
        )),
        "{served}"
    );
    let refused = log
        .lines()
        .find(|l| l.contains("refused a token request"))
        .expect(&log);
    assert!(
        refused.contains(&format!("request{{node=node-a peer={POD_IP} pod=ns/web}}")),
        "{refused}"
    );
}

/// The count of `pod_identity_pod_first_token_seconds` for `identity`, 0 without a series.
fn first_tokens(state: &AppState, identity: &str) -> u64 {
    let wanted = format!("pod_identity_pod_first_token_seconds_count{{identity=\"{identity}\"}} ");
    state
        .metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(wanted.as_str()))
        .map_or(0, |count| count.trim().parse().unwrap())
}

#[tokio::test]
async fn each_identity_of_a_pod_has_its_first_token_observed_once() {
    let mut world = bound_world("Assigned");
    // `web` is bound to id-b too, and an excepted pod gets the node's identities.
    world
        .matching
        .upsert_binding(binding("ns", "bb-web", "id-b", "web"));
    let b = world.matching.identity("ns", "id-b").unwrap().clone();
    let mut web = PodRecord::clone(world.pod(&pod_identity_api::ObjectKey::new("ns", "web")).unwrap());
    web.created = Some(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3));
    assign(&mut world, &web, &b, "Assigned");
    world.upsert_pod(web);
    world
        .matching
        .upsert_exception(exception("ns", "exc", &[("app", "controller")]));
    let mut excepted = pod("ns", "ctl", None);
    excepted.view.ips = vec!["10.244.0.4".parse().unwrap()];
    excepted.view.labels.insert("app".into(), "controller".into());
    excepted.created = Some(jiff::Timestamp::now());
    world.upsert_pod(excepted);
    let f = fixture(world, config(), FakeUpstream::default());

    let for_a = format!("{TOKEN}&client_id={CLIENT_A}");
    let for_b = format!("{TOKEN}&client_id={CLIENT_B}");
    let other_resource = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com&client_id={CLIENT_A}"
    );
    for (path, peer) in [
        (&for_a, POD_IP),
        (&for_a, POD_IP),
        (&other_resource, POD_IP),
        (&for_b, POD_IP),
        (&for_b, POD_IP),
        (&for_a, "10.244.0.4"),
        (&for_b, "10.244.0.4"),
    ] {
        let (status, _, body) = call(&f.state, peer, path, &[META]).await;
        assert_eq!(status, StatusCode::OK, "{path} from {peer}: {body}");
    }
    // After a change of the world the pod's identities are decided anew: a repeat is still no first token.
    f.state.shared.update(|w| {
        w.matching
            .upsert_binding(binding("ns", "unrelated", "id-b", "other"))
    });
    for path in [&for_a, &for_b] {
        let (status, _, body) = call(&f.state, POD_IP, path, &[META]).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    // A pod's second identity is a first token of its own; another resource or a repeat of either is not;
    // an excepted pod is observed once, under `node`, whichever node identity it asked for.
    assert_eq!(first_tokens(&f.state, "ns/id-a"), 1);
    assert_eq!(first_tokens(&f.state, "ns/id-b"), 1);
    assert_eq!(first_tokens(&f.state, "node"), 1);
    let metrics = f.state.metrics.render();
    assert!(
        metrics.contains("pod_identity_pod_first_token_seconds_bucket{le=\"2.0\",identity=\"ns/id-a\"} 0")
            && metrics
                .contains("pod_identity_pod_first_token_seconds_bucket{le=\"5.0\",identity=\"ns/id-a\"} 1"),
        "measured from the pod's creation, 3 s ago: {metrics}"
    );
}

#[tokio::test]
async fn missing_metadata_header_and_forwarding_headers_are_refused_like_imds() {
    let f = fixture(bound_world("Assigned"), config(), FakeUpstream::default());
    let (status, headers, body) = call(&f.state, POD_IP, TOKEN, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        serde_json::json!({"error": "invalid_request", "error_description": "Required metadata header not specified"})
    );
    assert_eq!(
        headers[http::header::CONTENT_TYPE],
        "application/json; charset=utf-8"
    );
    let (status, _, body) = call(
        &f.state,
        POD_IP,
        TOKEN,
        &[META, ("X-Forwarded-For", "10.244.0.9")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error_description"],
        "Request with X-Forwarded-For header is not allowed"
    );
    let (status, _, body) = call(
        &f.state,
        POD_IP,
        "/metadata/identity/oauth2/token?api-version=2018-02-01",
        &[META],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error_description"],
        "Required query variable 'resource' is missing"
    );
    assert_eq!(f.upstream.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn path_variants_are_refused_and_never_reach_upstream() {
    let f = fixture(bound_world("Assigned"), config(), FakeUpstream::default());
    for path in [
        "/Metadata/identity/oauth2/token?resource=r",
        "/metadata/identity/oauth2/token/?resource=r",
        "/metadata/identity%2Foauth2%2Ftoken?resource=r",
        "/metadata//identity/oauth2/token?resource=r",
        "/metadata/identity/info?api-version=2018-02-01",
        "/metadata/instance/../identity/oauth2/token?resource=r",
    ] {
        let (status, _, body) = call(&f.state, POD_IP, path, &[META]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"], "invalid_request");
    }
    assert_eq!(f.upstream.calls.load(Ordering::SeqCst), 0);
    assert!(
        f.state
            .metrics
            .render()
            .contains("route=\"variant\",code=\"400\"} 6")
    );
}

#[tokio::test]
async fn an_unbound_pod_is_refused_at_once_with_the_reason() {
    let mut world = bound_world("Assigned");
    let mut lonely = pod("ns", "lonely", None);
    lonely.view.ips = vec!["10.244.0.3".parse().unwrap()];
    world.upsert_pod(lonely);
    let f = fixture(world, config(), FakeUpstream::default());
    let (status, _, body) = call(&f.state, "10.244.0.3", TOKEN, &[META]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("has no label aadpodidbinding"),
        "{body}"
    );
    assert_eq!(f.upstream.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn someone_elses_client_id_is_refused_without_asking_upstream() {
    let f = fixture(bound_world("Assigned"), config(), FakeUpstream::default());
    let path = format!("{TOKEN}&client_id={CLIENT_B}");
    let (status, _, body) = call(&f.state, POD_IP, &path, &[META]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(f.upstream.calls.load(Ordering::SeqCst), 0);
    let path = format!("{TOKEN}&client_id={CLIENT_A}");
    assert_eq!(call(&f.state, POD_IP, &path, &[META]).await.0, StatusCode::OK);
}

#[tokio::test]
async fn an_unknown_caller_gets_503_with_retry_after_after_a_short_wait() {
    // Its IP may not be reported yet (an init container asking at once): SDKs retry a 503, not a 403.
    let f = fixture(bound_world("Assigned"), config(), FakeUpstream::default());
    let (status, headers, body) = call(&f.state, "10.244.0.99", TOKEN, &[META]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "7");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("no pod of this node"),
        "{body}"
    );
    assert!(
        f.state
            .metrics
            .render()
            .contains("pod_identity_token_decisions_total{result=\"unknown_caller\"} 1")
    );
}

#[tokio::test]
async fn a_caller_whose_ip_is_reported_while_it_waits_is_served() {
    let config = ServerConfig {
        pod_wait: Duration::from_secs(3600),
        ..config()
    };
    let f = fixture(bound_world("Assigned"), config, FakeUpstream::default());
    let shared = f.state.shared.clone();
    let mut starting = pod("ns", "web", Some("web"));
    starting.view.ips.clear();
    starting.view.phase = Some("Pending".into());
    shared.update(|w| w.upsert_pod(starting));
    let waiter = tokio::spawn({
        let state = f.state.clone();
        async move { call(&state, POD_IP, TOKEN, &[META]).await }
    });
    // One thread: the request runs until it waits on the world.
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "the request waits for its pod's IP");
    shared.update(|w| w.upsert_pod(pod("ns", "web", Some("web"))));
    let (status, _, body) = waiter.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_pod_being_deleted_is_served_through_its_grace_period() {
    let mut world = bound_world("Assigned");
    let mut leaving = pod("ns", "web", Some("web"));
    leaving.view.deleting = true;
    world.upsert_pod(leaving.clone());
    let f = fixture(world, config(), FakeUpstream::default());
    let (status, _, body) = call(&f.state, POD_IP, TOKEN, &[META]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["client_id"], CLIENT_A);
    // Its containers stopped: the address is nobody's until another pod reports it.
    leaving.view.containers = pod_identity_api::pod::Containers::NoneRunning;
    f.state.shared.update(|w| w.upsert_pod(leaving));
    let (status, _, _) = call(&f.state, POD_IP, TOKEN, &[META]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_request_waits_for_the_assignment_and_is_served_once_assigned() {
    let f = fixture(bound_world("Created"), config(), FakeUpstream::default());
    let shared = f.state.shared.clone();
    let waiter = tokio::spawn({
        let state = f.state.clone();
        async move { call(&state, POD_IP, TOKEN, &[META]).await }
    });
    // The request is waiting (it counts as such) and stays unanswered while the assignment is Created.
    let metrics = f.state.metrics.clone();
    pod_identity_test_support::eventually(|| {
        let metrics = metrics.clone();
        async move {
            anyhow::ensure!(
                metrics.render().contains("pod_identity_waiting_requests 1"),
                "not waiting yet"
            );
            Ok(())
        }
    })
    .await
    .unwrap();
    assert!(
        !waiter.is_finished(),
        "the request must wait while the assignment is Created"
    );
    shared.update(|world| {
        let web = pod("ns", "web", Some("web"));
        assign(
            world,
            &web,
            &user_assigned_identity("ns", "id-a", CLIENT_A),
            "Assigned",
        );
    });
    let (status, _, body) = waiter.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["client_id"], CLIENT_A);
    assert!(
        f.state
            .metrics
            .render()
            .contains("pod_identity_waiting_requests 0"),
        "answered, it no longer counts"
    );
}

#[tokio::test]
async fn an_assignment_that_does_not_come_gives_503_with_retry_after() {
    let config = ServerConfig {
        assignment_wait: Duration::from_millis(100),
        ..config()
    };
    let f = fixture(bound_world("Created"), config, FakeUpstream::default());
    let (status, headers, body) = call(&f.state, POD_IP, TOKEN, &[META]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[http::header::RETRY_AFTER], "7");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("being assigned"),
        "{body}"
    );
    assert_eq!(f.upstream.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn concurrent_requests_under_throttling_reach_upstream_once_per_attempt() {
    let upstream = FakeUpstream {
        fail: Mutex::new(Some(UpstreamError::from(AzureError::Throttled {
            retry_after: None,
            message: "too many requests".into(),
        }))),
        delay: Some(Duration::from_millis(20)),
        ..FakeUpstream::default()
    };
    let f = fixture(bound_world("Assigned"), config(), upstream);
    let mut callers = Vec::new();
    for _ in 0..40 {
        let state = f.state.clone();
        callers.push(tokio::spawn(
            async move { call(&state, POD_IP, TOKEN, &[META]).await },
        ));
    }
    for caller in callers {
        let (status, headers, _) = caller.await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key(http::header::RETRY_AFTER));
    }
    // One fetch with its two retries, shared by all 40 callers.
    assert_eq!(f.upstream.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn instance_metadata_and_other_paths_are_blocked_by_default() {
    let f = fixture(bound_world("Assigned"), config(), FakeUpstream::default());
    let (status, _, _) = call(
        &f.state,
        POD_IP,
        "/metadata/instance?api-version=2021-02-01",
        &[META],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = call(&f.state, POD_IP, "/metadata/versions", &[META]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = call(&f.state, POD_IP, "/latest/meta-data/", &[META]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn host_token_is_off_by_default_and_only_for_the_node_itself() {
    let f = fixture(bound_world("Assigned"), config(), FakeUpstream::default());
    let headers = [("podns", "ns"), ("podname", "web")];
    let path = "/host/token?resource=https%3A%2F%2Fvault.azure.net";
    assert_eq!(
        call(&f.state, "127.0.0.1", path, &headers).await.0,
        StatusCode::NOT_FOUND
    );
    let enabled = ServerConfig {
        host_token: true,
        ..config()
    };
    let f = fixture(bound_world("Assigned"), enabled, FakeUpstream::default());
    assert_eq!(
        call(&f.state, POD_IP, path, &headers).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&f.state, "127.0.0.1", path, &[]).await.0,
        StatusCode::BAD_REQUEST
    );
    let (status, _, body) = call(&f.state, "127.0.0.1", path, &headers).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["clientid"], CLIENT_A);
    assert!(body["token"]["access_token"].is_string());
    let (status, _, _) = call(
        &f.state,
        "127.0.0.1",
        path,
        &[("podns", "ns"), ("podname", "ghost")],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn object_id_is_resolved_from_the_pods_own_tokens() {
    let f = fixture(bound_world("Assigned"), config(), FakeUpstream::default());
    let path = format!("{TOKEN}&object_id={}", oid(CLIENT_A));
    let (status, _, body) = call(&f.state, POD_IP, &path, &[META]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["client_id"], CLIENT_A);
    let path = format!("{TOKEN}&object_id={}", oid(CLIENT_B));
    let (status, _, _) = call(&f.state, POD_IP, &path, &[META]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        f.upstream.calls.load(Ordering::SeqCst),
        1,
        "B's token was never fetched"
    );
}

#[tokio::test]
async fn imds_not_knowing_an_assigned_identity_yet_is_a_503_an_entra_refusal_a_403() {
    // IMDS learns a scale set's new identities after ARM's update completes: its "Identity not found" for
    // an identity the controller recorded as Assigned can still change, so SDKs must retry.
    let upstream = FakeUpstream {
        fail: Mutex::new(Some(UpstreamError::from(AzureError::IdentityNotFound {
            code: "invalid_request".into(),
            message: "Identity not found".into(),
        }))),
        ..FakeUpstream::default()
    };
    let f = fixture(bound_world("Assigned"), config(), upstream);
    let (status, headers, body) = call(&f.state, POD_IP, TOKEN, &[META]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("Identity not found"),
        "{body}"
    );
    // A refusal nothing in the cluster changes (Entra refusing the credential) stays final.
    let upstream = FakeUpstream {
        fail: Mutex::new(Some(UpstreamError::from(AzureError::Unauthorized {
            status: 401,
            code: "invalid_client".into(),
            message: "AADSTS7000215: Invalid client secret provided".into(),
        }))),
        ..FakeUpstream::default()
    };
    let f = fixture(bound_world("Assigned"), config(), upstream);
    let (status, _, body) = call(&f.state, POD_IP, TOKEN, &[META]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("AADSTS7000215"),
        "{body}"
    );
}

#[tokio::test]
async fn the_key_vault_csi_provider_gets_its_token_from_host_token_with_a_trailing_slash() {
    let enabled = ServerConfig {
        host_token: true,
        ..config()
    };
    let f = fixture(bound_world("Assigned"), enabled, FakeUpstream::default());
    // What the provider sends: `http://localhost:2579/host/token/?resource=<unencoded>`, podns and
    // podname canonicalised by Go, no Metadata header.
    let (status, _, body) = call(
        &f.state,
        "127.0.0.1",
        "/host/token/?resource=https://vault.azure.net",
        &[("Podns", "ns"), ("Podname", "web")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["clientid"], CLIENT_A);
    assert!(body["token"]["access_token"].is_string(), "{body}");
    assert_eq!(body["token"]["resource"], "https://vault.azure.net");
    // Other spellings stay refused, from the node too.
    for path in ["/host/token//", "/HOST/token/", "/host/token%2F", "/host/token/x"] {
        let (status, _, _) = call(
            &f.state,
            "127.0.0.1",
            &format!("{path}?resource=https://vault.azure.net"),
            &[("podns", "ns"), ("podname", "web")],
        )
        .await;
        assert_ne!(status, StatusCode::OK, "{path}");
    }
    // Names that name no pod are refused before any lookup.
    let (status, _, body) = call(
        &f.state,
        "127.0.0.1",
        "/host/token/?resource=https://vault.azure.net",
        &[("podns", "ns"), ("podname", "Web_x")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(f.upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn host_token_answers_the_identitys_client_id_when_upstream_leaves_it_out() {
    struct NoClientId(FakeUpstream);
    impl Upstream for NoClientId {
        fn imds_token<'a>(
            &'a self,
            selector: &'a Selector,
            resource: &'a str,
        ) -> BoxFuture<'a, Result<Token, UpstreamError>> {
            Box::pin(async move {
                let mut token = self.0.imds_token(selector, resource).await?;
                token.client_id = None;
                Ok(token)
            })
        }
        fn entra_token<'a>(
            &'a self,
            principal: &'a ServicePrincipal,
            tenant_id: &'a str,
            resource: &'a str,
        ) -> BoxFuture<'a, Result<Token, UpstreamError>> {
            self.0.entra_token(principal, tenant_id, resource)
        }
    }
    crate::azure::ensure_crypto_provider();
    let shared = Shared::new();
    shared.update(|w| *w = bound_world("Assigned"));
    let metrics = Arc::new(Metrics::new());
    let tokens = Arc::new(TokenService::new(
        TokenCache::new(Freshness::default(), Duration::from_secs(1)),
        Arc::new(NoClientId(FakeUpstream::default())),
        Arc::new(NoCredentials),
        RETRY,
        metrics.clone(),
    ));
    let state = Arc::new(AppState::new(
        ServerConfig {
            host_token: true,
            ..config()
        },
        shared,
        tokens,
        Proxy::new(
            ImdsHttp::new(Duration::from_secs(2), Duration::from_secs(1), None),
            "http://127.0.0.1:9",
        ),
        metrics.clone(),
        Events::disabled(metrics),
    ));
    let (status, _, body) = call(
        &state,
        "127.0.0.1",
        "/host/token/?resource=https://vault.azure.net",
        &[("podns", "ns"), ("podname", "web")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["clientid"], CLIENT_A,
        "the CSI provider refuses an empty clientid"
    );
}

#[tokio::test]
async fn metadata_true_with_a_capital_t_is_refused_as_imds_refuses_it() {
    let f = fixture(bound_world("Assigned"), config(), FakeUpstream::default());
    for value in ["True", "TRUE"] {
        let (status, _, body) = call(&f.state, POD_IP, TOKEN, &[("Metadata", value)]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{value}: {body}");
        assert_eq!(
            body["error_description"],
            "Required metadata header not specified"
        );
    }
    let (status, _, _) = call(&f.state, POD_IP, TOKEN, &[("metadata", "true")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(f.upstream.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn malformed_parameters_get_imds_400s_and_nothing_goes_upstream() {
    let mut world = bound_world("Assigned");
    // An excepted pod: its requests go to the node's IMDS as they are, so they must be clean first.
    world
        .matching
        .upsert_exception(exception("ns", "exc", &[("app", "controller")]));
    let mut excepted = pod("ns", "ctl", None);
    excepted.view.ips = vec!["10.244.0.4".parse().unwrap()];
    excepted.view.labels.insert("app".into(), "controller".into());
    world.upsert_pod(excepted);
    let f = fixture(world, config(), FakeUpstream::default());
    let long_client_id = format!("{}{}", "a".repeat(990), "%C3%A9".repeat(20));
    let cases = [
        ("resource=%00", "invalid_resource"),
        (
            "resource=x%0A2026-11-30T00:00:00Z%20INFO%20forged%20line",
            "invalid_resource",
        ),
        ("resource=https://vault.azure.net%0D%0A", "invalid_resource"),
        ("resource=vault.azure.net", "invalid_resource"),
        (
            "resource=https://vault.azure.net&client_id=x%0Ay",
            "invalid_request",
        ),
        (
            "resource=https://vault.azure.net&object_id=%00",
            "invalid_request",
        ),
        (
            "resource=https://vault.azure.net&msi_res_id=%0A",
            "invalid_request",
        ),
        (
            "resource=https://vault.azure.net&api-version=x%0Ay",
            "invalid_request",
        ),
    ];
    for peer in [POD_IP, "10.244.0.4"] {
        for (query, code) in &cases {
            let path = format!("/metadata/identity/oauth2/token?{query}");
            let (status, _, body) = call(&f.state, peer, &path, &[META]).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{peer} {query}: {body}");
            assert_eq!(body["error"], *code, "{query}");
            let description = body["error_description"].as_str().unwrap();
            assert!(
                !description.contains('\n') && !description.contains('\0'),
                "{description}"
            );
        }
        let path = format!(
            "/metadata/identity/oauth2/token?resource=https://vault.azure.net&client_id={long_client_id}"
        );
        let (status, _, body) = call(&f.state, peer, &path, &[META]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error_description"], "Identity not found");
    }
    assert_eq!(
        f.upstream.calls.load(Ordering::SeqCst),
        0,
        "nothing went upstream"
    );
    assert!(
        f.state
            .metrics
            .render()
            .contains("pod_identity_token_decisions_total{result=\"invalid\"} 18")
    );
}

#[tokio::test]
async fn every_decision_of_the_token_and_host_token_routes_is_audited_and_no_record_carries_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let enabled = ServerConfig {
        host_token: true,
        ..config()
    };
    let f = fixture(bound_world("Assigned"), enabled, FakeUpstream::default());
    let metrics = f.state.metrics.clone();
    let audit = crate::audit::Audit::start(
        &crate::audit::Target::File(path.clone()),
        "node-a",
        Duration::from_secs(3600),
        metrics,
    )
    .unwrap();
    let state = Arc::new(
        Arc::try_unwrap(f.state)
            .unwrap_or_else(|_| panic!("the fixture's state is shared"))
            .with_audit(audit.clone()),
    );

    let mut served = Vec::new();
    for _ in 0..2 {
        let (status, _, body) = call(&state, POD_IP, TOKEN, &[META]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        served.push(body["access_token"].as_str().unwrap().to_owned());
    }
    let (status, _, body) = call(
        &state,
        "127.0.0.1",
        "/host/token/?resource=https://management.azure.com/",
        &[("podns", "ns"), ("podname", "web")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    served.push(body["token"]["access_token"].as_str().unwrap().to_owned());
    // Refusals: another identity, a malformed request, an unknown caller, a pod /host/token does not
    // know.
    let other = format!("{TOKEN}&client_id={CLIENT_B}");
    assert_eq!(
        call(&state, POD_IP, &other, &[META]).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(call(&state, POD_IP, TOKEN, &[]).await.0, StatusCode::BAD_REQUEST);
    let unknown = call(&state, "10.244.0.99", TOKEN, &[META]).await.0;
    assert_eq!(unknown, StatusCode::SERVICE_UNAVAILABLE);
    let gone = call(
        &state,
        "127.0.0.1",
        "/host/token/?resource=https://vault.azure.net",
        &[("podns", "ns"), ("podname", "gone")],
    )
    .await;
    assert_eq!(gone.0, StatusCode::NOT_FOUND);

    audit.close(Duration::from_secs(10)).await;
    let text = std::fs::read_to_string(&path).unwrap();
    let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary: Vec<(String, String, Option<bool>)> = records
        .iter()
        .map(|r| {
            (
                r["decision"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap().to_owned(),
                r["cacheHit"].as_bool(),
            )
        })
        .collect();
    let expected = [
        ("served", "TokenServed", Some(false)),
        ("served", "TokenServed", Some(true)),
        ("served", "TokenServed", Some(false)),
        ("denied", "IdentityDenied", None),
        ("denied", "InvalidRequest", None),
        ("unavailable", "UnknownCaller", None),
        ("denied", "IdentityDenied", None),
    ]
    .map(|(d, r, c)| (d.to_owned(), r.to_owned(), c));
    assert_eq!(summary, expected, "{text}");
    assert_eq!(
        records[3]["identity"]["clientID"], CLIENT_B,
        "the identity asked for"
    );
    assert_eq!(records[0]["pod"]["name"], "web");
    assert_eq!(records[2]["caller"], "127.0.0.1");
    for (record, token) in records.iter().zip(&served) {
        assert_eq!(
            record["tokenSha256"],
            serde_json::json!([crate::audit::token_hash(token)])
        );
    }
    for token in &served {
        assert!(
            !text.contains(token.as_str()),
            "a token in the audit stream: {text}"
        );
    }
}
