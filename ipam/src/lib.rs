//! warren-ipam: host-local-compatible IP address management, linked into the `warren` CNI
//! binary for its fast path.
//!
//! Same configuration schema ([`IpamConfig`], parsed by `conf`) and the same on-disk store as the
//! reference `host-local` plugin (see [`store`]), so either plugin can take over a node's
//! allocations from the other. On top of host-local: an `ADD` retry for a container that already
//! holds addresses gets them back instead of an error, all range sets are allocated or none, and
//! there are CNI `GC` ([`Ipam::gc`]) and `STATUS` ([`Ipam::available`]) operations.
//!
//! ```no_run
//! # fn main() -> ipam::Result<()> {
//! # let cfg: ipam::IpamConfig = todo!();
//! let ipam = ipam::Ipam::open(&cfg, "k8s-pod-network")?;
//! let got = ipam.allocate("0123abcd", "eth0", &[])?;
//! ipam.release("0123abcd", "eth0")?;
//! # let _ = got; Ok(()) }
//! ```

// Tests may unwrap: a panic with the error is the most useful failure report there.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use conf::ipam::IpamConfig;

mod allocator;
mod range;
pub mod store;

pub use allocator::Ipam;
pub use store::{DiskStore, MemStore, Owner, Reservation, Store};

/// One address handed to a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The address, with its range's subnet prefix length.
    pub ip: ipnet::IpNet,
    /// The range's configured gateway, if any.
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no IP addresses available in range set {range_set}: {ranges}")]
    Exhausted { range_set: usize, ranges: String },
    #[error("requested IP address {ip} is not available: reserved by {owner}")]
    RequestedUnavailable { ip: IpAddr, owner: String },
    #[error("requested IP address {ip} is not in any configured range")]
    RequestedNotInRange { ip: IpAddr },
    #[error("requested IP address {ip} is the {what} of its subnet and is never handed out")]
    RequestedReserved { ip: IpAddr, what: &'static str },
    #[error(
        "requested IP addresses {other} and {ip} fall into the same range set {range_set}: one address per range set"
    )]
    RequestedSameRangeSet {
        ip: IpAddr,
        other: IpAddr,
        range_set: usize,
    },
    #[error("{container_id}/{ifname} already holds {held} in range set {range_set}, not the requested {requested}")]
    AlreadyAllocated {
        container_id: String,
        ifname: String,
        held: IpAddr,
        requested: IpAddr,
        range_set: usize,
    },
    #[error("bad network name {name:?}: {reason} (it names the store directory)")]
    BadNetworkName { name: String, reason: &'static str },
    #[error("bad {what} {value:?}: {reason}")]
    BadKey {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {waited:?} waiting for the IPAM lock {}", path.display())]
    LockTimeout { path: PathBuf, waited: Duration },
}

impl Error {
    /// Whether retrying the same call later may succeed (CNI error code 11, "try again later").
    pub fn is_transient(&self) -> bool {
        match self {
            Error::LockTimeout { .. } => true,
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The network name becomes a directory under `dataDir`, so it must be exactly one path component.
/// (`..` is refused as a component; a name merely containing two dots, valid per the CNI spec, is
/// harmless.)
pub fn validate_network_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 255 {
        Some("longer than 255 bytes")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains('\0') {
        Some("contains NUL")
    } else if name == "." || name == ".." {
        Some("is '.' or '..'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::BadNetworkName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Container IDs and interface names are written into reservation files as `<id>\r\n<ifname>`,
/// so a line break or NUL inside either would forge or corrupt a record.
fn validate_key(container_id: &str, ifname: &str) -> Result<()> {
    let bad = |what: &'static str, value: &str, reason: &'static str| {
        Err(Error::BadKey {
            what,
            value: value.to_string(),
            reason,
        })
    };
    let has_forbidden = |s: &str| s.contains(['\r', '\n', '\0']);
    if container_id.trim().is_empty() {
        return bad("container ID", container_id, "empty");
    }
    if has_forbidden(container_id) {
        return bad("container ID", container_id, "contains CR, LF or NUL");
    }
    if ifname.is_empty() {
        return bad("interface name", ifname, "empty");
    }
    if has_forbidden(ifname) {
        return bad("interface name", ifname, "contains CR, LF or NUL");
    }
    // The stored record is compared after trimming (as host-local does), so surrounding
    // whitespace would make the reservation unfindable.
    if ifname.trim() != ifname {
        return bad("interface name", ifname, "has leading or trailing whitespace");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_validate_network_names() {
        let long = "n".repeat(256);
        let cases: &[(&str, bool)] = &[
            ("k8s-pod-network", true),
            ("a..b", true),
            ("net.v1_2", true),
            (&long[..255], true),
            ("", false),
            (".", false),
            ("..", false),
            ("../etc", false),
            ("a/b", false),
            ("a\0b", false),
            (&long, false),
        ];
        for (name, ok) in cases {
            assert_eq!(validate_network_name(name).is_ok(), *ok, "{name:?}");
        }
    }

    #[test]
    fn should_validate_keys() {
        let cases: &[(&str, &str, bool)] = &[
            ("abc", "eth0", true),
            (" abc ", "eth0", true),
            ("", "eth0", false),
            ("  ", "eth0", false),
            ("a\r\nb", "eth0", false),
            ("a\nb", "eth0", false),
            ("a\0", "eth0", false),
            ("abc", "", false),
            ("abc", "eth0\r\nx", false),
            ("abc", "eth\0", false),
            ("abc", "eth0 ", false),
        ];
        for (id, ifname, ok) in cases {
            assert_eq!(validate_key(id, ifname).is_ok(), *ok, "{id:?} {ifname:?}");
        }
    }

    #[test]
    fn should_classify_transient_errors() {
        let timeout = Error::LockTimeout {
            path: "/x/lock".into(),
            waited: Duration::from_secs(10),
        };
        assert!(timeout.is_transient());
        assert!(!Error::RequestedNotInRange {
            ip: "10.0.0.1".parse().unwrap()
        }
        .is_transient());
        assert!(!Error::Io {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied)
        }
        .is_transient());
    }
}
