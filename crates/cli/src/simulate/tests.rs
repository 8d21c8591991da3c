use super::*;
use crate::fixtures::*;

fn state() -> ClusterState {
    ClusterState {
        pods: vec![
            pod("shop", "web", Some("pay")),
            pod("shop", "api", Some("pay")),
            pod("shop", "db", Some("data")),
        ],
        identities: vec![
            user_assigned_identity("shop", "payments", CLIENT_ID),
            user_assigned_identity("shop", "storage", CLIENT_ID),
        ],
        bindings: vec![binding("shop", "payments-binding", "payments", "pay")],
        ..Default::default()
    }
}

fn manifest(yaml: &str, delete: bool) -> Change {
    Change::parse(yaml, "shop", delete).unwrap()
}

const STORAGE_BINDING: &str = "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: storage-binding\nspec:\n  azureIdentity: storage\n  selector: data\n";

#[test]
fn new_binding_lists_the_pods_that_gain() {
    let outcome = simulate(&state(), &manifest(STORAGE_BINDING, false), Scope::Namespaced);
    assert_eq!(
        outcome.gained,
        vec![PodIdentity {
            pod: "shop/db".into(),
            identity: "shop/storage".into(),
            binding: "shop/storage-binding".into()
        }]
    );
    assert!(outcome.lost.is_empty());
    assert_eq!(
        outcome.to_human(),
        "+ shop/db would get shop/storage (through shop/storage-binding)\n"
    );
}

#[test]
fn changed_selector_lists_gains_and_losses() {
    let yaml = "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: payments-binding\n  namespace: shop\nspec:\n  azureIdentity: payments\n  selector: data\n";
    let outcome = simulate(&state(), &manifest(yaml, false), Scope::Namespaced);
    let pods = |list: &[PodIdentity]| list.iter().map(|p| p.pod.clone()).collect::<Vec<_>>();
    assert_eq!(pods(&outcome.gained), vec!["shop/db"]);
    assert_eq!(pods(&outcome.lost), vec!["shop/api", "shop/web"]);
}

#[test]
fn deleting_an_identity_lists_the_pods_that_lose_it() {
    let yaml =
        "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: payments\nspec: {}\n";
    let outcome = simulate(&state(), &manifest(yaml, true), Scope::Namespaced);
    assert_eq!(outcome.lost.len(), 2);
    assert!(outcome.problems.is_empty(), "a deleted object is not validated");
}

#[test]
fn heavier_binding_changes_the_default_identity() {
    let yaml = "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: storage-for-pay\nspec:\n  azureIdentity: storage\n  selector: pay\n  weight: 10\n";
    let outcome = simulate(&state(), &manifest(yaml, false), Scope::Namespaced);
    assert_eq!(outcome.gained.len(), 2);
    assert_eq!(outcome.default_changed.len(), 2);
    assert_eq!(outcome.default_changed[0].after, "shop/storage");
}

#[test]
fn invalid_objects_of_the_manifest_are_reported() {
    let yaml = "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: broken\nspec:\n  type: 0\n  clientID: nope\n";
    let outcome = simulate(&state(), &manifest(yaml, false), Scope::Namespaced);
    assert!(
        outcome
            .problems
            .iter()
            .any(|p| p.contains("AzureIdentity shop/broken: spec.clientID")),
        "{:?}",
        outcome.problems
    );
    assert!(outcome.to_human().starts_with("problem: "));
}

#[test]
fn manifests_of_other_kinds_are_refused_with_the_reason() {
    let err = Change::parse(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n",
        "shop",
        false,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("only aadpodidentity.k8s.io/v1 AzureIdentity and AzureIdentityBinding"),
        "{err}"
    );
    let err = Change::parse(": not yaml: [", "shop", false).unwrap_err();
    assert!(err.to_string().contains("not valid YAML"), "{err}");
}

#[test]
fn several_documents_are_read_and_namespaced() {
    let yaml = format!(
        "{STORAGE_BINDING}---\napiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: x\n  namespace: other\nspec: {{}}\n"
    );
    let change = manifest(&yaml, false);
    assert_eq!(change.bindings[0].metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(change.identities[0].metadata.namespace.as_deref(), Some("other"));
}

#[test]
fn no_effect_is_said_plainly() {
    let yaml = "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: nobody\nspec:\n  azureIdentity: storage\n  selector: nobody\n";
    let outcome = simulate(&state(), &manifest(yaml, false), Scope::Namespaced);
    assert_eq!(outcome.to_human(), "No pod would gain or lose an identity.\n");
}
