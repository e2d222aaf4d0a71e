//! One module per group of subcommands; `main` parses the command line and dispatches.

pub(crate) mod aws;
pub(crate) mod backup;
pub(crate) mod healthcheck;
pub(crate) mod inspect;
pub(crate) mod keys;
pub(crate) mod lake;
pub(crate) mod schemas;
pub(crate) mod serve;
