//! The lab controller: builds the topology, serves the API stand-in, and plays the parts of the
//! scheduler, kubelet (pod sandboxes + CNI), the namespace/endpoints controllers and kube-proxy.
//! It runs wherever the lab's kernel is — inside the micro-VM, or on the host with `--vm never`.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::cni::{Attachment, NodeCni};
use crate::config::LabConfig;
use crate::control::{Reply, Request};
use crate::podserve::{self, Proto};
use crate::topology::{self, NodeSpec};
use crate::{netns, nodectx};

/// Annotation through which a lab pod asks for a specific address; the lab's kubelet passes it to
/// the plugin through the standard `ips` capability (`runtimeConfig.ips`), as a runtime would.
pub const IPS_ANNOTATION: &str = "lab.warren.dev/ips";

#[derive(Debug)]
enum PodState {
    Starting,
    Running,
}

struct PodRt {
    uid: String,
    node: String,
    netns: String,
    ip: String,
    host_network: bool,
    attachment: Option<Attachment>,
    add_result: Option<Value>,
    server: Option<Child>,
    state: PodState,
}

struct HostRt {
    ip: Ipv4Addr,
    server: Option<Child>,
}

pub struct Lab {
    cfg: LabConfig,
    binds: HashMap<String, Vec<(PathBuf, PathBuf)>>,
    pods: Mutex<HashMap<String, PodRt>>,
    hosts: Mutex<BTreeMap<String, HostRt>>,
    children: Mutex<Vec<(String, Child)>>,
    failures: Mutex<HashMap<String, (Instant, String)>>,
    /// Extra warren-node flags per node (set through the control channel's Restart).
    node_args: Mutex<HashMap<String, Vec<String>>>,
    /// The API stand-in (set once it runs), for outages through the control channel's Restart.
    api: std::sync::OnceLock<Arc<crate::apistandin::ApiStandIn>>,
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl Lab {
    fn node(&self, name: &str) -> Result<&NodeSpec> {
        self.cfg
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name:?} in the lab"))
    }

    fn node_binds(&self, name: &str) -> &[(PathBuf, PathBuf)] {
        self.binds.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    fn node_cni(&self, node: &NodeSpec) -> NodeCni<'_> {
        NodeCni {
            exe: &self.cfg.exe,
            netns: node.netns(),
            binds: self.node_binds(&node.name),
            conf_dir: nodectx::node_dir(&self.cfg.state_dir, &node.name).join("etc/cni/net.d"),
        }
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File> {
        let dir = self.cfg.state_dir.join("logs");
        std::fs::create_dir_all(&dir)?;
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))?)
    }

    /// Underlay: a switch namespace with a bridge that also routes between the node subnet and
    /// outside hosts' subnets; one namespace per node with `eth0` on it.
    fn setup_network(&self) -> Result<()> {
        let sw = topology::SWITCH_NETNS;
        netns::add(sw)?;
        netns::ip_in(sw, &["link", "add", "br0", "type", "bridge"]).ok();
        netns::ip_in(sw, &["link", "set", "br0", "up"])?;
        let gw = format!("{}/24", topology::UNDERLAY_GW);
        netns::ip_in(sw, &["addr", "replace", &gw, "dev", "br0"])?;
        netns::sysctl_in(sw, "net.ipv4.ip_forward", "1")?;
        let mtu = self.cfg.underlay_mtu.to_string();
        for node in &self.cfg.nodes {
            let ns = node.netns();
            netns::add(&ns)?;
            let sw_if = format!("n-{}", node.name);
            if !link_exists(sw, &sw_if) {
                // Made from inside the node's namespace: the controller's own may already have an
                // `eth0` (the micro-VM's NIC), and the kernel checks the name where the link is made.
                netns::ip_in(
                    &ns,
                    &[
                        "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", &sw_if, "netns", sw, "mtu",
                        &mtu,
                    ],
                )?;
            }
            netns::ip_in(sw, &["link", "set", &sw_if, "master", "br0", "up"])?;
            netns::ip_in(&ns, &["addr", "replace", &format!("{}/24", node.ip), "dev", "eth0"])?;
            netns::ip_in(&ns, &["link", "set", "eth0", "up"])?;
            netns::ip_in(
                &ns,
                &["route", "replace", "default", "via", &topology::UNDERLAY_GW.to_string()],
            )?;
            // What kubeadm's preflight requires of a node.
            netns::sysctl_in(&ns, "net.ipv4.ip_forward", "1")?;
        }
        Ok(())
    }

    fn add_host(&self, name: &str, ip: Ipv4Addr, ports: &[(u16, Proto)]) -> Result<()> {
        if self.hosts.lock().map_err(|_| anyhow!("poisoned"))?.contains_key(name) {
            bail!("host {name:?} exists");
        }
        if name.len() > 8 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("host name {name:?}: use at most 8 letters, digits or '-'");
        }
        let sw = topology::SWITCH_NETNS;
        let ns = topology::host_netns(name);
        netns::add(&ns)?;
        let sw_if = format!("h-{name}");
        let (gw, net) = topology::host_gateway(ip);
        let res = (|| -> Result<()> {
            netns::ip_in(
                &ns,
                &[
                    "link", "add", "eth0", "type", "veth", "peer", "name", &sw_if, "netns", sw,
                ],
            )?;
            netns::ip_in(sw, &["link", "set", &sw_if, "master", "br0", "up"])?;
            if net.contains(&topology::UNDERLAY_GW) {
                // Same subnet as the nodes: the router's address is already there.
            } else {
                netns::ip_in(
                    sw,
                    &["addr", "replace", &format!("{gw}/{}", net.prefix_len()), "dev", "br0"],
                )?;
            }
            netns::ip_in(
                &ns,
                &["addr", "replace", &format!("{ip}/{}", net.prefix_len()), "dev", "eth0"],
            )?;
            netns::ip_in(&ns, &["link", "set", "eth0", "up"])?;
            let via = if net.contains(&topology::UNDERLAY_GW) {
                topology::UNDERLAY_GW
            } else {
                gw
            };
            netns::ip_in(&ns, &["route", "replace", "default", "via", &via.to_string()])?;
            Ok(())
        })();
        if let Err(e) = res {
            let _ = netns::del(&ns);
            return Err(e);
        }
        let server = if ports.is_empty() {
            None
        } else {
            Some(self.start_server(&ns, name, ports)?)
        };
        self.hosts
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .insert(name.to_string(), HostRt { ip, server });
        Ok(())
    }

    fn del_host(&self, name: &str) -> Result<()> {
        let rt = self.hosts.lock().map_err(|_| anyhow!("poisoned"))?.remove(name);
        let Some(mut rt) = rt else { bail!("no host {name:?}") };
        if let Some(c) = rt.server.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        netns::del(&topology::host_netns(name))
    }

    /// Starts the answering server in a namespace and waits until its ports are bound.
    fn start_server(&self, ns: &str, name: &str, ports: &[(u16, Proto)]) -> Result<Child> {
        let mut cmd = netns::command_in(ns, &self.cfg.exe.to_string_lossy());
        cmd.arg("__serve").arg("--name").arg(name);
        for (p, proto) in ports {
            cmd.arg("--port").arg(format!("{p}/{proto}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log_file("servers")?);
        let mut child = cmd.spawn().context("starting the pod server")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the server for {name} did not start (see logs/servers.log)");
        }
        Ok(child)
    }

    fn pod_ports(pod: &Pod) -> Vec<(u16, Proto)> {
        let mut v = Vec::new();
        for c in pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or(&[]) {
            for p in c.ports.as_deref().unwrap_or(&[]) {
                let proto = p.protocol.as_deref().unwrap_or("TCP").parse().unwrap_or(Proto::Tcp);
                if let Ok(port) = u16::try_from(p.container_port) {
                    if !v.contains(&(port, proto)) {
                        v.push((port, proto));
                    }
                }
            }
        }
        v
    }

    /// kubelet's sandbox start: netns, CNI ADD as containerd sends it, then the pod's "containers".
    fn start_pod(&self, pod: &Pod, node: &NodeSpec) -> Result<PodRt> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
        let ports = Self::pod_ports(pod);
        if host_network {
            let server = if ports.is_empty() {
                None
            } else {
                Some(self.start_server(&node.netns(), &name, &ports)?)
            };
            return Ok(PodRt {
                uid,
                node: node.name.clone(),
                netns: node.netns(),
                ip: node.ip.to_string(),
                host_network,
                attachment: None,
                add_result: None,
                server,
                state: PodState::Running,
            });
        }
        let cni = self.node_cni(node);
        let conflist = cni.conflist()?.ok_or_else(|| {
            anyhow!(
                "network plugin not ready: no CNI configuration in {} on {}",
                cni.conf_dir.display(),
                node.name
            )
        })?;
        let pod_ns = topology::pod_netns(&ns, &name);
        netns::add(&pod_ns)?;
        let requested: Vec<String> = pod
            .annotations()
            .get(IPS_ANNOTATION)
            .map(|s| {
                s.split(',')
                    .map(|x| x.trim().to_string())
                    .filter(|x| !x.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let att = Attachment {
            container_id: random_id(),
            netns_path: netns::netns_path(&pod_ns).to_string_lossy().into_owned(),
            ifname: "eth0".into(),
            pod_namespace: ns.clone(),
            pod_name: name.clone(),
            pod_uid: uid.clone(),
            requested_ips: requested,
        };
        let result = match cni.add(&conflist, &att) {
            Ok(r) => r,
            Err(e) => {
                // As kubelet does after a failed sandbox: tear down what was made, retry later.
                let _ = cni.del(&conflist, &att, None);
                let _ = netns::del(&pod_ns);
                return Err(e);
            }
        };
        let ip = crate::cni::result_ip(&result).ok_or_else(|| anyhow!("CNI result without an IPv4 address"))?;
        let server = if ports.is_empty() {
            None
        } else {
            match self.start_server(&pod_ns, &name, &ports) {
                Ok(c) => Some(c),
                Err(e) => {
                    let _ = cni.del(&conflist, &att, Some(&result));
                    let _ = netns::del(&pod_ns);
                    return Err(e);
                }
            }
        };
        Ok(PodRt {
            uid,
            node: node.name.clone(),
            netns: pod_ns,
            ip,
            host_network,
            attachment: Some(att),
            add_result: Some(result),
            server,
            state: PodState::Running,
        })
    }

    fn stop_pod(&self, mut rt: PodRt) -> Result<()> {
        if let Some(c) = rt.server.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if rt.host_network {
            return Ok(());
        }
        let node = self.node(&rt.node)?;
        let cni = self.node_cni(node);
        let mut err = None;
        if let (Some(att), Some(conflist)) = (rt.attachment.as_ref(), cni.conflist()?) {
            if let Err(e) = cni.del(&conflist, att, rt.add_result.as_ref()) {
                warn!("CNI DEL for {}: {e:#}", att.pod_name);
                err = Some(e);
            }
        }
        netns::del(&rt.netns)?;
        err.map_or(Ok(()), Err)
    }

    fn spawn_child(&self, label: &str, mut cmd: Command) -> Result<()> {
        let log = self.log_file(label)?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {label}"))?;
        std::fs::write(self.cfg.state_dir.join("pids").join(label), child.id().to_string()).ok();
        self.children
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .push((label.to_string(), child));
        Ok(())
    }

    fn kill_children(&self, label_prefix: &str) {
        if let Ok(mut ch) = self.children.lock() {
            ch.retain_mut(|(label, child)| {
                if label.starts_with(label_prefix) {
                    stop_child(child);
                    false
                } else {
                    true
                }
            });
        }
    }

    fn start_kube_proxy(&self, node: &NodeSpec) -> Result<()> {
        let mut argv = vec![
            self.cfg.exe.to_string_lossy().into_owned(),
            "__kube-proxy".into(),
            "--node".into(),
            node.name.clone(),
            "--node-ip".into(),
            node.ip.to_string(),
            "--cluster-cidr".into(),
            topology::POOL.into(),
            "--mode".into(),
            self.cfg.proxy_mode.clone(),
            "--kubeconfig".into(),
            self.cfg.node_kubeconfig().to_string_lossy().into_owned(),
        ];
        // Seed 000's IPVS cluster masqueraded pods' ClusterIP connections too (bar reached the
        // dashboard by its service name once the tunl0 addresses were whitelisted), which
        // kube-proxy does with masqueradeAll.
        if self.cfg.proxy_mode == "ipvs" {
            argv.push("--masquerade-all".into());
        }
        let cmd = nodectx::node_command(&self.cfg.exe, &node.netns(), self.node_binds(&node.name), &argv);
        self.spawn_child(&format!("kube-proxy-{}", node.name), cmd)
    }

    /// The reference plugins a node's CNI package (kubernetes-cni) puts into `/opt/cni/bin`.
    fn install_reference_plugins(&self, node: &NodeSpec) -> Result<()> {
        let dir = nodectx::node_dir(&self.cfg.state_dir, &node.name).join("opt/cni/bin");
        for bin in ["loopback", "portmap", "bandwidth", "tuning", "host-local"] {
            let src = PathBuf::from("/usr/lib/cni").join(bin);
            if src.exists() {
                std::fs::copy(&src, dir.join(bin)).with_context(|| format!("installing {}", src.display()))?;
            }
        }
        Ok(())
    }

    /// warren-node as the DaemonSet of deploy/warren.yaml (or `up --manifest`) runs it: its init
    /// containers, then its daemon container, with the command, args, env and host mounts the
    /// kubelet would give them, in the node's context. `install` = a new pod (init containers
    /// run); otherwise a container restart. The per-node extra flags come after the manifest's args.
    fn start_warren_node(&self, node: &NodeSpec, install: bool) -> Result<()> {
        let plan = self.warren_node_plan(node)?;
        let node_dirs = self.node_binds(&node.name);
        for m in plan.host_paths() {
            prepare_host_path(&crate::manifest::node_source(&m.host_path, node_dirs), m.kind)
                .with_context(|| format!("volume {} of {} on {}", m.volume, plan.pod_name, node.name))?;
        }
        let sa = if plan.automount_token {
            Some(self.write_service_account(&plan.namespace)?)
        } else {
            None
        };
        let home = self.cfg.state_dir.join("image-home");
        std::fs::create_dir_all(&home)?;
        let image = crate::manifest::ImageDirs {
            bin: &self.cfg.bin_dir,
            home: &home,
        };
        let command = |c: &crate::manifest::ContainerPlan, argv: &[String]| -> Result<Command> {
            let binds = c.binds(&image, node_dirs, sa.as_deref())?;
            let mut cmd = nodectx::node_command(&self.cfg.exe, &node.netns(), &binds, argv);
            cmd.env_clear().envs(c.env.iter().map(|(k, v)| (k, v)));
            Ok(cmd)
        };
        if install {
            for c in &plan.init {
                let out = command(c, &c.argv)?
                    .output()
                    .with_context(|| format!("starting init container {} on {}", c.name, node.name))?;
                if !out.status.success() {
                    bail!(
                        "init container {} ({}) on {}: {}",
                        c.name,
                        c.argv.join(" "),
                        node.name,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
        let mut argv = plan.main.argv.clone();
        if let Some(extra) = self.node_args.lock().map_err(|_| anyhow!("poisoned"))?.get(&node.name) {
            argv.extend(extra.iter().cloned());
        }
        let cmd = command(&plan.main, &argv)?;
        self.spawn_child(&format!("warren-node-{}", node.name), cmd)
    }

    /// The warren-node pod of `node`, read afresh from the manifest at each start (so an edited
    /// `up --manifest` copy takes effect at the next restart, as after a rollout). The lab's
    /// `--ipip-mode` is applied as a user would: by editing the ConfigMap's value.
    fn warren_node_plan(&self, node: &NodeSpec) -> Result<crate::manifest::LaunchPlan> {
        use crate::manifest::{Manifest, PodContext};
        let cp = self.cfg.control_plane().context("the lab has no nodes")?;
        let pod = PodContext {
            node_name: node.name.clone(),
            host_ip: node.ip.to_string(),
            // The lab has no `kubernetes` Service ClusterIP; its endpoint (the control plane's
            // :6443, what kube-proxy would DNAT that ClusterIP to) stands in for it.
            api_host: cp.ip.to_string(),
            api_port: topology::API_PORT,
        };
        let mut manifest = Manifest::parse(&self.cfg.manifest_text()?).context("the warren-node manifest")?;
        let plan = manifest.plan(&pod).context("the warren-node manifest")?;
        if plan.main.env_value("WARREN_IPIP_MODE").unwrap_or("Always") == self.cfg.ipip_mode {
            return Ok(plan);
        }
        manifest
            .set_daemon_env("WARREN_IPIP_MODE", &self.cfg.ipip_mode)
            .context("applying the lab's --ipip-mode to the manifest")?;
        Ok(manifest.plan(&pod)?)
    }

    /// The service account files the kubelet would mount: the API stand-in's token and CA.
    fn write_service_account(&self, namespace: &str) -> Result<PathBuf> {
        let api = self.cfg.state_dir.join("api");
        let dir = self.cfg.service_account_dir();
        std::fs::create_dir_all(&dir)?;
        for f in ["token", "ca.crt"] {
            let data = std::fs::read(api.join(f)).with_context(|| format!("reading the API stand-in's {f}"))?;
            std::fs::write(dir.join(f), data)?;
        }
        std::fs::write(dir.join("namespace"), namespace)?;
        Ok(dir)
    }

    /// Until warren-node runs on the nodes, the lab installs the CNI plugin and writes the conflist
    /// the way warren-node would render it.
    fn install_cni(&self, node: &NodeSpec) -> Result<()> {
        let dir = nodectx::node_dir(&self.cfg.state_dir, &node.name);
        for bin in ["warren", "warren-ipam"] {
            let src = self.cfg.bin_dir.join(bin);
            if src.exists() {
                std::fs::copy(&src, dir.join("opt/cni/bin").join(bin))
                    .with_context(|| format!("installing {}", src.display()))?;
            }
        }
        let mtu = self.cfg.underlay_mtu.saturating_sub(20);
        let conflist = json!({
            "name": conf::names::NETWORK_NAME,
            "cniVersion": "1.0.0",
            "plugins": [{
                "type": "warren",
                "mtu": mtu,
                "capabilities": {"ips": true},
                "ipam": {"type": "warren-ipam", "ranges": [[{"subnet": node.block.to_string()}]]}
            }, {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}]
        });
        let path = dir.join("etc/cni/net.d/10-warren.conflist");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&conflist)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn teardown(&self) {
        let pods: Vec<PodRt> = self
            .pods
            .lock()
            .map(|mut p| p.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        for rt in pods {
            if let Err(e) = self.stop_pod(rt) {
                warn!("teardown: {e:#}");
            }
        }
        let hosts: Vec<String> = self
            .hosts
            .lock()
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default();
        for h in hosts {
            let _ = self.del_host(&h);
        }
        self.kill_children("");
        for ns in netns::list_with_prefix(topology::NETNS_PREFIX) {
            let _ = netns::del(&ns);
        }
    }
}

/// The kubelet's hostPath type check: create what `…OrCreate` asks for, refuse what is missing.
fn prepare_host_path(path: &std::path::Path, kind: crate::manifest::HostPathType) -> Result<()> {
    use crate::manifest::HostPathType as T;
    match kind {
        T::Unchecked => {}
        T::DirectoryOrCreate => {
            std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?
        }
        T::FileOrCreate => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        T::Directory if !path.is_dir() => bail!("hostPath type check failed: {} is not a directory", path.display()),
        T::File if !path.is_file() => bail!("hostPath type check failed: {} is not a file", path.display()),
        T::Directory | T::File => {}
    }
    Ok(())
}

/// SIGTERM first, as kubelet stops a container, then SIGKILL after a grace period.
pub(crate) fn stop_child(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn link_exists(ns: &str, link: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", link])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn random_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Entry point of `warren-lab __controller`.
pub async fn run(cfg: LabConfig) -> Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(cfg.state_dir.join("pids"))?;
    let mut binds = HashMap::new();
    for n in &cfg.nodes {
        binds.insert(n.name.clone(), nodectx::prepare_node_dirs(&cfg.state_dir, &n.name)?);
    }
    let lab = Arc::new(Lab {
        cfg: cfg.clone(),
        binds,
        pods: Mutex::new(HashMap::new()),
        hosts: Mutex::new(BTreeMap::new()),
        children: Mutex::new(Vec::new()),
        failures: Mutex::new(HashMap::new()),
        node_args: Mutex::new(HashMap::new()),
        api: std::sync::OnceLock::new(),
    });
    let res = run_inner(lab.clone(), t0).await;
    info!("controller stopping: tearing the lab down");
    let l2 = lab.clone();
    tokio::task::spawn_blocking(move || l2.teardown()).await.ok();
    if let Err(e) = &res {
        std::fs::write(cfg.state_dir.join("failed"), format!("{e:#}")).ok();
    }
    res
}

async fn run_inner(lab: Arc<Lab>, t0: Instant) -> Result<()> {
    let cfg = lab.cfg.clone();
    {
        let l = lab.clone();
        tokio::task::spawn_blocking(move || l.setup_network()).await??;
    }
    info!("topology up in {:?}", t0.elapsed());
    let api_dir = cfg.state_dir.join("api");
    let mut sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    sans.extend(cfg.nodes.iter().map(|n| n.ip.to_string()));
    // Node processes reach the stand-in at https://<control-plane node>:6443, as in a kubeadm cluster.
    let server = crate::apistandin::ApiStandIn::start(
        lab_apiserver::Config {
            listen: cfg.api_bind,
            state_dir: api_dir,
            token: None,
            extra_sans: sans,
        },
        cfg.control_plane().cloned(),
    )
    .await?;
    server
        .write_kubeconfig(&cfg.local_kubeconfig(), &server.local_url())
        .await?;
    server
        .write_kubeconfig(&cfg.host_kubeconfig(), &format!("https://{}", cfg.host_api))
        .await?;
    if let Some(cp) = cfg.control_plane() {
        server
            .write_kubeconfig(
                &cfg.node_kubeconfig(),
                &format!("https://{}:{}", cp.ip, topology::API_PORT),
            )
            .await?;
    }
    let _ = lab.api.set(Arc::new(server));
    let client = client_from(&cfg.local_kubeconfig()).await?;
    bootstrap_objects(&client, &cfg).await?;
    for node in &cfg.nodes {
        lab.install_reference_plugins(node)?;
        if cfg.warren_node {
            lab.start_warren_node(node, true)?;
        } else {
            lab.install_cni(node)?;
        }
        lab.start_kube_proxy(node)?;
    }
    {
        let c = client.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::kubeproxy::controller::run_endpoints_controller(c).await {
                warn!("endpoints controller stopped: {e:#}");
            }
        });
    }
    let (reader, writer) = reflector::store::<Pod>();
    let notify = Arc::new(Notify::new());
    {
        let api: Api<Pod> = Api::all(client.clone());
        let n = notify.clone();
        tokio::spawn(async move {
            let mut s = watcher(api, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .boxed();
            while let Some(ev) = s.next().await {
                if ev.is_ok() {
                    n.notify_one();
                }
            }
        });
    }
    {
        let (l, c, n) = (lab.clone(), client.clone(), notify.clone());
        let r = reader.clone();
        tokio::spawn(async move { kubelet_loop(l, c, r, n).await });
    }
    {
        let (l, c) = (lab.clone(), client.clone());
        tokio::spawn(async move { node_status_loop(l, c).await });
    }
    std::fs::write(
        cfg.state_dir.join("controller-up"),
        format!("{:.3}", t0.elapsed().as_secs_f64()),
    )
    .ok();
    info!("controller ready in {:?}", t0.elapsed());
    control_loop(lab, reader, client).await
}

pub async fn client_from(kubeconfig: &std::path::Path) -> Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).context("reading kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .context("loading kubeconfig")?;
    Client::try_from(config).context("building the API client")
}

async fn bootstrap_objects(client: &Client, cfg: &LabConfig) -> Result<()> {
    let nsapi: Api<Namespace> = Api::all(client.clone());
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        match nsapi.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).context("creating namespace"),
        }
    }
    let napi: Api<Node> = Api::all(client.clone());
    for (i, n) in cfg.nodes.iter().enumerate() {
        let mut labels = json!({"kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux"});
        if i == 0 {
            labels["node-role.kubernetes.io/control-plane"] = json!("");
        }
        let obj: Node = serde_json::from_value(json!({
            "metadata": {"name": n.name, "labels": labels},
            "spec": {"podCIDR": n.block.to_string(), "podCIDRs": [n.block.to_string()]},
        }))?;
        match napi.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).context("creating node"),
        }
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": n.ip.to_string()}, {"type": "Hostname", "address": n.name}],
            "conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady",
                "message": "container runtime network not ready", "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            "nodeInfo": {"kubeletVersion": "v1.37.0-warren-lab", "containerRuntimeVersion": "warren-lab://0",
                "osImage": "warren-lab", "kernelVersion": kernel_version(), "operatingSystem": "linux", "architecture": "amd64",
                "kubeProxyVersion": "v1.37.0-warren-lab", "machineID": "", "systemUUID": "", "bootID": ""}
        }});
        napi.patch_status(&n.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .context("node status")?;
    }
    Ok(())
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// kubelet's Ready condition: true once the node has a CNI configuration, as a real kubelet reports.
async fn node_status_loop(lab: Arc<Lab>, client: Client) {
    let napi: Api<Node> = Api::all(client);
    let mut last: HashMap<String, bool> = HashMap::new();
    loop {
        for n in &lab.cfg.nodes {
            let ready = lab.node_cni(n).conflist().ok().flatten().is_some();
            if last.get(&n.name) == Some(&ready) {
                continue;
            }
            let (status, reason, msg) = if ready {
                ("True", "KubeletReady", "kubelet is posting ready status")
            } else {
                (
                    "False",
                    "KubeletNotReady",
                    "container runtime network not ready: cni config uninitialized",
                )
            };
            let patch = json!({"status": {"conditions": [{"type": "Ready", "status": status, "reason": reason,
                "message": msg, "lastHeartbeatTime": now(), "lastTransitionTime": now()}]}});
            match napi
                .patch_status(&n.name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
            {
                Ok(_) => {
                    last.insert(n.name.clone(), ready);
                }
                Err(e) => warn!("node {} status: {e}", n.name),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Scheduler + kubelet: binds unscheduled pods round-robin, starts pods bound to a lab node,
/// stops pods that are gone.
async fn kubelet_loop(lab: Arc<Lab>, client: Client, store: reflector::Store<Pod>, notify: Arc<Notify>) {
    let _ = store.wait_until_ready().await;
    let mut rr = 0usize;
    loop {
        let pods = store.state();
        let mut wanted: HashMap<String, (Arc<Pod>, String)> = HashMap::new();
        for pod in pods {
            let ns = pod.namespace().unwrap_or_default();
            let name = pod.name_any();
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            if phase == "Succeeded" || phase == "Failed" {
                continue;
            }
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty());
            let node = match node {
                Some(n) => n,
                None => {
                    let Some(target) = lab
                        .cfg
                        .nodes
                        .get(rr % lab.cfg.nodes.len().max(1))
                        .map(|n| n.name.clone())
                    else {
                        continue;
                    };
                    rr += 1;
                    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                    let patch = json!({"spec": {"nodeName": target}});
                    if let Err(e) = api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                        warn!("binding {ns}/{name}: {e}");
                    }
                    continue;
                }
            };
            if lab.cfg.nodes.iter().any(|n| n.name == node) {
                wanted.insert(key(&ns, &name), (pod.clone(), node));
            }
        }
        // Stop what is gone (or was replaced by a pod of the same name).
        let stale: Vec<(String, PodRt)> = {
            let Ok(mut running) = lab.pods.lock() else { return };
            let keys: Vec<String> = running
                .iter()
                .filter(|(k, rt)| {
                    matches!(rt.state, PodState::Running)
                        && wanted
                            .get(*k)
                            .map(|(p, _)| p.uid().unwrap_or_default() != rt.uid)
                            .unwrap_or(true)
                })
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| running.remove(&k).map(|rt| (k, rt)))
                .collect()
        };
        for (k, rt) in stale {
            let l = lab.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = l.stop_pod(rt) {
                    warn!("stopping {k}: {e:#}");
                }
            });
        }
        // Start what is new.
        for (k, (pod, node)) in wanted {
            let already = lab.pods.lock().map(|p| p.contains_key(&k)).unwrap_or(true);
            if already {
                continue;
            }
            if let Ok(f) = lab.failures.lock() {
                if let Some((when, _)) = f.get(&k) {
                    if when.elapsed() < Duration::from_secs(2) {
                        continue;
                    }
                }
            }
            if let Ok(mut p) = lab.pods.lock() {
                p.insert(
                    k.clone(),
                    PodRt {
                        uid: pod.uid().unwrap_or_default(),
                        node: node.clone(),
                        netns: String::new(),
                        ip: String::new(),
                        host_network: false,
                        attachment: None,
                        add_result: None,
                        server: None,
                        state: PodState::Starting,
                    },
                );
            }
            let (l, c, n) = (lab.clone(), client.clone(), notify.clone());
            tokio::spawn(async move {
                let l2 = l.clone();
                let p2 = pod.clone();
                let started = tokio::task::spawn_blocking(move || {
                    let node = l2.node(&node)?.clone();
                    l2.start_pod(&p2, &node)
                })
                .await
                .map_err(|e| anyhow!("{e}"))
                .and_then(|r| r);
                match started {
                    Ok(rt) => {
                        let status = pod_status(&pod, &rt, &l);
                        if let Ok(mut p) = l.pods.lock() {
                            p.insert(k.clone(), rt);
                        }
                        if let Ok(mut f) = l.failures.lock() {
                            f.remove(&k);
                        }
                        let api: Api<Pod> = Api::namespaced(c, &pod.namespace().unwrap_or_default());
                        if let Err(e) = api
                            .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&status))
                            .await
                        {
                            warn!("pod {k} status: {e}");
                        }
                    }
                    Err(e) => {
                        warn!("starting pod {k}: {e:#}");
                        if let Ok(mut p) = l.pods.lock() {
                            p.remove(&k);
                        }
                        if let Ok(mut f) = l.failures.lock() {
                            f.insert(k.clone(), (Instant::now(), format!("{e:#}")));
                        }
                    }
                }
                n.notify_one();
            });
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn pod_status(pod: &Pod, rt: &PodRt, lab: &Lab) -> Value {
    let host_ip = lab.node(&rt.node).map(|n| n.ip.to_string()).unwrap_or_default();
    let t = now();
    let containers: Vec<Value> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[])
        .iter()
        .map(|c| {
            json!({"name": c.name, "ready": true, "started": true, "restartCount": 0,
               "image": c.image.clone().unwrap_or_default(), "imageID": "", "state": {"running": {"startedAt": t}}})
        })
        .collect();
    json!({"status": {
        "phase": "Running", "podIP": rt.ip, "podIPs": [{"ip": rt.ip}], "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "startTime": t, "containerStatuses": containers,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
            {"type": "Initialized", "status": "True", "lastTransitionTime": t},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": t},
            {"type": "Ready", "status": "True", "lastTransitionTime": t}
        ]
    }})
}

async fn control_loop(lab: Arc<Lab>, store: reflector::Store<Pod>, client: Client) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(lab.cfg.ctl_bind)
        .await
        .context("binding the control port")?;
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (sock, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = stop_rx.recv() => return Ok(()),
        };
        let (lab, store, client, stop_tx) = (lab.clone(), store.clone(), client.clone(), stop_tx.clone());
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut line = String::new();
            if TokioBufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(Request::Shutdown) => {
                    let _ = stop_tx.send(()).await;
                    Reply::ok(json!("stopping"))
                }
                Ok(req) => match handle(lab, store, client, req).await {
                    Ok(v) => Reply::ok(v),
                    Err(e) => Reply::err(e),
                },
                Err(e) => Reply::err(format!("bad request: {e}")),
            };
            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

/// Where a probe or exec runs, and the address a probe aims at.
fn resolve_netns(lab: &Lab, store: &reflector::Store<Pod>, target: &str) -> Result<String> {
    if let Some(n) = target.strip_prefix("node:") {
        return Ok(lab.node(n)?.netns());
    }
    if let Some(h) = target.strip_prefix("host:") {
        if !lab.hosts.lock().map_err(|_| anyhow!("poisoned"))?.contains_key(h) {
            bail!("no host {h:?}");
        }
        return Ok(topology::host_netns(h));
    }
    let (ns, name) = target
        .split_once('/')
        .ok_or_else(|| anyhow!("target {target:?}: use NS/POD, node:NAME or host:NAME"))?;
    let _ = store;
    let pods = lab.pods.lock().map_err(|_| anyhow!("poisoned"))?;
    match pods.get(&key(ns, name)) {
        Some(rt) if matches!(rt.state, PodState::Running) => Ok(rt.netns.clone()),
        _ => bail!("pod {target} is not running in the lab"),
    }
}

fn resolve_addr(lab: &Lab, target: &str) -> Result<IpAddr> {
    if let Some(n) = target.strip_prefix("node:") {
        return Ok(IpAddr::V4(lab.node(n)?.ip));
    }
    if let Some(h) = target.strip_prefix("host:") {
        let hosts = lab.hosts.lock().map_err(|_| anyhow!("poisoned"))?;
        return hosts
            .get(h)
            .map(|r| IpAddr::V4(r.ip))
            .ok_or_else(|| anyhow!("no host {h:?}"));
    }
    if let Ok(ip) = target.parse::<IpAddr>() {
        return Ok(ip);
    }
    let (ns, name) = target
        .split_once('/')
        .ok_or_else(|| anyhow!("target {target:?}: use NS/POD, node:NAME, host:NAME or an IP"))?;
    let pods = lab.pods.lock().map_err(|_| anyhow!("poisoned"))?;
    match pods.get(&key(ns, name)) {
        Some(rt) if matches!(rt.state, PodState::Running) => rt.ip.parse().context("pod IP"),
        _ => bail!("pod {target} is not running in the lab"),
    }
}

async fn probe_once(
    lab: &Lab,
    store: &reflector::Store<Pod>,
    from: &str,
    to: &str,
    port: u16,
    proto: Proto,
    timeout: Duration,
) -> Result<podserve::ProbeResult> {
    let ns = resolve_netns(lab, store, from)?;
    let addr = resolve_addr(lab, to)?;
    tokio::task::spawn_blocking(move || netns::in_netns(&ns, move || podserve::probe(addr, port, proto, timeout)))
        .await
        .map_err(|e| anyhow!("{e}"))?
}

async fn handle(lab: Arc<Lab>, store: reflector::Store<Pod>, client: Client, req: Request) -> Result<Value> {
    let _ = &client;
    match req {
        Request::Status => {
            let pods = lab.pods.lock().map_err(|_| anyhow!("poisoned"))?;
            let pods: Vec<Value> = pods
                .iter()
                .map(|(k, rt)| json!({"pod": k, "node": rt.node, "ip": rt.ip, "state": format!("{:?}", rt.state)}))
                .collect();
            let failures: Vec<Value> = lab
                .failures
                .lock()
                .map(|f| f.iter().map(|(k, (_, e))| json!({"pod": k, "error": e})).collect())
                .unwrap_or_default();
            let hosts: Vec<Value> = lab
                .hosts
                .lock()
                .map(|h| {
                    h.iter()
                        .map(|(k, r)| json!({"host": k, "ip": r.ip.to_string()}))
                        .collect()
                })
                .unwrap_or_default();
            let nodes: Vec<Value> = lab
                .cfg
                .nodes
                .iter()
                .map(|n| {
                    json!({"name": n.name, "ip": n.ip.to_string(), "block": n.block.to_string(),
                    "cni": lab.node_cni(n).conflist().ok().flatten().is_some()})
                })
                .collect();
            Ok(
                json!({"nodes": nodes, "pods": pods, "hosts": hosts, "failures": failures,
                "vm": lab.cfg.in_vm, "proxyMode": lab.cfg.proxy_mode, "ipipMode": lab.cfg.ipip_mode}),
            )
        }
        Request::Exec { target, argv } => {
            if argv.is_empty() {
                bail!("no command given");
            }
            let mut cmd = if let Some(n) = target.strip_prefix("node:") {
                let node = lab.node(n)?;
                nodectx::node_command(&lab.cfg.exe, &node.netns(), lab.node_binds(n), &argv)
            } else {
                let ns = resolve_netns(&lab, &store, &target)?;
                let mut c = netns::command_in(&ns, &argv[0]);
                c.args(&argv[1..]);
                c
            };
            let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
            Ok(json!({"code": out.status.code().unwrap_or(-1),
                "stdout": String::from_utf8_lossy(&out.stdout), "stderr": String::from_utf8_lossy(&out.stderr)}))
        }
        Request::HostAdd { name, ip, ports } => {
            let ip: Ipv4Addr = ip.parse().with_context(|| format!("bad IPv4 address {ip:?}"))?;
            let l = lab.clone();
            tokio::task::spawn_blocking(move || l.add_host(&name, ip, &ports)).await??;
            Ok(json!("added"))
        }
        Request::HostDel { name } => {
            let l = lab.clone();
            tokio::task::spawn_blocking(move || l.del_host(&name)).await??;
            Ok(json!("deleted"))
        }
        Request::Probe {
            from,
            to,
            port,
            protocol,
            timeout_ms,
        } => {
            let r = probe_once(
                &lab,
                &store,
                &from,
                &to,
                port,
                protocol,
                Duration::from_millis(timeout_ms),
            )
            .await?;
            Ok(serde_json::to_value(r)?)
        }
        Request::Matrix {
            namespaces,
            port,
            protocol,
            timeout_ms,
        } => {
            let mut members: Vec<String> = {
                let pods = lab.pods.lock().map_err(|_| anyhow!("poisoned"))?;
                pods.iter()
                    .filter(|(k, rt)| {
                        matches!(rt.state, PodState::Running)
                            && namespaces.iter().any(|ns| k.split('/').next() == Some(ns.as_str()))
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            };
            members.sort();
            let mut tasks = Vec::new();
            for from in &members {
                for to in &members {
                    let (l, s, f, t) = (lab.clone(), store.clone(), from.clone(), to.clone());
                    tasks.push(tokio::spawn(async move {
                        let r = probe_once(&l, &s, &f, &t, port, protocol, Duration::from_millis(timeout_ms)).await;
                        (f, t, r.map(|r| r.connected).unwrap_or(false))
                    }));
                }
            }
            let mut cells = Vec::new();
            for t in tasks {
                let (f, to, ok) = t.await?;
                cells.push(json!({"from": f, "to": to, "connected": ok}));
            }
            Ok(json!({"pods": members, "cells": cells}))
        }
        Request::Restart {
            node,
            component,
            down_ms,
            extra_args,
        } => {
            if component == "apiserver" {
                let api = lab
                    .api
                    .get()
                    .ok_or_else(|| anyhow!("the API stand-in is not running"))?;
                let outage = api.restart(Duration::from_millis(down_ms)).await?;
                return Ok(json!({"restarted": "apiserver", "outage_ms": outage.as_millis()}));
            }
            let n = lab.node(&node)?.clone();
            match component.as_str() {
                "warren-node" => {
                    if !lab.cfg.warren_node {
                        bail!("this lab runs without warren-node");
                    }
                    if let Some(args) = extra_args {
                        lab.node_args
                            .lock()
                            .map_err(|_| anyhow!("poisoned"))?
                            .insert(node.clone(), args);
                    }
                    lab.kill_children(&format!("warren-node-{node}"));
                    tokio::time::sleep(Duration::from_millis(down_ms)).await;
                    let l = lab.clone();
                    tokio::task::spawn_blocking(move || l.start_warren_node(&n, false)).await??;
                }
                "kube-proxy" => {
                    lab.kill_children(&format!("kube-proxy-{node}"));
                    tokio::time::sleep(Duration::from_millis(down_ms)).await;
                    lab.start_kube_proxy(&n)?;
                }
                other => bail!("cannot restart {other:?} (warren-node, kube-proxy, apiserver)"),
            }
            Ok(json!("restarted"))
        }
        Request::BlockRace {
            nodes,
            latency_ms,
            timeout_ms,
        } => {
            let mut taken: Vec<Ipv4Addr> = lab.cfg.nodes.iter().map(|n| n.ip).collect();
            taken.extend(
                lab.hosts
                    .lock()
                    .map_err(|_| anyhow!("poisoned"))?
                    .values()
                    .map(|h| h.ip),
            );
            let timeout = Duration::from_millis(timeout_ms);
            let latency = Duration::from_millis(latency_ms);
            let race = crate::extranode::race_blocks(&lab.cfg, &client, &nodes, &taken, latency, timeout).await?;
            Ok(serde_json::to_value(race)?)
        }
        Request::Shutdown => Ok(json!("stopping")),
    }
}
