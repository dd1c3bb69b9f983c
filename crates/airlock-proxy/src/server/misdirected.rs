//! Warnings about clients speaking the other protocol than the listener: a
//! TLS handshake on the plain-HTTP proxy port (an agent given an
//! `https://` base URL), or plain HTTP on the TLS port. The client itself
//! learns little (its TLS library reports a "wrong version number", or the
//! connection just closes), so the operator's log says what happened and
//! what to change — at most one line per [`LOG_EVERY_MS`], counting the
//! connections since the last one, so that a scanner cannot flood it.

use std::net::SocketAddr;

use airlock_core::spaced::{monotonic_ms, Spaced};

/// Shortest time between two warnings.
const LOG_EVERY_MS: i64 = 60_000;

/// The process's count of misdirected connections and when it last warned.
pub(super) static MISDIRECTED: Misdirected = Misdirected(Spaced::new(LOG_EVERY_MS));

/// Which protocol mix-up a connection showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Misdirection {
    /// A TLS handshake on the plain-HTTP listener.
    TlsOnPlain,
    /// Something other than TLS on the TLS listener.
    PlainOnTls,
}

/// Misdirected connections: counted, and warned about at a bounded rate.
pub(super) struct Misdirected(Spaced);

impl Misdirected {
    /// Logs `what` from `peer`, if a warning is due.
    pub(super) fn report(&self, what: Misdirection, peer: SocketAddr) {
        let Some(seen) = self.0.count(monotonic_ms()) else {
            return;
        };
        match what {
            Misdirection::TlsOnPlain => tracing::warn!(
                %peer,
                seen,
                "a client opened a TLS handshake on the plain-HTTP proxy listener: give agents \
                 http:// base URLs (proxy.public_url), or serve TLS (proxy.tls_cert, \
                 proxy.tls_key) ({seen} such connections since the last such warning; at most \
                 one warning a minute)"
            ),
            Misdirection::PlainOnTls => tracing::warn!(
                %peer,
                seen,
                "a client spoke plain HTTP (or something else than TLS) to the TLS proxy \
                 listener: give agents https:// base URLs ({seen} such connections since the \
                 last such warning; at most one warning a minute)"
            ),
        }
    }
}

/// Whether `first`, the first bytes of a connection, open a TLS handshake:
/// a record of type handshake (22) and protocol version 3.x, which no HTTP
/// request line starts with.
pub(super) fn opens_tls(first: &[u8]) -> bool {
    matches!(first, [0x16, 0x03, ..])
}

/// Whether a TLS handshake failed because the client did not speak TLS
/// (its first bytes are no TLS record).
pub(super) fn not_tls(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_record_header_is_told_from_a_request_line() {
        // The start of a TLS 1.2/1.3 ClientHello record.
        assert!(opens_tls(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]));
        assert!(!opens_tls(b"GET / HTTP/1.1\r\n"));
        assert!(!opens_tls(b"PRI * HTTP/2.0\r\n"));
        assert!(!opens_tls(&[0x16]));
        assert!(!opens_tls(b""));
    }

    #[test]
    fn only_a_non_tls_record_counts_as_plain_on_tls() {
        let plain = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        );
        assert!(not_tls(&plain));
        let other = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::HandshakePayloadTooLarge),
        );
        assert!(!not_tls(&other));
        assert!(!not_tls(&std::io::ErrorKind::UnexpectedEof.into()));
    }
}
