//! The reload stage (PROTOCOL §5): any message on the reload subject, or a
//! change of the weights file (atomic renames included, polled), makes the
//! [`ModelSlot`] load the weights again.
//!
//! It only triggers; loading, validating and swapping are the slot's job.

use std::time::Duration;

use futures::StreamExt;

use super::model_slot::{ModelSlot, ReloadOutcome, file_stamp};

/// Watches `control` and the weights file every `interval` (zero: the file
/// is not watched) until the subscription ends.
pub async fn watch(slot: ModelSlot, mut control: async_nats::Subscriber, interval: Duration) {
    let mut last = file_stamp(slot.path());
    let mut ticker = tokio::time::interval(if interval.is_zero() {
        Duration::from_secs(3600)
    } else {
        interval
    });
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = control.next() => {
                if msg.is_none() {
                    return;
                }
                tracing::info!("reload requested on the control subject");
                let _ = slot.reload().await;
                last = file_stamp(slot.path());
            }
            _ = ticker.tick(), if !interval.is_zero() => {
                let now = file_stamp(slot.path());
                if now.is_some() && now != last {
                    // Let a writer that writes in place finish first.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    last = file_stamp(slot.path());
                    if let ReloadOutcome::Rejected(_) = slot.reload().await {
                        // Keep `last`: the same bad file is not retried until it changes.
                    }
                }
            }
        }
    }
}
