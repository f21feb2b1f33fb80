//! Network-namespace plumbing for the lab: `ip` for the topology, `setns` on a dedicated thread
//! for sockets that must live in a namespace.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip ARGS...`
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// `ip -n NS ARGS...`
pub fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").arg("-n").arg(ns).args(args)).map(|_| ())
}

/// A command that runs inside `ns`.
pub fn command_in(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Creates a named namespace with `lo` up.
pub fn add(name: &str) -> Result<()> {
    if !exists(name) {
        ip(&["netns", "add", name])?;
    }
    ip_in(name, &["link", "set", "lo", "up"])
}

/// Deletes a named namespace; absent is fine.
pub fn del(name: &str) -> Result<()> {
    if exists(name) {
        ip(&["netns", "del", name])?;
    }
    Ok(())
}

/// Writes a sysctl inside `ns` (`/proc/sys/net` is per namespace).
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_string();
    in_netns(ns, move || {
        std::fs::write(&path, &value).with_context(|| format!("writing {path}"))
    })?
}

/// Runs `f` on a fresh thread whose network namespace is `ns` (sockets made there stay there).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = netns_path(ns);
    let handle = std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || -> Result<T> {
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {}", path.display()))?;
            Ok(f())
        })
        .context("spawning a netns thread")?;
    handle.join().map_err(|_| anyhow!("netns thread panicked"))?
}

/// A listening TCP socket bound inside `ns`.
pub fn listener_in(ns: &str, addr: SocketAddr) -> Result<TcpListener> {
    let l = in_netns(ns, move || TcpListener::bind(addr))?.with_context(|| format!("binding {addr} in {ns}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Every named namespace whose name starts with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}
