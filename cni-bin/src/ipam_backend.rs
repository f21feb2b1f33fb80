//! Address management for an attachment: warren-ipam in-process (the fast path), or any other
//! IPAM plugin executed from CNI_PATH as the spec describes.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use conf::cni::{CniResult, IpConfig, NetConf, Route, WARREN_IPAM};
use conf::{CniError, ErrorCode};
use ipnet::IpNet;
use serde_json::Value;

use crate::env::Command;

/// Addresses and routes an IPAM plugin handed out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IpamOutcome {
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Value,
}

/// Maps warren-ipam's errors to CNI codes.
pub fn ipam_error(e: ipam::Error) -> CniError {
    use ipam::Error as E;
    let code = if e.is_transient() {
        ErrorCode::TryAgainLater
    } else {
        match &e {
            E::Io { .. } => ErrorCode::Io,
            E::BadKey { .. } => ErrorCode::InvalidEnv,
            E::BadNetworkName { .. }
            | E::RequestedNotInRange { .. }
            | E::RequestedReserved { .. }
            | E::RequestedSameRangeSet { .. } => ErrorCode::InvalidConfig,
            E::LockTimeout { .. } => ErrorCode::TryAgainLater,
            _ => ErrorCode::Internal,
        }
    };
    CniError::new(code, "warren-ipam").with_details(e.to_string())
}

/// The IPAM side of one invocation.
pub enum IpamBackend<'a> {
    Local(ipam::Ipam),
    Delegate(Delegate<'a>),
}

/// An IPAM plugin binary run with the invocation's environment and configuration.
pub struct Delegate<'a> {
    pub plugin: PathBuf,
    pub env: &'a HashMap<String, String>,
    pub stdin: &'a [u8],
}

impl<'a> IpamBackend<'a> {
    pub fn new(
        conf: &NetConf,
        env: &'a HashMap<String, String>,
        cni_path: &[PathBuf],
        stdin: &'a [u8],
    ) -> Result<Self, CniError> {
        let section = conf.ipam.as_ref().ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "network configuration has no \"ipam\" section",
            )
        })?;
        if section.ipam_type == WARREN_IPAM {
            let cfg = conf.warren_ipam()?;
            let ipam = ipam::Ipam::open(&cfg, &conf.name).map_err(ipam_error)?;
            return Ok(Self::Local(ipam));
        }
        let plugin = find_plugin(&section.ipam_type, cni_path)?;
        Ok(Self::Delegate(Delegate { plugin, env, stdin }))
    }

    pub fn add(&mut self, container_id: &str, ifname: &str, requested: &[IpAddr]) -> Result<IpamOutcome, CniError> {
        match self {
            Self::Local(ipam) => {
                let allocs = ipam.allocate(container_id, ifname, requested).map_err(ipam_error)?;
                Ok(IpamOutcome {
                    ips: allocs
                        .into_iter()
                        .map(|a| IpConfig {
                            address: a.ip,
                            gateway: a.gateway,
                            interface: None,
                        })
                        .collect(),
                    routes: Vec::new(),
                    dns: Value::Null,
                })
            }
            Self::Delegate(d) => {
                let out = d.exec(Command::Add)?;
                let v: Value = serde_json::from_slice(&out).map_err(|e| {
                    CniError::new(ErrorCode::Decode, "IPAM plugin printed no valid result").with_details(e.to_string())
                })?;
                let r = CniResult::from_json(&v)?;
                Ok(IpamOutcome {
                    ips: r.ips,
                    routes: r.routes,
                    dns: r.dns,
                })
            }
        }
    }

    /// Releases whatever the attachment holds; idempotent.
    pub fn del(&mut self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        match self {
            Self::Local(ipam) => ipam.release(container_id, ifname).map_err(ipam_error),
            Self::Delegate(d) => d.exec(Command::Del).map(|_| Vec::new()),
        }
    }

    /// The addresses an attachment holds, when the backend can tell (the delegate answers CHECK instead).
    pub fn check(&mut self, container_id: &str, ifname: &str, expected: &[IpAddr]) -> Result<(), CniError> {
        match self {
            Self::Local(ipam) => {
                let held = ipam.lookup(container_id, ifname).map_err(ipam_error)?;
                for ip in expected {
                    if !held.contains(ip) {
                        return Err(CniError::new(
                            ErrorCode::Internal,
                            format!("IPAM holds no reservation of {ip} for {container_id}/{ifname}"),
                        )
                        .with_details(format!("reserved: {held:?}")));
                    }
                }
                Ok(())
            }
            Self::Delegate(d) => d.exec(Command::Check).map(drop),
        }
    }

    /// Releases every reservation not in `keep`; returns what was released (empty for a delegate).
    pub fn gc(&mut self, keep: &[(String, String)]) -> Result<Vec<IpAddr>, CniError> {
        match self {
            Self::Local(ipam) => ipam.gc(keep).map_err(ipam_error),
            Self::Delegate(d) => d.exec(Command::Gc).map(|_| Vec::new()),
        }
    }

    /// Ready to hand out an address?
    pub fn status(&mut self) -> Result<(), CniError> {
        match self {
            Self::Local(ipam) => {
                let free = ipam.available().map_err(|e| {
                    CniError::new(ErrorCode::NotAvailable, "IPAM store is not usable").with_details(e.to_string())
                })?;
                if free == 0 {
                    return Err(CniError::new(
                        ErrorCode::NotAvailable,
                        "no IP addresses available in the pool",
                    ));
                }
                Ok(())
            }
            Self::Delegate(d) => d.exec(Command::Status).map(drop),
        }
    }
}

/// Finds an IPAM plugin by its `type` in CNI_PATH; the type may not name a path.
pub fn find_plugin(plugin_type: &str, cni_path: &[PathBuf]) -> Result<PathBuf, CniError> {
    if plugin_type.is_empty() || plugin_type.contains('/') || plugin_type == "." || plugin_type == ".." {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            format!("invalid IPAM plugin type {plugin_type:?}"),
        ));
    }
    cni_path
        .iter()
        .map(|dir| dir.join(plugin_type))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidConfig,
                format!("IPAM plugin {plugin_type:?} not found in CNI_PATH"),
            )
            .with_details(format!("searched: {cni_path:?}"))
        })
}

/// Maps a numeric code from another plugin's error to ours.
pub fn error_code_from(code: u64) -> ErrorCode {
    match code {
        1 => ErrorCode::IncompatibleVersion,
        2 => ErrorCode::UnsupportedField,
        3 => ErrorCode::UnknownContainer,
        4 => ErrorCode::InvalidEnv,
        5 => ErrorCode::Io,
        6 => ErrorCode::Decode,
        7 => ErrorCode::InvalidConfig,
        11 => ErrorCode::TryAgainLater,
        50 => ErrorCode::NotAvailable,
        51 => ErrorCode::LimitedConnectivity,
        _ => ErrorCode::Internal,
    }
}

/// Runs a CNI plugin binary; returns its stdout on success, its error as ours otherwise.
pub fn exec_plugin(
    plugin: &Path,
    command: Command,
    env: &HashMap<String, String>,
    stdin: &[u8],
) -> Result<Vec<u8>, CniError> {
    let name = plugin.display().to_string();
    let mut child = Process::new(plugin)
        .env_clear()
        .envs(env)
        .env("CNI_COMMAND", command.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CniError::new(ErrorCode::Io, format!("cannot run {name}")).with_details(e.to_string()))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin)
            .map_err(|e| CniError::new(ErrorCode::Io, format!("cannot write to {name}")).with_details(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(ErrorCode::Io, format!("cannot wait for {name}")).with_details(e.to_string()))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(v) if v.get("code").is_some() => {
            let code = v.get("code").and_then(Value::as_u64).unwrap_or(100);
            let msg = v.get("msg").and_then(Value::as_str).unwrap_or("failed");
            let details = v.get("details").and_then(Value::as_str).unwrap_or_default();
            Err(CniError::new(error_code_from(code), format!("{name}: {msg}"))
                .with_details(format!("code {code}; {details}")))
        }
        _ => Err(
            CniError::new(ErrorCode::Internal, format!("{name} failed ({})", out.status)).with_details(format!(
                "stdout: {}; stderr: {stderr}",
                String::from_utf8_lossy(&out.stdout)
            )),
        ),
    }
}

impl Delegate<'_> {
    fn exec(&self, command: Command) -> Result<Vec<u8>, CniError> {
        exec_plugin(&self.plugin, command, self.env, self.stdin)
    }
}

/// Strips the subnet prefix: the pod's address is configured and reported as a host route.
pub fn as_host_net(net: IpNet) -> IpNet {
    IpNet::from(net.addr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_refuse_plugin_types_that_name_paths() {
        for bad in ["../bin/sh", "/bin/sh", "..", ""] {
            assert_eq!(
                find_plugin(bad, &[PathBuf::from("/usr/lib/cni")]).unwrap_err().code,
                ErrorCode::InvalidConfig
            );
        }
    }

    #[test]
    fn should_report_a_missing_plugin_as_invalid_config() {
        let e = find_plugin("no-such-plugin", &[PathBuf::from("/nonexistent")]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
    }

    #[test]
    fn should_map_foreign_error_codes() {
        assert_eq!(error_code_from(11), ErrorCode::TryAgainLater);
        assert_eq!(error_code_from(999), ErrorCode::Internal);
    }

    #[test]
    fn should_turn_a_subnet_address_into_a_host_address() {
        assert_eq!(
            as_host_net("10.233.90.7/24".parse().unwrap()).to_string(),
            "10.233.90.7/32"
        );
    }
}
