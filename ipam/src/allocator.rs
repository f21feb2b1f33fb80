//! The allocator: host-local's algorithm over any [`Store`], every operation under the store lock.

use std::collections::HashSet;
use std::net::IpAddr;

use conf::ipam::{IpamConfig, RangeSet};
use ipnet::IpNet;

use crate::range::{capacity, is_candidate, range_of, reserved_role, RoundRobin};
use crate::store::{owned_by, DiskStore, Reservation, Store};
use crate::{validate_key, Allocation, Error, Result};

/// Allocates from the range sets of one network's IPAM configuration.
#[derive(Debug)]
pub struct Ipam<S: Store = DiskStore> {
    range_sets: Vec<RangeSet>,
    store: S,
}

impl Ipam<DiskStore> {
    /// Opens the store at `<cfg.data_dir>/<network_name>/`, creating it if needed.
    pub fn open(cfg: &IpamConfig, network_name: &str) -> Result<Self> {
        Ok(Self::with_store(cfg, DiskStore::open(&cfg.data_dir, network_name)?))
    }
}

fn describe(set: &RangeSet) -> String {
    set.iter()
        .map(|r| format!("{}-{}", r.range_start, r.range_end))
        .collect::<Vec<_>>()
        .join(",")
}

impl<S: Store> Ipam<S> {
    pub fn with_store(cfg: &IpamConfig, store: S) -> Self {
        Ipam {
            range_sets: cfg.range_sets.clone(),
            store,
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    fn allocation(&self, set: &RangeSet, ip: IpAddr) -> Allocation {
        let range = range_of(set, ip).map(|i| &set[i]);
        let prefix = range.map_or(if ip.is_ipv4() { 32 } else { 128 }, |r| r.subnet.prefix_len());
        Allocation {
            ip: IpNet::new(ip, prefix).unwrap_or_else(|_| IpNet::from(ip)),
            gateway: range.and_then(|r| r.gateway),
        }
    }

    /// Maps requested addresses to range sets, refusing what could never be granted.
    fn place_requested(&self, requested: &[IpAddr]) -> Result<Vec<Option<IpAddr>>> {
        let mut wanted = vec![None; self.range_sets.len()];
        for &ip in requested {
            let Some((set_idx, range_idx)) = self
                .range_sets
                .iter()
                .enumerate()
                .find_map(|(s, set)| range_of(set, ip).map(|r| (s, r)))
            else {
                return Err(Error::RequestedNotInRange { ip });
            };
            if let Some(what) = reserved_role(&self.range_sets[set_idx][range_idx], ip) {
                return Err(Error::RequestedReserved { ip, what });
            }
            match wanted[set_idx] {
                Some(other) if other != ip => {
                    return Err(Error::RequestedSameRangeSet {
                        ip,
                        other,
                        range_set: set_idx,
                    })
                }
                _ => wanted[set_idx] = Some(ip),
            }
        }
        Ok(wanted)
    }

    /// One address per range set, all or nothing; `requested` = specific IPs (CNI `ips`
    /// capability / `IP=` arg): each must fall in some range set. If `(container_id, ifname)`
    /// already holds addresses, return them (idempotent ADD retry).
    pub fn allocate(&self, container_id: &str, ifname: &str, requested: &[IpAddr]) -> Result<Vec<Allocation>> {
        validate_key(container_id, ifname)?;
        let wanted = self.place_requested(requested)?;
        let _guard = self.store.lock()?;
        // One scan serves both the idempotency check and skipping taken addresses without a
        // failed O_EXCL create each.
        let reservations = self.store.list()?;
        let mut fresh = Vec::new();
        let result = self.allocate_locked(container_id, ifname, &wanted, &reservations, &mut fresh);
        if result.is_err() {
            for ip in fresh {
                if let Err(e) = self.store.release(ip) {
                    // Left behind as a normal reservation of this container: DEL or GC frees it.
                    tracing::warn!(%ip, error = %e, "could not roll back reservation");
                }
            }
        }
        result
    }

    fn allocate_locked(
        &self,
        container_id: &str,
        ifname: &str,
        wanted: &[Option<IpAddr>],
        reservations: &[Reservation],
        fresh: &mut Vec<IpAddr>,
    ) -> Result<Vec<Allocation>> {
        let mine = owned_by(reservations, container_id, ifname);
        let taken: HashSet<IpAddr> = reservations.iter().map(|r| r.ip).collect();
        let mut out = Vec::with_capacity(self.range_sets.len());
        for (idx, set) in self.range_sets.iter().enumerate() {
            let held: Vec<IpAddr> = mine.iter().copied().filter(|ip| is_candidate(set, *ip)).collect();
            let ip = match (wanted[idx], held.first()) {
                (Some(req), _) if held.contains(&req) => req,
                (Some(req), Some(&held)) => {
                    return Err(Error::AlreadyAllocated {
                        container_id: container_id.trim().to_string(),
                        ifname: ifname.to_string(),
                        held,
                        requested: req,
                        range_set: idx,
                    })
                }
                (None, Some(&held)) => held,
                (Some(req), None) => {
                    if !self.store.reserve(req, container_id, ifname)? {
                        let owner = reservations
                            .iter()
                            .find(|r| r.ip == req)
                            .and_then(|r| r.owner.as_ref())
                            .map_or_else(|| "an unfinished reservation".to_string(), |o| o.to_string());
                        return Err(Error::RequestedUnavailable { ip: req, owner });
                    }
                    fresh.push(req);
                    self.store.set_last_reserved(idx, req)?;
                    req
                }
                (None, None) => {
                    let last = self.store.last_reserved(idx)?;
                    let mut got = None;
                    for (_, ip) in RoundRobin::new(set, last) {
                        if !taken.contains(&ip) && self.store.reserve(ip, container_id, ifname)? {
                            got = Some(ip);
                            break;
                        }
                    }
                    let ip = got.ok_or_else(|| Error::Exhausted {
                        range_set: idx,
                        ranges: describe(set),
                    })?;
                    fresh.push(ip);
                    self.store.set_last_reserved(idx, ip)?;
                    ip
                }
            };
            out.push(self.allocation(set, ip));
        }
        tracing::debug!(container_id, ifname, allocated = ?out, "allocated");
        Ok(out)
    }

    /// Idempotent; returns what was released. Like host-local: the exact `(container_id, ifname)`
    /// reservations, or when there are none, legacy reservations holding only `container_id`.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        validate_key(container_id, ifname)?;
        let _guard = self.store.lock()?;
        let reservations = self.store.list()?;
        let owned = |legacy: bool| -> Vec<IpAddr> {
            reservations
                .iter()
                .filter(|r| {
                    r.owner.as_ref().is_some_and(|o| {
                        if legacy {
                            o.is_legacy_of(container_id)
                        } else {
                            o.is_exactly(container_id, ifname)
                        }
                    })
                })
                .map(|r| r.ip)
                .collect()
        };
        let mut targets = owned(false);
        if targets.is_empty() {
            targets = owned(true);
        }
        self.release_all(targets)
    }

    /// Releases every address, carrying on past failures; fails with the first error, if any.
    fn release_all(&self, ips: Vec<IpAddr>) -> Result<Vec<IpAddr>> {
        let mut released = Vec::with_capacity(ips.len());
        let mut first_err = None;
        for ip in ips {
            match self.store.release(ip) {
                Ok(true) => released.push(ip),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%ip, error = %e, "could not release");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(released),
        }
    }

    /// Addresses held by `(container_id, ifname)` (legacy ID-only reservations included).
    pub fn lookup(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        validate_key(container_id, ifname)?;
        let _guard = self.store.lock()?;
        self.store.get_by_id(container_id, ifname)
    }

    /// CNI GC: release every reservation whose `(container_id, ifname)` is not in `keep`, plus
    /// empty or unreadable files left by a crash between reserving and writing. A legacy
    /// (ID-only) reservation is kept when any kept attachment has its container ID. Returns the
    /// released addresses.
    pub fn gc(&self, keep: &[(String, String)]) -> Result<Vec<IpAddr>> {
        let keep_exact: HashSet<(&str, &str)> = keep.iter().map(|(c, i)| (c.trim(), i.as_str())).collect();
        let keep_ids: HashSet<&str> = keep.iter().map(|(c, _)| c.trim()).collect();
        let _guard = self.store.lock()?;
        let stale: Vec<IpAddr> = self
            .store
            .list()?
            .into_iter()
            .filter(|r| match &r.owner {
                None => true,
                Some(o) => match &o.ifname {
                    Some(ifname) => !keep_exact.contains(&(o.container_id.as_str(), ifname.as_str())),
                    None => !keep_ids.contains(o.container_id.as_str()),
                },
            })
            .map(|r| r.ip)
            .collect();
        if !stale.is_empty() {
            tracing::info!(released = ?stale, "garbage-collecting reservations");
        }
        self.release_all(stale)
    }

    /// Free addresses left (the minimum over range sets) — used by CNI STATUS (0 → not ready).
    pub fn available(&self) -> Result<u128> {
        let _guard = self.store.lock()?;
        let reserved = self.store.reserved_ips()?;
        Ok(self
            .range_sets
            .iter()
            .map(|set| {
                let used = reserved.iter().filter(|ip| is_candidate(set, **ip)).count() as u128;
                capacity(set).saturating_sub(used)
            })
            .min()
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests;
