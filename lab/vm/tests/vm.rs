//! Boots the real micro-VM (root, qemu TCG, Debian's kernel from apt). Each test is one boot of ~10 s; they share a
//! lock because two TCG guests on a 2-core machine only slow each other down.
//!
//! The kernel cache is `$WARREN_LAB_CACHE` or `/var/cache/warren-lab` (the lab's), fetched on first use.

#![allow(clippy::unwrap_used)] // test code: a panic with the error is the report

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lab_vm::{ensure_assets, run_once, Assets, Error, Vm, VmConfig};

static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn assets() -> Assets {
    let cache = std::env::var_os("WARREN_LAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or("/var/cache/warren-lab".into());
    ensure_assets(&cache).expect("kernel assets")
}

/// A shared dir for one test that also kills a VM the test left running, even when the test fails.
struct Shared {
    dir: tempfile::TempDir,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            dir: tempfile::Builder::new().prefix("warren-vm-test-").tempdir().unwrap(),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(Some(vm)) = Vm::attach(self.dir.path()) {
            let _ = vm.wait_or_kill(Duration::ZERO);
        }
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn process_exists(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()) != Some("Z"))
        .unwrap_or(false)
}

fn session_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after "comm)": state ppid pgrp session ...
    stat.rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn should_run_ipip_ipvs_and_sctp_in_the_guest_and_bring_back_status_output_and_files() {
    let _one = serial();
    let assets = assets();
    let shared = Shared::new();
    let me = std::env::current_exe().unwrap();
    let script = format!(
        r#"set -e
echo "kernel $(uname -r) cwd $(pwd) greeting $GREETING"
echo "clock $(date +%s)"
ip netns add wrnvmtest
ip -n wrnvmtest -o link show tunl0
ip netns del wrnvmtest
ipvsadm -A -t 10.0.0.1:80 -s rr
ip link add wrnvx0 type vxlan id 42 dstport 4789 dev lo && grep -q '^vxlan ' /proc/modules && echo autoload-ok
ipvsadm -Ln | grep -q 'TCP  10.0.0.1:80 rr' && echo ipvs-ok
python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP); print("sctp-ok")'
{me} --ignored --exact guest_side_kernel_has_ipip >&2
echo written-in-guest > {shared}/from-guest
echo to-stderr >&2
exit 7
"#,
        me = me.display(),
        shared = shared.path().display()
    );
    let mut cfg = VmConfig::new(assets.clone(), shared.path(), sh(&script));
    cfg.env = vec![("GREETING".into(), "it's \"quoted\"".into())];
    let began = Instant::now();
    let out = run_once(&cfg).expect("run_once");
    eprintln!("boot + run + power-off: {:?}", began.elapsed());
    eprintln!("--- stdout\n{}--- stderr\n{}", out.stdout, out.stderr);

    assert_eq!(out.status, 7, "the guest command's exit status comes back");
    let cwd = std::env::current_dir().unwrap();
    assert!(
        out.stdout.contains(&format!(
            "kernel {} cwd {} greeting it's \"quoted\"",
            assets.version,
            cwd.display()
        )),
        "Debian's kernel, the caller's cwd and the env reach the command"
    );
    let guest_clock: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("clock "))
        .unwrap()
        .parse()
        .unwrap();
    let host_clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        host_clock.abs_diff(guest_clock) < 120,
        "guest clock {guest_clock} vs host {host_clock} (certificates)"
    );
    assert!(
        out.stdout.contains("tunl0"),
        "a fresh netns in the guest has tunl0 (ipip)"
    );
    assert!(
        out.stdout.contains("autoload-ok"),
        "modules outside the list load on demand (vxlan)"
    );
    assert!(out.stdout.contains("ipvs-ok"), "ipvsadm adds a virtual server");
    assert!(out.stdout.contains("sctp-ok"), "SCTP sockets open");
    assert!(
        out.stderr.contains("1 passed"),
        "kernel_has_ipip() is true inside the guest"
    );
    assert!(out.stderr.contains("to-stderr"));
    assert_eq!(
        std::fs::read_to_string(shared.path().join("from-guest")).unwrap(),
        "written-in-guest\n"
    );
    assert!(
        !shared.path().join(lab_vm::PID_FILE).exists(),
        "the pid file is gone after power-off"
    );
}

/// Runs only inside the VM, started by the test above.
#[test]
#[ignore = "runs inside the micro-VM"]
fn guest_side_kernel_has_ipip() {
    assert!(lab_vm::kernel_has_ipip());
}

#[test]
fn should_forward_a_loopback_port_to_a_detached_guest_and_leave_no_qemu_behind() {
    let _one = serial();
    let shared = Shared::new();
    let port = free_port();
    // The guest answers one connection: it echoes the line it gets, prefixed, then the VM powers off.
    let server = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7777)); s.listen(1)
c, _ = s.accept()
line = c.makefile().readline()
c.sendall(("guest got " + line).encode()); c.close()
"#;
    let mut cfg = VmConfig::new(
        assets(),
        shared.path(),
        vec!["python3".into(), "-c".into(), server.into()],
    );
    cfg.forwards = vec![(port, 7777)];
    cfg.modules = vec!["ipip".into(), "no_such_module_here".into()];
    let began = Instant::now();
    let vm = Vm::start(&cfg).expect("start");
    eprintln!("start returned after {:?}", began.elapsed());
    let pid = vm.pid();
    assert!(vm.is_running());
    assert_ne!(
        session_of(pid),
        session_of(std::process::id() as i32),
        "qemu runs in its own session"
    );

    let attached = Vm::attach(shared.path()).unwrap().expect("attach finds the running VM");
    assert_eq!(attached.pid(), pid);
    match Vm::start(&cfg) {
        Err(Error::AlreadyRunning { pid: p, .. }) => assert_eq!(p, pid),
        other => panic!("a second start on the same shared dir must refuse, got {other:?}"),
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let reply = loop {
        let attempt = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(b"hello\n")?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line)
        });
        match attempt {
            Ok(line) if !line.is_empty() => break line,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("no reply through the forward: {other:?}"),
        }
    };
    eprintln!("first reply through the forward after {:?}", began.elapsed());
    assert_eq!(reply, "guest got hello\n");

    let status = vm.wait_or_kill(Duration::from_secs(60)).unwrap();
    assert_eq!(status, Some(0), "the guest powered off by itself after its command");
    assert!(!process_exists(pid), "no qemu remains");
    assert!(!shared.path().join(lab_vm::PID_FILE).exists());
    assert!(Vm::attach(shared.path()).unwrap().is_none());
}

#[test]
fn should_kill_a_guest_that_does_not_finish_in_time() {
    let _one = serial();
    let shared = Shared::new();
    let cfg = VmConfig::new(assets(), shared.path(), vec!["sleep".into(), "600".into()]);
    let vm = Vm::start(&cfg).expect("start");
    let pid = vm.pid();
    let began = Instant::now();
    assert_eq!(
        vm.wait_or_kill(Duration::from_secs(1)).unwrap(),
        None,
        "killed: no exit status"
    );
    assert!(began.elapsed() < Duration::from_secs(15));
    assert!(!process_exists(pid), "qemu was killed");
    assert!(!shared.path().join(lab_vm::PID_FILE).exists());
}

#[test]
fn should_fail_start_with_qemus_reason_when_the_forward_port_is_taken() {
    let _one = serial();
    let shared = Shared::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = VmConfig::new(assets(), shared.path(), vec!["true".into()]);
    cfg.forwards = vec![(taken.local_addr().unwrap().port(), 80)];
    match Vm::start(&cfg) {
        Err(Error::Boot { reason, .. }) => assert!(reason.contains("hostfwd"), "{reason}"),
        other => panic!("expected a boot error, got {other:?}"),
    }
    assert!(Vm::attach(shared.path()).unwrap().is_none(), "nothing left running");
}

#[test]
fn should_reuse_cached_assets_without_fetching_again() {
    let first = assets();
    let mtime = std::fs::metadata(&first.initrd).unwrap().modified().unwrap();
    let began = Instant::now();
    let second = assets();
    assert_eq!(first, second);
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "fast path took {:?}",
        began.elapsed()
    );
    assert_eq!(
        std::fs::metadata(&second.initrd).unwrap().modified().unwrap(),
        mtime,
        "initrd not rebuilt"
    );
    assert!(second.modules_dir.join("kernel/net/ipv4/ipip.ko").is_file());
}

#[test]
fn should_report_a_guest_that_dies_during_boot_with_its_console() {
    let _one = serial();
    let shared = Shared::new();
    let mut assets = assets();
    // An initramfs with nothing in it: the kernel finds no /init and panics; panic=-1 and -no-reboot end qemu.
    let empty_initrd = shared.path().join("empty-initrd");
    let mut trailer = b"070701".to_vec();
    trailer.extend(format!("{:08x}", 0).repeat(11).as_bytes());
    trailer.extend(format!("{:08x}{:08x}", 11, 0).as_bytes());
    trailer.extend(b"TRAILER!!!\0");
    trailer.resize(trailer.len().div_ceil(4) * 4, 0);
    std::fs::write(&empty_initrd, trailer).unwrap();
    assets.initrd = empty_initrd;
    let cfg = VmConfig::new(assets, shared.path(), vec!["true".into()]);
    let began = Instant::now();
    match Vm::start(&cfg) {
        Err(Error::Boot { reason, console_tail }) => {
            assert!(reason.contains("powered off before starting"), "{reason}");
            assert!(
                console_tail.contains("Kernel panic"),
                "the console tail explains it:\n{console_tail}"
            );
        }
        other => panic!("expected a boot error, got {other:?}"),
    }
    assert!(
        began.elapsed() < Duration::from_secs(120),
        "noticed when qemu exited, not at the timeout"
    );
    assert!(Vm::attach(shared.path()).unwrap().is_none());
}
