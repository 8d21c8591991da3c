//! What a token request's outcome becomes: the answer's status, the decision counted in
//! `pod_identity_decisions`, the audit record's decision and reason, and the Event on the pod. One table
//! for every outcome that serves no token, so that the status SDKs see, what operators count and what the
//! pod's owner is told cannot drift apart.
//!
//! A refusal is final (403) only when nothing the caller waits for can change it; whatever may still come
//! (an address or containers reported, an assignment made, a list loaded, upstream recovering) is a 503
//! with `Retry-After`, which every SDK retries (`../shared/reference/azure-contracts.md`).

use std::time::Duration;

use http::StatusCode;
use pod_identity_azure::AzureError;

use crate::{
    audit::{Decision, Reason as AuditReason},
    events::Reason as EventReason,
    resolve::{Pending, Resolution},
    upstream::UpstreamError,
};

/// How a request that gets no token is answered and accounted for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// 403 (final) or 503 (retry).
    pub status: StatusCode,
    /// `Retry-After` of a 503, when upstream named one; otherwise the configured one.
    pub retry_after: Option<Duration>,
    /// Label of `pod_identity_decisions`.
    pub decision: &'static str,
    /// The audit record's decision and reason.
    pub audited: (Decision, AuditReason),
    /// The Event on the calling pod, if any.
    pub event: Option<EventReason>,
}

impl Verdict {
    fn denied(decision: &'static str, reason: AuditReason, event: Option<EventReason>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            retry_after: None,
            decision,
            audited: (Decision::Denied, reason),
            event,
        }
    }

    fn unavailable(decision: &'static str, reason: AuditReason, event: Option<EventReason>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry_after: None,
            decision,
            audited: (Decision::Unavailable, reason),
            event,
        }
    }
}

/// The verdict on a resolution that serves nothing; `None` for one that goes on to fetch a token (served,
/// excepted).
pub fn of_resolution(resolution: &Resolution) -> Option<Verdict> {
    match resolution {
        Resolution::Serve(_) | Resolution::Excepted => None,
        Resolution::Deny(_) => Some(Verdict::denied(
            "denied",
            AuditReason::IdentityDenied,
            Some(EventReason::IdentityDenied),
        )),
        // The pod named an object ID none of its identities has: an Event would only repeat the
        // caller's own mistake to its owner.
        Resolution::LearnObjectIds(_) => Some(Verdict::denied("denied", AuditReason::IdentityDenied, None)),
        Resolution::Wait(Pending::NotSynced) => Some(Verdict::unavailable(
            "timeout",
            AuditReason::NotSynced,
            Some(EventReason::IdentityNotAssigned),
        )),
        // No pod to tell: the caller is not known.
        Resolution::Wait(pending) if pending.is_about_the_caller() => Some(Verdict::unavailable(
            "unknown_caller",
            AuditReason::UnknownCaller,
            None,
        )),
        Resolution::Wait(_) => Some(Verdict::unavailable(
            "timeout",
            AuditReason::IdentityNotAssigned,
            Some(EventReason::IdentityNotAssigned),
        )),
    }
}

/// The verdict on a token fetch that failed.
pub fn of_upstream(error: &UpstreamError) -> Verdict {
    let retry = |retry_after| Verdict {
        retry_after,
        ..Verdict::unavailable(
            "upstream_error",
            AuditReason::TokenUpstreamError,
            Some(EventReason::TokenUpstreamError),
        )
    };
    match error {
        UpstreamError::Azure(AzureError::Throttled { retry_after, .. }) => retry(*retry_after),
        UpstreamError::Azure(AzureError::InvalidResponse(_)) => retry(None),
        // The controller recorded the identity as on this machine, and IMDS does not know it yet: IMDS
        // sees a scale set's new identities some time after ARM's update completes, and an identity taken
        // off by someone else is put back by the controller. Either way asking again can succeed.
        UpstreamError::Azure(AzureError::IdentityNotFound { .. }) => retry(None),
        error if error.is_retryable() => retry(None),
        _ => Verdict::denied(
            "upstream_error",
            AuditReason::TokenUpstreamError,
            Some(EventReason::TokenUpstreamError),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::{Grant, Principal};
    use pod_identity_api::{AssignmentStatus, AzureIdentity, ObjectKey};
    use std::sync::Arc;

    fn grant() -> Grant {
        Grant {
            identity: ObjectKey::new("ns", "id"),
            object: Arc::new(AzureIdentity::new("id", Default::default())),
            principal: Principal::Managed {
                client_id: "c".into(),
            },
            first_token_recorded: Default::default(),
        }
    }

    /// Status, counted decision, audit decision and reason, Event.
    type Row = (u16, &'static str, Decision, AuditReason, Option<EventReason>);

    /// Every resolution, its status, its counted decision, its audit reason, and whether the pod is told.
    #[test]
    fn every_resolution_that_serves_nothing_has_one_row() {
        use AuditReason as A;
        use EventReason as E;
        let pod = ObjectKey::new("ns", "web");
        let rows: Vec<(Resolution, Option<Row>)> = vec![
            (Resolution::Serve(Arc::new(grant())), None),
            (Resolution::Excepted, None),
            (
                Resolution::Deny("not bound".into()),
                Some((
                    403,
                    "denied",
                    Decision::Denied,
                    A::IdentityDenied,
                    Some(E::IdentityDenied),
                )),
            ),
            (
                Resolution::LearnObjectIds(vec![Arc::new(grant())]),
                Some((403, "denied", Decision::Denied, A::IdentityDenied, None)),
            ),
            (
                Resolution::Wait(Pending::NotSynced),
                Some((
                    503,
                    "timeout",
                    Decision::Unavailable,
                    A::NotSynced,
                    Some(E::IdentityNotAssigned),
                )),
            ),
            (
                Resolution::Wait(Pending::UnknownCaller),
                Some((
                    503,
                    "unknown_caller",
                    Decision::Unavailable,
                    A::UnknownCaller,
                    None,
                )),
            ),
            (
                Resolution::Wait(Pending::AmbiguousCaller(vec![pod.clone()])),
                Some((
                    503,
                    "unknown_caller",
                    Decision::Unavailable,
                    A::UnknownCaller,
                    None,
                )),
            ),
            (
                Resolution::Wait(Pending::UnsettledCaller(pod.clone())),
                Some((
                    503,
                    "unknown_caller",
                    Decision::Unavailable,
                    A::UnknownCaller,
                    None,
                )),
            ),
            (
                Resolution::Wait(Pending::Assignment {
                    identity: pod.clone(),
                    status: Some(AssignmentStatus::Created),
                }),
                Some((
                    503,
                    "timeout",
                    Decision::Unavailable,
                    A::IdentityNotAssigned,
                    Some(E::IdentityNotAssigned),
                )),
            ),
        ];
        for (resolution, expected) in rows {
            let verdict = of_resolution(&resolution)
                .map(|v| (v.status.as_u16(), v.decision, v.audited.0, v.audited.1, v.event));
            assert_eq!(verdict, expected, "{resolution:?}");
        }
    }

    #[test]
    fn upstream_failures_that_may_pass_are_503s_and_only_final_ones_403s() {
        let throttled = UpstreamError::Azure(AzureError::Throttled {
            retry_after: Some(Duration::from_secs(7)),
            message: "slow down".into(),
        });
        let verdict = of_upstream(&throttled);
        assert_eq!(
            (verdict.status, verdict.retry_after),
            (StatusCode::SERVICE_UNAVAILABLE, Some(Duration::from_secs(7))),
            "upstream's Retry-After is passed on"
        );
        let not_yet = UpstreamError::Azure(AzureError::IdentityNotFound {
            code: "invalid_request".into(),
            message: "Identity not found".into(),
        });
        assert_eq!(of_upstream(&not_yet).status, StatusCode::SERVICE_UNAVAILABLE);
        let garbled = UpstreamError::Azure(AzureError::InvalidResponse("not JSON".into()));
        assert_eq!(of_upstream(&garbled).status, StatusCode::SERVICE_UNAVAILABLE);
        let refused = UpstreamError::Azure(AzureError::Unauthorized {
            status: 400,
            code: "unauthorized_client".into(),
            message: "AADSTS700016".into(),
        });
        let verdict = of_upstream(&refused);
        assert_eq!(
            (verdict.status, verdict.audited.0),
            (StatusCode::FORBIDDEN, Decision::Denied)
        );
        for verdict in [of_upstream(&throttled), of_upstream(&refused)] {
            assert_eq!(verdict.decision, "upstream_error");
            assert_eq!(verdict.audited.1, AuditReason::TokenUpstreamError);
            assert_eq!(verdict.event, Some(EventReason::TokenUpstreamError));
        }
    }
}
