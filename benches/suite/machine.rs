//! The limits of this machine that bound how many clients a section can hold.

/// The soft limit of open files of this process.
pub(crate) fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

/// Ephemeral ports available to connect from.
pub(crate) fn ephemeral_ports() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| {
            let mut it = range.split_whitespace().map(|v| v.parse::<usize>().ok());
            Some(it.next()??.abs_diff(it.next()??) + 1)
        })
        .unwrap_or(28_000)
}

/// How many clients of `wanted` this process can hold (its fd limit, less a margin for the
/// brokers' connections and the rest, and the ephemeral ports), and why fewer.
pub(crate) fn client_budget(wanted: usize) -> (usize, Option<String>) {
    let fds = fd_limit().saturating_sub(300);
    let ports = ephemeral_ports().saturating_sub(1000);
    let n = wanted.min(fds).min(ports);
    if n < wanted {
        (
            n,
            Some(format!(
                "{n} connections instead of {wanted}: open-file limit {}, {} ephemeral ports (raise with `ulimit -n`)",
                fd_limit(),
                ephemeral_ports()
            )),
        )
    } else {
        (n, None)
    }
}

/// The CPU time all threads of process `pid` have run, in nanoseconds, from the scheduler's
/// own accounting (`/proc/<pid>/task/*/schedstat`), fine enough for one broadcast where clock
/// ticks are not; `None` where it cannot be read. Threads that ended are not counted.
pub(crate) fn cpu_nanos(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += stat
            .split_whitespace()
            .next()
            .and_then(|ran| ran.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}
