//! Which offset of each partition may be committed.
//!
//! THE COMMIT RULE (see ARCHITECTURE.md): a partition's commit position is the
//! lowest offset that is still held by a batch not yet acknowledged by
//! ClickHouse, or, when no batch holds any of its records, one past the last
//! record read (or, then, the consumer's position past offsets that hold no
//! record: transaction markers, aborted records). Every record below the
//! position has therefore been inserted into every table it was routed to, or
//! skipped by policy. Nothing else moves the position: only
//! [`OffsetTracker::release`] (an acknowledgement), [`OffsetTracker::consumed`]
//! (a record read and placed or skipped) and [`OffsetTracker::passed`] (offsets
//! without records, with nothing held).

use std::collections::BTreeMap;

/// Keyed per record on the hot path: a fast hash (keys come from the
/// configuration and the broker's partition numbers, not from record data).
pub type FastMap<K, V> = foldhash::HashMap<K, V>;
pub type FastSet<T> = foldhash::HashSet<T>;
use std::sync::Mutex;

/// A partition as the pipeline knows it: the index of its topic in the
/// configuration's topic list, and the partition number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub topic: u32,
    pub partition: i32,
}

/// The part of one batch that comes from one partition: its first offset.
/// Records of a partition enter a table's batch in offset order, so the first
/// offset is the lowest one the batch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub key: PartitionKey,
    /// The assignment this segment was read under: an acknowledgement that
    /// arrives after the partition was revoked (and maybe assigned again) must
    /// not move the new owner's position.
    pub generation: u64,
    pub first_offset: i64,
}

/// The assignment generation of every partition this process owns, shared
/// with the sink tasks: an exactly-once batch of a partition that was revoked
/// meanwhile must not be inserted, because the new owner replays its range.
#[derive(Debug, Default)]
pub struct Ownership(Mutex<FastMap<PartitionKey, u64>>);

impl Ownership {
    fn map(&self) -> std::sync::MutexGuard<'_, FastMap<PartitionKey, u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, key: PartitionKey, generation: u64) {
        self.map().insert(key, generation);
    }

    pub fn remove(&self, key: PartitionKey) {
        self.map().remove(&key);
    }

    pub fn owns(&self, seg: &Segment) -> bool {
        self.map().get(&seg.key) == Some(&seg.generation)
    }
}

#[derive(Debug)]
struct PartitionState {
    generation: u64,
    /// One past the last offset read.
    next: Option<i64>,
    /// First offsets of the unacknowledged batches holding this partition's
    /// records, with how many batches start at each (fan-out to several tables).
    pending: BTreeMap<i64, u32>,
    /// The last position handed out for committing.
    committed: Option<i64>,
}

impl PartitionState {
    fn position(&self) -> Option<i64> {
        self.pending.keys().next().copied().or(self.next)
    }
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: FastMap<PartitionKey, PartitionState>,
    next_generation: u64,
}

impl OffsetTracker {
    /// The state of `key`, created with a new generation if not tracked yet.
    fn state(&mut self, key: PartitionKey) -> &mut PartitionState {
        let next_generation = &mut self.next_generation;
        self.parts.entry(key).or_insert_with(|| {
            *next_generation += 1;
            PartitionState {
                generation: *next_generation,
                next: None,
                pending: BTreeMap::new(),
                committed: None,
            }
        })
    }

    /// Starts tracking a newly assigned partition (kept as it is if already tracked).
    pub fn assign(&mut self, key: PartitionKey) {
        self.state(key);
    }

    /// Stops tracking a revoked partition.
    pub fn revoke(&mut self, key: PartitionKey) {
        self.parts.remove(&key);
    }

    /// The partition's current assignment generation (tracking starts here
    /// if the partition was not announced by a rebalance).
    pub fn generation(&mut self, key: PartitionKey) -> u64 {
        self.state(key).generation
    }

    /// Records that every record up to `offset` was read and placed in its
    /// batches or skipped; returns the partition's generation. A record read
    /// again after a seek back (pipeline::rewind) leaves the position where
    /// reading had got: what lies between is held by the re-read.
    pub fn consumed(&mut self, key: PartitionKey, offset: i64) -> u64 {
        let p = self.state(key);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        p.generation
    }

    /// The partition's generation and one past the highest offset read so
    /// far (tracking starts here if the partition was not announced).
    pub fn read_state(&mut self, key: PartitionKey) -> (u64, Option<i64>) {
        let p = self.state(key);
        (p.generation, p.next)
    }

    /// One past the highest offset of `key` read so far.
    pub fn read_high(&self, key: PartitionKey) -> Option<i64> {
        self.parts.get(&key).and_then(|p| p.next)
    }

    /// The generation of `key` if it is tracked.
    pub fn generation_of(&self, key: PartitionKey) -> Option<u64> {
        self.parts.get(&key).map(|p| p.generation)
    }

    /// Holds `offset` back until the batch that now starts holding the
    /// partition's records is acknowledged.
    /// A hold for an earlier assignment counts for nothing (its release is
    /// ignored as well), so that it cannot pin the new owner's position.
    pub fn hold(&mut self, key: PartitionKey, generation: u64, offset: i64) -> Segment {
        if let Some(p) = self
            .parts
            .get_mut(&key)
            .filter(|p| p.generation == generation)
        {
            *p.pending.entry(offset).or_insert(0) += 1;
        }
        Segment {
            key,
            generation,
            first_offset: offset,
        }
    }

    /// A batch holding `seg` was acknowledged (or its records were dropped by
    /// policy): its hold on the partition ends.
    pub fn release(&mut self, seg: &Segment) {
        let Some(p) = self.parts.get_mut(&seg.key) else {
            return;
        };
        if p.generation != seg.generation {
            return;
        }
        if let Some(n) = p.pending.get_mut(&seg.first_offset) {
            *n -= 1;
            if *n == 0 {
                p.pending.remove(&seg.first_offset);
            }
        }
    }

    /// The consumer's position of `key` is `offset`: the offsets below it it
    /// did not return hold no record (transaction markers, aborted records
    /// under read_committed). With no batch holding the partition, they are
    /// passed, so that the commit reaches the partition's end instead of
    /// leaving a lag of one marker for good. A partition that is not tracked
    /// (revoked) is left alone.
    pub fn passed(&mut self, key: PartitionKey, offset: i64) {
        if let Some(p) = self.parts.get_mut(&key) {
            if p.pending.is_empty() && p.next.is_none_or(|n| offset > n) {
                p.next = Some(offset);
            }
        }
    }

    /// The offset that may be committed for `key` now, if any record was read.
    pub fn position(&self, key: PartitionKey) -> Option<i64> {
        self.parts.get(&key).and_then(PartitionState::position)
    }

    /// Number of unacknowledged batch holds on `key`.
    pub fn held(&self, key: PartitionKey) -> usize {
        self.parts
            .get(&key)
            .map(|p| p.pending.values().map(|&n| n as usize).sum())
            .unwrap_or(0)
    }

    /// Positions to commit: with `None`, those that moved since they were
    /// last taken; with `Some(keys)`, those of `keys` whether they moved or not
    /// (a synchronous commit, which also repeats a failed asynchronous one).
    pub fn take_commits(&mut self, only: Option<&[PartitionKey]>) -> Vec<(PartitionKey, i64)> {
        let mut out = Vec::new();
        for (key, p) in &mut self.parts {
            if only.is_some_and(|o| !o.contains(key)) {
                continue;
            }
            if let Some(pos) = p.position() {
                if only.is_some() || p.committed != Some(pos) {
                    p.committed = Some(pos);
                    out.push((*key, pos));
                }
            }
        }
        out.sort();
        out
    }

    /// Makes the next commit carry `key`'s position even if it did not move.
    pub fn forget_committed(&mut self, key: PartitionKey) {
        if let Some(p) = self.parts.get_mut(&key) {
            p.committed = None;
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = PartitionKey> + '_ {
        self.parts.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0: PartitionKey = PartitionKey {
        topic: 0,
        partition: 0,
    };

    #[test]
    fn position_waits_for_the_lowest_unacknowledged_batch() {
        let mut t = OffsetTracker::default();
        t.assign(P0);
        assert_eq!(t.position(P0), None);
        // Offsets 10..=12 go to table A (batch a1), 11 also to table B (batch b1).
        let g = t.consumed(P0, 10);
        let a1 = t.hold(P0, g, 10);
        t.consumed(P0, 11);
        let b1 = t.hold(P0, g, 11);
        t.consumed(P0, 12);
        assert_eq!(t.position(P0), Some(10));
        // B acknowledged first: A still holds 10.
        t.release(&b1);
        assert_eq!(t.position(P0), Some(10));
        t.release(&a1);
        assert_eq!(t.position(P0), Some(13));
    }

    #[test]
    fn skipped_records_move_the_position_when_nothing_is_held() {
        let mut t = OffsetTracker::default();
        t.consumed(P0, 5);
        assert_eq!(t.position(P0), Some(6));
    }

    #[test]
    fn offsets_without_records_are_passed_only_when_nothing_is_held() {
        let key = PartitionKey {
            topic: 0,
            partition: 0,
        };
        let mut t = OffsetTracker::default();
        t.assign(key);
        let g = t.consumed(key, 9);
        // A batch holds 5..: the marker at 10 must not move the position.
        let seg = t.hold(key, g, 5);
        t.passed(key, 11);
        assert_eq!(t.position(key), Some(5));
        t.release(&seg);
        assert_eq!(t.position(key), Some(10));
        t.passed(key, 11);
        assert_eq!(t.position(key), Some(11));
        // A position behind what was read (a seek back) changes nothing.
        t.passed(key, 3);
        assert_eq!(t.position(key), Some(11));
        // A revoked partition is not tracked again.
        t.revoke(key);
        t.passed(key, 20);
        assert_eq!(t.position(key), None);
    }

    #[test]
    fn two_batches_starting_at_the_same_offset_both_hold_it() {
        let mut t = OffsetTracker::default();
        let g = t.consumed(P0, 0);
        let a = t.hold(P0, g, 0);
        let b = t.hold(P0, g, 0);
        t.release(&a);
        assert_eq!(t.position(P0), Some(0));
        assert_eq!(t.held(P0), 1);
        t.release(&b);
        assert_eq!(t.position(P0), Some(1));
    }

    #[test]
    fn acknowledgements_from_an_earlier_assignment_are_ignored() {
        let mut t = OffsetTracker::default();
        let g1 = t.consumed(P0, 0);
        let old = t.hold(P0, g1, 0);
        t.revoke(P0);
        t.assign(P0);
        let g2 = t.consumed(P0, 0);
        let _new = t.hold(P0, g2, 0);
        t.release(&old);
        assert_eq!(
            t.position(P0),
            Some(0),
            "a stale ack must not free the new hold"
        );
    }

    #[test]
    fn commits_are_taken_once_unless_asked_for_by_key() {
        let p1 = PartitionKey {
            topic: 0,
            partition: 1,
        };
        let mut t = OffsetTracker::default();
        t.consumed(P0, 0);
        t.consumed(p1, 7);
        assert_eq!(t.take_commits(None), vec![(P0, 1), (p1, 8)]);
        assert_eq!(t.take_commits(None), vec![]);
        t.consumed(p1, 8);
        // A synchronous commit of P0 alone must not mark p1's new position as taken.
        assert_eq!(t.take_commits(Some(&[P0])), vec![(P0, 1)]);
        assert_eq!(t.take_commits(None), vec![(p1, 9)]);
    }
}
