//! The dataplane writer: makes the kernel's warren-owned ipsets, iptables chains and hooks equal
//! to a [`DesiredDataplane`], by diff, touching nothing it does not own.
//!
//! Order of one apply (so no rule ever references a missing set and no isolated pod is ever
//! open): ipset creations and member changes → one `iptables-restore --noflush --wait` per table
//! → ipset destructions. Stale chains, hooks and sets are removed only when the caller says the
//! first full sync is done (`sweep`).
//!
//! With iptables-nft, changes between read-backs are written make-before-break
//! ([`iptables::plan_inserts`]): nothing is deleted on the latency path, and what is left behind
//! (dead tails, stale chains and sets) is removed by [`Writer::tidy`] or the next read-back.

pub mod backend;
pub mod cmd;
pub mod fake;
pub mod ipset;
pub mod ipset_nl;
pub mod iptables;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use conf::daemon::IptablesBackend;
use conf::dataplane::{DesiredDataplane, Hook, IpSetSpec, Table};

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
    /// Write changes between read-backs make-before-break (the default with iptables-nft, where
    /// a deletion costs 15–25 ms per transaction; iptables-legacy replaces whole tables anyway).
    pub make_before_break: bool,
    /// What make-before-break writes left in the kernel for [`Writer::tidy`].
    untidy: Untidy,
    /// Per table, how warren's chains are marked and, with [`iptables::ChainMarks::Content`],
    /// how they read back.
    forms: BTreeMap<Table, iptables::ChainForms>,
}

/// Leftovers of make-before-break writes, all warren's own and unreachable by packets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Untidy {
    /// Chains holding their desired body, then a RETURN, then dead rules.
    chains: BTreeSet<(Table, String)>,
    /// Chains no longer desired, still in the kernel (maybe referenced from dead rules).
    stale_chains: BTreeSet<(Table, String)>,
    /// Sets no longer desired, still in the kernel, as last written.
    stale_sets: BTreeMap<String, Arc<IpSetSpec>>,
}

impl Untidy {
    fn len(&self) -> usize {
        self.chains.len() + self.stale_chains.len() + self.stale_sets.len()
    }

    /// Whether a change item (as in [`ApplyReport::changed`]) names a leftover: rewriting or
    /// removing it is the cleanup of our own write, not drift.
    fn covers(&self, item: &str) -> bool {
        let mut words = item.split_whitespace();
        match (words.next(), words.next()) {
            (Some("chain"), Some(path)) => {
                chain_key(path).is_some_and(|k| self.chains.contains(&k) || self.stale_chains.contains(&k))
            }
            (Some("ipset"), Some(name)) => self.stale_sets.contains_key(name),
            _ => false,
        }
    }
}

impl<C: CommandRunner> Writer<C> {
    pub fn new(runner: C, backend: Backend) -> Self {
        Self {
            runner,
            last: None,
            read_back: true,
            make_before_break: backend.kind == IptablesBackend::Nft,
            untidy: Untidy::default(),
            forms: BTreeMap::new(),
            backend,
        }
    }

    /// How the rules of warren's chains are marked: by content with iptables-legacy (see
    /// [`iptables::ChainMarks::Content`]), by hash comments otherwise. Make-before-break writes
    /// always carry hashes (they are for iptables-nft).
    pub fn chain_marks(&self) -> iptables::ChainMarks {
        match self.backend.kind {
            IptablesBackend::Legacy => iptables::ChainMarks::Content,
            _ => iptables::ChainMarks::Hashes,
        }
    }

    fn forms(&mut self, table: Table) -> &mut iptables::ChainForms {
        let marks = self.chain_marks();
        self.forms
            .entry(table)
            .or_insert_with(|| iptables::ChainForms::new(marks))
    }

    /// How many chains and sets make-before-break writes left for [`Writer::tidy`].
    pub fn untidy(&self) -> usize {
        self.untidy.len()
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

    /// One `ipset restore` batch, if there is anything in it.
    fn ipset_restore(&self, text: &str, errors: &mut Vec<CmdError>) {
        if text.is_empty() {
            return;
        }
        if let Err(e) = self.runner.run("ipset", &["restore", "-exist"], Some(text)) {
            errors.push(e);
        }
    }

    /// One table's `iptables-restore --noflush` batch, if the plan has one: what it changed goes
    /// to `report`, a failure to `errors`. Whether the batch was written (or nothing was to be).
    fn restore_table(&self, plan: &iptables::TablePlan, report: &mut ApplyReport, errors: &mut Vec<CmdError>) -> bool {
        if plan.restore.is_empty() {
            return true;
        }
        match self
            .runner
            .run(self.backend.restore, &["--noflush", "--wait"], Some(&plan.restore))
        {
            Ok(_) => {
                report.changed.extend(plan.changed.iter().cloned());
                true
            }
            Err(e) => {
                errors.push(e);
                false
            }
        }
    }

    /// Brings the kernel to `desired`. Safe to call repeatedly: a second call with the same state
    /// writes nothing.
    pub fn apply(&mut self, desired: &DesiredDataplane, sweep: bool) -> Result<ApplyReport, WriterError> {
        // Without read-back, only what differs from the last apply is planned: parts the
        // compiler did not touch are the same allocation (`Arc`), so finding them costs a
        // pointer comparison each, whatever their size.
        let cached = if self.read_back { None } else { self.last.take() };
        match cached {
            // Hooks are few and rarely change; a change of them takes the plain path.
            Some(last) if self.make_before_break && sweep && last.hooks == desired.hooks => {
                self.apply_make_before_break(desired, &last)
            }
            // The plain diff against the last apply does not know the leftovers of
            // make-before-break (a stale set that comes back still holds its old members):
            // the kernel is read back instead.
            Some(last) if self.untidy.len() == 0 => self.apply_diff(desired, Some(last), sweep),
            _ => self.apply_diff(desired, None, sweep),
        }
    }

    /// Plans against `cached` (the last apply) or, when `None`, against the kernel read back.
    fn apply_diff(
        &mut self,
        desired: &DesiredDataplane,
        cached: Option<DesiredDataplane>,
        sweep: bool,
    ) -> Result<ApplyReport, WriterError> {
        let mut errors = Vec::new();
        let mut report = ApplyReport::default();
        let (want_sets, actual_sets) = match &cached {
            Some(last) => changed_parts(&desired.ipsets, &last.ipsets),
            None => match self.runner.run("ipset", &["save"], None) {
                Ok(t) => (desired.ipsets.clone(), ipset::parse_save(&t)),
                Err(e) => return Err(WriterError(vec![e])),
            },
        };
        let set_plan = ipset::plan_sets(&want_sets, &actual_sets, sweep);
        self.ipset_restore(&set_plan.before, &mut errors);

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
            let chains = chains_in(table, &want_chains);
            let hooks: Vec<&Hook> = desired.hooks.iter().filter(|h| h.table == table).collect();
            let actual = match &cached {
                Some(last) => iptables::as_written(table, &last_chains, &last.hooks, self.chain_marks()),
                // A table the dump does not show is empty (not even loaded).
                None => saved.get(table.name()).cloned().unwrap_or_default(),
            };
            let plan = iptables::plan_table(table, &chains, &hooks, &actual, sweep, self.forms(table));
            let written = self.restore_table(&plan, &mut report, &mut errors);
            // Read back, `chains` is every desired chain of the table.
            let desired_here = |c: &str| chains.contains_key(c);
            let read_back: Option<&dyn Fn(&str) -> bool> = match cached {
                None => Some(&desired_here),
                Some(_) => None,
            };
            self.forms(table).record(&plan, written, read_back);
        }

        self.ipset_restore(&set_plan.after, &mut errors);
        report.changed.extend(set_plan.changed);

        report.drifted = match self.last.as_ref().filter(|_| cached.is_none()) {
            Some(last) => report
                .changed
                .iter()
                .filter(|item| unchanged_since(last, desired, item) && !self.untidy.covers(item))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        if errors.is_empty() {
            if cached.is_none() {
                // Read back and rewritten: dead tails are gone, and with `sweep` stale objects too.
                self.untidy.chains.clear();
                if sweep {
                    self.untidy = Untidy::default();
                }
            }
            self.last = Some(desired.clone());
            Ok(report)
        } else {
            // What was not applied is retried on the next call, which diffs against the kernel again.
            self.last = None;
            Err(WriterError(errors))
        }
    }

    /// Between read-backs with iptables-nft: sets created and updated, changed chains rewritten by
    /// [`iptables::plan_inserts`], nothing deleted; the leftovers are recorded for [`Writer::tidy`].
    fn apply_make_before_break(
        &mut self,
        desired: &DesiredDataplane,
        last: &DesiredDataplane,
    ) -> Result<ApplyReport, WriterError> {
        let mut errors = Vec::new();
        let mut report = ApplyReport::default();

        let (want_sets, mut have_sets) = changed_parts(&desired.ipsets, &last.ipsets);
        // A set that comes back before it was destroyed still holds what it held.
        for name in want_sets.keys() {
            if let Some(spec) = self.untidy.stale_sets.get(name) {
                have_sets.insert(name.clone(), spec.clone());
            }
        }
        let set_plan = ipset::plan_sets(&want_sets, &have_sets, false);
        self.ipset_restore(&set_plan.before, &mut errors);

        let (want_chains, have_chains) = changed_parts(&desired.chains, &last.chains);
        let in_kernel = |key: &(Table, String)| have_chains.contains_key(key) || self.untidy.stale_chains.contains(key);
        for table in iptables::ALL_TABLES {
            let chains = chains_in(table, &want_chains);
            let plan = iptables::plan_inserts(table, &chains, &|c| in_kernel(&(table, c.to_string())));
            self.restore_table(&plan, &mut report, &mut errors);
        }
        report.changed.extend(set_plan.changed);

        // Recorded whatever failed: the record only spares cleanup from counting as drift, and
        // after a failure the next apply reads the kernel back anyway.
        let rewritten: Vec<(Table, String)> = want_chains.keys().filter(|k| in_kernel(k)).cloned().collect();
        for key in rewritten {
            self.untidy.stale_chains.remove(&key);
            self.untidy.chains.insert(key);
        }
        for key in have_chains.keys().filter(|k| !desired.chains.contains_key(*k)) {
            self.untidy.chains.remove(key);
            self.untidy.stale_chains.insert(key.clone());
        }
        for name in want_sets.keys() {
            self.untidy.stale_sets.remove(name);
        }
        for (name, spec) in have_sets.into_iter().filter(|(n, _)| !desired.ipsets.contains_key(n)) {
            self.untidy.stale_sets.insert(name, spec);
        }

        if errors.is_empty() {
            self.last = Some(desired.clone());
            Ok(report)
        } else {
            self.last = None;
            Err(WriterError(errors))
        }
    }

    /// Removes what make-before-break writes left: dead tails (each such chain rewritten whole),
    /// then stale chains, then stale sets. Off the latency path: the deletions cost 15–25 ms per
    /// nf_tables transaction, and packets already skip everything removed here.
    pub fn tidy(&mut self) -> Result<ApplyReport, WriterError> {
        let mut report = ApplyReport::default();
        // Without a last apply the next one reads the kernel back, which cleans up as well.
        let Some(last) = self.last.as_ref().filter(|_| self.untidy.len() > 0) else {
            return Ok(report);
        };
        let mut errors = Vec::new();
        for table in iptables::ALL_TABLES {
            let mut chains: BTreeMap<String, Arc<Vec<String>>> = BTreeMap::new();
            let mut actual = iptables::SavedTable::default();
            for (_, c) in self.untidy.chains.iter().filter(|(t, _)| *t == table) {
                if let Some(rules) = last.chains.get(&(table, c.clone())) {
                    chains.insert(c.clone(), rules.clone());
                }
                // A rule no desired body has: the chain is rewritten whatever it should hold.
                let dead = iptables::SavedRule {
                    spec: String::new(),
                    hash: None,
                };
                actual.chains.insert(c.clone(), vec![dead]);
            }
            for (_, c) in self.untidy.stale_chains.iter().filter(|(t, _)| *t == table) {
                actual.chains.entry(c.clone()).or_default();
            }
            // Nothing is learned here: `actual` is made up, not read.
            let forms = iptables::ChainForms::new(self.chain_marks());
            let plan = iptables::plan_table(table, &chains, &[], &actual, true, &forms);
            let written = self.restore_table(&plan, &mut report, &mut errors);
            let marks = forms.marks;
            self.forms
                .entry(table)
                .or_insert_with(|| iptables::ChainForms::new(marks))
                .record(&plan, written, None);
        }
        // Sets go only once no rule, dead or not, can reference them.
        if errors.is_empty() {
            let text = ipset::destroy_lines(
                self.untidy
                    .stale_sets
                    .iter()
                    .map(|(name, spec)| (name.as_str(), spec.kind.as_str())),
            );
            for name in self.untidy.stale_sets.keys() {
                report.changed.push(format!("ipset {name} removed"));
            }
            self.ipset_restore(&text, &mut errors);
        }
        if errors.is_empty() {
            self.untidy = Untidy::default();
            Ok(report)
        } else {
            self.last = None;
            Err(WriterError(errors))
        }
    }

    /// Removes every warren chain, hook and set (`warren-node uninstall`).
    pub fn remove_all(&mut self) -> Result<ApplyReport, WriterError> {
        self.apply(&DesiredDataplane::default(), true)
    }
}

/// The chains of `table` among `chains`, by name.
fn chains_in(table: Table, chains: &BTreeMap<(Table, String), Arc<Vec<String>>>) -> BTreeMap<String, Arc<Vec<String>>> {
    chains
        .iter()
        .filter(|((t, _), _)| *t == table)
        .map(|((_, c), r)| (c.clone(), r.clone()))
        .collect()
}

/// The entries of `desired` that differ from `last`, and the entries of `last` that differ from
/// `desired` (changed or gone): what a plan against the last written state has to look at.
fn changed_parts<K: Ord + Clone, V: PartialEq>(
    desired: &BTreeMap<K, std::sync::Arc<V>>,
    last: &BTreeMap<K, std::sync::Arc<V>>,
) -> (BTreeMap<K, std::sync::Arc<V>>, BTreeMap<K, std::sync::Arc<V>>) {
    use std::cmp::Ordering;
    let same = |a: &std::sync::Arc<V>, b: &std::sync::Arc<V>| std::sync::Arc::ptr_eq(a, b) || a == b;
    let (mut want, mut have) = (BTreeMap::new(), BTreeMap::new());
    // Both maps are sorted by key: one walk side by side instead of a lookup per entry (at 2 300
    // chains and 1 700 sets, the lookups' key comparisons cost about 1 ms of every edit).
    let (mut d, mut l) = (desired.iter().peekable(), last.iter().peekable());
    loop {
        let order = match (d.peek(), l.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((dk, _)), Some((lk, _))) => dk.cmp(lk),
        };
        match order {
            Ordering::Less => {
                if let Some((k, v)) = d.next() {
                    want.insert(k.clone(), v.clone());
                }
            }
            Ordering::Greater => {
                if let Some((k, v)) = l.next() {
                    have.insert(k.clone(), v.clone());
                }
            }
            Ordering::Equal => {
                if let (Some((k, dv)), Some((_, lv))) = (d.next(), l.next()) {
                    if !same(dv, lv) {
                        want.insert(k.clone(), dv.clone());
                        have.insert(k.clone(), lv.clone());
                    }
                }
            }
        }
    }
    (want, have)
}

/// The chain a change item's `<table>/<chain>` names.
fn chain_key(path: &str) -> Option<(Table, String)> {
    let (t, c) = path.split_once('/')?;
    let table = iptables::ALL_TABLES.into_iter().find(|x| x.name() == t)?;
    Some((table, c.to_string()))
}

/// Whether the object named in a change item was desired identically in `last` and `now`
/// (then the kernel changed under us).
fn unchanged_since(last: &DesiredDataplane, now: &DesiredDataplane, item: &str) -> bool {
    let mut words = item.split_whitespace();
    match (words.next(), words.next()) {
        (Some("chain"), Some(path)) => chain_key(path)
            .is_some_and(|key| now.chains.contains_key(&key) && last.chains.get(&key) == now.chains.get(&key)),
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
    fn should_find_what_changed_between_two_states_by_pointer_then_value() {
        let shared = Arc::new(1);
        let desired: BTreeMap<&str, Arc<i32>> = [
            ("a", Arc::clone(&shared)),
            ("b", Arc::new(2)),
            ("c", Arc::new(3)),
            ("e", Arc::new(5)),
        ]
        .into();
        let last: BTreeMap<&str, Arc<i32>> = [
            ("a", Arc::clone(&shared)),
            ("b", Arc::new(2)),
            ("c", Arc::new(30)),
            ("d", Arc::new(4)),
        ]
        .into();
        let (want, have) = changed_parts(&desired, &last);
        // Same pointer or same value: unchanged; changed, new and gone entries on their side.
        assert_eq!(want.keys().copied().collect::<Vec<_>>(), ["c", "e"]);
        assert_eq!(have.keys().copied().collect::<Vec<_>>(), ["c", "d"]);
        assert_eq!((*want["c"], *have["c"]), (3, 30));
        let (want, have) = changed_parts(&desired, &BTreeMap::new());
        assert_eq!((want.len(), have.len()), (4, 0));
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
        // The plain rewrite (make-before-break has its own tests).
        w.make_before_break = false;
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

    /// `desired()` plus a chain `WARREN-P` using set `warren-peers`, jumped to from WARREN-INPUT.
    fn desired_with_policy(peers: &[&str]) -> DesiredDataplane {
        let mut d = desired();
        d.ipsets.insert(
            "warren-peers".into(),
            Arc::new(IpSetSpec {
                kind: "hash:ip".into(),
                members: peers.iter().map(|p| p.to_string()).collect(),
            }),
        );
        d.chains.insert(
            (Table::Filter, "WARREN-P".into()),
            Arc::new(vec!["-m set --match-set warren-peers src -j ACCEPT".into()]),
        );
        Arc::make_mut(d.chains.get_mut(&(Table::Filter, "WARREN-INPUT".to_string())).unwrap())
            .insert(0, "-j WARREN-P".into());
        d
    }

    #[test]
    fn should_write_changes_make_before_break_and_tidy_later() {
        let mut w = writer();
        assert!(w.make_before_break, "the default with iptables-nft");
        let before = desired_with_policy(&["10.0.0.9"]);
        w.apply(&before, true).unwrap();
        w.read_back = false;
        let writes = w.runner().writes.lock().unwrap().len();

        // The policy goes: WARREN-INPUT changes, WARREN-P and warren-peers become stale.
        let mut after = desired();
        Arc::make_mut(
            after
                .chains
                .get_mut(&(Table::Filter, "WARREN-INPUT".to_string()))
                .unwrap(),
        )
        .push("-j DROP".into());
        let r = w.apply(&after, true).unwrap();
        assert_eq!(r.changed, vec!["chain filter/WARREN-INPUT".to_string()]);
        let batches = w.runner().writes.lock().unwrap()[writes..].to_vec();
        assert_eq!(batches.len(), 1, "{batches:?}");
        for del in ["-D ", "-F ", "-X ", ":WARREN-INPUT", "destroy"] {
            assert!(
                !batches[0].1.contains(del),
                "{del} on the latency path: {}",
                batches[0].1
            );
        }
        // New body, the RETURN, then the old body no packet reaches.
        let input = w.runner().rules("filter", "WARREN-INPUT").unwrap();
        let want = &after.chains[&(Table::Filter, "WARREN-INPUT".to_string())];
        assert_eq!(input.len(), want.len() + 1 + 3, "{input:#?}");
        for (got, want) in input.iter().zip(want.iter()) {
            assert!(got.ends_with(want.as_str()), "{got} vs {want}");
        }
        assert!(input[want.len()].ends_with("-j RETURN"));
        assert!(w.runner().rules("filter", "WARREN-P").is_some(), "kept until tidy");
        assert!(w.runner().set_members("warren-peers").is_some(), "kept until tidy");
        assert_eq!(w.untidy(), 3, "one dead tail, one stale chain, one stale set");

        let r = w.tidy().unwrap();
        assert!(
            r.changed.contains(&"chain filter/WARREN-P removed".to_string()),
            "{r:?}"
        );
        assert!(r.changed.contains(&"ipset warren-peers removed".to_string()), "{r:?}");
        let input = w.runner().rules("filter", "WARREN-INPUT").unwrap();
        assert_eq!(input.len(), want.len());
        assert!(w.runner().rules("filter", "WARREN-P").is_none());
        assert!(w.runner().set_members("warren-peers").is_none());
        assert_eq!(w.untidy(), 0);
        assert_eq!(w.tidy().unwrap(), ApplyReport::default(), "nothing left");
        w.read_back = true;
        assert_eq!(
            w.apply(&after, true).unwrap(),
            ApplyReport::default(),
            "kernel equals desired"
        );
    }

    #[test]
    fn should_not_count_leftovers_as_drift_and_diff_a_returning_set_against_its_old_members() {
        let mut w = writer();
        w.apply(&desired_with_policy(&["10.0.0.8", "10.0.0.9"]), true).unwrap();
        w.read_back = false;
        w.apply(&desired(), true).unwrap();
        // The set comes back before any tidy, with one member fewer: it must lose the other.
        let back = desired_with_policy(&["10.0.0.9"]);
        w.apply(&back, true).unwrap();
        assert_eq!(
            w.runner().set_members("warren-peers").unwrap(),
            ["10.0.0.9".to_string()].into()
        );
        // The resync reads back: dead tails rewritten, nothing reported as drift.
        w.read_back = true;
        let r = w.apply(&back, true).unwrap();
        assert!(r.changed.contains(&"chain filter/WARREN-INPUT".to_string()), "{r:?}");
        assert!(r.drifted.is_empty(), "{r:?}");
        assert_eq!(w.untidy(), 0);
        assert_eq!(w.runner().rules("filter", "WARREN-INPUT").unwrap().len(), 3);
        assert_eq!(w.apply(&back, true).unwrap(), ApplyReport::default());
    }

    #[test]
    fn should_rewrite_in_place_with_iptables_legacy() {
        let mut w = Writer::new(FakeKernel::new(), Backend::legacy());
        assert!(
            !w.make_before_break,
            "legacy replaces the whole table whatever is written"
        );
        w.apply(&desired_with_policy(&["10.0.0.9"]), true).unwrap();
        w.read_back = false;
        w.apply(&desired(), true).unwrap();
        assert_eq!(w.untidy(), 0);
        assert!(w.runner().rules("filter", "WARREN-P").is_none());
        assert_eq!(w.runner().rules("filter", "WARREN-INPUT").unwrap().len(), 2);
    }
}
