//! `ipset restore -exist`, spoken straight to the kernel over netfilter netlink.
//!
//! The `ipset` binary resolves every member through glibc's `getaddrinfo` (which stats
//! `/etc/resolv.conf` each time), finds its set by a linear name search per line and sends one
//! message per set change: at 1 700 sets and 35 000 members that was ~0.55 s of a cold sync, most
//! of it in userspace. Here the restore text the writer plans (the same text the `ipset` binary
//! would get, so plans, logs and the fake kernel stay as they are) is parsed once, each set's
//! members go in as few messages as fit, and the kernel's answer to each is read back.
//!
//! Only what the writer emits is understood: `create NAME TYPE [family inet] [hashsize N]
//! [maxelem N]` for the types `hash:ip`, `hash:net` (with `nomatch`), `hash:ip,port` and
//! `hash:net,iface`; `create NAME list:set [size N]`, whose members are other sets' names (no
//! `before`/`after`); `add`/`del NAME MEMBER`, `destroy`/`flush NAME`, `rename`/`swap A B` of
//! any of them. Anything else is a parse error before anything is sent, and the caller falls
//! back to the binary.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use policy::model::Protocol;

const NFNL_SUBSYS_IPSET: u16 = 6;
const NFNETLINK_V0: u8 = 0;
const AF_INET: u8 = 2;
/// The family the `ipset` binary gives a `list:set` (it holds sets of any family).
const NFPROTO_UNSPEC: u8 = 0;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;

const CMD_PROTOCOL: u8 = 1;
const CMD_CREATE: u8 = 2;
const CMD_DESTROY: u8 = 3;
const CMD_FLUSH: u8 = 4;
const CMD_RENAME: u8 = 5;
const CMD_SWAP: u8 = 6;
const CMD_ADD: u8 = 9;
const CMD_DEL: u8 = 10;
const CMD_HEADER: u8 = 12;
const CMD_TYPE: u8 = 13;

const ATTR_PROTOCOL: u16 = 1;
const ATTR_SETNAME: u16 = 2;
const ATTR_TYPENAME: u16 = 3;
const ATTR_SETNAME2: u16 = 3;
const ATTR_REVISION: u16 = 4;
const ATTR_FAMILY: u16 = 5;
const ATTR_DATA: u16 = 7;
const ATTR_REVISION_MIN: u16 = 10;
/// Required with `ATTR_ADT`; the kernel reports the failing element's line through it.
const ATTR_LINENO: u16 = 9;
const ATTR_ADT: u16 = 8;

const ATTR_IP: u16 = 1;
const ATTR_CIDR: u16 = 3;
const ATTR_PORT: u16 = 4;
const ATTR_PROTO: u16 = 7;
const ATTR_CADT_FLAGS: u16 = 8;
const ATTR_HASHSIZE: u16 = 18;
const ATTR_MAXELEM: u16 = 19;
const ATTR_SIZE: u16 = 23;
/// A `list:set` member: the member set's name (ADT attributes, numbered apart from create's).
const ATTR_NAME: u16 = 18;
const ATTR_IFACE: u16 = 23;
const ATTR_IPADDR_IPV4: u16 = 1;

const FLAG_NOMATCH: u32 = 1 << 2;
/// Longest set name, with its NUL.
const MAXNAMELEN: usize = 32;
/// Interface names, with their NUL (IFNAMSIZ).
const IFNAMSIZ: usize = 16;
/// Members per message: ~50 bytes each keeps a message well inside the socket's buffers.
const MEMBERS_PER_MSG: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpsetError {
    #[error("line {line}: {reason}")]
    Parse { line: usize, reason: String },
    #[error("netlink: {0}")]
    Io(String),
    #[error("Error in line {line}: {reason}")]
    Kernel { line: usize, reason: String },
}

/// A set member, as the writer renders them; a `list:set`'s members are other sets, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    Ip(Ipv4Addr),
    Net { addr: Ipv4Addr, cidr: u8, nomatch: bool },
    IpPort { addr: Ipv4Addr, proto: u8, port: u16 },
    NetIface { addr: Ipv4Addr, cidr: u8, iface: String },
    Set(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Create {
        name: String,
        kind: String,
        hashsize: Option<u32>,
        maxelem: Option<u32>,
        /// `list:set` only.
        size: Option<u32>,
    },
    /// Members of one set, added (or deleted) together; `line` is the first one's.
    Adt {
        add: bool,
        name: String,
        members: Vec<(usize, Member)>,
    },
    Destroy(String),
    Flush(String),
    Rename(String, String),
    Swap(String, String),
}

fn net(text: &str) -> Option<(Ipv4Addr, u8)> {
    match text.split_once('/') {
        Some((a, c)) => {
            let cidr: u8 = c.parse().ok()?;
            (1..=32).contains(&cidr).then_some(())?;
            Some((a.parse().ok()?, cidr))
        }
        None => Some((text.parse().ok()?, 32)),
    }
}

fn member(kind: &str, words: &[&str]) -> Result<Member, String> {
    let bad = || format!("bad {kind} member {:?}", words.join(" "));
    let first = *words.first().ok_or_else(bad)?;
    let rest = &words[1..];
    let m = match kind {
        "hash:ip" if rest.is_empty() => Member::Ip(first.parse().map_err(|_| bad())?),
        "hash:net" => {
            let nomatch = match rest {
                [] => false,
                ["nomatch"] => true,
                _ => return Err(bad()),
            };
            let (addr, cidr) = net(first).ok_or_else(bad)?;
            Member::Net { addr, cidr, nomatch }
        }
        "hash:ip,port" if rest.is_empty() => {
            let (a, pp) = first.split_once(',').ok_or_else(bad)?;
            let (proto, port) = pp.split_once(':').ok_or_else(bad)?;
            let proto = Protocol::ALL
                .into_iter()
                .find(|p| p.name() == proto)
                .map(Protocol::number)
                .ok_or_else(bad)?;
            Member::IpPort {
                addr: a.parse().map_err(|_| bad())?,
                proto,
                port: port.parse().map_err(|_| bad())?,
            }
        }
        "hash:net,iface" if rest.is_empty() => {
            let (n, iface) = first.split_once(',').ok_or_else(bad)?;
            let (addr, cidr) = net(n).ok_or_else(bad)?;
            if iface.is_empty() || iface.len() >= IFNAMSIZ || iface.contains(':') {
                return Err(bad());
            }
            Member::NetIface {
                addr,
                cidr,
                iface: iface.to_string(),
            }
        }
        "list:set" if rest.is_empty() => Member::Set(set_name(Some(&first)).map_err(|_| bad())?),
        _ => return Err(bad()),
    };
    Ok(m)
}

fn set_name(word: Option<&&str>) -> Result<String, String> {
    let n = word.ok_or("set name missing")?;
    if n.is_empty() || n.len() >= MAXNAMELEN {
        return Err(format!("bad set name {n:?}"));
    }
    Ok(n.to_string())
}

/// Parses restore text into operations; consecutive `add` (or `del`) lines of one set become
/// one operation. A set's type comes from the text's own `create` line, or else from
/// `existing` (asked once per set; `None` when there is no such set).
pub fn parse(
    text: &str,
    existing: &mut dyn FnMut(&str) -> Result<Option<String>, IpsetError>,
) -> Result<Vec<(usize, Op)>, IpsetError> {
    let mut ops: Vec<(usize, Op)> = vec![];
    let mut kinds: HashMap<String, String> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |reason: String| IpsetError::Parse { line: line_no, reason };
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(cmd) = words.first() else { continue };
        let name = set_name(words.get(1)).map_err(err)?;
        match *cmd {
            "create" => {
                let kind = words.get(2).ok_or_else(|| err("type missing".into()))?.to_string();
                member_kind_known(&kind).map_err(err)?;
                // The binary refuses a hash option on a list:set and `size` on a hash set; left to
                // it, so that its error is the one reported.
                let list = kind == "list:set";
                let (mut hashsize, mut maxelem, mut size) = (None, None, None);
                for kv in words[3..].chunks(2) {
                    let number = |what: &str, v: &str| v.parse::<u32>().map_err(|_| err(format!("bad {what} {v}")));
                    match kv {
                        ["family", "inet"] if !list => {}
                        ["hashsize", v] if !list => hashsize = Some(number("hashsize", v)?),
                        ["maxelem", v] if !list => maxelem = Some(number("maxelem", v)?),
                        ["size", v] if list => size = Some(number("size", v)?),
                        other => return Err(err(format!("unsupported create option {other:?}"))),
                    }
                }
                kinds.insert(name.clone(), kind.clone());
                ops.push((
                    line_no,
                    Op::Create {
                        name,
                        kind,
                        hashsize,
                        maxelem,
                        size,
                    },
                ));
            }
            "add" | "del" => {
                let add = *cmd == "add";
                if !kinds.contains_key(&name) {
                    let k = existing(&name)?.ok_or_else(|| IpsetError::Kernel {
                        line: line_no,
                        reason: reason(2),
                    })?;
                    kinds.insert(name.clone(), k);
                }
                let kind = kinds.get(&name).map(String::as_str).unwrap_or_default();
                let m = member(kind, &words[2..]).map_err(err)?;
                match ops.last_mut() {
                    Some((
                        _,
                        Op::Adt {
                            add: a,
                            name: n,
                            members,
                        },
                    )) if *a == add && *n == name => members.push((line_no, m)),
                    _ => ops.push((
                        line_no,
                        Op::Adt {
                            add,
                            name,
                            members: vec![(line_no, m)],
                        },
                    )),
                }
            }
            "destroy" | "flush" if words.len() == 2 => {
                if *cmd == "destroy" {
                    kinds.remove(&name);
                    ops.push((line_no, Op::Destroy(name)));
                } else {
                    ops.push((line_no, Op::Flush(name)));
                }
            }
            "rename" | "swap" if words.len() == 3 => {
                let to = set_name(words.get(2)).map_err(err)?;
                if *cmd == "rename" {
                    if let Some(k) = kinds.remove(&name) {
                        kinds.insert(to.clone(), k);
                    }
                    ops.push((line_no, Op::Rename(name, to)));
                } else {
                    let (a, b) = (kinds.remove(&name), kinds.remove(&to));
                    if let Some(k) = a {
                        kinds.insert(to.clone(), k);
                    }
                    if let Some(k) = b {
                        kinds.insert(name.clone(), k);
                    }
                    ops.push((line_no, Op::Swap(name, to)));
                }
            }
            other => return Err(err(format!("unsupported command {other:?}"))),
        }
    }
    Ok(ops)
}

fn member_kind_known(kind: &str) -> Result<(), String> {
    match kind {
        "hash:ip" | "hash:net" | "hash:ip,port" | "hash:net,iface" | "list:set" => Ok(()),
        other => Err(format!("unsupported set type {other}")),
    }
}

/// A netlink message under construction: header, nfgenmsg, attributes (nests by offset).
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(cmd: u8, flags: u16, seq: u32, protocol: u8) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&((NFNL_SUBSYS_IPSET << 8) | u16::from(cmd)).to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&[AF_INET, NFNETLINK_V0, 0, 0]);
        let mut m = Msg { buf, nests: vec![] };
        m.u8(ATTR_PROTOCOL, protocol);
        m
    }

    /// A create request; `data` holds the numeric options given, in network byte order as the
    /// kernel's create policies want them.
    fn create(seq: u32, protocol: u8, name: &str, kind: &str, rev: u8, data: &[(u16, Option<u32>)]) -> Msg {
        let mut m = Msg::new(CMD_CREATE, NLM_F_CREATE, seq, protocol);
        m.str(ATTR_SETNAME, name);
        m.str(ATTR_TYPENAME, kind);
        m.u8(ATTR_REVISION, rev);
        m.u8(ATTR_FAMILY, family(kind));
        m.begin(ATTR_DATA);
        for (ty, v) in data {
            if let Some(v) = v {
                m.be32(*ty, *v);
            }
        }
        m.end();
        m
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn u8(&mut self, ty: u16, v: u8) {
        self.attr(ty, &[v]);
    }

    fn be16(&mut self, ty: u16, v: u16) {
        self.attr(ty | NLA_F_NET_BYTEORDER, &v.to_be_bytes());
    }

    fn be32(&mut self, ty: u16, v: u32) {
        self.attr(ty | NLA_F_NET_BYTEORDER, &v.to_be_bytes());
    }

    fn str(&mut self, ty: u16, s: &str) {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.attr(ty, &b);
    }

    fn begin(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    fn end(&mut self) {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn ipv4(&mut self, ty: u16, a: Ipv4Addr) {
        self.begin(ty);
        self.attr(ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, &a.octets());
        self.end();
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }

    fn member(&mut self, m: &Member) {
        self.begin(ATTR_DATA);
        match m {
            Member::Ip(a) => self.ipv4(ATTR_IP, *a),
            Member::Net { addr, cidr, nomatch } => {
                self.ipv4(ATTR_IP, *addr);
                self.u8(ATTR_CIDR, *cidr);
                if *nomatch {
                    self.be32(ATTR_CADT_FLAGS, FLAG_NOMATCH);
                }
            }
            Member::IpPort { addr, proto, port } => {
                self.ipv4(ATTR_IP, *addr);
                self.be16(ATTR_PORT, *port);
                self.u8(ATTR_PROTO, *proto);
            }
            Member::NetIface { addr, cidr, iface } => {
                self.ipv4(ATTR_IP, *addr);
                self.u8(ATTR_CIDR, *cidr);
                self.str(ATTR_IFACE, iface);
            }
            Member::Set(name) => self.str(ATTR_NAME, name),
        }
        self.end();
    }
}

/// What the kernel's ipset errors mean, as the `ipset` binary words them.
fn reason(errno: i32) -> String {
    match errno {
        4097 => "Kernel and userspace incompatible: settype not supported".into(),
        4098 => "Kernel error received: set type not supported".into(),
        4099 => "Kernel error received: maximal number of sets reached".into(),
        4100 => "Set cannot be destroyed: it is in use by a kernel component".into(),
        4101 => "Set cannot be created: set with the same name already exists".into(),
        4102 => "The sets cannot be swapped: their type does not match".into(),
        4103 => "Element cannot be added to the set: it's already added".into(),
        4104 => "The value of the CIDR parameter of the IP address is invalid".into(),
        4108 => "Set cannot be destroyed: it is in use by a kernel component".into(),
        2 => "The set with the given name does not exist".into(),
        17 => "A set with the same name already exists".into(),
        e if e >= 4096 => format!("Kernel error received: ipset error {e}"),
        e => std::io::Error::from_raw_os_error(e).to_string(),
    }
}

/// As [`reason`], for an element of a `list:set`: errors from 4352 on mean something else for
/// each set type, and the binary words these for the list type.
fn list_reason(errno: i32) -> String {
    match errno {
        4352 => "Set to be added/deleted/tested as element does not exist.".into(),
        4353 => "Sets with list:set type cannot be added to the set.".into(),
        4356 => "The set is full, more elements cannot be added.".into(),
        e => reason(e),
    }
}

/// The family a set of `kind` is asked about and created with, as the binary sends it.
fn family(kind: &str) -> u8 {
    if kind == "list:set" {
        NFPROTO_UNSPEC
    } else {
        AF_INET
    }
}

/// A netfilter netlink socket for ipset commands.
pub struct IpsetSocket {
    sock: Socket,
    seq: u32,
    protocol: u8,
    revisions: HashMap<String, u8>,
    rx: Vec<u8>,
}

impl IpsetSocket {
    /// Opens a socket in this thread's network namespace, or in the named one
    /// (`/run/netns/<name>`): a socket stays in the namespace it was made in, so only its
    /// creation moves, on a short-lived thread.
    pub fn open(netns: Option<&str>) -> Result<IpsetSocket, IpsetError> {
        let sock = match netns {
            None => Self::socket()?,
            Some(ns) => {
                let path = format!("/run/netns/{ns}");
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let f = std::fs::File::open(&path).map_err(|e| IpsetError::Io(format!("{path}: {e}")))?;
                        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(|e| IpsetError::Io(format!("setns {path}: {e}")))?;
                        Self::socket()
                    })
                    .join()
                    .map_err(|_| IpsetError::Io("netns thread panicked".into()))?
                })?
            }
        };
        let mut s = IpsetSocket {
            sock,
            seq: 1,
            protocol: 6,
            revisions: HashMap::new(),
            rx: Vec::with_capacity(1 << 16),
        };
        // The protocol version both sides speak; 6 is the oldest kernels still have.
        let m = Msg::new(CMD_PROTOCOL, 0, s.next_seq(), 6);
        let reply = s.request(m.finish(), 0)?;
        if let Some(v) = find_attr(&reply, ATTR_PROTOCOL).and_then(|d| d.first().copied()) {
            s.protocol = v.clamp(6, 7);
        }
        Ok(s)
    }

    fn socket() -> Result<Socket, IpsetError> {
        let io = |e: std::io::Error| IpsetError::Io(e.to_string());
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(io)?;
        sock.bind_auto().map_err(io)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(io)?;
        Ok(sock)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one message and reads until its ACK (or error); returns the attributes of a data
    /// reply, if one came first.
    fn request(&mut self, msg: Vec<u8>, line: usize) -> Result<Vec<u8>, IpsetError> {
        self.exchange(msg)?.map_err(|errno| IpsetError::Kernel {
            line,
            reason: reason(errno),
        })
    }

    /// As [`Self::request`], but a refusal comes back as the kernel's errno, for callers whose
    /// wording depends on the set type.
    fn exchange(&mut self, msg: Vec<u8>) -> Result<Result<Vec<u8>, i32>, IpsetError> {
        let seq = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
        self.sock
            .send(&msg, 0)
            .map_err(|e| IpsetError::Io(format!("send: {e}")))?;
        let mut data = vec![];
        loop {
            self.rx.clear();
            let n = self
                .sock
                .recv(&mut self.rx, 0)
                .map_err(|e| IpsetError::Io(format!("recv: {e}")))?;
            let mut at = 0;
            let buf = &self.rx[..n.min(self.rx.len())];
            while at + 16 <= buf.len() {
                let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
                if len < 16 || at + len > buf.len() {
                    return Err(IpsetError::Io("truncated netlink reply".into()));
                }
                let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let rseq = u32::from_ne_bytes([buf[at + 8], buf[at + 9], buf[at + 10], buf[at + 11]]);
                let body = &buf[at + 16..at + len];
                at += (len + 3) & !3;
                if rseq != seq {
                    continue;
                }
                if ty == NLMSG_ERROR {
                    let code = body
                        .get(0..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or_else(|| IpsetError::Io("short netlink error".into()))?;
                    if code == 0 {
                        return Ok(Ok(data));
                    }
                    return Ok(Err(-code));
                }
                // A data reply: nfgenmsg, then attributes.
                data = body.get(4..).unwrap_or_default().to_vec();
            }
        }
    }

    /// The revision to create `kind` with: the kernel's newest, but no newer than what the
    /// `ipset` tools of current distributions read back (a set of a revision the installed
    /// `ipset` does not know could not be listed or saved with it).
    fn revision(&mut self, kind: &str, line: usize) -> Result<u8, IpsetError> {
        if let Some(r) = self.revisions.get(kind) {
            return Ok(*r);
        }
        let mut m = Msg::new(CMD_TYPE, 0, self.next_seq(), self.protocol);
        m.str(ATTR_TYPENAME, kind);
        m.u8(ATTR_FAMILY, family(kind));
        let reply = self.request(m.finish(), line)?;
        let max = find_attr(&reply, ATTR_REVISION)
            .and_then(|d| d.first().copied())
            .ok_or_else(|| IpsetError::Kernel {
                line,
                reason: format!("no revision of {kind} in the kernel"),
            })?;
        let min = find_attr(&reply, ATTR_REVISION_MIN)
            .and_then(|d| d.first().copied())
            .unwrap_or(0);
        let cap = match kind {
            "hash:ip" | "hash:ip,port" => 6,
            "hash:net" => 7,
            "list:set" => 3,
            _ => 8,
        };
        let r = max.min(cap).max(min);
        self.revisions.insert(kind.to_string(), r);
        Ok(r)
    }

    /// Runs the operations in order, stopping at the first the kernel refuses (as `ipset
    /// restore` does). Existing sets and members are not errors (`-exist`).
    pub fn run(&mut self, ops: &[(usize, Op)]) -> Result<(), IpsetError> {
        for (line, op) in ops {
            let line = *line;
            match op {
                Op::Create {
                    name,
                    kind,
                    hashsize,
                    maxelem,
                    size,
                } => {
                    let rev = self.revision(kind, line)?;
                    let data = [(ATTR_HASHSIZE, *hashsize), (ATTR_MAXELEM, *maxelem), (ATTR_SIZE, *size)];
                    let m = Msg::create(self.next_seq(), self.protocol, name, kind, rev, &data);
                    self.request(m.finish(), line)?;
                }
                Op::Adt { add, name, members } => {
                    for chunk in members.chunks(MEMBERS_PER_MSG) {
                        let cmd = if *add { CMD_ADD } else { CMD_DEL };
                        let first = chunk.first().map_or(0, |c| c.0);
                        let mut m = Msg::new(cmd, 0, self.next_seq(), self.protocol);
                        m.str(ATTR_SETNAME, name);
                        m.attr(ATTR_LINENO, &(first as u32).to_ne_bytes());
                        m.begin(ATTR_ADT);
                        for (_, member) in chunk {
                            m.member(member);
                        }
                        m.end();
                        // A set's members are all of its one type.
                        let list = matches!(chunk.first(), Some((_, Member::Set(_))));
                        self.exchange(m.finish())?.map_err(|errno| {
                            let why = if list { list_reason(errno) } else { reason(errno) };
                            IpsetError::Kernel {
                                line: first,
                                reason: format!("{why} (set {name}, one of {} members)", chunk.len()),
                            }
                        })?;
                    }
                }
                Op::Destroy(name) | Op::Flush(name) => {
                    let cmd = if matches!(op, Op::Destroy(_)) {
                        CMD_DESTROY
                    } else {
                        CMD_FLUSH
                    };
                    let mut m = Msg::new(cmd, 0, self.next_seq(), self.protocol);
                    m.str(ATTR_SETNAME, name);
                    self.request(m.finish(), line)?;
                }
                Op::Rename(a, b) | Op::Swap(a, b) => {
                    let cmd = if matches!(op, Op::Rename(..)) {
                        CMD_RENAME
                    } else {
                        CMD_SWAP
                    };
                    let mut m = Msg::new(cmd, 0, self.next_seq(), self.protocol);
                    m.str(ATTR_SETNAME, a);
                    m.str(ATTR_SETNAME2, b);
                    self.request(m.finish(), line)?;
                }
            }
        }
        Ok(())
    }
}

impl IpsetSocket {
    /// The type of an existing set, `None` when there is no such set.
    pub fn kind_of(&mut self, name: &str) -> Result<Option<String>, IpsetError> {
        let mut m = Msg::new(CMD_HEADER, 0, self.next_seq(), self.protocol);
        m.str(ATTR_SETNAME, name);
        match self.request(m.finish(), 0) {
            Ok(reply) => {
                Ok(find_attr(&reply, ATTR_TYPENAME)
                    .map(|t| String::from_utf8_lossy(t).trim_end_matches('\0').to_string()))
            }
            Err(IpsetError::Kernel { reason: r, .. }) if r == reason(2) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// `ipset restore -exist` of `text` in `netns` (or here). A [`IpsetError::Parse`] or
/// [`IpsetError::Io`] before anything was sent means the binary should do it instead.
pub fn restore(netns: Option<&str>, text: &str) -> Result<(), IpsetError> {
    let mut s = IpsetSocket::open(netns)?;
    let ops = parse(text, &mut |name| s.kind_of(name))?;
    s.run(&ops)
}

/// The payload of the first top-level attribute of type `ty`.
fn find_attr(attrs: &[u8], ty: u16) -> Option<&[u8]> {
    let mut at = 0;
    while at + 4 <= attrs.len() {
        let len = usize::from(u16::from_ne_bytes([attrs[at], attrs[at + 1]]));
        let t = u16::from_ne_bytes([attrs[at + 2], attrs[at + 3]]) & !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
        if len < 4 || at + len > attrs.len() {
            return None;
        }
        if t == ty {
            return Some(&attrs[at + 4..at + len]);
        }
        at += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_parse_what_the_writer_plans_and_group_members_by_set() {
        let text = "create warren-a hash:net family inet hashsize 1024 maxelem 1048576\n\
                    add warren-a 10.0.0.0/8\nadd warren-a 10.1.0.0/16 nomatch\nadd warren-a 10.2.3.4\n\
                    create warren-p hash:ip,port family inet hashsize 1024 maxelem 1048576\n\
                    add warren-p 10.0.0.1,tcp:8080\n\
                    del warren-w 10.0.0.9,calia1b2c3d4e5f\n\
                    rename warren-t-1 warren-a\nswap warren-a warren-p\ndestroy warren-x\nflush warren-p\n";
        let mut asked = vec![];
        let ops = parse(text, &mut |n| {
            asked.push(n.to_string());
            Ok((n == "warren-w").then(|| "hash:net,iface".to_string()))
        })
        .unwrap();
        assert_eq!(asked, ["warren-w"], "only a set the text does not create is looked up");
        assert_eq!(ops.len(), 9);
        assert_eq!(
            ops[1].1,
            Op::Adt {
                add: true,
                name: "warren-a".into(),
                members: vec![
                    (
                        2,
                        Member::Net {
                            addr: "10.0.0.0".parse().unwrap(),
                            cidr: 8,
                            nomatch: false
                        }
                    ),
                    (
                        3,
                        Member::Net {
                            addr: "10.1.0.0".parse().unwrap(),
                            cidr: 16,
                            nomatch: true
                        }
                    ),
                    (
                        4,
                        Member::Net {
                            addr: "10.2.3.4".parse().unwrap(),
                            cidr: 32,
                            nomatch: false
                        }
                    ),
                ]
            }
        );
        assert_eq!(
            ops[3].1,
            Op::Adt {
                add: true,
                name: "warren-p".into(),
                members: vec![(
                    6,
                    Member::IpPort {
                        addr: "10.0.0.1".parse().unwrap(),
                        proto: 6,
                        port: 8080
                    }
                )]
            }
        );
        assert_eq!(ops[4].0, 7);
        assert!(matches!(&ops[4].1, Op::Adt { add: false, members, .. }
            if members[0].1 == Member::NetIface { addr: "10.0.0.9".parse().unwrap(), cidr: 32, iface: "calia1b2c3d4e5f".into() }));
    }

    #[test]
    fn should_refuse_what_it_does_not_understand_before_sending_anything() {
        for (text, why) in [
            ("add warren-a 10.0.0.1\n", "does not exist"),
            ("create warren-a hash:mac\n", "unsupported set type"),
            ("create warren-a hash:ip timeout 5\n", "unsupported create option"),
            (
                "create warren-a hash:ip\nadd warren-a 10.0.0.0/8\n",
                "bad hash:ip member",
            ),
            (
                "create warren-a hash:net\nadd warren-a 10.0.0.0/33\n",
                "bad hash:net member",
            ),
            (
                "create warren-a hash:net,iface\nadd warren-a 10.0.0.1\n",
                "bad hash:net,iface member",
            ),
            ("test warren-a 10.0.0.1\n", "unsupported command"),
            (&format!("destroy {}\n", "x".repeat(32)), "bad set name"),
        ] {
            let e = parse(text, &mut |_| Ok(None)).unwrap_err();
            assert!(e.to_string().contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn should_parse_a_list_set_whose_members_are_set_names() {
        let text = "create warren-l list:set size 8\nadd warren-l warren-n\nadd warren-l warren-i\n\
                    del warren-l warren-n\nadd warren-m warren-p\n";
        let mut asked = vec![];
        let ops = parse(text, &mut |n| {
            asked.push(n.to_string());
            Ok(Some("list:set".to_string()))
        })
        .unwrap();
        assert_eq!(asked, ["warren-m"], "only a set the text does not create is looked up");
        let set = |n: &str| Member::Set(n.into());
        assert_eq!(
            ops,
            vec![
                (
                    1,
                    Op::Create {
                        name: "warren-l".into(),
                        kind: "list:set".into(),
                        hashsize: None,
                        maxelem: None,
                        size: Some(8),
                    }
                ),
                (
                    2,
                    Op::Adt {
                        add: true,
                        name: "warren-l".into(),
                        members: vec![(2, set("warren-n")), (3, set("warren-i"))],
                    }
                ),
                (
                    4,
                    Op::Adt {
                        add: false,
                        name: "warren-l".into(),
                        members: vec![(4, set("warren-n"))],
                    }
                ),
                (
                    5,
                    Op::Adt {
                        add: true,
                        name: "warren-m".into(),
                        members: vec![(5, set("warren-p"))],
                    }
                ),
            ]
        );
        // Without `size` the kernel's default applies, as with the binary.
        let ops = parse("create warren-l list:set\n", &mut |_| Ok(None)).unwrap();
        assert!(matches!(&ops[0].1, Op::Create { size: None, .. }));
    }

    #[test]
    fn should_refuse_list_set_lines_it_does_not_understand() {
        let long = "x".repeat(32);
        for (text, why) in [
            (
                format!("create warren-l list:set\nadd warren-l {long}\n"),
                "bad list:set member",
            ),
            (
                "create warren-l list:set\nadd warren-l warren-a before warren-b\n".into(),
                "bad list:set member",
            ),
            ("create warren-l list:set\ndel warren-l\n".into(), "bad list:set member"),
            (
                "create warren-l list:set size 8 timeout 5\n".into(),
                "unsupported create option",
            ),
            (
                "create warren-l list:set family inet\n".into(),
                "unsupported create option",
            ),
            (
                "create warren-l list:set hashsize 64\n".into(),
                "unsupported create option",
            ),
            ("create warren-l list:set size\n".into(), "unsupported create option"),
            ("create warren-l list:set size eight\n".into(), "bad size"),
            ("create warren-a hash:ip size 8\n".into(), "unsupported create option"),
        ] {
            let e = parse(&text, &mut |_| Ok(None)).unwrap_err();
            assert!(matches!(e, IpsetError::Parse { .. }), "{text:?}: {e}");
            assert!(e.to_string().contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn should_encode_a_list_set_as_the_ipset_binary_does() {
        // The attributes `ipset create x list:set size 8` (ipset 7.17) sent, seen with strace:
        // family NFPROTO_UNSPEC, the size in the data nest as a network-order u32.
        let b = Msg::create(1, 7, "x", "list:set", 3, &[(ATTR_HASHSIZE, None), (ATTR_SIZE, Some(8))]).finish();
        assert_eq!(b.len(), 80);
        let binary: &[u8] = b"\x05\x00\x01\x00\x07\x00\x00\x00\x06\x00\x02\x00x\x00\x00\x00\
            \x0d\x00\x03\x00list:set\x00\x00\x00\x00\x05\x00\x04\x00\x03\x00\x00\x00\
            \x05\x00\x05\x00\x00\x00\x00\x00\x0c\x00\x07\x80\x08\x00\x17\x40\x00\x00\x00\x08";
        assert_eq!(&b[20..], binary);
        // A hash set keeps AF_INET.
        let b = Msg::create(1, 7, "y", "hash:ip", 6, &[]).finish();
        assert_eq!(find_attr(&b[20..], ATTR_FAMILY), Some(&[AF_INET][..]));

        let mut m = Msg::new(CMD_ADD, 0, 7, 7);
        m.str(ATTR_SETNAME, "warren-l");
        m.begin(ATTR_ADT);
        m.member(&Member::Set("warren-n".into()));
        m.end();
        let b = m.finish();
        let adt = find_attr(&b[20..], ATTR_ADT).unwrap();
        let data = find_attr(adt, ATTR_DATA).unwrap();
        assert_eq!(data, b"\x0d\x00\x12\x00warren-n\x00\x00\x00\x00");
    }

    #[test]
    fn should_encode_nested_attributes_with_their_lengths_and_flags() {
        let mut m = Msg::new(CMD_ADD, 0, 7, 7);
        m.str(ATTR_SETNAME, "warren-a");
        m.begin(ATTR_ADT);
        m.member(&Member::Net {
            addr: Ipv4Addr::new(10, 1, 2, 0),
            cidr: 24,
            nomatch: true,
        });
        m.end();
        let b = m.finish();
        assert_eq!(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize, b.len());
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), (6 << 8) | 9);
        let attrs = &b[20..];
        assert_eq!(find_attr(attrs, ATTR_PROTOCOL), Some(&[7u8][..]));
        assert_eq!(find_attr(attrs, ATTR_SETNAME), Some(&b"warren-a\0"[..]));
        let adt = find_attr(attrs, ATTR_ADT).unwrap();
        let data = find_attr(adt, ATTR_DATA).unwrap();
        let ip = find_attr(data, ATTR_IP).unwrap();
        assert_eq!(find_attr(ip, ATTR_IPADDR_IPV4), Some(&[10u8, 1, 2, 0][..]));
        assert_eq!(find_attr(data, ATTR_CIDR), Some(&[24u8][..]));
        assert_eq!(find_attr(data, ATTR_CADT_FLAGS), Some(&FLAG_NOMATCH.to_be_bytes()[..]));
        // The nested ones carry NLA_F_NESTED, the addresses NLA_F_NET_BYTEORDER.
        let raw_type = |attrs: &[u8], at: usize| u16::from_ne_bytes([attrs[at + 2], attrs[at + 3]]);
        let adt_at = attrs.len() - adt.len() - 4;
        assert_eq!(raw_type(attrs, adt_at), ATTR_ADT | NLA_F_NESTED);
        assert_eq!(raw_type(adt, 0), ATTR_DATA | NLA_F_NESTED);
        assert_eq!(raw_type(data, 0), ATTR_IP | NLA_F_NESTED);
        assert_eq!(raw_type(ip, 0), ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER);
    }
}
