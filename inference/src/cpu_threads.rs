//! Threads of ours for CPU work that runs outside libtorch (the packed kernel of a MoE's float32
//! experts, `packed_matmul`), and whether they may run at all.
//!
//! libtorch parallelises its CPU ops with OpenMP (GNU libgomp in the torch wheel). After each
//! parallel op libgomp's workers keep spinning for the next one: by default 300,000 rounds,
//! milliseconds on these cores, before they sleep. A thread of ours started in that window shares
//! a core with a spinning worker: on two Zen 3 cores a layer's experts for a 512-token prefill
//! took 22.6 ms on two threads of ours, 16.4–17.0 on libtorch's grouped matmul, and 13.4–14.5 on
//! two threads of ours with the spin bounded (docs/cpu-compute.md). So our threads run only where
//! the environment bounds libgomp's spinning: `OMP_WAIT_POLICY=passive`, or `GOMP_SPINCOUNT` at
//! most [`SPIN_BOUND`]. libgomp reads both once, when it loads, so they belong in the process's
//! environment (the daemon's, as it starts). Neither is the default: a bounded spin slows libtorch's own
//! ops (one sequence of the dense bench model decoded ~10% slower at 10,000 rounds, ~30% at
//! 1,000), which a MoE's experts gain back only at prefill and PoC v2 sizes.

use std::sync::{Mutex, OnceLock};

/// The most rounds libgomp's idle workers may spin for threads of ours to share the cores.
pub const SPIN_BOUND: u64 = 100_000;

/// Whether libgomp's idle workers, as this process's environment configured them, sleep soon
/// enough for threads of ours.
pub fn openmp_sleeps_soon() -> bool {
    static SOON: OnceLock<bool> = OnceLock::new();
    *SOON.get_or_init(|| {
        sleeps_soon(std::env::var("OMP_WAIT_POLICY").ok().as_deref(), std::env::var("GOMP_SPINCOUNT").ok().as_deref())
    })
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
