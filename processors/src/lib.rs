//! `floodgate-processors`: the consumer side of the stream (DESIGN.md §5).
//!
//! - [`runtime`] runs one task per shard: read a batch from the shard's position, hand it
//!   to a [`runtime::ShardProcessor`], commit the checkpoint only after the processor has
//!   committed the batch's effects, back off when idle, stop on shutdown. It reports lag
//!   (records and milliseconds behind) per shard.
//! - [`bookings`] holds the business rules of bookings and seat capacity, written once
//!   for every backend: a batch is decided in memory ([`bookings::decide`]) and written as
//!   one [`StateChanges`] (each touched row once) through the [`StateStore`] role.
//! - [`repeats`] drops repeats of an event within a shard on streams that many stateless
//!   edges write (Kinesis), deterministically, so replays decide the same.
//! - [`relay`] moves derived events from the state store's transactional outbox to the
//!   [`Publisher`] role, exactly once.
//! - [`lake`] writes accepted events as typed Parquet, one file per table, hour partition
//!   and run of the shard, through the `ObjectStore` role; [`parquet`] encodes them, and
//!   [`compact`] merges a partition's small files.
//! - [`archive`] copies accepted events, as the producers sent them, into the `Archive`
//!   role (Firehose to S3) as NDJSON packed into records, at least once.
//!
//! [`StateChanges`]: floodgate_core::state::StateChanges
//! [`StateStore`]: floodgate_core::state::StateStore
//! [`Publisher`]: floodgate_core::state::Publisher

pub mod archive;
pub mod bookings;
pub mod compact;
pub mod lake;
mod lake_rows;
pub mod parquet;
pub mod rebuild;
pub mod relay;
pub mod repeats;
pub mod runtime;
