//! Shared pieces of Floodgate's benches, load generator and soak run: realistic sample
//! events, request bodies with fresh ids, a process's memory and CPU as Linux reports them,
//! a server's `/metrics`, and the load generator's open loop ([`open_loop`]).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

pub mod open_loop;

/// The HTTP/1 client the load generators share.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// `body` gzipped at the fast level, as producers on slow links send it.
pub fn gzip_fast(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut e, body).expect("writing to a Vec");
    e.finish().expect("writing to a Vec")
}

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

/// One valid event of every shipped type, as `(type, event)`, for per-type benches.
pub fn one_of_each_type() -> Vec<(&'static str, Value)> {
    let envelope = |id: &str, ty: &'static str, data: Value| {
        (
            ty,
            json!({"specversion":"1.0","id":id,"source":"https://shop.example.com/checkout",
                   "type":ty,"time":"2026-11-22T10:00:00.123Z","datacontenttype":"application/json",
                   "data":data}),
        )
    };
    vec![
        envelope(
            "c1",
            "inventory.event.created",
            json!({"eventId":"concert-1","name":"Show","venue":"Hall","startsAt":"2026-12-01T20:00:00Z","capacity":100}),
        ),
        envelope(
            "cc1",
            "inventory.capacity.changed",
            json!({"eventId":"concert-1","capacity":120}),
        ),
        ("booking.requested", sample_batch(1, 0).remove(0)),
        envelope(
            "x1",
            "booking.cancelled",
            json!({"bookingId":"bk-1","eventId":"concert-1"}),
        ),
        envelope(
            "ps1",
            "payment.succeeded",
            json!({"paymentId":"p1","bookingId":"bk-1","eventId":"concert-1","amountMinor":1500,"currency":"EUR"}),
        ),
        envelope(
            "pf1",
            "payment.failed",
            json!({"paymentId":"p2","bookingId":"bk-1","eventId":"concert-1","code":"card_declined"}),
        ),
        envelope(
            "ck1",
            "checkin.scanned",
            json!({"bookingId":"bk-1","eventId":"concert-1","gate":"A","scannedAt":"2026-12-01T19:30:00Z"}),
        ),
    ]
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

/// CPU time (user + system) that process `pid` has used, in seconds, from
/// `/proc/<pid>/stat`; `None` where there is no such process (or no `/proc`). The fields
/// count in USER_HZ ticks, which Linux fixes at 100 a second for every user-space ABI.
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Fields 3 (state) onwards; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The sum over every series of `name` in a Prometheus text exposition, and their maximum.
pub fn prometheus_metric(text: &str, name: &str) -> Option<(f64, f64)> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let (sum, max) = found.unwrap_or((0.0, f64::MIN));
        found = Some((sum + v, f64::max(max, v)));
    }
    found
}

/// The server's `/metrics` (`base` is `http://host:port`), or nothing when it does not
/// answer.
pub async fn scrape_metrics(client: &HttpClient, base: &str, api_key: Option<&str>) -> String {
    let Ok(url) = format!("{base}/metrics").parse::<hyper::Uri>() else {
        return String::new();
    };
    let mut req = hyper::Request::get(url);
    if let Some(key) = api_key {
        req = req.header("x-api-key", key);
    }
    let Ok(req) = req.body(Full::new(Bytes::new())) else {
        return String::new();
    };
    match client.request(req).await {
        Ok(resp) => match resp.into_body().collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(_) => String::new(),
        },
        Err(_) => String::new(),
    }
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
        // Burn a little CPU so that the count is above zero whatever the tick.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(proc_cpu_seconds(std::process::id()).unwrap() > 0.0);
        assert_eq!(proc_cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn prometheus_metrics_sum_their_series() {
        let text = "# TYPE x gauge\nfloodgate_lake_buffered_bytes{consumer=\"lake\"} 10\nfloodgate_lake_buffered_bytes{consumer=\"lake-derived\"} 5\nfloodgate_lake_buffered_bytes_other 99\nprocess_cpu_seconds_total 12.5\n";
        assert_eq!(
            prometheus_metric(text, "floodgate_lake_buffered_bytes"),
            Some((15.0, 10.0))
        );
        assert_eq!(
            prometheus_metric(text, "process_cpu_seconds_total"),
            Some((12.5, 12.5))
        );
        assert_eq!(prometheus_metric(text, "nothing"), None);
    }
}
