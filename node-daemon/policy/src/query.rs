//! Questions answered from the compiled rules themselves (not from the model), so the answer is
//! what the kernel would do: "does the ingress policy of the pod at this destination IP allow
//! this source?" on any node, and which policy rule decided.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use crate::compile::{compile, parse_rule_comment, Compiled, NodeCtx, CHAIN_INGRESS_BY_DST, MARK_ACCEPT};
use crate::interp::{InterpError, Interpreter, Packet, Verdict};
use crate::model::{Direction, Model, PolicyRef, Protocol};
use crate::reference::{Endpoint, RuleRef, L4};
use crate::rule::CtState;

/// The answer to an ingress question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy rule that allowed the packet; None when the destination is not isolated (or
    /// not a pod) or when the packet is denied.
    pub by: Option<RuleRef>,
    /// Policies whose chains the packet went through (the ones that isolate the destination).
    pub evaluated: Vec<PolicyRef>,
}

impl Decision {
    /// A sentence for logs and the future "why was this dropped?" command.
    pub fn explain(&self) -> String {
        match (&self.by, self.allowed) {
            (Some(r), _) => format!(
                "allowed by {} rule {} of NetworkPolicy {}",
                r.direction.name(),
                r.index,
                r.policy
            ),
            (None, true) => "allowed: the destination is not isolated for ingress".to_string(),
            (None, false) => {
                let names: Vec<String> = self.evaluated.iter().map(|p| p.to_string()).collect();
                format!("denied: no rule of {} allows it", names.join(", "))
            }
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.explain())
    }
}

fn packet(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Packet {
    match l4 {
        Some((p, port)) => Packet::l4(src, dst, p.number(), port),
        None => Packet {
            src,
            dst,
            proto: 1,
            dport: None,
            icmp: Some((8, 0)),
            in_iface: None,
            out_iface: None,
            ct: CtState::New,
            dnat: false,
            src_local: false,
            mark: 0,
        },
    }
}

/// A compiled node ready for questions.
pub struct NodeView {
    pub compiled: Compiled,
    pub interp: Interpreter,
}

impl NodeView {
    pub fn new(compiled: Compiled) -> Result<NodeView, InterpError> {
        let interp = Interpreter::new(&compiled.dataplane)?;
        Ok(NodeView { compiled, interp })
    }

    /// Runs `WARREN-INGRESS-BY-DST` for the packet.
    pub fn ingress_allows(&self, dst_pod_ip: Ipv4Addr, src_ip: Ipv4Addr, l4: L4) -> Decision {
        let t = self
            .interp
            .run_chain(CHAIN_INGRESS_BY_DST, &packet(src_ip, dst_pod_ip, l4));
        let mut evaluated = vec![];
        for c in &t.chains {
            if let Some((p, Direction::Ingress)) = self.compiled.policy_chains.get(c) {
                if !evaluated.contains(p) {
                    evaluated.push(p.clone());
                }
            }
        }
        let allowed = t.verdict != Verdict::Drop && t.mark & MARK_ACCEPT != 0;
        let by = if allowed {
            t.marked_by
                .as_deref()
                .and_then(parse_rule_comment)
                .map(|(policy, direction, index)| RuleRef {
                    policy,
                    direction,
                    index,
                })
        } else {
            None
        };
        Decision { allowed, by, evaluated }
    }
}

/// Why a packet got the verdict it got on one node: the shape the "why was this dropped?"
/// feature reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketExplanation {
    pub verdict: Verdict,
    /// The comment of the last rule that matched (e.g. "unknown workload interface or spoofed source", "no ingress policy allowed").
    pub reason: Option<String>,
    /// Policy rules that allowed the packet on its way (egress of the source, ingress of the destination).
    pub allowed_by: Vec<RuleRef>,
    /// Policies whose chains the packet went through.
    pub evaluated: Vec<(PolicyRef, Direction)>,
}

impl fmt::Display for PacketExplanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = match self.verdict {
            Verdict::Accept => "accepted",
            Verdict::Drop => "dropped",
            Verdict::Continue => "not decided by warren",
        };
        write!(f, "{v}")?;
        if let Some(r) = &self.reason {
            write!(f, " ({r})")?;
        }
        for r in &self.allowed_by {
            write!(
                f,
                "; allowed by {} rule {} of {}",
                r.direction.name(),
                r.index,
                r.policy
            )?;
        }
        if self.verdict == Verdict::Drop && !self.evaluated.is_empty() {
            let names: Vec<String> = self
                .evaluated
                .iter()
                .map(|(p, d)| format!("{p} ({})", d.name()))
                .collect();
            write!(f, "; policies evaluated: {}", names.join(", "))?;
        }
        Ok(())
    }
}

impl NodeView {
    /// Runs a packet through this node's hooks and says why it ended as it did.
    pub fn explain(&self, pkt: &Packet) -> PacketExplanation {
        let t = self.interp.run(pkt);
        let mut evaluated = vec![];
        for c in &t.chains {
            if let Some(pd) = self.compiled.policy_chains.get(c) {
                if !evaluated.contains(pd) {
                    evaluated.push(pd.clone());
                }
            }
        }
        PacketExplanation {
            verdict: t.verdict,
            reason: t.last_comment,
            allowed_by: t
                .marks
                .iter()
                .filter_map(|c| parse_rule_comment(c))
                .map(|(policy, direction, index)| RuleRef {
                    policy,
                    direction,
                    index,
                })
                .collect(),
            evaluated,
        }
    }
}

/// Does the ingress policy of the pod at `dst_pod_ip` allow `src_ip` on `proto`/`port`? Compiles
/// the model for a node without workloads, which shows that any node can answer. For repeated
/// questions build a [`NodeView`] once.
pub fn ingress_allows(
    model: &Model,
    dst_pod_ip: Ipv4Addr,
    src_ip: Ipv4Addr,
    proto: Protocol,
    port: u16,
) -> Result<Decision, InterpError> {
    let view = NodeView::new(compile(model, &NodeCtx::empty("any")))?;
    Ok(view.ingress_allows(dst_pod_ip, src_ip, Some((proto, port))))
}

/// Every node of a model compiled and interpreted, to send packets along the path a real
/// cluster would (veth → FORWARD → tunl0 → FORWARD → veth, INPUT, OUTPUT).
pub struct ClusterSim<'m> {
    pub model: &'m Model,
    pub nodes: BTreeMap<String, NodeView>,
    ifaces: BTreeMap<usize, String>,
}

/// The interface that leads off-node in the simulation.
pub const UPLINK: &str = "eth0";
/// The IPIP tunnel (pod-to-pod across nodes).
pub const TUNNEL: &str = conf::names::TUNNEL_IFACE;

impl<'m> ClusterSim<'m> {
    pub fn new(model: &'m Model, nodes: &[&str], veth_prefix: &str) -> Result<ClusterSim<'m>, String> {
        let mut views = BTreeMap::new();
        let mut ifaces = BTreeMap::new();
        for n in nodes {
            let ctx = NodeCtx::from_model(model, n, veth_prefix).map_err(|e| e.to_string())?;
            for w in &ctx.workloads {
                if let Some(i) = model
                    .pods
                    .iter()
                    .position(|p| p.namespace == w.namespace && p.name == w.pod)
                {
                    ifaces.insert(i, w.iface.clone());
                }
            }
            let view = NodeView::new(compile(model, &ctx)).map_err(|e| e.to_string())?;
            views.insert(n.to_string(), view);
        }
        Ok(ClusterSim {
            model,
            nodes: views,
            ifaces,
        })
    }

    fn hop(&self, node: &str, pkt: Packet) -> bool {
        self.nodes
            .get(node)
            .is_none_or(|v| v.interp.run(&pkt).verdict != Verdict::Drop)
    }

    /// Whether a new connection gets through every hop of its path.
    pub fn allowed(&self, src: &Endpoint, dst: &Endpoint, l4: L4) -> bool {
        self.send(src, dst, l4, CtState::New)
    }

    /// Same path with a given conntrack state (replies: `Established`).
    pub fn send(&self, src: &Endpoint, dst: &Endpoint, l4: L4, ct: CtState) -> bool {
        let (Some(s), Some(d)) = (src.ip(self.model), dst.ip(self.model)) else {
            return false;
        };
        let mut base = packet(s, d, l4);
        base.ct = ct;
        let pod = |e: &Endpoint| match e {
            Endpoint::Pod(i) => Some((
                self.model.pods[*i].node.as_str(),
                self.ifaces.get(i).map(String::as_str),
            )),
            _ => None,
        };
        fn host(e: &Endpoint) -> Option<&str> {
            match e {
                Endpoint::Host { node, .. } => Some(node.as_str()),
                _ => None,
            }
        }
        match (pod(src), pod(dst), host(src), host(dst)) {
            (Some((na, ia)), Some((nb, ib)), _, _) => {
                if na == nb {
                    self.hop(na, base.via(ia, ib))
                } else {
                    self.hop(na, base.clone().via(ia, Some(TUNNEL))) && self.hop(nb, base.via(Some(TUNNEL), ib))
                }
            }
            (Some((na, ia)), None, _, Some(nh)) if na == nh => self.hop(na, base.via(ia, None)),
            (Some((na, ia)), None, _, _) => self.hop(na, base.via(ia, Some(UPLINK))),
            (None, Some((nb, ib)), Some(nh), _) if nh == nb => self.hop(nb, base.via(None, ib)),
            (None, Some((nb, ib)), _, _) => self.hop(nb, base.via(Some(UPLINK), ib)),
            _ => true,
        }
    }

    pub fn iface_of(&self, pod: usize) -> Option<&str> {
        self.ifaces.get(&pod).map(String::as_str)
    }
}
