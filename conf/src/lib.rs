//! Pure, I/O-free types shared by every warren binary.
//!
//! * [`names`]: every ownership marker warren puts into the kernel, defined once, so that a
//!   restarted daemon (or `warren-node uninstall`) recognises what is its own.
//! * [`cni`]: the CNI protocol as warren speaks it — network configuration, results in
//!   every supported version, and error codes.
//! * [`ipam`]: host-local's IPAM configuration schema, which `warren-ipam` shares.

pub mod cni;
pub mod daemon;
pub mod dataplane;
pub mod ipam;
pub mod names;

pub use cni::{CniError, ErrorCode};
