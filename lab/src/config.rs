//! The lab's configuration, written by `up` and read by the controller (inside the VM or not).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::topology::NodeSpec;

/// Default state directory: shared read-write into the micro-VM at the same path.
pub const DEFAULT_STATE_DIR: &str = "/run/warren-lab";
/// Default cache for the micro-VM's kernel and initramfs.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/warren-lab";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabConfig {
    pub nodes: Vec<NodeSpec>,
    pub state_dir: PathBuf,
    /// The warren-lab binary (the same path inside the VM).
    pub exe: PathBuf,
    /// Where warren's binaries (`warren`, `warren-ipam`, `warren-node`) are.
    pub bin_dir: PathBuf,
    pub ipip_mode: String,
    pub proxy_mode: String,
    pub in_vm: bool,
    /// Where the controller binds the API stand-in and its control port (inside the VM: 0.0.0.0).
    pub api_bind: SocketAddr,
    pub ctl_bind: SocketAddr,
    /// What the host side connects to (127.0.0.1, forwarded into the VM when there is one).
    pub host_api: SocketAddr,
    pub host_ctl: SocketAddr,
    /// Underlay MTU of the nodes' interfaces.
    pub underlay_mtu: u32,
    /// Run warren-node on every node (otherwise the lab writes each node's conflist itself).
    pub warren_node: bool,
}

impl LabConfig {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("lab.json")
    }

    pub fn load(state_dir: &Path) -> Result<Self> {
        let p = Self::path(state_dir);
        let text = std::fs::read_to_string(&p).with_context(|| format!("no lab is up ({} is missing)", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    pub fn save(&self) -> Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        let p = Self::path(&self.state_dir);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    /// Kubeconfig for the host side (kubectl through `warren-lab kubectl`).
    pub fn host_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig")
    }

    /// Kubeconfig for processes on the nodes (server = node1's address, as in a kubeadm cluster).
    pub fn node_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig-nodes")
    }

    /// Kubeconfig for the controller itself (server = where it bound the API).
    pub fn local_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig-local")
    }

    pub fn control_plane(&self) -> Option<&NodeSpec> {
        self.nodes.first()
    }

    /// Where `up --manifest FILE` leaves the manifest for the controller (inside the VM too).
    pub fn manifest_override_path(state_dir: &Path) -> PathBuf {
        state_dir.join("warren.yaml")
    }

    /// The manifest warren-node runs from: the `up --manifest` copy, else the built-in
    /// deploy/warren.yaml.
    pub fn manifest_text(&self) -> Result<String> {
        let p = Self::manifest_override_path(&self.state_dir);
        match std::fs::read_to_string(&p) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(crate::manifest::BUILTIN.to_string()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// What the kubelet mounts at the service account path of the warren-node pods: the API
    /// stand-in's token and CA, and the namespace.
    pub fn service_account_dir(&self) -> PathBuf {
        self.state_dir.join("serviceaccount")
    }
}
