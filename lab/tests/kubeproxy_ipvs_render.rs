//! IPVS mode rendered from the service model (pure): virtual servers and real servers, ipset
//! members, iptables text, ipvsadm / ipset / ip diffs, and the parsers of what the tools print.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use lab::kubeproxy::ipvs::{
    conn_reuse_mode_for, desired_state, dummy_address_batch, ipset_restore, ipvsadm_changes, jump_rules,
    node_ips_from_local_routes, parse_device_addresses, parse_ipset_save, parse_ipvsadm_save, parse_kernel_version,
    render_cleanup, render_iptables, sysctls, IpvsOptions, IpvsState, SET_CLUSTER_IP, SET_IPVS_IPS, SET_LOOP_BACK,
    SET_NODE_PORT_LOCAL_SCTP, SET_NODE_PORT_LOCAL_TCP, SET_NODE_PORT_SCTP, SET_NODE_PORT_TCP, SET_NODE_PORT_UDP,
};
use lab::kubeproxy::model::{EndpointInfo, HostOptions, Protocol, ProxyInput, ServiceInfo, TrafficPolicy};

const NODE1: &str = "10.102.123.117";
const TUNL1: &str = "10.233.90.0";
const POD: &str = "10.233.96.32";

fn ep(ip: &str, node: &str) -> EndpointInfo {
    EndpointInfo {
        ip: ip.parse().unwrap(),
        port: 9097,
        node_name: Some(node.into()),
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn dashboard(policy: TrafficPolicy, endpoints: Vec<EndpointInfo>) -> ServiceInfo {
    ServiceInfo {
        namespace: "tekton-pipelines".into(),
        name: "tekton-dashboard".into(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
        cluster_ip: "10.233.5.155".parse().unwrap(),
        port: 9097,
        node_port: 31602,
        external_policy: policy,
        internal_policy: TrafficPolicy::Cluster,
        endpoints,
    }
}

fn input(node: &str, services: Vec<ServiceInfo>) -> ProxyInput {
    ProxyInput {
        node_name: node.into(),
        node_ips: vec![NODE1.parse().unwrap()],
        cluster_cidr: Some("10.233.64.0/18".parse().unwrap()),
        services,
        masquerade_all: false,
        options: HostOptions::default(),
    }
}

fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn state_for(node: &str, services: Vec<ServiceInfo>) -> IpvsState {
    desired_state(
        &input(node, services),
        &ips(&[NODE1, TUNL1, "127.0.0.1"]),
        &IpvsOptions::default(),
    )
}

#[test]
fn should_make_a_virtual_server_for_the_cluster_ip_and_the_node_port_on_every_node_address() {
    // The seed's `ipvsadm -L` on node1: 31602 on each node address and on localhost, rr, Masq.
    let st = state_for("node1", vec![dashboard(TrafficPolicy::Cluster, vec![ep(POD, "node2")])]);
    let keys: Vec<SocketAddr> = st.virtual_servers.keys().map(|(_, a)| *a).collect();
    assert_eq!(
        keys,
        vec![
            sa("10.102.123.117:31602"),
            sa("10.233.5.155:9097"),
            sa("10.233.90.0:31602"),
            sa("127.0.0.1:31602")
        ]
    );
    for vs in st.virtual_servers.values() {
        assert_eq!(vs.protocol, Protocol::Tcp);
        assert_eq!(vs.scheduler, "rr");
        assert_eq!(vs.real_servers, BTreeMap::from([(sa("10.233.96.32:9097"), 1)]));
    }
    assert_eq!(st.addresses, ips(&["10.233.5.155"]).into_iter().collect());
}

#[test]
fn should_give_local_policy_node_ports_only_local_real_servers() {
    let svc = dashboard(TrafficPolicy::Local, vec![ep(POD, "node2"), ep("10.233.90.5", "node1")]);
    let st = state_for("node1", vec![svc]);
    let cip = &st.virtual_servers[&(Protocol::Tcp, sa("10.233.5.155:9097"))];
    assert_eq!(cip.real_servers.len(), 2, "the ClusterIP keeps every endpoint");
    let np = &st.virtual_servers[&(Protocol::Tcp, sa("10.102.123.117:31602"))];
    assert_eq!(np.real_servers, BTreeMap::from([(sa("10.233.90.5:9097"), 1)]));
    // node3 has no local endpoint: the NodePort virtual servers exist but have no real server.
    let st3 = state_for("node3", vec![dashboard(TrafficPolicy::Local, vec![ep(POD, "node2")])]);
    let np3 = &st3.virtual_servers[&(Protocol::Tcp, sa("10.102.123.117:31602"))];
    assert!(np3.real_servers.is_empty());
}

#[test]
fn should_fill_kube_proxys_ipsets() {
    let mut udp = dashboard(TrafficPolicy::Cluster, vec![ep(POD, "node1")]);
    udp.protocol = Protocol::Udp;
    udp.node_port = 31603;
    let mut sctp = dashboard(TrafficPolicy::Local, vec![ep(POD, "node1")]);
    sctp.protocol = Protocol::Sctp;
    sctp.node_port = 31604;
    let st = state_for(
        "node1",
        vec![
            dashboard(TrafficPolicy::Local, vec![ep(POD, "node1"), ep("10.233.92.4", "node3")]),
            udp,
            sctp,
        ],
    );
    let set = |n: &str| st.ipsets[n].iter().cloned().collect::<Vec<_>>();
    assert_eq!(
        set(SET_CLUSTER_IP),
        vec![
            "10.233.5.155,sctp:9097",
            "10.233.5.155,tcp:9097",
            "10.233.5.155,udp:9097"
        ]
    );
    assert_eq!(set(SET_IPVS_IPS), vec!["10.233.5.155"]);
    assert_eq!(set(SET_NODE_PORT_TCP), vec!["31602"]);
    assert_eq!(set(SET_NODE_PORT_LOCAL_TCP), vec!["31602"]);
    assert_eq!(set(SET_NODE_PORT_UDP), vec!["31603"]);
    assert_eq!(
        set(SET_NODE_PORT_SCTP),
        vec![
            "10.102.123.117,sctp:31604",
            "10.233.90.0,sctp:31604",
            "127.0.0.1,sctp:31604"
        ]
    );
    assert_eq!(set(SET_NODE_PORT_LOCAL_SCTP).len(), 3);
    // Hairpin entries only for this node's endpoints.
    assert_eq!(
        set(SET_LOOP_BACK),
        vec![
            "10.233.96.32,sctp:9097,10.233.96.32",
            "10.233.96.32,tcp:9097,10.233.96.32",
            "10.233.96.32,udp:9097,10.233.96.32"
        ]
    );
}

#[test]
fn should_render_kube_proxys_ipvs_iptables_rules() {
    let st = state_for("node1", vec![dashboard(TrafficPolicy::Local, vec![ep(POD, "node1")])]);
    let text = render_iptables(&input("node1", vec![]), &st);
    let nat = text.split("*nat\n").nth(1).unwrap();
    let filter = text.split("*nat\n").next().unwrap();
    let pos = |s: &str| nat.find(s).unwrap_or_else(|| panic!("missing {s:?} in\n{nat}"));
    // Local NodePorts RETURN before the masquerade of all NodePorts.
    assert!(
        pos("-A KUBE-NODE-PORT -p tcp -m comment --comment \"Kubernetes nodeport TCP port with externalTrafficPolicy=local\" -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j RETURN")
            < pos("-A KUBE-NODE-PORT -p tcp -m comment --comment \"Kubernetes nodeport TCP port for masquerade purpose\" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ")
    );
    pos("-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.233.64.0/18 -j KUBE-MARK-MASQ");
    assert!(
        pos("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
            < pos("-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT")
    );
    // Hairpin masquerade comes before the mark check, so it does not depend on the mark.
    assert!(
        pos("-A KUBE-POSTROUTING -m comment --comment \"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose\" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE")
            < pos("-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN")
    );
    pos("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully");
    pos("-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000");
    assert!(!nat.contains("KUBE-LOAD-BALANCER dst,dst"), "empty sets get no rule");
    assert!(filter.contains("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x00004000/0x00004000 -j ACCEPT"));
    assert!(filter
        .contains("-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT"));
    for c in [
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-NODE-PORT - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ] {
        assert!(nat.contains(c), "{c}");
    }
    assert!(text.ends_with("COMMIT\n") && text.starts_with("*filter\n"));
}

#[test]
fn should_masquerade_cluster_ip_traffic_by_policy_without_cluster_cidr() {
    let st = state_for("node1", vec![dashboard(TrafficPolicy::Cluster, vec![])]);
    let mut inp = input("node1", vec![]);
    inp.cluster_cidr = None;
    assert!(render_iptables(&inp, &st).contains("KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ"));
    inp.masquerade_all = true;
    assert!(render_iptables(&inp, &st).contains("KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"));
    // Without local endpoints there is no hairpin set rule.
    assert!(!render_iptables(&inp, &st).contains("KUBE-LOOP-BACK"));
}

#[test]
fn should_jump_from_the_builtin_chains_like_kube_proxy() {
    let j: Vec<String> = jump_rules()
        .iter()
        .map(|j| format!("{} {} {}", j.table, j.chain, j.args.join(" ")))
        .collect();
    assert!(j.contains(&"nat PREROUTING -m comment --comment kubernetes service portals -j KUBE-SERVICES".to_string()));
    assert!(j.contains(&"nat POSTROUTING -m comment --comment kubernetes postrouting rules -j KUBE-POSTROUTING".into()));
    assert!(j.contains(&"filter INPUT -m comment --comment kubernetes ipvs access filter -j KUBE-IPVS-FILTER".into()));
    assert_eq!(j.len(), 8);
}

#[test]
fn should_parse_ipvsadm_save_and_diff_to_converge() {
    let saved = "-A -t 10.233.5.155:9097 -s rr\n\
                 -a -t 10.233.5.155:9097 -r 10.233.96.32:9097 -m -w 1\n\
                 -a -t 10.233.5.155:9097 -r 10.233.96.33:9097 -m -w 1\n\
                 -A -t 10.96.0.10:53 -s rr\n\
                 -A -u 10.96.0.10:53 -s wrr\n\
                 -a -u 10.96.0.10:53 -r 10.233.96.40:53 -m -w 3\n\
                 -A -f 5 -s rr\n";
    let current = parse_ipvsadm_save(saved);
    assert_eq!(current.len(), 3, "fwmark services are not ours");
    let udp = &current[&(Protocol::Udp, sa("10.96.0.10:53"))];
    assert_eq!(udp.scheduler, "wrr");
    assert_eq!(udp.real_servers, BTreeMap::from([(sa("10.233.96.40:53"), 3)]));

    let st = state_for("node1", vec![dashboard(TrafficPolicy::Cluster, vec![ep(POD, "node2")])]);
    let changes = ipvsadm_changes(&current, &st.virtual_servers);
    let lines: BTreeSet<&str> = changes.lines().collect();
    for want in [
        "-D -t 10.96.0.10:53",
        "-D -u 10.96.0.10:53",
        "-d -t 10.233.5.155:9097 -r 10.233.96.33:9097",
        "-A -t 10.102.123.117:31602 -s rr",
        "-a -t 10.102.123.117:31602 -r 10.233.96.32:9097 -m -w 1",
        "-A -t 127.0.0.1:31602 -s rr",
    ] {
        assert!(lines.contains(want), "{want:?} missing in\n{changes}");
    }
    assert!(
        !changes.contains("-A -t 10.233.5.155:9097") && !changes.contains("-a -t 10.233.5.155:9097"),
        "unchanged entries are left alone:\n{changes}"
    );
    // Applied, the table equals the desired one and the next diff is empty.
    assert_eq!(ipvsadm_changes(&st.virtual_servers, &st.virtual_servers), "");
    // A real server whose weight changed is edited, not re-added.
    let mut reweighted = st.virtual_servers.clone();
    for vs in reweighted.values_mut() {
        for w in vs.real_servers.values_mut() {
            *w = 0;
        }
    }
    let edit = ipvsadm_changes(&reweighted, &st.virtual_servers);
    assert!(edit.lines().all(|l| l.starts_with("-e ")), "{edit}");
}

#[test]
fn should_diff_ipsets_and_create_every_set() {
    let saved =
        "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1\n\
                 add KUBE-CLUSTER-IP 10.96.0.1,tcp:443\n\
                 add KUBE-CLUSTER-IP 10.233.5.155,tcp:9097\n\
                 create KUBE-NODE-PORT-TCP bitmap:port range 0-65535\n\
                 add KUBE-NODE-PORT-TCP 30000\n\
                 create cali40all-ipam-pools hash:net family inet\n\
                 add cali40all-ipam-pools 10.233.64.0/18\n";
    let current = parse_ipset_save(saved);
    assert!(!current.contains_key("cali40all-ipam-pools"), "other sets are not ours");
    let st = state_for("node1", vec![dashboard(TrafficPolicy::Cluster, vec![ep(POD, "node2")])]);
    let script = ipset_restore(&current, &st.ipsets);
    let lines: Vec<&str> = script.lines().collect();
    assert_eq!(lines.iter().filter(|l| l.starts_with("create ")).count(), 17);
    assert!(lines.contains(&"create KUBE-NODE-PORT-TCP bitmap:port range 0-65535"));
    assert!(lines.contains(&"create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536"));
    assert!(lines.contains(&"del KUBE-CLUSTER-IP 10.96.0.1,tcp:443"));
    assert!(lines.contains(&"del KUBE-NODE-PORT-TCP 30000"));
    assert!(lines.contains(&"add KUBE-NODE-PORT-TCP 31602"));
    assert!(
        !lines.iter().any(|l| l.contains("10.233.5.155,tcp:9097")),
        "kept members are not touched"
    );
}

#[test]
fn should_find_node_ips_from_local_routes_without_kube_ipvs0() {
    let routes = "local 10.102.123.117 dev eth0 proto kernel scope host src 10.102.123.117 \n\
                  local 10.233.5.155 dev kube-ipvs0 proto kernel scope host src 10.233.5.155 \n\
                  local 10.233.90.0 dev tunl0 proto kernel scope host src 10.233.90.0 \n\
                  local 127.0.0.0/8 dev lo proto kernel scope host src 127.0.0.1 \n\
                  local 127.0.0.1 dev lo proto kernel scope host src 127.0.0.1 \n";
    assert_eq!(
        node_ips_from_local_routes(routes),
        ips(&["10.102.123.117", "10.233.90.0", "127.0.0.1"])
    );
}

#[test]
fn should_bind_new_addresses_before_and_unbind_stale_ones_after() {
    let cur: BTreeSet<IpAddr> = ips(&["10.96.0.1", "10.96.0.2"]).into_iter().collect();
    let want: BTreeSet<IpAddr> = ips(&["10.96.0.2", "10.96.0.3"]).into_iter().collect();
    assert_eq!(
        dummy_address_batch(&cur, &want),
        (
            "address add 10.96.0.3/32 dev kube-ipvs0\n".to_string(),
            "address del 10.96.0.1/32 dev kube-ipvs0\n".to_string()
        )
    );
    assert_eq!(dummy_address_batch(&want, &want), (String::new(), String::new()));
    let shown =
        "7: kube-ipvs0    inet 10.96.0.1/32 scope global kube-ipvs0\\       valid_lft forever preferred_lft forever\n\
                 7: kube-ipvs0    inet 10.96.0.2/32 scope global kube-ipvs0\\       valid_lft forever\n";
    assert_eq!(parse_device_addresses(shown), cur);
}

#[test]
fn should_set_ipvs_sysctls_as_kube_proxy_does_for_the_kernel() {
    assert_eq!(parse_kernel_version("6.1.0-56-amd64"), Some((6, 1)));
    assert_eq!(parse_kernel_version("3.10.0-1127.el7.x86_64"), Some((3, 10)));
    assert_eq!(conn_reuse_mode_for((4, 19)), Some("0"));
    assert_eq!(conn_reuse_mode_for((6, 1)), None, "fixed in 5.9: left as is");
    assert_eq!(conn_reuse_mode_for((3, 10)), None, "not there before 4.1");
    let plain = sysctls(Some((6, 1)), &IpvsOptions::default());
    assert!(plain.contains(&("net/ipv4/vs/conntrack", "1")));
    assert!(plain.contains(&("net/ipv4/vs/expire_nodest_conn", "1")));
    assert!(!plain.iter().any(|(k, _)| k.contains("arp_")));
    let strict = sysctls(
        Some((4, 19)),
        &IpvsOptions {
            strict_arp: true,
            ..IpvsOptions::default()
        },
    );
    assert!(strict.contains(&("net/ipv4/conf/all/arp_ignore", "1")));
    assert!(strict.contains(&("net/ipv4/conf/all/arp_announce", "2")));
    assert!(strict.contains(&("net/ipv4/vs/conn_reuse_mode", "0")));
}

#[test]
fn should_clean_up_only_chains_that_exist() {
    let nat = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\nCOMMIT\n";
    let filter = "*filter\n:KUBE-IPVS-FILTER - [0:0]\nCOMMIT\n";
    assert_eq!(
        render_cleanup(nat, filter),
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n-X KUBE-SERVICES\n-X KUBE-MARK-MASQ\nCOMMIT\n\
         *filter\n:KUBE-IPVS-FILTER - [0:0]\n-X KUBE-IPVS-FILTER\nCOMMIT\n"
    );
}
