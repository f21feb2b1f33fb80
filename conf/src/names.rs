//! Ownership markers and naming rules.
//!
//! Everything warren creates in the kernel carries one of these markers so that a restarted
//! daemon knows what is its own and touches nothing else.

use sha1::{Digest, Sha1};

/// Default prefix of host-side veth names (Calico's, so that existing tooling and habits work).
pub const HOST_VETH_PREFIX: &str = "cali";
/// Number of hex characters of the SHA-1 that follow the prefix.
pub const VETH_HASH_LEN: usize = 11;
/// Linux limit on interface names (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// The IPIP tunnel device.
pub const TUNNEL_IFACE: &str = "tunl0";
/// Pods' default gateway: link-local, answered by proxy ARP on the host veth.
pub const POD_GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);
/// Prefix of every iptables chain warren owns.
pub const CHAIN_PREFIX: &str = "WARREN-";
/// Prefix of every ipset warren owns.
pub const IPSET_PREFIX: &str = "warren-";
/// Prefix of the comment on every rule warren inserts into a chain it does not own.
pub const RULE_COMMENT_PREFIX: &str = "warren:";
/// Route protocol number on every route warren-node programs (unused by iproute2's
/// rt_protos; Calico's felix uses 80 for the same purpose, so pick a distinct one).
pub const ROUTE_PROTO: u8 = 88;

/// The `size` a `list:set` of `members` sets is created with: a power of two, at least 8. A
/// list's name carries this class (see the policy compiler), so a list that outgrows its size
/// is another set, and a kernel that enforces the size never refuses a member.
pub fn list_set_size(members: usize) -> usize {
    members.next_power_of_two().max(8)
}
/// Name of the CNI network in the conflist warren-node renders.
pub const NETWORK_NAME: &str = "k8s-pod-network";
/// Conflist path on every node.
pub const CONFLIST_PATH: &str = "/etc/cni/net.d/10-warren.conflist";

/// The node's NodePort source (issue 6): the block's second address, kept out of IPAM. Service
/// traffic a node checked itself leaves through the tunnel with it, and peers trust it as
/// checked. (The first address is tunl0's.) `None` for blocks too small to spare it.
pub fn nodeport_source(block: ipnet::Ipv4Net) -> Option<std::net::Ipv4Addr> {
    (block.prefix_len() <= 29).then(|| std::net::Ipv4Addr::from(u32::from(block.network()) + 1))
}

/// The first address IPAM may hand to a pod: after tunl0's and the NodePort source.
pub fn first_pod_address(block: ipnet::Ipv4Net) -> std::net::Ipv4Addr {
    let skip = if nodeport_source(block).is_some() { 2 } else { 1 };
    std::net::Ipv4Addr::from(u32::from(block.network()) + skip)
}

/// Errors of the naming rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("interface name {0:?} is empty")]
    Empty(String),
    #[error("interface name {name:?} is {len} bytes long; Linux allows at most {max}")]
    TooLong { name: String, len: usize, max: usize },
    #[error("interface name {0:?} contains a character Linux refuses ('/', ':', whitespace or NUL) or is '.'/'..'")]
    BadChar(String),
    #[error("veth prefix {prefix:?} is too long: with {hash} hash characters the name would exceed {max} bytes")]
    PrefixTooLong { prefix: String, hash: usize, max: usize },
}

/// The host-side veth name of a workload: `prefix` + the first 11 hex characters of the SHA-1 of
/// `"<namespace>.<pod>"` (Calico's rule, so names match the ones users know from Calico
/// clusters). Without Kubernetes pod arguments, the container ID is hashed instead.
pub fn host_veth_name(prefix: &str, workload_key: &str) -> Result<String, NameError> {
    if prefix.len() + VETH_HASH_LEN > MAX_IFNAME_LEN {
        return Err(NameError::PrefixTooLong {
            prefix: prefix.to_string(),
            hash: VETH_HASH_LEN,
            max: MAX_IFNAME_LEN,
        });
    }
    let digest = Sha1::digest(workload_key.as_bytes());
    let hex = hex::encode(digest);
    let name = format!("{prefix}{}", &hex[..VETH_HASH_LEN]);
    validate_ifname(&name)?;
    Ok(name)
}

/// The key hashed into the veth name: `"<namespace>.<pod>"`, or the container ID.
pub fn workload_key(k8s_namespace: Option<&str>, k8s_pod: Option<&str>, container_id: &str) -> String {
    match (k8s_namespace, k8s_pod) {
        (Some(ns), Some(pod)) if !ns.is_empty() && !pod.is_empty() => format!("{ns}.{pod}"),
        _ => container_id.to_string(),
    }
}

/// Checks an interface name against the kernel's rules (dev_valid_name).
pub fn validate_ifname(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty(name.to_string()));
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(NameError::TooLong {
            name: name.to_string(),
            len: name.len(),
            max: MAX_IFNAME_LEN,
        });
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return Err(NameError::BadChar(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_keep_the_blocks_first_two_addresses_for_the_node() {
        let b: ipnet::Ipv4Net = "10.233.90.0/24".parse().unwrap();
        assert_eq!(nodeport_source(b), Some("10.233.90.1".parse().unwrap()));
        assert_eq!(
            first_pod_address(b),
            "10.233.90.2".parse::<std::net::Ipv4Addr>().unwrap()
        );
        let tiny: ipnet::Ipv4Net = "10.0.0.0/30".parse().unwrap();
        assert_eq!(nodeport_source(tiny), None);
        assert_eq!(
            first_pod_address(tiny),
            "10.0.0.1".parse::<std::net::Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn should_match_the_seed_veth_names() {
        let seed000 = workload_key(Some("tekton-pipelines"), Some("tekton-dashboard-75c65d785b-xbgk6"), "x");
        assert_eq!(host_veth_name("cali", &seed000).unwrap(), "cali73daeaf4b12");
        let seed003 = workload_key(Some("ingress"), Some("kuard-vnode-ingress-7b6868dd49-drldk"), "x");
        assert_eq!(host_veth_name("cali", &seed003).unwrap(), "calid3b581beed8");
    }

    #[test]
    fn should_fall_back_to_container_id_without_pod_args() {
        assert_eq!(workload_key(None, Some("p"), "abc"), "abc");
        assert_eq!(workload_key(Some(""), Some("p"), "abc"), "abc");
        assert_eq!(workload_key(Some("ns"), Some("p"), "abc"), "ns.p");
    }

    #[test]
    fn should_refuse_prefixes_that_overflow_ifnamsiz() {
        assert!(matches!(
            host_veth_name("toolongx", "a"),
            Err(NameError::PrefixTooLong { .. })
        ));
        assert_eq!(host_veth_name("wrn", "a").unwrap().len(), 14);
    }

    #[test]
    fn should_refuse_invalid_interface_names() {
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("..").is_err());
        assert!(validate_ifname("sixteen-chars-xx").is_err());
        assert!(validate_ifname("a b").is_err());
    }
}
