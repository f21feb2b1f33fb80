//! What runs inside the guest: the initramfs `/init` and the two small files the host writes into the shared
//! directory for it (the boot settings, sourced by `/init`, and the command script run in the chroot).

use std::path::Path;

/// Names of the files the host and the guest exchange through the shared directory.
pub const BOOT_ENV: &str = "vm-boot.env";
pub const COMMAND_SCRIPT: &str = "vm-command.sh";
pub const STARTED: &str = "vm-started";
pub const FAILED: &str = "vm-failed";
pub const EXIT_STATUS: &str = "exit-status";
pub const STDOUT: &str = "vm-stdout";
pub const STDERR: &str = "vm-stderr";
pub const PID_FILE: &str = "vm.pid";

/// The 9p mount tags of the two shares.
pub const HOSTROOT_TAG: &str = "hostroot";
pub const SHARED_TAG: &str = "warrenshared";

/// The guest's address on qemu's user-mode network (the slirp default, which `hostfwd` targets); `/init` sets it.
pub const GUEST_ADDR: &str = "10.0.2.15";

/// PATH for the guest command: the host's usual root PATH, since the command sees the host's root.
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Modules `/init` needs before it can mount anything; their dependencies are resolved from modules.dep.
pub const INITRD_MODULES: &[&str] = &["virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay"];

/// PID 1 of the micro-VM (busybox sh). It powers the VM off on every path, so qemu (run with -no-reboot) always
/// exits; if it ever exits itself, the kernel panics and `panic=-1` reboots, which also ends qemu.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "warren-vm: $*"; }
halt_vm() { sync; poweroff -f; sleep 10; }
die() {
    say "FATAL: $*"
    if mountpoint -q /shared; then echo "$*" > /shared/vm-failed; fi
    if [ -n "$VM_SHARED_DIR" ] && mountpoint -q "/newroot$VM_SHARED_DIR"; then
        echo "$*" > "/newroot$VM_SHARED_DIR/vm-failed"
    fi
    halt_vm
}

while read -r m; do
    insmod "/modules/$m.ko" || die "insmod $m failed"
done < /modules/order

mkdir -p /host /shared /newroot /overlay
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 warrenshared /shared || die "cannot mount the shared dir"
[ -f /shared/vm-boot.env ] || die "no vm-boot.env in the shared dir"
. /shared/vm-boot.env
mount -t 9p -o "trans=virtio,version=9p2000.L,ro,msize=262144,cache=$VM_HOSTROOT_CACHE" hostroot /host \
    || die "cannot mount the host root"

# The host root stays read-only; writes in the guest land in RAM and vanish at power-off.
mount -t tmpfs -o mode=0755 tmpfs /overlay
mkdir -p /overlay/upper /overlay/work
mount -t overlay -o lowerdir=/host,upperdir=/overlay/upper,workdir=/overlay/work overlay /newroot \
    || die "cannot mount the overlay root"
R=/newroot
mount -t proc proc $R/proc || die "proc"
mount -t sysfs sysfs $R/sys || die "sysfs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || say "warning: no cgroup2"
mount -t devtmpfs devtmpfs $R/dev || die "devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts $R/dev/pts || die "devpts"
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run || die "run"
# /tmp stays the host's (read-only underneath, writable through the overlay): a checkout or build under /tmp
# must be visible at the same path, since the guest runs the host's binaries by their paths.
# Taken from /host (not $R) and mounted after the fresh /run, so that a cache or shared dir living under
# /run is not hidden by it.
mkdir -p "$R/lib/modules/$VM_KVER"
mount -o bind "/host$VM_MODULES_DIR" "$R/lib/modules/$VM_KVER" || die "cannot bind the kernel modules"
mkdir -p "$R$VM_SHARED_DIR"
mount -o move /shared "$R$VM_SHARED_DIR" || die "cannot place the shared dir"
S="$R$VM_SHARED_DIR"

hostname "$VM_HOSTNAME"
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 || die "cannot configure eth0"
fi

# The kernel runs its module helper in this initramfs, not in the chroot; point it at the chroot's kmod so that
# on-demand loading (a socket family, an iptables match, a link type) works as on a normal machine. By absolute
# path: busybox's chroot would otherwise prefer its own modprobe applet, which ignores softdeps.
MODPROBE=/sbin/modprobe
[ -x "$R$MODPROBE" ] || MODPROBE=/usr/sbin/modprobe
printf '#!/bin/busybox sh\nexec /bin/busybox chroot /newroot %s "$@"\n' "$MODPROBE" > /bin/chroot-modprobe
chmod 0755 /bin/chroot-modprobe
echo /bin/chroot-modprobe > /proc/sys/kernel/modprobe

say "loading modules after $(cut -d' ' -f1 /proc/uptime)s"
if [ -n "$VM_MODULES" ]; then
    # Loaded up front all the same: some features (tunl0 in every new netns) appear only once a module is loaded.
    chroot $R $MODPROBE -a $VM_MODULES 2>/tmp/modprobe.err || { say "warning: modprobe:"; cat /tmp/modprobe.err; }
fi

say "starting command after $(cut -d' ' -f1 /proc/uptime)s"
: > "$S/vm-started"
env -i PATH="$VM_PATH" HOME=/root TERM=dumb chroot $R /bin/sh "$VM_SHARED_DIR/vm-command.sh" \
    < /dev/null > "$S/vm-stdout" 2> "$S/vm-stderr"
rc=$?
echo "$rc" > "$S/exit-status.tmp" && mv "$S/exit-status.tmp" "$S/exit-status"
say "command exited with status $rc"
halt_vm
"#;

/// Quotes `s` as one word for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether `name` can be an environment variable name in a shell `export`.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// The 9p cache mode for the host root. `mmap` lets the guest keep executables and libraries it has mapped in its page
/// cache, which makes starting programs several times faster under emulation; it stays coherent for files the host
/// replaces (cargo writes new inodes). `WARREN_VM_9P_CACHE` overrides it (`none`, `loose`, `mmap`).
pub fn hostroot_cache() -> String {
    match std::env::var("WARREN_VM_9P_CACHE") {
        Ok(mode) if ["none", "loose", "mmap", "fscache"].contains(&mode.as_str()) => mode,
        _ => "mmap".to_string(),
    }
}

/// The settings `/init` sources from the shared directory.
pub fn boot_env(
    shared_dir: &Path,
    kernel_version: &str,
    modules_dir: &Path,
    modules: &[String],
    hostname: &str,
) -> String {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    format!(
        "VM_SHARED_DIR={}\nVM_KVER={}\nVM_MODULES_DIR={}\nVM_MODULES={}\nVM_HOSTNAME={}\nVM_PATH={}\nVM_HOSTROOT_CACHE={}\n",
        q(shared_dir),
        shell_quote(kernel_version),
        q(modules_dir),
        shell_quote(&modules.join(" ")),
        shell_quote(hostname),
        shell_quote(GUEST_PATH),
        shell_quote(&hostroot_cache()),
    )
}

/// The script the guest runs in the chroot: same cwd as the host, the given environment, then `exec` the command.
/// Callers validate the env names with [`is_env_name`] first.
pub fn command_script(cwd: &Path, env: &[(String, String)], command: &[String]) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!("cd {} || exit 126\n", shell_quote(&cwd.to_string_lossy())));
    for (k, v) in env {
        s.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    let words: Vec<String> = command.iter().map(|w| shell_quote(w)).collect();
    s.push_str(&format!("exec {}\n", words.join(" ")));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn should_quote_words_so_sh_gives_them_back_unchanged() {
        let nasty = ["plain", "two words", "it's", "$HOME `x` \"q\"", "", "a\nb", "'"];
        let script: Vec<String> = nasty.iter().map(|w| shell_quote(w)).collect();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("for a in {}; do printf '%s\\0' \"$a\"; done", script.join(" ")))
            .output()
            .unwrap();
        let got: Vec<&str> = std::str::from_utf8(&out.stdout)
            .unwrap()
            .split_terminator('\0')
            .collect();
        assert_eq!(got, nasty);
    }

    #[test]
    fn should_render_a_command_script_that_runs_with_cwd_env_and_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let script = command_script(
            dir.path(),
            &[("GREETING".into(), "it's me".into())],
            &["sh".into(), "-c".into(), "echo \"$GREETING\" in $(pwd); exit 7".into()],
        );
        let path = dir.path().join("s.sh");
        std::fs::write(&path, script).unwrap();
        let out = Command::new("/bin/sh").arg(&path).current_dir("/").output().unwrap();
        assert_eq!(out.status.code(), Some(7));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("it's me in {}", dir.path().display())
        );
    }

    #[test]
    fn should_accept_only_shell_variable_names() {
        assert!(is_env_name("RUST_LOG") && is_env_name("_x1"));
        assert!(!is_env_name("1X") && !is_env_name("A-B") && !is_env_name("") && !is_env_name("A B"));
    }

    #[test]
    fn should_render_boot_env_that_sh_can_source() {
        let env = boot_env(
            Path::new("/tmp/x y"),
            "6.1.0-56-amd64",
            Path::new("/var/cache/m"),
            &["ipip".into(), "veth".into()],
            "warren",
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{env}\nprintf '%s|%s|%s|%s' \"$VM_SHARED_DIR\" \"$VM_KVER\" \"$VM_MODULES\" \"$VM_PATH\""
            ))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("/tmp/x y|6.1.0-56-amd64|ipip veth|{GUEST_PATH}")
        );
    }

    #[test]
    fn should_have_an_init_script_busybox_sh_can_parse() {
        let out = Command::new("busybox")
            .args(["sh", "-n", "-c", INIT_SCRIPT])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
