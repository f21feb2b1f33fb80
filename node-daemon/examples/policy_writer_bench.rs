//! NetworkPolicy writer benchmark (root): the policy compiler and the REAL iptables/ipset writer
//! (`node_daemon::writer::Writer` driving `iptables-{nft,legacy}-{save,restore}` and `ipset`),
//! each job in a fresh network namespace that is deleted afterwards, even when the job panics.
//! Workload interfaces are simulated: iptables accepts rules for `cali*` names that do not exist.
//!
//! For 1 000 / 10 000 pods and 200 / 1 000 policies (the simulated cluster of the policy crate's
//! `scale` example, compiled for one node with 100 local pods):
//! - rules and ipsets (with members) as the kernel holds them after a cold full sync;
//! - the cold full sync (compile + apply), and a no-op resync (what each periodic drift check costs);
//! - policy edit → programmed (incremental compile, as warren-node does it, + apply), median and
//!   p95 over `--edits` successive edits (with iptables-nft written make-before-break; the
//!   cleanup warren-node does a second later, off the latency path, is timed on its own);
//! - the bench process's peak RSS (it holds what the daemon holds: model, compiled state, writer).
//!
//! And one new local pod programmed into a filter table already holding ~100 000 rules versus
//! the same without them (ratio). Every apply is broken down by command, which shows where the
//! time goes. Prints tables and writes JSON (default `target/bench/policy_writer.json`).
//!
//! Run: `cargo build --release -p node-daemon --examples &&
//!       $CARGO_TARGET_DIR/release/examples/policy_writer_bench [--backends nft,legacy] [--edits 20]
//!       [--filler 100000] [--out PATH]`
//! With `WARREN_BENCH_DUMP=DIR`, each size's filter table and ipsets after the cold sync are
//! saved to `DIR/<backend>-<pods>-<policies>.{filter,ipset}`, to replay or time by hand.

#[path = "../policy/examples/common/mod.rs"]
mod cluster;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cluster::{edit_policy, p50_p95_ms, write_json, Lcg, NODE, SIZES};
use conf::dataplane::DesiredDataplane;
use node_daemon::writer::{self, Backend, CmdError, CommandRunner, ExecRunner, Writer};
use policy::compile::Compiler;
use policy::model::Model;
use policy::NodeCtx;
use serde_json::{json, Value};

const JOB: &str = "__job";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(JOB) {
        let spec: Value = serde_json::from_str(args.get(1).context("job spec")?)?;
        let out = run_job(&spec)?;
        println!("{out}");
        return Ok(());
    }
    ensure!(
        nix::unistd::geteuid().is_root(),
        "run as root (each job makes a network namespace)"
    );
    let mut opts = Opts {
        backends: vec!["nft".into(), "legacy".into()],
        edits: 20,
        filler: 100_000,
        out: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/bench/policy_writer.json"
        )),
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--help" || a == "-h" {
            println!("usage: policy_writer_bench [--backends nft,legacy] [--edits N] [--filler RULES] [--out PATH]");
            return Ok(());
        }
        let v = it.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--backends" => opts.backends = v.split(',').map(str::to_string).collect(),
            "--edits" => opts.edits = v.parse().context("--edits")?,
            "--filler" => opts.filler = v.parse().context("--filler")?,
            "--out" => opts.out = PathBuf::from(v),
            _ => bail!("usage: policy_writer_bench [--backends nft,legacy] [--edits N] [--filler RULES] [--out PATH]"),
        }
    }
    for b in &opts.backends {
        backend(b)?;
    }
    ensure!(opts.edits >= 1, "--edits must be at least 1");
    orchestrate(&opts)
}

struct Opts {
    backends: Vec<String>,
    edits: usize,
    filler: usize,
    out: PathBuf,
}

fn backend(name: &str) -> Result<Backend> {
    match name {
        "nft" => Ok(Backend::nft()),
        "legacy" => Ok(Backend::legacy()),
        other => bail!("unknown backend {other:?} (nft or legacy)"),
    }
}

/// A network namespace that exists exactly as long as this value.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Result<Self> {
        let st = Command::new("ip").args(["netns", "add", &name]).status()?;
        ensure!(st.success(), "ip netns add {name} failed");
        Ok(Netns(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs one job in its own namespace; the job prints its result as one JSON line.
fn spawn_job(spec: &Value, seq: usize) -> Result<Value> {
    let ns = Netns::new(format!("wpb-{}-{seq}", std::process::id()))?;
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe()?)
        .arg(JOB)
        .arg(spec.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "job {spec} failed ({})", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("job printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

fn orchestrate(o: &Opts) -> Result<()> {
    let mut seq = 0;
    let mut syncs = vec![];
    println!("Writer at scale, node {NODE} (100 local pods); times in ms; edit = compile + apply, {} successive policy edits", o.edits);
    println!(
        "| backend | pods | policies | warren rules | ipsets | members | cold sync (compile+apply) | no-op resync | edit p50 | edit p95 | of which apply p50 | later cleanup p50 | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for b in &o.backends {
        for (pods, pols) in SIZES {
            seq += 1;
            let r = spawn_job(
                &json!({"kind": "sync", "backend": b, "pods": pods, "policies": pols, "edits": o.edits}),
                seq,
            )?;
            println!(
                "| {b} | {pods} | {pols} | {} | {} | {} | {:.0} ({:.0}+{:.0}) | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} |",
                r["warren_rules"],
                r["ipsets"],
                r["ipset_members"],
                f(&r["cold_total_ms"]),
                f(&r["compile_ms"]),
                f(&r["cold_apply_ms"]),
                f(&r["noop_resync_ms"]),
                f(&r["edit_total_ms_p50"]),
                f(&r["edit_total_ms_p95"]),
                f(&r["edit_apply_ms_p50"]),
                f(&r["edit_tidy_ms_p50"]),
                f(&r["peak_rss_kib"]) / 1024.0
            );
            syncs.push(r);
        }
    }
    println!();
    println!("Where an edit's apply goes (median ms per step; save = `<backend>-save -t <table>`):");
    for r in &syncs {
        println!(
            "  {} {}/{}: {}",
            r["backend"].as_str().unwrap_or(""),
            r["pods"],
            r["policies"],
            breakdown_text(&r["edit_breakdown_ms_p50"])
        );
    }
    let absorbed: u64 = syncs.iter().filter_map(|r| r["edits_absorbed"].as_u64()).sum();
    if absorbed > 0 {
        println!(
            "  ({absorbed} edits over all sizes added only what another rule of their policy already allowed: \
             nothing to program, so they were skipped and are not in the figures)"
        );
    }

    println!();
    println!(
        "One new local pod (1000 pods / 200 policies), without and with ~{} foreign rules in the filter table:",
        o.filler
    );
    println!("| backend | filter rules before | apply p50 | apply p95 | compile p50 | where the apply goes (p50) |");
    println!("|---|---|---|---|---|---|");
    let mut adds = vec![];
    let mut ratios = serde_json::Map::new();
    for b in &o.backends {
        let mut p50 = vec![];
        for filler in [0, o.filler] {
            seq += 1;
            let r = spawn_job(&json!({"kind": "pod_add", "backend": b, "filler": filler}), seq)?;
            println!(
                "| {b} | {} | {:.1} | {:.1} | {:.1} | {} |",
                r["table_rules_before"],
                f(&r["apply_ms_p50"]),
                f(&r["apply_ms_p95"]),
                f(&r["compile_ms_p50"]),
                breakdown_text(&r["breakdown_ms_p50"])
            );
            p50.push(f(&r["apply_ms_p50"]));
            adds.push(r);
        }
        let ratio = p50[1] / p50[0].max(1e-9);
        ratios.insert(b.clone(), json!(ratio));
    }
    for (b, r) in &ratios {
        println!(
            "pod-add cost ratio, ~{} rules vs none, {b}: {:.1}x (aim ≤ 2x)",
            o.filler,
            f(r)
        );
    }
    let doc = json!({
        "bench": "policy_writer",
        "node": NODE,
        "local_pods": cluster::PODS_PER_NODE,
        "edits": o.edits,
        "sync": syncs,
        "pod_add": adds,
        "pod_add_ratio": ratios,
        "note": "times in ms; edit = compile + writer apply after one policy edit; peak RSS = VmHWM of the job process (compiler + writer), children not included",
    });
    write_json(&o.out, &doc).with_context(|| format!("writing {}", o.out.display()))?;
    println!("wrote {}", o.out.canonicalize().unwrap_or(o.out.clone()).display());
    Ok(())
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn breakdown_text(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, t)| f(t) >= 0.05)
                .map(|(k, t)| format!("{k} {:.1}", f(t)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// The real runner, timing every command by what it is (the writer's steps).
struct Timed {
    inner: ExecRunner,
    log: Mutex<Vec<(String, Duration)>>,
}

impl Timed {
    fn new() -> Self {
        Timed {
            inner: ExecRunner::new(),
            log: Mutex::new(vec![]),
        }
    }

    /// The time per step since the last call, summed per step name.
    fn take(&self) -> BTreeMap<String, Duration> {
        let mut out = BTreeMap::new();
        let log = std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()));
        for (k, d) in log {
            *out.entry(k).or_insert(Duration::ZERO) += d;
        }
        out
    }
}

impl CommandRunner for Timed {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CmdError> {
        let t = Instant::now();
        let r = self.inner.run(program, args, stdin);
        let step = if program == "ipset" {
            format!("ipset {}", args.first().copied().unwrap_or(""))
        } else if program.ends_with("-save") {
            format!("save {}", args.get(1).copied().unwrap_or("all"))
        } else if program.ends_with("-restore") {
            "iptables-restore".to_string()
        } else {
            program.to_string()
        };
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((step, t.elapsed()));
        r
    }
}

/// Adds the apply's time outside the commands (read-back parsing, planning) as its own step.
fn with_in_process(mut steps: BTreeMap<String, Duration>, apply: Duration) -> BTreeMap<String, Duration> {
    let commands: Duration = steps.values().sum();
    steps.insert("in-process".to_string(), apply.saturating_sub(commands));
    steps
}

/// Median per step over several applies, in ms.
fn median_breakdown(all: &[BTreeMap<String, Duration>]) -> Value {
    let mut steps: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for b in all {
        for (k, d) in b {
            steps.entry(k).or_default().push(*d);
        }
    }
    let m: serde_json::Map<String, Value> = steps
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(p50_p95_ms(&v).0)))
        .collect();
    Value::Object(m)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run_job(spec: &Value) -> Result<Value> {
    let b = backend(spec["backend"].as_str().context("backend")?)?;
    match spec["kind"].as_str() {
        Some("sync") => {
            let n = |k: &str| {
                spec[k]
                    .as_u64()
                    .map(|v| v as usize)
                    .with_context(|| format!("{k} missing"))
            };
            sync_job(b, n("pods")?, n("policies")?, n("edits")?)
        }
        Some("pod_add") => pod_add_job(b, spec["filler"].as_u64().context("filler")? as usize),
        other => bail!("unknown job {other:?}"),
    }
}

/// Compiles as warren-node does: incrementally, from what `inc` compiled before.
fn compiled(inc: &mut Compiler, m: &Model) -> Result<(DesiredDataplane, Duration)> {
    let t = Instant::now();
    let ctx = NodeCtx::from_model(m, NODE, conf::names::HOST_VETH_PREFIX)?;
    let c = inc.compile(m, &ctx);
    ensure!(c.errors.is_empty(), "compile errors: {:?}", c.errors);
    Ok((c.dataplane, t.elapsed()))
}

/// What the kernel holds: (warren rules incl. hooks, all filter rules, warren sets, members).
fn kernel_counts(w: &Writer<Timed>) -> Result<(usize, usize, usize, usize)> {
    let r = &w.runner().inner;
    let mut warren_rules = 0;
    let mut filter_rules = 0;
    for table in writer::iptables::ALL_TABLES {
        let text = r.run(w.backend().save, &["-t", table.name()], None)?;
        let t = writer::iptables::parse_save(&text);
        for (chain, rules) in &t.chains {
            if table.name() == "filter" {
                filter_rules += rules.len();
            }
            warren_rules += if writer::iptables::is_ours(chain) {
                rules.len()
            } else {
                rules.iter().filter(|r| r.hash.is_some()).count()
            };
        }
    }
    let sets = writer::ipset::parse_save(&r.run("ipset", &["save"], None)?);
    let members = sets.values().map(|s| s.members.len()).sum();
    Ok((warren_rules, filter_rules, sets.len(), members))
}

/// The peak RSS of this job (each job is its own process, so it covers this job only).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn sync_job(b: Backend, pods: usize, pols: usize, edits: usize) -> Result<Value> {
    let backend_name = if b == Backend::nft() { "nft" } else { "legacy" };
    let mut w = Writer::new(Timed::new(), b);
    let mut inc = Compiler::new();
    let mut m = cluster::cluster(pods, pols);
    let (desired, compile_time) = compiled(&mut inc, &m)?;
    let t = Instant::now();
    let rep = w.apply(&desired, true)?;
    let cold_apply = t.elapsed();
    let cold_breakdown = with_in_process(w.runner().take(), cold_apply);
    ensure!(!rep.changed.is_empty(), "the cold sync wrote nothing");
    if let Some(dir) = std::env::var_os("WARREN_BENCH_DUMP") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let save = |cmd: &str, args: &[&str], file: String| -> Result<()> {
            let out = Command::new(cmd)
                .args(args)
                .output()
                .with_context(|| format!("running {cmd}"))?;
            let path = dir.join(file);
            std::fs::write(&path, out.stdout).with_context(|| format!("writing {}", path.display()))?;
            Ok(())
        };
        save(
            w.backend().save,
            &["-t", "filter"],
            format!("{backend_name}-{pods}-{pols}.filter"),
        )?;
        save("ipset", &["save"], format!("{backend_name}-{pods}-{pols}.ipset"))?;
    }
    let (warren_rules, filter_rules, ipsets, members) = kernel_counts(&w)?;
    let expected_rules: usize = desired.chains.values().map(|c| c.len()).sum::<usize>() + desired.hooks.len();
    ensure!(
        warren_rules == expected_rules && ipsets == desired.ipsets.len(),
        "kernel holds {warren_rules} rules / {ipsets} sets, compiled {expected_rules} / {}",
        desired.ipsets.len()
    );
    w.runner().take();

    let t = Instant::now();
    let rep = w.apply(&desired, true)?;
    let noop = t.elapsed();
    ensure!(
        rep.changed.is_empty(),
        "a second apply of the same state changed {:?}",
        rep.changed
    );
    w.runner().take();

    // Edits arrive between resyncs: warren-node diffs them against what it wrote last.
    w.read_back = false;
    let mut totals = vec![];
    let mut applies = vec![];
    let mut compiles = vec![];
    let mut breakdowns = vec![];
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut tidies = vec![];
    let mut prev = desired;
    // An edit the compiler absorbs (another rule of the policy already allows what it adds)
    // programs nothing: it is skipped, counted, and the next one is taken.
    let mut absorbed = 0;
    let mut i = 0;
    while totals.len() < edits {
        ensure!(absorbed <= edits, "{absorbed} policy edits changed nothing");
        let t = Instant::now();
        let kind = edit_policy(&mut m, i);
        i += 1;
        let (d, c) = compiled(&mut inc, &m)?;
        let compiled_at = t.elapsed();
        if d == prev {
            absorbed += 1;
            continue;
        }
        let ta = Instant::now();
        let rep = w.apply(&d, true)?;
        let apply = ta.elapsed();
        *kinds.entry(kind).or_default() += 1;
        applies.push(apply);
        totals.push(compiled_at + apply);
        compiles.push(c);
        ensure!(!rep.changed.is_empty(), "edit {i} changed nothing in the kernel");
        breakdowns.push(with_in_process(w.runner().take(), apply));
        prev = d;
        // warren-node removes make-before-break leftovers once events are quiet for a second,
        // off the latency path; timed on its own.
        let tt = Instant::now();
        w.tidy()?;
        tidies.push(tt.elapsed());
        w.runner().take();
    }
    // The next resync reads the kernel back: it must hold exactly what the edits meant.
    w.read_back = true;
    let (d, _) = compiled(&mut inc, &m)?;
    let rep = w.apply(&d, true)?;
    ensure!(
        rep.changed.is_empty(),
        "the kernel differs after the edits: {:?}",
        rep.changed
    );
    w.runner().take();
    let (tp50, tp95) = p50_p95_ms(&totals);
    let (ap50, ap95) = p50_p95_ms(&applies);
    let (cp50, _) = p50_p95_ms(&compiles);
    let (tidy50, _) = p50_p95_ms(&tidies);
    Ok(json!({
        "backend": backend_name,
        "make_before_break": w.make_before_break,
        "edit_tidy_ms_p50": tidy50,
        "pods": pods,
        "policies": pols,
        "warren_rules": warren_rules,
        "filter_rules": filter_rules,
        "ipsets": ipsets,
        "ipset_members": members,
        "compile_ms": ms(compile_time),
        "cold_apply_ms": ms(cold_apply),
        "cold_total_ms": ms(compile_time + cold_apply),
        "cold_breakdown_ms": median_breakdown(&[cold_breakdown]),
        "noop_resync_ms": ms(noop),
        "edits": edits,
        "edit_kinds": kinds,
        "edits_absorbed": absorbed,
        "edit_total_ms_p50": tp50,
        "edit_total_ms_p95": tp95,
        "edit_apply_ms_p50": ap50,
        "edit_apply_ms_p95": ap95,
        "edit_compile_ms_p50": cp50,
        "edit_breakdown_ms_p50": median_breakdown(&breakdowns),
        "peak_rss_kib": peak_rss_kib(),
    }))
}

/// Loads `rules` foreign rules (kube-proxy-like service endpoint chains, never hooked) into the
/// filter table in one restore.
fn load_filler(w: &Writer<Timed>, rules: usize) -> Result<()> {
    if rules == 0 {
        return Ok(());
    }
    const PER_CHAIN: usize = 100;
    let chains = rules.div_ceil(PER_CHAIN);
    let mut text = String::from("*filter\n");
    for c in 0..chains {
        text.push_str(&format!(":KUBE-SEP-FILL{c:05} - [0:0]\n"));
    }
    for i in 0..rules {
        let c = i / PER_CHAIN;
        text.push_str(&format!(
            "-A KUBE-SEP-FILL{c:05} -s 10.{}.{}.{}/32 -p tcp -m tcp --dport {} -j RETURN\n",
            200 + (i >> 16) % 50,
            (i >> 8) & 255,
            i & 255,
            1024 + i % 30000
        ));
    }
    text.push_str("COMMIT\n");
    w.runner()
        .inner
        .run(w.backend().restore, &["--noflush", "--wait"], Some(&text))?;
    Ok(())
}

fn pod_add_job(b: Backend, filler: usize) -> Result<Value> {
    const ADDS: usize = 10;
    let backend_name = if b == Backend::nft() { "nft" } else { "legacy" };
    let mut w = Writer::new(Timed::new(), b);
    let mut inc = Compiler::new();
    let t = Instant::now();
    load_filler(&w, filler)?;
    let filler_load = t.elapsed();
    let mut m = cluster::cluster(1000, 200);
    let (desired, _) = compiled(&mut inc, &m)?;
    w.apply(&desired, true)?;
    let (_, table_rules, _, _) = kernel_counts(&w)?;
    w.runner().take();
    // A new pod arrives between resyncs: warren-node diffs it against what it wrote last.
    w.read_back = false;

    let mut r = Lcg(7);
    let mut applies = vec![];
    let mut compiles = vec![];
    let mut breakdowns = vec![];
    for k in 0..ADDS {
        // A pod number far above the cluster's: a fresh name, address and interface.
        std::sync::Arc::make_mut(&mut m.pods).push(cluster::pod(&mut r, 50_000 + k, NODE.to_string()));
        let (d, c) = compiled(&mut inc, &m)?;
        let t = Instant::now();
        let rep = w.apply(&d, true)?;
        let apply = t.elapsed();
        applies.push(apply);
        compiles.push(c);
        ensure!(
            rep.changed.iter().any(|c| c.contains(policy::compile::SET_WORKLOADS)),
            "the new pod was not programmed: {:?}",
            rep.changed
        );
        breakdowns.push(with_in_process(w.runner().take(), apply));
        w.tidy()?;
        w.runner().take();
    }
    let (ap50, ap95) = p50_p95_ms(&applies);
    let (cp50, _) = p50_p95_ms(&compiles);
    Ok(json!({
        "backend": backend_name,
        "filler_rules": filler,
        "filler_load_ms": ms(filler_load),
        "table_rules_before": table_rules,
        "pods_added": ADDS,
        "apply_ms_p50": ap50,
        "apply_ms_p95": ap95,
        "compile_ms_p50": cp50,
        "breakdown_ms_p50": median_breakdown(&breakdowns),
    }))
}
