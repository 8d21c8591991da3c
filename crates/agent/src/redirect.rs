//! Where intercepted traffic is sent: an address of the agent's own, on the node's loopback.
//!
//! aad-pod-identity's NMI DNATed pod traffic to `127.0.0.1`. The kernel drops packets that arrive on
//! another interface and are DNATed to `127.0.0.0/8` unless `net.ipv4.conf.all.route_localnet=1`; a
//! container cannot set that (`/proc/sys` is read-only), and only kube-proxy in iptables mode with
//! localhost node ports happens to set it. On nodes with nftables-mode kube-proxy or a kube-proxy
//! replacement the redirect then drops every pod's request. The other common targets have their own
//! faults: the node's address opens the agent's port to the network, and `REDIRECT` rewrites to the
//! incoming interface's address, which the host side of a pod's veth does not have with Azure CNI
//! (transparent mode) or Calico.
//!
//! So the agent puts a link-local address of its own, [`DEFAULT_REDIRECT_ADDRESS`], on `lo` (host
//! scope, needing only the NET_ADMIN the agent has anyway) and DNATs to it. An address on `lo` that is not
//! in `127.0.0.0/8` is an ordinary local address: packets from pods are delivered to it with no sysctl,
//! and it is never a source address for traffic leaving the node. Like the rules, the address is never
//! removed, so a stopped agent still leaves pods' connections to IMDS reset by the kernel.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The default redirect target: link-local (never routed off the node), outside the ranges other node
/// components use (169.254.169.0/24 of cloud metadata services, 169.254.170.0/24 of EKS and ECS agents,
/// 169.254.20.10 and 169.254.25.10 of node-local DNS caches, 169.254.1.1 of Calico).
pub const DEFAULT_REDIRECT_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 79, 1);

/// Index of `lo` in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// A redirect configuration that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    /// The listener would not receive what the rules redirect.
    #[error(
        "the agent listens on {listen} but intercepted traffic is redirected to {redirect}; leave \
         --nmi-listen-address unset (or 0.0.0.0) to listen where the traffic goes"
    )]
    ListenElsewhere {
        /// The listen address.
        listen: IpAddr,
        /// The redirect address.
        redirect: Ipv4Addr,
    },
    /// A loopback target without the sysctl that makes it reachable from pods.
    #[error(
        "redirecting to {0} needs net.ipv4.conf.all.route_localnet=1, which is 0 on this node (and a \
         container cannot set it); use a link-local address such as the default {DEFAULT_REDIRECT_ADDRESS}"
    )]
    LoopbackWithoutRouteLocalnet(Ipv4Addr),
}

/// Checks that traffic redirected to `redirect` reaches a listener on `listen`. `route_localnet` is the
/// node's `net.ipv4.conf.all.route_localnet` (needed only when `redirect` is in `127.0.0.0/8`).
pub fn check(redirect: Ipv4Addr, listen: IpAddr, route_localnet: bool) -> Result<(), RedirectError> {
    if !listen.is_unspecified() && listen != IpAddr::V4(redirect) {
        return Err(RedirectError::ListenElsewhere { listen, redirect });
    }
    if redirect.is_loopback() && !route_localnet {
        return Err(RedirectError::LoopbackWithoutRouteLocalnet(redirect));
    }
    Ok(())
}

/// Whether `address` must be added to `lo` (addresses of `127.0.0.0/8` are there already).
pub fn needs_address(address: Ipv4Addr) -> bool {
    !address.is_loopback()
}

/// Reads `net.ipv4.conf.all.route_localnet`.
pub fn route_localnet() -> io::Result<bool> {
    std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/route_localnet").map(|v| v.trim() == "1")
}

/// Adds `address/32` to `lo` with host scope, through rtnetlink. `Ok(true)` when it was added,
/// `Ok(false)` when it was there already. Needs CAP_NET_ADMIN in the node's network namespace.
pub fn ensure_on_loopback(address: Ipv4Addr) -> io::Result<bool> {
    let flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK;
    match address_request(RouteNetlinkMessage::NewAddress(loopback_address(address)), flags) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(error),
    }
}

/// Removes `address/32` from `lo` (for removing the interception after the agent is uninstalled).
/// `Ok(false)` when it was not there.
pub fn remove_from_loopback(address: Ipv4Addr) -> io::Result<bool> {
    match address_request(
        RouteNetlinkMessage::DelAddress(loopback_address(address)),
        NLM_F_REQUEST | NLM_F_ACK,
    ) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::AddrNotAvailable => Ok(false),
        Err(error) => Err(error),
    }
}

fn loopback_address(address: Ipv4Addr) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.prefix_len = 32;
    message.header.scope = AddressScope::Host;
    message.header.index = LOOPBACK_INDEX;
    message.attributes = vec![
        AddressAttribute::Local(IpAddr::V4(address)),
        AddressAttribute::Address(IpAddr::V4(address)),
    ];
    message
}

/// Sends one address request and reads its acknowledgement.
fn address_request(payload: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0)?;

    let mut reply = vec![0; 8192];
    let size = socket.recv(&mut &mut reply[..], 0)?;
    let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..size])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match answer.payload {
        NetlinkPayload::Error(error) => match error.code {
            None => Ok(()),
            Some(_) => Err(error.to_io()),
        },
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected rtnetlink answer: {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_link_local_and_not_loopback() {
        assert!(DEFAULT_REDIRECT_ADDRESS.is_link_local());
        assert!(needs_address(DEFAULT_REDIRECT_ADDRESS));
        assert!(!needs_address(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn the_listener_must_receive_what_is_redirected() {
        let redirect = DEFAULT_REDIRECT_ADDRESS;
        assert_eq!(check(redirect, IpAddr::V4(redirect), false), Ok(()));
        assert_eq!(check(redirect, IpAddr::V4(Ipv4Addr::UNSPECIFIED), false), Ok(()));
        assert_eq!(
            check(redirect, IpAddr::V4(Ipv4Addr::LOCALHOST), false),
            Err(RedirectError::ListenElsewhere {
                listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
                redirect
            })
        );
    }

    #[test]
    fn loopback_targets_need_route_localnet_which_containers_cannot_set() {
        let loopback = Ipv4Addr::LOCALHOST;
        assert_eq!(
            check(loopback, IpAddr::V4(loopback), false),
            Err(RedirectError::LoopbackWithoutRouteLocalnet(loopback))
        );
        assert_eq!(check(loopback, IpAddr::V4(loopback), true), Ok(()));
        assert_eq!(
            check(
                DEFAULT_REDIRECT_ADDRESS,
                IpAddr::V4(DEFAULT_REDIRECT_ADDRESS),
                false
            ),
            Ok(())
        );
    }
}
