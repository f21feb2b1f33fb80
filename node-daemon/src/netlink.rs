//! Kernel routes and links behind two narrow traits, with the rtnetlink implementation and an
//! in-memory fake. Only routes carrying `names::ROUTE_PROTO` are ever listed, replaced or deleted.

// The traits are used through generics only, never `dyn`, and the daemon drives them from its main
// task, so the futures need no `Send` bound.
#![allow(async_fn_in_trait)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use conf::names::ROUTE_PROTO;
use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, LinkIpIp, LinkUnspec, RouteMessageBuilder};

use crate::routes::DesiredRoute;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("interface {0} not found")]
    NoLink(String),
    #[error("{name} does not exist and creating an ipip link failed ({cause}); the kernel lacks the ipip module?")]
    NoIpip { name: String, cause: String },
    #[error("{0}")]
    Fake(String),
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// Route requests in flight at once during a sync.
const IN_FLIGHT: usize = 64;

fn nl(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let context = context.into();
    move |source| NetError::Netlink { context, source }
}

/// A warren route as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelRoute {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
}

impl KernelRoute {
    /// The kernel form of a desired route; tunnel routes need tunl0's index.
    pub fn from_desired(r: &DesiredRoute, tunnel_index: Option<u32>) -> Option<Self> {
        if r.tunnel {
            Some(Self {
                dst: r.dst,
                gateway: Some(r.gateway),
                oif: Some(tunnel_index?),
                onlink: true,
            })
        } else {
            Some(Self {
                dst: r.dst,
                gateway: Some(r.gateway),
                oif: None,
                onlink: false,
            })
        }
    }

    /// Whether `self` (as listed) satisfies `want`; an unspecified device matches any device.
    pub fn satisfies(&self, want: &KernelRoute) -> bool {
        self.dst == want.dst
            && self.gateway == want.gateway
            && self.onlink == want.onlink
            && (want.oif.is_none() || want.oif == self.oif)
    }
}

pub trait RouteOps {
    /// Routes of the main table marked with warren's protocol.
    async fn list_owned(&self) -> Result<Vec<KernelRoute>>;
    async fn replace(&self, r: &KernelRoute) -> Result<()>;
    async fn delete(&self, r: &KernelRoute) -> Result<()>;
}

/// The underlay interface of this node's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Underlay {
    pub index: u32,
    pub mtu: u32,
    pub subnet: Ipv4Net,
}

pub trait LinkOps {
    async fn link_index(&self, name: &str) -> Result<Option<u32>>;
    /// The interface holding `ip`, its MTU and subnet.
    async fn underlay(&self, ip: Ipv4Addr) -> Result<Option<Underlay>>;
    /// Makes `name` an IPIP device (creating it if the kernel has not), with `addr/32` as its
    /// only IPv4 address, MTU `mtu`, up. Returns its index.
    async fn ensure_tunnel(&self, name: &str, addr: Ipv4Addr, mtu: u32) -> Result<u32>;
    /// Removes every IPv4 address of `name` (uninstall); absent device is fine.
    async fn clear_tunnel(&self, name: &str) -> Result<()>;
}

/// What one route sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSyncReport {
    pub replaced: Vec<Ipv4Net>,
    pub deleted: Vec<Ipv4Net>,
    pub total: usize,
}

/// Makes warren's routes equal to `desired`: replaces what is missing or different (never a
/// delete-then-add, so traffic keeps flowing), deletes owned routes no longer desired. Other
/// routes are never listed, so never touched. Keeps going past single failures.
pub async fn sync_routes<R: RouteOps>(ops: &R, desired: &[KernelRoute]) -> Result<RouteSyncReport> {
    let actual = ops.list_owned().await?;
    let by_dst: BTreeMap<Ipv4Net, &KernelRoute> = actual.iter().map(|r| (r.dst, r)).collect();
    let mut report = RouteSyncReport {
        total: desired.len(),
        ..Default::default()
    };
    // Requests are pipelined (a bounded number in flight on the one socket): programming
    // thousands of routes from cold is bound by kernel work, not by round trips.
    let to_replace: Vec<&KernelRoute> = desired
        .iter()
        .filter(|want| !by_dst.get(&want.dst).is_some_and(|have| have.satisfies(want)))
        .collect();
    let wanted: std::collections::BTreeSet<Ipv4Net> = desired.iter().map(|r| r.dst).collect();
    let to_delete: Vec<&KernelRoute> = actual.iter().filter(|have| !wanted.contains(&have.dst)).collect();
    let mut first_err = None;
    let mut replaced = futures::stream::iter(
        to_replace
            .into_iter()
            .map(|want| async move { (want.dst, ops.replace(want).await) }),
    )
    .buffer_unordered(IN_FLIGHT);
    while let Some((dst, res)) = replaced.next().await {
        match res {
            Ok(()) => report.replaced.push(dst),
            Err(e) => {
                tracing::warn!(%dst, error = %e, "route replace failed");
                first_err.get_or_insert(e);
            }
        }
    }
    drop(replaced);
    let mut deleted = futures::stream::iter(
        to_delete
            .into_iter()
            .map(|have| async move { (have.dst, ops.delete(have).await) }),
    )
    .buffer_unordered(IN_FLIGHT);
    while let Some((dst, res)) = deleted.next().await {
        match res {
            Ok(()) => report.deleted.push(dst),
            Err(e) => {
                tracing::warn!(%dst, error = %e, "route delete failed");
                first_err.get_or_insert(e);
            }
        }
    }
    drop(deleted);
    report.replaced.sort();
    report.deleted.sort();
    match first_err {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Builds the netlink message of a warren route (pure, testable without a kernel).
pub fn route_message(r: &KernelRoute) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.addr(), r.dst.prefix_len())
        .protocol(RouteProtocol::from(ROUTE_PROTO));
    if let Some(gw) = r.gateway {
        b = b.gateway(gw);
    }
    if let Some(oif) = r.oif {
        b = b.output_interface(oif);
    }
    if r.onlink {
        b = b.onlink();
    }
    b.build()
}

fn parse_route(msg: &RouteMessage) -> Option<KernelRoute> {
    if msg.header.protocol != RouteProtocol::from(ROUTE_PROTO) || msg.header.table != 254 {
        return None;
    }
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Some(KernelRoute {
        dst: Ipv4Net::new(dst, msg.header.destination_prefix_length).ok()?,
        gateway,
        oif,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
    })
}

/// rtnetlink-backed [`RouteOps`] and [`LinkOps`] for the netns the socket was opened in.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a route netlink socket in the current netns; must run inside a tokio runtime.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Opens the socket inside the named netns (`/run/netns/<name>`) from a short-lived thread, so
    /// no runtime worker ever changes namespace; the socket stays bound to that netns.
    pub fn connect_in_netns(name: &str) -> Result<Self> {
        let path = format!("/run/netns/{name}");
        let rt = tokio::runtime::Handle::current();
        let res = std::thread::spawn(move || -> Result<Self> {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            let _guard = rt.enter();
            Netlink::connect()
        })
        .join();
        res.map_err(|_| NetError::Fake("netns thread panicked".into()))?
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<netlink_packet_route::link::LinkMessage>> {
        let mut s = self.handle.link().get().match_name(name).execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
            Err(e) => Err(nl(format!("get link {name}"))(e)),
        }
    }
}

fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

impl RouteOps for Netlink {
    async fn list_owned(&self) -> Result<Vec<KernelRoute>> {
        let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut s = self.handle.route().get(req).execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.map_err(nl("dump routes"))? {
            if let Some(r) = parse_route(&m) {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn replace(&self, r: &KernelRoute) -> Result<()> {
        self.handle
            .route()
            .add(route_message(r))
            .replace()
            .execute()
            .await
            .map_err(nl(format!("replace route {}", r.dst)))
    }

    async fn delete(&self, r: &KernelRoute) -> Result<()> {
        self.handle
            .route()
            .del(route_message(r))
            .execute()
            .await
            .map_err(nl(format!("delete route {}", r.dst)))
    }
}

impl LinkOps for Netlink {
    async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link_by_name(name).await?.map(|m| m.header.index))
    }

    async fn underlay(&self, ip: Ipv4Addr) -> Result<Option<Underlay>> {
        let mut s = self.handle.address().get().execute();
        let mut found = None;
        while let Some(m) = s.try_next().await.map_err(nl("dump addresses"))? {
            let has = m
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(x)) | AddressAttribute::Address(IpAddr::V4(x)) if *x == ip));
            if has {
                found = Some((m.header.index, m.header.prefix_len));
            }
        }
        let Some((index, prefix)) = found else { return Ok(None) };
        let mut s = self.handle.link().get().match_index(index).execute();
        let link = s.try_next().await.map_err(nl("get underlay link"))?;
        let mtu = link
            .and_then(|l| {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                })
            })
            .unwrap_or(1500);
        let subnet = Ipv4Net::new(ip, prefix)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| Ipv4Net::from(ip));
        Ok(Some(Underlay { index, mtu, subnet }))
    }

    async fn ensure_tunnel(&self, name: &str, addr: Ipv4Addr, mtu: u32) -> Result<u32> {
        let link = match self.link_by_name(name).await? {
            Some(l) => l,
            None => {
                // tunl0 appears by itself once the ipip module is loaded; creating an ipip link
                // loads the module, which then also creates tunl0.
                let res = self.handle.link().add(LinkIpIp::new(name).build()).execute().await;
                if let Err(e) = res {
                    tracing::debug!(error = %e, "ipip link add");
                }
                self.link_by_name(name)
                    .await?
                    .ok_or_else(|| NetError::NoLink(name.to_string()))?
            }
        };
        let index = link.header.index;
        let cur_mtu = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        if cur_mtu != Some(mtu) || !link.header.flags.contains(LinkFlags::Up) {
            let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
            self.handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(nl(format!("set {name} up, mtu {mtu}")))?;
        }
        let mut s = self.handle.address().get().set_link_index_filter(index).execute();
        let mut has = false;
        let mut others = Vec::new();
        while let Some(m) = s.try_next().await.map_err(nl("dump tunnel addresses"))? {
            let v4 = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(x)) | AddressAttribute::Address(IpAddr::V4(x)) => Some(*x),
                _ => None,
            });
            match v4 {
                Some(x) if x == addr && m.header.prefix_len == 32 => has = true,
                Some(_) => others.push(m),
                None => {}
            }
        }
        if !has {
            self.handle
                .address()
                .add(index, IpAddr::V4(addr), 32)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("add {addr}/32 to {name}")))?;
        }
        for m in others {
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(nl(format!("remove old address of {name}")))?;
        }
        Ok(index)
    }

    async fn clear_tunnel(&self, name: &str) -> Result<()> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(());
        };
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute();
        let mut addrs = Vec::new();
        while let Some(m) = s.try_next().await.map_err(nl("dump tunnel addresses"))? {
            addrs.push(m);
        }
        for m in addrs {
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(nl(format!("remove address of {name}")))?;
        }
        Ok(())
    }
}

/// In-memory routes and links with fault injection (fail the next replace).
#[derive(Debug, Default)]
pub struct FakeNet {
    pub routes: Mutex<Vec<KernelRoute>>,
    pub foreign: Mutex<Vec<Ipv4Net>>,
    pub tunnel: Mutex<Option<(Ipv4Addr, u32)>>,
    pub fail_next_replace: Mutex<bool>,
    pub calls: Mutex<usize>,
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RouteOps for FakeNet {
    async fn list_owned(&self) -> Result<Vec<KernelRoute>> {
        Ok(guard(&self.routes).clone())
    }
    async fn replace(&self, r: &KernelRoute) -> Result<()> {
        *guard(&self.calls) += 1;
        if std::mem::take(&mut *guard(&self.fail_next_replace)) {
            return Err(NetError::Fake("injected replace failure".into()));
        }
        let mut routes = guard(&self.routes);
        routes.retain(|x| x.dst != r.dst);
        routes.push(*r);
        Ok(())
    }
    async fn delete(&self, r: &KernelRoute) -> Result<()> {
        *guard(&self.calls) += 1;
        guard(&self.routes).retain(|x| x.dst != r.dst);
        Ok(())
    }
}

impl LinkOps for FakeNet {
    async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok((name == conf::names::TUNNEL_IFACE && guard(&self.tunnel).is_some()).then_some(7))
    }
    async fn underlay(&self, ip: Ipv4Addr) -> Result<Option<Underlay>> {
        Ok(Some(Underlay {
            index: 2,
            mtu: 1500,
            subnet: Ipv4Net::new(ip, 24)
                .map(|n| n.trunc())
                .unwrap_or_else(|_| Ipv4Net::from(ip)),
        }))
    }
    async fn ensure_tunnel(&self, _name: &str, addr: Ipv4Addr, mtu: u32) -> Result<u32> {
        *guard(&self.tunnel) = Some((addr, mtu));
        Ok(7)
    }
    async fn clear_tunnel(&self, _name: &str) -> Result<()> {
        *guard(&self.tunnel) = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kr(dst: &str, gw: &str, tunnel: bool) -> KernelRoute {
        let d = DesiredRoute {
            dst: dst.parse().unwrap(),
            gateway: gw.parse().unwrap(),
            tunnel,
        };
        KernelRoute::from_desired(&d, Some(7)).unwrap()
    }

    #[test]
    fn should_build_an_onlink_tunnel_route_marked_with_our_protocol() {
        let m = route_message(&kr("10.233.96.0/24", "10.102.123.104", true));
        assert_eq!(m.header.protocol, RouteProtocol::Other(88));
        assert!(m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(m.header.destination_prefix_length, 24);
        assert!(m.attributes.contains(&RouteAttribute::Oif(7)));
        assert_eq!(parse_route(&m), Some(kr("10.233.96.0/24", "10.102.123.104", true)));
    }

    #[tokio::test]
    async fn should_replace_missing_delete_gone_and_be_idempotent() {
        let fake = FakeNet::default();
        fake.routes.lock().unwrap().push(kr("10.233.1.0/24", "10.0.0.1", true));
        let want = vec![
            kr("10.233.96.0/24", "10.0.0.2", true),
            kr("10.233.92.0/24", "10.0.0.3", false),
        ];
        let rep = sync_routes(&fake, &want).await.unwrap();
        assert_eq!(rep.replaced.len(), 2);
        assert_eq!(rep.deleted, vec!["10.233.1.0/24".parse::<Ipv4Net>().unwrap()]);
        let calls = *fake.calls.lock().unwrap();
        let rep = sync_routes(&fake, &want).await.unwrap();
        assert_eq!(
            rep,
            RouteSyncReport {
                total: 2,
                ..Default::default()
            }
        );
        assert_eq!(*fake.calls.lock().unwrap(), calls, "second sync must not write");
    }

    #[tokio::test]
    async fn should_continue_past_a_failed_replace_and_retry_next_time() {
        let fake = FakeNet::default();
        *fake.fail_next_replace.lock().unwrap() = true;
        let want = vec![
            kr("10.233.96.0/24", "10.0.0.2", true),
            kr("10.233.92.0/24", "10.0.0.3", true),
        ];
        assert!(sync_routes(&fake, &want).await.is_err());
        assert_eq!(fake.routes.lock().unwrap().len(), 1);
        sync_routes(&fake, &want).await.unwrap();
        assert_eq!(fake.routes.lock().unwrap().len(), 2);
    }
}
