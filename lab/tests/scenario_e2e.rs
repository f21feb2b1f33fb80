//! Seed 000's tekton-dashboard scenario end to end (issue 6), as `make lab` runs it: for each
//! kube-proxy mode, `warren-lab scenario tekton` brings up its own lab (the micro-VM where the
//! kernel lacks ipip or IPVS), runs the four experiments with real traffic and takes the lab
//! down. Every cell must match tests/scenarios/tekton/expected.yaml — including experiment 4,
//! where warren's preserve-source lets the load balancer in through every node and keeps `bar`
//! out everywhere with the seed's first policy unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use common::Lab;
use serde_json::Value;

/// Runs the scenario in its own lab, left up (`--keep`) for more checks; dropping the returned
/// harness takes it down.
fn run(mode: &str) -> (Value, Lab) {
    let lab = Lab::named(&format!("scenario-{mode}"));
    // Exit status 1 means mismatches; the JSON report says which, so read it either way.
    let out = lab.cmd(&["scenario", "tekton", "--proxy-mode", mode, "--json", "--keep"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report from the {mode} scenario ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, lab)
}

/// A TCP connection to the dashboard from inside `from` (optionally with another source
/// address); the dashboard's answer names it.
fn reaches_dashboard(lab: &Lab, from: &str, source: Option<&str>) -> bool {
    let mut args = vec!["exec", from, "--", "curl", "--http0.9", "-s", "--max-time", "5"];
    if let Some(s) = source {
        args.extend(["--interface", s]);
    }
    args.push("http://10.233.96.32:9097/");
    let out = lab.cmd(&args);
    String::from_utf8_lossy(&out.stdout).contains("tekton-dashboard")
}

/// Preserve-source trusts the peers' NodePort sources; nothing else may gain that trust.
fn assert_no_other_door(lab: &Lab) {
    // The checks have teeth: an allowed namespace's pod gets in, bar's does not.
    assert!(reaches_dashboard(lab, "baz/client-node1", None), "baz is allowed");
    assert!(!reaches_dashboard(lab, "bar/client-node1", None), "bar is not");
    // Host-network traffic of another node still crosses with tunl0's address and is judged by it.
    assert!(
        !reaches_dashboard(lab, "node:node1", None),
        "node1's own traffic is not trusted"
    );
    // A pod that takes node1's NodePort source as its address is stopped by anti-spoofing.
    lab.ok(&[
        "exec",
        "bar/client-node1",
        "--",
        "ip",
        "addr",
        "add",
        "10.233.90.1/32",
        "dev",
        "eth0",
    ]);
    assert!(
        !reaches_dashboard(lab, "bar/client-node1", Some("10.233.90.1")),
        "a pod sending from a NodePort source must be dropped"
    );
}

fn assert_all_cells_as_expected(mode: &str, report: &Value) {
    let exps = report["experiments"].as_array().expect("experiments");
    let ids: Vec<&str> = exps.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["exp1", "exp2", "exp3", "exp4"], "{mode}: every experiment ran");
    let mut wrong = Vec::new();
    for e in exps {
        for c in e["cells"].as_array().expect("cells") {
            if c["ok"] != Value::Bool(true) {
                wrong.push(format!("{} {} → {}: {}", e["id"], c["from"], c["via"], c));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{mode}: cells differ from expected.yaml:\n{}",
        wrong.join("\n")
    );
    assert_eq!(report["mismatches"], 0, "{mode}");
}

#[test]
fn should_reproduce_the_seed_and_fix_it_with_preserve_source_in_both_proxy_modes() {
    for mode in ["iptables", "ipvs"] {
        let (report, lab) = run(mode);
        assert_all_cells_as_expected(mode, &report);
        if mode == "iptables" {
            assert_no_other_door(&lab);
        }
        drop(lab);
    }
}
