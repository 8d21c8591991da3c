//! The endpoint's connections, and what callers may hold of them. One agent serves every pod of the
//! node, so no pod may take what the others need: each source address may hold at most
//! `--max-connections-per-source` connections, all callers together `--max-connections`; a connection
//! that sends no complete request head within `--header-read-timeout-sec` of being accepted or of its
//! last answer (idle keep-alive, headers trickled in, an answer never read) is closed
//! ([`head_timeout`]); a request head larger than `--max-request-bytes` is answered 431 and closed.
//! Memory per connection is then bounded, and so is the whole.
//!
//! Connections over a limit are shed at once, before hyper allocates anything for them: they get a
//! ready-made `503` with `Retry-After` (which every SDK retries) and are closed, and
//! `pod_identity_connections_shed_total{reason}` counts them. The accept loop is the smallest one that
//! can count per source address before a connection is served (axum's `serve` cannot); serving is
//! hyper's HTTP/1.1 connection with its own size limits, and graceful shutdown is hyper-util's.
//! Requests go straight to a [`Handler`] with their peer and connection: no router sits on the token
//! path, whose only other cost is the HTTP exchange itself.
//! HTTP/1.1 only: IMDS speaks nothing else, and HTTP/2 would let one connection carry many requests.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::response::Response;
use http::Request;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use self::head_timeout::HeadClock;
use crate::{
    attest::caller::ConnectionAttestation,
    metrics::{Metrics, ReasonLabels},
    request::caller_ip,
};

/// The smallest read buffer hyper accepts (`http1::Builder::max_buf_size` panics below it).
const MIN_REQUEST_BYTES: usize = 8192;
/// Headers per request, hyper's own bound (`http1::Builder::max_headers` unset): SDKs send fewer than 10,
/// and a head with more is answered 431. Setting it, even lower, makes hyper fill its header arrays
/// element by element on every request (about 1,400 instructions) instead of leaving them uninitialised.
#[cfg(test)]
const MAX_HEADERS: usize = 100;
/// Shed connections whose request is read and discarded after the 503, so that closing them sends
/// FIN rather than RST (which could destroy the answer before the client reads it); beyond this many
/// at once they are closed at once.
const MAX_DRAINS: usize = 64;
/// How long a shed connection is drained.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Command-line bounds on what callers may hold.
#[derive(Clone, Debug, clap::Args)]
pub struct LimitArgs {
    /// Open connections to the endpoint, all callers together; beyond, new ones get 503 and are closed.
    #[arg(long, env = "POD_IDENTITY_MAX_CONNECTIONS", default_value_t = 2048)]
    pub max_connections: usize,

    /// Open connections from one source address (one pod); beyond, new ones get 503 and are closed.
    #[arg(long, env = "POD_IDENTITY_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 64)]
    pub max_connections_per_source: usize,

    /// Seconds a connection may go without a complete request head, from being accepted or from its
    /// last answer (idle between requests, sending its headers, not reading its answer), before it is
    /// closed.
    #[arg(long, env = "POD_IDENTITY_HEADER_READ_TIMEOUT_SEC", default_value_t = 30.0)]
    pub header_read_timeout_sec: f64,

    /// Longest request head (request line and headers), in bytes, at least 8192; a longer one gets 431.
    #[arg(long, env = "POD_IDENTITY_MAX_REQUEST_BYTES", default_value_t = 16384)]
    pub max_request_bytes: usize,
}

impl LimitArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections.max(1),
            max_connections_per_source: self.max_connections_per_source.max(1),
            header_read_timeout: Duration::try_from_secs_f64(self.header_read_timeout_sec.max(0.001))
                .unwrap_or(Duration::from_secs(30)),
            max_request_bytes: self.max_request_bytes.max(MIN_REQUEST_BYTES),
        }
    }
}

/// What callers may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections, all callers together.
    pub max_connections: usize,
    /// Open connections of one source address.
    pub max_connections_per_source: usize,
    /// Time allowed without a complete request head.
    pub header_read_timeout: Duration,
    /// Largest request head, in bytes (at least 8192).
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 2048,
            max_connections_per_source: 64,
            header_read_timeout: Duration::from_secs(30),
            max_request_bytes: 16384,
        }
    }
}

/// Why a connection was shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// Its source address holds its share already.
    PerSource,
    /// All callers together hold the endpoint's share.
    Total,
}

impl Shed {
    /// A bounded label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::PerSource => "per_source",
            Self::Total => "total",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Self::PerSource => "too many open connections from this address",
            Self::Total => "too many open connections to the agent",
        }
    }
}

/// Open connections by source address: the admission decision, without I/O.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    by_source: HashMap<IpAddr, usize>,
    total: usize,
}

impl ConnectionTable {
    /// Counts a new connection from `source`, or says why it must be shed (its own share first: a
    /// source over its share is shed for that, whatever the others hold).
    pub fn admit(&mut self, source: IpAddr, limits: &Limits) -> Result<(), Shed> {
        let held = self.by_source.get(&source).copied().unwrap_or(0);
        if held >= limits.max_connections_per_source {
            return Err(Shed::PerSource);
        }
        if self.total >= limits.max_connections {
            return Err(Shed::Total);
        }
        self.by_source.insert(source, held + 1);
        self.total += 1;
        Ok(())
    }

    /// Forgets a closed connection of `source`; sources that hold none leave the table.
    pub fn release(&mut self, source: IpAddr) {
        if let Some(held) = self.by_source.get_mut(&source) {
            *held -= 1;
            if *held == 0 {
                self.by_source.remove(&source);
                // After a flood from many addresses, give the table's memory back.
                if self.by_source.capacity() > 256 && self.by_source.len() * 4 < self.by_source.capacity() {
                    self.by_source.shrink_to(self.by_source.len() * 2);
                }
            }
            self.total -= 1;
        }
    }

    /// Open connections, all sources.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Open connections of `source`.
    pub fn held_by(&self, source: IpAddr) -> usize {
        self.by_source.get(&source).copied().unwrap_or(0)
    }
}

/// A counted connection; released when the connection's task ends, however it ends.
struct Admitted {
    table: Arc<Mutex<ConnectionTable>>,
    source: IpAddr,
    metrics: Arc<Metrics>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.release(self.source);
        self.metrics.open_connections.set(table.total() as i64);
    }
}

/// The answer of a shed connection: complete, small, sent without reading the request.
fn shed_response(shed: Shed) -> Vec<u8> {
    let body = format!(
        r#"{{"error":"service_unavailable","error_description":"{}"}}"#,
        shed.description()
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json; charset=utf-8\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn shed_connection(stream: TcpStream, shed: Shed, drains: &Arc<Semaphore>) {
    // A new connection's send buffer is empty: the few bytes of the answer fit without waiting.
    let _ = stream.try_write(&shed_response(shed));
    let Ok(permit) = drains.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(DRAIN_TIME, async {
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    });
}

/// What answers the endpoint's requests: called with each request, the peer it came from and the facts
/// of its connection. Any `Fn(Request<Incoming>, SocketAddr, Arc<Connection>) -> impl Future<Output =
/// Response>` is one.
pub trait Handler: Clone + Send + Sync + 'static {
    /// The answer's future.
    type Future: Future<Output = Response> + Send + 'static;

    /// Answers `request` from `peer`, on `connection`.
    fn call(&self, request: Request<Incoming>, peer: SocketAddr, connection: Arc<Connection>)
    -> Self::Future;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request<Incoming>, SocketAddr, Arc<Connection>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, request: Request<Incoming>, peer: SocketAddr, connection: Arc<Connection>) -> Fut {
        self(request, peer, connection)
    }
}

/// Serves `handler` on `listener` within `limits` until `shutdown` resolves; then stops accepting, lets
/// requests in flight finish, closes idle connections, and returns once every connection is closed
/// (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    handler: impl Handler,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let table = Arc::new(Mutex::new(ConnectionTable::default()));
    let graceful = GracefulShutdown::new();
    let drains = Arc::new(Semaphore::new(MAX_DRAINS));
    let mut builder = http1::Builder::new();
    // No timer for hyper: the header read timeout is kept per connection ([`head_timeout`]).
    builder
        .header_read_timeout(None)
        .max_buf_size(limits.max_request_bytes.max(MIN_REQUEST_BYTES))
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let source = caller_ip(peer.ip());
        let admitted = {
            let mut table = table.lock().unwrap_or_else(|p| p.into_inner());
            let admitted = table.admit(source, &limits);
            metrics.open_connections.set(table.total() as i64);
            admitted
        };
        if let Err(shed) = admitted {
            metrics
                .connections_shed
                .get_or_create(&ReasonLabels { reason: shed.label() })
                .inc();
            tracing::debug!(peer = %source, reason = shed.label(), "shed a connection");
            shed_connection(stream, shed, &drains);
            continue;
        }
        let guard = Admitted {
            table: table.clone(),
            source,
            metrics: metrics.clone(),
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let facts = Arc::new(Connection {
            local,
            attestation: ConnectionAttestation::default(),
        });
        let clock = HeadClock::accepted_now();
        let timeout = limits.header_read_timeout;
        let deadline = tokio::time::sleep_until(clock.first_deadline(timeout));
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            service(handler.clone(), peer, facts, clock.clone()),
        );
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            let _guard = guard;
            tokio::pin!(watched, deadline);
            loop {
                tokio::select! {
                    served = &mut watched => {
                        if let Err(error) = served {
                            tracing::debug!(peer = %source, %error, "connection closed with an error");
                        }
                        break;
                    }
                    () = &mut deadline => match clock.check(tokio::time::Instant::now(), timeout) {
                        Ok(next) => deadline.as_mut().reset(next),
                        // Dropping the connection closes it.
                        Err(head_timeout::Closed) => {
                            tracing::debug!(peer = %source, "closed a connection that sent no request head in time");
                            break;
                        }
                    },
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// What a request knows of the connection it came on, besides its peer.
#[derive(Debug)]
pub struct Connection {
    /// The address the connection was accepted on (the redirect target for intercepted callers).
    pub local: SocketAddr,
    /// Where its caller is, once attested.
    pub attestation: ConnectionAttestation,
}

/// The handler as the service of one connection from `peer`.
fn service<H: Handler>(
    handler: H,
    peer: SocketAddr,
    facts: Arc<Connection>,
    clock: Arc<HeadClock>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send,
> {
    hyper::service::service_fn(move |request: Request<Incoming>| {
        let answering = clock.answering();
        let answer = handler.call(request, peer, facts.clone());
        async move {
            let answer = answer.await;
            drop(answering);
            Ok::<_, Infallible>(answer)
        }
    })
}

mod head_timeout;

#[cfg(test)]
mod tests;
