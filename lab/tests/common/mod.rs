//! The harness the lab's end-to-end tests share: the `warren-lab` CLI run against one lab per
//! test file, taken down when the harness is dropped, even after a failed check.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("WARREN_BIN_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release")
}

pub struct Lab {
    pub exe: PathBuf,
    pub state: PathBuf,
}

impl Lab {
    pub fn cmd(&self, args: &[&str]) -> Output {
        let out = Command::new(&self.exe)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .output()
            .expect("running warren-lab");
        eprintln!(
            "$ warren-lab {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(out.status.success(), "warren-lab {} failed", args.join(" "));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("JSON output")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(&self.exe)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("down")
            .status();
    }
}

impl Lab {
    /// The harness for a lab of this test file (state in `/run/warren-lab-<name>-<pid>`), not
    /// started yet.
    pub fn named(name: &str) -> Lab {
        let exe = bin_dir().join("warren-lab");
        assert!(
            exe.exists(),
            "{} is missing: build with `cargo build --release --workspace --bins`",
            exe.display()
        );
        Lab {
            exe,
            state: PathBuf::from(format!("/run/warren-lab-{name}-{}", std::process::id())),
        }
    }

    /// [`Lab::named`], brought up: returns when the three nodes are Ready.
    pub fn up(name: &str) -> Lab {
        let lab = Lab::named(name);
        let t0 = std::time::Instant::now();
        let up = lab.ok(&["up"]);
        assert!(up.contains("3 nodes Ready"), "{up}");
        eprintln!("lab up after {:.1?}", t0.elapsed());
        lab
    }

    /// Waits (at most 2 min) until `n` pods are Running with an IP; returns the pod list.
    pub fn wait_running(&self, n: usize) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let v = self.json(&["kubectl", "--", "get", "pods", "-A", "-o", "json"]);
            let running = v["items"].as_array().map_or(0, |a| {
                a.iter()
                    .filter(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
                    .count()
            });
            if running >= n {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {running} of {n} pods Running"
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    /// Probes `from` → `to` on TCP `port` in a loop until [`Prober::stop`].
    pub fn probe_loop(&self, from: &str, to: &str, port: u16) -> Prober {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (exe, st, flag) = (self.exe.clone(), self.state.clone(), stop.clone());
        let (from, to, port) = (from.to_string(), to.to_string(), port.to_string());
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new(&exe)
                    .arg("--state-dir")
                    .arg(&st)
                    .args(["probe", &from, &to, "--port", &port, "--timeout", "2"])
                    .output()
                    .expect("running warren-lab probe");
                if out.status.success() {
                    ok += 1
                } else {
                    failed += 1
                }
            }
            (ok, failed)
        });
        Prober { stop, thread }
    }
}

/// A background probe loop (see [`Lab::probe_loop`]).
pub struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u32, u32)>,
}

impl Prober {
    /// Stops the loop; returns (connected, failed) probe counts.
    pub fn stop(self) -> (u32, u32) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the probe thread")
    }
}
