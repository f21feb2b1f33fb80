//! An in-memory netfilter for the compiled output: parses the rendered rule strings of a
//! `DesiredDataplane` and runs packets through the hooks, chains, marks and ipsets the way the
//! kernel does (first match wins, `-j` returns, `-g` does not, hash:net prefers the most specific
//! entry and `nomatch` entries exclude).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use conf::dataplane::{DesiredDataplane, Table};
use ipnet::Ipv4Net;

use crate::rule::{Action, CtState, Match, ParseError, Rule, SetDir};

/// A packet as netfilter sees it in one hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IP protocol number.
    pub proto: u8,
    pub dport: Option<u16>,
    /// ICMP (type, code).
    pub icmp: Option<(u8, u8)>,
    /// None for locally generated packets (OUTPUT).
    pub in_iface: Option<String>,
    /// None for packets to this host (INPUT).
    pub out_iface: Option<String>,
    pub ct: CtState,
    /// The connection's destination was translated (a service's DNAT or IPVS).
    pub dnat: bool,
    /// The source is one of this host's addresses (true for what the host itself sends).
    pub src_local: bool,
    /// The mark the packet carries when it reaches the filter table (e.g. kube-proxy's
    /// masquerade bit, set in nat PREROUTING).
    pub mark: u32,
}

impl Packet {
    pub fn l4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, dport: u16) -> Packet {
        Packet {
            src,
            dst,
            proto,
            dport: Some(dport),
            icmp: None,
            in_iface: None,
            out_iface: None,
            ct: CtState::New,
            dnat: false,
            src_local: false,
            mark: 0,
        }
    }

    /// Through these interfaces; a packet without an input interface is the host's own.
    pub fn via(mut self, in_iface: Option<&str>, out_iface: Option<&str>) -> Packet {
        self.in_iface = in_iface.map(str::to_string);
        self.out_iface = out_iface.map(str::to_string);
        self.src_local = in_iface.is_none();
        self
    }

    /// As a service translated it: destination rewritten, carrying `mark` (kube-proxy's
    /// masquerade bit when it will SNAT the connection).
    pub fn translated(mut self, mark: u32) -> Packet {
        self.dnat = true;
        self.mark = mark;
        self
    }

    /// Sent out by IPVS on behalf of a remote client: OUTPUT path, foreign source.
    pub fn forwarded_by_ipvs(mut self) -> Packet {
        self.src_local = false;
        self
    }

    /// The built-in filter chain the packet traverses.
    pub fn hook(&self) -> &'static str {
        match (&self.in_iface, &self.out_iface) {
            (None, _) => "OUTPUT",
            (_, None) => "INPUT",
            _ => "FORWARD",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    /// Nothing of warren's decided; the built-in chain goes on (its policy, usually ACCEPT).
    Continue,
}

/// What happened to a packet, for tests and for "why?" answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub verdict: Verdict,
    /// Mark at the end.
    pub mark: u32,
    /// Chains entered, in order.
    pub chains: Vec<String>,
    /// Comment of the last rule that matched and carried one.
    pub last_comment: Option<String>,
    /// Comment of the last mark-setting rule with a comment (a policy rule that allowed).
    pub marked_by: Option<String>,
    /// Comments of every mark-setting rule that fired, in order (egress, then ingress).
    pub marks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("chain {0} jumps to missing chain {1}")]
    MissingChain(String, String),
    #[error("rule refers to missing ipset {0}")]
    MissingSet(String),
    #[error("ipset {0}: bad member {1:?}")]
    BadMember(String, String),
    #[error("ipset {0}: unsupported type {1}")]
    BadSetType(String, String),
}

enum SetIndex {
    Net(Vec<(Ipv4Net, bool)>),
    Ip(std::collections::HashSet<Ipv4Addr>),
    IpPort(std::collections::HashSet<(Ipv4Addr, u8, u16)>),
    /// `hash:net,iface`: (network, interface name).
    NetIface(Vec<(Ipv4Net, String)>),
    /// `list:set`: the member sets' names; a packet is in it when it is in any of them, each
    /// tested with the same direction flags (a `nomatch` answer of one member is "not in that
    /// member", and the next one is asked).
    List(Vec<String>),
}

impl SetIndex {
    fn contains(&self, pkt: &Packet, dir: SetDir) -> bool {
        let ip = match dir {
            SetDir::Src | SetDir::SrcSrc => pkt.src,
            SetDir::Dst | SetDir::DstDst => pkt.dst,
        };
        let (proto, port) = (pkt.proto, pkt.dport);
        match self {
            SetIndex::Net(entries) => {
                // Most specific entry decides; a `nomatch` entry means "not in the set".
                entries
                    .iter()
                    .filter(|(n, _)| n.contains(&ip))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .is_some_and(|(_, nomatch)| !nomatch)
            }
            SetIndex::Ip(s) => s.contains(&ip),
            SetIndex::IpPort(s) => dir == SetDir::DstDst && port.is_some_and(|port| s.contains(&(ip, proto, port))),
            // The interface is the input one for `src,src`, the output one for `dst,dst`; a
            // packet without it (OUTPUT has no input interface) does not match, as in xt_set.
            SetIndex::NetIface(entries) => {
                let iface = match dir {
                    SetDir::SrcSrc => pkt.in_iface.as_deref(),
                    SetDir::DstDst => pkt.out_iface.as_deref(),
                    SetDir::Src | SetDir::Dst => None,
                };
                iface.is_some_and(|i| entries.iter().any(|(n, e)| n.contains(&ip) && e == i))
            }
            // Resolved by the interpreter, which holds the member sets.
            SetIndex::List(_) => false,
        }
    }
}

/// The filter table of one node, ready to run packets.
pub struct Interpreter {
    chains: HashMap<String, Vec<Rule>>,
    hooks: HashMap<String, Vec<Rule>>,
    sets: HashMap<String, SetIndex>,
}

enum Flow {
    Verdict(Verdict),
    /// The current chain returns to its caller.
    Return,
    /// Go on with the next rule.
    Next,
}

impl Interpreter {
    pub fn new(dp: &DesiredDataplane) -> Result<Interpreter, InterpError> {
        let mut chains = HashMap::new();
        for ((table, name), rules) in &dp.chains {
            if *table != Table::Filter {
                continue;
            }
            let parsed = rules.iter().map(|r| Rule::parse(r)).collect::<Result<Vec<_>, _>>()?;
            chains.insert(name.clone(), parsed);
        }
        let mut hooks: HashMap<String, Vec<Rule>> = HashMap::new();
        // Hooks inserted first run before appended ones.
        let mut ordered: Vec<_> = dp.hooks.iter().filter(|h| h.table == Table::Filter).collect();
        ordered.sort_by_key(|h| !h.first);
        for h in ordered {
            hooks.entry(h.chain.clone()).or_default().push(Rule::parse(&h.rule)?);
        }
        let mut sets = HashMap::new();
        for (name, spec) in &dp.ipsets {
            let bad = |m: &str| InterpError::BadMember(name.clone(), m.to_string());
            let idx = match spec.kind.as_str() {
                "hash:net" => {
                    let mut v = vec![];
                    for m in &spec.members {
                        let (net, nomatch) = match m.strip_suffix(" nomatch") {
                            Some(n) => (n, true),
                            None => (m.as_str(), false),
                        };
                        let net = net
                            .parse::<Ipv4Net>()
                            .or_else(|_| net.parse::<Ipv4Addr>().map(Ipv4Net::from))
                            .map_err(|_| bad(m))?;
                        // ipset refuses /0 in hash:net; so must a faithful model.
                        if net.prefix_len() == 0 {
                            return Err(bad(m));
                        }
                        v.push((net, nomatch));
                    }
                    SetIndex::Net(v)
                }
                "hash:ip" => SetIndex::Ip(
                    spec.members
                        .iter()
                        .map(|m| m.parse().map_err(|_| bad(m)))
                        .collect::<Result<_, _>>()?,
                ),
                "hash:ip,port" => {
                    let mut s = std::collections::HashSet::new();
                    for m in &spec.members {
                        let (ip, pp) = m.split_once(',').ok_or_else(|| bad(m))?;
                        let (proto, port) = pp.split_once(':').ok_or_else(|| bad(m))?;
                        let proto = match proto {
                            "tcp" => 6,
                            "udp" => 17,
                            "sctp" => 132,
                            _ => return Err(bad(m)),
                        };
                        s.insert((
                            ip.parse().map_err(|_| bad(m))?,
                            proto,
                            port.parse().map_err(|_| bad(m))?,
                        ));
                    }
                    SetIndex::IpPort(s)
                }
                "hash:net,iface" => {
                    let mut v = vec![];
                    for m in &spec.members {
                        let (net, iface) = m.split_once(',').ok_or_else(|| bad(m))?;
                        let net = net
                            .parse::<Ipv4Net>()
                            .or_else(|_| net.parse::<Ipv4Addr>().map(Ipv4Net::from))
                            .map_err(|_| bad(m))?;
                        // The kernel's limit: IFNAMSIZ less the terminating NUL.
                        if iface.is_empty() || iface.len() > 15 || net.prefix_len() == 0 {
                            return Err(bad(m));
                        }
                        v.push((net, iface.to_string()));
                    }
                    SetIndex::NetIface(v)
                }
                "list:set" => SetIndex::List(spec.members.iter().cloned().collect()),
                other => return Err(InterpError::BadSetType(name.clone(), other.to_string())),
            };
            sets.insert(name.clone(), idx);
        }
        // As the kernel: a list:set's members exist and are not lists themselves.
        for (name, idx) in &sets {
            if let SetIndex::List(members) = idx {
                for m in members {
                    match sets.get(m) {
                        None => return Err(InterpError::MissingSet(m.clone())),
                        Some(SetIndex::List(_)) => return Err(InterpError::BadMember(name.clone(), m.clone())),
                        Some(_) => {}
                    }
                }
            }
        }
        let me = Interpreter { chains, hooks, sets };
        for (name, rules) in me.chains.iter().chain(me.hooks.iter()) {
            for r in rules {
                if let Action::Jump(t) | Action::Goto(t) = &r.action {
                    if !me.chains.contains_key(t) {
                        return Err(InterpError::MissingChain(name.clone(), t.clone()));
                    }
                }
                for m in &r.matches {
                    if let Match::Set { name, .. } = m {
                        if !me.sets.contains_key(name) {
                            return Err(InterpError::MissingSet(name.clone()));
                        }
                    }
                }
            }
        }
        Ok(me)
    }

    /// Runs the packet through the built-in chain its interfaces imply.
    pub fn run(&self, pkt: &Packet) -> Trace {
        let mut t = Trace {
            verdict: Verdict::Continue,
            mark: pkt.mark,
            chains: vec![],
            last_comment: None,
            marked_by: None,
            marks: vec![],
        };
        let hook = pkt.hook();
        for r in self.hooks.get(hook).map(Vec::as_slice).unwrap_or(&[]) {
            if let Flow::Verdict(v) = self.apply(r, pkt, &mut t, 0) {
                t.verdict = v;
                return t;
            }
        }
        t
    }

    /// Runs the packet through one chain as if jumped to; for `WARREN-INGRESS-BY-DST` queries.
    pub fn run_chain(&self, chain: &str, pkt: &Packet) -> Trace {
        let mut t = Trace {
            verdict: Verdict::Continue,
            mark: pkt.mark,
            chains: vec![],
            last_comment: None,
            marked_by: None,
            marks: vec![],
        };
        if let Flow::Verdict(v) = self.exec(chain, pkt, &mut t, 0) {
            t.verdict = v;
        }
        t
    }

    fn exec(&self, chain: &str, pkt: &Packet, t: &mut Trace, depth: usize) -> Flow {
        t.chains.push(chain.to_string());
        // The compiler never nests deeply; a loop would be a compiler bug, and dropping is the
        // fail-closed reading of it.
        if depth > 32 {
            return Flow::Verdict(Verdict::Drop);
        }
        for r in self.chains.get(chain).map(Vec::as_slice).unwrap_or(&[]) {
            match self.apply(r, pkt, t, depth) {
                Flow::Next => {}
                other => return other,
            }
        }
        Flow::Return
    }

    fn apply(&self, r: &Rule, pkt: &Packet, t: &mut Trace, depth: usize) -> Flow {
        if !self.matches(r, pkt, t.mark) {
            return Flow::Next;
        }
        if let Some(c) = &r.comment {
            t.last_comment = Some(c.clone());
        }
        match &r.action {
            Action::Accept => Flow::Verdict(Verdict::Accept),
            Action::Drop => Flow::Verdict(Verdict::Drop),
            Action::Return => Flow::Return,
            Action::Jump(c) => match self.exec(c, pkt, t, depth + 1) {
                Flow::Verdict(v) => Flow::Verdict(v),
                _ => Flow::Next,
            },
            // A goto's chain returns straight to our caller.
            Action::Goto(c) => match self.exec(c, pkt, t, depth + 1) {
                Flow::Verdict(v) => Flow::Verdict(v),
                _ => Flow::Return,
            },
            Action::SetMark { value, mask } => {
                t.mark = (t.mark & !mask) ^ value;
                // A mark set by an uncommented rule (WARREN-ALLOW's) belongs to the rule that
                // led there: the last commented rule that matched, i.e. the policy rule's goto.
                if let (Some(c), true) = (r.comment.as_ref().or(t.last_comment.as_ref()), *value != 0) {
                    t.marked_by = Some(c.clone());
                    t.marks.push(c.clone());
                }
                Flow::Next
            }
        }
    }

    fn matches(&self, r: &Rule, pkt: &Packet, mark: u32) -> bool {
        let iface = |want: &str, got: &Option<String>| match got {
            None => false,
            Some(g) => match want.strip_suffix('+') {
                Some(prefix) => g.starts_with(prefix),
                None => g == want,
            },
        };
        r.matches.iter().all(|m| match m {
            Match::InIface { name, negate } => iface(name, &pkt.in_iface) != *negate,
            Match::OutIface { name, negate } => iface(name, &pkt.out_iface) != *negate,
            Match::Src { net, negate } => net.contains(&pkt.src) != *negate,
            Match::Dst { net, negate } => net.contains(&pkt.dst) != *negate,
            Match::Proto(p) => pkt.proto == *p,
            Match::DPort { lo, hi } => pkt.dport.is_some_and(|d| (*lo..=*hi).contains(&d)),
            Match::DPorts(ranges) => pkt
                .dport
                .is_some_and(|d| ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&d))),
            Match::IcmpType { ty, code } => pkt.proto == 1 && pkt.icmp == Some((*ty, *code)),
            Match::Set { name, dir, negate } => {
                let hit = match self.sets.get(name) {
                    Some(SetIndex::List(members)) => members
                        .iter()
                        .any(|m| self.sets.get(m).is_some_and(|s| s.contains(pkt, *dir))),
                    Some(s) => s.contains(pkt, *dir),
                    None => false,
                };
                hit != *negate
            }
            Match::Mark { value, mask, negate } => ((mark & mask) == *value) != *negate,
            Match::CtState(states) => states.iter().any(|s| *s == pkt.ct || (*s == CtState::Dnat && pkt.dnat)),
            Match::SrcLocal { negate } => pkt.src_local != *negate,
        })
    }
}
