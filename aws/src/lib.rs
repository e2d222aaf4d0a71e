//! Floodgate's AWS backends, behind the same role traits as the embedded ones
//! (`floodgate_core::stream`): Kinesis Data Streams for the stream, DynamoDB for the
//! consumers' leases and checkpoints, and the bookings state.

pub mod client;
pub mod emulator;
pub mod eventbridge;
pub mod fault_proxy;
pub mod kinesis;
pub mod kpl;
pub mod leases;
pub mod seq;
pub mod state;
