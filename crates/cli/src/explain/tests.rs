use super::*;
use crate::fixtures::*;

fn state() -> ClusterState {
    ClusterState {
        pods: vec![pod("shop", "web", Some("pay")), pod("shop", "plain", None)],
        identities: vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        bindings: vec![binding("shop", "payments-binding", "payments", "pay")],
        ..Default::default()
    }
}

fn explained(state: &ClusterState, name: &str) -> Explanation {
    explain(
        state,
        "shop",
        name,
        Scope::Namespaced,
        Mode::Standard,
        Callers::ByAddress,
    )
    .unwrap()
}

#[test]
fn assigned_identity_is_served() {
    let mut state = state();
    state
        .assignments
        .push(assignment("shop", "web", "payments", "Assigned"));
    let e = explained(&state, "web");
    assert_eq!(e.agent.verdict, Verdict::Serve);
    assert_eq!(e.verdict, "shop/web gets identity shop/payments.");
    assert_eq!(e.bindings[0].rank, Some(0));
    assert_eq!(e.bindings[0].client_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(e.assignments[0].status, "Assigned");
    assert!(e.to_human().contains("applies; the default identity of the pod"));
}

#[test]
fn identity_being_assigned_makes_requests_wait() {
    let mut state = state();
    state
        .assignments
        .push(assignment("shop", "web", "payments", "Created"));
    let e = explained(&state, "web");
    assert_eq!(e.agent.verdict, Verdict::Wait);
    assert!(
        e.agent.detail.contains("503 with Retry-After"),
        "{}",
        e.agent.detail
    );
    assert_eq!(
        e.verdict,
        "shop/web will get identity shop/payments once it is assigned."
    );
}

#[test]
fn assignment_not_recorded_yet_is_said_so() {
    let e = explained(&state(), "web");
    assert_eq!(e.assignments[0].status, "not recorded yet");
    assert_eq!(e.agent.verdict, Verdict::Wait);
}

#[test]
fn managed_mode_serves_without_assignment_records() {
    let e = explain(
        &state(),
        "shop",
        "web",
        Scope::Namespaced,
        Mode::Managed,
        Callers::ByAddress,
    )
    .unwrap();
    assert_eq!(e.agent.verdict, Verdict::Serve);
}

#[test]
fn unlabelled_pod_is_refused_at_once() {
    let e = explained(&state(), "plain");
    assert_eq!(e.agent.verdict, Verdict::Refuse);
    assert!(e.agent.detail.contains("403"));
    assert_eq!(
        e.verdict,
        "shop/plain gets no identity: it has no aadpodidbinding label (or an empty one)."
    );
}

#[test]
fn label_without_matching_binding_lists_selectors_of_the_namespace() {
    let mut state = state();
    state.pods.push(pod("shop", "typo", Some("paay")));
    let e = explained(&state, "typo");
    assert!(e.bindings.is_empty());
    assert_eq!(e.selectors_in_namespace, vec!["payments-binding selects \"pay\""]);
    assert!(e.verdict.contains("no AzureIdentityBinding selects its label"));
    assert!(e.to_human().contains("no binding selects \"paay\""));
}

#[test]
fn binding_of_another_namespace_is_explained() {
    let mut state = state();
    state.pods.push(pod("other", "intruder", Some("pay")));
    let e = explain(
        &state,
        "other",
        "intruder",
        Scope::Namespaced,
        Mode::Standard,
        Callers::ByAddress,
    )
    .unwrap();
    let reason = e.bindings[0].not_used_because.as_deref().unwrap();
    assert!(reason.contains("matching is namespaced"), "{reason}");
    assert_eq!(e.agent.verdict, Verdict::Refuse);
    assert!(e.verdict.contains("1 binding(s) select it but none applies"));
}

#[test]
fn missing_identity_is_named() {
    let mut state = state();
    state.identities.clear();
    let e = explained(&state, "web");
    assert_eq!(
        e.bindings[0].not_used_because.as_deref(),
        Some("it names AzureIdentity payments, which does not exist in namespace shop")
    );
}

#[test]
fn invalid_identity_shows_the_field() {
    let mut state = state();
    state.identities[0].spec.client_id = Some("not-a-guid".into());
    let e = explained(&state, "web");
    let reason = e.bindings[0].not_used_because.as_deref().unwrap();
    assert!(reason.contains("spec.clientID"), "{reason}");
}

#[test]
fn excepted_pod_goes_direct() {
    let mut state = state();
    state.exceptions.push(pod_identity_api::fixtures::exception(
        "shop",
        "e",
        &[(POD_LABEL, "pay")],
    ));
    let e = explained(&state, "web");
    assert!(e.excepted);
    assert_eq!(e.agent.verdict, Verdict::Direct);
}

#[test]
fn finished_pod_is_not_served() {
    let mut state = state();
    state.pods[0].status.as_mut().unwrap().phase = Some("Succeeded".into());
    let e = explained(&state, "web");
    assert_eq!(e.agent.verdict, Verdict::Refuse);
    assert_eq!(
        e.verdict,
        "shop/web gets no identity: it has finished (phase Succeeded)."
    );
}

#[test]
fn unknown_pod_is_an_error() {
    let err = explain(
        &state(),
        "shop",
        "ghost",
        Scope::Namespaced,
        Mode::Standard,
        Callers::ByAddress,
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "pod shop/ghost not found");
}

fn deleted(pod: &mut k8s_openapi::api::core::v1::Pod, containers: &str) {
    use k8s_openapi::{
        api::core::v1::{ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus},
        apimachinery::pkg::apis::meta::v1::Time,
    };
    pod.metadata.deletion_timestamp = Some(Time(Default::default()));
    pod.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
        name: "app".into(),
        state: Some(ContainerState {
            running: (containers == "running").then(ContainerStateRunning::default),
            terminated: (containers == "stopped").then(ContainerStateTerminated::default),
            waiting: None,
        }),
        ..ContainerStatus::default()
    }]);
}

#[test]
fn a_pod_being_deleted_is_served_until_its_containers_stop() {
    let mut state = state();
    state
        .assignments
        .push(assignment("shop", "web", "payments", "Assigned"));
    deleted(&mut state.pods[0], "running");
    let e = explained(&state, "web");
    assert_eq!(e.life, Life::Terminating);
    assert_eq!(e.agent.verdict, Verdict::Serve);
    assert!(
        e.agent.detail.contains("served until its containers stop"),
        "{}",
        e.agent.detail
    );
    assert!(e.to_human().contains("being deleted"));

    deleted(&mut state.pods[0], "stopped");
    let e = explained(&state, "web");
    assert_eq!(e.agent.verdict, Verdict::Refuse);
    assert_eq!(
        e.verdict,
        "shop/web gets no identity: it has finished (deleted, every container stopped)."
    );
}

#[test]
fn a_pod_whose_ip_is_not_reported_yet_waits_instead_of_being_refused() {
    let mut state = state();
    state.pods[0].status.as_mut().unwrap().pod_ip = None;
    let e = explained(&state, "web");
    assert_eq!(e.agent.verdict, Verdict::Wait);
    assert!(
        e.agent.detail.contains("503 with Retry-After"),
        "{}",
        e.agent.detail
    );
}

#[test]
fn a_new_pod_with_the_ip_of_a_pod_being_deleted_is_the_caller_not_the_old_one() {
    let mut state = state();
    state
        .assignments
        .push(assignment("shop", "web", "payments", "Assigned"));
    deleted(&mut state.pods[0], "running");
    // `plain` got the same address: the old pod's sandbox is gone whatever its status says.
    let web_ip = state.pods[0].status.as_ref().unwrap().pod_ip.clone();
    state.pods[1].status.as_mut().unwrap().pod_ip = web_ip;
    let e = explained(&state, "web");
    assert_eq!(e.agent.verdict, Verdict::Refuse, "{}", e.agent.detail);
    assert!(
        e.agent.detail.contains("shop/plain now has the pod's IP"),
        "{}",
        e.agent.detail
    );
    let e = explained(&state, "plain");
    assert_eq!(e.agent.verdict, Verdict::Refuse);
    assert!(
        e.agent.detail.contains("has no label aadpodidbinding"),
        "{}",
        e.agent.detail
    );

    // A pod starting on the node whose address is not reported yet may hold it: requests wait.
    state.pods[1].status.as_mut().unwrap().pod_ip = None;
    let e = explained(&state, "web");
    assert_eq!(e.agent.verdict, Verdict::Wait, "{}", e.agent.detail);
}

#[test]
fn a_host_network_pod_reaches_the_metadata_service_directly() {
    let mut state = state();
    state.pods[0].spec.as_mut().unwrap().host_network = Some(true);
    let e = explained(&state, "web");
    assert_eq!(e.agent.verdict, Verdict::Direct);
    assert!(e.agent.detail.contains("not intercepted"));
    assert_eq!(
        e.assignments.len(),
        1,
        "its identity is still assigned to the node"
    );
}

fn federated_state() -> ClusterState {
    let mut state = state();
    let identity = &mut state.identities[0];
    identity.metadata.annotations = Some(std::collections::BTreeMap::from([(
        pod_identity_api::federation::BACKEND_ANNOTATION.to_owned(),
        "federated".to_owned(),
    )]));
    identity.spec.tenant_id = Some("tenant-1".into());
    state.federation = crate::cluster::FederationView {
        namespace: "subjects".into(),
        subjects: Some(vec!["shop.payments".into()]),
        issuer: Some("https://issuer.example".into()),
        signing_algorithms: Some(vec!["RS256".into()]),
        pod_events: Vec::new(),
    };
    state
}

#[test]
fn a_federated_identity_is_served_without_an_assignment_and_its_backend_is_named() {
    let e = explained(&federated_state(), "web");
    assert_eq!(e.agent.verdict, Verdict::Serve, "{}", e.agent.detail);
    assert!(
        e.assignments[0].status.starts_with("none needed"),
        "{:?}",
        e.assignments
    );
    let backend = &e.backends[0];
    assert_eq!(backend.backend, pod_identity_api::federation::Backend::Federated);
    assert_eq!(
        backend.because,
        "annotation aadpodidentity.k8s.io/backend: federated"
    );
    assert_eq!(
        backend.subject.as_deref(),
        Some("system:serviceaccount:subjects:shop.payments")
    );
    assert!(backend.problems.is_empty(), "{:?}", backend.problems);
    let human = e.to_human();
    assert!(
        human.contains("identity shop/payments: federated backend"),
        "{human}"
    );
    assert!(human.contains("with issuer https://issuer.example"), "{human}");
}

#[test]
fn the_node_backend_is_the_default_and_said_so() {
    let e = explained(&state(), "web");
    assert_eq!(e.backends[0].backend, pod_identity_api::federation::Backend::Node);
    assert!(e.backends[0].because.contains("the default"));
    assert!(e.backends[0].serves.contains("Instance Metadata Service"));
}

#[test]
fn why_a_federation_fails_is_listed() {
    let mut state = federated_state();
    state.federation.subjects = Some(Vec::new());
    state.federation.signing_algorithms = Some(vec!["ES256".into()]);
    state.identities[0].metadata.annotations.as_mut().unwrap().insert(
        pod_identity_api::federation::CREDENTIAL_STATUS_ANNOTATION.to_owned(),
        "not created: /x has 20 federated identity credentials, the most Entra ID allows (20)".to_owned(),
    );
    state.federation.pod_events = vec![
        ("TokenUpstreamError".into(), "could not get a token for shop/other: ...".into()),
        (
            "TokenUpstreamError".into(),
            "could not get a token for shop/payments: refused (401 invalid_client): no federated identity credential matches".into(),
        ),
    ];
    let e = explained(&state, "web");
    let problems = e.backends[0].problems.join("\n");
    for part in [
        "ServiceAccount subjects/shop.payments, does not exist",
        "signs service-account tokens with ES256",
        "20 federated identity credentials",
        "the agent last reported (TokenUpstreamError): could not get a token for shop/payments",
    ] {
        assert!(problems.contains(part), "{part}:\n{problems}");
    }
    assert!(!problems.contains("shop/other"), "{problems}");
}

#[test]
fn with_attested_callers_a_host_network_pod_gets_its_own_identities_only() {
    let mut state = state();
    for pod in &mut state.pods {
        pod.spec.as_mut().unwrap().host_network = Some(true);
    }
    state
        .assignments
        .push(assignment("shop", "web", "payments", "Assigned"));
    let attested = |name| {
        explain(
            &state,
            "shop",
            name,
            Scope::Namespaced,
            Mode::Standard,
            Callers::Attested,
        )
        .unwrap()
    };
    let bound = attested("web");
    assert_eq!(bound.agent.verdict, Verdict::Serve, "{}", bound.agent.detail);
    assert!(
        bound.agent.detail.contains("knows it by its processes"),
        "{}",
        bound.agent.detail
    );
    assert!(
        bound.agent.detail.contains("shop/payments"),
        "{}",
        bound.agent.detail
    );
    // An unbound host-network pod is refused, not sent to the node's identities.
    let unbound = attested("plain");
    assert_eq!(unbound.agent.verdict, Verdict::Refuse, "{}", unbound.agent.detail);
    // Its address (the node's) plays no part: pods sharing it are not ambiguous callers.
    assert!(
        !bound.agent.detail.contains("several pods"),
        "{}",
        bound.agent.detail
    );
}
