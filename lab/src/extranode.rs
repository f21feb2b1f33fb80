//! Extra, short-lived nodes for tests of warren-node's block allocation: each is a namespace on the
//! lab's switch (an underlay address, like a real node), a Node object with no podCIDR, and a real
//! `warren-node run` in the node's context. [`race_blocks`] starts the daemons in the same instant,
//! waits for each to settle on a block, reports what each claimed, and removes everything it made
//! (processes, namespaces, Node objects, node directories) whatever happened.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::config::LabConfig;
use crate::{netns, nodectx, topology};

/// Where extra nodes' addresses come from on the node subnet (far from the seed's and `nodes(n)`'s).
const FIRST_HOST: u8 = 200;
const LAST_HOST: u8 = 250;
/// Longest name: the switch side of the node's veth is `x-<name>` (15 bytes at most).
const MAX_NAME: usize = 13;

/// What one extra node's daemon did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claimed {
    pub node: String,
    pub ip: Ipv4Addr,
    /// The Node's `warren.dev/block` annotation once the daemon settled.
    pub block: String,
    /// The daemon rendered its conflist for that same block (it writes it only after the claim).
    pub conflist_matches: bool,
    /// tunl0's address in the node's namespace, if the daemon got that far (needs ipip).
    pub tunl0: Option<String>,
    /// The daemon's log says its first pick collided with another claim and it picked again.
    pub collided: bool,
    /// From the daemons' start to this block being final.
    pub settled_ms: u64,
}

/// The result of a race.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Race {
    pub claims: Vec<Claimed>,
    /// Blocks the lab's own nodes had when the race began (podCIDRs and annotations).
    pub other_blocks: Vec<String>,
}

/// Everything made for the extra nodes; [`Extra::cleanup`] (or, as a last resort, drop) undoes it.
struct Extra {
    nodes: Vec<(String, Ipv4Addr)>,
    children: Vec<Child>,
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
    objects: Vec<String>,
}

impl Extra {
    fn kill_all(&mut self) {
        for c in &mut self.children {
            crate::controller::stop_child(c);
        }
        self.children.clear();
    }

    fn remove_local(&mut self) {
        self.kill_all();
        for ns in self.netns.drain(..) {
            // The veth goes with the namespace, its switch end included.
            if let Err(e) = netns::del(&ns) {
                warn!("removing {ns}: {e:#}");
            }
        }
        for d in self.dirs.drain(..) {
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    async fn cleanup(&mut self, client: &Client) {
        self.remove_local();
        let api: Api<Node> = Api::all(client.clone());
        for name in self.objects.drain(..) {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => warn!("deleting Node {name}: {e}"),
            }
        }
    }
}

impl Drop for Extra {
    fn drop(&mut self) {
        self.remove_local();
    }
}

/// Free addresses for `n` extra nodes, avoiding `taken`.
pub fn pick_addresses(n: usize, taken: &[Ipv4Addr]) -> Result<Vec<Ipv4Addr>> {
    let subnet: ipnet::Ipv4Net = topology::UNDERLAY.parse().context("underlay subnet")?;
    let base = subnet.network().octets();
    let free: Vec<Ipv4Addr> = (FIRST_HOST..=LAST_HOST)
        .map(|h| Ipv4Addr::new(base[0], base[1], base[2], h))
        .filter(|a| !taken.contains(a))
        .take(n)
        .collect();
    if free.len() < n {
        bail!("no {n} free addresses for extra nodes in {subnet}");
    }
    Ok(free)
}

/// Checks the requested node names before anything is made.
pub fn validate_names(names: &[String], existing: &[String]) -> Result<()> {
    if names.len() < 2 {
        bail!("a race needs at least two nodes");
    }
    for (i, n) in names.iter().enumerate() {
        let ok = !n.is_empty()
            && n.len() <= MAX_NAME
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !n.starts_with('-');
        if !ok {
            bail!("node name {n:?}: use 1-{MAX_NAME} lowercase letters, digits or '-'");
        }
        if existing.contains(n) || names[..i].contains(n) {
            bail!("node name {n:?} is already used");
        }
    }
    Ok(())
}

/// Two (or more) real warren-node processes for new Nodes without podCIDR or block annotation,
/// started at the same moment; returns the blocks they settled on.
pub async fn race_blocks(
    cfg: &LabConfig,
    client: &Client,
    names: &[String],
    taken_ips: &[Ipv4Addr],
    latency: Duration,
    timeout: Duration,
) -> Result<Race> {
    let existing: Vec<String> = cfg.nodes.iter().map(|n| n.name.clone()).collect();
    validate_names(names, &existing)?;
    let ips = pick_addresses(names.len(), taken_ips)?;
    let mut extra = Extra {
        nodes: names.iter().cloned().zip(ips).collect(),
        children: Vec::new(),
        netns: Vec::new(),
        dirs: Vec::new(),
        objects: Vec::new(),
    };
    let res = race(cfg, client, &mut extra, latency, timeout).await;
    extra.cleanup(client).await;
    res
}

async fn race(
    cfg: &LabConfig,
    client: &Client,
    extra: &mut Extra,
    latency: Duration,
    timeout: Duration,
) -> Result<Race> {
    let api: Api<Node> = Api::all(client.clone());
    let mut binds = Vec::new();
    for (name, ip) in extra.nodes.clone() {
        if api.get_opt(&name).await?.is_some() {
            bail!("a Node {name:?} already exists");
        }
        let ns = format!("{}x-{name}", topology::NETNS_PREFIX);
        extra.netns.push(ns.clone());
        let (n2, ns2) = (name.clone(), ns.clone());
        let mtu = cfg.underlay_mtu;
        tokio::task::spawn_blocking(move || plug_into_switch(&ns2, &n2, ip, mtu, latency)).await??;
        extra.dirs.push(nodectx::node_dir(&cfg.state_dir, &name));
        binds.push((name.clone(), ns, nodectx::prepare_node_dirs(&cfg.state_dir, &name)?));
        // As kubelet registers a node: no podCIDR (the cluster allocates none), no annotation.
        let obj: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        }))?;
        api.create(&PostParams::default(), &obj)
            .await
            .with_context(|| format!("creating Node {name}"))?;
        extra.objects.push(name.clone());
        let status = json!({"status": {"addresses": [
            {"type": "InternalIP", "address": ip.to_string()}, {"type": "Hostname", "address": name}]}});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("Node {name} status"))?;
    }
    let all = api.list(&Default::default()).await?;
    let other_blocks: Vec<String> = all
        .items
        .iter()
        .filter(|n| !extra.objects.contains(&n.name_any()))
        .filter_map(|n| {
            n.spec
                .as_ref()
                .and_then(|s| s.pod_cidr.clone())
                .or_else(|| n.annotations().get(conf::daemon::BLOCK_ANNOTATION).cloned())
        })
        .collect();

    // Every command is built first, so the daemons start within a few hundred microseconds.
    let bin = cfg.bin_dir.join("warren-node").to_string_lossy().into_owned();
    let mut cmds = Vec::new();
    for (name, ns, b) in &binds {
        let argv = vec![
            bin.clone(),
            "run".into(),
            "--kubeconfig".into(),
            cfg.node_kubeconfig().to_string_lossy().into_owned(),
            "--node-name".into(),
            name.clone(),
            "--ipip-mode".into(),
            cfg.ipip_mode.clone(),
        ];
        let mut cmd = nodectx::node_command(&cfg.exe, ns, b, &argv);
        let log = log_file(cfg, name)?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        cmds.push(cmd);
    }
    let t0 = Instant::now();
    for mut cmd in cmds {
        extra.children.push(cmd.spawn().context("starting warren-node")?);
    }
    info!(nodes = ?extra.objects, "block race: daemons started");

    let mut claims = Vec::new();
    for (name, ip) in &extra.nodes {
        let conflist = nodectx::node_dir(&cfg.state_dir, name)
            .join("etc/cni/net.d")
            .join(conf::daemon::CONFLIST_FILE);
        // The daemon writes its conflist only once claim_block has returned: the block is final.
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&conflist) {
                break t;
            }
            for c in &mut extra.children {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("a warren-node exited ({st}) before claiming; see logs/race-{name}.log");
                }
            }
            if t0.elapsed() > timeout {
                bail!("warren-node on {name} did not claim a block within {timeout:?}; see logs/race-{name}.log");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let settled_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        let node = api.get(name).await?;
        let block = node
            .annotations()
            .get(conf::daemon::BLOCK_ANNOTATION)
            .cloned()
            .ok_or_else(|| {
                anyhow!(
                    "Node {name} has a conflist but no {} annotation",
                    conf::daemon::BLOCK_ANNOTATION
                )
            })?;
        claims.push(Claimed {
            node: name.clone(),
            ip: *ip,
            conflist_matches: text.contains(&format!("\"{block}\"")),
            block,
            tunl0: None,
            collided: false,
            settled_ms,
        });
    }
    // tunl0 comes right after the conflist; give it a moment, it is a detail of the report.
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in &mut claims {
        let ns = format!("{}x-{}", topology::NETNS_PREFIX, c.node);
        while c.tunl0.is_none() && Instant::now() < deadline {
            c.tunl0 = tunl0_addr(&ns);
            if c.tunl0.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let log = std::fs::read_to_string(cfg.state_dir.join("logs").join(format!("race-{}.log", c.node)));
        c.collided = log.map(|l| l.contains("collided")).unwrap_or(false);
    }
    info!(?claims, "block race settled");
    Ok(Race { claims, other_blocks })
}

fn log_file(cfg: &LabConfig, name: &str) -> Result<std::fs::File> {
    let dir = cfg.state_dir.join("logs");
    std::fs::create_dir_all(&dir)?;
    // Truncated: the log of an earlier race with the same names must not count for this one.
    Ok(std::fs::File::create(dir.join(format!("race-{name}.log")))?)
}

/// The node's namespace with `eth0` on the lab switch, as `setup_network` plugs the lab's nodes.
fn plug_into_switch(ns: &str, name: &str, ip: Ipv4Addr, mtu: u32, latency: Duration) -> Result<()> {
    let sw = topology::SWITCH_NETNS;
    let mtu = mtu.to_string();
    netns::add(ns)?;
    let sw_if = format!("x-{name}");
    netns::ip_in(
        ns,
        &[
            "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", &sw_if, "netns", sw, "mtu", &mtu,
        ],
    )?;
    netns::ip_in(sw, &["link", "set", &sw_if, "master", "br0", "up"])?;
    netns::ip_in(ns, &["addr", "replace", &format!("{ip}/24"), "dev", "eth0"])?;
    netns::ip_in(ns, &["link", "set", "eth0", "up"])?;
    netns::ip_in(
        ns,
        &["route", "replace", "default", "via", &topology::UNDERLAY_GW.to_string()],
    )?;
    if !latency.is_zero() {
        let delay = format!("{}ms", latency.as_millis());
        netns::run(std::process::Command::new("ip").args([
            "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", &delay,
        ]))?;
    }
    netns::sysctl_in(ns, "net.ipv4.ip_forward", "1")
}

fn tunl0_addr(ns: &str) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-o", "-4", "addr", "show", "dev", "tunl0"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "inet")?;
    words.next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_pick_free_addresses_on_the_node_subnet() {
        let taken = [Ipv4Addr::new(10, 102, 123, 200)];
        let got = pick_addresses(2, &taken).unwrap();
        assert_eq!(
            got,
            [Ipv4Addr::new(10, 102, 123, 201), Ipv4Addr::new(10, 102, 123, 202)]
        );
        let all: Vec<Ipv4Addr> = (FIRST_HOST..=LAST_HOST)
            .map(|h| Ipv4Addr::new(10, 102, 123, h))
            .collect();
        assert!(pick_addresses(1, &all).is_err());
    }

    #[test]
    fn should_refuse_bad_or_duplicate_names() {
        let existing = vec!["node1".to_string()];
        let ok = |v: &[&str]| validate_names(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &existing);
        assert!(ok(&["race-a", "race-b"]).is_ok());
        assert!(ok(&["race-a"]).is_err(), "one node is no race");
        assert!(ok(&["race-a", "race-a"]).is_err());
        assert!(ok(&["node1", "race-b"]).is_err());
        assert!(ok(&["Race", "race-b"]).is_err());
        assert!(ok(&["a-very-long-name", "race-b"]).is_err());
    }
}
