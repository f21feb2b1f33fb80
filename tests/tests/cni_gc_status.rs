//! GC and STATUS (CNI 1.1), and 50 concurrent ADDs.
#![allow(clippy::unwrap_used)] // Test helpers: a panic is the failure report.

use std::collections::HashSet;

use integration_tests::cni::{reserved_ips, result_ip, warren, warren_conf, warren_env, Attachment};
use integration_tests::netns::NetNs;
use serde_json::json;

#[test]
fn should_collect_everything_not_listed_and_nothing_else() {
    let host = NetNs::new_host("gc").unwrap();
    let data = tempfile::tempdir().unwrap();
    let conf = warren_conf("1.1.0", "10.233.101.0/24", data.path());
    let pods: Vec<NetNs> = (0..3).map(|_| NetNs::new("gcp").unwrap()).collect();
    let atts: Vec<Attachment> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| Attachment::pod(&format!("gc{i}"), p, "ns", &format!("pod-{i}")))
        .collect();
    let results: Vec<_> = atts
        .iter()
        .map(|a| warren(&host, "ADD", a, &conf).unwrap().ok().unwrap())
        .collect();
    let veth = |i: usize| results[i]["interfaces"][0]["name"].as_str().unwrap().to_string();
    let ip = |i: usize| result_ip(&results[i]).unwrap();

    // A crash mid-ADD: a veth with warren's group but no alias yet, and a reservation whose
    // container is long gone. A foreign cali* link (no warren group) must survive.
    host.ip(&[
        "link",
        "add",
        "cali00000000ded",
        "group",
        "22354",
        "type",
        "veth",
        "peer",
        "name",
        "ded-peer",
    ])
    .unwrap();
    host.ip(&[
        "link",
        "add",
        "cali0000foreign",
        "type",
        "veth",
        "peer",
        "name",
        "frn-peer",
    ])
    .unwrap();
    std::fs::write(data.path().join("k8s-pod-network/10.233.101.200"), "ghost\r\neth0").unwrap();

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gc0", "ifname": "eth0"}]);
    let out = warren_env(&host, "GC", &gc).unwrap();
    assert!(out.success, "{out:?}");

    let links = host.link_names().unwrap();
    assert!(links.contains(&veth(0)), "live attachment removed");
    assert!(!links.contains(&veth(1)) && !links.contains(&veth(2)), "{links:?}");
    assert!(!links.contains(&"cali00000000ded".to_string()), "{links:?}");
    assert!(links.contains(&"cali0000foreign".to_string()), "foreign link removed");
    assert_eq!(reserved_ips(data.path()).unwrap(), vec![ip(0)]);
    let routes = host.ip(&["route", "show"]).unwrap();
    assert!(
        routes.contains(&ip(0)) && !routes.contains(&ip(1)) && !routes.contains(&ip(2)),
        "{routes}"
    );
    // The kept pod still works.
    let mut check = conf.clone();
    check["prevResult"] = results[0].clone();
    warren(&host, "CHECK", &atts[0], &check).unwrap().ok().unwrap();

    // Without the list, GC refuses rather than collecting everything.
    assert_eq!(warren_env(&host, "GC", &conf).unwrap().error_code().unwrap(), 7);
}

#[test]
fn should_report_status_ready_then_exhausted() {
    let host = NetNs::new_host("st").unwrap();
    let data = tempfile::tempdir().unwrap();
    let conf = warren_conf("1.1.0", "10.233.102.0/30", data.path());
    let out = warren_env(&host, "STATUS", &conf).unwrap();
    assert!(out.success && out.stdout.trim().is_empty(), "{out:?}");

    let pods: Vec<NetNs> = (0..2).map(|_| NetNs::new("stp").unwrap()).collect();
    for (i, p) in pods.iter().enumerate() {
        warren(
            &host,
            "ADD",
            &Attachment::pod(&format!("st{i}"), p, "ns", &format!("s{i}")),
            &conf,
        )
        .unwrap()
        .ok()
        .unwrap();
    }
    assert_eq!(warren_env(&host, "STATUS", &conf).unwrap().error_code().unwrap(), 50);
    let third = NetNs::new("stp").unwrap();
    let out = warren(&host, "ADD", &Attachment::pod("st3", &third, "ns", "s3"), &conf).unwrap();
    assert!(!out.success);
    assert_eq!(third.link_names().unwrap(), vec!["lo".to_string()]);

    let broken = json!({"cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "warren",
        "ipam": {"type": "warren-ipam", "ranges": [[{"subnet": "nope"}]]}});
    assert_ne!(warren_env(&host, "STATUS", &broken).unwrap().error_code().unwrap(), 0);
}

#[test]
fn should_give_fifty_parallel_adds_fifty_distinct_addresses() {
    let host = NetNs::new_host("par").unwrap();
    let data = tempfile::tempdir().unwrap();
    let conf = warren_conf("1.0.0", "10.233.103.0/24", data.path());
    let pods: Vec<NetNs> = (0..50).map(|_| NetNs::new("parp").unwrap()).collect();
    let atts: Vec<Attachment> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| Attachment::pod(&format!("par{i:02}"), p, "ns", &format!("par-{i}")))
        .collect();
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = atts
            .iter()
            .map(|a| {
                let (host, conf) = (&host, &conf);
                s.spawn(move || result_ip(&warren(host, "ADD", a, conf).unwrap().ok().unwrap()).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct: HashSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), 50, "{ips:?}");
    assert_eq!(reserved_ips(data.path()).unwrap().len(), 50);
    let cali = host
        .link_names()
        .unwrap()
        .into_iter()
        .filter(|l| l.starts_with("cali"))
        .count();
    assert_eq!(cali, 50);

    std::thread::scope(|s| {
        for a in &atts {
            let (host, conf) = (&host, &conf);
            s.spawn(move || warren(host, "DEL", a, conf).unwrap().ok().unwrap());
        }
    });
    assert!(reserved_ips(data.path()).unwrap().is_empty());
    assert!(!host.link_names().unwrap().iter().any(|l| l.starts_with("cali")));
}
