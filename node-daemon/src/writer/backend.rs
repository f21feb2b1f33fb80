//! Which iptables implementation to drive: the one the node's kube-proxy already uses, as Calico
//! decides it (the backend holding `KUBE-` chains wins, else the one with more rules).

use conf::daemon::IptablesBackend;

use super::cmd::CommandRunner;

/// The binaries of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub kind: IptablesBackend,
    pub save: &'static str,
    pub restore: &'static str,
}

impl Backend {
    pub fn legacy() -> Self {
        Self {
            kind: IptablesBackend::Legacy,
            save: "iptables-legacy-save",
            restore: "iptables-legacy-restore",
        }
    }

    pub fn nft() -> Self {
        Self {
            kind: IptablesBackend::Nft,
            save: "iptables-nft-save",
            restore: "iptables-nft-restore",
        }
    }
}

/// What a backend's `iptables-save` shows, reduced to the two numbers the choice needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendUsage {
    pub kube_chains: usize,
    pub rules: usize,
}

impl BackendUsage {
    pub fn from_save(text: &str) -> Self {
        let mut u = BackendUsage::default();
        for line in text.lines() {
            if line.starts_with(":KUBE-") {
                u.kube_chains += 1;
            } else if line.starts_with("-A ") {
                u.rules += 1;
            }
        }
        u
    }
}

/// Pure choice: kube-proxy's chains decide, then the rule count; a tie goes to `default_nft`
/// (what the distribution's `iptables` points at).
pub fn choose(legacy: BackendUsage, nft: BackendUsage, default_nft: bool) -> IptablesBackend {
    match (legacy.kube_chains > 0, nft.kube_chains > 0) {
        (true, false) => return IptablesBackend::Legacy,
        (false, true) => return IptablesBackend::Nft,
        _ => {}
    }
    match legacy.rules.cmp(&nft.rules) {
        std::cmp::Ordering::Greater => IptablesBackend::Legacy,
        std::cmp::Ordering::Less => IptablesBackend::Nft,
        std::cmp::Ordering::Equal if default_nft => IptablesBackend::Nft,
        std::cmp::Ordering::Equal => IptablesBackend::Legacy,
    }
}

/// Resolves `auto` by looking at both backends; a backend whose save fails counts as empty.
pub fn detect(runner: &dyn CommandRunner, wanted: IptablesBackend) -> Backend {
    let chosen = match wanted {
        IptablesBackend::Legacy => IptablesBackend::Legacy,
        IptablesBackend::Nft => IptablesBackend::Nft,
        IptablesBackend::Auto => {
            let usage = |prog: &str| {
                runner
                    .run(prog, &[], None)
                    .map(|t| BackendUsage::from_save(&t))
                    .unwrap_or_default()
            };
            let default_nft = runner
                .run("iptables", &["--version"], None)
                .map(|v| v.contains("nf_tables"))
                .unwrap_or(true);
            let chosen = choose(usage("iptables-legacy-save"), usage("iptables-nft-save"), default_nft);
            tracing::info!(backend = ?chosen, "detected iptables backend");
            chosen
        }
    };
    match chosen {
        IptablesBackend::Legacy => Backend::legacy(),
        _ => Backend::nft(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_follow_kube_proxy_then_rule_count() {
        let kube = BackendUsage::from_save(":KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n");
        assert_eq!(
            kube,
            BackendUsage {
                kube_chains: 1,
                rules: 1
            }
        );
        let busy = BackendUsage {
            kube_chains: 0,
            rules: 50,
        };
        assert_eq!(choose(kube, busy, true), IptablesBackend::Legacy);
        assert_eq!(choose(busy, kube, false), IptablesBackend::Nft);
        assert_eq!(choose(busy, BackendUsage::default(), true), IptablesBackend::Legacy);
        assert_eq!(
            choose(BackendUsage::default(), BackendUsage::default(), true),
            IptablesBackend::Nft
        );
        assert_eq!(
            choose(BackendUsage::default(), BackendUsage::default(), false),
            IptablesBackend::Legacy
        );
    }
}
