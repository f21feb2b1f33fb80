//! kube-proxy's iptables mode, rendered as `iptables-restore` input (pure).
//!
//! Follows `pkg/proxy/iptables/proxier.go` (`syncProxyRules`, `writeServiceToEndpointRules`,
//! `iptablesJumpChains`) of recent kube-proxy releases: same chain names and hashes, same rule
//! order and matches, same comments, so that `iptables-save` in a lab node reads like a real
//! node's. Every sync is a full sync (kube-proxy's partial syncs only skip unchanged chains,
//! which yields the same ruleset). Not rendered: external IPs, load-balancer IPs and their
//! firewall chains, session affinity, health-check node ports, nfacct counters.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use base32::Alphabet;
use sha2::{Digest, Sha256};

use super::model::{categorize_endpoints, ProxyInput, ServiceInfo};

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// kubelet's anti-martian chain, which kube-proxy duplicates when localhost NodePorts are on.
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// Prefixes of the per-service chains; a nat chain with one of them that the current render
/// does not declare is stale and gets deleted.
pub const SERVICE_CHAIN_PREFIXES: [&str; 5] = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-FW-", "KUBE-EXT-"];

/// 16 characters of base32(sha256(`svc_port_name` + `protocol`)), kube-proxy's `portProtoHash`.
/// `protocol` is lower case ("tcp"). Known value: `default/kubernetes:https` + `tcp` →
/// `NPX46M4PTMTKRN6Y`, the KUBE-SVC chain every cluster has for the API server.
pub fn port_proto_hash(svc_port_name: &str, protocol: &str) -> String {
    let digest = Sha256::digest(format!("{svc_port_name}{protocol}").as_bytes());
    let mut enc = base32::encode(Alphabet::Rfc4648 { padding: true }, &digest);
    enc.truncate(16);
    enc
}

/// `KUBE-SVC-<hash>`: dispatch to endpoints with the Cluster policy.
pub fn svc_chain(svc: &ServiceInfo) -> String {
    format!(
        "KUBE-SVC-{}",
        port_proto_hash(&svc.svc_port_name(), svc.protocol.lower())
    )
}

/// `KUBE-SVL-<hash>`: dispatch to this node's endpoints (Local policy).
pub fn svl_chain(svc: &ServiceInfo) -> String {
    format!(
        "KUBE-SVL-{}",
        port_proto_hash(&svc.svc_port_name(), svc.protocol.lower())
    )
}

/// `KUBE-EXT-<hash>`: entry for external (NodePort) traffic.
pub fn ext_chain(svc: &ServiceInfo) -> String {
    format!(
        "KUBE-EXT-{}",
        port_proto_hash(&svc.svc_port_name(), svc.protocol.lower())
    )
}

/// `KUBE-SEP-<hash>` of one endpoint: base32(sha256(svc_port_name + protocol + "ip:port")).
pub fn sep_chain(svc: &ServiceInfo, endpoint: &str) -> String {
    let digest = Sha256::digest(format!("{}{}{endpoint}", svc.svc_port_name(), svc.protocol.lower()).as_bytes());
    let mut enc = base32::encode(Alphabet::Rfc4648 { padding: true }, &digest);
    enc.truncate(16);
    format!("KUBE-SEP-{enc}")
}

/// The masquerade mark as kube-proxy formats it: Go's `%#08x` of `1 << bit` pads the digits,
/// not the whole string, so bit 14 gives `0x00004000` (iptables-save prints `0x4000`).
pub fn masquerade_mark(bit: u8) -> String {
    let value = 1u64 << u32::from(bit.min(31));
    format!("0x{value:08x}")
}

/// `1/n` as kube-proxy writes statistic probabilities (`%0.10f`).
pub fn probability(n: usize) -> String {
    #[allow(clippy::cast_precision_loss)] // n is an endpoint count, far below 2^52
    let p = 1.0 / n as f64;
    format!("{p:.10}")
}

/// A rule that jumps from a built-in chain to one of kube-proxy's, inserted (not restored) so
/// that other users' rules in the built-in chain survive. kube-proxy's `iptablesJumpChains`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpRule {
    pub table: &'static str,
    pub chain: &'static str,
    /// Arguments after `-C/-I <chain>`, one argv element each (no shell quoting).
    pub args: Vec<String>,
}

/// The jump rules, in the order kube-proxy ensures them (each is prepended).
pub fn jump_rules(input: &ProxyInput) -> Vec<JumpRule> {
    let ct_new = ["-m", "conntrack", "--ctstate", "NEW"];
    let spec: [(&'static str, &'static str, &'static str, &'static str, &[&str]); 12] = [
        (
            "filter",
            KUBE_EXTERNAL_SERVICES,
            "INPUT",
            "kubernetes externally-visible service portals",
            &ct_new,
        ),
        (
            "filter",
            KUBE_EXTERNAL_SERVICES,
            "FORWARD",
            "kubernetes externally-visible service portals",
            &ct_new,
        ),
        (
            "filter",
            KUBE_NODEPORTS,
            "INPUT",
            "kubernetes health check service ports",
            &[],
        ),
        (
            "filter",
            KUBE_SERVICES,
            "FORWARD",
            "kubernetes service portals",
            &ct_new,
        ),
        ("filter", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", &ct_new),
        ("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules", &[]),
        (
            "filter",
            KUBE_PROXY_FIREWALL,
            "INPUT",
            "kubernetes load balancer firewall",
            &ct_new,
        ),
        (
            "filter",
            KUBE_PROXY_FIREWALL,
            "OUTPUT",
            "kubernetes load balancer firewall",
            &ct_new,
        ),
        (
            "filter",
            KUBE_PROXY_FIREWALL,
            "FORWARD",
            "kubernetes load balancer firewall",
            &ct_new,
        ),
        ("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", &[]),
        ("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals", &[]),
        (
            "nat",
            KUBE_POSTROUTING,
            "POSTROUTING",
            "kubernetes postrouting rules",
            &[],
        ),
    ];
    let mut out: Vec<JumpRule> = spec
        .iter()
        .map(|(table, target, chain, comment, extra)| {
            let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            args.extend(["-m", "comment", "--comment", comment, "-j", target].map(String::from));
            JumpRule { table, chain, args }
        })
        .collect();
    if input.options.localhost_nodeports {
        for chain in ["INPUT", "OUTPUT"] {
            out.push(JumpRule {
                table: "filter",
                chain,
                args: vec!["-j".into(), KUBE_FIREWALL.into()],
            });
        }
    }
    out
}

/// Accumulates one table's chain declarations and rules.
#[derive(Default)]
struct Table {
    chains: String,
    rules: String,
}

impl Table {
    fn chain(&mut self, name: &str) {
        let _ = writeln!(self.chains, ":{name} - [0:0]");
    }
    fn rule(&mut self, parts: &[&str]) {
        self.rules.push_str(&parts.join(" "));
        self.rules.push('\n');
    }
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

/// Full `iptables-restore --noflush` input for tables `filter` and `nat`: declares (and so
/// flushes) kube-proxy's chains and rewrites them. Deterministic for a given input.
pub fn render_iptables(input: &ProxyInput) -> String {
    render_with_stale(input, &BTreeSet::new())
}

/// Like [`render_iptables`], and also deletes the nat chains in `stale` (found by
/// [`stale_nat_chains`]), as kube-proxy does after reading `iptables-save`.
pub fn render_with_stale(input: &ProxyInput, stale: &BTreeSet<String>) -> String {
    let mut filter = Table::default();
    let mut nat = Table::default();
    let opts = &input.options;
    let mark = masquerade_mark(opts.masquerade_bit);
    let mark_mask = format!("{mark}/{mark}");

    for c in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ] {
        filter.chain(c);
    }
    for c in [KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ] {
        nat.chain(c);
    }

    nat.rule(&[
        "-A",
        KUBE_POSTROUTING,
        "-m",
        "mark",
        "!",
        "--mark",
        &mark_mask,
        "-j",
        "RETURN",
    ]);
    // Clear the mark so a packet that re-traverses the stack is not masqueraded twice.
    nat.rule(&["-A", KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", &mark]);
    let masq_comment = quoted("kubernetes service traffic requiring SNAT");
    let mut masq = vec![
        "-A",
        KUBE_POSTROUTING,
        "-m",
        "comment",
        "--comment",
        &masq_comment,
        "-j",
        "MASQUERADE",
    ];
    if opts.random_fully {
        masq.push("--random-fully");
    }
    nat.rule(&masq);
    nat.rule(&["-A", KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", &mark]);

    if opts.localhost_nodeports {
        // route_localnet opens 127.0.0.0/8 to the outside (kubernetes#90259); this closes it.
        filter.chain(KUBE_FIREWALL);
        filter.rule(&[
            "-A",
            KUBE_FIREWALL,
            "-m",
            "comment",
            "--comment",
            &quoted("block incoming localnet connections"),
            "-d",
            "127.0.0.0/8",
            "!",
            "-s",
            "127.0.0.0/8",
            "-m",
            "conntrack",
            "!",
            "--ctstate",
            "RELATED,ESTABLISHED,DNAT",
            "-j",
            "DROP",
        ]);
    }

    let cluster_cidr = input.cluster_cidr.map(|c| c.to_string());
    for svc in &input.services {
        render_service(input, svc, cluster_cidr.as_deref(), &mut filter, &mut nat);
    }

    for chain in stale {
        nat.chain(chain);
        nat.rule(&["-X", chain]);
    }

    // Must stay the last rule of KUBE-SERVICES: everything else there is more specific.
    let np_comment = quoted("kubernetes service nodeports; NOTE: this must be the last rule in this chain");
    let mut np = vec![
        "-A",
        KUBE_SERVICES,
        "-m",
        "comment",
        "--comment",
        &np_comment,
        "-m",
        "addrtype",
    ];
    np.extend(["--dst-type", "LOCAL"]);
    if !opts.localhost_nodeports {
        np.extend(["!", "-d", "127.0.0.0/8"]);
    }
    np.extend(["-j", KUBE_NODEPORTS]);
    nat.rule(&np);

    if !opts.conntrack_tcp_liberal {
        filter.rule(&[
            "-A",
            KUBE_FORWARD,
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ]);
    }
    filter.rule(&[
        "-A",
        KUBE_FORWARD,
        "-m",
        "comment",
        "--comment",
        &quoted("kubernetes forwarding rules"),
        "-m",
        "mark",
        "--mark",
        &mark_mask,
        "-j",
        "ACCEPT",
    ]);
    filter.rule(&[
        "-A",
        KUBE_FORWARD,
        "-m",
        "comment",
        "--comment",
        &quoted("kubernetes forwarding conntrack rule"),
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ]);

    let mut out = String::new();
    for (name, t) in [("filter", &filter), ("nat", &nat)] {
        let _ = writeln!(out, "*{name}");
        out.push_str(&t.chains);
        out.push_str(&t.rules);
        out.push_str("COMMIT\n");
    }
    out
}

fn render_service(
    input: &ProxyInput,
    svc: &ServiceInfo,
    cluster_cidr: Option<&str>,
    filter: &mut Table,
    nat: &mut Table,
) {
    let proto = svc.protocol.lower();
    let name = svc.svc_port_name();
    let cat = categorize_endpoints(svc, &input.node_name);
    let cluster_chain = svc_chain(svc);
    let local_chain = svl_chain(svc);
    let ext = ext_chain(svc);
    let uses_cluster_chain = !cat.cluster.is_empty() && svc.uses_cluster_endpoints();
    let uses_local_chain = !cat.local.is_empty() && svc.uses_local_endpoints();

    let (internal_chain, has_internal) = if svc.internal_policy_local() {
        (&local_chain, cat.has_any && !cat.local.is_empty())
    } else {
        (&cluster_chain, cat.has_any)
    };
    let (external_policy_chain, has_external) = if svc.external_policy_local() {
        (&local_chain, cat.has_any && !cat.local.is_empty())
    } else {
        (&cluster_chain, cat.has_any)
    };
    // Built even without external endpoints: the short-circuit rules for local sources are needed.
    let uses_ext_chain = cat.has_any && svc.externally_accessible();

    let (internal_target, internal_comment, external_target, external_comment) = if !cat.has_any {
        let c = quoted(&format!("{name} has no endpoints"));
        ("REJECT", c.clone(), "REJECT", c)
    } else {
        let c = quoted(&format!("{name} has no local endpoints"));
        ("DROP", c.clone(), "DROP", c)
    };

    let cluster_ip = svc.cluster_ip.to_string();
    let port = svc.port.to_string();
    let node_port = svc.node_port.to_string();
    let cip_comment = quoted(&format!("{name} cluster IP"));
    let cip_match = [
        "-m",
        "comment",
        "--comment",
        &cip_comment,
        "-m",
        proto,
        "-p",
        proto,
        "-d",
        &cluster_ip,
        "--dport",
        &port,
    ];

    if has_internal {
        let mut r = vec!["-A", KUBE_SERVICES];
        r.extend(cip_match);
        r.extend(["-j", internal_chain]);
        nat.rule(&r);
    } else {
        filter.rule(&[
            "-A",
            KUBE_SERVICES,
            "-m",
            "comment",
            "--comment",
            &internal_comment,
            "-m",
            proto,
            "-p",
            proto,
            "-d",
            &cluster_ip,
            "--dport",
            &port,
            "-j",
            internal_target,
        ]);
    }

    let np_comment = quoted(&name);
    if svc.node_port != 0 {
        if cat.has_any {
            nat.rule(&[
                "-A",
                KUBE_NODEPORTS,
                "-m",
                "comment",
                "--comment",
                &np_comment,
                "-m",
                proto,
                "-p",
                proto,
                "--dport",
                &node_port,
                "-j",
                &ext,
            ]);
        }
        if !has_external {
            filter.rule(&[
                "-A",
                KUBE_EXTERNAL_SERVICES,
                "-m",
                "comment",
                "--comment",
                &external_comment,
                "-m",
                "addrtype",
                "--dst-type",
                "LOCAL",
                "-m",
                proto,
                "-p",
                proto,
                "--dport",
                &node_port,
                "-j",
                external_target,
            ]);
        }
    }

    if has_internal {
        let mut r = vec!["-A", internal_chain.as_str()];
        r.extend(cip_match);
        if input.masquerade_all {
            r.extend(["-j", KUBE_MARK_MASQ]);
            nat.rule(&r);
        } else if let Some(cidr) = cluster_cidr {
            // Off-cluster clients reaching a ClusterIP (a route to the service range via a node)
            // may be answered from another node: masquerade them.
            r.extend(["!", "-s", cidr, "-j", KUBE_MARK_MASQ]);
            nat.rule(&r);
        }
    }

    if uses_ext_chain {
        nat.chain(&ext);
        if !svc.external_policy_local() {
            // The endpoint may be on another node: SNAT so the reply comes back through here.
            nat.rule(&[
                "-A",
                &ext,
                "-m",
                "comment",
                "--comment",
                &quoted(&format!("masquerade traffic for {name} external destinations")),
                "-j",
                KUBE_MARK_MASQ,
            ]);
        } else {
            if let Some(cidr) = cluster_cidr {
                // Pods reaching a NodePort behave as if they went out to a load balancer and back.
                nat.rule(&[
                    "-A",
                    &ext,
                    "-m",
                    "comment",
                    "--comment",
                    &quoted(&format!("pod traffic for {name} external destinations")),
                    "-s",
                    cidr,
                    "-j",
                    &cluster_chain,
                ]);
            }
            // The host's own traffic has a local source address that must not reach the pod.
            nat.rule(&[
                "-A",
                &ext,
                "-m",
                "comment",
                "--comment",
                &quoted(&format!("masquerade LOCAL traffic for {name} external destinations")),
                "-m",
                "addrtype",
                "--src-type",
                "LOCAL",
                "-j",
                KUBE_MARK_MASQ,
            ]);
            nat.rule(&[
                "-A",
                &ext,
                "-m",
                "comment",
                "--comment",
                &quoted(&format!("route LOCAL traffic for {name} external destinations")),
                "-m",
                "addrtype",
                "--src-type",
                "LOCAL",
                "-j",
                &cluster_chain,
            ]);
        }
        if has_external {
            nat.rule(&["-A", &ext, "-j", external_policy_chain]);
        }
    }

    if uses_cluster_chain {
        nat.chain(&cluster_chain);
        write_service_to_endpoint_rules(nat, svc, &name, &cluster_chain, &cat.cluster);
    }
    if uses_local_chain {
        nat.chain(&local_chain);
        write_service_to_endpoint_rules(nat, svc, &name, &local_chain, &cat.local);
    }

    let comment = quoted(&name);
    for ep in &cat.all_reachable {
        let ep_str = ep.to_string();
        let chain = sep_chain(svc, &ep_str);
        nat.chain(&chain);
        let ip = ep.ip.to_string();
        // A pod reaching itself through the service would see its own address; SNAT it.
        nat.rule(&[
            "-A",
            &chain,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-s",
            &ip,
            "-j",
            KUBE_MARK_MASQ,
        ]);
        nat.rule(&[
            "-A",
            &chain,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-m",
            proto,
            "-p",
            proto,
            "-j",
            "DNAT",
            "--to-destination",
            &ep_str,
        ]);
    }
}

fn write_service_to_endpoint_rules(
    nat: &mut Table,
    svc: &ServiceInfo,
    name: &str,
    chain: &str,
    endpoints: &[super::model::EndpointInfo],
) {
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let ep_str = ep.to_string();
        let comment = quoted(&format!("{name} -> {ep_str}"));
        let target = sep_chain(svc, &ep_str);
        let mut r = vec!["-A", chain, "-m", "comment", "--comment", &comment];
        let p;
        if i + 1 < n {
            // Rule i catches 1/(n-i) of what is left: a uniform choice overall.
            p = probability(n - i);
            r.extend(["-m", "statistic", "--mode", "random", "--probability", &p]);
        }
        r.extend(["-j", &target]);
        nat.rule(&r);
    }
}

/// Our per-service chains present in an `iptables-save -t nat` dump but not declared by
/// `rendered`: kube-proxy flushes and deletes them in the same restore.
pub fn stale_nat_chains(iptables_save_nat: &str, rendered: &str) -> BTreeSet<String> {
    let declared: BTreeSet<&str> = rendered
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut in_nat = false;
    let mut out = BTreeSet::new();
    for line in iptables_save_nat.lines() {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table.trim() == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        let Some(chain) = line.strip_prefix(':').and_then(|l| l.split_whitespace().next()) else {
            continue;
        };
        if SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p)) && !declared.contains(chain) {
            out.insert(chain.to_string());
        }
    }
    out
}

/// The chains declared in one table of an `iptables-save` dump.
fn saved_chains<'a>(save: &'a str, table: &str) -> BTreeSet<&'a str> {
    let mut in_table = false;
    let mut out = BTreeSet::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            in_table = t.trim() == table;
        } else if in_table {
            if let Some(chain) = line.strip_prefix(':').and_then(|l| l.split_whitespace().next()) {
                out.insert(chain);
            }
        }
    }
    out
}

/// kube-proxy's `CleanupLeftovers` restore payload: flushes and deletes its chains in `nat`
/// (fixed ones and every per-service chain) and `filter`, given the tables' current dumps.
/// The jump rules must be deleted first (see [`jump_rules`]). kubelet's KUBE-FIREWALL stays.
pub fn render_cleanup(save_nat: &str, save_filter: &str) -> String {
    let mut out = String::new();
    let nat = saved_chains(save_nat, "nat");
    let fixed_nat = [KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ];
    let mut chains: Vec<&str> = fixed_nat.iter().copied().filter(|c| nat.contains(c)).collect();
    chains.extend(
        nat.iter()
            .copied()
            .filter(|c| SERVICE_CHAIN_PREFIXES.iter().any(|p| c.starts_with(p))),
    );
    out.push_str("*nat\n");
    for c in &chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in &chains {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n*filter\n");
    let filter = saved_chains(save_filter, "filter");
    let fixed_filter = [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ];
    let chains: Vec<&str> = fixed_filter.iter().copied().filter(|c| filter.contains(c)).collect();
    for c in &chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in &chains {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    out
}
