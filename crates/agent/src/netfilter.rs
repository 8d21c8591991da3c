//! Keeping the interception rules in place: list, plan ([`crate::rules::plan`]), apply, on start and on
//! an interval, and flush conntrack entries of IMDS connections whenever rules were (re)installed so that
//! connections opened before them are not carried past them.
//!
//! The rules are never removed: not on exit, not on error. An error is reported (unready, metric, log)
//! and retried; the process does not crash-loop with a half-written chain.

use std::{net::Ipv4Addr, process::Command, sync::Arc, time::Duration};

use pod_identity_azure::RetryPolicy;

use crate::{
    health::Health,
    metrics::{Metrics, ResultLabels},
    rules::{Action, Listed, RuleSpec, plan},
};

/// A failed netfilter operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct NetfilterError {
    /// What was attempted.
    pub operation: String,
    /// What the tool said.
    pub message: String,
}

fn fail(operation: impl Into<String>, message: impl std::fmt::Display) -> NetfilterError {
    NetfilterError {
        operation: operation.into(),
        message: message.to_string(),
    }
}

/// The operations rule keeping needs; an in-memory implementation tests the loop without root.
pub trait Netfilter: Send + Sync + 'static {
    /// `-S chain` of a table, or `None` when the chain does not exist.
    fn list(&self, table: &str, chain: &str) -> Result<Option<Vec<String>>, NetfilterError>;
    /// Applies one change.
    fn apply(&self, action: &Action) -> Result<(), NetfilterError>;
    /// Deletes conntrack entries of TCP connections to `ip:port`.
    fn flush_conntrack(&self, ip: Ipv4Addr, port: u16) -> Result<(), NetfilterError>;
    /// Puts `ip/32` on the node's loopback unless it is there already; `Ok(true)` when it was added.
    fn ensure_local_address(&self, ip: Ipv4Addr) -> Result<bool, NetfilterError>;
    /// Takes `ip/32` off the node's loopback; `Ok(false)` when it was not there.
    fn remove_local_address(&self, ip: Ipv4Addr) -> Result<bool, NetfilterError>;
}

/// The real thing: the `iptables` crate (which runs the `iptables` tool with `--wait`) and `conntrack`.
pub struct Iptables {
    inner: iptables::IPTables,
    conntrack: String,
}

impl std::fmt::Debug for Iptables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iptables")
            .field("cmd", &self.inner.cmd)
            .finish_non_exhaustive()
    }
}

impl Iptables {
    /// Finds the tools. `command` picks the backend (`iptables`, `iptables-nft`, `iptables-legacy`): it
    /// must be the one the node's other components use, or rules land where the kernel does not look.
    pub fn new(command: &str, conntrack: &str) -> Result<Self, NetfilterError> {
        let mut inner = iptables::new(false).map_err(|e| fail("running iptables --version", e))?;
        if command != "iptables" {
            // The crate keeps the command as a static string; the agent sets it once at start.
            inner.cmd = Box::leak(command.to_owned().into_boxed_str());
            let version = Command::new(command)
                .arg("--version")
                .output()
                .map_err(|e| fail(format!("running {command} --version"), e))?;
            if !version.status.success() {
                return Err(fail(
                    format!("running {command} --version"),
                    String::from_utf8_lossy(&version.stderr),
                ));
            }
        }
        Ok(Self {
            inner,
            conntrack: conntrack.to_owned(),
        })
    }
}

impl Netfilter for Iptables {
    fn list(&self, table: &str, chain: &str) -> Result<Option<Vec<String>>, NetfilterError> {
        let exists = self
            .inner
            .chain_exists(table, chain)
            .map_err(|e| fail(format!("checking chain {chain} of table {table}"), e))?;
        if !exists {
            return Ok(None);
        }
        self.inner
            .list(table, chain)
            .map(Some)
            .map_err(|e| fail(format!("listing chain {chain} of table {table}"), e))
    }

    fn apply(&self, action: &Action) -> Result<(), NetfilterError> {
        let described = format!("{action:?}");
        let result = match action {
            Action::CreateChain { table, chain } => self.inner.new_chain(table, chain),
            Action::FlushChain { table, chain } => self.inner.flush_chain(table, chain),
            Action::Append { table, chain, rule } => self.inner.append(table, chain, rule),
            Action::InsertFirst { table, chain, rule } => self.inner.insert(table, chain, rule, 1),
            Action::Delete { table, chain, rule } => self.inner.delete(table, chain, rule),
            Action::DeleteChain { table, chain } => self.inner.delete_chain(table, chain),
        };
        result.map_err(|e| fail(described, e))
    }

    fn flush_conntrack(&self, ip: Ipv4Addr, port: u16) -> Result<(), NetfilterError> {
        let output = Command::new(&self.conntrack)
            .args([
                "-D",
                "-p",
                "tcp",
                "--orig-dst",
                &ip.to_string(),
                "--orig-port-dst",
                &port.to_string(),
            ])
            .output()
            .map_err(|e| fail(format!("running {}", self.conntrack), e))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        // conntrack exits 1 when nothing matched, which is success here.
        if output.status.success() || stderr.contains("0 flow entries have been deleted") {
            Ok(())
        } else {
            Err(fail("flushing IMDS connections from conntrack", stderr.trim()))
        }
    }

    fn ensure_local_address(&self, ip: Ipv4Addr) -> Result<bool, NetfilterError> {
        crate::redirect::ensure_on_loopback(ip).map_err(|e| fail(format!("adding {ip}/32 to lo"), e))
    }

    fn remove_local_address(&self, ip: Ipv4Addr) -> Result<bool, NetfilterError> {
        crate::redirect::remove_from_loopback(ip).map_err(|e| fail(format!("removing {ip}/32 from lo"), e))
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Changes applied.
    pub applied: Vec<Action>,
    /// Whether conntrack entries were flushed.
    pub flushed: bool,
    /// Whether the redirect address had to be put (back) on the loopback.
    pub address_added: bool,
}

impl SyncReport {
    /// Whether anything was (re)installed.
    pub fn changed(&self) -> bool {
        self.address_added || !self.applied.is_empty()
    }
}

/// One pass: the redirect address first (so that the DNAT never points at an address the node lacks),
/// then every table: list, plan, apply, and check that nothing is left to do. Flushes conntrack when
/// something was (re)installed or `force_flush` is set (the first pass after start).
pub fn sync_once(
    netfilter: &dyn Netfilter,
    spec: &RuleSpec,
    conntrack: bool,
    force_flush: bool,
) -> Result<SyncReport, NetfilterError> {
    let mut report = SyncReport::default();
    if crate::redirect::needs_address(spec.redirect_ip) {
        report.address_added = netfilter.ensure_local_address(spec.redirect_ip)?;
    }
    for table in spec.tables() {
        let listed = list_table(netfilter, &table)?;
        for action in plan(&table, &listed) {
            netfilter.apply(&action)?;
            report.applied.push(action);
        }
        let after = list_table(netfilter, &table)?;
        let left = plan(&table, &after);
        if !left.is_empty() {
            return Err(fail(
                format!("checking table {}", table.table),
                format!("rules still differ after applying: {left:?}"),
            ));
        }
    }
    if conntrack && (force_flush || report.changed()) {
        netfilter.flush_conntrack(spec.metadata_ip, spec.metadata_port)?;
        report.flushed = true;
    }
    Ok(report)
}

/// What removing the interception did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemovalReport {
    /// Changes applied.
    pub applied: Vec<Action>,
    /// Whether the redirect address was taken off the loopback.
    pub address_removed: bool,
}

/// Takes the interception off the node, once the agent is uninstalled: our jumps and chains in every
/// table, then the redirect address; then checks that none is left. Only what the agent installs is
/// touched. After this, pods reach IMDS directly again, with every identity of the node.
pub fn remove_all(netfilter: &dyn Netfilter, spec: &RuleSpec) -> Result<RemovalReport, NetfilterError> {
    let mut report = RemovalReport::default();
    for table in spec.tables() {
        let listed = list_table(netfilter, &table)?;
        for action in crate::rules::plan_removal(&table, &listed) {
            netfilter.apply(&action)?;
            report.applied.push(action);
        }
        let left = crate::rules::plan_removal(&table, &list_table(netfilter, &table)?);
        if !left.is_empty() {
            return Err(fail(
                format!("checking table {}", table.table),
                format!("rules still there after removing them: {left:?}"),
            ));
        }
    }
    if crate::redirect::needs_address(spec.redirect_ip) {
        report.address_removed = netfilter.remove_local_address(spec.redirect_ip)?;
    }
    Ok(report)
}

fn list_table(netfilter: &dyn Netfilter, table: &crate::rules::TableRules) -> Result<Listed, NetfilterError> {
    let chain = netfilter.list(table.table, &table.chain)?;
    let hooks = table
        .listed_hooks()
        .map(|hook| netfilter.list(table.table, hook).map(Option::unwrap_or_default))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Listed { chain, hooks })
}

/// Keeps the rules in place: first pass (retried under the workspace's retry policy, from 500 ms up to
/// `interval`, until it succeeds), then one pass per `interval`. Readiness follows the outcome of the
/// latest pass.
pub async fn keep(
    netfilter: Arc<dyn Netfilter>,
    spec: RuleSpec,
    conntrack: bool,
    interval: Duration,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) {
    let mut first = true;
    let mut backoff = RetryPolicy {
        initial_delay: Duration::from_millis(500),
        max_delay: interval.max(Duration::from_secs(1)),
        ..RetryPolicy::default()
    }
    .backoff();
    loop {
        let pass = {
            let netfilter = netfilter.clone();
            let spec = spec.clone();
            tokio::task::spawn_blocking(move || sync_once(netfilter.as_ref(), &spec, conntrack, first)).await
        };
        let outcome = match pass {
            Ok(outcome) => outcome,
            Err(join) => Err(fail("rule sync task", join)),
        };
        match outcome {
            Ok(report) => {
                let result = if report.changed() { "repaired" } else { "unchanged" };
                if report.changed() {
                    if first {
                        tracing::info!(
                            changes = report.applied.len(),
                            address_added = report.address_added,
                            flushed = report.flushed,
                            "installed the interception rules"
                        );
                    } else {
                        tracing::warn!(changes = ?report.applied, address_added = report.address_added, flushed = report.flushed, "interception rules had drifted; repaired");
                    }
                }
                metrics.rule_syncs.get_or_create(&ResultLabels { result }).inc();
                metrics.rules_in_place.set(1);
                health.set_rules(true);
                first = false;
                backoff.reset();
                tokio::time::sleep(interval).await;
            }
            Err(error) => {
                tracing::error!(%error, "could not put the interception rules in place; retrying");
                metrics
                    .rule_syncs
                    .get_or_create(&ResultLabels { result: "error" })
                    .inc();
                metrics.rules_in_place.set(0);
                health.set_rules(false);
                tokio::time::sleep(backoff.next(None)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Mutex};

    use super::*;

    /// Tables in memory, applying actions the way iptables does.
    #[derive(Default)]
    struct Memory {
        chains: Mutex<HashMap<(String, String), Vec<String>>>,
        flushes: Mutex<usize>,
        addresses: Mutex<Vec<Ipv4Addr>>,
        broken: bool,
    }

    impl Memory {
        fn with_builtins() -> Self {
            let memory = Self::default();
            for (table, chain) in [("nat", "PREROUTING"), ("filter", "INPUT"), ("filter", "FORWARD")] {
                memory
                    .chains
                    .lock()
                    .unwrap()
                    .insert((table.into(), chain.into()), vec![format!("-P {chain} ACCEPT")]);
            }
            memory
        }
    }

    impl Netfilter for Memory {
        fn list(&self, table: &str, chain: &str) -> Result<Option<Vec<String>>, NetfilterError> {
            Ok(self
                .chains
                .lock()
                .unwrap()
                .get(&(table.into(), chain.into()))
                .cloned())
        }

        fn apply(&self, action: &Action) -> Result<(), NetfilterError> {
            if self.broken {
                return Err(fail("apply", "permission denied"));
            }
            let mut chains = self.chains.lock().unwrap();
            match action {
                Action::CreateChain { table, chain } => {
                    chains.insert(((*table).into(), chain.clone()), vec![format!("-N {chain}")]);
                }
                Action::FlushChain { table, chain } => {
                    chains.insert(((*table).into(), chain.clone()), vec![format!("-N {chain}")]);
                }
                Action::DeleteChain { table, chain } => {
                    chains.remove(&((*table).into(), chain.clone()));
                }
                Action::Append { table, chain, rule } => chains
                    .get_mut(&((*table).into(), chain.clone()))
                    .unwrap()
                    .push(format!("-A {chain} {rule}")),
                Action::InsertFirst { table, chain, rule } => chains
                    .get_mut(&((*table).into(), (*chain).into()))
                    .unwrap()
                    .insert(1, format!("-A {chain} {rule}")),
                Action::Delete { table, chain, rule } => {
                    let lines = chains.get_mut(&((*table).into(), (*chain).into())).unwrap();
                    let wanted = format!("-A {chain} {rule}");
                    if let Some(at) = lines.iter().position(|l| *l == wanted) {
                        lines.remove(at);
                    }
                }
            }
            Ok(())
        }

        fn flush_conntrack(&self, _: Ipv4Addr, _: u16) -> Result<(), NetfilterError> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }

        fn ensure_local_address(&self, ip: Ipv4Addr) -> Result<bool, NetfilterError> {
            if self.broken {
                return Err(fail("address", "permission denied"));
            }
            let mut addresses = self.addresses.lock().unwrap();
            if addresses.contains(&ip) {
                return Ok(false);
            }
            addresses.push(ip);
            Ok(true)
        }

        fn remove_local_address(&self, ip: Ipv4Addr) -> Result<bool, NetfilterError> {
            let mut addresses = self.addresses.lock().unwrap();
            let before = addresses.len();
            addresses.retain(|a| *a != ip);
            Ok(addresses.len() < before)
        }
    }

    fn spec() -> RuleSpec {
        RuleSpec {
            chain: "POD-IDENTITY".into(),
            metadata_ip: Ipv4Addr::new(169, 254, 169, 254),
            metadata_port: 80,
            redirect_ip: Ipv4Addr::new(169, 254, 79, 1),
            agent_port: 2579,
            guard: true,
            host_mark: None,
        }
    }

    #[test]
    fn first_pass_installs_and_flushes_then_passes_are_idempotent() {
        let memory = Memory::with_builtins();
        let report = sync_once(&memory, &spec(), true, true).unwrap();
        assert!(report.flushed);
        assert!(report.address_added, "the redirect address goes on lo first");
        assert_eq!(
            *memory.addresses.lock().unwrap(),
            vec![Ipv4Addr::new(169, 254, 79, 1)]
        );
        assert_eq!(report.applied.len(), 10);
        let again = sync_once(&memory, &spec(), true, false).unwrap();
        assert_eq!(again, SyncReport::default());
        assert_eq!(*memory.flushes.lock().unwrap(), 1);
    }

    #[test]
    fn drift_is_repaired_and_flushes_again_leaving_other_rules_alone() {
        let memory = Memory::with_builtins();
        memory
            .chains
            .lock()
            .unwrap()
            .get_mut(&("nat".into(), "PREROUTING".into()))
            .unwrap()
            .push("-A PREROUTING -j KUBE-SERVICES".into());
        sync_once(&memory, &spec(), true, true).unwrap();
        // Someone deletes our jump and empties our chain.
        {
            let mut chains = memory.chains.lock().unwrap();
            chains
                .get_mut(&("nat".into(), "PREROUTING".into()))
                .unwrap()
                .retain(|l| !l.contains("POD-IDENTITY"));
            chains.insert(
                ("nat".into(), "POD-IDENTITY".into()),
                vec!["-N POD-IDENTITY".into()],
            );
        }
        let report = sync_once(&memory, &spec(), true, false).unwrap();
        assert_eq!(report.applied.len(), 4, "{:?}", report.applied);
        assert!(report.flushed);
        let chains = memory.chains.lock().unwrap();
        let prerouting = &chains[&("nat".to_owned(), "PREROUTING".to_owned())];
        assert!(prerouting.contains(&"-A PREROUTING -j KUBE-SERVICES".to_owned()));
        assert_eq!(prerouting[1], "-A PREROUTING -j POD-IDENTITY");
    }

    #[test]
    fn a_removed_redirect_address_is_put_back_and_connections_flushed() {
        let memory = Memory::with_builtins();
        sync_once(&memory, &spec(), true, true).unwrap();
        memory.addresses.lock().unwrap().clear();
        let report = sync_once(&memory, &spec(), true, false).unwrap();
        assert!(report.address_added && report.changed(), "{report:?}");
        assert!(report.applied.is_empty());
        assert!(report.flushed, "connections made while the address was gone go");
    }

    #[test]
    fn a_loopback_redirect_needs_no_address() {
        let memory = Memory::with_builtins();
        let spec = RuleSpec {
            redirect_ip: Ipv4Addr::LOCALHOST,
            ..spec()
        };
        let report = sync_once(&memory, &spec, true, true).unwrap();
        assert!(!report.address_added);
        assert!(memory.addresses.lock().unwrap().is_empty());
    }

    #[test]
    fn removal_takes_out_everything_installed_and_leaves_other_rules() {
        let memory = Memory::with_builtins();
        memory
            .chains
            .lock()
            .unwrap()
            .get_mut(&("nat".into(), "PREROUTING".into()))
            .unwrap()
            .push("-A PREROUTING -j KUBE-SERVICES".into());
        sync_once(&memory, &spec(), true, true).unwrap();
        let report = remove_all(&memory, &spec()).unwrap();
        assert!(report.address_removed);
        let chains = memory.chains.lock().unwrap();
        assert!(!chains.contains_key(&("nat".to_owned(), "POD-IDENTITY".to_owned())));
        assert!(!chains.contains_key(&("filter".to_owned(), "POD-IDENTITY".to_owned())));
        for (_, lines) in chains.iter() {
            assert!(lines.iter().all(|l| !l.contains("POD-IDENTITY")), "{lines:?}");
        }
        assert!(
            chains[&("nat".to_owned(), "PREROUTING".to_owned())]
                .contains(&"-A PREROUTING -j KUBE-SERVICES".to_owned())
        );
        drop(chains);
        assert!(memory.addresses.lock().unwrap().is_empty());
        assert_eq!(
            remove_all(&memory, &spec()).unwrap(),
            RemovalReport::default(),
            "idempotent"
        );
    }

    #[test]
    fn errors_are_reported_not_swallowed() {
        let memory = Memory {
            broken: true,
            ..Memory::with_builtins()
        };
        assert!(sync_once(&memory, &spec(), true, true).is_err());
    }

    #[tokio::test]
    async fn the_keeper_reports_readiness_from_its_passes() {
        let memory: Arc<dyn Netfilter> = Arc::new(Memory::with_builtins());
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::new());
        let task = tokio::spawn(keep(
            memory.clone(),
            spec(),
            true,
            Duration::from_secs(3600),
            health.clone(),
            metrics.clone(),
        ));
        pod_identity_test_support::eventually(|| async {
            if health.rules() {
                Ok(())
            } else {
                Err("rules not in place yet")
            }
        })
        .await
        .unwrap();
        assert!(
            metrics
                .render()
                .contains("pod_identity_iptables_rules_in_place 1")
        );
        task.abort();
    }
}
