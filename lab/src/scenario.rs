//! `warren-lab scenario tekton`: seed 000's story as data (`tests/scenarios/tekton/`), run against
//! the lab — set up the cluster, run each experiment, probe every cell, print expected vs
//! observed, and count mismatches.
//!
//! The data model, validation, comparison and table rendering are pure and tested in
//! `lab/tests/scenario_*.rs`; only [`run_tekton`] talks to a lab.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::config::{LabConfig, DEFAULT_CACHE_DIR};
use crate::control::{self, Request};
use crate::launcher::{self, UpOptions, VmMode};
use crate::podserve::{ProbeResult, Proto};

/// The tekton scenario's files, built in so the binary runs it from anywhere; a data directory
/// given in [`ScenarioOptions::data_dir`] replaces them.
pub const TEKTON_FILES: &[(&str, &str)] = &[
    (
        "scenario.yaml",
        include_str!("../../tests/scenarios/tekton/scenario.yaml"),
    ),
    (
        "expected.yaml",
        include_str!("../../tests/scenarios/tekton/expected.yaml"),
    ),
    (
        "cluster.yaml",
        include_str!("../../tests/scenarios/tekton/cluster.yaml"),
    ),
    (
        "policy-1-ipblock.yaml",
        include_str!("../../tests/scenarios/tekton/policy-1-ipblock.yaml"),
    ),
    (
        "policy-2-tunl0.yaml",
        include_str!("../../tests/scenarios/tekton/policy-2-tunl0.yaml"),
    ),
    (
        "policy-3-local.yaml",
        include_str!("../../tests/scenarios/tekton/policy-3-local.yaml"),
    ),
];

pub const PROXY_MODES: &[&str] = &["iptables", "ipvs"];
pub const NODEPORT_POLICIES: &[&str] = &["plain", "preserve-source"];

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {file}: {source}")]
    Parse {
        file: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("scenario file {0} is missing")]
    Missing(String),
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub namespace: String,
    pub service: String,
    pub pod: String,
    pub pod_ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    pub name: String,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    LoadBalancer,
    Pod,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub id: String,
    /// The lab's probe source: `host:NAME` or `NS/POD`.
    pub from: String,
    pub kind: SourceKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathSpec {
    pub id: String,
    pub to: IpAddr,
    pub port: u16,
    /// Probed from pods only (the load balancer has no route to the service range).
    #[serde(default)]
    pub pods_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellRef {
    pub source: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Experiment {
    pub id: String,
    pub title: String,
    pub policies: Vec<String>,
    pub external_traffic_policy: String,
    pub nodeport_policy: String,
    #[serde(default)]
    pub converge_on: Vec<CellRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScenarioSpec {
    pub name: String,
    pub cluster: String,
    pub target: Target,
    pub load_balancer: LoadBalancer,
    pub sources: Vec<Source>,
    pub paths: Vec<PathSpec>,
    pub experiments: Vec<Experiment>,
}

/// What a cell is expected to show. `NoAnswer` and `Blocked` are both "not connected" to a probe;
/// they differ in why (no endpoint on that path vs the policy), which the table keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Connected,
    Blocked,
    NoAnswer,
}

impl Outcome {
    pub fn connects(self) -> bool {
        self == Outcome::Connected
    }
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Connected => "connected",
            Outcome::Blocked => "blocked",
            Outcome::NoAnswer => "no-answer",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedCell {
    pub from: String,
    pub via: String,
    pub expect: Outcome,
    pub why: String,
}

/// proxy mode → experiment id → cells.
pub type ExpectedTables = BTreeMap<String, BTreeMap<String, Vec<ExpectedCell>>>;

/// A scenario's files, parsed and validated.
#[derive(Debug, Clone)]
pub struct ScenarioData {
    pub spec: ScenarioSpec,
    pub expected: ExpectedTables,
    /// Every file by name (the cluster and policy YAML are applied as written).
    pub files: BTreeMap<String, String>,
}

impl ScenarioData {
    pub fn tekton_builtin() -> Result<Self, ScenarioError> {
        Self::from_files(
            TEKTON_FILES
                .iter()
                .map(|(n, t)| ((*n).to_string(), (*t).to_string()))
                .collect(),
        )
    }

    /// Reads `scenario.yaml`, `expected.yaml` and every file they name from `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self, ScenarioError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| ScenarioError::Read { path, source })
        };
        let mut files = BTreeMap::new();
        for name in ["scenario.yaml", "expected.yaml"] {
            files.insert(name.to_string(), read(name)?);
        }
        let spec: ScenarioSpec = parse("scenario.yaml", &files["scenario.yaml"])?;
        let mut names: BTreeSet<String> = spec.experiments.iter().flat_map(|e| e.policies.clone()).collect();
        names.insert(spec.cluster.clone());
        for n in names {
            let text = read(&n)?;
            files.insert(n, text);
        }
        Self::from_files(files)
    }

    pub fn from_files(files: BTreeMap<String, String>) -> Result<Self, ScenarioError> {
        let get = |n: &str| files.get(n).ok_or_else(|| ScenarioError::Missing(n.to_string()));
        let spec: ScenarioSpec = parse("scenario.yaml", get("scenario.yaml")?)?;
        let expected: ExpectedTables = parse("expected.yaml", get("expected.yaml")?)?;
        let data = Self { spec, expected, files };
        data.validate()?;
        Ok(data)
    }

    /// Every (source, path) pair that is probed, in table order.
    pub fn cells(&self) -> Vec<(&Source, &PathSpec)> {
        let mut out = Vec::new();
        for s in &self.spec.sources {
            for p in &self.spec.paths {
                if p.pods_only && s.kind != SourceKind::Pod {
                    continue;
                }
                out.push((s, p));
            }
        }
        out
    }

    pub fn expected_for(&self, mode: &str, experiment: &str) -> Result<&[ExpectedCell], ScenarioError> {
        self.expected
            .get(mode)
            .and_then(|m| m.get(experiment))
            .map(Vec::as_slice)
            .ok_or_else(|| ScenarioError::Invalid(format!("no expected table for {mode}/{experiment}")))
    }

    pub fn expected_cell(&self, mode: &str, experiment: &str, source: &str, path: &str) -> Option<&ExpectedCell> {
        self.expected_for(mode, experiment)
            .ok()?
            .iter()
            .find(|c| c.from == source && c.via == path)
    }

    /// The YAML documents of a file, for kubectl.
    pub fn file(&self, name: &str) -> Result<&str, ScenarioError> {
        self.files
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| ScenarioError::Missing(name.to_string()))
    }

    /// `(namespace, name)` of every Pod in the cluster file.
    pub fn cluster_pods(&self) -> Result<Vec<(String, String)>, ScenarioError> {
        let mut out = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(self.file(&self.spec.cluster)?) {
            let v = serde_yaml::Value::deserialize(doc).map_err(|source| ScenarioError::Parse {
                file: self.spec.cluster.clone(),
                source,
            })?;
            if v["kind"].as_str() == Some("Pod") {
                let ns = v["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
                let name = v["metadata"]["name"].as_str().unwrap_or_default().to_string();
                out.push((ns, name));
            }
        }
        Ok(out)
    }

    /// Every mode has a table for every experiment, each with exactly the probed cells, a
    /// non-empty reason per cell; every name the spec uses resolves.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: String| Err(ScenarioError::Invalid(m));
        let spec = &self.spec;
        if !self.files.contains_key(&spec.cluster) {
            return Err(ScenarioError::Missing(spec.cluster.clone()));
        }
        let ids: BTreeSet<&str> = spec.sources.iter().map(|s| s.id.as_str()).collect();
        if ids.len() != spec.sources.len() {
            return bad("duplicate source id".into());
        }
        let pids: BTreeSet<&str> = spec.paths.iter().map(|p| p.id.as_str()).collect();
        if pids.len() != spec.paths.len() {
            return bad("duplicate path id".into());
        }
        let eids: BTreeSet<&str> = spec.experiments.iter().map(|e| e.id.as_str()).collect();
        if eids.len() != spec.experiments.len() || eids.is_empty() {
            return bad("experiment ids must be present and unique".into());
        }
        let cells: BTreeSet<(&str, &str)> = self
            .cells()
            .into_iter()
            .map(|(s, p)| (s.id.as_str(), p.id.as_str()))
            .collect();
        for e in &spec.experiments {
            for p in &e.policies {
                if !self.files.contains_key(p) {
                    return Err(ScenarioError::Missing(p.clone()));
                }
            }
            if !matches!(e.external_traffic_policy.as_str(), "Cluster" | "Local") {
                return bad(format!("{}: externalTrafficPolicy must be Cluster or Local", e.id));
            }
            if !NODEPORT_POLICIES.contains(&e.nodeport_policy.as_str()) {
                return bad(format!(
                    "{}: nodeport_policy must be one of {NODEPORT_POLICIES:?}",
                    e.id
                ));
            }
            for c in &e.converge_on {
                if !cells.contains(&(c.source.as_str(), c.path.as_str())) {
                    return bad(format!("{}: converge_on names no cell {} → {}", e.id, c.source, c.path));
                }
            }
        }
        for mode in PROXY_MODES {
            let Some(tables) = self.expected.get(*mode) else {
                return bad(format!("expected.yaml has no {mode} tables"));
            };
            if let Some(extra) = tables.keys().find(|k| !eids.contains(k.as_str())) {
                return bad(format!("expected.yaml {mode}: unknown experiment {extra}"));
            }
            for e in &spec.experiments {
                let Some(table) = tables.get(&e.id) else {
                    return bad(format!("expected.yaml {mode}: no table for {}", e.id));
                };
                let mut seen = BTreeSet::new();
                for c in table {
                    let key = (c.from.as_str(), c.via.as_str());
                    if !cells.contains(&key) {
                        return bad(format!("{mode}/{}: {} → {} is not a probed cell", e.id, c.from, c.via));
                    }
                    if !seen.insert(key) {
                        return bad(format!("{mode}/{}: {} → {} appears twice", e.id, c.from, c.via));
                    }
                    if c.why.trim().len() < 10 {
                        return bad(format!("{mode}/{}: {} → {} has no reason", e.id, c.from, c.via));
                    }
                }
                if let Some((s, p)) = cells.iter().find(|k| !seen.contains(*k)) {
                    return bad(format!("{mode}/{}: no expectation for {s} → {p}", e.id));
                }
            }
        }
        for m in self.expected.keys() {
            if !PROXY_MODES.contains(&m.as_str()) {
                return bad(format!("expected.yaml: unknown proxy mode {m}"));
            }
        }
        Ok(())
    }
}

fn parse<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, ScenarioError> {
    serde_yaml::from_str(text).map_err(|source| ScenarioError::Parse {
        file: file.to_string(),
        source,
    })
}

/// One probe's result as the report keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub connected: bool,
    /// Whom it reached (the server's name).
    pub reply: String,
    /// The source address the server saw.
    pub seen_as: String,
    pub detail: String,
}

impl From<ProbeResult> for Observed {
    fn from(r: ProbeResult) -> Self {
        Self {
            connected: r.connected,
            reply: r.reply,
            seen_as: r.seen_as,
            detail: r.detail,
        }
    }
}

/// Whether an observation is what `expect` says: "connected" means the dashboard itself answered;
/// anything else that does not reach it is "blocked" / "no-answer" (indistinguishable to a probe).
pub fn matches(expect: Outcome, observed: &Observed, target_pod: &str) -> bool {
    let reached = observed.connected && observed.reply == target_pod;
    reached == expect.connects()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellReport {
    pub from: String,
    pub via: String,
    pub expect: Outcome,
    pub why: String,
    /// None when the probe itself failed (lab error); that counts as a mismatch.
    pub observed: Option<Observed>,
    pub error: Option<String>,
    pub ok: bool,
}

impl CellReport {
    pub fn new(expected: &ExpectedCell, result: Result<Observed, String>, target_pod: &str) -> Self {
        let (observed, error) = match result {
            Ok(o) => (Some(o), None),
            Err(e) => (None, Some(e)),
        };
        let ok = observed
            .as_ref()
            .is_some_and(|o| matches(expected.expect, o, target_pod));
        Self {
            from: expected.from.clone(),
            via: expected.via.clone(),
            expect: expected.expect,
            why: expected.why.clone(),
            observed,
            error,
            ok,
        }
    }

    /// What was observed, in the table's words.
    pub fn observed_label(&self, target_pod: &str) -> String {
        match &self.observed {
            None => "error".into(),
            Some(o) if o.connected && o.reply != target_pod => format!("reached {}", o.reply),
            Some(o) if o.connected => "connected".into(),
            // Not connected: a probe cannot tell the policy's drop from a missing endpoint, so use
            // the expectation's word when it agrees.
            Some(_) if self.expect == Outcome::NoAnswer => "no-answer".into(),
            Some(_) => "blocked".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExperimentReport {
    pub id: String,
    pub title: String,
    pub cells: Vec<CellReport>,
    pub mismatches: usize,
    /// Whether the convergence cells showed their expected outcome before the sweep.
    pub converged: bool,
    pub notes: Vec<String>,
}

impl ExperimentReport {
    pub fn new(id: &str, title: &str, cells: Vec<CellReport>, converged: bool, notes: Vec<String>) -> Self {
        let mismatches = cells.iter().filter(|c| !c.ok).count();
        Self {
            id: id.to_string(),
            title: title.to_string(),
            cells,
            mismatches,
            converged,
            notes,
        }
    }

    /// One line: PASS/FAIL, the count, and the story the cells tell.
    pub fn verdict(&self) -> String {
        let total = self.cells.len();
        let ok = total - self.mismatches;
        let tag = if self.mismatches == 0 { "PASS" } else { "FAIL" };
        let summary = summarize(&self.cells);
        format!("{tag} {}: {ok}/{total} cells as expected — {summary}", self.id)
    }
}

/// "lb in via node2; bar in via …": who got in through what, by source group (`bar@node1` → `bar`).
fn summarize(cells: &[CellReport]) -> String {
    let mut groups: BTreeMap<String, (Vec<String>, usize)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for c in cells {
        let g = c.from.split('@').next().unwrap_or(&c.from).to_string();
        if !order.contains(&g) {
            order.push(g.clone());
        }
        let e = groups.entry(g).or_default();
        e.1 += 1;
        if c.observed.as_ref().is_some_and(|o| o.connected) {
            let p = c.via.split(':').next().unwrap_or(&c.via).to_string();
            let label = if c.from.contains('@') {
                format!("{}→{}", c.from.split('@').nth(1).unwrap_or(""), p)
            } else {
                p
            };
            e.0.push(label);
        }
    }
    order
        .iter()
        .map(|g| {
            let (ins, n) = &groups[g];
            if ins.is_empty() {
                format!("{g} kept out")
            } else if ins.len() == *n {
                format!("{g} in everywhere")
            } else {
                format!("{g} in via {}", ins.join(","))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub scenario: String,
    pub proxy_mode: String,
    pub target_pod: String,
    pub sources: Vec<String>,
    pub paths: Vec<String>,
    pub experiments: Vec<ExperimentReport>,
    pub mismatches: usize,
    pub notes: Vec<String>,
}

impl ScenarioReport {
    pub fn new(
        data: &ScenarioData,
        proxy_mode: &str,
        experiments: Vec<ExperimentReport>,
        notes: Vec<String>,
    ) -> ScenarioReport {
        let mismatches = experiments.iter().map(|e| e.mismatches).sum();
        ScenarioReport {
            scenario: data.spec.name.clone(),
            proxy_mode: proxy_mode.to_string(),
            target_pod: data.spec.target.pod.clone(),
            sources: data.spec.sources.iter().map(|s| s.id.clone()).collect(),
            paths: data.spec.paths.iter().map(|p| p.id.clone()).collect(),
            experiments,
            mismatches,
            notes,
        }
    }
}

/// One experiment as a grid: a row per source, a column per path; each cell is the observed
/// outcome, `✓` when it is the expected one, `✗ (expected X)` when not, `·` when not probed.
pub fn render_table(report: &ScenarioReport, exp: &ExperimentReport) -> String {
    let cell_text = |s: &str, p: &str| -> String {
        match exp.cells.iter().find(|c| c.from == s && c.via == p) {
            None => "·".into(),
            Some(c) if c.ok => format!("{} ✓", c.observed_label(&report.target_pod)),
            Some(c) => format!("{} ✗ (exp {})", c.observed_label(&report.target_pod), c.expect.label()),
        }
    };
    let w0 = report
        .sources
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(4)
        .max(8);
    let mut widths: Vec<usize> = report.paths.iter().map(|p| p.chars().count()).collect();
    for (i, p) in report.paths.iter().enumerate() {
        for s in &report.sources {
            widths[i] = widths[i].max(cell_text(s, p).chars().count());
        }
    }
    let pad = |t: &str, w: usize| format!("{t}{}", " ".repeat(w.saturating_sub(t.chars().count())));
    let mut out = String::new();
    let _ = write!(out, "  {}", pad("from \\ to", w0));
    for (i, p) in report.paths.iter().enumerate() {
        let _ = write!(out, "  {}", pad(p, widths[i]));
    }
    out.push('\n');
    for s in &report.sources {
        let _ = write!(out, "  {}", pad(s, w0));
        for (i, p) in report.paths.iter().enumerate() {
            let _ = write!(out, "  {}", pad(&cell_text(s, p), widths[i]));
        }
        out.push('\n');
    }
    out
}

/// Expected vs observed per experiment, the mismatches with their reasons, and a verdict line each.
pub fn render_report(report: &ScenarioReport, verbose: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scenario {} — kube-proxy {} mode",
        report.scenario, report.proxy_mode
    );
    for n in &report.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    for e in &report.experiments {
        let _ = writeln!(out, "\n{}: {}", e.id, e.title);
        for n in &e.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        out.push_str(&render_table(report, e));
        for c in e.cells.iter().filter(|c| verbose || !c.ok) {
            let mark = if c.ok { "✓" } else { "✗" };
            let obs = match (&c.observed, &c.error) {
                (Some(o), _) if o.connected => format!("connected to {} seen as {}", o.reply, o.seen_as),
                (Some(o), _) => format!("not connected ({})", o.detail),
                (None, Some(err)) => format!("probe failed: {err}"),
                (None, None) => "not probed".into(),
            };
            let _ = writeln!(
                out,
                "  {mark} {} → {}: expected {}, observed {obs}\n      why: {}",
                c.from,
                c.via,
                c.expect.label(),
                c.why
            );
        }
    }
    let _ = writeln!(out, "\nverdicts ({} mode):", report.proxy_mode);
    for e in &report.experiments {
        let _ = writeln!(out, "  {}", e.verdict());
    }
    let _ = writeln!(
        out,
        "{} mismatch{} in {} mode",
        report.mismatches,
        if report.mismatches == 1 { "" } else { "es" },
        report.proxy_mode
    );
    out
}

pub fn print_report(report: &ScenarioReport) {
    print!("{}", render_report(report, false));
}

/// How [`run_tekton`] runs.
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    /// Read the scenario from this directory instead of the built-in copy.
    pub data_dir: Option<PathBuf>,
    /// Only these experiments (ids); all when empty.
    pub only: Vec<String>,
    pub probe_timeout: Duration,
    /// Probes in flight at once.
    pub parallel: usize,
    /// How long to wait for pods, the service and each experiment's change to take effect.
    pub converge_timeout: Duration,
    /// For a lab this run brings up.
    pub vm: VmMode,
    pub cache_dir: PathBuf,
    /// Leave a lab this run brought up running.
    pub keep_lab: bool,
    /// Print every cell's reason and seen-as address, not only the mismatches.
    pub verbose: bool,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        Self {
            data_dir: None,
            only: Vec::new(),
            probe_timeout: Duration::from_millis(1500),
            parallel: 8,
            converge_timeout: Duration::from_secs(60),
            vm: VmMode::Auto,
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            keep_lab: false,
            verbose: false,
        }
    }
}

/// Runs the tekton scenario against the lab in `state_dir`, bringing one up (and down after)
/// when none is running there. `proxy_mode` must agree with a running lab's.
pub async fn run_tekton(
    state_dir: &Path,
    proxy_mode: Option<&str>,
    opts: &ScenarioOptions,
) -> anyhow::Result<ScenarioReport> {
    let data = match &opts.data_dir {
        Some(d) => ScenarioData::load_dir(d)?,
        None => ScenarioData::tekton_builtin()?,
    };
    if let Some(m) = proxy_mode {
        if !PROXY_MODES.contains(&m) {
            bail!("--proxy-mode must be iptables or ipvs");
        }
    }
    let running = LabConfig::path(state_dir).exists() && launcher::status(state_dir).await.is_ok();
    let started = if running {
        let cfg = LabConfig::load(state_dir)?;
        if let Some(m) = proxy_mode {
            if m != cfg.proxy_mode {
                bail!(
                    "the lab in {} runs kube-proxy in {} mode, not {m}; take it down or omit --proxy-mode",
                    state_dir.display(),
                    cfg.proxy_mode
                );
            }
        }
        eprintln!(
            "scenario: using the lab in {} ({} mode)",
            state_dir.display(),
            cfg.proxy_mode
        );
        false
    } else {
        let mode = proxy_mode.unwrap_or("iptables");
        eprintln!(
            "scenario: no lab in {}; bringing one up ({mode} mode)",
            state_dir.display()
        );
        let up = launcher::up(UpOptions {
            nodes: 3,
            vm: opts.vm,
            ipip_mode: "Always".into(),
            proxy_mode: mode.into(),
            state_dir: state_dir.to_path_buf(),
            cache_dir: opts.cache_dir.clone(),
            warren_node: true,
        })
        .await;
        // stdout carries the report (JSON with --json): the lab's summary goes to stderr.
        if let Ok(summary) = &up {
            eprint!("{summary}");
        }
        if let Err(e) = up {
            // A half-started lab (VM, namespaces) must not outlive the failed run.
            if let Err(d) = launcher::down(state_dir).await {
                eprintln!("scenario: cleaning up the failed lab: {d:#}");
            }
            return Err(e.context("bringing the lab up"));
        }
        true
    };
    let result = run_in_lab(state_dir, &data, opts).await;
    if started && !opts.keep_lab {
        eprintln!("scenario: taking the lab down");
        if let Err(e) = launcher::down(state_dir).await {
            eprintln!("scenario: taking the lab down failed: {e:#}");
        }
    }
    result
}

async fn run_in_lab(state_dir: &Path, data: &ScenarioData, opts: &ScenarioOptions) -> anyhow::Result<ScenarioReport> {
    let cfg = LabConfig::load(state_dir)?;
    let mode = cfg.proxy_mode.clone();
    let mut notes = Vec::new();
    let work = state_dir.join("scenario");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    eprintln!("scenario: applying {}", data.spec.cluster);
    kubectl_apply(&cfg, &work, data, &data.spec.cluster)?;
    // Start from the unrestricted cluster: no policy left from an earlier run.
    kubectl(
        &cfg,
        &["delete", "networkpolicy", "--all", "-n", &data.spec.target.namespace],
    )?;
    let lb = &data.spec.load_balancer;
    ensure_host(&cfg, &lb.name, lb.ip).await?;
    wait_pods_running(&cfg, data, opts.converge_timeout).await?;
    let pods = pod_ips(&cfg)?;
    let t = &data.spec.target;
    match pods.get(&(t.namespace.clone(), t.pod.clone())) {
        Some(ip) if *ip == t.pod_ip.to_string() => {}
        Some(ip) => notes.push(format!(
            "the dashboard got {ip}, not the seed's {} (no requested-address capability?)",
            t.pod_ip
        )),
        None => notes.push("the dashboard has no address".into()),
    }
    // Known answer before any experiment: an allowed pod reaches the dashboard through its ClusterIP.
    let ready = data
        .cells()
        .into_iter()
        .find(|(s, p)| s.kind == SourceKind::Pod && p.pods_only)
        .map(|(s, p)| (s.clone(), p.clone()));
    if let Some((s, p)) = ready {
        let deadline = Instant::now() + opts.converge_timeout;
        loop {
            let r = probe(&cfg, &s, &p, opts.probe_timeout).await;
            if r.as_ref().is_ok_and(|o| o.connected && o.reply == t.pod) {
                break;
            }
            if Instant::now() > deadline {
                notes.push(format!(
                    "{} never reached the dashboard through {} before the experiments: {}",
                    s.id,
                    p.id,
                    match r {
                        Ok(o) => o.detail,
                        Err(e) => e,
                    }
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    let mut reports = Vec::new();
    let mut nodeport_policy: Option<String> = None;
    for exp in &data.spec.experiments {
        if !opts.only.is_empty() && !opts.only.contains(&exp.id) {
            continue;
        }
        eprintln!("scenario: {} — {}", exp.id, exp.title);
        let mut enotes = Vec::new();
        // The experiment's policies go in first and the previous ones leave after: deleting first
        // would leave the dashboard unisolated for a moment, and a probe then would see that.
        for p in &exp.policies {
            kubectl_apply(&cfg, &work, data, p)?;
        }
        prune_policies(&cfg, data, &exp.policies)?;
        let patch = format!(
            r#"{{"spec":{{"externalTrafficPolicy":"{}"}}}}"#,
            exp.external_traffic_policy
        );
        kubectl(
            &cfg,
            &[
                "patch",
                "service",
                &data.spec.target.service,
                "-n",
                &data.spec.target.namespace,
                "--type",
                "merge",
                "-p",
                &patch,
            ],
        )?;
        if nodeport_policy.as_deref() != Some(exp.nodeport_policy.as_str()) {
            let notes = set_nodeport_policy(&cfg, &exp.nodeport_policy).await;
            if notes.is_empty() {
                enotes.extend(wait_daemons(&cfg, &exp.nodeport_policy, opts.converge_timeout).await);
            }
            enotes.extend(notes);
            nodeport_policy = Some(exp.nodeport_policy.clone());
        }
        let converged = converge(&cfg, data, &mode, exp, opts).await;
        if !converged {
            enotes.push(format!(
                "the convergence cells did not show their expected outcome within {:?}; probed anyway",
                opts.converge_timeout
            ));
        }
        let cells = sweep(&cfg, data, &mode, &exp.id, opts).await?;
        let r = ExperimentReport::new(&exp.id, &exp.title, cells, converged, enotes);
        eprintln!("scenario: {}", r.verdict());
        reports.push(r);
    }
    if !cfg.warren_node {
        notes.push("this lab runs without warren-node: cross-node paths and policy are not warren's".into());
    }
    Ok(ScenarioReport::new(data, &mode, reports, notes))
}

fn kubectl(cfg: &LabConfig, args: &[&str]) -> anyhow::Result<String> {
    crate::kubectl_output(cfg, args)
}

/// Deletes the target namespace's NetworkPolicies that none of `keep` (the experiment's files)
/// defines.
fn prune_policies(cfg: &LabConfig, data: &ScenarioData, keep: &[String]) -> anyhow::Result<()> {
    let mut wanted = BTreeSet::new();
    for f in keep {
        for doc in serde_yaml::Deserializer::from_str(data.file(f)?) {
            let v = serde_yaml::Value::deserialize(doc).with_context(|| format!("parsing {f}"))?;
            if let Some(name) = v["metadata"]["name"].as_str() {
                wanted.insert(name.to_string());
            }
        }
    }
    let ns = &data.spec.target.namespace;
    let have = kubectl(cfg, &["get", "networkpolicy", "-n", ns, "-o", "name"])?;
    for line in have.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = line.rsplit('/').next().unwrap_or(line);
        if !wanted.contains(name) {
            kubectl(cfg, &["delete", "networkpolicy", name, "-n", ns])?;
        }
    }
    Ok(())
}

/// Waits (bounded) until warren-node on every node has programmed policy with the NodePort
/// behaviour asked for: a restarted daemon keeps the previous rules until its first full sync
/// (fail-static), and probing before then would judge the old behaviour.
async fn wait_daemons(cfg: &LabConfig, policy: &str, timeout: Duration) -> Vec<String> {
    let want = format!(
        "warren_nodeport_preserve_source {}",
        u8::from(policy == "preserve-source")
    );
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<String> = cfg.nodes.iter().map(|n| n.name.clone()).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for node in pending {
            let req = Request::Exec {
                target: format!("node:{node}"),
                argv: ["curl", "-s", "--max-time", "5", "http://127.0.0.1:9099/metrics"]
                    .map(String::from)
                    .to_vec(),
            };
            let done = control::call(cfg.host_ctl, &req, Duration::from_secs(30))
                .await
                .ok()
                .and_then(|v| v["stdout"].as_str().map(str::to_string))
                .is_some_and(|m| m.lines().any(|l| l == want) && m.lines().any(|l| l == "warren_policy_synced 1"));
            if !done {
                still.push(node);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return vec![format!(
                "warren-node on {} did not report NodePort behaviour {policy} programmed within {timeout:?}",
                pending.join(", ")
            )];
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Vec::new()
}

fn kubectl_apply(cfg: &LabConfig, work: &Path, data: &ScenarioData, file: &str) -> anyhow::Result<()> {
    let path = work.join(file);
    std::fs::write(&path, data.file(file)?).with_context(|| format!("writing {}", path.display()))?;
    let p = path.to_string_lossy().into_owned();
    kubectl(cfg, &["apply", "-f", &p])?;
    Ok(())
}

async fn ensure_host(cfg: &LabConfig, name: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    let st = control::call(cfg.host_ctl, &Request::Status, Duration::from_secs(20)).await?;
    let existing = st["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["host"].as_str() == Some(name))
        .map(|h| h["ip"].as_str().unwrap_or_default().to_string());
    match existing {
        Some(have) if have == ip.to_string() => Ok(()),
        Some(have) => bail!("the lab already has a host {name} at {have}, not {ip}"),
        None => {
            control::call(
                cfg.host_ctl,
                &Request::HostAdd {
                    name: name.to_string(),
                    ip: ip.to_string(),
                    ports: Vec::new(),
                },
                Duration::from_secs(60),
            )
            .await
            .with_context(|| format!("adding the outside host {name} {ip}"))?;
            Ok(())
        }
    }
}

/// `(namespace, name)` → podIP of every pod that is Running with an address.
fn pod_ips(cfg: &LabConfig) -> anyhow::Result<BTreeMap<(String, String), String>> {
    let out = kubectl(cfg, &["get", "pods", "-A", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("decoding kubectl get pods")?;
    let mut m = BTreeMap::new();
    for p in v["items"].as_array().into_iter().flatten() {
        let ip = p["status"]["podIP"].as_str().unwrap_or_default();
        if p["status"]["phase"] == "Running" && !ip.is_empty() {
            let ns = p["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
            let name = p["metadata"]["name"].as_str().unwrap_or_default().to_string();
            m.insert((ns, name), ip.to_string());
        }
    }
    Ok(m)
}

async fn wait_pods_running(cfg: &LabConfig, data: &ScenarioData, timeout: Duration) -> anyhow::Result<()> {
    let want = data.cluster_pods()?;
    let deadline = Instant::now() + timeout.max(Duration::from_secs(30));
    loop {
        let have = pod_ips(cfg).unwrap_or_default();
        let missing: Vec<String> = want
            .iter()
            .filter(|k| !have.contains_key(*k))
            .map(|(ns, n)| format!("{ns}/{n}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "pods not Running after {timeout:?}: {} (see `warren-lab status`)",
                missing.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Restarts warren-node on every node with `--nodeport-policy=<p>`; returns notes on what could
/// not be done (a lab without warren-node, a controller that cannot restart it yet).
async fn set_nodeport_policy(cfg: &LabConfig, policy: &str) -> Vec<String> {
    if !cfg.warren_node {
        return vec![format!(
            "warren-node does not run in this lab; --nodeport-policy={policy} not applied"
        )];
    }
    // A warren-node that does not know the flag would refuse to start and leave the node without
    // its daemon, so only pass it to one that lists it.
    let bin = cfg.bin_dir.join("warren-node");
    let supported = std::process::Command::new(&bin)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--nodeport-policy"))
        .unwrap_or(false);
    if !supported {
        return vec![format!(
            "{} has no --nodeport-policy yet; NodePort behaviour {policy} not set",
            bin.display()
        )];
    }
    let mut notes = Vec::new();
    for n in &cfg.nodes {
        let req = Request::Restart {
            node: n.name.clone(),
            component: "warren-node".into(),
            down_ms: 0,
            extra_args: Some(vec![format!("--nodeport-policy={policy}")]),
        };
        if let Err(e) = control::call(cfg.host_ctl, &req, Duration::from_secs(60)).await {
            notes.push(format!(
                "restarting warren-node on {} with --nodeport-policy={policy}: {e:#}",
                n.name
            ));
        }
    }
    notes
}

async fn probe(cfg: &LabConfig, s: &Source, p: &PathSpec, timeout: Duration) -> Result<Observed, String> {
    let req = Request::Probe {
        from: s.from.clone(),
        to: p.to.to_string(),
        port: p.port,
        protocol: Proto::Tcp,
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    let v = control::call(cfg.host_ctl, &req, timeout + Duration::from_secs(30))
        .await
        .map_err(|e| format!("{e:#}"))?;
    serde_json::from_value::<ProbeResult>(v)
        .map(Observed::from)
        .map_err(|e| format!("decoding the probe result: {e}"))
}

/// Polls the experiment's convergence cells until all show their expected outcome (bounded).
async fn converge(cfg: &LabConfig, data: &ScenarioData, mode: &str, exp: &Experiment, opts: &ScenarioOptions) -> bool {
    let target = &data.spec.target.pod;
    let mut checks = Vec::new();
    for c in &exp.converge_on {
        let s = data.spec.sources.iter().find(|s| s.id == c.source);
        let p = data.spec.paths.iter().find(|p| p.id == c.path);
        let e = data.expected_cell(mode, &exp.id, &c.source, &c.path);
        if let (Some(s), Some(p), Some(e)) = (s, p, e) {
            checks.push((s, p, e.expect));
        }
    }
    let deadline = Instant::now() + opts.converge_timeout;
    loop {
        let mut all = true;
        for (s, p, expect) in &checks {
            let ok = probe(cfg, s, p, opts.probe_timeout)
                .await
                .is_ok_and(|o| matches(*expect, &o, target));
            if !ok {
                all = false;
                break;
            }
        }
        if all {
            // Rules land node by node; give the others a moment after the first one shows it.
            tokio::time::sleep(Duration::from_secs(1)).await;
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Probes every cell of an experiment, `opts.parallel` at a time.
async fn sweep(
    cfg: &LabConfig,
    data: &ScenarioData,
    mode: &str,
    exp_id: &str,
    opts: &ScenarioOptions,
) -> anyhow::Result<Vec<CellReport>> {
    let target = data.spec.target.pod.clone();
    let mut jobs = Vec::new();
    for (s, p) in data.cells() {
        let e = data
            .expected_cell(mode, exp_id, &s.id, &p.id)
            .ok_or_else(|| anyhow!("no expectation for {mode}/{exp_id} {} → {}", s.id, p.id))?;
        jobs.push((s, p, e));
    }
    let results: Vec<CellReport> = futures::stream::iter(jobs.into_iter().map(|(s, p, e)| {
        let target = target.clone();
        async move {
            let r = probe(cfg, s, p, opts.probe_timeout).await;
            CellReport::new(e, r, &target)
        }
    }))
    .buffered(opts.parallel.max(1))
    .collect()
    .await;
    Ok(results)
}
