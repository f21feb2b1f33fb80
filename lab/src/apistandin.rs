//! The lab's API stand-in as the nodes see it: the server itself plus the forwarder that makes it
//! reachable at `https://<control-plane node>:6443` inside the node network, with an outage switch
//! (`warren-lab restart apiserver`) that takes both down together, as a control-plane restart does.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::netns;
use crate::topology::{self, NodeSpec};

/// The running server and its forwarder; `None` while it is down.
struct Running {
    server: lab_apiserver::Server,
    forwarder: Option<JoinHandle<()>>,
}

pub struct ApiStandIn {
    /// Where node processes connect (the control-plane node, port 6443), if there is one.
    on_node: Option<NodeSpec>,
    /// The server's own address as reachable from the controller (loopback + bound port).
    local: SocketAddr,
    url: String,
    running: Mutex<Option<Running>>,
}

impl ApiStandIn {
    /// Starts the server and, when `on_node` is given, its forwarder in that node's namespace.
    pub async fn start(cfg: lab_apiserver::Config, on_node: Option<NodeSpec>) -> Result<Self> {
        let server = lab_apiserver::Server::start(cfg)
            .await
            .map_err(|e| anyhow!("starting the API stand-in: {e}"))?;
        let url = server.url();
        let bound: SocketAddr = url.trim_start_matches("https://").parse().context("API url")?;
        let local = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), bound.port());
        let forwarder = match &on_node {
            Some(n) => Some(spawn_forwarder(n, local)?),
            None => None,
        };
        Ok(Self {
            on_node,
            local,
            url,
            running: Mutex::new(Some(Running { server, forwarder })),
        })
    }

    /// `https://127.0.0.1:<port>`, for the controller's own clients.
    pub fn local_url(&self) -> String {
        format!("https://{}", self.local)
    }

    /// The server's own URL (what it bound).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes a kubeconfig for this server with `server_url` as its address.
    pub async fn write_kubeconfig(&self, path: &std::path::Path, server_url: &str) -> Result<()> {
        let guard = self.running.lock().await;
        let r = guard.as_ref().ok_or_else(|| anyhow!("the API stand-in is down"))?;
        r.server
            .write_kubeconfig(path, Some(server_url))
            .map_err(|e| anyhow!("{e}"))
    }

    /// An outage of `down`: the forwarder on the node and the server stop (listeners closed, open
    /// connections and watches cut), then both come back on the same addresses with the saved
    /// objects, CA and token. Returns how long the API was unreachable.
    pub async fn restart(&self, down: Duration) -> Result<Duration> {
        let mut guard = self.running.lock().await;
        let r = guard.take().ok_or_else(|| anyhow!("the API stand-in is not running"))?;
        let t0 = std::time::Instant::now();
        if let Some(f) = r.forwarder {
            // Aborting the accept loop drops its listener and every forwarded connection with it.
            f.abort();
            let _ = f.await;
        }
        info!(?down, "API stand-in: outage begins");
        let server = r
            .server
            .restart(down)
            .await
            .map_err(|e| anyhow!("restarting the API stand-in: {e}"))?;
        let forwarder = match &self.on_node {
            Some(n) => Some(spawn_forwarder(n, self.local)?),
            None => None,
        };
        *guard = Some(Running { server, forwarder });
        let outage = t0.elapsed();
        info!(?outage, "API stand-in: serving again");
        Ok(outage)
    }
}

/// Binds `<node ip>:6443` in the node's namespace and forwards every connection to `api`.
fn spawn_forwarder(node: &NodeSpec, api: SocketAddr) -> Result<JoinHandle<()>> {
    let addr = SocketAddr::new(IpAddr::V4(node.ip), topology::API_PORT);
    let l = netns::listener_in(&node.netns(), addr)?;
    let l = tokio::net::TcpListener::from_std(l)?;
    Ok(tokio::spawn(async move {
        if let Err(e) = forward(l, api).await {
            warn!("API forwarder on the control-plane node stopped: {e:#}");
        }
    }))
}

async fn forward(l: tokio::net::TcpListener, api: SocketAddr) -> Result<()> {
    // Connections live in this set so that aborting the forwarder cuts them too.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (mut inbound, _) = tokio::select! {
            a = l.accept() => a?,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        conns.spawn(async move {
            if let Ok(mut out) = tokio::net::TcpStream::connect(api).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}
