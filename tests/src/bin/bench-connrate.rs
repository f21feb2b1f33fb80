//! bench-connrate: short TCP connections between two lab pods on different nodes, without and
//! with 1 000 NetworkPolicies loaded, in one run (issue #5: rate loss under 5 %).
//!
//! The lab runs on this kernel (`--vm never`) with IPIP mode `Never`, so that emulation does not
//! blur the numbers: pod `cli` (node1) connects to pod `srv` (node2), reads the one-line answer
//! of the lab's pod server, and closes, sequentially for `--seconds`. Phases:
//! 1. no policy; 2. 1 000 policies (pod selectors, namespace selectors, both, ipBlocks with
//!    except, named ports), of which 4 select the pair (per direction: one that allows other
//!    things, one that allows the pair); the rest select other pods and name the pair as peers;
//!    3. worst case: 1 000 policies of which 252 select the pair (150 srv's ingress, 100 cli's
//!    egress, each allowing other things, plus the two allowing the pair, named to sort last),
//!    so that every new connection walks them all; 4. all policies deleted again (shows the run's
//!    own noise).
//!
//! Prints a table and writes JSON (default `target/bench/connrate.json`). The client runs inside
//! the source pod through `warren-lab exec` (this same binary, `--client ADDR`). Timing is
//! reported, never asserted; a failed connection or a lab that cannot come up is an error.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use integration_tests::runtime::{warren_bin_dir, write_bench_json};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "Connection rate between two lab pods on different nodes, without and with 1 000 policies")]
struct Args {
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// NetworkPolicies loaded in the second phase.
    #[arg(long, default_value_t = 1000)]
    policies: usize,
    /// The lab's state directory (the lab is brought up here and taken down at the end).
    #[arg(long, default_value = "/run/warren-lab-connrate")]
    state_dir: PathBuf,
    /// Use a lab that is already up in --state-dir (and leave it up).
    #[arg(long)]
    reuse: bool,
    /// Leave the lab up at the end.
    #[arg(long)]
    keep: bool,
    /// Directory holding warren-lab (default: $WARREN_BIN_DIR or <workspace>/target/release).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: run the client against ADDR (inside the source pod) and print JSON.
    #[arg(long, hide = true)]
    client: Option<SocketAddr>,
}

const NS: &str = "connrate";
const PORT: u16 = 8080;

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.client {
        let r = client(addr, Duration::from_secs_f64(args.seconds))?;
        println!("{r}");
        return Ok(());
    }
    ensure!(
        nix::unistd::geteuid().is_root(),
        "run as root (the lab makes network namespaces)"
    );
    let bin_dir = args.bin_dir.clone().unwrap_or_else(warren_bin_dir);
    let lab = Lab {
        exe: bin_dir.join("warren-lab"),
        state: args.state_dir.clone(),
        down_on_drop: !args.reuse && !args.keep,
    };
    ensure!(
        lab.exe.exists(),
        "{} is missing (cargo build --release --workspace --bins)",
        lab.exe.display()
    );
    if !args.reuse {
        lab.ok(&["up", "--vm", "never", "--ipip-mode", "Never"])?;
    }
    let status: Value = serde_json::from_str(&lab.ok(&["status", "--json"])?)?;
    ensure!(
        status["ipipMode"] == "Never" && status["vm"] == false,
        "the lab must run on this kernel with IPIP mode Never, it has vm={} ipipMode={}",
        status["vm"],
        status["ipipMode"]
    );

    let work = tempfile::tempdir()?;
    let pods = work.path().join("pods.yaml");
    std::fs::write(&pods, pods_yaml())?;
    lab.ok(&["kubectl", "--", "apply", "-f", path_str(&pods)?])?;
    let srv_ip = wait_running(&lab)?;
    let target = SocketAddr::new(srv_ip, PORT);
    let me = std::env::current_exe()?;
    let me = path_str(&me)?.to_string();
    wait_reachable(&lab, &me, target)?;

    let measure = |label: &str| -> Result<Value> {
        // A short warm-up so that the first phase does not pay for cold caches.
        run_client(&lab, &me, target, 1.0)?;
        let before = CpuSample::take(&args.state_dir);
        let mut r = run_client(&lab, &me, target, args.seconds)?;
        let cpu = CpuSample::take(&args.state_dir).since(&before);
        r["warren_node_cpu_pct_of_one_core"] = json!(cpu.0);
        r["host_cpu_busy_pct"] = json!(cpu.1);
        eprintln!(
            "{label}: {:.0} connections/s, warren-node {:.0} % of a core, host {:.0} % busy",
            r["rate"].as_f64().unwrap_or(0.0),
            cpu.0,
            cpu.1
        );
        Ok(r)
    };

    let base = measure("no policies")?;
    let rules_before = warren_rules(&lab)?;

    // Loads one policy set, waits until both nodes have programmed it, measures, removes it.
    let load = |tag: &str, on_pair: usize| -> Result<(Value, Vec<usize>, f64)> {
        let file = work.path().join(format!("policies-{tag}.yaml"));
        std::fs::write(&file, policies_yaml(args.policies, on_pair))?;
        let t = Instant::now();
        lab.ok(&["kubectl", "--", "create", "-f", path_str(&file)?])?;
        let rules = wait_stable(&lab, |r| r.iter().zip(&rules_before).all(|(a, b)| a > b))?;
        let programmed = t.elapsed().as_secs_f64();
        wait_reachable(&lab, &me, target)?;
        let r = measure(&format!(
            "{} policies, {} selecting the pair",
            args.policies,
            on_pair + 2
        ))?;
        // Without --wait=false kubectl waits for a deletion the API stand-in has already finished.
        lab.ok(&[
            "kubectl",
            "--",
            "delete",
            "networkpolicy",
            "--all",
            "--all-namespaces",
            "--wait=false",
        ])?;
        wait_stable(&lab, |r| r == rules_before.as_slice())?;
        Ok((r, rules, programmed))
    };
    // Typical: the pair is isolated (one policy per direction allows it, one more allows other
    // things); the other policies select other pods but name the pair's pods as peers.
    let (loaded, rules_loaded, programmed) = load("typical", 2)?;
    // Worst case: a quarter of the policies select the pair, and the one that allows it sorts
    // last, so that every new connection walks all of them.
    let (worst, rules_worst, programmed_worst) = load("worst", args.policies / 4)?;
    let after = measure("policies deleted")?;

    let rate = |v: &Value| v["rate_median_of_slices"].as_f64().unwrap_or(0.0);
    let mean_rate = |v: &Value| v["rate"].as_f64().unwrap_or(0.0);
    // The machine is shared: the reference is the mean of the two phases without policies, and
    // the median connection time is shown next to the rate because it moves less with load.
    let reference = (rate(&base) + rate(&after)) / 2.0;
    let loss = |with: f64| 100.0 * (reference - with) / reference.max(1e-9);
    let p50 = |v: &Value| v["p50_us"].as_f64().unwrap_or(0.0);
    let p50_ref = (p50(&base) + p50(&after)) / 2.0;
    println!(
        "Connection rate, {NS}/cli (node1) → {NS}/srv (node2) {target}, IPIP Never, lab on this kernel, {} s per phase",
        args.seconds
    );
    println!(
        "| phase | warren rules node1/node2 | connections | failed | conn/s mean | conn/s median 0.5 s | p50 µs | p99 µs | rate loss vs no policy | p50 vs no policy | warren-node CPU (% of a core) | host busy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let with_label = format!("{} policies, 4 select the pair", args.policies);
    let worst_label = format!("{} policies, {} select the pair", args.policies, args.policies / 4 + 2);
    for (label, r, rules) in [
        ("no policies", &base, &rules_before),
        (with_label.as_str(), &loaded, &rules_loaded),
        (worst_label.as_str(), &worst, &rules_worst),
        ("policies deleted", &after, &rules_before),
    ] {
        println!(
            "| {label} | {}/{} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} % | {:+.0} µs | {:.0} % | {:.0} % |",
            rules[0],
            rules[1],
            r["connections"],
            r["failed"],
            mean_rate(r),
            rate(r),
            r["p50_us"].as_f64().unwrap_or(0.0),
            r["p99_us"].as_f64().unwrap_or(0.0),
            loss(rate(r)),
            p50(r) - p50_ref,
            r["warren_node_cpu_pct_of_one_core"].as_f64().unwrap_or(0.0),
            r["host_cpu_busy_pct"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "{} policies created and programmed on both nodes in {programmed:.1} s (typical set) and {programmed_worst:.1} s (worst case); loss: median 0.5 s slice against the mean of both phases without policies; aim: loss < 5 %",
        args.policies
    );

    let doc = json!({
        "bench": "connrate",
        "pair": {"from": format!("{NS}/cli"), "from_node": "node1", "to": format!("{NS}/srv"), "to_node": "node2", "addr": target.to_string()},
        "lab": {"vm": false, "ipip_mode": "Never"},
        "seconds_per_phase": args.seconds,
        "policies": args.policies,
        "no_policies": base,
        "with_policies": loaded,
        "with_policies_worst_case": worst,
        "after_delete": after,
        "reference_rate": reference,
        "loss_percent": loss(rate(&loaded)),
        "loss_percent_worst_case": loss(rate(&worst)),
        "p50_added_us": p50(&loaded) - p50_ref,
        "p50_added_us_worst_case": p50(&worst) - p50_ref,
        "noise_percent": loss(rate(&after)),
        "warren_rules_node1_node2": {"without": rules_before, "with": rules_loaded, "worst_case": rules_worst},
        "policies_programmed_s": programmed,
        "policies_programmed_worst_case_s": programmed_worst,
    });
    let out = write_bench_json(args.out.as_deref(), "connrate.json", &doc)?;
    println!("wrote {}", out.display());
    ensure!(
        [&base, &loaded, &worst, &after].iter().all(|r| r["failed"] == 0),
        "connections failed (see the table): the policies must not block the pair"
    );
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The `warren-lab` CLI against one lab, taken down when dropped (also after a failure).
struct Lab {
    exe: PathBuf,
    state: PathBuf,
    down_on_drop: bool,
}

impl Lab {
    fn run(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.exe)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .output()
            .with_context(|| format!("running warren-lab {}", args.join(" ")))
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            let tail = |b: &[u8]| {
                let s = String::from_utf8_lossy(b);
                let start = s.len().saturating_sub(1500);
                s.get(start..).unwrap_or(&s).to_string()
            };
            bail!(
                "warren-lab {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                tail(&out.stdout),
                tail(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.down_on_drop {
            let _ = Command::new(&self.exe)
                .arg("--state-dir")
                .arg(&self.state)
                .arg("down")
                .status();
        }
    }
}

fn pods_yaml() -> String {
    let pod = |name: &str, node: &str, labels: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, labels: {{{labels}}}}}\n\
             spec:\n  nodeName: {node}\n  containers: [{{name: c, image: busybox, ports: [{{containerPort: {PORT}, name: http}}]}}]\n"
        )
    };
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}, labels: {{bench: connrate}}}}\n{}{}",
        pod("srv", "node2", "app: srv, tier: web"),
        pod("cli", "node1", "app: cli, tier: api")
    );
    for i in 0..OTHER_NS {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: cr-ns{i:02}, labels: {{team: t{}, env: {}}}}}\n",
            i % 5,
            ["prod", "dev"][i % 2]
        ));
    }
    out
}

/// Other namespaces the policies live in (no pods: they are compile and ipset load only).
const OTHER_NS: usize = 19;

/// `n` policies; none blocks cli → srv:8080 (the last one of each direction allows it).
/// `on_pair` of them (60 % on srv's ingress, 40 % on cli's egress) select the pair and allow
/// other things, so that they are walked before the allowing one.
fn policies_yaml(n: usize, on_pair: usize) -> String {
    let mut out = String::new();
    // Peers that never match cli (ingress) or srv (egress).
    let peer = |k: usize| {
        match k % 5 {
        0 => format!("{{podSelector: {{matchLabels: {{app: other{}}}}}}}", k % 37),
        1 => format!("{{namespaceSelector: {{matchLabels: {{team: t{}}}}}}}", k % 5),
        2 => format!(
            "{{namespaceSelector: {{matchLabels: {{env: prod}}}}, podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [db, cache{}]}}]}}}}",
            k % 11
        ),
        3 => format!(
            "{{ipBlock: {{cidr: 172.{}.0.0/16, except: [172.{}.{}.0/24]}}}}",
            16 + k % 16,
            16 + k % 16,
            k % 256
        ),
        _ => format!("{{ipBlock: {{cidr: 192.168.{}.0/24}}}}", k % 256),
    }
    };
    let ports = |k: usize| match k % 3 {
        0 => format!("[{{protocol: TCP, port: {}}}]", 9000 + k % 500),
        1 => "[{protocol: TCP, port: http}, {protocol: UDP, port: 5353}]".to_string(),
        _ => "[{protocol: UDP, port: 6000, endPort: 6100}]".to_string(),
    };
    let policy = |ns: &str, name: &str, selector: &str, ty: &str, dir: &str, peers: &str, ports: &str| {
        let key = if dir == "ingress" { "from" } else { "to" };
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  podSelector: {selector}\n  policyTypes: [{ty}]\n  {dir}:\n  - {key}: [{peers}]\n    ports: {ports}\n"
        )
    };
    let on_srv = (on_pair * 6 / 10).max(1);
    let on_cli = on_pair.saturating_sub(on_srv).max(1);
    let mut made = 0;
    for k in 0..n.saturating_sub(2) {
        let peers = format!("{}, {}", peer(k), peer(k + 2));
        let doc = if k < on_srv {
            policy(
                NS,
                &format!("srv-in-{k:04}"),
                "{matchLabels: {tier: web}}",
                "Ingress",
                "ingress",
                &peers,
                &ports(k),
            )
        } else if k < on_srv + on_cli {
            policy(
                NS,
                &format!("cli-out-{k:04}"),
                "{matchLabels: {app: cli}}",
                "Egress",
                "egress",
                &peers,
                &ports(k),
            )
        } else {
            // Some in the pair's namespace, selecting labels its pods do not have.
            let (ns, sel) = if k % 20 == 0 {
                (NS.to_string(), "{matchLabels: {tier: db}}")
            } else {
                let sel = ["{matchLabels: {tier: web}}", "{matchLabels: {tier: db}}", "{}"][k % 3];
                (format!("cr-ns{:02}", k % OTHER_NS), sel)
            };
            let (ty, dir) = if k % 4 == 0 {
                ("Egress", "egress")
            } else {
                ("Ingress", "ingress")
            };
            let peers = format!("{}, {{namespaceSelector: {{matchLabels: {{bench: connrate}}}}, podSelector: {{matchLabels: {{app: srv}}}}}}", peer(k));
            policy(&ns, &format!("other-{k:04}"), sel, ty, dir, &peers, &ports(k))
        };
        out.push_str(&doc);
        made += 1;
    }
    if made < n {
        out.push_str(&policy(
            NS,
            "zz-allow-cli",
            "{matchLabels: {app: srv}}",
            "Ingress",
            "ingress",
            "{podSelector: {matchLabels: {app: cli}}}",
            &format!("[{{protocol: TCP, port: {PORT}}}]"),
        ));
        made += 1;
    }
    if made < n {
        out.push_str(&policy(
            NS,
            "zz-allow-to-srv",
            "{matchLabels: {app: cli}}",
            "Egress",
            "egress",
            "{podSelector: {matchLabels: {app: srv}}}",
            "[{protocol: TCP, port: http}]",
        ));
    }
    out
}

/// Waits for both pods to run; returns srv's address.
fn wait_running(lab: &Lab) -> Result<std::net::IpAddr> {
    let t = Instant::now();
    loop {
        let v: Value = serde_json::from_str(&lab.ok(&["kubectl", "--", "get", "pods", "-n", NS, "-o", "json"])?)?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let running = |name: &str| {
            items
                .iter()
                .find(|p| p["metadata"]["name"] == name && p["status"]["phase"] == "Running")
                .and_then(|p| p["status"]["podIP"].as_str().map(str::to_string))
        };
        if let (Some(srv), Some(_)) = (running("srv"), running("cli")) {
            return srv.parse().with_context(|| format!("srv has address {srv:?}"));
        }
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "pods not Running after 120 s: {v}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Waits until the client gets through (a new pod's chains may take a moment).
fn wait_reachable(lab: &Lab, me: &str, target: SocketAddr) -> Result<()> {
    let t = Instant::now();
    loop {
        match run_client(lab, me, target, 0.2) {
            Ok(r) if r["failed"] == 0 && r["connections"].as_u64().unwrap_or(0) > 0 => return Ok(()),
            Ok(r) => ensure!(t.elapsed() < Duration::from_secs(60), "cli cannot reach srv: {r}"),
            Err(e) => ensure!(t.elapsed() < Duration::from_secs(60), "cli cannot reach srv: {e:#}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn run_client(lab: &Lab, me: &str, target: SocketAddr, seconds: f64) -> Result<Value> {
    let out = lab.ok(&[
        "exec",
        &format!("{NS}/cli"),
        "--",
        me,
        "--client",
        &target.to_string(),
        "--seconds",
        &seconds.to_string(),
    ])?;
    let line = out.lines().last().context("the client printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("client output {out:?}"))
}

/// Rules in warren's chains (`-A WARREN-…`, either iptables backend) on node1 and node2.
fn warren_rules(lab: &Lab) -> Result<Vec<usize>> {
    ["node1", "node2"]
        .iter()
        .map(|n| {
            let node = format!("node:{n}");
            let text = lab.ok(&[
                "exec",
                &node,
                "--",
                "sh",
                "-c",
                "iptables-nft-save -t filter 2>/dev/null; iptables-legacy-save -t filter 2>/dev/null; true",
            ])?;
            Ok(text.lines().filter(|l| l.starts_with("-A WARREN-")).count())
        })
        .collect()
}

/// Polls the nodes' rule counts until `done` holds and they have not moved for 2 s.
fn wait_stable(lab: &Lab, done: impl Fn(&[usize]) -> bool) -> Result<Vec<usize>> {
    let t = Instant::now();
    let mut last = vec![];
    let mut since = Instant::now();
    loop {
        let now = warren_rules(lab)?;
        if now != last {
            last = now;
            since = Instant::now();
        } else if done(&last) && since.elapsed() >= Duration::from_secs(2) {
            return Ok(last);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(180),
            "warren rules on node1/node2 did not settle in 180 s: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// CPU counters at one moment: the lab's warren-node processes (with their reaped children, the
/// iptables and ipset commands) and the whole host, in clock ticks.
struct CpuSample {
    warren_node: u64,
    host_busy: u64,
    host_total: u64,
}

impl CpuSample {
    fn take(state_dir: &Path) -> CpuSample {
        let stat_fields = |pid: u32| -> Option<(String, u32, u64)> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let comm = stat[open + 1..close].to_string();
            let f: Vec<u64> = stat[close + 2..]
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            // After the comm: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
            let ppid = u32::try_from(*f.get(1)?).ok()?;
            Some((comm, ppid, f.get(11..15)?.iter().sum()))
        };
        let procs: Vec<(u32, String, u32, u64)> = std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .filter_map(|pid| stat_fields(pid).map(|(c, pp, t)| (pid, c, pp, t)))
                    .collect()
            })
            .unwrap_or_default();
        // The lab's controller, found by its state directory; its descendants are the lab's.
        let state = state_dir.to_string_lossy();
        let controller = procs.iter().map(|p| p.0).find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.contains("__controller") && c.contains(&*state)
            })
        });
        let mut ours: Vec<u32> = controller.into_iter().collect();
        let mut i = 0;
        while i < ours.len() {
            let parent = ours[i];
            ours.extend(procs.iter().filter(|p| p.2 == parent).map(|p| p.0));
            i += 1;
        }
        let warren_node = procs
            .iter()
            .filter(|p| ours.contains(&p.0) && p.1 == "warren-node")
            .map(|p| p.3)
            .sum();
        let cpu: Vec<u64> = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
            .map(|l| l.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect())
            .unwrap_or_default();
        let total: u64 = cpu.iter().take(8).sum();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        CpuSample {
            warren_node,
            host_busy: total.saturating_sub(idle),
            host_total: total,
        }
    }

    /// (warren-node CPU in % of one core, host busy in % of all cores) since `before`.
    fn since(&self, before: &CpuSample) -> (f64, f64) {
        let total = self.host_total.saturating_sub(before.host_total).max(1) as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wn = self.warren_node.saturating_sub(before.warren_node) as f64;
        (
            100.0 * wn * cores / total,
            100.0 * self.host_busy.saturating_sub(before.host_busy) as f64 / total,
        )
    }
}

/// Connect, read the server's one-line answer to its end, close; sequentially for `dur`.
fn client(addr: SocketAddr, dur: Duration) -> Result<Value> {
    let mut lat = Vec::new();
    let mut failed = 0u64;
    let mut first_error = String::new();
    let mut buf = Vec::with_capacity(128);
    // Completed connections per slice: on a shared machine the median slice shows the rate with
    // less of the other tenants' bursts than the mean does.
    const SLICE: Duration = Duration::from_millis(500);
    let mut slices = vec![0u64; (dur.as_secs_f64() / SLICE.as_secs_f64()).ceil() as usize + 1];
    let start = Instant::now();
    while start.elapsed() < dur {
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            buf.clear();
            s.read_to_end(&mut buf)?;
            if buf.is_empty() {
                return Err(std::io::Error::other("empty answer"));
            }
            Ok(())
        });
        match r {
            Ok(()) => {
                lat.push(t.elapsed());
                let i = (start.elapsed().as_secs_f64() / SLICE.as_secs_f64()) as usize;
                if let Some(n) = slices.get_mut(i) {
                    *n += 1;
                }
            }
            Err(e) => {
                failed += 1;
                if first_error.is_empty() {
                    first_error = e.to_string();
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let full = ((elapsed / SLICE.as_secs_f64()) as usize).min(slices.len());
    let mut counts = slices[..full].to_vec();
    counts.sort_unstable();
    let slice_median = counts
        .get(counts.len() / 2)
        .map_or(0.0, |&n| n as f64 / SLICE.as_secs_f64());
    lat.sort();
    let pct = |q: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Ok(json!({
        "connections": lat.len(),
        "failed": failed,
        "first_error": first_error,
        "seconds": elapsed,
        "rate": lat.len() as f64 / elapsed,
        "rate_median_of_slices": slice_median,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
    }))
}
