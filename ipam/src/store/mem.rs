//! In-memory store with [`super::DiskStore`]'s semantics (raw file contents included), so the
//! allocator's behaviour can be tested without a filesystem.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{Owner, Reservation, Store};
use crate::Result;

#[derive(Debug, Default)]
struct State {
    /// Address → raw content of its reservation "file".
    files: BTreeMap<IpAddr, Vec<u8>>,
    last_reserved: BTreeMap<usize, IpAddr>,
}

#[derive(Debug, Default)]
pub struct MemStore {
    lock: Mutex<()>,
    state: Mutex<State>,
}

/// Holds the store's lock.
#[derive(Debug)]
pub struct MemLock<'a> {
    _guard: MutexGuard<'a, ()>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a plain map that a panicking holder cannot leave half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a reservation with arbitrary raw content, as host-local, an older version or a
    /// crashed writer (empty content) would have left it.
    pub fn insert_raw(&self, ip: IpAddr, content: impl Into<Vec<u8>>) {
        self.state().files.insert(ip, content.into());
    }

    /// The raw content of `ip`'s reservation.
    pub fn raw(&self, ip: IpAddr) -> Option<Vec<u8>> {
        self.state().files.get(&ip).cloned()
    }
}

impl Store for MemStore {
    type Guard<'a> = MemLock<'a>;

    fn lock(&self) -> Result<MemLock<'_>> {
        Ok(MemLock {
            _guard: self.lock.lock().unwrap_or_else(PoisonError::into_inner),
        })
    }

    fn reserve(&self, ip: IpAddr, container_id: &str, ifname: &str) -> Result<bool> {
        let mut st = self.state();
        if st.files.contains_key(&ip) {
            return Ok(false);
        }
        st.files.insert(ip, Owner::encode(container_id, ifname).into_bytes());
        Ok(true)
    }

    fn release(&self, ip: IpAddr) -> Result<bool> {
        Ok(self.state().files.remove(&ip).is_some())
    }

    fn list(&self) -> Result<Vec<Reservation>> {
        Ok(self
            .state()
            .files
            .iter()
            .map(|(ip, content)| Reservation {
                ip: *ip,
                owner: Owner::parse(content),
            })
            .collect())
    }

    fn last_reserved(&self, range_set: usize) -> Result<Option<IpAddr>> {
        Ok(self.state().last_reserved.get(&range_set).copied())
    }

    fn set_last_reserved(&self, range_set: usize, ip: IpAddr) -> Result<()> {
        self.state().last_reserved.insert(range_set, ip);
        Ok(())
    }
}
