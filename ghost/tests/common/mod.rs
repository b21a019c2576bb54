//! Helpers shared by the ghost tests: build the C test programs, start them, watch their logs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

/// The `krg` binary of this build (scripts/test builds every binary before the tests).
pub fn krg() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join("krg");
    assert!(
        p.exists(),
        "{} is missing: build it first with `cargo build -p kerfs-cli --bin krg` (scripts/test does)",
        p.display()
    );
    p
}

/// PIDs of live processes running `prog`.
pub fn pids_of(prog: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .as_deref()
            == Some(prog)
            && alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

/// Innermost-namespace PID of `pid`.
pub fn ns_pid(pid: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|p| p.parse().ok())
        .unwrap()
}

/// Checks a counter log is 1, 2, 3... with no gap or repeat and at least `min` lines.
pub fn assert_consecutive(s: &str, min: usize) {
    let c = counters(s);
    assert!(c.len() >= min, "only {} counters", c.len());
    for (i, v) in c.iter().enumerate() {
        assert_eq!(*v, i as u64 + 1, "counter sequence broken at line {i}");
    }
}

/// Exports `pid` into memory and kills it (checkpoint-and-kill).
pub fn export_killed(pid: i32) -> kerfs_ghost::MemWriter {
    let mut w = kerfs_ghost::MemWriter::default();
    kerfs_ghost::export_process(
        pid,
        &kerfs_ghost::ExportOptions {
            after: kerfs_ghost::After::Kill,
            ..Default::default()
        },
        &mut w,
    )
    .expect("export");
    w
}

/// Kills every process running `.0` (a test's own build of a program: the original, the
/// restored ones, their children) when the test ends, also when it fails.
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in pids_of(&self.0) {
            kill(pid);
        }
    }
}

/// `krg checkpoint PID --to IMG EXTRA...`, its output kept for the test to judge.
pub fn checkpoint(pid: i32, img: &Path, extra: &[&str]) -> Output {
    Command::new(krg())
        .args(["checkpoint", &pid.to_string(), "--to"])
        .arg(img)
        .args(extra)
        .output()
        .expect("run krg checkpoint")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
