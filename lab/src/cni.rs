//! CNI calls exactly as containerd makes them: each plugin of the node's conflist in turn, with
//! the runtime's environment, the per-plugin config (name, cniVersion, runtimeConfig, prevResult)
//! on stdin, run in the node's context so the plugin sees the node's directories.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::nodectx;

/// One attachment: what a runtime remembers between ADD and DEL.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns_path: String,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub requested_ips: Vec<String>,
}

impl Attachment {
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.pod_namespace, self.pod_name, self.container_id, self.pod_uid
        )
    }
}

/// The node's CNI context.
pub struct NodeCni<'a> {
    pub exe: &'a Path,
    pub netns: String,
    pub binds: &'a [(PathBuf, PathBuf)],
    /// The node's `/etc/cni/net.d` as seen from the lab controller.
    pub conf_dir: PathBuf,
}

impl NodeCni<'_> {
    /// The first conflist in lexical order, as libcni picks it.
    pub fn conflist(&self) -> Result<Option<Value>> {
        let Ok(rd) = std::fs::read_dir(&self.conf_dir) else {
            return Ok(None);
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conflist")))
            .collect();
        files.sort();
        let Some(first) = files.first() else { return Ok(None) };
        let text = std::fs::read_to_string(first).with_context(|| format!("reading {}", first.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", first.display()))?;
        Ok(Some(v))
    }

    pub fn add(&self, conflist: &Value, att: &Attachment) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for plugin in plugins(conflist)? {
            let conf = plugin_conf(conflist, plugin, prev.as_ref(), att)?;
            prev = Some(self.exec("ADD", &conf, att)?);
        }
        prev.ok_or_else(|| anyhow!("conflist has no plugins"))
    }

    pub fn del(&self, conflist: &Value, att: &Attachment, prev: Option<&Value>) -> Result<()> {
        let mut errors = Vec::new();
        for plugin in plugins(conflist)?.iter().rev() {
            let conf = plugin_conf(conflist, plugin, prev, att)?;
            if let Err(e) = self.exec("DEL", &conf, att) {
                errors.push(format!("{e:#}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("CNI DEL: {}", errors.join("; "))
        }
    }

    fn exec(&self, command: &str, conf: &Value, att: &Attachment) -> Result<Value> {
        let ty = conf
            .get("type")
            .and_then(Value::as_str)
            .context("plugin without type")?;
        if ty.contains('/') {
            bail!("plugin type {ty:?} is not a plain name");
        }
        let argv = vec![format!("/opt/cni/bin/{ty}")];
        let mut cmd = nodectx::node_command(self.exe, &self.netns, self.binds, &argv);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns_path)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", att.cni_args())
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting CNI plugin {ty}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&serde_json::to_vec(conf)?)?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!(
                "CNI {command} via {ty} failed ({}): {} {}",
                out.status,
                stdout.trim(),
                stderr.trim()
            );
        }
        if command == "DEL" || stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).with_context(|| format!("decoding {ty}'s {command} result: {stdout}"))
    }
}

fn plugins(conflist: &Value) -> Result<&Vec<Value>> {
    conflist
        .get("plugins")
        .and_then(Value::as_array)
        .context("conflist without \"plugins\"")
}

fn plugin_conf(conflist: &Value, plugin: &Value, prev: Option<&Value>, att: &Attachment) -> Result<Value> {
    let mut conf: Map<String, Value> = plugin.as_object().cloned().context("plugin entry is not an object")?;
    conf.insert("name".into(), conflist.get("name").cloned().unwrap_or(Value::Null));
    conf.insert(
        "cniVersion".into(),
        conflist.get("cniVersion").cloned().unwrap_or(json!("1.0.0")),
    );
    let caps = plugin.get("capabilities").and_then(Value::as_object);
    let mut rc = Map::new();
    if caps
        .and_then(|c| c.get("ips"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
        && !att.requested_ips.is_empty()
    {
        rc.insert("ips".into(), json!(att.requested_ips));
    }
    if !rc.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(rc));
    }
    if let Some(p) = prev {
        if !p.is_null() {
            conf.insert("prevResult".into(), p.clone());
        }
    }
    Ok(Value::Object(conf))
}

/// The pod's first IPv4 address from a CNI result.
pub fn result_ip(result: &Value) -> Option<String> {
    result.get("ips")?.as_array()?.iter().find_map(|ip| {
        let a = ip.get("address")?.as_str()?;
        let addr = a.split('/').next()?;
        addr.parse::<std::net::Ipv4Addr>().ok().map(|v| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_build_per_plugin_config_as_libcni_does() {
        let conflist = json!({"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[
            {"type":"warren","capabilities":{"ips":true},"ipam":{"type":"warren-ipam"}},{"type":"portmap"}]});
        let att = Attachment {
            container_id: "c1".into(),
            netns_path: "/run/netns/x".into(),
            ifname: "eth0".into(),
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            requested_ips: vec!["10.233.96.32".into()],
        };
        let p = plugins(&conflist).unwrap();
        let c0 = plugin_conf(&conflist, &p[0], None, &att).unwrap();
        assert_eq!(c0["name"], "k8s-pod-network");
        assert_eq!(c0["runtimeConfig"]["ips"][0], "10.233.96.32");
        assert!(c0.get("prevResult").is_none());
        let prev = json!({"ips":[{"address":"10.233.96.32/32"}]});
        let c1 = plugin_conf(&conflist, &p[1], Some(&prev), &att).unwrap();
        assert!(c1.get("runtimeConfig").is_none());
        assert_eq!(c1["prevResult"], prev);
        assert_eq!(result_ip(&prev).as_deref(), Some("10.233.96.32"));
        assert!(att.cni_args().contains("K8S_POD_NAME=p"));
    }
}
