//! The operator's view, through the real `kerfsctl` against real daemons: `status` (text
//! and `--json`) and its exit codes as a cluster degrades step by step, and the `--json`
//! output of the other commands parsed by a script would.
//!
//! - `status_follows_the_cluster_down_and_exit_codes_say_how_bad`: healthy (exit 0,
//!   HEALTH_OK); a chunk server killed (exit 3, HEALTH_WARN naming it, its copies missing in
//!   `chunks`, and in the leader's metrics); two of three metadata nodes killed (exit 4, HEALTH_ERR: no leader, the
//!   unreachable ones named); all of them killed (exit 5); and a plain `ls` against the dead
//!   cluster fails with exit 5 too.
//! - `json_of_every_command_parses`: nodes, df, ls, stat, mkdir, touch, mv, rm, put, get,
//!   layout, chunks, repair.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kerfs_tests::{
    init_tracing, kerfsctl, kerfsctl_json, KerfsCluster, KerfsClusterOptions, MetaClusterOptions,
};
use serde_json::Value;
use tracing::info;

/// Each test starts a cluster on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Polls `kerfsctl status --json` until `done` holds for it, for at most `within`.
fn status_until(
    cluster: &KerfsCluster,
    within: Duration,
    what: &str,
    done: impl Fn(i32, &Value) -> bool,
) -> Result<(i32, Value)> {
    let start = Instant::now();
    loop {
        let (code, v) = kerfsctl_json(cluster, &["status"])?;
        if done(code, &v) {
            info!(what, code, "kerfsctl status:\n{v:#}");
            return Ok((code, v));
        }
        ensure!(
            start.elapsed() < within,
            "{what}: not seen within {within:?}; last exit {code}:\n{v:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn problems(v: &Value) -> String {
    v["problems"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_follows_the_cluster_down_and_exit_codes_say_how_bad() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let mut cluster = KerfsCluster::start(KerfsClusterOptions {
        meta: MetaClusterOptions {
            chunk_server_timeout_ms: Some(2000),
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    // A file with copies on the servers, so a lost server leaves chunks lacking one.
    let local = tempfile::NamedTempFile::new()?;
    std::fs::write(local.path(), vec![7u8; 3 << 20])?;
    let path = local.path().display().to_string();
    kerfsctl(&cluster, &["put", &path, "/f"])?;

    let (code, v) = status_until(&cluster, Duration::from_secs(10), "healthy", |c, _| c == 0)?;
    ensure!(v["health"] == "HEALTH_OK" && code == 0, "{v:#}");
    ensure!(v["leader"].as_u64().is_some(), "no leader in {v:#}");
    ensure!(
        v["chunk_servers"].as_array().map(Vec::len) == Some(3),
        "{v:#}"
    );
    ensure!(v["capacity_bytes"].as_u64() > Some(0), "{v:#}");
    let (code, text) = kerfsctl(&cluster, &["status"])?;
    ensure!(
        code == 0 && text.starts_with("health: HEALTH_OK"),
        "text status (exit {code}):\n{text}"
    );

    // One chunk server dies: degraded, and the verdict says which.
    let (_, chunks) = kerfsctl_json(&cluster, &["chunks", "/f"])?;
    let victim = chunks["chunks"][0]["copies"][0]["server_id"]
        .as_u64()
        .context("no copy of chunk 0")?;
    let victim_index = cluster.server_index(
        chunks["chunks"][0]["copies"][0]["address"]
            .as_str()
            .context("no address")?,
    )?;
    cluster.kill9_chunk(victim_index)?;
    let (_, v) = status_until(
        &cluster,
        Duration::from_secs(20),
        "a server down",
        |c, v| c == 3 && v["health"] == "HEALTH_WARN",
    )?;
    let why = problems(&v);
    ensure!(
        why.contains("1 of 3 chunk servers down"),
        "the warning does not name the dead server:\n{why}"
    );
    let (_, chunks) = kerfsctl_json(&cluster, &["chunks", "/f"])?;
    let states: Vec<(u64, String)> = chunks["chunks"][0]["copies"]
        .as_array()
        .context("no copies")?
        .iter()
        .map(|c| {
            (
                c["server_id"].as_u64().unwrap_or_default(),
                c["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    // Its copy shows as missing, unless repair already replaced it by a good one.
    let shown_missing = states.contains(&(victim, "missing".to_string()));
    let replaced =
        !states.iter().any(|(id, _)| *id == victim) && states.iter().all(|(_, st)| st == "ok");
    ensure!(
        shown_missing || replaced,
        "chunk 0's copies after server {victim} died: {states:?}"
    );

    // The leader's metrics say the same (refreshed every few seconds from applied state).
    let leader = v["leader"].as_u64().context("no leader")?;
    let want = format!("kerfs_meta_chunk_servers_down{{node=\"{leader}\"}} 1");
    let start = Instant::now();
    loop {
        let page = cluster.meta.metrics(leader)?;
        if page.contains(&want) && page.contains("kerfs_meta_chunks_unreadable{") {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(15),
            "the leader's metrics do not show the dead server ({want}):\n{page}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Two of three metadata nodes die: no leader, HEALTH_ERR.
    let others: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    cluster.meta.kill9(leader)?;
    cluster.meta.kill9(others[0])?;
    let (_, v) = status_until(&cluster, Duration::from_secs(20), "no quorum", |c, _| {
        c == 4
    })?;
    ensure!(
        v["health"] == "HEALTH_ERR" && v["leader"].is_null(),
        "{v:#}"
    );
    let why = problems(&v);
    ensure!(
        why.contains("no metadata leader: 1 of 3 nodes answer"),
        "the error does not say what is missing:\n{why}"
    );
    ensure!(why.matches("does not answer").count() == 2, "{why}");

    // All of them: unreachable, for status and for any other command.
    cluster.meta.kill9(others[1])?;
    let (code, v) = kerfsctl_json(&cluster, &["status"])?;
    ensure!(code == 5, "status of a dead cluster: exit {code}\n{v:#}");
    let (code, out) = kerfsctl(&cluster, &["ls", "/"])?;
    ensure!(code == 5, "ls on a dead cluster: exit {code}\n{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_of_every_command_parses() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let scratch = tempfile::tempdir()?;
    let src = scratch.path().join("src");
    let back = scratch.path().join("back");
    std::fs::write(&src, b"hello, operator")?;
    let (src, back) = (src.display().to_string(), back.display().to_string());

    let (_, v) = kerfsctl_json(&cluster, &["mkdir", "/d"])?;
    ensure!(v["kind"] == "directory" && v["mode"] == "0755", "{v:#}");
    let (_, v) = kerfsctl_json(&cluster, &["layout", "/d", "--replicas", "3"])?;
    ensure!(v["replicas"] == 3 && v["ec_data"] == 0, "{v:#}");
    let (_, v) = kerfsctl_json(&cluster, &["put", &src, "/d/f"])?;
    ensure!(v["bytes"] == 15, "{v:#}");
    let (_, v) = kerfsctl_json(&cluster, &["touch", "/d/empty"])?;
    ensure!(v["kind"] == "file" && v["size"] == 0, "{v:#}");
    let (_, v) = kerfsctl_json(&cluster, &["mv", "/d/empty", "/d/e"])?;
    ensure!(v["to"] == "/d/e", "{v:#}");
    let (_, v) = kerfsctl_json(&cluster, &["ls", "/d"])?;
    let mut names: Vec<&str> = v
        .as_array()
        .context("ls is not a list")?
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    names.sort();
    ensure!(names == ["e", "f"], "ls /d: {v:#}");
    let (_, v) = kerfsctl_json(&cluster, &["stat", "/d/f"])?;
    ensure!(v["size"] == 15 && v["nlink"] == 1, "{v:#}");
    let (_, v) = kerfsctl_json(&cluster, &["chunks", "/d/f"])?;
    let copies = v["chunks"][0]["copies"].as_array().context("no copies")?;
    ensure!(
        copies.len() == 3 && copies.iter().all(|c| c["state"] == "ok"),
        "{v:#}"
    );
    ensure!(
        v["chunks"][0]["good"] == 3 && v["chunks"][0]["wanted"] == 3,
        "{v:#}"
    );
    let (_, v) = kerfsctl_json(&cluster, &["get", "/d/f", &back])?;
    ensure!(v["bytes"] == 15, "{v:#}");
    ensure!(
        std::fs::read(&back)? == b"hello, operator",
        "get wrote other bytes"
    );
    let (_, v) = kerfsctl_json(&cluster, &["nodes"])?;
    let nodes = v.as_array().context("nodes is not a list")?;
    ensure!(
        nodes.len() == 3 && nodes.iter().all(|n| n["state"] == "up"),
        "{v:#}"
    );
    let (_, v) = kerfsctl_json(&cluster, &["df"])?;
    ensure!(v["size_bytes"].as_u64() > Some(0), "{v:#}");
    let (_, v) = kerfsctl_json(&cluster, &["repair"])?;
    ensure!(
        v["under_replicated"] == 0 && v["chunks"].is_array(),
        "{v:#}"
    );
    let (_, v) = kerfsctl_json(&cluster, &["rm", "/d/e"])?;
    ensure!(v["removed"] == "/d/e", "{v:#}");
    // A failing command says so in JSON too, with its exit code.
    let failed = kerfsctl(&cluster, &["--json", "stat", "/nothing"])
        .err()
        .context("stat of a missing path succeeded")?;
    let text = format!("{failed:#}");
    ensure!(
        text.contains("exit 1") && text.contains("\"error\"") && text.contains("\"exit_code\":1"),
        "{text}"
    );
    Ok(())
}
