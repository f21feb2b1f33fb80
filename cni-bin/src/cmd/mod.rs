//! One module per CNI verb: orchestration only; the kernel work is in [`crate::pod_net`].

use std::collections::HashMap;

use conf::cni::NetConf;
use conf::CniError;

use crate::env::CmdArgs;
use crate::ipam_backend::IpamBackend;

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod ipam_only;

/// STATUS: ready only when the configuration is usable and the pool can hand out an address.
pub fn status(args: &CmdArgs, conf: &NetConf, env: &HashMap<String, String>, stdin: &[u8]) -> Result<(), CniError> {
    let mut ipam = IpamBackend::new(conf, env, &args.cni_path, stdin)
        .map_err(|e| CniError::new(conf::ErrorCode::NotAvailable, "IPAM is not usable").with_details(e.to_string()))?;
    ipam.status()
}
