//! Reading records of one table again, from Kafka.
//!
//! A table reads records a second time when its columns changed (schema
//! drift): rows decoded for the old columns and not yet in ClickHouse cannot
//! be re-encoded for the new ones, since decoding dropped whatever the old
//! columns had no place for (a field that is now a column, a value only the
//! new type can hold). They are decoded again from their records.
//!
//! While a table rewinds, its records are deferred: not placed, and each
//! partition's lowest deferred or dropped offset is held in the
//! [`OffsetTracker`], so the commit cannot pass it. Once the batches it had
//! in its sink are back, the consumer seeks each partition back to that
//! offset and the table takes the records from there up to where reading had
//! got (a [`Redo`]). The other tables skip them: they had them already.

use crate::kafka::offsets::{FastMap, OffsetTracker, PartitionKey, Segment};

/// A table waiting to read records again: what it waits for, and per
/// partition the lowest offset to read again from, held so that the commit
/// cannot pass it.
#[derive(Debug, Default)]
pub struct Rewind {
    starts: FastMap<PartitionKey, Segment>,
    /// The table's batches that were in its sink when the columns changed
    /// must come back first (inserted, or returned as stale).
    pub sink: bool,
}

impl Rewind {
    /// Makes `offset` of `key` (read under `generation`) part of what is read again.
    pub fn lower(
        &mut self,
        tracker: &mut OffsetTracker,
        key: PartitionKey,
        generation: u64,
        offset: i64,
    ) {
        if self
            .starts
            .get(&key)
            .is_some_and(|s| s.generation == generation && s.first_offset <= offset)
        {
            return;
        }
        let hold = tracker.hold(key, generation, offset);
        if let Some(old) = self.starts.insert(key, hold) {
            tracker.release(&old);
        }
    }

    fn ready(&self, in_sink: usize) -> bool {
        !(self.sink && in_sink > 0)
    }
}

/// A partition being read again for a table: offsets `next..until` are the
/// table's to place; `hold` keeps the commit at or below where the re-read
/// started until it is over.
#[derive(Debug, Clone, Copy)]
pub struct Redo {
    pub next: i64,
    pub until: i64,
    pub hold: Segment,
}

/// What a table does with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Place it (decode it into the table's batch).
    Take,
    /// The table had it already: a record read again for another table.
    Skip,
    /// The table is rewinding: it takes the record when it is read again.
    Defer,
}

/// One table's re-reading: the rewind being prepared, and the partitions
/// being read again.
#[derive(Debug, Default)]
pub struct Reread {
    pub rewind: Option<Rewind>,
    redo: FastMap<PartitionKey, Redo>,
}

impl Reread {
    /// What the table does with the record at `offset` of `key`. `seen` says
    /// the consumer had read that offset before (it is read again after a
    /// seek, for this table or another one).
    pub fn admit(
        &mut self,
        tracker: &mut OffsetTracker,
        key: PartitionKey,
        generation: u64,
        offset: i64,
        seen: bool,
    ) -> Admit {
        if let Some(r) = &mut self.rewind {
            // Read again for another table, below what this one reads
            // again: it has the record already.
            let wanted = r
                .starts
                .get(&key)
                .is_some_and(|s| s.generation == generation && s.first_offset <= offset);
            if seen && !wanted {
                return Admit::Skip;
            }
            r.lower(tracker, key, generation, offset);
            return Admit::Defer;
        }
        let plain = if seen { Admit::Skip } else { Admit::Take };
        // The steady state: nothing read again, no lookup.
        if self.redo.is_empty() {
            return plain;
        }
        let Some(r) = self.redo.get_mut(&key) else {
            return plain;
        };
        // Past the end (also across a gap in a compacted topic): done.
        if offset >= r.until {
            let hold = r.hold;
            self.redo.remove(&key);
            tracker.release(&hold);
            return plain;
        }
        if offset < r.next {
            return Admit::Skip;
        }
        r.next = offset + 1;
        if r.next >= r.until {
            let hold = r.hold;
            self.redo.remove(&key);
            tracker.release(&hold);
        }
        Admit::Take
    }

    /// Starts a rewind, or joins the one in progress. A partition still
    /// being read again becomes part of it from where the re-read had got.
    pub fn begin(&mut self, tracker: &mut OffsetTracker) -> &mut Rewind {
        let redo: Vec<(PartitionKey, Redo)> = self.redo.drain().collect();
        let rewind = self.rewind.get_or_insert_with(Rewind::default);
        for (key, r) in redo {
            rewind.lower(tracker, key, r.hold.generation, r.next);
            tracker.release(&r.hold);
        }
        rewind
    }

    /// Ends the rewind once it waits for nothing (`in_sink`: the table's
    /// batches its sink has not answered for). Returns where each partition
    /// is read again from; the re-read runs up to where reading had got.
    pub fn finish(
        &mut self,
        tracker: &mut OffsetTracker,
        in_sink: usize,
    ) -> Option<Vec<(PartitionKey, i64)>> {
        if !self.rewind.as_ref()?.ready(in_sink) {
            return None;
        }
        let rewind = self.rewind.take()?;
        let mut seeks = Vec::new();
        for (key, hold) in rewind.starts {
            // Revoked meanwhile (maybe assigned again): its holds are gone,
            // and the new assignment reads from the committed offset.
            if tracker.generation_of(key) != Some(hold.generation) {
                continue;
            }
            let until = tracker.read_high(key).unwrap_or(hold.first_offset);
            if until <= hold.first_offset {
                tracker.release(&hold);
                continue;
            }
            self.redo.insert(
                key,
                Redo {
                    next: hold.first_offset,
                    until,
                    hold,
                },
            );
            seeks.push((key, hold.first_offset));
        }
        seeks.sort();
        Some(seeks)
    }

    /// Where `key` is being read again from for this table, if it is.
    pub fn reading_from(&self, key: PartitionKey) -> Option<i64> {
        self.redo.get(&key).map(|r| r.next)
    }

    /// A revoked partition is not read again here.
    pub fn revoke(&mut self, key: PartitionKey) {
        self.redo.remove(&key);
        if let Some(r) = &mut self.rewind {
            r.starts.remove(&key);
        }
    }

    /// The holds of records waiting to be read again: a drain does not wait
    /// for them (they are committed below and read again after a restart).
    pub fn holds(&self) -> impl Iterator<Item = &Segment> {
        self.rewind
            .iter()
            .flat_map(|r| r.starts.values())
            .chain(self.redo.values().map(|r| &r.hold))
    }

    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.rewind.is_none() && self.redo.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0: PartitionKey = PartitionKey {
        topic: 0,
        partition: 0,
    };

    fn read(t: &mut OffsetTracker, r: &mut Reread, offset: i64) -> Admit {
        let (generation, high) = t.read_state(P0);
        let seen = high.is_some_and(|h| offset < h);
        let a = r.admit(t, P0, generation, offset, seen);
        t.consumed(P0, offset);
        a
    }

    #[test]
    fn a_rewind_defers_holds_and_then_reads_again_up_to_where_reading_got() {
        let mut t = OffsetTracker::default();
        t.assign(P0);
        let mut r = Reread::default();
        for o in 0..10 {
            assert_eq!(read(&mut t, &mut r, o), Admit::Take);
        }
        r.begin(&mut t).sink = true;
        assert_eq!(read(&mut t, &mut r, 10), Admit::Defer);
        assert_eq!(read(&mut t, &mut r, 11), Admit::Defer);
        assert_eq!(t.position(P0), Some(10), "the deferred records are held");
        assert_eq!(r.finish(&mut t, 1), None, "a batch is still in the sink");
        assert_eq!(r.finish(&mut t, 0), Some(vec![(P0, 10)]));
        // The consumer reads 10 and 11 again: the table takes them; then new ones.
        assert_eq!(read(&mut t, &mut r, 10), Admit::Take);
        assert_eq!(t.position(P0), Some(10));
        assert_eq!(read(&mut t, &mut r, 11), Admit::Take);
        assert_eq!(t.position(P0), Some(12), "the re-read is over: no hold");
        assert_eq!(read(&mut t, &mut r, 12), Admit::Take);
        assert!(r.is_idle());
    }

    #[test]
    fn records_read_again_for_another_table_are_skipped() {
        let mut t = OffsetTracker::default();
        t.assign(P0);
        let mut r = Reread::default();
        for o in 0..5 {
            read(&mut t, &mut r, o);
        }
        // Another table seeks back to 2: this one had 2..4 already.
        assert_eq!(read(&mut t, &mut r, 2), Admit::Skip);
        assert_eq!(read(&mut t, &mut r, 4), Admit::Skip);
        assert_eq!(read(&mut t, &mut r, 5), Admit::Take);
    }

    /// Found by the model test in pipeline::core: a table that starts a
    /// rewind while another table reads a partition again must not take the
    /// records it had for ones to read again.
    #[test]
    fn a_rewinding_table_skips_records_read_again_for_another_table() {
        let mut t = OffsetTracker::default();
        t.assign(P0);
        let mut r = Reread::default();
        for o in 0..10 {
            read(&mut t, &mut r, o);
        }
        let g = t.generation(P0);
        r.begin(&mut t).lower(&mut t, P0, g, 8);
        // Another table seeks back to 5: 5..7 are this table's already.
        for o in 5..8 {
            assert_eq!(read(&mut t, &mut r, o), Admit::Skip, "offset {o}");
        }
        assert_eq!(read(&mut t, &mut r, 8), Admit::Defer);
        assert_eq!(r.finish(&mut t, 0), Some(vec![(P0, 8)]));
    }

    #[test]
    fn a_second_rewind_during_a_re_read_starts_where_the_first_had_got() {
        let mut t = OffsetTracker::default();
        t.assign(P0);
        let mut r = Reread::default();
        for o in 0..20 {
            read(&mut t, &mut r, o);
        }
        let g = t.generation(P0);
        r.begin(&mut t).lower(&mut t, P0, g, 5);
        assert_eq!(r.finish(&mut t, 0), Some(vec![(P0, 5)]));
        assert_eq!(read(&mut t, &mut r, 5), Admit::Take);
        assert_eq!(read(&mut t, &mut r, 6), Admit::Take);
        r.begin(&mut t).sink = true;
        assert_eq!(r.finish(&mut t, 1), None, "a batch is still in the sink");
        assert_eq!(r.finish(&mut t, 0), Some(vec![(P0, 7)]));
        assert_eq!(t.position(P0), Some(7));
        // Across a gap (compaction): the first offset past the end ends it.
        assert_eq!(read(&mut t, &mut r, 7), Admit::Take);
        assert_eq!(read(&mut t, &mut r, 25), Admit::Take);
        assert!(r.is_idle());
        assert_eq!(t.position(P0), Some(26));
    }
}
