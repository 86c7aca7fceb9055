//! Agent polling: every `interval` (jittered) Fulcrum connects to the agent on the backend's
//! IP and `[pools.NAME.agent] port`, sends nothing, reads one line in HAProxy's agent-check
//! protocol, and applies it to the backend: the weight percent as the external factor of the
//! effective weight, and the state (up, drain, maint, down).
//!
//! As in HAProxy, the administrative state (`ready`, `drain`, `maint`) and the operational
//! state (`up`, `down`, `fail`, `stopped`) are kept apart and each stays as it is until the
//! agent names it again; words an agent does not say change nothing. An agent that cannot be
//! reached or answers nonsense leaves its last report in force (the active checks judge
//! reachability).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::jittered;
use crate::pool::{AgentVerdict, Backend};
use crate::runtime::events::EventLog;
use crate::wire::agent_line::{
    cpu_from_comment, parse_reply, AdminWord, AgentLineError, AgentReply, OpWord,
};

/// Longest agent line read; anything after it is ignored.
const MAX_LINE: usize = 1024;

/// Why a poll gave nothing to apply.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Connect or read failed.
    #[error("agent unreachable: {0}")]
    Io(std::io::Error),
    /// No complete answer in time.
    #[error("agent gave no answer within {0:?}")]
    Timeout(Duration),
    /// The line is not an agent-check answer.
    #[error(transparent)]
    Line(#[from] AgentLineError),
}

/// What the agent has said so far about one backend: each part stays until said again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentView {
    /// Weight percent (0..=100).
    pub percent: u8,
    /// Administrative state.
    pub admin: AdminWord,
    /// Operational state.
    pub op: OpWord,
}

impl Default for AgentView {
    fn default() -> Self {
        AgentView {
            percent: 100,
            admin: AdminWord::Ready,
            op: OpWord::Up,
        }
    }
}

impl AgentView {
    /// Applies the words of `reply` (weight above 100% is capped at the configured weight).
    pub fn apply(&mut self, reply: &AgentReply) {
        if let Some(percent) = reply.percent {
            self.percent = percent.min(100) as u8;
        }
        if let Some(admin) = reply.admin {
            self.admin = admin;
        }
        if let Some(op) = reply.op {
            self.op = op;
        }
    }

    /// The one verdict the balancer uses: maint, then down, then drain, else up.
    pub fn verdict(&self) -> AgentVerdict {
        match (self.admin, self.op) {
            (AdminWord::Maint, _) => AgentVerdict::Maint,
            (_, OpWord::Down) => AgentVerdict::Down,
            (AdminWord::Drain, _) => AgentVerdict::Drain,
            _ => AgentVerdict::Up,
        }
    }
}

/// Connects to the agent at `address`, sends nothing, and reads its line (until a newline,
/// the end of the stream or [`MAX_LINE`] bytes), all within `timeout`.
pub async fn poll_once(address: SocketAddr, timeout: Duration) -> Result<String, AgentError> {
    let read = async {
        let mut stream = TcpStream::connect(address).await?;
        let mut buffer = Vec::with_capacity(128);
        let mut chunk = [0u8; 256];
        loop {
            let n = stream.read(&mut chunk).await?;
            buffer.extend_from_slice(&chunk[..n]);
            if n == 0 || buffer.contains(&b'\n') || buffer.len() >= MAX_LINE {
                break;
            }
        }
        buffer.truncate(MAX_LINE);
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buffer).into_owned())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| AgentError::Timeout(timeout))?
        .map_err(AgentError::Io)
}

/// Polls the agent of `backend` (its IP, `port`) every `interval` until the task is aborted,
/// applying every answer and recording an event for every change, and once when the agent
/// stops answering (its last report stays in force) and when it answers again.
pub async fn run_agent(
    backend: Backend,
    pool: String,
    events: Arc<EventLog>,
    port: u16,
    interval: Duration,
    timeout: Duration,
) {
    let address = SocketAddr::new(backend.address.ip(), port);
    let mut view = AgentView {
        percent: backend.agent_percent(),
        ..AgentView::default()
    };
    let mut failing = false;
    loop {
        match poll_once(address, timeout)
            .await
            .and_then(|t| parse_reply(&t).map_err(AgentError::from))
        {
            Ok(reply) => {
                if failing {
                    failing = false;
                    events.record(
                        "agent_reachable",
                        Some(&pool),
                        Some(&backend.id),
                        format!("backend {} agent at {address} answers again", backend.id),
                    );
                }
                if !reply.unknown.is_empty() {
                    tracing::debug!(pool = %pool, backend = %backend.id, words = ?reply.unknown, "agent words ignored");
                }
                let before = (backend.agent_percent(), backend.agent_verdict());
                view.apply(&reply);
                backend.set_agent_cpu(reply.comment.as_deref().and_then(cpu_from_comment));
                if backend.set_agent(Some(view.percent), Some(view.verdict())) {
                    let comment = reply
                        .comment
                        .as_deref()
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default();
                    events.record(
                        "agent",
                        Some(&pool),
                        Some(&backend.id),
                        format!(
                            "backend {} agent: {}% {} (was {}% {}){comment}",
                            backend.id,
                            view.percent,
                            view.verdict().name(),
                            before.0,
                            before.1.name()
                        ),
                    );
                }
            }
            Err(error) => {
                if !failing {
                    failing = true;
                    events.record(
                        "agent_unreachable",
                        Some(&pool),
                        Some(&backend.id),
                        format!(
                            "backend {} {error}; its last report ({}% {}) stays in force",
                            backend.id,
                            backend.agent_percent(),
                            backend.agent_verdict().name()
                        ),
                    );
                } else {
                    tracing::debug!(pool = %pool, backend = %backend.id, %error, "agent poll failed");
                }
            }
        }
        tokio::time::sleep(jittered(interval)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_keeps_what_was_not_said_again() {
        let mut view = AgentView::default();
        view.apply(&parse_reply("50%").unwrap());
        assert_eq!((view.percent, view.verdict()), (50, AgentVerdict::Up));
        view.apply(&parse_reply("drain").unwrap());
        assert_eq!((view.percent, view.verdict()), (50, AgentVerdict::Drain));
        // `up` is the operational state: it does not cancel drain; `ready` does.
        view.apply(&parse_reply("up").unwrap());
        assert_eq!(view.verdict(), AgentVerdict::Drain);
        view.apply(&parse_reply("down").unwrap());
        assert_eq!(view.verdict(), AgentVerdict::Down);
        view.apply(&parse_reply("maint").unwrap());
        assert_eq!(view.verdict(), AgentVerdict::Maint);
        view.apply(&parse_reply("ready").unwrap());
        assert_eq!(view.verdict(), AgentVerdict::Down);
        view.apply(&parse_reply("200% up").unwrap());
        assert_eq!((view.percent, view.verdict()), (100, AgentVerdict::Up));
    }

    #[tokio::test]
    async fn polls_a_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"42% drain\n").await.unwrap();
        });
        let line = poll_once(address, Duration::from_secs(5)).await.unwrap();
        assert_eq!(parse_reply(&line).unwrap().percent, Some(42));
    }
}
