//! (c) ClickHouse killed (-9) for 10 s mid-stream: nothing is committed past
//! what landed while it is down, consumption pauses once the memory budget is
//! full, and every record lands once it is back.

use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

const PARTITIONS: i32 = 4;

#[test]
fn clickhouse_down_for_ten_seconds_no_loss_no_early_commit() {
    let name = unique("it_outage");
    let dir = test_dir(&name);
    let mut server = PrivateClickHouse::start(&dir);
    server.sql("CREATE DATABASE it");
    server.sql(&format!("CREATE TABLE it.t {SIMPLE_TABLE}"));
    let topic = unique("outage");
    let group = unique("g_outage");
    create_topic(&topic, PARTITIONS);
    let mut cfg = BridgeConfig::new(
        &group,
        "it",
        &format!("[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\n"),
    );
    cfg.ch_port = server.http_port;
    cfg.ch_https_port = server.https_port;
    // A small budget, so that the outage fills it and consumption must pause.
    // A short stall timeout, so that the watchdog reports the outage.
    cfg.extra = "max_buffered_bytes = \"512KiB\"\nstall_timeout = \"4s\"".into();
    cfg.batch_extra = "max_bytes = \"128KiB\"".into();
    let bridge = Bridge::start(&cfg, &dir);

    // Phase 1 lands and is committed before the outage.
    let phase1 = 10_000u64;
    let prod = TestProducer::new();
    produce_simple(&prod, &topic, PARTITIONS, 0, phase1);
    prod.flush();
    let per_partition = (phase1 / PARTITIONS as u64) as i64;
    assert!(
        wait_until(Duration::from_secs(60), || committed(
            &group, &topic, PARTITIONS
        )
        .iter()
        .all(|&o| o == per_partition)),
        "phase 1 not committed: {:?}; log:\n{}",
        committed(&group, &topic, PARTITIONS),
        bridge.log_text()
    );
    assert_eq!(
        server.sql("SELECT count() FROM it.t").trim(),
        phase1.to_string()
    );

    // A real crash of ClickHouse while records keep coming.
    server.kill9();
    let down = Instant::now();
    let phase2 = 40_000u64;
    produce_simple(&prod, &topic, PARTITIONS, phase1, phase2);
    prod.flush();
    thread::sleep(Duration::from_secs(3));
    let early = committed(&group, &topic, PARTITIONS);
    thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    let late = committed(&group, &topic, PARTITIONS);
    eprintln!("outage: committed {early:?} after 3 s, {late:?} after 10 s, rows before {phase1}");
    assert!(
        late.iter().all(|&o| o == per_partition),
        "offsets moved past what landed while ClickHouse was down: {late:?}"
    );
    assert!(
        bridge.metric("chbridge_insert_retries_total", "") >= 1.0,
        "no retries were counted while ClickHouse was down"
    );
    let buffered = bridge.metric("chbridge_buffered_bytes", "");
    assert_eq!(
        bridge.metric("chbridge_consumer_paused", ""),
        1.0,
        "consumption should be paused with {buffered} bytes buffered"
    );
    assert!(
        buffered <= (512 + 64) as f64 * 1024.0,
        "buffer over budget: {buffered}"
    );
    assert_eq!(
        bridge.metric("chbridge_partition_stalled", ""),
        PARTITIONS as f64,
        "every partition waits on ClickHouse; log:\n{}",
        bridge.log_text()
    );
    assert!(bridge.log_text().contains("partition stalled"));

    server.restart();
    let total = phase1 + phase2;
    let ids = || {
        server
            .sql(&format!(
                "SELECT uniqExact(id) FROM it.t WHERE id < {total}"
            ))
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(120), || ids() == total),
        "only {} of {total} ids after ClickHouse came back; log:\n{}",
        ids(),
        bridge.log_text()
    );
    let all = (total / PARTITIONS as u64) as i64;
    assert!(
        wait_until(Duration::from_secs(30), || committed(
            &group, &topic, PARTITIONS
        )
        .iter()
        .all(|&o| o == all)),
        "offsets did not catch up: {:?}",
        committed(&group, &topic, PARTITIONS)
    );
    assert!(
        wait_until(Duration::from_secs(10), || bridge
            .metric("chbridge_partition_stalled", "")
            == 0.0),
        "partitions still reported stalled after catching up"
    );
    let rows: u64 = server
        .sql("SELECT count() FROM it.t")
        .trim()
        .parse()
        .unwrap_or(0);
    eprintln!(
        "outage: {rows} rows for {total} ids after recovery; paused with {buffered} bytes buffered"
    );
    assert_eq!(
        bridge.metric("chbridge_consumer_paused", ""),
        0.0,
        "not resumed"
    );
    drop(bridge);
}

#[test]
fn a_bridge_started_before_clickhouse_waits_for_it() {
    let name = unique("it_late_ch");
    let dir = test_dir(&name);
    let mut server = PrivateClickHouse::start(&dir);
    server.sql("CREATE DATABASE it");
    server.sql(&format!("CREATE TABLE it.t {SIMPLE_TABLE}"));
    server.kill9();
    let topic = unique("late_ch");
    create_topic(&topic, 2);
    let prod = TestProducer::new();
    produce_simple(&prod, &topic, 2, 0, 1_000);
    prod.flush();
    let mut cfg = BridgeConfig::new(
        &unique("g_late_ch"),
        "it",
        &format!("[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\n"),
    );
    cfg.ch_port = server.http_port;
    cfg.ch_https_port = server.https_port;
    let mut bridge = Bridge::start(&cfg, &dir);
    thread::sleep(Duration::from_secs(3));
    assert!(
        bridge.child.try_wait().unwrap().is_none(),
        "the bridge exited instead of waiting; log:\n{}",
        bridge.log_text()
    );
    assert!(bridge
        .log_text()
        .contains("ClickHouse unavailable at start"));
    server.restart();
    assert!(
        wait_until(Duration::from_secs(60), || server
            .sql("SELECT count() FROM it.t")
            .trim()
            == "1000"),
        "rows did not land once ClickHouse came up; log:\n{}",
        bridge.log_text()
    );
}
