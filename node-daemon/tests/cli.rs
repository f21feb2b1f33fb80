//! The `warren-node` command line: clear configuration errors, `install-cni`, and `uninstall`
//! (in a fresh netns) removing exactly what warren made.

// Tests may unwrap: a panic shows the error.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_warren-node");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn should_refuse_bad_configuration_with_a_clear_message() {
    let o = run(&["run", "--node-name", "n", "--pool", "10.0.0.0/26"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("block size /24 is larger than the pool 10.0.0.0/26"),
        "{}",
        stderr(&o)
    );
    let o = run(&["run", "--node-name", "n", "--pool", "10.233.64.0/40"]);
    assert!(stderr(&o).contains("10.233.64.0/40"), "{}", stderr(&o));
    let o = run(&["run", "--node-name", "n", "--ipip-mode", "Sometimes"]);
    assert!(stderr(&o).contains("Always, CrossSubnet, Never"), "{}", stderr(&o));
    let o = Command::new(BIN)
        .args(["run", "--node-name", "n"])
        .env("WARREN_IPTABLES_BACKEND", "ebtables")
        .output()
        .unwrap();
    assert!(stderr(&o).contains("\"ebtables\""), "env is read too: {}", stderr(&o));
    let o = Command::new(BIN)
        .args(["run", "--node-name", "n"])
        .env("WARREN_MTU", "jumbo")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("neither a number nor `auto`"), "{}", stderr(&o));
}

#[test]
fn should_install_the_plugin_binaries_and_the_conflist() {
    let src = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let conf = tempfile::tempdir().unwrap();
    let o = run(&[
        "install-cni",
        "--source-dir",
        src.path().to_str().unwrap(),
        "--cni-bin-dir",
        bin.path().to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("warren"), "missing binary named: {}", stderr(&o));
    std::fs::write(src.path().join("warren"), b"w").unwrap();
    std::fs::write(src.path().join("warren-ipam"), b"i").unwrap();
    let o = run(&[
        "install-cni",
        "--source-dir",
        src.path().to_str().unwrap(),
        "--cni-bin-dir",
        bin.path().to_str().unwrap(),
        "--cni-conf-dir",
        conf.path().to_str().unwrap(),
        "--block",
        "10.233.90.0/24",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(bin.path().join("warren-ipam")).unwrap(), b"i");
    let list = std::fs::read_to_string(conf.path().join("10-warren.conflist")).unwrap();
    assert!(
        list.contains("10.233.90.0/24") && list.contains("\"mtu\": 1480"),
        "{list}"
    );
}

#[test]
fn should_uninstall_everything_warren_made_and_nothing_else() {
    assert!(nix::unistd::Uid::effective().is_root(), "needs root");
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let ns = Ns(format!("wn-un-{}", std::process::id()));
    let sh = |args: &[&str]| {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .unwrap()
        .success());
    sh(&["ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1"]);
    sh(&["ip", "addr", "add", "192.168.81.1/24", "dev", "u0"]);
    sh(&["ip", "link", "set", "u0", "up"]);
    sh(&[
        "ip",
        "route",
        "add",
        "10.233.1.0/24",
        "via",
        "192.168.81.2",
        "proto",
        "88",
    ]);
    sh(&["ip", "route", "add", "10.99.0.0/24", "via", "192.168.81.2"]);
    sh(&["ipset", "create", "warren-all-hosts", "hash:ip"]);
    sh(&["iptables-nft", "-N", "WARREN-INPUT"]);
    sh(&[
        "iptables-nft",
        "-A",
        "INPUT",
        "-m",
        "comment",
        "--comment",
        "warren:0123456789abcdef",
        "-j",
        "WARREN-INPUT",
    ]);
    sh(&["iptables-nft", "-A", "INPUT", "-s", "198.51.100.1", "-j", "ACCEPT"]);
    let conf = tempfile::tempdir().unwrap();
    std::fs::write(conf.path().join("10-warren.conflist"), b"{}").unwrap();
    std::fs::write(conf.path().join("99-other.conflist"), b"{}").unwrap();

    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            BIN,
            "uninstall",
            "--iptables-backend",
            "nft",
            "--cni-conf-dir",
        ])
        .arg(conf.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let routes = sh(&["ip", "route"]);
    assert!(
        !routes.contains("10.233.1.0") && routes.contains("10.99.0.0/24"),
        "{routes}"
    );
    let filter = sh(&["iptables-nft-save", "-t", "filter"]);
    assert!(
        !filter.contains("WARREN") && filter.contains("198.51.100.1"),
        "{filter}"
    );
    assert_eq!(sh(&["ipset", "list", "-n"]).trim(), "");
    assert!(!conf.path().join("10-warren.conflist").exists());
    assert!(conf.path().join("99-other.conflist").exists());
}
