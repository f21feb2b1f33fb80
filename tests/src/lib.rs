//! Shared fixtures for warren's integration tests, benchmarks and soaks.
pub mod cni;
pub mod netns;
pub mod runtime;
