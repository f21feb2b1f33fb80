//! kube-proxy's IPVS mode, as pure data and text (the kernel side is in [`apply`]).
//!
//! Follows `pkg/proxy/ipvs/proxier.go` (`syncProxyRules`, `writeIptablesRules`, `syncEndpoint`)
//! and its ipset list: every ClusterIP is bound (/32) to the dummy device `kube-ipvs0`; each
//! ClusterIP:port and each NodePort on every node address is an IPVS virtual server (`rr`) whose
//! real servers are the endpoints (masquerading forwarding, weight 1; `externalTrafficPolicy:
//! Local` NodePorts and `internalTrafficPolicy: Local` ClusterIPs get only this node's
//! endpoints); the decisions iptables mode makes per service are made by ipset membership in a
//! small fixed ruleset (KUBE-SERVICES, KUBE-NODE-PORT, KUBE-MARK-MASQ, KUBE-POSTROUTING,
//! KUBE-FORWARD, KUBE-IPVS-FILTER).
//!
//! Simplified, as in [`super::render`]: no external IPs, load-balancer IPs, session affinity,
//! health-check node ports (their sets are created, empty, because the fixed rules name them);
//! removed real servers are deleted at once instead of kube-proxy's graceful weight-0 phase;
//! IPv4 only (kube-proxy runs one proxier per family; the lab's cluster is IPv4), IPv6 services
//! are skipped.

pub mod apply;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use super::model::{categorize_endpoints, EndpointInfo, Protocol, ProxyInput, ServiceInfo};
use super::render::{masquerade_mark, JumpRule};

/// The dummy device holding every service address.
pub const DUMMY_DEVICE: &str = "kube-ipvs0";
/// `--ipvs-scheduler` default.
pub const DEFAULT_SCHEDULER: &str = "rr";

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_NODE_PORT: &str = "KUBE-NODE-PORT";
pub const KUBE_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_SOURCE_RANGES_FIREWALL: &str = "KUBE-SOURCE-RANGES-FIREWALL";
pub const KUBE_IPVS_FILTER: &str = "KUBE-IPVS-FILTER";

/// kube-proxy's chains per table, flushed and rewritten on every sync.
pub const NAT_CHAINS: [&str; 5] = [
    KUBE_SERVICES,
    KUBE_POSTROUTING,
    KUBE_NODE_PORT,
    KUBE_LOAD_BALANCER,
    KUBE_MARK_MASQ,
];
pub const FILTER_CHAINS: [&str; 5] = [
    KUBE_FORWARD,
    KUBE_NODE_PORT,
    KUBE_PROXY_FIREWALL,
    KUBE_SOURCE_RANGES_FIREWALL,
    KUBE_IPVS_FILTER,
];

pub const SET_LOOP_BACK: &str = "KUBE-LOOP-BACK";
pub const SET_CLUSTER_IP: &str = "KUBE-CLUSTER-IP";
pub const SET_EXTERNAL_IP: &str = "KUBE-EXTERNAL-IP";
pub const SET_EXTERNAL_IP_LOCAL: &str = "KUBE-EXTERNAL-IP-LOCAL";
pub const SET_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
pub const SET_LOAD_BALANCER_LOCAL: &str = "KUBE-LOAD-BALANCER-LOCAL";
pub const SET_LOAD_BALANCER_FW: &str = "KUBE-LOAD-BALANCER-FW";
pub const SET_LOAD_BALANCER_SOURCE_IP: &str = "KUBE-LOAD-BALANCER-SOURCE-IP";
pub const SET_LOAD_BALANCER_SOURCE_CIDR: &str = "KUBE-LOAD-BALANCER-SOURCE-CIDR";
pub const SET_NODE_PORT_TCP: &str = "KUBE-NODE-PORT-TCP";
pub const SET_NODE_PORT_LOCAL_TCP: &str = "KUBE-NODE-PORT-LOCAL-TCP";
pub const SET_NODE_PORT_UDP: &str = "KUBE-NODE-PORT-UDP";
pub const SET_NODE_PORT_LOCAL_UDP: &str = "KUBE-NODE-PORT-LOCAL-UDP";
pub const SET_NODE_PORT_SCTP: &str = "KUBE-NODE-PORT-SCTP-HASH";
pub const SET_NODE_PORT_LOCAL_SCTP: &str = "KUBE-NODE-PORT-LOCAL-SCTP-HASH";
pub const SET_HEALTH_CHECK_NODE_PORT: &str = "KUBE-HEALTH-CHECK-NODE-PORT";
pub const SET_IPVS_IPS: &str = "KUBE-IPVS-IPS";

/// One of kube-proxy's ipsets: name, ipset type, and the comment its iptables rules carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpSetSpec {
    pub name: &'static str,
    pub kind: &'static str,
    pub comment: &'static str,
}

/// Every set kube-proxy creates (IPv4), in its order.
pub const IPSETS: [IpSetSpec; 17] = [
    IpSetSpec {
        name: SET_LOOP_BACK,
        kind: "hash:ip,port,ip",
        comment: "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
    },
    IpSetSpec {
        name: SET_CLUSTER_IP,
        kind: "hash:ip,port",
        comment: "Kubernetes service cluster ip + port for masquerade purpose",
    },
    IpSetSpec {
        name: SET_EXTERNAL_IP,
        kind: "hash:ip,port",
        comment: "Kubernetes service external ip + port for masquerade and filter purpose",
    },
    IpSetSpec {
        name: SET_EXTERNAL_IP_LOCAL,
        kind: "hash:ip,port",
        comment: "Kubernetes service external ip + port with externalTrafficPolicy=local",
    },
    IpSetSpec {
        name: SET_LOAD_BALANCER,
        kind: "hash:ip,port",
        comment: "Kubernetes service lb portal",
    },
    IpSetSpec {
        name: SET_LOAD_BALANCER_LOCAL,
        kind: "hash:ip,port",
        comment: "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    },
    IpSetSpec {
        name: SET_LOAD_BALANCER_FW,
        kind: "hash:ip,port",
        comment: "Kubernetes service load balancer ip + port for load balancer with sourceRange",
    },
    IpSetSpec {
        name: SET_LOAD_BALANCER_SOURCE_IP,
        kind: "hash:ip,port,ip",
        comment: "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
    },
    IpSetSpec {
        name: SET_LOAD_BALANCER_SOURCE_CIDR,
        kind: "hash:ip,port,net",
        comment: "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
    },
    IpSetSpec {
        name: SET_NODE_PORT_TCP,
        kind: "bitmap:port",
        comment: "Kubernetes nodeport TCP port for masquerade purpose",
    },
    IpSetSpec {
        name: SET_NODE_PORT_LOCAL_TCP,
        kind: "bitmap:port",
        comment: "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
    },
    IpSetSpec {
        name: SET_NODE_PORT_UDP,
        kind: "bitmap:port",
        comment: "Kubernetes nodeport UDP port for masquerade purpose",
    },
    IpSetSpec {
        name: SET_NODE_PORT_LOCAL_UDP,
        kind: "bitmap:port",
        comment: "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
    },
    IpSetSpec {
        name: SET_NODE_PORT_SCTP,
        kind: "hash:ip,port",
        comment: "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
    },
    IpSetSpec {
        name: SET_NODE_PORT_LOCAL_SCTP,
        kind: "hash:ip,port",
        comment: "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
    },
    IpSetSpec {
        name: SET_HEALTH_CHECK_NODE_PORT,
        kind: "bitmap:port",
        comment: "Kubernetes health check node port",
    },
    IpSetSpec {
        name: SET_IPVS_IPS,
        kind: "hash:ip",
        comment: "IPVS service ExternalIP, ClusterIP, LoadBalancerIP",
    },
];

/// The spec of one of [`IPSETS`].
pub fn ipset_spec(name: &str) -> Option<&'static IpSetSpec> {
    IPSETS.iter().find(|s| s.name == name)
}

/// IPVS-mode knobs of kube-proxy's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsOptions {
    /// `--ipvs-scheduler`.
    pub scheduler: String,
    /// `--ipvs-strict-arp` (kubespray's `kube_proxy_strict_arp`, default false): sets
    /// `arp_ignore=1` / `arp_announce=2` so that nodes do not answer ARP for kube-ipvs0 addresses.
    pub strict_arp: bool,
}

impl Default for IpvsOptions {
    fn default() -> Self {
        IpvsOptions {
            scheduler: DEFAULT_SCHEDULER.to_string(),
            strict_arp: false,
        }
    }
}

/// One real server of a virtual server (always masquerading forwarding, as kube-proxy uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RealServer {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// One IPVS virtual server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    pub protocol: Protocol,
    pub addr: SocketAddr,
    pub scheduler: String,
    /// Keyed by address; masquerading forwarding.
    pub real_servers: BTreeMap<SocketAddr, u32>,
}

/// Virtual servers by (protocol, address).
pub type IpvsTable = BTreeMap<(Protocol, SocketAddr), VirtualServer>;

/// Members of each set, by set name (every set of [`IPSETS`] is present).
pub type IpSetMembers = BTreeMap<&'static str, BTreeSet<String>>;

/// Everything IPVS mode programs besides iptables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsState {
    /// Addresses bound (/32) to [`DUMMY_DEVICE`].
    pub addresses: BTreeSet<IpAddr>,
    pub virtual_servers: IpvsTable,
    pub ipsets: IpSetMembers,
}

fn proto_flag(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "-t",
        Protocol::Udp => "-u",
        Protocol::Sctp => "--sctp-service",
    }
}

/// ipset's `ip,proto:port` member syntax.
fn ip_port_member(ip: IpAddr, proto: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", proto.lower())
}

fn real_servers(endpoints: &[EndpointInfo]) -> BTreeMap<SocketAddr, u32> {
    endpoints.iter().map(|e| (SocketAddr::new(e.ip, e.port), 1)).collect()
}

/// kube-proxy's node IPs for NodePorts without `--nodeport-addresses`: every address with a
/// local route of protocol kernel (its `src`), minus those of [`DUMMY_DEVICE`]. `routes` is the
/// output of `ip -4 route show table local type local proto kernel`.
pub fn node_ips_from_local_routes(routes: &str) -> Vec<IpAddr> {
    let mut all = BTreeSet::new();
    for line in routes.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1));
        if after("dev").is_some_and(|d| *d == DUMMY_DEVICE) {
            continue;
        }
        if let Some(src) = after("src").and_then(|s| s.parse::<IpAddr>().ok()) {
            all.insert(src);
        }
    }
    all.into_iter().collect()
}

/// The state kube-proxy programs for `input` on a node whose addresses are `node_ips`
/// (see [`node_ips_from_local_routes`]; `input.node_ips` are added to them).
pub fn desired_state(input: &ProxyInput, node_ips: &[IpAddr], opts: &IpvsOptions) -> IpvsState {
    let mut ips: BTreeSet<IpAddr> = node_ips.iter().copied().filter(IpAddr::is_ipv4).collect();
    ips.extend(input.node_ips.iter().copied().filter(IpAddr::is_ipv4));
    let mut state = IpvsState {
        addresses: BTreeSet::new(),
        virtual_servers: BTreeMap::new(),
        ipsets: IPSETS.iter().map(|s| (s.name, BTreeSet::new())).collect(),
    };
    let mut add = |set: &'static str, member: String| {
        if let Some(m) = state.ipsets.get_mut(set) {
            m.insert(member);
        }
    };
    let mut vss = Vec::new();
    for svc in input.services.iter().filter(|s| s.cluster_ip.is_ipv4()) {
        let proto = svc.protocol;
        let cat = categorize_endpoints(svc, &input.node_name);
        for ep in svc
            .endpoints
            .iter()
            .filter(|e| e.node_name.as_deref() == Some(input.node_name.as_str()))
        {
            add(
                SET_LOOP_BACK,
                format!("{},{ep_ip}", ip_port_member(ep.ip, proto, ep.port), ep_ip = ep.ip),
            );
        }
        add(SET_CLUSTER_IP, ip_port_member(svc.cluster_ip, proto, svc.port));
        add(SET_IPVS_IPS, svc.cluster_ip.to_string());
        let internal = if svc.internal_policy_local() {
            &cat.local
        } else {
            &cat.cluster
        };
        vss.push(VirtualServer {
            protocol: proto,
            addr: SocketAddr::new(svc.cluster_ip, svc.port),
            scheduler: opts.scheduler.clone(),
            real_servers: real_servers(internal),
        });
        if svc.node_port == 0 {
            continue;
        }
        let local = svc.external_policy_local();
        match proto {
            Protocol::Tcp | Protocol::Udp => {
                let (all, loc) = if proto == Protocol::Tcp {
                    (SET_NODE_PORT_TCP, SET_NODE_PORT_LOCAL_TCP)
                } else {
                    (SET_NODE_PORT_UDP, SET_NODE_PORT_LOCAL_UDP)
                };
                add(all, svc.node_port.to_string());
                if local {
                    add(loc, svc.node_port.to_string());
                }
            }
            Protocol::Sctp => {
                for ip in &ips {
                    add(SET_NODE_PORT_SCTP, ip_port_member(*ip, proto, svc.node_port));
                    if local {
                        add(SET_NODE_PORT_LOCAL_SCTP, ip_port_member(*ip, proto, svc.node_port));
                    }
                }
            }
        }
        let external = if local { &cat.local } else { &cat.cluster };
        for ip in &ips {
            vss.push(VirtualServer {
                protocol: proto,
                addr: SocketAddr::new(*ip, svc.node_port),
                scheduler: opts.scheduler.clone(),
                real_servers: real_servers(external),
            });
        }
    }
    for svc in input.services.iter().filter(|s| s.cluster_ip.is_ipv4()) {
        state.addresses.insert(svc.cluster_ip);
    }
    for vs in vss {
        // Two services on one address:port cannot both exist (the API forbids it); first wins.
        state.virtual_servers.entry((vs.protocol, vs.addr)).or_insert(vs);
    }
    state
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

/// kube-proxy's `ipsetWithIptablesChain`: (set, table, from chain, target, match type, `-p`).
type SetRule = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
);

const SET_RULES: [SetRule; 11] = [
    (
        SET_LOOP_BACK,
        "nat",
        KUBE_POSTROUTING,
        "MASQUERADE",
        "dst,dst,src",
        None,
    ),
    (
        SET_LOAD_BALANCER,
        "nat",
        KUBE_SERVICES,
        KUBE_LOAD_BALANCER,
        "dst,dst",
        None,
    ),
    (
        SET_LOAD_BALANCER_LOCAL,
        "nat",
        KUBE_LOAD_BALANCER,
        "RETURN",
        "dst,dst",
        None,
    ),
    (
        SET_LOAD_BALANCER_SOURCE_CIDR,
        "filter",
        KUBE_SOURCE_RANGES_FIREWALL,
        "RETURN",
        "dst,dst,src",
        None,
    ),
    (
        SET_LOAD_BALANCER_SOURCE_IP,
        "filter",
        KUBE_SOURCE_RANGES_FIREWALL,
        "RETURN",
        "dst,dst,src",
        None,
    ),
    (
        SET_NODE_PORT_LOCAL_TCP,
        "nat",
        KUBE_NODE_PORT,
        "RETURN",
        "dst",
        Some("tcp"),
    ),
    (
        SET_NODE_PORT_TCP,
        "nat",
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst",
        Some("tcp"),
    ),
    (
        SET_NODE_PORT_LOCAL_UDP,
        "nat",
        KUBE_NODE_PORT,
        "RETURN",
        "dst",
        Some("udp"),
    ),
    (
        SET_NODE_PORT_UDP,
        "nat",
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst",
        Some("udp"),
    ),
    (
        SET_NODE_PORT_LOCAL_SCTP,
        "nat",
        KUBE_NODE_PORT,
        "RETURN",
        "dst,dst",
        Some("sctp"),
    ),
    (
        SET_NODE_PORT_SCTP,
        "nat",
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst,dst",
        Some("sctp"),
    ),
];

/// `iptables-restore --noflush` input for IPVS mode: declares (so flushes) kube-proxy's chains
/// in `filter` and `nat` and rewrites them. Rules that match a set are written only when the set
/// has members, as kube-proxy does.
pub fn render_iptables(input: &ProxyInput, state: &IpvsState) -> String {
    let non_empty = |set: &str| state.ipsets.get(set).is_some_and(|m| !m.is_empty());
    let comment_of = |set: &str| quoted(ipset_spec(set).map_or("", |s| s.comment));
    let mut nat = String::new();
    let mut filter = String::new();
    let mark = masquerade_mark(input.options.masquerade_bit);
    let mark_mask = format!("{mark}/{mark}");

    for (set, table, from, to, match_type, proto) in SET_RULES {
        if !non_empty(set) {
            continue;
        }
        let mut r = format!("-A {from}");
        if let Some(p) = proto {
            let _ = write!(r, " -p {p}");
        }
        let _ = writeln!(
            r,
            " -m comment --comment {} -m set --match-set {set} {match_type} -j {to}",
            comment_of(set)
        );
        if table == "filter" {
            filter.push_str(&r);
        } else {
            nat.push_str(&r);
        }
    }

    let cip = format!(
        "-A {KUBE_SERVICES} -m comment --comment {} -m set --match-set {SET_CLUSTER_IP}",
        comment_of(SET_CLUSTER_IP)
    );
    if input.masquerade_all {
        let _ = writeln!(nat, "{cip} dst,dst -j {KUBE_MARK_MASQ}");
    } else if let Some(cidr) = input.cluster_cidr {
        // Traffic to a ClusterIP from outside the pod network may have been routed here by a
        // static route and bounce to another node: SNAT so the reply returns through here.
        let _ = writeln!(nat, "{cip} dst,dst ! -s {cidr} -j {KUBE_MARK_MASQ}");
    } else {
        // The node's own connections to a VIP get the VIP as source (it is on kube-ipvs0).
        let _ = writeln!(nat, "{cip} src,dst -j {KUBE_MARK_MASQ}");
    }
    let _ = writeln!(
        nat,
        "-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}"
    );
    let _ = writeln!(nat, "-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}");
    // Accept what IPVS serves, in case later rules would block it.
    for set in [SET_CLUSTER_IP, SET_LOAD_BALANCER] {
        if non_empty(set) {
            let _ = writeln!(nat, "-A {KUBE_SERVICES} -m set --match-set {set} dst,dst -j ACCEPT");
        }
    }
    let _ = writeln!(
        nat,
        "-A {KUBE_POSTROUTING} -m mark ! --mark {mark_mask} -j RETURN\n\
         -A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}"
    );
    let _ = writeln!(
        nat,
        "-A {KUBE_POSTROUTING} -m comment --comment {} -j MASQUERADE{}",
        quoted("kubernetes service traffic requiring SNAT"),
        if input.options.random_fully {
            " --random-fully"
        } else {
            ""
        }
    );
    let _ = writeln!(nat, "-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}");

    if non_empty(SET_LOAD_BALANCER_FW) {
        let _ = writeln!(
            filter,
            "-A {KUBE_PROXY_FIREWALL} -m comment --comment {} -m set --match-set {SET_LOAD_BALANCER_FW} dst,dst -j {KUBE_SOURCE_RANGES_FIREWALL}",
            comment_of(SET_LOAD_BALANCER_FW)
        );
    }
    let _ = writeln!(filter, "-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP");
    let _ = writeln!(
        filter,
        "-A {KUBE_FORWARD} -m comment --comment {} -m mark --mark {mark_mask} -j ACCEPT",
        quoted("kubernetes forwarding rules")
    );
    let _ = writeln!(
        filter,
        "-A {KUBE_FORWARD} -m comment --comment {} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        quoted("kubernetes forwarding conntrack rule")
    );
    if non_empty(SET_HEALTH_CHECK_NODE_PORT) {
        let _ = writeln!(
            filter,
            "-A {KUBE_NODE_PORT} -m comment --comment {} -m set --match-set {SET_HEALTH_CHECK_NODE_PORT} dst -j ACCEPT",
            comment_of(SET_HEALTH_CHECK_NODE_PORT)
        );
    }
    // Service addresses answer only on service ports, not on every port of the host
    // (kubernetes#72236).
    for (set, m) in [
        (SET_LOAD_BALANCER, "dst,dst"),
        (SET_CLUSTER_IP, "dst,dst"),
        (SET_EXTERNAL_IP, "dst,dst"),
        (SET_EXTERNAL_IP_LOCAL, "dst,dst"),
        (SET_HEALTH_CHECK_NODE_PORT, "dst"),
    ] {
        let _ = writeln!(filter, "-A {KUBE_IPVS_FILTER} -m set --match-set {set} {m} -j RETURN");
    }
    let _ = writeln!(
        filter,
        "-A {KUBE_IPVS_FILTER} -m conntrack --ctstate NEW -m set --match-set {SET_IPVS_IPS} dst -j REJECT"
    );

    let mut out = String::from("*filter\n");
    for c in FILTER_CHAINS {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&filter);
    out.push_str("COMMIT\n*nat\n");
    for c in NAT_CHAINS {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&nat);
    out.push_str("COMMIT\n");
    out
}

/// The jumps from built-in chains, in kube-proxy's order (each is ensured prepended).
pub fn jump_rules() -> Vec<JumpRule> {
    let spec: [(&'static str, &'static str, &'static str, &'static str); 8] = [
        ("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
        ("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
        ("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
        ("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
        ("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
        ("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
        ("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
        ("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    ];
    spec.iter()
        .map(|(table, chain, target, comment)| JumpRule {
            table,
            chain,
            args: ["-m", "comment", "--comment", comment, "-j", target]
                .map(String::from)
                .to_vec(),
        })
        .collect()
}

/// `iptables-restore --noflush` input that flushes and deletes kube-proxy's IPVS-mode chains
/// (the jumps must be gone first). Only chains present in the dumps are named.
pub fn render_cleanup(save_nat: &str, save_filter: &str) -> String {
    let has = |save: &str, chain: &str| save.lines().any(|l| l.starts_with(&format!(":{chain} ")));
    let mut out = String::new();
    for (table, save, chains) in [("nat", save_nat, &NAT_CHAINS), ("filter", save_filter, &FILTER_CHAINS)] {
        let present: Vec<&str> = chains.iter().copied().filter(|c| has(save, c)).collect();
        let _ = writeln!(out, "*{table}");
        for c in &present {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for c in &present {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

fn parse_proto(flag: &str) -> Option<Protocol> {
    match flag {
        "-t" | "--tcp-service" => Some(Protocol::Tcp),
        "-u" | "--udp-service" => Some(Protocol::Udp),
        "--sctp-service" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// Parses `ipvsadm -S -n` (virtual servers with their scheduler, real servers with weight).
/// Lines it does not understand (fwmark services, …) are skipped.
pub fn parse_ipvsadm_save(text: &str) -> IpvsTable {
    let mut table = IpvsTable::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&cmd, rest)) = words.split_first() else {
            continue;
        };
        let Some((proto, addr)) = rest
            .windows(2)
            .find_map(|w| Some((parse_proto(w[0])?, w[1].parse::<SocketAddr>().ok()?)))
        else {
            continue;
        };
        let after = |key: &str| {
            rest.iter()
                .position(|w| *w == key)
                .and_then(|i| rest.get(i + 1))
                .copied()
        };
        match cmd {
            "-A" => {
                table.insert(
                    (proto, addr),
                    VirtualServer {
                        protocol: proto,
                        addr,
                        scheduler: after("-s").unwrap_or(DEFAULT_SCHEDULER).to_string(),
                        real_servers: BTreeMap::new(),
                    },
                );
            }
            "-a" => {
                let Some(rs) = after("-r").and_then(|r| r.parse::<SocketAddr>().ok()) else {
                    continue;
                };
                let weight = after("-w").and_then(|w| w.parse().ok()).unwrap_or(1);
                if let Some(vs) = table.get_mut(&(proto, addr)) {
                    vs.real_servers.insert(rs, weight);
                }
            }
            _ => {}
        }
    }
    table
}

/// `ipvsadm -R` input turning `current` into `desired`: stale virtual servers deleted (with
/// their real servers), new ones added, schedulers and real servers edited in place so that
/// connections to unchanged endpoints survive. Empty when nothing changes.
pub fn ipvsadm_changes(current: &IpvsTable, desired: &IpvsTable) -> String {
    let mut out = String::new();
    let none = BTreeMap::new();
    for (key, vs) in current {
        if !desired.contains_key(key) {
            let _ = writeln!(out, "-D {} {}", proto_flag(vs.protocol), vs.addr);
        }
    }
    for (key, want) in desired {
        let (flag, addr) = (proto_flag(want.protocol), want.addr);
        let have_rs = match current.get(key) {
            Some(have) => {
                if have.scheduler != want.scheduler {
                    let _ = writeln!(out, "-E {flag} {addr} -s {}", want.scheduler);
                }
                &have.real_servers
            }
            None => {
                let _ = writeln!(out, "-A {flag} {addr} -s {}", want.scheduler);
                &none
            }
        };
        for rs in have_rs.keys().filter(|rs| !want.real_servers.contains_key(rs)) {
            let _ = writeln!(out, "-d {flag} {addr} -r {rs}");
        }
        for (rs, w) in &want.real_servers {
            match have_rs.get(rs) {
                Some(hw) if hw == w => {}
                Some(_) => {
                    let _ = writeln!(out, "-e {flag} {addr} -r {rs} -m -w {w}");
                }
                None => {
                    let _ = writeln!(out, "-a {flag} {addr} -r {rs} -m -w {w}");
                }
            }
        }
    }
    out
}

/// Members of kube-proxy's sets in an `ipset save` dump (other sets are ignored).
pub fn parse_ipset_save(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("create"), Some(name), _) if ipset_spec(name).is_some() => {
                out.entry(name.to_string()).or_default();
            }
            (Some("add"), Some(name), Some(member)) if ipset_spec(name).is_some() => {
                out.entry(name.to_string()).or_default().insert(member.to_string());
            }
            _ => {}
        }
    }
    out
}

/// `ipset restore -exist` input: creates every set (a no-op for existing ones), deletes stale
/// members and adds missing ones. `current` is [`parse_ipset_save`]'s result.
pub fn ipset_restore(current: &BTreeMap<String, BTreeSet<String>>, desired: &IpSetMembers) -> String {
    let mut out = String::new();
    for spec in &IPSETS {
        if spec.kind == "bitmap:port" {
            let _ = writeln!(out, "create {} {} range 0-65535", spec.name, spec.kind);
        } else {
            let _ = writeln!(
                out,
                "create {} {} family inet hashsize 1024 maxelem 65536",
                spec.name, spec.kind
            );
        }
    }
    let empty = BTreeSet::new();
    for spec in &IPSETS {
        let have = current.get(spec.name).unwrap_or(&empty);
        let want = desired.get(spec.name).unwrap_or(&empty);
        for m in have.difference(want) {
            let _ = writeln!(out, "del {} {m}", spec.name);
        }
        for m in want.difference(have) {
            let _ = writeln!(out, "add {} {m}", spec.name);
        }
    }
    out
}

/// Addresses on a device, from `ip -o addr show dev <dev>` (`inet 10.0.0.1/32 …`).
pub fn parse_device_addresses(text: &str) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for w in words.windows(2) {
            if w[0] == "inet" || w[0] == "inet6" {
                if let Some(ip) = w[1].split('/').next().and_then(|a| a.parse().ok()) {
                    out.insert(ip);
                }
            }
        }
    }
    out
}

/// `net.ipv4.vs.conn_reuse_mode` as kube-proxy sets it for a kernel `major.minor`: 0 on kernels
/// from 4.1 (where it exists) before 5.9 (which fixed the slow-reconnect bug, kubernetes#93297);
/// left alone otherwise.
pub fn conn_reuse_mode_for(kernel: (u32, u32)) -> Option<&'static str> {
    ((4, 1)..(5, 9)).contains(&kernel).then_some("0")
}

/// `major.minor` of a kernel release string (`6.1.0-56-amd64`).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The sysctls kube-proxy's IPVS mode writes: (path under /proc/sys, value).
pub fn sysctls(kernel: Option<(u32, u32)>, opts: &IpvsOptions) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![
        ("net/ipv4/conf/all/route_localnet", "1"),
        ("net/ipv4/vs/conntrack", "1"),
        ("net/ipv4/ip_forward", "1"),
    ];
    if let Some(v) = kernel.and_then(conn_reuse_mode_for) {
        out.push(("net/ipv4/vs/conn_reuse_mode", v));
    }
    out.push(("net/ipv4/vs/expire_nodest_conn", "1"));
    out.push(("net/ipv4/vs/expire_quiescent_template", "1"));
    if opts.strict_arp {
        out.push(("net/ipv4/conf/all/arp_ignore", "1"));
        out.push(("net/ipv4/conf/all/arp_announce", "2"));
    }
    out
}

/// Helper for tests and callers: the virtual servers of one service port in `state`.
pub fn virtual_servers_of<'a>(state: &'a IpvsState, svc: &ServiceInfo) -> Vec<&'a VirtualServer> {
    state
        .virtual_servers
        .values()
        .filter(|vs| {
            vs.protocol == svc.protocol
                && ((vs.addr.ip() == svc.cluster_ip && vs.addr.port() == svc.port)
                    || (svc.node_port != 0 && vs.addr.port() == svc.node_port && vs.addr.ip() != svc.cluster_ip))
        })
        .collect()
}

/// `ip -batch` inputs (bind, unbind) that make [`DUMMY_DEVICE`] hold exactly `desired`. Binding
/// goes first so that a service keeps its address while its virtual server changes; unbinding
/// goes last, once the stale virtual servers are gone.
pub fn dummy_address_batch(current: &BTreeSet<IpAddr>, desired: &BTreeSet<IpAddr>) -> (String, String) {
    let line = |verb: &str, ip: &IpAddr| format!("address {verb} {ip}/{} dev {DUMMY_DEVICE}\n", host_prefix(*ip));
    let bind = desired.difference(current).map(|ip| line("add", ip)).collect();
    let unbind = current.difference(desired).map(|ip| line("del", ip)).collect();
    (bind, unbind)
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}
