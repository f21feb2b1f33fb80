//! Where reservations live. [`DiskStore`] is host-local's on-disk format; [`MemStore`] is the
//! same semantics in memory, for tests.
//!
//! The format (`containernetworking/plugins: plugins/ipam/host-local/backend/disk/backend.go`):
//! one file per reserved address, named by the address, holding `<containerID>\r\n<ifname>`
//! (files written before host-local knew about interfaces hold only the container ID);
//! `last_reserved_ip.<rangeSetIndex>` holding the last address handed out from that range set;
//! and a `lock` file that every operation holds an exclusive `flock` on.

use std::net::IpAddr;

use crate::Result;

mod disk;
mod mem;

pub use disk::{DiskLock, DiskStore};
pub use mem::{MemLock, MemStore};

/// Name of the lock file inside a network's store directory.
pub const LOCK_FILE: &str = "lock";
/// Prefix of the per-range-set round-robin cursor files.
pub const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
/// Separator between container ID and interface name in a reservation file.
pub const LINE_BREAK: &str = "\r\n";

/// Who holds a reservation, as read back from the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub container_id: String,
    /// `None` for legacy reservations written before host-local recorded the interface.
    pub ifname: Option<String>,
}

impl Owner {
    /// The file content for a reservation. `container_id` is trimmed, as host-local does.
    pub fn encode(container_id: &str, ifname: &str) -> String {
        format!("{}{LINE_BREAK}{ifname}", container_id.trim())
    }

    /// Parses a reservation file's content; `None` when it names nobody (empty — a reservation
    /// whose writer died before writing it — or not text).
    pub fn parse(content: &[u8]) -> Option<Owner> {
        // host-local compares `strings.TrimSpace(content)`, so surrounding whitespace is noise.
        let text = std::str::from_utf8(content).ok()?.trim();
        if text.is_empty() {
            return None;
        }
        Some(match text.split_once(LINE_BREAK) {
            Some((id, ifname)) => Owner {
                container_id: id.to_string(),
                ifname: Some(ifname.to_string()),
            },
            None => Owner {
                container_id: text.to_string(),
                ifname: None,
            },
        })
    }

    /// Whether this reservation was made for exactly `(container_id, ifname)`.
    pub fn is_exactly(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id.trim() && self.ifname.as_deref() == Some(ifname)
    }

    /// Whether this is a legacy (ID-only) reservation for `container_id`.
    pub fn is_legacy_of(&self, container_id: &str) -> bool {
        self.ifname.is_none() && self.container_id == container_id.trim()
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.ifname {
            Some(ifname) => write!(f, "{}/{}", self.container_id, ifname),
            None => f.write_str(&self.container_id),
        }
    }
}

/// One reserved address. `owner` is `None` for an empty or unreadable file: a reservation whose
/// writer was killed between creating the file and writing it. Such an address stays taken (the
/// allocator cannot know whether the writer's caller got it) until `gc` removes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    pub owner: Option<Owner>,
}

/// host-local's lookup rule: exact `(id, ifname)` matches, plus legacy ID-only matches.
pub(crate) fn owned_by(reservations: &[Reservation], container_id: &str, ifname: &str) -> Vec<IpAddr> {
    reservations
        .iter()
        .filter(|r| {
            r.owner
                .as_ref()
                .is_some_and(|o| o.is_exactly(container_id, ifname) || o.is_legacy_of(container_id))
        })
        .map(|r| r.ip)
        .collect()
}

/// A reservation store. Every method but [`Store::lock`] expects the caller to hold the guard
/// `lock` returned for the whole read-modify-write sequence; the guard releases on drop.
pub trait Store {
    type Guard<'a>
    where
        Self: 'a;

    /// Takes the store-wide exclusive lock, waiting a bounded time ([`crate::Error::LockTimeout`]).
    fn lock(&self) -> Result<Self::Guard<'_>>;

    /// Reserves `ip` for `(container_id, ifname)` atomically with respect to other reservers:
    /// `Ok(false)` when it is already reserved (by anyone, or by an empty crash leftover).
    fn reserve(&self, ip: IpAddr, container_id: &str, ifname: &str) -> Result<bool>;

    /// Removes the reservation of `ip`; `Ok(false)` when there was none.
    fn release(&self, ip: IpAddr) -> Result<bool>;

    /// Every reservation, in address order.
    fn list(&self) -> Result<Vec<Reservation>>;

    /// Addresses held by `(container_id, ifname)`, including legacy ID-only reservations of
    /// `container_id` (host-local's `GetByID`).
    fn get_by_id(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        Ok(owned_by(&self.list()?, container_id, ifname))
    }

    /// Reserved addresses, without who holds them; may be cheaper than [`Store::list`].
    fn reserved_ips(&self) -> Result<Vec<IpAddr>> {
        Ok(self.list()?.into_iter().map(|r| r.ip).collect())
    }

    /// The round-robin cursor of range set `range_set`; `None` when absent or unparsable.
    fn last_reserved(&self, range_set: usize) -> Result<Option<IpAddr>>;

    /// Moves the round-robin cursor of `range_set`.
    fn set_last_reserved(&self, range_set: usize, ip: IpAddr) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_parse_host_local_contents() {
        struct Case {
            content: &'static [u8],
            want: Option<(&'static str, Option<&'static str>)>,
        }
        let cases = [
            Case {
                content: b"abc123\r\neth0",
                want: Some(("abc123", Some("eth0"))),
            },
            Case {
                content: b"abc123",
                want: Some(("abc123", None)),
            },
            Case {
                content: b"  abc123\n",
                want: Some(("abc123", None)),
            },
            Case {
                content: b"abc123\r\neth0\n",
                want: Some(("abc123", Some("eth0"))),
            },
            Case {
                content: b"",
                want: None,
            },
            Case {
                content: b" \r\n",
                want: None,
            },
            Case {
                content: b"\xff\xfe",
                want: None,
            },
        ];
        for c in cases {
            let got = Owner::parse(c.content);
            let want = c.want.map(|(id, ifname)| Owner {
                container_id: id.to_string(),
                ifname: ifname.map(str::to_string),
            });
            assert_eq!(got, want, "content {:?}", c.content);
        }
        assert_eq!(Owner::encode(" abc ", "eth0"), "abc\r\neth0");
    }
}
