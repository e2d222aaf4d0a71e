//! RFC 3339 timestamps (`date-time`) and dates (`full-date`), parsed to the lake's
//! integers: microseconds and days since 1970-01-01 UTC. The one home for reading them, so
//! that every consumer reads every spelling the edge accepts.
//!
//! The grammar is RFC 3339 §5.6 in full:
//!
//! ```text
//! date-time   = full-date ("T" / "t" / " ") full-time
//! full-date   = 4DIGIT "-" 2DIGIT "-" 2DIGIT        ; 0000-01-01 … 9999-12-31, real days
//! full-time   = 2DIGIT ":" 2DIGIT ":" 2DIGIT ["." 1*DIGIT] ("Z" / "z" / ("+" / "-") 2DIGIT ":" 2DIGIT)
//! ```
//!
//! with hours 00–23, minutes 00–59, seconds 00–60, offsets up to ±23:59 (`-00:00`, "local
//! offset unknown", is UTC), and fractions of any length. The space separator is the one §5.6
//! NOTE allows; the JSON Schema `date-time` format (the `data` check) allows only `T`/`t`.
//! The edge's check of the CloudEvents `time` attribute is this parser itself
//! ([`crate::envelope::is_rfc3339`]).
//!
//! Two decisions a consumer must make the same way everywhere:
//! - **Leap seconds.** `:60` is accepted exactly where the edge's JSON Schema validator (the
//!   `jsonschema` crate) accepts it: when the time, brought to UTC, is 23:59, on any day
//!   (which days get a leap second is not known in advance). It reads as `:59.999999`, the
//!   last microsecond before the next minute, so it sorts after every other instant of that
//!   minute and before the next day; the fraction written after `:60` is ignored.
//! - **Precision.** Fractions are truncated to microseconds (the lake's timestamp unit),
//!   i.e. rounded towards the past, also before 1970.
//!
//! Pure: no I/O, no allocation, never panics on input.

const MICROS_PER_SECOND: i64 = 1_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// Microseconds since 1970-01-01T00:00:00Z of an RFC 3339 `date-time`, or `None` when `s`
/// is not one (see the module docs for leap seconds and precision).
pub fn date_time_micros(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        // `YYYY-MM-DDTHH:MM:SSZ` is the shortest.
        return None;
    }
    let days = i64::from(full_date_bytes(&b[..10])?);
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let hour = two_digits(&b[11..13])?;
    let minute = two_digits(&b[14..16])?;
    let second = two_digits(&b[17..19])?;
    if b[13] != b':' || b[16] != b':' || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        i += 1;
        let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        // The first six digits are the microseconds; the rest is truncated.
        let mut scale = 100_000;
        for &c in &b[i..i + digits.min(6)] {
            micros += i64::from(c - b'0') * scale;
            scale /= 10;
        }
        i += digits;
    }
    let offset_minutes: i64 = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let oh = two_digits(&[*h1, *h2])?;
            let om = two_digits(&[*m1, *m2])?;
            if oh > 23 || om > 59 {
                return None;
            }
            let minutes = i64::from(oh) * 60 + i64::from(om);
            if *sign == b'-' { -minutes } else { minutes }
        }
        _ => return None,
    };
    let local_minute = i64::from(hour) * 60 + i64::from(minute);
    let mut second = i64::from(second);
    if second == 60 {
        // Only at 23:59 UTC, as the edge's validator decides; read as :59.999999.
        if (local_minute - offset_minutes).rem_euclid(1440) != 1439 {
            return None;
        }
        second = 59;
        micros = MICROS_PER_SECOND - 1;
    }
    let seconds = days * SECONDS_PER_DAY + (local_minute - offset_minutes) * 60 + second;
    Some(seconds * MICROS_PER_SECOND + micros)
}

/// Days since 1970-01-01 of an RFC 3339 `full-date` (`YYYY-MM-DD`, years 0000–9999 of the
/// proleptic Gregorian calendar), or `None` when `s` is not one.
pub fn full_date_days(s: &str) -> Option<i32> {
    full_date_bytes(s.as_bytes())
}

fn full_date_bytes(b: &[u8]) -> Option<i32> {
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = i32::from(two_digits(&b[0..2])?) * 100 + i32::from(two_digits(&b[2..4])?);
    let month = two_digits(&b[5..7])?;
    let day = two_digits(&b[8..10])?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    Some(days_from_civil(year, month, day))
}

fn two_digits(b: &[u8]) -> Option<u8> {
    match b {
        [a @ b'0'..=b'9', c @ b'0'..=b'9'] => Some((a - b'0') * 10 + (c - b'0')),
        _ => None,
    }
}

fn is_leap_year(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap_year(year) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`), valid for every year this module reads.
fn days_from_civil(year: i32, month: u8, day: u8) -> i32 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i32::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i32::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DAY_US: i64 = SECONDS_PER_DAY * MICROS_PER_SECOND;

    fn by_time_crate(s: &str) -> Option<i64> {
        let t =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        i64::try_from(t.unix_timestamp_nanos().div_euclid(1000)).ok()
    }

    #[test]
    fn spellings() {
        let base = date_time_micros("2026-03-15T23:59:59Z").unwrap();
        assert_eq!(base, 1_773_619_199 * MICROS_PER_SECOND);
        for (s, want) in [
            ("2026-03-15t23:59:59z", base),
            ("2026-03-15 23:59:59Z", base),
            ("2026-03-15T23:59:59.5Z", base + 500_000),
            ("2026-03-15T23:59:59.123456789123456789Z", base + 123_456),
            ("2026-03-15T23:59:59-00:00", base),
            ("2026-03-15T23:59:59+00:00", base),
            ("2026-03-16T01:29:59+01:30", base),
            ("2026-03-15T22:59:59-01:00", base),
            // Leap seconds: at 23:59 UTC on any day, read as :59.999999.
            ("2026-03-15T23:59:60Z", base + 999_999),
            ("2026-03-15T23:59:60.5Z", base + 999_999),
            ("2026-03-16T08:59:60+09:00", base + 999_999),
            ("2026-03-15T18:59:60-05:00", base + 999_999),
        ] {
            assert_eq!(date_time_micros(s), Some(want), "{s}");
        }
        assert_eq!(date_time_micros("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(date_time_micros("1969-12-31T23:59:59.9999999Z"), Some(-1));
        assert_eq!(
            date_time_micros("0000-01-01T00:00:00Z"),
            Some(-719_528 * DAY_US)
        );
        assert_eq!(
            date_time_micros("0000-01-01T00:00:00+23:59"),
            Some(-719_528 * DAY_US - (23 * 60 + 59) * 60 * MICROS_PER_SECOND)
        );
        assert_eq!(
            date_time_micros("9999-12-31T23:59:59.999999-23:59"),
            Some((2_932_896 * SECONDS_PER_DAY + 86_399 + 86_340) * MICROS_PER_SECOND + 999_999)
        );
        assert_eq!(full_date_days("1970-01-01"), Some(0));
        assert_eq!(full_date_days("2000-02-29"), Some(11_016));
        assert_eq!(full_date_days("0000-02-29"), Some(-719_469));
        for bad in [
            "",
            "2026-03-15T23:59:59",
            "2026-03-15T23:59:60+01:00",
            "2026-03-15T23:58:60Z",
            "2026-03-15T24:00:00Z",
            "2026-03-15T23:60:00Z",
            "2026-03-15T23:59:61Z",
            "2026-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2026-01-00T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-03-15X23:59:59Z",
            "2026-03-15T23:59:59.Z",
            "2026-03-15T23:59:59+24:00",
            "2026-03-15T23:59:59+01:60",
            "2026-03-15T23:59:59+0100",
            "2026-03-15T23:59:59+01:00:00",
            "2026-03-15T23:59:59ZZ",
            "2026-03-15T23:59:59 Z",
            "+2026-03-15T23:59:59Z",
            "2026-3-15T23:59:59Z",
            "２026-03-15T23:59:59Z",
            "2026-03-15T23:59:59.１Z",
        ] {
            assert_eq!(date_time_micros(bad), None, "{bad:?}");
        }
    }

    /// Everything the edge's two checks accept, the lake reads, and to the same instant as
    /// the `time` crate where that one reads it: the JSON Schema validator with formats
    /// asserted (as the registry builds it) for `data`, and the `time` crate, which checked
    /// the CloudEvents `time` attribute before this module did. Over a grid of every
    /// component's edges.
    #[test]
    fn reads_whatever_the_edge_accepts() {
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .should_ignore_unknown_formats(false)
            .build(&json!({"type": "string", "format": "date-time"}))
            .unwrap();
        let dates = [
            "0000-01-01",
            "0000-02-29",
            "0001-12-31",
            "1899-12-31",
            "1900-02-28",
            "1900-02-29",
            "1969-12-31",
            "1970-01-01",
            "2000-02-29",
            "2026-02-28",
            "2026-02-29",
            "2026-03-15",
            "2026-06-30",
            "2026-06-31",
            "2026-12-31",
            "9999-12-31",
            "2026-13-01",
            "2026-00-10",
            "2026-01-32",
        ];
        let times = [
            "00:00:00", "23:59:59", "23:59:60", "00:59:60", "22:59:60", "12:30:60", "23:58:60",
            "24:00:00", "23:60:00", "10:00:61", "07:07:07",
        ];
        let fractions = ["", ".0", ".5", ".999999", ".1234567", ".000000001", "."];
        let offsets = [
            "Z", "z", "+00:00", "-00:00", "+01:00", "-01:00", "+23:59", "-23:59", "+05:30",
            "+24:00", "-00:60", "+0100", "",
        ];
        let separators = ["T", "t", " ", "_"];
        let (mut accepted, mut total) = (0, 0);
        for d in dates {
            for t in times {
                for f in fractions {
                    for o in offsets {
                        for sep in separators {
                            let s = format!("{d}{sep}{t}{f}{o}");
                            total += 1;
                            let ours = date_time_micros(&s);
                            if validator.is_valid(&json!(s)) {
                                accepted += 1;
                                assert!(ours.is_some(), "the validator accepts {s:?}");
                            } else if sep != " " {
                                // Not more lenient than the validator, except for the space.
                                assert!(ours.is_none(), "only the lake accepts {s:?}");
                            }
                            if let Some(theirs) = by_time_crate(&s) {
                                if sep == "_" {
                                    continue; // see the module docs: not RFC 3339
                                }
                                assert_eq!(ours, Some(theirs), "{s:?}");
                            }
                        }
                    }
                }
            }
        }
        assert!(accepted > 1000, "{accepted} of {total}");
    }
}
