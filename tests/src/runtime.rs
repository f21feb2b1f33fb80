//! Real container runtimes (containerd + runc) for end-to-end CNI tests, plus the plumbing the
//! soak and benchmark binaries share: exec a CNI plugin the way a runtime does (with its rusage),
//! make throw-away network namespaces, and probe a namespace for what a plugin may have leaked.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Seek, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Where Debian's `containernetworking-plugins` live.
pub const REFERENCE_BIN_DIR: &str = "/usr/lib/cni";

/// The directory holding `warren` and `warren-ipam`: `$WARREN_BIN_DIR`, else `<workspace>/target/release`.
pub fn warren_bin_dir() -> PathBuf {
    match std::env::var_os("WARREN_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("target/release"),
    }
}

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Writes a benchmark's figures as pretty JSON to `out`, or to `target/bench/<name>` in the
/// workspace; returns where.
pub fn write_bench_json(out: Option<&Path>, name: &str, doc: &impl serde::Serialize) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let out = out.map_or_else(|| workspace_root().join("target/bench").join(name), Path::to_path_buf);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// A process-unique suffix for names of namespaces, links and directories.
pub fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{tag}{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------------------------
// Executing a plugin
// ---------------------------------------------------------------------------------------------

/// The CNI environment of one call.
#[derive(Debug, Clone)]
pub struct CniCall<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    /// Empty for DEL/GC/STATUS when the runtime has no namespace (ctr passes "" on DEL).
    pub netns: &'a str,
    pub ifname: &'a str,
    pub args: &'a str,
    /// `CNI_PATH`: where the plugin looks for delegated plugins.
    pub cni_path: &'a str,
}

/// How a plugin process ended, what it printed and what it cost.
#[derive(Debug, Clone)]
pub struct PluginRun {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// From just before `fork` to the moment `wait4` reaped it.
    pub elapsed: Duration,
    /// Peak resident set of the plugin process itself, from `wait4`'s rusage.
    pub max_rss_kib: u64,
}

impl PluginRun {
    pub fn success(&self) -> bool {
        self.status.success()
    }
    pub fn killed(&self) -> bool {
        self.status.signal() == Some(libc::SIGKILL)
    }
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.stdout)
            .with_context(|| format!("plugin stdout is not JSON: {:?}", String::from_utf8_lossy(&self.stdout)))
    }
    /// A one-line account of a failure for error messages.
    pub fn describe(&self) -> String {
        format!(
            "status {}, stdout {:?}, stderr {:?}",
            self.status,
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr)
        )
    }
}

/// Runs `plugin` with `stdin` as a runtime does. With `kill_after`, sends SIGKILL that long after
/// the fork (if it is still running), to simulate a node that loses the plugin mid-flight.
pub fn run_plugin(plugin: &Path, call: &CniCall<'_>, stdin: &[u8], kill_after: Option<Duration>) -> Result<PluginRun> {
    // stderr goes to a file, not a pipe, so a chatty plugin can never block on a full pipe while
    // we wait on stdout.
    let mut err_file = tempfile::tempfile().context("tempfile for plugin stderr")?;
    let mut cmd = Command::new(plugin);
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_ARGS", call.args)
        .env("CNI_PATH", call.cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err_file.try_clone().context("dup stderr file")?));
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {}", plugin.display()))?;
    let pid = child.id() as i32;
    if let Some(mut input) = child.stdin.take() {
        // A plugin killed before reading its config closes the pipe: that is not our error.
        match input.write_all(stdin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Err(e) => return Err(e).context("writing plugin stdin"),
        }
    }
    if let Some(delay) = kill_after {
        std::thread::sleep(delay);
        // The child is ours and not yet reaped, so its pid cannot have been reused: a zombie
        // simply ignores the signal.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_end(&mut stdout).context("reading plugin stdout")?;
    }
    let (raw, max_rss_kib) = wait4(pid)?;
    let elapsed = start.elapsed();
    drop(child);
    let mut stderr = Vec::new();
    err_file.rewind().context("rewinding stderr file")?;
    err_file.read_to_end(&mut stderr).context("reading plugin stderr")?;
    Ok(PluginRun {
        status: ExitStatus::from_raw(raw),
        stdout,
        stderr,
        elapsed,
        max_rss_kib,
    })
}

/// Reaps `pid` and returns its raw wait status and peak RSS (KiB). std's `Child::wait` drops the
/// rusage that only `wait4` returns, and the benchmark must report the plugin's own peak RSS.
#[allow(unsafe_code)]
fn wait4(pid: i32) -> Result<(i32, u64)> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct of integers, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers refer to live, properly aligned locals for the whole call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            return Ok((status, u64::try_from(usage.ru_maxrss).unwrap_or(0)));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e).with_context(|| format!("wait4({pid})"));
        }
    }
}

/// The first IPv4 address of a CNI result (any version ≥ 0.3.0), without its prefix length.
pub fn result_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let addr = ip["address"].as_str()?;
        addr.split('/').next()?.parse().ok()
    })
}

/// The plugin config a runtime hands to the first plugin of a conflist: the entry with the
/// list's `name` and `cniVersion` injected.
pub fn plugin_conf(list: &Value, index: usize) -> Result<Value> {
    let mut conf = list["plugins"]
        .get(index)
        .cloned()
        .with_context(|| format!("conflist has no plugin {index}"))?;
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    Ok(conf)
}

/// warren's conflist as warren-node renders it, for a given pool and data dir.
pub fn warren_conflist(name: &str, cni_version: &str, subnet: &str, data_dir: &Path) -> Value {
    json!({
        "cniVersion": cni_version,
        "name": name,
        "plugins": [{
            "type": "warren",
            "mtu": 1480,
            "ipam": { "type": "warren-ipam", "ranges": [[{ "subnet": subnet }]], "dataDir": data_dir },
        }],
    })
}

/// The reference pairing the issue compares against: Debian's ptp with host-local.
pub fn reference_conflist(name: &str, subnet: &str, data_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{
            "type": "ptp",
            "mtu": 1480,
            "ipMasq": false,
            "ipam": { "type": "host-local", "ranges": [[{ "subnet": subnet }]], "dataDir": data_dir },
        }],
    })
}

// ---------------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------------

/// Moves the calling thread (and every thread and process it creates afterwards) into a fresh,
/// anonymous network namespace. The soak and benchmark call it first thing in `main`, so the
/// plugins' "host side" is a namespace that vanishes with the process, whatever happens.
pub fn enter_private_netns() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
    Ok(())
}

/// A network namespace pinned by a bind mount on a file in a directory we own; unmounted and
/// removed on drop. Cheaper than `ip netns add` and never touches `/var/run/netns`.
#[derive(Debug)]
pub struct PinnedNetns {
    path: PathBuf,
}

impl PinnedNetns {
    pub fn create(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let pinned = PinnedNetns { path };
        let target = pinned.path.clone();
        // unshare(CLONE_NEWNET) changes only the calling thread, so a short-lived thread makes the
        // namespace and pins it while the rest of the process stays where it is.
        std::thread::spawn(move || -> Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("pinning netns on {}", target.display()))?;
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))??;
        Ok(pinned)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().unwrap_or_default()
    }

    /// IPv4 addresses configured in the namespace (any interface), via `nsenter`.
    pub fn ipv4_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        let out = run_ok(
            Command::new("nsenter")
                .arg(format!("--net={}", self.path.display()))
                .args(["ip", "-o", "-4", "addr", "show"]),
        )?;
        Ok(parse_ip_addr_lines(&out))
    }
}

impl Drop for PinnedNetns {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&self.path);
    }
}

/// A named namespace made with `ip netns add` (for tools that want a name, like `ip netns exec`),
/// deleted on drop.
#[derive(Debug)]
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn create(name: &str) -> Result<Self> {
        run_ok(Command::new("ip").args(["netns", "add", name]))?;
        Ok(NamedNetns { name: name.to_string() })
    }
    /// Runs `ip <args>` inside the namespace and returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        run_ok(Command::new("ip").args(["netns", "exec", &self.name]).args(argv))
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn parse_ip_addr_lines(out: &str) -> Vec<Ipv4Addr> {
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            it.position(|t| t == "inet")?;
            it.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Leak probes
// ---------------------------------------------------------------------------------------------

/// Link names in the current namespace (or in the named one) that start with `prefix`.
pub fn links_with_prefix(netns: Option<&str>, prefix: &str) -> Result<Vec<String>> {
    let out = ip_in(netns, &["-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?;
            let name = name.split('@').next()?;
            name.starts_with(prefix).then(|| name.to_string())
        })
        .collect())
}

/// IPv4 /32 routes in the main table of the current namespace (or the named one): each pod leaves
/// exactly one, so any that survives its pod is a leak.
pub fn host_routes_32(netns: Option<&str>) -> Result<Vec<String>> {
    let out = ip_in(netns, &["-4", "route", "show", "table", "main"])?;
    Ok(out
        .lines()
        .filter(|l| {
            let dst = l.split_whitespace().next().unwrap_or("");
            let dst = dst.strip_suffix("/32").unwrap_or(dst);
            dst.parse::<Ipv4Addr>().is_ok()
        })
        .map(str::to_string)
        .collect())
}

fn ip_in(netns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    run_ok(cmd.args(args))
}

/// Addresses the host-local style store holds under `<data_dir>/<network>/` (one file per IP).
pub fn reserved_ips(data_dir: &Path, network: &str) -> Result<BTreeSet<IpAddr>> {
    let dir = data_dir.join(network);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut ips = BTreeSet::new();
    for entry in entries {
        let entry = entry?;
        if let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) {
            ips.insert(ip);
        }
    }
    Ok(ips)
}

/// What a namespace and a store hold after every pod is gone; all empty means nothing leaked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leaks {
    pub ip_files: Vec<IpAddr>,
    pub links: Vec<String>,
    pub routes: Vec<String>,
}

impl Leaks {
    pub fn probe(netns: Option<&str>, link_prefix: &str, data_dir: &Path, network: &str) -> Result<Self> {
        Ok(Leaks {
            ip_files: reserved_ips(data_dir, network)?.into_iter().collect(),
            links: links_with_prefix(netns, link_prefix)?,
            routes: host_routes_32(netns)?,
        })
    }
    pub fn is_empty(&self) -> bool {
        self.ip_files.is_empty() && self.links.is_empty() && self.routes.is_empty()
    }
}

/// Runs a command and returns its stdout, or an error carrying its stderr.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------------
// A private containerd
// ---------------------------------------------------------------------------------------------

/// Builds a docker-archive image holding busybox-static (as `/bin/busybox` plus applet symlinks)
/// at `out`, tagged `tag`, so `ctr images import` works with no registry.
pub fn build_busybox_image(work: &Path, out: &Path, tag: &str) -> Result<()> {
    const APPLETS: &[&str] = &[
        "sh", "ash", "ping", "nc", "ip", "sleep", "cat", "echo", "ls", "ifconfig", "hostname", "wget", "true",
        "timeout",
    ];
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing: install busybox-static");
    }
    let rootfs = work.join("rootfs");
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::copy(busybox, rootfs.join("bin/busybox")).context("copying busybox")?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    let image = work.join("image");
    fs::create_dir_all(&image)?;
    let layer = image.join("layer.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
            .arg(&layer)
            .arg("."),
    )?;
    let sum = run_ok(Command::new("sha256sum").arg(&layer))?;
    let digest = sum
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_string();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{digest}")] },
        "history": [{ "created_by": "warren tests: busybox-static" }],
    });
    fs::write(image.join("config.json"), serde_json::to_vec(&config)?)?;
    let manifest = json!([{ "Config": "config.json", "RepoTags": [tag], "Layers": ["layer.tar"] }]);
    fs::write(image.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    run_ok(Command::new("tar").arg("-C").arg(&image).arg("-cf").arg(out).args([
        "manifest.json",
        "config.json",
        "layer.tar",
    ]))?;
    Ok(())
}

/// A containerd with its own root, state, socket and config under a temp dir, plus a named
/// "host" network namespace in which `ctr` (and therefore every CNI plugin it runs) lives, with
/// `/etc/cni/net.d` and `/opt/cni/bin` overlaid privately for it. Nothing of the machine's own
/// containerd, CNI directories or root network namespace is touched. Drop kills every task,
/// stops containerd and removes everything.
pub struct Containerd {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    pub namespace: String,
    pub host: NamedNetns,
    /// The CNI config dir `ctr` sees as `/etc/cni/net.d`.
    pub conf_dir: PathBuf,
    /// The CNI bin dir `ctr` sees as `/opt/cni/bin`.
    pub bin_dir: PathBuf,
}

impl Containerd {
    pub fn start() -> Result<Self> {
        for tool in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
            if which(tool).is_none() {
                bail!("{tool} is not installed (apt-get install containerd runc)");
            }
        }
        let dir = tempfile::Builder::new().prefix("wctd").tempdir_in("/tmp")?;
        let d = dir.path().to_path_buf();
        for sub in [
            "root",
            "state",
            "opt",
            "etc-up/cni/net.d",
            "etc-work",
            "opt-up/cni/bin",
            "opt-work",
        ] {
            fs::create_dir_all(d.join(sub))?;
        }
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
            opt = d.join("opt").display(),
        );
        fs::write(d.join("config.toml"), config)?;
        let log = fs::File::create(d.join("containerd.log"))?;
        let host = NamedNetns::create(&unique("wctr"))?;
        // Pods reach each other through the host side, as on a node where warren-node has
        // enabled forwarding.
        host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        host.ip(&["link", "set", "lo", "up"])?;
        // Proxy ARP answers for 169.254.1.1 only when the host has a route to it out of another
        // interface; on a node that is the default route via the uplink. A veth pair stands in
        // for the uplink (this kernel has no dummy driver); nothing is ever sent through it.
        host.ip(&["link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1"])?;
        host.ip(&["link", "set", "uplink0", "up"])?;
        host.ip(&["link", "set", "uplink1", "up"])?;
        host.ip(&["route", "add", "default", "dev", "uplink0"])?;
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting containerd")?;
        let mut me = Containerd {
            conf_dir: d.join("etc-up/cni/net.d"),
            bin_dir: d.join("opt-up/cni/bin"),
            dir,
            daemon: Some(daemon),
            namespace: unique("wt"),
            host,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if me.ctr(&["version"]).is_ok() {
                break;
            }
            if let Some(child) = me.daemon.as_mut() {
                if let Some(st) = child.try_wait()? {
                    bail!("containerd exited ({st}): {}", me.log());
                }
            }
            if Instant::now() > deadline {
                bail!("containerd did not answer within 20 s: {}", me.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(me)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The log's error lines, and warnings other than the devmapper snapshotter it never has here.
    pub fn log_problems(&self) -> String {
        self.log()
            .lines()
            .filter(|l| l.contains("level=error") || (l.contains("level=warning") && !l.contains("devmapper")))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `ctr` against this containerd, run from the host namespace with the private CNI dirs.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        // ctr's --cni hard-codes /etc/cni/net.d and /opt/cni/bin (go-cni defaults). `ip netns
        // exec` gives ctr its own mount namespace (slave to the host's), so overlays mounted there
        // show our dirs to ctr and its plugins only and vanish with the process.
        let script = format!(
            "mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc-up,workdir={d}/etc-work /etc && \
             mount -t overlay overlay -o lowerdir=/opt,upperdir={d}/opt-up,workdir={d}/opt-work /opt && \
             exec ctr --address {d}/c.sock --namespace {ns} \"$@\"",
            d = d.display(),
            ns = self.namespace
        );
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host.name, "sh", "-c", &script, "ctr"])
            .args(args);
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        run_ok(&mut self.ctr_command(args))
    }

    /// Installs a conflist (as `10-<name>.conflist`) and the given plugin binaries.
    pub fn install_cni(&self, conflist: &Value, binaries: &[PathBuf]) -> Result<()> {
        let name = conflist["name"].as_str().unwrap_or("net");
        fs::write(
            self.conf_dir.join(format!("10-{name}.conflist")),
            serde_json::to_vec_pretty(conflist)?,
        )?;
        for b in binaries {
            let file = b.file_name().context("binary path without a file name")?;
            fs::copy(b, self.bin_dir.join(file)).with_context(|| format!("copying {}", b.display()))?;
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        // Tasks outlive containerd (their shims keep running), so kill them first.
        if let Ok(out) = self.ctr(&["tasks", "ls", "-q"]) {
            for id in out.split_whitespace() {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
                let _ = self.ctr(&["tasks", "delete", "-f", id]);
            }
        }
        if let Ok(out) = self.ctr(&["containers", "ls", "-q"]) {
            for id in out.split_whitespace() {
                let _ = self.ctr(&["containers", "delete", id]);
            }
        }
        if let Some(mut child) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Snapshot and rootfs mounts left by a crash would make the temp dir undeletable.
        let root = self.dir.path().to_string_lossy().into_owned();
        if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&root))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The path of `tool` on `$PATH`, if any.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// Reads one line (without its newline), e.g. the first output of a still-running `ctr run`.
pub fn read_line(reader: &mut impl io::BufRead) -> Result<String> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_addr_output() {
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                   3: eth0    inet 10.199.0.5/32 scope global eth0\\       valid_lft forever\n";
        assert_eq!(
            parse_ip_addr_lines(out),
            vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(10, 199, 0, 5)]
        );
    }

    #[test]
    fn result_ip_from_each_version() {
        let v1 = json!({"cniVersion":"1.0.0","ips":[{"address":"10.1.2.3/32","interface":0}]});
        let v03 = json!({"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.2.4/24"}]});
        assert_eq!(result_ipv4(&v1), Some(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(result_ipv4(&v03), Some(Ipv4Addr::new(10, 1, 2, 4)));
        assert_eq!(result_ipv4(&json!({"ips":[]})), None);
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("plugin.sh");
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    fn call() -> CniCall<'static> {
        CniCall {
            command: "ADD",
            container_id: "c1",
            netns: "/x",
            ifname: "eth0",
            args: "",
            cni_path: "/nowhere",
        }
    }

    #[test]
    fn plugin_sees_cni_env_and_stdin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = script(
            dir.path(),
            r#"read conf; echo "{\"cmd\":\"$CNI_COMMAND\",\"in\":$conf}"; echo oops >&2"#,
        );
        let run = run_plugin(&p, &call(), b"{\"a\":1}\n", None).expect("run");
        assert!(run.success(), "{}", run.describe());
        assert_eq!(run.json().expect("json"), json!({"cmd": "ADD", "in": {"a": 1}}));
        assert_eq!(String::from_utf8_lossy(&run.stderr).trim(), "oops");
        assert!(run.max_rss_kib > 0, "wait4 reported no RSS");
    }

    #[test]
    fn kill_after_lands_mid_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = script(dir.path(), "cat >/dev/null; exec sleep 30");
        let run = run_plugin(&p, &call(), b"{}", Some(Duration::from_millis(20))).expect("run");
        assert!(run.killed(), "{}", run.describe());
        assert!(!run.success());
        let p = script(dir.path(), "exit 3");
        let run = run_plugin(&p, &call(), b"{}", None).expect("run");
        assert_eq!(run.status.code(), Some(3));
        assert!(!run.killed());
    }

    #[test]
    fn pinned_netns_is_separate_and_goes_away() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = fs::read_link("/proc/thread-self/ns/net").expect("own netns");
        let ns = PinnedNetns::create(dir.path(), "n1").expect("create netns (needs root)");
        let out = run_ok(
            Command::new("nsenter")
                .arg(format!("--net={}", ns.path_str()))
                .args(["readlink", "/proc/self/ns/net"]),
        )
        .expect("nsenter");
        assert_ne!(out.trim(), own.to_string_lossy(), "pinned netns is the caller's own");
        assert!(ns.ipv4_addrs().expect("addrs").is_empty(), "fresh netns has addresses");
        let path = ns.path().to_path_buf();
        drop(ns);
        assert!(!path.exists(), "pin file left behind");
    }

    #[test]
    fn conflist_entry_gets_name_and_version() {
        let list = warren_conflist("k8s-pod-network", "1.1.0", "10.199.3.0/24", Path::new("/tmp/x"));
        let conf = plugin_conf(&list, 0).expect("entry 0");
        assert_eq!(conf["name"], "k8s-pod-network");
        assert_eq!(conf["cniVersion"], "1.1.0");
        assert_eq!(conf["type"], "warren");
        assert!(plugin_conf(&list, 1).is_err());
    }
}
