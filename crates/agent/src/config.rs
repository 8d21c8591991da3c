//! Command line and environment. Flags users of aad-pod-identity's NMI know keep their names and meaning
//! where the meaning still holds (`--node`, `--metadata-ip`, `--ipt-update-interval-sec`,
//! `--forceNamespaced`, `--operation-mode`, `--block-instance-metadata`, `--metadata-header-required`,
//! `--http-probe-port`, `--prometheus-port`, `--allow-network-plugin-kubenet`, `--kubelet-config`,
//! `--enable-conntrack-deletion`, `--nmi-port`, `--nmi-listen-address`). The original's polling knobs
//! (`--retry-attempts-for-created` and the like) are accepted and ignored with a warning: requests wait
//! on the watch now, bounded by `--assignment-wait-sec`.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use clap::{ArgAction, Parser};
use pod_identity_api::matching::Scope;
use pod_identity_azure::RetryPolicy;
use pod_identity_runtime::LogFormat;

use crate::{
    attest::NodeCallers,
    cache::Freshness,
    redirect::DEFAULT_REDIRECT_ADDRESS,
    resolve::{Mode, Policy},
    rules::RuleSpec,
    server::ServerConfig,
    upstream,
};

/// The node agent of pod-identity: intercepts pod traffic to the Instance Metadata Service and serves
/// each pod only the tokens of its own identities.
#[derive(Clone, Debug, Parser)]
#[command(name = "pod-identity-agent", version, about, long_about = None)]
pub struct Args {
    /// Name of this node (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,

    /// Kubeconfig file; in-cluster configuration when absent.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Where identities come from: `standard` (assignments made by the controller) or `managed`
    /// (identities put on the VMs by hand, bindings only).
    #[arg(long, env = "OPERATION_MODE", value_enum, default_value_t = Mode::Standard)]
    pub operation_mode: Mode,

    /// Identity, binding and pod must share a namespace. On by default; `--forceNamespaced=false`
    /// allows bindings of other namespaces (the original's default).
    #[arg(
        long = "forceNamespaced",
        alias = "force-namespaced",
        env = "FORCENAMESPACED",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = ArgAction::Set
    )]
    pub force_namespaced: bool,

    /// Where intercepted traffic is redirected (the DNAT target): an address the agent puts on the node's
    /// loopback. Link-local by default, so that no sysctl is needed (see `redirect`).
    #[arg(long, env = "POD_IDENTITY_REDIRECT_ADDRESS", default_value_t = DEFAULT_REDIRECT_ADDRESS)]
    pub redirect_address: Ipv4Addr,

    /// Address the endpoint for intercepted traffic listens on: the redirect address when unset; `0.0.0.0`
    /// also works.
    #[arg(
        long = "nmi-listen-address",
        alias = "listen-address",
        env = "POD_IDENTITY_LISTEN_ADDRESS"
    )]
    pub listen_address: Option<IpAddr>,

    /// Port of that endpoint (the DNAT target's port).
    #[arg(
        long = "nmi-port",
        alias = "listen-port",
        env = "POD_IDENTITY_LISTEN_PORT",
        default_value_t = 2579
    )]
    pub listen_port: u16,

    /// The metadata address pods call.
    #[arg(long, env = "METADATA_IP", default_value = "169.254.169.254")]
    pub metadata_ip: Ipv4Addr,

    /// The metadata port pods call.
    #[arg(long, env = "METADATA_PORT", default_value_t = 80)]
    pub metadata_port: u16,

    /// Seconds between checks (and repairs) of the interception rules.
    #[arg(long, env = "IPT_UPDATE_INTERVAL_SEC", default_value_t = 60)]
    pub ipt_update_interval_sec: u64,

    /// Name of the agent's chain in the nat and filter tables.
    #[arg(long, env = "POD_IDENTITY_IPTABLES_CHAIN", default_value = "POD-IDENTITY")]
    pub iptables_chain: String,

    /// The iptables command; must match the backend of the node (`iptables`, `iptables-nft` or
    /// `iptables-legacy`).
    #[arg(long, env = "POD_IDENTITY_IPTABLES", default_value = "iptables")]
    pub iptables_command: String,

    /// The conntrack command.
    #[arg(long, env = "POD_IDENTITY_CONNTRACK", default_value = "conntrack")]
    pub conntrack_command: String,

    /// Flush conntrack entries of IMDS connections whenever the rules are (re)installed, so that
    /// connections opened before them cannot bypass them.
    #[arg(long, env = "ENABLE_CONNTRACK_DELETION", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub enable_conntrack_deletion: bool,

    /// Keep the filter-table guard that resets pod connections to IMDS that escaped the redirect.
    #[arg(long, env = "POD_IDENTITY_IMDS_GUARD", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub imds_guard: bool,

    /// Ignored: the redirect no longer needs net.ipv4.conf.all.route_localnet (see --redirect-address).
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub route_localnet: Option<bool>,

    /// Remove the interception from this node (the agent's chains and jumps, and its redirect address),
    /// then exit, instead of running. Run on each node after the agent is uninstalled, e.g. by
    /// `kubectl podidentity remove-node-rules`; pods then reach IMDS directly again.
    #[arg(long, env = "POD_IDENTITY_REMOVE_INTERCEPTION", default_value_t = false)]
    pub remove_interception: bool,

    /// Do not touch netfilter at all (only where another component installs equivalent rules).
    #[arg(long, env = "POD_IDENTITY_NO_INTERCEPTION", default_value_t = false)]
    pub no_interception: bool,

    /// Require the header `Metadata: true` on every request.
    #[arg(long, env = "METADATA_HEADER_REQUIRED", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub metadata_header_required: bool,

    /// Refuse `/metadata/instance` (403) instead of forwarding it to IMDS. On by default, unlike the
    /// original: instance metadata tells a pod about the node it should not need to know.
    #[arg(long, env = "BLOCK_INSTANCE_METADATA", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub block_instance_metadata: bool,

    /// Refuse other `/metadata/...` paths (versions, scheduled events, attested data) instead of
    /// forwarding them.
    #[arg(long, env = "BLOCK_OTHER_METADATA", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub block_other_metadata: bool,

    /// Serve `/host/token` to callers on the node itself (headers podns and podname name the pod). Off
    /// by default: any host-network process could ask for any pod's token by name.
    #[arg(long, env = "ENABLE_HOST_TOKEN", default_value_t = false)]
    pub enable_host_token: bool,

    /// Attest every caller from the kernel's view of its socket (the process holding it and the pod of that
    /// process), not from its source address alone; and intercept the node's own traffic to the metadata
    /// address too, so that host-network pods get their own identities only. Needs the host's PID
    /// namespace (`hostPID`) and `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH`.
    #[arg(long, env = "ATTEST_CALLERS", default_value_t = false)]
    pub attest_callers: bool,

    /// With `--attest-callers`: what a caller in no pod (the kubelet, node daemons) gets: `passthrough`
    /// (what IMDS gives it, as without the agent) or `refuse`.
    #[arg(long, env = "NODE_CALLERS", value_enum, default_value_t = NodeCallers::Passthrough)]
    pub node_callers: NodeCallers,

    /// With `--attest-callers`: the socket mark (bits of it) of the agent's own connections to IMDS, which
    /// the `OUTPUT` redirect lets through. Choose bits no other component of the node uses (kube-proxy
    /// uses 0x4000 and 0x8000, Calico 0xffff0000 by default).
    #[arg(long, env = "UPSTREAM_MARK", default_value = "0x2000", value_parser = parse_mark)]
    pub upstream_mark: u32,

    /// With `--attest-callers`: the `/proc` to read processes from (the host's, with `hostPID`).
    #[arg(long, env = "PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// With `--attest-callers`: milliseconds one attestation may take before the caller gets 503 (it may
    /// ask again).
    #[arg(long, env = "ATTEST_TIMEOUT_MS", default_value_t = 250)]
    pub attest_timeout_ms: u64,

    /// Seconds a request waits for an identity still being assigned to the node before it gets 503
    /// with Retry-After.
    #[arg(long, env = "ASSIGNMENT_WAIT_SEC", default_value_t = 20.0)]
    pub assignment_wait_sec: f64,

    /// Seconds a request waits for its pod to appear in the watch before it is refused.
    #[arg(long, env = "POD_WAIT_SEC", default_value_t = 2.0)]
    pub pod_wait_sec: f64,

    /// Retry-After (seconds) on a 503.
    #[arg(long, env = "RETRY_AFTER_SEC", default_value_t = 5)]
    pub retry_after_sec: u64,

    /// A cached token is served only while it has more than this many seconds left.
    #[arg(long, env = "TOKEN_MIN_VALIDITY_SEC", default_value_t = 330)]
    pub token_min_validity_sec: u64,

    /// Tokens in use are renewed in the background once they have less than this many seconds left.
    #[arg(long, env = "TOKEN_REFRESH_AHEAD_SEC", default_value_t = 900)]
    pub token_refresh_ahead_sec: u64,

    /// Cap, in seconds, on how long a fetched token is served from the cache (0: until expiry).
    #[arg(long, env = "TOKEN_MAX_CACHE_SEC", default_value_t = 0)]
    pub token_max_cache_sec: u64,

    /// Cached tokens unused for this many seconds are neither renewed nor kept once stale.
    #[arg(long, env = "TOKEN_IDLE_SEC", default_value_t = 3600)]
    pub token_idle_sec: u64,

    /// Timeout, in seconds, of one call to IMDS or Entra.
    #[arg(long, env = "UPSTREAM_TIMEOUT_SEC", default_value_t = 10)]
    pub upstream_timeout_sec: u64,

    /// Retries of a throttled or failed call to IMDS or Entra.
    #[arg(long, env = "UPSTREAM_RETRIES", default_value_t = 3)]
    pub upstream_retries: usize,

    /// Namespace of the subjects of federated identities (the ServiceAccounts whose tokens are exchanged
    /// with Entra ID). Unset: federated identities are refused with that reason.
    #[arg(long, env = "POD_IDENTITY_FEDERATION_NAMESPACE")]
    pub federation_namespace: Option<String>,

    /// Lifetime, in seconds, of the subject tokens requested for federated identities (at least 600, the
    /// API server's minimum); each is reused for every resource until half of it is gone.
    #[arg(long, env = "POD_IDENTITY_FEDERATION_TOKEN_SEC", default_value_t = 3600)]
    pub federation_token_sec: u64,

    /// PEM file of extra CA certificates trusted for Entra (a private cloud's authority).
    #[arg(long, env = "POD_IDENTITY_EXTRA_CA_FILE")]
    pub extra_ca_file: Option<PathBuf>,

    /// Port of /healthz, /readyz and /metrics.
    #[arg(long, env = "HTTP_PROBE_PORT", default_value_t = 8085)]
    pub http_probe_port: u16,

    /// Extra port serving /metrics alone (the original's scrape port); the probe port serves it too.
    #[arg(long, env = "PROMETHEUS_PORT", default_value_t = 9090)]
    pub prometheus_port: u16,

    /// Address the probe and metrics ports listen on.
    #[arg(long, env = "POD_IDENTITY_ADMIN_ADDRESS", default_value = "0.0.0.0")]
    pub admin_address: IpAddr,

    /// Publish a Kubernetes Event on a pod whose request is refused (at most one per pod and reason
    /// per interval).
    #[arg(long, env = "POD_IDENTITY_EVENTS", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub events: bool,

    /// Seconds between two Events of the same pod and reason.
    #[arg(long, env = "POD_IDENTITY_EVENT_INTERVAL_SEC", default_value_t = 60)]
    pub event_interval_sec: u64,

    /// Audit stream of token decisions: `-` for standard output (logs go to standard error), or a file
    /// appended to; off when unset. One JSON object per line (schema in the agent's README).
    #[arg(long, env = "POD_IDENTITY_AUDIT_LOG", value_name = "PATH|-")]
    pub audit_log: Option<String>,

    /// Seconds over which repeated refusals of one caller for one reason are folded into one record.
    #[arg(long, env = "POD_IDENTITY_AUDIT_FOLD_SEC", default_value_t = 60)]
    pub audit_fold_sec: u64,

    /// Remove the `pod-identity.azure.com/agent-not-ready` taint from this node once ready.
    #[arg(long, env = "POD_IDENTITY_REMOVE_NODE_TAINT", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub remove_node_taint: bool,

    /// Keep the `IdentityReady` condition of this node's pods that list it in their readiness gates.
    #[arg(long, env = "POD_IDENTITY_IDENTITY_READY", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub identity_ready: bool,

    /// Resources (audiences) whose tokens are fetched for a gated pod's identities before its
    /// `IdentityReady` condition turns true, so that its first request for them is a cache hit.
    #[arg(
        long,
        env = "POD_IDENTITY_PREFETCH_RESOURCES",
        value_delimiter = ',',
        default_value = "https://management.azure.com/"
    )]
    pub prefetch_resource: Vec<String>,

    /// Run on a node whose kubelet uses kubenet, where pods can spoof each other's addresses.
    #[arg(long, env = "ALLOW_NETWORK_PLUGIN_KUBENET", default_value_t = false)]
    pub allow_network_plugin_kubenet: bool,

    /// Kubelet defaults file read to detect kubenet.
    #[arg(long, env = "KUBELET_CONFIG", default_value = "/etc/default/kubelet")]
    pub kubelet_config: PathBuf,

    /// Seconds given to requests in flight on SIGTERM before the process exits (the rules stay).
    #[arg(long, env = "SHUTDOWN_GRACE_SEC", default_value_t = 5)]
    pub shutdown_grace_sec: u64,

    /// What callers may hold of the endpoint.
    #[command(flatten)]
    pub limits: crate::connections::LimitArgs,

    /// Log format: `json`, or `text` (also `plain`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax); RUST_LOG also works.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Ignored: requests wait on the watch (see --assignment-wait-sec).
    #[arg(long, hide = true)]
    pub retry_attempts_for_created: Option<u32>,
    /// Ignored: requests wait on the watch (see --assignment-wait-sec).
    #[arg(long, hide = true)]
    pub retry_attempts_for_assigned: Option<u32>,
    /// Ignored: requests wait on the watch (see --assignment-wait-sec).
    #[arg(long, hide = true)]
    pub find_identity_retry_interval: Option<u32>,
    /// Ignored: 503 answers always carry Retry-After.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub set_retry_after_header: Option<bool>,
    /// Ignored: assignments are always watched for this node only.
    #[arg(long = "enableScaleFeatures", hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub enable_scale_features: Option<bool>,
    /// Ignored: the controller is excepted by an AzurePodIdentityException, not by its namespace.
    #[arg(long = "MICNamespace", hide = true)]
    pub mic_namespace: Option<String>,
}

impl Args {
    /// Flags of the original accepted for compatibility that have no effect, for a start-up warning.
    pub fn ignored_flags(&self) -> Vec<&'static str> {
        let mut ignored = Vec::new();
        if self.retry_attempts_for_created.is_some() {
            ignored.push("--retry-attempts-for-created");
        }
        if self.retry_attempts_for_assigned.is_some() {
            ignored.push("--retry-attempts-for-assigned");
        }
        if self.find_identity_retry_interval.is_some() {
            ignored.push("--find-identity-retry-interval");
        }
        if self.set_retry_after_header.is_some() {
            ignored.push("--set-retry-after-header");
        }
        if self.enable_scale_features.is_some() {
            ignored.push("--enableScaleFeatures");
        }
        if self.mic_namespace.is_some() {
            ignored.push("--MICNamespace");
        }
        if self.route_localnet.is_some() {
            ignored.push("--route-localnet");
        }
        ignored
    }

    /// Resolution policy.
    pub fn policy(&self) -> Policy {
        Policy {
            mode: self.operation_mode,
        }
    }

    /// Namespaced or cross-namespace matching (`--forceNamespaced`).
    pub fn scope(&self) -> Scope {
        if self.force_namespaced {
            Scope::Namespaced
        } else {
            Scope::CrossNamespace
        }
    }

    /// The rules to keep.
    pub fn rule_spec(&self) -> RuleSpec {
        RuleSpec {
            chain: self.iptables_chain.clone(),
            metadata_ip: self.metadata_ip,
            metadata_port: self.metadata_port,
            redirect_ip: self.redirect_address,
            agent_port: self.listen_port,
            guard: self.imds_guard,
            host_mark: self.upstream_mark().map(|mark| (mark, mark)),
        }
    }

    /// The socket mark of the agent's own IMDS connections: only when the node's own traffic is intercepted.
    pub fn upstream_mark(&self) -> Option<u32> {
        (self.attest_callers && !self.no_interception).then_some(self.upstream_mark)
    }

    /// The attestation deadline.
    pub fn attest_timeout(&self) -> Duration {
        Duration::from_millis(self.attest_timeout_ms.max(1))
    }

    /// The endpoint's behaviour.
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            node: self.node.clone(),
            policy: self.policy(),
            metadata_header_required: self.metadata_header_required,
            block_instance_metadata: self.block_instance_metadata,
            block_other_metadata: self.block_other_metadata,
            host_token: self.enable_host_token,
            assignment_wait: seconds(self.assignment_wait_sec),
            pod_wait: seconds(self.pod_wait_sec),
            retry_after: Duration::from_secs(self.retry_after_sec.max(1)),
        }
    }

    /// Cache freshness rules.
    pub fn freshness(&self) -> Freshness {
        Freshness {
            min_validity: Duration::from_secs(self.token_min_validity_sec),
            refresh_ahead: Duration::from_secs(self.token_refresh_ahead_sec),
            max_lifetime: (self.token_max_cache_sec > 0)
                .then(|| Duration::from_secs(self.token_max_cache_sec)),
        }
    }

    /// Upstream retry policy: [`upstream::RETRY`] with `--upstream-retries`.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: self.upstream_retries,
            ..upstream::RETRY
        }
    }

    /// Where the endpoint for intercepted traffic listens.
    pub fn listen_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(
            self.listen_address.unwrap_or(IpAddr::V4(self.redirect_address)),
            self.listen_port,
        )
    }

    /// `http://<metadata ip>:<port>`.
    pub fn imds_base(&self) -> String {
        format!("http://{}:{}", self.metadata_ip, self.metadata_port)
    }
}

/// A socket mark, decimal or `0x` hexadecimal, not zero (a zero mark is every unmarked socket's).
fn parse_mark(text: &str) -> Result<u32, String> {
    let mark = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| format!("{text} is not a socket mark: {e}"))?;
    if mark == 0 {
        return Err("the socket mark must have at least one bit set".to_owned());
    }
    Ok(mark)
}

fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(Duration::ZERO)
}

/// Whether the kubelet defaults file says kubenet, where pods with NET_RAW can answer ARP for other
/// pods' addresses and so pose as them.
pub fn uses_kubenet(kubelet_defaults: &str) -> bool {
    kubelet_defaults
        .split(|c: char| c.is_whitespace() || c == '"' || c == '\'')
        .any(|word| word == "--network-plugin=kubenet" || word.ends_with("=--network-plugin=kubenet"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("pod-identity-agent").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn secure_defaults() {
        let args = parse(&["--node", "n1"]);
        assert_eq!(args.scope(), Scope::Namespaced);
        assert!(args.metadata_header_required && args.block_instance_metadata && !args.enable_host_token);
        assert_eq!(
            args.listen_addr(),
            std::net::SocketAddr::from((DEFAULT_REDIRECT_ADDRESS, 2579))
        );
        assert_eq!(args.rule_spec().redirect_ip, DEFAULT_REDIRECT_ADDRESS);
        assert_eq!(args.imds_base(), "http://169.254.169.254:80");
        assert!(args.ignored_flags().is_empty());
    }

    #[test]
    fn the_originals_flags_keep_their_meaning() {
        let args = parse(&[
            "--node=n1",
            "--forceNamespaced=false",
            "--operation-mode",
            "managed",
            "--nmi-port",
            "3000",
            "--ipt-update-interval-sec",
            "5",
            "--block-instance-metadata=false",
            "--retry-attempts-for-created",
            "16",
            "--enableScaleFeatures",
        ]);
        assert_eq!(args.scope(), Scope::CrossNamespace);
        assert_eq!(args.operation_mode, Mode::Managed);
        assert_eq!(args.rule_spec().agent_port, 3000);
        assert!(!args.block_instance_metadata);
        assert_eq!(
            args.ignored_flags(),
            vec!["--retry-attempts-for-created", "--enableScaleFeatures"]
        );
        assert!(parse(&["--node=n", "--forceNamespaced"]).force_namespaced);
    }

    #[test]
    fn attestation_marks_the_agents_own_connections_only_when_on() {
        let off = parse(&["--node=n1"]);
        assert_eq!((off.upstream_mark(), off.rule_spec().host_mark), (None, None));
        let on = parse(&["--node=n1", "--attest-callers"]);
        assert_eq!(on.upstream_mark(), Some(0x2000));
        assert_eq!(on.rule_spec().host_mark, Some((0x2000, 0x2000)));
        assert_eq!(on.node_callers, NodeCallers::Passthrough);
        let chosen = parse(&[
            "--node=n1",
            "--attest-callers",
            "--upstream-mark=0x100",
            "--node-callers=refuse",
        ]);
        assert_eq!(chosen.rule_spec().host_mark, Some((0x100, 0x100)));
        assert_eq!(chosen.node_callers, NodeCallers::Refuse);
        assert_eq!(
            parse(&["--node=n1", "--attest-callers", "--upstream-mark=512"]).upstream_mark(),
            Some(512)
        );
        // Interception that is someone else's has no rules to let the agent's connections through.
        assert_eq!(
            parse(&["--node=n1", "--attest-callers", "--no-interception"]).upstream_mark(),
            None
        );
        for bad in ["0", "0x", "-1", "mark", "0x1_0000_0000"] {
            let arg = format!("--upstream-mark={bad}");
            assert!(
                Args::try_parse_from(["pod-identity-agent", "--node=n1", arg.as_str()]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn readiness_and_audit_are_on_by_default_except_the_stream_which_needs_a_target() {
        let args = parse(&["--node", "n1"]);
        assert!(args.identity_ready && args.remove_node_taint);
        assert_eq!(args.audit_log, None);
        assert_eq!(args.prefetch_resource, ["https://management.azure.com/"]);
        let args = parse(&[
            "--node=n1",
            "--audit-log=-",
            "--prefetch-resource=https://vault.azure.net,https://storage.azure.com/",
            "--identity-ready=false",
            "--remove-node-taint=false",
        ]);
        assert_eq!(args.audit_log.as_deref(), Some("-"));
        assert_eq!(
            args.prefetch_resource,
            ["https://vault.azure.net", "https://storage.azure.com/"]
        );
        assert!(!args.identity_ready && !args.remove_node_taint);
    }

    #[test]
    fn kubenet_is_detected_in_kubelet_defaults() {
        assert!(uses_kubenet(
            "KUBELET_FLAGS=--network-plugin=kubenet --max-pods=110"
        ));
        assert!(!uses_kubenet("KUBELET_FLAGS=--network-plugin=cni"));
    }
}
