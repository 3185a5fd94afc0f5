//! Linking entries into the chain, and the head token that makes appends conditional.

use sha2::{Digest, Sha256};

use crate::entry::{Checkpoint, Draft, GENESIS, Stage};
use crate::sign::{Signer, checkpoint_statement};

/// Hex SHA-256 of an entry's text.
pub fn hash_text(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The last entry of the chain, as the bus's head token records it:
/// `<seq>:<hash>[:c]` (`:c` when it is a checkpoint). An empty token is an empty log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Sequence number of the last entry (0 for an empty log).
    pub seq: u64,
    /// Hash of the last entry's text ([`GENESIS`] for an empty log).
    pub hash: String,
    /// Whether the last entry is a checkpoint (then another one would vouch for nothing new).
    pub checkpoint: bool,
}

impl Head {
    /// The head of an empty log.
    pub fn empty() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
            checkpoint: false,
        }
    }

    /// Parses a head token.
    pub fn parse(token: &str) -> Option<Self> {
        if token.is_empty() {
            return Some(Self::empty());
        }
        let mut parts = token.split(':');
        let seq = parts.next()?.parse().ok()?;
        let hash = parts.next()?.to_owned();
        let checkpoint = match parts.next() {
            None => false,
            Some("c") => true,
            Some(_) => return None,
        };
        (hash.len() == 64 && parts.next().is_none()).then_some(Self {
            seq,
            hash,
            checkpoint,
        })
    }

    /// The token for this head.
    pub fn token(&self) -> String {
        if self.seq == 0 {
            String::new()
        } else if self.checkpoint {
            format!("{}:{}:c", self.seq, self.hash)
        } else {
            format!("{}:{}", self.seq, self.hash)
        }
    }
}

/// What the writer appends in one step.
pub(crate) enum Item {
    /// An ordinary entry.
    Entry(Box<Draft>),
    /// A checkpoint of whatever precedes it.
    Checkpoint,
}

/// Links `items` after `head`: the texts to append (in order; `None` for a checkpoint that
/// would vouch for nothing new) and the new head.
pub(crate) fn link(
    head: &Head,
    items: Vec<Item>,
    ts: i64,
    signer: &Signer,
) -> (Vec<Option<String>>, Head) {
    let mut head = head.clone();
    let mut texts = Vec::with_capacity(items.len());
    for item in items {
        let entry = match item {
            Item::Entry(draft) => draft.into_entry(head.seq + 1, head.hash.clone(), ts),
            Item::Checkpoint if head.seq == 0 || head.checkpoint => {
                texts.push(None);
                continue;
            }
            Item::Checkpoint => {
                let statement = checkpoint_statement(head.seq, &head.hash);
                let mut e = Draft {
                    stage: Some(Stage::Checkpoint),
                    actor: "system".to_owned(),
                    action: "audit.checkpoint".to_owned(),
                    ..Draft::default()
                }
                .into_entry(head.seq + 1, head.hash.clone(), ts);
                e.checkpoint = Some(Checkpoint {
                    seq: head.seq,
                    hash: head.hash.clone(),
                    kid: signer.kid().to_owned(),
                    sig: signer.sign(&statement),
                });
                e
            }
        };
        let text = entry.canonical();
        head = Head {
            seq: entry.seq,
            hash: hash_text(&text),
            checkpoint: entry.stage == Stage::Checkpoint,
        };
        texts.push(Some(text));
    }
    (texts, head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Entry;

    #[test]
    fn head_tokens_round_trip() {
        for head in [
            Head::empty(),
            Head {
                seq: 9,
                hash: "a".repeat(64),
                checkpoint: false,
            },
            Head {
                seq: 10,
                hash: "b".repeat(64),
                checkpoint: true,
            },
        ] {
            assert_eq!(Head::parse(&head.token()), Some(head));
        }
        assert_eq!(Head::parse("x"), None);
        assert_eq!(Head::parse("1:short"), None);
        assert_eq!(Head::parse(&format!("1:{}:z", "a".repeat(64))), None);
    }

    #[test]
    fn link_chains_entries_and_skips_empty_checkpoints() {
        let signer = Signer::generate();
        let draft = || {
            Item::Entry(Box::new(Draft {
                actor: "bootstrap".into(),
                action: "x".into(),
                ..Draft::default()
            }))
        };
        let (texts, head) = link(
            &Head::empty(),
            vec![
                Item::Checkpoint,
                draft(),
                draft(),
                Item::Checkpoint,
                Item::Checkpoint,
            ],
            5,
            &signer,
        );
        assert!(texts[0].is_none() && texts[4].is_none());
        let e1 = Entry::parse(texts[1].as_ref().unwrap()).unwrap();
        let e2 = Entry::parse(texts[2].as_ref().unwrap()).unwrap();
        let cp = Entry::parse(texts[3].as_ref().unwrap()).unwrap();
        assert_eq!((e1.seq, e1.prev.as_str()), (1, GENESIS));
        assert_eq!(e2.prev, hash_text(texts[1].as_ref().unwrap()));
        let c = cp.checkpoint.unwrap();
        assert_eq!((c.seq, c.hash), (2, hash_text(texts[2].as_ref().unwrap())));
        assert_eq!((head.seq, head.checkpoint), (3, true));
    }
}
