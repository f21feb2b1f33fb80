//! Against the real reference plugin (`/usr/lib/cni/host-local`, or `$HOST_LOCAL_BIN`) on one
//! store directory: each reads the other's reservations and cursor, releases the other's records,
//! and waits on the other's lock.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use ipam::{Ipam, IpamConfig, Store};
use serde_json::{json, Value};
use tempfile::TempDir;

const NETWORK: &str = "interop";

fn host_local() -> PathBuf {
    let bin =
        std::env::var_os("HOST_LOCAL_BIN").map_or_else(|| PathBuf::from("/usr/lib/cni/host-local"), PathBuf::from);
    assert!(
        bin.exists(),
        "{} not found: install containernetworking-plugins or set HOST_LOCAL_BIN",
        bin.display()
    );
    bin
}

fn ipam_section(data_dir: &Path) -> Value {
    // Gateways are explicit: host-local claims .1 as gateway when none is given, conf does not.
    json!({
        "type": "host-local",
        "dataDir": data_dir,
        "ranges": [
            [{"subnet": "10.55.0.0/24", "gateway": "10.55.0.1"}],
            [{"subnet": "fd55::/64", "gateway": "fd55::1"}],
        ],
    })
}

fn spawn_host_local(data_dir: &Path, command: &str, container_id: &str) -> Child {
    let conf = json!({"cniVersion": "1.0.0", "name": NETWORK, "ipam": ipam_section(data_dir)});
    let mut child = Command::new(host_local())
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", "/proc/self/ns/net")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    child
}

fn check(out: Output) -> Output {
    assert!(
        out.status.success(),
        "host-local failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// host-local ADD; returns the addresses of its result.
fn host_local_add(data_dir: &Path, container_id: &str) -> Vec<IpAddr> {
    let out = check(
        spawn_host_local(data_dir, "ADD", container_id)
            .wait_with_output()
            .unwrap(),
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| {
            let cidr: ipnet::IpNet = ip["address"].as_str().unwrap().parse().unwrap();
            cidr.addr()
        })
        .collect()
}

fn host_local_del(data_dir: &Path, container_id: &str) {
    check(
        spawn_host_local(data_dir, "DEL", container_id)
            .wait_with_output()
            .unwrap(),
    );
}

fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn should_share_a_store_with_host_local() {
    let tmp = TempDir::new().unwrap();
    let cfg = IpamConfig::from_value(ipam_section(tmp.path())).unwrap();

    assert_eq!(host_local_add(tmp.path(), "hl-1"), ips(&["10.55.0.2", "fd55::2"]));

    let ipam = Ipam::open(&cfg, NETWORK).unwrap();
    assert_eq!(ipam.lookup("hl-1", "eth0").unwrap(), ips(&["10.55.0.2", "fd55::2"]));
    // Resumes after host-local's cursor, in both range sets.
    let ours: Vec<IpAddr> = ipam
        .allocate("warren-1", "eth0", &[])
        .unwrap()
        .iter()
        .map(|a| a.ip.addr())
        .collect();
    assert_eq!(ours, ips(&["10.55.0.3", "fd55::3"]));

    // host-local resumes after ours and sees our records as taken.
    assert_eq!(host_local_add(tmp.path(), "hl-2"), ips(&["10.55.0.4", "fd55::4"]));

    // Each releases the other's records.
    host_local_del(tmp.path(), "warren-1");
    assert_eq!(ipam.lookup("warren-1", "eth0").unwrap(), ips(&[]));
    assert_eq!(ipam.release("hl-1", "eth0").unwrap(), ips(&["10.55.0.2", "fd55::2"]));
    let left: Vec<IpAddr> = ipam.store().list().unwrap().into_iter().map(|r| r.ip).collect();
    assert_eq!(left, ips(&["10.55.0.4", "fd55::4"]));
}

#[test]
fn should_exclude_host_local_while_holding_the_lock() {
    let tmp = TempDir::new().unwrap();
    let cfg = IpamConfig::from_value(ipam_section(tmp.path())).unwrap();
    let ipam = Ipam::open(&cfg, NETWORK).unwrap();

    let guard = ipam.store().lock().unwrap();
    let mut child = spawn_host_local(tmp.path(), "ADD", "hl-blocked");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "host-local ran while warren held the lock"
    );
    assert!(!ipam.store().dir().join("10.55.0.2").exists());
    drop(guard);
    check(child.wait_with_output().unwrap());
    assert_eq!(
        ipam.lookup("hl-blocked", "eth0").unwrap(),
        ips(&["10.55.0.2", "fd55::2"])
    );
}
