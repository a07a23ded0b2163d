//! (b) kill -9 mid-stream and restart: nothing is lost.
//! (f) SIGTERM mid-stream drains and commits exactly what landed: the restart
//!     reads nothing twice.

use std::thread;
use std::time::Duration;

use crate::common::*;

const PARTITIONS: i32 = 4;

/// Produces `count` simple records over about `seconds`, in a background thread.
fn produce_steadily(topic: String, count: u64, seconds: f64) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let prod = TestProducer::new();
        let chunks = 50u64;
        let per_chunk = count / chunks;
        for c in 0..chunks {
            produce_simple(&prod, &topic, PARTITIONS, c * per_chunk, per_chunk);
            thread::sleep(Duration::from_secs_f64(seconds / chunks as f64));
        }
        prod.flush();
    })
}

#[test]
fn kill_9_mid_stream_then_restart_loses_nothing() {
    let (db, topic, _group, cfg) = simple_setup("kill9", PARTITIONS, "");
    let dir = test_dir(&db);
    let total = 40_000u64;
    let producer = produce_steadily(topic.clone(), total, 6.0);
    let mut bridge = Bridge::start(&cfg, &dir);
    let count = || ch_u64(&format!("SELECT count() FROM {db}.t"));
    assert!(
        wait_until(Duration::from_secs(60), || count() >= 16_000),
        "no rows before the kill; log:\n{}",
        bridge.log_text()
    );
    bridge.kill9();
    let at_kill = count();
    thread::sleep(Duration::from_millis(500));
    let bridge = Bridge::start(&cfg, &dir);
    producer.join().unwrap();
    let ids = || {
        ch_u64(&format!(
            "SELECT uniqExact(id) FROM {db}.t WHERE id < {total}"
        ))
    };
    assert!(
        wait_until(Duration::from_secs(120), || ids() == total),
        "only {} of {total} ids after restart; log:\n{}",
        ids(),
        bridge.log_text()
    );
    let rows = count();
    eprintln!(
        "kill -9: {at_kill} rows at the kill, {rows} rows for {total} ids after restart ({} duplicates, allowed at-least-once)",
        rows - total
    );
    assert!(rows >= total);
    drop(bridge);
    drop_database(&db);
}

#[test]
fn sigterm_drains_commits_and_restart_reads_nothing_twice() {
    let (db, topic, group, cfg) = simple_setup("sigterm", PARTITIONS, "");
    let dir = test_dir(&db);
    let total = 30_000u64;
    let producer = produce_steadily(topic.clone(), total, 5.0);
    let mut bridge = Bridge::start(&cfg, &dir);
    assert!(
        wait_until(Duration::from_secs(60), || ch_u64(&format!(
            "SELECT count() FROM {db}.t"
        )) >= 5_000),
        "no rows; log:\n{}",
        bridge.log_text()
    );
    bridge.signal(libc::SIGTERM);
    let status = bridge
        .wait(Duration::from_secs(30))
        .expect("chbridge did not exit after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; log:\n{}",
        bridge.log_text()
    );
    assert!(bridge.log_text().contains("stopped cleanly"));

    // What landed is exactly what was committed, partition by partition.
    let offsets = committed(&group, &topic, PARTITIONS);
    let landed: Vec<i64> = (0..PARTITIONS)
        .map(|p| ch_u64(&format!("SELECT count() FROM {db}.t WHERE p = {p}")) as i64)
        .collect();
    eprintln!("sigterm: committed {offsets:?}, rows per partition {landed:?}");
    assert_eq!(
        offsets, landed,
        "committed offsets must equal the rows that landed"
    );
    assert!(
        landed.iter().sum::<i64>() < total as i64,
        "the stop was not mid-stream"
    );

    producer.join().unwrap();
    let bridge = Bridge::start(&cfg, &dir);
    assert!(
        wait_until(Duration::from_secs(120), || ch_u64(&format!(
            "SELECT count() FROM {db}.t"
        )) >= total),
        "rows did not all arrive after restart; log:\n{}",
        bridge.log_text()
    );
    // Give a duplicate, if any, time to show up before counting.
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ch_u64(&format!("SELECT count() FROM {db}.t")),
        total,
        "duplicates after restart"
    );
    assert_eq!(ch_u64(&format!("SELECT uniqExact(id) FROM {db}.t")), total);
    drop(bridge);
    drop_database(&db);
}

#[test]
fn replicas_joining_and_leaving_rebalance_without_loss_or_duplicates() {
    let (db, topic, group, cfg_a) = simple_setup("rebalance", PARTITIONS, "");
    let dir = test_dir(&db);
    let total = 40_000u64;
    let producer = produce_steadily(topic.clone(), total, 8.0);
    let count = || ch_u64(&format!("SELECT count() FROM {db}.t"));
    let a = Bridge::start(&cfg_a, &dir);
    assert!(
        wait_until(Duration::from_secs(60), || count() >= 4_000),
        "log:\n{}",
        a.log_text()
    );

    // A second replica joins: some partitions are revoked from the first,
    // which drains and commits them before they move.
    let cfg_b = BridgeConfig::new(&group, &db, &cfg_a.routes);
    let mut b = Bridge::start(&cfg_b, &dir);
    assert!(
        wait_until(Duration::from_secs(30), || b
            .metric("chbridge_assigned_partitions", "")
            >= 1.0),
        "the second replica got no partitions; log:\n{}",
        b.log_text()
    );
    let b_rows_at_join = count();
    assert!(wait_until(Duration::from_secs(30), || count()
        >= b_rows_at_join + 4_000));
    // It leaves again: its partitions go back to the first replica.
    b.signal(libc::SIGTERM);
    let status = b
        .wait(Duration::from_secs(30))
        .expect("replica b did not stop");
    assert_eq!(status.code(), Some(0), "log:\n{}", b.log_text());
    producer.join().unwrap();
    assert!(
        wait_until(Duration::from_secs(120), || count() >= total),
        "only {} of {total} rows; log:\n{}",
        count(),
        a.log_text()
    );
    thread::sleep(Duration::from_secs(2));
    let revoked = a.metric("chbridge_rebalances_total", "kind=\"revoke\"");
    eprintln!(
        "rebalance: {} rows for {total} ids; replica a saw {revoked} revocations",
        count()
    );
    assert!(revoked >= 1.0, "replica a never had partitions revoked");
    assert_eq!(
        ch_u64(&format!("SELECT uniqExact(id) FROM {db}.t")),
        total,
        "lost records"
    );
    assert_eq!(count(), total, "rebalances duplicated records");
    drop(a);
    drop_database(&db);
}
