//! End to end: one lab for the whole file (booting it is the slow part), driven through the
//! `warren-lab` CLI exactly as a user drives it. Runs as root; on this kernel the lab runs in the
//! micro-VM. The lab is taken down at the end even when a check fails.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{bin_dir, Lab};

impl Lab {
    fn probe(&self, from: &str, to: &str, port: &str) -> Value {
        let out = self.cmd(&["probe", from, to, "--port", port, "--timeout", "3", "--json"]);
        serde_json::from_slice(&out.stdout).expect("probe JSON")
    }

    fn wait_running(&self, n: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = self.json(&["kubectl", "--", "get", "pods", "-A", "-o", "json"]);
            let running = v["items"].as_array().map_or(0, |a| {
                a.iter()
                    .filter(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
                    .count()
            });
            if running >= n {
                return v;
            }
            assert!(Instant::now() < deadline, "only {running} of {n} pods Running");
            std::thread::sleep(Duration::from_millis(500));
        }
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

#[test]
fn should_run_a_three_node_cluster_with_warren() {
    let exe = bin_dir().join("warren-lab");
    assert!(
        exe.exists(),
        "{} is missing: build with `cargo build --release --workspace --bins`",
        exe.display()
    );
    let state = PathBuf::from(format!("/run/warren-lab-e2e-{}", std::process::id()));
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let lab = Lab {
        exe,
        state: state.clone(),
    };

    // up: returns when nodes are Ready, and says how long it took.
    let up = lab.ok(&["up"]);
    assert!(up.contains("3 nodes Ready"), "{up}");
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
    let wait_route = |present: bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all = ["node1", "node2", "node3"].iter().all(|n| {
                let r = lab.ok(&["exec", &format!("node:{n}"), "--", "ip", "route"]);
                r.contains("10.233.70.0/24 via 10.102.123.50 dev tunl0") == present
            });
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node4's route present={present} not reached on every node"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    wait_route(true);
    lab.ok(&["kubectl", "--", "delete", "node", "node4"]);
    wait_route(false);

    // Restarting warren-node while traffic flows between nodes loses no connection attempt.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (exe, st, stop) = (lab.exe.clone(), lab.state.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new(&exe)
                    .arg("--state-dir")
                    .arg(&st)
                    .args(["probe", "beta/b1", "alpha/a3", "--port", "8080", "--timeout", "2"])
                    .output()
                    .unwrap();
                if out.status.success() {
                    ok += 1
                } else {
                    failed += 1
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    lab.ok(&["restart", "node:node1", "warren-node", "--down-ms", "2000"]);
    lab.ok(&["restart", "node:node3", "warren-node"]);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = prober.join().unwrap();
    assert!(ok > 3, "too few probes ran during the restart: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} probes failed while warren-node restarted",
        ok + failed
    );

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
    // Through another node the packet crosses the tunnel and arrives from that node's tunl0 address:
    // the seed's puzzle in one probe.
    let r = wait_probe("host:lb", "node:node2", "31000");
    assert_eq!(r["reply"], "a1", "{r}");
    assert_eq!(r["seen_as"], "10.233.96.0", "SNAT to node2's tunl0 address: {r}");
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
