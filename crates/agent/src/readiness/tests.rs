use pod_identity_api::{
    fixtures::{binding, service_principal, user_assigned_identity},
    pod::Containers,
    readiness::PodGate,
};
use serde_json::json;

use super::*;
use crate::resolve::tests::{CLIENT_A, CLIENT_B, assign, managed, pod, standard, synced_world};

fn all(state: TokenState) -> impl Fn(&Principal) -> TokenState {
    move |_| state.clone()
}

/// A world where pod ns/web is bound to id-a and id-b.
fn two_identities() -> (crate::world::World, PodRecord) {
    let mut world = synced_world();
    world.matching.replace_identities([
        user_assigned_identity("ns", "id-a", CLIENT_A),
        user_assigned_identity("ns", "id-b", CLIENT_B),
    ]);
    world.matching.replace_bindings([
        binding("ns", "a", "id-a", "web"),
        binding("ns", "b", "id-b", "web"),
    ]);
    let web = pod("ns", "web", Some("web"));
    world.upsert_pod(web.clone());
    (world, web)
}

#[test]
fn ready_only_once_every_identity_is_assigned_and_has_a_token() {
    let (mut world, web) = two_identities();
    let a = &world.matching.identity("ns", "id-a").unwrap().clone();
    let b = &world.matching.identity("ns", "id-b").unwrap().clone();

    let identities = resolve::pod_identities(&world, standard(), &web).unwrap();
    let decided = condition(&identities, &all(TokenState::Fetched));
    assert!(!decided.status);
    assert_eq!(decided.reason, "IdentityNotAssigned");
    assert!(decided.message.contains("ns/id-a"), "{}", decided.message);

    assign(&mut world, &web, a, "Assigned");
    assign(&mut world, &web, b, "Created");
    let identities = resolve::pod_identities(&world, standard(), &web).unwrap();
    let decided = condition(&identities, &all(TokenState::Fetched));
    assert_eq!(
        (decided.status, decided.reason.as_str()),
        (false, "IdentityNotAssigned"),
        "one of two is not enough"
    );
    assert!(decided.message.contains("'Created'"), "{}", decided.message);

    assign(&mut world, &web, b, "Assigned");
    let identities = resolve::pod_identities(&world, standard(), &web).unwrap();
    let decided = condition(&identities, &all(TokenState::Fetching));
    assert_eq!(
        (decided.status, decided.reason.as_str()),
        (false, "TokenNotFetched")
    );

    // One token fetched, the other not yet.
    let a_principal = Principal::Managed {
        client_id: CLIENT_A.to_ascii_lowercase(),
    };
    let one = move |p: &Principal| {
        if *p == a_principal {
            TokenState::Fetched
        } else {
            TokenState::Fetching
        }
    };
    let decided = condition(&identities, &one);
    assert_eq!(
        (decided.status, decided.reason.as_str()),
        (false, "TokenNotFetched")
    );
    assert!(decided.message.contains("ns/id-b") && !decided.message.contains("ns/id-a"));

    let decided = condition(&identities, &all(TokenState::Fetched));
    assert_eq!(
        (decided.status, decided.reason.as_str()),
        (true, "IdentitiesReady")
    );
    assert!(
        decided.message.contains("ns/id-a, ns/id-b"),
        "{}",
        decided.message
    );
}

#[test]
fn a_failed_fetch_is_said_and_wins_over_one_still_running() {
    let (mut world, web) = two_identities();
    let objects: Vec<_> = world.matching.identities().cloned().collect();
    for object in objects {
        assign(&mut world, &web, &object, "Assigned");
    }
    let identities = resolve::pod_identities(&world, standard(), &web).unwrap();
    let b = Principal::Managed {
        client_id: CLIENT_B.to_ascii_lowercase(),
    };
    let states = move |p: &Principal| {
        if *p == b {
            TokenState::Failed("IMDS answered 400: Identity not found".into())
        } else {
            TokenState::Fetching
        }
    };
    let decided = condition(&identities, &states);
    assert_eq!(
        (decided.status, decided.reason.as_str()),
        (false, "TokenFetchFailed")
    );
    assert!(
        decided.message.contains("ns/id-b: IMDS answered 400"),
        "{}",
        decided.message
    );
}

#[test]
fn a_pod_no_binding_selects_is_not_ready_and_told_why() {
    let mut world = synced_world();
    let web = pod("ns", "web", Some("nobody"));
    world.upsert_pod(web.clone());
    let identities = resolve::pod_identities(&world, standard(), &web).unwrap();
    let decided = condition(&identities, &all(TokenState::Fetched));
    assert_eq!(
        (decided.status, decided.reason.as_str()),
        (false, "IdentityNotBound")
    );
    assert!(
        decided.message.contains("selector 'nobody'"),
        "{}",
        decided.message
    );
}

#[test]
fn managed_mode_needs_only_the_token_and_service_principals_count_too() {
    let mut world = synced_world();
    world
        .matching
        .replace_identities([service_principal("ns", "sp", CLIENT_A)]);
    world.matching.replace_bindings([binding("ns", "a", "sp", "web")]);
    let web = pod("ns", "web", Some("web"));
    world.upsert_pod(web.clone());
    let identities = resolve::pod_identities(&world, managed(), &web).unwrap();
    assert_eq!(
        condition(&identities, &all(TokenState::Fetching)).reason,
        "TokenNotFetched"
    );
    assert!(condition(&identities, &all(TokenState::Fetched)).status);
}

#[test]
fn nothing_is_decided_before_the_watches_synced() {
    let (mut world, web) = two_identities();
    world.synced.assigned = false;
    assert!(resolve::pod_identities(&world, standard(), &web).is_none());
}

#[test]
fn only_running_pods_that_carry_the_gate_are_written_to() {
    let mut web = pod("ns", "web", Some("web"));
    assert!(!wanted(&web), "no gate: the pod does not wait for the condition");
    web.gate.gated = true;
    assert!(wanted(&web));
    let mut finished = web.clone();
    finished.view.phase = Some("Succeeded".into());
    finished.view.containers = Containers::NoneRunning;
    assert!(!wanted(&finished));
    let mut deleting = web.clone();
    deleting.view.deleting = true;
    assert!(!wanted(&deleting));
}

#[test]
fn the_gate_and_the_condition_are_read_from_the_pod() {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "ns"},
        "spec": {
            "containers": [{"name": "c", "image": "i"}],
            "readinessGates": [{"conditionType": "other"}, {"conditionType": "IdentityReady"}],
        },
        "status": {"conditions": [
            {"type": "Ready", "status": "False"},
            {"type": "IdentityReady", "status": "True", "reason": "IdentitiesReady", "message": "m"},
        ]},
    }))
    .unwrap();
    assert_eq!(
        PodGate::of(&pod),
        PodGate {
            gated: true,
            condition: Some(Condition {
                status: true,
                reason: "IdentitiesReady".into(),
                message: "m".into(),
            }),
        }
    );
    let ungated: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "c", "image": "i"}], "readinessGates": [{"conditionType": "other"}]},
    }))
    .unwrap();
    assert_eq!(PodGate::of(&ungated), PodGate::default());
}

#[test]
fn the_transition_time_moves_only_when_the_status_does() {
    let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
    let not_yet = Condition::new(false, "TokenNotFetched", "fetching".into());
    let still_not = Condition::new(false, "TokenFetchFailed", "failed".into());
    let ready = Condition::new(true, "IdentitiesReady", "ok".into());

    let first = patch(Some("uid-1"), &not_yet, None, now);
    assert_eq!(
        first,
        json!({
            "metadata": {"uid": "uid-1"},
            "status": {"conditions": [{
                "type": "IdentityReady", "status": "False", "reason": "TokenNotFetched",
                "message": "fetching", "lastTransitionTime": "2027-01-15T08:00:00Z",
            }]},
        })
    );
    let same_status = patch(Some("uid-1"), &still_not, Some(&not_yet), now);
    assert!(
        same_status["status"]["conditions"][0]
            .get("lastTransitionTime")
            .is_none()
    );
    assert_eq!(
        same_status["status"]["conditions"][0]["reason"],
        "TokenFetchFailed"
    );
    let flipped = patch(Some("uid-1"), &ready, Some(&still_not), now);
    assert_eq!(flipped["status"]["conditions"][0]["status"], "True");
    assert!(
        flipped["status"]["conditions"][0]
            .get("lastTransitionTime")
            .is_some()
    );
}

#[test]
fn a_long_refusal_is_cut_for_the_condition_message() {
    let decided = condition(
        &PodIdentities::Refused("é".repeat(2000)),
        &all(TokenState::Fetched),
    );
    assert!(decided.message.len() <= MAX_MESSAGE_BYTES);
}
