//! The simulated clusters the policy benchmarks share (`scale` here, `policy_writer_bench` in
//! node-daemon includes this file by path): reproducible, dependency-free, mixing pod selectors,
//! namespace selectors, both together, ipBlocks with except and named ports.
// Each includer uses a different part of this file.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use policy::model::{
    Model, NamedPort, Namespace, Operator, PackedLabels, Peer, Pod, Policy, PortMatch, PortSpec, Protocol, Rule,
    Selector,
};
use serde_json::{json, Value};

/// Deterministic pseudo-random numbers, so that every run measures the same cluster.
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

pub const PODS_PER_NODE: usize = 100;
pub const NAMESPACES: usize = 50;
/// The node the benchmarks compile for (pods 200..300 live there).
pub const NODE: &str = "node3";
/// The (pods, policies) pairs of the table.
pub const SIZES: [(usize, usize); 4] = [(1000, 200), (1000, 1000), (10000, 200), (10000, 1000)];

pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0ae9_0000u32 + i as u32 + 1)
}

/// Pod number `i` of the simulated cluster, on `node`.
pub fn pod(r: &mut Lcg, i: usize, node: String) -> Pod {
    let app = format!("app{}", r.next(40));
    let labels = PackedLabels::new([
        ("app", app.as_str()),
        ("tier", ["web", "api", "db"][r.next(3) as usize]),
    ]);
    Pod {
        namespace: format!("ns{}", i % NAMESPACES),
        name: format!("pod{i}"),
        labels: labels.into(),
        ip: Some(pod_ip(i)),
        node,
        ports: vec![NamedPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: [80, 8080, 9090][r.next(3) as usize],
        }]
        .into(),
    }
}

fn peer(r: &mut Lcg) -> Peer {
    match r.next(4) {
        0 => Peer::pods(Selector::labels([("app", format!("app{}", r.next(40)).as_str())])),
        1 => Peer::namespaces(Selector::everything().with_expr("team", Operator::NotIn, &["t1"])),
        2 => Peer::Pods {
            namespaces: Some(Selector::labels([("env", "prod")])),
            pods: Some(Selector::labels([("tier", "api")])),
        },
        _ => {
            let b = r.next(32) + 16;
            Peer::IpBlock {
                cidr: format!("172.{b}.0.0/16").parse().expect("literal"),
                except: vec![format!("172.{b}.{}.0/24", r.next(256)).parse().expect("literal")],
            }
        }
    }
}

fn port(r: &mut Lcg) -> PortMatch {
    match r.next(3) {
        0 => PortMatch::tcp(80 + r.next(10) as u16),
        1 => PortMatch {
            protocol: Protocol::Tcp,
            port: Some(PortSpec::Named("http".into())),
        },
        _ => PortMatch {
            protocol: Protocol::Udp,
            port: Some(PortSpec::Number {
                port: 5000,
                end: Some(5100),
            }),
        },
    }
}

/// `pods` pods over 50 namespaces (100 per node) and `policies` policies.
pub fn cluster(pods: usize, policies: usize) -> Model {
    let mut r = Lcg(42);
    let mut m = Model::default();
    for n in 0..NAMESPACES {
        let name = format!("ns{n}");
        let labels = [
            ("team".to_string(), format!("t{}", n % 5)),
            ("env".into(), ["prod", "dev"][n % 2].into()),
        ];
        m.namespaces.insert(
            name.clone(),
            Namespace {
                name,
                labels: labels.into_iter().collect(),
            },
        );
    }
    for i in 0..pods {
        let p = pod(&mut r, i, format!("node{}", i / PODS_PER_NODE));
        std::sync::Arc::make_mut(&mut m.pods).push(p);
    }
    for k in 0..policies {
        let ns = format!("ns{}", r.next(NAMESPACES as u64));
        let sel = Selector::labels([("tier", ["web", "api", "db"][k % 3])]);
        let ingress = (0..1 + r.next(3))
            .map(|_| Rule {
                peers: (0..1 + r.next(2)).map(|_| peer(&mut r)).collect(),
                ports: (0..r.next(3)).map(|_| port(&mut r)).collect(),
            })
            .collect();
        let egress: Vec<Rule> = if k % 4 == 0 {
            vec![Rule {
                peers: vec![peer(&mut r)],
                ports: vec![port(&mut r)],
            }]
        } else {
            vec![]
        };
        let (ingress_type, egress_type) = Policy::default_types(egress.len());
        m.policies.push(std::sync::Arc::new(Policy {
            namespace: ns,
            name: format!("pol{k}"),
            pod_selector: sel,
            ingress_type,
            egress_type,
            ingress,
            egress,
        }));
    }
    m
}

/// Edit number `i` of a sequence of policy edits, each different from all before it, cycling
/// through what users do: add a port to a rule (one chain rewritten), add an ipBlock peer (a new
/// set and rule), retarget a pod-selector peer to other pods (set membership changes).
pub fn edit_policy(m: &mut Model, i: usize) -> &'static str {
    let n = m.policies.len();
    // A stride coprime with the sizes used spreads the edits over many policies.
    let p = std::sync::Arc::make_mut(&mut m.policies[(i * 37) % n]);
    let rule_idx = i % p.ingress.len().max(1);
    if p.ingress.is_empty() {
        p.ingress.push(Rule::default());
    }
    let rule = &mut p.ingress[rule_idx];
    match i % 3 {
        0 => {
            rule.ports.push(PortMatch::tcp(20000 + i as u16));
            "port added"
        }
        1 => {
            let (a, b) = ((i / 256) % 256, i % 256);
            rule.peers.push(Peer::IpBlock {
                cidr: format!("100.{a}.{b}.0/24").parse().expect("literal"),
                except: vec![],
            });
            "ipBlock added"
        }
        _ => {
            // Peers are a set: a selector the rule already has would change nothing.
            let peer = (0..)
                .map(|k| Peer::pods(Selector::labels([("app", format!("app{}", (i + k) % 40).as_str())])))
                .take(41)
                .find(|p| !rule.peers.contains(p))
                .unwrap_or_else(|| Peer::pods(Selector::labels([("edit", format!("{i}").as_str())])));
            rule.peers.push(peer);
            "pod selector added"
        }
    }
}

/// The (p50, p95) of durations, in ms.
pub fn p50_p95_ms(v: &[Duration]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort();
    let at = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.95))
}

/// Writes `value` as pretty JSON, creating the directory.
pub fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

/// A model selector as the API spells it.
pub fn api_selector(s: &Selector) -> Value {
    let exprs: Vec<Value> = s
        .match_expressions
        .iter()
        .map(|r| json!({"key": r.key, "operator": format!("{:?}", r.operator), "values": r.values}))
        .collect();
    json!({"matchLabels": s.match_labels, "matchExpressions": exprs})
}

fn api_peer(p: &Peer) -> Value {
    match p {
        Peer::Pods { namespaces, pods } => {
            let mut v = json!({});
            if let Some(n) = namespaces {
                v["namespaceSelector"] = api_selector(n);
            }
            if let Some(s) = pods {
                v["podSelector"] = api_selector(s);
            }
            v
        }
        Peer::IpBlock { cidr, except } => {
            let except: Vec<String> = except.iter().map(ToString::to_string).collect();
            json!({"ipBlock": {"cidr": cidr.to_string(), "except": except}})
        }
    }
}

fn api_port(p: &PortMatch) -> Value {
    let mut v = json!({ "protocol": p.protocol.name().to_uppercase() });
    match &p.port {
        Some(PortSpec::Number { port, end }) => {
            v["port"] = json!(port);
            if let Some(e) = end {
                v["endPort"] = json!(e);
            }
        }
        Some(PortSpec::Named(n)) => v["port"] = json!(n),
        None => {}
    }
    v
}

fn api_rules(rs: &[Rule], peers_key: &str) -> Value {
    rs.iter()
        .map(|r| {
            let mut v = json!({});
            if !r.peers.is_empty() {
                v[peers_key] = r.peers.iter().map(api_peer).collect();
            }
            if !r.ports.is_empty() {
                v["ports"] = r.ports.iter().map(api_port).collect();
            }
            v
        })
        .collect()
}

/// The NetworkPolicy spec that converts back to `p`.
pub fn api_policy_spec(p: &Policy) -> Value {
    let mut types = vec![];
    if p.ingress_type {
        types.push("Ingress");
    }
    if p.egress_type {
        types.push("Egress");
    }
    json!({
        "podSelector": api_selector(&p.pod_selector),
        "policyTypes": types,
        "ingress": api_rules(&p.ingress, "from"),
        "egress": api_rules(&p.egress, "to"),
    })
}
