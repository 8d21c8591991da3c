//! Command line and environment, and what they make of the controller ([`Args::controller_config`] and
//! the other methods of [`Args`]), so that the binary's `main` only parses and runs. Flag names are the
//! original controller's where the meaning carried over (`--cloudconfig`, `--forceNamespaced`,
//! `--leader-election-*`, `--http-probe-port`, `--prometheus-port`, `--immutable-user-msis`,
//! `--identity-assignment-reconcile-interval`, `--createDeleteBatch`, `--update-user-msi-retry-interval`,
//! `--syncRetryDuration`), so existing deployment manifests keep working; every flag also reads an
//! environment variable.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{ArgAction, Parser};
use pod_identity_api::matching::Scope;
use pod_identity_azure::{AzureConfig, RetryPolicy};
use pod_identity_runtime::LogFormat;

use crate::{
    ControllerConfig, azure::Endpoints, cloud_config::OwnPod, federation::FederationConfig,
    leader::LeaseConfig, webhook::WebhookConfig, worker::WorkerSettings,
};

/// Parses `500ms`, `15s`, `3m`, `1h` or plain seconds (`3600`, as the original's `3600s` also parses).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration such as 500ms, 15s, 3m or 1h"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "'{text}' has an unknown unit '{unit}' (use ms, s, m or h)"
            ));
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("'{text}' is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Adds user-assigned identities to the VMs and scale sets of pods bound to them, and removes them when
/// no pod needs them.
#[derive(Clone, Debug, Parser)]
#[command(name = "pod-identity-controller", version, about)]
pub struct Args {
    /// Kubeconfig file; in-cluster configuration when empty.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Cloud provider configuration (azure.json); when empty, the environment variables CLOUD,
    /// TENANT_ID, SUBSCRIPTION_ID, RESOURCE_GROUP, CLIENT_ID, CLIENT_SECRET, USE_MSI and
    /// USER_ASSIGNED_MSI_CLIENT_ID are read instead.
    #[arg(long = "cloudconfig", env = "CLOUD_CONFIG")]
    pub cloud_config: Option<PathBuf>,

    /// Identity, binding and pod must share a namespace. `--forceNamespaced=false` lets a binding of
    /// any namespace match pods (the original's default), except identities annotated
    /// `aadpodidentity.k8s.io/Behavior: namespaced`.
    #[arg(long = "forceNamespaced", env = "FORCENAMESPACED", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub force_namespaced: bool,

    /// Watch only this namespace (all namespaces when empty). Assignments of cross-namespace matching
    /// live in `default`, so a single-namespace install should keep `--forceNamespaced`.
    #[arg(long = "namespace", env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Elect a leader on a Lease; turn off only for a single replica.
    #[arg(long = "leader-elect", env = "LEADER_ELECT", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: bool,

    /// This replica's name in the Lease (the pod name).
    #[arg(long = "leader-election-instance", env = "POD_NAME")]
    pub leader_election_instance: Option<String>,

    /// Namespace of the Lease: the install namespace.
    #[arg(
        long = "leader-election-namespace",
        env = "POD_NAMESPACE",
        default_value = "default"
    )]
    pub leader_election_namespace: String,

    /// Name of the Lease.
    #[arg(
        long = "leader-election-name",
        env = "LEADER_ELECTION_NAME",
        default_value = "pod-identity-controller"
    )]
    pub leader_election_name: String,

    /// How long the Lease holds without renewal; the leader renews every quarter of it and stops
    /// writing after half of it without renewal.
    #[arg(long = "leader-election-duration", env = "LEADER_ELECTION_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_election_duration: Duration,

    /// Address the admin servers listen on.
    #[arg(long = "bind-address", env = "BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: IpAddr,

    /// Port of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long = "http-probe-port", env = "HTTP_PROBE_PORT", default_value_t = 8080)]
    pub http_probe_port: u16,

    /// Port of `/metrics` alone (the original's Prometheus port); 0 to serve metrics on the probe port only.
    #[arg(long = "prometheus-port", env = "PROMETHEUS_PORT", default_value_t = 8888)]
    pub prometheus_port: u16,

    /// Identities never removed from a VM or scale set, by client ID (as the original) or resource ID,
    /// comma-separated. The cluster's own identity (`userAssignedIdentityID` of azure.json) is always
    /// protected.
    #[arg(
        long = "immutable-user-msis",
        env = "IMMUTABLE_USER_MSIS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub immutable_user_msis: Vec<String>,

    /// How often each machine is read to put back identities someone removed; also how long what is
    /// known of a machine stands without a read.
    #[arg(long = "identity-assignment-reconcile-interval", env = "IDENTITY_ASSIGNMENT_RECONCILE_INTERVAL", default_value = "3m", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// At most this many ARM reads per reconcile interval for those checks (machines are checked in
    /// turn when there are more).
    #[arg(long = "drift-check-budget", env = "DRIFT_CHECK_BUDGET", default_value_t = 60)]
    pub drift_check_budget: u32,

    /// Longest wait of an identity to add for others to join its request; shortest wait of an identity
    /// to remove.
    #[arg(long = "batch-window", env = "BATCH_WINDOW", default_value = "1s", value_parser = parse_duration)]
    pub batch_window: Duration,

    /// Concurrent writes of AzureAssignedIdentity objects per machine.
    #[arg(long = "createDeleteBatch", env = "CREATE_DELETE_BATCH", default_value_t = 20)]
    pub create_delete_batch: usize,

    /// First wait after a failed ARM call; doubles with each further failure (never shorter than
    /// ARM's Retry-After).
    #[arg(long = "update-user-msi-retry-interval", env = "UPDATE_USER_MSI_RETRY_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub retry_interval: Duration,

    /// Longest wait between retries of a failing machine.
    #[arg(long = "max-retry-interval", env = "MAX_RETRY_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub max_retry_interval: Duration,

    /// How long an identity ARM refuses (missing, or not assignable) stays out of requests before it
    /// is tried again; doubles with each refusal up to `--quarantine-max`.
    #[arg(long = "quarantine-duration", env = "QUARANTINE_DURATION", default_value = "5m", value_parser = parse_duration)]
    pub quarantine_duration: Duration,

    /// Longest quarantine.
    #[arg(long = "quarantine-max", env = "QUARANTINE_MAX", default_value = "1h", value_parser = parse_duration)]
    pub quarantine_max: Duration,

    /// A full planning pass even without changes, as a safety net.
    #[arg(long = "syncRetryDuration", env = "SYNC_RETRY_DURATION", default_value = "1h", value_parser = parse_duration)]
    pub sync_retry_duration: Duration,

    /// ARM endpoint; the cloud's (or that of `AZURE_ENVIRONMENT_FILEPATH`) when empty.
    #[arg(long = "arm-endpoint", env = "ARM_ENDPOINT")]
    pub arm_endpoint: Option<String>,

    /// Entra ID authority for a service principal; the cloud's when empty.
    #[arg(long = "authority-host", env = "AZURE_AUTHORITY_HOST")]
    pub authority_host: Option<String>,

    /// Instance Metadata Service, for a managed identity.
    #[arg(long = "imds-endpoint", env = "IMDS_ENDPOINT")]
    pub imds_endpoint: Option<String>,

    /// PEM file of CA certificates to trust for ARM and Entra besides the system's.
    #[arg(long = "azure-ca-file", env = "AZURE_CA_FILE")]
    pub azure_ca_file: Option<PathBuf>,

    /// Namespace of the subjects of federated identities: the controller keeps there one ServiceAccount per
    /// identity annotated `aadpodidentity.k8s.io/backend: federated`, whose tokens the agents exchange with
    /// Entra ID. Unset: no subjects are kept (federated identities are still never put on a VM).
    #[arg(long = "federation-namespace", env = "POD_IDENTITY_FEDERATION_NAMESPACE")]
    pub federation_namespace: Option<String>,

    /// Create (and remove) the federated identity credential each federated identity needs on its
    /// user-assigned identity; never one pod-identity did not create. Needs
    /// `federatedIdentityCredentials/write` and `delete` on the identities (Contributor or Owner).
    #[arg(long = "manage-federated-credentials", env = "POD_IDENTITY_MANAGE_FEDERATED_CREDENTIALS", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub manage_federated_credentials: bool,

    /// The cluster's service-account issuer as federated credentials must name it; read from the API
    /// server's `/.well-known/openid-configuration` when unset.
    #[arg(long = "federation-issuer", env = "POD_IDENTITY_FEDERATION_ISSUER")]
    pub federation_issuer: Option<String>,
    /// Port of the readiness-gate admission webhook (HTTPS, on `--bind-address`); 0 serves none.
    #[arg(long = "webhook-port", env = "WEBHOOK_PORT", default_value_t = 0)]
    pub webhook_port: u16,

    /// Service in front of the replicas that the webhook configuration calls (in the install
    /// namespace, `--leader-election-namespace`); the serving certificate carries its names.
    #[arg(
        long = "webhook-service",
        env = "WEBHOOK_SERVICE",
        default_value = "pod-identity-webhook"
    )]
    pub webhook_service: String,

    /// Further DNS names or IP addresses for the serving certificate, comma-separated.
    #[arg(
        long = "webhook-extra-names",
        env = "WEBHOOK_EXTRA_NAMES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub webhook_extra_names: Vec<String>,

    /// Secret of the install namespace that holds the webhook's certificate authority and serving
    /// certificate (created by the controller).
    #[arg(
        long = "webhook-secret",
        env = "WEBHOOK_SECRET",
        default_value = "pod-identity-webhook-cert"
    )]
    pub webhook_secret: String,

    /// MutatingWebhookConfiguration whose caBundle the controller keeps.
    #[arg(
        long = "webhook-configuration",
        env = "WEBHOOK_CONFIGURATION",
        default_value = "pod-identity-readiness-gate"
    )]
    pub webhook_configuration: String,

    /// Validity of a serving certificate; renewed with a third left. The authority that signs it is
    /// valid twelve times as long and replaced with one serving validity left.
    #[arg(long = "webhook-cert-validity", env = "WEBHOOK_CERT_VALIDITY", default_value = "720h", value_parser = parse_duration)]
    pub webhook_cert_validity: Duration,

    /// Assign the identities of bindings annotated `aadpodidentity.k8s.io/prewarm: "true"` ahead of
    /// time to the scale sets where the pods of workloads they select can land.
    #[arg(long = "prewarm", env = "PREWARM", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub prewarm: bool,

    /// How long a warm identity no workload needs any more stays before it may be removed.
    #[arg(long = "prewarm-linger", env = "PREWARM_LINGER", default_value = "10m", value_parser = parse_duration)]
    pub prewarm_linger: Duration,

    /// Log format: `text` (also `plain`) or `json`; the level comes from RUST_LOG (default `info`).
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The log filter when `RUST_LOG` is not set.
pub const DEFAULT_LOG_FILTER: &str = "info,kube=warn";

impl Args {
    /// The controller's settings. `azure` is the cloud configuration (its cluster identity,
    /// `userAssignedIdentityID`, is never removed); `hostname` names this replica when
    /// `--leader-election-instance` (`POD_NAME`) does not.
    pub fn controller_config(&self, azure: &AzureConfig, hostname: Option<String>) -> ControllerConfig {
        let instance = self
            .leader_election_instance
            .clone()
            .filter(|i| !i.is_empty())
            .or(hostname)
            .unwrap_or_else(|| "pod-identity-controller".to_owned());
        let mut immutable: Vec<String> = self
            .immutable_user_msis
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if !azure.user_assigned_identity_id.is_empty() {
            // The cluster's own identity (the kubelet's) is never taken away.
            immutable.push(azure.user_assigned_identity_id.clone());
        }
        ControllerConfig {
            scope: if self.force_namespaced {
                Scope::Namespaced
            } else {
                Scope::CrossNamespace
            },
            namespace: self.namespace.clone().filter(|n| !n.is_empty()),
            lease: self.leader_elect.then(|| LeaseConfig {
                namespace: self.leader_election_namespace.clone(),
                name: self.leader_election_name.clone(),
                identity: instance.clone(),
                duration: self.leader_election_duration,
            }),
            instance,
            worker: WorkerSettings {
                batch_window: self.batch_window,
                retry: RetryPolicy {
                    initial_delay: self.retry_interval,
                    max_delay: self.max_retry_interval,
                    ..RetryPolicy::default()
                },
                drift_interval: self.reconcile_interval,
                write_concurrency: self.create_delete_batch.max(1),
            },
            immutable,
            drift_budget: self.drift_check_budget,
            resync: self.sync_retry_duration,
            quarantine_initial: self.quarantine_duration,
            quarantine_max: self.quarantine_max,
            federation: self.federation(),
            webhook: (self.webhook_port != 0).then(|| WebhookConfig {
                listen: SocketAddr::new(self.bind_address, self.webhook_port),
                namespace: self.leader_election_namespace.clone(),
                service: self.webhook_service.clone(),
                extra_names: self
                    .webhook_extra_names
                    .iter()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
                secret: self.webhook_secret.clone(),
                configuration: self.webhook_configuration.clone(),
                cert_validity: self.webhook_cert_validity,
                recheck: Duration::from_secs(60),
            }),
            prewarm_linger: self.prewarm.then_some(self.prewarm_linger),
        }
    }

    /// What the controller does for federated identities; managing their credentials needs ARM, which
    /// [`crate::start`] adds.
    pub fn federation(&self) -> FederationConfig {
        let mut federation =
            FederationConfig::new(self.federation_namespace.clone().filter(|n| !n.is_empty()));
        federation.issuer = self.federation_issuer.clone().filter(|i| !i.is_empty());
        federation
    }

    /// Where ARM, Entra and IMDS are, with the CA certificates of `--azure-ca-file` read.
    pub fn endpoints(&self) -> std::io::Result<Endpoints> {
        let extra_ca_pem = match &self.azure_ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|error| {
                std::io::Error::new(error.kind(), format!("reading {}: {error}", path.display()))
            })?),
            None => None,
        };
        Ok(Endpoints {
            arm: self.arm_endpoint.clone(),
            authority: self.authority_host.clone(),
            imds: self.imds_endpoint.clone(),
            extra_ca_pem,
        })
    }

    /// Where the admin servers listen: the probe port, and the metrics port unless it is 0 or the same.
    pub fn admin_addresses(&self) -> Vec<SocketAddr> {
        let mut addresses = vec![SocketAddr::new(self.bind_address, self.http_probe_port)];
        if self.prometheus_port != 0 && self.prometheus_port != self.http_probe_port {
            addresses.push(SocketAddr::new(self.bind_address, self.prometheus_port));
        }
        addresses
    }
}

/// The controller's own pod from the downward API's `POD_NAME` and `POD_NAMESPACE` (`env` looks a
/// variable up); `None` unless both are set.
pub fn own_pod(env: impl Fn(&str) -> Option<String>) -> Option<OwnPod> {
    match (env("POD_NAME"), env("POD_NAMESPACE")) {
        (Some(name), Some(namespace)) if !name.is_empty() && !namespace.is_empty() => {
            Some(OwnPod { name, namespace })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn durations_read_like_the_originals() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    fn azure(cluster_identity: &str) -> AzureConfig {
        AzureConfig {
            user_assigned_identity_id: cluster_identity.to_owned(),
            ..AzureConfig::default()
        }
    }

    #[test]
    fn defaults_make_a_namespaced_leader_elected_controller() {
        let args = Args::try_parse_from(["pod-identity-controller"]).unwrap();
        let config = args.controller_config(&azure(""), Some("controller-abc".into()));
        assert_eq!(config.scope, Scope::Namespaced);
        assert_eq!(config.namespace, None);
        assert_eq!(
            config.instance, "controller-abc",
            "the host name names the replica"
        );
        let lease = config.lease.expect("leader election by default");
        assert_eq!(
            (
                lease.namespace.as_str(),
                lease.name.as_str(),
                lease.identity.as_str()
            ),
            ("default", "pod-identity-controller", "controller-abc")
        );
        assert_eq!(lease.duration, Duration::from_secs(15));
        assert_eq!(config.worker.batch_window, Duration::from_secs(1));
        assert_eq!(config.worker.retry.initial_delay, Duration::from_secs(1));
        assert_eq!(config.worker.retry.max_delay, Duration::from_secs(300));
        assert_eq!(config.worker.drift_interval, Duration::from_secs(180));
        assert_eq!(config.worker.write_concurrency, 20);
        assert!(config.immutable.is_empty());
        assert_eq!(config.drift_budget, 60);
        assert_eq!(config.resync, Duration::from_secs(3600));
        assert_eq!(
            (config.quarantine_initial, config.quarantine_max),
            (Duration::from_secs(300), Duration::from_secs(3600))
        );
        assert_eq!(
            args.admin_addresses(),
            vec![
                "0.0.0.0:8080".parse::<SocketAddr>().unwrap(),
                "0.0.0.0:8888".parse().unwrap()
            ]
        );
        assert_eq!(args.log_format, LogFormat::Text);
        assert!(config.webhook.is_none(), "no webhook unless a port is given");
        assert_eq!(config.prewarm_linger, None, "no pre-warming unless asked for");
        let nameless = args.controller_config(&azure(""), None);
        assert_eq!(nameless.instance, "pod-identity-controller");
    }

    #[test]
    fn every_flag_reaches_the_controller() {
        let args = Args::try_parse_from([
            "pod-identity-controller",
            "--forceNamespaced=false",
            "--namespace=shop",
            "--leader-elect=false",
            "--leader-election-instance=replica-1",
            "--immutable-user-msis= aaaa ,,bbbb",
            "--identity-assignment-reconcile-interval=10m",
            "--drift-check-budget=7",
            "--batch-window=250ms",
            "--createDeleteBatch=0",
            "--update-user-msi-retry-interval=2s",
            "--max-retry-interval=1m",
            "--quarantine-duration=30s",
            "--quarantine-max=2h",
            "--syncRetryDuration=15m",
            "--http-probe-port=8085",
            "--prometheus-port=8085",
            "--log-format=plain",
            "--federation-namespace=pod-identity-subjects",
            "--federation-issuer=https://issuer.example",
            "--leader-election-namespace=pod-identity",
            "--webhook-port=9443",
            "--webhook-service=ctl-webhook",
            "--webhook-extra-names= 127.0.0.1 ,,",
            "--webhook-secret=ctl-cert",
            "--webhook-configuration=ctl-gate",
            "--webhook-cert-validity=48h",
            "--prewarm",
            "--prewarm-linger=90s",
        ])
        .unwrap();
        let config = args.controller_config(&azure("/subscriptions/s/kubelet"), Some("host".into()));
        assert_eq!(config.scope, Scope::CrossNamespace);
        assert_eq!(config.namespace.as_deref(), Some("shop"));
        assert!(config.lease.is_none());
        assert_eq!(config.instance, "replica-1", "the flag wins over the host name");
        assert_eq!(
            config.immutable,
            vec!["aaaa", "bbbb", "/subscriptions/s/kubelet"],
            "trimmed, empty entries dropped, the cluster's own identity protected"
        );
        assert_eq!(config.worker.drift_interval, Duration::from_secs(600));
        assert_eq!(config.drift_budget, 7);
        assert_eq!(config.worker.batch_window, Duration::from_millis(250));
        assert_eq!(config.worker.write_concurrency, 1, "at least one write at a time");
        assert_eq!(config.worker.retry.initial_delay, Duration::from_secs(2));
        assert_eq!(config.worker.retry.max_delay, Duration::from_secs(60));
        assert_eq!(config.quarantine_initial, Duration::from_secs(30));
        assert_eq!(config.quarantine_max, Duration::from_secs(7200));
        assert_eq!(config.resync, Duration::from_secs(900));
        assert_eq!(
            config.federation.namespace.as_deref(),
            Some("pod-identity-subjects")
        );
        assert_eq!(
            config.federation.issuer.as_deref(),
            Some("https://issuer.example")
        );
        assert_eq!(
            args.admin_addresses(),
            vec!["0.0.0.0:8085".parse::<SocketAddr>().unwrap()],
            "metrics on the probe port alone"
        );
        let webhook = config.webhook.expect("a webhook on its port");
        assert_eq!(webhook.listen, "0.0.0.0:9443".parse::<SocketAddr>().unwrap());
        assert_eq!(
            (
                webhook.namespace.as_str(),
                webhook.secret.as_str(),
                webhook.configuration.as_str()
            ),
            ("pod-identity", "ctl-cert", "ctl-gate")
        );
        assert_eq!(
            webhook.names(),
            vec![
                "ctl-webhook.pod-identity.svc",
                "ctl-webhook.pod-identity.svc.cluster.local",
                "ctl-webhook.pod-identity",
                "ctl-webhook",
                "127.0.0.1"
            ]
        );
        assert_eq!(webhook.cert_validity, Duration::from_secs(48 * 3600));
        assert_eq!(config.prewarm_linger, Some(Duration::from_secs(90)));
        let empty_namespace = Args::try_parse_from(["pod-identity-controller", "--namespace="]).unwrap();
        assert_eq!(
            empty_namespace.controller_config(&azure(""), None).namespace,
            None
        );
    }

    #[test]
    fn endpoints_read_the_ca_file_and_name_it_when_it_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let args = Args::try_parse_from([
            "pod-identity-controller".into(),
            "--arm-endpoint=https://arm.example".into(),
            format!("--azure-ca-file={}", ca.display()),
        ])
        .unwrap();
        let endpoints = args.endpoints().unwrap();
        assert_eq!(endpoints.arm.as_deref(), Some("https://arm.example"));
        assert_eq!(
            endpoints.extra_ca_pem.as_deref(),
            Some("-----BEGIN CERTIFICATE-----\n")
        );
        let missing = Args::try_parse_from([
            "pod-identity-controller".into(),
            format!("--azure-ca-file={}", dir.path().join("gone.pem").display()),
        ])
        .unwrap();
        assert!(missing.endpoints().unwrap_err().to_string().contains("gone.pem"));
    }

    #[test]
    fn the_own_pod_needs_both_downward_api_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            own_pod(env(&[("POD_NAME", "c-1"), ("POD_NAMESPACE", "pod-identity")])),
            Some(OwnPod {
                name: "c-1".into(),
                namespace: "pod-identity".into()
            })
        );
        assert_eq!(own_pod(env(&[("POD_NAME", "c-1")])), None);
        assert_eq!(own_pod(env(&[("POD_NAME", ""), ("POD_NAMESPACE", "x")])), None);
    }

    #[test]
    fn original_flag_names_are_accepted() {
        let args = Args::try_parse_from([
            "pod-identity-controller",
            "--cloudconfig=/etc/kubernetes/azure.json",
            "--forceNamespaced=false",
            "--leader-election-namespace=pod-identity",
            "--leader-election-duration=15s",
            "--http-probe-port=8085",
            "--prometheus-port=8888",
            "--immutable-user-msis=aaaa,bbbb",
            "--identity-assignment-reconcile-interval=3m",
            "--createDeleteBatch=10",
            "--update-user-msi-retry-interval=1s",
            "--syncRetryDuration=3600s",
        ])
        .unwrap();
        assert!(!args.force_namespaced);
        assert_eq!(args.immutable_user_msis, vec!["aaaa", "bbbb"]);
        assert_eq!(args.create_delete_batch, 10);
        assert_eq!(args.sync_retry_duration, Duration::from_secs(3600));
        let defaults = Args::try_parse_from(["pod-identity-controller"]).unwrap();
        assert!(defaults.force_namespaced, "namespaced matching by default");
        assert!(defaults.leader_elect);
        assert_eq!(defaults.leader_election_duration, Duration::from_secs(15));
    }
}
