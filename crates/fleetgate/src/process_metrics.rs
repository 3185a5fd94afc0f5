//! The standard `process_*` metrics other exporters publish, read from `/proc/self` at
//! scrape time (Linux only; elsewhere the collector emits nothing).
//!
//! A file that cannot be read or parsed skips its metrics rather than failing the scrape.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// `USER_HZ`, the unit of the CPU times in `/proc/<pid>/stat`: 100 on every mainstream Linux
/// architecture; used when the auxiliary vector does not say.
const DEFAULT_CLOCK_TICKS: u64 = 100;

/// `AT_CLKTCK` in `<elf.h>`: the auxiliary vector entry that holds `USER_HZ`.
const AT_CLKTCK: usize = 17;

/// Process figures for `/metrics`.
#[derive(Debug)]
pub(crate) struct ProcessMetrics {
    clock_ticks: u64,
    start_time_seconds: f64,
}

impl ProcessMetrics {
    /// Call at startup: the start time is taken now.
    pub(crate) fn new() -> Self {
        // `sysconf(_SC_CLK_TCK)` would need unsafe libc and `getconf` a subprocess; glibc's
        // sysconf itself answers from the auxiliary vector, which the kernel also exposes
        // as a file.
        let clock_ticks = std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|auxv| auxv_value(&auxv, AT_CLKTCK))
            .filter(|&t| t > 0)
            .unwrap_or(DEFAULT_CLOCK_TICKS);
        let start_time_seconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self {
            clock_ticks,
            start_time_seconds,
        }
    }
}

fn gauge<N>(e: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> std::fmt::Result
where
    N: prometheus_client::encoding::EncodeGaugeValue,
{
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

impl Collector for ProcessMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        if !cfg!(target_os = "linux") {
            return Ok(());
        }
        if let Some(status) = read("/proc/self/status") {
            if let Some(kib) = status_kib(&status, "VmRSS") {
                gauge(
                    &mut e,
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    kib.saturating_mul(1024),
                )?;
            }
            if let Some(kib) = status_kib(&status, "VmSize") {
                gauge(
                    &mut e,
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes.",
                    kib.saturating_mul(1024),
                )?;
            }
            if let Some(n) = status_field(&status, "Threads").and_then(|v| v.parse::<u64>().ok()) {
                gauge(&mut e, "process_threads", "Number of OS threads.", n)?;
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // Includes the descriptor of this listing, as other exporters' counts do.
            gauge(
                &mut e,
                "process_open_fds",
                "Number of open file descriptors.",
                dir.count() as u64,
            )?;
        }
        if let Some(n) = read("/proc/self/limits").and_then(|l| max_open_files(&l)) {
            gauge(
                &mut e,
                "process_max_fds",
                "Maximum number of open file descriptors (soft limit).",
                n,
            )?;
        }
        if let Some(ticks) = read("/proc/self/stat").and_then(|s| cpu_ticks(&s)) {
            let c = ConstCounter::new(ticks as f64 / self.clock_ticks as f64);
            // The encoder appends `_total` to counters.
            c.encode(e.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                c.metric_type(),
            )?)?;
        }
        gauge(
            &mut e,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds,
        )
    }
}

/// The value of `Key:` in `/proc/<pid>/status`, trimmed.
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

/// A `Key:   1234 kB` figure of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    let v = status_field(status, key)?;
    v.strip_suffix("kB")?.trim().parse().ok()
}

/// The soft "Max open files" limit from `/proc/<pid>/limits`; `None` when unlimited.
fn max_open_files(limits: &str) -> Option<u64> {
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// utime + stime from `/proc/<pid>/stat`, in clock ticks.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses; fields resume after the last `)`.
    // utime and stime are fields 14 and 15 (1-based), so 12 and 13 after it.
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// The value of entry `key` of an auxiliary vector (`/proc/<pid>/auxv`): native-endian
/// (type, value) word pairs, ended by type 0.
fn auxv_value(auxv: &[u8], key: usize) -> Option<u64> {
    const WORD: usize = size_of::<usize>();
    auxv.chunks_exact(2 * WORD)
        .map_while(|pair| {
            let (k, v) = pair.split_at(WORD);
            Some((
                usize::from_ne_bytes(k.try_into().ok()?),
                usize::from_ne_bytes(v.try_into().ok()?),
            ))
        })
        .take_while(|&(k, _)| k != 0)
        .find_map(|(k, v)| (k == key).then_some(v as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tfleetgate\nUmask:\t0022\nState:\tS (sleeping)\n\
        Tgid:\t4242\nVmPeak:\t  812344 kB\nVmSize:\t  811320 kB\nVmLck:\t       0 kB\n\
        VmHWM:\t   14876 kB\nVmRSS:\t   14732 kB\nRssAnon:\t    3456 kB\n\
        Threads:\t9\nSigQ:\t0/63417\n";

    const LIMITS: &str = "Limit                     Soft Limit           Hard Limit           Units     \n\
        Max cpu time              unlimited            unlimited            seconds   \n\
        Max processes             63417                63417                processes \n\
        Max open files            1024                 524288               files     \n\
        Max locked memory         8388608              8388608              bytes     \n";

    #[test]
    fn status_gives_memory_and_threads() {
        assert_eq!(status_kib(STATUS, "VmRSS"), Some(14732));
        assert_eq!(status_kib(STATUS, "VmSize"), Some(811_320));
        assert_eq!(status_field(STATUS, "Threads"), Some("9"));
        // A prefix of another key does not match.
        assert_eq!(status_kib(STATUS, "Vm"), None);
        assert_eq!(status_kib(STATUS, "Threads"), None);
        assert_eq!(status_kib("", "VmRSS"), None);
    }

    #[test]
    fn limits_give_the_soft_open_files_limit() {
        assert_eq!(max_open_files(LIMITS), Some(1024));
        let unlimited = LIMITS.replace(
            "1024                 524288",
            "unlimited            unlimited",
        );
        assert_eq!(max_open_files(&unlimited), None);
        assert_eq!(max_open_files("Max processes 10 10 processes\n"), None);
    }

    #[test]
    fn stat_gives_user_plus_system_ticks() {
        let stat = "4242 (fleetgate) S 1 4242 4242 0 -1 4194560 2710 0 0 0 \
            150 37 0 0 20 0 9 0 123456 830791680 3683 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(187));
        // A command name with spaces and parentheses.
        let odd = "7 (a) b (c)) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 1 1";
        assert_eq!(cpu_ticks(odd), Some(11));
        assert_eq!(cpu_ticks("7 (short) R 1 2"), None);
        assert_eq!(cpu_ticks("garbage"), None);
    }

    fn auxv(entries: &[(usize, usize)]) -> Vec<u8> {
        entries
            .iter()
            .flat_map(|&(k, v)| [k.to_ne_bytes(), v.to_ne_bytes()])
            .flatten()
            .collect()
    }

    #[test]
    fn auxv_gives_clock_ticks() {
        let v = auxv(&[(33, 0x7fff_0000), (6, 4096), (AT_CLKTCK, 250), (0, 0)]);
        assert_eq!(auxv_value(&v, AT_CLKTCK), Some(250));
        assert_eq!(auxv_value(&v, 6), Some(4096));
        // Nothing after the terminator counts, nor a truncated trailing pair.
        let v = auxv(&[(6, 4096), (0, 0), (AT_CLKTCK, 250)]);
        assert_eq!(auxv_value(&v, AT_CLKTCK), None);
        let mut v = auxv(&[(6, 4096), (AT_CLKTCK, 250)]);
        v.truncate(v.len() - 1);
        assert_eq!(auxv_value(&v, AT_CLKTCK), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads() {
        let m = ProcessMetrics::new();
        assert!(m.clock_ticks > 0);
        let status = read("/proc/self/status").unwrap();
        assert!(status_kib(&status, "VmRSS").unwrap() > 0);
        assert!(cpu_ticks(&read("/proc/self/stat").unwrap()).is_some());
        let mut out = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(m));
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for name in [
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_threads ",
            "process_cpu_seconds_total ",
            "process_start_time_seconds ",
        ] {
            assert!(out.lines().any(|l| l.starts_with(name)), "{name}: {out}");
        }
    }
}
