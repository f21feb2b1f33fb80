//! Scale table for the compiler: simulated clusters of 1 000 / 10 000 pods and 200 / 1 000
//! policies mixing pod selectors, namespace selectors, ipBlocks with except, named ports.
//! Prints a table and writes it as JSON (default `target/bench/policy_scale.json`, or `--out PATH`).
//! Run: `cargo run --release -p policy --example scale [-- --out PATH] [--only PODS POLICIES]
//! [--edits N]`. `--only` runs one size, so that the process's peak RSS (VmHWM) is that size's.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::{cluster, edit_policy, p50_p95_ms, write_json, NODE};
use policy::compile::Compiler;
use policy::{compile, NodeCtx};

/// Policy edits per size (the issue asks for median and p95 over at least 20).
const EDITS: usize = 20;

/// A `/proc/self/status` memory figure of this process in MiB (`VmHWM`: peak resident set;
/// `VmRSS`: current), if known.
fn rss_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn usage() -> ! {
    eprintln!("usage: scale [--out PATH] [--only PODS POLICIES] [--edits N]");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut out = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/bench/policy_scale.json"
    ));
    let mut sizes = vec![
        (1000, 0),
        (1000, 200),
        (1000, 1000),
        (10000, 0),
        (10000, 200),
        (10000, 1000),
    ];
    let mut edits = EDITS;
    let number = |a: Option<String>| a.and_then(|a| a.parse::<usize>().ok()).unwrap_or_else(|| usage());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(args.next().unwrap_or_else(|| usage())),
            "--only" => sizes = vec![(number(args.next()), number(args.next()))],
            "--edits" => edits = number(args.next()),
            _ => usage(),
        }
    }
    let mut rows = vec![];
    let mut model_rss = None;
    println!(
        "{:>6} {:>6} {:>5} {:>7} {:>7} {:>11} {:>9} {:>8} {:>6} {:>8} {:>10} {:>15}",
        "pods",
        "pols",
        "local",
        "chains",
        "rules",
        "pod rul/mem",
        "pol-rules",
        "grp-rule",
        "sets",
        "members",
        "compile",
        "edit p50/p95 ms"
    );
    for (pods, pols) in sizes {
        let m = cluster(pods, pols);
        let ctx = NodeCtx::from_model(&m, NODE, "cali").expect("valid prefix");
        // What the peak owes to the benchmark's own model (it is held twice: `m`, `changed`).
        model_rss = rss_mib("VmRSS");
        let mut times = vec![];
        let mut out = None;
        for _ in 0..5 {
            let t = Instant::now();
            out = Some(compile(&m, &ctx));
            times.push(t.elapsed());
        }
        let c = out.expect("ran");
        let (compile_ms, _) = p50_p95_ms(&times);
        // Policy edits, as warren-node compiles them: incrementally, from the previous state.
        let mut changes = vec![];
        let mut changed = m.clone();
        let mut inc = Compiler::new();
        let mut prev = inc.compile(&changed, &ctx).dataplane;
        // An edit the compiler absorbs (another rule of the policy already allows what it adds)
        // leaves the output as it was: not counted, the next one is taken.
        let mut i = 0;
        while changes.len() < if pols == 0 { 0 } else { edits } {
            assert!(i < 2 * edits + 10, "most policy edits changed nothing");
            edit_policy(&mut changed, i);
            i += 1;
            let t = Instant::now();
            let c2 = inc.compile(&changed, &ctx);
            let took = t.elapsed();
            if c2.dataplane != prev {
                changes.push(took);
                prev = c2.dataplane;
            }
        }
        let edit = (!changes.is_empty()).then(|| p50_p95_ms(&changes));
        let edit_text = edit.map_or("-".to_string(), |(a, b)| format!("{a:.1}/{b:.1}"));
        let s = &c.stats;
        println!(
            "{:>6} {:>6} {:>5} {:>7} {:>7} {:>7.1}/{:<3} {:>9} {:>8} {:>6} {:>8} {:>8.1}ms {:>15}",
            pods,
            pols,
            s.local_workloads,
            s.chains,
            s.rules,
            0.0,
            s.max_workload_members,
            s.policy_rules,
            s.group_rules,
            s.ipsets,
            s.ipset_members,
            compile_ms,
            edit_text,
        );
        assert!(c.errors.is_empty());
        assert!(s.max_workload_members <= policy::compile::MAX_MEMBERS_PER_WORKLOAD);
        rows.push(serde_json::json!({
            "pods": pods,
            "policies": pols,
            "local_pods": s.local_workloads,
            "chains": s.chains,
            "rules": s.rules,
            "rules_per_local_pod": 0,
            "set_members_per_local_pod_max": s.max_workload_members,
            "policy_rules": s.policy_rules,
            "group_rules": s.group_rules,
            "ipsets": s.ipsets,
            "ipset_members": s.ipset_members,
            "compile_ms_median_of_5": compile_ms,
            "incremental_compile_after_policy_edit_ms_p50": edit.map(|e| e.0),
            "incremental_compile_after_policy_edit_ms_p95": edit.map(|e| e.1),
            "policy_edits": changes.len(),
        }));
    }
    let peak = rss_mib("VmHWM");
    println!("pod rul/mem = rules / most set members one local pod adds: none / its (address, interface) and its group sets; a constant, whatever the policies.");
    println!("local = pods on the compiled node (100 per node); compile = median of 5 full compiles; edit = incremental compile after each of {edits} successive policy edits.");
    if let (Some(p), Some(m)) = (peak, model_rss) {
        println!("peak RSS (VmHWM) of this run: {p:.1} MiB; {m:.1} MiB once the last size's model was built (use --only for one size's peak)");
    }
    let doc = serde_json::json!({
        "bench": "policy_scale",
        "node": NODE,
        "rows": rows,
        "peak_rss_mib": peak,
        "rss_after_last_model_mib": model_rss,
    });
    if let Err(e) = write_json(&out, &doc) {
        eprintln!("writing {}: {e}", out.display());
        std::process::exit(1);
    }
    println!("wrote {}", out.canonicalize().unwrap_or(out).display());
}
