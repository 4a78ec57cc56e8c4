//! What the supervisor and a serving process say to each other: JSON messages on a
//! `SOCK_SEQPACKET` socket pair (one message per packet), descriptors attached with
//! `SCM_RIGHTS`. The supervisor treats records as opaque: it stores them with their
//! descriptors by key and gives them all to the next serving process.
//!
//! The supervisor reads its end lazily: while records keep coming it takes them in batches
//! every [`LINGER`], so a burst of opens does not wake it once per open (on a small VM a
//! cross-CPU wake-up costs more than the message). Nothing waits on that: a message is
//! safe once `send` returns (the socket holds it, descriptors included, until read, and
//! the supervisor reads everything before it replaces a dead server). What does wait (a
//! lock's `Del` that wants its `Ack`, or a full socket) rings the doorbell: a second
//! socket pair whose far end the server hands over with [`ToSupervisor::Doorbell`].

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;
use std::time::Duration;

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
    /// Carries the supervisor's end of the doorbell (see the module comment): from now on
    /// the supervisor may read lazily. A supervisor older than this message logs it as a
    /// bad message and keeps reading at once, as it always did.
    Doorbell,
}

/// How long the supervisor lets records gather while they keep coming.
pub const LINGER: Duration = Duration::from_millis(5);

/// What the supervisor's end of the doorbell said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bell {
    /// No ring within the pause.
    Quiet,
    /// Rung (every ring waiting is taken).
    Rung,
    /// The server's end is closed: it is exiting.
    Closed,
}

/// Wait up to `pause` on the supervisor's end of the doorbell, and take every ring waiting.
pub fn wait_for_ring(bell: BorrowedFd<'_>, pause: Duration) -> Bell {
    match sys::poll_readable(&[bell], Some(pause)) {
        Ok(ready) if ready.first() == Some(&true) => {}
        _ => return Bell::Quiet,
    }
    let mut buf = [0u8; 16];
    loop {
        match sys::try_recv_with_fds(bell, &mut buf) {
            Ok((0, fds)) if fds.is_empty() => return Bell::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Bell::Rung,
            Err(_) => return Bell::Closed,
        }
    }
}

/// Largest message.
const MAX_MESSAGE: usize = 256 * 1024;

/// One end of the socket pair.
#[derive(Debug)]
pub struct Link {
    fd: OwnedFd,
    /// The server's end of the doorbell, once installed.
    bell: OnceLock<OwnedFd>,
}

impl Link {
    pub fn new(fd: OwnedFd) -> Link {
        Link {
            fd,
            bell: OnceLock::new(),
        }
    }

    /// The server's side: make the doorbell and hand its far end to the supervisor.
    pub fn install_doorbell(&self) -> io::Result<()> {
        if self.bell.get().is_some() {
            return Ok(());
        }
        let (mine, theirs) = sys::seqpacket_pair()?;
        self.send(&ToSupervisor::Doorbell, &[theirs.as_fd()])?;
        let _ = self.bell.set(mine);
        Ok(())
    }

    /// Wake the supervisor now (no-op without a doorbell; a ring already pending is enough).
    pub fn ring(&self) {
        if let Some(b) = self.bell.get() {
            let _ = sys::try_send_with_fds(b.as_fd(), b"!", &[]);
        }
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
        match sys::try_send_with_fds(self.fd.as_fd(), &data, fds) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The supervisor is letting messages gather and the socket is full.
                self.ring();
                sys::send_with_fds(self.fd.as_fd(), &data, fds)
            }
            r => r,
        }
    }

    /// `send`, then ring: for what the supervisor should see now.
    pub fn send_now<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let r = self.send(msg, fds);
        self.ring();
        r
    }

    /// Whether a message (or the peer's end of file) is waiting, within `timeout`.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        Ok(sys::poll_readable(&[self.fd.as_fd()], Some(timeout))?[0])
    }

    /// The next message; `None` when the peer has closed its end.
    pub fn recv<T: DeserializeOwned>(&self) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
        self.recv_how(false)
    }

    /// The next message if one is queued (`WouldBlock` if none).
    pub fn try_recv<T: DeserializeOwned>(&self) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
        self.recv_how(true)
    }

    fn recv_how<T: DeserializeOwned>(&self, nowait: bool) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
        // One buffer per thread, reused: a fresh one per message would cost more than the
        // message (the supervisor takes one per open and close).
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            if buf.len() < MAX_MESSAGE {
                buf.resize(MAX_MESSAGE, 0);
            }
            let (n, fds) = if nowait {
                sys::try_recv_with_fds(self.fd.as_fd(), buf)?
            } else {
                sys::recv_with_fds(self.fd.as_fd(), buf)?
            };
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

    #[test]
    fn the_doorbell_rings_for_urgent_messages_and_when_the_socket_is_full() {
        let (server, sup) = Link::pair().unwrap();
        server.install_doorbell().unwrap();
        let (m, mut fds) = sup.recv::<ToSupervisor>().unwrap().unwrap();
        assert!(matches!(m, ToSupervisor::Doorbell));
        let bell = fds.pop().expect("the doorbell's far end");
        // A plain message does not ring; an urgent one does.
        server.send(&ToSupervisor::Serving, &[]).unwrap();
        assert_eq!(wait_for_ring(bell.as_fd(), Duration::ZERO), Bell::Quiet);
        server.send_now(&ToSupervisor::Drained, &[]).unwrap();
        assert_eq!(wait_for_ring(bell.as_fd(), Duration::ZERO), Bell::Rung);
        assert!(matches!(
            sup.try_recv::<ToSupervisor>().unwrap(),
            Some((ToSupervisor::Serving, _))
        ));
        assert!(matches!(
            sup.try_recv::<ToSupervisor>().unwrap(),
            Some((ToSupervisor::Drained, _))
        ));
        let e = sup.try_recv::<ToSupervisor>().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);

        // Far more records than the socket holds: the sender rings once it is full, and
        // every record arrives, in order, once the reader takes them.
        const N: usize = 20_000;
        let sender = std::thread::spawn(move || {
            let f = tempfile::tempfile().unwrap();
            for i in 0..N {
                let msg = ToSupervisor::Put {
                    key: format!("f/{i}"),
                    rec: serde_json::json!({ "i": i }),
                };
                server.send(&msg, &[f.as_fd()]).unwrap();
            }
            server
        });
        assert_eq!(
            wait_for_ring(bell.as_fd(), Duration::from_secs(60)),
            Bell::Rung,
            "a sender blocked on a full socket must ring"
        );
        for i in 0..N {
            let (m, fds) = sup.recv::<ToSupervisor>().unwrap().unwrap();
            match m {
                ToSupervisor::Put { key, .. } => assert_eq!(key, format!("f/{i}")),
                other => panic!("unexpected {other:?}"),
            }
            assert_eq!(fds.len(), 1);
        }
        drop(sender.join().unwrap());
        // The server's end is gone: the doorbell reads end of file.
        assert_eq!(
            wait_for_ring(bell.as_fd(), Duration::from_secs(60)),
            Bell::Closed
        );
        assert!(sup.recv::<ToSupervisor>().unwrap().is_none());
    }
}
