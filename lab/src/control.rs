//! The lab controller's control channel: one JSON request and one JSON reply per TCP connection,
//! on 127.0.0.1 (forwarded into the micro-VM when the lab runs in one).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::podserve::Proto;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Run a command at `target` (`node:NAME`, `host:NAME`, `NS/POD`).
    Exec {
        target: String,
        argv: Vec<String>,
    },
    HostAdd {
        name: String,
        ip: String,
        ports: Vec<(u16, Proto)>,
    },
    HostDel {
        name: String,
    },
    Probe {
        from: String,
        to: String,
        port: u16,
        protocol: Proto,
        timeout_ms: u64,
    },
    Matrix {
        namespaces: Vec<String>,
        port: u16,
        protocol: Proto,
        timeout_ms: u64,
    },
    /// Restart (or stop/start) a node component, for tests: `component` = `warren-node`, `kube-proxy`, `apiserver`.
    Restart {
        node: String,
        component: String,
        #[serde(default)]
        down_ms: u64,
        /// Extra arguments for the restarted component (e.g. warren-node flags); they stay in
        /// effect for later restarts until replaced.
        #[serde(default)]
        extra_args: Option<Vec<String>>,
    },
    /// Starts a real warren-node for each of `nodes` (new Nodes, no podCIDR, no block annotation,
    /// each in a namespace on the lab switch) in the same instant; replies with the blocks they
    /// claimed ([`crate::extranode::Race`]) after removing the nodes again.
    BlockRace {
        nodes: Vec<String>,
        /// One-way delay (tc netem) on the extra nodes' links: it stretches each daemon's
        /// list → write window past the spread of their start-up, so the claims overlap.
        #[serde(default)]
        latency_ms: u64,
        #[serde(default = "default_race_timeout_ms")]
        timeout_ms: u64,
    },
    Shutdown,
}

fn default_race_timeout_ms() -> u64 {
    60_000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub data: Value,
}

impl Reply {
    pub fn ok(data: Value) -> Self {
        Self {
            ok: true,
            error: String::new(),
            data,
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: format!("{e:#}"),
            data: Value::Null,
        }
    }
}

/// Sends one request and waits for its reply.
pub async fn call(addr: SocketAddr, req: &Request, timeout: Duration) -> Result<Value> {
    let fut = async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the lab controller at {addr}"))?;
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        s.write_all(&line).await?;
        let mut r = BufReader::new(s);
        let mut buf = String::new();
        r.read_line(&mut buf).await?;
        if buf.is_empty() {
            return Err(anyhow!("the lab controller closed the connection without answering"));
        }
        let reply: Reply = serde_json::from_str(&buf).context("decoding the controller's reply")?;
        if reply.ok {
            Ok(reply.data)
        } else {
            Err(anyhow!("{}", reply.error))
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("the lab controller did not answer within {timeout:?}"))?
}
