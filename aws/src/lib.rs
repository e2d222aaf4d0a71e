//! Floodgate's AWS backends, behind the same role traits as the embedded ones
//! (`floodgate_core::stream`, `floodgate_core::object_store`): Kinesis Data Streams for the
//! stream, DynamoDB for the consumers' leases and checkpoints, S3 for the lake
//! ([`s3::S3Store`]).

pub mod client;
pub mod emulator;
pub mod fault_proxy;
pub mod kinesis;
pub mod kpl;
pub mod leases;
pub mod s3;
pub mod seq;
