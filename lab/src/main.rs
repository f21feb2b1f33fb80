//! `warren-lab`: the three-node lab. See `warren-lab --help`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lab::config::{LabConfig, DEFAULT_CACHE_DIR, DEFAULT_STATE_DIR};
use lab::control::{self, Request};
use lab::launcher::{self, UpOptions, VmMode};
use lab::podserve::{self, Proto};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "warren-lab",
    about = "A Kubernetes cluster of network namespaces on one machine, running warren"
)]
struct Cli {
    /// Where the lab keeps its state (shared into the micro-VM).
    #[arg(long, global = true, env = "WARREN_LAB_STATE", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the lab; returns when every node is Ready.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, value_enum, default_value = "auto")]
        vm: VmMode,
        #[arg(long, default_value = "Always")]
        ipip_mode: String,
        #[arg(long, default_value = "iptables")]
        proxy_mode: String,
        /// Where the micro-VM's kernel and initramfs are cached.
        #[arg(long, env = "WARREN_LAB_CACHE", default_value = DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Do not run warren-node; the lab writes each node's CNI configuration itself.
        #[arg(long)]
        no_warren_node: bool,
        /// Run warren-node from this manifest's DaemonSet and ConfigMap instead of the built-in
        /// deploy/warren.yaml.
        #[arg(long, conflicts_with = "no_warren_node")]
        manifest: Option<PathBuf>,
    },
    /// Show nodes, pods and outside hosts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Real kubectl against the lab's API.
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a command on a node (node:NAME), an outside host (host:NAME) or in a pod (NS/POD).
    Exec {
        target: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Outside hosts on the underlay.
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
    },
    /// Connect FROM → TO; prints "connected" or "blocked" (exit 0, 1; 2 on error).
    Probe {
        from: String,
        to: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "TCP")]
        protocol: String,
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
        /// Print the whole result (whom it reached, the source address the server saw) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every pod to every pod of the namespaces.
    Matrix {
        #[arg(long, value_delimiter = ',')]
        namespaces: Vec<String>,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "TCP")]
        protocol: String,
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
        #[arg(long)]
        json: bool,
    },
    /// Restart a node component (warren-node, kube-proxy), as a DaemonSet rollout would; or
    /// `restart apiserver`: an outage of the API stand-in (connections and watches cut, back on the
    /// same address with the same objects after --down-ms).
    Restart {
        /// node:NAME, or `apiserver`
        node: String,
        /// warren-node or kube-proxy (none for `apiserver`)
        component: Option<String>,
        /// How long the component stays down.
        #[arg(long, default_value_t = 0)]
        down_ms: u64,
        /// Replace the component's extra flags (kept for later restarts), e.g. --arg=--nodeport-policy=plain
        #[arg(long = "arg", allow_hyphen_values = true)]
        args: Option<Vec<String>>,
    },
    /// Run a scenario (`tekton`: seed 000) and print expected vs observed; exit 1 on any mismatch.
    Scenario {
        name: String,
        /// kube-proxy mode for a lab the scenario brings up (must match a running lab's).
        #[arg(long)]
        proxy_mode: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        vm: VmMode,
        /// Read the scenario's files from this directory instead of the built-in copy.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Only these experiments (e.g. exp1,exp4).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Leave a lab the scenario brought up running.
        #[arg(long)]
        keep: bool,
        /// Every cell's reason and the source address the dashboard saw.
        #[arg(short, long)]
        verbose: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the lab and remove everything it made.
    Down,
    #[command(name = "__controller", hide = true)]
    Controller,
    #[command(name = "__in-node", hide = true)]
    InNode {
        #[arg(long)]
        netns: String,
        #[arg(long = "bind")]
        binds: Vec<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        argv: Vec<String>,
    },
    #[command(name = "__serve", hide = true)]
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long = "port")]
        ports: Vec<String>,
    },
    #[command(name = "__kube-proxy", hide = true)]
    KubeProxy {
        #[arg(long)]
        node: String,
        #[arg(long)]
        node_ip: std::net::IpAddr,
        #[arg(long)]
        cluster_cidr: Option<ipnet::IpNet>,
        /// kube-proxy's --masquerade-all: SNAT every connection to a service.
        #[arg(long)]
        masquerade_all: bool,
        #[arg(long, default_value = "iptables")]
        mode: String,
        #[arg(long)]
        kubeconfig: PathBuf,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    /// Add an outside host serving PORTS (e.g. 80/TCP,53/UDP) like a pod does.
    Add {
        name: String,
        ip: String,
        #[arg(long, value_delimiter = ',')]
        ports: Vec<String>,
    },
    Del {
        name: String,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn,hyper=warn,rustls=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() {
    let cli = Cli::parse();
    // Exec-style subcommands must stay single-threaded until they exec: no runtime for them.
    if let Cmd::InNode { netns, binds, argv } = &cli.cmd {
        let binds: Vec<(PathBuf, PathBuf)> = binds
            .iter()
            .filter_map(|b| b.split_once(':').map(|(s, d)| (PathBuf::from(s), PathBuf::from(d))))
            .collect();
        let Err(e) = lab::nodectx::exec_in_node(netns, &binds, argv);
        eprintln!("warren-lab: {e:#}");
        std::process::exit(127);
    }
    if let Cmd::Serve { name, ports } = &cli.cmd {
        let parsed: Result<Vec<(u16, Proto)>> = ports.iter().map(|p| podserve::parse_port_spec(p)).collect();
        let res = parsed.and_then(|p| podserve::serve(name, &p));
        if let Err(e) = res {
            eprintln!("warren-lab serve: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-lab: {e}");
            std::process::exit(2);
        }
    };
    let code = rt.block_on(async move {
        match run(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("warren-lab: {e:#}");
                2
            }
        }
    });
    std::process::exit(code);
}

/// Checks `up --manifest FILE` before anything starts and leaves a copy in the state directory,
/// where the controller (in the micro-VM too) reads it. A stale lab is cleaned up first, as
/// `up` would, so that its removal does not take the copy with it.
async fn stage_manifest(state_dir: &std::path::Path, path: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let probe = lab::manifest::PodContext {
        node_name: "node1".into(),
        host_ip: "127.0.0.1".into(),
        api_host: "127.0.0.1".into(),
        api_port: 6443,
    };
    lab::manifest::Manifest::parse(&text)
        .and_then(|m| m.plan(&probe))
        .with_context(|| format!("the lab cannot run warren-node from {}", path.display()))?;
    if LabConfig::path(state_dir).exists() {
        if launcher::status(state_dir).await.is_ok() {
            bail!(
                "a lab is already up (state in {}); run `warren-lab down` first",
                state_dir.display()
            );
        }
        launcher::down(state_dir).await.ok();
    }
    std::fs::create_dir_all(state_dir)?;
    let dst = LabConfig::manifest_override_path(state_dir);
    std::fs::write(&dst, text).with_context(|| format!("writing {}", dst.display()))
}

async fn ctl(state_dir: &std::path::Path, req: Request, timeout: Duration) -> Result<Value> {
    let cfg = LabConfig::load(state_dir)?;
    control::call(cfg.host_ctl, &req, timeout).await
}

async fn run(cli: Cli) -> Result<i32> {
    let sd = cli.state_dir.clone();
    match cli.cmd {
        Cmd::Up {
            nodes,
            vm,
            ipip_mode,
            proxy_mode,
            cache_dir,
            no_warren_node,
            manifest,
        } => {
            if let Some(m) = &manifest {
                stage_manifest(&sd, m).await?;
            }
            launcher::up(UpOptions {
                nodes,
                vm,
                ipip_mode,
                proxy_mode,
                state_dir: sd,
                cache_dir,
                warren_node: !no_warren_node,
            })
            .await
            .map(|summary| print!("{summary}"))?;
            Ok(0)
        }
        Cmd::Status { json } => {
            let v = launcher::status(&sd).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(0)
        }
        Cmd::Kubectl { args } => {
            let cfg = LabConfig::load(&sd)?;
            let status = lab::kubectl(&cfg).args(&args).status().context("running kubectl")?;
            Ok(status.code().unwrap_or(2))
        }
        Cmd::Exec { target, cmd } => {
            let v = ctl(&sd, Request::Exec { target, argv: cmd }, Duration::from_secs(600)).await?;
            print!("{}", v["stdout"].as_str().unwrap_or(""));
            eprint!("{}", v["stderr"].as_str().unwrap_or(""));
            Ok(i32::try_from(v["code"].as_i64().unwrap_or(2)).unwrap_or(2))
        }
        Cmd::Host {
            cmd: HostCmd::Add { name, ip, ports },
        } => {
            let ports = ports
                .iter()
                .map(|p| podserve::parse_port_spec(p))
                .collect::<Result<Vec<_>>>()?;
            ctl(&sd, Request::HostAdd { name, ip, ports }, Duration::from_secs(60)).await?;
            Ok(0)
        }
        Cmd::Host {
            cmd: HostCmd::Del { name },
        } => {
            ctl(&sd, Request::HostDel { name }, Duration::from_secs(60)).await?;
            Ok(0)
        }
        Cmd::Probe {
            from,
            to,
            port,
            protocol,
            timeout,
            json,
        } => {
            let protocol: Proto = protocol.parse()?;
            let timeout_ms = secs_to_ms(timeout)?;
            let v = ctl(
                &sd,
                Request::Probe {
                    from,
                    to,
                    port,
                    protocol,
                    timeout_ms,
                },
                Duration::from_secs(120),
            )
            .await?;
            let r: podserve::ProbeResult = serde_json::from_value(v.clone())?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
                return Ok(if r.connected { 0 } else { 1 });
            }
            if r.connected {
                println!("connected");
                Ok(0)
            } else {
                println!("blocked");
                Ok(1)
            }
        }
        Cmd::Matrix {
            namespaces,
            port,
            protocol,
            timeout,
            json,
        } => {
            if namespaces.is_empty() {
                bail!("--namespaces is required");
            }
            let protocol: Proto = protocol.parse()?;
            let timeout_ms = secs_to_ms(timeout)?;
            let v = ctl(
                &sd,
                Request::Matrix {
                    namespaces,
                    port,
                    protocol,
                    timeout_ms,
                },
                Duration::from_secs(600),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_matrix(&v);
            }
            Ok(0)
        }
        Cmd::Restart {
            node,
            component,
            down_ms,
            args,
        } => {
            let (node, component) = match (node.as_str(), component) {
                ("apiserver", None) => (String::new(), "apiserver".to_string()),
                (_, Some(c)) => (node.strip_prefix("node:").unwrap_or(&node).to_string(), c),
                (n, None) => bail!("restart {n}: which component? (warren-node, kube-proxy; or `restart apiserver`)"),
            };
            let req = Request::Restart {
                node,
                component,
                down_ms,
                extra_args: args,
            };
            ctl(&sd, req, Duration::from_secs(120) + Duration::from_millis(down_ms)).await?;
            Ok(0)
        }
        Cmd::Scenario {
            name,
            proxy_mode,
            vm,
            data_dir,
            only,
            keep,
            verbose,
            json,
        } => {
            if name != "tekton" {
                bail!("unknown scenario {name:?} (known: tekton)");
            }
            let opts = lab::scenario::ScenarioOptions {
                data_dir,
                only,
                vm,
                keep_lab: keep,
                verbose,
                ..Default::default()
            };
            let r = lab::scenario::run_tekton(&sd, proxy_mode.as_deref(), &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else if verbose {
                print!("{}", lab::scenario::render_report(&r, true));
            } else {
                lab::scenario::print_report(&r);
            }
            Ok(if r.mismatches == 0 { 0 } else { 1 })
        }
        Cmd::Down => {
            launcher::down(&sd).await?;
            println!("warren-lab: down");
            Ok(0)
        }
        Cmd::Controller => {
            let cfg = LabConfig::load(&sd)?;
            lab::controller::run(cfg).await?;
            Ok(0)
        }
        Cmd::KubeProxy {
            node,
            node_ip,
            cluster_cidr,
            masquerade_all,
            mode,
            kubeconfig,
        } => {
            let mode: lab::kubeproxy::Mode = mode.parse().map_err(anyhow::Error::msg)?;
            let client = lab::controller::client_from(&kubeconfig).await?;
            lab::kubeproxy::controller::run_proxy_mode(client, mode, node, vec![node_ip], cluster_cidr, masquerade_all)
                .await?;
            Ok(0)
        }
        Cmd::InNode { .. } | Cmd::Serve { .. } => Ok(0),
    }
}

fn secs_to_ms(s: f64) -> Result<u64> {
    if !(0.01..=600.0).contains(&s) {
        bail!("--timeout must be between 0.01 and 600 seconds");
    }
    Ok((s * 1000.0).round() as u64)
}

fn print_status(v: &Value) {
    println!("nodes:");
    for n in v["nodes"].as_array().into_iter().flatten() {
        println!(
            "  {:<8} {:<16} {:<16} cni {}",
            s(&n["name"]),
            s(&n["ip"]),
            s(&n["block"]),
            n["cni"]
        );
    }
    println!("pods:");
    let mut pods: Vec<&Value> = v["pods"].as_array().into_iter().flatten().collect();
    pods.sort_by_key(|p| s(&p["pod"]));
    for p in pods {
        println!(
            "  {:<40} {:<8} {:<16} {}",
            s(&p["pod"]),
            s(&p["node"]),
            s(&p["ip"]),
            s(&p["state"])
        );
    }
    for f in v["failures"].as_array().into_iter().flatten() {
        println!("  {:<40} failing: {}", s(&f["pod"]), s(&f["error"]));
    }
    println!("hosts:");
    for h in v["hosts"].as_array().into_iter().flatten() {
        println!("  {:<10} {}", s(&h["host"]), s(&h["ip"]));
    }
}

fn s(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

fn print_matrix(v: &Value) {
    let pods: Vec<String> = v["pods"].as_array().into_iter().flatten().map(s).collect();
    let cell = |f: &str, t: &str| {
        v["cells"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["from"] == f && c["to"] == t)
            .map(|c| c["connected"] == true)
    };
    let w = pods.iter().map(String::len).max().unwrap_or(4).max(4);
    print!("{:w$}", "from\\to", w = w + 2);
    for (i, _) in pods.iter().enumerate() {
        print!(" {:>3}", i + 1);
    }
    println!();
    for (i, f) in pods.iter().enumerate() {
        print!("{:w$}", format!("{}:{f}", i + 1), w = w + 2);
        for t in &pods {
            print!(
                " {:>3}",
                match cell(f, t) {
                    Some(true) => "ok",
                    Some(false) => "X",
                    None => "?",
                }
            );
        }
        println!();
    }
}
