//! The dataplane writer: makes the kernel's warren-owned ipsets, iptables chains and hooks equal
//! to a [`DesiredDataplane`], by diff, touching nothing it does not own.
//!
//! Order of one apply (so no rule ever references a missing set and no isolated pod is ever
//! open): ipset creations and member changes → one `iptables-restore --noflush --wait` per table
//! → ipset destructions. Stale chains, hooks and sets are removed only when the caller says the
//! first full sync is done (`sweep`).

pub mod backend;
pub mod cmd;
pub mod fake;
pub mod ipset;
pub mod iptables;

use std::collections::BTreeMap;

use conf::dataplane::{DesiredDataplane, Hook};

pub use backend::Backend;
pub use cmd::{CmdError, CommandRunner, ExecRunner};

/// Failures of one apply; every step is attempted, so this lists all that failed.
#[derive(Debug, thiserror::Error)]
#[error("dataplane apply failed: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct WriterError(pub Vec<CmdError>);

/// What one apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Everything rewritten, created or removed.
    pub changed: Vec<String>,
    /// The subset that had been written before, unchanged in the desired state, and was found
    /// different in the kernel: someone else changed it.
    pub drifted: Vec<String>,
}

pub struct Writer<C: CommandRunner> {
    runner: C,
    backend: Backend,
    /// The last desired state applied successfully, to tell drift from intended change.
    last: Option<DesiredDataplane>,
    /// Read the kernel back (`ipset save`, `iptables-save` per table) before diffing. When
    /// false, and a previous apply succeeded, the diff is taken against what that apply wrote:
    /// a change costs one `ipset restore` and one `iptables-restore` per changed table instead
    /// of five dumps of tables that may hold 100 000 rules. Drift goes unseen until the next
    /// read-back, so the caller reads back on its resync period (Calico's felix does the same).
    pub read_back: bool,
}

impl<C: CommandRunner> Writer<C> {
    pub fn new(runner: C, backend: Backend) -> Self {
        Self {
            runner,
            backend,
            last: None,
            read_back: true,
        }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn runner(&self) -> &C {
        &self.runner
    }

    /// Every table in one dump: `iptables-nft-save -t T` reads the whole ruleset whatever T is,
    /// so four per-table dumps cost four full reads.
    fn save_tables(&self) -> Result<BTreeMap<String, iptables::SavedTable>, CmdError> {
        let text = self.runner.run(self.backend.save, &[], None)?;
        Ok(iptables::parse_save_all(&text))
    }

    /// Brings the kernel to `desired`. Safe to call repeatedly: a second call with the same state
    /// writes nothing.
    pub fn apply(&mut self, desired: &DesiredDataplane, sweep: bool) -> Result<ApplyReport, WriterError> {
        let mut errors = Vec::new();
        let mut report = ApplyReport::default();

        // Without read-back, only what differs from the last apply is planned: parts the
        // compiler did not touch are the same allocation (`Arc`), so finding them costs a
        // pointer comparison each, whatever their size.
        let cached = if self.read_back { None } else { self.last.take() };
        let (want_sets, actual_sets) = match &cached {
            Some(last) => changed_parts(&desired.ipsets, &last.ipsets),
            None => match self.runner.run("ipset", &["save"], None) {
                Ok(t) => (desired.ipsets.clone(), ipset::parse_save(&t)),
                Err(e) => return Err(WriterError(vec![e])),
            },
        };
        let set_plan = ipset::plan_sets(&want_sets, &actual_sets, sweep);
        if !set_plan.before.is_empty() {
            if let Err(e) = self.runner.run("ipset", &["restore", "-exist"], Some(&set_plan.before)) {
                errors.push(e);
            }
        }

        let saved = match &cached {
            Some(_) => Ok(BTreeMap::new()),
            None => self.save_tables(),
        };
        let saved = match saved {
            Ok(t) => t,
            Err(e) => return Err(WriterError(vec![e])),
        };
        let (want_chains, last_chains) = match &cached {
            Some(last) => changed_parts(&desired.chains, &last.chains),
            None => (desired.chains.clone(), BTreeMap::new()),
        };
        for table in iptables::ALL_TABLES {
            let chains: BTreeMap<String, std::sync::Arc<Vec<String>>> = want_chains
                .iter()
                .filter(|((t, _), _)| *t == table)
                .map(|((_, c), r)| (c.clone(), r.clone()))
                .collect();
            let hooks: Vec<&Hook> = desired.hooks.iter().filter(|h| h.table == table).collect();
            let actual = match &cached {
                Some(last) => iptables::as_written(table, &last_chains, &last.hooks),
                // A table the dump does not show is empty (not even loaded).
                None => saved.get(table.name()).cloned().unwrap_or_default(),
            };
            let plan = iptables::plan_table(table, &chains, &hooks, &actual, sweep);
            if plan.restore.is_empty() {
                continue;
            }
            match self
                .runner
                .run(self.backend.restore, &["--noflush", "--wait"], Some(&plan.restore))
            {
                Ok(_) => report.changed.extend(plan.changed),
                Err(e) => errors.push(e),
            }
        }

        if !set_plan.after.is_empty() {
            if let Err(e) = self.runner.run("ipset", &["restore", "-exist"], Some(&set_plan.after)) {
                errors.push(e);
            }
        }
        report.changed.extend(set_plan.changed);

        report.drifted = match self.last.as_ref().filter(|_| cached.is_none()) {
            Some(last) => report
                .changed
                .iter()
                .filter(|item| unchanged_since(last, desired, item))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        if errors.is_empty() {
            self.last = Some(desired.clone());
            Ok(report)
        } else {
            // What was not applied is retried on the next call, which diffs against the kernel again.
            self.last = None;
            Err(WriterError(errors))
        }
    }

    /// Removes every warren chain, hook and set (`warren-node uninstall`).
    pub fn remove_all(&mut self) -> Result<ApplyReport, WriterError> {
        self.apply(&DesiredDataplane::default(), true)
    }
}

/// The entries of `desired` that differ from `last`, and the entries of `last` that differ from
/// `desired` (changed or gone): what a plan against the last written state has to look at.
fn changed_parts<K: Ord + Clone, V: PartialEq>(
    desired: &BTreeMap<K, std::sync::Arc<V>>,
    last: &BTreeMap<K, std::sync::Arc<V>>,
) -> (BTreeMap<K, std::sync::Arc<V>>, BTreeMap<K, std::sync::Arc<V>>) {
    let same = |a: &std::sync::Arc<V>, b: &std::sync::Arc<V>| std::sync::Arc::ptr_eq(a, b) || a == b;
    let want = desired
        .iter()
        .filter(|(k, v)| last.get(k).is_none_or(|l| !same(l, v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let have = last
        .iter()
        .filter(|(k, v)| desired.get(k).is_none_or(|d| !same(d, v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (want, have)
}

/// Whether the object named in a change item was desired identically in `last` and `now`
/// (then the kernel changed under us).
fn unchanged_since(last: &DesiredDataplane, now: &DesiredDataplane, item: &str) -> bool {
    let mut words = item.split_whitespace();
    match (words.next(), words.next()) {
        (Some("chain"), Some(path)) => {
            let Some((t, c)) = path.split_once('/') else {
                return false;
            };
            let Some(table) = iptables::ALL_TABLES.into_iter().find(|x| x.name() == t) else {
                return false;
            };
            let key = (table, c.to_string());
            now.chains.contains_key(&key) && last.chains.get(&key) == now.chains.get(&key)
        }
        (Some("ipset"), Some(name)) => now.ipsets.contains_key(name) && last.ipsets.get(name) == now.ipsets.get(name),
        (Some("hook"), Some(_)) => {
            !item.ends_with(" removed")
                && now
                    .hooks
                    .iter()
                    .any(|h| last.hooks.contains(h) && item.ends_with(&h.rule) && item.contains(&h.chain))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FailFlags, FakeKernel};
    use super::*;
    use conf::dataplane::{IpSetSpec, Table};
    use std::sync::Arc;

    fn desired() -> DesiredDataplane {
        let mut d = DesiredDataplane::default();
        d.ipsets.insert(
            "warren-all-hosts".into(),
            Arc::new(IpSetSpec {
                kind: "hash:ip".into(),
                members: ["10.0.0.1".to_string(), "10.0.0.2".to_string()].into(),
            }),
        );
        d.chains.insert(
            (Table::Filter, "WARREN-INPUT".into()),
            Arc::new(vec![
                "-p 4 -m set --match-set warren-all-hosts src -j ACCEPT".into(),
                "-p 4 -j DROP".into(),
            ]),
        );
        d.hooks.insert(Hook {
            table: Table::Filter,
            chain: "INPUT".into(),
            rule: "-j WARREN-INPUT".into(),
            first: true,
        });
        d
    }

    fn writer() -> Writer<FakeKernel> {
        Writer::new(FakeKernel::new(), Backend::nft())
    }

    #[test]
    fn should_apply_sets_before_rules_and_be_a_no_op_the_second_time() {
        let mut w = writer();
        w.runner().foreign("filter", "INPUT", Some("-s 192.0.2.1/32 -j ACCEPT"));
        let r = w.apply(&desired(), false).unwrap();
        assert_eq!(r.changed.len(), 3, "{:?}", r.changed);
        let writes = w.runner().writes.lock().unwrap().clone();
        assert_eq!(writes[0].0, "ipset", "sets exist before rules reference them");
        assert_eq!(writes[1].0, "iptables-nft-restore");
        assert_eq!(writes.len(), 2, "one batch per table");
        let input = w.runner().rules("filter", "INPUT").unwrap();
        assert_eq!(input.len(), 2);
        assert!(input[0].ends_with("-j WARREN-INPUT"));
        assert_eq!(input[1], "-s 192.0.2.1/32 -j ACCEPT", "foreign rule untouched");
        let r = w.apply(&desired(), true).unwrap();
        assert_eq!(r, ApplyReport::default());
        assert_eq!(w.runner().writes.lock().unwrap().len(), 2, "nothing written");
    }

    #[test]
    fn should_repair_drift_and_name_it() {
        let mut w = writer();
        w.apply(&desired(), true).unwrap();
        w.runner().flush_chain("filter", "WARREN-INPUT");
        let r = w.apply(&desired(), true).unwrap();
        assert_eq!(r.drifted, vec!["chain filter/WARREN-INPUT".to_string()]);
        assert_eq!(w.runner().rules("filter", "WARREN-INPUT").unwrap().len(), 2);
        // An intended change is not drift.
        let mut d = desired();
        Arc::make_mut(d.ipsets.get_mut("warren-all-hosts").unwrap())
            .members
            .insert("10.0.0.3".into());
        let r = w.apply(&d, true).unwrap();
        assert_eq!(r.changed.len(), 1);
        assert!(r.drifted.is_empty());
    }

    #[test]
    fn should_sweep_stale_objects_only_when_allowed_and_in_a_safe_order() {
        let mut w = writer();
        w.apply(&desired(), true).unwrap();
        let empty = DesiredDataplane::default();
        assert_eq!(
            w.apply(&empty, false).unwrap(),
            ApplyReport::default(),
            "fail-static before sync"
        );
        assert!(w.runner().rules("filter", "WARREN-INPUT").is_some());
        // The fake refuses to destroy a referenced set: success proves rules went first.
        let r = w.apply(&empty, true).unwrap();
        assert_eq!(r.changed.len(), 3, "{:?}", r.changed);
        assert!(w.runner().rules("filter", "WARREN-INPUT").is_none());
        assert!(w.runner().set_members("warren-all-hosts").is_none());
        assert_eq!(w.runner().rules("filter", "INPUT").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn should_report_failures_and_retry_them_next_time() {
        let mut w = writer();
        *w.runner().fail_next.lock().unwrap() = FailFlags {
            iptables_restore: true,
            ipset_restore: false,
        };
        let err = w.apply(&desired(), true).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(w.runner().rules("filter", "WARREN-INPUT").is_none());
        let r = w.apply(&desired(), true).unwrap();
        assert!(r.changed.iter().any(|c| c == "chain filter/WARREN-INPUT"));
        assert!(r.drifted.is_empty(), "a failed write is not drift");
    }

    #[test]
    fn should_diff_against_what_it_wrote_without_reading_back_and_still_repair_on_read_back() {
        use std::sync::atomic::Ordering;
        let mut w = writer();
        w.apply(&desired(), true).unwrap();
        w.read_back = false;
        let reads = w.runner().reads.load(Ordering::Relaxed);
        let writes = w.runner().writes.lock().unwrap().len();
        let mut d = desired();
        Arc::make_mut(d.ipsets.get_mut("warren-all-hosts").unwrap())
            .members
            .insert("10.0.0.3".into());
        Arc::make_mut(d.chains.get_mut(&(Table::Filter, "WARREN-INPUT".to_string())).unwrap())
            .insert(0, "-p 4 -s 10.0.0.3/32 -j ACCEPT".into());
        let r = w.apply(&d, true).unwrap();
        assert_eq!(r.changed.len(), 2, "{:?}", r.changed);
        assert_eq!(w.runner().reads.load(Ordering::Relaxed), reads, "no dump read");
        assert_eq!(
            w.runner().writes.lock().unwrap().len(),
            writes + 2,
            "one ipset and one filter batch"
        );
        assert_eq!(w.runner().set_members("warren-all-hosts").unwrap().len(), 3);
        assert_eq!(w.runner().rules("filter", "WARREN-INPUT").unwrap().len(), 3);
        assert_eq!(
            w.runner().rules("filter", "INPUT").unwrap().len(),
            1,
            "hook not repeated"
        );
        assert_eq!(w.apply(&d, true).unwrap(), ApplyReport::default());

        // Unseen drift stays until the caller reads back, which repairs and names it.
        w.runner().flush_chain("filter", "WARREN-INPUT");
        assert_eq!(w.apply(&d, true).unwrap(), ApplyReport::default());
        w.read_back = true;
        let r = w.apply(&d, true).unwrap();
        assert_eq!(r.drifted, vec!["chain filter/WARREN-INPUT".to_string()]);
        assert_eq!(w.runner().rules("filter", "WARREN-INPUT").unwrap().len(), 3);
    }

    #[test]
    fn should_recreate_a_deleted_set() {
        let mut w = writer();
        w.apply(&desired(), true).unwrap();
        w.runner().destroy_set_unchecked("warren-all-hosts");
        let r = w.apply(&desired(), true).unwrap();
        assert_eq!(r.drifted, vec!["ipset warren-all-hosts created".to_string()]);
        assert_eq!(w.runner().set_members("warren-all-hosts").unwrap().len(), 2);
    }
}
