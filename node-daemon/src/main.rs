//! `warren-node`: run the node daemon, install the CNI plugin, or remove everything warren put
//! into this node's kernel.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use conf::daemon::{parse_pool, DaemonConfig, IpipMode, IptablesBackend, IPIP_OVERHEAD};
use conf::dataplane::DesiredDataplane;
use k8s_openapi::api::core::v1::{Event, Namespace, Node};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use kube::ResourceExt;
use node_daemon::block::claim_block;
use node_daemon::k8s::{self, KubeNodes};
use node_daemon::metrics::Metrics;
use node_daemon::netlink::{sync_routes, LinkOps, Netlink};
use node_daemon::policy_sync::{self, PolicyTracker};
use node_daemon::reconcile::{LocalNode, Reconciler};
use node_daemon::routes::NodeInfo;
use node_daemon::slim_pod::SlimPod;
use node_daemon::writer::{backend, ExecRunner, Writer};
use node_daemon::{cniconf, health};
use tokio::signal::unix::{signal, SignalKind};

/// Least time between the starts of two event-driven passes: an event after a quiet spell is
/// compiled at once, a burst of events costs at most one pass per interval.
const PASS_MIN_INTERVAL: Duration = Duration::from_millis(50);
/// Quiet time after a make-before-break write before its leftovers are removed.
const TIDY_DELAY: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(name = "warren-node", version, about = "warren's node daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: claim the block, write the conflist, program tunl0, routes and filter.
    Run(RunArgs),
    /// Copy the `warren` and `warren-ipam` binaries into the CNI bin dir (the DaemonSet's init
    /// step). The conflist is written by `run` once the block is known, or here with `--block`.
    InstallCni(InstallArgs),
    /// Remove warren's chains, hooks, sets, proto-88 routes, tunl0's address and the conflist.
    Uninstall(UninstallArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Kubeconfig file; without it: in-cluster service account, then the usual defaults.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long, env = "NODENAME")]
    node_name: Option<String>,
    #[arg(long, env = "WARREN_POOL", default_value = conf::daemon::DEFAULT_POOL)]
    pool: String,
    /// Prefix length of each node's block.
    #[arg(long, env = "WARREN_BLOCK_SIZE", default_value_t = conf::daemon::DEFAULT_BLOCK_PREFIX)]
    block_size: u8,
    /// Always, CrossSubnet or Never.
    #[arg(long, env = "WARREN_IPIP_MODE", default_value = "Always")]
    ipip_mode: String,
    /// Pod and tunl0 MTU, or `auto` (also `0` or empty): the underlay MTU − 20, or the
    /// underlay MTU in mode Never.
    #[arg(long, env = "WARREN_MTU", default_value = "auto")]
    mtu: String,
    #[arg(long, env = "WARREN_NAT_OUTGOING", default_value_t = true, action = clap::ArgAction::Set)]
    nat_outgoing: bool,
    #[arg(long, env = "WARREN_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    #[arg(long, env = "WARREN_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    #[arg(long, env = "WARREN_HEALTH_ADDR", default_value = conf::daemon::DEFAULT_HEALTH_ADDR)]
    health_addr: SocketAddr,
    /// Seconds between full resyncs (drift repair).
    #[arg(long, env = "WARREN_RESYNC_INTERVAL", default_value_t = 5)]
    resync_interval: u64,
    /// auto, legacy or nft.
    #[arg(long, env = "WARREN_IPTABLES_BACKEND", default_value = "auto")]
    iptables_backend: String,
    /// How NetworkPolicy ipBlocks judge NodePort traffic forwarded from another node:
    /// `preserve-source` checks the destination pod's ingress policy on the receiving node
    /// against the original client address; `plain` lets policy see the address after
    /// kube-proxy's SNAT (the forwarding node's), as Calico does.
    #[arg(long, env = "WARREN_NODEPORT_POLICY", default_value = "preserve-source")]
    nodeport_policy: String,
}

#[derive(Args)]
struct InstallArgs {
    /// Where `warren` and `warren-ipam` are (default: this executable's directory).
    #[arg(long, env = "WARREN_SOURCE_DIR")]
    source_dir: Option<PathBuf>,
    #[arg(long, env = "WARREN_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    #[arg(long, env = "WARREN_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Also write the conflist for this block.
    #[arg(long)]
    block: Option<String>,
    #[arg(long, env = "WARREN_MTU", default_value_t = 1480)]
    mtu: u32,
}

#[derive(Args)]
struct UninstallArgs {
    #[arg(long, env = "WARREN_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    #[arg(long, env = "WARREN_IPTABLES_BACKEND", default_value = "auto")]
    iptables_backend: String,
}

fn hostname() -> Option<String> {
    nix::unistd::gethostname().ok()?.into_string().ok()
}

/// `auto`, `0` or empty: follow the underlay; otherwise the MTU itself.
fn parse_mtu(s: &str) -> Result<Option<u32>, String> {
    match s.trim() {
        "" | "0" | "auto" | "Auto" => Ok(None),
        n => n
            .parse::<u32>()
            .map(Some)
            .map_err(|_| format!("MTU {n:?} is neither a number nor `auto`")),
    }
}

impl RunArgs {
    fn config(&self) -> Result<DaemonConfig> {
        let cfg = DaemonConfig {
            node_name: self.node_name.clone().or_else(hostname).unwrap_or_default(),
            pool: parse_pool(&self.pool)?,
            block_prefix: self.block_size,
            ipip_mode: self.ipip_mode.parse()?,
            mtu: parse_mtu(&self.mtu).map_err(anyhow::Error::msg)?,
            nat_outgoing: self.nat_outgoing,
            cni_conf_dir: self.cni_conf_dir.clone(),
            cni_bin_dir: self.cni_bin_dir.clone(),
            health_addr: self.health_addr,
            resync_interval: Duration::from_secs(self.resync_interval),
            iptables_backend: self.iptables_backend.parse()?,
            nodeport_policy: self.nodeport_policy.parse()?,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config and no kubeconfig")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Retries an API step with capped exponential backoff (the API may be down at start).
async fn with_backoff<T, F, Fut, E>(what: &str, metrics: &Metrics, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                Metrics::inc(&metrics.api_errors);
                tracing::warn!(error = %e, retry_in = ?delay, "{what} failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let cfg = args.config()?;
    let metrics = Arc::new(Metrics::default());
    let addr = health::serve(cfg.health_addr, metrics.clone())
        .await
        .with_context(|| format!("binding the health server on {}", cfg.health_addr))?;
    tracing::info!(node = %cfg.node_name, health = %addr, mode = %cfg.ipip_mode, "warren-node starting");
    let client = client(args.kubeconfig.as_ref()).await?;
    let nodes_api: Api<Node> = Api::all(client.clone());

    let store = KubeNodes { api: nodes_api.clone() };
    let block = with_backoff("claiming the node's block", &metrics, || {
        claim_block(&store, cfg.pool, cfg.block_prefix, &cfg.node_name)
    })
    .await;
    tracing::info!(%block, "node block");
    let me = with_backoff("reading this Node", &metrics, || nodes_api.get(&cfg.node_name)).await;
    let ip = k8s::internal_ip(&me);

    let net = Netlink::connect().context("opening the netlink socket")?;
    let underlay = match ip {
        Some(ip) => net.underlay(ip).await.context("finding the underlay interface")?,
        None => None,
    };
    let underlay_mtu = underlay.map_or(1500, |u| u.mtu);
    let mtu = cfg.mtu.unwrap_or(match cfg.ipip_mode {
        IpipMode::Never => underlay_mtu,
        _ => underlay_mtu.saturating_sub(IPIP_OVERHEAD),
    });
    if cniconf::write_conflist(&cfg.cni_conf_dir, block, mtu)? {
        tracing::info!(dir = %cfg.cni_conf_dir.display(), %block, mtu, "wrote the conflist");
    }

    let runner = ExecRunner::new();
    let backend = backend::detect(&runner, cfg.iptables_backend);
    let mut rec = Reconciler::new(
        net,
        Writer::new(runner, backend),
        LocalNode {
            name: cfg.node_name.clone(),
            block,
            ip,
            underlay_subnet: underlay.map(|u| u.subnet),
            mtu,
            mode: cfg.ipip_mode,
            pool: cfg.pool,
            nat_outgoing: cfg.nat_outgoing,
        },
        metrics.clone(),
    );

    let changed = Arc::new(k8s::Changes::default());
    let nodes = k8s::reflect(nodes_api, changed.clone(), metrics.clone(), k8s::keep_all);
    // Pods are read as `SlimPod`s (the same /api/v1/pods list and watch): whole Pods in the
    // store would be most of the daemon's memory at 10 000 pods (issue 5).
    let pods = k8s::reflect(
        Api::<SlimPod>::all(client.clone()),
        changed.clone(),
        metrics.clone(),
        k8s::keep_all,
    );
    let namespaces = k8s::reflect(
        Api::<Namespace>::all(client.clone()),
        changed.clone(),
        metrics.clone(),
        k8s::keep_all,
    );
    let policies = k8s::reflect(
        Api::<NetworkPolicy>::all(client.clone()),
        changed.clone(),
        metrics.clone(),
        k8s::keep_all,
    );
    let mut tracker = PolicyTracker::default();
    let mut janitor = node_daemon::conntrack::ConntrackJanitor::default();
    let mut compiler = policy::compile::Compiler::new();
    let mut model_cache = policy_sync::ModelCache::default();
    tracing::info!(nodeport_policy = %cfg.nodeport_policy, "NodePort policy behaviour");
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(cfg.resync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_set = false;
    // What the last successful pass programmed; an event that changes none of it (a Node's
    // heartbeat, a pod's status) needs no pass until the resync reads the kernel back anyway.
    let mut programmed: Option<(Vec<NodeInfo>, Option<DesiredDataplane>)> = None;
    // When to remove what make-before-break writes left (dead rules, stale chains and sets): once
    // events have been quiet for TIDY_DELAY, so bursts of changes pay no deletions.
    let mut tidy_at: Option<tokio::time::Instant> = None;
    let mut last_pass: Option<std::time::Instant> = None;
    loop {
        let tidy_due = async move {
            match tidy_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let resync = tokio::select! {
            _ = tidy_due => {
                tidy_at = None;
                if let Err(e) = rec.tidy() {
                    // The next pass reads the kernel back, which cleans up as well.
                    programmed = None;
                    tracing::warn!(error = %e, "dataplane cleanup failed; the next sync repairs it");
                }
                continue;
            }
            _ = changed.wait() => {
                // Events during the pause or the pass leave a permit for one more pass.
                let wait = k8s::pass_delay(last_pass, std::time::Instant::now(), PASS_MIN_INTERVAL);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                false
            }
            _ = tick.tick() => true,
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: exiting, dataplane left in place");
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted: exiting, dataplane left in place");
                return Ok(());
            }
        };
        last_pass = Some(std::time::Instant::now());
        // Taken before the stores are read: an event that lands later is timed by the next pass.
        let oldest_event = changed.take_oldest();
        // Nothing is programmed (and nothing swept) before the first complete Node list: a
        // restart keeps the old state until the new one is known.
        if !nodes.synced.load(std::sync::atomic::Ordering::Acquire) {
            continue;
        }
        // Policy is compiled only from complete lists (a partial pod list would leave pods'
        // interfaces without chains, which drops their traffic); until every reflector has
        // listed once, the overlay alone is written and nothing is swept, so the rules of the
        // previous run stay (fail-static).
        let all_synced = [&pods.synced, &namespaces.synced, &policies.synced]
            .iter()
            .all(|s| s.load(std::sync::atomic::Ordering::Acquire));
        let infos: Vec<_> = nodes.store.state().iter().map(|n| k8s::to_info(n)).collect();
        let build = if all_synced {
            // The stores' own objects, shared: the cache converts only what changed.
            let np = policies.store.state();
            let objects = policy_sync::Objects {
                namespaces: &namespaces.store.state(),
                pods: &pods.store.state(),
                policies: &np,
            };
            let nodeport =
                policy_sync::nodeport_check(cfg.nodeport_policy, cfg.ipip_mode, &cfg.node_name, block, &infos);
            match model_cache.build(
                objects,
                &cfg.node_name,
                conf::names::HOST_VETH_PREFIX,
                nodeport,
                &mut compiler,
            ) {
                Ok(b) => {
                    for e in tracker.compiled(&b, &metrics) {
                        tracing::warn!(namespace = %e.policy.namespace, name = %e.policy.name, reason = %e.reason, "NetworkPolicy not enforced");
                        let uid = np
                            .iter()
                            .find(|p| {
                                p.namespace().as_deref() == Some(&e.policy.namespace) && p.name_any() == e.policy.name
                            })
                            .and_then(|p| p.uid());
                        let ev = policy_sync::policy_event(&e, uid.as_deref(), &cfg.node_name);
                        let events: Api<Event> = Api::namespaced(client.clone(), &e.policy.namespace);
                        if let Err(err) = events.create(&PostParams::default(), &ev).await {
                            Metrics::inc(&metrics.api_errors);
                            tracing::warn!(error = %err, "could not post the Event for the skipped policy");
                        }
                    }
                    Some(b)
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy compile failed; keeping the current policy rules");
                    None
                }
            }
        } else {
            None
        };
        let sweep = build.is_some();
        let inputs = (infos.clone(), build.as_ref().map(|b| b.dataplane.clone()));
        if !resync && programmed.as_ref() == Some(&inputs) {
            continue;
        }
        // Between resyncs the writer diffs against what it wrote; the resync (and any pass after
        // a failure) reads the kernel back and repairs drift.
        rec.writer.read_back = resync || programmed.is_none();
        let start = std::time::Instant::now();
        match rec
            .reconcile(&infos, build.as_ref().map(|b| b.dataplane.clone()), sweep)
            .await
        {
            Ok(o) => {
                programmed = Some(inputs);
                tidy_at = (rec.writer.untidy() > 0).then(|| tokio::time::Instant::now() + TIDY_DELAY);
                if let Some(b) = &build {
                    let apply = start.elapsed();
                    metrics.policy_apply_micros_last.store(
                        u64::try_from(apply.as_micros()).unwrap_or(u64::MAX),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    metrics
                        .nodeport_preserve_source
                        .store(b.nodeport, std::sync::atomic::Ordering::Relaxed);
                    metrics.policy_synced.store(true, std::sync::atomic::Ordering::Relaxed);
                    for (ns, pod, secs) in tracker.applied(b, &metrics) {
                        tracing::info!(namespace = %ns, pod = %pod, since_created_s = secs, "pod programmed");
                    }
                    // After the apply, so that a departed pod's flows meet the new rules.
                    for ip in janitor.released(&b.addresses) {
                        match node_daemon::conntrack::flush(rec.writer.runner(), ip) {
                            Ok(()) => {
                                Metrics::inc(&metrics.conntrack_flushes);
                                tracing::info!(%ip, "conntrack entries of a departed pod's address deleted");
                            }
                            Err(e) => {
                                Metrics::inc(&metrics.conntrack_flush_errors);
                                tracing::warn!(%ip, error = %e, "could not delete the conntrack entries of a departed pod's address");
                            }
                        }
                    }
                    if !o.dataplane_changed.is_empty() {
                        tracing::info!(
                            compile_ms = b.compile_time.as_secs_f64() * 1e3,
                            apply_ms = apply.as_secs_f64() * 1e3,
                            rules = b.stats.rules,
                            ipsets = b.stats.ipsets,
                            workloads = b.stats.local_workloads,
                            skipped_policies = b.errors.len(),
                            "policy programmed"
                        );
                    }
                }
                if o.routes_changed > 0 || !o.dataplane_changed.is_empty() {
                    if let Some(t) = oldest_event {
                        metrics.event_programmed(t.elapsed());
                    }
                    tracing::info!(routes = o.routes, routes_changed = o.routes_changed, dataplane = ?o.dataplane_changed, "synced");
                }
                if !status_set {
                    match k8s::set_network_available(&client, &cfg.node_name).await {
                        Ok(()) => status_set = true,
                        Err(e) => {
                            Metrics::inc(&metrics.api_errors);
                            tracing::warn!(error = %e, "could not set NetworkUnavailable=False; will retry");
                        }
                    }
                }
            }
            Err(e) => {
                programmed = None;
                tracing::error!(error = %e, "sync failed; retrying at the next event or resync");
            }
        }
    }
}

fn install_cni(args: InstallArgs) -> Result<()> {
    let source = match args.source_dir {
        Some(d) => d,
        None => std::env::current_exe()
            .context("finding this executable")?
            .parent()
            .map(PathBuf::from)
            .context("executable has no directory")?,
    };
    for p in cniconf::install_binaries(&source, &args.cni_bin_dir)? {
        tracing::info!(path = %p.display(), "installed");
    }
    if let Some(b) = args.block {
        let block = b.parse().with_context(|| format!("--block {b:?} is not a CIDR"))?;
        cniconf::write_conflist(&args.cni_conf_dir, block, args.mtu)?;
    }
    Ok(())
}

async fn uninstall(args: UninstallArgs) -> Result<()> {
    let backend_wanted: IptablesBackend = args.iptables_backend.parse()?;
    let runner = ExecRunner::new();
    let backend = backend::detect(&runner, backend_wanted);
    let mut errors = Vec::new();
    if let Err(e) = Writer::new(runner, backend).remove_all() {
        errors.push(e.to_string());
    }
    let net = Netlink::connect()?;
    if let Err(e) = sync_routes(&net, &[]).await {
        errors.push(e.to_string());
    }
    if let Err(e) = net.clear_tunnel(conf::names::TUNNEL_IFACE).await {
        errors.push(e.to_string());
    }
    let conflist = args.cni_conf_dir.join(conf::daemon::CONFLIST_FILE);
    match std::fs::remove_file(&conflist) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing {}: {e}", conflist.display())),
    }
    if !errors.is_empty() {
        bail!("uninstall incomplete: {}", errors.join("; "));
    }
    Ok(())
}

// One thread: a pass mostly waits on iptables-restore, and the watches need little CPU. With a
// worker per core, each worker's malloc arena kept its own high-water mark (two arenas held 23 of
// the daemon's 65 MiB at 10 000 pods); on one thread, peak RSS measured 55 MiB and a policy edit
// reached the kernel ~4 ms sooner (policy_latency_bench, issue 5). The health server waits during
// a pass, which at 10 000 pods is at most ~1.5 s (the first sync), well inside the probes.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run(a) => run(a).await,
        Cmd::InstallCni(a) => install_cni(a),
        Cmd::Uninstall(a) => uninstall(a).await,
    }
}
