//! `chbridge status` against the real stack: the committed offsets, ends and
//! lags it prints are those of the group, with no bridge running (records
//! waiting: stalled, exit 2), with one running (lag 0, last insert shown),
//! and after one stopped with records left on one partition.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn status(config: &std::path::Path) -> (i32, Value, String) {
    let run = |json: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_chbridge"));
        c.args(["status", "--config"]).arg(config);
        if json {
            c.arg("--json");
        }
        c.output().expect("run chbridge status")
    };
    let out = run(true);
    let code = out.status.code().unwrap_or(-1);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let text = run(false);
    assert_eq!(
        text.status.code().unwrap_or(-1),
        code,
        "same exit code for the table"
    );
    (
        code,
        json,
        String::from_utf8_lossy(&text.stdout).into_owned(),
    )
}

/// (committed, end, lag, state) of each partition, in partition order.
fn partitions(s: &Value) -> Vec<(Option<i64>, i64, i64, String)> {
    let mut ps: Vec<&Value> = s["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .collect();
    ps.sort_by_key(|p| p["partition"].as_i64());
    ps.iter()
        .map(|p| {
            (
                p["committed"].as_i64(),
                p["end"].as_i64().expect("end read"),
                p["lag"].as_i64().expect("lag"),
                p["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn status_shows_lag_stalls_and_last_inserts() {
    let (db, topic, group, mut cfg) = simple_setup("status", 3, "");
    cfg.extra = "stall_timeout = \"2s\"".into();
    let dir = test_dir(&group);
    let config = write_config(&cfg, &dir);
    let prod = TestProducer::new();
    produce_simple(&prod, &topic, 3, 0, 3000);
    prod.flush();

    // No bridge has run: nothing committed, every record waits, and the
    // oldest waited longer than stall_timeout.
    std::thread::sleep(Duration::from_millis(2500));
    let (code, s, text) = status(&config);
    assert_eq!(code, 2, "stalled partitions exit 2:\n{text}");
    assert_eq!(
        partitions(&s),
        vec![(None, 1000, 1000, "stalled".to_string()); 3],
        "{text}"
    );
    assert!(
        text.contains("total lag 3000 over 3 partition(s); 3 stalled"),
        "{text}"
    );

    // A bridge drains it all: lag 0 everywhere, the group has a member, and
    // the table's last insert is recent.
    let mut bridge = Bridge::start(&cfg, &dir);
    assert!(
        wait_until(Duration::from_secs(60), || committed(&group, &topic, 3)
            == vec![1000; 3]),
        "bridge did not commit everything: {:?}\n{}",
        committed(&group, &topic, 3),
        bridge.log_text()
    );
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), 3000);
    // The query log is flushed every second.
    let mut last = (0, Value::Null, String::new());
    let recent = wait_until(Duration::from_secs(15), || {
        last = status(&config);
        last.1["tables"][0]["last_insert"].as_i64().is_some()
    });
    let (code, s, text) = last;
    assert!(recent, "no last insert time: {text}");
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        partitions(&s),
        vec![(Some(1000), 1000, 0, "ok".to_string()); 3],
        "{text}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let at = s["tables"][0]["last_insert"].as_i64().unwrap_or(0);
    assert!((now - at).abs() < 120, "last insert {at} vs now {now}");
    assert_eq!(s["tables"][0]["table"], format!("{db}.t"));
    assert!(
        !s["members"].as_array().expect("members").is_empty(),
        "a running bridge is a member: {text}"
    );

    // The container health check probes the same bridge.
    let healthcheck = || {
        Command::new(env!("CARGO_BIN_EXE_chbridge"))
            .args(["healthcheck", "--url"])
            .arg(format!("http://127.0.0.1:{}/healthz", cfg.http_port))
            .status()
            .expect("run chbridge healthcheck")
            .code()
    };
    assert_eq!(healthcheck(), Some(0));

    // Stopped with 300 records left on partition 1 only.
    bridge.signal(libc::SIGTERM);
    assert!(bridge.wait(Duration::from_secs(30)).is_some());
    assert_eq!(healthcheck(), Some(1), "no bridge answers any more");
    for id in 0..300u64 {
        prod.send(&topic, Some(1), 10_000 + id, &simple_record(10_000 + id, 1));
    }
    prod.flush();
    std::thread::sleep(Duration::from_millis(2500));
    let (code, s, text) = status(&config);
    assert_eq!(code, 2, "{text}");
    assert_eq!(
        partitions(&s),
        vec![
            (Some(1000), 1000, 0, "ok".to_string()),
            (Some(1000), 1300, 300, "stalled".to_string()),
            (Some(1000), 1000, 0, "ok".to_string()),
        ],
        "{text}"
    );
    let waiting = s["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["partition"] == 1)
        .and_then(|p| p["oldest_waiting_ms"].as_i64());
    assert!(waiting.is_some_and(|ms| ms >= 2000), "{waiting:?}\n{text}");
    drop_database(&db);
}
