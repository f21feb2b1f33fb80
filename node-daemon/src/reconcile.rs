//! One reconcile pass, independent of where the Node list comes from: tunnel device, peer routes,
//! and the overlay's packet-filter fragment (merged with what other parts, e.g. policy, want).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use conf::daemon::IpipMode;
use conf::dataplane::{DesiredDataplane, Table};
use conf::names::TUNNEL_IFACE;
use ipnet::Ipv4Net;

use crate::metrics::Metrics;
use crate::netlink::{sync_routes, KernelRoute, LinkOps, NetError, RouteOps};
use crate::overlay_fw::{overlay_dataplane, OverlayFw, INPUT_CHAIN};
use crate::routes::{desired_routes, NodeInfo};
use crate::writer::{CommandRunner, Writer, WriterError};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("routes: {0}")]
    Net(#[from] NetError),
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error("dataplane parts conflict: {0}")]
    Merge(String),
}

/// Static facts of this node.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub name: String,
    pub block: Ipv4Net,
    pub ip: Option<std::net::Ipv4Addr>,
    pub underlay_subnet: Option<Ipv4Net>,
    pub mtu: u32,
    pub mode: IpipMode,
    pub pool: Ipv4Net,
    pub nat_outgoing: bool,
}

pub struct Reconciler<N: RouteOps + LinkOps, C: CommandRunner> {
    pub net: N,
    pub writer: Writer<C>,
    pub local: LocalNode,
    pub metrics: Arc<Metrics>,
    /// The routes the last successful pass left in the kernel: a route still desired the same
    /// that had to be written again was changed by someone else (drift).
    programmed_routes: Option<BTreeSet<KernelRoute>>,
}

/// What one pass did (for logs and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub routes: usize,
    pub routes_changed: usize,
    pub dataplane_changed: Vec<String>,
    pub drifted: Vec<String>,
}

impl<N: RouteOps + LinkOps, C: CommandRunner> Reconciler<N, C> {
    pub fn new(net: N, writer: Writer<C>, local: LocalNode, metrics: Arc<Metrics>) -> Self {
        Self {
            net,
            writer,
            local,
            metrics,
            programmed_routes: None,
        }
    }

    /// Routes first (they carry pod traffic), then the packet filter. `extra` is what other parts
    /// (policy) want in the filter; `sweep` allows removing stale warren objects.
    pub async fn reconcile(
        &mut self,
        nodes: &[NodeInfo],
        extra: Option<DesiredDataplane>,
        sweep: bool,
    ) -> Result<Outcome, ReconcileError> {
        let l = &self.local;
        let start = Instant::now();
        let tunnel_index = if l.mode == IpipMode::Never {
            None
        } else {
            Some(self.net.ensure_tunnel(TUNNEL_IFACE, l.block.network(), l.mtu).await?)
        };
        let desired = desired_routes(&l.name, Some(l.block), l.underlay_subnet, nodes, l.mode);
        let kernel: Vec<KernelRoute> = desired
            .values()
            .filter_map(|r| KernelRoute::from_desired(r, tunnel_index))
            .collect();
        let res = sync_routes(&self.net, &kernel).await;
        let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.metrics
            .route_sync_micros_total
            .fetch_add(micros, Ordering::Relaxed);
        self.metrics.route_sync_micros_last.store(micros, Ordering::Relaxed);
        Metrics::inc(&self.metrics.route_syncs);
        let report = res.inspect_err(|_| {
            Metrics::inc(&self.metrics.route_sync_errors);
            self.programmed_routes = None;
        })?;
        let now: BTreeSet<KernelRoute> = kernel.iter().copied().collect();
        let mut route_drift: Vec<String> = Vec::new();
        if let Some(before) = &self.programmed_routes {
            let wanted_before = |dst: &Ipv4Net| now.iter().find(|r| r.dst == *dst).is_some_and(|r| before.contains(r));
            // Rewritten although desired as before: deleted or altered behind our back.
            route_drift.extend(
                report
                    .replaced
                    .iter()
                    .filter(|d| wanted_before(d))
                    .map(|d| format!("route {d}")),
            );
        }
        self.programmed_routes = Some(now);
        self.metrics.routes.store(kernel.len() as u64, Ordering::Relaxed);
        self.metrics.ready.store(true, Ordering::Relaxed);

        let fw = OverlayFw {
            node_ips: nodes.iter().filter_map(|n| n.internal_ip).chain(l.ip).collect(),
            pool: l.pool,
            blocks: nodes
                .iter()
                .filter_map(|n| n.block)
                .chain([l.block])
                .collect::<BTreeSet<_>>(),
            local_block: Some(l.block),
            nat_outgoing: l.nat_outgoing,
            mode: l.mode,
        };
        let mut dp = overlay_dataplane(&fw);
        if let Some(mut extra) = extra {
            // Both parts own a piece of WARREN-INPUT: the workload checks (spoofed sources, IPIP
            // from pods) go first, then the overlay's IPIP-only-from-nodes rules.
            let key = (Table::Filter, INPUT_CHAIN.to_string());
            if let Some(theirs) = extra.chains.remove(&key) {
                let mut both = Vec::clone(&theirs);
                both.extend(dp.chains.remove(&key).iter().flat_map(|c| c.iter().cloned()));
                dp.chains.insert(key, Arc::new(both));
            }
            dp.merge(extra).map_err(ReconcileError::Merge)?;
        }
        let start = Instant::now();
        let applied = self.writer.apply(&dp, sweep);
        let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.metrics
            .dataplane_apply_micros_total
            .fetch_add(micros, Ordering::Relaxed);
        Metrics::inc(&self.metrics.dataplane_applies);
        self.metrics
            .dataplane_untidy
            .store(self.writer.untidy() as u64, Ordering::Relaxed);
        let applied = applied.inspect_err(|_| Metrics::inc(&self.metrics.dataplane_apply_errors))?;
        let mut drifted = route_drift;
        drifted.extend(applied.drifted);
        if !drifted.is_empty() {
            self.metrics
                .drift_repairs
                .fetch_add(drifted.len() as u64, Ordering::Relaxed);
            tracing::warn!(drifted = ?drifted, "repaired dataplane drift");
        }
        Ok(Outcome {
            routes: report.total,
            routes_changed: report.replaced.len() + report.deleted.len(),
            dataplane_changed: applied.changed,
            drifted,
        })
    }

    /// Removes what make-before-break writes left ([`Writer::tidy`]); nothing packets reach.
    pub fn tidy(&mut self) -> Result<Vec<String>, WriterError> {
        let r = self.writer.tidy();
        self.metrics
            .dataplane_untidy
            .store(self.writer.untidy() as u64, Ordering::Relaxed);
        let r = r.inspect_err(|_| Metrics::inc(&self.metrics.dataplane_apply_errors))?;
        if !r.changed.is_empty() {
            tracing::debug!(removed = ?r.changed, "dataplane leftovers removed");
        }
        Ok(r.changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::FakeNet;
    use crate::writer::fake::FakeKernel;
    use crate::writer::Backend;

    fn node(name: &str, ip: &str, block: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            internal_ip: Some(ip.parse().unwrap()),
            block: Some(block.parse().unwrap()),
        }
    }

    #[tokio::test]
    async fn should_program_tunnel_routes_and_filter_then_follow_node_changes() {
        let mut r = Reconciler::new(
            FakeNet::default(),
            Writer::new(FakeKernel::new(), Backend::nft()),
            LocalNode {
                name: "node1".into(),
                block: "10.233.90.0/24".parse().unwrap(),
                ip: Some("10.102.123.117".parse().unwrap()),
                underlay_subnet: None,
                mtu: 1480,
                mode: IpipMode::Always,
                pool: "10.233.64.0/18".parse().unwrap(),
                nat_outgoing: true,
            },
            Arc::new(Metrics::default()),
        );
        let mut nodes = vec![
            node("node1", "10.102.123.117", "10.233.90.0/24"),
            node("node2", "10.102.123.104", "10.233.96.0/24"),
            node("node3", "10.102.123.143", "10.233.92.0/24"),
        ];
        let o = r.reconcile(&nodes, None, false).await.unwrap();
        assert_eq!((o.routes, o.routes_changed), (2, 2));
        assert_eq!(
            *r.net.tunnel.lock().unwrap(),
            Some(("10.233.90.0".parse().unwrap(), 1480))
        );
        assert!(r
            .net
            .routes
            .lock()
            .unwrap()
            .iter()
            .all(|x| x.onlink && x.oif == Some(7)));
        let hosts = r.writer.runner().set_members("warren-all-hosts").unwrap();
        assert_eq!(hosts.len(), 3);
        assert!(r.metrics.ready.load(Ordering::Relaxed));

        // A route deleted behind warren's back is put back, named and counted as drift.
        r.net
            .routes
            .lock()
            .unwrap()
            .retain(|x| x.dst != "10.233.96.0/24".parse::<Ipv4Net>().unwrap());
        let o = r.reconcile(&nodes, None, false).await.unwrap();
        assert_eq!(o.drifted, vec!["route 10.233.96.0/24".to_string()]);
        assert_eq!(r.metrics.drift_repairs.load(Ordering::Relaxed), 1);
        assert_eq!(r.net.routes.lock().unwrap().len(), 2);

        nodes.retain(|n| n.name != "node3");
        let o = r.reconcile(&nodes, None, true).await.unwrap();
        assert_eq!((o.routes, o.routes_changed), (1, 1));
        assert_eq!(r.writer.runner().set_members("warren-all-hosts").unwrap().len(), 2);
        let o = r.reconcile(&nodes, None, true).await.unwrap();
        assert_eq!(
            o,
            Outcome {
                routes: 1,
                ..Default::default()
            },
            "steady state writes nothing"
        );
    }
}
