//! Entering a pod's network namespace on the current thread only, and always coming back.
//!
//! `setns(CLONE_NEWNET)` changes the calling thread's namespace. The plugin is single-threaded,
//! and the in-process test harness runs each call on its own thread, so nothing else is
//! affected. Everything namespace-bound (a netlink socket, a `/proc/sys/net` file) is opened
//! while inside and used after coming back.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
        })
    }

    /// The calling thread's current namespace.
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Whether this is the calling thread's own namespace (same nsfs inode).
    pub fn is_current(&self) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (self.file.metadata()?, Netns::current()?.file.metadata()?);
        Ok(a.dev() == b.dev() && a.ino() == b.ino())
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` inside this namespace on the current thread and returns to the original one,
    /// also when `f` panics.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let origin = Netns::current()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let _back = Return(origin);
        Ok(f())
    }
}

struct Return(Netns);

impl Drop for Return {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Carrying on in the pod's namespace would program the wrong kernel state; dying is
            // safer, and the runtime retries.
            tracing::error!(error = %e, "cannot return to the original network namespace");
            std::process::abort();
        }
    }
}

/// Writes a sysctl below `/proc/sys/` in the calling thread's network namespace.
pub fn write_sysctl(rel: &str, value: &str) -> io::Result<()> {
    std::fs::write(Path::new("/proc/sys").join(rel), value)
}

/// Reads a sysctl below `/proc/sys/`.
pub fn read_sysctl(rel: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(Path::new("/proc/sys").join(rel))?
        .trim()
        .to_string())
}
