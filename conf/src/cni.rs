//! The CNI protocol (spec 1.1.0, with results also in 1.0.0, 0.4.0 and 0.3.x).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::ipam::IpamConfig;

/// Versions whose configuration warren accepts and whose results it can produce.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest supported version, used for errors when the request's is unknown.
pub const LATEST_VERSION: &str = "1.1.0";

/// The spec's well-known error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot currently add containers.
    NotAvailable = 50,
    /// STATUS: the plugin can add containers, with limited connectivity.
    LimitedConnectivity = 51,
    /// Anything else: plugin-specific codes start at 100.
    Internal = 100,
}

/// A CNI error: what goes to stdout as `{"cniVersion","code","msg","details"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code as u32, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

fn decode(msg: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(ErrorCode::Decode, msg).with_details(e.to_string())
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg)
}

/// Runtime-supplied values, from the `capabilities` the plugin declares.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// The `ips` capability: specific addresses requested for this attachment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
}

/// One plugin's configuration as the runtime hands it to warren (a conflist entry with
/// `name` and `cniVersion` filled in, plus `runtimeConfig` and `prevResult`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// MTU of the pod's interface and its host veth. warren-node renders it; absent → 1480.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Prefix of the host-side veth name (default `cali`).
    #[serde(default)]
    pub veth_prefix: Option<String>,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub log_file: Option<String>,
    pub ipam: Option<IpamSection>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub capabilities: Option<Map<String, Value>>,
    /// Address of warren-node's local endpoint for the fail-closed handshake (future).
    #[serde(default)]
    pub node_socket: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The `ipam` section, kept raw as well so that a delegated IPAM plugin gets it verbatim.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct IpamSection {
    #[serde(rename = "type")]
    pub ipam_type: String,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// Default pod MTU when the configuration gives none: a 1500-byte underlay minus IPIP's 20.
pub const DEFAULT_MTU: u32 = 1480;
/// The in-process IPAM type.
pub const WARREN_IPAM: &str = "warren-ipam";

impl NetConf {
    /// Parses and validates one plugin configuration from stdin bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf =
            serde_json::from_slice(bytes).map_err(|e| decode("failed to decode network configuration", e))?;
        conf.validate()?;
        Ok(conf)
    }

    pub fn validate(&self) -> Result<(), CniError> {
        if !SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("unsupported cniVersion {:?}", self.cni_version),
            )
            .with_details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        if self.name.is_empty() {
            return Err(invalid("network configuration has an empty \"name\""));
        }
        if let Some(mtu) = self.mtu {
            if !(576..=65535).contains(&mtu) {
                return Err(invalid(format!("mtu {mtu} is out of range (576..=65535)")));
            }
        }
        crate::names::host_veth_name(self.veth_prefix(), "x").map_err(|e| invalid(format!("vethPrefix: {e}")))?;
        if self.ipam.is_none() {
            return Err(invalid("network configuration has no \"ipam\" section"));
        }
        Ok(())
    }

    pub fn mtu(&self) -> u32 {
        self.mtu.unwrap_or(DEFAULT_MTU)
    }

    pub fn veth_prefix(&self) -> &str {
        self.veth_prefix.as_deref().unwrap_or(crate::names::HOST_VETH_PREFIX)
    }

    /// The IPAM section parsed as warren-ipam's (host-local's) schema.
    pub fn warren_ipam(&self) -> Result<IpamConfig, CniError> {
        let section = self
            .ipam
            .as_ref()
            .ok_or_else(|| invalid("network configuration has no \"ipam\" section"))?;
        let raw = serde_json::to_value(section).map_err(|e| decode("ipam section", e))?;
        IpamConfig::from_value(raw).map_err(|e| invalid(format!("ipam: {e}")))
    }

    /// Specific addresses the runtime asked for, from the `ips` capability.
    pub fn requested_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        self.runtime_config
            .ips
            .iter()
            .map(|s| parse_ip_or_cidr(s).map_err(|e| invalid(format!("runtimeConfig.ips: {e}"))))
            .collect()
    }
}

/// Parses `10.0.0.5` or `10.0.0.5/24` to the address.
pub fn parse_ip_or_cidr(s: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip);
    }
    s.parse::<IpNet>()
        .map(|n| n.addr())
        .map_err(|_| format!("{s:?} is not an IP address"))
}

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    /// Netns path for container-side interfaces; empty for host-side ones.
    pub sandbox: String,
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    pub interface: Option<usize>,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// A result, independent of the version it is written in.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Value,
}

fn is_v1(version: &str) -> bool {
    version.starts_with("1.")
}

impl CniResult {
    /// Writes the result in the requested version's shape.
    pub fn to_json(&self, version: &str) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({ "name": i.name });
                if !i.mac.is_empty() {
                    v["mac"] = json!(i.mac);
                }
                if let (Some(mtu), true) = (i.mtu, is_v1(version)) {
                    v["mtu"] = json!(mtu);
                }
                if !i.sandbox.is_empty() {
                    v["sandbox"] = json!(i.sandbox);
                }
                v
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({ "address": ip.address.to_string() });
                if !is_v1(version) {
                    v["version"] = json!(if ip.address.addr().is_ipv4() { "4" } else { "6" });
                }
                if let Some(gw) = ip.gateway {
                    v["gateway"] = json!(gw.to_string());
                }
                if let Some(idx) = ip.interface {
                    v["interface"] = json!(idx);
                }
                v
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut v = json!({ "dst": r.dst.to_string() });
                if let Some(gw) = r.gw {
                    v["gw"] = json!(gw.to_string());
                }
                v
            })
            .collect();
        let mut out = json!({ "cniVersion": version, "ips": ips });
        if !interfaces.is_empty() {
            out["interfaces"] = Value::Array(interfaces);
        }
        if !routes.is_empty() {
            out["routes"] = Value::Array(routes);
        }
        out["dns"] = if self.dns.is_null() {
            json!({})
        } else {
            self.dns.clone()
        };
        out
    }

    /// Reads a result of any supported version (a prevResult, or a delegated IPAM plugin's output).
    pub fn from_json(v: &Value) -> Result<Self, CniError> {
        let err = |m: &str| CniError::new(ErrorCode::Decode, format!("malformed result: {m}"));
        let mut res = CniResult {
            dns: v.get("dns").cloned().unwrap_or(Value::Null),
            ..Default::default()
        };
        if let Some(ifs) = v.get("interfaces").and_then(Value::as_array) {
            for i in ifs {
                res.interfaces.push(Interface {
                    name: i
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| err("interface without name"))?
                        .to_string(),
                    mac: i.get("mac").and_then(Value::as_str).unwrap_or_default().to_string(),
                    mtu: i.get("mtu").and_then(Value::as_u64).and_then(|m| u32::try_from(m).ok()),
                    sandbox: i.get("sandbox").and_then(Value::as_str).unwrap_or_default().to_string(),
                });
            }
        }
        if let Some(ips) = v.get("ips").and_then(Value::as_array) {
            for ip in ips {
                let address = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<IpNet>().ok())
                    .ok_or_else(|| err("ip without a valid address"))?;
                let gateway = match ip.get("gateway").and_then(Value::as_str) {
                    Some(g) => Some(g.parse::<IpAddr>().map_err(|_| err("bad gateway"))?),
                    None => None,
                };
                let interface = ip
                    .get("interface")
                    .and_then(Value::as_u64)
                    .and_then(|i| usize::try_from(i).ok());
                res.ips.push(IpConfig {
                    address,
                    gateway,
                    interface,
                });
            }
        }
        if let Some(routes) = v.get("routes").and_then(Value::as_array) {
            for r in routes {
                let dst = r
                    .get("dst")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<IpNet>().ok())
                    .ok_or_else(|| err("route without a valid dst"))?;
                let gw = match r.get("gw").and_then(Value::as_str) {
                    Some(g) => Some(g.parse::<IpAddr>().map_err(|_| err("bad route gw"))?),
                    None => None,
                };
                res.routes.push(Route { dst, gw });
            }
        }
        Ok(res)
    }
}

/// The answer to VERSION.
pub fn version_info(cni_version: &str) -> Value {
    json!({ "cniVersion": cni_version, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"warren","ipam":{{"type":"warren-ipam","ranges":[[{{"subnet":"10.233.90.0/24"}}]]}}{extra}}}"#
        )
    }

    #[test]
    fn should_parse_a_minimal_config_with_defaults() {
        let c = NetConf::parse(conf("").as_bytes()).unwrap();
        assert_eq!(c.mtu(), 1480);
        assert_eq!(c.veth_prefix(), "cali");
        assert_eq!(c.ipam.as_ref().unwrap().ipam_type, "warren-ipam");
    }

    #[test]
    fn should_refuse_garbage_with_decode_code() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, ErrorCode::Decode);
    }

    #[test]
    fn should_refuse_unknown_versions_with_code_1() {
        let c = conf("").replace("1.0.0", "9.9.9");
        assert_eq!(
            NetConf::parse(c.as_bytes()).unwrap_err().code,
            ErrorCode::IncompatibleVersion
        );
    }

    #[test]
    fn should_refuse_bad_mtu_and_prefix() {
        assert_eq!(
            NetConf::parse(conf(r#","mtu":10"#).as_bytes()).unwrap_err().code,
            ErrorCode::InvalidConfig
        );
        assert_eq!(
            NetConf::parse(conf(r#","vethPrefix":"waytoolongprefix""#).as_bytes())
                .unwrap_err()
                .code,
            ErrorCode::InvalidConfig
        );
    }

    #[test]
    fn should_write_results_per_version() {
        let r = CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                mtu: Some(1480),
                sandbox: "/var/run/netns/x".into(),
            }],
            ips: vec![IpConfig {
                address: "10.233.90.5/32".parse().unwrap(),
                gateway: None,
                interface: Some(0),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Value::Null,
        };
        let v1 = r.to_json("1.0.0");
        assert!(v1["ips"][0].get("version").is_none());
        assert_eq!(v1["interfaces"][0]["mtu"], 1480);
        let v04 = r.to_json("0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        assert!(v04["interfaces"][0].get("mtu").is_none());
        assert_eq!(CniResult::from_json(&v04).unwrap().ips, r.ips);
        assert_eq!(CniResult::from_json(&v1).unwrap().routes, r.routes);
    }

    #[test]
    fn should_parse_requested_ips() {
        let c = NetConf::parse(conf(r#","runtimeConfig":{"ips":["10.233.90.32/24"]}"#).as_bytes()).unwrap();
        assert_eq!(
            c.requested_ips().unwrap(),
            vec!["10.233.90.32".parse::<IpAddr>().unwrap()]
        );
    }
}
