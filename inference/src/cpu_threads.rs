//! Threads of ours for CPU work that runs outside libtorch (the packed kernel of a MoE's float32
//! experts, `packed_matmul`), whether they may run at all, and the libgomp setting that lets them.
//!
//! libtorch parallelises its CPU ops with OpenMP (GNU libgomp in the torch wheel). After each
//! parallel op libgomp's workers keep spinning for the next one: by default 300,000 rounds,
//! milliseconds on these cores, before they sleep. A thread of ours started in that window shares
//! a core with a spinning worker: on two Zen 3 cores a layer's experts for a 512-token prefill
//! took 22.6 ms on two threads of ours, 16.4–17.0 on libtorch's grouped matmul, and 13.4–14.5 on
//! two threads of ours with the spin bounded (docs/cpu-compute.md). So our threads run only where
//! the environment bounds libgomp's spinning: `OMP_WAIT_POLICY=passive`, or `GOMP_SPINCOUNT` at
//! most [`SPIN_BOUND`]. libgomp reads both once, when it loads, before `main`; so a program that
//! computes on the CPU and finds neither set starts itself again with [`SPIN_COUNT`] rounds
//! ([`restart_with_bounded_spin`]: the daemon with `--allow-cpu-compute`, the inference bench on
//! the CPU). On two Zen 4 cores that bound cost the dense bench model nothing measurable (four
//! alternated rounds) and took the Qwen3-MoE's prefill of 512 tokens from ~2,400 to ~3,300
//! tokens/s and its PoC v2 forward from ~12 to ~15 nonces/s (docs/benchmarks.md, 2026-12-06);
//! on Zen 3 one sequence of the dense model decoded ~10% slower (~80 to ~72 tokens/s).

use std::sync::{Mutex, OnceLock};

/// The most rounds libgomp's idle workers may spin for threads of ours to share the cores.
pub const SPIN_BOUND: u64 = 100_000;

/// The rounds a program of ours that computes on the CPU gives libgomp's idle workers where its
/// environment says nothing of how they wait (docs/cpu-compute.md has the measurements).
pub const SPIN_COUNT: u64 = 10_000;

/// Where the environment leaves libgomp's spinning at its default, the variable and value that
/// bound it to [`SPIN_COUNT`]; `None` where `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY` is set (an
/// operator's setting stands, whatever it is).
pub fn spin_bound_missing(wait_policy: Option<&str>, spin_count: Option<&str>) -> Option<(&'static str, String)> {
    let set = |v: Option<&str>| v.is_some_and(|v| !v.trim().is_empty());
    (!set(wait_policy) && !set(spin_count)).then(|| ("GOMP_SPINCOUNT", SPIN_COUNT.to_string()))
}

/// Starts this program again, same arguments and environment, with libgomp's spinning bounded
/// ([`spin_bound_missing`]), replacing the process (same PID, so supervisors and tests that hold
/// it see no change). Returns where nothing was to be done (`Ok`) or the restart failed (`Err`:
/// the program goes on as it was, slower where a MoE runs on the CPU).
pub fn restart_with_bounded_spin() -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let (wait_policy, spin_count) = openmp_wait_settings();
    let Some((name, value)) = spin_bound_missing(wait_policy.as_deref(), spin_count.as_deref()) else {
        return Ok(());
    };
    tracing::info!(
        "starting again with {name}={value}: libgomp's workers then sleep soon enough for the engine's own CPU threads"
    );
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    // `exec` returns only on failure.
    Err(std::process::Command::new(std::env::current_exe()?).arg0(arg0).args(args).env(name, value).exec())
}

/// Whether libgomp's idle workers, as this process's environment configured them, sleep soon
/// enough for threads of ours.
pub fn openmp_sleeps_soon() -> bool {
    static SOON: OnceLock<bool> = OnceLock::new();
    *SOON.get_or_init(|| {
        let (wait_policy, spin_count) = openmp_wait_settings();
        sleeps_soon(wait_policy.as_deref(), spin_count.as_deref())
    })
}

/// This process's `OMP_WAIT_POLICY` and `GOMP_SPINCOUNT`, the two settings libgomp waits by.
fn openmp_wait_settings() -> (Option<String>, Option<String>) {
    (std::env::var("OMP_WAIT_POLICY").ok(), std::env::var("GOMP_SPINCOUNT").ok())
}

/// libgomp's rules: `GOMP_SPINCOUNT` (a count, optionally with a k/M/G/T suffix, or
/// `infinite`/`infinity`) wins over `OMP_WAIT_POLICY` (`passive`: no spinning; `active`:
/// endless); with neither, 300,000 rounds.
fn sleeps_soon(wait_policy: Option<&str>, spin_count: Option<&str>) -> bool {
    if let Some(count) = spin_count.map(str::trim).filter(|c| !c.is_empty()) {
        return spin_rounds(count).is_some_and(|rounds| rounds <= SPIN_BOUND);
    }
    wait_policy.is_some_and(|policy| policy.trim().eq_ignore_ascii_case("passive"))
}

/// `GOMP_SPINCOUNT`'s rounds; `None` for infinite or unreadable (libgomp keeps its default).
fn spin_rounds(count: &str) -> Option<u64> {
    let digits = count.find(|c: char| !c.is_ascii_digit()).unwrap_or(count.len());
    let (number, suffix) = count.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let scale: u64 = match suffix.trim() {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(scale)
}

/// Threads of ours for work of `rows` rows: libtorch's intra-op count where libgomp's workers
/// sleep soon and the work is worth starting a thread for, else the calling thread alone.
pub fn threads_for(rows: usize) -> usize {
    if rows >= MIN_SHARED_ROWS && openmp_sleeps_soon() { tch::get_num_threads().max(1) as usize } else { 1 }
}

/// Fewer rows than this run on the calling thread: starting a thread (~20–50 µs) costs more
/// than it saves on a decode step of one sequence (4 rows of the bench's Qwen3-MoE: 388 µs for
/// the experts on one thread, 440 on two).
const MIN_SHARED_ROWS: usize = 16;

/// `work` done on every item, the items handed out one at a time to `threads` threads (the
/// calling one among them), so a thread that gets less of its core does fewer of them.
pub fn share<T: Send>(items: Vec<T>, threads: usize, work: impl Fn(T) + Sync) {
    if threads <= 1 || items.len() <= 1 {
        items.into_iter().for_each(work);
        return;
    }
    let queue = Mutex::new(items.into_iter());
    let next = || queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).next();
    let drain = || {
        while let Some(item) = next() {
            work(item);
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(drain);
        }
        drain();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn libgomp_spins_briefly_only_as_configured() {
        // Unset: libgomp's 300,000 rounds.
        assert!(!sleeps_soon(None, None));
        assert!(sleeps_soon(Some("passive"), None));
        assert!(sleeps_soon(Some("PASSIVE"), None));
        assert!(!sleeps_soon(Some("active"), None));
        assert!(sleeps_soon(None, Some("10000")));
        assert!(sleeps_soon(None, Some("100000")));
        assert!(!sleeps_soon(None, Some("100001")));
        assert!(sleeps_soon(None, Some("10k")));
        assert!(!sleeps_soon(None, Some("1M")));
        assert!(!sleeps_soon(None, Some("infinite")));
        // The spin count wins over the policy, as in libgomp.
        assert!(!sleeps_soon(Some("passive"), Some("300000")));
        assert!(sleeps_soon(Some("active"), Some("0")));
        assert!(!sleeps_soon(None, Some("ten")));
    }

    #[test]
    fn only_an_unset_spin_is_bounded_and_the_bound_lets_threads_of_ours_run() {
        let bound = spin_bound_missing(None, None).expect("unset: bounded");
        assert_eq!(bound, ("GOMP_SPINCOUNT", "10000".to_string()));
        // What the restarted process then reads lets our threads share the cores.
        assert!(sleeps_soon(None, Some(&bound.1)));
        assert_eq!(spin_bound_missing(Some(""), Some(" ")), Some(bound));
        // An operator's setting stands, even one that keeps our threads off.
        assert_eq!(spin_bound_missing(None, Some("300000")), None);
        assert_eq!(spin_bound_missing(Some("active"), None), None);
        assert_eq!(spin_bound_missing(Some("passive"), None), None);
    }

    #[test]
    fn shared_work_does_every_item_once() {
        for threads in [1, 2, 3] {
            let done: Vec<AtomicUsize> = (0..50).map(|_| AtomicUsize::new(0)).collect();
            share((0..50).collect(), threads, |i: usize| {
                done[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(done.iter().all(|d| d.load(Ordering::Relaxed) == 1), "{threads} threads");
        }
    }
}
