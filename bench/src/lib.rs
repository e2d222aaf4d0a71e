//! Shared pieces of Floodgate's benches, load generator and soak run: realistic sample
//! events, request bodies with fresh ids, and a process's memory as Linux reports it.

use serde_json::{Value, json};

/// `n` valid `booking.requested` events of about 440 bytes each, spread over 1,000
/// eventIds; `salt` makes ids differ between batches.
pub fn sample_batch(n: usize, salt: u64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let k = salt.wrapping_mul(1_000_003).wrapping_add(i as u64);
            json!({
                "specversion": "1.0",
                "id": format!("evt-{salt}-{i}-5f0c6e2b-9a4d-4c1e-8b7a-{k:012}"),
                "source": "https://shop.example.com/checkout",
                "type": "booking.requested",
                "time": "2026-11-22T10:00:00.123Z",
                "datacontenttype": "application/json",
                "subject": format!("customer/{}", k % 50_000),
                "data": {
                    "bookingId": format!("bk-{salt}-{i}-{k:010}"),
                    "eventId": format!("concert-{}", k % 1000),
                    "customerId": format!("cust-{:08}", k % 50_000),
                    "seats": 1 + (k % 4),
                    "requestedAt": "2026-11-22T09:59:59.874Z"
                }
            })
        })
        .collect()
}

/// A request body whose event ids can be made unique per request cheaply: the ids hold a
/// 12-digit field that [`UniqueBodies::next`] overwrites in place, so every request carries
/// fresh (source, id) pairs and the edge's dedupe never short-cuts the work.
#[derive(Debug, Clone)]
pub struct UniqueBodies {
    template: Vec<u8>,
    offsets: Vec<usize>,
    counter: u64,
}

const MARK: &[u8] = b"@@@@@@@@@@@@";

impl UniqueBodies {
    /// A template of `n` events; `start` seeds the counter (use distinct seeds per worker).
    pub fn new(n: usize, start: u64) -> Self {
        let mut events = sample_batch(n, 0);
        for (i, e) in events.iter_mut().enumerate() {
            e["id"] = json!(format!(
                "evt-{i}-{}",
                std::str::from_utf8(MARK).expect("ascii")
            ));
        }
        let template = serde_json::to_vec(&events).expect("serializable");
        let offsets = template
            .windows(MARK.len())
            .enumerate()
            .filter(|(_, w)| *w == MARK)
            .map(|(i, _)| i)
            .collect();
        Self {
            template,
            offsets,
            counter: start,
        }
    }

    /// The next body, with ids no earlier body of this generator used.
    pub fn next_body(&mut self) -> Vec<u8> {
        self.counter += 1;
        let digits = format!("{:012}", self.counter % 1_000_000_000_000);
        let mut body = self.template.clone();
        for &o in &self.offsets {
            body[o..o + MARK.len()].copy_from_slice(digits.as_bytes());
        }
        body
    }
}

/// A field of `/proc/<pid>/status` given in kB (`VmRSS`, `VmHWM`), in bytes; `None` where
/// there is no such process or field (or no `/proc`).
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Bodies of `booking.requested` events for a soak run: every event carries a fresh `id`
/// and a fresh `bookingId` (so the state store grows as it would in production, one booking
/// per request), and books one seat of one of a few events, round robin by position.
#[derive(Debug, Clone)]
pub struct BookingBodies {
    template: Vec<u8>,
    offsets: Vec<usize>,
    counter: u64,
}

impl BookingBodies {
    /// A template of `n` events over `event_ids`; `start` seeds the counter.
    pub fn new(n: usize, event_ids: &[String], start: u64) -> Self {
        let mark = std::str::from_utf8(MARK).expect("ascii");
        let mut events = sample_batch(n, 0);
        for (i, e) in events.iter_mut().enumerate() {
            e["id"] = json!(format!("soak-{i}-{mark}"));
            e["data"]["bookingId"] = json!(format!("sk-{i}-{mark}"));
            e["data"]["seats"] = json!(1);
            if !event_ids.is_empty() {
                e["data"]["eventId"] = json!(event_ids[i % event_ids.len()]);
            }
        }
        let template = serde_json::to_vec(&events).expect("serializable");
        let offsets = template
            .windows(MARK.len())
            .enumerate()
            .filter(|(_, w)| *w == MARK)
            .map(|(i, _)| i)
            .collect();
        Self {
            template,
            offsets,
            counter: start,
        }
    }

    /// The next body, with ids no earlier body of this generator used.
    pub fn next_body(&mut self) -> Vec<u8> {
        self.counter += 1;
        let digits = format!("{:012}", self.counter % 1_000_000_000_000);
        let mut body = self.template.clone();
        for &o in &self.offsets {
            body[o..o + MARK.len()].copy_from_slice(digits.as_bytes());
        }
        body
    }
}

/// `inventory.event.created` events putting each of `event_ids` on sale with `capacity`
/// seats.
pub fn inventory_batch(event_ids: &[String], capacity: u64) -> Vec<Value> {
    event_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({
                "specversion": "1.0",
                "id": format!("inv-{id}-{i}"),
                "source": "https://ops.example.com/soak",
                "type": "inventory.event.created",
                "time": "2026-11-22T09:00:00Z",
                "datacontenttype": "application/json",
                "data": {
                    "eventId": id,
                    "name": format!("Soak {id}"),
                    "venue": "Loopback Arena",
                    "startsAt": "2027-06-01T19:30:00Z",
                    "capacity": capacity
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booking_bodies_are_fresh_and_spread_over_the_events() {
        let ids: Vec<String> = (0..3).map(|i| format!("E{i}")).collect();
        let mut bodies = BookingBodies::new(6, &ids, 0);
        let a: Vec<Value> = serde_json::from_slice(&bodies.next_body()).unwrap();
        let b: Vec<Value> = serde_json::from_slice(&bodies.next_body()).unwrap();
        assert_eq!(a.len(), 6);
        let mut seen = std::collections::HashSet::new();
        for e in a.iter().chain(&b) {
            assert!(seen.insert(e["id"].as_str().unwrap().to_owned()));
            assert!(seen.insert(e["data"]["bookingId"].as_str().unwrap().to_owned()));
        }
        let events: Vec<&str> = a
            .iter()
            .map(|e| e["data"]["eventId"].as_str().unwrap())
            .collect();
        assert_eq!(events, ["E0", "E1", "E2", "E0", "E1", "E2"]);
        assert_eq!(inventory_batch(&ids, 10)[2]["data"]["eventId"], "E2");
    }

    #[test]
    fn proc_status_reads_this_process() {
        let rss = proc_status_bytes(std::process::id(), "VmRSS").unwrap();
        assert!(rss > 0);
        assert_eq!(proc_status_bytes(std::process::id(), "NoSuchField"), None);
    }
}
