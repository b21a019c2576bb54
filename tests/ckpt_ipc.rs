//! System V IPC checkpoint and restart with real objects and real processes: `krg ipc
//! checkpoint` of a message queue, a semaphore array and a shared memory segment into a file
//! and into a checkpoint store, `krg ipc restart` with the same ids, keys, owners, modes and
//! contents, refusals (damaged image, id or key taken) that create nothing, and `krg
//! checkpoint --ipc` + `krg restart` of a process that uses a queue and a semaphore array.
//!
//! The objects live in the host's IPC namespace, under keys derived from the test's pid; they
//! are removed however a test ends. Needs root (ids are chosen through
//! /proc/sys/kernel/*_next_id; ptrace and PID namespaces for the process test).

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{ensure, Context, Result};
use kerfs_tests::*;

/// One test at a time: each runs a cluster, and the next ids are one per IPC namespace.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The ids of the objects `sysv_ipc create` made.
#[derive(Debug, Clone, Copy)]
struct Ids {
    msg: i32,
    sem: i32,
    shm: i32,
}

/// Keys `base..base+4` of this test process (`sysv_ipc create` uses base, +1, +2).
fn key_base(test: u32) -> i32 {
    (0x4b50_0000 | ((std::process::id() & 0x3ff) << 6) | (test << 3)) as i32
}

/// `(key, id)` of every object of `kind` ("msg", "sem", "shm") in /proc/sysvipc.
fn sysv(kind: &str) -> Vec<(i32, i32)> {
    let text = read(Path::new(&format!("/proc/sysvipc/{kind}")));
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// Every object whose key is one of `keys`, as "kind key id", sorted.
fn objects_with(keys: &[i32]) -> Vec<String> {
    let mut out: Vec<String> = ["msg", "sem", "shm"]
        .iter()
        .flat_map(|k| {
            sysv(k)
                .into_iter()
                .filter(|(key, _)| keys.contains(key))
                .map(move |(key, id)| format!("{k} {key:#x} {id}"))
        })
        .collect();
    out.sort();
    out
}

/// Removes, on drop, every object whose key is one of its keys (and the ids it was told of).
struct Cleanup {
    keys: Vec<i32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (kind, flag) in [("msg", "-q"), ("sem", "-s"), ("shm", "-m")] {
            for (key, id) in sysv(kind) {
                if self.keys.contains(&key) {
                    let _ = Command::new("ipcrm").args([flag, &id.to_string()]).status();
                }
            }
        }
    }
}

fn run(prog: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        out.status.success(),
        "{} {args:?} failed: {}",
        prog.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn create(prog: &Path, key: i32) -> Result<Ids> {
    let out = run(prog, &["create", &key.to_string()])?;
    let id = |tag: &str| -> Result<i32> {
        out.lines()
            .find_map(|l| l.strip_prefix(tag)?.trim().parse().ok())
            .with_context(|| format!("no {tag} line in {out:?}"))
    };
    Ok(Ids {
        msg: id("MSG ")?,
        sem: id("SEM ")?,
        shm: id("SHM ")?,
    })
}

fn dump(prog: &Path, msg: i32, sem: i32, shm: i32) -> Result<String> {
    run(
        prog,
        &["dump", &msg.to_string(), &sem.to_string(), &shm.to_string()],
    )
}

fn dump_all(prog: &Path, ids: Ids) -> Result<String> {
    dump(prog, ids.msg, ids.sem, ids.shm)
}

/// A dump without what a restart cannot keep (queue times and pids).
fn kept(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with("MSGTIMES"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The message lines of a dump ("M i type=.. len=.. sum=..").
fn messages(dump: &str) -> Vec<String> {
    dump.lines()
        .filter(|l| l.starts_with("M "))
        .map(str::to_string)
        .collect()
}

fn ipcrm(ids: Ids) -> Result<()> {
    let st = Command::new("ipcrm")
        .args(["-q", &ids.msg.to_string()])
        .args(["-s", &ids.sem.to_string()])
        .args(["-m", &ids.shm.to_string()])
        .status()
        .context("ipcrm (util-linux) must be installed")?;
    ensure!(st.success(), "ipcrm of {ids:?} failed");
    Ok(())
}

/// Resident bytes of segment `id` (/proc/sysvipc/shm's rss column).
fn shm_rss(id: i32) -> Result<u64> {
    let t = kerfs_ghost::ipc::ProcTable::read("shm")?;
    let col = t
        .column(&["rss"])
        .context("/proc/sysvipc/shm has no rss column")?;
    let id_col = t
        .column(&["shmid"])
        .context("/proc/sysvipc/shm has no shmid column")?;
    t.lookup(id_col, id, col)
        .with_context(|| format!("segment {id} is not in /proc/sysvipc/shm"))
}

/// `krg ARGS` that must fail; returns its stderr.
fn krg_fails(cluster: &KerfsCluster, args: &[&str]) -> Result<String> {
    let out = krg(cluster, args)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "krg {args:?} succeeded: {err}");
    Ok(err)
}

/// Makes the next message queue get id `id` (as krg does) and creates one with `key`.
fn queue_at(id: i32, key: i32) -> Result<i32> {
    std::fs::write("/proc/sys/kernel/msg_next_id", format!("{id}\n"))?;
    // SAFETY: plain msgget.
    let got = unsafe { libc::msgget(key, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
    ensure!(got == id, "msgget under id {id} gave {got}");
    Ok(got)
}

async fn cluster() -> Result<KerfsCluster> {
    require_root_and_fuse();
    init_tracing();
    KerfsCluster::start(KerfsClusterOptions::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipc_objects_through_a_file_and_the_store() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = cluster().await?;
    let d = tempfile::tempdir()?;
    let prog = build(d.path(), "sysv_ipc")?;
    let key = key_base(0);
    let keys = [key, key + 1, key + 2, key + 3];
    let _cleanup = Cleanup {
        keys: keys.to_vec(),
    };
    let ids = create(&prog, key)?;
    let (m, s, h) = (
        ids.msg.to_string(),
        ids.sem.to_string(),
        ids.shm.to_string(),
    );
    let rss = shm_rss(ids.shm)?;
    let queue = dump(&prog, ids.msg, -1, -1)?;

    let img = d.path().join("ipc.img");
    let img_s = img.to_str().unwrap();
    let out = krg_ok(
        &cluster,
        &[
            "ipc",
            "checkpoint",
            "-m",
            &m,
            "-s",
            &s,
            "-M",
            &h,
            "--to",
            img_s,
        ],
    )?;
    ensure!(
        out.contains(&format!("saved message queue {m}")) && out.contains("7 messages"),
        "krg ipc checkpoint said: {out}"
    );
    krg_ok(
        &cluster,
        &[
            "ipc",
            "checkpoint",
            "--msg",
            &m,
            "--sem",
            &s,
            "--shm",
            &h,
            "--to",
            "kerfs:/ipc/t1",
        ],
    )?;
    // The checkpoints copied the messages without receiving any: the queue, its receive time
    // and last receiver included, is as it was.
    ensure!(
        dump(&prog, ids.msg, -1, -1)? == queue,
        "the checkpoint changed the queue: {queue} became {}",
        dump(&prog, ids.msg, -1, -1)?
    );
    // Only the pages in memory were read: the untouched ones of the 8 MiB segment are still
    // not allocated, and the image holds the 7 non-zero pages and the messages.
    ensure!(
        shm_rss(ids.shm)? == rss,
        "the checkpoint made the segment's rss grow from {rss} to {}",
        shm_rss(ids.shm)?
    );
    let size = std::fs::metadata(&img)?.len();
    ensure!(
        size < 64 << 10,
        "the image of 7 non-zero pages and 12 KiB of messages takes {size} bytes"
    );

    let full = dump_all(&prog, ids)?;
    ensure!(
        messages(&full).len() == 7
            && full.lines().filter(|l| l.starts_with("S ")).count() == 6
            && full.lines().filter(|l| l.starts_with("P ")).count() == 7,
        "unexpected objects: {full}"
    );
    let want = kept(&full);

    // From the file: same ids, keys, modes, owners, values and contents; the messages are
    // received in their order with their types.
    ipcrm(ids)?;
    ensure!(objects_with(&keys).is_empty());
    let out = krg_ok(&cluster, &["ipc", "restart", img_s])?;
    ensure!(
        out.contains(&format!("restored semaphore array {s}")),
        "krg ipc restart said: {out}"
    );
    let got = dump_all(&prog, ids)?;
    ensure!(
        kept(&got) == want,
        "restored from the file:\n{got}\nwant:\n{want}"
    );
    let drained = run(&prog, &["drain", &m])?;
    ensure!(
        messages(&drained) == messages(&full),
        "messages received after the restart:\n{drained}\nwant:\n{}",
        messages(&full).join("\n")
    );

    // From the store.
    ipcrm(ids)?;
    krg_ok(&cluster, &["ipc", "restart", "kerfs:/ipc/t1"])?;
    let got = dump_all(&prog, ids)?;
    ensure!(
        kept(&got) == want,
        "restored from the store:\n{got}\nwant:\n{want}"
    );
    let ls = krg_ok(&cluster, &["ls", "kerfs:/ipc/t1"])?;
    ensure!(
        ls.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"1") && f.get(3) == Some(&"0") && f.get(4) == Some(&"3")
        }),
        "krg ls does not show version 1 with 0 processes and 3 IPC objects:\n{ls}"
    );
    let err = krg_fails(&cluster, &["restart", "kerfs:/ipc/t1"])?;
    ensure!(
        err.contains("krg ipc restart"),
        "krg restart of an IPC-only version: {err}"
    );

    // The objects exist: a second restart is refused and creates nothing.
    let before = objects_with(&keys);
    let err = krg_fails(&cluster, &["ipc", "restart", img_s])?;
    ensure!(
        err.contains("nothing was created") && err.contains(&format!("id {m} is taken")),
        "restart over existing objects: {err}"
    );
    ensure!(objects_with(&keys) == before);

    // The queue's id is taken by another queue (another key): nothing is created, not even
    // the semaphore array and the segment whose ids are free.
    ipcrm(ids)?;
    let other = queue_at(ids.msg, key + 3)?;
    for from in [img_s, "kerfs:/ipc/t1"] {
        let err = krg_fails(&cluster, &["ipc", "restart", from])?;
        ensure!(
            err.contains("nothing was created")
                && err.contains(&format!("id {m} is taken"))
                && err.contains(&format!("ipcrm -q {m}")),
            "restart from {from} with the queue's id taken: {err}"
        );
        ensure!(
            objects_with(&keys) == vec![format!("msg {:#x} {other}", key + 3)],
            "a refused restart created {:?}",
            objects_with(&keys)
        );
    }
    Command::new("ipcrm").args(["-q", &m]).status()?;

    // The semaphore array's key is taken (under another id).
    // SAFETY: plain semget.
    let sem = unsafe { libc::semget(key + 1, 1, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
    ensure!(sem >= 0 && sem != ids.sem, "semget gave {sem}");
    let err = krg_fails(&cluster, &["ipc", "restart", img_s])?;
    ensure!(
        err.contains(&format!("key {:#010x} is taken", key + 1)),
        "restart with the semaphore array's key taken: {err}"
    );
    ensure!(objects_with(&keys) == vec![format!("sem {:#x} {sem}", key + 1)]);
    Command::new("ipcrm")
        .args(["-s", &sem.to_string()])
        .status()?;

    // A damaged or truncated image is refused before anything is created.
    let bytes = std::fs::read(&img)?;
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x40;
    let bad = d.path().join("bad.img");
    for (damage, what) in [
        (flipped, "checksum"),
        (bytes[..bytes.len() - 100].to_vec(), "truncated"),
    ] {
        std::fs::write(&bad, damage)?;
        let err = krg_fails(&cluster, &["ipc", "restart", bad.to_str().unwrap()])?;
        ensure!(
            err.contains(what) && err.contains("nothing was created"),
            "damaged image ({what}): {err}"
        );
        ensure!(
            objects_with(&keys).is_empty(),
            "a damaged image created {:?}",
            objects_with(&keys)
        );
    }
    Ok(())
}

fn spawn_worker(prog: &Path, ids: Ids, log: &Path) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(prog);
    // SAFETY: close_range is async-signal-safe. Only stdio is inherited: cargo's jobserver
    // pipe could not be restored.
    unsafe {
        c.pre_exec(|| {
            libc::close_range(3, u32::MAX, 0);
            Ok(())
        });
    }
    Ok(
        c.args(["worker", &ids.msg.to_string(), &ids.sem.to_string()])
            .arg(log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    )
}

/// Asks the worker to take one message and one unit of semaphore 3; returns its "GOT" line.
fn take_one(pid: i32, log: &Path) -> Result<String> {
    let before = read(log).matches("GOT").count();
    signal(pid, libc::SIGUSR1);
    let s = wait_log(log, "a message taken", 30, |s| {
        s.matches("GOT").count() > before
    })?;
    Ok(s.lines()
        .rfind(|l| l.starts_with("GOT"))
        .unwrap_or_default()
        .to_string())
}

/// "type=.. len=.. sum=.." of a dump's message line.
fn message_of(line: &str) -> String {
    line.split_whitespace()
        .skip(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_and_its_ipc_objects_in_one_version() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = cluster().await?;
    let d = tempfile::tempdir()?;
    let prog = build(d.path(), "sysv_ipc")?;
    let key = key_base(1);
    let keys = [key, key + 1, key + 2];
    let _cleanup = Cleanup {
        keys: keys.to_vec(),
    };
    let ids = create(&prog, key)?;
    let log = d.path().join("log");
    let mut child = spawn_worker(&prog, ids, &log)?;
    let pid = child.id() as i32;
    wait_log(&log, "the worker", 30, |s| s.contains("READY"))?;
    let first = dump_all(&prog, ids)?;
    let got = take_one(pid, &log)?;
    ensure!(
        got == format!("GOT {} semop=0 sem3=99", message_of(&messages(&first)[0])),
        "the worker took {got:?}"
    );
    let before = dump_all(&prog, ids)?;
    let store = "kerfs:/ckpt/ipcproc";
    let out = krg_ok(
        &cluster,
        &[
            "checkpoint",
            &pid.to_string(),
            "--to",
            store,
            "--ipc",
            &format!("m:{},s:{}", ids.msg, ids.sem),
            "--ipc",
            &format!("M:{}", ids.shm),
            "--kill",
        ],
    )?;
    ensure!(
        out.contains("3 System V IPC objects"),
        "krg checkpoint said: {out}"
    );
    let _ = child.wait();
    ensure!(
        dump_all(&prog, ids)? == before,
        "the checkpoint changed the objects"
    );
    let ls = krg_ok(&cluster, &["ls", store])?;
    ensure!(
        ls.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"1") && f.get(3) == Some(&"1") && f.get(4) == Some(&"3")
        }),
        "krg ls does not show version 1 with 1 process and 3 IPC objects:\n{ls}"
    );

    // The restart creates the objects first, then the process, which goes on with them.
    ipcrm(ids)?;
    let out = restart_elsewhere(&cluster, store)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "restart of {store} failed: {err}");
    ensure!(
        kept(&dump_all(&prog, ids)?) == kept(&before),
        "restored objects:\n{}\nwant:\n{}",
        dump_all(&prog, ids)?,
        before
    );
    let restored: i32 = err
        .split("as pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no restored pid in: {err}"))?;
    let got = take_one(restored, &log)?;
    ensure!(
        got == format!("GOT {} semop=0 sem3=98", message_of(&messages(&before)[0])),
        "the restored worker took {got:?}"
    );

    // Restarting again while the objects exist is refused before any process is created.
    signal(restored, libc::SIGKILL);
    for _ in 0..100 {
        if pids_of(&prog).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let existing = objects_with(&keys);
    let out = restart_elsewhere(&cluster, store)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success() && err.contains("nothing was created"),
        "restart over existing objects: {err}"
    );
    ensure!(
        pids_of(&prog).is_empty(),
        "a refused restart started the process"
    );
    ensure!(objects_with(&keys) == existing);

    // --ipc needs a store.
    let err = krg_fails(
        &cluster,
        &[
            "checkpoint",
            "1",
            "--to",
            d.path().join("img").to_str().unwrap(),
            "--ipc",
            &format!("m:{}", ids.msg),
        ],
    )?;
    ensure!(err.contains("--ipc needs a kerfs:/PATH"), "{err}");
    Ok(())
}
