//! The bookings processors on the real binary: an on-sale rush never oversells and
//! decides each booking once, also across a SIGKILL; a hot key is applied with far fewer
//! inventory writes than requests.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::{Server, booking, envelope, metric, outbox_read, try_request, wait_for};
use serde_json::{Value, json};

const CAPACITY: i64 = 100;

fn create_event(server: &Server, event_id: &str, capacity: i64) {
    let r = server.post_batch(&[envelope(
        &format!("create-{event_id}"),
        "inventory.event.created",
        json!({"eventId": event_id, "name": "Rush", "venue": "Arena", "startsAt": "2026-12-01T20:00:00Z", "capacity": capacity}),
    )]);
    assert_eq!(r.status, 200);
    wait_for(30, "the inventory to exist", || {
        (server.get(&format!("/v1/inventory/{event_id}")).status == 200).then_some(())
    });
}

/// The 1,000 requests of the rush: seats 1–4, every tenth repeating an earlier bookingId.
fn rush_requests(event_id: &str) -> Vec<Value> {
    (0..1000)
        .map(|i| {
            let booking_id = if i % 10 == 9 {
                format!("bk-{}", i - 7)
            } else {
                format!("bk-{i}")
            };
            booking(
                &format!("req-{i}"),
                &booking_id,
                event_id,
                1 + (i * 7 % 4) as i64,
            )
        })
        .collect()
}

/// 50 clients send the requests one event per request; returns the acked bookingIds.
fn rush(addr: SocketAddr, requests: Vec<Value>) -> HashSet<String> {
    let queue = Arc::new(Mutex::new(requests));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let (queue, acked) = (queue.clone(), acked.clone());
            std::thread::spawn(move || {
                loop {
                    let Some(event) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let body = serde_json::to_vec(&event).unwrap();
                    let Ok(resp) = try_request(
                        addr,
                        "POST",
                        "/v1/events",
                        &[("content-type", "application/cloudevents+json")],
                        Some(&body),
                    ) else {
                        break; // the server is gone
                    };
                    if resp.status == 200 {
                        acked
                            .lock()
                            .unwrap()
                            .insert(event["data"]["bookingId"].as_str().unwrap().to_owned());
                    }
                }
            })
        })
        .collect();
    for c in clients {
        let _ = c.join();
    }
    Arc::try_unwrap(acked).unwrap().into_inner().unwrap()
}

/// Waits until every booking in `ids` has a status; returns them by id.
fn statuses(server: &Server, ids: &HashSet<String>) -> HashMap<String, Value> {
    common::bookings_decided(server, ids, 120)
}

/// The checks shared by the rush and the crash: nothing oversold, reserved equals the
/// confirmed seats, each decision once, rejections only for lack of seats, sold-out once.
fn check_outcome(server: &Server, event_id: &str, acked: &HashSet<String>) {
    let bookings = statuses(server, acked);
    let inventory = server.get(&format!("/v1/inventory/{event_id}")).json();
    let reserved = inventory["reserved"].as_i64().unwrap();
    assert_eq!(inventory["capacity"], CAPACITY);
    assert!(reserved <= CAPACITY, "oversold: {inventory}");
    assert_eq!(
        inventory["remaining"].as_i64().unwrap(),
        CAPACITY - reserved
    );

    // The relay publishes shortly after the state commits: wait until every acked
    // booking's decision is out.
    let outbox = wait_for(60, "the outbox to hold every acked decision", || {
        let outbox = outbox_read(&server.data_dir);
        let decided: HashSet<&str> = outbox
            .iter()
            .filter(|e| {
                matches!(
                    e["type"].as_str(),
                    Some("booking.confirmed" | "booking.rejected")
                )
            })
            .filter_map(|e| e["data"]["bookingId"].as_str())
            .collect();
        acked
            .iter()
            .all(|id| decided.contains(id.as_str()))
            .then_some(outbox)
    });
    let mut decisions: HashMap<String, Vec<&Value>> = HashMap::new();
    let mut sold_out = 0;
    let mut ids = HashSet::new();
    for e in &outbox {
        assert!(
            ids.insert(e["id"].as_str().unwrap().to_owned()),
            "derived event published twice: {e}"
        );
        assert_eq!(e["source"], "floodgate");
        match e["type"].as_str().unwrap() {
            "booking.confirmed" | "booking.rejected" => {
                decisions
                    .entry(e["data"]["bookingId"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(e);
            }
            "capacity.sold_out" => sold_out += 1,
            _ => {}
        }
    }
    for (id, d) in &decisions {
        assert_eq!(d.len(), 1, "booking {id} decided {} times", d.len());
    }
    // Every booking with a state (acked or not) was announced once, and vice versa.
    for id in acked {
        assert!(
            decisions.contains_key(id),
            "acked booking {id} has no decision in the outbox"
        );
    }
    let mut confirmed_seats = 0;
    for (id, d) in &decisions {
        let e = d[0];
        let state = server.get(&format!("/v1/bookings/{id}")).json();
        match e["type"].as_str().unwrap() {
            "booking.confirmed" => {
                assert_eq!(state["status"], "confirmed", "{state}");
                confirmed_seats += state["seats"].as_i64().unwrap();
            }
            _ => {
                assert_eq!(state["status"], "rejected");
                assert_eq!(e["data"]["reason"], "insufficient_capacity", "{e}");
                assert!(
                    e["data"]["seats"].as_i64().unwrap() > e["data"]["remaining"].as_i64().unwrap(),
                    "rejected although seats remained: {e}"
                );
            }
        }
    }
    assert_eq!(
        confirmed_seats, reserved,
        "reserved differs from confirmed seats"
    );
    assert!(confirmed_seats <= CAPACITY);
    let expected_sold_out = if reserved == CAPACITY { 1 } else { 0 };
    assert_eq!(
        sold_out, expected_sold_out,
        "capacity.sold_out count (reserved {reserved})"
    );
    for b in bookings.values() {
        assert!(
            matches!(b["status"].as_str(), Some("confirmed" | "rejected")),
            "{b}"
        );
    }
}

#[test]
fn on_sale_rush_never_oversells_and_decides_each_booking_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    create_event(&server, "RUSH", CAPACITY);
    let acked = rush(server.addr, rush_requests("RUSH"));
    // 1,000 requests, every tenth repeating an earlier bookingId: 900 distinct bookings.
    assert_eq!(acked.len(), 900, "every distinct booking is acked");
    check_outcome(&server, "RUSH", &acked);
    // The unknown event and the duplicate rules.
    let r = server.post_batch(&[
        booking("u1", "bk-unknown", "NO-SUCH-EVENT", 1),
        booking("u2", "bk-0", "RUSH", 1),
    ]);
    assert_eq!(r.status, 200);
    let b = wait_for(30, "the unknown-event booking", || {
        let r = server.get("/v1/bookings/bk-unknown");
        (r.status == 200).then(|| r.json())
    });
    assert_eq!(b["status"], "rejected");
    assert_eq!(b["reason"], "unknown_event");
    let r = server.get("/v1/bookings/nope");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "booking_not_found");
    assert_eq!(server.get("/v1/inventory/nope").status, 404);
}

#[test]
fn sigkill_during_the_rush_decides_each_acked_booking_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    create_event(&server, "CRASH", CAPACITY);
    let addr = server.addr;
    let requests = rush_requests("CRASH");
    let rush_thread = std::thread::spawn(move || rush(addr, requests));
    // Kill once a good part of the rush is in.
    wait_for(60, "part of the rush to land", || {
        (metric(
            &server,
            "floodgate_ingest_events_total",
            &["outcome=\"accepted\""],
        ) >= 300.0)
            .then_some(())
    });
    server.kill9();
    let acked = rush_thread.join().unwrap();
    assert!(
        acked.len() >= 250,
        "only {} acked before the kill",
        acked.len()
    );
    let server = Server::start(dir.path(), &[]);
    check_outcome(&server, "CRASH", &acked);
}

#[test]
fn a_hot_key_is_applied_with_far_fewer_inventory_writes_than_requests() {
    const REQUESTS: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    create_event(&server, "HOT", 1_000_000);
    let before = metric(&server, "floodgate_processor_inventory_writes_total", &[]);
    let addr = server.addr;
    let senders: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for b in 0..REQUESTS / 4 / 500 {
                    let events: Vec<Value> = (0..500)
                        .map(|i| {
                            let n = t * 1_000_000 + b * 500 + i;
                            booking(
                                &format!("h{n}"),
                                &format!("hb{n}"),
                                "HOT",
                                1 + (n % 4) as i64,
                            )
                        })
                        .collect();
                    let body = serde_json::to_vec(&events).unwrap();
                    let r = common::post(
                        addr,
                        "/v1/events",
                        Some("application/cloudevents-batch+json"),
                        &body,
                        &[],
                    );
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let applied = wait_for(180, "the hot key's requests to be applied", || {
        let n = metric(&server, "floodgate_processor_events_applied_total", &[]);
        (n >= (REQUESTS + 1) as f64).then_some(n)
    });
    let writes = metric(&server, "floodgate_processor_inventory_writes_total", &[]) - before;
    eprintln!("hot key: {applied} events applied with {writes} inventory writes");
    assert!(writes > 0.0);
    assert!(
        writes * 20.0 < REQUESTS as f64,
        "{writes} inventory writes for {REQUESTS} requests"
    );
    let inv = server.get("/v1/inventory/HOT").json();
    let expected: i64 = (0..4usize)
        .flat_map(|t| (0..REQUESTS / 4).map(move |k| 1 + ((t * 1_000_000 + k) % 4) as i64))
        .sum();
    assert_eq!(inv["reserved"].as_i64().unwrap(), expected);
}

#[test]
fn ingest_and_process_run_apart_and_a_second_processor_takes_over() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let start_processor = || {
        let mut child = Command::new(common::BIN)
            .args(["process", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("FLOODGATE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("processing"), "{line}");
        child
    };
    // The edge alone: `ingest` is `serve` without the processors.
    let mut ingest = Command::new(common::BIN)
        .args(["ingest", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("FLOODGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(ingest.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .rsplit("http://")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let server = Server {
        child: ingest,
        addr,
        data_dir: dir.path().to_owned(),
    };

    let mut first = start_processor();
    let second_waiting = start_processor(); // holds no lease while the first lives
    create_event(&server, "SPLIT", 10);
    let r = server.post_batch(&[booking("s1", "bk-s1", "SPLIT", 3)]);
    assert_eq!(r.status, 200);
    wait_for(30, "the first processor to apply", || {
        (server.get("/v1/bookings/bk-s1").status == 200).then_some(())
    });
    // The first processor dies; the waiting one takes its leases and carries on.
    let _ = first.kill();
    let _ = first.wait();
    let r = server.post_batch(&[booking("s2", "bk-s2", "SPLIT", 4)]);
    assert_eq!(r.status, 200);
    let b = wait_for(30, "the second processor to take over", || {
        let r = server.get("/v1/bookings/bk-s2");
        (r.status == 200).then(|| r.json())
    });
    assert_eq!(b["status"], "confirmed");
    assert_eq!(server.get("/v1/inventory/SPLIT").json()["reserved"], 7);
    let mut second = second_waiting;
    let _ = second.kill();
    let _ = second.wait();
}

/// JSON Schema integers in any spelling (`100.0`, `2.0`, `1e0`) are accepted by the edge,
/// so the bookings processor must apply them: the inventory exists and the bookings are
/// confirmed with the seats they asked for.
#[test]
fn integers_written_as_2_0_or_1e0_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let body = br#"[
      {"specversion":"1.0","id":"c","source":"/t","type":"inventory.event.created","data":{"eventId":"ev-float","name":"n","venue":"v","startsAt":"2026-12-01T20:00:00Z","capacity":100.0}},
      {"specversion":"1.0","id":"r1","source":"/t","type":"booking.requested","data":{"bookingId":"bf-1","eventId":"ev-float","customerId":"c","seats":2.0,"requestedAt":"2026-11-22T10:00:00Z"}},
      {"specversion":"1.0","id":"r2","source":"/t","type":"booking.requested","data":{"bookingId":"bf-2","eventId":"ev-float","customerId":"c","seats":1e0,"requestedAt":"2026-11-22T10:00:00Z"}}
    ]"#;
    let r = server.post(Some("application/cloudevents-batch+json"), body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let ids: HashSet<String> = ["bf-1", "bf-2"].iter().map(|s| s.to_string()).collect();
    let got = statuses(&server, &ids);
    assert_eq!(got["bf-1"]["status"], "confirmed");
    assert_eq!(got["bf-1"]["seats"], 2);
    assert_eq!(got["bf-2"]["seats"], 1);
    let inv = server.get("/v1/inventory/ev-float").json();
    assert_eq!(
        (inv["capacity"].clone(), inv["reserved"].clone()),
        (json!(100), json!(3))
    );
    server.terminate();
}

/// Two events on different shards each request the same bookingIds at the same moment.
/// A bookingId is global: exactly one request per id is decided (confirmed), the other is
/// rejected `duplicate_booking_id`, and every event's `reserved` is the seats of the
/// confirmed bookings that are its own.
#[test]
fn a_booking_id_requested_on_two_shards_is_confirmed_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--shards", "4"]);
    // Two event ids on different shards.
    let a = "dup-a".to_owned();
    let b = (0..)
        .map(|i| format!("dup-b{i}"))
        .find(|b| {
            floodgate_core::partition::shard_for_key(b, 4)
                != floodgate_core::partition::shard_for_key(&a, 4)
        })
        .unwrap();
    create_event(&server, &a, 100_000);
    create_event(&server, &b, 100_000);
    // Each request carries both requests of 250 ids, so that both shards read and decide
    // them at the same moment.
    let n = 1000;
    for round in 0..n / 250 {
        let mut events = Vec::new();
        for i in round * 250..(round + 1) * 250 {
            events.push(booking(&format!("a-{i}"), &format!("shared-{i}"), &a, 1));
            events.push(booking(&format!("b-{i}"), &format!("shared-{i}"), &b, 2));
        }
        assert_eq!(server.post_batch(&events).status, 200);
    }
    let ids: HashSet<String> = (0..n).map(|i| format!("shared-{i}")).collect();
    let got = statuses(&server, &ids);
    let outbox = wait_for(60, "a decision for every request", || {
        let outbox = outbox_read(&server.data_dir);
        let decided = outbox
            .iter()
            .filter(|e| {
                matches!(
                    e["type"].as_str(),
                    Some("booking.confirmed" | "booking.rejected")
                ) && e["data"]["bookingId"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("shared-"))
            })
            .count();
        (decided >= 2 * n).then_some(outbox)
    });
    let mut confirmed: HashMap<String, usize> = HashMap::new();
    let mut duplicates = 0;
    for e in &outbox {
        let Some(id) = e["data"]["bookingId"].as_str() else {
            continue;
        };
        match e["type"].as_str() {
            Some("booking.confirmed") => *confirmed.entry(id.to_owned()).or_default() += 1,
            Some("booking.rejected") if e["data"]["reason"] == "duplicate_booking_id" => {
                duplicates += 1
            }
            _ => {}
        }
    }
    assert_eq!(confirmed.len(), n, "every shared id confirmed once");
    let twice: Vec<_> = confirmed.iter().filter(|(_, c)| **c != 1).take(5).collect();
    assert!(twice.is_empty(), "confirmed more than once: {twice:?}");
    assert_eq!(duplicates, n, "the other request of each id is refused");
    for (event, seats) in [(&a, 1), (&b, 2)] {
        let own: i64 = got
            .values()
            .filter(|v| v["eventId"] == **event && v["status"] == "confirmed")
            .map(|_| seats)
            .sum();
        let inv = server.get(&format!("/v1/inventory/{event}")).json();
        assert_eq!(
            inv["reserved"], own,
            "{event}: reserved vs its own bookings"
        );
    }
    server.terminate();
}
