//! The CustomResourceDefinitions, as installed: generated from the types, with the adjustments that keep
//! them identical in behaviour to the original's.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceSubresources, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use kube::CustomResourceExt;

use crate::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException};

/// Why the YAML could not be rendered.
#[derive(Debug, thiserror::Error)]
#[error("cannot render the CustomResourceDefinitions as YAML: {0}")]
pub struct RenderError(#[from] serde_saphyr::ser::Error);

/// All four CRDs, in a fixed order.
///
/// Status is part of the main resource, as in the original: it had no status subresource (identities
/// and bindings declare an empty `subresources`), and the original's controller writes the status of
/// assignments with plain patches, so adopted objects keep working either way.
pub fn all() -> Vec<CustomResourceDefinition> {
    let mut identity = AzureIdentity::crd();
    let mut binding = AzureIdentityBinding::crd();
    let mut assigned = AzureAssignedIdentity::crd();
    let mut exception = AzurePodIdentityException::crd();
    for crd in [&mut identity, &mut binding] {
        set_subresources(crd, Some(CustomResourceSubresources::default()));
    }
    for crd in [&mut assigned, &mut exception] {
        set_subresources(crd, None);
    }
    strip_embedded_validations(&mut assigned);
    let mut crds = vec![assigned, identity, binding, exception];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(root) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                normalise(root, false);
            }
        }
    }
    crds
}

/// First line of the generated file, so that nobody edits it by hand.
pub const GENERATED_HEADER: &str = "# Generated from crates/api by `cargo xtask gen-crds`; do not edit.\n";

/// Where the generated CRDs live, relative to the repository root.
pub const CRDS_PATH: &str = "crds/aadpodidentity.k8s.io.yaml";

/// The copy Helm installs with the chart (Helm reads only files inside the chart).
pub const CHART_CRDS_PATH: &str = "charts/pod-identity/crds/aadpodidentity.k8s.io.yaml";

/// The CRDs as one multi-document YAML stream: the content of [`CRDS_PATH`].
pub fn render_yaml() -> Result<String, RenderError> {
    let docs = all();
    let mut out = String::from(GENERATED_HEADER);
    for crd in &docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(crd)?);
    }
    Ok(out)
}

fn set_subresources(crd: &mut CustomResourceDefinition, subresources: Option<CustomResourceSubresources>) {
    for version in &mut crd.spec.versions {
        version.subresources.clone_from(&subresources);
    }
}

/// The copies of an identity and a binding inside an assignment are records, not user input: an
/// object the original stored before our rules existed must still be copied into an assignment.
fn strip_embedded_validations(crd: &mut CustomResourceDefinition) {
    for version in &mut crd.spec.versions {
        let mut spec = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|root| root.properties.as_mut())
            .and_then(|props| props.get_mut("spec"))
            .and_then(|spec| spec.properties.as_mut());
        for embedded in ["azureIdentityRef", "azureBindingRef"] {
            if let Some(schema) = spec.as_deref_mut().and_then(|props| props.get_mut(embedded)) {
                remove_validations(schema);
            }
        }
    }
}

/// Fields the original declared nullable; Go wrote them as `null` when unset.
const NULLABLE_FIELDS: [&str; 2] = ["auxiliaryTenantIDs", "replicas"];

/// The generator marks every optional field nullable and gives fields with a Rust default a schema
/// default. The original had neither: the server must not fill in values (objects read back as
/// written), and a `null` where a rule expects a string would make the rule fail with a type error
/// instead of its message.
fn normalise(schema: &mut JSONSchemaProps, nullable: bool) {
    schema.nullable = nullable.then_some(true);
    schema.default = None;
    for (name, child) in schema.properties.iter_mut().flat_map(|props| props.iter_mut()) {
        normalise(child, NULLABLE_FIELDS.contains(&name.as_str()));
    }
    if let Some(JSONSchemaPropsOrArray::Schema(item)) = schema.items.as_mut() {
        normalise(item, false);
    }
}

fn remove_validations(schema: &mut JSONSchemaProps) {
    schema.x_kubernetes_validations = None;
    for child in schema.properties.iter_mut().flat_map(|props| props.values_mut()) {
        remove_validations(child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(crds: &'a [CustomResourceDefinition], kind: &str) -> &'a CustomResourceDefinition {
        crds.iter().find(|c| c.spec.names.kind == kind).unwrap()
    }

    fn spec_schema(crd: &CustomResourceDefinition) -> &JSONSchemaProps {
        let root = crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap();
        &root.properties.as_ref().unwrap()["spec"]
    }

    #[test]
    fn all_kinds_are_namespaced_v1_in_the_original_group_with_the_approval_annotation() {
        let crds = all();
        let names: Vec<&str> = crds.iter().map(|c| c.metadata.name.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            vec![
                "azureassignedidentities.aadpodidentity.k8s.io",
                "azureidentities.aadpodidentity.k8s.io",
                "azureidentitybindings.aadpodidentity.k8s.io",
                "azurepodidentityexceptions.aadpodidentity.k8s.io",
            ]
        );
        for crd in &crds {
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(crd.spec.versions.len(), 1);
            assert_eq!(crd.spec.versions[0].name, "v1");
            let annotations = crd.metadata.annotations.as_ref().unwrap();
            assert_eq!(annotations["api-approved.kubernetes.io"], "unapproved");
        }
    }

    #[test]
    fn field_names_keep_the_original_casing() {
        let crds = all();
        let keys = |kind: &str| -> Vec<String> {
            spec_schema(find(&crds, kind))
                .properties
                .as_ref()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        for field in [
            "type",
            "resourceID",
            "clientID",
            "clientPassword",
            "tenantID",
            "auxiliaryTenantIDs",
            "adEndpoint",
        ] {
            assert!(keys("AzureIdentity").contains(&field.to_owned()), "{field}");
        }
        assert_eq!(
            keys("AzureIdentityBinding"),
            vec!["azureIdentity", "selector", "weight"]
        );
        for field in [
            "azureIdentityRef",
            "azureBindingRef",
            "pod",
            "podNamespace",
            "nodename",
        ] {
            assert!(
                keys("AzureAssignedIdentity").contains(&field.to_owned()),
                "{field}"
            );
        }
        assert_eq!(keys("AzurePodIdentityException"), vec!["podLabels"]);
    }

    #[test]
    fn status_is_not_a_subresource_as_in_the_original() {
        let crds = all();
        assert_eq!(
            find(&crds, "AzureIdentity").spec.versions[0].subresources,
            Some(Default::default())
        );
        assert_eq!(
            find(&crds, "AzureIdentityBinding").spec.versions[0].subresources,
            Some(Default::default())
        );
        assert_eq!(
            find(&crds, "AzureAssignedIdentity").spec.versions[0].subresources,
            None
        );
        assert_eq!(
            find(&crds, "AzurePodIdentityException").spec.versions[0].subresources,
            None
        );
    }

    #[test]
    fn embedded_copies_are_embedded_resources_without_admission_rules() {
        let crds = all();
        let aai = find(&crds, "AzureAssignedIdentity");
        let props = spec_schema(aai).properties.as_ref().unwrap();
        for embedded in ["azureIdentityRef", "azureBindingRef"] {
            assert_eq!(props[embedded].x_kubernetes_embedded_resource, Some(true));
            let yaml = serde_json::to_string(&props[embedded]).unwrap();
            assert!(!yaml.contains("x-kubernetes-validations"), "{embedded}");
        }
        let identity_rules = spec_schema(find(&crds, "AzureIdentity"))
            .x_kubernetes_validations
            .as_ref()
            .unwrap();
        assert_eq!(identity_rules.len(), 6);
    }

    #[test]
    fn printer_columns() {
        let crds = all();
        let columns = |kind: &str| -> Vec<String> {
            let version = &find(&crds, kind).spec.versions[0];
            version
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| c.name.clone())
                .collect()
        };
        assert_eq!(columns("AzureIdentity"), vec!["Type", "ClientID", "Age"]);
        assert_eq!(
            columns("AzureIdentityBinding"),
            vec!["AzureIdentity", "Selector", "Weight", "Age"]
        );
        assert_eq!(
            columns("AzureAssignedIdentity"),
            vec!["Pod", "PodNamespace", "Identity", "Node", "Status", "Age"]
        );
    }

    #[test]
    fn yaml_is_four_documents() {
        let yaml = render_yaml().unwrap();
        assert_eq!(yaml.matches("\n---\n").count(), 4, "{yaml}");
        assert!(yaml.starts_with(GENERATED_HEADER));
    }
}
