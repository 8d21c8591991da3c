//! Listeners and the path every request takes: which service it is for, an injected fault if one matches,
//! the service itself, then the request log. One accept loop serves plain HTTP (IMDS) and TLS (ARM, Entra,
//! Key Vault) alike, with HTTP/1.1 and HTTP/2, and hands each request the connection it came on so the log
//! records the true source address.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use http::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::faults::Target;
use crate::http::{Conn, Service, Tag, with_header};
use crate::observe::{RequestRecord, noting_retry_after};
use crate::shared::{Shared, lock};
use crate::{arm, entra, imds, keyvault, subscriptions};
use pod_identity_azure::resource_id::{ResourceId, fold};

/// Which service of the HTTPS listener a path belongs to. Entra paths start with a tenant; everything not
/// recognised goes to ARM, which answers unknown paths the way ARM does.
pub fn classify(path: &str) -> Service {
    let lower = path.to_ascii_lowercase();
    let first = lower.split('/').nth(1).unwrap_or("");
    let rest = lower.splitn(3, '/').nth(2).unwrap_or("");
    match first {
        "subscriptions" | "providers" => Service::Arm,
        "secrets" | "keys" | "certificates" | "deletedsecrets" | "storage" => Service::KeyVault,
        _ if rest.starts_with("oauth2/")
            || rest.starts_with("v2.0/.well-known")
            || rest.starts_with(".well-known")
            || rest.starts_with("discovery/") =>
        {
            Service::Entra
        }
        _ => Service::Arm,
    }
}

fn fault_response(service: Service, status: u16, retry_after: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let resp = match service {
        Service::Imds => imds::fault(code),
        Service::Arm => arm::fault(code),
        Service::Entra => entra::fault(code),
        Service::KeyVault => keyvault::fault(code),
    };
    match retry_after {
        Some(secs) => with_header(resp, "retry-after", &secs.to_string()),
        None => resp,
    }
}

pub async fn serve_request(sh: Arc<Shared>, req: Request<Body>, conn: Conn) -> Response {
    let start = Instant::now();
    let service = if conn.instance.is_some() {
        Service::Imds
    } else {
        classify(req.uri().path())
    };
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let span =
        tracing::debug_span!("request", service = service.as_str(), %method, %path, source = %conn.peer);
    let _entered = span.enter();
    let action = {
        let mut faults = lock(&sh.faults);
        if faults.is_empty() {
            None
        } else {
            faults.take(&Target {
                service,
                method: &method,
                path: &path,
                query: &query,
            })
        }
    };
    drop(_entered);
    if let Some(a) = &action
        && !a.latency.is_zero()
    {
        tokio::time::sleep(a.latency).await;
    }
    let answer = action.as_ref().and_then(|a| a.status.map(|s| (s, a.retry_after)));
    let (mut resp, inside_retry_after) = match answer {
        Some((status, retry_after)) => (fault_response(service, status, retry_after), false),
        None => {
            noting_retry_after(async {
                match service {
                    Service::Imds => imds::handle(&sh, &conn, req).await,
                    Service::Arm => match subscriptions::route(&path) {
                        Some(route) => subscriptions::handle(&sh, &conn, req, route).await,
                        None => arm::handle(&sh, &conn, req).await,
                    },
                    Service::Entra => entra::handle(&sh, &conn, req).await,
                    Service::KeyVault => keyvault::handle(&sh, &conn, req).await,
                }
            })
            .await
        }
    };
    let tag = resp.extensions_mut().remove::<Tag>().unwrap_or_else(|| Tag {
        resource: match service {
            Service::Imds => conn.instance.as_deref().map(ResourceId::key),
            Service::Arm => arm::resource_key(&path),
            _ => None,
        },
        identity: None,
    });
    let status = resp.status().as_u16();
    tracing::debug!(parent: &span, status, "answered");
    lock(&sh.log).push(RequestRecord {
        seq: 0,
        time: jiff::Timestamp::now().to_string(),
        service,
        listener: conn.local.to_string(),
        source: conn.peer.to_string(),
        method,
        path,
        query,
        status,
        resource: tag.resource.map(|r| fold(&r)),
        identity: tag.identity,
        fault: action.map(|a| a.fault_id),
        duration_us: start.elapsed().as_micros() as u64,
        inside_retry_after,
    });
    resp
}

pub type Handler =
    Arc<dyn Fn(Request<Body>, Conn) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Accepts connections until `shutdown` turns true, then drops every open connection.
pub fn spawn_listener(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    instance: Option<Arc<ResourceId>>,
    handler: Handler,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let local = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "listener has no local address");
                return;
            }
        };
        let mut conns = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, %local, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // The address this connection reached, not the listener's: on a wildcard listener (0.0.0.0)
            // URLs built from it (an operation to poll, under HTTP/2 where no Host header names the
            // server) must name an address the client can reach and the certificate covers.
            let conn = Conn {
                peer,
                local: stream.local_addr().unwrap_or(local),
                instance: instance.clone(),
            };
            let handler = handler.clone();
            let tls = tls.clone();
            conns.spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let fut = handler(req.map(Body::new), conn.clone());
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let result = match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                            Ok(Ok(s)) => builder.serve_connection(TokioIo::new(s), service).await,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, %peer, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                    None => builder.serve_connection(TokioIo::new(stream), service).await,
                };
                if let Err(e) = result {
                    tracing::trace!(error = %e, %peer, "connection ended with an error");
                }
            });
        }
        conns.abort_all();
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_go_to_their_service() {
        assert_eq!(classify("/subscriptions/s/resourceGroups/rg"), Service::Arm);
        assert_eq!(classify("/SECRETS/x"), Service::KeyVault);
        assert_eq!(classify("/tenant/oauth2/v2.0/token"), Service::Entra);
        assert_eq!(
            classify("/tenant/v2.0/.well-known/openid-configuration"),
            Service::Entra
        );
        assert_eq!(classify("/common/discovery/instance"), Service::Entra);
        assert_eq!(classify("/whatever"), Service::Arm);
    }
}
