//! What the pipeline asks of the consumer between two polls: commit, pause,
//! resume, seek, and which partitions it holds.
//!
//! A trait because the rebalance, commit, back-pressure, watchdog and re-read
//! logic of `pipeline::core` is tested against an in-memory double
//! ([`fake::FakeConsumer`]); librdkafka's consumer is the real one.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

/// A partition by topic name, as the consumer knows it.
pub type TopicPartition = (String, i32);

pub trait ConsumerControl {
    /// Commits `positions` (topic, partition, next offset to read);
    /// `sync` waits for the broker's answer. An error means nothing of this
    /// request is known to be committed.
    fn commit(&self, positions: &[(String, i32, i64)], sync: bool) -> Result<(), String>;
    fn pause(&self, partitions: &[TopicPartition]) -> Result<(), String>;
    fn resume(&self, partitions: &[TopicPartition]) -> Result<(), String>;
    /// Makes the next records of the partition start at `offset`.
    fn seek(&self, topic: &str, partition: i32, offset: i64) -> Result<(), String>;
    /// The partitions currently assigned to this member.
    fn assignment(&self) -> Result<Vec<TopicPartition>, String>;
    /// Per assigned partition, the offset after the last one the consumer
    /// returned or passed: librdkafka moves it past transaction markers and
    /// aborted records, which are never returned.
    fn positions(&self) -> Result<Vec<(String, i32, i64)>, String>;
}

fn list(partitions: &[TopicPartition]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in partitions {
        tpl.add_partition(t, *p);
    }
    tpl
}

impl<C: ConsumerContext> ConsumerControl for BaseConsumer<C> {
    fn commit(&self, positions: &[(String, i32, i64)], sync: bool) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in positions {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                .map_err(|e| format!("bad commit offset {o} for {t}[{p}]: {e}"))?;
        }
        let mode = if sync {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        rdkafka::consumer::Consumer::commit(self, &tpl, mode).map_err(|e| e.to_string())
    }

    fn pause(&self, partitions: &[TopicPartition]) -> Result<(), String> {
        if partitions.is_empty() {
            return Ok(());
        }
        rdkafka::consumer::Consumer::pause(self, &list(partitions)).map_err(|e| e.to_string())
    }

    fn resume(&self, partitions: &[TopicPartition]) -> Result<(), String> {
        if partitions.is_empty() {
            return Ok(());
        }
        rdkafka::consumer::Consumer::resume(self, &list(partitions)).map_err(|e| e.to_string())
    }

    fn seek(&self, topic: &str, partition: i32, offset: i64) -> Result<(), String> {
        rdkafka::consumer::Consumer::seek(
            self,
            topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(5),
        )
        .map_err(|e| e.to_string())
    }

    fn positions(&self) -> Result<Vec<(String, i32, i64)>, String> {
        let tpl = rdkafka::consumer::Consumer::position(self).map_err(|e| e.to_string())?;
        Ok(tpl
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.topic().to_string(), e.partition(), o)),
                _ => None,
            })
            .collect())
    }

    fn assignment(&self) -> Result<Vec<TopicPartition>, String> {
        let tpl = rdkafka::consumer::Consumer::assignment(self).map_err(|e| e.to_string())?;
        Ok(tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect())
    }
}

/// An in-memory consumer for unit tests: it records what it was asked and
/// fails commits on cue.
#[cfg(test)]
pub mod fake {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};

    use super::{ConsumerControl, TopicPartition};

    /// One commit request: the positions, and whether it was synchronous.
    pub type CommitRequest = (Vec<(String, i32, i64)>, bool);

    #[derive(Default)]
    pub struct FakeConsumer {
        pub assigned: RefCell<BTreeSet<TopicPartition>>,
        pub paused: RefCell<BTreeSet<TopicPartition>>,
        /// Every commit request, in order: (positions, sync).
        pub commits: RefCell<Vec<CommitRequest>>,
        /// What the broker holds after the requests that succeeded.
        pub committed: RefCell<BTreeMap<TopicPartition, i64>>,
        /// The next this many commit requests fail at once.
        pub fail_commits: RefCell<usize>,
        pub seeks: RefCell<Vec<(String, i32, i64)>>,
        /// What `positions` answers (librdkafka's view of where reading got).
        pub positions: RefCell<Vec<(String, i32, i64)>>,
    }

    impl FakeConsumer {
        pub fn with(partitions: &[(&str, i32)]) -> FakeConsumer {
            let f = FakeConsumer::default();
            for (t, p) in partitions {
                f.assigned.borrow_mut().insert((t.to_string(), *p));
            }
            f
        }

        pub fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
            self.committed
                .borrow()
                .get(&(topic.to_string(), partition))
                .copied()
        }

        pub fn is_paused(&self, topic: &str, partition: i32) -> bool {
            self.paused
                .borrow()
                .contains(&(topic.to_string(), partition))
        }
    }

    impl ConsumerControl for FakeConsumer {
        fn commit(&self, positions: &[(String, i32, i64)], sync: bool) -> Result<(), String> {
            self.commits.borrow_mut().push((positions.to_vec(), sync));
            let mut fail = self.fail_commits.borrow_mut();
            if *fail > 0 {
                *fail -= 1;
                return Err("Local: No offset stored (scripted failure)".into());
            }
            for (t, p, o) in positions {
                self.committed.borrow_mut().insert((t.clone(), *p), *o);
            }
            Ok(())
        }

        fn pause(&self, partitions: &[TopicPartition]) -> Result<(), String> {
            self.paused.borrow_mut().extend(partitions.iter().cloned());
            Ok(())
        }

        fn resume(&self, partitions: &[TopicPartition]) -> Result<(), String> {
            let mut paused = self.paused.borrow_mut();
            for tp in partitions {
                paused.remove(tp);
            }
            Ok(())
        }

        fn seek(&self, topic: &str, partition: i32, offset: i64) -> Result<(), String> {
            self.seeks
                .borrow_mut()
                .push((topic.to_string(), partition, offset));
            Ok(())
        }

        fn assignment(&self) -> Result<Vec<TopicPartition>, String> {
            Ok(self.assigned.borrow().iter().cloned().collect())
        }

        fn positions(&self) -> Result<Vec<(String, i32, i64)>, String> {
            Ok(self.positions.borrow().clone())
        }
    }
}
