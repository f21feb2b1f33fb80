//! NetworkPolicy wiring: the reflected Pods, Namespaces and NetworkPolicies → the policy
//! compiler → a [`DesiredDataplane`] fragment for the reconciler, with the metrics and the
//! per-policy error reports the daemon exports. Pure apart from the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use conf::dataplane::DesiredDataplane;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use policy::compile::Stats;
use policy::model::PolicyRef;
use policy::PolicyError;

use crate::metrics::Metrics;
use crate::routes::NodeInfo;
use conf::daemon::{IpipMode, NodePortPolicy};
use ipnet::Ipv4Net;
use policy::compile::{Compiler, NodePortCheck};

/// One compile's result.
#[derive(Debug, Clone, Default)]
pub struct PolicyBuild {
    pub dataplane: DesiredDataplane,
    /// Policies reported and skipped (conversion and compile errors); the rest are in `dataplane`.
    pub errors: Vec<PolicyError>,
    pub stats: Stats,
    /// Local workloads in `dataplane`: (namespace, pod) → creationTimestamp, if the API gave one.
    pub workloads: BTreeMap<(String, String), Option<SystemTime>>,
    pub compile_time: Duration,
    /// Compiled with the NodePort check (preserve-source).
    pub nodeport: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicySyncError {
    #[error("naming the workload interfaces: {0}")]
    Names(#[from] conf::names::NameError),
}

/// Converts and compiles for `node`, NodePort behaviour plain. A malformed policy ends up in
/// `errors`, never as an `Err`: the other policies keep being enforced.
pub fn build(
    namespaces: &[core::Namespace],
    pods: &[core::Pod],
    policies: &[net::NetworkPolicy],
    node: &str,
    veth_prefix: &str,
) -> Result<PolicyBuild, PolicySyncError> {
    build_with(
        namespaces,
        pods,
        policies,
        node,
        veth_prefix,
        None,
        &mut Compiler::new(),
    )
}

/// [`build`] with the NodePort check (preserve-source) when `nodeport` is `Some`, compiled
/// incrementally by `compiler` (the daemon keeps one across passes: a policy edit then costs
/// what it changes, not the whole cluster).
pub fn build_with(
    namespaces: &[core::Namespace],
    pods: &[core::Pod],
    policies: &[net::NetworkPolicy],
    node: &str,
    veth_prefix: &str,
    nodeport: Option<NodePortCheck>,
    compiler: &mut Compiler,
) -> Result<PolicyBuild, PolicySyncError> {
    let start = Instant::now();
    let converted = policy::convert::convert(namespaces, pods, policies);
    let with_nodeport = nodeport.is_some();
    let ctx = policy::NodeCtx::from_model(&converted.model, node, veth_prefix)?.with_nodeport(nodeport);
    let compiled = compiler.compile(&converted.model, &ctx);
    let compile_time = start.elapsed();
    let created: BTreeMap<(&str, &str), SystemTime> = pods
        .iter()
        .filter_map(|p| {
            let ts = p.metadata.creation_timestamp.as_ref()?;
            let when = SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ts.0.as_nanosecond()).ok()?);
            Some(((p.metadata.namespace.as_deref()?, p.metadata.name.as_deref()?), when))
        })
        .collect();
    let workloads = ctx
        .workloads
        .iter()
        .map(|w| {
            let key = (w.namespace.clone(), w.pod.clone());
            let ts = created.get(&(w.namespace.as_str(), w.pod.as_str())).copied();
            (key, ts)
        })
        .collect();
    let mut errors = converted.errors;
    errors.extend(compiled.errors);
    Ok(PolicyBuild {
        dataplane: compiled.dataplane,
        errors,
        stats: compiled.stats,
        workloads,
        compile_time,
        nodeport: with_nodeport,
    })
}

/// What preserve-source needs on this node, or `None` when it is off: the plain behaviour was
/// asked for, or there is no tunnel to carry the checked traffic (IPIP `Never`), or the block
/// is too small to spare a NodePort source. Peers without a block yet are left out until they
/// have one.
pub fn nodeport_check(
    behaviour: NodePortPolicy,
    ipip: IpipMode,
    me: &str,
    local_block: Ipv4Net,
    nodes: &[NodeInfo],
) -> Option<NodePortCheck> {
    if behaviour != NodePortPolicy::PreserveSource || ipip == IpipMode::Never {
        return None;
    }
    Some(NodePortCheck {
        tunnel_iface: conf::names::TUNNEL_IFACE.to_string(),
        local_source: conf::names::nodeport_source(local_block)?,
        peer_sources: nodes
            .iter()
            .filter(|n| n.name != me)
            .filter_map(|n| n.block.and_then(conf::names::nodeport_source))
            .collect(),
        kube_masq_mark: policy::compile::KUBE_PROXY_MASQ_MARK,
    })
}

/// Remembers what was reported and programmed between passes: errors are logged (and evented)
/// once per distinct (policy, reason), and each local workload's programming latency is
/// observed once.
#[derive(Debug, Default)]
pub struct PolicyTracker {
    reported: BTreeMap<PolicyRef, String>,
    programmed: BTreeSet<(String, String)>,
    /// When this daemon first saw each not yet programmed workload.
    pending: BTreeMap<(String, String), Instant>,
}

impl PolicyTracker {
    /// Records a compile; returns the errors that are new since the last pass (to log and to
    /// report as Events). `warren_policy_errors` is the number currently skipped.
    pub fn compiled(&mut self, b: &PolicyBuild, metrics: &Metrics) -> Vec<PolicyError> {
        let micros = u64::try_from(b.compile_time.as_micros()).unwrap_or(u64::MAX);
        metrics.policy_compile_micros_last.store(micros, Ordering::Relaxed);
        metrics.policy_compile_micros_total.fetch_add(micros, Ordering::Relaxed);
        Metrics::inc(&metrics.policy_compiles);
        metrics.policy_errors.store(b.errors.len() as u64, Ordering::Relaxed);
        metrics.policy_rules.store(b.stats.rules as u64, Ordering::Relaxed);
        metrics.policy_chains.store(b.stats.chains as u64, Ordering::Relaxed);
        metrics.policy_ipsets.store(b.stats.ipsets as u64, Ordering::Relaxed);
        metrics
            .policy_ipset_members
            .store(b.stats.ipset_members as u64, Ordering::Relaxed);
        metrics
            .policy_local_workloads
            .store(b.stats.local_workloads as u64, Ordering::Relaxed);

        let now = Instant::now();
        for k in b.workloads.keys() {
            if !self.programmed.contains(k) {
                self.pending.entry(k.clone()).or_insert(now);
            }
        }
        let current: BTreeMap<PolicyRef, String> =
            b.errors.iter().map(|e| (e.policy.clone(), e.reason.clone())).collect();
        let new = b
            .errors
            .iter()
            .filter(|e| self.reported.get(&e.policy) != Some(&e.reason))
            .cloned()
            .collect();
        self.reported = current;
        new
    }

    /// Records a successful apply of `b`: every workload in it has its chains now. Returns the
    /// (namespace, pod, seconds since creationTimestamp) of the workloads programmed for the
    /// first time.
    pub fn applied(&mut self, b: &PolicyBuild, metrics: &Metrics) -> Vec<(String, String, f64)> {
        let mut out = vec![];
        let now = SystemTime::now();
        for (k, created) in &b.workloads {
            if !self.programmed.insert(k.clone()) {
                continue;
            }
            if let Some(seen) = self.pending.remove(k) {
                let micros = u64::try_from(seen.elapsed().as_micros()).unwrap_or(u64::MAX);
                metrics
                    .pod_seen_to_programmed_micros_last
                    .store(micros, Ordering::Relaxed);
            }
            if let Some(age) = created.and_then(|c| now.duration_since(c).ok()) {
                let micros = u64::try_from(age.as_micros()).unwrap_or(u64::MAX);
                metrics.pod_programmed_micros_last.store(micros, Ordering::Relaxed);
                metrics.pod_programmed_micros_total.fetch_add(micros, Ordering::Relaxed);
                Metrics::inc(&metrics.pod_programmed);
                out.push((k.0.clone(), k.1.clone(), age.as_secs_f64()));
            }
        }
        // Forget deleted pods so that a pod re-created under the same name is measured again.
        self.programmed.retain(|k| b.workloads.contains_key(k));
        self.pending.retain(|k, _| b.workloads.contains_key(k));
        out
    }
}

/// The Event reported on a NetworkPolicy that warren cannot enforce.
pub fn policy_event(e: &PolicyError, uid: Option<&str>, node: &str) -> core::Event {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
    let now = k8s_openapi::jiff::Timestamp::now();
    core::Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", e.policy.name)),
            namespace: Some(e.policy.namespace.clone()),
            ..Default::default()
        },
        involved_object: core::ObjectReference {
            api_version: Some("networking.k8s.io/v1".into()),
            kind: Some("NetworkPolicy".into()),
            name: Some(e.policy.name.clone()),
            namespace: Some(e.policy.namespace.clone()),
            uid: uid.map(str::to_string),
            ..Default::default()
        },
        reason: Some("PolicyNotEnforced".into()),
        message: Some(format!("warren skips this policy: {}", e.reason)),
        type_: Some("Warning".into()),
        source: Some(core::EventSource {
            component: Some("warren-node".into()),
            host: Some(node.to_string()),
        }),
        reporting_component: Some("warren-node".into()),
        reporting_instance: Some(node.to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        action: Some("Compile".into()),
        count: Some(1),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, block: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            internal_ip: None,
            block: block.map(|b| b.parse().unwrap()),
        }
    }

    #[test]
    fn should_trust_every_peers_nodeport_source_and_use_its_own() {
        let nodes = [
            info("node1", Some("10.233.90.0/24")),
            info("node2", Some("10.233.96.0/24")),
            info("node3", Some("10.233.92.0/24")),
            info("node4", None),
        ];
        let block = "10.233.90.0/24".parse().unwrap();
        let c = nodeport_check(NodePortPolicy::PreserveSource, IpipMode::Always, "node1", block, &nodes).unwrap();
        assert_eq!(c.local_source, "10.233.90.1".parse::<std::net::Ipv4Addr>().unwrap());
        let peers: Vec<String> = c.peer_sources.iter().map(|p| p.to_string()).collect();
        assert_eq!(peers, ["10.233.92.1", "10.233.96.1"]);
        assert_eq!(c.tunnel_iface, "tunl0");
        assert!(nodeport_check(NodePortPolicy::Plain, IpipMode::Always, "node1", block, &nodes).is_none());
        assert!(
            nodeport_check(NodePortPolicy::PreserveSource, IpipMode::Never, "node1", block, &nodes).is_none(),
            "no tunnel, nothing to trust"
        );
    }
}
