//! The audit log against the memory bus: concurrent writers, checkpoints, and verification
//! finding each kind of tampering where it happened.

use std::sync::Arc;

use fleetgate_audit::{
    AuditConfig, AuditLog, Draft, Entry, Signer, Stage, Verifier, export_line, hash_text,
    verify_export,
};
use fleetgate_bus::memory::MemoryBus;
use fleetgate_bus::{AuditRecord, Bus, StreamId};

fn draft(n: usize) -> Draft {
    Draft {
        actor: format!("user:u{n}"),
        action: "device.create".into(),
        target: Some(format!("device:d{n}")),
        outcome: Some(201),
        ..Draft::default()
    }
}

fn signer_pair() -> (Signer, Signer) {
    // Two processes share one signing key: a PEM round trip of a generated one.
    let pem = pkcs8_pem();
    (
        Signer::from_pem(&pem).unwrap(),
        Signer::from_pem(&pem).unwrap(),
    )
}

/// A fixed Ed25519 test key (PKCS#8 PEM, as `openssl genpkey -algorithm ed25519` writes).
fn pkcs8_pem() -> String {
    "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n".to_owned()
}

async fn all(bus: &dyn Bus) -> Vec<AuditRecord> {
    bus.audit_read(None, 100_000).await.unwrap()
}

fn verify(records: &[AuditRecord], signer: &Signer, head: Option<&str>) -> fleetgate_audit::Report {
    let mut v = Verifier::new(&[signer.verifying_key()], true);
    for r in records {
        v.push(r);
    }
    v.finish(head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_form_one_chain_that_verifies() {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
    let (sa, sb) = signer_pair();
    let a = AuditLog::start(bus.clone(), sa, &AuditConfig::default());
    let b = AuditLog::start(bus.clone(), sb, &AuditConfig::default());
    let mut tasks = Vec::new();
    for n in 0..400 {
        let log = if n % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move { log.append(draft(n)).await }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 400, "every append has its own position");
    assert!(a.checkpoint().await.unwrap().is_some());
    assert_eq!(
        b.checkpoint().await.unwrap(),
        None,
        "nothing new to vouch for"
    );
    let records = all(&*bus).await;
    assert_eq!(records.len(), 401);
    let seqs: Vec<u64> = records
        .iter()
        .map(|r| Entry::parse(&r.entry).unwrap().seq)
        .collect();
    assert_eq!(seqs, (1..=401).collect::<Vec<_>>());
    let report = a.verify(None, &[]).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(
        (
            report.entries,
            report.checkpoints,
            report.last_checkpoint_seq
        ),
        (401, 1, Some(400))
    );
    // From a later entry on.
    let report = a.verify(Some(&records[200].id), &[]).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.entries, 201);
}

async fn sample() -> (Vec<AuditRecord>, Signer, String) {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
    let (s, keep) = signer_pair();
    let log = AuditLog::start(bus.clone(), s, &AuditConfig::default());
    for n in 0..10 {
        log.append(draft(n)).await.unwrap();
        if n == 4 {
            log.checkpoint().await.unwrap();
        }
    }
    (all(&*bus).await, keep, bus.audit_head().await.unwrap())
}

fn edit(record: &AuditRecord, f: impl FnOnce(&mut Entry)) -> AuditRecord {
    let mut e = Entry::parse(&record.entry).unwrap();
    f(&mut e);
    AuditRecord {
        id: record.id.clone(),
        entry: e.canonical(),
    }
}

#[tokio::test]
async fn verification_names_where_the_chain_was_tampered_with() {
    let (records, signer, head) = sample().await;
    assert_eq!(records.len(), 11);
    assert!(verify(&records, &signer, Some(&head)).ok());
    let bad = |r: &[AuditRecord]| verify(r, &signer, Some(&head)).broken.expect("detected");

    // Edited: the entry itself is named.
    let mut edited = records.clone();
    edited[7] = edit(&records[7], |e| e.outcome = Some(403));
    let b = bad(&edited);
    assert_eq!(b.first_bad.as_ref(), Some(&records[7].id), "{b:?}");

    // Edited last entry: caught by the head.
    let mut last = records.clone();
    last[10] = edit(&records[10], |e| e.actor = "user:mallory".into());
    assert_eq!(bad(&last).first_bad.as_ref(), Some(&records[10].id));

    // Deleted: the entry after the gap is named.
    let mut deleted = records.clone();
    deleted.remove(3);
    let b = bad(&deleted);
    assert_eq!(b.first_bad.as_ref(), Some(&records[4].id), "{b:?}");

    // Deleted from the end: the head knows.
    let b = bad(&records[..9]);
    assert_eq!(b.first_bad, None);
    assert_eq!(b.seq, Some(10));

    // Inserted, even with a correct link to its predecessor: the entry after it is named.
    let mut inserted = records.clone();
    let forged = edit(&records[2], |e| {
        e.seq = 4;
        e.prev = hash_text(&records[2].entry);
        e.action = "user.create".into();
    });
    inserted.insert(
        3,
        AuditRecord {
            id: StreamId("0-1".into()),
            ..forged
        },
    );
    let b = bad(&inserted);
    assert_eq!(b.first_bad.as_ref(), Some(&records[3].id), "{b:?}");

    // Reordered.
    let mut reordered = records.clone();
    reordered.swap(1, 2);
    assert_eq!(bad(&reordered).first_bad.as_ref(), Some(&records[2].id));

    // Rewritten consistently from entry 3 on, by someone without the signing key: the
    // checkpoint no longer vouches for what precedes it.
    let mut rewritten: Vec<AuditRecord> = records[..2].to_vec();
    let mut prev = hash_text(&records[1].entry);
    for r in &records[2..] {
        let e = edit(r, |e| {
            e.prev = prev.clone();
            if e.stage != Stage::Checkpoint {
                e.actor = "user:mallory".into();
            }
        });
        prev = hash_text(&e.entry);
        rewritten.push(e);
    }
    let b = verify(&rewritten, &signer, None).broken.expect("detected");
    assert_eq!(
        b.first_bad.as_ref(),
        Some(&records[5].id),
        "the checkpoint: {b:?}"
    );

    // The export of the untouched log verifies offline with the public key alone.
    let text: String = records.iter().map(|r| export_line(r) + "\n").collect();
    let key = fleetgate_audit::public_key_from_pem(&signer.public_key_pem()).unwrap();
    let report = verify_export(text.as_bytes(), &[key], true).unwrap();
    assert!(report.ok() && report.checkpoints == 1, "{report:?}");
    // An unknown key: the checkpoint cannot be trusted.
    let other = Signer::generate().verifying_key();
    assert!(!verify_export(text.as_bytes(), &[other], true).unwrap().ok());
    assert!(verify_export("garbage\n".as_bytes(), &[key], true).is_err());
}
