//! Privileged (root): the endpoints controller and the per-node proxy against the lab's API
//! stand-in. Everything (API server, controllers, the iptables they write) runs on a thread
//! inside a fresh network namespace, which is deleted afterwards.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::os::fd::AsFd as _;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use lab::kubeproxy::controller::{run_endpoints_controller, run_proxy};
use serde_json::json;

struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `f` on a fresh tokio runtime on a thread inside a new netns (so the proxy's iptables
/// writes land there, and every thread the runtime makes inherits that netns).
fn in_fresh_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let name = format!("kp-ctl-{}", std::process::id());
    let _ = Command::new("ip")
        .args(["netns", "del", &name])
        .stderr(std::process::Stdio::null())
        .status();
    assert!(Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap()
        .success());
    let guard = NetnsGuard(name.clone());
    let res = std::thread::spawn(move || {
        let fd = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        assert!(Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f());
        rt.shutdown_timeout(Duration::from_secs(2));
    })
    .join();
    drop(guard);
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

async fn eventually<T, Fut: Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> Fut) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn iptables_save_nat() -> String {
    let out = Command::new("iptables-save").args(["-t", "nat"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pod(name: &str, node: &str, label: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "tekton-pipelines", "labels": {"app": label}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "dashboard",
                 "ports": [{"name": "http", "containerPort": 9097, "protocol": "TCP"}]}]}
    }))
    .unwrap()
}

async fn set_pod_status(pods: &Api<Pod>, name: &str, ip: &str, ready: bool) {
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

#[test]
fn should_write_endpoints_and_program_the_proxy_from_the_api() {
    in_fresh_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let server = lab_apiserver::Server::start(lab_apiserver::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.path().to_path_buf(),
            token: None,
            extra_sans: vec![],
        })
        .await
        .unwrap();
        let kubeconfig = lab_apiserver::kubeconfig(&server.url(), server.ca_pem(), server.token());
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::from_yaml(&kubeconfig).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let client = Client::try_from(config).unwrap();

        let nss: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tekton-pipelines"}}),
        )
        .unwrap();
        nss.create(&PostParams::default(), &ns).await.unwrap();
        let svcs: Api<Service> = Api::namespaced(client.clone(), "tekton-pipelines");
        let svc: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "tekton-dashboard", "namespace": "tekton-pipelines"},
            "spec": {"type": "NodePort", "clusterIP": "10.233.5.155", "selector": {"app": "dashboard"},
                     "ports": [{"port": 9097, "nodePort": 31602, "protocol": "TCP", "targetPort": "http"}]}
        }))
        .unwrap();
        svcs.create(&PostParams::default(), &svc).await.unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), "tekton-pipelines");
        pods.create(&PostParams::default(), &pod("dash", "node2", "dashboard"))
            .await
            .unwrap();
        set_pod_status(&pods, "dash", "10.233.96.32", true).await;

        let ctl = tokio::spawn(run_endpoints_controller(client.clone()));
        let proxy = tokio::spawn(run_proxy(
            client.clone(),
            "node1".into(),
            vec!["10.102.123.117".parse().unwrap()],
            Some("10.233.64.0/18".parse().unwrap()),
        ));

        let eps: Api<Endpoints> = Api::namespaced(client.clone(), "tekton-pipelines");
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "tekton-pipelines");
        let slice_lp = ListParams::default().labels("kubernetes.io/service-name=tekton-dashboard");
        let ready_ip = |e: &Endpoints| {
            e.subsets
                .iter()
                .flatten()
                .flat_map(|s| s.addresses.iter().flatten())
                .map(|a| a.ip.clone())
                .collect::<Vec<_>>()
        };
        eventually("Endpoints with the ready pod", || async {
            let e = eps.get_opt("tekton-dashboard").await.unwrap()?;
            (ready_ip(&e) == vec!["10.233.96.32".to_string()]).then_some(())
        })
        .await;
        let slice = eventually("an EndpointSlice", || async {
            let l = slices.list(&slice_lp).await.unwrap();
            (l.items.len() == 1).then(|| l.items[0].clone())
        })
        .await;
        let sp = slice.ports.clone().unwrap();
        assert_eq!(sp[0].port, Some(9097), "named targetPort resolved");
        let ep = &slice.endpoints.as_ref().unwrap()[0];
        assert_eq!(ep.node_name.as_deref(), Some("node2"));

        // The proxy on node1 programs the service (Cluster policy: endpoint on another node is used).
        let save = eventually("KUBE-SVC chain in the node's nat table", || async {
            let s = tokio::task::spawn_blocking(iptables_save_nat).await.unwrap();
            s.contains("--to-destination 10.233.96.32:9097").then_some(s)
        })
        .await;
        assert!(save.contains(":KUBE-SVC-PMPLUAIR4O2OXCDQ"), "{save}");
        assert!(save.contains("-A KUBE-NODEPORTS"), "{save}");

        // An unrelated change does not rewrite the slice (create/update only when changed).
        let rv = slice.metadata.resource_version.clone();
        pods.create(&PostParams::default(), &pod("other", "node3", "other"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let again = slices.list(&slice_lp).await.unwrap();
        assert_eq!(
            again.items[0].metadata.resource_version, rv,
            "slice rewritten without a change"
        );

        // Not ready: out of addresses, into notReadyAddresses; the proxy then has no endpoint -> REJECT.
        set_pod_status(&pods, "dash", "10.233.96.32", false).await;
        eventually("pod moved to notReadyAddresses", || async {
            let e = eps.get_opt("tekton-dashboard").await.unwrap()?;
            let nr: Vec<String> = e
                .subsets
                .iter()
                .flatten()
                .flat_map(|s| s.not_ready_addresses.iter().flatten())
                .map(|a| a.ip.clone())
                .collect();
            (ready_ip(&e).is_empty() && nr == vec!["10.233.96.32".to_string()]).then_some(())
        })
        .await;
        eventually("no DNAT to the not-ready pod", || async {
            let s = tokio::task::spawn_blocking(iptables_save_nat).await.unwrap();
            (!s.contains("10.233.96.32:9097") && !s.contains("KUBE-SVC-PMPLUAIR4O2OXCDQ")).then_some(())
        })
        .await;

        // Service deleted: Endpoints and slices go too.
        svcs.delete("tekton-dashboard", &DeleteParams::default()).await.unwrap();
        eventually("Endpoints and slices deleted", || async {
            let e = eps.get_opt("tekton-dashboard").await.unwrap();
            let l = slices.list(&slice_lp).await.unwrap();
            (e.is_none() && l.items.is_empty()).then_some(())
        })
        .await;

        ctl.abort();
        proxy.abort();
        server.shutdown().await;
    });
}
