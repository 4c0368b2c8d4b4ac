//! The NAT in front of a node, as its relays see it. Each relay answers a node's QUIC address
//! discovery with the public address the node's packets came from. With two relays or more
//! (on different addresses), the answers tell how the NAT maps the node's socket:
//!
//! - the relays see different ports: the mapping depends on the destination
//!   ([`NatType::EndpointDependent`], a symmetric NAT), so a peer cannot reuse the address a
//!   relay saw, and hole punching works only towards a peer whose NAT is not as strict;
//! - the same address, which is one of the node's own: no NAT ([`NatType::None`]);
//! - the same address, not the node's: one mapping whatever the destination
//!   ([`NatType::EndpointIndependent`], full or restricted cone), what hole punching needs.
//!
//! With one relay, or before two answered, nothing can be told ([`NatType::Unknown`]).
//! [`classify`] decides from the observations alone; the node watches iroh's reports and
//! keeps the answer ([`crate::Node::nat_type`]).

use std::fmt;
use std::net::{SocketAddr, UdpSocket};

/// How the NAT in front of a node maps its UDP socket, as far as its relays can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum NatType {
    /// Not known: fewer than two relays answered.
    #[default]
    Unknown,
    /// No NAT: the relays see the node at its own address.
    None,
    /// One public address whatever the destination (endpoint-independent mapping: full cone
    /// or restricted cone NAT).
    EndpointIndependent,
    /// A public address per destination (endpoint-dependent mapping: symmetric NAT).
    EndpointDependent,
}

impl NatType {
    /// The name used in metrics and logs: `unknown`, `none`, `endpoint_independent`,
    /// `endpoint_dependent`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::None => "none",
            Self::EndpointIndependent => "endpoint_independent",
            Self::EndpointDependent => "endpoint_dependent",
        }
    }

    /// Every type, in the order of their names above.
    pub const ALL: [Self; 4] = [
        Self::Unknown,
        Self::None,
        Self::EndpointIndependent,
        Self::EndpointDependent,
    ];
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the relays' address discovery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct MappingReport {
    /// The public address the first relay to answer saw.
    pub public: Option<SocketAddr>,
    /// Whether another relay saw a different address; `None` until two answered.
    pub varies_by_destination: Option<bool>,
}

impl MappingReport {
    /// A report of `public` and whether it varies by destination.
    pub fn new(public: Option<SocketAddr>, varies_by_destination: Option<bool>) -> Self {
        Self {
            public,
            varies_by_destination,
        }
    }
}

/// The NAT type that `report` shows, for a node whose sockets are at `local` (addresses with
/// the IP of an interface, not unspecified ones).
pub fn classify(report: &MappingReport, local: &[SocketAddr]) -> NatType {
    match (report.varies_by_destination, report.public) {
        (Some(true), _) => NatType::EndpointDependent,
        (Some(false), Some(public)) if local.contains(&public) => NatType::None,
        (Some(false), Some(_)) => NatType::EndpointIndependent,
        _ => NatType::Unknown,
    }
}

/// The node's socket addresses to compare with `public`: the bound ones, and for one bound to
/// an unspecified IP, `public`'s IP with the bound port when that IP is the machine's own (a
/// socket can be bound to it).
pub(crate) fn local_addrs(bound: &[SocketAddr], public: Option<SocketAddr>) -> Vec<SocketAddr> {
    let mut local: Vec<SocketAddr> = bound.to_vec();
    if let Some(public) = public {
        let own = bound
            .iter()
            .any(|b| b.ip().is_unspecified() && b.is_ipv4() == public.is_ipv4())
            && UdpSocket::bind(SocketAddr::new(public.ip(), 0)).is_ok();
        if own {
            local.extend(
                bound
                    .iter()
                    .filter(|b| b.ip().is_unspecified() && b.is_ipv4() == public.is_ipv4())
                    .map(|b| SocketAddr::new(public.ip(), b.port())),
            );
        }
    }
    local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn two_relays_tell_the_mapping() {
        let local = [addr("10.0.1.2:4000")];
        let seen = Some(addr("203.0.113.7:61000"));
        assert_eq!(
            classify(&MappingReport::new(seen, Some(true)), &local),
            NatType::EndpointDependent
        );
        assert_eq!(
            classify(&MappingReport::new(seen, Some(false)), &local),
            NatType::EndpointIndependent
        );
        assert_eq!(
            classify(
                &MappingReport::new(Some(addr("10.0.1.2:4000")), Some(false)),
                &local
            ),
            NatType::None
        );
        // The same IP on another port: a NAT that keeps the address but not the port.
        assert_eq!(
            classify(
                &MappingReport::new(Some(addr("10.0.1.2:4001")), Some(false)),
                &local
            ),
            NatType::EndpointIndependent
        );
    }

    #[test]
    fn one_answer_tells_nothing() {
        let local = [addr("10.0.1.2:4000")];
        assert_eq!(
            classify(
                &MappingReport::new(Some(addr("10.0.1.2:4000")), None),
                &local
            ),
            NatType::Unknown
        );
        assert_eq!(
            classify(&MappingReport::default(), &local),
            NatType::Unknown
        );
        assert_eq!(NatType::default(), NatType::Unknown);
    }

    #[test]
    fn an_unspecified_bind_counts_when_the_public_ip_is_ours() {
        let bound = [addr("0.0.0.0:4000")];
        let local = local_addrs(&bound, Some(addr("127.0.0.1:4000")));
        assert!(local.contains(&addr("127.0.0.1:4000")), "{local:?}");
        // 192.0.2.0/24 is for documentation: not this machine's.
        let local = local_addrs(&bound, Some(addr("192.0.2.1:4000")));
        assert_eq!(local, bound);
    }

    #[test]
    fn names_are_stable() {
        let names: Vec<_> = NatType::ALL.iter().map(|t| t.to_string()).collect();
        assert_eq!(
            names,
            [
                "unknown",
                "none",
                "endpoint_independent",
                "endpoint_dependent"
            ]
        );
    }
}
