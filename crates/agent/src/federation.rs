//! Tokens of federated identities: a token of the identity's subject (a ServiceAccount dedicated to the
//! identity, [`pod_identity_api::federation::subject_account`]) from the API server's TokenRequest API,
//! audience `api://AzureADTokenExchange`, presented to Entra ID as the `client_assertion` of the identity's
//! client ID in its tenant. Entra answers when the identity has a federated identity credential for the
//! cluster's issuer and that subject.
//!
//! Which pod may use the identity is decided before this module is reached, by the bindings, as for
//! identities on a node; Entra sees only the subject. Subject tokens are kept and reused for every
//! resource until half their life is gone (Entra refuses nothing for a token's age, and a TokenRequest per
//! access token would put the API server on every cache miss).
//!
//! Errors name what is missing: the subject (not created yet: the controller creates it, so asking again
//! helps), the agent's right to create its tokens, the federated credential Entra looked for (issuer,
//! subject, audience and client ID, as the identity needs it), a credential still propagating (AADSTS70021,
//! worth asking again), and a cluster signing with an algorithm Entra refuses.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::{authentication::v1::TokenRequest, core::v1::ServiceAccount};
use pod_identity_api::{
    AzureIdentity, ObjectKey,
    federation::{TOKEN_EXCHANGE_AUDIENCE, algorithm_problem, subject, subject_account},
};
use pod_identity_azure::AzureError;

use crate::{
    credentials::DEFAULT_AUTHORITY,
    upstream::{BoxFuture, Secret, ServicePrincipal, UpstreamError},
    world::key_of,
};

/// A token the API server issued for a ServiceAccount.
#[derive(Clone, PartialEq, Eq)]
pub struct SubjectToken {
    /// The JWT.
    pub token: String,
    /// Unix seconds.
    pub expires_on: i64,
}

impl std::fmt::Debug for SubjectToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectToken")
            .field("expires_on", &self.expires_on)
            .finish_non_exhaustive()
    }
}

/// The TokenRequest API, one attempt per call.
pub trait ServiceAccountTokens: Send + Sync + 'static {
    /// A token of ServiceAccount `namespace/account` for `audience`, living `expiration` (the API server
    /// may shorten it).
    fn request<'a>(
        &'a self,
        namespace: &'a str,
        account: &'a str,
        audience: &'a str,
        expiration: Duration,
    ) -> BoxFuture<'a, Result<SubjectToken, UpstreamError>>;
}

/// TokenRequest through the API server, with the agent's own credentials: it needs `create` on
/// `serviceaccounts/token` in the subjects namespace, and nothing else for federation.
#[derive(Clone)]
pub struct KubeTokenRequests(pub kube::Client);

impl ServiceAccountTokens for KubeTokenRequests {
    fn request<'a>(
        &'a self,
        namespace: &'a str,
        account: &'a str,
        audience: &'a str,
        expiration: Duration,
    ) -> BoxFuture<'a, Result<SubjectToken, UpstreamError>> {
        Box::pin(async move {
            let api = kube::Api::<ServiceAccount>::namespaced(self.0.clone(), namespace);
            let request: TokenRequest = serde_json::from_value(serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [audience],
                    "expirationSeconds": i64::try_from(expiration.as_secs()).unwrap_or(i64::MAX),
                },
            }))
            .map_err(|e| invalid(format!("building a TokenRequest: {e}")))?;
            let answer = api
                .create_token_request(account, &kube::api::PostParams::default(), &request)
                .await
                .map_err(|e| token_request_error(namespace, account, e))?;
            let status = answer.status.ok_or_else(|| {
                invalid(format!(
                    "the TokenRequest for ServiceAccount {namespace}/{account} came back without a token"
                ))
            })?;
            Ok(SubjectToken {
                token: status.token,
                expires_on: status.expiration_timestamp.0.as_second(),
            })
        })
    }
}

fn invalid(message: String) -> UpstreamError {
    UpstreamError::Azure(AzureError::InvalidResponse(message))
}

/// The API server's answer to a TokenRequest, sorted like an Azure answer (the one retry policy acts on it).
fn token_request_error(namespace: &str, account: &str, error: kube::Error) -> UpstreamError {
    match error {
        // The controller creates subjects as identities become federated: a request racing it, or
        // a controller behind, gets its answer by asking again.
        kube::Error::Api(status) if status.code == 404 => UpstreamError::Azure(AzureError::Transient {
            status: Some(404),
            code: status.reason.clone(),
            message: format!(
                "the subject of the identity, ServiceAccount {namespace}/{account}, does not exist (yet): the \
                 controller creates it for every federated identity when started with --federation-namespace \
                 {namespace}"
            ),
        }),
        kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
            UpstreamError::Credential(format!(
                "the agent may not create tokens of ServiceAccount {namespace}/{account} ({}): it needs create on \
             serviceaccounts/token in namespace {namespace} (the chart's federation RBAC)",
                status.message
            ))
        }
        kube::Error::Api(status) if status.code == 429 => UpstreamError::Azure(AzureError::Throttled {
            retry_after: None,
            message: format!("TokenRequest for {namespace}/{account}: {}", status.message),
        }),
        kube::Error::Api(status) if status.code >= 500 => UpstreamError::Azure(AzureError::Transient {
            status: Some(status.code),
            code: status.reason.clone(),
            message: format!("TokenRequest for {namespace}/{account}: {}", status.message),
        }),
        kube::Error::Api(status) => UpstreamError::Azure(AzureError::Other {
            status: status.code,
            code: status.reason.clone(),
            message: format!("TokenRequest for {namespace}/{account}: {}", status.message),
        }),
        other => UpstreamError::Azure(AzureError::Transient {
            status: None,
            code: "KubernetesApi".into(),
            message: format!("TokenRequest for {namespace}/{account}: {other}"),
        }),
    }
}

/// The subjects of federated identities and their tokens.
pub struct Subjects {
    namespace: String,
    source: Arc<dyn ServiceAccountTokens>,
    expiration: Duration,
    /// Per subject: its token and when it was fetched.
    kept: Mutex<HashMap<String, (SubjectToken, i64)>>,
}

impl std::fmt::Debug for Subjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subjects")
            .field("namespace", &self.namespace)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

impl Subjects {
    /// Subjects in `namespace`, tokens of `expiration` (at least 10 minutes, the API server's minimum).
    pub fn new(namespace: String, source: Arc<dyn ServiceAccountTokens>, expiration: Duration) -> Self {
        Self {
            namespace,
            source,
            expiration: expiration.max(Duration::from_secs(600)),
            kept: Mutex::new(HashMap::new()),
        }
    }

    /// The namespace of the subjects.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// What the exchange for `identity` presents, and to whom.
    pub fn exchange(&self, identity: &AzureIdentity) -> Exchange {
        let key = key_of(identity);
        let account = subject_account(&key);
        Exchange {
            subject: subject(&self.namespace, &account),
            account,
            identity: key,
            client_id: identity.spec.client_id.clone().unwrap_or_default(),
            tenant_id: identity
                .spec
                .tenant_id
                .clone()
                .unwrap_or_default()
                .trim()
                .to_owned(),
            authority: identity
                .spec
                .ad_endpoint
                .clone()
                .filter(|a| !a.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_AUTHORITY.to_owned()),
        }
    }

    /// A token of the exchange's subject: a kept one with more than half its life left (as the API server
    /// gave it, which may be shorter than asked), else a new one.
    pub async fn token(&self, exchange: &Exchange, now: i64) -> Result<SubjectToken, UpstreamError> {
        if let Some((kept, _)) = self
            .kept()
            .get(&exchange.account)
            .filter(|(t, fetched)| t.expires_on - now > (t.expires_on - fetched) / 2)
        {
            return Ok(kept.clone());
        }
        let token = self
            .source
            .request(
                &self.namespace,
                &exchange.account,
                TOKEN_EXCHANGE_AUDIENCE,
                self.expiration,
            )
            .await?;
        self.kept().insert(exchange.account.clone(), (token.clone(), now));
        Ok(token)
    }

    /// Forgets the kept token of a subject (after Entra refused it, the next attempt starts afresh).
    pub fn forget(&self, exchange: &Exchange) {
        self.kept().remove(&exchange.account);
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<String, (SubjectToken, i64)>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One identity's exchange: whose token is presented, for which client, in which tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// The AzureIdentity.
    pub identity: ObjectKey,
    /// Name of its subject ServiceAccount.
    pub account: String,
    /// `system:serviceaccount:<namespace>:<account>`.
    pub subject: String,
    /// The identity's client ID.
    pub client_id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// Entra's authority (the identity's `adEndpoint`, else the public cloud's).
    pub authority: String,
}

impl Exchange {
    /// What Entra's client-credentials grant needs: the subject token as the client assertion.
    pub fn principal(&self, token: &SubjectToken) -> Result<ServicePrincipal, UpstreamError> {
        if !self.authority.starts_with("https://") {
            return Err(UpstreamError::Credential(format!(
                "adEndpoint must be an https:// URL, not {}",
                self.authority
            )));
        }
        Ok(ServicePrincipal {
            authority: self.authority.clone(),
            tenant_id: self.tenant_id.clone(),
            auxiliary_tenant_ids: Vec::new(),
            client_id: self.client_id.clone(),
            secret: Secret::Assertion(token.token.clone()),
        })
    }

    /// Entra's refusal in words that name what the identity needs. AADSTS70021 (no matching credential,
    /// which is also what a credential still propagating gets) becomes worth retrying; a cluster that signs
    /// with an algorithm Entra refuses is said so first, whatever Entra answered.
    pub fn explain(&self, error: UpstreamError, token: &SubjectToken) -> UpstreamError {
        // Entra's refusals: a rejected assertion (`invalid_client`, as Unauthorized), or another 4xx.
        let (status, code, description, unauthorized) = match error {
            UpstreamError::Azure(AzureError::Unauthorized {
                status,
                code,
                message,
            }) => (status, code, message, true),
            UpstreamError::Azure(AzureError::Other {
                status,
                code,
                message,
            }) => (status, code, message, false),
            other => return other,
        };
        let refused = |message: String| {
            UpstreamError::Azure(if unauthorized {
                AzureError::Unauthorized {
                    status,
                    code: code.clone(),
                    message,
                }
            } else {
                AzureError::Other {
                    status,
                    code: code.clone(),
                    message,
                }
            })
        };
        let (issuer, alg) = issuer_and_algorithm(&token.token);
        let issuer = issuer.unwrap_or_else(|| "(unreadable)".into());
        let needs = format!(
            "identity {} (client {}) needs a federated identity credential with issuer {issuer}, subject {} and \
             audience {TOKEN_EXCHANGE_AUDIENCE}",
            self.identity, self.client_id, self.subject
        );
        if let Some(problem) = alg.as_deref().and_then(algorithm_problem) {
            return refused(format!("{problem}. Entra ID said: {description}"));
        }
        let mismatch = [
            "AADSTS700211",
            "AADSTS700212",
            "AADSTS700213",
            "AADSTS7002137",
            "AADSTS7002138",
        ]
        .iter()
        .any(|c| description.contains(c));
        if description.contains("AADSTS70021:") {
            UpstreamError::Azure(AzureError::Transient {
                status: Some(status),
                code: code.clone(),
                message: format!(
                    "Entra ID found no federated identity credential for the token (a new one takes minutes to \
                     propagate): {needs}. Entra ID said: {description}"
                ),
            })
        } else if mismatch {
            refused(format!(
                "no federated identity credential matches: {needs}. Entra ID said: {description}"
            ))
        } else {
            refused(format!(
                "Entra ID refused the token of {} for client {} in tenant {}: {description}",
                self.subject, self.client_id, self.tenant_id
            ))
        }
    }
}

/// The `iss` claim and the `alg` header of a JWT, read without checking it (the API server just issued it).
pub fn issuer_and_algorithm(jwt: &str) -> (Option<String>, Option<String>) {
    use base64::Engine;
    let part = |n: usize| -> Option<serde_json::Value> {
        let text = jwt.split('.').nth(n)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let alg = part(0).and_then(|h| h["alg"].as_str().map(str::to_owned));
    let iss = part(1).and_then(|c| c["iss"].as_str().map(str::to_owned));
    (iss, alg)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use base64::Engine;
    use pod_identity_api::{IdentityType, fixtures};

    use super::*;

    fn jwt(alg: &str, iss: &str) -> String {
        let b64 =
            |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.sig",
            b64(serde_json::json!({"alg": alg})),
            b64(serde_json::json!({"iss": iss, "sub": "x"}))
        )
    }

    fn identity() -> AzureIdentity {
        fixtures::identity_of_type("shop", "payments", IdentityType::UserAssignedManagedIdentity)
            .with_client_id("c1")
            .with_tenant_id(" t1 ")
    }

    struct Counting(AtomicUsize, i64);

    impl ServiceAccountTokens for Counting {
        fn request<'a>(
            &'a self,
            namespace: &'a str,
            account: &'a str,
            audience: &'a str,
            expiration: Duration,
        ) -> BoxFuture<'a, Result<SubjectToken, UpstreamError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            assert_eq!(
                (namespace, account, audience),
                ("subjects", "shop.payments", TOKEN_EXCHANGE_AUDIENCE)
            );
            let expires_on = self.1 + i64::try_from(expiration.as_secs()).unwrap();
            Box::pin(async move {
                Ok(SubjectToken {
                    token: format!("token-{n}"),
                    expires_on,
                })
            })
        }
    }

    #[tokio::test]
    async fn a_subject_token_is_reused_until_half_its_life_is_gone() {
        let source = Arc::new(Counting(AtomicUsize::new(0), 1000));
        let subjects = Subjects::new("subjects".into(), source.clone(), Duration::from_secs(60));
        let exchange = subjects.exchange(&identity());
        assert_eq!(exchange.subject, "system:serviceaccount:subjects:shop.payments");
        assert_eq!(exchange.tenant_id, "t1");
        assert_eq!(exchange.authority, DEFAULT_AUTHORITY);
        // 60 s is below the API server's minimum: 600 s are asked for.
        assert_eq!(subjects.token(&exchange, 1000).await.unwrap().expires_on, 1600);
        assert_eq!(subjects.token(&exchange, 1299).await.unwrap().token, "token-0");
        assert_eq!(subjects.token(&exchange, 1300).await.unwrap().token, "token-1");
        subjects.forget(&exchange);
        assert_eq!(subjects.token(&exchange, 1301).await.unwrap().token, "token-2");
        assert_eq!(source.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn the_exchange_presents_the_subject_token_as_the_client_assertion() {
        let subjects = Subjects::new(
            "subjects".into(),
            Arc::new(Counting(AtomicUsize::new(0), 0)),
            Duration::from_secs(3600),
        );
        let token = SubjectToken {
            token: "jwt".into(),
            expires_on: 0,
        };
        let principal = subjects.exchange(&identity()).principal(&token).unwrap();
        assert!(matches!(principal.secret, Secret::Assertion(ref t) if t == "jwt"));
        assert_eq!(
            (principal.client_id.as_str(), principal.tenant_id.as_str()),
            ("c1", "t1")
        );
        let mut plain = identity();
        plain.spec.ad_endpoint = Some("http://login.example/".into());
        assert!(subjects.exchange(&plain).principal(&token).is_err());
    }

    fn refused(description: &str) -> UpstreamError {
        UpstreamError::Azure(AzureError::Unauthorized {
            status: 400,
            code: "invalid_client".into(),
            message: description.into(),
        })
    }

    #[test]
    fn refusals_name_the_credential_the_identity_needs() {
        let subjects = Subjects::new(
            "subjects".into(),
            Arc::new(Counting(AtomicUsize::new(0), 0)),
            Duration::from_secs(3600),
        );
        let exchange = subjects.exchange(&identity());
        let token = SubjectToken {
            token: jwt("RS256", "https://issuer.example"),
            expires_on: 0,
        };
        let missing = exchange.explain(
            refused("AADSTS700213: No matching federated identity record found"),
            &token,
        );
        let text = missing.to_string();
        assert!(!missing.is_retryable());
        for part in [
            "identity shop/payments (client c1)",
            "issuer https://issuer.example",
            "subject system:serviceaccount:subjects:shop.payments",
            "audience api://AzureADTokenExchange",
            "AADSTS700213",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        let propagating = exchange.explain(
            refused("AADSTS70021: No matching federated identity record found"),
            &token,
        );
        assert!(propagating.is_retryable(), "{propagating}");
        assert!(propagating.to_string().contains("propagate"));
        let other = exchange.explain(refused("AADSTS700016: Application not found"), &token);
        assert!(
            other.to_string().contains("for client c1 in tenant t1"),
            "{other}"
        );
        let transient = UpstreamError::Azure(AzureError::Transient {
            status: Some(503),
            code: "ServiceUnavailable".into(),
            message: "busy".into(),
        });
        assert_eq!(exchange.explain(transient.clone(), &token), transient);
    }

    /// Entra as the token service sees it: records what was presented, refuses while `refuse` is set.
    #[derive(Default)]
    struct Entra {
        presented: Mutex<Vec<(String, String, String)>>,
        refuse: Mutex<Option<UpstreamError>>,
    }

    impl crate::upstream::Upstream for Entra {
        fn imds_token<'a>(
            &'a self,
            _: &'a crate::request::Selector,
            _: &'a str,
        ) -> BoxFuture<'a, Result<crate::upstream::Token, UpstreamError>> {
            panic!("a federated identity never asks IMDS")
        }

        fn entra_token<'a>(
            &'a self,
            principal: &'a ServicePrincipal,
            tenant_id: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<crate::upstream::Token, UpstreamError>> {
            let Secret::Assertion(assertion) = &principal.secret else {
                panic!("expected the subject token as assertion")
            };
            self.presented.lock().unwrap().push((
                principal.client_id.clone(),
                tenant_id.to_owned(),
                assertion.clone(),
            ));
            let refusal = self.refuse.lock().unwrap().clone();
            Box::pin(async move {
                match refusal {
                    Some(error) => Err(error),
                    None => Ok(crate::upstream::Token {
                        access_token: "access".into(),
                        expires_on: crate::clock::now() + 86_400,
                        not_before: crate::clock::now(),
                        client_id: Some(principal.client_id.clone()),
                        object_id: None,
                    }),
                }
            })
        }
    }

    struct NoSecrets;

    impl crate::tokens::Credentials for NoSecrets {
        fn load<'a>(
            &'a self,
            _: &'a AzureIdentity,
        ) -> BoxFuture<'a, Result<ServicePrincipal, UpstreamError>> {
            panic!("a federated identity has no Secret")
        }
    }

    fn service(entra: Arc<Entra>, subjects: Option<Arc<Subjects>>) -> crate::tokens::TokenService {
        let service = crate::tokens::TokenService::new(
            crate::cache::TokenCache::new(crate::cache::Freshness::default(), Duration::from_secs(1)),
            entra,
            Arc::new(NoSecrets),
            pod_identity_azure::RetryPolicy {
                max_retries: 1,
                initial_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(2),
                max_retry_after: Duration::from_millis(5),
            },
            Arc::new(crate::metrics::Metrics::new()),
        );
        match subjects {
            Some(subjects) => service.with_federation(subjects),
            None => service,
        }
    }

    fn principal() -> crate::resolve::Principal {
        crate::resolve::Principal::Federated {
            identity: ObjectKey::new("shop", "payments"),
            uid: None,
        }
    }

    #[tokio::test]
    async fn the_token_service_exchanges_the_subject_token_once_and_caches_the_answer() {
        let entra = Arc::new(Entra::default());
        let source = Arc::new(Counting(AtomicUsize::new(0), crate::clock::now()));
        let subjects = Arc::new(Subjects::new(
            "subjects".into(),
            source.clone(),
            Duration::from_secs(3600),
        ));
        let tokens = service(entra.clone(), Some(subjects));
        let (first, outcome) = tokens
            .tokens(&principal(), Some(&identity()), "https://vault.azure.net")
            .await;
        assert_eq!(first.unwrap()[0].access_token, "access");
        assert_eq!(outcome, crate::cache::Outcome::Miss);
        let (_, outcome) = tokens
            .tokens(&principal(), Some(&identity()), "https://vault.azure.net")
            .await;
        assert_eq!(outcome, crate::cache::Outcome::Hit);
        // Another resource: Entra again, the subject token is reused.
        tokens
            .tokens(&principal(), Some(&identity()), "https://storage.azure.com")
            .await
            .0
            .unwrap();
        let presented = entra.presented.lock().unwrap().clone();
        assert_eq!(
            presented,
            vec![
                ("c1".to_owned(), "t1".to_owned(), "token-0".to_owned()),
                ("c1".to_owned(), "t1".to_owned(), "token-0".to_owned()),
            ]
        );
        assert_eq!(source.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_reaches_the_caller_naming_the_credential_and_the_next_attempt_starts_afresh() {
        let entra = Arc::new(Entra::default());
        *entra.refuse.lock().unwrap() = Some(refused(
            "AADSTS700211: No matching federated identity record found for presented assertion issuer",
        ));
        let source = Arc::new(Counting(AtomicUsize::new(0), crate::clock::now()));
        let subjects = Arc::new(Subjects::new(
            "subjects".into(),
            source.clone(),
            Duration::from_secs(3600),
        ));
        let tokens = service(entra.clone(), Some(subjects));
        let (result, _) = tokens
            .tokens(&principal(), Some(&identity()), "https://vault.azure.net")
            .await;
        let text = result.unwrap_err().to_string();
        assert!(
            text.contains("needs a federated identity credential with issuer"),
            "{text}"
        );
        assert!(
            text.contains("subject system:serviceaccount:subjects:shop.payments"),
            "{text}"
        );
        assert_eq!(
            entra.presented.lock().unwrap().len(),
            1,
            "a refusal is not retried"
        );
        *entra.refuse.lock().unwrap() = None;
        // Past the cache's memory of the failure.
        tokio::time::advance(Duration::from_millis(1100)).await;
        tokens
            .tokens(&principal(), Some(&identity()), "https://vault.azure.net")
            .await
            .0
            .unwrap();
        assert_eq!(
            source.0.load(Ordering::SeqCst),
            2,
            "the refused subject token was not kept"
        );
    }

    #[tokio::test]
    async fn an_agent_without_a_subjects_namespace_says_how_to_serve_federated_identities() {
        let tokens = service(Arc::new(Entra::default()), None);
        let (result, _) = tokens
            .tokens(&principal(), Some(&identity()), "https://vault.azure.net")
            .await;
        let text = result.unwrap_err().to_string();
        assert!(
            text.contains("identity shop/payments is federated") && text.contains("--federation-namespace"),
            "{text}"
        );
    }

    #[test]
    fn a_cluster_signing_with_an_algorithm_entra_refuses_is_told_so() {
        let subjects = Subjects::new(
            "subjects".into(),
            Arc::new(Counting(AtomicUsize::new(0), 0)),
            Duration::from_secs(3600),
        );
        let token = SubjectToken {
            token: jwt("ES256", "https://issuer.example"),
            expires_on: 0,
        };
        let error = subjects.exchange(&identity()).explain(
            refused("AADSTS5002738: Invalid JWT token. 'ES256' is not a supported signature algorithm."),
            &token,
        );
        let text = error.to_string();
        assert!(text.contains("signs service-account tokens with ES256"), "{text}");
        assert!(text.contains("RSA"), "{text}");
        assert_eq!(
            issuer_and_algorithm(&token.token),
            (Some("https://issuer.example".into()), Some("ES256".into()))
        );
        assert_eq!(issuer_and_algorithm("garbage"), (None, None));
    }
}
