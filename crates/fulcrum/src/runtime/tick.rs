//! A periodic tick for connection tasks that costs next to nothing on the wake-ups it does
//! not fire at.
//!
//! A connection task selects between its I/O and a housekeeping tick (park an idle HTTP/1
//! connection, judge a TCP session idle). With `tokio::time::Interval` every wake-up of the task,
//! several per request, polls the interval and its timer entry (callgrind: ~300 instructions
//! per poll). A [`Ticker`] polls its timer only when the timer is not armed yet, or has fired.
//! The timer keeps the task's waker from its last poll, and a task's waker does not change, so
//! skipping the poll in between loses nothing.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Fires every `period`; a late tick delays the next ones (like `MissedTickBehavior::Delay`).
#[derive(Debug)]
pub struct Ticker {
    sleep: Pin<Box<Sleep>>,
    period: Duration,
    /// The timer holds this task's waker and has not fired yet.
    armed: bool,
}

impl Ticker {
    /// A ticker whose first tick is `period` from now.
    pub fn new(period: Duration) -> Self {
        Ticker {
            sleep: Box::pin(tokio::time::sleep(period)),
            period,
            armed: false,
        }
    }

    /// Ready once per period. Call it from one task only (the one whose waker it keeps).
    pub fn poll_tick(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.armed && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let next = Instant::now() + self.period;
                self.sleep.as_mut().reset(next);
                self.armed = false;
                Poll::Ready(())
            }
            Poll::Pending => {
                self.armed = true;
                Poll::Pending
            }
        }
    }

    /// The next tick, as a future (for `select!`).
    pub fn tick(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_tick(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_once_per_period_and_not_in_between() {
        let started = Instant::now();
        let mut ticker = Ticker::new(Duration::from_millis(100));
        for n in 1..=3u32 {
            ticker.tick().await;
            assert_eq!(started.elapsed(), Duration::from_millis(100) * n);
        }
        // Polled in between (as other wake-ups of the task do), it stays pending.
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(ticker.poll_tick(&mut cx).is_pending());
        assert!(ticker.poll_tick(&mut cx).is_pending());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(ticker.poll_tick(&mut cx).is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_tick_delays_the_next() {
        let started = Instant::now();
        let mut ticker = Ticker::new(Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(250)).await;
        ticker.tick().await;
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        ticker.tick().await;
        assert_eq!(started.elapsed(), Duration::from_millis(350));
    }
}
