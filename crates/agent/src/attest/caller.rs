//! Attestation as the endpoint asks for it: once per connection for where the caller is, and per request
//! for whether a pod-network caller is the pod its address names. The lookups are blocking `/proc` and
//! netlink reads, so they run on tokio's blocking pool, each bounded by the lookup's deadline.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::OnceCell;

use super::{Attestation, NodeCallers, PodUid, lookup::Lookup};
use crate::metrics::{Metrics, ResultLabels};

/// Where a connection's caller is, decided once for the connection's life (a socket does not move
/// between network namespaces, and the processes holding it are fixed when it connects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The caller's socket is in the node's own network namespace: a host-network pod or the node.
    Host(Attestation),
    /// The caller's socket is on a pod's network: its source address names a pod, which
    /// [`Attestor::pod_network`] checks per request.
    PodNetwork,
}

/// The attestation of one connection, filled by its first request: where its caller is, and for a
/// pod-network caller, the pod it was last checked against and the answer (a keep-alive connection asks
/// again only when its address has passed to another pod).
#[derive(Debug, Default)]
pub struct ConnectionAttestation {
    placement: OnceCell<Placement>,
    checked: Mutex<Option<(PodUid, Attestation)>>,
}

/// The endpoint's attestation of callers.
#[derive(Debug)]
pub struct Attestor {
    lookup: Arc<Lookup>,
    metadata: SocketAddrV4,
    /// What callers in no pod get.
    pub node_callers: NodeCallers,
    metrics: Arc<Metrics>,
}

impl Attestor {
    /// Attestation through `lookup` of connections whose callers dialled `metadata` (the intercepted
    /// address) or, connecting directly, the endpoint itself.
    pub fn new(
        lookup: Lookup,
        metadata: SocketAddrV4,
        node_callers: NodeCallers,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            lookup: Arc::new(lookup),
            metadata,
            node_callers,
            metrics,
        }
    }

    /// Where the caller of the connection `peer` → `local` is; looked up on the connection's first
    /// request, remembered in `connection` for the others.
    pub async fn placement(
        &self,
        connection: &ConnectionAttestation,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Placement {
        connection
            .placement
            .get_or_init(|| async {
                let (SocketAddr::V4(peer), SocketAddr::V4(local)) = (peer, local) else {
                    // The endpoint listens on IPv4 only; IMDS has no IPv6 address.
                    return Placement::Host(Attestation::Unknown("an IPv6 caller cannot be attested"));
                };
                let lookup = self.lookup.clone();
                let dialled = self.metadata;
                let placement = match self
                    .timed("host", move || {
                        // Intercepted callers dialled the metadata address; callers of the endpoint's own
                        // address (a host process connecting directly) dialled that.
                        lookup
                            .host(peer, dialled, &[])
                            .or_else(|| lookup.host(peer, local, &[]))
                    })
                    .await
                {
                    Some(Some(attestation)) => Placement::Host(attestation),
                    Some(None) => Placement::PodNetwork,
                    None => Placement::Host(Attestation::Unknown("the attestation could not run")),
                };
                if let Placement::Host(attestation) = &placement {
                    self.count(attestation);
                }
                placement
            })
            .await
            .clone()
    }

    /// Whether the caller `peer` of a pod-network connection to `local` is `owner`, the pod its address
    /// names: [`Attestation::Pod`], or [`Attestation::Spoofed`] when its socket is not in that pod's
    /// network namespace. A decided answer is remembered for the connection.
    pub async fn pod_network(
        &self,
        connection: &ConnectionAttestation,
        owner: &PodUid,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Attestation {
        let remembered = connection
            .checked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(checked, _)| checked == owner)
            .map(|(_, attestation)| attestation.clone());
        if let Some(attestation) = remembered {
            return attestation;
        }
        let attestation = self.check_pod_network(owner, peer, local).await;
        if !matches!(attestation, Attestation::Unknown(_)) {
            *connection.checked.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((owner.clone(), attestation.clone()));
        }
        attestation
    }

    async fn check_pod_network(&self, owner: &PodUid, peer: SocketAddr, local: SocketAddr) -> Attestation {
        let (SocketAddr::V4(peer), SocketAddr::V4(local)) = (peer, local) else {
            return Attestation::Unknown("an IPv6 caller cannot be attested");
        };
        let lookup = self.lookup.clone();
        let dialled = self.metadata;
        let owner = owner.clone();
        let attestation = self
            .timed("pod_network", move || {
                match lookup.pod_network(&owner, peer, dialled) {
                    Attestation::Spoofed { .. } => lookup.pod_network(&owner, peer, local),
                    other => other,
                }
            })
            .await
            .unwrap_or(Attestation::Unknown("the attestation could not run"));
        self.count(&attestation);
        attestation
    }

    async fn timed<T: Send + 'static>(
        &self,
        kind: &'static str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(work).await.ok();
        self.metrics
            .attestation_duration
            .get_or_create(&crate::metrics::KindLabels { kind })
            .observe(started.elapsed().as_secs_f64());
        result
    }

    fn count(&self, attestation: &Attestation) {
        let result = match attestation {
            Attestation::Pod(_) => "pod",
            Attestation::Node => "node",
            Attestation::Spoofed { .. } => "spoofed",
            Attestation::Unknown(_) => "unknown",
        };
        self.metrics
            .attestations
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, time::Duration};

    use super::*;

    fn attestor() -> Attestor {
        Attestor::new(
            Lookup::new("/proc", Duration::from_secs(10)),
            SocketAddrV4::new(std::net::Ipv4Addr::new(169, 254, 169, 254), 80),
            NodeCallers::Passthrough,
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test]
    async fn a_direct_caller_on_the_node_is_the_node_and_counted_once_per_connection() {
        let attestor = attestor();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        let connection = ConnectionAttestation::default();
        let local = listener.local_addr().unwrap();
        for _ in 0..3 {
            assert_eq!(
                attestor.placement(&connection, peer, local).await,
                Placement::Host(Attestation::Node)
            );
        }
        let metrics = attestor.metrics.render();
        assert!(
            metrics.contains("pod_identity_caller_attestations_total{result=\"node\"} 1"),
            "{metrics}"
        );
        drop(client);
    }

    #[tokio::test]
    async fn a_caller_whose_socket_is_not_on_the_node_is_on_a_pod_network() {
        let attestor = attestor();
        let connection = ConnectionAttestation::default();
        // No socket of this namespace has these ends: the caller is in another network namespace.
        let peer = SocketAddr::from(([10, 244, 0, 9], 40000));
        let local = SocketAddr::from(([169, 254, 79, 1], 2579));
        assert_eq!(
            attestor.placement(&connection, peer, local).await,
            Placement::PodNetwork
        );
        // A pod whose processes cannot be found is not decided, and not remembered as decided.
        let owner = "0d9e7c1a-5b2f-4e3d-9a8b-7c6d5e4f3a2b".to_owned();
        for _ in 0..2 {
            assert!(matches!(
                attestor.pod_network(&connection, &owner, peer, local).await,
                Attestation::Unknown(_)
            ));
        }
        assert!(connection.checked.lock().unwrap().is_none());
    }
}
