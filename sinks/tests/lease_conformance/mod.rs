//! The conformance suite of the lease and checkpoint role ([`CheckpointStore`]), written
//! once and run against every backend.
//!
//! A test binary declares this module and hands the suite a [`LeaseFixture`]: a factory
//! of `n` stores over one fresh, empty backing, as `n` worker processes would each open
//! one (a directory for the embedded store, a table for DynamoDB).
//! `sinks/tests/lease_conformance.rs` runs it over the embedded store
//! (`floodgate_sinks::EmbeddedCheckpoints`), and
//! `aws/tests/leases.rs` over DynamoDB on moto, so "passes the suite" means the same
//! thing for both.
//!
//! What every store must do: a lease is exclusive; a commit without the lease is refused
//! and changes nothing; checkpoints never move backwards (compared as sequence numbers,
//! not strings); workers committing different shards and consumers lose none of each
//! other's checkpoints; releasing a lease keeps its checkpoint; every sequence number,
//! the embedded log's u64s and Kinesis composites alike, reads back exactly; a dead
//! worker's lease can be taken, in the way the backend loses leases
//! ([`LeaseLoss`]). What only some stores do ([`Capabilities`]: listing, handing over,
//! `SHARD_END`) is checked where offered, and the trait's defaults where not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use floodgate_core::stream::{CheckpointStore, SequenceNumber, ShardId, ShardInfo};

/// How a worker that stops (dies, or merely stops renewing) loses its leases.
#[derive(Debug, Clone, Copy)]
pub enum LeaseLoss {
    /// When its store is dropped (its process exits): the embedded store's flocks. A
    /// lease is never lost while its store lives.
    WhenDropped,
    /// When it has not renewed for this long, as the worker taking it observes: DynamoDB.
    Expires(Duration),
}

/// What a backend does beyond the bare contract, so the suite checks it.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// `leases` lists every lease of a consumer, with `ensure_leases` creating free ones.
    /// (The embedded store answers an empty list.)
    pub lists_leases: bool,
    /// `request_lease` asks a live lease's holder to hand it over, and `leases` shows the
    /// request. (The embedded store answers false.)
    pub hands_over: bool,
    /// `finish_shard` records `SHARD_END`. (The embedded store refuses: its shards never end.)
    pub shard_end: bool,
    pub loss: LeaseLoss,
}

/// A backend under test.
#[async_trait]
pub trait LeaseFixture: Send + Sync {
    /// Names the backend in failure messages.
    fn name(&self) -> String;

    fn capabilities(&self) -> Capabilities;

    /// `n` stores over one fresh, empty backing, shared by them and by no other call. The
    /// fixture keeps no reference to them, so dropping one is its worker dying.
    async fn workers(&self, n: usize) -> Vec<Arc<dyn CheckpointStore>>;
}

const LAKE: &str = "lake";
const BOOKINGS: &str = "bookings";
/// A Kinesis sequence number, as long as real ones are.
const KINESIS: &str = "49590338271490256608559692538361571095921575989136588898";

fn shard(i: usize) -> ShardId {
    ShardId(format!("shardId-{i:012}"))
}

fn seq(n: u64) -> SequenceNumber {
    SequenceNumber::from_u64(n)
}

/// A Floodgate sequence number on Kinesis: the Kinesis sequence and a 6-digit subsequence.
fn composite(kinesis: &str, sub: u64) -> SequenceNumber {
    SequenceNumber::new(format!("{kinesis}{sub:06}"))
}

async fn workers<const N: usize>(fixture: &dyn LeaseFixture) -> [Arc<dyn CheckpointStore>; N] {
    let stores = fixture.workers(N).await;
    let got = stores.len();
    stores
        .try_into()
        .unwrap_or_else(|_| panic!("{}: asked for {N} stores, got {got}", fixture.name()))
}

/// One worker holds a lease at a time, even when several race for a new one; the holder
/// may acquire it again; leases of other shards and other consumers are separate.
pub async fn a_lease_is_exclusive(fixture: &dyn LeaseFixture) {
    let name = fixture.name();
    let [a, b, c] = workers::<3>(fixture).await;
    let s0 = shard(0);

    assert!(
        a.acquire_lease(LAKE, &s0, "worker-a").await.unwrap(),
        "{name}"
    );
    assert!(
        !b.acquire_lease(LAKE, &s0, "worker-b").await.unwrap(),
        "{name}: a held lease was taken"
    );
    assert!(
        !c.acquire_lease(LAKE, &s0, "worker-c").await.unwrap(),
        "{name}"
    );
    // The holder may ask again, and renew; nobody else renews it.
    assert!(
        a.acquire_lease(LAKE, &s0, "worker-a").await.unwrap(),
        "{name}"
    );
    assert!(
        a.renew_lease(LAKE, &s0, "worker-a").await.unwrap(),
        "{name}"
    );
    assert!(
        !b.renew_lease(LAKE, &s0, "worker-b").await.unwrap(),
        "{name}"
    );
    // Another owner name through the holder's own store does not get it either, and
    // asking does not cost the holder its lease.
    assert!(
        !a.acquire_lease(LAKE, &s0, "worker-x").await.unwrap(),
        "{name}"
    );
    assert!(
        a.renew_lease(LAKE, &s0, "worker-a").await.unwrap(),
        "{name}"
    );

    // Other shards, and the same shard of another consumer, are other leases.
    assert!(
        b.acquire_lease(LAKE, &shard(1), "worker-b").await.unwrap(),
        "{name}"
    );
    assert!(
        c.acquire_lease(BOOKINGS, &s0, "worker-c").await.unwrap(),
        "{name}: consumers share a lease"
    );

    // Released, it goes to the next who asks, and only to them.
    a.release_lease(LAKE, &s0, "worker-a").await.unwrap();
    assert!(
        !a.renew_lease(LAKE, &s0, "worker-a").await.unwrap(),
        "{name}"
    );
    assert!(
        b.acquire_lease(LAKE, &s0, "worker-b").await.unwrap(),
        "{name}"
    );
    assert!(
        !c.acquire_lease(LAKE, &s0, "worker-c").await.unwrap(),
        "{name}"
    );
    // Releasing a lease one does not hold is Ok and changes nothing.
    c.release_lease(LAKE, &s0, "worker-c").await.unwrap();
    a.release_lease(LAKE, &s0, "worker-a").await.unwrap();
    assert!(
        b.renew_lease(LAKE, &s0, "worker-b").await.unwrap(),
        "{name}"
    );

    // Workers racing for leases nobody has taken yet: exactly one wins each.
    for i in 10..15 {
        let s = shard(i);
        let (x, y, z) = tokio::join!(
            a.acquire_lease(LAKE, &s, "worker-a"),
            b.acquire_lease(LAKE, &s, "worker-b"),
            c.acquire_lease(LAKE, &s, "worker-c"),
        );
        let winners = [x.unwrap(), y.unwrap(), z.unwrap()];
        assert_eq!(
            winners.iter().filter(|w| **w).count(),
            1,
            "{name}: race for {s}: {winners:?}"
        );
    }
}

/// A commit is fenced by the lease: refused, changing nothing, unless this store holds the
/// lease on that consumer's shard.
pub async fn a_commit_without_the_lease_is_refused(fixture: &dyn LeaseFixture) {
    let name = fixture.name();
    let [a, b] = workers::<2>(fixture).await;
    let s0 = shard(0);

    // Never took it.
    let err = a.commit(LAKE, &s0, &seq(5)).await.unwrap_err();
    assert!(err.to_string().contains("lease"), "{name}: {err}");
    assert_eq!(a.checkpoint(LAKE, &s0).await.unwrap(), None, "{name}");

    // Another worker holds it.
    assert!(b.acquire_lease(LAKE, &s0, "worker-b").await.unwrap());
    assert!(a.commit(LAKE, &s0, &seq(5)).await.is_err(), "{name}");
    b.commit(LAKE, &s0, &seq(7)).await.unwrap();
    assert_eq!(
        a.checkpoint(LAKE, &s0).await.unwrap(),
        Some(seq(7)),
        "{name}"
    );

    // Holding a shard's lease for one consumer, or another shard's, is not holding this one.
    assert!(b.commit(BOOKINGS, &s0, &seq(8)).await.is_err(), "{name}");
    assert!(b.commit(LAKE, &shard(1), &seq(8)).await.is_err(), "{name}");
    assert_eq!(b.checkpoint(BOOKINGS, &s0).await.unwrap(), None, "{name}");
    assert_eq!(b.checkpoint(LAKE, &shard(1)).await.unwrap(), None, "{name}");

    // Gave it up: a worker that no longer owns the shard cannot move its checkpoint.
    b.release_lease(LAKE, &s0, "worker-b").await.unwrap();
    assert!(b.commit(LAKE, &s0, &seq(9)).await.is_err(), "{name}");
    assert_eq!(
        b.checkpoint(LAKE, &s0).await.unwrap(),
        Some(seq(7)),
        "{name}"
    );
    assert!(a.acquire_lease(LAKE, &s0, "worker-a").await.unwrap());
    a.commit(LAKE, &s0, &seq(8)).await.unwrap();
    assert_eq!(
        b.checkpoint(LAKE, &s0).await.unwrap(),
        Some(seq(8)),
        "{name}"
    );
}

/// Committing an older (or the same) sequence is a no-op, with sequences compared as
/// numbers ("9" < "10"), also for a worker that has just taken the lease over.
pub async fn checkpoints_never_regress(fixture: &dyn LeaseFixture) {
    let name = fixture.name();
    let [a, b] = workers::<2>(fixture).await;
    let s0 = shard(0);
    assert!(a.acquire_lease(LAKE, &s0, "worker-a").await.unwrap());
    let steps = [
        (10, 10),
        (9, 10), // older by number, though "9" > "10" as strings
        (10, 10),
        (11, 11),
        (2, 11),
    ];
    for (commit, want) in steps {
        a.commit(LAKE, &s0, &seq(commit)).await.unwrap();
        assert_eq!(
            a.checkpoint(LAKE, &s0).await.unwrap(),
            Some(seq(want)),
            "{name}: after committing {commit}"
        );
    }
    // Composites: longer is later; within one Kinesis record, the subsequence orders.
    let high = composite(KINESIS, 5);
    a.commit(LAKE, &s0, &high).await.unwrap();
    a.commit(LAKE, &s0, &composite(KINESIS, 4)).await.unwrap();
    a.commit(LAKE, &s0, &seq(u64::MAX)).await.unwrap();
    assert_eq!(
        a.checkpoint(LAKE, &s0).await.unwrap(),
        Some(high.clone()),
        "{name}"
    );

    // The next holder cannot move it back either.
    a.release_lease(LAKE, &s0, "worker-a").await.unwrap();
    assert!(b.acquire_lease(LAKE, &s0, "worker-b").await.unwrap());
    b.commit(LAKE, &s0, &composite(KINESIS, 1)).await.unwrap();
    assert_eq!(b.checkpoint(LAKE, &s0).await.unwrap(), Some(high), "{name}");
    b.commit(LAKE, &s0, &composite(KINESIS, 6)).await.unwrap();
    assert_eq!(
        a.checkpoint(LAKE, &s0).await.unwrap(),
        Some(composite(KINESIS, 6)),
        "{name}"
    );
}

/// Three workers split two consumers' shards and commit concurrently: every
/// (consumer, shard) ends at its own last commit, none clobbered by another's.
pub async fn workers_committing_different_shards_lose_nothing(fixture: &dyn LeaseFixture) {
    const SHARDS: usize = 6;
    const ROUNDS: u64 = 8;
    let name = fixture.name();
    let stores = workers::<3>(fixture).await;
    let mut tasks = Vec::new();
    for (w, store) in stores.iter().enumerate() {
        let owner = format!("worker-{w}");
        let mine: Vec<ShardId> = (0..SHARDS).filter(|i| i % 3 == w).map(shard).collect();
        for s in &mine {
            for consumer in [LAKE, BOOKINGS] {
                assert!(
                    store.acquire_lease(consumer, s, &owner).await.unwrap(),
                    "{name}: {consumer} {s}"
                );
            }
        }
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for round in 1..=ROUNDS {
                for (i, s) in mine.iter().enumerate() {
                    let base = round * 1000 + i as u64;
                    store.commit(LAKE, s, &seq(base)).await.unwrap();
                    store.commit(BOOKINGS, s, &seq(base + 500)).await.unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for (w, store) in stores.iter().enumerate() {
        for i in 0..SHARDS {
            // The index of shard i among its worker's shards.
            let last = ROUNDS * 1000 + (i / 3) as u64;
            let s = shard(i);
            assert_eq!(
                store.checkpoint(LAKE, &s).await.unwrap(),
                Some(seq(last)),
                "{name}: lake {s} as worker {w} reads it"
            );
            assert_eq!(
                store.checkpoint(BOOKINGS, &s).await.unwrap(),
                Some(seq(last + 500)),
                "{name}: bookings {s} as worker {w} reads it"
            );
        }
    }
}

/// Releasing a lease (a clean shutdown's hand-off) keeps its checkpoint, so the next
/// holder resumes from it rather than from the start of the shard.
pub async fn releasing_keeps_the_checkpoint(fixture: &dyn LeaseFixture) {
    let name = fixture.name();
    let [a, b] = workers::<2>(fixture).await;
    let s0 = shard(0);
    assert!(a.acquire_lease(LAKE, &s0, "worker-a").await.unwrap());
    a.commit(LAKE, &s0, &seq(42)).await.unwrap();
    a.release_lease(LAKE, &s0, "worker-a").await.unwrap();
    assert_eq!(
        a.checkpoint(LAKE, &s0).await.unwrap(),
        Some(seq(42)),
        "{name}"
    );
    assert_eq!(
        b.checkpoint(LAKE, &s0).await.unwrap(),
        Some(seq(42)),
        "{name}"
    );

    assert!(
        b.acquire_lease(LAKE, &s0, "worker-b").await.unwrap(),
        "{name}"
    );
    assert_eq!(
        b.checkpoint(LAKE, &s0).await.unwrap(),
        Some(seq(42)),
        "{name}: taking the lease reset its checkpoint"
    );
    b.commit(LAKE, &s0, &seq(43)).await.unwrap();
    b.release_lease(LAKE, &s0, "worker-b").await.unwrap();
    assert_eq!(
        a.checkpoint(LAKE, &s0).await.unwrap(),
        Some(seq(43)),
        "{name}"
    );
}

/// Every sequence number reads back exactly as committed: the embedded log's u64s (short
/// ones too) and Kinesis composites (a 56-digit sequence and a subsequence), through the
/// committing store, another one, and after the lease changes hands.
pub async fn sequence_numbers_round_trip_exactly(fixture: &dyn LeaseFixture) {
    let name = fixture.name();
    let [a, b] = workers::<2>(fixture).await;
    let mut all = vec![
        seq(0),
        seq(7),
        seq(999_999),
        seq(1_000_000),
        seq(1_234_567),
        seq(u64::MAX),
        composite(KINESIS, 0),
        composite(KINESIS, 17),
        composite(KINESIS, 999_999),
        composite(
            "49590338271490256608559692538361571095921575989136588899",
            1,
        ),
        composite(&format!("{KINESIS}1234567890"), 3),
    ];
    all.sort();
    let s0 = shard(0);
    assert!(a.acquire_lease(LAKE, &s0, "worker-a").await.unwrap());
    for sequence in &all {
        a.commit(LAKE, &s0, sequence).await.unwrap();
        for (who, store) in [("its writer", &a), ("another worker", &b)] {
            assert_eq!(
                store.checkpoint(LAKE, &s0).await.unwrap().as_ref(),
                Some(sequence),
                "{name}: {sequence} as {who} reads it"
            );
        }
    }
    // Each alone on a shard of its own, handed to another worker before it is read.
    for (i, sequence) in all.iter().enumerate() {
        let s = shard(100 + i);
        assert!(a.acquire_lease(LAKE, &s, "worker-a").await.unwrap());
        a.commit(LAKE, &s, sequence).await.unwrap();
        a.release_lease(LAKE, &s, "worker-a").await.unwrap();
        assert!(b.acquire_lease(LAKE, &s, "worker-b").await.unwrap());
        assert_eq!(
            b.checkpoint(LAKE, &s).await.unwrap().as_ref(),
            Some(sequence),
            "{name}: {sequence} alone on {s}"
        );
    }
}

/// A worker that stops loses its lease the way the backend says, and another takes it
/// with its checkpoint; a stopped worker that still runs cannot commit any more.
pub async fn a_dead_workers_lease_is_taken(fixture: &dyn LeaseFixture) {
    let name = fixture.name();
    let [a, b] = workers::<2>(fixture).await;
    let s0 = shard(0);
    assert!(a.acquire_lease(LAKE, &s0, "worker-a").await.unwrap());
    a.commit(LAKE, &s0, &seq(5)).await.unwrap();
    let first_try = Instant::now();
    assert!(
        !b.acquire_lease(LAKE, &s0, "worker-b").await.unwrap(),
        "{name}: a live lease was taken"
    );
    match fixture.capabilities().loss {
        LeaseLoss::WhenDropped => {
            drop(a);
            assert!(
                b.acquire_lease(LAKE, &s0, "worker-b").await.unwrap(),
                "{name}: the lease of a dropped store was not freed"
            );
        }
        LeaseLoss::Expires(duration) => {
            // `a` stops renewing. `b` first saw the lease at `first_try`, so it may take it
            // no sooner than `duration` after.
            let deadline = first_try + duration * 10 + Duration::from_secs(30);
            loop {
                if b.acquire_lease(LAKE, &s0, "worker-b").await.unwrap() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name}: an unrenewed lease was not taken within {:?}",
                    deadline - first_try
                );
                tokio::time::sleep(duration / 20).await;
            }
            let waited = first_try.elapsed();
            assert!(
                waited >= duration,
                "{name}: taken after {waited:?}, before the lease duration {duration:?}"
            );
            // The old holder finds out at its next renewal, and cannot commit.
            assert!(
                !a.renew_lease(LAKE, &s0, "worker-a").await.unwrap(),
                "{name}"
            );
            assert!(a.commit(LAKE, &s0, &seq(6)).await.is_err(), "{name}");
            assert!(
                !a.acquire_lease(LAKE, &s0, "worker-a").await.unwrap(),
                "{name}"
            );
        }
    }
    assert_eq!(
        b.checkpoint(LAKE, &s0).await.unwrap(),
        Some(seq(5)),
        "{name}"
    );
    b.commit(LAKE, &s0, &seq(6)).await.unwrap();
    assert_eq!(
        b.checkpoint(LAKE, &s0).await.unwrap(),
        Some(seq(6)),
        "{name}"
    );
}

/// Listing (with `ensure_leases`), handing over and `SHARD_END` where the store offers them;
/// the trait's defaults (an empty list, no hand-over, `finish_shard` refused) where not.
pub async fn listing_handing_over_and_shard_end(fixture: &dyn LeaseFixture) {
    let name = fixture.name();
    let caps = fixture.capabilities();
    let [a, b] = workers::<2>(fixture).await;
    let (parent, left, right) = (shard(0), shard(1), shard(2));
    let split = [
        ShardInfo {
            id: parent.clone(),
            parents: vec![],
            closed: true,
        },
        ShardInfo {
            id: left.clone(),
            parents: vec![parent.clone()],
            closed: false,
        },
        ShardInfo {
            id: right.clone(),
            parents: vec![parent.clone()],
            closed: false,
        },
    ];
    a.ensure_leases(LAKE, &split).await.unwrap();
    a.ensure_leases(LAKE, &split).await.unwrap();
    assert!(
        a.acquire_lease(LAKE, &parent, "worker-a").await.unwrap(),
        "{name}"
    );
    a.commit(LAKE, &parent, &seq(5)).await.unwrap();
    // Syncing shards again changes no lease that exists.
    b.ensure_leases(LAKE, &split).await.unwrap();
    assert!(
        a.renew_lease(LAKE, &parent, "worker-a").await.unwrap(),
        "{name}"
    );
    assert_eq!(
        a.checkpoint(LAKE, &parent).await.unwrap(),
        Some(seq(5)),
        "{name}"
    );

    let listed = b.leases(LAKE).await.unwrap();
    if caps.lists_leases {
        let view: Vec<(ShardId, Option<&str>, bool, bool)> = listed
            .iter()
            .map(|l| (l.shard.clone(), l.owner.as_deref(), l.live, l.finished))
            .collect();
        assert_eq!(
            view,
            vec![
                (parent.clone(), Some("worker-a"), true, false),
                (left.clone(), None, false, false),
                (right.clone(), None, false, false),
            ],
            "{name}: leases of {LAKE}"
        );
        assert_eq!(b.leases(BOOKINGS).await.unwrap(), vec![], "{name}");
    } else {
        assert_eq!(listed, vec![], "{name}");
    }

    // The holder of the parent from here on.
    let holder = if caps.hands_over {
        assert!(
            b.request_lease(LAKE, &parent, "worker-b").await.unwrap(),
            "{name}"
        );
        assert!(
            !b.acquire_lease(LAKE, &parent, "worker-b").await.unwrap(),
            "{name}: asked for, the lease is still its holder's"
        );
        // The request fences nothing: the holder renews and commits until it lets go.
        assert!(
            a.renew_lease(LAKE, &parent, "worker-a").await.unwrap(),
            "{name}: a request for the lease cost its holder a renewal"
        );
        a.commit(LAKE, &parent, &seq(5)).await.unwrap();
        let asked: Vec<Option<String>> = a
            .leases(LAKE)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.handoff_to)
            .collect();
        assert_eq!(
            asked,
            vec![Some("worker-b".to_owned()), None, None],
            "{name}: the holder sees who asked"
        );
        a.hand_over_lease(LAKE, &parent, "worker-a", "worker-b")
            .await
            .unwrap();
        assert!(
            b.acquire_lease(LAKE, &parent, "worker-b").await.unwrap(),
            "{name}: handed over, the lease is the asker's to take up"
        );
        assert_eq!(
            b.leases(LAKE).await.unwrap()[0].handoff_to,
            None,
            "{name}: the hand-over answers the request"
        );
        assert_eq!(
            b.checkpoint(LAKE, &parent).await.unwrap(),
            Some(seq(5)),
            "{name}: the new holder starts where the old one committed"
        );
        assert!(
            !a.renew_lease(LAKE, &parent, "worker-a").await.unwrap(),
            "{name}: the old holder renewed a lease it handed over"
        );
        assert!(
            a.commit(LAKE, &parent, &seq(6)).await.is_err(),
            "{name}: the old holder committed after handing the lease over"
        );
        b.commit(LAKE, &parent, &seq(6)).await.unwrap();
        if caps.lists_leases {
            let owner = b.leases(LAKE).await.unwrap()[0].owner.clone();
            assert_eq!(owner.as_deref(), Some("worker-b"), "{name}");
        }
        &b
    } else {
        assert!(
            !b.request_lease(LAKE, &parent, "worker-b").await.unwrap(),
            "{name}"
        );
        assert!(
            a.renew_lease(LAKE, &parent, "worker-a").await.unwrap(),
            "{name}"
        );
        a.commit(LAKE, &parent, &seq(6)).await.unwrap();
        &a
    };
    let other = if caps.hands_over { &a } else { &b };

    assert!(!a.shard_finished(LAKE, &parent).await.unwrap(), "{name}");
    if caps.shard_end {
        assert!(
            other.finish_shard(LAKE, &parent).await.is_err(),
            "{name}: a worker without the lease ended the shard"
        );
        assert!(!a.shard_finished(LAKE, &parent).await.unwrap(), "{name}");
        holder.finish_shard(LAKE, &parent).await.unwrap();
        holder.finish_shard(LAKE, &parent).await.unwrap();
        for store in [&a, &b] {
            assert!(store.shard_finished(LAKE, &parent).await.unwrap(), "{name}");
            assert!(!store.shard_finished(LAKE, &left).await.unwrap(), "{name}");
        }
        // A finished shard's checkpoint is its last one, or none; it never goes back.
        let _ = holder.commit(LAKE, &parent, &seq(7)).await;
        assert!(a.shard_finished(LAKE, &parent).await.unwrap(), "{name}");
        let cp = a.checkpoint(LAKE, &parent).await.unwrap();
        assert!(cp.is_none() || cp == Some(seq(6)), "{name}: {cp:?}");
        if caps.lists_leases {
            let finished: Vec<bool> = b
                .leases(LAKE)
                .await
                .unwrap()
                .iter()
                .map(|l| l.finished)
                .collect();
            assert_eq!(finished, vec![true, false, false], "{name}");
        }
    } else {
        assert!(holder.finish_shard(LAKE, &parent).await.is_err(), "{name}");
        assert!(!a.shard_finished(LAKE, &parent).await.unwrap(), "{name}");
        assert_eq!(
            a.checkpoint(LAKE, &parent).await.unwrap(),
            Some(seq(6)),
            "{name}"
        );
    }
}
