//! fleetgate-loadtest as a library: the scenario parameters, the coordinator and worker
//! processes, the reference sink and the report generator behind the `fleetgate-loadtest`
//! binary, so that benchmark drivers can share its figures and formatting.

pub mod coordinator;
pub mod pace;
pub mod params;
pub mod report;
pub mod scrape;
pub mod sink;
pub mod summary;
pub mod tally;
pub mod wire;
pub mod worker;
