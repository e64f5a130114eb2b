//! Network load on a guest with httperf, run inside the test's namespace, and its report parsed
//! into numbers a test can compare with what the host observed on the guest's tap.

use std::net::Ipv4Addr;

use super::{Error, NetNs, ParseError};

/// What load to generate (`httperf --server IP --port P --uri U --num-conns N --rate R
/// --timeout T`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttperfArgs {
    /// The guest's address.
    pub server: Ipv4Addr,
    /// The port httpd listens on.
    pub port: u16,
    /// The path requested.
    pub uri: String,
    /// Connections to open in total (one request each).
    pub num_conns: u32,
    /// New connections per second.
    pub rate: u32,
    /// Seconds before a request counts as timed out.
    pub timeout_s: u32,
}

impl HttperfArgs {
    /// 100 connections at 20/s to `/index.html` on port 80, 5 s timeout.
    pub fn new(server: Ipv4Addr) -> Self {
        Self {
            server,
            port: 80,
            uri: "/index.html".to_owned(),
            num_conns: 100,
            rate: 20,
            timeout_s: 5,
        }
    }
}

/// The numbers of an httperf report that tests check.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HttperfReport {
    /// Connections opened (`Total: connections`).
    pub connections: u64,
    /// Requests sent (`Total: requests`).
    pub requests: u64,
    /// Replies received (`Total: replies`).
    pub replies: u64,
    /// Duration of the test in seconds (`test-duration`).
    pub duration_s: f64,
    /// Replies by status class: 1xx, 2xx, 3xx, 4xx, 5xx (`Reply status:`).
    pub status: [u64; 5],
    /// Errors of all kinds (`Errors: total`).
    pub errors: u64,
    /// Requests that timed out on the client (`client-timo`).
    pub client_timeouts: u64,
    /// Connections refused (`connrefused`).
    pub conn_refused: u64,
    /// Connections reset (`connreset`).
    pub conn_reset: u64,
}

impl HttperfReport {
    /// Parses httperf's report (its stdout). Missing or malformed numbers are errors.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let total = pairs(text, "Total:")?;
        let errors = pairs(text, "Errors:")?;
        let status_line = line_after(text, "Reply status:")?;
        let mut status = [0; 5];
        for (class, slot) in status.iter_mut().enumerate() {
            let key = format!("{}xx=", class + 1);
            let value = status_line
                .split_whitespace()
                .find_map(|t| t.strip_prefix(&key))
                .ok_or_else(|| ParseError::Missing(format!("Reply status {key}")))?;
            *slot = number(&key, value)?;
        }
        let duration = get(&total, "test-duration")?;
        let duration_s =
            duration.parse::<f64>().ok().filter(|d| d.is_finite() && *d >= 0.0).ok_or_else(
                || ParseError::BadNumber {
                    field: "test-duration".to_owned(),
                    value: duration.to_owned(),
                },
            )?;
        Ok(Self {
            connections: number("connections", get(&total, "connections")?)?,
            requests: number("requests", get(&total, "requests")?)?,
            replies: number("replies", get(&total, "replies")?)?,
            duration_s,
            status,
            errors: number("errors total", get(&errors, "total")?)?,
            client_timeouts: number("client-timo", get(&errors, "client-timo")?)?,
            conn_refused: number("connrefused", get(&errors, "connrefused")?)?,
            conn_reset: number("connreset", get(&errors, "connreset")?)?,
        })
    }
}

/// Runs httperf inside `ns` and parses its report.
pub fn run_httperf(ns: &NetNs, args: &HttperfArgs) -> Result<HttperfReport, Error> {
    let output = ns.run(
        "httperf",
        &[
            "--server",
            &args.server.to_string(),
            "--port",
            &args.port.to_string(),
            "--uri",
            &args.uri,
            "--num-conns",
            &args.num_conns.to_string(),
            "--rate",
            &args.rate.to_string(),
            "--timeout",
            &args.timeout_s.to_string(),
        ],
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    HttperfReport::parse(&text)
        .map_err(|source| Error::Parse { what: format!("httperf's report:\n{text}"), source })
}

/// The rest of the first line starting with `prefix`.
fn line_after<'t>(text: &'t str, prefix: &str) -> Result<&'t str, ParseError> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .ok_or_else(|| ParseError::Missing(format!("a line `{prefix}`")))
}

/// `name value` pairs from every line starting with `prefix` (httperf splits `Errors:` over two).
fn pairs<'t>(text: &'t str, prefix: &str) -> Result<Vec<(&'t str, &'t str)>, ParseError> {
    let mut found = Vec::new();
    let mut any = false;
    for rest in text.lines().filter_map(|l| l.trim_start().strip_prefix(prefix)) {
        any = true;
        let tokens: Vec<&str> = rest.split_whitespace().collect();
        found.extend(tokens.chunks(2).filter_map(|c| match c {
            [name, value] => Some((*name, *value)),
            _ => None,
        }));
    }
    if any { Ok(found) } else { Err(ParseError::Missing(format!("a line `{prefix}`"))) }
}

fn get<'t>(pairs: &[(&str, &'t str)], name: &str) -> Result<&'t str, ParseError> {
    pairs
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| ParseError::Missing(name.to_owned()))
}

fn number(field: &str, value: &str) -> Result<u64, ParseError> {
    value
        .parse()
        .map_err(|_| ParseError::BadNumber { field: field.to_owned(), value: value.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A real report (httperf 0.9.0, Debian 12): 100 connections at 20/s to busybox httpd.
    const REPORT: &str = "\
httperf --timeout=5 --client=0/1 --server=127.0.0.1 --port=80 --uri=/index.html --rate=20 --send-buffer=4096 --recv-buffer=16384 --num-conns=100 --num-calls=1
Maximum connect burst length: 1

Total: connections 100 requests 100 replies 100 test-duration 4.957 s

Connection rate: 20.2 conn/s (49.6 ms/conn, <=1 concurrent connections)
Connection time [ms]: min 0.5 avg 1.5 max 6.7 median 0.5 stddev 1.3
Connection time [ms]: connect 0.0
Connection length [replies/conn]: 1.000

Request rate: 20.2 req/s (49.6 ms/req)
Request size [B]: 72.0

Reply rate [replies/s]: min 0.0 avg 0.0 max 0.0 stddev 0.0 (0 samples)
Reply time [ms]: response 1.5 transfer 0.0
Reply size [B]: header 209.0 content 43.0 footer 0.0 (total 252.0)
Reply status: 1xx=0 2xx=100 3xx=0 4xx=0 5xx=0

CPU time [s]: user 0.71 system 4.18 (user 14.3% system 84.3% total 98.7%)
Net I/O: 6.4 KB/s (0.1*10^6 bps)

Errors: total 0 client-timo 0 socket-timo 0 connrefused 0 connreset 0
Errors: fd-unavail 0 addrunavail 0 ftab-full 0 other 0
";

    #[test]
    fn parses_a_real_report() {
        let r = HttperfReport::parse(REPORT).unwrap();
        assert_eq!((r.connections, r.requests, r.replies), (100, 100, 100));
        assert_eq!(r.status, [0, 100, 0, 0, 0]);
        assert_eq!((r.errors, r.client_timeouts, r.conn_refused, r.conn_reset), (0, 0, 0, 0));
        assert!((r.duration_s - 4.957).abs() < 1e-9);
    }

    #[test]
    fn rejects_truncated_and_garbled_reports() {
        assert!(HttperfReport::parse("").is_err());
        let cut = &REPORT[..REPORT.find("Reply status").unwrap()];
        assert!(HttperfReport::parse(cut).is_err());
        let garbled = REPORT.replace("replies 100", "replies -3");
        assert_eq!(
            HttperfReport::parse(&garbled),
            Err(ParseError::BadNumber { field: "replies".into(), value: "-3".into() })
        );
        assert!(HttperfReport::parse(&REPORT.replace("4.957", "NaN")).is_err());
    }

    fn render(r: &HttperfReport, duration_ms: u64) -> String {
        let s = r.status;
        format!(
            "Maximum connect burst length: 1\n\nTotal: connections {} requests {} replies {} \
             test-duration {}.{:03} s\n\nReply status: 1xx={} 2xx={} 3xx={} 4xx={} 5xx={}\n\n\
             Errors: total {} client-timo {} socket-timo 0 connrefused {} connreset {}\n\
             Errors: fd-unavail 0 addrunavail 0 ftab-full 0 other 0\n",
            r.connections,
            r.requests,
            r.replies,
            duration_ms / 1000,
            duration_ms % 1000,
            s[0],
            s[1],
            s[2],
            s[3],
            s[4],
            r.errors,
            r.client_timeouts,
            r.conn_refused,
            r.conn_reset
        )
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
            let _ = HttperfReport::parse(&text);
        }

        #[test]
        fn mangled_reports_never_panic(cut in 0usize..1200, junk in "[ -~\n]{0,20}") {
            let mut text: String = REPORT.chars().take(cut).collect();
            text.push_str(&junk);
            text.push_str(&REPORT.chars().skip(cut + junk.len()).collect::<String>());
            let _ = HttperfReport::parse(&text);
        }

        #[test]
        fn rendered_reports_round_trip(
            counts in proptest::array::uniform4(0u64..1_000_000),
            status in proptest::array::uniform5(0u64..1_000_000),
            errors in proptest::array::uniform4(0u64..1000),
            duration_ms in 0u64..10_000_000,
        ) {
            let report = HttperfReport {
                connections: counts[0],
                requests: counts[1],
                replies: counts[2],
                duration_s: 0.0,
                status,
                errors: errors[0],
                client_timeouts: errors[1],
                conn_refused: errors[2],
                conn_reset: errors[3],
            };
            let parsed = HttperfReport::parse(&render(&report, duration_ms)).unwrap();
            prop_assert!((parsed.duration_s * 1000.0 - duration_ms as f64).abs() < 1e-3);
            prop_assert_eq!(HttperfReport { duration_s: 0.0, ..parsed }, report);
        }
    }
}
