//! The seeds' policy cases as data (`tests/scenarios/policy/seeds/*.yaml`), read by both the pure
//! compiler test (node-daemon/policy/tests/seeds.rs) and the lab test with real traffic
//! (lab/tests/policy_seeds.rs, which includes this file by path). Depends on serde and serde_yaml
//! only, which both crates have.
//!
//! A file holds a cluster (namespaces, labelled pods placed on named nodes, outside hosts) and
//! steps. Each step applies and deletes policies, then states the expected verdict of cells
//! `FROM -> TO PORT/PROTO`, explicitly and as reachability matrices over every pair of pods.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The directory of the data files, from any crate of the workspace.
pub fn seeds_dir() -> PathBuf {
    let mut d = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    loop {
        let cand = d.join("tests/scenarios/policy/seeds");
        if cand.is_dir() {
            return cand;
        }
        assert!(
            d.pop(),
            "no tests/scenarios/policy/seeds above {}",
            env!("CARGO_MANIFEST_DIR")
        );
    }
}

/// Every data file, sorted by name.
pub fn all_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(seeds_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seed data files");
    v
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedFile {
    pub title: String,
    pub cluster: ClusterSpec,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// name → labels
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Ports every pod serves unless it lists its own (`80/TCP`).
    #[serde(default)]
    pub pod_ports: Vec<String>,
    /// `ns/name` → pod
    pub pods: BTreeMap<String, PodSpec>,
    /// Outside hosts on the underlay: name (at most 8 characters) → host
    #[serde(default)]
    pub hosts: BTreeMap<String, HostSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub ip: String,
    #[serde(default)]
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    /// `ns/name` of NetworkPolicies to delete (before applying).
    #[serde(default)]
    pub delete: Vec<String>,
    /// NetworkPolicy manifests (YAML), created or replaced.
    #[serde(default)]
    pub apply: Vec<String>,
    /// `FROM -> TO PORT/PROTO connected|blocked`; FROM/TO are `ns/pod` or `host:NAME`.
    #[serde(default)]
    pub expect: Vec<String>,
    #[serde(default)]
    pub matrix: Vec<MatrixSpec>,
}

/// Every ordered pair of distinct pods on one port: blocked when some `blocked` pattern matches
/// and no `allowed` pattern does, connected otherwise. A pattern is `SRC -> DST`, each side
/// `ns/pod`, `ns/*` or `*`, optionally negated with a leading `!`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixSpec {
    pub port: String,
    #[serde(default)]
    pub blocked: Vec<String>,
    #[serde(default)]
    pub allowed: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }
}

/// `80/TCP` (a bare number is TCP).
pub fn parse_port(s: &str) -> (u16, Proto) {
    let (p, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let port = p.parse().unwrap_or_else(|_| panic!("bad port {s:?}"));
    let proto = match proto {
        "TCP" => Proto::Tcp,
        "UDP" => Proto::Udp,
        "SCTP" => Proto::Sctp,
        other => panic!("bad protocol {other:?} in {s:?}"),
    };
    (port, proto)
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub proto: Proto,
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {} {}/{}", self.from, self.to, self.port, self.proto.name())
    }
}

/// `FROM -> TO PORT/PROTO connected|blocked`
pub fn parse_expect(s: &str) -> (Cell, bool) {
    let w: Vec<&str> = s.split_whitespace().collect();
    assert!(
        w.len() == 5 && w[1] == "->",
        "expectation {s:?}: use FROM -> TO PORT/PROTO connected|blocked"
    );
    let (port, proto) = parse_port(w[3]);
    let want = match w[4] {
        "connected" => true,
        "blocked" => false,
        other => panic!("expectation {s:?}: {other:?} is neither connected nor blocked"),
    };
    let cell = Cell {
        from: w[0].into(),
        to: w[2].into(),
        port,
        proto,
    };
    (cell, want)
}

fn side_matches(pat: &str, who: &str) -> bool {
    let (neg, pat) = match pat.strip_prefix('!') {
        Some(p) => (true, p),
        None => (false, pat),
    };
    let m = pat == "*"
        || pat == who
        || pat
            .strip_suffix("/*")
            .is_some_and(|ns| who.split_once('/').is_some_and(|(n, _)| n == ns));
    m != neg
}

fn pattern_matches(pat: &str, from: &str, to: &str) -> bool {
    let (s, d) = pat
        .split_once("->")
        .unwrap_or_else(|| panic!("matrix pattern {pat:?}: use SRC -> DST"));
    side_matches(s.trim(), from) && side_matches(d.trim(), to)
}

impl SeedFile {
    pub fn load(path: &Path) -> SeedFile {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let f: SeedFile = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        f.validate(path);
        f
    }

    pub fn pod_ports(&self, pod: &str) -> Vec<(u16, Proto)> {
        let p = &self.cluster.pods[pod];
        p.ports
            .as_ref()
            .unwrap_or(&self.cluster.pod_ports)
            .iter()
            .map(|s| parse_port(s))
            .collect()
    }

    /// Pods in `ns/name` order.
    pub fn pods(&self) -> Vec<&str> {
        self.cluster.pods.keys().map(String::as_str).collect()
    }

    pub fn namespaces_with_pods(&self) -> Vec<String> {
        let s: BTreeSet<String> = self
            .cluster
            .pods
            .keys()
            .filter_map(|k| k.split_once('/').map(|(n, _)| n.to_string()))
            .collect();
        s.into_iter().collect()
    }

    /// The cells of one matrix with their expected verdicts (self-traffic left out: it never
    /// leaves the pod, so no plugin can police it).
    pub fn matrix_cells(&self, m: &MatrixSpec) -> Vec<(Cell, bool)> {
        let (port, proto) = parse_port(&m.port);
        let mut v = Vec::new();
        for from in self.pods() {
            for to in self.pods() {
                if from == to {
                    continue;
                }
                let blocked = m.blocked.iter().any(|p| pattern_matches(p, from, to))
                    && !m.allowed.iter().any(|p| pattern_matches(p, from, to));
                v.push((
                    Cell {
                        from: from.into(),
                        to: to.into(),
                        port,
                        proto,
                    },
                    !blocked,
                ));
            }
        }
        v
    }

    /// Every cell step `i` states, explicit and from its matrices, each once.
    pub fn step_cells(&self, i: usize) -> BTreeMap<Cell, bool> {
        let step = &self.steps[i];
        let mut out = BTreeMap::new();
        let cells = step
            .expect
            .iter()
            .map(|s| parse_expect(s))
            .chain(step.matrix.iter().flat_map(|m| self.matrix_cells(m)));
        for (c, want) in cells {
            if let Some(prev) = out.insert(c.clone(), want) {
                assert_eq!(prev, want, "step {:?} states {c} both ways", step.name);
            }
        }
        out
    }

    /// The policies in force after step `i`: manifests by `ns/name`.
    pub fn policies_after(&self, i: usize) -> BTreeMap<String, String> {
        let mut live = BTreeMap::new();
        for step in &self.steps[..=i] {
            for d in &step.delete {
                assert!(
                    live.remove(d).is_some(),
                    "step {:?} deletes {d}, which is not applied",
                    step.name
                );
            }
            for m in &step.apply {
                live.insert(policy_key(m), m.clone());
            }
        }
        live
    }

    /// The baseline: every cell any step names, each expected to connect while no policy exists
    /// (so that a `blocked` verdict later is the policy's doing, not a missing server).
    pub fn baseline_cells(&self) -> BTreeSet<Cell> {
        (0..self.steps.len())
            .flat_map(|i| self.step_cells(i).into_keys())
            .collect()
    }

    fn validate(&self, path: &Path) {
        let ctx = path.display();
        for (k, p) in &self.cluster.pods {
            let (ns, _) = k
                .split_once('/')
                .unwrap_or_else(|| panic!("{ctx}: pod {k:?} is not ns/name"));
            assert!(
                self.cluster.namespaces.contains_key(ns),
                "{ctx}: pod {k}: no namespace {ns}"
            );
            assert!(
                ["node1", "node2", "node3"].contains(&p.node.as_str()),
                "{ctx}: pod {k}: node {}",
                p.node
            );
        }
        for (name, h) in &self.cluster.hosts {
            assert!(name.len() <= 8, "{ctx}: host name {name:?} is longer than 8");
            h.ip.parse::<std::net::Ipv4Addr>()
                .unwrap_or_else(|_| panic!("{ctx}: host {name}: bad ip {}", h.ip));
        }
        for i in 0..self.steps.len() {
            self.policies_after(i);
            for c in self.step_cells(i).keys() {
                for end in [&c.from, &c.to] {
                    assert!(self.endpoint_exists(end), "{ctx}: {c}: no {end}");
                }
                // A cell whose destination does not serve the port would read "blocked" for
                // the wrong reason.
                assert!(
                    self.serves(&c.to).contains(&(c.port, c.proto)),
                    "{ctx}: {c}: {} does not serve {}/{}",
                    c.to,
                    c.port,
                    c.proto.name()
                );
            }
        }
    }

    fn endpoint_exists(&self, who: &str) -> bool {
        match who.strip_prefix("host:") {
            Some(h) => self.cluster.hosts.contains_key(h),
            None => self.cluster.pods.contains_key(who),
        }
    }

    /// Ports the endpoint answers on.
    pub fn serves(&self, who: &str) -> Vec<(u16, Proto)> {
        match who.strip_prefix("host:") {
            Some(h) => self.cluster.hosts[h].ports.iter().map(|s| parse_port(s)).collect(),
            None => self.pod_ports(who),
        }
    }
}

/// `ns/name` of a policy manifest.
pub fn policy_key(manifest: &str) -> String {
    let v: serde_yaml::Value = serde_yaml::from_str(manifest).unwrap();
    let md = &v["metadata"];
    let ns = md["namespace"].as_str().unwrap_or("default");
    let name = md["name"].as_str().expect("policy without metadata.name");
    format!("{ns}/{name}")
}
