use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use pod_identity_api::{federation::BACKEND_ANNOTATION, fixtures::user_assigned_identity};

use super::*;

const ISSUER: &str = "https://issuer.example";
const SUBJECT: &str = "system:serviceaccount:pod-identity-federation:shop.payments";
const UAMI: &str =
    "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/payments";

/// Identity `name` of `shop` for [`UAMI`] in tenant `t`, with the backend annotation when given.
fn identity(name: &str, backend: Option<&str>) -> AzureIdentity {
    let identity = user_assigned_identity("shop", name, "11111111-1111-1111-1111-111111111111")
        .with_resource_id(UAMI)
        .with_tenant_id("t");
    match backend {
        Some(backend) => identity.with_annotation(BACKEND_ANNOTATION, backend),
        None => identity,
    }
}

fn credential(name: &str, issuer: &str, subject: &str, audience: &str) -> FederatedCredential {
    FederatedCredential {
        id: credential_id(UAMI, name),
        name: name.into(),
        issuer: issuer.into(),
        subject: subject.into(),
        audiences: vec![audience.into()],
    }
}

#[test]
fn federated_identities_are_kept_from_the_planner_and_the_rest_are_not() {
    let kept = served_on_nodes(vec![
        identity("node", None),
        identity("fed", Some("federated")),
        identity("explicit", Some("node")),
        // Not a valid choice: matching refuses it by name, and it is never federated.
        identity("typo", Some("federate")),
    ]);
    let names: Vec<_> = kept.iter().map(|i| i.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["node", "explicit", "typo"]);
}

#[test]
fn each_federated_identity_gets_a_subject_and_subjects_of_others_go() {
    let mut broken = identity("broken", Some("federated"));
    broken.spec.resource_id = Some("not an ARM ID".into());
    let identities = [
        identity("payments", Some("federated")),
        identity("plain", None),
        broken,
    ];
    let ours = |account: &str, identity: &str| Subject {
        account: account.into(),
        identity: Some(ObjectKey::new("shop", identity)),
        credential: None,
    };
    let plan = plan_subjects(&identities, &[]);
    assert_eq!(plan.create.len(), 1);
    assert_eq!(plan.create[0].account, "shop.payments");
    assert_eq!(plan.create[0].resource_id, UAMI);
    assert!(plan.orphans.is_empty());

    let plan = plan_subjects(
        &identities,
        &[
            ours("shop.payments", "payments"),
            ours("shop.plain", "plain"),
            ours("shop.gone", "gone"),
        ],
    );
    assert!(plan.create.is_empty());
    let orphans: Vec<_> = plan.orphans.iter().map(|s| s.account.as_str()).collect();
    assert_eq!(
        orphans,
        ["shop.plain", "shop.gone"],
        "moved back to the node backend, or deleted"
    );
    assert_eq!(plan.federated.len(), 1);
}

#[test]
fn only_service_accounts_the_controller_labelled_are_subjects() {
    let mut account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("shop.payments".into()),
            annotations: Some(BTreeMap::from([
                (SUBJECT_IDENTITY_ANNOTATION.to_owned(), "shop/payments".to_owned()),
                (
                    CREDENTIAL_ID_ANNOTATION.to_owned(),
                    credential_id(UAMI, "pod-identity-x"),
                ),
            ])),
            ..Default::default()
        },
        ..Default::default()
    };
    assert_eq!(Subject::from_account(&account), None, "no label: the user's own");
    account.metadata.labels = Some(BTreeMap::from([(
        MANAGED_BY_LABEL.to_owned(),
        MANAGED_BY.to_owned(),
    )]));
    let subject = Subject::from_account(&account).unwrap();
    assert_eq!(subject.identity, Some(ObjectKey::new("shop", "payments")));
    let id = subject.credential.unwrap();
    assert_eq!(split_credential_id(&id), Some((UAMI, "pod-identity-x")));
    assert_eq!(split_credential_id(UAMI), None);
}

#[test]
fn a_credential_is_created_only_where_none_trusts_the_subject() {
    let ours = credential_name(ISSUER, SUBJECT);
    assert_eq!(
        decide_credential(&[], ISSUER, SUBJECT),
        CredentialDecision::Create { name: ours.clone() }
    );
    // The user's own credential for the same issuer and subject is used, never duplicated.
    let users = [credential("kube", ISSUER, SUBJECT, TOKEN_EXCHANGE_AUDIENCE)];
    assert_eq!(
        decide_credential(&users, ISSUER, SUBJECT),
        CredentialDecision::Present {
            name: "kube".into(),
            ours: false
        }
    );
    let mine = [credential(&ours, ISSUER, SUBJECT, TOKEN_EXCHANGE_AUDIENCE)];
    assert!(matches!(
        decide_credential(&mine, ISSUER, SUBJECT),
        CredentialDecision::Present { ours: true, .. }
    ));
    // Exact comparison, as Entra's: a trailing slash or another case is another issuer or subject.
    let near = [
        credential("a", &format!("{ISSUER}/"), SUBJECT, TOKEN_EXCHANGE_AUDIENCE),
        credential("b", ISSUER, &SUBJECT.to_uppercase(), TOKEN_EXCHANGE_AUDIENCE),
    ];
    assert!(matches!(
        decide_credential(&near, ISSUER, SUBJECT),
        CredentialDecision::Create { .. }
    ));
}

#[test]
fn a_wrong_audience_is_fixed_on_ours_and_reported_on_someone_elses() {
    let ours = credential_name(ISSUER, SUBJECT);
    let mine = [credential(&ours, ISSUER, SUBJECT, "api://other")];
    assert_eq!(
        decide_credential(&mine, ISSUER, SUBJECT),
        CredentialDecision::Rewrite { name: ours }
    );
    let users = [credential("kube", ISSUER, SUBJECT, "api://other")];
    let decision = decide_credential(&users, ISSUER, SUBJECT);
    assert!(matches!(decision, CredentialDecision::WrongAudience { .. }));
    assert!(!decision.usable());
    let status = decision.status(UAMI, ISSUER, SUBJECT);
    assert!(
        status.contains("credential kube") && status.contains("api://other"),
        "{status}"
    );
}

#[test]
fn the_twenty_first_credential_is_not_attempted_and_the_status_says_why() {
    let full: Vec<_> = (0..20)
        .map(|n| {
            credential(
                &format!("c{n}"),
                ISSUER,
                &format!("system:serviceaccount:x:{n}"),
                TOKEN_EXCHANGE_AUDIENCE,
            )
        })
        .collect();
    let decision = decide_credential(&full, ISSUER, SUBJECT);
    assert_eq!(decision, CredentialDecision::Full { count: 20 });
    let status = decision.status(UAMI, ISSUER, SUBJECT);
    for part in [
        UAMI,
        "20 federated identity credentials",
        "the most Entra ID allows",
        SUBJECT,
    ] {
        assert!(status.contains(part), "{part}: {status}");
    }
    // At the limit, the one that trusts the subject is still found.
    let mut with_ours = full.clone();
    with_ours[7] = credential("c7", ISSUER, SUBJECT, TOKEN_EXCHANGE_AUDIENCE);
    assert!(decide_credential(&with_ours, ISSUER, SUBJECT).usable());
}
