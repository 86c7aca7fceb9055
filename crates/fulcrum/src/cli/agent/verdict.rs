//! The agent's verdict: a pure function of the sampled figures and the thresholds, and its
//! rendering as one line of HAProxy's agent-check protocol.

use serde::Serialize;

use crate::wire::agent_line::{write_line, AdminWord, OpWord};

/// When the advertised weight falls and when the host asks for no new traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// CPU use (percent) above which the weight falls linearly, down to `min_weight` at
    /// 100% CPU. 100 or more: CPU never lowers the weight.
    pub cpu_weight_from: f64,
    /// Memory use (percent) above which the weight falls linearly, down to `min_weight` at
    /// 100% memory. 100 or more: memory never lowers the weight.
    pub mem_weight_from: f64,
    /// The lowest weight percent advertised because of load.
    pub min_weight: u8,
    /// The highest weight percent advertised (a smaller host may advertise less).
    pub max_weight: u8,
    /// Memory use (percent) above which the host asks to drain.
    pub mem_drain: f64,
    /// Disk use (percent) above which the host asks to drain.
    pub disk_drain: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            cpu_weight_from: 50.0,
            mem_weight_from: 70.0,
            min_weight: 10,
            max_weight: 100,
            mem_drain: 90.0,
            disk_drain: 90.0,
        }
    }
}

/// What the agent knows about its host at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Figures {
    /// CPU use over the last sample interval, percent of all cores.
    pub cpu_percent: f64,
    /// Memory in use (total less available), percent.
    pub memory_percent: f64,
    /// Use of the watched disk, percent (none when it could not be read).
    pub disk_percent: Option<f64>,
    /// Why the check command last failed (none: it passed, or there is none).
    pub check_failure: Option<String>,
    /// Why the host is in maintenance (none: it is not).
    pub maint: Option<String>,
    /// Why an operator asked to drain the host (none: no one did).
    pub drain: Option<String>,
}

/// The state the agent asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Take traffic.
    Up,
    /// No new traffic (asked by an operator, or memory or disk above its limit).
    Drain,
    /// No traffic: the check command failed.
    Down,
    /// No traffic: an operator put the host in maintenance.
    Maint,
}

impl State {
    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Drain => "drain",
            State::Down => "down",
            State::Maint => "maint",
        }
    }
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Weight percent to advertise.
    pub weight_percent: u8,
    /// The state asked for.
    pub state: State,
    /// Why, in a few words (the line's `#comment`).
    pub reason: String,
}

/// 100 while `used` is at most `from`, then falling linearly to `floor` at 100% use.
fn falloff(used: f64, from: f64, floor: f64) -> f64 {
    if from >= 100.0 || !used.is_finite() || used <= from {
        return 100.0;
    }
    let fraction = ((used - from) / (100.0 - from)).min(1.0);
    100.0 - fraction * (100.0 - floor)
}

/// Decides the weight and state from the figures: maintenance wins over a failed check
/// command, which wins over drain (asked by an operator, or memory or disk above its limit);
/// the weight is the lower of
/// the CPU and memory fall-offs, between `min_weight` and `max_weight`.
pub fn decide(figures: &Figures, thresholds: &Thresholds) -> Verdict {
    let floor = f64::from(thresholds.min_weight.min(100));
    let load = falloff(figures.cpu_percent, thresholds.cpu_weight_from, floor).min(falloff(
        figures.memory_percent,
        thresholds.mem_weight_from,
        floor,
    ));
    let weight_percent = (load.round() as u8)
        .max(thresholds.min_weight)
        .min(thresholds.max_weight.min(100));
    let (state, reason) = if let Some(why) = &figures.maint {
        (State::Maint, why.clone())
    } else if let Some(why) = &figures.check_failure {
        (State::Down, why.clone())
    } else if let Some(why) = &figures.drain {
        (State::Drain, why.clone())
    } else if figures.memory_percent > thresholds.mem_drain {
        (State::Drain, format!("mem {:.0}%", figures.memory_percent))
    } else if let Some(disk) = figures.disk_percent.filter(|d| *d > thresholds.disk_drain) {
        (State::Drain, format!("disk {disk:.0}%"))
    } else {
        let disk = figures
            .disk_percent
            .map(|d| format!(" disk {d:.0}%"))
            .unwrap_or_default();
        (
            State::Up,
            format!(
                "cpu {:.0}% mem {:.0}%{disk}",
                figures.cpu_percent, figures.memory_percent
            ),
        )
    };
    Verdict {
        weight_percent,
        state,
        reason,
    }
}

impl Verdict {
    /// The agent-check line. Every line states the weight, the administrative state (`ready`,
    /// `drain` or `maint`) and, except in maintenance, the operational state (`up` or
    /// `down`), so each answer undoes what an earlier one set: HAProxy keeps a state until the
    /// agent says otherwise. The reason follows `#` (newlines removed).
    pub fn line(&self) -> String {
        let (admin, op) = match self.state {
            State::Up => (AdminWord::Ready, Some(OpWord::Up)),
            State::Drain => (AdminWord::Drain, Some(OpWord::Up)),
            State::Down => (AdminWord::Ready, Some(OpWord::Down)),
            State::Maint => (AdminWord::Maint, None),
        };
        write_line(self.weight_percent, admin, op, &self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(cpu: f64, mem: f64, disk: Option<f64>) -> Figures {
        Figures {
            cpu_percent: cpu,
            memory_percent: mem,
            disk_percent: disk,
            ..Figures::default()
        }
    }

    #[test]
    fn idle_host_is_up_at_full_weight() {
        let v = decide(&figures(5.0, 30.0, Some(40.0)), &Thresholds::default());
        assert_eq!(v.weight_percent, 100);
        assert_eq!(v.state, State::Up);
        assert_eq!(v.line(), "100% ready up #cpu 5% mem 30% disk 40%\n");
    }

    #[test]
    fn weight_falls_linearly_with_cpu_down_to_the_floor() {
        let t = Thresholds::default();
        assert_eq!(decide(&figures(50.0, 0.0, None), &t).weight_percent, 100);
        // Halfway from 50% to 100% CPU: halfway from 100 to 10.
        assert_eq!(decide(&figures(75.0, 0.0, None), &t).weight_percent, 55);
        assert_eq!(decide(&figures(100.0, 0.0, None), &t).weight_percent, 10);
        assert_eq!(decide(&figures(130.0, 0.0, None), &t).weight_percent, 10);
    }

    #[test]
    fn the_lower_of_cpu_and_memory_wins() {
        let t = Thresholds::default();
        // Memory 85%: halfway from 70 to 100 -> 55; CPU 60% -> 82.
        let v = decide(&figures(60.0, 85.0, None), &t);
        assert_eq!(v.weight_percent, 55);
        assert_eq!(v.state, State::Up);
    }

    #[test]
    fn thresholds_of_100_disable_the_falloff_and_max_weight_caps() {
        let t = Thresholds {
            cpu_weight_from: 100.0,
            mem_weight_from: 100.0,
            max_weight: 50,
            ..Thresholds::default()
        };
        assert_eq!(decide(&figures(100.0, 89.0, None), &t).weight_percent, 50);
    }

    #[test]
    fn memory_or_disk_above_limit_drains() {
        let t = Thresholds::default();
        let v = decide(&figures(10.0, 93.2, Some(10.0)), &t);
        assert_eq!(v.state, State::Drain);
        assert_eq!(v.reason, "mem 93%");
        assert_eq!(v.line(), "30% drain up #mem 93%\n");
        let v = decide(&figures(10.0, 20.0, Some(97.0)), &t);
        assert_eq!(v.state, State::Drain);
        assert_eq!(v.line(), "100% drain up #disk 97%\n");
    }

    #[test]
    fn maint_beats_a_failed_check_which_beats_drain() {
        let t = Thresholds::default();
        let mut f = figures(10.0, 95.0, None);
        f.check_failure = Some("check-command exited 1".into());
        let v = decide(&f, &t);
        assert_eq!(v.state, State::Down);
        assert!(v.line().contains("ready down #check-command exited 1"));
        f.check_failure = None;
        f.drain = Some("drain file /y exists".into());
        assert_eq!(decide(&f, &t).reason, "drain file /y exists");
        f.check_failure = Some("check-command exited 1".into());
        assert_eq!(decide(&f, &t).state, State::Down);
        f.maint = Some("maint file /x exists".into());
        let v = decide(&f, &t);
        assert_eq!(v.state, State::Maint);
        assert!(v.line().contains("% maint #maint file /x exists"));
    }

    #[test]
    fn reasons_cannot_break_the_line() {
        let v = Verdict {
            weight_percent: 80,
            state: State::Down,
            reason: "bad\nthing".into(),
        };
        assert_eq!(v.line(), "80% ready down #bad thing\n");
    }
}
