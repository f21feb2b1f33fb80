//! A writer for the "newc" cpio format the kernel unpacks as an initramfs.
//!
//! Written here rather than piping `find | cpio` so that the archive can hold a `/dev/console` device node (the
//! kernel needs it to give `/init` a stdout) without the builder being root, and so its layout is unit-testable.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFLNK: u32 = 0o120_000;

/// Streams entries into a newc archive. Call [`Archive::finish`] to write the trailer.
pub struct Archive<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> Archive<W> {
    pub fn new(out: W) -> Self {
        Archive {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {name:?}"),
            ));
        }
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: too large for newc")))?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry name too long"))?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        // mtime is fixed at 0 so that the same inputs give a byte-identical initrd.
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}\
             {rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.put(&[0u8; 4][..4 - rem])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut a = Archive::new(Vec::new());
        a.dir("/bin", 0o755).unwrap();
        a.file("/bin/hello", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        a.symlink("/bin/sh", "hello").unwrap();
        a.dir("/dev", 0o755).unwrap();
        a.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        a.file("/odd", 0o644, b"abcde").unwrap();
        a.finish().unwrap()
    }

    #[test]
    fn should_align_every_header_to_four_bytes() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        let mut positions = Vec::new();
        let mut i = 0;
        while let Some(p) = bytes[i..].windows(6).position(|w| w == b"070701") {
            positions.push(i + p);
            i += p + 6;
        }
        assert_eq!(positions.len(), 7, "six entries and the trailer");
        assert!(positions.iter().all(|p| p % 4 == 0), "{positions:?}");
    }

    #[test]
    fn should_be_readable_by_gnu_cpio_with_modes_and_devices() {
        let bytes = sample();
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio is installed");
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 6, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" bin"),
            "{listing}"
        );
        assert!(
            lines[1].starts_with("-rwxr-xr-x") && lines[1].ends_with(" bin/hello"),
            "{listing}"
        );
        assert!(
            lines[2].starts_with("lrwxrwxrwx") && lines[2].ends_with("bin/sh -> hello"),
            "{listing}"
        );
        assert!(lines[4].starts_with("crw-------") && lines[4].contains("5,") && lines[4].ends_with("dev/console"));
        assert!(
            lines[5].starts_with("-rw-r--r--") && lines[5].contains(" 5 "),
            "{listing}"
        );
    }

    #[test]
    fn should_reject_empty_names() {
        let mut a = Archive::new(Vec::new());
        assert_eq!(a.file("/", 0o644, b"").unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
