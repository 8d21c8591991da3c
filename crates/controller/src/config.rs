//! Command line and environment. Flag names are the original controller's where the meaning carried
//! over (`--cloudconfig`, `--forceNamespaced`, `--leader-election-*`, `--http-probe-port`,
//! `--prometheus-port`, `--immutable-user-msis`, `--identity-assignment-reconcile-interval`,
//! `--createDeleteBatch`, `--update-user-msi-retry-interval`, `--syncRetryDuration`), so existing
//! deployment manifests keep working; every flag also reads an environment variable.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Parser, ValueEnum};

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

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
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

    /// How often each machine is read to put back identities someone removed.
    #[arg(long = "identity-assignment-reconcile-interval", env = "IDENTITY_ASSIGNMENT_RECONCILE_INTERVAL", default_value = "3m", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// At most this many ARM reads per reconcile interval for those checks (machines are checked in
    /// turn when there are more).
    #[arg(long = "drift-check-budget", env = "DRIFT_CHECK_BUDGET", default_value_t = 60)]
    pub drift_check_budget: u32,

    /// How long changes gather before a machine's identities are updated in one request.
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

    /// Log format; the level comes from RUST_LOG (default `info`).
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
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
