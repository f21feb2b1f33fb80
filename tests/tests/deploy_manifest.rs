//! `deploy/warren.yaml` read into the Kubernetes API's own types (k8s-openapi), checked against
//! what warren-node really does: the RBAC it needs, the command lines and environment the
//! DaemonSet gives it (run through the built `warren-node` when `WARREN_BIN_DIR` is set), the
//! ConfigMap's values and the host paths; and `kubectl apply` of the manifests to the lab's API.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const NAMESPACE: &str = "kube-system";
const CONFIGMAP: &str = "warren-config";
/// Env vars the daemon container sets that are read outside clap (tracing's filter).
const READ_OUTSIDE_CLAP: &[&str] = &["RUST_LOG"];

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The manifest's documents, each as raw YAML and as its `kind`.
fn documents(rel: &str) -> Vec<(String, serde_yaml::Value)> {
    let text = std::fs::read_to_string(repo_file(rel)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| {
            let kind = v["kind"].as_str().expect("every document has a kind").to_string();
            (kind, v)
        })
        .collect()
}

/// Deserialises into the typed object and back: k8s-openapi drops fields it does not know, so a
/// misspelt field (`hostNetwrok`, `readOnly` at the wrong level) shows up as a difference.
fn typed<T: DeserializeOwned + Serialize>(kind: &str, raw: &serde_yaml::Value) -> T {
    let obj: T = serde_yaml::from_value(raw.clone()).unwrap_or_else(|e| panic!("{kind} does not parse: {e}"));
    let back = serde_yaml::to_value(&obj).unwrap();
    assert_eq!(
        &back, raw,
        "{kind}: some field is not part of the Kubernetes API (it was dropped on a round trip)"
    );
    obj
}

struct Manifest {
    sa: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    config: ConfigMap,
    ds: DaemonSet,
}

fn manifest() -> Manifest {
    let docs = documents("deploy/warren.yaml");
    let kinds: Vec<&str> = docs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ],
        "the objects, in an order kubectl can apply in one pass"
    );
    Manifest {
        sa: typed("ServiceAccount", &docs[0].1),
        role: typed("ClusterRole", &docs[1].1),
        binding: typed("ClusterRoleBinding", &docs[2].1),
        config: typed("ConfigMap", &docs[3].1),
        ds: typed("DaemonSet", &docs[4].1),
    }
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.template.spec.as_ref().unwrap()
}

fn daemon(ds: &DaemonSet) -> &Container {
    let spec = pod_spec(ds);
    assert_eq!(spec.containers.len(), 1, "one daemon container");
    &spec.containers[0]
}

fn init(ds: &DaemonSet) -> &Container {
    let inits = pod_spec(ds).init_containers.as_deref().unwrap_or_default();
    assert_eq!(inits.len(), 1, "one init container: install-cni");
    &inits[0]
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env.as_deref()?.iter().find(|e| e.name == name)?.value.as_deref()
}

#[test]
fn should_grant_exactly_the_api_access_warren_node_uses() {
    let m = manifest();
    let mut got = BTreeSet::new();
    for r in m.role.rules.as_deref().unwrap_or_default() {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for g in r.api_groups.as_deref().unwrap_or_default() {
            for res in r.resources.as_deref().unwrap_or_default() {
                for v in &r.verbs {
                    assert!(
                        got.insert((g.as_str(), res.as_str(), v.as_str())),
                        "duplicate grant {g}/{res} {v}"
                    );
                }
            }
        }
    }
    let mut want = BTreeSet::new();
    for (g, res) in [
        ("", "nodes"),
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        for v in ["get", "list", "watch"] {
            want.insert((g, res, v));
        }
    }
    for res in ["nodes", "nodes/status"] {
        for v in ["patch", "update"] {
            want.insert(("", res, v));
        }
    }
    for g in ["", "events.k8s.io"] {
        for v in ["create", "patch"] {
            want.insert((g, "events", v));
        }
    }
    let extra: Vec<_> = got.difference(&want).collect();
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "extra {extra:?}, missing {missing:?}"
    );

    let sa_name = m.sa.metadata.name.as_deref().unwrap();
    assert_eq!(m.sa.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(m.binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&m.binding.role_ref.name), m.role.metadata.name.as_ref());
    let subjects = m.binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (
            subjects[0].kind.as_str(),
            subjects[0].name.as_str(),
            subjects[0].namespace.as_deref()
        ),
        ("ServiceAccount", sa_name, Some(NAMESPACE))
    );
    assert_eq!(pod_spec(&m.ds).service_account_name.as_deref(), Some(sa_name));
}

#[test]
fn should_run_privileged_on_the_host_network_of_every_node() {
    let m = manifest();
    assert_eq!(m.ds.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(m.ds.metadata.name.as_deref(), Some("warren-node"));
    let spec = &m.ds.spec;
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let pod = pod_spec(&m.ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerates_all =
        pod.tolerations.as_deref().unwrap_or_default().iter().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none() && t.value.is_none()
        });
    assert!(
        tolerates_all,
        "a toleration with operator Exists and no key/effect tolerates every taint"
    );
    // The selector must pick the template's own pods, or the API rejects the DaemonSet.
    let labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
        assert_eq!(labels.get(k), Some(v), "selector label {k}");
    }
    for c in [init(&m.ds), daemon(&m.ds)] {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(true), "{} is privileged", c.name);
        assert_eq!(c.image, daemon(&m.ds).image, "init and daemon run the same image");
    }
}

#[test]
fn should_probe_the_health_server_on_the_nodes_loopback() {
    let m = manifest();
    let c = daemon(&m.ds);
    let addr = env_value(c, "WARREN_HEALTH_ADDR").unwrap_or(conf::daemon::DEFAULT_HEALTH_ADDR);
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.host.as_deref(), Some(addr.ip().to_string().as_str()));
        assert_eq!(get.port, IntOrString::Int(i32::from(addr.port())));
    }
}

#[test]
fn should_mount_the_host_paths_at_the_same_place_in_the_container() {
    let m = manifest();
    let pod = pod_spec(&m.ds);
    let mut host: BTreeMap<&str, (&str, Option<&str>)> = BTreeMap::new();
    for v in pod.volumes.as_deref().unwrap_or_default() {
        let hp = v.host_path.as_ref().expect("only hostPath volumes");
        host.insert(v.name.as_str(), (hp.path.as_str(), hp.type_.as_deref()));
    }
    let paths: BTreeSet<&str> = host.values().map(|(p, _)| *p).collect();
    let want: BTreeSet<&str> = [
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/var/lib/cni",
        "/run/xtables.lock",
        "/lib/modules",
    ]
    .into();
    assert_eq!(paths, want);
    let xtables = host.values().find(|(p, _)| *p == "/run/xtables.lock").unwrap();
    assert_eq!(
        xtables.1,
        Some("FileOrCreate"),
        "the lock file must exist before iptables takes it"
    );

    let modules = host.values().find(|(p, _)| *p == "/lib/modules").unwrap();
    assert_eq!(
        modules.1, None,
        "a node without /lib/modules (everything built in) must still run warren-node"
    );

    let c = daemon(&m.ds);
    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    assert_eq!(mounts.len(), host.len(), "the daemon mounts every volume");
    for vm in mounts {
        let (path, _) = host[vm.name.as_str()];
        assert_eq!(vm.mount_path, path, "{} mounted where the node has it", vm.name);
        assert_eq!(
            vm.read_only == Some(true),
            path == "/lib/modules",
            "{path}: only /lib/modules is read-only"
        );
    }
    for vm in init(&m.ds).volume_mounts.as_deref().unwrap_or_default() {
        assert_eq!(vm.mount_path, host[vm.name.as_str()].0);
    }
    // The daemon's CNI dirs are the mounted ones, so the conflist lands on the node.
    assert_eq!(env_value(c, "WARREN_CNI_CONF_DIR"), Some("/etc/cni/net.d"));
    assert_eq!(env_value(c, "WARREN_CNI_BIN_DIR"), Some("/opt/cni/bin"));
}

/// Every ConfigMap reference of the daemon: env name → (key, optional).
fn config_refs(c: &Container) -> BTreeMap<String, (String, bool)> {
    let mut out = BTreeMap::new();
    for e in c.env.as_deref().unwrap_or_default() {
        if let Some(r) = e.value_from.as_ref().and_then(|f| f.config_map_key_ref.as_ref()) {
            assert_eq!(r.name, CONFIGMAP, "{} reads {}", e.name, r.name);
            out.insert(e.name.clone(), (r.key.clone(), r.optional == Some(true)));
        }
    }
    out
}

#[test]
fn should_wire_every_configmap_key_into_the_daemon_and_hold_valid_values() {
    let m = manifest();
    assert_eq!(m.config.metadata.name.as_deref(), Some(CONFIGMAP));
    assert_eq!(m.config.metadata.namespace.as_deref(), Some(NAMESPACE));
    let data = m.config.data.clone().unwrap_or_default();
    let refs = config_refs(daemon(&m.ds));
    let used: BTreeSet<&str> = refs.values().map(|(k, _)| k.as_str()).collect();
    for key in data.keys() {
        assert!(used.contains(key.as_str()), "ConfigMap key {key} is read by nothing");
    }
    for (env, (key, optional)) in &refs {
        assert!(*optional || data.contains_key(key), "{env} needs ConfigMap key {key}");
    }
    // The values mean what the defaults of the product brief say.
    let pool = conf::daemon::parse_pool(&data["pool"]).unwrap();
    assert_eq!(pool.to_string(), conf::daemon::DEFAULT_POOL);
    assert_eq!(
        data["block_size"].parse::<u8>().unwrap(),
        conf::daemon::DEFAULT_BLOCK_PREFIX
    );
    assert_eq!(
        data["ipip_mode"].parse::<conf::daemon::IpipMode>().unwrap(),
        conf::daemon::IpipMode::Always
    );
    assert!(data["nat_outgoing"].parse::<bool>().unwrap());
    // Installing with the defaults gives warren-node's own default NodePort behaviour.
    assert_eq!(
        data["nodeport_policy"].parse::<conf::daemon::NodePortPolicy>().unwrap(),
        conf::daemon::NodePortPolicy::default()
    );
    assert_eq!(data["nodeport_policy"], "preserve-source");
    // Every setting a user tunes is wired from the ConfigMap (the MTU's key is optional: an
    // older ConfigMap without it means `auto`, as the shipped value does).
    assert_eq!(data["mtu"], "auto");
    for (env, key) in [
        ("WARREN_POOL", "pool"),
        ("WARREN_BLOCK_SIZE", "block_size"),
        ("WARREN_IPIP_MODE", "ipip_mode"),
        ("WARREN_MTU", "mtu"),
        ("WARREN_NAT_OUTGOING", "nat_outgoing"),
        ("WARREN_NODEPORT_POLICY", "nodeport_policy"),
    ] {
        assert_eq!(
            refs.get(env).map(|(k, _)| k.as_str()),
            Some(key),
            "{env} from the ConfigMap"
        );
    }
    data["iptables_backend"]
        .parse::<conf::daemon::IptablesBackend>()
        .unwrap();
}

// ---- the manifest against the built binary ----

fn bin_dir() -> Option<PathBuf> {
    match std::env::var_os("WARREN_BIN_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None => {
            eprintln!("SKIPPED: WARREN_BIN_DIR is not set, so the manifest is not run against warren-node");
            None
        }
    }
}

fn warren_node(dir: &Path, args: &[String], env: &[(String, String)]) -> Output {
    let bin = dir.join("warren-node");
    assert!(bin.exists(), "{} missing (WARREN_BIN_DIR is set)", bin.display());
    Command::new(&bin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

/// The `[env: NAME=…]` names clap documents in a subcommand's help.
fn documented_env(help: &str) -> BTreeSet<String> {
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_string)
        .collect()
}

fn full_cmdline(c: &Container) -> Vec<String> {
    let cmd = c.command.clone().unwrap_or_default();
    assert_eq!(
        cmd.first().map(String::as_str),
        Some("/usr/local/bin/warren-node"),
        "{}",
        c.name
    );
    cmd[1..].iter().chain(c.args.iter().flatten()).cloned().collect()
}

#[test]
fn should_give_warren_node_only_command_lines_and_env_it_accepts() {
    let Some(dir) = bin_dir() else { return };
    let m = manifest();
    for (c, sub) in [(init(&m.ds), "install-cni"), (daemon(&m.ds), "run")] {
        let mut args = full_cmdline(c);
        assert_eq!(args.first().map(String::as_str), Some(sub), "{}", c.name);
        args.push("--help".into());
        let out = warren_node(&dir, &args, &[]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "warren-node refuses {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let known = documented_env(&help);
        for e in c.env.as_deref().unwrap_or_default() {
            assert!(
                known.contains(&e.name) || READ_OUTSIDE_CLAP.contains(&e.name.as_str()),
                "{}: warren-node {sub} reads no variable {} (it knows {known:?})",
                c.name,
                e.name
            );
        }
    }
}

#[test]
fn should_start_warren_node_with_the_configmaps_values_up_to_the_api_connection() {
    let Some(dir) = bin_dir() else { return };
    let m = manifest();
    let c = daemon(&m.ds);
    let data = m.config.data.clone().unwrap_or_default();
    let mut env: Vec<(String, String)> = vec![];
    for e in c.env.as_deref().unwrap_or_default() {
        if let Some(v) = &e.value {
            env.push((e.name.clone(), v.clone()));
        } else if let Some((key, _)) = config_refs(c).get(&e.name) {
            if let Some(v) = data.get(key) {
                env.push((e.name.clone(), v.clone()));
            }
        }
    }
    // What the downward API would give, a free port instead of the node's 9099, and an API that
    // is not there: the daemon must get past its configuration and stop at the connection.
    env.push(("NODENAME".into(), "node1".into()));
    env.retain(|(k, _)| k != "WARREN_HEALTH_ADDR");
    env.push(("WARREN_HEALTH_ADDR".into(), "127.0.0.1:0".into()));
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("absent-kubeconfig");
    env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    let out = warren_node(&dir, &full_cmdline(c), &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("kubeconfig") && stderr.contains("absent-kubeconfig"),
        "warren-node should accept the ConfigMap and fail only at the missing API: {stderr}"
    );

    // The same run with a broken pool value shows the check above can tell the difference.
    for (k, v) in env.iter_mut() {
        if k == "WARREN_POOL" {
            *v = "10.233.64.0/33".into();
        }
    }
    let out = warren_node(&dir, &full_cmdline(c), &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !stderr.contains("absent-kubeconfig"),
        "{stderr}"
    );
}

#[test]
fn should_install_the_cni_binaries_through_the_init_containers_mounts() {
    let Some(dir) = bin_dir() else { return };
    let m = manifest();
    let pod = pod_spec(&m.ds);
    let c = init(&m.ds);
    // The node's root is a temp dir: each mount's host path is mapped under it, and env values
    // pointing into a mount are rewritten the same way.
    let root = tempfile::tempdir().unwrap();
    let mut mapped: Vec<(String, PathBuf)> = vec![];
    for vm in c.volume_mounts.as_deref().unwrap_or_default() {
        let vol = pod
            .volumes
            .as_deref()
            .unwrap()
            .iter()
            .find(|v| v.name == vm.name)
            .unwrap();
        let host = root
            .path()
            .join(vol.host_path.as_ref().unwrap().path.trim_start_matches('/'));
        std::fs::create_dir_all(&host).unwrap();
        mapped.push((vm.mount_path.clone(), host));
    }
    let mut env: Vec<(String, String)> = vec![("WARREN_SOURCE_DIR".into(), dir.display().to_string())];
    for e in c.env.as_deref().unwrap_or_default() {
        let v = e.value.clone().unwrap();
        let v = match mapped
            .iter()
            .find(|(mp, _)| v == *mp || v.starts_with(&format!("{mp}/")))
        {
            Some((mp, host)) => format!("{}{}", host.display(), &v[mp.len()..]),
            None => v,
        };
        env.push((e.name.clone(), v));
    }
    let out = warren_node(&dir, &full_cmdline(c), &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cni_bin = root.path().join("opt/cni/bin");
    for b in ["warren", "warren-ipam"] {
        let p = cni_bin.join(b);
        let meta = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{} not installed: {e}", p.display()));
        use std::os::unix::fs::PermissionsExt;
        assert!(meta.permissions().mode() & 0o111 != 0, "{} is executable", p.display());
        assert_eq!(meta.len(), std::fs::metadata(dir.join(b)).unwrap().len());
    }
}

#[test]
fn should_uninstall_with_the_same_image_and_host_paths() {
    let docs = documents("deploy/warren-uninstall.yaml");
    assert_eq!(docs.len(), 1);
    let ds: DaemonSet = typed("DaemonSet", &docs[0].1);
    let m = manifest();
    let pod = pod_spec(&ds);
    assert_eq!(pod.host_network, Some(true));
    let inits = pod.init_containers.as_deref().unwrap();
    assert_eq!(full_cmdline(&inits[0]), ["uninstall"]);
    assert_eq!(inits[0].image, daemon(&m.ds).image);
    let conf_mount = inits[0]
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.mount_path == "/etc/cni/net.d")
        .expect("uninstall removes the conflist from the node's /etc/cni/net.d");
    let vol = pod
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == conf_mount.name)
        .unwrap();
    assert_eq!(vol.host_path.as_ref().unwrap().path, "/etc/cni/net.d");
    if let Some(dir) = bin_dir() {
        let mut args = full_cmdline(&inits[0]);
        args.push("--help".into());
        let out = warren_node(&dir, &args, &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let known = documented_env(&String::from_utf8_lossy(&out.stdout));
        for e in inits[0].env.as_deref().unwrap_or_default() {
            assert!(
                known.contains(&e.name),
                "warren-node uninstall reads no variable {}",
                e.name
            );
        }
    }
}

// ---- kubectl apply against the lab's API stand-in ----

/// `$KUBECTL`, else `kubectl` on PATH (scripts/install-deps.sh installs 1.37).
fn kubectl() -> Option<PathBuf> {
    let bin = std::env::var_os("KUBECTL").map_or_else(|| PathBuf::from("kubectl"), PathBuf::from);
    match Command::new(&bin).args(["version", "--client"]).output() {
        Ok(o) if o.status.success() => Some(bin),
        _ => {
            eprintln!(
                "SKIPPED: no kubectl ({}), so the manifests are not applied",
                bin.display()
            );
            None
        }
    }
}

fn run_kubectl(bin: &Path, kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env("HOME", kubeconfig.parent().unwrap())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_apply_with_kubectl_to_the_labs_api() {
    let Some(bin) = kubectl() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = lab_apiserver::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: dir.path().join("state"),
        token: None,
        extra_sans: vec![],
    };
    let server = lab_apiserver::Server::start(cfg).await.unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, None).unwrap();
    let manifest_path = repo_file("deploy/warren.yaml");
    let manifest_file = manifest_path.to_str().unwrap();

    let k = |args: Vec<&str>| {
        let (bin, kc) = (bin.clone(), kubeconfig.clone());
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        // kubectl blocks; the server runs on this runtime's other thread.
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_kubectl(&bin, &kc, &args)
        })
    };
    // kubeadm makes kube-system; the stand-in starts empty.
    let (ok, out) = k(vec!["create", "namespace", "kube-system"]).await.unwrap();
    assert!(ok || out.contains("AlreadyExists"), "{out}");
    let (ok, out) = k(vec!["apply", "-f", manifest_file]).await.unwrap();
    assert!(ok, "kubectl apply -f deploy/warren.yaml: {out}");
    for created in [
        "serviceaccount/warren-node",
        "clusterrole.rbac.authorization.k8s.io/warren-node",
        "clusterrolebinding.rbac.authorization.k8s.io/warren-node",
        "configmap/warren-config",
        "daemonset.apps/warren-node",
    ] {
        assert!(out.contains(&format!("{created} created")), "{created} in: {out}");
    }
    // What was stored is what the file says: the rollout a user would see starts from it.
    let (ok, out) = k(vec![
        "-n",
        "kube-system",
        "get",
        "daemonset",
        "warren-node",
        "-o",
        "json",
    ])
    .await
    .unwrap();
    assert!(ok, "{out}");
    let stored: DaemonSet = serde_json::from_str(&out).unwrap();
    let m = manifest();
    assert_eq!(pod_spec(&stored).containers, pod_spec(&m.ds).containers);
    assert_eq!(pod_spec(&stored).volumes, pod_spec(&m.ds).volumes);
    let (ok, out) = k(vec![
        "-n",
        "kube-system",
        "get",
        "configmap",
        "warren-config",
        "-o",
        "json",
    ])
    .await
    .unwrap();
    assert!(ok, "{out}");
    let cm: ConfigMap = serde_json::from_str(&out).unwrap();
    assert_eq!(cm.data, m.config.data);

    // A second apply is a no-op, as re-running an install must be.
    let (ok, out) = k(vec!["apply", "-f", manifest_file]).await.unwrap();
    assert!(ok, "{out}");
    assert!(
        !out.contains("created") && !out.contains("configured"),
        "re-apply changed something: {out}"
    );

    let uninstall = repo_file("deploy/warren-uninstall.yaml");
    let (ok, out) = k(vec!["apply", "-f", uninstall.to_str().unwrap()]).await.unwrap();
    assert!(ok && out.contains("daemonset.apps/warren-uninstall created"), "{out}");
    let (ok, out) = k(vec!["delete", "-f", manifest_file]).await.unwrap();
    assert!(ok, "kubectl delete -f deploy/warren.yaml: {out}");
    server.shutdown().await;
}

// ---- the image definition ----

/// deploy/Dockerfile's instructions (continuation lines joined), as (INSTRUCTION, rest).
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("deploy/Dockerfile")).unwrap();
    let mut out = vec![];
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        cur.push_str(t.trim_end_matches('\\'));
        cur.push(' ');
        if !t.ends_with('\\') {
            let (ins, rest) = cur.trim().split_once(' ').unwrap();
            out.push((ins.to_uppercase(), rest.to_string()));
            cur.clear();
        }
    }
    out
}

#[test]
fn should_build_an_image_holding_what_the_daemonset_runs() {
    let ins = dockerfile();
    let froms: Vec<&str> = ins
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(froms.len(), 2, "multi-stage: a builder and a runtime");
    assert!(
        froms[0].ends_with(" AS builder") && froms[0].contains("rust:"),
        "{}",
        froms[0]
    );
    assert!(froms[1].contains("-slim"), "the runtime is a slim Debian: {}", froms[1]);
    let runtime = ins.iter().position(|(i, r)| i == "FROM" && r == froms[1]).unwrap();

    let build = ins[..runtime]
        .iter()
        .find(|(i, r)| i == "RUN" && r.contains("cargo build"))
        .expect("the builder runs cargo build");
    assert!(
        build.1.contains("--release") && build.1.contains("--locked"),
        "{}",
        build.1
    );
    // Each binary the runtime copies must be a [[bin]] of a package the builder builds.
    let bins_of = |pkg_dir: &str| std::fs::read_to_string(repo_file(&format!("{pkg_dir}/Cargo.toml"))).unwrap();
    let node_toml = bins_of("node-daemon");
    let cni_toml = bins_of("cni-bin");
    assert!(
        build.1.contains("-p node-daemon") && build.1.contains("-p cni-bin"),
        "{}",
        build.1
    );
    let copy = ins[runtime..]
        .iter()
        .find(|(i, r)| i == "COPY" && r.starts_with("--from=builder"))
        .expect("the runtime copies the binaries from the builder");
    for (bin, toml) in [
        ("warren-node", &node_toml),
        ("warren", &cni_toml),
        ("warren-ipam", &cni_toml),
    ] {
        assert!(
            toml.contains(&format!("name = \"{bin}\"")),
            "{bin} is not a binary of its package"
        );
        assert!(copy.1.contains(&format!("/{bin} ")), "{bin} is copied: {}", copy.1);
        assert!(
            build.1.contains(&format!("target/release/{bin} ")),
            "{bin} leaves the builder: {}",
            build.1
        );
    }
    assert!(copy.1.trim_end().ends_with(" /usr/local/bin/"), "{}", copy.1);

    let apt = ins[runtime..]
        .iter()
        .find(|(i, r)| i == "RUN" && r.contains("apt-get install"))
        .expect("the runtime installs the dataplane tools");
    for tool in ["iptables", "ipset", "iproute2"] {
        assert!(
            apt.1.split_whitespace().any(|w| w == tool),
            "{tool} in the image: {}",
            apt.1
        );
    }

    // The DaemonSet runs the image's binary, and install-cni (no WARREN_SOURCE_DIR) copies the
    // CNI binaries from that binary's own directory, where the COPY put them.
    let (_, entry) = ins.iter().rev().find(|(i, _)| i == "ENTRYPOINT").unwrap();
    let m = manifest();
    for c in [init(&m.ds), daemon(&m.ds)] {
        let cmd0 = c.command.as_ref().unwrap()[0].as_str();
        assert_eq!(entry.as_str(), format!("[\"{cmd0}\"]"), "{}", c.name);
        assert!(env_value(c, "WARREN_SOURCE_DIR").is_none());
    }
}
