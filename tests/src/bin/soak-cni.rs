//! soak-cni: fault-injection soak of warren's ADD/DEL.
//!
//! `--cycles` ADD/DEL cycles run `--concurrency` at a time, each pod in a fresh network namespace
//! (the plugins' host side is one private namespace for the whole run). About `--kill-percent` of
//! plugin processes get SIGKILL at a random moment of their run. Like kubelet, the soak sometimes
//! retries DEL after a killed call; the other half it forgets, leaving the crash's debris for GC.
//! A few pods per run (`--survivors`) stay up throughout and are the GC's valid attachments.
//!
//! Checked and printed: no address is ever handed out twice while its pod lives (every successful
//! ADD against the live set, and a final scan of every namespace still alive), GC keeps exactly
//! the valid attachments, and after the survivors' DEL nothing is left: no IP file, no `cali*`
//! link, no /32 route. Exits non-zero on any violation. JSON in `target/bench/soak-cni.json`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use integration_tests::runtime::{
    enter_private_netns, host_routes_32, links_with_prefix, plugin_conf, reserved_ips, result_ipv4, run_plugin,
    warren_bin_dir, warren_conflist, write_bench_json, CniCall, Leaks, PinnedNetns, PluginRun, REFERENCE_BIN_DIR,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[derive(Parser, Debug, Clone)]
#[command(about = "Fault-injection soak of warren's CNI ADD/DEL/GC")]
struct Args {
    /// ADD/DEL cycles.
    #[arg(long, default_value_t = 10_000)]
    cycles: usize,
    /// Cycles in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Share of plugin processes that get SIGKILL mid-flight, in percent.
    #[arg(long, default_value_t = 5.0)]
    kill_percent: f64,
    /// The kill lands uniformly within this many microseconds after the fork.
    #[arg(long, default_value_t = 3000)]
    kill_window_us: u64,
    /// Pods kept up through the whole run; they are GC's valid attachments.
    #[arg(long, default_value_t = 16)]
    survivors: usize,
    /// The pool; large enough for the debris that waits for GC (about 2.5% of cycles).
    #[arg(long, default_value = "10.197.0.0/20")]
    subnet: String,
    /// RNG seed (default: from the clock); printed so a failing run can be replayed.
    #[arg(long)]
    seed: Option<u64>,
    /// Directory holding `warren` (default: $WARREN_BIN_DIR or <workspace>/target/release).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long)]
    out: Option<PathBuf>,
}

const NETWORK: &str = "soak-net";
const IFNAME: &str = "eth0";
const CNI_VERSION: &str = "1.1.0";

/// A pod whose namespace still exists when the cycles end.
struct Attachment {
    id: String,
    pod: String,
    ip: Option<Ipv4Addr>,
    ns: PinnedNetns,
    /// The runtime already issued DEL (killed mid-way): its address is free for others even if
    /// the crash left it configured in this namespace.
    del_issued: bool,
}

impl Attachment {
    fn args(&self) -> String {
        pod_args(&self.pod)
    }
}

fn pod_args(pod: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=soak;K8S_POD_NAME={pod}")
}

#[derive(Default)]
struct Counters {
    add_ok: usize,
    add_killed: usize,
    add_failed: usize,
    del_ok: usize,
    del_killed: usize,
    del_failed: usize,
    retried_del: usize,
    kill_too_late: usize,
}

#[derive(Default)]
struct Shared {
    /// Address → container ID of every pod that is up from the runtime's point of view.
    live: HashMap<Ipv4Addr, String>,
    duplicates: Vec<String>,
    failures: Vec<String>,
    orphans: Vec<Attachment>,
    survivors: Vec<Attachment>,
    counters: Counters,
    add_times: Vec<Duration>,
    peak_rss_kib: u64,
}

struct Soak {
    args: Args,
    plugin: PathBuf,
    cni_path: String,
    conf: Vec<u8>,
    tmp: PathBuf,
    subnet: ipnet::Ipv4Net,
    shared: Mutex<Shared>,
    next: AtomicUsize,
}

impl Soak {
    fn state(&self) -> MutexGuard<'_, Shared> {
        // A worker that panicked mid-update poisons the lock; its data is still what we report.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn exec(&self, command: &str, id: &str, netns: &str, args: &str, kill: Option<Duration>) -> Result<PluginRun> {
        let call = CniCall {
            command,
            container_id: id,
            netns,
            ifname: IFNAME,
            args,
            cni_path: &self.cni_path,
        };
        let run = run_plugin(&self.plugin, &call, &self.conf, kill)?;
        let mut s = self.state();
        s.peak_rss_kib = s.peak_rss_kib.max(run.max_rss_kib);
        if kill.is_some() && !run.killed() {
            s.counters.kill_too_late += 1;
        }
        Ok(run)
    }

    fn maybe_kill(&self, rng: &mut StdRng) -> Option<Duration> {
        rng.gen_bool((self.args.kill_percent / 100.0).clamp(0.0, 1.0))
            .then(|| Duration::from_micros(rng.gen_range(0..=self.args.kill_window_us)))
    }

    /// DEL as a runtime retries it after a crash: it must succeed.
    fn retry_del(&self, a: &Attachment) -> Result<()> {
        let run = self.exec("DEL", &a.id, a.ns.path_str(), &a.args(), None)?;
        let mut s = self.state();
        s.counters.retried_del += 1;
        if !run.success() {
            s.failures
                .push(format!("DEL retry of {} failed: {}", a.id, run.describe()));
        }
        Ok(())
    }

    fn cycle(&self, i: usize, rng: &mut StdRng, survivor_every: usize) -> Result<()> {
        let pod = format!("pod-{i}");
        let mut a = Attachment {
            id: format!("soak-{i:06}"),
            ns: PinnedNetns::create(&self.tmp, &format!("p{i}"))?,
            pod,
            ip: None,
            del_issued: false,
        };
        let kill = self.maybe_kill(rng);
        let run = self.exec("ADD", &a.id, a.ns.path_str(), &a.args(), kill)?;
        if run.killed() {
            self.state().counters.add_killed += 1;
            if rng.gen_bool(0.5) {
                self.retry_del(&a)?;
            } else {
                self.state().orphans.push(a);
            }
            return Ok(());
        }
        if !run.success() {
            let mut s = self.state();
            s.counters.add_failed += 1;
            s.failures
                .push(format!("ADD {} failed without a kill: {}", a.id, run.describe()));
            drop(s);
            // The runtime cleans up a failed ADD with DEL.
            return self.retry_del(&a);
        }
        let ip = match run.json().ok().as_ref().and_then(result_ipv4) {
            Some(ip) => ip,
            None => {
                self.state()
                    .failures
                    .push(format!("ADD {} succeeded without an IPv4: {}", a.id, run.describe()));
                return self.retry_del(&a);
            }
        };
        a.ip = Some(ip);
        // Spot-check that the result describes the kernel: the address really is on the pod side.
        if i.checked_rem(50) == Some(0) {
            let configured = a.ns.ipv4_addrs()?;
            if !configured.contains(&ip) {
                self.state()
                    .failures
                    .push(format!("ADD {} returned {ip} but the pod has {configured:?}", a.id));
            }
        }
        {
            let mut s = self.state();
            s.counters.add_ok += 1;
            s.add_times.push(run.elapsed);
            if !self.subnet.contains(&ip) {
                s.failures
                    .push(format!("ADD {} got {ip}, outside {}", a.id, self.subnet));
            }
            if let Some(holder) = s.live.insert(ip, a.id.clone()) {
                s.duplicates
                    .push(format!("{ip} handed to {} while {holder} holds it", a.id));
            }
            if i.checked_rem(survivor_every) == Some(0) && s.survivors.len() < self.args.survivors {
                s.survivors.push(a);
                return Ok(());
            }
        }
        // From the moment DEL starts the address may be reused, so it leaves the live set first.
        self.state().live.remove(&ip);
        let kill = self.maybe_kill(rng);
        let run = self.exec("DEL", &a.id, a.ns.path_str(), &a.args(), kill)?;
        a.del_issued = true;
        if run.killed() {
            self.state().counters.del_killed += 1;
            if rng.gen_bool(0.5) {
                self.retry_del(&a)?;
            } else {
                self.state().orphans.push(a);
            }
        } else if run.success() {
            self.state().counters.del_ok += 1;
        } else {
            let mut s = self.state();
            s.counters.del_failed += 1;
            s.failures
                .push(format!("DEL {} failed without a kill: {}", a.id, run.describe()));
        }
        Ok(())
    }

    fn worker(&self, seed: u64, survivor_every: usize) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(seed);
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.args.cycles {
                return Ok(());
            }
            self.cycle(i, &mut rng, survivor_every)
                .with_context(|| format!("cycle {i}"))?;
            if (i + 1).checked_rem(1000) == Some(0) {
                eprintln!("soak-cni: {} cycles started", i + 1);
            }
        }
    }

    fn gc(&self, valid: &[&Attachment]) -> Result<PluginRun> {
        let mut conf: Value = serde_json::from_slice(&self.conf)?;
        conf["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|a| json!({ "containerID": a.id, "ifname": IFNAME }))
            .collect::<Vec<_>>()
            .into();
        let call = CniCall {
            command: "GC",
            container_id: "",
            netns: "",
            ifname: "",
            args: "",
            cni_path: &self.cni_path,
        };
        run_plugin(&self.plugin, &call, &serde_json::to_vec(&conf)?, None)
    }
}

/// Every IPv4 address configured in any of the namespaces, and the ones that appear twice.
fn scan_duplicates(atts: &[&Attachment]) -> Result<(usize, Vec<String>)> {
    let mut seen: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    let mut dups = Vec::new();
    for a in atts {
        for ip in a.ns.ipv4_addrs()? {
            if ip.is_loopback() {
                continue;
            }
            if let Some(other) = seen.insert(ip, &a.id) {
                dups.push(format!("{ip} configured in both {other} and {}", a.id));
            }
        }
    }
    Ok((seen.len(), dups))
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        nix::unistd::geteuid().is_root(),
        "soak-cni needs root (network namespaces)"
    );
    ensure!(
        args.cycles > 0 && args.concurrency > 0,
        "--cycles and --concurrency must be positive"
    );
    enter_private_netns()?;
    let tmp = tempfile::Builder::new().prefix("soak-cni").tempdir_in("/tmp")?;
    let bin_dir = args.bin_dir.clone().unwrap_or_else(warren_bin_dir);
    let plugin = bin_dir.join("warren");
    ensure!(
        plugin.is_file(),
        "{} is missing: cargo build --release -p cni-bin, or pass --bin-dir",
        plugin.display()
    );
    let data_dir = tmp.path().join("ipam");
    let list = warren_conflist(NETWORK, CNI_VERSION, &args.subnet, &data_dir);
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let soak = Arc::new(Soak {
        subnet: args.subnet.parse().context("--subnet")?,
        cni_path: format!("{}:{REFERENCE_BIN_DIR}", bin_dir.display()),
        conf: serde_json::to_vec(&plugin_conf(&list, 0)?)?,
        plugin,
        tmp: tmp.path().to_path_buf(),
        shared: Mutex::new(Shared::default()),
        next: AtomicUsize::new(0),
        args: args.clone(),
    });
    println!(
        "soak-cni: {} cycles, {} at once, kill {}% within {} µs, seed {seed}",
        args.cycles, args.concurrency, args.kill_percent, args.kill_window_us
    );
    let survivor_every = (args.cycles / args.survivors.max(1)).max(1);
    let start = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let soak = Arc::clone(&soak);
            std::thread::spawn(move || soak.worker(seed.wrapping_add(w as u64), survivor_every))
        })
        .collect();
    let mut harness_errors = Vec::new();
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => harness_errors.push(format!("{e:#}")),
            Err(_) => harness_errors.push("worker panicked".to_string()),
        }
    }
    let cycles_wall = start.elapsed();
    let mut shared = std::mem::take(&mut *soak.state());
    let survivors = std::mem::take(&mut shared.survivors);
    let orphans = std::mem::take(&mut shared.orphans);

    // 1. No two pods the runtime never deleted share an address: survivors, and pods whose ADD
    //    was killed (whatever address such a crash configured must still be reserved).
    let alive: Vec<&Attachment> = survivors
        .iter()
        .chain(orphans.iter().filter(|a| !a.del_issued))
        .collect();
    let (addresses_alive, scan_dups) = scan_duplicates(&alive)?;
    shared.duplicates.extend(scan_dups);

    // 2. GC with the survivors as the valid attachments: it must remove exactly the debris.
    let valid: Vec<&Attachment> = survivors.iter().collect();
    let before_gc = Leaks::probe(None, conf::names::HOST_VETH_PREFIX, &data_dir, NETWORK)?;
    let gc = soak.gc(&valid)?;
    if !gc.success() {
        shared.failures.push(format!("GC failed: {}", gc.describe()));
    }
    let want_ips: BTreeSet<IpAddr> = survivors.iter().filter_map(|a| a.ip.map(IpAddr::V4)).collect();
    let want_links: BTreeSet<String> = survivors
        .iter()
        .map(|a| {
            let key = conf::names::workload_key(Some("soak"), Some(&a.pod), &a.id);
            conf::names::host_veth_name(conf::names::HOST_VETH_PREFIX, &key).unwrap_or_default()
        })
        .collect();
    let after_ips = reserved_ips(&data_dir, NETWORK)?;
    let after_links: BTreeSet<String> = links_with_prefix(None, conf::names::HOST_VETH_PREFIX)?
        .into_iter()
        .collect();
    let after_routes = host_routes_32(None)?;
    let gc_leaked_ips: Vec<_> = after_ips.difference(&want_ips).collect();
    let gc_lost_ips: Vec<_> = want_ips.difference(&after_ips).collect();
    let gc_leaked_links: Vec<_> = after_links.difference(&want_links).collect();
    let gc_lost_links: Vec<_> = want_links.difference(&after_links).collect();
    let gc_extra_routes = after_routes.len().saturating_sub(survivors.len());
    if !gc_lost_ips.is_empty() || !gc_lost_links.is_empty() {
        shared.failures.push(format!(
            "GC removed valid attachments: IPs {gc_lost_ips:?}, links {gc_lost_links:?}"
        ));
    }

    // 3. The survivors leave; then every namespace goes and nothing may remain.
    for a in &survivors {
        if let Some(ip) = a.ip {
            shared.live.remove(&ip);
        }
        let run = soak.exec("DEL", &a.id, a.ns.path_str(), &a.args(), None)?;
        if !run.success() {
            shared
                .failures
                .push(format!("DEL of survivor {} failed: {}", a.id, run.describe()));
        }
    }
    let final_leaks = Leaks::probe(None, conf::names::HOST_VETH_PREFIX, &data_dir, NETWORK)?;
    let orphan_count = orphans.len();
    drop(orphans);
    drop(survivors);

    let c = &shared.counters;
    let mut add_times = shared.add_times.clone();
    add_times.sort();
    let pct = |q: f64| {
        if add_times.is_empty() {
            0.0
        } else {
            let rank = ((q * add_times.len() as f64).ceil() as usize).clamp(1, add_times.len());
            add_times[rank - 1].as_secs_f64() * 1000.0
        }
    };
    let gc_ok = gc.success();
    let report = json!({
        "benchmark": "soak-cni",
        "seed": seed,
        "cycles": args.cycles,
        "concurrency": args.concurrency,
        "kill_percent": args.kill_percent,
        "wall_s": cycles_wall.as_secs_f64(),
        "add": { "ok": c.add_ok, "killed": c.add_killed, "failed": c.add_failed,
                 "p50_ms_under_load": pct(0.5), "p99_ms_under_load": pct(0.99) },
        "del": { "ok": c.del_ok, "killed": c.del_killed, "failed": c.del_failed, "retried": c.retried_del },
        "kills_landing_after_exit": c.kill_too_late,
        "peak_rss_kib": shared.peak_rss_kib,
        "left_for_gc": { "attachments": orphan_count, "ip_files": before_gc.ip_files.len(),
                         "links": before_gc.links.len(), "routes": before_gc.routes.len() },
        "survivors": want_ips.len(),
        "addresses_alive_at_end": addresses_alive,
        "duplicates": shared.duplicates,
        "gc": { "ok": gc_ok, "leaked_ips": gc_leaked_ips, "lost_valid_ips": gc_lost_ips,
                "leaked_links": gc_leaked_links, "lost_valid_links": gc_lost_links, "extra_routes": gc_extra_routes },
        "final": { "ip_files": final_leaks.ip_files, "links": final_leaks.links, "routes": final_leaks.routes },
        "failures": shared.failures,
        "harness_errors": harness_errors,
    });
    let row = |k: &str, v: String| println!("  {k:<46} {v}");
    println!("\nsoak-cni results ({:.1} s for the cycles)", cycles_wall.as_secs_f64());
    row(
        "ADD ok / killed / failed",
        format!("{} / {} / {}", c.add_ok, c.add_killed, c.add_failed),
    );
    row(
        "DEL ok / killed / failed",
        format!("{} / {} / {}", c.del_ok, c.del_killed, c.del_failed),
    );
    row("DEL retries after a crash", c.retried_del.to_string());
    row("kills that landed after exit", c.kill_too_late.to_string());
    row(
        "ADD p50 / p99 under load (ms)",
        format!("{:.2} / {:.2}", pct(0.5), pct(0.99)),
    );
    row("peak RSS (KiB)", shared.peak_rss_kib.to_string());
    row(
        "orphaned pods; IPs / links / routes before GC",
        format!(
            "{orphan_count} / {} / {} / {}",
            before_gc.ip_files.len(),
            before_gc.links.len(),
            before_gc.routes.len()
        ),
    );
    row("survivors (valid attachments)", want_ips.len().to_string());
    row("duplicate addresses", shared.duplicates.len().to_string());
    row("GC ok", gc_ok.to_string());
    row(
        "after GC leaked IPs / links / routes",
        format!(
            "{} / {} / {}",
            gc_leaked_ips.len(),
            gc_leaked_links.len(),
            gc_extra_routes
        ),
    );
    row(
        "after GC lost valid IPs / links",
        format!("{} / {}", gc_lost_ips.len(), gc_lost_links.len()),
    );
    row(
        "final IP files / cali links / /32 routes",
        format!(
            "{} / {} / {}",
            final_leaks.ip_files.len(),
            final_leaks.links.len(),
            final_leaks.routes.len()
        ),
    );
    row("other failures", shared.failures.len().to_string());
    for f in shared
        .failures
        .iter()
        .chain(shared.duplicates.iter())
        .chain(harness_errors.iter())
        .take(20)
    {
        println!("    ! {f}");
    }
    let out = write_bench_json(args.out.as_deref(), "soak-cni.json", &report)?;
    println!("JSON: {}", out.display());

    let clean = shared.duplicates.is_empty()
        && shared.failures.is_empty()
        && harness_errors.is_empty()
        && gc_leaked_ips.is_empty()
        && gc_leaked_links.is_empty()
        && gc_extra_routes == 0
        && final_leaks.is_empty();
    ensure!(clean, "soak-cni found violations (see above)");
    println!("soak-cni: PASS");
    Ok(())
}
