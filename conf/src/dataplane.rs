//! The desired kernel state that warren-node's parts compute (policy, overlay) and its writer
//! applies: ipsets and iptables chains owned by warren, plus the single jumps that hook them into
//! the built-in chains. Pure data; rules are already rendered as `iptables` arguments.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// An iptables table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Raw,
    Mangle,
    Nat,
    Filter,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Raw => "raw",
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

/// One ipset: its type (`hash:ip`, `hash:net`, `hash:ip,port`, `hash:net,port`, …) and members
/// in `ipset` syntax (`10.0.0.1`, `10.0.0.0/24`, `10.0.0.0/28 nomatch`, `10.0.0.1,tcp:80`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpSetSpec {
    pub kind: String,
    pub members: BTreeSet<String>,
}

/// A jump from a built-in chain into a warren chain (the only thing warren puts into chains it
/// does not own).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hook {
    pub table: Table,
    /// The built-in chain (`INPUT`, `FORWARD`, `OUTPUT`, `PREROUTING`, `POSTROUTING`).
    pub chain: String,
    /// Rule arguments, e.g. `-j WARREN-FORWARD`.
    pub rule: String,
    /// Insert at the top (true) or append at the bottom.
    pub first: bool,
}

/// Everything warren wants in the kernel's packet filter, as one value the writer diffs.
///
/// Chains and sets are shared (`Arc`): the incremental compiler hands out the same allocation
/// for a part that did not change, so cloning a state of 100 000 rules is cheap and comparing
/// two states stops at the pointer for every unchanged part.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredDataplane {
    /// Set name (with `names::IPSET_PREFIX`) → set.
    pub ipsets: BTreeMap<String, Arc<IpSetSpec>>,
    /// (table, chain name with `names::CHAIN_PREFIX`) → rules (arguments after `-A <chain>`).
    pub chains: BTreeMap<(Table, String), Arc<Vec<String>>>,
    pub hooks: BTreeSet<Hook>,
}

impl DesiredDataplane {
    /// Adds another part's state; a name both define is a programming error, reported by name.
    pub fn merge(&mut self, mut other: DesiredDataplane) -> Result<(), String> {
        // The smaller map goes into the larger: the overlay's few entries into the policies'
        // thousands, not the reverse, on every pass.
        if self.ipsets.len() < other.ipsets.len() {
            std::mem::swap(&mut self.ipsets, &mut other.ipsets);
        }
        if self.chains.len() < other.chains.len() {
            std::mem::swap(&mut self.chains, &mut other.chains);
        }
        for (k, v) in other.ipsets {
            match self.ipsets.entry(k) {
                Entry::Occupied(e) => return Err(format!("ipset {} defined twice", e.key())),
                Entry::Vacant(e) => e.insert(v),
            };
        }
        for (k, v) in other.chains {
            match self.chains.entry(k) {
                Entry::Occupied(e) => return Err(format!("chain {} in {} defined twice", e.key().1, e.key().0.name())),
                Entry::Vacant(e) => e.insert(v),
            };
        }
        self.hooks.extend(other.hooks);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_merge_parts_and_refuse_duplicates() {
        let mut a = DesiredDataplane::default();
        a.chains
            .insert((Table::Filter, "WARREN-A".into()), Arc::new(vec!["-j ACCEPT".into()]));
        let mut b = DesiredDataplane::default();
        b.chains.insert((Table::Nat, "WARREN-A".into()), Arc::default());
        a.merge(b.clone()).unwrap();
        assert_eq!(a.chains.len(), 2);
        assert!(a.merge(b.clone()).unwrap_err().contains("WARREN-A"));
        // Merged either way round: the larger side is kept and the smaller goes into it.
        let mut small = DesiredDataplane::default();
        small.chains.insert((Table::Filter, "WARREN-B".into()), Arc::default());
        small.ipsets.insert("warren-x".into(), Arc::default());
        small.merge(a.clone()).unwrap();
        assert_eq!(small.chains.len(), 3);
        assert_eq!(small.ipsets.len(), 1);
        assert!(small.merge(b).unwrap_err().contains("WARREN-A"));
    }
}
