//! The command channel to a guest: busybox `sh` on the guest's `ttyS1`, which QEMU connects to a
//! unix socket. A serial line has no framing, exit status or end of output, so every command is
//! wrapped in marker lines that the guest prints; the markers are written split in two (`"" `) on
//! the way in, so an echo of the input can never be mistaken for them.

use std::{
    io::{ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use super::{Error, ParseError, io_error};

/// What a command printed (stdout and stderr together) and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOutput {
    /// Stdout and stderr, interleaved as the guest wrote them.
    pub output: String,
    /// The exit status `sh -c` reported (128 + N for a signal).
    pub status: i32,
}

impl GuestOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

#[derive(Debug)]
pub(super) struct Shell {
    stream: UnixStream,
    socket: PathBuf,
    next_id: u64,
    /// Bytes received but not yet consumed (late output of timed-out commands is dropped when
    /// the next command's begin marker is found).
    buffer: Vec<u8>,
}

impl Shell {
    /// Connects to the shell socket, retrying until `deadline` (QEMU creates it at start-up).
    pub(super) fn connect(socket: &Path, deadline: Instant) -> Result<Self, Error> {
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    return Ok(Self {
                        stream,
                        socket: socket.to_path_buf(),
                        next_id: 0,
                        buffer: Vec::new(),
                    });
                }
                Err(source) if Instant::now() >= deadline => {
                    return Err(io_error("connecting to the guest shell", socket, source));
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub(super) fn run(&mut self, cmd: &str, timeout: Duration) -> Result<GuestOutput, Error> {
        let id = self.next_id;
        self.next_id += 1;
        let line = format!(
            "echo __vmgov_\"\"begin_{id}__; sh -c {} </dev/null 2>&1; echo __vmgov_\"\"end_{id}__ $?\n",
            shell_quote(cmd)
        );
        self.stream
            .write_all(line.as_bytes())
            .map_err(|source| io_error("writing to the guest shell", &self.socket, source))?;
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((consumed, result)) = parse_framed(&self.buffer, id) {
                self.buffer.drain(..consumed);
                return result.map_err(|source| Error::Parse {
                    what: format!("the guest's answer to `{cmd}`"),
                    source,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: format!(
                        "`{cmd}` in the guest; received so far: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    ),
                    timeout,
                });
            }
            self.stream
                .set_read_timeout(Some(left.min(Duration::from_millis(500))))
                .map_err(|source| io_error("setting a timeout on", &self.socket, source))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(io_error(
                        "reading from the guest shell",
                        &self.socket,
                        ErrorKind::UnexpectedEof.into(),
                    ));
                }
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(io_error("reading from the guest shell", &self.socket, source));
                }
            }
        }
    }
}

/// Quotes `s` as one word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Finds the complete answer to command `id` in `buf`: `None` while it is incomplete, else the
/// number of bytes it ends at and the output and status between its markers.
fn parse_framed(buf: &[u8], id: u64) -> Option<(usize, Result<GuestOutput, ParseError>)> {
    let begin = format!("__vmgov_begin_{id}__\n");
    let end = format!("__vmgov_end_{id}__ ");
    let start = find_bytes(buf, begin.as_bytes())? + begin.len();
    let end_at = start + find_bytes(&buf[start..], end.as_bytes())?;
    let status_at = end_at + end.len();
    let newline = status_at + buf[status_at..].iter().position(|&b| b == b'\n')?;
    let status_text = String::from_utf8_lossy(&buf[status_at..newline]).trim().to_owned();
    let result = match status_text.parse::<i32>() {
        Ok(status) => {
            let output = String::from_utf8_lossy(&buf[start..end_at]).replace('\r', "");
            Ok(GuestOutput { output, status })
        }
        Err(_) => {
            Err(ParseError::BadNumber { field: "exit status".to_owned(), value: status_text })
        }
    };
    Some((newline + 1, result))
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_are_found_after_stale_output() {
        let buf = b"late junk\n__vmgov_begin_3__\nhello\nworld\n__vmgov_end_3__ 7\nnext";
        let (consumed, out) = parse_framed(buf, 3).unwrap();
        assert_eq!(out.unwrap(), GuestOutput { output: "hello\nworld\n".into(), status: 7 });
        assert_eq!(&buf[consumed..], b"next");
    }

    #[test]
    fn echoed_input_is_not_a_frame() {
        let buf = b"echo __vmgov_\"\"begin_0__; sh -c 'x'; echo __vmgov_\"\"end_0__ $?\n";
        assert!(parse_framed(buf, 0).is_none());
        assert!(parse_framed(b"__vmgov_begin_0__\nabc\n__vmgov_end_0__ 0", 0).is_none());
    }

    #[test]
    fn bad_status_is_an_error() {
        let (_, out) = parse_framed(b"__vmgov_begin_1__\n__vmgov_end_1__ x\n", 1).unwrap();
        assert!(out.is_err());
    }

    #[test]
    fn quoting_keeps_single_quotes() {
        assert_eq!(shell_quote("echo 'a b'"), r"'echo '\''a b'\'''");
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..200), id in 0u64..3) {
            let _ = parse_framed(&buf, id);
        }

        #[test]
        fn framed_output_round_trips(output in "[a-z0-9 \n]{0,80}", status in 0i32..256, id in 0u64..100) {
            let buf = format!("x__vmgov_begin_{id}__\n{output}__vmgov_end_{id}__ {status}\n");
            let (consumed, out) = parse_framed(buf.as_bytes(), id).unwrap();
            prop_assert_eq!(consumed, buf.len());
            prop_assert_eq!(out.unwrap(), GuestOutput { output, status });
        }
    }
}
