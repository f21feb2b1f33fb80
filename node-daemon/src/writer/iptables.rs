//! Pure iptables planning: read back `iptables-save` (warren's chains by their prefix, its hooks
//! by the hash comment on each), compare with the desired chains, and render one
//! `iptables-restore --noflush` batch per table that rewrites only what differs.
//!
//! Two ways to tell whether one of warren's chains holds what it should ([`ChainMarks`]): a hash
//! comment on every rule (iptables-nft, where a comment is a few bytes of rule userdata), or the
//! rules' text (iptables-legacy, where every comment is a 256-byte match that each write copies
//! out of the kernel and back in, with the rest of the table).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use conf::dataplane::{Hook, Table};
use conf::names::{CHAIN_PREFIX, RULE_COMMENT_PREFIX};
use sha1::{Digest, Sha1};

pub const ALL_TABLES: [Table; 4] = [Table::Raw, Table::Mangle, Table::Nat, Table::Filter];

/// One rule as `iptables-save` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    /// Everything after `-A <chain> `, usable verbatim with `-D <chain>`.
    pub spec: String,
    /// The hash of a `warren:<hash>` comment, if the rule has one.
    pub hash: Option<String>,
}

/// A table as read back: every chain (built-in or not) with its rules, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub chains: BTreeMap<String, Vec<SavedRule>>,
}

pub fn is_ours(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// Extracts the value of the `--comment` option if it is one of warren's.
fn comment_hash(spec: &str) -> Option<String> {
    let idx = spec.find("--comment ")?;
    let rest = &spec[idx + "--comment ".len()..];
    let value = if let Some(stripped) = rest.strip_prefix('"') {
        &stripped[..stripped.find('"')?]
    } else {
        rest.split_whitespace().next()?
    };
    let tagged = value.strip_prefix(RULE_COMMENT_PREFIX)?;
    // A rule's own comment follows the hash in the same comment (see `tagged`).
    Some(tagged.split(' ').next().unwrap_or(tagged).to_string())
}

/// Parses the output of `iptables-save -t <table>`. Unknown lines are ignored: only chain names
/// and our hashes matter.
pub fn parse_save(text: &str) -> SavedTable {
    let mut t = SavedTable::default();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                t.chains.entry(name.to_string()).or_default();
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            let rule = SavedRule {
                spec: spec.to_string(),
                hash: comment_hash(spec),
            };
            t.chains.entry(chain.to_string()).or_default().push(rule);
        }
    }
    t
}

/// Parses a whole `iptables-save` (every table) into its tables by name.
pub fn parse_save_all(text: &str) -> BTreeMap<String, SavedTable> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            current = Some((name.trim().to_string(), String::new()));
        } else if line == "COMMIT" {
            if let Some((name, body)) = current.take() {
                out.insert(name, parse_save(&body));
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// The hashes of a chain's rules; each depends on the chain name and its predecessor, so a rule
/// moved, removed or edited changes the list (Calico's `RuleHashes` idea).
pub fn rule_hashes(chain: &str, rules: &[String]) -> Vec<String> {
    let mut prev = String::new();
    rules
        .iter()
        .map(|r| {
            prev = short_hash(&[chain, &prev, r]);
            prev.clone()
        })
        .collect()
}

pub fn hook_hash(hook: &Hook) -> String {
    short_hash(&["hook", hook.table.name(), &hook.chain, &hook.rule])
}

fn comment(hash: &str) -> String {
    format!("-m comment --comment \"{RULE_COMMENT_PREFIX}{hash}\"")
}

/// What the kernel holds for a comment: 255 bytes and a NUL (`XT_MAX_COMMENT_LEN`).
const MAX_COMMENT_LEN: usize = 255;

const COMMENT_OPT: &str = "-m comment --comment ";

/// A rule's own comment: the text before the option, the comment's value, and the text after it.
fn split_comment(rule: &str) -> Option<(&str, &str, &str)> {
    let at = rule.find(COMMENT_OPT)?;
    let rest = &rule[at + COMMENT_OPT.len()..];
    let (own, after) = match rest.strip_prefix('"') {
        Some(q) => {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        }
        None => {
            let end = rest.find(' ').unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        }
    };
    Some((&rule[..at], own, after))
}

/// A desired rule with warren's hash comment. A rule that has a comment of its own (a policy
/// rule's `ns/name ingress 0`) gets the hash put in front of it, in the same comment: every
/// comment match is 256 bytes in the kernel, and with iptables-legacy, which copies the whole
/// table out and back in on every write, a second one per rule was a third of an edit's cost
/// at 1 000 policies.
fn tagged(hash: &str, rule: &str) -> String {
    let Some((before, own, after)) = split_comment(rule) else {
        return format!("{} {rule}", comment(hash));
    };
    let mut merged = format!("{RULE_COMMENT_PREFIX}{hash} {own}");
    if merged.len() > MAX_COMMENT_LEN {
        let mut cut = MAX_COMMENT_LEN;
        while !merged.is_char_boundary(cut) {
            cut -= 1;
        }
        merged.truncate(cut);
    }
    format!("{before}{COMMENT_OPT}\"{merged}\"{after}")
}

/// How warren's own chains are marked in the kernel and recognised when read back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChainMarks {
    /// Every rule carries `warren:<hash>` (chained, so order counts); a chain is right when
    /// its hashes are. A rule's own comment shares that comment.
    #[default]
    Hashes,
    /// No hashes: a chain keeps only the first of its rules' own comments (a policy chain
    /// still names its policy) and is right when its rules' text is what warren wrote. With
    /// iptables-legacy each comment is a 256-byte match that every write copies out of the
    /// kernel and back in with the whole table: at 1 000 policies, one per rule was a quarter
    /// of a policy edit's time.
    Content,
}

/// The rules of a chain as written with [`ChainMarks::Content`]: own comments after the
/// chain's first one dropped.
pub fn content_rules(rules: &[String]) -> Vec<String> {
    let mut named = false;
    rules
        .iter()
        .map(|r| match split_comment(r) {
            Some(_) if !named => {
                named = true;
                r.clone()
            }
            Some((before, _, after)) => {
                let (before, after) = (before.trim_end(), after.trim_start());
                match (before.is_empty(), after.is_empty()) {
                    (true, _) => after.to_string(),
                    (false, true) => before.to_string(),
                    (false, false) => format!("{before} {after}"),
                }
            }
            None => r.clone(),
        })
        .collect()
}

fn fingerprint<'a>(lines: impl Iterator<Item = &'a str>) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    for l in lines {
        l.hash(&mut h);
    }
    h.finish()
}

/// What the writer knows, for one table, about how `iptables-save` prints the chains it wrote
/// with [`ChainMarks::Content`]. The save shows a rule in its own canonical form
/// (`-p tcp -m tcp --dport 80`, `-s 10.0.0.1/32`, `-p ipencap`), which need not be the text
/// warren wrote, and which differs between iptables versions. So a chain read back for the
/// first time after warren wrote it is taken as it reads, and from then on it must read the
/// same: a rule someone replaced, added or removed is drift.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainForms {
    pub marks: ChainMarks,
    /// Per chain: (fingerprint of the rules warren wrote, fingerprint of the rules as read).
    printed: BTreeMap<String, (u64, u64)>,
    /// Chains written and not read back since, with the fingerprint of the rules written.
    unread: BTreeMap<String, u64>,
}

impl ChainForms {
    pub fn new(marks: ChainMarks) -> Self {
        Self {
            marks,
            ..Self::default()
        }
    }

    /// Takes in what a plan learned and wrote. `read_back`: the plan was made against the kernel
    /// read back, holding `desired` (the table's desired chains): every chain has been read.
    pub fn record(&mut self, plan: &TablePlan, written: bool, read_back: Option<&dyn Fn(&str) -> bool>) {
        if let Some(desired) = read_back {
            self.unread.clear();
            self.printed.retain(|c, _| desired(c));
        }
        for (chain, fp) in &plan.learned {
            self.printed.insert(chain.clone(), *fp);
        }
        if written {
            for (chain, fp) in &plan.written {
                self.printed.remove(chain);
                self.unread.insert(chain.clone(), *fp);
            }
        }
    }

    /// Whether `saved` is what warren wrote as `want`.
    fn holds(
        &self,
        chain: &str,
        want: &[String],
        saved: &[SavedRule],
        learned: &mut Vec<(String, (u64, u64))>,
    ) -> bool {
        if saved.len() != want.len() {
            return false;
        }
        if saved.iter().zip(want).all(|(s, w)| s.spec == *w) {
            return true;
        }
        let fp = (
            fingerprint(want.iter().map(String::as_str)),
            fingerprint(saved.iter().map(|s| s.spec.as_str())),
        );
        if self.printed.get(chain) == Some(&fp) {
            return true;
        }
        // Read for the first time since warren wrote it: the save's form of what was written,
        // but only while warren still wants what it wrote. Rules changed since (a policy edit
        // that keeps the rule count) are no print form: compared against the last apply instead
        // of the kernel, they would otherwise be taken as written and never reach it.
        if self.unread.get(chain) == Some(&fp.0) {
            learned.push((chain.to_string(), fp));
            return true;
        }
        false
    }
}

/// The table as an earlier apply of `written` left it, as far as warren's planning looks: its
/// chains with their rule hashes, and its hooks at the top of the built-in chains.
pub fn as_written(
    table: Table,
    chains: &BTreeMap<(Table, String), Arc<Vec<String>>>,
    hooks: &BTreeSet<Hook>,
    marks: ChainMarks,
) -> SavedTable {
    let mut t = SavedTable::default();
    for ((tt, chain), rules) in chains {
        if *tt != table {
            continue;
        }
        let saved = match marks {
            ChainMarks::Hashes => rule_hashes(chain, rules)
                .into_iter()
                .map(|h| SavedRule {
                    spec: String::new(),
                    hash: Some(h),
                })
                .collect(),
            ChainMarks::Content => content_rules(rules)
                .into_iter()
                .map(|spec| SavedRule { spec, hash: None })
                .collect(),
        };
        t.chains.insert(chain.clone(), saved);
    }
    for h in hooks.iter().filter(|h| h.table == table) {
        let hash = hook_hash(h);
        let rule = SavedRule {
            // Enough for `-D <chain> <spec>`, which matches a rule by its content.
            spec: format!("{} {}", comment(&hash), h.rule),
            hash: Some(hash),
        };
        let rules = t.chains.entry(h.chain.clone()).or_default();
        if h.first {
            rules.insert(0, rule);
        } else {
            rules.push(rule);
        }
    }
    t
}

/// What to do with one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablePlan {
    /// The `iptables-restore --noflush` input; empty when the table is already right.
    pub restore: String,
    /// Human names of what changes (for logs and drift accounting).
    pub changed: Vec<String>,
    /// The chains the restore creates or rewrites, with the fingerprint of the rules written.
    pub written: Vec<(String, u64)>,
    /// With [`ChainMarks::Content`]: how chains written earlier and read back now print
    /// (for [`ChainForms::record`]).
    pub learned: Vec<(String, (u64, u64))>,
}

/// Plans one table. `sweep` allows removing warren chains and hooks that are no longer desired
/// (only after the first full sync, so a restart never opens a window).
pub fn plan_table<R: Borrow<Vec<String>>>(
    table: Table,
    desired: &BTreeMap<String, R>,
    hooks: &[&Hook],
    actual: &SavedTable,
    sweep: bool,
    forms: &ChainForms,
) -> TablePlan {
    let mut decls = Vec::new();
    let mut body = Vec::new();
    let mut changed = Vec::new();
    let mut written = Vec::new();
    let mut learned = Vec::new();
    let tname = table.name();

    for (chain, rules) in desired {
        let rules: &Vec<String> = rules.borrow();
        let saved = actual.chains.get(chain);
        let lines = match forms.marks {
            ChainMarks::Hashes => {
                let hashes = rule_hashes(chain, rules);
                let same = saved.is_some_and(|saved| {
                    saved.len() == hashes.len() && saved.iter().zip(&hashes).all(|(s, h)| s.hash.as_deref() == Some(h))
                });
                if same {
                    continue;
                }
                rules.iter().zip(&hashes).map(|(r, h)| tagged(h, r)).collect()
            }
            ChainMarks::Content => {
                let want = content_rules(rules);
                if saved.is_some_and(|saved| forms.holds(chain, &want, saved, &mut learned)) {
                    continue;
                }
                want
            }
        };
        // Declaring a chain in a --noflush restore creates it or flushes it: the rewrite is atomic.
        decls.push(format!(":{chain} - [0:0]"));
        written.push((chain.clone(), fingerprint(lines.iter().map(String::as_str))));
        body.extend(lines.into_iter().map(|l| format!("-A {chain} {l}")));
        changed.push(format!("chain {tname}/{chain}"));
    }

    let wanted: BTreeMap<String, &Hook> = hooks.iter().map(|h| (hook_hash(h), *h)).collect();
    let mut present: BTreeSet<String> = BTreeSet::new();
    let mut hook_deletes = Vec::new();
    for (chain, rules) in &actual.chains {
        if is_ours(chain) {
            continue;
        }
        // A hook that must come first is out of place when someone else's rule precedes it
        // (their DROP/ACCEPT would decide before warren): it is deleted and inserted again.
        let mut foreign_before = false;
        for r in rules {
            let Some(hash) = &r.hash else {
                foreign_before = true;
                continue;
            };
            let misplaced = foreign_before && wanted.get(hash).is_some_and(|h| h.first);
            let keep = if misplaced {
                false
            } else if wanted.contains_key(hash) {
                // A second copy of a hook is ours and redundant.
                present.insert(hash.clone())
            } else {
                !sweep
            };
            if !keep {
                hook_deletes.push(format!("-D {chain} {}", r.spec));
                if !misplaced {
                    changed.push(format!("hook {tname}/{chain} removed"));
                }
            }
        }
    }
    let mut hook_inserts = Vec::new();
    for (hash, hook) in &wanted {
        if present.contains(hash) {
            continue;
        }
        let line = if hook.first {
            format!("-I {} 1 {} {}", hook.chain, comment(hash), hook.rule)
        } else {
            format!("-A {} {} {}", hook.chain, comment(hash), hook.rule)
        };
        hook_inserts.push(line);
        changed.push(format!("hook {tname}/{} {}", hook.chain, hook.rule));
    }

    let mut stale = Vec::new();
    if sweep {
        for chain in actual.chains.keys() {
            if is_ours(chain) && !desired.contains_key(chain) {
                stale.push(chain.clone());
                changed.push(format!("chain {tname}/{chain} removed"));
            }
        }
    }

    if changed.is_empty() {
        return TablePlan {
            learned,
            ..TablePlan::default()
        };
    }
    let mut out = format!("*{tname}\n");
    for l in decls.iter().chain(&body).chain(&hook_deletes).chain(&hook_inserts) {
        out.push_str(l);
        out.push('\n');
    }
    // Stale chains may jump to each other: empty them all before deleting any.
    for c in &stale {
        out.push_str(&format!("-F {c}\n"));
    }
    for c in &stale {
        out.push_str(&format!("-X {c}\n"));
    }
    out.push_str("COMMIT\n");
    TablePlan {
        restore: out,
        changed,
        written,
        learned,
    }
}

/// The unconditional RETURN that ends a body inserted by [`plan_inserts`]: what follows it is the
/// chain's previous body, which no packet reaches any more.
fn end_rule(chain: &str, hashes: &[String]) -> String {
    let hash = short_hash(&["end", chain, hashes.last().map_or("", String::as_str)]);
    format!("{} -j RETURN", comment(&hash))
}

/// Make-before-break rewrite of the `desired` chains (only those that changed): a chain the
/// kernel holds already (`exists`) gets its new body inserted on top, ended by an unconditional
/// RETURN, so from the commit on no packet reaches the old rules below; new chains are created.
/// Nothing is deleted: on this kernel any nf_tables transaction that deletes a rule costs
/// 15–25 ms, one that only adds ~1 ms. The dead tails are removed later by a full rewrite
/// ([`plan_table`], off the latency path). For a user chain, falling off the end is RETURN, so
/// the inserted body with its RETURN means exactly what the desired chain means.
pub fn plan_inserts<R: Borrow<Vec<String>>>(
    table: Table,
    desired: &BTreeMap<String, R>,
    exists: &dyn Fn(&str) -> bool,
) -> TablePlan {
    let tname = table.name();
    let mut decls = Vec::new();
    let mut appends = Vec::new();
    let mut inserts = Vec::new();
    let mut changed = Vec::new();
    let mut written = Vec::new();
    for (chain, rules) in desired {
        let rules: &Vec<String> = rules.borrow();
        let hashes = rule_hashes(chain, rules);
        let lines = rules.iter().zip(&hashes).map(|(r, h)| tagged(h, r));
        written.push((chain.clone(), fingerprint(rules.iter().map(String::as_str))));
        if exists(chain) {
            // Inserted at the head in reverse order. Without a rule number iptables-nft needs no
            // rule cache for the chain (measured: 4 ms less per batch, more in a large table).
            inserts.push(format!("-I {chain} {}", end_rule(chain, &hashes)));
            let mut body: Vec<String> = lines.map(|l| format!("-I {chain} {l}")).collect();
            body.reverse();
            inserts.extend(body);
        } else {
            decls.push(format!(":{chain} - [0:0]"));
            appends.extend(lines.map(|l| format!("-A {chain} {l}")));
        }
        changed.push(format!("chain {tname}/{chain}"));
    }
    if changed.is_empty() {
        return TablePlan::default();
    }
    // New chains first: a rewritten chain may jump to one.
    let mut out = format!("*{tname}\n");
    for l in decls.iter().chain(&appends).chain(&inserts) {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    TablePlan {
        restore: out,
        changed,
        written,
        learned: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_split_a_dump_of_every_table() {
        let text = "# Generated by iptables-nft-save\n*nat\n:POSTROUTING ACCEPT [0:0]\n:WARREN-X - [0:0]\n\
                    -A WARREN-X -j MASQUERADE\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n\
                    -A INPUT -m comment --comment warren:abc -j WARREN-INPUT\nCOMMIT\n";
        let all = parse_save_all(text);
        assert_eq!(all.keys().collect::<Vec<_>>(), ["filter", "nat"]);
        assert_eq!(all["nat"].chains["WARREN-X"].len(), 1);
        assert_eq!(all["filter"].chains["INPUT"][0].hash.as_deref(), Some("abc"));
    }

    #[test]
    fn should_share_one_comment_between_the_hash_and_a_rules_own() {
        let rule = "-p tcp -m comment --comment \"a/web ingress 0\" -m tcp --dport 80 -g WARREN-ALLOW";
        let t = tagged("0123456789abcdef", rule);
        assert_eq!(
            t,
            "-p tcp -m comment --comment \"warren:0123456789abcdef a/web ingress 0\" -m tcp --dport 80 -g WARREN-ALLOW"
        );
        assert_eq!(t.matches("--comment").count(), 1);
        assert_eq!(comment_hash(&t).as_deref(), Some("0123456789abcdef"));
        // Unquoted, as iptables-save prints a comment without spaces.
        let bare = tagged("ab", "-m comment --comment probes -j ACCEPT");
        assert_eq!(bare, "-m comment --comment \"warren:ab probes\" -j ACCEPT");
        // No comment of its own: the hash comes first, alone.
        assert_eq!(tagged("ab", "-j DROP"), "-m comment --comment \"warren:ab\" -j DROP");
        // The kernel keeps 255 bytes of a comment: a long policy name is cut, not refused.
        let long = format!(
            "-m comment --comment \"{}/{} ingress 0\" -j ACCEPT",
            "n".repeat(63),
            "é".repeat(120)
        );
        let t = tagged("0123456789abcdef", &long);
        let value = t.split('"').nth(1).unwrap();
        assert!(
            value.len() <= 255 && value.starts_with("warren:0123456789abcdef nnn"),
            "{value}"
        );
        assert!(t.ends_with("\" -j ACCEPT"));
    }

    /// Plans a table where warren wants no chains, only the hook `h`, against `saved`.
    fn plan_hooks_only(h: &Hook, saved: &str) -> TablePlan {
        plan_table(
            Table::Filter,
            &BTreeMap::<String, Vec<String>>::new(),
            &[h],
            &parse_save(saved),
            false,
            &ChainForms::default(),
        )
    }

    fn hook(chain: &str, rule: &str) -> Hook {
        Hook {
            table: Table::Filter,
            chain: chain.into(),
            rule: rule.into(),
            first: true,
        }
    }

    fn desired() -> BTreeMap<String, Vec<String>> {
        let mut d = BTreeMap::new();
        d.insert(
            "WARREN-INPUT".to_string(),
            vec!["-p 4 -j DROP".to_string(), "-j RETURN".to_string()],
        );
        d
    }

    fn saved_from(plan: &TablePlan, base: &str) -> SavedTable {
        // Emulates the kernel for a from-scratch plan: the save shows what the restore wrote.
        let mut t = parse_save(base);
        for l in plan.restore.lines() {
            let saved = |spec: &str| parse_save(&format!("-A X {}", spec.replace('"', ""))).chains["X"][0].clone();
            if let Some(decl) = l.strip_prefix(':') {
                t.chains
                    .insert(decl.split_whitespace().next().unwrap().to_string(), Vec::new());
            } else if let Some(rest) = l.strip_prefix("-I ") {
                let (chain, rest) = rest.split_once(' ').unwrap();
                let spec = rest.strip_prefix("1 ").unwrap();
                t.chains.entry(chain.to_string()).or_default().insert(0, saved(spec));
            } else if let Some(rest) = l.strip_prefix("-A ") {
                let (chain, spec) = rest.split_once(' ').unwrap();
                t.chains.entry(chain.to_string()).or_default().push(saved(spec));
            }
        }
        t
    }

    #[test]
    fn should_write_everything_into_an_empty_table_then_nothing() {
        let h = hook("INPUT", "-j WARREN-INPUT");
        let base = ":INPUT ACCEPT [0:0]\n-A INPUT -s 1.2.3.4/32 -j ACCEPT\n";
        let plan = plan_table(
            Table::Filter,
            &desired(),
            &[&h],
            &parse_save(base),
            false,
            &ChainForms::default(),
        );
        assert!(
            plan.restore.starts_with("*filter\n:WARREN-INPUT - [0:0]\n"),
            "{}",
            plan.restore
        );
        assert!(plan.restore.contains("-I INPUT 1 -m comment --comment \"warren:"));
        assert!(plan.restore.ends_with("COMMIT\n"));
        let after = saved_from(&plan, base);
        let again = plan_table(Table::Filter, &desired(), &[&h], &after, true, &ChainForms::default());
        assert_eq!(again, TablePlan::default(), "second apply must be a no-op");
    }

    #[test]
    fn should_rewrite_only_a_chain_whose_rules_differ() {
        let h = hook("INPUT", "-j WARREN-INPUT");
        let plan = plan_table(
            Table::Filter,
            &desired(),
            &[&h],
            &SavedTable::default(),
            false,
            &ChainForms::default(),
        );
        let mut after = saved_from(&plan, ":INPUT ACCEPT [0:0]\n");
        after.chains.get_mut("WARREN-INPUT").unwrap().clear(); // someone ran iptables -F
        let repair = plan_table(Table::Filter, &desired(), &[&h], &after, false, &ChainForms::default());
        assert_eq!(repair.changed, vec!["chain filter/WARREN-INPUT".to_string()]);
        assert!(!repair.restore.contains("INPUT 1"), "hook must not be inserted twice");
    }

    #[test]
    fn should_sweep_stale_chains_and_hooks_only_when_allowed() {
        let text = ":INPUT ACCEPT [0:0]\n:WARREN-OLD - [0:0]\n:FOREIGN - [0:0]\n\
                    -A INPUT -m comment --comment warren:deadbeef -j WARREN-OLD\n\
                    -A INPUT -m comment --comment other -j FOREIGN\n-A WARREN-OLD -j ACCEPT\n";
        let actual = parse_save(text);
        let none = BTreeMap::<String, Vec<String>>::new();
        assert_eq!(
            plan_table(Table::Filter, &none, &[], &actual, false, &ChainForms::default()),
            TablePlan::default()
        );
        let plan = plan_table(Table::Filter, &none, &[], &actual, true, &ChainForms::default());
        assert_eq!(
            plan.restore,
            "*filter\n-D INPUT -m comment --comment warren:deadbeef -j WARREN-OLD\n-F WARREN-OLD\n-X WARREN-OLD\nCOMMIT\n"
        );
        assert!(!plan.restore.contains("FOREIGN"));
    }

    #[test]
    fn should_remove_duplicate_hooks() {
        let h = hook("FORWARD", "-j WARREN-FORWARD");
        let hash = hook_hash(&h);
        let text = format!(
            ":FORWARD ACCEPT [0:0]\n-A FORWARD -m comment --comment warren:{hash} -j WARREN-FORWARD\n\
             -A FORWARD -m comment --comment \"warren:{hash}\" -j WARREN-FORWARD\n"
        );
        let plan = plan_hooks_only(&h, &text);
        assert_eq!(plan.restore.matches("-D FORWARD").count(), 1, "{}", plan.restore);
        assert!(!plan.restore.contains("-I FORWARD"));
    }

    #[test]
    fn should_move_a_first_hook_back_above_a_foreign_rule() {
        let h = hook("INPUT", "-j WARREN-INPUT");
        let hash = hook_hash(&h);
        let text = format!(
            ":INPUT ACCEPT [0:0]\n-A INPUT -s 10.0.0.1/32 -j DROP\n\
             -A INPUT -m comment --comment warren:{hash} -j WARREN-INPUT\n"
        );
        let plan = plan_hooks_only(&h, &text);
        let lines: Vec<&str> = plan.restore.lines().collect();
        assert!(
            lines[1].starts_with("-D INPUT -m comment --comment warren:"),
            "{}",
            plan.restore
        );
        assert!(lines[2].starts_with("-I INPUT 1 "), "{}", plan.restore);
        assert_eq!(plan.changed, vec!["hook filter/INPUT -j WARREN-INPUT".to_string()]);
        // In place (ours first, foreign after) is left alone.
        let text = format!(
            ":INPUT ACCEPT [0:0]\n-A INPUT -m comment --comment warren:{hash} -j WARREN-INPUT\n\
             -A INPUT -s 10.0.0.1/32 -j DROP\n"
        );
        assert_eq!(plan_hooks_only(&h, &text), TablePlan::default());
    }

    #[test]
    fn should_chain_hashes_so_order_matters() {
        let a = rule_hashes("WARREN-X", &["-j A".into(), "-j B".into()]);
        let b = rule_hashes("WARREN-X", &["-j B".into(), "-j A".into()]);
        let c = rule_hashes("WARREN-Y", &["-j A".into(), "-j B".into()]);
        assert_ne!(a, b);
        assert_ne!(a[0], c[0]);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn should_insert_new_bodies_on_top_and_create_new_chains_first() {
        let mut want = BTreeMap::new();
        want.insert(
            "WARREN-OLD".to_string(),
            vec!["-j WARREN-NEW".to_string(), "-j DROP".to_string()],
        );
        want.insert("WARREN-NEW".to_string(), vec!["-j ACCEPT".to_string()]);
        let plan = plan_inserts(Table::Filter, &want, &|c| c == "WARREN-OLD");
        let lines: Vec<&str> = plan.restore.lines().collect();
        let hashes = rule_hashes("WARREN-OLD", &want["WARREN-OLD"]);
        assert_eq!(lines[0], "*filter");
        assert_eq!(lines[1], ":WARREN-NEW - [0:0]");
        assert!(lines[2].starts_with("-A WARREN-NEW -m comment") && lines[2].ends_with("-j ACCEPT"));
        // Read top-down after the batch: body in order, then the RETURN that hides the old body.
        assert!(lines[3].starts_with("-I WARREN-OLD -m comment ") && lines[3].ends_with(" -j RETURN"));
        assert!(
            lines[4].ends_with(&format!("warren:{}\" -j DROP", hashes[1])),
            "{}",
            lines[4]
        );
        assert!(
            lines[5].ends_with(&format!("warren:{}\" -j WARREN-NEW", hashes[0])),
            "{}",
            lines[5]
        );
        assert_eq!(lines[6], "COMMIT");
        assert!(
            !plan.restore.contains("-D ") && !plan.restore.contains("-F ") && !plan.restore.contains(":WARREN-OLD")
        );
        assert_eq!(plan.changed.len(), 2);
        let none: BTreeMap<String, Vec<String>> = BTreeMap::new();
        assert_eq!(plan_inserts(Table::Filter, &none, &|_| true), TablePlan::default());
    }

    #[test]
    fn should_keep_only_a_chains_first_own_comment_in_content_marks() {
        let rules: Vec<String> = vec![
            "-j WARREN-X".into(),
            "-p tcp -m comment --comment \"a/web ingress 0\" -m tcp --dport 80 -g WARREN-ALLOW".into(),
            "-m comment --comment \"a/web ingress 1\" -m set --match-set s src -g WARREN-ALLOW".into(),
            "-p udp -m comment --comment bare".into(),
        ];
        assert_eq!(
            content_rules(&rules),
            [
                "-j WARREN-X",
                "-p tcp -m comment --comment \"a/web ingress 0\" -m tcp --dport 80 -g WARREN-ALLOW",
                "-m set --match-set s src -g WARREN-ALLOW",
                "-p udp",
            ]
        );
    }

    /// With content marks a chain is compared by its rules' text: what the save prints the
    /// same way is right at once; what it prints its own way is learned the first time the
    /// chain is read back after warren wrote it, and must read the same afterwards.
    #[test]
    fn should_compare_chains_by_content_and_learn_how_the_save_prints_them() {
        let mut want = BTreeMap::new();
        want.insert(
            "WARREN-P".to_string(),
            vec![
                "-m comment --comment \"a/web ingress 0\" -m set --match-set s src -g WARREN-ALLOW".to_string(),
                "-p tcp --dport 80 -m comment --comment \"a/web ingress 1\" -g WARREN-ALLOW".to_string(),
            ],
        );
        let mut forms = ChainForms::new(ChainMarks::Content);
        let plan = plan_table(Table::Filter, &want, &[], &SavedTable::default(), false, &forms);
        assert!(!plan.restore.contains("warren:"), "no hashes: {}", plan.restore);
        assert_eq!(plan.restore.matches("--comment").count(), 1, "{}", plan.restore);
        assert_eq!(
            plan.written.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            ["WARREN-P"]
        );
        forms.record(&plan, true, None);

        // The save prints the first rule as written, the second its own way (`-m tcp`).
        let printed = |second: &str| {
            parse_save(&format!(
                ":WARREN-P - [0:0]\n-A WARREN-P -m comment --comment \"a/web ingress 0\" -m set --match-set s src -g WARREN-ALLOW\n\
                 -A WARREN-P {second}\n"
            ))
        };
        let canonical = printed("-p tcp -m tcp --dport 80 -g WARREN-ALLOW");
        let desired_here = |c: &str| c == "WARREN-P";
        // Not yet read back since written: taken as it reads.
        let plan = plan_table(Table::Filter, &want, &[], &canonical, true, &forms);
        assert!(plan.restore.is_empty(), "{}", plan.restore);
        assert_eq!(plan.learned.len(), 1);
        forms.record(&plan, true, Some(&desired_here));
        // From now on it must read the same.
        let plan = plan_table(Table::Filter, &want, &[], &canonical, true, &forms);
        assert_eq!(plan, TablePlan::default());
        forms.record(&plan, true, Some(&desired_here));
        for drift in [
            printed("-p tcp -m tcp --dport 81 -g WARREN-ALLOW"),
            printed("-p tcp -m tcp --dport 80 -j ACCEPT"),
        ] {
            let plan = plan_table(Table::Filter, &want, &[], &drift, true, &forms);
            assert_eq!(plan.changed, ["chain filter/WARREN-P"], "a replaced rule is drift");
        }
        let mut short = canonical.clone();
        short.chains.get_mut("WARREN-P").unwrap().pop();
        let plan = plan_table(Table::Filter, &want, &[], &short, true, &forms);
        assert_eq!(plan.changed, ["chain filter/WARREN-P"], "a deleted rule is drift");
        // A writer that never wrote it (a restart) rewrites a chain that does not read as
        // written, once; one that reads exactly as written stays.
        let fresh = ChainForms::new(ChainMarks::Content);
        let plan = plan_table(Table::Filter, &want, &[], &canonical, false, &fresh);
        assert_eq!(
            plan.written.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            ["WARREN-P"]
        );
        let mut exact = want.clone();
        exact.insert(
            "WARREN-P".into(),
            vec!["-p tcp -m tcp --dport 80 -g WARREN-ALLOW".into()],
        );
        let as_is = parse_save(":WARREN-P - [0:0]\n-A WARREN-P -p tcp -m tcp --dport 80 -g WARREN-ALLOW\n");
        assert_eq!(
            plan_table(Table::Filter, &exact, &[], &as_is, false, &fresh),
            TablePlan::default()
        );
    }

    /// A chain written and not read back since is taken as the save prints it only while warren
    /// still wants what it wrote: rules changed since (a policy edit that keeps the rule count)
    /// are written, whether the plan compares against the kernel or against the last apply.
    #[test]
    fn should_write_a_chain_changed_since_it_was_written_before_any_read_back() {
        let chain = |port: u16| {
            let mut m = BTreeMap::new();
            m.insert(
                "WARREN-P".to_string(),
                vec![
                    "-m comment --comment \"a/web ingress 0\" -m set --match-set s src -g WARREN-ALLOW".to_string(),
                    format!("-p tcp -m tcp --dport {port} -g WARREN-ALLOW"),
                ],
            );
            m
        };
        let (old, new) = (chain(80), chain(20000));
        let mut forms = ChainForms::new(ChainMarks::Content);
        let plan = plan_table(Table::Filter, &old, &[], &SavedTable::default(), false, &forms);
        forms.record(&plan, true, None);

        // The kernel, read back, still holds the old rules...
        let kernel = parse_save(
            ":WARREN-P - [0:0]\n-A WARREN-P -m comment --comment \"a/web ingress 0\" -m set --match-set s src -g WARREN-ALLOW\n\
             -A WARREN-P -p tcp -m tcp --dport 80 -g WARREN-ALLOW\n",
        );
        let plan = plan_table(Table::Filter, &new, &[], &kernel, true, &forms);
        assert_eq!(plan.changed, ["chain filter/WARREN-P"]);
        assert!(plan.learned.is_empty(), "{:?}", plan.learned);
        // ...or the last apply stands for it, between resyncs.
        let last: BTreeMap<(Table, String), Arc<Vec<String>>> = old
            .iter()
            .map(|(c, r)| ((Table::Filter, c.clone()), Arc::new(r.clone())))
            .collect();
        let as_last = as_written(Table::Filter, &last, &BTreeSet::new(), ChainMarks::Content);
        let plan = plan_table(Table::Filter, &new, &[], &as_last, true, &forms);
        assert_eq!(plan.changed, ["chain filter/WARREN-P"]);
        assert!(plan.restore.contains("--dport 20000"), "{}", plan.restore);
        forms.record(&plan, true, None);

        // What was written last is still taken as it reads the first time.
        let printed = parse_save(
            ":WARREN-P - [0:0]\n-A WARREN-P -m comment --comment \"a/web ingress 0\" -m set --match-set s src -g WARREN-ALLOW\n\
             -A WARREN-P -p tcp -m tcp --dport 20000 -m comment --comment \"printed its own way\" -g WARREN-ALLOW\n",
        );
        let plan = plan_table(Table::Filter, &new, &[], &printed, true, &forms);
        assert!(plan.restore.is_empty(), "{}", plan.restore);
        assert_eq!(plan.learned.len(), 1);
    }
}
