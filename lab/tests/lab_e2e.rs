//! End to end: one lab for the whole file (booting it is the slow part), driven through the
//! `warren-lab` CLI exactly as a user drives it. Runs as root; on this kernel the lab runs in the
//! micro-VM. The lab is taken down at the end even when a check fails.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::Lab;

impl Lab {
    fn probe(&self, from: &str, to: &str, port: &str) -> Value {
        let out = self.cmd(&["probe", from, to, "--port", port, "--timeout", "3", "--json"]);
        serde_json::from_slice(&out.stdout).expect("probe JSON")
    }
}

/// Waits until `route` is (or is no longer) in every node's `ip route`.
fn wait_route_everywhere(lab: &Lab, route: &str, present: bool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let missing: Vec<&str> = ["node1", "node2", "node3"]
            .into_iter()
            .filter(|n| {
                lab.ok(&["exec", &format!("node:{n}"), "--", "ip", "route"])
                    .contains(route)
                    != present
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{route:?} present={present} not reached on {missing:?} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn qemu_running_for(state: &str) -> bool {
    std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("qemu-system") && String::from_utf8_lossy(&c).contains(state))
            .unwrap_or(false)
    })
}

/// The lab's block race (no CLI verb: the control channel's `block-race` request, as the CLI sends requests).
fn block_race(state: &std::path::Path, nodes: &[&str], latency_ms: u64) -> Value {
    let cfg = lab::config::LabConfig::load(state).unwrap();
    let req = lab::control::Request::BlockRace {
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        latency_ms,
        timeout_ms: 90_000,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(lab::control::call(cfg.host_ctl, &req, Duration::from_secs(150)))
        .unwrap()
}

#[test]
fn should_run_a_three_node_cluster_with_warren() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    // up: returns when nodes are Ready, and says how long it took.
    let lab = Lab::up("e2e");
    let state = lab.state.clone();
    let nodes = lab.json(&["kubectl", "--", "get", "nodes", "-o", "json"]);
    let names: Vec<&str> = nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["node1", "node2", "node3"]);

    // kubectl apply / label / annotate against the stand-in; pods land on every node.
    let manifest = repo.join("tests/scenarios/basic/pods.yaml");
    lab.ok(&["kubectl", "--", "apply", "-f", manifest.to_str().unwrap()]);
    let pods = lab.wait_running(6);
    let blocks = [
        ("node1", "10.233.90."),
        ("node2", "10.233.96."),
        ("node3", "10.233.92."),
    ];
    for p in pods["items"].as_array().unwrap() {
        let node = p["spec"]["nodeName"].as_str().unwrap();
        let ip = p["status"]["podIP"].as_str().unwrap();
        let prefix = blocks.iter().find(|(n, _)| *n == node).unwrap().1;
        assert!(ip.starts_with(prefix), "pod on {node} got {ip}, outside its block");
    }
    lab.ok(&["kubectl", "--", "label", "pod", "-n", "alpha", "a1", "tier=front"]);
    lab.ok(&["kubectl", "--", "annotate", "pod", "-n", "alpha", "a1", "note=hello"]);
    let a1 = lab.json(&["kubectl", "--", "get", "pod", "-n", "alpha", "a1", "-o", "json"]);
    assert_eq!(a1["metadata"]["labels"]["tier"], "front");
    assert_eq!(a1["metadata"]["annotations"]["note"], "hello");
    let sel = lab.ok(&["kubectl", "--", "get", "pods", "-A", "-l", "tier=front", "-o", "name"]);
    assert_eq!(sel.trim(), "pod/a1");

    // The pod's host side is what a Calico user expects.
    let routes = lab.ok(&["exec", "node:node1", "--", "ip", "route"]);
    let a1_ip = a1["status"]["podIP"].as_str().unwrap();
    assert!(
        routes.lines().any(|l| l.starts_with(&format!("{a1_ip} dev cali"))),
        "{routes}"
    );
    let conf = lab.ok(&["exec", "node:node2", "--", "cat", "/etc/cni/net.d/10-warren.conflist"]);
    assert!(conf.contains("10.233.96.0/24"), "node2's own conflist: {conf}");

    // Across nodes through real tunl0: every pod reaches every other pod. warren-node fails closed
    // for a new pod until its chains are programmed (seconds in the emulated VM), so wait for that.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = lab.json(&["matrix", "--namespaces", "alpha,beta", "--port", "8080", "--json"]);
        let cells = m["cells"].as_array().unwrap().clone();
        assert_eq!(cells.len(), 36);
        let blocked: Vec<&Value> = cells.iter().filter(|c| c["connected"] != true).collect();
        if blocked.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blocked pairs a minute after the pods ran: {blocked:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // Same-node pod to pod, TCP and UDP; each answer names the pod reached.
    let r = lab.probe("beta/b1", "alpha/a1", "8080");
    assert_eq!(r["connected"], true, "{r}");
    assert_eq!(r["reply"], "a1");
    let out = lab.cmd(&["probe", "alpha/a2", "alpha/a2", "--port", "5353", "--protocol", "UDP"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "connected");
    // Nothing listens on 9: a closed port is "blocked" with exit 1.
    let closed = lab.cmd(&["probe", "beta/b1", "alpha/a1", "--port", "9", "--timeout", "1"]);
    assert_eq!(closed.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&closed.stdout).trim(), "blocked");

    // The seed's routing table shape, and tunl0 carrying the cross-node packets.
    let routes = lab.ok(&["exec", "node:node2", "--", "ip", "route"]);
    for (block, via) in [
        ("10.233.90.0/24", "10.102.123.117"),
        ("10.233.92.0/24", "10.102.123.143"),
    ] {
        let want = format!("{block} via {via} dev tunl0 proto 88 onlink");
        assert!(
            routes.lines().any(|l| l.trim() == want),
            "missing `{want}` in:\n{routes}"
        );
    }
    let tunl = lab.ok(&["exec", "node:node2", "--", "ip", "-o", "addr", "show", "dev", "tunl0"]);
    assert!(tunl.contains("inet 10.233.96.0/32"), "{tunl}");
    let rx = |lab: &Lab| -> u64 {
        lab.ok(&[
            "exec",
            "node:node2",
            "--",
            "cat",
            "/sys/class/net/tunl0/statistics/rx_packets",
        ])
        .trim()
        .parse()
        .unwrap()
    };
    let before = rx(&lab);
    assert_eq!(lab.probe("alpha/a1", "alpha/a2", "8080")["connected"], true);
    assert!(rx(&lab) > before, "the cross-node probe did not come in through tunl0");
    // The pod MTU leaves room for the IPIP header: a don't-fragment ping of MTU - 28 crosses the tunnel.
    let a2_ip = lab.json(&["kubectl", "--", "get", "pod", "-n", "alpha", "a2", "-o", "json"])["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    let mtu = lab.ok(&["exec", "alpha/a1", "--", "cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "1480", "pod MTU = underlay 1500 - 20");
    lab.ok(&[
        "exec", "alpha/a1", "--", "ping", "-c", "1", "-W", "3", "-M", "do", "-s", "1452", &a2_ip,
    ]);
    // warren-node marks its nodes ready for networking, as Calico does.
    let n2 = lab.json(&["kubectl", "--", "get", "node", "node2", "-o", "json"]);
    let cond = n2["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "NetworkUnavailable")
        .cloned();
    assert_eq!(cond.map(|c| c["status"].clone()), Some(Value::from("False")));

    // A node added to the API appears in every peer's routes; deleted, it disappears.
    let node4 = state.join("node4.json");
    std::fs::write(
        &node4,
        r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"node4"},"spec":{"podCIDR":"10.233.70.0/24"}}"#,
    )
    .unwrap();
    lab.ok(&["kubectl", "--", "apply", "-f", node4.to_str().unwrap()]);
    lab.ok(&[
        "kubectl",
        "--",
        "patch",
        "node",
        "node4",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"addresses":[{"type":"InternalIP","address":"10.102.123.50"}]}}"#,
    ]);
    let node4 = "10.233.70.0/24 via 10.102.123.50 dev tunl0";
    wait_route_everywhere(&lab, node4, true, Duration::from_secs(30));
    lab.ok(&["kubectl", "--", "delete", "node", "node4"]);
    wait_route_everywhere(&lab, node4, false, Duration::from_secs(30));

    // Restarting warren-node while traffic flows between nodes loses no connection attempt.
    let prober = lab.probe_loop("beta/b1", "alpha/a3", 8080);
    std::thread::sleep(Duration::from_secs(2));
    lab.ok(&["restart", "node:node1", "warren-node", "--down-ms", "2000"]);
    lab.ok(&["restart", "node:node3", "warren-node"]);
    std::thread::sleep(Duration::from_secs(3));
    let (ok, failed) = prober.stop();
    assert!(ok > 3, "too few probes ran during the restart: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} probes failed while warren-node restarted",
        ok + failed
    );

    // The API stand-in goes away (listener closed, connections and watches cut) while pods talk
    // across nodes: the dataplane stays; when it is back, the daemons reconnect and converge.
    let api_errors = |lab: &Lab, node: &str| -> u64 {
        let m = lab.ok(&[
            "exec",
            &format!("node:{node}"),
            "--",
            "curl",
            "-sf",
            "http://127.0.0.1:9099/metrics",
        ]);
        m.lines()
            .find_map(|l| l.strip_prefix("warren_api_errors_total "))
            .unwrap_or_else(|| panic!("no warren_api_errors_total on {node}: {m}"))
            .trim()
            .parse()
            .unwrap()
    };
    let errors_before: Vec<u64> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| api_errors(&lab, n))
        .collect();
    let prober = lab.probe_loop("alpha/a2", "beta/b1", 8080);
    let outage = {
        let (exe, st) = (lab.exe.clone(), lab.state.clone());
        std::thread::spawn(move || {
            Command::new(&exe)
                .arg("--state-dir")
                .arg(&st)
                .args(["restart", "apiserver", "--down-ms", "10000"])
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let down = lab.cmd(&["kubectl", "--", "get", "nodes", "--request-timeout=3s"]);
    assert!(!down.status.success(), "kubectl got an answer during the API outage");
    let m = lab.json(&["matrix", "--namespaces", "alpha,beta", "--port", "8080", "--json"]);
    let blocked: Vec<&Value> = m["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["connected"] != true)
        .collect();
    assert!(blocked.is_empty(), "pairs blocked while the API was down: {blocked:?}");
    let out = outage.join().unwrap();
    assert!(
        out.status.success(),
        "restart apiserver: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, failed) = prober.stop();
    assert!(ok > 3, "too few probes ran during the API outage: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} probes failed while the API was down",
        ok + failed
    );
    // A change made after the outage reaches every daemon: they reconnected and resynced.
    let node5 = state.join("node5.json");
    std::fs::write(
        &node5,
        r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"node5"},"spec":{"podCIDR":"10.233.71.0/24"}}"#,
    )
    .unwrap();
    lab.ok(&["kubectl", "--", "apply", "-f", node5.to_str().unwrap()]);
    lab.ok(&[
        "kubectl",
        "--",
        "patch",
        "node",
        "node5",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"addresses":[{"type":"InternalIP","address":"10.102.123.51"}]}}"#,
    ]);
    // The daemons' watches back off while the API is away (kube-rs: up to 30 s between tries).
    let node5 = "10.233.71.0/24 via 10.102.123.51 dev tunl0";
    wait_route_everywhere(&lab, node5, true, Duration::from_secs(90));
    lab.ok(&["kubectl", "--", "delete", "node", "node5"]);
    wait_route_everywhere(&lab, node5, false, Duration::from_secs(90));
    let errors_after: Vec<u64> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| api_errors(&lab, n))
        .collect();
    for (i, (b, a)) in errors_before.iter().zip(&errors_after).enumerate() {
        assert!(
            a > b,
            "node{}: warren_api_errors_total did not rise over the outage ({b} -> {a})",
            i + 1
        );
    }

    // Two real warren-node processes for two new Nodes without podCIDR or block annotation, started
    // in the same instant, end up with two distinct blocks of the pool. The names are chosen so that
    // both claimers' scans of the pool start at the same block (sha1 of the name), and a 500 ms
    // link delay makes each one's list -> write window longer than the spread of their start-up, so
    // their first picks collide and one of them must yield.
    // A race whose starts drift apart by more than the delay does not collide; run it again (at
    // most twice more) so that the conflict is really exercised.
    let collided = |r: &Value| {
        r["claims"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["collided"] == true))
    };
    let mut race = block_race(&state, &["race-a", "race-p"], 500);
    for _ in 0..2 {
        if collided(&race) {
            break;
        }
        eprintln!("block race without a collision, again: {race:#}");
        race = block_race(&state, &["race-a", "race-p"], 500);
    }
    eprintln!("block race: {race:#}");
    let claims = race["claims"].as_array().unwrap();
    assert_eq!(claims.len(), 2, "{race}");
    assert!(
        claims.iter().any(|c| c["collided"] == true),
        "no daemon logged a colliding first pick, so this run did not exercise the conflict: {race}"
    );
    let pool: ipnet::Ipv4Net = "10.233.64.0/18".parse().unwrap();
    let mut taken: Vec<String> = race["other_blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_string())
        .collect();
    for want in ["10.233.90.0/24", "10.233.96.0/24", "10.233.92.0/24"] {
        assert!(
            taken.iter().any(|t| t == want),
            "lab blocks seen before the race: {taken:?}"
        );
    }
    for c in claims {
        let block: ipnet::Ipv4Net = c["block"].as_str().unwrap().parse().unwrap();
        assert!(pool.contains(&block) && block.prefix_len() == 24, "{c}");
        assert!(
            !taken.contains(&block.to_string()),
            "{} got a block already taken: {c} (taken: {taken:?})",
            c["node"]
        );
        assert_eq!(
            c["conflist_matches"], true,
            "the daemon's conflist is for another block: {c}"
        );
        assert_eq!(c["tunl0"], format!("{}/32", block.network()), "{c}");
        taken.push(block.to_string());
    }
    // Everything the race made is gone: Node objects, namespaces, and the peers' routes to them.
    let names = lab.ok(&["kubectl", "--", "get", "nodes", "-o", "name"]);
    assert_eq!(
        names.split_whitespace().collect::<Vec<_>>(),
        ["node/node1", "node/node2", "node/node3"]
    );
    let ns = lab.ok(&["exec", "node:node1", "--", "ip", "netns", "list"]);
    assert!(!ns.contains("wlab-x-"), "race namespaces left: {ns}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = lab.ok(&["exec", "node:node2", "--", "ip", "route"]);
        if claims.iter().all(|c| !r.contains(c["block"].as_str().unwrap())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "routes to the race nodes' blocks stayed: {r}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // NodePort and ClusterIP to a pod on the same node; kube-proxy's SNAT visible with Cluster.
    lab.ok(&["host", "add", "lb", "10.2.3.4"]);
    let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web1","namespace":"alpha"},
        "spec":{"type":"NodePort","selector":{"tier":"front"},"externalTrafficPolicy":"Cluster",
        "ports":[{"port":80,"targetPort":"http","nodePort":31000}]}}"#;
    let svc_file = state.join("svc.json");
    std::fs::write(&svc_file, svc).unwrap();
    lab.ok(&["kubectl", "--", "apply", "-f", svc_file.to_str().unwrap()]);
    let wait_probe = |from: &str, to: &str, port: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = lab.probe(from, to, port);
            if r["connected"] == true || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let r = wait_probe("host:lb", "node:node1", "31000");
    assert_eq!(r["reply"], "a1", "{r}");
    assert!(
        r["seen_as"] == "10.102.123.117" || r["seen_as"] == "10.233.90.0",
        "Cluster: kube-proxy masquerades NodePort traffic to one of node1's addresses: {r}"
    );
    // Through another node the packet crosses the tunnel and arrives from an address of node2's
    // block: the seed's puzzle in one probe. With the default preserve-source NodePort policy
    // (issue 6) it is node2's NodePort source, the block's second address, not tunl0's first.
    let r = wait_probe("host:lb", "node:node2", "31000");
    assert_eq!(r["reply"], "a1", "{r}");
    assert_eq!(r["seen_as"], "10.233.96.1", "SNAT to node2's NodePort source: {r}");
    let cluster_ip = lab.ok(&[
        "kubectl",
        "--",
        "get",
        "svc",
        "-n",
        "alpha",
        "web1",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let r = wait_probe("beta/b1", cluster_ip.trim(), "80");
    assert_eq!(r["reply"], "a1", "{r}");
    lab.ok(&[
        "kubectl",
        "--",
        "patch",
        "svc",
        "-n",
        "alpha",
        "web1",
        "-p",
        r#"{"spec":{"externalTrafficPolicy":"Local"}}"#,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = lab.probe("host:lb", "node:node1", "31000");
        if r["seen_as"] == "10.2.3.4" || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(r["seen_as"], "10.2.3.4", "Local: the client's address is kept: {r}");

    // Deleting a pod runs CNI DEL: its route and veth are gone from the node.
    lab.ok(&["kubectl", "--", "delete", "pod", "-n", "alpha", "a1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let routes = lab.ok(&["exec", "node:node1", "--", "ip", "route"]);
        if !routes.contains(&format!("{a1_ip} dev cali")) {
            break;
        }
        assert!(Instant::now() < deadline, "a1's route stayed after delete: {routes}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // down leaves nothing: no state, no namespaces, no VM.
    lab.ok(&["down"]);
    assert!(!state.exists(), "state dir left behind");
    assert!(
        netns_with_prefix("wlab-").is_empty(),
        "namespaces left: {:?}",
        netns_with_prefix("wlab-")
    );
    assert!(
        !qemu_running_for(state.to_str().unwrap()),
        "a qemu process is still running"
    );
}
