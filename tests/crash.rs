//! Crash safety: SIGKILL a `floodgate serve` while several clients post continuously,
//! five times over the same data directory. Every event answered "accepted" must be in
//! the log exactly once afterwards, and the server must accept again after each restart.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::{Posters, Server, booking, stream_read, wait_for};

const ROUNDS: usize = 5;
const CLIENTS: usize = 4;

#[test]
fn sigkill_under_load_loses_no_acked_event() {
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    for round in 0..ROUNDS {
        let mut server = Server::start(dir.path(), &[]);
        // The server accepts again after the previous crash.
        let probe = server.post_batch(&[booking(&format!("probe-{round}"), "bp", "PROBE", 1)]);
        assert_eq!(
            probe.status,
            200,
            "round {round}: {}",
            String::from_utf8_lossy(&probe.body)
        );
        acked.lock().unwrap().push(format!("probe-{round}"));

        let posters = Posters::start(server.addr, CLIENTS, acked.clone(), move |c, n| {
            (0..25)
                .map(|i| {
                    let id = format!("r{round}-c{c}-{n}-{i}");
                    booking(
                        &id,
                        &format!("bk-{id}"),
                        &format!("E{}", (c * 7 + i) % 13),
                        1,
                    )
                })
                .collect()
        });
        // Let load build, then kill without warning, at a later point each round.
        let before = posters.acked();
        let target = before + 1500 * (round + 1);
        wait_for(60, "load to build", || {
            (posters.acked() >= target).then_some(())
        });
        server.kill9();
        posters.stop();
    }
    let server = Server::start(dir.path(), &[]);
    assert_eq!(
        server
            .post_batch(&[booking("final", "bf", "FINAL", 1)])
            .status,
        200
    );
    drop(server);

    let records = stream_read(dir.path(), &[]);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *seen
            .entry(r["event"]["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let acked = acked.lock().unwrap();
    assert!(
        acked.len() > ROUNDS * 100,
        "too little load to prove anything: {}",
        acked.len()
    );
    for id in acked.iter() {
        assert_eq!(
            seen.get(id).copied().unwrap_or(0),
            1,
            "acked event {id} is in the log {:?} times",
            seen.get(id)
        );
    }
    // Nothing is in the log twice, acked or not.
    assert!(seen.values().all(|&n| n == 1));
    eprintln!(
        "{} acked events across {ROUNDS} SIGKILLs, {} records in the log",
        acked.len(),
        records.len()
    );
}
