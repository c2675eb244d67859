//! Is a vLLM instance hung? Upstream's answer (`runner.py`): the scheduler's heartbeat on its
//! `/metrics` — the iteration counter, requests running and waiting. An instance that has
//! work and makes no step for longer than the grace, over several checks in a row, is hung; an
//! idle one is fine however long it idles. Pure: the supervisor feeds it scrapes.

use std::time::{Duration, Instant};

/// Checks in a row past the grace before an instance counts as hung (upstream 3).
pub const HANG_CONSECUTIVE: u32 = 3;

/// One scrape's values; `None` where the series was missing or the scrape failed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Beat {
    /// `vllm:iteration_tokens_total_count`, summed over series.
    pub iterations: Option<f64>,
    /// `vllm:num_requests_running`, the largest series.
    pub running: Option<f64>,
    /// `vllm:num_requests_waiting`, the largest series (the queue depth).
    pub waiting: Option<f64>,
}

impl Beat {
    /// The values in a Prometheus text exposition (several registries may show mid-restart:
    /// sums and maxima across every series, as upstream).
    pub fn parse(text: &str) -> Self {
        let series = |name: &str| -> Vec<f64> {
            text.lines()
                .filter_map(|line| {
                    let rest = line.strip_prefix("vllm:")?.strip_prefix(name)?;
                    // The name ends where labels or the value begin.
                    let rest = match rest.chars().next()? {
                        '{' => &rest[rest.find('}')? + 1..],
                        ' ' | '\t' => rest,
                        _ => return None,
                    };
                    rest.split_whitespace().next()?.parse().ok()
                })
                .collect()
        };
        let sum = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum());
        let max = |v: Vec<f64>| v.into_iter().reduce(f64::max);
        Self {
            iterations: sum(series("iteration_tokens_total_count")),
            running: max(series("num_requests_running")),
            waiting: max(series("num_requests_waiting")),
        }
    }

    fn complete(&self) -> bool {
        self.iterations.is_some() && self.running.is_some() && self.waiting.is_some()
    }

    fn idle(&self) -> bool {
        self.complete() && self.running == Some(0.0) && self.waiting == Some(0.0)
    }
}

/// One instance's heartbeat as checks come in.
#[derive(Debug)]
pub struct Watch {
    grace: Duration,
    /// When it last progressed or idled, and the counter then; `None` before the first
    /// complete scrape (start-up, where the start-up timeout rules).
    last: Option<(Instant, Option<f64>)>,
    stalled_checks: u32,
}

impl Watch {
    /// `grace` zero: never hung (upstream's `MLNODE_HANG_GRACE_SEC=0`).
    pub fn new(grace: Duration) -> Self {
        Self { grace, last: None, stalled_checks: 0 }
    }

    /// Whether a complete heartbeat has been seen (the server answers its metrics).
    pub fn seen(&self) -> bool {
        self.last.is_some()
    }

    /// Takes a scrape (`beat`, all `None` when it failed) at `now`; true when the instance is
    /// now to be taken as hung.
    pub fn check(&mut self, beat: Beat, now: Instant) -> bool {
        if self.grace.is_zero() {
            return false;
        }
        let Some((since, iterations)) = self.last else {
            if beat.complete() {
                self.last = Some((now, beat.iterations));
            }
            return false;
        };
        let progressed = beat.iterations.is_some() && beat.iterations != iterations;
        if beat.idle() || progressed {
            self.last = Some((now, beat.iterations));
            self.stalled_checks = 0;
            return false;
        }
        if now.duration_since(since) <= self.grace {
            self.stalled_checks = 0;
            return false;
        }
        self.stalled_checks += 1;
        self.stalled_checks >= HANG_CONSECUTIVE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // What vLLM 0.32's /metrics shows (trimmed), a second registry mid-restart included.
    const METRICS: &str = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2.0
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 1.0
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 5.0
vllm:num_requests_waiting_by_reason{engine=\"0\",reason=\"capacity\"} 9.0
vllm:iteration_tokens_total_count{engine=\"0\",model_name=\"m\"} 40.0
vllm:iteration_tokens_total_count{engine=\"1\",model_name=\"m\"} 2.0
vllm:iteration_tokens_total_sum{engine=\"0\",model_name=\"m\"} 900.0
";

    #[test]
    fn heartbeat_series_are_summed_and_maximised() {
        let beat = Beat::parse(METRICS);
        assert_eq!(beat, Beat { iterations: Some(42.0), running: Some(2.0), waiting: Some(5.0) });
        assert_eq!(Beat::parse("vllm:num_requests_running 0\n").iterations, None);
        assert_eq!(Beat::parse(""), Beat::default());
    }

    fn beat(iterations: f64, running: f64) -> Beat {
        Beat { iterations: Some(iterations), running: Some(running), waiting: Some(0.0) }
    }

    #[test]
    fn busy_without_steps_past_the_grace_three_times_is_hung() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Watch::new(Duration::from_secs(10));
        assert!(!w.check(Beat::default(), at(0)), "starting: not counted");
        assert!(!w.seen());
        assert!(!w.check(beat(5.0, 1.0), at(1)));
        assert!(w.seen());
        // Busy, stuck, within the grace: fine.
        assert!(!w.check(beat(5.0, 1.0), at(10)));
        // Past it: the third check in a row says hung; a failed scrape counts as no step.
        assert!(!w.check(beat(5.0, 1.0), at(12)));
        assert!(!w.check(Beat::default(), at(14)));
        assert!(w.check(beat(5.0, 1.0), at(16)));
    }

    #[test]
    fn progress_or_idleness_resets_the_clock() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Watch::new(Duration::from_secs(10));
        w.check(beat(1.0, 1.0), at(0));
        assert!(!w.check(beat(1.0, 1.0), at(20)));
        assert!(!w.check(beat(2.0, 1.0), at(21)), "a step");
        assert!(!w.check(beat(2.0, 1.0), at(25)));
        // Idle for minutes: not hung.
        for s in [40, 60, 80, 100] {
            assert!(!w.check(beat(2.0, 0.0), at(s)));
        }
        // Grace zero turns the watch off.
        let mut off = Watch::new(Duration::ZERO);
        off.check(beat(1.0, 1.0), at(0));
        for s in 1..10 {
            assert!(!off.check(Beat::default(), at(s * 100)));
        }
    }
}
