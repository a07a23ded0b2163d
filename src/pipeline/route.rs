//! A route's error policy: what happens to a record that cannot become a
//! row (`on_error`), the failure rate that stops a route, and the budget
//! that keeps a flood of bad records from flooding the logs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use crate::config::OnError;
use crate::decode::Decoder;

pub struct RouteState {
    pub table: usize,
    pub decoder: Box<dyn Decoder>,
    /// To build the decoder again when the table changes.
    pub config: crate::config::RouteConfig,
    pub on_error: OnError,
    pub dead_letter_topic: Option<String>,
    /// Failure counters by reason, created on first use.
    pub failed: HashMap<&'static str, IntCounter>,
    pub skipped_log: LogBudget,
    pub rate: FailureRate,
}

/// Caps per-record warnings so that a flood of bad records cannot flood the
/// logs: the first few each second are logged with where they came from, the
/// rest are counted and summarised (the metric counts every one).
pub struct LogBudget {
    window: Instant,
    logged: u32,
    pub(super) suppressed: u64,
}

impl LogBudget {
    pub const PER_SECOND: u32 = 10;

    pub fn new() -> LogBudget {
        LogBudget {
            window: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// True when this event may be logged; reports what was held back in the last window.
    pub fn allow(&mut self, table: &str) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::warn!(
                    table,
                    suppressed = self.suppressed,
                    "more records failed than logged individually; \
                     chbridge_records_failed_total counts them all"
                );
            }
            self.window = Instant::now();
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < Self::PER_SECOND {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// The share of a route's records that failed over a sliding window,
/// estimated from the current and the previous window's counts.
pub struct FailureRate {
    pub window: Duration,
    pub max_ratio: f64,
    started: Instant,
    current: (f64, f64),
    previous: (f64, f64),
}

impl FailureRate {
    /// Failures are judged only over at least this many records.
    const MIN_RECORDS: f64 = 100.0;

    pub fn new(window: Duration, max_ratio: f64) -> FailureRate {
        FailureRate {
            window,
            max_ratio,
            started: Instant::now(),
            current: (0.0, 0.0),
            previous: (0.0, 0.0),
        }
    }

    /// Counts a record that became a row. Per record, so no clock: the
    /// window rolls in `Core::service` and before each failure is judged.
    pub fn success(&mut self) {
        self.current.1 += 1.0;
    }

    /// Counts a failed record; returns (failed, total) over the window when
    /// the share of failures is above the limit.
    pub fn failure(&mut self, now: Instant) -> Option<(u64, u64)> {
        if self.max_ratio >= 1.0 {
            return None;
        }
        self.roll(now);
        self.current.0 += 1.0;
        self.current.1 += 1.0;
        let weight = 1.0
            - now.saturating_duration_since(self.started).as_secs_f64() / self.window.as_secs_f64();
        let total = self.current.1 + self.previous.1 * weight;
        let bad = self.current.0 + self.previous.0 * weight;
        (total >= Self::MIN_RECORDS && bad / total > self.max_ratio)
            .then_some((bad.round() as u64, total.round() as u64))
    }

    /// Starts a new window once the current one is over.
    pub fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed >= self.window {
            self.previous = if elapsed < self.window * 2 {
                self.current
            } else {
                (0.0, 0.0)
            };
            self.current = (0.0, 0.0);
            self.started = now;
        }
    }
}

impl RouteState {
    pub fn new(
        table: usize,
        decoder: Box<dyn Decoder>,
        route: &crate::config::RouteConfig,
    ) -> RouteState {
        RouteState {
            table,
            decoder,
            config: route.clone(),
            on_error: route.on_error,
            dead_letter_topic: route.dead_letter_topic.clone(),
            failed: HashMap::new(),
            skipped_log: LogBudget::new(),
            rate: FailureRate::new(route.failed_window, route.max_failed_ratio),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_record_warnings_are_capped_per_second() {
        let mut b = LogBudget::new();
        let allowed = (0..100).filter(|_| b.allow("db.t")).count();
        assert_eq!(allowed, LogBudget::PER_SECOND as usize);
        assert_eq!(b.suppressed, 90);
        b.window -= Duration::from_secs(2);
        assert!(b.allow("db.t"));
        assert_eq!(b.suppressed, 0);
    }
}
