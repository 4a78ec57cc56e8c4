//! What the supervisor and a serving process say to each other: JSON messages on a
//! `SOCK_SEQPACKET` socket pair (one message per packet), descriptors attached with
//! `SCM_RIGHTS`. The supervisor treats records as opaque: it stores them with their
//! descriptors by key and gives them all to the next serving process.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::sys;

/// What the kernel and the first serving process agreed at INIT; every later serving process
/// resumes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    pub major: u32,
    pub minor: u32,
    /// Kernel passthrough was negotiated (backing ids are in use).
    pub passthrough: bool,
    /// FUSE-over-io_uring was negotiated: every server must register ring entries (once
    /// the kernel has them on every queue, it sends requests nowhere else).
    #[serde(default)]
    pub uring: bool,
}

/// Supervisor to serving process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
pub enum ToServer {
    /// First message; carries the /dev/fuse descriptor and the backing directory's
    /// descriptor. `params` is `None` for the first server (it answers INIT).
    Hello {
        params: Option<Params>,
        generation: u64,
        /// Canonical paths (the server must not resolve them: the mount may cover them and
        /// nobody answers it yet).
        mountpoint: std::path::PathBuf,
        backing: std::path::PathBuf,
    },
    /// One kept record (with its descriptor, if it has one).
    Kept { key: String, rec: serde_json::Value },
    /// All records sent: resume.
    Go,
    /// Stop taking requests, finish the ones started, say `Drained` and exit.
    Drain,
    /// The descriptors of a `Del { ack: true }` are closed.
    Ack,
}

/// Serving process to supervisor.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
pub enum ToSupervisor {
    /// Negotiated at INIT (first server only).
    Params { params: Params },
    /// Keep this record (and its descriptor) until deleted.
    Put { key: String, rec: serde_json::Value },
    /// Forget these records and close their descriptors; with `ack`, say `Ack` once closed.
    Del { keys: Vec<String>, ack: bool },
    /// The server answers requests.
    Serving,
    /// Every request started is answered; the server exits next.
    Drained,
    /// The server cannot start (one sentence); it exits next.
    Failed { msg: String },
}

/// Largest message.
const MAX_MESSAGE: usize = 256 * 1024;

/// One end of the socket pair.
#[derive(Debug)]
pub struct Link {
    fd: OwnedFd,
}

impl Link {
    pub fn new(fd: OwnedFd) -> Link {
        Link { fd }
    }

    /// A connected pair.
    pub fn pair() -> io::Result<(Link, Link)> {
        let (a, b) = sys::seqpacket_pair()?;
        Ok((Link::new(a), Link::new(b)))
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    pub fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let data = serde_json::to_vec(msg).map_err(io::Error::other)?;
        sys::send_with_fds(self.fd.as_fd(), &data, fds)
    }

    /// The next message; `None` when the peer has closed its end.
    pub fn recv<T: DeserializeOwned>(&self) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
        // One buffer per thread, reused: a fresh one per message would cost more than the
        // message (the supervisor takes one per open and close).
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            if buf.len() < MAX_MESSAGE {
                buf.resize(MAX_MESSAGE, 0);
            }
            let (n, fds) = sys::recv_with_fds(self.fd.as_fd(), buf)?;
            if n == 0 && fds.is_empty() {
                return Ok(None);
            }
            let msg = serde_json::from_slice(&buf[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            Ok(Some((msg, fds)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn messages_carry_descriptors_of_the_same_open_file() {
        let (a, b) = Link::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"hello").unwrap();
        a.send(
            &ToSupervisor::Put {
                key: "f/1".into(),
                rec: serde_json::json!({"x": 1}),
            },
            &[f.as_fd()],
        )
        .unwrap();
        let (m, fds) = b.recv::<ToSupervisor>().unwrap().unwrap();
        assert!(matches!(m, ToSupervisor::Put { ref key, .. } if key == "f/1"));
        assert_eq!(fds.len(), 1);
        // Same open file description: the offset is shared.
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        assert_eq!(g.stream_position().unwrap(), 5);
        g.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        drop(a);
        assert!(b.recv::<ToSupervisor>().unwrap().is_none());
    }
}
