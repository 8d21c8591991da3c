use pod_identity_api::{
    answer::AssignedView,
    fixtures::{
        binding, exception, federated_identity, pod_view, service_principal, user_assigned_identity,
        user_assigned_identity_id,
    },
    matching::{Index, Scope},
    naming::assigned_identity_name,
    pod::Containers,
};

use super::*;
use crate::world::Synced;

pub(crate) const CLIENT_A: &str = "11111111-1111-1111-1111-111111111111";
pub(crate) const CLIENT_B: &str = "22222222-2222-2222-2222-222222222222";
/// A running pod of node `node-a` at 10.244.0.2, bound by `selector` when it has one.
pub(crate) fn pod(namespace: &str, name: &str, selector: Option<&str>) -> PodRecord {
    let mut view = pod_view(namespace, name)
        .with_uid(&format!("uid-{name}"))
        .on_node("node-a")
        .with_ip("10.244.0.2".parse().unwrap());
    if let Some(selector) = selector {
        view = view.with_selector(selector);
    }
    PodRecord {
        view,
        created: None,
        service_account: None,
        gate: Default::default(),
    }
}

pub(crate) fn synced_world() -> World {
    let mut world = World::default();
    world.synced = Synced {
        pods: true,
        assigned: true,
        bindings: true,
        identities: true,
        exceptions: true,
    };
    world
}

pub(crate) fn assign(world: &mut World, pod: &PodRecord, identity: &AzureIdentity, status: &str) {
    let name = identity.metadata.name.clone().unwrap();
    let namespace = identity.metadata.namespace.clone().unwrap();
    world.upsert_assigned(AssignedView {
        key: ObjectKey::new(
            namespace,
            assigned_identity_name(&pod.view.key.name, &pod.view.key.namespace, &name),
        ),
        pod: pod.view.key.clone(),
        client_id: identity.spec.client_id.clone(),
        status: AssignmentStatus::parse(Some(status)),
    });
}

pub(crate) fn standard() -> Policy {
    Policy::default()
}

pub(crate) fn managed() -> Policy {
    Policy { mode: Mode::Managed }
}

fn served_client(resolution: &Resolution) -> Option<String> {
    match resolution {
        Resolution::Serve(grant) => grant.object.spec.client_id.clone(),
        _ => None,
    }
}

#[test]
fn a_pod_without_the_label_is_refused_at_once_and_told_why() {
    let world = synced_world();
    let resolution = resolve(
        &world,
        standard(),
        &pod("ns", "web", None),
        &Selector::Default,
        &(),
    );
    assert!(
        matches!(&resolution, Resolution::Deny(why) if why.contains("has no label aadpodidbinding")),
        "{resolution:?}"
    );
}

#[test]
fn a_label_no_binding_carries_is_refused_at_once() {
    let mut world = synced_world();
    world
        .matching
        .upsert_identity(user_assigned_identity("ns", "id-a", CLIENT_A));
    world.matching.upsert_binding(binding("ns", "b", "id-a", "other"));
    let resolution = resolve(
        &world,
        standard(),
        &pod("ns", "web", Some("web")),
        &Selector::Default,
        &(),
    );
    assert!(
        matches!(&resolution, Resolution::Deny(why) if why.contains("no AzureIdentityBinding has selector 'web'")),
        "{resolution:?}"
    );
}

#[test]
fn a_binding_of_another_namespace_gives_nothing_by_default() {
    let mut world = synced_world();
    world
        .matching
        .upsert_identity(user_assigned_identity("other", "id-a", CLIENT_A));
    world
        .matching
        .upsert_binding(binding("other", "b", "id-a", "web"));
    let web = pod("ns", "web", Some("web"));
    let other = world.matching.identity("other", "id-a").unwrap().clone();
    assign(&mut world, &web, &other, "Assigned");
    let resolution = resolve(&world, standard(), &web, &Selector::Default, &());
    assert!(
        matches!(&resolution, Resolution::Deny(why) if why.contains("another namespace")),
        "{resolution:?}"
    );
}

#[test]
fn cross_namespace_scope_lets_it_through() {
    let mut world = synced_world();
    world.matching = Index::empty(Scope::CrossNamespace);
    world
        .matching
        .upsert_identity(user_assigned_identity("other", "id-a", CLIENT_A));
    world
        .matching
        .upsert_binding(binding("other", "b", "id-a", "web"));
    let web = pod("ns", "web", Some("web"));
    world.upsert_assigned(AssignedView {
        key: ObjectKey::new("default", assigned_identity_name("web", "ns", "id-a")),
        pod: web.view.key.clone(),
        client_id: Some(CLIENT_A.into()),
        status: AssignmentStatus::Assigned,
    });
    let resolution = resolve(&world, standard(), &web, &Selector::Default, &());
    assert_eq!(
        served_client(&resolution).as_deref(),
        Some(CLIENT_A),
        "{resolution:?}"
    );
}

#[test]
fn an_assigned_identity_is_served() {
    let mut world = synced_world();
    let id = user_assigned_identity("ns", "id-a", CLIENT_A);
    world.matching.upsert_identity(id.clone());
    world.matching.upsert_binding(binding("ns", "b", "id-a", "web"));
    let web = pod("ns", "web", Some("web"));
    assign(&mut world, &web, &id, "Assigned");
    let resolution = resolve(&world, standard(), &web, &Selector::Default, &());
    assert_eq!(served_client(&resolution).as_deref(), Some(CLIENT_A));
    let Resolution::Serve(grant) = resolution else {
        unreachable!()
    };
    assert_eq!(
        grant.principal,
        Principal::Managed {
            client_id: CLIENT_A.to_owned()
        }
    );
}

/// What the pod's assignment record says decides whether its identity is served or waited for. Rows are
/// the former tests `a_created_or_missing_assignment_means_wait` and
/// `a_legacy_assignment_without_status_is_usable`.
#[test]
fn an_assignment_record_decides_between_serving_and_waiting() {
    // (row, the record's status if there is one, what the resolution must be)
    type Row = (&'static str, Option<&'static str>, fn(&Resolution) -> bool);
    let rows: [Row; 3] = [
        ("no record: wait", None, |r| {
            matches!(r, Resolution::Wait(Pending::Assignment { status: None, .. }))
        }),
        ("created: wait", Some("Created"), |r| {
            matches!(
                r,
                Resolution::Wait(Pending::Assignment {
                    status: Some(AssignmentStatus::Created),
                    ..
                })
            )
        }),
        ("legacy record without status: usable", Some(""), |r| {
            served_client(r).as_deref() == Some(CLIENT_A)
        }),
    ];
    for (row, status, expected) in rows {
        let mut world = synced_world();
        let id = user_assigned_identity("ns", "id-a", CLIENT_A);
        world.matching.upsert_identity(id.clone());
        world.matching.upsert_binding(binding("ns", "b", "id-a", "web"));
        let web = pod("ns", "web", Some("web"));
        if let Some(status) = status {
            assign(&mut world, &web, &id, status);
        }
        let resolution = resolve(&world, standard(), &web, &Selector::Default, &());
        assert!(expected(&resolution), "{row}: {resolution:?}");
    }
}

#[test]
fn an_assignment_of_an_older_client_id_means_wait() {
    let mut world = synced_world();
    let id = user_assigned_identity("ns", "id-a", CLIENT_A);
    world.matching.upsert_binding(binding("ns", "b", "id-a", "web"));
    let web = pod("ns", "web", Some("web"));
    assign(&mut world, &web, &id, "Assigned");
    world
        .matching
        .upsert_identity(user_assigned_identity("ns", "id-a", CLIENT_B));
    assert!(matches!(
        resolve(&world, standard(), &web, &Selector::Default, &()),
        Resolution::Wait(_)
    ));
}

#[test]
fn an_assignment_for_another_pod_of_the_same_name_is_not_ours() {
    let mut world = synced_world();
    let id = user_assigned_identity("ns", "id-a", CLIENT_A);
    world.matching.upsert_identity(id.clone());
    world.matching.upsert_binding(binding("ns", "b", "id-a", "web"));
    let web = pod("ns", "web", Some("web"));
    world.upsert_assigned(AssignedView {
        key: ObjectKey::new("ns", assigned_identity_name("web", "ns", "id-a")),
        pod: ObjectKey::new("ns-web", ""),
        client_id: Some(CLIENT_A.into()),
        status: AssignmentStatus::Assigned,
    });
    assert!(matches!(
        resolve(&world, standard(), &web, &Selector::Default, &()),
        Resolution::Wait(_)
    ));
}

#[test]
fn someone_elses_client_id_is_refused() {
    let mut world = synced_world();
    let mine = user_assigned_identity("ns", "id-a", CLIENT_A);
    world.matching.upsert_identity(mine.clone());
    world
        .matching
        .upsert_identity(user_assigned_identity("ns", "id-b", CLIENT_B));
    world.matching.upsert_binding(binding("ns", "b", "id-a", "web"));
    world.matching.upsert_binding(binding("ns", "b2", "id-b", "db"));
    let web = pod("ns", "web", Some("web"));
    assign(&mut world, &web, &mine, "Assigned");
    let resolution = resolve(
        &world,
        standard(),
        &web,
        &Selector::ClientId(CLIENT_B.into()),
        &(),
    );
    assert!(
        matches!(&resolution, Resolution::Deny(why) if why.contains(CLIENT_B)),
        "{resolution:?}"
    );
}

#[test]
fn client_id_and_resource_id_select_among_the_pods_identities() {
    let mut world = synced_world();
    let a = user_assigned_identity("ns", "id-a", CLIENT_A);
    let b = user_assigned_identity("ns", "id-b", CLIENT_B);
    world.matching.upsert_identity(a.clone());
    world.matching.upsert_identity(b.clone());
    world.matching.upsert_binding(binding("ns", "ba", "id-a", "web"));
    world.matching.upsert_binding(binding("ns", "bb", "id-b", "web"));
    let web = pod("ns", "web", Some("web"));
    assign(&mut world, &web, &a, "Assigned");
    assign(&mut world, &web, &b, "Assigned");
    let upper = CLIENT_B.to_ascii_uppercase();
    assert_eq!(
        served_client(&resolve(
            &world,
            standard(),
            &web,
            &Selector::ClientId(upper),
            &()
        ))
        .as_deref(),
        Some(CLIENT_B)
    );
    let resource = user_assigned_identity_id("s", "id-b").to_ascii_lowercase();
    assert_eq!(
        served_client(&resolve(
            &world,
            standard(),
            &web,
            &Selector::ResourceId(resource),
            &()
        ))
        .as_deref(),
        Some(CLIENT_B)
    );
}

#[test]
fn the_default_identity_is_the_highest_weight_and_waits_for_it() {
    let mut world = synced_world();
    let a = user_assigned_identity("ns", "id-a", CLIENT_A);
    let b = user_assigned_identity("ns", "id-b", CLIENT_B);
    world.matching.upsert_identity(a.clone());
    world.matching.upsert_identity(b.clone());
    world
        .matching
        .upsert_binding(binding("ns", "ba", "id-a", "web").with_weight(1));
    world
        .matching
        .upsert_binding(binding("ns", "bb", "id-b", "web").with_weight(5));
    let web = pod("ns", "web", Some("web"));
    assign(&mut world, &web, &a, "Assigned");
    assign(&mut world, &web, &b, "Created");
    // b outranks a; it is not usable yet, and answering with a would make the default depend on timing.
    assert!(matches!(
        resolve(&world, standard(), &web, &Selector::Default, &()),
        Resolution::Wait(_)
    ));
    assign(&mut world, &web, &b, "Assigned");
    assert_eq!(
        served_client(&resolve(&world, standard(), &web, &Selector::Default, &())).as_deref(),
        Some(CLIENT_B)
    );
}

#[test]
fn managed_mode_serves_bound_identities_without_assignments() {
    let mut world = synced_world();
    world.synced.assigned = false;
    world
        .matching
        .upsert_identity(user_assigned_identity("ns", "id-a", CLIENT_A));
    world.matching.upsert_binding(binding("ns", "b", "id-a", "web"));
    let web = pod("ns", "web", Some("web"));
    assert_eq!(
        served_client(&resolve(&world, managed(), &web, &Selector::Default, &())).as_deref(),
        Some(CLIENT_A)
    );
    assert!(matches!(
        resolve(&world, standard(), &web, &Selector::Default, &()),
        Resolution::Wait(Pending::NotSynced)
    ));
}

#[test]
fn service_principals_need_no_assignment() {
    let mut world = synced_world();
    world
        .matching
        .upsert_identity(service_principal("ns", "sp", CLIENT_A));
    world.matching.upsert_binding(binding("ns", "b", "sp", "web"));
    let web = pod("ns", "web", Some("web"));
    let resolution = resolve(&world, standard(), &web, &Selector::Default, &());
    let Resolution::Serve(grant) = resolution else {
        panic!("{resolution:?}")
    };
    assert!(matches!(grant.principal, Principal::ServicePrincipal { .. }));
}

#[test]
fn a_federated_identity_needs_no_assignment_and_is_its_own_principal() {
    let mut world = synced_world();
    world
        .matching
        .upsert_identity(federated_identity("ns", "fed", CLIENT_A));
    // Another object naming the same client ID, on the node backend.
    world
        .matching
        .upsert_identity(user_assigned_identity("ns", "plain", CLIENT_A));
    world.matching.upsert_binding(binding("ns", "b", "fed", "web"));
    world
        .matching
        .upsert_binding(binding("ns", "b2", "plain", "other"));
    let web = pod("ns", "web", Some("web"));
    world.upsert_pod(web.clone());
    let resolution = resolve(
        &world,
        standard(),
        &web,
        &Selector::ClientId(CLIENT_A.into()),
        &(),
    );
    let Resolution::Serve(grant) = resolution else {
        panic!("{resolution:?}")
    };
    assert_eq!(
        grant.principal,
        Principal::Federated {
            identity: ObjectKey::new("ns", "fed"),
            uid: Some("uid-ns-fed".into()),
        }
    );
    assert_eq!(grant.principal.kind(), "federated_identity");
    let auth = authorized(&world, standard()).unwrap();
    assert!(auth.allows(&grant.principal));
    assert!(
        !auth.allows(&Principal::Managed {
            client_id: CLIENT_A.into()
        }),
        "the same client on the node backend is not what this pod uses"
    );
    // Back on the node backend, the pod waits for its assignment again.
    let mut unannotated = world.matching.identity("ns", "fed").unwrap().clone();
    unannotated.metadata.annotations = None;
    world.matching.upsert_identity(unannotated);
    assert!(matches!(
        resolve(&world, standard(), &web, &Selector::Default, &()),
        Resolution::Wait(Pending::Assignment { .. })
    ));
}

#[test]
fn an_excepted_pod_goes_to_the_node() {
    let mut world = synced_world();
    world
        .matching
        .upsert_exception(exception("ns", "exc", &[("app", "Controller")]));
    let mut pod = pod("ns", "ctl", None);
    pod.view.labels.insert("app".into(), "controller".into());
    world.upsert_pod(pod.clone());
    assert!(matches!(
        resolve(&world, standard(), &pod, &Selector::Default, &()),
        Resolution::Excepted
    ));
    let auth = authorized(&world, standard()).unwrap();
    assert!(auth.allows(&Principal::Node(Selector::Default)));
}

struct Known(Vec<(Principal, String)>);

impl ObjectIds for Known {
    fn object_id(&self, principal: &Principal) -> Option<String> {
        self.0
            .iter()
            .find(|(p, _)| p == principal)
            .map(|(_, id)| id.clone())
    }
}

#[test]
fn object_id_is_matched_against_what_tokens_taught() {
    let mut world = synced_world();
    let a = user_assigned_identity("ns", "id-a", CLIENT_A);
    let b = user_assigned_identity("ns", "id-b", CLIENT_B);
    world.matching.upsert_identity(a.clone());
    world.matching.upsert_identity(b.clone());
    world.matching.upsert_binding(binding("ns", "ba", "id-a", "web"));
    world.matching.upsert_binding(binding("ns", "bb", "id-b", "web"));
    let web = pod("ns", "web", Some("web"));
    assign(&mut world, &web, &a, "Assigned");
    assign(&mut world, &web, &b, "Assigned");
    let asked = Selector::ObjectId("OID-B".into());
    let Resolution::LearnObjectIds(grants) = resolve(&world, standard(), &web, &asked, &()) else {
        panic!("expected to learn object IDs")
    };
    assert_eq!(grants.len(), 2);
    let pa = grants[0].principal.clone();
    let pb = grants[1].principal.clone();
    let known = Known(vec![(pa.clone(), "oid-a".into()), (pb, "oid-b".into())]);
    assert_eq!(
        served_client(&resolve(&world, standard(), &web, &asked, &known)).as_deref(),
        Some(CLIENT_B)
    );
    let known = Known(vec![(pa, "oid-a".into())]);
    let learn_b = resolve(&world, standard(), &web, &asked, &known);
    assert!(matches!(learn_b, Resolution::LearnObjectIds(g) if g.len() == 1));
    let all_known = Known(vec![
        (grants[0].principal.clone(), "oid-a".into()),
        (grants[1].principal.clone(), "oid-x".into()),
    ]);
    assert!(matches!(
        resolve(&world, standard(), &web, &asked, &all_known),
        Resolution::Deny(_)
    ));
}

#[test]
fn only_identities_live_pods_may_use_stay_authorized() {
    let mut world = synced_world();
    let a = user_assigned_identity("ns", "id-a", CLIENT_A);
    let b = user_assigned_identity("ns", "id-b", CLIENT_B);
    world.matching.upsert_identity(a.clone());
    world.matching.upsert_identity(b.clone());
    world.matching.upsert_binding(binding("ns", "ba", "id-a", "web"));
    world.matching.upsert_binding(binding("ns", "bb", "id-b", "web"));
    let web = pod("ns", "web", Some("web"));
    world.upsert_pod(web.clone());
    assign(&mut world, &web, &a, "Assigned");
    assign(&mut world, &web, &b, "Created");
    let auth = authorized(&world, standard()).unwrap();
    assert!(auth.allows(&Principal::Managed {
        client_id: CLIENT_A.into()
    }));
    assert!(!auth.allows(&Principal::Managed {
        client_id: CLIENT_B.into()
    }));
    assert!(!auth.allows(&Principal::Node(Selector::Default)));
    world.matching.replace_bindings([]);
    let auth = authorized(&world, standard()).unwrap();
    assert!(auth.principals.is_empty(), "the binding went away");
    world.synced.pods = false;
    assert_eq!(authorized(&world, standard()), None);
}

#[test]
fn a_pod_being_deleted_is_served_and_its_tokens_stay_cached_until_its_containers_stop() {
    let mut world = synced_world();
    let a = user_assigned_identity("ns", "id-a", CLIENT_A);
    world.matching.upsert_identity(a.clone());
    world.matching.upsert_binding(binding("ns", "ba", "id-a", "web"));
    let mut web = pod("ns", "web", Some("web"));
    web.view.deleting = true;
    world.upsert_pod(web.clone());
    assign(&mut world, &web, &a, "Assigned");
    assert_eq!(
        served_client(&resolve(&world, standard(), &web, &Selector::Default, &())).as_deref(),
        Some(CLIENT_A),
        "SIGTERM handlers get their tokens through the grace period"
    );
    let managed_a = Principal::Managed {
        client_id: CLIENT_A.into(),
    };
    assert!(authorized(&world, standard()).unwrap().allows(&managed_a));

    web.view.containers = Containers::NoneRunning;
    world.upsert_pod(web.clone());
    assert!(matches!(
        resolve(&world, standard(), &web, &Selector::Default, &()),
        Resolution::Deny(why) if why.contains("every container stopped")
    ));
    assert!(!authorized(&world, standard()).unwrap().allows(&managed_a));
}

#[test]
fn callers_not_known_yet_wait_and_every_such_wait_is_about_the_caller() {
    let mut world = synced_world();
    let mut old = pod("ns", "old", Some("web"));
    old.view.deleting = true;
    world.upsert_pod(old.clone());
    let ip = old.view.ips[0];
    assert_eq!(calling_pod(&world, ip).unwrap().view.key.name, "old");
    let mut starting = pod("ns", "new", Some("db"));
    starting.view.ips.clear();
    starting.view.phase = Some("Pending".into());
    world.upsert_pod(starting);
    let unsettled = calling_pod(&world, ip).unwrap_err();
    assert_eq!(unsettled, Pending::UnsettledCaller(ObjectKey::new("ns", "old")));
    let unknown = calling_pod(&world, "10.244.9.9".parse().unwrap()).unwrap_err();
    assert_eq!(unknown, Pending::UnknownCaller);
    for pending in [unsettled, unknown, Pending::AmbiguousCaller(vec![])] {
        assert!(pending.is_about_the_caller(), "{pending}");
    }
    assert!(!Pending::NotSynced.is_about_the_caller());
}

#[test]
fn a_pod_named_by_a_node_local_caller_is_found_while_it_may_run_whatever_its_network() {
    let mut world = synced_world();
    let mut host = pod("ns", "csi", Some("web"));
    host.view.host_network = true;
    world.upsert_pod(host);
    let mut done = pod("ns", "job", Some("web"));
    done.view.phase = Some("Succeeded".into());
    world.upsert_pod(done);
    assert!(named_pod(&world, &ObjectKey::new("ns", "csi")).is_ok());
    assert_eq!(
        named_pod(&world, &ObjectKey::new("ns", "job")).unwrap_err(),
        Pending::UnknownCaller
    );
}

/// Each kind of change a watch makes, applied to a world where `ns/web` is bound to `id-a` (assigned).
type Change = (&'static str, fn(&mut World));

fn changes() -> Vec<Change> {
    vec![
        ("the assignment goes back to Created", |w| {
            let web = w.pod(&ObjectKey::new("ns", "web")).unwrap().clone();
            assign(
                w,
                &web,
                &user_assigned_identity("ns", "id-a", CLIENT_A),
                "Created",
            );
        }),
        ("the assignment is removed", |w| {
            let name = assigned_identity_name("web", "ns", "id-a");
            w.remove_assigned(&ObjectKey::new("ns", name));
        }),
        ("a heavier binding of the pod's selector arrives", |w| {
            w.matching
                .upsert_identity(user_assigned_identity("ns", "id-b", CLIENT_B));
            let mut heavier = binding("ns", "bb", "id-b", "web");
            heavier.spec.weight = Some(10);
            w.matching.upsert_binding(heavier);
        }),
        ("the binding is removed", |w| {
            w.matching.remove_binding(&ObjectKey::new("ns", "ba"));
        }),
        ("the identity's client ID changes", |w| {
            w.matching
                .upsert_identity(user_assigned_identity("ns", "id-a", CLIENT_B));
        }),
        ("an exception of the pod arrives", |w| {
            w.matching
                .upsert_exception(exception("ns", "ex", &[("aadpodidbinding", "web")]));
        }),
        ("the pod is relabelled", |w| {
            let mut web = PodRecord::clone(w.pod(&ObjectKey::new("ns", "web")).unwrap());
            web.view = web.view.with_selector("db");
            w.upsert_pod(web);
        }),
        ("the whole world is replaced by one without the binding", |w| {
            let web = PodRecord::clone(w.pod(&ObjectKey::new("ns", "web")).unwrap());
            *w = synced_world();
            w.upsert_pod(web);
        }),
    ]
}

fn bound_shared() -> Arc<crate::world::Shared> {
    let shared = crate::world::Shared::new();
    shared.update(|w| {
        *w = synced_world();
        let a = user_assigned_identity("ns", "id-a", CLIENT_A);
        w.matching.upsert_identity(a.clone());
        w.matching.upsert_binding(binding("ns", "ba", "id-a", "web"));
        let web = pod("ns", "web", Some("web"));
        assign(w, &web, &a, "Assigned");
        w.upsert_pod(web);
    });
    shared
}

#[test]
fn a_pods_identities_are_decided_once_per_world_and_again_after_each_kind_of_change() {
    let key = ObjectKey::new("ns", "web");
    for (change, apply) in changes() {
        let shared = bound_shared();
        let decided = Decided::default();
        let first = {
            let world = shared.read();
            let web = world.pod(&key).unwrap().clone();
            let first = decided.pod_identities(&world, standard(), &web).unwrap();
            // The same world answers from the entry: the very same value, not a new decision.
            let again = decided.pod_identities(&world, standard(), &web).unwrap();
            assert!(Arc::ptr_eq(&first, &again), "{change}");
            first
        };
        shared.update(apply);
        let world = shared.read();
        let web = world.pod(&key).unwrap().clone();
        let after = decided.pod_identities(&world, standard(), &web).unwrap();
        let fresh = pod_identities(&world, standard(), &web).unwrap();
        assert_eq!(format!("{after:?}"), format!("{fresh:?}"), "{change}");
        assert_ne!(
            format!("{after:?}"),
            format!("{first:?}"),
            "{change}: the decision must change"
        );
    }
}

#[test]
fn nothing_is_decided_ahead_before_every_list_has_arrived() {
    let shared = crate::world::Shared::new();
    let web = pod("ns", "web", Some("web"));
    shared.update(|w| w.upsert_pod(web.clone()));
    let decided = Decided::default();
    assert!(decided.pod_identities(&shared.read(), standard(), &web).is_none());
    assert_eq!(decided.len(), 0);
    assert!(matches!(
        resolve_from(None, &web.view.key, &Selector::Default, &()),
        Resolution::Wait(Pending::NotSynced)
    ));
}

#[test]
fn entries_of_pods_gone_are_dropped_once_they_outnumber_the_nodes_pods() {
    let shared = bound_shared();
    let decided = Decided::default();
    // 200 short-lived pods ask once each, each in a world of its own generation.
    for i in 0..200 {
        let pod = pod("ns", &format!("job-{i}"), Some("web"));
        shared.update(|w| w.upsert_pod(pod.clone()));
        decided.pod_identities(&shared.read(), standard(), &pod).unwrap();
        shared.update(|w| w.remove_pod(&pod.view.key));
    }
    let pods = shared.read().pod_count();
    assert!(
        decided.len() <= 2 * pods + 17,
        "{} entries for {pods} pods",
        decided.len()
    );
}
