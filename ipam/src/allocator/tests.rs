//! Allocator behaviour, every test run over both stores (`mem::*` and `disk::*`).

use std::net::IpAddr;
use std::path::Path;

use serde_json::{json, Value};
use tempfile::TempDir;

use super::*;
use crate::store::{DiskStore, MemStore};

/// A store the tests can also poke at raw, the way a crash or another plugin would.
trait Fixture: Store + Sized {
    fn make(tmp: &Path) -> Self;
    fn put_raw(&self, ip: &str, content: &[u8]);
    fn get_raw(&self, ip: &str) -> Option<Vec<u8>>;
}

impl Fixture for MemStore {
    fn make(_: &Path) -> Self {
        MemStore::new()
    }
    fn put_raw(&self, ip: &str, content: &[u8]) {
        self.insert_raw(ip.parse().unwrap(), content);
    }
    fn get_raw(&self, ip: &str) -> Option<Vec<u8>> {
        self.raw(ip.parse().unwrap())
    }
}

impl Fixture for DiskStore {
    fn make(tmp: &Path) -> Self {
        DiskStore::open(tmp, "testnet").unwrap()
    }
    fn put_raw(&self, ip: &str, content: &[u8]) {
        std::fs::write(self.dir().join(ip), content).unwrap();
    }
    fn get_raw(&self, ip: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir().join(ip)).ok()
    }
}

struct Env<S: Fixture> {
    ipam: Ipam<S>,
    _tmp: TempDir,
}

fn env<S: Fixture>(ipam_conf: Value) -> Env<S> {
    let tmp = TempDir::new().unwrap();
    let cfg = IpamConfig::from_value(ipam_conf).unwrap();
    Env {
        ipam: Ipam::with_store(&cfg, S::make(tmp.path())),
        _tmp: tmp,
    }
}

const NONE: [IpAddr; 0] = [];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|s| ip(s)).collect()
}

fn addrs(allocs: &[Allocation]) -> Vec<String> {
    allocs.iter().map(|a| a.ip.to_string()).collect()
}

fn listed<S: Store>(ipam: &Ipam<S>) -> Vec<IpAddr> {
    ipam.store().list().unwrap().into_iter().map(|r| r.ip).collect()
}

/// 10.0.0.0/29 with gateway .1: the candidates are .2 … .6.
fn small() -> Value {
    json!({"type": "warren-ipam", "ranges": [[{"subnet": "10.0.0.0/29", "gateway": "10.0.0.1"}]]})
}

fn should_hand_out_every_address_once_then_report_exhaustion<S: Fixture>() {
    let e = env::<S>(small());
    assert_eq!(e.ipam.available().unwrap(), 5);
    let mut got = Vec::new();
    for n in 0..5 {
        let a = e.ipam.allocate(&format!("c{n}"), "eth0", &[]).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].gateway, Some(ip("10.0.0.1")));
        got.extend(addrs(&a));
    }
    assert_eq!(
        got,
        [
            "10.0.0.2/29",
            "10.0.0.3/29",
            "10.0.0.4/29",
            "10.0.0.5/29",
            "10.0.0.6/29"
        ]
    );
    assert_eq!(e.ipam.available().unwrap(), 0);
    let err = e.ipam.allocate("c5", "eth0", &[]).unwrap_err();
    assert!(matches!(err, Error::Exhausted { range_set: 0, .. }), "{err}");
    assert!(err.to_string().contains("10.0.0.1-10.0.0.6"), "{err}");
    assert!(!err.is_transient());
    assert_eq!(e.ipam.lookup("c5", "eth0").unwrap(), NONE);
}

fn should_resume_after_last_reserved_and_wrap<S: Fixture>() {
    struct Case {
        name: &'static str,
        last: Option<&'static str>,
        taken: &'static [&'static str],
        want: &'static str,
    }
    let cases = [
        Case {
            name: "fresh store starts at rangeStart, skipping the gateway",
            last: None,
            taken: &[],
            want: "10.0.0.2",
        },
        Case {
            name: "resumes after last reserved",
            last: Some("10.0.0.3"),
            taken: &["10.0.0.3"],
            want: "10.0.0.4",
        },
        Case {
            name: "the last reserved address, released since, is not reused first",
            last: Some("10.0.0.3"),
            taken: &[],
            want: "10.0.0.4",
        },
        Case {
            name: "a released lower address is not reused before the range wraps",
            last: Some("10.0.0.4"),
            taken: &["10.0.0.4"],
            want: "10.0.0.5",
        },
        Case {
            name: "skips taken addresses after last reserved",
            last: Some("10.0.0.3"),
            taken: &["10.0.0.3", "10.0.0.4", "10.0.0.5"],
            want: "10.0.0.6",
        },
        Case {
            name: "wraps from rangeEnd to rangeStart",
            last: Some("10.0.0.6"),
            taken: &["10.0.0.6"],
            want: "10.0.0.2",
        },
        Case {
            name: "wraps past taken addresses",
            last: Some("10.0.0.5"),
            taken: &["10.0.0.6", "10.0.0.2"],
            want: "10.0.0.3",
        },
        Case {
            name: "last reserved itself is tried last",
            last: Some("10.0.0.4"),
            taken: &["10.0.0.2", "10.0.0.3", "10.0.0.5", "10.0.0.6"],
            want: "10.0.0.4",
        },
        Case {
            name: "cursor outside the range (config changed) restarts at rangeStart",
            last: Some("192.168.1.1"),
            taken: &[],
            want: "10.0.0.2",
        },
    ];
    for c in cases {
        let e = env::<S>(small());
        if let Some(last) = c.last {
            e.ipam.store().set_last_reserved(0, ip(last)).unwrap();
        }
        for t in c.taken {
            e.ipam.store().put_raw(t, b"other\r\neth0");
        }
        let a = e.ipam.allocate("me", "eth0", &[]).unwrap();
        assert_eq!(a[0].ip.addr(), ip(c.want), "{}", c.name);
        assert_eq!(e.ipam.store().last_reserved(0).unwrap(), Some(ip(c.want)), "{}", c.name);
    }
}

fn should_honour_or_refuse_requested_addresses<S: Fixture>() {
    struct Case {
        name: &'static str,
        conf: Value,
        requested: &'static [&'static str],
        want: Result<&'static [&'static str], fn(&Error) -> bool>,
    }
    let explicit =
        json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/29", "rangeStart": "10.0.0.0", "rangeEnd": "10.0.0.7"}]]});
    let dual = json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/29"}], [{"subnet": "fd00::/120"}]]});
    let cases = [
        Case {
            name: "free address in range",
            conf: small(),
            requested: &["10.0.0.5"],
            want: Ok(&["10.0.0.5/29"]),
        },
        Case {
            name: "taken by another container",
            conf: small(),
            requested: &["10.0.0.3"],
            want: Err(|e| {
                matches!(e, Error::RequestedUnavailable { ip, owner }
                    if *ip == "10.0.0.3".parse::<IpAddr>().unwrap() && owner == "other/eth0")
            }),
        },
        Case {
            name: "outside every range",
            conf: small(),
            requested: &["10.0.1.5"],
            want: Err(|e| matches!(e, Error::RequestedNotInRange { .. })),
        },
        Case {
            name: "the gateway",
            conf: small(),
            requested: &["10.0.0.1"],
            want: Err(|e| matches!(e, Error::RequestedReserved { what: "gateway", .. })),
        },
        Case {
            name: "the network address, even inside an explicit range",
            conf: explicit.clone(),
            requested: &["10.0.0.0"],
            want: Err(|e| {
                matches!(
                    e,
                    Error::RequestedReserved {
                        what: "network address",
                        ..
                    }
                )
            }),
        },
        Case {
            name: "the broadcast address, even inside an explicit range",
            conf: explicit,
            requested: &["10.0.0.7"],
            want: Err(|e| {
                matches!(
                    e,
                    Error::RequestedReserved {
                        what: "broadcast address",
                        ..
                    }
                )
            }),
        },
        Case {
            name: "two addresses for one range set",
            conf: small(),
            requested: &["10.0.0.4", "10.0.0.5"],
            want: Err(|e| matches!(e, Error::RequestedSameRangeSet { range_set: 0, .. })),
        },
        Case {
            name: "one address per family, in any order",
            conf: dual.clone(),
            requested: &["fd00::9", "10.0.0.6"],
            want: Ok(&["10.0.0.6/29", "fd00::9/120"]),
        },
        Case {
            name: "only the IPv6 one requested: IPv4 comes from the range",
            conf: dual,
            requested: &["fd00::9"],
            want: Ok(&["10.0.0.1/29", "fd00::9/120"]),
        },
    ];
    for c in cases {
        let e = env::<S>(c.conf);
        e.ipam.store().put_raw("10.0.0.3", b"other\r\neth0");
        let got = e.ipam.allocate("me", "eth0", &ips(c.requested));
        match (got, c.want) {
            (Ok(a), Ok(want)) => {
                assert_eq!(addrs(&a), want, "{}", c.name);
                let mut held = e.ipam.lookup("me", "eth0").unwrap();
                held.sort();
                let mut want_ips: Vec<IpAddr> = a.iter().map(|x| x.ip.addr()).collect();
                want_ips.sort();
                assert_eq!(held, want_ips, "{}", c.name);
            }
            (Err(err), Err(check)) => {
                assert!(check(&err), "{}: unexpected error {err:?}", c.name);
                assert_eq!(
                    listed(&e.ipam),
                    ips(&["10.0.0.3"]),
                    "{}: nothing may stay reserved",
                    c.name
                );
            }
            (got, _) => panic!("{}: got {got:?}", c.name),
        }
    }
}

fn should_return_existing_addresses_on_repeated_add<S: Fixture>() {
    let e = env::<S>(json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/29"}], [{"subnet": "fd00::/120"}]]}));
    let first = e.ipam.allocate("c1", "eth0", &[]).unwrap();
    let again = e.ipam.allocate("c1", "eth0", &[]).unwrap();
    assert_eq!(first, again);
    assert_eq!(addrs(&first), ["10.0.0.1/29", "fd00::1/120"]);
    // Asking again for what it holds is fine; asking for something else is a conflict.
    let with_req = e.ipam.allocate("c1", "eth0", &[ip("fd00::1")]).unwrap();
    assert_eq!(with_req, first);
    let err = e.ipam.allocate("c1", "eth0", &[ip("fd00::5")]).unwrap_err();
    assert!(matches!(err, Error::AlreadyAllocated { range_set: 1, .. }), "{err:?}");
    assert_eq!(listed(&e.ipam).len(), 2, "no extra reservation");

    // Another interface of the same container is another attachment.
    let eth1 = e.ipam.allocate("c1", "eth1", &[]).unwrap();
    assert_eq!(addrs(&eth1), ["10.0.0.2/29", "fd00::2/120"]);

    let released = e.ipam.release("c1", "eth0").unwrap();
    assert_eq!(released, ips(&["10.0.0.1", "fd00::1"]));
    assert_eq!(e.ipam.release("c1", "eth0").unwrap(), NONE);
    assert_eq!(e.ipam.release("never-added", "eth0").unwrap(), NONE);
    assert_eq!(e.ipam.lookup("c1", "eth1").unwrap(), ips(&["10.0.0.2", "fd00::2"]));
}

fn should_garbage_collect_all_but_kept_attachments<S: Fixture>() {
    let e = env::<S>(small());
    for c in ["a", "b", "c"] {
        e.ipam.allocate(c, "eth0", &[]).unwrap(); // .2 .3 .4
    }
    let st = e.ipam.store();
    st.put_raw("10.0.0.5", b""); // killed between create and write
    st.put_raw("10.0.0.6", b"legacy-keep"); // pre-ifname host-local
    st.put_raw("10.0.0.7", b"\xff\xfe"); // garbage
    assert_eq!(
        e.ipam.available().unwrap(),
        0,
        "empty and garbage files still block their address"
    );
    let keep = vec![
        ("a".to_string(), "eth0".to_string()),
        ("c".to_string(), "eth1".to_string()), // same container, other interface: not kept
        ("legacy-keep".to_string(), "eth0".to_string()),
    ];
    let mut released = e.ipam.gc(&keep).unwrap();
    released.sort();
    assert_eq!(released, ips(&["10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.7"]));
    assert_eq!(listed(&e.ipam), ips(&["10.0.0.2", "10.0.0.6"]));
    assert_eq!(e.ipam.gc(&keep).unwrap(), NONE, "gc is idempotent");
    assert_eq!(e.ipam.gc(&[]).unwrap(), ips(&["10.0.0.2", "10.0.0.6"]));
}

fn should_skip_an_unfinished_reservation<S: Fixture>() {
    let e = env::<S>(small());
    e.ipam.store().put_raw("10.0.0.2", b"");
    let a = e.ipam.allocate("c1", "eth0", &[]).unwrap();
    assert_eq!(addrs(&a), ["10.0.0.3/29"]);
    let err = e.ipam.allocate("c2", "eth0", &[ip("10.0.0.2")]).unwrap_err();
    assert!(
        matches!(&err, Error::RequestedUnavailable { owner, .. } if owner.contains("unfinished")),
        "{err:?}"
    );
}

fn should_roll_back_every_range_set_when_one_fails<S: Fixture>() {
    let conf = json!({"type": "x", "ranges": [
        [{"subnet": "10.0.0.0/29"}],
        [{"subnet": "fd00::/120", "rangeStart": "fd00::10", "rangeEnd": "fd00::11"}],
    ]});
    let e = env::<S>(conf);
    e.ipam.store().put_raw("fd00::10", b"x\r\neth0");
    e.ipam.store().put_raw("fd00::11", b"y\r\neth0");
    let err = e.ipam.allocate("c1", "eth0", &[]).unwrap_err();
    assert!(matches!(err, Error::Exhausted { range_set: 1, .. }), "{err:?}");
    assert_eq!(
        listed(&e.ipam),
        ips(&["fd00::10", "fd00::11"]),
        "IPv4 reservation undone"
    );
    assert_eq!(e.ipam.lookup("c1", "eth0").unwrap(), NONE);
    assert_eq!(e.ipam.available().unwrap(), 0, "minimum over range sets");

    // A requested IPv4 address is rolled back too when IPv6 fails.
    let err = e.ipam.allocate("c1", "eth0", &[ip("10.0.0.4")]).unwrap_err();
    assert!(matches!(err, Error::Exhausted { range_set: 1, .. }), "{err:?}");
    assert_eq!(listed(&e.ipam), ips(&["fd00::10", "fd00::11"]));

    e.ipam.release("x", "eth0").unwrap();
    let a = e.ipam.allocate("c1", "eth0", &[]).unwrap();
    assert_eq!(addrs(&a).len(), 2);
    assert_eq!(a[1].ip.to_string(), "fd00::10/120");
    assert_eq!(a[1].gateway, None);
}

fn should_never_hand_out_network_or_broadcast<S: Fixture>() {
    let e = env::<S>(json!({"type": "x", "ranges": [[
        {"subnet": "10.0.0.0/29", "rangeStart": "10.0.0.0", "rangeEnd": "10.0.0.7", "gateway": "10.0.0.6"}
    ]]}));
    assert_eq!(e.ipam.available().unwrap(), 5);
    let mut got = Vec::new();
    while let Ok(a) = e.ipam.allocate(&format!("c{}", got.len()), "eth0", &[]) {
        got.extend(addrs(&a));
    }
    assert_eq!(
        got,
        [
            "10.0.0.1/29",
            "10.0.0.2/29",
            "10.0.0.3/29",
            "10.0.0.4/29",
            "10.0.0.5/29"
        ]
    );
}

fn should_read_host_local_records<S: Fixture>() {
    let e = env::<S>(small());
    let st = e.ipam.store();
    st.put_raw("10.0.0.2", b"legacy-id");
    st.put_raw("10.0.0.3", b"  new-id\r\neth0");
    st.set_last_reserved(0, ip("10.0.0.3")).unwrap();
    assert_eq!(e.ipam.lookup("legacy-id", "eth0").unwrap(), ips(&["10.0.0.2"]));
    assert_eq!(e.ipam.lookup("new-id", "eth0").unwrap(), ips(&["10.0.0.3"]));
    assert_eq!(e.ipam.lookup("new-id", "eth1").unwrap(), NONE);
    // A legacy reservation counts as the container's address on a repeated ADD.
    assert_eq!(
        addrs(&e.ipam.allocate("legacy-id", "eth0", &[]).unwrap()),
        ["10.0.0.2/29"]
    );
    let a = e.ipam.allocate("fresh", "eth0", &[]).unwrap();
    assert_eq!(addrs(&a), ["10.0.0.4/29"]);
    assert_eq!(st.get_raw("10.0.0.4").unwrap(), b"fresh\r\neth0");
    assert_eq!(e.ipam.release("legacy-id", "eth0").unwrap(), ips(&["10.0.0.2"]));
    assert_eq!(e.ipam.release("new-id", "eth0").unwrap(), ips(&["10.0.0.3"]));
}

fn should_refuse_keys_that_would_corrupt_records<S: Fixture>() {
    let e = env::<S>(small());
    for (id, ifname) in [
        ("a\r\nb", "eth0"),
        ("", "eth0"),
        ("a", "eth\n0"),
        ("a\0", "eth0"),
        ("a", ""),
    ] {
        let err = e.ipam.allocate(id, ifname, &[]).unwrap_err();
        assert!(matches!(err, Error::BadKey { .. }), "{id:?} {ifname:?}: {err:?}");
        assert!(matches!(e.ipam.release(id, ifname).unwrap_err(), Error::BadKey { .. }));
    }
    assert_eq!(listed(&e.ipam), NONE);
}

macro_rules! over_stores {
    ($($name:ident),* $(,)?) => {
        mod mem {
            $( #[test] fn $name() { super::$name::<crate::store::MemStore>() } )*
        }
        mod disk {
            $( #[test] fn $name() { super::$name::<crate::store::DiskStore>() } )*
        }
    };
}

over_stores!(
    should_hand_out_every_address_once_then_report_exhaustion,
    should_resume_after_last_reserved_and_wrap,
    should_honour_or_refuse_requested_addresses,
    should_return_existing_addresses_on_repeated_add,
    should_garbage_collect_all_but_kept_attachments,
    should_skip_an_unfinished_reservation,
    should_roll_back_every_range_set_when_one_fails,
    should_never_hand_out_network_or_broadcast,
    should_read_host_local_records,
    should_refuse_keys_that_would_corrupt_records,
);

// ---- DiskStore-only: the exact files, against host-local's layout ----

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

#[test]
fn should_write_and_read_host_local_store_directory() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("k8s-pod-network");
    std::fs::create_dir_all(&dir).unwrap();
    // A directory as host-local leaves it (dual stack): lock, cursors, current and legacy records.
    std::fs::write(dir.join("lock"), b"").unwrap();
    std::fs::write(dir.join("last_reserved_ip.0"), b"10.244.1.3").unwrap();
    std::fs::write(dir.join("last_reserved_ip.1"), b"fd00:244:1::3").unwrap();
    std::fs::write(dir.join("10.244.1.2"), b"c0ffee\r\neth0").unwrap();
    std::fs::write(dir.join("fd00:244:1::2"), b"c0ffee\r\neth0").unwrap();
    std::fs::write(dir.join("10.244.1.3"), b"oldpod").unwrap();
    std::fs::write(dir.join("fd00:244:1::3"), b"oldpod").unwrap();

    let cfg = IpamConfig::from_value(json!({
        "type": "host-local",
        "dataDir": tmp.path(),
        "ranges": [[{"subnet": "10.244.1.0/24", "gateway": "10.244.1.1"}], [{"subnet": "fd00:244:1::/64"}]],
    }))
    .unwrap();
    let ipam = Ipam::open(&cfg, "k8s-pod-network").unwrap();
    assert_eq!(
        ipam.lookup("c0ffee", "eth0").unwrap(),
        ips(&["10.244.1.2", "fd00:244:1::2"])
    );
    assert_eq!(
        ipam.lookup("oldpod", "eth0").unwrap(),
        ips(&["10.244.1.3", "fd00:244:1::3"])
    );
    assert_eq!(ipam.available().unwrap(), 253 - 2);

    let a = ipam.allocate("beef", "eth0", &[]).unwrap();
    assert_eq!(addrs(&a), ["10.244.1.4/24", "fd00:244:1::4/64"]);
    assert_eq!(a[0].gateway, Some(ip("10.244.1.1")));
    assert_eq!(read(&dir, "10.244.1.4"), "beef\r\neth0");
    assert_eq!(read(&dir, "fd00:244:1::4"), "beef\r\neth0");
    assert_eq!(read(&dir, "last_reserved_ip.0"), "10.244.1.4");
    assert_eq!(read(&dir, "last_reserved_ip.1"), "fd00:244:1::4");

    // DEL of a pre-ifname container releases its legacy records, in both families.
    assert_eq!(
        ipam.release("oldpod", "eth0").unwrap(),
        ips(&["10.244.1.3", "fd00:244:1::3"])
    );
    assert!(!dir.join("10.244.1.3").exists());
    // Bookkeeping files are not reservations: gc with nothing kept leaves them alone.
    ipam.gc(&[]).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["last_reserved_ip.0", "last_reserved_ip.1", "lock"]);
}

#[test]
fn should_reject_unsafe_network_names_before_touching_disk() {
    let tmp = TempDir::new().unwrap();
    let cfg = IpamConfig::from_value(json!({"type": "x", "dataDir": tmp.path().join("data"), "subnet": "10.0.0.0/24"}))
        .unwrap();
    for name in ["", "..", ".", "../escape", "a/b", "a\0b"] {
        let err = Ipam::open(&cfg, name).unwrap_err();
        assert!(matches!(err, Error::BadNetworkName { .. }), "{name:?}: {err:?}");
    }
    assert!(!tmp.path().join("data").exists());
    let ipam = Ipam::open(&cfg, "net").unwrap();
    assert!(ipam.store().dir().join("lock").exists());
}

#[test]
fn should_time_out_when_another_holder_keeps_the_lock() {
    let tmp = TempDir::new().unwrap();
    let cfg = IpamConfig::from_value(json!({"type": "x", "subnet": "10.0.0.0/24"})).unwrap();
    let holder = DiskStore::open(tmp.path(), "net").unwrap();
    let guard = holder.lock().unwrap();
    let store = DiskStore::open(tmp.path(), "net")
        .unwrap()
        .with_lock_timeout(std::time::Duration::from_millis(100));
    let ipam = Ipam::with_store(&cfg, store);
    let started = std::time::Instant::now();
    let err = ipam.allocate("c1", "eth0", &[]).unwrap_err();
    assert!(matches!(err, Error::LockTimeout { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(started.elapsed() >= std::time::Duration::from_millis(100));
    drop(guard);
    assert_eq!(addrs(&ipam.allocate("c1", "eth0", &[]).unwrap()), ["10.0.0.1/24"]);
}

#[test]
fn should_report_io_failures_with_the_path() {
    let tmp = TempDir::new().unwrap();
    let cfg = IpamConfig::from_value(json!({"type": "x", "subnet": "10.0.0.0/24"})).unwrap();
    let ipam = Ipam::with_store(&cfg, DiskStore::open(tmp.path(), "net").unwrap());
    // A directory squatting on the cursor's name makes the atomic rename fail.
    std::fs::create_dir(ipam.store().dir().join("last_reserved_ip.0")).unwrap();
    std::fs::write(ipam.store().dir().join("last_reserved_ip.0").join("x"), b"").unwrap();
    let err = ipam.allocate("c1", "eth0", &[]).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with("last_reserved_ip.0")),
        "{err:?}"
    );
    assert_eq!(listed(&ipam), NONE, "the reservation is rolled back");
}
