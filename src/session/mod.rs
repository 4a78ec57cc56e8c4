//! The restartable session: a supervisor owns the FUSE connection (and every descriptor a
//! client or another node would miss), a serving process answers it and can die or be
//! replaced without the kernel, the clients or other nodes noticing. See [`supervisor`] for
//! the whole picture, [`custody`] for what is kept, [`server`] for the take-over, [`ring`]
//! for the FUSE-over-io_uring transport (`transport=uring`).
//!
//! The filesystem ([`crate::fs`]) knows nothing of this beyond exporting and importing one
//! handle ([`crate::fs::Handle`]); the adapter ([`crate::fuse`]) hands each handle over
//! before the kernel hears of it.

pub mod custody;
pub mod proto;
pub mod registry;
pub mod ring;
pub mod server;
pub mod supervisor;
