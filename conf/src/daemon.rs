//! warren-node's configuration: the values flags and environment variables carry, parsed and
//! validated here so that every bad value is refused with a message naming it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::Ipv4Net;

/// Default IP pool (kubespray's `kube_pods_subnet`).
pub const DEFAULT_POOL: &str = "10.233.64.0/18";
/// Default block prefix length per node.
pub const DEFAULT_BLOCK_PREFIX: u8 = 24;
/// Default address of the health/metrics server (Calico's felix port).
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:9099";
/// Annotation on the Node recording the block warren claimed for it.
pub const BLOCK_ANNOTATION: &str = "warren.dev/block";
/// File name of the conflist (the last component of `names::CONFLIST_PATH`).
pub const CONFLIST_FILE: &str = "10-warren.conflist";
/// IPIP encapsulation overhead.
pub const IPIP_OVERHEAD: u32 = 20;

/// Errors of the daemon configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("pool {value:?} is not an IPv4 CIDR like 10.233.64.0/18: {reason}")]
    BadPool { value: String, reason: String },
    #[error("pool {value:?} has host bits set; did you mean {network}?")]
    PoolHostBits { value: String, network: String },
    #[error("block size /{block} is larger than the pool {pool} (a block must be /{min} or longer)")]
    BlockLargerThanPool { block: u8, pool: Ipv4Net, min: u8 },
    #[error("block size /{0} is out of range: use a prefix length between /16 and /30")]
    BadBlockPrefix(u8),
    #[error("IPIP mode {0:?} is not one of Always, CrossSubnet, Never")]
    BadIpipMode(String),
    #[error("iptables backend {0:?} is not one of auto, legacy, nft")]
    BadBackend(String),
    #[error("MTU {0} is out of range 576..=9000")]
    BadMtu(u32),
    #[error("node name is empty: pass --node-name, set NODENAME, or give the host a name")]
    EmptyNodeName,
    #[error("resync interval must be at least 1 second")]
    BadResync,
    #[error("NodePort policy {0:?} is not one of preserve-source, plain")]
    BadNodePortPolicy(String),
}

/// IPIP encapsulation mode, named as Calico names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpipMode {
    /// Every peer block through tunl0.
    #[default]
    Always,
    /// Direct route to peers on the same subnet, tunnel to the others.
    CrossSubnet,
    /// Direct routes only (peers must share an L2 segment).
    Never,
}

impl FromStr for IpipMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "always" => Ok(IpipMode::Always),
            "crosssubnet" | "cross-subnet" => Ok(IpipMode::CrossSubnet),
            "never" => Ok(IpipMode::Never),
            _ => Err(ConfigError::BadIpipMode(s.to_string())),
        }
    }
}

impl fmt::Display for IpipMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpipMode::Always => "Always",
            IpipMode::CrossSubnet => "CrossSubnet",
            IpipMode::Never => "Never",
        })
    }
}

/// Which iptables implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IptablesBackend {
    /// The one kube-proxy uses (the one holding `KUBE-` chains, else the one with more rules).
    #[default]
    Auto,
    Legacy,
    Nft,
}

impl FromStr for IptablesBackend {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(IptablesBackend::Auto),
            "legacy" => Ok(IptablesBackend::Legacy),
            "nft" | "nftables" => Ok(IptablesBackend::Nft),
            _ => Err(ConfigError::BadBackend(s.to_string())),
        }
    }
}

/// How NetworkPolicy ipBlocks see NodePort traffic forwarded from another node (issue 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodePortPolicy {
    /// The node that receives service traffic for a pod on another node checks that pod's
    /// ingress policy itself, against the client's own address, and sends what it allowed
    /// through the tunnel with its NodePort source, which the peers trust (issue 6).
    #[default]
    PreserveSource,
    /// Policy sees the source after kube-proxy's SNAT (the forwarding node's address), as in
    /// Calico.
    Plain,
}

impl FromStr for NodePortPolicy {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "preserve-source" => Ok(NodePortPolicy::PreserveSource),
            "plain" => Ok(NodePortPolicy::Plain),
            _ => Err(ConfigError::BadNodePortPolicy(s.to_string())),
        }
    }
}

impl fmt::Display for NodePortPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodePortPolicy::PreserveSource => "preserve-source",
            NodePortPolicy::Plain => "plain",
        })
    }
}

/// Parses a pool CIDR, refusing host bits so that a typo does not silently become another pool.
pub fn parse_pool(s: &str) -> Result<Ipv4Net, ConfigError> {
    let net: Ipv4Net = s
        .trim()
        .parse()
        .map_err(|e: ipnet::AddrParseError| ConfigError::BadPool {
            value: s.to_string(),
            reason: e.to_string(),
        })?;
    if net.trunc() != net {
        return Err(ConfigError::PoolHostBits {
            value: s.to_string(),
            network: net.trunc().to_string(),
        });
    }
    Ok(net)
}

/// Validated configuration of `warren-node run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    pub node_name: String,
    pub pool: Ipv4Net,
    pub block_prefix: u8,
    pub ipip_mode: IpipMode,
    /// Pod and tunl0 MTU; `None` = underlay MTU − 20.
    pub mtu: Option<u32>,
    pub nat_outgoing: bool,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub health_addr: SocketAddr,
    pub resync_interval: Duration,
    pub iptables_backend: IptablesBackend,
    pub nodeport_policy: NodePortPolicy,
}

impl DaemonConfig {
    /// Checks the relations between values that each parse on their own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.trim().is_empty() {
            return Err(ConfigError::EmptyNodeName);
        }
        if !(16..=30).contains(&self.block_prefix) {
            return Err(ConfigError::BadBlockPrefix(self.block_prefix));
        }
        if self.block_prefix < self.pool.prefix_len() {
            return Err(ConfigError::BlockLargerThanPool {
                block: self.block_prefix,
                pool: self.pool,
                min: self.pool.prefix_len(),
            });
        }
        if let Some(mtu) = self.mtu {
            if !(576..=9000).contains(&mtu) {
                return Err(ConfigError::BadMtu(mtu));
            }
        }
        if self.resync_interval < Duration::from_secs(1) {
            return Err(ConfigError::BadResync);
        }
        Ok(())
    }

    /// The conflist path inside the configured directory.
    pub fn conflist_path(&self) -> PathBuf {
        self.cni_conf_dir.join(CONFLIST_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DaemonConfig {
        DaemonConfig {
            node_name: "node1".into(),
            pool: parse_pool(DEFAULT_POOL).unwrap(),
            block_prefix: DEFAULT_BLOCK_PREFIX,
            ipip_mode: IpipMode::Always,
            mtu: None,
            nat_outgoing: true,
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dir: "/opt/cni/bin".into(),
            health_addr: DEFAULT_HEALTH_ADDR.parse().unwrap(),
            resync_interval: Duration::from_secs(10),
            iptables_backend: IptablesBackend::Auto,
            nodeport_policy: NodePortPolicy::default(),
        }
    }

    #[test]
    fn should_parse_nodeport_policy_and_default_to_preserve_source() {
        assert_eq!(NodePortPolicy::default(), NodePortPolicy::PreserveSource);
        assert_eq!("plain".parse(), Ok(NodePortPolicy::Plain));
        assert_eq!("Preserve-Source".parse(), Ok(NodePortPolicy::PreserveSource));
        let err = "snat".parse::<NodePortPolicy>().unwrap_err();
        assert!(err.to_string().contains("snat"), "{err}");
        assert_eq!(NodePortPolicy::Plain.to_string(), "plain");
    }

    #[test]
    fn should_accept_the_defaults() {
        cfg().validate().unwrap();
        assert_eq!(cfg().conflist_path(), PathBuf::from(crate::names::CONFLIST_PATH));
    }

    #[test]
    fn should_refuse_unparsable_pools_by_name() {
        let err = parse_pool("10.233.64.0/33").unwrap_err();
        assert!(err.to_string().contains("10.233.64.0/33"), "{err}");
        assert!(matches!(parse_pool("banana"), Err(ConfigError::BadPool { .. })));
        let err = parse_pool("10.233.64.1/18").unwrap_err();
        assert!(err.to_string().contains("10.233.64.0/18"), "{err}");
    }

    #[test]
    fn should_refuse_a_block_larger_than_the_pool() {
        let mut c = cfg();
        c.pool = parse_pool("10.0.0.0/26").unwrap();
        c.block_prefix = 24;
        let err = c.validate().unwrap_err();
        assert_eq!(
            err,
            ConfigError::BlockLargerThanPool {
                block: 24,
                pool: c.pool,
                min: 26
            }
        );
        assert!(err.to_string().contains("larger than the pool 10.0.0.0/26"));
    }

    #[test]
    fn should_refuse_bad_modes_mtus_and_names() {
        assert_eq!("crosssubnet".parse::<IpipMode>().unwrap(), IpipMode::CrossSubnet);
        assert_eq!("Never".parse::<IpipMode>().unwrap(), IpipMode::Never);
        assert!("Sometimes"
            .parse::<IpipMode>()
            .unwrap_err()
            .to_string()
            .contains("Sometimes"));
        assert!("iptables".parse::<IptablesBackend>().is_err());
        let mut c = cfg();
        c.mtu = Some(100);
        assert_eq!(c.validate(), Err(ConfigError::BadMtu(100)));
        let mut c = cfg();
        c.node_name = " ".into();
        assert_eq!(c.validate(), Err(ConfigError::EmptyNodeName));
        let mut c = cfg();
        c.block_prefix = 31;
        assert_eq!(c.validate(), Err(ConfigError::BadBlockPrefix(31)));
    }
}
