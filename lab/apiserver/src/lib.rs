//! Kubernetes API stand-in (lands with the lab issue).
