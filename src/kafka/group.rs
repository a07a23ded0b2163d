//! Who owns which partition: the group as the coordinator describes it
//! (DescribeGroups), with each member's assignment decoded from the consumer
//! protocol's bytes.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

/// One member of the group as the coordinator knows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Member {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    pub partitions: Vec<(String, i32)>,
}

impl Member {
    /// How a person names the member: its client id (chbridge sets it to the
    /// instance id or host name) and where it connects from.
    pub fn label(&self) -> String {
        let name = match (self.client_id.as_str(), self.member_id.as_str()) {
            ("", "") => "unnamed member",
            ("", id) => id,
            (client, _) => client,
        };
        match self.host.trim_start_matches('/') {
            "" => name.to_string(),
            host => format!("{name} ({host})"),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Group {
    /// The coordinator's state name: Stable, PreparingRebalance, Empty, Dead...
    pub state: String,
    pub members: Vec<Member>,
}

impl Group {
    /// Owner label per (topic, partition).
    pub fn owners(&self) -> HashMap<(String, i32), String> {
        let mut out = HashMap::new();
        for m in &self.members {
            for tp in &m.partitions {
                out.insert(tp.clone(), m.label());
            }
        }
        out
    }
}

/// Describes `group`. Members whose assignment bytes do not parse (another
/// protocol, a broker that sends none) are listed without partitions.
pub fn describe<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    group: &str,
    timeout: Duration,
) -> Result<Group, String> {
    let list = consumer
        .fetch_group_list(Some(group), timeout)
        .map_err(|e| format!("cannot describe group {group}: {e}"))?;
    let Some(info) = list.groups().iter().find(|g| g.name() == group) else {
        return Err(format!(
            "the broker did not describe group {group} (it answered with {} group(s))",
            list.groups().len()
        ));
    };
    let members = info
        .members()
        .iter()
        .map(|m| Member {
            member_id: m.id().to_string(),
            client_id: m.client_id().to_string(),
            host: m.client_host().to_string(),
            partitions: m
                .assignment()
                .and_then(|a| parse_assignment(a).ok())
                .unwrap_or_default(),
        })
        .collect();
    Ok(Group {
        state: info.state().to_string(),
        members,
    })
}

/// Decodes a ConsumerProtocolAssignment (versions 0 to 3 share the fields
/// read here): int16 version, then an array of (string topic, array of int32
/// partitions); the user data after it is ignored.
pub fn parse_assignment(bytes: &[u8]) -> Result<Vec<(String, i32)>, String> {
    let mut r = Reader { bytes, at: 0 };
    let _version = r.i16()?;
    let topics = r.count()?;
    let mut out = Vec::new();
    for _ in 0..topics {
        let len = r.i16()?;
        let name = r.take(usize::try_from(len).map_err(|_| "negative topic name length")?)?;
        let topic = String::from_utf8(name.to_vec()).map_err(|_| "topic name is not UTF-8")?;
        for _ in 0..r.count()? {
            out.push((topic.clone(), r.i32()?));
        }
    }
    Ok(out)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("assignment truncated at byte {}", self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn i16(&mut self) -> Result<i16, String> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// An array length; -1 (null) is empty. Bounded by the bytes left, so a
    /// corrupt length cannot make a huge loop.
    fn count(&mut self) -> Result<usize, String> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(0);
        }
        let n = n as usize;
        if n > self.bytes.len() - self.at {
            return Err(format!("array length {n} exceeds the assignment's size"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(topics: &[(&str, &[i32])]) -> Vec<u8> {
        let mut b = vec![0, 1]; // version 1
        b.extend((topics.len() as i32).to_be_bytes());
        for (t, ps) in topics {
            b.extend((t.len() as i16).to_be_bytes());
            b.extend(t.as_bytes());
            b.extend((ps.len() as i32).to_be_bytes());
            for p in *ps {
                b.extend(p.to_be_bytes());
            }
        }
        b.extend((-1i32).to_be_bytes()); // null user data
        b
    }

    #[test]
    fn decodes_an_assignment() {
        let bytes = encode(&[("events", &[0, 2]), ("clicks", &[1])]);
        assert_eq!(
            parse_assignment(&bytes).unwrap(),
            vec![
                ("events".to_string(), 0),
                ("events".to_string(), 2),
                ("clicks".to_string(), 1)
            ]
        );
        assert_eq!(parse_assignment(&encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn refuses_truncated_or_absurd_bytes() {
        let bytes = encode(&[("events", &[0, 2])]);
        for cut in 0..bytes.len() - 4 {
            assert!(parse_assignment(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A partition count far beyond the bytes left.
        let mut b = vec![0, 0, 0, 0, 0, 1, 0, 1, b'x'];
        b.extend(i32::MAX.to_be_bytes());
        assert!(parse_assignment(&b).unwrap_err().contains("exceeds"));
    }

    #[test]
    fn owners_name_client_and_host() {
        let g = Group {
            state: "Stable".into(),
            members: vec![Member {
                member_id: "chbridge-pod-0-1f2e".into(),
                client_id: "chbridge-pod-0".into(),
                host: "/10.0.0.7".into(),
                partitions: vec![("t".into(), 3)],
            }],
        };
        assert_eq!(
            g.owners().get(&("t".to_string(), 3)).map(String::as_str),
            Some("chbridge-pod-0 (10.0.0.7)")
        );
    }
}
