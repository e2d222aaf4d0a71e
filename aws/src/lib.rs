//! Floodgate's AWS backends, behind the same role traits as the embedded ones
//! (`floodgate_core::stream`, `floodgate_core::state`, `floodgate_core::object_store`):
//! Kinesis Data Streams for the stream, DynamoDB for the consumers' leases and checkpoints
//! and for the bookings state, EventBridge for derived events, S3 for the lake
//! ([`s3::S3Store`]), and Firehose for the raw archive ([`firehose::FirehoseArchive`]).

pub mod check;
pub mod client;
pub mod emulator;
pub mod eventbridge;
pub mod fault_proxy;
pub mod firehose;
pub mod kinesis;
pub mod kpl;
pub mod leases;
pub mod s3;
pub mod seq;
pub mod state;
