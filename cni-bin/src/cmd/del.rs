//! DEL: idempotent; succeeds when the netns or the veth is already gone; collects every failure.

use std::collections::HashMap;

use conf::cni::NetConf;
use conf::names::host_veth_name;
use conf::{CniError, ErrorCode};

use crate::env::CmdArgs;
use crate::ipam_backend::IpamBackend;
use crate::netlink::{Link, Netlink};
use crate::pod_net::{self, nl_error};

pub fn del(args: &CmdArgs, conf: &NetConf, env: &HashMap<String, String>, stdin: &[u8]) -> Result<(), CniError> {
    let mut errors: Vec<CniError> = Vec::new();
    if let Err(e) = remove_host_veth(args, conf) {
        errors.push(e);
    }
    // The address is released even if the veth could not be removed: ADD replaces a stale
    // route to a reused address, while a leaked reservation would never come back.
    match IpamBackend::new(conf, env, &args.cni_path, stdin) {
        Ok(mut ipam) => {
            if let Err(e) = ipam.del(&args.container_id, &args.ifname) {
                errors.push(e);
            }
        }
        Err(e) => errors.push(e),
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => {
            let details = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            let code = errors[0].code;
            Err(CniError::new(code, "DEL failed").with_details(details))
        }
    }
}

/// Finds this attachment's host veth (by name, else by alias) and deletes it; the pod side and
/// the routes through it go with it.
fn remove_host_veth(args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
    let mut host = Netlink::open().map_err(nl_error)?;
    let alias = pod_net::owner_alias(&conf.name, &args.container_id, &args.ifname);
    let name = host_veth_name(conf.veth_prefix(), &args.workload_key())
        .map_err(|e| CniError::new(ErrorCode::InvalidConfig, format!("host veth name: {e}")))?;
    let mut victims: Vec<Link> = Vec::new();
    match host.link_by_name(&name).map_err(nl_error)? {
        Some(l) if l.alias.as_deref() == Some(alias.as_str()) => victims.push(l),
        // Made by a crashed ADD before its alias was set, or by a Calico-compatible predecessor.
        Some(l) if l.alias.is_none() && pod_net::is_ours(&l, conf.veth_prefix()) => victims.push(l),
        Some(l) => {
            tracing::info!(link = %l.name, alias = ?l.alias, "host veth of this name belongs to another attachment; kept");
        }
        None => {}
    }
    if victims.is_empty() {
        // Without pod arguments (or after a rename) the name differs; the alias still tells.
        victims = host
            .links()
            .map_err(nl_error)?
            .into_iter()
            .filter(|l| l.alias.as_deref() == Some(alias.as_str()))
            .collect();
    }
    for l in victims {
        match host.delete_link(l.index) {
            Ok(()) => tracing::info!(link = %l.name, "host veth deleted"),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(nl_error(e)),
        }
    }
    Ok(())
}
