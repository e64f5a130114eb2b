//! Talking to a coordinator: the connection (its address from `--coordinator` or
//! `VMGOV_COORDINATOR`), output in tables or JSON, and errors that say what failed and what to
//! do, with an exit code per kind of failure so scripts can tell them apart.

use std::{fmt, process::ExitCode, time::Duration};

use clap::ValueEnum;
use comfy_table::Table;
use serde::Serialize;
use tonic::{Code, Status, transport::Channel};
use vmgov_proto::pb::fleet_service_client::FleetServiceClient;

/// Output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Human tables.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

/// A failure, with the exit code it maps to.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) message: String,
    pub(crate) code: u8,
}

/// Exit codes.
pub(crate) mod exit {
    /// Something else failed.
    pub(crate) const ERROR: u8 = 1;
    /// The coordinator could not be reached.
    pub(crate) const UNREACHABLE: u8 = 3;
    /// What was asked for does not exist.
    pub(crate) const NOT_FOUND: u8 = 4;
    /// The request was refused as invalid (nothing changed).
    pub(crate) const INVALID: u8 = 5;
    /// This coordinator cannot do it now (not the leader, or busy): retry or ask the leader.
    pub(crate) const UNAVAILABLE: u8 = 6;
}

impl Failure {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Self {
        Self { message: message.into(), code }
    }

    /// A gRPC error, explained.
    pub(crate) fn from_status(what: &str, s: &Status) -> Self {
        let (code, hint) = match s.code() {
            Code::NotFound => (exit::NOT_FOUND, ""),
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange => (exit::INVALID, " (nothing was changed)"),
            Code::Unavailable => {
                (exit::UNAVAILABLE, " (retry, or send it to the leader named above)")
            }
            Code::Unimplemented => (exit::ERROR, " (this coordinator is older than this vmgov)"),
            _ => (exit::ERROR, ""),
        };
        Self::new(code, format!("{what}: {}{hint}", s.message()))
    }

    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::new(exit::ERROR, format!("{e:#}"))
    }
}

/// Connects to the coordinator at `address`.
pub(crate) async fn connect(address: &str) -> Result<FleetServiceClient<Channel>, Failure> {
    let endpoint = Channel::from_shared(address.to_owned()).map_err(|_| {
        Failure::new(
            exit::INVALID,
            format!("{address:?} is not a coordinator address; write e.g. http://127.0.0.1:7700"),
        )
    })?;
    let channel = endpoint.connect_timeout(Duration::from_secs(3)).connect().await.map_err(|e| {
        Failure::new(
            exit::UNREACHABLE,
            format!(
                "cannot reach the coordinator at {address}: {e}. Is vmgov-coordinator running there? \
                 Set --coordinator or VMGOV_COORDINATOR to its address."
            ),
        )
    })?;
    Ok(FleetServiceClient::new(channel))
}

/// Prints `value` as JSON, or `table` for humans.
pub(crate) fn print<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce() -> Table,
) -> Result<(), Failure> {
    match output {
        Output::Json => {
            let text = serde_json::to_string_pretty(value)
                .map_err(|e| Failure::new(exit::ERROR, e.to_string()))?;
            println!("{text}");
        }
        Output::Table => println!("{}", table()),
    }
    Ok(())
}

/// A fraction in [0, 1] from "0.7", "70" or "70%".
pub(crate) fn parse_fraction(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (number, percent) = match t.strip_suffix('%') {
        Some(n) => (n, true),
        None => (t, false),
    };
    let v: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number; write 0.7, 70 or 70%"))?;
    let v = if percent || v > 1.0 { v / 100.0 } else { v };
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{s} is out of range: a threshold is a fraction in [0, 1] or a percentage in [0, 100]"
        ))
    }
}

/// A table with a header.
pub(crate) fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut t = Table::new();
    t.set_header(header);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_and_percentages() {
        assert!((parse_fraction("0.7").unwrap() - 0.7).abs() < 1e-12);
        assert!((parse_fraction("70").unwrap() - 0.7).abs() < 1e-12);
        assert!((parse_fraction("40%").unwrap() - 0.4).abs() < 1e-12);
        assert!((parse_fraction("1").unwrap() - 1.0).abs() < 1e-12);
        for bad in ["-1", "170", "abc", "", "NaN", "101%"] {
            assert!(parse_fraction(bad).is_err(), "{bad}");
        }
    }
}
