//! warren-node: the per-node daemon. Pure parts (blocks, routes, the overlay's firewall fragment,
//! the conflist) are separate from the kernel writers (routes and links over netlink, iptables and
//! ipset through their restore tools), which sit behind traits with in-memory fakes.

pub mod block;
pub mod cniconf;
pub mod conntrack;
pub mod health;
pub mod k8s;
pub mod metrics;
pub mod netlink;
pub mod overlay_fw;
pub mod policy_sync;
pub mod reconcile;
pub mod routes;
pub mod slim_pod;
pub mod writer;
