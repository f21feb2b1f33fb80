//! The CNI_* environment, turned into typed and checked arguments.
//!
//! Everything here is hostile until checked: the container ID ends up in file contents and
//! link aliases, the interface name in `/proc/sys` paths, the netns path in an `open`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use conf::cni::parse_ip_or_cidr;
use conf::{CniError, ErrorCode};

/// Longest container ID accepted (Docker/containerd IDs are 64 hex characters).
pub const MAX_CONTAINER_ID_LEN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            other => return Err(invalid_env(format!("unknown CNI_COMMAND {other:?}"))),
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Gc => "GC",
            Self::Status => "STATUS",
            Self::Version => "VERSION",
        }
    }
}

/// `CNI_ARGS` as Kubernetes runtimes fill it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub k8s_pod_namespace: Option<String>,
    pub k8s_pod_name: Option<String>,
    pub k8s_pod_infra_container_id: Option<String>,
    pub k8s_pod_uid: Option<String>,
    /// `IP=`: specific addresses requested (host-local's convention, comma-separated).
    pub ips: Vec<IpAddr>,
    pub ignore_unknown: bool,
}

impl CniArgs {
    /// Parses `K=V;K=V`. Unknown keys are an error unless `IgnoreUnknown` is true, as in libcni.
    pub fn parse(s: &str) -> Result<Self, CniError> {
        let mut out = CniArgs::default();
        let mut unknown = Vec::new();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| invalid_env(format!("CNI_ARGS: {pair:?} is not KEY=VALUE")))?;
            match k {
                "K8S_POD_NAMESPACE" => out.k8s_pod_namespace = Some(v.to_string()),
                "K8S_POD_NAME" => out.k8s_pod_name = Some(v.to_string()),
                "K8S_POD_INFRA_CONTAINER_ID" => out.k8s_pod_infra_container_id = Some(v.to_string()),
                "K8S_POD_UID" => out.k8s_pod_uid = Some(v.to_string()),
                "IP" => {
                    for ip in v.split(',').filter(|x| !x.is_empty()) {
                        out.ips
                            .push(parse_ip_or_cidr(ip).map_err(|e| invalid_env(format!("CNI_ARGS IP: {e}")))?);
                    }
                }
                "IgnoreUnknown" => out.ignore_unknown = matches!(v.to_ascii_lowercase().as_str(), "1" | "true"),
                other => unknown.push(other.to_string()),
            }
        }
        if !unknown.is_empty() && !out.ignore_unknown {
            return Err(invalid_env(format!(
                "CNI_ARGS: unknown key(s) {} (set IgnoreUnknown=1 to allow)",
                unknown.join(", ")
            )));
        }
        Ok(out)
    }
}

/// The checked CNI environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdArgs {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
    pub raw_args: String,
    pub cni_path: Vec<PathBuf>,
}

fn invalid_env(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidEnv, msg)
}

/// host-local's rule for container IDs (`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`), with a length bound,
/// so that an ID can never name a path outside the data directory.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok {
        return Err(invalid_env(format!(
            "invalid CNI_CONTAINERID {id:?}: must match ^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$"
        )));
    }
    if id.len() > MAX_CONTAINER_ID_LEN {
        return Err(invalid_env(format!(
            "CNI_CONTAINERID is {} bytes long; at most {MAX_CONTAINER_ID_LEN} are accepted",
            id.len()
        )));
    }
    Ok(())
}

impl CmdArgs {
    /// Reads and checks the variables `command` needs (GC, STATUS and VERSION need none).
    pub fn from_env(env: &HashMap<String, String>) -> Result<Self, CniError> {
        let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let command = Command::parse(get("CNI_COMMAND").ok_or_else(|| invalid_env("CNI_COMMAND is not set"))?)?;
        let per_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = match get("CNI_CONTAINERID") {
            Some(id) => {
                validate_container_id(id)?;
                id.to_string()
            }
            None if per_attachment => return Err(invalid_env("CNI_CONTAINERID is not set")),
            None => String::new(),
        };
        let ifname = match get("CNI_IFNAME") {
            Some(name) => {
                conf::names::validate_ifname(name).map_err(|e| invalid_env(format!("CNI_IFNAME: {e}")))?;
                name.to_string()
            }
            None if per_attachment => return Err(invalid_env("CNI_IFNAME is not set")),
            None => String::new(),
        };
        let netns = get("CNI_NETNS").map(PathBuf::from);
        if matches!(command, Command::Add | Command::Check) {
            match &netns {
                None => return Err(invalid_env("CNI_NETNS is not set")),
                Some(p) if !p.is_absolute() => {
                    return Err(invalid_env(format!(
                        "CNI_NETNS {} is not an absolute path",
                        p.display()
                    )))
                }
                Some(p) if !p.exists() => return Err(invalid_env(format!("CNI_NETNS {} does not exist", p.display()))),
                Some(_) => {}
            }
        }
        let raw_args = get("CNI_ARGS").unwrap_or_default().to_string();
        let args = CniArgs::parse(&raw_args)?;
        let cni_path = get("CNI_PATH")
            .map(|p| p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect())
            .unwrap_or_default();
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            raw_args,
            cni_path,
        })
    }

    /// The key hashed into the host veth name.
    pub fn workload_key(&self) -> String {
        conf::names::workload_key(
            self.args.k8s_pod_namespace.as_deref(),
            self.args.k8s_pod_name.as_deref(),
            &self.container_id,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn should_refuse_container_ids_that_escape_the_data_dir() {
        for bad in ["../x", "/etc", ".hidden", "a/b", "", "-x", "a b", "é"] {
            assert_eq!(
                validate_container_id(bad).unwrap_err().code,
                ErrorCode::InvalidEnv,
                "{bad}"
            );
        }
        validate_container_id("abc-DEF_1.2").unwrap();
        assert!(validate_container_id(&"a".repeat(MAX_CONTAINER_ID_LEN + 1)).is_err());
    }

    #[test]
    fn should_parse_kubernetes_args_and_requested_ips() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=c;IP=10.0.0.5;FOO=bar",
        )
        .unwrap();
        assert_eq!(a.k8s_pod_namespace.as_deref(), Some("ns"));
        assert_eq!(a.k8s_pod_name.as_deref(), Some("p"));
        assert_eq!(a.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn should_refuse_unknown_args_without_ignore_unknown() {
        assert_eq!(CniArgs::parse("FOO=bar").unwrap_err().code, ErrorCode::InvalidEnv);
        assert_eq!(CniArgs::parse("IP=nope").unwrap_err().code, ErrorCode::InvalidEnv);
        assert_eq!(CniArgs::parse("novalue").unwrap_err().code, ErrorCode::InvalidEnv);
    }

    #[test]
    fn should_require_attachment_variables_for_add() {
        let e = CmdArgs::from_env(&env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")])).unwrap_err();
        assert!(e.msg.contains("CNI_CONTAINERID"));
        let e = CmdArgs::from_env(&env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent/netns"),
        ]))
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidEnv);
        let e = CmdArgs::from_env(&env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "a/b"),
        ]))
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidEnv);
    }

    #[test]
    fn should_allow_del_without_netns_and_gc_without_anything() {
        let a = CmdArgs::from_env(&env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]))
        .unwrap();
        assert_eq!(a.netns, None);
        assert_eq!(a.cni_path.len(), 2);
        assert_eq!(a.workload_key(), "abc");
        CmdArgs::from_env(&env(&[("CNI_COMMAND", "GC")])).unwrap();
        assert!(CmdArgs::from_env(&env(&[("CNI_COMMAND", "FROB")])).is_err());
    }
}
