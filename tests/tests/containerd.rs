//! A real runtime end to end: a private containerd + runc from Debian's packages runs two busybox
//! containers with `ctr run --cni --rm`; they get addresses from the block, reach each other, and
//! `--rm` leaves no IP file, no host veth and no route behind.
//!
//! Runs as root. Everything lives under a temp dir and a private "host" network namespace; the
//! machine's containerd, `/etc/cni`, `/opt/cni` and root namespace are never touched.

use std::io::BufReader;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration_tests::runtime::{
    read_line, reference_conflist, reserved_ips, warren_bin_dir, warren_conflist, Containerd, Leaks, REFERENCE_BIN_DIR,
};
use serde_json::Value;

const IMAGE: &str = "warren.test/busybox:1";
const MESSAGE: &str = "hello-from-c1";

/// A `ctr run` in flight; killed and reaped on drop so a failing test never leaves one behind.
struct Running {
    child: Child,
    stderr: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn spawn(ctd: &Containerd, name: &str, script: &str) -> Result<Self> {
        let stderr = ctd.dir().join(format!("{name}.stderr"));
        let child = ctd
            .ctr_command(&["run", "--cni", "--rm", IMAGE, name, "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("ctr run {name}"))?;
        Ok(Running { child, stderr })
    }

    /// What ctr (and through it, the CNI plugin) said on stderr.
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (bounded) for `ctr run` to end and returns its exit success and remaining stdout.
    fn finish(&mut self, limit: Duration) -> Result<(bool, String)> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let mut rest = String::new();
                if let Some(mut out) = self.child.stdout.take() {
                    std::io::Read::read_to_string(&mut out, &mut rest)?;
                }
                return Ok((status.success(), rest));
            }
            if Instant::now() > deadline {
                bail!("ctr run did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// How the plugin under test is installed and what it leaves on the host side per pod.
struct Flavor {
    conflist: Value,
    binaries: Vec<PathBuf>,
    link_prefix: &'static str,
    network: &'static str,
    data_dir: PathBuf,
    subnet: ipnet::Ipv4Net,
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the containerd test needs root (it runs containerd, runc and network namespaces)"
    );
}

fn pod_ip(line: &str) -> Result<Ipv4Addr> {
    // `ip -o -4 addr show dev eth0`: "2: eth0    inet 10.199.7.3/32 scope global eth0 ..."
    let mut it = line.split_whitespace();
    it.position(|t| t == "inet")
        .with_context(|| format!("no inet in {line:?}"))?;
    let addr = it.next().context("inet without address")?;
    addr.split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("bad address in {line:?}"))
}

fn run_two_pods(ctd: &Containerd, flavor: &Flavor, expect_veth: Option<&dyn Fn(&str) -> String>) -> Result<()> {
    ctd.install_cni(&flavor.conflist, &flavor.binaries)?;
    let image = ctd.dir().join("busybox.tar");
    integration_tests::runtime::build_busybox_image(&ctd.dir().join("img"), &image, IMAGE)?;
    ctd.ctr(&["images", "import", image.to_str().context("temp path is not UTF-8")?])?;
    let host = ctd.host.name.as_str();

    // c1 prints its address, then serves one connection.
    let c1_script = format!("ip -o -4 addr show dev eth0; timeout 60 nc -l -p 7777 -e echo {MESSAGE}");
    let mut c1 = Running::spawn(ctd, "c1", &c1_script)?;
    let mut c1_out = BufReader::new(c1.child.stdout.take().context("c1 stdout")?);
    let c1_line = read_line(&mut c1_out)?;
    let c1_ip = pod_ip(&c1_line).with_context(|| format!("c1 printed {c1_line:?}; ctr said {:?}", c1.stderr()))?;
    ensure!(
        flavor.subnet.contains(&c1_ip),
        "c1 got {c1_ip}, outside the block {}",
        flavor.subnet
    );

    // While c1 runs, the host side must show exactly its attachment.
    let reserved = reserved_ips(&flavor.data_dir, flavor.network)?;
    ensure!(
        reserved.contains(&c1_ip.into()),
        "no IP file for {c1_ip} while c1 runs: {reserved:?}"
    );
    let links = integration_tests::runtime::links_with_prefix(Some(host), flavor.link_prefix)?;
    ensure!(
        links.len() == 1,
        "expected one {}* link while c1 runs, found {links:?}",
        flavor.link_prefix
    );
    if let Some(expected) = expect_veth {
        // ctr names the attachment "<namespace>-<id>" and passes no pod arguments, so the veth
        // name is the hash of that container ID.
        let want = expected(&format!("{}-c1", ctd.namespace));
        ensure!(links[0] == want, "host veth is {}, expected {want}", links[0]);
    }
    let routes = integration_tests::runtime::host_routes_32(Some(host))?;
    ensure!(
        routes
            .iter()
            .any(|r| r.split_whitespace().next() == Some(&c1_ip.to_string())),
        "no /32 route to {c1_ip} while c1 runs: {routes:?}"
    );

    // c2 pings c1 and fetches its message through the host side.
    let c2_script = format!("ip -o -4 addr show dev eth0; ping -c 1 -W 5 {c1_ip} >/dev/null && nc -w 5 {c1_ip} 7777");
    let mut c2 = Running::spawn(ctd, "c2", &c2_script)?;
    let (c2_ok, c2_out) = c2.finish(Duration::from_secs(60))?;
    let mut lines = c2_out.lines();
    let c2_ip = pod_ip(lines.next().unwrap_or_default())
        .with_context(|| format!("c2 printed {c2_out:?}; ctr said {:?}", c2.stderr()))?;
    ensure!(
        flavor.subnet.contains(&c2_ip),
        "c2 got {c2_ip}, outside the block {}",
        flavor.subnet
    );
    ensure!(c2_ip != c1_ip, "both containers got {c1_ip}");
    ensure!(
        c2_ok && c2_out.contains(MESSAGE),
        "c2 could not reach c1 at {c1_ip} (exit ok: {c2_ok}, output {c2_out:?}, ctr said {:?})",
        c2.stderr()
    );
    let (c1_ok, c1_rest) = c1.finish(Duration::from_secs(60))?;
    ensure!(c1_ok, "c1 failed: {c1_rest:?}, ctr said {:?}", c1.stderr());
    // ctr logs a failed DEL ("network review", sic) and still exits 0, so its stderr is checked too.
    for (name, c) in [("c1", &c1), ("c2", &c2)] {
        let said = c.stderr();
        ensure!(
            !said.contains("network review") && !said.contains("level=error"),
            "{name}: ctr reported {said:?}"
        );
    }

    // `--rm` ran DEL for both: nothing may be left.
    let leaks = Leaks::probe(Some(host), flavor.link_prefix, &flavor.data_dir, flavor.network)?;
    ensure!(leaks.is_empty(), "left behind after --rm: {leaks:?}");
    let tasks = ctd.ctr(&["tasks", "ls", "-q"])?;
    ensure!(tasks.trim().is_empty(), "tasks still listed: {tasks:?}");
    eprintln!(
        "{}: c1 {c1_ip} and c2 {c2_ip} from {}, c2 reached c1; after --rm no IP file, link or route left",
        flavor.network, flavor.subnet
    );
    Ok(())
}

fn containerd_problems(ctd: &Containerd) -> String {
    match ctd.log_problems() {
        p if p.is_empty() => "containerd logged no errors".to_string(),
        p => format!("containerd logged:\n{p}"),
    }
}

fn binary(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build --release -p cni-bin) or set WARREN_BIN_DIR",
        p.display()
    );
    p
}

#[test]
fn ctr_run_cni_two_pods_with_warren() -> Result<()> {
    require_root();
    let bins = warren_bin_dir();
    let mut binaries = vec![
        binary(&bins, "warren"),
        PathBuf::from(REFERENCE_BIN_DIR).join("loopback"),
    ];
    // The in-process IPAM is the fast path; the standalone binary is shipped alongside when built.
    if bins.join("warren-ipam").is_file() {
        binaries.push(bins.join("warren-ipam"));
    }
    let ctd = Containerd::start()?;
    let data_dir = ctd.dir().join("ipam");
    let subnet = "10.199.7.0/24";
    let flavor = Flavor {
        conflist: warren_conflist(conf::names::NETWORK_NAME, "1.0.0", subnet, &data_dir),
        binaries,
        link_prefix: conf::names::HOST_VETH_PREFIX,
        network: conf::names::NETWORK_NAME,
        data_dir,
        subnet: subnet.parse()?,
    };
    let expected = |container_id: &str| {
        let key = conf::names::workload_key(None, None, container_id);
        conf::names::host_veth_name(conf::names::HOST_VETH_PREFIX, &key).expect("default prefix is valid")
    };
    run_two_pods(&ctd, &flavor, Some(&expected)).with_context(|| containerd_problems(&ctd))
}

/// The same scenario with Debian's ptp + host-local: proves the harness itself (containerd,
/// image, private CNI dirs, leak probes) independently of warren.
#[test]
fn ctr_run_cni_two_pods_with_reference_plugins() -> Result<()> {
    require_root();
    let ref_dir = PathBuf::from(REFERENCE_BIN_DIR);
    let binaries = ["ptp", "host-local", "loopback"]
        .iter()
        .map(|b| binary(&ref_dir, b))
        .collect();
    let ctd = Containerd::start()?;
    let data_dir = ctd.dir().join("ipam");
    let subnet = "10.199.8.0/24";
    let flavor = Flavor {
        conflist: reference_conflist("ref-net", subnet, &data_dir),
        binaries,
        link_prefix: "veth",
        network: "ref-net",
        data_dir,
        subnet: subnet.parse()?,
    };
    run_two_pods(&ctd, &flavor, None).with_context(|| containerd_problems(&ctd))
}
