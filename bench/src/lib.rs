//! Shared pieces of Floodgate's benches and load generator: realistic sample events.

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
