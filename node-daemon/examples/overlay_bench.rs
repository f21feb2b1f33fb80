//! Overlay benchmark (root; runs itself inside a fresh netns, the host is untouched).
//!
//! 1. 5 000 peer routes programmed from cold over netlink, then a no-op resync.
//! 2. The real `warren-node` binary against the lab's API stand-in with 3 and 100 nodes: time from
//!    a Node event (create) to its route being in the kernel (median, p95), the daemon's CPU per
//!    idle full resync, its RSS.
//!
//! Prints tables and writes them as JSON (default `target/bench/overlay.json`).
//!
//! Run: `cargo build --release -p node-daemon --bins --examples &&
//!       target/release/examples/overlay_bench [WARREN_NODE] [--out PATH]` (with CARGO_TARGET_DIR as
//!       set for the build; WARREN_NODE defaults to the warren-node next to the examples directory).

// A benchmark may unwrap: a panic shows the error.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use node_daemon::netlink::{sync_routes, KernelRoute, Netlink, RouteOps};
use serde_json::{json, Value};

const INNER: &str = "WARREN_OVERLAY_BENCH_INNER";

/// `[WARREN_NODE] [--out PATH]`.
struct Args {
    daemon: Option<PathBuf>,
    out: PathBuf,
}

fn parse_args() -> Args {
    let mut a = Args {
        daemon: None,
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench/overlay.json")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        if x == "--out" {
            a.out = PathBuf::from(it.next().expect("--out needs a path"));
        } else {
            a.daemon = Some(PathBuf::from(x));
        }
    }
    a
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn sh(args: &[&str]) {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn main() {
    if std::env::var_os(INNER).is_none() {
        let ns = format!("wn-bench-{}", std::process::id());
        sh(&["ip", "netns", "add", &ns]);
        let status = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe().unwrap())
            .args(std::env::args().skip(1))
            .env(INNER, "1")
            .status();
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        assert!(status.unwrap().success(), "benchmark failed");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(inner());
}

fn peer_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 20, 0, 10)) + i)
}

fn peer_block(i: u32) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + (i << 8)), 24).unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn cpu_self() -> Duration {
    proc_cpu(std::process::id()).0
}

/// utime+stime and cutime+cstime of a process, from /proc (clock ticks of 10 ms).
fn proc_cpu(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let tick = |n: u64| Duration::from_millis(n * 10);
    (tick(f[11] + f[12]), tick(f[13] + f[14]))
}

fn proc_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn inner() {
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["ip", "link", "add", "bv0", "type", "veth", "peer", "name", "bv1"]);
    sh(&["ip", "addr", "add", "172.20.0.1/16", "dev", "bv0"]);
    sh(&["ip", "link", "set", "bv0", "up"]);
    sh(&["ip", "link", "set", "bv1", "up"]);

    // 1. Cold programming of 5 000 routes.
    let net = Netlink::connect().unwrap();
    let routes: Vec<KernelRoute> = (0..5000)
        .map(|i| KernelRoute {
            dst: peer_block(i),
            gateway: Some(peer_ip(i)),
            oif: None,
            onlink: false,
        })
        .collect();
    let (t0, c0) = (Instant::now(), cpu_self());
    let rep = sync_routes(&net, &routes).await.unwrap();
    let (cold, cold_cpu) = (t0.elapsed(), cpu_self() - c0);
    assert_eq!(rep.replaced.len(), 5000);
    let (t0, c0) = (Instant::now(), cpu_self());
    let rep = sync_routes(&net, &routes).await.unwrap();
    let (noop, noop_cpu) = (t0.elapsed(), cpu_self() - c0);
    assert!(rep.replaced.is_empty());
    sync_routes(&net, &[]).await.unwrap();
    println!("| 5000 peer routes | wall | CPU |");
    println!("|---|---|---|");
    println!("| programmed from cold | {cold:.1?} | {cold_cpu:.1?} |");
    println!("| no-op resync (dump + diff) | {noop:.1?} | {noop_cpu:.1?} (10 ms ticks) |");
    println!();
    let routes_json = json!({
        "routes": 5000,
        "cold_ms": ms(cold),
        "cold_cpu_ms": ms(cold_cpu),
        "noop_resync_ms": ms(noop),
        "noop_resync_cpu_ms": ms(noop_cpu),
    });
    let mut daemon_rows: Vec<Value> = vec![];

    // 2. The daemon, event to route.
    let args = parse_args();
    let daemon_bin = args.daemon.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("warren-node")
    });
    println!("| nodes | event→route median | p95 | CPU per idle resync (self + children) | RSS idle | RSS peak |");
    println!("|---|---|---|---|---|---|");
    for n in [3u32, 100] {
        let state = tempfile::tempdir().unwrap();
        let conf_dir = tempfile::tempdir().unwrap();
        let server = lab_apiserver::Server::start(lab_apiserver::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: state.path().to_path_buf(),
            token: Some("bench".into()),
            extra_sans: vec![],
        })
        .await
        .unwrap();
        let kubeconfig = state.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig, None).unwrap();
        let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        let api: Api<Node> = Api::all(Client::try_from(cfg).unwrap());
        let add = |name: String, ip: Ipv4Addr, block: Option<Ipv4Net>| {
            let api = api.clone();
            async move {
                let spec = block.map_or(json!({}), |b| json!({ "podCIDR": b.to_string() }));
                let node: Node = serde_json::from_value(json!({ "metadata": { "name": name }, "spec": spec })).unwrap();
                api.create(&PostParams::default(), &node).await.unwrap();
                let st = json!({ "status": { "addresses": [{ "type": "InternalIP", "address": ip.to_string() }] } });
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(st))
                    .await
                    .unwrap();
            }
        };
        add("node1".into(), Ipv4Addr::new(172, 20, 0, 1), None).await;
        for i in 1..n {
            add(format!("peer{i}"), peer_ip(i), Some(peer_block(i))).await;
        }
        let health: SocketAddr = "127.0.0.1:19199".parse().unwrap();
        let mut child: Child = Command::new(&daemon_bin)
            .args([
                "run",
                "--node-name",
                "node1",
                "--ipip-mode",
                "Never",
                "--iptables-backend",
                "nft",
            ])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cni-conf-dir")
            .arg(conf_dir.path())
            .args(["--health-addr", &health.to_string(), "--resync-interval", "1"])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let pid = child.id();
        let wait_routes = |want: usize| {
            let net = net.clone();
            async move {
                let t0 = Instant::now();
                loop {
                    if net.list_owned().await.unwrap().len() == want {
                        return t0.elapsed();
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(30),
                        "daemon never programmed {want} routes"
                    );
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            }
        };
        wait_routes(usize::try_from(n - 1).unwrap()).await;

        let mut lat = Vec::new();
        for k in 0..30u32 {
            let i = 1000 + k;
            let block = peer_block(i);
            let t0 = Instant::now();
            add(format!("new{k}"), peer_ip(i), Some(block)).await;
            loop {
                if net.list_owned().await.unwrap().iter().any(|r| r.dst == block) {
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            lat.push(t0.elapsed());
            api.delete(&format!("new{k}"), &DeleteParams::default()).await.unwrap();
            wait_routes(usize::try_from(n - 1).unwrap()).await;
        }
        lat.sort();

        // Idle: only the 1 s resync timer runs.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (s0, c0) = proc_cpu(pid);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (s1, c1) = proc_cpu(pid);
        // /proc counts 10 ms ticks: over 5 resyncs the resolution is 2 ms.
        let per = |d: Duration| {
            if d.is_zero() {
                "<2ms".to_string()
            } else {
                format!("{:.1?}", d / 5)
            }
        };
        daemon_rows.push(json!({
            "nodes": n,
            "event_to_route_ms_p50": ms(percentile(&lat, 0.5)),
            "event_to_route_ms_p95": ms(percentile(&lat, 0.95)),
            "events": lat.len(),
            "cpu_per_idle_resync_self_ms": ms((s1 - s0) / 5),
            "cpu_per_idle_resync_children_ms": ms((c1 - c0) / 5),
            "rss_idle_kib": proc_kib(pid, "VmRSS:"),
            "rss_peak_kib": proc_kib(pid, "VmHWM:"),
        }));
        println!(
            "| {n} | {:.1?} | {:.1?} | {} + {} | {} KiB | {} KiB |",
            percentile(&lat, 0.5),
            percentile(&lat, 0.95),
            per(s1 - s0),
            per(c1 - c0),
            proc_kib(pid, "VmRSS:"),
            proc_kib(pid, "VmHWM:")
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
        server.shutdown().await;
        // The next round starts from an empty dataplane.
        sync_routes(&net, &[]).await.unwrap();
    }
    let doc = json!({
        "bench": "overlay",
        "peer_routes": routes_json,
        "daemon": daemon_rows,
        "note": "CPU from /proc in 10 ms ticks: per idle resync the resolution is 2 ms (0 means < 2 ms)",
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
    println!(
        "wrote {}",
        args.out.canonicalize().unwrap_or(args.out.clone()).display()
    );
}
