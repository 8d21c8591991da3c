//! Reading the facts attestation decides on, from the kernel: the caller's socket (socket diagnostics for
//! the node's own namespace, `/proc/<pid>/net/tcp` for a pod's), the processes holding it
//! (`/proc/<pid>/fd`), and their cgroups (`/proc/<pid>/cgroup`).
//!
//! What it needs: the host's PID namespace (`hostPID`), so that `/proc` shows every process of the node;
//! reading another pod's socket table needs nothing more; finding which process holds a socket on the
//! node's own network needs `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH` for processes of other users
//! (`/proc/<pid>/fd` is theirs alone). Every lookup is blocking file and netlink I/O, bounded by a
//! deadline; run it off the async workers.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use super::{Attestation, PodUid, attest_host, attest_pod_network, caller_socket, parse_tcp_table, pod_uid};

/// Reads attestation facts from a `/proc` (the host's, with `hostPID`).
#[derive(Debug)]
pub struct Lookup {
    proc: PathBuf,
    deadline: Duration,
    /// A process of each pod seen so far: a pod's socket table is read through any of its processes.
    pod_pids: Mutex<HashMap<PodUid, u32>>,
}

impl Lookup {
    /// Lookups in `proc` (normally `/proc`), each bounded by `deadline`.
    pub fn new(proc: impl Into<PathBuf>, deadline: Duration) -> Self {
        Self {
            proc: proc.into(),
            deadline,
            pod_pids: Mutex::default(),
        }
    }

    /// A connection from a pod's network: is the caller's socket (`peer` → `dialled`) in the network
    /// namespace of `owner`, the pod that owns the peer's address?
    pub fn pod_network(&self, owner: &PodUid, peer: SocketAddrV4, dialled: SocketAddrV4) -> Attestation {
        let started = Instant::now();
        let Some(pid) = self.pid_of(owner, started) else {
            return Attestation::Unknown("no process of the pod that owns the caller's address was found");
        };
        let table =
            std::fs::read_to_string(self.proc.join(pid.to_string()).join("net/tcp")).unwrap_or_default();
        let found = caller_socket(&parse_tcp_table(&table), peer, dialled).is_some();
        attest_pod_network(owner, found)
    }

    /// A connection from the node's own network: which pod's process (or which node process) holds the
    /// caller's socket `peer` → `dialled`? `None` when no such socket is in the node's network namespace:
    /// the caller is on a pod's network. `first` are processes to look at before the others.
    pub fn host(&self, peer: SocketAddrV4, dialled: SocketAddrV4, first: &[u32]) -> Option<Attestation> {
        let started = Instant::now();
        let inode = match socket_inode(peer, dialled) {
            Ok(inode) => inode?,
            Err(_) => {
                // Socket diagnostics refused: the node's table in /proc says the same, slower.
                let table = std::fs::read_to_string(self.proc.join("self/net/tcp")).unwrap_or_default();
                caller_socket(&parse_tcp_table(&table), peer, dialled)?
            }
        };
        Some(self.holders_of(inode, first, started))
    }

    fn holders_of(&self, inode: u64, first: &[u32], started: Instant) -> Attestation {
        let target = format!("socket:[{inode}]");
        let mut holders = Vec::new();
        let rest = self.pids().into_iter().filter(|p| !first.contains(p));
        for pid in first.iter().copied().chain(rest) {
            if started.elapsed() > self.deadline {
                return Attestation::Unknown("looking for the caller's process ran out of time");
            }
            if self.holds(pid, &target) {
                holders.push(
                    std::fs::read_to_string(self.proc.join(pid.to_string()).join("cgroup"))
                        .unwrap_or_default(),
                );
                // Every holder counts (a node process sharing a pod's socket makes it the pod's); a
                // socket is rarely held by more than one, so the scan goes on only to the deadline.
            }
        }
        attest_host(holders.iter().map(String::as_str))
    }

    /// The processes of `pod`, found by their cgroups.
    pub fn pids_of(&self, pod: &PodUid) -> Vec<u32> {
        self.pids()
            .into_iter()
            .filter(|pid| self.pod_of(*pid).as_ref() == Some(pod))
            .collect()
    }

    fn pid_of(&self, pod: &PodUid, started: Instant) -> Option<u32> {
        let cached = self.pod_pids.lock().ok()?.get(pod).copied();
        if let Some(pid) = cached
            && self.pod_of(pid).as_ref() == Some(pod)
        {
            return Some(pid);
        }
        for pid in self.pids() {
            if started.elapsed() > self.deadline {
                return None;
            }
            if let Some(uid) = self.pod_of(pid) {
                let mut cache = self.pod_pids.lock().ok()?;
                cache.insert(uid.clone(), pid);
                if &uid == pod {
                    return Some(pid);
                }
            }
        }
        None
    }

    fn pod_of(&self, pid: u32) -> Option<PodUid> {
        pod_uid(&std::fs::read_to_string(self.proc.join(pid.to_string()).join("cgroup")).ok()?)
    }

    fn pids(&self) -> Vec<u32> {
        std::fs::read_dir(&self.proc)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    fn holds(&self, pid: u32, target: &str) -> bool {
        let fds = self.proc.join(pid.to_string()).join("fd");
        std::fs::read_dir(&fds)
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target))
    }
}

/// The inode of the TCP socket `local` → `remote` in the agent's own network namespace, by an exact
/// socket-diagnostics query (`NETLINK_SOCK_DIAG`, `inet_diag_req_v2`); `None` when there is none.
pub fn socket_inode(local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<Option<u64>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut id = SocketId::new_v4();
    id.source_address = IpAddr::V4(*local.ip());
    id.source_port = local.port();
    id.destination_address = IpAddr::V4(*remote.ip());
    id.destination_port = remote.port();
    // All ones: no cookie, match by the addresses alone.
    id.cookie = [0xff; 8];
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        })
        .into(),
    );
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    let mut reply = vec![0; 8192];
    let size = socket.recv(&mut &mut reply[..], 0)?;
    let answer = NetlinkMessage::<SockDiagMessage>::deserialize(&reply[..size])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match answer.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            Ok((response.header.inode != 0).then_some(u64::from(response.header.inode)))
        }
        NetlinkPayload::Error(error) if error.to_io().kind() == io::ErrorKind::NotFound => Ok(None),
        NetlinkPayload::Error(error) => Err(error.to_io()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected socket-diagnostics answer: {other:?}"),
        )),
    }
}

/// Whether `proc` shows processes beyond the agent's own container, as with `hostPID`: without it every
/// process it shows is in the agent's own cgroup.
pub fn sees_host_processes(proc: &Path) -> bool {
    let Ok(own) = std::fs::read_to_string(proc.join("self/cgroup")) else {
        return false;
    };
    std::fs::read_dir(proc)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .any(|entry| std::fs::read_to_string(entry.path().join("cgroup")).is_ok_and(|cgroup| cgroup != own))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    use super::*;

    #[test]
    fn socket_diagnostics_find_a_connection_by_both_ends() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let std::net::SocketAddr::V4(local) = client.local_addr().unwrap() else {
            panic!("IPv4 expected")
        };
        let std::net::SocketAddr::V4(remote) = client.peer_addr().unwrap() else {
            panic!("IPv4 expected")
        };
        let inode = socket_inode(local, remote).unwrap().expect("the client socket");
        let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
        assert_eq!(
            caller_socket(&parse_tcp_table(&table), local, remote),
            Some(inode)
        );
        let missing = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1);
        assert_eq!(socket_inode(missing, remote).unwrap(), None);
    }

    #[test]
    fn only_a_proc_showing_processes_of_other_cgroups_is_the_hosts() {
        let proc = tempfile::tempdir().unwrap();
        let write = |pid: &str, cgroup: &str| {
            std::fs::create_dir_all(proc.path().join(pid)).unwrap();
            std::fs::write(proc.path().join(pid).join("cgroup"), cgroup).unwrap();
        };
        let own = "0::/\n";
        write("self", own);
        write("1", own);
        write("7", own);
        assert!(
            !sees_host_processes(proc.path()),
            "the agent's own container only"
        );
        write("812", "0::/../../../system.slice/kubelet.service\n");
        assert!(sees_host_processes(proc.path()));
        assert!(!sees_host_processes(&proc.path().join("missing")));
    }

    #[test]
    fn the_node_holding_a_socket_is_the_node() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let std::net::SocketAddr::V4(local) = client.local_addr().unwrap() else {
            panic!("IPv4 expected")
        };
        let std::net::SocketAddr::V4(remote) = client.peer_addr().unwrap() else {
            panic!("IPv4 expected")
        };
        let lookup = Lookup::new("/proc", Duration::from_secs(10));
        // This test process is in no pod: it is the node.
        assert_eq!(
            lookup.host(local, remote, &[std::process::id()]),
            Some(Attestation::Node)
        );
        // A socket that is not in this network namespace is not a host caller's.
        let elsewhere = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 9), 40000);
        assert_eq!(lookup.host(elsewhere, remote, &[]), None);
        drop(client);
    }
}
