//! What a node measures of itself on every heartbeat: its connection count and its process's
//! CPU and memory.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// A count of live connections, shared by its clones.
///
/// The registrar reads it on every heartbeat to fill [`NodeInfo::connection_count`]. The
/// cluster layer drives it for each WebSocket it admits; until then an application can drive it
/// itself, by hand or with [`ConnectionCounter::guard`].
///
/// [`NodeInfo::connection_count`]: hybrid_cluster_core::NodeInfo::connection_count
#[derive(Clone, Default)]
pub struct ConnectionCounter(Arc<AtomicU32>);

impl ConnectionCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current count.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the count.
    pub fn set(&self, count: u32) {
        self.0.store(count, Ordering::Relaxed);
    }

    /// Counts one more connection.
    pub fn increment(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one connection fewer (never below zero).
    pub fn decrement(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Counts one connection until the guard is dropped.
    pub fn guard(&self) -> ConnectionGuard {
        self.increment();
        ConnectionGuard(self.clone())
    }
}

impl fmt::Debug for ConnectionCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionCounter({})", self.get())
    }
}

/// One counted connection; dropping it counts the connection gone.
#[derive(Debug)]
pub struct ConnectionGuard(ConnectionCounter);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.decrement();
    }
}

/// One reading of the process's resources.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResourceUsage {
    /// CPU used by the process since the previous reading, as a percentage of the whole
    /// machine (all logical CPUs together), `0..=100`.
    pub cpu_percent: f32,
    /// Resident memory of the process, in bytes.
    pub memory_bytes: u64,
    /// Resident memory as a percentage of the machine's memory, `0..=100`.
    pub memory_percent: f32,
}

/// Measures this process's CPU and memory with `sysinfo`.
///
/// CPU is measured between two readings, so each heartbeat reports the usage over the last
/// heartbeat interval, not an average over the process's life; the first reading reports 0.
pub struct ResourceSampler {
    /// `None` where sysinfo does not support the platform: readings are then 0.
    system: Option<System>,
    pid: Option<Pid>,
    logical_cpus: usize,
}

impl fmt::Debug for ResourceSampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceSampler")
            .field("pid", &self.pid)
            .field("logical_cpus", &self.logical_cpus)
            .finish()
    }
}

impl ResourceSampler {
    /// A sampler for the current process. Where the platform tells nothing, readings are 0.
    pub fn new() -> Self {
        let logical_cpus = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1);
        let mut sampler = Self {
            system: System::new().ok(),
            pid: sysinfo::get_current_pid().ok(),
            logical_cpus,
        };
        // The first refresh sets the baseline CPU time the next reading is measured from.
        sampler.refresh();
        sampler
    }

    fn refresh(&mut self) {
        let Some(system) = self.system.as_mut() else {
            return;
        };
        if let Some(pid) = self.pid {
            system.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                true,
                ProcessRefreshKind::nothing().with_cpu().with_memory(),
            );
        }
        system.refresh_memory();
    }

    /// Reads the process's usage since the previous reading.
    pub fn sample(&mut self) -> ResourceUsage {
        self.refresh();
        let Some(system) = self.system.as_ref() else {
            return ResourceUsage {
                cpu_percent: 0.0,
                memory_bytes: 0,
                memory_percent: 0.0,
            };
        };
        let process = self.pid.and_then(|pid| system.process(pid));
        // sysinfo counts one fully busy core as 100 %: scale to the whole machine.
        let cpu_percent = process
            .map(|p| p.cpu_usage() / self.logical_cpus as f32)
            .unwrap_or(0.0);
        let memory_bytes = process.map(|p| p.memory()).unwrap_or(0);
        let total = system.total_memory();
        let memory_percent = if total == 0 {
            0.0
        } else {
            (memory_bytes as f64 / total as f64 * 100.0) as f32
        };
        ResourceUsage {
            cpu_percent: clamp_percent(cpu_percent),
            memory_bytes,
            memory_percent: clamp_percent(memory_percent),
        }
    }
}

impl Default for ResourceSampler {
    fn default() -> Self {
        Self::new()
    }
}

fn clamp_percent(value: f32) -> f32 {
    if value.is_finite() {
        value.clamp(0.0, 100.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_counts_and_guards() {
        let counter = ConnectionCounter::new();
        counter.increment();
        let guard = counter.guard();
        assert_eq!(counter.get(), 2);
        drop(guard);
        assert_eq!(counter.get(), 1);
        counter.decrement();
        counter.decrement();
        assert_eq!(counter.get(), 0, "never below zero");
    }

    #[test]
    fn sampler_reports_this_process() {
        let mut sampler = ResourceSampler::new();
        // Burn some CPU so the second reading has something to show.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let usage = sampler.sample();
        assert!(usage.memory_bytes > 0, "{usage:?}");
        assert!((0.0..=100.0).contains(&usage.cpu_percent), "{usage:?}");
        assert!(
            usage.memory_percent > 0.0 && usage.memory_percent <= 100.0,
            "{usage:?}"
        );
    }
}
