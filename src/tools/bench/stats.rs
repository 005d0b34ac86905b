//! Pure helpers of the benchmark: percentiles, a seeded Zipf sampler, normal samples, peak RSS and
//! the result table (markdown).
use rand::Rng;

/// Nearest-rank percentile of `samples` (any order); `None` when there are none.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    crate::tools::stats::percentile(&crate::tools::stats::sorted_finite(samples), p)
}

pub use crate::tools::stats::Zipf;

/// A standard normal sample.
pub fn normal(rng: &mut impl Rng) -> f32 {
    rand_distr::Distribution::sample(&rand_distr::StandardNormal, rng)
}

/// Peak resident set size of this process so far (`VmHWM`), in MiB.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&s)
}

fn parse_vm_hwm(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds (user + system, all threads) this process used so far, from `/proc/self/stat`
/// (clock ticks of 1/100 s, Linux's USER_HZ).
pub fn cpu_seconds() -> Option<f64> {
    parse_cpu_seconds(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the `(comm)` field: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The whole machine's CPU time so far, from the first line of `/proc/stat` (seconds, summed
/// over CPUs): `busy` (user, nice, system, irq, softirq) and `steal` (time the hypervisor ran
/// something else while this VM wanted the CPU).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostCpu {
    pub busy: f64,
    pub steal: f64,
}

/// [`HostCpu`] now, or None where `/proc/stat` is unreadable.
pub fn host_cpu() -> Option<HostCpu> {
    parse_host_cpu(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_host_cpu(stat: &str) -> Option<HostCpu> {
    // cpu  user nice system idle iowait irq softirq steal guest guest_nice (USER_HZ ticks)
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line.split_whitespace().skip(1).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0);
    Some(HostCpu { busy: (get(0) + get(1) + get(2) + get(5) + get(6)) / 100.0, steal: get(7) / 100.0 })
}

/// One line of the result table.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Row {
    pub scenario: String,
    pub streams: usize,
    pub tok_s: Option<f64>,
    /// tok/s over the base-only run of the same shape in this run.
    pub ratio_to_base: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub itl_p50_ms: Option<f64>,
    pub itl_p99_ms: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub notes: String,
    /// Tokens generated and wall seconds of the measurement (JSON only).
    pub tokens: Option<usize>,
    pub wall_s: Option<f64>,
    /// The round (from 1) of a run with `--rounds` above 1.
    pub round: Option<usize>,
}

fn cell(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "-".into(),
    }
}

fn pair(a: Option<f64>, b: Option<f64>) -> String {
    if a.is_none() && b.is_none() {
        return "-".into();
    }
    format!("{} / {}", cell(a, 0), cell(b, 0))
}

/// The rows as a markdown table.
pub fn render_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | streams | tok/s | ratio to base-only | TTFT p50/p99 ms | ITL p50/p99 ms | peak RSS MB | notes |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.streams,
            cell(r.tok_s, 1),
            cell(r.ratio_to_base, 2),
            pair(r.ttft_p50_ms, r.ttft_p99_ms),
            pair(r.itl_p50_ms, r.itl_p99_ms),
            cell(r.peak_rss_mb, 0),
            r.notes.replace('|', "\\|"),
        ));
    }
    out
}

/// Per scenario of a run in rounds: every round's tok/s and ratio to its own round's base run,
/// with the median tok/s and the smallest and median ratio (empty below two rounds).
pub fn render_rounds(rows: &[Row]) -> String {
    if rows.iter().filter_map(|r| r.round).max().unwrap_or(0) < 2 {
        return String::new();
    }
    let mut names: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.tok_s.is_some()) {
        if !names.contains(&r.scenario.as_str()) {
            names.push(&r.scenario);
        }
    }
    let mut out = String::from(
        "| scenario | tok/s per round | median tok/s | ratio per round | smallest ratio | median ratio |\n|---|---|---:|---|---:|---:|\n",
    );
    let list = |v: &[f64], digits: usize| v.iter().map(|x| format!("{x:.digits$}")).collect::<Vec<_>>().join(" / ");
    for name in names {
        let of: Vec<&Row> = rows.iter().filter(|r| r.scenario == name).collect();
        let tok: Vec<f64> = of.iter().filter_map(|r| r.tok_s).collect();
        let ratio: Vec<f64> = of.iter().filter_map(|r| r.ratio_to_base).collect();
        let smallest = ratio.iter().copied().reduce(f64::min);
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            list(&tok, 1),
            cell(percentile(&tok, 50.0), 1),
            if ratio.is_empty() { "-".into() } else { list(&ratio, 2) },
            cell(smallest, 2),
            cell(percentile(&ratio, 50.0), 2),
        ));
    }
    out
}

/// `--bracket-base`: the ratios of `rows` (an adapter scenario's rows, each first taken to the
/// base32 run `before` it) become ratios to the mean of `before` and the base32 run `after` it.
pub fn bracket(rows: &mut [Row], before: f64, after: f64) {
    let mean = (before + after) / 2.0;
    for r in rows.iter_mut().filter(|r| r.ratio_to_base.is_some()) {
        r.ratio_to_base = r.tok_s.filter(|_| mean > 0.0).map(|t| t / mean);
        r.notes = format!("{} (ratio to the mean of base32 before, {before:.1}, and after, {after:.1} tok/s)", r.notes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.0));
    }

    #[test]
    fn zipf_is_seeded_and_skewed() {
        let z = Zipf::new(1000, 1.0);
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..5000).map(|_| z.sample(&mut rng)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert!(a.iter().all(|&k| k < 1000));
        let count = |k| a.iter().filter(|&&x| x == k).count() as f64;
        // P(0) = 1/H_1000 ~ 0.134; P(1) is half of it.
        assert!((count(0) / 5000.0 - 0.134).abs() < 0.02, "{}", count(0));
        assert!(count(0) > 1.5 * count(1));
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(distinct.len() > 300);
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut rng = StdRng::seed_from_u64(1);
        let v: Vec<f32> = (0..20000).map(|_| normal(&mut rng)).collect();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "{mean} {var}");
    }

    #[test]
    fn parses_vm_hwm() {
        let s = "Name:\tx\nVmPeak:\t  900 kB\nVmHWM:\t   2048 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(s), Some(2.0));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
        assert!(peak_rss_mb().is_some_and(|m| m > 0.0));
    }

    #[test]
    fn parses_cpu_time() {
        let s = "42 (mod serve) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 8 0 1 2 3";
        assert_eq!(parse_cpu_seconds(s), Some(3.0));
        assert!(cpu_seconds().is_some());
    }

    #[test]
    fn parses_host_cpu() {
        let s = "cpu  4549501 838030 582217 3077939 17133 100 7466 97320 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        let h = parse_host_cpu(s).unwrap();
        assert!((h.busy - (4549501.0 + 838030.0 + 582217.0 + 100.0 + 7466.0) / 100.0).abs() < 1e-6);
        assert!((h.steal - 973.2).abs() < 1e-9);
        assert_eq!(parse_host_cpu("intr 1 2\n"), None);
        assert!(host_cpu().is_some());
    }

    #[test]
    fn renders_markdown() {
        let rows = vec![
            Row {
                scenario: "base32".into(),
                streams: 32,
                tok_s: Some(123.456),
                ratio_to_base: Some(1.0),
                ttft_p50_ms: Some(10.2),
                ttft_p99_ms: Some(20.9),
                ..Default::default()
            },
            Row { scenario: "coldload".into(), notes: "a|b".into(), ..Default::default() },
        ];
        let t = render_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2], "| base32 | 32 | 123.5 | 1.00 | 10 / 21 | - | - |  |");
        assert!(lines[3].contains("a\\|b"));
        assert!(lines.iter().all(|l| l.matches('|').count() - l.matches("\\|").count() == 9));
    }

    /// A run in rounds prints one line per scenario: every round's tok/s and ratio in order,
    /// the median tok/s (nearest rank) and the smallest and median ratio; one round prints none.
    #[test]
    fn rounds_table_pairs_each_ratio_with_its_round() {
        let row = |scenario: &str, round: usize, tok: f64, ratio: Option<f64>| Row {
            scenario: scenario.into(),
            tok_s: Some(tok),
            ratio_to_base: ratio,
            round: Some(round),
            ..Default::default()
        };
        let rows = vec![
            row("base32", 1, 600.0, None),
            row("lora32", 1, 540.0, Some(0.90)),
            row("base32", 2, 500.0, None),
            row("lora32", 2, 430.0, Some(0.86)),
            row("base32", 3, 550.0, None),
            row("lora32", 3, 506.0, Some(0.92)),
        ];
        let t = render_rounds(&rows);
        assert!(t.contains("| base32 | 600.0 / 500.0 / 550.0 | 550.0 | - | - | - |"), "{t}");
        assert!(t.contains("| lora32 | 540.0 / 430.0 / 506.0 | 506.0 | 0.90 / 0.86 / 0.92 | 0.86 | 0.90 |"), "{t}");
        assert_eq!(render_rounds(&rows[..2]), "");
    }

    /// A bracketed ratio is to the mean of the base runs on either side; a row without a ratio
    /// (none was taken) keeps none.
    #[test]
    fn bracketed_ratio_is_to_the_mean_of_both_base_runs() {
        let mut rows = vec![
            Row { scenario: "lora32".into(), tok_s: Some(270.0), ratio_to_base: Some(0.9), ..Default::default() },
            Row { scenario: "lora32".into(), tok_s: Some(5.0), ..Default::default() },
        ];
        bracket(&mut rows, 300.0, 240.0);
        assert_eq!(rows[0].ratio_to_base, Some(1.0));
        assert!(rows[0].notes.contains("before, 300.0, and after, 240.0"), "{}", rows[0].notes);
        assert_eq!(rows[1].ratio_to_base, None);
    }
}
