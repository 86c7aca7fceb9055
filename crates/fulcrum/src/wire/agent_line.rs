//! HAProxy's agent-check line, both ways: [`parse_reply`] reads what an agent answers (as
//! Fulcrum's poller does), [`write_line`] renders what `fulcrum agent` says. Words are
//! separated by spaces, tabs or commas, in any order and any case; `#` starts a comment.

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

/// Why a line is not an agent-check answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentLineError {
    /// The line held no word of the protocol (its first 80 characters).
    #[error("agent answer has no agent-check word: {0:?}")]
    NoWord(String),
}

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
pub fn parse_reply(text: &str) -> Result<AgentReply, AgentLineError> {
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
        Err(AgentLineError::NoWord(line.chars().take(80).collect()))
    }
}

/// Renders one agent-check line: the weight percent, the administrative word, the operational
/// word when there is one (none in maintenance), and `#reason` with control characters
/// replaced by spaces, so the line stays one line.
pub fn write_line(percent: u8, admin: AdminWord, op: Option<OpWord>, reason: &str) -> String {
    let admin = match admin {
        AdminWord::Ready => "ready",
        AdminWord::Drain => "drain",
        AdminWord::Maint => "maint",
    };
    let op = match op {
        Some(OpWord::Up) => " up",
        Some(OpWord::Down) => " down",
        None => "",
    };
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("{percent}% {admin}{op} #{reason}\n")
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
    fn written_lines_read_back_as_written() {
        let admins = [AdminWord::Ready, AdminWord::Drain, AdminWord::Maint];
        let ops = [Some(OpWord::Up), Some(OpWord::Down), None];
        for percent in [0u8, 1, 50, 100, 255] {
            for admin in admins {
                for op in ops {
                    let line = write_line(percent, admin, op, "cpu 62% mem\n40%\r");
                    assert!(
                        line.ends_with('\n') && line.matches('\n').count() == 1,
                        "{line:?}"
                    );
                    let reply = parse_reply(&line).unwrap();
                    assert_eq!(reply.percent, Some(u32::from(percent)), "{line:?}");
                    assert_eq!(reply.admin, Some(admin), "{line:?}");
                    assert_eq!(reply.op, op, "{line:?}");
                    assert_eq!(
                        reply.comment.as_deref(),
                        Some("cpu 62% mem 40%"),
                        "{line:?}"
                    );
                    assert_eq!(
                        cpu_from_comment(reply.comment.as_deref().unwrap()),
                        Some(62)
                    );
                    assert!(reply.unknown.is_empty());
                }
            }
        }
    }
}
