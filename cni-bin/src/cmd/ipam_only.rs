//! `warren-ipam` as a standalone IPAM plugin, with host-local's output shape.

use std::collections::HashMap;
use std::net::IpAddr;

use conf::cni::{CniResult, IpConfig, NetConf, Route};
use conf::{CniError, ErrorCode};
use serde_json::Value;

use crate::env::{CmdArgs, Command};
use crate::ipam_backend::ipam_error;

pub fn run(
    command: Command,
    args: &CmdArgs,
    conf: &NetConf,
    _env: &HashMap<String, String>,
    _stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    let cfg = conf.warren_ipam()?;
    let ipam = ipam::Ipam::open(&cfg, &conf.name).map_err(ipam_error)?;
    match command {
        Command::Add => {
            let mut requested = conf.requested_ips()?;
            requested.extend(args.args.ips.iter().copied());
            let allocs = ipam
                .allocate(&args.container_id, &args.ifname, &requested)
                .map_err(ipam_error)?;
            let result = CniResult {
                interfaces: Vec::new(),
                ips: allocs
                    .into_iter()
                    .map(|a| IpConfig {
                        address: a.ip,
                        gateway: a.gateway,
                        interface: None,
                    })
                    .collect(),
                routes: cfg.routes.iter().map(|r| Route { dst: r.dst, gw: r.gw }).collect(),
                dns: Value::Null,
            };
            Ok(Some(result.to_json(&conf.cni_version)))
        }
        Command::Del => ipam
            .release(&args.container_id, &args.ifname)
            .map(|_| None)
            .map_err(ipam_error),
        Command::Check => {
            let prev = conf
                .prev_result
                .as_ref()
                .ok_or_else(|| CniError::new(ErrorCode::InvalidConfig, "CHECK needs a prevResult"))?;
            let prev = CniResult::from_json(prev)?;
            let held = ipam.lookup(&args.container_id, &args.ifname).map_err(ipam_error)?;
            let missing: Vec<IpAddr> = prev
                .ips
                .iter()
                .map(|c| c.address.addr())
                .filter(|ip| !held.contains(ip))
                .collect();
            if missing.is_empty() {
                Ok(None)
            } else {
                Err(CniError::new(
                    ErrorCode::Internal,
                    format!(
                        "no reservation for {missing:?} held by {}/{}",
                        args.container_id, args.ifname
                    ),
                ))
            }
        }
        Command::Gc => {
            let keep = super::gc::valid_attachments(conf)?;
            ipam.gc(&keep).map(|_| None).map_err(ipam_error)
        }
        Command::Status => match ipam.available().map_err(ipam_error)? {
            0 => Err(CniError::new(
                ErrorCode::NotAvailable,
                "no IP addresses available in the pool",
            )),
            _ => Ok(None),
        },
        Command::Version => Ok(Some(conf::cni::version_info(&conf.cni_version))),
    }
}
