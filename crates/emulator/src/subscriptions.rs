//! Azure Resource Manager's `Microsoft.Resources` subscription reads: `GET /subscriptions` (what
//! `az login --identity` calls to find the accounts of the identity it logged in with) and
//! `GET /subscriptions/{id}`. A principal sees the subscriptions of its token's tenant in which it holds
//! a role assignment at the subscription or below, as ARM lists them; a principal without any sees an
//! empty list (`az login --identity --allow-no-subscriptions` then records a tenant-level account).
//!
//! Shapes of api-version 2022-12-01 (the Azure CLI's), which older versions' clients read too.

use axum::body::Body;
use axum::response::Response;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};

use crate::arm::{authenticate, error};
use crate::http::{Conn, json as json_resp, param, query_pairs};
use crate::shared::{Shared, lock};
use crate::state::{State, Subscription};
use pod_identity_azure::resource_id::fold;

/// What a path names, if it is one of the subscription reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/subscriptions`.
    List,
    /// `/subscriptions/{id}`.
    Get(String),
}

/// The route of `path`, compared case-insensitively and with one trailing slash ignored, or `None` for
/// every other ARM path.
pub fn route(path: &str) -> Option<Route> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let mut segments = trimmed.split('/').skip(1);
    match (segments.next(), segments.next(), segments.next()) {
        (Some(first), None, None) if first.eq_ignore_ascii_case("subscriptions") => Some(Route::List),
        (Some(first), Some(id), None) if first.eq_ignore_ascii_case("subscriptions") && !id.is_empty() => {
            Some(Route::Get(id.to_owned()))
        }
        _ => None,
    }
}

/// The subscriptions `principal` of tenant `tenant` may see.
pub fn visible<'a>(state: &'a State, tenant: &str, principal: &str) -> Vec<&'a Subscription> {
    state
        .subscriptions
        .values()
        .filter(|s| s.tenant_id.eq_ignore_ascii_case(tenant))
        .filter(|s| {
            let scope = fold(&format!("/subscriptions/{}", s.id));
            state.role_assignments.iter().any(|ra| {
                let assigned = fold(&ra.scope);
                ra.principal_id.eq_ignore_ascii_case(principal)
                    && (assigned == scope || assigned.starts_with(&format!("{scope}/")))
            })
        })
        .collect()
}

/// A subscription as ARM describes it.
pub fn subscription_json(subscription: &Subscription) -> Value {
    json!({
        "id": format!("/subscriptions/{}", subscription.id),
        "authorizationSource": "RoleBased",
        "managedByTenants": [],
        "subscriptionId": subscription.id,
        "tenantId": subscription.tenant_id,
        "displayName": subscription.display_name,
        "state": "Enabled",
        "subscriptionPolicies": {
            "locationPlacementId": "Public_2014-09-01",
            "quotaId": "PayAsYouGo_2014-09-01",
            "spendingLimit": "Off",
        },
    })
}

pub async fn handle(sh: &Shared, _conn: &Conn, req: Request<Body>, route: Route) -> Response {
    let claims = match authenticate(sh, req.headers()) {
        Ok(claims) => claims,
        Err(resp) => return resp,
    };
    if req.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("The requested method '{}' is not allowed.", req.method()),
        );
    }
    let pairs = query_pairs(req.uri().query().unwrap_or(""));
    if param(&pairs, "api-version").is_none_or(str::is_empty) {
        return error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    let state = lock(&sh.state);
    let visible = visible(&state, &claims.tid, &claims.oid);
    match route {
        Route::List => {
            let value: Vec<Value> = visible.iter().map(|s| subscription_json(s)).collect();
            let count = value.len();
            json_resp(
                StatusCode::OK,
                &json!({"value": value, "count": {"type": "Total", "value": count}}),
            )
        }
        Route::Get(id) => match visible.iter().find(|s| s.id.eq_ignore_ascii_case(&id)) {
            Some(s) => json_resp(StatusCode::OK, &subscription_json(s)),
            None => error(
                StatusCode::NOT_FOUND,
                "SubscriptionNotFound",
                &format!("The subscription '{id}' could not be found."),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_subscription_reads_are_routed_here() {
        assert_eq!(route("/subscriptions"), Some(Route::List));
        assert_eq!(route("/Subscriptions/"), Some(Route::List));
        assert_eq!(route("/subscriptions/s1"), Some(Route::Get("s1".into())));
        assert_eq!(route("/subscriptions/s1/resourceGroups/rg"), None);
        assert_eq!(route("/subscriptions//"), None);
        assert_eq!(route("/providers/Microsoft.Compute"), None);
    }

    #[test]
    fn a_principal_sees_the_subscriptions_it_has_a_role_in() {
        let seed: crate::Seed = serde_json::from_value(json!({
            "tenants": [{"id": "t"}, {"id": "u"}],
            "subscriptions": [
                {"id": "s1", "tenantId": "t", "displayName": "one"},
                {"id": "s10", "tenantId": "t"},
                {"id": "s2", "tenantId": "u"},
            ],
            "roleAssignments": [
                {"principalId": "p", "scope": "/subscriptions/S1/resourceGroups/rg", "roleDefinitionName": "Reader"},
                {"principalId": "p", "scope": "/subscriptions/s2", "roleDefinitionName": "Reader"},
            ],
        }))
        .unwrap();
        let state = State::from_seed(&seed).unwrap();
        let ids: Vec<&str> = visible(&state, "t", "P").iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["s1"], "not s10 (prefix), not s2 (other tenant)");
        assert!(visible(&state, "t", "nobody").is_empty());
        let body = subscription_json(visible(&state, "t", "p")[0]);
        assert_eq!(body["displayName"], "one");
        assert_eq!(body["id"], "/subscriptions/s1");
    }
}
