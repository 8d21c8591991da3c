//! A stand-in OpenID issuer for component tests of Entra's federated grant: HTTPS on loopback with its own
//! CA, serving `/.well-known/openid-configuration` and `/openid/v1/jwks` as kube-apiserver does, signing
//! RS256 tokens with a fixed test key. Tests break it on purpose (status, unparsable keys, a hang) and count
//! what Entra fetched. The fidelity tests use the real kube-apiserver instead.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair, RsaPublicKeyComponents};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const RSA_PKCS8_PEM: &str = include_str!("../fixtures/issuer-rsa.pem");
pub const KID: &str = "test-key-1";

/// How the issuer answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    Normal,
    /// Discovery answers this status.
    DiscoveryStatus(u16),
    /// The keys document is this text.
    KeysBody(String),
    /// Neither endpoint ever answers.
    Hang,
}

#[derive(Debug)]
struct Inner {
    behaviour: Behaviour,
    /// Extra JWKs published besides the test key.
    extra_keys: Vec<Value>,
    discovery_hits: u64,
    keys_hits: u64,
}

#[derive(Clone)]
pub struct Issuer {
    pub url: String,
    pub ca_pem: String,
    inner: Arc<Mutex<Inner>>,
    _server: Arc<tokio::task::JoinHandle<()>>,
}

fn key() -> RsaKeyPair {
    let der = PrivatePkcs8KeyDer::from_pem_slice(RSA_PKCS8_PEM.as_bytes()).unwrap();
    RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap()
}

pub fn test_jwk() -> Value {
    let public: RsaPublicKeyComponents<Vec<u8>> = key().public().into();
    json!({"use": "sig", "kty": "RSA", "kid": KID, "alg": "RS256", "n": B64.encode(&public.n), "e": B64.encode(&public.e)})
}

/// A compact JWS with `header` (alg RS256 and kid added unless given) signed by the test key.
pub fn sign(header: Value, claims: &Value) -> String {
    let mut h = json!({"alg": "RS256", "kid": KID});
    if let Value::Object(extra) = header {
        for (k, v) in extra {
            h[k] = v;
        }
    }
    let input = format!("{}.{}", B64.encode(h.to_string()), B64.encode(claims.to_string()));
    let key = key();
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", B64.encode(sig))
}

impl Issuer {
    pub async fn start() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test issuer CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        let tls =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![CertificateDer::from(server_cert.der().to_vec())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
                )
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner {
            behaviour: Behaviour::Normal,
            extra_keys: Vec::new(),
            discovery_hits: 0,
            keys_hits: 0,
        }));
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/openid/v1/jwks", get(jwks))
            .with_state((inner.clone(), url.clone()));
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                            .await;
                    }
                });
            }
        });
        Self {
            url,
            ca_pem: ca_cert.pem(),
            inner,
            _server: Arc::new(server),
        }
    }

    pub fn set(&self, behaviour: Behaviour) {
        self.inner.lock().unwrap().behaviour = behaviour;
    }

    pub fn publish(&self, jwk: Value) {
        self.inner.lock().unwrap().extra_keys.push(jwk);
    }

    /// (discovery documents, key sets) served so far.
    pub fn hits(&self) -> (u64, u64) {
        let i = self.inner.lock().unwrap();
        (i.discovery_hits, i.keys_hits)
    }

    /// Claims of a Kubernetes service-account token from this issuer, valid from now for an hour.
    pub fn claims(&self, subject: &str, audience: &str) -> Value {
        let now = jiff::Timestamp::now().as_second();
        json!({"iss": self.url, "sub": subject, "aud": [audience], "iat": now, "nbf": now, "exp": now + 3600})
    }
}

type Ctx = State<(Arc<Mutex<Inner>>, String)>;

async fn discovery(State((inner, url)): Ctx) -> Response {
    let behaviour = {
        let mut i = inner.lock().unwrap();
        i.discovery_hits += 1;
        i.behaviour.clone()
    };
    match behaviour {
        Behaviour::Hang => std::future::pending().await,
        Behaviour::DiscoveryStatus(s) => StatusCode::from_u16(s).unwrap().into_response(),
        _ => axum::Json(json!({
            "issuer": url,
            "jwks_uri": format!("{url}/openid/v1/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }))
        .into_response(),
    }
}

async fn jwks(State((inner, _)): Ctx) -> Response {
    let (behaviour, extra) = {
        let mut i = inner.lock().unwrap();
        i.keys_hits += 1;
        (i.behaviour.clone(), i.extra_keys.clone())
    };
    match behaviour {
        Behaviour::Hang => std::future::pending().await,
        Behaviour::KeysBody(b) => b.into_response(),
        _ => {
            let mut keys = vec![test_jwk()];
            keys.extend(extra);
            axum::Json(json!({"keys": keys})).into_response()
        }
    }
}
