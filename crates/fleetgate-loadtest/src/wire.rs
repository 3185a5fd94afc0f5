//! The line protocol between the coordinator and its worker processes: JSON, one message per
//! line. The coordinator writes [`Init`] and then [`Phase`]s to a worker's stdin; the worker
//! writes [`Report`]s to stdout, marked with [`MARK`] so that anything else a library prints
//! there is passed through instead of misread.

use serde::{Deserialize, Serialize};

use crate::params::Spec;
use crate::tally::Tally;

/// Prefix of every protocol line a worker prints.
pub const MARK: &str = "@fleetgate-loadtest ";

/// The first line a worker reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Init {
    /// The whole run.
    pub spec: Spec,
    /// This worker's number, `0..spec.workers`.
    pub index: usize,
    /// Where goose writes its HTML report, if anywhere.
    pub goose_report: Option<String>,
}

/// Steps of a run, in order; every worker moves through them when the coordinator says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Getting credentials.
    Provision,
    /// Connecting the devices.
    Connect,
    /// The load runs.
    Run,
    /// Load stopped; devices stay up to receive what is still queued.
    Settle,
    /// Disconnect and report.
    Finish,
}

/// Live counts a worker prints every tick, so the coordinator can wait on them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Progress {
    pub provisioned: u64,
    pub provision_failed: u64,
    /// Devices whose first connection attempt ended, either way.
    pub connect_done: u64,
    /// Devices authenticated right now.
    pub online: u64,
    pub messages_sent: u64,
    pub commands_accepted: u64,
    pub commands_received: u64,
    /// Admin API calls still waiting for their answer.
    pub commands_in_flight: u64,
    /// Workers whose count was taken after they entered the settle phase (1 or 0 from
    /// one worker): only such counts can say that nothing is in flight any more.
    pub settling: u64,
}

impl Progress {
    /// Field-wise sum.
    pub fn add(&mut self, o: &Progress) {
        self.provisioned += o.provisioned;
        self.provision_failed += o.provision_failed;
        self.connect_done += o.connect_done;
        self.online += o.online;
        self.messages_sent += o.messages_sent;
        self.commands_accepted += o.commands_accepted;
        self.commands_received += o.commands_received;
        self.commands_in_flight += o.commands_in_flight;
        self.settling += o.settling;
    }
}

/// What a worker prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Report {
    /// Counts so far.
    Progress(Progress),
    /// The end: everything counted.
    Done(Box<Tally>),
    /// The worker cannot go on.
    Failed(String),
}

impl Report {
    /// The line to print.
    pub fn line(&self) -> String {
        format!(
            "{MARK}{}",
            serde_json::to_string(self).expect("reports serialise")
        )
    }

    /// Parses a worker's output line; `None` for lines that are not protocol.
    pub fn parse(line: &str) -> Option<Result<Report, serde_json::Error>> {
        line.strip_prefix(MARK).map(serde_json::from_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_foreign_lines_are_ignored() {
        let p = Progress {
            online: 3,
            ..Progress::default()
        };
        let line = Report::Progress(p).line();
        match Report::parse(&line) {
            Some(Ok(Report::Progress(q))) => assert_eq!(q, p),
            other => panic!("{other:?}"),
        }
        assert!(Report::parse("goose: starting").is_none());
        assert!(matches!(Report::parse(&format!("{MARK}{{")), Some(Err(_))));
        assert!(Phase::Provision < Phase::Connect && Phase::Settle < Phase::Finish);
    }
}
