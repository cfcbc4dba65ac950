//! What a message carries.

use bytes::Bytes;
use hybrid_cluster_core::PayloadKind;

/// The payload of a message: text or bytes, carried as they are.
///
/// Text converts from `&str` and `String`, bytes from [`Bytes`], `Vec<u8>` and `&'static
/// [u8]`, so a send takes either as it is:
///
/// ```
/// use hybrid_cluster::Payload;
///
/// assert_eq!(Payload::from("hello"), Payload::text("hello"));
/// assert_eq!(Payload::from(vec![0u8, 1]), Payload::binary(vec![0u8, 1]));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    kind: PayloadKind,
    bytes: Bytes,
}

impl Payload {
    /// A payload of `kind`. A text payload that is not UTF-8 is refused when it is sent.
    pub fn new(kind: PayloadKind, bytes: impl Into<Bytes>) -> Self {
        Self {
            kind,
            bytes: bytes.into(),
        }
    }

    /// A text payload.
    pub fn text(text: impl Into<String>) -> Self {
        Self::new(PayloadKind::Text, text.into())
    }

    /// A binary payload.
    pub fn binary(bytes: impl Into<Bytes>) -> Self {
        Self::new(PayloadKind::Binary, bytes)
    }

    /// Text or binary.
    pub fn kind(&self) -> PayloadKind {
        self.kind
    }

    /// The bytes carried.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub(crate) fn into_parts(self) -> (PayloadKind, Bytes) {
        (self.kind, self.bytes)
    }
}

impl std::fmt::Debug for Payload {
    // The payload is the user's data: never print it, only its size.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payload")
            .field("kind", &self.kind)
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl From<&str> for Payload {
    fn from(text: &str) -> Self {
        Self::text(text)
    }
}

impl From<String> for Payload {
    fn from(text: String) -> Self {
        Self::text(text)
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Self::binary(bytes)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Self::binary(bytes)
    }
}

impl From<&'static [u8]> for Payload {
    fn from(bytes: &'static [u8]) -> Self {
        Self::binary(Bytes::from_static(bytes))
    }
}
