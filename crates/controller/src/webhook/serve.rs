//! The webhook's HTTPS server. Every replica serves (the Service sends the API server to any ready
//! one), with the serving certificate the Secret holds at the moment of the handshake: [`ServingKey`]
//! is swapped when the Secret changes, without a restart. Until a certificate is loaded handshakes
//! fail, and the webhook's `failurePolicy: Ignore` admits pods unchanged.

use std::{
    convert::Infallible,
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::DefaultBodyLimit,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::admission;

/// Path the `MutatingWebhookConfiguration` calls.
pub const MUTATE_PODS_PATH: &str = "/mutate-pods";

/// An AdmissionReview carries one pod, which etcd bounds at 1.5 MiB.
const BODY_LIMIT: usize = 4 * 1024 * 1024;

/// The serving certificate of the moment, shared by every connection.
#[derive(Debug, Default)]
pub struct ServingKey(RwLock<Option<Arc<CertifiedKey>>>);

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The PEM text holds no certificate or no key.
    #[error("reading PEM: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    /// rustls refused the pair (key type, or key not matching the certificate).
    #[error(transparent)]
    Tls(#[from] rustls::Error),
}

impl ServingKey {
    /// Serves `cert_pem` (leaf first) with `key_pem` from the next handshake on.
    ///
    /// Errors: unreadable PEM, or a key that does not match the certificate; the previous pair stays.
    pub fn load(&self, cert_pem: &str, key_pem: &str) -> Result<(), LoadError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        if chain.is_empty() {
            return Err(LoadError::Pem(rustls_pki_types::pem::Error::NoItemsFound));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        let certified = CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())?;
        let mut current = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Some(Arc::new(certified));
        Ok(())
    }

    /// Whether a certificate is loaded.
    pub fn is_loaded(&self) -> bool {
        self.0.read().is_ok_and(|key| key.is_some())
    }
}

impl ResolvesServerCert for ServingKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().and_then(|key| key.clone())
    }
}

/// The webhook's routes: `POST /mutate-pods` answers with [`admission::review`]; a body that holds
/// no answerable request gets 400.
pub fn router() -> Router {
    Router::new()
        .route(MUTATE_PODS_PATH, post(mutate))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

async fn mutate(body: Bytes) -> Response {
    match admission::review(&body) {
        Ok(review) => {
            if let Some(response) = &review.response {
                debug!(uid = %response.uid, patched = response.patch.is_some(), "admission review answered");
            }
            Json(review).into_response()
        }
        Err(err) => {
            warn!(error = %err, "unreadable admission review");
            (StatusCode::BAD_REQUEST, err.to_string()).into_response()
        }
    }
}

/// Serves [`router`] over TLS on `listener` with the certificate `key` holds, until dropped.
pub async fn serve(listener: TcpListener, key: Arc<ServingKey>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config =
        match rustls::ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
            Ok(builder) => builder.with_no_client_auth().with_cert_resolver(key),
            Err(err) => {
                warn!(error = %err, "the webhook's TLS configuration was refused");
                return;
            }
        };
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let app = router();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        connections.spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    debug!(error = %err, %peer, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service =
                hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let mut app = app.clone();
                    async move {
                        use tower::Service as _;
                        let response = app.call(request.map(axum::body::Body::new)).await;
                        Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
                    }
                });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(err) = builder.serve_connection(TokioIo::new(stream), service).await {
                debug!(error = %err, %peer, "webhook connection ended with an error");
            }
        });
    }
}
