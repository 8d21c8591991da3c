//! Wiring: the parts built from the configuration, started in the order that keeps the node safe.
//!
//! Rules are installed by their keeper as soon as it starts and are never removed; the endpoint listens
//! at once, and requests that arrive before the watches are synced wait for them (bounded) instead of
//! being refused. Readiness needs all three. On shutdown the listener closes and requests in flight get
//! a grace period; from then until the next start the kernel resets pods' connections to IMDS.

use std::{
    future::Future,
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    attest::{self, caller::Attestor, lookup::Lookup},
    audit::{self, Audit},
    azure::HttpUpstream,
    cache::TokenCache,
    config::Args,
    connections,
    events::Events,
    federation::{KubeTokenRequests, ServiceAccountTokens, Subjects},
    health::{self, AdminState, Health},
    metrics::Metrics,
    netfilter::{self, Iptables, Netfilter},
    proxy::Proxy,
    server::{self, AppState},
    tokens::{Credentials, SecretCredentials, TokenService},
    upstream::Upstream,
    watch,
    world::Shared,
};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The node uses kubenet and that was not allowed.
    #[error(
        "the kubelet of this node uses kubenet ({0}), where pods can pose as each other; pass \
         --allow-network-plugin-kubenet to run anyway"
    )]
    Kubenet(String),
    /// No API server configuration.
    #[error(transparent)]
    Kube(#[from] pod_identity_runtime::ClientError),
    /// A listener could not bind.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The netfilter tools are unusable.
    #[error("interception: {0}")]
    Netfilter(#[from] netfilter::NetfilterError),
    /// The redirect target cannot work on this node.
    #[error("interception: {0}")]
    Redirect(#[from] crate::redirect::RedirectError),
    /// The HTTP clients could not be built.
    #[error("upstream clients: {0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// Callers cannot be attested from where the agent runs.
    #[error(
        "--attest-callers: {0} shows no process outside the agent's own container; run the agent in the \
         host's PID namespace (hostPID: true), or turn attestation off"
    )]
    NoHostProcesses(String),
    /// The audit stream could not be opened.
    #[error("opening the audit stream {target}: {source}")]
    Audit {
        /// `--audit-log`.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The agent's replaceable parts; [`Parts::from_args`] builds the real ones.
pub struct Parts {
    /// The API server.
    pub client: kube::Client,
    /// IMDS and Entra.
    pub upstream: Arc<dyn Upstream>,
    /// Service principal credentials.
    pub credentials: Arc<dyn Credentials>,
    /// Netfilter, or `None` when interception is someone else's.
    pub netfilter: Option<Arc<dyn Netfilter>>,
    /// The client forwarding allowed metadata paths.
    pub proxy_client: pod_identity_azure::imds_http::ImdsHttp,
    /// Tokens of the subjects of federated identities (the TokenRequest API).
    pub subject_tokens: Arc<dyn ServiceAccountTokens>,
}

impl Parts {
    /// The real parts.
    pub async fn from_args(args: &Args) -> Result<Self, StartError> {
        let client = pod_identity_runtime::client(args.kubeconfig.as_deref()).await?;
        let extra_ca = match &args.extra_ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|source| StartError::Read {
                path: path.display().to_string(),
                source,
            })?),
            None => None,
        };
        let upstream = HttpUpstream::new(
            args.imds_base(),
            Duration::from_secs(args.upstream_timeout_sec.max(1)),
            args.upstream_mark(),
            extra_ca.as_deref(),
        )?;
        let netfilter: Option<Arc<dyn Netfilter>> = if args.no_interception {
            None
        } else {
            Some(Arc::new(Iptables::new(
                &args.iptables_command,
                &args.conntrack_command,
            )?))
        };
        Ok(Self {
            credentials: Arc::new(SecretCredentials(client.clone())),
            subject_tokens: Arc::new(KubeTokenRequests(client.clone())),
            proxy_client: upstream.imds_client().clone(),
            upstream: Arc::new(upstream),
            client,
            netfilter,
        })
    }
}

/// A running agent.
pub struct Agent {
    /// Where the endpoint for intercepted traffic listens.
    pub imds_addr: SocketAddr,
    /// Where /healthz, /readyz and /metrics listen.
    pub admin_addr: SocketAddr,
    /// Readiness conditions.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The world.
    pub shared: Arc<Shared>,
    serve: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
    grace: Duration,
    audit: Audit,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("imds_addr", &self.imds_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

/// Binds a listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Starts every part on the given listeners.
pub async fn start(
    args: &Args,
    parts: Parts,
    imds: Vec<TcpListener>,
    admin: TcpListener,
    metrics_only: Option<TcpListener>,
) -> Result<Agent, StartError> {
    for flag in args.ignored_flags() {
        tracing::warn!(flag, "flag of the original agent accepted and ignored");
    }
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let shared = Shared::scoped(args.scope());
    let policy = args.policy();
    let mut background = Vec::new();

    if let Some(netfilter) = parts.netfilter {
        background.push(tokio::spawn(netfilter::keep(
            netfilter,
            args.rule_spec(),
            args.enable_conntrack_deletion,
            Duration::from_secs(args.ipt_update_interval_sec.max(1)),
            health.clone(),
            metrics.clone(),
        )));
    }

    watch::spawn_all(&parts.client, &args.node, policy.mode, &shared, &metrics);

    let cache = TokenCache::new(args.freshness(), Duration::from_secs(1));
    let mut tokens = TokenService::new(
        cache,
        parts.upstream,
        parts.credentials,
        args.retry_policy(),
        metrics.clone(),
    );
    if let Some(namespace) = args.federation_namespace.clone().filter(|n| !n.is_empty()) {
        tracing::info!(%namespace, "serving federated identities with the tokens of their subjects");
        tokens = tokens.with_federation(Arc::new(Subjects::new(
            namespace,
            parts.subject_tokens,
            Duration::from_secs(args.federation_token_sec),
        )));
    }
    let tokens = Arc::new(tokens);
    background.push(tokio::spawn(tokens.clone().maintain(
        shared.clone(),
        policy,
        Duration::from_secs(30),
        Duration::from_secs(args.token_idle_sec.max(1)),
    )));

    let events = if args.events {
        Events::start(
            parts.client.clone(),
            &args.node,
            Duration::from_secs(args.event_interval_sec.max(1)),
            metrics.clone(),
        )
    } else {
        Events::disabled(metrics.clone())
    };

    let audit = match &args.audit_log {
        Some(target) => Audit::start(
            &audit::Target::parse(target),
            &args.node,
            Duration::from_secs(args.audit_fold_sec.max(1)),
            metrics.clone(),
        )
        .map_err(|source| StartError::Audit {
            target: target.clone(),
            source,
        })?,
        None => Audit::disabled(metrics.clone()),
    };
    let mut state = AppState::new(
        args.server_config(),
        shared.clone(),
        tokens.clone(),
        Proxy::new(parts.proxy_client, &args.imds_base()),
        metrics.clone(),
        events,
    );
    if args.attest_callers {
        if !attest::lookup::sees_host_processes(&args.proc_root) {
            return Err(StartError::NoHostProcesses(args.proc_root.display().to_string()));
        }
        state = state.with_attestor(Attestor::new(
            Lookup::new(&args.proc_root, args.attest_timeout()),
            SocketAddrV4::new(args.metadata_ip, args.metadata_port),
            args.node_callers,
            metrics.clone(),
        ));
        tracing::info!(node_callers = ?args.node_callers, mark = format_args!("{:#x}", args.upstream_mark), "callers are attested");
    }
    let state = Arc::new(state.with_audit(audit.clone()));
    let imds_addr = imds
        .first()
        .ok_or_else(|| StartError::Bind {
            addr: args.listen_addr(),
            source: std::io::Error::other("no listener for intercepted traffic"),
        })?
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: args.listen_addr(),
            source,
        })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        addr: SocketAddr::new(args.admin_address, args.http_probe_port),
        source,
    })?;
    let admin_state = AdminState {
        health: health.clone(),
        shared: shared.clone(),
        policy,
        metrics: metrics.clone(),
        rules_required: !args.no_interception,
    };
    if args.identity_ready {
        background.push(tokio::spawn(crate::readiness::keep(
            parts.client.clone(),
            admin_state.clone(),
            tokens.clone(),
            args.prefetch_resource.clone(),
        )));
    }
    if args.remove_node_taint {
        background.push(crate::taint::spawn(
            parts.client.clone(),
            &args.node,
            pod_identity_api::readiness::AGENT_NOT_READY_TAINT,
            admin_state.clone(),
        ));
    }
    if let Some(listener) = metrics_only {
        let state = admin_state.clone();
        background.push(tokio::spawn(async move {
            if let Err(error) = health::serve(listener, health::metrics_router(state)).await {
                tracing::error!(%error, "the metrics server stopped");
            }
        }));
    }

    background.push(tokio::spawn(async move {
        if let Err(error) = health::serve(admin, health::router(admin_state)).await {
            tracing::error!(%error, "the probe server stopped");
        }
    }));

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let app = server::handler(state);
    health.set_serving(true);
    let serve_health = health.clone();
    let limits = args.limits.limits();
    let serve_metrics = metrics.clone();
    let serve = tokio::spawn(async move {
        let serves = imds.into_iter().map(|listener| {
            let mut stopped = stopped.clone();
            connections::serve(listener, app.clone(), limits, serve_metrics.clone(), async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            })
        });
        futures::future::join_all(serves).await;
        serve_health.set_serving(false);
    });
    tracing::info!(node = %args.node, imds = %imds_addr, admin = %admin_addr, mode = ?policy.mode, scope = ?args.scope(), "agent started");
    Ok(Agent {
        imds_addr,
        admin_addr,
        health,
        metrics,
        shared,
        serve,
        background,
        stop,
        grace: Duration::from_secs(args.shutdown_grace_sec),
        audit,
    })
}

impl Agent {
    /// Stops accepting, lets requests in flight finish within the grace period, and stops the rest.
    /// The interception rules stay.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(self.grace, &mut self.serve).await.is_err() {
            tracing::warn!("requests still in flight after the grace period; closing them");
            self.serve.abort();
        }
        for task in self.background.drain(..) {
            task.abort();
        }
        self.audit.close(Duration::from_secs(2)).await;
        tracing::info!("agent stopped; the interception rules stay in place");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.serve.abort();
        for task in &self.background {
            task.abort();
        }
    }
}

/// Checks that redirected traffic will reach the listener, and puts the redirect address on the node's
/// loopback so that the listener can bind it (the rule keeper puts it back should it go).
fn prepare_redirect(args: &Args) -> Result<(), StartError> {
    let redirect = args.redirect_address;
    let listen = args.listen_addr().ip();
    if !args.no_interception {
        let route_localnet = redirect.is_loopback() && crate::redirect::route_localnet().unwrap_or(false);
        crate::redirect::check(redirect, listen, route_localnet)?;
    }
    if listen == std::net::IpAddr::V4(redirect) && crate::redirect::needs_address(redirect) {
        let added = crate::redirect::ensure_on_loopback(redirect).map_err(|e| netfilter::NetfilterError {
            operation: format!("adding {redirect}/32 to lo"),
            message: e.to_string(),
        })?;
        if added {
            tracing::info!(%redirect, "put the redirect address on the node's loopback");
        }
    }
    Ok(())
}

/// Takes the interception off the node (`--remove-interception`).
pub fn remove_interception(args: &Args) -> Result<netfilter::RemovalReport, StartError> {
    let netfilter = Iptables::new(&args.iptables_command, &args.conntrack_command)?;
    let report = netfilter::remove_all(&netfilter, &args.rule_spec())?;
    tracing::info!(
        node = %args.node,
        changes = report.applied.len(),
        address_removed = report.address_removed,
        "removed the interception from this node; pods reach IMDS directly again"
    );
    Ok(report)
}

/// `/host/token` callers (the Key Vault CSI driver's provider) dial `localhost:<port>`, where the
/// original listened; when the endpoint listens at the redirect address instead, it also listens there.
fn host_token_listener(args: &Args) -> Option<SocketAddr> {
    let listen = args.listen_addr();
    let wanted = args.enable_host_token && !listen.ip().is_loopback() && !listen.ip().is_unspecified();
    wanted.then(|| SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, listen.port())))
}

/// Runs the agent from its arguments until `shutdown` resolves.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    if !args.allow_network_plugin_kubenet
        && let Ok(defaults) = std::fs::read_to_string(&args.kubelet_config)
        && crate::config::uses_kubenet(&defaults)
    {
        return Err(StartError::Kubenet(args.kubelet_config.display().to_string()));
    }
    let parts = Parts::from_args(&args).await?;
    prepare_redirect(&args)?;
    let mut imds = vec![bind(args.listen_addr()).await?];
    if let Some(loopback) = host_token_listener(&args) {
        imds.push(bind(loopback).await?);
    }
    let admin = bind(SocketAddr::new(args.admin_address, args.http_probe_port)).await?;
    let metrics_only = if args.prometheus_port != args.http_probe_port && args.prometheus_port != 0 {
        Some(bind(SocketAddr::new(args.admin_address, args.prometheus_port)).await?)
    } else {
        None
    };
    let agent = start(&args, parts, imds, admin, metrics_only).await?;
    shutdown.await;
    tracing::info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(["pod-identity-agent", "--node", "n"].iter().chain(extra)).unwrap()
    }

    #[test]
    fn host_token_callers_still_find_the_endpoint_on_localhost() {
        assert_eq!(
            host_token_listener(&args(&["--enable-host-token"])),
            Some(SocketAddr::from(([127, 0, 0, 1], 2579)))
        );
        assert_eq!(
            host_token_listener(&args(&[])),
            None,
            "off unless /host/token is served"
        );
        assert_eq!(
            host_token_listener(&args(&["--enable-host-token", "--nmi-listen-address=0.0.0.0"])),
            None,
            "the endpoint listens on localhost already"
        );
    }
}
