//! Helpers shared by the ghost tests: build the C test programs, start them, watch their logs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// These tests trace and recreate real processes: without root they must fail, not skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "ghost tests need root (ptrace of other processes, clone3 set_tid, PR_SET_MM_MAP)"
    );
}

/// Compiles tests/c/NAME.c with gcc into `dir`.
pub fn build(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/c/{name}.c"));
    let out = dir.join(format!("{name}{}", extra.join("").replace(['-', '='], "")));
    let st = Command::new("gcc")
        .arg("-O2")
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .args(extra)
        .arg("-lm")
        .status()
        .expect("gcc must be installed to build the test programs");
    assert!(st.success(), "gcc failed on {}", src.display());
    out
}

/// Starts a test program with stdio on /dev/null and no other inherited fds (cargo leaks its
/// jobserver pipe, which no restore could recreate).
pub fn spawn(prog: &Path, args: &[&str]) -> Child {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(prog);
    // SAFETY: close_range is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::close_range(3, u32::MAX, 0);
            Ok(())
        });
    }
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn test program")
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Waits until `pred(contents of p)` holds.
pub fn wait_for(p: &Path, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let s = read(p);
        if pred(&s) {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what} in {}; it has:\n{}",
            p.display(),
            s.chars()
                .rev()
                .take(400)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Numeric lines of a counter log, in order.
pub fn counters(s: &str) -> Vec<u64> {
    s.lines().filter_map(|l| l.parse().ok()).collect()
}

pub fn kill(pid: i32) {
    // SAFETY: kill/waitpid on a process this test created.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z") && !s.contains(") X"))
        .unwrap_or(false)
}
