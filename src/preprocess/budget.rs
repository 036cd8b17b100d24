//! The decode memory budget: every decode reserves the bytes its pixels
//! will take (read from the picture's header, at the real pixel type, with
//! the copies the conversion to RGB makes) before a pixel is decoded, and
//! gives them back when the picture is done. Decodes wait for room; a
//! picture larger than the whole budget is refused at once.
//!
//! Counting only, shared by the decoding threads; it allocates nothing.

use std::sync::{Arc, Condvar, Mutex};

/// Bytes all decodes together may hold; cheap to clone.
#[derive(Debug, Clone)]
pub struct DecodeBudget(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// Bytes reserved by one decode; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Option<Arc<Shared>>,
    bytes: u64,
}

impl Reservation {
    /// A reservation outside any budget.
    pub fn unbounded() -> Self {
        Self {
            budget: None,
            bytes: 0,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(shared) = &self.budget {
            let mut used = shared.used.lock().unwrap_or_else(|p| p.into_inner());
            *used = used.saturating_sub(self.bytes);
            shared.freed.notify_all();
        }
    }
}

impl DecodeBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        Self(Arc::new(Shared {
            total: total as u64,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }))
    }

    /// The whole budget in bytes.
    pub fn total(&self) -> u64 {
        self.0.total
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> u64 {
        *self.0.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `bytes`, blocking until that much is free; `None` when
    /// `bytes` is more than the whole budget (it would never fit).
    pub fn reserve(&self, bytes: u64) -> Option<Reservation> {
        if bytes > self.0.total {
            return None;
        }
        let mut used = self.0.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used + bytes > self.0.total {
            used = self.0.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += bytes;
        Some(Reservation {
            budget: Some(self.0.clone()),
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reservations_wait_for_room_and_give_back_on_drop() {
        let budget = DecodeBudget::new(100);
        assert!(
            budget.reserve(101).is_none(),
            "larger than the whole budget"
        );
        let a = budget.reserve(60).expect("fits");
        assert_eq!(budget.in_use(), 60);
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || budget.reserve(50).map(|r| r.bytes))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "waits while 60 of 100 are held");
        drop(a);
        assert_eq!(waiter.join().unwrap(), Some(50));
        assert_eq!(
            budget.in_use(),
            0,
            "the waiter's reservation was dropped too"
        );
    }
}
