//! warren with other plugins: IPAM delegated to Debian's host-local, and a conflist with
//! Debian's portmap, bandwidth and tuning after warren (prevResult threaded through).
#![allow(clippy::unwrap_used)] // Test helpers: a panic is the failure report.

use integration_tests::cni::{result_ip, warren, Attachment, Conflist};
use integration_tests::netns::NetNs;
use serde_json::json;

#[test]
fn should_delegate_ipam_to_host_local() {
    let host = NetNs::new_host("hl").unwrap();
    let pod = NetNs::new("hlp").unwrap();
    let data = tempfile::tempdir().unwrap();
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "warren",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.233.110.0/24"}]],
                 "dataDir": data.path().display().to_string()}
    });
    let att = Attachment::pod("hl1", &pod, "ns", "hl");
    let res = warren(&host, "ADD", &att, &conf).unwrap().ok().unwrap();
    let ip = result_ip(&res).unwrap();
    assert!(ip.starts_with("10.233.110."), "{res}");
    assert_eq!(res["ips"][0]["address"], format!("{ip}/32"));
    // host-local's own store holds it, in its format.
    let file = data.path().join("k8s-pod-network").join(&ip);
    let content = std::fs::read_to_string(&file).unwrap();
    assert!(content.starts_with("hl1"), "{content:?}");
    let routes = host.ip(&["route", "show", &format!("{ip}/32")]).unwrap();
    assert!(routes.contains("dev cali"), "{routes}");

    // A failure after IPAM rolls back through the delegate too: the pod's eth0 name is taken.
    let pod2 = NetNs::new("hlp").unwrap();
    pod2.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "blocker"])
        .unwrap();
    let out = warren(&host, "ADD", &Attachment::pod("hl2", &pod2, "ns", "hl2"), &conf).unwrap();
    assert!(!out.success, "{out:?}");
    let held: Vec<_> = std::fs::read_dir(data.path().join("k8s-pod-network"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert_eq!(held, vec![ip.clone()], "delegated reservation leaked");

    warren(&host, "DEL", &att, &conf).unwrap().ok().unwrap();
    assert!(!file.exists());
}

#[test]
fn should_work_first_in_a_conflist_with_portmap_bandwidth_and_tuning() {
    let host = NetNs::new_host("ch").unwrap();
    let pod = NetNs::new("chp").unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut list = Conflist::new(json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "warren", "mtu": 1480,
             "ipam": {"type": "warren-ipam", "ranges": [[{"subnet": "10.233.111.0/24"}]],
                      "dataDir": data.path().display().to_string()}},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}},
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}}
        ]
    }));
    list.runtime_config = json!({
        "portMappings": [{"hostPort": 31602, "containerPort": 9097, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 1000000, "ingressBurst": 100000}
    });
    let att = Attachment::pod("ch1", &pod, "tekton-pipelines", "tekton-dashboard-75c65d785b-xbgk6");
    let res = list.add(&host, &att).unwrap();
    let ip = result_ip(&res).unwrap();
    assert_eq!(res["interfaces"][0]["name"], "cali73daeaf4b12", "{res}");

    // tuning applied its sysctl inside the pod.
    assert_eq!(pod.read_sysctl("net/core/somaxconn").unwrap(), "512");
    // portmap programmed its chains in the host namespace, DNAT to the pod.
    let nat = host.sh(&["iptables-save", "-t", "nat"]).unwrap();
    assert!(nat.contains("CNI-HOSTPORT-DNAT"), "{nat}");
    assert!(nat.contains(&format!("{ip}:9097")), "{nat}");
    // bandwidth put a token bucket on the host veth.
    let tc = host.sh(&["tc", "qdisc", "show", "dev", "cali73daeaf4b12"]).unwrap();
    assert!(tc.contains("tbf"), "{tc}");

    // Debian's portmap fails its own CHECK on IPv4-only results ("could not check ipv6 dnat"),
    // whoever comes before it, so CHECK runs through the rest of the chain.
    let mut without_portmap = list.list.clone();
    without_portmap["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "portmap");
    let mut checker = Conflist::new(without_portmap);
    checker.runtime_config = list.runtime_config.clone();
    checker.check(&host, &att, &res).unwrap();
    list.del(&host, &att, Some(&res)).unwrap();
    assert!(!host.link_names().unwrap().contains(&"cali73daeaf4b12".to_string()));
    let nat = host.sh(&["iptables-save", "-t", "nat"]).unwrap();
    assert!(!nat.contains(&format!("{ip}:9097")), "{nat}");
    assert!(integration_tests::cni::reserved_ips(data.path()).unwrap().is_empty());
}

#[test]
fn should_serve_as_a_standalone_ipam_plugin_like_host_local() {
    use integration_tests::cni::{exec_in, find_plugin, reserved_ips};
    let host = NetNs::new_host("wi").unwrap();
    let pod = NetNs::new("wip").unwrap();
    let data = tempfile::tempdir().unwrap();
    let ipam = |dir: &std::path::Path, ty: &str| {
        json!({"type": ty, "ranges": [[{"subnet": "10.233.112.0/24", "gateway": "10.233.112.1"}]],
               "routes": [{"dst": "0.0.0.0/0"}], "dataDir": dir.display().to_string()})
    };
    // Debian's ptp finds warren-ipam through CNI_PATH, as any main plugin would.
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ptp",
                      "ipam": ipam(data.path(), "warren-ipam")});
    let att = Attachment::pod("wi1", &pod, "ns", "wi");
    let res = exec_in(&host, &find_plugin("ptp").unwrap(), &att.env("ADD"), &conf)
        .unwrap()
        .ok()
        .unwrap();
    let ip = result_ip(&res).unwrap();
    assert!(ip.starts_with("10.233.112.") && ip != "10.233.112.1", "{res}");
    assert_eq!(reserved_ips(data.path()).unwrap(), vec![ip.clone()]);
    host.sh(&["busybox", "ping", "-c", "1", "-W", "2", &ip]).unwrap();

    // Called directly, its answer has host-local's shape.
    let other = tempfile::tempdir().unwrap();
    let direct = |ty: &str, dir: &std::path::Path| {
        let c = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ptp", "ipam": ipam(dir, ty)});
        let a = Attachment::pod("direct1", &pod, "ns", "direct");
        exec_in(&host, &find_plugin(ty).unwrap(), &a.env("ADD"), &c)
            .unwrap()
            .ok()
            .unwrap()
    };
    let ours = direct("warren-ipam", data.path());
    let theirs = direct("host-local", other.path());
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&ours), keys(&theirs), "{ours} vs {theirs}");
    assert_eq!(keys(&ours["ips"][0]), keys(&theirs["ips"][0]), "{ours} vs {theirs}");
    assert_eq!(ours["ips"][0]["gateway"], "10.233.112.1");
    assert_eq!(ours["routes"], theirs["routes"]);
    assert!(ours["ips"][0]["address"].as_str().unwrap().ends_with("/24"));

    // STATUS and GC (1.1) as a standalone plugin.
    let mut c11 = json!({"cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "ptp",
                         "ipam": ipam(data.path(), "warren-ipam")});
    let mut env = std::collections::HashMap::new();
    env.insert("CNI_COMMAND".to_string(), "STATUS".to_string());
    let wi = find_plugin("warren-ipam").unwrap();
    exec_in(&host, &wi, &env, &c11).unwrap().ok().unwrap();
    c11["cni.dev/valid-attachments"] = json!([{"containerID": "wi1", "ifname": "eth0"}]);
    env.insert("CNI_COMMAND".to_string(), "GC".to_string());
    exec_in(&host, &wi, &env, &c11).unwrap().ok().unwrap();
    assert_eq!(
        reserved_ips(data.path()).unwrap(),
        vec![ip.clone()],
        "GC kept only wi1's address"
    );

    exec_in(&host, &find_plugin("ptp").unwrap(), &att.env("DEL"), &conf)
        .unwrap()
        .ok()
        .unwrap();
    assert!(reserved_ips(data.path()).unwrap().is_empty());
}
