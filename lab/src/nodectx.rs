//! A lab node's execution context: its network namespace plus its own `/etc/cni/net.d`,
//! `/opt/cni/bin` and `/var/lib/cni`, bind-mounted in a private mount namespace — the view a
//! process on a real node has. Used for every process the lab runs "on a node": CNI plugin
//! calls (as containerd makes them), kube-proxy, warren-node, and `warren-lab exec node:…`.

use std::ffi::CString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// The node paths that are node-specific, relative to a node's state directory.
pub const NODE_BINDS: &[(&str, &str)] = &[
    ("etc/cni/net.d", "/etc/cni/net.d"),
    ("opt/cni/bin", "/opt/cni/bin"),
    ("var/lib/cni", "/var/lib/cni"),
];

/// The node's state directory.
pub fn node_dir(state_dir: &Path, node: &str) -> PathBuf {
    state_dir.join("nodes").join(node)
}

/// Creates the node's directories and returns the (source, target) bind list.
pub fn prepare_node_dirs(state_dir: &Path, node: &str) -> Result<Vec<(PathBuf, PathBuf)>> {
    let dir = node_dir(state_dir, node);
    let mut binds = Vec::new();
    for (rel, target) in NODE_BINDS {
        let src = dir.join(rel);
        std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
        binds.push((src, PathBuf::from(target)));
    }
    Ok(binds)
}

/// A command that runs `argv` in the node's context (through `warren-lab __in-node`).
pub fn node_command(exe: &Path, netns: &str, binds: &[(PathBuf, PathBuf)], argv: &[String]) -> Command {
    let mut c = Command::new(exe);
    c.arg("__in-node").arg("--netns").arg(netns);
    for (src, dst) in binds {
        c.arg("--bind").arg(format!("{}:{}", src.display(), dst.display()));
    }
    c.arg("--").args(argv);
    c
}

/// Enters the node's context in this (still single-threaded) process, then execs `argv`.
pub fn exec_in_node(netns: &str, binds: &[(PathBuf, PathBuf)], argv: &[String]) -> Result<std::convert::Infallible> {
    let path = crate::netns::netns_path(netns);
    let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {netns}"))?;
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / private")?;
    // /sys shows the network devices of the namespace that mounted it; remount as `ip netns exec` does.
    if umount2("/sys", MntFlags::MNT_DETACH).is_ok() {
        mount(Some("sysfs"), "/sys", Some("sysfs"), MsFlags::empty(), None::<&str>).context("mounting /sys")?;
    }
    for (src, dst) in binds {
        std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
        mount(
            Some(src.as_path()),
            dst.as_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} on {}", src.display(), dst.display()))?;
    }
    let cargs: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let prog = cargs.first().context("no command given")?;
    let err = nix::unistd::execvp(prog, &cargs).err();
    anyhow::bail!("exec {:?}: {:?}", argv, err)
}
