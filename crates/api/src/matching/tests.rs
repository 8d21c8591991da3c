//! One test per matching rule, named after the rule.

use super::*;
use crate::{
    POD_LABEL,
    fixtures::{CLIENT_ID, binding, exception, pod_view, service_principal, user_assigned_identity},
    pod::Containers,
};

/// A running pod of `node` bound by `selector`, with a UID made from its name.
fn pod(namespace: &str, name: &str, selector: &str, node: &str) -> PodView {
    pod_view(namespace, name)
        .with_uid(&format!("uid-{name}"))
        .with_selector(selector)
        .on_node(node)
}

struct Fixture {
    bindings: Vec<AzureIdentityBinding>,
    identities: Vec<AzureIdentity>,
    exceptions: Vec<AzurePodIdentityException>,
    scope: Scope,
}

impl Fixture {
    fn new(identities: Vec<AzureIdentity>, bindings: Vec<AzureIdentityBinding>) -> Self {
        Self {
            bindings,
            identities,
            exceptions: Vec::new(),
            scope: Scope::Namespaced,
        }
    }

    fn cross_namespace(mut self) -> Self {
        self.scope = Scope::CrossNamespace;
        self
    }

    fn world(&self) -> World<'_> {
        World {
            bindings: &self.bindings,
            identities: &self.identities,
            exceptions: &self.exceptions,
            scope: self.scope,
        }
    }

    fn desired(&self, pods: &[PodView]) -> Desired {
        desired_assignments(pods, self.world())
    }

    fn decide(&self, pod: &PodView) -> PodDecision {
        Index::new(self.world()).decide(pod)
    }

    fn names(&self, pods: &[PodView]) -> Vec<String> {
        self.desired(pods)
            .assignments
            .into_iter()
            .map(|a| a.assignment.to_string())
            .collect()
    }
}

#[test]
fn matching_selector_in_same_namespace_assigns_identity() {
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![binding("shop", "payments-binding", "payments", "pay")],
    );
    let desired = fx.desired(&[pod("shop", "web", "pay", "node-1")]);
    assert_eq!(
        desired.assignments,
        vec![DesiredAssignment {
            assignment: ObjectKey::new("shop", "web-shop-payments"),
            pod: ObjectKey::new("shop", "web"),
            pod_uid: Some("uid-web".into()),
            node: "node-1".into(),
            identity: ObjectKey::new("shop", "payments"),
            binding: ObjectKey::new("shop", "payments-binding"),
            rank: 0,
        }]
    );
    assert!(desired.collisions.is_empty());
}

#[test]
fn selector_is_compared_by_exact_string_equality() {
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![binding("shop", "b", "payments", "Pay")],
    );
    assert!(fx.names(&[pod("shop", "web", "pay", "n")]).is_empty());
    assert!(fx.names(&[pod("shop", "web", "Pay-x", "n")]).is_empty());
    assert_eq!(
        fx.names(&[pod("shop", "web", "Pay", "n")]),
        vec!["shop/web-shop-payments"]
    );
}

/// A pod's labels and life decide whether it gets the identity its label binds. Each row is a former
/// test: `pod_without_label_or_with_empty_label_gets_nothing`,
/// `a_pod_being_deleted_keeps_its_identities_until_its_containers_stop` and
/// `finished_pods_release_their_identities`.
#[test]
fn a_pods_label_and_life_decide_whether_it_gets_its_identity() {
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![binding("shop", "b", "payments", "pay")],
    );
    let with = |change: fn(&mut PodView)| {
        let mut pod = pod("shop", "web", "pay", "n");
        change(&mut pod);
        pod
    };
    // (row, pod, assignments, skip; `None` where the row asserts its assignments only)
    let rows: [(&str, PodView, usize, Option<Option<PodSkip>>); 12] = [
        (
            "no label",
            with(|p| p.labels.clear()),
            0,
            Some(Some(PodSkip::NotLabelled)),
        ),
        (
            "empty label",
            pod("shop", "web2", "", "n"),
            0,
            Some(Some(PodSkip::NotLabelled)),
        ),
        // SIGTERM handlers run through the grace period and need their tokens.
        (
            "deleted, containers running",
            with(|p| {
                p.deleting = true;
                p.containers = Containers::Running;
            }),
            1,
            Some(None),
        ),
        (
            "deleted, containers unreported",
            with(|p| {
                p.deleting = true;
                p.containers = Containers::Unreported;
            }),
            1,
            Some(None),
        ),
        (
            "deleted, every container stopped",
            with(|p| {
                p.deleting = true;
                p.containers = Containers::NoneRunning;
            }),
            0,
            Some(Some(PodSkip::Finished(Ending::Stopped))),
        ),
        (
            "phase Succeeded",
            with(|p| p.phase = Some("Succeeded".into())),
            0,
            Some(Some(PodSkip::Finished(Ending::Succeeded))),
        ),
        // Being deleted changes nothing for a pod that finished.
        (
            "phase Succeeded, deleted",
            with(|p| {
                p.phase = Some("Succeeded".into());
                p.deleting = true;
            }),
            0,
            None,
        ),
        (
            "phase Failed",
            with(|p| p.phase = Some("Failed".into())),
            0,
            Some(Some(PodSkip::Finished(Ending::Failed))),
        ),
        (
            "phase Failed, deleted",
            with(|p| {
                p.phase = Some("Failed".into());
                p.deleting = true;
            }),
            0,
            None,
        ),
        (
            "phase Pending",
            with(|p| p.phase = Some("Pending".into())),
            1,
            None,
        ),
        (
            "phase Running",
            with(|p| p.phase = Some("Running".into())),
            1,
            None,
        ),
        (
            "phase Unknown",
            with(|p| p.phase = Some("Unknown".into())),
            1,
            None,
        ),
    ];
    for (row, pod, assignments, skipped) in rows {
        assert_eq!(
            fx.names(std::slice::from_ref(&pod)).len(),
            assignments,
            "{row}: assignments"
        );
        if let Some(skipped) = skipped {
            assert_eq!(fx.decide(&pod).skipped, skipped, "{row}: skip");
        }
    }
}
#[test]
fn pod_without_node_gets_nothing_until_scheduled() {
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![binding("shop", "b", "payments", "pay")],
    );
    let mut pending = pod("shop", "web", "pay", "n");
    pending.node_name = None;
    assert!(fx.names(std::slice::from_ref(&pending)).is_empty());
    let decision = fx.decide(&pending);
    assert_eq!(decision.skipped, Some(PodSkip::NotScheduled));
    assert_eq!(
        decision.candidates.len(),
        1,
        "the binding that will apply once scheduled is shown"
    );
    assert_eq!(decision.candidates[0].outcome, Ok(0));
}

#[test]
fn host_network_pods_are_matched_like_any_other() {
    // They reach IMDS directly (their traffic is not intercepted), so their identity must be on the
    // machine as for any pod; only the agent's lookup by address leaves them out.
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![binding("shop", "b", "payments", "pay")],
    );
    let mut host = pod("shop", "csi", "pay", "n");
    host.host_network = true;
    assert_eq!(fx.names(&[host]).len(), 1);
}

#[test]
fn binding_to_missing_identity_is_reported_and_assigns_nothing() {
    let fx = Fixture::new(vec![], vec![binding("shop", "b", "ghost", "pay")]);
    let web = pod("shop", "web", "pay", "n");
    assert!(fx.names(std::slice::from_ref(&web)).is_empty());
    assert_eq!(
        fx.decide(&web).candidates[0].outcome,
        Err(Rejection::IdentityMissing(ObjectKey::new("shop", "ghost")))
    );
}

#[test]
fn binding_refers_to_identity_in_its_own_namespace_only() {
    // The identity exists, but in another namespace than the binding: it is not found.
    let fx = Fixture::new(
        vec![user_assigned_identity("other", "payments", CLIENT_ID)],
        vec![binding("shop", "b", "payments", "pay")],
    )
    .cross_namespace();
    let web = pod("shop", "web", "pay", "n");
    assert!(fx.names(std::slice::from_ref(&web)).is_empty());
    assert_eq!(
        fx.decide(&web).candidates[0].outcome,
        Err(Rejection::IdentityMissing(ObjectKey::new("shop", "payments")))
    );
}

#[test]
fn namespaced_scope_ignores_bindings_of_other_namespaces() {
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![binding("shop", "b", "payments", "pay")],
    );
    let intruder = pod("attacker", "evil", "pay", "n");
    assert!(fx.names(std::slice::from_ref(&intruder)).is_empty());
    assert_eq!(
        fx.decide(&intruder).candidates[0].outcome,
        Err(Rejection::OtherNamespace)
    );
}

#[test]
fn cross_namespace_scope_matches_any_namespace_and_records_in_default() {
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![binding("shop", "b", "payments", "pay")],
    )
    .cross_namespace();
    assert_eq!(
        fx.names(&[pod("frontend", "web", "pay", "n")]),
        vec!["default/web-frontend-payments"]
    );
}

#[test]
fn cross_namespace_scope_respects_namespaced_annotation_on_identity() {
    let id = user_assigned_identity("shop", "payments", CLIENT_ID)
        .with_annotation(BEHAVIOR_ANNOTATION, BEHAVIOR_NAMESPACED);
    let fx = Fixture::new(vec![id], vec![binding("shop", "b", "payments", "pay")]).cross_namespace();
    let outsider = pod("frontend", "web", "pay", "n");
    assert!(fx.names(std::slice::from_ref(&outsider)).is_empty());
    assert_eq!(
        fx.decide(&outsider).candidates[0].outcome,
        Err(Rejection::IdentityNamespaced)
    );
    // Pods of the identity's own namespace still get it, recorded in that namespace.
    assert_eq!(
        fx.names(&[pod("shop", "web", "pay", "n")]),
        vec!["shop/web-shop-payments"]
    );
}

#[test]
fn same_identity_name_in_two_namespaces_keeps_the_higher_ranked_binding() {
    // Cross-namespace: both bindings match a pod of a third namespace and both assignments would be
    // named web-frontend-payments in `default`.
    let fx = Fixture::new(
        vec![
            user_assigned_identity("a", "payments", CLIENT_ID),
            user_assigned_identity("b", "payments", CLIENT_ID),
        ],
        vec![
            binding("b", "bind", "payments", "pay"),
            binding("a", "bind", "payments", "pay"),
        ],
    )
    .cross_namespace();
    let web = pod("frontend", "web", "pay", "n");
    let desired = fx.desired(std::slice::from_ref(&web));
    assert_eq!(desired.assignments.len(), 1);
    assert_eq!(
        desired.assignments[0].identity,
        ObjectKey::new("a", "payments"),
        "namespace a sorts first"
    );
    let decision = fx.decide(&web);
    assert_eq!(
        decision.candidates[1].outcome,
        Err(Rejection::NameTaken {
            kept: ObjectKey::new("a", "bind"),
            same_identity: false
        })
    );
}

#[test]
fn weight_decides_which_duplicate_wins_and_the_default_identity() {
    let fx = Fixture::new(
        vec![
            user_assigned_identity("a", "payments", CLIENT_ID),
            user_assigned_identity("b", "payments", CLIENT_ID),
        ],
        vec![
            binding("a", "bind", "payments", "pay"),
            binding("b", "bind", "payments", "pay").with_weight(10),
        ],
    )
    .cross_namespace();
    let desired = fx.desired(&[pod("frontend", "web", "pay", "n")]);
    assert_eq!(desired.assignments[0].identity, ObjectKey::new("b", "payments"));
}

#[test]
fn two_bindings_of_one_identity_give_one_assignment() {
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![
            binding("shop", "one", "payments", "pay"),
            binding("shop", "two", "payments", "pay"),
        ],
    );
    let web = pod("shop", "web", "pay", "n");
    assert_eq!(
        fx.names(std::slice::from_ref(&web)),
        vec!["shop/web-shop-payments"]
    );
    assert_eq!(
        fx.decide(&web).candidates[1].outcome,
        Err(Rejection::NameTaken {
            kept: ObjectKey::new("shop", "one"),
            same_identity: true
        })
    );
}

#[test]
fn several_identities_per_pod_are_ranked_by_weight_then_namespace_and_name() {
    let fx = Fixture::new(
        vec![
            user_assigned_identity("shop", "a-id", CLIENT_ID),
            user_assigned_identity("shop", "b-id", CLIENT_ID),
            user_assigned_identity("shop", "c-id", CLIENT_ID),
        ],
        vec![
            binding("shop", "c", "c-id", "pay"),
            binding("shop", "b", "b-id", "pay").with_weight(5),
            binding("shop", "a", "a-id", "pay"),
        ],
    );
    let decision = fx.decide(&pod("shop", "web", "pay", "n"));
    let ranked: Vec<(&str, usize)> = decision
        .assignments
        .iter()
        .map(|a| (a.identity.name.as_str(), a.rank))
        .collect();
    assert_eq!(ranked, vec![("b-id", 0), ("a-id", 1), ("c-id", 2)]);
}

#[test]
fn negative_weight_ranks_below_absent_weight() {
    let fx = Fixture::new(
        vec![
            user_assigned_identity("shop", "a-id", CLIENT_ID),
            user_assigned_identity("shop", "b-id", CLIENT_ID),
        ],
        vec![
            binding("shop", "a", "a-id", "pay").with_weight(-1),
            binding("shop", "b", "b-id", "pay"),
        ],
    );
    let decision = fx.decide(&pod("shop", "web", "pay", "n"));
    assert_eq!(decision.assignments[0].identity.name, "b-id");
}

#[test]
fn binding_with_empty_selector_matches_no_pod() {
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![binding("shop", "b", "payments", "")],
    );
    let mut labelled_empty = pod("shop", "web", "", "n");
    labelled_empty.labels.insert(POD_LABEL.into(), String::new());
    assert!(
        fx.names(&[labelled_empty, pod("shop", "web2", "pay", "n")])
            .is_empty()
    );
}

#[test]
fn binding_with_empty_identity_name_is_rejected_as_invalid() {
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![binding("shop", "b", "", "pay")],
    );
    let web = pod("shop", "web", "pay", "n");
    assert!(fx.names(std::slice::from_ref(&web)).is_empty());
    assert!(
        matches!(fx.decide(&web).candidates[0].outcome, Err(Rejection::InvalidBinding(ref e)) if e[0].field == "azureIdentity")
    );
}

#[test]
fn invalid_identity_is_skipped_and_reported() {
    let mut bad = user_assigned_identity("shop", "payments", CLIENT_ID);
    bad.spec.resource_id =
        Some("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm".into());
    let fx = Fixture::new(
        vec![bad, user_assigned_identity("shop", "good", CLIENT_ID)],
        vec![
            binding("shop", "b1", "payments", "pay"),
            binding("shop", "b2", "good", "pay"),
        ],
    );
    let web = pod("shop", "web", "pay", "n");
    assert_eq!(
        fx.names(std::slice::from_ref(&web)),
        vec!["shop/web-shop-good"],
        "the valid one still applies"
    );
    let decision = fx.decide(&web);
    assert!(matches!(
        &decision.candidates[0].outcome,
        Err(Rejection::InvalidIdentity(key, errors)) if key.name == "payments" && errors[0].field == "resourceID"
    ));
}

#[test]
fn service_principal_identities_are_assigned_too() {
    let sp = service_principal("shop", "sp", CLIENT_ID);
    let fx = Fixture::new(vec![sp], vec![binding("shop", "b", "sp", "pay")]);
    assert_eq!(
        fx.names(&[pod("shop", "web", "pay", "n")]),
        vec!["shop/web-shop-sp"]
    );
}

#[test]
fn exceptions_match_any_label_case_insensitively_in_the_pod_namespace_only() {
    let mut fx = Fixture::new(
        vec![user_assigned_identity("shop", "payments", CLIENT_ID)],
        vec![binding("shop", "b", "payments", "pay")],
    );
    fx.exceptions = vec![exception(
        "shop",
        "allow-agent",
        &[("app", "Agent"), ("tier", "system")],
    )];
    let mut agent = pod("shop", "agent", "pay", "n");
    agent.labels.insert("app".into(), "agent".into());
    let decision = fx.decide(&agent);
    assert!(decision.excepted);
    assert_eq!(
        decision.assignments.len(),
        1,
        "an excepted pod that is bound still gets its identity"
    );

    let mut elsewhere = agent.clone();
    elsewhere.key.namespace = "other".into();
    assert!(!fx.decide(&elsewhere).excepted);

    let mut other_value = pod("shop", "web", "pay", "n");
    other_value.labels.insert("app".into(), "web".into());
    assert!(!fx.decide(&other_value).excepted);
}

#[test]
fn result_is_sorted_and_independent_of_input_order() {
    let identities = vec![
        user_assigned_identity("shop", "x", CLIENT_ID),
        user_assigned_identity("shop", "y", CLIENT_ID),
        user_assigned_identity("blog", "x", CLIENT_ID),
    ];
    let bindings = vec![
        binding("shop", "bx", "x", "s"),
        binding("shop", "by", "y", "s"),
        binding("blog", "bx", "x", "b"),
    ];
    let pods = vec![
        pod("shop", "w2", "s", "n2"),
        pod("blog", "w1", "b", "n1"),
        pod("shop", "w1", "s", "n1"),
    ];
    let forward = Fixture::new(identities.clone(), bindings.clone());
    let mut rev_ids = identities;
    rev_ids.reverse();
    let mut rev_bindings = bindings;
    rev_bindings.reverse();
    let backward = Fixture::new(rev_ids, rev_bindings);
    let mut rev_pods = pods.clone();
    rev_pods.reverse();
    let a = forward.desired(&pods);
    assert_eq!(a, backward.desired(&rev_pods));
    let names: Vec<String> = a.assignments.iter().map(|x| x.assignment.to_string()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(names.len(), 5);
}

#[test]
fn ambiguous_names_of_different_pods_are_reported_as_collisions() {
    let fx = Fixture::new(
        vec![user_assigned_identity("shop", "id", CLIENT_ID)],
        vec![binding("shop", "b", "id", "s")],
    )
    .cross_namespace();
    // pod "a-b" in namespace "c" and pod "a" in namespace "b-c" both give "a-b-c-id" in `default`.
    let desired = fx.desired(&[pod("c", "a-b", "s", "n"), pod("b-c", "a", "s", "n")]);
    assert_eq!(desired.assignments.len(), 1);
    assert_eq!(desired.collisions.len(), 1);
    assert_eq!(
        desired.assignments[0].pod,
        ObjectKey::new("b-c", "a"),
        "deterministic: pods ordered by key"
    );
    assert_eq!(desired.collisions[0].1.pod, ObjectKey::new("c", "a-b"));
}

/// What every pod of `pods` is decided, by an index.
fn decisions(index: &Index, pods: &[PodView]) -> Vec<PodDecision> {
    pods.iter().map(|pod| index.decide(pod)).collect()
}

#[test]
fn an_index_kept_by_events_decides_as_one_built_from_the_final_lists() {
    let pods = [
        pod("shop", "web", "pay", "node-1"),
        pod("shop", "api", "audit", "node-1"),
        pod("bank", "ledger", "pay", "node-2"),
    ];
    let mut kept = Index::empty(Scope::Namespaced);
    kept.upsert_identity(user_assigned_identity("shop", "payments", CLIENT_ID));
    kept.upsert_identity(user_assigned_identity("shop", "audit", CLIENT_ID));
    kept.upsert_binding(binding("shop", "b1", "payments", "pay"));
    kept.upsert_binding(binding("shop", "b2", "audit", "pay").with_weight(5));
    kept.upsert_binding(binding("shop", "b3", "audit", "audit"));
    kept.upsert_exception(exception("shop", "skip", &[(POD_LABEL, "audit")]));
    // A binding moves to another selector, another changes weight, one goes; an identity and an exception go.
    kept.upsert_binding(binding("shop", "b3", "audit", "none"));
    kept.upsert_binding(binding("shop", "b1", "payments", "pay").with_weight(9));
    kept.upsert_binding(binding("bank", "b4", "payments", "pay"));
    assert!(kept.remove_binding(&ObjectKey::new("bank", "b4")));
    assert!(
        !kept.remove_binding(&ObjectKey::new("bank", "b4")),
        "already gone"
    );
    kept.upsert_identity(user_assigned_identity("bank", "payments", CLIENT_ID));
    assert!(kept.remove_identity(&ObjectKey::new("bank", "payments")));
    assert!(kept.remove_exception(&ObjectKey::new("shop", "skip")));

    let fx = Fixture {
        bindings: vec![
            binding("shop", "b1", "payments", "pay").with_weight(9),
            binding("shop", "b2", "audit", "pay").with_weight(5),
            binding("shop", "b3", "audit", "none"),
        ],
        identities: vec![
            user_assigned_identity("shop", "payments", CLIENT_ID),
            user_assigned_identity("shop", "audit", CLIENT_ID),
        ],
        exceptions: Vec::new(),
        scope: Scope::Namespaced,
    };
    let built = Index::new(fx.world());
    assert_eq!(decisions(&kept, &pods), decisions(&built, &pods));
    let web = kept.decide(&pods[0]);
    let ranked: Vec<&str> = web.candidates.iter().map(|c| c.binding.name.as_str()).collect();
    assert_eq!(ranked, ["b1", "b2"], "the weight change re-ranked the bindings");
    assert!(!kept.decide(&pods[1]).excepted, "the exception went");
    assert_eq!(
        (
            kept.binding_count(),
            kept.identity_count(),
            kept.exception_count()
        ),
        (3, 2, 0)
    );
}

#[test]
fn a_relist_replaces_everything_and_the_last_copy_of_a_repeated_object_counts() {
    let mut index = Index::empty(Scope::Namespaced);
    index.upsert_binding(binding("shop", "old", "payments", "pay"));
    index.upsert_exception(exception("shop", "skip", &[(POD_LABEL, "pay")]));
    index.replace_bindings([
        binding("shop", "b1", "payments", "other"),
        binding("shop", "b1", "payments", "pay"),
    ]);
    index.replace_identities([user_assigned_identity("shop", "payments", CLIENT_ID)]);
    index.replace_exceptions([]);
    let decision = index.decide(&pod("shop", "web", "pay", "node-1"));
    assert!(!decision.excepted);
    let bindings: Vec<&str> = decision
        .candidates
        .iter()
        .map(|c| c.binding.name.as_str())
        .collect();
    assert_eq!(bindings, ["b1"]);
    assert_eq!(decision.assignments.len(), 1);
    assert_eq!(index.binding_count(), 1);
    assert!(
        index
            .decide(&pod("shop", "api", "other", "node-1"))
            .candidates
            .is_empty()
    );
}

#[test]
fn a_binding_without_a_selector_is_kept_and_matches_no_pod() {
    let mut index = Index::empty(Scope::Namespaced);
    let mut unselective = binding("shop", "b", "payments", "");
    unselective.spec.selector = None;
    index.upsert_binding(unselective);
    index.upsert_identity(user_assigned_identity("shop", "payments", CLIENT_ID));
    assert_eq!(index.binding_count(), 1);
    assert_eq!(index.bindings().count(), 1);
    let mut unlabelled = pod("shop", "web", "", "node-1");
    unlabelled.labels.clear();
    assert!(index.decide(&unlabelled).candidates.is_empty());
    assert!(
        index
            .decide(&pod("shop", "web", "", "node-1"))
            .candidates
            .is_empty()
    );
    assert!(index.remove_binding(&ObjectKey::new("shop", "b")));
    assert_eq!(index.bindings().count(), 0);
}
