//! Privileged tests (root): the writer against the real iptables/ipset binaries and route
//! programming over netlink, each in fresh network namespaces with unique names, removed on drop.

// Tests may unwrap: a panic shows the error.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use conf::daemon::IpipMode;
use conf::dataplane::{DesiredDataplane, Hook, IpSetSpec, Table};
use node_daemon::netlink::{sync_routes, KernelRoute, LinkOps, Netlink, RouteOps};
use node_daemon::overlay_fw::{overlay_dataplane, OverlayFw};
use node_daemon::routes::{desired_routes, NodeInfo};
use node_daemon::writer::{Backend, ExecRunner, Writer};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh_ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A named netns deleted (with everything in it) when dropped, even if the test panics.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        assert!(nix::unistd::Uid::effective().is_root(), "privileged tests need root");
        let name = format!(
            "wn-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        sh(&full)
    }

    fn exec_ok(&self, args: &[&str]) -> bool {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        sh_ok(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn desired() -> DesiredDataplane {
    let mut d = overlay_dataplane(&OverlayFw {
        node_ips: ["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()].into(),
        pool: "10.233.64.0/18".parse().unwrap(),
        blocks: ["10.233.90.0/24".parse().unwrap()].into(),
        local_block: Some("10.233.90.0/24".parse().unwrap()),
        nat_outgoing: true,
        mode: IpipMode::Always,
    });
    d.ipsets.insert(
        "warren-extra".into(),
        std::sync::Arc::new(IpSetSpec {
            kind: "hash:net".into(),
            members: [
                "10.1.0.0/16".to_string(),
                "10.1.2.0/24 nomatch".to_string(),
                "10.9.9.9/32".to_string(),
            ]
            .into(),
        }),
    );
    // A list:set (what a policy rule with many peers matches) holds sets named before and
    // after it: the writer creates it after its members and destroys it before them.
    d.ipsets.insert(
        "warren-extra-z".into(),
        std::sync::Arc::new(IpSetSpec {
            kind: "hash:ip".into(),
            members: ["10.8.8.8".to_string()].into(),
        }),
    );
    d.ipsets.insert(
        "warren-extra-l".into(),
        std::sync::Arc::new(IpSetSpec {
            kind: "list:set".into(),
            members: ["warren-extra".to_string(), "warren-extra-z".to_string()].into(),
        }),
    );
    d.chains.insert(
        (Table::Filter, "WARREN-FORWARD".into()),
        std::sync::Arc::new(vec![
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
            "-m set --match-set warren-extra dst -p tcp --dport 80 -m comment --comment \"allow web\" -j ACCEPT".into(),
            "-m set --match-set warren-extra-l dst -p tcp --dport 443 -j ACCEPT".into(),
        ]),
    );
    d.hooks.insert(Hook {
        table: Table::Filter,
        chain: "FORWARD".into(),
        rule: "-j WARREN-FORWARD".into(),
        first: true,
    });
    d
}

fn writer_scenario(backend: Backend) {
    let ns = Netns::new("wr");
    let save = backend.save;
    let legacy = backend.save.contains("legacy");
    let ipt = if legacy { "iptables-legacy" } else { "iptables-nft" };
    // Someone else's state that must survive everything.
    ns.exec(&[ipt, "-N", "FOREIGN"]);
    ns.exec(&[ipt, "-A", "FOREIGN", "-j", "RETURN"]);
    ns.exec(&[ipt, "-A", "INPUT", "-s", "198.51.100.7", "-j", "FOREIGN"]);
    ns.exec(&["ipset", "create", "foreign-set", "hash:ip"]);
    let mut w = Writer::new(ExecRunner::in_netns(&ns.0), backend.clone());

    let r = w.apply(&desired(), false).unwrap();
    assert_eq!(r.changed.len(), 11, "{:?}", r.changed);
    let list = ns.exec(&["ipset", "list", "warren-extra-l"]);
    assert!(
        list.contains("warren-extra\n") && list.contains("warren-extra-z"),
        "{list}"
    );
    let filter = ns.exec(&[save, "-t", "filter"]);
    assert!(filter.contains(":WARREN-INPUT - "), "{filter}");
    let input: Vec<&str> = filter.lines().filter(|l| l.starts_with("-A INPUT")).collect();
    assert!(
        input[0].contains("warren:") && input[0].ends_with("-j WARREN-INPUT"),
        "{input:?}"
    );
    assert_eq!(input.len(), 2);
    let nat = ns.exec(&[save, "-t", "nat"]);
    assert!(nat.contains("MASQUERADE"), "{nat}");

    let r = w.apply(&desired(), true).unwrap();
    assert!(r.changed.is_empty(), "second apply must be a no-op: {:?}", r.changed);
    let ours: Vec<String> = ns
        .exec(&[save, "-t", "filter"])
        .lines()
        .filter(|l| l.starts_with("-A WARREN-"))
        .map(str::to_string)
        .collect();
    if legacy {
        // Marked by content: no hash comments, a chain's first own comment kept.
        assert!(ours.iter().all(|l| !l.contains("warren:")), "{ours:#?}");
        assert!(ours.iter().any(|l| l.contains("allow web")), "{ours:#?}");
    } else {
        assert!(ours.iter().all(|l| l.contains("warren:")), "{ours:#?}");
    }

    // A restarted writer (nothing learned yet) settles at once and then writes nothing.
    let mut restarted = Writer::new(ExecRunner::in_netns(&ns.0), backend.clone());
    restarted.apply(&desired(), false).unwrap();
    let r = restarted.apply(&desired(), true).unwrap();
    assert!(r.changed.is_empty(), "restarted: {:?}", r.changed);

    // Drift inside a chain: a rule replaced in place is put back.
    ns.exec(&[
        ipt,
        "-R",
        "WARREN-FORWARD",
        "2",
        "-p",
        "tcp",
        "--dport",
        "81",
        "-j",
        "ACCEPT",
    ]);
    let r = w.apply(&desired(), true).unwrap();
    assert_eq!(r.drifted, vec!["chain filter/WARREN-FORWARD".to_string()]);
    let r = w.apply(&desired(), true).unwrap();
    assert!(r.changed.is_empty(), "repaired: {:?}", r.changed);
    assert!(!ns.exec(&[save, "-t", "filter"]).contains("dport 81"));

    // Drift: a flushed warren chain comes back, and is reported as drift.
    ns.exec(&[ipt, "-F", "WARREN-INPUT"]);
    let r = w.apply(&desired(), true).unwrap();
    assert_eq!(r.drifted, vec!["chain filter/WARREN-INPUT".to_string()]);
    assert_eq!(ns.exec(&[save, "-t", "filter"]).matches("-A WARREN-INPUT").count(), 2);

    // Deleted (unreferenced) sets are recreated with their members, the list after its members.
    ns.exec(&[ipt, "-F", "WARREN-FORWARD"]);
    assert!(ns.exec_ok(&["ipset", "destroy", "warren-extra-l"]));
    assert!(ns.exec_ok(&["ipset", "destroy", "warren-extra"]));
    let r = w.apply(&desired(), true).unwrap();
    for set in ["warren-extra", "warren-extra-l"] {
        assert!(r.drifted.contains(&format!("ipset {set} created")), "{:?}", r.drifted);
    }
    let members = ns.exec(&["ipset", "list", "warren-extra"]);
    assert!(
        members.contains("10.1.2.0/24 nomatch") && members.contains("10.9.9.9"),
        "{members}"
    );

    // A removed set member comes back.
    ns.exec(&["ipset", "del", "warren-all-hosts", "192.0.2.2"]);
    let r = w.apply(&desired(), true).unwrap();
    assert_eq!(
        r.drifted,
        vec!["ipset warren-all-hosts members (1 changed)".to_string()]
    );

    // Someone inserts a rule above our hook: the hook moves back to the top, their rule stays.
    ns.exec(&[ipt, "-I", "INPUT", "1", "-s", "203.0.113.9", "-j", "DROP"]);
    let r = w.apply(&desired(), true).unwrap();
    assert_eq!(r.drifted, vec!["hook filter/INPUT -j WARREN-INPUT".to_string()]);
    let filter = ns.exec(&[save, "-t", "filter"]);
    let input: Vec<&str> = filter.lines().filter(|l| l.starts_with("-A INPUT")).collect();
    assert!(
        input[0].ends_with("-j WARREN-INPUT") && input[1].contains("203.0.113.9"),
        "{input:?}"
    );
    assert_eq!(input.len(), 3);
    ns.exec(&[ipt, "-D", "INPUT", "-s", "203.0.113.9", "-j", "DROP"]);

    // A stale warren chain is kept before the first full sync and swept after it.
    ns.exec(&[ipt, "-N", "WARREN-STALE"]);
    ns.exec(&[ipt, "-A", "WARREN-STALE", "-j", "ACCEPT"]);
    ns.exec(&["ipset", "create", "warren-stale", "hash:ip"]);
    assert!(w.apply(&desired(), false).unwrap().changed.is_empty());
    assert!(ns.exec(&[save, "-t", "filter"]).contains("WARREN-STALE"));
    let r = w.apply(&desired(), true).unwrap();
    assert_eq!(r.changed.len(), 2, "{:?}", r.changed);
    assert!(!ns.exec(&[save, "-t", "filter"]).contains("WARREN-STALE"));
    assert!(!ns.exec_ok(&["ipset", "list", "warren-stale"]));

    // Uninstall removes everything warren made and nothing else.
    w.remove_all().unwrap();
    let filter = ns.exec(&[save, "-t", "filter"]);
    let nat = ns.exec(&[save, "-t", "nat"]);
    assert!(!filter.contains("WARREN") && !filter.contains("warren:"), "{filter}");
    assert!(!nat.contains("WARREN"), "{nat}");
    assert!(filter.contains("-A FOREIGN -j RETURN") && filter.contains("-A INPUT -s 198.51.100.7/32 -j FOREIGN"));
    let sets = ns.exec(&["ipset", "list", "-n"]);
    assert_eq!(sets.trim(), "foreign-set");
}

#[test]
fn should_write_repair_and_sweep_with_iptables_nft() {
    writer_scenario(Backend::nft());
}

/// Between read-backs, iptables-nft changes go make-before-break: the batch only adds (the new
/// body on top, a RETURN, the old body dead below), a set the old body uses stays until `tidy`
/// (the kernel would refuse to destroy it while referenced), and `tidy` leaves exactly the
/// desired state.
#[test]
fn should_write_make_before_break_and_tidy_with_iptables_nft() {
    let ns = Netns::new("mbb");
    let mut w = Writer::new(ExecRunner::in_netns(&ns.0), Backend::nft());
    w.apply(&desired(), true).unwrap();
    w.read_back = false;
    let forward = |ns: &Netns| -> Vec<String> {
        ns.exec(&["iptables-nft-save", "-t", "filter"])
            .lines()
            .filter(|l| l.starts_with("-A WARREN-FORWARD "))
            .map(str::to_string)
            .collect()
    };
    let old = forward(&ns);
    assert_eq!(old.len(), 3);

    let mut next = desired();
    next.ipsets.remove("warren-extra");
    next.ipsets.remove("warren-extra-l");
    next.chains.insert(
        (Table::Filter, "WARREN-FORWARD".into()),
        std::sync::Arc::new(vec![
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
            "-p tcp --dport 443 -j ACCEPT".into(),
            "-j DROP".into(),
        ]),
    );
    let r = w.apply(&next, true).unwrap();
    assert_eq!(r.changed, vec!["chain filter/WARREN-FORWARD".to_string()]);
    let now = forward(&ns);
    assert_eq!(now.len(), 3 + 1 + 3, "{now:#?}");
    assert!(
        now[1].ends_with("--dport 443 -j ACCEPT") && now[2].ends_with("-j DROP"),
        "{now:#?}"
    );
    assert!(now[3].ends_with("-j RETURN"), "{now:#?}");
    assert_eq!(now[4..], old[..], "the old body, unreachable, until tidy");
    assert!(ns.exec_ok(&["ipset", "list", "-n", "warren-extra"]), "still referenced");
    assert_eq!(w.untidy(), 3);

    let r = w.tidy().unwrap();
    // The list and its member were both stale: the list went first, or the member could not.
    for set in ["warren-extra", "warren-extra-l"] {
        assert!(r.changed.contains(&format!("ipset {set} removed")), "{r:?}");
    }
    let now = forward(&ns);
    assert_eq!(now.len(), 3, "{now:#?}");
    assert!(!ns.exec_ok(&["ipset", "list", "-n", "warren-extra"]));
    w.read_back = true;
    let r = w.apply(&next, true).unwrap();
    assert!(r.changed.is_empty() && r.drifted.is_empty(), "{r:?}");
}

#[test]
fn should_write_repair_and_sweep_with_iptables_legacy() {
    writer_scenario(Backend::legacy());
}

/// A policy edit that replaces one rule of a chain, between resyncs, right after the chain was
/// written (no read-back since): it reaches the kernel, and the next resync reads it as written.
/// With iptables-legacy the first read of a written chain is how the save prints it; a change
/// of the rules in between must not pass for that.
fn edit_before_read_back(backend: Backend) {
    let ns = Netns::new("ed");
    let save = backend.save;
    let mut w = Writer::new(ExecRunner::in_netns(&ns.0), backend);
    w.apply(&desired(), true).unwrap();
    w.read_back = false;
    let mut edited = desired();
    edited.chains.insert(
        (Table::Filter, "WARREN-FORWARD".into()),
        std::sync::Arc::new(vec![
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
            "-m set --match-set warren-extra dst -p tcp --dport 8080 -m comment --comment \"allow web\" -j ACCEPT"
                .into(),
            "-m set --match-set warren-extra-l dst -p tcp --dport 443 -j ACCEPT".into(),
        ]),
    );
    let r = w.apply(&edited, true).unwrap();
    assert_eq!(r.changed, vec!["chain filter/WARREN-FORWARD".to_string()]);
    let filter = ns.exec(&[save, "-t", "filter"]);
    assert!(filter.contains("--dport 8080"), "{filter}");
    w.tidy().unwrap();
    w.read_back = true;
    let r = w.apply(&edited, true).unwrap();
    assert!(r.changed.is_empty() && r.drifted.is_empty(), "{r:?}");
    assert!(ns.exec(&[save, "-t", "filter"]).contains("--dport 8080"));
}

#[test]
fn should_write_an_edit_made_before_any_read_back_with_iptables_legacy() {
    edit_before_read_back(Backend::legacy());
}

#[test]
fn should_write_an_edit_made_before_any_read_back_with_iptables_nft() {
    edit_before_read_back(Backend::nft());
}

#[test]
fn should_detect_the_backend_holding_kube_proxy_chains() {
    let ns = Netns::new("be");
    let runner = ExecRunner::in_netns(&ns.0);
    ns.exec(&["iptables-legacy", "-t", "nat", "-N", "KUBE-SERVICES"]);
    let b = node_daemon::writer::backend::detect(&runner, conf::daemon::IptablesBackend::Auto);
    assert_eq!(b, Backend::legacy());
    let ns2 = Netns::new("be");
    ns2.exec(&["iptables-nft", "-t", "nat", "-N", "KUBE-SERVICES"]);
    let b = node_daemon::writer::backend::detect(&ExecRunner::in_netns(&ns2.0), conf::daemon::IptablesBackend::Auto);
    assert_eq!(b, Backend::nft());
}

/// Two "nodes" (netns) on one veth; node A programs a direct route (mode Never) to B's block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_program_direct_routes_keep_foreign_ones_and_survive_restart() {
    let a = Netns::new("ra");
    let b = Netns::new("rb");
    let veth_a = format!("wa{}", COUNTER.fetch_add(1, Ordering::SeqCst));
    a.exec(&[
        "ip", "link", "add", &veth_a, "type", "veth", "peer", "name", "wb0", "netns", &b.0,
    ]);
    a.exec(&["ip", "addr", "add", "192.168.77.1/24", "dev", &veth_a]);
    a.exec(&["ip", "link", "set", &veth_a, "up"]);
    b.exec(&["ip", "addr", "add", "192.168.77.2/24", "dev", "wb0"]);
    b.exec(&["ip", "link", "set", "wb0", "up"]);
    // A "pod" address inside B's block (peer c will go away).
    b.exec(&["ip", "addr", "add", "10.244.2.5/32", "dev", "lo"]);
    a.exec(&["ip", "route", "add", "10.99.0.0/24", "via", "192.168.77.2"]);

    let nodes = vec![
        NodeInfo {
            name: "a".into(),
            internal_ip: Some("192.168.77.1".parse().unwrap()),
            block: Some("10.244.1.0/24".parse().unwrap()),
        },
        NodeInfo {
            name: "b".into(),
            internal_ip: Some("192.168.77.2".parse().unwrap()),
            block: Some("10.244.2.0/24".parse().unwrap()),
        },
        NodeInfo {
            name: "c".into(),
            internal_ip: Some("192.168.77.3".parse().unwrap()),
            block: Some("10.244.3.0/24".parse().unwrap()),
        },
    ];
    let to_kernel = |nodes: &[NodeInfo]| -> Vec<KernelRoute> {
        desired_routes(
            "a",
            Some("10.244.1.0/24".parse().unwrap()),
            None,
            nodes,
            IpipMode::Never,
        )
        .values()
        .filter_map(|r| KernelRoute::from_desired(r, None))
        .collect()
    };

    let net = Netlink::connect_in_netns(&a.0).unwrap();
    let u = net.underlay("192.168.77.1".parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(u.subnet, "192.168.77.0/24".parse().unwrap());
    assert_eq!(u.mtu, 1500);
    let rep = sync_routes(&net, &to_kernel(&nodes)).await.unwrap();
    assert_eq!(rep.replaced.len(), 2);
    let routes = a.exec(&["ip", "route", "show", "proto", "88"]);
    assert!(routes.contains("10.244.2.0/24 via 192.168.77.2 dev"), "{routes}");
    assert!(
        a.exec_ok(&["busybox", "ping", "-c", "1", "-W", "2", "10.244.2.5"]),
        "pod in B's block unreachable"
    );

    // Peer c leaves the cluster.
    let rep = sync_routes(&net, &to_kernel(&nodes[..2])).await.unwrap();
    assert_eq!(rep.deleted, vec!["10.244.3.0/24".parse().unwrap()]);
    assert!(!a.exec(&["ip", "route"]).contains("10.244.3.0"));

    // A restarted daemon (new socket, no memory) finds everything in place and writes nothing.
    drop(net);
    let net = Netlink::connect_in_netns(&a.0).unwrap();
    let rep = sync_routes(&net, &to_kernel(&nodes[..2])).await.unwrap();
    assert!(rep.replaced.is_empty() && rep.deleted.is_empty(), "{rep:?}");
    assert_eq!(net.list_owned().await.unwrap().len(), 1);

    // Uninstall: all of ours go, the foreign route stays.
    sync_routes(&net, &[]).await.unwrap();
    let all = a.exec(&["ip", "route"]);
    assert!(!all.contains("10.244.2.0"), "{all}");
    assert!(
        all.contains("10.99.0.0/24 via 192.168.77.2"),
        "foreign route must stay: {all}"
    );
}

/// The tunl0 path itself; it needs a kernel with ipip, so [`should_bring_up_tunl0_here_or_in_the_lab_vm`]
/// runs it here or, where this kernel lacks ipip, in the lab's micro-VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ipip: run through should_bring_up_tunl0_here_or_in_the_lab_vm"]
async fn should_bring_up_tunl0_and_route_peers_through_it() {
    tunl0_scenario().await;
}

const TUNL0_TEST: &str = "should_bring_up_tunl0_and_route_peers_through_it";

/// Runs the tunl0 test on this kernel when it has ipip; otherwise boots the lab's micro-VM (Debian's
/// kernel, this machine's root shared read-only) and runs this very test binary there with only
/// that test selected. A VM that cannot boot is a failure, not a skip.
#[test]
fn should_bring_up_tunl0_here_or_in_the_lab_vm() {
    if lab_vm::kernel_has_ipip() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(tunl0_scenario());
        return;
    }
    let cache =
        std::env::var_os("WARREN_LAB_CACHE").map_or_else(|| "/var/cache/warren-lab".into(), std::path::PathBuf::from);
    let assets = lab_vm::ensure_assets(&cache).expect("the micro-VM's kernel assets");
    let shared = tempfile::Builder::new().prefix("warren-tunl0-vm-").tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut cfg = lab_vm::VmConfig::new(
        assets,
        shared.path(),
        vec![
            exe.to_string_lossy().into_owned(),
            "--ignored".into(),
            "--exact".into(),
            TUNL0_TEST.into(),
            "--test-threads=1".into(),
            "--nocapture".into(),
        ],
    );
    // Only what the test touches: booting with fewer modules is seconds faster under emulation.
    cfg.modules = vec!["ipip".into()];
    cfg.env = vec![("RUST_BACKTRACE".into(), "1".into())];
    let out = lab_vm::run_once(&cfg).expect("running the test binary in the micro-VM");
    eprintln!("--- in the VM ---\n{}{}", out.stdout, out.stderr);
    assert_eq!(out.status, 0, "the tunl0 test failed in the VM");
    // A filter that matched nothing also exits 0: insist that the test really ran and passed.
    assert!(
        out.stdout.contains(&format!("test {TUNL0_TEST} ... ok")) && out.stdout.contains("1 passed"),
        "the tunl0 test did not run in the VM"
    );
}

async fn tunl0_scenario() {
    let a = Netns::new("ip");
    let net = Netlink::connect_in_netns(&a.0).unwrap();
    let idx = net
        .ensure_tunnel("tunl0", "10.233.90.0".parse().unwrap(), 1480)
        .await
        .unwrap();
    let again = net
        .ensure_tunnel("tunl0", "10.233.90.0".parse().unwrap(), 1480)
        .await
        .unwrap();
    assert_eq!(idx, again);
    let link = a.exec(&["ip", "-d", "addr", "show", "tunl0"]);
    assert!(
        link.contains("mtu 1480") && link.contains("ipip") && link.contains("10.233.90.0/32"),
        "{link}"
    );
    assert!(link.contains("UP"), "{link}");
    let want = vec![KernelRoute {
        dst: "10.233.96.0/24".parse().unwrap(),
        gateway: Some("192.168.78.2".parse().unwrap()),
        oif: Some(idx),
        onlink: true,
    }];
    sync_routes(&net, &want).await.unwrap();
    let routes = a.exec(&["ip", "route", "show", "proto", "88"]);
    assert!(
        routes.contains("10.233.96.0/24 via 192.168.78.2 dev tunl0") && routes.contains("onlink"),
        "{routes}"
    );
    assert!(sync_routes(&net, &want).await.unwrap().replaced.is_empty());
    net.clear_tunnel("tunl0").await.unwrap();
    assert!(!a.exec(&["ip", "addr", "show", "tunl0"]).contains("10.233.90.0"));
}

/// `ipset save` without what differs between two equal sets (the hash seed), sorted.
fn ipset_state(ns: &Netns) -> Vec<String> {
    let mut lines: Vec<String> = ns
        .exec(&["ipset", "save"])
        .lines()
        .map(|l| {
            let mut words: Vec<&str> = l.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| *w == "initval") {
                words.drain(i..(i + 2).min(words.len()));
            }
            words.join(" ")
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn should_restore_ipsets_over_netlink_exactly_as_the_ipset_binary_does() {
    let create = |name: &str, kind: &str| format!("create {name} {kind} family inet hashsize 1024 maxelem 1048576\n");
    let mut first = String::new();
    first += &create("warren-n", "hash:net");
    first += "add warren-n 10.0.0.0/8\nadd warren-n 10.1.0.0/16 nomatch\nadd warren-n 10.2.3.4\n";
    first += &create("warren-i", "hash:ip");
    first += "add warren-i 10.9.9.9\nadd warren-i 10.9.9.8\n";
    first += &create("warren-p", "hash:ip,port");
    first += "add warren-p 10.0.0.1,tcp:8080\nadd warren-p 10.0.0.2,udp:53\nadd warren-p 10.0.0.3,sctp:9\n";
    first += &create("warren-w", "hash:net,iface");
    first += "add warren-w 10.0.0.9,calia1b2c3d4e5f\nadd warren-w 10.0.1.0/24,eth0\n";
    first += &create("warren-t", "hash:ip");
    first += "add warren-t 1.1.1.1\nswap warren-t warren-i\ndestroy warren-t\n";
    first += &create("warren-r", "hash:ip");
    first += "add warren-r 3.3.3.3\nrename warren-r warren-r2\n";
    // A list:set of sets, as a rule with several peers matches.
    first += "create warren-l list:set size 8\nadd warren-l warren-n\nadd warren-l warren-i\n";
    // More members than one message carries.
    for k in 0..600 {
        first += &format!("add warren-i 10.50.{}.{}\n", k / 200, k % 200);
    }
    // Again, over what exists: existing sets and members are no error (-exist), nor are
    // deletions of what is not there; a set not created in the text is looked up.
    let mut second = create("warren-n", "hash:net");
    second += "add warren-n 10.0.0.0/8\ndel warren-n 10.2.3.4\ndel warren-i 9.9.9.9\ndel warren-i 1.1.1.1\n";
    second += "add warren-w 10.0.0.10,calib0000000000\nflush warren-p\n";
    // The list:set is looked up in the kernel: a member again, one gone, one never there.
    second += "add warren-l warren-i\ndel warren-l warren-n\ndel warren-l warren-p\n";

    let by_netlink = Netns::new("nl");
    let by_binary = Netns::new("bin");
    let nl = ExecRunner::in_netns(&by_netlink.0);
    let bin = ExecRunner::in_netns(&by_binary.0);
    use node_daemon::writer::{ipset_nl, CommandRunner};
    for text in [&first, &second] {
        // Understood, so netlink does it rather than the binary it would fall back to.
        let mut sock = ipset_nl::IpsetSocket::open(Some(&by_netlink.0)).unwrap();
        ipset_nl::parse(text, &mut |name| sock.kind_of(name)).unwrap();
        nl.run("ipset", &["restore", "-exist"], Some(text)).unwrap();
        bin.run("sh", &["-c", "ipset restore -exist"], Some(text)).unwrap();
        assert_eq!(ipset_state(&by_netlink), ipset_state(&by_binary));
    }
    let state = ipset_state(&by_netlink);
    assert!(
        state.contains(&"add warren-w 10.0.0.9,calia1b2c3d4e5f".to_string()),
        "{state:#?}"
    );
    assert!(
        state.contains(&"create warren-l list:set size 8".to_string())
            && state.contains(&"add warren-l warren-i".to_string())
            && !state.contains(&"add warren-l warren-n".to_string()),
        "{state:#?}"
    );
    assert_eq!(state.iter().filter(|l| l.starts_with("add warren-i ")).count(), 600);

    // What the kernel refuses is reported with its line, and nothing after it is done.
    for (text, why) in [
        (
            create("warren-n", "hash:ip") + "add warren-i 10.7.7.7\n",
            "Error in line 1",
        ),
        ("add warren-gone 10.0.0.1\n".to_string(), "does not exist"),
    ] {
        let e = nl.run("ipset", &["restore", "-exist"], Some(&text)).unwrap_err();
        assert!(e.to_string().contains(why), "{text:?}: {e}");
    }
    assert!(!ipset_state(&by_netlink).contains(&"add warren-i 10.7.7.7".to_string()));

    // A list:set's refusals read as the binary's: a member that is no set, and destroying a
    // member the list still holds; destroying the list first frees its members.
    for (text, ok) in [
        ("add warren-l warren-gone\n", false),
        ("destroy warren-i\n", false),
        ("destroy warren-l\ndestroy warren-i\n", true),
    ] {
        let by_nl = nl.run("ipset", &["restore", "-exist"], Some(text));
        let by_bin = bin.run("sh", &["-c", "ipset restore -exist"], Some(text));
        assert_eq!(by_nl.is_ok(), ok, "{text:?}: {by_nl:?}");
        assert_eq!(by_bin.is_ok(), ok, "{text:?}: {by_bin:?}");
        if let (Err(nl_err), Err(bin_err)) = (&by_nl, &by_bin) {
            assert!(nl_err.to_string().contains("(netlink)"), "{text:?}: {nl_err}");
            let bin_err = bin_err.to_string();
            let why = bin_err.split("Error in line ").nth(1).unwrap();
            assert!(nl_err.to_string().contains(why), "{text:?}: {nl_err} vs {bin_err}");
        }
        assert_eq!(ipset_state(&by_netlink), ipset_state(&by_binary), "after {text:?}");
    }
    let state = ipset_state(&by_netlink);
    assert!(
        !state.iter().any(|l| l.contains("warren-l") || l.contains("warren-i ")),
        "{state:#?}"
    );
}

/// A departed pod's address: every conntrack entry that names it (its own connections, those to
/// it, and one DNAT'd to it through a Service address) is deleted; a neighbour's stay.
#[test]
fn should_forget_the_flows_of_a_departed_pods_address() {
    let ns = Netns::new("ct");
    let insert = |args: &[&str]| {
        let mut all = vec!["conntrack", "-I", "-p", "tcp", "--state", "ESTABLISHED", "-t", "600"];
        all.extend_from_slice(args);
        assert!(ns.exec_ok(&all), "conntrack -I {args:?}");
    };
    let gone = "10.233.90.2";
    let stays = "10.233.90.3";
    // From the departed pod; to it; to a Service address DNAT'd to it; the neighbour's own.
    insert(&["-s", gone, "-d", "10.233.96.2", "--sport", "40000", "--dport", "80"]);
    insert(&["-s", "10.233.96.2", "-d", gone, "--sport", "40001", "--dport", "8080"]);
    insert(&[
        "-s",
        "10.233.96.9",
        "-d",
        "10.96.0.10",
        "-r",
        gone,
        "-q",
        "10.233.96.9",
        "--sport",
        "40002",
        "--dport",
        "80",
        "--reply-port-src",
        "8080",
        "--reply-port-dst",
        "40002",
    ]);
    insert(&["-s", stays, "-d", "10.233.96.2", "--sport", "40003", "--dport", "80"]);
    let listed = || ns.exec(&["conntrack", "-L"]);
    assert_eq!(listed().lines().count(), 4, "{}", listed());

    let runner = ExecRunner::in_netns(ns.0.clone());
    let mut janitor = node_daemon::conntrack::ConntrackJanitor::default();
    let owner = |pod: &str| ("shop".to_string(), pod.to_string());
    let both = std::collections::BTreeMap::from([
        (gone.parse().unwrap(), owner("web")),
        (stays.parse().unwrap(), owner("api")),
    ]);
    assert!(janitor.released(&both).is_empty());
    let released = janitor.released(&std::collections::BTreeMap::from([(
        stays.parse().unwrap(),
        owner("api"),
    )]));
    assert_eq!(released, vec![gone.parse::<std::net::Ipv4Addr>().unwrap()]);
    for ip in released {
        node_daemon::conntrack::flush(&runner, ip).expect("flush");
    }
    let left = listed();
    assert_eq!(left.lines().count(), 1, "{left}");
    assert!(
        left.contains(&format!("src={stays} ")) && !left.contains(gone),
        "{left}"
    );
    // Nothing left to delete is not an error.
    node_daemon::conntrack::flush(&runner, gone.parse().unwrap()).expect("second flush");
}
