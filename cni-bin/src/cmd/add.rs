//! ADD: address, veth pair, routes, result; and on any failure (or panic) undo every step made.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use conf::cni::{CniResult, Interface, IpConfig, NetConf, Route};
use conf::names::{host_veth_name, POD_GATEWAY};
use conf::{CniError, ErrorCode};
use ipnet::IpNet;
use serde_json::Value;

use crate::env::CmdArgs;
use crate::faults::{Faults, Step};
use crate::ipam_backend::{IpamBackend, IpamOutcome};
use crate::netlink::Netlink;
use crate::netns::Netns;
use crate::pod_net::{self, nl_error};

/// What a failed ADD must undo, in reverse order of creation.
#[derive(Debug)]
enum Undo {
    ReleaseIp,
    DeleteHostVeth(String),
    DeleteHostRoute(Ipv4Addr, String),
}

pub fn add(
    args: &CmdArgs,
    conf: &NetConf,
    env: &HashMap<String, String>,
    stdin: &[u8],
    faults: &dyn Faults,
) -> Result<Value, CniError> {
    let mut requested = conf.requested_ips()?;
    requested.extend(args.args.ips.iter().copied());
    let host_if = host_veth_name(conf.veth_prefix(), &args.workload_key())
        .map_err(|e| CniError::new(ErrorCode::InvalidConfig, format!("host veth name: {e}")))?;
    let netns_path = args
        .netns
        .as_ref()
        .ok_or_else(|| CniError::new(ErrorCode::InvalidEnv, "CNI_NETNS is not set"))?;
    let pod_ns = Netns::open(netns_path).map_err(|e| {
        CniError::new(
            ErrorCode::InvalidEnv,
            format!("cannot open CNI_NETNS {}", netns_path.display()),
        )
        .with_details(e.to_string())
    })?;
    if pod_ns
        .is_current()
        .map_err(|e| pod_net::io_error("cannot inspect CNI_NETNS", e))?
    {
        // The peer would land next to the host side, and DEL would then delete host links.
        return Err(CniError::new(
            ErrorCode::InvalidEnv,
            format!(
                "CNI_NETNS {} is the plugin's own network namespace",
                netns_path.display()
            ),
        ));
    }
    let mut ipam = IpamBackend::new(conf, env, &args.cni_path, stdin)?;
    let mut host = Netlink::open().map_err(nl_error)?;

    let mut undo = Vec::new();
    let ctx = Ctx {
        args,
        conf,
        host_if: &host_if,
        pod_ns: &pod_ns,
        netns_path: &netns_path.display().to_string(),
        requested: &requested,
        faults,
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| ctx.steps(&mut ipam, &mut host, &mut undo)));
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            rollback(args, &mut ipam, &mut host, undo);
            Err(e)
        }
        Err(panic) => {
            rollback(args, &mut ipam, &mut host, undo);
            resume_unwind(panic)
        }
    }
}

struct Ctx<'a> {
    args: &'a CmdArgs,
    conf: &'a NetConf,
    host_if: &'a str,
    pod_ns: &'a Netns,
    netns_path: &'a str,
    requested: &'a [IpAddr],
    faults: &'a dyn Faults,
}

impl Ctx<'_> {
    fn steps(&self, ipam: &mut IpamBackend<'_>, host: &mut Netlink, undo: &mut Vec<Undo>) -> Result<Value, CniError> {
        let (args, conf, faults) = (self.args, self.conf, self.faults);
        // Registered first: release is idempotent and only touches this attachment's reservations.
        undo.push(Undo::ReleaseIp);
        let got = ipam.add(&args.container_id, &args.ifname, self.requested)?;
        faults.after(Step::IpamAllocated)?;
        let ip = pick_ipv4(&got)?;

        if let Some(stale) = host.link_by_name(self.host_if).map_err(nl_error)? {
            tracing::info!(link = %stale.name, alias = ?stale.alias, "removing stale host veth");
            match host.delete_link(stale.index) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(nl_error(e)),
            }
        }
        faults.after(Step::StaleRemoved)?;

        pod_net::create_pair(host, self.pod_ns, self.host_if, &args.ifname, conf.mtu())?;
        undo.push(Undo::DeleteHostVeth(self.host_if.to_string()));
        faults.after(Step::VethCreated)?;

        let extra: Vec<(Ipv4Addr, u8)> = got
            .routes
            .iter()
            .filter(|r| r.dst.prefix_len() > 0)
            .filter_map(|r| match r.dst {
                IpNet::V4(n) => Some((n.network(), n.prefix_len())),
                IpNet::V6(_) => None,
            })
            .collect();
        let mut pod = pod_net::pod_socket(self.pod_ns)?;
        let pod_link = pod_net::configure_pod(&mut pod, &args.ifname, ip, &extra)?;
        faults.after(Step::PodConfigured)?;

        let alias = pod_net::owner_alias(&conf.name, &args.container_id, &args.ifname);
        let host_link = pod_net::configure_host(host, self.host_if, &alias)?;
        faults.after(Step::HostConfigured)?;

        undo.push(Undo::DeleteHostRoute(ip, self.host_if.to_string()));
        host.replace_route(&pod_net::host_route(ip, host_link.index))
            .map_err(nl_error)?;
        faults.after(Step::HostRouteAdded)?;

        let result = build_result(conf, self.netns_path, &args.ifname, &host_link, &pod_link, ip, &got);
        let out = result.to_json(&conf.cni_version);
        faults.after(Step::ResultReady)?;
        tracing::info!(container = %args.container_id, %ip, veth = %self.host_if, "pod attached");
        Ok(out)
    }
}

/// warren wires exactly one IPv4 address per attachment (dual-stack is future work).
fn pick_ipv4(got: &IpamOutcome) -> Result<Ipv4Addr, CniError> {
    let v4: Vec<Ipv4Addr> = got
        .ips
        .iter()
        .filter_map(|c| match c.address.addr() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .collect();
    if got.ips.len() != 1 || v4.len() != 1 {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "warren needs exactly one IPv4 range set; IPv6 and multiple addresses are not supported yet",
        )
        .with_details(format!(
            "IPAM returned {:?}",
            got.ips.iter().map(|c| c.address).collect::<Vec<_>>()
        )));
    }
    Ok(v4[0])
}

fn build_result(
    conf: &NetConf,
    netns: &str,
    ifname: &str,
    host: &crate::netlink::Link,
    pod: &crate::netlink::Link,
    ip: Ipv4Addr,
    got: &IpamOutcome,
) -> CniResult {
    let mut routes = vec![Route {
        dst: IpNet::V4(ipnet::Ipv4Net::default()),
        gw: Some(IpAddr::V4(POD_GATEWAY)),
    }];
    for r in &got.routes {
        if r.dst.prefix_len() > 0 && r.dst.addr().is_ipv4() {
            routes.push(Route {
                dst: r.dst,
                gw: Some(IpAddr::V4(POD_GATEWAY)),
            });
        }
    }
    CniResult {
        interfaces: vec![
            Interface {
                name: host.name.clone(),
                mac: host.mac.clone(),
                mtu: Some(conf.mtu()),
                sandbox: String::new(),
            },
            Interface {
                name: ifname.to_string(),
                mac: pod.mac.clone(),
                mtu: Some(conf.mtu()),
                sandbox: netns.to_string(),
            },
        ],
        ips: vec![IpConfig {
            address: IpNet::from(IpAddr::V4(ip)),
            gateway: None,
            interface: Some(1),
        }],
        routes,
        dns: got.dns.clone(),
    }
}

fn rollback(args: &CmdArgs, ipam: &mut IpamBackend<'_>, host: &mut Netlink, undo: Vec<Undo>) {
    for step in undo.into_iter().rev() {
        let res: Result<(), String> = match &step {
            Undo::DeleteHostRoute(ip, ifname) => match host.link_by_name(ifname) {
                Ok(Some(link)) => match host.delete_route(&pod_net::host_route(*ip, link.index)) {
                    Err(e) if !e.is_not_found() && e.errno() != Some(libc::ESRCH) => Err(e.to_string()),
                    _ => Ok(()),
                },
                Ok(None) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
            Undo::DeleteHostVeth(name) => match host.link_by_name(name) {
                // Deleting the host side takes the pod side and its routes with it.
                Ok(Some(link)) => host.delete_link(link.index).map_err(|e| e.to_string()),
                Ok(None) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
            Undo::ReleaseIp => ipam
                .del(&args.container_id, &args.ifname)
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = res {
            tracing::error!(?step, error = %e, "rollback step failed");
        }
    }
}
