//! Micro-batching policy, generic over the item: the inference thread asks
//! for the next batch and gets whatever is queued, up to `max_batch`.
//!
//! Two policies:
//! - [`Policy::Adaptive`] (default): never waits while nothing more is on its
//!   way. After taking what is queued, it waits (at most `max_wait` after the
//!   first item) only while more items are still being decoded upstream
//!   ([`Inflow`]), so a lone request runs at once and a burst fills a batch.
//! - [`Policy::Fixed`]: after the first item, waits until the batch is full or
//!   `max_wait` has passed, whatever is upstream (the classic batcher, kept
//!   for comparison).
//!
//! Blocking API over a std channel: meant for a dedicated thread. No NATS,
//! no model inside.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How a batch is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Policy {
    /// Wait only while more items are on their way (see the module doc).
    #[default]
    Adaptive,
    /// Always wait up to `max_wait` for a full batch.
    Fixed,
}

/// Batching knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Largest batch.
    pub max_batch: usize,
    /// Longest wait after the first item of a batch.
    pub max_wait: Duration,
    /// Closing policy.
    pub policy: Policy,
}

/// Counts the items upstream of the batcher (received, still decoding).
#[derive(Debug, Clone, Default)]
pub struct Inflow(Arc<AtomicUsize>);

/// Marks one item upstream until dropped: drop it after the item was sent
/// to the batcher (or given up).
#[derive(Debug)]
pub struct InflowGuard(Arc<AtomicUsize>);

impl Inflow {
    /// Registers one item on its way.
    pub fn enter(&self) -> InflowGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        InflowGuard(self.0.clone())
    }

    /// Items currently on their way.
    pub fn pending(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for InflowGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Pulls batches from a channel under a [`BatchConfig`].
pub struct Batcher<T> {
    rx: Receiver<T>,
    inflow: Inflow,
    cfg: BatchConfig,
}

impl<T> Batcher<T> {
    /// A batcher reading `rx`, told about upstream work by `inflow`.
    pub fn new(rx: Receiver<T>, inflow: Inflow, cfg: BatchConfig) -> Self {
        Self { rx, inflow, cfg }
    }

    /// Blocks until at least one item is there, then fills `out` (cleared
    /// first) as the policy says. Returns false once every sender is gone and
    /// the channel is empty.
    pub fn next_batch(&mut self, out: &mut Vec<T>) -> bool {
        out.clear();
        let max = self.cfg.max_batch.max(1);
        match self.rx.recv() {
            Ok(first) => out.push(first),
            Err(_) => return false,
        }
        let deadline = Instant::now() + self.cfg.max_wait;
        while out.len() < max {
            // Take what is already queued.
            match self.rx.try_recv() {
                Ok(item) => {
                    out.push(item);
                    continue;
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            let wait = match self.cfg.policy {
                Policy::Fixed => true,
                Policy::Adaptive => self.inflow.pending() > 0,
            };
            let now = Instant::now();
            if !wait || now >= deadline {
                break;
            }
            // Wake up now and then to notice upstream work that failed and
            // will never arrive.
            let slice = (deadline - now).min(Duration::from_micros(500));
            match self.rx.recv_timeout(slice) {
                Ok(item) => out.push(item),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn cfg(max_batch: usize, wait_ms: u64, policy: Policy) -> BatchConfig {
        BatchConfig {
            max_batch,
            max_wait: Duration::from_millis(wait_ms),
            policy,
        }
    }

    #[test]
    fn size_trigger() {
        let (tx, rx) = channel();
        for i in 0..10 {
            tx.send(i).unwrap();
        }
        let mut b = Batcher::new(rx, Inflow::default(), cfg(4, 1000, Policy::Fixed));
        let mut out = Vec::new();
        let start = Instant::now();
        assert!(b.next_batch(&mut out));
        assert_eq!(out, vec![0, 1, 2, 3]);
        assert!(b.next_batch(&mut out));
        assert_eq!(out, vec![4, 5, 6, 7]);
        // A full batch never waits for the deadline.
        assert!(start.elapsed() < Duration::from_millis(900));
    }

    #[test]
    fn deadline_trigger_fixed() {
        let (tx, rx) = channel();
        tx.send(1).unwrap();
        let mut b = Batcher::new(rx, Inflow::default(), cfg(8, 30, Policy::Fixed));
        let mut out = Vec::new();
        let start = Instant::now();
        assert!(b.next_batch(&mut out));
        assert_eq!(out, vec![1]);
        assert!(start.elapsed() >= Duration::from_millis(30));
        drop(tx);
        assert!(!b.next_batch(&mut out));
    }

    #[test]
    fn adaptive_does_not_wait_when_nothing_is_upstream() {
        let (tx, rx) = channel();
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        let mut b = Batcher::new(rx, Inflow::default(), cfg(8, 10_000, Policy::Adaptive));
        let mut out = Vec::new();
        assert!(b.next_batch(&mut out));
        assert_eq!(out, vec![1, 2]);
    }

    #[test]
    fn adaptive_waits_for_items_still_upstream() {
        let (tx, rx) = channel();
        let inflow = Inflow::default();
        tx.send(1).unwrap();
        let guard = inflow.enter();
        let producer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(2).unwrap();
            drop(guard);
        });
        let mut b = Batcher::new(rx, inflow, cfg(8, 5_000, Policy::Adaptive));
        let mut out = Vec::new();
        assert!(b.next_batch(&mut out));
        assert_eq!(out, vec![1, 2]);
        producer.join().unwrap();
    }

    #[test]
    fn adaptive_stops_at_deadline() {
        let (tx, rx) = channel::<i32>();
        let inflow = Inflow::default();
        tx.send(1).unwrap();
        let _stuck = inflow.enter();
        let mut b = Batcher::new(rx, inflow, cfg(8, 20, Policy::Adaptive));
        let mut out = Vec::new();
        assert!(b.next_batch(&mut out));
        assert_eq!(out, vec![1]);
    }
}
