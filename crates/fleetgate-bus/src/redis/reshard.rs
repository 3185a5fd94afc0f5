//! Moving keys when the shard list changes (`fleetgate reshard`).
//!
//! A device's shard is picked by a consistent-hash ring over the shard list, so adding a
//! shard reassigns about 1/(N+1) of the devices (and of the telemetry partitions and
//! non-device channels) to it, and no key moves between the old shards. [`reshard`] scans
//! every source shard once, works out each key's shard under the new list, and moves those
//! whose shard changed with `DUMP` / `RESTORE` (keeping TTLs) / `DEL`. The command expiry
//! index (`qexp`, one per shard) moves member by member, and every destination's queue
//! sequence is raised to the highest source sequence, so commands pushed after the move sort
//! after the moved ones.
//!
//! Run it with every node stopped: a node writing meanwhile could write a key on the old
//! shard after it moved. [`reshard`] refuses while a node's membership is alive.
//!
//! What lives on shard 0 (the device registry with its group indexes `grp:`, the node list,
//! the admin documents `doc:` / `docs:` and the audit log `audit` / `audit:head`) follows the
//! first URL: it moves only when the first URL changes, and is never spread by the ring.
//!
//! Job execution keys (`jx:`, `jxi:`, `jc:`, `jq:`) are kept per shard, next to the queues of
//! their devices, and are left where they are (counted in [`ReshardReport::job_keys`]): run
//! the move with no job running. A finished job still reads whole afterwards (counts and
//! pages read every shard), but an execution whose device moved can no longer be recorded
//! or cancelled, and a server dropped from the list takes its part of every job with it.

use std::collections::BTreeMap;

use fred::clients::Client;
use fred::interfaces::{ClientLike, KeysInterface, SetsInterface, SortedSetsInterface};
use fred::types::config::Config;
use fred::types::{Builder, ClusterHash, CustomCommand, Value};

use super::{Ring, array, fred_err, string};
use crate::{BusError, BusResult};

/// Keys read per `SCAN` / `ZSCAN` page.
const PAGE: i64 = 1000;
/// Most unknown key names a report lists.
const MAX_LISTED: usize = 20;

/// What [`reshard`] did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReshardReport {
    /// Whether keys were moved (`false` = dry run).
    pub applied: bool,
    /// Keys looked at, over every source shard.
    pub scanned: u64,
    /// Keys whose shard changed: moved, or to move.
    pub moved: u64,
    /// Command expiry index entries moved, or to move.
    pub expiry_entries_moved: u64,
    /// Moved keys by destination URL.
    pub moved_to: BTreeMap<String, u64>,
    /// Membership keys left alone (they expire by themselves).
    pub transient: u64,
    /// Job execution keys left on their shard (see the module docs).
    pub job_keys: u64,
    /// Keys the destination already had: left on the source, for an operator to look at.
    pub conflicts: Vec<String>,
    /// Keys under the prefix this version does not know (left alone; at most 20 listed).
    pub unknown: Vec<String>,
}

/// Who decides a key's shard.
#[derive(Debug, PartialEq, Eq)]
enum Owner<'a> {
    /// What lives on shard 0: the device registry and its group indexes, the node list, the
    /// admin documents and the audit log.
    Registry,
    /// A device's own key: the device's shard.
    Device(&'a str),
    /// A key placed by a ring key of its own (`telemetry:<p>`, a channel name).
    Ring(String),
    /// The per-shard command expiry index (moved member by member).
    ExpiryIndex,
    /// The per-shard queue sequence.
    Sequence,
    /// Membership, rewritten by live nodes and expiring by itself.
    Transient,
    /// A job's executions on one shard: not moved.
    Job,
    Unknown,
}

/// Classifies a key by its name without the prefix (see the key layout in the module docs
/// of [`super`]). Device IDs may hold `:`, msgids may not, so `<device>:<msgid>` splits at
/// the last `:`.
fn owner(rest: &str) -> Owner<'_> {
    match rest {
        "devices" | "nodes" | "audit" => return Owner::Registry,
        "qexp" => return Owner::ExpiryIndex,
        "qseq" => return Owner::Sequence,
        _ => {}
    }
    let Some((tag, id)) = rest.split_once(':') else {
        return Owner::Unknown;
    };
    match tag {
        // Group, document and audit keys name no device: matching them before the device
        // tags keeps a group or document ID from being read as a device ID.
        "dev" | "grp" | "doc" | "docs" | "audit" => Owner::Registry,
        "jx" | "jxi" | "jc" | "jq" => Owner::Job,
        "node" | "pn" => Owner::Transient,
        "p" | "q" | "qh" | "sh" | "shd" => Owner::Device(id),
        "q2" | "res" => id
            .rsplit_once(':')
            .map_or(Owner::Unknown, |(device, _)| Owner::Device(device)),
        "tm" => Owner::Ring(format!("telemetry:{id}")),
        "ret" => match id.strip_prefix("device:") {
            Some(device) => Owner::Device(device),
            None => Owner::Ring(id.to_owned()),
        },
        _ => Owner::Unknown,
    }
}

/// One server, by URL (a URL listed in both lists is the same server).
struct Server {
    url: String,
    client: Client,
}

async fn connect(url: &str) -> BusResult<Client> {
    let config = Config::from_url(url)
        .map_err(|e| BusError::Unavailable(format!("bad redis url {url:?}: {e}")))?;
    let client = Builder::from_config(config).build().map_err(fred_err)?;
    client.init().await.map_err(fred_err)?;
    Ok(client)
}

async fn custom(client: &Client, cmd: &'static str, args: Vec<Value>) -> BusResult<Value> {
    client
        .custom::<Value, Value>(
            CustomCommand::new_static(cmd, ClusterHash::FirstKey, false),
            args,
        )
        .await
        .map_err(fred_err)
}

/// One `SCAN` / `ZSCAN` page: the next cursor (0 = done) and the page's items.
async fn scan_page(
    client: &Client,
    cmd: &'static str,
    mut args: Vec<Value>,
    cursor: i64,
    pattern: Option<&str>,
) -> BusResult<(i64, Vec<Value>)> {
    args.push(Value::from(cursor.to_string()));
    if let Some(p) = pattern {
        args.push(Value::from("MATCH"));
        args.push(Value::from(p.to_owned()));
    }
    args.push(Value::from("COUNT"));
    args.push(Value::from(PAGE));
    let mut reply = array(cmd, custom(client, cmd, args).await?)?.into_iter();
    let (Some(next), Some(items)) = (reply.next(), reply.next()) else {
        return Err(BusError::Corrupt(format!("{cmd}: short reply")));
    };
    let next = string(cmd, next)?
        .parse()
        .map_err(|_| BusError::Corrupt(format!("{cmd}: bad cursor")))?;
    Ok((next, array(cmd, items)?))
}

/// What became of one key.
enum Move {
    Moved,
    /// Not there any more (expired, or `SCAN` returned it twice).
    Gone,
    /// The destination has a key of that name: left on the source.
    Conflict,
}

/// Moves `key` from `src` to `dst`, keeping its TTL.
async fn move_key(src: &Client, dst: &Client, key: &str) -> BusResult<Move> {
    let dump: Value = src.dump(key).await.map_err(fred_err)?;
    if dump.is_null() {
        return Ok(Move::Gone);
    }
    let pttl: i64 = src.pttl(key).await.map_err(fred_err)?;
    let ttl = pttl.max(0);
    match dst
        .restore::<Value, _>(key, ttl, dump, false, false, None, None)
        .await
    {
        Ok(_) => {}
        Err(e) if e.details().contains("BUSYKEY") => return Ok(Move::Conflict),
        Err(e) => return Err(fred_err(e)),
    }
    let _: i64 = src.del(key).await.map_err(fred_err)?;
    Ok(Move::Moved)
}

/// Moves every key whose shard differs between the shard lists `from` and `to` (URLs, in
/// order, as nodes list them) under `key_prefix`; with `apply = false` only reports what it
/// would move. See the module docs.
///
/// # Errors
/// [`BusError::Unavailable`] when a server cannot be reached or a node is still alive;
/// a partial move can be resumed by running again (moved keys are where they belong).
pub async fn reshard(
    from: &[String],
    to: &[String],
    key_prefix: &str,
    apply: bool,
) -> BusResult<ReshardReport> {
    if from.is_empty() || to.is_empty() {
        return Err(BusError::Unavailable("both shard lists need a URL".into()));
    }
    let mut servers: Vec<Server> = Vec::new();
    for url in from.iter().chain(to) {
        if !servers.iter().any(|s| s.url == *url) {
            servers.push(Server {
                url: url.clone(),
                client: connect(url).await?,
            });
        }
    }
    let by_url = |url: &str| {
        servers
            .iter()
            .find(|s| s.url == url)
            .map(|s| &s.client)
            .expect("every URL is connected")
    };
    let live = live_nodes(by_url(&from[0]), key_prefix).await?;
    if !live.is_empty() {
        return Err(BusError::Unavailable(format!(
            "nodes are still alive ({}): stop every node first, and wait for its membership to expire",
            live.join(", ")
        )));
    }
    let ring = Ring::new(to.len());
    let mut report = ReshardReport {
        applied: apply,
        ..ReshardReport::default()
    };
    if apply {
        raise_sequences(from, to, key_prefix, &by_url).await?;
    }
    let mut sources: Vec<&String> = Vec::new();
    for url in from {
        if !sources.contains(&url) {
            sources.push(url);
        }
    }
    let pattern = format!("{key_prefix}*");
    for src_url in sources {
        let src = by_url(src_url);
        let mut cursor = 0;
        loop {
            let (next, keys) = scan_page(src, "SCAN", Vec::new(), cursor, Some(&pattern)).await?;
            for key in keys {
                let key = string("SCAN", key)?;
                report.scanned += 1;
                let Some(rest) = key.strip_prefix(key_prefix) else {
                    continue;
                };
                let shard = match owner(rest) {
                    Owner::Registry => 0,
                    Owner::Device(device) => ring.shard(device),
                    Owner::Ring(k) => ring.shard(&k),
                    Owner::ExpiryIndex => {
                        move_expiry_index(
                            src,
                            src_url,
                            to,
                            &ring,
                            &key,
                            apply,
                            &by_url,
                            &mut report,
                        )
                        .await?;
                        continue;
                    }
                    Owner::Sequence => continue,
                    Owner::Transient => {
                        report.transient += 1;
                        continue;
                    }
                    Owner::Job => {
                        report.job_keys += 1;
                        continue;
                    }
                    Owner::Unknown => {
                        if report.unknown.len() < MAX_LISTED {
                            report.unknown.push(key);
                        }
                        continue;
                    }
                };
                let dst_url = &to[shard];
                if dst_url == src_url {
                    continue;
                }
                if apply {
                    match move_key(src, by_url(dst_url), &key).await? {
                        Move::Moved => {}
                        Move::Gone => continue,
                        Move::Conflict => {
                            report.conflicts.push(key);
                            continue;
                        }
                    }
                }
                report.moved += 1;
                *report.moved_to.entry(dst_url.clone()).or_default() += 1;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    for server in &servers {
        let _ = server.client.quit().await;
    }
    Ok(report)
}

/// Node IDs whose membership key is still alive on the registry shard.
async fn live_nodes(client: &Client, prefix: &str) -> BusResult<Vec<String>> {
    let ids: Vec<String> = client
        .smembers(format!("{prefix}nodes"))
        .await
        .map_err(fred_err)?;
    let mut live = Vec::new();
    for id in ids {
        let n: i64 = client
            .exists(format!("{prefix}node:{id}"))
            .await
            .map_err(fred_err)?;
        if n > 0 {
            live.push(id);
        }
    }
    Ok(live)
}

/// Raises every destination's queue sequence to the highest source sequence, so commands
/// pushed after the move order after every moved one.
async fn raise_sequences<'a>(
    from: &[String],
    to: &[String],
    prefix: &str,
    by_url: &impl Fn(&str) -> &'a Client,
) -> BusResult<()> {
    let key = format!("{prefix}qseq");
    let mut highest = 0i64;
    for url in from {
        let v: Option<i64> = by_url(url).get(&key).await.map_err(fred_err)?;
        highest = highest.max(v.unwrap_or(0));
    }
    for url in to {
        let client = by_url(url);
        let v: Option<i64> = client.get(&key).await.map_err(fred_err)?;
        if v.unwrap_or(0) < highest {
            let _: Value = client
                .set(&key, highest, None, None, false)
                .await
                .map_err(fred_err)?;
        }
    }
    Ok(())
}

/// Moves the expiry index entries (`"<msgid> <device>"` scored by expiry) of devices whose
/// shard changed.
#[allow(clippy::too_many_arguments)]
async fn move_expiry_index<'a>(
    src: &Client,
    src_url: &str,
    to: &[String],
    ring: &Ring,
    key: &str,
    apply: bool,
    by_url: &impl Fn(&str) -> &'a Client,
    report: &mut ReshardReport,
) -> BusResult<()> {
    let mut cursor = 0;
    loop {
        let (next, items) = scan_page(
            src,
            "ZSCAN",
            vec![Value::from(key.to_owned())],
            cursor,
            None,
        )
        .await?;
        let mut items = items.into_iter();
        while let (Some(member), Some(score)) = (items.next(), items.next()) {
            let member = string("ZSCAN", member)?;
            let Some((_, device)) = member.split_once(' ') else {
                continue;
            };
            let dst_url = &to[ring.shard(device)];
            if dst_url == src_url {
                continue;
            }
            if apply {
                let score: f64 = string("ZSCAN", score)?
                    .parse()
                    .map_err(|_| BusError::Corrupt("ZSCAN: bad score".into()))?;
                let _: i64 = by_url(dst_url)
                    .zadd(key, None, None, false, false, (score, member.as_str()))
                    .await
                    .map_err(fred_err)?;
                let _: i64 = src.zrem(key, member.as_str()).await.map_err(fred_err)?;
            }
            report.expiry_entries_moved += 1;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::{Owner, owner};

    #[test]
    fn keys_are_owned_by_what_places_them() {
        assert_eq!(owner("devices"), Owner::Registry);
        assert_eq!(owner("dev:a:b"), Owner::Registry);
        assert_eq!(owner("nodes"), Owner::Registry);
        assert_eq!(owner("grp:farm:a"), Owner::Registry);
        assert_eq!(owner("grp:p:x"), Owner::Registry);
        assert_eq!(owner("doc:user:alice"), Owner::Registry);
        assert_eq!(owner("doc:active-job:j1"), Owner::Registry);
        assert_eq!(owner("docs:scene"), Owner::Registry);
        assert_eq!(owner("audit"), Owner::Registry);
        assert_eq!(owner("audit:head"), Owner::Registry);
        assert_eq!(owner("jx:j1"), Owner::Job);
        assert_eq!(owner("jxi:j1"), Owner::Job);
        assert_eq!(owner("jc:j:1"), Owner::Job);
        assert_eq!(owner("jq:j1"), Owner::Job);
        assert_eq!(owner("node:n1"), Owner::Transient);
        assert_eq!(owner("pn:n1"), Owner::Transient);
        assert_eq!(owner("p:plant:7"), Owner::Device("plant:7"));
        assert_eq!(owner("q:d"), Owner::Device("d"));
        assert_eq!(owner("qh:d"), Owner::Device("d"));
        assert_eq!(owner("sh:d.x"), Owner::Device("d.x"));
        assert_eq!(owner("q2:plant:7:m-1"), Owner::Device("plant:7"));
        assert_eq!(owner("res:d:m_2"), Owner::Device("d"));
        assert_eq!(owner("qexp"), Owner::ExpiryIndex);
        assert_eq!(owner("qseq"), Owner::Sequence);
        assert_eq!(owner("tm:3"), Owner::Ring("telemetry:3".into()));
        assert_eq!(owner("ret:device:d1"), Owner::Device("d1"));
        assert_eq!(owner("ret:group:g"), Owner::Ring("group:g".into()));
        assert_eq!(owner("ret:alerts"), Owner::Ring("alerts".into()));
        assert_eq!(owner("res:no-msgid"), Owner::Unknown);
        assert_eq!(owner("something"), Owner::Unknown);
        assert_eq!(owner("zz:1"), Owner::Unknown);
    }
}
