//! The Redis backend's alerts: the `alerts` stream and the `alerts:open` hash, on shard 0
//! next to the audit log (see the key layout in the module docs).

use fred::interfaces::HashesInterface;

use super::{RedisBus, fred_err, string, v};
use crate::{AlertRecord, BusResult, StreamId};

impl RedisBus {
    /// [`crate::Bus::alert_record`]: the stream append and the open set in one script.
    pub(super) async fn record_alert(
        &self,
        id: &str,
        alert: &str,
        open: bool,
    ) -> BusResult<StreamId> {
        let reply = self
            .eval(
                0,
                &self.inner.scripts.admin.alert_record,
                vec![self.key("alerts", ""), self.key("alerts:open", "")],
                vec![
                    v(self.inner.config.alerts_max_len.max(1).to_string()),
                    v(id),
                    v(alert),
                    v(if open { "1" } else { "0" }),
                ],
            )
            .await?;
        Ok(StreamId(string("alert_record", reply)?))
    }

    /// [`crate::Bus::alert_open`].
    pub(super) async fn open_alert(&self, id: &str) -> BusResult<Option<String>> {
        self.client(0)
            .hget(self.key("alerts:open", ""), id)
            .await
            .map_err(fred_err)
    }

    /// [`crate::Bus::alerts_open`]. `HVALS` reads the whole set: open alerts are few
    /// compared with the stream (one per firing rule and device, until it resolves).
    pub(super) async fn open_alerts(&self, limit: usize) -> BusResult<Vec<String>> {
        let mut all: Vec<String> = self
            .client(0)
            .hvals(self.key("alerts:open", ""))
            .await
            .map_err(fred_err)?;
        all.truncate(limit);
        Ok(all)
    }

    /// [`crate::Bus::alerts_read`].
    pub(super) async fn read_alerts(
        &self,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<AlertRecord>> {
        let texts = self
            .stream_texts(self.key("alerts", ""), "a", after, limit)
            .await?;
        Ok(texts
            .into_iter()
            .map(|(id, alert)| AlertRecord { id, alert })
            .collect())
    }
}
