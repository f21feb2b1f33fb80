//! warren-lab: a three-node cluster on one machine.
pub mod kubeproxy;
