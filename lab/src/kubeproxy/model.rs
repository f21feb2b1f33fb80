//! The proxy's service model, independent of the dataplane mode.
//!
//! This is what kube-proxy's `ServicePortMap` + `EndpointsMap` hold: one [`ServiceInfo`] per
//! service *port*, with the endpoints taken from the EndpointSlices. Both the iptables renderer
//! and (later) the IPVS renderer consume it, so everything Kubernetes-object-shaped ends here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Label on an EndpointSlice naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label are meant for another proxy; kube-proxy ignores them.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API's spelling; Kubernetes defaults a missing protocol to TCP.
    pub fn from_api(p: Option<&str>) -> Option<Protocol> {
        match p.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Lower-case name, as kube-proxy uses it in hashes and in `-p`/`-m`.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

impl TrafficPolicy {
    fn from_api(p: Option<&str>) -> TrafficPolicy {
        match p {
            Some("Local") => TrafficPolicy::Local,
            _ => TrafficPolicy::Cluster,
        }
    }
}

/// One endpoint of one service port, as kube-proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ip: IpAddr,
    pub port: u16,
    /// Node the endpoint runs on; `Local` policies compare it with the proxy's node name.
    pub node_name: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl fmt::Display for EndpointInfo {
    /// `ip:port` (`[ip]:port` for IPv6), kube-proxy's endpoint string, which is hashed into
    /// KUBE-SEP names and used as the DNAT target.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// One port of one Service with its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// The service port's name; empty when the port is unnamed.
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// 0 when the service has no NodePort.
    pub node_port: u16,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    pub endpoints: Vec<EndpointInfo>,
}

impl ServiceInfo {
    /// kube-proxy's `ServicePortName.String()`: `ns/name:port`, or `ns/name` for an unnamed port.
    pub fn svc_port_name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// NodePort (or, once supported, external IPs / load-balancer IPs) exists.
    pub fn externally_accessible(&self) -> bool {
        self.node_port != 0
    }

    pub fn external_policy_local(&self) -> bool {
        self.externally_accessible() && self.external_policy == TrafficPolicy::Local
    }

    pub fn internal_policy_local(&self) -> bool {
        self.internal_policy == TrafficPolicy::Local
    }

    /// Some traffic to this port is dispatched with the `Cluster` policy.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local() || (self.externally_accessible() && !self.external_policy_local())
    }

    /// Some traffic to this port is dispatched with the `Local` policy.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local() || self.external_policy_local()
    }

    /// Builds one `ServiceInfo` per port of `service`, with the endpoints of `slices` (all
    /// slices may be passed; those of other services are ignored). Services kube-proxy does not
    /// proxy (ExternalName, headless, no cluster IP, another proxy's) give an empty list, as do
    /// ports with an unknown protocol.
    pub fn from_k8s(service: &Service, slices: &[EndpointSlice]) -> Vec<ServiceInfo> {
        let meta = &service.metadata;
        let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
            return Vec::new();
        };
        if meta
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME))
        {
            return Vec::new();
        }
        let Some(spec) = service.spec.as_ref() else {
            return Vec::new();
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return Vec::new();
        }
        let Some(cluster_ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()) else {
            // "None" (headless) and "" do not parse: nothing to proxy.
            return Vec::new();
        };
        let external_policy = TrafficPolicy::from_api(spec.external_traffic_policy.as_deref());
        let internal_policy = TrafficPolicy::from_api(spec.internal_traffic_policy.as_deref());
        let mine: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(LABEL_SERVICE_NAME))
                        .map(String::as_str)
                        == Some(name)
                    && slice_family_matches(s, cluster_ip)
            })
            .collect();
        let mut out = Vec::new();
        for sp in spec.ports.iter().flatten() {
            let Some(protocol) = Protocol::from_api(sp.protocol.as_deref()) else {
                continue;
            };
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            let node_port = sp.node_port.and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
            let port_name = sp.name.clone().unwrap_or_default();
            out.push(ServiceInfo {
                namespace: namespace.to_string(),
                name: name.to_string(),
                endpoints: endpoints_from_slices(&mine, &port_name, protocol),
                port_name,
                protocol,
                cluster_ip,
                port,
                node_port,
                external_policy,
                internal_policy,
            });
        }
        out
    }
}

fn slice_family_matches(slice: &EndpointSlice, cluster_ip: IpAddr) -> bool {
    matches!(
        (slice.address_type.as_str(), cluster_ip),
        ("IPv4", IpAddr::V4(_)) | ("IPv6", IpAddr::V6(_))
    )
}

/// Endpoints of one service port: slice ports are matched by name and protocol, as kube-proxy's
/// EndpointSliceCache keys them; duplicates across slices collapse; the result is sorted by
/// endpoint string so that renders are deterministic.
fn endpoints_from_slices(slices: &[&EndpointSlice], port_name: &str, protocol: Protocol) -> Vec<EndpointInfo> {
    let mut by_key: BTreeMap<String, EndpointInfo> = BTreeMap::new();
    for slice in slices {
        for sp in slice.ports.iter().flatten() {
            if sp.name.as_deref().unwrap_or("") != port_name
                || Protocol::from_api(sp.protocol.as_deref()) != Some(protocol)
            {
                continue;
            }
            let Some(port) = sp.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                    continue;
                };
                let cond = ep.conditions.as_ref();
                // The API says nil ready/serving means "unknown, assume ready".
                let ready = cond.and_then(|c| c.ready).unwrap_or(true);
                let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
                let info = EndpointInfo {
                    ip,
                    port,
                    node_name: ep.node_name.clone(),
                    ready,
                    serving,
                    terminating,
                };
                by_key.entry(info.to_string()).or_insert(info);
            }
        }
    }
    by_key.into_values().collect()
}

/// kube-proxy's `CategorizeEndpoints` (without topology hints, which the lab does not set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Categorized {
    /// Endpoints used with the `Cluster` policy (empty when the port never uses it).
    pub cluster: Vec<EndpointInfo>,
    /// Endpoints on this node used with the `Local` policy (empty when the port never uses it).
    pub local: Vec<EndpointInfo>,
    /// Union of the two: every endpoint this node may DNAT to.
    pub all_reachable: Vec<EndpointInfo>,
    /// The service has a usable endpoint somewhere in the cluster.
    pub has_any: bool,
}

/// Splits a port's endpoints the way kube-proxy does: ready ones, falling back to
/// serving-and-terminating ones when none is ready (separately for Cluster and Local).
pub fn categorize_endpoints(svc: &ServiceInfo, node_name: &str) -> Categorized {
    let eps = &svc.endpoints;
    let is_local = |e: &EndpointInfo| e.node_name.as_deref() == Some(node_name);
    let mut out = Categorized::default();
    let mut used_terminating = false;
    if svc.uses_cluster_endpoints() {
        out.cluster = eps.iter().filter(|e| e.ready).cloned().collect();
        if out.cluster.is_empty() {
            out.cluster = eps.iter().filter(|e| e.serving && e.terminating).cloned().collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !svc.uses_local_endpoints() {
        out.all_reachable = out.cluster.clone();
        return out;
    }
    let has_local_ready = eps.iter().any(|e| e.ready && is_local(e));
    let has_local_serving_terminating = eps.iter().any(|e| e.serving && e.terminating && is_local(e));
    if eps.iter().any(|e| e.ready || (e.serving && e.terminating)) {
        out.has_any = true;
    }
    if has_local_ready {
        out.local = eps.iter().filter(|e| e.ready && is_local(e)).cloned().collect();
    } else if has_local_serving_terminating {
        used_terminating = true;
        out.local = eps
            .iter()
            .filter(|e| e.serving && e.terminating && is_local(e))
            .cloned()
            .collect();
    }
    if !svc.uses_cluster_endpoints() {
        out.all_reachable = out.local.clone();
        return out;
    }
    if !used_terminating {
        // Cluster holds every ready endpoint, so it contains every local ready one.
        out.all_reachable = out.cluster.clone();
        return out;
    }
    let mut seen = BTreeSet::new();
    out.all_reachable = out
        .cluster
        .iter()
        .chain(out.local.iter())
        .filter(|e| seen.insert(e.to_string()))
        .cloned()
        .collect();
    out
}

/// Everything a proxy mode needs to program one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyInput {
    pub node_name: String,
    /// The node's addresses. iptables mode matches NodePorts on every local address
    /// (`--nodeport-addresses` unset), so it does not need them; IPVS mode binds them.
    pub node_ips: Vec<IpAddr>,
    /// kubespray's `clusterCIDR`: ClusterIP traffic from outside it is masqueraded, and with
    /// `externalTrafficPolicy: Local` pods inside it short-circuit to the Cluster chain.
    pub cluster_cidr: Option<IpNet>,
    pub services: Vec<ServiceInfo>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// Mode-specific knobs that kube-proxy detects on the host.
    pub options: HostOptions,
}

/// What kube-proxy learns from the host at start-up (defaults: a current kernel and iptables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostOptions {
    /// iptables ≥ 1.6.2: MASQUERADE gets `--random-fully`.
    pub random_fully: bool,
    /// `--iptables-localhost-nodeports` (default true): NodePorts answer on 127.0.0.0/8, which
    /// needs `route_localnet` and the KUBE-FIREWALL anti-martian rule.
    pub localhost_nodeports: bool,
    /// `net.netfilter.nf_conntrack_tcp_be_liberal` is set: no INVALID-drop rule.
    pub conntrack_tcp_liberal: bool,
    /// `--iptables-masquerade-bit` (default 14, i.e. mark 0x4000).
    pub masquerade_bit: u8,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            random_fully: true,
            localhost_nodeports: true,
            conntrack_tcp_liberal: false,
            masquerade_bit: 14,
        }
    }
}

impl ProxyInput {
    /// Builds the input from the API objects the proxy watches.
    pub fn from_k8s(
        node_name: &str,
        node_ips: Vec<IpAddr>,
        cluster_cidr: Option<IpNet>,
        services: &[Service],
        slices: &[EndpointSlice],
    ) -> ProxyInput {
        let mut infos: Vec<ServiceInfo> = services.iter().flat_map(|s| ServiceInfo::from_k8s(s, slices)).collect();
        infos.sort_by_key(|s| (s.svc_port_name(), s.protocol));
        ProxyInput {
            node_name: node_name.to_string(),
            node_ips,
            cluster_cidr,
            services: infos,
            masquerade_all: false,
            options: HostOptions::default(),
        }
    }
}
