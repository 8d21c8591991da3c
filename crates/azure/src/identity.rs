//! The identity block of a VM or scale set, and the change that moves it from what it is to what we want
//! ([`IdentityDelta`]): only the delta (`{}` adds, `null` removes, so identities someone else assigned are
//! never rewritten), the `type` that keeps a system-assigned identity, at most
//! [`MAX_IDENTITIES_PER_REQUEST`] entries per request, nothing at all when nothing changes. Pure over plain
//! data; the one place the workspace splits a change into requests.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::error::AzureError;
use crate::resource_id::{fold, same};

/// Compute refuses more than this many `userAssignedIdentities` entries in one request (aad-pod-identity
/// #813 stalled on it).
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
                    fold(id),
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
        self.user_assigned.contains_key(&fold(id))
    }
}

/// Identities to add to and remove from one VM or scale set: the whole change, or one request of it
/// ([`IdentityDelta::requests`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityDelta {
    /// IDs to add (`{}` in the body).
    pub add: Vec<String>,
    /// IDs to remove (`null` in the body), spelled as the resource lists them.
    pub remove: Vec<String>,
    /// Whether the resource has its system-assigned identity, which the request's `type` must keep.
    pub keep_system_assigned: bool,
    /// How many user-assigned identities the resource holds before this change; the request's identity
    /// `type` depends on whether any remain after it.
    pub users_before: usize,
}

impl IdentityDelta {
    /// What brings `current` to include `add` and exclude `remove`: only what is missing or present,
    /// each identity once (IDs compare case-insensitively), removals spelled as `current` has them so the
    /// key matches even for a case-sensitive reader, and nothing removed that is also to be added.
    pub fn between(current: &ResourceIdentity, add: &[String], remove: &[String]) -> Self {
        let mut seen = std::collections::HashSet::new();
        let adds: Vec<String> = add
            .iter()
            .filter(|a| !current.has(a) && seen.insert(fold(a)))
            .cloned()
            .collect();
        let removes: Vec<String> = remove
            .iter()
            .filter(|r| current.has(r) && !add.iter().any(|a| same(a, r)) && seen.insert(fold(r)))
            .map(|r| {
                current
                    .user_assigned
                    .get(&fold(r))
                    .map_or_else(|| r.clone(), |a| a.id.clone())
            })
            .collect();
        Self {
            add: adds,
            remove: removes,
            keep_system_assigned: current.kind.system,
            users_before: current.user_assigned.len(),
        }
    }

    /// Whether there is nothing to change.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// Whether the change adds or removes this identity (compared case-folded, as ARM compares IDs).
    pub fn touches(&self, id: &str) -> bool {
        self.add.iter().chain(&self.remove).any(|i| same(i, id))
    }

    /// How many user-assigned identities the resource holds after this change.
    pub fn users_after(&self) -> usize {
        (self.users_before + self.add.len()).saturating_sub(self.remove.len())
    }

    /// The identity `type` after this change: the system-assigned identity kept, `UserAssigned` while
    /// any user-assigned identity remains.
    pub fn identity_type(&self) -> IdentityType {
        IdentityType {
            system: self.keep_system_assigned,
            user: self.users_after() > 0,
        }
    }

    /// The requests that make this change, in order, each with at most [`MAX_IDENTITIES_PER_REQUEST`]
    /// entries; none when nothing changes. Additions go first, so that pods waiting for an identity are
    /// served before clean-up and a resource never passes through an empty state on its way between two
    /// non-empty ones.
    pub fn requests(&self) -> Vec<IdentityDelta> {
        let entries: Vec<(bool, &String)> = self
            .add
            .iter()
            .map(|id| (true, id))
            .chain(self.remove.iter().map(|id| (false, id)))
            .collect();
        let mut users = self.users_before;
        entries
            .chunks(MAX_IDENTITIES_PER_REQUEST)
            .map(|chunk| {
                let request = IdentityDelta {
                    add: chunk
                        .iter()
                        .filter(|(add, _)| *add)
                        .map(|(_, id)| (*id).clone())
                        .collect(),
                    remove: chunk
                        .iter()
                        .filter(|(add, _)| !*add)
                        .map(|(_, id)| (*id).clone())
                        .collect(),
                    keep_system_assigned: self.keep_system_assigned,
                    users_before: users,
                };
                users = request.users_after();
                request
            })
            .collect()
    }

    /// The PATCH body of one request: `{"identity": {"type": ..., "userAssignedIdentities": {id: {} | null}}}`.
    /// With no user-assigned identity left, the type alone removes them (Compute refuses a map then).
    pub fn to_body(&self) -> Value {
        let kind = self.identity_type();
        let mut ident = json!({ "type": kind.as_str() });
        if kind.user && !self.is_empty() {
            let map: Map<String, Value> = self
                .add
                .iter()
                .map(|id| (id.clone(), json!({})))
                .chain(self.remove.iter().map(|id| (id.clone(), Value::Null)))
                .collect();
            ident["userAssignedIdentities"] = Value::Object(map);
        }
        json!({ "identity": ident })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> String {
        format!(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{n}"
        )
    }

    fn plan(current: &ResourceIdentity, add: &[String], remove: &[String]) -> Vec<IdentityDelta> {
        IdentityDelta::between(current, add, remove).requests()
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
        assert!(plan(&cur, &[id(1).to_lowercase()], &[id(2)]).is_empty());
        assert!(plan(&cur, &[], &[]).is_empty());
    }

    #[test]
    fn system_identity_is_kept_in_the_type() {
        let p = plan(&current(true, &[]), &[id(1)], &[]);
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].to_body(),
            json!({"identity": {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {id(1): {}}}})
        );
    }

    #[test]
    fn removing_the_last_identity_switches_the_type() {
        let p = plan(&current(true, &[id(1)]), &[], &[id(1)]);
        assert_eq!(p[0].to_body(), json!({"identity": {"type": "SystemAssigned"}}));
        let p = plan(&current(false, &[id(1)]), &[], &[id(1)]);
        assert_eq!(p[0].to_body(), json!({"identity": {"type": "None"}}));
    }

    #[test]
    fn removal_sends_null_with_the_spelling_arm_has() {
        let p = plan(&current(false, &[id(1), id(2)]), &[], &[id(1).to_uppercase()]);
        assert_eq!(
            p[0].to_body(),
            json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {id(1): null}}})
        );
    }

    #[test]
    fn more_than_150_changes_are_chunked_adds_first() {
        let adds: Vec<String> = (0..200).map(id).collect();
        let cur = current(false, &[id(1000), id(1001)]);
        let p = plan(&cur, &adds, &[id(1000)]);
        assert_eq!(
            p.iter()
                .map(|c| (c.add.len(), c.remove.len()))
                .collect::<Vec<_>>(),
            vec![(150, 0), (50, 1)]
        );
        assert_eq!(p[1].remove, vec![id(1000)]);
        assert!(p.iter().all(|c| c.identity_type().as_str() == "UserAssigned"));
    }

    #[test]
    fn duplicate_requests_collapse() {
        let p = plan(&current(false, &[]), &[id(1), id(1).to_lowercase()], &[]);
        assert_eq!(p[0].add.len(), 1);
    }

    #[test]
    fn requests_hold_at_most_the_limit_with_additions_first_and_count_what_remains() {
        let ids = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
        let delta = IdentityDelta {
            add: ids("a", 200),
            remove: ids("r", 120),
            keep_system_assigned: true,
            users_before: 120,
        };
        let requests = delta.requests();
        assert_eq!(
            requests
                .iter()
                .map(|c| (c.add.len(), c.remove.len()))
                .collect::<Vec<_>>(),
            vec![(150, 0), (50, 100), (0, 20)]
        );
        assert!(requests.iter().all(|c| c.keep_system_assigned));
        assert_eq!(
            requests.iter().map(|c| c.users_before).collect::<Vec<_>>(),
            vec![120, 270, 220]
        );
        assert_eq!(requests[2].users_after(), 200);
        assert!(IdentityDelta::default().requests().is_empty());
        assert!(IdentityDelta::default().is_empty());
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
