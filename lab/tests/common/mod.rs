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
