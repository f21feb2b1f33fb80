//! kube-proxy emulation for the lab.
//!
//! The seed's puzzle is made of kube-proxy's SNAT, so the lab writes what kube-proxy writes:
//!
//! - [`endpoints`]: Endpoints / EndpointSlices from Service selectors (kube-controller-manager's
//!   part), pure.
//! - [`model`]: the mode-independent service model (`ServiceInfo` per service port with its
//!   endpoints, `categorize_endpoints`), built from Services + EndpointSlices, pure.
//! - [`render`]: iptables mode — the model rendered as `iptables-restore` text, pure.
//! - [`apply`]: writes a render into the current network namespace.
//! - [`ipvs`]: IPVS mode — kube-ipvs0, virtual servers, kube-proxy's ipsets and its smaller
//!   iptables ruleset, rendered from the same model ([`ipvs::apply`] writes them).
//! - [`controller`]: the two long-running loops (endpoints controller, per-node proxy).
//!
//! A proxy [`Mode`] picks the renderer; both consume the same [`model::ProxyInput`].

pub mod apply;
pub mod controller;
pub mod endpoints;
pub mod ipvs;
pub mod model;
pub mod render;

pub use endpoints::endpoints_for;
pub use model::{categorize_endpoints, EndpointInfo, HostOptions, Protocol, ProxyInput, ServiceInfo, TrafficPolicy};
pub use render::render_iptables;

/// kube-proxy's `--proxy-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Iptables,
    /// Needs a kernel with ip_vs (the lab's micro-VM): see [`ipvs`].
    Ipvs,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iptables" => Ok(Mode::Iptables),
            "ipvs" => Ok(Mode::Ipvs),
            other => Err(format!("unknown proxy mode {other:?} (expected iptables or ipvs)")),
        }
    }
}

/// Errors of one sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
}

/// Programs the current network namespace for `input` in `mode`.
pub fn sync(mode: Mode, ipt: &apply::Iptables, input: &ProxyInput) -> Result<(), SyncError> {
    match mode {
        Mode::Iptables => Ok(apply::apply(ipt, input)?),
        Mode::Ipvs => {
            ipvs::apply::sync(ipt, input, &ipvs::IpvsOptions::default())?;
            Ok(())
        }
    }
}
