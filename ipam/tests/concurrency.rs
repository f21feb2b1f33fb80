//! Many allocators on one store directory at once, each with its own `Ipam` (own lock file
//! description), as concurrent CNI ADDs on a node are: every one must get a different address.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ipam::{Ipam, IpamConfig};
use serde_json::json;
use tempfile::TempDir;

const N: usize = 50;
const NETWORK: &str = "k8s-pod-network";
const CHILD_DIR: &str = "WARREN_IPAM_TEST_CHILD_DIR";
const CHILD_ID: &str = "WARREN_IPAM_TEST_CHILD_ID";

fn config(data_dir: &Path) -> IpamConfig {
    IpamConfig::from_value(json!({
        "type": "warren-ipam",
        "dataDir": data_dir,
        "ranges": [[{"subnet": "10.22.0.0/24", "gateway": "10.22.0.1"}]],
    }))
    .unwrap()
}

/// Every reservation file of the store, address → content.
fn on_disk(data_dir: &Path) -> BTreeMap<IpAddr, String> {
    std::fs::read_dir(data_dir.join(NETWORK))
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let ip = e.file_name().to_str()?.parse::<IpAddr>().ok()?;
            Some((ip, std::fs::read_to_string(e.path()).unwrap()))
        })
        .collect()
}

fn assert_distinct_and_recorded(data_dir: &Path, got: &[(String, IpAddr)]) {
    let distinct: BTreeSet<IpAddr> = got.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(distinct.len(), N, "duplicate addresses handed out: {got:?}");
    assert!(
        !distinct.contains(&"10.22.0.1".parse::<IpAddr>().unwrap()),
        "gateway handed out"
    );
    let files = on_disk(data_dir);
    assert_eq!(files.len(), N, "one reservation file per allocation");
    for (id, ip) in got {
        assert_eq!(files[ip], format!("{id}\r\neth0"), "record of {ip}");
    }
}

#[test]
fn should_give_concurrent_threads_distinct_addresses() {
    let tmp = TempDir::new().unwrap();
    let cfg = Arc::new(config(tmp.path()));
    let start = Arc::new(Barrier::new(N));
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let (cfg, start) = (cfg.clone(), start.clone());
            std::thread::spawn(move || {
                let ipam = Ipam::open(&cfg, NETWORK).unwrap();
                let id = format!("thread-{i}");
                start.wait();
                let a = ipam.allocate(&id, "eth0", &[]).unwrap();
                (id, a[0].ip.addr())
            })
        })
        .collect();
    let got: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_distinct_and_recorded(tmp.path(), &got);

    // Concurrent releases leave nothing behind.
    let start = Arc::new(Barrier::new(N));
    let handles: Vec<_> = got
        .into_iter()
        .map(|(id, ip)| {
            let (cfg, start) = (cfg.clone(), start.clone());
            std::thread::spawn(move || {
                let ipam = Ipam::open(&cfg, NETWORK).unwrap();
                start.wait();
                assert_eq!(ipam.release(&id, "eth0").unwrap(), [ip]);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(on_disk(tmp.path()).is_empty());
}

#[test]
fn should_give_concurrent_processes_distinct_addresses() {
    let tmp = TempDir::new().unwrap();
    let go = tmp.path().join("go");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..N)
        .map(|i| {
            Command::new(&exe)
                .args(["--exact", "child_process_allocates", "--include-ignored", "--nocapture"])
                .env(CHILD_DIR, tmp.path())
                .env(CHILD_ID, format!("proc-{i}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect();
    // Release them all at once, so their ADDs really overlap.
    std::fs::write(&go, b"").unwrap();
    let mut got = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "child {i} failed: {:?}", out.status);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let ip = stdout
            .lines()
            .find_map(|l| l.strip_prefix("ALLOCATED "))
            .unwrap_or_else(|| panic!("child {i} printed no address: {stdout}"));
        got.push((format!("proc-{i}"), ip.trim().parse::<IpAddr>().unwrap()));
    }
    assert_distinct_and_recorded(tmp.path(), &got);
}

/// Not a test of its own: the body of one child process of
/// `should_give_concurrent_processes_distinct_addresses`.
#[test]
#[ignore = "run in child processes by should_give_concurrent_processes_distinct_addresses"]
fn child_process_allocates() {
    let dir = std::path::PathBuf::from(std::env::var(CHILD_DIR).expect("run by the parent test"));
    let id = std::env::var(CHILD_ID).unwrap();
    let ipam = Ipam::open(&config(&dir), NETWORK).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("go").exists() {
        assert!(Instant::now() < deadline, "parent never said go");
        std::thread::sleep(Duration::from_millis(1));
    }
    let a = ipam.allocate(&id, "eth0", &[]).unwrap();
    println!("ALLOCATED {}", a[0].ip.addr());
}
