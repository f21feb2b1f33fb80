//! Writes IPVS mode into the *current* network namespace (thin; the decisions are in
//! [`super`]): sysctls, the `kube-ipvs0` dummy and its addresses, kube-proxy's ipsets, its
//! iptables rules, and the IPVS table — each converged from what is there, so a sync is
//! idempotent and a resync repairs drift and removes what is stale.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::{
    desired_state, dummy_address_batch, ipset_restore, ipvsadm_changes, jump_rules, node_ips_from_local_routes,
    parse_device_addresses, parse_ipset_save, parse_ipvsadm_save, parse_kernel_version, render_cleanup,
    render_iptables, sysctls, IpvsOptions, IpvsState, DUMMY_DEVICE, IPSETS,
};
use crate::kubeproxy::apply::{run, ApplyError, Iptables};
use crate::kubeproxy::model::ProxyInput;

/// IPVS mode fails the way iptables mode does: a command or a sysctl.
pub type IpvsError = ApplyError;

pub type Result<T, E = IpvsError> = std::result::Result<T, E>;

/// The node's addresses as kube-proxy finds them (local routes, minus kube-ipvs0's).
pub fn local_node_ips() -> Result<Vec<IpAddr>> {
    let routes = run(
        "ip",
        &[
            "-4", "route", "show", "table", "local", "type", "local", "proto", "kernel",
        ],
        None,
    )?;
    Ok(node_ips_from_local_routes(&routes))
}

/// Addresses currently on kube-ipvs0 (empty when the device does not exist).
pub fn dummy_addresses() -> Result<BTreeSet<IpAddr>> {
    match run("ip", &["-o", "address", "show", "dev", DUMMY_DEVICE], None) {
        Ok(text) => Ok(parse_device_addresses(&text)),
        Err(IpvsError::Failed { .. }) => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

/// `ipvsadm -S -n`: the current IPVS table of this namespace.
pub fn ipvsadm_save() -> Result<String> {
    run("ipvsadm", &["-S", "-n"], None)
}

fn ensure_dummy() -> Result<()> {
    if run("ip", &["-o", "link", "show", "dev", DUMMY_DEVICE], None).is_ok() {
        return Ok(());
    }
    // Left down, as kube-proxy leaves it: local routes for its addresses exist regardless.
    run("ip", &["link", "add", DUMMY_DEVICE, "type", "dummy"], None).map(|_| ())
}

fn write_sysctls(opts: &IpvsOptions) -> Result<()> {
    let kernel = nix::sys::utsname::uname()
        .ok()
        .and_then(|u| parse_kernel_version(&u.release().to_string_lossy()));
    for (name, value) in sysctls(kernel, opts) {
        let path = format!("/proc/sys/{name}");
        std::fs::write(&path, value).map_err(|source| IpvsError::Sysctl { path, source })?;
    }
    if let Ok(v) = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables") {
        if v.trim() != "1" {
            tracing::info!("bridge-nf-call-iptables is not set; proxy may not work as intended");
        }
    }
    Ok(())
}

fn ip_batch(batch: &str) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    run("ip", &["-batch", "-"], Some(batch)).map(|_| ())
}

/// One full sync of IPVS mode, as kube-proxy's `syncProxyRules`; returns what it programmed.
pub fn sync(ipt: &Iptables, input: &ProxyInput, opts: &IpvsOptions) -> Result<IpvsState> {
    // Reading the table first also makes the kernel load ip_vs, whose sysctls come next.
    let current_vs = parse_ipvsadm_save(&ipvsadm_save()?);
    write_sysctls(opts)?;
    ensure_dummy()?;
    let node_ips = local_node_ips()?;
    let state = desired_state(input, &node_ips, opts);
    let (bind, unbind) = dummy_address_batch(&dummy_addresses()?, &state.addresses);
    ip_batch(&bind)?;

    let current_sets = parse_ipset_save(&run("ipset", &["save"], None)?);
    run(
        "ipset",
        &["restore", "-exist"],
        Some(&ipset_restore(&current_sets, &state.ipsets)),
    )?;

    ipt.restore(&render_iptables(input, &state))?;
    for j in jump_rules() {
        ipt.ensure_rule_prepended(j.table, j.chain, &j.args)?;
    }

    let changes = ipvsadm_changes(&current_vs, &state.virtual_servers);
    if !changes.is_empty() {
        run("ipvsadm", &["-R"], Some(&changes))?;
        // `ipvsadm -R` may skip a line it cannot apply and still succeed; say what is left.
        let left = ipvsadm_changes(&parse_ipvsadm_save(&ipvsadm_save()?), &state.virtual_servers);
        if !left.is_empty() {
            tracing::warn!(%left, "IPVS table did not converge; the next sync retries");
        }
    }
    ip_batch(&unbind)?;
    tracing::debug!(
        virtual_servers = state.virtual_servers.len(),
        addresses = state.addresses.len(),
        "kube-proxy IPVS rules applied"
    );
    Ok(state)
}

/// Removes what [`sync`] wrote, as `kube-proxy --cleanup` does for IPVS mode: jumps and
/// chains, the IPVS table, kube-ipvs0, and the sets (once no rule references them).
pub fn cleanup(ipt: &Iptables) -> Result<()> {
    for j in jump_rules() {
        ipt.delete_rule_if_present(j.table, j.chain, &j.args)?;
    }
    ipt.restore(&render_cleanup(&ipt.save("nat")?, &ipt.save("filter")?))?;
    run("ipvsadm", &["-C"], None)?;
    if run("ip", &["-o", "link", "show", "dev", DUMMY_DEVICE], None).is_ok() {
        run("ip", &["link", "del", DUMMY_DEVICE], None)?;
    }
    let existing = parse_ipset_save(&run("ipset", &["save"], None)?);
    for spec in IPSETS.iter().filter(|s| existing.contains_key(s.name)) {
        run("ipset", &["destroy", spec.name], None)?;
    }
    Ok(())
}
