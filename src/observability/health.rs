//! Liveness and readiness, as the pipeline reports them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Health {
    started: Instant,
    /// Milliseconds since `started` at the consumer loop's last turn.
    last_turn_ms: AtomicU64,
    joined: AtomicBool,
    clickhouse_ok: AtomicBool,
    /// How long the loop may go without a turn before it counts as stalled.
    stall_after: Duration,
}

impl Health {
    pub fn new(stall_after: Duration) -> Health {
        Health {
            started: Instant::now(),
            last_turn_ms: AtomicU64::new(0),
            joined: AtomicBool::new(false),
            clickhouse_ok: AtomicBool::new(false),
            stall_after,
        }
    }

    /// Called by the consumer loop on every turn.
    pub fn turn(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_turn_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_joined(&self, v: bool) {
        self.joined.store(v, Ordering::Relaxed);
    }

    pub fn set_clickhouse_ok(&self, v: bool) {
        self.clickhouse_ok.store(v, Ordering::Relaxed);
    }

    /// The main loop made progress recently.
    pub fn live(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_turn_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) <= self.stall_after.as_millis() as u64
    }

    /// The group was joined and ClickHouse answers.
    pub fn ready(&self) -> bool {
        self.joined.load(Ordering::Relaxed) && self.clickhouse_ok.load(Ordering::Relaxed)
    }

    pub fn describe(&self) -> String {
        format!(
            "live={} joined={} clickhouse_ok={}\n",
            self.live(),
            self.joined.load(Ordering::Relaxed),
            self.clickhouse_ok.load(Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_both_the_group_and_clickhouse() {
        let h = Health::new(Duration::from_secs(60));
        h.turn();
        assert!(h.live());
        assert!(!h.ready());
        h.set_joined(true);
        assert!(!h.ready());
        h.set_clickhouse_ok(true);
        assert!(h.ready());
        let stalled = Health::new(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!stalled.live());
    }
}
