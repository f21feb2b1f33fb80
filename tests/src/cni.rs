//! Running CNI plugins the way a runtime does: one plugin with env + stdin, or a whole
//! conflist with prevResult threaded through (libcni's semantics, in miniature).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::netns::NetNs;

/// Debian's reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// Where the built `warren` binaries are: `$WARREN_BIN_DIR`, else `<workspace>/target/release`
/// (or `debug` when only that exists).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("WARREN_BIN_DIR") {
        return PathBuf::from(d);
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let release = ws.join("target/release");
    if release.join("warren").exists() {
        return release;
    }
    ws.join("target/debug")
}

pub fn warren_bin() -> PathBuf {
    bin_dir().join("warren")
}

/// CNI_PATH for tests: warren's binaries first, then the reference plugins.
pub fn cni_path() -> String {
    format!("{}:{REFERENCE_PLUGINS}", bin_dir().display())
}

/// One attachment's CNI environment.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: String,
}

impl Attachment {
    /// A Kubernetes pod `<namespace>/<name>` in `netns`.
    pub fn pod(container_id: &str, netns: &NetNs, k8s_ns: &str, pod: &str) -> Self {
        Self {
            container_id: container_id.to_string(),
            netns: Some(netns.path()),
            ifname: "eth0".to_string(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={k8s_ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id}"),
        }
    }

    pub fn env(&self, command: &str) -> HashMap<String, String> {
        let mut env = HashMap::new();
        env.insert("CNI_COMMAND".into(), command.into());
        env.insert("CNI_CONTAINERID".into(), self.container_id.clone());
        env.insert("CNI_IFNAME".into(), self.ifname.clone());
        env.insert("CNI_ARGS".into(), self.args.clone());
        env.insert("CNI_PATH".into(), cni_path());
        if let Some(ns) = &self.netns {
            env.insert("CNI_NETNS".into(), ns.display().to_string());
        }
        env.insert("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into());
        env
    }
}

/// What a plugin printed and how it exited.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl PluginOutput {
    /// The JSON document on stdout (`Null` when there is none).
    pub fn json(&self) -> Result<Value> {
        if self.stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not one JSON document: {}", self.stdout))
    }

    /// The result of a successful call, or an error describing the failure.
    pub fn ok(&self) -> Result<Value> {
        if !self.success {
            bail!("plugin failed: {} (stderr: {})", self.stdout, self.stderr);
        }
        self.json()
    }

    /// The CNI error code of a failed call.
    pub fn error_code(&self) -> Result<u64> {
        if self.success {
            bail!("plugin succeeded but an error was expected: {}", self.stdout);
        }
        self.json()?
            .get("code")
            .and_then(Value::as_u64)
            .with_context(|| format!("no error code in {}", self.stdout))
    }
}

/// Runs a plugin binary inside `host` with an environment and a configuration.
pub fn exec_in(host: &NetNs, plugin: &Path, env: &HashMap<String, String>, stdin: &Value) -> Result<PluginOutput> {
    let mut child = host
        .command(&plugin.display().to_string())
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", plugin.display()))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(serde_json::to_string(stdin)?.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(PluginOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `warren` with `command` for `att`.
pub fn warren(host: &NetNs, command: &str, att: &Attachment, conf: &Value) -> Result<PluginOutput> {
    exec_in(host, &warren_bin(), &att.env(command), conf)
}

/// warren's configuration with warren-ipam over `subnet`, storing in `data_dir`.
pub fn warren_conf(version: &str, subnet: &str, data_dir: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "warren",
        "mtu": 1480,
        "ipam": { "type": "warren-ipam", "ranges": [[{ "subnet": subnet }]], "dataDir": data_dir.display().to_string() }
    })
}

/// Runs a plugin with an environment and no namespace (for GC/STATUS/VERSION).
pub fn warren_env(host: &NetNs, command: &str, conf: &Value) -> Result<PluginOutput> {
    let mut env = HashMap::new();
    env.insert("CNI_COMMAND".to_string(), command.to_string());
    env.insert("CNI_PATH".to_string(), cni_path());
    exec_in(host, &warren_bin(), &env, conf)
}

/// Finds a plugin binary by type in CNI_PATH order.
pub fn find_plugin(plugin_type: &str) -> Result<PathBuf> {
    for dir in cni_path().split(':') {
        let p = Path::new(dir).join(plugin_type);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("plugin {plugin_type} not found in {}", cni_path())
}

/// One plugin's configuration as libcni builds it from a conflist entry.
fn plugin_conf(list: &Value, plugin: &Value, runtime_config: &Value, prev: Option<&Value>) -> Value {
    let mut c = plugin.clone();
    c["name"] = list["name"].clone();
    c["cniVersion"] = list["cniVersion"].clone();
    // Only the capabilities a plugin declares reach it, as libcni does.
    if let (Some(caps), Some(rc)) = (
        plugin.get("capabilities").and_then(Value::as_object),
        runtime_config.as_object(),
    ) {
        let mut filtered = serde_json::Map::new();
        for (k, on) in caps {
            if on.as_bool() == Some(true) {
                if let Some(v) = rc.get(k) {
                    filtered.insert(k.clone(), v.clone());
                }
            }
        }
        if !filtered.is_empty() {
            c["runtimeConfig"] = Value::Object(filtered);
        }
    }
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

/// A conflist executed plugin by plugin, as a runtime does.
pub struct Conflist {
    pub list: Value,
    pub runtime_config: Value,
}

impl Conflist {
    pub fn new(list: Value) -> Self {
        Self {
            list,
            runtime_config: json!({}),
        }
    }

    fn plugins(&self) -> Result<Vec<Value>> {
        self.list["plugins"]
            .as_array()
            .cloned()
            .context("conflist has no plugins")
    }

    /// ADD through every plugin in order, each getting the previous one's result.
    pub fn add(&self, host: &NetNs, att: &Attachment) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for p in self.plugins()? {
            let ty = p["type"].as_str().context("plugin without type")?;
            let conf = plugin_conf(&self.list, &p, &self.runtime_config, prev.as_ref());
            let out = exec_in(host, &find_plugin(ty)?, &att.env("ADD"), &conf)?;
            prev = Some(out.ok().with_context(|| format!("ADD in {ty}"))?);
        }
        prev.context("empty conflist")
    }

    /// CHECK through every plugin in order with the cached result.
    pub fn check(&self, host: &NetNs, att: &Attachment, cached: &Value) -> Result<()> {
        for p in self.plugins()? {
            let ty = p["type"].as_str().context("plugin without type")?;
            let conf = plugin_conf(&self.list, &p, &self.runtime_config, Some(cached));
            exec_in(host, &find_plugin(ty)?, &att.env("CHECK"), &conf)?
                .ok()
                .with_context(|| format!("CHECK in {ty}"))?;
        }
        Ok(())
    }

    /// DEL through every plugin in reverse order with the cached result.
    pub fn del(&self, host: &NetNs, att: &Attachment, cached: Option<&Value>) -> Result<()> {
        for p in self.plugins()?.iter().rev() {
            let ty = p["type"].as_str().context("plugin without type")?;
            let conf = plugin_conf(&self.list, p, &self.runtime_config, cached);
            exec_in(host, &find_plugin(ty)?, &att.env("DEL"), &conf)?
                .ok()
                .with_context(|| format!("DEL in {ty}"))?;
        }
        Ok(())
    }
}

/// Files in the IPAM store of network `k8s-pod-network` that are reservations (named by an IP).
pub fn reserved_ips(data_dir: &Path) -> Result<Vec<String>> {
    let dir = data_dir.join("k8s-pod-network");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.parse::<std::net::IpAddr>().is_ok() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// The pod IP (without prefix) of an ADD result.
pub fn result_ip(result: &Value) -> Result<String> {
    let addr = result["ips"][0]["address"].as_str().context("result has no address")?;
    Ok(addr.split('/').next().unwrap_or(addr).to_string())
}
