//! `floodgate-processors`: the consumer side of the stream (DESIGN.md §5).
//!
//! Not built yet: the consumer runtime (one task per owned shard, checkpoint after
//! effects), the bookings processor and the lake processor arrive with their issues.
//! They will read through [`StreamReader`] and commit through [`CheckpointStore`]; the
//! embedded log already keeps every record that a checkpointing consumer has not passed.
//!
//! [`StreamReader`]: floodgate_core::stream::StreamReader
//! [`CheckpointStore`]: floodgate_core::stream::CheckpointStore

pub use floodgate_core::stream::{CheckpointStore, StreamReader};
