//! Starting and stopping real `coatcheck serve` processes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A `coatcheck serve` child process.
pub struct Serve {
    pub child: Child,
    pub url: String,
}

impl Serve {
    /// Starts `coatcheck serve` on a free loopback port with its data in
    /// `dir`, and waits for its ready line.
    pub fn start(dir: &Path, extra: &[&str]) -> Serve {
        let dir = dir.to_str().expect("a UTF-8 temp dir");
        let mut args = vec!["--listen", "127.0.0.1:0", "--data", dir];
        args.extend_from_slice(extra);
        Serve::with_args(&args)
    }

    /// Starts `coatcheck serve` with exactly `args` (after `serve`), and
    /// waits for its ready line (an `http://` or `https://` URL).
    pub fn with_args(args: &[&str]) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_coatcheck"))
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn coatcheck serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server prints a ready line");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_string();
        Serve { child, url }
    }

    /// Sends a signal (`-TERM`, `-HUP`, …).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// kill -9.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.child.wait().expect("exit status")
    }

    /// SIGTERM, then asserts a clean exit.
    pub fn stop(self) {
        let status = self.terminate();
        assert!(status.success(), "{status:?}");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `coatcheck ARGS` to completion with optional stdin.
pub fn run(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_coatcheck"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn coatcheck");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("output")
}
