//! Policy edit → programmed, end to end (root; runs itself in a fresh netns, the host is
//! untouched): the real `warren-node` binary against the lab's API stand-in, which holds the
//! simulated cluster of the policy benches (default 10 000 pods over 50 namespaces and 1 000
//! policies; 100 pods on this node, `node3`). For each iptables backend:
//! - the first sync: daemon start → every policy programmed (the initial lists included);
//! - `--edits` successive policy edits (the `scale` bench's sequence: a port added, an ipBlock
//!   added, a pod selector added), each a merge patch of the NetworkPolicy through the API. The
//!   time is taken from just before the patch is sent until the daemon's
//!   `warren_event_programmed_passes_total` moves (polled every 0.5 ms on `/metrics`), so it
//!   holds the API write, the watch event, the pass's wait, compile and apply. The daemon's own
//!   figure (`warren_event_to_programmed_last_seconds`, from the event's arrival) is printed
//!   beside it. Edits are spaced by 1.3 s, so the iptables-nft cleanup (a second after the last
//!   event) is done before the next one, as between a user's edits;
//! - the daemon's peak RSS.
//!
//! Each edit is also compiled in the bench: one that programs nothing (another rule of its
//! policy already allows what it adds) is still sent, but counted apart and not timed; one that
//! does must move the counter within 10 s, or the bench fails.
//!
//! Run: `cargo build --release -p node-daemon --bins --examples &&
//!       $CARGO_TARGET_DIR/release/examples/policy_latency_bench [WARREN_NODE] [--backends legacy,nft]
//!       [--edits 30] [--pods 10000] [--policies 1000] [--out PATH]`
//! (WARREN_NODE defaults to the warren-node next to the examples directory). Prints a table and
//! writes JSON (default `target/bench/policy_latency.json`).

#[path = "../policy/examples/common/mod.rs"]
mod cluster;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use policy::compile::Compiler;
use policy::model::Model;
use policy::NodeCtx;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use cluster::{api_policy_spec, edit_policy, write_json, NODE};

const INNER: &str = "WARREN_POLICY_LATENCY_BENCH_INNER";
const NODE_IP: &str = "172.20.0.1";
const HEALTH: &str = "127.0.0.1:19198";
const EDIT_SPACING: Duration = Duration::from_millis(1300);
const PROGRAMMED_WITHIN: Duration = Duration::from_secs(10);

struct Opts {
    daemon: PathBuf,
    backends: Vec<String>,
    edits: usize,
    pods: usize,
    policies: usize,
    out: PathBuf,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        daemon: std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("no directory above the examples")?
            .join("warren-node"),
        backends: vec!["legacy".into(), "nft".into()],
        edits: 30,
        pods: 10_000,
        policies: 1_000,
        out: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/bench/policy_latency.json"
        )),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--backends" => o.backends = value("--backends")?.split(',').map(str::to_string).collect(),
            "--edits" => o.edits = value("--edits")?.parse().context("--edits")?,
            "--pods" => o.pods = value("--pods")?.parse().context("--pods")?,
            "--policies" => o.policies = value("--policies")?.parse().context("--policies")?,
            "--out" => o.out = PathBuf::from(value("--out")?),
            x if x.starts_with("--") => bail!("unknown option {x}"),
            x => o.daemon = PathBuf::from(x),
        }
    }
    for b in &o.backends {
        ensure!(b == "legacy" || b == "nft", "unknown backend {b} (legacy, nft)");
    }
    Ok(o)
}

fn sh(args: &[&str]) -> Result<()> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    ensure!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    Ok(())
}

fn main() -> Result<()> {
    if std::env::var_os(INNER).is_none() {
        let ns = format!("wn-lat-{}", std::process::id());
        sh(&["ip", "netns", "add", &ns])?;
        let status = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe()?)
            .args(std::env::args().skip(1))
            .env(INNER, "1")
            .status();
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        ensure!(status?.success(), "benchmark failed");
        return Ok(());
    }
    let o = parse_args()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(inner(o))
}

async fn client(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

/// Loads the simulated cluster into the API: namespaces, this node, pods (with their IPs in
/// status, as the kubelet reports them) and policies.
async fn load(c: &Client, m: &policy::model::Model) -> Result<()> {
    let pp = PostParams::default();
    for ns in m.namespaces.values() {
        let o: Namespace = serde_json::from_value(json!({"metadata": {"name": ns.name, "labels": ns.labels}}))?;
        Api::<Namespace>::all(c.clone()).create(&pp, &o).await?;
    }
    let nodes: Api<Node> = Api::all(c.clone());
    nodes
        .create(&pp, &serde_json::from_value(json!({"metadata": {"name": NODE}}))?)
        .await?;
    let st = json!({"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}});
    nodes
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(st))
        .await?;
    futures::stream::iter(m.pods.iter().map(Ok))
        .try_for_each_concurrent(16, |p| {
            let pods: Api<Pod> = Api::namespaced(c.clone(), &p.namespace);
            let pp = pp.clone();
            async move {
                let ports: Vec<Value> = p
                    .ports
                    .iter()
                    .map(|n| json!({"name": n.name, "containerPort": n.port, "protocol": n.protocol.name().to_uppercase()}))
                    .collect();
                let o: Pod = serde_json::from_value(json!({
                    "metadata": {"name": p.name, "labels": *p.labels},
                    "spec": {"nodeName": p.node, "containers": [{"name": "app", "image": "app", "ports": ports}]},
                }))?;
                pods.create(&pp, &o).await?;
                let ip = p.ip.map(|i| i.to_string());
                let st = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
                pods.patch_status(&p.name, &PatchParams::default(), &Patch::Merge(st))
                    .await?;
                anyhow::Ok(())
            }
        })
        .await?;
    futures::stream::iter(m.policies.iter().map(Ok))
        .try_for_each_concurrent(16, |p| {
            let api: Api<NetworkPolicy> = Api::namespaced(c.clone(), &p.namespace);
            let pp = pp.clone();
            async move {
                let o: NetworkPolicy =
                    serde_json::from_value(json!({"metadata": {"name": p.name}, "spec": api_policy_spec(p)}))?;
                api.create(&pp, &o).await?;
                anyhow::Ok(())
            }
        })
        .await?;
    Ok(())
}

/// `/metrics` of the daemon, or None while it does not answer yet.
async fn metrics(addr: SocketAddr) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn proc_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// Stops the daemon when dropped, so that a failing run leaves no process behind.
struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

async fn run_backend(
    o: &Opts,
    backend: &str,
    kubeconfig: &Path,
    m: &mut policy::model::Model,
    first_edit: usize,
) -> Result<Value> {
    let c = client(kubeconfig).await?;
    let conf_dir = tempfile::tempdir()?;
    let health: SocketAddr = HEALTH.parse()?;
    let started = Instant::now();
    let child = Command::new(&o.daemon)
        .args([
            "run",
            "--node-name",
            NODE,
            "--ipip-mode",
            "Never",
            "--iptables-backend",
            backend,
        ])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cni-conf-dir")
        .arg(conf_dir.path())
        .args(["--health-addr", HEALTH, "--resync-interval", "3600"])
        .env(
            "RUST_LOG",
            std::env::var("WARREN_BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", o.daemon.display()))?;
    let daemon = Daemon(child);
    let pid = daemon.0.id();
    // The first sync: policy compiled from complete lists and applied.
    let first_sync = loop {
        if let Some(t) = metrics(health).await {
            if metric(&t, "warren_policy_synced") == Some(1.0) {
                break started.elapsed();
            }
        }
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "no policy sync within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let first = metrics(health).await.context("metrics")?;
    let rules = metric(&first, "warren_policy_rules").unwrap_or(0.0);
    tokio::time::sleep(EDIT_SPACING).await;

    // What the daemon should program, compiled as it does: an edit that changes none of it is
    // absorbed and moves no counter.
    let mut inc = Compiler::new();
    let compiled = |inc: &mut Compiler, m: &Model| -> Result<_> {
        let ctx = NodeCtx::from_model(m, NODE, conf::names::HOST_VETH_PREFIX)?;
        Ok(inc.compile(m, &ctx).dataplane)
    };
    let mut prev = compiled(&mut inc, m)?;
    let n = m.policies.len();
    let mut lat = vec![];
    let mut daemon_side = vec![];
    let mut compiles = vec![];
    let mut applies = vec![];
    let mut absorbed = 0;
    let mut i = first_edit;
    while lat.len() < o.edits {
        ensure!(absorbed <= o.edits, "{absorbed} policy edits programmed nothing");
        let kind = edit_policy(m, i);
        let p = &m.policies[(i * 37) % n];
        i += 1;
        let desired = compiled(&mut inc, m)?;
        let changes = desired != prev;
        prev = desired;
        let before = metrics(health).await.context("metrics")?;
        let passes = metric(&before, "warren_event_programmed_passes_total").unwrap_or(0.0);
        let api: Api<NetworkPolicy> = Api::namespaced(c.clone(), &p.namespace);
        let t0 = Instant::now();
        api.patch(
            &p.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": api_policy_spec(p)})),
        )
        .await
        .with_context(|| format!("patching {}/{}", p.namespace, p.name))?;
        if !changes {
            absorbed += 1;
            tokio::time::sleep(EDIT_SPACING).await;
            continue;
        }
        let (d, t) = loop {
            let t = metrics(health).await.context("metrics")?;
            if metric(&t, "warren_event_programmed_passes_total").unwrap_or(0.0) > passes {
                break (t0.elapsed(), t);
            }
            ensure!(
                t0.elapsed() < PROGRAMMED_WITHIN,
                "edit {i} ({kind}) not programmed within {PROGRAMMED_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        };
        lat.push(d.as_secs_f64() * 1e3);
        let ms_of = |name: &str| metric(&t, name).unwrap_or(f64::NAN) * 1e3;
        daemon_side.push(ms_of("warren_event_to_programmed_last_seconds"));
        compiles.push(ms_of("warren_policy_compile_last_seconds"));
        applies.push(ms_of("warren_policy_apply_last_seconds"));
        report_edit(backend, lat.len(), kind, d);
        tokio::time::sleep(EDIT_SPACING).await;
    }
    let rss = proc_kib(pid, "VmHWM:");
    let rss_now = proc_kib(pid, "VmRSS:");
    drop(daemon);
    let un = Command::new(&o.daemon)
        .args(["uninstall", "--iptables-backend", backend, "--cni-conf-dir"])
        .arg(conf_dir.path())
        .output()?;
    ensure!(
        un.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&un.stderr)
    );
    lat.sort_by(f64::total_cmp);
    for v in [&mut daemon_side, &mut compiles, &mut applies] {
        v.sort_by(f64::total_cmp);
    }
    Ok(json!({
        "backend": backend,
        "pods": o.pods,
        "policies": o.policies,
        "rules": rules,
        "first_sync_ms": first_sync.as_secs_f64() * 1e3,
        "edits": lat.len(),
        "edits_absorbed": absorbed,
        "edit_to_programmed_ms_p50": percentile(&lat, 0.5),
        "edit_to_programmed_ms_p95": percentile(&lat, 0.95),
        "edit_to_programmed_ms_p99": percentile(&lat, 0.99),
        "event_to_programmed_ms_p50_daemon": percentile(&daemon_side, 0.5),
        "compile_ms_p50_daemon": percentile(&compiles, 0.5),
        "apply_ms_p50_daemon": percentile(&applies, 0.5),
        "peak_rss_kib": rss,
        "rss_after_edits_kib": rss_now,
    }))
}

fn report_edit(backend: &str, k: usize, kind: &str, d: Duration) {
    if std::env::var_os("WARREN_BENCH_VERBOSE").is_some() {
        eprintln!("{backend} edit {k} ({kind}): {:.1} ms", d.as_secs_f64() * 1e3);
    }
}

async fn inner(o: Opts) -> Result<()> {
    sh(&["ip", "link", "set", "lo", "up"])?;
    sh(&["ip", "link", "add", "lv0", "type", "veth", "peer", "name", "lv1"])?;
    sh(&["ip", "addr", "add", &format!("{NODE_IP}/16"), "dev", "lv0"])?;
    sh(&["ip", "link", "set", "lv0", "up"])?;
    sh(&["ip", "link", "set", "lv1", "up"])?;
    let state = tempfile::tempdir()?;
    let server = lab_apiserver::Server::start(lab_apiserver::Config {
        listen: "127.0.0.1:0".parse()?,
        state_dir: state.path().to_path_buf(),
        token: Some("bench".into()),
        extra_sans: vec![],
    })
    .await?;
    let kubeconfig = state.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, None)?;
    let mut m = cluster::cluster(o.pods, o.policies);
    let t = Instant::now();
    load(&client(&kubeconfig).await?, &m)
        .await
        .context("loading the cluster")?;
    eprintln!(
        "loaded {} pods and {} policies into the API in {:.1} s",
        o.pods,
        o.policies,
        t.elapsed().as_secs_f64()
    );
    println!(
        "Policy edit → programmed through the API, warren-node on {NODE} (100 local pods), {} edits per backend; times in ms",
        o.edits
    );
    println!("| backend | pods | policies | warren rules | first sync | edit → programmed p50 | p95 | p99 | daemon's own p50: event → programmed (compile, apply) | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = vec![];
    let mut next_edit = 0;
    for b in &o.backends {
        // Each backend continues the edit sequence: every edit changes something new.
        let r = run_backend(&o, b, &kubeconfig, &mut m, next_edit).await?;
        next_edit += r["edits"].as_u64().unwrap_or(0) as usize + r["edits_absorbed"].as_u64().unwrap_or(0) as usize;
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {b} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} ({:.1}, {:.1}) | {:.1} |",
            o.pods,
            o.policies,
            r["rules"],
            f("first_sync_ms"),
            f("edit_to_programmed_ms_p50"),
            f("edit_to_programmed_ms_p95"),
            f("edit_to_programmed_ms_p99"),
            f("event_to_programmed_ms_p50_daemon"),
            f("compile_ms_p50_daemon"),
            f("apply_ms_p50_daemon"),
            f("peak_rss_kib") / 1024.0
        );
        rows.push(r);
    }
    let absorbed: u64 = rows.iter().filter_map(|r| r["edits_absorbed"].as_u64()).sum();
    if absorbed > 0 {
        println!("({absorbed} edits programmed nothing, as another rule of their policy already allowed what they added; left out)");
    }
    server.shutdown().await;
    let doc = json!({
        "bench": "policy_latency",
        "node": NODE,
        "note": "ms; edit → programmed = merge patch sent → warren_event_programmed_passes_total moved (polled every 0.5 ms); daemon's own = warren_event_to_programmed_last_seconds; peak RSS = VmHWM of warren-node",
        "rows": rows,
    });
    write_json(&o.out, &doc)?;
    println!("wrote {}", o.out.display());
    Ok(())
}
