//! ADD / CHECK / DEL of the `warren` binary in fresh network namespaces (run as root).
#![allow(clippy::unwrap_used)] // Test helpers: a panic is the failure report.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use integration_tests::cni::{reserved_ips, result_ip, warren, warren_conf, Attachment};
use integration_tests::netns::NetNs;
use serde_json::{json, Value};

const SEED_NS: &str = "tekton-pipelines";
const SEED_POD: &str = "tekton-dashboard-75c65d785b-xbgk6";
const SEED_VETH: &str = "cali73daeaf4b12";

struct Env {
    host: NetNs,
    data: tempfile::TempDir,
}

fn env(tag: &str) -> Env {
    Env {
        host: NetNs::new_host(tag).unwrap(),
        data: tempfile::tempdir().unwrap(),
    }
}

fn link<'a>(links: &'a Value, name: &str) -> &'a Value {
    links
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["ifname"] == name)
        .unwrap_or_else(|| panic!("no link {name} in {links}"))
}

#[test]
fn should_wire_a_pod_like_calico() {
    let e = env("add");
    let pod = NetNs::new("addp").unwrap();
    let conf = warren_conf("1.1.0", "10.233.90.0/24", e.data.path());
    let att = Attachment::pod("c0ffee01", &pod, SEED_NS, SEED_POD);
    let res = warren(&e.host, "ADD", &att, &conf).unwrap().ok().unwrap();
    let ip = result_ip(&res).unwrap();
    assert!(ip.starts_with("10.233.90."), "{res}");
    assert_ne!(ip, "10.233.90.0", "the block's network address belongs to tunl0");

    // Host side: the seed's veth name, up, MTU, proxy ARP, /32 route.
    let hl = e.host.ip_json(&["link", "show"]).unwrap();
    let veth = link(&hl, SEED_VETH);
    assert_eq!(veth["mtu"], 1480);
    assert!(veth["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    assert_eq!(
        e.host
            .read_sysctl(&format!("net/ipv4/conf/{SEED_VETH}/proxy_arp"))
            .unwrap(),
        "1"
    );
    assert_eq!(
        e.host
            .read_sysctl(&format!("net/ipv4/neigh/{SEED_VETH}/proxy_delay"))
            .unwrap(),
        "0"
    );
    assert_eq!(
        e.host
            .read_sysctl(&format!("net/ipv4/conf/{SEED_VETH}/forwarding"))
            .unwrap(),
        "1"
    );
    let routes = e.host.ip(&["route", "show", &format!("{ip}/32")]).unwrap();
    assert!(routes.contains(&format!("dev {SEED_VETH} scope link")), "{routes}");

    // Pod side: eth0 with ip/32, default via 169.254.1.1 onlink.
    let pl = pod.ip_json(&["addr", "show", "eth0"]).unwrap();
    let eth0 = link(&pl, "eth0");
    assert_eq!(eth0["mtu"], 1480);
    let addrs: Vec<String> = eth0["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(addrs, vec![format!("{ip}/32")]);
    let pr = pod.ip(&["route", "show"]).unwrap();
    assert!(pr.contains("default via 169.254.1.1 dev eth0 onlink"), "{pr}");
    assert!(pr.contains("169.254.1.1 dev eth0 scope link"), "{pr}");
    assert!(link(&pod.ip_json(&["link", "show"]).unwrap(), "lo")["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "UP"));

    // Result (1.1.0): host veth with mac, pod eth0 with mac and sandbox, ip on interface 1.
    assert_eq!(res["cniVersion"], "1.1.0");
    assert_eq!(res["interfaces"][0]["name"], SEED_VETH);
    assert_eq!(res["interfaces"][0]["mac"], veth["address"]);
    assert_eq!(res["interfaces"][1]["name"], "eth0");
    assert_eq!(res["interfaces"][1]["mac"], eth0["address"]);
    assert_eq!(res["interfaces"][1]["sandbox"], pod.path().display().to_string());
    assert_eq!(res["ips"][0]["address"], format!("{ip}/32"));
    assert_eq!(res["ips"][0]["interface"], 1);
    assert_eq!(res["routes"][0], json!({"dst": "0.0.0.0/0", "gw": "169.254.1.1"}));
    assert_eq!(reserved_ips(e.data.path()).unwrap(), vec![ip]);
}

#[test]
fn should_answer_in_each_requested_result_version() {
    let e = env("ver");
    for (i, v) in ["1.1.0", "1.0.0", "0.4.0", "0.3.1"].iter().enumerate() {
        let pod = NetNs::new("verp").unwrap();
        let conf = warren_conf(v, "10.233.91.0/24", e.data.path());
        let att = Attachment::pod(&format!("ver{i}"), &pod, "ns", &format!("p{i}"));
        let res = warren(&e.host, "ADD", &att, &conf).unwrap().ok().unwrap();
        assert_eq!(res["cniVersion"], *v);
        if v.starts_with("0.") {
            assert_eq!(res["ips"][0]["version"], "4", "{v}: {res}");
        } else {
            assert!(res["ips"][0].get("version").is_none(), "{v}: {res}");
        }
        assert_eq!(res["ips"][0]["interface"], 1);
        warren(&e.host, "DEL", &att, &conf).unwrap().ok().unwrap();
    }
}

#[test]
fn should_connect_host_to_pod_and_pod_to_pod() {
    let e = env("conn");
    let conf = warren_conf("1.0.0", "10.233.92.0/24", e.data.path());
    let pa = NetNs::new("conna").unwrap();
    let pb = NetNs::new("connb").unwrap();
    let ra = warren(&e.host, "ADD", &Attachment::pod("conna1", &pa, "ns", "a"), &conf)
        .unwrap()
        .ok()
        .unwrap();
    let rb = warren(&e.host, "ADD", &Attachment::pod("connb1", &pb, "ns", "b"), &conf)
        .unwrap()
        .ok()
        .unwrap();
    let (ipa, ipb) = (result_ip(&ra).unwrap(), result_ip(&rb).unwrap());

    let ping = |ns: &NetNs, to: &str| {
        let out = ns.exec(&["busybox", "ping", "-c", "1", "-W", "2", to]).unwrap();
        assert!(
            out.status.success(),
            "ping {to} from {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stdout)
        );
    };
    ping(&e.host, &ipa);
    ping(&pa, &ipb);
    ping(&pb, &ipa);
    ping(&pa, "10.99.0.1");

    // TCP from the host namespace to pod A, and from pod B to pod A.
    let addr: SocketAddr = format!("{ipa}:8080").parse().unwrap();
    let listener = pa.run(move || TcpListener::bind(addr).unwrap()).unwrap();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        }
    });
    for ns in [&e.host, &pb] {
        let echoed = ns
            .run(move || {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
                s.write_all(b"hello").unwrap();
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).unwrap();
                buf
            })
            .unwrap();
        assert_eq!(&echoed, b"hello");
    }
    server.join().unwrap();
}

#[test]
fn should_delete_idempotently_and_release_the_address() {
    let e = env("del");
    let pod = NetNs::new("delp").unwrap();
    let conf = warren_conf("1.0.0", "10.233.93.0/24", e.data.path());
    let att = Attachment::pod("del1", &pod, "ns", "pod-del");
    let res = warren(&e.host, "ADD", &att, &conf).unwrap().ok().unwrap();
    let ip = result_ip(&res).unwrap();
    let veth = res["interfaces"][0]["name"].as_str().unwrap().to_string();
    assert_eq!(reserved_ips(e.data.path()).unwrap(), vec![ip.clone()]);

    let out = warren(&e.host, "DEL", &att, &conf).unwrap();
    assert!(out.success, "{out:?}");
    assert!(
        out.stdout.trim().is_empty(),
        "DEL prints nothing on success: {}",
        out.stdout
    );
    assert!(!e.host.link_names().unwrap().contains(&veth));
    assert!(!pod.link_names().unwrap().contains(&"eth0".to_string()));
    assert!(e
        .host
        .ip(&["route", "show", &format!("{ip}/32")])
        .unwrap()
        .trim()
        .is_empty());
    assert!(reserved_ips(e.data.path()).unwrap().is_empty());
    // Again, and once more without pod arguments.
    warren(&e.host, "DEL", &att, &conf).unwrap().ok().unwrap();
    let bare = Attachment {
        args: String::new(),
        ..att.clone()
    };
    warren(&e.host, "DEL", &bare, &conf).unwrap().ok().unwrap();
}

#[test]
fn should_delete_when_the_netns_is_already_gone() {
    let e = env("delns");
    let pod = NetNs::new("delnsp").unwrap();
    let conf = warren_conf("1.0.0", "10.233.94.0/24", e.data.path());
    let att = Attachment::pod("delns1", &pod, "ns", "pod-gone");
    let res = warren(&e.host, "ADD", &att, &conf).unwrap().ok().unwrap();
    let veth = res["interfaces"][0]["name"].as_str().unwrap().to_string();
    pod.delete();
    let out = warren(&e.host, "DEL", &att, &conf).unwrap();
    assert!(out.success, "{out:?}");
    assert!(!e.host.link_names().unwrap().contains(&veth));
    assert!(reserved_ips(e.data.path()).unwrap().is_empty());
    // And with CNI_NETNS empty, as runtimes send it after the sandbox is gone.
    let no_ns = Attachment { netns: None, ..att };
    warren(&e.host, "DEL", &no_ns, &conf).unwrap().ok().unwrap();
}

#[test]
fn should_not_delete_another_containers_veth_with_the_same_pod_name() {
    let e = env("same");
    let conf = warren_conf("1.0.0", "10.233.95.0/24", e.data.path());
    let old_ns = NetNs::new("sameo").unwrap();
    let new_ns = NetNs::new("samen").unwrap();
    let old = Attachment::pod("old1", &old_ns, "ns", "web-0");
    let new = Attachment::pod("new1", &new_ns, "ns", "web-0");
    warren(&e.host, "ADD", &old, &conf).unwrap().ok().unwrap();
    // The StatefulSet pod comes back before the old sandbox's DEL: the stale veth is replaced.
    let res = warren(&e.host, "ADD", &new, &conf).unwrap().ok().unwrap();
    let veth = res["interfaces"][0]["name"].as_str().unwrap().to_string();
    warren(&e.host, "DEL", &old, &conf).unwrap().ok().unwrap();
    assert!(
        e.host.link_names().unwrap().contains(&veth),
        "late DEL of the old sandbox removed the new pod's veth"
    );
    let ip = result_ip(&res).unwrap();
    assert_eq!(reserved_ips(e.data.path()).unwrap(), vec![ip]);
}

#[test]
fn should_check_ok_then_report_drift() {
    let e = env("chk");
    let pod = NetNs::new("chkp").unwrap();
    let mut conf = warren_conf("1.0.0", "10.233.96.0/24", e.data.path());
    let att = Attachment::pod("chk1", &pod, "ns", "pod-chk");
    let res = warren(&e.host, "ADD", &att, &conf).unwrap().ok().unwrap();
    conf["prevResult"] = res.clone();
    let out = warren(&e.host, "CHECK", &att, &conf).unwrap();
    assert!(out.success, "{out:?}");

    pod.ip(&["route", "del", "default"]).unwrap();
    let out = warren(&e.host, "CHECK", &att, &conf).unwrap();
    assert!(out.error_code().unwrap() >= 100, "{out:?}");
    assert!(out.stdout.contains("default route"), "{}", out.stdout);

    pod.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink"])
        .unwrap();
    warren(&e.host, "CHECK", &att, &conf).unwrap().ok().unwrap();
    let ip = result_ip(&res).unwrap();
    pod.ip(&["addr", "del", &format!("{ip}/32"), "dev", "eth0"]).unwrap();
    let out = warren(&e.host, "CHECK", &att, &conf).unwrap();
    assert!(out.stdout.contains("address"), "{out:?}");
    assert!(out.error_code().unwrap() >= 100);

    let veth = res["interfaces"][0]["name"].as_str().unwrap();
    e.host.ip(&["route", "del", &format!("{ip}/32"), "dev", veth]).unwrap();
    let out = warren(&e.host, "CHECK", &att, &conf).unwrap();
    assert!(out.stdout.contains("route"), "{out:?}");
}

#[test]
fn should_hand_out_requested_addresses() {
    let e = env("req");
    let mut conf = warren_conf("1.0.0", "10.233.97.0/24", e.data.path());
    conf["capabilities"] = json!({"ips": true});
    conf["runtimeConfig"] = json!({"ips": ["10.233.97.42/24"]});
    let pa = NetNs::new("reqa").unwrap();
    let res = warren(&e.host, "ADD", &Attachment::pod("req1", &pa, "ns", "a"), &conf)
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(result_ip(&res).unwrap(), "10.233.97.42");

    let conf = warren_conf("1.0.0", "10.233.97.0/24", e.data.path());
    let pb = NetNs::new("reqb").unwrap();
    let mut att = Attachment::pod("req2", &pb, "ns", "b");
    att.args.push_str(";IP=10.233.97.43");
    let res = warren(&e.host, "ADD", &att, &conf).unwrap().ok().unwrap();
    assert_eq!(result_ip(&res).unwrap(), "10.233.97.43");

    // Asking for a taken address fails and leaves nothing.
    let pc = NetNs::new("reqc").unwrap();
    let mut att = Attachment::pod("req3", &pc, "ns", "c");
    att.args.push_str(";IP=10.233.97.43");
    let out = warren(&e.host, "ADD", &att, &conf).unwrap();
    assert!(!out.success);
    assert_eq!(pc.link_names().unwrap(), vec!["lo".to_string()]);
    assert_eq!(reserved_ips(e.data.path()).unwrap().len(), 2);
}

#[test]
fn should_refuse_bad_input_and_leave_nothing_behind() {
    let e = env("bad");
    let pod = NetNs::new("badp").unwrap();
    let att = Attachment::pod("bad1", &pod, "ns", "p");
    let before = e.host.link_names().unwrap();

    let out = integration_tests::cni::exec_in(
        &e.host,
        &integration_tests::cni::warren_bin(),
        &att.env("ADD"),
        &json!("{not json"),
    )
    .unwrap();
    assert_eq!(out.error_code().unwrap(), 6, "{out:?}");

    let mut conf = warren_conf("1.0.0", "10.233.98.0/24", e.data.path());
    conf["ipam"]["ranges"] = json!([[{"subnet": "10.233.98.0/24", "rangeStart": "10.1.1.1"}]]);
    let out = warren(&e.host, "ADD", &att, &conf).unwrap();
    assert_eq!(out.error_code().unwrap(), 7, "{out:?}");
    let out = warren(
        &e.host,
        "ADD",
        &att,
        &json!({"cniVersion":"1.0.0","name":"n","type":"warren"}),
    )
    .unwrap();
    assert_eq!(out.error_code().unwrap(), 7, "{out:?}");

    let conf = warren_conf("1.0.0", "10.233.98.0/24", e.data.path());
    for bad_id in ["../x", "../../etc/passwd", "a/b"] {
        let evil = Attachment {
            container_id: bad_id.to_string(),
            ..att.clone()
        };
        let out = warren(&e.host, "ADD", &evil, &conf).unwrap();
        assert_eq!(out.error_code().unwrap(), 4, "{out:?}");
    }
    let evil = Attachment {
        ifname: "eth0/../../x".to_string(),
        ..att.clone()
    };
    assert_eq!(warren(&e.host, "ADD", &evil, &conf).unwrap().error_code().unwrap(), 4);
    let gone = Attachment {
        netns: Some("/run/netns/does-not-exist-warren".into()),
        ..att.clone()
    };
    assert_eq!(warren(&e.host, "ADD", &gone, &conf).unwrap().error_code().unwrap(), 4);
    let own = Attachment {
        netns: Some("/proc/self/ns/net".into()),
        ..att.clone()
    };
    assert_eq!(warren(&e.host, "ADD", &own, &conf).unwrap().error_code().unwrap(), 4);

    assert_eq!(e.host.link_names().unwrap(), before);
    assert_eq!(pod.link_names().unwrap(), vec!["lo".to_string()]);
    assert!(reserved_ips(e.data.path()).unwrap().is_empty());
    assert!(!e.data.path().join("x").exists());
}

#[test]
fn should_answer_version() {
    let e = env("vers");
    let out = integration_tests::cni::warren_env(&e.host, "VERSION", &json!({"cniVersion": "1.0.0"})).unwrap();
    let v = out.ok().unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    let supported: Vec<&str> = v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for want in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(supported.contains(&want), "{v}");
    }
}
