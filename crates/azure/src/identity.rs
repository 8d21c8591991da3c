//! The identity block of a VM or scale set, and the PATCH bodies that move it from what it is to what we want:
//! only the delta (`{}` adds, `null` removes, so identities someone else assigned are never rewritten), the
//! `type` that keeps a system-assigned identity, at most 150 entries per request, nothing at all when nothing
//! changes. Pure over plain data.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::error::AzureError;

/// Compute refuses more than this many `userAssignedIdentities` entries in one request.
pub const MAX_IDENTITIES_PER_REQUEST: usize = 150;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdentityType {
    pub system: bool,
    pub user: bool,
}

impl IdentityType {
    /// Lenient, like the SDKs: any case, with or without the space after the comma; unknown is `None`.
    pub fn parse(s: &str) -> Self {
        let norm: String = s
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        Self {
            system: norm.split(',').any(|p| p == "systemassigned"),
            user: norm.split(',').any(|p| p == "userassigned"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match (self.system, self.user) {
            (false, false) => "None",
            (true, false) => "SystemAssigned",
            (false, true) => "UserAssigned",
            (true, true) => "SystemAssigned, UserAssigned",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedIdentity {
    /// The ID as ARM spelled it.
    pub id: String,
    /// `None` when the identity was deleted but is still listed.
    pub client_id: Option<String>,
    pub principal_id: Option<String>,
}

/// A VM's or scale set's identities as ARM reports them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceIdentity {
    pub kind: IdentityType,
    pub principal_id: Option<String>,
    pub tenant_id: Option<String>,
    /// Keyed by the case-folded ID.
    pub user_assigned: BTreeMap<String, AssignedIdentity>,
    pub provisioning_state: Option<String>,
    pub etag: Option<String>,
}

impl ResourceIdentity {
    /// Reads the resource body of a VM or scale set GET or PATCH.
    pub fn from_resource(body: &Value) -> Result<Self, AzureError> {
        if !body.is_object() {
            return Err(AzureError::InvalidResponse(
                "resource body is not a JSON object".into(),
            ));
        }
        let ident = &body["identity"];
        let mut out = Self {
            kind: ident["type"]
                .as_str()
                .map(IdentityType::parse)
                .unwrap_or_default(),
            principal_id: ident["principalId"].as_str().map(str::to_owned),
            tenant_id: ident["tenantId"].as_str().map(str::to_owned),
            provisioning_state: body["properties"]["provisioningState"]
                .as_str()
                .map(str::to_owned),
            etag: body["etag"].as_str().map(str::to_owned),
            ..Self::default()
        };
        if let Some(map) = ident["userAssignedIdentities"].as_object() {
            for (id, v) in map {
                out.user_assigned.insert(
                    id.to_ascii_lowercase(),
                    AssignedIdentity {
                        id: id.clone(),
                        client_id: v["clientId"].as_str().map(str::to_owned),
                        principal_id: v["principalId"].as_str().map(str::to_owned),
                    },
                );
            }
        }
        Ok(out)
    }

    pub fn has(&self, id: &str) -> bool {
        self.user_assigned.contains_key(&id.to_ascii_lowercase())
    }
}

/// One PATCH body's identity part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPatch {
    pub kind: IdentityType,
    /// (identity ID, add?) — `true` sends `{}`, `false` sends `null`.
    pub entries: Vec<(String, bool)>,
}

impl IdentityPatch {
    pub fn to_body(&self) -> Value {
        let mut ident = json!({ "type": self.kind.as_str() });
        // With no user-assigned identity left, the type alone removes them (Compute refuses a map then).
        if self.kind.user && !self.entries.is_empty() {
            let map: Map<String, Value> = self
                .entries
                .iter()
                .map(|(id, add)| (id.clone(), if *add { json!({}) } else { Value::Null }))
                .collect();
            ident["userAssignedIdentities"] = Value::Object(map);
        }
        json!({ "identity": ident })
    }
}

/// The PATCHes that add `add` and remove `remove`, in order; empty when nothing changes. Adds go first so a
/// resource never passes through an empty state on its way between two non-empty ones.
pub fn plan_update(current: &ResourceIdentity, add: &[String], remove: &[String]) -> Vec<IdentityPatch> {
    let mut seen = std::collections::HashSet::new();
    let adds: Vec<String> = add
        .iter()
        .filter(|a| !current.has(a) && seen.insert(a.to_ascii_lowercase()))
        .cloned()
        .collect();
    let removes: Vec<String> = remove
        .iter()
        .filter(|r| {
            current.has(r)
                && !add.iter().any(|a| a.eq_ignore_ascii_case(r))
                && seen.insert(r.to_ascii_lowercase())
        })
        // Remove with the spelling ARM has, so the key matches even for a case-sensitive reader.
        .map(|r| {
            current
                .user_assigned
                .get(&r.to_ascii_lowercase())
                .map_or_else(|| r.clone(), |a| a.id.clone())
        })
        .collect();
    let entries: Vec<(String, bool)> = adds
        .into_iter()
        .map(|a| (a, true))
        .chain(removes.into_iter().map(|r| (r, false)))
        .collect();
    let mut remaining = current.user_assigned.len();
    let system = current.kind.system;
    entries
        .chunks(MAX_IDENTITIES_PER_REQUEST)
        .map(|chunk| {
            for (_, add) in chunk {
                if *add {
                    remaining += 1;
                } else {
                    remaining -= 1;
                }
            }
            IdentityPatch {
                kind: IdentityType {
                    system,
                    user: remaining > 0,
                },
                entries: chunk.to_vec(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> String {
        format!(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{n}"
        )
    }

    fn current(system: bool, ids: &[String]) -> ResourceIdentity {
        let mut map = Map::new();
        for i in ids {
            map.insert(i.clone(), json!({"clientId": "c", "principalId": "p"}));
        }
        let kind = IdentityType {
            system,
            user: !ids.is_empty(),
        };
        ResourceIdentity::from_resource(
            &json!({"identity": {"type": kind.as_str(), "userAssignedIdentities": map}}),
        )
        .unwrap()
    }

    #[test]
    fn no_change_means_no_request() {
        let cur = current(false, &[id(1)]);
        assert!(plan_update(&cur, &[id(1).to_lowercase()], &[id(2)]).is_empty());
        assert!(plan_update(&cur, &[], &[]).is_empty());
    }

    #[test]
    fn system_identity_is_kept_in_the_type() {
        let p = plan_update(&current(true, &[]), &[id(1)], &[]);
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].to_body(),
            json!({"identity": {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {id(1): {}}}})
        );
    }

    #[test]
    fn removing_the_last_identity_switches_the_type() {
        let p = plan_update(&current(true, &[id(1)]), &[], &[id(1)]);
        assert_eq!(p[0].to_body(), json!({"identity": {"type": "SystemAssigned"}}));
        let p = plan_update(&current(false, &[id(1)]), &[], &[id(1)]);
        assert_eq!(p[0].to_body(), json!({"identity": {"type": "None"}}));
    }

    #[test]
    fn removal_sends_null_with_the_spelling_arm_has() {
        let p = plan_update(&current(false, &[id(1), id(2)]), &[], &[id(1).to_uppercase()]);
        assert_eq!(
            p[0].to_body(),
            json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {id(1): null}}})
        );
    }

    #[test]
    fn more_than_150_changes_are_chunked_adds_first() {
        let adds: Vec<String> = (0..200).map(id).collect();
        let cur = current(false, &[id(1000), id(1001)]);
        let p = plan_update(&cur, &adds, &[id(1000)]);
        assert_eq!(
            p.iter().map(|c| c.entries.len()).collect::<Vec<_>>(),
            vec![150, 51]
        );
        assert!(p[0].entries.iter().all(|(_, add)| *add));
        assert_eq!(p[1].entries.last(), Some(&(id(1000), false)));
        assert!(p.iter().all(|c| c.kind.as_str() == "UserAssigned"));
    }

    #[test]
    fn duplicate_requests_collapse() {
        let p = plan_update(&current(false, &[]), &[id(1), id(1).to_lowercase()], &[]);
        assert_eq!(p[0].entries.len(), 1);
    }

    #[test]
    fn reads_deleted_identities_with_null_ids() {
        let r = ResourceIdentity::from_resource(&json!({"identity": {"type": "userAssigned",
            "userAssignedIdentities": {id(1): {"clientId": null, "principalId": null}}},
            "properties": {"provisioningState": "Updating"}}))
        .unwrap();
        assert!(r.kind.user && !r.kind.system);
        assert_eq!(r.user_assigned[&id(1).to_lowercase()].client_id, None);
        assert_eq!(r.provisioning_state.as_deref(), Some("Updating"));
    }
}
