//! NetworkPolicy enforced by warren-node in a real three-node lab, with real TCP, UDP and SCTP
//! traffic, same node and across nodes. One lab for the file (booting is the slow part), driven
//! through the `warren-lab` CLI; taken down at the end even when a check fails. Runs as root.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::Lab;

impl Lab {
    fn probe(&self, from: &str, to: &str, port: &str, proto: &str) -> bool {
        let out = self.cmd(&[
            "probe",
            from,
            to,
            "--port",
            port,
            "--protocol",
            proto,
            "--timeout",
            "2",
            "--json",
        ]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("probe JSON");
        v["connected"] == true
    }

    /// Probes until the result is `want` (a change must be programmed within 30 s in the emulated VM); returns how
    /// long it took.
    fn expect(&self, from: &str, to: &str, port: &str, proto: &str, want: bool) -> Duration {
        let start = Instant::now();
        loop {
            if self.probe(from, to, port, proto) == want {
                let took = start.elapsed();
                eprintln!(
                    "OK {from} -> {to}:{port}/{proto} {} after {took:?}",
                    if want { "connected" } else { "blocked" }
                );
                return took;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{from} -> {to}:{port}/{proto}: still {} after 30 s",
                if want { "blocked" } else { "connected" }
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn apply(&self, file: &str) {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/scenarios/policy")
            .join(file);
        self.ok(&["kubectl", "--", "apply", "-f", p.to_str().expect("utf-8 path")]);
    }
}

#[test]
fn should_enforce_network_policy_with_real_traffic() {
    let t0 = Instant::now();
    let lab = Lab::up("policy");
    lab.apply("pods.yaml");
    lab.wait_running(5);
    lab.ok(&["host", "add", "ext", "10.2.3.4", "--ports", "80/TCP"]);
    eprintln!("lab ready after {:?}", t0.elapsed());

    // Default allow: no policy, everything connects (same node, across nodes, TCP/UDP/SCTP).
    lab.expect("pb/cli1", "pa/web1", "8080", "TCP", true);
    lab.expect("pb/cli2", "pa/web1", "8080", "TCP", true);
    lab.expect("pb/cli2", "pa/web1", "5353", "UDP", true);
    lab.expect("pb/cli1", "pa/web1", "9000", "SCTP", true);
    lab.expect("pb/cli1", "host:ext", "80", "TCP", true);

    // Deny-all ingress in pa, next to a malformed policy that must not stop it.
    lab.apply("bad-cidr.yaml");
    lab.apply("deny-all.yaml");
    let mut took = vec![];
    took.push(lab.expect("pb/cli1", "pa/web1", "8080", "TCP", false));
    took.push(lab.expect("pb/cli2", "pa/web1", "8080", "TCP", false));
    lab.expect("pb/cli1", "pa/web2", "8081", "TCP", false);
    lab.expect("pb/cli2", "pa/web1", "5353", "UDP", false);
    lab.expect("pb/cli1", "pa/web1", "9000", "SCTP", false);
    lab.expect("pa/peer", "pa/web1", "8080", "TCP", false);
    // The malformed policy is reported: a metric on every node and an Event on the policy.
    let metrics = lab.ok(&[
        "exec",
        "node:node1",
        "--",
        "wget",
        "-qO-",
        "http://127.0.0.1:9099/metrics",
    ]);
    assert!(metrics.contains("\nwarren_policy_errors 1\n"), "{metrics}");
    let events = lab.ok(&["kubectl", "--", "get", "events", "-n", "pa", "-o", "json"]);
    assert!(
        events.contains("PolicyNotEnforced") && events.contains("bad-cidr"),
        "{events}"
    );
    // pods outside pa keep their access
    lab.expect("pa/web1", "pb/cli2", "8080", "TCP", true);

    // Allow from namespace pb on the named port "http": 8080 on web1, 8081 on web2.
    lab.apply("allow-from-pb.yaml");
    took.push(lab.expect("pb/cli1", "pa/web1", "8080", "TCP", true));
    lab.expect("pb/cli2", "pa/web1", "8080", "TCP", true);
    lab.expect("pb/cli1", "pa/web2", "8081", "TCP", true);
    lab.expect("pb/cli2", "pa/web2", "8081", "TCP", true);
    lab.expect("pb/cli1", "pa/web1", "8081", "TCP", false);
    lab.expect("pb/cli2", "pa/web2", "8080", "TCP", false);
    lab.expect("pb/cli2", "pa/web1", "5353", "UDP", true);
    lab.expect("pb/cli1", "pa/web1", "9000", "SCTP", true);
    lab.expect("pa/peer", "pa/web1", "8080", "TCP", false);

    // Pod relabel while probing: peer becomes a friend, then stops being one.
    lab.apply("allow-friends.yaml");
    lab.ok(&["kubectl", "--", "label", "pod", "-n", "pa", "peer", "friend=yes"]);
    took.push(lab.expect("pa/peer", "pa/web1", "8080", "TCP", true));
    lab.expect("pa/peer", "pa/web2", "8081", "TCP", true);
    lab.ok(&["kubectl", "--", "label", "pod", "-n", "pa", "peer", "friend-"]);
    took.push(lab.expect("pa/peer", "pa/web1", "8080", "TCP", false));

    // Egress to an ipBlock with except, then the policy updated while probing.
    lab.apply("egress-ext.yaml");
    took.push(lab.expect("pb/cli1", "host:ext", "80", "TCP", false));
    lab.expect("pb/cli2", "host:ext", "80", "TCP", false);
    lab.expect("pb/cli2", "pa/web2", "8081", "TCP", true);
    lab.apply("egress-ext-v2.yaml");
    took.push(lab.expect("pb/cli1", "host:ext", "80", "TCP", true));
    lab.expect("pb/cli2", "host:ext", "80", "TCP", true);

    // Deleting the policies restores access.
    lab.ok(&[
        "kubectl",
        "--",
        "delete",
        "networkpolicy",
        "-n",
        "pa",
        "deny-all",
        "allow-from-pb",
        "allow-friends",
        "bad-cidr",
    ]);
    lab.ok(&["kubectl", "--", "delete", "networkpolicy", "-n", "pb", "egress-ext"]);
    took.push(lab.expect("pb/cli1", "pa/web1", "8081", "TCP", true));
    lab.expect("pa/peer", "pa/web1", "8080", "TCP", true);
    lab.expect("pb/cli2", "pa/web1", "9000", "SCTP", true);
    eprintln!(
        "time for each change to show in traffic: {took:?}; total {:?}",
        t0.elapsed()
    );
}
