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

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::jittered;
use crate::events::EventLog;
use crate::pool::{AgentVerdict, Backend};

/// Longest agent line read; anything after it is ignored.
const MAX_LINE: usize = 1024;

/// The administrative word of an agent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminWord {
    /// `ready`: cancels drain and maint.
    Ready,
    /// `drain`: no new traffic.
    Drain,
    /// `maint`: no traffic.
    Maint,
}

/// The operational word of an agent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpWord {
    /// `up`.
    Up,
    /// `down`, `fail` or `stopped`.
    Down,
}

/// One parsed agent line. Fields are `None` when the agent did not say them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentReply {
    /// `N%`: weight relative to the configured weight (HAProxy allows up to 256).
    pub percent: Option<u32>,
    /// `ready`, `drain` or `maint`.
    pub admin: Option<AdminWord>,
    /// `up`, `down`, `fail` or `stopped`.
    pub op: Option<OpWord>,
    /// `maxconn:N` (understood, not applied: Fulcrum has no per-backend connection cap).
    pub maxconn: Option<u32>,
    /// The text after `#`.
    pub comment: Option<String>,
    /// Words not understood (ignored, as HAProxy does).
    pub unknown: Vec<String>,
}

/// Why a poll gave nothing to apply.
#[derive(Debug)]
pub enum AgentError {
    /// Connect or read failed.
    Io(std::io::Error),
    /// No complete answer in time.
    Timeout(Duration),
    /// The line held no word of the protocol.
    NoWord(String),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Io(e) => write!(f, "agent unreachable: {e}"),
            AgentError::Timeout(d) => write!(f, "agent gave no answer within {d:?}"),
            AgentError::NoWord(line) => {
                write!(f, "agent answer has no agent-check word: {line:?}")
            }
        }
    }
}

impl std::error::Error for AgentError {}

/// The CPU use an agent mentions in its comment, as `fulcrum agent` does (`cpu 62%`, also
/// `cpu=62%` or `cpu:62`); None when the comment names none.
pub fn cpu_from_comment(comment: &str) -> Option<u8> {
    let lower = comment.to_ascii_lowercase();
    let at = lower.find("cpu")?;
    let rest = lower[at + 3..].trim_start_matches([' ', '=', ':']);
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let value: f64 = digits.parse().ok()?;
    (0.0..=100.0).contains(&value).then(|| value.round() as u8)
}

/// Parses one agent line: words separated by spaces, tabs or commas, in any order and any
/// case; `#` starts a comment that runs to the end of the line; only the first line counts.
pub fn parse_reply(text: &str) -> Result<AgentReply, AgentError> {
    let line = text.split(['\n', '\r']).next().unwrap_or_default();
    let (words, comment) = match line.split_once('#') {
        Some((words, comment)) => (words, Some(comment.trim())),
        None => (line, None),
    };
    let mut reply = AgentReply {
        comment: comment.filter(|c| !c.is_empty()).map(str::to_string),
        ..AgentReply::default()
    };
    let mut known = false;
    for word in words.split([' ', '\t', ',']).filter(|w| !w.is_empty()) {
        let lower = word.to_ascii_lowercase();
        let mut matched = true;
        match lower.as_str() {
            "ready" => reply.admin = Some(AdminWord::Ready),
            "drain" => reply.admin = Some(AdminWord::Drain),
            "maint" => reply.admin = Some(AdminWord::Maint),
            "up" => reply.op = Some(OpWord::Up),
            "down" | "fail" | "stopped" => reply.op = Some(OpWord::Down),
            _ => {
                if let Some(n) = lower.strip_suffix('%').and_then(|n| n.parse::<u32>().ok()) {
                    reply.percent = Some(n);
                } else if let Some(n) = lower
                    .strip_prefix("maxconn:")
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    reply.maxconn = Some(n);
                } else {
                    matched = false;
                    reply.unknown.push(word.to_string());
                }
            }
        }
        known |= matched;
    }
    if known {
        Ok(reply)
    } else {
        Err(AgentError::NoWord(line.chars().take(80).collect()))
    }
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
            .and_then(|t| parse_reply(&t))
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
    fn cpu_figure_is_read_from_the_comment() {
        assert_eq!(cpu_from_comment("cpu 62% mem 40% disk 31%"), Some(62));
        assert_eq!(cpu_from_comment("mem 93% CPU=7.6%"), Some(8));
        assert_eq!(cpu_from_comment("cpu:100"), Some(100));
        assert_eq!(cpu_from_comment("mem 93%"), None);
        assert_eq!(cpu_from_comment("cpu high"), None);
        assert_eq!(cpu_from_comment("cpu 250%"), None);
    }

    #[test]
    fn parses_weight_state_and_comment() {
        let r = parse_reply("75% up\n").unwrap();
        assert_eq!(r.percent, Some(75));
        assert_eq!(r.op, Some(OpWord::Up));
        assert_eq!(r.admin, None);
        let r = parse_reply("drain,50%  maxconn:30\tUP #mem 93%\r\n").unwrap();
        assert_eq!(r.percent, Some(50));
        assert_eq!(r.admin, Some(AdminWord::Drain));
        assert_eq!(r.op, Some(OpWord::Up));
        assert_eq!(r.maxconn, Some(30));
        assert_eq!(r.comment.as_deref(), Some("mem 93%"));
    }

    #[test]
    fn down_synonyms_and_admin_words() {
        for word in ["down", "FAIL", "stopped"] {
            assert_eq!(parse_reply(word).unwrap().op, Some(OpWord::Down));
        }
        assert_eq!(parse_reply("maint").unwrap().admin, Some(AdminWord::Maint));
        assert_eq!(parse_reply("Ready").unwrap().admin, Some(AdminWord::Ready));
        let r = parse_reply("down #process gone").unwrap();
        assert_eq!(r.comment.as_deref(), Some("process gone"));
    }

    #[test]
    fn unknown_words_are_ignored_but_nonsense_is_refused() {
        let r = parse_reply("50% frobnicate").unwrap();
        assert_eq!(r.percent, Some(50));
        assert_eq!(r.unknown, vec!["frobnicate".to_string()]);
        assert!(parse_reply("").is_err());
        assert!(parse_reply("HTTP/1.1 400 Bad Request\r\n").is_err());
        assert!(parse_reply("#only a comment").is_err());
        assert!(parse_reply("x%").is_err());
        // Only the first line counts.
        assert!(parse_reply("\nup").is_err());
    }

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
