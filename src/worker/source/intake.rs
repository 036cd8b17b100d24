//! The bound on what a worker holds unanswered (PROTOCOL §4): at most
//! `max_requests` requests and `max_bytes` bytes of request payload, from
//! the moment a request is taken to the moment its answer is out.
//!
//! Core NATS mode asks with [`Intake::try_admit`] and drops what does not
//! fit; JetStream mode waits with [`Intake::admit`] (the stream holds the
//! rest). Counting only: no NATS, no metrics here.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How much a worker may hold unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeLimits {
    /// Requests taken and not yet answered.
    pub max_requests: usize,
    /// Payload bytes of those requests.
    pub max_bytes: usize,
}

impl IntakeLimits {
    /// Messages the NATS client may buffer for the request subscription
    /// before the intake loop takes them: one per 8 KiB of the byte bound
    /// (8,192 at the default 64 MiB), at least `max_requests`. The loop takes
    /// or drops each message as soon as it is read; the buffer only absorbs
    /// what the client reads from the socket in one go during a burst.
    pub fn client_buffer(&self) -> usize {
        (self.max_bytes / 8192)
            .min(65_536)
            .max(self.max_requests.max(64))
    }

    /// The default bound for a batch size: eight batches, 64 MiB.
    pub fn for_batch(max_batch: usize) -> Self {
        Self {
            max_requests: max_batch.max(1) * 8,
            max_bytes: 64 << 20,
        }
    }
}

/// The shared counters of the bound.
#[derive(Debug, Clone)]
pub struct Intake {
    requests: Arc<Semaphore>,
    kib: Arc<Semaphore>,
    max_requests: usize,
    max_kib: u32,
}

/// One request's share of the bound; released when dropped.
#[derive(Debug)]
pub struct Held {
    _request: Option<OwnedSemaphorePermit>,
    _kib: Option<OwnedSemaphorePermit>,
}

impl Held {
    /// A share of nothing, for a request taken outside any bound (tests).
    pub fn nothing() -> Self {
        Self {
            _request: None,
            _kib: None,
        }
    }

    /// Gives the share back now, before the holder is dropped (a request
    /// whose answer is on its way out).
    pub fn give_back(&mut self) {
        *self = Self::nothing();
    }
}

impl Intake {
    /// A bound of `limits` (each at least one request and one KiB).
    pub fn new(limits: IntakeLimits) -> Self {
        let max_kib = kib(limits.max_bytes).max(1);
        let max_requests = limits.max_requests.max(1);
        Self {
            requests: Arc::new(Semaphore::new(max_requests)),
            kib: Arc::new(Semaphore::new(max_kib as usize)),
            max_requests,
            max_kib,
        }
    }

    /// What a payload of `len` bytes costs: its size in KiB, rounded up, at
    /// most the whole byte bound (so one oversized request can still be
    /// taken, alone, and answered).
    fn cost(&self, len: usize) -> u32 {
        kib(len).clamp(1, self.max_kib)
    }

    /// Takes a share for a payload of `len` bytes if the bound has room now.
    pub fn try_admit(&self, len: usize) -> Option<Held> {
        let request = self.requests.clone().try_acquire_owned().ok()?;
        let kib = self
            .kib
            .clone()
            .try_acquire_many_owned(self.cost(len))
            .ok()?;
        Some(Held {
            _request: Some(request),
            _kib: Some(kib),
        })
    }

    /// Takes a share for a payload of `len` bytes, waiting for room.
    pub async fn admit(&self, len: usize) -> Held {
        let request = self.requests.clone().acquire_owned().await.ok();
        let kib = self
            .kib
            .clone()
            .acquire_many_owned(self.cost(len))
            .await
            .ok();
        Held {
            _request: request,
            _kib: kib,
        }
    }

    /// Requests held now.
    pub fn held_requests(&self) -> usize {
        self.max_requests - self.requests.available_permits()
    }
}

fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_and_bytes_and_gives_back_on_drop() {
        let limits = IntakeLimits {
            max_requests: 3,
            max_bytes: 10 * 1024,
        };
        let intake = Intake::new(limits);
        let a = intake.try_admit(4 * 1024).expect("room");
        let b = intake.try_admit(4 * 1024).expect("room");
        assert!(intake.try_admit(4 * 1024).is_none(), "bytes are full");
        let c = intake.try_admit(100).expect("a small one fits");
        assert_eq!(intake.held_requests(), 3);
        assert!(intake.try_admit(1).is_none(), "requests are full");
        drop((a, b, c));
        assert_eq!(intake.held_requests(), 0);
        let big = intake.try_admit(1 << 30).expect("an oversized one alone");
        assert!(intake.try_admit(1).is_none(), "it takes the whole bound");
        drop(big);
        let mut one = intake.try_admit(1).expect("room again");
        assert_eq!(intake.held_requests(), 1);
        one.give_back();
        assert_eq!(intake.held_requests(), 0, "given back before the drop");
        drop(one);
        assert_eq!(intake.held_requests(), 0);
    }

    #[tokio::test]
    async fn admit_waits_for_room() {
        let intake = Intake::new(IntakeLimits {
            max_requests: 1,
            max_bytes: 1 << 20,
        });
        let first = intake.admit(10).await;
        let waiting = {
            let intake = intake.clone();
            tokio::spawn(async move { intake.admit(10).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(1), waiting).await;
        assert!(second.is_ok(), "admitted once the first was released");
    }
}
