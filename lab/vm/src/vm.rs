//! Starting, finding and stopping the qemu process.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::assets::Assets;
use crate::guest::{self, EXIT_STATUS, FAILED, PID_FILE, STARTED, STDERR, STDOUT};
use crate::modules::Availability;
use crate::{io_err, Error, DEFAULT_MODULES};

const QEMU: &str = "qemu-system-x86_64";
const HOSTNAME: &str = "warren-vm";
/// Boot normally takes 5–10 s under TCG; a busy 2-core machine can stretch that a lot.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(180);
const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(900);
/// Each of these shortens boot under emulation: the guest runs only the lab's own code (mitigations=off), qemu's
/// TSC is fine for a throwaway VM and far cheaper to read than the emulated HPET the kernel would otherwise pick
/// (tsc=reliable, no_timer_check), and the crypto self-tests, audit and AppArmor serve nothing here.
const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 mitigations=off tsc=reliable no_timer_check \
                              cryptomgr.notests audit=0 apparmor=0 8250.nr_uarts=1 random.trust_cpu=on";
const POLL: Duration = Duration::from_millis(50);
const CONSOLE_TAIL_LINES: usize = 40;

/// How to boot the VM and what to run in it.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub assets: Assets,
    pub memory_mb: u32,
    pub cpus: u32,
    /// Shared read-write into the guest at the same path; the pid file, markers and command output live here.
    pub shared_dir: PathBuf,
    /// (host port on 127.0.0.1, guest port) TCP forwards.
    pub forwards: Vec<(u16, u16)>,
    /// Run as root in the guest's view of the host root, with the caller's current directory as cwd.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Loaded in the guest before the command; ones the kernel lacks are skipped with a warning.
    pub modules: Vec<String>,
    pub console_log: PathBuf,
}

impl VmConfig {
    /// Defaults: 2048 MiB, 2 CPUs, no forwards, no extra env, [`DEFAULT_MODULES`], console log in `shared_dir`.
    pub fn new(assets: Assets, shared_dir: impl Into<PathBuf>, command: Vec<String>) -> VmConfig {
        let shared_dir = shared_dir.into();
        VmConfig {
            assets,
            memory_mb: 2048,
            cpus: 2,
            console_log: shared_dir.join("vm-console.log"),
            shared_dir,
            forwards: Vec::new(),
            command,
            env: Vec::new(),
            modules: DEFAULT_MODULES.iter().map(|m| m.to_string()).collect(),
        }
    }
}

/// What [`run_once`] brings back from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    /// The guest command's exit status (126/127 when it could not be started, as a shell reports it).
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Doubles commas, qemu's escape inside `-virtfs`/`-serial` option values.
pub fn qemu_escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The full qemu command line for `cfg` (with only the modules the kernel has).
pub fn qemu_args(cfg: &VmConfig) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    // KVM hangs on these machines (lab-vm.md), so this is plain TCG; multi-threaded TCG uses both host cores.
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
    ]);
    push(&["-smp", &cfg.cpus.to_string(), "-m", &cfg.memory_mb.to_string()]);
    push(&["-display", "none", "-monitor", "none", "-no-reboot"]);
    push(&["-serial", &format!("file:{}", qemu_escape(&cfg.console_log))]);
    push(&[
        "-kernel",
        &cfg.assets.kernel.to_string_lossy(),
        "-initrd",
        &cfg.assets.initrd.to_string_lossy(),
    ]);
    push(&["-append", KERNEL_CMDLINE]);
    push(&[
        "-virtfs",
        &format!(
            "local,path=/,mount_tag={},security_model=none,readonly=on,multidevs=remap",
            guest::HOSTROOT_TAG
        ),
    ]);
    push(&[
        "-virtfs",
        &format!(
            "local,path={},mount_tag={},security_model=none,multidevs=remap",
            qemu_escape(&cfg.shared_dir),
            guest::SHARED_TAG
        ),
    ]);
    if !cfg.forwards.is_empty() {
        // restrict=on: the guest can reach nothing outside; only the host-side forwards get in.
        let mut netdev = String::from("user,id=n0,restrict=on");
        for (host, guest_port) in &cfg.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest_port}"));
        }
        push(&["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"]);
    }
    push(&[
        "-daemonize",
        "-pidfile",
        &cfg.shared_dir.join(PID_FILE).to_string_lossy(),
    ]);
    a
}

fn validate(cfg: &VmConfig) -> Result<(), Error> {
    let bad = |m: String| Err(Error::Config(m));
    if cfg.command.is_empty() {
        return bad("command is empty".into());
    }
    if !cfg.shared_dir.is_absolute() || !cfg.shared_dir.is_dir() {
        return bad(format!(
            "shared_dir {} must be an existing absolute directory",
            cfg.shared_dir.display()
        ));
    }
    if !cfg.console_log.is_absolute() {
        return bad(format!("console_log {} must be absolute", cfg.console_log.display()));
    }
    for p in [&cfg.assets.kernel, &cfg.assets.initrd] {
        if !p.is_file() {
            return bad(format!("{} does not exist; call ensure_assets first", p.display()));
        }
    }
    if let Some((k, _)) = cfg.env.iter().find(|(k, _)| !guest::is_env_name(k)) {
        return bad(format!("{k:?} is not a valid environment variable name"));
    }
    if cfg.cpus == 0 || cfg.memory_mb < 256 {
        return bad(format!("{} CPUs and {} MiB are too little", cfg.cpus, cfg.memory_mb));
    }
    Ok(())
}

fn env_duration(var: &str, default: Duration) -> Duration {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(default)
}

/// The last lines of the serial console, for error messages.
pub fn console_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(no console log at {}: {e})", path.display()),
    }
}

fn proc_alive(pid: i32) -> bool {
    // A qemu reparented to a PID 1 that does not reap stays a zombie; it is gone for our purposes.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

fn proc_cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Whether `cmdline` is a qemu started by this crate for `shared_dir` (guards against a recycled pid).
pub fn is_our_qemu(cmdline: &[String], shared_dir: &Path) -> bool {
    let pidfile = shared_dir.join(PID_FILE).to_string_lossy().into_owned();
    cmdline.first().is_some_and(|c| c.ends_with(QEMU))
        && cmdline.windows(2).any(|w| w[0] == "-pidfile" && w[1] == pidfile)
}

/// The serial log path from a qemu command line (`-serial file:PATH`).
pub fn console_from_cmdline(cmdline: &[String]) -> Option<PathBuf> {
    cmdline
        .windows(2)
        .find(|w| w[0] == "-serial")
        .and_then(|w| w[1].strip_prefix("file:"))
        .map(|p| PathBuf::from(p.replace(",,", ",")))
}

/// A running micro-VM (a daemonized qemu).
#[derive(Debug)]
pub struct Vm {
    pid: i32,
    shared_dir: PathBuf,
    console_log: Option<PathBuf>,
}

impl Vm {
    /// Boots the VM detached from the caller (qemu daemonizes into its own session) and returns once the guest has
    /// started `cfg.command`. On failure or timeout the error carries the console's tail and qemu is gone.
    pub fn start(cfg: &VmConfig) -> Result<Vm, Error> {
        validate(cfg)?;
        if let Some(vm) = Vm::attach(&cfg.shared_dir)? {
            return Err(Error::AlreadyRunning {
                shared_dir: cfg.shared_dir.clone(),
                pid: vm.pid,
            });
        }
        let sd = &cfg.shared_dir;
        for f in [STARTED, FAILED, EXIT_STATUS, STDOUT, STDERR, PID_FILE] {
            match fs::remove_file(sd.join(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing stale {f}"))(e)),
            }
        }
        let modules = loadable_modules(cfg)?;
        let cwd = std::env::current_dir().map_err(io_err("reading the current directory"))?;
        let write =
            |name: &str, text: String| fs::write(sd.join(name), text).map_err(io_err(format!("writing {name}")));
        write(
            guest::BOOT_ENV,
            guest::boot_env(sd, &cfg.assets.version, &cfg.assets.modules_dir, &modules, HOSTNAME),
        )?;
        write(
            guest::COMMAND_SCRIPT,
            guest::command_script(&cwd, &cfg.env, &cfg.command),
        )?;
        if let Some(dir) = cfg.console_log.parent() {
            fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let _ = fs::remove_file(&cfg.console_log);

        let began = Instant::now();
        // -daemonize: qemu forks into its own session and its parent exits once the machine is set up, so setup
        // errors (a taken forward port, a bad path) come back here synchronously.
        let out = Command::new(QEMU)
            .args(qemu_args(cfg))
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("running {QEMU} (is qemu-system-x86 installed?)")))?;
        if !out.status.success() {
            return Err(Error::Boot {
                reason: format!(
                    "{QEMU} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                console_tail: console_tail(&cfg.console_log),
            });
        }
        let pid_text = fs::read_to_string(sd.join(PID_FILE)).map_err(io_err("reading qemu's pid file"))?;
        let pid = pid_text
            .trim()
            .parse::<i32>()
            .map_err(|_| Error::Config(format!("qemu wrote a bad pid file: {pid_text:?}")))?;
        let vm = Vm {
            pid,
            shared_dir: sd.clone(),
            console_log: Some(cfg.console_log.clone()),
        };

        let timeout = env_duration("WARREN_VM_START_TIMEOUT", DEFAULT_START_TIMEOUT);
        loop {
            if sd.join(STARTED).exists() {
                tracing::info!(
                    pid,
                    elapsed_ms = began.elapsed().as_millis() as u64,
                    "VM command started"
                );
                return Ok(vm);
            }
            let reason = if !vm.is_running() {
                let failed = fs::read_to_string(sd.join(FAILED)).unwrap_or_default();
                Some(format!(
                    "the VM powered off before starting the command {}",
                    failed.trim()
                ))
            } else if began.elapsed() > timeout {
                Some(format!("the command did not start within {}s", timeout.as_secs()))
            } else {
                None
            };
            if let Some(reason) = reason {
                let console = cfg.console_log.clone();
                let _ = vm.wait_or_kill(Duration::ZERO);
                return Err(Error::Boot {
                    reason,
                    console_tail: console_tail(&console),
                });
            }
            sleep(POLL);
        }
    }

    /// Finds the VM whose pid file is in `shared_dir`, if that qemu is still running.
    pub fn attach(shared_dir: &Path) -> Result<Option<Vm>, Error> {
        let pid_path = shared_dir.join(PID_FILE);
        let text = match fs::read_to_string(&pid_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", pid_path.display()))(e)),
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            return Ok(None);
        };
        match proc_cmdline(pid) {
            Some(cmdline) if proc_alive(pid) && is_our_qemu(&cmdline, shared_dir) => Ok(Some(Vm {
                pid,
                shared_dir: shared_dir.to_path_buf(),
                console_log: console_from_cmdline(&cmdline),
            })),
            _ => Ok(None),
        }
    }

    pub fn is_running(&self) -> bool {
        proc_alive(self.pid)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The serial console log, when known.
    pub fn console_log(&self) -> Option<&Path> {
        self.console_log.as_deref()
    }

    /// Waits up to `timeout` for the guest to power off, then kills qemu (TERM, then KILL). Returns the guest
    /// command's exit status if it wrote one. The pid file is removed either way.
    pub fn wait_or_kill(self, timeout: Duration) -> Result<Option<i32>, Error> {
        let deadline = Instant::now() + timeout;
        while self.is_running() && Instant::now() < deadline {
            sleep(POLL);
        }
        if self.is_running() {
            tracing::warn!(pid = self.pid, "VM still running; terminating qemu");
            self.signal_until_gone()?;
        }
        let _ = fs::remove_file(self.shared_dir.join(PID_FILE));
        let status = fs::read_to_string(self.shared_dir.join(EXIT_STATUS))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(status)
    }

    fn signal_until_gone(&self) -> Result<(), Error> {
        let pid = Pid::from_raw(self.pid);
        for (signal, grace) in [
            (Signal::SIGTERM, Duration::from_secs(3)),
            (Signal::SIGKILL, Duration::from_secs(10)),
        ] {
            match kill(pid, signal) {
                Ok(()) => {}
                Err(nix::errno::Errno::ESRCH) => return Ok(()),
                Err(e) => return Err(io_err(format!("signalling qemu {}", self.pid))(e.into())),
            }
            let deadline = Instant::now() + grace;
            while self.is_running() && Instant::now() < deadline {
                sleep(POLL);
            }
            if !self.is_running() {
                return Ok(());
            }
        }
        Err(Error::Config(format!("qemu {} survived SIGKILL", self.pid)))
    }
}

/// The requested modules the kernel can provide; the others are reported and skipped.
fn loadable_modules(cfg: &VmConfig) -> Result<Vec<String>, Error> {
    let index = cfg.assets.module_index()?;
    let (have, lack): (Vec<&String>, Vec<&String>) = cfg
        .modules
        .iter()
        .partition(|m| index.availability(m) != Availability::Missing);
    if !lack.is_empty() {
        let names: Vec<&str> = lack.iter().map(|s| s.as_str()).collect();
        tracing::warn!(modules = %names.join(" "), "kernel {} lacks these modules; skipping them", cfg.assets.version);
        eprintln!(
            "warren-lab vm: warning: kernel {} lacks modules {}",
            cfg.assets.version,
            names.join(" ")
        );
    }
    Ok(have.into_iter().cloned().collect())
}

/// Boots, runs `cfg.command` to completion, powers off. Bounded by `WARREN_VM_RUN_TIMEOUT` seconds (default 900).
pub fn run_once(cfg: &VmConfig) -> Result<RunOutput, Error> {
    let vm = Vm::start(cfg)?;
    let status = vm.wait_or_kill(env_duration("WARREN_VM_RUN_TIMEOUT", DEFAULT_RUN_TIMEOUT))?;
    let read = |name: &str| fs::read_to_string(cfg.shared_dir.join(name)).unwrap_or_default();
    match status {
        Some(status) => Ok(RunOutput {
            status,
            stdout: read(STDOUT),
            stderr: read(STDERR),
        }),
        None => Err(Error::NoExitStatus {
            console_tail: console_tail(&cfg.console_log),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        let assets = Assets {
            kernel: "/c/vmlinuz".into(),
            initrd: "/c/initrd.img".into(),
            modules_dir: "/c/lib/modules/6.1".into(),
            version: "6.1".into(),
        };
        let mut c = VmConfig::new(assets, "/srv/lab,state", vec!["true".into()]);
        c.forwards = vec![(16443, 6443), (18080, 80)];
        c
    }

    #[test]
    fn should_forward_only_to_loopback_with_a_restricted_network() {
        let args = qemu_args(&cfg());
        let i = args.iter().position(|a| a == "-netdev").unwrap();
        assert_eq!(
            args[i + 1],
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:16443-:6443,hostfwd=tcp:127.0.0.1:18080-:80"
        );
        let mut no_fwd = cfg();
        no_fwd.forwards.clear();
        assert!(
            !qemu_args(&no_fwd).iter().any(|a| a == "-netdev"),
            "no NIC at all without forwards"
        );
    }

    #[test]
    fn should_share_host_root_read_only_and_the_shared_dir_writable_with_escaped_commas() {
        let args = qemu_args(&cfg());
        let virtfs: Vec<&String> = args.windows(2).filter(|w| w[0] == "-virtfs").map(|w| &w[1]).collect();
        assert_eq!(virtfs.len(), 2);
        assert!(virtfs[0].starts_with("local,path=/,") && virtfs[0].contains("readonly=on"));
        assert!(virtfs[1].starts_with("local,path=/srv/lab,,state,") && !virtfs[1].contains("readonly"));
        assert!(!args.iter().any(|a| a.contains("kvm")), "KVM hangs here");
    }

    #[test]
    fn should_recognise_its_own_qemu_and_console_from_the_cmdline() {
        let c = cfg();
        let mut cmdline = vec!["/usr/bin/qemu-system-x86_64".to_string()];
        cmdline.extend(qemu_args(&c));
        assert!(is_our_qemu(&cmdline, &c.shared_dir));
        assert!(!is_our_qemu(&cmdline, Path::new("/elsewhere")));
        assert!(!is_our_qemu(
            &["/bin/sleep".into(), "-pidfile".into(), "/srv/lab,state/vm.pid".into()],
            &c.shared_dir
        ));
        assert_eq!(console_from_cmdline(&cmdline), Some(c.console_log.clone()));
    }

    #[test]
    fn should_reject_configs_that_cannot_boot() {
        let mut c = cfg();
        c.shared_dir = "relative".into();
        assert!(matches!(validate(&c), Err(Error::Config(_))));
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg();
        c.shared_dir = dir.path().into();
        c.console_log = dir.path().join("console");
        assert!(matches!(validate(&c), Err(Error::Config(m)) if m.contains("ensure_assets")));
        c.command.clear();
        assert!(matches!(validate(&c), Err(Error::Config(m)) if m.contains("command")));
    }

    #[test]
    fn should_see_a_missing_pid_file_as_no_vm() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Vm::attach(dir.path()).unwrap().is_none());
        // A pid file naming a live process that is not our qemu (this test process) is stale.
        fs::write(dir.path().join(PID_FILE), std::process::id().to_string()).unwrap();
        assert!(Vm::attach(dir.path()).unwrap().is_none());
    }
}
