//! Which netfilter rules must exist, and what to change when the ones listed differ.
//!
//! Two chains of our own, both named [`RuleSpec::chain`], each reached by one jump from a built-in chain:
//! - `nat`: pod traffic for the metadata address and port is DNATed to the agent's redirect address
//!   ([`crate::redirect`]). A rule in `PREROUTING` only sees traffic that enters the node from outside its
//!   own network stack, so the agent's own calls to IMDS (and those of every host-network process) go out
//!   through `OUTPUT` untouched. With callers attested ([`RuleSpec::host_mark`]), `OUTPUT` jumps to the
//!   chain too, so that host-network pods and node processes reach the agent as well, except connections
//!   carrying the agent's own socket mark: setting a socket mark takes `CAP_NET_ADMIN`, which pods lack.
//! - `filter` (the guard): pod traffic that still has the metadata destination after `nat` was skipped,
//!   because our jump was removed or a connection predates it, is reset instead of reaching IMDS with the
//!   node's identities. It also drops connections from outside to the agent's port that were not DNATed,
//!   so that the redirect is the only way in.
//!
//! While the agent is down the `nat` rule stays and points at a port nobody listens on, so the kernel
//! answers pods with a reset: the rules are never removed, which is what makes the agent fail closed.
//!
//! Everything here is plain data in and out; [`crate::netfilter`] lists and applies.

use std::net::Ipv4Addr;

/// The built-in chain a jump is inserted into, with its table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// `PREROUTING`, `INPUT` or `FORWARD`.
    pub chain: &'static str,
}

/// The rules the agent keeps, derived from its configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// Name of our chain in each table.
    pub chain: String,
    /// The metadata address (169.254.169.254 on Azure).
    pub metadata_ip: Ipv4Addr,
    /// The metadata port (80).
    pub metadata_port: u16,
    /// The address intercepted traffic is DNATed to, on the node's loopback.
    pub redirect_ip: Ipv4Addr,
    /// The port the agent listens on for intercepted traffic, at `redirect_ip`.
    pub agent_port: u16,
    /// Whether the `filter` guard is kept.
    pub guard: bool,
    /// The socket mark (value, mask) of the agent's own connections to IMDS, when host traffic is
    /// intercepted too (callers attested); `None` intercepts pod-network traffic only.
    pub host_mark: Option<(u32, u32)>,
}

/// One table's desired state: our chain with these rules in this order, and a jump to it from each hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRules {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// Our chain.
    pub chain: String,
    /// Rule bodies (without `-A <chain>`), in `iptables -S` form.
    pub rules: Vec<String>,
    /// Built-in chains that must jump to ours.
    pub hooks: Vec<&'static str>,
}

impl RuleSpec {
    /// The body of the jump rule each hook carries.
    pub fn jump(&self) -> String {
        format!("-j {}", self.chain)
    }

    /// The desired state of each table we touch.
    pub fn tables(&self) -> Vec<TableRules> {
        let ip = self.metadata_ip;
        let port = self.metadata_port;
        let redirect = self.redirect_ip;
        let agent_port = self.agent_port;
        let (unmarked, hooks) = match self.host_mark {
            Some((mark, mask)) => (
                format!(" -m mark ! --mark {mark:#x}/{mask:#x}"),
                vec!["PREROUTING", "OUTPUT"],
            ),
            None => (String::new(), vec!["PREROUTING"]),
        };
        let mut tables = vec![TableRules {
            table: "nat",
            chain: self.chain.clone(),
            rules: vec![
                format!(
                    "! -s 127.0.0.1/32 -d {ip}/32 -p tcp -m tcp --dport {port}{unmarked} -m comment --comment \
                     pod-identity-agent -j DNAT --to-destination {redirect}:{agent_port}"
                ),
                "-j RETURN".to_owned(),
            ],
            hooks,
        }];
        if self.guard {
            tables.push(TableRules {
                table: "filter",
                chain: self.chain.clone(),
                rules: vec![
                    format!(
                        "-d {ip}/32 ! -i lo -p tcp -m tcp --dport {port} -m comment --comment pod-identity-agent \
                         -j REJECT --reject-with tcp-reset"
                    ),
                    format!(
                        "-d {redirect}/32 ! -i lo -p tcp -m tcp --dport {agent_port} -m comment --comment \
                         pod-identity-agent -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
                    ),
                    "-j RETURN".to_owned(),
                ],
                hooks: vec!["INPUT", "FORWARD"],
            });
        }
        tables
    }
}

/// What `iptables -S` showed for one table: the lines of our chain (`None` when it does not exist) and
/// of each hook.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listed {
    /// `iptables -t <table> -S <chain>`, or `None` when the chain is missing.
    pub chain: Option<Vec<String>>,
    /// `iptables -t <table> -S <hook>` per hook, in the order of [`TableRules::hooks`].
    pub hooks: Vec<Vec<String>>,
}

/// One change to make, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `-N chain`.
    CreateChain { table: &'static str, chain: String },
    /// `-F chain`: its rules differ from the desired ones.
    FlushChain { table: &'static str, chain: String },
    /// `-A chain rule`.
    Append {
        table: &'static str,
        chain: String,
        rule: String,
    },
    /// `-I hook 1 rule`.
    InsertFirst {
        table: &'static str,
        chain: &'static str,
        rule: String,
    },
    /// `-D hook rule`: one surplus copy of our jump.
    Delete {
        table: &'static str,
        chain: &'static str,
        rule: String,
    },
    /// `-X chain`: our chain, once empty and unreferenced (removal only).
    DeleteChain { table: &'static str, chain: String },
}

impl Action {
    /// The table the action changes.
    pub fn table(&self) -> &'static str {
        match self {
            Self::CreateChain { table, .. }
            | Self::FlushChain { table, .. }
            | Self::Append { table, .. }
            | Self::InsertFirst { table, .. }
            | Self::Delete { table, .. }
            | Self::DeleteChain { table, .. } => table,
        }
    }
}

/// The changes that turn what is listed into what is desired, touching nothing but our chain and our
/// jumps. Empty when all is in place.
///
/// Our chain is rebuilt whole when any of its rules differs (order included), as the original did: a
/// partial edit could leave a moment where the DNAT is gone but the jump remains. A missing jump is
/// inserted first in its hook; surplus copies are removed; a jump found elsewhere than first is left
/// where it is, so that we never fight another component that also wants to be first.
pub fn plan(desired: &TableRules, listed: &Listed) -> Vec<Action> {
    let mut actions = Vec::new();
    let table = desired.table;
    let chain = desired.chain.clone();
    let wanted: Vec<Vec<String>> = desired.rules.iter().map(|rule| normalize(rule)).collect();
    match &listed.chain {
        None => {
            actions.push(Action::CreateChain {
                table,
                chain: chain.clone(),
            });
            actions.extend(append_all(desired));
        }
        Some(lines) => {
            let present: Vec<Vec<String>> = lines
                .iter()
                .filter_map(|line| rule_body(line, &chain))
                .map(|body| normalize(&body))
                .collect();
            if present != wanted {
                actions.push(Action::FlushChain {
                    table,
                    chain: chain.clone(),
                });
                actions.extend(append_all(desired));
            }
        }
    }
    let jump = normalize(&format!("-j {chain}"));
    for (index, hook) in desired.hooks.iter().enumerate() {
        let lines = listed.hooks.get(index).map(Vec::as_slice).unwrap_or_default();
        let copies = lines
            .iter()
            .filter_map(|line| rule_body(line, hook))
            .filter(|body| normalize(body) == jump)
            .count();
        if copies == 0 {
            actions.push(Action::InsertFirst {
                table,
                chain: hook,
                rule: format!("-j {chain}"),
            });
        }
        for _ in 1..copies.max(1) {
            actions.push(Action::Delete {
                table,
                chain: hook,
                rule: format!("-j {chain}"),
            });
        }
    }
    actions
}

/// The changes that take our rules out of a table for good: every copy of our jump, then our chain
/// (emptied, then deleted). Nothing else is touched. For removing the interception from a node after the
/// agent is uninstalled; the agent itself never runs this.
pub fn plan_removal(ours: &TableRules, listed: &Listed) -> Vec<Action> {
    let table = ours.table;
    let jump = normalize(&format!("-j {}", ours.chain));
    let mut actions = Vec::new();
    for (index, hook) in ours.hooks.iter().enumerate() {
        let lines = listed.hooks.get(index).map(Vec::as_slice).unwrap_or_default();
        let copies = lines
            .iter()
            .filter_map(|line| rule_body(line, hook))
            .filter(|body| normalize(body) == jump)
            .count();
        actions.extend((0..copies).map(|_| Action::Delete {
            table,
            chain: hook,
            rule: format!("-j {}", ours.chain),
        }));
    }
    if listed.chain.is_some() {
        actions.push(Action::FlushChain {
            table,
            chain: ours.chain.clone(),
        });
        actions.push(Action::DeleteChain {
            table,
            chain: ours.chain.clone(),
        });
    }
    actions
}

fn append_all(desired: &TableRules) -> impl Iterator<Item = Action> + '_ {
    desired.rules.iter().map(|rule| Action::Append {
        table: desired.table,
        chain: desired.chain.clone(),
        rule: rule.clone(),
    })
}

/// The body of an `-A <chain> ...` line of `iptables -S`, or `None` for other lines (`-N`, `-P`).
fn rule_body(line: &str, chain: &str) -> Option<String> {
    let rest = line.trim().strip_prefix("-A ")?;
    let (name, body) = rest.split_once(' ').unwrap_or((rest, ""));
    (name == chain).then(|| body.trim().to_owned())
}

/// Tokens of a rule with the differences between iptables versions and backends removed: quotes around
/// comments, the implicit `-m tcp` that some versions print and others do not, and a `/32` that some
/// omit for single addresses.
fn normalize(rule: &str) -> Vec<String> {
    let tokens: Vec<String> = rule
        .split_whitespace()
        .map(|token| token.trim_matches('"').to_owned())
        .collect();
    let mut out = Vec::with_capacity(tokens.len());
    let mut index = 0;
    while index < tokens.len() {
        if tokens[index] == "-m" && tokens.get(index + 1).is_some_and(|m| m == "tcp") {
            index += 2;
            continue;
        }
        let token = &tokens[index];
        let previous = index.checked_sub(1).and_then(|p| tokens.get(p));
        let is_address = previous.is_some_and(|p| p == "-s" || p == "-d");
        if is_address && !token.contains('/') {
            out.push(format!("{token}/32"));
        } else {
            out.push(token.clone());
        }
        index += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// What `iptables -S` prints (iptables 1.8.9, nf_tables) once our rules are in place.
    fn listed_in_place(table: &TableRules) -> Listed {
        let mut chain = vec![format!("-N {}", table.chain)];
        chain.extend(table.rules.iter().map(|r| format!("-A {} {r}", table.chain)));
        let hooks = table
            .hooks
            .iter()
            .map(|hook| {
                vec![
                    format!("-P {hook} ACCEPT"),
                    format!("-A {hook} -j KUBE-SERVICES"),
                    format!("-A {hook} -j {}", table.chain),
                ]
            })
            .collect();
        Listed {
            chain: Some(chain),
            hooks,
        }
    }

    #[test]
    fn nat_rule_redirects_pod_traffic_but_not_loopback_to_the_agent() {
        let nat = &spec().tables()[0];
        assert_eq!(nat.table, "nat");
        assert_eq!(nat.hooks, vec!["PREROUTING"]);
        assert_eq!(
            nat.rules[0],
            "! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment \
             pod-identity-agent -j DNAT --to-destination 169.254.79.1:2579"
        );
    }

    #[test]
    fn attested_callers_on_the_node_are_redirected_too_but_not_the_agents_own_connections() {
        let spec = RuleSpec {
            host_mark: Some((0x2000, 0x2000)),
            ..spec()
        };
        let nat = &spec.tables()[0];
        assert_eq!(nat.hooks, vec!["PREROUTING", "OUTPUT"]);
        assert_eq!(
            nat.rules[0],
            "! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m mark ! --mark 0x2000/0x2000 \
             -m comment --comment pod-identity-agent -j DNAT --to-destination 169.254.79.1:2579"
        );
        // iptables prints the mark as it was given.
        let mut listed = listed_in_place(nat);
        listed.chain = Some(vec![
            "-N POD-IDENTITY".into(),
            "-A POD-IDENTITY ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m mark ! --mark \
             0x2000/0x2000 -m comment --comment pod-identity-agent -j DNAT --to-destination 169.254.79.1:2579"
                .into(),
            "-A POD-IDENTITY -j RETURN".into(),
        ]);
        assert_eq!(plan(nat, &listed), vec![]);
    }

    #[test]
    fn only_redirected_connections_reach_the_agent_from_outside() {
        let guard = &spec().tables()[1];
        assert_eq!(
            guard.rules[1],
            "-d 169.254.79.1/32 ! -i lo -p tcp -m tcp --dport 2579 -m comment --comment pod-identity-agent \
             -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        );
    }

    #[test]
    fn guard_rejects_what_escaped_the_redirect_and_can_be_turned_off() {
        let tables = spec().tables();
        assert_eq!(tables[1].table, "filter");
        assert_eq!(tables[1].hooks, vec!["INPUT", "FORWARD"]);
        assert!(tables[1].rules[0].contains("-j REJECT --reject-with tcp-reset"));
        assert!(
            tables[1].rules[0].contains("! -i lo"),
            "the agent's own calls come in on lo"
        );
        let without = RuleSpec {
            guard: false,
            ..spec()
        }
        .tables();
        assert_eq!(without.len(), 1);
    }

    #[test]
    fn nothing_to_do_when_everything_is_in_place() {
        for table in spec().tables() {
            assert_eq!(plan(&table, &listed_in_place(&table)), vec![]);
        }
    }

    #[test]
    fn formatting_differences_between_iptables_versions_are_not_drift() {
        let table = &spec().tables()[0];
        let mut listed = listed_in_place(table);
        listed.chain = Some(vec![
            "-N POD-IDENTITY".into(),
            "-A POD-IDENTITY ! -s 127.0.0.1 -d 169.254.169.254 -p tcp --dport 80 -m comment --comment \
             \"pod-identity-agent\" -j DNAT --to-destination 169.254.79.1:2579"
                .into(),
            "-A POD-IDENTITY -j RETURN".into(),
        ]);
        assert_eq!(plan(table, &listed), vec![]);
    }

    #[test]
    fn empty_tables_get_chain_rules_and_jumps() {
        let table = &spec().tables()[1];
        let listed = Listed {
            chain: None,
            hooks: vec![vec!["-P INPUT ACCEPT".into()], vec!["-P FORWARD ACCEPT".into()]],
        };
        let actions = plan(table, &listed);
        assert_eq!(
            actions[0],
            Action::CreateChain {
                table: "filter",
                chain: "POD-IDENTITY".into()
            }
        );
        assert_eq!(
            actions
                .iter()
                .filter(|a| matches!(a, Action::Append { .. }))
                .count(),
            3
        );
        assert_eq!(
            &actions[4..],
            &[
                Action::InsertFirst {
                    table: "filter",
                    chain: "INPUT",
                    rule: "-j POD-IDENTITY".into()
                },
                Action::InsertFirst {
                    table: "filter",
                    chain: "FORWARD",
                    rule: "-j POD-IDENTITY".into()
                },
            ]
        );
    }

    #[test]
    fn a_changed_rule_rebuilds_the_chain_whole() {
        let table = &spec().tables()[0];
        let mut listed = listed_in_place(table);
        // Someone pointed the redirect elsewhere.
        listed.chain = Some(vec![
            "-N POD-IDENTITY".into(),
            "-A POD-IDENTITY -d 169.254.169.254/32 -p tcp -j DNAT --to-destination 10.0.0.9:80".into(),
        ]);
        let actions = plan(table, &listed);
        assert_eq!(
            actions[0],
            Action::FlushChain {
                table: "nat",
                chain: "POD-IDENTITY".into()
            }
        );
        assert_eq!(actions.len(), 3, "{actions:?}");
    }

    #[test]
    fn reordered_rules_are_drift() {
        let table = &spec().tables()[0];
        let mut listed = listed_in_place(table);
        let mut lines = listed.chain.take().unwrap();
        lines.swap(1, 2);
        listed.chain = Some(lines);
        assert!(matches!(plan(table, &listed)[0], Action::FlushChain { .. }));
    }

    #[test]
    fn a_removed_jump_is_put_back_first_and_other_rules_are_left_alone() {
        let table = &spec().tables()[0];
        let mut listed = listed_in_place(table);
        listed.hooks[0] = vec![
            "-P PREROUTING ACCEPT".into(),
            "-A PREROUTING -j KUBE-SERVICES".into(),
        ];
        assert_eq!(
            plan(table, &listed),
            vec![Action::InsertFirst {
                table: "nat",
                chain: "PREROUTING",
                rule: "-j POD-IDENTITY".into()
            }]
        );
    }

    #[test]
    fn duplicate_jumps_are_reduced_to_one() {
        let table = &spec().tables()[0];
        let mut listed = listed_in_place(table);
        listed.hooks[0].push("-A PREROUTING -j POD-IDENTITY".into());
        listed.hooks[0].push("-A PREROUTING -j POD-IDENTITY".into());
        let actions = plan(table, &listed);
        assert_eq!(actions.len(), 2);
        assert!(actions.iter().all(|a| matches!(a, Action::Delete { .. })));
    }

    #[test]
    fn removal_takes_every_jump_then_the_chain_and_nothing_else() {
        let table = &spec().tables()[0];
        let mut listed = listed_in_place(table);
        listed.hooks[0].push("-A PREROUTING -j POD-IDENTITY".into());
        let actions = plan_removal(table, &listed);
        assert_eq!(
            actions,
            vec![
                Action::Delete {
                    table: "nat",
                    chain: "PREROUTING",
                    rule: "-j POD-IDENTITY".into()
                },
                Action::Delete {
                    table: "nat",
                    chain: "PREROUTING",
                    rule: "-j POD-IDENTITY".into()
                },
                Action::FlushChain {
                    table: "nat",
                    chain: "POD-IDENTITY".into()
                },
                Action::DeleteChain {
                    table: "nat",
                    chain: "POD-IDENTITY".into()
                },
            ]
        );
        assert!(
            actions
                .iter()
                .all(|a| !format!("{a:?}").contains("KUBE-SERVICES")),
            "another component's rule was touched"
        );
    }

    #[test]
    fn removal_from_a_clean_table_does_nothing() {
        let table = &spec().tables()[1];
        let listed = Listed {
            chain: None,
            hooks: vec![vec!["-P INPUT ACCEPT".into()], vec!["-P FORWARD ACCEPT".into()]],
        };
        assert!(plan_removal(table, &listed).is_empty());
    }

    #[test]
    fn a_jump_with_extra_matches_is_not_ours() {
        let table = &spec().tables()[0];
        let mut listed = listed_in_place(table);
        listed.hooks[0] = vec!["-A PREROUTING -i eth0 -j POD-IDENTITY".into()];
        assert!(matches!(plan(table, &listed)[0], Action::InsertFirst { .. }));
    }
}
