//! `warren-lab up` / `down`: starts the controller on this kernel or inside the micro-VM, waits
//! for the cluster to be Ready, and takes everything down again.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::config::LabConfig;
use crate::control::{self, Request};
use crate::topology::{self, NodeSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VmMode {
    Auto,
    Always,
    Never,
}

pub struct UpOptions {
    pub nodes: usize,
    pub vm: VmMode,
    pub ipip_mode: String,
    pub proxy_mode: String,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub warren_node: bool,
}

const GUEST_API_PORT: u16 = 6443;
const GUEST_CTL_PORT: u16 = 7443;

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

pub async fn status(state_dir: &Path) -> Result<Value> {
    let cfg = LabConfig::load(state_dir)?;
    control::call(cfg.host_ctl, &Request::Status, Duration::from_secs(20)).await
}

/// Brings the lab up; returns the summary to show (nodes, addresses, blocks, kubeconfig).
pub async fn up(opts: UpOptions) -> Result<String> {
    let t0 = Instant::now();
    if LabConfig::path(&opts.state_dir).exists() {
        if status(&opts.state_dir).await.is_ok() {
            bail!(
                "a lab is already up (state in {}); run `warren-lab down` first",
                opts.state_dir.display()
            );
        }
        eprintln!("warren-lab: cleaning up after a lab that is no longer running");
        down(&opts.state_dir).await.ok();
    }
    if !matches!(opts.ipip_mode.as_str(), "Always" | "CrossSubnet" | "Never") {
        bail!("--ipip-mode must be Always, CrossSubnet or Never");
    }
    if !matches!(opts.proxy_mode.as_str(), "iptables" | "ipvs") {
        bail!("--proxy-mode must be iptables or ipvs");
    }
    if opts.nodes == 0 || opts.nodes > 60 {
        bail!("--nodes must be between 1 and 60");
    }
    let exe = std::env::current_exe().context("locating warren-lab")?;
    let bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let in_vm = match opts.vm {
        VmMode::Always => true,
        VmMode::Never => false,
        VmMode::Auto => {
            let ipvs_needed = opts.proxy_mode == "ipvs";
            !lab_vm::kernel_has_ipip() || ipvs_needed
        }
    };
    std::fs::create_dir_all(&opts.state_dir)?;
    let nodes: Vec<NodeSpec> = topology::nodes(opts.nodes);
    let (api_bind, ctl_bind, host_api, host_ctl) = if in_vm {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        (
            SocketAddr::new(any, GUEST_API_PORT),
            SocketAddr::new(any, GUEST_CTL_PORT),
            loopback(free_port()?),
            loopback(free_port()?),
        )
    } else {
        let api = loopback(free_port()?);
        let ctl = loopback(free_port()?);
        (api, ctl, api, ctl)
    };
    let cfg = LabConfig {
        nodes,
        state_dir: opts.state_dir.clone(),
        exe: exe.clone(),
        bin_dir,
        ipip_mode: opts.ipip_mode.clone(),
        proxy_mode: opts.proxy_mode.clone(),
        in_vm,
        api_bind,
        ctl_bind,
        host_api,
        host_ctl,
        underlay_mtu: 1500,
        warren_node: opts.warren_node && exe.with_file_name("warren-node").exists(),
    };
    cfg.save()?;
    let log = opts.state_dir.join("controller.log");
    let controller_argv = vec![
        exe.to_string_lossy().into_owned(),
        "__controller".into(),
        "--state-dir".into(),
        opts.state_dir.to_string_lossy().into_owned(),
    ];
    if in_vm {
        eprintln!(
            "warren-lab: this kernel lacks ipip{}; starting the lab in a micro-VM",
            if opts.proxy_mode == "ipvs" { " or IPVS" } else { "" }
        );
        let assets =
            lab_vm::ensure_assets(&opts.cache_dir).map_err(|e| anyhow::anyhow!("preparing the micro-VM: {e}"))?;
        let vm_cfg = lab_vm::VmConfig {
            assets,
            memory_mb: 3072,
            cpus: 2,
            shared_dir: opts.state_dir.clone(),
            forwards: vec![(host_api.port(), GUEST_API_PORT), (host_ctl.port(), GUEST_CTL_PORT)],
            command: controller_argv,
            env: vec![(
                "RUST_LOG".into(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )],
            modules: lab_vm::DEFAULT_MODULES.iter().map(|s| s.to_string()).collect(),
            console_log: opts.state_dir.join("console.log"),
        };
        eprintln!("warren-lab: booting the micro-VM (software emulation; ~10 s)…");
        let vm = lab_vm::Vm::start(&vm_cfg).map_err(|e| anyhow::anyhow!("starting the micro-VM: {e}"))?;
        eprintln!(
            "warren-lab: micro-VM up (pid {}) after {:.1}s",
            vm.pid(),
            t0.elapsed().as_secs_f64()
        );
    } else {
        let logf = std::fs::File::create(&log)?;
        let child = Command::new("setsid")
            .args(&controller_argv)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("starting the lab controller")?;
        std::fs::write(opts.state_dir.join("controller.pid"), child.id().to_string())?;
    }
    eprintln!("warren-lab: waiting for the controller…");
    let deadline = Instant::now() + Duration::from_secs(if in_vm { 300 } else { 60 });
    loop {
        if let Ok(msg) = std::fs::read_to_string(opts.state_dir.join("failed")) {
            bail!(
                "the lab controller failed: {msg}\n(see {})",
                log_hint(&opts.state_dir, in_vm)
            );
        }
        if control::call(host_ctl, &Request::Status, Duration::from_secs(5))
            .await
            .is_ok()
        {
            break;
        }
        if in_vm && matches!(lab_vm::Vm::attach(&opts.state_dir), Ok(None)) {
            bail!(
                "the micro-VM stopped before the lab controller came up (see {})",
                log_hint(&opts.state_dir, in_vm)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the lab controller did not come up (see {})",
                log_hint(&opts.state_dir, in_vm)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "warren-lab: API up after {:.1}s; waiting for nodes to be Ready…",
        t0.elapsed().as_secs_f64()
    );
    wait_nodes_ready(&cfg, deadline).await?;
    let ready = t0.elapsed().as_secs_f64();
    std::fs::write(opts.state_dir.join("up-seconds"), format!("{ready:.2}")).ok();
    let mut summary = format!(
        "warren-lab: {} nodes Ready in {ready:.1}s ({}; kube-proxy {}; IPIP {})\n",
        cfg.nodes.len(),
        if in_vm { "micro-VM" } else { "this kernel" },
        cfg.proxy_mode,
        cfg.ipip_mode
    );
    for n in &cfg.nodes {
        summary.push_str(&format!("  {:<8} {:<16} block {}\n", n.name, n.ip, n.block));
    }
    summary.push_str(&format!(
        "  kubectl: warren-lab kubectl -- get nodes   (kubeconfig {})\n",
        cfg.host_kubeconfig().display()
    ));
    Ok(summary)
}

fn log_hint(state_dir: &Path, in_vm: bool) -> String {
    if in_vm {
        format!(
            "{} and {}",
            state_dir.join("console.log").display(),
            state_dir.join("controller.log").display()
        )
    } else {
        state_dir.join("controller.log").display().to_string()
    }
}

async fn wait_nodes_ready(cfg: &LabConfig, deadline: Instant) -> Result<()> {
    loop {
        let out = crate::kubectl_output(cfg, &["get", "nodes", "-o", "json"]);
        if let Ok(v) = out.and_then(|o| serde_json::from_str::<Value>(&o).context("kubectl output")) {
            let items = v["items"].as_array().cloned().unwrap_or_default();
            let ready = items
                .iter()
                .filter(|n| {
                    n["status"]["conditions"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
                })
                .count();
            if ready == cfg.nodes.len() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "nodes did not become Ready in time (see {})",
                cfg.state_dir.join("controller.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Stops the controller (which tears the cluster down), the VM, and sweeps anything left.
pub async fn down(state_dir: &Path) -> Result<()> {
    let cfg = LabConfig::load(state_dir).ok();
    if let Some(cfg) = &cfg {
        let _ = control::call(cfg.host_ctl, &Request::Shutdown, Duration::from_secs(10)).await;
        if cfg.in_vm {
            if let Ok(Some(vm)) = lab_vm::Vm::attach(state_dir) {
                let _ = vm.wait_or_kill(Duration::from_secs(90));
            }
        } else if let Ok(pid) = std::fs::read_to_string(state_dir.join("controller.pid")) {
            wait_pid_gone(pid.trim(), Duration::from_secs(60)).await;
        }
    }
    // Whatever a crashed controller left: its children and namespaces (all carry the lab's prefix).
    if let Ok(rd) = std::fs::read_dir(state_dir.join("pids")) {
        for e in rd.flatten() {
            if let Ok(pid) = std::fs::read_to_string(e.path()) {
                kill_pid(pid.trim());
            }
        }
    }
    if let Ok(pid) = std::fs::read_to_string(state_dir.join("controller.pid")) {
        kill_pid(pid.trim());
    }
    if !cfg.as_ref().is_some_and(|c| c.in_vm) {
        for ns in crate::netns::list_with_prefix(topology::NETNS_PREFIX) {
            let _ = crate::netns::del(&ns);
        }
    }
    if state_dir.exists() {
        std::fs::remove_dir_all(state_dir).with_context(|| format!("removing {}", state_dir.display()))?;
    }
    Ok(())
}

fn kill_pid(pid: &str) {
    if let Ok(p) = pid.parse::<i32>() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
    }
}

async fn wait_pid_gone(pid: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let path = PathBuf::from(format!("/proc/{pid}"));
    while path.exists() && Instant::now() < deadline {
        // A zombie counts as gone.
        if std::fs::read_to_string(path.join("stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
