//! A kubectl plugin that makes every identity decision explainable.
//!
//! `explain` walks one pod from its label to its bindings, identities, assignments and what the node
//! agent would answer; `simulate` shows which pods would gain or lose an identity if a binding or
//! identity manifest were applied. Both read the cluster once into [`cluster::ClusterState`] and then
//! decide with the same pure rules the controller and the agent use (`pod_identity_api::matching`,
//! `pod_identity_api::pod` for a pod's life and address, `pod_identity_api::answer` for the agent's
//! answer), so the explanation cannot drift from the behaviour.

pub mod cluster;
pub mod explain;
pub mod remove_rules;
pub mod simulate;

use std::{io::Write, path::PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
pub use pod_identity_api::answer::Mode;
use pod_identity_api::matching::Scope;

/// Command line of `kubectl podidentity`.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-podidentity",
    version,
    about = "Explain and simulate pod identity decisions"
)]
pub struct Args {
    /// Kubeconfig to use; kubectl's usual lookup (KUBECONFIG, ~/.kube/config, in-cluster) otherwise.
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// Namespace of the pod (explain) or of a manifest that names none (simulate).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,

    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Human)]
    pub output: Output,

    /// Match bindings of every namespace, as an installation with cross-namespace matching does.
    #[arg(long, global = true)]
    pub cross_namespace: bool,

    /// Namespace of the subjects of federated identities (the installation's `--federation-namespace`).
    #[arg(long, global = true, default_value = pod_identity_api::federation::DEFAULT_SUBJECTS_NAMESPACE)]
    pub federation_namespace: String,

    /// How the installation runs: `standard` (the controller records assignments) or `managed`
    /// (identities are pre-assigned and the agent matches bindings itself).
    #[arg(long, global = true, value_enum, default_value_t = Mode::Standard)]
    pub mode: Mode,

    /// The agents attest callers by their processes (the chart's `agent.attestHostNetwork`): host-network
    /// pods get their own identities instead of reaching the node's.
    #[arg(long, global = true)]
    pub attested_callers: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Explain why a pod does or does not get an identity.
    Explain {
        /// Name of the pod.
        pod: String,
    },
    /// List the pods that would gain or lose an identity if a manifest were applied.
    Simulate {
        /// AzureIdentity or AzureIdentityBinding manifest(s), YAML or JSON; `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Simulate deleting the objects of the manifest instead of applying them.
        #[arg(long)]
        delete: bool,
    },
    /// Print the CustomResourceDefinitions.
    Crds,
    /// After `helm uninstall`: remove the agent's interception (iptables chains and its redirect
    /// address) from every node, by running the agent image once on each; pods then reach IMDS directly.
    RemoveNodeRules {
        /// The agent image the chart ran.
        #[arg(long, default_value_t = remove_rules::default_image())]
        image: String,
        /// Pull policy of that image.
        #[arg(long, default_value = "IfNotPresent")]
        image_pull_policy: String,
        /// Extra agent arguments, for installations that changed `--iptables-chain`,
        /// `--redirect-address` or `--iptables-command` (repeatable).
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// Seconds to wait for every node.
        #[arg(long, default_value_t = 300)]
        timeout_sec: u64,
    },
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Sentences for people.
    Human,
    /// JSON for scripts.
    Json,
}

impl Args {
    fn scope(&self) -> Scope {
        if self.cross_namespace {
            Scope::CrossNamespace
        } else {
            Scope::Namespaced
        }
    }
}

/// Runs one command, writing its result to `out`.
pub async fn run(args: Args, out: &mut impl Write) -> Result<()> {
    if let Command::Crds = args.command {
        out.write_all(pod_identity_api::crds::render_yaml()?.as_bytes())?;
        return Ok(());
    }
    let client = pod_identity_runtime::client(args.kubeconfig.as_deref()).await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    match &args.command {
        Command::Explain { pod } => {
            let mut state = cluster::ClusterState::read(&client).await?;
            state.federation = cluster::FederationView::read(&client, &args.federation_namespace).await;
            state.federation.pod_events = cluster::pod_events(&client, &namespace, pod).await;
            let explanation = explain::explain(
                &state,
                &namespace,
                pod,
                args.scope(),
                args.mode,
                if args.attested_callers {
                    explain::Callers::Attested
                } else {
                    explain::Callers::ByAddress
                },
            )
            .with_context(|| format!("explaining pod {namespace}/{pod}"))?;
            match args.output {
                Output::Human => out.write_all(explanation.to_human().as_bytes())?,
                Output::Json => serde_json::to_writer_pretty(&mut *out, &explanation)?,
            }
        }
        Command::Simulate { file, delete } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
            };
            let change = simulate::Change::parse(&text, &namespace, *delete)?;
            let state = cluster::ClusterState::read(&client).await?;
            let outcome = simulate::simulate(&state, &change, args.scope());
            match args.output {
                Output::Human => out.write_all(outcome.to_human().as_bytes())?,
                Output::Json => serde_json::to_writer_pretty(&mut *out, &outcome)?,
            }
        }
        Command::RemoveNodeRules {
            image,
            image_pull_policy,
            agent_args,
            timeout_sec,
        } => {
            let options = remove_rules::Options {
                namespace: namespace.clone(),
                image: image.clone(),
                image_pull_policy: image_pull_policy.clone(),
                agent_args: agent_args.clone(),
                timeout: std::time::Duration::from_secs(*timeout_sec),
            };
            remove_rules::run(&client, &options, out).await?;
            return Ok(());
        }
        Command::Crds => {}
    }
    if args.output == Output::Json {
        writeln!(out)?;
    }
    Ok(())
}

#[cfg(test)]
mod fixtures;
