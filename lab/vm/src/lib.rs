//! The lab's micro-VM: Debian's kernel (which has ipip, IPVS and SCTP) booted under qemu TCG with the host's root
//! shared read-only over 9p, a tmpfs overlay on top, and one host directory shared read-write at the same path.
//! The guest runs one command as root in that view of the host and powers off when it exits.
//!
//! Files in the shared directory: `vm.pid` (qemu's pid while it runs), `vm-boot.env` and `vm-command.sh` (written
//! by the host for the guest), `vm-started` (the command has begun), `vm-stdout`/`vm-stderr` (its output),
//! `exit-status` (written when it exits) and `vm-failed` (why boot failed, if it did).

mod assets;
mod cpio;
mod guest;
mod modules;
mod vm;

use std::path::PathBuf;
use std::process::{Command, Stdio};

pub use assets::{ensure_assets, ensure_host_packages, Assets};
pub use guest::{EXIT_STATUS, GUEST_ADDR, PID_FILE, STARTED, STDERR, STDOUT};
pub use vm::{console_tail, run_once, RunOutput, Vm, VmConfig};

/// Modules loaded in the guest by default: what warren, kube-proxy's iptables and IPVS modes, the lab's probes and
/// traffic shaping need. The kernel's auto-loading cannot see into the guest's chroot, hence the explicit list.
pub const DEFAULT_MODULES: &[&str] = &[
    "ipip",
    "veth",
    "bridge",
    "dummy",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nf_conntrack",
    "nf_nat",
    "xt_set",
    "ip_set",
    "ip_set_hash_net",
    "ip_set_hash_ip",
    "ip_set_hash_ipport",
    "ip_set_hash_netport",
    "ip_set_list_set",
    "xt_conntrack",
    "xt_mark",
    "xt_comment",
    "xt_multiport",
    "xt_MASQUERADE",
    "xt_nat",
    "xt_addrtype",
    "xt_statistic",
    "xt_physdev",
    "xt_tcpudp",
    "xt_sctp",
    "xt_recent",
    "xt_NFLOG",
    "xt_LOG",
    "xt_CT",
    "xt_REDIRECT",
    "xt_u32",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_sh",
    "sctp",
    "tun",
    "nf_conntrack_netlink",
    "iptable_nat",
    "iptable_filter",
    "iptable_mangle",
    "iptable_raw",
    "sch_tbf",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
    "ifb",
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("kernel assets: {0}")]
    Assets(String),
    #[error("VM: {0}")]
    Config(String),
    #[error("a VM is already running for {} (qemu pid {pid})", shared_dir.display())]
    AlreadyRunning { shared_dir: PathBuf, pid: i32 },
    #[error("VM did not start: {reason}\n--- console (last lines) ---\n{console_tail}")]
    Boot { reason: String, console_tail: String },
    #[error("the VM stopped without the command's exit status\n--- console (last lines) ---\n{console_tail}")]
    NoExitStatus { console_tail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Whether this machine's kernel can make IPIP tunnels: tries `ip link add … type ipip` in a throwaway network
/// namespace (it dies with the `unshare`d process, so nothing is left behind). False when the check cannot run.
pub fn kernel_has_ipip() -> bool {
    let as_root = nix::unistd::geteuid().is_root();
    let mut cmd = Command::new("unshare");
    cmd.arg(if as_root { "--net" } else { "--map-root-user" });
    if !as_root {
        cmd.arg("--net");
    }
    cmd.args([
        "ip",
        "link",
        "add",
        "wrnipipchk",
        "type",
        "ipip",
        "remote",
        "192.0.2.1",
        "local",
        "192.0.2.2",
    ]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn should_match_this_machines_kernel_on_ipip() {
        // The module is either registered or not; /proc/modules and /sys/module only show it once loaded, so the
        // best independent witness here is the netns driver list of a kernel with ipip built in or loaded.
        let loaded = std::path::Path::new("/sys/module/ipip").exists();
        if loaded {
            assert!(super::kernel_has_ipip(), "ipip is loaded, yet the check says no");
        } else if !std::path::Path::new("/lib/modules").exists() {
            // No loadable modules at all (this project's machines): ipip cannot appear, the check must say no.
            assert!(
                !super::kernel_has_ipip(),
                "no ipip module and no module tree, yet the check says yes"
            );
        }
    }
}
