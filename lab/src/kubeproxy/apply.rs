//! Writes the iptables-mode ruleset into the *current* network namespace (thin; the decisions
//! are in [`super::render`]). The lab runs one proxy per node inside that node's namespace.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use super::model::{HostOptions, ProxyInput};
use super::render::{jump_rules, render_cleanup, render_with_stale, stale_nat_chains, JumpRule};

/// Environment variable naming the iptables binary (`iptables`, `iptables-legacy`,
/// `iptables-nft`); `-save` / `-restore` are appended for the companions.
pub const IPTABLES_ENV: &str = "WARREN_LAB_IPTABLES";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("setting sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = ApplyError> = std::result::Result<T, E>;

/// Runs a command (with `stdin` piped in when given); its stdout, or why it failed.
pub(crate) fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let cmd_line = format!("{program} {}", args.join(" "));
    let spawn_err = |source| ApplyError::Spawn {
        cmd: cmd_line.clone(),
        source,
    };
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(ApplyError::Failed {
            cmd: cmd_line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The iptables command family to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iptables {
    pub bin: String,
}

impl Iptables {
    /// From [`IPTABLES_ENV`], default `iptables`.
    pub fn from_env() -> Iptables {
        let bin = std::env::var(IPTABLES_ENV).ok().filter(|s| !s.trim().is_empty());
        Iptables {
            bin: bin.unwrap_or_else(|| "iptables".to_string()),
        }
    }

    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        run(program, args, stdin)
    }

    /// `iptables-save -t <table>`.
    pub fn save(&self, table: &str) -> Result<String> {
        self.run(&format!("{}-save", self.bin), &["-t", table], None)
    }

    /// `iptables-restore --noflush --wait` with `data` on stdin.
    pub fn restore(&self, data: &str) -> Result<()> {
        self.run(&format!("{}-restore", self.bin), &["--noflush", "--wait"], Some(data))
            .map(|_| ())
    }

    /// kube-proxy's `EnsureRule(Prepend, …)`: `-C` and, when missing, `-I`.
    pub fn ensure_rule_prepended(&self, table: &str, chain: &str, args: &[String]) -> Result<()> {
        let mut check = vec!["-w", "-t", table, "-C", chain];
        check.extend(args.iter().map(String::as_str));
        match self.run(&self.bin, &check, None) {
            Ok(_) => Ok(()),
            // Exit status 1 is "no such rule"; anything else (bad chain, lock) is an error.
            Err(ApplyError::Failed { status, .. }) if status.code() == Some(1) => {
                let mut insert = vec!["-w", "-t", table, "-I", chain];
                insert.extend(args.iter().map(String::as_str));
                self.run(&self.bin, &insert, None).map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes a rule; a missing rule (or chain) is not an error.
    pub fn delete_rule_if_present(&self, table: &str, chain: &str, args: &[String]) -> Result<()> {
        let mut del = vec!["-w", "-t", table, "-D", chain];
        del.extend(args.iter().map(String::as_str));
        match self.run(&self.bin, &del, None) {
            Ok(_) => Ok(()),
            Err(ApplyError::Failed { status, .. }) if status.code() == Some(1) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether MASQUERADE takes `--random-fully` (iptables ≥ 1.6.2, as kube-proxy checks).
    pub fn has_random_fully(&self) -> bool {
        let Ok(v) = self.run(&self.bin, &["--version"], None) else {
            return false;
        };
        // "iptables v1.8.9 (nf_tables)"
        let Some(ver) = v.split_whitespace().find_map(|w| w.strip_prefix('v')) else {
            return false;
        };
        let nums: Vec<u32> = ver.split('.').map_while(|p| p.parse().ok()).collect();
        nums >= vec![1, 6, 2]
    }
}

fn write_sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| ApplyError::Sysctl {
        path: path.to_string(),
        source,
    })
}

/// What kube-proxy detects on the host it starts on.
pub fn detect_host_options(ipt: &Iptables) -> HostOptions {
    let liberal = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
        .map(|s| s.trim() != "0")
        .unwrap_or(false);
    HostOptions {
        random_fully: ipt.has_random_fully(),
        conntrack_tcp_liberal: liberal,
        ..HostOptions::default()
    }
}

/// The sysctls kube-proxy needs, in the current netns: `route_localnet` (localhost NodePorts)
/// and `ip_forward` (which kube-proxy expects the node to have).
pub fn ensure_sysctls(input: &ProxyInput) -> Result<()> {
    if input.options.localhost_nodeports {
        write_sysctl("/proc/sys/net/ipv4/conf/all/route_localnet", "1")?;
    }
    if Path::new("/proc/sys/net/ipv4/ip_forward").exists() {
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    }
    Ok(())
}

/// One full sync, as kube-proxy's `syncProxyRules`: sysctls, one restore for filter + nat
/// (deleting stale per-service chains), then the jump rules from the built-in chains.
pub fn apply(ipt: &Iptables, input: &ProxyInput) -> Result<()> {
    ensure_sysctls(input)?;
    let existing = ipt.save("nat")?;
    let fresh = render_with_stale(input, &BTreeSet::new());
    let stale = stale_nat_chains(&existing, &fresh);
    let text = if stale.is_empty() {
        fresh
    } else {
        render_with_stale(input, &stale)
    };
    ipt.restore(&text)?;
    for j in jump_rules(input) {
        ipt.ensure_rule_prepended(j.table, j.chain, &j.args)?;
    }
    tracing::debug!(
        services = input.services.len(),
        stale = stale.len(),
        "kube-proxy rules applied"
    );
    Ok(())
}

/// Removes what [`apply`] wrote, as `kube-proxy --cleanup` does (e.g. before switching the node
/// to another proxy mode): the jump rules, then kube-proxy's chains in nat and filter. kubelet's
/// KUBE-FIREWALL chain and its jumps are left alone, as kube-proxy leaves them.
pub fn cleanup(ipt: &Iptables) -> Result<()> {
    let all_jumps = jump_rules(&ProxyInput {
        node_name: String::new(),
        node_ips: Vec::new(),
        cluster_cidr: None,
        services: Vec::new(),
        masquerade_all: false,
        options: HostOptions {
            localhost_nodeports: false,
            ..HostOptions::default()
        },
    });
    for JumpRule { table, chain, args } in &all_jumps {
        ipt.delete_rule_if_present(table, chain, args)?;
    }
    let text = render_cleanup(&ipt.save("nat")?, &ipt.save("filter")?);
    ipt.restore(&text)
}
