//! Privileged (root): kube-proxy's IPVS mode programmed into a real "node" network namespace and
//! probed with real traffic, inside the lab's micro-VM (this host's kernel has no ip_vs).
//!
//! The host-side test boots the VM once and runs this same binary in it with `--ignored guest_`;
//! the `guest_*` tests (ignored on the host) build node, pod, client-pod and outside namespaces
//! like a Calico node and check what the seed's puzzle is made of: NodePort with
//! `externalTrafficPolicy: Cluster` → the pod sees the node's address; `Local` → the client's;
//! ClusterIP from the node and from a pod; a deleted service leaves no virtual server and no
//! kube-ipvs0 address. Every namespace is uniquely named and deleted on drop.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use lab::kubeproxy::apply::{detect_host_options, Iptables};
use lab::kubeproxy::ipvs::apply::{cleanup, dummy_addresses, ipvsadm_save, sync};
use lab::kubeproxy::ipvs::{parse_ipvsadm_save, IpvsOptions, DUMMY_DEVICE};
use lab::kubeproxy::model::{EndpointInfo, Protocol, ProxyInput, ServiceInfo, TrafficPolicy};

const NODE_IP: &str = "10.102.0.1";
const OUTSIDE_IP: &str = "10.2.3.4";
const CLUSTER_CIDR: &str = "10.240.0.0/16";
const CLUSTER_IP: &str = "10.96.7.7";
const OTHER_CLUSTER_IP: &str = "10.96.7.8";
const SVC_PORT: u16 = 80;
const TARGET_PORT: u16 = 9097;
const NODE_PORT: u16 = 31602;
const T: Duration = Duration::from_secs(3);

// ---- host side ------------------------------------------------------------------------------

#[test]
fn should_pass_the_ipvs_dataplane_tests_inside_the_micro_vm() {
    if Path::new("/proc/net/ip_vs").exists() {
        // A kernel with IPVS loaded: the guest tests can run right here (`--ignored guest_`).
        eprintln!("host kernel has ip_vs; run the guest_ tests directly");
    }
    let cache = std::env::var_os("WARREN_LAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or("/var/cache/warren-lab".into());
    let assets = lab_vm::ensure_assets(&cache).unwrap();
    let shared = tempfile::Builder::new().prefix("warren-ipvs-test-").tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let command = vec![
        me.display().to_string(),
        "--ignored".into(),
        "--test-threads=1".into(),
        "--nocapture".into(),
        "guest_".into(),
    ];
    let cfg = lab_vm::VmConfig::new(assets, shared.path(), command);
    let out = lab_vm::run_once(&cfg).unwrap();
    eprintln!("--- guest stdout\n{}--- guest stderr\n{}", out.stdout, out.stderr);
    assert_eq!(out.status, 0, "guest tests failed");
    assert!(
        out.stdout.contains("test result: ok. 5 passed"),
        "all five guest tests ran"
    );
}

// ---- guest side -----------------------------------------------------------------------------

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
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

/// A TCP server in the pod answering each connection with the peer address it sees.
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

/// node, server pod, client pod and outside namespaces wired like a Calico node: pods have a
/// /32 and a default route via 169.254.1.1 answered by proxy ARP; the outside host is on a
/// point-to-point veth.
struct Lab {
    node: String,
    pod: String,
    client: String,
    outside: String,
    pod_ip: String,
    client_ip: String,
    /// The node's link towards the server pod (stands for tunl0 when given an address).
    pod_link: String,
}

impl Lab {
    fn new() -> Lab {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let lab = Lab {
            node: format!("kv-{id}-node"),
            pod: format!("kv-{id}-pod"),
            client: format!("kv-{id}-cli"),
            outside: format!("kv-{id}-out"),
            pod_ip: format!("10.240.{}.10", n % 250),
            client_ip: format!("10.240.{}.11", n % 250),
            pod_link: format!("kvp{id}"),
        };
        // From here on Drop removes whatever was made, even if a step below fails.
        for ns in [&lab.node, &lab.pod, &lab.client, &lab.outside] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        for (ns, ip, link) in [
            (&lab.pod, &lab.pod_ip, format!("kvp{id}")),
            (&lab.client, &lab.client_ip, format!("kvc{id}")),
        ] {
            sh(&[
                "ip", "-n", &lab.node, "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            sh(&["ip", "-n", &lab.node, "link", "set", &link, "up"]);
            sh(&[
                "ip",
                "netns",
                "exec",
                &lab.node,
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{link}.proxy_arp=1"),
            ]);
            sh(&["ip", "-n", &lab.node, "route", "add", &format!("{ip}/32"), "dev", &link]);
            sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
            sh(&[
                "ip",
                "-n",
                ns,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ]);
            sh(&[
                "ip",
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ]);
        }
        let vo = format!("kvo{id}");
        sh(&[
            "ip",
            "-n",
            &lab.node,
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
        sh(&[
            "ip",
            "-n",
            &lab.node,
            "addr",
            "add",
            &format!("{NODE_IP}/32"),
            "dev",
            &vo,
        ]);
        sh(&["ip", "-n", &lab.node, "link", "set", &vo, "up"]);
        sh(&[
            "ip",
            "-n",
            &lab.node,
            "route",
            "add",
            &format!("{OUTSIDE_IP}/32"),
            "dev",
            &vo,
        ]);
        sh(&[
            "ip", "-n", &lab.node, "route", "add", "default", "via", OUTSIDE_IP, "dev", &vo, "onlink",
        ]);
        sh(&[
            "ip",
            "-n",
            &lab.outside,
            "addr",
            "add",
            &format!("{OUTSIDE_IP}/32"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &lab.outside, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &lab.outside,
            "route",
            "add",
            &format!("{NODE_IP}/32"),
            "dev",
            "eth0",
        ]);
        lab
    }

    fn service(&self, cluster_ip: &str, policy: TrafficPolicy, endpoint_node: &str, node_port: u16) -> ServiceInfo {
        ServiceInfo {
            namespace: "tekton-pipelines".into(),
            name: format!("svc-{cluster_ip}"),
            port_name: String::new(),
            protocol: Protocol::Tcp,
            cluster_ip: cluster_ip.parse().unwrap(),
            port: SVC_PORT,
            node_port,
            external_policy: policy,
            internal_policy: TrafficPolicy::Cluster,
            endpoints: vec![EndpointInfo {
                ip: self.pod_ip.parse().unwrap(),
                port: TARGET_PORT,
                node_name: Some(endpoint_node.into()),
                ready: true,
                serving: true,
                terminating: false,
            }],
        }
    }

    fn sync(&self, services: Vec<ServiceInfo>) {
        let res = in_netns(&self.node, move || {
            let ipt = Iptables::from_env();
            let input = ProxyInput {
                node_name: "node1".into(),
                node_ips: vec![NODE_IP.parse().unwrap()],
                cluster_cidr: Some(CLUSTER_CIDR.parse().unwrap()),
                services,
                masquerade_all: false,
                options: detect_host_options(&ipt),
            };
            sync(&ipt, &input, &IpvsOptions::default())
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        res.unwrap();
    }

    fn in_node<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.node, f)
    }

    fn save(&self, what: &str) -> String {
        let args: &[&str] = match what {
            "ipvs" => &["ipvsadm", "-S", "-n"],
            "iptables" => &["iptables-save"],
            "ipset" => &["ipset", "save"],
            _ => &["ip", "-o", "addr", "show", "dev", DUMMY_DEVICE],
        };
        let mut v = vec!["ip", "netns", "exec", &self.node];
        v.extend_from_slice(args);
        sh(&v)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.node, &self.pod, &self.client, &self.outside] {
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
    /// Connected but the server sent nothing (closed).
    Empty,
}

fn probe_from(netns: &str, to: &str, port: u16, timeout: Duration) -> Probe {
    let addr = SocketAddr::new(to.parse().unwrap(), port);
    in_netns(netns, move || match TcpStream::connect_timeout(&addr, timeout) {
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            buf.trim().parse().map_or(Probe::Empty, Probe::Saw)
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Probe::TimedOut,
        Err(e) => panic!("connect {addr}: {e}"),
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
#[ignore = "needs ip_vs: runs inside the micro-VM"]
fn guest_cluster_policy_node_port_is_masqueraded_and_cluster_ip_works_from_node_and_pod() {
    let lab = Lab::new();
    let _server = EchoServer::start(&lab.pod, TARGET_PORT);
    lab.sync(vec![lab.service(
        CLUSTER_IP,
        TrafficPolicy::Cluster,
        "node1",
        NODE_PORT,
    )]);
    let ipvs = lab.save("ipvs");
    assert!(ipvs.contains(&format!("-A -t {NODE_IP}:{NODE_PORT} -s rr")), "{ipvs}");
    assert!(
        ipvs.contains(&format!(
            "-a -t {CLUSTER_IP}:{SVC_PORT} -r {}:{TARGET_PORT} -m -w 1",
            lab.pod_ip
        )),
        "{ipvs}"
    );
    assert!(lab.save("addr").contains(&format!("inet {CLUSTER_IP}/32")));
    assert_eq!(
        probe_from(&lab.outside, NODE_IP, NODE_PORT, T),
        Probe::Saw(ip(NODE_IP)),
        "NodePort with etp Cluster: the pod sees the node's address"
    );
    assert_eq!(
        probe_from(&lab.client, CLUSTER_IP, SVC_PORT, T),
        Probe::Saw(ip(&lab.client_ip)),
        "ClusterIP from a pod: no SNAT inside the cluster CIDR"
    );
    assert_eq!(
        probe_from(&lab.node, CLUSTER_IP, SVC_PORT, T),
        Probe::Saw(ip(NODE_IP)),
        "ClusterIP from the node: masqueraded (source outside the cluster CIDR)"
    );
    // The pod reaching itself through its service is hairpin-masqueraded (KUBE-LOOP-BACK).
    assert!(matches!(probe_from(&lab.pod, CLUSTER_IP, SVC_PORT, T), Probe::Saw(a) if a != ip(&lab.pod_ip)));
    // Like the seed's `ipvsadm -L` (`localhost:31602`), loopback gets a virtual server too;
    // kube-proxy does not promise that localhost NodePorts work outside iptables mode.
    let table = parse_ipvsadm_save(&lab.save("ipvs"));
    assert!(table.contains_key(&(Protocol::Tcp, SocketAddr::new(ip("127.0.0.1"), NODE_PORT))));
    // A service address answers only on service ports, not on the node's own (KUBE-IPVS-FILTER).
    let _host_server = EchoServer::start(&lab.node, 2222);
    assert_eq!(
        probe_from(&lab.client, NODE_IP, 2222, T),
        Probe::Saw(ip(&lab.client_ip))
    );
    assert_eq!(probe_from(&lab.client, CLUSTER_IP, 2222, T), Probe::Refused);
}

#[test]
#[ignore = "needs ip_vs: runs inside the micro-VM"]
fn guest_local_policy_node_port_keeps_the_client_address_and_serves_only_local_endpoints() {
    let lab = Lab::new();
    let _server = EchoServer::start(&lab.pod, TARGET_PORT);
    lab.sync(vec![lab.service(CLUSTER_IP, TrafficPolicy::Local, "node1", NODE_PORT)]);
    assert_eq!(
        probe_from(&lab.outside, NODE_IP, NODE_PORT, T),
        Probe::Saw(ip(OUTSIDE_IP)),
        "NodePort with etp Local: the pod sees the load balancer"
    );
    // The endpoint is on another node: the NodePort virtual server has no real server.
    lab.sync(vec![lab.service(CLUSTER_IP, TrafficPolicy::Local, "node2", NODE_PORT)]);
    let table = parse_ipvsadm_save(&lab.save("ipvs"));
    let np = &table[&(Protocol::Tcp, SocketAddr::new(ip(NODE_IP), NODE_PORT))];
    assert!(np.real_servers.is_empty());
    assert!(!matches!(
        probe_from(&lab.outside, NODE_IP, NODE_PORT, Duration::from_millis(800)),
        Probe::Saw(_)
    ));
    // The ClusterIP still reaches the (remote, here reachable) endpoint.
    assert_eq!(
        probe_from(&lab.client, CLUSTER_IP, SVC_PORT, T),
        Probe::Saw(ip(&lab.client_ip))
    );
}

#[test]
#[ignore = "needs ip_vs: runs inside the micro-VM"]
fn guest_resync_is_idempotent_and_a_deleted_service_leaves_nothing_behind() {
    let lab = Lab::new();
    let _server = EchoServer::start(&lab.pod, TARGET_PORT);
    let a = lab.service(CLUSTER_IP, TrafficPolicy::Cluster, "node1", NODE_PORT);
    let b = lab.service(OTHER_CLUSTER_IP, TrafficPolicy::Local, "node1", NODE_PORT + 1);
    lab.sync(vec![a.clone(), b.clone()]);
    let (ipvs1, ipt1, sets1) = (lab.save("ipvs"), lab.save("iptables"), lab.save("ipset"));
    lab.sync(vec![a.clone(), b]);
    assert_eq!(lab.save("ipvs"), ipvs1);
    assert_eq!(lab.save("ipset"), sets1);
    let ipt2 = lab.save("iptables");
    let jumps = |s: &str| {
        s.lines()
            .filter(|l| l.contains("-j KUBE-"))
            .filter(|l| {
                l.starts_with("-A PREROUTING")
                    || l.starts_with("-A OUTPUT")
                    || l.starts_with("-A POSTROUTING")
                    || l.starts_with("-A INPUT")
                    || l.starts_with("-A FORWARD")
            })
            .count()
    };
    assert_eq!(jumps(&ipt1), 8, "{ipt1}");
    assert_eq!(jumps(&ipt2), 8, "{ipt2}");
    let sysctl = |p: &'static str| lab.in_node(move || std::fs::read_to_string(p).unwrap().trim().to_string());
    assert_eq!(sysctl("/proc/sys/net/ipv4/vs/conntrack"), "1");
    assert_eq!(sysctl("/proc/sys/net/ipv4/vs/expire_nodest_conn"), "1");
    assert_eq!(sysctl("/proc/sys/net/ipv4/ip_forward"), "1");

    // Drift is repaired: a virtual server deleted by hand comes back.
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.node,
        "ipvsadm",
        "-D",
        "-t",
        &format!("{CLUSTER_IP}:{SVC_PORT}"),
    ]);
    lab.sync(vec![
        a.clone(),
        lab.service(OTHER_CLUSTER_IP, TrafficPolicy::Local, "node1", NODE_PORT + 1),
    ]);
    assert_eq!(lab.save("ipvs"), ipvs1);

    // Service b deleted: its virtual servers, address and set members go; a stays and works.
    lab.sync(vec![a]);
    let ipvs = lab.save("ipvs");
    assert!(
        !ipvs.contains(OTHER_CLUSTER_IP) && !ipvs.contains(&format!(":{}", NODE_PORT + 1)),
        "{ipvs}"
    );
    let addrs = lab.in_node(|| dummy_addresses().unwrap());
    assert_eq!(addrs.into_iter().collect::<Vec<_>>(), vec![ip(CLUSTER_IP)]);
    let sets = lab.save("ipset");
    assert!(
        !sets.contains(OTHER_CLUSTER_IP) && !sets.contains(&format!("{}", NODE_PORT + 1)),
        "{sets}"
    );
    assert_eq!(probe_from(&lab.outside, NODE_IP, NODE_PORT, T), Probe::Saw(ip(NODE_IP)));

    // Everything deleted.
    lab.sync(vec![]);
    assert!(lab.in_node(|| parse_ipvsadm_save(&ipvsadm_save().unwrap())).is_empty());
    assert!(lab.in_node(|| dummy_addresses().unwrap()).is_empty());
}

#[test]
#[ignore = "needs ip_vs: runs inside the micro-VM"]
fn guest_cleanup_removes_every_trace() {
    let lab = Lab::new();
    lab.sync(vec![lab.service(
        CLUSTER_IP,
        TrafficPolicy::Cluster,
        "node1",
        NODE_PORT,
    )]);
    lab.in_node(|| cleanup(&Iptables::from_env()).map_err(|e| e.to_string()))
        .unwrap();
    let left: Vec<String> = lab
        .save("iptables")
        .lines()
        .filter(|l| l.contains("KUBE-"))
        .map(String::from)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(lab.save("ipvs").trim().is_empty());
    assert!(!lab.save("ipset").contains("KUBE-"));
    let link = Command::new("ip")
        .args(["-n", &lab.node, "link", "show", DUMMY_DEVICE])
        .output()
        .unwrap();
    assert!(!link.status.success(), "kube-ipvs0 deleted");
}

#[test]
#[ignore = "needs ip_vs: runs inside the micro-VM"]
fn guest_cluster_policy_snats_to_the_egress_address_like_tunl0() {
    // In the seed, node1 forwards NodePort traffic over tunl0, whose address (10.233.90.0) is what
    // the pod sees. Here the node's link towards the pod carries such an address.
    let tunl_addr = "10.240.255.0";
    let lab = Lab::new();
    sh(&[
        "ip",
        "-n",
        &lab.node,
        "addr",
        "add",
        &format!("{tunl_addr}/32"),
        "dev",
        &lab.pod_link,
    ]);
    let _server = EchoServer::start(&lab.pod, TARGET_PORT);
    lab.sync(vec![lab.service(
        CLUSTER_IP,
        TrafficPolicy::Cluster,
        "node1",
        NODE_PORT,
    )]);
    assert_eq!(
        probe_from(&lab.outside, NODE_IP, NODE_PORT, T),
        Probe::Saw(ip(tunl_addr))
    );
    // kube-proxy found the new address and serves the NodePort on it as well.
    let table = parse_ipvsadm_save(&lab.save("ipvs"));
    assert!(table.contains_key(&(Protocol::Tcp, SocketAddr::new(ip(tunl_addr), NODE_PORT))));
    lab.sync(vec![lab.service(CLUSTER_IP, TrafficPolicy::Local, "node1", NODE_PORT)]);
    assert_eq!(
        probe_from(&lab.outside, NODE_IP, NODE_PORT, T),
        Probe::Saw(ip(OUTSIDE_IP))
    );
}
