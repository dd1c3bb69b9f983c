//! Verification of the audit trail as stored.

use airlock_core::audit::{AuditKey, AuditRecord, Break, BreakReason, ChainVerifier};
use airlock_store::{AuditQuery, ChainFloor, ChainHead, Store, StoreError};

/// Records read per query while verifying.
const PAGE: u32 = 5_000;

/// The outcome of verifying a trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Records that verified: in each chain, those before its first break
    /// (all of them when the trail is intact).
    pub records: u64,
    /// Chains checked.
    pub chains: usize,
    /// The first place where the trail does not verify: the first break of
    /// the first broken chain.
    pub first_break: Option<Break>,
    /// The first break of every broken chain, in chain order (the first is
    /// `first_break`): each chain is checked to its end or first break.
    pub broken_chains: Vec<Break>,
    /// Chains checked from a sealed floor (their older records were
    /// pruned): the chain and its first record's seq, in chain order.
    pub pruned: Vec<(u32, u64)>,
}

/// How many times at most a chain is checked again while `audit prune`
/// keeps moving its floor as it is read (a prune moves it one step of up
/// to 256 batches at a time, and only forward: this bounds a check that
/// would otherwise follow a prune to its end).
const PRUNED_MEANWHILE_RETRIES: usize = 10_000;

/// Checks every chain in `store` from seq 1 — or, for a chain whose older
/// records were pruned, from its sealed floor — to its sealed head; a
/// broken chain does not stop the others from being checked. A chain found
/// broken while a prune moved its floor (the records read went from under
/// the reading) is checked again from the new floor.
pub async fn verify_store(store: &dyn Store, key: &AuditKey) -> Result<Verified, StoreError> {
    let heads = store.audit_heads().await?;
    let mut floors = store.audit_floors().await?;
    let mut records = 0;
    let chains = heads.len();
    let mut broken_chains = Vec::new();
    let mut pruned = Vec::new();
    for head in heads {
        let mut attempts = 0;
        let (verifier, floor, checked) = loop {
            let floor = floors
                .iter()
                .find(|floor| floor.chain == head.chain)
                .cloned();
            let mut verifier = ChainVerifier::from_start(key);
            let checked = verify_one(store, &mut verifier, &head, floor.as_ref()).await?;
            attempts += 1;
            let broken = match &checked {
                Err(broken) if attempts <= PRUNED_MEANWHILE_RETRIES => broken,
                _ => break (verifier, floor, checked),
            };
            floors = store.audit_floors().await?;
            let now = floors.iter().find(|floor| floor.chain == head.chain);
            // A prune moves the floor forward, and what it removed from
            // under the reading breaks the chain at or before the new
            // floor's next record; anything else is reported as it is.
            let moved = match (&floor, now) {
                (Some(old), Some(now)) => now.seq > old.seq,
                (None, Some(_)) => true,
                _ => false,
            };
            let by_the_prune = now.is_some_and(|now| broken.seq <= now.seq.saturating_add(1));
            if !(moved && by_the_prune) {
                break (verifier, floor, checked);
            }
        };
        records += verifier.records();
        // Started from a floor whose seal verified, broken later or not.
        let started = !matches!(
            &checked,
            Err(Break {
                reason: BreakReason::BadFloor,
                ..
            })
        );
        if let (Some(floor), true) = (&floor, started) {
            pruned.push((floor.chain, floor.seq.saturating_add(1)));
        }
        if let Err(broken) = checked {
            broken_chains.push(broken);
        }
    }
    // Records whose chain has no head: someone deleted the head, which
    // would otherwise hide the chain (and any edit to it) from this check.
    let headless = store.audit_headless_chains().await?;
    let chains = chains + headless.len();
    for (chain, seq) in headless {
        broken_chains.push(Break {
            chain,
            seq,
            reason: BreakReason::NoHead,
        });
    }
    broken_chains.sort_by_key(|broken| broken.chain);
    Ok(Verified {
        records,
        chains,
        first_break: broken_chains.first().cloned(),
        broken_chains,
        pruned,
    })
}

/// Checks one chain, from its `floor` if it has one, to its `head`.
async fn verify_one(
    store: &dyn Store,
    verifier: &mut ChainVerifier<'_>,
    head: &ChainHead,
    floor: Option<&ChainFloor>,
) -> Result<Result<(), Break>, StoreError> {
    if let Some(floor) = floor {
        if let Err(broken) = verifier.start_after(floor.chain, floor.seq, &floor.mac, &floor.seal) {
            return Ok(Err(broken));
        }
    }
    Ok(match verify_chain(store, verifier, head.chain).await? {
        Ok(()) => verifier.check_head(head.chain, head.seq, &head.mac, &head.seal),
        Err(broken) => Err(broken),
    })
}

/// Walks one chain page by page, keeping one record of look-ahead.
async fn verify_chain(
    store: &dyn Store,
    verifier: &mut ChainVerifier<'_>,
    chain: u32,
) -> Result<Result<(), Break>, StoreError> {
    let mut after_seq = 0;
    let mut pending: Option<AuditRecord> = None;
    loop {
        let page = store
            .audit_records(&AuditQuery {
                chain: Some(chain),
                after_seq,
                limit: PAGE,
                ..AuditQuery::default()
            })
            .await;
        let page = match page {
            Ok(page) => page,
            // Stored bytes that do not even decode: the trail breaks there.
            Err(StoreError::UnreadableAudit { chain, seq, reason }) => {
                return Ok(Err(Break {
                    chain,
                    seq,
                    reason: BreakReason::Malformed(reason),
                }));
            }
            Err(e) => return Err(e),
        };
        let full = page.len() == PAGE as usize;
        if let Some(last) = page.last() {
            after_seq = last.seq;
        }
        for record in page {
            if let Some(previous) = pending.take() {
                if let Err(broken) = verifier.check(&previous, Some(&record)) {
                    return Ok(Err(broken));
                }
            }
            pending = Some(record);
        }
        if !full {
            break;
        }
    }
    if let Some(last) = pending {
        if let Err(broken) = verifier.check(&last, None) {
            return Ok(Err(broken));
        }
    }
    Ok(Ok(()))
}
