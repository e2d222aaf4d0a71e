//! The KPL aggregated-record format: many user records (events) in one Kinesis record, as
//! the Kinesis Producer Library writes it and the KCL and the `aws-kinesis-agg` libraries
//! read it.
//!
//! A record is aggregated when its data is the magic [`MAGIC`], then an `AggregatedRecord`
//! protobuf (a table of partition keys, a table of explicit hash keys, and the user
//! records, each naming its key by index), then the MD5 digest of the protobuf bytes.
//! Anything else, including a record with the magic whose digest or protobuf does not
//! check out, is a plain record of one event: that is what KPL/KCL do, so a producer that
//! does not aggregate and one that does can share a stream.
//!
//! [`Aggregator`] packs events and knows, before adding one, exactly how many bytes the
//! encoded record would take, so the producer never builds a record over the 1 MiB limit
//! ([`crate::kinesis::MAX_RECORD_BYTES`], which counts the record's partition key too).
//! [`deaggregate`] turns a record's data back into its events; an event's subsequence
//! number is its index in the aggregate.

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::Message as _;
use prost::encoding::encoded_len_varint;

/// The first bytes of an aggregated record's data.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// The MD5 digest that ends an aggregated record's data.
pub const DIGEST_BYTES: usize = 16;

/// The `AggregatedRecord` message of KPL's `messages.proto` (proto2).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<AggregatedUserRecord>,
}

/// `Record` of `messages.proto`: one user record inside an [`AggregatedRecord`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedUserRecord {
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "bytes", required, tag = "3")]
    pub data: Bytes,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

/// `Tag` of `messages.proto`. KPL never writes tags; they are decoded and ignored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// The bytes a length-delimited field with a one-byte tag takes for a `len`-byte value.
fn delimited_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// The protobuf bytes of one user record naming partition key `index` and `data_len`
/// bytes of data (the field's body, without its own tag and length).
fn user_record_len(index: u64, data_len: usize) -> usize {
    1 + encoded_len_varint(index) + delimited_len(data_len)
}

/// Packs events into one aggregated record, tracking its encoded size exactly.
///
/// Each distinct partition key is stored once, in the key table; an event costs its data
/// plus a few bytes of framing. The record's own partition key (the one Kinesis hashes,
/// unless an explicit hash key is given) is the first event's, as KPL does.
#[derive(Debug, Default, Clone)]
pub struct Aggregator {
    message: AggregatedRecord,
    key_index: std::collections::HashMap<String, u64>,
    /// The protobuf's encoded length.
    proto_len: usize,
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Events added so far.
    pub fn len(&self) -> usize {
        self.message.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.message.records.is_empty()
    }

    /// The partition key the Kinesis record carries: the first event's.
    pub fn partition_key(&self) -> Option<&str> {
        self.message.partition_key_table.first().map(String::as_str)
    }

    /// The bytes of the record's data as [`Aggregator::finish`] would encode it now.
    pub fn data_len(&self) -> usize {
        MAGIC.len() + self.proto_len + DIGEST_BYTES
    }

    /// What the Kinesis record would count against the record limit (its data and its
    /// partition key) once the event (`key`, `data_len` bytes of data) is added.
    pub fn record_len_with(&self, key: &str, data_len: usize) -> usize {
        let (index, key_cost) = match self.key_index.get(key) {
            Some(&i) => (i, 0),
            None => (self.key_index.len() as u64, delimited_len(key.len())),
        };
        let outer_key = self.partition_key().map_or(key.len(), str::len);
        MAGIC.len()
            + self.proto_len
            + key_cost
            + delimited_len(user_record_len(index, data_len))
            + DIGEST_BYTES
            + outer_key
    }

    /// Adds an event. The caller checks the size first with [`Aggregator::record_len_with`].
    pub fn add(&mut self, key: &str, data: Bytes) {
        let index = match self.key_index.get(key) {
            Some(&i) => i,
            None => {
                let i = self.message.partition_key_table.len() as u64;
                self.message.partition_key_table.push(key.to_owned());
                self.key_index.insert(key.to_owned(), i);
                self.proto_len += delimited_len(key.len());
                i
            }
        };
        self.proto_len += delimited_len(user_record_len(index, data.len()));
        self.message.records.push(AggregatedUserRecord {
            partition_key_index: index,
            explicit_hash_key_index: None,
            data,
            tags: Vec::new(),
        });
    }

    /// The record's data: magic, protobuf, MD5 of the protobuf.
    pub fn finish(self) -> Bytes {
        let mut out = Vec::with_capacity(self.data_len());
        out.extend_from_slice(&MAGIC);
        self.message
            .encode(&mut out)
            .expect("a Vec grows to take any message");
        let digest = Md5::digest(&out[MAGIC.len()..]);
        out.extend_from_slice(&digest);
        Bytes::from(out)
    }
}

/// One event out of an aggregated record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub partition_key: String,
    /// The event's own explicit hash key, when the producer gave one (Floodgate does not).
    pub explicit_hash_key: Option<String>,
    pub data: Bytes,
    /// Its index in the aggregate: the subsequence number.
    pub subsequence: u64,
}

/// The events of an aggregated record's `data`, in order; `None` when `data` is not a
/// well-formed aggregate (no magic, a digest that does not match, a protobuf that does
/// not decode, or a key index out of its table), in which case the record is one plain
/// event.
pub fn deaggregate(data: &Bytes) -> Option<Vec<UserRecord>> {
    if data.len() < MAGIC.len() + DIGEST_BYTES || data[..MAGIC.len()] != MAGIC {
        return None;
    }
    let proto = data.slice(MAGIC.len()..data.len() - DIGEST_BYTES);
    let digest = &data[data.len() - DIGEST_BYTES..];
    if Md5::digest(&proto)[..] != *digest {
        return None;
    }
    let message = AggregatedRecord::decode(proto).ok()?;
    let AggregatedRecord {
        partition_key_table: keys,
        explicit_hash_key_table: hash_keys,
        records,
    } = message;
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let partition_key = keys.get(usize::try_from(r.partition_key_index).ok()?)?;
            let explicit_hash_key = match r.explicit_hash_key_index {
                Some(h) => Some(hash_keys.get(usize::try_from(h).ok()?)?.clone()),
                None => None,
            };
            Some(UserRecord {
                partition_key: partition_key.clone(),
                explicit_hash_key,
                data: r.data,
                subsequence: i as u64,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn aggregate(events: &[(String, Vec<u8>)]) -> (Aggregator, Bytes) {
        let mut agg = Aggregator::new();
        for (k, d) in events {
            agg.add(k, Bytes::from(d.clone()));
        }
        let bytes = agg.clone().finish();
        (agg, bytes)
    }

    #[test]
    fn known_layout() {
        let (_, data) = aggregate(&[("a".into(), b"xy".to_vec())]);
        // magic | table: "a" | record { pk 0, data "xy" } | md5
        let proto = [0x0a, 1, b'a', 0x1a, 6, 0x08, 0, 0x1a, 2, b'x', b'y'];
        assert_eq!(&data[..4], &MAGIC);
        assert_eq!(&data[4..data.len() - 16], &proto);
        assert_eq!(&data[data.len() - 16..], &Md5::digest(proto)[..]);
        let events = deaggregate(&data).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].partition_key, "a");
        assert_eq!(&events[0].data[..], b"xy");
    }

    #[test]
    fn not_an_aggregate_is_plain() {
        assert_eq!(deaggregate(&Bytes::from_static(br#"{"a":1}"#)), None);
        assert_eq!(deaggregate(&Bytes::from_static(&MAGIC)), None);
        let (_, data) = aggregate(&[("k".into(), b"v".to_vec())]);
        let mut bad = data.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(deaggregate(&Bytes::from(bad)), None, "a bad digest");
        let mut bad = data.to_vec();
        bad[6] ^= 0x40;
        assert_eq!(deaggregate(&Bytes::from(bad)), None, "a changed body");
        // A well-formed digest over a protobuf naming a key that is not in the table.
        let mut proto = Vec::new();
        AggregatedRecord {
            partition_key_table: vec![],
            explicit_hash_key_table: vec![],
            records: vec![AggregatedUserRecord {
                partition_key_index: 3,
                explicit_hash_key_index: None,
                data: Bytes::new(),
                tags: vec![],
            }],
        }
        .encode(&mut proto)
        .unwrap();
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(&proto);
        data.extend_from_slice(&Md5::digest(&proto));
        assert_eq!(
            deaggregate(&Bytes::from(data)),
            None,
            "an index out of range"
        );
    }

    proptest! {
        /// Events come back in order with their keys and subsequence numbers, and the size
        /// the aggregator predicts before each add is the size of the record it builds.
        #[test]
        fn round_trip_and_exact_sizes(
            events in proptest::collection::vec(
                ("[a-z]{1,3}|.{0,20}", proptest::collection::vec(any::<u8>(), 0..300)),
                1..60,
            ),
        ) {
            let mut agg = Aggregator::new();
            for (k, d) in &events {
                let predicted = agg.record_len_with(k, d.len());
                agg.add(k, Bytes::from(d.clone()));
                let outer = agg.partition_key().unwrap().len();
                prop_assert_eq!(predicted, agg.clone().finish().len() + outer);
                prop_assert_eq!(agg.data_len(), agg.clone().finish().len());
            }
            let data = agg.finish();
            let back = deaggregate(&data).expect("an aggregate");
            prop_assert_eq!(back.len(), events.len());
            for (i, (r, (k, d))) in back.iter().zip(&events).enumerate() {
                prop_assert_eq!(&r.partition_key, k);
                prop_assert_eq!(&r.data[..], &d[..]);
                prop_assert_eq!(r.subsequence, i as u64);
                prop_assert_eq!(&r.explicit_hash_key, &None);
            }
        }

        /// Arbitrary bytes never panic the decoder; what does not start with the magic is
        /// always plain.
        #[test]
        fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let plain = !data.starts_with(&MAGIC);
            let got = deaggregate(&Bytes::from(data));
            if plain {
                prop_assert_eq!(got, None);
            }
        }
    }
}
