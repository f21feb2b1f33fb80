//! host-local's on-disk store, byte for byte, so a node can switch between host-local and warren
//! (either way) without losing or duplicating an allocation.
//!
//! Crash safety: a reservation is made by creating the address's file with `O_CREAT|O_EXCL`, and
//! only then is the owner written into it. A process killed between the two leaves an empty file.
//! The allocator treats that address as taken (it cannot tell whether the dying caller handed it
//! to a container) and `Ipam::gc` removes it: under the lock no live writer can be between the
//! two steps, so an empty file seen under the lock is always a leftover. `last_reserved_ip.<n>` is
//! written to a temporary file and renamed over, so it is never seen half-written. Nothing is
//! fsynced (neither does host-local): after a power loss a reservation may be lost together with
//! the container that held it, and a torn cursor only costs one round of round-robin order.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::{Owner, Reservation, Store, LAST_RESERVED_PREFIX, LOCK_FILE};
use crate::{validate_network_name, Error, Result};

/// The store of one network: `<data_dir>/<network name>/`.
#[derive(Debug, Clone)]
pub struct DiskStore {
    dir: PathBuf,
    lock_path: PathBuf,
    lock_timeout: Duration,
}

/// Holds the store's `flock`; dropping it unlocks and closes the lock file.
#[derive(Debug)]
pub struct DiskLock {
    _lock: Flock<File>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `fs::read` without its `statx` for a size hint: records are a few dozen bytes, and the
/// allocator reads every one of them on each call.
/// (`File::read_to_end` would stat and seek, too.)
fn read_small(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let mut content = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(content),
            Ok(n) => content.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

impl DiskStore {
    /// How long [`Store::lock`] waits for another process before giving up.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

    /// Opens (creating it if needed) the store of `network_name` under `data_dir`.
    pub fn open(data_dir: impl AsRef<Path>, network_name: &str) -> Result<Self> {
        validate_network_name(network_name)?;
        let dir = data_dir.as_ref().join(network_name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let store = DiskStore {
            lock_path: dir.join(LOCK_FILE),
            dir,
            lock_timeout: Self::DEFAULT_LOCK_TIMEOUT,
        };
        // Fail at open, not at the first operation, when the directory is not writable.
        store.open_lock_file()?;
        Ok(store)
    }

    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The network's store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn open_lock_file(&self) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&self.lock_path)
            .map_err(io_err(&self.lock_path))
    }

    fn ip_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    fn last_reserved_path(&self, range_set: usize) -> PathBuf {
        self.dir.join(format!("{LAST_RESERVED_PREFIX}{range_set}"))
    }

    /// Reservation files: those whose name is an address in canonical form (the form host-local
    /// and this store write). Everything else — `lock`, cursors, temporaries — is not one.
    fn reservation_entries(&self) -> Result<Vec<(IpAddr, PathBuf)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(ip) = name.parse::<IpAddr>() else { continue };
            if ip.to_string() != name || entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            out.push((ip, entry.path()));
        }
        out.sort_unstable_by_key(|(ip, _)| *ip);
        Ok(out)
    }
}

impl Store for DiskStore {
    type Guard<'a> = DiskLock;

    fn lock(&self) -> Result<DiskLock> {
        // A fresh open file description per lock: flock excludes per description, so this also
        // serialises threads of one process sharing this store.
        let mut file = self.open_lock_file()?;
        let deadline = Instant::now() + self.lock_timeout;
        let mut pause = Duration::from_micros(100);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(DiskLock { _lock: lock }),
                Err((f, e)) if e == Errno::EWOULDBLOCK || e == Errno::EINTR => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::LockTimeout {
                            path: self.lock_path.clone(),
                            waited: self.lock_timeout,
                        });
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(Duration::from_millis(2));
                    file = f;
                }
                Err((_, e)) => {
                    return Err(Error::Io {
                        path: self.lock_path.clone(),
                        source: io::Error::from(e),
                    })
                }
            }
        }
    }

    fn reserve(&self, ip: IpAddr, container_id: &str, ifname: &str) -> Result<bool> {
        let path = self.ip_path(ip);
        let mut file = match OpenOptions::new().write(true).create_new(true).mode(0o644).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err(&path)(e)),
        };
        if let Err(e) = file.write_all(Owner::encode(container_id, ifname).as_bytes()) {
            drop(file);
            // Best effort: if this fails too, the empty file is a leftover that gc removes.
            let _ = fs::remove_file(&path);
            return Err(io_err(&path)(e));
        }
        Ok(true)
    }

    fn release(&self, ip: IpAddr) -> Result<bool> {
        let path = self.ip_path(ip);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn list(&self) -> Result<Vec<Reservation>> {
        let entries = self.reservation_entries()?;
        let mut out = Vec::with_capacity(entries.len());
        for (ip, path) in entries {
            let owner = match read_small(&path) {
                Ok(content) => Owner::parse(&content),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable reservation file");
                    None
                }
            };
            out.push(Reservation { ip, owner });
        }
        Ok(out)
    }

    fn reserved_ips(&self) -> Result<Vec<IpAddr>> {
        Ok(self.reservation_entries()?.into_iter().map(|(ip, _)| ip).collect())
    }

    fn last_reserved(&self, range_set: usize) -> Result<Option<IpAddr>> {
        let path = self.last_reserved_path(range_set);
        match fs::read(&path) {
            Ok(content) => {
                let ip = std::str::from_utf8(&content)
                    .ok()
                    .and_then(|s| s.trim().parse::<IpAddr>().ok());
                if ip.is_none() {
                    // Only costs round-robin order, as in host-local.
                    tracing::warn!(path = %path.display(), "unparsable last reserved address, ignoring it");
                }
                Ok(ip)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn set_last_reserved(&self, range_set: usize, ip: IpAddr) -> Result<()> {
        let path = self.last_reserved_path(range_set);
        // Fixed temporary name: writers are serialised by the lock. Its name is not an address,
        // so neither host-local nor this store takes it for a reservation.
        let tmp = self.dir.join(format!(".{LAST_RESERVED_PREFIX}{range_set}.tmp"));
        let create = || OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp);
        // Always a brand-new temporary, never a truncated one: ext4 (auto_da_alloc) flushes a file
        // truncated to zero when it is closed.
        let mut file = match create() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp).map_err(io_err(&tmp))?;
                create()
            }
            other => other,
        }
        .map_err(io_err(&tmp))?;
        file.write_all(ip.to_string().as_bytes()).map_err(io_err(&tmp))?;
        drop(file);
        // Unlink, then rename: ext4 also flushes the source of a rename that replaces an existing
        // file, which costs milliseconds here (measured: ~4 ms vs ~12 µs). Readers still never see
        // a partial cursor; a crash between the two leaves no cursor, which only restarts the
        // round robin at rangeStart.
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&path)(e)),
            _ => {}
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }
}
