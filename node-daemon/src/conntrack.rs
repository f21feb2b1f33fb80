//! Forgets the conntrack entries of a local pod's address once the pod is gone, or once the
//! address belongs to another pod, as Calico's felix does when a workload endpoint goes away.
//!
//! Why: every warren chain accepts `RELATED,ESTABLISHED` before any policy. Without this, a
//! flow that was allowed to the old pod keeps being accepted for the pod that reuses its
//! address, whatever that pod's policy says, until the entry times out (5 days for TCP). The
//! flush runs after the new rules are applied, so the next packet of such a flow is a new
//! connection that the new rules judge.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::writer::{CmdError, CommandRunner};

/// Who a local address belongs to: (namespace, pod).
pub type Owner = (String, String);

/// Remembers the local addresses of the last programmed pass.
#[derive(Debug, Default)]
pub struct ConntrackJanitor {
    known: BTreeMap<Ipv4Addr, Owner>,
}

impl ConntrackJanitor {
    /// The addresses whose owner went away or changed since the last call; remembers `now`.
    /// The first call returns nothing: a restarted daemon does not know who held what.
    /// Called every pass: copies nothing when nothing changed.
    pub fn released(&mut self, now: &BTreeMap<Ipv4Addr, Owner>) -> Vec<Ipv4Addr> {
        if self.known == *now {
            return vec![];
        }
        let gone = self
            .known
            .iter()
            .filter(|(ip, owner)| now.get(ip) != Some(owner))
            .map(|(ip, _)| *ip)
            .collect();
        self.known = now.clone();
        gone
    }
}

/// The `conntrack -D` filters that together cover every entry of `ip`: as the original source
/// (the pod's own connections, SNAT'd or not), the original destination (connections to it),
/// and the reply tuple (connections DNAT'd to it through a Service, whose original destination
/// is the Service address).
fn filters(ip: Ipv4Addr) -> [[String; 2]; 4] {
    ["--orig-src", "--orig-dst", "--reply-src", "--reply-dst"].map(|f| [f.to_string(), ip.to_string()])
}

/// Deletes every conntrack entry of `ip`. `conntrack -D` exits 1 when nothing matched, which
/// is not a failure here.
pub fn flush(runner: &dyn CommandRunner, ip: Ipv4Addr) -> Result<(), CmdError> {
    for [flag, value] in filters(ip) {
        match runner.run("conntrack", &["-D", &flag, &value], None) {
            Ok(_) => {}
            Err(CmdError::Failed { ref stderr, .. }) if stderr.contains("0 flow entries") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(pod: &str) -> Owner {
        ("shop".to_string(), pod.to_string())
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 233, 90, last)
    }

    #[test]
    fn should_release_addresses_whose_pod_left_or_changed() {
        let mut j = ConntrackJanitor::default();
        let first = BTreeMap::from([(ip(2), owner("web")), (ip(3), owner("api"))]);
        assert!(j.released(&first).is_empty(), "nothing known before the first pass");
        assert!(j.released(&first).is_empty(), "unchanged");
        // web is gone; api's address now belongs to db (reused); a new pod appears.
        let next = BTreeMap::from([(ip(3), owner("db")), (ip(4), owner("new"))]);
        assert_eq!(j.released(&next), vec![ip(2), ip(3)]);
        assert!(j.released(&next).is_empty());
    }

    #[test]
    fn should_cover_both_tuples_in_both_directions() {
        let f = filters(ip(2));
        let flags: Vec<&str> = f.iter().map(|[flag, _]| flag.as_str()).collect();
        assert_eq!(flags, ["--orig-src", "--orig-dst", "--reply-src", "--reply-dst"]);
        assert!(f.iter().all(|[_, v]| v == "10.233.90.2"));
    }
}
