//! Floodgate's sequence numbers on Kinesis: the Kinesis sequence number of the record
//! followed by the event's subsequence number within a KPL-aggregated record, as exactly
//! [`SUB_DIGITS`] decimal digits (0 for a record that is not aggregated).
//!
//! The composite stays a decimal string without leading zeros, so it orders as
//! [`SequenceNumber`] does (by length, then bytes), and that order is (Kinesis sequence,
//! subsequence): the suffix has a fixed width. A checkpoint inside an aggregated record
//! therefore resumes exactly after the event it names, neither skipping nor replaying the
//! rest of the record. In the lease table the two halves are stored apart, as KCL does
//! (`checkpoint`, `checkpointSubSequenceNumber`).

use floodgate_core::stream::SequenceNumber;

/// Digits of the subsequence suffix. A Kinesis record holds at most 1 MiB, and an
/// aggregated event costs at least 3 bytes of it, so fewer than 10^6 events fit.
pub const SUB_DIGITS: usize = 6;
/// The largest subsequence number the suffix can carry.
pub const MAX_SUB: u64 = 999_999;

/// The composite of a Kinesis sequence number and a subsequence number.
pub fn compose(kinesis: &str, sub: u64) -> Option<SequenceNumber> {
    if sub > MAX_SUB || kinesis.is_empty() || !kinesis.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(SequenceNumber::new(format!("{kinesis}{sub:06}")))
}

/// The Kinesis sequence number and subsequence number of a composite.
pub fn split(seq: &SequenceNumber) -> Option<(&str, u64)> {
    let s = seq.as_str();
    if s.len() <= SUB_DIGITS || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (kinesis, sub) = s.split_at(s.len() - SUB_DIGITS);
    Some((kinesis, sub.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &str = "49590338271490256608559692538361571095921575989136588898";

    #[test]
    fn composites_split_back() {
        let c = compose(A, 17).unwrap();
        assert_eq!(split(&c), Some((A, 17)));
        assert_eq!(compose(A, MAX_SUB + 1), None);
        assert_eq!(compose("12a", 0), None);
    }

    proptest! {
        /// Composites order exactly as (Kinesis sequence numerically, subsequence).
        #[test]
        fn composites_order_as_their_parts(
            a in "[1-9][0-9]{0,60}", b in "[1-9][0-9]{0,60}", x in 0..=MAX_SUB, y in 0..=MAX_SUB,
        ) {
            let parts = SequenceNumber::new(a.clone())
                .cmp(&SequenceNumber::new(b.clone()))
                .then(x.cmp(&y));
            prop_assert_eq!(compose(&a, x).unwrap().cmp(&compose(&b, y).unwrap()), parts);
        }
    }
}
