//! End to end: the real `warren-node run` binary against the lab's API stand-in, with the real
//! kernel, all inside a fresh netns (the test re-executes itself there, so the host is untouched).
//! Covers: block claim recorded on the Node, conflist, routes following Node add/delete, drift
//! repair counted in metrics, the Node condition, SIGTERM leaving the dataplane, restart keeping the
//! block without touching routes, and reconnecting after the API server restarts.

// Tests may unwrap: a panic shows the error.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INNER: &str = "WARREN_NODE_E2E_INNER";

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn should_run_the_daemon_against_an_api_server() {
    if std::env::var_os(INNER).is_some() {
        return inner();
    }
    assert!(nix::unistd::Uid::effective().is_root(), "needs root");
    let ns = Netns(format!("wn-e2e-{}", std::process::id()));
    assert!(Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .unwrap()
        .success());
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(exe)
        .args(["--exact", "should_run_the_daemon_against_an_api_server", "--nocapture"])
        .env(INNER, "1")
        .status()
        .unwrap();
    assert!(status.success(), "inner test failed");
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    fn start(kubeconfig: &Path, conf_dir: &Path, health: SocketAddr) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_warren-node"))
            .args([
                "run",
                "--node-name",
                "node1",
                "--ipip-mode",
                "Never",
                "--resync-interval",
                "1",
            ])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cni-conf-dir")
            .arg(conf_dir)
            .args(["--health-addr", &health.to_string(), "--iptables-backend", "nft"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Daemon(child)
    }

    fn sigterm(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = self.0.wait().unwrap();
        assert!(status.success(), "SIGTERM exit: {status}");
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn add_node(api: &Api<Node>, name: &str, ip: &str, pod_cidr: Option<&str>) {
    let mut spec = json!({});
    if let Some(c) = pod_cidr {
        spec = json!({ "podCIDR": c });
    }
    let n: Node = serde_json::from_value(json!({ "metadata": { "name": name }, "spec": spec })).unwrap();
    api.create(&PostParams::default(), &n).await.unwrap();
    let status = json!({ "status": {
        "addresses": [{ "type": "InternalIP", "address": ip }],
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady" }]
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

fn routes() -> String {
    sh(&["ip", "route", "show", "proto", "88"])
}

async fn start_server(dir: &Path, listen: SocketAddr) -> lab_apiserver::Server {
    lab_apiserver::Server::start(lab_apiserver::Config {
        listen,
        state_dir: dir.to_path_buf(),
        token: Some("e2e-token".into()),
        extra_sans: vec![],
    })
    .await
    .unwrap()
}

#[tokio::main]
async fn inner() {
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["ip", "link", "add", "wv0", "type", "veth", "peer", "name", "wv1"]);
    sh(&["ip", "addr", "add", "192.168.80.1/24", "dev", "wv0"]);
    sh(&["ip", "link", "set", "wv0", "up"]);
    sh(&["ip", "link", "set", "wv1", "up"]);
    sh(&["ip", "route", "add", "10.99.0.0/24", "via", "192.168.80.9"]);

    let state = tempfile::tempdir().unwrap();
    let conf_dir = tempfile::tempdir().unwrap();
    let server = start_server(state.path(), "127.0.0.1:0".parse().unwrap()).await;
    let listen: SocketAddr = server.url().trim_start_matches("https://").parse().unwrap();
    let kubeconfig = state.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, None).unwrap();
    let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let api: Api<Node> = Api::all(Client::try_from(cfg).unwrap());

    add_node(&api, "node1", "192.168.80.1", None).await;
    add_node(&api, "node2", "192.168.80.2", None).await;
    add_node(&api, "node3", "192.168.80.3", Some("10.244.3.0/24")).await;

    let health: SocketAddr = "127.0.0.1:19099".parse().unwrap();
    let daemon = Daemon::start(&kubeconfig, conf_dir.path(), health);
    let start = Instant::now();
    loop {
        if http_get(health, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "daemon never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // node1 claimed a block and recorded it; node2 has none yet (no daemon there).
    let n1 = api.get("node1").await.unwrap();
    let block = n1.metadata.annotations.as_ref().unwrap()["warren.dev/block"].clone();
    assert!(block.starts_with("10.233.") && block.ends_with("/24"), "{block}");
    let conflist = std::fs::read_to_string(conf_dir.path().join("10-warren.conflist")).unwrap();
    assert!(conflist.contains(&block), "{conflist}");
    assert!(
        conflist.contains("\"mtu\": 1500"),
        "mode Never: pod MTU = underlay MTU\n{conflist}"
    );
    // The condition is patched right after the first sync, which readiness already reported.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n1 = api.get("node1").await.unwrap();
    let conds = n1.status.unwrap().conditions.unwrap();
    let nu = conds
        .iter()
        .find(|c| c.type_ == "NetworkUnavailable")
        .expect("condition set");
    assert_eq!(
        (nu.status.as_str(), nu.reason.as_deref()),
        ("False", Some("WarrenIsUp"))
    );
    assert!(conds.iter().any(|c| c.type_ == "Ready"), "kubelet's condition kept");

    // podCIDR peer routed; annotate node2 as its daemon would, and its route appears.
    eventually("route to node3's podCIDR", || {
        routes().contains("10.244.3.0/24 via 192.168.80.3")
    })
    .await;
    let patch = json!({ "metadata": { "annotations": { "warren.dev/block": "10.233.77.0/24" } } });
    api.patch("node2", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    eventually("route to node2's block", || {
        routes().contains("10.233.77.0/24 via 192.168.80.2")
    })
    .await;

    // A deleted node disappears from the routes and from the IPIP allow-list.
    api.delete("node3", &DeleteParams::default()).await.unwrap();
    eventually("node3's route removed", || !routes().contains("10.244.3.0")).await;
    eventually("node3 out of warren-all-hosts", || {
        !sh(&["ipset", "list", "warren-all-hosts"]).contains("192.168.80.3")
    })
    .await;

    // Drift: someone flushes our chain; back within the resync period, counted. (The chain holds
    // the overlay's IPIP rules and the policy's host-input rules; all of them must come back.)
    let input_rules = || {
        sh(&["iptables-nft-save", "-t", "filter"])
            .matches("-A WARREN-INPUT")
            .count()
    };
    // The reference count is taken once make-before-break leftovers are cleaned up.
    let start = Instant::now();
    while !http_get(health, "/metrics")
        .await
        .is_some_and(|m| m.contains("warren_dataplane_untidy 0\n"))
    {
        assert!(start.elapsed() < Duration::from_secs(20), "leftovers never cleaned up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before_flush = input_rules();
    assert!(before_flush >= 2, "WARREN-INPUT has the IPIP rules before the flush");
    sh(&["iptables-nft", "-F", "WARREN-INPUT"]);
    eventually("WARREN-INPUT restored", || input_rules() == before_flush).await;
    let metrics = http_get(health, "/metrics").await.unwrap();
    assert!(!metrics.contains("warren_drift_repairs_total 0\n"), "{metrics}");
    assert!(metrics.contains("warren_routes 1\n"), "{metrics}");

    // SIGTERM leaves everything in place; a restart keeps the block and rewrites nothing.
    daemon.sigterm();
    let before = routes();
    assert!(before.contains("10.233.77.0/24"));
    assert!(sh(&["iptables-nft-save", "-t", "filter"]).contains("WARREN-INPUT"));
    let daemon = Daemon::start(&kubeconfig, conf_dir.path(), health);
    let start = Instant::now();
    while !http_get(health, "/readyz")
        .await
        .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n1 = api.get("node1").await.unwrap();
    assert_eq!(
        n1.metadata.annotations.unwrap()["warren.dev/block"],
        block,
        "block stable"
    );
    assert_eq!(routes(), before);

    // The API goes away: the dataplane stays. It comes back: the daemon reconnects and converges.
    server.shutdown().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(routes(), before, "routes kept while the API is down");
    let server = start_server(state.path(), listen).await;
    add_node(&api, "node4", "192.168.80.4", Some("10.244.4.0/24")).await;
    eventually("route to node4 after the API restart", || {
        routes().contains("10.244.4.0/24 via 192.168.80.4")
    })
    .await;
    assert!(
        sh(&["ip", "route"]).contains("10.99.0.0/24 via 192.168.80.9"),
        "foreign route untouched"
    );
    drop(daemon);
    server.shutdown().await;
}
