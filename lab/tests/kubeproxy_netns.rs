//! Privileged (root): kube-proxy's rules applied in a real "node" network namespace, with real
//! traffic from an "outside" namespace to a NodePort and from the node to a ClusterIP, served by
//! a "pod" namespace. Checks what the seed's puzzle is made of: with
//! `externalTrafficPolicy: Cluster` the pod sees the node's address, with `Local` the client's.
//! Runs with both iptables backends. Every namespace is uniquely named and deleted on drop.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use lab::kubeproxy::apply::{apply, cleanup, detect_host_options, Iptables};
use lab::kubeproxy::model::{EndpointInfo, Protocol, ProxyInput, ServiceInfo, TrafficPolicy};
use lab::kubeproxy::render::svc_chain;

const NODE_IP: &str = "10.102.0.1";
const OUTSIDE_IP: &str = "10.2.3.4";
const CLUSTER_CIDR: &str = "10.240.0.0/16";
const CLUSTER_IP: &str = "10.96.7.7";
const SVC_PORT: u16 = 80;
const TARGET_PORT: u16 = 9097;
const NODE_PORT: u16 = 31602;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread inside netns `name` (sockets and child processes made there stay there).
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// A TCP server in the pod that answers each connection with the peer address it sees.
struct EchoServer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(netns: &str, port: u16) -> EchoServer {
        let listener = in_netns(netns, move || TcpListener::bind(("0.0.0.0", port)).unwrap());
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = conn.write_all(peer.ip().to_string().as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        EchoServer {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// node, pod and outside namespaces wired like a Calico node: the pod has a /32 and a default
/// route via 169.254.1.1 answered by proxy ARP; the outside host is on a point-to-point veth.
struct Lab {
    node: String,
    pod: String,
    outside: String,
    pod_ip: String,
    /// The node's link towards the pod (stands for tunl0 when given an address).
    pod_link: String,
}

impl Lab {
    fn new() -> Lab {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let lab = Lab {
            node: format!("kp-{id}-node"),
            pod: format!("kp-{id}-pod"),
            outside: format!("kp-{id}-out"),
            pod_ip: format!("10.240.{}.{}", n % 250, 10 + n % 200),
            pod_link: format!("kpp{id}"),
        };
        // From here on Drop removes whatever was made, even if a step below fails.
        for ns in [&lab.node, &lab.pod, &lab.outside] {
            sh(&["ip", "netns", "add", ns]);
        }
        let (vp, vo) = (format!("kpp{id}"), format!("kpo{id}"));
        let node_exec = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &lab.node];
            v.extend_from_slice(args);
            sh(&v);
        };
        let pod_exec = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &lab.pod];
            v.extend_from_slice(args);
            sh(&v);
        };
        let out_exec = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &lab.outside];
            v.extend_from_slice(args);
            sh(&v);
        };
        node_exec(&["ip", "link", "set", "lo", "up"]);
        pod_exec(&["ip", "link", "set", "lo", "up"]);
        out_exec(&["ip", "link", "set", "lo", "up"]);

        // node <-> pod
        node_exec(&[
            "ip", "link", "add", &vp, "type", "veth", "peer", "name", "eth0", "netns", &lab.pod,
        ]);
        node_exec(&["ip", "link", "set", &vp, "up"]);
        node_exec(&["sysctl", "-qw", &format!("net.ipv4.conf.{vp}.proxy_arp=1")]);
        node_exec(&["ip", "route", "add", &format!("{}/32", lab.pod_ip), "dev", &vp]);
        pod_exec(&["ip", "addr", "add", &format!("{}/32", lab.pod_ip), "dev", "eth0"]);
        pod_exec(&["ip", "link", "set", "eth0", "up"]);
        pod_exec(&["ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
        pod_exec(&["ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);

        // node <-> outside
        node_exec(&[
            "ip",
            "link",
            "add",
            &vo,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &lab.outside,
        ]);
        node_exec(&["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", &vo]);
        node_exec(&["ip", "link", "set", &vo, "up"]);
        node_exec(&["ip", "route", "add", &format!("{OUTSIDE_IP}/32"), "dev", &vo]);
        // Like a real node, a default route (else connecting to a ClusterIP fails before NAT).
        node_exec(&["ip", "route", "add", "default", "via", OUTSIDE_IP, "dev", &vo, "onlink"]);
        out_exec(&["ip", "addr", "add", &format!("{OUTSIDE_IP}/32"), "dev", "eth0"]);
        out_exec(&["ip", "link", "set", "eth0", "up"]);
        out_exec(&["ip", "route", "add", &format!("{NODE_IP}/32"), "dev", "eth0"]);
        lab
    }

    fn service(&self, policy: TrafficPolicy, endpoint_node: &str, with_endpoint: bool) -> ServiceInfo {
        let endpoints = if with_endpoint {
            vec![EndpointInfo {
                ip: self.pod_ip.parse().unwrap(),
                port: TARGET_PORT,
                node_name: Some(endpoint_node.into()),
                ready: true,
                serving: true,
                terminating: false,
            }]
        } else {
            vec![]
        };
        ServiceInfo {
            namespace: "tekton-pipelines".into(),
            name: "tekton-dashboard".into(),
            port_name: String::new(),
            protocol: Protocol::Tcp,
            cluster_ip: CLUSTER_IP.parse().unwrap(),
            port: SVC_PORT,
            node_port: NODE_PORT,
            external_policy: policy,
            internal_policy: TrafficPolicy::Cluster,
            endpoints,
        }
    }

    fn apply(&self, ipt: &Iptables, services: Vec<ServiceInfo>) {
        let ipt = ipt.clone();
        let res = in_netns(&self.node, move || {
            let input = ProxyInput {
                node_name: "node1".into(),
                node_ips: vec![NODE_IP.parse().unwrap()],
                cluster_cidr: Some(CLUSTER_CIDR.parse().unwrap()),
                services,
                masquerade_all: false,
                options: detect_host_options(&ipt),
            };
            apply(&ipt, &input).map_err(|e| e.to_string())
        });
        res.unwrap();
    }

    fn node_exec(&self, args: &[&str]) {
        let mut v = vec!["ip", "netns", "exec", &self.node];
        v.extend_from_slice(args);
        sh(&v);
    }

    fn iptables_save(&self, ipt: &Iptables) -> String {
        let bin = format!("{}-save", ipt.bin);
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node, &bin])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.node, &self.pod, &self.outside] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[derive(Debug, PartialEq)]
enum Probe {
    /// Connected; the server saw this peer address.
    Saw(IpAddr),
    Refused,
    TimedOut,
}

fn probe_from(netns: &str, to: &str, port: u16, timeout: Duration) -> Probe {
    let addr = SocketAddr::new(to.parse().unwrap(), port);
    in_netns(netns, move || match TcpStream::connect_timeout(&addr, timeout) {
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = String::new();
            s.read_to_string(&mut buf).unwrap();
            Probe::Saw(buf.trim().parse().unwrap())
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Probe::TimedOut,
        Err(e) => panic!("connect {addr}: {e}"),
    })
}

fn backends() -> Vec<Iptables> {
    let mut v = vec![
        Iptables {
            bin: "iptables-nft".into(),
        },
        Iptables {
            bin: "iptables-legacy".into(),
        },
    ];
    v.retain(|i| {
        Command::new(&i.bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(!v.is_empty(), "no iptables binary found");
    v
}

const T: Duration = Duration::from_secs(3);

#[test]
fn should_snat_nodeport_traffic_to_the_node_address_with_cluster_policy() {
    for ipt in backends() {
        let lab = Lab::new();
        let _server = EchoServer::start(&lab.pod, TARGET_PORT);
        lab.apply(&ipt, vec![lab.service(TrafficPolicy::Cluster, "node1", true)]);
        let outside = lab.outside.clone();
        assert_eq!(
            probe_from(&outside, NODE_IP, NODE_PORT, T),
            Probe::Saw(NODE_IP.parse().unwrap()),
            "{}: pod must see the node's address",
            ipt.bin
        );
        // ClusterIP from the node itself works too.
        assert_eq!(
            probe_from(&lab.node, CLUSTER_IP, SVC_PORT, T),
            Probe::Saw(NODE_IP.parse().unwrap()),
            "{}",
            ipt.bin
        );
        // The pod reaching itself through the ClusterIP is hairpin-masqueraded (KUBE-SEP -s rule).
        let pod = lab.pod.clone();
        assert!(
            matches!(probe_from(&pod, CLUSTER_IP, SVC_PORT, T), Probe::Saw(_)),
            "{}: hairpin",
            ipt.bin
        );
    }
}

#[test]
fn should_keep_the_client_address_with_local_policy() {
    for ipt in backends() {
        let lab = Lab::new();
        let _server = EchoServer::start(&lab.pod, TARGET_PORT);
        lab.apply(&ipt, vec![lab.service(TrafficPolicy::Local, "node1", true)]);
        assert_eq!(
            probe_from(&lab.outside, NODE_IP, NODE_PORT, T),
            Probe::Saw(OUTSIDE_IP.parse().unwrap()),
            "{}: pod must see the load balancer's address",
            ipt.bin
        );
        // The node's own traffic to the NodePort is masqueraded (src-type LOCAL) and still works.
        assert_eq!(
            probe_from(&lab.node, NODE_IP, NODE_PORT, T),
            Probe::Saw(NODE_IP.parse().unwrap()),
            "{}",
            ipt.bin
        );
    }
}

#[test]
fn should_drop_local_policy_nodeport_without_local_endpoint_and_reject_without_any() {
    for ipt in backends() {
        let lab = Lab::new();
        let _server = EchoServer::start(&lab.pod, TARGET_PORT);
        // The only endpoint is on another node: this node does not answer (DROP), as in the seed.
        lab.apply(&ipt, vec![lab.service(TrafficPolicy::Local, "node2", true)]);
        assert_eq!(
            probe_from(&lab.outside, NODE_IP, NODE_PORT, Duration::from_millis(700)),
            Probe::TimedOut,
            "{}",
            ipt.bin
        );
        // No endpoints at all: REJECT, so the client is refused at once.
        lab.apply(&ipt, vec![lab.service(TrafficPolicy::Cluster, "node1", false)]);
        assert_eq!(
            probe_from(&lab.outside, NODE_IP, NODE_PORT, T),
            Probe::Refused,
            "{}",
            ipt.bin
        );
        assert_eq!(
            probe_from(&lab.node, CLUSTER_IP, SVC_PORT, T),
            Probe::Refused,
            "{}",
            ipt.bin
        );
    }
}

#[test]
fn should_be_idempotent_and_delete_stale_chains() {
    for ipt in backends() {
        let lab = Lab::new();
        let svc = lab.service(TrafficPolicy::Cluster, "node1", true);
        let chain = svc_chain(&svc);
        lab.apply(&ipt, vec![svc.clone()]);
        let first = lab.iptables_save(&ipt);
        lab.apply(&ipt, vec![svc]);
        let second = lab.iptables_save(&ipt);
        let jumps = |s: &str| s.lines().filter(|l| l.contains("-j KUBE-SERVICES")).count();
        // filter FORWARD + OUTPUT, nat OUTPUT + PREROUTING: once each, also after a second sync.
        assert_eq!(jumps(&first), 4, "{}:\n{first}", ipt.bin);
        assert_eq!(jumps(&second), 4, "{}:\n{second}", ipt.bin);
        assert!(second.contains(&format!(":{chain} ")), "{}", ipt.bin);
        assert!(
            second.contains("-j MASQUERADE --random-fully"),
            "{}:\n{second}",
            ipt.bin
        );
        let (route_localnet, ip_forward) = in_netns(&lab.node, || {
            let rl = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/route_localnet").unwrap();
            let fw = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
            (rl, fw)
        });
        assert_eq!(ip_forward.trim(), "1");
        assert_eq!(route_localnet.trim(), "1");

        // Service gone: its chains are deleted, not left behind.
        lab.apply(&ipt, vec![]);
        let third = lab.iptables_save(&ipt);
        assert!(
            !third.contains("KUBE-SVC-") && !third.contains("KUBE-SEP-") && !third.contains("KUBE-EXT-"),
            "{}:\n{third}",
            ipt.bin
        );
        assert_eq!(jumps(&third), 4, "{}", ipt.bin);
    }
}

#[test]
fn should_snat_to_the_egress_interface_address_like_tunl0() {
    // In the seed, node1 forwards NodePort traffic over tunl0, whose address (10.233.90.0) is what
    // the pod sees. Here the node's link towards the pod carries such an address.
    let tunl_addr = "10.240.255.0";
    for ipt in backends() {
        let lab = Lab::new();
        lab.node_exec(&["ip", "addr", "add", &format!("{tunl_addr}/32"), "dev", &lab.pod_link]);
        let _server = EchoServer::start(&lab.pod, TARGET_PORT);
        lab.apply(&ipt, vec![lab.service(TrafficPolicy::Cluster, "node1", true)]);
        assert_eq!(
            probe_from(&lab.outside, NODE_IP, NODE_PORT, T),
            Probe::Saw(tunl_addr.parse().unwrap()),
            "{}",
            ipt.bin
        );
        lab.apply(&ipt, vec![lab.service(TrafficPolicy::Local, "node1", true)]);
        assert_eq!(
            probe_from(&lab.outside, NODE_IP, NODE_PORT, T),
            Probe::Saw(OUTSIDE_IP.parse().unwrap()),
            "{}",
            ipt.bin
        );
    }
}

#[test]
fn should_remove_every_kube_proxy_rule_on_cleanup() {
    for ipt in backends() {
        let lab = Lab::new();
        let _server = EchoServer::start(&lab.pod, TARGET_PORT);
        lab.apply(&ipt, vec![lab.service(TrafficPolicy::Local, "node1", true)]);
        assert!(
            matches!(probe_from(&lab.outside, NODE_IP, NODE_PORT, T), Probe::Saw(_)),
            "{}",
            ipt.bin
        );
        let bin = ipt.clone();
        in_netns(&lab.node, move || cleanup(&bin).map_err(|e| e.to_string())).unwrap();
        let save = lab.iptables_save(&ipt);
        let left: Vec<&str> = save
            .lines()
            .filter(|l| l.contains("KUBE-") && !l.contains("KUBE-FIREWALL"))
            .collect();
        assert!(left.is_empty(), "{}: left behind: {left:?}", ipt.bin);
        // Without the DNAT nothing listens on the NodePort any more.
        assert_eq!(
            probe_from(&lab.outside, NODE_IP, NODE_PORT, T),
            Probe::Refused,
            "{}",
            ipt.bin
        );
    }
}
