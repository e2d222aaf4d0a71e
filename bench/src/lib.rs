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
