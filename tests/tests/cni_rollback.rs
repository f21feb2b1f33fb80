//! Every failed ADD undoes what it made: an injected failure (or panic) after each step leaves
//! no veth, no route, no reservation. Runs `cni_bin` in-process with the fault seam, on a
//! thread that has entered the test's host namespace.
#![allow(clippy::unwrap_used)] // Test helpers: a panic is the failure report.

use integration_tests::cni::{reserved_ips, warren, warren_conf, Attachment};
use integration_tests::netns::NetNs;

fn attempt(step: cni_bin::Step, panic: bool) {
    let host = NetNs::new_host("rb").unwrap();
    let pod = NetNs::new("rbp").unwrap();
    let data = tempfile::tempdir().unwrap();
    let conf = warren_conf("1.0.0", "10.233.100.0/24", data.path());
    let att = Attachment::pod("rb1", &pod, "ns", "rollback");
    let env = att.env("ADD");
    let stdin = serde_json::to_vec(&conf).unwrap();
    let host_links = host.link_names().unwrap();

    let reply = host
        .run(move || cni_bin::handle(cni_bin::Plugin::Warren, &env, &stdin, &cni_bin::FailAt { step, panic }))
        .unwrap();
    assert!(!reply.success, "{step:?}: {reply:?}");
    let out = reply.stdout.unwrap();
    assert!(out["code"].as_u64().unwrap() >= 100, "{out}");
    if !panic {
        assert!(out["msg"].as_str().unwrap().contains(step.name()), "{out}");
    }

    assert_eq!(
        host.link_names().unwrap(),
        host_links,
        "{step:?} panic={panic}: veth left behind"
    );
    assert_eq!(
        pod.link_names().unwrap(),
        vec!["lo".to_string()],
        "{step:?}: pod side left behind"
    );
    let routes = host.ip(&["route", "show"]).unwrap();
    assert!(!routes.contains("10.233.100."), "{step:?}: route left behind: {routes}");
    assert!(
        reserved_ips(data.path()).unwrap().is_empty(),
        "{step:?}: reservation left behind"
    );

    // The same attachment then succeeds: nothing stale is in the way.
    let res = warren(&host, "ADD", &att, &conf).unwrap().ok().unwrap();
    assert_eq!(res["interfaces"][1]["name"], "eth0");
}

#[test]
fn should_roll_back_an_injected_failure_after_every_step() {
    for step in cni_bin::Step::ALL {
        attempt(step, false);
    }
}

#[test]
fn should_roll_back_a_panic_after_every_step() {
    for step in cni_bin::Step::ALL {
        attempt(step, true);
    }
}
