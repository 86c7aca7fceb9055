//! A bounded log of recent control-plane events (membership, health, reloads), shown by the
//! admin API. Every event is also written to the log. Control plane only: never touched per
//! request, so a mutex is fine here.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How many events are kept (older ones are dropped).
const DEFAULT_CAPACITY: usize = 1000;

/// One thing that happened (the admin API's wire form is `control::api::Event`).
#[derive(Debug, Clone)]
pub struct Event {
    /// Sequence number, increasing from 1.
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What kind of event: "backend_added", "backend_removed", "health", "reload", ...
    pub kind: &'static str,
    /// The pool concerned, if any.
    pub pool: Option<String>,
    /// The backend concerned, if any.
    pub backend: Option<String>,
    /// Human-readable detail.
    pub message: String,
}

/// The event log.
#[derive(Debug)]
pub struct EventLog {
    inner: Mutex<(u64, VecDeque<Event>)>,
    capacity: usize,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            inner: Mutex::new((0, VecDeque::new())),
            capacity: DEFAULT_CAPACITY,
        }
    }
}

impl EventLog {
    /// Records an event and logs it at info level.
    pub fn record(
        &self,
        kind: &'static str,
        pool: Option<&str>,
        backend: Option<&str>,
        message: impl Into<String>,
    ) {
        let message = message.into();
        tracing::info!(
            event = kind,
            pool = pool.unwrap_or(""),
            backend = backend.unwrap_or(""),
            "{message}"
        );
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.0 += 1;
        let id = inner.0;
        if inner.1.len() == self.capacity {
            inner.1.pop_front();
        }
        inner.1.push_back(Event {
            id,
            at_ms,
            kind,
            pool: pool.map(str::to_string),
            backend: backend.map(str::to_string),
            message,
        });
    }

    /// The last `limit` events, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<Event> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let skip = inner.1.len().saturating_sub(limit);
        inner.1.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_events() {
        let log = EventLog {
            capacity: 3,
            ..EventLog::default()
        };
        for i in 0..5 {
            log.record("test", Some("p"), None, format!("event {i}"));
        }
        let recent = log.recent(10);
        assert_eq!(recent.len(), 3);
        assert_eq!(recent[0].message, "event 2");
        assert_eq!(recent[2].id, 5);
        assert_eq!(log.recent(1)[0].message, "event 4");
    }
}
