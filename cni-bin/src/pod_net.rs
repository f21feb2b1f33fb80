//! The pod's wiring: a veth pair (peer born in the pod's namespace), the pod's /32 address and
//! routes via 169.254.1.1, and the host side's route, proxy ARP and sysctls.
//!
//! Ownership: the host veth carries link group [`VETH_GROUP`] from its creation and the alias
//! `warren <network> <containerID> <ifname>` right after, so DEL finds its own veth even without
//! pod arguments, never deletes another container's veth that happens to share the pod name,
//! and GC can tell which attachment every veth belongs to.

use std::io;
use std::net::Ipv4Addr;

use conf::names::POD_GATEWAY;
use conf::{CniError, ErrorCode};

use crate::netlink::{Link, Netlink, NlError, RouteSpec, VethSpec};
use crate::netns::{write_sysctl, Netns};

/// Link group of every host veth warren creates ("WR" in ASCII), an ownership marker the
/// kernel applies atomically at creation.
pub const VETH_GROUP: u32 = 0x5752;

/// The alias naming the attachment a host veth belongs to.
pub fn owner_alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("warren {network} {container_id} {ifname}")
}

/// The (network, container ID, ifname) of an alias written by [`owner_alias`].
pub fn parse_owner_alias(alias: &str) -> Option<(&str, &str, &str)> {
    let rest = alias.strip_prefix("warren ")?;
    // The network name may contain spaces; container IDs and ifnames cannot.
    let (rest, ifname) = rest.rsplit_once(' ')?;
    let (network, cid) = rest.rsplit_once(' ')?;
    Some((network, cid, ifname))
}

/// Whether `link` is a host veth warren made for this network's prefix.
pub fn is_ours(link: &Link, prefix: &str) -> bool {
    link.group == VETH_GROUP && link.name.starts_with(prefix)
}

pub fn nl_error(e: NlError) -> CniError {
    let code = match e.errno() {
        Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::EINTR) => ErrorCode::TryAgainLater,
        _ => ErrorCode::Internal,
    };
    CniError::new(code, "netlink request failed").with_details(e.to_string())
}

pub fn io_error(what: &str, e: io::Error) -> CniError {
    CniError::new(ErrorCode::Io, what.to_string()).with_details(e.to_string())
}

/// Opens a netlink socket inside the pod's namespace.
pub fn pod_socket(ns: &Netns) -> Result<Netlink, CniError> {
    ns.run(Netlink::open)
        .map_err(|e| io_error("cannot enter the pod's network namespace", e))?
        .map_err(nl_error)
}

/// What the host side and the pod side look like once made.
#[derive(Debug, Clone)]
pub struct Wired {
    pub host: Link,
    pub pod: Link,
}

/// Creates the pair with the peer directly inside the pod's namespace.
pub fn create_pair(
    host: &mut Netlink,
    pod_ns: &Netns,
    host_name: &str,
    pod_ifname: &str,
    mtu: u32,
) -> Result<(), CniError> {
    host.create_veth(&VethSpec {
        host_name,
        peer_name: pod_ifname,
        mtu,
        group: VETH_GROUP,
        peer_netns: pod_ns.fd(),
    })
    .map_err(|e| match e.errno() {
        Some(libc::EEXIST) => CniError::new(
            ErrorCode::Internal,
            format!("interface {pod_ifname} (or {host_name}) already exists"),
        )
        .with_details(e.to_string()),
        _ => nl_error(e),
    })
}

/// Pod side: lo up, `ip/32` on the interface, `169.254.1.1 dev <if> scope link`, default via it,
/// plus any extra routes IPAM asked for.
pub fn configure_pod(
    pod: &mut Netlink,
    pod_ifname: &str,
    ip: Ipv4Addr,
    extra_routes: &[(Ipv4Addr, u8)],
) -> Result<Link, CniError> {
    let link = pod.link_by_name(pod_ifname).map_err(nl_error)?.ok_or_else(|| {
        CniError::new(
            ErrorCode::Internal,
            format!("{pod_ifname} vanished from the pod's namespace"),
        )
    })?;
    if let Some(lo) = pod.link_by_name("lo").map_err(nl_error)? {
        if !lo.up {
            pod.set_up(lo.index, None).map_err(nl_error)?;
        }
    }
    pod.set_up(link.index, None).map_err(nl_error)?;
    pod.add_address(link.index, ip.into(), 32).map_err(nl_error)?;
    pod.replace_route(&gateway_route(link.index)).map_err(nl_error)?;
    pod.replace_route(&default_route(link.index)).map_err(nl_error)?;
    for (dst, len) in extra_routes {
        pod.replace_route(&RouteSpec {
            dst: *dst,
            prefix_len: *len,
            gateway: Some(POD_GATEWAY),
            oif: link.index,
            onlink: true,
        })
        .map_err(nl_error)?;
    }
    Ok(Link { up: true, ..link })
}

pub fn gateway_route(oif: u32) -> RouteSpec {
    RouteSpec {
        dst: POD_GATEWAY,
        prefix_len: 32,
        gateway: None,
        oif,
        onlink: false,
    }
}

pub fn default_route(oif: u32) -> RouteSpec {
    RouteSpec {
        dst: Ipv4Addr::UNSPECIFIED,
        prefix_len: 0,
        gateway: Some(POD_GATEWAY),
        oif,
        onlink: true,
    }
}

pub fn host_route(ip: Ipv4Addr, oif: u32) -> RouteSpec {
    RouteSpec {
        dst: ip,
        prefix_len: 32,
        gateway: None,
        oif,
        onlink: false,
    }
}

/// The host-side sysctls, as Calico sets them on a workload interface (IPv4-only pods):
/// proxy ARP answers the pod's ARP for 169.254.1.1 without delay, forwarding is on for packets
/// from the pod, strict reverse-path filtering stops the pod from spoofing other sources, and
/// IPv6 is off so the interface does no DAD, router solicitation or MLD.
pub fn host_sysctls(ifname: &str) -> [(String, &'static str); 5] {
    [
        (format!("net/ipv4/conf/{ifname}/proxy_arp"), "1"),
        (format!("net/ipv4/neigh/{ifname}/proxy_delay"), "0"),
        (format!("net/ipv4/conf/{ifname}/forwarding"), "1"),
        (format!("net/ipv4/conf/{ifname}/rp_filter"), "1"),
        (format!("net/ipv6/conf/{ifname}/disable_ipv6"), "1"),
    ]
}

/// Host side: alias (ownership), up, sysctls. The host /32 route is a separate step.
pub fn configure_host(host: &mut Netlink, host_name: &str, alias: &str) -> Result<Link, CniError> {
    let link = host
        .link_by_name(host_name)
        .map_err(nl_error)?
        .ok_or_else(|| CniError::new(ErrorCode::Internal, format!("{host_name} vanished")))?;
    host.set_up(link.index, Some(alias)).map_err(nl_error)?;
    for (path, value) in host_sysctls(host_name) {
        match write_sysctl(&path, value) {
            Ok(()) => {}
            // A kernel without IPv6 has no such file, which is what we wanted anyway.
            Err(e) if e.kind() == io::ErrorKind::NotFound && path.starts_with("net/ipv6") => {}
            Err(e) => return Err(io_error(&format!("cannot set sysctl {path}"), e)),
        }
    }
    Ok(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_round_trip_owner_aliases() {
        let a = owner_alias("k8s-pod-network", "abc123", "eth0");
        assert_eq!(parse_owner_alias(&a), Some(("k8s-pod-network", "abc123", "eth0")));
        let spaced = owner_alias("my net", "c", "net1");
        assert_eq!(parse_owner_alias(&spaced), Some(("my net", "c", "net1")));
        assert_eq!(parse_owner_alias("someone else's alias"), None);
    }

    #[test]
    fn should_only_claim_links_with_our_group_and_prefix() {
        let mut l = Link {
            name: "cali0123456789a".into(),
            group: VETH_GROUP,
            ..Default::default()
        };
        assert!(is_ours(&l, "cali"));
        assert!(!is_ours(&l, "wrn"));
        l.group = 0;
        assert!(!is_ours(&l, "cali"));
    }

    #[test]
    fn should_set_calico_sysctls_on_the_host_veth() {
        let s = host_sysctls("cali1");
        assert!(s.contains(&("net/ipv4/conf/cali1/proxy_arp".to_string(), "1")));
        assert!(s.contains(&("net/ipv4/neigh/cali1/proxy_delay".to_string(), "0")));
    }
}
