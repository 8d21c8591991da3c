//! Azure Resource Manager calls on the identities of VMs and scale sets: GET, PATCH of the delta in chunks of
//! at most 150, waiting for each update's long-running operation, and GET of user-assigned identities.
//! Throttling is honoured twice: a `Retry-After` short enough is waited out, and until it passes further
//! calls of the same kind (reads or writes) fail fast instead of earning more 429s.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::error::{AzureError, extract_identity_ids};
use crate::identity::{IdentityDelta, ResourceIdentity};
use crate::machine::Machine;
use crate::retry::{RetryPolicy, ThrottleGate, log_retry, parse_retry_after, with_retries};
use crate::token::TokenSource;

pub mod federated_credentials;

pub const PUBLIC_ENDPOINT: &str = "https://management.azure.com";
pub const PUBLIC_AUDIENCE: &str = "https://management.azure.com/";

/// A user-assigned identity as ARM describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAssignedIdentity {
    pub id: String,
    pub client_id: String,
    pub principal_id: String,
    pub tenant_id: String,
}

#[derive(Debug, Clone)]
pub struct ArmConfig {
    /// e.g. [`PUBLIC_ENDPOINT`].
    pub endpoint: String,
    /// The token audience, e.g. [`PUBLIC_AUDIENCE`].
    pub audience: String,
    pub compute_api_version: String,
    pub msi_api_version: String,
    pub retry: RetryPolicy,
    /// Poll interval of a long-running operation when ARM sends no `Retry-After`.
    pub poll_interval: Duration,
    /// How long to wait for one long-running operation.
    pub operation_timeout: Duration,
}

impl Default for ArmConfig {
    fn default() -> Self {
        Self {
            endpoint: PUBLIC_ENDPOINT.to_owned(),
            audience: PUBLIC_AUDIENCE.to_owned(),
            compute_api_version: "2024-07-01".to_owned(),
            msi_api_version: "2023-01-31".to_owned(),
            retry: RetryPolicy::default(),
            poll_interval: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(15 * 60),
        }
    }
}

/// What ARM answered, once the status was acceptable.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

/// The outcome of [`ArmClient::update_identities`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateOutcome {
    /// How many PATCH requests were sent (0 when nothing had to change).
    pub patches: usize,
    pub identity: ResourceIdentity,
}

/// Sorts an ARM error answer into an [`AzureError`] ([`AzureError::from_answer`]), reading `code` and
/// `message` from ARM's `error` object.
pub fn classify(status: u16, body: &Value, retry_after: Option<Duration>) -> AzureError {
    // ARM wraps errors in `error`; azure-core also accepts the unwrapped shape, and so do we.
    let err = if body["error"].is_object() {
        &body["error"]
    } else {
        body
    };
    let code = err["code"].as_str().unwrap_or_default().to_owned();
    let message = err["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    // A 429 carries which bucket refused it in its message ([`ThrottleScope::of`]).
    let message = if status == 429 {
        throttled_message(&code, err, message)
    } else {
        message
    };
    AzureError::from_answer(status, code, message, retry_after)
}

/// Which of ARM's throttling buckets refused a request, and so which calls must wait for its
/// `Retry-After`: the resource's own (Compute's per-resource policies: only calls on that VM or scale
/// set), or the subscription's (ARM's front door, which counts the caller's requests per subscription,
/// and Compute's per-subscription policies: every call of that kind in the subscription). Source: ARM's
/// request-limits-and-throttling and Compute's compute-throttling-limits documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThrottleScope {
    /// The VM or scale set called.
    Resource,
    /// Every resource of the subscription.
    Subscription,
}

/// What [`classify`] appends to the message of a 429 that a subscription's bucket refused; the message is
/// the one field a [`AzureError::Throttled`] carries, so the scope travels in it.
const SUBSCRIPTION_THROTTLED: &str = "(throttled for the whole subscription)";

impl ThrottleScope {
    /// A throttling error of this scope, as [`classify`] makes it from a 429 (for fakes and tests of
    /// callers).
    pub fn throttled(self, retry_after: Option<Duration>, message: &str) -> AzureError {
        AzureError::Throttled {
            retry_after,
            message: match self {
                Self::Resource => message.to_owned(),
                Self::Subscription => format!("{message} {SUBSCRIPTION_THROTTLED}"),
            },
        }
    }

    /// The scope of a throttling error made by [`classify`]; `None` for any other error.
    pub fn of(err: &AzureError) -> Option<Self> {
        match err {
            AzureError::Throttled { message, .. } if message.ends_with(SUBSCRIPTION_THROTTLED) => {
                Some(Self::Subscription)
            }
            AzureError::Throttled { .. } => Some(Self::Resource),
            _ => None,
        }
    }
}

/// The message of a 429, marked when the subscription's bucket refused it. ARM's front door answers
/// `SubscriptionRequestsThrottled`; Compute answers `OperationNotAllowed` naming its policy in
/// `details[].target` (`...SubscriptionMaximum` for the subscription's bucket, `...Resource` for the
/// resource's). A 429 that names neither is taken as the subscription's, the polite reading.
fn throttled_message(code: &str, err: &Value, message: String) -> String {
    let targets: Vec<&str> = err["details"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["target"].as_str()).collect())
        .unwrap_or_default();
    let per_resource = code != "SubscriptionRequestsThrottled"
        && !targets.is_empty()
        && targets
            .iter()
            .all(|t| !t.to_ascii_lowercase().contains("subscription"));
    if per_resource {
        format!("{message} ({})", targets.join(", "))
    } else {
        format!("{message} {SUBSCRIPTION_THROTTLED}")
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()))
}

fn terminal(state: &str) -> bool {
    ["succeeded", "failed", "canceled"].contains(&state.to_ascii_lowercase().as_str())
}

#[derive(Debug)]
pub struct ArmClient {
    http: reqwest::Client,
    cfg: ArmConfig,
    tokens: Arc<dyn TokenSource>,
    read_gate: Mutex<ThrottleGate>,
    write_gate: Mutex<ThrottleGate>,
}

impl ArmClient {
    pub fn new(http: reqwest::Client, cfg: ArmConfig, tokens: Arc<dyn TokenSource>) -> Self {
        Self {
            http,
            cfg,
            tokens,
            read_gate: Mutex::default(),
            write_gate: Mutex::default(),
        }
    }

    fn gate(&self, write: bool) -> std::sync::MutexGuard<'_, ThrottleGate> {
        let g = if write { &self.write_gate } else { &self.read_gate };
        g.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn url(&self, path: &str, api_version: &str) -> String {
        format!(
            "{}{path}?api-version={api_version}",
            self.cfg.endpoint.trim_end_matches('/')
        )
    }

    /// One request: throttle gate, token, send, classify.
    async fn attempt(
        &self,
        method: &Method,
        url: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<Answer, AzureError> {
        let write = method != Method::GET;
        if let Err(remaining) = self.gate(write).check(Instant::now()) {
            return Err(AzureError::Throttled {
                retry_after: Some(remaining),
                message: "waiting for an earlier Retry-After from ARM".into(),
            });
        }
        let token = self.tokens.token(&self.cfg.audience).await?;
        let mut req = self.http.request(method.clone(), url).bearer_auth(&token.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(etag) = if_match {
            req = req.header(reqwest::header::IF_MATCH, etag);
        }
        let resp = req.send().await.map_err(|e| AzureError::transport(&e))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| AzureError::transport(&e))?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if (200..300).contains(&status) {
            return Ok(Answer {
                status,
                headers,
                body,
            });
        }
        let ra = retry_after(&headers);
        if status == 429 {
            self.gate(write)
                .throttled(Instant::now(), ra.unwrap_or(Duration::from_secs(1)));
        }
        let err = classify(status, &body, ra);
        tracing::debug!(%method, %url, status, error = %err, "ARM refused");
        Err(err)
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<Answer, AzureError> {
        with_retries(
            &self.cfg.retry,
            || self.attempt(&method, url, body, if_match),
            log_retry("arm"),
        )
        .await
    }

    /// The identities of a VM or scale set, with its entity tag ([`ResourceIdentity::etag`]).
    #[tracing::instrument(skip(self), fields(machine = %machine))]
    pub async fn get_identity(&self, machine: &Machine) -> Result<ResourceIdentity, AzureError> {
        let a = self
            .send(
                Method::GET,
                &self.url(&machine.arm_id(), &self.cfg.compute_api_version),
                None,
                None,
            )
            .await?;
        ResourceIdentity::from_resource(&a.body)
    }

    /// Sends one identity PATCH (one of [`IdentityDelta::requests`]) and waits for its operation; the
    /// identities afterwards. With `if_match` (an entity tag from [`Self::get_identity`] or an earlier
    /// PATCH), ARM refuses the change with 412 ([`AzureError::Conflict`]) when the resource changed since.
    #[tracing::instrument(skip(self, request), fields(machine = %machine, add = request.add.len(), remove = request.remove.len()))]
    pub async fn patch_identity(
        &self,
        machine: &Machine,
        request: &IdentityDelta,
        if_match: Option<&str>,
    ) -> Result<ResourceIdentity, AzureError> {
        let url = self.url(&machine.arm_id(), &self.cfg.compute_api_version);
        let a = self
            .send(Method::PATCH, &url, Some(&request.to_body()), if_match)
            .await?;
        let body = self.wait_for_operation(&url, a).await?;
        ResourceIdentity::from_resource(&body)
    }

    /// Brings the user-assigned identities of a VM or scale set to include `add` and exclude `remove`, touching
    /// nothing else; no request at all beyond the GET when nothing has to change.
    #[tracing::instrument(skip(self, add, remove), fields(machine = %machine, add = add.len(), remove = remove.len()))]
    pub async fn update_identities(
        &self,
        machine: &Machine,
        add: &[String],
        remove: &[String],
    ) -> Result<UpdateOutcome, AzureError> {
        let mut identity = self.get_identity(machine).await?;
        if identity
            .provisioning_state
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("Deleting"))
        {
            return Err(AzureError::Conflict {
                status: 409,
                code: "ResourceDeleting".into(),
                message: format!(
                    "{} is being deleted; its identities are left alone",
                    machine.arm_id()
                ),
            });
        }
        let requests = IdentityDelta::between(&identity, add, remove).requests();
        for request in &requests {
            identity = self.patch_identity(machine, request, None).await?;
        }
        Ok(UpdateOutcome {
            patches: requests.len(),
            identity,
        })
    }

    /// Waits for the long-running operation a PATCH started, the way azure-core does: the
    /// `Azure-AsyncOperation` URL first, else `Location`, else the resource's `provisioningState`; then the
    /// resource as it ended up.
    async fn wait_for_operation(&self, resource_url: &str, first: Answer) -> Result<Value, AzureError> {
        let state = first.body["properties"]["provisioningState"]
            .as_str()
            .unwrap_or("Succeeded")
            .to_owned();
        if state.eq_ignore_ascii_case("Succeeded") {
            return Ok(first.body);
        }
        let deadline = Instant::now() + self.cfg.operation_timeout;
        let mut delay = retry_after(&first.headers).unwrap_or(self.cfg.poll_interval);
        let header = |name: &str| {
            first
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (poll_url, mode) = match (header("azure-asyncoperation"), header("location")) {
            (Some(u), _) => (u, 0),
            (None, Some(u)) => (u, 1),
            (None, None) => (resource_url.to_owned(), 2),
        };
        loop {
            if Instant::now() + delay > deadline {
                return Err(AzureError::Transient {
                    status: None,
                    code: "OperationTimeout".into(),
                    message: format!(
                        "operation on {resource_url} did not finish in {:?}",
                        self.cfg.operation_timeout
                    ),
                });
            }
            tokio::time::sleep(delay).await;
            let a = self.send(Method::GET, &poll_url, None, None).await?;
            let status = match mode {
                0 => a.body["status"].as_str().unwrap_or("InProgress").to_owned(),
                1 => "Succeeded".to_owned(),
                _ => a.body["properties"]["provisioningState"]
                    .as_str()
                    .unwrap_or("Succeeded")
                    .to_owned(),
            };
            if terminal(&status) {
                if !status.eq_ignore_ascii_case("Succeeded") {
                    let e = &a.body["error"];
                    let code = e["code"].as_str().unwrap_or_default().to_owned();
                    let message = e["message"].as_str().unwrap_or_default().to_owned();
                    if code == "FailedIdentityOperation" {
                        return Err(AzureError::IdentitiesRejected {
                            identities: extract_identity_ids(&message),
                            code,
                            message,
                        });
                    }
                    return Err(AzureError::OperationFailed {
                        status,
                        code,
                        message,
                    });
                }
                if mode == 2 {
                    return Ok(a.body);
                }
                return Ok(self.send(Method::GET, resource_url, None, None).await?.body);
            }
            delay = retry_after(&a.headers).unwrap_or(self.cfg.poll_interval);
        }
    }

    /// A user-assigned identity's client and principal IDs.
    #[tracing::instrument(skip(self))]
    pub async fn get_user_assigned_identity(&self, id: &str) -> Result<UserAssignedIdentity, AzureError> {
        let a = self
            .send(Method::GET, &self.url(id, &self.cfg.msi_api_version), None, None)
            .await?;
        let p = &a.body["properties"];
        let field = |k: &str| {
            p[k].as_str()
                .map(str::to_owned)
                .ok_or_else(|| AzureError::InvalidResponse(format!("identity {id} has no {k}")))
        };
        Ok(UserAssignedIdentity {
            id: a.body["id"].as_str().unwrap_or(id).to_owned(),
            client_id: field("clientId")?,
            principal_id: field("principalId")?,
            tenant_id: field("tenantId")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_bodies_sort_into_kinds() {
        let b = |code: &str, msg: &str| json!({"error": {"code": code, "message": msg}});
        let id =
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x";
        assert!(
            matches!(classify(429, &b("OperationNotAllowed", ""), Some(Duration::from_secs(5))),
            AzureError::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(5))
        );
        let e = classify(
            400,
            &b(
                "FailedIdentityOperation",
                &format!("Resource '{id}' was not found."),
            ),
            None,
        );
        assert_eq!(e.identities(), [id.to_string()]);
        let e = classify(
            403,
            &b(
                "LinkedAuthorizationFailed",
                &format!("linked scope(s) '{id}' (respectively)"),
            ),
            None,
        );
        assert!(matches!(e, AzureError::IdentitiesRejected { .. }), "{e}");
        assert_eq!(e.identities().len(), 1);
        assert!(matches!(
            classify(403, &b("AuthorizationFailed", ""), None),
            AzureError::Unauthorized { status: 403, .. }
        ));
        assert!(matches!(
            classify(401, &b("InvalidAuthenticationToken", ""), None),
            AzureError::Unauthorized { .. }
        ));
        assert!(matches!(
            classify(404, &b("ResourceNotFound", ""), None),
            AzureError::ResourceNotFound { .. }
        ));
        assert!(classify(409, &b("AnotherOperationInProgress", ""), None).is_retryable());
        assert!(matches!(
            classify(412, &b("PreconditionFailed", ""), None),
            AzureError::Conflict { status: 412, .. }
        ));
        // A subscription ARM does not know says nothing of the resource: it is not gone.
        for code in [
            "SubscriptionNotFound",
            "InvalidResourceType",
            "MissingSubscriptionRegistration",
        ] {
            assert!(
                matches!(
                    classify(404, &b(code, ""), None),
                    AzureError::Other { status: 404, .. }
                ),
                "{code}"
            );
        }
        assert!(matches!(
            classify(404, &b("ResourceGroupNotFound", ""), None),
            AzureError::ResourceNotFound { .. }
        ));
        assert!(classify(503, &b("ServiceUnavailable", ""), None).is_retryable());
        assert!(matches!(
            classify(400, &b("BadRequest", ""), None),
            AzureError::Other { status: 400, .. }
        ));
        // Which bucket refused: the resource's, or the subscription's (also when the answer does not say).
        let crp = |target: &str| {
            json!({"error": {"code": "OperationNotAllowed", "message": "m",
                "details": [{"code": "TooManyRequests", "target": target, "message": "{}"}]}})
        };
        let scope = |body: &Value| ThrottleScope::of(&classify(429, body, None));
        assert_eq!(
            scope(&crp("PutVMScaleSetResource")),
            Some(ThrottleScope::Resource)
        );
        assert_eq!(
            scope(&crp("PutVMScaleSetSubscriptionMaximum")),
            Some(ThrottleScope::Subscription)
        );
        assert_eq!(
            scope(&b(
                "SubscriptionRequestsThrottled",
                "Number of 'write' requests for subscription"
            )),
            Some(ThrottleScope::Subscription)
        );
        assert_eq!(
            scope(&b("TooManyRequests", "")),
            Some(ThrottleScope::Subscription)
        );
        assert_eq!(ThrottleScope::of(&classify(503, &b("x", ""), None)), None);
        // The unwrapped error shape some ARM services send.
        assert!(
            matches!(classify(404, &json!({"code": "NotFound", "message": "m"}), None),
            AzureError::ResourceNotFound { code, .. } if code == "NotFound")
        );
    }
}
