//! GC (CNI 1.1): release every reservation and remove every host veth of this network that
//! belongs to no attachment in `cni.dev/valid-attachments`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use conf::cni::NetConf;
use conf::{CniError, ErrorCode};
use serde_json::Value;

use crate::env::CmdArgs;
use crate::ipam_backend::IpamBackend;
use crate::netlink::{Link, Netlink};
use crate::pod_net::{self, nl_error};

pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";

/// The `(containerID, ifname)` pairs the runtime still uses.
pub fn valid_attachments(conf: &NetConf) -> Result<Vec<(String, String)>, CniError> {
    let invalid = |m: &str| CniError::new(ErrorCode::InvalidConfig, m.to_string());
    let list = conf
        .extra
        .get(VALID_ATTACHMENTS)
        .ok_or_else(|| invalid("GC needs \"cni.dev/valid-attachments\""))?
        .as_array()
        .ok_or_else(|| invalid("\"cni.dev/valid-attachments\" is not a list"))?;
    list.iter()
        .map(|a| {
            let cid = a.get("containerID").and_then(Value::as_str);
            let ifname = a.get("ifname").and_then(Value::as_str);
            match (cid, ifname) {
                (Some(c), Some(i)) => Ok((c.to_string(), i.to_string())),
                _ => Err(invalid("a valid attachment lacks \"containerID\" or \"ifname\"")),
            }
        })
        .collect()
}

/// Which of our links are orphans (pure; unit-tested).
///
/// A link is ours when it carries our group and prefix. It is an orphan when its alias names an
/// attachment of this network that is not kept, or, lacking an alias (an ADD that died before
/// setting it), when no route points at it or the only ones point at released addresses.
pub fn orphans<'l>(
    links: &'l [Link],
    network: &str,
    prefix: &str,
    keep: &HashSet<(String, String)>,
    routed: &HashMap<u32, Vec<IpAddr>>,
    released: &HashSet<IpAddr>,
) -> Vec<&'l Link> {
    links
        .iter()
        .filter(|l| pod_net::is_ours(l, prefix))
        .filter(|l| match l.alias.as_deref().and_then(pod_net::parse_owner_alias) {
            Some((net, cid, ifname)) => net == network && !keep.contains(&(cid.to_string(), ifname.to_string())),
            None if l.alias.is_some() => false,
            None => routed
                .get(&l.index)
                .is_none_or(|ips| ips.iter().all(|ip| released.contains(ip))),
        })
        .collect()
}

pub fn gc(args: &CmdArgs, conf: &NetConf, env: &HashMap<String, String>, stdin: &[u8]) -> Result<(), CniError> {
    let keep_list = valid_attachments(conf)?;
    let mut ipam = IpamBackend::new(conf, env, &args.cni_path, stdin)?;
    let released: HashSet<IpAddr> = ipam.gc(&keep_list)?.into_iter().collect();
    if !released.is_empty() {
        tracing::info!(?released, "GC released addresses");
    }
    let keep: HashSet<(String, String)> = keep_list.into_iter().collect();
    let mut host = Netlink::open().map_err(nl_error)?;
    let links = host.links().map_err(nl_error)?;
    let mut routed: HashMap<u32, Vec<IpAddr>> = HashMap::new();
    for r in host.routes_v4().map_err(nl_error)? {
        if let (Some(oif), 32) = (r.oif, r.prefix_len) {
            routed.entry(oif).or_default().push(IpAddr::V4(r.dst));
        }
    }
    let mut errors = Vec::new();
    for l in orphans(&links, &conf.name, conf.veth_prefix(), &keep, &routed, &released) {
        match host.delete_link(l.index) {
            Ok(()) => tracing::info!(link = %l.name, alias = ?l.alias, "GC removed host veth"),
            Err(e) if e.is_not_found() => {}
            Err(e) => errors.push(format!("{}: {e}", l.name)),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(
            CniError::new(ErrorCode::Internal, "GC could not remove every orphaned veth")
                .with_details(errors.join("; ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, alias: Option<String>) -> Link {
        Link {
            index,
            name: name.into(),
            alias,
            group: pod_net::VETH_GROUP,
            ..Default::default()
        }
    }

    #[test]
    fn should_pick_only_unlisted_attachments_of_this_network() {
        let links = vec![
            link(1, "cali00000000001", Some(pod_net::owner_alias("net", "keep", "eth0"))),
            link(2, "cali00000000002", Some(pod_net::owner_alias("net", "gone", "eth0"))),
            link(
                3,
                "cali00000000003",
                Some(pod_net::owner_alias("other", "gone", "eth0")),
            ),
            link(4, "cali00000000004", None),
            link(5, "cali00000000005", None),
            link(6, "cali00000000006", Some("foreign alias".into())),
            Link {
                group: 0,
                ..link(7, "cali00000000007", None)
            },
        ];
        let keep: HashSet<_> = [("keep".to_string(), "eth0".to_string())].into();
        let live: IpAddr = "10.0.0.5".parse().unwrap();
        let routed: HashMap<u32, Vec<IpAddr>> = [(5, vec![live])].into();
        let got: Vec<u32> = orphans(&links, "net", "cali", &keep, &routed, &HashSet::new())
            .iter()
            .map(|l| l.index)
            .collect();
        assert_eq!(got, vec![2, 4]);
        let released: HashSet<IpAddr> = [live].into();
        let got: Vec<u32> = orphans(&links, "net", "cali", &keep, &routed, &released)
            .iter()
            .map(|l| l.index)
            .collect();
        assert_eq!(got, vec![2, 4, 5]);
    }
}
