//! Who is calling, from the kernel's view of the connection, not only from its source address.
//!
//! A source address names a pod only if nothing else could have sent from it: a pod on the host network
//! sends from the node's own address (aad-pod-identity #826 and the same report against kube2iam and kiam:
//! such pods reached every identity of the node), and where pods can forge addresses (CVE-2021-1677 on
//! kubenet) a pod can pose as another. So for each connection the agent accepts, it finds the socket the
//! caller holds (in the socket table of the network namespace the caller must be in), the processes holding
//! it, and the pod the kubelet put those processes in (the pod UID in their cgroup path), and decides from
//! that pod.
//!
//! Everything here is a plain function of those facts (socket tables, cgroup text, pods), tested without
//! I/O; [`lookup`] reads them from the kernel.

pub mod caller;
pub mod lookup;

use std::net::{Ipv4Addr, SocketAddrV4};

/// What a caller in no pod (the kubelet, node daemons) gets when callers are attested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeCallers {
    /// What the node's IMDS gives it, as if nothing intercepted it: tokens of the node's identities and
    /// every metadata path (the kubelet's cloud provider reads `/metadata/instance`).
    Passthrough,
    /// Refused (403): for nodes where nothing outside pods may use the node's identities.
    Refuse,
}

/// The UID of a pod, as the kubelet writes it into cgroup paths (with dashes).
pub type PodUid = String;

/// Where a connection came from, as the redirect saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// From a pod's own network namespace (the `PREROUTING` redirect): the source address belongs to the
    /// pod that owns it, unless it was forged.
    PodNetwork,
    /// From the node's own network namespace (the `OUTPUT` redirect): a host-network pod, or the node.
    Host,
}

/// What the facts say about the caller of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attestation {
    /// A process of this pod holds the caller's socket.
    Pod(PodUid),
    /// The processes holding the socket are in no pod: the node itself (the kubelet, node daemons).
    Node,
    /// A pod-network connection whose socket is not in the namespace of the pod that owns its source
    /// address: the address was forged.
    Spoofed {
        /// The pod that owns the source address.
        owner: PodUid,
    },
    /// The socket was not found (closed since, or the lookup ran out of time): nothing is decided, the
    /// caller may ask again.
    Unknown(&'static str),
}

/// One row of `/proc/<pid>/net/tcp`: a TCP socket of that process's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    /// The socket's own address.
    pub local: SocketAddrV4,
    /// Its peer.
    pub remote: SocketAddrV4,
    /// Its inode (`socket:[<inode>]` in `/proc/<pid>/fd`).
    pub inode: u64,
}

/// The rows of `/proc/<pid>/net/tcp`. Rows that do not parse are skipped (the format is the kernel's;
/// a row that does not parse cannot be the caller's).
pub fn parse_tcp_table(text: &str) -> Vec<TcpSocket> {
    text.lines().skip(1).filter_map(parse_tcp_row).collect()
}

fn parse_tcp_row(line: &str) -> Option<TcpSocket> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local = parse_hex_address(fields.get(1)?)?;
    let remote = parse_hex_address(fields.get(2)?)?;
    let inode = fields.get(9)?.parse().ok()?;
    Some(TcpSocket { local, remote, inode })
}

/// `0100007F:0050`: the address as the kernel holds it (network byte order read as a little-endian
/// word), and the port in hex.
fn parse_hex_address(text: &str) -> Option<SocketAddrV4> {
    let (address, port) = text.split_once(':')?;
    if address.len() != 8 {
        return None;
    }
    let word = u32::from_str_radix(address, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(word.swap_bytes()), port))
}

/// The inode of the caller's socket in a table: its own address is the connection's peer, and its peer
/// the address it dialled (the metadata address, before the redirect).
pub fn caller_socket(table: &[TcpSocket], peer: SocketAddrV4, dialled: SocketAddrV4) -> Option<u64> {
    table
        .iter()
        .find(|s| s.local == peer && s.remote == dialled && s.inode != 0)
        .map(|s| s.inode)
}

/// The pod UID in a process's cgroup file (`/proc/<pid>/cgroup`), for the kubelet's drivers and cgroup
/// versions:
/// - cgroupfs: `.../kubepods/besteffort/pod<uid>/<container>` (v1 and v2; guaranteed pods have no QoS
///   level: `.../kubepods/pod<uid>/...`);
/// - systemd: `.../kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/...`.
///
/// `None` for a process in no pod. A path with a pod segment that is not a UID is not a pod.
///
/// The path is the one the reader's cgroup namespace shows. A containerised agent on cgroup v2 has a
/// namespace of its own (containerd's default), where other cgroups appear relative to its own, from `..`:
/// `../../burstable/pod<uid>/<container>`; the kubelet's root is then out of sight, and the pod segment is
/// taken wherever it is (a cgroup outside the namespace can only have been made by the node's root, which
/// names pods only for the kubelet).
pub fn pod_uid(cgroup: &str) -> Option<PodUid> {
    cgroup.lines().find_map(|line| {
        // hierarchy-ID:controllers:path; the pod's segment comes below the kubelet's `kubepods` root.
        let path = line.splitn(3, ':').nth(2)?;
        if path.starts_with("/..") {
            return path.split('/').find_map(pod_segment);
        }
        let mut segments = path.split('/');
        segments.find(|s| *s == "kubepods" || s.starts_with("kubepods") && s.ends_with(".slice"))?;
        segments.find_map(pod_segment)
    })
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd); QoS levels
/// (`besteffort`, `kubepods-burstable.slice`) are not pods.
fn pod_segment(segment: &str) -> Option<PodUid> {
    let uid = if let Some(slice) = segment.strip_suffix(".slice") {
        let at = slice.find("-pod")?;
        slice[at + 4..].replace('_', "-")
    } else {
        segment.strip_prefix("pod")?.to_owned()
    };
    is_uid(&uid).then_some(uid)
}

fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| {
            g.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
}

/// A pod-network connection: `found` says whether the caller's socket is in the socket table of the
/// namespace of `owner`, the pod that owns the source address.
pub fn attest_pod_network(owner: &PodUid, found: bool) -> Attestation {
    if found {
        Attestation::Pod(owner.clone())
    } else {
        Attestation::Spoofed { owner: owner.clone() }
    }
}

/// A host connection: the cgroup files of the processes that hold the caller's socket (none when the
/// socket was not found, or no process held it by the time the lookup ran).
pub fn attest_host<'a>(holders: impl IntoIterator<Item = &'a str>) -> Attestation {
    let mut pods: Vec<PodUid> = Vec::new();
    let mut any = false;
    for cgroup in holders {
        any = true;
        if let Some(uid) = pod_uid(cgroup)
            && !pods.contains(&uid)
        {
            pods.push(uid);
        }
    }
    match (any, pods.as_slice()) {
        (false, _) => Attestation::Unknown("no process holds the caller's socket"),
        (true, []) => Attestation::Node,
        (true, [uid]) => Attestation::Pod(uid.clone()),
        // A socket shared by processes of two pods cannot be told apart.
        (true, _) => Attestation::Unknown("processes of several pods hold the caller's socket"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d9e7c1a-5b2f-4e3d-9a8b-7c6d5e4f3a2b";

    #[test]
    fn pod_uids_are_read_from_every_driver_and_version() {
        for (cgroup, expected) in [
            // cgroup v1, cgroupfs driver, burstable (every controller line carries the path).
            (
                format!(
                    "12:pids:/kubepods/burstable/pod{UID}/1f2e3d\n11:memory:/kubepods/burstable/pod{UID}/1f2e3d\n"
                ),
                Some(UID),
            ),
            // guaranteed pods have no QoS level.
            (format!("4:cpu,cpuacct:/kubepods/pod{UID}/abc\n"), Some(UID)),
            // a kubelet with --cgroup-root.
            (
                format!("3:pids:/pod-identity-pin1x0/kubepods/besteffort/pod{UID}/abc\n"),
                Some(UID),
            ),
            // cgroup v2, cgroupfs.
            (format!("0::/kubepods/besteffort/pod{UID}/abc\n"), Some(UID)),
            // systemd driver, v1 and v2 (dashes become underscores in unit names).
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-abc.scope\n",
                    UID.replace('-', "_")
                ),
                Some(UID),
            ),
            (
                format!(
                    "1:name=systemd:/kubepods.slice/kubepods-pod{}.slice/cri-containerd-abc.scope\n",
                    UID.replace('-', "_")
                ),
                Some(UID),
            ),
            // read from inside a container's cgroup namespace (cgroup v2): relative to the reader's own.
            (format!("0::/../../burstable/pod{UID}/abc\n"), Some(UID)),
            (
                format!(
                    "0::/../../../kubepods-pod{}.slice/cri-containerd-abc.scope\n",
                    UID.replace('-', "_")
                ),
                Some(UID),
            ),
            // hybrid hosts: the unified line is empty for pods of a v1 kubelet, the v1 lines name the pod.
            (
                format!("0::/\n12:pids:/kubepods/besteffort/pod{UID}/abc\n"),
                Some(UID),
            ),
        ] {
            assert_eq!(pod_uid(&cgroup).as_deref(), expected, "{cgroup}");
        }
    }

    #[test]
    fn node_processes_are_in_no_pod() {
        for cgroup in [
            "0::/system.slice/kubelet.service\n",
            "12:pids:/system.slice/containerd.service\n0::/\n",
            "0::/init.scope\n",
            // the node's daemons and the reader's own container, from inside a cgroup namespace.
            "0::/../../../../system.slice/kubelet.service\n",
            "0::/\n",
            "3:pids:/user.slice/user-0.slice/session-1.scope\n",
            // not a UID: a directory someone named pod-something.
            "0::/kubepods/besteffort/podcast/abc\n",
            // a pod segment outside the kubelet's root is not the kubelet's.
            "0::/system.slice/pod0d9e7c1a-5b2f-4e3d-9a8b-7c6d5e4f3a2b/abc\n",
            "0::/kubepods/besteffort/pod0D9E7C1A-5B2F-4E3D-9A8B-7C6D5E4F3A2B/abc\n",
            "",
        ] {
            assert_eq!(pod_uid(cgroup), None, "{cgroup}");
        }
    }

    #[test]
    fn the_callers_socket_is_found_by_both_ends() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 020063 0A:0A1E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 100 0 0 10 0\n\
   1: 020063 0A:C350 FEA9FEA9:0050 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0 20 4 30 10 -1\n\
   2: 0100007F:C350 FEA9FEA9:0050 01 00000000:00000000 00:00000000 00000000     0        0 3333 1 0 20 4 30 10 -1\n"
            .replace("020063 0A", "0200630A");
        let rows = parse_tcp_table(&table);
        assert_eq!(rows.len(), 3);
        let metadata = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
        assert_eq!(
            caller_socket(
                &rows,
                SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 50000),
                metadata
            ),
            Some(2222)
        );
        assert_eq!(
            caller_socket(&rows, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 50000), metadata),
            Some(3333)
        );
        assert_eq!(
            caller_socket(
                &rows,
                SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 50001),
                metadata
            ),
            None,
            "another port is another socket"
        );
    }

    #[test]
    fn rows_that_do_not_parse_are_not_callers() {
        let rows = parse_tcp_table("header\n   0: zz:zz 00000000:0000 0A\n   1: 0100007F:0050\n");
        assert!(rows.is_empty());
    }

    #[test]
    fn a_pod_network_socket_outside_the_owners_namespace_is_spoofed() {
        let owner = UID.to_owned();
        assert_eq!(attest_pod_network(&owner, true), Attestation::Pod(owner.clone()));
        assert_eq!(attest_pod_network(&owner, false), Attestation::Spoofed { owner });
    }

    #[test]
    fn host_callers_are_the_pod_of_their_processes_or_the_node() {
        let pod = format!("0::/kubepods/besteffort/pod{UID}/abc\n");
        let other = "0::/kubepods/besteffort/pod11111111-2222-4333-8444-555555555555/abc\n";
        assert_eq!(attest_host([pod.as_str()]), Attestation::Pod(UID.to_owned()));
        assert_eq!(
            attest_host([pod.as_str(), pod.as_str()]),
            Attestation::Pod(UID.to_owned())
        );
        assert_eq!(
            attest_host(["0::/system.slice/kubelet.service\n"]),
            Attestation::Node
        );
        assert!(matches!(attest_host(Vec::<&str>::new()), Attestation::Unknown(_)));
        assert!(matches!(
            attest_host([pod.as_str(), other]),
            Attestation::Unknown(_)
        ));
        // A process in no pod sharing the socket with a pod's process: the pod is the caller.
        assert_eq!(
            attest_host(["0::/system.slice/containerd.service\n", pod.as_str()]),
            Attestation::Pod(UID.to_owned())
        );
    }
}
