//! Fetching Debian's kernel and building the initramfs, once per cache directory.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::Archive;
use crate::guest::{INITRD_MODULES, INIT_SCRIPT};
use crate::modules::ModuleIndex;
use crate::{io_err, Error};

/// Bumped whenever the cache layout or the stamp's meaning changes.
const FORMAT: &str = "2";
const STAMP: &str = "assets.stamp";
const LOCK: &str = ".lock";
/// The metapackage that names "this release's" kernel.
const KERNEL_META: &str = "linux-image-amd64";
pub const BUSYBOX: &str = "/bin/busybox";

/// The kernel, initrd and modules tree a VM boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `<cache>/<version>/lib/modules/<version>`, with `modules.dep` built by depmod.
    pub modules_dir: PathBuf,
    pub version: String,
}

impl Assets {
    fn at(cache_dir: &Path, version: &str) -> Assets {
        let root = cache_dir.join(version);
        let vmlinux = root.join("vmlinux");
        Assets {
            kernel: if vmlinux.is_file() {
                vmlinux
            } else {
                root.join("vmlinuz")
            },
            initrd: root.join("initrd.img"),
            modules_dir: root.join("lib/modules").join(version),
            version: version.to_string(),
        }
    }

    /// The kernel's module metadata.
    pub fn module_index(&self) -> Result<ModuleIndex, Error> {
        let dep_path = self.modules_dir.join("modules.dep");
        let dep = fs::read_to_string(&dep_path).map_err(io_err(format!("reading {}", dep_path.display())))?;
        let builtin = fs::read_to_string(self.modules_dir.join("modules.builtin")).unwrap_or_default();
        Ok(ModuleIndex::parse(&dep, &builtin))
    }
}

/// The stamp records what the cached files were built from, so later calls can trust them without asking apt.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    version: String,
    initrd_inputs: String,
}

impl Stamp {
    fn render(&self) -> String {
        format!(
            "format={FORMAT}\nversion={}\ninitrd={}\n",
            self.version, self.initrd_inputs
        )
    }

    fn parse(text: &str) -> Option<Stamp> {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_string)
        };
        if field("format")? != FORMAT {
            return None;
        }
        let version = field("version")?;
        if version.is_empty() || version.contains('/') || version.starts_with('.') {
            return None;
        }
        Some(Stamp {
            version,
            initrd_inputs: field("initrd")?,
        })
    }
}

/// FNV-1a: a hash that stays the same across Rust releases, which is all a cache stamp needs.
fn fnv1a(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(&[0xffu8]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Finds the versioned kernel package the metapackage depends on in `apt-cache depends` output.
pub fn parse_kernel_package(depends_output: &str) -> Option<String> {
    depends_output.lines().find_map(|l| {
        let pkg = l.trim().strip_prefix("Depends:")?.trim();
        let pkg = pkg.trim_start_matches('<').trim_end_matches('>');
        (pkg.starts_with("linux-image-") && pkg.ends_with("-amd64") && !pkg.contains("unsigned")).then(|| pkg.into())
    })
}

/// `linux-image-6.1.0-56-amd64` → `6.1.0-56-amd64`.
pub fn kernel_version_of(package: &str) -> Option<&str> {
    package
        .strip_prefix("linux-image-")
        .filter(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
}

/// Whether an ELF file is statically linked (has no PT_INTERP program header). The initramfs has no libc.
pub fn elf_is_static(bytes: &[u8]) -> Option<bool> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None; // only 64-bit little-endian is expected here
    }
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let p_type = bytes.get(phoff + i * phentsize..phoff + i * phentsize + 4)?;
        if u32::from_le_bytes(p_type.try_into().ok()?) == 3 {
            return Some(false);
        }
    }
    Some(true)
}

/// Whether an ELF64 kernel image carries the Xen PVH entry note (type 18, name "Xen"), which lets qemu boot it
/// uncompressed with `-kernel`.
pub fn elf_has_pvh_note(bytes: &[u8]) -> bool {
    pvh_note(bytes).unwrap_or(false)
}

fn pvh_note(bytes: &[u8]) -> Option<bool> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let align4 = |n: usize| n.div_ceil(4) * 4;
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    for i in 0..usize::from(u16_at(0x38)?) {
        let ph = phoff + i * phentsize;
        if u32_at(ph)? != 4 {
            continue; // not PT_NOTE
        }
        let start = usize::try_from(u64_at(ph + 8)?).ok()?;
        let end = start.checked_add(usize::try_from(u64_at(ph + 32)?).ok()?)?;
        let mut at = start;
        while at + 12 <= end {
            let namesz = usize::try_from(u32_at(at)?).ok()?;
            let descsz = usize::try_from(u32_at(at + 4)?).ok()?;
            let kind = u32_at(at + 8)?;
            let name = bytes.get(at + 12..at + 12 + namesz)?;
            if kind == 18 && name == b"Xen\0" {
                return Some(true);
            }
            at += 12 + align4(namesz) + align4(descsz);
        }
    }
    Some(false)
}

/// Unpacks the ELF kernel inside an xz-compressed bzImage. Booting it directly (PVH) saves the guest from
/// decompressing ~60 MB under emulation on every boot. None when the image is not of that kind.
fn extract_vmlinux(bzimage: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    let start = bzimage.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC)?;
    let mut child = Command::new("xz")
        .args(["--decompress", "--stdout", "--single-stream"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let payload = bzimage[start..].to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&payload); // xz stops reading at the end of the stream; the rest is padding
    });
    let out = child.wait_with_output().ok()?;
    let _ = feeder.join();
    (out.status.success() && elf_has_pvh_note(&out.stdout)).then_some(out.stdout)
}

fn progress(msg: &str) {
    eprintln!("warren-lab vm: {msg}");
}

fn run(cmd: &mut Command) -> Result<String, Error> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(io_err(format!("running {shown}")))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: shown,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(program).is_file())
}

fn busybox_is_static() -> bool {
    fs::read(BUSYBOX).ok().and_then(|b| elf_is_static(&b)).unwrap_or(false)
}

/// Installs, with apt, the host packages the VM needs that are missing (qemu, a static busybox, kmod's depmod).
pub fn ensure_host_packages() -> Result<(), Error> {
    let mut missing = Vec::new();
    if !on_path("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if !busybox_is_static() {
        missing.push("busybox-static");
    }
    if !on_path("depmod") {
        missing.push("kmod");
    }
    if missing.is_empty() {
        return Ok(());
    }
    progress(&format!("installing {} with apt-get…", missing.join(" ")));
    let install = |pkgs: &[&str]| {
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install(&missing).is_err() {
        apt_update()?;
        install(&missing)?;
    }
    Ok(())
}

fn apt_update() -> Result<(), Error> {
    progress("refreshing the apt package index (apt-get update)…");
    run(Command::new("apt-get").args(["update", "-q"])).map(drop)
}

fn kernel_package() -> Result<String, Error> {
    let query = || {
        run(Command::new("apt-cache").args(["depends", KERNEL_META]))
            .ok()
            .and_then(|o| parse_kernel_package(&o))
    };
    if let Some(p) = query() {
        return Ok(p);
    }
    // An empty package index (fresh container images) knows no kernel at all.
    apt_update()?;
    query().ok_or_else(|| Error::Assets(format!("apt knows no kernel package behind {KERNEL_META}")))
}

/// Removes a directory tree when dropped, so a failed fetch leaves no half-unpacked staging area.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn fetch_kernel(cache_dir: &Path) -> Result<Assets, Error> {
    let package = kernel_package()?;
    let version = kernel_version_of(&package)
        .ok_or_else(|| Error::Assets(format!("cannot tell the kernel version from package {package}")))?
        .to_string();
    let staging = RemoveOnDrop(cache_dir.join(format!(".staging-{}", std::process::id())));
    let _ = fs::remove_dir_all(&staging.0);
    fs::create_dir_all(&staging.0).map_err(io_err(format!("creating {}", staging.0.display())))?;

    progress(&format!("fetching kernel {package} (apt-get download)…"));
    run(Command::new("apt-get")
        // apt drops to the _apt user for downloads, which cannot write into a root-owned cache.
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", &package])
        .current_dir(&staging.0))?;
    let deb = fs::read_dir(&staging.0)
        .map_err(io_err("listing the download dir"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| Error::Assets(format!("apt-get download left no .deb for {package}")))?;

    progress("unpacking the kernel package (dpkg -x)…");
    let tree = staging.0.join("tree");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))?;
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{version}"));
    let modules = [
        tree.join("lib/modules").join(&version),
        tree.join("usr/lib/modules").join(&version),
    ]
    .into_iter()
    .find(|p| p.is_dir())
    .ok_or_else(|| Error::Assets(format!("{package} holds no lib/modules/{version}")))?;
    if !vmlinuz.is_file() {
        return Err(Error::Assets(format!("{package} holds no boot/vmlinuz-{version}")));
    }

    let layout = Assets::at(cache_dir, &version);
    let root = cache_dir.join(&version);
    let _ = fs::remove_dir_all(&root);
    let parent = layout.modules_dir.parent().unwrap_or(&root);
    fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    fs::rename(&modules, &layout.modules_dir).map_err(io_err("moving the modules into the cache"))?;
    fs::rename(&vmlinuz, root.join("vmlinuz")).map_err(io_err("moving the kernel into the cache"))?;
    let bzimage = fs::read(root.join("vmlinuz")).map_err(io_err("reading the kernel"))?;
    match extract_vmlinux(&bzimage) {
        Some(elf) => fs::write(root.join("vmlinux"), elf).map_err(io_err("writing vmlinux"))?,
        None => progress("warning: cannot unpack an uncompressed PVH kernel; booting the compressed one (slower)"),
    }
    let assets = Assets::at(cache_dir, &version);

    progress("indexing kernel modules (depmod)…");
    run(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
    Ok(assets)
}

fn initrd_inputs(busybox: &[u8]) -> String {
    let modules = INITRD_MODULES.join(",");
    fnv1a(&[FORMAT.as_bytes(), INIT_SCRIPT.as_bytes(), modules.as_bytes(), busybox])
}

fn build_initrd(assets: &Assets, busybox: &[u8]) -> Result<(), Error> {
    progress("building the initramfs…");
    let index = assets.module_index()?;
    let order = index.load_order(INITRD_MODULES).map_err(|missing| {
        Error::Assets(format!(
            "kernel {} lacks modules the VM needs to boot: {}",
            assets.version,
            missing.join(" ")
        ))
    })?;
    let tmp = assets.initrd.with_extension("img.tmp");
    let file = File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    let mut a = Archive::new(BufWriter::new(file));
    let w = |r: std::io::Result<()>| r.map_err(io_err("writing the initramfs"));
    for d in ["/bin", "/dev", "/modules", "/proc", "/sys", "/tmp", "/newroot"] {
        w(a.dir(d, 0o755))?;
    }
    // The kernel opens /dev/console for /init's stdio before /init can mount devtmpfs.
    w(a.char_dev("/dev/console", 0o600, 5, 1))?;
    w(a.file("/bin/busybox", 0o755, busybox))?;
    w(a.symlink("/bin/sh", "busybox"))?;
    w(a.file("/init", 0o755, INIT_SCRIPT.as_bytes()))?;
    for m in &order {
        let rel = index
            .file(m)
            .ok_or_else(|| Error::Assets(format!("no file for module {m}")))?;
        let src = assets.modules_dir.join(rel);
        if !rel.ends_with(".ko") {
            return Err(Error::Assets(format!(
                "{rel}: compressed modules are not supported in the initramfs"
            )));
        }
        let bytes = fs::read(&src).map_err(io_err(format!("reading {}", src.display())))?;
        w(a.file(&format!("/modules/{m}.ko"), 0o644, &bytes))?;
    }
    let mut list = order.join("\n");
    list.push('\n');
    w(a.file("/modules/order", 0o644, list.as_bytes()))?;
    let out = a.finish().map_err(io_err("writing the initramfs"))?;
    out.into_inner()
        .map_err(|e| io_err("flushing the initramfs")(e.into_error()))?
        .sync_all()
        .map_err(io_err("syncing the initramfs"))?;
    fs::rename(&tmp, &assets.initrd).map_err(io_err("installing the initramfs"))
}

fn complete(a: &Assets) -> bool {
    a.kernel.is_file() && a.modules_dir.join("modules.dep").is_file()
}

/// Makes sure the kernel, its modules and the initramfs are in `cache_dir`, fetching and building what is missing.
/// Later calls only check the files against the stamp. Concurrent callers serialize on a lock file.
pub fn ensure_assets(cache_dir: &Path) -> Result<Assets, Error> {
    fs::create_dir_all(cache_dir).map_err(io_err(format!("creating {}", cache_dir.display())))?;
    let lock_path = cache_dir.join(LOCK);
    let lock = File::create(&lock_path).map_err(io_err(format!("opening {}", lock_path.display())))?;
    lock.lock()
        .map_err(io_err(format!("locking {}", lock_path.display())))?;

    ensure_host_packages()?;
    let busybox = fs::read(BUSYBOX).map_err(io_err(format!("reading {BUSYBOX}")))?;
    if elf_is_static(&busybox) != Some(true) {
        return Err(Error::Assets(format!(
            "{BUSYBOX} is not a static binary; install busybox-static"
        )));
    }
    let inputs = initrd_inputs(&busybox);
    let stamp_path = cache_dir.join(STAMP);
    let stamp = fs::read_to_string(&stamp_path).ok().and_then(|t| Stamp::parse(&t));

    let assets = match stamp {
        Some(s) if complete(&Assets::at(cache_dir, &s.version)) => {
            let assets = Assets::at(cache_dir, &s.version);
            if s.initrd_inputs == inputs && assets.initrd.is_file() {
                return Ok(assets);
            }
            assets
        }
        _ => fetch_kernel(cache_dir)?,
    };
    build_initrd(&assets, &busybox)?;
    let stamp = Stamp {
        version: assets.version.clone(),
        initrd_inputs: inputs,
    };
    let tmp = stamp_path.with_extension("tmp");
    fs::write(&tmp, stamp.render()).map_err(io_err("writing the assets stamp"))?;
    fs::rename(&tmp, &stamp_path).map_err(io_err("writing the assets stamp"))?;
    Ok(assets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_find_the_versioned_kernel_behind_the_metapackage() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(parse_kernel_package(out).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(kernel_version_of("linux-image-6.1.0-56-amd64"), Some("6.1.0-56-amd64"));
        assert_eq!(parse_kernel_package("linux-image-amd64\n"), None);
        assert_eq!(kernel_version_of("linux-image-amd64"), None);
    }

    #[test]
    fn should_round_trip_the_stamp_and_reject_foreign_ones() {
        let s = Stamp {
            version: "6.1.0-56-amd64".into(),
            initrd_inputs: "abc".into(),
        };
        assert_eq!(Stamp::parse(&s.render()), Some(s));
        assert_eq!(Stamp::parse("format=0\nversion=6.1\ninitrd=abc\n"), None);
        assert_eq!(Stamp::parse("format=1\nversion=../../etc\ninitrd=abc\n"), None);
    }

    #[test]
    fn should_change_initrd_inputs_when_busybox_changes() {
        assert_ne!(initrd_inputs(b"one"), initrd_inputs(b"two"));
        assert_eq!(initrd_inputs(b"one"), initrd_inputs(b"one"));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn should_find_the_pvh_note_only_in_kernels_that_have_it() {
        assert!(!elf_has_pvh_note(&fs::read("/proc/self/exe").unwrap()));
        assert!(!elf_has_pvh_note(
            b"not an elf at all, but long enough to look at its header bytes......"
        ));
        // A minimal ELF64 with one PT_NOTE segment holding the note.
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let note_at = elf.len() as u64;
        let mut note = Vec::new();
        note.extend(4u32.to_le_bytes());
        note.extend(8u32.to_le_bytes());
        note.extend(18u32.to_le_bytes());
        note.extend(b"Xen\0");
        note.extend(0x0100_0850u64.to_le_bytes());
        elf[64..68].copy_from_slice(&4u32.to_le_bytes());
        elf[64 + 8..64 + 16].copy_from_slice(&note_at.to_le_bytes());
        elf[64 + 32..64 + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        elf.extend(&note);
        assert!(elf_has_pvh_note(&elf));
        let kind_at = elf.len() - 16;
        elf[kind_at] = 17; // another note type
        assert!(!elf_has_pvh_note(&elf));
    }

    #[test]
    fn should_tell_static_from_dynamic_binaries() {
        let own = fs::read("/proc/self/exe").unwrap();
        assert_eq!(elf_is_static(&own), Some(false), "test binaries are dynamically linked");
        assert_eq!(elf_is_static(b"#!/bin/sh\n"), None);
        if let Ok(bb) = fs::read(BUSYBOX) {
            assert_eq!(
                elf_is_static(&bb),
                Some(true),
                "{BUSYBOX} should come from busybox-static"
            );
        }
    }
}
