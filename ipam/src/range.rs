//! Pure range-set arithmetic: which addresses may be handed out, in which order, and how many.
//!
//! The order is host-local's (`allocator.go`, `RangeIter`): start right after the range set's
//! `last_reserved_ip`, walk to the end of that range, continue with the next range of the set
//! (wrapping to the first), and stop after having visited every address once — the last reserved
//! one comes last. When the last reserved address is unknown or outside the set, start at the
//! first range's `rangeStart`.

use std::net::IpAddr;

use conf::ipam::{ip_to_u128, u128_to_ip, Range};
use ipnet::IpNet;

/// Why `ip` can never be handed out from `range`, if it cannot.
///
/// The gateway is the pod's next hop; the network address belongs to the node's tunnel device
/// (`tunl0` takes the block's first address) and, like the IPv4 broadcast address, is not a usable
/// host address. conf already keeps them out of the default `rangeStart`/`rangeEnd`, but an
/// explicit range may include them, so the allocator checks again. Point-to-point prefixes
/// (IPv4 /31 and /32, IPv6 /127 and /128) have neither network nor broadcast address (RFC 3021),
/// the same convention conf uses for their default ranges.
pub(crate) fn reserved_role(range: &Range, ip: IpAddr) -> Option<&'static str> {
    if range.gateway == Some(ip) {
        return Some("gateway");
    }
    let subnet = range.subnet;
    if is_point_to_point(subnet) {
        return None;
    }
    if ip == subnet.network() {
        return Some("network address");
    }
    if subnet.addr().is_ipv4() && ip == subnet.broadcast() {
        return Some("broadcast address");
    }
    None
}

fn is_point_to_point(subnet: IpNet) -> bool {
    subnet.max_prefix_len() - subnet.prefix_len() <= 1
}

/// Index of the range of `set` whose `rangeStart..=rangeEnd` holds `ip`.
pub(crate) fn range_of(set: &[Range], ip: IpAddr) -> Option<usize> {
    set.iter().position(|r| r.contains(ip))
}

/// Whether `ip` is an address the allocator could hand out from `set`.
pub(crate) fn is_candidate(set: &[Range], ip: IpAddr) -> bool {
    range_of(set, ip).is_some_and(|i| reserved_role(&set[i], ip).is_none())
}

fn bounds(r: &Range) -> (u128, u128) {
    (ip_to_u128(r.range_start), ip_to_u128(r.range_end))
}

/// How many addresses of `set` could be handed out when nothing is reserved. Saturates at
/// `u128::MAX` for absurdly large IPv6 ranges.
pub(crate) fn capacity(set: &[Range]) -> u128 {
    set.iter()
        .map(|r| {
            let (start, end) = bounds(r);
            let size = (end - start).saturating_add(1);
            let mut excluded: Vec<IpAddr> = Vec::with_capacity(3);
            let subnet = r.subnet;
            for ip in [r.gateway, Some(subnet.network()), Some(subnet.broadcast())]
                .into_iter()
                .flatten()
            {
                if r.contains(ip) && reserved_role(r, ip).is_some() && !excluded.contains(&ip) {
                    excluded.push(ip);
                }
            }
            size - excluded.len() as u128
        })
        .fold(0u128, u128::saturating_add)
}

/// host-local's round-robin walk over a range set, skipping addresses that are never handed out.
/// Yields `(range index within the set, address)`.
pub(crate) struct RoundRobin<'a> {
    set: &'a [Range],
    idx: usize,
    cur: u128,
    remaining: u128,
}

impl<'a> RoundRobin<'a> {
    /// `set` must not be empty (conf refuses empty range sets).
    pub(crate) fn new(set: &'a [Range], last_reserved: Option<IpAddr>) -> Self {
        let total = set
            .iter()
            .map(|r| {
                let (start, end) = bounds(r);
                (end - start).saturating_add(1)
            })
            .fold(0u128, u128::saturating_add);
        let mut it = RoundRobin {
            set,
            idx: 0,
            cur: set.first().map_or(0, |r| bounds(r).0),
            remaining: if set.is_empty() { 0 } else { total },
        };
        if let Some((idx, last)) = last_reserved.and_then(|ip| range_of(set, ip).map(|i| (i, ip))) {
            it.idx = idx;
            it.cur = ip_to_u128(last);
            it.advance();
        }
        it
    }

    fn advance(&mut self) {
        let (_, end) = bounds(&self.set[self.idx]);
        if self.cur >= end {
            self.idx = (self.idx + 1) % self.set.len();
            self.cur = bounds(&self.set[self.idx]).0;
        } else {
            self.cur += 1;
        }
    }
}

impl Iterator for RoundRobin<'_> {
    type Item = (usize, IpAddr);

    fn next(&mut self) -> Option<Self::Item> {
        while self.remaining > 0 {
            self.remaining -= 1;
            let idx = self.idx;
            let range = &self.set[idx];
            let ip = u128_to_ip(self.cur, range.subnet.addr().is_ipv4());
            self.advance();
            if reserved_role(range, ip).is_none() {
                return Some((idx, ip));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(subnet: &str, start: &str, end: &str, gw: Option<&str>) -> Range {
        Range {
            subnet: subnet.parse().unwrap(),
            range_start: start.parse().unwrap(),
            range_end: end.parse().unwrap(),
            gateway: gw.map(|g| g.parse().unwrap()),
        }
    }

    fn ips(it: impl Iterator<Item = (usize, IpAddr)>) -> Vec<String> {
        it.map(|(_, ip)| ip.to_string()).collect()
    }

    #[test]
    fn should_walk_round_robin_like_host_local() {
        let set = vec![
            range("10.0.0.0/29", "10.0.0.0", "10.0.0.7", Some("10.0.0.1")),
            range("10.0.1.0/30", "10.0.1.1", "10.0.1.2", None),
        ];
        struct Case {
            last: Option<&'static str>,
            want: &'static [&'static str],
        }
        let cases = [
            Case {
                // network .0, gateway .1 and broadcast .7 are skipped even though the range names them
                last: None,
                want: &[
                    "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.1.1", "10.0.1.2",
                ],
            },
            Case {
                last: Some("10.0.0.4"),
                want: &[
                    "10.0.0.5", "10.0.0.6", "10.0.1.1", "10.0.1.2", "10.0.0.2", "10.0.0.3", "10.0.0.4",
                ],
            },
            Case {
                // last at the end of the last range wraps to the first range
                last: Some("10.0.1.2"),
                want: &[
                    "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.1.1", "10.0.1.2",
                ],
            },
            Case {
                // last outside the set (config changed): start from the first rangeStart
                last: Some("192.168.0.1"),
                want: &[
                    "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.1.1", "10.0.1.2",
                ],
            },
        ];
        for c in cases {
            let got = ips(RoundRobin::new(&set, c.last.map(|l| l.parse().unwrap())));
            assert_eq!(got, c.want, "last_reserved {:?}", c.last);
        }
        assert_eq!(capacity(&set), 7);
    }

    #[test]
    fn should_keep_point_to_point_and_ipv6_last_addresses() {
        let p2p = vec![range("10.9.0.0/31", "10.9.0.0", "10.9.0.1", None)];
        assert_eq!(ips(RoundRobin::new(&p2p, None)), ["10.9.0.0", "10.9.0.1"]);
        assert_eq!(capacity(&p2p), 2);

        let v6 = vec![range("fd00::/126", "fd00::", "fd00::3", Some("fd00::1"))];
        assert_eq!(
            ips(RoundRobin::new(&v6, Some("fd00::2".parse().unwrap()))),
            ["fd00::3", "fd00::2"]
        );
        assert_eq!(capacity(&v6), 2);
    }

    #[test]
    fn should_count_huge_ipv6_ranges_without_overflow() {
        let v6 = vec![range("::/0", "::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None)];
        assert_eq!(capacity(&v6), u128::MAX - 1);
        let first: Vec<_> = ips(RoundRobin::new(&v6, None).take(2));
        assert_eq!(first, ["::1", "::2"]);
    }

    #[test]
    fn should_tell_why_an_address_is_reserved() {
        let r = range("10.0.0.0/24", "10.0.0.0", "10.0.0.255", Some("10.0.0.1"));
        assert_eq!(reserved_role(&r, "10.0.0.1".parse().unwrap()), Some("gateway"));
        assert_eq!(reserved_role(&r, "10.0.0.0".parse().unwrap()), Some("network address"));
        assert_eq!(
            reserved_role(&r, "10.0.0.255".parse().unwrap()),
            Some("broadcast address")
        );
        assert_eq!(reserved_role(&r, "10.0.0.2".parse().unwrap()), None);
        assert!(is_candidate(std::slice::from_ref(&r), "10.0.0.2".parse().unwrap()));
        assert!(!is_candidate(std::slice::from_ref(&r), "10.0.1.2".parse().unwrap()));
    }
}
