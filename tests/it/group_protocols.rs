//! Both consumer group protocols under load, exactly-once: one replica, then
//! three, then one again, with records produced all along. Nothing is lost or
//! repeated, and the longest time without a new row around each rebalance
//! is printed (the pause the rebalance cost), for docs/compatibility.md.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

const PARTITIONS: i32 = 6;
const TOTAL: u64 = 90_000;
const SECONDS: f64 = 40.0;

/// The longest stretch between `from` and `to` in which the row count did not grow.
fn longest_pause(samples: &[(Duration, u64)], from: Duration, to: Duration) -> Duration {
    let mut longest = Duration::ZERO;
    let mut last_growth = from;
    let mut last_count = None;
    for &(at, n) in samples.iter().filter(|(at, _)| *at >= from && *at <= to) {
        if last_count.is_some_and(|c| n > c) {
            longest = longest.max(at - last_growth);
            last_growth = at;
        }
        last_count = Some(n);
    }
    longest
}

fn one_three_one(protocol: &str) {
    let db = unique(&format!("it_gp_{protocol}"));
    let topic = unique(&format!("gp_{protocol}"));
    let group = unique(&format!("g_gp_{protocol}"));
    create_database(&db);
    ch(&format!(
        "CREATE TABLE {db}.t {SIMPLE_TABLE} SETTINGS non_replicated_deduplication_window = 5000"
    ));
    create_topic(&topic, PARTITIONS);
    let mut cfg = BridgeConfig::new(
        &group,
        &db,
        &format!("[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\n"),
    );
    cfg.extra =
        format!("delivery = \"exactly-once\"\n[exactly_once]\nstate_table = \"{db}.state\"\n");
    cfg.group_protocol = Some(protocol.to_string());
    let dir = test_dir(&db);
    let count = {
        let db = db.clone();
        move || ch_u64(&format!("SELECT count() FROM {db}.t"))
    };

    let producer = {
        let topic = topic.clone();
        thread::spawn(move || {
            let prod = TestProducer::new();
            let chunks = 200u64;
            let per_chunk = TOTAL / chunks;
            for c in 0..chunks {
                produce_simple(&prod, &topic, PARTITIONS, c * per_chunk, per_chunk);
                thread::sleep(Duration::from_secs_f64(SECONDS / chunks as f64));
            }
            prod.flush();
        })
    };
    let start = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (samples, done, count) = (samples.clone(), done.clone(), count.clone());
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let n = count();
                samples.lock().unwrap().push((start.elapsed(), n));
                thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let a = Bridge::start(&cfg, &dir);
    assert!(
        wait_until(Duration::from_secs(60), || count() >= 5_000),
        "{protocol}: no rows; log:\n{}",
        a.log_text()
    );
    let joined_at = start.elapsed();
    let mut others: Vec<Bridge> = (0..2)
        .map(|i| {
            let mut c = cfg.clone();
            c.http_port = free_port();
            // A directory each: the config file is written there before the start.
            let own = dir.join(format!("replica{i}"));
            std::fs::create_dir_all(&own).expect("dir");
            Bridge::start(&c, &own)
        })
        .collect();
    let all_in = wait_until(Duration::from_secs(60), || {
        others
            .iter()
            .all(|b| b.metric("chbridge_assigned_partitions", "") >= 1.0)
            && a.metric("chbridge_assigned_partitions", "") <= 2.0
    });
    assert!(
        all_in,
        "{protocol}: the replicas did not share the partitions"
    );
    let shared_at = start.elapsed();
    let rows = count();
    assert!(wait_until(Duration::from_secs(30), || count() >= rows + 10_000));
    let left_at = start.elapsed();
    for b in &others {
        b.signal(libc::SIGTERM);
    }
    for b in &mut others {
        let code = b.wait(Duration::from_secs(30)).and_then(|s| s.code());
        assert_eq!(code, Some(0), "{protocol}: log:\n{}", b.log_text());
    }
    let back = wait_until(Duration::from_secs(60), || {
        a.metric("chbridge_assigned_partitions", "") >= PARTITIONS as f64
    });
    assert!(back, "{protocol}: the partitions did not come back");
    let back_at = start.elapsed();
    producer.join().unwrap();
    assert!(
        wait_until(Duration::from_secs(120), || count() >= TOTAL),
        "{protocol}: only {} of {TOTAL} rows; log:\n{}",
        count(),
        a.log_text()
    );
    let end = start.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        ch_u64(&format!("SELECT uniqExact(id) FROM {db}.t")),
        TOTAL,
        "{protocol}: lost records"
    );
    assert_eq!(count(), TOTAL, "{protocol}: duplicated records");
    let samples = samples.lock().unwrap();
    let steady = longest_pause(&samples, Duration::ZERO, joined_at);
    let join = longest_pause(&samples, joined_at, left_at);
    let leave = longest_pause(&samples, left_at, end.min(back_at + Duration::from_secs(5)));
    eprintln!(
        "group protocol {protocol}: longest pause without new rows: before {:.2}s, \
         1 -> 3 {:.2}s (shared after {:.1}s), 3 -> 1 {:.2}s (back after {:.1}s)",
        steady.as_secs_f64(),
        join.as_secs_f64(),
        (shared_at - joined_at).as_secs_f64(),
        leave.as_secs_f64(),
        (back_at - left_at).as_secs_f64(),
    );
    drop(a);
    drop_database(&db);
}

#[test]
fn classic_one_three_one_replicas_under_load_lose_and_repeat_nothing() {
    one_three_one("classic");
}

#[test]
fn consumer_one_three_one_replicas_under_load_lose_and_repeat_nothing() {
    one_three_one("consumer");
}
