//! Permissions on a multi-user mount (`allow_other`), tried as unprivileged users through
//! the kernel: each operation runs in its own process (`as-user`, tests/bin/as_user.rs) under
//! the identity of root, `nobody`, `daemon`, or `nobody` with `daemon` as a supplementary
//! group, and what the mount answers must be what local ext4 answers.
//!
//! - `mode_bits_hold_whatever_the_kernel_caches`: the cases seen on a mount that checked
//!   permissions only in its own lookup: a file in a root-only directory read by `nobody`
//!   right after root read it (the kernel's cached lookup skipped the directory's search
//!   permission); chmod, chown, truncate, open and link of a file whose directory just lost
//!   its search permission; FIFOs opened whatever their mode; chown to one's own group in a
//!   directory one cannot search; supplementary groups; a chmod through another mount
//!   that holds within the attribute timeout.
//! - `unprivileged_writes_clear_set_id`: a non-owner's write to a set-user-ID or
//!   set-group-ID file succeeds and clears the bits (a second mount sees them gone), root's
//!   write keeps them, a non-owner's truncate clears them, chown(f, -1, -1) clears them for
//!   root and the owner and is refused to others. (One difference from ext4 is left: a
//!   non-owner's chown(f, -1, -1) of a set-user-ID file that this mount has open for
//!   writing succeeds without dropping the bits, because the kernel sends it exactly as it
//!   sends a write's privilege drop.)
//! - `random_operations_by_random_users_match_ext4`: random trees (modes, owners) and random
//!   operations by random users, each answer compared with the same operation on a local
//!   ext4 directory built the same way. `KERFS_PERM_SEED` replays a seed,
//!   `KERFS_PERM_OPS` sets the number of operations.
//!
//! Needs root, /dev/fuse, fuse3 and the Debian users nobody and daemon; fails (does not
//! skip) without them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kerfs_tests::{
    blocking, env_u64, init_tracing, require_root_and_fuse, KerfsCluster, KerfsClusterOptions,
    Mount,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::info;

/// Each test starts a cluster on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An identity an operation runs under (ids as Debian assigns them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum User {
    Root,
    Nobody,
    Daemon,
    /// nobody with daemon's group as a supplementary group.
    NobodyInDaemon,
}

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
const DAEMON: u32 = 1;

impl User {
    const ALL: [User; 4] = [User::Root, User::Nobody, User::Daemon, User::NobodyInDaemon];

    fn ids(self) -> (u32, u32, &'static str) {
        match self {
            User::Root => (0, 0, "-"),
            User::Nobody => (NOBODY, NOGROUP, "-"),
            User::Daemon => (DAEMON, DAEMON, "-"),
            User::NobodyInDaemon => (NOBODY, NOGROUP, "1"),
        }
    }
}

/// Runs one operation as `user` and returns its answer line (`ok ...` or `err ERRNO`).
fn as_user(user: User, op: &str, args: &[&str]) -> Result<String> {
    let (uid, gid, groups) = user.ids();
    let out = Command::new(env!("CARGO_BIN_EXE_as-user"))
        .args([uid.to_string(), gid.to_string(), groups.to_string()])
        .arg(op)
        .args(args)
        .output()
        .context("running as-user")?;
    ensure!(
        out.status.success(),
        "as-user {user:?} {op} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// Runs `op` as `user` on `path` (and more arguments) and fails unless it answers `want`.
fn expect(user: User, op: &str, args: &[&str], want: &str) -> Result<()> {
    let got = as_user(user, op, args)?;
    ensure!(
        got == want,
        "{user:?} {op} {}: got {got:?}, want {want:?}",
        args.join(" ")
    );
    Ok(())
}

/// The mount options of a test, plus `$KERFS_PERM_MOUNT_OPTS` (for instance
/// `,no_default_permissions`, to watch these tests fail on a mount that leaves the checks to
/// KerFS alone).
fn options(base: &str) -> String {
    format!(
        "{base}{}",
        std::env::var("KERFS_PERM_MOUNT_OPTS").unwrap_or_default()
    )
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

// ------------------------------------------------------------------ the seen cases

/// A file in a root-only directory, read by root (so the kernel caches the lookup) and
/// then by nobody: refused every time, as on ext4.
fn cached_lookup_keeps_search_permission(top: &Path) -> Result<()> {
    for i in 0..10 {
        let d = p(top, &format!("private{i}"));
        let f = format!("{d}/f");
        expect(User::Root, "mkdir", &[&d, "700"], "ok")?;
        expect(User::Root, "create", &[&f, "644"], "ok")?;
        expect(User::Root, "write", &[&f, "secret"], "ok")?;
        expect(User::Root, "read", &[&f], "ok secret")?;
        expect(User::Nobody, "read", &[&f], "err EACCES")?;
        expect(User::Nobody, "stat", &[&f], "err EACCES")?;
    }
    Ok(())
}

/// A file of nobody's whose directory loses its search permission right after nobody
/// used it: every change through that path is refused.
fn directory_that_just_lost_search_permission(top: &Path) -> Result<()> {
    let d = p(top, "closing");
    let f = format!("{d}/f");
    let link = p(top, "link-to-f");
    expect(User::Root, "mkdir", &[&d, "755"], "ok")?;
    expect(User::Root, "create", &[&f, "644"], "ok")?;
    expect(User::Root, "chown", &[&f, &NOBODY.to_string(), "-1"], "ok")?;
    // nobody's own operations succeed while the directory is open, and fill the caches.
    expect(
        User::Nobody,
        "stat",
        &[&f],
        &format!("ok file 644 {NOBODY}:0 0"),
    )?;
    expect(User::Nobody, "write", &[&f, "mine"], "ok")?;
    expect(User::Root, "chmod", &[&d, "700"], "ok")?;
    expect(User::Nobody, "chmod", &[&f, "600"], "err EACCES")?;
    expect(
        User::Nobody,
        "chown",
        &[&f, &NOBODY.to_string(), &NOGROUP.to_string()],
        "err EACCES",
    )?;
    expect(User::Nobody, "truncate", &[&f, "0"], "err EACCES")?;
    expect(User::Nobody, "open", &[&f, "r"], "err EACCES")?;
    expect(User::Nobody, "link", &[&f, &link], "err EACCES")?;
    // Nothing happened to the file.
    expect(
        User::Root,
        "stat",
        &[&f],
        &format!("ok file 644 {NOBODY}:0 4"),
    )?;
    expect(User::Root, "stat", &[&link], "err ENOENT")?;
    // And with the search permission back, the same calls succeed: the refusals above
    // came from the directory, not from something else.
    expect(User::Root, "chmod", &[&d, "755"], "ok")?;
    expect(User::Nobody, "chmod", &[&f, "600"], "ok")?;
    expect(User::Nobody, "truncate", &[&f, "0"], "ok")?;
    Ok(())
}

/// FIFOs: the kernel opens them without asking the filesystem, so only its own check on
/// the mode the mount reported stands between a user and someone else's pipe.
fn fifo_opens_follow_the_mode(top: &Path) -> Result<()> {
    let closed = p(top, "fifo-600");
    let open = p(top, "fifo-666");
    expect(User::Root, "mkfifo", &[&closed, "600"], "ok")?;
    expect(User::Root, "mkfifo", &[&open, "666"], "ok")?;
    expect(User::Nobody, "open", &[&closed, "rn"], "err EACCES")?;
    expect(User::Nobody, "open", &[&closed, "wn"], "err EACCES")?;
    expect(User::Root, "open", &[&closed, "rn"], "ok")?;
    expect(User::Nobody, "open", &[&open, "rn"], "ok")?;
    // A non-blocking open for writing with no reader: ENXIO, after the permission check.
    expect(User::Nobody, "open", &[&open, "wn"], "err ENXIO")?;
    Ok(())
}

/// chown to a group the caller is in, of its own file, in a directory it cannot search.
fn chown_to_own_group_needs_the_path(top: &Path) -> Result<()> {
    let d = p(top, "groupdir");
    let f = format!("{d}/f");
    expect(User::Root, "mkdir", &[&d, "755"], "ok")?;
    expect(User::Root, "create", &[&f, "644"], "ok")?;
    let owner = format!("{NOBODY}");
    let group = format!("{NOGROUP}");
    expect(User::Root, "chown", &[&f, &owner, &group], "ok")?;
    expect(
        User::NobodyInDaemon,
        "stat",
        &[&f],
        &format!("ok file 644 {NOBODY}:{NOGROUP} 0"),
    )?;
    expect(User::Root, "chmod", &[&d, "700"], "ok")?;
    let daemon = DAEMON.to_string();
    expect(
        User::NobodyInDaemon,
        "chown",
        &[&f, "-1", &daemon],
        "err EACCES",
    )?;
    expect(User::Root, "chmod", &[&d, "755"], "ok")?;
    // Without daemon among its groups, nobody may not give the file to daemon's group.
    expect(User::Nobody, "chown", &[&f, "-1", &daemon], "err EPERM")?;
    expect(User::NobodyInDaemon, "chown", &[&f, "-1", &daemon], "ok")?;
    expect(
        User::Root,
        "stat",
        &[&f],
        &format!("ok file 644 {NOBODY}:{DAEMON} 0"),
    )?;
    Ok(())
}

/// A directory open to daemon's group only: nobody gets in through a supplementary group.
fn supplementary_groups_count(top: &Path) -> Result<()> {
    let d = p(top, "daemons");
    expect(User::Root, "mkdir", &[&d, "770"], "ok")?;
    expect(User::Root, "chown", &[&d, "0", &DAEMON.to_string()], "ok")?;
    expect(User::Root, "create", &[&format!("{d}/x"), "660"], "ok")?;
    expect(User::Nobody, "list", &[&d], "err EACCES")?;
    expect(User::NobodyInDaemon, "list", &[&d], "ok x")?;
    expect(
        User::NobodyInDaemon,
        "create",
        &[&format!("{d}/y"), "644"],
        "ok",
    )?;
    expect(
        User::Nobody,
        "create",
        &[&format!("{d}/z"), "644"],
        "err EACCES",
    )?;
    Ok(())
}

/// A chmod through a descriptor that a process still holds open for writing (tar's way) is
/// answered by the mount and sent with the file's next commit; another user's open on the
/// same mount meanwhile is checked by the cluster too and must find the new mode, and
/// another mount must find it once the file is closed.
fn chmod_of_an_open_file_holds_for_other_users_before_close(
    top: &Path,
    other_top: &Path,
) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let f = p(top, "held");
    let (uid, gid, groups) = User::Root.ids();
    let mut holder = Command::new(env!("CARGO_BIN_EXE_as-user"))
        .args([uid.to_string(), gid.to_string(), groups.to_string()])
        .args(["hold", &f, "tarred", "644"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the holder")?;
    let mut out = BufReader::new(holder.stdout.take().context("holder stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    ensure!(line.trim() == "ready", "holder: {line:?}");
    let read = as_user(User::Nobody, "read", &[&f]);
    drop(holder.stdin.take());
    line.clear();
    out.read_line(&mut line)?;
    holder.wait()?;
    ensure!(line.trim() == "ok", "the holder's close: {line:?}");
    ensure!(
        read? == "ok tarred",
        "nobody could not read a file chmodded 644 through a descriptor still open"
    );
    let o = format!("{}/held", other_top.display());
    expect(User::Nobody, "read", &[&o], "ok tarred")?;
    Ok(())
}

/// The attribute timeout of the mounts here (the default): how stale another mount's
/// view of a mode may be.
const ATTR_TIMEOUT: Duration = Duration::from_secs(1);

/// A chmod through one mount closes a directory for a user of another mount within the
/// attribute timeout, however warm that mount's caches are.
fn other_mounts_chmod_holds_within_attr_timeout(top: &Path, other_top: &Path) -> Result<()> {
    let d = p(top, "shared");
    expect(User::Root, "mkdir", &[&d, "755"], "ok")?;
    expect(User::Root, "create", &[&format!("{d}/f"), "644"], "ok")?;
    expect(User::Root, "write", &[&format!("{d}/f"), "open"], "ok")?;
    let f = format!("{}/shared/f", other_top.display());
    expect(User::Nobody, "read", &[&f], "ok open")?;
    expect(User::Root, "chmod", &[&d, "700"], "ok")?;
    let changed = Instant::now();
    loop {
        let got = as_user(User::Nobody, "read", &[&f])?;
        if got == "err EACCES" {
            break;
        }
        ensure!(got == "ok open", "nobody read {f}: {got}");
        // The kernel's attribute timeout is counted in jiffies from its last getattr:
        // a second for the timeout itself and one for scheduling on a loaded machine.
        ensure!(
            changed.elapsed() < ATTR_TIMEOUT + Duration::from_secs(1),
            "nobody still reads {f} through the other mount {:?} after root closed its \
             directory (attr_timeout is {ATTR_TIMEOUT:?})",
            changed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    info!(after = ?changed.elapsed(), "the other mount refused nobody");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mode_bits_hold_whatever_the_kernel_caches() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    // The mount's default caching (1 s attributes and entries): the cases are about it.
    let m = Mount::new(&cluster, "perms", &options(",allow_other"))?;
    let other = Mount::new(&cluster, "other", &options(",allow_other"))?;
    let top = m.path().join("t");
    let other_top = other.path().join("t");
    blocking(&[&m, &other], move || {
        std::fs::create_dir(&top)?;
        expect(
            User::Root,
            "chmod",
            &[&top.display().to_string(), "777"],
            "ok",
        )?;
        cached_lookup_keeps_search_permission(&top).context("cached lookup")?;
        directory_that_just_lost_search_permission(&top).context("lost search permission")?;
        fifo_opens_follow_the_mode(&top).context("fifo")?;
        chown_to_own_group_needs_the_path(&top).context("chown to own group")?;
        supplementary_groups_count(&top).context("supplementary groups")?;
        other_mounts_chmod_holds_within_attr_timeout(&top, &other_top)
            .context("chmod on another mount")?;
        chmod_of_an_open_file_holds_for_other_users_before_close(&top, &other_top)
            .context("chmod of a file held open")?;
        Ok(())
    })
    .await;
    m.unmount()?;
    other.unmount()?;
    Ok(())
}

// ------------------------------------------------------------------ set-user-ID

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unprivileged_writes_clear_set_id() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let a = Mount::new(&cluster, "a", &options(",allow_other"))?;
    let b = Mount::new(
        &cluster,
        "b",
        &options(",allow_other,attr_timeout=0,entry_timeout=0"),
    )?;
    let (ta, tb) = (a.path().join("t"), b.path().join("t"));
    blocking(&[&a, &b], move || {
        std::fs::create_dir(&ta)?;
        expect(
            User::Root,
            "chmod",
            &[&ta.display().to_string(), "777"],
            "ok",
        )?;
        // (mode before, who writes, mode after) for files owned by root.
        let cases = [
            ("4777", User::Nobody, "777"),
            ("6777", User::Nobody, "777"),
            // set-group-ID without group-execute marks mandatory locking: it stays.
            ("2767", User::Nobody, "2767"),
            ("4777", User::Root, "4777"),
            ("6777", User::NobodyInDaemon, "777"),
        ];
        for (i, (before, who, after)) in cases.iter().enumerate() {
            let name = format!("s{i}");
            let (fa, fb) = (p(&ta, &name), p(&tb, &name));
            expect(User::Root, "create", &[&fa, "644"], "ok")?;
            expect(User::Root, "chmod", &[&fa, before], "ok")?;
            expect(*who, "write", &[&fa, "data"], "ok")
                .with_context(|| format!("write to a {before} file"))?;
            let want = format!("ok file {after} 0:0 4");
            expect(User::Root, "stat", &[&fa], &want)?;
            // The cluster has it too (the other mount caches nothing).
            expect(User::Root, "stat", &[&fb], &want)?;
        }
        let f = p(&ta, "t0");
        expect(User::Root, "create", &[&f, "666"], "ok")?;
        expect(User::Root, "chmod", &[&f, "4777"], "ok")?;
        expect(User::Nobody, "truncate", &[&f, "3"], "ok")?;
        expect(User::Root, "stat", &[&p(&tb, "t0")], "ok file 777 0:0 3")?;
        // chown(f, -1, -1) drops them too, as on ext4: for root and for the owner; anyone
        // else is refused (the mode would change).
        let f = p(&ta, "c0");
        expect(User::Root, "create", &[&f, "644"], "ok")?;
        expect(User::Root, "chmod", &[&f, "6755"], "ok")?;
        expect(User::Nobody, "chown", &[&f, "-1", "-1"], "err EPERM")?;
        expect(User::Root, "stat", &[&f], "ok file 6755 0:0 0")?;
        expect(User::Root, "chown", &[&f, "-1", "-1"], "ok")?;
        expect(User::Root, "stat", &[&p(&tb, "c0")], "ok file 755 0:0 0")?;
        let f = p(&ta, "c1");
        expect(User::Root, "create", &[&f, "644"], "ok")?;
        expect(User::Root, "chown", &[&f, &NOBODY.to_string(), "-1"], "ok")?;
        expect(User::Root, "chmod", &[&f, "4755"], "ok")?;
        expect(User::Nobody, "chown", &[&f, "-1", "-1"], "ok")?;
        expect(
            User::Root,
            "stat",
            &[&f],
            &format!("ok file 755 {NOBODY}:0 0"),
        )?;
        Ok(())
    })
    .await;
    a.unmount()?;
    b.unmount()?;
    Ok(())
}

// ------------------------------------------------------------------ randomized

/// Names operations pick from: a few directories two deep, a few files, so that
/// operations often meet what others made.
const DIRS: [&str; 5] = ["a", "b", "a/c", "b/d", "a/e"];
const NAMES: [&str; 4] = ["f", "g", "h", "a"];
/// Modes the tree and chmod pick from: the usual ones, closed ones, and the special bits.
const MODES: [&str; 12] = [
    "755", "700", "711", "777", "644", "600", "640", "666", "1777", "2775", "4755", "070",
];

/// One step: an operation, by whom, on paths relative to the root of the run.
#[derive(Debug, Clone)]
struct Step {
    user: User,
    op: &'static str,
    /// Arguments; those starting with '/' are paths under the root.
    args: Vec<String>,
}

fn random_path(rng: &mut StdRng) -> String {
    let dir = DIRS[rng.gen_range(0..DIRS.len())];
    match rng.gen_range(0..4) {
        0 => format!("/{dir}"),
        _ => format!("/{dir}/{}", NAMES[rng.gen_range(0..NAMES.len())]),
    }
}

fn random_mode(rng: &mut StdRng) -> String {
    MODES[rng.gen_range(0..MODES.len())].to_string()
}

fn random_owner(rng: &mut StdRng) -> String {
    ["0", "65534", "1", "-1"][rng.gen_range(0..4)].to_string()
}

fn random_step(rng: &mut StdRng) -> Step {
    let user = User::ALL[rng.gen_range(0..User::ALL.len())];
    let path = random_path(rng);
    let (op, args): (&'static str, Vec<String>) = match rng.gen_range(0..15) {
        0 => ("read", vec![path]),
        1 => ("write", vec![path, "w".into()]),
        2 => ("create", vec![path, random_mode(rng)]),
        3 => ("mkdir", vec![path, random_mode(rng)]),
        4 => ("stat", vec![path]),
        5 => ("chmod", vec![path, random_mode(rng)]),
        6 => ("chown", vec![path, random_owner(rng), random_owner(rng)]),
        7 => ("truncate", vec![path, rng.gen_range(0..3).to_string()]),
        8 => ("link", vec![path, random_path(rng)]),
        9 => ("unlink", vec![path]),
        10 => ("rmdir", vec![path]),
        11 => ("rename", vec![path, random_path(rng)]),
        12 => ("list", vec![path]),
        13 => ("utime", vec![path]),
        _ => (
            "open",
            vec![path, ["r", "w", "rw", "rwt"][rng.gen_range(0..4)].into()],
        ),
    };
    Step { user, op, args }
}

/// The steps that build a random tree as root: every directory, some files, random
/// owners and modes (directories last, so that root can fill them first; root passes
/// every check anyway).
fn tree_steps(rng: &mut StdRng) -> Vec<Step> {
    let root = |op: &'static str, args: Vec<String>| Step {
        user: User::Root,
        op,
        args,
    };
    let mut steps = Vec::new();
    for d in DIRS {
        steps.push(root("mkdir", vec![format!("/{d}"), "755".into()]));
    }
    let mut chmods = Vec::new();
    for d in DIRS {
        for n in NAMES {
            let f = format!("/{d}/{n}");
            if n == "a" || !rng.gen_bool(0.5) {
                continue;
            }
            steps.push(root("create", vec![f.clone(), random_mode(rng)]));
            steps.push(root("write", vec![f.clone(), "seed".into()]));
            steps.push(root(
                "chown",
                vec![f.clone(), random_owner(rng), random_owner(rng)],
            ));
            chmods.push(root("chmod", vec![f, random_mode(rng)]));
        }
        chmods.push(root(
            "chown",
            vec![format!("/{d}"), random_owner(rng), random_owner(rng)],
        ));
        chmods.push(root("chmod", vec![format!("/{d}"), random_mode(rng)]));
    }
    steps.extend(chmods);
    steps
}

/// Runs `step` under `root` (a directory path prefix).
fn run_step(root: &Path, step: &Step) -> Result<String> {
    let args: Vec<String> = step
        .args
        .iter()
        .map(|a| match a.strip_prefix('/') {
            Some(rel) => root.join(rel).display().to_string(),
            None => a.clone(),
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    as_user(step.user, step.op, &args)
}

/// What root sees of every name the steps can reach: type, mode, owner, size, content.
fn tree_state(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for d in DIRS {
        for path in
            std::iter::once(format!("/{d}")).chain(NAMES.iter().map(|n| format!("/{d}/{n}")))
        {
            let stat = run_step(
                root,
                &Step {
                    user: User::Root,
                    op: "stat",
                    args: vec![path.clone()],
                },
            )?;
            let content = if stat.starts_with("ok file") {
                run_step(
                    root,
                    &Step {
                        user: User::Root,
                        op: "read",
                        args: vec![path.clone()],
                    },
                )?
            } else {
                String::new()
            };
            out.push(format!("{path}: {stat} {content}"));
        }
    }
    Ok(out)
}

fn compare_runs(kerfs: &Path, ext4: &Path, seed: u64, ops: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = tree_steps(&mut rng);
    let setup = steps.len();
    steps.extend((0..ops).map(|_| random_step(&mut rng)));
    let (mut succeeded, mut refused) = (0, 0);
    for (i, step) in steps.iter().enumerate() {
        let got = run_step(kerfs, step)?;
        let want = run_step(ext4, step)?;
        if got != want {
            let recent: Vec<String> = steps[i.saturating_sub(8)..i]
                .iter()
                .map(|s| format!("{s:?}"))
                .collect();
            bail!(
                "seed {seed}, step {i} ({}): {step:?}\n  kerfs: {got}\n  ext4:  {want}\n\
                 the steps before it:\n  {}",
                if i < setup { "tree" } else { "operation" },
                recent.join("\n  ")
            );
        }
        if got.starts_with("ok") {
            succeeded += 1;
        } else if got == "err EACCES" || got == "err EPERM" {
            refused += 1;
        }
        if i % 100 == 99 || i + 1 == steps.len() {
            let (k, e) = (tree_state(kerfs)?, tree_state(ext4)?);
            if let Some((a, b)) = k.iter().zip(&e).find(|(a, b)| a != b) {
                bail!("seed {seed}, after step {i}: the trees differ\n  kerfs: {a}\n  ext4:  {b}");
            }
        }
    }
    info!(
        seed,
        steps = steps.len(),
        succeeded,
        refused,
        "random permission run matched ext4"
    );
    // A run where (nearly) every step failed for want of a file, or nothing was refused,
    // compared nothing about permissions.
    let tenth = steps.len() / 10;
    ensure!(
        succeeded > tenth && refused > tenth,
        "seed {seed}: of {} steps {succeeded} succeeded and {refused} were refused \
         (EACCES/EPERM): the mix is broken",
        steps.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_operations_by_random_users_match_ext4() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let seed = env_u64("KERFS_PERM_SEED").unwrap_or_else(rand::random::<u64>);
    let ops = env_u64("KERFS_PERM_OPS").unwrap_or(2000);
    println!(
        "random permission run: seed {seed} (KERFS_PERM_SEED={seed} replays it), {ops} operations"
    );
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let m = Mount::new(&cluster, "random", &options(",allow_other"))?;
    // The ext4 side: a directory on the root filesystem, which must be ext4 for the
    // comparison to mean anything.
    let local = tempfile::Builder::new()
        .prefix("kerfs-perm-ext4-")
        .tempdir_in("/var/tmp")?;
    let fs = Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE", "--target"])
        .arg(local.path())
        .output()?;
    let fs = String::from_utf8_lossy(&fs.stdout).trim().to_string();
    ensure!(
        fs == "ext4",
        "/var/tmp is on {fs:?}, not ext4: nothing to compare with"
    );
    let (kerfs, ext4): (PathBuf, PathBuf) = (m.path().join("run"), local.path().join("run"));
    let top = local.path().to_path_buf();
    blocking(&[&m], move || {
        expect(
            User::Root,
            "chmod",
            &[&top.display().to_string(), "755"],
            "ok",
        )?;
        for root in [&kerfs, &ext4] {
            std::fs::create_dir(root)?;
            expect(
                User::Root,
                "chmod",
                &[&root.display().to_string(), "777"],
                "ok",
            )?;
        }
        compare_runs(&kerfs, &ext4, seed, ops)
    })
    .await;
    m.unmount()?;
    Ok(())
}
