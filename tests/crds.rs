//! The CRDs of `crds/` against a real kube-apiserver: they install, the documented manifests apply
//! unchanged and read back as written, kubectl's columns show the fields users look for, and the
//! server refuses what users commonly get wrong with a message that says what is wrong.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
};
use pod_identity_api::{AssignmentStatus, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};
use pod_identity_test_support::{ControlPlane, TestNamespace, fixtures};
use serde_json::{Value, json};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

/// The checked-in CRDs (not the in-memory ones: what users install is the file).
fn checked_in_crds() -> Vec<CustomResourceDefinition> {
    let yaml = std::fs::read_to_string(repo_path(pod_identity_api::crds::CRDS_PATH)).unwrap();
    serde_saphyr::from_multiple(&yaml).unwrap()
}

async fn namespace_with_crds() -> TestNamespace {
    let ns = ControlPlane::shared().await.namespace().await.unwrap();
    fixtures::apply_crds(&ns.client, &checked_in_crds())
        .await
        .unwrap();
    ns
}

fn api_for(client: &Client, namespace: &str, manifest: &Value) -> Api<DynamicObject> {
    let (group, version) = manifest["apiVersion"].as_str().unwrap().split_once('/').unwrap();
    let gvk = GroupVersionKind::gvk(group, version, manifest["kind"].as_str().unwrap());
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk))
}

async fn create(client: &Client, namespace: &str, mut manifest: Value) -> Result<DynamicObject, kube::Error> {
    manifest["metadata"]["namespace"] = json!(namespace);
    let object: DynamicObject = serde_json::from_value(manifest.clone()).unwrap();
    api_for(client, namespace, &manifest)
        .create(&PostParams::default(), &object)
        .await
}

fn example(file: &str) -> Value {
    let yaml = std::fs::read_to_string(repo_path("examples").join(file)).unwrap();
    serde_saphyr::from_str(&yaml).unwrap()
}

/// The server's message for a refused object.
async fn rejection(client: &Client, namespace: &str, manifest: Value) -> String {
    match create(client, namespace, manifest.clone()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message
        }
        other => panic!("expected the server to refuse {manifest}, got {other:?}"),
    }
}

#[tokio::test]
async fn checked_in_crds_install_and_are_served() {
    let ns = namespace_with_crds().await;
    let api = Api::<CustomResourceDefinition>::all(ns.client.clone());
    for crd in checked_in_crds() {
        let served = api.get(crd.metadata.name.as_deref().unwrap()).await.unwrap();
        let accepted = served.status.unwrap().accepted_names.unwrap();
        assert_eq!(accepted.kind, crd.spec.names.kind);
    }
}

#[tokio::test]
async fn documented_manifests_apply_unchanged_and_read_back_as_written() {
    let ns = namespace_with_crds().await;
    for file in [
        "azureidentity-user-assigned.yaml",
        "azureidentity-service-principal.yaml",
        "azureidentity-certificate.yaml",
        "azureidentitybinding.yaml",
        "azurepodidentityexception.yaml",
        "azureassignedidentity.yaml",
    ] {
        let manifest = example(file);
        let created = create(&ns.client, &ns.name, manifest.clone())
            .await
            .unwrap_or_else(|e| panic!("{file} was refused: {e}"));
        let stored = api_for(&ns.client, &ns.name, &manifest)
            .get(&created.metadata.name.unwrap())
            .await
            .unwrap();
        assert_eq!(
            stored.data["spec"], manifest["spec"],
            "{file}: spec changed on the way"
        );
        if let Some(status) = manifest.get("status") {
            assert_eq!(
                &stored.data["status"], status,
                "{file}: status changed on the way"
            );
        }
        for field in ["labels", "finalizers"] {
            if let Some(value) = manifest["metadata"].get(field) {
                assert_eq!(
                    &serde_json::to_value(&stored.metadata).unwrap()[field],
                    value,
                    "{file}: {field}"
                );
            }
        }
        // The typed view reads the same object and writes back exactly what was stored.
        let stored_spec = stored.data["spec"].clone();
        let typed_round_trip = match manifest["kind"].as_str().unwrap() {
            "AzureIdentity" => serde_json::to_value(
                serde_json::from_value::<pod_identity_api::AzureIdentitySpec>(stored_spec.clone()).unwrap(),
            ),
            "AzureIdentityBinding" => serde_json::to_value(
                serde_json::from_value::<pod_identity_api::AzureIdentityBindingSpec>(stored_spec.clone())
                    .unwrap(),
            ),
            "AzurePodIdentityException" => serde_json::to_value(
                serde_json::from_value::<pod_identity_api::AzurePodIdentityExceptionSpec>(
                    stored_spec.clone(),
                )
                .unwrap(),
            ),
            "AzureAssignedIdentity" => serde_json::to_value(
                serde_json::from_value::<pod_identity_api::AzureAssignedIdentitySpec>(stored_spec.clone())
                    .unwrap(),
            ),
            other => panic!("unexpected kind {other}"),
        }
        .unwrap();
        assert_eq!(
            typed_round_trip, stored_spec,
            "{file}: the typed view loses or adds fields"
        );
    }
}

#[tokio::test]
async fn assignment_written_by_aad_pod_identity_reads_as_assigned() {
    let ns = namespace_with_crds().await;
    create(&ns.client, &ns.name, example("azureassignedidentity.yaml"))
        .await
        .unwrap();
    let api = Api::<AzureAssignedIdentity>::namespaced(ns.client.clone(), &ns.name);
    let aai = api.get("demo-pod-default-demo-identity").await.unwrap();
    assert_eq!(aai.assignment_status(), AssignmentStatus::Assigned);
    assert_eq!(aai.spec.nodename, "aks-nodepool1-12345678-vmss000000");
    let identity = aai.spec.azure_identity_ref.unwrap();
    assert_eq!(identity.metadata.name.as_deref(), Some("demo-identity"));
    assert_eq!(
        identity.metadata.uid.as_deref(),
        Some("7b6a5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d")
    );
    assert_eq!(
        identity.spec.client_id.as_deref(),
        Some("5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b")
    );
    let binding = aai.spec.azure_binding_ref.unwrap();
    assert_eq!(binding.spec.selector.as_deref(), Some("demo"));
    assert_eq!(
        aai.metadata.finalizers.unwrap(),
        vec![pod_identity_api::ASSIGNED_IDENTITY_FINALIZER.to_owned()]
    );
}

#[tokio::test]
async fn objects_in_every_shape_the_original_schema_accepted_are_accepted() {
    let ns = namespace_with_crds().await;
    // Fields the original declared but never used, the `metadata` it embedded in every spec, nulls
    // where it declared nullable, and its status.
    let identity = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
        "metadata": {"name": "legacy"},
        "spec": {
            "metadata": {"creationTimestamp": null},
            "type": 0,
            "resourceID": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/legacy",
            "clientID": "5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b",
            "adResourceID": "", "replicas": null, "auxiliaryTenantIDs": null
        },
        "status": {"metadata": {"creationTimestamp": null}, "availableReplicas": 0}
    });
    create(&ns.client, &ns.name, identity).await.unwrap();
    let binding = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
        "metadata": {"name": "legacy"},
        "spec": {"metadata": {"creationTimestamp": null}, "azureIdentity": "legacy", "selector": "legacy", "weight": 0},
        "status": {"availableReplicas": 0}
    });
    create(&ns.client, &ns.name, binding).await.unwrap();
    let exception = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzurePodIdentityException",
        "metadata": {"name": "legacy"},
        "spec": {"metadata": {"creationTimestamp": null}, "podLabels": {"app": "mic"}},
        "status": {"status": ""}
    });
    create(&ns.client, &ns.name, exception).await.unwrap();
    let typed = Api::<AzureIdentity>::namespaced(ns.client.clone(), &ns.name)
        .get("legacy")
        .await
        .unwrap();
    assert_eq!(typed.spec.ad_resource_id.as_deref(), Some(""));
    assert_eq!(typed.status.unwrap().available_replicas, Some(0));
}

#[tokio::test]
async fn invalid_objects_are_refused_with_a_message_that_names_the_problem() {
    let ns = namespace_with_crds().await;
    let identity = |spec: Value| json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity", "metadata": {"name": "bad"}, "spec": spec});
    let binding = |spec: Value| json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding", "metadata": {"name": "bad"}, "spec": spec});
    let client_id = "5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b";
    let cases = [
        (
            "resourceID of a VM instead of an identity",
            identity(json!({"type": 0, "clientID": client_id,
                "resourceID": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"})),
            "spec.resourceID: Invalid value: resourceID must be the ID of a user-assigned managed identity",
        ),
        (
            "missing resourceID",
            identity(json!({"type": 0, "clientID": client_id})),
            "resourceID must be the ID of a user-assigned managed identity",
        ),
        (
            "resourceID pasted into clientID",
            identity(
                json!({"type": 0, "clientID": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x",
                "resourceID": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x"}),
            ),
            "spec.clientID: Invalid value: clientID must be the client (application) ID of the identity",
        ),
        (
            "unknown type",
            identity(json!({"type": 3, "clientID": client_id})),
            "spec.type: Invalid value: type must be 0 (user-assigned managed identity), 1",
        ),
        (
            "type as a string",
            identity(json!({"type": "UserAssigned", "clientID": client_id})),
            "spec.type: Invalid value: \"string\": spec.type in body must be of type integer",
        ),
        (
            "service principal without tenant",
            identity(json!({"type": 1, "clientID": client_id, "clientPassword": {"name": "s"}})),
            "spec.tenantID: Invalid value: tenantID is required for a service principal",
        ),
        (
            "service principal with the PascalCase secret reference of old docs",
            identity(json!({"type": 2, "clientID": client_id, "tenantID": "t",
                "clientPassword": {"Name": "s", "Namespace": "default"}})),
            "clientPassword.name must name the Secret holding the service principal's credential",
        ),
        (
            "plain http authority",
            identity(
                json!({"type": 1, "clientID": client_id, "tenantID": "t", "clientPassword": {"name": "s"},
                "adEndpoint": "http://login.example"}),
            ),
            "spec.adEndpoint: Invalid value: adEndpoint must be an https:// URL",
        ),
        (
            "binding without selector",
            binding(json!({"azureIdentity": "id"})),
            "spec.selector: Invalid value: selector must be set: pods use this binding by carrying the label aadpodidbinding=<selector>",
        ),
        (
            "binding with a selector no label can carry",
            binding(json!({"azureIdentity": "id", "selector": "my app"})),
            "selector must be a valid label value",
        ),
        (
            "binding without identity",
            binding(json!({"selector": "demo"})),
            "spec.azureIdentity: Invalid value: azureIdentity must name an AzureIdentity in the binding's namespace",
        ),
        (
            "exception without labels",
            json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzurePodIdentityException",
                "metadata": {"name": "bad"}, "spec": {"podLabels": {}}}),
            "podLabels must list at least one label",
        ),
    ];
    for (case, manifest, expected) in cases {
        let message = rejection(&ns.client, &ns.name, manifest).await;
        assert!(message.contains(expected), "{case}: the message was {message:?}");
    }
}

#[tokio::test]
async fn kubectl_columns_show_what_users_look_for() {
    let ns = namespace_with_crds().await;
    create(&ns.client, &ns.name, example("azureidentity-user-assigned.yaml"))
        .await
        .unwrap();
    create(&ns.client, &ns.name, example("azureidentitybinding.yaml"))
        .await
        .unwrap();
    create(&ns.client, &ns.name, example("azureassignedidentity.yaml"))
        .await
        .unwrap();
    let table = |plural: &str| {
        let client = ns.client.clone();
        let path = format!("/apis/aadpodidentity.k8s.io/v1/namespaces/{}/{plural}", ns.name);
        async move { table_of(&client, &path).await.unwrap() }
    };
    let (columns, rows) = table("azureidentities").await;
    assert_eq!(columns, ["Name", "Type", "ClientID", "Age"]);
    assert_eq!(
        rows[0][..3],
        [
            json!("demo-identity"),
            json!(0),
            json!("5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b")
        ]
    );
    let (columns, rows) = table("azureidentitybindings").await;
    assert_eq!(columns, ["Name", "AzureIdentity", "Selector", "Weight", "Age"]);
    assert_eq!(
        rows[0][..3],
        [
            json!("demo-identity-binding"),
            json!("demo-identity"),
            json!("demo")
        ]
    );
    let (columns, rows) = table("azureassignedidentities").await;
    assert_eq!(
        columns,
        ["Name", "Pod", "PodNamespace", "Identity", "Node", "Status", "Age"]
    );
    assert_eq!(
        rows[0][..6],
        [
            json!("demo-pod-default-demo-identity"),
            json!("demo-pod"),
            json!("default"),
            json!("demo-identity"),
            json!("aks-nodepool1-12345678-vmss000000"),
            json!("Assigned")
        ]
    );
}

#[tokio::test]
async fn typed_objects_written_by_this_project_round_trip() {
    let ns = namespace_with_crds().await;
    let identity: AzureIdentity =
        serde_json::from_value(example("azureidentity-user-assigned.yaml")).unwrap();
    let binding: AzureIdentityBinding = serde_json::from_value(example("azureidentitybinding.yaml")).unwrap();
    let identities = Api::<AzureIdentity>::namespaced(ns.client.clone(), &ns.name);
    let bindings = Api::<AzureIdentityBinding>::namespaced(ns.client.clone(), &ns.name);
    let stored = identities
        .create(&PostParams::default(), &identity)
        .await
        .unwrap();
    assert_eq!(stored.spec, identity.spec);
    assert!(stored.spec.validate().is_empty());
    let stored = bindings.create(&PostParams::default(), &binding).await.unwrap();
    assert_eq!(stored.spec, binding.spec);
}

/// Column names and cell rows of a list, as kubectl asks for them (server-side printing).
async fn table_of(client: &Client, path: &str) -> Result<(Vec<String>, Vec<Vec<Value>>)> {
    let request = http::Request::get(path)
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())?;
    let table: Value = serde_json::from_str(&client.request_text(request).await?)?;
    let columns = table["columnDefinitions"]
        .as_array()
        .context("no columns")?
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    let rows = table["rows"]
        .as_array()
        .context("no rows")?
        .iter()
        .map(|r| r["cells"].as_array().cloned().unwrap_or_default())
        .collect();
    Ok((columns, rows))
}
