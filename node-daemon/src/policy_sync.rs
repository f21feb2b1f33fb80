//! NetworkPolicy wiring: the reflected Pods, Namespaces and NetworkPolicies → the policy
//! compiler → a [`DesiredDataplane`] fragment for the reconciler, with the metrics and the
//! per-policy error reports the daemon exports. Pure apart from the clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use conf::dataplane::DesiredDataplane;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Metadata;
use policy::compile::Stats;
use policy::convert;
use policy::model::{Model, PolicyRef};
use policy::PolicyError;

use crate::metrics::Metrics;
use crate::routes::NodeInfo;
use crate::slim_pod::SlimPod;
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
    /// Local workloads' addresses → (namespace, pod), for forgetting a departed pod's flows.
    pub addresses: BTreeMap<std::net::Ipv4Addr, crate::conntrack::Owner>,
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
pub fn build<P: PolicyPod>(
    namespaces: &[core::Namespace],
    pods: &[P],
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
/// incrementally by `compiler`. Converts every object: the daemon keeps a [`ModelCache`] across
/// passes instead.
pub fn build_with<P: PolicyPod>(
    namespaces: &[core::Namespace],
    pods: &[P],
    policies: &[net::NetworkPolicy],
    node: &str,
    veth_prefix: &str,
    nodeport: Option<NodePortCheck>,
    compiler: &mut Compiler,
) -> Result<PolicyBuild, PolicySyncError> {
    ModelCache::<P>::default().build(
        Objects {
            namespaces,
            pods,
            policies,
        },
        node,
        veth_prefix,
        nodeport,
        compiler,
    )
}

/// The reflected objects of one pass, as slices of the objects or of the stores' `Arc`s.
#[derive(Debug)]
pub struct Objects<'a, N, P, Q> {
    pub namespaces: &'a [N],
    pub pods: &'a [P],
    pub policies: &'a [Q],
}

/// An object as listed for a pass: the object, or the store's `Arc` of it, whose address tells
/// an unchanged object without reading it (a reflector store replaces the `Arc` on every change).
pub trait Listed<K> {
    fn object(&self) -> &K;
    fn shared(&self) -> Option<&Arc<K>> {
        None
    }
}

macro_rules! listed {
    ($($k:ty),*) => {$(
        impl Listed<$k> for $k {
            fn object(&self) -> &$k {
                self
            }
        }
        impl Listed<$k> for Arc<$k> {
            fn object(&self) -> &$k {
                self
            }
            fn shared(&self) -> Option<&Arc<$k>> {
                Some(self)
            }
        }
    )*};
}
listed!(core::Namespace, core::Pod, SlimPod, net::NetworkPolicy);

/// A pod as the cache reads it: the daemon's [`SlimPod`], or the API's own Pod (what [`build`]
/// takes, so that callers holding whole Pods need no conversion).
pub trait PolicyPod: Metadata<Ty = ObjectMeta> + Listed<Self> + Sized {
    /// As `policy::convert::convert_pod`: None for pods that take no part.
    fn convert(&self) -> Option<policy::model::Pod>;
}

impl PolicyPod for core::Pod {
    fn convert(&self) -> Option<policy::model::Pod> {
        convert::convert_pod(self)
    }
}

impl PolicyPod for SlimPod {
    fn convert(&self) -> Option<policy::model::Pod> {
        let mut p = convert::convert_pod(&self.to_k8s())?;
        // The store's own labels: one copy per pod for the store and the model together.
        p.labels = self.labels.clone();
        Some(p)
    }
}

/// One object as last converted.
#[derive(Debug)]
struct Entry {
    /// `metadata.resourceVersion`; an object without one is converted on every pass.
    version: Option<String>,
    /// The last pass that listed the object; older entries are deleted objects.
    pass: u64,
    /// Pods only: `metadata.creationTimestamp`.
    created: Option<SystemTime>,
}

/// Entries by namespace ("" for namespaces themselves) then name: looked up by `&str` without
/// building a key per object and pass.
type Entries = HashMap<String, HashMap<String, Entry>>;

enum Seen {
    /// Converted before at this resourceVersion.
    Unchanged,
    /// New, changed or without a resourceVersion: to convert.
    Changed,
    /// A second object with the same key in one list; the first one is kept.
    Duplicate,
}

/// The cache of one kind of object.
#[derive(Debug)]
struct Kind<K> {
    entries: Entries,
    len: usize,
    /// Objects listed in the current pass.
    seen: usize,
    /// The previous list's `Arc`s by position, for those that have an entry. Weak: a replaced
    /// object's fields are freed with it, while its allocation stays so that its address cannot
    /// be taken by a new object until the next pass.
    last: Vec<Weak<K>>,
}

impl<K> Default for Kind<K> {
    fn default() -> Self {
        Kind {
            entries: HashMap::new(),
            len: 0,
            seen: 0,
            last: vec![],
        }
    }
}

impl<K: Metadata<Ty = ObjectMeta>> Kind<K> {
    fn see(&mut self, pass: u64, ns: &str, name: &str, version: Option<&str>, created: Option<SystemTime>) -> Seen {
        if let Some(e) = self.entries.get_mut(ns).and_then(|m| m.get_mut(name)) {
            if e.pass == pass {
                return Seen::Duplicate;
            }
            e.pass = pass;
            self.seen += 1;
            if version.is_some() && e.version.as_deref() == version {
                return Seen::Unchanged;
            }
            e.version = version.map(str::to_string);
            e.created = created;
            return Seen::Changed;
        }
        self.entries.entry(ns.to_string()).or_default().insert(
            name.to_string(),
            Entry {
                version: version.map(str::to_string),
                pass,
                created,
            },
        );
        self.len += 1;
        self.seen += 1;
        Seen::Changed
    }

    /// One pass over `list`: `changed` gets each object to convert (new, or another
    /// resourceVersion), keyed by `key` (None: not part of the model); returns the keys of the
    /// objects no longer listed.
    fn pass<L: Listed<K>>(
        &mut self,
        pass: u64,
        list: &[L],
        key: impl Fn(&K) -> Option<(&str, &str)>,
        created: impl Fn(&K) -> Option<SystemTime>,
        mut changed: impl FnMut(&str, &str, &K),
    ) -> Vec<(String, String)> {
        let same = |i: usize, o: &L| {
            o.shared()
                .zip(self.last.get(i))
                .is_some_and(|(a, w)| std::ptr::eq(Arc::as_ptr(a), w.as_ptr()))
        };
        let unmoved: Vec<bool> = list.iter().enumerate().map(|(i, o)| same(i, o)).collect();
        let mut next = Vec::with_capacity(list.len());
        self.seen = 0;
        for (o, unmoved) in list.iter().zip(&unmoved) {
            // The usual pass: the store's list in the same order, nearly every object the same.
            if *unmoved {
                self.seen += 1;
                next.push(o.shared().map(Arc::downgrade).unwrap_or_default());
                continue;
            }
            let obj = o.object();
            let entry = key(obj).and_then(|(ns, name)| {
                match self.see(pass, ns, name, obj.metadata().resource_version.as_deref(), created(obj)) {
                    Seen::Duplicate => return None,
                    Seen::Changed => changed(ns, name, obj),
                    Seen::Unchanged => {}
                }
                Some(())
            });
            next.push(entry.and(o.shared()).map(Arc::downgrade).unwrap_or_default());
        }
        if self.seen != self.len {
            // Some entry was not listed: the unmoved objects' entries are marked too, then
            // every unmarked one is gone.
            for (o, _) in list.iter().zip(&unmoved).filter(|(_, u)| **u) {
                if let Some((ns, name)) = key(o.object()) {
                    if let Some(e) = self.entries.get_mut(ns).and_then(|m| m.get_mut(name)) {
                        e.pass = pass;
                    }
                }
            }
        }
        self.last = next;
        self.sweep(pass)
    }

    /// Drops the entries of objects no longer listed; returns their keys.
    fn sweep(&mut self, pass: u64) -> Vec<(String, String)> {
        let mut gone = vec![];
        // Every entry was listed (the usual pass): no walk over the whole cache.
        if self.seen == self.len {
            return gone;
        }
        for (ns, names) in &mut self.entries {
            names.retain(|name, e| {
                let keep = e.pass == pass;
                if !keep {
                    gone.push((ns.clone(), name.clone()));
                }
                keep
            });
        }
        self.entries.retain(|_, names| !names.is_empty());
        self.len -= gone.len();
        gone
    }
}

/// The policy model kept across passes: an object is converted again only when its
/// resourceVersion changed (or it has none), and a store's `Arc` at the same place as in the
/// previous pass is not even read, so a pass costs about a pointer comparison per object instead
/// of deep clones and conversions of the whole cluster (issue 5: 10 000 pods). The model equals
/// [`policy::convert::convert`] of the same objects, except for the order of `pods` and
/// `policies`, which are sorted by (namespace, name): the compiler's output does not depend on
/// it, and a stable order lets its unchanged-pods check pass even after a relist reorders the
/// store. Two objects with the same (namespace, name) in one list (the API server never sends
/// that) keep the first. `P` is the pods' type: the daemon's reflector keeps [`SlimPod`]s.
#[derive(Debug)]
pub struct ModelCache<P = SlimPod> {
    model: Model,
    pass: u64,
    namespaces: Kind<core::Namespace>,
    pods: Kind<P>,
    policies: Kind<net::NetworkPolicy>,
    /// Conversion errors, reported again on every pass as a fresh conversion would.
    errors: BTreeMap<PolicyRef, PolicyError>,
}

// Not derived: a derived `Default` would require `P: Default`.
impl<P> Default for ModelCache<P> {
    fn default() -> Self {
        ModelCache {
            model: Model::default(),
            pass: 0,
            namespaces: Kind::default(),
            pods: Kind::default(),
            policies: Kind::default(),
            errors: BTreeMap::new(),
        }
    }
}

/// Applies `changes` (None: removed) to `list`, sorted by `key`, moving the unchanged items.
fn merge<T>(list: &mut Vec<T>, changes: BTreeMap<(String, String), Option<T>>, key: impl Fn(&T) -> (&str, &str)) {
    if changes.is_empty() {
        return;
    }
    let mut old = std::mem::take(list).into_iter().peekable();
    let mut out = Vec::with_capacity(old.len() + changes.len());
    for ((ns, name), new) in changes {
        let k = (ns.as_str(), name.as_str());
        while let Some(o) = old.next_if(|o| key(o) < k) {
            out.push(o);
        }
        old.next_if(|o| key(o) == k);
        out.extend(new);
    }
    out.extend(old);
    *list = out;
}

fn creation<P: PolicyPod>(p: &P) -> Option<SystemTime> {
    let ts = p.metadata().creation_timestamp.as_ref()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ts.0.as_nanosecond()).ok()?))
}

impl<P: PolicyPod> ModelCache<P> {
    /// Brings the model up to date with the objects of this pass.
    pub fn update<N, L, Q>(&mut self, objects: Objects<'_, N, L, Q>)
    where
        N: Listed<core::Namespace>,
        L: Listed<P>,
        Q: Listed<net::NetworkPolicy>,
    {
        self.pass += 1;
        let pass = self.pass;

        let model = &mut self.model;
        let gone = self.namespaces.pass(
            pass,
            objects.namespaces,
            // A namespace without a name converts to nothing.
            |n| Some(("", n.metadata.name.as_deref()?)),
            |_| None,
            |_, name, n| {
                match convert::convert_namespace(n) {
                    Some(c) => model.namespaces.insert(name.to_string(), c),
                    None => model.namespaces.remove(name),
                };
            },
        );
        for (_, name) in gone {
            model.namespaces.remove(&name);
        }

        let mut changes = BTreeMap::new();
        let gone = self.pods.pass(
            pass,
            objects.pods,
            // As `convert_pod`: no name, no model pod.
            |p| Some((convert::object_namespace(p.metadata()), p.metadata().name.as_deref()?)),
            creation,
            |ns, name, p| {
                changes.insert((ns.to_string(), name.to_string()), p.convert());
            },
        );
        changes.extend(gone.into_iter().map(|k| (k, None)));
        // Only a change gets a new allocation: the compiler knows the unchanged one by pointer.
        if !changes.is_empty() {
            merge(std::sync::Arc::make_mut(&mut model.pods), changes, |p| {
                (&p.namespace, &p.name)
            });
        }

        let mut changes = BTreeMap::new();
        let errors = &mut self.errors;
        let gone = self.policies.pass(
            pass,
            objects.policies,
            |q| {
                Some((
                    convert::object_namespace(&q.metadata),
                    q.metadata.name.as_deref().unwrap_or(""),
                ))
            },
            |_| None,
            |ns, name, q| {
                let id = PolicyRef {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                };
                let converted = match convert::convert_policy(q) {
                    Ok(c) => {
                        errors.remove(&id);
                        Some(std::sync::Arc::new(c))
                    }
                    Err(e) => {
                        errors.insert(id.clone(), e);
                        None
                    }
                };
                changes.insert((id.namespace, id.name), converted);
            },
        );
        for (namespace, name) in gone {
            errors.remove(&PolicyRef {
                namespace: namespace.clone(),
                name: name.clone(),
            });
            changes.insert((namespace, name), None);
        }
        merge(&mut model.policies, changes, |p| (&p.namespace, &p.name));
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The policies reported and left out by conversion, by (namespace, name).
    pub fn errors(&self) -> impl Iterator<Item = &PolicyError> {
        self.errors.values()
    }

    /// A listed pod's creationTimestamp.
    pub fn created(&self, namespace: &str, pod: &str) -> Option<SystemTime> {
        self.pods.entries.get(namespace)?.get(pod)?.created
    }

    /// [`Self::update`], then compiles for `node` as [`build_with`] does.
    pub fn build<N, L, Q>(
        &mut self,
        objects: Objects<'_, N, L, Q>,
        node: &str,
        veth_prefix: &str,
        nodeport: Option<NodePortCheck>,
        compiler: &mut Compiler,
    ) -> Result<PolicyBuild, PolicySyncError>
    where
        N: Listed<core::Namespace>,
        L: Listed<P>,
        Q: Listed<net::NetworkPolicy>,
    {
        let start = Instant::now();
        self.update(objects);
        let with_nodeport = nodeport.is_some();
        let ctx = policy::NodeCtx::from_model(&self.model, node, veth_prefix)?.with_nodeport(nodeport);
        let compiled = compiler.compile(&self.model, &ctx);
        let compile_time = start.elapsed();
        let workloads = ctx
            .workloads
            .iter()
            .map(|w| {
                let ts = self.created(&w.namespace, &w.pod);
                ((w.namespace.clone(), w.pod.clone()), ts)
            })
            .collect();
        let addresses = ctx
            .workloads
            .iter()
            .filter_map(|w| Some((w.ip?, (w.namespace.clone(), w.pod.clone()))))
            .collect();
        let mut errors: Vec<PolicyError> = self.errors().cloned().collect();
        errors.extend(compiled.errors);
        Ok(PolicyBuild {
            dataplane: compiled.dataplane,
            errors,
            stats: compiled.stats,
            workloads,
            addresses,
            compile_time,
            nodeport: with_nodeport,
        })
    }
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
    use serde_json::json;

    fn namespace(name: &str, rv: &str, labels: serde_json::Value) -> core::Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "resourceVersion": rv, "labels": labels}})).unwrap()
    }

    fn pod(ns: &str, name: &str, rv: &str, app: &str, node: &str, ip: &str) -> core::Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "resourceVersion": rv, "labels": {"app": app},
                         "creationTimestamp": "2024-05-01T10:00:00Z"},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip, "phase": "Running"}
        }))
        .unwrap()
    }

    /// The pods as the daemon's reflector reads them from the API's JSON.
    fn slim(pods: &[core::Pod]) -> Vec<SlimPod> {
        pods.iter()
            .map(|p| serde_json::from_value(serde_json::to_value(p).unwrap()).unwrap())
            .collect()
    }

    fn netpol(ns: &str, name: &str, rv: &str, spec: serde_json::Value) -> net::NetworkPolicy {
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": ns, "resourceVersion": rv}, "spec": spec}),
        )
        .unwrap()
    }

    /// A reflector store holding `objects`: only what differs from its content is applied, so
    /// unchanged objects keep their `Arc`s as in the daemon.
    struct Store<K: kube::Resource<DynamicType = ()> + Clone + 'static> {
        reader: kube::runtime::reflector::Store<K>,
        writer: kube::runtime::reflector::store::Writer<K>,
    }

    impl<K: kube::Resource<DynamicType = ()> + Clone + PartialEq + 'static> Store<K> {
        fn new() -> Self {
            let (reader, writer) = kube::runtime::reflector::store();
            Store { reader, writer }
        }

        fn sync(&mut self, objects: &[K]) -> Vec<Arc<K>> {
            use kube::runtime::{reflector::ObjectRef, watcher::Event};
            for o in objects {
                if self.reader.get(&ObjectRef::from_obj(o)).as_deref() != Some(o) {
                    self.writer.apply_watcher_event(&Event::Apply(o.clone()));
                }
            }
            for o in self.reader.state() {
                if !objects
                    .iter()
                    .any(|x| ObjectRef::from_obj(x) == ObjectRef::from_obj(&*o))
                {
                    self.writer.apply_watcher_event(&Event::Delete((*o).clone()));
                }
            }
            self.reader.state()
        }
    }

    /// What the daemon needs from a pass: the model, the errors and the compiled dataplane.
    fn assert_as_fresh(
        (cache, compiler): (&mut ModelCache, &mut Compiler),
        stores: &mut (Store<core::Namespace>, Store<SlimPod>, Store<net::NetworkPolicy>),
        (namespaces, pods, policies): (&[core::Namespace], &[core::Pod], &[net::NetworkPolicy]),
        step: &str,
    ) {
        let b = cache
            .build(
                Objects {
                    namespaces: &stores.0.sync(namespaces),
                    pods: &stores.1.sync(&slim(pods)),
                    policies: &stores.2.sync(policies),
                },
                "node1",
                "cali",
                None,
                compiler,
            )
            .unwrap();
        let fresh = policy::convert::convert(namespaces, pods, policies);
        let mut sorted = fresh.model.clone();
        std::sync::Arc::make_mut(&mut sorted.pods)
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        sorted.policies.sort_by_key(|p| p.id());
        assert_eq!(cache.model(), &sorted, "{step}: model");
        let want = build(namespaces, pods, policies, "node1", "cali").unwrap();
        let mut errors = b.errors.clone();
        errors.sort_by(|a, b| a.policy.cmp(&b.policy));
        let mut want_errors = want.errors.clone();
        want_errors.sort_by(|a, b| a.policy.cmp(&b.policy));
        assert_eq!(errors, want_errors, "{step}: errors");
        assert_eq!(b.workloads, want.workloads, "{step}: workloads");
        // The compiler's output does not depend on the pods' order (convert keeps the input's).
        let ctx = policy::NodeCtx::from_model(&fresh.model, "node1", "cali").unwrap();
        assert!(
            b.dataplane == policy::compile(&fresh.model, &ctx).dataplane,
            "{step}: dataplane"
        );
    }

    #[test]
    fn should_give_what_a_fresh_conversion_gives_pass_after_pass() {
        let mut cache = ModelCache::default();
        let mut compiler = Compiler::new();
        let mut nss = vec![
            namespace("a", "1", json!({"team": "x"})),
            namespace("b", "1", json!({})),
        ];
        let mut pods = vec![
            pod("a", "web", "1", "web", "node1", "10.233.90.2"),
            pod("a", "db", "1", "db", "node1", "10.233.90.3"),
            pod("b", "client", "1", "client", "node2", "10.233.91.2"),
        ];
        let mut pols = vec![netpol(
            "a",
            "db-from-web",
            "1",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}},
                                         {"namespaceSelector": {"matchLabels": {"team": "x"}}}]}]}),
        )];
        let mut stores = (Store::new(), Store::new(), Store::new());
        let mut check = |nss: &[core::Namespace], pods: &[core::Pod], pols: &[net::NetworkPolicy], step: &str| {
            assert_as_fresh((&mut cache, &mut compiler), &mut stores, (nss, pods, pols), step)
        };
        check(&nss, &pods, &pols, "first pass");
        check(&nss, &pods, &pols, "no-op pass");

        pods.push(pod("a", "web2", "1", "web", "node1", "10.233.90.4"));
        pods.push(pod("b", "host", "1", "x", "node1", "10.0.0.1"));
        pods[4].spec.as_mut().unwrap().host_network = Some(true);
        check(&nss, &pods, &pols, "pods added, one on the host network");

        pods[2] = pod("b", "client", "2", "web", "node2", "10.233.91.2");
        check(&nss, &pods, &pols, "pod relabelled");

        pods.remove(1);
        check(&nss, &pods, &pols, "pod deleted");

        pols.push(netpol(
            "b",
            "bad",
            "1",
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "nonsense"}}]}]}),
        ));
        check(&nss, &pods, &pols, "invalid policy added");
        check(&nss, &pods, &pols, "invalid policy still reported");

        pols[1] = netpol(
            "b",
            "bad",
            "2",
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}),
        );
        check(&nss, &pods, &pols, "invalid policy fixed");

        nss[1] = namespace("b", "2", json!({"team": "x"}));
        check(&nss, &pods, &pols, "namespace relabelled");

        nss.remove(0);
        pols.remove(0);
        check(&nss, &pods, &pols, "namespace and policy deleted");

        // Objects without a resourceVersion are compared by content: converted every pass.
        let mut bare = pods.clone();
        for p in &mut bare {
            p.metadata.resource_version = None;
        }
        check(&nss, &bare, &pols, "no resourceVersions");
        bare[0].metadata.labels = Some([("app".to_string(), "db".to_string())].into());
        check(&nss, &bare, &pols, "relabelled without a resourceVersion");

        check(&[], &[], &[], "everything deleted");
    }

    #[test]
    fn should_give_the_model_the_stores_own_labels() {
        let api = pod("a", "web", "7", "web", "node1", "10.233.90.2");
        let stored = &slim(std::slice::from_ref(&api))[0];
        let converted = stored.convert().expect("a pod with an address takes part");
        assert!(Arc::ptr_eq(&converted.labels, &stored.labels), "one copy of the labels");
        assert_eq!(Some(converted), convert::convert_pod(&api));
    }

    #[test]
    fn should_convert_again_only_on_a_new_resource_version() {
        let mut cache = ModelCache::default();
        let app = |c: &ModelCache| c.model().pods[0].labels.get("app").map(str::to_string);
        let update = |c: &mut ModelCache, pods: &[core::Pod]| {
            c.update(Objects::<core::Namespace, _, net::NetworkPolicy> {
                namespaces: &[],
                pods: &slim(pods),
                policies: &[],
            })
        };
        update(&mut cache, &[pod("a", "web", "7", "web", "node1", "10.233.90.2")]);
        assert_eq!(app(&cache).as_deref(), Some("web"));
        // The API server never changes an object without a new resourceVersion: the same one
        // is taken as the same object, whatever the content.
        update(&mut cache, &[pod("a", "web", "7", "db", "node1", "10.233.90.2")]);
        assert_eq!(
            app(&cache).as_deref(),
            Some("web"),
            "same resourceVersion, not converted again"
        );
        update(&mut cache, &[pod("a", "web", "8", "db", "node1", "10.233.90.2")]);
        assert_eq!(app(&cache).as_deref(), Some("db"), "new resourceVersion, new labels");
    }

    #[test]
    fn should_report_conversion_errors_and_creation_times_every_pass() {
        let mut cache = ModelCache::default();
        let mut compiler = Compiler::new();
        let pods = slim(&[pod("a", "web", "1", "web", "node1", "10.233.90.2")]);
        let pols = [netpol("a", "bad", "1", json!({"policyTypes": ["Sideways"]}))];
        for pass in 0..2 {
            let b = cache
                .build(
                    Objects::<core::Namespace, _, _> {
                        namespaces: &[],
                        pods: &pods,
                        policies: &pols,
                    },
                    "node1",
                    "cali",
                    None,
                    &mut compiler,
                )
                .unwrap();
            assert_eq!(b.errors.len(), 1, "pass {pass}");
            assert_eq!(b.errors[0].policy.to_string(), "a/bad");
            let created = b.workloads[&("a".to_string(), "web".to_string())];
            assert_eq!(
                created.and_then(|c| c.duration_since(SystemTime::UNIX_EPOCH).ok()),
                Some(Duration::from_secs(1_714_557_600)),
                "pass {pass}"
            );
        }
    }

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
