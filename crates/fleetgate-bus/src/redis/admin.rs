//! The Redis backend's device registry (with its group index), admin documents, audit log and
//! job executions; the key layout is in the docs of [`super`], the scripts in
//! `admin_scripts`. The registry, documents and audit log live on shard 0; a job's executions
//! live with their devices, so pushing and recording them is one script on the device's
//! shard, and reading a job spans every shard.

use std::collections::{BTreeMap, BTreeSet};

use fred::interfaces::KeysInterface;
use fred::types::Value;
use fred::types::scripts::Script;

use super::{RedisBus, admin_scripts, array, codec, fred_err, int, opt_string, string, v, wall_ms};
use crate::{
    AuditRecord, BusError, BusResult, Command, DeviceQuery, DeviceRecord, Doc, DocExpect, DocKind,
    DocWrite, JobCounts, JobExec, JobExecState, JobPush, NodeMessage, StreamId,
};

/// Commands per job push script call: bounds one call's arguments and how long it blocks
/// its shard.
const JOB_PUSH_BATCH: usize = 500;

/// The admin scripts, loaded once per bus.
pub(super) struct AdminScripts {
    device_create: Script,
    device_update: Script,
    device_delete: Script,
    device_purge: Script,
    index_range: Script,
    doc_put: Script,
    doc_list: Script,
    doc_delete: Script,
    audit_append: Script,
    pub(super) alert_record: Script,
    job_push: Script,
    job_record: Script,
    job_execs: Script,
    job_cancel: Script,
}

impl AdminScripts {
    /// Loads every admin script's text (sent to Redis on first use).
    pub(super) fn new() -> Self {
        Self {
            device_create: Script::from_lua(admin_scripts::DEVICE_CREATE),
            device_update: Script::from_lua(admin_scripts::DEVICE_UPDATE),
            device_delete: Script::from_lua(admin_scripts::DEVICE_DELETE),
            device_purge: Script::from_lua(admin_scripts::DEVICE_PURGE),
            index_range: Script::from_lua(admin_scripts::INDEX_RANGE),
            doc_put: Script::from_lua(admin_scripts::DOC_PUT),
            doc_list: Script::from_lua(admin_scripts::DOC_LIST),
            doc_delete: Script::from_lua(admin_scripts::DOC_DELETE),
            audit_append: Script::from_lua(admin_scripts::AUDIT_APPEND),
            alert_record: Script::from_lua(admin_scripts::ALERT_RECORD),
            job_push: Script::from_lua(admin_scripts::JOB_PUSH),
            job_record: Script::from_lua(admin_scripts::JOB_RECORD),
            job_execs: Script::from_lua(admin_scripts::JOB_EXECS),
            job_cancel: Script::from_lua(admin_scripts::JOB_CANCEL),
        }
    }
}

/// A count or limit as a Redis integer argument.
fn count(n: usize) -> Value {
    Value::from(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The `ZRANGEBYLEX` start after an exclusive cursor (`-`: from the first member).
fn lex_after(after: Option<&str>) -> String {
    after.map_or_else(|| "-".to_owned(), |a| format!("({a}"))
}

/// Pairs up a flat `{a, b, a, b, ...}` script reply.
fn pairs(what: &str, reply: Value) -> BusResult<Vec<(String, String)>> {
    let flat = array(what, reply)?;
    if flat.len() % 2 != 0 {
        return Err(BusError::Corrupt(format!("{what}: odd reply length")));
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        out.push((string(what, a)?, string(what, b)?));
    }
    Ok(out)
}

fn parse_version(what: &str, text: &str) -> BusResult<u64> {
    text.parse()
        .map_err(|_| BusError::Corrupt(format!("{what}: bad version {text:?}")))
}

impl RedisBus {
    fn group_key(&self, group: &str) -> String {
        self.key("grp:", group)
    }

    fn doc_key(&self, kind: DocKind, id: &str) -> String {
        self.key("doc:", &format!("{}:{id}", kind.as_str()))
    }

    fn doc_index(&self, kind: DocKind) -> String {
        self.key("docs:", kind.as_str())
    }

    /// `jx`, `jxi`, `jc`, `jq` of a job: the order every job script takes them in.
    fn job_keys(&self, job: &str) -> Vec<String> {
        ["jx:", "jxi:", "jc:", "jq:"]
            .into_iter()
            .map(|tag| self.key(tag, job))
            .collect()
    }

    fn job_retention_ms(&self) -> Value {
        let ms = self.inner.config.job_retention.as_millis().max(1);
        Value::from(i64::try_from(ms).unwrap_or(i64::MAX))
    }

    // --- registry --------------------------------------------------------------------------

    /// [`crate::Bus::device_create`], with the device's group index entries.
    pub(super) async fn create_device(&self, device: &DeviceRecord) -> BusResult<bool> {
        let mut keys = vec![self.key("dev:", &device.id), self.key("devices", "")];
        keys.extend(device.groups.iter().map(|g| self.group_key(g)));
        let reply = self
            .eval(
                0,
                &self.inner.scripts.admin.device_create,
                keys,
                vec![v(codec::encode_device(device)), v(device.id.clone())],
            )
            .await?;
        Ok(int("device_create", reply)? == 1)
    }

    /// [`crate::Bus::device_get`].
    pub(super) async fn get_device(&self, id: &str) -> BusResult<Option<DeviceRecord>> {
        let text: Option<String> = self
            .client(0)
            .get(self.key("dev:", id))
            .await
            .map_err(fred_err)?;
        text.as_deref().map(codec::decode_device).transpose()
    }

    /// [`crate::Bus::device_update`], moving the device between group indexes.
    pub(super) async fn update_device(&self, device: &DeviceRecord) -> BusResult<bool> {
        let mut keys = vec![self.key("dev:", &device.id)];
        keys.extend(device.groups.iter().map(|g| self.group_key(g)));
        let reply = self
            .eval(
                0,
                &self.inner.scripts.admin.device_update,
                keys,
                vec![
                    v(codec::encode_device(device)),
                    v(device.id.clone()),
                    self.prefix(),
                ],
            )
            .await?;
        Ok(int("device_update", reply)? == 1)
    }

    /// [`crate::Bus::device_query`].
    ///
    /// IDs come from the ID index or the group indexes (each read at most `limit` from the
    /// start, in one script); their sorted union is merged here, because Lua's string order
    /// follows the server's locale, not the byte order of `ZRANGEBYLEX`.
    pub(super) async fn query_devices(&self, q: &DeviceQuery) -> BusResult<Vec<DeviceRecord>> {
        if q.limit == 0 {
            return Ok(Vec::new());
        }
        let prefix = q.prefix.as_deref().unwrap_or("");
        // Start at the later of the cursor and the prefix.
        let start = match q.after.as_deref() {
            Some(a) if a >= prefix => format!("({a}"),
            _ => format!("[{prefix}"),
        };
        let keys: Vec<String> = match &q.groups {
            None => vec![self.key("devices", "")],
            Some(groups) => groups.iter().map(|g| self.group_key(g)).collect(),
        };
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let reply = self
            .eval(
                0,
                &self.inner.scripts.admin.index_range,
                keys,
                vec![v(start), count(q.limit)],
            )
            .await?;
        let mut union = BTreeSet::new();
        for range in array("device_query", reply)? {
            for id in array("device_query", range)? {
                let id = string("device_query", id)?;
                // A range is sorted: once an ID leaves the prefix, the rest do too.
                if !id.starts_with(prefix) {
                    break;
                }
                union.insert(id);
            }
        }
        let ids: Vec<String> = union.into_iter().take(q.limit).collect();
        // A device deleted between the two reads is left out.
        Ok(self
            .get_devices(&ids)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    /// [`crate::Bus::device_get_many`]: one `MGET` on shard 0.
    pub(super) async fn get_devices(&self, ids: &[String]) -> BusResult<Vec<Option<DeviceRecord>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = ids.iter().map(|id| v(self.key("dev:", id))).collect();
        let reply = self.custom(0, "MGET", keys).await?;
        let values = array("device_get_many", reply)?;
        if values.len() != ids.len() {
            return Err(BusError::Corrupt(
                "device_get_many: wrong number of answers".into(),
            ));
        }
        values
            .into_iter()
            .map(|text| {
                opt_string("device_get_many", text)?
                    .as_deref()
                    .map(codec::decode_device)
                    .transpose()
            })
            .collect()
    }

    /// [`crate::Bus::device_delete`].
    ///
    /// The device's shard is purged before its record goes: a call that fails between the
    /// two leaves the record, so retrying finds it and finishes the job.
    pub(super) async fn delete_device(&self, id: &str) -> BusResult<bool> {
        let record = self.key("dev:", id);
        let exists: i64 = self.client(0).exists(&record).await.map_err(fred_err)?;
        if exists == 0 {
            return Ok(false);
        }
        self.eval(
            self.shard_for(id),
            &self.inner.scripts.admin.device_purge,
            vec![
                self.key("q:", id),
                self.key("qh:", id),
                self.key("qexp", ""),
                self.key("sh:", id),
                self.key("shd:", id),
            ],
            vec![v(id)],
        )
        .await?;
        let reply = self
            .eval(
                0,
                &self.inner.scripts.admin.device_delete,
                vec![record, self.key("devices", "")],
                vec![v(id), self.prefix()],
            )
            .await?;
        Ok(int("device_delete", reply)? == 1)
    }

    // --- documents -------------------------------------------------------------------------

    /// [`crate::Bus::doc_put`]: check and write in one script.
    pub(super) async fn put_doc(
        &self,
        kind: DocKind,
        id: &str,
        body: &str,
        expect: DocExpect,
    ) -> BusResult<DocWrite> {
        let (mode, version) = match expect {
            DocExpect::Absent => ("absent", 0),
            DocExpect::Version(n) => ("version", n),
            DocExpect::Any => ("any", 0),
        };
        let reply = self
            .eval(
                0,
                &self.inner.scripts.admin.doc_put,
                vec![self.doc_key(kind, id), self.doc_index(kind)],
                vec![v(id), v(body), v(mode), v(version.to_string())],
            )
            .await?;
        let mut parts = array("doc_put", reply)?.into_iter();
        let (Some(written), Some(version)) = (parts.next(), parts.next()) else {
            return Err(BusError::Corrupt("doc_put: short reply".into()));
        };
        let version = opt_string("doc_put", version)?
            .map(|s| parse_version("doc_put", &s))
            .transpose()?;
        match (int("doc_put", written)?, version) {
            (1, Some(n)) => Ok(DocWrite::Written(n)),
            (0, current) => Ok(DocWrite::Conflict(current)),
            (status, _) => Err(BusError::Corrupt(format!(
                "doc_put: unexpected status {status}"
            ))),
        }
    }

    /// [`crate::Bus::doc_get`].
    pub(super) async fn get_doc(&self, kind: DocKind, id: &str) -> BusResult<Option<Doc>> {
        let reply = self
            .custom(0, "HMGET", vec![v(self.doc_key(kind, id)), v("v"), v("b")])
            .await?;
        let mut fields = array("doc_get", reply)?.into_iter();
        let (Some(version), Some(body)) = (fields.next(), fields.next()) else {
            return Err(BusError::Corrupt("doc_get: short reply".into()));
        };
        let Some(version) = opt_string("doc_get", version)? else {
            return Ok(None);
        };
        Ok(Some(Doc {
            id: id.to_owned(),
            version: parse_version("doc_get", &version)?,
            body: string("doc_get", body)?,
        }))
    }

    /// [`crate::Bus::doc_list`]: IDs and bodies read in one script.
    pub(super) async fn list_docs(
        &self,
        kind: DocKind,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<Doc>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let reply = self
            .eval(
                0,
                &self.inner.scripts.admin.doc_list,
                vec![self.doc_index(kind)],
                vec![v(self.doc_key(kind, "")), v(lex_after(after)), count(limit)],
            )
            .await?;
        let flat = array("doc_list", reply)?;
        if flat.len() % 3 != 0 {
            return Err(BusError::Corrupt("doc_list: reply is not triples".into()));
        }
        let mut docs = Vec::with_capacity(flat.len() / 3);
        let mut it = flat.into_iter();
        while let (Some(id), Some(version), Some(body)) = (it.next(), it.next(), it.next()) {
            docs.push(Doc {
                id: string("doc_list", id)?,
                version: parse_version("doc_list", &string("doc_list", version)?)?,
                body: string("doc_list", body)?,
            });
        }
        Ok(docs)
    }

    /// [`crate::Bus::doc_delete`].
    pub(super) async fn delete_doc(&self, kind: DocKind, id: &str) -> BusResult<bool> {
        let reply = self
            .eval(
                0,
                &self.inner.scripts.admin.doc_delete,
                vec![self.doc_key(kind, id), self.doc_index(kind)],
                vec![v(id)],
            )
            .await?;
        Ok(int("doc_delete", reply)? == 1)
    }

    // --- audit log -------------------------------------------------------------------------

    /// [`crate::Bus::audit_head`].
    pub(super) async fn read_audit_head(&self) -> BusResult<String> {
        let head: Option<String> = self
            .client(0)
            .get(self.key("audit:head", ""))
            .await
            .map_err(fred_err)?;
        Ok(head.unwrap_or_default())
    }

    /// [`crate::Bus::audit_append`]: head check, entries and new head in one script.
    pub(super) async fn append_audit(
        &self,
        expected_head: &str,
        new_head: &str,
        entries: &[String],
    ) -> BusResult<Option<Vec<StreamId>>> {
        let mut args = vec![v(expected_head), v(new_head)];
        args.extend(entries.iter().map(|e| v(e.clone())));
        let reply = self
            .eval(
                0,
                &self.inner.scripts.admin.audit_append,
                vec![self.key("audit", ""), self.key("audit:head", "")],
                args,
            )
            .await?;
        // Nil (the head moved) and an empty array (nothing to append) differ here.
        if reply.is_null() {
            return Ok(None);
        }
        let ids = array("audit_append", reply)?
            .into_iter()
            .map(|id| string("audit_append", id).map(StreamId))
            .collect::<BusResult<Vec<_>>>()?;
        if ids.len() != entries.len() {
            return Err(BusError::Corrupt(
                "audit_append: wrong number of IDs".into(),
            ));
        }
        Ok(Some(ids))
    }

    /// [`crate::Bus::audit_read`].
    pub(super) async fn read_audit(
        &self,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<AuditRecord>> {
        let texts = self
            .stream_texts(self.key("audit", ""), "e", after, limit)
            .await?;
        Ok(texts
            .into_iter()
            .map(|(id, entry)| AuditRecord { id, entry })
            .collect())
    }

    // --- jobs ------------------------------------------------------------------------------

    /// [`crate::Bus::job_push`]: one script per shard and batch of commands.
    pub(super) async fn push_job(
        &self,
        job: &str,
        commands: &[Command],
    ) -> BusResult<Vec<JobPush>> {
        let mut keys = self.job_keys(job);
        keys.push(self.key("qexp", ""));
        keys.push(self.key("qseq", ""));
        let now = wall_ms().to_string();
        let devices: Vec<&str> = commands.iter().map(|c| c.device.as_str()).collect();
        let statuses = self
            .eval_per_device(
                "job_push",
                &devices,
                JOB_PUSH_BATCH,
                &self.inner.scripts.admin.job_push,
                |chunk| {
                    let mut args = Vec::with_capacity(4 + chunk.len() * 5);
                    args.extend([
                        self.prefix(),
                        count(self.inner.config.queue_max_len),
                        self.job_retention_ms(),
                        v(now.clone()),
                    ]);
                    for &i in chunk {
                        let c = &commands[i];
                        let deliver = NodeMessage::Deliver {
                            device: c.device.clone(),
                        };
                        args.extend([
                            v(c.device.clone()),
                            v(c.msgid.as_str()),
                            v(codec::encode_command(c)),
                            v(c.expires_ms.to_string()),
                            v(codec::encode_node_message(&deliver)),
                        ]);
                    }
                    (keys.clone(), args)
                },
            )
            .await?;
        statuses
            .into_iter()
            .map(|status| match int("job_push", status)? {
                0 => Ok(JobPush::Exists),
                1 => Ok(JobPush::Queued),
                2 => Ok(JobPush::QueueFull),
                other => Err(BusError::Corrupt(format!(
                    "job_push: unexpected status {other}"
                ))),
            })
            .collect()
    }

    /// [`crate::Bus::job_record`]: one script on the device's shard.
    pub(super) async fn record_job(
        &self,
        job: &str,
        device: &str,
        state: JobExecState,
    ) -> BusResult<bool> {
        let reply = self
            .eval(
                self.shard_for(device),
                &self.inner.scripts.admin.job_record,
                self.job_keys(job),
                vec![
                    v(device),
                    v(state.as_str()),
                    Value::from(i64::from(state.rank())),
                    v(wall_ms().to_string()),
                    self.job_retention_ms(),
                ],
            )
            .await?;
        match int("job_record", reply)? {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(BusError::Corrupt(format!(
                "job_record: unreadable execution of {device} in job {job}"
            ))),
        }
    }

    /// [`crate::Bus::job_counts`]: every shard's counts, added up.
    pub(super) async fn count_job(&self, job: &str) -> BusResult<JobCounts> {
        let key = self.key("jc:", job);
        let mut total = JobCounts::default();
        for shard in 0..self.inner.shards.len() {
            let mut args = vec![v(key.clone())];
            args.extend(JobExecState::ALL.iter().map(|s| v(s.as_str())));
            let reply = self.custom(shard, "HMGET", args).await?;
            let values = array("job_counts", reply)?;
            if values.len() != JobExecState::ALL.len() {
                return Err(BusError::Corrupt(
                    "job_counts: wrong number of fields".into(),
                ));
            }
            let mut counts = JobCounts::default();
            for (state, n) in JobExecState::ALL.into_iter().zip(values) {
                if !n.is_null() {
                    *counts.get_mut(state) = u64::try_from(int("job_counts", n)?).unwrap_or(0);
                }
            }
            total.add(&counts);
        }
        Ok(total)
    }

    /// [`crate::Bus::job_execs`]: every shard's page, merged in device order.
    pub(super) async fn list_job_execs(
        &self,
        job: &str,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<JobExec>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let start = lex_after(after);
        let mut merged = BTreeMap::new();
        for shard in 0..self.inner.shards.len() {
            let reply = self
                .eval(
                    shard,
                    &self.inner.scripts.admin.job_execs,
                    vec![self.key("jxi:", job), self.key("jx:", job)],
                    vec![v(start.clone()), count(limit)],
                )
                .await?;
            for (device, text) in pairs("job_execs", reply)? {
                let exec = codec::decode_job_exec(&device, &text)?;
                merged.insert(device, exec);
            }
        }
        Ok(merged.into_values().take(limit).collect())
    }

    /// [`crate::Bus::job_cancel`]: shard by shard until `limit` are taken.
    pub(super) async fn cancel_job(&self, job: &str, limit: usize) -> BusResult<usize> {
        let mut keys = self.job_keys(job);
        keys.push(self.key("qexp", ""));
        let mut taken = 0usize;
        for shard in 0..self.inner.shards.len() {
            if taken >= limit {
                break;
            }
            let reply = self
                .eval(
                    shard,
                    &self.inner.scripts.admin.job_cancel,
                    keys.clone(),
                    vec![
                        self.prefix(),
                        count(limit - taken),
                        v(wall_ms().to_string()),
                        self.job_retention_ms(),
                    ],
                )
                .await?;
            taken += usize::try_from(int("job_cancel", reply)?).unwrap_or(0);
        }
        Ok(taken)
    }
}
