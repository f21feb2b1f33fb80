//! warren's NetworkPolicy compiler: pure, no I/O.
//!
//! - [`model`]: the normalized cluster model; [`convert`] builds it from k8s-openapi objects and
//!   reports (and skips) policies warren cannot enforce.
//! - [`compile()`]: model + this node's workloads → [`conf::dataplane::DesiredDataplane`] (ipsets and
//!   filter chains, Calico's layout with warren's names; see [`compile`] module docs).
//!   [`compile::Compiler`] is the same compiler kept across calls: it recomputes only what changed
//!   (`compile()` is one call on a new one; a property test holds the two equal).
//! - [`labels`]: pods' labels, packed.
//! - [`rule`]: the structured iptables rule that renders to, and parses from, the rule strings.
//! - [`interp`]: an in-memory netfilter that runs packets through compiled output.
//! - [`reference`]: the Kubernetes semantics evaluated directly, the oracle for tests.
//! - [`query`]: `ingress_allows` at any node, with the deciding policy rule, and a whole-cluster
//!   simulation along real packet paths.

pub mod compile;
pub mod convert;
pub mod interp;
pub mod labels;
pub mod model;
pub mod query;
pub mod reference;
pub mod rule;

pub use compile::{compile, Compiled, NodeCtx, Workload};
pub use labels::{LabelLookup, PackedLabels};
pub use model::{Model, Namespace, Peer, Pod, Policy, PolicyError, PortMatch, PortSpec, Protocol, Selector};
pub use query::{ingress_allows, ClusterSim, Decision, NodeView, PacketExplanation};
pub use reference::{Endpoint, RuleRef};
