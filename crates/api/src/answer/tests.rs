//! The agent's answer to a pod, one test per rule; the agent's own tests add what requests name.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::{
    AzureIdentityBinding, AzurePodIdentityException,
    fixtures::{
        binding, exception, pod_view, service_principal, user_assigned_identity, user_assigned_identity_id,
    },
    matching::{Scope, World},
    naming::assigned_identity_name,
    pod::Containers,
};

const CLIENT_A: &str = "11111111-1111-1111-1111-111111111111";

/// `ns/web` on `node`, bound by `selector` when it has one.
fn pod(selector: Option<&str>) -> PodView {
    let pod = pod_view("ns", "web").on_node("node");
    match selector {
        Some(selector) => pod.with_selector(selector),
        None => pod,
    }
}

struct Fixture {
    identities: Vec<AzureIdentity>,
    bindings: Vec<AzureIdentityBinding>,
    exceptions: Vec<AzurePodIdentityException>,
    assigned: HashMap<ObjectKey, AssignedView>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            identities: vec![
                user_assigned_identity("ns", "id-a", CLIENT_A)
                    .with_resource_id(&user_assigned_identity_id("s", "id-a")),
                service_principal("ns", "sp", CLIENT_A),
            ],
            bindings: vec![
                binding("ns", "ba", "id-a", "web"),
                binding("ns", "bsp", "sp", "robot"),
            ],
            exceptions: Vec::new(),
            assigned: HashMap::new(),
        }
    }

    fn assign(&mut self, pod: &str, identity: &str, status: Option<&str>) {
        let key = ObjectKey::new("ns", assigned_identity_name(pod, "ns", identity));
        self.assigned.insert(
            key.clone(),
            AssignedView {
                key,
                pod: ObjectKey::new("ns", pod),
                client_id: Some(CLIENT_A.into()),
                status: AssignmentStatus::parse(status),
            },
        );
    }

    fn answer(&self, pod: &PodView, mode: Mode) -> String {
        let index = Index::new(World {
            bindings: &self.bindings,
            identities: &self.identities,
            exceptions: &self.exceptions,
            scope: Scope::Namespaced,
        });
        match answer(&index, pod, mode, &self.assigned) {
            Answer::Excepted => "excepted".into(),
            Answer::Refused(refusal) => format!("refused: {refusal}"),
            Answer::Identities(ids) => ids
                .iter()
                .map(|i| match &i.pending {
                    None => format!("{} ready", i.assignment.identity.name),
                    Some(p) => format!("{} pending {:?}", i.assignment.identity.name, p.status),
                })
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

#[test]
fn an_assigned_identity_is_ready_and_anything_short_of_it_is_pending() {
    let mut fx = Fixture::new();
    let web = pod(Some("web"));
    assert_eq!(fx.answer(&web, Mode::Standard), "id-a pending None");
    fx.assign("web", "id-a", Some("Created"));
    assert_eq!(fx.answer(&web, Mode::Standard), "id-a pending Some(Created)");
    fx.assign("web", "id-a", Some("Assigned"));
    assert_eq!(fx.answer(&web, Mode::Standard), "id-a ready");
    // The original's records without status count as assigned.
    fx.assign("web", "id-a", None);
    assert_eq!(fx.answer(&web, Mode::Standard), "id-a ready");
    // Managed mode has no records to wait for.
    assert_eq!(Fixture::new().answer(&web, Mode::Managed), "id-a ready");
}

#[test]
fn a_record_of_another_client_id_is_pending_until_reassigned() {
    let mut fx = Fixture::new();
    fx.assign("web", "id-a", Some("Assigned"));
    fx.identities[0].spec.client_id = Some("22222222-2222-2222-2222-222222222222".into());
    assert_eq!(
        fx.answer(&pod(Some("web")), Mode::Standard),
        "id-a pending Some(Assigned)"
    );
}

#[test]
fn service_principals_never_wait_for_a_record() {
    let fx = Fixture::new();
    assert_eq!(fx.answer(&pod(Some("robot")), Mode::Standard), "sp ready");
}

#[test]
fn a_pod_being_deleted_is_answered_until_its_containers_stop() {
    let mut fx = Fixture::new();
    fx.assign("web", "id-a", Some("Assigned"));
    let mut leaving = pod(Some("web"));
    leaving.deleting = true;
    assert_eq!(fx.answer(&leaving, Mode::Standard), "id-a ready");
    leaving.containers = Containers::NoneRunning;
    assert_eq!(
        fx.answer(&leaving, Mode::Standard),
        "refused: pod ns/web takes no identities any more (deleted, every container stopped)"
    );
    let mut done = pod(Some("web"));
    done.phase = Some("Succeeded".into());
    assert!(fx.answer(&done, Mode::Standard).contains("phase Succeeded"));
}

#[test]
fn refusals_say_what_would_have_to_change() {
    let mut fx = Fixture::new();
    assert!(
        fx.answer(&pod(None), Mode::Standard)
            .contains("has no label aadpodidbinding")
    );
    assert!(
        fx.answer(&pod(Some("nothing")), Mode::Standard)
            .contains("no AzureIdentityBinding has selector 'nothing'")
    );
    fx.bindings.push(binding("ns", "ghost", "missing", "haunted"));
    assert!(
        fx.answer(&pod(Some("haunted")), Mode::Standard)
            .contains("names identity ns/missing, which does not exist")
    );
}

#[test]
fn an_excepted_pod_goes_to_the_node() {
    let mut fx = Fixture::new();
    fx.exceptions.push(exception("ns", "exc", &[(POD_LABEL, "web")]));
    assert_eq!(fx.answer(&pod(Some("web")), Mode::Standard), "excepted");
}

fn federate(identity: &mut AzureIdentity, tenant: Option<&str>, value: &str) {
    identity.metadata.annotations = Some(BTreeMap::from([(
        crate::federation::BACKEND_ANNOTATION.to_owned(),
        value.to_owned(),
    )]));
    identity.spec.tenant_id = tenant.map(str::to_owned);
}

#[test]
fn a_federated_identity_never_waits_for_a_record_and_a_stale_record_does_not_hold_it() {
    let mut fx = Fixture::new();
    federate(&mut fx.identities[0], Some("tenant"), "federated");
    let web = pod(Some("web"));
    assert_eq!(fx.answer(&web, Mode::Standard), "id-a ready");
    // Moved from the node backend: the old record, even one being released, changes nothing.
    fx.assign("web", "id-a", Some("Unassigned"));
    assert_eq!(fx.answer(&web, Mode::Standard), "id-a ready");
    // Moved back: the record counts again.
    federate(&mut fx.identities[0], Some("tenant"), "node");
    assert_eq!(fx.answer(&web, Mode::Standard), "id-a pending Some(Unassigned)");
}

#[test]
fn a_federated_identity_without_a_tenant_or_with_a_misspelt_backend_is_refused_by_name() {
    let mut fx = Fixture::new();
    federate(&mut fx.identities[0], None, "federated");
    let refused = fx.answer(&pod(Some("web")), Mode::Standard);
    assert!(
        refused.contains("tenantID is required for a federated identity"),
        "{refused}"
    );
    federate(&mut fx.identities[0], Some("tenant"), "federate");
    let refused = fx.answer(&pod(Some("web")), Mode::Standard);
    assert!(
        refused.contains(
            "metadata.annotations[aadpodidentity.k8s.io/backend]: must be \"node\" or \"federated\""
        ),
        "{refused}"
    );
}
