//! Pure ipset planning: read back `ipset save` (only `warren-*` sets), compare with the desired
//! sets, and render an `ipset restore` script: creations and member changes before the iptables
//! batch, destructions after it (when no rule references the sets any more).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use conf::dataplane::IpSetSpec;
use conf::names::IPSET_PREFIX;
use sha1::{Digest, Sha1};

/// Normalises a member the way the kernel prints it back (hash:net shows a /32 as a bare address).
pub fn normalize_member(kind: &str, member: &str) -> String {
    let member = member.split_whitespace().collect::<Vec<_>>().join(" ");
    if kind.starts_with("hash:net") {
        let (addr, rest) = member.split_once(' ').map_or((member.as_str(), ""), |(a, r)| (a, r));
        let (first, tail) = addr.split_once(',').map_or((addr, None), |(a, t)| (a, Some(t)));
        let first = first.strip_suffix("/32").unwrap_or(first);
        let mut out = first.to_string();
        if let Some(t) = tail {
            out.push(',');
            out.push_str(t);
        }
        if !rest.is_empty() {
            out.push(' ');
            out.push_str(rest);
        }
        return out;
    }
    member
}

fn normalized(spec: &IpSetSpec) -> BTreeSet<String> {
    spec.members.iter().map(|m| normalize_member(&spec.kind, m)).collect()
}

/// Parses `ipset save`; sets not named with warren's prefix are skipped.
pub fn parse_save(text: &str) -> BTreeMap<String, Arc<IpSetSpec>> {
    let mut sets: BTreeMap<String, IpSetSpec> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("create"), Some(name)) if name.starts_with(IPSET_PREFIX) => {
                let kind = words.next().unwrap_or_default().to_string();
                sets.insert(
                    name.to_string(),
                    IpSetSpec {
                        kind,
                        members: BTreeSet::new(),
                    },
                );
            }
            (Some("add"), Some(name)) => {
                if let Some(set) = sets.get_mut(name) {
                    let member = words.collect::<Vec<_>>().join(" ");
                    let m = normalize_member(&set.kind, &member);
                    set.members.insert(m);
                }
            }
            _ => {}
        }
    }
    sets.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
}

/// Name of the temporary set used to replace a set of another type; prefixed so a crash leaves
/// something the next sweep recognises.
pub fn temp_name(name: &str) -> String {
    let h = hex::encode(Sha1::digest(name.as_bytes()));
    format!("{IPSET_PREFIX}t-{}", &h[..16])
}

/// A `list:set` holds other sets: created after them, destroyed before them (the kernel refuses
/// to destroy a set a list still holds).
pub const LIST_SET: &str = "list:set";

fn create_line(name: &str, spec: &IpSetSpec) -> String {
    if spec.kind == LIST_SET {
        // A list cannot grow past its size (on kernels that enforce it); warren's lists are
        // named after their size class, so the members a list is given always fit.
        let size = conf::names::list_set_size(spec.members.len());
        return format!("create {name} {LIST_SET} size {size}\n");
    }
    format!(
        "create {name} {} family inet hashsize 1024 maxelem 1048576\n",
        spec.kind
    )
}

/// `destroy` lines for `sets` (name, type), lists first.
pub fn destroy_lines<'a>(sets: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let (lists, others): (Vec<_>, Vec<_>) = sets.partition(|(_, kind)| *kind == LIST_SET);
    lists
        .into_iter()
        .chain(others)
        .map(|(name, _)| format!("destroy {name}\n"))
        .collect()
}

/// The ipset side of one apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetPlan {
    /// `ipset restore` input run before iptables (creations, member changes).
    pub before: String,
    /// `ipset restore` input run after iptables (destroying stale sets).
    pub after: String,
    pub changed: Vec<String>,
}

pub fn plan_sets<D: Borrow<IpSetSpec>, A: Borrow<IpSetSpec>>(
    desired: &BTreeMap<String, D>,
    actual: &BTreeMap<String, A>,
    sweep: bool,
) -> SetPlan {
    let mut p = SetPlan::default();
    // Lists last: their members must exist when they are filled.
    let is_list = |s: &D| Borrow::<IpSetSpec>::borrow(s).kind == LIST_SET;
    let ordered = desired
        .iter()
        .filter(|(_, s)| !is_list(s))
        .chain(desired.iter().filter(|(_, s)| is_list(s)));
    for (name, spec) in ordered {
        let spec: &IpSetSpec = spec.borrow();
        let want = normalized(spec);
        match actual.get(name).map(Borrow::borrow) {
            None => {
                p.before.push_str(&create_line(name, spec));
                for m in &want {
                    p.before.push_str(&format!("add {name} {m}\n"));
                }
                p.changed.push(format!("ipset {name} created"));
            }
            Some(have) if have.kind != spec.kind => {
                // Sets of different types cannot be swapped, but a set can be emptied and
                // refilled in one restore; the kernel refuses to destroy it while referenced,
                // which the restore error then reports.
                let tmp = temp_name(name);
                p.before.push_str(&format!("destroy {name}\n"));
                p.before.push_str(&create_line(&tmp, spec));
                for m in &want {
                    p.before.push_str(&format!("add {tmp} {m}\n"));
                }
                p.before.push_str(&format!("rename {tmp} {name}\n"));
                p.changed
                    .push(format!("ipset {name} type {} -> {}", have.kind, spec.kind));
            }
            Some(have) => {
                let mut n = 0usize;
                for m in want.difference(&have.members) {
                    p.before.push_str(&format!("add {name} {m}\n"));
                    n += 1;
                }
                for m in have.members.difference(&want) {
                    p.before.push_str(&format!("del {name} {m}\n"));
                    n += 1;
                }
                if n > 0 {
                    p.changed.push(format!("ipset {name} members ({n} changed)"));
                }
            }
        }
    }
    if sweep {
        let stale: Vec<(&str, &str)> = actual
            .iter()
            .filter(|(name, _)| !desired.contains_key(*name))
            .map(|(name, spec)| (name.as_str(), Borrow::<IpSetSpec>::borrow(spec).kind.as_str()))
            .collect();
        p.after = destroy_lines(stale.iter().copied());
        for (name, _) in stale {
            p.changed.push(format!("ipset {name} removed"));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str, m: &[&str]) -> IpSetSpec {
        IpSetSpec {
            kind: kind.into(),
            members: m.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn should_read_only_warren_sets_as_the_kernel_prints_them() {
        let text = "create KUBE-X hash:ip family inet\nadd KUBE-X 1.1.1.1\n\
                    create warren-all-cidrs hash:net family inet hashsize 1024 maxelem 65536\n\
                    add warren-all-cidrs 10.0.0.1\nadd warren-all-cidrs 10.0.0.0/28 nomatch\n";
        let sets = parse_save(text);
        assert_eq!(sets.len(), 1);
        let s = &sets["warren-all-cidrs"];
        assert_eq!(s.kind, "hash:net");
        assert!(s.members.contains("10.0.0.1") && s.members.contains("10.0.0.0/28 nomatch"));
    }

    #[test]
    fn should_plan_creation_then_nothing_then_member_delta() {
        let mut desired = BTreeMap::new();
        desired.insert(
            "warren-all-cidrs".to_string(),
            spec("hash:net", &["10.0.0.1/32", "10.1.0.0/16"]),
        );
        let p = plan_sets(&desired, &BTreeMap::<String, IpSetSpec>::new(), false);
        assert!(p.before.starts_with("create warren-all-cidrs hash:net family inet"));
        assert!(p.before.contains("add warren-all-cidrs 10.0.0.1\n"));
        let actual = parse_save(&format!(
            "{}add warren-all-cidrs 10.0.0.1\nadd warren-all-cidrs 10.1.0.0/16\n",
            p.before.lines().next().unwrap().to_string() + "\n"
        ));
        assert_eq!(plan_sets(&desired, &actual, true), SetPlan::default());
        desired.get_mut("warren-all-cidrs").unwrap().members = ["10.2.0.0/16".to_string()].into();
        let p = plan_sets(&desired, &actual, true);
        assert_eq!(
            p.before,
            "add warren-all-cidrs 10.2.0.0/16\ndel warren-all-cidrs 10.0.0.1\ndel warren-all-cidrs 10.1.0.0/16\n"
        );
    }

    #[test]
    fn should_destroy_stale_sets_only_after_sync_and_after_iptables() {
        let actual = parse_save("create warren-old hash:ip family inet\n");
        assert_eq!(
            plan_sets(&BTreeMap::<String, IpSetSpec>::new(), &actual, false),
            SetPlan::default()
        );
        let p = plan_sets(&BTreeMap::<String, IpSetSpec>::new(), &actual, true);
        assert_eq!(p.before, "");
        assert_eq!(p.after, "destroy warren-old\n");
    }

    /// Where `line` starts in `text`; a missing line fails the test.
    fn position(text: &str, line: &str) -> usize {
        text.find(line).unwrap_or_else(|| panic!("{line:?} in {text}"))
    }

    #[test]
    fn should_create_a_list_after_its_members_and_destroy_it_before_them() {
        let mut desired = BTreeMap::new();
        // Names that sort the list first, so that only the planner's order can save it.
        desired.insert("warren-a-list".to_string(), spec(LIST_SET, &["warren-m1", "warren-m2"]));
        desired.insert("warren-m1".to_string(), spec("hash:net", &["10.0.0.0/8"]));
        desired.insert("warren-m2".to_string(), spec("hash:net", &["10.1.0.0/16"]));
        let p = plan_sets(&desired, &BTreeMap::<String, IpSetSpec>::new(), true);
        let at = |line: &str| position(&p.before, line);
        assert!(at("create warren-a-list list:set size 8\n") > at("create warren-m2 "));
        assert!(at("add warren-a-list warren-m1\n") > at("create warren-a-list"));

        let actual = parse_save(&p.before);
        assert_eq!(actual["warren-a-list"].members.len(), 2);
        assert_eq!(plan_sets(&desired, &actual, true), SetPlan::default());
        let gone = plan_sets(&BTreeMap::<String, IpSetSpec>::new(), &actual, true);
        assert_eq!(
            gone.after,
            "destroy warren-a-list\ndestroy warren-m1\ndestroy warren-m2\n"
        );
        // A list holding more sets than the binary's default size is created with room up to
        // its size class (a power of two), which its name carries.
        let many: Vec<String> = (0..11).map(|i| format!("warren-m{i}")).collect();
        let big = spec(LIST_SET, &many.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(create_line("warren-l", &big), "create warren-l list:set size 16\n");

        // A rule's peers change: the new member set exists before the list takes it, the list
        // lets go of the old one before it is destroyed.
        let mut next = BTreeMap::new();
        next.insert("warren-a-list".to_string(), spec(LIST_SET, &["warren-m1", "warren-m3"]));
        next.insert("warren-m1".to_string(), spec("hash:net", &["10.0.0.0/8"]));
        next.insert("warren-m3".to_string(), spec("hash:net", &["10.3.0.0/16"]));
        let p = plan_sets(&next, &actual, true);
        let at = |line: &str| position(&p.before, line);
        assert!(at("add warren-a-list warren-m3\n") > at("create warren-m3 "));
        assert!(at("del warren-a-list warren-m2\n") > at("add warren-a-list warren-m3\n"));
        assert!(!p.before.contains("create warren-a-list"), "{}", p.before);
        assert_eq!(p.after, "destroy warren-m2\n");
    }

    #[test]
    fn should_keep_temp_names_within_ipset_limits() {
        assert!(temp_name("warren-some-very-long-set-name-xxxxxxxx").len() <= 31);
    }
}
