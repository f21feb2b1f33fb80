//! `deploy/warren.yaml` as the lab runs it: the DaemonSet's init containers and daemon container
//! turned into command lines, environment and host mounts the way the kubelet would, so that every
//! lab run proves the manifest users apply and the binary agree. Pure: no files, no processes.
//!
//! What the kubelet does and the lab reproduces: `command` + `args` with `$(VAR)` expansion, `env`
//! (literal, `configMapKeyRef`, the downward API's `fieldRef`), `envFrom` ConfigMaps, the
//! `KUBERNETES_SERVICE_*` variables and the service account's token mount, and `hostPath` volumes
//! (checked by type) mounted at their `mountPath`. What it cannot (Secrets, non-hostPath volumes,
//! a container without `command`, a pod off the host network) is refused with a reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, PodSpec};
use serde::Deserialize;

/// The manifest the lab runs unless `warren-lab up --manifest FILE` says otherwise.
pub const BUILTIN: &str = include_str!("../../deploy/warren.yaml");

/// Where the image keeps warren's binaries (deploy/Dockerfile copies them there); the lab mounts
/// its own binary directory at this path, so the manifest's `command` runs unchanged.
pub const IMAGE_BIN_DIR: &str = "/usr/local/bin";

/// The image's root home directory (empty in the image). The lab mounts an empty directory there:
/// the lab machine's own `/root/.kube/config`, if any, must not stand in for the pod's in-cluster
/// access (kube clients try `$HOME/.kube/config` first).
pub const IMAGE_HOME: &str = "/root";

/// Where the kubelet mounts a pod's service account token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The environment a container of the image starts with (Debian's default PATH; HOME as the
/// runtime sets it for root).
const IMAGE_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
];

/// Why the lab cannot run a manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("document {doc} is not valid YAML: {reason}")]
    Yaml { doc: usize, reason: String },
    #[error("document {doc} has no `kind`")]
    NoKind { doc: usize },
    #[error("document {doc} is not a valid {kind}: {reason}")]
    BadObject { doc: usize, kind: String, reason: String },
    #[error("the manifest has no DaemonSet: nothing runs warren-node")]
    NoDaemonSet,
    #[error("the manifest has {0} DaemonSets; the lab runs exactly one")]
    ManyDaemonSets(usize),
    #[error("DaemonSet {0} has no pod spec")]
    NoPodSpec(String),
    #[error("DaemonSet {0} is not hostNetwork: the lab runs its pod in the node's own network namespace")]
    NotHostNetwork(String),
    #[error("DaemonSet {ds} has {n} containers; the lab runs exactly one daemon container")]
    ContainerCount { ds: String, n: usize },
    #[error("container {container}: no `command`; the lab does not read the image's ENTRYPOINT")]
    NoCommand { container: String },
    #[error("container {container}: command {path} is not one of the image's binaries in {IMAGE_BIN_DIR}")]
    NotImageBinary { container: String, path: String },
    #[error(
        "container {container}: env {var} reads ConfigMap {name}, which the manifest does not define in {namespace}"
    )]
    NoConfigMap {
        container: String,
        var: String,
        name: String,
        namespace: String,
    },
    #[error("container {container}: env {var} needs key {key} of ConfigMap {name}, which has no such key")]
    NoConfigKey {
        container: String,
        var: String,
        name: String,
        key: String,
    },
    #[error("container {container}: env {var} uses fieldRef {path}, which the lab does not provide")]
    UnsupportedField {
        container: String,
        var: String,
        path: String,
    },
    #[error("container {container}: env {var} takes its value from {source_kind}, which the lab does not provide")]
    UnsupportedEnvSource {
        container: String,
        var: String,
        source_kind: String,
    },
    #[error("container {container}: env {var} has neither a value nor a valueFrom")]
    EmptyEnv { container: String, var: String },
    #[error("container {container}: volumeMount {volume} names no volume of the pod")]
    UnknownVolume { container: String, volume: String },
    #[error("volume {0}: only hostPath volumes can be mapped onto a lab node")]
    NotHostPath(String),
    #[error("volume {volume}: hostPath type {kind:?} is not one the lab knows")]
    BadHostPathType { volume: String, kind: String },
    #[error("container {container}: {mount_path} is a file mounted at another path ({host_path}); the lab binds only directories elsewhere")]
    FileElsewhere {
        container: String,
        host_path: String,
        mount_path: String,
    },
    #[error("cannot set {var}: the daemon container has no such variable")]
    NoSuchSetting { var: String },
}

/// A `hostPath` volume's type: what must exist before the pod starts, and what the kubelet creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPathType {
    /// No check (`""`, the default).
    Unchecked,
    Directory,
    DirectoryOrCreate,
    File,
    FileOrCreate,
}

impl HostPathType {
    fn parse(volume: &str, s: Option<&str>) -> Result<Self, ManifestError> {
        match s.unwrap_or("") {
            "" => Ok(HostPathType::Unchecked),
            "Directory" => Ok(HostPathType::Directory),
            "DirectoryOrCreate" => Ok(HostPathType::DirectoryOrCreate),
            "File" => Ok(HostPathType::File),
            "FileOrCreate" => Ok(HostPathType::FileOrCreate),
            other => Err(ManifestError::BadHostPathType {
                volume: volume.to_string(),
                kind: other.to_string(),
            }),
        }
    }

    /// Whether the path is a file rather than a directory.
    pub fn is_file(self) -> bool {
        matches!(self, HostPathType::File | HostPathType::FileOrCreate)
    }
}

/// One host path mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    /// The node's path (`hostPath.path`).
    pub host_path: PathBuf,
    /// Where the container sees it.
    pub mount_path: PathBuf,
    pub kind: HostPathType,
    pub read_only: bool,
}

/// One container, ready to start: what the kubelet would hand the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPlan {
    pub name: String,
    /// `command` + `args`, `$(VAR)` expanded; `argv[0]` is a path inside [`IMAGE_BIN_DIR`].
    pub argv: Vec<String>,
    /// The whole environment, in the order the kubelet builds it (later entries win).
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
}

impl ContainerPlan {
    /// The value the container sees for `name`.
    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The (source, target) bind mounts that give this container, run in a lab node's context,
    /// the view it has in its pod: the lab's binaries as the image's [`IMAGE_BIN_DIR`] and an
    /// empty directory as its [`IMAGE_HOME`] (`image`), each host
    /// path from the node (`node_dirs` maps a node's own directories, e.g. its `/etc/cni/net.d`,
    /// to where the lab keeps them; every other host path is the lab machine's, shared by the
    /// nodes as a real node's `/run` or `/lib/modules` is its own), and the service account.
    /// A host path mounted at its own path needs no bind.
    pub fn binds(
        &self,
        image: &ImageDirs<'_>,
        node_dirs: &[(PathBuf, PathBuf)],
        service_account_dir: Option<&Path>,
    ) -> Result<Vec<(PathBuf, PathBuf)>, ManifestError> {
        let mut out = vec![
            (image.bin.to_path_buf(), PathBuf::from(IMAGE_BIN_DIR)),
            (image.home.to_path_buf(), PathBuf::from(IMAGE_HOME)),
        ];
        for m in &self.mounts {
            let source = node_source(&m.host_path, node_dirs);
            if source == m.mount_path {
                continue;
            }
            if m.kind.is_file() {
                return Err(ManifestError::FileElsewhere {
                    container: self.name.clone(),
                    host_path: m.host_path.display().to_string(),
                    mount_path: m.mount_path.display().to_string(),
                });
            }
            out.push((source, m.mount_path.clone()));
        }
        if let Some(sa) = service_account_dir {
            out.push((sa.to_path_buf(), PathBuf::from(SERVICE_ACCOUNT_DIR)));
        }
        Ok(out)
    }
}

/// Lab directories that play the image's own: its binaries and its (empty) home.
#[derive(Debug, Clone, Copy)]
pub struct ImageDirs<'a> {
    pub bin: &'a Path,
    pub home: &'a Path,
}

/// Where the lab keeps a node's host path: under the node's directory when it is one of the
/// node's own (or inside one), else the path itself.
pub fn node_source(host_path: &Path, node_dirs: &[(PathBuf, PathBuf)]) -> PathBuf {
    for (src, target) in node_dirs {
        if let Ok(rest) = host_path.strip_prefix(target) {
            return if rest.as_os_str().is_empty() {
                src.clone()
            } else {
                src.join(rest)
            };
        }
    }
    host_path.to_path_buf()
}

/// What the downward API and the kubelet know about the pod on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContext {
    pub node_name: String,
    /// The node's address: `status.hostIP`, and `status.podIP` on the host network.
    pub host_ip: String,
    /// `KUBERNETES_SERVICE_HOST` / `_PORT`: where the pod reaches the API.
    pub api_host: String,
    pub api_port: u16,
}

/// The DaemonSet's pod on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// `metadata.namespace` / `metadata.name` of the pod (DaemonSet name + node name, as the lab
    /// has no random suffix to give).
    pub namespace: String,
    pub pod_name: String,
    pub service_account: String,
    /// Whether the kubelet mounts the service account token (`automountServiceAccountToken`).
    pub automount_token: bool,
    /// Run in order, each to completion, before `main`.
    pub init: Vec<ContainerPlan>,
    pub main: ContainerPlan,
}

impl LaunchPlan {
    /// Every host path any container mounts, once (the kubelet checks and creates them by type).
    pub fn host_paths(&self) -> Vec<&Mount> {
        let mut out: Vec<&Mount> = vec![];
        for m in self
            .init
            .iter()
            .chain(std::iter::once(&self.main))
            .flat_map(|c| &c.mounts)
        {
            if !out.iter().any(|o| o.host_path == m.host_path) {
                out.push(m);
            }
        }
        out
    }
}

/// The objects of a manifest the lab needs: its DaemonSet and ConfigMaps.
#[derive(Debug, Clone)]
pub struct Manifest {
    ds: DaemonSet,
    config_maps: Vec<ConfigMap>,
}

fn yaml_err(doc: usize, e: serde_yaml::Error) -> ManifestError {
    ManifestError::Yaml {
        doc,
        reason: e.to_string(),
    }
}

impl Manifest {
    /// Reads a multi-document manifest (documents numbered from 1, as in error messages).
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let mut daemonsets = vec![];
        let mut config_maps = vec![];
        for (i, d) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let doc = i + 1;
            let v = serde_yaml::Value::deserialize(d).map_err(|e| yaml_err(doc, e))?;
            if v.is_null() {
                continue;
            }
            let kind = v
                .get("kind")
                .and_then(serde_yaml::Value::as_str)
                .ok_or(ManifestError::NoKind { doc })?
                .to_string();
            let bad = |e: serde_yaml::Error| ManifestError::BadObject {
                doc,
                kind: kind.clone(),
                reason: e.to_string(),
            };
            match kind.as_str() {
                "DaemonSet" => daemonsets.push(serde_yaml::from_value::<DaemonSet>(v.clone()).map_err(bad)?),
                "ConfigMap" => config_maps.push(serde_yaml::from_value::<ConfigMap>(v.clone()).map_err(bad)?),
                _ => {}
            }
        }
        let ds = match daemonsets.len() {
            0 => return Err(ManifestError::NoDaemonSet),
            1 => daemonsets.remove(0),
            n => return Err(ManifestError::ManyDaemonSets(n)),
        };
        Ok(Manifest { ds, config_maps })
    }

    fn ds_name(&self) -> String {
        self.ds.metadata.name.clone().unwrap_or_default()
    }

    fn namespace(&self) -> String {
        self.ds.metadata.namespace.clone().unwrap_or_else(|| "default".into())
    }

    fn pod_spec(&self) -> Result<&PodSpec, ManifestError> {
        self.ds
            .spec
            .template
            .spec
            .as_ref()
            .ok_or_else(|| ManifestError::NoPodSpec(self.ds_name()))
    }

    fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        let ns = self.namespace();
        self.config_maps.iter().find(|c| {
            c.metadata.name.as_deref() == Some(name)
                && c.metadata.namespace.clone().unwrap_or_else(|| "default".into()) == ns
        })
    }

    /// Sets one of the daemon's settings by the variable warren-node reads, the way a user would:
    /// in the ConfigMap when the variable comes from one, else in the container's `env`.
    pub fn set_daemon_env(&mut self, var: &str, value: &str) -> Result<(), ManifestError> {
        let ns = self.namespace();
        let spec = self
            .ds
            .spec
            .template
            .spec
            .as_mut()
            .ok_or_else(|| ManifestError::NoPodSpec(self.ds.metadata.name.clone().unwrap_or_default()))?;
        let c = spec
            .containers
            .first_mut()
            .ok_or_else(|| ManifestError::NoSuchSetting { var: var.to_string() })?;
        let e = c
            .env
            .as_mut()
            .and_then(|env| env.iter_mut().find(|e| e.name == var))
            .ok_or_else(|| ManifestError::NoSuchSetting { var: var.to_string() })?;
        if let Some(r) = e.value_from.as_ref().and_then(|f| f.config_map_key_ref.as_ref()) {
            let cm = self
                .config_maps
                .iter_mut()
                .find(|m| {
                    m.metadata.name.as_deref() == Some(r.name.as_str())
                        && m.metadata.namespace.clone().unwrap_or_else(|| "default".into()) == ns
                })
                .ok_or_else(|| ManifestError::NoConfigMap {
                    container: c.name.clone(),
                    var: var.to_string(),
                    name: r.name.clone(),
                    namespace: ns.clone(),
                })?;
            cm.data
                .get_or_insert_with(BTreeMap::new)
                .insert(r.key.clone(), value.to_string());
        } else {
            e.value = Some(value.to_string());
            e.value_from = None;
        }
        Ok(())
    }

    /// The DaemonSet's pod on the node `pod` describes.
    pub fn plan(&self, pod: &PodContext) -> Result<LaunchPlan, ManifestError> {
        let spec = self.pod_spec()?;
        let ds = self.ds_name();
        if spec.host_network != Some(true) {
            return Err(ManifestError::NotHostNetwork(ds));
        }
        if spec.containers.len() != 1 {
            return Err(ManifestError::ContainerCount {
                ds,
                n: spec.containers.len(),
            });
        }
        let labels = self
            .ds
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let meta = PodMeta {
            namespace: self.namespace(),
            name: format!("{ds}-{}", pod.node_name),
            service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
            labels,
        };
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| self.container(c, spec, pod, &meta))
            .collect::<Result<Vec<_>, _>>()?;
        let main = self.container(&spec.containers[0], spec, pod, &meta)?;
        Ok(LaunchPlan {
            namespace: meta.namespace,
            pod_name: meta.name,
            service_account: meta.service_account,
            automount_token: spec.automount_service_account_token != Some(false),
            init,
            main,
        })
    }

    fn container(
        &self,
        c: &Container,
        spec: &PodSpec,
        pod: &PodContext,
        meta: &PodMeta,
    ) -> Result<ContainerPlan, ManifestError> {
        let mut env: Vec<(String, String)> = IMAGE_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        // The kubelet's service variables for the `kubernetes` Service come first; the
        // container's own env may override them.
        env.push(("KUBERNETES_SERVICE_HOST".into(), pod.api_host.clone()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), pod.api_port.to_string()));
        env.push(("KUBERNETES_SERVICE_PORT_HTTPS".into(), pod.api_port.to_string()));
        for from in c.env_from.iter().flatten() {
            if from.secret_ref.is_some() {
                return Err(ManifestError::UnsupportedEnvSource {
                    container: c.name.clone(),
                    var: "(envFrom)".into(),
                    source_kind: "a Secret".into(),
                });
            }
            let Some(r) = &from.config_map_ref else { continue };
            let prefix = from.prefix.clone().unwrap_or_default();
            match self.config_map(&r.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        env.push((format!("{prefix}{k}"), v.clone()));
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(ManifestError::NoConfigMap {
                        container: c.name.clone(),
                        var: "(envFrom)".into(),
                        name: r.name.clone(),
                        namespace: meta.namespace.clone(),
                    })
                }
            }
        }
        for e in c.env.iter().flatten() {
            if let Some(v) = self.env_var(c, e, pod, meta)? {
                let v = expand(&v, &env);
                env.push((e.name.clone(), v));
            }
        }
        let command = c.command.clone().unwrap_or_default();
        let Some(cmd0) = command.first() else {
            return Err(ManifestError::NoCommand {
                container: c.name.clone(),
            });
        };
        let in_image = Path::new(cmd0).parent().is_some_and(|p| p == Path::new(IMAGE_BIN_DIR));
        if !in_image {
            return Err(ManifestError::NotImageBinary {
                container: c.name.clone(),
                path: cmd0.clone(),
            });
        }
        let argv = command
            .iter()
            .chain(c.args.iter().flatten())
            .map(|a| expand(a, &env))
            .collect();
        let mut mounts = vec![];
        for vm in c.volume_mounts.iter().flatten() {
            let vol = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == vm.name)
                .ok_or_else(|| ManifestError::UnknownVolume {
                    container: c.name.clone(),
                    volume: vm.name.clone(),
                })?;
            let hp = vol
                .host_path
                .as_ref()
                .ok_or_else(|| ManifestError::NotHostPath(vol.name.clone()))?;
            mounts.push(Mount {
                volume: vol.name.clone(),
                host_path: PathBuf::from(&hp.path),
                mount_path: PathBuf::from(&vm.mount_path),
                kind: HostPathType::parse(&vol.name, hp.type_.as_deref())?,
                read_only: vm.read_only == Some(true),
            });
        }
        Ok(ContainerPlan {
            name: c.name.clone(),
            argv,
            env,
            mounts,
        })
    }

    /// One `env` entry's value; `None` for an optional reference that is absent (the kubelet
    /// then leaves the variable unset).
    fn env_var(
        &self,
        c: &Container,
        e: &EnvVar,
        pod: &PodContext,
        meta: &PodMeta,
    ) -> Result<Option<String>, ManifestError> {
        let unsupported = |what: &str| ManifestError::UnsupportedEnvSource {
            container: c.name.clone(),
            var: e.name.clone(),
            source_kind: what.to_string(),
        };
        let Some(from) = &e.value_from else {
            return match &e.value {
                Some(v) => Ok(Some(v.clone())),
                // An empty `value` is a legal way to set "" (the field is omitted when empty).
                None => Ok(Some(String::new())),
            };
        };
        if let Some(r) = &from.config_map_key_ref {
            let optional = r.optional == Some(true);
            let Some(cm) = self.config_map(&r.name) else {
                if optional {
                    return Ok(None);
                }
                return Err(ManifestError::NoConfigMap {
                    container: c.name.clone(),
                    var: e.name.clone(),
                    name: r.name.clone(),
                    namespace: meta.namespace.clone(),
                });
            };
            return match cm.data.as_ref().and_then(|d| d.get(&r.key)) {
                Some(v) => Ok(Some(v.clone())),
                None if optional => Ok(None),
                None => Err(ManifestError::NoConfigKey {
                    container: c.name.clone(),
                    var: e.name.clone(),
                    name: r.name.clone(),
                    key: r.key.clone(),
                }),
            };
        }
        if let Some(f) = &from.field_ref {
            let path = f.field_path.as_str();
            let v = match path {
                "spec.nodeName" => pod.node_name.clone(),
                "status.hostIP" | "status.hostIPs" | "status.podIP" | "status.podIPs" => pod.host_ip.clone(),
                "metadata.name" => meta.name.clone(),
                "metadata.namespace" => meta.namespace.clone(),
                "spec.serviceAccountName" => meta.service_account.clone(),
                _ => match path
                    .strip_prefix("metadata.labels['")
                    .and_then(|r| r.strip_suffix("']"))
                {
                    Some(label) => meta.labels.get(label).cloned().unwrap_or_default(),
                    None => {
                        return Err(ManifestError::UnsupportedField {
                            container: c.name.clone(),
                            var: e.name.clone(),
                            path: path.to_string(),
                        })
                    }
                },
            };
            return Ok(Some(v));
        }
        if from.secret_key_ref.is_some() {
            return Err(unsupported("a Secret"));
        }
        if from.resource_field_ref.is_some() {
            return Err(unsupported("a resourceFieldRef"));
        }
        Err(ManifestError::EmptyEnv {
            container: c.name.clone(),
            var: e.name.clone(),
        })
    }
}

struct PodMeta {
    namespace: String,
    name: String,
    service_account: String,
    labels: BTreeMap<String, String>,
}

/// The kubelet's `$(VAR)` expansion: a reference to a variable defined earlier is replaced,
/// `$$` is a literal `$`, and anything else is left as written.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodContext {
        PodContext {
            node_name: "node2".into(),
            host_ip: "10.0.0.12".into(),
            api_host: "10.0.0.11".into(),
            api_port: 6443,
        }
    }

    fn builtin() -> LaunchPlan {
        Manifest::parse(BUILTIN).unwrap().plan(&pod()).unwrap()
    }

    /// The built-in manifest with one textual change that must be present.
    fn variant(from: &str, to: &str) -> Result<LaunchPlan, ManifestError> {
        assert!(BUILTIN.contains(from), "the manifest no longer contains {from:?}");
        Manifest::parse(&BUILTIN.replacen(from, to, 1))?.plan(&pod())
    }

    fn image() -> ImageDirs<'static> {
        ImageDirs {
            bin: Path::new("/build/release"),
            home: Path::new("/lab/empty-home"),
        }
    }

    fn node_dirs() -> Vec<(PathBuf, PathBuf)> {
        crate::nodectx::NODE_BINDS
            .iter()
            .map(|(rel, target)| (Path::new("/lab/nodes/node2").join(rel), PathBuf::from(target)))
            .collect()
    }

    #[test]
    fn should_run_install_cni_then_the_daemon_from_the_images_binary() {
        let p = builtin();
        assert_eq!(p.init.len(), 1);
        assert_eq!(p.init[0].argv, ["/usr/local/bin/warren-node", "install-cni"]);
        assert_eq!(p.main.argv, ["/usr/local/bin/warren-node", "run"]);
        assert_eq!(
            (p.namespace.as_str(), p.pod_name.as_str()),
            ("kube-system", "warren-node-node2")
        );
        assert_eq!(p.service_account, "warren-node");
        assert!(p.automount_token);
    }

    #[test]
    fn should_fill_the_daemons_env_from_the_configmap_and_the_downward_api() {
        let m = builtin().main;
        assert_eq!(m.env_value("NODENAME"), Some("node2"));
        assert_eq!(m.env_value("WARREN_POOL"), Some("10.233.64.0/18"));
        assert_eq!(m.env_value("WARREN_BLOCK_SIZE"), Some("24"));
        assert_eq!(m.env_value("WARREN_IPIP_MODE"), Some("Always"));
        assert_eq!(m.env_value("WARREN_NAT_OUTGOING"), Some("true"));
        assert_eq!(m.env_value("WARREN_NODEPORT_POLICY"), Some("preserve-source"));
        assert_eq!(m.env_value("WARREN_CNI_CONF_DIR"), Some("/etc/cni/net.d"));
        // In-cluster API access as the kubelet gives it; no kubeconfig.
        assert_eq!(m.env_value("KUBERNETES_SERVICE_HOST"), Some("10.0.0.11"));
        assert_eq!(m.env_value("KUBERNETES_SERVICE_PORT"), Some("6443"));
        assert_eq!(m.env_value("KUBECONFIG"), None);
        // The optional key the shipped ConfigMap leaves out stays unset: warren-node picks the MTU.
        let cm_has_mtu = BUILTIN.lines().any(|l| l.trim_start().starts_with("mtu:"));
        assert_eq!(m.env_value("WARREN_MTU").is_some(), cm_has_mtu);
    }

    #[test]
    fn should_follow_a_configmap_edit_into_the_daemons_env() {
        let mut man = Manifest::parse(BUILTIN).unwrap();
        man.set_daemon_env("WARREN_IPIP_MODE", "CrossSubnet").unwrap();
        man.set_daemon_env("WARREN_MTU", "1440").unwrap();
        man.set_daemon_env("RUST_LOG", "debug").unwrap();
        let m = man.plan(&pod()).unwrap().main;
        assert_eq!(m.env_value("WARREN_IPIP_MODE"), Some("CrossSubnet"));
        assert_eq!(m.env_value("WARREN_MTU"), Some("1440"));
        assert_eq!(m.env_value("RUST_LOG"), Some("debug"));
        let err = man.set_daemon_env("WARREN_NO_SUCH", "x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot set WARREN_NO_SUCH: the daemon container has no such variable"
        );
    }

    #[test]
    fn should_map_the_node_paths_onto_the_lab_nodes_directories() {
        let p = builtin();
        let sa = Path::new("/lab/serviceaccount");
        let binds = p.main.binds(&image(), &node_dirs(), Some(sa)).unwrap();
        let want: Vec<(PathBuf, PathBuf)> = [
            ("/build/release", "/usr/local/bin"),
            ("/lab/empty-home", "/root"),
            ("/lab/nodes/node2/etc/cni/net.d", "/etc/cni/net.d"),
            ("/lab/nodes/node2/opt/cni/bin", "/opt/cni/bin"),
            ("/lab/nodes/node2/var/lib/cni", "/var/lib/cni"),
            ("/lab/serviceaccount", SERVICE_ACCOUNT_DIR),
        ]
        .iter()
        .map(|(a, b)| (PathBuf::from(a), PathBuf::from(b)))
        .collect();
        // /run/xtables.lock and /lib/modules are the machine's own, at their own paths: no bind.
        assert_eq!(binds, want);
        let kinds: BTreeMap<String, HostPathType> = p
            .host_paths()
            .iter()
            .map(|m| (m.host_path.display().to_string(), m.kind))
            .collect();
        assert_eq!(kinds["/run/xtables.lock"], HostPathType::FileOrCreate);
        assert_eq!(kinds["/lib/modules"], HostPathType::Unchecked);
        assert_eq!(kinds.len(), 5);
        // The init container sees only what it mounts.
        let init = p.init[0].binds(&image(), &node_dirs(), None).unwrap();
        assert_eq!(init.len(), 4, "{init:?}");
    }

    #[test]
    fn should_map_a_path_inside_a_node_directory_and_refuse_a_moved_file() {
        let dirs = node_dirs();
        assert_eq!(
            node_source(Path::new("/etc/cni/net.d/sub"), &dirs),
            PathBuf::from("/lab/nodes/node2/etc/cni/net.d/sub")
        );
        assert_eq!(node_source(Path::new("/etc/cni"), &dirs), PathBuf::from("/etc/cni"));
        let p = variant(
            "            - name: xtables-lock\n              mountPath: /run/xtables.lock",
            "            - name: xtables-lock\n              mountPath: /run/lock/xtables.lock",
        )
        .unwrap();
        let err = p.main.binds(&image(), &dirs, None).unwrap_err();
        assert!(matches!(err, ManifestError::FileElsewhere { .. }), "{err}");
    }

    #[test]
    fn should_refuse_manifests_the_lab_cannot_run_with_the_reason() {
        let cases: &[(&str, &str, &str)] = &[
            ("kind: DaemonSet", "kind: Deployment", "no DaemonSet"),
            ("hostNetwork: true", "hostNetwork: false", "not hostNetwork"),
            ("                  key: pool", "                  key: poool", "needs key poool of ConfigMap warren-config"),
            ("  name: warren-config\n", "  name: warren-settings\n", "reads ConfigMap warren-config, which the manifest does not define"),
            ("fieldPath: spec.nodeName", "fieldPath: spec.hostname", "fieldRef spec.hostname"),
            (
                "command: [\"/usr/local/bin/warren-node\"]\n          args: [\"run\"]",
                "command: [\"/opt/warren/warren-node\"]\n          args: [\"run\"]",
                "not one of the image's binaries",
            ),
            (
                "          command: [\"/usr/local/bin/warren-node\"]\n          args: [\"install-cni\"]\n",
                "          args: [\"install-cni\"]\n",
                "install-cni: no `command`",
            ),
            ("          hostPath:\n            path: /var/lib/cni\n            type: DirectoryOrCreate", "          emptyDir: {}", "cni-state-dir: only hostPath"),
            ("mountPath: /var/lib/cni", "mountPath: /var/lib/cni\n            - name: nowhere\n              mountPath: /x", "volumeMount nowhere names no volume"),
            ("type: FileOrCreate", "type: Socket", "hostPath type \"Socket\""),
            ("hostNetwork: true", "hostNetwork: true\n      hostNetwork: [", "is not valid YAML"),
            (
                "              valueFrom:\n                fieldRef:\n                  fieldPath: spec.nodeName",
                "              valueFrom:\n                secretKeyRef:\n                  name: s\n                  key: k",
                "NODENAME takes its value from a Secret",
            ),
        ];
        for (from, to, want) in cases {
            let err = variant(from, to).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{from:?} → {to:?}: got {err:?}, want {want:?}"
            );
        }
        let two = format!(
            "{BUILTIN}\n---\n{}",
            BUILTIN
                .split("---\napiVersion: apps/v1")
                .nth(1)
                .map(|d| format!("apiVersion: apps/v1{d}"))
                .unwrap()
        );
        assert_eq!(Manifest::parse(&two).unwrap_err(), ManifestError::ManyDaemonSets(2));
        assert_eq!(
            Manifest::parse("---\nfoo: 1\n").unwrap_err(),
            ManifestError::NoKind { doc: 1 }
        );
        let err = Manifest::parse("kind: DaemonSet\nspec: 3\n").unwrap_err();
        assert!(matches!(err, ManifestError::BadObject { doc: 1, .. }), "{err}");
    }

    #[test]
    fn should_leave_a_missing_optional_configmap_key_unset() {
        // The same missing key is an error when required (see the refusals above).
        let p = variant(
            "                  key: pool\n",
            "                  key: poool\n                  optional: true\n",
        )
        .unwrap();
        assert_eq!(p.main.env_value("WARREN_POOL"), None);
        assert_eq!(p.main.env_value("WARREN_BLOCK_SIZE"), Some("24"));
    }

    #[test]
    fn should_expand_references_as_the_kubelet_does() {
        let env = vec![("A".to_string(), "x".to_string()), ("B".to_string(), "y".to_string())];
        assert_eq!(expand("--a=$(A) $(B)$(A)", &env), "--a=x yx");
        assert_eq!(expand("$$(A) $(C) $( $", &env), "$(A) $(C) $( $");
        let p = variant("args: [\"run\"]", "args: [\"run\", \"--node-name=$(NODENAME)\"]").unwrap();
        assert_eq!(p.main.argv[2], "--node-name=node2");
    }

    #[test]
    fn should_read_envfrom_configmaps_with_their_prefix() {
        let p = variant(
            "          env:\n            - name: NODENAME",
            "          envFrom:\n            - prefix: CFG_\n              configMapRef:\n                name: warren-config\n          env:\n            - name: NODENAME",
        )
        .unwrap();
        assert_eq!(p.main.env_value("CFG_pool"), Some("10.233.64.0/18"));
    }
}
