//! CHECK: the interface, its address and the routes must still be what prevResult says.

use std::collections::HashMap;
use std::net::IpAddr;

use conf::cni::{CniResult, NetConf};
use conf::names::{host_veth_name, POD_GATEWAY};
use conf::{CniError, ErrorCode};

use crate::env::CmdArgs;
use crate::ipam_backend::IpamBackend;
use crate::netlink::{Netlink, Route4};
use crate::netns::Netns;
use crate::pod_net::{self, nl_error};

fn drift(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::Internal, msg)
}

pub fn check(args: &CmdArgs, conf: &NetConf, env: &HashMap<String, String>, stdin: &[u8]) -> Result<(), CniError> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(ErrorCode::InvalidConfig, "CHECK needs a prevResult"))?;
    let prev = CniResult::from_json(prev)?;
    let netns_path = args
        .netns
        .as_ref()
        .ok_or_else(|| CniError::new(ErrorCode::InvalidEnv, "CNI_NETNS is not set"))?;
    let netns_str = netns_path.display().to_string();
    let pod_idx = prev
        .interfaces
        .iter()
        .position(|i| i.name == args.ifname && (i.sandbox.is_empty() || i.sandbox == netns_str))
        .ok_or_else(|| drift(format!("prevResult has no interface {} in {netns_str}", args.ifname)))?;
    let ips: Vec<IpAddr> = prev
        .ips
        .iter()
        .filter(|c| c.interface.is_none_or(|i| i == pod_idx))
        .map(|c| c.address.addr())
        .collect();
    if ips.is_empty() {
        return Err(drift("prevResult has no address for the interface"));
    }

    let mut host = Netlink::open().map_err(nl_error)?;
    let host_name = host_veth_name(conf.veth_prefix(), &args.workload_key())
        .map_err(|e| CniError::new(ErrorCode::InvalidConfig, format!("host veth name: {e}")))?;
    let alias = pod_net::owner_alias(&conf.name, &args.container_id, &args.ifname);
    let host_link = host
        .link_by_name(&host_name)
        .map_err(nl_error)?
        .ok_or_else(|| drift(format!("host veth {host_name} is missing")))?;
    if host_link.alias.as_deref() != Some(alias.as_str()) {
        return Err(drift(format!("host veth {host_name} belongs to another attachment"))
            .with_details(format!("alias {:?}", host_link.alias)));
    }
    if !host_link.up {
        return Err(drift(format!("host veth {host_name} is down")));
    }
    if host_link.mtu != conf.mtu() {
        return Err(drift(format!(
            "host veth {host_name} has MTU {}, want {}",
            host_link.mtu,
            conf.mtu()
        )));
    }
    let host_routes = host.routes_v4().map_err(nl_error)?;
    for ip in &ips {
        let IpAddr::V4(v4) = ip else { continue };
        if !host_routes
            .iter()
            .any(|r| r.dst == *v4 && r.prefix_len == 32 && r.oif == Some(host_link.index) && r.gateway.is_none())
        {
            return Err(drift(format!("host route {v4}/32 dev {host_name} is missing")));
        }
    }

    let ns = Netns::open(netns_path).map_err(|e| {
        CniError::new(ErrorCode::InvalidEnv, format!("cannot open CNI_NETNS {netns_str}")).with_details(e.to_string())
    })?;
    let mut pod = pod_net::pod_socket(&ns)?;
    let link = pod
        .link_by_name(&args.ifname)
        .map_err(nl_error)?
        .ok_or_else(|| drift(format!("{} is missing in the pod", args.ifname)))?;
    if !link.up {
        return Err(drift(format!("{} is down in the pod", args.ifname)));
    }
    if link.mtu != conf.mtu() {
        return Err(drift(format!(
            "{} has MTU {}, want {}",
            args.ifname,
            link.mtu,
            conf.mtu()
        )));
    }
    let addrs = pod.addresses(link.index).map_err(nl_error)?;
    for ip in &ips {
        if !addrs.iter().any(|(a, len)| a == ip && *len == 32) {
            return Err(
                drift(format!("address {ip}/32 is missing on {} in the pod", args.ifname))
                    .with_details(format!("found {addrs:?}")),
            );
        }
    }
    let routes = pod.routes_v4().map_err(nl_error)?;
    let has = |want: &dyn Fn(&Route4) -> bool| routes.iter().any(want);
    if !has(&|r| r.prefix_len == 0 && r.gateway == Some(POD_GATEWAY) && r.oif == Some(link.index)) {
        return Err(drift(format!("default route via {POD_GATEWAY} is missing in the pod")));
    }
    if !has(&|r| r.prefix_len == 32 && r.dst == POD_GATEWAY && r.oif == Some(link.index)) {
        return Err(drift(format!(
            "route to {POD_GATEWAY} dev {} is missing in the pod",
            args.ifname
        )));
    }
    for want in prev.routes.iter().filter(|r| r.dst.prefix_len() > 0) {
        let ipnet::IpNet::V4(n) = want.dst else { continue };
        if !has(&|r| r.prefix_len == n.prefix_len() && r.dst == n.network() && r.oif == Some(link.index)) {
            return Err(drift(format!("route {} is missing in the pod", want.dst)));
        }
    }

    let mut ipam = IpamBackend::new(conf, env, &args.cni_path, stdin)?;
    ipam.check(&args.container_id, &args.ifname, &ips)
}
