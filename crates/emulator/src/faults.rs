//! Fault injection: rules that make matching requests slow, or answer them with an error status before the
//! service sees them. The body of an injected error is shaped like that service's own errors (see each
//! service module), so clients parse it as they would Azure's. Matching is pure; the HTTP layer applies the
//! outcome.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::http::Service;

/// A rule, as the admin API and library accept it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FaultSpec {
    /// Only requests to this service; any when absent.
    pub service: Option<Service>,
    /// Only this HTTP method (any case).
    pub method: Option<String>,
    /// Only requests whose path contains this text, compared case-insensitively (a resource ID, a secret
    /// name, `/oauth2/`...).
    pub path_contains: Option<String>,
    /// Only requests whose query string contains this text (e.g. `client_id=...`), case-insensitively.
    pub query_contains: Option<String>,
    /// The status to answer with (429, 500, 503, 410...); absent for latency alone.
    pub status: Option<u16>,
    /// `Retry-After` seconds to send with the status.
    pub retry_after: Option<u64>,
    /// Delay before answering (or before handling, without `status`).
    pub latency_ms: Option<u64>,
    /// How many matching requests the rule applies to; forever when absent.
    pub times: Option<u32>,
}

/// A rule in force and how often it fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub id: u64,
    #[serde(flatten)]
    pub spec: FaultSpec,
    pub hits: u64,
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub fault_id: u64,
    pub latency: Duration,
    pub status: Option<u16>,
    pub retry_after: Option<u64>,
}

/// The request as matching sees it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub service: Service,
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
}

fn contains_ci(hay: &str, needle: &str) -> bool {
    hay.to_ascii_lowercase().contains(&needle.to_ascii_lowercase())
}

impl FaultSpec {
    fn matches(&self, t: &Target<'_>) -> bool {
        self.service.is_none_or(|s| s == t.service)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(t.method))
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| contains_ci(t.path, p))
            && self
                .query_contains
                .as_deref()
                .is_none_or(|q| contains_ci(t.query, q))
    }
}

#[derive(Debug, Default)]
pub struct Faults {
    next_id: u64,
    rules: Vec<Fault>,
}

impl Faults {
    pub fn add(&mut self, spec: FaultSpec) -> u64 {
        self.next_id += 1;
        self.rules.push(Fault {
            id: self.next_id,
            spec,
            hits: 0,
        });
        self.next_id
    }

    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.rules.len();
        self.rules.retain(|f| f.id != id);
        before != self.rules.len()
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    pub fn list(&self) -> Vec<Fault> {
        self.rules.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule matching the request fires (oldest first); a rule whose count runs out is dropped.
    pub fn take(&mut self, t: &Target<'_>) -> Option<Action> {
        let idx = self.rules.iter().position(|f| f.spec.matches(t))?;
        let rule = &mut self.rules[idx];
        rule.hits += 1;
        let action = Action {
            fault_id: rule.id,
            latency: Duration::from_millis(rule.spec.latency_ms.unwrap_or(0)),
            status: rule.spec.status,
            retry_after: rule.spec.retry_after,
        };
        if let Some(times) = rule.spec.times.as_mut() {
            *times = times.saturating_sub(1);
            if *times == 0 {
                self.rules.remove(idx);
            }
        }
        Some(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str) -> Target<'_> {
        Target {
            service: Service::Arm,
            method: "PATCH",
            path,
            query: "api-version=2024-07-01",
        }
    }

    #[test]
    fn rules_match_on_service_method_and_path_case_insensitively() {
        let mut f = Faults::default();
        f.add(FaultSpec {
            service: Some(Service::Arm),
            method: Some("patch".into()),
            path_contains: Some("VIRTUALMACHINESCALESETS/SS1".into()),
            status: Some(429),
            retry_after: Some(7),
            ..FaultSpec::default()
        });
        assert_eq!(
            f.take(&target("/subscriptions/s/x/virtualMachineScaleSets/ss2")),
            None
        );
        let a = f
            .take(&target("/subscriptions/s/x/virtualMachineScaleSets/ss1"))
            .unwrap();
        assert_eq!((a.status, a.retry_after), (Some(429), Some(7)));
        let get = Target {
            method: "GET",
            ..target("/subscriptions/s/x/virtualMachineScaleSets/ss1")
        };
        assert_eq!(f.take(&get), None);
        assert_eq!(f.list()[0].hits, 1);
    }

    #[test]
    fn counted_rules_expire_and_the_oldest_rule_wins() {
        let mut f = Faults::default();
        let first = f.add(FaultSpec {
            status: Some(500),
            times: Some(2),
            ..FaultSpec::default()
        });
        let second = f.add(FaultSpec {
            latency_ms: Some(5),
            ..FaultSpec::default()
        });
        assert_eq!(f.take(&target("/a")).unwrap().fault_id, first);
        assert_eq!(f.take(&target("/a")).unwrap().fault_id, first);
        let a = f.take(&target("/a")).unwrap();
        assert_eq!(
            (a.fault_id, a.status, a.latency),
            (second, None, Duration::from_millis(5))
        );
        assert!(f.remove(second));
        assert!(f.is_empty());
    }

    #[test]
    fn query_filter_targets_one_identity() {
        let mut f = Faults::default();
        f.add(FaultSpec {
            query_contains: Some("client_id=abc".into()),
            status: Some(503),
            ..FaultSpec::default()
        });
        let t = Target {
            service: Service::Imds,
            method: "GET",
            path: "/metadata/identity/oauth2/token",
            query: "resource=x&client_id=ABC",
        };
        assert!(f.take(&t).is_some());
        assert!(
            f.take(&Target {
                query: "client_id=def",
                ..t
            })
            .is_none()
        );
    }
}
