#!/usr/bin/env python3
"""Reads the tekton scenario's data (tests/scenarios/tekton/, the files `warren-lab scenario
tekton` runs) for vagrant/scenario.sh, and adapts the two lab-specific parts to a real cluster:

- workloads: the lab serves every pod with its own probe server; on a real cluster the dashboard
  runs agnhost's netexec on 9097 (GET /hostname answers the pod's name, so a "connected" cell
  must reach the dashboard itself) and clients run busybox (wget as the probe);
- node blocks: the seed's tunl0 addresses (10.233.90.0, .96.0, .92.0) in experiment 2's policy
  are replaced by the real nodes' tunl0 addresses (first address of each node's block).

Subcommands print plain text for the shell: tab-separated fields, one record per line.
"""

import argparse
import ipaddress
import json
import sys

try:
    import yaml
except ImportError:
    sys.exit("scenario_data.py needs PyYAML: apt-get install python3-yaml (or pip install pyyaml)")

SERVER_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.53"
CLIENT_IMAGE = "docker.io/library/busybox:1.36"
# The seed's node blocks (BRIEF.md); experiment 2 whitelists their first addresses.
SEED_BLOCKS = {"node1": "10.233.90.0/24", "node2": "10.233.96.0/24", "node3": "10.233.92.0/24"}
LAB_ANNOTATION_PREFIX = "lab.warren.dev/"


def load(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def scenario(d):
    return load(f"{d}/scenario.yaml")


def cmd_cluster(args):
    """The cluster YAML with real workloads, as a multi-document stream."""
    sc = scenario(args.dir)
    target = sc["target"]
    docs = load_all(f"{args.dir}/{sc['cluster']}")
    for doc in docs:
        if doc.get("kind") != "Pod":
            continue
        meta = doc["metadata"]
        ann = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith(LAB_ANNOTATION_PREFIX)}
        if ann:
            meta["annotations"] = ann
        else:
            meta.pop("annotations", None)
        spec = doc["spec"]
        spec["terminationGracePeriodSeconds"] = 1
        old = spec["containers"][0]
        if meta["namespace"] == target["namespace"] and meta["name"] == target["pod"]:
            port = old["ports"][0]["containerPort"]
            spec["containers"] = [
                {
                    "name": old["name"],
                    "image": SERVER_IMAGE,
                    "args": ["netexec", f"--http-port={port}"],
                    "ports": old.get("ports", []),
                }
            ]
        else:
            spec["containers"] = [{"name": old["name"], "image": CLIENT_IMAGE, "command": ["sleep", "1000000"]}]
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)


def cmd_info(args):
    sc = scenario(args.dir)
    t = sc["target"]
    print("\t".join([t["namespace"], t["service"], t["pod"], sc["load_balancer"]["ip"]]))


def cmd_sources(args):
    """id, kind (host|pod), namespace-or-host, pod."""
    for s in scenario(args.dir)["sources"]:
        frm = s["from"]
        if frm.startswith("host:"):
            print("\t".join([s["id"], "host", frm[len("host:"):], "-"]))
        else:
            ns, pod = frm.split("/", 1)
            print("\t".join([s["id"], "pod", ns, pod]))


def cmd_paths(args):
    """id, address, port, pods_only (0|1)."""
    for p in scenario(args.dir)["paths"]:
        print("\t".join([p["id"], p["to"], str(p["port"]), "1" if p.get("pods_only") else "0"]))


def cmd_experiments(args):
    """id, externalTrafficPolicy, nodeport_policy, policy files (comma-separated), title."""
    for e in scenario(args.dir)["experiments"]:
        print("\t".join([e["id"], e["external_traffic_policy"], e["nodeport_policy"], ",".join(e["policies"]), e["title"]]))


def cmd_converge(args):
    """source id, path id: the cells to poll after experiment EXP's change."""
    for e in scenario(args.dir)["experiments"]:
        if e["id"] == args.experiment:
            for c in e.get("converge_on", []):
                print("\t".join([c["source"], c["path"]]))
            return
    sys.exit(f"no experiment {args.experiment}")


def cmd_expected(args):
    """source id, path id, expected (connected|blocked|no-answer) for MODE and EXP."""
    table = load(f"{args.dir}/expected.yaml")
    if args.mode not in table:
        sys.exit(f"expected.yaml has no proxy mode {args.mode!r} (it has {sorted(table)})")
    for cell in table[args.mode].get(args.experiment, []):
        print("\t".join([cell["from"], cell["via"], cell["expect"]]))


def cmd_policy(args):
    """A policy file, with the seed's tunl0 addresses mapped to the real nodes' (JSON map
    node -> block on stdin)."""
    real = json.load(sys.stdin)
    mapping = {}
    for node, seed_block in SEED_BLOCKS.items():
        if node in real:
            seed_first = str(ipaddress.ip_network(seed_block).network_address)
            real_first = str(ipaddress.ip_network(real[node], strict=False).network_address)
            mapping[f"{seed_first}/32"] = f"{real_first}/32"
    docs = load_all(args.file)
    for doc in docs:
        for rule in (doc.get("spec") or {}).get("ingress") or []:
            for peer in rule.get("from") or []:
                block = peer.get("ipBlock")
                if block and block.get("cidr") in mapping:
                    block["cidr"] = mapping[block["cidr"]]
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="tests/scenarios/tekton")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cluster").set_defaults(f=cmd_cluster)
    sub.add_parser("info").set_defaults(f=cmd_info)
    sub.add_parser("sources").set_defaults(f=cmd_sources)
    sub.add_parser("paths").set_defaults(f=cmd_paths)
    sub.add_parser("experiments").set_defaults(f=cmd_experiments)
    c = sub.add_parser("converge")
    c.add_argument("experiment")
    c.set_defaults(f=cmd_converge)
    e = sub.add_parser("expected")
    e.add_argument("mode")
    e.add_argument("experiment")
    e.set_defaults(f=cmd_expected)
    p = sub.add_parser("policy")
    p.add_argument("file")
    p.set_defaults(f=cmd_policy)
    args = ap.parse_args()
    args.f(args)


if __name__ == "__main__":
    main()
