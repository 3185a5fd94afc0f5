//! The admin state's part of the suite: documents, the audit log, registry queries, device
//! deletes and job executions. Listed in [`crate::bus_conformance_tests!`] with the rest.
//!
//! The audit log is one per bus, so on a shared backend every audit test appends among
//! others': each appends with [`append_at_head`] (re-reading the head until its append
//! lands) and checks only what holds whoever else appends, such as the adjacency of one
//! append's entries and the uniqueness of head tokens.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use fleetgate_protocol::Qos;
use serde_json::json;

use super::{
    LONG_TTL_MS, PATIENCE, command, device_record, live_command, node_info, now_ms, obj, parse_id,
    presence, recv_node, unique_id,
};
use crate::{
    AuditRecord, Bus, BusError, Command, DeviceQuery, DeviceRecord, Doc, DocExpect, DocKind,
    DocWrite, JobCounts, JobExec, JobExecState, JobPush, NodeMessage, StreamId,
};

/// Runs futures concurrently (the suite has no futures crate) and returns their outputs in
/// order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

// --- documents -------------------------------------------------------------------------------

async fn put(bus: &dyn Bus, kind: DocKind, id: &str, body: &str, expect: DocExpect) -> DocWrite {
    bus.doc_put(kind, id, body, expect).await.expect("doc_put")
}

async fn get(bus: &dyn Bus, kind: DocKind, id: &str) -> Option<Doc> {
    bus.doc_get(kind, id).await.expect("doc_get")
}

fn doc(id: &str, version: u64, body: &str) -> Doc {
    Doc {
        id: id.to_owned(),
        version,
        body: body.to_owned(),
    }
}

/// `Absent` creates once, `Version` is compare-and-set, `Any` always writes; versions start
/// at 1 and grow by one per write; kinds are separate namespaces; bodies are opaque text.
pub async fn doc_put_expectations(bus: &dyn Bus) {
    let kind = DocKind::User;
    let id = unique_id("doc");
    assert_eq!(get(bus, kind, &id).await, None, "unknown document");
    assert_eq!(
        put(bus, kind, &id, "v1", DocExpect::Absent).await,
        DocWrite::Written(1)
    );
    assert_eq!(
        put(bus, kind, &id, "again", DocExpect::Absent).await,
        DocWrite::Conflict(Some(1)),
        "a second create conflicts and names the current version"
    );
    assert_eq!(get(bus, kind, &id).await, Some(doc(&id, 1, "v1")));
    assert_eq!(
        put(bus, kind, &id, "x", DocExpect::Version(2)).await,
        DocWrite::Conflict(Some(1)),
        "a version from the future"
    );
    assert_eq!(
        put(bus, kind, &id, "v2", DocExpect::Version(1)).await,
        DocWrite::Written(2)
    );
    assert_eq!(
        put(bus, kind, &id, "stale", DocExpect::Version(1)).await,
        DocWrite::Conflict(Some(2)),
        "a stale version"
    );
    assert_eq!(get(bus, kind, &id).await, Some(doc(&id, 2, "v2")));
    assert_eq!(
        put(bus, kind, &id, "v3", DocExpect::Any).await,
        DocWrite::Written(3)
    );
    assert_eq!(get(bus, kind, &id).await, Some(doc(&id, 3, "v3")));

    let missing = unique_id("doc-missing");
    assert_eq!(
        put(bus, kind, &missing, "x", DocExpect::Version(1)).await,
        DocWrite::Conflict(None),
        "compare-and-set of a missing document"
    );
    assert_eq!(
        get(bus, kind, &missing).await,
        None,
        "a conflict writes nothing"
    );
    assert_eq!(
        put(bus, kind, &missing, "", DocExpect::Any).await,
        DocWrite::Written(1),
        "Any creates"
    );
    assert_eq!(get(bus, kind, &missing).await, Some(doc(&missing, 1, "")));

    assert_eq!(get(bus, DocKind::Scene, &id).await, None, "kinds are apart");
    assert_eq!(
        put(bus, DocKind::Scene, &id, "scene", DocExpect::Absent).await,
        DocWrite::Written(1)
    );
    assert_eq!(get(bus, kind, &id).await, Some(doc(&id, 3, "v3")));

    let body = "{\"k\": [1, 2.5, null]}\n\u{e9}\u{1f600}\t' \" \\ \u{0}";
    assert_eq!(
        put(bus, DocKind::ApiKey, &id, body, DocExpect::Absent).await,
        DocWrite::Written(1)
    );
    assert_eq!(
        get(bus, DocKind::ApiKey, &id).await,
        Some(doc(&id, 1, body)),
        "bodies come back byte for byte"
    );
}

/// Concurrent writers with the same expectation: exactly one `Written`, the others see the
/// winner's version.
pub async fn doc_concurrent_writers_one_wins(bus: &dyn Bus) {
    const WRITERS: usize = 8;
    let kind = DocKind::Job;
    let id = unique_id("doc-race");
    for (round, expect) in [DocExpect::Absent, DocExpect::Version(1)]
        .into_iter()
        .enumerate()
    {
        let bodies: Vec<String> = (0..WRITERS).map(|w| format!("r{round} w{w}")).collect();
        let results = join_all(
            bodies
                .iter()
                .map(|b| bus.doc_put(kind, &id, b, expect))
                .collect(),
        )
        .await;
        let version = round as u64 + 1;
        let winners: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| **r == Ok(DocWrite::Written(version)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for (i, r) in results.iter().enumerate() {
            if i != winners[0] {
                assert_eq!(
                    *r,
                    Ok(DocWrite::Conflict(Some(version))),
                    "round {round}: a loser sees the winner's version"
                );
            }
        }
        assert_eq!(
            get(bus, kind, &id).await,
            Some(doc(&id, version, &bodies[winners[0]])),
            "round {round}: the winner's body is stored"
        );
    }
}

/// `doc_list` pages a kind in ID order, exclusive of `after`, with versions and bodies.
pub async fn doc_list_order_and_paging(bus: &dyn Bus) {
    let kind = DocKind::Scene;
    let prefix = unique_id("docl");
    let ids: Vec<String> = (0..5).map(|i| format!("{prefix}/{i}")).collect();
    for i in [3, 0, 4, 1, 2] {
        assert_eq!(
            put(bus, kind, &ids[i], &format!("b{i}"), DocExpect::Absent).await,
            DocWrite::Written(1)
        );
    }
    assert_eq!(
        put(bus, kind, &ids[2], "b2'", DocExpect::Any).await,
        DocWrite::Written(2)
    );
    let list = |after: String, limit: usize| async move {
        bus.doc_list(kind, Some(&after), limit)
            .await
            .expect("doc_list")
    };
    assert_eq!(
        list(prefix.clone(), 2).await,
        [doc(&ids[0], 1, "b0"), doc(&ids[1], 1, "b1")],
        "first page"
    );
    assert_eq!(
        list(ids[1].clone(), 2).await,
        [doc(&ids[2], 2, "b2'"), doc(&ids[3], 1, "b3")],
        "second page, after is exclusive"
    );
    let third = list(ids[3].clone(), 2).await;
    assert!(!third.is_empty() && third.len() <= 2);
    assert_eq!(third[0], doc(&ids[4], 1, "b4"));
    assert!(third.iter().all(|d| d.id > ids[3]));
    assert!(list(prefix.clone(), 0).await.is_empty(), "limit 0");

    let all = bus.doc_list(kind, None, 1000).await.expect("doc_list");
    assert!(all.len() <= 1000);
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "strictly increasing ID order"
    );
    let other_kind = bus
        .doc_list(DocKind::ActiveJob, Some(&prefix), 10)
        .await
        .expect("doc_list");
    assert!(
        other_kind.iter().all(|d| !d.id.starts_with(&prefix)),
        "another kind lists none of these"
    );
}

/// A deleted document is gone from reads and listings, and absent again for `Absent`.
pub async fn doc_delete_removes(bus: &dyn Bus) {
    let kind = DocKind::ApiKey;
    let prefix = unique_id("docd");
    let (id, next) = (format!("{prefix}/a"), format!("{prefix}/b"));
    put(bus, kind, &id, "a", DocExpect::Absent).await;
    put(bus, kind, &next, "b", DocExpect::Absent).await;
    assert!(bus.doc_delete(kind, &id).await.expect("doc_delete"));
    assert!(
        !bus.doc_delete(kind, &id).await.expect("doc_delete"),
        "a second delete finds nothing"
    );
    assert_eq!(get(bus, kind, &id).await, None);
    let listed = bus
        .doc_list(kind, Some(&prefix), 10)
        .await
        .expect("doc_list");
    assert_eq!(
        listed.first(),
        Some(&doc(&next, 1, "b")),
        "skipped in lists"
    );
    assert_eq!(
        put(bus, kind, &id, "again", DocExpect::Version(1)).await,
        DocWrite::Conflict(None)
    );
    assert_eq!(
        put(bus, kind, &id, "again", DocExpect::Absent).await,
        DocWrite::Written(1),
        "a deleted document is absent: created anew from version 1"
    );
    assert!(
        !bus.doc_delete(DocKind::User, &id)
            .await
            .expect("doc_delete"),
        "deletes are per kind"
    );
    assert_eq!(get(bus, kind, &id).await, Some(doc(&id, 1, "again")));
}

// --- audit log -------------------------------------------------------------------------------

/// Appends `entries` at whatever the head is, re-reading it while other appenders move it:
/// `(head it extended, head it set, positions)`. Head tokens are unique, so a head once
/// replaced never comes back.
pub async fn append_at_head(bus: &dyn Bus, entries: &[String]) -> (String, String, Vec<StreamId>) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let head = bus.audit_head().await.expect("audit_head");
        let new = unique_id("head");
        if let Some(ids) = bus
            .audit_append(&head, &new, entries)
            .await
            .expect("audit_append")
        {
            assert_eq!(ids.len(), entries.len(), "one position per entry");
            return (head, new, ids);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "audit_append never found the head it had just read within {PATIENCE:?}"
        );
    }
}

/// Every entry after `after` (exclusive), paging `page` at a time, checking each page.
async fn read_audit_all(bus: &dyn Bus, after: &StreamId, page: usize) -> Vec<AuditRecord> {
    let mut cursor = after.clone();
    let mut out = Vec::new();
    loop {
        let got = bus
            .audit_read(Some(&cursor), page)
            .await
            .expect("audit_read");
        assert!(got.len() <= page, "audit_read returned more than its limit");
        let Some(last) = got.last() else {
            return out;
        };
        assert!(
            got.iter().all(|r| parse_id(&r.id) > parse_id(&cursor)),
            "audit_read is not exclusive of {:?}",
            cursor.0
        );
        assert!(
            got.windows(2)
                .all(|w| parse_id(&w[0].id) < parse_id(&w[1].id)),
            "audit_read out of order"
        );
        cursor = last.id.clone();
        out.extend(got);
    }
}

/// An append lands only on the head it expects and then sets the new one; an append on a
/// stale head writes nothing. One append's entries are adjacent, in order.
pub async fn audit_append_is_conditional(bus: &dyn Bus) {
    let tag = unique_id("audit");
    let entries = vec![format!("{tag} a"), format!("{tag} b")];
    let (old, new, ids) = append_at_head(bus, &entries).await;
    assert_ne!(old, new);
    assert!(parse_id(&ids[0]) < parse_id(&ids[1]), "positions increase");
    assert_eq!(
        bus.audit_read(Some(&ids[0]), 1).await.expect("audit_read"),
        [AuditRecord {
            id: ids[1].clone(),
            entry: entries[1].clone()
        }],
        "one append's entries are adjacent"
    );

    let stale = format!("{tag} stale");
    assert_eq!(
        bus.audit_append(&old, &unique_id("head"), std::slice::from_ref(&stale))
            .await
            .expect("audit_append"),
        None,
        "the head it replaced is stale"
    );
    assert_eq!(
        bus.audit_append(&unique_id("never-a-head"), &unique_id("head"), &[])
            .await
            .expect("audit_append"),
        None,
        "an append of nothing on a stale head is refused too"
    );
    // The head we set is in place unless someone appended after us.
    let next = format!("{tag} c");
    match bus
        .audit_append(&new, &unique_id("head"), std::slice::from_ref(&next))
        .await
        .expect("audit_append")
    {
        Some(more) => assert!(parse_id(&more[0]) > parse_id(&ids[1])),
        None => assert!(
            !bus.audit_read(Some(&ids[1]), 1)
                .await
                .expect("audit_read")
                .is_empty(),
            "the head moved on from ours with nothing appended after ours"
        ),
    }
    let ours: Vec<String> = read_audit_all(bus, &ids[0], 100)
        .await
        .into_iter()
        .filter(|r| r.entry.starts_with(&tag))
        .map(|r| r.entry)
        .collect();
    assert!(
        !ours.contains(&stale),
        "a refused append wrote nothing: {ours:?}"
    );
    assert_eq!(ours.first(), Some(&entries[1]));
    assert!(matches!(
        bus.audit_read(Some(&StreamId("not-an-id".into())), 1).await,
        Err(BusError::Corrupt(_))
    ));
}

/// Reads page after an exclusive cursor; entries appended while a reader pages come after
/// what it has, so paging returns each entry once, in append order.
pub async fn audit_read_pages_exclusively(bus: &dyn Bus) {
    let tag = unique_id("audit-page");
    let first: Vec<String> = (0..5).map(|i| format!("{tag} {i}")).collect();
    let (_, _, ids) = append_at_head(bus, &first).await;
    let record = |i: usize| AuditRecord {
        id: ids[i].clone(),
        entry: first[i].clone(),
    };
    assert_eq!(
        bus.audit_read(Some(&ids[0]), 2).await.expect("audit_read"),
        [record(1), record(2)]
    );
    assert_eq!(
        bus.audit_read(Some(&ids[2]), 1).await.expect("audit_read"),
        [record(3)]
    );
    assert!(
        bus.audit_read(Some(&ids[0]), 0)
            .await
            .expect("audit_read")
            .is_empty(),
        "limit 0"
    );
    let oldest = bus.audit_read(None, 1).await.expect("audit_read");
    assert!(
        oldest.len() == 1 && parse_id(&oldest[0].id) <= parse_id(&ids[0]),
        "from the start: {oldest:?}"
    );

    // Page two at a time from our first entry, appending one more after each page.
    let mut expected: Vec<String> = first[1..].to_vec();
    let mut cursor = ids[0].clone();
    let mut seen: Vec<AuditRecord> = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut extra = 0;
    loop {
        let page = bus.audit_read(Some(&cursor), 2).await.expect("audit_read");
        assert!(page.len() <= 2);
        if extra < 4 {
            let e = format!("{tag} extra {extra}");
            append_at_head(bus, std::slice::from_ref(&e)).await;
            expected.push(e);
            extra += 1;
        } else if page.is_empty() {
            break;
        }
        if let Some(last) = page.last() {
            assert!(parse_id(&page[0].id) > parse_id(&cursor), "exclusive");
            cursor = last.id.clone();
        }
        seen.extend(page);
        assert!(
            tokio::time::Instant::now() < deadline,
            "paging never caught up"
        );
    }
    assert!(
        seen.windows(2)
            .all(|w| parse_id(&w[0].id) < parse_id(&w[1].id)),
        "in append order"
    );
    let ours: Vec<String> = seen
        .into_iter()
        .filter(|r| r.entry.starts_with(&tag))
        .map(|r| r.entry)
        .collect();
    assert_eq!(ours, expected, "each entry once, in append order");
}

/// Appenders racing with the retry loop of [`append_at_head`] form one chain: no head is
/// extended twice, every entry is in the log once at the position its append returned, and
/// each append extends the head set by the append just before it in the log.
pub async fn audit_concurrent_appenders_form_one_chain(bus: &dyn Bus) {
    const APPENDERS: usize = 4;
    const EACH: usize = 5;
    let tag = unique_id("audit-chain");
    let start_entry = format!("{tag} start");
    let (_, start_head, start_ids) = append_at_head(bus, std::slice::from_ref(&start_entry)).await;
    let tag = &tag;
    let appender = |a: usize| async move {
        let mut done = Vec::new();
        for n in 0..EACH {
            let entry = format!("{tag} {a} {n}");
            let (prev, head, ids) = append_at_head(bus, std::slice::from_ref(&entry)).await;
            done.push((entry, prev, head, ids[0].clone()));
        }
        done
    };
    let appends: Vec<(String, String, String, StreamId)> =
        join_all((0..APPENDERS).map(appender).collect())
            .await
            .into_iter()
            .flatten()
            .collect();
    assert_eq!(appends.len(), APPENDERS * EACH);
    let extended: HashSet<&String> = appends.iter().map(|(_, prev, _, _)| prev).collect();
    assert_eq!(
        extended.len(),
        appends.len(),
        "two appends extended the same head (a fork)"
    );

    let log = read_audit_all(bus, &start_ids[0], 7).await;
    let by_entry: HashMap<&String, &(String, String, String, StreamId)> =
        appends.iter().map(|a| (&a.0, a)).collect();
    let ours: Vec<&AuditRecord> = log
        .iter()
        .filter(|r| by_entry.contains_key(&r.entry))
        .collect();
    assert_eq!(ours.len(), appends.len(), "every entry once, none lost");
    for r in &ours {
        assert_eq!(
            r.id, by_entry[&r.entry].3,
            "at the position its append returned"
        );
    }
    // Adjacent in the log: the later one extended the head the earlier one set.
    let mut previous_head = Some(start_head);
    for r in &log {
        match by_entry.get(&r.entry) {
            Some((_, prev, head, _)) => {
                if let Some(p) = &previous_head {
                    assert_eq!(prev, p, "{:?} did not extend the head before it", r.entry);
                }
                previous_head = Some(head.clone());
            }
            // Someone else's entry between two of ours: its head is not known here.
            None => previous_head = None,
        }
    }
}

// --- registry queries and deletes ------------------------------------------------------------

async fn query(
    bus: &dyn Bus,
    groups: Option<&[&str]>,
    prefix: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Vec<String> {
    let q = DeviceQuery {
        groups: groups.map(|gs| gs.iter().map(|g| (*g).to_owned()).collect()),
        prefix: prefix.map(str::to_owned),
        after: after.map(str::to_owned),
        limit,
    };
    let page = bus.device_query(&q).await.expect("device_query");
    assert!(page.len() <= limit, "device_query returned more than limit");
    page.into_iter().map(|d| d.id).collect()
}

fn ids_of(all: &[String], picks: &[usize]) -> Vec<String> {
    picks.iter().map(|&i| all[i].clone()).collect()
}

async fn create(bus: &dyn Bus, record: &DeviceRecord) {
    assert!(
        bus.device_create(record).await.expect("device_create"),
        "{} is new",
        record.id
    );
}

/// A query by groups returns the sorted union of the groups' devices, each once, whole
/// records, `limit` at a time.
pub async fn device_query_by_groups(bus: &dyn Bus) {
    let p = format!("{}/", unique_id("dq"));
    let (ga, gb, gc) = (unique_id("dq-ga"), unique_id("dq-gb"), unique_id("dq-gc"));
    let (ga, gb, gc) = (ga.as_str(), gb.as_str(), gc.as_str());
    let groups: [&[&str]; 6] = [&[ga], &[gb], &[ga, gb], &[], &[gc], &[gb, ga]];
    let ids: Vec<String> = (0..groups.len()).map(|i| format!("{p}{i}")).collect();
    let records: Vec<DeviceRecord> = ids
        .iter()
        .zip(groups)
        .map(|(id, gs)| device_record(id, gs))
        .collect();
    for i in [4, 1, 5, 0, 3, 2] {
        create(bus, &records[i]).await;
    }
    assert_eq!(
        query(bus, Some(&[ga, gb]), None, None, 100).await,
        ids_of(&ids, &[0, 1, 2, 5]),
        "union, each device once, in ID order"
    );
    assert_eq!(
        query(bus, Some(&[gb]), None, None, 100).await,
        ids_of(&ids, &[1, 2, 5])
    );
    assert_eq!(
        query(bus, Some(&[ga, ga]), None, None, 100).await,
        ids_of(&ids, &[0, 2, 5]),
        "a group named twice"
    );
    assert_eq!(
        query(bus, Some(&[ga, gb, gc]), None, None, 3).await,
        ids_of(&ids, &[0, 1, 2]),
        "the first `limit` of the union"
    );
    let unknown = unique_id("dq-none");
    assert!(
        query(bus, Some(&[unknown.as_str()]), None, None, 10)
            .await
            .is_empty()
    );
    assert!(
        query(bus, Some(&[]), None, None, 10).await.is_empty(),
        "no groups: no devices"
    );
    assert!(query(bus, Some(&[ga]), None, None, 0).await.is_empty());

    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = query(bus, Some(&[ga, gb, gc]), None, after.as_deref(), 2).await;
        let Some(last) = page.last() else { break };
        after = Some(last.clone());
        paged.extend(page);
    }
    assert_eq!(paged, ids_of(&ids, &[0, 1, 2, 4, 5]), "paging the union");

    let got = bus
        .device_query(&DeviceQuery {
            groups: Some(vec![gb.to_owned()]),
            limit: 10,
            ..DeviceQuery::default()
        })
        .await
        .expect("device_query");
    assert_eq!(
        got,
        [records[1].clone(), records[2].clone(), records[5].clone()],
        "whole records"
    );
    assert_eq!(
        query(bus, None, Some(&p), None, 100).await,
        ids,
        "no group filter: every device"
    );
}

/// `prefix` keeps IDs starting with it and combines with `after`: the page starts at the
/// later of the two, with or without groups.
pub async fn device_query_prefix_and_after(bus: &dyn Bus) {
    let p = unique_id("dqp");
    let g = unique_id("dqp-g");
    let names = ["0", "a/1", "a/2", "a/3", "b/1", "b/2", "z"];
    let ids: Vec<String> = names.iter().map(|n| format!("{p}/{n}")).collect();
    for id in ids.iter().rev() {
        create(bus, &device_record(id, &[g.as_str()])).await;
    }
    let (pa, pb) = (format!("{p}/a/"), format!("{p}/b/"));
    let group = [g.as_str()];
    for groups in [None, Some(&group[..])] {
        let q = |prefix: &str, after: Option<&str>, limit: usize| {
            let prefix = prefix.to_owned();
            let after = after.map(str::to_owned);
            async move { query(bus, groups, Some(&prefix), after.as_deref(), limit).await }
        };
        let with = if groups.is_some() { "with" } else { "without" };
        assert_eq!(
            q(&pa, None, 10).await,
            ids_of(&ids, &[1, 2, 3]),
            "{with} groups"
        );
        assert_eq!(
            q(&pa, Some(&ids[1]), 10).await,
            ids_of(&ids, &[2, 3]),
            "{with} groups: a cursor inside the prefix"
        );
        assert_eq!(
            q(&pa, Some(&format!("{p}/")), 10).await,
            ids_of(&ids, &[1, 2, 3]),
            "{with} groups: a cursor before the prefix"
        );
        assert!(
            q(&pa, Some(&ids[3]), 10).await.is_empty(),
            "{with} groups: a cursor at the prefix's last device"
        );
        assert!(
            q(&pa, Some(&pb), 10).await.is_empty(),
            "{with} groups: a cursor past the prefix"
        );
        assert_eq!(q(&pb, None, 1).await, ids_of(&ids, &[4]), "{with} groups");
        assert_eq!(
            q(&pb, Some(&ids[4]), 1).await,
            ids_of(&ids, &[5]),
            "{with} groups"
        );
        assert_eq!(
            q(&ids[6], None, 10).await,
            ids_of(&ids, &[6]),
            "{with} groups: a whole ID as prefix"
        );
    }
}

/// Paging with the last ID as the next cursor returns every device that exists throughout
/// exactly once, while devices are added before and after the cursor and others removed.
pub async fn device_query_paging_while_adding(bus: &dyn Bus) {
    let base = unique_id("dqadd");
    let g = unique_id("dqadd-g");
    let group = [g.as_str()];
    // Once without and once with a group filter, each on devices of its own.
    for (round, groups) in [None, Some(&group[..])].into_iter().enumerate() {
        let p = format!("{base}/{round}/");
        let existing: Vec<String> = (1..=9).map(|i| format!("{p}{i}0")).collect();
        for id in &existing {
            create(bus, &device_record(id, &group)).await;
        }
        let mut removed = HashSet::new();
        let mut seen: Vec<String> = Vec::new();
        let mut after: Option<String> = None;
        let mut n = 0;
        loop {
            let page = query(bus, groups, Some(&p), after.as_deref(), 2).await;
            let Some(last) = page.last().cloned() else {
                break;
            };
            seen.extend(page);
            // While devices that were there from the start lie ahead: a new device before
            // the cursor (`0+` sorts before them all) and one right after it (`+` sorts
            // before the digits), and now and then a removal ahead.
            if existing.last().is_some_and(|end| *end > last) {
                for id in [format!("{p}0+{n}"), format!("{last}+{n}")] {
                    create(bus, &device_record(&id, &group)).await;
                }
            }
            let ahead = existing
                .iter()
                .find(|id| **id > last && !removed.contains(*id));
            if let (Some(ahead), 1) = (ahead, n % 2) {
                assert!(bus.device_delete(ahead).await.expect("device_delete"));
                removed.insert(ahead.clone());
            }
            after = Some(last);
            n += 1;
            assert!(n < 100, "paging does not end: {seen:?}");
        }
        assert!(!removed.is_empty());
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "round {round}: increasing, no repeats: {seen:?}"
        );
        for id in existing.iter().filter(|id| !removed.contains(*id)) {
            let times = seen.iter().filter(|s| *s == id).count();
            assert_eq!(times, 1, "round {round}: {id} seen {times} times");
        }
        assert!(seen.iter().all(|s| s.starts_with(&p)));
    }
}

/// The group index follows updates (a device that leaves a group is no longer listed in it)
/// and deletes.
pub async fn device_group_index_follows_update_and_delete(bus: &dyn Bus) {
    let id = unique_id("dgi");
    let (ga, gb, gc) = (
        unique_id("dgi-ga"),
        unique_id("dgi-gb"),
        unique_id("dgi-gc"),
    );
    let (ga, gb, gc) = (ga.as_str(), gb.as_str(), gc.as_str());
    let members = |g: &str| {
        let g = g.to_owned();
        async move { query(bus, Some(&[g.as_str()]), None, None, 10).await }
    };
    let just = vec![id.clone()];
    create(bus, &device_record(&id, &[ga, gb])).await;
    assert_eq!(members(ga).await, just);
    assert_eq!(members(gb).await, just);
    assert!(members(gc).await.is_empty());

    let mut rec = device_record(&id, &[gb, gc]);
    assert!(bus.device_update(&rec).await.expect("device_update"));
    assert!(members(ga).await.is_empty(), "left ga");
    assert_eq!(members(gb).await, just, "still in gb");
    assert_eq!(members(gc).await, just, "joined gc");

    rec.revoked = true;
    assert!(bus.device_update(&rec).await.expect("device_update"));
    let got = bus
        .device_query(&DeviceQuery {
            groups: Some(vec![gc.to_owned()]),
            limit: 10,
            ..DeviceQuery::default()
        })
        .await
        .expect("device_query");
    assert_eq!(got, [rec.clone()], "the updated record is listed");

    assert!(
        bus.device_update(&device_record(&id, &[]))
            .await
            .expect("device_update")
    );
    for g in [ga, gb, gc] {
        assert!(members(g).await.is_empty(), "in no group");
    }
    assert!(
        bus.device_update(&device_record(&id, &[ga]))
            .await
            .expect("device_update")
    );
    assert_eq!(members(ga).await, just);

    assert!(bus.device_delete(&id).await.expect("device_delete"));
    assert!(
        members(ga).await.is_empty(),
        "a deleted device leaves its groups"
    );
    assert!(query(bus, None, Some(&id), None, 10).await.is_empty());
    assert_eq!(bus.device_get(&id).await.expect("device_get"), None);
    assert!(
        !bus.device_delete(&id).await.expect("device_delete"),
        "nothing left to delete"
    );
    create(bus, &device_record(&id, &[gc])).await;
    assert!(
        members(ga).await.is_empty(),
        "no membership survives a delete"
    );
    assert_eq!(members(gc).await, just);
}

/// A delete removes the record, the device's queue (its expiry entries too: the sweeper
/// never hands its commands out) and its shadow, and nothing of other devices.
pub async fn device_delete_removes_queue_and_shadow(bus: &dyn Bus) {
    let id = unique_id("ddel");
    let other = unique_id("ddel-other");
    create(bus, &device_record(&id, &["ddel"])).await;
    create(bus, &device_record(&other, &[])).await;
    for m in ["m1", "m2"] {
        bus.queue_push(&live_command(&id, m)).await.expect("push");
    }
    // Expired in 1970: only the take below reaches it (see the suite's docs).
    bus.queue_push(&command(&id, "e1", Qos::AtLeastOnce, 500))
        .await
        .expect("push");
    bus.queue_push(&live_command(&other, "m1"))
        .await
        .expect("push");
    bus.shadow_merge_reported(&id, &obj(json!({"on": true})), now_ms())
        .await
        .expect("shadow");
    bus.shadow_merge_reported(&other, &obj(json!({"on": true})), now_ms())
        .await
        .expect("shadow");

    assert!(bus.device_delete(&id).await.expect("device_delete"));
    assert_eq!(bus.device_get(&id).await.expect("device_get"), None);
    assert_eq!(bus.queue_len(&id).await.expect("queue_len"), 0);
    assert!(
        bus.queue_pending(&id, None, 10)
            .await
            .expect("queue_pending")
            .is_empty()
    );
    assert_eq!(bus.queue_ack(&id, "m1").await.expect("queue_ack"), None);
    assert_eq!(bus.shadow_get(&id).await.expect("shadow_get"), None);
    let taken = bus
        .queue_take_expired(1_000, 10_000)
        .await
        .expect("queue_take_expired");
    assert!(
        taken.iter().all(|c| c.command.device != id),
        "the sweeper found a deleted device's command"
    );

    assert_eq!(bus.queue_len(&other).await.expect("queue_len"), 1);
    assert!(bus.shadow_get(&other).await.expect("shadow_get").is_some());
    assert!(bus.device_get(&other).await.expect("device_get").is_some());
    assert!(
        !bus.device_delete(&unique_id("ddel-none"))
            .await
            .expect("device_delete")
    );

    // Re-created, it starts with an empty queue: a push of an old msgid is a new command.
    create(bus, &device_record(&id, &[])).await;
    bus.queue_push(&live_command(&id, "m1"))
        .await
        .expect("push");
    assert_eq!(bus.queue_len(&id).await.expect("queue_len"), 1);
    bus.queue_ack(&id, "m1").await.expect("queue_ack");
    bus.queue_ack(&other, "m1").await.expect("queue_ack");
}

/// `device_get_many` answers per ID, in order, repeats and unknown IDs included.
pub async fn device_get_many_keeps_order(bus: &dyn Bus) {
    let a = device_record(&unique_id("dgm-a"), &["g"]);
    let b = device_record(&unique_id("dgm-b"), &[]);
    create(bus, &a).await;
    create(bus, &b).await;
    let ids = [
        b.id.clone(),
        unique_id("dgm-none"),
        a.id.clone(),
        b.id.clone(),
    ];
    assert_eq!(
        bus.device_get_many(&ids).await.expect("device_get_many"),
        [Some(b.clone()), None, Some(a), Some(b)]
    );
    assert!(
        bus.device_get_many(&[])
            .await
            .expect("device_get_many")
            .is_empty()
    );
}

// --- jobs ------------------------------------------------------------------------------------

fn job_command(job: &str, device: &str, id: &str) -> Command {
    Command {
        job: Some(job.to_owned()),
        ..live_command(device, id)
    }
}

async fn execs(bus: &dyn Bus, job: &str) -> Vec<JobExec> {
    bus.job_execs(job, None, 10_000).await.expect("job_execs")
}

fn states(execs: &[JobExec]) -> Vec<(String, JobExecState)> {
    execs.iter().map(|e| (e.device.clone(), e.state)).collect()
}

async fn ack_all(bus: &dyn Bus, devices: &[String]) {
    for d in devices {
        for q in bus
            .queue_pending(d, None, 100)
            .await
            .expect("queue_pending")
        {
            bus.queue_ack(d, q.command.msgid.as_str())
                .await
                .expect("queue_ack");
        }
    }
}

/// A push queues each command and records its execution as `Queued`; pushing the same batch
/// again queues nothing (`Exists`), also for a device repeated within one batch.
pub async fn job_push_queues_once(bus: &dyn Bus) {
    let job = unique_id("job");
    let devices: Vec<String> = (0..3).map(|_| unique_id("jdev")).collect();
    let batch: Vec<Command> = devices.iter().map(|d| job_command(&job, d, "j1")).collect();
    let before = now_ms();
    assert_eq!(
        bus.job_push(&job, &batch).await.expect("job_push"),
        [JobPush::Queued; 3]
    );
    for (d, c) in devices.iter().zip(&batch) {
        let pending = bus.queue_pending(d, None, 10).await.expect("queue_pending");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].command, *c, "queued as pushed, job included");
    }
    assert_eq!(
        bus.job_counts(&job).await.expect("job_counts"),
        JobCounts {
            queued: 3,
            ..JobCounts::default()
        }
    );
    assert_eq!(
        bus.job_push(&job, &batch).await.expect("job_push"),
        [JobPush::Exists; 3],
        "the same batch again"
    );
    for d in &devices {
        assert_eq!(bus.queue_len(d).await.expect("queue_len"), 1, "queued once");
    }
    let fresh = unique_id("jdev");
    let mixed = [
        job_command(&job, &fresh, "j1"),
        job_command(&job, &devices[0], "j1"),
        job_command(&job, &fresh, "j1"),
    ];
    assert_eq!(
        bus.job_push(&job, &mixed).await.expect("job_push"),
        [JobPush::Queued, JobPush::Exists, JobPush::Exists],
        "answers in order; a device repeated in one batch is queued once"
    );
    assert_eq!(bus.queue_len(&fresh).await.expect("queue_len"), 1);
    let all = execs(bus, &job).await;
    let mut want: Vec<String> = devices.clone();
    want.push(fresh.clone());
    want.sort();
    assert_eq!(
        all.iter().map(|e| e.device.clone()).collect::<Vec<_>>(),
        want
    );
    for e in &all {
        assert_eq!((e.msgid.as_str(), e.state), ("j1", JobExecState::Queued));
        assert!(
            e.updated_ms >= before && e.updated_ms <= now_ms(),
            "updated_ms {} is the push's time",
            e.updated_ms
        );
    }
    let other_job = unique_id("job");
    assert_eq!(
        bus.job_push(&other_job, &[job_command(&other_job, &devices[0], "j2")])
            .await
            .expect("job_push"),
        [JobPush::Queued],
        "executions are per job"
    );
    assert_eq!(bus.queue_len(&devices[0]).await.expect("queue_len"), 2);
    assert!(
        bus.job_push(&job, &[]).await.expect("job_push").is_empty(),
        "an empty batch"
    );
    want.push(devices[0].clone());
    ack_all(bus, &want).await;
}

/// A command that finds its queue full is not queued and its execution is `Failed`.
pub async fn job_push_full_queue_is_failed(bus: &dyn Bus) {
    const CAP: usize = 100_000;
    let dev = unique_id("jfull");
    let mut max = 0;
    loop {
        match bus
            .queue_push(&live_command(&dev, &format!("f{max}")))
            .await
        {
            Ok(_) => max += 1,
            Err(BusError::QueueFull { .. }) => break,
            Err(e) => panic!("queue_push failed with {e}"),
        }
        assert!(max <= CAP, "no QueueFull after {CAP} commands");
    }
    let job = unique_id("job-full");
    let c = job_command(&job, &dev, "j");
    assert_eq!(
        bus.job_push(&job, std::slice::from_ref(&c))
            .await
            .expect("job_push"),
        [JobPush::QueueFull]
    );
    assert_eq!(bus.queue_len(&dev).await.expect("queue_len"), max);
    let all = execs(bus, &job).await;
    assert_eq!(states(&all), [(dev.clone(), JobExecState::Failed)]);
    assert_eq!(all[0].msgid, "j");
    let counts = bus.job_counts(&job).await.expect("job_counts");
    assert_eq!(
        counts,
        JobCounts {
            failed: 1,
            ..JobCounts::default()
        }
    );
    assert_eq!((counts.total(), counts.finished()), (1, 1));
    assert_eq!(
        bus.job_push(&job, &[c]).await.expect("job_push"),
        [JobPush::Exists],
        "a failed execution exists too"
    );
    assert!(
        !bus.job_record(&job, &dev, JobExecState::Succeeded)
            .await
            .expect("job_record"),
        "failed is final"
    );
    ack_all(bus, std::slice::from_ref(&dev)).await;
}

/// A queued command of an online device tells the device's node, as `queue_push` does.
pub async fn job_push_tells_the_online_devices_node(bus: &dyn Bus) {
    let node = unique_id("jnode");
    bus.node_heartbeat(&node_info(&node, 1), LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let mut rx = bus.node_subscribe(&node).await.expect("node_subscribe");
    let online = unique_id("jdev-on");
    let offline = unique_id("jdev-off");
    bus.presence_set(&online, &presence(&node, 3))
        .await
        .expect("presence_set");
    let job = unique_id("job-tell");
    let batch = [
        job_command(&job, &offline, "j"),
        job_command(&job, &online, "j"),
    ];
    assert_eq!(
        bus.job_push(&job, &batch).await.expect("job_push"),
        [JobPush::Queued, JobPush::Queued]
    );
    assert_eq!(
        recv_node(&mut rx, "deliver").await,
        NodeMessage::Deliver {
            device: online.clone()
        },
        "only the online device's node hears, and about it"
    );
    ack_all(bus, &[online, offline]).await;
}

/// States only move up in rank: no downgrade, no sideways move, a terminal state is final.
pub async fn job_record_moves_up_only(bus: &dyn Bus) {
    use JobExecState::{Cancelled, Delivered, Failed, Queued, Succeeded, TimedOut};
    let job = unique_id("job-rank");
    let devices: Vec<String> = (0..3).map(|_| unique_id("jrank")).collect();
    let batch: Vec<Command> = devices.iter().map(|d| job_command(&job, d, "j")).collect();
    bus.job_push(&job, &batch).await.expect("job_push");
    let record = |d: usize, state: JobExecState| {
        let (job, dev) = (job.clone(), devices[d].clone());
        async move { bus.job_record(&job, &dev, state).await.expect("job_record") }
    };
    assert!(!record(0, Queued).await, "already queued");
    let before = execs(bus, &job).await;
    assert!(record(0, Delivered).await);
    assert!(!record(0, Delivered).await, "already delivered");
    assert!(!record(0, Queued).await, "no downgrade");
    assert!(record(0, Succeeded).await);
    for s in [Failed, TimedOut, Cancelled, Delivered, Queued, Succeeded] {
        assert!(!record(0, s).await, "succeeded is final, not {s:?}");
    }
    assert!(record(1, Failed).await, "queued may finish at once");
    assert!(!record(1, Delivered).await);
    assert!(record(2, Cancelled).await);
    assert!(!record(2, TimedOut).await);
    let unknown = unique_id("jrank-none");
    assert!(
        !bus.job_record(&job, &unknown, Delivered)
            .await
            .expect("job_record"),
        "no execution for that device"
    );
    assert!(
        !bus.job_record(&unique_id("job-none"), &devices[0], Delivered)
            .await
            .expect("job_record"),
        "no such job"
    );
    let counts = bus.job_counts(&job).await.expect("job_counts");
    assert_eq!(
        counts,
        JobCounts {
            succeeded: 1,
            failed: 1,
            cancelled: 1,
            ..JobCounts::default()
        }
    );
    assert_eq!(counts.finished(), 3);
    let after = execs(bus, &job).await;
    let mut want: Vec<(String, JobExecState)> = vec![
        (devices[0].clone(), Succeeded),
        (devices[1].clone(), Failed),
        (devices[2].clone(), Cancelled),
    ];
    want.sort();
    assert_eq!(states(&after), want);
    for (b, a) in before.iter().zip(&after) {
        assert!(
            a.updated_ms >= b.updated_ms,
            "updated_ms moves with the state"
        );
        assert_eq!(a.msgid, "j");
    }
    ack_all(bus, &devices).await;
}

/// Counts per state, and pages of executions in device order after an exclusive cursor.
pub async fn job_counts_and_execs_paging(bus: &dyn Bus) {
    use JobExecState::{Cancelled, Delivered, Failed, Queued, Succeeded, TimedOut};
    let job = unique_id("job-page");
    let p = unique_id("jpage");
    let devices: Vec<String> = (0..7).map(|i| format!("{p}/{i}")).collect();
    let first: Vec<Command> = [5, 2, 0, 6]
        .iter()
        .map(|&i| job_command(&job, &devices[i], &format!("m{i}")))
        .collect();
    let second: Vec<Command> = [3, 1, 4]
        .iter()
        .map(|&i| job_command(&job, &devices[i], &format!("m{i}")))
        .collect();
    bus.job_push(&job, &first).await.expect("job_push");
    bus.job_push(&job, &second).await.expect("job_push");
    let plan: [&[JobExecState]; 7] = [
        &[Delivered],
        &[Delivered, Succeeded],
        &[Failed],
        &[Delivered, TimedOut],
        &[Succeeded],
        &[Cancelled],
        &[],
    ];
    for (d, steps) in devices.iter().zip(plan) {
        for s in steps {
            assert!(bus.job_record(&job, d, *s).await.expect("job_record"));
        }
    }
    assert_eq!(
        bus.job_counts(&job).await.expect("job_counts"),
        JobCounts {
            queued: 1,
            delivered: 1,
            succeeded: 2,
            failed: 1,
            timed_out: 1,
            cancelled: 1,
        }
    );
    let want: Vec<(String, JobExecState)> = devices
        .iter()
        .zip(plan)
        .map(|(d, steps)| (d.clone(), steps.last().copied().unwrap_or(Queued)))
        .collect();
    let all = execs(bus, &job).await;
    assert_eq!(states(&all), want);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.msgid, format!("m{i}"));
    }
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = bus
            .job_execs(&job, after.as_deref(), 3)
            .await
            .expect("job_execs");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = Some(last.device.clone());
        paged.extend(page);
    }
    assert_eq!(paged, all, "pages add up to the whole");
    assert_eq!(
        states(
            &bus.job_execs(&job, Some(&devices[3]), 2)
                .await
                .expect("job_execs")
        ),
        want[4..6],
        "exclusive cursor"
    );
    assert!(
        bus.job_execs(&job, None, 0)
            .await
            .expect("job_execs")
            .is_empty()
    );
    let none = unique_id("job-none");
    assert_eq!(
        bus.job_counts(&none).await.expect("job_counts"),
        JobCounts::default()
    );
    assert!(execs(bus, &none).await.is_empty());
    ack_all(bus, &devices).await;
}

/// A cancel takes the executions still queued: a command never sent leaves its queue and
/// becomes `Cancelled`; one sent meanwhile (an attempt was counted) or already answered
/// becomes `Delivered` and stays queued if it is. Other jobs' commands stay.
pub async fn job_cancel_unsent_and_sent(bus: &dyn Bus) {
    use JobExecState::{Cancelled, Delivered, Succeeded};
    let job = unique_id("job-cancel");
    let names = ["unsent-1", "unsent-2", "sent", "acked", "recorded"];
    let devices: Vec<String> = names
        .iter()
        .map(|n| unique_id(&format!("jc-{n}")))
        .collect();
    let batch: Vec<Command> = devices.iter().map(|d| job_command(&job, d, "c")).collect();
    assert_eq!(
        bus.job_push(&job, &batch).await.expect("job_push"),
        [JobPush::Queued; 5]
    );
    let other = unique_id("job-other");
    bus.job_push(&other, &[job_command(&other, &devices[0], "o")])
        .await
        .expect("job_push");
    let sent = bus
        .queue_next(&devices[2], None, &[], 10)
        .await
        .expect("queue_next");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].attempts, 1);
    assert!(
        bus.queue_ack(&devices[3], "c")
            .await
            .expect("queue_ack")
            .is_some()
    );
    assert!(
        bus.job_record(&job, &devices[4], Delivered)
            .await
            .expect("job_record")
    );

    let mut taken = 0;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let n = bus.job_cancel(&job, 2).await.expect("job_cancel");
        assert!(n <= 2, "job_cancel took {n} > limit 2");
        if n == 0 {
            break;
        }
        taken += n;
        assert!(
            tokio::time::Instant::now() < deadline,
            "job_cancel never ran dry"
        );
    }
    assert_eq!(taken, 4, "every execution still queued, once");
    assert_eq!(bus.job_cancel(&job, 10).await.expect("job_cancel"), 0);
    assert_eq!(
        bus.job_cancel(&job, 0).await.expect("job_cancel"),
        0,
        "limit 0"
    );
    let mut want: Vec<(String, JobExecState)> = devices
        .iter()
        .zip([Cancelled, Cancelled, Delivered, Delivered, Delivered])
        .map(|(d, s)| (d.clone(), s))
        .collect();
    want.sort();
    assert_eq!(states(&execs(bus, &job).await), want);
    assert_eq!(
        bus.job_counts(&job).await.expect("job_counts"),
        JobCounts {
            delivered: 3,
            cancelled: 2,
            ..JobCounts::default()
        }
    );
    let left = |d: usize| {
        let d = devices[d].clone();
        async move {
            bus.queue_pending(&d, None, 10)
                .await
                .expect("queue_pending")
                .into_iter()
                .map(|q| q.command.msgid.as_str().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(left(0).await, ["o"], "the other job's command stays");
    assert!(
        left(1).await.is_empty(),
        "the unsent command left the queue"
    );
    assert_eq!(
        left(2).await,
        ["c"],
        "a sent command stays: its outcome is on its way"
    );
    assert!(
        !bus.job_record(&job, &devices[0], Succeeded)
            .await
            .expect("job_record"),
        "cancelled is final"
    );
    assert!(
        bus.job_record(&job, &devices[2], Succeeded)
            .await
            .expect("job_record")
    );
    assert_eq!(
        bus.job_counts(&other).await.expect("job_counts"),
        JobCounts {
            queued: 1,
            ..JobCounts::default()
        },
        "the other job is untouched"
    );
    ack_all(bus, &devices).await;
}
