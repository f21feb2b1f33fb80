//! Network-namespace fixtures.
//!
//! Every test gets a fresh "host" namespace (standing in for the node) and fresh "pod"
//! namespaces, uniquely named and removed in `Drop`, also when the test panics. Plugins run
//! inside the host namespace, so nothing a test does touches the real host.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `wt-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("wt-{tag}-{}-{n}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace set up like a node: lo up, an `uplink` with an address and the default route
    /// (proxy ARP answers only for destinations routed elsewhere), forwarding on. The uplink is
    /// a veth whose peer stays in the same namespace (this kernel has no dummy driver).
    pub fn new_host(tag: &str) -> Result<Self> {
        let ns = Self::new(tag)?;
        ns.ip(&["link", "add", "uplink", "type", "veth", "peer", "name", "uplink-peer"])?;
        ns.ip(&["link", "set", "uplink-peer", "up"])?;
        ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "uplink"])?;
        ns.ip(&["link", "set", "uplink", "up"])?;
        ns.ip(&["route", "add", "default", "dev", "uplink"])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command inside; returns its output whatever the exit status.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let (prog, rest) = argv.split_first().context("empty command")?;
        self.command(prog)
            .args(rest)
            .output()
            .with_context(|| format!("running {argv:?} in {}", self.name))
    }

    /// Runs a command inside and returns stdout; fails on a non-zero exit.
    pub fn sh(&self, argv: &[&str]) -> Result<String> {
        let out = self.exec(argv)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip").args(["-n", &self.name]).args(args).output()?;
        if !out.status.success() {
            bail!("ip -n {} {args:?}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -j -n <ns> <args>` parsed.
    pub fn ip_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = Command::new("ip")
            .args(["-j", "-d", "-n", &self.name])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "ip -j -n {} {args:?}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Value::Array(Vec::new()));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.sh(&["sysctl", "-q", "-w", &format!("{key}={value}")]).map(drop)
    }

    /// Reads `/proc/sys/<rel>` as seen inside this namespace.
    pub fn read_sysctl(&self, rel: &str) -> Result<String> {
        Ok(self.sh(&["cat", &format!("/proc/sys/{rel}")])?.trim().to_string())
    }

    /// Names of the links in this namespace.
    pub fn link_names(&self) -> Result<Vec<String>> {
        Ok(self
            .ip_json(&["link", "show"])?
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.get("ifname").and_then(|n| n.as_str()).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Runs `f` on a fresh thread that has entered this namespace (the caller's thread is untouched).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = File::open(self.path())?;
        let h = std::thread::spawn(move || -> Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        });
        h.join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    /// Deletes the namespace now (e.g. to test DEL after the netns is gone).
    pub fn delete(self) {
        drop(self)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn run_ok(c: &mut Command) -> Result<()> {
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!("{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
