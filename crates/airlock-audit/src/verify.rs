//! Verification of the audit trail as stored.

use airlock_core::audit::{AuditKey, AuditRecord, Break, BreakReason, ChainVerifier};
use airlock_store::{AuditQuery, Store, StoreError};

/// Records read per query while verifying.
const PAGE: u32 = 5_000;

/// The outcome of verifying a trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Records that verified before the first break (all of them when intact).
    pub records: u64,
    /// Chains checked.
    pub chains: usize,
    /// The first place where the trail does not verify.
    pub first_break: Option<Break>,
}

/// Checks every chain in `store` from seq 1 to its sealed head.
pub async fn verify_store(store: &dyn Store, key: &AuditKey) -> Result<Verified, StoreError> {
    let heads = store.audit_heads().await?;
    let mut verifier = ChainVerifier::from_start(key);
    let chains = heads.len();
    for head in heads {
        if let Err(broken) = verify_chain(store, &mut verifier, head.chain).await? {
            return Ok(outcome(&verifier, chains, Some(broken)));
        }
        if let Err(broken) = verifier.check_head(head.chain, head.seq, &head.mac, &head.seal) {
            return Ok(outcome(&verifier, chains, Some(broken)));
        }
    }
    Ok(outcome(&verifier, chains, None))
}

fn outcome(verifier: &ChainVerifier<'_>, chains: usize, first_break: Option<Break>) -> Verified {
    Verified {
        records: verifier.records(),
        chains,
        first_break,
    }
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
