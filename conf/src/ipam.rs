//! host-local's IPAM configuration schema, shared by `warren-ipam`.
//!
//! Kept identical to the reference plugin's so that a node moving from host-local keeps its
//! configuration and its on-disk allocations.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

/// host-local's default store location.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamConfigError {
    #[error("malformed ipam section: {0}")]
    Malformed(String),
    #[error("no ranges: give \"ranges\" or \"subnet\"")]
    NoRanges,
    #[error("range set {0} is empty")]
    EmptyRangeSet(usize),
    #[error("{what} {ip} is not inside subnet {subnet}")]
    OutsideSubnet {
        what: &'static str,
        ip: IpAddr,
        subnet: IpNet,
    },
    #[error("rangeStart {start} is after rangeEnd {end}")]
    StartAfterEnd { start: IpAddr, end: IpAddr },
    #[error("subnet {0} is too small to hand out addresses")]
    TooSmall(IpNet),
    #[error("ranges {0} and {1} overlap")]
    Overlap(IpNet, IpNet),
    #[error("range set mixes IPv4 and IPv6")]
    MixedFamilies,
}

/// One range of a range set, with host-local's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    /// First address handed out (default: network address + 1).
    pub range_start: IpAddr,
    /// Last address handed out (default: broadcast − 1 for IPv4, last address for IPv6).
    pub range_end: IpAddr,
    /// Excluded from allocation and reported as the result's gateway, when set.
    pub gateway: Option<IpAddr>,
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.subnet.contains(&ip)
            && ip_to_u128(ip) >= ip_to_u128(self.range_start)
            && ip_to_u128(ip) <= ip_to_u128(self.range_end)
    }
}

/// A set of ranges: one address is allocated from each set (one set per IP family, usually).
pub type RangeSet = Vec<Range>;

/// A route to hand back in the result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IpamRoute {
    pub dst: IpNet,
    #[serde(default)]
    pub gw: Option<IpAddr>,
}

/// The parsed and validated IPAM section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamConfig {
    pub ipam_type: String,
    pub range_sets: Vec<RangeSet>,
    pub routes: Vec<IpamRoute>,
    pub data_dir: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    subnet: IpNet,
    #[serde(default)]
    range_start: Option<IpAddr>,
    #[serde(default)]
    range_end: Option<IpAddr>,
    #[serde(default)]
    gateway: Option<IpAddr>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(rename = "type")]
    ipam_type: String,
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    #[serde(default)]
    subnet: Option<IpNet>,
    #[serde(default)]
    range_start: Option<IpAddr>,
    #[serde(default)]
    range_end: Option<IpAddr>,
    #[serde(default)]
    gateway: Option<IpAddr>,
    #[serde(default)]
    routes: Vec<IpamRoute>,
    #[serde(default)]
    data_dir: Option<String>,
}

pub fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub fn u128_to_ip(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(v & 0xffff_ffff).unwrap_or(0)))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

impl RawRange {
    fn canonicalize(self) -> Result<Range, IpamConfigError> {
        let subnet = self.subnet.trunc();
        let v4 = subnet.addr().is_ipv4();
        let net = ip_to_u128(subnet.network());
        let last = ip_to_u128(subnet.broadcast());
        // host-local: the network address is never handed out; for IPv4 neither is the broadcast
        // (except in /31 and /32, which have neither).
        let (def_start, def_end) = match (v4, subnet.prefix_len()) {
            (true, 32) | (true, 31) | (false, 128) | (false, 127) => (net, last),
            (true, _) => (net + 1, last - 1),
            (false, _) => (net + 1, last),
        };
        if def_start > def_end {
            return Err(IpamConfigError::TooSmall(subnet));
        }
        let check = |what: &'static str, ip: IpAddr| {
            if !subnet.contains(&ip) {
                Err(IpamConfigError::OutsideSubnet { what, ip, subnet })
            } else {
                Ok(ip)
            }
        };
        let start = match self.range_start {
            Some(ip) => check("rangeStart", ip)?,
            None => u128_to_ip(def_start, v4),
        };
        let end = match self.range_end {
            Some(ip) => check("rangeEnd", ip)?,
            None => u128_to_ip(def_end, v4),
        };
        if ip_to_u128(start) > ip_to_u128(end) {
            return Err(IpamConfigError::StartAfterEnd { start, end });
        }
        let gateway = match self.gateway {
            Some(gw) => Some(check("gateway", gw)?),
            None => None,
        };
        Ok(Range {
            subnet,
            range_start: start,
            range_end: end,
            gateway,
        })
    }
}

impl IpamConfig {
    pub fn from_value(v: Value) -> Result<Self, IpamConfigError> {
        let raw: RawIpam = serde_json::from_value(v).map_err(|e| IpamConfigError::Malformed(e.to_string()))?;
        let mut raw_sets = raw.ranges;
        if let Some(subnet) = raw.subnet {
            raw_sets.insert(
                0,
                vec![RawRange {
                    subnet,
                    range_start: raw.range_start,
                    range_end: raw.range_end,
                    gateway: raw.gateway,
                }],
            );
        }
        if raw_sets.is_empty() {
            return Err(IpamConfigError::NoRanges);
        }
        let mut range_sets = Vec::with_capacity(raw_sets.len());
        for (i, set) in raw_sets.into_iter().enumerate() {
            if set.is_empty() {
                return Err(IpamConfigError::EmptyRangeSet(i));
            }
            let ranges = set
                .into_iter()
                .map(RawRange::canonicalize)
                .collect::<Result<Vec<_>, _>>()?;
            let fam = ranges[0].subnet.addr().is_ipv4();
            if ranges.iter().any(|r| r.subnet.addr().is_ipv4() != fam) {
                return Err(IpamConfigError::MixedFamilies);
            }
            range_sets.push(ranges);
        }
        let all: Vec<&Range> = range_sets.iter().flatten().collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                let overlap = ip_to_u128(a.range_start) <= ip_to_u128(b.range_end)
                    && ip_to_u128(b.range_start) <= ip_to_u128(a.range_end);
                if overlap && a.subnet.addr().is_ipv4() == b.subnet.addr().is_ipv4() {
                    return Err(IpamConfigError::Overlap(a.subnet, b.subnet));
                }
            }
        }
        Ok(IpamConfig {
            ipam_type: raw.ipam_type,
            range_sets,
            routes: raw.routes,
            data_dir: raw.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn should_apply_host_local_defaults() {
        let c = IpamConfig::from_value(json!({"type":"warren-ipam","ranges":[[{"subnet":"10.233.90.0/24"}]]})).unwrap();
        let r = &c.range_sets[0][0];
        assert_eq!(r.range_start, "10.233.90.1".parse::<IpAddr>().unwrap());
        assert_eq!(r.range_end, "10.233.90.254".parse::<IpAddr>().unwrap());
        assert_eq!(c.data_dir, DEFAULT_DATA_DIR);
        assert!(!r.contains("10.233.90.0".parse().unwrap()));
        assert!(!r.contains("10.233.90.255".parse().unwrap()));
    }

    #[test]
    fn should_accept_legacy_single_subnet() {
        let c = IpamConfig::from_value(json!({"type":"host-local","subnet":"10.1.0.0/16","rangeStart":"10.1.0.10","rangeEnd":"10.1.0.20","gateway":"10.1.0.1"})).unwrap();
        assert_eq!(c.range_sets.len(), 1);
        assert_eq!(c.range_sets[0][0].gateway, Some("10.1.0.1".parse().unwrap()));
    }

    #[test]
    fn should_refuse_bad_ranges() {
        assert_eq!(
            IpamConfig::from_value(json!({"type":"x"})).unwrap_err(),
            IpamConfigError::NoRanges
        );
        assert!(matches!(
            IpamConfig::from_value(json!({"type":"x","ranges":[[{"subnet":"10.0.0.0/24","rangeStart":"10.0.1.1"}]]}))
                .unwrap_err(),
            IpamConfigError::OutsideSubnet { .. }
        ));
        assert!(matches!(
            IpamConfig::from_value(
                json!({"type":"x","ranges":[[{"subnet":"10.0.0.0/24","rangeStart":"10.0.0.9","rangeEnd":"10.0.0.2"}]]})
            )
            .unwrap_err(),
            IpamConfigError::StartAfterEnd { .. }
        ));
        assert!(matches!(
            IpamConfig::from_value(
                json!({"type":"x","ranges":[[{"subnet":"10.0.0.0/24"},{"subnet":"10.0.0.128/25"}]]})
            )
            .unwrap_err(),
            IpamConfigError::Overlap(..)
        ));
        assert!(matches!(
            IpamConfig::from_value(json!({"type":"x","ranges":[[{"subnet":"nope"}]]})).unwrap_err(),
            IpamConfigError::Malformed(_)
        ));
    }
}
