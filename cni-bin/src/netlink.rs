//! A small synchronous rtnetlink client.
//!
//! The plugin is a short-lived, single-threaded process: a blocking socket per network namespace
//! is all it needs, and it keeps the binary small and its start fast (no async runtime).
//! A socket stays bound to the namespace it was opened in, which is how pod-side work is done
//! without staying inside the pod's namespace (see [`crate::netns`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A failed netlink request.
#[derive(Debug, thiserror::Error)]
#[error("netlink {op}: {source}")]
pub struct NlError {
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

impl NlError {
    fn new(op: &'static str, source: io::Error) -> Self {
        Self { op, source }
    }
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV) | Some(libc::ESRCH) | Some(libc::ENOENT)
        )
    }
}

pub type Result<T, E = NlError> = std::result::Result<T, E>;

/// What warren needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
    pub alias: Option<String>,
    pub group: u32,
}

/// An IPv4 route as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route4 {
    pub dst: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope: RouteScope,
    pub table: u32,
}

/// What a route request asks for (IPv4 only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    /// `onlink`: the gateway is reachable on `oif` without a covering route.
    pub onlink: bool,
}

impl RouteSpec {
    /// Builds the message (pure; unit-tested without a kernel).
    pub fn to_message(&self) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = self.prefix_len;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Unicast;
        // A route without a gateway is a direct one: the destination is on the link.
        m.header.scope = if self.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if self.onlink {
            m.header.flags = RouteFlags::Onlink;
        }
        if self.prefix_len > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(self.dst)));
        }
        if let Some(gw) = self.gateway {
            m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        m.attributes.push(RouteAttribute::Oif(self.oif));
        m
    }
}

/// Parameters of a veth pair whose peer is created directly in the pod's namespace.
pub struct VethSpec<'a> {
    pub host_name: &'a str,
    pub peer_name: &'a str,
    pub mtu: u32,
    /// Marks the host side as warren's from its very creation (the alias needs a second request).
    pub group: u32,
    pub peer_netns: BorrowedFd<'a>,
}

impl VethSpec<'_> {
    /// Builds the RTM_NEWLINK message (pure; unit-tested without a kernel).
    pub fn to_message(&self) -> LinkMessage {
        // The peer cannot be created up: the kernel configures it before the pair is linked,
        // and opening a veth without its peer fails with ENOTCONN. It is brought up from inside.
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(self.peer_name.to_string()));
        peer.attributes.push(LinkAttribute::Mtu(self.mtu));
        peer.attributes
            .push(LinkAttribute::NetNsFd(self.peer_netns.as_raw_fd()));

        let mut m = LinkMessage::default();
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName(self.host_name.to_string()));
        m.attributes.push(LinkAttribute::Mtu(self.mtu));
        m.attributes.push(LinkAttribute::Group(self.group));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        m
    }
}

/// A blocking rtnetlink socket, bound to the network namespace it was opened in.
pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

const RECV_BUF: usize = 64 * 1024;
const DUMP_RETRIES: usize = 5;

impl Netlink {
    pub fn open() -> Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| NlError::new("socket", e))?;
        sock.bind_auto().map_err(|e| NlError::new("bind", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| NlError::new("connect", e))?;
        // Extended acks make the kernel's error strings available; not every kernel has them.
        let _ = sock.set_ext_ack(true);
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Sends one request and collects its replies, up to the ack (or DONE for a dump).
    fn request(&mut self, op: &'static str, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        for _ in 0..DUMP_RETRIES {
            match self.request_once(op, msg.clone(), flags) {
                Err(Retry::Interrupted) if dump => continue,
                Err(Retry::Interrupted) => {
                    return Err(NlError::new(op, io::Error::from_raw_os_error(libc::EINTR)));
                }
                Err(Retry::Failed(e)) => return Err(e),
                Ok(v) => return Ok(v),
            }
        }
        Err(NlError::new(op, io::Error::from_raw_os_error(libc::EINTR)))
    }

    fn request_once(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> std::result::Result<Vec<RouteNetlinkMessage>, Retry> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        self.sock
            .send(&out, 0)
            .map_err(|e| Retry::Failed(NlError::new(op, e)))?;

        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            let n = {
                let mut slice = &mut self.buf[..];
                self.sock
                    .recv(&mut slice, 0)
                    .map_err(|e| Retry::Failed(NlError::new(op, e)))?
            };
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes([self.buf[off], self.buf[off + 1], self.buf[off + 2], self.buf[off + 3]])
                    as usize;
                if len < 16 || off + len > n {
                    return Err(Retry::Failed(NlError::new(
                        op,
                        io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"),
                    )));
                }
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..off + len])
                    .map_err(|e| Retry::Failed(NlError::new(op, io::Error::new(io::ErrorKind::InvalidData, e))))?;
                off += (len + 3) & !3;
                if parsed.header.sequence_number != seq {
                    continue;
                }
                if parsed.header.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match parsed.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(_) => Err(Retry::Failed(NlError::new(op, e.to_io()))),
                        };
                    }
                    NetlinkPayload::Done(_) => {
                        return if interrupted {
                            Err(Retry::Interrupted)
                        } else {
                            Ok(replies)
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump {
                            // A non-dump GET answers with one message and no ack unless asked;
                            // we asked for an ack, so keep reading until it comes.
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// The link called `name`, if there is one.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request("get link", RouteNetlinkMessage::GetLink(m), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(&l)),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let replies = self.request(
            "dump links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(&l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a veth pair with the peer born inside another namespace (no move needed).
    pub fn create_veth(&mut self, spec: &VethSpec<'_>) -> Result<()> {
        self.request(
            "create veth",
            RouteNetlinkMessage::NewLink(spec.to_message()),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.request("delete link", RouteNetlinkMessage::DelLink(m), 0)
            .map(drop)
    }

    /// Brings a link up, optionally setting its alias in the same request.
    pub fn set_up(&mut self, index: u32, alias: Option<&str>) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        if let Some(a) = alias {
            m.attributes.push(LinkAttribute::IfAlias(a.to_string()));
        }
        self.request("set link", RouteNetlinkMessage::SetLink(m), 0).map(drop)
    }

    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix_len: u8) -> Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.prefix_len = prefix_len;
        m.header.scope = AddressScope::Universe;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(ip));
        m.attributes.push(AddressAttribute::Address(ip));
        self.request(
            "add address",
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Addresses (with prefix length) on one link.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
        let replies = self.request(
            "dump addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for r in replies {
            if let RouteNetlinkMessage::NewAddress(a) = r {
                if a.header.index != index {
                    continue;
                }
                let ip = a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let ip = ip.or_else(|| {
                    a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                });
                if let Some(ip) = ip {
                    out.push((ip, a.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Adds (or replaces) a route; replacing makes a repeated ADD a no-op.
    pub fn replace_route(&mut self, spec: &RouteSpec) -> Result<()> {
        self.request(
            "add route",
            RouteNetlinkMessage::NewRoute(spec.to_message()),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    pub fn delete_route(&mut self, spec: &RouteSpec) -> Result<()> {
        self.request("delete route", RouteNetlinkMessage::DelRoute(spec.to_message()), 0)
            .map(drop)
    }

    /// IPv4 routes of the main table.
    pub fn routes_v4(&mut self) -> Result<Vec<Route4>> {
        let mut q = RouteMessage::default();
        q.header.address_family = AddressFamily::Inet;
        let replies = self.request("dump routes", RouteNetlinkMessage::GetRoute(q), NLM_F_DUMP)?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewRoute(m) = r else { continue };
            let mut route = Route4 {
                dst: Ipv4Addr::UNSPECIFIED,
                prefix_len: m.header.destination_prefix_length,
                gateway: None,
                oif: None,
                scope: m.header.scope,
                table: u32::from(m.header.table),
            };
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => route.dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.gateway = Some(*g),
                    RouteAttribute::Oif(i) => route.oif = Some(*i),
                    RouteAttribute::Table(t) => route.table = *t,
                    _ => {}
                }
            }
            if route.table == u32::from(RouteHeader::RT_TABLE_MAIN) {
                out.push(route);
            }
        }
        Ok(out)
    }
}

enum Retry {
    Interrupted,
    Failed(NlError),
}

fn parse_link(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        up: l.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(mac) => link.mac = format_mac(mac),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::IfAlias(s) => link.alias = Some(s.clone()),
            LinkAttribute::Group(g) => link.group = *g,
            _ => {}
        }
    }
    link
}

pub fn format_mac(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_build_an_onlink_default_route() {
        let m = RouteSpec {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
            gateway: Some(Ipv4Addr::new(169, 254, 1, 1)),
            oif: 7,
            onlink: true,
        }
        .to_message();
        assert_eq!(m.header.flags, RouteFlags::Onlink);
        assert_eq!(m.header.scope, RouteScope::Universe);
        assert!(!m.attributes.iter().any(|a| matches!(a, RouteAttribute::Destination(_))));
        assert!(m.attributes.contains(&RouteAttribute::Oif(7)));
    }

    #[test]
    fn should_build_a_link_scoped_host_route() {
        let m = RouteSpec {
            dst: Ipv4Addr::new(10, 233, 90, 5),
            prefix_len: 32,
            gateway: None,
            oif: 3,
            onlink: false,
        }
        .to_message();
        assert_eq!(m.header.scope, RouteScope::Link);
        assert_eq!(m.header.destination_prefix_length, 32);
        assert!(m
            .attributes
            .contains(&RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(
                10, 233, 90, 5
            )))));
    }

    #[test]
    fn should_put_the_peer_namespace_on_the_peer_only() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&f);
        let m = VethSpec {
            host_name: "cali0123456789a",
            peer_name: "eth0",
            mtu: 1480,
            group: 9,
            peer_netns: fd,
        }
        .to_message();
        assert!(!m.attributes.iter().any(|a| matches!(a, LinkAttribute::NetNsFd(_))));
        let peer = m
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) => Some(p.clone()),
                    _ => None,
                }),
                _ => None,
            })
            .unwrap();
        assert!(peer.attributes.contains(&LinkAttribute::NetNsFd(fd.as_raw_fd())));
        assert!(peer.attributes.contains(&LinkAttribute::IfName("eth0".into())));
        assert!(m.attributes.contains(&LinkAttribute::Group(9)));
    }

    #[test]
    fn should_format_macs() {
        assert_eq!(format_mac(&[0xee, 0, 1, 2, 3, 0xff]), "ee:00:01:02:03:ff");
    }
}
