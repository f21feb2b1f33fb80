//! An in-memory kernel that answers `iptables-*-save/restore` and `ipset save/restore` the way the
//! real ones do for the subset warren uses, checks references (a rule naming a missing set or
//! chain is refused, a referenced set or chain cannot be destroyed) and can be told to fail.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::cmd::{CmdError, CommandRunner};

/// chain → (policy for built-ins, rules).
type Chains = BTreeMap<String, (Option<String>, Vec<String>)>;

#[derive(Debug, Clone, Default)]
struct State {
    /// table → chain → (policy for built-ins, rules).
    tables: BTreeMap<String, Chains>,
    sets: BTreeMap<String, (String, BTreeSet<String>)>,
}

/// Fault injection: the next matching command fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailFlags {
    pub iptables_restore: bool,
    pub ipset_restore: bool,
}

#[derive(Debug, Default)]
pub struct FakeKernel {
    state: Mutex<State>,
    pub fail_next: Mutex<FailFlags>,
    /// Every write (restore) command with its input, for assertions on batching.
    pub writes: Mutex<Vec<(String, String)>>,
    /// How many dumps (`*-save`, `ipset save`) were read.
    pub reads: std::sync::atomic::AtomicUsize,
}

fn builtins(table: &str) -> &'static [&'static str] {
    match table {
        "raw" => &["PREROUTING", "OUTPUT"],
        "mangle" => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
        "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        _ => &["INPUT", "FORWARD", "OUTPUT"],
    }
}

fn fail(program: &str, msg: impl Into<String>) -> CmdError {
    CmdError::Failed {
        program: program.to_string(),
        args: String::new(),
        status: "exit status: 1".into(),
        stderr: msg.into(),
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn word_after<'a>(spec: &'a str, opt: &str) -> Option<&'a str> {
    let mut it = spec.split_whitespace();
    while let Some(w) = it.next() {
        if w == opt {
            return it.next();
        }
    }
    None
}

impl FakeKernel {
    pub fn new() -> Self {
        Self::default()
    }

    fn table_mut<'a>(st: &'a mut State, t: &str) -> &'a mut Chains {
        st.tables.entry(t.to_string()).or_insert_with(|| {
            builtins(t)
                .iter()
                .map(|c| (c.to_string(), (Some("ACCEPT".to_string()), Vec::new())))
                .collect()
        })
    }

    /// Test hook: what an administrator or another tool would do.
    pub fn foreign(&self, table: &str, chain: &str, rule: Option<&str>) {
        let mut st = lock(&self.state);
        let t = Self::table_mut(&mut st, table);
        let c = t.entry(chain.to_string()).or_insert((None, Vec::new()));
        if let Some(r) = rule {
            c.1.push(r.to_string());
        }
    }

    pub fn flush_chain(&self, table: &str, chain: &str) {
        let mut st = lock(&self.state);
        if let Some(c) = Self::table_mut(&mut st, table).get_mut(chain) {
            c.1.clear();
        }
    }

    pub fn rules(&self, table: &str, chain: &str) -> Option<Vec<String>> {
        let mut st = lock(&self.state);
        Self::table_mut(&mut st, table).get(chain).map(|c| c.1.clone())
    }

    pub fn set_members(&self, name: &str) -> Option<BTreeSet<String>> {
        lock(&self.state).sets.get(name).map(|s| s.1.clone())
    }

    pub fn destroy_set_unchecked(&self, name: &str) {
        lock(&self.state).sets.remove(name);
    }

    fn save(&self, table: &str) -> String {
        let mut st = lock(&self.state);
        let t = Self::table_mut(&mut st, table);
        let mut out = format!("*{table}\n");
        for (name, (policy, _)) in t.iter() {
            out.push_str(&format!(":{name} {} [0:0]\n", policy.as_deref().unwrap_or("-")));
        }
        for (name, (_, rules)) in t.iter() {
            for r in rules {
                // The kernel prints comments without quotes when they need none.
                out.push_str(&format!("-A {name} {}\n", r.replace('"', "")));
            }
        }
        out.push_str("COMMIT\n");
        out
    }

    fn check_refs(st: &State, table: &Chains, spec: &str) -> Result<(), String> {
        if let Some(target) = word_after(spec, "-j") {
            if target.starts_with("WARREN-") && !table.contains_key(target) {
                return Err(format!("Couldn't load target `{target}'"));
            }
        }
        if let Some(set) = word_after(spec, "--match-set") {
            if !st.sets.contains_key(set) {
                return Err(format!("Set {set} doesn't exist."));
            }
        }
        Ok(())
    }

    fn restore(&self, input: &str) -> Result<(), String> {
        let mut st = lock(&self.state);
        let mut work = st.clone();
        let mut current: Option<String> = None;
        for (n, line) in input.lines().enumerate() {
            let line = line.trim();
            let lineno = n + 1;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(t) = line.strip_prefix('*') {
                Self::table_mut(&mut work, t);
                current = Some(t.to_string());
                continue;
            }
            let Some(tname) = current.clone() else {
                return Err(format!("line {lineno}: no table"));
            };
            if line == "COMMIT" {
                current = None;
                continue;
            }
            let snapshot = work.clone();
            let table = Self::table_mut(&mut work, &tname);
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default().to_string();
                let entry = table.entry(name).or_insert((None, Vec::new()));
                if entry.0.is_none() {
                    entry.1.clear();
                }
                continue;
            }
            let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            let err = |m: &str| format!("line {lineno}: {m}");
            match op {
                "-A" | "-I" => {
                    // `-I chain [N] rule`: N is 1-based, 1 when absent.
                    let numbered = spec
                        .split_once(' ')
                        .and_then(|(n, s)| Some((n.parse::<usize>().ok()?, s)));
                    let (pos, spec) = match numbered {
                        Some(x) if op == "-I" => x,
                        _ => (1, spec),
                    };
                    Self::check_refs(&snapshot, table, spec).map_err(|m| err(&m))?;
                    let c = table
                        .get_mut(chain)
                        .ok_or_else(|| err("No chain/target/match by that name"))?;
                    if op == "-A" {
                        c.1.push(spec.to_string());
                    } else {
                        if pos == 0 || pos > c.1.len() + 1 {
                            return Err(err("Index of insertion too big"));
                        }
                        c.1.insert(pos - 1, spec.to_string());
                    }
                }
                "-D" => {
                    let c = table.get_mut(chain).ok_or_else(|| err("No chain"))?;
                    let want = spec.replace('"', "");
                    let pos = c.1.iter().position(|r| r.replace('"', "") == want);
                    let pos = pos.ok_or_else(|| err("Bad rule (does a matching rule exist in that chain?)"))?;
                    c.1.remove(pos);
                }
                "-F" => table.get_mut(chain).ok_or_else(|| err("No chain"))?.1.clear(),
                "-X" => {
                    let used = table
                        .values()
                        .any(|(_, rules)| rules.iter().any(|r| word_after(r, "-j") == Some(chain)));
                    if used {
                        return Err(err("Too many links"));
                    }
                    table.remove(chain).ok_or_else(|| err("No chain"))?;
                }
                _ => return Err(err("unknown command")),
            }
        }
        *st = work;
        Ok(())
    }

    fn ipset_save(&self) -> String {
        let st = lock(&self.state);
        let mut out = String::new();
        for (name, (kind, members)) in &st.sets {
            if kind == super::ipset::LIST_SET {
                out.push_str(&format!("create {name} {kind} size 8\n"));
            } else {
                out.push_str(&format!(
                    "create {name} {kind} family inet hashsize 1024 maxelem 65536\n"
                ));
            }
            for m in members {
                out.push_str(&format!("add {name} {m}\n"));
            }
        }
        out
    }

    fn ipset_restore(&self, input: &str) -> Result<(), String> {
        let mut st = lock(&self.state);
        for (n, line) in input.lines().enumerate() {
            let err = |m: &str| format!("Error in line {}: {m}", n + 1);
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [] => {}
                ["create", name, kind, ..] => {
                    if let Some((k, _)) = st.sets.get(*name) {
                        if k != kind {
                            return Err(err("Set cannot be created: set with the same name already exists"));
                        }
                    } else {
                        st.sets.insert(name.to_string(), (kind.to_string(), BTreeSet::new()));
                    }
                }
                ["add", name, member @ ..] => {
                    let kind = st
                        .sets
                        .get(*name)
                        .map(|s| s.0.clone())
                        .ok_or_else(|| err("The set with the given name does not exist"))?;
                    let m = super::ipset::normalize_member(&kind, &member.join(" "));
                    if kind == super::ipset::LIST_SET && !st.sets.contains_key(&m) {
                        return Err(err("Set to be added/deleted/tested as element does not exist."));
                    }
                    if let Some(set) = st.sets.get_mut(*name) {
                        set.1.insert(m);
                    }
                }
                ["del", name, member @ ..] => {
                    let set = st
                        .sets
                        .get_mut(*name)
                        .ok_or_else(|| err("The set with the given name does not exist"))?;
                    let m = super::ipset::normalize_member(&set.0, &member.join(" "));
                    set.1.remove(&m);
                }
                ["destroy", name] => {
                    let used = st
                        .tables
                        .values()
                        .flat_map(|t| t.values())
                        .any(|(_, rules)| rules.iter().any(|r| word_after(r, "--match-set") == Some(name)))
                        || st
                            .sets
                            .values()
                            .any(|(kind, members)| kind == super::ipset::LIST_SET && members.contains(*name));
                    if used {
                        return Err(err("Set cannot be destroyed: it is in use by a kernel component"));
                    }
                    st.sets.remove(*name);
                }
                ["rename", from, to] => {
                    let s = st.sets.remove(*from).ok_or_else(|| err("no such set"))?;
                    st.sets.insert(to.to_string(), s);
                }
                _ => return Err(err("unsupported command")),
            }
        }
        Ok(())
    }
}

impl CommandRunner for FakeKernel {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CmdError> {
        let input = stdin.unwrap_or_default();
        if program.ends_with("-save") || (program == "ipset" && args.first() == Some(&"save")) {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if program.ends_with("-save") {
            return Ok(match args.windows(2).find(|w| w[0] == "-t") {
                Some(w) => self.save(w[1]),
                None => ["raw", "mangle", "nat", "filter"]
                    .iter()
                    .map(|t| self.save(t))
                    .collect(),
            });
        }
        if program.ends_with("-restore") {
            self.writes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((program.to_string(), input.to_string()));
            let mut flags = self.fail_next.lock().unwrap_or_else(|p| p.into_inner());
            if std::mem::take(&mut flags.iptables_restore) {
                return Err(fail(program, "injected failure"));
            }
            drop(flags);
            return self.restore(input).map(|_| String::new()).map_err(|m| fail(program, m));
        }
        if program == "ipset" {
            return match args.first() {
                Some(&"save") => Ok(self.ipset_save()),
                Some(&"restore") => {
                    self.writes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((program.to_string(), input.to_string()));
                    let mut flags = self.fail_next.lock().unwrap_or_else(|p| p.into_inner());
                    if std::mem::take(&mut flags.ipset_restore) {
                        return Err(fail(program, "injected failure"));
                    }
                    drop(flags);
                    self.ipset_restore(input)
                        .map(|_| String::new())
                        .map_err(|m| fail(program, m))
                }
                _ => Err(fail(program, "unsupported")),
            };
        }
        if program == "iptables" {
            return Ok("iptables v1.8.9 (nf_tables)\n".into());
        }
        Err(fail(program, "not in the fake"))
    }
}
