//! A structured iptables rule (matches + action) covering exactly what the compiler emits. It
//! renders to the argument string `DesiredDataplane` carries and parses that string back, so the
//! interpreter runs the very text the writer hands to `iptables-restore`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Which packet fields an ipset lookup uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetDir {
    Src,
    Dst,
    /// `src,src`: source address and input interface (for `hash:net,iface`).
    SrcSrc,
    /// `dst,dst`: destination address and destination port (for `hash:ip,port`), or
    /// destination address and output interface (for `hash:net,iface`).
    DstDst,
}

impl SetDir {
    fn text(self) -> &'static str {
        match self {
            SetDir::Src => "src",
            SetDir::Dst => "dst",
            SetDir::SrcSrc => "src,src",
            SetDir::DstDst => "dst,dst",
        }
    }
}

/// Ports one `-m multiport` match can hold (`XT_MULTI_PORTS`).
pub const MULTIPORT_SLOTS: usize = 15;

/// The slots `ranges` take in a multiport match: a single port one, a range two.
pub fn multiport_slots(ranges: &[(u16, u16)]) -> usize {
    ranges.iter().map(|(lo, hi)| if lo == hi { 1 } else { 2 }).sum()
}

fn port_range(lo: u16, hi: u16) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}:{hi}")
    }
}

fn parse_port_range(d: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match d.split_once(':') {
        Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
        None => (d.parse().ok()?, d.parse().ok()?),
    };
    (lo <= hi).then_some((lo, hi))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// `-i name` (a trailing `+` is a prefix wildcard, as in iptables).
    InIface {
        name: String,
        negate: bool,
    },
    OutIface {
        name: String,
        negate: bool,
    },
    Src {
        net: Ipv4Net,
        negate: bool,
    },
    Dst {
        net: Ipv4Net,
        negate: bool,
    },
    /// `-p <name or number>`; IP protocol number.
    Proto(u8),
    /// `-m <tcp|udp|sctp> --dport lo[:hi]`; must follow the matching `Proto`.
    DPort {
        lo: u16,
        hi: u16,
    },
    /// `-m multiport --dports a,b,lo:hi`; must follow the matching `Proto`. The kernel holds at
    /// most [`MULTIPORT_SLOTS`] ports, a range taking two.
    DPorts(Vec<(u16, u16)>),
    /// `-m icmp --icmp-type type/code`.
    IcmpType {
        ty: u8,
        code: u8,
    },
    Set {
        name: String,
        dir: SetDir,
        negate: bool,
    },
    /// `-m mark --mark value/mask`.
    Mark {
        value: u32,
        mask: u32,
        negate: bool,
    },
    /// `-m conntrack --ctstate A,B`.
    CtState(Vec<CtState>),
    /// `-m addrtype [!] --src-type LOCAL`: the source is one of this host's addresses. In OUTPUT
    /// it tells host-originated packets from those IPVS forwards on another host's behalf.
    SrcLocal {
        negate: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CtState {
    New,
    Established,
    Related,
    Invalid,
    /// The connection's destination was translated (kube-proxy's DNAT to a service endpoint).
    Dnat,
}

impl CtState {
    fn text(self) -> &'static str {
        match self {
            CtState::New => "NEW",
            CtState::Established => "ESTABLISHED",
            CtState::Related => "RELATED",
            CtState::Invalid => "INVALID",
            CtState::Dnat => "DNAT",
        }
    }
    fn parse(s: &str) -> Option<CtState> {
        [
            CtState::New,
            CtState::Established,
            CtState::Related,
            CtState::Invalid,
            CtState::Dnat,
        ]
        .into_iter()
        .find(|c| c.text() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    /// `-j MARK --set-xmark value/mask`.
    SetMark {
        value: u32,
        mask: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Rendered first, as `-m comment --comment "…"`; names the Kubernetes object a rule comes
    /// from so that "why was this dropped?" can be answered from the kernel's own rules.
    pub comment: Option<String>,
    pub matches: Vec<Match>,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse rule {rule:?}: {reason}")]
pub struct ParseError {
    pub rule: String,
    pub reason: String,
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

fn proto_parse(s: &str) -> Option<u8> {
    match s {
        "icmp" => Some(1),
        "tcp" => Some(6),
        "udp" => Some(17),
        "sctp" => Some(132),
        "ipencap" => Some(4),
        n => n.parse().ok(),
    }
}

impl Rule {
    pub fn new(matches: Vec<Match>, action: Action) -> Rule {
        Rule {
            comment: None,
            matches,
            action,
        }
    }

    pub fn commented(mut self, c: impl Into<String>) -> Rule {
        // Comments go through iptables-restore's quoting; keep them to characters that need none.
        let c: String = c
            .into()
            .chars()
            .map(|ch| {
                if ch == '"' || ch == '\\' || ch.is_control() {
                    '_'
                } else {
                    ch
                }
            })
            .take(256)
            .collect();
        self.comment = Some(c);
        self
    }

    /// The arguments after `-A <chain>`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let neg = |b: bool| if b { "! " } else { "" };
        // iptables-save order: the IP header matches first (-s, -d, -i, -o, -p), then modules in
        // the order given, so that rules read back from the kernel compare equal as text.
        let rank = |m: &Match| match m {
            Match::Src { .. } => 0,
            Match::Dst { .. } => 1,
            Match::InIface { .. } => 2,
            Match::OutIface { .. } => 3,
            Match::Proto(_) => 4,
            _ => 5,
        };
        let mut ordered: Vec<&Match> = self.matches.iter().collect();
        ordered.sort_by_key(|m| rank(m));
        let mut comment_done = false;
        let mut last_proto = 0u8;
        for m in ordered {
            if rank(m) == 5 && !comment_done {
                comment_done = true;
                if let Some(c) = &self.comment {
                    write_comment(&mut out, c);
                }
            }
            match m {
                Match::InIface { name, negate } => {
                    let _ = write!(out, "{}-i {name} ", neg(*negate));
                }
                Match::OutIface { name, negate } => {
                    let _ = write!(out, "{}-o {name} ", neg(*negate));
                }
                Match::Src { net, negate } => {
                    let _ = write!(out, "{}-s {net} ", neg(*negate));
                }
                Match::Dst { net, negate } => {
                    let _ = write!(out, "{}-d {net} ", neg(*negate));
                }
                Match::Proto(p) => {
                    last_proto = *p;
                    let _ = write!(out, "-p {} ", proto_name(*p));
                }
                Match::DPort { lo, hi } => {
                    let _ = write!(out, "-m {} --dport {} ", proto_name(last_proto), port_range(*lo, *hi));
                }
                Match::DPorts(ranges) => {
                    let list: Vec<String> = ranges.iter().map(|(lo, hi)| port_range(*lo, *hi)).collect();
                    let _ = write!(out, "-m multiport --dports {} ", list.join(","));
                }
                Match::IcmpType { ty, code } => {
                    let _ = write!(out, "-m icmp --icmp-type {ty}/{code} ");
                }
                Match::Set { name, dir, negate } => {
                    let _ = write!(out, "-m set {}--match-set {name} {} ", neg(*negate), dir.text());
                }
                Match::Mark { value, mask, negate } => {
                    let _ = write!(out, "-m mark {}--mark {value:#x}/{mask:#x} ", neg(*negate));
                }
                Match::CtState(states) => {
                    let s: Vec<&str> = states.iter().map(|s| s.text()).collect();
                    let _ = write!(out, "-m conntrack --ctstate {} ", s.join(","));
                }
                Match::SrcLocal { negate } => {
                    let _ = write!(out, "-m addrtype {}--src-type LOCAL ", neg(*negate));
                }
            }
        }
        if !comment_done {
            if let Some(c) = &self.comment {
                write_comment(&mut out, c);
            }
        }
        match &self.action {
            Action::Accept => out.push_str("-j ACCEPT"),
            Action::Drop => out.push_str("-j DROP"),
            Action::Return => out.push_str("-j RETURN"),
            Action::Jump(c) => {
                let _ = write!(out, "-j {c}");
            }
            Action::Goto(c) => {
                let _ = write!(out, "-g {c}");
            }
            Action::SetMark { value, mask } => {
                let _ = write!(out, "-j MARK --set-xmark {value:#x}/{mask:#x}");
            }
        }
        out
    }

    /// Parses the subset of iptables syntax that [`Rule::render`] produces.
    pub fn parse(text: &str) -> Result<Rule, ParseError> {
        let err = |reason: &str| ParseError {
            rule: text.to_string(),
            reason: reason.to_string(),
        };
        let toks = tokenize(text).ok_or_else(|| err("unbalanced quote"))?;
        let mut it = toks.iter().map(String::as_str).peekable();
        let mut rule = Rule::new(vec![], Action::Accept);
        let mut action = None;
        let mut negate = false;
        fn num(s: Option<&str>) -> Option<u32> {
            let s = s?;
            match s.strip_prefix("0x") {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        }
        fn value_mask(s: Option<&str>) -> Option<(u32, u32)> {
            let (v, m) = s?.split_once('/')?;
            Some((num(Some(v))?, num(Some(m))?))
        }
        fn net(s: Option<&str>) -> Option<Ipv4Net> {
            let s = s?;
            s.parse::<Ipv4Net>()
                .ok()
                .or_else(|| s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from))
        }
        while let Some(t) = it.next() {
            match t {
                "!" => {
                    negate = true;
                    continue;
                }
                "-i" | "-o" => {
                    let name = it.next().ok_or_else(|| err("interface missing"))?.to_string();
                    rule.matches.push(if t == "-i" {
                        Match::InIface { name, negate }
                    } else {
                        Match::OutIface { name, negate }
                    });
                }
                "-s" | "-d" => {
                    let n = net(it.next()).ok_or_else(|| err("bad address"))?;
                    rule.matches.push(if t == "-s" {
                        Match::Src { net: n, negate }
                    } else {
                        Match::Dst { net: n, negate }
                    });
                }
                "-p" => {
                    let p = it.next().and_then(proto_parse).ok_or_else(|| err("bad protocol"))?;
                    rule.matches.push(Match::Proto(p));
                }
                "-m" => {
                    let module = it.next().ok_or_else(|| err("module missing"))?;
                    match module {
                        "comment" => {
                            if it.next() != Some("--comment") {
                                return Err(err("--comment missing"));
                            }
                            rule.comment = Some(it.next().ok_or_else(|| err("comment missing"))?.to_string());
                        }
                        "tcp" | "udp" | "sctp" => {
                            if it.next() != Some("--dport") {
                                return Err(err("--dport missing"));
                            }
                            let d = it.next().ok_or_else(|| err("port missing"))?;
                            let (lo, hi) = parse_port_range(d).ok_or_else(|| err("bad port"))?;
                            rule.matches.push(Match::DPort { lo, hi });
                        }
                        "multiport" => {
                            if it.next() != Some("--dports") {
                                return Err(err("--dports missing"));
                            }
                            let ranges = it
                                .next()
                                .ok_or_else(|| err("ports missing"))?
                                .split(',')
                                .map(parse_port_range)
                                .collect::<Option<Vec<_>>>()
                                .ok_or_else(|| err("bad port"))?;
                            if ranges.is_empty() || multiport_slots(&ranges) > MULTIPORT_SLOTS {
                                return Err(err("multiport holds 1 to 15 ports"));
                            }
                            rule.matches.push(Match::DPorts(ranges));
                        }
                        "icmp" => {
                            if it.next() != Some("--icmp-type") {
                                return Err(err("--icmp-type missing"));
                            }
                            let (ty, code) = it
                                .next()
                                .and_then(|s| s.split_once('/'))
                                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                                .ok_or_else(|| err("bad icmp type"))?;
                            rule.matches.push(Match::IcmpType { ty, code });
                        }
                        "set" => {
                            let mut n = it.next();
                            if n == Some("!") {
                                negate = true;
                                n = it.next();
                            }
                            if n != Some("--match-set") {
                                return Err(err("--match-set missing"));
                            }
                            let name = it.next().ok_or_else(|| err("set name missing"))?.to_string();
                            let dir = match it.next() {
                                Some("src") => SetDir::Src,
                                Some("dst") => SetDir::Dst,
                                Some("src,src") => SetDir::SrcSrc,
                                Some("dst,dst") => SetDir::DstDst,
                                _ => return Err(err("bad set direction")),
                            };
                            rule.matches.push(Match::Set { name, dir, negate });
                        }
                        "mark" => {
                            let mut n = it.next();
                            if n == Some("!") {
                                negate = true;
                                n = it.next();
                            }
                            if n != Some("--mark") {
                                return Err(err("--mark missing"));
                            }
                            let (value, mask) = value_mask(it.next()).ok_or_else(|| err("bad mark"))?;
                            rule.matches.push(Match::Mark { value, mask, negate });
                        }
                        "conntrack" => {
                            if it.next() != Some("--ctstate") {
                                return Err(err("--ctstate missing"));
                            }
                            let states = it
                                .next()
                                .ok_or_else(|| err("states missing"))?
                                .split(',')
                                .map(CtState::parse)
                                .collect::<Option<Vec<_>>>()
                                .ok_or_else(|| err("bad ctstate"))?;
                            rule.matches.push(Match::CtState(states));
                        }
                        "addrtype" => {
                            let mut n = it.next();
                            if n == Some("!") {
                                negate = true;
                                n = it.next();
                            }
                            if n != Some("--src-type") || it.next() != Some("LOCAL") {
                                return Err(err("only --src-type LOCAL is supported"));
                            }
                            rule.matches.push(Match::SrcLocal { negate });
                        }
                        _ => return Err(err("unknown match module")),
                    }
                }
                "-j" | "-g" => {
                    let target = it.next().ok_or_else(|| err("target missing"))?;
                    action = Some(match (t, target) {
                        ("-j", "ACCEPT") => Action::Accept,
                        ("-j", "DROP") => Action::Drop,
                        ("-j", "RETURN") => Action::Return,
                        ("-j", "MARK") => {
                            if it.next() != Some("--set-xmark") {
                                return Err(err("--set-xmark missing"));
                            }
                            let (value, mask) = value_mask(it.next()).ok_or_else(|| err("bad mark"))?;
                            Action::SetMark { value, mask }
                        }
                        ("-j", c) => Action::Jump(c.to_string()),
                        (_, c) => Action::Goto(c.to_string()),
                    });
                }
                _ => return Err(err(&format!("unknown token {t:?}"))),
            }
            negate = false;
        }
        rule.action = action.ok_or_else(|| err("no target"))?;
        Ok(rule)
    }
}

/// Quoted only when needed, as iptables-save prints it.
fn write_comment(out: &mut String, c: &str) {
    if c.is_empty() || c.contains(char::is_whitespace) {
        let _ = write!(out, "-m comment --comment \"{c}\" ");
    } else {
        let _ = write!(out, "-m comment --comment {c} ");
    }
}

fn tokenize(s: &str) -> Option<Vec<String>> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut in_quote = false;
    let mut has = false;
    for c in s.chars() {
        match c {
            '"' => {
                in_quote = !in_quote;
                has = true;
            }
            c if c.is_whitespace() && !in_quote => {
                if has {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => {
                cur.push(c);
                has = true;
            }
        }
    }
    if in_quote {
        return None;
    }
    if has {
        out.push(cur);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_round_trip_every_match_kind() {
        let r = Rule::new(
            vec![
                Match::InIface {
                    name: "cali+".into(),
                    negate: false,
                },
                Match::OutIface {
                    name: "calia".into(),
                    negate: true,
                },
                Match::Src {
                    net: "10.0.0.1/32".parse().unwrap(),
                    negate: true,
                },
                Match::Dst {
                    net: "10.0.0.0/8".parse().unwrap(),
                    negate: false,
                },
                Match::Proto(132),
                Match::DPort { lo: 80, hi: 90 },
                Match::DPorts(vec![(443, 443), (8000, 8080)]),
                Match::Set {
                    name: "warren-s-x".into(),
                    dir: SetDir::DstDst,
                    negate: true,
                },
                Match::Mark {
                    value: 0x10000,
                    mask: 0x10000,
                    negate: true,
                },
                Match::CtState(vec![CtState::Related, CtState::Established]),
            ],
            Action::SetMark {
                value: 0x10000,
                mask: 0x10000,
            },
        )
        .commented("a/b ingress 0");
        let text = r.render();
        assert_eq!(
            text,
            "! -s 10.0.0.1/32 -d 10.0.0.0/8 -i cali+ ! -o calia -p sctp -m comment --comment \"a/b ingress 0\" \
             -m sctp --dport 80:90 -m multiport --dports 443,8000:8080 -m set ! --match-set warren-s-x dst,dst -m mark ! --mark 0x10000/0x10000 \
             -m conntrack --ctstate RELATED,ESTABLISHED -j MARK --set-xmark 0x10000/0x10000"
        );
        let back = Rule::parse(&text).unwrap();
        assert_eq!(back.render(), text);
        let mut sorted = r.matches.clone();
        sorted.retain(|m| back.matches.contains(m));
        assert_eq!(sorted.len(), r.matches.len());
        assert_eq!((back.comment, back.action), (r.comment, r.action));
        let g = Rule::new(vec![Match::Proto(4)], Action::Goto("WARREN-X".into()));
        assert_eq!(Rule::parse(&g.render()).unwrap(), g);
        let icmp = Rule::new(
            vec![Match::Proto(1), Match::IcmpType { ty: 3, code: 4 }],
            Action::Accept,
        );
        assert_eq!(Rule::parse(&icmp.render()).unwrap(), icmp);
        let ipvs = Rule::new(
            vec![
                Match::OutIface {
                    name: "tunl0".into(),
                    negate: false,
                },
                Match::Mark {
                    value: 0x4000,
                    mask: 0x4000,
                    negate: false,
                },
                Match::SrcLocal { negate: true },
                Match::CtState(vec![CtState::Dnat]),
            ],
            Action::Jump("WARREN-NODEPORT".into()),
        );
        let text = ipvs.render();
        assert_eq!(
            text,
            "-o tunl0 -m mark --mark 0x4000/0x4000 -m addrtype ! --src-type LOCAL -m conntrack --ctstate DNAT -j WARREN-NODEPORT"
        );
        assert_eq!(Rule::parse(&text).unwrap(), ipvs);
    }

    #[test]
    fn should_refuse_what_it_does_not_understand() {
        assert!(Rule::parse("-m foo -j ACCEPT").is_err());
        assert!(Rule::parse("-p tcp").is_err());
        assert!(Rule::parse("-p tcp -m multiport --dports 90:80 -j ACCEPT").is_err());
        let sixteen: Vec<String> = (1..=16).map(|p| p.to_string()).collect();
        let text = format!("-p tcp -m multiport --dports {} -j ACCEPT", sixteen.join(","));
        assert!(Rule::parse(&text).is_err(), "the kernel takes 15 ports at most");
        assert!(Rule::parse("-p tcp -m multiport --dports 1:2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j ACCEPT").is_ok());
        assert!(Rule::parse("-m comment --comment \"x -j ACCEPT").is_err());
    }

    #[test]
    fn should_sanitize_comments() {
        let r = Rule::new(vec![], Action::Drop).commented("a\"b\\c");
        assert_eq!(r.render(), "-m comment --comment a_b_c -j DROP");
        let spaced = Rule::new(vec![], Action::Drop).commented("a b");
        assert_eq!(Rule::parse(&spaced.render()).unwrap(), spaced);
    }
}
