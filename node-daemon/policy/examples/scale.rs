//! Scale table for the compiler: simulated clusters of 1 000 / 10 000 pods and 200 / 1 000
//! policies mixing pod selectors, namespace selectors, ipBlocks with except, named ports.
//! Run: `cargo run --release -p policy --example scale`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use policy::model::{
    Model, NamedPort, Namespace, Operator, Peer, Pod, Policy, PortMatch, PortSpec, Protocol, Rule, Selector,
};
use policy::{compile, NodeCtx};

/// Deterministic, dependency-free pseudo-random numbers (a run is reproducible).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

const PODS_PER_NODE: usize = 100;
const NAMESPACES: usize = 50;

fn cluster(pods: usize, policies: usize) -> Model {
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
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), format!("app{}", r.next(40)));
        labels.insert("tier".to_string(), ["web", "api", "db"][r.next(3) as usize].to_string());
        m.pods.push(Pod {
            namespace: format!("ns{}", i % NAMESPACES),
            name: format!("pod{i}"),
            labels,
            ip: Some(Ipv4Addr::from(0x0ae9_0000u32 + i as u32 + 1)),
            node: format!("node{}", i / PODS_PER_NODE),
            ports: vec![NamedPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: [80, 8080, 9090][r.next(3) as usize],
            }],
        });
    }
    for k in 0..policies {
        let ns = format!("ns{}", r.next(NAMESPACES as u64));
        let sel = Selector::labels([("tier", ["web", "api", "db"][k % 3])]);
        let peer = |r: &mut Lcg| match r.next(4) {
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
        };
        let port = |r: &mut Lcg| match r.next(3) {
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
        };
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
        m.policies.push(Policy {
            namespace: ns,
            name: format!("pol{k}"),
            pod_selector: sel,
            ingress_type,
            egress_type,
            ingress,
            egress,
        });
    }
    m
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    println!(
        "{:>6} {:>6} {:>5} {:>7} {:>7} {:>11} {:>9} {:>8} {:>6} {:>8} {:>10} {:>10}",
        "pods",
        "pols",
        "local",
        "chains",
        "rules",
        "pod avg/max",
        "pol-rules",
        "grp-rule",
        "sets",
        "members",
        "compile",
        "1-change"
    );
    for (pods, pols) in [
        (1000, 0),
        (1000, 200),
        (1000, 1000),
        (10000, 0),
        (10000, 200),
        (10000, 1000),
    ] {
        let m = cluster(pods, pols);
        let ctx = NodeCtx::from_model(&m, "node3", "cali").expect("valid prefix");
        let mut times = vec![];
        let mut out = None;
        for _ in 0..5 {
            let t = Instant::now();
            out = Some(compile(&m, &ctx));
            times.push(t.elapsed());
        }
        let c = out.expect("ran");
        // One policy changed: compile is a pure function, so a change costs a full compile.
        let mut changed = m.clone();
        if let Some(p) = changed.policies.first_mut() {
            p.ingress.push(Rule::default());
        }
        let t = Instant::now();
        let c2 = compile(&changed, &ctx);
        let change = t.elapsed();
        assert!(pols == 0 || c2.dataplane != c.dataplane, "a policy change must show");
        let s = &c.stats;
        println!(
            "{:>6} {:>6} {:>5} {:>7} {:>7} {:>7.1}/{:<3} {:>9} {:>8} {:>6} {:>8} {:>8.1}ms {:>8.1}ms",
            pods,
            pols,
            s.local_workloads,
            s.chains,
            s.rules,
            s.workload_rules as f64 / s.local_workloads.max(1) as f64,
            s.max_workload_rules,
            s.policy_rules,
            s.group_rules,
            s.ipsets,
            s.ipset_members,
            median(times).as_secs_f64() * 1e3,
            change.as_secs_f64() * 1e3,
        );
        assert!(c.errors.is_empty());
        assert!(s.max_workload_rules <= policy::compile::MAX_RULES_PER_WORKLOAD);
    }
    println!("pod avg/max = rules each local pod adds (dispatch, TW, FW, host); bounded by a constant, whatever the policies.");
    println!("local = pods on the compiled node (100 per node); compile = median of 5 full compiles; 1-change = compile after one policy edit.");
}
