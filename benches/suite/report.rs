//! The table the suite prints and writes: rows with a verdict against issue 17's targets,
//! notes, and the figures' formats (latency percentiles from an HDR histogram).

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Met,
    Missed,
    Info,
}

impl Verdict {
    pub(crate) fn of(met: bool) -> Self {
        if met { Self::Met } else { Self::Missed }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Met => "MET",
            Self::Missed => "MISSED",
            Self::Info => "—",
        }
    }
}

pub(crate) struct Row {
    measure: String,
    ours: String,
    baseline: String,
    ratio: String,
    target: String,
    verdict: Verdict,
}

#[derive(Default)]
pub(crate) struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    pub(crate) fn row(
        &mut self,
        measure: impl Into<String>,
        ours: impl Into<String>,
        baseline: impl Into<String>,
        ratio: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) {
        let row = Row {
            measure: measure.into(),
            ours: ours.into(),
            baseline: baseline.into(),
            ratio: ratio.into(),
            target: target.into(),
            verdict,
        };
        println!(
            "  {} | {} | {} | {} | {} | {}",
            row.measure,
            row.ours,
            row.baseline,
            row.ratio,
            row.target,
            row.verdict.as_str()
        );
        self.rows.push(row);
    }

    pub(crate) fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        println!("  note: {note}");
        self.notes.push(note);
    }

    pub(crate) fn markdown(&self, header: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{header}\n");
        let _ = writeln!(
            out,
            "| Measure | Ours | Baseline (same run) | Ratio | Target (issue 17) | Verdict |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---|---|");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                r.measure,
                r.ours,
                r.baseline,
                r.ratio,
                r.target,
                r.verdict.as_str()
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nNotes:\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }
}

pub(crate) fn us(d: f64) -> String {
    format!("{d:.0} µs")
}

pub(crate) fn rate(r: f64) -> String {
    format!("{r:.0} msg/s")
}

pub(crate) fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "—".to_owned()
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Latency percentiles, in microseconds.
#[derive(Clone, Copy)]
pub(crate) struct Lat {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
}

impl Lat {
    pub(crate) fn of(samples: &[Duration]) -> Self {
        // Nanoseconds with 3 significant digits (0.1 %), finer than the microseconds shown;
        // anything over an hour is counted as an hour.
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
            .expect("valid histogram bounds");
        for sample in samples {
            histogram.saturating_record(u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX));
        }
        let at = |q: f64| {
            if histogram.is_empty() {
                f64::NAN
            } else {
                histogram.value_at_quantile(q) as f64 / 1e3
            }
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        }
    }

    pub(crate) fn show(&self) -> String {
        format!("{:.0} / {:.0} / {:.0} µs", self.p50, self.p99, self.p999)
    }
}
